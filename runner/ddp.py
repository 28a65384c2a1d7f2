"""DDP inside Hydra: each extra process re-runs only its job, in its job's folder."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["ddp_child_command", "use_job_scoped_ddp_children"]


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
    """Make Lightning start DDP's extra processes with :func:`ddp_child_command`. Lightning has no
    public hook for this command; its private ``_hydra_subprocess_cmd`` is the one place to set it."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = ddp_child_command
