"""One run per folder, and files that are whole or absent.

The lock is an ``flock`` on ``<run dir>/.run.lock``: the kernel drops it when the process ends, how
ever it ends (``kill -9`` included), so a killed run never leaves a folder locked. Every output is
written to a temporary name and renamed into place, so a reader sees the old file or the new one.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from plugins.core.atomic import write_atomically
from plugins.core.errors import ConfigError

__all__ = ["lock_explicit_run_folder", "lock_run_folder", "unlock_run_folder", "write_atomically", "write_json"]

LOCK_NAME = ".run.lock"
_held: dict[Path, int] = {}


def lock_run_folder(run_dir: str | Path, key: str = "hydra.run.dir") -> None:
    """Hold the folder's lock for the rest of this process; refuse a folder another run holds.

    Raises:
        ConfigError: naming ``key`` when the folder is in use by another process, is a file, or
            cannot be written.
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(key, str(run_dir), "a folder (this path is a file)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(key, str(run_dir), f"a folder this user can write ({err.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            key, str(run_dir), f"a folder no other run is using (in use by pid {owner}; one run per folder)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[run_dir] = fd


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as indented JSON, written atomically."""
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float)))


def unlock_run_folder(run_dir: str | Path) -> None:
    """Release the lock :func:`lock_run_folder` took (a sweep runs many jobs in one process)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def lock_explicit_run_folder(argv: list[str], resolved: str | None = None) -> None:
    """Before Hydra writes ``.hydra/`` into it: lock the folder a single run names with
    ``hydra.run.dir=``, so that a second run into a folder in use changes nothing there. A value
    with interpolations is the folder ``resolved`` (as composed: ``${task_name}`` is the run's
    task name, not a folder of that literal name), except one with the time in it
    (``${now:...}``), which Hydra resolves again later: the job locks that one when it starts.
    DDP's extra processes (``LOCAL_RANK`` > 0) share their job's folder and take no lock."""
    if os.environ.get("LOCAL_RANK", "0") not in ("", "0") or {"-m", "--multirun"} & set(argv):
        return
    for arg in argv:
        name, sep, value = arg.partition("=")
        if sep and name.lstrip("+") == "hydra.run.dir" and value:
            value = value.strip("'\"")
            if "${" not in value:
                lock_run_folder(value)
            elif resolved is not None and "${now:" not in value.replace(" ", ""):
                lock_run_folder(resolved)
