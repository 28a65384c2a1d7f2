"""A user's own extensions, registered from their own module (``imports=[tests.extensions]``): one
class each, picked by one YAML file each (tests/test_extensions.py writes those)."""

from __future__ import annotations

import torch
from torch import nn

from plugins.constraints import Constraint, register_constraint
from plugins.core.criteria import CRITERIA, Criterion
from plugins.core.schedules import SCHEDULE_KINDS, ScheduleKind
from plugins.norm import NORM_KINDS, NormKind


@SCHEDULE_KINDS.register("sqrt_ramp")
class SqrtRamp(ScheduleKind):
    """Fast at first: ``start + (end - start) * sqrt(t)``."""

    def __call__(self, start, end, t, steps):
        return start + (end - start) * t**0.5


@CRITERIA.register("lowest_index")
class LowestIndex(Criterion):
    """Prunes the slices with the lowest indices first (a criterion anyone can check by eye)."""

    def scores(self, group, keep, generator):
        return torch.arange(keep.numel(), dtype=torch.float32)


class ChannelRMSNorm(nn.Module):
    """``x / rms(x over channels)`` with a learned scale, at every position."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        scale = x.pow(2).mean(dim=1, keepdim=True).add(self.eps).rsqrt()
        return x * scale * self.weight.view(1, -1, *([1] * (x.dim() - 2)))


@NORM_KINDS.register("rms")
class RMS(NormKind):
    """RMS normalization over the channels."""

    def build(self, factory, channels, dims, name):
        return ChannelRMSNorm(channels, eps=factory.eps)


@register_constraint("row_l1_unit")
class RowL1Unit(Constraint):
    """Every row has L1 norm 1: ``W / sum(|W|, rows)``."""

    def forward(self, x):
        return x / x.abs().sum(dim=-1, keepdim=True).clamp_min(1e-12)
