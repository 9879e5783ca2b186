"""Generic array-API kernels: the reference every backend must agree with, and the fallback.

These have exactly the names and signatures of the kernels in ``crestcore.backends.{numba,torch,cupy}``:

``similarity_batched(X, valid, metric, kernel, scale) -> S``
    see :func:`crestcore.similarity.similarity_batched`.
``greedy_batched(S, valid, budgets, optimizer, u) -> (indices, gains)``
    facility-location greedy on ``B`` dense problems at once.
``assign_batched(S, valid, indices) -> (weights, objective)``
    cluster sizes of the picks and the objective of each problem.
``greedy_features(X, k, metric, kernel, scale, optimizer, u, tile) -> (indices, gains, weights, objective)``
    one problem given by features, never materialising the n x n similarity (tiles of ``tile`` rows).
``facility_batched(X, valid, budgets, metric, kernel, scale, optimizer, u) -> (indices, gains, weights, objective)``
    ``similarity_batched``, ``greedy_batched`` and ``assign_batched`` in one call (the Numba backend
    fuses them and never forms the (B, n, n) similarities; its results are bit-for-bit those of its
    three kernels).
``draw_stratified(pool, cls, r_c, draws) -> (P, r) int64`` (host NumPy only)
    the subsets of :func:`crestcore.minibatch.draw_subsets` from pre-drawn Floyd draws.
``order_scores(D, cols, offsets, kernel, bound, scale) -> (objectives, weights, gains)`` (host NumPy only)
    objective, cluster sizes and gains of ordered pick lists on a distance block (see
    :func:`crestcore.facility.score_orders`).
``finite_abs_max(X) -> float`` (host NumPy only)
    ``max |x|`` over the float array, ``inf`` when an entry is NaN or infinite (the features' check).
``class_counts(labels, limit) -> (C,) int64`` (host NumPy only)
    ``bincount(labels)`` when every label lies in ``[0, limit)``, else an empty array.

Conventions shared by every implementation
-------------------------------------------
* Facility location ``F(S) = sum_i max_{j in S} s_ij`` with ``max`` over the empty set = 0, ``s >= 0``.
* Greedy picks ``argmax_j F(S + j) - F(S)`` among the valid, unselected candidates; ties go to the
  lowest index. ``"lazy"`` gives exactly the same picks as ``"naive"`` (stale gains are upper bounds;
  a candidate is accepted only when it beats every bound, ties included, by the same rule).
* ``"stochastic"`` (Mirzasoleiman et al. 2015): at step ``t`` of problem ``b`` the candidates are the
  remaining ones at positions ``min(floor(u[b, t, q] * R), R - 1)`` (``R`` = number remaining,
  ordered by index; the product is computed in u's dtype, where it can round up to R; the caller
  gives u the contract's ``draw_bits``: float64 for float64 or above 2^24 points, else float32),
  ``q = 0..s-1``; the best of those is picked. ``u`` holds uniform draws made by the caller's RNG, so
  every backend sees the same sample (``crestcore.facility.stochastic_draws``: for a step whose sample
  reaches the candidates remaining, draws that map to every one of them).
* ``budgets[b]`` picks are made in problem ``b``; ``indices`` is (B, K) with ``K = max(budgets)``,
  padded with -1 (gain 0) after ``budgets[b]`` picks.
* Weights: every valid point is assigned to the pick it is most similar to (ties: the earliest pick in
  greedy order); a pick's weight is the number of points assigned to it (its own included).
"""

from __future__ import annotations

import math

import numpy as np

from ._compat import device_of, from_numpy, host_to, index_dtype, namespace, to_numpy
from .backends import (OPTIMIZERS, check_choice, check_picks, refuse_draws_outside, refuse_nonfinite_gains,
                       snap_tolerance)
from ._validation import all_finite
from .similarity import _gram_distances, pairwise_distances

__all__ = ["similarity_batched", "greedy_batched", "assign_batched", "greedy_features", "facility_batched",
           "draw_stratified", "order_scores"]

from .similarity import similarity_batched  # noqa: E402  (same function, re-exported as a kernel)


def _neg_inf(xp, like):
    return xp.full_like(like, -math.inf)


