"""One schedule library for every callback: training progress (epoch or step) -> a value.

A schedule is active between ``begin_epoch`` and ``end_epoch`` (both inclusive). It updates at the
start of every epoch in that window, or every ``every_n_steps`` optimizer steps when that is set.
Inside the window, progress ``t`` runs from 0 (at ``begin_epoch``) to 1 (at ``end_epoch``) and the
value is ``shape(kind, start, end, t)``; before the window nothing happens, after it the value stays
at ``end``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from plugins.errors import ConfigError

__all__ = ["KINDS", "Schedule", "shape", "build_schedule"]

KINDS = ("constant", "linear", "cosine", "exponential", "step", "cubic")


def shape(kind: str, start: float, end: float, t: float, steps: int = 4) -> float:
    """The value of a schedule of ``kind`` at progress ``t`` in [0, 1] (clamped).

    - ``constant``: ``end`` throughout.
    - ``linear``: ``start + (end - start) * t``.
    - ``cosine``: half a cosine from ``start`` to ``end``.
    - ``exponential``: geometric, ``start * (end / start) ** t`` (both non-zero, same sign).
    - ``step``: ``steps`` equal plateaus from ``start``, reaching ``end`` at ``t = 1``.
    - ``cubic``: Zhu & Gupta (2017), ``end + (start - end) * (1 - t) ** 3``.
    """
    t = min(max(t, 0.0), 1.0)
    if kind == "constant":
        return end
    if kind == "linear":
        return start + (end - start) * t
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    if kind == "exponential":
        return start * (end / start) ** t
    if kind == "step":
        return start + (end - start) * math.floor(t * steps + 1e-12) / steps
    if kind == "cubic":
        return end + (start - end) * (1.0 - t) ** 3
    raise ConfigError("schedule.kind", kind, f"one of {', '.join(KINDS)}")


@dataclass(frozen=True)
class Schedule:
    """When a callback updates and to what value; pure, so it costs nothing to evaluate.

    Args:
        kind: one of ``KINDS``.
        start: value at ``begin_epoch``.
        end: value at ``end_epoch`` and after.
        begin_epoch: first epoch of the window (inclusive).
        end_epoch: last epoch of the window (inclusive); the final value is set at its start.
        every_n_steps: update every N optimizer steps inside the window; ``None`` = once per epoch.
        steps: number of plateaus for ``kind="step"``.
    """

    kind: str = "constant"
    start: float = 0.0
    end: float = 0.0
    begin_epoch: int = 0
    end_epoch: int = 0
    every_n_steps: int | None = None
    steps: int = 4

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError("schedule.kind", self.kind, f"one of {', '.join(KINDS)}")
        for key in ("start", "end"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"schedule.{key}", value, "a finite number")
        for key in ("begin_epoch", "end_epoch"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"schedule.{key}", value, "an integer >= 0")
        if self.end_epoch < self.begin_epoch:
            raise ConfigError(
                "schedule.end_epoch", self.end_epoch, f">= begin_epoch ({self.begin_epoch})"
            )
        if self.every_n_steps is not None and (
            isinstance(self.every_n_steps, bool)
            or not isinstance(self.every_n_steps, int)
            or self.every_n_steps < 1
        ):
            raise ConfigError("schedule.every_n_steps", self.every_n_steps, "null or an integer >= 1")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError("schedule.steps", self.steps, "an integer >= 1")
        if self.kind == "exponential" and (self.start == 0 or self.end == 0 or self.start * self.end < 0):
            raise ConfigError(
                "schedule.start", self.start, "for kind=exponential, start and end non-zero, same sign"
            )

    def value(self, t: float) -> float:
        """The value at progress ``t`` in [0, 1]."""
        return shape(self.kind, self.start, self.end, t, self.steps)

    def progress(self, epoch: int, global_step: int, steps_per_epoch: int) -> float:
        """Progress in [0, 1] through the window at this epoch (or step, in step mode)."""
        if self.every_n_steps is None:
            span = self.end_epoch - self.begin_epoch
            return 1.0 if span == 0 else (epoch - self.begin_epoch) / span
        begin, end = self._step_window(steps_per_epoch)
        return 1.0 if end == begin else (global_step - begin) / (end - begin)

    def due(self, epoch: int, global_step: int, steps_per_epoch: int, epoch_start: bool) -> bool:
        """Whether an update is due now. ``epoch_start`` is true on the first batch of an epoch."""
        if self.every_n_steps is None:
            return epoch_start and self.begin_epoch <= epoch <= self.end_epoch
        begin, end = self._step_window(steps_per_epoch)
        return begin <= global_step <= end and (
            (global_step - begin) % self.every_n_steps == 0 or global_step == end
        )

    def value_at(self, epoch: int, global_step: int, steps_per_epoch: int) -> float:
        """The value for this moment of training: ``start`` before, ``end`` after the window."""
        if epoch < self.begin_epoch:
            return self.value(0.0)
        return self.value(self.progress(epoch, global_step, steps_per_epoch))

    def _step_window(self, steps_per_epoch: int) -> tuple[int, int]:
        return self.begin_epoch * steps_per_epoch, self.end_epoch * steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_schedule(cfg: Any, key: str = "schedule") -> Schedule:
    """Build a :class:`Schedule` from a mapping (a Hydra node or a dict), naming ``key`` in errors."""
    if isinstance(cfg, Schedule):
        return cfg
    if cfg is None:
        raise ConfigError(key, None, "a mapping with kind, start, end, begin_epoch, end_epoch")
    items = dict(cfg)
    allowed = set(Schedule.__dataclass_fields__)
    unknown = sorted(set(items) - allowed)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", items[unknown[0]], f"keys among {sorted(allowed)}")
    try:
        return Schedule(**items)
    except ConfigError as err:
        raise ConfigError(err.key.replace("schedule", key, 1), err.value, err.allowed) from None
