"""The console line of a run that is not on a terminal (CI, files, SLURM logs)."""

from __future__ import annotations

import lightning as L
from typing_extensions import override

__all__ = ["EpochLine"]


class EpochLine(L.Callback):
    """Prints one plain line per epoch when stdout is not a terminal (CI, files, SLURM logs)."""

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        shown = {k: v for k, v in trainer.callback_metrics.items() if k.endswith(("loss_epoch", "/acc", "/f1"))}
        parts = " ".join(f"{k}={float(v):.4f}" for k, v in sorted(shown.items()))
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} {parts}", flush=True)
