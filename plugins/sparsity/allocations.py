"""Allocations: how a target fraction of zeros splits across the selected tensors, as one lambda per
tensor. Each is one class in the :data:`ALLOCATIONS` registry (``sparsity.scope`` names it); a new
one (ERK, LAMP, ...) is a new class."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from plugins.core.registry import Registry
from plugins.sparsity.thresholds import threshold_for_sparsity

__all__ = ["ALLOCATIONS", "Allocation", "PerLayer", "Global"]


class Allocation(ABC):
    """``lambdas(tensors, fraction)``: tensor name -> the lambda whose hardshrink leaves that
    tensor's share of ``fraction`` zeros. Pure; cost: one exact k-th magnitude per lambda."""

    @abstractmethod
    def lambdas(self, tensors: dict[str, torch.Tensor], fraction: float) -> dict[str, float]:
        """One lambda per tensor name."""


ALLOCATIONS: Registry[type[Allocation]] = Registry("allocation", Allocation)


@ALLOCATIONS.register("layer")
class PerLayer(Allocation):
    """The same fraction of zeros in every tensor."""

    def lambdas(self, tensors, fraction):
        return {name: threshold_for_sparsity([w], fraction) for name, w in tensors.items()}


@ALLOCATIONS.register("global")
class Global(Allocation):
    """One lambda over all tensors together: the fraction holds over their union."""

    def lambdas(self, tensors, fraction):
        return dict.fromkeys(tensors, threshold_for_sparsity(list(tensors.values()), fraction))
