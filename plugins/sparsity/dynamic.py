"""Dynamic sparse training: RigL (Evci et al. 2020, "Rigging the Lottery") and SET (Mocanu et al.
2018, "Sparse Evolutionary Training"), one callback composed on
:class:`~plugins.core.masking_callback.MaskingCallback` from the parts in
:mod:`plugins.sparsity.regrowth`. The network is sparse from the first step at a constant
sparsity; every ``update_every`` steps each tensor drops its smallest active weights and grows as
many inactive ones back, at zero, chosen by the ``grow`` criterion: the largest dense gradient
(RigL, ``grow="dense_gradient"``) or at random (SET, ``grow="random"``).

    from plugins.sparsity.dynamic import DynamicSparsifier
    rigl = DynamicSparsifier(amount=0.9, allocation="erk", grow="dense_gradient")
    trainer = L.Trainer(callbacks=[rigl])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.nn.utils import parametrize
from typing_extensions import override

from plugins.core.allocation import ALLOCATIONS
from plugins.core.criteria import CRITERIA, L1
from plugins.core.errors import ConfigError, is_number
from plugins.core.mask_mechanism import EntryMasks
from plugins.core.masking_callback import MaskingCallback
from plugins.core.masks import sparsity
from plugins.core.selection import Target, selection_arguments
from plugins.sparsity import budgets  # noqa: F401 - registers erk
from plugins.sparsity.regrowth import DropFraction, UntilFraction

__all__ = ["ALLOCATION_NAMES", "DynamicSparsifier"]

#: Allocations whose per-tensor counts follow from the shapes alone, so that they stay constant.
ALLOCATION_NAMES = ("layer", "erk")


def _check(key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


class DynamicSparsifier(MaskingCallback):
    """Callback: dynamic sparse training (RigL, SET) of selected weights, in any LightningModule.

    Before the first step each selected tensor is cut to its share of ``amount`` (``allocation``:
    the same fraction per tensor, or ERK) by magnitude, and a mask keeps the zeros. Then at steps
    ``update_every``, ``2 * update_every``, ... while the step is below ``stop_fraction`` of the run
    (``trainer.estimated_stepping_batches``), just before that step's optimizer step (after its
    backward, whose dense gradient RigL reads), each tensor drops ``round(f * active)`` of its
    active weights, the smallest ``|w|``, and grows as many among the then inactive ones (those
    just dropped included, as in RigL's algorithm: one dropped and grown back keeps its weight),
    the highest ``grow`` scores; exact counts, ties in index order. ``f`` decays from
    ``drop_fraction`` (at step 0) to 0 (at ``stop_fraction``) along a cosine; the masks are frozen
    after. Grown weights start at exactly 0 with zeroed optimizer state, and that step's optimizer
    step leaves them at 0; each tensor's count of masked entries stays exactly its share. A grown
    weight is never dropped by the update that grows it.

    Every rank decides alike: the weights are the same, RigL's dense gradient is averaged over
    ranks, SET draws from a generator seeded by the seed and the update index. The update count
    and history are in ``state_dict``, so a resumed run continues exactly. Logs ``{key}/sparsity``
    (by mask), ``{key}/drop_fraction``, ``{key}/regrown`` (weights off before the last update and
    on after it), ``{key}/value`` and ``{key}/layer/<name>`` at each epoch end.

    Cost: between updates one elementwise product per selected tensor in forward and backward;
    per update one score and two exact k-th smallest per tensor, and with RigL one captured
    gradient per tensor on that step (an all-reduce of it under DDP).

    Args:
        amount: the fraction of zeros over the selected weights, in (0, 1).
        allocation: ``layer`` or ``erk``, how ``amount`` splits over the tensors.
        drop_fraction: the fraction of active weights moved at step 0 (decaying), in (0, 1).
        update_every: optimizer steps between updates (RigL's ΔT), an integer >= 1.
        stop_fraction: the fraction of the run's steps after which nothing moves, in (0, 1].
        grow: a registered criterion: ``dense_gradient`` (RigL) or ``random`` (SET).
        targets: ``{include, exclude, module_types}`` as for
            :func:`~plugins.core.selection.select_parameters`.
        bake_at_end: remove the masks at the end of fit, keeping the zeros.
        key: names this callback in error messages, logged metrics and ``summary.json``.

    Raises:
        ConfigError: for a value out of range, an unknown name or targets key (here), or a
            selected tensor that already carries a constraint or another mask (in ``setup``).
    """

    def __init__(
        self,
        amount: float = 0.9,
        allocation: str = "erk",
        drop_fraction: float = 0.3,
        update_every: int = 100,
        stop_fraction: float = 0.75,
        grow: str = "dense_gradient",
        targets: Mapping[str, Any] | None = None,
        bake_at_end: bool = True,
        key: str = "sparsity",
        mask_form: str = "auto",
    ) -> None:
        _check(f"{key}.amount", amount, is_number(amount) and 0 < amount < 1, "a fraction of zeros in (0, 1)")
        budget = ALLOCATIONS.get(allocation, f"{key}.allocation")
        _check(
            f"{key}.allocation",
            allocation,
            allocation in ALLOCATION_NAMES,
            f"one of {', '.join(ALLOCATION_NAMES)}: a count per tensor from its shape, constant through training",
        )
        _check(
            f"{key}.drop_fraction",
            drop_fraction,
            is_number(drop_fraction) and 0 < drop_fraction < 1,
            "a fraction in (0, 1)",
        )
        integer = isinstance(update_every, int) and not isinstance(update_every, bool)
        _check(f"{key}.update_every", update_every, integer and update_every >= 1, "an integer >= 1")
        _check(
            f"{key}.stop_fraction",
            stop_fraction,
            is_number(stop_fraction) and 0 < stop_fraction <= 1,
            "a fraction in (0, 1]",
        )
        grower = CRITERIA.get(grow, f"{key}.grow")
        _check(f"{key}.bake_at_end", bake_at_end, isinstance(bake_at_end, bool), "true or false")
        selection = selection_arguments(targets, key)
        super().__init__(
            schedule=UntilFraction(
                kind="cosine",
                start=drop_fraction,
                end=0.0,
                every_n_steps=update_every,
                stop_fraction=stop_fraction,
                key=key,
            ),
            criterion=L1(),  # on entries: |w|
            allocation=DropFraction(budget(), amount),
            masks=EntryMasks(persistent=True),
            **selection,
            bake_at_end=bake_at_end,
            key=key,
            grow=grower(),
            mask_form=mask_form,
        )
        self.amount = amount
        self.allocation_name = allocation
        self.grow_name = grow

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Refuse manual optimization first: its optimizers step one at a time, and an update at
        the first one's step would rewrite weights whose gradients another loss has not reached."""
        if stage == "fit" and not getattr(pl_module, "automatic_optimization", True):
            raise ConfigError(
                f"{self.key}.grow",
                self.grow_name,
                "a LightningModule with automatic optimization: with automatic_optimization=False "
                "(several optimizers stepped by hand) no step is the one where every weight has its "
                "gradient; use sparsity=gmp or hardshrink there",
            )
        super().setup(trainer, pl_module, stage)

    @override
    def check_targets(self, targets: list[Target]) -> None:
        """Refuse a tensor that already carries a parametrization: under a constraint a grown entry
        would not start at 0 (softplus maps 0 to log 2), and another callback's mask would be
        replaced, its zeros grown back. Refuse a frozen tensor: a weight grown there stays 0, so
        every drop would be for good and its sparsity would creep above its share."""
        for target in targets:
            if parametrize.is_parametrized(target.module, target.tensor_name):
                raise ConfigError(
                    f"{self.key}.targets",
                    target.name,
                    "tensors without a constraint or another plugin's mask: dynamic sparsity regrows "
                    "entries at 0 and replaces its masks (exclude the tensor from one of the selections)",
                )
            if not target.raw.requires_grad:
                raise ConfigError(
                    f"{self.key}.targets",
                    target.name,
                    "tensors that train (requires_grad=True): a weight grown in a frozen tensor stays 0, "
                    "so each move would prune it further (exclude the frozen tensor)",
                )

    @override
    def record(self) -> dict[str, float]:
        return {"drop_fraction": float(self.value or 0.0)}

    @override
    @torch.no_grad()
    def summary(self) -> dict[str, Any]:
        """``{key}/target`` (the amount), ``{key}/selected`` and ``{key}/selected_layers`` (zeros
        reached), ``{key}/updates``, ``{key}/regrown`` (weights grown over the run), allocation
        and grow criterion."""
        out = super().summary()
        out[f"{self.key}/target"] = self.amount
        out[f"{self.key}/selected_layers"] = {t.name: sparsity([t.tensor]) for t in self.targets}
        out[f"{self.key}/updates"] = len(self.history)
        out[f"{self.key}/regrown"] = int(sum(h.get("regrown", 0) for h in self.history))
        out[f"{self.key}/allocation"] = self.allocation_name
        out[f"{self.key}/grow"] = self.grow_name
        return out
