"""N:M semi-structured sparsity (``sparsity.pattern``): exactly N of every M weights along the input
dimension, the N largest at the update, exactly round(f * groups) groups under a ramp, patterned
groups that stay patterned, refusal of bad input, exact resume, and the run through train.py."""

from __future__ import annotations

import itertools
import json
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from plugins.core.allocation import prune_count
from plugins.core.errors import ConfigError
from plugins.core.masks import get_mask
from plugins.sparsity.budgets import erk_densities
from plugins.sparsity.hardshrink import HardshrinkSparsifier
from tests.conftest import FAST, run_script, run_train_cli
from tests.helpers import Tiny, mlp, quiet_trainer

PATTERNS = [(2, 4), (1, 4), (4, 8)]


def conv_net() -> nn.Sequential:
    """A Linear, a Conv2d (3x3 on 2x2 maps, 8 in-channels) and a Linear head on Tiny's 8 features:
    every input dimension (8, 8, 64) is a multiple of 4 and of 8."""
    return nn.Sequential(
        nn.Linear(8, 32),
        nn.Unflatten(1, (8, 2, 2)),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 3),
    )


def nm(pattern: str, schedule: dict | None = None, **kwargs) -> HardshrinkSparsifier:
    schedule = schedule or {"kind": "constant", "end": 1.0, "begin_epoch": 0, "end_epoch": 0}
    return HardshrinkSparsifier(schedule=schedule, mode="sparsity", pattern=pattern, **kwargs)


def trainer(tmp_path: Path, epochs: int, callbacks: list, **kwargs) -> L.Trainer:
    return quiet_trainer(callbacks, max_epochs=epochs, deterministic=True, default_root_dir=str(tmp_path), **kwargs)


def groups_of(w: torch.Tensor, m: int) -> list[tuple[tuple, torch.Tensor]]:
    """Reference layout, written apart from the product code: for every index of the dims other
    than 1 (out, then kh, kw), the vector along dim 1, cut into consecutive pieces of m. Returns
    (index, flat positions along dim 1) pairs, in the product code's group order."""
    out = []
    others = [range(w.shape[0]), *(range(s) for s in w.shape[2:])]
    for index in itertools.product(*others):
        for start in range(0, w.shape[1], m):
            out.append((index, torch.arange(start, start + m)))
    return out


def along_dim1(w: torch.Tensor, index: tuple, positions: torch.Tensor) -> torch.Tensor:
    return w[(index[0], positions, *index[1:])]


def nonzeros_per_group(w: torch.Tensor, m: int) -> list[int]:
    return [int((along_dim1(w, i, p) != 0).sum()) for i, p in groups_of(w, m)]


def mask_zeros_per_group(target, m: int) -> torch.Tensor:
    mask = get_mask(target.module, target.tensor_name).mask
    return torch.tensor([int((along_dim1(mask, i, p) == 0).sum()) for i, p in groups_of(mask, m)])


# --- 1. exactly N of every M, through the optimizer and the bake -----------------------------------


class PatternWatch(L.Callback):
    """After every optimizer step: every M-group of every selected tensor has exactly N nonzeros,
    in the weight the module computes with and in the stored one (so the optimizer moved no zero)."""

    def __init__(self, sparsifier: HardshrinkSparsifier, n: int, m: int) -> None:
        self.sparsifier, self.n, self.m = sparsifier, n, m
        self.steps_checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for t in self.sparsifier.targets:
            for w in (t.tensor.detach(), t.raw.detach()):
                assert set(nonzeros_per_group(w, self.m)) == {self.n}, (t.name, trainer.global_step)
        self.steps_checked += 1


@pytest.mark.parametrize(("n", "m"), PATTERNS)
def test_every_group_of_m_keeps_exactly_n_through_training_and_the_bake(tmp_path, n, m):
    cb = nm(f"{n}:{m}")
    watch = PatternWatch(cb, n, m)
    model = Tiny(conv_net())
    trainer(tmp_path, 2, [cb, watch]).fit(model)
    assert watch.steps_checked == 16 and len(cb.history) == 1
    assert {type(t.module) for t in cb.targets} == {nn.Linear, nn.Conv2d}
    assert not any(parametrize.is_parametrized(mod) for mod in model.modules())  # baked
    for name in ("net.0.weight", "net.2.weight", "net.5.weight"):
        w = model.get_parameter(name).detach()
        assert set(nonzeros_per_group(w, m)) == {n}, name
        assert float((w == 0).float().mean()) == (m - n) / m


# --- 2. the kept N are the largest |w| of their group, the patterned groups the cheapest -----------


