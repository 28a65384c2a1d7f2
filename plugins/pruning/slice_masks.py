"""The mask mechanism of structured pruning: slices along ``dim``, coupled groups, compaction.

Coupling (``dim=0``): masking a conv's output channel leaves the norm after it emitting a constant
(``beta - mean * gamma / std``), so the masked model would differ from its compacted twin. With
``dim=0`` and ``couple`` the groups are therefore dependency groups, as in Torch-Pruning: a layer's
group (:func:`plugins.pruning.dependency.coupled_groups`) holds the layers whose outputs are added
to it (residual shortcuts) and the norm layers after them; all of them share one channel mask, and
the layers' biases and the norms' scale and shift are masked too.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from plugins.core.checkpoint_form import plain_state, set_compaction_plan
from plugins.core.decision import Group
from plugins.core.errors import CompactionWarning, ConfigError, SelectionWarning
from plugins.core.mask_mechanism import MaskMechanism
from plugins.core.selection import Target
from plugins.core.weight_layout import input_dim
from plugins.pruning.compaction import compact
from plugins.pruning.dry_run import refuse_inexact_compaction
from plugins.pruning.units import build_units, example_inputs, kept_slices, refuse_unbaked_constraints, settle

__all__ = ["SliceMasks"]


class SliceMasks(MaskMechanism):
    """Masks whole slices along ``dim`` (a mask of shape ``(1, .., size, .., 1)`` per tensor, and
    one per coupled bias or norm tensor); at the end of fit marks all-zero slices as pruned, bakes,
    and with ``compact`` removes the pruned slices for real (:func:`plugins.pruning.compaction.compact`).

    Cost: one trace of the model in ``setup`` when coupling or compacting; compaction's cost once.
    """

    def __init__(
        self,
        dim: int = 0,
        couple: bool = True,
        compact: bool = False,
        example_input_shape: list[int] | None = None,
        exclude: list[str] = (),
    ) -> None:
        self.dim = dim
        self.couple = couple
        self.compact = compact
        self.example_input_shape = example_input_shape
        self.exclude = list(exclude)
        self.example: Any = None
        self.key = "pruning"
        #: (amount, count) at the schedule's peak, for the dry run of compaction in ``setup``.
        self.peak: tuple[float, bool] | None = None

    def groups(self, trainer, pl_module, targets, key):
        self.key = key
        if self.compact:
            refuse_unbaked_constraints(trainer, key)
        self._resolve_dim(targets, key)
        _warn_if_stored_inputs_first(targets, self.dim, key)
        if self.compact:
            _warn_if_nothing_to_remove(self.dim, self.couple, key)
        if self.compact or (self.couple and self.dim == 0):
            self.example = example_inputs(trainer, pl_module, self.example_input_shape, key)
        groups = build_units(pl_module, targets, self.dim, self.couple, self.example, key, self.exclude)
        if self.compact and self.peak is not None:
            refuse_inexact_compaction(pl_module, groups, self.dim, self.example, *self.peak, key)
        return groups

    def _resolve_dim(self, targets: list[Target], key: str) -> None:
        """``dim`` must be a dimension of every target. A negative ``dim`` means its positive alias
        (``-4`` on 4-D weights is exactly ``dim=0``, coupling and compaction included): when it
        names one axis for every target it becomes that axis; an alias that is 0 for some targets
        only would prune those without their coupled biases and norms, so it is refused."""
        aliases = {}
        for t in targets:
            ndim = t.raw.dim()
            if not -ndim <= self.dim < ndim:
                raise ConfigError(f"{key}.dim", self.dim, f"a dimension of {t.name} (shape {tuple(t.raw.shape)})")
            aliases[t.name] = self.dim % ndim
        axes = set(aliases.values())
        if len(axes) == 1:
            self.dim = axes.pop()
        elif 0 in axes and self.couple:
            first = next(n for n, a in aliases.items() if a == 0)
            other = next(n for n, a in aliases.items() if a != 0)
            raise ConfigError(
                f"{key}.dim",
                self.dim,
                f"one axis of every selected tensor ({self.dim} is axis 0 of {first} but axis "
                f"{aliases[other]} of {other}): give it as a positive dim",
            )

    def mask_shape(self, group, tensor):
        if tensor.dim() == 1:
            return (group.size,)  # a coupled bias or norm tensor
        shape = [1] * tensor.dim()
        shape[self.dim % tensor.dim()] = group.size
        return tuple(shape)

    def current(self, group):
        return kept_slices(group, self.dim)

    def finish(self, trainer, pl_module, groups, bake):
        # Constraints on the same tensors are final by now (WeightConstraints comes first).
        optimizers = trainer.optimizers if trainer is not None else []
        for group in groups:
            settle(group, self.dim, optimizers)
        super().finish(trainer, pl_module, groups, bake)
        if not self.compact:
            return None
        example = self.example
        if torch.is_tensor(example):
            example = example.to(next(pl_module.parameters()).device)
        before = plain_state(pl_module)
        _, report = compact(pl_module, example, key=f"{self.key}.compact")
        # The checkpoints stay full width (masked, the same outputs): the compacted module loads
        # them sliced, so trainer.test(ckpt_path="best") works after compaction.
        set_compaction_plan(pl_module, report.pop("kept_indices"), before)
        pruned = any(not kept_slices(g, self.dim).all() for g in groups)
        if pruned and report["params_after"] == report["params_before"]:
            warnings.warn(
                CompactionWarning(f"{self.key}.compact=true removed nothing: no pruned slice could be removed exactly"),
                stacklevel=2,
            )
        return report

    def channels(self, groups: list[Group]) -> dict[str, str]:
        """Target name -> "kept/total" slices along ``dim``: the mask's while there is one, then
        those of the final (baked, compacted) weights that are not all zero."""
        out = {}
        for group in groups:
            keep = kept_slices(group, self.dim)
            for member in group.members:
                out[member.name] = f"{int(keep.sum())}/{group.size}"
        return out


def _warn_if_stored_inputs_first(targets: list[Target], dim: int, key: str) -> None:
    """``dim`` counts the stored tensor's axes, as torch's ``ln_structured`` does; on a weight
    stored (in, out, ...) those are the reverse of a Linear's, which a user may not expect."""
    flipped = [t.name for t in targets if dim in (0, 1) and t.raw.dim() >= 2 and input_dim(t.module) == 0]
    if flipped:
        sliced, other = ("inputs", "dim=1 prunes outputs") if dim == 0 else ("outputs", "dim=0 prunes inputs")
        warnings.warn(
            SelectionWarning(
                f"{key}.dim={dim} prunes the {sliced} of {', '.join(flipped)}: Hugging Face Conv1D and transposed "
                f"convolutions store their weight as (in, out, ...), the reverse of Linear and Conv ({other})"
            ),
            stacklevel=3,
        )


def _warn_if_nothing_to_remove(dim: int, couple: bool, key: str) -> None:
    """Compaction removes whole channels (dim 0 of a producer with its bias and norm, or dim 1 of
    every consumer): say before training when the settings leave it nothing to remove."""
    if dim not in (0, 1):
        why = f"dim={dim} prunes slices that are not channels; compaction removes only dim 0 or dim 1 slices"
    elif dim == 0 and not couple:
        why = "couple=false leaves the biases and norms of pruned channels nonzero, so no channel can be removed"
    else:
        return
    warnings.warn(CompactionWarning(f"{key}.compact=true will remove nothing: {why}"), stacklevel=3)
