"""Plugins on one tensor: a constraint (and hardshrink) with structured pruning on the same weights.

Whatever combination is accepted is reported truthfully (``pruning/channels`` counts the output
channels the final weights hold) and compacts exactly (the compact model computes what the masked
one does, with the reported widths); a combination that cannot work is refused in ``setup``, before
the first batch, by a ConfigError naming the key.

The rule sets are the shipped ``conf/constraints/*.yaml``; where a shipped set does not share a
tensor with pruning (``non_negative`` holds the head only), its selection is widened to the pruned
weights, and the sets that refuse a mask are also run with ``allow_masked: true``.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from models.backbones import ResNet1d
from plugins.constraints import WeightConstraints
from plugins.core.errors import ConfigError
from plugins.core.selection import select_parameters
from plugins.norm import NormFactory
from plugins.pruning.compaction import coupled_groups
from plugins.pruning.structured import StructuredPruning
from plugins.sparsity.hardshrink import HardshrinkSparsifier
from tests.conftest import CONF, FAST, run_train_inprocess
from tests.helpers import conv1d_net, quiet_trainer

EXAMPLE = torch.randn(2, 1, 6, generator=torch.Generator().manual_seed(1))


class Net(L.LightningModule):
    """``cnn``: conv layers with biases, BatchNorm, a linear head; ``resnet``: bias-free convs whose
    residual groups (a block's last conv and its shortcut) share one channel mask."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "cnn":
            self.net = conv1d_net()
        else:
            self.net = ResNet1d(1, 2, widths=(8, 16), kernels=(3, 3), norm=NormFactory("batch"))
        self.example_input_array = EXAMPLE

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 6, generator=g), torch.randint(0, 2, (32,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _rules(name: str, **change) -> list[dict]:
    """The shipped rule set ``conf/constraints/<name>.yaml`` with ``change`` applied to its rule."""
    rules = OmegaConf.to_container(OmegaConf.load(CONF / "constraints" / f"{name}.yaml"))["rules"]
    args = change.pop("args", {})
    rules[0].update(change)
    rules[0]["args"].update(args)
    return rules


ALL_WEIGHTS = {"include": ["*weight"], "module_types": None}
ACCEPTED = {
    "non_negative": _rules("non_negative", **ALL_WEIGHTS),
    "non_negative_clamp": _rules("non_negative", **ALL_WEIGHTS, args={"method": "clamp"}),
    "orthogonal_allow_masked": _rules("orthogonal", allow_masked=True),
    "orthogonal_cayley_allow_masked": _rules("orthogonal", allow_masked=True, args={"method": "cayley"}),
    "spectral_allow_masked": _rules("spectral", allow_masked=True),
    "learned_mask": _rules("learned_mask"),
}
REFUSED = {"orthogonal": _rules("orthogonal"), "spectral": _rules("spectral")}
METHODS = ["random", "l1", "l2"]


class Batches(L.Callback):
    """Counts the batches trained: a refusal must come before the first."""

    def __init__(self) -> None:
        self.seen = 0

    def on_train_batch_start(self, *args) -> None:
        self.seen += 1


class TurnOffChannel(L.Callback):
    """At the end of training, turns off every learned-mask gate of output channel ``channel`` of
    ``layer``: what a learned mask does to a whole channel on its own (the pruning mask keeps it)."""

    def __init__(self, layer: str, channel: int) -> None:
        self.layer, self.channel = layer, channel

    def on_train_end(self, trainer, pl_module) -> None:
        module = pl_module.get_submodule(self.layer)
        for p in module.parametrizations.weight:
            if hasattr(p, "scores"):
                with torch.no_grad():
                    p.scores[self.channel] = -1.0


def _fit(kind, rules, method, compact, extra=(), gmp=False, bake_constraints=True):
    """Train 2 short epochs with constraints (first), hardshrink, pruning (last) on one model."""
    L.seed_everything(0)
    model = Net(kind)
    constraints = WeightConstraints(copy.deepcopy(rules), bake_at_end=bake_constraints)
    pruning = StructuredPruning(
        method=method,
        schedule={"kind": "constant", "start": 0.5, "end": 0.5, "begin_epoch": 0, "end_epoch": 0},
        exclude=["*head*", "net.7.*"],  # the output layer
        compact=compact,
    )
    sparsifier = HardshrinkSparsifier(
        schedule={"kind": "constant", "start": 0.3, "end": 0.3, "begin_epoch": 0, "end_epoch": 0},
        mode="sparsity",
        targets={"exclude": ["*head*", "net.7.*"]},
    )
    plugins = [constraints, *([sparsifier] if gmp else []), pruning]
    trainer = quiet_trainer([*plugins, *extra], max_epochs=2, limit_train_batches=3)
    trainer.fit(model, _loader())
    summary = {}
    for plugin in plugins:
        summary.update(plugin.summary())
    return model.eval(), summary, pruning


def _kept_in_weights(model: Net) -> dict[str, int]:
    """Producer weight name -> output channels not all zero in its group (coupled producers share
    their channels: a channel is gone when it is zero in all of them), from the plain weights."""
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    names = {m: n for n, m in model.named_modules()}
    kept = {}
    for group in coupled_groups(model, EXAMPLE):
        alive = torch.zeros(group.size, dtype=torch.bool)
        for m in group.producers:
            alive |= (m.weight.detach().flatten(1) != 0).any(dim=1)
        for m in group.producers:
            kept[f"{names[m]}.weight"] = int(alive.sum())
    return kept


def _check(masked, masked_summary, compacted, compact_summary, compact_cb) -> None:
    reported = masked_summary["pruning/channels"]
    assert reported == compact_summary["pruning/channels"]
    in_weights = _kept_in_weights(masked)
    for name, value in reported.items():
        kept, total = map(int, value.split("/"))
        assert kept == in_weights[name], (name, value, in_weights[name])
        assert kept <= total // 2  # the pruning happened
        module = compacted.get_submodule(name.rsplit(".", 1)[0])
        assert module.weight.shape[0] == kept, (name, value, tuple(module.weight.shape))
    assert compact_cb.compaction["inexact"] == []
    x = torch.randn(16, 1, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(compacted(x), masked(x), atol=1e-5, rtol=0)
    # The constraint's report survives compaction (a learned mask's IndexError before).
    assert set(compact_summary["constraints"]) == set(masked_summary["constraints"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("constraint", sorted(ACCEPTED))
def test_accepted_combination_reports_what_the_weights_hold_and_compacts_exactly(constraint, method):
    rules = ACCEPTED[constraint]
    masked, masked_summary, _ = _fit("cnn", rules, method, compact=False)
    compacted, compact_summary, compact_cb = _fit("cnn", rules, method, compact=True)
    _check(masked, masked_summary, compacted, compact_summary, compact_cb)


@pytest.mark.parametrize("constraint", ["learned_mask", "non_negative", "spectral_allow_masked"])
def test_residual_groups_with_a_constraint(constraint):
    rules = ACCEPTED[constraint]
    masked, masked_summary, _ = _fit("resnet", rules, "l1", compact=False)
    compacted, compact_summary, compact_cb = _fit("resnet", rules, "l1", compact=True)
    _check(masked, masked_summary, compacted, compact_summary, compact_cb)


@pytest.mark.parametrize("kind,layer", [("cnn", "net.0"), ("resnet", "net.blocks.0.body.0")])
def test_a_channel_the_learned_mask_turns_off_counts_as_pruned(kind, layer):
    """A whole channel zeroed by the constraint itself (not by the pruning mask): reported as
    pruned, its bias and norm follow, and compaction removes it exactly."""
    L.seed_everything(0)
    probe, _, probe_cb = _fit(kind, ACCEPTED["learned_mask"], "l1", compact=False)
    kept_before = probe.get_submodule(layer).weight.detach().flatten(1).ne(0).any(1)
    channel = int(kept_before.nonzero()[0])  # a channel the pruning keeps
    off = [TurnOffChannel(layer, channel)]
    masked, masked_summary, _ = _fit(kind, ACCEPTED["learned_mask"], "l1", False, extra=off)
    compacted, compact_summary, compact_cb = _fit(kind, ACCEPTED["learned_mask"], "l1", True, extra=off)
    name = f"{layer}.weight"
    assert masked_summary["pruning/channels"][name] == f"{int(kept_before.sum()) - 1}/{kept_before.numel()}"
    _check(masked, masked_summary, compacted, compact_summary, compact_cb)


def test_hardshrink_constraint_and_pruning_on_one_tensor():
    rules = ACCEPTED["learned_mask"]
    masked, masked_summary, _ = _fit("cnn", rules, "l1", compact=False, gmp=True)
    compacted, compact_summary, compact_cb = _fit("cnn", rules, "l1", compact=True, gmp=True)
    _check(masked, masked_summary, compacted, compact_summary, compact_cb)
    weights = [masked.net[0].weight, masked.net[3].weight]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert masked_summary["sparsity/selected"] == pytest.approx(zeros)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("constraint", sorted(REFUSED))
def test_a_mask_on_a_constraint_that_cannot_hold_is_refused_before_training(constraint, method):
    batches = Batches()
    with pytest.raises(ConfigError, match=r"constraints\.rules\[0\]\.allow_masked"):
        _fit("cnn", REFUSED[constraint], method, compact=True, extra=[batches])
    assert batches.seen == 0


@pytest.mark.parametrize("gmp", [False, True])
def test_a_constraint_stored_as_several_tensors_refuses_a_mask_before_training(gmp):
    """weight_norm keeps g and v, neither holding the weight's entries: nothing for a mask to zero
    (an AttributeError in setup before)."""
    batches = Batches()
    with pytest.raises(ConfigError, match=r"constraints\.rules\[0\]\.name='weight_norm'"):
        _fit("cnn", [{"name": "weight_norm"}], "l1", compact=False, extra=[batches], gmp=gmp)
    assert batches.seen == 0


def test_layers_stored_as_several_tensors_are_selected_once_each():
    """Four same-shape weight_norm layers are four tensors, none an alias of another: their weight is
    computed anew on each read, and a freed temporary's id was taken for a tie (or a KeyError)."""
    net = torch.nn.Sequential(*(torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, 16)) for _ in range(4)))
    targets = select_parameters(net, ["*weight"])
    assert [(t.name, t.aliases) for t in targets] == [(f"{i}.weight", ()) for i in range(4)]


def test_compaction_next_to_constraints_kept_as_parametrizations_is_refused_before_training():
    """Compaction bakes every parametrization; constraints.bake_at_end=false asks to keep them (a
    learned mask's IndexError at the end of the run before)."""
    batches = Batches()
    with pytest.raises(ConfigError, match=r"pruning\.compact=True .*constraints\.bake_at_end"):
        _fit("cnn", ACCEPTED["learned_mask"], "l1", True, extra=[batches], bake_constraints=False)
    assert batches.seen == 0


def test_train_py_learned_mask_with_pruning_and_compaction(tmp_path):
    """The issue's run: summary.json's channels are model.pt's widths, and the run ends."""
    summary = run_train_inprocess(
        [
            *FAST,
            "trainer.max_epochs=2",
            "constraints=learned_mask",
            "pruning=l1",
            "pruning.schedule.begin_epoch=0",
            "pruning.schedule.end_epoch=1",
            "pruning.compact=true",
        ],
        tmp_path,
    )
    net = torch.load(tmp_path / "model.pt", weights_only=False)
    for name, value in summary["pruning/channels"].items():
        kept, total = map(int, value.split("/"))
        assert kept == total // 2
        weight = net.get_submodule(name.removeprefix("net.").rsplit(".", 1)[0]).weight
        assert weight.shape[0] == kept
        assert (weight.flatten(1) != 0).any(dim=1).all()
