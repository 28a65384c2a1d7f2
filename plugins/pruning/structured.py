"""Structured pruning on a schedule: whole slices (channels) of conv and linear weights.

``method`` names a criterion (:mod:`plugins.core.criteria`: random, l1, l2;
:mod:`plugins.pruning.criteria`: taylor, bn_scale, fpgm) and ``allocation`` how the amount splits
across units (:mod:`plugins.core.allocation`: layer, global; :mod:`plugins.sparsity.budgets`:
lamp). The scheduled value is the fraction of slices pruned (a float in [0, 1]) or, when
``schedule.end`` is an integer, their count. Pruning only grows: a pruned slice stays pruned when
the schedule goes down.

With ``dim=0`` the units are dependency groups (:mod:`plugins.pruning.slice_masks`): residual
additions share one mask, biases and norms follow, so the masked model equals its compacted twin.
A group must be selected whole (all its conv/linear layers, or none); the model's output layer
cannot lose output channels.

Randomness: the draw for unit ``g`` at update ``u`` uses a ``torch.Generator`` seeded from
``(seed, u, g)``; ``u`` (the number of updates so far) is in the checkpoint, so every DDP rank and
every resumed run draws the same channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typing_extensions import override

from plugins.core.allocation import ALLOCATIONS
from plugins.core.arguments import accepted_arguments
from plugins.core.criteria import CRITERIA, Criterion
from plugins.core.errors import ConfigError, is_number
from plugins.core.history_plot import plot_history
from plugins.core.masking_callback import MaskingCallback
from plugins.core.schedules import Schedule, build_schedule
from plugins.pruning.head_masks import HeadMasks
from plugins.pruning.slice_masks import SliceMasks
from plugins.pruning.units import check_schedule_values

__all__ = ["StructuredPruning", "PRUNABLE_TYPES"]

#: The layers whose slices can be pruned, coupled and compacted.
PRUNABLE_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Linear")
#: Criteria that score heads: the ones that read only the weights (:meth:`HeadGroup.weights`).
HEAD_CRITERIA = ("random", "l1", "l2", "fpgm")


class StructuredPruning(MaskingCallback):
    """Scheduled structured pruning of whole slices, for any LightningModule.

    Composition (:class:`~plugins.core.masking_callback.MaskingCallback`): the schedule, the
    ``method`` criterion, the ``allocation`` and slice masks (coupling, compaction). Logs
    ``{key}/value``, ``{key}/sparsity``, ``{key}/kept/<unit>`` and ``{key}/kept_fraction`` at each
    epoch end and plots the kept slices per unit (``{key}_channels.png``); costs one trace of the
    model in ``setup`` when coupling or compacting.

    Args:
        method: a registered criterion (:data:`plugins.core.criteria.CRITERIA`): ``random``, ``l1``,
            ``l2``, ``taylor``, ``bn_scale``, ``fpgm`` (docs/reference/methods.md).
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
        allocation: a registered allocation (:data:`plugins.core.allocation.ALLOCATIONS`): ``layer``
            (the same fraction in every unit), ``global`` (one threshold over all units' scores) or
            ``lamp`` (one threshold over the scores normalized per unit).
        bake_at_end: remove the mask parametrizations at the end of ``fit``.
        key: the config key named in errors and logged metrics.
        regularize: the L1 penalty on the norm scales during training (network slimming), for a
            criterion that takes one (``bn_scale``); 0 = none.
        heads: prune whole attention heads instead of slices along ``dim``
            (:mod:`plugins.pruning.head_masks`): one unit per attention module, one element per
            head; compaction removes heads and keeps the head size (the softmax scale).
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
        module_types: list[str] | None = PRUNABLE_TYPES,
        seed: int | None = None,
        couple: bool = True,
        compact: bool = False,
        example_input_shape: list[int] | None = None,
        allocation: str = "layer",
        bake_at_end: bool = True,
        key: str = "pruning",
        regularize: float = 0.0,
        heads: bool = False,
    ) -> None:
        criterion = _criterion(method, regularize, key)
        if not isinstance(heads, bool):
            raise ConfigError(f"{key}.heads", heads, "true or false")
        if heads and method not in HEAD_CRITERIA:
            raise ConfigError(f"{key}.method", method, f"one of {', '.join(HEAD_CRITERIA)} with heads=true")
        allocator = ALLOCATIONS.get(allocation, f"{key}.allocation")()
        allocator.key = f"{key}.allocation"  # where an allocation's refusal in setup points
        if (schedule is None) == (amount is None):
            raise ConfigError(f"{key}.amount", amount, "either amount or schedule, not both and not neither")
        if amount is not None:
            if not is_number(amount):
                raise ConfigError(f"{key}.amount", amount, "a fraction in [0, 1] or a whole count")
            schedule = Schedule(kind="constant", start=amount, end=amount)
        schedule = build_schedule(schedule, key=f"{key}.schedule")
        count = isinstance(schedule.end, int)
        check_schedule_values(schedule, count, key, amount_given=amount is not None)
        _check_options(key, dim, seed, couple, compact, example_input_shape)
        exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        shape = list(example_input_shape or []) or None
        if heads:
            masks = HeadMasks(compact, shape)
            # Adapters say which tensors are heads' (MultiheadAttention, GPT-2's Conv1D): any owner.
            module_types = None if tuple(module_types or ()) == PRUNABLE_TYPES else module_types
        else:
            masks = SliceMasks(dim, couple, compact, shape, exclude)
        super().__init__(
            schedule,
            criterion=criterion,
            allocation=allocator,
            masks=masks,
            include=include,
            exclude=exclude,
            module_types=module_types,
            bake_at_end=bake_at_end,
            count=count,
            seed=seed,
            key=key,
        )
        self.method = method
        self.heads = heads
        self.masks.peak = (max(schedule.start, schedule.end), count)

    @property
    def dim(self) -> int:
        """The pruned dimension (a negative one resolved to its positive alias in ``setup``)."""
        return self.masks.dim

    @property
    def compaction(self) -> dict[str, Any] | None:
        """Compaction's report (parameters, MACs, speed-up, inexact layers) once fit has ended."""
        return self.report

    def record(self) -> dict[str, float]:
        """Slices (heads) kept per unit, ``kept/<unit>``, and over all units, ``kept_fraction``."""
        kept = {g.name: float(self.masks.current(g).sum()) for g in self.groups}
        total = sum(g.size for g in self.groups)
        return {**{f"kept/{n}": k for n, k in kept.items()}, "kept_fraction": sum(kept.values()) / max(total, 1)}

    @override
    def headline(self) -> dict[str, float]:
        """``{key}/kept_fraction``: the fraction of slices (heads) kept at the last update, over all units."""
        last = self.history[-1] if self.history else {}
        return {f"{self.key}/kept_fraction": float(last["kept_fraction"])} if "kept_fraction" in last else {}

    def save_plots(self, directory: str | Path) -> list[Path]:
        """Write ``{key}_channels.png``: slices (heads) kept per unit at each update, against the
        optimizer step; returns its path. Costs one small figure."""
        what = "heads" if self.heads else ("channels" if self.dim == 0 else f"slices along dim {self.dim}")
        path = plot_history(
            Path(directory) / f"{self.key}_channels.png",
            self.history,
            {f"kept/{g.name}": f"{g.name} (of {g.size})" for g in self.groups},
            title=f"structured pruning, method={self.method}: {what} kept per unit",
            ylabel=f"{what} kept",
            steps=True,
        )
        return [path]

    def channels(self) -> dict[str, str]:
        """Target name -> "kept/total" slices along ``dim`` (attention module -> heads with ``heads``)."""
        return self.masks.channels(self.groups)

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out[f"{self.key}/channels"] = self.channels()
        if self.report is not None:
            out["compaction"] = {
                k: self.report[k]
                for k in ("params_before", "params_after", "macs_before", "macs_after", "speedup")
                if k in self.report
            }
        return out


def _criterion(method: Any, regularize: Any, key: str) -> Criterion:
    """The ``method`` criterion, with ``regularize`` when it is not 0 (only a criterion that takes a
    penalty accepts one)."""
    entry = CRITERIA.get(method, f"{key}.method")
    if not is_number(regularize) or regularize < 0:
        raise ConfigError(f"{key}.regularize", regularize, "a finite number >= 0 (0 = no penalty)")
    if not regularize:
        criterion = entry()
    elif "regularize" in accepted_arguments(entry)[0]:
        criterion = CRITERIA.build(method, {"regularize": float(regularize)}, f"{key}.method")
    else:
        takes = [n for n in CRITERIA.names() if "regularize" in accepted_arguments(CRITERIA.get(n, key))[0]]
        raise ConfigError(
            f"{key}.regularize", regularize, f"0 with method={method} (a penalty needs method={' or '.join(takes)})"
        )
    criterion.key = f"{key}.method"  # where a criterion's refusal in setup points
    return criterion


def _check_options(key: str, dim: Any, seed: Any, couple: Any, compact: Any, example_input_shape: Any) -> None:
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
        raise ConfigError(f"{key}.example_input_shape", example_input_shape, "null or a list of sizes > 0")
