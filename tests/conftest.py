"""Shared fixtures: compose the real config and shrink it; run train.py, or a test's own script, in
a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import train  # also registers the config resolvers (${wandb_offline:}, ${at_launch:})

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# One short step of anything: one epoch, a few batches, CPU, CSV logs only.
FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.accelerator=cpu",
    "logger=csv",
]

# A child gets its own rendezvous: a port or rank left in this process's environment by an
# in-process trainer would make every later DDP child reuse (and race for) the same address.
_DISTRIBUTED = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The real ``train.yaml`` with ``overrides``, with Hydra's runtime fields filled in."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.runtime.cwd = str(ROOT)
            cfg.hydra.job.override_dirname = "test"
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_train_inprocess(overrides: list[str], output_dir: Path) -> dict:
    """Run ``train.run`` in this process on the composed config; returns summary.json."""
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = compose_config(overrides, output_dir)
    with open_dict(cfg):
        del cfg["hydra"]
    train.run(cfg)
    return json.loads((output_dir / "summary.json").read_text())


def run_train_cli(args: list[str], cwd: Path = ROOT, timeout: float = 600, env: dict | None = None):
    """``python train.py ARGS`` in a subprocess, as a user types it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "")}
    full_env.pop("WANDB_API_KEY", None)
    for name in _DISTRIBUTED:
        full_env.pop(name, None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def run_script(source: str, folder: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Write ``source`` to ``folder/script.py`` and run ``python script.py FOLDER`` from the project
    root with the project importable: a test's own program (the processes of a DDP run), which
    reads ``sys.argv[1]`` to know where to write its results."""
    script = folder / "script.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    for name in _DISTRIBUTED:
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, str(script), str(folder)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (where the one-byte loop and the blocked Linear
    backward run), the caller's count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
