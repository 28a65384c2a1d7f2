"""Symmetric and skew-symmetric square matrices (conv weights as ``(out, in * kernel)``)."""

from __future__ import annotations

import torch

from plugins.constraints.base import Constraint, as_matrix, matrix_shape
from plugins.constraints.registry import register_constraint

__all__ = ["Symmetric", "Skew"]


class _Square(Constraint):
    sign = 1.0
    mask_compatible = False

    def fits(self, shape: tuple[int, ...]) -> str | None:
        rows, cols = matrix_shape(shape)
        if len(shape) < 2 or rows != cols:
            return f"a square matrix ({self.name} of a {rows}x{cols} matrix is undefined)"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = as_matrix(x)
        return ((m + self.sign * m.mT) / 2).reshape(x.shape)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w

    @torch.no_grad()
    def violation(self, weight: torch.Tensor) -> torch.Tensor:
        m = as_matrix(weight.detach()).double()
        return torch.linalg.matrix_norm(m - self.sign * m.mT)


@register_constraint("symmetric")
class Symmetric(_Square):
    """``W = W^T``: ``forward(X) = (X + X^T) / 2``, the orthogonal projection onto the symmetric
    matrices, so registering keeps a symmetric weight and moves any other to its nearest symmetric
    matrix. Violation: ``||W - W^T||_F``. Square matrices only. A mask after it may zero
    ``W_ij`` and not ``W_ji``: refused unless ``allow_masked``."""

    sign = 1.0


@register_constraint("skew")
class Skew(_Square):
    """``W = -W^T``: ``forward(X) = (X - X^T) / 2``, the orthogonal projection onto the
    skew-symmetric matrices (nearest point). Violation: ``||W + W^T||_F``. Square matrices only."""

    sign = -1.0
