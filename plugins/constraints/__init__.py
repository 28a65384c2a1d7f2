"""Weight constraints as ``torch.nn.utils.parametrize`` parametrizations, registered by name.

Built in: ``orthogonal``, ``spectral_norm``, ``weight_norm``, ``symmetric``, ``skew``,
``non_negative``, ``unit_norm``, ``max_norm``, ``learned_mask``. Add your own with
:func:`register_constraint`; apply rules from config with :class:`WeightConstraints`.
"""

from plugins.constraints.base import Constraint, ConstraintError, as_matrix, matrix_shape
from plugins.constraints.callback import WeightConstraints
from plugins.constraints.elementwise import LearnedMask, NonNegative
from plugins.constraints.norms import MaxNorm, SpectralNorm, UnitNorm, WeightNorm
from plugins.constraints.orthogonal import Orthogonal, orthogonal_violation, polar_, qr_
from plugins.constraints.registry import build_constraint, get_constraint, register_constraint, registered
from plugins.constraints.symmetry import Skew, Symmetric

__all__ = [
    "Constraint",
    "ConstraintError",
    "as_matrix",
    "matrix_shape",
    "register_constraint",
    "registered",
    "get_constraint",
    "build_constraint",
    "WeightConstraints",
    "Orthogonal",
    "orthogonal_violation",
    "polar_",
    "qr_",
    "SpectralNorm",
    "WeightNorm",
    "UnitNorm",
    "MaxNorm",
    "Symmetric",
    "Skew",
    "NonNegative",
    "LearnedMask",
]
