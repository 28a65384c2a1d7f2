"""Per-step cost of HardshrinkSparsifier against no callback and Lightning's ModelPruning.

The same digits CNN on the same data and the same seed, trained in one process three ways, run
after run, in a rotating order so that drifts of a shared machine hit every variant alike:
  dense         no callback
  hardshrink    HardshrinkSparsifier, mode=sparsity, scope=global, cubic 0 -> S
  modelpruning  lightning.pytorch.callbacks.ModelPruning, l1_unstructured, global, the same cubic
                schedule (amount per epoch = fraction of what remains), no lottery-ticket reset

Each training step is timed from the first callback's ``on_train_batch_start`` to the last
callback's ``on_train_batch_end`` (forward, backward, optimizer step and the callbacks' own
batch hooks); each epoch from ``on_train_epoch_start`` to the end of every ``on_train_epoch_end``
(so ModelPruning's pruning, done at epoch end, counts). The clock is by default the CPU time of
the training thread with torch on one thread, which other processes on a shared machine do not
inflate; ``--clock wall`` for elapsed time (always used on a GPU). Reported per variant, as the
median over repeats of the ratio to the dense run of the same round:
  step median  the typical step between updates (what the masks cost on every step)
  step mean    the training time of all epochs / steps (updates included, amortized)
and the final sparsity of the conv and linear weights and the test accuracy.

    python benchmarks/bench_hardshrink.py            # ~ a few minutes on 1 CPU thread
    python benchmarks/bench_hardshrink.py --quick    # smoke run, seconds; -> a temporary folder or --out

Writes benchmarks/results/hardshrink.md and .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.timing import add_clock_args, add_output_args, results_folder  # noqa: E402
from benchmarks.timing import clock as read_clock  # noqa: E402
from models import Classifier, DigitsCNN, DigitsDataModule  # noqa: E402
from plugins.core.schedules import Schedule  # noqa: E402
from plugins.sparsity.hardshrink import HardshrinkSparsifier  # noqa: E402

VARIANTS = ("dense", "hardshrink", "modelpruning")


class _Clock:
    """``time.thread_time`` (CPU time of the training thread) or ``time.perf_counter`` (wall)."""

    now = staticmethod(time.thread_time)

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.epochs: list[float] = []
        self._step = self._epoch = 0.0


class _Start(L.Callback):
    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.clock._epoch = self.clock.now()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock._step = self.clock.now()


class _End(L.Callback):
    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.steps.append(self.clock.now() - self.clock._step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.clock.epochs.append(self.clock.now() - self.clock._epoch)


def _weights(net: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _model_pruning(net: nn.Module, schedule: Schedule, steps_per_epoch: int):
    from lightning.pytorch.callbacks import ModelPruning

    def target(
        epoch: int,
    ) -> float:  # ModelPruning prunes at the end of ``epoch``; ours at the start of the next
        return (
            schedule.value_at(epoch + 1, 0, steps_per_epoch)
            if epoch + 1 >= schedule.begin_epoch
            else 0.0
        )

    def amount(epoch: int) -> float:  # torch.nn.utils.prune counts the amount among what remains
        before, after = (target(epoch - 1) if epoch > 0 else 0.0), target(epoch)
        return 0.0 if after <= before else 1.0 - (1.0 - after) / (1.0 - before)

    return ModelPruning(
        "l1_unstructured",
        parameters_to_prune=_weights(net),
        use_global_unstructured=True,
        amount=amount,
        apply_pruning=lambda epoch: amount(epoch) > 0,
        make_pruning_permanent=True,
        use_lottery_ticket_hypothesis=False,
        verbose=0,
    )


def run_one(variant: str, args: argparse.Namespace, schedule: Schedule) -> dict:
    L.seed_everything(args.seed, workers=True, verbose=False)
    data = DigitsDataModule(seed=args.seed, batch_size=args.batch_size)
    net = DigitsCNN()
    module = Classifier(net, num_classes=10)
    clock = _Clock()
    clock.now = read_clock(args.clock, args.accelerator)
    plugins: list[L.Callback] = []
    steps_per_epoch = args.limit_train_batches or 20
    if variant == "hardshrink":
        plugins.append(HardshrinkSparsifier(schedule, mode="sparsity", scope="global"))
    elif variant == "modelpruning":
        plugins.append(_model_pruning(net, schedule, steps_per_epoch))
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        limit_train_batches=args.limit_train_batches,
        callbacks=[_Start(clock), *plugins, _End(clock)],
    )
    trainer.fit(module, datamodule=data)
    acc = float(trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"])
    weights = [getattr(m, n) for m, n in _weights(net)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    steps = clock.steps[args.warmup_steps :] or clock.steps
    return {
        "variant": variant,
        "step_median_s": statistics.median(steps),
        "step_mean_s": sum(clock.epochs) / max(len(clock.steps), 1),
        "steps": len(clock.steps),
        "sparsity": zeros / total,
        "test_acc": acc,
    }


def summarize(runs: list[dict]) -> dict[str, dict]:
    rounds = sorted({r["round"] for r in runs})
    by = {(r["round"], r["variant"]): r for r in runs}
    table = {}
    for variant in VARIANTS:
        mine = [by[(k, variant)] for k in rounds]
        table[variant] = {
            "step_median_ms": 1e3 * statistics.median(r["step_median_s"] for r in mine),
            "step_mean_ms": 1e3 * statistics.median(r["step_mean_s"] for r in mine),
            "ratio_step_median": statistics.median(
                r["step_median_s"] / by[(r["round"], "dense")]["step_median_s"] for r in mine
            ),
            "ratio_step_mean": statistics.median(
                r["step_mean_s"] / by[(r["round"], "dense")]["step_mean_s"] for r in mine
            ),
            "sparsity": statistics.mean(r["sparsity"] for r in mine),
            "test_acc": statistics.mean(r["test_acc"] for r in mine),
        }
    return table


def markdown(table: dict[str, dict], meta: dict) -> str:
    lines = [
        "# HardshrinkSparsifier: per-step cost",
        "",
        f"`{meta['command']}`  ",
        f"{meta['repeats']} rounds x 3 variants in one process, rotating order; digits CNN, batch "
        f"{meta['batch_size']}, {meta['epochs']} epochs, {meta['threads']} CPU thread(s), "
        f"{meta['accelerator']}, "
        f"{meta['clock']} clock, torch "
        f"{meta['torch']}, lightning {meta['lightning']}, {meta['machine']}. Target sparsity "
        f"{meta['sparsity']} (cubic from epoch {meta['begin_epoch']} to {meta['end_epoch']}).",
        "",
        "| variant | step median (ms) | x dense | step mean incl. updates (ms) | x dense "
        "| final sparsity | test acc |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant, row in table.items():
        lines.append(
            f"| {variant} | {row['step_median_ms']:.3f} | {row['ratio_step_median']:.3f} | "
            f"{row['step_mean_ms']:.3f} | {row['ratio_step_mean']:.3f} | {row['sparsity']:.4f} | "
            f"{row['test_acc']:.4f} |"
        )
    lines += [
        "",
        "Ratios are medians over rounds of (variant / dense of the same round). Step median: a "
        "typical step between updates. Step mean: all training-epoch time (updates and epoch-end "
        "pruning included) / steps.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three variants")
    parser.add_argument("--sparsity", type=float, default=0.9, help="final fraction of zeros")
    parser.add_argument("--batch-size", type=int, default=64)
    add_clock_args(parser)
    parser.add_argument("--accelerator", default="cpu", help="cpu or gpu")
    parser.add_argument("--limit-train-batches", type=int, default=None)
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the median")
    add_output_args(parser)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 epochs x 4 steps, 1 round; writes to --out or a new temporary folder",
    )
    args = parser.parse_args(argv)
    try:
        args.out = results_folder(args.out, args.quick)
    except ValueError as err:
        parser.error(str(err))
    if args.quick:
        args.epochs, args.repeats, args.limit_train_batches, args.warmup_steps = 2, 1, 4, 1
    torch.set_num_threads(args.threads)
    begin, end = 1, max(1, args.epochs // 2)
    schedule = Schedule(
        kind="cubic", start=0.0, end=args.sparsity, begin_epoch=begin, end_epoch=end
    )

    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    runs = []
    for round_ in range(args.repeats):
        order = VARIANTS[round_ % 3 :] + VARIANTS[: round_ % 3]
        for variant in order:
            result = run_one(variant, args, schedule)
            result["round"] = round_
            runs.append(result)
            print(
                f"round {round_} {variant:13s} step median {1e3 * result['step_median_s']:.3f} ms  "
                f"mean {1e3 * result['step_mean_s']:.3f} ms  sparsity {result['sparsity']:.4f}  "
                f"acc {result['test_acc']:.4f}",
                flush=True,
            )
    table = summarize(runs)
    meta = {
        "command": "python benchmarks/bench_hardshrink.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "repeats": args.repeats,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "clock": "wall" if args.accelerator != "cpu" else args.clock,
        "accelerator": args.accelerator,
        "sparsity": args.sparsity,
        "begin_epoch": begin,
        "end_epoch": end,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
    }
    result = {"meta": meta, "table": table, "runs": runs}
    print(markdown(table, meta))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hardshrink.md").write_text(markdown(table, meta))
    (args.out / "hardshrink.json").write_text(json.dumps(result, indent=2))
    print(f"written: {args.out / 'hardshrink.md'}")
    return result


if __name__ == "__main__":
    main()
