"""The check before training that no value of a schedule removes a whole group."""

from __future__ import annotations

import math

from plugins.core.allocation import Allocation
from plugins.core.decision import Group
from plugins.core.errors import ConfigError
from plugins.core.schedules import Schedule

__all__ = ["check_peak"]


def check_peak(schedule: Schedule, allocation: Allocation, groups: list[Group], count: bool, key: str) -> None:
    """ConfigError at ``{key}.schedule.end`` when the schedule's peak value would prune a group
    below its ``min_keep`` elements (or, as a count, past its size)."""
    sizes = {g.name: g.size for g in groups if g.min_keep}
    peak = max(schedule.start, schedule.end)
    bounds = allocation.bounds(sizes, peak, count)
    for group in groups:
        prune = bounds.get(group.name, -math.inf)
        if prune > group.size:
            allowed = f"a count <= {group.describe()}"
        elif prune > group.size - group.min_keep:
            least = "one" if group.min_keep == 1 else group.min_keep
            allowed = (
                f"an amount that leaves at least {least} of {group.describe()} "
                "(pruning all of them removes the layer)"
            )
        else:
            continue
        raise ConfigError(f"{key}.schedule.end", peak, allowed)
