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
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import parametrize

from plugins.core.errors import ConfigError
from plugins.core.masks import bake

__all__ = [
    "CONV_LINEAR",
    "CoupledGroup",
    "trace",
    "coupled_groups",
    "compact",
    "compact_copy",
    "kept_indices",
    "independent_copy",
    "latency",
    "count",
]

CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_RUNNING_STATS_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class CoupledGroup:
    """Output channels that go together: ``producers`` (conv/linear layers), ``norms`` (the
    channel-wise layers after them) and ``consumers`` (layers taking the channels as input)."""

    size: int
    producers: list[nn.Module] = field(default_factory=list)
    norms: list[nn.Module] = field(default_factory=list)
    consumers: list[nn.Module] = field(default_factory=list)
    is_output: bool = False
    identity: bool = True  # every producer and norm uses the root's channel indices as they are


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def trace(model: nn.Module, example_inputs: Any, key: str = "compact") -> tp.DependencyGraph:
    """Build Torch-Pruning's dependency graph of ``model`` in eval mode (no running-stat update).

    Raises:
        ConfigError: naming ``key`` and the model when the graph cannot be traced.
    """
    was_training = model.training
    model.eval()
    # In-place activations rewrite the autograd graph of a view (InstanceNorm's output is one), so
    # the tracer would lose that norm layer: trace with them out of place.
    inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in inplace:
        m.inplace = False
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False)
    except Exception as err:  # noqa: BLE001 - whatever the tracer trips on, the user must hear it
        raise ConfigError(
            key,
            type(model).__name__,
            f"a model Torch-Pruning's dependency graph can trace with the example inputs "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
        ) from None
    finally:
        model.train(was_training)
        for m in inplace:
            m.inplace = True


def _groups(dg: tp.DependencyGraph):
    """Yield (group, CoupledGroup) for every group rooted at a conv or linear layer."""
    for group in dg.get_all_groups(root_module_types=CONV_LINEAR):
        info = CoupledGroup(size=len(group[0].idxs))
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            same = list(item.idxs) == list(item.root_idxs)
            if dg.is_out_channel_pruning_fn(handler):
                if isinstance(module, CONV_LINEAR):
                    info.producers.append(module)
                    info.is_output |= len(dg.module2node[module].outputs) == 0
                    info.identity &= same
                elif isinstance(module, _RUNNING_STATS_NORMS) or (
                    isinstance(module, nn.Module)
                    and any(True for _ in module.parameters(recurse=False))
                ):
                    info.norms.append(module)
                    info.identity &= same
            elif isinstance(module, nn.Module) and module not in info.consumers:
                info.consumers.append(module)
        yield group, info


def coupled_groups(
    model: nn.Module, example_inputs: Any, key: str = "pruning"
) -> list[CoupledGroup]:
    """The dependency groups of ``model`` (its own module objects); used by
    :class:`~plugins.pruning.structured.StructuredPruning` to mask coupled tensors together.

    Traced on a baked copy, as :func:`compact` traces: a parametrization's own operations
    (PyTorch's orthogonal maps) would enter the graph, and Torch-Pruning cannot map them.
    """
    replica = independent_copy(model)
    bake(replica)
    own = dict(model.named_modules())
    name_of = {m: n for n, m in replica.named_modules()}

    def mine(modules: list[nn.Module]) -> list[nn.Module]:
        # Torch-Pruning's own operation nodes have no name in the model: kept as they are.
        return [own.get(name_of.get(m), m) for m in modules]

    groups = []
    for _, info in _groups(trace(replica, example_inputs, key=key)):
        info.producers, info.norms = mine(info.producers), mine(info.norms)
        info.consumers = mine(info.consumers)
        groups.append(info)
    return groups


