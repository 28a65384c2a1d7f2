"""Inference latency of sparse weights against dense: single layers, and whole models exported
with :func:`plugins.export.sparse_export`.

1. Layers. ``Linear(4096, 4096)`` and ``Linear(2048, 2048)`` at batch 1 and 64, with 50, 70, 80,
   90, 95 and 99% zeros, three ways, each the module the export puts in place:
     dense   ``nn.Linear`` (the baked model as it is)
     csr     :class:`~plugins.export.layers.SparseLinear` in CSR, zeros scattered at random
     bsr32   the same in BSR with 32x32 blocks, zeros in whole 32x32 blocks (block sparsity)
   The break-even sparsity per shape and batch is the lowest level at which CSR beats dense.
2. End to end. Models sparsified by this project's GMP callback (``HardshrinkSparsifier``,
   sparsity mode, global allocation, a few training steps on random data, baked at the end),
   then ``sparse_export(model, example)``, timed against the baked dense model on the same input:
     mlp       an MLP 1024 -> 4096 -> 4096 -> 1024 -> 10 (a transformer-FFN-sized stack), batch 64
     gpt2      a GPT-2-style decoder (Hugging Face ``GPT2LMHeadModel``: 4 layers, width 512,
               8 heads, tied input/output embeddings), 8 sequences of 64 tokens
   at 90% and 95% zeros.

House rules (benchmarks/timing.py): torch on one thread, the CPU time of that thread, the
variants called in a rotating order round after round so that a shared machine's drifts hit
each alike; reported: the median over rounds of the per-round ratio dense / variant (the
speed-up), with its range, and the median milliseconds per call.

    python benchmarks/bench_sparse_inference.py            # ~5 minutes on 1 CPU thread
    python benchmarks/bench_sparse_inference.py --quick    # smoke run; writes to a temporary folder

Writes benchmarks/results/sparse_inference.md and .json (full mode; --quick never writes there).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.timing import parse_with_output, write_results  # noqa: E402
from plugins.export import sparse_export  # noqa: E402
from plugins.export.layers import SparseLinear  # noqa: E402

LEVELS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
SHAPES = (4096, 2048)
BATCHES = (1, 64)
BLOCK = 32


def _rounds(calls: dict[str, Callable[[], object]], rounds: int, reps: int) -> dict[str, list[float]]:
    """Seconds per call of each variant in each round; the order rotates every round."""
    names = list(calls)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for call in calls.values():  # warm-up: MKL's first call allocates
        call()
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            begin = time.thread_time()
            for _ in range(reps):
                calls[name]()
            seconds[name].append((time.thread_time() - begin) / reps)
    return seconds


def _ratios(seconds: dict[str, list[float]], base: str = "dense") -> dict[str, dict[str, float]]:
    out = {}
    for name, times in seconds.items():
        speedups = [b / t for b, t in zip(seconds[base], times, strict=True)]
        out[name] = {
            "ms": round(1e3 * statistics.median(times), 4),
            "speedup": round(statistics.median(speedups), 3),
            "lo": round(min(speedups), 3),
            "hi": round(max(speedups), 3),
        }
    return out


def _random_zeros(n: int, zeros: float, generator: torch.Generator) -> torch.Tensor:
    weight = torch.randn(n, n, generator=generator)
    k = round(zeros * weight.numel())
    weight.view(-1)[torch.randperm(weight.numel(), generator=generator)[:k]] = 0
    return weight


def _block_zeros(n: int, zeros: float, generator: torch.Generator) -> torch.Tensor:
    weight = torch.randn(n, n, generator=generator)
    blocks = (n // BLOCK) ** 2
    keep = torch.ones(blocks)
    keep[torch.randperm(blocks, generator=generator)[: round(zeros * blocks)]] = 0
    grid = keep.reshape(n // BLOCK, 1, n // BLOCK, 1).expand(-1, BLOCK, -1, BLOCK).reshape(n, n)
    return weight * grid


def layers(rounds: int, reps: int, levels=LEVELS, shapes=SHAPES, batches=BATCHES) -> list[dict]:
    """Part 1: one row per shape, batch and sparsity level."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for n in shapes:
        for zeros in levels:
            scattered, blocked = _random_zeros(n, zeros, generator), _block_zeros(n, zeros, generator)
            dense = nn.Linear(n, n).requires_grad_(False)
            dense.weight.copy_(scattered)
            csr = SparseLinear(scattered, dense.bias, "csr")
            bsr = SparseLinear(blocked, dense.bias, f"bsr{BLOCK}")
            for batch in batches:
                x = torch.randn(batch, n, generator=generator)
                with torch.no_grad():
                    calls = {"dense": partial(dense, x), "csr": partial(csr, x), "bsr32": partial(bsr, x)}
                    seconds = _rounds(calls, rounds, reps)
                rows.append({"shape": f"Linear({n}, {n})", "batch": batch, "zeros": zeros, **_ratios(seconds)})
                print(_layer_line(rows[-1]), flush=True)
    return rows


