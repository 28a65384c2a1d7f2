"""A masked ``Linear``'s weight gradient, block product and mask fused in one compiled call.

:mod:`plugins.core.masked_linear` computes the weight gradient ``grad_output.T @ input`` in blocks
of rows and zeroes each block under the mask while it is in cache. Driven from Python,
each block costs a ``torch.mm`` call, four slices and a call of the compiled loop, and that Python
runs right after a product that pushed the interpreter's own data out of the cache. Here one
function compiled by numba walks the blocks itself and calls, for each, the very BLAS routine that
``torch.mm`` calls on the CPU (``sgemm_``, as torch's own library exports it), then the mask loop,
which reads the mask at one bit per weight (:mod:`plugins.core.bit_mask`).
Per 2048x2048 gradient at batch 32 the zeroing then costs +0.06 ms over the product alone, against
+0.38 ms with the blocks driven from Python (``python benchmarks/bench_gradient_zeroing.py``).

Same values, bit for bit: the same routine with the same operands. That is checked once per
process when it is compiled, on shapes that make any other summation order show (a mismatch, a
missing symbol or an interface it cannot call leaves :func:`fused_weight_gradient` at ``None``,
and the block loop in Python does the work as before). float32 only: torch's float64 product
rounds differently from ``dgemm_`` called this way. Costs one compilation (about two seconds) at
the first use in a process, nothing per call but the call.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plugins.core.bit_mask import compile_bit_loop, pack_bits
from plugins.core.byte_mask import compiled_loop

__all__ = ["BLOCK_BYTES", "MIN_ROWS", "fused_weight_gradient"]

# Blocks of this many bytes of gradient. Chosen in one-off timings, not a committed benchmark:
# blocks of 1, 2 and 4 MiB were within the machine's noise of one another, 2 MiB a little ahead.
BLOCK_BYTES = 2 << 20
# MKL's sgemm takes another kernel, which rounds differently, for a product of fewer rows than
# this (blocks of 1 to 3 rows differed from the whole product; 8 and more matched it): every
# block has at least this many rows, a shorter rest joins the block before it.
MIN_ROWS = 16

_FUSED: Any = None
_UNAVAILABLE = object()


def _blas(name: str) -> Any:
    # libtorch_cpu is loaded already (import torch): CDLL returns that same library.
    folder = Path(torch.__file__).parent / "lib"
    library = next(iter(sorted(folder.glob("libtorch_cpu.*"))), None)
    if library is None or sys.byteorder != "little":  # the int64 dimensions below read as int32 only there
        return None
    routine = getattr(ctypes.CDLL(str(library)), name, None)
    if routine is not None:
        routine.argtypes, routine.restype = [ctypes.c_void_p] * 13, None
    return routine


def _compile(gemm: Any, multiply: Any) -> Any:
    import numba

    @numba.njit(nogil=True, boundscheck=False)
    def weight_gradient(flat, grad_output, input, bits, rows_per_block):  # pragma: no cover - compiled
        # Column-major BLAS: the row-major gradient block (rows x columns) is the column-major
        # columns x rows product input.T @ grad_output[:, rows].
        batch, rows = grad_output.shape
        columns = input.shape[1]
        # int64, little-endian: an LP64 BLAS reads the low 4 bytes, an ILP64 one all 8; same values.
        dims = np.empty(5, np.int64)
        dims[0], dims[2], dims[3], dims[4] = columns, batch, rows, columns
        scalars = np.zeros(2, flat.dtype)
        scalars[0] = 1
        letters = np.empty(2, np.uint8)
        letters[0], letters[1] = 78, 84  # "N", "T"
        start = 0
        while start < rows:
            stop = start + rows_per_block
            if stop + MIN_ROWS > rows:  # no block of fewer rows at the end: the routine rounds those otherwise
                stop = rows
            dims[1] = stop - start
            gemm(
                letters[0:].ctypes.data,
                letters[1:].ctypes.data,
                dims[0:].ctypes.data,
                dims[1:].ctypes.data,
                dims[2:].ctypes.data,
                scalars[0:].ctypes.data,
                input.ctypes.data,
                dims[0:].ctypes.data,
                grad_output[:, start:].ctypes.data,
                dims[3:].ctypes.data,
                scalars[1:].ctypes.data,
                flat[start * columns :].ctypes.data,
                dims[4:].ctypes.data,
            )
            multiply(flat[start * columns : stop * columns], bits, start * columns)
            start = stop

    return weight_gradient


def _same_as_torch(kernel: Any) -> bool:
    # Odd sizes, a long sum and several blocks: another routine or order would round differently.
    generator = torch.Generator().manual_seed(0)
    grad_output = torch.randn(67, 83, generator=generator)
    input = torch.randn(67, 29, generator=generator)
    keep = torch.rand(83, 29, generator=generator) > 0.5
    got = torch.empty(83, 29)
    kernel(got.view(-1).numpy(), grad_output.numpy(), input.numpy(), pack_bits(keep), MIN_ROWS)
    return torch.equal(got, grad_output.t().mm(input) * keep)


def _build() -> Any:
    try:
        gemm = _blas("sgemm_")
        if gemm is None or compiled_loop() is None:  # no BLAS routine to call, or numba cannot compile here
            return _UNAVAILABLE
        kernel = _compile(gemm, compile_bit_loop())
        return kernel if _same_as_torch(kernel) else _UNAVAILABLE
    except Exception:  # noqa: BLE001 - an optional speed-up: the Python block loop computes the same
        return _UNAVAILABLE


def fused_weight_gradient(dtype: torch.dtype) -> Any:
    """The compiled ``(flat gradient, grad_output, input, bit mask, rows per block)`` call for
    ``dtype``, or ``None``: for any dtype but float32 (torch's float64 product rounds differently
    from ``dgemm_`` called this way), and where it is not available or not torch's product. Rows
    per block: at least :data:`MIN_ROWS`."""
    global _FUSED
    if dtype != torch.float32:
        return None
    if _FUSED is None:
        _FUSED = _build()
    return None if _FUSED is _UNAVAILABLE else _FUSED
