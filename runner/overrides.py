"""A command line of ``train.py`` read as Hydra reads it: its flags and its overrides.

Costs Hydra's parser only; nothing is composed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NoReturn

from plugins.core.errors import ConfigError
from runner.validation import one_line

__all__ = ["parse_flags", "parse_overrides", "typed_key"]


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    """Hydra's own argument parser on ``argv``; an unknown flag is a ConfigError, not argparse's
    usage text and exit."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def refuse(message: str) -> NoReturn:
        unrecognized = message.partition("unrecognized arguments: ")[2].split()
        word = unrecognized[0] if unrecognized else message
        key, _, value = word.partition("=")
        raise ConfigError(
            key, value, f"a flag of Hydra (-m, --cfg, --help, ...) before the overrides KEY=VALUE ({message})"
        )

    parser.error = refuse  # one line instead of argparse's usage and exit
    return parser.parse_args(list(argv))


def parse_overrides(texts: Sequence[str]) -> list[Any]:
    """Each ``KEY=VALUE`` as Hydra's override parser reads it; a malformed one is a ConfigError
    naming its key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for text in texts:
        try:
            parsed.append(parser.parse_override(text))
        except (OverrideParseException, HydraException) as err:
            key, _, value = text.partition("=")
            reason = str(err).splitlines()[1] if len(str(err).splitlines()) > 1 else str(err)
            raise ConfigError(
                key.lstrip("+~") or text, value, f"an override KEY=VALUE in Hydra's syntax ({one_line(reason)})"
            ) from None
    return parsed


def typed_key(override: Any) -> str:
    """The key of an override as typed (``hydra/launcher``, ``model@net``), without ``+``/``~``."""
    return override.key_or_group if override.package is None else f"{override.key_or_group}@{override.package}"
