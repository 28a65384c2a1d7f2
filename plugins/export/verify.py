"""The end-to-end check of a sparse export: the exported model's outputs against the baked
model's on the example input, and, when they differ, the first swapped layer that does."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from plugins.export.choose import max_difference, run, tolerance

__all__ = ["Example", "SparseExportMismatch", "verify_export"]

Example = torch.Tensor | tuple


class SparseExportMismatch(RuntimeError):
    """The exported model's outputs differ from the baked model's beyond the tolerance."""


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def _outputs(model: nn.Module, example: Example) -> list[torch.Tensor]:
    return [t for t in tree_leaves(run(model, example)) if isinstance(t, torch.Tensor)]


def _first_layer_apart(dense: nn.Module, exported: nn.Module, names: list[str], example: Example, atol: float) -> str:
    """The first swapped layer (in call order) whose output differs beyond the tolerance."""
    seen: dict[str, dict[str, torch.Tensor]] = {"dense": {}, "sparse": {}}
    handles = []
    for key, model in (("dense", dense), ("sparse", exported)):
        for name in names:
            hook = (lambda store, n: lambda m, a, out: store.setdefault(n, out.detach().clone()))(seen[key], name)
            handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        run(dense, example), run(exported, example)
    finally:
        for handle in handles:
            handle.remove()
    for name in seen["sparse"]:
        diff = max_difference(seen["sparse"][name], seen["dense"][name])
        if not diff <= tolerance(seen["dense"][name], atol):
            return f"layer {name!r} (output differs by {diff:.3g})"
    return f"no single sparse layer ({', '.join(names)})"


def verify_export(dense: nn.Module, exported: nn.Module, swapped: list[str], example: Example, atol: float) -> None:
    """Raise :class:`SparseExportMismatch` naming the first layer apart if any output of
    ``exported`` differs from ``dense``'s beyond :func:`~plugins.export.choose.tolerance`.
    ``dense`` runs in eval mode; its modes are restored afterwards."""
    with _eval(dense):
        expected, got = _outputs(dense, example), _outputs(exported, example)
        diffs = [max_difference(g, e) for g, e in zip(got, expected, strict=True)]
        for diff, ref in zip(diffs, expected, strict=True):
            if not diff <= tolerance(ref, atol):
                culprit = _first_layer_apart(dense, exported, swapped, example, atol)
                raise SparseExportMismatch(f"sparse export differs from the baked model by {diff:.3g}: {culprit}")
