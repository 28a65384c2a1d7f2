"""Pruning criteria: scores for the slices along ``dim`` of a group of weights; the lowest-scored
slices go. Each criterion is one class in the :data:`CRITERIA` registry (``pruning.method`` names
it); a new one is a new class, never a branch in the pruner. Pure functions of tensors, testable
without a Trainer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from plugins.core.registry import Registry

__all__ = ["CRITERIA", "Criterion", "LpNorm", "L1", "L2", "Random", "select_slices"]


class Criterion(ABC):
    """Scores slices: ``scores(weights, dim, keep, generator)`` -> one float per slice (higher is
    kept). ``weights`` share the slices (one tensor, or a coupled group); ``keep`` is the current
    keep vector; ``generator`` is seeded per update and group (for random criteria)."""

    @abstractmethod
    def scores(
        self, weights: list[torch.Tensor], dim: int, keep: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """One score per slice along ``dim``."""


CRITERIA: Registry[type[Criterion]] = Registry("pruning criterion", Criterion)


@CRITERIA.register("random")
class Random(Criterion):
    """``torch.nn.utils.prune.RandomStructured``: new slices drawn uniformly among those kept.
    The kept slices get a random order as scores, so the lowest ``k`` are a uniform draw."""

    def scores(self, weights, dim, keep, generator):
        kept = keep.nonzero().flatten()
        order = torch.randperm(kept.numel(), generator=generator)
        out = torch.full((keep.numel(),), -1.0)
        out[kept[order]] = torch.arange(kept.numel(), dtype=torch.float32)
        return out


class LpNorm(Criterion):
    """``LnStructured``: the norm of each slice (of all the group's slices together), degree ``p``."""

    p: float = 2.0

    def scores(self, weights, dim, keep, generator):
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


def select_slices(
    criterion: Criterion | str,
    weights: list[torch.Tensor],
    dim: int,
    keep: torch.Tensor,
    prune: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The new keep vector (bool, one entry per slice along ``dim``) with ``prune`` slices pruned:
    the lowest-scored of ``criterion``. Already pruned slices stay pruned; nothing changes when
    ``prune`` is not above their number."""
    if isinstance(criterion, str):
        criterion = CRITERIA.get(criterion, "pruning.method")()
    n = keep.numel()
    if prune <= int((~keep).sum()):
        return keep.clone()
    score = criterion.scores(weights, dim, keep, generator or torch.Generator()).float()
    score = score.masked_fill(~keep, -float("inf"))  # already pruned slices stay pruned
    new = torch.zeros(n, dtype=torch.bool)
    new[torch.topk(score, k=n - prune, largest=True).indices] = True
    return new
