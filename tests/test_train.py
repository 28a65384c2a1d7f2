"""The foundation as a user meets it: train.py runs, writes its outputs, and refuses bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, ROOT, compose_config, run_train_cli, run_train_inprocess

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def test_default_run_writes_every_output(tmp_path: Path):
    summary = run_train_inprocess(FAST, tmp_path)
    for key in ("test/acc", "test/f1", "params/total", "params/nonzero", "sparsity/global", "sparsity/layers", "norm", "seed", "duration_s"):
        assert key in summary, key
    assert summary["norm"] == "batch" and summary["seed"] == 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    net = torch.load(tmp_path / "model.pt", weights_only=False)
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert "state_dict" in ckpt


def test_a_run_ended_by_max_steps_before_validating_finishes_with_exit_0(tmp_path: Path):
    """The default optimized_metric (val/acc) is not computed: a single run says so and ends as
    it trained (it exited 2 after writing every output before)."""
    result = run_train_cli([*FAST, "+trainer.max_steps=2", f"hydra.run.dir={tmp_path}"], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "val/acc" not in summary and "test/acc" in summary
    assert "optimized_metric=val/acc was not computed by this run" in result.stdout


def test_a_requeue_of_a_finished_run_keeps_its_outputs(tmp_path: Path):
    """The same command with ckpt_path=last after the run finished (a SLURM requeue): nothing is
    trained or rewritten (it tested again and rewrote summary.json without its val/ metrics)."""
    args = [*FAST, "ckpt_path=last", f"hydra.run.dir={tmp_path}"]
    assert run_train_cli(args, timeout=300).returncode == 0
    written = (tmp_path / "summary.json").read_bytes()
    again = run_train_cli(args, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "has finished training: nothing left to do" in again.stdout
    assert (tmp_path / "summary.json").read_bytes() == written


STANDALONE = """
import sys, torch
for name in ("models", "plugins", "train"):
    sys.modules[name] = None  # any import of this project's code now fails
