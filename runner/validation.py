"""Every value a user can type is checked before training and before anything is written.

A mistake is one :class:`~plugins.core.errors.ConfigError` (``train.py`` prints it as one line and exits
with status 2, see :mod:`runner.command_line`). :func:`check_config` runs on the composed config at
the start of every job (``train.validate``), and before that on the command line, before Hydra
creates a run folder (:func:`runner.command_line.check_command_line`, which also passes the config
composed without value overrides). The checkpoint checks (:func:`read_checkpoint`,
:func:`check_checkpoint_matches`, :func:`check_checkpoint_plugins`) need the freshly built module
and plugins, so ``train.py`` calls them right after building those.

The rules are general, derived from the config and the code, not from a list of known mistakes:

- every number anywhere in the config is finite (NaN and Inf are values too);
- a node with ``_target_`` is checked against the target's signature: unknown keys (naming the
  closest valid one) and simple types from the annotations (``bool``, ``int``, ``float``,
  ``Literal``, their unions), into nested mappings typed by a dataclass (``schedule``);
- any other node is checked against the config composed from the same group choices without
  value overrides: no new keys (except a ``+name={_target_: ...}`` object such as a callback), a
  boolean stays a boolean and a number a number;
- Lightning checks its own Trainer arguments in a throwaway ``Trainer`` that writes nothing;
- ``trainer.max_epochs`` is at least 1 and every schedule window starts before the last epoch,
  for every value a sweeper's search space (``hydra.sweeper.params``) can draw;
- ``optimized_metric`` names a number the run writes to ``summary.json``;
- a checkpoint has this model's tensors and this run's plugins.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import math
import re
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from plugins.core.arguments import accepted_arguments, describe, type_ok, unknown_argument
from plugins.core.errors import ConfigError, ScheduleWarning, is_number

__all__ = [
    "check_config",
    "check_finite",
    "check_trainer",
    "check_schedule_windows",
    "search_space_bounds",
    "check_optimized_metric",
    "check_monitor",
    "check_batches",
    "read_checkpoint",
    "check_checkpoint_matches",
    "check_resume_length",
    "check_checkpoint_plugins",
    "unknown_key",
    "one_line",
    "quiet",
    "locate",
    "user_error_in",
]

# What every run writes to summary.json as numbers (train.py), and what the Classifier logs.
SUMMARY_NUMBERS = ("params/total", "params/nonzero", "sparsity/global", "seed", "duration_s")
_CLASSIFIER_LOGS = ("loss", "acc", "f1")
CLASSIFIER_METRICS = tuple(f"{stage}/{name}" for stage in ("val", "test") for name in _CLASSIFIER_LOGS)
# The last training epoch's, kept by the Classifier and written to summary.json (runner.outputs).
CLASSIFIER_TRAIN_METRICS = ("train/acc", "train/f1", "train/loss_epoch")
CLASSIFIER_TARGETS = ("models.Classifier", "models.classifier.Classifier")
SEED_MAX = 2**32 - 1
NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems
CALLBACK_CONFIG = "a callback config with _target_, the class of a Lightning Callback: +callbacks.NAME={_target_: ...}"
# What ModelCheckpoint can monitor on the Classifier: its logged metrics (train/loss also per step).
CLASSIFIER_MONITORS = tuple(f"{stage}/{name}" for stage in ("train", "val") for name in _CLASSIFIER_LOGS) + (
    "train/loss_step",
    "train/loss_epoch",
)
# The nodes train.py builds every run from: a ``~norm`` cannot remove one.
REQUIRED = ("data", "model", "module", "norm", "trainer")
# Trainer arguments Lightning accepts below these bounds only to fail (or do nothing) later.
TRAINER_MINIMUM = {
    "max_epochs": 1,
    "min_epochs": 0,
    "max_steps": -1,
    "min_steps": 0,
    "log_every_n_steps": 1,
    "accumulate_grad_batches": 1,
    "check_val_every_n_epoch": 1,
    "num_sanity_val_steps": -1,
    "num_nodes": 1,
}
_UNSET = object()


# --- shared pieces --------------------------------------------------------------------------------


def user_error_in(err: BaseException | None) -> ConfigError | None:
    """The ConfigError behind ``err``, also when Hydra's instantiate or Lightning wrapped it."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def one_line(text: str) -> str:
    """Any message (Lightning's span lines) as one line."""
    return " ".join(str(text).split())


