"""Sweeps: the summary callback (pure functions and real multiruns), the ablation experiments, the
Optuna search, the joblib launcher and the submitit launcher's config."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf

from runner.sweeps import (
    SweepSummary,
    aggregate,
    markdown_table,
    write_sweep_summary,
)
from tests.conftest import ROOT, compose_config, run_train_cli

# Shorter than FAST: a multirun pays for every job.
TINY = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.accelerator=cpu",
]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _fake_job(sweep: Path, num: int, overrides: list[str], summary: dict | None) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))


# ---------------------------------------------------------------------------------- pure functions


def test_summary_of_a_sweep_folder_mean_and_std_over_seeds(tmp_path: Path) -> None:
    accs = {
        ("batch", 0): 0.8,
        ("batch", 1): 0.9,
        ("batch", 2): 1.0,
        ("instance", 0): 0.5,
        ("instance", 1): 0.7,
    }
    for num, ((norm, seed), acc) in enumerate(accs.items()):
        summary = {"test/acc": acc, "norm": norm, "seed": seed, "sparsity/layers": {"a": 0.0}}
        _fake_job(tmp_path, num, ["+experiment=x", f"norm={norm}", f"seed={seed}"], summary)
    _fake_job(tmp_path, 5, ["+experiment=x", "norm=instance", "seed=2"], None)  # crashed

    written = write_sweep_summary(tmp_path, metrics=["test/acc"], order=["norm", "seed"])

    rows = _read_csv(written["csv"])
    assert len(rows) == 5 and list(rows[0])[:3] == ["job", "norm", "seed"]
    assert "sparsity/layers" not in rows[0]  # only scalars become columns
    md = written["md"].read_text()
    assert "| norm | n | test/acc |" in md
    assert "| batch | 3 | 0.900 ± 0.100 |" in md
    assert "| instance | 2 | 0.600 ± 0.141 |" in md
    assert "experiment" not in md.split("|", 1)[1].split("\n")[0]  # same in every job: not a column
    assert "1 job(s) wrote no summary.json" in md and ": 5" in md
    assert written["png"].stat().st_size > 0


def test_aggregate_and_table_group_by_the_other_swept_keys() -> None:
    rows = [
        {"norm": n, "data.name": d, "seed": s, "test/acc": 0.1 * s + (n == "batch")}
        for n in ("batch", "group")
        for d in ("A", "B")
        for s in (0, 1, 2)
    ]
    groups = aggregate(rows, ["norm", "data.name"], ["test/acc", "missing/metric"])
    assert [(g["norm"], g["data.name"], g["n"]) for g in groups] == [
        ("batch", "A", 3),
        ("batch", "B", 3),
        ("group", "A", 3),
        ("group", "B", 3),
    ]
    mean, std = groups[0]["test/acc"]
    assert mean == pytest.approx(1.1) and std == pytest.approx(0.1)
    assert "missing/metric" not in groups[0]
    table = markdown_table(groups, ["norm", "data.name"], ["test/acc", "missing/metric"])
    assert table.splitlines()[0] == "| norm | data.name | n | test/acc |"
    assert len(table.splitlines()) == 2 + 4


def test_callback_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="metrics"):
        SweepSummary(metrics=[])
    with pytest.raises(ValueError, match="filename"):
        SweepSummary(filename="a/b")


def test_callback_is_registered_for_every_multirun() -> None:
    cfg = compose_config([])
    callback = hydra.utils.instantiate(cfg.hydra.callbacks.sweep_summary)
    assert isinstance(callback, SweepSummary) and callback.seed_keys == ["seed"]


# ------------------------------------------------------------------------------------- configs


def test_ablation_experiments_compose() -> None:
    cfg = compose_config(["+experiment=ucr_norm_ablation", "norm=instance"])
    assert cfg.model._target_ == "models.ResNet1d" and cfg.data._target_ == "models.UCRDataModule"
    assert cfg.hydra.sweeper.params["data.name"].split(",") == ["ACSF1", "BasicMotions", "GunPoint"]
    gain = compose_config(["+experiment=ucr_norm_gain", "norm=batch"])
    assert gain.hydra.sweeper.params["data.random_gain"] == "0,10"
    assert gain.model.widths == cfg.model.widths and gain.task_name == "ucr_norm_gain"


def test_submitit_launcher_config_composes() -> None:
    cfg = compose_config(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert (
        launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    assert (
        launcher.partition == "gpu" and launcher.timeout_min == 60 and launcher.gpus_per_node == 1
    )
    assert launcher.submitit_folder.endswith("/.submitit/%j")
    assert hydra.utils.get_class(launcher._target_).__name__ == "SlurmLauncher"
    local = compose_config(["hydra/launcher=submitit_local"])
    assert local.hydra.launcher._target_.endswith("LocalLauncher")


def test_joblib_launcher_config_composes() -> None:
    cfg = compose_config(["hydra/launcher=parallel"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


def test_dashboards_group_a_sweep_and_name_runs_by_overrides(tmp_path: Path) -> None:
    cfg = compose_config(["logger=many", "norm=group"], tmp_path)
    assert cfg.logger.wandb.group == cfg.paths.group and cfg.paths.group.startswith("train_")
    assert cfg.logger.tensorboard.version == cfg.paths.run_name
    assert list(cfg.paths.overrides) == ["logger=many", "norm=group"]


# ---------------------------------------------------------------------------------- real sweeps


def test_norm_sweep_writes_one_summary_with_mean_and_std(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_train_cli(
        [
            "-m",
            "+experiment=ucr_norm_ablation",
            "norm=batch,instance",
            "seed=0,1",
            "hydra.sweeper.params={data.name: GunPoint}",
            "logger=csv",
            *TINY,
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _read_csv(sweep / "summary.csv")
    assert len(rows) == 4 and {r["norm"] for r in rows} == {"batch", "instance"}
    md = (sweep / "summary.md").read_text()
    assert "| norm | n | test/acc |" in md and md.count("± ") >= 2
    assert (sweep / "summary.png").is_file()


def test_sweep_over_experiments_with_their_own_task_names_stays_one_sweep(tmp_path: Path) -> None:
    """``-m +experiment=a,b`` where each experiment sets ``task_name``: every job still lands in
    the launching command's sweep folder (default ``hydra.sweep.dir``), in one dashboard group."""
    result = run_train_cli(
        # 3 epochs: digits_prune50 starts pruning at epoch 2 (a window after the last epoch is refused)
        ["-m", "+experiment=digits_baseline,digits_prune50", "logger=tensorboard", *TINY, "trainer.max_epochs=3"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["train"]
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    rows = _read_csv(sweep / "summary.csv")
    assert sorted(r["experiment"] for r in rows) == ["digits_baseline", "digits_prune50"]
    assert "| experiment | n | test/acc |" in (sweep / "summary.md").read_text()
    groups = {
        OmegaConf.load(next((sweep / r["job"] / "tensorboard").glob("*/hparams.yaml"))).paths.group for r in rows
    }
    assert groups == {f"train_{sweep.name}"}


def test_joblib_runs_jobs_in_worker_processes_and_one_summary(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "norm=batch,group",
        "logger=tensorboard",
        *TINY,
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    rows = _read_csv(sweep / "summary.csv")
    assert len(rows) == 2 and sorted(r["norm"] for r in rows) == ["batch", "group"]
    assert all(r["job/status"] == "COMPLETED" for r in rows)
    assert all(int(r["job/pid"]) != proc.pid for r in rows)  # ran in joblib's workers
    assert len(list(sweep.glob("summary.md"))) == 1
    # Dashboards: each job its own TensorBoard run, named by its overrides.
    groups = set()
    for row in rows:
        run_dirs = list((sweep / row["job"] / "tensorboard").iterdir())
        assert len(run_dirs) == 1 and f"norm={row['norm']}" in run_dirs[0].name.split(",")
        hparams = OmegaConf.load(run_dirs[0] / "hparams.yaml")
        assert f"norm={row['norm']}" in hparams.paths.overrides  # swept values as hyperparameters
        groups.add(hparams.paths.group)
    assert len(groups) == 1  # one dashboard group for the sweep (the W&B logger's group)


def test_optuna_search_runs_trials_and_names_the_best(tmp_path: Path) -> None:
    sweep = tmp_path / "optuna"
    result = run_train_cli(
        [
            "-m",
            "hparams_search=optuna_sparsity",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler.n_startup_trials=2",
            "sparsity.schedule.begin_epoch=0",
            "sparsity.schedule.end_epoch=0",
            "logger=csv",
            *TINY,
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert set(best.best_params) == {"module.lr", "sparsity.schedule.end"}
    rows = _read_csv(sweep / "summary.csv")
    assert len(rows) == 3
    assert best.best_value == pytest.approx(max(float(r["val/acc"]) for r in rows))
    # The objective is the validation accuracy train.py returns; the sparsity target took effect.
    best_row = max(rows, key=lambda r: float(r["val/acc"]))
    assert float(best_row["sparsity/global"]) == pytest.approx(
        best.best_params["sparsity.schedule.end"], abs=0.02
    )
    md = (sweep / "summary.md").read_text()
    assert "Best job (maximize val/acc)" in md
    assert md.splitlines()[4].startswith("| module.lr | sparsity.schedule.end | n | val/acc |")


@pytest.mark.slow
def test_acceptance_ablation_command_gives_4_norms_x_3_seeds_x_3_sets(tmp_path: Path) -> None:
    sweep = tmp_path / "ablation"
    result = run_train_cli(
        [
            "-m",
            "+experiment=ucr_norm_ablation",
            "norm=batch,instance,group,layer",
            "seed=0,1,2",
            "logger=csv",
            "model.widths=[8,8,8]",
            *TINY,
            f"hydra.sweep.dir={sweep}",
        ],
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _read_csv(sweep / "summary.csv")
    assert len(rows) == 4 * 3 * 3
    md = (sweep / "summary.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "±" in line]
    assert len(table) == 4 * 3  # one row per norm and set, mean ± std over 3 seeds
    assert all(line.split("|")[3].strip() == "3" for line in table)
