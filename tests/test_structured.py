"""StructuredPruning: torch.prune semantics, coupling, bad input, resume, a real train.py run."""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from models.backbones import DigitsCNN, ResNet1d
from plugins.core.allocation import prune_count
from plugins.core.decision import select_slices
from plugins.core.errors import ConfigError
from plugins.core.masks import get_mask
from plugins.pruning.compaction import compact
from plugins.pruning.structured import StructuredPruning
from tests.conftest import FAST, run_train_inprocess
from tests.helpers import Tiny, conv1d_net, quiet_trainer

# --- the pure part: which slices go -------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("amount", [0.3, 0.5, 3])
def test_ln_keeps_what_torch_ln_structured_keeps(n, dim, amount):
    """Acceptance 5: on a fresh tensor the kept slices equal prune.ln_structured's."""
    torch.manual_seed(n * 10 + dim)
    conv = nn.Conv2d(6, 10, 3)
    size = conv.weight.shape[dim]
    prune.ln_structured(conv, "weight", amount=amount, n=n, dim=dim)
    dims = [d for d in range(4) if d != dim % 4]
    expected = conv.weight_mask.amax(dim=dims) != 0
    got = select_slices(
        "l1" if n == 1 else "l2",
        [conv.weight_orig],
        dim,
        torch.ones(size, dtype=torch.bool),
        prune_count(amount, size, count=isinstance(amount, int)),
    )
    assert torch.equal(got, expected)


def test_random_draws_only_among_unpruned_and_is_seeded():
    keep = torch.ones(20, dtype=torch.bool)
    keep[:5] = False
    a = select_slices("random", [], 0, keep, 10, torch.Generator().manual_seed(7))
    b = select_slices("random", [], 0, keep, 10, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert int((~a).sum()) == 10 and not a[:5].any()  # the 5 pruned stay pruned, 5 new ones
    # Pruning only grows: a lower amount changes nothing.
    assert torch.equal(select_slices("l1", [torch.randn(20, 3)], 0, a, 4), a)
    assert torch.equal(select_slices("random", [], 0, a, 4, torch.Generator().manual_seed(1)), a)


# --- the callback without a Trainer -------------------------------------------------------------


class Wrap(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def _setup(model, shape, **kw):
    kw.setdefault("exclude", ["*head*"])
    kw.setdefault("amount", 0.5)
    cb = StructuredPruning(example_input_shape=shape, seed=0, **kw)
    cb.setup(None, model, "fit")
    return cb


def test_output_channels_mask_bias_free_conv_and_following_norm():
    model = Wrap(DigitsCNN())
    cb = _setup(model, [2, 1, 8, 8])
    cb.apply(0.5)
    conv, bn = model.net.features[1][0], model.net.features[1][1]
    keep = get_mask(conv, "weight").mask.flatten() != 0
    assert get_mask(conv, "weight").mask.shape == (64, 1, 1, 1)
    assert int(keep.sum()) == 32
    assert torch.equal(get_mask(bn, "weight").mask != 0, keep)
    assert torch.equal(get_mask(bn, "bias").mask != 0, keep)
    assert (bn.weight[~keep] == 0).all() and (bn.bias[~keep] == 0).all()
    assert cb.channels()["net.features.1.0.weight"] == "32/64"


def test_residual_group_shares_one_mask():
    model = Wrap(ResNet1d(widths=(8, 16, 16)))
    cb = _setup(model, [2, 1, 32], method="random")
    cb.apply(0.5)
    blocks = model.net.blocks
    masks = [
        get_mask(m, "weight").mask.flatten()
        for m in (blocks[1].body[6], blocks[1].shortcut[0], blocks[2].body[6])
    ]
    assert all(torch.equal(masks[0], m) for m in masks[1:])
    assert int((masks[0] == 0).sum()) == 8


def test_same_seed_same_random_masks_whatever_the_weights():
    """What makes DDP ranks agree: the draw depends on (seed, update, group) only."""
    masks = []
    for init in (0, 1):
        torch.manual_seed(init)
        model = Wrap(DigitsCNN())
        cb = _setup(model, [2, 1, 8, 8], method="random")
        cb.apply(0.25)
        cb.history.append({})  # the next update draws from a new seed
        cb.apply(0.5)
        masks.append([get_mask(t.module, t.tensor_name).mask.clone() for t in cb.targets])
    assert all(torch.equal(a, b) for a, b in zip(*masks, strict=True))


def test_a_frozen_layer_is_pruned_compacted_and_stays_frozen():
    """The dependency graph is traced through autograd, where a frozen layer left no trace (it was
    refused as not called in forward); Torch-Pruning's sliced Parameters all require grad."""
    model = Wrap(DigitsCNN())
    model.net.features[0][0].weight.requires_grad_(False)
    cb = _setup(model, [2, 1, 8, 8])
    cb.apply(0.5)
    assert cb.channels()["net.features.0.0.weight"] == "16/32"
    compact(model, torch.randn(2, 1, 8, 8), measure=False)
    conv = model.net.features[0][0]
    assert conv.out_channels == 16 and not conv.weight.requires_grad
    assert all(p.requires_grad for name, p in model.named_parameters() if name != "net.features.0.0.weight")


def test_an_example_input_the_model_refuses_is_named_by_its_shape():
    with pytest.raises(ConfigError, match=r"^pruning.example_input_shape=\[2, 1, 5\] is not allowed: an example input Wrap's forward takes"):
        _setup(Wrap(DigitsCNN()), [2, 1, 5])


def test_count_mode_and_dim1():
    model = Wrap(DigitsCNN())
    cb = _setup(model, [2, 1, 8, 8], amount=5, include=["*features.1.0.weight"], dim=1)
    cb.apply(5)
    mask = get_mask(model.net.features[1][0], "weight").mask
    assert mask.shape == (1, 32, 1, 1) and int((mask == 0).sum()) == 5


@pytest.mark.parametrize(
    "kwargs,shape,match",
    [
        ({"amount": 1.5}, [2, 1, 8, 8], r"pruning.amount=1.5 .*fraction in \[0, 1\]"),
        ({"amount": -0.1}, [2, 1, 8, 8], r"pruning.amount=-0.1"),
        (
            {"amount": 40},
            [2, 1, 8, 8],
            r"pruning.schedule.end=40 .*32 slices of net.features.0.0.weight",
        ),
        (
            {"amount": 1.0},
            [2, 1, 8, 8],
            r"pruning.schedule.end=1.0 .*slices of net.features.\d.0.weight.*all of them",
        ),
        (
            {"amount": 32},
            [2, 1, 8, 8],
            r"pruning.schedule.end=32 .*net.features.0.0.weight.*all of them",
        ),
        ({"dim": 4}, [2, 1, 8, 8], r"pruning.dim=4 .*net.features.0.0.weight"),
        ({"method": "l3"}, [2, 1, 8, 8], r"pruning.method='l3'"),
        ({"exclude": []}, [2, 1, 8, 8], r"pruning.exclude=.*output layer \(net.head.2.weight\)"),
        (
            {"exclude": ["*shortcut*", "*head*"]},
            [2, 1, 32],
            r"pruning.targets='net.blocks.\d.shortcut.0'.*residual",
        ),
    ],
)
def test_bad_input_names_key_and_layer(kwargs, shape, match):
    model = Wrap(DigitsCNN() if len(shape) == 4 else ResNet1d(widths=(8, 16, 16)))
    with pytest.raises(ConfigError, match=match):
        _setup(model, shape, **kwargs)


def test_a_count_that_empties_layers_names_the_one_that_bounds_it():
    """40 of 32, 64 and 16 channels empties the first and the last layer: the bound is the last's."""
    model = Wrap(DigitsCNN(widths=(32, 64, 16)))
    with pytest.raises(ConfigError, match=r"end=40 is not allowed: a count <= 15, .* 16 slices of net.features.3.0.weight"):
        _setup(model, [2, 1, 8, 8], amount=40)


# --- with a Trainer: resume, logging ------------------------------------------------------------


def _loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(16, 1, 6, generator=g), torch.randint(0, 2, (16,), generator=g)),
        batch_size=4,
    )