def reference_keep(w: torch.Tensor, n: int, m: int, patterned: set[int]) -> torch.Tensor:
    """The N largest |w| of each patterned group (by its index in reference order), all else kept."""
    keep = torch.ones_like(w, dtype=torch.bool)
    for g, (index, positions) in enumerate(groups_of(w, m)):
        if g in patterned:
            vector = along_dim1(w, index, positions).abs()
            dropped = positions[vector.topk(m - n, largest=False).indices]
            keep[(index[0], dropped, *index[1:])] = False
    return keep


def cheapest(weights: dict[str, torch.Tensor], n: int, m: int, fraction: float, scope: str) -> dict[str, set[int]]:
    """Per tensor, the groups (reference order) to pattern: the round(f * groups) whose M - N
    smallest |w| sum lowest, in each tensor (layer) or over all tensors together (global)."""
    costs = {
        name: [float(along_dim1(w, i, p).abs().sort().values[: m - n].sum()) for i, p in groups_of(w, m)]
        for name, w in weights.items()
    }
    if scope == "layer":
        return {
            name: set(sorted(range(len(c)), key=c.__getitem__)[: round(fraction * len(c))]) for name, c in costs.items()
        }
    pooled = sorted((cost, name, g) for name, c in costs.items() for g, cost in enumerate(c))
    chosen = {name: set() for name in weights}
    for _, name, g in pooled[: round(fraction * len(pooled))]:
        chosen[name].add(g)
    return chosen


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize(("n", "m"), PATTERNS)
def test_kept_entries_are_the_largest_of_their_group_and_the_groups_the_cheapest(n, m, scope):
    torch.manual_seed(0)
    model = conv_net()
    with torch.no_grad():
        model[5].weight.mul_(10)  # costlier groups: a global cut takes fewer of them
    cb = nm(f"{n}:{m}", scope=scope)
    cb.setup(None, model, "fit")
    # Half the groups first, from these weights.
    before = {t.name: t.tensor.detach().clone() for t in cb.targets}
    cb.apply(0.5)
    first = cheapest(before, n, m, 0.5, scope)
    head = len(first["5.weight"]) / len(groups_of(before["5.weight"], m))
    assert head == 0.5 if scope == "layer" else head < 0.5
    for t in cb.targets:
        expected = reference_keep(before[t.name], n, m, first[t.name])
        assert torch.equal(get_mask(t.module, t.tensor_name).mask != 0, expected), t.name
    # The weights move (as training moves them), then every group: the new ones from the new weights.
    with torch.no_grad():
        for t in cb.targets:
            t.raw.mul_(torch.rand_like(t.raw) * 2)
    now = {t.name: t.tensor.detach().clone() for t in cb.targets}
    cb.apply(1.0)
    for t in cb.targets:
        w, count = now[t.name], len(groups_of(now[t.name], m))
        kept_first = reference_keep(before[t.name], n, m, first[t.name])
        expected = reference_keep(w, n, m, set(range(count)) - first[t.name]) & kept_first
        assert torch.equal(get_mask(t.module, t.tensor_name).mask != 0, expected), t.name


# --- 3. a ramp patterns exactly round(f * groups) groups at each update; they stay patterned ----


