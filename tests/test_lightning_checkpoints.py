"""The Lightning calls users already know work with every plugin on, and after compaction:
``trainer.test(ckpt_path="best")``, ``Module.load_from_checkpoint(path)`` on a module built as
usual, ``trainer.fit(ckpt_path=path)`` into a fresh Trainer, and ``torch.load(weights_only=True)``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from models import Classifier, DigitsCNN, DigitsDataModule
from plugins import HardshrinkSparsifier, StructuredPruning, WeightConstraints
from plugins.core.checkpoint_form import CheckpointMismatch
from tests.helpers import quiet_trainer

SCHEDULE = {"kind": "linear", "start": 0.3, "end": 0.6, "begin_epoch": 0, "end_epoch": 1}
PLUGINS = {
    "hardshrink": lambda: [HardshrinkSparsifier(mode="sparsity", schedule=SCHEDULE)],
    "structured-l1": lambda: [StructuredPruning(method="l1", schedule=SCHEDULE, exclude=["*head*"])],
    "structured-compact": lambda: [StructuredPruning(method="l1", amount=0.5, exclude=["*head*"], compact=True)],
    "constraint": lambda: [WeightConstraints(rules=[{"name": "non_negative", "include": ["*head*weight"], "module_types": ["Linear"]}])],
    # Rounds its gates at the end of fit: a checkpoint holds the weights as rounded (the model fit
    # ends with), not the soft-gated ones.
    "learned-mask": lambda: [
        WeightConstraints(rules=[{"name": "learned_mask", "args": {"target": 0.5, "temperature": 0.01}, "include": ["*features.0.0.weight"]}])
    ],
    "all-three": lambda: [
        WeightConstraints(rules=[{"name": "non_negative", "include": ["*head*weight"], "module_types": ["Linear"]}]),
        HardshrinkSparsifier(mode="sparsity", schedule=SCHEDULE),
        StructuredPruning(method="random", schedule=SCHEDULE, exclude=["*head*"], seed=0),
    ],
}


def build() -> tuple[Classifier, DigitsDataModule]:
    """The module as a user builds it, with random weights."""
    return Classifier(net=DigitsCNN(), num_classes=10), DigitsDataModule(batch_size=64, seed=0)


def trainer(tmp_path: Path, callbacks: list, epochs: int = 2) -> tuple[L.Trainer, ModelCheckpoint]:
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")
    every = ModelCheckpoint(dirpath=tmp_path / "every", filename="{epoch}", save_top_k=-1)
    t = quiet_trainer(
        [*callbacks, best, every],
        max_epochs=epochs,
        limit_train_batches=4,
        limit_val_batches=2,
        limit_test_batches=3,
        enable_checkpointing=True,
    )
    return t, best


def plain_test(path: str) -> float:
    """Test accuracy of the checkpoint loaded into a freshly built module with no plugin at all."""
    module, data = build()
    loaded = Classifier.load_from_checkpoint(path, net=DigitsCNN())
    t, _ = trainer(Path(path).parent / "plain", [])
    return t.test(loaded, datamodule=data, verbose=False)[0]["test/acc"]


@pytest.fixture(scope="module", params=list(PLUGINS))
def fitted(request, tmp_path_factory):
    L.seed_everything(0)
    tmp_path = tmp_path_factory.mktemp(request.param)
    module, data = build()
    plugins = PLUGINS[request.param]()
    t, best = trainer(tmp_path, plugins)
    t.fit(module, datamodule=data)
    x = next(iter(data.test_dataloader()))[0]
    with torch.no_grad():
        module.final = (x, module.eval()(x))  # before any test loads another checkpoint into it
    return request.param, module, data, t, best, plugins


def test_checkpoint_holds_plain_names_and_loads_with_weights_only(fitted):
    _, module, _, _, best, _ = fitted
    checkpoint = torch.load(best.best_model_path, weights_only=True)
    assert set(checkpoint["state_dict"]) == set(build()[0].state_dict())


def test_trainer_test_ckpt_path_best(fitted):
    name, module, data, t, best, _ = fitted
    live = t.test(module, datamodule=data, ckpt_path="best", verbose=False)[0]["test/acc"]
    assert live == pytest.approx(plain_test(best.best_model_path), abs=1e-6)


def test_load_from_checkpoint_into_a_module_built_as_usual(fitted):
    name, module, data, t, best, _ = fitted
    last = Path(best.dirpath) / "every" / "epoch=1.ckpt"  # written at the end of training, plugins on
    loaded = Classifier.load_from_checkpoint(last, net=DigitsCNN()).eval()
    x, final = module.final
    # The last checkpoint is the end of training: the model at the end of fit (baked, maybe
    # compacted) computed the same outputs as the full-width model loaded from it.
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), final, atol=1e-5, rtol=1e-5)
    if name == "structured-compact":
        assert module.net.features[0][0].out_channels == 16  # the live model is compacted


def test_fit_resumes_into_a_fresh_trainer(fitted, tmp_path):
    name, _, _, _, best, plugins = fitted
    L.seed_everything(0)
    module, data = build()
    fresh_plugins = PLUGINS[name]()
    t, _ = trainer(tmp_path, fresh_plugins, epochs=3)
    t.fit(module, datamodule=data, ckpt_path=Path(best.dirpath) / "every" / "epoch=1.ckpt")
    assert t.global_step == 12  # 8 steps from the checkpoint, 4 run here
    for old, new in zip(plugins, fresh_plugins, strict=True):
        if hasattr(old, "history"):
            assert new.history[: len(old.history)] == old.history  # the schedule went on from there


def test_a_compacted_model_refuses_a_checkpoint_saved_before_its_pruning(tmp_path):
    # Pruned and compacted at the start of epoch 1: epoch 0's checkpoint still uses the channels
    # compaction removed, and sliced into the compacted model it would compute something else.
    L.seed_everything(0)
    module, data = build()
    late = {"kind": "constant", "end": 0.5, "begin_epoch": 1, "end_epoch": 1}
    t, _ = trainer(tmp_path, [StructuredPruning(method="l1", schedule=late, exclude=["*head*"], compact=True)])
    t.fit(module, datamodule=data)
    assert module.net.features[0][0].out_channels == 16
    x = next(iter(data.test_dataloader()))[0]
    with torch.no_grad():
        before = module.eval()(x)
    with pytest.raises(CheckpointMismatch, match=r"net\.features\.0\.0\.weight.*saved before this pruning"):
        t.test(module, datamodule=data, ckpt_path=tmp_path / "every" / "epoch=0.ckpt", verbose=False)
    with torch.no_grad():
        assert torch.equal(module.eval()(x), before)  # the failed load left the model as it was
    after = tmp_path / "every" / "epoch=1.ckpt"  # saved after the pruning: loads, and tests as the full model
    live = t.test(module, datamodule=data, ckpt_path=after, verbose=False)[0]["test/acc"]
    assert live == pytest.approx(plain_test(str(after)), abs=1e-6)


def _zeros(module: Classifier) -> float:
    weights = [m.weight for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@pytest.mark.parametrize("mask_form", ["auto", "parametrize"])
def test_a_second_fit_after_testing_an_early_checkpoint_masks_at_the_schedules_value_again(tmp_path, mask_form):
    # The first fit bakes its masks; trainer.test(ckpt_path=...) then loads epoch 0's weights (30%
    # zeros). A second fit must mask again at the schedule's end value and hold it, not train on
    # unmasked weights (nor blame the optimizer for masks that were baked away).
    L.seed_everything(0)
    module, data = build()
    sparsifier = HardshrinkSparsifier(mode="sparsity", schedule=SCHEDULE, mask_form=mask_form)
    t, _ = trainer(tmp_path, [sparsifier], epochs=2)
    t.fit(module, datamodule=data)
    reached = _zeros(module)
    assert reached == pytest.approx(0.6, abs=1e-3)
    t.test(module, datamodule=data, ckpt_path=tmp_path / "every" / "epoch=0.ckpt", verbose=False)
    assert _zeros(module) == pytest.approx(0.3, abs=1e-3)
    t.fit_loop.max_epochs = 3
    t.fit(module, datamodule=data)
    assert _zeros(module) == reached  # the same count of zeros as the first fit left
    assert [h["epoch"] for h in sparsifier.history][-1] == 2 and sparsifier.history[-1]["value"] == 0.6


def test_failed_load_leaves_the_live_model_unchanged(tmp_path):
    module, data = build()
    plugins = [
        WeightConstraints(rules=[{"name": "non_negative", "include": ["*head*weight"]}], bake_at_end=False),
        HardshrinkSparsifier(mode="sparsity", schedule=SCHEDULE, bake_at_end=False),
    ]
    trainer(tmp_path, plugins, epochs=1)[0].fit(module, datamodule=data)  # still parametrized
    other = Classifier(net=DigitsCNN(widths=[16, 64, 128]), num_classes=10).state_dict()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(CheckpointMismatch, match=r"net.features.0.0.weight: \[16, 1, 3, 3\] in the checkpoint"):
        module.load_state_dict(other)
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
