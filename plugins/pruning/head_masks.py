"""The mask mechanism of head pruning: one group per attention module, one element per head.

A head's mask covers its q/k/v rows (and biases) and its columns of the output projection
(:mod:`plugins.pruning.attention`). A masked head contributes nothing to the output (its values
and output columns are zero), so the masked model computes what the model without that head
computes; compaction removes the head for real, keeps the head size and the softmax scale, and
checks itself against the masked model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from plugins.core.checkpoint_form import plain_state, set_compaction_plan
from plugins.core.decision import Group
from plugins.core.errors import CompactionMismatch, ConfigError
from plugins.core.mask_mechanism import MaskMechanism
from plugins.core.masks import bake, ensure_mask, get_mask, set_mask
from plugins.core.modes import evaluating
from plugins.pruning.attention import HeadStructure, Projection, find_attention
from plugins.pruning.compaction import side_by_side
from plugins.pruning.compaction_check import check_equal, check_ties, outputs, tied_owners
from plugins.pruning.dependency import independent_copy
from plugins.pruning.measure import batch_of
from plugins.pruning.units import example_inputs, refuse_unbaked_constraints

__all__ = ["HeadGroup", "HeadMasks"]


@dataclass
class HeadGroup(Group):
    """The heads of one attention module; :meth:`weights` are head-major ``(heads, -1)`` views,
    so every slice criterion (random, l1, l2, fpgm) scores heads along ``dim=0``."""

    structure: HeadStructure | None = None

    def weights(self) -> list[torch.Tensor]:
        s = self.structure
        return [p.head_major(getattr(p.module, p.tensor_name), s.heads) for p in s.weights]

    def describe(self) -> str:
        return f"the {self.size} heads of {self.name}"


def _projections(group: HeadGroup) -> list[Projection]:
    return [*group.structure.weights, *group.structure.biases]


def _mask_shape(group: HeadGroup, p: Projection) -> tuple[int, ...]:
    ndim = getattr(p.module, p.tensor_name).dim()
    return tuple(p.expand(torch.ones(group.size, dtype=torch.bool), group.structure.head_dim, ndim).shape)


def _zero_heads(structure: HeadStructure, keep: torch.Tensor) -> None:
    for p in [*structure.weights, *structure.biases]:
        tensor = getattr(p.module, p.tensor_name)
        tensor.data.mul_(p.expand(keep, structure.head_dim, tensor.dim()).to(tensor))


class HeadMasks(MaskMechanism):
    """Masks whole attention heads; with ``compact`` removes them at the end of fit.

    Cost: one elementwise product per projection tensor in forward and backward; with ``compact``
    one dry run on a copy of the model in ``setup`` and one compaction after fit.
    """

    dim = 0

    def __init__(self, compact: bool = False, example_input_shape: list[int] | None = None) -> None:
        self.compact = compact
        self.example_input_shape = example_input_shape
        self.example: Any = None
        self.key = "pruning"
        #: attention module -> "kept/total" heads, once fit has ended
        self.kept: dict[str, str] | None = None

    def groups(self, trainer, pl_module, targets, key):
        self.key = key
        selected = {(id(t.module), t.tensor_name): t for t in targets}
        names = {m: n for n, m in pl_module.named_modules()}
        groups = []
        for s in find_attention(pl_module):
            members = [selected.get((id(p.module), p.tensor_name)) for p in s.weights]
            if not any(members):
                continue
            if not all(members):
                missing = next(
                    f"{names[p.module]}.{p.tensor_name}" for p, m in zip(s.weights, members, strict=True) if m is None
                )
                raise ConfigError(
                    f"{key}.exclude",
                    missing,
                    f"a selection that holds all of {s.name}'s q/k/v/output projections or none",
                )
            extras = [(f"{names[p.module]}.{p.tensor_name}", p.module, p.tensor_name) for p in s.biases]
            groups.append(HeadGroup(s.name, members, s.heads, 0, extras, min_keep=1, structure=s))
        if not groups:
            raise ConfigError(
                f"{key}.heads",
                True,
                "false for this model: no selected weight belongs to an attention module head pruning "
                "recognizes (nn.MultiheadAttention, or q/k/v/o Linear layers with a head-count attribute; "
                "register an adapter in plugins.pruning.attention.ATTENTION for others)",
            )
        if self.compact:
            refuse_unbaked_constraints(trainer, key)
            self.example = example_inputs(trainer, pl_module, self.example_input_shape, key)
            self._dry_run(pl_module, groups)
        return groups

    @torch.no_grad()
    def _dry_run(self, pl_module: nn.Module, groups: list[HeadGroup]) -> None:
        """Before training: remove head 0 of every group from a copy; it must compute what the copy
        with head 0 masked did (a forward that hard-codes the width would not)."""
        replica = independent_copy(pl_module)
        bake(replica)
        wanted = {g.name for g in groups if g.size > 1}
        structures = [s for s in find_attention(replica) if s.name in wanted]
        keeps = []
        for s in structures:
            keep = torch.ones(s.heads, dtype=torch.bool)
            keep[0] = False
            _zero_heads(s, keep)
            keeps.append(keep)
        try:
            with evaluating(replica):
                expected, ties = outputs(replica, self.example), tied_owners(replica)
                for s, keep in zip(structures, keeps, strict=True):
                    s.remove(keep, replica)
                check_ties(ties)
                check_equal(expected, replica, self.example, set())
        except CompactionMismatch as err:
            raise ConfigError(f"{self.key}.compact", True, f"false for this model: a dry run says {err}") from None

    def mask_shape(self, group, tensor):
        p = next(p for p in _projections(group) if getattr(p.module, p.tensor_name) is tensor)
        return _mask_shape(group, p)

    def install(self, groups, key):
        for group in groups:
            for p in _projections(group):
                ensure_mask(p.module, p.tensor_name, _mask_shape(group, p), inplace=self.form == "auto")

    def apply(self, groups, keeps, optimizers=(), regrow=False):
        if regrow:
            raise ValueError("head masks only drop: no method regrows heads")
        for group in groups:
            keep, d = keeps[group.name].reshape(-1), group.structure.head_dim
            for p in _projections(group):
                tensor = getattr(p.module, p.tensor_name)
                set_mask(p.module, p.tensor_name, p.expand(keep, d, tensor.dim()).to(tensor.device), optimizers)

    @torch.no_grad()
    def current(self, group):
        """Heads kept: by the mask while there is one; a head whose weights are all zero (a
        constraint or another mask zeroed them) counts as pruned too."""
        s = group.structure
        p = s.weights[0]
        mask = get_mask(p.module, p.tensor_name)
        nonzero = torch.stack([w.ne(0).any(dim=1) for w in group.weights()]).any(dim=0).cpu()
        return nonzero if mask is None else p.contract(mask.mask, s.heads) & nonzero

    def finish(self, trainer, pl_module, groups, bake):
        keeps = {g.name: self.current(g) for g in groups}
        optimizers = trainer.optimizers if trainer is not None else []
        self.apply(groups, keeps, optimizers)  # heads zeroed from outside count as pruned
        super().finish(trainer, pl_module, groups, bake or self.compact)
        self.kept = {g.name: f"{int(keeps[g.name].sum())}/{g.size}" for g in groups}
        if not self.compact:
            return None
        return self._compact(pl_module, groups, keeps)

    @torch.no_grad()
    def _compact(self, pl_module: nn.Module, groups: list[HeadGroup], keeps: dict[str, torch.Tensor]) -> dict[str, Any]:
        example = self.example
        if torch.is_tensor(example):
            example = example.to(next(pl_module.parameters()).device)
        names = {m: n for n, m in pl_module.named_modules()}
        dense = copy.deepcopy(pl_module)
        params_before = sum(p.numel() for p in pl_module.parameters())
        plan: dict[str, dict[int, torch.Tensor]] = {}
        ties = tied_owners(pl_module)
        with evaluating(pl_module):
            expected = outputs(pl_module, example)
            for group in groups:
                keep = keeps[group.name]
                if keep.all():
                    continue
                s = group.structure
                for p in _projections(group):
                    plan[f"{names[p.module]}.{p.tensor_name}"] = {p.axis: p.kept_indices(keep, s.head_dim)}
                s.remove(keep, pl_module)
            try:
                check_ties(ties)
                check_equal(expected, pl_module, example, set())
            except CompactionMismatch as err:
                raise CompactionMismatch(f"{self.key}.compact: {err}") from None
        # The checkpoints stay full width (masked): the compact module loads them sliced.
        set_compaction_plan(pl_module, plan, plain_state(dense))
        report: dict[str, Any] = {
            "params_before": params_before,
            "params_after": sum(p.numel() for p in pl_module.parameters()),
            "heads": dict(self.kept),
        }
        report.update(side_by_side(dense, pl_module, batch_of(example, 64), repeats=10))
        return report

    def channels(self, groups: list[Group]) -> dict[str, str]:
        """Attention module name -> "kept/total" heads."""
        if self.kept is not None:
            return dict(self.kept)
        return {g.name: f"{int(self.current(g).sum())}/{g.size}" for g in groups}