net = torch.export.load(sys.argv[1]).module()
print(tuple(net(torch.zeros(5, *map(int, sys.argv[2:]))).shape))
"""


@pytest.mark.parametrize(
    "overrides,shape",
    [([], (1, 8, 8)), (["+experiment=ucr_resnet_prune50", "pruning.schedule.begin_epoch=0", "pruning.schedule.end_epoch=0"], (1, 150))],
    ids=["digits_cnn", "resnet1d-compacted"],
)
def test_model_pt2_runs_without_this_project(tmp_path: Path, overrides: list[str], shape: tuple[int, ...]):
    summary = run_train_inprocess([*FAST, *overrides], tmp_path)
    assert summary["export"] == "model.pt2"
    out = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(tmp_path / "model.pt2"), *map(str, shape)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    classes = 10 if shape == (1, 8, 8) else 2
    assert out.stdout.strip() == str((5, classes))
    # The same numbers as the pickled model.pt, in eval mode.
    net = torch.load(tmp_path / "model.pt", weights_only=False).eval()
    program = torch.export.load(tmp_path / "model.pt2").module()
    x = torch.randn(3, *shape)
    torch.testing.assert_close(program(x), net(x))


@pytest.mark.slow
def test_default_experiment_reaches_95_percent(tmp_path: Path):
    summary = run_train_inprocess(["trainer.accelerator=cpu"], tmp_path)
    assert summary["test/acc"] >= 0.95


@pytest.mark.parametrize("name,classes", [("GunPoint", 2), ("ArrowHead", 3), ("BasicMotions", 4)])
def test_ucr_baseline_trains_and_tests(tmp_path: Path, name: str, classes: int):
    """Six short epochs (every training batch of these small sets) are enough to see it learn: the
    epoch's training loss falls by a quarter and its accuracy ends well above chance."""
    summary = run_train_inprocess(["+experiment=ucr_baseline", f"data.name={name}", *FAST, "trainer.max_epochs=6"], tmp_path)
    assert summary["data"] == name and 0.0 <= summary["test/acc"] <= 1.0
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    loss = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    acc = [float(r["train/acc"]) for r in rows if r.get("train/acc")]
    assert len(loss) == len(acc) == 6
    assert loss[-1] < 0.75 * loss[0], loss
    assert acc[-1] >= 1 / classes + 0.15, acc


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_runs_one_short_step(tmp_path: Path, name: str):
    """One short epoch of each experiment, its schedules squeezed into that epoch, keeps the
    experiment's own promise in summary.json and model.pt: a sparsifier reaches its target
    sparsity, a pruner its channel counts (compacted when asked), constraints hold after every
    step, the norm kind named is the norm in the model; and a plain run reports no plugin."""
    cfg = compose_config([f"+experiment={name}"])
    scheduled = [g for g in ("sparsity", "pruning") if cfg.get(g) and "schedule" in cfg[g]]
    squeeze = [f"{g}.schedule.{k}=0" for g in scheduled for k in ("begin_epoch", "end_epoch")]
    rounds = bool(cfg.get("sparsity")) and "rounds" in cfg.sparsity  # IMP: its rounds fill the run
    if rounds:  # two rounds of one epoch: one prune and rewind, then the ticket's round
        squeeze += ["sparsity.rounds=2", "sparsity.epochs_per_round=1", "sparsity.rewind_epoch=0", "trainer.max_epochs=2"]
    summary = run_train_inprocess([f"+experiment={name}", *FAST, *squeeze], tmp_path)
    net = torch.load(tmp_path / "model.pt", weights_only=False)
    assert summary["data"] == (cfg.data.get("name") or "digits") and summary["seed"] == cfg.seed
    assert summary["model"] == cfg.model._target_.rsplit(".", 1)[-1] == type(net).__name__
    assert summary["params/total"] == sum(p.numel() for p in net.parameters())
    norms = {type(m).__name__ for m in net.modules() if "Norm" in type(m).__name__}
    assert summary["norm"] == cfg.norm.kind and norms and all(cfg.norm.kind in n.lower() for n in norms), norms

    if rounds:
        target = cfg.sparsity.prune_fraction
        assert summary["sparsity/target"] == pytest.approx(target) and summary["sparsity/round"] == 1
        assert abs(summary["sparsity/selected"] - target) < 1e-3 and abs(summary["sparsity/global"] - target) < 1e-3
        assert summary["params/nonzero"] < summary["params/total"]
    elif cfg.get("sparsity"):
        target = cfg.sparsity.schedule.end
        assert summary["sparsity/target"] == target and summary["sparsity/mode"] == cfg.sparsity.mode
        assert abs(summary["sparsity/selected"] - target) < 1e-3 and abs(summary["sparsity/global"] - target) < 1e-3
        assert summary["params/nonzero"] < summary["params/total"]
    if cfg.get("pruning"):
        target = cfg.pruning.schedule.end
        assert summary["pruning/target"] == target and summary["pruning/channels"]
        for tensor, channels in summary["pruning/channels"].items():
            kept, total = map(int, channels.split("/"))
            assert kept == total - round(target * total), (tensor, channels)
        if cfg.pruning.compact:
            compaction = summary["compaction"]
            assert summary["params/total"] == compaction["params_after"] < compaction["params_before"]
            assert compaction["macs_after"] < compaction["macs_before"]
    if cfg.get("constraints"):
        violations = summary["constraints"]
        assert {label.rsplit("/", 1)[1] for label in violations} == {rule.name for rule in cfg.constraints.rules}
        assert summary["constraints/max_violation"] == max(violations.values()) <= 1e-4, violations
        assert summary["constraints/projections"] == 3  # after each of the epoch's 3 optimizer steps
    if not (scheduled or rounds or cfg.get("constraints")):
        assert not [k for k in summary if k.split("/")[0] in ("sparsity", "pruning", "constraints", "compaction")
                    and k not in ("sparsity/global", "sparsity/layers")]
        assert summary["params/nonzero"] == summary["params/total"] and summary["sparsity/global"] == 0.0


def test_multirun_over_norms_gives_one_directory_each(tmp_path: Path):
    result = run_train_cli(
        ["-m", "norm=batch,instance,group,layer", *FAST, "trainer.limit_train_batches=2", f"hydra.sweep.dir={tmp_path}"]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 4
    assert sorted(json.loads(p.read_text())["norm"] for p in summaries) == ["batch", "group", "instance", "layer"]


def test_tensorboard_logs_loss_and_accuracy_curves(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train_inprocess([*FAST, "logger=tensorboard", "trainer.max_epochs=2", "trainer.log_every_n_steps=1"], tmp_path)
    events = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss_step", "train/acc", "val/acc"} <= tags
    assert len(acc.Scalars("train/acc")) == 2


def test_wandb_without_credentials_goes_offline_promptly(tmp_path: Path):
    result = run_train_cli(
        [*FAST, "logger=wandb", f"hydra.run.dir={tmp_path}"],
        env={"WANDB_MODE": "", "HOME": str(tmp_path), "NETRC": str(tmp_path / "none")},
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline run directory"
    assert (tmp_path / "summary.json").is_file()
