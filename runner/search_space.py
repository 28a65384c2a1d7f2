"""What a sweeper's search space (``hydra.sweeper.params``) can draw, checked before its first trial.

A search space is typed like any value, but Optuna draws from it one trial at a time: a bound the
config refuses (``sparsity.schedule.end: interval(0.3, 1.5)``) would stop the sweep at whichever
trial first draws past it, with trials already trained. So each key's representative draws are
composed and checked as their jobs will be, before any trial: every value of a ``choice()`` or
``range()``, and both ends of an ``interval()`` (a float interval's upper end just inside it, as
the sampler draws below it). The sweeper's own settings (``n_trials``, ``n_jobs``, ``direction``)
are checked too. Costs one composition and one small model build per draw checked.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from plugins.core.errors import ConfigError
from runner import resolvers  # noqa: F401 - the sweeper's n_jobs is ${jobs_at_once:...}

__all__ = ["SPACE_SYNTAX", "search_space_draws", "check_sweeper_settings"]

#: How to set a search space from the command line: its keys hold dots (``module.lr``), which a
#: dotted override path cannot reach, so the space is given as one mapping.
SPACE_SYNTAX = (
    "a search space given as one mapping, ++hydra.sweeper.params='{module.lr: \"interval(0.001, 0.01)\"}' "
    "(++ adds to or replaces the configured keys; a key with dots cannot be reached by a dotted path)"
)

_DIRECTIONS = ("minimize", "maximize")


def search_space_draws(cfg: DictConfig) -> dict[str, tuple[str, list[tuple[str, Any]]]]:
    """``{key: (its space as written, [(a draw to check as an override value, the value an error
    shows)]}`` for each key of ``hydra.sweeper.params``: an interval's upper end is checked just
    inside it and shown as written. A space Hydra cannot parse is a ConfigError naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
    if not isinstance(params, DictConfig):
        return {}
    parser = OverridesParser.create()
    draws = {}
    for key in params:
        text = str(params[key])
        try:
            override = parser.parse_override(f"{key}={text}")
        except Exception:  # noqa: BLE001 - Hydra's parse errors, as one line
            raise ConfigError(
                f"hydra.sweeper.params.{key}",
                text,
                "a value or a sweep in Hydra's syntax: choice(a,b), range(0,4), interval(0.1,0.5), tag(log, ...)",
            ) from None
        draws[str(key)] = (text, _draws(override))
    return draws


def _draws(override: Any) -> list[tuple[str, Any]]:
    if not override.is_sweep_override():
        return [(override.get_value_element_as_str(), override.value())]
    if override.is_interval_sweep():
        interval = override.value()
        start, end = interval.start, interval.end
        if isinstance(start, int) and isinstance(end, int):
            return [(str(start), start), (str(end), end)]
        return [(repr(float(start)), start), (repr(math.nextafter(float(end), float(start))), end)]
    return list(zip(override.sweep_string_iterator(), override.sweep_iterator(), strict=True))


def check_sweeper_settings(cfg: DictConfig) -> None:
    """An Optuna sweeper's ``n_trials``, ``n_jobs`` and ``direction`` (Optuna would raise a
    traceback after the sweep started, or end with "No trials are completed yet")."""
    sweeper = OmegaConf.select(cfg, "hydra.sweeper", default=None)
    if not isinstance(sweeper, DictConfig) or not str(sweeper.get("_target_", "")).endswith("OptunaSweeper"):
        return
    for name in ("n_trials", "n_jobs"):
        value = sweeper.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"hydra.sweeper.{name}", _plain(value), "a whole number >= 1")
    direction = sweeper.get("direction")
    directions = list(direction) if isinstance(direction, ListConfig) else [direction]
    if not directions or any(d not in _DIRECTIONS for d in directions):
        raise ConfigError(
            "hydra.sweeper.direction", _plain(direction), "minimize or maximize (a list of them for several objectives)"
        )


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
