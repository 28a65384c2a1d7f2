"""The one mechanism for acting on a parameter: ``torch.nn.utils.parametrize``.

A mask is a 0/1 tensor of the parameter's shape (or broadcastable to it, e.g. ``(C, 1, 1, 1)`` for
output channels), held as a buffer of a :class:`Mask` parametrization, so the module computes with
``original * mask``. The hardshrink and structured callbacks both write masks through
:func:`set_mask`; constraints are parametrizations too (``plugins.constraints``), and on one tensor
the order is fixed: constraints first, the mask last, so the mask is what the module finally sees.

Zeros stay zero: :func:`set_mask` also zeroes the stored ``original`` and every optimizer state
tensor at the masked positions. From then on the gradient there is zero (the mask multiplies it),
so SGD with momentum or weight decay, Adam and AdamW all leave those entries exactly at zero, and a
checkpoint written at any moment holds sparse weights. A method that regrows (RigL, SET) replaces
the mask instead (``set_mask(..., regrow=True)``): the entries it turns on start at that exact zero,
with zeroed optimizer state, and a :class:`Mask` can capture the dense gradient it needs to choose
them (:attr:`Mask.capture`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from plugins.core.errors import ConfigError
from plugins.core.in_place_read import read_in_place

__all__ = [
    "Mask",
    "check_compatible",
    "get_mask",
    "stored",
    "ensure_mask",
    "set_mask",
    "share_mask",
    "zero_optimizer_state",
    "bake",
    "sparsity",
    "prune_in_place",
]


class Mask(nn.Module):
    """Parametrization ``x -> x * mask``; costs one elementwise product in forward and backward.

    In the in-place form (:attr:`inplace`, set by :func:`ensure_mask` on a tensor with no other
    parametrization) forward returns ``x`` itself: the stored tensor holds the zeros, and
    :mod:`plugins.core.mask_forms` keeps them there by zeroing the gradient under every 0 of the
    mask before each optimizer step (one elementwise product per step, none in forward; a large
    ``Linear`` on one CPU thread has it done inside its backward, :mod:`plugins.core.masked_linear`).
    The buffer, the checkpoint entries and every other use of the mask are the same in both forms.

    While :attr:`capture` is on, the gradient of the loss with respect to the output (the tensor
    the module computes with) is summed into :attr:`dense_grad` at every backward pass: dense, also
    where the mask is 0, unlike the stored tensor's ``.grad``, which the mask zeroes there. A
    regrowing method switches it on for the steps that choose what grows (one tensor of the
    weight's size while on).
    """

    # Class-level defaults: masks pickled before these existed still load.
    capture: bool = False
    dense_grad: torch.Tensor | None = None
    inplace: bool = False

    def __init__(
        self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32, device=None
    ) -> None:
        super().__init__()
        # Same dtype as the weight: no promotion in forward, and DDP broadcasts it like any buffer.
        self.register_buffer("mask", torch.ones(shape, dtype=dtype, device=device))

    def passes_through(self) -> bool:
        """Whether forward returns its input itself, with no hook to see the call (then the
        module reads the stored tensor directly, :mod:`plugins.core.in_place_read`)."""
        return self.inplace and not self.capture and not self._forward_hooks and not self._forward_pre_hooks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace and not self.capture:
            return x
        out = x * self.mask
        if self.capture and out.requires_grad:
            out.register_hook(self._add_dense_grad)
        return out

    def _add_dense_grad(self, grad: torch.Tensor) -> None:
        # A weight read several times in one forward (tied, or per head) sends one gradient per read.
        grad = grad.detach()
        self.dense_grad = grad.clone() if self.dense_grad is None else self.dense_grad + grad

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        # Assigning a weight keeps it as given; the mask applies on read.
        return x


def get_mask(module: nn.Module, tensor_name: str) -> Mask | None:
    """The :class:`Mask` on ``module.tensor_name``, or ``None``."""
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    for p in module.parametrizations[tensor_name]:
        if isinstance(p, Mask):
            return p
    return None


def stored(module: nn.Module, tensor_name: str) -> list[torch.Tensor]:
    """The tensor ``module.tensor_name`` is stored as, entry for entry: the tensor itself or its
    parametrization's ``original``; none for a parametrization stored as several tensors
    (weight_norm's ``g`` and ``v``), which :func:`check_compatible` refuses a mask on."""
    if not parametrize.is_parametrized(module, tensor_name):
        return [getattr(module, tensor_name)]
    parametrizations = module.parametrizations[tensor_name]
    return [parametrizations.original] if parametrizations.is_tensor else []


def check_compatible(module: nn.Module, tensor_name: str) -> None:
    """Ask every parametrization already on ``module.tensor_name`` whether a mask may follow it.

    A constraint that cannot hold once entries are zeroed (an orthogonal matrix) raises a
    ConfigError from its ``refuse_mask`` unless its rule set ``allow_masked`` (then it warns). A
    parametrization stored as several tensors is refused: :func:`set_mask` has nothing to zero.
    """
    if parametrize.is_parametrized(module, tensor_name):
        parametrizations = module.parametrizations[tensor_name]
        if not parametrizations.is_tensor:
            first = parametrizations[0]
            raise ConfigError(
                f"{getattr(first, 'rule_key', tensor_name)}.name",
                getattr(first, "name", type(first).__name__),
                f"a constraint a mask can follow on {getattr(first, 'target', tensor_name)}: this "
                "one stores the tensor as several (weight_norm: g and v), none holding its "
                "entries, so masked entries cannot be kept at zero where they are stored (exclude "
                "the tensor from one of the two selections)",
            )
        for p in parametrizations:
            refuse = getattr(p, "refuse_mask", None)
            if refuse is not None:
                refuse()


def ensure_mask(
    module: nn.Module, tensor_name: str, shape: tuple[int, ...] | None = None, inplace: bool = False
) -> Mask:
    """Register an all-ones :class:`Mask` on ``module.tensor_name`` unless one is there already.

    ``shape`` defaults to the tensor's own shape; pass a broadcastable one for slice masks. Called
    in ``setup`` so that a checkpoint's state dict (which holds the mask buffers) loads on resume.
    ``inplace`` asks for the in-place form, given only where it is exact: on a tensor that no
    constraint parametrizes (a constraint's output need not keep the stored zeros).
    """
    existing = get_mask(module, tensor_name)
    if existing is not None:
        return existing
    check_compatible(module, tensor_name)
    inplace = inplace and not parametrize.is_parametrized(module, tensor_name)
    tensor = getattr(module, tensor_name)
    mask = Mask(
        tuple(shape) if shape is not None else tuple(tensor.shape),
        dtype=tensor.dtype,
        device=tensor.device,
    )
    parametrize.register_parametrization(module, tensor_name, mask, unsafe=True)
    mask.inplace = inplace
    read_in_place(module, tensor_name)
    return mask


def share_mask(module: nn.Module, tensor_name: str, mask: Mask) -> None:
    """Register ``mask`` (another owner's) on ``module.tensor_name``: for tied tensors, whose owners
    must compute with one mask."""
    parametrize.register_parametrization(module, tensor_name, mask, unsafe=True)
    read_in_place(module, tensor_name)


@torch.no_grad()
def set_mask(
    module: nn.Module,
    tensor_name: str,
    keep: torch.Tensor,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    regrow: bool = False,
) -> None:
    """Drop the entries of ``module.tensor_name`` where ``keep`` is 0 (bool or 0/1, broadcastable).

    A mask only ever drops entries: ``keep`` is intersected with the mask already on the tensor, so
    two callbacks sharing a tensor (hardshrink and structured pruning) never bring back each
    other's zeros. Also zeroes the stored weight, its gradient and the optimizer state at the
    dropped positions, so that nothing brings them back between updates (nor the optimizer step
    that follows an update made between backward and step).

    With ``regrow=True`` the mask becomes ``keep`` itself: entries it turns back on start from the
    stored zero with zeroed optimizer state (and gradient); entries on before and after keep theirs.
    """
    mask = get_mask(module, tensor_name) or ensure_mask(module, tensor_name, tuple(keep.shape))
    new = (keep != 0).to(mask.mask).expand_as(mask.mask)
    if regrow:
        kept = mask.mask * new  # on before and after: nothing of theirs changes
        mask.mask.copy_(new)
    else:
        kept = mask.mask.mul_(new)
    for original in stored(module, tensor_name):
        original.mul_(kept)
        if original.grad is not None:
            original.grad.mul_(kept.to(original.grad))
        zero_optimizer_state(optimizers, original, kept)


@torch.no_grad()
def zero_optimizer_state(
    optimizers: Iterable[torch.optim.Optimizer], param: torch.Tensor, keep: torch.Tensor
) -> None:
    """Zero every state tensor of ``param`` (momentum, Adam moments, ...) where ``keep`` is 0."""
    for optimizer in optimizers:
        state = optimizer.state.get(param)
        if not state:
            continue
        for value in state.values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.mul_(keep.expand_as(value).to(value.dtype))


def bake(model: nn.Module) -> int:
    """Remove every parametrization (masks and constraints), keeping the values they produce.

    The model becomes a plain ``nn.Module`` whose ``state_dict`` loads without this project.
    Returns the number of tensors baked.
    """
    count = 0
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                count += 1
    return count


@torch.no_grad()
def sparsity(tensors: Iterable[torch.Tensor]) -> float:
    """Fraction of exact zeros over all ``tensors`` together."""
    zeros = total = 0
    for t in tensors:
        zeros += int((t == 0).sum())
        total += t.numel()
    return zeros / total if total else 0.0


@torch.no_grad()
def prune_in_place(
    module: nn.Module,
    tensor_name: str,
    keep: torch.Tensor,
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> None:
    """Zero the stored tensor and its optimizer state where ``keep`` is 0, without keeping a mask.

    For callbacks that let pruned weights regrow: the zeros hold until the gradient moves them.
    They reach what the module computes with only through a constraint that sends zero to zero
    (not softplus), and a tensor stored as several (weight_norm) has none to zero.
    """
    for param in stored(module, tensor_name):
        kept = (keep != 0).to(param)
        param.mul_(kept)
        zero_optimizer_state(optimizers, param, kept.expand_as(param))
