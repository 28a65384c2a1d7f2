"""Lightning callbacks and model surgery for sparsity, pruning, weight constraints and norm swaps.

The three uses (sparsify, prune, constrain) stand on shared pieces: ``schedules`` (progress ->
value), ``selection`` (which tensors), ``masks`` (the parametrization mechanism) and ``errors``.
"""

from plugins.constraints import WeightConstraints, register_constraint
from plugins.core.errors import ConfigError
from plugins.core.masks import Mask, bake
from plugins.core.schedules import Schedule, build_schedule
from plugins.core.selection import Target, select_parameters
from plugins.norm import NormFactory, NormSwapReport, swap_norm
from plugins.pruning.compaction import compact
from plugins.pruning.structured import StructuredPruning
from plugins.sparsity import DynamicSparsifier, HardshrinkSparsifier, IterativeMagnitudePruning, STRSparsifier

__all__ = [
    "HardshrinkSparsifier",
    "DynamicSparsifier",
    "IterativeMagnitudePruning",
    "STRSparsifier",
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
