"""Per-step cost of the weight constraints against the unconstrained model, beside PyTorch's and
geotorch's own parametrizations.

Two models, trained by plain PyTorch steps (no Trainer) in one process. Every run builds its model
afresh from the same seed; runs follow each other in an order that rotates from round to round,
so that drifts of a shared machine hit every variant alike:
  mlp       3 x nn.Linear(512, 512) with ReLU between, batch 64 of random inputs and targets,
            mean squared error (regression); constraints on the three Linear weights
  resnet1d  models.ResNet1d as conf/model/resnet1d.yaml and conf/norm/batch.yaml build it, random
            series of GunPoint's shape (1 channel, length 150, 2 classes) at conf/data/ucr.yaml's
            batch size, cross-entropy; constraints on the Conv1d weights, each seen as the
            (out, in * kernel) matrix

A step is zero_grad, forward, loss, backward and Adam.step (lr 1e-3); the projection constraints'
``WeightConstraints.project()`` runs inside it, attached to the optimizer as a step post-hook
(``attach``, as the callback does in training). The variants of each model:
  none                   the unconstrained model
  ours parametrization   a WeightConstraints rule whose constraint is a map in forward
  ours projection        a WeightConstraints rule kept by projection after each optimizer step
  PyTorch                torch.nn.utils.parametrizations.orthogonal (each map), spectral_norm,
                         weight_norm, registered directly
  geotorch               geotorch.orthogonal (expm, cayley), symmetric, skew, sphere (embedded:
                         rows x / ||x||, as unit_norm)
A variant that cannot hold on a model's tensors is n/a, with the reason (symmetric of a non-square
conv kernel; the libraries' orthogonal on a 3-D conv weight, which they read as a batch of
(in, kernel) matrices: another constraint).

The clock is by default the CPU time of the training thread with torch on one thread, which other
processes on a shared machine do not inflate; ``--clock wall`` for elapsed time. Reported per
variant: the median step (warm-up steps left out), and as the headline the median over rounds of
the ratio to the unconstrained run of the same round; the violation is the constraint's own
measure (``WeightConstraints.violations()``, for the libraries our class's ``violation`` of the
same constraint, e.g. ``orthogonal_violation``), max over tensors and rounds, float32 weights,
in eval mode after the timed steps.

    python benchmarks/bench_constraints.py            # ~ 6 minutes on 1 CPU thread
    python benchmarks/bench_constraints.py --quick    # smoke run on small models, seconds

Writes benchmarks/results/constraints.md and .json (``--quick``: --out or a new temporary folder).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrizations

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.timing import add_clock_args, add_output_args, clock, results_folder  # noqa: E402
from models.backbones import ResNet1d  # noqa: E402
from plugins.constraints import ConstraintError, WeightConstraints, build_constraint  # noqa: E402
from plugins.core.selection import Target, select_parameters  # noqa: E402
from plugins.norm import NormFactory  # noqa: E402

MODELS = ("mlp", "resnet1d")
# GunPoint (UCR): univariate series of length 150, two classes.
SERIES_CHANNELS, SERIES_LENGTH, SERIES_CLASSES = 1, 150, 2
MODULE_TYPES = {"mlp": ["Linear"], "resnet1d": ["Conv1d"]}
BOUND = 1e-4  # the violation the cheap path must reach (float32)
TARGET_SPEEDUP = 5.0  # polar vs parametrizations.orthogonal(matrix_exp) on the MLP


@dataclass(frozen=True)
class Variant:
    """One way to constrain the selected weights: ``library`` ours, PyTorch or geotorch; the
    registry name of the constraint it enforces (empty for none); ``args`` for our rule or the
    library's function; ``label`` the method as the table shows it."""

    library: str
    constraint: str = ""
    args: tuple[tuple[str, Any], ...] = ()
    label: str = ""

    @property
    def key(self) -> str:
        if not self.constraint:
            return "none"
        return f"{self.library}:{self.constraint}" + (f"({self.label})" if self.label else "")


