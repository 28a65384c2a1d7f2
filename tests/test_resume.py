"""A run stopped in the middle resumes with ckpt_path=last and ends where the run that was never
stopped ends: the resumed process trains only what was left (counted from the steps it ran), and
its final weights, masks and schedule position are those of the uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_train_cli

EPOCHS, BATCHES = 4, 5
BASE = [
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
    f"trainer.max_epochs={EPOCHS}",
    f"trainer.limit_train_batches={BATCHES}",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "logger=csv",
]
# Hardshrink, random structured pruning and a constraint, all on at once, all mid-schedule at a stop.
PLUGINS = [
    "sparsity=gmp",
    "sparsity.schedule.begin_epoch=0",
    "sparsity.schedule.end_epoch=3",
    "sparsity.schedule.every_n_steps=2",
    "pruning=random",
    "pruning.schedule.begin_epoch=1",
    "pruning.schedule.end_epoch=3",
    "constraints=non_negative",
]
# The SIGTERM test also runs constraints whose state is more than the weights: orthogonal polar
# projections (the stored tensor differs from the computed one) and learned gates (their own scores).
MORE = {
    "orthogonal": ["constraints=orthogonal"],
    "learned_mask+gmp": ["constraints=learned_mask", "sparsity=gmp", "sparsity.schedule.begin_epoch=0", "sparsity.schedule.end_epoch=3"],
}


def _steps(path: Path) -> list[tuple[int, int]]:
    """(epoch, step) of every batch a process trained, from tests.helpers.StepLog."""
    return [tuple(map(int, line.split())) for line in path.read_text().split("\n") if line]


def _log(path: Path, sleep: float = 0.0) -> str:
    return f"+callbacks.steps={{_target_: tests.helpers.StepLog, path: '{path}', sleep: {sleep}}}"


def _final_state(run_dir: Path) -> dict:
    """Weights (model.pt), and masks and schedule positions (last.ckpt, written before the bake)."""
    model = torch.load(run_dir / "model.pt", weights_only=False).state_dict()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    plugins = {k: v for k, v in ckpt["callbacks"].items() if k.startswith(("Hardshrink", "Structured", "Weight"))}
    on = [line for line in (run_dir / ".hydra" / "overrides.yaml").read_text().splitlines() if "=" in line]
    return {"model": model, "raw": ckpt.get("parametrizations", {}), "plugins": plugins, "step": ckpt["global_step"], "plugins_on": on}


def _assert_same(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    # masks, stored tensors that differ from the computed ones, gate scores (none for a projection)
    assert a["raw"].keys() == b["raw"].keys()
    assert any(k.endswith(".mask") for k in a["raw"]) == any("sparsity" in p or "pruning" in p for p in a["plugins_on"])
    for name in a["raw"]:
        assert torch.equal(a["raw"][name], b["raw"][name]), name
    assert a["plugins"] and a["plugins"] == b["plugins"] and a["step"] == b["step"]


_straight: dict[str, dict] = {}


def uninterrupted(tmp_path_factory, plugins: list[str]) -> dict:
    """The final state of the run that was never stopped (once per plugin set)."""
    key = " ".join(plugins)
    if key not in _straight:
        run_dir = tmp_path_factory.mktemp("straight") / "run"
        result = run_train_cli([*BASE, *plugins, f"hydra.run.dir={run_dir}"])
        assert result.returncode == 0, result.stderr[-3000:]
        _straight[key] = _final_state(run_dir)
    return _straight[key]


def _resume(run_dir: Path, log: Path, plugins: list[str] = PLUGINS) -> subprocess.CompletedProcess:
    result = run_train_cli([*BASE, *plugins, _log(log), "ckpt_path=last", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_killed_after_an_epoch_checkpoint_resumes_the_remaining_epochs(tmp_path: Path, tmp_path_factory):
    run_dir, first_log, second_log = tmp_path / "run", tmp_path / "first.log", tmp_path / "second.log"
    last = run_dir / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *BASE, *PLUGINS, _log(first_log, 0.3), f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if last.is_file() and torch.load(last, weights_only=True)["epoch"] >= 1:  # epoch 2 of 4 is saved
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    saved = torch.load(last, weights_only=True)
    done_epochs = saved["epoch"] + 1
    assert 2 <= done_epochs < EPOCHS and not (run_dir / "summary.json").exists()

    result = _resume(run_dir, second_log)
    assert f"resuming from epoch {saved['epoch']}, step {saved['global_step']}" in result.stdout
    ran = _steps(second_log)
    assert sorted({e for e, _ in ran}) == list(range(done_epochs, EPOCHS))  # only the remaining epochs
    assert [s for _, s in ran] == list(range(saved["global_step"], EPOCHS * BATCHES))
    _assert_same(_final_state(run_dir), uninterrupted(tmp_path_factory, PLUGINS))


@pytest.mark.parametrize(
    ("name", "status", "plugins"),
    [
        ("SIGTERM", 143, PLUGINS),
        ("SIGINT", 130, PLUGINS),
        *[pytest.param("SIGTERM", 143, more, id=f"SIGTERM-{label}") for label, more in MORE.items()],
    ],
)
def test_signal_in_the_middle_of_an_epoch_saves_and_resumes_from_that_step(
    tmp_path: Path, tmp_path_factory, name: str, status: int, plugins: list[str]
):
    run_dir, first_log, second_log = tmp_path / "run", tmp_path / "first.log", tmp_path / "second.log"
    stop = f"+callbacks.stop={{_target_: tests.helpers.SignalAtStep, step: 12, signal: {name}}}"
    first = run_train_cli([*BASE, *plugins, _log(first_log), stop, f"hydra.run.dir={run_dir}"])
    assert first.returncode == status, first.stderr[-3000:]
    assert f"stopped by {name} at epoch 2, step 13" in first.stderr
    assert not (run_dir / "summary.json").exists() and not (run_dir / "model.pt").exists()
    assert [s for _, s in _steps(first_log)] == list(range(13))  # it finished the batch it was on
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 13

    result = _resume(run_dir, second_log, plugins)
    assert "resuming from epoch 2, step 13" in result.stdout
    ran = _steps(second_log)
    assert [s for _, s in ran] == list(range(13, EPOCHS * BATCHES))  # the rest of epoch 2, then 3
    assert ran[0][0] == 2
    _assert_same(_final_state(run_dir), uninterrupted(tmp_path_factory, plugins))


def test_killed_after_a_checkpoint_every_n_steps_resumes_from_that_step(tmp_path: Path, tmp_path_factory):
    # That checkpoint is written in on_train_batch_end, where Lightning holds its batch as processed
    # but not completed: the resumed loader must skip that batch too, or every later step shifts.
    run_dir, first_log, second_log = tmp_path / "run", tmp_path / "first.log", tmp_path / "second.log"
    every = "+checkpoint.every_n_train_steps=4"
    kill = "+callbacks.stop={_target_: tests.helpers.SignalAtStep, step: 12, signal: SIGKILL}"
    first = run_train_cli([*BASE, *PLUGINS, every, _log(first_log), kill, f"hydra.run.dir={run_dir}"])
    assert first.returncode == -signal.SIGKILL
    assert [s for _, s in _steps(first_log)] == list(range(12))
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12  # epoch 2, batch 2 of 5

    result = _resume(run_dir, second_log)
    assert "resuming from epoch 2, step 12" in result.stdout
    assert "dataloader is not resumable" not in result.stdout + result.stderr  # it is: no false alarm
    assert _steps(second_log) == [(2, 12), (2, 13), (2, 14), *[(3, s) for s in range(15, 20)]]
    _assert_same(_final_state(run_dir), uninterrupted(tmp_path_factory, PLUGINS))


DDP = ["trainer=ddp", "trainer.devices=2", "trainer.max_epochs=3", *PLUGINS]


@pytest.mark.ddp
def test_ddp_killed_after_a_checkpoint_every_n_steps_resumes_from_that_step(tmp_path: Path, tmp_path_factory):
    # Each process skips the batches it trained of its own share: the order Lightning's wrapper
    # would give, so no index runs past a shortened list.
    run_dir, first_log, second_log = tmp_path / "run", tmp_path / "first.log", tmp_path / "second.log"
    every = "+checkpoint.every_n_train_steps=2"
    kill = "+callbacks.stop={_target_: tests.helpers.SignalAtStep, step: 7, signal: SIGKILL}"
    first = run_train_cli([*BASE, *DDP, every, _log(first_log), kill, f"hydra.run.dir={run_dir}"])
    assert first.returncode != 0 and not (run_dir / "summary.json").exists()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6  # epoch 1, batch 1 of 5

    result = run_train_cli([*BASE, *DDP, _log(second_log), "ckpt_path=last", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from epoch 1, step 6" in result.stdout
    assert sorted({s for _, s in _steps(second_log)}) == list(range(6, 15))  # both processes log each step
    _assert_same(_final_state(run_dir), uninterrupted(tmp_path_factory, DDP))


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("name", "rank", "status"),
    [("SIGTERM", "null", 143), ("SIGTERM", "1", 143), ("SIGINT", "null", 130)],
    ids=["SIGTERM to both processes", "SIGTERM to one process", "Ctrl-C"],
)
def test_ddp_signal_stops_every_process_after_one_batch_and_resumes_from_it(
    tmp_path: Path, tmp_path_factory, name: str, rank: str, status: int
):
    run_dir, first_log, second_log = tmp_path / "run", tmp_path / "first.log", tmp_path / "second.log"
    stop = f"+callbacks.stop={{_target_: tests.helpers.SignalAtStep, step: 7, signal: {name}, rank: {rank}}}"
    first = run_train_cli([*BASE, *DDP, _log(first_log), stop, f"hydra.run.dir={run_dir}"])
    assert first.returncode == status, first.stderr[-3000:]
    assert f"stopped by {name} at epoch 1, step 8" in first.stderr
    assert sorted({s for _, s in _steps(first_log)}) == list(range(8))  # it finished the batch it was on
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8

    result = run_train_cli([*BASE, *DDP, _log(second_log), "ckpt_path=last", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from epoch 1, step 8" in result.stdout
    assert sorted({s for _, s in _steps(second_log)}) == list(range(8, 15))
    _assert_same(_final_state(run_dir), uninterrupted(tmp_path_factory, DDP))


def test_resumed_run_keeps_the_metrics_history(tmp_path: Path):
    run_dir = tmp_path / "run"
    stop = "+callbacks.stop={_target_: tests.helpers.SignalAtStep, step: 12}"
    assert run_train_cli([*BASE, stop, f"hydra.run.dir={run_dir}"]).returncode == 143
    _resume_plain = run_train_cli([*BASE, "ckpt_path=last", f"hydra.run.dir={run_dir}"])
    assert _resume_plain.returncode == 0, _resume_plain.stderr[-3000:]
    import csv

    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    epochs = sorted({int(float(r["epoch"])) for r in rows if r.get("val/acc")})
    assert epochs == list(range(EPOCHS))  # epochs 0-1 from the first process, 2-3 from the second
    steps = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    assert len(steps) == len(set(steps))  # the steps after the checkpoint are not logged twice


def test_ckpt_path_last_without_a_checkpoint_says_it_starts_fresh(tmp_path: Path):
    run_dir = tmp_path / "run"
    result = run_train_cli([*BASE, "trainer.max_epochs=1", "ckpt_path=last", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"no checkpoint in {run_dir / 'checkpoints'}: starting fresh" in result.stdout
