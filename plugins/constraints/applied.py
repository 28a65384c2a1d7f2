"""A constraint rule registered on one tensor: the checks before registering, and the record."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from plugins.constraints.base import ConstraintError
from plugins.constraints.registry import build_constraint
from plugins.constraints.rules import Rule
from plugins.core.errors import ConfigError
from plugins.core.masks import get_mask
from plugins.core.weight_layout import output_dim

__all__ = ["Applied", "register_rule"]


@dataclass
class Applied:
    """A constraint registered on one tensor."""

    target: str
    module: nn.Module
    tensor_name: str
    constraint: nn.Module
    rule: Rule

    @property
    def label(self) -> str:
        return f"{self.target}/{self.rule.name}"


def register_rule(rule: Rule, name: str, module: nn.Module, tensor_name: str) -> Applied:
    """Build ``rule``'s constraint and register it on ``module.tensor_name`` (named ``name``),
    refusing, with an error naming the rule, a tensor it cannot hold on: one with a mask already,
    a shape it does not fit, a stack it must head, NaN or Inf values."""
    if get_mask(module, tensor_name) is not None:
        raise ConstraintError(
            rule.key,
            rule.name,
            f"a tensor without a mask: {name} already has one; constraints come first, so put "
            "WeightConstraints before the sparsity/pruning callbacks",
        )
    constraint = build_constraint(rule.name, rule.args, rule.key)
    weight = getattr(module, tensor_name)
    shape = tuple(weight.shape)
    fits = getattr(constraint, "fits", None)
    reason = fits(shape) if fits else None
    if reason:
        raise ConstraintError(
            f"{rule.key}.name", rule.name, f"a constraint that fits {name} of shape {shape}: {reason}"
        )
    stacked = parametrize.is_parametrized(module, tensor_name)
    if stacked and getattr(constraint, "first_only", False):
        raise ConstraintError(
            f"{rule.key}.name",
            rule.name,
            f"a rule listed before the other constraints on {name}: this one "
            f"({rule.name}, {getattr(constraint, 'method', 'this form')}) must be first on its tensor",
        )
    if not torch.isfinite(weight).all():
        raise ConfigError(rule.key, name, "tensors whose values are all finite (found NaN or Inf)")
    constraint.target, constraint.rule_key, constraint.allow_masked = name, rule.key, rule.allow_masked
    constraint.unit_dim = output_dim(module) if tensor_name == "weight" and weight.dim() >= 2 else 0
    if hasattr(constraint, "build"):
        constraint.build(weight.detach())
    constraint.to(device=weight.device)
    parametrize.register_parametrization(module, tensor_name, constraint)
    return Applied(name, module, tensor_name, constraint, rule)
