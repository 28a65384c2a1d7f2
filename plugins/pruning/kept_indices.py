"""Which full-width indices a compacted model kept, per state-dict key and dim: what lets a compacted
module load the full-width checkpoints written while it trained."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from plugins.pruning.dependency import trace

__all__ = ["index_twin", "kept_indices"]


def _as_double(inputs: Any) -> Any:
    if torch.is_tensor(inputs):
        return inputs.double() if inputs.is_floating_point() else inputs
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_as_double(x) for x in inputs)
    if isinstance(inputs, dict):
        return {k: _as_double(v) for k, v in inputs.items()}
    return inputs


@torch.no_grad()
def index_twin(model: nn.Module) -> nn.Module:
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

    ``twin`` is :func:`index_twin` of the model before compaction, ``shapes`` its state-dict shapes
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
