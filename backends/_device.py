"""The device kernels' one program: the batched facility-location kernels of :mod:`.torch` and :mod:`.cupy`.

Both modules run this code on their own arrays. Each passes an :class:`Ops` object that spells the few
operations the two libraries spell differently (array creation on a device, in-place fills, row-wise
gathers and scatters, the diagonal, ``searchsorted``, top-k, counting); everything else is written with
what torch, CuPy and NumPy (the CuPy module's CPU stand-in in ``tests/backends/test_cupy.py``) name and
define alike: ``ops.xp.matmul``, ``ops.xp.where``, ``ops.xp.sum(x, axis=...)``, ``out=`` arguments,
operators and slicing. Same names, signatures and semantics as :mod:`crestcore._reference_kernels` (read
its docstring for the contract). This module imports neither torch nor CuPy.

Design choices
--------------
* **Batched, no host sync in the greedy loop.** ``greedy_batched`` reads ``K = max(budgets)`` once
  (one sync, before the loop) and then :func:`greedy_loop` runs ``K`` steps of fixed-shape array ops
  over all ``B`` problems: no ``.item()``, ``int()``/``bool()`` of a device array, ``nonzero`` or
  boolean-mask indexing. On a GPU the whole loop is queued asynchronously (``tests/backends/test_torch.py``
  checks this with ``torch.cuda.set_sync_debug_mode("error")``, and on CPU by running the loop on torch's
  ``meta`` device, where any host read fails).
* **"lazy" == "naive" by construction.** Every step computes the exact gains of every candidate of
  every problem: ``gains[b, j] = sum_i max(S[b, i, j] - cover[b, i], 0)``. At CREST sizes (``n`` of a
  few hundred per class, ``B = P x C`` problems) this dense batched computation is a handful of
  memory-bound kernels per step, cheaper than the data-dependent control flow of a lazy queue, and it
  makes the two optimizers return the same picks trivially. ``"lazy"`` is accepted and runs this.
* **Memory.** One work buffer ``(B, n, c)`` is reused across steps; ``c = n`` unless that exceeds
  an eighth of the similarities (``_TEMP_FRACTION``) and ``_MIN_TEMP_ELEMENTS`` (2^21), or
  ``_MAX_TEMP_ELEMENTS``, in which case the gain computation is chunked over candidates (a static
  Python loop, still no sync). ``similarity_batched`` builds the ``(B, n, n)`` result in place
  (one matmul output plus small work buffers), never a ``(B, n, n)`` boolean mask.
* **Stochastic greedy** samples exactly as the reference: positions ``floor(u * R)`` (computed in
  ``u``'s dtype, as the reference does) into the remaining candidates ordered by index. The candidate
  at position ``p`` is found with a row-wise ``searchsorted`` of ``p + 1`` in the cumulative count of
  remaining candidates (static shapes; positions ``>= R`` hit nothing, as in the reference).
* **Ties** go to the lowest index everywhere: ``argmax`` returns the first maximum in both libraries.
* ``greedy_features`` (one problem from its features, never ``n x n``) is a blocked lazy greedy on the
  device: upper bounds live on the device, a block of the best bounds is re-evaluated exactly, and the
  stopping test (the best exact gain beats every remaining bound, ties to the lower index) costs one
  host sync per block evaluation, usually one per step. ``"naive"`` and ``"stochastic"`` need no sync
  at all. Similarity blocks hold at most ``tile * n`` elements (what ``tile`` full rows take, the
  caller's memory budget; capped at ``_MAX_TEMP_ELEMENTS``), shaped to the candidates evaluated, so a
  lazy block of a few hundred columns is one or two array operations rather than ``n / tile`` of them.
  Unlike the reference, the maximum distance of ``"max-minus"`` is taken with the global diagonal at
  exactly 0 (as the dense path does); the two differ only when every off-diagonal distance is below the
  rounding noise of a self-distance (all-identical points).
"""

from __future__ import annotations

import math
from typing import Any

from .contract import (KERNEL_NAMES, KERNELS, METRICS, OPTIMIZERS, check_choice, check_picks, exact_shift,
                       refuse_draws_outside, refuse_nonfinite_gains, snap_tolerance)

