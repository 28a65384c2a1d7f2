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


class TinyClassifier(L.LightningModule):
    """A three-layer MLP on 64 fixed random samples: the smallest real LightningModule, for tests
    that spawn processes (DDP) and need seconds, not minutes."""

    def __init__(self) -> None:
        super().__init__()
        from torch import nn

        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        import torch.nn.functional as F

        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        import torch

        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)


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
    """Sends ``signal`` (a name: SIGTERM, SIGINT) to this process at the start of optimizer step
    ``step``, through the operating system, as a scheduler's preemption or a Ctrl-C would."""

    def __init__(self, step: int, signal: str = "SIGTERM") -> None:
        self.step = step
        self.signal = signal

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import os
        import signal

        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal))