def _ours(name: str, label: str = "", **args: Any) -> Variant:
    return Variant("ours", name, tuple(args.items()), label)


VARIANTS: tuple[Variant, ...] = (
    Variant("none"),
    _ours("orthogonal", "polar", method="polar"),
    _ours("orthogonal", "polar, tol=1e-4", method="polar", tol=1e-4),
    _ours("orthogonal", "qr", method="qr"),
    _ours("orthogonal", "matrix_exp", method="matrix_exp"),
    _ours("orthogonal", "cayley", method="cayley"),
    _ours("orthogonal", "householder", method="householder"),
    Variant("PyTorch", "orthogonal", (("orthogonal_map", "matrix_exp"),), "matrix_exp"),
    Variant("PyTorch", "orthogonal", (("orthogonal_map", "cayley"),), "cayley"),
    Variant("PyTorch", "orthogonal", (("orthogonal_map", "householder"),), "householder"),
    Variant("geotorch", "orthogonal", (("triv", "expm"),), "expm"),
    Variant("geotorch", "orthogonal", (("triv", "cayley"),), "cayley"),
    _ours("spectral_norm"),
    Variant("PyTorch", "spectral_norm"),
    _ours("weight_norm"),
    Variant("PyTorch", "weight_norm"),
    _ours("symmetric"),
    Variant("geotorch", "symmetric"),
    _ours("skew"),
    Variant("geotorch", "skew"),
    _ours("non_negative", "softplus", method="softplus"),
    _ours("non_negative", "clamp", method="clamp"),
    _ours("unit_norm"),
    Variant("geotorch", "unit_norm", (("embedded", True),), "sphere, embedded"),
    _ours("max_norm"),
    _ours("learned_mask"),
)
POLAR = "ours:orthogonal(polar)"
# The side-by-side pairs of the headline: (model, ours, theirs, what theirs is).
HEADLINES = (
    ("mlp", POLAR, "PyTorch:orthogonal(matrix_exp)", "parametrizations.orthogonal(matrix_exp)"),
    ("mlp", POLAR, "PyTorch:orthogonal(cayley)", "parametrizations.orthogonal(cayley)"),
    ("mlp", POLAR, "geotorch:orthogonal(expm)", "geotorch.orthogonal(expm)"),
    ("resnet1d", POLAR, "ours:orthogonal(matrix_exp)", "PyTorch's matrix_exp on the matrix view"),
)


class NotApplicable(Exception):
    """This variant cannot constrain this model's tensors; the message says why."""


def _geotorch():
    try:
        import geotorch
    except ImportError:  # pragma: no cover - a dev dependency
        raise NotApplicable("geotorch is not installed") from None
    return geotorch


def _library_fn(variant: Variant) -> tuple[Callable[..., Any], bool]:
    """The library function registering ``variant`` on ``(module, tensor_name, **args)``, and
    whether it reads a 3-D tensor as a batch of matrices (so not our constraint on a conv)."""
    if variant.library == "PyTorch":
        return getattr(parametrizations, variant.constraint), variant.constraint == "orthogonal"
    geotorch = _geotorch()
    name = {"unit_norm": "sphere"}.get(variant.constraint, variant.constraint)
    return getattr(geotorch, name), True


def constrain(variant: Variant, net: nn.Module, model: str) -> tuple[Callable[[], float], Any]:
    """Register ``variant`` on ``net``'s selected weights. Returns the measure of the violation
    (max over tensors) and the WeightConstraints (ours) or None; NotApplicable if it cannot."""
    types = MODULE_TYPES[model]
    if variant.library == "ours":
        rule = {"name": variant.constraint, "args": dict(variant.args), "include": ["*weight"]}
        constraints = WeightConstraints(rules=[{**rule, "module_types": types}], bake_at_end=False)
        try:
            constraints.apply(net)
        except ConstraintError as err:
            raise NotApplicable(err.allowed) from None
        return (lambda: max(constraints.violations().values())), constraints
    targets: list[Target] = select_parameters(net, ["*weight"], [], types)
    register, batched = _library_fn(variant)
    if batched and any(t.tensor.ndim > 2 for t in targets):
        if variant.constraint == "unit_norm":
            why = "geotorch's sphere normalizes each kernel (last dimension), not the rows"
        else:
            why = f"{variant.library} reads a 3-D conv weight as a batch of (in, kernel) matrices"
        if variant.library == "PyTorch":
            why += "; ours with this map is PyTorch's on the (out, in*kernel) view"
        raise NotApplicable(why)
    for t in targets:
        register(t.module, t.tensor_name, **dict(variant.args))
    checker = build_constraint(variant.constraint, {}, "check")
    return (lambda: max(float(checker.violation(t.tensor)) for t in targets)), None


