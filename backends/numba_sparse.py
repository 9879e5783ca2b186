"""Numba kernels for facility location on a sparse neighbour graph (NumPy input).

Same names, signatures and semantics as the reference kernels in :mod:`crestcore.sparse` (read its
docstring for the layout: ``nbr`` / ``sims`` (n, K + 1) with column 0 the point itself, ``order`` /
``indptr`` the candidate-major order of the present entries).

* A candidate's gain ``sum max(s_ij - cover_i, 0)`` over its entries is computed by one function,
  :func:`_sparse_gain`, in float64, in the fixed order of ``order``; naive, lazy and stochastic greedy see
  bit-identical gains, and lazy greedy (the max-heap of stale upper bounds of :mod:`.numba`, a candidate
  taken when its fresh gain beats every other bound, ties by lowest index) makes exactly naive's picks.
* Stochastic greedy maps each draw to the ``min(floor(u R), R - 1)``-th remaining candidate (ascending
  index), as every backend does, through a Fenwick tree over the remaining candidates (O(log n) a draw).
* Only the first full gain pass runs in parallel (over candidates); a lazy re-evaluation costs the
  candidate's in-degree, far less than a parallel launch.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .contract import OPTIMIZERS, SPARSE_KERNEL_NAMES, check_picks, refuse_nonfinite_gains
from .numba import _better, _heapify, _prepare_u_steps, _reseat, _sample_position
from . import _seed_shipped_kernels

_seed_shipped_kernels("numba_sparse")  # (as in .numba: before the kernels below find their cache)

__all__ = ["usable_for", "sparse_greedy", "sparse_assign"]

_OPTIMIZER_CODE = {o: i for i, o in enumerate(OPTIMIZERS)}  # naive 0, lazy 1, stochastic 2
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def usable_for(name: str, *arrays) -> bool:
    """NumPy arrays with float32/float64 similarities.

    Examples
    --------
    >>> import numpy as np
    >>> usable_for("sparse_greedy", np.zeros((3, 2)), np.zeros(6, dtype=np.int64))
    True
    >>> usable_for("sparse_greedy", np.zeros((3, 2), dtype=np.float16))  # goes to the reference
    False
    >>> usable_for("greedy_batched", np.zeros((1, 3, 3)))  # a dense kernel: crestcore.backends.numba
    False
    """
    if name not in SPARSE_KERNEL_NAMES:
        return False
    return bool(arrays) and all(type(a) in (np.ndarray, np.memmap) for a in arrays) and arrays[0].dtype in _FLOATS


@njit(cache=True)
def _sparse_gain(rows, vals, lo, hi, cover):
    g = 0.0
    for e in range(lo, hi):
        v = vals[e] - cover[rows[e]]
        if v > 0.0:
            g += v
    return g


@njit(parallel=True, cache=True)
def _all_gains(rows, vals, indptr, cover, out):
    n = indptr.shape[0] - 1
    for j in prange(n):
        out[j] = _sparse_gain(rows, vals, indptr[j], indptr[j + 1], cover)


@njit(cache=True)
def _cover_with(rows, vals, lo, hi, cover):
    for e in range(lo, hi):
        r = rows[e]
        if vals[e] > cover[r]:
            cover[r] = vals[e]


@njit(cache=True)
def _fenwick_init(tree):
    """A Fenwick tree over n ones (every candidate remaining); tree has n + 1 slots, slot 0 unused."""
    n = tree.shape[0] - 1
    for i in range(1, n + 1):
        tree[i] += 1
        p = i + (i & -i)
        if p <= n:
            tree[p] += tree[i]


@njit(cache=True)
def _fenwick_remove(tree, j):
    n = tree.shape[0] - 1
    i = j + 1
    while i <= n:
        tree[i] -= 1
        i += i & -i


@njit(cache=True)
def _fenwick_select(tree, p, top):
    """The candidate at 0-based position p among the remaining ones (ascending index)."""
    n = tree.shape[0] - 1
    pos = 0
    rem = p + 1
    step = top
    while step > 0:
        q = pos + step
        if q <= n and tree[q] < rem:
            pos = q
            rem -= tree[q]
        step >>= 1
    return pos  # 0-based index = (1-based pos + 1) - 1


@njit(cache=True)
def _sparse_solve(rows, vals, indptr, budget, opt, u, u32, out_idx, out_gain):
    n = indptr.shape[0] - 1
    cover = np.zeros(n)
    if opt == 1:  # lazy
        keys = np.empty(n)
        _all_gains(rows, vals, indptr, cover, keys)  # exact at step 0
        ids = np.arange(n)
        size = n
        _heapify(keys, ids, size)
        stamp = np.zeros(n, dtype=np.int64)
        for t in range(budget):
            picked = False
            while size > 0 and not picked:  # a bound made exact at this step is the pick
                j = ids[0]
                g = keys[0] if stamp[j] == t else _sparse_gain(rows, vals, indptr[j], indptr[j + 1], cover)
                size, picked = _reseat(keys, ids, size, stamp, t, g, j)
            if not picked:
                break
            out_idx[t] = j
            out_gain[t] = g
            _cover_with(rows, vals, indptr[j], indptr[j + 1], cover)
    elif opt == 0:  # naive
        selected = np.zeros(n, dtype=np.bool_)
        gs = np.empty(n)
        for t in range(min(budget, n)):
            _all_gains(rows, vals, indptr, cover, gs)
            bj = -1
            for j in range(n):
                if not selected[j] and (bj < 0 or gs[j] > gs[bj]):
                    bj = j
            out_idx[t] = bj
            out_gain[t] = gs[bj]
            selected[bj] = True
            _cover_with(rows, vals, indptr[bj], indptr[bj + 1], cover)
    else:  # stochastic
        tree = np.zeros(n + 1, dtype=np.int64)
        _fenwick_init(tree)
        top = 1
        while top * 2 <= n:
            top *= 2
        R = n
        s = u.shape[1]
        for t in range(budget):
            if R == 0:
                break
            best = np.int64(-1)
            bg = 0.0
            for q in range(s):
                j = _fenwick_select(tree, _sample_position(u[t, q], R, u32), top)
                if j == best:
                    continue
                g = _sparse_gain(rows, vals, indptr[j], indptr[j + 1], cover)
                if best < 0 or _better(g, j, bg, best):
                    best = j
                    bg = g
            out_idx[t] = best
            out_gain[t] = bg
            _fenwick_remove(tree, best)
            R -= 1
            _cover_with(rows, vals, indptr[best], indptr[best + 1], cover)


def sparse_greedy(nbr, sims, order, indptr, budget, optimizer, u=None):
    """Greedy on the sparse similarity: indices (budget,) int64 (-1 after the candidates run out) and
    gains (budget,) in sims' dtype.

    Examples
    --------
    Three points with one neighbour each (point 0's is 1, point 1's is 0, point 2's is 1), in the
    layout of :mod:`crestcore.sparse` (:func:`crestcore.backends._examples.three_points`): the picks and
    gains of the reference, with lazy greedy and with stochastic greedy's draws alike.

    >>> import numpy as np
    >>> from crestcore import sparse as ref
    >>> from crestcore.backends._examples import three_points
    >>> nbr, sims, order, indptr = three_points(np)
    >>> idx, gains = sparse_greedy(nbr, sims, order, indptr, 2, "lazy")
    >>> idx.tolist(), gains.round(6).tolist()
    ([1, 2], [1.7, 0.8])
    >>> np.array_equal(idx, ref.sparse_greedy(nbr, sims, order, indptr, 2, "lazy")[0])
    True
    >>> u = np.array([[0.9], [0.1]])
    >>> sparse_greedy(nbr, sims, order, indptr, 2, "stochastic", u)[0].tolist()
    [2, 0]
    >>> ref.sparse_greedy(nbr, sims, order, indptr, 2, "stochastic", u)[0].tolist()
    [2, 0]
    """
    try:
        opt = _OPTIMIZER_CODE[optimizer]
    except KeyError:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}") from None
    nbr = np.asarray(nbr)
    n, K1 = nbr.shape
    order = np.ascontiguousarray(order, dtype=np.int64)
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    if indptr.shape != (n + 1,) or order.shape != (int(indptr[-1]),):
        raise ValueError(f"indptr must be (n + 1,) = ({n + 1},) and order (indptr[-1],)")
    rows = order // K1
    vals = np.ascontiguousarray(np.asarray(sims, dtype=np.float64).reshape(-1)[order])
    refuse_nonfinite_gains(bool(np.isfinite(vals).all()))  # (a NaN candidate was passed over: review 160)
    budget = check_picks(budget, n, "budget")  # (review 167: True, 2.7 and budgets above n were taken)
    uu, u32 = _prepare_u_steps(u, budget, opt, "budget")
    out_idx = np.full(budget, -1, dtype=np.int64)
    out_gain = np.zeros(budget)
    if budget > 0 and n > 0:
        _sparse_solve(rows, vals, indptr, budget, opt, uu, u32, out_idx, out_gain)
    return out_idx, out_gain.astype(np.asarray(sims).dtype)


@njit(parallel=True, cache=True)
def _assign(nbr, sims, rank, k, first, best):
    n, K1 = nbr.shape
    for i in prange(n):
        a = k
        m = 0.0
        for q in range(K1):
            j = nbr[i, q]
            if j < 0:
                continue
            r = rank[j]
            if r >= k:
                continue
            v = float(sims[i, q])
            if a == k or v > m or (v == m and r < a):
                a = r
                m = v
        first[i] = a
        best[i] = m if a < k else 0.0


def sparse_assign(nbr, sims, picks):
    """Weights (k,) and the objective (0-d) of the picks, in sims' dtype (see the reference).

    Examples
    --------
    The graph of :func:`sparse_greedy`'s example and its picks: points 0 and 1 go to pick 1, point 2
    to itself, as in the reference:

    >>> import numpy as np
    >>> from crestcore import sparse as ref
    >>> from crestcore.backends._examples import three_points
    >>> nbr, sims, _, _ = three_points(np)
    >>> weights, objective = sparse_assign(nbr, sims, np.array([1, 2]))
    >>> weights.tolist(), float(objective)
    ([2.0, 1.0], 2.5)
    >>> ref_weights, ref_objective = ref.sparse_assign(nbr, sims, np.array([1, 2]))
    >>> np.array_equal(weights, ref_weights) and float(objective) == float(ref_objective)
    True
    """
    nbr = np.ascontiguousarray(nbr, dtype=np.int64)
    sims = np.asarray(sims)
    dtype = sims.dtype
    p = np.asarray(picks, dtype=np.int64)
    n = nbr.shape[0]
    k = p.size
    rank = np.full(n, k, dtype=np.int64)
    real = p >= 0
    rank[p[real]] = np.flatnonzero(real)
    first = np.empty(n, dtype=np.int64)
    best = np.empty(n)
    _assign(nbr, np.ascontiguousarray(sims, dtype=np.float64), rank, k, first, best)
    weights = np.bincount(first[first < k], minlength=k).astype(np.float64)
    return weights.astype(dtype), np.asarray(best.sum(), dtype=dtype)
