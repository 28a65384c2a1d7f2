"""Name -> constraint class: the registry behind ``rules[].name`` in configs.

    from plugins import register_constraint
    from plugins.constraints import Constraint

    @register_constraint("row_sum_one")
    class RowSumOne(Constraint):
        def forward(self, x):
            return x / x.sum(dim=-1, keepdim=True)

A registered name is usable from YAML at once (``constraints.rules=[{name: row_sum_one}]``); the
arguments under ``args`` are checked against the class's ``__init__`` signature and annotations.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from plugins.errors import ConfigError

__all__ = ["register_constraint", "registered", "get_constraint", "build_constraint"]

_REGISTRY: dict[str, type[nn.Module]] = {}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def register_constraint(
    name: str, cls: type[nn.Module] | None = None, *, replace: bool = False
) -> Callable[[type[nn.Module]], type[nn.Module]] | type[nn.Module]:
    """Add a constraint class to the registry under ``name``; a decorator when ``cls`` is omitted.

    The class is an ``nn.Module`` parametrization (ideally a
    :class:`~plugins.constraints.Constraint`) whose ``__init__`` takes the rule's ``args`` as
    keyword arguments. Registering another class under a taken name needs ``replace=True``.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError("register_constraint.name", name, "a name of letters, digits, _ . -")

    def add(klass: type[nn.Module]) -> type[nn.Module]:
        if not (isinstance(klass, type) and issubclass(klass, nn.Module)):
            raise ConfigError(f"register_constraint({name!r})", klass, "an nn.Module subclass")
        old = _REGISTRY.get(name)
        same = old is not None and (old.__module__, old.__qualname__) == (
            klass.__module__,
            klass.__qualname__,
        )
        if old is not None and not same and not replace:
            raise ConfigError(
                f"register_constraint({name!r})",
                klass.__qualname__,
                f"a new name ({name!r} is {old.__module__}.{old.__qualname__}; "
                "pass replace=True to override it)",
            )
        klass.name = name
        _REGISTRY[name] = klass
        return klass

    return add if cls is None else add(cls)


def registered() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def get_constraint(name: Any, key: str = "name") -> type[nn.Module]:
    """The class registered under ``name``; ConfigError listing the registered names otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(key, name, f"one of the registered constraints: {', '.join(registered())}")
    return _REGISTRY[name]


def _type_ok(value: Any, expected: Any) -> bool:
    """Whether ``value`` fits a simple annotation (float, int, bool, str, their unions, Any)."""
    if expected is Any or expected is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(expected))
    if origin is typing.Literal:
        return value in typing.get_args(expected)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True  # generics (list[int], ...): left to the constructor


def _describe(expected: Any) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(expected))
    if typing.get_origin(expected) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(expected)))
    if expected is type(None):
        return "null"
    return f"a {getattr(expected, '__name__', expected)}"


def check_args(cls: type[nn.Module], args: Mapping[str, Any], key: str) -> None:
    """Argument names and simple types against ``cls.__init__``; ConfigError at ``{key}.args.X``."""
    own_init = cls.__init__ not in (nn.Module.__init__, object.__init__)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:] if own_init else []
    named = {
        p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no type checks
        hints = {}
    for arg, value in args.items():
        if arg not in named:
            if open_ended:
                continue
            raise ConfigError(
                f"{key}.args.{arg}", value, f"an argument of {cls.name}: {', '.join(named) or 'none'}"
            )
        expected = hints.get(arg, named[arg].annotation)
        if not _type_ok(value, expected):
            raise ConfigError(f"{key}.args.{arg}", value, _describe(expected))
    missing = [n for n, p in named.items() if p.default is p.empty and n not in args]
    if missing:
        raise ConfigError(f"{key}.args.{missing[0]}", None, f"a value (required by {cls.name})")


def build_constraint(name: Any, args: Mapping[str, Any] | None = None, key: str = "rule") -> nn.Module:
    """A fresh instance of the constraint ``name`` with ``args``; every mistake is a ConfigError
    whose key starts with ``key`` (``constraints.rules[0].args.radius=-1 is not allowed: ...``)."""
    cls = get_constraint(name, f"{key}.name")
    args = dict(args or {})
    check_args(cls, args, key)
    try:
        return cls(**args)
    except ConfigError as err:
        if err.key.startswith(key):
            raise
        raise ConfigError(f"{key}.args.{err.key}", err.value, err.allowed) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}.args", args, f"arguments {cls.name} accepts ({err})") from None
