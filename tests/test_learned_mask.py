"""``learned_mask``: what a fixed penalty does under Adam (why the shipped config ends with 0%
zeros), and ``target``, which reaches a fraction of closed gates, resumes exactly and refuses bad
values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from plugins import ConfigError, WeightConstraints
from tests.conftest import run_train_cli
from tests.helpers import Tiny, mlp, quiet_trainer


def _penalty_only(penalty: float, optimizer: str, steps: int, lr: float) -> torch.Tensor:
    """The scores of a learned mask on ``Linear(8, 16)`` after ``steps`` steps in which only the
    penalty pushes them (the task's loss is multiplied by 0)."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 16).double()  # float64: a step of 4e-6 on 2.94 is exact enough
    rules = WeightConstraints([{"name": "learned_mask", "args": {"penalty": penalty}, "include": ["weight"]}])
    (applied,) = rules.apply(layer)
    opt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer](layer.parameters(), lr=lr)
    x = torch.randn(4, 8, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        (layer(x).sum() * 0).backward()
        opt.step()
    return applied.constraint.scores.detach().clone()


def test_under_adam_a_fixed_penalty_moves_every_score_by_lr_per_step_whatever_its_size():
    start = math.log(0.95 / 0.05)  # temperature 1, init 0.95: S starts at logit(0.95) = 2.94
    small, huge = _penalty_only(1.0, "adam", 30, 0.01), _penalty_only(1000.0, "adam", 30, 0.01)
    # Adam divides the penalty's gradient by its own size: 30 steps of lr, for 1 as for 1000.
    torch.testing.assert_close(small, torch.full_like(small, start - 30 * 0.01), rtol=0, atol=0.01)
    torch.testing.assert_close(huge, small, rtol=0, atol=1e-4)
    assert bool((huge > 0).all())  # no gate closed: ~1000 steps of lr 3e-3 before the first can
    # Plain SGD, by contrast, steps in proportion to the penalty: lr * penalty / n * sigmoid'(S).
    for p in (1.0, 1000.0):
        moved = start - _penalty_only(p, "sgd", 1, 0.01)
        torch.testing.assert_close(moved, torch.full_like(moved, 0.01 * p / 128 * 0.95 * 0.05), rtol=1e-4, atol=0)


@pytest.mark.slow
def test_the_shipped_config_with_penalty_1000_ends_with_no_zeros(tmp_path: Path):
    """The issue's run: AdamW at lr 3e-3 cannot bring a score from 2.94 to 0 in the run's steps."""
    args = ["constraints=learned_mask", "constraints.rules.0.args.penalty=1000", "trainer.max_epochs=2"]
    result = run_train_cli([*args, "trainer.accelerator=cpu", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sparsity/global"] == 0.0


class _Closed(L.Callback):
    """The fraction of closed gates (``S <= 0``) per tensor at the end of training, before the bake."""

    def __init__(self, rules: WeightConstraints) -> None:
        self.rules = rules
        self.closed: dict[str, float] = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self.closed = {a.target: 1.0 - a.constraint.kept() for a in self.rules.applied}


def _adam(parameters):
    return torch.optim.Adam(parameters, lr=3e-3)


def _fit_with_target(target: float, epochs: int = 6, **trainer_args) -> tuple[Tiny, WeightConstraints, _Closed]:
    L.seed_everything(0)
    rules = WeightConstraints(
        [{"name": "learned_mask", "args": {"target": target, "temperature": 0.01, "penalty": 0.0}}]
    )
    closed = _Closed(rules)
    model = Tiny(mlp(8, 64, 64, 3), optimizer=_adam)
    quiet_trainer([rules, closed], max_epochs=epochs, **trainer_args).fit(model)
    return model, rules, closed


def test_a_target_is_reached_during_training_and_exactly_at_the_bake():
    model, rules, closed = _fit_with_target(0.7)
    # The controller brought every tensor there while training (not only the final cut) ...
    assert len(closed.closed) == 3
    for name, fraction in closed.closed.items():
        assert abs(fraction - 0.7) <= 0.02, (name, fraction)
    # ... and the bake closes exactly round(0.7 * n) gates per tensor: exact zeros in the weights.
    for layer in (model.net[0], model.net[2], model.net[4]):
        n = layer.weight.numel()
        assert int((layer.weight == 0).sum()) == round(0.7 * n)


def test_a_learned_mask_with_a_target_resumes_exactly(tmp_path: Path):
    straight, _, _ = _fit_with_target(0.5, epochs=4)
    L.seed_everything(0)
    rules = WeightConstraints(
        [{"name": "learned_mask", "args": {"target": 0.5, "temperature": 0.01, "penalty": 0.0}}],
        bake_at_end=False,  # the run "stops" here: its checkpoint holds the live parametrizations
    )
    first = Tiny(mlp(8, 64, 64, 3), optimizer=_adam)
    trainer = quiet_trainer([rules], max_epochs=2)
    trainer.fit(first)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    # The controller's state is the scores themselves: they are in the checkpoint's raw entries.
    raw = torch.load(tmp_path / "mid.ckpt", weights_only=True)["parametrizations"]
    assert sum(k.endswith(".scores") for k in raw) == 3

    L.seed_everything(1)  # a fresh process: nothing carried over but the checkpoint
    rules = WeightConstraints([{"name": "learned_mask", "args": {"target": 0.5, "temperature": 0.01, "penalty": 0.0}}])
    resumed = Tiny(mlp(8, 64, 64, 3), optimizer=_adam)
    quiet_trainer([rules], max_epochs=4).fit(resumed, ckpt_path=tmp_path / "mid.ckpt", weights_only=True)
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


@pytest.mark.slow
def test_train_py_learned_mask_with_a_target_reaches_it(tmp_path: Path):
    args = [
        "constraints=learned_mask",
        "constraints.rules.0.args.target=0.5",
        "constraints.rules.0.args.temperature=0.003",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
    ]
    result = run_train_cli([*args, f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert abs(summary["sparsity/global"] - 0.5) <= 0.02
    assert all(abs(v - 0.5) <= 0.02 for v in summary["sparsity/layers"].values())


@pytest.mark.parametrize(
    ("args", "key"),
    [
        ({"target": 1.0}, "constraints.rules[0].args.target"),
        ({"target": -0.2}, "constraints.rules[0].args.target"),
        ({"target": float("nan")}, "constraints.rules[0].args.target"),
        ({"target": 0.5, "gain": 0.0}, "constraints.rules[0].args.gain"),
        ({"target": 0.5, "gain": 1.5}, "constraints.rules[0].args.gain"),
    ],
)
def test_bad_target_or_gain_is_refused_naming_the_key(args, key):
    with pytest.raises(ConfigError) as err:
        WeightConstraints([{"name": "learned_mask", "args": args}])
    assert err.value.key == key
