"""sparse_export(): a baked model whose layers that run faster sparse hold CSR/BSR weights (CPU) or
2:4 semi-structured ones (CUDA GPU).

A baked model keeps its zeros in dense tensors, which cost as much as any other value. Each
``Linear`` (and Hugging Face ``Conv1D``, and 1x1 convolution) is offered to the sparse kernels of its
device in the forms ``candidates`` names (MKL's CSR/BSR on CPU; on a CUDA GPU, cuSPARSELt's or
CUTLASS's 2:4 for a layer whose weight is 2:4); the form is chosen per layer by timing it against
the dense layer on the input that layer really receives from ``example_input``. A layer keeps its
dense weight unless a sparse form is at least ``min_speedup`` times faster. The exported model
must give the baked model's outputs within ``atol`` (scaled by the output's size, see
:func:`choose.tolerance`), layer by layer and end to end, or the export raises naming the layer.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from plugins.core.errors import ConfigError
from plugins.export.choose import capture_inputs, max_difference, time_candidates, tolerance
from plugins.export.layers import as_matrix, form_misfit, is_linear_like, parse_form, sparse_twin
from plugins.export.semi_structured import SEMI
from plugins.export.verify import Example, SparseExportMismatch, verify_export

__all__ = ["SparseExportMismatch", "sparse_export"]

log = logging.getLogger(__name__)


def _refuse_unbaked(model: nn.Module) -> None:
    for name, module in model.named_modules():
        pruned = any(k.endswith("_orig") for k, _ in module.named_parameters(recurse=False))
        if parametrize.is_parametrized(module) or pruned:
            what = "parametrized" if parametrize.is_parametrized(module) else "pruned with torch.nn.utils.prune"
            raise ConfigError(
                "sparse_export(model)",
                f"{name or 'model'} is {what}",
                "a baked model: call plugins.bake(model) (or torch.nn.utils.prune.remove) first; "
                "baking keeps the zeros and removes the masks",
            )


def _weight_owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            owners.setdefault(param.data_ptr(), []).append(f"{name}.{pname}" if name else pname)
    return owners


def _is_form(form: Any) -> bool:
    if not isinstance(form, str):
        return False
    try:
        parse_form(form)
    except ValueError:
        return False
    return True


def _check_forms(forms: dict[str, str], candidates: Any, layers: dict[str, Any]) -> None:
    sparse_forms = f"'csr', 'bsr<k>' (k >= 2) or '{SEMI}'"
    if isinstance(candidates, str) or not all(_is_form(f) and f != "dense" for f in candidates):
        raise ConfigError("candidates", candidates, f"a tuple of sparse forms, each {sparse_forms}")
    for name, form in forms.items():
        if name not in layers:
            raise ConfigError(f"forms[{name!r}]", form, f"a Linear-like layer of the model: {sorted(layers)}")
        if not _is_form(form):
            raise ConfigError(f"forms[{name!r}]", form, f"'dense', {sparse_forms}")


def _block_fill(weight: torch.Tensor, block: int) -> float:
    out, inp = weight.shape
    nonzero = (weight != 0).reshape(out // block, block, inp // block, block)
    return nonzero.any(dim=3).any(dim=1).float().mean().item()


def _misfit(form: str, module: nn.Module, weight: torch.Tensor, max_block_fill: float) -> str | None:
    """Why ``form`` is not worth timing for this layer, or None."""
    reason = form_misfit(form, module, weight)
    block = parse_form(form)
    if reason is None and block is not None and block > 1:
        # A BSR block is stored whole: with most blocks holding a nonzero it costs more than dense.
        fill = _block_fill(weight, block)
        if fill > max_block_fill:
            reason = f"{fill:.2f} of the {block}x{block} blocks hold a nonzero (> max_block_fill={max_block_fill})"
    return reason


def _row(name: str, module: nn.Module, weight: torch.Tensor) -> dict[str, Any]:
    zeros = (weight == 0).sum().item() / max(weight.numel(), 1)
    return {"layer": name, "type": type(module).__name__, "shape": list(weight.shape), "zeros": round(zeros, 6)}


def _forms_to_time(
    name: str, module: nn.Module, weight: torch.Tensor, forced: str | None, options: dict[str, Any]
) -> tuple[list[str], str]:
    """The sparse forms to time for one layer, and why."""
    if forced is not None:
        misfit = None if forced == "dense" else form_misfit(forced, module, weight)
        if misfit is not None:
            raise ConfigError(f"forms[{name!r}]", forced, f"a form this layer can run in ('dense' here: {misfit})")
        return ([forced] if forced != "dense" else []), "forced"
    if (weight == 0).float().mean().item() < options["min_zeros"]:
        return [], f"zeros below min_zeros={options['min_zeros']}"
    forms, misfits = [], {}
    for form in options["candidates"]:
        reason = _misfit(form, module, weight, options["max_block_fill"])
        if reason is None:
            forms.append(form)
        else:
            misfits.setdefault(reason, []).append(form)
    why_not = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in misfits.items())
    return forms, "timed" if forms else f"no sparse form fits ({why_not})"


def _decide(
    name: str, module: nn.Module, x: torch.Tensor, forced: str | None, options: dict[str, Any]
) -> tuple[dict[str, Any], nn.Module]:
    """The record row of one layer and the module to put in its place."""
    weight, _ = as_matrix(module)
    row = _row(name, module, weight)
    forms, row["reason"] = _forms_to_time(name, module, weight, forced, options)
    twins, refused = {}, {}
    for form in forms:
        twin = sparse_twin(module, form) if form != SEMI or forced else _tried_semi(module, x)
        if isinstance(twin, str):
            refused[form] = twin
        else:
            twins[form] = twin
    budget, min_reps = (options["budget_s"], 3) if twins else (0.0, 1)
    times, outputs = time_candidates({"dense": module, **twins}, x, budget, min_reps)
    for form in list(twins):
        diff = max_difference(outputs[form], outputs["dense"])
        bound = tolerance(outputs["dense"], options["atol"])
        if diff <= bound:
            continue
        if form != SEMI or forced is not None:
            raise SparseExportMismatch(f"layer {name!r} as {form} differs from dense by {diff:.3g}")
        # 2:4 kernels may compute in another precision than dense (CUTLASS's float32 in TF32): a
        # property of the hardware path, not a fault of the export, so the layer stays dense, said.
        del twins[form]
        refused[form] = f"differs from dense by {diff:.3g} > {bound:.3g}"
    if refused:
        row["refused"] = refused
    best = min(twins, key=times.get, default="dense")
    faster = bool(twins) and times[best] * options["min_speedup"] < times["dense"]
    chosen = best if forced is not None or faster else "dense"
    row.update(
        form=chosen,
        dense_ms=round(1e3 * times["dense"], 4),
        candidates_ms={form: round(1e3 * times[form], 4) for form in twins},
        speedup=round(times["dense"] / times[chosen], 3),
    )
    return row, twins.get(chosen, module)


def _tried_semi(module: nn.Module, x: torch.Tensor) -> nn.Module | str:
    """The 2:4 twin of ``module`` after one call on ``x``, or what torch raised (a GPU or build
    without the kernel): the layer then stays dense and the record says why."""
    try:
        twin = sparse_twin(module, SEMI)
        with torch.no_grad():
            twin(x)
        return twin
    except Exception as err:  # torch's dispatch raises RuntimeError, NotImplementedError or AssertionError
        return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def _skip_row(name: str, module: nn.Module, reason: str) -> dict[str, Any]:
    matrix = as_matrix(module)
    if isinstance(matrix, str):
        return {"layer": name, "type": type(module).__name__, "form": "dense", "reason": reason}
    return {**_row(name, module, matrix[0]), "form": "dense", "reason": reason}


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def sparse_export(
    model: nn.Module,
    example_input: Example,
    path: str | Path | None = None,
    *,
    forms: dict[str, str] | None = None,
    candidates: tuple[str, ...] = ("csr", "bsr16", "bsr32", SEMI),
    min_zeros: float = 0.5,
    min_speedup: float = 1.05,
    max_block_fill: float = 0.5,
    budget_s: float = 0.3,
    atol: float = 1e-5,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A copy of the baked ``model`` (eval mode, inference only) whose faster layers run sparse.

    Args:
        model: a baked model (no parametrization, no ``torch.nn.utils.prune`` hooks); not changed.
        example_input: a tensor, or a tuple of arguments, the model is called with; each layer is
            timed on the input it receives then (its batch size decides the fastest form).
        path: where to write the exported model (see :func:`save_sparse_export`); nothing if None.
        forms: layer name -> ``"dense"``, ``"csr"``, ``"bsr<k>"`` or ``"2:4"``: these layers take
            that form without timing deciding (still timed and checked).
        candidates: the sparse forms timed against dense where the layer fits them: ``csr`` and
            ``bsr<k>`` for float32/float64 on CPU (``bsr<k>`` only where ``k`` divides both sides
            and at most ``max_block_fill`` of the blocks hold a nonzero); ``2:4`` for a Linear or
            Conv1D whose weight is 2:4, on a CUDA GPU of compute capability 8.0 or more, in a dtype
            and shape its kernels take. A 2:4 layer whose output misses ``atol`` stays dense (the
            record's ``refused`` says by how much): the kernel's precision, not a fault.
        min_zeros: layers with fewer zeros stay dense untimed.
        min_speedup: a sparse form must be this many times faster than dense to be chosen.
        budget_s: time spent timing one layer (about; at least 3 rounds).
        atol: outputs must agree within ``atol * max(1, max |output|)`` (at least 4 units in the
            last place of the output's dtype: float16 cannot meet 1e-5).

    Returns:
        The exported module and the record: one JSON-serializable dict per Linear-like layer
        (``layer``, ``type``, ``shape``, ``zeros``, ``form``, ``reason``, and when timed
        ``dense_ms``, ``candidates_ms``, ``speedup``; ``refused`` for a 2:4 layer kept dense, with
        its output's difference or its kernel's error).

    Raises:
        ConfigError: a parametrized model, or ``forms`` naming an unknown layer or form.
        SparseExportMismatch: outputs differ beyond the tolerance (naming the layer).
    """
    _refuse_unbaked(model)
    exported = copy.deepcopy(model).eval()
    layers = {name: as_matrix(m) for name, m in exported.named_modules() if is_linear_like(m)}
    forms = dict(forms or {})
    _check_forms(forms, candidates, layers)
    options = {
        "candidates": candidates,
        "min_zeros": min_zeros,
        "min_speedup": min_speedup,
        "max_block_fill": max_block_fill,
        "budget_s": budget_s,
        "atol": atol,
    }
    inputs = capture_inputs(exported, [n for n, r in layers.items() if not isinstance(r, str)], example_input)
    owners = _weight_owners(exported)
    record, replacements = [], {}
    for name in layers:
        module = exported.get_submodule(name)
        reason = _why_dense(name, module, layers[name], inputs, owners)
        if reason is not None:
            if forms.get(name, "dense") != "dense":
                raise ConfigError(f"forms[{name!r}]", forms[name], f"'dense' only: {reason}")
            record.append(_skip_row(name, module, reason))
            continue
        row, new = _decide(name, module, inputs[name], forms.get(name), options)
        record.append(row)
        if new is not module:
            replacements[name] = new
    for name, new in replacements.items():
        _swap(exported, name, new)
    verify_export(model, exported, list(replacements), example_input, atol)
    if path is not None:
        from plugins.export.save import save_sparse_export  # the writer imports this module

        save_sparse_export(exported, example_input, record, path)
    return exported, record


def _why_dense(name, module, matrix, inputs, owners) -> str | None:
    if isinstance(matrix, str):
        return matrix
    if name not in inputs:
        return "never called as a module while running example_input (its parent reads the weight)"
    shared = owners.get(module.weight.data_ptr(), [])
    if len(shared) > 1:
        return f"weight tied to {[s for s in shared if not s.startswith(name + '.')]}: kept dense to stay tied"
    return None
