"""What every constraint is: a ``torch.nn.utils.parametrize`` parametrization with a violation measure.

A constraint maps a free tensor onto its constraint set in ``forward`` and, where it can, maps a
given weight back in ``right_inverse`` (so that registering keeps a weight that already satisfies
the constraint). A few constraints keep the weight as it is in ``forward`` (the identity) and
instead *project* the stored tensor back onto the set after each optimizer step (``projects`` is
true, :meth:`Constraint.project_`): the cheap way for expensive maps such as orthogonality.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import nn

from plugins.core.errors import ConfigError

__all__ = ["Constraint", "ConstraintError", "as_matrix", "matrix_shape"]


class ConstraintError(ConfigError):
    """This tensor cannot carry this constraint (its shape, its place in a stack, a mask on it)."""


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The matrix a weight is seen as: ``(out, in * kernel...)``; a vector is one row."""
    if len(shape) == 1:
        return (1, shape[0])
    rows = shape[0]
    cols = 1
    for size in shape[1:]:
        cols *= size
    return (rows, cols)


def as_matrix(x: torch.Tensor) -> torch.Tensor:
    """``x`` viewed (or reshaped) as the matrix of :func:`matrix_shape`."""
    return x.reshape(matrix_shape(tuple(x.shape)))


class Constraint(nn.Module):
    """Base class of the registered constraints.

    Subclasses set the class attributes and override what applies:

    - ``forward(x)``: the map onto the constraint set (the identity when ``projects``);
    - ``right_inverse(w)``: a free tensor that ``forward`` maps to ``w`` (or its nearest point);
    - :meth:`fits`: why a shape cannot carry the constraint (``None`` when it can);
    - :meth:`build`: shape-dependent state (buffers, learned parameters), called once before
      registration with the weight as it is then;
    - :meth:`violation`: how far a weight is from the set (0 = holds), a float64 scalar;
    - :meth:`project_`: for ``projects`` constraints, put the stored tensor back on the set;
    - :meth:`finalize_`: last change before the parametrization is baked into a plain weight.

    Attributes:
        name: the registry name (set by :func:`~plugins.constraints.register_constraint`).
        mask_compatible: whether the constraint still holds once a 0/1 mask zeroes entries after it.
        projects: ``forward`` is the identity; the constraint is kept by :meth:`project_`.
        first_only: must be the first parametrization on its tensor (projections, multi-input).
    """

    name: ClassVar[str] = ""
    mask_compatible: ClassVar[bool] = True
    projects: bool = False
    first_only: bool = False

    # Set by WeightConstraints when registered: the tensor's qualified name, the rule's config key,
    # whether the user accepted a mask that breaks the constraint, and the axis of the layer's
    # output units (1 for a weight stored (in, out, ...): Hugging Face Conv1D, transposed convs).
    target: str = "?"
    rule_key: str = "constraints.rules[?]"
    allow_masked: bool = False
    unit_dim: int = 0

    def fits(self, shape: tuple[int, ...]) -> str | None:
        """``None`` if a tensor of ``shape`` can carry the constraint, else the reason it cannot."""
        return None if len(shape) >= 1 else "a tensor with at least one dimension"

    def build(self, weight: torch.Tensor) -> None:
        """Create shape-dependent state from the weight as it is before registration."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def violation(self, weight: torch.Tensor) -> torch.Tensor:
        """How far ``weight`` is from the constraint set; 0 when it holds."""
        return torch.zeros((), dtype=torch.float64)

    def project_(self, weight: torch.Tensor) -> None:
        """In place: put the stored tensor back on the set (``projects`` constraints only)."""

    def finalize_(self) -> None:
        """Called once before baking (e.g. a learned mask rounds its gates)."""

    def refuse_mask(self) -> None:
        """Called by :func:`plugins.core.masks.ensure_mask` before a mask goes on this tensor."""
        if self.mask_compatible:
            return
        if self.allow_masked:
            warnings.warn(
                f"{self.target}: a mask after the {self.name} constraint zeroes entries, so the "
                f"constraint will not hold on the masked weight ({self.rule_key}.allow_masked=true)",
                stacklevel=3,
            )
            return
        raise ConstraintError(
            f"{self.rule_key}.allow_masked",
            False,
            f"true to accept a sparsity/pruning mask on {self.target}, whose {self.name} "
            "constraint cannot hold with zeroed entries (or exclude the tensor from one of the "
            "two selections)",
        )

    def extra_repr(self) -> str:
        return f"name={self.name!r}"
