"""Every mistake a user can type, refused the same way: exit status 2, one line on stderr that starts
``error:`` and names the key as the user typed it, no traceback, and nothing a run writes (no
``summary.json``, ``model.pt``, ``model.pt2`` or checkpoint) left in the run folder.

Each group below is a list of user mistakes. The rules behind them are general (runner/validation.py
and each plugin's own checks), so a mistake not listed here is refused the same way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch

from models import Classifier, DigitsCNN, ResNet1d
from plugins import ConfigError, HardshrinkSparsifier, NormFactory, StructuredPruning, WeightConstraints
from runner.command_line import check_command_line
from tests.conftest import CONF, FAST, compose_config, run_train_cli

# FAST with two epochs, so that the plugins' default windows (from epoch 1) start within the run.
SHORT = [*FAST, "trainer.max_epochs=2"]
UCR = ["+experiment=ucr_baseline"]
OUTPUTS = ("summary.json", "model.pt", "model.pt2")


def mistake(*args: str, key: str | None = None, says: str = "", skip: str | None = None):
    """One command line mistake: ``key`` is the key as typed (default: the last argument's), and
    ``says`` a part of the one line that must be printed."""
    key = key or args[-1].partition("=")[0].lstrip("+~")
    marks = [pytest.mark.skipif(True, reason=skip)] if skip else []
    return pytest.param(list(args), key, says, id=" ".join(args), marks=marks)


def _assert_refused(
    run_dir: Path, args: list[str], key: str, says: str = "", folder_args: list[str] | None = None
) -> str:
    """Run ``train.py`` as a user types it and check the refusal; returns the line."""
    if folder_args is None:
        folder_args = [f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={run_dir}"]
    flags = [a for a in args if a.startswith("-")]  # Hydra reads its flags (-m) before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    result = run_train_cli([*flags, *SHORT, *overrides, *folder_args], timeout=180)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    shown = result.stderr[-3000:]
    assert result.returncode == 2, f"exit {result.returncode}\n{shown}"
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert key in lines[0], f"the key {key!r} is not named: {lines[0]}"
    assert says in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    if run_dir.is_dir():
        left = [p for p in run_dir.rglob("*") if p.name in OUTPUTS or p.suffix == ".ckpt"]
        assert not left, f"left behind: {left}"
    return lines[0]


# --- NaN and Inf are values too: every number anywhere in the config is finite ---------------------

NAN_AND_INF = [
    mistake("module.lr=inf", says="module.lr=inf is not allowed: a finite number"),
    mistake("module.weight_decay=-inf", says="module.weight_decay=-inf"),
    mistake("norm.eps=nan", says="norm.eps=nan is not allowed: a finite number"),
    mistake("norm=group", "norm.eps=inf", says="norm.eps=inf"),
    mistake("data.random_gain=nan", says="data.random_gain=nan"),
    mistake(*UCR, "data.random_gain=inf", says="data.random_gain=inf"),
    mistake("model.dropout=nan", says="model.dropout=nan"),
    mistake("model.widths=[32,nan,128]", key="model.widths.1", says="model.widths.1=nan"),
    mistake("sparsity=hardshrink", "sparsity.schedule.end=nan", says="sparsity.schedule.end=nan"),
    mistake("pruning=l1", "pruning.schedule.end=nan", says="pruning.schedule.end=nan"),
    mistake("constraints=learned_mask", "constraints.rules.0.args.temperature=nan", says="temperature=nan"),
    mistake("constraints=orthogonal", "constraints.rules.0.args.tol=nan", says="tol=nan"),
    mistake("trainer.limit_train_batches=nan", says="trainer.limit_train_batches=nan"),
    mistake("+trainer.gradient_clip_val=inf", says="trainer.gradient_clip_val=inf"),
    mistake("seed=1e309", says="seed=1e309 is not allowed: a finite number"),  # as typed, though read as inf
]

# --- a boolean is true or false ---------------------------------------------------------------------

BOOLEANS = [
    mistake("norm.affine=maybe", says="norm.affine='maybe'"),
    mistake("norm.track_running_stats=maybe", says="norm.track_running_stats='maybe'"),
    mistake("pruning=l1", "pruning.compact=maybe", says="pruning.compact='maybe'"),
    mistake("pruning=l1", "pruning.couple=1", says="pruning.couple=1"),
    mistake("sparsity=gmp", "sparsity.regrow=maybe", says="sparsity.regrow='maybe'"),
    mistake("trainer.deterministic=maybe", says="trainer.deterministic='maybe'"),
    mistake(*UCR, "data.znorm=maybe", says="data.znorm='maybe'"),
    mistake(*UCR, "data.length=4", says="data.length=4"),
    mistake(*UCR, "data.length=1e3", says="data.length=1e3"),
    mistake("constraints=orthogonal", "constraints.bake_at_end=maybe", says="constraints.bake_at_end='maybe'"),
    mistake("constraints=learned_mask", "constraints.rules.0.allow_masked=maybe", says="allow_masked='maybe'"),
    mistake("logger=tensorboard", "logger.tensorboard.default_hp_metric=maybe", says="default_hp_metric='maybe'"),
]

# --- an unknown key, with or without +, names the closest valid one; a needed key stays ------------

UNKNOWN_KEYS = [
    mistake("+foo=1", says="foo=1 is not allowed: a key of the config"),
    mistake("foo=1", says="foo=1 is not allowed: a key of the config"),
    mistake("+trainer.bogus=1", says="closest: trainer."),
    mistake("trainer.max_epoch=3", says="closest: trainer.max_epochs"),
    mistake("trainer.gradient_clip_val=1", says="+trainer.gradient_clip_val"),
    mistake("sparsity=gmp", "sparsity.typo=1", says="closest: sparsity."),
    mistake("sparsity=gmp", "+sparsity.typo=1", says="closest: sparsity."),
    mistake("+sparsity.typo=1", says="choose sparsity="),
    mistake("imports=nonexistent_mod", says="imports='nonexistent_mod' is not allowed: a list of importable module names"),
    mistake("module.lr=${nothere}", says="module.lr='${nothere}' is not allowed: an interpolation to a key of the config"),
    # a key under a plugin left off: the whole key as typed, not the first part that is missing
    mistake("sparsity.schedule.end=0.5", says="sparsity.schedule.end=0.5 is not allowed: a key of sparsity, which has no keys"),
    mistake("constraints.rules.0.name=max_norm", says="constraints.rules.0.name='max_norm' is not allowed: a key of constraints"),
    mistake("sparsity=gmp", "+sparsity.schedule.begin=1", says="closest: sparsity.schedule.begin_epoch"),
    mistake("sparsity=gmp", "+sparsity.targets.includes=[x]", says="include"),
    mistake("pruning=l1", "+pruning.amountt=0.5", says="closest: pruning.amount"),
    mistake("+model.depth=3", says="closest: model."),
    mistake("+data.batchsize=8", says="closest: data.batch_size"),
    mistake("+norm.momentum=0.1", says="closest: norm."),
    mistake("constraints=non_negative", "+constraints.rules.0.args.betta=2", says="beta"),
    mistake("+callbacks.stop=1", says="callbacks.stop=1 is not allowed"),
    mistake("hydra.foo=1", says="hydra.foo=1 is not allowed"),
    mistake("~norm", says="norm=None is not allowed: a norm config"),
    mistake("~seed", says="seed=None is not allowed"),
]

# --- Hydra's and Lightning's own errors, as one line naming the key typed ---------------------------

OPTUNA = ["-m", "hparams_search=optuna_sparsity"]

# --- a sweeper's search space: every bound checked before the first trial draws it ------------------

SEARCH_SPACE = [
    mistake(*OPTUNA, "hydra.sweeper.n_trials=0", says="hydra.sweeper.n_trials=0 is not allowed: a whole number >= 1"),
    mistake(*OPTUNA, "hydra.sweeper.direction=up", says="hydra.sweeper.direction='up' is not allowed: minimize or maximize"),
    mistake(
        *OPTUNA, '++hydra.sweeper.params={sparsity.schedule.end: "interval(0.3, 1.5)"}', key="sparsity.schedule.end",
        says="sparsity.schedule.end=1.5 is not allowed: a fraction of zeros in [0, 1)",
    ),
    mistake(*OPTUNA, '++hydra.sweeper.params={module.lr: "choice(0.01, -0.1)"}', key="module.lr", says="module.lr=-0.1"),
    mistake(*OPTUNA, '++hydra.sweeper.params={model.dropout: "range(0, 3)"}', key="model.dropout", says="model.dropout=1"),
    mistake(*OPTUNA, "hydra.sweeper.params.module.lr=choice(0.1,0.2)", says="a search space given as one mapping"),
    mistake(*OPTUNA, "hydra.sweeper.params.module.lr=interval(0.1,0.2)", says="a search space given as one mapping"),
    mistake(*OPTUNA, "hydra.sweeper.n_trials=2,3", says="hydra.sweeper.n_trials='2,3' is not allowed: one value"),
]

HYDRA_AND_LIGHTNING = [
    mistake("norm=banana", says="norm='banana' is not allowed: one of batch"),
    mistake("+experiment=nope", says="experiment='nope' is not allowed"),
    mistake("logger=splunk", says="logger='splunk' is not allowed"),
    mistake("logger=null", says="is not allowed: one of csv, many, tensorboard, wandb (~logger"),  # named "overrides" before
    mistake("trainer=tpu", says="trainer='tpu' is not allowed: one of cpu"),
    mistake("hydra/launcher=nope", says="hydra/launcher='nope' is not allowed: one of basic"),
    mistake("hydra/sweeper=nope", says="hydra/sweeper='nope' is not allowed: one of basic"),
    mistake("trainer.max_epochs==", says="trainer.max_epochs"),
    mistake("norm.eps=[1e-5", says="norm.eps"),
    mistake("norm.eps=1e-5,1e-3", says="add -m to sweep"),
    mistake("trainer.accelerator=tpu2", says="trainer.accelerator='tpu2'"),
    mistake(
        "trainer.accelerator=gpu",
        says="trainer.accelerator='gpu'",
        skip="this machine has a GPU" if torch.cuda.is_available() else None,
    ),
    mistake("trainer.devices=0", says="trainer.devices=0"),
    mistake("trainer.devices=-5", says="trainer.devices=-5"),
    mistake("+trainer.strategy=nope", says="trainer.strategy='nope'"),
    mistake("+trainer.precision=99", says="trainer.precision=99 is not allowed: one of 64, 32, 16"),
    mistake("trainer.max_epochs=0", says="trainer.max_epochs=0"),
    mistake("trainer.log_every_n_steps=0", says="trainer.log_every_n_steps=0"),
    mistake("trainer.limit_test_batches=0", says="trainer.limit_test_batches=0"),
    mistake("trainer.limit_train_batches=0", says="trainer.limit_train_batches=0 is not allowed: a count or fraction > 0"),
    # Fractions that round to no batch: Lightning would find out at that loop (the test one after training).
    mistake("trainer.limit_test_batches=0.001", says="a fraction that leaves at least one of the 5 test batches"),
    mistake("trainer.limit_train_batches=0.0001", says="trainer.limit_train_batches=0.0001"),
    mistake("task_name=", says="task_name='' is not allowed: a non-empty name"),
    # One file name holds at most 255 bytes: a longer task_name was an OSError naming hydra.run.dir.
    mistake("task_name=" + "a" * 256, says="a non-empty name of at most 255 bytes"),
    # The user's own callbacks are built before anything is written (a Hydra error with exit 1 before).
    mistake("+callbacks.stop={_target_: nope.Nope}", says="callbacks.stop._target_='nope.Nope' is not allowed"),
    # A _target_ that cannot be imported, anywhere: Hydra's error and exit 1 before.
    mistake("sparsity=hardshrink", "sparsity._target_=plugins.sparsity.Nope", says="an importable class or function"),
    mistake("+callbacks.stop={_target_: torch.nn.Identity}", says="the class of a Lightning Callback"),
    mistake("+callbacks.stop=5", says="a callback config with _target_"),
    mistake(
        "+callbacks.stop={_target_: lightning.pytorch.callbacks.EarlyStopping, monitor: val/acc, mode: up}",
        says="`mode` can be min, max, got up",
    ),
    mistake("tags=5", says="tags=5 is not allowed: a list of words"),
    mistake("-m", "module.lr=0.001,nan", says="module.lr=nan"),
    mistake("-m", "norm=batch,banana", key="norm", says="norm='banana'"),
]

# --- wrong types and out-of-range values (each object checks its own arguments) --------------------

VALUES = [
    mistake("data.batch_size=abc", says="data.batch_size='abc'"),
    mistake("module.lr=fast", says="module.lr='fast'"),
    mistake("seed=-3", says="seed=-3"),
    mistake("seed=4294967296", says="seed=4294967296 is not allowed: an integer in [0, 4294967295]"),
    mistake("-m", "seed=0,4294967296", key="seed", says="seed=4294967296"),  # refused before job 0 trains
    # A value only the module's constructor refuses: the sweep stops before its first job trains.
    mistake("-m", "module.lr=0.01,-0.1", key="module.lr", says="module.lr=-0.1 is not allowed: a finite number > 0"),
    mistake("-m", "model.dropout=0.1,1.5", key="model.dropout", says="model.dropout=1.5"),
    mistake("data.batch_size=0", says="data.batch_size=0"),
    mistake("model=resnet1d", says="model=resnet1d is not allowed: a model that takes the batches of models.DigitsDataModule"),
    mistake("data.denoise_lambda=-0.1", says="data.denoise_lambda=-0.1"),
    mistake("data.random_gain=0.5", says="data.random_gain=0.5"),
    mistake("module.lr=-1", says="module.lr=-1"),
    mistake("model.dropout=1.5", says="model.dropout=1.5"),
    mistake("model.widths=[32,64]", says="model.widths=[32,64] is not allowed"),  # the value as typed
    mistake("model.widths=abc", says="model.widths='abc' is not allowed: a list of 3 positive integers"),
    mistake("model.widths=5", says="model.widths=5 is not allowed: a list of 3 positive integers"),
    mistake("model.widths=null", says="model.widths=null is not allowed: a list of 3 positive integers"),
    mistake("model=resnet1d", "model.kernels=3", says="model.kernels=3 is not allowed: a non-empty list"),
    mistake(*UCR, "data.name=Wafer", says="data.name='Wafer' is not allowed: one of the bundled sets"),
    mistake("norm=group", "norm.num_groups=5", says="norm.num_groups=5 is not allowed: a divisor of the 32 channels"),
]

# --- sparsity, structured pruning and constraints ---------------------------------------------------

PLUGINS = [
    mistake("sparsity=hardshrink", "sparsity.schedule.end=-0.1", says="sparsity.schedule.end=-0.1 is not allowed: a lambda >= 0"),
    mistake("sparsity=gmp", "sparsity.schedule.end=1.0", says="sparsity.schedule.end=1.0 is not allowed: a fraction of zeros in [0, 1)"),
    mistake("sparsity=gmp", "sparsity.schedule.begin_epoch=5", "sparsity.schedule.end_epoch=2", says="sparsity.schedule.end_epoch=2"),
    mistake("sparsity=gmp", "sparsity.targets.include=[nomatch*]", says="sparsity.targets.include='nomatch*'"),
    mistake("sparsity=gmp", "sparsity.mode=fast", says="sparsity.mode='fast' is not allowed: one of threshold, sparsity"),
    mistake("sparsity=gmp", "sparsity.schedule.every_n_steps=0", says="sparsity.schedule.every_n_steps=0"),
    mistake("pruning=l1", "pruning.schedule.end=1.5", says="pruning.schedule.end=1.5 is not allowed: a fraction in [0, 1]"),
    mistake(
        "pruning=l1", "pruning.schedule.end=1.0", "pruning.schedule.begin_epoch=0", "pruning.schedule.end_epoch=0",
        key="pruning.schedule.end", says="an amount that leaves at least one of the",
    ),
    mistake("pruning=l1", "pruning.method=magic", says="pruning.method='magic' is not allowed: one of the registered pruning criterions: bn_scale, dense_gradient, fpgm, l1, l2, random, taylor"),
    mistake("pruning=l1", "pruning.include=[nomatch*]", says="pruning.include='nomatch*'"),
    mistake("pruning=l1", "pruning.include=[]", says="pruning.include=[] is not allowed: a non-empty list of globs"),
    mistake(
        "constraints=non_negative", "constraints.rules.0.name=positive",
        says="constraints.rules.0.name='positive' is not allowed: one of the registered constraints",
    ),
    mistake("constraints=non_negative", "constraints.rules.0.include=[nomatch*]", says="constraints.rules.0.include='nomatch*'"),
    mistake(
        "constraints=learned_mask", "constraints.rules.0.args.init=1.5",
        says="constraints.rules.0.args.init=1.5 is not allowed: a gate value in (0.5, 1)",
    ),
    mistake(
        "constraints=orthogonal", "pruning=l1",
        key="constraints.rules.0.allow_masked", says="constraints.rules.0.allow_masked=False is not allowed",
    ),
]

# --- a schedule that cannot act: a window after the last epoch, a lambda above every weight --------

SCHEDULES = [
    mistake(
        "sparsity=gmp", "trainer.max_epochs=20", "sparsity.schedule.end_epoch=40", "sparsity.schedule.begin_epoch=30",
        says="sparsity.schedule.begin_epoch=30 is not allowed: an epoch before trainer.max_epochs=20",
    ),
    mistake(
        "pruning=l1", "trainer.max_epochs=20", "pruning.schedule.end_epoch=40", "pruning.schedule.begin_epoch=30",
        says="pruning.schedule.begin_epoch=30 is not allowed: an epoch before trainer.max_epochs=20",
    ),
    mistake("pruning=random", "pruning.schedule.begin_epoch=2", says="trainer.max_epochs=2"),
    mistake("+experiment=digits_gmp90", key="sparsity.schedule.begin_epoch", says="trainer.max_epochs=2"),
    mistake("sparsity=hardshrink", "sparsity.schedule.end=100", says="sparsity.schedule.end=100 is not allowed: a lambda below the largest |w|"),
    mistake(
        "sparsity=hardshrink", "sparsity.schedule.kind=constant", "sparsity.schedule.end=5",
        says="largest |w| of the selected weights",
    ),
]

# --- dim: out of range for a tensor, or an alias that is not one axis ------------------------------

DIMS = [
    mistake("pruning=l1", "pruning.dim=7", says="pruning.dim=7 is not allowed: a dimension of net.features.0.0.weight"),
    mistake("pruning=l1", "pruning.dim=-5", says="pruning.dim=-5 is not allowed: a dimension of net.features.0.0.weight"),
    mistake("pruning=l1", "pruning.dim=4", says="pruning.dim=4"),
    mistake("pruning=l1", "pruning.dim=1.5", says="pruning.dim=1.5"),
    mistake(
        "pruning=l1", "pruning.dim=-2", "pruning.exclude=[]",
        key="pruning.dim", says="pruning.dim=-2 is not allowed: one axis of every selected tensor",
    ),
]

# --- optimized_metric names a number every run writes to summary.json ------------------------------

OPTIMIZED_METRIC = [
    mistake("optimized_metric=val/accuracy", says="closest: val/acc"),
    mistake("optimized_metric=norm", says="optimized_metric='norm'"),
    mistake("sparsity=gmp", "optimized_metric=sparsity/sparsty", says="sparsity/selected"),
    mistake("hparams_search=optuna_sparsity", "optimized_metric=val/acuracy", says="closest: val/acc"),
    mistake("trainer.limit_val_batches=0", says="optimized_metric='val/acc' is not allowed"),
    mistake("+trainer.max_steps=0", says="trainer.max_steps=0 is not allowed: -1 (no limit: max_epochs decides) or a count >= 1"),
    # ModelCheckpoint would find out after the first epoch, with checkpoints written.
    mistake("checkpoint.monitor=val/accc", says="checkpoint.monitor='val/accc' is not allowed: a metric logged during fit (closest: val/acc)"),
    mistake("checkpoint.monitor=test/acc", says="checkpoint.monitor='test/acc'"),
]

COMMAND_LINE = SEARCH_SPACE + NAN_AND_INF + BOOLEANS + UNKNOWN_KEYS + HYDRA_AND_LIGHTNING + VALUES + PLUGINS + SCHEDULES + DIMS + OPTIMIZED_METRIC


@pytest.mark.parametrize("args,key,says", COMMAND_LINE)
def test_command_line_mistake(tmp_path: Path, args: list[str], key: str, says: str):
    _assert_refused(tmp_path / "run", args, key, says)


@pytest.mark.parametrize("metric", ["train/acc", "test/f1", "params/nonzero"])
def test_any_number_summary_json_holds_is_an_optimized_metric(metric):
    """train/acc is the last training epoch's, which summary.json holds (it was refused)."""
    from runner.validation import check_optimized_metric

    check_optimized_metric(compose_config([f"optimized_metric={metric}"]))


def test_a_search_space_drawing_only_allowed_values_passes_the_check(tmp_path: Path, monkeypatch):
    """A fraction's interval(0.3, 1.0) is checked just inside its upper end, which the sampler
    never reaches: no refusal of a space every trial can run."""
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # as before Hydra runs (compose_config sets it)
    space = '{sparsity.schedule.end: "interval(0.3, 1.0)", module.lr: "tag(log, interval(0.0003, 0.01))"}'
    check_command_line([*OPTUNA, f"++hydra.sweeper.params={space}", f"hydra.sweep.dir={tmp_path}"], CONF)


# --- checkpoints: missing, unreadable, of another model, of another plugin set ---------------------


def _lightning_checkpoint(path: Path, module: L.LightningModule, callbacks: dict | None = None) -> str:
    """A file shaped like a Lightning checkpoint of a freshly built ``module`` (no training)."""
    torch.save(
        {
            "epoch": 3,
            "global_step": 30,
            "pytorch-lightning_version": L.__version__,
            "state_dict": module.state_dict(),
            "loops": {},
            "callbacks": callbacks or {},
            "optimizer_states": [],
            "lr_schedulers": [],
        },
        path,
    )
    return str(path)


def _digits_module(widths=(32, 64, 128)) -> Classifier:
    return Classifier(DigitsCNN(in_channels=1, num_classes=10, widths=widths, norm=NormFactory("batch")), num_classes=10)


def _plugin_state(overrides: list[str], group: str) -> dict:
    plugin = hydra.utils.instantiate(compose_config(overrides)[group], _convert_="all")
    return {plugin.state_key: {"last_step": -1, "history": []}}


def test_checkpoint_that_does_not_exist(tmp_path: Path):
    _assert_refused(tmp_path / "run", ["ckpt_path=/no/such/file.ckpt"], "ckpt_path", "ckpt_path='/no/such/file.ckpt'")


def test_checkpoint_that_is_not_one(tmp_path: Path):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"this is not a checkpoint")
    _assert_refused(tmp_path / "run", [f"ckpt_path={path}"], "ckpt_path", "a readable Lightning checkpoint")


