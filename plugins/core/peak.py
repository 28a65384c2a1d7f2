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
    below its ``min_keep`` elements (or, as a count, past its size). Of the groups it would empty,
    the message names the one with the fewest elements to spare: the bound the value must meet."""
    sizes = {g.name: g.size for g in groups if g.min_keep}
    peak = max(schedule.start, schedule.end)
    bounds = allocation.bounds(sizes, peak, count)
    emptied = [g for g in groups if bounds.get(g.name, -math.inf) > g.size - g.min_keep]
    if not emptied:
        return
    group = min(emptied, key=lambda g: g.size - g.min_keep)
    least = "one" if group.min_keep == 1 else group.min_keep
    if count:
        allowed = f"a count <= {group.size - group.min_keep}, which leaves at least {least} of {group.describe()}"
    else:
        allowed = f"an amount that leaves at least {least} of {group.describe()}"
    allowed += " (pruning all of them removes the layer)"
    if len(emptied) > 1:
        allowed += f"; {len(emptied)} groups would be emptied, this one has the fewest to spare"
    raise ConfigError(f"{key}.schedule.end", peak, allowed)
