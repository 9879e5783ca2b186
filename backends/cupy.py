"""CuPy kernels: the batched facility-location hot loops on CuPy arrays (GPU).

Same names, signatures and semantics as :mod:`crestcore._reference_kernels` (read its docstring for the
contract) and as :mod:`crestcore.backends.torch`, whose design this module follows:

* ``greedy_batched`` reads ``K = max(budgets)`` once before the loop; the loop is fixed-shape array
  work over all ``B`` problems (no ``.item()``/``int()``/``bool()`` of device arrays, no boolean-mask
  indexing, no ``nonzero``), so the GPU runs it without waiting for the host.
* ``"lazy"`` computes the exact gains of every candidate at every step, exactly like ``"naive"``; the
  picks are therefore identical by construction, and dense batched gain computation is cheap at CREST
  sizes. One ``(B, n, c)`` work buffer is reused; ``c < n`` (chunks over candidates) only when
  ``B * n * n`` exceeds ``_MAX_TEMP_ELEMENTS``.
* ``"stochastic"`` samples as the reference: positions ``floor(u * R)`` (in ``u``'s dtype) into the
  remaining candidates ordered by index, found with one ``searchsorted`` over the row-offset cumulative
  counts of all problems (CuPy's ``searchsorted`` is 1-D), positions ``>= R`` hitting nothing.
* Ties go to the lowest index (``cupy.argmax`` returns the first maximum, as NumPy's does).
* ``greedy_features`` is the matrix-free blocked lazy greedy (one host sync per block evaluation, the
  stopping test), ``"naive"``/``"stochastic"`` without host syncs, similarity blocks of at most
  ``tile * n`` elements (capped at ``_MAX_TEMP_ELEMENTS``); see the torch module's docstring, including
  its note on the ``"max-minus"`` maximum distance (global diagonal exactly 0, as on the dense path).

Only array operations that CuPy and NumPy share with the same semantics are used, which lets the test
suite exercise this module's logic on the CPU with NumPy standing in for CuPy; the GPU tests run it for
real. Importing this module imports cupy (the dispatcher treats an ImportError as "not available").
"""

from __future__ import annotations

import math

import cupy as cp

from .contract import KERNEL_NAMES, KERNELS, METRICS, OPTIMIZERS, snap_tolerance

__all__ = ["usable_for", "similarity_batched", "greedy_batched", "assign_batched", "greedy_features",
           "facility_batched"]



# Upper bound on the elements of one work buffer (gain chunks, similarity tiles).
_MAX_TEMP_ELEMENTS = 1 << 25
# A work buffer beside a dense (B, n, n) similarity array holds at most this fraction of it (but at
# least _MIN_TEMP_ELEMENTS), so the peak memory of a batched solve stays close to the similarities' own.
_TEMP_FRACTION = 8
_MIN_TEMP_ELEMENTS = 1 << 16