def _group_options(group: str) -> list[str]:
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return []
    loader = GlobalHydra.instance().config_loader()
    return loader.get_group_options(group) if loader.repository.group_exists(group) else []


def unknown_key(key: str, names: Sequence[str], where: str) -> str:
    """What is allowed instead of the unknown ``key``: the keys of ``where``, the closest first."""
    parent, _, word = key.rpartition(".")
    if not names:
        options = [o for o in _group_options(where) if o != "none"]
        choose = f": choose {where}={'|'.join(options)} first" if options else ""
        return f"a key of {where}, which has no keys as configured{choose}"
    closest = difflib.get_close_matches(word, list(names), n=1, cutoff=0.0)
    listing = f": {', '.join(names)}" if 0 < len(names) <= 20 else ""
    hint = f"; closest: {parent + '.' if parent else ''}{closest[0]}" if closest else ""
    return f"a key of {where}{listing}{hint}"


# --- the composed config --------------------------------------------------------------------------


def import_extensions(cfg: DictConfig) -> None:
    """Import the modules named in ``imports``: they register their own schedule kinds, criteria,
    norm kinds and constraints, which the config may then name."""
    imports = cfg.get("imports") or []
    if not isinstance(imports, (list, ListConfig)) or not all(isinstance(name, str) for name in imports):
        raise ConfigError(
            "imports", _plain(imports), "a list of importable module names, imports=[mylab.extensions]"
        )
    for i, name in enumerate(imports):
        try:
            importlib.import_module(str(name))
        except ImportError as err:
            raise ConfigError(f"imports[{i}]", name, f"an importable module ({type(err).__name__}: {err})") from None


def check_config(cfg: DictConfig, defaults: DictConfig | None = None) -> None:
    """Every config check that needs no model: the top-level keys, finite numbers, keys and types
    against the targets' signatures (and against ``defaults``, the config composed from the same
    group choices without value overrides, when given), the trainer, schedule windows and
    ``optimized_metric``. Raises the first ConfigError found. The modules in ``imports`` are
    imported first: the names they register are then valid."""
    import_extensions(cfg)
    check_interpolations(cfg)
    check_finite(cfg)
    _check_node(cfg, "", defaults)
    _check_top_level(cfg)
    check_trainer(cfg)
    check_optimized_metric(cfg)  # builds the plugins: their own checks come first
    check_monitor(cfg)
    check_schedule_windows(cfg)


def _check_top_level(cfg: DictConfig) -> None:
    for name in REQUIRED:
        if not isinstance(cfg.get(name, None), DictConfig):
            raise ConfigError(name, _plain(cfg.get(name, None)), f"a {name} config (train.py builds the run from it)")
    seed = cfg.get("seed", None)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise ConfigError("seed", seed, f"an integer in [0, {SEED_MAX}] (what numpy's generator takes)")
    task = cfg.get("task_name", None)
    if not isinstance(task, str) or not task.strip() or len(task.encode()) > NAME_MAX:
        raise ConfigError(
            "task_name",
            _plain(task),
            f"a non-empty name of at most {NAME_MAX} bytes (it names the output folder and the dashboards' project)",
        )
    tags = cfg.get("tags", None)
    if tags is not None and not (isinstance(tags, ListConfig) and all(isinstance(t, str) for t in tags)):
        raise ConfigError("tags", _plain(tags), "a list of words, tags=[a,b] (every logger gets them)")
    for group in ("sparsity", "pruning", "constraints"):
        node = cfg.get(group)
        if node and "_target_" not in node:
            raise ConfigError(group, OmegaConf.to_container(node), f"a {group} config with _target_")
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and ckpt != "last":
        if not isinstance(ckpt, str) or not _absolute(ckpt).is_file():
            raise ConfigError("ckpt_path", ckpt, "null, 'last', or the path of an existing checkpoint")
        read_checkpoint(ckpt, _absolute(ckpt))


