"""Unstructured sparsity: scheduled hardshrink (threshold or target-sparsity mode, GMP)."""

from plugins.sparsity.hardshrink import HardshrinkSparsifier

__all__ = ["HardshrinkSparsifier"]
