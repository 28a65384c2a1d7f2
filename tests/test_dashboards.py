"""Dashboards people can read (issue 17): TensorBoard's HPARAMS tab compares runs on their final
metrics, the W&B run summary holds summary.json, every saved plot is an image in both, pruning and
constraint runs plot what they did, the console's epoch line shows each plugin's headline, and two
lines of third-party noise are gone."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import lightning as L
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from plugins import HardshrinkSparsifier, WeightConstraints
from runner.console import EpochLine, HeadlineProgressBar
from tests.conftest import FAST, run_train_cli, run_train_inprocess
from tests.helpers import Tiny, quiet_trainer


def fast(**changes: str) -> list[str]:
    """FAST with some of its keys changed (Hydra refuses a key given twice)."""
    kept = [o for o in FAST if o.split("=")[0] not in changes]
    return [*kept, *(f"{k}={v}" for k, v in changes.items())]


# The gmp90 experiment shrunk: two epochs, the cubic schedule from 0 to 0.9 within them.
GMP90 = [
    *fast(**{"trainer.max_epochs": "2", "logger": "many"}),
    "+experiment=digits_gmp90",
    "sparsity.schedule.begin_epoch=0",
    "sparsity.schedule.end_epoch=1",
]


@pytest.fixture(scope="module")
def gmp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """``python train.py`` as a user types it, TensorBoard, W&B (offline) and CSV at once: the run
    folder, its summary.json and everything it printed (stdout is a pipe: the epoch line)."""
    folder = tmp_path_factory.mktemp("gmp90")
    out = run_train_cli([*GMP90, f"hydra.run.dir={folder}"], env={"WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr[-3000:]
    return folder, json.loads((folder / "summary.json").read_text()), out.stdout + out.stderr


def tensorboard_events(folder: Path) -> EventAccumulator:
    (run,) = (folder / "tensorboard").iterdir()
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def wandb_records(folder: Path) -> list:
    """The records of an offline W&B run's transaction log (``run-<id>.wandb``): a LevelDB-style
    log of 32 KiB blocks holding protobuf ``Record``s. W&B 0.31 writes no ``wandb-summary.json``
    offline; this is what ``wandb sync`` would upload."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (folder / "wandb").glob("offline-run-*/run-*.wandb")
    raw, pos, pending, records = path.read_bytes(), 7, b"", []  # 7: the ":W&B" header
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header: padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", raw[pos + 4 : pos + 7])  # after a 4-byte checksum
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_summary(folder: Path) -> dict:
    summary = {}
    for record in wandb_records(folder):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


def test_tensorboard_hparams_hold_the_final_metrics(gmp_run):
    folder, summary, _ = gmp_run
    events = tensorboard_events(folder)
    hparams = {
        tag: plugin_data_pb2.HParamsPluginData.FromString(content)
        for tag, content in events.PluginTagToContent("hparams").items()
    }
    metric_tags = {m.name.tag for m in hparams["_hparams_/experiment"].experiment.metric_infos}
    # The three final metrics and the run's optimized_metric (val/acc by default).
    assert metric_tags == {"test/acc", "sparsity/global", "params/nonzero", "val/acc"}
    session = hparams["_hparams_/session_start_info"].session_start_info.hparams
    assert session["sparsity/schedule/end"].number_value == 0.9
    assert session["norm/kind"].string_value == "batch"
    # The HPARAMS tab reads each metric's last scalar: summary.json's values.
    for tag in ("test/acc", "sparsity/global", "params/nonzero"):
        assert events.Scalars(tag)[-1].value == pytest.approx(summary[tag], rel=1e-6), tag
    assert summary["sparsity/global"] > 0.85  # gmp90 reached its target: a number worth comparing


def test_every_saved_plot_is_an_image_in_tensorboard_and_wandb(gmp_run):
    folder, summary, _ = gmp_run
    assert summary["plots"] == ["sparsity_schedule.png", "sparsity_layers.png"]
    assert all((folder / name).is_file() for name in summary["plots"])
    images = tensorboard_events(folder).Images("plots/sparsity_schedule")
    assert set(tensorboard_events(folder).Tags()["images"]) == {"plots/sparsity_schedule", "plots/sparsity_layers"}
    assert (images[-1].width, images[-1].height) == (600, 400)  # the PNG's 6 x 4 inches at 100 dpi
    media = sorted(p.name for p in (folder / "wandb").glob("offline-run-*/files/media/images/plots/*.png"))
    assert [name.split("_")[1] for name in media] == ["layers", "schedule"]


