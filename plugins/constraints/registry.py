"""Name -> constraint class: the registry behind ``rules[].name`` in configs.

    from plugins import register_constraint
    from plugins.constraints import Constraint

    @register_constraint("row_sum_one")
    class RowSumOne(Constraint):
        def forward(self, x):
            return x / x.sum(dim=-1, keepdim=True)

A registered name is usable from YAML at once (``constraints.rules=[{name: row_sum_one}]``); the
arguments under ``args`` are checked against the class's ``__init__`` signature and annotations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from plugins.core.registry import Registry

__all__ = ["CONSTRAINTS", "register_constraint", "registered", "get_constraint", "build_constraint"]

#: The constraints, by the name a rule gives (``rules[].name``).
CONSTRAINTS: Registry[type[nn.Module]] = Registry("constraint", nn.Module, "nn.Module")


def register_constraint(
    name: str, cls: type[nn.Module] | None = None, *, replace: bool = False
) -> Callable[[type[nn.Module]], type[nn.Module]] | type[nn.Module]:
    """Add a constraint class under ``name``; a decorator when ``cls`` is omitted.

    The class is an ``nn.Module`` parametrization (ideally a
    :class:`~plugins.constraints.Constraint`) whose ``__init__`` takes the rule's ``args`` as
    keyword arguments. Registering another class under a taken name needs ``replace=True``.
    """
    return CONSTRAINTS.register(name, cls, replace=replace)


def registered() -> list[str]:
    """The registered names, sorted."""
    return CONSTRAINTS.names()


def get_constraint(name: Any, key: str = "name") -> type[nn.Module]:
    """The class registered under ``name``; ConfigError listing the registered names otherwise."""
    return CONSTRAINTS.get(name, key)


def build_constraint(name: Any, args: Mapping[str, Any] | None = None, key: str = "rule") -> nn.Module:
    """A fresh instance of the constraint ``name`` with ``args``; every mistake is a ConfigError
    whose key starts with ``key`` (``constraints.rules[0].args.radius=-1 is not allowed: ...``)."""
    return CONSTRAINTS.build(name, args, f"{key}.name", args_key=f"{key}.args")
