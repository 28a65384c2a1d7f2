"""A run killed in the middle and resumed with ckpt_path=last ends exactly where the run that was
never stopped ends: same weights, same masks, same schedule position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_train_cli

BASE = [
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
    "trainer.max_epochs=4",
    "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "logger=csv",
]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "model.pt", weights_only=False).state_dict()


def _train_killed_and_resumed(tmp_path: Path, overrides: list[str], crash_step: int) -> Path:
    run_dir = tmp_path / "killed"
    crash = f"+callbacks.crash={{_target_: tests.helpers.CrashAtStep, step: {crash_step}}}"
    first = run_train_cli([*BASE, *overrides, crash, f"hydra.run.dir={run_dir}"])
    assert first.returncode != 0 and f"killed at step {crash_step}" in first.stderr
    assert not (run_dir / "summary.json").exists()
    second = run_train_cli([*BASE, *overrides, "ckpt_path=last", f"hydra.run.dir={run_dir}"])
    assert second.returncode == 0, second.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param([], id="no-plugins"),
        pytest.param(
            [
                "sparsity=gmp",
                "sparsity.schedule.begin_epoch=0",
                "sparsity.schedule.end_epoch=3",
                "sparsity.schedule.every_n_steps=2",
                "pruning=random",
                "pruning.schedule.begin_epoch=1",
                "pruning.schedule.end_epoch=3",
            ],
            id="hardshrink+random-structured",
        ),
        pytest.param(["constraints=orthogonal"], id="orthogonal-projection"),
        pytest.param(
            [
                "constraints=learned_mask",
                "sparsity=gmp",
                "sparsity.schedule.begin_epoch=0",
                "sparsity.schedule.end_epoch=3",
            ],
            id="learned-mask+hardshrink",
        ),
    ],
)
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, overrides: list[str]):
    straight = tmp_path / "straight"
    result = run_train_cli([*BASE, *overrides, f"hydra.run.dir={straight}"])
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = _train_killed_and_resumed(tmp_path, overrides, crash_step=12)
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((resumed / "summary.json").read_text())
    for key in sa:
        if key.startswith(("sparsity/", "pruning/", "constraints")):
            assert sa[key] == sb[key], key
