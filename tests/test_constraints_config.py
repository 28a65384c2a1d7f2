"""The registry from config: a user's constraint usable by name from a Hydra override; every bad
input is one ConfigError before training; constraints and masks on one tensor."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import hydra
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from plugins import HardshrinkSparsifier, WeightConstraints, register_constraint
from plugins.constraints import Constraint, ConstraintError, registered
from plugins.core.errors import ConfigError
from plugins.core.masks import ensure_mask, get_mask
from tests.conftest import FAST, compose_config, run_train_cli, run_train_inprocess
from tests.helpers import Tiny, mlp, quiet_trainer


@register_constraint("test_row_sum_one")
class RowSumOne(Constraint):
    """A user's constraint: every row of the (out, -1) matrix sums to ``total``."""

    def __init__(self, total: float = 1.0) -> None:
        super().__init__()
        self.total = total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.reshape(x.shape[0], -1)
        return (m - m.mean(dim=1, keepdim=True) + self.total / m.shape[1]).reshape(x.shape)

    def violation(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight.reshape(weight.shape[0], -1).double().sum(dim=1) - self.total).abs().max()


USER_RULE = 'constraints.rules=[{name: test_row_sum_one, include: ["*head*weight"], module_types: [Linear], args: {total: 2.0}}]'


def test_user_constraint_from_a_hydra_override(tmp_path: Path):
    cfg = compose_config(["constraints=orthogonal", USER_RULE])
    callback = hydra.utils.instantiate(cfg.constraints, _convert_="all")
    assert isinstance(callback, WeightConstraints) and callback.rules[0].name == "test_row_sum_one"
    summary = run_train_inprocess([*FAST, "constraints=orthogonal", USER_RULE], tmp_path)
    (label,) = summary["constraints"]
    assert label == "net.head.2.weight/test_row_sum_one"
    assert summary["constraints"][label] <= 1e-5
    net = torch.load(tmp_path / "model.pt", weights_only=False)
    assert not parametrize.is_parametrized(net.head[2])
    torch.testing.assert_close(net.head[2].weight.sum(dim=1), torch.full((10,), 2.0))


def test_registry_refuses_a_taken_name_and_keeps_the_same_class():
    assert register_constraint("test_row_sum_one", RowSumOne) is RowSumOne  # re-import: fine

    class Other(Constraint):
        pass

    with pytest.raises(ConfigError, match="pass replace=True"):
        register_constraint("orthogonal", Other)
    with pytest.raises(ConfigError, match="a subclass of nn.Module"):
        register_constraint("test_not_a_module", int)


@pytest.mark.parametrize(
    "rules,needle",
    [
        ([{"name": "orthonormal"}], "rules[0].name='orthonormal' is not allowed: one of the registered constraints: learned_mask, max_norm"),
        ([{"name": "max_norm", "args": {"radius": "big"}}], "rules[0].args.radius='big' is not allowed: a float"),
        ([{"name": "max_norm", "args": {"radius": -1}}], "rules[0].args.radius=-1 is not allowed: a number > 0"),
        ([{"name": "orthogonal", "args": {"method": "exp"}}], "rules[0].args.method='exp' is not allowed: one of polar, qr"),
        ([{"name": "orthogonal", "args": {"speed": 3}}], "rules[0].args.speed=3 is not allowed: an argument of orthogonal: method, tol, max_iter"),
        ([{"name": "spectral_norm", "args": {"n_power_iterations": 1.5}}], "n_power_iterations=1.5 is not allowed: an int"),
        ([{"name": "unit_norm", "allow_masked": "yes"}], "rules[0].allow_masked='yes' is not allowed: true or false"),
        ([{"name": "unit_norm", "targets": ["*"]}], "rules[0].targets=['*'] is not allowed: keys among"),
        ([{"name": "unit_norm", "args": [1]}], "rules[0].args=[1] is not allowed: a mapping"),
        ([], "constraints.rules=[] is not allowed: a non-empty list"),
        ("orthogonal", "constraints.rules='orthogonal' is not allowed"),
    ],
)
def test_bad_rules_fail_in_init(rules, needle):
    with pytest.raises(ConfigError) as err:
        WeightConstraints(rules)
    assert needle in str(err.value)


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 8, 3), nn.Linear(6, 6))


@pytest.mark.parametrize(
    "rules,needle",
    [
        ([{"name": "symmetric", "include": ["0.weight"]}], "symmetric' is not allowed: a constraint that fits 0.weight of shape (8, 2, 3): a square matrix (symmetric of a 8x6 matrix is undefined)"),
        ([{"name": "unit_norm", "include": ["2.weight"]}], "rules[0].include='2.weight' is not allowed: a glob matching at least one parameter"),
        ([{"name": "unit_norm", "include": ["0.weight"]}, {"name": "orthogonal", "include": ["0.weight"]}], "rules[1].name='orthogonal' is not allowed: a rule listed before the other constraints on 0.weight"),
        ([{"name": "unit_norm", "include": ["1.weight"]}, {"name": "weight_norm", "include": ["1.weight"]}], "must be first on its tensor"),
    ],
)
def test_tensors_that_cannot_carry_the_constraint(rules, needle):
    with pytest.raises(ConfigError) as err:
        WeightConstraints(rules).apply(_net())
    assert needle in str(err.value)


def test_a_mask_already_on_the_tensor_is_refused():
    net = _net()
    ensure_mask(net[1], "weight")
    with pytest.raises(ConstraintError, match="constraints come first"):
        WeightConstraints([{"name": "max_norm", "include": ["1.weight"]}]).apply(net)


