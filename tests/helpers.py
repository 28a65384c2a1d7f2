"""Callbacks that tests inject through ``+callbacks.NAME={_target_: tests.helpers....}``."""

from __future__ import annotations

import lightning as L


class CrashAtStep(L.Callback):
    """Raises at the start of optimizer step ``step``: a run killed in the middle of an epoch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"killed at step {self.step}")
