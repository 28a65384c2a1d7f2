"""The pure decision of every masking callback: Criterion scores -> Allocation cuts -> keep.

A :class:`Group` is what is decided together: the entries of one tensor (hardshrink), or the
slices along ``dim`` shared by a unit of tensors (structured pruning). :func:`decide` scores each
group with the criterion, lets the allocation cut the scheduled amount into one :class:`Cut` per
group, and keeps the rest. Already pruned elements score ``-inf``, so they stay pruned: pruning
only grows. A method that regrows (RigL, SET) then calls :func:`regrow`, which turns back on, in
each group, the inactive elements a second criterion scores highest.

With a criterion that scores entries by magnitude (:meth:`~plugins.core.criteria.Criterion.magnitudes`,
e.g. L1 on a hardshrink update) and an allocation that can cut streamed scores
(:func:`~plugins.core.allocation.streams`: ``layer``, ``global``, the fixed threshold), no score
tensor is made: the cuts come from exact k-th smallest values and counts read from the weights in
chunks (:mod:`plugins.core.kth`), then each group's keep vector is written in one more pass. An
update then holds the keep vectors (one bool per element) and one chunk, never a second copy of
the selected weights; any other pair holds every group's scores, as it must.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from plugins.core.allocation import Allocation, Cut, cut_lowest, keep_after_cut, streams
from plugins.core.criteria import CRITERIA, Criterion
from plugins.core.kth import count_abs, drop_abs, select_abs
from plugins.core.selection import Target

__all__ = ["Group", "decide", "mean_over_ranks", "regrow", "select_slices", "seeded_generator"]


@dataclass
class Group:
    """Elements decided together: the ``size`` entries of one tensor (``dim=None``), or the
    ``size`` slices along ``dim`` that ``members`` share, with the coupled ``extras`` (biases, norm
    scale and shift) that follow their keep vector. ``min_keep`` elements always stay."""

    name: str
    members: list[Target]
    size: int
    dim: int | None = None
    extras: list[tuple[str, nn.Module, str]] = field(default_factory=list)
    min_keep: int = 0

    def weights(self) -> list[torch.Tensor]:
        """The members as the module computes with them (constraints and masks applied), detached."""
        return [m.tensor.detach() for m in self.members]

    def describe(self) -> str:
        """How an error names the group's elements."""
        if self.dim is None:
            return f"the {self.size} entries of {self.name}"
        return f"the {self.size} slices of {self.name} along dim {self.dim}"


def seeded_generator(seed: int, update: int, index: int) -> torch.Generator:
    """The generator for group ``index`` at update ``update``: every rank and every resume draws alike."""
    return torch.Generator().manual_seed((seed * 1_000_003 + update * 10_007 + index) % (2**63 - 1))


