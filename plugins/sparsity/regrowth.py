"""The parts of dynamic sparse training (RigL, SET) on the composed
:class:`~plugins.core.masking_callback.MaskingCallback`, which :mod:`plugins.sparsity.dynamic`
puts together:

- :class:`UntilFraction`: the drop fraction, decaying along a schedule shape (RigL: cosine) from
  step 0 to ``stop_fraction`` of the run, due every ``every_n_steps`` steps before that, never after;
- :class:`DropFraction`: a constant budget of pruned entries per tensor (a registered allocation's
  share of the sparsity), and at each later update the scheduled fraction of each tensor's active
  entries dropped, which the shell's ``grow`` criterion grows back elsewhere;
- :class:`DenseGradient`: RigL's growth score ``|dL/dW|``, registered as criterion
  ``dense_gradient`` (SET grows with the registered ``random`` criterion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from plugins.core.allocation import Allocation, cut_lowest, prune_count
from plugins.core.criteria import CRITERIA, Criterion
from plugins.core.decision import mean_over_ranks
from plugins.core.errors import ConfigError
from plugins.core.masks import get_mask
from plugins.core.schedules import Schedule

if TYPE_CHECKING:
    from plugins.core.decision import Group

__all__ = ["DenseGradient", "DropFraction", "UntilFraction"]


@dataclass(frozen=True)
class UntilFraction(Schedule):
    """A schedule over the first ``stop_fraction`` of the run's optimizer steps: due at step 0 and
    every ``every_n_steps`` steps while ``step < stop_fraction * total_steps`` (RigL's
    ``t mod ΔT == 0 and t < T_end``), with the value ``shape(kind, start, end, step / stop_step)``.

    The run's length comes from :meth:`bind` (the shell calls it with
    ``trainer.estimated_stepping_batches`` at the start of training); epochs play no part.
    Pure; costs nothing.
    """

    stop_fraction: float = 0.75
    total_steps: int | None = None
    key: str = "sparsity"

    def bind(self, total_steps: float) -> UntilFraction:
        """This schedule for a run of ``total_steps`` optimizer steps."""
        if not math.isfinite(total_steps) or total_steps < 1:
            raise ConfigError(
                f"{self.key}.stop_fraction",
                self.stop_fraction,
                f"a run of known length (trainer.max_epochs or max_steps); it has {total_steps} steps",
            )
        return replace(self, total_steps=int(total_steps))

    @property
    def stop_step(self) -> float:
        """The step from which nothing is due: ``stop_fraction`` of the run."""
        if self.total_steps is None:
            raise RuntimeError("UntilFraction.bind(total_steps) was not called: the run's length is unknown")
        return self.stop_fraction * self.total_steps

    def progress(self, epoch: int, global_step: int, steps_per_epoch: int) -> float:
        return min(global_step / self.stop_step, 1.0)

    def due(self, epoch: int, global_step: int, steps_per_epoch: int, epoch_start: bool) -> bool:
        return global_step % (self.every_n_steps or 1) == 0 and global_step < self.stop_step

    def value_at(self, epoch: int, global_step: int, steps_per_epoch: int) -> float:
        return self.value(self.progress(epoch, global_step, steps_per_epoch))


class DropFraction(Allocation):
    """Dynamic sparse training's cuts: each tensor holds ``budget``'s share of ``sparsity`` pruned
    (its :meth:`bounds`, constant), and an update drops ``round(f * active)`` more of its active
    entries, ``f`` being the scheduled drop fraction: the shell grows that many back (exactly the
    bound again). The first update, with nothing pruned yet, cuts down to the bound; a tensor with
    no entry pruned (ERK keeps small layers dense) has nothing to move.

    ``budget`` must know its counts without scores (``layer``, ``erk``). Cost: ``budget``'s, plus
    one exact k-th smallest per tensor.
    """

    def __init__(self, budget: Allocation, sparsity: float) -> None:
        self.budget = budget
        self.sparsity = sparsity

    def prepare(self, groups: list[Group]) -> None:
        self.budget.prepare(groups)

    def bounds(self, sizes: dict[str, int], amount: float, count: bool = False) -> dict[str, int]:
        return self.budget.bounds(sizes, self.sparsity)

    @torch.no_grad()
    def cuts(self, scores, amount, count=False):
        bounds = self.bounds({name: s.numel() for name, s in scores.items()}, amount)
        out = {}
        for name, s in scores.items():
            pruned = int(torch.isneginf(s).sum())
            if pruned < bounds[name] or pruned == 0:
                k = bounds[name]
            else:
                k = pruned + prune_count(amount, s.numel() - pruned)
            out[name] = cut_lowest([s], k)
        return out


@CRITERIA.register("dense_gradient")
class DenseGradient(Criterion):
    """RigL's growth score (Evci et al. 2020, "Rigging the Lottery"): ``|dL/dW|``, the gradient
    with respect to the weight the module computes with, dense (also where the mask is 0, where
    the stored tensor's ``.grad`` is 0). The shell has each mask capture it on the steps that move
    (:attr:`~plugins.core.masks.Mask.dense_grad`, summed over the micro-batches of the step); under
    DDP, where it escapes DDP's reduction, it is averaged over ranks here, so every rank grows the
    same entries. Non-finite values (a mixed-precision overflow) score 0.

    Entries only (one tensor per group, a persistent mask). Cost: one all-reduce of each tensor's
    gradient per update under DDP, otherwise one ``abs``.
    """

    def prepare(self, groups: list[Group]) -> None:
        for group in groups:
            if group.dim is not None:
                raise ConfigError(
                    "pruning.method",
                    "dense_gradient",
                    f"a criterion for slices: dense_gradient scores entries to regrow (sparsity=rigl), "
                    f"not {group.describe()}",
                )

    def scores(self, group, keep, generator):
        member = group.members[0]
        mask = get_mask(member.module, member.tensor_name)
        grad = mask.dense_grad if mask is not None else None
        if grad is None:  # not used in this step's forward: no gradient reached it
            grad = torch.zeros(member.raw.shape, dtype=torch.float32, device=member.raw.device)
        grad = mean_over_ranks(grad.float())
        return torch.where(torch.isfinite(grad), grad.abs(), 0.0)
