"""The command line as a user types it: every mistake is one line on stderr and exit status 2.

``python train.py ARGS`` is checked before Hydra creates a run folder (:func:`check_command_line`):
Hydra's own errors (a malformed override, an unknown group option such as ``hydra/launcher=nope``,
``key=value`` for a key that does not exist, a sweep without ``-m``) become one
:class:`~plugins.core.errors.ConfigError` naming the key as typed; then the config is composed as Hydra
will compose it (in a multirun, once per swept value) and :func:`runner.validation.check_config`
runs on it, and the run folder is checked. :func:`exit_with` prints a ConfigError as that one line;
:func:`info_to_stdout` keeps Lightning's info lines and warnings off stderr.
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from plugins.core.arguments import accepted_arguments, unknown_argument
from plugins.core.errors import ConfigError
from runner.error_line import as_typed, error_line, exit_with
from runner.overrides import parse_flags, parse_overrides, typed_key
from runner.search_space import SPACE_SYNTAX, check_sweeper_settings, search_space_draws
from runner.validation import check_config, locate, one_line, quiet, unknown_key, user_error_in

__all__ = [
    "as_typed",
    "error_line",
    "exit_with",
    "user_error_in",
    "info_to_stdout",
    "check_command_line",
    "check_run_folder",
]

# Flags after which Hydra prints something and runs no job: left to Hydra.
_INFO_FLAGS = ("help", "hydra_help", "version", "cfg", "info", "shell_completion", "experimental_rerun")


def info_to_stdout() -> None:
    """Lightning's info lines ("GPU available", "Seed set to") and Python warnings go to stdout
    (and, once Hydra has configured logging, to the run's log file): stderr holds errors only."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                handler.setStream(sys.stdout)
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    for handler in list(warnings_logger.handlers):
        warnings_logger.removeHandler(handler)
    configured = bool(logging.getLogger().handlers)  # Hydra's job logging: console (stdout) and file
    warnings_logger.propagate = configured
    if not configured:
        warnings_logger.addHandler(logging.StreamHandler(sys.stdout))


# --- the command line, before Hydra --------------------------------------------------------------


def check_command_line(argv: Sequence[str], conf_dir: Path, config_name: str = "train") -> str | None:
    """What ``python train.py ARGV`` would get wrong, found before Hydra creates a run folder.

    Hydra's own errors (a malformed override, an unknown group option such as
    ``hydra/launcher=nope``, ``key=value`` for a key that does not exist) become one ConfigError
    naming the key as typed; then :func:`check_config` runs on the config composed as Hydra will
    compose it (in a multirun: once per swept value), and the run folder is checked. Flags after
    which Hydra runs no job (``--help``, ``--cfg``, ...) and other config folders are Hydra's.

    Returns:
        A single run's folder, ``hydra.run.dir`` resolved as composed (``None`` for a multirun or a
        run Hydra's flags leave unchecked).
    """
    args = parse_flags(argv)
    if any(getattr(args, flag, None) for flag in _INFO_FLAGS):
        return None
    if args.config_path or args.config_dir:
        return None
    overrides = parse_overrides(args.overrides)

    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with quiet(), initialize_config_dir(str(conf_dir), version_base="1.3"):
        repository = GlobalHydra.instance().config_loader().repository
        _check_group_options(overrides)
        sweeps = [o for o in overrides if o.is_sweep_override()]
        for sweep in sweeps:
            if sweep.key_or_group.startswith("hydra."):  # Hydra refuses these with a traceback
                space = sweep.key_or_group.startswith("hydra.sweeper.params")
                allowed = SPACE_SYNTAX if space else "one value: Hydra's own settings are not swept"
                raise ConfigError(typed_key(sweep), sweep.input_line.partition("=")[2], allowed)
        base = [_first_value(o) for o in overrides]
        cfg = _compose(args.config_name or config_name, [o for o in base if o is not None], overrides)
        multirun = bool(args.multirun) or str(cfg.hydra.get("mode")).endswith("MULTIRUN")
        if sweeps and not multirun:
            first = sweeps[0]
            raise ConfigError(
                typed_key(first),
                first.input_line.partition("=")[2],
                "one value (add -m to sweep over several; write [a,b] for a list)",
            )
        for variant in _variants(overrides, base):
            composed = cfg if variant is base else _compose(
                args.config_name or config_name, [o for o in variant if o is not None], overrides
            )
            groups = [o for o in variant if o is not None and repository.group_exists(o.key_or_group)]
            defaults = _compose(args.config_name or config_name, groups, overrides, strict=False)
            check_config(composed, defaults)
            module = _check_builds(composed)
        run_dir = None
        if multirun:
            _check_search_space(args.config_name or config_name, cfg, base, overrides)
            check_run_folder(str(cfg.hydra.sweep.dir), "hydra.sweep.dir")
        else:
            run_dir = str(cfg.hydra.run.dir)
            check_run_folder(run_dir, "hydra.run.dir")
            from runner.resume_check import check_resume  # torch and Lightning: only for a run

            check_resume(cfg, module, run_dir)
    GlobalHydra.instance().clear()
    return run_dir


def _check_group_options(overrides: Sequence[Any]) -> None:
    """``hydra/launcher=nope``, ``norm=banana``: the group's options, before Hydra says it in a
    screenful."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    for override in overrides:
        group = override.key_or_group
        if override.is_delete() or not loader.repository.group_exists(group):
            continue
        options = loader.get_group_options(group)
        values = _sweep_values(override) if override.is_sweep_override() else [override.value()]
        for value in values or []:
            if value is None or str(value) == "null":  # Hydra: "must be a string or a list", on no key
                raise ConfigError(
                    typed_key(override), None, f"one of {', '.join(options)} (~{group} leaves the group out)"
                )
            if str(value) not in options:
                raise ConfigError(typed_key(override), value, f"one of {', '.join(options)}")


def _sweep_values(override: Any) -> list[str] | None:
    try:
        return list(override.sweep_string_iterator())
    except Exception:  # noqa: BLE001 - interval() and glob(): a sweeper's, not a list of values
        return None


def _first_value(override: Any) -> Any:
    """The override with its first swept value (``None``: a sweep that lists no values)."""
    if not override.is_sweep_override():
        return override
    values = _sweep_values(override)
    return _with_value(override, values[0]) if values else None


def _with_value(override: Any, value: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"{override.get_key_element()}={value}")


def _check_builds(cfg: DictConfig) -> Any:
    """The data module, the model and the LightningModule of a run (of each swept variant), built
    as its job will build them, before Hydra writes anything: a value their constructors refuse
    (``data.batch_size=0``, ``module.lr=-0.1``) stops the run or the sweep there. Only their
    ConfigErrors count: anything else is left to the job, which says it the same way. Then one
    forward pass of two training samples: a model that cannot take the data's batches
    (``model=resnet1d`` on the digits images) is refused naming ``model``. The user's own callbacks
    are built first (``+callbacks.NAME=...``). Returns the LightningModule (``None`` where it did not
    build). Costs one small build, the data's loading and one small forward per run or swept value."""
    import hydra

    from runner.build import build_model, build_user_callbacks

    build_user_callbacks(cfg)  # its own ConfigError names callbacks.NAME
    try:
        datamodule = hydra.utils.instantiate(cfg.data, seed=cfg.seed)
        module = build_model(cfg, datamodule)
    except Exception as err:  # noqa: BLE001 - only a user's mistake stops the run here
        user_error = user_error_in(err)
        if user_error is not None:
            raise user_error from None
        return None
    _check_forward(cfg, datamodule, module)
    return module


def _check_forward(cfg: DictConfig, datamodule: Any, module: Any) -> None:
    import torch

    from plugins.core.modes import evaluating

    try:
        datamodule.setup("fit")
        x = next(iter(datamodule.train_dataloader()))[0][:2]
    except Exception:  # noqa: BLE001 - the data's own failures are the job's to say
        return
    try:
        with torch.no_grad(), evaluating(module):
            module(x)
    except Exception as err:  # noqa: BLE001 - any failure of the model on the data's batch
        reason = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(
            "model",
            str(OmegaConf.select(cfg, "model._target_")),
            f"a model that takes the batches of {OmegaConf.select(cfg, 'data._target_')} "
            f"(inputs {list(x.shape)}; {type(err).__name__}: {reason})",
        ) from None


def _check_search_space(config_name: str, cfg: DictConfig, base: list[Any], typed: Sequence[Any]) -> None:
    """Each draw :func:`~runner.search_space.search_space_draws` picks from the sweeper's search
    space, composed with the other overrides and checked as its trial will be."""
    check_sweeper_settings(cfg)
    for key, (space, draws) in search_space_draws(cfg).items():
        others = [o for o in base if o is not None and o.key_or_group != key]
        for value, shown in draws:
            try:
                draw = parse_overrides([f"{key}={value}"])
                composed = _compose(config_name, [*others, *draw], typed)
                check_config(composed)
                _check_builds(composed)
            except ConfigError as err:
                raise ConfigError(
                    err.key,
                    shown if as_typed(err.key) == key else err.value,
                    f"{err.allowed} (hydra.sweeper.params draws it: {key}: {space})",
                ) from None


def _variants(overrides: Sequence[Any], base: list[Any]) -> Iterator[list[Any]]:
    """The base (first value of every sweep), then each other swept value in turn: every value a
    sweep lists is composed and checked once, without composing the whole product."""
    yield base
    for i, override in enumerate(overrides):
        if override.is_sweep_override():
            for value in (_sweep_values(override) or [])[1:]:
                yield [*base[:i], _with_value(override, value), *base[i + 1 :]]


def _compose(
    config_name: str, overrides: Sequence[Any], typed: Sequence[Any], strict: bool = True
) -> DictConfig | None:
    """Hydra's composition, its errors as one ConfigError naming the key as typed."""
    from hydra import compose
    from hydra.errors import MissingConfigException

    lines = [o.input_line for o in overrides]
    try:
        return compose(config_name, overrides=lines, return_hydra_config=True)
    except MissingConfigException as err:
        if not strict:
            return None
        missing = re.search(r"Could not find '([^']+)/([^']+)'", str(err))
        if missing:
            raise ConfigError(missing.group(1), missing.group(2), f"one of {', '.join(err.options or [])}") from None
        raise ConfigError("defaults", config_name, one_line(str(err).splitlines()[0])) from None
    except Exception as err:  # noqa: BLE001 - Hydra's ConfigCompositionException and OmegaConf's errors
        if not strict:
            return None
        raise _composition_error(err, config_name, typed) from None


def _composition_error(err: Exception, config_name: str, typed: Sequence[Any]) -> ConfigError:
    cause = err.__cause__ or err
    full_key = getattr(cause, "full_key", None)
    match = re.search(r"Could not (?:override|append to config|delete from config) '([^']+)'", str(err))
    key = as_typed(str(full_key or (match.group(1) if match else "") or ""))
    # ``sparsity.schedule.end=0.5`` where sparsity has no keys: OmegaConf names the first missing
    # part (``sparsity.schedule``); the user typed, and reads best, the whole key.
    override = next((o for o in typed if o.key_or_group == key), None) or next(
        (o for o in typed if key and o.key_or_group.startswith(f"{key}.")), None
    )
    value = override.value() if override is not None and not override.is_sweep_override() else None
    space = next((o for o in typed if o.key_or_group.startswith("hydra.sweeper.params")), None)
    if space is not None and key.startswith("hydra.sweeper.params"):
        return ConfigError(space.key_or_group, space.input_line.partition("=")[2], SPACE_SYNTAX)
    if match and ("not in struct" in str(cause) or " not in '" in str(cause)):
        shown = override.key_or_group if override is not None else key
        return ConfigError(shown, value, _unknown_key_allowed(key, config_name, typed))
    reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    return ConfigError(key or "overrides", value, one_line(reason))


def _unknown_key_allowed(key: str, config_name: str, typed: Sequence[Any]) -> str:
    """For ``sparsity.typo=1``: the keys that exist there, the closest first, or the ``+`` form
    when the target takes the key but the config does not list it."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    repository = GlobalHydra.instance().config_loader().repository
    groups = [o.input_line for o in typed if not o.is_sweep_override() and repository.group_exists(o.key_or_group)]
    parent_key, _, name = key.rpartition(".")
    try:
        cfg = compose(config_name, overrides=groups, return_hydra_config=True)
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    except Exception:  # noqa: BLE001 - no list of keys then
        parent = None
    if isinstance(parent, DictConfig) and "_target_" in parent:
        target = locate(parent)
        if target is not None:
            named, _, open_ended = accepted_arguments(target)
            if name in named or open_ended:
                return f"a key the config lists ({parent._target_} takes it: add it with +{key}=...)"
            return unknown_argument(key, list(named), str(parent._target_))
    names = [str(k) for k in parent.keys() if k != "hydra"] if isinstance(parent, DictConfig) else []
    return unknown_key(key, names, parent_key or "the config")


def check_run_folder(path: str, key: str = "hydra.run.dir") -> None:
    """The run folder is a folder (or can become one) that this user can write in."""
    folder = Path(path)
    probe = folder
    while True:
        try:
            probe.stat()
            break
        except FileNotFoundError:
            if probe.parent == probe:
                break
            probe = probe.parent
        except OSError as err:  # a file in the middle of the path, no permission to look
            if err.errno == 20:  # ENOTDIR
                probe = probe.parent
                continue
            raise ConfigError(key, path, f"a folder this user can write ({err.strerror}: {probe})") from None
    if not probe.is_dir():
        raise ConfigError(key, path, f"a folder ({probe} is a file)")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(key, path, f"a folder this user can write ({err.strerror}: {probe})") from None


def check_group_choices(argv: list[str], conf_dir: Path) -> None:
    """``norm=banana`` -> one line naming the group, the value and the options, before Hydra
    composes anything (Hydra's own message spans a screen)."""
    for arg in argv:
        name, sep, value = arg.lstrip("+~").partition("=")
        group_dir = conf_dir / name
        if not sep or "." in name or "/" in name or not group_dir.is_dir() or not value:
            continue
        options = sorted(p.stem for p in group_dir.glob("*.yaml"))
        for choice in value.split(","):
            if choice not in options and choice != "null":
                raise ConfigError(name, choice, f"one of {', '.join(options)}")