@torch.no_grad()
def _scores(criterion: Criterion, group: Group, keep: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    scores = criterion.scores(group, keep, generator).reshape(-1)
    return scores.masked_fill(~keep.reshape(-1).to(scores.device), -math.inf)


def _bounded(cut: Cut, group: Group, pruned: int, lowest: Callable[[int], Cut]) -> Cut:
    """``cut`` within what the group allows: at most its size less ``min_keep`` (then the cut of
    its ``lowest`` scores), at least the elements already pruned."""
    if cut.count > group.size - group.min_keep:
        cut = lowest(group.size - group.min_keep)
    if cut.count < pruned:
        cut = Cut(pruned, -math.inf)
    return cut


@torch.no_grad()
def decide(
    groups: list[Group],
    criterion: Criterion,
    allocation: Allocation,
    amount: float,
    current: Callable[[Group], torch.Tensor],
    count: bool = False,
    seed: int = 0,
    update: int = 0,
) -> tuple[dict[str, Cut], dict[str, torch.Tensor]]:
    """Cuts and keep vectors (bool, one per element, flat) per group name for ``amount``.

    ``current(group)`` is the group's keep vector now. A cut never prunes fewer than the elements
    already pruned, nor leaves fewer than ``min_keep``. Memory: with a magnitude criterion and a
    streaming allocation, the keep vectors and one chunk (see the module's docstring); otherwise
    every group's scores at once.
    """
    if groups and streams(allocation) and all(criterion.magnitudes(g) is not None for g in groups):
        return _decide_streamed(groups, criterion, allocation, amount, current, count)
    scores, pruned = {}, {}
    for index, group in enumerate(groups):
        keep = current(group)
        scores[group.name] = _scores(criterion, group, keep, seeded_generator(seed, update, index))
        pruned[group.name] = int((~keep).sum())
    cuts = allocation.cuts(scores, amount, count)
    for group in groups:
        cuts[group.name] = _bounded(
            cuts[group.name], group, pruned[group.name], lambda k, name=group.name: cut_lowest([scores[name]], k)
        )
    keeps = {g.name: keep_after_cut(scores[g.name], cuts[g.name]) for g in groups}
    return cuts, keeps


class _Magnitudes:
    """The scores ``|w|`` of the groups (``-inf`` where pruned), asked for rather than held: each
    question reads the weights in chunks (:class:`~plugins.core.allocation.StreamedScores`). The
    keep vectors are the groups' current ones, which :func:`_decide_streamed` then prunes further."""

    def __init__(self, groups: list[Group], criterion: Criterion, keeps: dict[str, torch.Tensor]) -> None:
        self.groups = {g.name: g for g in groups}
        self.criterion = criterion
        self.keeps = keeps
        self.sizes = {name: keep.numel() for name, keep in keeps.items()}
        self.pruned = {name: keep.numel() - int(torch.count_nonzero(keep)) for name, keep in keeps.items()}
        self._counts: dict[tuple[str, float], tuple[int, int]] = {}

    def weight(self, name: str) -> torch.Tensor:
        return self.criterion.magnitudes(self.groups[name])

    def kth(self, names: list[str], k: int) -> float:
        total = sum(self.sizes[n] for n in names)
        if not 1 <= k <= total:
            raise ValueError(f"k={k} must be in [1, {total}]")
        pruned = sum(self.pruned[n] for n in names)
        if k <= pruned:
            return -math.inf
        rank = select_abs([self.weight(n) for n in names], k - pruned, [self.keeps[n] for n in names])
        if len(names) == 1:  # the counts at this value come with it
            self._counts[(names[0], rank.value)] = (pruned + rank.below, rank.at)
        return rank.value

    def counts(self, name: str, threshold: float) -> tuple[int, int]:
        if threshold == -math.inf:
            return 0, self.pruned[name]
        if threshold < 0:  # no magnitude lies below it: only the pruned entries
            return self.pruned[name], 0
        if (name, threshold) not in self._counts:
            below, at = count_abs(self.weight(name), threshold, self.keeps[name])
            self._counts[(name, threshold)] = (self.pruned[name] + below, at)
        return self._counts[(name, threshold)]


def _decide_streamed(
    groups: list[Group],
    criterion: Criterion,
    allocation: Allocation,
    amount: float,
    current: Callable[[Group], torch.Tensor],
    count: bool,
) -> tuple[dict[str, Cut], dict[str, torch.Tensor]]:
    """:func:`decide` for magnitude scores: the same cuts and keep vectors, from chunked reads."""
    keeps = {}
    for group in groups:  # a copy of the current keep vector, which becomes the new one in place
        now = current(group)
        keeps[group.name] = torch.empty(now.numel(), dtype=torch.bool, device=criterion.magnitudes(group).device)
        keeps[group.name].view(now.shape).copy_(now)
    scores = _Magnitudes(groups, criterion, keeps)
    cuts = allocation.streamed_cuts(scores, amount, count)
    for group in groups:
        name = group.name

        def lowest(k: int, name: str = name) -> Cut:
            return Cut(k, scores.kth([name], k)) if k > 0 else Cut(0, -math.inf)

        cut = cuts[name] = _bounded(cuts[name], group, scores.pruned[name], lowest)
        if cut.threshold >= 0:  # below 0 (-inf): nothing beyond the pruned entries
            below = scores.counts(name, cut.threshold)[0]
            drop_abs(scores.weight(name), keeps[name], cut.threshold, cut.count - below)
    return cuts, keeps


@torch.no_grad()
def regrow(
    groups: list[Group],
    criterion: Criterion,
    before: dict[str, torch.Tensor],
    after: dict[str, torch.Tensor],
    bounds: dict[str, int],
    seed: int = 0,
    update: int = 0,
) -> dict[str, torch.Tensor]:
    """The keep vectors of an update that moves elements: ``after`` (flat, from :func:`decide`)
    with some of its inactive elements turned back on, per group.

    A group grows back as many elements as ``after`` newly dropped (against ``before``), but never
    more than it holds pruned beyond ``bounds[name]``, the number its allocation leaves pruned (a
    group without a bound grows nothing): the first update, which prunes down to the bound, grows
    nothing, a later one as many as it dropped. Which ones: the highest ``criterion`` scores among
    the inactive elements, those just dropped included (RigL's algorithm), scored with the inactive
    elements as the ``keep`` argument (the ones in play) and a generator seeded apart from
    :func:`decide`'s; exactly that many, ties at the cut in index order (the later indices grow).
    """
    out = {}
    for index, group in enumerate(groups):
        keep = after[group.name].reshape(-1)
        dropped = int((before[group.name].reshape(-1).to(keep.device) & ~keep).sum())
        pruned = int((~keep).sum())
        k = min(dropped, pruned - bounds.get(group.name, pruned))
        if k <= 0:
            out[group.name] = keep
            continue
        generator = seeded_generator(seed, update, len(groups) + index)
        scores = criterion.scores(group, ~keep, generator).reshape(-1).float().to(keep.device)
        scores = torch.where(torch.isfinite(scores), scores, 0.0).masked_fill(keep, -math.inf)
        # The k highest of the inactive: the cut of all the others.
        chosen = keep_after_cut(scores, cut_lowest([scores], keep.numel() - k))
        out[group.name] = keep | chosen
    return out


def mean_over_ranks(total: torch.Tensor) -> torch.Tensor:
    """The mean over DDP ranks of a tensor each rank computed from its own batches (a gradient
    captured outside DDP's reduction), so that every rank decides alike; the tensor itself without
    a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = total.clone()
        dist.all_reduce(total)
        total /= dist.get_world_size()
    return total


def select_slices(
    criterion: Criterion | str,
    weights: list[torch.Tensor],
    dim: int,
    keep: torch.Tensor,
    prune: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One group's new keep vector (bool, one per slice along ``dim``) with ``prune`` slices
    pruned: the lowest-scored of ``criterion``. Already pruned slices stay pruned; nothing changes
    when ``prune`` is not above their number."""
    if isinstance(criterion, str):
        criterion = CRITERIA.get(criterion, "pruning.method")()
    holder = nn.Module()
    for i, w in enumerate(weights):
        holder.register_buffer(f"w{i}", w.detach())
    members = [Target(f"w{i}", holder, f"w{i}") for i in range(len(weights))]
    group = Group("slices", members, keep.numel(), dim)
    scores = criterion.scores(group, keep, generator or torch.Generator()).reshape(-1).float()
    scores = scores.masked_fill(~keep, -math.inf)
    return keep_after_cut(scores, cut_lowest([scores], max(prune, int((~keep).sum()))))