# Upper bound on the elements of one work buffer (gain chunks, similarity tiles): 2**25 elements is
# 128 MiB in float32 / 256 MiB in float64.
_MAX_TEMP_ELEMENTS = 1 << 25
# A work buffer beside a dense (B, n, n) similarity array holds at most this fraction of it (but at
# least _MIN_TEMP_ELEMENTS), so the peak memory of a batched solve stays close to the similarities' own.
# The floor, 2**21 elements (8 MiB in float32), lets the many tiny problems of a CREST step (P x C of a
# few dozen points) take their gains in one chunk: at P = 10 a 1/8 buffer cut each pick into about ten
# chunks of three operations, and the operations' count, not their size, set the time.
_TEMP_FRACTION = 8
_MIN_TEMP_ELEMENTS = 1 << 21


class Ops:
    """One array library's spelling of the operations this program needs beyond :attr:`xp`.

    ``xp`` is the library's namespace (``torch``, ``cupy``), used for what every supported library
    names and defines alike. ``int64``, ``bool_`` and ``float64`` are its dtypes. ``device`` values are
    whatever :meth:`device` returns, handed back to the creation methods. Methods ending in ``_`` work
    in place. A subclass per backend module implements every method.
    """

    xp: Any
    int64: Any
    bool_: Any
    float64: Any

    def device(self, x) -> Any:
        """Where ``x`` lives, as the creation methods take it."""
        raise NotImplementedError

    def on_gpu(self, x) -> bool:
        """Whether ``x`` lives on a GPU (sizes the lazy blocks of :func:`greedy_features`)."""
        raise NotImplementedError

    def zeros(self, shape, dtype, device):
        """A new array of zeros on ``device`` (as are ``empty`` and ``full``)."""
        raise NotImplementedError

    def empty(self, shape, dtype, device):
        raise NotImplementedError

    def full(self, shape, value, dtype, device):
        raise NotImplementedError

    def arange(self, start: int, stop: int, device):
        """int64 ``start, ..., stop - 1``."""
        raise NotImplementedError

    def astype(self, x, dtype=None, device=None):
        """``x`` in ``dtype`` (None: its own) on ``device`` (None: its own); ``x`` itself when nothing
        changes."""
        raise NotImplementedError

    def copy(self, x):
        """A new array with x's values."""
        raise NotImplementedError

    def concat(self, parts, axis: int):
        """The arrays ``parts`` joined along ``axis``."""
        raise NotImplementedError

    def fill_where_(self, a, mask, value) -> None:
        """``a[mask] = value`` (``mask`` broadcasts against ``a``)."""
        raise NotImplementedError

    def snap_(self, a, tol: float) -> None:
        """``a[a <= tol] = 0``: the contract's zero-distance snap of cosine distances."""
        raise NotImplementedError

    def clamp_min_(self, a, low: float):
        """``a = max(a, low)``; returns ``a``."""
        raise NotImplementedError

    def zero_diagonal_(self, D) -> None:
        """``D[b, i, i] = 0`` for every problem ``b`` of ``D`` (B, n, n)."""
        raise NotImplementedError

    def take(self, a, idx):
        """``a[idx]``: rows of ``a`` along its first axis."""
        raise NotImplementedError

    def take_along_rows(self, a, idx):
        """``out[b, q] = a[b, idx[b, q]]`` for ``a`` (B, m) and ``idx`` (B, s)."""
        raise NotImplementedError

    def put_along_rows_(self, a, idx, values) -> None:
        """``a[b, idx[b, q]] = values[b, q]`` (or the scalar ``values``)."""
        raise NotImplementedError

    def take_columns(self, S, idx):
        """``out[b, i, t] = S[b, i, idx[b, t]]`` for ``S`` (B, n, n) and ``idx`` (B, K): (B, n, K)."""
        raise NotImplementedError

    def count_rows(self, labels, K: int, dtype, where=None):
        """``out[b, t]`` (B, K) in ``dtype``: how many ``i`` have ``labels[b, i] == t`` (and
        ``where[b, i]``); labels in ``[0, K)``."""
        raise NotImplementedError

    def searchsorted(self, a, v):
        """The first ``i`` with ``a[i] >= v`` (``len(a)`` when none), for sorted int64 ``a``; row by
        row when ``a`` (B, n) and ``v`` (B, s) are 2-D."""
        raise NotImplementedError

    def top_k(self, x, k: int):
        """``(values, indices)`` of ``k`` largest entries of the 1-D ``x``."""
        raise NotImplementedError


