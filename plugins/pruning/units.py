"""Units of structured pruning: the slices pruned together (one target, or a coupled dependency
group with its biases and norms), built once in ``setup``."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn.utils import parametrize

from plugins.core.decision import Group
from plugins.core.errors import ConfigError
from plugins.core.masks import get_mask, prune_in_place, set_mask
from plugins.core.schedules import Schedule
from plugins.core.selection import Target
from plugins.pruning.dependency import CONV_LINEAR, CoupledGroup, coupled_groups

__all__ = [
    "build_units",
    "check_schedule_values",
    "example_inputs",
    "kept_slices",
    "nonzero_slices",
    "refuse_unbaked_constraints",
    "settle",
]


def build_units(
    pl_module: nn.Module, targets: list[Target], dim: int, couple: bool, example: Any, key: str, exclude: list[str]
) -> list[Group]:
    """The slices pruned together: one unit per target, or with ``dim=0`` and ``couple`` one per
    dependency group (residual additions share one mask; biases and norm scale/shift follow)."""
    if not (couple and dim == 0):
        return [Group(t.name, [t], t.raw.shape[dim], dim, min_keep=1) for t in targets]
    by_module = _by_module(targets, key)
    names = {m: n for n, m in pl_module.named_modules()}
    units, seen = [], set()
    for group in coupled_groups(pl_module, example, key=f"{key}.example_input_shape"):
        chosen = [by_module[m] for m in group.producers if m in by_module]
        if not chosen:
            continue
        _check_group(group, chosen, by_module, names, key, exclude)
        units.append(Group(chosen[0].name, chosen, group.size, dim, _extras(group, names), min_keep=1))
        seen.update(t.module for t in chosen)
    untraced = [t.name for t in targets if t.module not in seen]
    if untraced:
        raise ConfigError(
            f"{key}.targets",
            untraced[0],
            "layers the dependency graph traces (called as modules in forward)",
        )
    return units


def _by_module(targets: list[Target], key: str) -> dict[nn.Module, Target]:
    by_module = {}
    for t in targets:
        if t.tensor_name != "weight" or not isinstance(t.module, CONV_LINEAR):
            raise ConfigError(
                f"{key}.targets", t.name, "Conv/Linear weights when dim=0 and couple=true (biases, norms follow)"
            )
        by_module[t.module] = t
    return by_module


def _check_group(
    group: CoupledGroup,
    chosen: list[Target],
    by_module: dict[nn.Module, Target],
    names: dict[nn.Module, str],
    key: str,
    exclude: list[str],
) -> None:
    """A group is selected whole, is not the output layer, and maps its channels one to one."""
    first = chosen[0].name
    if group.is_output:
        raise ConfigError(
            f"{key}.exclude",
            exclude,
            f"a list that leaves out the model's output layer ({first}): "
            "its output channels are the outputs",
        )
    missing = [names[m] for m in group.producers if m not in by_module]
    if missing:
        raise ConfigError(
            f"{key}.targets",
            missing[0],
            f"selected together with {first}: their output channels are added "
            "(residual) and "
            "are pruned as one group; select all of the group or none",
        )
    if not group.identity:
        raise ConfigError(
            f"{key}.targets",
            first,
            "layers whose channels map one to one in their group (no concatenation)",
        )


def _extras(group: CoupledGroup, names: dict[nn.Module, str]) -> list[tuple[str, nn.Module, str]]:
    """The tensors that follow a group's channel mask: the producers' biases, the norms' scale/shift."""
    extras = []
    for m in group.producers:
        if m.bias is not None:
            extras.append((f"{names[m]}.bias", m, "bias"))
    for m in group.norms:
        for tensor_name in ("weight", "bias"):
            p = getattr(m, tensor_name, None)
            if isinstance(p, torch.Tensor) and p.dim() == 1 and p.shape[0] == group.size:
                extras.append((f"{names[m]}.{tensor_name}", m, tensor_name))
    return extras


