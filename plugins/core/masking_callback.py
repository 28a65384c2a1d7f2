"""The Lightning shell of every mask-producing callback, composed of four parts:

- a :class:`~plugins.core.schedules.Schedule`: when, and how much;
- an :class:`~plugins.core.allocation.Allocation`: how much per group (tensor or pruning unit);
- a :class:`~plugins.core.criteria.Criterion`: which entries or slices;
- a :class:`~plugins.core.mask_mechanism.MaskMechanism`: apply, keep, bake.

The shell selects the tensors, runs :func:`~plugins.core.decision.decide` when the schedule is due,
logs, and keeps its position in ``state_dict`` (the masks travel in the checkpoint's
``parametrizations``, see :mod:`plugins.core.checkpoint_form`); with a ``grow`` criterion updates
move elements (dynamic sparse training). A new method is a new part, never a subclass overriding
hooks: ``HardshrinkSparsifier``, ``StructuredPruning`` and ``DynamicSparsifier`` only build parts.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from plugins.core.allocation import Allocation, Cut
from plugins.core.criteria import Criterion
from plugins.core.decision import Group, decide, regrow
from plugins.core.errors import ConfigError
from plugins.core.mask_forms import HeldZeros, check_mask_form, held_zeros, mask_forms
from plugins.core.mask_mechanism import MaskMechanism
from plugins.core.masks import get_mask, sparsity
from plugins.core.peak import check_peak
from plugins.core.plugin import PluginCallback
from plugins.core.refit import forget_baked, mask_again, select_again
from plugins.core.schedules import Schedule, build_schedule, steps_per_epoch
from plugins.core.selection import DEFAULT_MODULE_TYPES, Target, select_parameters

__all__ = ["MaskingCallback"]


class MaskingCallback(PluginCallback):
    """Scheduled masking of selected tensors in any LightningModule: Schedule + Allocation +
    Criterion + MaskMechanism.

    Cost per update: one criterion score and one exact k-th smallest per cut; between updates,
    with persistent masks one elementwise product per selected tensor per optimizer step (in
    place) or per forward and backward (parametrized), none without. With ``grow``, one more
    score and cut per group at each update, and on those steps one captured gradient per
    selected tensor.

    Args:
        schedule: a :class:`Schedule` or a mapping for :func:`build_schedule`.
        criterion: scores the elements (entries or slices); the lowest go.
        allocation: splits the scheduled amount into one cut per group.
        masks: forms the groups and applies, keeps and bakes the decisions.
        include: globs on qualified parameter names.
        exclude: globs to leave out.
        module_types: module class names whose tensors may be selected.
        bake_at_end: remove the mask parametrizations at the end of ``fit``, keeping the zeros.
        count: the scheduled value is a count of elements per group, not a fraction.
        seed: seed of random criteria; ``None`` = the run's global seed (``PL_GLOBAL_SEED``).
        key: the config key that names this callback in error messages and logged metrics.
        grow: regrowth (persistent masks): each update's cut is followed by
            :func:`~plugins.core.decision.regrow` against ``allocation.bounds``. The first update
            prunes before the first step; later ones run just before their step's optimizer step,
            with the dense gradients its backward left in the masks (``Mask.dense_grad``). Logs
            ``regrown``; sparsity is counted by mask (a grown weight is live at 0).
        mask_form: ``auto`` (in place where exact) or ``parametrize`` (:mod:`plugins.core.mask_forms`).
    """

    #: Where ``include``/``exclude``/``module_types`` sit under ``key`` in a config, for errors:
    #: ``sparsity.targets.include``; ``""`` for a callback that takes them as its own arguments.
    targets_key = "targets"

    def __init__(
        self,
        schedule: Schedule | dict[str, Any],
        criterion: Criterion,
        allocation: Allocation,
        masks: MaskMechanism,
        include: list[str] | str = ("*weight*",),
        exclude: list[str] | str = (),
        module_types: list[str] | None = DEFAULT_MODULE_TYPES,
        bake_at_end: bool = True,
        count: bool = False,
        seed: int | None = None,
        key: str = "sparsity",
        grow: Criterion | None = None,
        mask_form: str = "auto",
    ) -> None:
        masks.form = check_mask_form(mask_form, key)
        if grow is not None and not masks.persistent:
            raise ConfigError(f"{key}.grow", type(grow).__name__, "none without persistent masks")
        self.key = key
        self.schedule = build_schedule(schedule, key=f"{key}.schedule")
        self.criterion = criterion
        self.allocation = allocation
        self.masks = masks
        self.include = [include] if isinstance(include, str) else list(include)
        self.exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        self.module_types = list(module_types) if module_types else None
        self.bake_at_end = bake_at_end
        self.count = count
        self.seed = seed
        self.grow = grow
        self.grown: dict[str, int] = {}
        self.value: float | None = None
        self._pending: tuple[int, int, float] | None = None  # a move waiting for its step's backward
        self.targets: list[Target] = []
        self.groups: list[Group] = []
        self.cuts: dict[str, Cut] = {}
        self.last_step = -1
        self.history: list[dict[str, float]] = []
        self.report: dict[str, Any] | None = None
        self._layer_sparsity: dict[str, float] = {}
        self.held: HeldZeros | None = None
        self.forms: dict[str, str] = {}  # selected tensor -> its mask form

    def check_targets(self, targets: list[Target]) -> None:
        """Refuse targets this callback cannot act on (in ``setup``); raise ConfigError naming one."""

    def record(self) -> dict[str, float]:
        """Extra numbers of an update for its history entry and the logged metrics."""
        return {}

    # --- Lightning hooks --------------------------------------------------------------------------

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(key=self.key, include=self.include, exclude=self.exclude)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.targets and not (stage == "fit" and select_again(self)):
            return
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        where = f"{self.key}.{self.targets_key}" if self.targets_key else self.key
        targets = select_parameters(pl_module, self.include, self.exclude, self.module_types, key=where)
        for target in targets:
            if not torch.isfinite(target.raw).all():
                raise ConfigError(
                    f"{self.key}.targets", target.name, "tensors whose values are all finite (found NaN or Inf)"
                )
        self.check_targets(targets)
        self.groups = self.masks.groups(trainer, pl_module, targets, self.key)
        self.allocation.prepare(self.groups)
        self.criterion.prepare(self.groups)
        if self.grow is not None:
            self.grow.prepare(self.groups)
        check_peak(self.schedule, self.allocation, self.groups, self.count, self.key)
        self.masks.install(self.groups, self.key)
        self.held = held_zeros(pl_module)
        names = {t.name for t in targets}
        self.forms = {name: form for name, form in mask_forms(pl_module).items() if name in names}
        self.targets = targets

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self.last_step:
            return  # gradient accumulation: several batches share one optimizer step
        steps = steps_per_epoch(trainer)
        epoch = trainer.current_epoch
        if not self.schedule.due(epoch, step, steps, epoch_start=batch_idx == 0):
            return
        value = self.schedule.value_at(epoch, step, steps)
        self.last_step = step
        if self.grow is not None and self.history:
            self._pending = (step, epoch, value)
            self.masks.capture_gradients(self.groups, True)
            return
        self._update(step, epoch, value, trainer.optimizers)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A schedule in fractions of the run (dynamic sparsity's stop_fraction) learns its length.
        if hasattr(self.schedule, "bind"):
            self.schedule = self.schedule.bind(trainer.estimated_stepping_batches)
        mask_again(self, trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # A move: after its step's backward (the captured gradients), before the step, so that any
        # checkpoint after this batch holds it; set_mask zeroes the gradients it drops.
        if self._pending is not None:
            step, epoch, value = self._pending
            self._pending = None
            self._update(step, epoch, value, trainer.optimizers)
            self.masks.capture_gradients(self.groups, False)
        self.held.zero_gradients(trainer.global_step, optimizer)

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.criterion.observe(self.groups)  # gradient-based criteria accumulate here
        if self.grow is not None:
            self.grow.observe(self.groups)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:
            return
        last = self.history[-1]
        metrics = {f"{self.key}/{k}": float(v) for k, v in last.items() if k not in ("step", "epoch")}
        metrics.update({f"{self.key}/layer/{n}": v for n, v in self._layer_sparsity.items()})
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.masks.persistent and self.history:
            # Without masks the zeros may have grown back since the last update: decide again,
            # so that model.pt and summary.json hold the scheduled sparsity.
            self.apply(self.history[-1]["value"], trainer.optimizers)
            self.history.append({**self.history[-1], "step": trainer.global_step, **self.reached()})
        self.held.check(self.key, trainer.optimizers)
        self.report = self.masks.finish(trainer, pl_module, self.groups, self.bake_at_end)
        forget_baked(self)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "history": list(self.history),
            "seed": self.seed,
            "cuts": {name: [cut.count, cut.threshold] for name, cut in self.cuts.items()},
            "criterion": self.criterion.state_dict(),  # what it accumulated since the last update
            "grow": self.grow.state_dict() if self.grow is not None else {},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict["last_step"])
        self.history = list(state_dict["history"])
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])
        self.cuts = {name: Cut(int(c), float(t)) for name, (c, t) in state_dict.get("cuts", {}).items()}
        self.criterion.load_state_dict(state_dict.get("criterion", {}))
        if self.grow is not None:
            self.grow.load_state_dict(state_dict.get("grow", {}))

    # --- the decision -----------------------------------------------------------------------------

    def _update(self, step: int, epoch: int, value: float, optimizers: list[torch.optim.Optimizer]) -> None:
        self.apply(value, optimizers)
        self.history.append({"step": step, "epoch": epoch, "value": value, **self.reached()})

    def apply(self, value: float, optimizers: list[torch.optim.Optimizer] = ()) -> None:
        """Decide for ``value`` and apply it to every group (zeroes weights and optimizer state);
        with ``grow``, grow back what the update moves (grown entries start at 0, state zeroed)."""
        update = len(self.history)  # in the checkpoint: the same on every rank and after resume
        self.held.check(self.key, optimizers)
        before = {g.name: self.masks.current(g).reshape(-1) for g in self.groups} if self.grow else {}
        self.cuts, keeps = decide(
            self.groups,
            self.criterion,
            self.allocation,
            value,
            self.masks.current,
            count=self.count,
            seed=self.seed or 0,
            update=update,
        )
        if self.grow is not None:
            bounds = self.allocation.bounds({g.name: g.size for g in self.groups}, value, self.count)
            keeps = regrow(self.groups, self.grow, before, keeps, bounds, self.seed or 0, update)
            self.grown = {n: int((keep & ~before[n].to(keep.device)).sum()) for n, keep in keeps.items()}
        self.value = value
        options = {"regrow": True} if self.grow is not None else {}  # mechanisms that never regrow omit it
        self.masks.apply(self.groups, keeps, optimizers, **options)
        self.held.refresh()

    @torch.no_grad()
    def reached(self) -> dict[str, float]:
        """Sparsity actually reached, over all targets (and per target, cached for logging)."""
        self._layer_sparsity = {t.name: sparsity([self._zeros_of(t)]) for t in self.targets}
        out = {"sparsity": sparsity(self._zeros_of(t) for t in self.targets), **self.record()}
        if self.grow is not None:
            out["regrown"] = float(sum(self.grown.values()))
        return out

    def _zeros_of(self, target: Target) -> torch.Tensor:
        # With regrowth a grown weight is live at 0: its mask, not its value, says it is on.
        mask = get_mask(target.module, target.tensor_name) if self.grow is not None else None
        return target.tensor if mask is None else mask.mask.expand(target.raw.shape)

    def summary(self) -> dict[str, Any]:
        """Keys for summary.json: the last scheduled value and the sparsity of the selected tensors."""
        reached = self.history[-1] if self.history else {}
        forms = list(self.forms.values())
        return {
            f"{self.key}/target": reached.get("value"),
            f"{self.key}/selected": sparsity(t.tensor for t in self.targets),
            f"{self.key}/mask_forms": {form: forms.count(form) for form in sorted(set(forms))},
        }
