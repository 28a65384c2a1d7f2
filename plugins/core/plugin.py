"""The base of every plugin callback: what a run asks of it, and its checkpoints' form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from typing_extensions import override

from plugins.core.checkpoint_form import install_load_hook, restore_raw, to_plain_form
from plugins.core.errors import ConfigError

__all__ = ["PluginCallback", "refuse_sharded_strategy"]

#: Strategies that shard a tensor across ranks: a mask, a threshold or a parametrization registered
#: on the whole tensor would act on one rank's shard. Not verified yet (docs/reference/models.md), so refused.
SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def refuse_sharded_strategy(trainer: L.Trainer | None, key: str) -> None:
    """Raise ConfigError at ``trainer.strategy`` under a strategy that shards parameters."""
    strategy = getattr(trainer, "strategy", None)
    sharded = [c.__name__ for c in type(strategy).__mro__ if c.__name__ in SHARDED_STRATEGIES]
    if sharded:
        raise ConfigError(
            "trainer.strategy",
            sharded[0],
            f"a strategy that keeps whole tensors on every rank (ddp, a single device): {key} is not "
            "verified on sharded parameters yet (docs/reference/models.md, 'Models bigger than one device')",
        )


class PluginCallback(L.Callback):
    """A Lightning callback that parametrizes a user's module: its checkpoints are in plain form
    (:mod:`plugins.core.checkpoint_form`), its resumes restore the raw entries, and it reports
    ``summary()`` keys for ``summary.json`` and ``save_plots()`` files. Costs one evaluation of
    each parametrization per checkpoint save."""

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        refuse_sharded_strategy(trainer, getattr(self, "key", type(self).__name__))
        install_load_hook(pl_module)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        to_plain_form(checkpoint, pl_module)

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        restore_raw(pl_module, checkpoint)

    def summary(self) -> dict[str, Any]:
        """Keys for ``summary.json``."""
        return {}

    def save_plots(self, directory: str | Path) -> list[Path]:
        """Write this plugin's plots into ``directory``; returns their paths."""
        return []

    def headline(self) -> dict[str, float]:
        """The few numbers that say how this plugin is doing, for the console's epoch line and the
        progress bar: ``{key}/<what>`` -> value, named as the plugin logs them. By default the
        sparsity reached at the last update of a plugin that keeps a ``history`` of updates (every
        masking callback, STR); nothing before its first update. Costs a dictionary lookup."""
        history = getattr(self, "history", None)
        if not history or "sparsity" not in history[-1]:
            return {}
        return {f"{getattr(self, 'key', type(self).__name__)}/sparsity": float(history[-1]["sparsity"])}
