"""The exact k-th smallest score over many tensors: the cut of every allocation, on models of any size.

``torch.quantile`` refuses inputs above 16M elements, and concatenating every selected tensor to
sort them doubles the model's memory at every update. Instead, :func:`select_abs` finds the exact
k-th smallest ``|w|`` over several tensors by radix selection on the bits of the floats: the bit
pattern of ``|x|`` (the sign bit cleared), read as an integer, orders like its value. Each pass
counts one field of those bits with an integer ``bincount`` per chunk, under the prefix already
decided: float16/bfloat16 take one pass (15 bits), float32 two (15 + 16), float64 two when the
bucket of its first pass fits one chunk (it is then gathered and sorted), up to four otherwise.

The tensors are read in chunks of :data:`CHUNK_BYTES`, through buffers allocated once per call:
whatever the model size, everything this module allocates at once stays under
:data:`MAX_EXTRA_BYTES` (``tests/test_global_lambda.py`` measures it at 20M weights).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import torch

__all__ = [
    "CHUNK_BYTES",
    "MAX_EXTRA_BYTES",
    "Rank",
    "abs_key",
    "count_abs",
    "drop_abs",
    "kth_smallest",
    "kth_smallest_abs",
    "pieces",
    "select_abs",
]

_INT_VIEW = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
RADIX_BITS = 16
#: Bytes of one chunk of keys: the unit of every temporary (1M float32 keys).
CHUNK_BYTES = 4 << 20
#: Everything one selection allocates at once, whatever the model size: the keys of one chunk, a
#: converted chunk (mixed dtypes), the gathered bucket (float64), a bool chunk and the counts.
MAX_EXTRA_BYTES = 4 * CHUNK_BYTES
SMALL = 1 << 16  # up to here one sort of all the keys, no radix passes

Piece = tuple[torch.Tensor, torch.Tensor | None]  # flat values, and which of them count (bool) or None


class Rank(NamedTuple):
    """The ``k``-th smallest ``|x|`` and how many elements lie strictly below it and at it."""

    value: float
    below: int
    at: int


def pieces(tensors: tuple[torch.Tensor, ...], limit: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Flat pieces of at most ``limit`` elements of same-shaped ``tensors``, in row-major order:
    views where all are contiguous, otherwise copies of at most ``limit`` elements each."""
    first = tensors[0]
    if first.numel() <= limit or all(t.is_contiguous() for t in tensors):
        flats = [t.reshape(-1) for t in tensors]
        for begin in range(0, first.numel(), limit):
            yield tuple(f[begin : begin + limit] for f in flats)
        return
    row = first[0].numel()
    if row >= limit:
        for index in range(first.shape[0]):
            yield from pieces(tuple(t[index] for t in tensors), limit)
        return
    step = limit // row
    for begin in range(0, first.shape[0], step):
        yield tuple(t[begin : begin + step].reshape(-1) for t in tensors)


def abs_key(value: float, dtype: torch.dtype) -> int:
    """The integer key of ``|value|`` rounded to ``dtype``, as :func:`select_abs` orders them."""
    bits = torch.tensor(abs(value), dtype=dtype).view(_INT_VIEW[dtype])
    return int(bits)


