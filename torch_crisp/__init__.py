"""torch_crisp: capability-preserving fine-tuning and editing by low-curvature projection.

Implements CrispEdit (ICML 2026, arXiv 2602.15823): K-FAC curvature of a capability data set
defines, per linear layer, the directions in which the capability loss is flat; every update of
those layers is projected onto them.
"""

from . import functional
from ._version import __version__ as __version__
from .config import CrispConfig
from .optimizer import CrispOptimizer
from .projector import CrispProjector
from .sequential import SequentialEditor, reproject_optimizer_state

__all__ = [
    "CrispConfig",
    "CrispOptimizer",
    "CrispProjector",
    "SequentialEditor",
    "functional",
    "reproject_optimizer_state",
]