def test_orthogonal_then_mask_is_refused_unless_allowed():
    net = _net()
    WeightConstraints([{"name": "orthogonal", "include": ["1.weight"]}]).apply(net)
    with pytest.raises(ConfigError, match=r"rules\[0\].allow_masked=False is not allowed: true to accept a sparsity/pruning mask on 1.weight, whose orthogonal constraint"):
        ensure_mask(net[1], "weight")
    assert get_mask(net[1], "weight") is None
    net = _net()
    WeightConstraints([{"name": "orthogonal", "include": ["1.weight"], "allow_masked": True}]).apply(net)
    with pytest.warns(UserWarning, match="will not hold on the masked weight"):
        ensure_mask(net[1], "weight")
    kinds = [type(p).__name__ for p in net[1].parametrizations.weight]
    assert kinds == ["Orthogonal", "Mask"]  # the documented order: constraint, then mask


def test_compatible_constraint_and_mask_share_a_tensor():
    net = _net()
    WeightConstraints([{"name": "non_negative", "include": ["1.weight"]}, {"name": "max_norm", "include": ["1.weight"]}]).apply(net)
    ensure_mask(net[1], "weight")
    kinds = [type(p).__name__ for p in net[1].parametrizations.weight]
    assert kinds == ["NonNegative", "MaxNorm", "Mask"]


def test_orthogonal_with_hardshrink_in_one_run_is_refused_before_training(tmp_path: Path):
    with pytest.raises(ConfigError, match="allow_masked"):
        run_train_inprocess([*FAST, "constraints=orthogonal", "sparsity=gmp", "sparsity.schedule.begin_epoch=0"], tmp_path)
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["constraints=orthogonal", "constraints.rules.0.name=orthonormal"], "error: constraints.rules.0.name='orthonormal' is not allowed: one of the registered constraints: learned_mask, max_norm, non_negative, orthogonal"),
        (["constraints=orthogonal", "constraints.rules.0.name=symmetric", "~constraints.rules.0.args"], "constraints.rules.0.name='symmetric' is not allowed: a constraint that fits net.features.0.0.weight of shape (32, 1, 3, 3)"),
        (["constraints=spectral", "constraints.rules.0.args.n_power_iterations=many"], "constraints.rules.0.args.n_power_iterations='many' is not allowed: an int"),
    ],
    ids=["unknown-name", "symmetric-on-non-square", "wrong-type"],
)
def test_bad_input_through_train_py(tmp_path: Path, args, needle):
    result = run_train_cli([*FAST, *args, f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "summary.json").exists()


def test_registered_lists_the_builtins():
    assert {"orthogonal", "spectral_norm", "weight_norm", "symmetric", "skew", "non_negative",
            "unit_norm", "max_norm", "learned_mask"} <= set(registered())


def test_callback_order_in_a_trainer_puts_the_mask_last():
    """HardshrinkSparsifier after WeightConstraints on a shared compatible tensor: constraint
    first, mask last; both hold at the end."""
    import lightning as L

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
    constraints = WeightConstraints([{"name": "non_negative", "include": ["net.0.weight"], "args": {"method": "clamp"}}])
    sparsifier = HardshrinkSparsifier(
        schedule={"kind": "constant", "start": 0.5, "end": 0.5, "begin_epoch": 0, "end_epoch": 0},
        mode="sparsity",
        targets={"include": ["net.0.weight"]},
    )
    model = Tiny(mlp(8, 16, 2), optimizer=partial(torch.optim.Adam, lr=1e-2))
    trainer = quiet_trainer([constraints, sparsifier], max_epochs=2)
    seen = {}

    class Spy(L.Callback):
        def on_train_end(self, trainer, pl_module):
            seen["kinds"] = [type(p).__name__ for p in pl_module.net[0].parametrizations.weight]

    trainer.callbacks.append(Spy())
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
    assert seen["kinds"] == ["NonNegative", "Mask"]
    w = model.net[0].weight
    assert not parametrize.is_parametrized(model.net[0])
    assert float(w.min()) >= 0 and float((w == 0).float().mean()) >= 0.5


def test_stacked_constraints_on_the_resnet_hold_and_model_pt_is_plain(tmp_path: Path):
    """The ucr_constrained experiment: orthonormal conv kernels (projected) and a head that is both
    non-negative and row-bounded; every violation is tiny at the end, the logged metrics are in the
    CSV, and model.pt is a plain model that still satisfies every constraint."""
    import csv

    summary = run_train_inprocess(
        ["+experiment=ucr_constrained", "trainer.accelerator=cpu", "logger=csv"], tmp_path
    )
    convs = [k for k in summary["constraints"] if k.endswith("/orthogonal")]
    assert len(convs) == 11  # 3 blocks x (3 body convs + 1 shortcut) - 1 block without a shortcut
    assert summary["constraints/max_violation"] <= 1e-4
    assert summary["test/acc"] > 0.9  # GunPoint: two balanced classes; 0.99 over three seeds

    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    logged = [float(r["constraints/max_violation"]) for r in rows if r.get("constraints/max_violation")]
    assert len(logged) == 40 and max(logged) <= 1e-4

    net = torch.load(tmp_path / "model.pt", weights_only=False)
    assert not any(parametrize.is_parametrized(m) for m in net.modules())
    for m in net.modules():
        if isinstance(m, nn.Conv1d):
            w = m.weight.detach().double().reshape(m.weight.shape[0], -1)
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            assert torch.linalg.matrix_norm(gram - torch.eye(len(gram), dtype=gram.dtype), 2) <= 1e-4
    head = net.head.weight.detach()
    assert float(head.min()) >= 0 and float(head.norm(dim=1).max()) <= 2.0 + 1e-6
    net.eval()
    assert net(torch.randn(4, 1, 150)).shape == (4, 2)