def count(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """(MACs, parameters) for one forward pass on ``example_inputs`` (Torch-Pruning's counter)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
    finally:
        model.train(was_training)
    return int(macs), sum(p.numel() for p in model.parameters())


@torch.no_grad()
def latency(model: nn.Module, inputs: Any, repeats: int = 10, warmup: int = 2) -> list[float]:
    """Seconds per forward pass, ``repeats`` measurements after ``warmup`` (eval, no grad)."""
    was_training = model.training
    model.eval()
    times = []
    try:
        for i in range(warmup + repeats):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            _call(model, inputs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return times


def _batch_of(example_inputs: Any, batch_size: int) -> Any:
    """Random inputs shaped like ``example_inputs`` with ``batch_size`` rows."""
    if torch.is_tensor(example_inputs):
        shape = (batch_size, *example_inputs.shape[1:])
        if example_inputs.is_floating_point():
            return torch.randn(shape, dtype=example_inputs.dtype, device=example_inputs.device)
        return example_inputs[:1].expand(shape).clone()
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(_batch_of(x, batch_size) for x in example_inputs)
    return example_inputs


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


def _as_double(inputs: Any) -> Any:
    if torch.is_tensor(inputs):
        return inputs.double() if inputs.is_floating_point() else inputs
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_as_double(x) for x in inputs)
    if isinstance(inputs, dict):
        return {k: _as_double(v) for k, v in inputs.items()}
    return inputs


@torch.no_grad()
def _index_twin(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` whose every floating tensor holds its own flat indices."""
    twin = copy.deepcopy(model).double()
    for t in [*twin.parameters(), *twin.buffers()]:
        if t.is_floating_point():
            t.copy_(torch.arange(t.numel(), dtype=torch.float64, device=t.device).view_as(t))
    return twin


def kept_indices(
    twin: nn.Module, shapes: dict[str, torch.Size], steps: list[tuple[str, list[int]]], example_inputs: Any
) -> dict[str, dict[int, torch.Tensor]]:
    """Which indices of the full-width model each compacted tensor kept, per state-dict key and dim.

    ``twin`` is :func:`_index_twin` of the model before compaction, ``shapes`` its state-dict shapes
    and ``steps`` the ``(root layer, removed indices)`` prunings in the order :func:`compact` made
    them. Replaying them on the twin moves the index values the way Torch-Pruning moved the weights,
    for any layer type it handles, so the plan needs no knowledge of what a handler slices.
    """
    dg = trace(twin, _as_double(example_inputs))
    modules = dict(twin.named_modules())
    for name, removed in steps:
        layer = modules[name]
        pruner = dg.get_pruner_of_module(layer)
        dg.get_pruning_group(layer, pruner.prune_out_channels, removed).prune(record_history=False)
    plan: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in twin.state_dict().items():
        full = shapes.get(key)
        if full is None or not value.is_floating_point() or tuple(value.shape) == tuple(full):
            continue
        flat, coords = value.detach().long().cpu(), {}
        for dim in reversed(range(len(full))):
            coords[dim], flat = flat % full[dim], flat // full[dim]
        plan[key] = {
            dim: coords[dim].movedim(dim, 0).reshape(value.shape[dim], -1)[:, 0].clone()
            for dim in range(len(full))
            if value.shape[dim] != full[dim]
        }
    return plan


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
    was_training = model.training
    model.eval()
    dg = trace(model, example_inputs, key=key)
    macs_before, params_before = count(model, example_inputs)
    dense = copy.deepcopy(model) if measure else None
    twin, shapes, steps = _index_twin(model), {k: v.shape for k, v in model.state_dict().items()}, []
    names = {m: n for n, m in model.named_modules()}
    for name, module in model.named_modules():
        if isinstance(module, CONV_LINEAR) and module not in dg.module2node:
            if _zero_slices(module.weight, 0).any() or _zero_slices(module.weight, 1).any():
                raise ConfigError(
                    key,
                    name,
                    "layers called as modules in forward (the dependency graph cannot see it)",
                )
    before = {
        names[m]: getattr(m, "out_channels", getattr(m, "out_features", 0))
        for m in dg.module2node
        if isinstance(m, CONV_LINEAR)
    }
    inexact: set[str] = set()
    # get_all_groups is lazy: each group is computed after the previous one was pruned.
    for group, info in _groups(dg):
        if info.is_output:
            continue
        removable, by_producers = _removable(group, info, dg)
        if not removable:
            continue
        if len(removable) == info.size:
            removable = removable[1:]  # keep one (all-zero) channel so that the layers stay valid
            if not removable:
                continue
        if by_producers:
            inexact.update(_inexact_norms(info, removable, names))
        root = group[0].dep
        steps.append((names[root.target.module], list(removable)))
        dg.get_pruning_group(root.target.module, root.handler, removable).prune(
            record_history=False
        )
    _fix_feature_counts(model)
    if inexact:
        warnings.warn(
            f"compaction changes the outputs of {sorted(inexact)}: their norm does not send a "
            "removed (zero) channel to zero; equivalence holds for batch/instance norms with "
            "masked scale and shift, and for no norm",
            stacklevel=2,
        )
    macs_after, params_after = count(model, example_inputs)
    after = {
        names[m]: getattr(m, "out_channels", getattr(m, "out_features", 0))
        for m in dg.module2node
        if isinstance(m, CONV_LINEAR)
    }
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
        inputs = _batch_of(example_inputs, batch_size)
        t_dense, t_compact = [], []
        for _ in range(repeats):  # alternate so that load from other processes hits both alike
            t_dense += latency(dense, inputs, repeats=1, warmup=1)
            t_compact += latency(model, inputs, repeats=1, warmup=1)
        report["latency_dense_s"] = statistics.median(t_dense)
        report["latency_compact_s"] = statistics.median(t_compact)
        report["speedup"] = report["latency_dense_s"] / report["latency_compact_s"]
    model.train(was_training)
    return model, report


def independent_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that is safe for parametrized models.

    A parametrized module's class is generated per module and holds the ``weight`` property; a
    plain deep copy shares that class, so removing a parametrization from the copy (baking it)
    deletes the property from the original too. Each parametrized module of the copy gets a class
    of its own here.
    """
    replica = copy.deepcopy(model)
    for module in replica.modules():
        if parametrize.is_parametrized(module):
            cls = module.__class__
            body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, body)
    return replica


def compact_copy(
    model: nn.Module, example_inputs: Any, **kwargs: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`compact` on an independent copy, leaving ``model`` as it is (masks included)."""
    return compact(independent_copy(model), example_inputs, **kwargs)
