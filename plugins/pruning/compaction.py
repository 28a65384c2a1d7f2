"""Compaction: physically remove pruned (all-zero) channels with Torch-Pruning's dependency graph.

A channel of a dependency group (the output channels of one or more conv/linear layers that must
go together, with the norm layers after them, the input channels of every consumer, through
residual additions and concatenations) is removed when either

- every *producer* (a conv or linear layer whose output channels are in the group) has an all-zero
  output slice and zero bias for it, or
- every *consumer* (a conv or linear layer whose input channels are in the group) has an all-zero
  input slice for it (what ``dim=1`` pruning leaves).

Exactness: the compact model computes what the masked one did (eval mode) when the norm layers of
the group send zero to zero on removed channels: ``none``; ``batch`` and ``instance`` with their
scale and shift zeroed there (``StructuredPruning`` masks them together with the conv); and any
per-channel norm when the removal comes from the consumer rule. ``group`` and ``layer`` norms mix
channels in their statistics, so removing a channel changes the others: those layers are listed in
the report under ``inexact`` and a warning is issued.

The output layer of the model is never reduced (it would change the output shape).
"""

from __future__ import annotations

import copy
import statistics
import warnings
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from plugins.core.errors import CompactionWarning, ConfigError
from plugins.core.masks import bake
from plugins.core.modes import evaluating
from plugins.pruning.compaction_check import check_equal, check_ties, outputs, tied_owners
from plugins.pruning.dependency import (
    _RUNNING_STATS_NORMS,
    CONV_LINEAR,
    CoupledGroup,
    _groups,
    coupled_groups,
    independent_copy,
    trace,
)
from plugins.pruning.kept_indices import index_twin, kept_indices
from plugins.pruning.measure import batch_of, count, latency

__all__ = [
    "CONV_LINEAR",
    "CoupledGroup",
    "trace",
    "coupled_groups",
    "compact",
    "compact_copy",
    "independent_copy",
    "kept_indices",
    "latency",
    "side_by_side",
    "count",
]


def _zero_slices(weight: torch.Tensor, dim: int) -> torch.Tensor:
    return (weight.detach().movedim(dim, 0).flatten(1) == 0).all(dim=1)


def _any_at(roots: torch.Tensor, flags: torch.Tensor, n: int) -> torch.Tensor:
    """Per root index, whether any own index mapped to it has ``flags`` set (flatten, concat)."""
    return torch.zeros(n, dtype=torch.long).index_add_(0, roots, flags.long()) > 0


def _removable(group, info: CoupledGroup, dg: tp.DependencyGraph) -> tuple[list[int], bool]:
    """Root indices whose channel can go, and whether that came from the producers' side."""
    n = info.size
    prod_zero = torch.ones(n, dtype=torch.bool)
    cons_zero = torch.ones(n, dtype=torch.bool)
    has_prod = has_cons = False
    for item in group:
        module, handler = item.dep.target.module, item.dep.handler
        roots = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
        idxs = torch.as_tensor(list(item.idxs), dtype=torch.long)
        if dg.is_out_channel_pruning_fn(handler):
            if isinstance(module, CONV_LINEAR):
                has_prod = True
                zero = _zero_slices(module.weight, 0)[idxs]
                if module.bias is not None:
                    zero &= module.bias.detach()[idxs] == 0
                prod_zero &= ~_any_at(roots, ~zero, n)
            elif not isinstance(module, nn.Module):
                prod_zero[:] = False  # an unwrapped parameter: we do not reason about it
        else:
            if isinstance(module, CONV_LINEAR) and getattr(module, "groups", 1) == 1:
                has_cons = True
                zero = _zero_slices(module.weight, 1)[idxs]
                cons_zero &= ~_any_at(roots, ~zero, n)
            else:
                cons_zero[:] = False
    prod_zero &= has_prod
    cons_zero &= has_cons
    by_producers = prod_zero & ~cons_zero
    removable = (prod_zero | cons_zero).nonzero().flatten().tolist()
    return removable, bool(by_producers.any())


def _inexact_norms(info: CoupledGroup, idxs: list[int], names: dict[nn.Module, str]) -> list[str]:
    """Norm layers of a group for which removing ``idxs`` (zero inputs) changes the output."""
    bad = []
    index = torch.as_tensor(idxs, dtype=torch.long)
    for norm in info.norms:
        if isinstance(norm, _RUNNING_STATS_NORMS):
            weight = norm.weight.detach()[index] if norm.weight is not None else 1.0
            bias = norm.bias.detach()[index] if norm.bias is not None else torch.zeros(len(idxs))
            if norm.track_running_stats and norm.running_mean is not None:
                mean = norm.running_mean[index]
                std = torch.sqrt(norm.running_var[index] + norm.eps)
                out = bias - mean / std * weight
            else:
                out = bias
            if (torch.as_tensor(out) != 0).any():
                bad.append(names.get(norm, type(norm).__name__))
        else:
            bad.append(names.get(norm, type(norm).__name__))
    return bad


