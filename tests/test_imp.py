"""IterativeMagnitudePruning (sparsity=imp): each rewind restores the epoch-k weights bit for bit,
each prune takes exactly round(p * remaining), the optimizer starts afresh, a stopped run resumes
exactly through train.py, and bad input is refused naming the key."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from plugins.core.errors import ConfigError
from plugins.core.masks import get_mask
from plugins.sparsity.rewinding import IterativeMagnitudePruning
from tests.conftest import ROOT, run_train_cli
from tests.helpers import Tiny, quiet_trainer, sgd

LAYERS = ("net.0", "net.2")  # Tiny's Linear(8, 32) and Linear(32, 3): 256 and 96 weights
OPTIMIZERS = {"sgd": sgd, "adamw": partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)}


def _fit(imp: IterativeMagnitudePruning, *callbacks: L.Callback, optimizer=sgd) -> Tiny:
    model = Tiny(optimizer=optimizer)
    trainer = quiet_trainer(
        [imp, *callbacks], max_epochs=imp.rounds * imp.epochs_per_round, limit_train_batches=2, deterministic=True
    )
    trainer.fit(model)
    return model


def _tensors(model: Tiny) -> dict[str, torch.Tensor]:
    """Weights and biases as the module computes with them (masked), by plain name."""
    out = {}
    for layer in LAYERS:
        module = model.get_submodule(layer)
        out[f"{layer}.weight"] = module.weight.detach().clone()
        out[f"{layer}.bias"] = module.bias.detach().clone()
    return out


def _masks(model: Tiny) -> dict[str, torch.Tensor]:
    return {f"{layer}.weight": get_mask(model.get_submodule(layer), "weight").mask.clone() for layer in LAYERS}


class Probe(L.Callback):
    """Placed after the IMP callback: what the module holds at the first batch of each round (after
    the prune and the rewind), at the end of the epoch before it, and at the start of epoch k."""

    def __init__(self, imp: IterativeMagnitudePruning) -> None:
        self.imp = imp
        self.at_k: dict[str, torch.Tensor] = {}
        self.before: dict[int, dict] = {}  # round -> state at the end of the previous round
        self.after: dict[int, dict] = {}  # round -> state right after the rewind
        self.second_step: dict[int, list] = {}  # round -> optimizer states at its second batch

    def _state(self, trainer, pl_module) -> dict:
        optimizer = trainer.optimizers[0]
        states = [{k: v.clone() for k, v in optimizer.state.get(p, {}).items()} for p in pl_module.parameters()]
        stored = {f"{n}.weight": pl_module.get_submodule(n).parametrizations.weight.original.clone() for n in LAYERS}
        return {"tensors": _tensors(pl_module), "masks": _masks(pl_module), "optimizer": states, "stored": stored}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.imp.rewind_epoch:
            self.at_k = _tensors(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        epoch = trainer.current_epoch
        if epoch and epoch % self.imp.epochs_per_round == 0:
            if batch_idx == 0:
                self.after[epoch // self.imp.epochs_per_round] = self._state(trainer, pl_module)
            elif batch_idx == 1:
                self.second_step[epoch // self.imp.epochs_per_round] = self._state(trainer, pl_module)["optimizer"]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if (trainer.current_epoch + 1) % self.imp.epochs_per_round == 0:
            self.before[(trainer.current_epoch + 1) // self.imp.epochs_per_round] = self._state(trainer, pl_module)


# --- 1. the rewind ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rewind_epoch", [0, 1])
def test_each_rewind_restores_the_epoch_k_weights_bit_for_bit(rewind_epoch: int):
    imp = IterativeMagnitudePruning(rounds=3, epochs_per_round=2, prune_fraction=0.3, rewind_epoch=rewind_epoch)
    probe = Probe(imp)
    torch.manual_seed(0)
    model = Tiny()
    initial = _tensors(model)
    quiet_trainer([imp, probe], max_epochs=6, limit_train_batches=2, deterministic=True).fit(model)

    expected = initial if rewind_epoch == 0 else probe.at_k
    if rewind_epoch == 0:
        assert all(torch.equal(probe.at_k[n], initial[n]) for n in initial)
    else:  # late rewinding: epoch 1 starts from trained weights, not the initial ones
        assert not torch.equal(probe.at_k["net.0.weight"], initial["net.0.weight"])
    assert sorted(probe.after) == [1, 2]
    for r, state in probe.after.items():
        for name, value in state["tensors"].items():
            assert not torch.equal(probe.before[r]["tensors"][name], expected[name])  # training had moved it
            keep = state["masks"][name] != 0 if name in state["masks"] else torch.ones_like(value, dtype=torch.bool)
            assert torch.equal(value[keep], expected[name][keep]), (r, name)  # survivors: the epoch-k values
            assert (value[~keep] == 0).all() and (~keep).any() == (name in state["masks"]), (r, name)
        for name, stored in state["stored"].items():  # also as stored: nothing under a mask comes back
            assert torch.equal(stored, state["tensors"][name]), (r, name)
    # What the callback stored (and checkpoints) is that same state.
    stored = {n.replace(".parametrizations.weight.original", ".weight"): t for n, t in imp.snapshot.items()}
    assert all(torch.equal(stored[n], expected[n]) for n in expected)


# --- 2. exact compounded counts --------------------------------------------------------------------


def _compounded(p: float, n: int, prunes: int) -> list[int]:
    pruned, out = 0, []
    for _ in range(prunes):
        pruned += round(p * (n - pruned))
        out.append(pruned)
    return out


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_each_round_prunes_round_p_of_the_remaining_exactly(scope: str):
    p, rounds = 0.2, 4  # 0.2 compounded differs from round(0.2 * 96) and from round((1 - 0.8^r) * n)
    imp = IterativeMagnitudePruning(rounds=rounds, epochs_per_round=1, prune_fraction=p, scope=scope)
    probe = Probe(imp)
    _fit(imp, probe)
    zeros = {r: {n: int((m == 0).sum()) for n, m in s["masks"].items()} for r, s in probe.after.items()}
    weights = {r: {n: int((s["tensors"][n] == 0).sum()) for n in s["masks"]} for r, s in probe.after.items()}
    assert weights == zeros  # the masked entries, and no other, are zero
    sizes = {"net.0.weight": 256, "net.2.weight": 96}
    if scope == "layer":
        expected = {n: _compounded(p, size, rounds - 1) for n, size in sizes.items()}
        assert {n: [zeros[r][n] for r in (1, 2, 3)] for n in sizes} == expected
        assert expected["net.2.weight"] != [round((1 - (1 - p) ** r) * 96) for r in (1, 2, 3)]
    else:
        assert [sum(zeros[r].values()) for r in (1, 2, 3)] == _compounded(p, 352, rounds - 1)
        assert zeros[3]["net.0.weight"] / 256 != zeros[3]["net.2.weight"] / 96  # one cut, not per tensor
    assert imp.round == rounds - 1 and [h["round"] for h in imp.history] == [1.0, 2.0, 3.0]


# --- 3. the optimizer starts afresh -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_rewind_clears_the_optimizer_state(name: str):
    imp = IterativeMagnitudePruning(rounds=3, epochs_per_round=2, prune_fraction=0.3, rewind_epoch=1)
    probe = Probe(imp)
    _fit(imp, probe, optimizer=OPTIMIZERS[name])
    for r in (1, 2):
        before = probe.before[r]["optimizer"]
        assert all(any(torch.is_tensor(v) and v.abs().sum() > 0 for v in s.values()) for s in before)
        for state in probe.after[r]["optimizer"]:  # every parameter: selected or not, all were rewound
            assert all(not torch.is_tensor(v) or v.abs().sum() == 0 for v in state.values()), state
        if name == "adamw":  # a fresh start: the bias correction counts from the rewind
            assert [int(s["step"]) for s in probe.second_step[r]] == [1] * 4


# --- 4. resume exactly through train.py --------------------------------------------------------

ROUNDS, EPOCHS_PER_ROUND, BATCHES = 3, 2, 4
EPOCHS = ROUNDS * EPOCHS_PER_ROUND
BASE = [
    "+experiment=digits_imp",
    f"sparsity.rounds={ROUNDS}",
    f"sparsity.epochs_per_round={EPOCHS_PER_ROUND}",
    "sparsity.rewind_epoch=1",  # snapshot at step 4, prunes and rewinds at steps 8 and 16
    f"trainer.max_epochs={EPOCHS}",
    f"trainer.limit_train_batches={BATCHES}",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
    "logger=csv",
]
_straight: dict[str, dict] = {}


def _log(path: Path, sleep: float = 0.0) -> str:
    return f"+callbacks.steps={{_target_: tests.helpers.StepLog, path: '{path}', sleep: {sleep}}}"


def _steps(path: Path) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split())) for line in path.read_text().split("\n") if line]


def _final_state(run_dir: Path) -> dict:
    """Weights (model.pt), masks (last.ckpt, written before the bake) and the callback's state."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    (imp,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("IterativeMagnitudePruning")]
    model = torch.load(run_dir / "model.pt", weights_only=False).state_dict()
    return {"model": model, "raw": ckpt["parametrizations"], "imp": imp, "step": ckpt["global_step"]}


