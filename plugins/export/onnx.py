"""export_onnx(): an ONNX file with a dynamic batch dimension, checked in onnxruntime against torch.

The exporter tried first is ``torch.onnx.export(dynamo=True)`` (``torch.export`` + onnxscript); if it
fails, the TorchScript-based exporter (``dynamo=False``). Which one wrote the file is returned, with
the first one's error. The file is then run in onnxruntime (CPU provider) at the example's batch
size and at another one, and every output must match torch within
``atol * max(1, max |output|)``, or :class:`OnnxMismatch` says by how much.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from plugins.export.choose import run, tolerance

__all__ = ["OnnxMismatch", "export_onnx"]

Example = torch.Tensor | tuple


class OnnxMismatch(RuntimeError):
    """onnxruntime's outputs differ from torch's beyond the tolerance (or in shape or count)."""


def _args(example: Example) -> tuple:
    return example if isinstance(example, tuple) else (example,)


def _other_batch(example: Example) -> tuple:
    """The example's rows, repeated and reversed, at one more row: a batch size never traced."""
    return tuple(
        torch.cat([a, a.flip(0)])[: a.shape[0] + 1] if isinstance(a, torch.Tensor) else a for a in _args(example)
    )


def _export(model: nn.Module, args: tuple, path: Path) -> dict[str, Any]:
    # Traced at two rows at least: a batch of 1 would be specialized to 1.
    traced = tuple(torch.cat([a, a]) if a.shape[0] == 1 else a for a in args)
    batch = torch.export.Dim("batch", min=1)
    quiet = contextlib.redirect_stdout(io.StringIO())  # the dynamo exporter prints its progress
    try:
        with quiet:
            torch.onnx.export(model, traced, str(path), dynamo=True, dynamic_shapes=tuple({0: batch} for _ in traced))
        return {"exporter": "dynamo", "dynamo_error": None}
    except Exception as err:  # the TorchScript exporter below is the documented fallback
        dynamo_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    names = [f"input_{i}" for i in range(len(traced))]
    axes = {name: {0: "batch"} for name in names}
    outputs = len(_torch_outputs(model, traced))
    out_names = [f"output_{i}" for i in range(outputs)]
    axes.update({name: {0: "batch"} for name in out_names})
    with quiet:
        torch.onnx.export(
            model, traced, str(path), dynamo=False, input_names=names, output_names=out_names, dynamic_axes=axes
        )
    return {"exporter": "torchscript", "dynamo_error": dynamo_error}


def _torch_outputs(model: nn.Module, args: tuple) -> list[torch.Tensor]:
    return [t for t in tree_leaves(run(model, args)) if isinstance(t, torch.Tensor)]


def _compare(session, model: nn.Module, args: tuple, atol: float) -> float:
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    got = session.run(None, feeds)
    expected = _torch_outputs(model, args)
    batch = args[0].shape[0]
    if len(got) != len(expected):
        raise OnnxMismatch(f"onnxruntime gave {len(got)} outputs, torch {len(expected)} (batch {batch})")
    worst = 0.0
    for i, (out, ref) in enumerate(zip(got, expected, strict=True)):
        ref_np = ref.detach().cpu().numpy()
        if out.shape != ref_np.shape:
            raise OnnxMismatch(f"output {i} at batch {batch}: onnxruntime shape {out.shape}, torch {ref_np.shape}")
        diff = float(np.abs(out.astype(np.float64) - ref_np.astype(np.float64)).max()) if out.size else 0.0
        if not diff <= tolerance(ref, atol):
            raise OnnxMismatch(f"output {i} at batch {batch}: onnxruntime differs from torch by max {diff:.3g}")
        worst = max(worst, diff)
    return worst


def export_onnx(model: nn.Module, example_input: Example, path: str | Path, atol: float = 1e-5) -> dict[str, Any]:
    """Write ``model`` (in eval mode; its mode is restored) to ``path`` as ONNX and check it.

    Args:
        model: any model ``torch.onnx.export`` accepts, e.g. a baked or compacted one.
        example_input: a tensor or a tuple of tensors, batch first.
        path: the ``.onnx`` file to write.
        atol: outputs must agree within ``atol * max(1, max |output|)``.

    Returns:
        ``path``, ``exporter`` (``"dynamo"`` or ``"torchscript"``), ``dynamo_error`` (why the first
        exporter failed, or None), ``batch_sizes`` checked and ``max_abs_diff`` over them.

    Raises:
        OnnxMismatch: an output differs beyond the tolerance (the message gives the difference).
    """
    import onnxruntime

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        info = _export(model, _args(example_input), path)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        batches = [_args(example_input), _other_batch(example_input)]
        worst = max(_compare(session, model, args, atol) for args in batches)
    finally:
        for module, mode in training.items():
            module.training = mode
    return {"path": str(path), **info, "batch_sizes": [b[0].shape[0] for b in batches], "max_abs_diff": worst}
