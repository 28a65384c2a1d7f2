"""Norm constraints: PyTorch's spectral and weight normalization, and row norms (unit or bounded).

Rows are those of the weight seen as a ``(out, in * kernel)`` matrix: one row per output unit or
channel, along the axis the layer keeps its outputs on (dim 0; dim 1 for Hugging Face's ``Conv1D``
and transposed convolutions, which store ``(in, out, ...)``: ``Constraint.unit_dim``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations

from plugins.constraints.base import Constraint, as_matrix
from plugins.constraints.registry import register_constraint
from plugins.core.errors import ConfigError, is_number

__all__ = ["SpectralNorm", "WeightNorm", "UnitNorm", "MaxNorm"]


def _borrow(kind: str, weight: torch.Tensor, **kwargs) -> nn.Module:
    """PyTorch's parametrization module ``kind`` built for ``weight`` on a throw-away holder."""
    holder = nn.Module()
    holder.weight = nn.Parameter(weight.detach().clone())
    getattr(parametrizations, kind)(holder, "weight", **kwargs)
    return holder.parametrizations.weight[0]


@register_constraint("spectral_norm")
class SpectralNorm(Constraint):
    """PyTorch's spectral normalization: ``W / sigma``, ``sigma`` the largest singular value of the
    ``(out, -1)`` matrix (out along the layer's output axis: dim 1 of a transposed convolution, as
    PyTorch's ``spectral_norm`` takes it), estimated by power iteration (``n_power_iterations`` per
    training forward). Registering rescales the weight to spectral norm 1 (not the nearest point).
    Violation: ``| ||W||_2 - 1 |``, exact (SVD) in float64. A mask after it can raise ``||W||_2``:
    refused unless ``allow_masked``.

    Args:
        n_power_iterations: power-iteration steps per training forward (more: tighter estimate).
        eps: added to norms in the power iteration.
    """

    mask_compatible = False

    def __init__(self, n_power_iterations: int = 1, eps: float = 1e-12) -> None:
        super().__init__()
        if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) or n_power_iterations < 1:
            raise ConfigError("n_power_iterations", n_power_iterations, "an integer >= 1")
        if not is_number(eps) or eps <= 0:
            raise ConfigError("eps", eps, "a number > 0")
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.inner: nn.Module | None = None

    def fits(self, shape: tuple[int, ...]) -> str | None:
        return None if len(shape) >= 2 else "a matrix or a conv weight (at least 2 dimensions)"

    def build(self, weight: torch.Tensor) -> None:
        self.inner = _borrow(
            "spectral_norm", weight, n_power_iterations=self.n_power_iterations, eps=self.eps, dim=self.unit_dim
        )
        # A few extra power iterations now, so the first forwards already normalize well.
        with torch.no_grad():
            self.inner._power_method(self.inner._reshape_weight_to_matrix(weight.detach()), 15)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return self.inner.right_inverse(w)

    @torch.no_grad()
    def violation(self, weight: torch.Tensor) -> torch.Tensor:
        matrix = as_matrix(weight.detach().movedim(self.unit_dim, 0)).double()
        return (torch.linalg.matrix_norm(matrix, ord=2) - 1).abs()


@register_constraint("weight_norm")
class WeightNorm(Constraint):
    """PyTorch's weight normalization ``W = g * v / ||v||`` (norms over every dimension but
    ``dim``): a reparametrization, not a constraint; every weight is reachable and registering
    keeps it. Must be first on its tensor (two stored tensors, ``original0`` = g and
    ``original1`` = v). Violation: ``max | ||W_i|| - g_i |``, which is 0 up to rounding.

    Args:
        dim: the dimension that keeps its own norm; default: the output units' (dim 0, or dim 1
            of a weight stored (in, out, ...)), one norm per output unit.
    """

    first_only = True

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise ConfigError("dim", dim, "an integer dimension, or null for the output units'")
        self.dim = dim
        self.inner: nn.Module | None = None

    def fits(self, shape: tuple[int, ...]) -> str | None:
        if self.dim is not None and not -len(shape) <= self.dim < max(len(shape), 1):
            return f"a tensor with a dimension {self.dim} (args.dim)"
        return None

    @property
    def norm_dim(self) -> int:
        """``dim`` as given, else the output units' axis."""
        return self.unit_dim if self.dim is None else self.dim

    def build(self, weight: torch.Tensor) -> None:
        self.inner = _borrow("weight_norm", weight, dim=self.norm_dim)

    def forward(self, weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
        return self.inner(weight_g, weight_v)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.right_inverse(weight)

    @torch.no_grad()
    def violation(self, weight: torch.Tensor) -> torch.Tensor:
        # A reparametrization holds by definition: what is left is rounding.
        w = weight.detach().double()
        g = torch.norm_except_dim(w, 2, self.norm_dim)
        return (torch._weight_norm(w, g, self.norm_dim) - w).abs().max()


def _row_norms(x: torch.Tensor, dim: int = 0, eps: float = 0.0) -> torch.Tensor:
    """Norms of the rows (one per index of ``dim``; a vector is one row), shaped to broadcast
    against ``x``."""
    norms = as_matrix(x.movedim(dim, 0) if x.ndim > 1 else x).norm(dim=1)
    if eps:
        norms = norms.clamp_min(eps)
    if x.ndim <= 1:
        return norms
    shape = [1] * x.ndim
    shape[dim] = -1
    return norms.reshape(shape)


@register_constraint("unit_norm")
class UnitNorm(Constraint):
    """Rows of norm 1: ``W_i = X_i / ||X_i||``. Registering keeps a weight with unit rows and
    otherwise normalizes each row (its nearest point on the sphere). Violation:
    ``max_i | ||W_i|| - 1 |``. A mask after it shortens rows: refused unless ``allow_masked``.

    Args:
        eps: smallest row norm divided by (a zero row stays zero).
    """

    mask_compatible = False

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        if not is_number(eps) or eps <= 0:
            raise ConfigError("eps", eps, "a number > 0")
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / _row_norms(x, self.unit_dim, self.eps)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w

    @torch.no_grad()
    def violation(self, weight: torch.Tensor) -> torch.Tensor:
        return (_row_norms(weight.detach().double(), self.unit_dim) - 1).abs().max()


@register_constraint("max_norm")
class MaxNorm(Constraint):
    """Rows of norm at most ``radius``: ``W_i = X_i * min(1, radius / ||X_i||)`` (the max-norm
    constraint of Srivastava et al. 2014, as a parametrization). Registering keeps the weight; a
    longer row is scaled onto the ball (its nearest point). Violation:
    ``max(0, max_i ||W_i|| - radius)``. A mask after it only shortens rows: allowed.

    Args:
        radius: the largest row norm (> 0).
    """

    def __init__(self, radius: float = 1.0) -> None:
        super().__init__()
        if not is_number(radius) or radius <= 0:
            raise ConfigError("radius", radius, "a number > 0")
        self.radius = float(radius)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = (self.radius / _row_norms(x, self.unit_dim, 1e-30)).clamp(max=1.0)
        return x * scale

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w

    @torch.no_grad()
    def violation(self, weight: torch.Tensor) -> torch.Tensor:
        norms = _row_norms(weight.detach().double(), self.unit_dim)
        return (norms.max() - self.radius).clamp(min=0)

    def extra_repr(self) -> str:
        return f"radius={self.radius}"
