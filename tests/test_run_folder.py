"""One run per folder: a second run started into a folder in use is refused with one line and
changes nothing there; the first finishes intact. A killed run leaves no stale lock (the resume
tests start again in the folder of a run killed with SIGKILL)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import FAST, ROOT, run_train_cli


def start_training(args: list[str], log: Path) -> subprocess.Popen:
    """``train.py`` started with ``args`` (whose StepLog callback writes ``log``), returned once it
    trains: once ``log`` exists."""
    run = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *FAST, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not log.exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.1)
    return run


def test_second_run_into_a_folder_in_use_is_refused_and_the_first_finishes_intact(tmp_path: Path):
    run_dir, log = tmp_path / "run", tmp_path / "first.log"
    slow = f"+callbacks.steps={{_target_: tests.helpers.StepLog, path: '{log}', sleep: 3.0}}"
    first = start_training(["seed=0", slow, f"hydra.run.dir={run_dir}"], log)
    second = run_train_cli([*FAST, "seed=1", f"hydra.run.dir={run_dir}"], timeout=120)
    out, err = first.communicate(timeout=300)

    assert second.returncode == 2
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: hydra.run.dir=") and "one run per folder" in lines[0]
    assert first.returncode == 0, err[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["seed"] == 0
    assert "seed: 0" in (run_dir / ".hydra" / "config.yaml").read_text()  # not overwritten by the second
    assert (run_dir / "model.pt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_a_folder_named_with_the_task_name_is_locked_as_resolved(tmp_path: Path):
    # hydra.run.dir with ${task_name}: the folder the run writes, not one of that literal name
    # (which two runs of different tasks would share, and which was created, empty, beside them).
    typed, log = f"hydra.run.dir={tmp_path}/${{task_name}}/run", tmp_path / "first.log"
    slow = f"+callbacks.steps={{_target_: tests.helpers.StepLog, path: '{log}', sleep: 10.0}}"
    first = start_training(["task_name=a", slow, typed], log)  # training, in tmp_path/a/run
    other_task = run_train_cli([*FAST, "task_name=b", typed], timeout=120)
    same_task = run_train_cli([*FAST, "task_name=a", typed], timeout=120)
    out, err = first.communicate(timeout=300)

    assert other_task.returncode == 0, other_task.stderr[-3000:]
    assert (tmp_path / "b" / "run" / "summary.json").is_file()
    assert same_task.returncode == 2 and "one run per folder" in same_task.stderr
    assert first.returncode == 0, err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "first.log"]
