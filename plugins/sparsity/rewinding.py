"""Iterative magnitude pruning with rewinding (lottery tickets), in one Lightning fit.

Training runs ``rounds`` rounds of ``epochs_per_round`` epochs. At the start of every round but the
first, ``prune_fraction`` of the selected weights still there go (smallest ``|w|`` first) and the
module is rewound to its state at the start of epoch ``rewind_epoch``: the initial weights for 0
(Frankle & Carbin 2019), an early epoch for ``k > 0`` ("late rewinding", Frankle et al. 2020).

    from plugins.sparsity.rewinding import IterativeMagnitudePruning
    imp = IterativeMagnitudePruning(rounds=5, epochs_per_round=4, prune_fraction=0.2, rewind_epoch=1)
    trainer = L.Trainer(max_epochs=20, callbacks=[imp])  # max_epochs = rounds * epochs_per_round
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from plugins.core.allocation import ALLOCATIONS, Allocation, Cut, prune_count
from plugins.core.checkpoint_form import parametrized_tensors
from plugins.core.criteria import L1
from plugins.core.errors import ConfigError, is_number
from plugins.core.mask_mechanism import EntryMasks
from plugins.core.masking_callback import MaskingCallback
from plugins.core.masks import Mask, get_mask, sparsity, stored
from plugins.core.schedules import Schedule
from plugins.core.selection import Target, selection_arguments

if TYPE_CHECKING:
    from plugins.core.decision import Group

__all__ = ["IterativeMagnitudePruning", "OfRemaining", "RoundSchedule", "SCOPES"]

#: The allocations whose "fraction of what is left" is plain: per tensor, or over all together.
SCOPES = ("layer", "global")


@dataclass(frozen=True)
class RoundSchedule(Schedule):
    """A :class:`~plugins.core.schedules.Schedule` due only at the start of every
    ``every_n_epochs``-th epoch of its window (the round boundaries), not at every epoch in it."""

    every_n_epochs: int = 1

    @override
    def due(self, epoch: int, global_step: int, steps_per_epoch: int, epoch_start: bool) -> bool:
        on_boundary = (epoch - self.begin_epoch) % self.every_n_epochs == 0
        return on_boundary and super().due(epoch, global_step, steps_per_epoch, epoch_start)


class OfRemaining(Allocation):
    """The amount as a fraction of the elements not pruned yet: ``inner`` splits it over the live
    elements alone (per group for ``layer``, over their union for ``global``), and the elements
    already pruned are added to each cut. Cost: one copy of the live scores per group, then
    ``inner``'s."""

    def __init__(self, inner: Allocation) -> None:
        self.inner = inner

    def prepare(self, groups: list[Group]) -> None:
        self.inner.prepare(groups)

    @torch.no_grad()
    def cuts(self, scores: dict[str, torch.Tensor], amount: float, count: bool = False) -> dict[str, Cut]:
        pruned = {name: torch.isneginf(s) for name, s in scores.items()}
        live = {name: s[~pruned[name]] for name, s in scores.items()}
        # The live scores keep their order, so ties at the threshold go in the same index order.
        return {
            name: Cut(int(pruned[name].sum()) + cut.count, cut.threshold)
            for name, cut in self.inner.cuts(live, amount, count).items()
        }


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of ``module`` (stored form), on CPU; not the masks."""
    masks = {f"{name}.mask" for name, m in module.named_modules() if isinstance(m, Mask)}
    state = module.state_dict()
    return {name: t.detach().to("cpu", copy=True) for name, t in state.items() if name not in masks}


def _whole(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


class IterativeMagnitudePruning(MaskingCallback):
    """Callback: iterative magnitude pruning with rewinding (lottery tickets), in any LightningModule.

    Round ``r`` (0-based) trains epochs ``r * epochs_per_round`` to ``(r + 1) * epochs_per_round -
    1``. At the first optimizer step of every round but the first: ``round(prune_fraction * n)`` of
    the ``n`` selected weights still unpruned go by ``|w|`` (per tensor, or over all of them with
    ``scope="global"``), the survivors and every other parameter and buffer (biases, norm scales,
    BatchNorm running statistics) take their values from the start of epoch ``rewind_epoch`` again,
    and the optimizer state of every parameter is cleared (momentum, Adam's moments and step count).
    The learning-rate scheduler is not rewound: it runs once over all rounds.

    Cost: a copy of the module's parameters and buffers on CPU from epoch ``rewind_epoch`` on (also
    in every checkpoint); per prune, one exact k-th smallest per cut and one copy of that state into
    the module; between prunes, one elementwise product per selected tensor (the masks). Logs
    ``{key}/round``, ``{key}/sparsity``, ``{key}/value`` and ``{key}/layer/<name>`` per epoch.

    Args:
        rounds: training rounds (>= 1); ``rounds - 1`` prunes.
        epochs_per_round: epochs per round (>= 1); ``trainer.max_epochs = rounds * epochs_per_round``.
        prune_fraction: fraction of the remaining selected weights pruned at each round, in (0, 1).
        rewind_epoch: the epoch whose starting state is rewound to, in ``[0, epochs_per_round)``.
        scope: ``layer`` (the fraction of each tensor) or ``global`` (of all selected together).
        targets: ``{include, exclude, module_types}`` for :func:`~plugins.core.selection.select_parameters`.
        bake_at_end: remove the mask parametrizations at the end of fit, keeping the zeros.
        key: names this callback in error messages, logged metrics and ``summary.json``.

    Composition: a :class:`RoundSchedule` of value ``prune_fraction``, the magnitude criterion,
    ``scope``'s allocation of the remaining weights (:class:`OfRemaining`), entry masks; this class
    adds the snapshot at ``rewind_epoch`` and the rewind after each prune.

    Raises:
        ConfigError: for a bad argument (here); in ``setup``, for ``trainer.max_epochs`` other than
            ``rounds * epochs_per_round`` and, with ``scope="layer"``, rounds that would prune every
            entry of a tensor; when resuming, for a checkpoint of other rounds.
    """

    def __init__(
        self,
        rounds: int = 5,
        epochs_per_round: int = 4,
        prune_fraction: float = 0.2,
        rewind_epoch: int = 0,
        scope: str = "layer",
        targets: Mapping[str, Any] | None = None,
        bake_at_end: bool = True,
        key: str = "sparsity",
        mask_form: str = "auto",
    ) -> None:
        for name, value in (("rounds", rounds), ("epochs_per_round", epochs_per_round)):
            if not _whole(value, 1):
                raise ConfigError(f"{key}.{name}", value, "an integer >= 1")
        if not is_number(prune_fraction) or not 0 < prune_fraction < 1:
            raise ConfigError(f"{key}.prune_fraction", prune_fraction, "a fraction in (0, 1) of the weights left")
        if not _whole(rewind_epoch, 0) or rewind_epoch >= epochs_per_round:
            allowed = f"an epoch in [0, {key}.epochs_per_round={epochs_per_round}): before the first prune"
            raise ConfigError(f"{key}.rewind_epoch", rewind_epoch, allowed)
        if scope not in SCOPES:
            raise ConfigError(f"{key}.scope", scope, f"one of {', '.join(SCOPES)}")
        if not isinstance(bake_at_end, bool):
            raise ConfigError(f"{key}.bake_at_end", bake_at_end, "true or false")
        selection = selection_arguments(targets, key)
        every = epochs_per_round  # prunes at epochs E, 2E, ..., (R-1)E; with one round, never
        schedule = RoundSchedule(
            "constant", prune_fraction, prune_fraction, every, max(rounds - 1, 1) * every, every_n_epochs=every
        )
        super().__init__(
            schedule=schedule,
            criterion=L1(),  # on entries: |w|
            allocation=OfRemaining(ALLOCATIONS.get(scope, f"{key}.scope")()),
            masks=EntryMasks(persistent=True),
            **selection,
            bake_at_end=bake_at_end,
            key=key,
            mask_form=mask_form,
        )
        self.rounds = rounds
        self.epochs_per_round = epochs_per_round
        self.prune_fraction = float(prune_fraction)
        self.rewind_epoch = rewind_epoch
        self.scope = scope
        self.round = 0
        self.snapshot: dict[str, torch.Tensor] | None = None
        self._module: nn.Module | None = None

    def plan(self) -> dict[str, Any]:
        """The arguments that fix the rounds: a resumed run must have the same."""
        return {
            "rounds": self.rounds,
            "epochs_per_round": self.epochs_per_round,
            "prune_fraction": self.prune_fraction,
            "rewind_epoch": self.rewind_epoch,
            "scope": self.scope,
        }

    # --- Lightning hooks --------------------------------------------------------------------------

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.max_epochs != self.rounds * self.epochs_per_round:
            raise ConfigError(
                "trainer.max_epochs",
                trainer.max_epochs,
                f"{self.rounds * self.epochs_per_round} = {self.key}.rounds ({self.rounds}) x "
                f"{self.key}.epochs_per_round ({self.epochs_per_round}): the rounds fill the run",
            )
        super().setup(trainer, pl_module, stage)
        self._module = pl_module

    @override
    def check_targets(self, targets: list[Target]) -> None:
        """``scope="layer"``: refuse rounds whose prunes would leave a selected tensor no entry."""
        if self.scope != "layer":
            return
        for target in targets:
            left = target.raw.numel()
            for _ in range(self.rounds - 1):
                left -= prune_count(self.prune_fraction, left)
            if left == 0 and target.raw.numel():
                raise ConfigError(
                    f"{self.key}.rounds",
                    self.rounds,
                    f"fewer rounds or a smaller {self.key}.prune_fraction: {self.rounds - 1} prunes of "
                    f"{self.prune_fraction} of the remaining entries leave none of {target.name}",
                )

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The shell acts at optimizer steps its schedule names (on_train_batch_start); the rewind
        # point is the state before the first step of epoch k, whatever the schedule, so it needs an
        # epoch hook. Taken once: should a run resumed within epoch k see this hook again, the
        # checkpoint's snapshot stays (Lightning 2.6 skips the hook on a mid-epoch restart).
        if trainer.current_epoch == self.rewind_epoch and self.snapshot is None:
            self.snapshot = _snapshot(pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self.history:  # round 0 has no update to log yet; the curves still start at epoch 0
            metrics = {f"{self.key}/round": 0.0, f"{self.key}/sparsity": self.reached()["sparsity"]}
            pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "round": self.round, "plan": self.plan(), "snapshot": self.snapshot}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("plan") or {}
        for name, value in self.plan().items():
            if name in saved and saved[name] != value:
                allowed = f"{saved[name]!r}, as in the checkpoint: a resumed run keeps its rounds"
                raise ConfigError(f"{self.key}.{name}", value, allowed)
        super().load_state_dict(state_dict)
        self.round = int(state_dict.get("round", len(self.history)))
        self.snapshot = state_dict.get("snapshot")

    # --- the prune and the rewind -----------------------------------------------------------------

    @override
    def apply(self, value: float, optimizers: list[torch.optim.Optimizer] = ()) -> None:
        """Prune ``value`` of the remaining selected weights (the shell), then rewind."""
        super().apply(value, optimizers)
        self.rewind(optimizers)
        self.round += 1

    @torch.no_grad()
    def rewind(self, optimizers: list[torch.optim.Optimizer] = ()) -> None:
        """Put the snapshot back into the module, keep the pruned entries at 0 and clear the
        optimizer state of every parameter."""
        if self.snapshot is None or self._module is None:
            raise RuntimeError(f"{self.key}: no weights from epoch {self.rewind_epoch} to rewind to")
        live = self._module.state_dict(keep_vars=True)
        for name, value in self.snapshot.items():
            live[name].copy_(value)
        for _, module, tensor_name in parametrized_tensors(self._module):
            mask = get_mask(module, tensor_name)
            if mask is not None:  # any plugin's mask: a stored entry under a 0 stays 0
                for original in stored(module, tensor_name):
                    original.mul_(mask.mask)
        # Cleared, not zeroed in place (masks.zero_optimizer_state): Adam's step count would stay,
        # and its bias correction would then read the fresh moments as long-averaged ones.
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    optimizer.state.pop(param, None)

    @override
    def record(self) -> dict[str, float]:
        return {"round": float(self.round)}

    # --- run outputs ------------------------------------------------------------------------------

    @override
    def summary(self) -> dict[str, Any]:
        """``{key}/target`` (the last round's nominal ``1 - (1 - prune_fraction) ** (rounds - 1)``),
        ``{key}/selected`` (reached), ``{key}/selected_layers``, ``{key}/round`` and the plan."""
        out = super().summary()
        out[f"{self.key}/target"] = 1.0 - (1.0 - self.prune_fraction) ** (self.rounds - 1)
        out[f"{self.key}/selected_layers"] = {t.name: sparsity([t.tensor]) for t in self.targets}
        out[f"{self.key}/round"] = self.round
        out.update({f"{self.key}/{name}": value for name, value in self.plan().items()})
        return out
