"""Normalization layers by name: one factory that every backbone takes, so the ``norm`` config group
changes every normalization layer of a model without touching its code.

Kinds: ``batch``, ``instance``, ``group``, ``layer`` (channel-wise, over C for each position... see
:class:`ChannelLayerNorm`), ``none`` (identity).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from plugins.errors import ConfigError

__all__ = ["NORM_KINDS", "ChannelLayerNorm", "NormFactory", "make_norm"]

NORM_KINDS = ("batch", "instance", "group", "layer", "none")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``(N, C, *)`` features, at each position separately.

    ``nn.LayerNorm`` normalizes the last axes; conv features keep channels on axis 1, so this moves
    them last, normalizes, and moves them back. Costs two transposes per call.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.norm = nn.LayerNorm(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.norm(x)
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


@dataclass(frozen=True)
class NormFactory:
    """Builds the chosen normalization for a given channel count and spatial rank (1 or 2).

    Args:
        kind: one of ``NORM_KINDS``.
        num_groups: groups for ``group`` (must divide every layer's channels).
        affine: learnable scale and shift.
        track_running_stats: running statistics for ``batch`` and ``instance``; ``None`` = each
            kind's PyTorch default (True for batch, False for instance).
        eps: added to the variance.
    """

    kind: str = "batch"
    num_groups: int = 8
    affine: bool = True
    track_running_stats: bool | None = None
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.kind not in NORM_KINDS:
            raise ConfigError("norm.kind", self.kind, f"one of {', '.join(NORM_KINDS)}")
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int) or self.num_groups < 1:
            raise ConfigError("norm.num_groups", self.num_groups, "an integer >= 1")
        if not isinstance(self.affine, bool):
            raise ConfigError("norm.affine", self.affine, "true or false")
        if self.eps <= 0:
            raise ConfigError("norm.eps", self.eps, "a number > 0")

    def __call__(self, channels: int, dims: int = 2, name: str = "") -> nn.Module:
        return make_norm(self, channels, dims, name)


def make_norm(factory: NormFactory, channels: int, dims: int = 2, name: str = "") -> nn.Module:
    """One normalization layer of ``factory.kind`` for ``channels`` channels.

    ``dims`` is the spatial rank: 0 for ``(N, C)``, 1 for ``(N, C, L)``, 2 for ``(N, C, H, W)``.
    ``name`` is the layer's name, used in error messages.
    """
    kind = factory.kind
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        track = True if factory.track_running_stats is None else factory.track_running_stats
        return cls(channels, eps=factory.eps, affine=factory.affine, track_running_stats=track)
    if kind == "instance":
        if dims == 0:
            raise ConfigError("norm.kind", kind, f"a kind defined for (N, C) features at {name or 'this layer'}")
        cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
        track = False if factory.track_running_stats is None else factory.track_running_stats
        return cls(channels, eps=factory.eps, affine=factory.affine, track_running_stats=track)
    if kind == "group":
        if channels % factory.num_groups:
            raise ConfigError(
                "norm.num_groups",
                factory.num_groups,
                f"a divisor of the {channels} channels of layer {name or '?'}",
            )
        return nn.GroupNorm(factory.num_groups, channels, eps=factory.eps, affine=factory.affine)
    return ChannelLayerNorm(channels, eps=factory.eps, affine=factory.affine)


NormBuilder = Callable[[int, int, str], nn.Module]