def example_inputs(trainer: L.Trainer, pl_module: L.LightningModule, shape: list[int] | None, key: str) -> Any:
    """Inputs to trace the model with: ``shape``, the module's ``example_input_array``, or a batch
    of whatever ``fit`` was given."""
    device = next(pl_module.parameters()).device
    if shape:
        return torch.randn(shape, device=device)
    if pl_module.example_input_array is not None:
        return pl_module.example_input_array
    datamodule = getattr(trainer, "datamodule", None)
    sources = [
        # What fit() was given (dataloaders, a datamodule or the module's own hook). Lightning's
        # public trainer.train_dataloader is set only after setup and the checkpoint restore, and
        # the masks must exist before that restore: no public accessor exists this early.
        lambda: trainer.fit_loop._data_source.dataloader(),
        *(
            getattr(datamodule, n)
            for n in ("train_dataloader", "val_dataloader", "test_dataloader")
            if datamodule is not None
        ),
    ]
    for source in sources:
        try:
            batch = next(iter(source()))
        except Exception:  # noqa: BLE001 - try the next source
            continue
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if torch.is_tensor(x):
            return x[:2].to(device)
    raise ConfigError(
        f"{key}.example_input_shape",
        None,
        "the input shape to trace the model with (e.g. [2, 1, 8, 8]): the module has no "
        "example_input_array and no datamodule batch could be read",
    )


def kept_slices(unit: Group, dim: int) -> torch.Tensor:
    """The slices of ``unit`` kept (bool, one per slice along ``dim``).

    While the tensors carry their mask, the mask says; it may be the full tensor's (shared with
    hardshrink): a slice is kept while any of its entries is. Once the mask is gone (baked by the
    pruning callback, or with a constraint on the same tensor by WeightConstraints, whose bake
    removes every parametrization of the tensor; or by compaction), the weights say
    (:func:`nonzero_slices`; after compaction, fewer than ``unit.size`` slices).
    """
    mask = get_mask(unit.members[0].module, unit.members[0].tensor_name)
    if mask is None:
        return nonzero_slices(unit, dim)
    m = mask.mask.detach()
    return (m.movedim(dim % m.dim(), 0).reshape(unit.size, -1) != 0).any(dim=1).cpu()


@torch.no_grad()
def nonzero_slices(unit: Group, dim: int) -> torch.Tensor:
    """Slices along ``dim`` where some member, as the module computes with it (constraints, then
    the mask), has a nonzero entry: what the final weights (``model.pt``) hold."""
    keep = None
    for member in unit.members:
        w = member.tensor.detach()
        d = dim % w.dim()
        nonzero = (w.movedim(d, 0).reshape(w.shape[d], -1) != 0).any(dim=1).cpu()
        keep = nonzero if keep is None else keep | nonzero
    return keep


def settle(unit: Group, dim: int, optimizers: list[torch.optim.Optimizer] = ()) -> None:
    """At the end of fit: a slice whose weights are all zero in every member counts as pruned,
    whatever zeroed it (this mask, hardshrink's, or a constraint before it: a learned mask's
    rounded gates, a clamp). Its mask, bias and norm follow, so that ``channels``, the baked
    weights and the compact model agree (compaction removes exactly these slices)."""
    keep = kept_slices(unit, dim) & nonzero_slices(unit, dim)
    for member in unit.members:
        if get_mask(member.module, member.tensor_name) is not None:
            shape = [1] * member.raw.dim()
            shape[dim % member.raw.dim()] = unit.size
            set_mask(member.module, member.tensor_name, keep.view(shape).to(member.raw.device), optimizers)
    for _, module, tensor_name in unit.extras:
        device = getattr(module, tensor_name).device
        if get_mask(module, tensor_name) is not None:
            set_mask(module, tensor_name, keep.to(device), optimizers)
        elif not parametrize.is_parametrized(module, tensor_name):
            prune_in_place(module, tensor_name, keep.to(device), optimizers)


def refuse_unbaked_constraints(trainer: L.Trainer, key: str) -> None:
    """Compaction bakes every parametrization of the model: refuse it next to constraints told to
    stay parametrizations after fit (their summary and state would describe tensors that are gone)."""
    from plugins.constraints import WeightConstraints

    for callback in trainer.callbacks if trainer is not None else []:
        if isinstance(callback, WeightConstraints) and not callback.bake_at_end:
            raise ConfigError(
                f"{key}.compact",
                True,
                f"false while {callback.key}.bake_at_end=false keeps the constraints as "
                f"parametrizations (compaction bakes them; set {callback.key}.bake_at_end=true to compact)",
            )


def check_schedule_values(schedule: Schedule, count_mode: bool, key: str, amount_given: bool) -> None:
    """The schedule's values are fractions in [0, 1], or whole counts when ``end`` is an integer."""
    for name, v in (("start", schedule.start), ("end", schedule.end)):
        bad = (v < 0 or v != int(v)) if count_mode else not 0.0 <= v <= 1.0
        if bad:
            allowed = "a whole count >= 0" if count_mode else "a fraction in [0, 1] (or an integer count)"
            where = f"{key}.amount" if amount_given else f"{key}.schedule.{name}"
            raise ConfigError(where, v, allowed)
