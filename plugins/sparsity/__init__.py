"""Unstructured sparsity: scheduled hardshrink (threshold or target-sparsity mode, GMP, N:M
patterns), dynamic sparse training (RigL, SET), learned thresholds (STR) and iterative magnitude pruning with rewinding.

Importing this package registers its allocations (erk, lamp) in ``ALLOCATIONS`` and the
``dense_gradient`` criterion in ``CRITERIA``.
"""

from plugins.sparsity import budgets  # noqa: F401 - registers erk and lamp
from plugins.sparsity.dynamic import DynamicSparsifier
from plugins.sparsity.hardshrink import HardshrinkSparsifier
from plugins.sparsity.rewinding import IterativeMagnitudePruning
from plugins.sparsity.str import STRSparsifier

__all__ = ["HardshrinkSparsifier", "DynamicSparsifier", "IterativeMagnitudePruning", "STRSparsifier"]
