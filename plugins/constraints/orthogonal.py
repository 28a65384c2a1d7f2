"""Orthogonality: orthonormal rows or columns, whichever the matrix's shape allows.

Two ways, chosen by ``method``:

- ``polar`` (default) and ``qr``: the weight stays a plain tensor in ``forward`` (the identity) and
  is projected back onto the orthogonal matrices after each optimizer step, by Newton-Schulz
  iterations towards its polar factor (``polar``, stopping once the predicted deviation is below
  ``tol``) or by a sign-fixed QR factorization (``qr``). A few matrix products per step.
- ``matrix_exp``, ``cayley``, ``householder``: PyTorch's ``parametrizations.orthogonal`` with that
  map (dynamic trivialization), exact at every forward and differentiated through the map;
  several times more expensive per step (see ``benchmarks/bench_constraints.py``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations

from plugins.constraints.base import Constraint, as_matrix, matrix_shape
from plugins.constraints.registry import register_constraint
from plugins.core.errors import ConfigError

__all__ = ["Orthogonal", "orthogonal_violation", "polar_", "qr_", "METHODS"]

PROJECTIONS = ("polar", "qr")
MAPS = ("matrix_exp", "cayley", "householder")
METHODS = PROJECTIONS + MAPS


def _gram_minus_identity(m: torch.Tensor) -> torch.Tensor:
    """``M M^T - I`` for a wide (or square) ``M``, ``M^T M - I`` for a tall one: the small side."""
    gram = m @ m.mT if m.shape[0] <= m.shape[1] else m.mT @ m
    gram.diagonal().sub_(1)
    return gram


@torch.no_grad()
def orthogonal_violation(weight: torch.Tensor) -> torch.Tensor:
    """``||W W^T - I||_2`` (rows) or ``||W^T W - I||_2`` (columns) on the matrix view, in float64:
    the largest ``|sigma_i^2 - 1|`` over the singular values of ``W``."""
    e = _gram_minus_identity(as_matrix(weight.detach()).double())
    return torch.linalg.eigvalsh(e).abs().max()


@torch.no_grad()
def _polar_exact_(m: torch.Tensor) -> None:
    u, _, vh = torch.linalg.svd(m.double() if m.dtype in (torch.float16, torch.bfloat16) else m, full_matrices=False)
    m.copy_(u @ vh)


@torch.no_grad()
def _spectral_estimate(e: torch.Tensor, v: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Largest ``|eigenvalue|`` of the symmetric ``e`` by power iteration from ``v`` (updated)."""
    for _ in range(iters):
        w = e @ v
        norm = w.norm()
        if norm == 0:
            return norm
        v.copy_(w / norm)
    return (e @ v).norm()


@torch.no_grad()
def polar_(weight: torch.Tensor, tol: float = 1e-5, max_iter: int = 8, v: torch.Tensor | None = None) -> int:
    """Move ``weight`` (in place, matrix view) to the polar factor of itself: the nearest matrix
    with orthonormal rows (wide) or columns (tall). Newton-Schulz ``M <- M (I - E/2)`` with
    ``E = M^T M - I``: each step maps the deviation ``e`` of a squared singular value from 1 to
    ``0.75 e^2 - 0.25 e^3``, so one to three steps suffice after an optimizer step. Stops when the
    predicted deviation (from a power-iteration estimate of ``||E||_2``, with a margin) is below
    ``tol``. Far from the set (``||E||_2 >= 1``), or not there after ``max_iter`` steps, it takes
    the exact polar factor by SVD. Returns the number of Newton-Schulz steps taken."""
    m = weight.view(matrix_shape(tuple(weight.shape)))
    wide = m.shape[0] <= m.shape[1]
    k = min(m.shape)
    if v is None or v.numel() != k:
        v = torch.linspace(1.0, 2.0, k, dtype=m.dtype, device=m.device)
        v /= v.norm()
    for step in range(max_iter):
        e = _gram_minus_identity(m)
        dev = 1.25 * float(_spectral_estimate(e, v))
        if dev <= tol:
            return step
        if not dev < 1.0:  # also NaN
            _polar_exact_(m)
            return step
        m.sub_(e @ m if wide else m @ e, alpha=0.5)
        if 0.75 * dev * dev * (1 + dev / 3) <= tol:
            return step + 1
    _polar_exact_(m)
    return max_iter