def test_wandb_summary_holds_every_scalar_of_summary_json(gmp_run):
    folder, summary, _ = gmp_run
    logged = wandb_summary(folder)
    assert logged["params/nonzero"] == summary["params/nonzero"]
    assert logged["sparsity/global"] == pytest.approx(summary["sparsity/global"])
    assert logged["sparsity/selected"] == pytest.approx(summary["sparsity/selected"])
    # Nested keys flattened with "/": one per layer.
    for layer, value in summary["sparsity/layers"].items():
        assert logged[f"sparsity/layers/{layer}"] == pytest.approx(value), layer
    assert logged["norm"] == "batch" and logged["export"] == "model.pt2"


def test_epoch_line_shows_the_plugin_headline(gmp_run):
    _, _, printed = gmp_run
    lines = [line for line in printed.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2
    assert "sparsity/sparsity=0.9 " in lines[-1]  # the target reached, four significant digits
    assert "sparsity/lambda=" in lines[-1] and "val/acc=" in lines[-1]


def test_litlogger_tip_and_pytree_deprecation_are_gone(gmp_run):
    folder, _, printed = gmp_run
    logged = (folder / "train.log").read_text()
    for text in (printed, logged):
        assert "litlogger" not in text
        assert "LeafSpec" not in text
    # Only those two: Lightning's other warnings still reach the user.
    assert "smaller than the logging interval" in printed


def test_structured_pruning_plots_channels_kept(tmp_path: Path):
    overrides = [
        *fast(**{"trainer.max_epochs": "3"}),
        "+experiment=digits_prune50",
        "pruning.schedule.begin_epoch=0",
        "pruning.schedule.end_epoch=2",
        "pruning.compact=false",
    ]
    summary = run_train_inprocess(overrides, tmp_path)
    assert summary["plots"] == ["pruning_channels.png"]
    assert (tmp_path / "pruning_channels.png").stat().st_size > 10_000
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    kept = [float(r["pruning/kept/net.features.0.0.weight"]) for r in rows if r.get("pruning/kept_fraction")]
    fraction = [float(r["pruning/kept_fraction"]) for r in rows if r.get("pruning/kept_fraction")]
    assert kept == [32, 18, 16]  # 32 channels, cubic from 0 to half of them over epochs 0-2
    assert fraction == [1.0, pytest.approx(126 / 224), 0.5]  # 32 + 64 + 128 channels in the three convs
    assert summary["pruning/channels"]["net.features.0.0.weight"] == "16/32"


def test_constraint_violations_are_recorded_and_plotted(tmp_path: Path):
    constraints = WeightConstraints(rules=[{"name": "orthogonal", "include": ["net.0.weight"]}], log_every_n_steps=3)
    seen = {}

    class Watch(L.Callback):  # the violation at each logged step, as the plugin measures it
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[trainer.global_step] = constraints.violations()["net.0.weight/orthogonal"]

    quiet_trainer([constraints, Watch()], max_epochs=1).fit(Tiny())  # 8 steps
    assert [h["step"] for h in constraints.history] == [3, 6, 8]  # every 3 steps and the epoch end
    for entry in constraints.history:
        assert entry["net.0.weight/orthogonal"] == seen[entry["step"]]
    assert constraints.headline() == {"constraints/max_violation": constraints.history[-1]["net.0.weight/orthogonal"]}
    (path,) = constraints.save_plots(tmp_path)
    assert path.name == "constraints_violations.png" and path.stat().st_size > 10_000


def test_progress_bar_and_epoch_line_show_every_plugin_headline(capsys):
    sparsifier = HardshrinkSparsifier(
        mode="sparsity", schedule={"kind": "constant", "start": 0.5, "end": 0.5}, scope="global"
    )
    constraints = WeightConstraints(rules=[{"name": "non_negative", "include": ["net.2.weight"]}])
    plugins = [constraints, sparsifier]
    trainer = quiet_trainer([*plugins, EpochLine(plugins)], max_epochs=1)
    module = Tiny()
    trainer.fit(module)
    bar = HeadlineProgressBar(plugins).get_metrics(trainer, module)
    assert bar["sparsity/sparsity"] == "0.5"
    assert float(bar["sparsity/lambda"]) == pytest.approx(sparsifier.history[-1]["lambda"], rel=1e-3)
    assert bar["constraints/max_violation"] == "0"
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith(f"constraints/max_violation=0 sparsity/sparsity=0.5 sparsity/lambda={bar['sparsity/lambda']}")
