"""STR (``sparsity=str``): the soft threshold, thresholds trained by the run's optimizer, the target
reached on the digits CNN, an exact resume after a real signal, and bad input refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.func import functional_call

from plugins import ConfigError
from plugins.constraints import WeightConstraints
from plugins.constraints.elementwise import SoftThreshold, soft_threshold
from plugins.sparsity.str import STRSparsifier
from tests.conftest import run_train_cli
from tests.helpers import Tiny, mlp, quiet_trainer

# --- the reparametrization ------------------------------------------------------------------------


def _away_from_kinks(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """``w`` with no entry within 1e-3 of 0 or of +-threshold: gradcheck's finite differences
    must not straddle the kinks of sign, abs and relu."""
    w = w.clone()
    for kink in (0.0, threshold, -threshold):
        near = (w - kink).abs() < 1e-3
        w[near] += 2e-3
    return w


def test_str_forward_is_the_soft_threshold_and_passes_gradcheck():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).double()
    before = layer.weight.detach().clone()
    rules = WeightConstraints([{"name": "soft_threshold", "args": {"s_init": -2.0}, "include": ["weight"]}])
    (applied,) = rules.apply(layer)
    constraint = applied.constraint
    assert isinstance(constraint, SoftThreshold)
    torch.testing.assert_close(layer.weight, before, rtol=0, atol=1e-15)  # registering keeps W
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.randn(5, 6, dtype=torch.float64) * 0.3)
        constraint.s.fill_(-1.5)
    w = layer.parametrizations.weight.original.detach()
    threshold = 1.0 / (1.0 + math.exp(1.5))
    expected = torch.sign(w) * torch.clamp(w.abs() - threshold, min=0.0)  # written out, not the module's code
    assert torch.equal(layer.weight, expected)
    assert int((layer.weight == 0).sum()) == int((w.abs() <= threshold).sum()) > 0

    w = _away_from_kinks(torch.randn(5, 6, dtype=torch.float64) * 0.3, threshold).requires_grad_()
    s = torch.tensor([-1.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, s: functional_call(constraint, {"s": s}, (w,)), (w, s))
    assert torch.autograd.gradcheck(soft_threshold, (w, s))
    # The gradient to s is -sigmoid'(s) times the sum of sign(w) * upstream over the live entries.
    out = functional_call(constraint, {"s": s}, (w,))
    (grad_s,) = torch.autograd.grad(out.sum(), s)
    live = w.detach().abs() > threshold
    assert float(grad_s) == pytest.approx(-threshold * (1 - threshold) * float(torch.sign(w.detach())[live].sum()))


# --- trained by the run's optimizer ---------------------------------------------------------------


class _Watch(L.Callback):
    """Records each threshold before (after the controller's step) and after the optimizer step."""

    def __init__(self, sparsifier: STRSparsifier) -> None:
        self.sparsifier = sparsifier
        self.in_optimizer: bool | None = None
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        trained = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.in_optimizer = all(id(a.constraint.s) in trained for a in self.sparsifier.applied)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._before = [(a.constraint.s.detach().clone(), a.constraint.s.grad.clone()) for a in self.sparsifier.applied]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for (before, grad), a in zip(self._before, self.sparsifier.applied, strict=True):
            self.steps.append((before, grad, a.constraint.s.detach().clone()))


def test_thresholds_are_created_in_setup_and_trained_by_the_run_optimizer():
    torch.manual_seed(0)
    sparsifier = STRSparsifier(target=0.5, gain=0.5, bake_at_end=False)
    watch = _Watch(sparsifier)
    model = Tiny(mlp(8, 32, 3))
    quiet_trainer([sparsifier, watch], max_epochs=2).fit(model)
    assert watch.in_optimizer is True
    assert len(sparsifier.applied) == 2 and len(watch.steps) == 2 * 16
    # The first step of SGD (momentum 0.9, weight decay 1e-3, lr 0.1) on s: s - lr * (grad + wd * s).
    for before, grad, after in watch.steps[:2]:
        assert float(grad.abs()) > 0
        torch.testing.assert_close(after, before - 0.1 * (grad + 1e-3 * before), rtol=0, atol=1e-7)
    # Later steps too: the optimizer moves every threshold (not only the controller).
    assert all(not torch.equal(before, after) for before, _, after in watch.steps)
    assert all(float(grad.abs()) > 0 for _, grad, _ in watch.steps)


# --- the digits CNN reaches its target --------------------------------------------------------------

DIGITS = [
    "sparsity=str",
    "sparsity.target=0.9",
    "trainer.max_epochs=5",
    "sparsity.schedule.end_epoch=3",
    "trainer.accelerator=cpu",
    "logger=csv",
]


@pytest.mark.slow
def test_str_on_the_digits_cnn_reaches_its_target(tmp_path: Path):
    result = run_train_cli([*DIGITS, f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    print(f"STR digits: test/acc={summary['test/acc']:.4f} sparsity/global={summary['sparsity/global']:.4f}")
    assert abs(summary["sparsity/global"] - 0.9) <= 0.02
    assert abs(summary["sparsity/selected"] - 0.9) <= 0.02
    assert summary["test/acc"] >= 0.9
    # Learned, not prescribed: the layers end at different sparsities and thresholds.
    layers = summary["sparsity/selected_layers"]
    assert max(layers.values()) - min(layers.values()) > 0.3
    assert len(set(summary["sparsity/thresholds"].values())) == len(layers)
    # Baked: model.pt is a plain model holding the zeros summary.json reports.
    net = torch.load(tmp_path / "model.pt", weights_only=False)
    assert not any(hasattr(m, "parametrizations") for m in net.modules())
    weights = [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(summary["sparsity/global"])


# --- resume -----------------------------------------------------------------------------------------

EPOCHS, BATCHES = 4, 5
BASE = [
    "sparsity=str",
    "sparsity.target=0.6",
    "sparsity.schedule.end_epoch=2",
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
    f"trainer.max_epochs={EPOCHS}",
    f"trainer.limit_train_batches={BATCHES}",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "logger=csv",
]


def _log(path: Path) -> str:
    return f"+callbacks.steps={{_target_: tests.helpers.StepLog, path: '{path}'}}"


def _steps(path: Path) -> list[int]:
    return [int(line.split()[1]) for line in path.read_text().splitlines() if line]


def _final(run_dir: Path) -> dict:
    model = torch.load(run_dir / "model.pt", weights_only=False).state_dict()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    plugin = {k: v for k, v in ckpt["callbacks"].items() if k.startswith("STRSparsifier")}
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"model": model, "raw": ckpt["parametrizations"], "plugin": plugin, "summary": summary}


@pytest.mark.slow
def test_str_stopped_by_sigterm_resumes_exactly(tmp_path: Path):
    straight = tmp_path / "straight"
    result = run_train_cli([*BASE, f"hydra.run.dir={straight}"])
    assert result.returncode == 0, result.stderr[-3000:]

    run_dir, first, second = tmp_path / "run", tmp_path / "first.log", tmp_path / "second.log"
    stop = "+callbacks.stop={_target_: tests.helpers.SignalAtStep, step: 12, signal: SIGTERM}"
    stopped = run_train_cli([*BASE, _log(first), stop, f"hydra.run.dir={run_dir}"])
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert _steps(first) == list(range(13)) and not (run_dir / "summary.json").exists()
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 13
    thresholds = [k for k in saved["parametrizations"] if k.endswith(".s")]
    assert len(thresholds) == 4  # the learned thresholds travel in the checkpoint

    resumed = run_train_cli([*BASE, _log(second), "ckpt_path=last", f"hydra.run.dir={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from epoch 2, step 13" in resumed.stdout
    assert _steps(second) == list(range(13, EPOCHS * BATCHES))  # only the remaining steps

    a, b = _final(run_dir), _final(straight)
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["raw"].keys() == b["raw"].keys() and len(a["raw"]) == 8  # 4 stored tensors, 4 thresholds
    for name in a["raw"]:
        assert torch.equal(a["raw"][name], b["raw"][name]), name
    assert a["plugin"] and a["plugin"] == b["plugin"]
    assert a["summary"]["sparsity/thresholds"] == b["summary"]["sparsity/thresholds"]
    assert abs(b["summary"]["sparsity/selected"] - 0.6) <= 0.02


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [1.0, 1.5, -0.1, float("nan"), float("inf"), "0.9", True])
def test_a_target_outside_0_1_is_refused_naming_sparsity_target(target):
    with pytest.raises(ConfigError, match=r"^sparsity\.target=") as err:
        STRSparsifier(target=target)
    assert "[0, 1)" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"s_init": float("nan")}, "sparsity.s_init"),
        ({"gain": 0.0}, "sparsity.gain"),
        ({"schedule": {"kind": "cubic", "end": 0.5}}, "sparsity.schedule.end"),
        ({"schedule": {"kind": "wavy"}}, "sparsity.schedule.kind"),
        ({"targets": {"includes": ["*"]}}, "sparsity.targets.includes"),
        ({"bake_at_end": "yes"}, "sparsity.bake_at_end"),
    ],
)
def test_other_bad_arguments_name_their_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        STRSparsifier(target=0.5, **kwargs)
    assert err.value.key == key


@pytest.mark.parametrize(("value", "says"), [("1.5", "[0, 1)"), ("nan", "finite")])
def test_cli_bad_target_exits_2_with_one_line(tmp_path: Path, value: str, says: str):
    result = run_train_cli(
        ["sparsity=str", f"sparsity.target={value}", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}"], timeout=180
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: sparsity.target="), lines
    assert says in lines[0]
    assert not (tmp_path / "summary.json").exists()
