"""What a run prints: one line per epoch when stdout is not a terminal (CI, files, SLURM logs), a
Rich progress bar that also shows the plugins' headline numbers when it is, and no third-party
lines that say nothing about the run (:func:`quiet_known_noise`)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from typing_extensions import override

__all__ = ["EpochLine", "HeadlineProgressBar", "headlines", "quiet_known_noise"]

#: torch 2.13 deprecates the ``LeafSpec`` that Lightning 2.6's ``_pytree`` still builds (a FutureWarning per run).
PYTREE_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
#: Lightning's warning on a mid-epoch resume, true of loaders that do not skip what was trained.
NOT_RESUMABLE = "You're resuming from a checkpoint that ended before the epoch ended"
#: Lightning 2.6 advertises litlogger at every Trainer construction, with no switch to turn it off.
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging and experiment tracking"
#: The loggers Lightning's ``rank_zero_info`` writes through (``lightning_utilities`` uses the last imported).
#: The ONNX exporter's optimizer passes log every node they skip at INFO, which Hydra's logging shows.
ONNX_PASS_LOGGERS = ("onnxscript", "onnx_ir")
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def headlines(plugins: Sequence[L.Callback]) -> dict[str, float]:
    """Every plugin's :meth:`~plugins.core.plugin.PluginCallback.headline`, in the plugins' order."""
    out: dict[str, float] = {}
    for plugin in plugins:
        headline = getattr(plugin, "headline", None)
        if headline is not None:
            out.update(headline())
    return out


def _number(value: float) -> str:
    # Four significant digits: 0.9 for a 90% target reached, 3.2e-07 for a violation; + 0.0 turns
    # a -0.0 (a violation measured as -min(w, 0)) into 0.
    return f"{value + 0.0:.4g}"


class EpochLine(L.Callback):
    """Prints one plain line per epoch when stdout is not a terminal (CI, files, SLURM logs): the
    epoch's loss, accuracy and F1, then each plugin's headline (sparsity reached, lambda, slices
    kept, worst violation). Costs one ``headline()`` call per plugin per epoch."""

    def __init__(self, plugins: Sequence[L.Callback] = ()) -> None:
        self.plugins = list(plugins)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        shown = {k: v for k, v in trainer.callback_metrics.items() if k.endswith(("loss_epoch", "/acc", "/f1"))}
        parts = [f"{k}={float(v):.4f}" for k, v in sorted(shown.items())]
        parts += [f"{k}={_number(v)}" for k, v in headlines(self.plugins).items()]
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} {' '.join(parts)}", flush=True)


class HeadlineProgressBar(RichProgressBar):
    """Lightning's Rich progress bar with each plugin's headline beside the logged metrics (read
    from the plugins at each refresh, so nothing is logged twice). Costs one ``headline()`` call per
    plugin per refresh."""

    def __init__(self, plugins: Sequence[L.Callback] = (), **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.plugins = list(plugins)

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float | dict]:
        items = super().get_metrics(trainer, pl_module)
        items.update({k: _number(v) for k, v in headlines(self.plugins).items()})
        return items


def quiet_not_resumable(datamodule: object) -> None:
    """Silence Lightning's "your dataloader is not resumable" warning for a data module that skips
    the batches a mid-epoch checkpoint had trained (``skips_trained_batches``, ours): Lightning only
    looks for a ``state_dict`` on the loader, and the warning would say a resume is unreliable when
    it is exact (``tests/test_resume.py``). Any other data module keeps the warning."""
    if getattr(datamodule, "skips_trained_batches", False):
        warnings.filterwarnings("ignore", message=NOT_RESUMABLE)


class _DropMessage(logging.Filter):
    """Drops the log records whose message starts with ``start``; lets every other one through."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    @override
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def quiet_known_noise() -> None:
    """Silence, at their source, the two lines every run printed that say nothing about it: the
    ``_pytree`` deprecation (this exact message, as FutureWarning) and Lightning's litlogger tip
    (a filter on Lightning's rank-zero loggers for this message only). Every other warning and
    info line still shows. Idempotent: a sweep's jobs call it once each."""
    warnings.filterwarnings("ignore", message=PYTREE_DEPRECATION, category=FutureWarning)
    for name in ONNX_PASS_LOGGERS:  # an INFO line per optimizer pass and node of export.onnx=true
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == LITLOGGER_TIP for f in logger.filters):
            logger.addFilter(_DropMessage(LITLOGGER_TIP))