def _stochastic_mask(xp, remaining, u_t):
    """(B, n) bool: candidates sampled at this step from the remaining ones (see module docstring)."""
    dtype = u_t.dtype
    rem_f = xp.astype(remaining, dtype)
    R = xp.sum(rem_f, axis=1)  # (B,)
    pos = xp.minimum(xp.floor(u_t * R[:, None]), R[:, None] - 1.0)  # (B, s); u*R may round up to R
    rank = xp.cumulative_sum(rem_f, axis=1) - 1.0  # (B, n): rank among the remaining
    hit = xp.any(rank[:, :, None] == pos[:, None, :], axis=2)
    return hit & remaining


def _check_draws(u, optimizer, shape: tuple) -> None:
    """The stochastic optimizer's draws: given, of at least ``shape``'s extents ((B, K) or (k,), then s >= 1), in
    ``[0, 1]`` (1.0: a float32 draw rounded up); a ValueError otherwise (the other optimizers ignore them)."""
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    if optimizer != "stochastic":
        return
    want = "(" + ", ".join(str(e) for e in shape) + ", s)"
    if u is None:
        raise ValueError(f"u (uniform draws of shape {want}) is required by the 'stochastic' optimizer")
    dims = tuple(u.shape)
    if len(dims) != len(shape) + 1 or any(a < b for a, b in zip(dims, shape)) or dims[-1] < 1:
        raise ValueError(f"u must have shape {want} (at least those extents), got {dims}")
    xp = namespace(u, names=("u",))
    # (NaN is out of range too; bool(), not to_numpy: any device)
    refuse_draws_outside(not math.prod(dims) or bool(xp.all((u >= 0) & (u <= 1))))


def greedy_batched(S, valid, budgets, optimizer, u=None):
    """Reference greedy over B dense problems; ``lazy`` and ``naive`` coincide by construction here. A
    problem whose valid candidates run out picks fewer (padded with -1, gain 0); non-finite gains are refused
    (:func:`~crestcore.backends.contract.refuse_nonfinite_gains`)."""
    xp = namespace(S, valid, budgets, names=("S", "valid", "budgets"))
    if S.ndim != 3 or S.shape[1] != S.shape[2]:
        raise ValueError(f"S must be (B, n, n), got shape {tuple(S.shape)}")
    B, n, _ = S.shape
    dev = device_of(S)
    K = int(to_numpy(xp.max(budgets))) if B else 0
    _check_draws(u, optimizer, (B, K))
    # each step picks a new valid candidate while any remain
    limit = xp.minimum(budgets, xp.sum(xp.astype(valid, budgets.dtype), axis=1)) if B else budgets
    cover = xp.zeros((B, n), dtype=S.dtype, device=dev)
    selected = xp.zeros((B, n), dtype=xp.bool, device=dev)
    ar = xp.arange(n, device=dev)
    idx_cols, gain_cols = [], []
    zero = xp.zeros_like(S)
    for t in range(K):
        # (B, n): each candidate's terms as a row (S^T, made row-major), summed along it
        gains = xp.sum(_candidate_rows(xp, xp.maximum(xp.matrix_transpose(S) - cover[:, None, :], zero)), axis=2)
        cand = valid & ~selected
        if optimizer == "stochastic":
            cand = _stochastic_mask(xp, cand, u[:, t, :])
        masked = xp.where(cand, gains, _neg_inf(xp, gains))
        j = xp.argmax(masked, axis=1)  # first maximum = lowest index
        onehot = ar[None, :] == j[:, None]
        active = limit > t
        g = xp.sum(xp.where(onehot, gains, xp.zeros_like(gains)), axis=1)
        col = xp.sum(xp.where(onehot[:, None, :], S, zero), axis=2)  # (B, n) = S[b, :, j_b]
        cover = xp.where(active[:, None], xp.maximum(cover, col), cover)
        selected = selected | (onehot & active[:, None])
        idx_cols.append(xp.where(active, j, xp.full_like(j, -1)))
        gain_cols.append(xp.where(active, g, xp.zeros_like(g)))
    if K == 0:
        return (xp.zeros((B, 0), dtype=index_dtype(xp), device=dev), xp.zeros((B, 0), dtype=S.dtype, device=dev))
    gains = xp.stack(gain_cols, axis=1)
    refuse_nonfinite_gains(all_finite(xp, gains))  # (bool(), not to_numpy: any device)
    return xp.astype(xp.stack(idx_cols, axis=1), index_dtype(xp)), gains


