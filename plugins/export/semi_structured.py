"""2:4 semi-structured weights for :func:`~plugins.export.sparse_export` on a CUDA GPU: which
layers can take them, and the module that replaces such a layer.

A weight matrix ``(out, in)`` is 2:4 when every 4 consecutive inputs of every output row hold at
most 2 nonzeros: the layout ``sparsity.pattern=2:4`` trains (``plugins/sparsity/nm_pattern.py``)
and NVIDIA's sparse tensor cores run (compute capability 8.0 and up), through
``torch.sparse.to_sparse_semi_structured``. The kernels are cuSPARSELt's where it is available and
takes the dtype (float16, bfloat16, int8, float8), else CUTLASS's, which also takes float32, but as
1:2 (at most 1 nonzero in every 2 inputs: the TF32 tensor cores' pattern), so a float32 layer
needs ``sparsity.pattern=1:2``. Each kernel library has minimum shapes; torch's own tables are read
here, not copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SEMI", "SemiStructuredLinear", "pattern_misfit", "pattern_violations", "semi_structured_backend"]

#: The form name in the export's ``forms``, ``candidates`` and record.
SEMI = "2:4"


def pattern_violations(matrix: torch.Tensor, n: int = 2, m: int = 4) -> int:
    """How many groups of ``m`` consecutive inputs (dim 1) of ``matrix`` hold more than ``n``
    nonzeros (``matrix.shape[1]`` must be a multiple of ``m``)."""
    groups = (matrix.detach() != 0).reshape(matrix.shape[0], -1, m)
    return int((groups.sum(dim=2) > n).sum())


def _backends() -> list[type]:
    found = []
    if torch.backends.cusparselt.is_available():
        found.append(torch.sparse.SparseSemiStructuredTensorCUSPARSELT)
    found.append(torch.sparse.SparseSemiStructuredTensorCUTLASS)
    return found


def semi_structured_backend(matrix: torch.Tensor) -> type | str:
    """The torch subclass that holds ``matrix`` (``(out, in)``) as 2:4 on its device, or why none can."""
    if matrix.device.type != "cuda":
        return f"2:4 kernels run on CUDA only (this weight is on {matrix.device.type})"
    major, minor = torch.cuda.get_device_capability(matrix.device)
    if major < 8:
        return f"2:4 kernels need compute capability 8.0 or higher (this GPU: {major}.{minor})"
    fitting = [b for b in _backends() if matrix.dtype in b._DTYPE_SHAPE_CONSTRAINTS]
    if not fitting:
        dtypes = sorted({str(d) for b in _backends() for d in b._DTYPE_SHAPE_CONSTRAINTS})
        return f"{matrix.dtype}: 2:4 kernels take {', '.join(dtypes)}"
    backend = fitting[0]
    limits = backend._DTYPE_SHAPE_CONSTRAINTS[matrix.dtype]
    rows, cols = matrix.shape
    if rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
        return (
            f"(out, in) = ({rows}, {cols}): {backend.BACKEND} takes multiples of "
            f"({limits.sparse_min_rows}, {limits.sparse_min_cols}) in {matrix.dtype}"
        )
    misfit = pattern_misfit(matrix)
    return backend if misfit is None else misfit


def pattern_misfit(matrix: torch.Tensor) -> str | None:
    """Why the zeros of ``matrix`` do not fit the semi-structured pattern of its dtype, or None:
    2:4, or 1:2 in float32 (CUTLASS encodes float32 in pairs)."""
    n, m = (1, 2) if matrix.dtype == torch.float32 else (2, 4)
    over = pattern_violations(matrix, n, m)
    if not over:
        return None
    hint = " (float32 runs as 1:2 on CUTLASS: train with sparsity.pattern=1:2, or export in float16)" if m == 2 else ""
    return f"not {n}:{m}: {over} of {matrix.numel() // m} groups of {m} inputs hold more than {n} nonzeros{hint}"


class SemiStructuredLinear(nn.Module):
    """Replaces a ``Linear`` (or Hugging Face ``Conv1D``) whose ``(out, in)`` weight is 2:4, on a
    CUDA GPU: the same function of the last dimension, the weight held as torch's semi-structured
    tensor (half its values plus 2 bits of position each). Costs about half the dense product's
    arithmetic on sparse tensor cores; a launch and a possible padding of the input to the kernel's
    minimum shape on top; inference only (no gradient to the weight)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        backend = semi_structured_backend(weight)
        if isinstance(backend, str):
            raise ValueError(backend)
        self.out_features, self.in_features = weight.shape
        self.backend = backend.BACKEND
        sparse = backend.from_dense(weight.detach().contiguous())
        self.weight = nn.Parameter(sparse, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, form=2:4, backend={self.backend}"