def test_checkpoint_without_a_state_dict(tmp_path: Path):
    path = tmp_path / "weights.ckpt"
    torch.save({"weights": torch.zeros(3)}, path)
    _assert_refused(tmp_path / "run", [f"ckpt_path={path}"], "ckpt_path", "a Lightning checkpoint (a dict with a state_dict)")


def test_checkpoint_of_another_model(tmp_path: Path):
    """A checkpoint of ``+experiment=ucr_baseline`` (ResNet1d) given to the digits run."""
    other = Classifier(ResNet1d(in_channels=1, num_classes=2, norm=NormFactory("batch")), num_classes=2)
    path = _lightning_checkpoint(tmp_path / "ucr.ckpt", other)
    line = _assert_refused(tmp_path / "run", [f"ckpt_path={path}"], "ckpt_path", "tensors differ: ")
    assert line.count("not in the") >= 3 and "net.features.0.0.weight" in line, line


def test_checkpoint_of_the_same_model_with_other_widths(tmp_path: Path):
    path = _lightning_checkpoint(tmp_path / "narrow.ckpt", _digits_module(widths=(16, 32, 64)))
    line = _assert_refused(tmp_path / "run", [f"ckpt_path={path}"], "ckpt_path", "tensors differ: ")
    assert "net.features.0.0.weight (checkpoint (16, 1, 3, 3) vs model (32, 1, 3, 3))" in line, line