def _absolute(path: str) -> Path:
    import hydra

    return Path(hydra.utils.to_absolute_path(path))


def _children(node: DictConfig | ListConfig) -> Iterator[tuple[str, Any]]:
    """``(name, value)`` of a node's children, resolved; one that cannot be resolved yet
    (``${hydra:...}`` before Hydra runs, ``???``) is ``_UNSET``."""
    names = range(len(node)) if isinstance(node, ListConfig) else node.keys()
    for name in names:
        try:
            value = node[name]
        except Exception:  # noqa: BLE001 - unresolvable now: Hydra fills it in later
            value = _UNSET
        yield str(name), value


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def check_finite(cfg: DictConfig | ListConfig, path: str = "") -> None:
    """NaN and Inf anywhere in the config (``hydra.*`` included) are refused, naming the key."""
    for name, value in _children(cfg):
        key = _join(path, name)
        if isinstance(value, (DictConfig, ListConfig)):
            check_finite(value, key)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, value, "a finite number (NaN and Inf are not settings)")


def check_interpolations(cfg: DictConfig | ListConfig, path: str = "") -> None:
    """An interpolation to a key that does not exist (``module.lr='${nothere}'``) is refused,
    naming the key that holds it; resolvers that need Hydra's run time (``${hydra:...}``) are left
    to it."""
    from omegaconf.errors import InterpolationKeyError

    names = range(len(cfg)) if isinstance(cfg, ListConfig) else [k for k in cfg.keys() if k != "hydra" or path]
    for name in names:
        key = _join(path, str(name))
        try:
            value = cfg[name]
        except InterpolationKeyError:
            raw = OmegaConf.to_container(cfg, resolve=False)[name]
            raise ConfigError(key, raw, "an interpolation to a key of the config (${...} names none)") from None
        except Exception:  # noqa: BLE001 - a resolver only Hydra's run time knows
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            check_interpolations(value, key)


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(value, resolve=True)
        except Exception:  # noqa: BLE001 - not resolvable before Hydra runs
            return _UNSET
    return value


def _get_object(target: str) -> Any:
    from hydra.utils import get_object

    log = logging.getLogger("hydra.utils")
    disabled, log.disabled = log.disabled, True  # get_object logs what it raises: the one line says it
    try:
        return get_object(target)
    finally:
        log.disabled = disabled


def locate(node: DictConfig) -> Callable | None:
    """The class or function ``node._target_`` names, or ``None`` where it names none."""
    target = node.get("_target_")
    if not isinstance(target, str):
        return None
    try:
        return _get_object(target)
    except Exception:  # noqa: BLE001 - _check_target names a _target_ that cannot be imported
        return None


