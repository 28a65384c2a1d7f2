"""Structured pruning of whole slices by a criterion, and compaction into a smaller dense model."""

from plugins.pruning.compaction import compact
from plugins.pruning.structured import StructuredPruning

__all__ = ["StructuredPruning", "compact"]
