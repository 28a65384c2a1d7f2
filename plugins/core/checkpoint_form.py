"""The checkpoint form of a model with plugins on: plain names, and the plugins' raw state beside.

A parametrized tensor lives in a module's state dict as ``net.0.parametrizations.weight.original``
plus one entry per parametrization (``...weight.0.mask``). A module built as usual has
``net.0.weight``, so ``Module.load_from_checkpoint(path)`` and ``trainer.test(ckpt_path="best")``
would fail on missing and unexpected keys. Every plugin callback therefore writes checkpoints in one
form, built here:

- ``checkpoint["state_dict"]`` holds the plain names with the values the module computes with
  (masks and constraints applied, as they will be baked: a learned mask's gates rounded): exactly
  what the model without plugins would hold, so any module built as usual loads it and computes
  what the trained model computes;
- ``checkpoint["parametrizations"]`` holds the raw entries taken out (the unconstrained tensor when
  it differs from the computed one, the masks, learned gate scores), which the plugins put back when
  they resume, so that a resumed run continues exactly.

Loading goes the other way in two phases. A ``load_state_dict`` pre-hook on the LightningModule
(:func:`install_load_hook`, called from the plugins' ``setup``) turns plain names into the
parametrized ones of the live module (masks all ones, the stored tensor through ``right_inverse``),
slices full-width tensors down to a compacted module's widths (:func:`set_compaction_plan`), and
checks keys and shapes *before* a single tensor is copied, so a load that fails leaves the live model
as it was. Then each plugin's ``on_load_checkpoint`` calls :func:`restore_raw`, which copies the raw
entries back (Lightning restores callbacks after the model).

Cost: one evaluation of each parametrization per checkpoint save; nothing during training steps.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "RAW_KEY",
    "CheckpointMismatch",
    "parametrized_tensors",
    "to_plain_form",
    "install_load_hook",
    "set_compaction_plan",
    "plain_state",
    "restore_raw",
]

RAW_KEY = "parametrizations"
_HOOK_ATTR = "_sparsekit_load_hook"


class CheckpointMismatch(RuntimeError):
    """A state dict that does not fit the live model: raised before any tensor is copied."""


def parametrized_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(module name, module, tensor name)`` of every parametrized tensor of ``model``."""
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name in module.parametrizations.keys():
                yield name, module, tensor_name


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


@torch.no_grad()
def to_plain_form(checkpoint: dict[str, Any], model: nn.Module) -> None:
    """Rewrite ``checkpoint["state_dict"]`` of ``model`` (a LightningModule) in plain names, moving
    the raw parametrization entries to ``checkpoint["parametrizations"]``. Idempotent: every plugin
    calls it from ``on_save_checkpoint`` and only the first call finds work."""
    state = checkpoint.get("state_dict")
    if state is None:
        return
    raw: dict[str, torch.Tensor] = checkpoint.setdefault(RAW_KEY, {})
    for mod_name, module, tensor_name in parametrized_tensors(model):
        head = _join(mod_name, "parametrizations", tensor_name) + "."
        entries = {k: state.pop(k) for k in [k for k in state if k.startswith(head)]}
        if not entries:
            continue
        with _as_finalized(module.parametrizations[tensor_name]):
            computed = getattr(module, tensor_name).detach().clone()
        original = entries.pop(head + "original")
        if not torch.equal(original, computed):  # masks alone leave them equal: keep one copy
            raw[head + "original"] = original
        raw.update(entries)
        state[_join(mod_name, tensor_name)] = computed


@contextmanager
def _as_finalized(chain: nn.Module) -> Iterator[None]:
    """The chain as it will be baked: each parametrization's ``finalize_`` applied (a learned mask
    rounds its gates), then its own state put back. A checkpoint's plain tensors are then the ones
    fit would end with, had it ended there: ``load_from_checkpoint(last)`` computes what the trained
    model does. Costs one copy of that state per save."""
    saved = []
    for p in chain:
        if callable(getattr(p, "finalize_", None)):
            saved.append((p, {name: t.detach().clone() for name, t in _own_state(p)}))
            p.finalize_()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, state in saved:
                for name, t in _own_state(p):
                    t.copy_(state[name])


