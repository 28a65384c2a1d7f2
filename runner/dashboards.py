"""What a finished run shows in its dashboards, written once ``summary.json`` is (before the loggers
close):

- TensorBoard: the run's config as hparams **with its final metrics** (``test/acc``,
  ``sparsity/global``, ``params/nonzero`` and the ``optimized_metric``), so the runs of a sweep
  compare in the HPARAMS tab; and every saved plot as an image (``plots/<file stem>``).
- Weights & Biases: every scalar of ``summary.json`` in the run summary (nested keys joined with
  ``/``); and every saved plot as an image (``plots/<file stem>``).
- CSV takes neither: ``summary.json`` and the PNG files beside it are its record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

__all__ = ["FINAL_METRICS", "flat_scalars", "final_metrics", "publish"]

#: The ``summary.json`` keys TensorBoard's HPARAMS tab compares runs on (with the ``optimized_metric``).
FINAL_METRICS = ("test/acc", "sparsity/global", "params/nonzero")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flat_scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The numbers, strings and booleans of ``values``, nested mappings flattened with ``/``
    (``{"sparsity/layers": {"net.0.weight": 0.5}}`` -> ``{"sparsity/layers/net.0.weight": 0.5}``);
    lists and ``None`` are left out."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_scalars(value, f"{name}/"))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
    return out


def final_metrics(cfg: DictConfig, summary: Mapping[str, Any]) -> dict[str, float]:
    """:data:`FINAL_METRICS` and ``cfg.optimized_metric``, those of them that ``summary`` holds as numbers."""
    keys = [*FINAL_METRICS, cfg.get("optimized_metric") or "test/acc"]
    return {key: float(summary[key]) for key in dict.fromkeys(keys) if _is_number(summary.get(key))}


def _tensorboard(
    logger: TensorBoardLogger, cfg: DictConfig, summary: Mapping[str, Any], plots: list[Path], step: int
) -> None:
    import matplotlib.image

    # Lightning flattens the nested config with "/" and turns what TensorBoard refuses (lists, None) into strings.
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True), metrics=final_metrics(cfg, summary), step=step)
    for path in plots:
        logger.experiment.add_image(f"plots/{path.stem}", matplotlib.image.imread(path), step, dataformats="HWC")
    logger.experiment.flush()


def _wandb(logger: WandbLogger, summary: Mapping[str, Any], plots: list[Path], step: int) -> None:
    for path in plots:
        logger.log_image(key=f"plots/{path.stem}", images=[str(path)], step=step)
    # Last: W&B's summary otherwise keeps the last logged value of a key.
    logger.experiment.summary.update(flat_scalars(summary))


def publish(loggers: Iterable[Any], cfg: DictConfig, summary: Mapping[str, Any], plots: list[Path], step: int) -> None:
    """Show a finished run's ``summary`` (as written to ``summary.json``) and ``plots`` (PNG paths)
    in each logger that takes them, at optimizer step ``step``; call on rank zero, before the
    loggers close. Costs one PNG read per plot and logger."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            _tensorboard(logger, cfg, summary, plots, step)
        elif isinstance(logger, WandbLogger):
            _wandb(logger, summary, plots, step)
