"""The one operator the sparse layers run: ``sparsekit::sparse_matmul``, a CSR or BSR weight times a
dense batch, with the bias added in the same MKL call.

It is a ``torch.library`` custom operator so that ``torch.export`` can trace a model that holds
sparse weights: in 2.13 ``torch.export`` cannot fake a sparse tensor (``aten.mm`` on a sparse
parameter is an unsupported operator), so the weight is stored as its three dense parts
(``crow_indices``, ``col_indices``, ``values``) and rebuilt, without a copy, inside the operator.
This file depends on torch alone: importing it is all a process needs before
``torch.export.load("model_sparse.pt2")``.
"""

from __future__ import annotations

import torch

__all__ = ["sparse_matmul"]


@torch.library.custom_op("sparsekit::sparse_matmul", mutates_args=())
def sparse_matmul(
    x: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` of shape ``(n, in_features)``, ``W`` of shape
    ``(out_features, in_features)`` given as CSR (``values`` 1-D) or BSR (``values`` 3-D, one block
    per row). Returns ``(n, out_features)``, transposed in memory (the sparse product is computed as
    ``W @ x.T``, MKL's fast direction; the next sparse layer reads it back without a copy)."""
    size = (out_features, in_features)
    build = torch.sparse_csr_tensor if values.dim() == 1 else torch.sparse_bsr_tensor
    # The parts come from a valid tensor (to_sparse_*); checking them on every call would cost time.
    weight = build(crow, col, values, size, check_invariants=False)
    xt = x.t()
    out = torch.mm(weight, xt) if bias is None else torch.addmm(bias.unsqueeze(1), weight, xt)
    return out.t()


@sparse_matmul.register_fake
def _(x, crow, col, values, bias, out_features, in_features):
    return x.new_empty(out_features, x.shape[0]).t()