def _check_node(node: DictConfig, path: str, defaults: DictConfig | None) -> None:
    """A node without ``_target_``: its keys against ``defaults`` (the same node composed without
    value overrides), booleans stay booleans, numbers stay numbers; children recursively."""
    if "_target_" in node:
        _check_target(node, path)
        return
    for name, value in _children(node):
        key = _join(path, name)
        if key == "hydra":
            continue  # Hydra validates its own node
        default = _UNSET
        if defaults is not None:
            default = next((v for n, v in _children(defaults) if n == name), _UNSET)
            if name not in defaults and not (isinstance(value, DictConfig) and "_target_" in value):
                if path == "callbacks":  # the user's own callbacks, by any name
                    raise ConfigError(key, _plain(value), CALLBACK_CONFIG)
                names = [str(k) for k in defaults if k != "hydra"]
                raise ConfigError(key, _plain(value), unknown_key(key, names, path or "the config"))
        if isinstance(value, DictConfig):
            if default is None and defaults is not None:
                default = OmegaConf.create({})  # a group whose option is none: it has no keys
            _check_node(value, key, default if isinstance(default, DictConfig) else None)
        elif isinstance(value, ListConfig):
            for index, item in _children(value):
                if isinstance(item, DictConfig) and "_target_" in item:
                    _check_target(item, _join(key, index))
        elif value is not _UNSET and default is not _UNSET:
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ConfigError(key, value, "true or false")
            if is_number(default) and value is not None and not is_number(value):
                raise ConfigError(key, value, "a number")


def _check_target(node: DictConfig, path: str) -> None:
    label = node.get("_target_")
    if not isinstance(label, str):
        return
    try:
        target = _get_object(label)
    except Exception as err:  # noqa: BLE001 - a typo in a module or class name: said in one line
        reason = one_line(str(err)) or type(err).__name__
        raise ConfigError(
            _join(path, "_target_"), label, f"an importable class or function ({type(err).__name__}: {reason})"
        ) from None
    _check_call(target, label, node, path, skip_private=True)


def _check_call(target: Callable, label: str, node: DictConfig, path: str, skip_private: bool = False) -> None:
    """The keys of ``node`` as keyword arguments of ``target``: names, then types from the
    annotations; a nested mapping typed by a dataclass (``schedule: Schedule | Mapping``) or
    holding its own ``_target_`` is checked the same way."""
    named, hints, open_ended = accepted_arguments(target)
    for name, value in _children(node):
        if skip_private and name.startswith("_"):
            continue
        key = _join(path, name)
        if name not in named:
            if open_ended:
                continue
            raise ConfigError(key, _plain(value), unknown_argument(key, list(named), label))
        expected = hints.get(name, named[name].annotation)
        plain = _plain(value)
        if plain is not _UNSET and not type_ok(plain, expected):
            finite = not isinstance(plain, float) or math.isfinite(plain)
            raise ConfigError(key, plain, describe(expected) if finite else "a finite number")
        if isinstance(value, DictConfig):
            schema = _dataclass_in(expected)
            if "_target_" in value:
                _check_target(value, key)
            elif schema is not None:
                _check_call(schema, schema.__name__, value, key)
        elif isinstance(value, ListConfig):
            for index, item in _children(value):
                if isinstance(item, DictConfig) and "_target_" in item:
                    _check_target(item, _join(key, index))


def _dataclass_in(annotation: Any) -> type | None:
    options = typing.get_args(annotation) or (annotation,)
    return next((a for a in options if isinstance(a, type) and dataclasses.is_dataclass(a)), None)


def check_trainer(cfg: DictConfig) -> None:
    """``trainer.*``: bounds Lightning accepts only to fail later, then Lightning's own checks in a
    throwaway Trainer (no logger, no checkpoints: it writes nothing); its exception becomes a
    ConfigError naming the ``trainer.*`` key it is about."""
    node = cfg.get("trainer")
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return
    kwargs = _plain(node)
    if kwargs is _UNSET:
        return
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    for name, low in TRAINER_MINIMUM.items():
        value = kwargs.get(name)
        if is_number(value) and value < low:
            raise ConfigError(f"trainer.{name}", value, f"an integer >= {low} (or null for Lightning's default)")
    tests = kwargs.get("limit_test_batches")
    if is_number(tests) and tests <= 0:
        raise ConfigError(
            "trainer.limit_test_batches", tests, "a count or fraction > 0 (every run ends with a test: test/acc)"
        )
    steps = kwargs.get("max_steps")
    if is_number(steps) and steps != -1 and steps < 1:
        raise ConfigError("trainer.max_steps", steps, "-1 (no limit: max_epochs decides) or a count >= 1")
    trains = kwargs.get("limit_train_batches")
    if is_number(trains) and trains <= 0:
        raise ConfigError(
            "trainer.limit_train_batches", trains, "a count or fraction > 0 (a run trains at least one batch)"
        )
    target = locate(node)
    if target is None:
        return
    writes_nothing = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "callbacks": []}
    try:
        with quiet():
            target(**{**kwargs, **writes_nothing, "enable_model_summary": False})
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - Lightning's MisconfigurationException, ValueError, TypeError
        name = _trainer_key(str(err), kwargs)
        raise ConfigError(
            f"trainer.{name}" if name else "trainer", kwargs.get(name) if name else "", one_line(str(err))
        ) from None