def _assert_same(a: dict, b: dict) -> None:
    for part in ("model", "raw"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][n], b[part][n]) for n in a[part]), part
    assert any(k.endswith(".mask") for k in a["raw"]) and a["step"] == b["step"] == EPOCHS * BATCHES
    snapshot = a["imp"].pop("snapshot")
    assert snapshot.keys() == b["imp"]["snapshot"].keys()
    assert all(torch.equal(snapshot[n], b["imp"]["snapshot"][n]) for n in snapshot)
    a["imp"]["snapshot"] = snapshot
    assert {k: v for k, v in a["imp"].items() if k != "snapshot"} == {k: v for k, v in b["imp"].items() if k != "snapshot"}
    assert a["imp"]["round"] == ROUNDS - 1 and len(a["imp"]["history"]) == ROUNDS - 1


def _uninterrupted(tmp_path_factory) -> dict:
    if "run" not in _straight:
        run_dir = tmp_path_factory.mktemp("straight") / "run"
        result = run_train_cli([*BASE, f"hydra.run.dir={run_dir}"])
        assert result.returncode == 0, result.stderr[-3000:]
        _straight["run"] = _final_state(run_dir)
    return _straight["run"]


def _resume(run_dir: Path, log: Path) -> subprocess.CompletedProcess:
    result = run_train_cli([*BASE, _log(log), "ckpt_path=last", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_sigterm_after_the_snapshot_before_the_first_rewind_resumes_exactly(tmp_path: Path, tmp_path_factory):
    run_dir, first_log, second_log = tmp_path / "run", tmp_path / "first.log", tmp_path / "second.log"
    stop = "+callbacks.stop={_target_: tests.helpers.SignalAtStep, step: 6, signal: SIGTERM}"  # epoch 1
    first = run_train_cli([*BASE, _log(first_log), stop, f"hydra.run.dir={run_dir}"])
    assert first.returncode == 143, first.stderr[-3000:]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("IterativeMagnitudePruning")]
    assert saved["global_step"] == 7 and state["snapshot"] is not None and state["round"] == 0

    result = _resume(run_dir, second_log)
    assert "resuming from epoch 1, step 7" in result.stdout
    assert [s for _, s in _steps(second_log)] == list(range(7, EPOCHS * BATCHES))  # only the rest
    _assert_same(_final_state(run_dir), _uninterrupted(tmp_path_factory))


@pytest.mark.slow
def test_sigkill_in_a_later_round_resumes_the_remaining_epochs_exactly(tmp_path: Path, tmp_path_factory):
    run_dir, first_log, second_log = tmp_path / "run", tmp_path / "first.log", tmp_path / "second.log"
    last = run_dir / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *BASE, _log(first_log, 0.25), f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if last.is_file() and torch.load(last, weights_only=True)["epoch"] >= 2:  # round 1, after a rewind
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    saved = torch.load(last, weights_only=True)
    done = saved["epoch"] + 1
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("IterativeMagnitudePruning")]
    assert 3 <= done < EPOCHS and state["round"] >= 1 and not (run_dir / "summary.json").exists()

    _resume(run_dir, second_log)
    ran = _steps(second_log)
    assert sorted({e for e, _ in ran}) == list(range(done, EPOCHS))  # only the remaining epochs
    assert [s for _, s in ran] == list(range(saved["global_step"], EPOCHS * BATCHES))
    _assert_same(_final_state(run_dir), _uninterrupted(tmp_path_factory))


