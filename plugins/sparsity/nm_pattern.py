"""N:M semi-structured sparsity (``sparsity.pattern=2:4``) as two parts of the masking callback:
a criterion that scores each M-group by the cost of patterning it, and a mask mechanism whose
elements are the M-groups.

A group is M consecutive entries along the input dimension of a weight (:func:`input_dim`: dim 1,
or dim 0 for Hugging Face's ``Conv1D`` and transposed convolutions, which store ``(in, out, ...)``):
along ``in_features`` of a Linear (or GPT-2's ``Conv1D``) for each output, along the input channels
of a conv for each ``(out, kh, kw)`` position. This is the layout NVIDIA's sparse tensor cores
accelerate (2:4 along the reduction dimension of the GEMM; for convolutions the reduction runs
over ``C_in`` at each filter tap, the layout of ``apex.contrib.sparsity``), so a model trained with
``pattern=2:4`` exports to ``torch.sparse.to_sparse_semi_structured`` without a permutation.

With a pattern the schedule's value ``f`` is the fraction of M-groups under the pattern. The
allocation (``sparsity.scope``) cuts ``round(f * groups)`` of the cheapest groups, per tensor or
over all of them, by the :class:`NMCost` of each group; :class:`NMMasks` then keeps the N largest
``|w|`` of every group the cut took. A group under the pattern stays under it: the keep vector of
a group is "not yet patterned", already patterned groups score ``-inf``, and masks only drop.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from plugins.core.criteria import Criterion
from plugins.core.decision import Group
from plugins.core.errors import ConfigError
from plugins.core.mask_mechanism import EntryMasks
from plugins.core.selection import Target
from plugins.core.weight_layout import input_dim

__all__ = ["NMPattern", "parse_pattern", "to_groups", "from_groups", "NMCost", "NMMasks", "nm_fraction"]

_ALLOWED = "N:M with 0 < N < M, e.g. 2:4"
_FORM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive weights along the input dimension."""

    n: int
    m: int

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(value: Any, key: str = "sparsity.pattern") -> NMPattern | None:
    """``"2:4"`` -> ``NMPattern(2, 4)``; ``None`` -> ``None``; anything else a ConfigError at ``key``."""
    if value is None:
        return None
    if not isinstance(value, str):
        # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124.
        hint = ' (quote it in YAML: pattern: "2:4"; unquoted, YAML reads 2:4 as the number 124)'
        raise ConfigError(key, value, _ALLOWED + (hint if isinstance(value, int) else ""))
    match = _FORM.match(value)
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ConfigError(key, value, _ALLOWED)
    return NMPattern(int(match[1]), int(match[2]))


def to_groups(tensor: torch.Tensor, m: int, dim: int = 1) -> torch.Tensor:
    """``tensor`` (dim >= 2, ``shape[dim] % m == 0``) as ``(groups, m)``: row ``g`` holds M
    consecutive entries along ``dim``; groups ordered by (the other dims in order, ``dim`` / m)."""
    return tensor.movedim(dim, -1).reshape(-1, m)


def from_groups(groups: torch.Tensor, shape: torch.Size | tuple[int, ...], dim: int = 1) -> torch.Tensor:
    """The inverse of :func:`to_groups` for a tensor of ``shape``."""
    moved = (*shape[:dim], *shape[dim + 1 :], shape[dim])
    return groups.reshape(moved).movedim(-1, dim)