def _layer_line(row: dict) -> str:
    cells = " ".join(f"{v}={row[v]['speedup']:.2f}x" for v in ("csr", "bsr32"))
    return f"{row['shape']} batch {row['batch']} zeros {row['zeros']:.2f}: dense {row['dense']['ms']:.3f} ms, {cells}"


def break_even(rows: list[dict]) -> list[dict]:
    """Per shape and batch, the lowest sparsity level from which CSR (and BSR) is faster than dense
    at every level measured above it; None where it never is."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for batch in dict.fromkeys(r["batch"] for r in rows):
            these = sorted((r for r in rows if r["shape"] == shape and r["batch"] == batch), key=lambda r: r["zeros"])
            entry = {"shape": shape, "batch": batch}
            for variant in ("csr", "bsr32"):
                level = None
                for row in reversed(these):
                    if row[variant]["speedup"] <= 1.0:
                        break
                    level = row["zeros"]
                entry[variant] = level
            out.append(entry)
    return out


# --- 2. end to end ---------------------------------------------------------------------------------


def _task(net: nn.Module, loss: Callable[[nn.Module, tuple], torch.Tensor]):
    """A LightningModule training ``net`` with ``loss`` (AdamW); Lightning is imported only here."""
    import lightning as L

    class Task(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            return loss(self.net, batch)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return Task()


def _mlp() -> tuple[nn.Module, torch.Tensor, Callable]:
    widths = (1024, 4096, 4096, 1024)
    layers_: list[nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers_ += [nn.Linear(a, b), nn.ReLU()]
    net = nn.Sequential(*layers_, nn.Linear(widths[-1], 10))
    x = torch.randn(64, widths[0], generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))

    def loss(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    return net, (x, y), loss


def _gpt2() -> tuple[nn.Module, torch.Tensor, Callable]:
    import transformers

    config = transformers.GPT2Config(vocab_size=2048, n_positions=64, n_embd=512, n_layer=4, n_head=8)
    net = transformers.GPT2LMHeadModel(config)
    net.config.use_cache = False
    tokens = torch.randint(0, config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(1))

    def loss(model, batch):
        return model(batch[0], labels=batch[0]).loss

    return net, (tokens, tokens), loss


MODELS = {"mlp": (_mlp, ["Linear"]), "gpt2": (_gpt2, ["Linear", "transformers.pytorch_utils.Conv1D"])}


def gmp_sparsified(name: str, zeros: float, steps: int) -> tuple[nn.Module, torch.Tensor]:
    """The model ``name`` trained ``steps`` steps with this project's GMP callback at ``zeros``
    (global magnitude, constant from the first step), baked; and its example input."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from plugins.sparsity.hardshrink import HardshrinkSparsifier

    build, types = MODELS[name]
    torch.manual_seed(0)
    net, batch, loss = build()
    schedule = {"kind": "constant", "end": zeros, "begin_epoch": 0, "end_epoch": 0, "every_n_steps": 1}
    sparsifier = HardshrinkSparsifier(
        schedule, mode="sparsity", scope="global", targets={"include": ["*weight*"], "module_types": types}
    )
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[sparsifier],
    )
    data = DataLoader(TensorDataset(*batch), batch_size=len(batch[0]))
    trainer.fit(_task(net, loss), data)
    return net.eval(), batch[0]


