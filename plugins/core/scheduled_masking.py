"""The plumbing every mask-producing callback shares: a schedule says when and how much, a
subclass says which entries to keep, and this base applies, remembers, logs and bakes the masks.

The split follows ``torch.ao.pruning``: the subclass is the *sparsifier* (``compute_keep``, a pure
function of the weights and the scheduled value), the :class:`~plugins.core.schedules.Schedule` is the
*scheduler*, and neither patches the other.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.nn.utils import parametrize
from typing_extensions import override

from plugins.core.errors import ConfigError
from plugins.core.masks import ensure_mask, prune_in_place, set_mask, sparsity
from plugins.core.plugin import PluginCallback
from plugins.core.schedules import Schedule, build_schedule
from plugins.core.selection import DEFAULT_MODULE_TYPES, Target, select_parameters

__all__ = ["ScheduledMasking"]


class ScheduledMasking(PluginCallback):
    """Base class: selects tensors in ``setup``, updates their masks when the schedule is due,
    keeps the schedule position in ``state_dict`` (the masks travel in the checkpoint's
    ``parametrizations``, see :mod:`plugins.core.checkpoint_form`), logs sparsity through ``pl_module.log``.

    Cost between updates: one elementwise product per selected tensor in forward and backward
    (the :class:`~plugins.core.masks.Mask` parametrization); none with ``persistent=False``.

    Args:
        schedule: a :class:`Schedule` or a mapping for :func:`build_schedule`.
        include: globs on qualified parameter names.
        exclude: globs to leave out.
        module_types: module class names whose tensors may be selected.
        persistent: keep a mask between updates (zeros stay zero); ``False`` lets them regrow.
        bake_at_end: remove the parametrizations at the end of ``fit``, keeping the masked values.
        key: the config key that names this callback in error messages and logged metrics.
    """

    #: Where ``include``/``exclude``/``module_types`` sit under ``key`` in a config, for errors:
    #: ``sparsity.targets.include``; ``""`` for a callback that takes them as its own arguments.
    targets_key = "targets"

    def __init__(
        self,
        schedule: Schedule | dict[str, Any],
        include: list[str] | str = ("*weight",),
        exclude: list[str] | str = (),
        module_types: list[str] | None = DEFAULT_MODULE_TYPES,
        persistent: bool = True,
        bake_at_end: bool = True,
        key: str = "sparsity",
    ) -> None:
        self.key = key
        self.schedule = build_schedule(schedule, key=f"{key}.schedule")
        self.include = [include] if isinstance(include, str) else list(include)
        self.exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        self.module_types = list(module_types) if module_types else None
        if not isinstance(persistent, bool):
            raise ConfigError(f"{key}.regrow", persistent, "true or false")
        self.persistent = persistent
        self.bake_at_end = bake_at_end
        self.targets: list[Target] = []
        self.last_step = -1
        self.history: list[dict[str, float]] = []
        self._layer_sparsity: dict[str, float] = {}

    # --- to be provided by a subclass -----------------------------------------------------------

    def compute_keep(self, value: float) -> dict[str, torch.Tensor]:
        """Which entries to keep (a 0/1 or bool tensor per target name) for a scheduled value."""
        raise NotImplementedError

    def mask_shape(self, target: Target) -> tuple[int, ...]:
        """The shape of a target's mask: its own shape here; broadcastable for slice masks."""
        return tuple(target.raw.shape)

    def validate_targets(self, targets: list[Target]) -> None:
        """Refuse targets this callback cannot act on; raise ConfigError naming the tensor."""

    # --- Lightning hooks --------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(key=self.key, include=self.include, exclude=self.exclude)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.targets:
            return
        where = f"{self.key}.{self.targets_key}" if self.targets_key else self.key
        self.targets = select_parameters(pl_module, self.include, self.exclude, self.module_types, key=where)
        for target in self.targets:
            if not torch.isfinite(target.raw).all():
                raise ConfigError(
                    f"{self.key}.targets", target.name, "tensors whose values are all finite (found NaN or Inf)"
                )
        self.validate_targets(self.targets)
        if self.persistent:
            for target in self.targets:
                ensure_mask(target.module, target.tensor_name, self.mask_shape(target))
        else:
            _refuse_regrow_under_constraints(self.targets, f"{self.key}.regrow")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self.last_step:
            return  # gradient accumulation: several batches share one optimizer step
        steps_per_epoch = max(int(trainer.num_training_batches // trainer.accumulate_grad_batches), 1)
        epoch = trainer.current_epoch
        if not self.schedule.due(epoch, step, steps_per_epoch, epoch_start=batch_idx == 0):
            return
        value = self.schedule.value_at(epoch, step, steps_per_epoch)
        self.apply(value, trainer.optimizers)
        self.last_step = step
        self.history.append({"step": step, "epoch": epoch, "value": value, **self.reached()})

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
        if self.bake_at_end:
            for target in self.targets:
                if parametrize.is_parametrized(target.module, target.tensor_name):
                    parametrize.remove_parametrizations(
                        target.module, target.tensor_name, leave_parametrized=True
                    )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict["last_step"])
        self.history = list(state_dict["history"])

    # --- shared mechanics -------------------------------------------------------------------------

    def apply(self, value: float, optimizers: list[torch.optim.Optimizer] = ()) -> None:
        """Compute masks for ``value`` and apply them to every target (zeros weights and state)."""
        keep = self.compute_keep(value)
        for target in self.targets:
            if target.name not in keep:
                continue
            if self.persistent:
                set_mask(target.module, target.tensor_name, keep[target.name], optimizers)
            else:
                prune_in_place(target.module, target.tensor_name, keep[target.name], optimizers)

    @torch.no_grad()
    def reached(self) -> dict[str, float]:
        """Sparsity actually reached, over all targets and per target (cached for logging)."""
        self._layer_sparsity = {t.name: sparsity([t.tensor]) for t in self.targets}
        return {"sparsity": sparsity(t.tensor for t in self.targets)}

    def summary(self) -> dict[str, Any]:
        """Keys for summary.json."""
        reached = self.history[-1] if self.history else {}
        return {
            f"{self.key}/target": reached.get("value"),
            f"{self.key}/selected": sparsity(t.tensor for t in self.targets),
        }


def _refuse_regrow_under_constraints(targets: list[Target], key: str) -> None:
    """Without a mask the zeros are written into the stored tensor, and a constraint's output need
    not keep them (softplus maps 0 to log 2): the run would never be sparse while training."""
    for target in targets:
        if parametrize.is_parametrized(target.module, target.tensor_name):
            raise ConfigError(
                key,
                True,
                f"false on {target.name}: a constraint is on it and, without a mask, its output does not "
                "keep the zeros (or exclude the tensor from one of the two selections)",
            )
