"""DDP on 2 CPU processes (gloo): from train.py, inside a multirun, and masks equal on every rank."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, run_script, run_train_cli

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


RANDOM_STRUCTURED = textwrap.dedent(
    """
    import sys
    import lightning as L
    from tests.helpers import Tiny, mlp
    import torch
    from plugins import HardshrinkSparsifier, StructuredPruning
    from plugins.core.masks import Mask

    class Dump(L.Callback):
        def on_train_end(self, trainer, pl_module):
            masks = {n: m.mask.clone() for n, m in pl_module.named_modules() if isinstance(m, Mask)}
            torch.save(masks, f"{sys.argv[1]}/rank{trainer.global_rank}.pt")

    L.seed_everything(0)
    window = {"begin_epoch": 0, "end_epoch": 2, "every_n_steps": 2}
    callbacks = [
        HardshrinkSparsifier({"kind": "linear", "start": 0.0, "end": 0.5, **window}, mode="sparsity", scope="global"),
        StructuredPruning("random", {"kind": "linear", "start": 0.0, "end": 0.5, **window}, exclude=["*net.4*"], seed=7),
        Dump(),
    ]
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    trainer.fit(Tiny(mlp(8, 32, 32, 3)))
    """
)


@pytest.mark.slow
def test_random_structured_and_hardshrink_masks_identical_on_both_ranks(tmp_path: Path):
    result = run_script(RANDOM_STRUCTURED, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) >= 3
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    hidden = [m for n, m in rank0.items() if "net.2" in n and m.dim() == 2][0]
    dropped_rows = int((hidden.reshape(hidden.shape[0], -1) == 0).all(dim=1).sum())
    assert dropped_rows >= 16, "random structured pruning removed half the channels"


CONSTRAINED = textwrap.dedent(
    """
    import sys
    import lightning as L
    import torch
    from tests.helpers import Tiny, mlp
    from plugins import WeightConstraints
    from plugins.constraints import orthogonal_violation

    class Dump(L.Callback):
        def on_fit_end(self, trainer, pl_module):  # after the constraints are baked
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            state["violation"] = orthogonal_violation(pl_module.net[2].weight)
            torch.save(state, f"{sys.argv[1]}/rank{trainer.global_rank}.pt")

    L.seed_everything(0)
    constraints = WeightConstraints([
        {"name": "orthogonal", "include": ["net.2.weight"], "args": {"method": "polar"}},
        {"name": "learned_mask", "include": ["net.0.weight"], "args": {"penalty": 5.0}},
    ])
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[constraints, Dump()])
    trainer.fit(Tiny(mlp(8, 32, 32, 3)))
    """
)


@pytest.mark.slow
def test_constrained_weights_identical_on_both_ranks(tmp_path: Path):
    """Projections after each step and learned gates stay in lockstep across DDP ranks."""
    result = run_script(CONSTRAINED, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert "net.2.weight" in rank0 and "net.0.weight" in rank0  # baked: plain tensors
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert float(rank0["violation"]) <= 1e-4
