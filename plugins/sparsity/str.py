"""STR, soft threshold weight reparameterization (Kusupati et al. 2020), steered to a target sparsity.

Each selected weight is computed as ``sign(w) * relu(|w| - sigmoid(s))`` with one learned threshold
parameter ``s`` per tensor: the registered ``soft_threshold`` constraint
(:class:`~plugins.constraints.elementwise.SoftThreshold`), applied through
:class:`~plugins.constraints.WeightConstraints`. The run's optimizer trains ``w`` and ``s`` (with
its weight decay, which raises the thresholds, as in the paper). The paper reaches a sparsity only
through that weight decay and ``s_init``; here a controller does it: before every optimizer step,
every ``s`` moves by ``gain * (goal - reached)``, where ``reached`` is the fraction of zeros over
the selected weights and ``goal`` the schedule's value (from 0 to ``target``). Equal steps in ``s``
scale every threshold alike (``sigmoid(s)`` is about ``exp(s)`` while small), so the differences
between layers that the task taught the thresholds are kept, and each layer's sparsity follows from
its own weights and threshold: the layer-wise budget is not prescribed.

    from plugins.sparsity.str import STRSparsifier
    sparsifier = STRSparsifier(target=0.9, schedule={"kind": "cubic", "begin_epoch": 0, "end_epoch": 10})
    trainer = L.Trainer(callbacks=[sparsifier])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from plugins.constraints.callback import Applied, WeightConstraints
from plugins.core.errors import ConfigError, is_number
from plugins.core.masks import sparsity
from plugins.core.plugin import PluginCallback
from plugins.core.schedules import Schedule, build_schedule, steps_per_epoch
from plugins.core.selection import DEFAULT_MODULE_TYPES, target_settings

__all__ = ["STRSparsifier", "SCHEDULE_KEYS"]

#: The schedule keys a user sets: ``start`` is 0 and ``end`` is ``target``; the goal moves every step.
SCHEDULE_KEYS = ("kind", "begin_epoch", "end_epoch", "steps")


def _globs(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(key, value, "a glob or a list of globs")


class STRSparsifier(PluginCallback):
    """Callback: STR's learned soft thresholds on the selected weights, with a controller that
    brings the fraction of zeros to ``target``, in any LightningModule.

    In ``setup`` (before Lightning builds the optimizer, so that the thresholds are trained by the
    run's own optimizer, with its weight decay) every selected tensor gets the ``soft_threshold``
    parametrization with ``s = s_init``; registering keeps the weights' values. Before every
    optimizer step the callback counts the zeros over the selected weights (``reached``) and adds
    ``gain * (goal - reached)`` to every threshold parameter; ``goal`` follows the schedule from 0
    at ``begin_epoch`` to ``target`` at ``end_epoch`` and stays there, moving every optimizer step
    (before ``begin_epoch`` the controller does nothing).
    The zeros are exact (``|w| <= sigmoid(s)``) and get no gradient, so the sparsity reached is
    the one the weights hold. At the end of fit the parametrizations are baked: the zeros stay
    and ``model.pt`` is a plain model. The controller's state is the thresholds themselves
    (module parameters, in the checkpoint), so a resumed run continues exactly.

    Cost per optimizer step: one evaluation of the parametrizations and a count of the zeros (no
    layer is run). In every forward and backward: the soft threshold, a few elementwise operations
    per selected tensor.

    Logs at each epoch end through ``pl_module.log_dict``: ``{key}/sparsity`` (reached over the
    selected weights), ``{key}/goal`` (the schedule's value now) and ``{key}/threshold/<name>``
    (``sigmoid(s)`` per tensor).

    Args:
        target: the fraction of zeros over the selected weights at the end of the schedule, in
            [0, 1).
        s_init: the threshold parameters' starting value (threshold ``sigmoid(s_init)``; -5 is
            0.0067, below most weights of a freshly initialised layer: the run starts nearly dense).
        schedule: ``{kind, begin_epoch, end_epoch, steps}``: how the goal rises from 0 to
            ``target`` (a registered schedule kind; progress counted in optimizer steps).
            ``None``: the goal is ``target`` from the first step.
        gain: the controller's step: every ``s`` moves by ``gain * (goal - reached)`` per
            optimizer step (> 0; about 1 is stable: the fraction of zeros changes by less than
            ``s`` does).
        targets: ``{include, exclude, module_types}`` for
            :func:`~plugins.core.selection.select_parameters`; default: the weights of
            Conv1d/2d/3d, Linear and MultiheadAttention layers.
        bake_at_end: remove the parametrizations at the end of fit, keeping the zeros.
        key: names this callback in error messages, logged metrics and ``summary.json``.

    Raises:
        ConfigError: for a bad argument (here); a selection that matches nothing, a tensor that
            already carries a mask or holds NaN/Inf (in ``setup``); thresholds the optimizer does
            not train (at the start of fit).
    """

    def __init__(
        self,
        target: float,
        s_init: float = -5.0,
        schedule: Mapping[str, Any] | None = None,
        gain: float = 1.0,
        targets: Mapping[str, Any] | None = None,
        bake_at_end: bool = True,
        key: str = "sparsity",
    ) -> None:
        if not is_number(target) or not 0 <= target < 1:
            raise ConfigError(f"{key}.target", target, "a fraction of zeros in [0, 1)")
        if not is_number(s_init):
            raise ConfigError(f"{key}.s_init", s_init, "a finite number (the threshold is sigmoid(s_init))")
        if not is_number(gain) or gain <= 0:
            raise ConfigError(f"{key}.gain", gain, "a number > 0")
        if not isinstance(bake_at_end, bool):
            raise ConfigError(f"{key}.bake_at_end", bake_at_end, "true or false")
        self.key = key
        self.target = float(target)
        self.schedule = self._build_schedule(schedule)
        self.gain = float(gain)
        targets = target_settings(targets, key)
        self.include = _globs(targets.get("include", ["*weight*"]), f"{key}.targets.include")
        self.exclude = _globs(targets.get("exclude", []), f"{key}.targets.exclude")
        types = targets.get("module_types", list(DEFAULT_MODULE_TYPES))
        if types is not None and (isinstance(types, str) or not isinstance(types, Sequence)):
            raise ConfigError(f"{key}.targets.module_types", types, "a list of module class names or null")
        rule = {
            "name": "soft_threshold",
            "include": self.include,
            "exclude": self.exclude,
            "module_types": list(types) if types else None,
            "args": {"s_init": float(s_init)},
        }
        # The constraint machinery registers, checks and bakes the parametrizations; selection
        # errors name the keys a user of this callback types.
        self.constraints = WeightConstraints([rule], bake_at_end=bake_at_end, key=key)
        self.constraints.rules[0].key = f"{key}.targets"
        self.bake_at_end = bake_at_end
        self.applied: list[Applied] = []
        self.last_step = -1
        self.reached = 0.0
        self.goal = 0.0
        self.history: list[dict[str, float]] = []

    def _build_schedule(self, schedule: Mapping[str, Any] | None) -> Schedule:
        where = f"{self.key}.schedule"
        if schedule is None:
            return Schedule("constant", 0.0, self.target, every_n_steps=1)
        if not isinstance(schedule, Mapping):
            raise ConfigError(where, schedule, f"a mapping with keys among {list(SCHEDULE_KEYS)}, or null")
        unknown = sorted(set(schedule) - set(SCHEDULE_KEYS))
        if unknown:
            raise ConfigError(
                f"{where}.{unknown[0]}",
                schedule[unknown[0]],
                f"keys among {list(SCHEDULE_KEYS)} (the goal goes from 0 to {self.key}.target, every step)",
            )
        return build_schedule({**schedule, "start": 0.0, "end": self.target, "every_n_steps": 1}, key=where)

    # --- Lightning hooks --------------------------------------------------------------------------

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(key=self.key, include=self.include, exclude=self.exclude)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not self.applied and not self.constraints.baked:
            self.applied = self.constraints.apply(pl_module)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trained = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        for a in self.applied:
            if id(a.constraint.s) not in trained:
                raise ConfigError(
                    f"{self.key}.targets",
                    a.target,
                    "tensors whose threshold the run's optimizer trains: build the optimizer in "
                    "configure_optimizers from self.parameters() (Lightning calls it after setup, "
                    "where the thresholds are created)",
                )

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if self.constraints.baked or not self.applied or step == self.last_step:
            return  # one control step per optimizer step, also with several optimizers
        self.last_step = step
        if trainer.current_epoch < self.schedule.begin_epoch:
            return  # before the window the thresholds learn from the task alone, as in the paper
        steps = steps_per_epoch(trainer)
        self.goal = self.schedule.value_at(trainer.current_epoch, step, steps)
        self.control()

    @torch.no_grad()
    def control(self) -> None:
        """Measure the sparsity and move every threshold parameter by ``gain * (goal - reached)``."""
        self.reached = self.selected() or 0.0
        step = self.gain * (self.goal - self.reached)
        for a in self.applied:
            a.constraint.s.add_(step)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.constraints.baked or not self.applied:
            return
        entry = self.record(trainer)
        metrics = {f"{self.key}/{k}": v for k, v in entry.items() if k not in ("step", "epoch")}
        metrics.update({f"{self.key}/threshold/{n}": v for n, v in self.thresholds().items()})
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.constraints.baked or not self.applied:
            return
        self.record(trainer)
        if self.bake_at_end:
            self.constraints.bake()  # leave_parametrized: the exact zeros of the soft threshold stay

    @override
    def state_dict(self) -> dict[str, Any]:
        # The thresholds and stored weights are module parameters: they travel in the checkpoint's
        # ``parametrizations`` (plugins.core.checkpoint_form). Here: the controller.
        return {
            "last_step": self.last_step,
            "goal": self.goal,
            "reached": self.reached,
            "history": list(self.history),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict["last_step"])
        self.goal = float(state_dict.get("goal", 0.0))
        self.reached = float(state_dict.get("reached", 0.0))
        self.history = list(state_dict.get("history", []))

    # --- what it reached --------------------------------------------------------------------------

    @torch.no_grad()
    def record(self, trainer: L.Trainer) -> dict[str, float]:
        """Append (and return) the sparsity reached now and the goal to the history."""
        entry = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "sparsity": self.selected(),
            "goal": self.goal,
        }
        self.history.append(entry)
        return entry

    @torch.no_grad()
    def selected(self) -> float | None:
        """The fraction of zeros over the selected weights as the module computes with them."""
        return sparsity(getattr(a.module, a.tensor_name) for a in self.applied) if self.applied else None

    def thresholds(self) -> dict[str, float]:
        """``sigmoid(s)`` per selected tensor (also after baking: the values it ended with)."""
        return {a.target: a.constraint.threshold() for a in self.applied}

    def summary(self) -> dict[str, Any]:
        """``{key}/target``, ``{key}/selected`` (reached over the selected weights),
        ``{key}/selected_layers``, ``{key}/thresholds`` (``sigmoid(s)`` per tensor) and
        ``{key}/goal`` (the schedule's value at the last optimizer step)."""
        return {
            f"{self.key}/target": self.target,
            f"{self.key}/selected": self.selected(),
            f"{self.key}/selected_layers": {
                a.target: sparsity([getattr(a.module, a.tensor_name)]) for a in self.applied
            },
            f"{self.key}/thresholds": self.thresholds(),
            f"{self.key}/goal": self.goal if self.applied else None,
        }
