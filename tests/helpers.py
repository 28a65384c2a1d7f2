"""What several test files share: the tiny LightningModule :class:`Tiny`, and callbacks that tests
inject through ``+callbacks.NAME={_target_: tests.helpers....}``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import pairwise

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def quiet_trainer(callbacks: Iterable[L.Callback] = (), **kwargs) -> L.Trainer:
    """A CPU Trainer that writes and prints nothing unless told: no logger, no checkpoints, no
    progress bar, no model summary. ``kwargs`` override or add Trainer arguments."""
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(callbacks=list(callbacks), **{**defaults, **kwargs})


class CrashAtStep(L.Callback):
    """Raises at the start of optimizer step ``step``: a run killed in the middle of an epoch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"killed at step {self.step}")


def mlp(*widths: int) -> nn.Sequential:
    """Linear layers of these widths with a ReLU between each two: ``mlp(8, 32, 3)`` is
    ``Linear(8, 32), ReLU, Linear(32, 3)`` (weights at ``net.0``, ``net.2``, ...)."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in pairwise(widths):
        if layers:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def sgd(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The default optimizer of :class:`Tiny`: SGD with momentum and a little weight decay."""
    return torch.optim.SGD(parameters, lr=0.1, momentum=0.9, weight_decay=1e-3)


class Tiny(L.LightningModule):
    """The smallest real LightningModule: ``net`` (default ``mlp(8, 32, 3)``) trained with
    cross-entropy by ``optimizer`` (a function of the parameters; default :func:`sgd`) on 64 fixed
    random samples of 8 features and 3 classes, 8 per batch, in a fixed order (deterministic).
    Tests with other inputs pass their own loader to ``fit``. Seconds, not minutes, also in the
    processes a DDP test spawns."""

    def __init__(
        self,
        net: nn.Module | None = None,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] = sgd,
    ) -> None:
        super().__init__()
        self.net = mlp(8, 32, 3) if net is None else net
        self.optimizer = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return self.optimizer(self.parameters())

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


class StepLog(L.Callback):
    """Appends ``epoch step`` to ``path`` for every training batch this process runs (and sleeps
    ``sleep`` seconds after it, to give a test time to stop the run): what a process really trained."""

    def __init__(self, path: str, sleep: float = 0.0) -> None:
        self.path = path
        self.sleep = sleep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        with open(self.path, "a") as file:
            file.write(f"{trainer.current_epoch} {trainer.global_step - 1}\n")
        time.sleep(self.sleep)


class SignalAtStep(L.Callback):
    """Sends ``signal`` (a name: SIGTERM, SIGINT, SIGKILL) to this process at the start of optimizer step
    ``step``, through the operating system, as a scheduler's preemption or a Ctrl-C would; under DDP
    from every process, or from the process of global rank ``rank`` only."""

    def __init__(self, step: int, signal: str = "SIGTERM", rank: int | None = None) -> None:
        self.step = step
        self.signal = signal
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import os
        import signal

        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), getattr(signal, self.signal))


def conv1d_net():
    """Two conv-BatchNorm-ReLU stages on (N, 1, 6) series and a linear head: the smallest model with
    coupled channels (each conv's bias and norm follow its output channels)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv1d(1, 8, 3, padding=1),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, padding=1),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6, 2),
    )