def usable_for(name: str, arrays, accept, device_of, floating) -> bool:
    """The dispatch check of a device module: ``name`` is a dense kernel, at least one argument is not
    None, every such argument passes ``accept(name, a)`` (the module's type, device type and dtype rules)
    and lives on the device of the first (``device_of``), and the first (S or X) is ``floating``."""
    if name not in KERNEL_NAMES:
        return False
    present = [a for a in arrays if a is not None]
    if not present:
        return False
    for a in present:
        if not accept(name, a) or device_of(a) != device_of(present[0]):
            return False
    return floating(present[0])


def _temp_cap(total: int) -> int:
    """Elements of one work buffer beside an array of ``total`` elements: at most 1/_TEMP_FRACTION of it
    and _MAX_TEMP_ELEMENTS, at least _MIN_TEMP_ELEMENTS."""
    return min(_MAX_TEMP_ELEMENTS, max(total // _TEMP_FRACTION, _MIN_TEMP_ELEMENTS))


# --------------------------------------------------------------------------------------------------
# similarities
# --------------------------------------------------------------------------------------------------


def _sqnorms(xp, X):
    """Squared norms of the rows of X (..., d)."""
    return xp.sum(X * X, axis=-1)


def _normalized(xp, X):
    """X (..., d) with every non-zero row scaled to unit norm (zero rows stay 0)."""
    nx = xp.sqrt(_sqnorms(xp, X))
    nx = xp.where(nx > 0, nx, xp.ones_like(nx))
    return X / nx[..., None]


def distances(ops: Ops, A, Bm, sqa, sqb, metric: str):
    """Distances between rows of A (..., p, d) and Bm (..., q, d) as a fresh array, with the formula
    and rounding of :func:`crestcore.similarity.pairwise_distances` (``sqa``/``sqb``: squared norms;
    for cosine ``A``/``Bm`` already normalized and the norms unused): values within ``8 eps`` (relative
    to ``|a|^2 + |b|^2``) of 0 are snapped to exactly 0, so identical points are at distance 0."""
    xp = ops.xp
    tol = snap_tolerance(xp.finfo(A.dtype).eps)  # the contract's zero-distance snap
    G = xp.matmul(A, xp.swapaxes(Bm, -1, -2))
    if metric == "cosine":  # clip(1 - cos, 0, 2), then D <= tol -> 0, in place on the matmul output
        xp.negative(G, out=G)
        G += 1.0
        xp.clip(G, 0.0, 2.0, out=G)
        ops.snap_(G, tol)
        return G
    # (a + b) - 2 G, rounded as the reference rounds it, in blocks of rows of the contiguous (L * p, q)
    # view, so that the (a + b) term and the snap mask are small work buffers and every op on G works in
    # place: never a second (..., p, q) array
    p, q = G.shape[-2], G.shape[-1]
    Gf = G.reshape(-1, q)
    L = Gf.shape[0] // max(1, p)
    sa, sb = sqa.reshape(-1), sqb.reshape(L, q)
    rows = max(1, min(Gf.shape[0], _temp_cap(Gf.shape[0] * q) // max(1, q)))
    for r0 in range(0, Gf.shape[0], rows):
        r1 = min(Gf.shape[0], r0 + rows)
        g = Gf[r0:r1]
        owner = ops.arange(r0, r1, ops.device(G)) // p  # the problem of each row
        T = ops.take(sb, owner)
        T += sa[r0:r1, None]  # b + a == a + b exactly
        g *= -2.0  # exact
        g += T  # T - 2 g: one rounded addition
        T *= tol  # exact: tol is a power of 2
        ops.fill_where_(g, g <= T, 0.0)
        del T  # freed before the next block's is made
    if metric == "euclidean":
        xp.sqrt(G, out=G)
    return G


def _to_similarities(xp, D, kernel: str, M, scale: float):
    """The kernel applied to the distances D in place: ``M - D`` (``M`` broadcast against D) or
    ``exp(-D / scale)``; returns D."""
    if kernel == "max-minus":
        return xp.subtract(M, D, out=D)
    xp.divide(D, -scale, out=D)  # -(D / scale), exactly
    return xp.exp(D, out=D)


def _mirror_upper_(ops: Ops, D, tile: int = 32) -> None:
    """``D`` (B, n, n) made exactly symmetric in place, as the reference makes it: every entry below the
    diagonal takes its mirror above it (the matmul may round ``G[i, j]`` and ``G[j, i]`` differently)."""
    xp = ops.xp
    n = D.shape[-1]
    for r0 in range(0, n, tile):
        r1 = min(n, r0 + tile)
        if r0:
            D[:, r0:r1, :r0] = xp.swapaxes(D[:, :r0, r0:r1], 1, 2)  # the block row's left part (disjoint)
        blk = D[:, r0:r1, r0:r1]
        ar = ops.arange(0, r1 - r0, ops.device(D))
        blk[...] = xp.where(ar[:, None] < ar[None, :], blk, xp.swapaxes(blk, 1, 2))


def similarity_batched(ops: Ops, X, valid, metric: str, kernel: str, scale: float):
    """Dense similarities (B, n, n) of B padded problems, 0 on padded rows and columns; see the
    reference for the contract."""
    check_choice(metric, "metric", METRICS)
    check_choice(kernel, "kernel", KERNELS)
    xp = ops.xp
    valid = ops.astype(valid, ops.bool_)
    # each problem translated next to the origin, exactly (the contract's exact_shift): the Gram form
    # keeps the distances of a cloud far from the origin
    Xn = _normalized(xp, X) if metric == "cosine" else X - exact_shift(xp, X, valid)
    sq = None if metric == "cosine" else _sqnorms(xp, Xn)
    D = distances(ops, Xn, Xn, sq, sq, metric)
    _mirror_upper_(ops, D)
    ops.zero_diagonal_(D)
    # padded rows and columns to exactly 0 by multiplying with 0/1 masks (broadcast, in place): D and S
    # are finite and >= 0 here (snapped distances; M - D with M the maximum; exp), so x * 1 is x and
    # x * 0 is +0, the values a masked fill writes, at a fraction of a broadcast masked fill's time
    keep = ops.astype(valid, D.dtype)
    keep_row, keep_col = keep[:, :, None], keep[:, None, :]
    D *= keep_row
    D *= keep_col
    M = None
    if kernel == "max-minus":  # each problem's largest distance
        B, n = D.shape[0], D.shape[1]
        M = xp.amax(D, axis=(1, 2))[:, None, None] if B * n else ops.zeros((B, 1, 1), D.dtype, ops.device(D))
    S = _to_similarities(xp, D, kernel, M, scale)
    S *= keep_row
    S *= keep_col
    return S


# --------------------------------------------------------------------------------------------------
# batched greedy
# --------------------------------------------------------------------------------------------------


def _gain_chunk(B: int, n: int) -> int:
    """Candidates per gain chunk: the (B, n, chunk) buffer is a small fraction of S (B, n, n)."""
    return max(1, min(n, _temp_cap(B * n * n) // max(1, B * n)))


def _dense_gains(ops: Ops, S, cover, buf, chunk: int, symmetric: bool):
    """gains[b, j] = sum_i max(S[b, i, j] - cover[b, i], 0), chunked over candidates j.

    Each candidate's terms are a contiguous row of ``buf`` (B, chunk, n), summed along it: a reduction
    along the contiguous axis adds every row in the same order, so candidates with the same similarity
    column (duplicate points) get bit-identical gains and tie to the lowest index, as the reference's
    do. (Summed over axis 1 of a (B, n, chunk) block, torch rounds the columns past its vector-width
    blocks in another order, and a duplicate could win by an ulp.) ``symmetric`` S (every S this module
    builds): the candidates' columns are its rows, read contiguously; otherwise they are transposed
    into ``buf``, chunk by chunk (slower: strided reads)."""
    xp = ops.xp
    n = S.shape[2]
    c_cover = cover[:, None, :]
    parts = []
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        blk = buf[:, : c1 - c0, :]
        xp.subtract(S[:, c0:c1, :] if symmetric else xp.swapaxes(S[:, :, c0:c1], 1, 2), c_cover, out=blk)
        ops.clamp_min_(blk, 0.0)
        parts.append(xp.sum(blk, axis=2))
    return parts[0] if len(parts) == 1 else ops.concat(parts, axis=1)


def _stochastic_mask(ops: Ops, remaining, u_t):
    """(B, n) bool: the remaining candidates at positions floor(u_t * R) (R = number remaining)."""
    xp = ops.xp
    B, n = remaining.shape
    R = xp.sum(ops.astype(remaining, u_t.dtype), axis=1)
    pos = xp.minimum(xp.floor(u_t * R[:, None]), R[:, None] - 1)  # in u's dtype, as the reference
    cum = xp.cumsum(ops.astype(remaining, ops.int64), axis=1)
    loc = ops.searchsorted(cum, ops.astype(pos, ops.int64) + 1)  # first j with cum[j] == pos + 1; n when pos >= R
    hit = ops.zeros((B, n + 1), ops.bool_, ops.device(remaining))
    ops.put_along_rows_(hit, loc, True)
    return hit[:, :n] & remaining


def _check_draws(ops: Ops, u, shape: str) -> None:
    """The stochastic optimizer's draws: given, and in [0, 1] (one host read of their range; review 159: draws
    outside it, or NaN, gave duplicate picks here where the Numba kernel and the reference refuse them)."""
    if u is None:
        raise ValueError(f"optimizer='stochastic' needs the uniform draws u {shape}")
    xp = ops.xp
    refuse_draws_outside(not math.prod(u.shape) or bool(xp.all((u >= 0) & (u <= 1))))


def greedy_batched(ops: Ops, S, valid, budgets, optimizer: str, u=None, symmetric: bool | None = None):
    """Facility-location greedy on B dense problems at once -> (indices (B, K) int64, gains (B, K)).

    ``K = max(budgets)`` is read once (a host sync), then :func:`greedy_loop` runs, and its gains are read
    once for finiteness (:func:`~crestcore.backends.contract.refuse_nonfinite_gains`). ``symmetric``: whether S
    is exactly symmetric (None: checked here, with the first host read).
    """
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    if optimizer == "stochastic":
        _check_draws(ops, u, "(B, K, s)")
    B = S.shape[0]
    K = int(budgets.max()) if B and math.prod(budgets.shape) else 0
    if symmetric is None:
        symmetric = bool(ops.xp.all(S == ops.xp.swapaxes(S, 1, 2))) if K > 0 else True
    idx, gains = greedy_loop(ops, S, valid, budgets, K, optimizer, u, symmetric=symmetric)
    if K > 0:
        refuse_nonfinite_gains(bool(ops.xp.all(ops.xp.isfinite(gains))))
    return idx, gains


def greedy_loop(ops: Ops, S, valid, budgets, K: int, optimizer: str, u=None, *, symmetric: bool = False):
    """The greedy loop for a known ``K`` (host int): fixed-shape device work only, no host sync.

    Every problem runs all ``K`` picks; picks at or past a problem's budget are masked to -1 (gain 0)
    afterwards. Greedy pick ``t`` depends only on picks ``0..t-1``, so the picks within the budgets are
    the ones a per-problem loop makes, and each pick costs about ten tensor operations (the CREST step
    solves tiny problems, where the operations' count, not their size, sets the time). Candidates
    that are padding or already picked carry a ``-inf`` penalty added to their gains (``gain + 0`` is
    the gain exactly, so the argmax, first maximum on ties, is the masked one's)."""
    xp = ops.xp
    B, n, _ = S.shape
    dev, dt = ops.device(S), S.dtype
    if K <= 0 or B == 0:
        return ops.zeros((B, max(K, 0)), ops.int64, dev), ops.zeros((B, max(K, 0)), dt, dev)
    budgets = ops.astype(budgets, device=dev)
    valid = ops.astype(valid, ops.bool_, dev)
    cover = ops.zeros((B, n), dt, dev)
    neg_inf = ops.full((), -math.inf, dt, dev)
    penalty = xp.where(valid, ops.zeros((), dt, dev), neg_inf)  # -inf: not a candidate
    chunk = _gain_chunk(B, n)
    buf = ops.empty((B, min(chunk, n), n), dt, dev)
    idx_cols, gain_cols = [], []
    for t in range(K):
        gains = _dense_gains(ops, S, cover, buf, chunk, symmetric)
        if optimizer == "stochastic":
            cand = _stochastic_mask(ops, penalty == 0, u[:, t, :])
            j = xp.argmax(xp.where(cand, gains, neg_inf), axis=1)[:, None]
        else:
            j = xp.argmax(gains + penalty, axis=1)[:, None]  # first maximum: lowest index
        gain_cols.append(ops.take_along_rows(gains, j)[:, 0])
        idx_cols.append(j[:, 0])
        cover = xp.maximum(cover, ops.take_columns(S, j)[:, :, 0])  # S[b, :, j_b]
        ops.put_along_rows_(penalty, j, -math.inf)
    # a problem picks budgets[b] points, fewer when its valid candidates run out (each step picks a new valid
    # one while any remain; after that the argmax fell on a -inf penalty): padded with -1, as the Numba kernel
    nvalid = xp.sum(ops.astype(valid, budgets.dtype), axis=1)
    active = ops.arange(0, K, dev)[None, :] < xp.minimum(budgets, nvalid)[:, None]
    picks = xp.where(active, xp.stack(idx_cols, axis=1), ops.full((), -1, ops.int64, dev))
    return picks, xp.where(active, xp.stack(gain_cols, axis=1), ops.zeros((), dt, dev))


def assign_batched(ops: Ops, S, valid, indices):
    """Cluster-size weights (B, K) and objectives (B,) of the picks ``indices`` (-1 = no pick): each
    valid point goes to its most similar pick, the earliest on ties."""
    xp = ops.xp
    B, n, _ = S.shape
    K = indices.shape[1]
    dev, dt = ops.device(S), S.dtype
    if K == 0:
        return ops.zeros((B, 0), dt, dev), ops.zeros((B,), dt, dev)
    indices = ops.astype(indices, ops.int64, dev)
    valid = ops.astype(valid, ops.bool_, dev)
    real = indices >= 0
    sims = ops.take_columns(S, xp.where(real, indices, 0))  # (B, n, K): S[b, i, pick_t]
    ops.fill_where_(sims, ~real[:, None, :], -math.inf)
    a = xp.argmax(sims, axis=2)  # earliest pick on ties
    best = xp.amax(sims, axis=2)
    counted = valid & xp.any(real, axis=1)[:, None]
    weights = ops.count_rows(a, K, dt, where=counted)
    objective = xp.sum(xp.where(counted, best, ops.zeros((), dt, dev)), axis=1)
    return weights, objective


# --------------------------------------------------------------------------------------------------
# matrix-free path: one problem from its features
# --------------------------------------------------------------------------------------------------


class Features:
    """Similarity tiles of one problem (n, d), computed on demand, never n x n."""

    def __init__(self, ops: Ops, X, metric: str, kernel: str, scale: float, tile: int):
        self.ops, self.xp = ops, ops.xp
        self.n = X.shape[0]
        self.metric, self.kernel, self.scale = metric, kernel, float(scale)
        self.tile = max(1, int(tile))
        # elements of one similarity block: what ``tile`` full rows would take, capped
        self.budget = max(1, min(_MAX_TEMP_ELEMENTS, self.tile * max(self.n, 1)))
        self.dev, self.dt = ops.device(X), X.dtype
        self.X = _normalized(self.xp, X) if metric == "cosine" else X - exact_shift(self.xp, X)
        self.sq = None if metric == "cosine" else _sqnorms(self.xp, self.X)
        self.ar = ops.arange(0, self.n, self.dev)
        self.M = self._max_distance() if kernel == "max-minus" else None

    def row_chunk(self, ncols: int) -> int:
        """Rows of a block of ``ncols`` columns within the block budget."""
        return max(1, min(self.n, self.budget // max(1, ncols)))

    def candidate_distances(self, cols, r0: int, r1: int):
        """D (len(cols), r1 - r0): the candidates ``cols`` against the rows r0..r1, candidate-major, with
        exact zeros where the candidate is the row's point."""
        ops, xp = self.ops, self.xp
        Xc = ops.take(self.X, cols)
        sqc = None if self.sq is None else ops.take(self.sq, cols)
        sqr = None if self.sq is None else self.sq[r0:r1]
        D = distances(ops, Xc, self.X[r0:r1], sqc, sqr, self.metric)
        ri = cols - r0  # candidate c's own point is column cols[c] - r0, when that is in range
        inside = (ri >= 0) & (ri < r1 - r0)
        ri = xp.clip(ri, 0, max(r1 - r0 - 1, 0))
        ci = ops.arange(0, cols.shape[0], self.dev)
        D[ci, ri] = xp.where(inside, ops.zeros((), self.dt, self.dev), D[ci, ri])
        return D

    def candidate_sims(self, cols, r0: int, r1: int):
        """Similarities (len(cols), r1 - r0) of the candidates ``cols`` to the rows r0..r1."""
        return _to_similarities(self.xp, self.candidate_distances(cols, r0, r1), self.kernel, self.M, self.scale)

    def _max_distance(self):
        M = self.ops.zeros((), self.dt, self.dev)
        rstep = min(self.tile, self.n)
        cstep = max(1, min(self.n, self.budget // rstep))
        for r0 in range(0, self.n, rstep):
            r1 = min(self.n, r0 + rstep)
            for c0 in range(0, self.n, cstep):
                c1 = min(self.n, c0 + cstep)
                # every pair once per orientation, in the layout the gains use
                M = self.xp.maximum(M, self.xp.amax(self.candidate_distances(self.ar[c0:c1], r0, r1)))
        return M

    def gains(self, cols, cover):
        """Exact gains (len(cols),) of the candidates ``cols`` (device int64) given ``cover`` (n,)."""
        ops, xp = self.ops, self.xp
        out = []
        ncols = cols.shape[0]
        Mc = self.M - cover if self.kernel == "max-minus" else None
        # whole rows per candidate whenever one fits the block budget (else fixed chunks of it): the same
        # chunks whatever the number of candidates asked for, so a candidate's gain is summed in the same
        # order in a full pass and in a lazy re-evaluation of a few (with row chunks sized from the number
        # of candidates, a duplicate re-evaluated alone came out 2 ulps above its lower-index twin's bound
        # from the full pass, and won)
        step = max(1, min(self.n, self.budget))
        cstep = max(1, min(ncols, self.budget // step)) if ncols else 1
        for c0 in range(0, ncols, cstep):
            cc = cols[c0 : c0 + cstep]
            g = ops.zeros((cc.shape[0],), self.dt, self.dev)
            for r0 in range(0, self.n, step):
                r1 = min(self.n, r0 + step)
                # candidate-major blocks (one contiguous row per candidate, summed along it): the same
                # order for every candidate, so duplicate points get bit-identical gains (_dense_gains)
                if self.kernel == "max-minus":  # max(M - D - c, 0) as max((M - c) - D, 0): one pass
                    Sb = self.candidate_distances(cc, r0, r1)
                    xp.subtract(Mc[None, r0:r1], Sb, out=Sb)
                else:
                    Sb = self.candidate_sims(cc, r0, r1)
                    Sb -= cover[None, r0:r1]
                g += xp.sum(ops.clamp_min_(Sb, 0.0), axis=1)
            out.append(g)
        return out[0] if len(out) == 1 else ops.concat(out, axis=0)

    def column(self, j):
        """S[:, j] (n,) for a device index array j of shape (1,), as the gains see it."""
        step = self.row_chunk(1)
        parts = [self.candidate_sims(j, r0, min(self.n, r0 + step))[0, :] for r0 in range(0, self.n, step)]
        return parts[0] if len(parts) == 1 else self.ops.concat(parts, axis=0)


def _lazy_block(n: int, on_gpu: bool) -> int:
    """Candidates re-evaluated at once by the blocked lazy greedy."""
    cap = 1024 if on_gpu else 256
    return max(1, min(n, max(8, min(cap, n // 16 if on_gpu else n // 64))))


def _lazy_pick(F: Features, ub, taken, cover, block: int, neg_inf):
    """One step of the blocked lazy greedy: (pick, its exact gain) as device scalars. ``ub`` holds upper
    bounds of the gains and is updated in place; one host sync per block evaluation."""
    ops, xp = F.ops, F.xp
    fresh = ops.zeros((F.n,), ops.bool_, F.dev)
    exact = ops.full((F.n,), -math.inf, F.dt, F.dev)
    while True:
        key = xp.where(taken | fresh, neg_inf, ub)
        vals, top = ops.top_k(key, block)
        ok = xp.isfinite(vals)
        g_top = F.gains(top, cover)
        exact[top] = xp.where(ok, g_top, exact[top])
        ub[top] = xp.where(ok, g_top, ub[top])
        fresh[top] = fresh[top] | ok
        c = xp.argmax(exact)  # exact is -inf outside fresh; lowest index on ties
        others = xp.where(taken | fresh, neg_inf, ub)
        o = xp.argmax(others)
        gc, go = exact[c], others[o]
        stop = ~xp.isfinite(go) | (gc > go) | ((gc == go) & (c < o))
        if bool(stop):  # one host sync per block evaluation
            return c, gc


def _stochastic_pick(F: Features, taken, cover, u_t):
    """One step of stochastic greedy from the draws ``u_t`` (s,): (pick, its gain) as device scalars,
    the lowest index among the best sampled candidates."""
    ops, xp = F.ops, F.xp
    free = ~taken
    # the product in the draws' own dtype, as every other path takes it (_stochastic_mask, the reference, the
    # Numba kernels): in float64 a float32 draw just below an integer position rounded to another candidate
    R = xp.sum(ops.astype(free, u_t.dtype))
    pos = ops.astype(xp.minimum(xp.floor(u_t * R), R - 1), ops.int64)
    cands = ops.searchsorted(xp.cumsum(ops.astype(free, ops.int64), axis=0), pos + 1)
    full = ops.full((F.n,), -math.inf, F.dt, F.dev)
    full[cands] = F.gains(cands, cover)  # duplicates carry equal values
    j = xp.argmax(full)
    return j, full[j]


def greedy_features(ops: Ops, X, k, metric: str, kernel: str, scale: float, optimizer: str, u=None,
                    tile=2048):
    """Greedy on one problem of n points given by features X (n, d), in tiles; never n x n.

    Returns (indices (k,) int64, gains (k,), weights (k,), objective 0-d), on X's device and dtype.
    """
    check_choice(metric, "metric", METRICS)
    check_choice(kernel, "kernel", KERNELS)
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    if optimizer == "stochastic":
        _check_draws(ops, u, "(k, s)")
    xp = ops.xp
    n = X.shape[0]
    k = check_picks(k, n)
    dev, dt = ops.device(X), X.dtype
    if k <= 0 or n == 0:
        return (ops.zeros((0,), ops.int64, dev), ops.zeros((0,), dt, dev), ops.zeros((0,), dt, dev),
                ops.zeros((), dt, dev))
    F = Features(ops, X, metric, kernel, scale, tile)
    neg_inf = ops.full((), -math.inf, dt, dev)
    cover = ops.zeros((n,), dt, dev)
    taken = ops.zeros((n,), ops.bool_, dev)
    picks, pick_gains = [], []
    if optimizer == "lazy":
        ub = F.gains(F.ar, cover)  # exact initial gains = upper bounds from now on
        block = _lazy_block(n, ops.on_gpu(X))
    for t in range(k):
        if optimizer == "naive":
            g_all = xp.where(taken, neg_inf, F.gains(F.ar, cover))
            j = xp.argmax(g_all)
            g = g_all[j]
        elif optimizer == "stochastic":
            j, g = _stochastic_pick(F, taken, cover, u[t])
        else:
            j, g = _lazy_pick(F, ub, taken, cover, block, neg_inf)
        j1 = j.reshape(1)
        cover = xp.maximum(cover, F.column(j1))
        taken[j1] = True
        if optimizer == "lazy":
            ub[j1] = -math.inf
        picks.append(j)
        pick_gains.append(g)
    idx = ops.astype(xp.stack(picks), ops.int64)
    gains = ops.astype(xp.stack(pick_gains), dt)
    refuse_nonfinite_gains(bool(xp.all(xp.isfinite(gains))))
    # weights: every point to its most similar pick (earliest pick on ties), tile by tile
    counts = ops.zeros((k,), dt, dev)
    objective = ops.zeros((), ops.float64, dev)
    step = F.row_chunk(k)
    for r0 in range(0, n, step):
        # (k, rows), the values the gains saw; self-similarity is exactly M (max-minus) or 1 (exp)
        Sp = F.candidate_sims(idx, r0, min(n, r0 + step))
        counts += ops.count_rows(xp.argmax(Sp, axis=0)[None, :], k, dt)[0]
        objective += xp.sum(ops.astype(xp.amax(Sp, axis=0), ops.float64))
    return idx, gains, counts, ops.astype(objective, dt)
