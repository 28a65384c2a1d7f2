"""One parameter-selection helper for every plugin: globs on names, module types, include/exclude.

Names are the ones a user sees in ``model.named_parameters()`` before any plugin touched the model
(``features.0.weight``), also once a tensor is parametrized (``features.0.parametrizations.weight
.original`` is still selected as ``features.0.weight``).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from plugins.core.errors import ConfigError, SelectionWarning
from plugins.core.masks import stored

__all__ = [
    "Target",
    "DEFAULT_MODULE_TYPES",
    "TARGET_KEYS",
    "target_settings",
    "selection_arguments",
    "select_parameters",
    "resolve_module_types",
    "type_spelling",
]

# MultiheadAttention owns its q/k/v projection (``in_proj_weight``) itself; its output projection
# is a Linear. Leaving it out would leave attention dense without a word.
DEFAULT_MODULE_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Linear", "MultiheadAttention")


@dataclass(frozen=True)
class Target:
    """A selected tensor: its qualified name, the module that owns it and its attribute name.

    ``aliases`` are the other ``(name, module, attribute)`` owners of the same tensor (tied
    weights, such as a language model's embedding and decoder): the tensor is selected, masked and
    counted once, and its mask is shared by every owner so the tie holds."""

    name: str
    module: nn.Module
    tensor_name: str
    aliases: tuple[tuple[str, nn.Module, str], ...] = field(default=(), compare=False)

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


#: The keys of a ``targets`` mapping (``sparsity.targets``) that every sparsifier accepts.
TARGET_KEYS = ("include", "exclude", "module_types")


def target_settings(targets: Any, key: str) -> dict[str, Any]:
    """``targets`` as a dict, refusing a key outside :data:`TARGET_KEYS` (``{key}.targets.<name>``)."""
    targets = dict(targets or {})
    unknown = sorted(set(targets) - set(TARGET_KEYS))
    if unknown:
        raise ConfigError(f"{key}.targets.{unknown[0]}", targets[unknown[0]], f"keys among {list(TARGET_KEYS)}")
    return targets


def selection_arguments(targets: Any, key: str) -> dict[str, Any]:
    """``include``, ``exclude`` and ``module_types`` from a checked ``targets`` mapping, with the
    sparsifiers' defaults (``*weight*``, nothing, :data:`DEFAULT_MODULE_TYPES`)."""
    targets = target_settings(targets, key)
    return {
        "include": targets.get("include", ("*weight*",)),
        "exclude": targets.get("exclude", ()),
        "module_types": targets.get("module_types", DEFAULT_MODULE_TYPES),
    }


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


def type_spelling(module: nn.Module) -> str:
    """The class of ``module`` as ``module_types`` accepts it: ``Linear`` for torch.nn's, the
    dotted path for others (``transformers.pytorch_utils.Conv1D``); parametrize's per-instance
    class is seen through."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls.__name__ if getattr(nn, cls.__name__, None) is cls else f"{cls.__module__}.{cls.__qualname__}"


def _tensors_of(module: nn.Module) -> list[str]:
    names = [n for n, p in module._parameters.items() if p is not None]
    if parametrize.is_parametrized(module):
        names += list(module.parametrizations.keys())
    return names


def select_parameters(
    model: nn.Module,
    include: Sequence[str] = ("*weight*",),
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
    if not include:  # else the empty selection would be blamed on exclude
        raise ConfigError(f"{key}.include", list(include), "a non-empty list of globs (['*weight']: every weight)")
    owned = _all_tensors(model)
    candidates = [t for t in owned if not types or isinstance(t.module, types)]
    chosen: list[Target] = []
    for pattern in include:
        hits = [t for t in candidates if fnmatch.fnmatchcase(t.name, pattern)]
        if not hits:
            shown = ", ".join(t.name for t in candidates[:8]) or "none"
            # Nothing of the selected types: say what the glob would match in other modules.
            others = [t for t in owned if t not in candidates and fnmatch.fnmatchcase(t.name, pattern)]
            other_types = ""
            if others and not candidates:
                named = ", ".join(f"{t.name} ({type_spelling(t.module)})" for t in others[:4])
                other_types = f"; of other module types: {named} (add the type to module_types)"
            raise ConfigError(
                f"{key}.include",
                pattern,
                f"a glob matching at least one parameter of the selected module types; "
                f"candidates: {shown}{', ...' if len(candidates) > 8 else ''}{other_types}",
            )
        chosen += [t for t in hits if t not in chosen]
    chosen = [t for t in chosen if not any(fnmatch.fnmatchcase(t.name, p) for p in exclude)]
    if not chosen:
        raise ConfigError(f"{key}.exclude", list(exclude), "a list that leaves at least one parameter")
    lazy = [f"{t.name} ({type(t.module).__name__})" for t in chosen if _is_lazy(t.raw)]
    if lazy:
        names = ", ".join(lazy[:4]) + (" and more" if len(lazy) > 4 else "")
        raise ValueError(
            f"{key}: {names} {'is' if len(lazy) == 1 else 'are'} not initialized yet: a lazy "
            "module has no shape before its first forward, so nothing can be selected in it; run the model "
            "once on an example batch before fit (or exclude it)"
        )
    chosen = _tie(chosen, owned)
    _warn_left_out(owned, chosen, include, exclude, key)
    return chosen


def _is_lazy(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, nn.parameter.UninitializedTensorMixin)


def _all_tensors(model: nn.Module) -> list[Target]:
    """Every (module, tensor) pair of ``model``, parametrized tensors under their plain names."""
    out = []
    for mod_name, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList) or ".parametrizations." in mod_name:
            continue
        for tensor_name in _tensors_of(module):
            out.append(Target(f"{mod_name}.{tensor_name}" if mod_name else tensor_name, module, tensor_name))
    return out


def _tie(chosen: list[Target], owned: list[Target]) -> list[Target]:
    """One target per stored tensor, with the other owners of that tensor as its aliases."""
    owners: dict[int, list[Target]] = {}
    for t in owned:
        owners.setdefault(_storage_id(t), []).append(t)
    out, seen = [], set()
    for t in chosen:
        if _storage_id(t) in seen:
            continue
        seen.add(_storage_id(t))
        others = tuple((o.name, o.module, o.tensor_name) for o in owners[_storage_id(t)] if o.name != t.name)
        out.append(replace(t, aliases=others))
    return out


def _storage_id(target: Target) -> int:
    """What two owners of one tensor share: the stored tensor's id, or for a tensor stored as
    several (weight_norm) its parametrization list's; ``raw`` is then computed anew on every read,
    and a freed temporary's id is soon another's."""
    tensors = stored(target.module, target.tensor_name)
    return id(tensors[0]) if tensors else id(target.module.parametrizations[target.tensor_name])


def _warn_left_out(
    owned: list[Target], chosen: list[Target], include: Sequence[str], exclude: Sequence[str], key: str
) -> None:
    """Name the weight tensors (2-D or more) the globs match but the module types leave out."""
    taken = {t.name for t in chosen} | {name for t in chosen for name, _, _ in t.aliases}
    left = [
        t
        for t in owned
        if t.name not in taken
        and (_is_lazy(t.raw) or t.raw.dim() >= 2)  # a lazy weight's shape is not known yet
        and any(fnmatch.fnmatchcase(t.name, p) for p in include)
        and not any(fnmatch.fnmatchcase(t.name, p) for p in exclude)
    ]
    if left:
        shown = ", ".join(f"{t.name} ({type_spelling(t.module)})" for t in left[:6])
        warnings.warn(
            SelectionWarning(
                f"{key}: {len(left)} weight tensor(s) match the include globs but not the module types, "
                f"and stay untouched: {shown}{', ...' if len(left) > 6 else ''}. Add their types to "
                f"{key}.module_types, or exclude them by name to silence this."
            ),
            stacklevel=3,
        )
