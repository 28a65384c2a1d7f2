"""Checkpoints of a run: ``last.ckpt`` at every epoch end, every N steps and when a signal stops the
run, written atomically; ``best`` for ``trainer.test(ckpt_path="best")``; what ``ckpt_path=last``
resumes from; and the random state a resumed run needs to draw what the uninterrupted run drew.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from plugins.core.errors import ConfigError
from runner.agreed_stop import AgreedStop, agreed_stop

__all__ = [
    "AtomicCheckpointIO",
    "LastCheckpoint",
    "RandomState",
    "best_checkpoint",
    "resolve_resume",
    "stop_on_signal",
]

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file and renames it into place: a run killed while saving
    leaves the previous checkpoint whole. Costs one rename per save."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        tmp = path.with_name(f".tmp.{path.name}")
        super().save_checkpoint(checkpoint, tmp, storage_options=storage_options)
        os.replace(tmp, path)


class LastCheckpoint(L.Callback):
    """Saves ``<dirpath>/last.ckpt`` at the end of every training epoch, every ``every_n_train_steps``
    optimizer steps when set, and when SIGTERM or SIGINT stops the run.

    Lightning turns SIGTERM into a stop after the running batch; SIGINT (Ctrl-C) is made to do the
    same while fitting, so either leaves a checkpoint of a finished batch, and ``ckpt_path=last``
    continues from it. A second Ctrl-C interrupts at once. Under DDP the processes agree on the
    signal after each batch (:mod:`runner.agreed_stop`), so all stop after the same one. Costs one
    checkpoint write per trigger, and under DDP one all-reduce of one integer per batch.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = None) -> None:
        n = every_n_train_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError("checkpoint.every_n_train_steps", n, "null or an integer >= 1")
        self.path = Path(dirpath) / LAST
        self.every_n_train_steps = every_n_train_steps
        self._previous_sigint: Any = None
        self._agreed: AgreedStop | None = None  # under DDP: the processes agree on a signal per batch
        self.stopped_by: str | None = None

    def _save(self, trainer: L.Trainer) -> None:
        # A full checkpoint (optimizer, loops, callbacks): resume needs all of it. Said explicitly,
        # Lightning no longer prints "`weights_only` was not set" at every save.
        trainer.save_checkpoint(self.path, weights_only=False)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def stop_after_batch(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGINT, self._previous_sigint)  # a second Ctrl-C: at once
            self.stopped_by = "SIGINT"
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                raise KeyboardInterrupt  # before Lightning's handler is in place
            # Lightning's own SIGTERM handling: stop after this batch, DDP's children too.
            signal.raise_signal(signal.SIGTERM)

        if _main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, stop_after_batch)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning put its own SIGTERM handler in place (it does so after on_fit_start).
        self._agreed = agreed_stop(trainer)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._agreed is not None:
            self._agreed.agree(trainer)
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0 and not trainer.received_sigterm:
            self._save(trainer)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self.stopped_by = self.stopped_by or "SIGTERM"
            self._save(trainer)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._agreed is not None:
            self._agreed.restore()
            self._agreed = None
        if self._previous_sigint is not None and _main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def best_checkpoint(dirpath: str | Path, monitor: str = "val/acc", mode: str = "max") -> ModelCheckpoint:
    """The checkpoint ``trainer.test(ckpt_path="best")`` loads: the best epoch by ``monitor``."""
    if mode not in ("max", "min"):
        raise ConfigError("checkpoint.mode", mode, "max or min")
    return ModelCheckpoint(
        dirpath=dirpath,
        filename="best-epoch{epoch:03d}",
        auto_insert_metric_name=False,
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        save_last=False,
    )


def resolve_resume(ckpt_path: str | None, run_dir: Path) -> tuple[str | None, str | None]:
    """The checkpoint a run starts from and the line that says so.

    ``last`` is the newest of ``checkpoints/last.ckpt`` and Lightning's SLURM requeue checkpoints
    (``hpc_ckpt_*.ckpt`` in the run folder); when there is none the run starts fresh and says so.
    """
    if ckpt_path is None:
        return None, None
    if ckpt_path == "last":
        found = [p for p in [run_dir / "checkpoints" / LAST, *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
        if not found:
            return None, f"no checkpoint in {run_dir / 'checkpoints'}: starting fresh"
        path = max(found, key=lambda p: p.stat().st_mtime)
    else:
        path = Path(ckpt_path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    epoch, step = checkpoint.get("epoch", 0), checkpoint.get("global_step", 0)
    return str(path), f"resuming from epoch {epoch}, step {step} ({path})"


def finished(checkpoint: dict[str, Any], cfg: Any) -> bool:
    """Whether ``checkpoint`` ends the run ``cfg`` describes: its epochs all trained
    (``trainer.max_epochs``) or its steps all taken (``trainer.max_steps``), so that resuming from
    it would train nothing."""
    trainer = cfg.get("trainer") or {}
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    epochs, steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    done_epochs = isinstance(epochs, int) and epochs >= 0 and progress.get("processed", 0) >= epochs
    done_steps = isinstance(steps, int) and steps > 0 and checkpoint.get("global_step", 0) >= steps
    return done_epochs or done_steps


class RandomState(L.Callback):
    """Saves torch's and Python's random states in every checkpoint and restores them on resume,
    so that dropout draws after a resume are those of the run that was never stopped.

    A checkpoint written mid-epoch is restored once more at the first batch: the resumed run builds
    a fresh data iterator (which draws a seed) where the uninterrupted run went on with its own.
    """

    def __init__(self) -> None:
        self._again: dict[str, Any] | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore(state_dict)
        self._again = state_dict

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._again is not None and batch_idx > 0:
            self._restore(self._again)
        self._again = None

    def _restore(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        # A checkpoint may hold Python's state as a list (after a round trip through a serializer).
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def stop_on_signal(trainer: L.Trainer) -> None:
    """A run stopped by SIGTERM (preemption) or Ctrl-C: say where its checkpoint is, and exit with
    the signal's status (143 or 130) so that a scheduler sees it did not finish."""
    saver = next(cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint))
    name = saver.stopped_by or "SIGTERM"
    print(
        f"stopped by {name} at epoch {trainer.current_epoch}, step {trainer.global_step}: "
        f"{saver.path} holds it; continue with ckpt_path=last",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(128 + getattr(signal, name))
