"""Criteria: scores for the elements of a group of weights (its entries, or its slices along
``dim``); the lowest-scored elements go. Each criterion is one class in the :data:`CRITERIA`
registry (``pruning.method`` names it); a new one is a new class, never a branch in a callback.
Pure functions of tensors, testable without a Trainer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch

from plugins.core.registry import Registry

if TYPE_CHECKING:
    from plugins.core.decision import Group

__all__ = ["CRITERIA", "Criterion", "LpNorm", "L1", "L2", "Random"]


class Criterion(ABC):
    """Scores elements: ``scores(group, keep, generator)`` -> one score >= 0 per element of the
    :class:`~plugins.core.decision.Group` (higher is kept). With ``group.dim=None`` the elements
    are the entries of its one tensor; otherwise the slices along ``group.dim`` shared by every
    member (one tensor, or a coupled group, whose biases and norms are ``group.extras``).
    ``group.weights()`` are the tensors as the module computes with them. ``keep`` (bool, one per
    element) says which are not pruned yet; ``generator`` is seeded per update and group.

    A criterion that needs more than the weights (gradients, activations) overrides
    :meth:`observe`, which the callback calls after every backward pass. One whose scores are the
    magnitudes of a tensor overrides :meth:`magnitudes`, so that an update reads that tensor in
    chunks instead of holding every group's scores."""

    @abstractmethod
    def scores(self, group: Group, keep: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One score per element."""

    def magnitudes(self, group: Group) -> torch.Tensor | None:
        """A tensor (one entry per element, in order) whose ``|x|`` are exactly :meth:`scores`, or
        ``None`` (the default): then :func:`~plugins.core.decision.decide` calls :meth:`scores`."""
        return None

    def prepare(self, groups: list[Group]) -> None:  # noqa: B027 - optional, most criteria need nothing
        """Called once in ``setup`` with the groups, before training: refuse (ConfigError) a group
        this criterion cannot score, e.g. one without the norm layer that BN-scale reads."""

    def state_dict(self) -> dict[str, Any]:
        """What the criterion accumulates between updates (for the checkpoint); nothing by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional
        """Restore :meth:`state_dict`."""

    def observe(self, groups: list[Group]) -> None:  # noqa: B027 - optional, most criteria need nothing
        """Called after each backward pass (gradients are in ``.grad``): accumulate what scores need."""


CRITERIA: Registry[type[Criterion]] = Registry("pruning criterion", Criterion)


@CRITERIA.register("random")
class Random(Criterion):
    """``torch.nn.utils.prune.RandomStructured``: new slices drawn uniformly among those kept.
    The kept slices get a random order as scores, so the lowest ``k`` are a uniform draw."""

    def scores(self, group, keep, generator):
        kept = keep.reshape(-1).nonzero().flatten().cpu()
        order = torch.randperm(kept.numel(), generator=generator)
        out = torch.zeros(keep.numel())
        out[kept[order]] = torch.arange(kept.numel(), dtype=torch.float32)
        return out.to(keep.device)


class LpNorm(Criterion):
    """``LnStructured``: the norm of each slice (of all the group's slices together), degree ``p``;
    on entries (``dim=None``) the magnitude ``|w|``, which an update reads from the weight in
    chunks (:meth:`magnitudes`) rather than as a score tensor."""

    p: float = 2.0

    def magnitudes(self, group):
        return group.members[0].tensor.detach() if group.dim is None else None

    def scores(self, group, keep, generator):
        weights, dim = group.weights(), group.dim
        if dim is None:
            return weights[0].abs()
        p = self.p
        norms = []
        for w in weights:
            dims = [d for d in range(w.dim()) if d != dim % w.dim()]
            norms.append(torch.linalg.vector_norm(w.detach().float(), ord=p, dim=dims).cpu())
        return norms[0] if len(norms) == 1 else torch.stack(norms).pow(p).sum(0).pow(1.0 / p)


@CRITERIA.register("l1")
class L1(LpNorm):
    """The L1 norm of each slice."""

    p = 1.0


@CRITERIA.register("l2")
class L2(LpNorm):
    """The L2 norm of each slice."""

    p = 2.0
