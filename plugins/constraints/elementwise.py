"""Entry-wise constraints: non-negative weights, a learned sigmoid-gated mask, and STR's soft
threshold with a learned threshold; and the controller that lets a learned sparsity reach a target."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from plugins.constraints.base import Constraint
from plugins.constraints.registry import register_constraint
from plugins.core.allocation import Cut, keep_after_cut, prune_count
from plugins.core.errors import ConfigError, is_number

__all__ = ["NonNegative", "LearnedMask", "SoftThreshold", "soft_threshold"]

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
    does). ``penalty`` pushes gates towards 0 (the gradient of ``penalty * mean(gate)``); a lower
    ``temperature`` makes gates closer to 0/1. At the end (:meth:`finalize_`, before baking)
    gates ``<= 0.5`` (``S <= 0``) become exactly 0, so ``model.pt`` holds exact zeros.

    What a fixed ``penalty`` does depends on the optimizer, not on its size. Under Adam(W) (the
    Classifier's) every score moves by at most about the learning rate per step, whatever the
    penalty, from ``temperature * logit(init)`` (2.94 at temperature 1, init 0.95): at lr 3e-3 no
    gate can close before about 1000 steps (the digits run has 400), which is why
    ``penalty=1000`` ends with 0% zeros. And once the penalty outweighs the task's gradient, Adam
    moves all of a tensor's scores alike, so they close together: the penalty does not choose a
    sparsity. (Under plain SGD the step is proportional to the penalty.)

    ``target`` chooses it: once per optimizer step (:meth:`control_`, called by
    :class:`~plugins.constraints.WeightConstraints` before the step) every score of the tensor is
    shifted by ``-gain * m``, ``m`` the midpoint of its ``k``-th and ``(k+1)``-th smallest scores,
    ``k = round(target * n)``: the cut between the ``k`` lowest scores and the others moves
    towards 0, geometrically, without overshooting. Which gates close is still learned (the
    scores' order comes from the task's gradient and the penalty, through the optimizer); how many
    is set. :meth:`finalize_` puts the cut exactly at 0 before rounding, so exactly ``k`` gates
    close (ties at the cut in index order). The state is the scores (in the checkpoint), so a
    resumed run continues exactly. Rounding changes the function where gates are neither 0 nor 1
    (near the cut): use a low temperature with a target (on the digits CNN at 80% after 5
    epochs, test accuracy after rounding: 92.6% at temperature 0.003 (98.5% before), 67% at
    0.01, 10% at 1).

    Registering keeps the weight (``X = W / gate``). Violation: the relative weight
    ``||W[gate <= 0.5]|| / ||W||`` that the rounding will remove (0 once rounded). A mask after it
    keeps it a mask: allowed. Cost: one sigmoid and one product per forward and backward; with
    ``target``, two ``kthvalue`` over the scores per optimizer step.

    Args:
        temperature: divides the scores in the sigmoid (> 0).
        init: the gates' starting value, in (0.5, 1).
        penalty: weight of the mean gate added to the loss (>= 0; 0 = no pressure to sparsify).
        target: the fraction of this tensor's gates closed at the end, in [0, 1); ``None`` = no
            controller (only the penalty); 0 = the controller does nothing.
        gain: the controller's step, a fraction of the distance from the cut to 0 per optimizer
            step, in (0, 1].
    """

    def __init__(
        self,
        temperature: float = 1.0,
        init: float = 0.95,
        penalty: float = 0.0,
        target: float | None = None,
        gain: float = 0.5,
    ) -> None:
        super().__init__()
        if not is_number(temperature) or temperature <= 0:
            raise ConfigError("temperature", temperature, "a number > 0")
        if not is_number(init) or not 0.5 < init < 1:
            raise ConfigError("init", init, "a gate value in (0.5, 1)")
        if not is_number(penalty) or penalty < 0:
            raise ConfigError("penalty", penalty, "a number >= 0")
        if target is not None and (not is_number(target) or not 0 <= target < 1):
            raise ConfigError("target", target, "a fraction of closed gates in [0, 1), or null (a fixed penalty)")
        if not is_number(gain) or not 0 < gain <= 1:
            raise ConfigError("gain", gain, "a fraction in (0, 1]")
        self.temperature = float(temperature)
        self.init = float(init)
        self.penalty = float(penalty)
        # ``target`` is the tensor's name on every Constraint (set by WeightConstraints).
        self.goal = None if target is None else float(target)
        self.gain = float(gain)
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
    def control_(self, gain: float | None = None) -> None:
        """Once per optimizer step: shift every score by ``-gain * m``, where ``m`` is the midpoint
        of the ``k``-th and ``(k+1)``-th smallest scores, ``k = round(target * n)``: the cut
        between the ``k`` lowest scores and the others moves towards 0 (nothing without a target,
        or with ``k = 0``)."""
        if self.goal is None:
            return
        n = self.scores.numel()
        k = min(prune_count(self.goal, n), n - 1)
        if k <= 0:
            return
        flat = self.scores.detach().reshape(-1)  # scores have any sign: kthvalue, not core.kth
        middle = 0.5 * (flat.kthvalue(k).values + flat.kthvalue(k + 1).values)
        self.scores.sub_((self.gain if gain is None else gain) * middle)

    def controlled(self) -> dict[str, float]:
        """What the controller acts on, for logging: the fraction of closed gates."""
        return {} if self.goal is None else {"closed": 1.0 - self.kept()}

    @torch.no_grad()
    def finalize_(self) -> None:
        """Round the gates: those with ``S <= 0`` close (``S = -inf``, gate exactly 0). With a
        target, exactly ``k = round(target * n)`` close: the cut is put at 0, and scores tied at it
        close in index order (the one rounding rule), the others tied there staying just open."""
        self.control_(gain=1.0)
        n = self.scores.numel()
        k = min(prune_count(self.goal, n), n - 1) if self.goal is not None else 0
        if k > 0:
            flat = self.scores.detach().reshape(-1)
            keep = keep_after_cut(self.scores, Cut(k, float(flat.kthvalue(k).values)))
            self.scores.masked_fill_(keep & (self.scores <= 0), torch.finfo(self.scores.dtype).tiny)
            self.scores.masked_fill_(~keep, -math.inf)
        self.scores.masked_fill_(self.scores <= 0, -math.inf)

    @torch.no_grad()
    def kept(self) -> float:
        """Fraction of gates above 0.5."""
        return float((self.scores > 0).float().mean())


