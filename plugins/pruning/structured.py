"""Structured pruning on a schedule: whole slices (channels) of conv and linear weights.

``method`` names a criterion (:mod:`plugins.pruning.criteria`: random, l1, l2). The scheduled value
is the fraction of slices pruned (a float in [0, 1]) or, when ``schedule.end`` is an integer, their
count. Pruning only grows: a pruned slice stays pruned when the schedule goes down.

Coupling (``dim=0``): masking a conv's output channel leaves the norm after it emitting a constant
(``beta - mean * gamma / std``), so the masked model would differ from its compacted twin. With
``dim=0`` the callback therefore prunes per dependency group, as Torch-Pruning does: the group of
a layer (:func:`plugins.pruning.dependency.coupled_groups`) holds the layers whose outputs are
added to it (residual shortcuts) and the norm layers after them; all of them share one channel
mask, and the layers' biases and the norms' scale and shift are masked too. The group's score for ``l1``/
``l2`` is the norm of the slices of all its layers together. A group must be selected whole (all
its conv/linear layers, or none); the model's output layer cannot lose output channels.

Randomness: the draw for layer group ``g`` at update ``u`` uses a ``torch.Generator`` seeded from
``(seed, u, g)``; ``u`` (the number of updates so far) is in the checkpoint, so every DDP rank and
every resumed run draws the same channels.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from torch.nn.utils import parametrize
from typing_extensions import override

from plugins.core.checkpoint_form import set_compaction_plan
from plugins.core.errors import ConfigError, is_number
from plugins.core.masks import ensure_mask, get_mask, set_mask
from plugins.core.scheduled_masking import ScheduledMasking
from plugins.core.schedules import Schedule
from plugins.core.selection import DEFAULT_MODULE_TYPES, Target
from plugins.pruning.compaction import compact
from plugins.pruning.criteria import CRITERIA, select_slices
from plugins.pruning.units import (
    Unit,
    build_units,
    check_amounts,
    check_schedule_values,
    example_inputs,
    kept_slices,
    refuse_unbaked_constraints,
    settle,
    slices_to_prune,
)

__all__ = ["StructuredPruning", "slices_to_prune", "select_slices"]


class StructuredPruning(ScheduledMasking):
    """Scheduled structured pruning of whole slices, for any LightningModule.

    Args:
        method: a registered criterion (:data:`plugins.pruning.criteria.CRITERIA`): ``random``, ``l1``, ``l2``.
        schedule: a :class:`Schedule` or a mapping; its value is the fraction of slices pruned in
            [0, 1], or a count when ``schedule.end`` is an integer.
        amount: shortcut for a constant schedule from epoch 0 (give this or ``schedule``).
        dim: the dimension whose slices are pruned (0 = output channels, 1 = input channels, ...).
        include: globs on qualified parameter names.
        exclude: globs to leave out (the model's output layer, e.g. ``"*head*"``).
        module_types: module class names whose tensors may be selected.
        seed: seed of the random choice; ``None`` = the run's global seed (``PL_GLOBAL_SEED``).
        couple: with ``dim=0``, prune per dependency group and mask biases and norms too (so the
            masked model equals its compacted twin).
        compact: at the end of ``fit``, remove the pruned channels for real (before ``test``).
        example_input_shape: input shape for tracing when the module has no
            ``example_input_array`` and no datamodule to take a batch from.
        bake_at_end: remove the mask parametrizations at the end of ``fit``.
        key: the config key named in errors and logged metrics.
    """

    targets_key = ""  # include, exclude and module_types are this callback's own arguments

    def __init__(
        self,
        method: str = "l1",
        schedule: Schedule | dict[str, Any] | None = None,
        amount: float | int | None = None,
        dim: int = 0,
        include: list[str] | str = ("*weight",),
        exclude: list[str] | str = (),
        module_types: list[str] | None = DEFAULT_MODULE_TYPES,
        seed: int | None = None,
        couple: bool = True,
        compact: bool = False,
        example_input_shape: list[int] | None = None,
        bake_at_end: bool = True,
        key: str = "pruning",
    ) -> None:
        self.criterion = CRITERIA.get(method, f"{key}.method")()
        if (schedule is None) == (amount is None):
            raise ConfigError(
                f"{key}.amount", amount, "either amount or schedule, not both and not neither"
            )
        if amount is not None:
            if not is_number(amount):
                raise ConfigError(f"{key}.amount", amount, "a fraction in [0, 1] or a whole count")
            schedule = Schedule(kind="constant", start=amount, end=amount)
        super().__init__(
            schedule,
            include,
            exclude,
            module_types,
            persistent=True,
            bake_at_end=bake_at_end,
            key=key,
        )
        self.count_mode = isinstance(self.schedule.end, int)
        check_schedule_values(self.schedule, self.count_mode, key, amount_given=amount is not None)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ConfigError(f"{key}.dim", dim, "an integer dimension (0 = output channels)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ConfigError(f"{key}.seed", seed, "null or an integer >= 0")
        for name, v in (("couple", couple), ("compact", compact)):
            if not isinstance(v, bool):
                raise ConfigError(f"{key}.{name}", v, "true or false")
        if example_input_shape is not None and (
            not isinstance(example_input_shape, (list, tuple))
            or not all(isinstance(d, int) and d > 0 for d in example_input_shape)
        ):
            raise ConfigError(
                f"{key}.example_input_shape", example_input_shape, "null or a list of sizes > 0"
            )
        self.method = method
        self.dim = dim
        self.seed = seed
        self.couple = couple
        self.compact = compact
        self.example_input_shape = list(example_input_shape) if example_input_shape else None
        self.units: list[Unit] = []
        self.compaction: dict[str, Any] | None = None
        self._example: Any = None

    # --- the sparsifier ---------------------------------------------------------------------------

    def mask_shape(self, target: Target) -> tuple[int, ...]:
        shape = [1] * target.raw.dim()
        shape[self.dim % target.raw.dim()] = target.raw.shape[self.dim]
        return tuple(shape)

    def validate_targets(self, targets: list[Target]) -> None:
        """``dim`` must be a dimension of every target. A negative ``dim`` means its positive alias
        (``-4`` on 4-D weights is exactly ``dim=0``, coupling and compaction included): when it
        names one axis for every target it becomes that axis; an alias that is 0 for some targets
        only would prune those without their coupled biases and norms, so it is refused."""
        aliases = {}
        for t in targets:
            ndim = t.raw.dim()
            if not -ndim <= self.dim < ndim:
                raise ConfigError(
                    f"{self.key}.dim",
                    self.dim,
                    f"a dimension of {t.name} (shape {tuple(t.raw.shape)})",
                )
            aliases[t.name] = self.dim % ndim
        axes = set(aliases.values())
        if len(axes) == 1:
            self.dim = axes.pop()
        elif 0 in axes and self.couple:
            first = next(n for n, a in aliases.items() if a == 0)
            other = next(n for n, a in aliases.items() if a != 0)
            raise ConfigError(
                f"{self.key}.dim",
                self.dim,
                f"one axis of every selected tensor ({self.dim} is axis 0 of {first} but axis "
                f"{aliases[other]} of {other}): give it as a positive dim",
            )

    def _keep_of(self, unit: Unit) -> torch.Tensor:
        return kept_slices(unit, self.dim)

    def compute_keep(self, value: float) -> dict[str, torch.Tensor]:
        update = len(self.history)  # in the checkpoint: the same on every rank and after resume
        keep: dict[str, torch.Tensor] = {}
        for index, unit in enumerate(self.units):
            # Seeded by (seed, update, group): every rank and every resumed run draws alike.
            generator = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + update * 10_007 + index) % (2**63 - 1)
            )
            prune = min(slices_to_prune(value, unit.size, self.count_mode), unit.size - 1)
            new = select_slices(
                self.criterion,
                [m.tensor for m in unit.members],
                self.dim,
                self._keep_of(unit),
                prune,
                generator,
            )
            for member in unit.members:
                keep[member.name] = new.view(self.mask_shape(member))
        return keep

    def apply(self, value: float, optimizers: list[torch.optim.Optimizer] = ()) -> None:
        super().apply(value, optimizers)
        self._sync_extras(optimizers)

    def _sync_extras(self, optimizers: list[torch.optim.Optimizer] = ()) -> None:
        for unit in self.units:
            keep = self._keep_of(unit)
            for _, module, tensor_name in unit.extras:
                if get_mask(module, tensor_name) is not None:
                    set_mask(
                        module,
                        tensor_name,
                        keep.to(getattr(module, tensor_name).device),
                        optimizers,
                    )

    # --- set-up: units, coupling, bad input -------------------------------------------------------

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.targets:
            return
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        if self.compact:
            refuse_unbaked_constraints(trainer, self.key)
        super().setup(trainer, pl_module, stage)
        if self.compact or (self.couple and self.dim == 0):
            self._example = example_inputs(trainer, pl_module, self.example_input_shape, self.key)
        self.units = build_units(pl_module, self.targets, self.dim, self.couple, self._example, self.key, self.exclude)
        check_amounts(self.units, self.schedule, self.count_mode, self.dim, self.key)
        for unit in self.units:
            for _, module, tensor_name in unit.extras:
                ensure_mask(module, tensor_name)
        self._sync_extras()

    # --- hooks ------------------------------------------------------------------------------------

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.history:
            kept = {f"{self.key}/kept/{u.name}": float(self._keep_of(u).sum()) for u in self.units}
            pl_module.log_dict(kept, on_step=False, on_epoch=True, sync_dist=False)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Constraints on the same tensors are final by now (WeightConstraints comes first).
        for unit in self.units:
            settle(unit, self.dim, trainer.optimizers)
        super().on_fit_end(trainer, pl_module)
        if self.bake_at_end:
            for unit in self.units:
                for _, module, tensor_name in unit.extras:
                    if parametrize.is_parametrized(module, tensor_name):
                        parametrize.remove_parametrizations(
                            module, tensor_name, leave_parametrized=True
                        )
        if self.compact:
            example = self._example
            if torch.is_tensor(example):
                example = example.to(next(pl_module.parameters()).device)
            _, report = compact(pl_module, example, key=f"{self.key}.compact")
            # The checkpoints stay full width (masked, the same outputs): the compacted module
            # loads them sliced, so trainer.test(ckpt_path="best") works after compaction.
            set_compaction_plan(pl_module, report.pop("kept_indices"))
            self.compaction = report

    def channels(self) -> dict[str, str]:
        """Target name -> "kept/total" slices along ``dim``: the mask's while there is one, then
        those of the final (baked, compacted) weights that are not all zero."""
        out = {}
        for unit in self.units:
            keep = self._keep_of(unit)
            for member in unit.members:
                out[member.name] = f"{int(keep.sum())}/{unit.size}"
        return out

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["seed"] = self.seed
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])
        super().load_state_dict(state_dict)

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out[f"{self.key}/channels"] = self.channels()
        if self.compaction is not None:
            out["compaction"] = {
                k: self.compaction[k]
                for k in ("params_before", "params_after", "macs_before", "macs_after", "speedup")
                if k in self.compaction
            }
        return out
