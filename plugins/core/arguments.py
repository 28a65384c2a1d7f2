"""Arguments checked once, from annotations: every registry entry and every ``_target_`` in a config
goes through :func:`check_arguments`, so a wrong name says the closest valid one and a wrong type
(NaN and Inf included) says what is allowed."""

from __future__ import annotations

import difflib
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from plugins.core.errors import ConfigError

__all__ = ["type_ok", "describe", "accepted_arguments", "unknown_argument", "check_arguments"]


def type_ok(value: Any, expected: Any) -> bool:
    """Whether ``value`` fits a simple annotation (float, int, bool, str, their unions, Literal,
    Any); a float must be finite (NaN and Inf are never a setting). Generics (``list[int]``,
    ``Mapping[str, Any]``) are left to the callee."""
    if expected is Any or expected is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, arg) for arg in typing.get_args(expected))
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True  # generics (list[int], ...): left to the constructor


def describe(expected: Any) -> str:
    """``float | None`` -> "a float or null": what :func:`type_ok` accepts, in words."""
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(expected))
    if typing.get_origin(expected) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(expected)))
    if expected is type(None):
        return "null"
    name = getattr(expected, "__name__", str(expected))
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


_CLOSED = (object.__init__, nn.Module.__init__)


def _hints(fn: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - one unresolvable annotation: resolve the others one by one
        pass
    hints = {}
    namespace = getattr(inspect.unwrap(fn), "__globals__", {})
    for name, annotation in getattr(fn, "__annotations__", {}).items():
        try:
            hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation  # noqa: S307
        except Exception:  # noqa: BLE001 - left unchecked
            continue
    return hints


def accepted_arguments(target: Callable) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """The keyword arguments ``target`` (a class or a function) accepts, their annotations, and
    whether it accepts any other name as well.

    A class whose ``__init__`` takes ``**kwargs`` and passes them up is followed through its bases
    to the ``__init__`` that names them (``DigitsDataModule(**kwargs)`` -> ``batch_size``, ...);
    ``**kwargs`` that no base names (they reach ``object``), or a function's ``**kwargs``, accept
    any name.
    """
    if isinstance(target, type):
        chain = [vars(c)["__init__"] for c in target.__mro__ if "__init__" in vars(c)]
        skip_self = True
    else:
        chain, skip_self = [target], False
    named: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    passed_on = False
    for fn in chain:
        if fn in _CLOSED:
            return named, hints, passed_on  # **kwargs stored by the class itself: any name goes
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            return named, hints, True
        params = params[1:] if skip_self else params
        fn_hints = _hints(fn)
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in named:
                named[p.name] = p
                if p.name in fn_hints:
                    hints[p.name] = fn_hints[p.name]
        passed_on = any(p.kind is p.VAR_KEYWORD for p in params)
        if not passed_on or not skip_self:
            return named, hints, passed_on
    return named, hints, passed_on


def unknown_argument(key: str, names: Sequence[str], label: str) -> str:
    """What is allowed instead of the unknown ``key``: the arguments of ``label`` (all of them when
    few) and the closest one, named as the user would type it."""
    parent, _, word = key.rpartition(".")
    closest = difflib.get_close_matches(word, list(names), n=1, cutoff=0.0)
    if not names:
        return f"an argument of {label}, which takes none"
    listing = f": {', '.join(names)}" if len(names) <= 12 else ""
    hint = f"; closest: {parent + '.' if parent else ''}{closest[0]}" if closest else ""
    return f"an argument of {label}{listing}{hint}"


def check_arguments(target: Callable, args: Mapping[str, Any], key: str, label: str) -> None:
    """Names and simple types of ``args`` against ``target``'s signature and annotations; a mistake
    is a ConfigError at ``{key}.{name}`` naming the closest valid argument."""
    named, hints, open_ended = accepted_arguments(target)
    for arg, value in args.items():
        if arg not in named:
            if open_ended:
                continue
            raise ConfigError(f"{key}.{arg}", value, unknown_argument(f"{key}.{arg}", list(named), label))
        expected = hints.get(arg, named[arg].annotation)
        if not type_ok(value, expected):
            finite = not isinstance(value, float) or math.isfinite(value)
            raise ConfigError(f"{key}.{arg}", value, describe(expected) if finite else "a finite number")
