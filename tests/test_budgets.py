"""ERK and LAMP budgets for unstructured sparsity, each against a reference computed here
independently: the densities of the formula, the overall fraction, LAMP's per-layer normalization
and its one global cut."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.backbones import DigitsCNN
from plugins.core.errors import ConfigError
from plugins.pruning.structured import StructuredPruning
from plugins.sparsity.budgets import erk_densities, lamp_scores
from plugins.sparsity.hardshrink import HardshrinkSparsifier
from tests.helpers import Tiny


def _sparsifier(model: nn.Module, scope: str, target: float) -> HardshrinkSparsifier:
    cb = HardshrinkSparsifier(
        schedule={"kind": "constant", "start": target, "end": target}, mode="sparsity", scope=scope
    )
    cb.setup(None, model, "fit")
    return cb


def _zeros(cb: HardshrinkSparsifier) -> dict[str, int]:
    return {t.name: int((t.tensor == 0).sum()) for t in cb.targets}


# --- ERK -----------------------------------------------------------------------------------------


def _reference_erk(shapes: dict[str, tuple[int, ...]], target: float) -> dict[str, float]:
    """The densities min(1, eps * sum(shape) / prod(shape)), with eps found by bisection so that
    (1 - target) of all entries are kept (the kept count grows with eps)."""
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    total = sum(math.prod(s) for s in shapes.values())

    def kept(eps: float) -> float:
        return sum(min(1.0, eps * raw[n]) * math.prod(s) for n, s in shapes.items())

    low, high = 0.0, 1.0 / min(raw.values())
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if kept(mid) < (1 - target) * total else (low, mid)
    return {n: min(1.0, high * raw[n]) for n in shapes}


def test_erk_densities_equal_the_formula_with_dense_capping():
    shapes = {
        "conv1": (32, 1, 3, 3),
        "conv2": (64, 32, 3, 3),
        "conv3": (128, 64, 3, 3),
        "fc": (10, 512),
        "tiny": (4, 2),
    }
    for target in (0.5, 0.8, 0.95):
        got = erk_densities(shapes, target)
        expected = _reference_erk(shapes, target)
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
        # Proportional to sum/prod wherever not capped: one eps for all of them.
        free = [n for n in shapes if got[n] < 1]
        eps = {got[n] * math.prod(shapes[n]) / sum(shapes[n]) for n in free}
        assert max(eps) == pytest.approx(min(eps), rel=1e-12)
    assert erk_densities(shapes, 0.8)["tiny"] == 1.0  # the small layer stays dense
    assert erk_densities(shapes, 0.5)["conv1"] == 1.0 and erk_densities(shapes, 0.95)["conv1"] < 1.0


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
def test_erk_on_a_conv_net_reaches_the_target_within_one_weight_per_tensor(target):
    torch.manual_seed(0)
    model = Tiny(DigitsCNN())
    cb = _sparsifier(model, "erk", target)
    shapes = {t.name: tuple(t.raw.shape) for t in cb.targets}
    before = {t.name: t.raw.detach().clone() for t in cb.targets}
    cb.apply(target)
    zeros = _zeros(cb)
    expected = _reference_erk(shapes, target)
    for t in cb.targets:
        n = t.raw.numel()
        assert abs(zeros[t.name] - (1 - expected[t.name]) * n) <= 0.5 + 1e-6  # one rounding per tensor
        # The zeros of each tensor are its smallest |w| before the update.
        assert torch.equal(t.tensor.detach().flatten() == 0, _smallest(before[t.name], zeros[t.name]))
    total = sum(math.prod(s) for s in shapes.values())
    assert abs(sum(zeros.values()) - target * total) <= len(shapes)
    densities = {n: 1 - zeros[n] / math.prod(s) for n, s in shapes.items()}
    assert len({round(d, 2) for d in densities.values()}) > 1  # not the same fraction everywhere
    if target == 0.8:
        assert densities["net.features.0.0.weight"] == 1.0  # capped: 288 weights, dense


def _smallest(w: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros(w.numel(), dtype=torch.bool)
    out[torch.argsort(w.abs().flatten(), stable=True)[:k]] = True
    return out


def test_erk_refuses_slices_before_training():
    model = Tiny(DigitsCNN())
    cb = StructuredPruning(
        method="l1", amount=0.5, allocation="erk", example_input_shape=[2, 1, 8, 8], exclude=["*head*"]
    )
    with pytest.raises(ConfigError, match=r"pruning.allocation='erk' .*not slices"):
        cb.setup(None, model, "fit")


# --- LAMP ----------------------------------------------------------------------------------------


def _reference_lamp(w: torch.Tensor) -> torch.Tensor:
    """The paper's code (jaeho-lee/layer-adaptive-sparsity, _compute_lamp_amounts): sort w^2
    ascending, divide each by the sum of itself and everything after it."""
    squares = w.detach().double().flatten().square()
    ordered, order = squares.sort()
    after = ordered.sum() - torch.cat([torch.zeros(1, dtype=torch.float64), ordered.cumsum(0)[:-1]])
    out = torch.empty_like(squares)
    out[order] = ordered / after
    return out


def _reference_lamp_mask(weights: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
    scores = {n: _reference_lamp(w) for n, w in weights.items()}
    every = torch.cat(list(scores.values()))
    k = round(target * every.numel())
    threshold = every.sort().values[k - 1]
    return {n: s <= threshold for n, s in scores.items()}


@pytest.mark.parametrize("target", [0.3, 0.7, 0.9])
def test_lamp_matches_the_papers_reference_and_prunes_exactly_round_f_n(target):
    torch.manual_seed(1)
    model = Tiny(DigitsCNN())
    cb = _sparsifier(model, "lamp", target)
    weights = {t.name: t.raw.detach().clone() for t in cb.targets}
    cb.apply(target)
    expected = _reference_lamp_mask(weights, target)
    for t in cb.targets:
        assert torch.equal((t.tensor == 0).flatten(), expected[t.name]), t.name
    total = sum(w.numel() for w in weights.values())
    assert sum(_zeros(cb).values()) == round(target * total)
    fractions = [float(m.float().mean()) for m in expected.values()]
    assert max(fractions) - min(fractions) > 0.05  # layer-adaptive, not one fraction


def test_lamp_scores_share_ties_and_keep_pruned_entries_lowest():
    s = torch.tensor([0.5, -math.inf, 0.2, 0.5, 1.0, 0.0])
    got = lamp_scores(s)
    # Sorted down: 1, .5, .5, .2, 0; the sums over |w_v| >= |w_u| are 1, 1.5, 1.5, 1.54, 1.54.
    expected = torch.tensor([0.25 / 1.5, -math.inf, 0.04 / 1.54, 0.25 / 1.5, 1.0, 0.0], dtype=torch.float64)
    assert torch.allclose(got, expected, rtol=1e-12)
    assert torch.equal(lamp_scores(torch.full((3,), -math.inf)), torch.full((3,), -math.inf, dtype=torch.float64))


def test_lamp_with_ties_and_earlier_zeros_still_prunes_exactly_k():
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(60.0).reshape(10, 6) % 5 + 1)  # 12 copies of each of 1..5
        model[2].weight.copy_(torch.arange(40.0).reshape(4, 10) % 4 + 1)  # 10 copies of each of 1..4
    cb = _sparsifier(model, "lamp", 0.3)
    cb.apply(0.3)
    assert sum(_zeros(cb).values()) == 30
    first = cb.targets[0].tensor.detach()
    cb.apply(0.55)  # the earlier zeros (-inf) stay pruned, then the lowest LAMP scores join them
    assert sum(_zeros(cb).values()) == 55
    assert (cb.targets[0].tensor[first == 0] == 0).all()


def test_lamp_as_a_pruning_allocation_prunes_round_f_n_slices_overall():
    torch.manual_seed(2)
    model = Tiny(DigitsCNN())
    cb = StructuredPruning(
        method="l2", amount=0.5, allocation="lamp", example_input_shape=[2, 1, 8, 8], exclude=["*head*"]
    )
    cb.setup(None, model, "fit")
    cb.apply(0.5)
    kept = [int(k) for k, _ in (v.split("/") for v in cb.channels().values())]
    assert sum(kept) == 224 - round(0.5 * 224)
