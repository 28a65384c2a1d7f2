"""Structured pruning of whole slices by a criterion, and compaction into a smaller dense model.

Importing this package registers its criteria (taylor, bn_scale, fpgm) in ``CRITERIA``.
"""

from plugins.pruning import criteria  # noqa: F401 - registers taylor, bn_scale and fpgm
from plugins.pruning.compaction import compact
from plugins.pruning.structured import StructuredPruning

__all__ = ["StructuredPruning", "compact"]
