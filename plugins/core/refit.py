"""A second ``trainer.fit`` with the same masking callback, after the first one baked its masks.

At the end of fit a callback with ``bake_at_end`` removes its masks (the model becomes plain). A
later ``fit`` on the same model (more epochs, or after ``trainer.test(ckpt_path=...)`` loaded
other weights into it) would otherwise run with no mask at all: its zeros unheld and, after
loading an earlier checkpoint, its sparsity below the schedule's, without a word; and the in-place
check would blame the optimizer for masks that no longer exist.

:func:`forget_baked` (at fit end, after baking) and :func:`select_again` let the next ``setup``
of a fit (not of a test) select and mask the model again; :func:`mask_again` (at the start of that
fit) applies the schedule's value for where the trainer stands, as an update in the history. A
compacting callback is left alone: its model has lost the pruned slices, and pruning it again would
prune it twice. Cost: one update per later fit.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from plugins.core.schedules import steps_per_epoch

__all__ = ["forget_baked", "mask_again", "select_again"]


def forget_baked(callback: Any) -> None:
    """After ``callback`` baked its masks at fit end: the next fit selects and masks again (its
    targets stay until then: ``summary()`` reads them)."""
    if callback.bake_at_end and not getattr(callback.masks, "compact", False):
        callback._mask_again = True


def select_again(callback: Any) -> bool:
    """In ``setup``: True (targets and groups dropped) if this fit follows a baked one."""
    if getattr(callback, "_mask_again", False) and callback.targets:
        callback.targets, callback.groups = [], []
        return True
    return False


def mask_again(callback: Any, trainer: L.Trainer) -> None:
    """At the start of a fit that follows a baked one: the schedule's value for this moment."""
    if not getattr(callback, "_mask_again", False) or not callback.targets:
        return
    callback._mask_again = False
    steps = steps_per_epoch(trainer)
    value = callback.schedule.value_at(trainer.current_epoch, trainer.global_step, steps)
    callback._update(trainer.global_step, trainer.current_epoch, value, trainer.optimizers)
    callback.last_step = trainer.global_step