def test_a_value_only_a_constructor_refuses_writes_nothing_in_the_run_folder(tmp_path: Path):
    """Refused before Hydra writes the run's .hydra/config.yaml (which overwrote a finished run's
    record of its overrides)."""
    _assert_refused(tmp_path / "run", ["data.batch_size=0"], "data.batch_size", "data.batch_size=0")
    assert not (tmp_path / "run" / ".hydra").exists()


def test_a_resume_with_another_max_epochs_is_refused(tmp_path: Path):
    """Its cosine learning rate would resume with the old span: epoch 2 of a 1-epoch schedule
    trained at a learning rate of 0, silently."""
    assert run_train_cli([*SHORT, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'first'}"], timeout=300).returncode == 0
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    _assert_refused(
        tmp_path / "run", [f"ckpt_path={last}"], "trainer.max_epochs", "trainer.max_epochs=2 is not allowed: 1, the length"
    )


def test_checkpoint_of_a_run_with_a_plugin_this_run_does_not_have(tmp_path: Path):
    state = _plugin_state(["sparsity=gmp"], "sparsity")
    path = _lightning_checkpoint(tmp_path / "gmp.ckpt", _digits_module(), callbacks=state)
    _assert_refused(tmp_path / "run", [f"ckpt_path={path}"], "ckpt_path", "HardshrinkSparsifier")


def test_checkpoint_of_a_run_without_the_plugins_of_this_run(tmp_path: Path):
    path = _lightning_checkpoint(tmp_path / "plain.ckpt", _digits_module())
    _assert_refused(
        tmp_path / "run", ["pruning=l1", f"ckpt_path={path}"], "ckpt_path", "StructuredPruning"
    )


# --- the run folder: a file, under a file, read-only ------------------------------------------------


def test_run_folder_that_is_a_file(tmp_path: Path):
    path = tmp_path / "run"
    path.write_text("not a folder")
    _assert_refused(tmp_path / "elsewhere", [], "hydra.run.dir", "is a file", [f"hydra.run.dir={path}"])
    assert path.read_text() == "not a folder"


def test_run_folder_under_a_file(tmp_path: Path):
    (tmp_path / "file").write_text("")
    _assert_refused(tmp_path / "elsewhere", [], "hydra.run.dir", "is a file", [f"hydra.run.dir={tmp_path / 'file' / 'run'}"])


def test_sweep_folder_that_is_a_file(tmp_path: Path):
    path = tmp_path / "sweep"
    path.write_text("")
    _assert_refused(tmp_path / "elsewhere", ["-m", "seed=0,1"], "hydra.sweep.dir", "is a file", [f"hydra.sweep.dir={path}"])


def _read_only(folder: Path) -> bool:
    """Make ``folder`` read-only for this user (``chattr +i`` for root); whether that worked."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        return False
    try:
        (folder / "probe").touch()
    except OSError:
        return True
    (folder / "probe").unlink()
    return False


def _writable_again(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="permissions as on Linux")
def test_run_folder_that_cannot_be_written(tmp_path: Path):
    folder = tmp_path / "readonly"
    folder.mkdir()
    if not _read_only(folder):
        pytest.skip("cannot make a folder read-only here")
    try:
        _assert_refused(folder, [], "hydra.run.dir", "a folder this user can write", [f"hydra.run.dir={folder}"])
        _assert_refused(folder, [], "hydra.run.dir", "a folder this user can write", [f"hydra.run.dir={folder / 'run'}"])
    finally:
        _writable_again(folder)
    assert list(folder.iterdir()) == []


# --- the same rules for a user of the callbacks in Python (no config in between) -------------------

NAN, INF = float("nan"), float("inf")

PYTHON = [
    pytest.param(lambda: HardshrinkSparsifier(schedule={"end": NAN}), "sparsity.schedule.end=nan", id="hardshrink-nan-lambda"),
    pytest.param(lambda: HardshrinkSparsifier(schedule={"end": 0.1}, regrow="maybe"), "sparsity.regrow='maybe'", id="hardshrink-regrow-maybe"),
    pytest.param(lambda: StructuredPruning(amount=NAN), "pruning.amount=nan", id="pruning-nan-amount"),
    pytest.param(lambda: StructuredPruning(amount=0.5, compact="maybe"), "pruning.compact='maybe'", id="pruning-compact-maybe"),
    pytest.param(lambda: NormFactory(eps=NAN), "norm.eps=nan", id="norm-nan-eps"),
    pytest.param(lambda: NormFactory(track_running_stats="maybe"), "norm.track_running_stats='maybe'", id="norm-track-maybe"),
    pytest.param(lambda: Classifier(torch.nn.Linear(2, 2), 2, lr=INF), "module.lr=inf", id="classifier-inf-lr"),
    pytest.param(lambda: DigitsCNN(dropout=NAN), "model.dropout=nan", id="cnn-nan-dropout"),
    pytest.param(
        lambda: WeightConstraints(rules=[{"name": "learned_mask", "args": {"temperature": NAN}}]),
        "constraints.rules[0].args.temperature=nan", id="learned-mask-nan-temperature",
    ),
    pytest.param(
        lambda: WeightConstraints(rules=[{"name": "max_norm", "args": {"radius": INF}}]),
        "constraints.rules[0].args.radius=inf", id="max-norm-inf-radius",
    ),
]


@pytest.mark.parametrize("build,message", PYTHON)
def test_python_mistake(build, message: str):
    with pytest.raises(ConfigError) as raised:
        build()
    assert str(raised.value).startswith(message), str(raised.value)


def test_a_negative_dim_is_exactly_its_positive_alias():
    """``dim=-4`` on 4-D conv weights prunes the same channels as ``dim=0``, coupled biases and
    norms included, so the masked model equals its compacted twin."""
    from tests.test_structured import Wrap, _setup

    masks = {}
    for dim in (0, -4):
        torch.manual_seed(0)
        model = Wrap(DigitsCNN())
        callback = _setup(model, [2, 1, 8, 8], dim=dim)
        callback.apply(0.5)
        assert callback.dim == 0
        masks[dim] = {
            name: tensor.clone() for name, tensor in model.state_dict().items() if name.endswith(".mask")
        }
        assert any("features.0.1" in name for name in masks[dim]), "the norm after the conv is not masked"
    assert masks[0].keys() == masks[-4].keys()
    for name in masks[0]:
        assert torch.equal(masks[0][name], masks[-4][name]), name



def test_a_refused_resume_in_a_killed_runs_folder_leaves_its_record_as_it_was(tmp_path: Path):
    """``ckpt_path=last`` with another ``trainer.max_epochs``, in the run's own folder: refused
    before Hydra writes (the job refused it after Hydra had rewritten .hydra/overrides.yaml)."""
    run_dir = tmp_path / "run"
    assert run_train_cli([*SHORT, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"], timeout=300).returncode == 0
    (run_dir / "summary.json").unlink()  # as a run killed after its last checkpoint leaves it
    record = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    result = run_train_cli([*SHORT, "ckpt_path=last", f"hydra.run.dir={run_dir}"], timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().startswith("error: trainer.max_epochs=2 is not allowed: 1, the length"), result.stderr
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == record
