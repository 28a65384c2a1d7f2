"""Structured pruning criteria beyond the weight norm: first-order Taylor, BN scale (network
slimming) and FPGM. Each is one class in :data:`~plugins.core.criteria.CRITERIA`, picked by
``pruning.method``; importing :mod:`plugins.pruning` registers them.

- ``taylor`` (Molchanov et al. 2019): ``sum |w * dL/dw|`` over each slice, accumulated over the
  backward passes since the last update.
- ``bn_scale`` (Liu et al. 2017, network slimming): ``|gamma|`` of the norm layer after each
  channel; with ``pruning.regularize`` an L1 penalty on those scales during training.
- ``fpgm`` (He et al. 2019): the slices nearest the geometric median of their layer go first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from plugins.core.criteria import CRITERIA, L1, Criterion
from plugins.core.decision import mean_over_ranks
from plugins.core.errors import ConfigError, is_number
from plugins.core.masks import stored
from plugins.pruning.dependency import CONV_LINEAR

if TYPE_CHECKING:
    from plugins.core.decision import Group

__all__ = ["BNScale", "FPGM", "Taylor", "norm_scales"]


def _per_slice(values: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``values`` summed over everything but ``dim`` (one number per slice), or flat (``dim=None``)."""
    if dim is None:
        return values.reshape(-1)
    return values.movedim(dim % values.dim(), 0).reshape(values.shape[dim % values.dim()], -1).sum(1)


