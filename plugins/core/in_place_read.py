"""A cheaper read of a tensor whose only parametrization passes it through unchanged.

``torch.nn.utils.parametrize`` turns ``module.weight`` into a property that calls its
``ParametrizationList`` on every read: a module call per parametrization, with scripting, tracing
and caching checks. For a mask in the in-place form (:class:`~plugins.core.masks.Mask` with
``inplace`` on) that call returns the stored tensor itself, and ResNet-18's forward, with 21 masked
weights, paid 0.22 ms a step more for those calls than with the direct read below
(``python benchmarks/bench_mask_overhead.py``, the forward column: +0.52 ms over dense before,
+0.30 ms after). Cost of the direct read: a few dictionary lookups.

:func:`read_in_place` replaces the property, on the class that ``parametrize`` made for that one
module, by one that returns the stored tensor directly while all of these hold at the time of the
read: the tensor has exactly one parametrization, it says it passes its input through
(``passes_through()``), and nothing could see the difference (no forward hook on it, no global
module hook, no ``parametrize.cached()`` block, not scripting). Otherwise it calls ``parametrize``'s
own property, so a constraint added later, a mask switched to the parametrized form or a capture of
the dense gradient read exactly as before. Assignment is ``parametrize``'s. The property leaves with
the parametrization (``remove_parametrizations`` deletes it), so a baked model is a plain module.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.utils import parametrize

__all__ = ["read_in_place"]


def _hooked() -> bool:
    return bool(module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks)


def _fast_property(tensor_name: str, full: property) -> property:
    read_through = full.fget

    def read(self: nn.Module) -> torch.Tensor:
        plist = self._modules["parametrizations"][tensor_name]
        if len(plist) == 1 and plist.is_tensor and not parametrize._cache_enabled:
            only = plist._modules["0"]
            passes = getattr(type(only), "passes_through", None)
            if passes is not None and passes(only) and not _hooked() and not torch.jit.is_scripting():
                return plist.original
        return read_through(self)

    read.read_through = read_through  # marks the property as this one (installed once)
    return property(read, full.fset)


def read_in_place(module: nn.Module, tensor_name: str) -> None:
    """Give the parametrized ``module.tensor_name`` the cheaper read (idempotent)."""
    cls = module.__class__
    current = vars(cls).get(tensor_name)
    if not isinstance(current, property) or hasattr(current.fget, "read_through"):
        return
    setattr(cls, tensor_name, _fast_property(tensor_name, current))
