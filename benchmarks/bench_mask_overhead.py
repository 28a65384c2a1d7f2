"""What a mask costs on every training step between updates, against the same dense step.

Two models, each trained in one process five ways at once, step by step in turn, so that the
drifts of a shared machine hit every variant alike:
  dense         no callback
  inplace       HardshrinkSparsifier(mask_form=auto): the zeros live in the weights, their
                gradients are zeroed before each optimizer step (plugins/core/mask_forms.py),
                on one thread through a one-byte copy of the mask (plugins/core/byte_mask.py);
                a Linear's of at least 1 MiB inside its backward, block by block while in cache
                (plugins/core/masked_linear.py)
  inplace_float the same, the gradients zeroed after backward by torch's product with the float
                mask (HeldZeros.byte_loop=False: neither the one-byte loop nor the backward blocks)
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
thread. The five fits run in five threads of which exactly one works at a time: each takes one
step and hands the turn on, and after every round (one step of each variant) the order rotates
(:class:`_Turns`). A step is so compared with the dense step of its own round, taken seconds
before or after it, not with a run minutes away: on a machine shared with other jobs, separate
runs differed by up to 15% from one another, more than the effect measured. Reported per model
and variant: the median over all paired rounds of (step / the dense step of the same round), and
the range of that median over the repeats (fresh models and trainers each); and where the extra
time goes: each step split in three phases (forward, backward, optimizer step, see
:class:`_PhaseClock`), each phase minus the dense phase of the same round, the median in ms.

Full runs first ask glibc's malloc to keep the memory it frees (benchmarks/steady_malloc.py):
otherwise a fresh 16 MiB gradient costs 4096 page faults at random steps of random variants, more
noise than the effect measured. ``--malloc default`` measures without.

    python benchmarks/bench_mask_overhead.py            # ~5 minutes on 1 CPU thread
    python benchmarks/bench_mask_overhead.py --quick    # smoke run; writes to a temporary folder

Writes benchmarks/results/mask_overhead.md and .json (full mode only).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_hardshrink import _Clock  # noqa: E402
from benchmarks.steady_malloc import keep_freed_memory  # noqa: E402
from benchmarks.timing import add_clock_args, parse_with_output, write_results  # noqa: E402
from benchmarks.timing import clock as read_clock  # noqa: E402
from plugins.sparsity.hardshrink import HardshrinkSparsifier  # noqa: E402

VARIANTS = ("dense", "inplace", "inplace_float", "parametrize", "modelpruning")
SPARSITY = 0.9


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
    if variant in ("inplace", "inplace_float", "parametrize"):
        schedule = {"kind": "constant", "end": SPARSITY, "begin_epoch": 1, "end_epoch": 1}
        form = "parametrize" if variant == "parametrize" else "auto"
        sparsifier = HardshrinkSparsifier(schedule, mode="sparsity", scope="global", mask_form=form, bake_at_end=False)
        return [sparsifier, _FloatProduct(sparsifier)] if variant == "inplace_float" else [sparsifier]
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


class _FloatProduct(L.Callback):
    """Switches the sparsifier's in-place masks to torch's float product (no one-byte loop)."""

    def __init__(self, sparsifier: HardshrinkSparsifier) -> None:
        self.sparsifier = sparsifier

    def on_train_start(self, trainer, pl_module) -> None:
        self.sparsifier.held.byte_loop = False


class _Turns:
    """Step-level alternation: the variants' fits run in threads, and exactly one of them holds the
    turn at any moment. A holder takes one training step, then hands the turn on; after every
    variant has stepped once (a round) the order rotates by one, so no variant always follows the
    same one. Each step is thus timed between steps of the other variants, seconds apart, not
    minutes, and the paired ratio of a round compares steps taken under the same machine load."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.cond = threading.Condition()
        self.order = list(names)
        self.active = set(names)
        self.position = 0
        self.stepped: list[str] = []  # who took each step, in order: what the pairing relies on

    def _holder(self) -> str:
        return self.order[self.position]

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self._holder() == name)

    def pass_on(self, name: str, leave: bool = False) -> None:
        with self.cond:
            if leave:
                self.active.discard(name)
            if not self.active:
                return
            if self._holder() != name:  # a fit that failed without the turn: only stop waiting on it
                self.cond.notify_all()
                return
            while True:
                self.position += 1
                if self.position == len(self.order):  # a round is over: rotate the order
                    self.position = 0
                    self.order = self.order[1:] + self.order[:1]
                if self._holder() in self.active:
                    break
            self.cond.notify_all()


PHASES = ("forward", "backward", "optimizer")


