"""DDP on 2 CPU processes (gloo): from train.py, inside a multirun, and masks equal on every rank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, ROOT, run_train_cli

pytestmark = pytest.mark.ddp

DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]


def test_multirun_with_ddp_leaves_exactly_one_directory_per_job(tmp_path: Path):
    sweep = tmp_path / "sweep"
    result = run_train_cli(
        ["-m", "seed=0,1", *DDP, *FAST, f"hydra.sweep.dir={sweep}", f"hydra.run.dir={tmp_path / 'stray'}"],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["seed"] == int(job)
    assert not (tmp_path / "stray").exists(), "a DDP child wrote outside its job's folder"
