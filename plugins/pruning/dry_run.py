"""Refuse compaction before training when it would not be exact: a dry run on a copy.

Some structures cannot lose channels one by one without changing what the model computes: the
q/k/v projections of attention (channels removed unevenly regroup into other heads), reshapes that
fix a head size. Torch-Pruning's graph does not see these, so the only general test is to try: at
``setup``, a copy of the model has the same share of slices zeroed in every unit as the schedule's
peak (a seeded random choice), is compacted, and must compute what the zeroed copy did.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from plugins.core.allocation import prune_count
from plugins.core.decision import Group
from plugins.core.errors import CompactionMismatch, CompactionWarning, ConfigError
from plugins.core.masks import bake
from plugins.pruning.compaction import compact
from plugins.pruning.dependency import independent_copy

__all__ = ["refuse_inexact_compaction"]


@torch.no_grad()
def refuse_inexact_compaction(
    pl_module: nn.Module, groups: list[Group], dim: int, example: Any, amount: float, count: bool, key: str
) -> None:
    """Raise ConfigError at ``{key}.compact`` when compacting ``groups`` pruned by ``amount`` would
    change the outputs. Cost: one copy of the model and one compaction of it, once."""
    replica = independent_copy(pl_module)
    bake(replica)
    generator = torch.Generator().manual_seed(0)
    for group in groups:
        k = min(max(prune_count(amount, group.size, count), 1), group.size - group.min_keep)
        if k <= 0:
            continue
        gone = torch.randperm(group.size, generator=generator)[:k]
        for name in [m.name for m in group.members] + [name for name, _, _ in group.extras]:
            tensor = replica.get_parameter(name)
            axis = dim % tensor.dim() if tensor.dim() > 1 else 0
            tensor.index_fill_(axis, gone.to(tensor.device), 0.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CompactionWarning)  # the real compaction warns
            compact(replica, example, measure=False, key=f"{key}.compact")
    except CompactionMismatch as err:
        from plugins.pruning.attention import find_attention

        hint = "; attention loses whole heads exactly with heads=true" if find_attention(pl_module) else ""
        raise ConfigError(f"{key}.compact", True, f"false for this model: a dry run says {err}{hint}") from None
