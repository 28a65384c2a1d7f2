"""Norm kinds: one class each in the :data:`NORM_KINDS` registry (``norm.kind`` names it), and
:class:`NormFactory`, the callable every backbone takes. A new kind is one registered class and one
``conf/norm/<kind>.yaml``.

    @NORM_KINDS.register("rms")
    class RMS(NormKind):
        def build(self, factory, channels, dims, name):
            return ChannelRMSNorm(channels, eps=factory.eps)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import nn

from plugins.core.errors import ConfigError, is_number
from plugins.core.registry import Registry
from plugins.norm.layers import BatchNormNd, ChannelLayerNorm, ChannelsLast, InstanceNormNd

__all__ = ["NORM_KINDS", "NormKind", "NormFactory", "make_norm"]


class NormKind(ABC):
    """How a kind builds its layer. ``dims`` is the spatial rank (0 for ``(N, C)``, 1 for
    ``(N, C, L)``, 2 for ``(N, C, H, W)``) or ``None`` when it is not known (a swap in a model
    never run): then the layer must accept any rank."""

    @abstractmethod
    def build(self, factory: NormFactory, channels: int, dims: int | None, name: str) -> nn.Module:
        """A channels-first layer ``(N, C, *)``."""

    def channels_last(self, factory: NormFactory, channels: int, name: str) -> nn.Module:
        """A layer for channels-last features ``(N, *, C)`` (replacing an ``nn.LayerNorm``)."""
        return ChannelsLast(self.build(factory, channels, None, name))


NORM_KINDS: Registry[type[NormKind]] = Registry("norm kind", NormKind)


def _track(factory: NormFactory, default: bool) -> bool:
    return default if factory.track_running_stats is None else factory.track_running_stats


@NORM_KINDS.register("batch")
class Batch(NormKind):
    """BatchNorm (running statistics by default)."""

    def build(self, factory, channels, dims, name):
        cls = {None: BatchNormNd, 0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        return cls(channels, eps=factory.eps, affine=factory.affine, track_running_stats=_track(factory, True))


@NORM_KINDS.register("instance")
class Instance(NormKind):
    """InstanceNorm (no running statistics by default); needs positions to normalize over."""

    def build(self, factory, channels, dims, name):
        if dims == 0:
            raise ConfigError("norm.kind", "instance", f"a kind defined for (N, C) features at {name or 'this layer'}")
        cls = {None: InstanceNormNd, 1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
        return cls(channels, eps=factory.eps, affine=factory.affine, track_running_stats=_track(factory, False))


@NORM_KINDS.register("group")
class Group(NormKind):
    """GroupNorm with ``norm.num_groups`` groups (must divide the channels)."""

    def build(self, factory, channels, dims, name):
        if channels % factory.num_groups:
            raise ConfigError(
                "norm.num_groups", factory.num_groups, f"a divisor of the {channels} channels of layer {name or '?'}"
            )
        return nn.GroupNorm(factory.num_groups, channels, eps=factory.eps, affine=factory.affine)


@NORM_KINDS.register("layer")
class Layer(NormKind):
    """LayerNorm for conv features: each sample normalized over its channels and positions together,
    then a per-channel scale and shift (``nn.GroupNorm(1, C)``, the Group Normalization paper's
    LayerNorm). A per-sample gain cancels; the relative amplitude of local windows is kept. On
    ``(N, C)`` features it is ``nn.LayerNorm(C)``. Cost: one mean and variance per sample."""

    def build(self, factory, channels, dims, name):
        return nn.GroupNorm(1, channels, eps=factory.eps, affine=factory.affine)

    def channels_last(self, factory, channels, name):
        # (N, L, C) tokens: a transformer's LayerNorm is per token over C, which stays what it is.
        return nn.LayerNorm(channels, eps=factory.eps, elementwise_affine=factory.affine)


@NORM_KINDS.register("channel_layer")
class ChannelLayer(NormKind):
    """LayerNorm over the channels at each position separately (:class:`ChannelLayerNorm`), the
    meaning of ``layer`` before issue 17. After a conv on a one-channel series it removes the
    amplitude of every local window; kept for comparison and for models trained with it. Costs two
    transposes per call."""

    def build(self, factory, channels, dims, name):
        return ChannelLayerNorm(channels, eps=factory.eps, affine=factory.affine)

    def channels_last(self, factory, channels, name):
        return nn.LayerNorm(channels, eps=factory.eps, elementwise_affine=factory.affine)


@NORM_KINDS.register("none")
class Identity(NormKind):
    """No normalization."""

    def build(self, factory, channels, dims, name):
        return nn.Identity()

    def channels_last(self, factory, channels, name):
        return nn.Identity()


@dataclass(frozen=True)
class NormFactory:
    """Builds the chosen normalization for a given channel count and spatial rank (1 or 2).

    Args:
        kind: a registered :data:`NORM_KINDS` name.
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
        NORM_KINDS.get(self.kind, "norm.kind")
        groups = self.num_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ConfigError("norm.num_groups", self.num_groups, "an integer >= 1")
        if not isinstance(self.affine, bool):
            raise ConfigError("norm.affine", self.affine, "true or false")
        if self.track_running_stats is not None and not isinstance(self.track_running_stats, bool):
            raise ConfigError("norm.track_running_stats", self.track_running_stats, "true, false or null")
        if not is_number(self.eps) or self.eps <= 0:
            raise ConfigError("norm.eps", self.eps, "a finite number > 0")

    def __call__(self, channels: int, dims: int = 2, name: str = "") -> nn.Module:
        return make_norm(self, channels, dims, name)


def make_norm(factory: NormFactory, channels: int, dims: int = 2, name: str = "") -> nn.Module:
    """One normalization layer of ``factory.kind`` for ``channels`` channels of spatial rank
    ``dims``; ``name`` is the layer's name, used in error messages."""
    return NORM_KINDS.get(factory.kind, "norm.kind")().build(factory, channels, dims, name)
