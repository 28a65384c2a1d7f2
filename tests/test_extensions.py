"""Every extension point takes a user's entry with one class and one YAML file, and no edit
elsewhere: a schedule kind, a pruning criterion, a norm kind and a constraint, registered in a
test module (tests/extensions.py) and picked from the command line."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import ROOT

# One YAML file per entry, each where a user would put it: conf/<group>/<option>.yaml.
YAML = {
    "sparsity/sqrt_gmp.yaml": "defaults: [gmp, _self_]\nschedule: {kind: sqrt_ramp, start: 0.0, end: 0.5, begin_epoch: 0, end_epoch: 2}\n",
    "pruning/lowest_index.yaml": "defaults: [l1, _self_]\nmethod: lowest_index\nschedule: {kind: constant, end: 0.25, begin_epoch: 0, end_epoch: 0}\n",
    "norm/rms.yaml": "defaults: [batch, _self_]\nkind: rms\n",
    "constraints/row_l1_unit.yaml": (
        "_target_: plugins.constraints.WeightConstraints\n"
        "rules: [{name: row_l1_unit, include: ['*head*weight'], module_types: [Linear]}]\n"
    ),
}


def test_a_new_schedule_criterion_norm_and_constraint_from_the_command_line(tmp_path: Path):
    project = tmp_path / "project"  # a copy of train.py and conf/, so the test adds files to no checkout
    shutil.copytree(ROOT / "conf", project / "conf")
    shutil.copy(ROOT / "train.py", project / "train.py")
    for name, text in YAML.items():
        (project / "conf" / name).write_text(text)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable, str(project / "train.py"),
            "imports=[tests.extensions]", "sparsity=sqrt_gmp", "pruning=lowest_index", "norm=rms", "constraints=row_l1_unit",
            "trainer.max_epochs=3", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=2", "trainer.accelerator=cpu", "logger=csv", f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    net = torch.load(run_dir / "model.pt", weights_only=False)

    # The norm kind: every norm layer is the user's class.
    kinds = {type(m).__name__ for m in net.modules()}
    assert "ChannelRMSNorm" in kinds and not any("BatchNorm" in k for k in kinds)
    # The criterion: the lowest-index quarter of the first conv's output channels, and only those.
    first = net.features[0][0].weight
    zero = (first.flatten(1) == 0).all(dim=1).nonzero().flatten().tolist()
    assert zero == list(range(first.shape[0] // 4))
    # The schedule kind: at t = 1/2 the target was end * sqrt(1/2).
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    (history,) = [v["history"] for k, v in ckpt["callbacks"].items() if k.startswith("HardshrinkSparsifier")]
    assert [round(h["value"], 6) for h in history] == [0.0, round(0.5 * math.sqrt(0.5), 6), 0.5]
    # The constraint: every row of the head has L1 norm 1.
    head = [m for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)][-1].weight
    torch.testing.assert_close(head.abs().sum(dim=1), torch.ones(head.shape[0]), atol=1e-5, rtol=0)
