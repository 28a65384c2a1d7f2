"""Compaction checks itself: the compact model must compute what the masked model did, on the
example batch, or the run stops naming the first layer whose output changed."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from plugins.core.errors import CompactionMismatch
from plugins.pruning.dependency import call_with

__all__ = ["outputs", "check_equal", "tied_owners", "check_ties"]


def _first_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor of a model's output (a tensor, a tuple, a dict or a ModelOutput)."""
    if torch.is_tensor(out):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return next((t for t in map(_first_tensor, values) if t is not None), None)


def outputs(model: nn.Module, example_inputs: Any) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The model's output and the output of every named submodule, in call order."""
    seen: dict[str, torch.Tensor] = {}
    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:  # None: the output stays as it is
            seen.setdefault(name, _first_tensor(out))

        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            out = _first_tensor(call_with(model, example_inputs))
    finally:
        for hook in hooks:
            hook.remove()
    return out, {n: t for n, t in seen.items() if t is not None}


def check_equal(
    expected: tuple[torch.Tensor | None, dict[str, torch.Tensor]],
    model: nn.Module,
    example_inputs: Any,
    inexact: set[str],
) -> None:
    """Compaction checks itself: the compact model must compute what the masked one did."""
    want, layers = expected
    try:
        got, now = outputs(model, example_inputs)
    except Exception as err:  # noqa: BLE001 - any failure of the compact model is the finding
        raise CompactionMismatch(
            f"the compact model no longer runs ({type(err).__name__}: {err}): this structure cannot be "
            "compacted exactly; set compact=false"
        ) from None
    if want is None or got is None:
        return
    tol = 1e-5 * max(1.0, float(want.abs().max()))
    if got.shape == want.shape and float((got - want).abs().max()) <= tol or inexact:
        return
    # The first layer (in call order) whose output keeps its shape and changes is the culprit.
    changed = (n for n, t in layers.items() if n in now and now[n].shape == t.shape and _differ(now[n], t, tol))
    culprit = next(changed, "the model's output")
    raise CompactionMismatch(
        f"compaction changed the outputs (max difference {float((got - want).abs().max()):.3g} > {tol:.1g}), "
        f"first at {culprit}: this structure cannot be compacted exactly; set compact=false"
    )


def _differ(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return float((a - b).abs().max()) > tol


def tied_owners(model: nn.Module) -> list[list[tuple[nn.Module, str, str]]]:
    """The parameters owned by more than one module (tied weights), as lists of ``(module, attribute,
    qualified name)``."""
    owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                entry = (module, attr, f"{module_name}.{attr}" if module_name else attr)
                if all(m is not module or a != attr for m, a, _ in owners.get(id(p), [])):
                    owners.setdefault(id(p), []).append(entry)
    return [group for group in owners.values() if len(group) > 1]


def check_ties(ties: list[list[tuple[nn.Module, str, str]]]) -> None:
    """Every tie found before compaction (:func:`tied_owners`) must hold after it."""
    for group in ties:
        first = getattr(group[0][0], group[0][1])
        for module, attr, name in group[1:]:
            if getattr(module, attr) is not first:
                raise CompactionMismatch(
                    f"compaction untied {group[0][2]} and {name} (tied weights): this structure cannot be "
                    "compacted without changing what the model shares; leave their channels out"
                )
