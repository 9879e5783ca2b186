"""crestcore: CREST mini-batch coresets for data-efficient deep learning.

Framework-free core written against the Python array API; fast kernels live in
``crestcore.backends`` and framework glue in ``crestcore.adapters``. Importing this package imports
no torch, cupy, numba or keras.
"""

from .facility import Selection, facility_location, facility_objective, marginal_gains
from .minibatch import Coresets, draw_subsets, minibatch_coresets
from .similarity import pairwise_distances

__version__ = "0.1.0"

__all__ = [
    "Selection",
    "Coresets",
    "facility_location",
    "facility_objective",
    "marginal_gains",
    "minibatch_coresets",
    "draw_subsets",
    "pairwise_distances",
    "__version__",
]
