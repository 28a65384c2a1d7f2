"""Writing a sparse export: ``model_sparse.pt2`` (a ``torch.export`` program, or a pickle when the
model cannot be traced) with its per-layer record, and the end-of-run summary of it."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plugins.core.atomic import write_atomically
from plugins.export.sparse import Example, sparse_export

__all__ = ["save_sparse_export", "write_sparse_export"]

log = logging.getLogger(__name__)


def _write_record(path: Path, record: list[dict[str, Any]]) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))


def _program(module: nn.Module, example: Example) -> torch.export.ExportedProgram:
    args = example if isinstance(example, tuple) else (example,)
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] > 1 else None for a in args)
    try:
        return torch.export.export(module, args, dynamic_shapes=dynamic)
    except Exception:  # some models trace only at a fixed batch size
        return torch.export.export(module, args)


def save_sparse_export(
    module: nn.Module, example_input: Example, record: list[dict[str, Any]], path: str | Path
) -> Path:
    """Write ``module`` (from :func:`sparse_export`) and its record; returns the model file.

    ``path`` (e.g. ``model_sparse.pt2``) receives a ``torch.export`` program, dynamic in the batch
    size where the model allows it; it runs after ``import plugins.export.ops`` (torch only, it
    registers the sparse operator) with ``torch.export.load(path).module()``. If ``torch.export``
    cannot trace the model, ``path`` with suffix ``.pt`` receives ``torch.save(module)`` instead (a
    pickle: ``torch.load(p, weights_only=False)`` with this package importable), and a warning
    says why. The record goes to ``path`` with suffix ``.json``. Both are written atomically.
    """
    path = Path(path)
    _write_record(path.with_suffix(".json"), record)
    try:
        program = _program(module, example_input)
    except Exception as err:  # the pickle below still saves the model
        log.warning("%s not written: torch.export failed (%s: %s); pickled", path.name, type(err).__name__, err)
        fallback = path.with_suffix(".pt")
        write_atomically(fallback, lambda tmp: torch.save(module, tmp))
        return fallback
    write_atomically(path, lambda tmp: torch.export.save(program, tmp))
    return path


def _summary(record: list[dict[str, Any]]) -> dict[str, Any]:
    timed = [r for r in record if "dense_ms" in r]
    dense = sum(r["dense_ms"] for r in timed)
    chosen = sum(r["dense_ms"] / r["speedup"] for r in timed)
    forms: dict[str, int] = {}
    for row in record:
        forms[row["form"]] = forms.get(row["form"], 0) + 1
    return {
        "layers": len(record),
        "forms": forms,
        "layer_time_speedup": round(dense / chosen, 3) if chosen else None,
    }


def write_sparse_export(net: nn.Module, example: Example, folder: str | Path) -> dict[str, Any]:
    """End of a run: ``model_sparse.pt2`` (or ``.pt``) and ``model_sparse.json`` in ``folder``.

    Never raises: a model that cannot be exported gives ``{"written": None, "reason": ...}`` (and a
    warning). When no layer runs faster sparse, only the record is written. Returns the summary
    (``written``, ``layers``, ``forms`` counts, ``layer_time_speedup``: the summed time of the timed
    layers, dense / as exported).
    """
    try:
        net = copy.deepcopy(net).cpu()
        example = tuple(a.cpu() for a in example) if isinstance(example, tuple) else example.cpu()
        module, record = sparse_export(net, example)
        summary = _summary(record)
        target = Path(folder) / "model_sparse.pt2"
        if summary["forms"].keys() <= {"dense"}:
            _write_record(target.with_suffix(".json"), record)
            return {"written": None, "reason": "no layer runs faster sparse", **summary}
        written = save_sparse_export(module, example, record, target)
        return {"written": written.name, **summary}
    except Exception as err:  # the end of a run must not fail on an optional output
        log.warning("sparse export skipped: %s: %s", type(err).__name__, err)
        return {"written": None, "reason": f"{type(err).__name__}: {err}"}
