"""A resumed run adds to its loggers' history instead of erasing it.

Lightning's CSV logger deletes ``metrics.csv`` when it starts, and TensorBoard would show the steps
between the checkpoint and the crash twice. Before fitting from a checkpoint at ``step``, the CSV
rows logged before ``step`` are kept (later ones came from the stopped run after its checkpoint and
are logged again); TensorBoard purges its events from ``step`` on (``purge_step``, given when
:func:`runner.build.build_loggers` builds it).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger

__all__ = ["keep_history"]


def _keep_csv(logger: CSVLogger, step: int) -> None:
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        header = list(reader.fieldnames or [])
        rows = [row for row in reader if row.get("step", "") != "" and int(float(row["step"])) < step]
    writer = logger.experiment  # Lightning's writer: creating it deletes the old file
    with path.open("w", newline="") as file:
        out = csv.DictWriter(file, fieldnames=header)
        out.writeheader()
        out.writerows(rows)
    writer.metrics_keys = sorted(header)


def keep_history(loggers: list[Any], step: int) -> None:
    """Prepare ``loggers`` for a run resumed at global ``step`` (call before fitting)."""
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            _keep_csv(logger, step)
