"""Allocations: how a scheduled amount splits across groups (tensors, or pruning units), as one
:class:`Cut` per group. Each is one class in the :data:`ALLOCATIONS` registry (``sparsity.scope``
and ``pruning.allocation`` name it); a new one (ERK, LAMP, ...) is a new class.

One rounding rule everywhere, torch.nn.utils.prune's: a fraction ``f`` of ``n`` elements is
``round(f * n)`` (round half to even), a whole number is a count. One tie rule: a cut prunes
exactly ``count`` elements, all scores below its threshold and then the ties at it in index order
(flat index, groups in selection order), so every DDP rank, every resume and every allocation
reach exactly k.

An allocation may also cut scores it never holds: :meth:`Allocation.streamed_cuts` asks a
:class:`StreamedScores` for k-th smallest values and counts at a threshold, which
:func:`~plugins.core.decision.decide` answers by reading the weights in chunks (the magnitude
criterion), so that an update never holds a second copy of the selected weights.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

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
    "StreamedScores",
    "cut_lowest",
    "keep_after_cut",
    "prune_count",
    "streams",
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


class StreamedScores(Protocol):
    """The scores of the groups, asked for rather than held: what :meth:`Allocation.streamed_cuts`
    sees. Each answer reads the groups' weights once or twice, in chunks."""

    sizes: dict[str, int]  # group name -> number of elements, in selection order

    def kth(self, names: list[str], k: int) -> float:
        """The exact ``k``-th smallest score over the named groups together (``-inf`` when ``k``
        does not exceed their pruned elements), as :func:`cut_lowest` finds it."""

    def counts(self, name: str, threshold: float) -> tuple[int, int]:
        """How many scores of group ``name`` lie below ``threshold`` (the pruned ones, ``-inf``,
        included) and how many equal it."""


def _share_ties(k: int, threshold: float, counts: dict[str, tuple[int, int]]) -> dict[str, Cut]:
    """The cuts of ``k`` elements at one ``threshold`` from each group's (below, at) counts: every
    score below it, then the ties at it shared out in selection order."""
    ties_left = k - sum(below for below, _ in counts.values())
    out = {}
    for name, (below, at) in counts.items():
        take = min(at, ties_left)
        ties_left -= take
        out[name] = Cut(below + take, threshold)
    return out


class Allocation(ABC):
    """``cuts(scores, amount, count)``: group name -> the :class:`Cut` of that group's share of
    ``amount``. ``scores`` are flat, one per element (entry or slice), ``-inf`` where already
    pruned. Pure; cost: one exact k-th smallest per cut (two radix passes over float32)."""

    @abstractmethod
    def cuts(self, scores: dict[str, torch.Tensor], amount: float, count: bool = False) -> dict[str, Cut]:
        """One cut per group name."""

    def streamed_cuts(self, scores: StreamedScores, amount: float, count: bool = False) -> dict[str, Cut]:
        """The cuts :meth:`cuts` would return, from scores asked for rather than held; called only
        where :func:`streams` says the class defines both."""
        raise NotImplementedError(f"{type(self).__name__} needs every score at once")

    def prepare(self, groups: list[Group]) -> None:  # noqa: B027 - optional
        """Called once in ``setup`` with the groups (their members' shapes, for budgets such as ERK)."""

    def bounds(self, sizes: dict[str, int], amount: float, count: bool = False) -> dict[str, int]:
        """What ``amount`` prunes of each group, where that is known without scores (for the
        checks before training); groups left out have no such bound."""
        return {}


ALLOCATIONS: Registry[type[Allocation]] = Registry("allocation", Allocation)


def streams(allocation: Allocation) -> bool:
    """Whether ``allocation.streamed_cuts`` stands for its ``cuts``: one class defines both (a
    subclass that changes ``cuts`` alone is given every score, as before)."""

    def owner(attribute: str) -> type:
        return next(klass for klass in type(allocation).__mro__ if attribute in vars(klass))

    return owner("cuts") is owner("streamed_cuts") is not Allocation


@ALLOCATIONS.register("layer")
class PerLayer(Allocation):
    """The same fraction (or count) in every group."""

    def cuts(self, scores, amount, count=False):
        return {name: cut_lowest([s], prune_count(amount, s.numel(), count)) for name, s in scores.items()}

    def streamed_cuts(self, scores, amount, count=False):
        out = {}
        for name, size in scores.sizes.items():
            k = prune_count(amount, size, count)
            out[name] = Cut(k, scores.kth([name], k)) if k > 0 else Cut(0, -math.inf)
        return out

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
        counts = {
            name: (int(torch.count_nonzero(s < threshold)), int(torch.count_nonzero(s == threshold)))
            for name, s in scores.items()
        }
        return _share_ties(k, threshold, counts)

    def streamed_cuts(self, scores, amount, count=False):
        total = sum(scores.sizes.values())
        k = prune_count(amount, total, count)
        if k <= 0:
            return dict.fromkeys(scores.sizes, Cut(0, -math.inf))
        threshold = scores.kth(list(scores.sizes), min(k, total))
        return _share_ties(k, threshold, {name: scores.counts(name, threshold) for name in scores.sizes})


class FixedThreshold(Allocation):
    """``amount`` is the threshold itself (hardshrink's lambda): every score at or below it goes."""

    @torch.no_grad()
    def cuts(self, scores, amount, count=False):
        return {name: Cut(int((s <= amount).sum()), float(amount)) for name, s in scores.items()}

    def streamed_cuts(self, scores, amount, count=False):
        return {name: Cut(sum(scores.counts(name, float(amount))), float(amount)) for name in scores.sizes}
