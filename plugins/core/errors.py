"""The one exception type for a user's mistake in a config value or an argument."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["CompactionMismatch", "CompactionWarning", "ConfigError", "SelectionWarning", "is_number"]


class ConfigError(ValueError):
    """A value a user typed is not allowed.

    The message always names the key, the value given and what is allowed, so that ``train.py``
    can print it as one line and exit non-zero before any training happens.
    """

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what every numeric setting must be; NaN and Inf never are."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class SelectionWarning(UserWarning):
    """A tensor the user's globs match is left out of a plugin's selection (by module type)."""


class ScheduleWarning(UserWarning):
    """A schedule's window ends after the run does: its end value is never reached."""


class CompactionWarning(UserWarning):
    """Compaction will remove nothing, or not exactly (a norm that mixes channels)."""


class CompactionMismatch(RuntimeError):
    """The compact model's outputs differ from the masked model's on the example batch."""
