"""Torch-Pruning's dependency graph, read as coupled groups: the output channels that go together
(residual additions), the norm layers after them and the layers consuming them."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import parametrize

from plugins.core.errors import ConfigError
from plugins.core.masks import bake
from plugins.core.modes import evaluating

__all__ = ["CONV_LINEAR", "CoupledGroup", "trace", "coupled_groups", "independent_copy", "call_with"]


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


def call_with(model: nn.Module, inputs: Any) -> Any:
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
    # In-place activations rewrite the autograd graph of a view (InstanceNorm's output is one), so
    # the tracer would lose that norm layer: trace with them out of place.
    inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in inplace:
        m.inplace = False
    # The tracer follows autograd's graph: a frozen layer (requires_grad=False) would leave none.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with evaluating(model), torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False)
    except Exception as err:  # noqa: BLE001 - whatever the tracer trips on, the user must hear it
        raise ConfigError(
            key,
            _shapes(example_inputs),
            f"an example input {type(model).__name__}'s forward takes, for Torch-Pruning's dependency graph "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
        ) from None
    finally:
        for m in inplace:
            m.inplace = True
        for p in frozen:
            p.requires_grad_(False)


def _shapes(inputs: Any) -> Any:
    """The example input as its shapes (what ``example_input_shape`` says), for a message."""
    if torch.is_tensor(inputs):
        return list(inputs.shape)
    if isinstance(inputs, (tuple, list)):
        return [_shapes(i) for i in inputs]
    if isinstance(inputs, dict):
        return {k: _shapes(v) for k, v in inputs.items()}
    return type(inputs).__name__


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