def build(model: str, args: argparse.Namespace) -> tuple[nn.Module, list, Callable]:
    """The model (seeded), a few batches of random data and the loss."""
    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed + 1)
    if model == "mlp":
        w = args.width
        net = nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w))
        batches = [
            (
                torch.randn(args.batch_size, w, generator=data),
                torch.randn(args.batch_size, w, generator=data),
            )
            for _ in range(args.batches)
        ]
        return net, batches, nn.functional.mse_loss
    cfg = args.resnet
    net = ResNet1d(
        in_channels=SERIES_CHANNELS,
        num_classes=SERIES_CLASSES,
        widths=cfg["widths"],
        kernels=cfg["kernels"],
        norm=NormFactory(**cfg["norm"]),
    )
    batches = [
        (
            torch.randn(cfg["batch_size"], SERIES_CHANNELS, SERIES_LENGTH, generator=data),
            torch.randint(0, SERIES_CLASSES, (cfg["batch_size"],), generator=data),
        )
        for _ in range(args.batches)
    ]
    return net, batches, nn.functional.cross_entropy


def run_one(model: str, variant: Variant, args: argparse.Namespace) -> dict:
    """Train ``args.warmup + args.steps`` steps; the median timed step and the final violation."""
    now = clock(args.clock)
    net, batches, loss_fn = build(model, args)
    measure, constraints = (
        (None, None) if not variant.constraint else constrain(variant, net, model)
    )
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=args.lr)
    if constraints is not None:
        constraints.attach(optimizer)  # projections run in optimizer.step(): inside the timing
    net.train()
    times = []
    for i in range(args.warmup + args.steps):
        x, y = batches[i % len(batches)]
        start = now()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        times.append(now() - start)
    net.eval()
    with torch.no_grad():
        violation = measure() + 0.0 if measure is not None else None  # + 0.0: no "-0.0"
    return {
        "model": model,
        "variant": variant.key,
        "step_s": statistics.median(times[args.warmup :]),
        "violation": violation,
        "loss": loss.item(),
    }


def how(variant: Variant) -> str:
    if not variant.constraint:
        return "-"
    if variant.library != "ours":
        return variant.library
    projects = build_constraint(variant.constraint, dict(variant.args), "check").projects
    return "ours projection" if projects else "ours parametrization"


def summarize(
    runs: list[dict], skipped: dict[tuple[str, str], str], models: list[str]
) -> list[dict]:
    by = {(r["model"], r["variant"], r["round"]): r for r in runs}
    rounds = sorted({r["round"] for r in runs})
    rows = []
    for model in models:
        for variant in VARIANTS:
            row = {
                "model": model,
                "variant": variant.key,
                "constraint": variant.constraint or "none",
                "method": variant.label,
                "how": how(variant),
            }
            if (model, variant.key) in skipped:
                rows.append({**row, "note": skipped[(model, variant.key)]})
                continue
            mine = [by[(model, variant.key, k)] for k in rounds]
            ratios = [r["step_s"] / by[(model, "none", r["round"])]["step_s"] for r in mine]
            violations = [r["violation"] for r in mine if r["violation"] is not None]
            rows.append(
                {
                    **row,
                    "step_ms": 1e3 * statistics.median(r["step_s"] for r in mine),
                    "ratio": statistics.median(ratios),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "violation": max(violations) if violations else None,
                    "note": "",
                }
            )
    return rows


