"""A 0/1 mask packed eight weights to a byte, in planes that a vector loop reads without shuffles.

The fused weight gradient (:mod:`plugins.core.blocked_gemm`) zeroes each block of a masked
``Linear``'s gradient right after the product wrote it. Inside a training step the mask is no
longer in cache by then: the one-byte copy (:mod:`plugins.core.byte_mask`) reads 4 MiB from memory
per 2048x2048 gradient, this one 512 KiB.

Layout: the flat mask in chunks of :data:`CHUNK` (512) weights, each held in :data:`PLANE` (64)
bytes; bit ``p`` of byte ``j`` of a chunk is its weight ``64 * p + j``. A loop over 64 consecutive
weights then reads 64 consecutive bytes with one shift, which the compiler turns into vector code;
bit ``i % 8`` of byte ``i // 8`` would not be. The product is the one-byte loop's: the gradient
times 0.0 or 1.0 (NaN times 0 stays NaN, -x times 0 is -0.0), bit for bit.

Costs a pass over the mask each time it changes (:class:`BitMask`), one bit per weight.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from plugins.core.byte_mask import ByteMask

__all__ = ["CHUNK", "PLANE", "BitMask", "compile_bit_loop", "pack_bits"]

PLANE = 64
CHUNK = 8 * PLANE


def pack_bits(keep: torch.Tensor) -> np.ndarray:
    """``keep`` (0s and 1s, any shape, read flat) in the planar layout above; the last chunk padded with 0s."""
    flat = keep.reshape(-1).to(torch.uint8)
    chunks = -(-flat.numel() // CHUNK)
    padded = torch.zeros(chunks * CHUNK, dtype=torch.uint8)
    padded[: flat.numel()] = flat
    planes = padded.view(chunks, 8, PLANE)
    packed = torch.zeros(chunks, PLANE, dtype=torch.uint8)
    for p in range(8):
        packed |= planes[:, p] << p
    return packed.reshape(-1).numpy()


class BitMask(ByteMask):
    """A copy of one mask buffer in the planar bit layout, made again whenever the buffer changes
    (as :class:`~plugins.core.byte_mask.ByteMask`, whose rules it keeps). Costs one bit per weight."""

    def _copy(self, buffer: torch.Tensor) -> np.ndarray:
        return pack_bits(buffer)


def compile_bit_loop() -> Any:
    """The compiled ``(flat gradient, bits, first)`` loop: ``flat[i] *= bit of weight first + i``.
    ``first`` need not start a chunk. Raises where numba cannot compile it."""
    import numba

    @numba.njit(nogil=True, boundscheck=False)
    def bit(bits, e):  # pragma: no cover - compiled; the bit of flat weight e
        return (bits[(e // CHUNK) * PLANE + e % PLANE] >> np.uint8(e % CHUNK // PLANE)) & np.uint8(1)

    # The head and tail loops are written out, not one shared helper: with the helper (and a range
    # over the whole chunks) numba compiled the whole-chunk loop slower, in a one-off timing.
    @numba.njit(nogil=True, boundscheck=False)
    def multiply(flat, bits, first):  # pragma: no cover - compiled
        n, i = flat.size, 0
        while i < n and (first + i) % CHUNK != 0:  # the head, up to the first whole chunk
            flat[i] = flat[i] * flat.dtype.type(bit(bits, first + i))
            i += 1
        while i + CHUNK <= n:  # whole chunks: 8 planes of 64 weights, one shift each
            chunk = bits[(first + i) // CHUNK * PLANE : (first + i) // CHUNK * PLANE + PLANE]
            for p in range(8):
                plane = flat[i + p * PLANE : i + p * PLANE + PLANE]
                shift = np.uint8(p)
                for j in range(PLANE):
                    plane[j] = plane[j] * flat.dtype.type((chunk[j] >> shift) & np.uint8(1))
            i += CHUNK
        while i < n:  # the tail
            flat[i] = flat[i] * flat.dtype.type(bit(bits, first + i))
            i += 1

    return multiply