def _temp_cap(total: int) -> int:
    """Elements of one work buffer beside a array of ``total`` elements: at most 1/_TEMP_FRACTION of it
    and _MAX_TEMP_ELEMENTS, at least _MIN_TEMP_ELEMENTS."""
    return min(_MAX_TEMP_ELEMENTS, max(total // _TEMP_FRACTION, _MIN_TEMP_ELEMENTS))


def available_bytes(x) -> int | None:
    """Free memory of the array's GPU (``cudaMemGetInfo`` on its device)."""
    with cp.cuda.Device(_device_key(x)):
        free, _ = cp.cuda.runtime.memGetInfo()
    return int(free)


def _device_key(a):
    dev = getattr(a, "device", None)
    return getattr(dev, "id", dev)


def usable_for(name: str, *arrays) -> bool:
    """True when every non-None argument is a CuPy array on one device, floating ones float32/float64
    (float16 goes to the reference), the others bool or integer.

    Examples
    --------
    >>> import cupy as cp
    >>> S, valid, budgets = cp.zeros((1, 3, 3)), cp.ones((1, 3), dtype=bool), cp.asarray([2])
    >>> usable_for("greedy_batched", S, valid, budgets)
    True
    >>> usable_for("greedy_batched", S.astype(cp.float16), valid, budgets)  # float16: the reference
    False
    >>> usable_for("sparse_greedy", S)  # not a kernel of this module
    False
    """
    if name not in KERNEL_NAMES:
        return False
    present = [a for a in arrays if a is not None]
    if not present:
        return False
    dev = None
    for i, a in enumerate(present):
        if not isinstance(a, cp.ndarray):
            return False
        key = _device_key(a)
        if i == 0:
            dev = key
        elif key != dev:
            return False
        kind = a.dtype.kind
        if kind == "f":
            if a.dtype not in (cp.dtype(cp.float32), cp.dtype(cp.float64)):
                return False
        elif kind not in ("b", "i", "u"):
            return False
    return present[0].dtype.kind == "f"


def _check(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# similarities
# --------------------------------------------------------------------------------------------------


def _sqnorms(X):
    return cp.sum(X * X, axis=-1)


def _normalized(X):
    nx = cp.sqrt(_sqnorms(X))
    nx = cp.where(nx > 0, nx, cp.ones_like(nx))
    return X / nx[..., None]


def _distances(A, Bm, sqa, sqb, metric):
    """Distances between rows of A (..., p, d) and Bm (..., q, d), a fresh array, with the formula and
    rounding of :func:`crestcore.similarity.pairwise_distances` (cosine: A and Bm already normalized),
    including its snap of values within ``8 eps`` (relative to ``|a|^2 + |b|^2``) of 0 to exactly 0."""
    tol = snap_tolerance(cp.finfo(A.dtype).eps)  # the contract's zero-distance snap
    G = cp.matmul(A, cp.swapaxes(Bm, -1, -2))
    if metric == "cosine":
        cp.negative(G, out=G)
        G += 1.0
        cp.clip(G, 0.0, 2.0, out=G)
        cp.copyto(G, 0.0, where=G <= tol)
        return G
    G *= 2.0  # exact
    # (a + b) - 2 G, rounded as the reference rounds it, in blocks of rows of the contiguous (L * p, q)
    # view, so that the (a + b) term and the snap mask are small work buffers and every op on G works in
    # place: never a second (..., p, q) array
    p, q = G.shape[-2], G.shape[-1]
    Gf = G.reshape(-1, q)
    L = Gf.shape[0] // max(1, p)
    sa, sb = sqa.reshape(-1), sqb.reshape(L, q)
    rows = max(1, min(Gf.shape[0], _temp_cap(Gf.size) // max(1, q)))
    for r0 in range(0, Gf.shape[0], rows):
        r1 = min(Gf.shape[0], r0 + rows)
        g = Gf[r0:r1]
        owner = cp.arange(r0, r1) // p  # the problem of each row
        T = sb[owner]
        T += sa[r0:r1, None]  # b + a == a + b exactly
        cp.subtract(T, g, out=g)
        T *= tol  # exact: tol is a power of 2
        cp.copyto(g, 0.0, where=g <= T)
        del T  # freed before the next block's is made
    if metric == "euclidean":
        cp.sqrt(G, out=G)
    return G


def similarity_batched(X, valid, metric: str, kernel: str, scale: float):
    """Dense similarities (B, n, n) of B padded problems; see the reference for the contract.

    Examples
    --------
    Two problems padded to four points: four points on a line, and two points (the last two rows are
    padding). With ``"max-minus"`` each problem's largest distance ``M`` (10, then 5) is on the diagonal:

    >>> import cupy as cp
    >>> from crestcore import _reference_kernels as ref
    >>> X = cp.asarray([[[0.0], [1.0], [2.0], [10.0]], [[0.0], [5.0], [0.0], [0.0]]], dtype=cp.float64)
    >>> valid = cp.asarray([[True, True, True, True], [True, True, False, False]])
    >>> budgets = cp.asarray([2, 1])
    >>> S = similarity_batched(X, valid, "euclidean", "max-minus", 1.0)
    >>> S[0].tolist()
    [[10.0, 9.0, 8.0, 0.0], [9.0, 10.0, 9.0, 1.0], [8.0, 9.0, 10.0, 2.0], [0.0, 1.0, 2.0, 10.0]]
    >>> S[1].tolist()
    [[5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    >>> bool(cp.allclose(S, ref.similarity_batched(X, valid, "euclidean", "max-minus", 1.0)))
    True
    """
    _check(metric, "metric", METRICS)
    _check(kernel, "kernel", KERNELS)
    B, n = X.shape[0], X.shape[1]
    valid = valid.astype(cp.bool_, copy=False)
    Xn = _normalized(X) if metric == "cosine" else X
    sq = None if metric == "cosine" else _sqnorms(X)
    D = _distances(Xn, Xn, sq, sq, metric)
    ar = cp.arange(n)
    D[:, ar, ar] = 0.0
    not_row = ~valid[:, :, None]
    not_col = ~valid[:, None, :]
    cp.copyto(D, 0.0, where=not_row)
    cp.copyto(D, 0.0, where=not_col)
    if kernel == "max-minus":
        M = D.max(axis=(1, 2)) if D.size else cp.zeros((B,), dtype=D.dtype)
        cp.subtract(M[:, None, None], D, out=D)  # M - D
    else:
        cp.divide(D, -scale, out=D)  # -(D / scale), exactly
        cp.exp(D, out=D)
    cp.copyto(D, 0.0, where=not_row)
    cp.copyto(D, 0.0, where=not_col)
    return D


# --------------------------------------------------------------------------------------------------
# batched greedy
# --------------------------------------------------------------------------------------------------


def _gain_chunk(B: int, n: int) -> int:
    """Candidates per gain chunk: the (B, n, chunk) buffer is a small fraction of S (B, n, n)."""
    return max(1, min(n, _temp_cap(B * n * n) // max(1, B * n)))


def _dense_gains(S, cover, buf, chunk):
    """gains[b, j] = sum_i max(S[b, i, j] - cover[b, i], 0), chunked over candidates j."""
    n = S.shape[2]
    c_cover = cover[:, :, None]
    parts = []
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        blk = buf[:, :, : c1 - c0]
        cp.subtract(S[:, :, c0:c1], c_cover, out=blk)
        cp.maximum(blk, 0.0, out=blk)
        parts.append(cp.sum(blk, axis=1))
    return parts[0] if len(parts) == 1 else cp.concatenate(parts, axis=1)


def _stochastic_mask(remaining, u_t):
    """(B, n) bool: the remaining candidates at positions floor(u_t * R) (R = number remaining)."""
    B, n = remaining.shape
    s = u_t.shape[1]
    R = cp.sum(remaining.astype(u_t.dtype), axis=1)
    pos = cp.minimum(cp.floor(u_t * R[:, None]), R[:, None] - 1)  # in u's dtype, as the reference
    target = pos.astype(cp.int64) + 1
    cum = cp.cumsum(remaining.astype(cp.int64), axis=1)
    rows = cp.arange(B, dtype=cp.int64)[:, None]
    # one sorted 1-D sequence: row b's counts shifted by b * (n + 1) stay below row b + 1's
    flat = (cum + rows * (n + 1)).reshape(-1)
    loc = cp.searchsorted(flat, (target + rows * (n + 1)).reshape(-1), side="left").reshape(B, s)
    loc = loc - rows * n  # local index; n when pos >= R
    hit = cp.zeros((B, n + 1), dtype=cp.bool_)
    hit[rows, loc] = True
    return hit[:, :n] & remaining


def greedy_batched(S, valid, budgets, optimizer, u=None):
    """Facility-location greedy on B dense problems at once -> (indices (B, K) int64, gains (B, K)).

    ``K = max(budgets)`` is read once before the loop; the loop never syncs with the host.

    Examples
    --------
    Budgets 2 and 1 on the similarities of :func:`similarity_batched`'s example: the middle point,
    then the outlier; the second problem's row is padded with -1. The picks are the reference's:

    >>> import cupy as cp
    >>> from crestcore import _reference_kernels as ref
    >>> X = cp.asarray([[[0.0], [1.0], [2.0], [10.0]], [[0.0], [5.0], [0.0], [0.0]]], dtype=cp.float64)
    >>> valid = cp.asarray([[True, True, True, True], [True, True, False, False]])
    >>> budgets = cp.asarray([2, 1])
    >>> S = similarity_batched(X, valid, "euclidean", "max-minus", 1.0)
    >>> idx, gains = greedy_batched(S, valid, budgets, "lazy")
    >>> idx.tolist(), gains.tolist()
    ([[1, 3], [0, -1]], [[29.0, 9.0], [5.0, 0.0]])
    >>> bool(cp.array_equal(idx, ref.greedy_batched(S, valid, budgets, "lazy")[0]))
    True
    """
    _check(optimizer, "optimizer", OPTIMIZERS)
    if optimizer == "stochastic" and u is None:
        raise ValueError("optimizer='stochastic' needs the uniform draws u (B, K, s)")
    B = S.shape[0]
    K = int(budgets.max()) if B and budgets.size else 0
    return _greedy_loop(S, valid, budgets, K, optimizer, u)


def _greedy_loop(S, valid, budgets, K: int, optimizer: str, u=None):
    B, n, _ = S.shape
    dt = S.dtype
    if K <= 0 or B == 0:
        return cp.zeros((B, max(K, 0)), dtype=cp.int64), cp.zeros((B, max(K, 0)), dtype=dt)
    valid = valid.astype(cp.bool_, copy=False)
    cover = cp.zeros((B, n), dtype=dt)
    remaining = valid.copy()
    rows = cp.arange(B)
    ar = cp.arange(n)
    neg_inf = dt.type(-math.inf)
    chunk = _gain_chunk(B, n)
    buf = cp.empty((B, n, min(chunk, n)), dtype=dt)
    idx_out = cp.empty((B, K), dtype=cp.int64)
    gain_out = cp.empty((B, K), dtype=dt)
    for t in range(K):
        gains = _dense_gains(S, cover, buf, chunk)
        cand = remaining
        if optimizer == "stochastic":
            cand = _stochastic_mask(remaining, u[:, t, :])
        j = cp.argmax(cp.where(cand, gains, neg_inf), axis=1)  # first maximum: lowest index
        active = budgets > t
        g = gains[rows, j]
        col = S[rows[:, None], ar[None, :], j[:, None]]  # (B, n) = S[b, :, j_b]
        cover = cp.where(active[:, None], cp.maximum(cover, col), cover)
        remaining[rows, j] = remaining[rows, j] & ~active
        idx_out[:, t] = cp.where(active, j, -1)
        gain_out[:, t] = cp.where(active, g, dt.type(0))
    return idx_out, gain_out


def assign_batched(S, valid, indices):
    """Cluster-size weights (B, K) and objectives (B,) of the picks ``indices`` (-1 = no pick).

    Examples
    --------
    The picks of :func:`greedy_batched`'s example: three points go to pick 1, the outlier to itself:

    >>> import cupy as cp
    >>> from crestcore import _reference_kernels as ref
    >>> X = cp.asarray([[[0.0], [1.0], [2.0], [10.0]], [[0.0], [5.0], [0.0], [0.0]]], dtype=cp.float64)
    >>> valid = cp.asarray([[True, True, True, True], [True, True, False, False]])
    >>> budgets = cp.asarray([2, 1])
    >>> S = similarity_batched(X, valid, "euclidean", "max-minus", 1.0)
    >>> idx = cp.asarray([[1, 3], [0, -1]])
    >>> weights, objective = assign_batched(S, valid, idx)
    >>> weights.tolist(), objective.tolist()
    ([[3.0, 1.0], [2.0, 0.0]], [38.0, 5.0])
    >>> bool(cp.array_equal(weights, ref.assign_batched(S, valid, idx)[0]))
    True
    """
    B, n, _ = S.shape
    K = indices.shape[1]
    dt = S.dtype
    if K == 0:
        return cp.zeros((B, 0), dtype=dt), cp.zeros((B,), dtype=dt)
    indices = indices.astype(cp.int64, copy=False)
    valid = valid.astype(cp.bool_, copy=False)
    real = indices >= 0
    safe = cp.maximum(indices, 0)
    sims = S[cp.arange(B)[:, None, None], cp.arange(n)[None, :, None], safe[:, None, :]]  # (B, n, K)
    cp.copyto(sims, -math.inf, where=~real[:, None, :])
    a = cp.argmax(sims, axis=2)  # earliest pick on ties
    best = cp.max(sims, axis=2)
    counted = valid & cp.any(real, axis=1)[:, None]
    member = (a[:, :, None] == cp.arange(K)[None, None, :]) & counted[:, :, None]
    weights = cp.sum(member, axis=1).astype(dt)
    objective = cp.sum(cp.where(counted, best, dt.type(0)), axis=1)
    return weights, objective


# --------------------------------------------------------------------------------------------------
# matrix-free path: one problem from its features
# --------------------------------------------------------------------------------------------------


class _Features:
    """Similarity tiles of one problem (n, d), computed on demand, never n x n."""

    def __init__(self, X, metric, kernel, scale, tile):
        self.n = X.shape[0]
        self.metric, self.kernel, self.scale = metric, kernel, float(scale)
        self.tile = max(1, int(tile))
        # elements of one similarity block: what ``tile`` full rows would take, capped
        self.budget = max(1, min(_MAX_TEMP_ELEMENTS, self.tile * max(self.n, 1)))
        self.dt = X.dtype
        self.X = _normalized(X) if metric == "cosine" else X
        self.sq = None if metric == "cosine" else _sqnorms(X)
        self.ar = cp.arange(self.n)
        self.M = self._max_distance() if kernel == "max-minus" else None

    def _row_chunk(self, ncols: int) -> int:
        return max(1, min(self.n, self.budget // max(1, ncols)))

    def distances(self, r0, r1, cols):
        Xc = self.X[cols]
        sqc = None if self.sq is None else self.sq[cols]
        sqr = None if self.sq is None else self.sq[r0:r1]
        D = _distances(self.X[r0:r1], Xc, sqr, sqc, self.metric)
        # the global diagonal: column c holds point cols[c], on row cols[c] - r0 when that is in range
        ri = cols - r0
        inside = (ri >= 0) & (ri < r1 - r0)
        ri = cp.clip(ri, 0, max(r1 - r0 - 1, 0))
        ci = cp.arange(cols.shape[0])
        D[ri, ci] = cp.where(inside, self.dt.type(0), D[ri, ci])
        return D

    def sims(self, r0, r1, cols):
        D = self.distances(r0, r1, cols)
        if self.kernel == "max-minus":
            return cp.subtract(self.M, D, out=D)  # M - D
        cp.divide(D, -self.scale, out=D)  # -(D / scale), exactly
        return cp.exp(D, out=D)

    def _max_distance(self):
        M = cp.zeros((), dtype=self.dt)
        rstep = min(self.tile, self.n)
        cstep = max(1, min(self.n, self.budget // rstep))
        for r0 in range(0, self.n, rstep):
            r1 = min(self.n, r0 + rstep)
            for c0 in range(0, self.n, cstep):
                c1 = min(self.n, c0 + cstep)
                M = cp.maximum(M, cp.max(self.distances(r0, r1, self.ar[c0:c1])))
        return M

    def gains(self, cols, cover):
        out = []
        ncols = cols.shape[0]
        Mc = self.M - cover if self.kernel == "max-minus" else None
        cstep = max(1, min(ncols, self.budget // min(self.tile, self.n))) if ncols else 1
        for c0 in range(0, ncols, cstep):
            cc = cols[c0 : c0 + cstep]
            step = self._row_chunk(cc.shape[0])
            g = cp.zeros((cc.shape[0],), dtype=self.dt)
            for r0 in range(0, self.n, step):
                r1 = min(self.n, r0 + step)
                if self.kernel == "max-minus":  # max(M - D - c, 0) as max((M - c) - D, 0): one pass
                    Sb = self.distances(r0, r1, cc)
                    cp.subtract(Mc[r0:r1, None], Sb, out=Sb)
                else:
                    Sb = self.sims(r0, r1, cc)
                    Sb -= cover[r0:r1, None]
                cp.maximum(Sb, 0.0, out=Sb)
                g += cp.sum(Sb, axis=0)
            out.append(g)
        return out[0] if len(out) == 1 else cp.concatenate(out)

    def column(self, j):
        step = self._row_chunk(1)
        parts = [self.sims(r0, min(self.n, r0 + step), j)[:, 0] for r0 in range(0, self.n, step)]
        return parts[0] if len(parts) == 1 else cp.concatenate(parts)


def _lazy_block(n: int) -> int:
    return max(1, min(n, max(8, min(1024, n // 16))))


def greedy_features(X, k, metric, kernel, scale, optimizer, u=None, tile=2048):
    """Greedy on one problem of n points given by features X (n, d), in tiles; never n x n.

    Returns (indices (k,) int64, gains (k,), weights (k,), objective 0-d), in X's dtype.

    Examples
    --------
    Four points on a line, two picks, as the dense kernels pick them; stochastic greedy's draws ``u``
    (k, s) pick the reference's sample:

    >>> import cupy as cp
    >>> from crestcore import _reference_kernels as ref
    >>> X = cp.asarray([[0.0], [1.0], [2.0], [10.0]], dtype=cp.float64)
    >>> idx, gains, weights, objective = greedy_features(X, 2, "euclidean", "max-minus", 1.0, "lazy")
    >>> idx.tolist(), gains.tolist(), weights.tolist(), float(objective)
    ([1, 3], [29.0, 9.0], [3.0, 1.0], 38.0)
    >>> u = cp.asarray([[0.9, 0.1], [0.5, 0.5]], dtype=cp.float64)
    >>> greedy_features(X, 2, "euclidean", "max-minus", 1.0, "stochastic", u)[0].tolist()
    [0, 2]
    >>> ref.greedy_features(X, 2, "euclidean", "max-minus", 1.0, "stochastic", u)[0].tolist()
    [0, 2]
    """
    _check(metric, "metric", METRICS)
    _check(kernel, "kernel", KERNELS)
    _check(optimizer, "optimizer", OPTIMIZERS)
    if optimizer == "stochastic" and u is None:
        raise ValueError("optimizer='stochastic' needs the uniform draws u (k, s)")
    n = X.shape[0]
    k = int(k)
    dt = X.dtype
    if k <= 0 or n == 0:
        return (cp.zeros((0,), dtype=cp.int64), cp.zeros((0,), dtype=dt), cp.zeros((0,), dtype=dt),
                cp.zeros((), dtype=dt))
    F = _Features(X, metric, kernel, scale, tile)
    ar = F.ar
    neg_inf = dt.type(-math.inf)
    cover = cp.zeros((n,), dtype=dt)
    taken = cp.zeros((n,), dtype=cp.bool_)
    picks = cp.empty((k,), dtype=cp.int64)
    pick_gains = cp.empty((k,), dtype=dt)
    if optimizer == "lazy":
        ub = F.gains(ar, cover)  # exact initial gains, upper bounds from now on
        block = _lazy_block(n)
    for t in range(k):
        if optimizer == "naive":
            g_all = cp.where(taken, neg_inf, F.gains(ar, cover))
            j = cp.argmax(g_all)
            g = g_all[j]
        elif optimizer == "stochastic":
            R = cp.sum(~taken, dtype=cp.float64)
            pos = cp.floor(u[t].astype(cp.float64) * R)
            pos = cp.minimum(pos, R - 1.0).astype(cp.int64)
            cum = cp.cumsum((~taken).astype(cp.int64))
            cands = cp.searchsorted(cum, pos + 1, side="left")
            g_c = F.gains(cands, cover)
            full = cp.full((n,), neg_inf, dtype=dt)
            full[cands] = g_c  # duplicates carry equal values
            j = cp.argmax(full)  # lowest index among the best sampled
            g = full[j]
        else:  # blocked lazy greedy
            fresh = cp.zeros((n,), dtype=cp.bool_)
            exact = cp.full((n,), neg_inf, dtype=dt)
            while True:
                key = cp.where(taken | fresh, neg_inf, ub)
                top = cp.argsort(-key)[:block]
                ok = cp.isfinite(key[top])
                g_top = F.gains(top, cover)
                exact[top] = cp.where(ok, g_top, exact[top])
                ub[top] = cp.where(ok, g_top, ub[top])
                fresh[top] = fresh[top] | ok
                c = cp.argmax(exact)
                others = cp.where(taken | fresh, neg_inf, ub)
                o = cp.argmax(others)
                gc, go = exact[c], others[o]
                stop = ~cp.isfinite(go) | (gc > go) | ((gc == go) & (c < o))
                if bool(stop):  # one host sync per block evaluation
                    break
            j, g = c, exact[c]
        j1 = cp.reshape(j, (1,))
        cover = cp.maximum(cover, F.column(j1))
        taken[j1] = True
        if optimizer == "lazy":
            ub[j1] = neg_inf
        picks[t] = j
        pick_gains[t] = g
    counts = cp.zeros((k,), dtype=dt)
    objective = cp.zeros((), dtype=cp.float64)
    step = F._row_chunk(k)
    kk = cp.arange(k)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        Sp = F.sims(r0, r1, picks)
        a = cp.argmax(Sp, axis=1)
        counts += cp.sum(a[:, None] == kk[None, :], axis=0).astype(dt)
        objective += cp.sum(cp.max(Sp, axis=1).astype(cp.float64))
    return picks, pick_gains, counts, objective.astype(dt)


def facility_batched(X, valid, budgets, metric, kernel, scale, optimizer, u=None):
    """``similarity_batched``, then ``greedy_batched``, then ``assign_batched``: indices (B, K), gains
    (B, K), weights (B, K), objectives (B,). The batched device kernels gain nothing from fusing (the
    (B, n, n) similarities are built once either way); the kernel exists so that every backend has the
    same kernels (the Numba one fuses).

    Examples
    --------
    The two padded problems of :func:`similarity_batched`'s example with budgets 2 and 1, in one call;
    the results equal the reference's:

    >>> import cupy as cp
    >>> from crestcore import _reference_kernels as ref
    >>> X = cp.asarray([[[0.0], [1.0], [2.0], [10.0]], [[0.0], [5.0], [0.0], [0.0]]], dtype=cp.float64)
    >>> valid = cp.asarray([[True, True, True, True], [True, True, False, False]])
    >>> budgets = cp.asarray([2, 1])
    >>> out = facility_batched(X, valid, budgets, "euclidean", "max-minus", 1.0, "lazy")
    >>> idx, gains, weights, objective = out
    >>> idx.tolist(), weights.tolist(), objective.tolist()
    ([[1, 3], [0, -1]], [[3.0, 1.0], [2.0, 0.0]], [38.0, 5.0])
    >>> expected = ref.facility_batched(X, valid, budgets, "euclidean", "max-minus", 1.0, "lazy")
    >>> all(bool(cp.allclose(a, b)) for a, b in zip(out, expected))
    True
    """
    S = similarity_batched(X, valid, metric, kernel, scale)
    idx, gains = greedy_batched(S, valid, budgets, optimizer, u)
    weights, objective = assign_batched(S, valid, idx)
    return idx, gains, weights, objective
