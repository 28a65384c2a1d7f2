"""Dynamic sparse training (sparsity=rigl, sparsity=set): constant sparsity from step 0, exact moves
(as many grown as dropped, grown at 0 with zeroed optimizer state), RigL's growth by the dense
gradient against autograd, the cosine drop fraction and its stop, identical masks on 2 DDP ranks,
exact resume after a real stop of train.py, and refusal of bad input."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from plugins.core.allocation import prune_count
from plugins.core.errors import ConfigError
from plugins.core.masks import get_mask
from plugins.sparsity.budgets import erk_densities
from plugins.sparsity.dynamic import DynamicSparsifier
from tests.conftest import ROOT, run_script, run_train_cli
from tests.helpers import Tiny, mlp, quiet_trainer
from tests.test_bad_input import _assert_refused
from tests.test_resume import BASE, BATCHES, EPOCHS, _log, _steps

GROW = {"rigl": "dense_gradient", "set": "random"}
OPTIMIZERS = {
    "sgd": partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": partial(torch.optim.Adam, lr=1e-2, weight_decay=1e-3),
}


class Probe(L.Callback):
    """Placed after the sparsifier: the masks at each batch start (after an update made there, before
    a move) and right after each move (in on_before_optimizer_step, before the optimizer step), with
    the stored weights and the optimizer state at that moment."""

    def __init__(self, sparsifier: DynamicSparsifier) -> None:
        self.sparsifier = sparsifier
        self.at_start: dict[int, dict[str, torch.Tensor]] = {}
        self.moves: dict[int, dict] = {}
        self.batches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.weights_at_start: dict[int, dict[str, torch.Tensor]] = {}

    def _masks(self) -> dict[str, torch.Tensor]:
        return {t.name: get_mask(t.module, t.tensor_name).mask.clone() for t in self.sparsifier.targets}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.at_start[step] = self._masks()
        self.batches[step] = tuple(b.clone() for b in batch)
        linear = [(i, m) for i, m in enumerate(pl_module.net) if isinstance(m, nn.Linear)]
        self.weights_at_start[step] = {
            f"{i}.{k}": getattr(m, k).detach().clone() for i, m in linear for k in ("weight", "bias")
        }

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        if self.sparsifier.history[-1]["step"] != step or step == 0:
            return
        raw = {t.name: t.raw.detach().clone() for t in self.sparsifier.targets}
        state = {
            t.name: {
                k: v.clone() for k, v in optimizer.state[t.raw].items() if torch.is_tensor(v) and v.shape == t.raw.shape
            }
            for t in self.sparsifier.targets
        }
        self.moves[step] = {"masks": self._masks(), "raw": raw, "state": state}


def fit(grow: str, epochs: int = 3, optimizer="sgd", extra=(), **kwargs) -> tuple[DynamicSparsifier, Probe, Tiny]:
    kwargs = {"amount": 0.8, "allocation": "layer", "update_every": 2, **kwargs}
    sparsifier = DynamicSparsifier(grow=grow, **kwargs)
    probe = Probe(sparsifier)
    module = Tiny(mlp(8, 32, 32, 3), optimizer=OPTIMIZERS[optimizer])
    L.seed_everything(0)
    quiet_trainer([sparsifier, probe, *extra], max_epochs=epochs, deterministic=True).fit(module)
    return sparsifier, probe, module


def budget(sparsifier: DynamicSparsifier, allocation: str, amount: float) -> dict[str, int]:
    shapes = {t.name: tuple(t.raw.shape) for t in sparsifier.targets}
    if allocation == "layer":
        return {name: prune_count(amount, math.prod(shape)) for name, shape in shapes.items()}
    densities = erk_densities(shapes, amount)
    return {name: prune_count(1.0 - densities[name], math.prod(shape)) for name, shape in shapes.items()}


# --- 1. constant sparsity, from step 0 ---------------------------------------------------------------


@pytest.mark.parametrize("allocation", ["layer", "erk"])
@pytest.mark.parametrize("method", ["rigl", "set"])
def test_each_tensor_keeps_its_sparsity_exactly_from_step_0_through_every_move(method, allocation):
    sparsifier, probe, module = fit(GROW[method], allocation=allocation)
    expected = budget(sparsifier, allocation, 0.8)
    assert len(set(expected.values())) == 3  # three tensors, three different budgets
    if allocation == "erk":
        assert expected != budget(sparsifier, "layer", 0.8)
    assert min(probe.at_start) == 0  # the first batch already starts at the target
    snapshots = [*probe.at_start.values(), *(m["masks"] for m in probe.moves.values())]
    for masks in snapshots:
        assert {name: int((m == 0).sum()) for name, m in masks.items()} == expected
    assert len(probe.moves) == 8  # 24 steps, stop at 18: moves at 2, 4, ..., 16
    moved = [
        s for s, m in probe.moves.items() if any(not torch.equal(m["masks"][n], probe.at_start[s][n]) for n in expected)
    ]
    assert moved == sorted(probe.moves)  # every one of them changed the masks
    assert {h["sparsity"] for h in sparsifier.history} == {
        sum(expected.values()) / sum(t.raw.numel() for t in sparsifier.targets)
    }
    # baked at the end of fit: plain tensors that hold the zeros of the last masks
    last = probe.moves[max(probe.moves)]["masks"]
    for name, mask in last.items():
        layer = module.net.get_submodule(name.removeprefix("net.").rpartition(".")[0])
        assert not parametrize.is_parametrized(layer)
        assert torch.all(layer.weight[mask == 0] == 0)


# --- 2. exact moves: grown = dropped, grown at 0 with zeroed optimizer state -------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("method", ["rigl", "set"])
def test_a_move_grows_as_many_as_it_drops_at_zero_with_zeroed_optimizer_state(method, optimizer):
    sparsifier, probe, _ = fit(GROW[method], optimizer=optimizer)
    regrown = {h["step"]: h["regrown"] for h in sparsifier.history}
    assert regrown[0] == 0 and len(probe.moves) == 8
    for step, move in probe.moves.items():
        total = 0
        for name, after in move["masks"].items():
            before = probe.at_start[step][name]
            grown, dropped = (after == 1) & (before == 0), (after == 0) & (before == 1)
            assert int(grown.sum()) == int(dropped.sum()), (step, name)
            total += int(grown.sum())
            off = after == 0
            assert torch.all(move["raw"][name][grown] == 0) and torch.all(move["raw"][name][off] == 0)
            assert move["state"][name], "the optimizer has state for the tensor"
            for value in move["state"][name].values():
                assert torch.all(value[grown] == 0) and torch.all(value[off] == 0), (step, name)
        assert regrown[step] == total > 0


# --- 3. RigL grows where the dense gradient is largest -----------------------------------------------


def test_rigl_grows_the_inactive_entries_with_the_largest_dense_gradient_as_autograd_computes_it():
    # 8 steps: stop at 6, one move at step 3 with f = 0.3 * (1 + cos(pi * 3 / 6)) / 2 = 0.15
    sparsifier, probe, _ = fit("dense_gradient", epochs=1, amount=0.7, update_every=3)
    assert [h["step"] for h in sparsifier.history] == [0, 3]
    fraction = sparsifier.history[1]["drop_fraction"]
    assert fraction == pytest.approx(0.15)
    x, y = probe.batches[3]
    params = probe.weights_at_start[3]  # what the net computes with (masked) at the start of step 3
    masks = probe.at_start[3]
    weights = [params[f"{i}.weight"].clone().requires_grad_() for i in (0, 2, 4)]
    h = x
    for i, w in enumerate(weights):
        h = F.linear(h, w, params[f"{2 * i}.bias"])
        h = F.relu(h) if i < 2 else h
    grads = torch.autograd.grad(F.cross_entropy(h, y), weights)
    for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
        name = f"net.{2 * i}.weight"
        active = masks[name].flatten() == 1
        k = round(fraction * int(active.sum()))
        magnitude = w.detach().abs().flatten().masked_fill(~active, math.inf)
        keep = active.clone()
        keep[magnitude.argsort(stable=True)[:k]] = False  # drop: the k smallest |w| among the active
        score = g.abs().flatten().masked_fill(keep, -math.inf)
        grow = score.argsort(descending=True, stable=True)[:k]  # grow: the k largest |dL/dW| among the rest
        assert torch.all(score[grow] > 0)
        keep[grow] = True
        assert torch.equal(probe.moves[3]["masks"][name].flatten() == 1, keep), name


# --- 4. the cosine drop fraction, and nothing after stop_fraction ------------------------------------


def test_drop_fraction_follows_the_cosine_to_zero_and_masks_freeze_at_stop_fraction():
    sparsifier, probe, _ = fit("dense_gradient", epochs=3, stop_fraction=0.5, drop_fraction=0.4)
    stop = 0.5 * 24  # 3 epochs of 8 batches: trainer.estimated_stepping_batches
    steps = [h["step"] for h in sparsifier.history]
    assert steps == [0, 2, 4, 6, 8, 10]
    for h in sparsifier.history:
        assert h["drop_fraction"] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * h["step"] / stop)), abs=1e-12)
    assert all(h["regrown"] > 0 for h in sparsifier.history[1:])
    frozen = probe.moves[10]["masks"]
    for step in range(11, 24):
        for name, mask in probe.at_start[step].items():
            assert torch.equal(mask, frozen[name]), (step, name)
    assert set(probe.moves) == {2, 4, 6, 8, 10}


def test_sparsity_drop_fraction_and_regrown_are_logged_at_epoch_end():
    logged = {}

    class Grab(L.Callback):
        def on_train_end(self, trainer, pl_module):
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    sparsifier, _, _ = fit("random", epochs=2, extra=[Grab()])
    last = sparsifier.history[-1]
    assert logged["sparsity/sparsity"] == pytest.approx(last["sparsity"])
    assert logged["sparsity/drop_fraction"] == pytest.approx(last["drop_fraction"]) and last["drop_fraction"] > 0
    assert logged["sparsity/regrown"] == last["regrown"] > 0


# --- 5. the same masks on every DDP rank -------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning as L
    import torch
    from plugins.core.masks import get_mask
    from plugins.sparsity.dynamic import DynamicSparsifier
    from tests.helpers import Tiny, mlp

    class Dump(L.Callback):
        # after the sparsifier: the masks right after each move, before the next forward (where DDP
        # would broadcast rank 0's buffers over any difference)
        def __init__(self, sparsifier):
            self.sparsifier, self.moves = sparsifier, {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if self.sparsifier.history[-1]["step"] == trainer.global_step:
                targets = self.sparsifier.targets
                self.moves[trainer.global_step] = {t.name: get_mask(t.module, t.tensor_name).mask.clone() for t in targets}

        def on_train_end(self, trainer, pl_module):
            raw = {t.name: t.raw.detach().clone() for t in self.sparsifier.targets}
            state = {"moves": self.moves, "raw": raw, "history": self.sparsifier.history}
            torch.save(state, f"{sys.argv[1]}/rank{trainer.global_rank}.pt")

    L.seed_everything(0)
    sparsifier = DynamicSparsifier(amount=0.8, allocation="erk", update_every=2, grow="GROW")
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[sparsifier, Dump(sparsifier)])
    trainer.fit(Tiny(mlp(8, 32, 32, 3)))
    """
)


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("method", ["rigl", "set"])
def test_masks_are_identical_on_both_ddp_ranks_after_every_move(tmp_path: Path, method: str):
    result = run_script(DDP_SCRIPT.replace("GROW", GROW[method]), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # 4 batches per rank and epoch, 16 steps, stop at 12: the first cut at 0, moves at 2, ..., 10
    assert sorted(ranks[0]["moves"]) == sorted(ranks[1]["moves"]) == [0, 2, 4, 6, 8, 10]
    for step, masks in ranks[0]["moves"].items():
        for name, mask in masks.items():
            assert torch.equal(mask, ranks[1]["moves"][step][name]), (step, name)
    for name, raw in ranks[0]["raw"].items():
        assert torch.equal(raw, ranks[1]["raw"][name]), name
    assert ranks[0]["history"] == ranks[1]["history"]
    assert all(h["regrown"] > 0 for h in ranks[0]["history"][1:])


# --- 6. exact resume after a real stop of train.py ---------------------------------------------------

PLUGINS = {
    "rigl": ["sparsity=rigl", "sparsity.update_every=2"],
    "set": ["sparsity=set", "sparsity.update_every=3", "sparsity.allocation=layer"],
}


def _final_state(run_dir: Path) -> dict:
    """Weights (model.pt, baked), masks and the callback's state (last.ckpt, written before the bake)."""
    model = torch.load(run_dir / "model.pt", weights_only=False).state_dict()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    plugin = {k: v for k, v in ckpt["callbacks"].items() if k.startswith("DynamicSparsifier")}
    masks = {k: v for k, v in ckpt["parametrizations"].items() if k.endswith(".mask")}
    return {"model": model, "masks": masks, "plugin": plugin, "step": ckpt["global_step"]}


def _assert_same(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["masks"] and a["masks"].keys() == b["masks"].keys()
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), name
    assert len(a["plugin"]) == 1 and a["plugin"] == b["plugin"] and a["step"] == b["step"] == EPOCHS * BATCHES


def _uninterrupted(tmp_path: Path, plugins: list[str]) -> dict:
    run_dir = tmp_path / "straight"
    result = run_train_cli([*BASE, *plugins, f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    straight = _final_state(run_dir)
    history = next(iter(straight["plugin"].values()))["history"]
    # 20 steps, stop at 15: moves before the stop and after either stop below
    assert [h["step"] for h in history] == list(range(0, 15, 2 if "sparsity=rigl" in plugins else 3))
    assert all(h["regrown"] > 0 for h in history[1:])
    return straight


def _resume(run_dir: Path, log: Path, plugins: list[str]) -> subprocess.CompletedProcess:
    result = run_train_cli([*BASE, *plugins, _log(log), "ckpt_path=last", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_rigl_stopped_by_sigterm_mid_epoch_resumes_exactly(tmp_path: Path):
    plugins = PLUGINS["rigl"]
    run_dir, first_log, second_log = tmp_path / "run", tmp_path / "first.log", tmp_path / "second.log"
    stop = "+callbacks.stop={_target_: tests.helpers.SignalAtStep, step: 11, signal: SIGTERM}"
    first = run_train_cli([*BASE, *plugins, _log(first_log), stop, f"hydra.run.dir={run_dir}"])
    assert first.returncode == 143, first.stderr[-3000:]
    assert [s for _, s in _steps(first_log)] == list(range(12))
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 12
    history = next(v for k, v in saved["callbacks"].items() if k.startswith("DynamicSparsifier"))["history"]
    assert [h["step"] for h in history] == [0, 2, 4, 6, 8, 10]  # the move of step 12 is still to come

    result = _resume(run_dir, second_log, plugins)
    assert "resuming from epoch 2, step 12" in result.stdout
    assert [s for _, s in _steps(second_log)] == list(range(12, EPOCHS * BATCHES))  # only the rest
    _assert_same(_final_state(run_dir), _uninterrupted(tmp_path, plugins))


@pytest.mark.slow
def test_set_killed_after_an_epoch_checkpoint_resumes_exactly(tmp_path: Path):
    plugins = PLUGINS["set"]
    run_dir, first_log, second_log = tmp_path / "run", tmp_path / "first.log", tmp_path / "second.log"
    last = run_dir / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *BASE, *plugins, _log(first_log, 0.3), f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if last.is_file() and torch.load(last, weights_only=True)["epoch"] >= 1:  # epoch 2 of 4 is saved
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    saved = torch.load(last, weights_only=True)
    assert 2 <= saved["epoch"] + 1 < EPOCHS and not (run_dir / "summary.json").exists()

    _resume(run_dir, second_log, plugins)
    assert [s for _, s in _steps(second_log)] == list(range(saved["global_step"], EPOCHS * BATCHES))
    _assert_same(_final_state(run_dir), _uninterrupted(tmp_path, plugins))


# --- 7. bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"drop_fraction": 0.0}, "sparsity.drop_fraction"),
        ({"drop_fraction": 1.0}, "sparsity.drop_fraction"),
        ({"drop_fraction": float("nan")}, "sparsity.drop_fraction"),
        ({"drop_fraction": True}, "sparsity.drop_fraction"),
        ({"update_every": 0}, "sparsity.update_every"),
        ({"update_every": 2.5}, "sparsity.update_every"),
        ({"amount": 1.0}, "sparsity.amount"),
        ({"amount": float("inf")}, "sparsity.amount"),
        ({"stop_fraction": 0.0}, "sparsity.stop_fraction"),
        ({"stop_fraction": float("nan")}, "sparsity.stop_fraction"),
        ({"allocation": "lamp"}, "sparsity.allocation"),
        ({"allocation": "nope"}, "sparsity.allocation"),
        ({"grow": "nope"}, "sparsity.grow"),
        ({"targets": {"includes": ["*"]}}, "sparsity.targets.includes"),
    ],
)
def test_bad_arguments_are_refused_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        DynamicSparsifier(**kwargs)
    assert err.value.key == key and str(err.value).startswith(f"{key}=")


@pytest.mark.parametrize("grow", ["dense_gradient", "random"])
def test_a_frozen_tensor_is_refused_before_training(grow):
    """A weight grown in a frozen tensor would stay 0: its sparsity would creep above its share
    while the log said the target."""
    module = Tiny()
    module.net[0].weight.requires_grad_(False)
    with pytest.raises(ConfigError, match=r"^sparsity.targets='net.0.weight' is not allowed: tensors that train"):
        quiet_trainer([DynamicSparsifier(grow=grow)], max_epochs=1).fit(module)


class _TwoOptimizers(Tiny):
    """Manual optimization, one optimizer per layer, stepped one after the other."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        for optimizer in self.optimizers():
            optimizer.zero_grad()
            self.manual_backward(F.cross_entropy(self(x), y))
            optimizer.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


def test_manual_optimization_is_refused_before_training():
    batches = []
    sparsifier = DynamicSparsifier(grow="random", update_every=1)
    record = L.pytorch.callbacks.LambdaCallback(on_train_batch_start=lambda *args: batches.append(1))
    with pytest.raises(ConfigError, match=r"^sparsity.grow='random' is not allowed: a LightningModule with automatic"):
        quiet_trainer([sparsifier, record], max_epochs=1).fit(_TwoOptimizers())
    assert batches == []


def test_a_constrained_tensor_is_refused_before_training():
    from plugins.constraints import WeightConstraints

    constraints = WeightConstraints(rules=[{"name": "non_negative", "include": ["net.0.weight"]}])
    sparsifier = DynamicSparsifier(grow="random")
    with pytest.raises(
        ConfigError, match=r"^sparsity.targets='net.0.weight' is not allowed: tensors without a constraint"
    ):
        quiet_trainer([constraints, sparsifier], max_epochs=1).fit(Tiny())


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["sparsity=rigl", "sparsity.drop_fraction=1.5"],
            "sparsity.drop_fraction=1.5 is not allowed: a fraction in (0, 1)",
        ),
        (
            ["sparsity=set", "sparsity.allocation=global"],
            "sparsity.allocation='global' is not allowed: one of layer, erk",
        ),
    ],
)
def test_train_py_refuses_bad_input_in_one_line_with_exit_2(tmp_path: Path, args: list[str], says: str):
    _assert_refused(tmp_path / "run", args, args[-1].partition("=")[0], says)