def _fit(epochs: int, tmp_path, ckpt=None, seed_everything=11):
    L.seed_everything(seed_everything)
    model = Tiny(conv1d_net(), optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    cb = StructuredPruning(
        method="random",
        schedule={"kind": "linear", "start": 0.25, "end": 0.75, "begin_epoch": 0, "end_epoch": 2},
        exclude=["*net.7*"],
        bake_at_end=False,
    )
    trainer = quiet_trainer(
        [cb],
        max_epochs=epochs,
        limit_train_batches=2,
    )
    trainer.fit(model, train_dataloaders=_loader(), ckpt_path=ckpt)
    masks = {t.name: get_mask(t.module, t.tensor_name).mask.clone() for t in cb.targets}
    return trainer, cb, masks


def test_random_masks_survive_resume(tmp_path):
    """Acceptance 4 (resume part): stop after 2 epochs, resume to 3 == 3 epochs in one go."""
    _, straight_cb, straight = _fit(3, tmp_path)
    trainer, _, _ = _fit(2, tmp_path)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    _, resumed_cb, resumed = _fit(3, tmp_path, ckpt=str(tmp_path / "mid.ckpt"), seed_everything=99)
    assert straight_cb.seed == 11 and resumed_cb.seed == 11  # from the checkpoint, not the new run
    assert len(resumed_cb.history) == 3
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert resumed_cb.channels() == {"net.0.weight": "2/8", "net.3.weight": "2/8"}


# --- through train.py ---------------------------------------------------------------------------


def test_train_prunes_compacts_and_exports(tmp_path):
    """Summary keys, halved channels in the test model and a plain-torch model.pt."""
    summary = run_train_inprocess(
        [
            *FAST,
            "pruning=l1",
            "pruning.schedule.begin_epoch=0",
            "pruning.schedule.end_epoch=0",
            "pruning.compact=true",
        ],
        tmp_path,
    )
    assert summary["pruning/channels"]["net.features.1.0.weight"] == "32/64"
    report = summary["compaction"]
    assert set(report) == {"params_before", "params_after", "macs_before", "macs_after", "speedup"}
    assert report["params_after"] <= 0.30 * report["params_before"]
    assert summary["params/total"] == report["params_after"]
    net = torch.load(tmp_path / "model.pt", weights_only=False)
    assert net.features[1][0].out_channels == 32
    assert not any(
        type(m).__module__.startswith("plugins")
        for m in net.modules()
        if type(m).__name__ != "ChannelLayerNorm"
    )
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    json.dumps(summary)
