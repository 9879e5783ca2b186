"""The running example of the backend modules' docstrings, in any array library.

Two problems padded to four points: four points on a line at 0, 1, 2 and 10, and two points at 0 and 5
(its last two rows are padding); budgets 2 and 1. With ``"euclidean"`` distances and ``"max-minus"``
similarities each problem's largest distance ``M`` (10, then 5) is on the diagonal, and greedy picks
the middle point, then the outlier (and the first point in the second problem).

Examples
--------
>>> import numpy as np
>>> X, valid, budgets = two_problems(np)
>>> X[:, :, 0].tolist(), valid.tolist(), budgets.tolist()
([[0.0, 1.0, 2.0, 10.0], [0.0, 5.0, 0.0, 0.0]], [[True, True, True, True], [True, True, False, False]], [2, 1])
"""

from __future__ import annotations

import numpy as np


def two_problems(xp, **kwargs) -> tuple:
    """``(X (2, 4, 1) float64, valid (2, 4) bool, budgets (2,) int64)`` of the running example as arrays
    of the library ``xp`` (``numpy``, ``torch``, ``cupy``: any namespace with ``asarray``); ``kwargs``
    (``device=...``) go to ``xp.asarray``.

    >>> two_problems(np)[0].shape
    (2, 4, 1)
    """
    X = np.array([[[0.0], [1.0], [2.0], [10.0]], [[0.0], [5.0], [0.0], [0.0]]])
    valid = np.array([[True, True, True, True], [True, True, False, False]])
    budgets = np.array([2, 1], dtype=np.int64)
    return tuple(xp.asarray(a, **kwargs) for a in (X, valid, budgets))
