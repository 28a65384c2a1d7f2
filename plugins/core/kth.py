"""The exact k-th smallest score over many tensors: the cut of every allocation, on models of any size.

``torch.quantile`` refuses inputs above 16M elements, and concatenating every selected tensor to
sort them doubles the model's memory at every update. Instead, :func:`kth_smallest_abs` finds the
exact k-th smallest ``|w|`` over several tensors by radix selection on the bits of the floats: the
bit pattern of a non-negative IEEE float, read as an integer, orders like its value. Each pass
counts one 16-bit field of the bits (a ``bincount`` per chunk of each tensor, under the prefix
already decided), so float32 takes two passes and float64 four; the temporaries are one chunk.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import torch

__all__ = ["kth_smallest", "kth_smallest_abs"]

_INT_VIEW = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
RADIX_BITS = 16
CHUNK = 1 << 22  # elements per temporary: 4M (16 MiB of float32, 32 MiB of int64 counts input)
SMALL = 1 << 16  # up to here a float64 copy and one kthvalue: any sign, no radix passes


def _chunks(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> Iterator[torch.Tensor]:
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        for begin in range(0, flat.numel(), CHUNK):
            yield flat[begin : begin + CHUNK].to(dtype).abs()


@torch.no_grad()
def kth_smallest_abs(tensors: Sequence[torch.Tensor], k: int) -> float:
    """The exact ``k``-th smallest ``|x|`` (1-based) over all ``tensors`` taken together.

    Tensors may have any shapes and sizes (no 16M limit) and live on any one device; mixed float
    dtypes are compared in their promoted dtype. Memory: one chunk of ``CHUNK`` elements at a time.

    Raises:
        ValueError: when ``k`` is not in ``[1, total number of elements]`` or a dtype is not float.
    """
    tensors = list(tensors)
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} must be in [1, {total}]")
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    if dtype not in _INT_VIEW:
        raise ValueError(f"kth_smallest_abs needs floating-point tensors, got {dtype}")
    int_dtype = _INT_VIEW[dtype]
    bits = torch.finfo(dtype).bits
    device = tensors[0].device
    prefix, decided = 0, 0  # the high bits of the answer found so far, and how many
    while decided < bits:
        width = min(RADIX_BITS, bits - decided)
        shift = bits - decided - width
        field_mask = (1 << width) - 1
        counts = torch.zeros((1 << width) + 1, dtype=torch.long, device=device)
        for chunk in _chunks(tensors, dtype):
            as_int = chunk.view(int_dtype)
            field = ((as_int >> shift) & field_mask).long()
            if decided:
                # Entries outside the prefix go to an overflow bin instead of being gathered.
                field = torch.where((as_int >> (shift + width)) == prefix, field, 1 << width)
            counts += torch.bincount(field, minlength=(1 << width) + 1)
        cumulative = counts[:-1].cumsum(0)
        bucket = int(torch.searchsorted(cumulative, torch.tensor([k], device=device)).item())
        k -= int(cumulative[bucket - 1]) if bucket else 0
        prefix = (prefix << width) | bucket
        decided += width
    return float(torch.tensor(prefix, dtype=int_dtype).view(dtype).item())


def kth_smallest(tensors: Sequence[torch.Tensor], k: int) -> float:
    """The exact ``k``-th smallest value (1-based) over all ``tensors`` taken together.

    ``-inf`` marks entries already decided (pruned); the other values are scores, which must be
    >= 0 above :data:`SMALL` elements, where the radix selection of :func:`kth_smallest_abs` runs
    (an ``-inf`` reads as ``+inf`` there, so the ``k``-th smallest finite score is its
    ``(k - count of -inf)``-th). Up to :data:`SMALL` elements, one ``kthvalue`` of a float64 copy.
    """
    tensors = [t.detach().reshape(-1) for t in tensors]
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} must be in [1, {total}]")
    if total <= SMALL:
        device = tensors[0].device
        return float(torch.cat([t.to(device, torch.float64) for t in tensors]).kthvalue(k).values)
    decided = sum(int(torch.isneginf(t).sum()) for t in tensors)
    if k <= decided:
        return -math.inf
    return kth_smallest_abs(tensors, k - decided)
