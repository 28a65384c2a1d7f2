"""SIGTERM and Ctrl-C under DDP: every process stops after the same batch, and that batch is saved.

Lightning's own SIGTERM handler broadcasts from inside the signal handler, in the middle of
whatever collective the process was in, and the process that got the signal stops after its batch
while the others go on to the next one's collectives. On 2 CPU processes a SIGTERM sent to both at
one step ended the run with a gloo error (exit 1) and no checkpoint of the stopped batch. Under
DDP, :class:`AgreedStop` replaces that handler once training starts: the handler only notes the
signal, and after each training batch the processes agree on it with one all-reduce (max) of one
integer. When any of them got it, all of them set Lightning's flag at that same batch; Lightning
then stops each after the batch, and ``LastCheckpoint`` saves it as in one process.

Costs one all-reduce of one integer per training batch, under DDP only (Lightning's own loop
already broadcasts one per batch there). A single process keeps Lightning's handler.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import lightning as L
import torch

__all__ = ["AgreedStop", "agreed_stop"]


class AgreedStop:
    """The SIGTERM handler of one DDP process, and the per-batch agreement on a stop."""

    def __init__(self, trainer: L.Trainer) -> None:
        self.noted = False
        self._device = trainer.strategy.root_device
        self._previous = signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.noted = True

    def agree(self, trainer: L.Trainer) -> bool:
        """Whether any process got the signal; if so, Lightning stops this one after this batch."""
        flag = torch.tensor([int(self.noted)], device=self._device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        stop = bool(flag.item())
        if stop:
            trainer._signal_connector.received_sigterm = True  # read by Lightning's loop (no public setter)
        return stop

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def agreed_stop(trainer: L.Trainer) -> AgreedStop | None:
    """An :class:`AgreedStop` for a process of a DDP run (several processes, signals settable here),
    else ``None``."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if trainer.world_size < 2 or not distributed or threading.current_thread() is not threading.main_thread():
        return None
    return AgreedStop(trainer)
