"""The weight gradient of an in-place masked ``nn.Linear``, zeroed under its mask inside backward.

The in-place mask form zeroes each masked gradient once per step (:mod:`plugins.core.mask_forms`).
After backward that pass reads and writes the whole gradient from memory: a 2048x2048 gradient is
16 MiB, far more than a core's cache, and on the MLP 3x2048 this pass is about all the in-place
form costs over a dense step. Here the backward of a masked ``Linear`` computes its weight gradient
in blocks of rows and zeroes each block under the mask right after the matrix product wrote it,
while it is still in cache. In float32 one compiled call walks blocks of about 2 MiB
(:mod:`plugins.core.blocked_gemm`: torch's own BLAS routine, no Python between blocks) and reads
the mask at one bit per weight (:mod:`plugins.core.bit_mask`); in float64, or where that call is
not available, Python drives blocks of about 1 MiB (:data:`BLOCK_BYTES`) under the one-byte mask
(:mod:`plugins.core.byte_mask`). The values are those of autograd's own ``Linear`` backward: the same
products (rows of ``grad_output.T @ input``), then the same product with the mask.

What it costs: one Python call per masked ``Linear`` in forward and in backward (more than its few
lines suggest: the product before it has pushed the interpreter's data out of the cache), and a
copy of the mask at one bit per weight. It is taken only where it is exact and pays, all of these
at once: a module whose forward is ``nn.Linear``'s; its weight of at least one block, owned by it alone, masked in place
(not tied, no capture of the dense gradient); the CPU, float32 or float64, one intra-op thread
(as the one-byte loop); grad mode on, no autocast, not inside ``torch.compile``, ``torch.export``,
a trace or a ``torch.func`` transform, no process group
(DDP all-reduces the gradient afterwards and rewrites the masks at every step). Everywhere else
forward is ``F.linear`` as before, and the pass after backward zeroes the gradient.

The pass after backward is skipped only for a gradient that is exactly the tensor this backward
returned, untouched since (same storage, same version): another contribution (a tied use, a
regularizer on the weight, gradient accumulation, DDP) gives a new tensor or bumps the version, and
that gradient is zeroed by the pass. A double backward (``create_graph=True``) takes autograd's
plain formulas, unmasked, and the pass zeroes the result.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from plugins.core.bit_mask import BitMask
from plugins.core.blocked_gemm import BLOCK_BYTES as FUSED_BLOCK_BYTES
from plugins.core.blocked_gemm import MIN_ROWS, fused_weight_gradient
from plugins.core.byte_mask import ByteMask, compiled_loop, fits_byte_layout

__all__ = ["BLOCK_BYTES", "LinearRoute", "route_linear", "unroute_linear"]

BLOCK_BYTES = 1 << 20
# The route of each routed module; nothing on the module itself (a deepcopy has none: plain forward).
_ROUTES: weakref.WeakKeyDictionary[nn.Module, LinearRoute] = weakref.WeakKeyDictionary()


class LinearRoute:
    """What the backward of one masked ``Linear`` needs: its mask, its one-bit and one-byte copies
    (each made at its first use), and a record of the gradient it last returned. Costs those copies."""

    def __init__(self, mask: nn.Module, byte_mask: ByteMask, enabled: Any) -> None:
        self.mask, self.byte_mask = mask, byte_mask
        self.bit_mask = BitMask()  # the compiled call's copy (blocked_gemm); the byte copy drives Python blocks
        self._enabled = enabled  # a callable: False turns the route off (HeldZeros.byte_loop)
        self._returned: tuple[int, int] | None = None
        self._fits_key: tuple[int, int] | None = None  # the storages _fits was found for
        self._fits = False

    def takes(self, input: torch.Tensor, weight: torch.Tensor) -> bool:
        # Called in every forward, right after the previous layer's product pushed the interpreter
        # out of the cache: what can only change with the tensors' storage is checked once per storage.
        buffer = self.mask._buffers["mask"]
        key = (weight.data_ptr(), buffer.data_ptr())
        if key != self._fits_key:
            self._fits_key = key
            self._fits = weight.numel() * weight.element_size() >= BLOCK_BYTES and fits_byte_layout(weight, buffer)
        return (
            self._fits
            and self._enabled()
            and torch.is_grad_enabled()
            and weight.requires_grad
            and input.is_cpu
            and input.dtype == weight.dtype
            and weight.is_contiguous()
            and not self.mask.capture
            and torch.get_num_threads() == 1
            and not torch.is_autocast_enabled("cpu")
            and not _distributed()
        )

    def weight_gradient(self, grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
        """``grad_output.T @ input`` (both 2-D), zeroed under the mask block by block; recorded."""
        fused = fused_weight_gradient(input.dtype)
        loop = compiled_loop() if fused is None else None
        copy = self.bit_mask if fused is not None else self.byte_mask
        mask = copy.of(self.mask.mask) if fused is not None or loop is not None else None
        if mask is None:  # the mask is not 0/1, or is rewritten every step: the pass will zero it
            self._returned = None
            return grad_output.t().mm(input)
        rows, columns = grad_output.shape[1], input.shape[1]
        grad = torch.empty((rows, columns), dtype=input.dtype, device=input.device)
        flat, transposed = grad.view(-1).numpy(), grad_output.t()
        if fused is not None:
            operands = grad_output.detach().contiguous().numpy(), input.detach().contiguous().numpy()
            fused(flat, *operands, mask, max(MIN_ROWS, FUSED_BLOCK_BYTES // (columns * grad.element_size())))
        else:  # blocks driven from Python (float64, or no BLAS routine to call)
            block, start = max(MIN_ROWS, BLOCK_BYTES // (columns * grad.element_size())), 0
            while start < rows:
                stop = rows if start + block + MIN_ROWS > rows else start + block
                torch.mm(transposed[start:stop], input, out=grad[start:stop])
                loop(flat[start * columns : stop * columns], mask[start * columns : stop * columns])
                start = stop
        self._returned = (grad.data_ptr(), grad._version)
        return grad

    def zeroed(self, grad: torch.Tensor) -> bool:
        """True if ``grad`` is the gradient this route's backward returned, untouched since."""
        returned, self._returned = self._returned, None
        return returned is not None and returned == (grad.data_ptr(), grad._version)


