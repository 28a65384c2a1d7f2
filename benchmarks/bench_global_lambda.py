"""One global lambda (the exact k-th smallest |w| over every selected tensor) at 1M, 11M and 50M
weights: its time against concatenating and calling ``torch.kthvalue``, whether the two agree bit
for bit, and the extra memory the selection takes.

Time: torch on one thread, the CPU time of the thread, the two ways called in alternating order
round after round; the median over rounds (and the range). Memory: the peak resident size a
fresh process gains while it selects, its weights already allocated and every code path warmed up
on a small input first (Linux's ``VmHWM`` after the call, its high-water mark reset just before
through ``/proc/self/clear_refs``, against ``VmRSS`` then), against :data:`plugins.core.kth.MAX_EXTRA_BYTES`, the
bound the module states. The weights are four tensors (40/40/10/10% of the total, a model's
mix of large and small layers), float32, Gaussian, k at 90% (a 90% sparsity target).

    python benchmarks/bench_global_lambda.py            # ~2 minutes
    python benchmarks/bench_global_lambda.py --quick    # smoke run; writes to a temporary folder

Writes benchmarks/results/global_lambda.md and .json (full mode only).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.timing import parse_with_output, write_results  # noqa: E402
from plugins.core.kth import CHUNK_BYTES, MAX_EXTRA_BYTES, select_abs  # noqa: E402

SIZES = (1_000_000, 11_000_000, 50_000_000)
SHARES = (0.4, 0.4, 0.1, 0.1)
FRACTION = 0.9


def weights(total: int, seed: int = 0) -> list[torch.Tensor]:
    """Four float32 Gaussian tensors of ``total`` elements together."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [round(share * total) for share in SHARES[:-1]]
    sizes.append(total - sum(sizes))
    return [torch.randn(n, generator=generator) for n in sizes]


_PEAK_SCRIPT = """
import sys, torch
from plugins.core.kth import select_abs
from benchmarks.bench_global_lambda import weights, FRACTION

def status(field):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))

torch.set_num_threads(1)
select_abs(weights(300_000, 1), 1000)  # every code path once (radix passes, buffers)
for total in map(int, sys.argv[1:]):
    tensors = weights(total)
    k = round(FRACTION * total)
    with open("/proc/self/clear_refs", "w") as clear:  # Linux: the peak (VmHWM) restarts from now
        clear.write("5")
    before = status("VmRSS")
    select_abs(tensors, k)
    print(max(0, status("VmHWM") - before), flush=True)
    del tensors
"""


def peak_extra_bytes(*totals: int) -> list[int]:
    """For each of ``totals`` (in increasing order), the peak resident bytes one fresh process
    gains while selecting over that many weights."""
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, *map(str, sorted(totals))],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    return [int(line) for line in done.stdout.split()]


def timing(total: int, rounds: int) -> dict:
    tensors = weights(total)
    k = round(FRACTION * total)
    times: dict[str, list[float]] = {"select_abs": [], "cat_kthvalue": []}
    values = {}
    calls = {
        "select_abs": lambda: select_abs(tensors, k).value,
        "cat_kthvalue": lambda: torch.cat(tensors).abs().kthvalue(k).values.item(),
    }
    for r in range(rounds):
        for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            begin = time.thread_time()
            values[name] = calls[name]()
            times[name].append(time.thread_time() - begin)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {
        "weights": total,
        "select_abs_ms": round(ms["select_abs"], 2),
        "select_abs_range_ms": [round(1e3 * min(times["select_abs"]), 2), round(1e3 * max(times["select_abs"]), 2)],
        "cat_kthvalue_ms": round(ms["cat_kthvalue"], 2),
        "equal": values["select_abs"] == values["cat_kthvalue"],
    }


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# Global lambda: exact k-th smallest |w| over all selected weights",
        "",
        f"`{meta['command']}` on {meta['machine']}, torch {meta['torch']}, 1 thread, CPU time of the thread, "
        f"median of {meta['rounds']} alternating rounds (range). k at {FRACTION:.0%} of the weights. Extra memory: "
        f"peak RSS gained by a fresh process while selecting; the stated bound is MAX_EXTRA_BYTES = "
        f"{MAX_EXTRA_BYTES / 2**20:.0f} MiB (chunks of {CHUNK_BYTES / 2**20:.0f} MiB).",
        "",
        "| weights | select_abs ms (range) | cat + kthvalue ms | equal | extra memory MiB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lo, hi = r["select_abs_range_ms"]
        lines.append(
            f"| {r['weights'] / 1e6:.0f}M | {r['select_abs_ms']:.1f} ({lo:.1f}-{hi:.1f}) | {r['cat_kthvalue_ms']:.1f} "
            f"| {r['equal']} | {r['extra_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1M weights, 3 rounds")
    args, out = parse_with_output(parser, argv)
    torch.set_num_threads(1)
    sizes, rounds = ((1_000_000,), 3) if args.quick else (SIZES, args.rounds)
    rows = []
    for total, extra in zip(sizes, peak_extra_bytes(*sizes), strict=True):
        rows.append({**timing(total, rounds), "extra_bytes": extra})
        print(rows[-1], flush=True)
    meta = {
        "command": "python benchmarks/bench_global_lambda.py" + (" --quick" if args.quick else ""),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "rounds": rounds,
    }
    result = {"meta": meta, "rows": rows}
    write_results(out, "global_lambda", markdown(result), result)
    return result


if __name__ == "__main__":
    main()