class _Keys:
    """The keys of one chunk at a time (``|x|``'s bits as integers, excluded entries at the top),
    in buffers allocated once: the memory of every pass is one chunk."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.int_dtype = dtype, _INT_VIEW[dtype]
        self.bits = torch.finfo(dtype).bits - 1  # the sign bit is cleared
        self.top = (1 << self.bits) - 1  # the largest key: excluded entries sort last
        self.chunk = CHUNK_BYTES // self.int_dtype.itemsize
        self.keys = torch.empty(self.chunk, dtype=self.int_dtype, device=device)
        self.converted: torch.Tensor | None = None
        self.device = device

    def of(self, values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        n = values.numel()
        if values.dtype != self.dtype or values.device != self.device:
            if self.converted is None:
                self.converted = torch.empty(self.chunk, dtype=self.dtype, device=self.device)
            values = self.converted[:n].copy_(values)
        keys = self.keys[:n]
        torch.bitwise_and(values.view(self.int_dtype), self.top, out=keys)
        if keep is not None:
            keys.masked_fill_(keep.to(self.device).logical_not(), self.top)
        return keys


def _promoted(sources: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in sources))
    if dtype not in _INT_VIEW:
        raise ValueError(f"kth_smallest_abs needs floating-point tensors, got {dtype}")
    return dtype


def _chunks(
    tensors: Sequence[torch.Tensor], keeps: Sequence[torch.Tensor] | None, limit: int
) -> Callable[[], Iterable[Piece]]:
    def read() -> Iterator[Piece]:
        for index, tensor in enumerate(tensors):
            if keeps is None:
                for (piece,) in pieces((tensor.detach(),), limit):
                    yield piece, None
            else:
                keep = keeps[index].reshape(tensor.shape) if keeps[index].shape != tensor.shape else keeps[index]
                yield from pieces((tensor.detach(), keep), limit)

    return read


@torch.no_grad()
def select_abs(tensors: Sequence[torch.Tensor], k: int, keeps: Sequence[torch.Tensor] | None = None) -> Rank:
    """The exact ``k``-th smallest ``|x|`` (1-based) over all ``tensors`` taken together, counting
    only the entries where ``keeps`` (bool, one per entry, same numel) is True when given.

    Equal to ``torch.cat([t.flatten() for t in tensors]).abs().kthvalue(k)`` bit for bit (mixed
    float dtypes in their promoted dtype; ``-0.0`` reads as ``0.0``), with ``below``/``at`` the
    counted entries strictly below and equal to it. Tensors may have any shapes and sizes and live
    on any one device. Cost: two passes over the data for float32, each one ``bincount`` per chunk;
    memory: at most :data:`MAX_EXTRA_BYTES`, whatever the size.

    Raises:
        ValueError: when ``k`` is not in ``[1, number of counted entries]`` or a dtype is not float.
    """
    tensors = list(tensors)
    counted = sum(t.numel() for t in tensors)
    if keeps is not None:
        counted = sum(int(torch.count_nonzero(keep)) for keep in keeps)
    if not 1 <= k <= counted:
        raise ValueError(f"k={k} must be in [1, {counted}]")
    keys = _Keys(_promoted(tensors), tensors[0].device)
    read = _chunks(tensors, keeps, keys.chunk)
    total = sum(t.numel() for t in tensors)
    if total <= SMALL:
        return _sorted(keys, read, k)
    return _radix(keys, read, k)


def _sorted(keys: _Keys, read: Callable[[], Iterable[Piece]], k: int) -> Rank:
    every = torch.cat([keys.of(values, keep).clone() for values, keep in read()])
    return _rank_in(keys, every, k, 0)


def _rank_in(keys: _Keys, candidates: torch.Tensor, k: int, below: int) -> Rank:
    """The ``k``-th smallest of ``candidates`` (keys), ``below`` keys lying under all of them."""
    key = candidates.kthvalue(k).values
    below += int(torch.count_nonzero(candidates < key))
    return Rank(_value(keys, int(key)), below, int(torch.count_nonzero(candidates == key)))


def _value(keys: _Keys, key: int) -> float:
    return float(torch.tensor(key, dtype=keys.int_dtype).view(keys.dtype).item())


def _histogram(
    keys: _Keys, read: Callable[[], Iterable[Piece]], shift: int, width: int, prefix: int | None
) -> torch.Tensor:
    """Counts (``2**width`` bins) of the ``width``-bit field at ``shift`` of the keys, among those
    whose higher bits are ``prefix`` (``None``: the first pass, no higher bits)."""
    bins = 1 << width if prefix is None else (1 << width) + 2
    base = 0 if prefix is None else (prefix << width) - 1  # under the prefix -> <= 0, above -> > 2**width
    counts = torch.zeros(bins, dtype=torch.long, device=keys.device)
    for values, keep in read():
        field = keys.of(values, keep)
        if shift:
            field.bitwise_right_shift_(shift)
        if prefix is not None:
            # Wrap-around here can only send a key above the prefix to bin 0, which is not read.
            field.sub_(base).clamp_(0, bins - 1)
        counts += torch.bincount(field, minlength=bins)
    return counts if prefix is None else counts[1:-1]


def _gather(keys: _Keys, read: Callable[[], Iterable[Piece]], shift: int, prefix: int, size: int) -> torch.Tensor:
    """The ``size`` keys whose bits above ``shift`` are ``prefix``, copied into one chunk."""
    out = torch.empty(size, dtype=keys.int_dtype, device=keys.device)
    filled = 0
    for values, keep in read():
        field = keys.of(values, keep)
        chosen = field[(field >> shift) == prefix]
        out[filled : filled + chosen.numel()] = chosen
        filled += chosen.numel()
    return out


def _radix(keys: _Keys, read: Callable[[], Iterable[Piece]], k: int) -> Rank:
    prefix, decided, below = 0, 0, 0  # the answer's high bits found so far, how many, keys under them
    width = keys.bits - RADIX_BITS * ((keys.bits - 1) // RADIX_BITS)  # the first field: 15 bits
    while decided < keys.bits:
        shift = keys.bits - decided - width
        counts = _histogram(keys, read, shift, width, prefix if decided else None)
        cumulative = counts.cumsum(0)
        bucket = int(torch.searchsorted(cumulative, torch.tensor([k], device=keys.device)).item())
        under = int(cumulative[bucket - 1]) if bucket else 0
        k, below = k - under, below + under
        prefix, decided = (prefix << width) | bucket, decided + width
        inside, width = int(counts[bucket]), RADIX_BITS
        if shift > RADIX_BITS and inside <= keys.chunk:
            # Two or more passes left (float64): one gathering pass and a sort of the bucket end it.
            return _rank_in(keys, _gather(keys, read, shift, prefix, inside), k, below)
    return Rank(_value(keys, prefix), below, inside)


@torch.no_grad()
def count_abs(tensor: torch.Tensor, threshold: float, keep: torch.Tensor | None = None) -> tuple[int, int]:
    """How many ``|x|`` of ``tensor`` (where ``keep`` is True, when given) lie below ``threshold``
    (finite, >= 0) and how many equal it, compared in the tensor's dtype (``threshold`` rounded to
    it, as ``torch.abs(tensor) < threshold`` does). One pass in chunks; memory: one chunk."""
    keys = _Keys(_promoted([tensor]), tensor.device)
    key = abs_key(threshold, keys.dtype)
    below = torch.zeros((), dtype=torch.long, device=keys.device)
    at = torch.zeros((), dtype=torch.long, device=keys.device)
    for values, kept in _chunks([tensor], None if keep is None else [keep], keys.chunk)():
        chunk = keys.of(values, kept)
        below += torch.count_nonzero(chunk < key)
        at += torch.count_nonzero(chunk == key)
    return int(below), int(at)


def kth_smallest_abs(tensors: Sequence[torch.Tensor], k: int) -> float:
    """The exact ``k``-th smallest ``|x|`` (1-based) over all ``tensors`` taken together: the value
    of :func:`select_abs`, equal to ``torch.kthvalue`` of the concatenation bit for bit.

    Raises:
        ValueError: when ``k`` is not in ``[1, total number of elements]`` or a dtype is not float.
    """
    return select_abs(tensors, k).value


def kth_smallest(tensors: Sequence[torch.Tensor], k: int) -> float:
    """The exact ``k``-th smallest value (1-based) over all ``tensors`` taken together.

    ``-inf`` marks entries already decided (pruned); the other values are scores, which must be
    >= 0 above :data:`SMALL` elements, where the radix selection of :func:`select_abs` runs, with
    the ``-inf`` entries left out (the ``k``-th smallest finite score is then the
    ``(k - count of -inf)``-th). Up to :data:`SMALL` elements, one ``kthvalue`` of a float64 copy.
    """
    tensors = [t.detach() for t in tensors]
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} must be in [1, {total}]")
    if total <= SMALL:
        device = tensors[0].device
        return float(torch.cat([t.reshape(-1).to(device, torch.float64) for t in tensors]).kthvalue(k).values)
    decided = sum(int(torch.count_nonzero(torch.isneginf(t))) for t in tensors)
    if k <= decided:
        return -math.inf
    return select_abs(tensors, k - decided).value


@torch.no_grad()
def drop_abs(tensor: torch.Tensor, keep: torch.Tensor, threshold: float, ties: int) -> None:
    """Turn ``keep`` (bool, flat, contiguous, one per entry of ``tensor``) off where ``|x|`` lies
    below ``threshold`` (finite, >= 0; compared as :func:`count_abs` does), and at the first
    ``ties`` entries (index order) still on where ``|x|`` equals it. One pass in chunks, in place;
    memory: one chunk."""
    if not keep.is_contiguous() or keep.numel() != tensor.numel():
        raise ValueError("drop_abs needs a contiguous keep vector with one entry per element")
    keys = _Keys(_promoted([tensor]), tensor.device)
    key = abs_key(threshold, keys.dtype)
    flat, begin = keep.reshape(-1), 0
    for (values,) in pieces((tensor.detach(),), keys.chunk):
        kept = flat[begin : begin + values.numel()]
        begin += values.numel()
        chunk = keys.of(values, None)
        kept &= chunk >= key
        if ties:
            at = kept & (chunk == key)
            found = int(torch.count_nonzero(at))
            if found > ties:
                at &= at.cumsum(0) <= ties
                found = ties
            kept &= ~at
            ties -= found