class NMCost(Criterion):
    """Scores each M-group of a tensor by what patterning it costs: the sum of its ``M - N``
    smallest ``|w|`` (the magnitude the pattern would remove); the cheapest groups go first.

    Cost per update: one sort of M entries per group, in float32.
    """

    def __init__(self, pattern: NMPattern) -> None:
        self.pattern = pattern

    def scores(self, group: Group, keep: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, m = self.pattern.n, self.pattern.m
        magnitudes = to_groups(group.weights()[0].abs().float(), m, input_dim(group.members[0].module))
        return magnitudes.sort(dim=1).values[:, : m - n].sum(dim=1)


class NMMasks(EntryMasks):
    """Entry masks decided per M-group: a group's element is one M-group of its tensor (keep =
    "not under the pattern yet"); :meth:`apply` turns each newly patterned group into the mask that
    keeps its N largest ``|w|`` (ties: the earlier entries go, as in every cut of this project).

    A group counts as patterned when its mask holds at least ``M - N`` zeros, so zeros that another
    callback put there (structured pruning on the same tensor) count too. In ``setup`` a selected
    tensor whose input dimension is not a multiple of M is refused (ConfigError naming it): a
    partial pattern would not run on N:M kernels, and a silent skip would leave the tensor dense
    while the run reports N:M.

    Cost: that of :class:`EntryMasks` (one elementwise product per selected tensor in forward and
    backward), plus one sort of M entries per group at each update (after the cost's sort).
    """

    def __init__(self, pattern: NMPattern, persistent: bool = True) -> None:
        super().__init__(persistent=persistent)
        self.pattern = pattern

    def groups(self, trainer, pl_module, targets, key):
        for target in targets:
            refuse_unpatternable(target, self.pattern, key)
        return [Group(t.name, [t], t.raw.numel() // self.pattern.m) for t in targets]

    def current(self, group):
        n, m = self.pattern.n, self.pattern.m
        kept = to_groups(super().current(group), m, input_dim(group.members[0].module))
        return (~kept).sum(dim=1) < m - n

    def apply(self, groups, keeps, optimizers=(), **options):
        entries = {g.name: self.entry_keep(g, keeps[g.name]) for g in groups}
        super().apply(groups, entries, optimizers, **options)

    @torch.no_grad()
    def entry_keep(self, group: Group, group_keep: torch.Tensor) -> torch.Tensor:
        """The entry mask (the tensor's shape) for a keep vector over M-groups: every group with
        keep False keeps only its N largest ``|w|`` among the entries still kept."""
        n, m = self.pattern.n, self.pattern.m
        member = group.members[0]
        weight, dim = member.tensor.detach(), input_dim(member.module)
        kept = to_groups(super().current(group), m, dim)
        scores = to_groups(weight.abs().float(), m, dim).masked_fill(~kept, -math.inf)
        # Ascending and stable: the M - N lowest go, equal ones in index order.
        lowest = scores.argsort(dim=1, stable=True)[:, : m - n]
        drop = torch.zeros_like(kept).scatter_(1, lowest, True)
        drop &= ~group_keep.to(drop.device).reshape(-1, 1)
        return from_groups(~drop, weight.shape, dim)


def refuse_unpatternable(target: Target, pattern: NMPattern, key: str) -> None:
    """A ConfigError at ``{key}.pattern`` naming ``target`` unless its input dimension splits into M-groups."""
    shape, dim = tuple(target.raw.shape), input_dim(target.module)
    if len(shape) >= 2 and shape[dim] % pattern.m == 0:
        return
    why = "has no dim 1" if len(shape) < 2 else f"has {shape[dim]} along dim {dim}"
    raise ConfigError(
        f"{key}.pattern",
        str(pattern),
        f"a pattern whose M ({pattern.m}) divides the input dimension of every selected tensor "
        "(dim 1; dim 0 for Hugging Face Conv1D and transposed convolutions): "
        f"{target.name} (shape {shape}) {why}; leave it out with {key}.targets.exclude=[{target.name}]",
    )


@torch.no_grad()
def nm_fraction(targets: list[Target], pattern: NMPattern) -> float:
    """The fraction of M-groups over all ``targets`` with at most N nonzeros (under the pattern)."""
    under = total = 0
    for target in targets:
        nonzeros = (to_groups(target.tensor.detach(), pattern.m, input_dim(target.module)) != 0).sum(dim=1)
        under += int((nonzeros <= pattern.n).sum())
        total += nonzeros.numel()
    return under / total if total else 0.0