class _MaskedWeightGrad(torch.autograd.Function):
    # The form with ctx in forward (the lighter call): torch.func transforms, which would need
    # setup_context, never take the route (_transforms_active).
    @staticmethod
    def forward(ctx, input, weight, bias, route):
        ctx.save_for_backward(input, weight)
        ctx.route = route
        return F.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        need_input, need_weight, need_bias, _ = ctx.needs_input_grad
        grad_input = grad_output.matmul(weight) if need_input else None
        grad_output = grad_output.reshape(-1, weight.shape[0])
        input = input.reshape(-1, weight.shape[1])
        grad_weight = None
        if need_weight:
            if torch.is_grad_enabled():  # create_graph=True: differentiable formulas, zeroed by the pass
                grad_weight = grad_output.t().mm(input)
            else:
                grad_weight = ctx.route.weight_gradient(grad_output, input)
        grad_bias = grad_output.sum(0) if need_bias else None
        return grad_input, grad_weight, grad_bias, None


def _distributed() -> bool:
    # DDP all-reduces the gradient after backward and rewrites the masks at every step.
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _transforms_active() -> bool:
    # torch.func (vmap, grad, per-sample gradients): the plain forward, which they know how to transform.
    return bool(getattr(torch._C, "_are_functorch_transforms_active", lambda: False)())


def _routed_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    weight = self.weight  # read once: through parametrize, each read calls the parametrization
    if not (torch.compiler.is_compiling() or torch.jit.is_tracing() or _transforms_active()):
        route = _ROUTES.get(self)
        if route is not None and route.takes(input, weight):
            return _MaskedWeightGrad.apply(input, weight, self.bias, route)
    return F.linear(input, weight, self.bias)


def _routable(module: nn.Module) -> bool:
    # parametrize gives each parametrized module a class of its own, whose base is the module's
    # class: the forward is set on that class, so it leaves with the last parametrization (bake).
    return (
        isinstance(module, nn.Linear)
        and parametrize.is_parametrized(module, "weight")
        and module.__class__.__bases__[0].forward is nn.Linear.forward
        and vars(module.__class__).get("forward", _routed_forward) is _routed_forward
    )


def route_linear(module: nn.Module, mask: nn.Module, byte_mask: ByteMask, enabled: Any) -> LinearRoute | None:
    """Route the weight gradient of ``module`` (an in-place masked ``Linear``) through
    :class:`LinearRoute`; ``None`` (nothing changed) for a module this does not fit."""
    if not _routable(module):
        return None
    route = _ROUTES.get(module)
    if route is None or route.mask is not mask or route.byte_mask is not byte_mask:
        route = _ROUTES[module] = LinearRoute(mask, byte_mask, enabled)
    module.__class__.forward = _routed_forward
    return route


def unroute_linear(module: nn.Module) -> None:
    """Back to the plain forward for ``module`` (its mask left the in-place form)."""
    _ROUTES.pop(module, None)
