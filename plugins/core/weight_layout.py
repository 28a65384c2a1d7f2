"""Which dimension of a layer's stored weight runs over the layer's inputs (the reduction dimension
of its matrix product): dim 1 for ``Linear`` and ``ConvNd`` (``(out, in, ...)``), dim 0 for Hugging
Face's ``Conv1D`` (GPT-2's ``(in, out)``) and for transposed convolutions (``(in, out, ...)``); and
which one runs over its output units (the other of the two)."""

from __future__ import annotations

from torch import nn

__all__ = ["input_dim", "is_hf_conv1d", "output_dim"]


def is_hf_conv1d(module: nn.Module) -> bool:
    """``transformers.pytorch_utils.Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` of shape ``(in, out)``."""
    # Matched by name so that this package does not import transformers; through the class's bases
    # because torch.nn.utils.parametrize swaps the class for a subclass ("ParametrizedConv1D").
    named = any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)
    return named and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def input_dim(module: nn.Module) -> int:
    """The dimension of ``module.weight`` along which its inputs run."""
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    return 0 if transposed or is_hf_conv1d(module) else 1


def output_dim(module: nn.Module) -> int:
    """The dimension of ``module.weight`` along which its output units run."""
    return 1 if input_dim(module) == 0 else 0
