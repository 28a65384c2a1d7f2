"""Lightning callbacks and model surgery for sparsity, pruning, weight constraints and norm swaps.

The three uses (sparsify, prune, constrain) stand on shared pieces: ``schedules`` (progress ->
value), ``selection`` (which tensors), ``masks`` (the parametrization mechanism) and ``errors``.
"""

from plugins.errors import ConfigError
from plugins.masks import Mask, bake
from plugins.norm import NormFactory
from plugins.schedules import Schedule, build_schedule
from plugins.selection import Target, select_parameters

__all__ = [
    "ConfigError",
    "Mask",
    "bake",
    "NormFactory",
    "Schedule",
    "build_schedule",
    "Target",
    "select_parameters",
]
