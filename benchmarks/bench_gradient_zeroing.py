"""The ways of zeroing a gradient under a 0/1 mask on one CPU thread, side by side.

What the in-place mask form does for every masked tensor before each optimizer step
(plugins/core/mask_forms.py): ``grad[mask == 0] = 0``. Each way is timed on a float32 gradient of
one 2048x2048 Linear of the MLP 3x2048 (16 MiB, 90% zeros in the mask), twice: with the caches
flushed first (a 64 MiB pass over another tensor, as a training step leaves them) and hot (the
gradient just written). Rounds alternate the ways in a rotating order; the CPU time of the thread,
torch on one thread; the median over rounds with its range.

    python benchmarks/bench_gradient_zeroing.py            # ~1 minute
    python benchmarks/bench_gradient_zeroing.py --quick    # smoke run; writes to a temporary folder

A second table times what the step really pays for a masked Linear: its weight gradient
(``grad_output.T @ input`` at batch 32) and the zeroing together. After backward (the product, then
a pass over the 16 MiB gradient), or inside backward, block by block while in cache
(plugins/core/masked_linear.py): the blocks walked by one compiled call
(plugins/core/blocked_gemm.py) or driven from Python. Each round starts with the caches flushed;
beside them the product alone, what a dense step pays for that gradient.

Writes benchmarks/results/gradient_zeroing.md and .json (full mode only).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.timing import add_clock_args, parse_with_output, write_results  # noqa: E402
from benchmarks.timing import clock as read_clock  # noqa: E402
from plugins.core import masked_linear  # noqa: E402
from plugins.core.byte_mask import ByteMask, zero_under  # noqa: E402
from plugins.core.masked_linear import LinearRoute  # noqa: E402

SHAPE = (2048, 2048)
SPARSITY = 0.9
BATCH = 32
BASE = {"zeroing": "grad.mul_(float mask)", "with_product": "product, then grad.mul_(float mask)"}
DENSE = "product alone (dense: nothing zeroed)"


def ways(grad: torch.Tensor, keep: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Each way of zeroing ``grad`` under ``keep`` (bool), as a function of no arguments."""
    float_mask, pruned, zero, cache = keep.float(), ~keep, torch.zeros(()), ByteMask()
    zero_under(grad, float_mask, cache)  # compiles the loop and makes the byte copy, outside the timing
    return {
        "one-byte loop (ours)": lambda: zero_under(grad, float_mask, cache),
        "grad.mul_(float mask)": lambda: grad.mul_(float_mask),
        "grad.mul_(bool mask)": lambda: grad.mul_(keep),
        "grad.masked_fill_(pruned, 0)": lambda: grad.masked_fill_(pruned, 0.0),
        "torch.where(keep, grad, 0, out=grad)": lambda: torch.where(keep, grad, zero, out=grad),
    }