def end_to_end(rounds: int, reps: int, steps: int, models=tuple(MODELS), levels=(0.9, 0.95)) -> list[dict]:
    """Part 2: one row per model and sparsity level."""
    rows = []
    for name in models:
        for zeros in levels:
            dense, x = gmp_sparsified(name, zeros, steps)
            exported, record = sparse_export(dense, x)
            forms: dict[str, int] = {}
            for r in record:
                forms[r["form"]] = forms.get(r["form"], 0) + 1
            with torch.no_grad():
                difference = float((_logits(exported(x)) - _logits(dense(x))).abs().max())
                seconds = _rounds({"dense": partial(dense, x), "sparse_export": partial(exported, x)}, rounds, reps)
            row = {"model": name, "zeros": zeros, "input": list(x.shape), "forms": forms}
            row["max_abs_difference"] = difference
            rows.append({**row, **_ratios(seconds)})
            print(f"{name} at {zeros:.2f}: {rows[-1]['sparse_export']['speedup']:.2f}x, forms {forms}", flush=True)
    return rows


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


# --- report ----------------------------------------------------------------------------------------


def _cell(entry: dict) -> str:
    return f"{entry['speedup']:.2f}x ({entry['lo']:.2f}-{entry['hi']:.2f})"


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# Sparse inference: CSR/BSR against dense",
        "",
        f"`{meta['command']}` on {meta['machine']}, torch {meta['torch']}, 1 thread, CPU time of the thread, "
        f"{meta['rounds']} alternating rounds of {meta['reps']} calls. Speed-up = dense time / variant time: "
        "median over rounds (range).",
        "",
        "## Layers",
        "",
        "| layer | batch | zeros | dense ms | CSR (random zeros) | BSR 32x32 (block zeros) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["layers"]:
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['zeros']:.0%} | {r['dense']['ms']:.3f} | {_cell(r['csr'])} "
            f"| {_cell(r['bsr32'])} |"
        )
    lines += ["", "Break-even (the lowest sparsity from which the sparse form is faster at every level above):", ""]
    lines += ["| layer | batch | CSR | BSR 32x32 |", "| --- | --- | --- | --- |"]
    for b in result["break_even"]:
        fmt = lambda v: "never" if v is None else f"{v:.0%}"  # noqa: E731
        lines.append(f"| {b['shape']} | {b['batch']} | {fmt(b['csr'])} | {fmt(b['bsr32'])} |")
    lines += [
        "",
        "## End to end: GMP-sparsified models through `sparse_export`",
        "",
        "| model | input | zeros | dense ms | exported ms | speed-up | layers by form | max abs diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["end_to_end"]:
        forms = ", ".join(f"{k} {v}" for k, v in sorted(r["forms"].items()))
        lines.append(
            f"| {r['model']} | {r['input']} | {r['zeros']:.0%} | {r['dense']['ms']:.2f} | "
            f"{r['sparse_export']['ms']:.2f} | {_cell(r['sparse_export'])} | {forms} | {r['max_abs_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="training steps of the GMP callback per model")
    parser.add_argument("--quick", action="store_true", help="smoke run: one shape, few levels, the MLP only")
    args, out = parse_with_output(parser, argv)
    torch.set_num_threads(1)
    if args.quick:
        layer_rows = layers(3, 1, levels=(0.5, 0.9), shapes=(2048,))
        e2e_rows = end_to_end(3, 1, 1, models=("mlp",), levels=(0.9,))
    else:
        layer_rows = layers(args.rounds, args.reps)
        e2e_rows = end_to_end(args.rounds, args.reps, args.steps)
    command = "python benchmarks/bench_sparse_inference.py" + (" --quick" if args.quick else "")
    meta = {
        "command": command,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "rounds": 3 if args.quick else args.rounds,
        "reps": 1 if args.quick else args.reps,
    }
    result = {"meta": meta, "layers": layer_rows, "break_even": break_even(layer_rows), "end_to_end": e2e_rows}
    write_results(out, "sparse_inference", markdown(result), result)
    return result


if __name__ == "__main__":
    main()
