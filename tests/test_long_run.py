"""Many schedule updates over many epochs with every plugin on: memory stays flat, and nothing is
left behind on the model (no parametrization, no hook) once training ends."""

from __future__ import annotations

import gc

import lightning as L
import pytest
import torch
from torch.nn.utils import parametrize

from models import Classifier, DigitsCNN, DigitsDataModule
from plugins import HardshrinkSparsifier, StructuredPruning, WeightConstraints
from tests.helpers import quiet_trainer

pytestmark = pytest.mark.slow

EPOCHS = 30


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * 4096 / 2**20


def _live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


class Probe(L.Callback):
    """Records resident memory and live tensors at the end of every epoch."""

    def __init__(self) -> None:
        self.rss: list[float] = []
        self.tensors: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        gc.collect()
        self.rss.append(_rss_mib())
        self.tensors.append(_live_tensors())


def _plugins() -> list[L.Callback]:
    return [
        # A projection (an optimizer step hook) and a parametrization under the masks.
        WeightConstraints(
            rules=[
                {"name": "non_negative", "include": ["*head.2.weight"], "args": {"method": "clamp"}},
                {"name": "max_norm", "include": ["*head.2.weight"], "args": {"radius": 3.0}},
            ]
        ),
        HardshrinkSparsifier(
            mode="sparsity",
            scope="global",
            schedule={"kind": "cubic", "start": 0.0, "end": 0.8, "begin_epoch": 0, "end_epoch": EPOCHS - 2, "every_n_steps": 1},
        ),
        StructuredPruning(
            method="random",
            schedule={"kind": "linear", "start": 0.0, "end": 0.5, "begin_epoch": 0, "end_epoch": EPOCHS - 2, "every_n_steps": 2},
            exclude=["*head*"],
            seed=0,
        ),
    ]


def test_long_run_memory_is_flat_and_nothing_leaks(tmp_path):
    L.seed_everything(0)
    probe = Probe()
    module = Classifier(DigitsCNN(widths=(16, 32, 64)), num_classes=10)
    trainer = quiet_trainer(
        max_epochs=EPOCHS,
        limit_train_batches=6,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[*_plugins(), probe],
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))

    updates = sum(len(getattr(cb, "history", [])) for cb in trainer.callbacks)
    assert updates >= 150, updates
    # Allow warm-up (allocator, first epochs); afterwards memory and tensor count must not creep.
    warm = 5
    assert probe.rss[-1] - probe.rss[warm] < 25.0, probe.rss
    assert probe.tensors[-1] - probe.tensors[warm] <= 20, probe.tensors
    for name, m in module.named_modules():
        assert not parametrize.is_parametrized(m), name
        assert not m._forward_hooks and not m._forward_pre_hooks, name
        assert not m._backward_hooks and not getattr(m, "_backward_pre_hooks", None), name
    for optimizer in trainer.optimizers:
        assert not optimizer._optimizer_step_post_hooks, "projection hook left on the optimizer"
    head = module.net.head[2].weight.detach()
    assert float(head.min()) >= 0 and float(head.norm(dim=1).max()) <= 3.0 + 1e-5
    weights = [m.weight for m in module.net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros >= 0.8 - 0.01