def _trainer_key(message: str, kwargs: Mapping[str, Any]) -> str | None:
    """The Trainer argument Lightning's message is about: one it names in backticks or as
    ``name=``, else one whose value it quotes, else one it mentions."""
    for pattern in (r"`(\w+)`", r"`?(?:Trainer\()?(\w+)=", r"\b(\w+)="):
        for match in re.finditer(pattern, message):
            if match.group(1) in kwargs:
                return match.group(1)
    for name, value in kwargs.items():
        if isinstance(value, str) and value and re.search(rf"\b{re.escape(value)}\b", message):
            return name
    return next((name for name in kwargs if re.search(rf"\b{name}\b", message)), None)


@contextmanager
def quiet() -> Iterator[None]:
    """No warnings and no Lightning info lines from a check (the real run prints its own)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _schedules(node: DictConfig | ListConfig, path: str) -> Iterator[tuple[str, DictConfig]]:
    for name, value in _children(node):
        key = _join(path, name)
        if key == "hydra" or not isinstance(value, (DictConfig, ListConfig)):
            continue
        if isinstance(value, DictConfig) and "begin_epoch" in value:
            yield key, value
        yield from _schedules(value, key)


def search_space_bounds(cfg: DictConfig) -> dict[str, tuple[float, float]]:
    """``(lowest, highest)`` of each numeric key a sweeper searches (``hydra.sweeper.params``:
    Optuna's ``interval()``/``range()``/``choice()``, the basic sweeper's ``a,b,c``); keys whose
    values are not all numbers, and expressions Hydra cannot parse (its own error comes later),
    are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
    if not isinstance(params, DictConfig):
        return {}
    parser = OverridesParser.create()
    bounds = {}
    for key, text in _children(params):
        try:
            override = parser.parse_override(f"{key}={text}")
            values = _space_numbers(override)
        except Exception:  # noqa: BLE001 - a malformed space is the sweeper's to report
            continue
        if values and all(is_number(v) for v in values):
            bounds[key] = (min(values), max(values))
    return bounds


def _space_numbers(override: Any) -> list[Any]:
    """The values an override can take, or an interval's two ends (all a bound needs)."""
    if not override.is_sweep_override():
        return [override.value()]
    if override.is_interval_sweep():
        return [override.value().start, override.value().end]
    return list(override.sweep_iterator())


