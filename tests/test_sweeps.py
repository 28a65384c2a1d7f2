"""Sweeps: the summary callback (pure functions and real multiruns), the ablation experiments, the
Optuna search, the joblib launcher and the submitit launcher's config."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf

from runner import sweep_plots
from runner.sweep_plots import summary_figure
from runner.sweeps import (
    FitBar,
    Selection,
    SweepSummary,
    aggregate,
    markdown_table,
    wide_table,
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


# ------------------------------------------------------------------------------- pictures and tables


def _rows(values: dict[tuple, float], keys: list[str], metric: str = "test/acc") -> list[dict]:
    return [{**dict(zip(keys, map(str, k), strict=True)), metric: v} for k, v in values.items()]


def _error_bars(ax) -> list[float]:
    """The half-lengths of the error bars drawn on ``ax`` (ax.errorbar's vertical segments)."""
    from matplotlib.container import ErrorbarContainer

    lengths = []
    for container in ax.containers:
        if isinstance(container, ErrorbarContainer):
            for segments in container.lines[2]:
                lengths += [abs(seg[1][1] - seg[0][1]) / 2 for seg in segments.get_segments()]
    return lengths


def _bar_heights(ax) -> list[float]:
    from matplotlib.container import BarContainer

    return [p.get_height() for c in ax.containers if isinstance(c, BarContainer) for p in c.patches]


def _overlaps(fig) -> list[tuple[str, str]]:
    """Tick labels of one panel whose drawn boxes overlap, measured by the renderer."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found = []
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels(which="both") if t.get_text() and t.get_visible()]
        boxes = [t.get_window_extent(renderer) for t in labels]
        found += [
            (labels[i].get_text(), labels[j].get_text())
            for i in range(len(boxes))
            for j in range(i + 1, len(boxes))
            if boxes[i].overlaps(boxes[j])
        ]
    return found


def test_two_arms_one_job_each_no_error_bars_and_an_axis_that_shows_the_difference(tmp_path: Path) -> None:
    """The baseline-vs-gmp90 complaint: n = 1, both near 0.99."""
    for num, (name, acc) in enumerate([("digits_baseline", 0.985), ("digits_gmp90", 0.992)]):
        _fake_job(tmp_path, num, [f"+experiment={name}"], {"test/acc": acc, "seed": 0})
    written = write_sweep_summary(tmp_path, metrics=["test/acc"])
    assert written["png"].stat().st_size > 0

    rows = _rows({("digits_baseline",): 0.985, ("digits_gmp90",): 0.992}, ["experiment"])
    fig = summary_figure(rows, ["experiment"], "test/acc", seed_keys=["seed"])
    (ax,) = fig.axes
    assert _error_bars(ax) == []
    assert "±" not in ax.get_ylabel() and "std" not in ax.get_ylabel()
    assert "no error bars" in ax.get_ylabel()
    bottom, top = ax.get_ylim()
    assert 0.97 < bottom < 0.985 and 0.992 < top < 1.0  # hugs the data, not 0..1
    assert (0.992 - 0.985) / (top - bottom) > 0.5  # the difference fills most of the axis
    assert [t.get_text() for t in ax.get_xticklabels()] == ["digits_baseline", "digits_gmp90"]
    assert ax.get_xlabel() == "experiment" and _overlaps(fig) == []


def test_three_seeds_draw_the_sample_std_and_name_it() -> None:
    accs = {("batch", "A", s): 0.80 + 0.01 * s for s in range(3)}
    accs |= {("batch", "B", s): 0.90 + 0.02 * s for s in range(3)}
    accs |= {("layer", "A", s): 0.70 + 0.03 * s for s in range(3)}
    accs[("layer", "B", 0)] = 0.75  # one seed only: no error bar for this arm
    fig = summary_figure(_rows(accs, ["norm", "data.name", "seed"]), ["norm", "data.name"], "test/acc", ["seed"])
    (ax,) = fig.axes  # one panel: data.name along x, norm as colours
    assert ax.get_xlabel() == "data.name"
    assert sorted(_error_bars(ax)) == pytest.approx([0.01, 0.02, 0.03])  # sample std, only where n > 1
    assert sorted(_bar_heights(ax)) == pytest.approx([0.73, 0.75, 0.81, 0.92])
    assert "mean ± sample std" in ax.get_ylabel() and "over seed" in ax.get_ylabel()
    assert "n = 1–3; no bar where n = 1" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["norm=batch", "norm=layer"]


def test_one_panel_per_swept_key_other_than_the_grouping_key() -> None:
    accs = {(n, d, g, s): 0.5 + 0.1 * (n == "batch") + 0.01 * g + 0.001 * s
            for n in ("batch", "group") for d in ("A", "B", "C") for g in (0, 10) for s in (0, 1)}
    rows = _rows(accs, ["norm", "data.name", "data.random_gain", "seed"])
    fig = summary_figure(rows, ["norm", "data.name", "data.random_gain"], "test/acc", ["seed"])
    assert [ax.get_xlabel() for ax in fig.axes] == ["data.name", "data.random_gain"]
    gain_panel = fig.axes[1]
    assert [t.get_text() for t in gain_panel.get_xticklabels()] == ["0", "10"]
    # The gain panel pools the 3 sets x 2 seeds: batch at gain 10 averages 0.6 + 0.1 + 0.0005.
    assert max(_bar_heights(gain_panel)) == pytest.approx(0.7005)
    assert "over seed, data.name (n = 6)" in gain_panel.get_ylabel()


def test_tick_labels_never_overlap_however_many_and_long() -> None:
    names = [f"ucr_resnet_experiment_number_{i}_with_a_long_name" for i in range(14)]
    rows = _rows({(n, h): 0.5 + 0.01 * i for i, n in enumerate(names) for h in ("x", "y", "z")}, ["exp", "hue"])
    fig = summary_figure(rows, ["hue", "exp"], "test/acc")
    assert len(fig.axes[0].get_xticklabels()) == 14
    assert _overlaps(fig) == []
    width, _ = fig.get_size_inches()
    assert width <= 30  # readable, not 6225 px wide


def test_wide_table_rows_by_the_first_key_columns_by_the_others(tmp_path: Path) -> None:
    rows = [
        {"norm": n, "data.name": d, "seed": s, "test/acc": {"batch": 0.9, "layer": 0.8}[n] + (d == "B") * 0.05 + 0.01 * s}
        for n in ("batch", "layer") for d in ("A", "B") for s in (0, 1, 2)
    ]
    groups = aggregate(rows, ["norm", "data.name"], ["test/acc"])
    assert wide_table(groups, ["norm", "data.name"], "test/acc").splitlines() == [
        "| norm \\ test/acc | data.name=A | data.name=B |",
        "| --- | --- | --- |",
        "| batch | 0.910 ± 0.010 (3) | 0.960 ± 0.010 (3) |",
        "| layer | 0.810 ± 0.010 (3) | 0.860 ± 0.010 (3) |",
    ]
    for num, row in enumerate(rows):
        overrides = [f"norm={row['norm']}", f"data.name={row['data.name']}", f"seed={row['seed']}"]
        _fake_job(tmp_path, num, overrides, {"test/acc": row["test/acc"]})
    md = write_sweep_summary(tmp_path, metrics=["test/acc"], order=["norm", "data.name", "seed"])["md"].read_text()
    assert "| batch | A | 3 | 0.910 ± 0.010 |" in md  # the long table, still there
    assert "| layer | 0.810 ± 0.010 (3) | 0.860 ± 0.010 (3) |" in md  # and the wide one beside it


OPTUNA_SPACE = {"module.lr": "tag(log, interval(0.0003, 0.01))", "sparsity.schedule.end": "interval(0.3, 0.95)"}


def _optuna_rows(n: int = 12) -> list[dict]:
    import random

    rng = random.Random(0)
    rows = []
    for i in range(n):
        lr, end = 10 ** rng.uniform(-3.5, -2), rng.uniform(0.3, 0.95)
        rows.append({"job": str(i), "module.lr": repr(lr), "sparsity.schedule.end": repr(end), "val/acc": 1 - end / 2})
    return rows


def test_optuna_sweeps_are_drawn_with_optunas_own_figures(tmp_path: Path, monkeypatch) -> None:
    import optuna.visualization.matplotlib as optuna_plots

    called = []

    def spy(name: str):
        real = getattr(optuna_plots, name)

        def draw(study, *args, **kwargs):
            called.append((name, len(study.trials)))
            return real(study, *args, **kwargs)

        return draw

    for name in ("plot_optimization_history", "plot_param_importances", "plot_slice"):
        monkeypatch.setattr(optuna_plots, name, spy(name))
    figures = sweep_plots.optuna_figures(_optuna_rows(), OPTUNA_SPACE, "val/acc", "maximize")
    assert called == [("plot_optimization_history", 12), ("plot_param_importances", 12), ("plot_slice", 12)]
    titles = {name: fig.axes[0].get_title() or fig.get_suptitle() for name, fig in figures.items()}
    assert titles == {"history": "Optimization History Plot", "importances": "Hyperparameter Importances", "slice": "Slice Plot"}
    assert len(figures["slice"].axes) >= 2  # one panel per parameter
    assert all(_overlaps(fig) == [] for fig in figures.values())
    for num, row in enumerate(_optuna_rows()):
        _fake_job(tmp_path, num, [f"{k}={row[k]}" for k in OPTUNA_SPACE], {"val/acc": row["val/acc"]})
    written = write_sweep_summary(tmp_path, metrics=["val/acc"], best=("val/acc", "maximize"), search_space=OPTUNA_SPACE)
    assert {"png", "history_png", "importances_png"} <= set(written)
    from PIL import Image

    assert all(Image.open(written[k]).size[0] < 1500 for k in ("png", "history_png", "importances_png"))
    assert ", wide:" not in written["md"].read_text()  # 12 distinct lrs x 12 ends: no pivot


def _lr_rows() -> list[dict]:
    """batch: lr 0.1 wins on mean val/acc (0.85 vs 0.80) although lr 0.01 has the best single seed."""
    val = {("batch", "0.1"): (0.84, 0.86), ("batch", "0.01"): (0.90, 0.70),
           ("layer", "0.1"): (0.60, 0.62), ("layer", "0.01"): (0.75, 0.77)}
    test = {("batch", "0.1"): 0.83, ("batch", "0.01"): 0.50, ("layer", "0.1"): 0.55, ("layer", "0.01"): 0.74}
    return [{"norm": n, "module.lr": lr, "seed": str(s), "val/acc": v[s], "test/acc": test[(n, lr)] + 0.01 * s}
            for (n, lr), v in val.items() for s in (0, 1)]


def test_selection_keeps_the_lr_with_the_best_mean_validation_metric_per_arm(tmp_path: Path) -> None:
    for num, row in enumerate(_lr_rows()):
        _fake_job(tmp_path, num, [f"norm={row['norm']}", f"module.lr={row['module.lr']}", f"seed={row['seed']}"],
                  {"val/acc": row["val/acc"], "test/acc": row["test/acc"]})
    written = write_sweep_summary(tmp_path, metrics=["test/acc"], order=["norm", "module.lr", "seed"],
                                  select=Selection(key="module.lr", by="val/acc"))
    md = written["md"].read_text()
    assert "| norm | module.lr | n | test/acc | val/acc |" in md
    assert "| batch | 0.1 | 2 | 0.835 ± 0.007 | 0.850 ± 0.014 |" in md
    assert "| layer | 0.01 | 2 | 0.745 ± 0.007 | 0.760 ± 0.014 |" in md
    assert "| batch | 0.01 |" not in md and "| layer | 0.1 |" not in md  # the other lrs are not reported
    assert "- norm=batch: module.lr=0.1 (val/acc 0.850)" in md and "- norm=layer: module.lr=0.01 (val/acc 0.760)" in md
    low = write_sweep_summary(tmp_path, metrics=["test/acc"], order=["norm", "module.lr", "seed"],
                              select=Selection(key="module.lr", by="val/acc", mode="min"))["md"].read_text()
    assert "| batch | 0.01 | 2 |" in low


def test_selection_and_fit_bar_are_read_from_the_callbacks_config() -> None:
    cfg = compose_config(["hydra.callbacks.sweep_summary.select={key: module.lr, by: val/acc}",
                          "hydra.callbacks.sweep_summary.fit={metric: train/acc, min: 0.95}"])
    callback = hydra.utils.instantiate(cfg.hydra.callbacks.sweep_summary)
    assert callback.select == Selection("module.lr", "val/acc", "max")
    assert callback.fit == FitBar("train/acc", 0.95)
    default = hydra.utils.instantiate(compose_config([]).hydra.callbacks.sweep_summary)
    assert default.select is None and default.fit is None  # off by default
    with pytest.raises(ValueError, match="select must be a mapping with key, by"):
        SweepSummary(select={"key": "module.lr"})
    with pytest.raises(ValueError, match="fit has unknown keys"):
        SweepSummary(fit={"metric": "train/acc", "min": 0.9, "max": 1})
    with pytest.raises(ValueError, match="mode max or min"):
        SweepSummary(select={"key": "module.lr", "by": "val/acc", "mode": "best"})


def test_an_arm_that_did_not_fit_its_training_set_reports_no_test_number(tmp_path: Path, caplog) -> None:
    train = {"batch": (0.99, 0.97), "none": (0.44, 0.46)}
    for num, (norm, seed) in enumerate((n, s) for n in train for s in (0, 1)):
        _fake_job(tmp_path, num, [f"norm={norm}", "data.name=GunPoint", f"seed={seed}"],
                  {"test/acc": 0.6 + 0.1 * seed, "test/f1": 0.5, "val/acc": 0.7})
        logged = tmp_path / str(num) / "csv"  # summary.json has no train/acc: the CSV logger has
        logged.mkdir()
        (logged / "metrics.csv").write_text(f"epoch,step,train/acc,val/acc\n0,4,0.1,\n0,4,,0.5\n1,9,{train[norm][seed]},\n")
    with caplog.at_level("WARNING"):
        written = write_sweep_summary(tmp_path, metrics=["test/acc", "test/f1", "val/acc"], order=["norm", "seed"],
                                      fit=FitBar("train/acc", 0.95))
    md = written["md"].read_text()
    assert "| batch | 2 | 0.650 ± 0.071 | 0.500 ± 0.000 | 0.700 ± 0.000 | 0.980 ± 0.014 |" in md
    assert "| none | 2 | did not fit (train/acc 0.450) | did not fit (train/acc 0.450) | 0.700 ± 0.000 | 0.450 ± 0.014 |" in md
    assert "Did not fit: norm=none: mean train/acc 0.450 < 0.95" in md
    assert [r.getMessage() for r in caplog.records if "did not fit" in r.getMessage()] == [
        "sweep summary: norm=none did not fit its training set (train/acc 0.450 < 0.95)"
    ]
    fig = summary_figure([{"norm": "batch", "test/acc": 0.6}, {"norm": "none", "test/acc": 0.7, "did_not_fit": "did not fit (train/acc 0.450)"}], ["norm"], "test/acc")
    assert _bar_heights(fig.axes[0]) == [0.6]  # no bar for the arm that did not fit
    assert "did not fit" in " ".join(t.get_text() for t in fig.axes[0].texts)


def test_pictures_for_the_eye(tmp_path: Path) -> None:
    """Writes the pictures of the tests above to SWEEP_PICTURES (when set), to look at them."""
    import os

    out = os.environ.get("SWEEP_PICTURES")
    if not out:
        pytest.skip("set SWEEP_PICTURES=<folder> to write the pictures")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows({("digits_baseline",): 0.985, ("digits_gmp90",): 0.992}, ["experiment"])
    summary_figure(rows, ["experiment"], "test/acc", ["seed"]).savefig(out / "two_arms.png", dpi=120)
    accs = {(n, d, g, s): 0.5 + 0.1 * (n == "batch") + 0.01 * g + 0.01 * s * (d == "A")
            for n in ("batch", "group", "layer", "instance") for d in ("ACSF1", "BasicMotions", "GunPoint") for g in (0, 10) for s in (0, 1, 2)}
    rows = _rows(accs, ["norm", "data.name", "data.random_gain", "seed"])
    summary_figure(rows, ["norm", "data.name", "data.random_gain"], "test/acc", ["seed"]).savefig(out / "three_keys.png", dpi=120)
    names = [f"ucr_resnet_experiment_number_{i}_with_a_long_name" for i in range(14)]
    rows = _rows({(n, h): 0.5 + 0.01 * i for i, n in enumerate(names) for h in ("x", "y", "z")}, ["exp", "hue"])
    summary_figure(rows, ["hue", "exp"], "test/acc").savefig(out / "long_labels.png", dpi=120)
    for name, fig in sweep_plots.optuna_figures(_optuna_rows(), OPTUNA_SPACE, "val/acc", "maximize").items():
        fig.savefig(out / f"optuna_{name}.png", dpi=120)


# ------------------------------------------------------------------------------------- configs


def test_ablation_experiments_compose() -> None:
    cfg = compose_config(["+experiment=ucr_norm_ablation", "norm=instance"])
    assert cfg.model._target_ == "models.ResNet1d" and cfg.data._target_ == "models.UCRDataModule"
    assert cfg.hydra.sweeper.params["data.name"].split(",") == ["ACSF1", "BasicMotions", "GunPoint", "PLAID"]
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
            # A bar no run reaches: train/acc comes from each job's CSV logger (not in summary.json).
            "hydra.callbacks.sweep_summary.fit={metric: train/acc, min: 1.01}",
            *TINY,
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _read_csv(sweep / "summary.csv")
    # The experiment's learning-rate grid stays in the sweep: 2 norms x 3 lr x 2 seeds.
    assert len(rows) == 12 and {r["norm"] for r in rows} == {"batch", "instance"}
    assert len({r["module.lr"] for r in rows}) == 3
    md = (sweep / "summary.md").read_text()
    # select: one lr per arm, named, chosen on val/acc.
    assert "- norm=batch: module.lr=" in md and "- norm=instance: module.lr=" in md
    assert "| norm | module.lr | n | test/acc |" in md and md.count("± ") >= 2
    assert (sweep / "summary.png").is_file()
    table = [line.split(" | ") for line in md.splitlines() if line.startswith(("| batch |", "| instance |"))]
    header = next(line for line in md.splitlines() if line.startswith("| norm | module.lr | n |")).strip("| ").split(" | ")
    for cells in table:
        train = cells[header.index("train/acc")].split(" ±")[0]
        assert cells[header.index("test/acc")] == f"did not fit (train/acc {train})"
    output = result.stderr + result.stdout
    assert "Did not fit: norm=batch" in md
    assert re.search(r"norm=instance, module\.lr=[0-9.]+ did not fit its training set", output)


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
    assert all((sweep / f"summary{s}.png").is_file() for s in ("", "_history", "_importances"))
    assert md.splitlines()[4].startswith("| module.lr | sparsity.schedule.end | n | val/acc |")


def test_the_ablation_command_sweeps_every_arm_lr_seed_and_set_with_select_and_fit() -> None:
    """``python train.py -m +experiment=ucr_norm_ablation``, as the docs print it: 5 norms x 3
    learning rates x 3 seeds x 4 sets, the lr chosen per arm on val/acc, the fit bar at 0.95."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_config(["+experiment=ucr_norm_ablation"])
    parser = OverridesParser.create()
    sizes = {
        key: len(list(parser.parse_override(f"{key}={value}").sweep_iterator()))
        for key, value in cfg.hydra.sweeper.params.items()
    }
    assert sizes == {"data.name": 4, "norm": 5, "module.lr": 3, "seed": 3}
    assert "PLAID" in cfg.hydra.sweeper.params["data.name"] and "layer" in cfg.hydra.sweeper.params["norm"]
    summary = cfg.hydra.callbacks.sweep_summary
    assert dict(summary.select) == {"key": "module.lr", "by": "val/acc"}
    assert dict(summary.fit) == {"metric": "train/acc", "min": 0.95}


def test_optuna_preset_with_the_parallel_launcher_runs_trials_side_by_side(tmp_path: Path) -> None:
    """``hparams_search=optuna_sparsity hydra/launcher=parallel``: the sweeper asks for as many
    trials as the launcher runs at once (2), so the two trials' job times overlap."""
    sweep = tmp_path / "optuna"
    result = run_train_cli(
        [
            "-m",
            "hparams_search=optuna_sparsity",
            "hydra/launcher=parallel",
            "hydra.sweeper.n_trials=2",
            "sparsity.schedule.begin_epoch=0",
            "sparsity.schedule.end_epoch=0",
            "logger=csv",
            *TINY,
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _read_csv(sweep / "summary.csv")
    assert len(rows) == 2 and len({r["job/pid"] for r in rows}) == 2  # two worker processes
    (s0, e0), (s1, e1) = sorted((float(r["job/start"]), float(r["job/end"])) for r in rows)
    assert s1 < e0, f"trials ran one after the other: second started {s1 - e0:.1f} s after the first ended"