def soft_threshold(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """STR's soft threshold (Kusupati et al. 2020, eq. 3): ``sign(w) * relu(|w| - sigmoid(s))``.
    Exact zeros where ``|w| <= sigmoid(s)``; there the gradient to ``w`` and ``s`` is 0."""
    return torch.sign(w) * torch.relu(w.abs() - torch.sigmoid(s))


@register_constraint("soft_threshold")
class SoftThreshold(Constraint):
    """STR (Kusupati et al. 2020, "Soft Threshold Weight Reparameterization for Learnable
    Sparsity"): ``W = sign(X) * relu(|X| - sigmoid(s))`` with one learned threshold parameter
    ``s`` per tensor (shape ``(1,)``), trained by the run's optimizer with the weights (the
    optimizer must be built after ``setup``, as Lightning does) and decayed with them: weight
    decay pulls ``s`` towards 0, so it raises the threshold, the paper's only sparsity control.
    :class:`plugins.sparsity.str.STRSparsifier` adds a controller that reaches a target sparsity.

    Registering keeps the weight (``X = sign(W) * (|W| + sigmoid(s))``; zeros stay zeros). The
    zeros are exact in the forward pass already, so baking keeps them. Violation: none (every
    ``X`` maps onto a valid weight). A mask after it keeps the zeros: allowed. Cost: a few
    elementwise operations per forward and backward.

    Args:
        s_init: the threshold parameter's starting value; the threshold is ``sigmoid(s_init)``
            (-5: 0.0067, below most freshly initialised weights; lower = sparsify later).
    """

    def __init__(self, s_init: float = -5.0) -> None:
        super().__init__()
        if not is_number(s_init):
            raise ConfigError("s_init", s_init, "a finite number (the threshold is sigmoid(s_init))")
        self.s_init = float(s_init)
        self.s: nn.Parameter | None = None

    def build(self, weight: torch.Tensor) -> None:
        self.s = nn.Parameter(torch.full((1,), self.s_init, dtype=weight.dtype, device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return soft_threshold(x, self.s)

    @torch.no_grad()
    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return torch.sign(w) * (w.abs() + torch.sigmoid(self.s))

    @torch.no_grad()
    def threshold(self) -> float:
        """``sigmoid(s)``: entries with ``|X|`` at or below it are 0."""
        return float(torch.sigmoid(self.s))
