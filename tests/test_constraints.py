"""Each built-in constraint: float64 gradcheck, and the constraint still holds after 200 optimizer
steps (violation <= 1e-5 in float64, <= 1e-4 in float32), through WeightConstraints as a model
transform; registering keeps a weight that satisfies the constraint; baking leaves a plain model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from plugins.constraints import (
    WeightConstraints,
    build_constraint,
    orthogonal_violation,
    polar_,
    qr_,
    registered,
)

# name, args, model kind: "square" = Linear(6, 6), "conv" = Conv1d(3, 4, 2) (a 4x6 wide matrix),
# "tall" = Linear(3, 7) (a 7x3 tall matrix).
CASES = [
    ("orthogonal", {"method": "polar"}, "conv"),
    ("orthogonal", {"method": "polar"}, "tall"),
    ("orthogonal", {"method": "qr"}, "conv"),
    ("orthogonal", {"method": "matrix_exp"}, "conv"),
    ("orthogonal", {"method": "cayley"}, "tall"),
    ("orthogonal", {"method": "householder"}, "square"),
    ("spectral_norm", {}, "conv"),
    ("weight_norm", {}, "conv"),
    ("symmetric", {}, "square"),
    ("skew", {}, "square"),
    ("non_negative", {}, "conv"),
    ("non_negative", {"method": "clamp"}, "conv"),
    ("unit_norm", {}, "conv"),
    ("max_norm", {"radius": 0.5}, "conv"),
    ("learned_mask", {"temperature": 0.5, "penalty": 0.01}, "conv"),
]
IDS = [f"{n}-{'-'.join(map(str, a.values()))}-{k}" for n, a, k in CASES]


def _model(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    layer = {
        "square": lambda: nn.Linear(6, 6),
        "conv": lambda: nn.Conv1d(3, 4, 2),
        "tall": lambda: nn.Linear(3, 7),
    }[kind]()
    return nn.Sequential(layer).to(dtype)


def _input(kind: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(16, 3, 5, dtype=dtype) if kind == "conv" else torch.randn(16, 6 if kind == "square" else 3, dtype=dtype)


def test_every_builtin_is_covered():
    assert {name for name, _, _ in CASES} == {
        "orthogonal", "spectral_norm", "weight_norm", "symmetric", "skew",
        "non_negative", "unit_norm", "max_norm", "learned_mask",
    } <= set(registered())


@pytest.mark.parametrize("name,args,kind", CASES, ids=IDS)
def test_gradcheck_float64(name, args, kind):
    model = _model(kind, torch.float64)
    wc = WeightConstraints([{"name": name, "args": args, "include": ["0.weight"]}])
    (applied,) = wc.apply(model)
    constraint = applied.constraint.eval()  # spectral_norm: no power-iteration update inside gradcheck
    originals = model[0].parametrizations.weight
    if name == "weight_norm":
        inputs = (originals.original0.detach().clone().requires_grad_(), originals.original1.detach().clone().requires_grad_())
    else:
        inputs = (originals.original.detach().clone().requires_grad_(),)
    function = constraint
    if args.get("method") == "householder":
        # PyTorch's Householder map reads only the signs of the diagonal (not differentiated):
        # check the derivative in the reflectors below it.
        fixed = inputs[0].detach().diagonal().diag_embed()

        def function(x):
            return constraint(x.tril(-1) + fixed)

    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-5)
    if name == "learned_mask":
        x = inputs[0].detach()
        scores = constraint.scores

        def through_scores(s):
            return x * torch.sigmoid(s / constraint.temperature)

        assert torch.autograd.gradcheck(through_scores, (scores.detach().clone().requires_grad_(),))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)], ids=["float64", "float32"])
@pytest.mark.parametrize("name,args,kind", CASES, ids=IDS)
def test_holds_after_200_steps(name, args, kind, dtype, tol):
    model = _model(kind, dtype)
    wc = WeightConstraints([{"name": name, "args": args, "include": ["0.weight"]}])
    wc.apply(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    wc.attach(optimizer)
    x = _input(kind, dtype)
    target = torch.randn_like(model(x))
    first = last = None
    for _ in range(200):
        optimizer.zero_grad()
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
    wc.detach()
    assert last < first  # it trains
    if name == "learned_mask":
        # A soft gate is a reparametrization, not a set: what must hold is the exported mask,
        # exact 0/1 once the gates are rounded (finalize_, done before baking).
        assert wc.violations()["0.weight/learned_mask"] > tol  # the penalty pushed gates down
        wc.applied[0].constraint.finalize_()
    violations = wc.violations()
    assert violations and max(violations.values()) <= tol, violations
    weight_before = model[0].weight.detach().clone()
    if name == "weight_norm":  # the norms it promises, g: ||W_i|| = |g_i| must survive baking
        g = model[0].parametrizations.weight.original0.detach().clone()
    assert wc.bake() == 1
    assert not parametrize.is_parametrized(model[0])
    assert type(model[0].weight) is nn.Parameter
    torch.testing.assert_close(model[0].weight, weight_before)
    # Measured on the plain baked weight. A fresh constraint measures without any state of the
    # trained one; learned_mask's set is the trained gates: the entries they rounded off are 0.
    measure = wc.applied[0].constraint if name == "learned_mask" else build_constraint(name, args)
    after = float(measure.violation(model[0].weight))
    if name == "weight_norm":
        norms = torch.norm_except_dim(model[0].weight.detach(), 2, 0)
        after = max(after, float((norms - g.abs()).abs().max()))
    assert after <= tol


@pytest.mark.parametrize(
    "name,args,kind",
    [c for c in CASES if c[0] not in ("weight_norm", "spectral_norm", "learned_mask") and c[1].get("method") not in ("matrix_exp", "cayley", "householder")],
)
def test_registering_keeps_a_weight_that_satisfies_it(name, args, kind):
    model = _model(kind, torch.float64)
    wc = WeightConstraints([{"name": name, "args": args, "include": ["0.weight"]}])
    wc.apply(model)
    satisfied = model[0].weight.detach().clone()  # now on the set
    wc.bake()
    wc2 = WeightConstraints([{"name": name, "args": args, "include": ["0.weight"]}])
    wc2.apply(model)
    torch.testing.assert_close(model[0].weight, satisfied)


def test_learned_mask_keeps_the_weight_and_sparsifies_at_bake():
    model = _model("conv", torch.float64)
    before = model[0].weight.detach().clone()
    wc = WeightConstraints([{"name": "learned_mask", "args": {"penalty": 5.0}, "include": ["0.weight"]}])
    wc.apply(model)
    torch.testing.assert_close(model[0].weight, before)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x = _input("conv", torch.float64)
    for _ in range(100):
        optimizer.zero_grad()
        (model(x).pow(2).mean() * 0).backward()  # only the penalty pushes the gates
        optimizer.step()
    mask = wc.applied[0].constraint
    assert mask.kept() < 1.0
    wc.bake()
    zeros = (model[0].weight == 0).float().mean()
    assert zeros == pytest.approx(1 - mask.kept())


def test_learned_mask_with_a_target_closes_exactly_its_count_whatever_the_ties():
    """Fresh scores are all equal: every one ties at the cut. round(0.5 * 320) = 160 gates close,
    the first 160 in index order (all of them closed before)."""
    layer = nn.Linear(10, 32)
    wc = WeightConstraints([{"name": "learned_mask", "args": {"target": 0.5}, "include": ["weight"], "module_types": None}])
    wc.apply(layer)
    mask = wc.applied[0].constraint
    mask.finalize_()
    closed = torch.isneginf(mask.scores).reshape(-1)
    assert int(closed.sum()) == 160 and bool(closed[:160].all())
    assert mask.kept() == pytest.approx(0.5)


@pytest.mark.parametrize("shape", [(64, 64), (64, 16), (16, 64), (32, 8, 5)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_projections_reach_the_orthogonal_matrices(shape, dtype, tol):
    torch.manual_seed(1)
    w = torch.linalg.qr(torch.randn(shape[0], int(torch.tensor(shape[1:]).prod())).mT if shape[0] < int(torch.tensor(shape[1:]).prod()) else torch.randn(shape[0], int(torch.tensor(shape[1:]).prod())))[0]
    w = (w.mT if shape[0] < w.shape[0] else w).reshape(shape).to(dtype).contiguous()
    for project in (lambda t: polar_(t, tol=1e-12 if dtype == torch.float64 else 1e-6), qr_):
        drifted = w + 0.01 * torch.randn(shape, dtype=dtype)
        assert orthogonal_violation(drifted) > 1e-3
        project(drifted)
        assert orthogonal_violation(drifted) <= tol
    far = torch.randn(shape, dtype=dtype)  # far from the set: the exact polar factor by SVD
    polar_(far)
    assert orthogonal_violation(far) <= max(tol, 1e-5)


def test_spectral_norm_on_a_transposed_convolution_normalizes_its_out_by_in_matrix_as_pytorch_does():
    """A ConvTranspose2d stores (in, out, kh, kw); PyTorch's own spectral_norm takes its matrix as
    (out, in * kh * kw), the output axis first, and so does the rule."""
    from tests.helpers import Tiny, quiet_trainer

    torch.manual_seed(0)
    net = nn.Sequential(nn.Unflatten(1, (8, 1, 1)), nn.ConvTranspose2d(8, 6, 2), nn.Flatten(), nn.Linear(24, 3))
    with torch.no_grad():
        net[1].weight.mul_(torch.linspace(0.2, 3.0, 6).reshape(1, 6, 1, 1))  # output units of unequal size
    wc = WeightConstraints([{"name": "spectral_norm", "args": {"n_power_iterations": 5}, "include": ["net.1.weight"],
                             "module_types": ["ConvTranspose2d"]}])
    quiet_trainer([wc], max_epochs=2).fit(Tiny(net))
    w = net[1].weight.detach().double()
    out_first = torch.linalg.matrix_norm(w.movedim(1, 0).reshape(6, -1), ord=2).item()
    in_first = torch.linalg.matrix_norm(w.reshape(8, -1), ord=2).item()
    assert abs(out_first - 1) < 1e-3 and abs(in_first - 1) > 0.05
    torch_sn = torch.nn.utils.parametrizations.spectral_norm(nn.ConvTranspose2d(8, 6, 2))
    assert torch_sn.parametrizations.weight[0].dim == 1  # the axis PyTorch picks for this layer
