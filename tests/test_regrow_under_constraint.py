"""A combination that cannot work is refused before training: hardshrink with ``regrow`` keeps no
mask, and a constraint on the same tensor (softplus non_negative maps 0 to log 2) would never let
the weights be sparse while training."""

from __future__ import annotations

import pytest

from plugins.core.errors import ConfigError
from tests.conftest import FAST, run_train_inprocess


def test_regrow_under_a_constraint_is_refused_before_training(tmp_path):
    overrides = [
        *FAST,
        "constraints=non_negative",
        "sparsity=gmp",
        "sparsity.regrow=true",
        "sparsity.schedule.begin_epoch=0",
        "sparsity.targets.include=[*head*weight]",
    ]
    with pytest.raises(ConfigError, match=r"sparsity.regrow=True is not allowed: false on net.head.\d.weight: a constraint"):
        run_train_inprocess(overrides, tmp_path)
    assert not (tmp_path / "summary.json").exists()
