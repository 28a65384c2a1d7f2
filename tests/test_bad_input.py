"""Every mistake a user can type: a non-zero exit, one line naming the key, no summary.json."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FAST, run_train_cli

UCR = ["+experiment=ucr_baseline"]

CASES = [
    # unknown names
    (["norm=banana"], "norm='banana' is not allowed: one of batch"),
    (["+experiment=nope"], "experiment='nope' is not allowed"),
    ([*UCR, "data.name=PLAID"], "data.name='PLAID' is not allowed: one of the sets bundled in aeon"),
    (["logger=splunk"], "logger='splunk' is not allowed"),
    # malformed overrides and wrong types
    (["trainer.max_epochs=="], "trainer.max_epochs"),
    (["data.batch_size=abc"], "data.batch_size='abc'"),
    (["norm.affine=maybe"], "norm.affine='maybe'"),
    (["module.lr=fast"], "module.lr='fast'"),
    # out-of-range values
    (["seed=-3"], "seed=-3"),
    (["data.batch_size=0"], "data.batch_size=0"),
    (["data.denoise_lambda=-0.1"], "data.denoise_lambda=-0.1"),
    (["data.random_gain=0.5"], "data.random_gain=0.5"),
    (["module.lr=-1"], "module.lr=-1"),
    (["model.dropout=1.5"], "model.dropout=1.5"),
    (["model.widths=[32,64]"], "model.widths=[32, 64]"),
    # impossible combinations
    (["norm=group", "norm.num_groups=5"], "norm.num_groups=5 is not allowed: a divisor of the 32 channels"),
    # sparsity
    (["sparsity=hardshrink", "sparsity.schedule.end=-0.1"], "sparsity.schedule.end=-0.1 is not allowed: a lambda >= 0"),
    (["sparsity=gmp", "sparsity.schedule.end=1.0"], "sparsity.schedule.end=1.0 is not allowed: a fraction of zeros in [0, 1)"),
    (["sparsity=gmp", "sparsity.schedule.begin_epoch=5", "sparsity.schedule.end_epoch=2"], "sparsity.schedule.end_epoch=2"),
    (["sparsity=gmp", "sparsity.targets.include=[nomatch*]"], "sparsity.targets.include='nomatch*'"),
    (["sparsity=gmp", "sparsity.mode=fast"], "sparsity.mode='fast' is not allowed: one of threshold, sparsity"),
    (["sparsity=gmp", "sparsity.schedule.every_n_steps=0"], "sparsity.schedule.every_n_steps=0"),
    # structured pruning
    (["pruning=l1", "pruning.schedule.end=1.5"], "pruning.schedule.end=1.5 is not allowed: a fraction in [0, 1]"),
    (["pruning=l1", "pruning.dim=7"], "pruning.dim=7 is not allowed: a dimension of net.features.0.0.weight"),
    (
        ["pruning=l1", "pruning.schedule.end=1.0", "pruning.schedule.begin_epoch=0", "pruning.schedule.end_epoch=0"],
        "an amount that leaves at least one of the",
    ),
    (["pruning=l1", "pruning.method=magic"], "pruning.method='magic' is not allowed: one of random, l1, l2"),
    # constraints
    (["constraints=non_negative", "constraints.rules.0.name=positive"], "constraints.rules[0].name='positive' is not allowed: one of the registered constraints"),
    (["constraints=non_negative", "constraints.rules.0.include=[nomatch*]"], "constraints.rules[0].include='nomatch*'"),
    (["constraints=learned_mask", "constraints.rules.0.args.init=1.5"], "constraints.rules[0].args.init=1.5 is not allowed: a gate value in (0.5, 1)"),
    (["constraints=orthogonal", "pruning=l1"], "constraints.rules[0].allow_masked=False is not allowed"),
    # checkpoints
    (["ckpt_path=/no/such/file.ckpt"], "ckpt_path='/no/such/file.ckpt'"),
]


def _corrupted_checkpoint(tmp_path: Path) -> str:
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"this is not a checkpoint")
    return str(path)


@pytest.mark.parametrize("args,needle", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input(tmp_path: Path, args: list[str], needle: str):
    _assert_refused(tmp_path, args, needle)


def test_corrupted_checkpoint(tmp_path: Path):
    path = _corrupted_checkpoint(tmp_path)
    _assert_refused(tmp_path, [f"ckpt_path={path}"], "a readable Lightning checkpoint")


def _assert_refused(tmp_path: Path, args: list[str], needle: str) -> None:
    run_dir = tmp_path / "run"
    result = run_train_cli([*FAST, *args, f"hydra.run.dir={run_dir}"], timeout=120)
    assert result.returncode != 0
    assert needle in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (run_dir / "summary.json").exists()