@CRITERIA.register("taylor")
class Taylor(Criterion):
    """First-order Taylor importance (Molchanov et al. 2019, "Importance Estimation for Neural
    Network Pruning"): the loss change from zeroing a slice, estimated as ``sum |w * dL/dw|`` over
    its entries in every member of the group, summed over the backward passes since the last update.

    ``w`` and ``dL/dw`` are the stored tensor and its gradient (``member.raw``, the
    parametrization's ``original`` under a mask). A member without a gradient (frozen) adds 0;
    non-finite gradients (a mixed-precision overflow step, which the optimizer skips too) add 0.
    Under mixed precision the gradients seen after backward are still scaled by the loss scale,
    and with ``accumulate_grad_batches=N`` each micro-batch sees the running sum of the gradients:
    the ranking stays a Taylor estimate, its numbers are not the loss change itself. With DDP the
    sums are averaged over ranks at each update. Before any backward pass (an update at the very
    first step, or a resumed run that saved no sums) the slices are ranked by their L1 norm instead.

    Cost: one product and one sum per member after every backward pass; one float per slice of
    memory (in the checkpoint too, so a resumed run ranks as the uninterrupted one).
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def observe(self, groups):
        for group in groups:
            part = self.estimate(group)
            previous = self.sums.get(group.name)
            self.sums[group.name] = part if previous is None else previous.to(part.device) + part

    @staticmethod
    def estimate(group: Group) -> torch.Tensor:
        """``sum |w * dL/dw|`` per element of ``group`` for the gradients in ``.grad`` now."""
        total = torch.zeros(group.size, device=group.members[0].raw.device)
        for member in group.members:
            raw = member.raw
            grad = raw.grad if raw.is_leaf else None  # a computed tensor (weight_norm's) has none
            if grad is not None:
                product = torch.nan_to_num((raw * grad).abs().float(), nan=0.0, posinf=0.0, neginf=0.0)
                total += _per_slice(product, group.dim)
        return total

    def scores(self, group, keep, generator):
        total = self.sums.pop(group.name, None)  # read and reset: the next update sums afresh
        if total is None:
            return L1().scores(group, keep, generator)
        # On the weights' device: sums loaded from a checkpoint are on the CPU, NCCL reduces on GPU.
        return mean_over_ranks(total.to(group.members[0].raw.device)).cpu()

    def state_dict(self) -> dict[str, Any]:
        """The sums since the last update (per group name), for the callback's checkpoint."""
        return {"sums": {name: s.detach().cpu() for name, s in self.sums.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s sums."""
        self.sums = {name: torch.as_tensor(s) for name, s in state.get("sums", {}).items()}


def norm_scales(group: Group) -> list[tuple[nn.Module, str]]:
    """The norm layers' scales (``weight``, 1-D, one per slice) that follow the group's channels:
    its ``extras`` that belong to neither a conv nor a linear layer (BatchNorm, GroupNorm,
    InstanceNorm, a channel LayerNorm: anything with such a ``weight``)."""
    out = []
    for _, module, tensor_name in group.extras:
        if tensor_name != "weight" or isinstance(module, CONV_LINEAR):
            continue
        weight = getattr(module, tensor_name, None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.shape[0] == group.size:
            out.append((module, tensor_name))
    return out


@CRITERIA.register("bn_scale")
class BNScale(Criterion):
    """Network slimming (Liu et al. 2017, "Learning Efficient Convolutional Networks through
    Network Slimming"): a channel's score is ``|gamma|``, the scale of the norm layer after it
    (the mean over the group's norms when a residual group has several); the smallest go.

    ``regularize`` > 0 adds the paper's L1 penalty ``regularize * sum |gamma|`` to the training
    loss, as its subgradient ``regularize * sign(gamma)`` added to gamma's gradient after each
    backward pass, which pushes unimportant scales towards 0. (With ``accumulate_grad_batches=N``
    it is added at each of the N backward passes; under mixed precision it is added to the scaled
    gradients, so it acts 1/scale as strongly: use full precision with a penalty.)

    Needs a norm layer with a learned scale after every pruned layer, so coupled output channels
    (``dim=0``, ``couple=true``, an affine norm): :meth:`prepare` refuses anything else before
    training. Cost: reads one vector per group at an update; the penalty costs one ``sign`` and one
    add per norm scale after every backward pass.
    """

    #: The config key a refusal names (StructuredPruning sets ``{its key}.method``).
    key = "pruning.method"

    def __init__(self, regularize: float = 0.0) -> None:
        if not is_number(regularize) or regularize < 0:
            raise ConfigError("regularize", regularize, "a finite number >= 0 (0 = no penalty)")
        self.regularize = float(regularize)

    def prepare(self, groups):
        for group in groups:
            if not norm_scales(group):
                raise ConfigError(
                    self.key,
                    "bn_scale",
                    f"a criterion with a norm layer after every pruned layer ({group.name} has none "
                    "with a learned scale per channel; bn_scale needs dim=0, couple=true and affine norms)",
                )

    @torch.no_grad()
    def observe(self, groups):
        if not self.regularize:
            return
        for group in groups:
            for module, tensor_name in norm_scales(group):
                for gamma in stored(module, tensor_name):
                    if gamma.grad is not None:  # under a mask: the original, whose pruned entries are 0
                        gamma.grad.add_(gamma.detach().sign(), alpha=self.regularize)

    def scores(self, group, keep, generator):
        scales = [getattr(module, name).detach().abs().float().cpu() for module, name in norm_scales(group)]
        return torch.stack(scales).mean(0)


@CRITERIA.register("fpgm")
class FPGM(Criterion):
    """Filter pruning via geometric median (He et al. 2019): slice ``i``'s score is
    ``sum_j ||f_i - f_j||_2`` over the kept slices ``j`` of its group, where ``f`` is a slice
    flattened (all members concatenated). The slices nearest the geometric median (smallest total
    distance) are the most replaceable by the others, and go first. The distances are those of a
    layer to itself: compare within layers (``allocation=layer``, the paper's setting).

    Slices only (``dim`` set). Cost: ``O(n^2 d)`` per group of ``n`` kept slices of ``d`` entries,
    in float64, at each update (``torch.cdist``, without its matrix-product shortcut, exact).
    """

    key = "pruning.method"

    def prepare(self, groups):
        for group in groups:
            if group.dim is None:
                raise ConfigError(self.key, "fpgm", f"slices along a dim ({group.describe()} are entries)")

    def scores(self, group, keep, generator):
        d = group.dim
        flat = [w.movedim(d % w.dim(), 0).reshape(group.size, -1) for w in group.weights()]
        features = torch.cat(flat, dim=1).double()
        kept = keep.reshape(-1).to(features.device).nonzero().flatten()
        out = torch.zeros(group.size, dtype=torch.float64, device=features.device)
        f = features[kept]
        out[kept] = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist").sum(dim=1)
        return out.cpu()
