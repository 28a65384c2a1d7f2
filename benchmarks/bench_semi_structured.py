"""2:4 semi-structured weights against dense on a CUDA GPU (compute capability 8.0 or more): the
largest Linear shapes of the GPT-2-style model, and that model end to end through ``sparse_export``.

1. Layers. ``F.linear(x, W, b)`` with ``W`` dense against ``W`` as torch's semi-structured tensor
   (``torch.sparse.to_sparse_semi_structured``'s kernels: cuSPARSELt, or CUTLASS where cuSPARSELt
   lacks the dtype), ``W`` 2:4 along its inputs (1:2 in float32, the pattern CUTLASS runs it in).
   Shapes ``(out, in)``: the three largest of the GPT-2-style model of
   benchmarks/bench_sparse_inference.py (width 512: ``c_fc`` and the tied ``lm_head`` 2048x512,
   the MLP's ``c_proj`` 512x2048, ``c_attn`` 1536x512), then GPT-2 small's and GPT-2 XL's MLP
   shapes for the trend. Inputs of 512 tokens (the model's 8 x 64) and 8192, in
   float16, bfloat16 and float32. A shape or dtype the kernels refuse is a row with the reason.
2. End to end. The GPT-2-style model trained 3 steps with this project's sparsifier at
   ``pattern=2:4`` (every Linear and Conv1D except the tied head, which stays dense), in float16 on
   the GPU, through ``sparse_export(model, tokens)``: each layer takes 2:4 only where timing says
   it is faster; timed against the dense model.

Timing: CUDA events around ``reps`` calls, the variants in a rotating order round after round;
reported: the median over rounds of dense time / 2:4 time (the speed-up) with its range, and the
largest output difference relative to max(1, max |dense output|).

    python benchmarks/bench_semi_structured.py            # ~2 minutes on one GPU
    python benchmarks/bench_semi_structured.py --quick    # smoke run; writes to a temporary folder

Writes benchmarks/results/semi_structured.md and .json (full mode; --quick never writes there).
Without a CUDA GPU of compute capability 8.0 or more it writes nothing and exits with 2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_sparse_inference import _cell  # noqa: E402  (the speed-up cell of every table)
from benchmarks.timing import parse_with_output, write_results  # noqa: E402
from plugins.export.semi_structured import SEMI, semi_structured_backend  # noqa: E402

MODEL_SHAPES = ((2048, 512), (512, 2048), (1536, 512))
TREND_SHAPES = ((3072, 768), (768, 3072), (6400, 1600), (1600, 6400))
TOKENS = (512, 8192)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def gpu_problem() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU: torch.cuda.is_available() is False"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"needs a CUDA GPU of compute capability 8.0 or more (this one: {major}.{minor})"
    return None


def _rounds(calls: dict[str, Callable[[], object]], rounds: int, reps: int) -> dict[str, list[float]]:
    """Seconds per call of each variant in each round (CUDA events); the order rotates every round."""
    names = list(calls)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for call in calls.values():  # warm-up: plans, workspaces, clocks
        for _ in range(3):
            call()
    torch.cuda.synchronize()
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                calls[name]()
            end.record()
            end.synchronize()
            seconds[name].append(start.elapsed_time(end) / 1e3 / reps)
    return seconds


def _speedup(seconds: dict[str, list[float]], name: str) -> dict[str, float]:
    ratios = [d / s for d, s in zip(seconds["dense"], seconds[name], strict=True)]
    return {
        "dense_ms": round(1e3 * statistics.median(seconds["dense"]), 4),
        "sparse_ms": round(1e3 * statistics.median(seconds[name]), 4),
        "speedup": round(statistics.median(ratios), 3),
        "lo": round(min(ratios), 3),
        "hi": round(max(ratios), 3),
    }


def _relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = max(1.0, expected.float().abs().max().item())
    return (got.float() - expected.float()).abs().max().item() / scale


def keep_largest(matrix: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """``matrix`` with all but the ``n`` largest |w| of every ``m`` consecutive inputs zeroed."""
    groups = matrix.reshape(matrix.shape[0], -1, m)
    drop = groups.abs().argsort(dim=2)[..., : m - n]
    return groups.scatter(2, drop, 0.0).reshape(matrix.shape)


def layer_row(shape: tuple[int, int], tokens: int, dtype: torch.dtype, rounds: int, reps: int) -> dict:
    """One shape, input size and dtype: dense against 2:4, or why 2:4 cannot run it."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, m = (1, 2) if dtype == torch.float32 else (2, 4)  # CUTLASS's float32 kernels are 1:2
    weight = keep_largest(torch.randn(shape, generator=g, device="cuda"), n, m).to(dtype)
    bias = torch.randn(shape[0], generator=g, device="cuda").to(dtype)
    x = torch.randn(tokens, shape[1], generator=g, device="cuda").to(dtype)
    row = {"shape": list(shape), "tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "pattern": f"{n}:{m}"}
    backend = semi_structured_backend(weight)
    if isinstance(backend, str):
        return {**row, "skipped": backend}
    try:
        sparse = backend.from_dense(weight)
        with torch.no_grad():
            row["max_rel_difference"] = _relative_difference(F.linear(x, sparse, bias), F.linear(x, weight, bias))
            seconds = _rounds({"dense": partial(F.linear, x, weight, bias), SEMI: partial(F.linear, x, sparse, bias)},
                              rounds, reps)
    except Exception as err:  # a kernel torch ships but this GPU or build refuses: a row, not a crash
        return {**row, "skipped": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    return {**row, "backend": backend.BACKEND, **_speedup(seconds, SEMI)}


def patterned_gpt2(steps: int):
    """The GPT-2-style model trained ``steps`` steps at ``pattern=2:4`` on CPU, baked; its tokens."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.bench_sparse_inference import _gpt2, _task
    from plugins.sparsity.hardshrink import HardshrinkSparsifier

    torch.manual_seed(0)
    net, batch, loss = _gpt2()
    schedule = {"kind": "constant", "end": 1.0, "begin_epoch": 0, "end_epoch": 0}
    targets = {"module_types": ["Linear", "transformers.pytorch_utils.Conv1D"], "exclude": ["*lm_head*", "*wte*"]}
    sparsifier = HardshrinkSparsifier(schedule, mode="sparsity", pattern="2:4", targets=targets)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[sparsifier],
    )
    trainer.fit(_task(net, loss), DataLoader(TensorDataset(*batch), batch_size=len(batch[0])))
    return net.eval(), batch[0]


def end_to_end(rounds: int, reps: int, steps: int) -> dict:
    """Part 2: the 2:4-trained GPT-2-style model in float16 on the GPU, dense against its export."""
    from plugins.export import sparse_export

    net, tokens = patterned_gpt2(steps)
    dense, tokens = net.half().cuda(), tokens.cuda()
    exported, record = sparse_export(dense, tokens)
    forms: dict[str, int] = {}
    for r in record:
        forms[r["form"]] = forms.get(r["form"], 0) + 1
    with torch.no_grad():
        difference = _relative_difference(exported(tokens).logits, dense(tokens).logits)
        seconds = _rounds({"dense": partial(dense, tokens), "export": partial(exported, tokens)}, rounds, reps)
    return {"input": list(tokens.shape), "forms": forms, "max_rel_difference": difference, "record": record,
            **_speedup(seconds, "export")}


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# 2:4 semi-structured weights against dense on a GPU",
        "",
        f"`{meta['command']}` on {meta['device']}, torch {meta['torch']}, {meta['rounds']} alternating rounds of "
        f"{meta['reps']} calls, CUDA events. Speed-up = dense time / 2:4 time: median over rounds (range).",
        "",
        "## Layers: `F.linear` with a 2:4 weight",
        "",
        "| (out, in) | tokens | dtype | pattern | kernels | dense ms | sparse ms | speed-up | max rel. diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["layers"]:
        head = f"| {tuple(r['shape'])} | {r['tokens']} | {r['dtype']} | {r['pattern']} |"
        if "skipped" in r:
            lines.append(f"{head} - | - | - | not run: {r['skipped']} | - |")
        else:
            lines.append(
                f"{head} {r['backend']} | {r['dense_ms']:.4f} | {r['sparse_ms']:.4f} | {_cell(r)} "
                f"| {r['max_rel_difference']:.1e} |"
            )
    e2e = result.get("end_to_end")
    if e2e:
        forms = ", ".join(f"{k} {v}" for k, v in sorted(e2e["forms"].items()))
        lines += [
            "",
            "## End to end: the 2:4-trained GPT-2-style model, float16, through `sparse_export`",
            "",
            "| input | layers by form | dense ms | exported ms | speed-up | max rel. diff |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| {e2e['input']} | {forms} | {e2e['dense_ms']:.3f} | {e2e['sparse_ms']:.3f} | {_cell(e2e)} "
            f"| {e2e['max_rel_difference']:.1e} |",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3, help="training steps of the 2:4 sparsifier")
    parser.add_argument("--quick", action="store_true", help="smoke run: the model's shapes, float16, no end to end")
    args, out = parse_with_output(parser, argv)
    problem = gpu_problem()
    if problem is not None:
        print(f"bench_semi_structured: {problem}; nothing written", file=sys.stderr)
        raise SystemExit(2)
    rounds, reps = (3, 2) if args.quick else (args.rounds, args.reps)
    shapes = MODEL_SHAPES if args.quick else MODEL_SHAPES + TREND_SHAPES
    dtypes = DTYPES[:1] if args.quick else DTYPES
    rows = [layer_row(s, t, d, rounds, reps) for s in shapes for t in TOKENS for d in dtypes]
    command = "python benchmarks/bench_semi_structured.py" + (" --quick" if args.quick else "")
    meta = {"command": command, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "rounds": rounds, "reps": reps}
    result = {"meta": meta, "layers": rows}
    if not args.quick:
        result["end_to_end"] = end_to_end(rounds, reps, args.steps)
    write_results(out, "semi_structured", markdown(result), result)
    return result


if __name__ == "__main__":
    main()
