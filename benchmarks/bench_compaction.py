"""Structured pruning: dense vs masked vs compact vs Torch-Pruning's MagnitudePruner.

For the digits CNN and the residual 1-D net at 30/50/70% of channels: params, MACs, and latency at
batch 1 and 64 (eval, no grad) of

- dense: the untouched model;
- masked: L1 structured masks as left by ``StructuredPruning`` during training (parametrized);
- compact: ``plugins.compact`` of the masked model;
- tp: ``torch_pruning.pruner.MagnitudePruner`` (L1 magnitude, same ratio, output layer ignored).

Latency is the median of alternating repeats (dense, masked, compact, tp, dense, ...) so that load
from other processes hits every variant alike; it is still noisy on a shared machine.

    python benchmarks/bench_compaction.py          # -> benchmarks/results/compaction.{md,json}
    python benchmarks/bench_compaction.py --quick    # 50% only, fewer repeats; -> a temporary folder or --out
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import add_output_args, results_folder  # noqa: E402
from models.backbones import DigitsCNN, ResNet1d  # noqa: E402
from plugins.core.masks import bake  # noqa: E402
from plugins.pruning.compaction import compact_copy, count, independent_copy, latency  # noqa: E402
from plugins.pruning.structured import StructuredPruning  # noqa: E402

MODELS = {
    "digits_cnn": (lambda: DigitsCNN(), (1, 8, 8)),
    "resnet1d": (lambda: ResNet1d(), (1, 150)),
}


def _head(net: nn.Module) -> nn.Module:
    return [m for m in net.modules() if isinstance(m, nn.Linear)][-1]


def _trained_like(net: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        net.train()
        for _ in range(3):
            net(torch.randn(32, *shape))
    return net.eval()


def variants(name: str, ratio: float) -> dict[str, nn.Module]:
    build, shape = MODELS[name]
    dense = _trained_like(build(), shape)
    example = torch.randn(2, *shape)
    masked = copy.deepcopy(dense)
    cb = StructuredPruning(
        method="l1", amount=ratio, exclude=["*head*"], example_input_shape=[2, *shape]
    )
    cb.setup(None, masked, "fit")
    cb.apply(ratio)
    masked.eval()
    compacted, _ = compact_copy(masked, example, measure=False)
    theirs = copy.deepcopy(dense)
    pruner = tp.pruner.MagnitudePruner(
        theirs,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=[_head(theirs)],
    )
    pruner.step()
    with torch.no_grad():
        x = torch.randn(8, *shape)
        diff = (masked(x) - compacted(x)).abs().max().item()
    return {"dense": dense, "masked": masked, "compact": compacted, "tp": theirs.eval()}, diff


def measure(models: dict[str, nn.Module], shape, batch: int, repeats: int) -> dict[str, float]:
    x = torch.randn(batch, *shape)
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        latency(m, x, repeats=1, warmup=3)
    for _ in range(repeats):
        for k, m in models.items():
            times[k] += latency(m, x, repeats=1, warmup=0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50%% only, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per variant")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 = steadier on a shared CPU)"
    )
    add_output_args(parser)
    args = parser.parse_args(argv)
    try:
        args.out = results_folder(args.out, args.quick)
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    ratios = [0.5] if args.quick else [0.3, 0.5, 0.7]
    repeats = args.repeats or (7 if args.quick else 21)
    rows = []
    for name, (_, shape) in MODELS.items():
        for ratio in ratios:
            models, diff = variants(name, ratio)
            lat1 = measure(models, shape, 1, repeats)
            lat64 = measure(models, shape, 64, repeats)
            for variant, m in models.items():
                # Torch-Pruning's counter does not see parametrized layers: count the masked model
                # on a baked copy (its zeros are still multiplied, so its MACs are the dense ones).
                plain = m
                if variant == "masked":
                    plain = independent_copy(m)
                    bake(plain)
                macs, params = count(plain, torch.randn(1, *shape))
                rows.append(
                    {
                        "model": name,
                        "ratio": ratio,
                        "variant": variant,
                        "params": params,
                        "macs": macs,
                        "latency_b1_ms": 1e3 * lat1[variant],
                        "latency_b64_ms": 1e3 * lat64[variant],
                        "speedup_b64": lat64["dense"] / lat64[variant],
                        "max_abs_diff_masked_vs_compact": diff if variant == "compact" else None,
                    }
                )
            print(
                f"{name} {ratio:.0%}: compact {lat64['dense'] / lat64['compact']:.2f}x, "
                f"tp {lat64['dense'] / lat64['tp']:.2f}x at batch 64; "
                f"masked-compact diff {diff:.1e}",
                flush=True,
            )
    meta = {
        "torch": torch.__version__,
        "torch_pruning": tp.__version__,
        "threads": args.threads,
        "repeats": repeats,
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python", sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compaction.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"Structured pruning (L1, output channels, head kept) on CPU, {args.threads} thread(s), "
        f"median of {repeats} alternating repeats; torch {meta['torch']}, "
        f"torch-pruning {meta['torch_pruning']}.",
        "",
        "| model | channels pruned | variant | params | MACs | ms @1 | ms @64 | speed-up @64 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ratio']:.0%} | {r['variant']} | "
            f"{r['params']:,} | {r['macs']:,} | "
            f"{r['latency_b1_ms']:.2f} | {r['latency_b64_ms']:.2f} | {r['speedup_b64']:.2f}x |"
        )
    (args.out / "compaction.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {args.out / 'compaction.md'}, {args.out / 'compaction.json'}")
    return args.out


if __name__ == "__main__":
    main()
