"""Allocations: how a scheduled amount splits across groups (tensors, or pruning units), as one
:class:`Cut` per group. Each is one class in the :data:`ALLOCATIONS` registry (``sparsity.scope``
and ``pruning.allocation`` name it); a new one (ERK, LAMP, ...) is a new class.

One rounding rule everywhere, torch.nn.utils.prune's: a fraction ``f`` of ``n`` elements is
``round(f * n)`` (round half to even), a whole number is a count. One tie rule: a cut prunes
exactly ``count`` elements, all scores below its threshold and then the ties at it in index order
(flat index, groups in selection order), so every DDP rank, every resume and every allocation
reach exactly k.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from plugins.core.kth import kth_smallest
from plugins.core.registry import Registry

if TYPE_CHECKING:
    from plugins.core.decision import Group

__all__ = [
    "ALLOCATIONS",
    "Allocation",
    "Cut",
    "FixedThreshold",
    "Global",
    "PerLayer",
    "cut_lowest",
    "keep_after_cut",
    "prune_count",
]


def prune_count(amount: float, n: int, count: bool = False) -> int:
    """How many of ``n`` elements an amount prunes: ``round(amount * n)``, or ``amount`` itself in
    count mode (``torch.nn.utils.prune._compute_nparams_toprune``'s rule)."""
    return int(amount) if count else round(amount * n)


@dataclass(frozen=True)
class Cut:
    """Prune exactly ``count`` elements of a group: every score below ``threshold``, then ties at
    ``threshold`` in index order. ``threshold`` is ``-inf`` when nothing new is pruned."""

    count: int
    threshold: float


def cut_lowest(scores: list[torch.Tensor], k: int) -> Cut:
    """The cut of the ``k`` lowest scores over ``scores`` together (one exact k-th smallest)."""
    return Cut(k, kth_smallest(scores, k)) if k > 0 else Cut(0, -math.inf)


@torch.no_grad()
def keep_after_cut(scores: torch.Tensor, cut: Cut) -> torch.Tensor:
    """Bool, the shape of ``scores``: False for the ``cut.count`` elements the cut prunes."""
    flat = scores.reshape(-1)
    below = flat < cut.threshold
    ties = flat == cut.threshold
    need = cut.count - int(below.sum())
    if need < int(ties.sum()):
        ties &= ties.cumsum(0) <= need
    return ~(below | ties).reshape(scores.shape)


class Allocation(ABC):
    """``cuts(scores, amount, count)``: group name -> the :class:`Cut` of that group's share of
    ``amount``. ``scores`` are flat, one per element (entry or slice), ``-inf`` where already
    pruned. Pure; cost: one exact k-th smallest per cut (two radix passes over float32)."""

    @abstractmethod
    def cuts(self, scores: dict[str, torch.Tensor], amount: float, count: bool = False) -> dict[str, Cut]:
        """One cut per group name."""

    def prepare(self, groups: list[Group]) -> None:  # noqa: B027 - optional
        """Called once in ``setup`` with the groups (their members' shapes, for budgets such as ERK)."""

    def bounds(self, sizes: dict[str, int], amount: float, count: bool = False) -> dict[str, int]:
        """What ``amount`` prunes of each group, where that is known without scores (for the
        checks before training); groups left out have no such bound."""
        return {}


ALLOCATIONS: Registry[type[Allocation]] = Registry("allocation", Allocation)


@ALLOCATIONS.register("layer")
class PerLayer(Allocation):
    """The same fraction (or count) in every group."""

    def cuts(self, scores, amount, count=False):
        return {name: cut_lowest([s], prune_count(amount, s.numel(), count)) for name, s in scores.items()}

    def bounds(self, sizes, amount, count=False):
        return {name: prune_count(amount, n, count) for name, n in sizes.items()}


@ALLOCATIONS.register("global")
class Global(Allocation):
    """One cut over all groups together: the fraction holds over their union, and each group gets
    the scores below the common threshold (ties shared out in selection order)."""

    @torch.no_grad()
    def cuts(self, scores, amount, count=False):
        total = sum(s.numel() for s in scores.values())
        k = prune_count(amount, total, count)
        if k <= 0:
            return dict.fromkeys(scores, Cut(0, -math.inf))
        threshold = kth_smallest(list(scores.values()), min(k, total))
        below = {name: int((s < threshold).sum()) for name, s in scores.items()}
        ties_left = k - sum(below.values())
        out = {}
        for name, s in scores.items():
            take = min(int((s == threshold).sum()), ties_left)
            ties_left -= take
            out[name] = Cut(below[name] + take, threshold)
        return out


class FixedThreshold(Allocation):
    """``amount`` is the threshold itself (hardshrink's lambda): every score at or below it goes."""

    @torch.no_grad()
    def cuts(self, scores, amount, count=False):
        return {name: Cut(int((s <= amount).sum()), float(amount)) for name, s in scores.items()}
