"""What a mask costs on every training step between updates, against the same dense step.

Two models, each trained in one process four ways, run after run in a rotating order so that the
drifts of a shared machine hit every variant alike:
  dense         no callback
  inplace       HardshrinkSparsifier(mask_form=auto): the zeros live in the weights, their
                gradients are zeroed before each optimizer step (plugins/core/mask_forms.py)
  parametrize   HardshrinkSparsifier(mask_form=parametrize): a mask multiplies each weight in
                forward (and its gradient in backward)
  modelpruning  lightning.pytorch.callbacks.ModelPruning, global l1_unstructured (forward
                pre-hooks of torch.nn.utils.prune)

Models: an MLP with three 2048-wide hidden layers (batch 32, 2048 inputs), and ResNet-18 (basic
blocks 2-2-2-2, widths 64-128-256-512, Hugging Face ``ResNetForImageClassification`` built from
a config with random weights) on 3x32x32 inputs, batch 32. Every variant reaches 90% zeros in the
conv and linear weights at the end of the first epoch; the second epoch's steps (the first two
left out) are the steps between updates that are timed, from the first callback's
``on_train_batch_start`` to the last one's ``on_train_batch_end`` (forward, backward, optimizer
step and every callback's batch hooks), on the CPU time of the training thread, torch on one
thread. Reported per model and variant: the median over rounds of (median step / dense's median
step of the same round), with the range over rounds.

    python benchmarks/bench_mask_overhead.py            # ~10 minutes on 1 CPU thread
    python benchmarks/bench_mask_overhead.py --quick    # smoke run; writes to a temporary folder

Writes benchmarks/results/mask_overhead.md and .json (full mode only).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_hardshrink import _Clock, _End, _Start  # noqa: E402
from benchmarks.timing import add_clock_args  # noqa: E402
from benchmarks.timing import clock as read_clock  # noqa: E402
from plugins.sparsity.hardshrink import HardshrinkSparsifier  # noqa: E402

VARIANTS = ("dense", "inplace", "parametrize", "modelpruning")
SPARSITY = 0.9
RESULTS = ROOT / "benchmarks" / "results"


def mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(3):
        layers += [nn.Linear(2048, 2048), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(2048, 10))


def resnet18() -> nn.Module:
    import transformers

    config = transformers.ResNetConfig(
        num_channels=3, embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
        layer_type="basic", num_labels=10,
    )
    return transformers.ResNetForImageClassification(config)


MODELS = {"mlp_3x2048": (mlp, (2048,)), "resnet18": (resnet18, (3, 32, 32))}


class Trained(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        logits = out.logits if hasattr(out, "logits") else out
        return F.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


def _weights(net: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _plugin(variant: str, net: nn.Module) -> list[L.Callback]:
    if variant in ("inplace", "parametrize"):
        schedule = {"kind": "constant", "end": SPARSITY, "begin_epoch": 1, "end_epoch": 1}
        form = "auto" if variant == "inplace" else "parametrize"
        return [HardshrinkSparsifier(schedule, mode="sparsity", scope="global", mask_form=form, bake_at_end=False)]
    if variant == "modelpruning":
        from lightning.pytorch.callbacks import ModelPruning

        return [
            ModelPruning(
                "l1_unstructured",
                parameters_to_prune=_weights(net),
                use_global_unstructured=True,
                amount=lambda epoch: SPARSITY if epoch == 0 else 0.0,
                apply_pruning=lambda epoch: epoch == 0,
                make_pruning_permanent=False,
                verbose=0,
            )
        ]
    return []


def run_one(model: str, variant: str, args: argparse.Namespace) -> float:
    """The median time of a step between updates (second epoch, first two steps left out)."""
    build, shape = MODELS[model]
    L.seed_everything(args.seed, verbose=False)
    net = build()
    data = TensorDataset(torch.randn(args.steps * args.batch, *shape), torch.randint(0, 10, (args.steps * args.batch,)))
    clock = _Clock()
    clock.now = read_clock(args.clock)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[_Start(clock), *_plugin(variant, net), _End(clock)],
    )
    trainer.fit(Trained(net), DataLoader(data, batch_size=args.batch))
    weights = [getattr(m, n) for m, n in _weights(net)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    if variant != "dense" and abs(zeros - SPARSITY) > 0.01:
        raise RuntimeError(f"{model}/{variant}: {zeros:.4f} zeros, not {SPARSITY}")
    return statistics.median(clock.steps[args.steps + 2 :])


def measure(args: argparse.Namespace) -> dict:
    table: dict = {}
    for model in MODELS:
        ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
        medians: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for round_ in range(args.rounds):
            order = VARIANTS[round_ % len(VARIANTS) :] + VARIANTS[: round_ % len(VARIANTS)]
            step = {v: run_one(model, v, args) for v in order}
            for v in VARIANTS:
                medians[v].append(step[v])
                ratios[v].append(step[v] / step["dense"])
            print(model, round_, {v: round(r[-1], 3) for v, r in ratios.items()}, flush=True)
        table[model] = {
            v: {
                "step_ms": 1e3 * statistics.median(medians[v]),
                "x_dense": statistics.median(ratios[v]),
                "x_dense_range": [min(ratios[v]), max(ratios[v])],
            }
            for v in VARIANTS
        }
    return table


def markdown(table: dict, meta: dict) -> str:
    lines = [
        "# Mask overhead: a training step between updates, against dense",
        "",
        f"`{meta['command']}`  ",
        f"{meta['rounds']} rounds x {len(VARIANTS)} variants in one process, rotating order; {meta['steps']} steps "
        f"per epoch, batch {meta['batch']}, the second epoch's steps timed; {SPARSITY:.0%} zeros; "
        f"{meta['threads']} CPU thread(s), {meta['clock']} clock, torch {meta['torch']}, lightning "
        f"{meta['lightning']}, {meta['machine']}.",
        "",
        "| model | variant | step median (ms) | x dense (median over rounds) | range over rounds |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for model, rows in table.items():
        for variant, row in rows.items():
            lo, hi = row["x_dense_range"]
            lines.append(
                f"| {model} | {variant} | {row['step_ms']:.2f} | {row['x_dense']:.3f} | {lo:.3f} - {hi:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_clock_args(parser)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=24, help="training steps per epoch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 6 steps; writes to a temporary folder")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, 6
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench_mask_overhead_")) if args.quick else RESULTS)
    torch.set_num_threads(args.threads)
    table = measure(args)
    meta = {
        "command": "python benchmarks/bench_mask_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rounds": args.rounds, "steps": args.steps, "batch": args.batch, "threads": args.threads,
        "clock": args.clock, "torch": torch.__version__, "lightning": L.__version__,
        "machine": f"{platform.machine()} {platform.system()}",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "mask_overhead.json").write_text(json.dumps({"meta": meta, "table": table}, indent=2))
    (out / "mask_overhead.md").write_text(markdown(table, meta))
    print(markdown(table, meta))
    print(f"written to {out}")
    return table


if __name__ == "__main__":
    main()
