"""The running examples of the backend modules' docstrings, in any array library.

The dense kernels' (:func:`two_problems`): two problems padded to four points: four points on a line at
0, 1, 2 and 10, and two points at 0 and 5 (its last two rows are padding); budgets 2 and 1. With
``"euclidean"`` distances and ``"max-minus"`` similarities each problem's largest distance ``M`` (10,
then 5) is on the diagonal, and greedy picks the middle point, then the outlier (and the first point in
the second problem).

The sparse kernels' (:func:`three_points`): a neighbour graph of three points with one neighbour each.

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


def three_points(xp, **kwargs) -> tuple:
    """``(nbr (3, 2) int64, sims (3, 2) float64, order (6,) int64, indptr (4,) int64)``: three points with
    one neighbour each (point 0's is 1, point 1's is 0, point 2's is 1) in the layout of
    :mod:`crestcore.sparse`: column 0 of ``nbr`` is the point itself, and the candidate-major ``order``
    lists candidate 0's entries (flat positions 0 and 3), then candidate 1's (1, 2, 5), then candidate 2's
    (4), delimited by ``indptr``. As arrays of the library ``xp``, ``kwargs`` to ``xp.asarray``.

    >>> nbr, sims, order, indptr = three_points(np)
    >>> nbr.tolist(), sims.tolist()
    ([[0, 1], [1, 0], [2, 1]], [[1.0, 0.5], [1.0, 0.5], [1.0, 0.2]])
    """
    nbr = np.array([[0, 1], [1, 0], [2, 1]], dtype=np.int64)
    sims = np.array([[1.0, 0.5], [1.0, 0.5], [1.0, 0.2]])
    order = np.array([0, 3, 1, 2, 5, 4], dtype=np.int64)
    indptr = np.array([0, 2, 5, 6], dtype=np.int64)
    return tuple(xp.asarray(a, **kwargs) for a in (nbr, sims, order, indptr))