def with_product(grad_output: torch.Tensor, input: torch.Tensor, keep: torch.Tensor) -> dict[str, Callable]:
    """Each way of computing a Linear's weight gradient and zeroing it, as a function returning it."""
    float_mask, cache = keep.float(), ByteMask()
    route = LinearRoute(SimpleNamespace(mask=float_mask), ByteMask(), lambda: True)
    route.weight_gradient(grad_output, input)  # compiles the loop and makes the byte copy
    zero_under(torch.zeros(keep.shape), float_mask, cache)

    def then(zero: Callable[[torch.Tensor], object]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            grad = grad_output.t().mm(input)
            zero(grad)
            return grad

        return run

    def python_blocks() -> torch.Tensor:
        # The same blocks driven from Python, as before the compiled call (and as float64 still is).
        fused, masked_linear.fused_weight_gradient = masked_linear.fused_weight_gradient, lambda dtype: None
        try:
            return route.weight_gradient(grad_output, input)
        finally:
            masked_linear.fused_weight_gradient = fused

    return {
        "in backward, block by block, one compiled call (ours)": lambda: route.weight_gradient(grad_output, input),
        "in backward, block by block from Python": python_blocks,
        "product, then one-byte loop": then(lambda g: zero_under(g, float_mask, cache)),
        "product, then grad.mul_(float mask)": then(lambda g: g.mul_(float_mask)),
    }


def check_same(grad: torch.Tensor, keep: torch.Tensor) -> None:
    """Every way leaves the same gradient, bit for bit, or the benchmark stops: a faster way that
    computes something else would be no finding."""
    expected = grad * keep.float()
    for name in ways(grad.clone(), keep):
        zeroed = grad.clone()
        ways(zeroed, keep)[name]()
        if not torch.equal(zeroed, expected):
            raise RuntimeError(f"{name} does not zero the gradient as grad * mask does")
    grad_output, input = torch.randn(BATCH, grad.shape[0]), torch.randn(BATCH, grad.shape[1])
    expected = grad_output.t().mm(input) * keep.float()
    for name, run in with_product(grad_output, input, keep).items():
        if not torch.equal(run(), expected):
            raise RuntimeError(f"{name} does not give the weight gradient times the mask")


def measure(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    torch.manual_seed(args.seed)
    grad = torch.randn(SHAPE)
    keep = torch.rand(SHAPE) > SPARSITY
    check_same(grad, keep)
    flush = torch.zeros(64 * 2**20 // 4)
    now = read_clock(args.clock)
    table: dict[str, dict[str, dict[str, float]]] = {}
    grad_output, input = torch.randn(BATCH, SHAPE[0]), torch.randn(BATCH, SHAPE[1])
    for cache in ("flushed", "hot", "with_product"):
        if cache == "with_product":
            functions = with_product(grad_output, input, keep)
            # What a dense step pays for the same gradient: the reference for the zeroing's cost.
            functions[DENSE] = lambda: grad_output.t().mm(input)
        else:
            functions = ways(grad, keep)
        times: dict[str, list[float]] = {name: [] for name in functions}
        order = list(functions)
        for _ in range(args.rounds):
            for name in order:
                if cache == "hot":
                    grad.add_(0.0)  # the gradient just written, as right after backward
                else:
                    flush.add_(1.0)
                start = now()
                functions[name]()
                times[name].append((now() - start) * 1e3)
            order = order[1:] + order[:1]
        base = statistics.median(times[BASE["with_product" if cache == "with_product" else "zeroing"]])
        table[cache] = {
            name: {"ms": (m := statistics.median(t)), "lo": min(t), "hi": max(t), "x_float_product": m / base}
            for name, t in times.items()
        }
        if cache == "with_product":
            # Each way minus the product alone of the same round: the machine's drift cancels out.
            for name, t in times.items():
                table[cache][name]["over_product"] = statistics.median(
                    a - b for a, b in zip(t, times[DENSE], strict=True)
                )
    return table


def markdown(table: dict, meta: dict) -> str:
    lines = [
        "# Zeroing a gradient under its mask, one CPU thread",
        "",
        f"`{meta['command']}`  ",
        f"A float32 gradient of {SHAPE[0]}x{SHAPE[1]}, {SPARSITY:.0%} zeros in the mask; {meta['rounds']} rounds in a "
        f"rotating order; {meta['threads']} CPU thread(s), {meta['clock']} clock, torch {meta['torch']}, "
        f"{meta['machine']}.",
        "",
        "| caches | way | median (ms) | range (ms) | x grad.mul_(float mask) |",
        "| --- | --- | ---: | --- | ---: |",
    ]
    for cache, rows in table.items():
        if cache == "with_product":
            lines += [
                "",
                f"The weight gradient of the same Linear at batch {BATCH} (`grad_output.T @ input`) and its zeroing "
                "together, caches flushed before each:",
                "",
                "| caches | way | median (ms) | range (ms) | x product, then grad.mul_(float mask) | over the product "
                "alone (ms, median of paired rounds) |",
                "| --- | --- | ---: | --- | ---: | ---: |",
            ]
        label = "flushed" if cache == "with_product" else cache
        for name, row in rows.items():
            paired = f" {row['over_product']:+.2f} |" if "over_product" in row else ""
            lines.append(
                f"| {label} | `{name}` | {row['ms']:.2f} | {row['lo']:.2f} - {row['hi']:.2f} | "
                f"{row['x_float_product']:.2f} |{paired}"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_clock_args(parser)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="3 rounds; writes to a temporary folder")
    args, out = parse_with_output(parser, argv)
    if args.quick:
        args.rounds = 3
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        table = measure(args)
    finally:
        torch.set_num_threads(threads)
    given = argv if argv is not None else sys.argv[1:]
    meta = {
        "command": " ".join(["python benchmarks/bench_gradient_zeroing.py", *given]),
        "rounds": args.rounds, "threads": args.threads, "clock": args.clock, "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.system()}",
    }
    result = {"meta": meta, "table": table}
    write_results(out, "gradient_zeroing", markdown(table, meta), result)
    return result


if __name__ == "__main__":
    main()
