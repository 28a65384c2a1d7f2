"""The norm ablation's pieces: PLAID (bundled in sktime) trains, summary.json says whether a run fit
its training set, and the experiment sweeps a learning rate per arm with a fit bar."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from models import UCRDataModule
from tests.conftest import FAST, compose_config, run_train_inprocess


def test_plaid_loads_from_sktime_resampled_to_one_length() -> None:
    dm = UCRDataModule("PLAID", seed=0)
    dm.setup()
    x_train, y_train = dm.splits["train"].tensors
    x_test, _ = dm.splits["test"].tensors
    assert dm.in_channels == 1 and dm.num_classes == 11
    assert len(x_train) + len(dm.splits["val"]) == 537 and len(x_test) == 537
    # Series of 100 to 1,344 points, resampled (as every variable-length set) to the longest.
    assert x_train.shape[1:] == x_test.shape[1:] == (1, 1344)
    amplitude = x_train.std(-1).flatten()
    assert amplitude.min() < 1e-2 and amplitude.max() > 10  # values as recorded, not rescaled
    assert torch.isfinite(x_train).all() and set(np.unique(y_train.numpy())) <= set(range(11))


def test_data_length_resamples_every_series_to_that_many_points() -> None:
    full = UCRDataModule("GunPoint", seed=0)
    short = UCRDataModule("GunPoint", seed=0, length=50)
    full.setup()
    short.setup()
    x_full = full.splits["test"].tensors[0]
    x_short = short.splits["test"].tensors[0]
    assert x_full.shape[1:] == (1, 150) and x_short.shape[1:] == (1, 50)
    # Linear interpolation of the recorded series onto 50 evenly spaced points, ends kept.
    grid, recorded = np.linspace(0, 1, 50), np.linspace(0, 1, 150)
    expected = np.stack([np.interp(grid, recorded, series) for series in x_full[:, 0].double().numpy()])
    assert np.allclose(x_short[:, 0].numpy(), expected, atol=1e-5)
    assert torch.equal(x_short[:, :, 0], x_full[:, :, 0]) and not torch.allclose(x_short[:, :, 1], x_full[:, :, 1])


def test_ucr_baseline_trains_on_plaid(tmp_path: Path) -> None:
    summary = run_train_inprocess(["+experiment=ucr_baseline", "data.name=PLAID", *FAST, "trainer.max_epochs=2"], tmp_path)
    assert summary["data"] == "PLAID" and 0.0 <= summary["test/acc"] <= 1.0
    net = torch.load(tmp_path / "model.pt", weights_only=False)
    assert net(torch.randn(2, 1, 1344)).shape == (2, 11)
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_summary_holds_the_last_epochs_training_accuracy(tmp_path: Path) -> None:
    """trainer.test clears the trainer's training metrics; summary.json still has them, equal to
    the last training epoch's row of the CSV log."""
    summary = run_train_inprocess(["+experiment=ucr_norm_ablation", *FAST, "trainer.max_epochs=2"], tmp_path)
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    last = [r for r in rows if r.get("train/acc")][-1]
    for key in ("train/acc", "train/f1", "train/loss_epoch"):
        assert summary[key] == float(last[key]), key
    assert "test/acc" in summary and "val/acc" in summary


def test_ablation_sweeps_every_norm_with_a_learning_rate_grid_and_a_fit_bar() -> None:
    cfg = compose_config(["+experiment=ucr_norm_ablation"])
    params = cfg.hydra.sweeper.params
    assert params["norm"].split(",") == ["batch", "instance", "group", "layer", "none"]
    assert len(params["module.lr"].split(",")) >= 3 and params["seed"] == "0,1,2"
    assert "PLAID" in params["data.name"].split(",")
    summary = cfg.hydra.callbacks.sweep_summary
    assert summary.select.key == "module.lr" and summary.select.by == "val/acc"
    assert summary.fit.metric == "train/acc" and summary.fit.min == 0.95
