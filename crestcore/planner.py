"""Which path solves a facility-location problem: dense, matrix-free or sparse (``optimizer="auto"``).

The three paths and what they cost for one problem of n points with d features and k picks
(``itemsize`` bytes per float of the compute dtype):

=============  ==========================================  =====================================
path           memory                                      time
=============  ==========================================  =====================================
dense          ``n^2 itemsize`` (the n x n similarity)     ``n^2 d`` once, then cheap lazy steps
matrix-free    ``16 n d + 64 n`` (float64 copies, O(n))    ``n d (n + R k)``, R re-evaluations/step
sparse (K)     ``64 n (K + 1) + 42 n d`` (:func:`graph_bytes`)   graph build + ``O(n K)`` greedy
=============  ==========================================  =====================================

:func:`plan_problem` takes, in this order, the first that fits ``max_dense_bytes`` (which bounds the
working memory of every path under "auto", not only the dense similarity):

1. **dense**, exact lazy greedy, when the n x n similarity fits;
2. **matrix-free**, exact lazy greedy, when its work ``n d (n + 32 k)`` is at most
   ``MATRIX_FREE_MAX_WORK`` (about half a minute on a 2-core machine: n = 20,000, d = 10, k = 2,000
   took 25 s) and its buffers fit;
3. **sparse**, lazy greedy on the K-nearest-neighbour similarity, ``K = neighbors`` when given, else
   ``AUTO_NEIGHBORS``, lowered (not below ``MIN_NEIGHBORS``) until its memory fits.

When none fits, :class:`ValueError` says what each path needs and the ``max_dense_bytes`` that would do.
The plan is recorded on the result (``Selection.path``, ``Selection.plan``).
"""

from __future__ import annotations

import math

from dataclasses import dataclass

from ._validation import check_int
from .sparse import graph_bytes

__all__ = ["Plan", "plan_problem", "dense_bytes", "matrix_free_bytes", "AUTO_NEIGHBORS", "MIN_NEIGHBORS",
           "MATRIX_FREE_MAX_WORK"]

AUTO_NEIGHBORS = 16
MIN_NEIGHBORS = 4
MATRIX_FREE_MAX_WORK = 2e10
_REEVALS = 32  # matrix-free lazy re-evaluations per step assumed by the cost model


@dataclass(frozen=True)
class Plan:
    """One problem's plan: the path, the optimizer, K (sparse only), the estimated working memory in
    bytes, and a one-line reason.

    Examples
    --------
    :func:`plan_problem` returns one:

    >>> plan = plan_problem(1000, 10, 100, 4, 2**30)
    >>> plan.path, plan.optimizer, plan.neighbors, plan.bytes
    ('dense', 'lazy', None, 4000000)
    >>> plan.reason
    "the dense similarity with the solver's work (0.004 GB) fits max_dense_bytes"
    """

    path: str
    optimizer: str
    neighbors: int | None
    bytes: int
    reason: str


def dense_bytes(n: int, itemsize: int) -> int:
    """Bytes of the dense n x n similarity with ``itemsize`` bytes per entry.

    Examples
    --------
    >>> dense_bytes(1000, 4)  # float32
    4000000
    """
    return int(n) * int(n) * int(itemsize)


def matrix_free_bytes(n: int, d: int) -> int:
    """Working memory of the matrix-free path: float64 copies of the features and O(n) buffers.

    Examples
    --------
    >>> matrix_free_bytes(20000, 10)
    4480000
    """
    return 16 * int(n) * int(d) + 64 * int(n)


def _gb(b: float) -> str:
    return f"{b / 1e9:.3g} GB"


