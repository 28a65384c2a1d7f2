"""Unstructured sparsity: scheduled hardshrink (threshold or target-sparsity mode, GMP).

Importing this package registers its allocations (erk, lamp) in ``ALLOCATIONS``.
"""

from plugins.sparsity import budgets  # noqa: F401 - registers erk and lamp
from plugins.sparsity.hardshrink import HardshrinkSparsifier

__all__ = ["HardshrinkSparsifier"]
