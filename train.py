"""Train one model from a Hydra config: validate -> seed -> build -> fit -> test -> write outputs.

    python train.py                                  # the default experiment (digits CNN)
    python train.py +experiment=ucr_baseline data.name=ArrowHead
    python train.py -m norm=batch,instance,group,layer

Run outputs (see DESIGN.md): checkpoints/last.ckpt, summary.json, model.pt (+ model.pt2), plots, logger files.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from plugins.errors import ConfigError
from plugins.masks import sparsity
from plugins.norm import NormFactory
from plugins.selection import DEFAULT_MODULE_TYPES, resolve_module_types
from plugins.sweeps import at_launch  # noqa: F401 - registers the ${at_launch:} resolver the configs use
from runner import command_line, validation
from runner.checkpoints import AtomicCheckpointIO, LastCheckpoint, RandomState, best_checkpoint, resolve_resume
from runner.logger_history import keep_history
from runner.run_folder import lock_explicit_run_folder, lock_run_folder, unlock_run_folder, write_atomically, write_json

log = logging.getLogger("train")


def wandb_offline() -> bool:
    """Offline unless the user asked for online or has credentials; never wait on the network."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if mode == "online":
        return False
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


OmegaConf.register_new_resolver("wandb_offline", wandb_offline, replace=True)


def validate(cfg: DictConfig) -> None:
    """Every value a user can type, before anything is built or written (runner/validation.py:
    finite numbers, keys and types against the targets' signatures, the Trainer's arguments,
    schedule windows, optimized_metric, ckpt_path); each plugin also checks its own."""
    validation.check_config(cfg)


def ddp_child_command(local_rank: int) -> tuple[list[str], str]:
    """The command Lightning runs for each extra DDP process: this job's overrides, in this job's
    folder. Lightning's own uses ``sys.argv``, which in a multirun (``-m a=1,2``) would start the
    whole sweep again in every child and write to the single-run folder."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    command = [
        sys.executable,
        str(Path(sys.argv[0]).resolve()),
        *hc.overrides.task,
        f'hydra.run.dir="{hc.runtime.output_dir}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, hc.runtime.cwd


def use_job_scoped_ddp_children() -> None:
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = ddp_child_command


def build_plugins(cfg: DictConfig) -> list[L.Callback]:
    """Constraints first, then sparsity, then pruning: the documented order on a shared tensor."""
    plugins = []
    for group in ("constraints", "sparsity", "pruning"):
        node = cfg.get(group)
        if node:
            plugins.append(hydra.utils.instantiate(node, _convert_="all"))
    return plugins


def build_loggers(cfg: DictConfig) -> list[Any]:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node and "_target_" in node:
            loggers.append(hydra.utils.instantiate(node, _convert_="all"))
        elif node:
            raise ConfigError(f"logger.{name}", OmegaConf.to_container(node), "a logger with _target_")
    return loggers


class EpochLine(L.Callback):
    """Prints one plain line per epoch when stdout is not a terminal (CI, files, SLURM logs)."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        shown = {k: v for k, v in trainer.callback_metrics.items() if k.endswith(("loss_epoch", "/acc", "/f1"))}
        parts = " ".join(f"{k}={float(v):.4f}" for k, v in sorted(shown.items()))
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} {parts}", flush=True)


def build_callbacks(cfg: DictConfig, output_dir: Path, plugins: list[L.Callback]) -> list[L.Callback]:
    """Plugins first (their epoch-end work is in the checkpoint), then the user's extra callbacks,
    the random state, and the checkpoints: last.ckpt (resume) and the best epoch (ckpt_path="best")."""
    from lightning.pytorch.callbacks import RichProgressBar

    extra = [
        hydra.utils.instantiate(node, _convert_="all")
        for node in (cfg.get("callbacks") or {}).values()
        if node
    ]
    checkpoint = cfg.get("checkpoint") or {}
    callbacks: list[L.Callback] = [
        *plugins,
        *extra,
        RandomState(),
        best_checkpoint(output_dir / "checkpoints", checkpoint.get("monitor", "val/acc"), checkpoint.get("mode", "max")),
        LastCheckpoint(output_dir / "checkpoints", checkpoint.get("every_n_train_steps")),
    ]
    if sys.stdout.isatty():
        callbacks.append(RichProgressBar(leave=True))
    else:
        callbacks.append(EpochLine())
    return callbacks


def weight_sparsity(net: torch.nn.Module) -> dict[str, Any]:
    """Zeros in the weights of conv and linear layers, per layer and over all of them."""
    types = resolve_module_types(DEFAULT_MODULE_TYPES)
    layers = {
        f"{name}.weight": module.weight
        for name, module in net.named_modules()
        if isinstance(module, types)
    }
    return {
        "sparsity/global": sparsity(layers.values()),
        "sparsity/layers": {name: sparsity([w]) for name, w in layers.items()},
    }


def export_program(net: torch.nn.Module, example: torch.Tensor, path: Path) -> str | None:
    """Write ``net`` (eval mode, any batch size) as a ``torch.export`` program: it runs with
    ``torch.export.load(path).module()`` and no code of this project, unlike the pickled
    ``model.pt``. Returns why it could not be exported (a model ``torch.export`` cannot trace),
    or ``None``; a failure is a warning, not an error, as ``model.pt`` is already written."""
    was_training = net.training
    net.eval()
    try:
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
        write_atomically(path, lambda tmp: torch.export.save(program, tmp))
        return None
    except Exception as err:  # noqa: BLE001 - any tracing failure: keep model.pt, say why
        log.warning("model.pt2 not written: torch.export failed (%s: %s)", type(err).__name__, err)
        path.unlink(missing_ok=True)  # never leave an older run's program beside this model.pt
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    finally:
        net.train(was_training)