def check_schedule_windows(cfg: DictConfig) -> None:
    """A schedule (any node with ``begin_epoch``) must start before ``trainer.max_epochs`` ends
    the run, or the plugin would never act and say nothing. With a search space
    (``hydra.sweeper.params``, Optuna's or a grid's) every trial must be able to act: the latest
    ``begin_epoch`` it can draw before the fewest ``trainer.max_epochs`` it can draw."""
    space = search_space_bounds(cfg)
    trainer = cfg.get("trainer")
    max_epochs = trainer.get("max_epochs") if isinstance(trainer, DictConfig) else None
    epochs_searched = "trainer.max_epochs" in space
    if epochs_searched:
        max_epochs = space["trainer.max_epochs"][0]
    if not is_number(max_epochs):
        return
    max_epochs = int(max_epochs)
    searched = ", the fewest hydra.sweeper.params draws," if epochs_searched else ""
    epochs = f"trainer.max_epochs={max_epochs}{searched}"
    for key, schedule in _schedules(cfg, ""):
        begin_key = f"{key}.begin_epoch"
        if begin_key in space:
            begin = space[begin_key][1]
            if begin >= max_epochs:
                raise ConfigError(
                    f"hydra.sweeper.params.{begin_key}",
                    str(cfg.hydra.sweeper.params[begin_key]),
                    f"a search space whose every begin_epoch is before {epochs}: a trial drawing "
                    f"begin_epoch={begin:g} would never start its schedule",
                )
            continue
        begin = schedule.get("begin_epoch")
        if is_number(begin) and begin >= max_epochs:
            raise ConfigError(
                begin_key,
                begin,
                f"an epoch before {epochs} (the run trains epochs 0 to "
                f"{max_epochs - 1}; this schedule would never start)",
            )
        end = schedule.get("end_epoch")
        if is_number(end) and end >= max_epochs and f"{key}.end_epoch" not in space:
            warnings.warn(
                ScheduleWarning(
                    f"{key}.end_epoch={end} is not before {epochs}: the run trains epochs 0 to {max_epochs - 1}, "
                    f"so the schedule stops short of its end value ({key}.end={schedule.get('end')})"
                ),
                stacklevel=2,
            )


def check_optimized_metric(cfg: DictConfig) -> None:
    """``optimized_metric`` names a number every run of this config writes to summary.json (train.py
    returns it, to a sweeper or to the caller): the Classifier's val/ and test/ metrics, the run's
    own numbers, and the plugins' numeric summary keys."""
    metric = cfg.get("optimized_metric", None)
    if metric is None:
        return
    no_validation = _no_validation(cfg)
    if isinstance(metric, str) and metric.startswith("val/") and no_validation:
        raise ConfigError(
            "optimized_metric", metric, f"a metric this run computes: with {no_validation} it never validates"
        )
    known = {*SUMMARY_NUMBERS, *_plugin_numbers(cfg)}
    module = cfg.get("module")
    classifier = isinstance(module, DictConfig) and module.get("_target_") in CLASSIFIER_TARGETS
    if classifier:
        known.update(CLASSIFIER_METRICS)
        known.update(CLASSIFIER_TRAIN_METRICS)
    elif isinstance(metric, str) and metric.startswith(("val/", "test/")):
        return  # another module logs its own metrics: they are only known once it has run
    if metric in known:
        return
    closest = difflib.get_close_matches(str(metric), sorted(known), n=1, cutoff=0.0)
    raise ConfigError(
        "optimized_metric",
        metric,
        f"a number this run writes to summary.json (closest: {closest[0] if closest else '-'}): "
        + ", ".join(sorted(known)),
    )


def check_batches(cfg: DictConfig, datamodule: Any) -> None:
    """A fraction in ``trainer.limit_{train,val,test}_batches`` must leave at least one batch of its
    split (Lightning would find out at that loop: the test one after training, checkpoints written).
    Loads the data module's splits (its ``setup`` is idempotent) and counts with its ``batches``
    (Lightning's rule); a data module without ``batches`` is left to Lightning."""
    trainer = cfg.get("trainer")
    batches = getattr(datamodule, "batches", None)
    if not isinstance(trainer, DictConfig) or not callable(batches):
        return
    limits = {split: trainer.get(f"limit_{split}_batches", None) for split in ("train", "val", "test")}
    if not any(isinstance(v, float) and 0 < v < 1 for v in limits.values()):
        return
    datamodule.setup("fit")
    for split, limit in limits.items():
        if isinstance(limit, float) and 0 < limit < 1 and batches(split, limit) == 0:
            total = batches(split)
            raise ConfigError(
                f"trainer.limit_{split}_batches",
                limit,
                f"a fraction that leaves at least one of the {total} {split} batches (>= {1 / total:.3g}), or a count",
            )


