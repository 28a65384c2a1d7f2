"""The sparse twins of the layers a baked model computes with: which layers qualify, and the modules
that replace them.

A layer qualifies when what it computes is one matrix product over its last (``Linear``, Hugging
Face's ``Conv1D``) or channel dimension (a 1x1 ``Conv1d``/``Conv2d``, stride 1, no padding, one
group): its weight then becomes a ``(out, in)`` matrix stored as CSR or BSR (float32/float64 on
CPU), or as 2:4 semi-structured (``Linear`` and ``Conv1D`` on a CUDA GPU, see
:mod:`plugins.export.semi_structured`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from plugins.core.weight_layout import is_hf_conv1d
from plugins.export import ops  # noqa: F401  (registers torch.ops.sparsekit.sparse_matmul)
from plugins.export.semi_structured import SEMI, SemiStructuredLinear, semi_structured_backend

__all__ = ["SparseLinear", "SparseConv1x1", "as_matrix", "form_misfit", "is_linear_like", "parse_form", "sparse_twin"]

FLOATS = (torch.float32, torch.float64)


def parse_form(form: str) -> int | None:
    """The block size of a form: ``"csr"`` -> 1, ``"bsr16"`` -> 16, ``"dense"`` and ``"2:4"`` ->
    None; any other string raises ``ValueError``."""
    if form in ("dense", SEMI):
        return None
    if form == "csr":
        return 1
    if form.startswith("bsr") and form[3:].isdigit() and int(form[3:]) >= 2:
        return int(form[3:])
    raise ValueError(form)


def _is_pointwise_conv(module: nn.Module) -> bool:
    return (
        isinstance(module, (nn.Conv1d, nn.Conv2d))
        and all(k == 1 for k in module.kernel_size)
        and all(s == 1 for s in module.stride)
        and all(p == 0 for p in module.padding)
        and module.groups == 1
    )


def is_linear_like(module: nn.Module) -> bool:
    """A ``Linear``, Hugging Face ``Conv1D``, ``Conv1d`` or ``Conv2d``: the layers the record lists."""
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) or is_hf_conv1d(module)


def as_matrix(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    """``(weight as an (out, in) matrix, bias)`` of a layer that qualifies, else why it does not."""
    if isinstance(module, nn.Linear):
        weight = module.weight
    elif is_hf_conv1d(module):
        weight = module.weight.t()
    elif _is_pointwise_conv(module):
        weight = module.weight.reshape(module.weight.shape[0], -1)
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "not a 1x1 convolution with stride 1, no padding and one group"
    else:
        return "not a Linear, Conv1D or 1x1 convolution"
    return weight.detach(), None if module.bias is None else module.bias.detach()


def form_misfit(form: str, module: nn.Module, weight: torch.Tensor) -> str | None:
    """Why the layer ``module`` (its ``(out, in)`` ``weight``) cannot run in the sparse ``form``, or
    None: CSR/BSR need float32/float64 on CPU and, for BSR, a block size dividing both sides; 2:4
    needs a ``Linear`` or ``Conv1D`` whose weight fits :func:`semi_structured_backend`."""
    if form == SEMI:
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            return "2:4 export takes Linear and Conv1D layers, not convolutions"
        backend = semi_structured_backend(weight)
        return backend if isinstance(backend, str) else None
    if weight.dtype not in FLOATS or weight.device.type != "cpu":
        return f"{weight.dtype} on {weight.device.type}: CSR/BSR kernels take float32/float64 on CPU"
    block = parse_form(form)
    if block > 1 and (weight.shape[0] % block or weight.shape[1] % block):
        return f"{block} does not divide both sides of {tuple(weight.shape)}"
    return None


class _SparseMatrix(nn.Module):
    """A weight matrix held as the dense parts of its CSR or BSR form (buffers, no gradient)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, form: str) -> None:
        super().__init__()
        block = parse_form(form)
        if block is None:
            raise ValueError("a sparse layer needs form 'csr' or 'bsr<k>'")
        self.form = form
        self.out_features, self.in_features = weight.shape
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta": known, and checked here
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            sparse = weight.to_sparse_csr() if block == 1 else weight.to_sparse_bsr((block, block))
        # Clones: the parts are views of the sparse tensor, which torch.export cannot fake.
        self.register_buffer("crow_indices", sparse.crow_indices().clone())
        self.register_buffer("col_indices", sparse.col_indices().clone())
        self.register_buffer("values", sparse.values().clone())
        self.register_buffer("bias", None if bias is None else bias.clone())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` for ``x`` of shape ``(n, in_features)``."""
        return torch.ops.sparsekit.sparse_matmul(
            x, self.crow_indices, self.col_indices, self.values, self.bias, self.out_features, self.in_features
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, form={self.form}, nnz={self.nnz}"

    @property
    def nnz(self) -> int:
        """Stored values (a BSR block counts whole, zeros included)."""
        return self.values.numel()


class SparseLinear(_SparseMatrix):
    """Replaces a ``Linear`` (or Hugging Face ``Conv1D``): the same function of the last dimension
    with a CSR/BSR weight. Costs time proportional to the stored values (plus MKL's per-call
    overhead, ~10 us) and memory of ``values`` + indices; inference only (no gradient to the weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x.reshape(-1, self.in_features))
        return out.reshape(*x.shape[:-1], self.out_features)


class SparseConv1x1(_SparseMatrix):
    """Replaces a 1x1 ``Conv1d``/``Conv2d`` (stride 1, no padding, one group): a matrix product over
    the channel dimension at every position. Costs one copy of the input in channels-last order
    on top of :class:`SparseLinear`'s cost."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x.movedim(1, -1)
        out = self.matmul(last.reshape(-1, self.in_features))
        return out.reshape(*last.shape[:-1], self.out_features).movedim(-1, 1)


def sparse_twin(module: nn.Module, form: str) -> nn.Module:
    """The module that computes what ``module`` does with its weight in ``form`` (``module``
    itself for ``"dense"``); the layer must qualify (:func:`as_matrix`, :func:`form_misfit`)."""
    if form == "dense":
        return module
    matrix = as_matrix(module)
    if isinstance(matrix, str):
        raise ValueError(matrix)
    if form == SEMI:
        return SemiStructuredLinear(*matrix)
    cls = SparseConv1x1 if isinstance(module, (nn.Conv1d, nn.Conv2d)) else SparseLinear
    return cls(*matrix, form)
