"""crestcore: CREST mini-batch coresets for data-efficient deep learning.

Framework-free core written against the Python array API; fast kernels live in
``crestcore.backends`` and framework glue in ``crestcore.adapters``. Importing this package imports
no torch, cupy, numba or keras.
"""

from .facility import Selection, facility_location, facility_objective, marginal_gains, score_orders
from .minibatch import Coresets, draw_subsets, minibatch_coresets
from .similarity import pairwise_distances

__version__ = "0.1.0"

__all__ = [
    "Selection",
    "Coresets",
    "facility_location",
    "facility_objective",
    "marginal_gains",
    "score_orders",
    "minibatch_coresets",
    "draw_subsets",
    "pairwise_distances",
    "__version__",
]

from .features import cross_entropy, last_layer_gradients, softmax  # noqa: E402
from .quadratic import (  # noqa: E402
    QuadraticConfig,
    QuadraticState,
    hutchinson_diagonal,
    quadratic_anchor,
    quadratic_curvature,
    curvature_norm,
    quadratic_init,
    quadratic_predict,
    quadratic_update,
)
from .trust import relative_error, should_reselect, update_schedule  # noqa: E402
from .dropping import DropConfig, DropState, drop_copy, drop_init, drop_record, drop_resize, drop_update  # noqa: E402
from .controller import (  # noqa: E402
    Batch,
    CrestConfig,
    CrestState,
    ModelOps,
    crest_init,
    crest_load_state_dict,
    crest_next_batch,
    crest_observe,
    crest_parameters_changed,
    crest_state_dict,
    crest_stats,
)

__all__ += [
    "cross_entropy", "last_layer_gradients", "softmax",
    "QuadraticConfig", "QuadraticState", "hutchinson_diagonal", "quadratic_anchor",
    "quadratic_curvature", "curvature_norm", "quadratic_init", "quadratic_predict", "quadratic_update",
    "relative_error", "should_reselect", "update_schedule",
    "DropConfig", "DropState", "drop_copy", "drop_init", "drop_record", "drop_resize", "drop_update",
    "Batch", "CrestConfig", "CrestState", "ModelOps", "crest_init", "crest_load_state_dict",
    "crest_next_batch", "crest_observe", "crest_parameters_changed", "crest_state_dict", "crest_stats",
]
