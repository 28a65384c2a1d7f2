"""Zeroing a gradient under its mask while reading one byte of mask per weight, not four.

The in-place mask form zeroes every masked gradient before each optimizer step
(:class:`~plugins.core.mask_forms.HeldZeros`). ``grad.mul_(mask)`` reads the float mask, as many
bytes as the gradient itself, and on a CPU that product is bound by memory, not arithmetic: on
the MLP 3x2048 it is most of what the in-place form costs over a dense step. torch has no fast
product with a narrower mask (a bool or uint8 mask goes through its casting loop, three times
slower than the float product). So a loop compiled by numba (installed with aeon already)
multiplies the gradient by a uint8 copy of the mask: the same product, bit for bit (NaN times 0
stays NaN, -x times 0 is -0.0), for a quarter of the mask's bytes. The pass gets 9% to 13%
cheaper (``benchmarks/bench_gradient_zeroing.py``); in a whole training step that is at most a
point, within the noise of our shared machine (docs/reference/performance.md).

It is used where it pays and is exact: a contiguous float32 or float64 gradient on the CPU, of the
mask's own shape, a mask of only 0s and 1s, and torch on one intra-op thread (the loop runs on
one thread; with several, torch's product splits the work across them and is left to do so).
Everywhere else, GPUs included, the gradient is multiplied by the float mask as before.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["ByteMask", "compiled_loop", "fits_byte_layout", "fits_byte_loop", "zero_under"]

_KERNEL: Any = None
_UNAVAILABLE = object()


def _compile() -> Any:
    import numba

    if numba.config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1: the loop would run in Python, seconds a step
        raise RuntimeError("NUMBA_DISABLE_JIT is set")

    # No on-disk cache: processes of one sweep or one DDP job would write the same cache files.
    @numba.njit(nogil=True, boundscheck=False)
    def multiply(grad: np.ndarray, mask: np.ndarray) -> None:  # pragma: no cover - compiled
        for i in range(grad.size):
            grad[i] = grad[i] * mask[i]

    for dtype in (np.float32, np.float64):  # compile both now, so that a failure shows here
        multiply(np.ones(2, dtype), np.ones(2, np.uint8))
    return multiply


def _kernel() -> Any:
    """The compiled loop, compiled at its first use in this process (about a second), or
    ``_UNAVAILABLE`` where numba cannot be imported or compile it: then one warning, and torch's
    product does the work."""
    global _KERNEL
    if _KERNEL is None:
        try:
            _KERNEL = _compile()
        except Exception as error:  # noqa: BLE001 - any failure of an optional speed-up: say it, then go on
            warnings.warn(
                f"the one-byte gradient mask is off ({type(error).__name__}: {error}); masked gradients are "
                "zeroed by torch's product",
                stacklevel=3,
            )
            _KERNEL = _UNAVAILABLE
    return _KERNEL


class ByteMask:
    """A uint8 copy of one mask buffer, made again whenever the buffer changes (an update, a
    loaded checkpoint: anything that writes it bumps its version). Costs one byte per weight and
    a pass over the mask each time it changes. ``None`` (the float product then does the work)
    for a mask that is not all 0s and 1s or not on the CPU, and for one rewritten at every step,
    as DDP's buffer broadcast does before each forward: a copy per step would cost more than it
    saves."""

    def __init__(self) -> None:
        self._key: tuple[int, int, int] | None = None
        self._bytes: np.ndarray | None = None
        self._built = False
        self._changed_last = False

    def of(self, buffer: torch.Tensor) -> np.ndarray | None:
        key = (id(buffer), buffer._version, buffer.data_ptr())
        if key != self._key:
            every_step = self._changed_last
            self._key, self._changed_last, self._built, self._bytes = key, True, False, None
            if every_step:
                return None
        else:
            self._changed_last = False
        if not self._built:
            self._built = True
            if buffer.device.type == "cpu" and bool(((buffer == 0) | (buffer == 1)).all()):
                self._bytes = self._copy(buffer.detach())
        return self._bytes

    def _copy(self, buffer: torch.Tensor) -> np.ndarray:
        # The copy itself, of a CPU mask of 0s and 1s (a subclass packs it otherwise).
        return buffer.to(torch.uint8).reshape(-1).numpy()


def compiled_loop() -> Any:
    """The compiled ``grad[i] *= mask[i]`` loop (flat arrays), or ``None`` where numba cannot give it."""
    kernel = _kernel()
    return None if kernel is _UNAVAILABLE else kernel


def fits_byte_layout(grad: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether ``grad`` (or the gradient of a tensor like it) is one the loop can zero under ``buffer``."""
    return (
        grad.layout == torch.strided  # a sparse gradient (Embedding(sparse=True)) has no contiguity to ask
        and grad.device.type == "cpu"
        and grad.dtype in (torch.float32, torch.float64)
        and grad.shape == buffer.shape
        and grad.is_contiguous()
    )


def fits_byte_loop(grad: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether the loop may zero ``grad`` under ``buffer`` now: that layout, torch on one thread."""
    return fits_byte_layout(grad, buffer) and torch.get_num_threads() == 1


@torch.no_grad()
def zero_under(grad: torch.Tensor, buffer: torch.Tensor, byte_mask: ByteMask | None) -> bool:
    """``grad *= buffer`` in place; True where the one-byte loop did it, False where torch's
    product did (always without a ``byte_mask``)."""
    if byte_mask is not None and fits_byte_loop(grad, buffer):
        kernel = compiled_loop()  # first: without it, no byte copy is worth holding
        bytes_ = byte_mask.of(buffer) if kernel is not None else None
        if bytes_ is not None:
            kernel(grad.detach().view(-1).numpy(), bytes_)
            return True
    grad.mul_(buffer)
    return False
