"""One schedule library for every callback: training progress (epoch or step) -> a value.

A schedule is active between ``begin_epoch`` and ``end_epoch`` (both inclusive). It updates at the
start of every epoch in that window, or every ``every_n_steps`` optimizer steps when that is set.
Inside the window, progress ``t`` runs from 0 (at ``begin_epoch``) to 1 (at ``end_epoch``) and the
value is ``shape(kind, start, end, t)``; before the window nothing happens, after it the value stays
at ``end``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from plugins.core.errors import ConfigError
from plugins.core.registry import Registry

__all__ = ["SCHEDULE_KINDS", "ScheduleKind", "Schedule", "shape", "build_schedule", "steps_per_epoch"]


class ScheduleKind(ABC):
    """The shape of a schedule: progress ``t`` in [0, 1] -> a value between ``start`` and ``end``.
    Register a new one with ``@SCHEDULE_KINDS.register("name")``; pure, costs nothing."""

    @abstractmethod
    def __call__(self, start: float, end: float, t: float, steps: int) -> float:
        """The value at progress ``t`` (already clamped to [0, 1])."""

    def check(self, start: float, end: float) -> str | None:
        """Why ``start``/``end`` cannot be used with this kind (a message), or ``None``."""
        return None


SCHEDULE_KINDS: Registry[type[ScheduleKind]] = Registry("schedule kind", ScheduleKind)


@SCHEDULE_KINDS.register("constant")
class Constant(ScheduleKind):
    """``end`` throughout."""

    def __call__(self, start: float, end: float, t: float, steps: int) -> float:
        return end


@SCHEDULE_KINDS.register("linear")
class Linear(ScheduleKind):
    """``start + (end - start) * t``."""

    def __call__(self, start: float, end: float, t: float, steps: int) -> float:
        return start + (end - start) * t


@SCHEDULE_KINDS.register("cosine")
class Cosine(ScheduleKind):
    """Half a cosine from ``start`` to ``end``."""

    def __call__(self, start: float, end: float, t: float, steps: int) -> float:
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


@SCHEDULE_KINDS.register("exponential")
class Exponential(ScheduleKind):
    """Geometric, ``start * (end / start) ** t`` (both non-zero, same sign)."""

    def __call__(self, start: float, end: float, t: float, steps: int) -> float:
        return start * (end / start) ** t

    def check(self, start: float, end: float) -> str | None:
        if start == 0 or end == 0 or start * end < 0:
            return "for kind=exponential, start and end non-zero, same sign"
        return None


@SCHEDULE_KINDS.register("step")
class Step(ScheduleKind):
    """``steps`` equal plateaus from ``start``, reaching ``end`` at ``t = 1``."""

    def __call__(self, start: float, end: float, t: float, steps: int) -> float:
        return start + (end - start) * math.floor(t * steps + 1e-12) / steps


@SCHEDULE_KINDS.register("cubic")
class Cubic(ScheduleKind):
    """Zhu & Gupta (2017), ``end + (start - end) * (1 - t) ** 3``."""

    def __call__(self, start: float, end: float, t: float, steps: int) -> float:
        return end + (start - end) * (1.0 - t) ** 3


def shape(kind: str, start: float, end: float, t: float, steps: int = 4) -> float:
    """The value of a schedule of ``kind`` at progress ``t`` in [0, 1] (clamped)."""
    return SCHEDULE_KINDS.get(kind, "schedule.kind")()(start, end, min(max(t, 0.0), 1.0), steps)


@dataclass(frozen=True)
class Schedule:
    """When a callback updates and to what value; pure, so it costs nothing to evaluate.

    Args:
        kind: a registered :data:`SCHEDULE_KINDS` name.
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
        kind = SCHEDULE_KINDS.get(self.kind, "schedule.kind")()
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
        problem = kind.check(self.start, self.end)
        if problem:
            raise ConfigError("schedule.start", self.start, problem)

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


def steps_per_epoch(trainer: Any) -> int:
    """Optimizer steps in one epoch of ``trainer`` (batches over gradient accumulation, at least 1):
    what a schedule counts in."""
    return max(int(trainer.num_training_batches // trainer.accumulate_grad_batches), 1)
