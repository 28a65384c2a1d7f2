"""One parameter-selection helper for every plugin: globs on names, module types, include/exclude.

Names are the ones a user sees in ``model.named_parameters()`` before any plugin touched the model
(``features.0.weight``), also once a tensor is parametrized (``features.0.parametrizations.weight
.original`` is still selected as ``features.0.weight``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from plugins.core.errors import ConfigError
from plugins.core.masks import stored

__all__ = ["Target", "DEFAULT_MODULE_TYPES", "select_parameters", "resolve_module_types"]

DEFAULT_MODULE_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Linear")


@dataclass(frozen=True)
class Target:
    """A selected tensor: its qualified name, the module that owns it and its attribute name."""

    name: str
    module: nn.Module
    tensor_name: str

    @property
    def tensor(self) -> torch.Tensor:
        """The tensor as the module uses it (masked and constrained when parametrized)."""
        return getattr(self.module, self.tensor_name)

    @property
    def raw(self) -> torch.Tensor:
        """The stored tensor: the parametrization's ``original`` when parametrized; for one stored
        as several tensors (weight_norm's g and v), the tensor as computed, which has its shape."""
        tensors = stored(self.module, self.tensor_name)
        return tensors[0] if tensors else getattr(self.module, self.tensor_name)


def resolve_module_types(names: Iterable[str | type], key: str = "module_types") -> tuple[type, ...]:
    """Turn ``"Conv2d"`` or ``"my.pkg.Block"`` into classes; an unknown name is a ConfigError."""
    types: list[type] = []
    for name in names:
        if isinstance(name, type):
            types.append(name)
            continue
        if "." not in name and hasattr(nn, name):
            types.append(getattr(nn, name))
            continue
        module_name, _, cls_name = name.rpartition(".")
        try:
            module = __import__(module_name, fromlist=[cls_name]) if module_name else None
            types.append(getattr(module, cls_name))
        except (ImportError, AttributeError, ValueError):
            raise ConfigError(
                key, name, "a torch.nn class name (Conv2d, Linear, ...) or an importable dotted path"
            ) from None
    return tuple(types)


def _tensors_of(module: nn.Module) -> list[str]:
    names = [n for n, p in module._parameters.items() if p is not None]
    if parametrize.is_parametrized(module):
        names += list(module.parametrizations.keys())
    return names


def select_parameters(
    model: nn.Module,
    include: Sequence[str] = ("*weight",),
    exclude: Sequence[str] = (),
    module_types: Sequence[str | type] | None = DEFAULT_MODULE_TYPES,
    key: str = "targets",
) -> list[Target]:
    """The tensors of ``model`` whose name matches a glob in ``include`` and none in ``exclude``,
    owned by a module of one of ``module_types`` (``None`` or empty = any module).

    Raises:
        ConfigError: when an include glob matches no tensor, or the whole selection is empty.
    """
    if isinstance(include, str):
        include = [include]
    if isinstance(exclude, str):
        exclude = [exclude]
    types = resolve_module_types(module_types or (), f"{key}.module_types")
    candidates: list[Target] = []
    for mod_name, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList) or ".parametrizations." in mod_name:
            continue
        if types and not isinstance(module, types):
            continue
        for tensor_name in _tensors_of(module):
            name = f"{mod_name}.{tensor_name}" if mod_name else tensor_name
            candidates.append(Target(name, module, tensor_name))
    chosen: list[Target] = []
    for pattern in include:
        hits = [t for t in candidates if fnmatch.fnmatchcase(t.name, pattern)]
        if not hits:
            shown = ", ".join(t.name for t in candidates[:8]) or "none"
            raise ConfigError(
                f"{key}.include",
                pattern,
                f"a glob matching at least one parameter of the selected module types; "
                f"candidates: {shown}{', ...' if len(candidates) > 8 else ''}",
            )
        chosen += [t for t in hits if t not in chosen]
    chosen = [t for t in chosen if not any(fnmatch.fnmatchcase(t.name, p) for p in exclude)]
    if not chosen:
        raise ConfigError(f"{key}.exclude", list(exclude), "a list that leaves at least one parameter")
    return chosen