def assign_batched(S, valid, indices):
    """Cluster-size weights (B, K) and objectives (B,) of the picks ``indices`` (-1 = no pick)."""
    xp = namespace(S, valid, indices, names=("S", "valid", "indices"))
    B, n, _ = S.shape
    K = indices.shape[1]
    dev = device_of(S)
    if K == 0:
        return xp.zeros((B, 0), dtype=S.dtype, device=dev), xp.zeros((B,), dtype=S.dtype, device=dev)
    ar = xp.arange(n, device=dev)
    onehot = xp.astype(ar[None, None, :] == indices[:, :, None], S.dtype)  # (B, K, n); -1 matches none
    sims = xp.matmul(S, xp.matrix_transpose(onehot))  # (B, n, K): S[b, i, pick_t]
    real = indices >= 0
    sims = xp.where(real[:, None, :], sims, _neg_inf(xp, sims))
    a = xp.argmax(sims, axis=2)  # (B, n), earliest pick on ties
    kk = xp.arange(K, device=dev)
    member = (a[:, :, None] == kk[None, None, :]) & valid[:, :, None] & real[:, None, :]
    weights = xp.sum(xp.astype(member, S.dtype), axis=1)
    best = xp.max(sims, axis=2)
    best = xp.where(valid & xp.any(real, axis=1)[:, None], best, xp.zeros_like(best))
    objective = xp.sum(best, axis=1)
    return weights, objective


# --------------------------------------------------------------------------------------------------
# matrix-free path: one big problem given by its features
# --------------------------------------------------------------------------------------------------


def _sim_block(xp, Xi, Xj, metric, kernel, scale, M, same_offset=None):
    D = pairwise_distances(Xi, Xj, metric=metric)
    if same_offset is not None:  # exact zeros on the global diagonal
        ni, nj = D.shape
        ri = xp.arange(ni, device=device_of(D))[:, None] + same_offset[0]
        rj = xp.arange(nj, device=device_of(D))[None, :] + same_offset[1]
        D = xp.where(ri == rj, xp.zeros_like(D), D)
    if kernel == "max-minus":
        return M - D
    return xp.exp(-D / scale)


def _max_distance(xp, X, metric, tile):
    n = X.shape[0]
    M = 0.0
    for a in range(0, n, tile):
        for b in range(a, n, tile):
            D = pairwise_distances(X[a : min(n, a + tile), :], None if a == b else X[b : min(n, b + tile), :], metric=metric)
            M = max(M, float(to_numpy(xp.max(D))))
    return M


def _candidate_sims(xp, X, cols, metric, kernel, scale, M, tile):
    """(len(cols), n) similarities of the candidates ``cols`` (host int array) to every point: candidate
    major, one row per candidate (the layout the gains are summed in, see :func:`_candidate_rows`)."""
    dev = device_of(X)
    C = xp.take(X, from_numpy(np.asarray(cols, dtype=np.int64), xp, dev), axis=0)
    out = []
    n = X.shape[0]
    for a in range(0, n, tile):
        Xi = X[a : min(n, a + tile), :]
        D = pairwise_distances(C, Xi, metric=metric)
        rows = xp.arange(Xi.shape[0], device=dev)[None, :] + a
        D = xp.where(rows == from_numpy(np.asarray(cols, dtype=np.int64), xp, dev)[:, None], xp.zeros_like(D), D)
        out.append(M - D if kernel == "max-minus" else xp.exp(-D / scale))
    return xp.concat(out, axis=1)


def _candidate_rows(xp, T):
    """``T`` (..., candidates, points) laid out row-major, so that a sum over the last axis adds every
    candidate's terms in the same order (a library that follows its inputs' strides could keep a
    transposed layout and round the columns past its vector width in another order): candidates with
    the same similarities, duplicate points, get bit-identical gains and tie to the lowest index."""
    return xp.reshape(xp.reshape(T, (-1,)), T.shape)