class RampWatch(L.Callback):
    """Right after each update (it runs after the sparsifier): which groups carry the pattern."""

    def __init__(self, sparsifier: HardshrinkSparsifier, n: int, m: int) -> None:
        self.sparsifier, self.n, self.m = sparsifier, n, m
        self.updates: list[tuple[float, dict[str, torch.Tensor]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        history = self.sparsifier.history
        if history and history[-1]["step"] == trainer.global_step:
            zeros = {t.name: mask_zeros_per_group(t, self.m) for t in self.sparsifier.targets}
            for name, z in zeros.items():  # a group is whole or exactly N:M, nothing in between
                assert set(z.tolist()) <= {0, self.m - self.n}, name
            self.updates.append((history[-1]["value"], {name: z > 0 for name, z in zeros.items()}))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_ramp_patterns_exactly_round_f_groups_at_each_update_and_they_stay(tmp_path, scope):
    n, m = 2, 4
    schedule = {"kind": "linear", "start": 0.0, "end": 1.0, "begin_epoch": 0, "end_epoch": 2, "every_n_steps": 3}
    cb = nm("2:4", schedule, scope=scope, bake_at_end=False)
    watch = RampWatch(cb, n, m)
    net = conv_net()
    with torch.no_grad():
        net[5].weight.mul_(10)  # costlier groups: a global cut takes them last
    trainer(tmp_path, 3, [cb, watch]).fit(Tiny(net))
    values = [value for value, _ in watch.updates]
    assert len(values) == 7 and values[0] == 0.0 and values[-1] == 1.0 and len(set(values)) == 7
    previous = None
    for value, patterned in watch.updates:
        if scope == "layer":
            for name, p in patterned.items():
                assert int(p.sum()) == prune_count(value, p.numel()), (name, value)
        else:
            total = sum(p.numel() for p in patterned.values())
            assert sum(int(p.sum()) for p in patterned.values()) == prune_count(value, total), value
            if 0 < value < 1:
                assert float(patterned["net.5.weight"].float().mean()) < value
        if previous is not None:
            for name, p in patterned.items():
                assert bool(p[previous[name]].all()), f"{name}: a patterned group came back at f={value}"
        previous = patterned
    fractions = [h["patterned"] for h in cb.history]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_patterned_groups_stay_patterned_when_the_schedule_comes_down(tmp_path):
    schedule = {"kind": "linear", "start": 0.75, "end": 0.25, "begin_epoch": 0, "end_epoch": 2}
    cb = nm("2:4", schedule, scope="layer", bake_at_end=False)
    watch = RampWatch(cb, 2, 4)
    trainer(tmp_path, 3, [cb, watch]).fit(Tiny(conv_net()))
    assert [value for value, _ in watch.updates] == [0.75, 0.5, 0.25]
    first = watch.updates[0][1]
    for _, patterned in watch.updates:
        for name, p in patterned.items():
            assert torch.equal(p, first[name]) and int(p.sum()) == prune_count(0.75, p.numel()), name
    for t in cb.targets:  # and in the weights at the end, an epoch after the last update
        zeros = torch.tensor([4 - k for k in nonzeros_per_group(t.tensor.detach(), 4)])
        assert torch.equal(zeros >= 2, first[t.name]), t.name


@pytest.mark.parametrize("scope", ["erk", "lamp"])
def test_other_allocations_pattern_the_scheduled_fraction_of_all_groups(scope):
    torch.manual_seed(0)
    cb = nm("2:4", scope=scope)
    cb.setup(None, conv_net(), "fit")
    cb.apply(0.6)
    patterned = {t.name: int((mask_zeros_per_group(t, 4) == 2).sum()) for t in cb.targets}
    groups = {t.name: t.tensor.numel() // 4 for t in cb.targets}
    total = sum(groups.values())
    if scope == "erk":  # each tensor: its ERK share of the groups (Evci et al. densities of its shape)
        densities = erk_densities({t.name: tuple(t.tensor.shape) for t in cb.targets}, 0.6)
        assert patterned == {name: prune_count(1 - densities[name], g) for name, g in groups.items()}
        assert abs(sum(patterned.values()) - 0.6 * total) <= len(groups)  # within one group per tensor
    else:  # one cut over all tensors' LAMP-normalized costs: exactly round(f * groups) in all
        assert sum(patterned.values()) == prune_count(0.6, total)
    fractions = [patterned[name] / groups[name] for name in groups]
    assert max(fractions) - min(fractions) > 0.3  # not the same fraction in every tensor


def test_regrow_repatterns_at_every_update_and_at_the_end_of_fit(tmp_path):
    cb = nm("2:4", regrow=True)
    model = Tiny(conv_net())
    regrown = []

    class Watch(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            regrown.append(sum(4 - k for t in cb.targets for k in nonzeros_per_group(t.tensor.detach(), 4)))

    trainer(tmp_path, 2, [cb, Watch()]).fit(model)
    total = sum(t.tensor.numel() for t in cb.targets)
    assert not any(parametrize.is_parametrized(mod) for mod in model.modules())  # no mask ever kept
    assert regrown[-1] < total / 2  # the gradient moved the zeros between updates
    for t in cb.targets:  # patterned again at the end of fit
        assert set(nonzeros_per_group(t.tensor.detach(), 4)) == {2}, t.name


# --- resume ---------------------------------------------------------------------------------------


def test_resumed_run_continues_the_ramp_with_the_same_masks_and_weights(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    schedule = {"kind": "linear", "start": 0.0, "end": 1.0, "begin_epoch": 0, "end_epoch": 3}

    def run(epochs: int, ckpt: str | None, out: Path):
        L.seed_everything(0)
        model, cb = Tiny(conv_net()), nm("2:4", schedule, scope="global", bake_at_end=False)
        saver = ModelCheckpoint(dirpath=out, save_last=True, save_top_k=0)
        trainer(out, epochs, [cb, saver], enable_checkpointing=True).fit(model, ckpt_path=ckpt)
        return model, cb

    full_model, full_cb = run(4, None, tmp_path / "full")
    run(2, None, tmp_path / "part")  # stopped after epoch 1, mid-ramp (updates at epochs 0..3)
    resumed_model, resumed_cb = run(4, str(tmp_path / "part" / "last.ckpt"), tmp_path / "resumed")
    full, resumed = full_model.state_dict(), resumed_model.state_dict()
    assert full.keys() == resumed.keys() and any(k.endswith("mask") for k in full)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    assert full_cb.history == resumed_cb.history and len(full_cb.history) == 4
    assert [h["step"] for h in resumed_cb.history] == [0, 8, 16, 24]


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning as L
    import torch
    from plugins.core.masks import get_mask
    from plugins.sparsity.hardshrink import HardshrinkSparsifier
    from tests.helpers import Tiny
    from tests.test_nm_pattern import conv_net

    class Dump(L.Callback):
        def __init__(self, sparsifier):
            self.sparsifier = sparsifier

        def on_train_end(self, trainer, pl_module):
            targets = self.sparsifier.targets
            masks = {t.name: get_mask(t.module, t.tensor_name).mask.clone() for t in targets}
            weights = {t.name: t.tensor.detach().clone() for t in targets}
            state = {"masks": masks, "weights": weights, "history": self.sparsifier.history}
            torch.save(state, f"{sys.argv[1]}/rank{trainer.global_rank}.pt")

    L.seed_everything(0)
    schedule = {"kind": "linear", "start": 0.0, "end": 1.0, "begin_epoch": 0, "end_epoch": 1, "every_n_steps": 1}
    sparsifier = HardshrinkSparsifier(schedule, mode="sparsity", scope="global", pattern="2:4", bake_at_end=False)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[sparsifier, Dump(sparsifier)])
    trainer.fit(Tiny(conv_net()))
    """
)


@pytest.mark.ddp
@pytest.mark.slow
def test_masks_are_identical_on_both_ddp_ranks(tmp_path):
    result = run_script(DDP_SCRIPT, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all((tmp_path / f"rank{r}.pt").exists() for r in (0, 1)), result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["history"] == ranks[1]["history"], (ranks[0]["history"], ranks[1]["history"])
    assert len(ranks[0]["history"]) == 5, ranks[0]["history"]
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), f"{name}: {int((mask != ranks[1]['masks'][name]).sum())}"
        weights = [rank["weights"][name] for rank in ranks]
        assert torch.equal(*weights), f"{name}: max |difference| {float((weights[0] - weights[1]).abs().max())}"
        assert set(nonzeros_per_group(ranks[0]["weights"][name], 4)) == {2}, name


# --- the input dimension of layers that store their weight as (in, out) ---------------------------


def rows_along_inputs(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzeros per m consecutive inputs of a GPT-2 Conv1D weight (in, out), per output column."""
    matrix = weight.detach().t()  # (out, in), the matrix 2:4 kernels read
    return (matrix.reshape(matrix.shape[0], -1, m) != 0).sum(dim=2)


def test_gpt2s_conv1d_layers_are_patterned_along_their_inputs_as_a_linear_is():
    """Hugging Face's Conv1D stores (in, out): its 2:4 groups run along dim 0, so that the (out, in)
    matrix semi-structured kernels read keeps 2 of every 4 inputs, exactly as a Linear does."""
    transformers = pytest.importorskip("transformers")
    from tests.test_zoo import _tokens
    from tests.zoo_models import LENGTH, VOCAB, Task

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=1, n_head=2)
    lm = transformers.GPT2LMHeadModel(config)
    cb = nm("2:4", targets={"module_types": ["Linear", "transformers.pytorch_utils.Conv1D"]})
    quiet_trainer([cb], max_epochs=1, max_steps=2).fit(Task(lm), _tokens())
    block = lm.transformer.h[0]
    for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
        assert layer.weight.shape[0] == layer.nx  # (in, out)
        assert set(rows_along_inputs(layer.weight, 4).flatten().tolist()) == {2}
    assert set(nonzeros_per_group(lm.lm_head.weight.detach(), 4)) == {2}  # Linear (vocab, n_embd)


def test_a_transposed_convolution_is_patterned_along_its_input_channels(tmp_path):
    """ConvTranspose2d stores (in, out, kh, kw): 2 of every 4 input channels at each (out, kh, kw)."""
    net = nn.Sequential(nn.Unflatten(1, (8, 1, 1)), nn.ConvTranspose2d(8, 6, 2), nn.Flatten(), nn.Linear(24, 3))
    cb = nm("2:4", targets={"module_types": ["ConvTranspose2d"]})
    trainer(tmp_path, 1, [cb]).fit(Tiny(net))
    w = net[1].weight.detach()  # (8, 6, 2, 2)
    per_group = (w.movedim(0, -1).reshape(-1, 2, 4) != 0).sum(dim=2)
    assert set(per_group.flatten().tolist()) == {2}


# --- 4. bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["3:2", "2-4", "0:4", "4:4", "2:", "two:four", "-1:4", "2:4:8", 124, 2.4])
def test_a_bad_pattern_fails_in_init_naming_the_key(bad):
    with pytest.raises(ConfigError) as err:
        nm(bad)
    assert err.value.key == "sparsity.pattern" and err.value.value == bad
    assert "N:M with 0 < N < M, e.g. 2:4" in str(err.value)
    if bad == 124:  # what YAML makes of an unquoted 2:4
        assert 'quote it in YAML: pattern: "2:4"' in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"mode": "threshold", "schedule": {"kind": "constant", "end": 0.1}}, "sparsity.mode"),
        ({"mode": "sparsity", "schedule": {"kind": "constant", "end": 1.5}}, "sparsity.schedule.end"),
        ({"mode": "sparsity", "schedule": {"kind": "linear", "start": -0.1, "end": 1.0}}, "sparsity.schedule.start"),
    ],
)
def test_threshold_mode_and_fractions_outside_0_1_are_refused_with_a_pattern(kwargs, key):
    with pytest.raises(ConfigError) as err:
        HardshrinkSparsifier(pattern="2:4", **kwargs)
    assert err.value.key == key


