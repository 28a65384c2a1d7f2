"""A user's mistake as one line: ``error: <key as typed>=<value> is not allowed: <what is allowed>``.

:func:`exit_with` prints it on stderr and exits with status 2, with no traceback. Costs one parse
of the command line (to show a value as it was typed).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from plugins.core.errors import ConfigError
from runner.overrides import parse_flags, parse_overrides, typed_key
from runner.validation import one_line

__all__ = ["as_typed", "error_line", "exit_with"]


def as_typed(key: str) -> str:
    """``constraints.rules[0].args.init`` -> ``constraints.rules.0.args.init``: the key as an
    override spells it."""
    return re.sub(r"\[(\d+)\]", r".\1", key)


def error_line(err: ConfigError, argv: Sequence[str] = ()) -> str:
    """``error: <key as typed>=<value> is not allowed: <what is allowed>``, always one line.

    The value is the one the override in ``argv`` gave that key, as typed, wherever parsing it
    changed how it reads (``seed=1e309`` is read as ``inf``, ``model.widths=abc`` as a list of
    letters by the code that checks it); otherwise its ``repr``."""
    key = as_typed(err.key)
    typed, parsed = _typed_values(argv).get(key, (None, None))
    shown = repr(err.value)
    if typed is not None and typed != str(err.value) and not _one_of(err.value, parsed):
        shown = typed
    return one_line(f"error: {key}={shown} is not allowed: {err.allowed}")


def _one_of(value: Any, typed: Any) -> bool:
    """``value`` is one item of the typed list (the glob of ``include=[a,b]`` that matched nothing):
    that item says more than the whole list."""
    try:
        return isinstance(typed, list) and value is not typed and any(value == item for item in typed)
    except Exception:  # noqa: BLE001 - a value without a plain == (a tensor): not an item
        return False


def exit_with(err: ConfigError, argv: Sequence[str] | None = None) -> NoReturn:
    """A user's mistake: one line on stderr, exit status 2, no traceback (``argv``: the command
    line's arguments, ``sys.argv[1:]`` unless given)."""
    print(error_line(err, sys.argv[1:] if argv is None else argv), file=sys.stderr, flush=True)
    sys.exit(2)


def _typed_values(argv: Sequence[str]) -> dict[str, tuple[str, Any]]:
    """``{key: (value as typed, as Hydra reads it)}`` for the keys typed once in ``argv``, with
    one value (no sweep)."""
    try:
        args = parse_flags(argv)
        overrides = parse_overrides(args.overrides)
    except ConfigError:  # not a command line of train.py (a test runner's): nothing typed
        return {}
    keys = [typed_key(o) for o in overrides]
    return {
        key: (o.input_line.partition("=")[2], o.value())
        for key, o in zip(keys, overrides, strict=True)
        if keys.count(key) == 1 and not o.is_sweep_override() and not o.is_delete()
    }
