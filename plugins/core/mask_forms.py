"""The two forms of a mask, and what keeps the in-place one exact.

- ``parametrize``: the :class:`~plugins.core.masks.Mask` multiplies the stored tensor in every
  forward (and so the gradient in every backward): one elementwise product each way, and autograd
  and ``torch.nn.utils.parametrize`` overhead on every read of the weight.
- in place (the default, ``mask_form=auto``, wherever it is exact): the stored tensor itself holds
  the zeros and forward reads it as it is. Between updates :class:`HeldZeros` zeroes the gradient
  under every 0 of the mask right before each optimizer step, after DDP's all-reduce and before
  gradient clipping (Lightning's ``on_before_optimizer_step``). With a zero weight, a zero gradient
  and zero optimizer state (``set_mask`` zeroes the state at each update), SGD (momentum, Nesterov,
  weight decay), Adam, AdamW, RMSprop, Adagrad and Rprop all leave the entry at exactly 0, so the
  forward computes what the parametrized form computes.

The in-place form is not exact where something between the stored tensor and the module reads
it differently: a constraint's parametrization (softplus maps 0 to log 2), so a tensor with a
constraint keeps the parametrized mask (:func:`~plugins.core.masks.ensure_mask` decides). An
optimizer that moves an entry whose gradient and state are 0 (L-BFGS mixes coordinates) is caught
by :meth:`HeldZeros.check` at the next update and at the end of fit: an error naming the tensor,
never a silent drift.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from plugins.core.byte_mask import ByteMask, zero_under
from plugins.core.errors import ConfigError
from plugins.core.masked_linear import LinearRoute, route_linear, unroute_linear
from plugins.core.masks import Mask, get_mask, stored

__all__ = ["MASK_FORMS", "check_mask_form", "mask_forms", "HeldZeros", "held_zeros"]

MASK_FORMS = ("auto", "parametrize")
# One HeldZeros per model, without an attribute on it (nothing extra in a pickled model.pt).
_HELD: weakref.WeakKeyDictionary[nn.Module, HeldZeros] = weakref.WeakKeyDictionary()


def check_mask_form(value: Any, key: str) -> str:
    """``value`` if it is a mask form, else a ConfigError at ``{key}.mask_form``."""
    if value not in MASK_FORMS:
        raise ConfigError(
            f"{key}.mask_form",
            value,
            "auto (in place where exact, else a parametrization) or parametrize (always a parametrization)",
        )
    return value


def _masked_tensors(model: nn.Module):
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name in module.parametrizations.keys():
                mask = get_mask(module, tensor_name)
                if mask is not None:
                    yield f"{name}.{tensor_name}" if name else tensor_name, module, tensor_name, mask


def mask_forms(model: nn.Module) -> dict[str, str]:
    """``{tensor name: "inplace" | "parametrize"}`` for every masked tensor of ``model``."""
    return {name: "inplace" if mask.inplace else "parametrize" for name, _, _, mask in _masked_tensors(model)}


class HeldZeros:
    """The in-place masks of one model, and the two things that keep them exact: the gradient
    zeroed under the mask before each optimizer step, and a check that nothing moved.

    Cost per optimizer step: one elementwise product per in-place masked tensor (its gradient
    times its mask; on a CPU thread it reads a one-byte copy of the mask, see
    :mod:`plugins.core.byte_mask`, which costs one byte per masked weight), no Python per element.
    On one CPU thread, a ``Linear`` weight of at least 1 MiB has its gradient zeroed inside its
    own backward instead, block by block while in cache (:mod:`plugins.core.masked_linear`), and
    that pass is skipped for it. Cost of :meth:`check`: one pass over those tensors, at
    updates and at the end of fit only.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)  # the registry's value must not keep its key alive
        self.pairs: list[tuple[str, torch.Tensor, Mask]] = []
        self._bytes: dict[int, ByteMask] = {}  # by id of the stored tensor
        self.byte_zeroed: set[str] = set()  # the tensors the one-byte loop zeroed at the last step
        self.backward_zeroed: set[str] = set()  # those whose Linear backward zeroed them (masked_linear)
        self._routes: dict[int, LinearRoute] = {}  # by id of the stored tensor
        self._routed: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.byte_loop = True  # False: torch's float product for every tensor (to compare the two)
        self._last: tuple[int, int] | None = None
        self.hooked = False  # whether an optimizer step went through zero_gradients since the last check
        self.refresh()

    def refresh(self) -> None:
        """Find the in-place masks again (after masks were installed or changed form)."""
        pairs, owners = [], {}
        model = self._model()
        for name, module, tensor_name, mask in _masked_tensors(model) if model is not None else ():
            if not mask.inplace:
                continue
            for tensor in stored(module, tensor_name):
                if id(tensor) not in owners:  # tied owners share one stored tensor: zero it once
                    owners[id(tensor)] = []
                    pairs.append((name, tensor, mask))
                owners[id(tensor)].append((module, tensor_name))
        self.pairs = pairs
        self._bytes = {id(tensor): self._bytes.get(id(tensor)) or ByteMask() for _, tensor, _ in pairs}
        self._route(owners)

    def _route(self, owners: dict[int, list[tuple[nn.Module, str]]]) -> None:
        routes, routed = {}, weakref.WeakSet()
        for _, tensor, mask in self.pairs:
            if len(owners[id(tensor)]) == 1 and owners[id(tensor)][0][1] == "weight":  # not tied
                module = owners[id(tensor)][0][0]
                route = route_linear(module, mask, self._bytes[id(tensor)], lambda: self.byte_loop)
                if route is not None:
                    routes[id(tensor)] = route
                    routed.add(module)
        for module in set(self._routed) - set(routed):
            unroute_linear(module)
        self._routes, self._routed = routes, routed

    @torch.no_grad()
    def zero_gradients(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero every in-place masked gradient under its mask, once per (step, optimizer) however
        many masking callbacks ask."""
        token = (step, id(optimizer))
        self.hooked = True
        if token == self._last:
            return
        self._last = token
        self.byte_zeroed, self.backward_zeroed = set(), set()
        for name, tensor, mask in self.pairs:
            route = self._routes.get(id(tensor))
            # A mask capturing the dense gradient multiplies in forward: its gradient is masked.
            if tensor.grad is not None and not mask.capture:
                if route is not None and route.zeroed(tensor.grad):
                    self.backward_zeroed.add(name)
                elif zero_under(tensor.grad, mask.mask, self._bytes[id(tensor)] if self.byte_loop else None):
                    self.byte_zeroed.add(name)

    @torch.no_grad()
    def check(self, key: str, optimizers: list[torch.optim.Optimizer] = ()) -> None:
        """Raise RuntimeError naming the first in-place masked tensor with a nonzero entry under a 0
        of its mask (an optimizer that moves entries at zero gradient and zero state, or a step that
        bypassed Lightning's ``on_before_optimizer_step``)."""
        hooked, self.hooked = self.hooked, False
        for name, tensor, mask in self.pairs:
            moved = int(((tensor != 0) & (mask.mask == 0)).sum())
            if moved and not hooked:
                raise RuntimeError(
                    f"{key}: {moved} masked entries of {name} are no longer 0: the optimizer stepped without "
                    "Lightning's on_before_optimizer_step, where the in-place mask zeroes the gradients (a raw "
                    "torch optimizer under manual optimization: step the one self.optimizers() returns); or set "
                    f"{key}.mask_form=parametrize (the mask then multiplies the weight in forward)"
                )
            if moved:
                names = ", ".join(type(o).__name__ for o in optimizers) or "the optimizer"
                raise RuntimeError(
                    f"{key}: {moved} masked entries of {name} are no longer 0: {names} moved weights whose "
                    f"gradient and state were 0, so the in-place mask is not exact with it; set "
                    f"{key}.mask_form=parametrize (the mask then multiplies the weight in forward)"
                )


def held_zeros(model: nn.Module) -> HeldZeros:
    """The one :class:`HeldZeros` of ``model`` (shared by every masking callback on it), refreshed."""
    held = _HELD.get(model)
    if held is None:
        held = _HELD[model] = HeldZeros(model)
    else:
        held.refresh()
    return held
