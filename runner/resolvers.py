"""The config resolvers: ``${wandb_offline:}`` here, ``${at_launch:}`` in :mod:`runner.sweeps`."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from runner.sweeps import at_launch  # noqa: F401 - registers ${at_launch:}

__all__ = ["wandb_offline"]


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