def check_monitor(cfg: DictConfig) -> None:
    """``checkpoint.monitor`` names a metric the Classifier logs during fit (a typo would fail only
    after the first epoch, with checkpoints written); another module's metrics are its own."""
    node, module = cfg.get("checkpoint"), cfg.get("module")
    if not isinstance(node, DictConfig) or not isinstance(module, DictConfig):
        return
    monitor = node.get("monitor", None)
    if module.get("_target_") not in CLASSIFIER_TARGETS or monitor is None:
        return
    no_validation = _no_validation(cfg)
    if isinstance(monitor, str) and monitor.startswith("val/") and no_validation:
        raise ConfigError(
            "checkpoint.monitor", monitor, f"a metric logged during fit: with {no_validation} it never validates"
        )
    if isinstance(monitor, str) and not monitor.startswith(("train/", "val/", "test/")):
        return  # a plugin's or a callback's own metric
    if monitor not in CLASSIFIER_MONITORS:
        closest = difflib.get_close_matches(str(monitor), CLASSIFIER_MONITORS, n=1, cutoff=0.0)
        raise ConfigError(
            "checkpoint.monitor",
            monitor,
            f"a metric logged during fit (closest: {closest[0] if closest else '-'}): {', '.join(CLASSIFIER_MONITORS)}",
        )


def _no_validation(cfg: DictConfig) -> str | None:
    """The trainer setting (as typed) that leaves a run without a validation epoch, if any."""
    trainer = cfg.get("trainer")
    if not isinstance(trainer, DictConfig):
        return None
    limit = trainer.get("limit_val_batches", None)
    if is_number(limit) and limit == 0:
        return f"trainer.limit_val_batches={limit}"
    every, epochs = trainer.get("check_val_every_n_epoch", None), trainer.get("max_epochs", None)
    if is_number(every) and is_number(epochs) and every > epochs:
        return f"trainer.check_val_every_n_epoch={every} > trainer.max_epochs={epochs}"
    return None


def _plugin_numbers(cfg: DictConfig) -> list[str]:
    """The numeric keys of each plugin's ``summary()``: a top-level node whose target is a
    Lightning callback with a ``summary`` method, built fresh (constructors only validate)."""
    import hydra
    import lightning as L

    keys = []
    for name, node in _children(cfg):
        if name == "hydra" or not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        target = locate(node)
        if not (isinstance(target, type) and issubclass(target, L.Callback) and hasattr(target, "summary")):
            continue
        try:
            with quiet():
                summary = hydra.utils.instantiate(node, _convert_="all").summary()
        except Exception as err:  # noqa: BLE001 - a ConfigError is the user's; anything else is train()'s to show
            user_error = user_error_in(err)
            if user_error is not None:
                raise user_error from None
            continue
        keys += [k for k, v in summary.items() if v is None or is_number(v)]
    return keys


# --- checkpoints ----------------------------------------------------------------------------------


