"""What ``train.py`` builds from a config: extensions first, then the model, the plugins (in their
documented order), the loggers and the callbacks."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from plugins.core.errors import ConfigError
from runner.checkpoints import LastCheckpoint, RandomState, best_checkpoint
from runner.console import EpochLine, HeadlineProgressBar
from runner.validation import CALLBACK_CONFIG

__all__ = ["build_model", "build_plugins", "build_loggers", "build_callbacks", "build_user_callbacks", "close_loggers"]


def build_model(cfg: DictConfig, datamodule: L.LightningDataModule) -> L.LightningModule:
    """The LightningModule around a backbone whose every norm layer is ``cfg.norm``."""
    norm = hydra.utils.instantiate(cfg.norm, _convert_="all")
    # Objects go in through partials: instantiate() would turn them into configs.
    build_net = hydra.utils.instantiate(cfg.model, _partial_=True, _convert_="all")
    net = build_net(in_channels=datamodule.in_channels, num_classes=datamodule.num_classes, norm=norm)
    build_module = hydra.utils.instantiate(cfg.module, _partial_=True)
    return build_module(net=net, num_classes=datamodule.num_classes)


def build_plugins(cfg: DictConfig) -> list[L.Callback]:
    """Constraints first, then sparsity, then pruning: the documented order on a shared tensor."""
    plugins = []
    for group in ("constraints", "sparsity", "pruning"):
        node = cfg.get(group)
        if node:
            plugins.append(hydra.utils.instantiate(node, _convert_="all"))
    return plugins


def build_loggers(cfg: DictConfig, resume_step: int | None = None) -> list[Any]:
    """Every logger of the ``logger`` group (csv, tensorboard, wandb; ``many`` = all three). When
    resuming at ``resume_step``, TensorBoard purges its events from that step on (they came from
    the stopped run after its checkpoint and are logged again)."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node and "_target_" in node:
            extra = {}
            if resume_step is not None and issubclass(hydra.utils.get_class(node._target_), TensorBoardLogger):
                extra["purge_step"] = resume_step
            loggers.append(hydra.utils.instantiate(node, _convert_="all", **extra))
        elif node:
            raise ConfigError(f"logger.{name}", OmegaConf.to_container(node), "a logger with _target_")
    return loggers


def build_user_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The user's own callbacks (``+callbacks.NAME={_target_: ...}``; ``callbacks.NAME=null`` leaves
    one out), each a Lightning ``Callback``; a ConfigError naming ``callbacks.NAME`` for one that
    is not a config with ``_target_``, does not build, or builds something else. ``train.py``
    builds them before Hydra writes anything (runner/command_line.py) and again in the job."""
    nodes = cfg.get("callbacks")
    if nodes is None:
        return []
    if not isinstance(nodes, DictConfig):
        value = OmegaConf.to_container(nodes) if OmegaConf.is_config(nodes) else nodes
        raise ConfigError("callbacks", value, CALLBACK_CONFIG)
    callbacks = []
    for name, node in nodes.items():
        key = f"callbacks.{name}"
        if not node:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            value = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
            raise ConfigError(key, value, CALLBACK_CONFIG)
        try:
            callback = hydra.utils.instantiate(node, _convert_="all")
        except Exception as err:  # noqa: BLE001 - the user's class or its arguments: said in one line
            cause = err.__cause__ or err
            reason = " ".join(str(cause).split()) or type(cause).__name__
            allowed = f"a Lightning Callback that builds ({type(cause).__name__}: {reason})"
            raise ConfigError(key, OmegaConf.to_container(node), allowed) from None
        if not isinstance(callback, L.Callback):
            raise ConfigError(
                key, str(node._target_), f"the class of a Lightning Callback (it built a {type(callback).__name__})"
            )
        callbacks.append(callback)
    return callbacks


def build_callbacks(cfg: DictConfig, output_dir: Path, plugins: list[L.Callback]) -> list[L.Callback]:
    """Plugins first (their epoch-end work is in the checkpoint), then the user's extra callbacks,
    the random state, the checkpoints: last.ckpt (resume) and the best epoch (ckpt_path="best"), and
    the console (a progress bar on a terminal, an epoch line elsewhere), both with the plugins' headlines."""
    extra = build_user_callbacks(cfg)
    checkpoint = cfg.get("checkpoint") or {}
    callbacks: list[L.Callback] = [
        *plugins,
        *extra,
        RandomState(),
        best_checkpoint(
            output_dir / "checkpoints", checkpoint.get("monitor", "val/acc"), checkpoint.get("mode", "max")
        ),
        LastCheckpoint(output_dir / "checkpoints", checkpoint.get("every_n_train_steps")),
    ]
    if sys.stdout.isatty():
        callbacks.append(HeadlineProgressBar(plugins, leave=True))
    else:
        callbacks.append(EpochLine(plugins))
    return callbacks


def close_loggers(loggers: list[Any]) -> None:
    """Flush every logger; W&B's run also ends here so that a sweep's next job starts its own."""
    for logger in loggers:
        logger.finalize("success")
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()
