"""Train one model from a Hydra config: validate -> seed -> build -> fit -> test -> write outputs.

    python train.py                                  # the default experiment (digits CNN)
    python train.py +experiment=ucr_baseline data.name=ArrowHead
    python train.py -m norm=batch,instance,group,layer

Run outputs (see DESIGN.md): checkpoints/last.ckpt, summary.json, model.pt (+ model.pt2), plots, logger files.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from plugins.core.errors import ConfigError
from runner import command_line, validation
from runner.build import build_callbacks, build_loggers, build_model, build_plugins, close_loggers
from runner.checkpoints import AtomicCheckpointIO, finished, resolve_resume, stop_on_signal
from runner.console import quiet_known_noise, quiet_not_resumable
from runner.dashboards import publish
from runner.ddp import use_job_scoped_ddp_children
from runner.logger_history import keep_history
from runner.outputs import optimized_value, write_outputs
from runner.resolvers import wandb_offline  # noqa: F401 - registers ${wandb_offline:} and ${at_launch:}
from runner.run_folder import lock_explicit_run_folder, lock_run_folder, unlock_run_folder

CONF = Path(__file__).parent / "conf"


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
    quiet_known_noise()  # the litlogger tip and the _pytree deprecation: nothing about this run
    # Validate: every value a user can type, before anything is built or written.
    validation.check_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # DDP's extra processes share their job's folder
        lock_run_folder(output_dir)
    ckpt_path, resume_line = resolve_resume(cfg.get("ckpt_path"), output_dir)
    # Seed, then build.
    use_job_scoped_ddp_children()
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data, seed=cfg.seed)
    quiet_not_resumable(datamodule)
    validation.check_batches(cfg, datamodule)
    module = build_model(cfg, datamodule)
    checkpoint = validation.read_checkpoint(cfg.get("ckpt_path"), ckpt_path)  # None: a fresh start
    validation.check_checkpoint_matches(cfg.get("ckpt_path"), checkpoint, module)
    validation.check_resume_length(cfg, checkpoint)
    summary_file = output_dir / "summary.json"
    requeued = cfg.get("ckpt_path") == "last" and checkpoint is not None and finished(checkpoint, cfg)
    if requeued and summary_file.is_file():
        # A requeue of a job that had finished: resuming would train nothing and rewrite its outputs.
        print(f"{output_dir} has finished training: nothing left to do, its outputs are kept", flush=True)
        return optimized_value(cfg, json.loads(summary_file.read_text()), sweep=_in_sweep())
    plugins = build_plugins(cfg)
    validation.check_checkpoint_plugins(cfg.get("ckpt_path"), checkpoint, plugins)
    loggers = build_loggers(cfg, resume_step=None if checkpoint is None else checkpoint["global_step"])
    if checkpoint is not None:
        keep_history(loggers, checkpoint["global_step"])
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
    # Fit, then test; then (rank zero) write the outputs and show them in the dashboards, whose
    # loggers close last: W&B's run summary and TensorBoard's hparams need the final metrics.
    summary = None
    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException:
            stop_on_signal(trainer)
        # The last validation epoch's metrics: what a sweeper optimizes (optimized_metric).
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        metrics.update({k: float(v) for k, v in trainer.test(module, datamodule=datamodule, verbose=False)[0].items()})
        if trainer.is_global_zero:
            summary = write_outputs(cfg, module, datamodule, plugins, metrics, output_dir, started)
            publish(loggers, cfg, summary, [output_dir / name for name in summary["plots"]], trainer.global_step)
    finally:
        close_loggers(loggers)
    if summary is None:  # DDP's other ranks
        return float(metrics["test/acc"])
    return optimized_value(cfg, summary, sweep=_in_sweep())


def _in_sweep() -> bool:
    """Whether a sweeper launched this job (and waits for its optimized value)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


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
        command_line.check_group_choices(sys.argv[1:], CONF)
        run_dir = command_line.check_command_line(sys.argv[1:], CONF)
        lock_explicit_run_folder(sys.argv[1:], run_dir)
    except ConfigError as err:
        command_line.exit_with(err)
    main()