def read_checkpoint(ckpt_path: str | None, path: str | Path | None) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (what ``ckpt_path``, as typed, resolved to), loaded on CPU with
    ``weights_only=True`` and memory-mapped (tensors are read only when used); ``None`` for a
    fresh run. An unreadable file is a ConfigError naming ``ckpt_path``."""
    import torch

    if path is None:
        return None
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a file torch.save wrote in its legacy (not zip) format
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
        raise ConfigError("ckpt_path", ckpt_path, f"a readable Lightning checkpoint ({type(err).__name__})") from None
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ConfigError("ckpt_path", ckpt_path, "a Lightning checkpoint (a dict with a state_dict)")
    return dict(checkpoint)


def _plain_name(name: str) -> str | None:
    """A state-dict key as the model without plugins names it (``None``: a plugin's own entry)."""
    if ".parametrizations." not in name:
        return name
    head, _, rest = name.partition(".parametrizations.")
    tensor, _, tail = rest.partition(".")
    return f"{head}.{tensor}" if tail == "original" else None


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def check_resume_length(cfg: DictConfig, checkpoint: Mapping[str, Any] | None) -> None:
    """A resumed Classifier run keeps the length it started with: its cosine learning-rate schedule
    spans ``trainer.max_epochs`` and resumes with the checkpoint's span, so a new ``max_epochs``
    would train its extra epochs at a learning rate near 0 (the schedule's end) and up again."""
    module = cfg.get("module")
    if checkpoint is None or not (isinstance(module, DictConfig) and module.get("_target_") in CLASSIFIER_TARGETS):
        return
    epochs = (cfg.get("trainer") or {}).get("max_epochs")
    for state in checkpoint.get("lr_schedulers") or []:
        span = state.get("T_max") if isinstance(state, Mapping) else None
        if isinstance(span, int) and is_number(epochs) and max(int(epochs), 1) != span:
            raise ConfigError(
                "trainer.max_epochs",
                epochs,
                f"{span}, the length of the run the checkpoint resumes (its cosine learning-rate schedule "
                f"spans {span} epochs; a longer or shorter run is a new run)",
            )


def check_checkpoint_matches(
    ckpt_path: str | None, checkpoint: Mapping[str, Any] | None, module: Any
) -> None:
    """The checkpoint's ``state_dict`` has the names and shapes of ``module`` as freshly built
    (before any plugin touched it); otherwise one ConfigError naming ``ckpt_path`` and up to three
    mismatched tensors (name, shape in the checkpoint vs in the model). ``None``: a fresh run."""
    import torch

    if checkpoint is None:
        return
    saved = {}
    for name, tensor in (checkpoint.get("state_dict") or {}).items():
        plain = _plain_name(str(name))
        if plain is not None and torch.is_tensor(tensor):
            saved[plain] = tuple(tensor.shape)
    model = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    differ = [
        f"{name} (checkpoint {_shape(saved[name])} vs model {_shape(shape)})"
        for name, shape in model.items()
        if name in saved and saved[name] != shape
    ]
    differ += [f"{n} (not in the checkpoint; model {_shape(shape)})" for n, shape in model.items() if n not in saved]
    differ += [f"{n} (checkpoint {_shape(shape)}; not in the model)" for n, shape in saved.items() if n not in model]
    if differ:
        more = f", and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise ConfigError(
            "ckpt_path",
            ckpt_path,
            f"a checkpoint of this model; {len(differ)} tensors differ: {', '.join(differ[:3])}{more}",
        )


def _plugin_classes(plugins: Sequence[Any]) -> set[str]:
    import lightning as L

    import plugins as package

    names = {type(p).__name__ for p in plugins}
    for name in package.__all__:
        obj = getattr(package, name, None)
        if isinstance(obj, type) and issubclass(obj, L.Callback):
            names.add(obj.__name__)
    return names


def check_checkpoint_plugins(
    ckpt_path: str | None, checkpoint: Mapping[str, Any] | None, plugins: Sequence[Any]
) -> None:
    """The checkpoint holds the state of exactly this run's plugin callbacks (by ``state_key``, which
    starts with the callback's class name); a plugin on one side only is one ConfigError naming
    ``ckpt_path``."""
    if checkpoint is None:
        return
    classes = _plugin_classes(plugins)
    saved = {k for k in (checkpoint.get("callbacks") or {}) if str(k).split("{")[0] in classes}
    ours = {p.state_key for p in plugins}
    differ = [f"{k} (in the checkpoint, not in this run)" for k in sorted(saved - ours)]
    differ += [f"{k} (in this run, not in the checkpoint)" for k in sorted(ours - saved)]
    if differ:
        more = f", and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise ConfigError(
            "ckpt_path", ckpt_path, f"a checkpoint of the same plugins; these differ: {', '.join(differ[:3])}{more}"
        )
