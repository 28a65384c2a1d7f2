"""Lightning callbacks and model surgery for sparsity, pruning, weight constraints and norm swaps.

The three uses (sparsify, prune, constrain) stand on shared pieces: ``schedules`` (progress ->
value), ``selection`` (which tensors), ``masks`` (the parametrization mechanism) and ``errors``.
"""

from plugins.compaction import compact
from plugins.constraints import WeightConstraints, register_constraint
from plugins.errors import ConfigError
from plugins.hardshrink import HardshrinkSparsifier
from plugins.masks import Mask, bake
from plugins.norm import NormFactory, NormSwapReport, swap_norm
from plugins.schedules import Schedule, build_schedule
from plugins.selection import Target, select_parameters
from plugins.structured import StructuredPruning

__all__ = [
    "HardshrinkSparsifier",
    "ConfigError",
    "Mask",
    "bake",
    "NormFactory",
    "NormSwapReport",
    "swap_norm",
    "Schedule",
    "build_schedule",
    "Target",
    "select_parameters",
    "StructuredPruning",
    "compact",
    "WeightConstraints",
    "register_constraint",
]