def test_a_full_fraction_is_allowed_with_a_pattern_only():
    nm("2:4", {"kind": "constant", "end": 1.0})
    with pytest.raises(ConfigError):
        nm(None, {"kind": "constant", "end": 1.0})


class NoBatch(Tiny):
    def training_step(self, batch, batch_idx):
        raise AssertionError("no batch may run")


@pytest.mark.parametrize("pattern", ["2:4", "1:8"])
def test_a_layer_whose_inputs_do_not_split_into_m_groups_fails_before_the_first_batch(tmp_path, pattern):
    model = NoBatch(mlp(8, 6, 3))  # net.2 has 6 inputs: a multiple of neither 4 nor 8
    with pytest.raises(ConfigError) as err:
        trainer(tmp_path, 1, [nm(pattern)]).fit(model)
    assert err.value.key == "sparsity.pattern"
    assert "net.2.weight (shape (3, 6)) has 6 along dim 1" in str(err.value)
    assert "sparsity.targets.exclude=[net.2.weight]" in str(err.value)
    assert not any(parametrize.is_parametrized(mod) for mod in model.modules())


def test_train_py_refuses_a_layer_that_m_does_not_divide_with_exit_2(tmp_path):
    # The digits CNN's first conv has one input channel: 4 does not divide it.
    result = run_train_cli(
        [*FAST, "sparsity=gmp", "sparsity.pattern=2:4", "sparsity.schedule.begin_epoch=0", f"hydra.run.dir={tmp_path}"],
        timeout=300,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: sparsity.pattern='2:4' is not allowed"), lines
    assert "net.features.0.0.weight (shape (32, 1, 3, 3)) has 1 along dim 1" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "summary.json").exists() and not list(tmp_path.rglob("*.ckpt"))


