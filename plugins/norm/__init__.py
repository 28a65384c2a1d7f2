"""Normalization for any model: norm kinds by name (a registry), the factory every backbone takes,
and ``swap_norm`` for models built elsewhere."""

from plugins.norm.kinds import NORM_KINDS, NormFactory, NormKind, make_norm
from plugins.norm.layers import BatchNormNd, ChannelLayerNorm, ChannelsLast, InstanceNormNd
from plugins.norm.swap import NormSwapReport, swap_norm

__all__ = [
    "NORM_KINDS",
    "NormKind",
    "NormFactory",
    "make_norm",
    "NormSwapReport",
    "swap_norm",
    "BatchNormNd",
    "ChannelLayerNorm",
    "ChannelsLast",
    "InstanceNormNd",
]
