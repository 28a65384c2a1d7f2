"""``WeightConstraints``: constraint rules from config, applied as parametrizations, logged, baked.

    from plugins import WeightConstraints
    constraints = WeightConstraints(rules=[
        {"name": "orthogonal", "module_types": ["Conv1d"], "args": {"method": "polar"}},
        {"name": "non_negative", "include": ["net.head.weight"]},
        {"name": "max_norm", "include": ["net.head.weight"], "args": {"radius": 2.0}},
    ])
    trainer = L.Trainer(callbacks=[constraints, sparsifier])   # constraints before masks

Without Lightning (a model transform): ``constraints.apply(model)``, then
``constraints.control()`` before and ``constraints.project()`` after each ``optimizer.step()``, and
``constraints.bake()`` at the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn.utils import parametrize
from typing_extensions import override

from plugins.constraints.applied import Applied, register_rule
from plugins.constraints.base import Constraint
from plugins.constraints.rules import parse_rules
from plugins.core.errors import ConfigError
from plugins.core.history_plot import plot_history
from plugins.core.plugin import PluginCallback
from plugins.core.selection import select_parameters

__all__ = ["WeightConstraints", "Applied"]


class WeightConstraints(PluginCallback):
    """Callback (or model transform): applies constraint rules from the registry to selected
    tensors, keeps projection constraints on their set after each optimizer step, logs each
    constraint's violation, and bakes the constraints in at the end of fit.

    Rules apply in the listed order; several rules on one tensor stack (the first listed is
    applied first to the stored tensor). Parametrizations are registered in ``setup``, before a
    checkpoint's state is loaded, so a resumed run loads into the same structure. On a shared
    tensor, constraints come before masks (train.py builds this callback before the sparsity and
    pruning ones); a constraint that cannot hold once entries are zeroed refuses the mask unless its
    rule sets ``allow_masked: true``.

    Logs at each epoch end (and every ``log_every_n_steps`` steps when set) through
    ``pl_module.log_dict``: ``{key}/<tensor>/<constraint>`` and ``{key}/max_violation``; for a
    constraint with a target (``learned_mask``), also ``{key}/<tensor>/<constraint>/closed``. Before
    every optimizer step, such constraints take one control step (:meth:`control`). The logged
    violations are also kept (``history``, in the checkpoint: one number per constraint per log) and
    plotted at the end (``{key}_violations.png``).

    Args:
        rules: a list of ``{name, include, exclude, module_types, args, allow_masked}``: ``name``
            a registered constraint, ``args`` its keyword arguments, the selection as in
            :func:`~plugins.core.selection.select_parameters` (default: weights of conv and linear
            layers), ``allow_masked`` accepts a mask that breaks the constraint.
        bake_at_end: remove the parametrizations at the end of fit, keeping the constrained values.
        log_every_n_steps: also log violations every N optimizer steps (null: per epoch only).
        key: names this callback in errors, logged metrics and ``summary.json``.

    Raises:
        ConfigError: for an unknown name (listing the registered ones), a wrong argument, a bad
            rule (here); a selection that matches nothing, a tensor that cannot carry its
            constraint, a mask already on a tensor (in ``setup``, before the first batch).
    """

    def __init__(
        self,
        rules: Sequence[Mapping[str, Any]],
        bake_at_end: bool = True,
        log_every_n_steps: int | None = None,
        key: str = "constraints",
    ) -> None:
        if not isinstance(bake_at_end, bool):
            raise ConfigError(f"{key}.bake_at_end", bake_at_end, "true or false")
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ConfigError(f"{key}.log_every_n_steps", log_every_n_steps, "an integer >= 1 or null")
        self.key = key
        self.rules = parse_rules(rules, key)
        self.bake_at_end = bake_at_end
        self.log_every_n_steps = log_every_n_steps
        self.applied: list[Applied] = []
        self.baked = False
        self.projections = 0
        self._hooks: list[Any] = []
        self._final: dict[str, float] = {}
        self.history: list[dict[str, float]] = []  # {"step": s, "<tensor>/<constraint>": violation, ...}

    # --- the transform ----------------------------------------------------------------------------

    def apply(self, model: nn.Module) -> list[Applied]:
        """Register every rule's constraint on its selected tensors of ``model`` (once)."""
        if self.applied:
            return self.applied
        applied: list[Applied] = []
        for rule in self.rules:
            targets = select_parameters(model, rule.include, rule.exclude, rule.module_types, key=rule.key)
            for target in targets:
                applied.append(register_rule(rule, target.name, target.module, target.tensor_name))
        self.applied = applied
        return applied

    @torch.no_grad()
    def project(self) -> None:
        """Put every projection constraint's stored tensor back on its set (after an optimizer
        step); the parametrized constraints need nothing."""
        for a in self.applied:
            if getattr(a.constraint, "projects", False) and parametrize.is_parametrized(a.module, a.tensor_name):
                a.constraint.project_(a.module.parametrizations[a.tensor_name].original)
        self.projections += 1

    @torch.no_grad()
    def violations(self) -> dict[str, float]:
        """``<tensor>/<constraint>`` -> violation, measured on the weight the module computes with."""
        out = {}
        for a in self.applied:
            measure = getattr(a.constraint, "violation", None)
            if measure is not None:
                out[a.label] = float(measure(getattr(a.module, a.tensor_name)))
        return out

    def bake(self) -> int:
        """Finalize every constraint and remove the parametrizations, keeping the values they
        produce (masks on the same tensors are baked with them). Returns the tensors baked."""
        count = 0
        for a in self.applied:
            if hasattr(a.constraint, "finalize_"):
                a.constraint.finalize_()
        # Measured now, on the values about to be baked: a constraint's own state (a learned
        # mask's scores) fits its tensor's shape only until compaction removes slices.
        self._final = self.violations()
        for a in self.applied:
            if parametrize.is_parametrized(a.module, a.tensor_name):
                parametrize.remove_parametrizations(a.module, a.tensor_name, leave_parametrized=True)
                count += 1
        self.baked = True
        return count

    def control(self) -> None:
        """One control step of every constraint with a target (a learned mask's ``target``), once
        per optimizer step; the Lightning hook calls it, a plain training loop calls it before
        each ``optimizer.step()``."""
        if self.baked:
            return
        for a in self.applied:
            adapt = getattr(a.constraint, "control_", None)
            if adapt is not None:
                adapt()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Project after every ``optimizer.step()`` (a step post-hook); :meth:`detach` removes it."""
        if any(isinstance(c, Constraint) and c.projects for c in (a.constraint for a in self.applied)):
            self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.project()))

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # --- Lightning hooks --------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(key=self.key, rules=[(r.name, r.include, r.exclude) for r in self.rules])

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not self.baked:
            self.apply(pl_module)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.detach()
        for optimizer in trainer.optimizers:
            self.attach(optimizer)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.control()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = self.log_every_n_steps
        if n and trainer.global_step % n == 0 and not self.baked:
            self._log(pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.baked:
            self._log(pl_module, on_step=False)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.detach()
        if self.bake_at_end and not self.baked:
            self.bake()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        # The constrained tensors (and learned scores, PyTorch's trivialization bases) travel in the
        # checkpoint's plain state dict and its ``parametrizations`` (plugins.core.checkpoint_form).
        return {"projections": self.projections, "history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.projections = int(state_dict.get("projections", 0))
        self.history = list(state_dict.get("history", []))

    def _log(self, pl_module: L.LightningModule, on_step: bool) -> None:
        values = self.violations()
        if not values:
            return
        step = pl_module.global_step
        if self.history and self.history[-1]["step"] == step:  # an epoch end on a step already logged
            self.history.pop()
        self.history.append({"step": step, **values})
        metrics = {f"{self.key}/{label}": v for label, v in values.items()}
        metrics[f"{self.key}/max_violation"] = max(values.values())
        for a in self.applied:
            controlled = getattr(a.constraint, "controlled", None)
            metrics.update({f"{self.key}/{a.label}/{k}": v for k, v in (controlled() if controlled else {}).items()})
        pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step, sync_dist=False)

    # --- run outputs ------------------------------------------------------------------------------

    @override
    def headline(self) -> dict[str, float]:
        """``{key}/max_violation``: the worst violation at the last log (none before the first)."""
        last = {k: v for k, v in (self.history[-1] if self.history else {}).items() if k != "step"}
        return {f"{self.key}/max_violation": max(last.values())} if last else {}

    def save_plots(self, directory: str | Path) -> list[Path]:
        """Write ``{key}_violations.png``: each constraint's violation at each log (every epoch end,
        and every ``log_every_n_steps`` steps when set) against the optimizer step; returns its path."""
        labels = dict.fromkeys(k for h in self.history for k in h if k != "step")
        path = plot_history(
            Path(directory) / f"{self.key}_violations.png",
            self.history,
            {label: label for label in labels},
            title=f"{self.key}: violation per constraint",
            ylabel="violation (on the weight the module computes with)",
            symlog=True,
        )
        return [path]

    def summary(self) -> dict[str, Any]:
        """``{key}``: ``<tensor>/<constraint>`` -> violation on the final weights (once baked: as
        baked, before any compaction), ``{key}/max_violation``, ``{key}/projections`` (projection
        steps taken)."""
        values = self._final if self.baked else self.violations()
        return {
            self.key: values,
            f"{self.key}/max_violation": max(values.values()) if values else 0.0,
            f"{self.key}/projections": self.projections,
        }