# --- 5. through train.py --------------------------------------------------------------------------


def test_train_py_with_pattern_2_4_reports_half_the_selected_weights_zero(tmp_path):
    result = run_train_cli(
        [
            *FAST,
            "trainer.max_epochs=2",
            "sparsity=gmp",
            "sparsity.pattern=2:4",
            "sparsity.schedule.end=1.0",
            "sparsity.schedule.begin_epoch=0",
            "sparsity.schedule.end_epoch=1",
            "sparsity.targets.exclude=[net.features.0.0.weight]",
            f"hydra.run.dir={tmp_path}",
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sparsity/selected"] == 0.5
    assert summary["sparsity/pattern"] == "2:4" and summary["sparsity/patterned"] == 1.0
    assert summary["sparsity/target"] == 1.0 and summary["sparsity/updates"] == 2
    assert set(summary["sparsity/selected_layers"].values()) == {0.5}
    net = torch.load(tmp_path / "model.pt", weights_only=False)  # baked: plain tensors, 2 of every 4
    assert not any(parametrize.is_parametrized(mod) for mod in net.modules())
    for name in summary["sparsity/selected_layers"]:
        w = net.get_parameter(name.removeprefix("net.")).detach()
        assert set(nonzeros_per_group(w, 4)) == {2}, name