@torch.no_grad()
def qr_(weight: torch.Tensor) -> None:
    """Replace ``weight`` (in place, matrix view) by the orthonormal factor of its QR
    factorization, signs fixed so that an orthonormal weight is left as it is."""
    m = weight.view(matrix_shape(tuple(weight.shape)))
    wide = m.shape[0] < m.shape[1]
    q, r = torch.linalg.qr(m.mT if wide else m)
    signs = torch.sign(r.diagonal())
    signs[signs == 0] = 1
    q.mul_(signs)
    m.copy_(q.mT if wide else q)


@register_constraint("orthogonal")
class Orthogonal(Constraint):
    """Orthonormal rows (``W W^T = I``, wide matrices) or columns (``W^T W = I``, tall ones) of
    the weight seen as a ``(out, in * kernel)`` matrix; square matrices are orthogonal.

    Registering keeps an orthonormal weight; any other moves to its polar factor (the nearest
    orthonormal matrix in Frobenius norm) with ``polar`` and ``qr``, or to PyTorch's choice with the
    maps (the QR factor, completed for rectangular matrices). Violation:
    :func:`orthogonal_violation`. A mask after it breaks orthogonality: refused unless
    ``allow_masked``.

    Args:
        method: ``polar`` or ``qr`` (project after each optimizer step), or ``matrix_exp``,
            ``cayley``, ``householder`` (PyTorch's parametrization with that map).
        tol: ``polar``: the deviation ``||W^T W - I||_2`` it iterates down to at each projection.
        max_iter: ``polar``: the most Newton-Schulz steps per projection.
    """

    mask_compatible = False

    def __init__(self, method: str = "polar", tol: float = 1e-5, max_iter: int = 8) -> None:
        super().__init__()
        if method not in METHODS:
            raise ConfigError("method", method, f"one of {', '.join(METHODS)}")
        if not 0 < tol < 1:
            raise ConfigError("tol", tol, "a number in (0, 1)")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ConfigError("max_iter", max_iter, "an integer >= 1")
        self.method = method
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.projects = method in PROJECTIONS
        self.first_only = self.projects
        self.shape: tuple[int, ...] = ()
        self.inner: nn.Module | None = None
        self.register_buffer("_v", None, persistent=False)

    def build(self, weight: torch.Tensor) -> None:
        self.shape = tuple(weight.shape)
        if not self.projects:
            # PyTorch's own parametrization, borrowed from a throw-away holder: it treats a 3-D
            # tensor as a batch of matrices, so it runs here on the (out, in * kernel) view.
            holder = nn.Module()
            holder.weight = nn.Parameter(as_matrix(weight.detach()).clone())
            parametrizations.orthogonal(holder, "weight", orthogonal_map=self.method)
            self.inner = holder.parametrizations.weight[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inner is None:
            return x
        return self.inner(as_matrix(x)).reshape(x.shape)

    @torch.no_grad()
    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        if self.inner is not None:
            return self.inner.right_inverse(as_matrix(w)).reshape(w.shape)
        w = w.detach().clone()
        if orthogonal_violation(w) > self.tol:
            _polar_exact_(w.view(matrix_shape(tuple(w.shape))))
        return w

    def violation(self, weight: torch.Tensor) -> torch.Tensor:
        return orthogonal_violation(weight)

    def project_(self, weight: torch.Tensor) -> None:
        if self.method == "qr":
            qr_(weight)
            return
        k = min(matrix_shape(tuple(weight.shape)))
        if self._v is None or self._v.numel() != k or self._v.dtype != weight.dtype:
            self._v = torch.linspace(1.0, 2.0, k, dtype=weight.dtype, device=weight.device)
            self._v /= self._v.norm()
        polar_(weight, self.tol, self.max_iter, self._v)

    def extra_repr(self) -> str:
        return f"method={self.method!r}"