def plan_problem(n: int, d: int, k: int, itemsize: int, max_dense_bytes: int, *, neighbors: int | None = None,
                 precomputed: bool = False, peak: float = 1.0) -> Plan:
    """The plan for one problem (see the module docstring for the rule). ``peak``: the dense solver's peak
    memory as a multiple of the similarity matrix (``crestcore.facility.PEAK_FACTOR``: 1 for the Numba
    kernel, 1.25 for torch and CuPy, 4.5 for the generic array-API code); the dense path is taken when
    ``peak`` times the matrix fits ``max_dense_bytes``.

    Examples
    --------
    With a 1 GiB bound and float32 data, 1,000 points fit densely and 20,000 go matrix-free; a million
    points with 64 features take the sparse path under 3 GiB, with as many neighbours as fit (the graph
    builder's copies of the features alone take 2.69 GB):

    >>> plan_problem(1000, 10, 100, 4, 2**30).path
    'dense'
    >>> plan_problem(20000, 10, 100, 4, 2**30).path
    'matrix-free'
    >>> plan = plan_problem(1_000_000, 64, 1000, 4, 3 * 2**30)
    >>> plan.path, plan.neighbors
    ('sparse', 7)

    When nothing fits, the error names the bound that would:

    >>> plan_problem(1000, 10, 10, 4, 1000)
    Traceback (most recent call last):
        ...
    ValueError: max_dense_bytes=1000 is too small for any path ... pass max_dense_bytes >= 224000 (the matrix-free path)
    """
    n = check_int(n, "n", low=0)
    d = check_int(d, "d")
    k = check_int(k, "k", low=0, high=n)
    itemsize = check_int(itemsize, "itemsize")
    max_dense_bytes = check_int(max_dense_bytes, "max_dense_bytes", low=0)
    if neighbors is not None:
        neighbors = check_int(neighbors, "neighbors")
    if isinstance(peak, bool) or not isinstance(peak, (int, float)):
        raise TypeError(f"peak must be a real number (the dense solver's memory over the matrix's), got "
                        f"{type(peak).__name__}")
    if not 1.0 <= peak < math.inf:
        raise ValueError(f"peak must be a finite number >= 1 (the dense solver's memory over the matrix's), got {peak!r}")
    db = math.ceil(dense_bytes(n, itemsize) * peak)
    if db <= max_dense_bytes:
        return Plan("dense", "lazy", None, db, f"the dense similarity with the solver's work ({_gb(db)}) fits "
                    "max_dense_bytes")
    if precomputed:
        raise ValueError(
            f"max_dense_bytes={max_dense_bytes} is smaller than the precomputed ({n}, {n}) similarity's solve "
            f"({db} bytes, the masked copy the solver works on included); pass max_dense_bytes >= {db}"
        )
    why = [f"dense needs {_gb(db)}"]
    mb = matrix_free_bytes(n, d)
    work = float(n) * d * (n + _REEVALS * k)
    if work <= MATRIX_FREE_MAX_WORK and mb <= max_dense_bytes:
        return Plan("matrix-free", "lazy", None, mb,
                    f"{why[0]} > max_dense_bytes; matrix-free work {work:.2g} <= {MATRIX_FREE_MAX_WORK:.2g}")
    why.append(f"matrix-free work {work:.2g} > {MATRIX_FREE_MAX_WORK:.2g}" if work > MATRIX_FREE_MAX_WORK
               else f"matrix-free needs {_gb(mb)}")
    if n <= 1:  # a single point: nothing to search
        return Plan("sparse", "lazy", 0, graph_bytes(n, d, 0), "; ".join(why))
    K = min(int(neighbors) if neighbors is not None else AUTO_NEIGHBORS, n - 1)
    low = K if neighbors is not None else min(MIN_NEIGHBORS, K)
    for kk in range(K, low - 1, -1):
        sb = graph_bytes(n, d, kk)
        if sb <= max_dense_bytes:
            return Plan("sparse", "lazy", kk, sb, "; ".join(why) + f"; sparse (neighbors={kk}) needs {_gb(sb)}")
    need = graph_bytes(n, d, low)
    fits = [(need, f"the sparse path, neighbors={low}")]
    if work <= MATRIX_FREE_MAX_WORK:
        fits.append((mb, "the matrix-free path"))
    fits.append((db, "the dense path"))
    least, which = min(fits)
    raise ValueError(
        f"max_dense_bytes={max_dense_bytes} is too small for any path on a problem of n={n}, d={d}, k={k}: the "
        f"dense path needs {db} bytes, the matrix-free path {mb} bytes"
        + (f" (and too much time: work {work:.2g} > {MATRIX_FREE_MAX_WORK:.2g})" if work > MATRIX_FREE_MAX_WORK else "")
        + f", the sparse path with neighbors={low} {need} bytes; pass max_dense_bytes >= {least} ({which})"
    )