def headlines(runs: list[dict], rows: list[dict]) -> list[dict]:
    """How many times faster per step ours is than theirs: median over rounds of their ratio."""
    by = {(r["model"], r["variant"], r["round"]): r for r in runs}
    table = {(r["model"], r["variant"]): r for r in rows}
    out = []
    for model, ours, theirs, name in HEADLINES:
        if "ratio" not in table.get((model, ours), {}) or "ratio" not in table.get(
            (model, theirs), {}
        ):
            continue
        rounds = sorted({r["round"] for r in runs if r["model"] == model})
        speedup = statistics.median(
            by[(model, theirs, k)]["step_s"] / by[(model, ours, k)]["step_s"] for k in rounds
        )
        a, b = table[(model, ours)]["violation"], table[(model, theirs)]["violation"]
        out.append(
            {
                "model": model,
                "ours": ours,
                "theirs": theirs,
                "speedup": speedup,
                "violation_ours": a,
                "violation_theirs": b,
                "line": f"{model}: orthogonal polar vs {name}: {speedup:.1f}x faster per step; "
                f"violations {a:.1e} vs {b:.1e}",
            }
        )
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(rows: list[dict], heads: list[dict], meta: dict) -> str:
    lines = [
        "# Weight constraints: per-step cost",
        "",
        f"`{meta['command']}`  ",
        f"{meta['repeats']} rounds x {len(VARIANTS)} variants x {len(MODELS)} models in one "
        f"process, rotating order; {meta['warmup']} warm-up + {meta['steps']} timed steps per "
        f"run, Adam lr {meta['lr']}. MLP: 3 x Linear({meta['width']}, {meta['width']}) + ReLU, "
        f"batch {meta['batch_size']}, MSE to random targets. ResNet1d: widths "
        f"{meta['resnet']['widths']}, kernels {meta['resnet']['kernels']}, "
        f"{meta['resnet']['norm']['kind']} norm, batch {meta['resnet']['batch_size']} of random "
        f"series ({SERIES_CHANNELS} x {SERIES_LENGTH}, {SERIES_CLASSES} classes), cross-entropy. "
        f"{meta['threads']} CPU thread(s), {meta['clock']} clock, torch {meta['torch']}, geotorch "
        f"{meta['geotorch']}, {meta['machine']}.",
        "",
        "How to read it: a step is zero_grad + forward + loss + backward + Adam.step, plus the "
        "projection for the projection constraints. *x none* is the median over rounds of "
        "(variant's median step / the unconstrained model's in the same round), with the lowest "
        "and highest round beside it. *Violation*: the constraint's own measure "
        "(WeightConstraints.violations(); for PyTorch and geotorch our class's measure of the "
        "same constraint, e.g. orthogonal_violation = ||W W^T - I||_2 on the (out, in*kernel) "
        "view), max over tensors and rounds, after the timed steps, float32 weights. "
        "Constraints go on the Linear weights (MLP) or the Conv1d weights (ResNet1d).",
        "",
    ]
    lines += [f"**{h['line']}**  " for h in heads]
    lines += [
        "",
        "| model | constraint | method | how | ms / step | x none | (min-max) | violation | note |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        spread = f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}" if "ratio" in r else "n/a"
        lines.append(
            f"| {r['model']} | {r['constraint']} | {r['method'] or '-'} | {r['how']} | "
            f"{_fmt(r.get('step_ms'), '.2f')} | {_fmt(r.get('ratio'), '.2f')} | {spread} | "
            f"{_fmt(r.get('violation'), '.1e') if r['constraint'] != 'none' else '-'} | "
            f"{r['note']} |"
        )
    lines.append("")
    return "\n".join(lines)


def _resnet_config() -> dict:
    """ResNet1d's widths and kernels, the batch norm and the UCR batch size from conf/."""
    model = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "resnet1d.yaml"))
    norm = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "norm" / "batch.yaml"))
    data = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / "ucr.yaml"))
    return {
        "widths": list(model["widths"]),
        "kernels": list(model["kernels"]),
        "norm": {k: v for k, v in norm.items() if k != "_target_"},  # NormFactory's own arguments
        "batch_size": int(data["batch_size"]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every variant")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the timed ones")
    parser.add_argument("--width", type=int, default=512, help="the MLP's width")
    parser.add_argument("--batch-size", type=int, default=64, help="the MLP's batch")
    parser.add_argument(
        "--resnet-widths", type=int, nargs="+", default=None, help="default: the model config's"
    )
    parser.add_argument("--batches", type=int, default=4, help="random batches cycled through")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    add_clock_args(parser)
    add_output_args(parser)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small models (MLP width 64, ResNet widths 8 16 16), 1 round of 1 + 2 "
        "steps; writes to --out or a new temporary folder",
    )
    args = parser.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    try:
        args.out = results_folder(args.out, args.quick)
    except ValueError as err:
        parser.error(str(err))
    args.resnet = _resnet_config()
    if args.quick:
        args.repeats, args.steps, args.warmup, args.width = 1, 2, 1, 64
        args.resnet_widths = args.resnet_widths or [8, 16, 16]
    if args.resnet_widths:
        args.resnet["widths"] = list(args.resnet_widths)
    torch.set_num_threads(args.threads)
    models = [m for m in MODELS if m in args.models]

    # Which variants fit which model: once, on a throw-away model.
    skipped: dict[tuple[str, str], str] = {}
    for model in models:
        for variant in VARIANTS[1:]:
            try:
                constrain(variant, build(model, args)[0], model)
            except NotApplicable as why:
                skipped[(model, variant.key)] = str(why)
    runs = []
    for round_ in range(args.repeats):
        for model in models:
            todo = [v for v in VARIANTS if (model, v.key) not in skipped]
            shift = (round_ * len(todo)) // args.repeats
            for variant in todo[shift:] + todo[:shift]:
                result = run_one(model, variant, args)
                result["round"] = round_
                runs.append(result)
                print(
                    f"round {round_} {model:8s} {variant.key:34s} step "
                    f"{1e3 * result['step_s']:9.3f} ms  violation "
                    f"{_fmt(result['violation'], '.2e')}",
                    flush=True,
                )
    rows = summarize(runs, skipped, models)
    heads = headlines(runs, rows)
    try:
        import geotorch

        geotorch_version = getattr(geotorch, "__version__", "?")
    except ImportError:  # pragma: no cover
        geotorch_version = "not installed"
    meta = {
        "command": "python benchmarks/bench_constraints.py " + " ".join(given),
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "width": args.width,
        "batch_size": args.batch_size,
        "resnet": args.resnet,
        "lr": args.lr,
        "optimizer": "Adam",
        "threads": args.threads,
        "clock": args.clock,
        "torch": torch.__version__,
        "geotorch": geotorch_version,
        "machine": f"{platform.platform()}, {platform.machine()} "
        f"{platform.processor() or platform.system()}",
        "python": platform.python_version(),
    }
    polar = next((h for h in heads if h["theirs"] == "PyTorch:orthogonal(matrix_exp)"), None)
    if polar is not None:
        polar["target"] = f">= {TARGET_SPEEDUP:.0f}x at violation <= {BOUND:.0e}: " + (
            "met"
            if polar["speedup"] >= TARGET_SPEEDUP
            and max(polar["violation_ours"], polar["violation_theirs"]) <= BOUND
            else "NOT met"
        )
        polar["line"] += f" (target {polar['target']})"
    result = {"meta": meta, "headlines": heads, "table": rows, "runs": runs}
    text = markdown(rows, heads, meta)
    print(text)
    for h in heads:
        print(h["line"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "constraints.md").write_text(text)
    (args.out / "constraints.json").write_text(json.dumps(result, indent=2))
    print(f"written: {args.out / 'constraints.md'}")
    return result


if __name__ == "__main__":
    main()
