"""Backbones. Each takes ``norm``, a callable ``(channels, dims, name) -> nn.Module`` (for example
``plugins.norm.swap.NormFactory``), so that one config value changes every normalization layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from plugins.core.errors import ConfigError, is_number
from plugins.norm import NormFactory

__all__ = ["DigitsCNN", "FCN1d", "ResNet1d", "ResidualBlock1d"]

Norm = Callable[..., nn.Module]


def _check_widths(key: str, values: Sequence[int], count: int | None = None) -> list[int]:
    allowed = f"a list of {count} positive integers" if count else "a non-empty list of positive integers"
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):  # widths=5, null, abc
        raise ConfigError(key, values, allowed)
    values = list(values)
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values) and values
    if not ok or (count is not None and len(values) != count):
        raise ConfigError(key, values, allowed)
    return values


def _block(conv: nn.Module, norm: nn.Module) -> nn.Sequential:
    return nn.Sequential(conv, norm, nn.ReLU(inplace=True))


class DigitsCNN(nn.Module):
    """A small VGG-style 2-D CNN for 8x8 digit images: three conv-norm-ReLU stages, two poolings,
    a linear head. About 0.1M parameters and 2.6M multiply-adds per image at the default widths."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (32, 64, 128),
        dropout: float = 0.1,
        norm: Norm | None = None,
    ) -> None:
        super().__init__()
        norm = norm or NormFactory("batch")
        w1, w2, w3 = _check_widths("model.widths", widths, 3)
        if not is_number(dropout) or not 0 <= dropout < 1:
            raise ConfigError("model.dropout", dropout, "a number in [0, 1)")
        self.features = nn.Sequential(
            _block(nn.Conv2d(in_channels, w1, 3, padding=1, bias=False), norm(w1, 2, "features.0.1")),
            _block(nn.Conv2d(w1, w2, 3, padding=1, bias=False), norm(w2, 2, "features.1.1")),
            nn.MaxPool2d(2),
            _block(nn.Conv2d(w2, w3, 3, padding=1, bias=False), norm(w3, 2, "features.3.1")),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(w3 * 2 * 2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _SeriesNet(nn.Module):
    """What the series networks share: checked widths and kernels, a trunk built by the subclass,
    global average pooling over time and a linear head."""

    #: widths when none are given; kernels are given once per layer (FCN) or once per block (ResNet)
    default_widths: tuple[int, ...] = ()
    kernels_per_width = False

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        widths: Sequence[int] | None = None,
        kernels: Sequence[int] = (8, 5, 3),
        norm: Norm | None = None,
    ) -> None:
        super().__init__()
        widths = _check_widths("model.widths", self.default_widths if widths is None else widths)
        count = len(widths) if self.kernels_per_width else None
        kernels = _check_widths("model.kernels", kernels, count)
        channels = self.build_trunk(in_channels, widths, kernels, norm or NormFactory("batch"))
        self.head = nn.Linear(channels, num_classes)

    def build_trunk(self, in_channels: int, widths: list[int], kernels: list[int], norm: Norm) -> int:
        """Register the layers before the pooling; returns their output channels."""
        raise NotImplementedError

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x).mean(dim=-1))


class FCN1d(_SeriesNet):
    """Fully convolutional network for series (Wang et al. 2017): three conv-norm-ReLU blocks with
    kernels 8, 5, 3, global average pooling, a linear head. Any series length. Widths default to
    (64, 128, 64)."""

    default_widths = (64, 128, 64)
    kernels_per_width = True

    def build_trunk(self, in_channels: int, widths: list[int], kernels: list[int], norm: Norm) -> int:
        layers, channels = [], in_channels
        for i, (width, kernel) in enumerate(zip(widths, kernels, strict=True)):
            conv = nn.Conv1d(channels, width, kernel, padding="same", bias=False)
            layers.append(_block(conv, norm(width, 1, f"features.{i}.1")))
            channels = width
        self.features = nn.Sequential(*layers)
        return channels

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class ResidualBlock1d(nn.Module):
    """Three conv-norm layers (kernels 8, 5, 3) with a shortcut added before the last ReLU; the
    shortcut is a 1x1 conv + norm when the channel count changes, the identity otherwise."""

    def __init__(self, in_channels: int, width: int, kernels: Sequence[int], norm: Norm, name: str) -> None:
        super().__init__()
        convs, channels = [], in_channels
        for i, kernel in enumerate(kernels):
            convs += [
                nn.Conv1d(channels, width, kernel, padding="same", bias=False),
                norm(width, 1, f"{name}.body.{2 * i + 1}"),
            ]
            if i < len(kernels) - 1:
                convs.append(nn.ReLU(inplace=True))
            channels = width
        self.body = nn.Sequential(*convs)
        self.shortcut = (
            nn.Identity()
            if in_channels == width
            else nn.Sequential(
                nn.Conv1d(in_channels, width, 1, bias=False), norm(width, 1, f"{name}.shortcut.1")
            )
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class ResNet1d(_SeriesNet):
    """ResNet for series (Wang et al. 2017): residual blocks, global average pooling, linear head.
    Widths default to (64, 128, 128)."""

    default_widths = (64, 128, 128)

    def build_trunk(self, in_channels: int, widths: list[int], kernels: list[int], norm: Norm) -> int:
        blocks, channels = [], in_channels
        for i, width in enumerate(widths):
            blocks.append(ResidualBlock1d(channels, width, kernels, norm, f"blocks.{i}"))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        return channels

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)
