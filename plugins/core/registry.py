"""One registry helper for every extension point: schedule kinds, pruning criteria, allocations,
norm kinds and constraints. An entry is one class (or function) found by name from YAML; its
arguments are checked once, from its annotations (NaN and Inf refused); an unknown name lists the
registered ones. Adding an entry is one decorated class and, to pick it from the command line, one
YAML file: nothing else is edited.

    from plugins.core.schedules import SCHEDULE_KINDS

    @SCHEDULE_KINDS.register("sqrt")
    class Sqrt(ScheduleKind):
        def __call__(self, start, end, t):
            return start + (end - start) * t ** 0.5
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from plugins.core.arguments import accepted_arguments, check_arguments
from plugins.core.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


class Registry(Generic[T]):
    """Name -> entry for one extension point ``kind`` ("constraint", "criterion", ...).

    Entries must be subclasses of ``base`` when one is given. ``register`` is also a decorator.
    Cost: a dict lookup per ``get``; arguments are checked once per ``build``.
    """

    def __init__(self, kind: str, base: type | None = None, base_name: str | None = None) -> None:
        self.kind = kind
        self.base = base
        self.base_name = base_name or (base.__qualname__ if base is not None else "")
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None, *, replace: bool = False) -> Any:
        """Add ``entry`` under ``name`` (a decorator when ``entry`` is omitted). Another entry
        under a taken name needs ``replace=True``; registering the same class again is a no-op."""
        where = f"register {self.kind}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where}.name", name, "a name of letters, digits, _ . -")

        def add(obj: T) -> T:
            if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
                raise ConfigError(f"{where}({name!r})", obj, f"a subclass of {self.base_name}")
            old = self._entries.get(name)
            same = old is not None and (old.__module__, old.__qualname__) == (obj.__module__, obj.__qualname__)
            if old is not None and not same and not replace:
                raise ConfigError(
                    f"{where}({name!r})",
                    getattr(obj, "__qualname__", obj),
                    f"a new name ({name!r} is {old.__module__}.{old.__qualname__}; pass replace=True to override it)",
                )
            if isinstance(obj, type):
                obj.name = name
            self._entries[name] = obj
            return obj

        return add if entry is None else add(entry)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: Any, key: str) -> T:
        """The entry under ``name``; a ConfigError at ``key`` listing the registered names otherwise."""
        if not isinstance(name, str) or name not in self._entries:
            raise ConfigError(key, name, f"one of the registered {self.kind}s: {', '.join(self.names())}")
        return self._entries[name]

    def build(self, name: Any, args: Mapping[str, Any] | None, key: str, args_key: str | None = None) -> Any:
        """``entry(**args)`` after checking ``args`` against its signature; a mistake is a
        ConfigError naming ``{args_key}.{argument}`` (``args_key`` defaults to ``key``'s parent)."""
        entry: Callable[..., Any] = self.get(name, key)
        args = dict(args or {})
        args_key = args_key if args_key is not None else key.rpartition(".")[0]
        check_arguments(entry, args, args_key, name)
        named, _, _ = accepted_arguments(entry)
        missing = [n for n, p in named.items() if p.default is p.empty and n not in args]
        if missing:
            raise ConfigError(f"{args_key}.{missing[0]}", None, f"a value (required by {name})")
        try:
            return entry(**args)
        except ConfigError as err:
            if err.key.startswith(args_key):
                raise
            raise ConfigError(f"{args_key}.{err.key}", err.value, err.allowed) from None
        except (TypeError, ValueError) as err:
            raise ConfigError(args_key or key, args, f"arguments {name} accepts ({err})") from None
