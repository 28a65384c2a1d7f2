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
