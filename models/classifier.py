"""The classifier LightningModule every experiment trains."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

from plugins.core.errors import ConfigError, is_number

__all__ = ["Classifier"]


class Classifier(L.LightningModule):
    """Cross-entropy classification of any backbone ``net``; logs loss, accuracy and macro F1 for
    train/val/test (torchmetrics, synced across processes). AdamW with a cosine learning rate over
    ``trainer.max_epochs``. :attr:`last_train_metrics` keeps the last training epoch's values
    (``train/acc``, ``train/f1``, ``train/loss_epoch``), which ``trainer.test`` would otherwise
    clear: ``summary.json`` reports them, so a sweep can tell an arm that did not fit.

    Args:
        net: the backbone, ``(N, ...) -> (N, num_classes)``.
        num_classes: number of classes.
        lr: peak learning rate.
        weight_decay: AdamW's decoupled weight decay.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not is_number(lr) or lr <= 0:
            raise ConfigError("module.lr", lr, "a finite number > 0")
        if not is_number(weight_decay) or weight_decay < 0:
            raise ConfigError("module.weight_decay", weight_decay, "a finite number >= 0")
        if not is_number(label_smoothing) or not 0 <= label_smoothing < 1:
            raise ConfigError("module.label_smoothing", label_smoothing, "a number in [0, 1)")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        self.metrics = nn.ModuleDict(
            {f"{stage}_metrics": metrics.clone(prefix=f"{stage}/") for stage in ("train", "val", "test")}
        )
        self.last_train_metrics: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(logits, y)
        on_step = stage == "train"
        self.log(
            f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(y)
        )
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=len(y))
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    @override
    def on_train_epoch_end(self) -> None:
        # The epoch's values are computed by now (callbacks such as EarlyStopping read them here).
        self.last_train_metrics = {
            k: float(v)
            for k, v in self.trainer.callback_metrics.items()
            if k.startswith("train/") and k not in ("train/loss", "train/loss_step")
        }

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