# --- 5. bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,key",
    [
        *[({"prune_fraction": v}, "sparsity.prune_fraction") for v in (0, 1, 1.5, -0.2, float("nan"), float("inf"), True)],
        *[({"rewind_epoch": v}, "sparsity.rewind_epoch") for v in (4, 7, -1, 0.5, None)],  # epochs_per_round=4
        *[({"rounds": v}, "sparsity.rounds") for v in (0, -2, 2.0, float("nan"))],
        ({"epochs_per_round": 0}, "sparsity.epochs_per_round"),
        ({"epochs_per_round": 2, "rewind_epoch": 2}, "sparsity.rewind_epoch"),
        ({"scope": "erk"}, "sparsity.scope"),
        ({"targets": {"includes": ["*"]}}, "sparsity.targets.includes"),
        ({"bake_at_end": "yes"}, "sparsity.bake_at_end"),
    ],
)
def test_bad_arguments_are_refused_naming_the_key(kwargs: dict, key: str):
    with pytest.raises(ConfigError) as err:
        IterativeMagnitudePruning(**kwargs)
    assert err.value.key == key and str(err.value).startswith(f"{key}=")


@pytest.mark.parametrize(
    "kwargs,max_epochs,key",
    [
        ({"rounds": 3, "epochs_per_round": 2}, 5, "trainer.max_epochs"),  # the rounds must fill the run
        ({"rounds": 4, "epochs_per_round": 1, "prune_fraction": 0.9}, 4, "sparsity.rounds"),  # 256 -> 26 -> 3 -> 0
    ],
)
def test_rounds_that_do_not_fit_the_run_or_the_tensors_are_refused_before_training(kwargs, max_epochs, key):
    imp = IterativeMagnitudePruning(**kwargs)
    model = Tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError) as err:
        quiet_trainer([imp], max_epochs=max_epochs, limit_train_batches=2).fit(model)
    assert err.value.key == key
    assert all(torch.equal(p, before[n.replace(".parametrizations.weight.original", ".weight")]) for n, p in model.named_parameters())