def _own_state(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


def _plain_to_parametrized(model: nn.Module, state: dict[str, Any], prefix: str) -> None:
    """In place: plain entries of parametrized tensors become the live module's parametrized keys."""
    live = None
    for mod_name, module, tensor_name in parametrized_tensors(model):
        plain = prefix + _join(mod_name, tensor_name)
        head = prefix + _join(mod_name, "parametrizations", tensor_name) + "."
        if plain not in state or head + "original" in state:
            continue
        value = state.pop(plain)
        chain = module.parametrizations[tensor_name]
        if tuple(value.shape) == tuple(getattr(module, tensor_name).shape):
            with torch.no_grad():
                value = value.to(chain.original)
                for p in reversed(list(chain)):
                    inverse = getattr(p, "right_inverse", None)
                    if inverse is not None:
                        try:
                            value = inverse(value)
                        except Exception:  # noqa: BLE001 - not invertible: the raw entry restores it
                            break
                        value = value[0] if isinstance(value, (tuple, list)) else value
        state[head + "original"] = value
        if live is None:
            live = model.state_dict(keep_vars=True)
        for key, tensor in live.items():
            full = prefix + key
            if full.startswith(head) and full not in state:
                # A mask of ones: the module computes the plain value as saved.
                state[full] = torch.ones_like(tensor) if key.endswith(".mask") else tensor.detach().clone()


def _dropped(size: int, kept: torch.Tensor) -> torch.Tensor:
    keep = torch.zeros(size, dtype=torch.bool)
    keep[kept.cpu()] = True
    return (~keep).nonzero().flatten()


def _slice(state: dict[str, Any], hook: _LoadHook, prefix: str) -> None:
    sliced, nonzero = {}, []
    for key, dims in hook.plan.items():
        value = state.get(prefix + key)
        if not torch.is_tensor(value):
            continue
        for dim, kept in dims.items():
            if kept.numel() and value.shape[dim] != kept.numel() and value.shape[dim] > int(kept.max()):
                dropped = hook.zeros.get(key, {}).get(dim)
                if dropped is not None and value.index_select(dim, dropped.to(value.device)).any():
                    nonzero.append(key)
                value = value.index_select(dim, kept.to(value.device))
        sliced[prefix + key] = value
    if nonzero:
        # A checkpoint from before the pruning (or of another one): slicing would drop weights
        # that still count, and the compacted model would compute something else, silently.
        shown = ", ".join(nonzero[:3]) + (f" and {len(nonzero) - 3} more" if len(nonzero) > 3 else "")
        raise CheckpointMismatch(
            f"the checkpoint does not fit this compacted model: {shown} hold non-zero values where "
            "compaction removed zeros (a checkpoint saved before this pruning); load it into the "
            "full-width model instead; the model was left unchanged"
        )
    state.update(sliced)


def _check_fits(model: nn.Module, state: Mapping[str, Any], prefix: str) -> None:
    live = model.state_dict(keep_vars=True)
    wanted = {prefix + k: tuple(v.shape) for k, v in live.items()}
    given = {k: tuple(v.shape) for k, v in state.items() if k.startswith(prefix) and torch.is_tensor(v)}
    problems = [f"{k}: missing" for k in wanted if k not in given]
    problems += [f"{k}: not in the model" for k in given if k not in wanted]
    problems += [
        f"{k}: {list(given[k])} in the checkpoint, {list(shape)} in the model"
        for k, shape in wanted.items()
        if k in given and given[k] != shape
    ]
    if problems:
        problems = [re.sub(r"\.parametrizations\.(\w+)\.original\b", r".\1", p) for p in problems]
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CheckpointMismatch(f"the checkpoint does not fit this model ({shown}); the model was left unchanged")


class _LoadHook:
    """The ``load_state_dict`` pre-hook of a LightningModule with plugins (see the module doc)."""

    def __init__(self) -> None:
        self.plan: dict[str, dict[int, torch.Tensor]] = {}
        self.zeros: dict[str, dict[int, torch.Tensor]] = {}  # slices that were all zero when removed

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        _plain_to_parametrized(module, state_dict, prefix)
        if self.plan:
            _slice(state_dict, self, prefix)
        if strict:
            _check_fits(module, state_dict, prefix)


def install_load_hook(model: nn.Module) -> None:
    """Let ``model`` load checkpoints in plain form while plugins parametrize it (once per model)."""
    if getattr(model, _HOOK_ATTR, None) is None:
        hook = _LoadHook()
        model.register_load_state_dict_pre_hook(hook)
        object.__setattr__(model, _HOOK_ATTR, hook)


def set_compaction_plan(
    model: nn.Module, plan: Mapping[str, Mapping[int, torch.Tensor]], before: Mapping[str, torch.Tensor]
) -> None:
    """After compaction: full-width checkpoints load into ``model`` sliced to its kept indices
    (``plan``: state-dict key -> dim -> kept indices, from :func:`plugins.pruning.compaction.compact`).

    ``before`` holds the plain state of the model right before compaction. A removed slice that was
    all zero there (a pruned output channel, its bias) must be all zero in a checkpoint that loads:
    one saved before the pruning is refused with :class:`CheckpointMismatch`, not sliced into a
    model that computes something else. Slices removed because their input is gone (the next
    layer's input channels, a norm's running statistics) may hold anything.
    """
    install_load_hook(model)
    hook = getattr(model, _HOOK_ATTR)
    hook.plan = {k: dict(v) for k, v in plan.items()}
    hook.zeros = {}
    for key, dims in hook.plan.items():
        value = before.get(key)
        for dim, kept in dims.items() if torch.is_tensor(value) else ():
            dropped = _dropped(value.shape[dim], kept)
            if dropped.numel() and not value.index_select(dim, dropped.to(value.device)).any():
                hook.zeros.setdefault(key, {})[dim] = dropped


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict in plain names, with the values it computes with (a checkpoint's form)."""
    checkpoint = {"state_dict": model.state_dict()}
    to_plain_form(checkpoint, model)
    return checkpoint["state_dict"]


@torch.no_grad()
def restore_raw(model: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Copy the raw parametrization entries of ``checkpoint`` into ``model`` (a resumed run's
    masks, unconstrained tensors, gate scores). Entries the live model does not hold (baked or
    compacted since) are skipped: the plain values already loaded are what it computes with."""
    raw = checkpoint.get(RAW_KEY) or {}
    if not raw:
        return
    live = model.state_dict(keep_vars=True)
    for key, value in raw.items():
        target = live.get(key)
        if target is not None and tuple(target.shape) == tuple(value.shape):
            target.data.copy_(value)