def _fix_feature_counts(model: nn.Module) -> None:
    """Torch-Pruning slices affine InstanceNorm's tensors but leaves ``num_features``: set it."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, _RUNNING_STATS_NORMS) and weight is not None:
            module.num_features = weight.shape[0]
        elif isinstance(module, nn.GroupNorm) and weight is not None:
            module.num_channels = weight.shape[0]


def _refuse_untraced(model: nn.Module, dg: tp.DependencyGraph, key: str) -> None:
    """A conv/linear layer with zeroed channels that the graph does not see cannot be compacted."""
    for name, module in model.named_modules():
        if isinstance(module, CONV_LINEAR) and module not in dg.module2node:
            if _zero_slices(module.weight, 0).any() or _zero_slices(module.weight, 1).any():
                raise ConfigError(
                    key, name, "layers called as modules in forward (the dependency graph cannot see it)"
                )


def _widths(dg: tp.DependencyGraph, names: dict[nn.Module, str]) -> dict[str, int]:
    return {
        names[m]: getattr(m, "out_channels", getattr(m, "out_features", 0))
        for m in dg.module2node
        if isinstance(m, CONV_LINEAR)
    }


def _prune_removable(
    dg: tp.DependencyGraph, names: dict[nn.Module, str], steps: list[tuple[str, list[int]]]
) -> set[str]:
    """Prune every group's removable channels (recorded in ``steps``); returns the inexact norms."""
    inexact: set[str] = set()
    # get_all_groups is lazy: each group is computed after the previous one was pruned.
    for group, info in _groups(dg):
        removable, by_producers = ([], False) if info.is_output else _removable(group, info, dg)
        if len(removable) == info.size:
            removable = removable[1:]  # keep one (all-zero) channel so that the layers stay valid
        if not removable:
            continue
        if by_producers:
            inexact.update(_inexact_norms(info, removable, names))
        root = group[0].dep
        steps.append((names[root.target.module], list(removable)))
        dg.get_pruning_group(root.target.module, root.handler, removable).prune(record_history=False)
    return inexact


def side_by_side(dense: nn.Module, small: nn.Module, inputs: Any, repeats: int) -> dict[str, float]:
    """Median latency of each, alternating so that load from other processes hits both alike."""
    t_dense, t_compact = [], []
    for _ in range(repeats):
        t_dense += latency(dense, inputs, repeats=1, warmup=1)
        t_compact += latency(small, inputs, repeats=1, warmup=1)
    dense_s, compact_s = statistics.median(t_dense), statistics.median(t_compact)
    return {"latency_dense_s": dense_s, "latency_compact_s": compact_s, "speedup": dense_s / compact_s}


def compact(
    model: nn.Module,
    example_inputs: Any,
    *,
    measure: bool = True,
    batch_size: int = 64,
    repeats: int = 10,
    key: str = "compact",
) -> tuple[nn.Module, dict[str, Any]]:
    """Remove the pruned channels of ``model`` for real, in place, and report what it saved.

    Masks and constraints (parametrizations) are baked first. ``model`` is changed in place and
    returned (``copy.deepcopy`` it first to keep the original); its training mode is kept.

    Args:
        model: any ``nn.Module`` Torch-Pruning can trace (a LightningModule too).
        example_inputs: inputs for one forward pass (a tensor, a tuple, or a dict of kwargs).
        measure: also time the dense and the compact model at ``batch_size`` (alternating,
            median of ``repeats``) on the model's device, for ``speedup``.
        batch_size: batch for the latency measurement.
        repeats: timed forward passes of each model.
        key: the config key named in errors.

    Returns:
        ``(model, report)``; the report holds ``params_before``, ``params_after``,
        ``macs_before``, ``macs_after``, ``channels`` (layer -> "kept/total" output channels),
        ``inexact`` (norm layers for which removal is not exact), ``kept_indices`` (state-dict
        key -> dim -> the full-width indices kept, to load full-width checkpoints), and when measured
        ``latency_dense_s``, ``latency_compact_s`` and ``speedup`` (dense / compact).

    Raises:
        ConfigError: the model cannot be traced, or a conv/linear layer with zeroed channels is
            not called as a module (so the graph does not see it).
    """
    bake(model)
    with evaluating(model):
        dg = trace(model, example_inputs, key=key)
        macs_before, params_before = count(model, example_inputs)
        dense = copy.deepcopy(model) if measure else None
        twin, shapes, steps = index_twin(model), {k: v.shape for k, v in model.state_dict().items()}, []
        names = {m: n for n, m in model.named_modules()}
        _refuse_untraced(model, dg, key)
        before = _widths(dg, names)
        expected = outputs(model, example_inputs)
        ties = tied_owners(model)
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        inexact = _prune_removable(dg, names, steps)
        _fix_feature_counts(model)
        for name, p in model.named_parameters():  # Torch-Pruning's sliced Parameters all train
            if name in frozen:
                p.requires_grad_(False)
        check_ties(ties)
        check_equal(expected, model, example_inputs, inexact)
        if inexact:
            warnings.warn(
                CompactionWarning(
                    f"compaction changes the outputs of {sorted(inexact)}: their norm does not send a "
                    "removed (zero) channel to zero; equivalence holds for batch/instance norms with "
                    "masked scale and shift, and for no norm"
                ),
                stacklevel=2,
            )
        macs_after, params_after = count(model, example_inputs)
        after = _widths(dg, names)
        report: dict[str, Any] = {
            "params_before": params_before,
            "params_after": params_after,
            "macs_before": macs_before,
            "macs_after": macs_after,
            "channels": {n: f"{after[n]}/{before[n]}" for n in sorted(before)},
            "inexact": sorted(inexact),
            "kept_indices": kept_indices(twin, shapes, steps, example_inputs),
        }
        if measure:
            report.update(side_by_side(dense, model, batch_of(example_inputs, batch_size), repeats))
    return model, report


def compact_copy(
    model: nn.Module, example_inputs: Any, **kwargs: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`compact` on an independent copy, leaving ``model`` as it is (masks included)."""
    return compact(independent_copy(model), example_inputs, **kwargs)
