"""Constraint rules from a config: ``{name, include, exclude, module_types, args, allow_masked}``,
checked once (names against the registry, arguments against each constraint's annotations)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from plugins.constraints.registry import build_constraint
from plugins.core.errors import ConfigError
from plugins.core.selection import DEFAULT_MODULE_TYPES

__all__ = ["RULE_KEYS", "Rule", "parse_rules"]


RULE_KEYS = ("name", "include", "exclude", "module_types", "args", "allow_masked")


@dataclass
class Rule:
    """One config rule: which tensors (selection), which constraint and its arguments."""

    key: str
    name: str
    args: dict[str, Any]
    include: list[str] = field(default_factory=lambda: ["*weight"])
    exclude: list[str] = field(default_factory=list)
    module_types: list[str] | None = field(default_factory=lambda: list(DEFAULT_MODULE_TYPES))
    allow_masked: bool = False


def _strings(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(key, value, "a glob or a list of globs")


def parse_rules(rules: Any, key: str = "constraints") -> list[Rule]:
    """Check the rules' structure and every constraint's arguments; returns :class:`Rule` objects."""
    if isinstance(rules, Mapping) or not isinstance(rules, Sequence) or isinstance(rules, str) or not rules:
        raise ConfigError(f"{key}.rules", rules, "a non-empty list of {name, include, exclude, module_types, args}")
    parsed = []
    for i, raw in enumerate(rules):
        rule_key = f"{key}.rules[{i}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(rule_key, raw, "a mapping with at least a name")
        unknown = sorted(set(raw) - set(RULE_KEYS))
        if unknown:
            raise ConfigError(f"{rule_key}.{unknown[0]}", raw[unknown[0]], f"keys among {list(RULE_KEYS)}")
        if "name" not in raw:
            raise ConfigError(f"{rule_key}.name", None, "a registered constraint name")
        args = raw.get("args") or {}
        if not isinstance(args, Mapping):
            raise ConfigError(f"{rule_key}.args", args, "a mapping of argument names to values")
        allow = raw.get("allow_masked", False)
        if not isinstance(allow, bool):
            raise ConfigError(f"{rule_key}.allow_masked", allow, "true or false")
        types = raw.get("module_types", list(DEFAULT_MODULE_TYPES))
        if types is not None and (isinstance(types, str) or not isinstance(types, Sequence)):
            raise ConfigError(f"{rule_key}.module_types", types, "a list of module class names or null")
        rule = Rule(
            key=rule_key,
            name=raw["name"],
            args=dict(args),
            include=_strings(raw.get("include", ["*weight"]), f"{rule_key}.include"),
            exclude=_strings(raw.get("exclude", []), f"{rule_key}.exclude"),
            module_types=list(types) if types else None,
            allow_masked=allow,
        )
        build_constraint(rule.name, rule.args, rule_key)  # names, argument types and values
        parsed.append(rule)
    return parsed