def run(cfg: DictConfig) -> float:
    """One job, leaving the process as it found it: a multirun runs many jobs in one process."""
    environ = dict(os.environ)
    try:
        return train(cfg)
    finally:
        unlock_run_folder(cfg.paths.output_dir)
        # Lightning leaves the process group and LOCAL_RANK/MASTER_PORT behind after DDP; the next
        # job of a sweep would join the old, finished group.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


def train(cfg: DictConfig) -> float:
    started = time.time()
    validate(cfg)
    use_job_scoped_ddp_children()
    output_dir = Path(cfg.paths.output_dir)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # DDP's extra processes share their job's folder
        lock_run_folder(output_dir)
    ckpt_path, resume_line = resolve_resume(cfg.get("ckpt_path"), output_dir)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data, seed=cfg.seed)
    norm = NormFactory(**OmegaConf.to_container(cfg.norm, resolve=True))
    # Objects go in through partials: instantiate() would turn them into configs.
    build_net = hydra.utils.instantiate(cfg.model, _partial_=True, _convert_="all")
    net = build_net(in_channels=datamodule.in_channels, num_classes=datamodule.num_classes, norm=norm)
    build_module = hydra.utils.instantiate(cfg.module, _partial_=True)
    module = build_module(net=net, num_classes=datamodule.num_classes)
    checkpoint = validation.read_checkpoint(cfg.get("ckpt_path"), ckpt_path)  # None: a fresh start
    validation.check_checkpoint_matches(cfg.get("ckpt_path"), checkpoint, module)
    plugins = build_plugins(cfg)
    validation.check_checkpoint_plugins(cfg.get("ckpt_path"), checkpoint, plugins)
    loggers = build_loggers(cfg)
    if ckpt_path is not None:
        keep_history(loggers, torch.load(ckpt_path, map_location="cpu", weights_only=True)["global_step"])
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=build_callbacks(cfg, output_dir, plugins),
        logger=loggers or False,
        default_root_dir=str(output_dir),
        enable_progress_bar=sys.stdout.isatty(),
        plugins=[AtomicCheckpointIO()],
    )
    if resume_line:
        print(resume_line, flush=True)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException:
            stop_on_signal(trainer)
        # The last validation epoch's metrics: what a sweeper optimizes (optimized_metric).
        val_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        test_metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    finally:
        for logger in loggers:
            logger.finalize("success")
        if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
            import wandb

            wandb.finish()

    if not trainer.is_global_zero:
        return float(test_metrics["test/acc"])
    net = module.net
    summary: dict[str, Any] = {
        **val_metrics,
        **{k: float(v) for k, v in test_metrics.items()},
        "params/total": sum(p.numel() for p in net.parameters()),
        "params/nonzero": sum(int((p != 0).sum()) for p in net.parameters()),
        **weight_sparsity(net),
        "norm": cfg.norm.kind,
        "seed": cfg.seed,
        "data": cfg.data.get("name", "digits"),
        "model": cfg.model._target_.rsplit(".", 1)[-1],
    }
    for plugin in plugins:
        if hasattr(plugin, "save_plots"):
            plugin.save_plots(output_dir)
        if hasattr(plugin, "summary"):
            summary.update(plugin.summary())
    # On CPU, so that both files load on a machine without the training run's accelerator.
    net.cpu()
    write_atomically(output_dir / "model.pt", lambda tmp: torch.save(net, tmp))
    example, _ = next(iter(datamodule.test_dataloader()))
    failure = export_program(net, example[:2], output_dir / "model.pt2")
    summary["export"] = failure or "model.pt2"
    summary["duration_s"] = time.time() - started
    write_json(output_dir / "summary.json", summary)
    log.info("test/acc=%.4f  outputs in %s", summary["test/acc"], output_dir)
    print(f"test/acc={summary['test/acc']:.4f}  summary: {output_dir / 'summary.json'}", flush=True)
    return optimized_value(cfg, summary)


def stop_on_signal(trainer: L.Trainer) -> None:
    """A run stopped by SIGTERM (preemption) or Ctrl-C: say where its checkpoint is, and exit with
    the signal's status (143 or 130) so that a scheduler sees it did not finish."""
    saver = next(cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint))
    name = saver.stopped_by or "SIGTERM"
    print(
        f"stopped by {name} at epoch {trainer.current_epoch}, step {trainer.global_step}: "
        f"{saver.path} holds it; continue with ckpt_path=last",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(128 + getattr(signal, name))


def optimized_value(cfg: DictConfig, summary: dict[str, Any]) -> float:
    """The value a sweeper maximizes or minimizes: ``summary[cfg.optimized_metric]``."""
    key = cfg.get("optimized_metric") or "test/acc"
    if key not in summary:
        numeric = sorted(k for k, v in summary.items() if isinstance(v, (int, float)))
        raise ConfigError("optimized_metric", key, f"a metric of this run: {', '.join(numeric)}")
    return float(summary[key])


def check_group_choices(argv: list[str], conf_dir: Path = Path(__file__).parent / "conf") -> None:
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


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    command_line.info_to_stdout()  # again: Hydra has just configured logging
    try:
        return run(cfg)
    except Exception as err:
        user_error = command_line.user_error_in(err)
        if user_error is None:
            raise
        command_line.exit_with(user_error)  # a user's mistake: one line, exit 2, no traceback


if __name__ == "__main__":
    command_line.info_to_stdout()
    try:
        check_group_choices(sys.argv[1:])
        command_line.check_command_line(sys.argv[1:], Path(__file__).parent / "conf")
        lock_explicit_run_folder(sys.argv[1:])
    except ConfigError as err:
        command_line.exit_with(err)
    main()