class _PhaseClock(_Clock):
    """A step's time, and its three phases: ``forward`` (batch start to ``on_before_backward``:
    zero_grad, forward, loss), ``backward`` (to the last callback's ``on_after_backward``) and
    ``optimizer`` (to batch end: ``on_before_optimizer_step`` callbacks, where the in-place form zeroes
    the gradients it did not zero in backward, the optimizer step and the batch-end hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[float] = []
        self.phases: dict[str, list[float]] = {p: [] for p in PHASES}

    def add_phases(self, marks: list[float]) -> None:
        if len(marks) != len(PHASES) + 1:
            raise RuntimeError(f"a step's phases were not all seen: {len(marks)} marks")
        for phase, start, stop in zip(PHASES, marks[:-1], marks[1:], strict=True):
            self.phases[phase].append(stop - start)


class _TakeTurn(L.Callback):
    """First callback: waits for the turn before training starts; times each step's start and the
    start of its backward."""

    def __init__(self, turns: _Turns, name: str, clock: _Clock) -> None:
        self.turns, self.name, self.clock = turns, name, clock

    def on_train_start(self, trainer, pl_module) -> None:
        self.turns.wait(self.name)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock._step = self.clock.now()
        self.clock.marks = [self.clock._step]

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.clock.marks.append(self.clock.now())


class _PassTurn(L.Callback):
    """Last callback: times the end of each step's backward and of the step, hands the turn on and
    waits for it to come back (so nothing of this fit runs while another variant's step is timed);
    leaves at the end of training."""

    def __init__(self, turns: _Turns, name: str, clock: _Clock) -> None:
        self.turns, self.name, self.clock = turns, name, clock

    def on_after_backward(self, trainer, pl_module) -> None:
        self.clock.marks.append(self.clock.now())  # after every callback's on_after_backward

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        end = self.clock.now()
        self.clock.steps.append(end - self.clock._step)
        self.clock.add_phases([*self.clock.marks, end])
        self.turns.stepped.append(self.name)
        self.turns.pass_on(self.name)
        self.turns.wait(self.name)

    def on_train_end(self, trainer, pl_module) -> None:
        self.turns.pass_on(self.name, leave=True)


def run_repeat(model: str, args: argparse.Namespace) -> tuple[dict[str, dict[str, list[float]]], list[str]]:
    """Every variant's fit of ``model``, step-interleaved (:class:`_Turns`): the time of each step
    between updates (second epoch, its first two steps left out) and of each of its phases
    (:class:`_PhaseClock`) per variant, and the variant that took each step of the repeat, in order."""
    build, shape = MODELS[model]
    turns, clocks, fits, nets, plugins = _Turns(VARIANTS), {}, {}, {}, {}
    for variant in VARIANTS:
        L.seed_everything(args.seed, verbose=False)  # the same weights and data for every variant
        nets[variant] = net = build()
        data = TensorDataset(
            torch.randn(args.steps * args.batch, *shape), torch.randint(0, 10, (args.steps * args.batch,))
        )
        plugins[variant] = _plugin(variant, net)
        clocks[variant] = clock = _PhaseClock()
        clock.now = read_clock(args.clock)
        trainer = L.Trainer(
            max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            callbacks=[_TakeTurn(turns, variant, clock), *plugins[variant], _PassTurn(turns, variant, clock)],
        )
        fits[variant] = (trainer, Trained(net), DataLoader(data, batch_size=args.batch))
    errors: list[BaseException] = []

    def fit(variant: str) -> None:
        torch.set_num_threads(args.threads)  # per thread: OpenMP's thread count is per calling thread
        try:
            trainer, module, loader = fits[variant]
            trainer.fit(module, loader)
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)
            turns.pass_on(variant, leave=True)

    threads = [threading.Thread(target=fit, args=(v,), name=v) for v in VARIANTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    for variant in VARIANTS:
        weights = [getattr(m, n) for m, n in _weights(nets[variant])]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        if variant != "dense" and abs(zeros - SPARSITY) > 0.01:
            raise RuntimeError(f"{model}/{variant}: {zeros:.4f} zeros, not {SPARSITY}")
    helds = {v: plugins[v][0].held for v in ("inplace", "inplace_float")}
    byte_zeroed = {v: bool(held.byte_zeroed | held.backward_zeroed) for v, held in helds.items()}
    if byte_zeroed != {"inplace": args.threads == 1, "inplace_float": False}:
        raise RuntimeError(f"{model}: the in-place variants did not zero gradients the way they name: {byte_zeroed}")
    in_backward = helds["inplace"].backward_zeroed
    if model == "mlp_3x2048" and args.threads == 1 and len(in_backward) != 3:
        raise RuntimeError(f"{model}: the 2048-wide layers were not zeroed in backward: {in_backward}")
    timed = slice(args.steps + 2, None)
    times = {v: {"step": clocks[v].steps[timed]} | {p: clocks[v].phases[p][timed] for p in PHASES} for v in VARIANTS}
    return times, turns.stepped


def measure(args: argparse.Namespace) -> dict:
    table: dict = {}
    for model in MODELS:
        steps: dict[str, list[float]] = {v: [] for v in VARIANTS}
        ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
        repeat_ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
        phases: dict[str, dict[str, list[float]]] = {v: {p: [] for p in PHASES} for v in VARIANTS}
        extra: dict[str, dict[str, list[float]]] = {v: {p: [] for p in PHASES} for v in VARIANTS}
        for repeat in range(args.rounds):
            times, stepped = run_repeat(model, args)
            rounds = [stepped[i : i + len(VARIANTS)] for i in range(0, len(stepped), len(VARIANTS))]
            if any(sorted(r) != sorted(VARIANTS) for r in rounds):
                raise RuntimeError(f"{model}: the variants did not step in rounds: {stepped}")
            dense = times["dense"]
            for v in VARIANTS:
                # Each step against the dense step of the same round.
                paired = [t / d for t, d in zip(times[v]["step"], dense["step"], strict=True)]
                steps[v] += times[v]["step"]
                ratios[v] += paired
                repeat_ratios[v].append(statistics.median(paired))
                for p in PHASES:
                    phases[v][p] += times[v][p]
                    extra[v][p] += [t - d for t, d in zip(times[v][p], dense[p], strict=True)]
            print(model, repeat, {v: round(r[-1], 3) for v, r in repeat_ratios.items()}, flush=True)
        table[model] = {
            v: {
                "step_ms": 1e3 * statistics.median(steps[v]),
                "x_dense": statistics.median(ratios[v]),
                "x_dense_range": [min(repeat_ratios[v]), max(repeat_ratios[v])],
                "paired_steps": len(ratios[v]),
                "steps_ms": [1e3 * t for t in steps[v]],
                "phases_ms": {p: [1e3 * t for t in phases[v][p]] for p in PHASES},
                "over_dense_ms": {p: 1e3 * statistics.median(extra[v][p]) for p in PHASES},
            }
            for v in VARIANTS
        }
    return table


def markdown(table: dict, meta: dict) -> str:
    lines = [
        "# Mask overhead: a training step between updates, against dense",
        "",
        f"`{meta['command']}`  ",
        f"{meta['rounds']} repeats x {len(VARIANTS)} variants in one process, step-interleaved in a rotating order; "
        f"{meta['steps']} steps per epoch, batch {meta['batch']}, the second epoch's steps timed and paired by round; "
        f"{SPARSITY:.0%} zeros; "
        f"{meta['threads']} CPU thread(s), {meta['clock']} clock, torch {meta['torch']}, lightning "
        f"{meta['lightning']}, {meta['machine']}; {meta['malloc']}.",
        "",
        "| model | variant | step median (ms) | x dense (median over paired steps) | range over repeats "
        "| over dense (ms): forward | backward | optimizer |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for model, rows in table.items():
        for variant, row in rows.items():
            lo, hi = row["x_dense_range"]
            over = " | ".join(f"{row['over_dense_ms'][p]:+.2f}" for p in PHASES)
            lines.append(
                f"| {model} | {variant} | {row['step_ms']:.2f} | {row['x_dense']:.3f} | {lo:.3f} - {hi:.3f} | {over} |"
            )
    lines += [
        "",
        "Over dense: the median over paired rounds of (the variant's phase - the dense phase of the same round). "
        "forward: batch start to backward (zero_grad, forward, loss); backward: to the last on_after_backward; "
        "optimizer: to batch end (on_before_optimizer_step hooks, where the in-place form zeroes the gradients "
        "not zeroed in backward, the step, the batch-end hooks).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_clock_args(parser)
    parser.add_argument("--rounds", type=int, default=3, help="repeats, each with fresh models and trainers")
    parser.add_argument("--steps", type=int, default=40, help="training steps per epoch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="1 repeat of 6 steps; writes to a temporary folder")
    parser.add_argument(
        "--malloc",
        choices=("steady", "default"),
        default=None,
        help="steady (full runs): glibc keeps freed memory, no page faults in the steps "
        "(benchmarks/steady_malloc.py); default (quick runs): the allocator as the process found it",
    )
    args, out = parse_with_output(parser, argv)
    if args.quick:
        args.rounds, args.steps = 1, 6
    args.malloc = args.malloc or ("default" if args.quick else "steady")
    malloc = keep_freed_memory() if args.malloc == "steady" else "malloc as the process started"
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    pinned = args.threads == 1 and hasattr(os, "sched_setaffinity")
    cores = os.sched_getaffinity(0) if pinned else None
    if pinned:
        try:
            # Every variant's thread on the same core: only one works at a time, and cores shared
            # with other jobs differ in speed, which would be charged to whichever variant ran there.
            os.sched_setaffinity(0, {min(cores)})
        except OSError as error:  # a container that forbids it: measure unpinned, and say so
            print(f"not pinned to one core: {error}", file=sys.stderr)
            pinned = False
    try:
        table = measure(args)
    finally:  # a caller in this process (a test) gets its cores and threads back
        torch.set_num_threads(threads)
        if pinned:
            os.sched_setaffinity(0, cores)
    meta = {
        "command": "python benchmarks/bench_mask_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rounds": args.rounds, "steps": args.steps, "batch": args.batch, "threads": args.threads,
        "clock": args.clock, "torch": torch.__version__, "lightning": L.__version__,
        "machine": f"{platform.machine()} {platform.system()}", "malloc": malloc,
    }
    result = {"meta": meta, "table": table}
    write_results(out, "mask_overhead", markdown(table, meta), result)
    return result


if __name__ == "__main__":
    main()
