"""Layer-wise sparsity budgets for unstructured sparsity: ERK and LAMP, each one class in
:data:`~plugins.core.allocation.ALLOCATIONS` (``sparsity.scope=erk``, ``sparsity.scope=lamp``;
``pruning.allocation=lamp``). Importing :mod:`plugins.sparsity` registers them.

Both only decide how many elements each group loses; the elements themselves are the lowest
scores of that group (:func:`~plugins.core.allocation.cut_lowest`), with the shared rounding and
tie rules, so every rank and every resume prunes the same entries.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from plugins.core.allocation import ALLOCATIONS, Allocation, Global, cut_lowest, prune_count
from plugins.core.errors import ConfigError

if TYPE_CHECKING:
    from plugins.core.decision import Group

__all__ = ["ERK", "LAMP", "erk_densities", "lamp_scores"]


def _erk_scale(shapes: dict[str, tuple[int, ...]], target: float, dense: set[str]) -> tuple[float, dict[str, float]]:
    """The factor ``eps`` that keeps ``(1 - target)`` of all entries with the ``dense`` layers whole,
    and the unscaled densities ``sum(shape) / prod(shape)`` of the others."""
    keep, divisor, raw = 0.0, 0.0, {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        if name in dense:
            keep -= n * target  # a dense layer keeps its n * target extra entries out of the others' share
        else:
            keep += n * (1.0 - target)
            raw[name] = sum(shape) / n
            divisor += raw[name] * n
    return (keep / divisor if divisor else 0.0), raw


def erk_densities(shapes: dict[str, tuple[int, ...]], target: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities (Evci et al. 2020, RigL, ``get_sparsities_erdos_renyi``): layer
    ``l`` keeps ``eps * sum(shape_l) / prod(shape_l)`` of its entries, with one ``eps`` such that
    ``(1 - target)`` of all entries are kept. A layer whose density would exceed 1 is dense (1),
    and ``eps`` is solved again for the others, until none exceeds 1."""
    shapes = {name: tuple(shape) for name, shape in shapes.items() if math.prod(shape) > 0}
    dense: set[str] = set()
    while True:
        eps, raw = _erk_scale(shapes, target, dense)
        if not raw:
            break
        highest = max(raw.values())
        if eps * highest <= 1.0:
            break
        dense.update(name for name, p in raw.items() if p == highest)
    return {name: 1.0 if name in dense else min(max(eps * raw[name], 0.0), 1.0) for name in shapes}


@ALLOCATIONS.register("erk")
class ERK(Allocation):
    """Erdős–Rényi-Kernel budgets (Evci et al. 2020, "Rigging the Lottery"): the density of a
    tensor is proportional to ``sum(shape) / prod(shape)`` (for a conv ``(c_out + c_in + k_h + k_w)
    / (c_out c_in k_h k_w)``): small layers stay denser, large ones go sparser, and the fraction
    over all selected tensors is the scheduled one (within one entry per tensor: each tensor loses
    ``round((1 - density) * n)``). Then the lowest ``|w|`` of each tensor go.

    Entries only (``sparsity.scope=erk``): the budget comes from each tensor's shape, which says
    nothing about slices, so :meth:`prepare` refuses pruning units. In count mode the amount is the
    total count over all tensors. Cost: a few passes over the list of shapes, and one exact k-th
    smallest per tensor.
    """

    #: The config key a refusal names (StructuredPruning sets ``{its key}.allocation``).
    key = "pruning.allocation"

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}

    def prepare(self, groups: list[Group]) -> None:
        for group in groups:
            if group.dim is not None:
                raise ConfigError(
                    self.key,
                    "erk",
                    f"layer, global or lamp: erk budgets the entries of whole tensors from their shapes "
                    f"(sparsity.scope=erk), not slices ({group.describe()})",
                )
        self.shapes = {g.name: tuple(g.members[0].raw.shape) for g in groups}

    def counts(self, sizes: dict[str, int], amount: float, count: bool = False) -> dict[str, int]:
        """How many entries each group loses for ``amount``."""
        missing = [name for name in sizes if name not in self.shapes]
        if missing:
            raise RuntimeError(f"ERK.prepare(groups) was not given {missing[0]}: it reads the shapes there")
        total = sum(sizes.values())
        target = amount / total if count and total else float(amount)
        densities = erk_densities({name: self.shapes[name] for name in sizes}, target)
        return {name: prune_count(1.0 - densities.get(name, 1.0), n) for name, n in sizes.items()}

    def cuts(self, scores, amount, count=False):
        counts = self.counts({name: s.numel() for name, s in scores.items()}, amount, count)
        return {name: cut_lowest([s], counts[name]) for name, s in scores.items()}

    def bounds(self, sizes, amount, count=False):
        return self.counts(sizes, amount, count)


@torch.no_grad()
def lamp_scores(scores: torch.Tensor) -> torch.Tensor:
    """LAMP scores (Lee et al. 2021) of one tensor's magnitudes ``scores`` (flat, float64):
    ``w_u^2 / sum of w_v^2 over the entries v with |w_v| >= |w_u|``. Entries with equal ``|w|``
    share the score (each one's sum holds all of them); ``-inf`` (already pruned) stays ``-inf``
    and counts in no sum; an all-zero remainder scores 0."""
    flat = scores.detach().reshape(-1).to(torch.float64)
    out = torch.full_like(flat, -math.inf)
    live = ~torch.isneginf(flat)
    values = flat[live]
    if values.numel() == 0:
        return out
    ordered, order = torch.sort(values, descending=True, stable=True)
    squares = ordered.square()
    _, run = torch.unique_consecutive(ordered, return_counts=True)
    # The sum over |w_v| >= |w_u| is the running sum up to the last entry equal to w_u.
    at_least = squares.cumsum(0)[run.cumsum(0) - 1].repeat_interleave(run)
    lamp = torch.where(at_least > 0, squares / at_least.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    values[order] = lamp
    out[live] = values
    return out


@ALLOCATIONS.register("lamp")
class LAMP(Allocation):
    """Layer-adaptive magnitude-based pruning (Lee et al. 2021, "Layer-adaptive Sparsity for the
    Magnitude-based Pruning"): each score becomes its LAMP score (:func:`lamp_scores`), which
    normalizes every tensor so that its largest entry scores 1, and ONE cut over all groups'
    LAMP scores (the :class:`~plugins.core.allocation.Global` cut) sets how many each group loses:
    exactly ``round(f * n)`` over all of them. Within a group LAMP orders like the score itself,
    so the lowest scores of each group go (cut on the scores, ties in index order).

    Works on entries (``sparsity.scope=lamp``) and on slices (``pruning.allocation=lamp``, the
    criterion's scores in place of ``|w|``). Cost: a sort and float64 temporaries (scores, order)
    per group at each update, plus the global cut.
    """

    @torch.no_grad()
    def cuts(self, scores, amount, count=False):
        shares = Global().cuts({name: lamp_scores(s) for name, s in scores.items()}, amount, count)
        # The share's threshold is a LAMP score: cut each group on its own scores instead.
        return {name: cut_lowest([s], shares[name].count) for name, s in scores.items()}