def greedy_features(X, k, metric, kernel, scale, optimizer, u=None, tile=2048):
    """Greedy on one problem of n points given by features X (n, d), in tiles; never n x n.

    ``lazy`` here is blocked lazy greedy: the candidates with the largest upper bounds are re-evaluated
    a block at a time (one tile operation) until the best exact gain beats every remaining bound.
    Bookkeeping of bounds is on the host; similarity work stays in X's namespace and device.
    """
    xp = namespace(X, names=("X",))
    n = X.shape[0]
    k = check_picks(k, n)
    _check_draws(u, optimizer, (k,))
    tile = max(1, int(tile))
    dev = device_of(X)
    M = _max_distance(xp, X, metric, tile) if kernel == "max-minus" else 0.0
    cover = xp.zeros((n,), dtype=X.dtype, device=dev)
    selected = np.zeros(n, dtype=bool)
    picks, pick_gains = [], []

    def gains_of(cols):
        """Exact gains of the candidates ``cols`` (host ints), ``tile`` columns at a time."""
        out = np.empty(cols.size, dtype=np.float64)
        for a in range(0, cols.size, tile):
            T = _candidate_sims(xp, X, cols[a : a + tile], metric, kernel, scale, M, tile) - cover[None, :]
            g = xp.sum(_candidate_rows(xp, xp.maximum(T, xp.zeros_like(T))), axis=1)
            out[a : a + tile] = to_numpy(g).astype(np.float64)
        return out

    ub = gains_of(np.arange(n))  # initial gains (cover = 0)
    block = max(8, min(256, n // 64 or 1))
    for t in range(k):
        if optimizer in ("stochastic", "naive"):
            cands = np.flatnonzero(~selected)
            if optimizer == "stochastic":
                pos = np.floor(to_numpy(u[t, :]) * cands.size)  # in u's dtype, as the dense path
                cands = np.unique(cands[np.minimum(pos.astype(np.int64), cands.size - 1)])
            g = gains_of(cands)
            best = int(np.argmax(g))
            j, gain = int(cands[best]), float(g[best])
        else:  # blocked lazy: re-evaluate the largest bounds a block at a time
            fresh = np.zeros(n, dtype=bool)
            exact_g = np.full(n, -np.inf)
            while True:
                key = np.where(selected | fresh, -np.inf, ub)
                top = np.argsort(-key, kind="stable")[:block]
                top = top[np.isfinite(key[top])]
                if top.size:
                    exact_g[top] = ub[top] = gains_of(top)
                    fresh[top] = True
                c = int(np.argmax(np.where(fresh, exact_g, -np.inf)))
                others = np.where(selected | fresh, -np.inf, ub)
                o = int(np.argmax(others))
                if not np.isfinite(others[o]) or exact_g[c] > others[o] or (exact_g[c] == others[o] and c < o):
                    break
            j, gain = c, float(exact_g[c])
        picks.append(j)
        pick_gains.append(gain)
        selected[j] = True
        ub[j] = -np.inf
        col = _candidate_sims(xp, X, np.array([j]), metric, kernel, scale, M, tile)[0, :]
        cover = xp.maximum(cover, col)
    idx = np.asarray(picks, dtype=np.int64)
    # weights: assignment to the most similar pick, tile by tile (earliest pick on ties)
    counts = np.zeros(len(picks), dtype=np.float64)
    objective = 0.0
    if len(picks):
        for a in range(0, n, tile):
            Xi = X[a : min(n, a + tile), :]
            Sp = _sim_block(xp, Xi, xp.take(X, from_numpy(idx, xp, dev), axis=0), metric, kernel, scale, M)
            rows = np.arange(a, a + Xi.shape[0])
            self_hit = from_numpy(rows[:, None] == idx[None, :], xp, dev)
            if kernel == "max-minus":
                Sp = xp.where(self_hit, xp.full_like(Sp, M), Sp)
            else:
                Sp = xp.where(self_hit, xp.ones_like(Sp), Sp)
            asg = to_numpy(xp.argmax(Sp, axis=1))
            counts += np.bincount(asg, minlength=len(picks))
            objective += float(to_numpy(xp.sum(xp.max(Sp, axis=1))))
    return (
        from_numpy(idx, xp, dev),
        host_to(np.asarray(pick_gains, dtype=np.float64), X),
        host_to(counts, X),
        host_to(np.asarray(objective, dtype=np.float64), X),
    )


def facility_batched(X, valid, budgets, metric, kernel, scale, optimizer, u=None):
    """``similarity_batched``, then ``greedy_batched``, then ``assign_batched``."""
    S = similarity_batched(X, valid, metric, kernel, scale)
    idx, gains = greedy_batched(S, valid, budgets, optimizer, u)
    weights, objective = assign_batched(S, valid, idx)
    return idx, gains, weights, objective


def draw_stratified(pool, cls, r_c, draws):
    """Class-blocked subsets (P, r) by Floyd's algorithm (host NumPy; the Numba backend's host kernel
    of the same name returns the same array).

    ``pool`` (N,) int64 indices and ``cls`` (N,) their class positions in ``[0, C)``; the members of
    class c are ``pool[cls == c]`` in pool order. For subset p and class c, Floyd's algorithm draws
    ``r_c[c]`` distinct members: at slot t (``j = N_c - r_c + t``) it takes position
    ``x = draws[p, off_c + t]`` (uniform in ``[0, j]``), or ``j`` when x is taken already. Every
    ``r_c``-subset of the class is equally likely. Block c of row p (columns ``off_c .. off_c + r_c``)
    holds the picks sorted.

    Vectorised without a loop over the slots: slot t takes ``j`` exactly when its draw repeats an
    earlier slot's draw in the block, or equals the ``j`` of an earlier slot ``t' = x - (N_c - r_c)``
    that took its own ``j`` (a position is taken either as some slot's draw or as some slot's ``j``).
    The first is found by one sort per row; the second is a chain through earlier slots, resolved by
    repeating one gather until nothing changes (as many rounds as the longest chain, usually one).
    """
    cls = np.asarray(cls, dtype=np.int64)
    C = np.asarray(r_c).size
    # refused as the Numba kernel refuses it (the 8- or 16-bit sort keys would wrap such values)
    if cls.size and (int(cls.min()) < 0 or int(cls.max()) >= C):
        raise ValueError(f"cls must hold class positions in [0, {C})")
    return draw_grouped(group_by_class(pool, cls, C), np.bincount(cls, minlength=C), r_c, draws)


def group_by_class(pool, cls, C: int) -> np.ndarray:
    """The pool's indices class after class (each class in pool order): a stable sort of the class positions
    ``cls`` (in ``[0, C)``) as the narrowest unsigned type that holds them (NumPy sorts 8- and 16-bit integers
    by radix, linear; int64 by merging, about 5x slower at 60,000; the same order)."""
    cls = np.asarray(cls, dtype=np.int64)
    key = cls.astype(np.uint8) if C <= 256 else (cls.astype(np.uint16) if C <= 65536 else cls)
    return np.asarray(pool, dtype=np.int64)[np.argsort(key, kind="stable")]


def draw_grouped(members, sizes, r_c, draws):
    """:func:`draw_stratified` on a pool already grouped by class: ``members`` (N,) the pool's indices class
    after class (each class in pool order), ``sizes`` (C,) each class's count. The same subsets, in
    O(P r log r): nothing is done over the pool (a just-in-time selection draws its rows one at a time, each
    when its step comes, from the grouping made once)."""
    members = np.asarray(members, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    r_c = np.asarray(r_c, dtype=np.int64)
    draws = np.asarray(draws, dtype=np.int64)
    C = r_c.size
    P, r = draws.shape
    if r_c.ndim != 1 or sizes.shape != (C,) or (r_c.size and (bool((r_c < 0).any()) or bool((r_c > sizes).any()))):
        raise ValueError("r_c must be 1-D with 0 <= r_c[c] <= the size of class c")
    start = np.cumsum(sizes) - sizes
    off = np.cumsum(r_c) - r_c
    blk = np.repeat(np.arange(C), r_c)  # class block of every column
    t = np.arange(r) - off[blk]  # slot within the block
    base = (sizes - r_c)[blk]
    j = base + t  # Floyd's j, a position within the class
    if draws.size and (bool((draws < 0).any()) or bool((draws > j).any())):
        raise ValueError("draws must hold draws[p, off_c + t] in [0, N_c - r_c + t]")
    if draws.size == 0:
        return np.zeros((P, r), dtype=np.int64)
    taken = _repeated_draws(draws, off[blk], int(sizes.max()) + 1)  # (P * r,) flat
    q = draws - base[None, :]  # the earlier slot whose j the draw is, where 0 <= q < t
    chain = np.flatnonzero(((q >= 0) & (q < t[None, :])).ravel())
    ref = ((np.arange(P, dtype=np.int64) * r)[:, None] + off[blk][None, :] + q).ravel()[chain]
    while chain.size:
        up = taken[ref] & ~taken[chain]
        if not up.any():
            break
        taken[chain[up]] = True
    vals = members[np.where(taken.reshape(P, r), j[None, :], draws) + start[blk][None, :]]
    big = int(members.max()) + 1 if members.size else 1
    key = blk[None, :] * big + vals  # sort within blocks: the block order is kept by the key
    key.sort(axis=1)
    return key - blk[None, :] * big


def _repeated_draws(draws, block_start, span):
    """Flat (P * r,) flags: the draw repeats one made at an earlier column of its row's block
    (``block_start`` (r,): the first column of each column's block; the draws lie in ``[0, span)``)."""
    P, r = draws.shape
    taken = np.zeros(P * r, dtype=bool)
    cols = np.arange(r, dtype=np.int64)
    if r * r * span < 2**62:  # keys unique per cell: (block, draw) major, the column minor
        keys = ((block_start * span)[None, :] + draws) * r + cols[None, :]
        keys.sort(axis=1)
        rows, at = np.nonzero(keys[:, 1:] // r == keys[:, :-1] // r)
        taken[rows * r + keys[rows, at + 1] % r] = True
        return taken
    for p in range(P):  # keys that would overflow: the same by a lexicographic sort per row
        o = np.lexsort((cols, draws[p], block_start))
        same = (draws[p][o[1:]] == draws[p][o[:-1]]) & (block_start[o[1:]] == block_start[o[:-1]])
        taken[p * r + o[1:][same]] = True
    return taken


def order_scores(G, sx, sy, cols, offsets, metric, kernel, bound, scale):
    """Per ordered pick list ``q`` (the columns ``cols[offsets[q]:offsets[q + 1]]``, in greedy order) of a
    block of points against candidate rows given by inner products ``G`` (n, c) and squared norms ``sx``
    (n,), ``sy`` (c,) (cosine: ``G`` of the unit rows, norms unused): the objective ``sum_i max_j s_ij``,
    each pick's cluster size (the points most similar to it, ties to the earliest pick) and its gain along
    the order ``sum_i max(s_ij - max_{l < j} s_il, 0)``, in float64 (host NumPy; the Numba host kernel of
    the same name returns the same values up to the order of the sums). Distances from
    :func:`crestcore.similarity._gram_distances` (float64 snap), ``s = max(bound - D, 0)`` for
    ``"max-minus"``, ``exp(-D / scale)`` for ``"exp"``; an empty list scores 0.
    """
    G = np.asarray(G, dtype=np.float64)
    cols = np.asarray(cols, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    D = _gram_distances(np, G, np.asarray(sx, dtype=np.float64), np.asarray(sy, dtype=np.float64), metric,
                        snap_tolerance(np.finfo(np.float64).eps))
    nq = offsets.size - 1
    objectives = np.zeros(nq)
    weights = np.zeros(cols.size)
    gains = np.zeros(cols.size)
    for q in range(nq):
        a, b = int(offsets[q]), int(offsets[q + 1])
        if a == b or D.shape[0] == 0:
            continue
        sub = D[:, cols[a:b]]
        S = np.maximum(bound - sub, 0.0) if kernel == "max-minus" else np.exp(-sub / scale)
        run = np.maximum.accumulate(S, axis=1)
        objectives[q] = run[:, -1].sum()
        weights[a:b] = np.bincount(np.argmax(S, axis=1), minlength=b - a)
        gains[a:b] = np.diff(run, axis=1, prepend=0.0).sum(axis=0)
    return objectives, weights, gains


def finite_abs_max(X):
    """``max |x|`` over every entry of the float32 or float64 array ``X``, as a Python float; ``inf`` when
    an entry is NaN or infinite (and 0.0 for an empty array): one max and one min, NaN propagating through
    both (the Numba host kernel of the same name makes one pass over the bits)."""
    X = np.asarray(X)
    if X.dtype not in (np.float32, np.float64):
        raise TypeError(f"X must be float32 or float64, got {X.dtype}")
    if X.size == 0:
        return 0.0
    hi, lo = float(X.max()), float(X.min())
    if not (math.isfinite(hi) and math.isfinite(lo)):
        return math.inf
    return max(hi, -lo)


def class_counts(labels, limit):
    """``np.bincount(labels)`` (int64) when every label of the 1-D integer array lies in ``[0, limit)``,
    else an empty int64 array (the caller then sorts)."""
    raw = np.asarray(labels)
    if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {raw.shape}, dtype {raw.dtype}")
    labels = raw.astype(np.int64, copy=False)
    if labels.size == 0 or int(labels.min()) < 0 or int(labels.max()) >= limit:
        return np.zeros(0, dtype=np.int64)
    return np.bincount(labels)
