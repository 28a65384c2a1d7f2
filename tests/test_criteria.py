"""Structured criteria beyond the weight norm: taylor, bn_scale (with network slimming's penalty) and
fpgm, each against a reference computed here independently; one train.py run per new option."""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import DigitsCNN
from plugins.core.decision import Group, select_slices
from plugins.core.errors import ConfigError
from plugins.core.masks import get_mask
from plugins.core.selection import Target
from plugins.pruning.criteria import FPGM
from plugins.pruning.structured import StructuredPruning
from tests.conftest import FAST, run_train_inprocess
from tests.helpers import Tiny, conv1d_net, quiet_trainer


def _pruned_rows(module: nn.Module) -> set[int]:
    mask = get_mask(module, "weight").mask
    return set((mask.reshape(mask.shape[0], -1) == 0).all(dim=1).nonzero().flatten().tolist())


def _lowest(values: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(values, stable=True)[:k].tolist())


# --- taylor --------------------------------------------------------------------------------------


def _reference_taylor(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|W0 * dL/dW0| summed per row, for mlp(8, 32, 3) written out by hand and differentiated by autograd."""
    w0 = params["net.0.weight"].detach().clone().requires_grad_(True)
    hidden = F.relu(x @ w0.T + params["net.0.bias"].detach())
    loss = F.cross_entropy(hidden @ params["net.2.weight"].detach().T + params["net.2.bias"].detach(), y)
    (grad,) = torch.autograd.grad(loss, w0)
    return (w0.detach() * grad).abs().sum(dim=1)


def test_taylor_sums_w_times_grad_over_the_backward_passes_since_the_last_update():
    torch.manual_seed(0)
    model = Tiny()
    cb = StructuredPruning(method="taylor", amount=0.25, exclude=["*net.2*"], couple=False, seed=0)
    cb.setup(None, model, "fit")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    reference = torch.zeros(32)
    for batch_idx, (x, y) in enumerate(model.train_dataloader()):
        if batch_idx == 3:
            break
        params = {n.replace(".parametrizations.weight.original", ".weight"): p for n, p in model.named_parameters()}
        reference += _reference_taylor(params, x, y)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        cb.criterion.observe(cb.groups)
        optimizer.step()  # the weights move: each pass counts with the weights it saw
    assert torch.allclose(cb.criterion.sums["net.0.weight"], reference, rtol=1e-5, atol=1e-8)
    assert _lowest(reference, 8) != _lowest(model.net[0].weight.detach().abs().sum(1), 8)  # not L1's choice
    cb.apply(0.25)
    assert _pruned_rows(model.net[0]) == _lowest(reference, 8)
    # Read and reset: with no backward pass since, the next update ranks by L1 norm.
    assert cb.criterion.sums == {}
    group = cb.groups[0]
    keep = torch.ones(32, dtype=torch.bool)
    assert torch.equal(cb.criterion.scores(group, keep, torch.Generator()), model.net[0].weight.detach().abs().sum(1))


def test_taylor_in_a_trainer_ranks_by_the_gradients_before_the_update_and_checkpoints_them():
    """The callback calls observe after every backward: the update at epoch 1 prunes the rows with
    the smallest |w * grad| summed over epoch 0 (recorded here from the parameters themselves)."""

    class Spy(L.Callback):
        def __init__(self) -> None:
            self.total = torch.zeros(32)

        def on_after_backward(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                original = pl_module.net[0].parametrizations.weight.original
                self.total += (original * original.grad).abs().sum(dim=1).detach()

    torch.manual_seed(1)
    model = Tiny()
    l1_before = model.net[0].weight.detach().abs().sum(1)
    spy = Spy()
    cb = StructuredPruning(
        method="taylor",
        schedule={"kind": "linear", "start": 0.25, "end": 0.25, "begin_epoch": 1, "end_epoch": 1},
        exclude=["*net.2*"],
        couple=False,
        bake_at_end=False,
    )
    trainer = quiet_trainer([spy, cb], max_epochs=2, limit_train_batches=3)
    trainer.fit(model)
    assert _pruned_rows(model.net[0]) == _lowest(spy.total, 8)
    assert _lowest(spy.total, 8) != _lowest(l1_before, 8)
    # What epoch 1 accumulated after its update is in the checkpoint, and loads back.
    state = cb.state_dict()
    assert state["criterion"]["sums"]["net.0.weight"].shape == (32,)
    fresh = StructuredPruning(method="taylor", amount=0.25, exclude=["*net.2*"], couple=False)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.criterion.sums["net.0.weight"], state["criterion"]["sums"]["net.0.weight"])


# --- bn_scale ------------------------------------------------------------------------------------


def _digits_with_random_scales(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Tiny(DigitsCNN())
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, -1.0, 1.0)  # signs too: the score is |gamma|
    return model


def _digits_batches() -> torch.utils.data.DataLoader:
    data = torch.utils.data.TensorDataset(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    return torch.utils.data.DataLoader(data, batch_size=2)


def _bn_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    return [(model.net.features[i][0], model.net.features[i][1]) for i in (0, 1, 3)]


@pytest.mark.parametrize("allocation", ["layer", "global"])
def test_bn_scale_prunes_the_channels_with_the_smallest_gamma(allocation):
    model = _digits_with_random_scales()
    gammas = [bn.weight.detach().abs().clone() for _, bn in _bn_pairs(model)]
    cb = StructuredPruning(
        method="bn_scale", amount=0.5, allocation=allocation, example_input_shape=[2, 1, 8, 8], exclude=["*head*"]
    )
    cb.setup(None, model, "fit")
    cb.apply(0.5)
    pruned = [_pruned_rows(conv) for conv, _ in _bn_pairs(model)]
    if allocation == "layer":
        assert pruned == [_lowest(g, g.numel() // 2) for g in gammas]
    else:  # network slimming's setting: one threshold over every gamma
        every = torch.cat(gammas)
        threshold = every.sort().values[every.numel() // 2 - 1]
        assert pruned == [set((g <= threshold).nonzero().flatten().tolist()) for g in gammas]
        assert sum(map(len, pruned)) == every.numel() // 2


@pytest.mark.parametrize("kwargs", [{"couple": False}, {"dim": 1}])
def test_bn_scale_refuses_a_layer_without_a_norm_before_training(kwargs):
    model = Tiny(DigitsCNN())
    cb = StructuredPruning(
        method="bn_scale", amount=0.5, example_input_shape=[2, 1, 8, 8], exclude=["*head*"], **kwargs
    )
    with pytest.raises(
        ConfigError,
        match=r"pruning.method='bn_scale' .*norm layer after every pruned layer \(net\.features\.\d\.0\.weight has none",
    ):
        quiet_trainer([cb], max_epochs=1).fit(model, train_dataloaders=_digits_batches())
    assert all(not isinstance(m, torch.nn.utils.parametrize.ParametrizationList) for m in model.modules())


def test_regularize_adds_the_l1_subgradient_to_gamma():
    model = _digits_with_random_scales(1)
    cb = StructuredPruning(
        method="bn_scale", amount=0.5, regularize=0.01, example_input_shape=[2, 1, 8, 8], exclude=["*head*"]
    )
    cb.setup(None, model, "fit")
    cb.apply(0.25)  # under a mask too: pruned scales stay 0 and get no push
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    bns = [bn for _, bn in _bn_pairs(model)]
    originals = [bn.parametrizations.weight.original for bn in bns]
    before = [g.grad.clone() for g in originals]
    cb.criterion.observe(cb.groups)
    for gamma, old in zip(originals, before, strict=True):
        assert torch.allclose(gamma.grad, old + 0.01 * gamma.detach().sign(), rtol=0, atol=1e-7)
        assert (
            int((gamma.detach() == 0).sum()) > 0 and gamma.grad[gamma.detach() == 0].eq(old[gamma.detach() == 0]).all()
        )


def _slimming_run(regularize: float) -> torch.Tensor:
    torch.manual_seed(3)
    model = Tiny(conv1d_net(), optimizer=partial(torch.optim.SGD, lr=0.05))
    cb = StructuredPruning(
        method="bn_scale",
        schedule={"kind": "constant", "start": 0.5, "end": 0.5, "begin_epoch": 5, "end_epoch": 5},  # after training
        regularize=regularize,
        exclude=["*net.7*"],
    )
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 6, generator=g), torch.randint(0, 2, (32,), generator=g))
    quiet_trainer([cb], max_epochs=3).fit(model, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=4))
    return torch.cat([model.net[1].weight.detach().abs(), model.net[4].weight.detach().abs()])


def test_regularize_shrinks_the_norm_scales_during_training():
    """24 SGD steps at lr 0.05: the penalty's subgradient alone moves each |gamma| by up to
    24 * 0.05 * 0.1 = 0.12 towards 0."""
    free, slimmed = _slimming_run(0.0), _slimming_run(0.1)
    shrink = free - slimmed
    assert float(shrink.mean()) == pytest.approx(0.12, abs=0.01)
    assert float(shrink.min()) > 0.1  # every scale, not only on average


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1, "1e-4", True])
def test_regularize_must_be_a_finite_number_at_least_zero(value):
    with pytest.raises(ConfigError, match=r"pruning.regularize=.* a finite number >= 0"):
        StructuredPruning(method="bn_scale", amount=0.5, regularize=value)


def test_regularize_with_another_criterion_is_refused():
    with pytest.raises(ConfigError, match=r"pruning.regularize=0.001 .*method=l1 .*method=bn_scale"):
        StructuredPruning(method="l1", amount=0.5, regularize=1e-3)
    StructuredPruning(method="l1", amount=0.5, regularize=0.0)  # the default is fine with any method


# --- fpgm ----------------------------------------------------------------------------------------


def _group(weights: list[torch.Tensor], dim: int = 0) -> Group:
    holder = nn.Module()
    for i, w in enumerate(weights):
        holder.register_buffer(f"w{i}", w)
    return Group("g", [Target(f"w{i}", holder, f"w{i}") for i in range(len(weights))], weights[0].shape[dim], dim)


def _brute_force_fpgm(weights: list[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    rows = [torch.cat([w[i].flatten() for w in weights]).tolist() for i in range(weights[0].shape[0])]
    out = torch.zeros(len(rows), dtype=torch.float64)
    for i in range(len(rows)):
        if keep[i]:
            out[i] = sum(math.dist(rows[i], rows[j]) for j in range(len(rows)) if keep[j])
    return out


def test_fpgm_equals_a_brute_force_sum_of_distances():
    torch.manual_seed(0)
    weights = [torch.randn(7, 3, 2, 2), torch.randn(7, 5)]  # a coupled pair: slices concatenated
    keep = torch.tensor([True, True, False, True, True, True, True])
    got = FPGM().scores(_group(weights), keep, torch.Generator())
    expected = _brute_force_fpgm(weights, keep)
    assert torch.allclose(got[keep], expected[keep], rtol=1e-12)
    # The most replaceable go first: the 2 kept slices nearest the others, plus the pruned one.
    new = select_slices("fpgm", weights, 0, keep, 3)
    lowest = set(torch.argsort(expected.masked_fill(~keep, -1.0))[:3].tolist())
    assert set((~new).nonzero().flatten().tolist()) == lowest


def test_fpgm_on_a_conv_net_prunes_per_layer():
    model = Tiny(DigitsCNN())
    cb = StructuredPruning(method="fpgm", amount=0.25, example_input_shape=[2, 1, 8, 8], exclude=["*head*"])
    cb.setup(None, model, "fit")
    conv = model.net.features[1][0]
    expected = _brute_force_fpgm([conv.weight.detach()], torch.ones(64, dtype=torch.bool))
    cb.apply(0.25)
    assert _pruned_rows(conv) == _lowest(expected, 16)


# --- through train.py ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,key,expected",
    [
        (["pruning=taylor"], "pruning/channels", "32/64"),
        (["pruning=fpgm"], "pruning/channels", "32/64"),
        (["pruning=bn_scale", "pruning.regularize=1e-4"], "pruning/channels", "32/64"),
        (["sparsity=gmp", "sparsity.scope=erk"], "sparsity/selected", 0.8),
    ],
    ids=["taylor", "fpgm", "bn_scale", "erk"],
)
def test_each_new_option_from_the_command_line(tmp_path, overrides, key, expected):
    group = overrides[0].partition("=")[0]
    window = [f"{group}.schedule.begin_epoch=0", f"{group}.schedule.end_epoch=0"]
    summary = run_train_inprocess([*FAST, *overrides, *window], tmp_path)
    if isinstance(expected, str):
        assert summary[key]["net.features.1.0.weight"] == expected
    else:
        assert summary[key] == pytest.approx(expected, abs=1e-3)
        assert summary["sparsity/scope"] == "erk"
        layers = summary["sparsity/selected_layers"]
        assert min(layers.values()) < 0.8 < max(layers.values())  # not the same fraction everywhere