def test_a_checkpoint_of_other_rounds_is_refused():
    saved = IterativeMagnitudePruning(prune_fraction=0.2).state_dict()
    with pytest.raises(ConfigError) as err:
        IterativeMagnitudePruning(prune_fraction=0.3).load_state_dict(saved)
    assert err.value.key == "sparsity.prune_fraction" and "0.2, as in the checkpoint" in str(err.value)


@pytest.mark.parametrize(
    "args,says",
    [
        (["sparsity.rewind_epoch=4"], "sparsity.rewind_epoch=4 is not allowed: an epoch in [0, sparsity.epochs_per_round=4)"),
        (["trainer.max_epochs=3"], "trainer.max_epochs=3 is not allowed: 20 = sparsity.rounds (5) x sparsity.epochs_per_round (4)"),
    ],
    ids=["rewind_epoch", "max_epochs"],
)
def test_command_line_mistake_exits_2_with_one_line(tmp_path: Path, args: list[str], says: str):
    run_dir = tmp_path / "run"
    fast = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.accelerator=cpu"]
    result = run_train_cli(["sparsity=imp", *fast, *args, f"hydra.run.dir={run_dir}"], timeout=180)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert "Traceback" not in result.stderr
    assert not [p for p in run_dir.rglob("*") if p.name in ("summary.json", "model.pt") or p.suffix == ".ckpt"]
