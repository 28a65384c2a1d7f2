"""Normalization layers the kinds build where ``torch.nn`` has none: a channel LayerNorm for
``(N, C, *)`` features, batch and instance norms for any rank, and a channels-last adapter."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelLayerNorm", "BatchNormNd", "InstanceNormNd", "ChannelsLast"]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``(N, C, *)`` features, at each position separately: the
    ``channel_layer`` norm kind (the ``layer`` kind normalizes over channels and positions together).

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


class BatchNormNd(nn.modules.batchnorm._BatchNorm):
    """BatchNorm for ``(N, C, *)`` features of any rank, used where the rank is not known when the
    layer is made (replacing a GroupNorm or a channel LayerNorm). Same state as ``BatchNorm1d``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected (N, C, *) features, got {input.dim()}-D input")


class InstanceNormNd(nn.modules.instancenorm._InstanceNorm):
    """InstanceNorm for ``(N, C, *)`` features with at least one position, any rank."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 3:
            raise ValueError(
                f"instance norm needs (N, C, *) features with positions, got {tuple(input.shape)}: "
                "each sample's channel would be normalized over a single value"
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if input.size(1) != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels on axis 1, got {tuple(input.shape)}"
            )
        return self._apply_instance_norm(input)


class ChannelsLast(nn.Module):
    """Applies a channels-first norm (``(N, C, *)``) to channels-last features ``(N, *, C)``.

    Used when a plain ``nn.LayerNorm(C)`` (which normalizes the last axis, as in transformers on
    ``(N, L, C)`` tokens) is swapped for batch, instance or group normalization.
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.norm(x)
        return self.norm(x.movedim(-1, 1)).movedim(1, -1)
