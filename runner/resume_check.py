"""A resume that the job would refuse, refused before Hydra writes into the run folder.

``ckpt_path=last`` in the folder of a killed run, with a config that does not fit its checkpoint
(another model, other plugins, another ``trainer.max_epochs``), was refused by the job, after
Hydra had rewritten that folder's ``.hydra/`` record of the run's overrides with the refused ones.
:func:`check_resume` runs the job's own checkpoint checks on the command line instead, on the
model :func:`runner.command_line.check_command_line` built, and the job runs them again. Costs one
more read of the checkpoint and one build of the plugins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from runner import validation
from runner.build import build_plugins
from runner.checkpoints import finished, resolve_resume

__all__ = ["check_resume"]


def check_resume(cfg: DictConfig, module: Any, run_dir: str) -> None:
    """Raise the ConfigError the job would raise for resuming ``cfg`` (a single run in
    ``run_dir``) from its ``ckpt_path``; nothing for a fresh start or a finished run's requeue."""
    typed = cfg.get("ckpt_path")
    if typed is None or module is None:
        return
    path, _ = resolve_resume(typed, Path(run_dir))
    checkpoint = validation.read_checkpoint(typed, path)
    if checkpoint is None:
        return
    validation.check_checkpoint_matches(typed, checkpoint, module)
    validation.check_resume_length(cfg, checkpoint)
    if typed == "last" and finished(checkpoint, cfg):
        return  # the job keeps a finished run's outputs and exits 0
    validation.check_checkpoint_plugins(typed, checkpoint, build_plugins(cfg))
