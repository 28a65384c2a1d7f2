"""Entry-wise constraints: non-negative weights, and a learned sigmoid-gated mask."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from plugins.constraints.base import Constraint
from plugins.constraints.registry import register_constraint
from plugins.core.errors import ConfigError, is_number

__all__ = ["NonNegative", "LearnedMask"]

NON_NEGATIVE_METHODS = ("softplus", "clamp")


@register_constraint("non_negative")
class NonNegative(Constraint):
    """``W >= 0`` entry-wise.

    ``method="softplus"``: ``W = softplus(X, beta)``, positive by construction; registering keeps
    a positive weight (``X = softplus^-1(W)``) and moves entries ``<= floor`` to ``floor`` (the
    nearest point of the open set, up to ``floor``). ``method="clamp"``: the weight is kept as is
    in ``forward`` and clamped at 0 after each optimizer step (projected gradient; exact zeros
    possible); registering clamps (the nearest point). Violation: ``max(0, -min(W))``. A mask
    after it keeps ``W >= 0``: allowed.

    Args:
        method: ``softplus`` (parametrization) or ``clamp`` (projection after each step).
        beta: softplus sharpness.
        floor: ``softplus``: the value that entries ``<= floor`` start from.
    """

    def __init__(self, method: str = "softplus", beta: float = 1.0, floor: float = 1e-3) -> None:
        super().__init__()
        if method not in NON_NEGATIVE_METHODS:
            raise ConfigError("method", method, f"one of {', '.join(NON_NEGATIVE_METHODS)}")
        if not is_number(beta) or beta <= 0:
            raise ConfigError("beta", beta, "a number > 0")
        if not is_number(floor) or floor <= 0:
            raise ConfigError("floor", floor, "a number > 0")
        self.method = method
        self.beta = float(beta)
        self.floor = float(floor)
        self.projects = self.first_only = method == "clamp"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.projects:
            return x
        return F.softplus(x, beta=self.beta)

    @torch.no_grad()
    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        if self.projects:
            return w.clamp(min=0)
        w = w.clamp(min=self.floor) * self.beta
        # softplus^-1(y) = y + log(1 - exp(-y)), stable for large and small y; then / beta.
        return (w + torch.log(-torch.expm1(-w))) / self.beta

    @torch.no_grad()
    def violation(self, weight: torch.Tensor) -> torch.Tensor:
        return (-weight.detach().double().min()).clamp(min=0)

    @torch.no_grad()
    def project_(self, weight: torch.Tensor) -> None:
        weight.clamp_(min=0)


class _GatePenalty(torch.autograd.Function):
    """Identity forward; backward adds ``penalty / numel`` to the gate's gradient, i.e. the
    gradient of ``penalty * mean(gate)`` added to the loss, without touching the loss."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, penalty: float) -> torch.Tensor:
        ctx.step = penalty / gate.numel()
        return gate.view_as(gate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad + ctx.step, None


@register_constraint("learned_mask")
class LearnedMask(Constraint):
    """A learned soft mask: ``W = X * sigmoid(S / temperature)``, the scores ``S`` a parameter of
    the weight's shape trained with it (the optimizer must be built after ``setup``, as Lightning
    does). ``penalty`` pushes gates towards 0 (the gradient of ``penalty * mean(gate)``), so the
    mask sparsifies by learning; a lower ``temperature`` makes gates closer to 0/1.

    Registering keeps the weight (``X = W / gate``). At the end (:meth:`finalize_`, before baking)
    gates ``<= 0.5`` become exactly 0, so ``model.pt`` holds exact zeros. Violation: the relative
    weight ``||W[gate <= 0.5]|| / ||W||`` that this rounding will remove (0 once rounded). A
    mask after it keeps it a mask: allowed.

    Args:
        temperature: divides the scores in the sigmoid (> 0).
        init: the gates' starting value, in (0.5, 1).
        penalty: weight of the mean gate added to the loss (>= 0; 0 = no pressure to sparsify).
    """

    def __init__(self, temperature: float = 1.0, init: float = 0.95, penalty: float = 0.0) -> None:
        super().__init__()
        if not is_number(temperature) or temperature <= 0:
            raise ConfigError("temperature", temperature, "a number > 0")
        if not is_number(init) or not 0.5 < init < 1:
            raise ConfigError("init", init, "a gate value in (0.5, 1)")
        if not is_number(penalty) or penalty < 0:
            raise ConfigError("penalty", penalty, "a number >= 0")
        self.temperature = float(temperature)
        self.init = float(init)
        self.penalty = float(penalty)
        self.scores: nn.Parameter | None = None

    def build(self, weight: torch.Tensor) -> None:
        logit = math.log(self.init / (1 - self.init)) * self.temperature
        self.scores = nn.Parameter(torch.full_like(weight.detach(), logit))

    def gate(self) -> torch.Tensor:
        gate = torch.sigmoid(self.scores / self.temperature)
        if self.penalty and torch.is_grad_enabled():
            gate = _GatePenalty.apply(gate, self.penalty)
        return gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate()

    @torch.no_grad()
    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w / torch.sigmoid(self.scores / self.temperature)

    @torch.no_grad()
    def violation(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach().double()
        off = self.scores.detach() <= 0
        total = w.norm()
        return (w[off].norm() / total) if total > 0 else total

    @torch.no_grad()
    def finalize_(self) -> None:
        self.scores.masked_fill_(self.scores <= 0, -math.inf)

    @torch.no_grad()
    def kept(self) -> float:
        """Fraction of gates above 0.5."""
        return float((self.scores > 0).float().mean())
