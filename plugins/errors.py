"""The one exception type for a user's mistake in a config value or an argument."""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError"]


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
