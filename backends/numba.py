"""Numba-jitted CPU kernels for NumPy input.

Same names, signatures and semantics as :mod:`crestcore._reference_kernels` (read its docstring for
the contract). This module is the only place in the project that imports numba; ``crestcore`` reaches
it through :func:`crestcore.backends.get_kernel` only.

Implementation notes
--------------------
* Distances are computed from direct differences ``sum_k (x_ik - x_jk)^2`` (cosine:
  ``x_i . x_j / sqrt(|x_i|^2 |x_j|^2)``, exactly 1 for identical points) in float64, whatever the input
  dtype: more accurate than the Gram trick of the reference, and exactly symmetric, so ``S[b]`` built
  here is bit-for-bit symmetric. The inner loops run over a transposed copy of the features so that
  they vectorise over points, while every pair's sum is still accumulated in the fixed order
  ``k = 0..d-1``. ``similarity_batched`` rounds to X's dtype once, when it writes S;
  ``greedy_features`` rounds its on-the-fly similarities of a float32 problem to float32 the same way
  (and keeps them in float64 arrays), so the dense, fused and matrix-free paths of a float32 problem
  greedy over the same numbers (before, its float64 similarities gave other gains, and on near-ties
  other picks, than the dense path's float32 ones, and the default ``max_dense_bytes``, read from the
  memory free at the call, decided which).
* A candidate's marginal gain ``sum_i max(s_ij - cover_i, 0)`` is always computed by one function,
  :func:`_gain`, in float64 and in one fixed order (four interleaved partial sums over ``i``, combined
  in a fixed way). Naive, lazy and stochastic greedy therefore see bit-identical gains, and lazy greedy
  (a binary max-heap of stale upper bounds ordered by (bound desc, index asc); a candidate is taken
  when its exact gain beats every other bound, ties by lowest index) makes exactly the picks of naive
  greedy. Stale bounds stay upper bounds exactly: rounding is monotone, and the cover only grows.
* Stochastic greedy samples exactly as the reference: positions ``min(floor(u * R), R - 1)`` with the
  product computed in the dtype of ``u`` (a float32 draw can round up to 1.0, so ``u * R`` to R).
* No ``fastmath`` anywhere: the kernels must be exact and deterministic.
* Parallelism: ``prange`` over problems when there are many; for few, large problems the full gain
  passes run in parallel over candidates, while lazy re-evaluations of one column stay serial (a
  parallel launch costs more than a contiguous O(n) column, and much more on a busy machine). The
  matrix-free lazy greedy re-evaluates in parallel batches only in steps that already needed many
  serial re-evaluations (each costs O(n d) there). Dense problems are solved candidate-major (the
  matrix itself when it is symmetric, else a transposed copy) so that a candidate's column is
  contiguous.
* ``facility_batched`` (the dense path of ``crestcore``) fuses similarity, greedy and cluster sizes:
  each problem's matrix is built in a per-thread buffer, only up to its last valid point (the upper
  triangle mirrored, row by row up to ``_MIRROR_MAX_N``, above it by ``_FILL_TILE`` square tiles), and
  solved there; lazy greedy uses the same heap and accept rule as ``_solve_dense`` and every gain sums
  its terms into the four partial sums the padded row would use, so the results are bit for bit those
  of the three separate kernels. Above ``_MIRROR_MAX_N`` every distance is computed once: ``max-minus``
  takes its M from a pruned pass (``_max_valid_distance``: points by decreasing distance to their mean,
  stopped by the triangle inequality; a few rows on typical data) whose values are bit for bit the
  fill's. A candidate's column is compacted to its live entries (those not yet covered: the nonzero
  terms of its gain) at its first evaluation after the first pick that finds at most half of it live,
  and sheds newly covered entries at every later one (``_column_gain``); the terms dropped are exact
  +0.0, which change no partial sum, so this is exact, and it shortens the serial chains of additions
  that bound a gain's cost. A tiled fill also sums the first gains (empty cover) as it writes the
  entries, in the same partial sums and order, so the greedy starts without a pass over the matrix.
  The matrix the fused kernel builds is symmetric by construction: no symmetry check there
  (``greedy_batched`` keeps it for matrices it is given).
  It is serial (one compile unit, the cold-start cost of every dense call) unless a batch has at least
  ``_FUSED_PARALLEL_MIN_WORK`` of work; then whole problems go to the threads (``_fused_parallel``,
  compiled only when first needed). Measured on this project's 2-core machine (AMD EPYC, 2026-12-01):
  two threads solved batches of 10-100 problems of 30-60 points (the CREST step's shapes) 1.2-1.95x
  faster than one from about 2.5e5 of work on, 1.1x below it.
* Flags reach the jitted solvers as runtime arguments, never as literal constants at a call site:
  numba compiles a separate specialisation per literal value, which multiplies compile time.
* Code the solvers share is written once in small jitted helpers that Numba inlines
  (``inline='always'``): :func:`_tile_row` computes every distance outside the fused kernel's own rows,
  :func:`_cosine_distance` every cosine distance (the fused rows' too), :func:`_heap_set` every write of
  a heap entry, :func:`_masked_sims`, :func:`_first_max`, :func:`_remove_at`, :func:`_valid_indices` and
  :func:`_add_to_cover` the rest. Two repeats stay written out, for speed (measured on the CREST step,
  100 problems of 60 points): lazy greedy's accept loop in each solver (through a shared helper, even an
  inlined one, the dense greedy ran 15% slower; measured again with an inlined accept helper: 6% to 23%
  slower on the dense, fused and sparse (:mod:`.numba_sparse`) solvers) and the fused kernel's row distances
  (through :func:`_tile_row`, 10% slower).
"""

from __future__ import annotations

import math

import numpy as np
import contextlib
import functools

from numba import get_num_threads, njit, prange, set_num_threads, types
from numba import get_num_threads as _active_threads
from numba.extending import intrinsic

from .contract import (KERNEL_NAMES, KERNELS, METRICS, OPTIMIZERS, check_picks, refuse_draws_outside,
                       refuse_nonfinite_gains, snap_tolerance)
from . import _seed_shipped_kernels

# before any kernel below finds its cache: a wheel's compiled kernels, copied where Numba caches outside the package
_seed_shipped_kernels("numba")


def _launch_keeping_openmp_threads() -> None:
    """Start Numba's thread pool now, and give the process's OpenMP runtime back the thread count it had.

    Numba's OpenMP threading layer, when it starts (on the first parallel kernel or ``set_num_threads``),
    sets the OpenMP runtime's thread count to ``NUMBA_NUM_THREADS``. Where the process shares that runtime
    with another library (a torch built against the system's libgomp does), this silently changed the
    user's ``torch.set_num_threads(1)`` to 2 at CREST's first selection: the model's later passes ran on
    another thread count, and so rounded differently from a run whose kernels had started earlier
    (the same configuration gave different results as the first and the second run of a process).
    Numba's own thread count is its own (thread-local) setting and is not affected by the restore.
    """
    import ctypes

    from numba.np.ufunc import parallel

    try:
        gomp = ctypes.CDLL("libgomp.so.1")  # the process's OpenMP runtime (the loaded one, if any)
        before = int(gomp.omp_get_max_threads())
    except (OSError, AttributeError):  # no GNU OpenMP here: nothing shared to protect
        gomp = None
    parallel._launch_threads()
    if gomp is not None and int(gomp.omp_get_max_threads()) != before:
        gomp.omp_set_num_threads(before)


_launch_keeping_openmp_threads()

# --------------------------------------------------------------------------------------------------
# exp of the similarity kernel, vectorisable
# --------------------------------------------------------------------------------------------------


@intrinsic
def _f64_from_bits(typingctx, bits):
    """The float64 whose IEEE 754 bit pattern is the int64 ``bits`` (a bit cast, free in vector code)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return types.float64(bits), codegen


@intrinsic
def _trailing_zeros(typingctx, v):
    """The number of trailing zero bits of the uint64 ``v`` (``v != 0``; LLVM's ``cttz``)."""
    if not isinstance(v, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], context.get_constant(types.boolean, True))

    return v(v), codegen


_INV_LN2 = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that k * _LN2_HI is exact for |k| < 2**11
_LN2_LO = 1.90821492927058770002e-10


@njit(cache=True, nogil=True, inline='always')
def _exp(x):
    """exp(x) for x <= 709 (the kernels pass x = -D / scale <= 0), within 0.82 ulp of the exact value
    (measured on 8e6 points of [-800, 0] against extended precision; libm's is within 0.51, NumPy's
    SIMD exp also differs from libm in the last bit on about 5 % of inputs), and branch-free, so that
    the loops that call it vectorise: libm's ``exp`` is called one element at a time, and was a third
    of the CREST step's similarity pass.

    x = k ln 2 + r with k = round(x / ln 2), |r| <= ln(2) / 2 (Cody-Waite, ln 2 in two parts); exp(r) =
    1 + r + r^2 p(r) with p the Taylor polynomial to degree 13 (truncation below 1e-17), the leading
    ``1 + r`` rounded with its error carried; then times 2^k built from its bits, in two factors
    below k = -1020 so that subnormal results are rounded once. x below -800 gives 0 (exp(-746) is
    already below half the least subnormal), NaN gives NaN."""
    x = x if not (x < -800.0) else -800.0
    kf = math.floor(x * _INV_LN2 + 0.5)
    r = (x - kf * _LN2_HI) - kf * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    hi = 1.0 + r
    lo = (1.0 - hi) + r
    y = hi + (lo + (r * r) * p)
    k = np.int64(kf)
    tiny = k < -1020
    k1 = k + 600 if tiny else k
    k2 = -600 if tiny else 0
    return (y * _f64_from_bits((k1 + 1023) << 52)) * _f64_from_bits((k2 + 1023) << 52)


__all__ = ["usable_for", "similarity_batched", "greedy_batched", "assign_batched", "greedy_features",
           "facility_batched", "draw_stratified", "order_scores", "finite_abs_max", "class_counts"]

# the options as the compiled code's integer codes, in the contract's order
_METRIC_CODE = {m: i for i, m in enumerate(METRICS)}  # euclidean 0, sqeuclidean 1, cosine 2
_KERNEL_CODE = {k: i for i, k in enumerate(KERNELS)}  # max-minus 0, exp 1
_OPTIMIZER_CODE = {o: i for i, o in enumerate(OPTIMIZERS)}  # naive 0, lazy 1, stochastic 2
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

# Dense problems at least this large, when there are few of them, are solved one after the other with
# parallel gain passes (else one thread per problem).
_BIG_N = 256
# Tile edge for the symmetry check and the blocked transpose.
_TILE = 64


# Direct-difference distances up to this many features; more go to the generic path's BLAS Gram product.
# Measured at n = 4,000, k = 400 (2 threads, the same picks): the kernel 0.28 / 0.36 / 0.51 / 0.67 s at
# d = 96 / 128 / 192 / 256 against the generic path's 0.53 / 0.53 / 0.62 / 0.55 s, which also holds about
# 4.5 similarity matrices at its peak where the kernel holds one a thread (review 117: a 4-6x cliff at 65).
_DIRECT_MAX_FEATURES = 192
# ... except for small problems, where the generic path's O(B n d) passes (exact_shift's temporaries) cost
# more than the kernel's O(B n^2 d) loops saves (review 129, one thread, minibatch_coresets' per-class
# problems): the kernel 1.3-4.5x faster at n <= 128 for d up to 4,096, 1.3-1.6x at n = 256 for d <= 512,
# level at n = 400, d = 512, and slower beyond (0.45-0.8x at n = 256-400, d >= 2,048)
_DIRECT_SMALL_N, _DIRECT_SMALL_N_MAX_FEATURES, _DIRECT_CELLS_PER_FEATURE = 128, 8192, 800


def _direct_pays(n: int, d: int) -> bool:
    """Whether the direct-difference kernels take problems of ``n`` points and ``d`` features."""
    if d <= _DIRECT_MAX_FEATURES:
        return True
    if _DIRECT_MAX_FEATURES <= 0:  # (benchmarks/dense_paths.py sends every d to the generic path)
        return False
    return (n <= _DIRECT_SMALL_N and d <= _DIRECT_SMALL_N_MAX_FEATURES) or n * d <= (
        _DIRECT_CELLS_PER_FEATURE * _DIRECT_MAX_FEATURES)


def available_bytes(x) -> int | None:
    """NumPy arrays live on the host: None, the caller reads the host's available memory."""
    return None


# the host arrays the kernels take: NumPy's, and its file-backed memmaps (the usual holder of a large
# embedding file; review 108 saw them sent to the generic path, 5-10x slower); not other subclasses
# (matrix, masked), whose operations differ
_HOST_ARRAYS = (np.ndarray, np.memmap)


def usable_for(name: str, *arrays) -> bool:
    """True when these kernels accept the arrays: NumPy arrays or memmaps (or None), floats float32/float64.

    Examples
    --------
    >>> import numpy as np
    >>> S, valid, budgets = np.zeros((1, 3, 3)), np.ones((1, 3), dtype=bool), np.array([2])
    >>> usable_for("greedy_batched", S, valid, budgets)
    True
    >>> usable_for("greedy_batched", S.astype(np.float16), valid, budgets)  # float16: the reference
    False
    >>> usable_for("similarity_batched", np.zeros((1, 1000, 200)), valid)  # many features: BLAS is faster
    False
    >>> usable_for("similarity_batched", np.zeros((1, 100, 200)), valid)  # ... but for small problems
    True
    """
    if name not in KERNEL_NAMES:
        return False
    if name in ("similarity_batched", "facility_batched") and arrays and getattr(arrays[0], "ndim", 0) == 3:
        # Direct-difference loops cost O(n^2 d) scalar work; past about two hundred features the generic
        # path's BLAS matrix product is faster (seen: d=784, n=6000, 70 s here vs ~2 s with BLAS).
        if not _direct_pays(int(arrays[0].shape[1]), int(arrays[0].shape[2])):
            return False
    seen = False
    for a in arrays:
        if a is None:
            continue
        seen = True
        if type(a) not in _HOST_ARRAYS:
            return False
        dt = a.dtype
        kind = dt.kind
        if kind == "f":
            if dt not in _FLOATS:
                return False
        elif kind not in "biu" or not dt.isnative:
            return False
    return seen


def _arr(a, dtype=None) -> np.ndarray:
    """C-contiguous and writable (a copy only when needed): the one array type the jitted code sees.

    Numba compiles read-only arrays as a separate type; copying the rare read-only input keeps the
    kernels to one specialisation per dtype. Inputs are never written to either way.
    """
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.writeable else a.copy()


def _code(table: dict, value, what: str) -> int:
    try:
        return table[value]
    except (KeyError, TypeError):
        raise ValueError(f"{what} must be one of {tuple(table)}, got {value!r}") from None


def _similarity_codes(metric, kernel) -> tuple[int, int]:
    """The metric's and the kernel's codes; a ValueError naming the choices for an unknown one."""
    return _code(_METRIC_CODE, metric, "metric"), _code(_KERNEL_CODE, kernel, "kernel")


def _features(X, ndim: int) -> np.ndarray:
    """The features X as a NumPy array of ``ndim`` dimensions, (B, n, d) or (n, d); else a ValueError."""
    X = np.asarray(X)
    if X.ndim != ndim:
        raise ValueError(f"X must be {ndim}-D {'(B, n, d)' if ndim == 3 else '(n, d)'}, got shape {X.shape}")
    return X


def _batch_args(valid, budgets, B: int, n: int):
    """valid (B, n) bool and budgets (B,) int64 as the jitted code takes them, and K = max(budgets)."""
    valid = _arr(valid, dtype=bool)
    budgets = _arr(budgets, dtype=np.int64).reshape(-1)
    if valid.shape != (B, n) or budgets.shape != (B,):
        raise ValueError(f"valid must be (B, n) = {(B, n)} and budgets (B,), got {valid.shape}, {budgets.shape}")
    return valid, budgets, int(budgets.max()) if B else 0


# --------------------------------------------------------------------------------------------------
# distances and similarities (float64 inside)
# --------------------------------------------------------------------------------------------------


@njit(cache=True)
def _sqnorms(X, out):
    """out[i] = sum_k X[i, k]^2, accumulated in the order k = 0..d-1 (the order of _tile_row's dots)."""
    n, d = X.shape
    for i in range(n):
        s = 0.0
        for k in range(d):
            v = X[i, k]
            s += v * v
        out[i] = s


# the contract's zero-distance snap for cosine distances (absolute), at this module's float64 arithmetic
_COSINE_SNAP = snap_tolerance(np.finfo(np.float64).eps)


@njit(cache=True, nogil=True, inline='always')
def _cosine_distance(dot, nj, ni):
    """1 - cos of two points from their dot product and squared norms nj, ni, clipped to [0, 2] and
    snapped to exactly 0 within the contract's tolerance (parallel points: the rounding of the division
    leaves a few ulps, the reference and the device kernels snap them too); 1 when a norm is 0. The one
    place of this module that computes a cosine distance (_tile_row and the fused kernel's rows)."""
    c = 0.0
    if nj > 0.0 and ni > 0.0:
        # sqrt(|x_i|^2 |x_j|^2): for x_i = x_j (or parallel by a power of 2) dot and denominator are
        # bit-equal, so identical points are at distance exactly 0, as the diagonal is
        den = nj * ni
        # a product of two tiny squared norms can underflow to 0, and of two large ones (rows of
        # magnitude up to the 2^256 above which cosine rescales them) overflow to inf: then the
        # product of the square roots (never a division by zero, never every cosine 0, review 75)
        c = dot / (math.sqrt(den) if 0.0 < den < math.inf else math.sqrt(nj) * math.sqrt(ni))
    D = min(max(1.0 - c, 0.0), 2.0)
    return 0.0 if D <= _COSINE_SNAP else D


@njit(cache=True, nogil=True, inline='always')
def _tile_row(xi, ni, XT, nr, metric, J0, J1, o):
    """o[q] = D(x_i, point J0 + q) for q < J1 - J0: x_i given as ``xi`` (d,) with squared norm ``ni``,
    the points as the columns of ``XT`` (d, n) with squared norms ``nr`` (cosine only). No diagonal
    handling.

    Every distance of this module is computed here (the fused kernel's mirrored rows repeat this
    arithmetic inline, in the same order, and share :func:`_cosine_distance`), so the values are bit for
    bit alike on every path and D(i, j) == D(j, i): each is accumulated in the order k = 0..d-1, while
    the loops run over views from index 0, which lets LLVM vectorise them over the points.
    """
    m = J1 - J0
    d = xi.shape[0]
    for q in range(m):
        o[q] = 0.0
    if metric == 2:
        for k in range(d):
            x = xi[k]
            xr = XT[k, J0:J1]
            for q in range(m):
                o[q] += xr[q] * x
        nn = nr[J0:J1]
        for q in range(m):
            o[q] = _cosine_distance(o[q], nn[q], ni)
    else:
        for k in range(d):
            x = xi[k]
            xr = XT[k, J0:J1]
            for q in range(m):
                df = xr[q] - x
                o[q] += df * df
        if metric == 0:
            for q in range(m):
                o[q] = math.sqrt(o[q])


@njit(cache=True)
def _dist_to(X, XT, nrm, j, metric, lo, hi, buf):
    """buf[i] = D(i, j) for i in [lo, hi); X (n, d) and XT (d, n) float64, nrm the squared norms
    (cosine only); D(j, j) = 0 exactly."""
    _tile_row(X[j], nrm[j], XT, nrm, metric, lo, hi, buf[lo:hi])
    if lo <= j < hi:
        buf[j] = 0.0


@njit(cache=True)
def _sim_to(X, XT, nrm, j, metric, kernel, scale, M, lo, hi, buf, r32):
    """buf[i] = s(i, j) for i in [lo, hi) (max-minus with the given M, or exp(-D / scale)); ``r32``: each
    rounded to float32, as the dense paths store float32 problems' similarities (``W`` in X's dtype), so
    that every path of a float32 problem greedies over the same numbers."""
    _dist_to(X, XT, nrm, j, metric, lo, hi, buf)
    b = buf[lo:hi]
    if kernel == 0:
        for i in range(b.shape[0]):
            b[i] = M - b[i]
    else:
        for i in range(b.shape[0]):
            b[i] = _exp(-b[i] / scale)
    if r32:
        for i in range(b.shape[0]):
            b[i] = np.float32(b[i])


@njit(cache=True, nogil=True, inline='always')
def _masked_sims(v, vb, kernel, scale, M):
    """In place: v[q] = s(v[q]) where vb[q] (max-minus with the given M, or exp(-D / scale)), else 0: the
    similarities of the distances ``v`` to points that ``vb`` marks valid."""
    if kernel == 0:
        for q in range(v.shape[0]):
            v[q] = M - v[q] if vb[q] else 0.0
    else:
        for q in range(v.shape[0]):
            v[q] = _exp(-v[q] / scale) if vb[q] else 0.0


@njit(cache=True)
def _tile_pairs(nt):
    """The (I, J) tile pairs with J >= I of an (nt x nt) tiling, as two arrays."""
    m = nt * (nt + 1) // 2
    pI = np.empty(m, dtype=np.int64)
    pJ = np.empty(m, dtype=np.int64)
    q = 0
    for a in range(nt):
        for b in range(a, nt):
            pI[q] = a
            pJ[q] = b
            q += 1
    return pI, pJ


@njit(parallel=True, cache=True)
def _similarity_pass(X, XT, nrm, valid, metric, kernel, scale, M, pI, pJ, nch, umax, S):
    """One pass over the upper tile pairs (I, J >= I) of every problem, in parallel over chunks.

    With ``umax`` non-empty: record in ``umax[w]`` the largest distance over the valid pairs of tile
    pair ``w`` (max-minus needs it first). Otherwise write ``S`` (both triangles: exactly symmetric)
    with the max-minus maxima ``M``; problems of a single tile (n <= _TILE) find their own maximum
    here, from distances kept in a scratch tile, so they need no measuring pass.
    """
    B, n, d = X.shape
    T = _TILE
    pairs = pI.shape[0]
    units = B * pairs
    measure = umax.shape[0] > 0
    single = pairs == 1 and kernel == 0 and not measure
    for c in prange(nch):
        buf = np.empty(n)
        D = np.empty((n if single else 0, n))
        for w in range(c * units // nch, (c + 1) * units // nch):
            b = w // pairs
            p = w - b * pairs
            J0 = pJ[p] * T
            J1 = min(J0 + T, n)
            Mb = M[b]
            if single:  # the whole problem: distances into the scratch tile, and their maximum
                Mb = 0.0
                for i in range(n):
                    if valid[b, i]:
                        _dist_to(X[b], XT[b], nrm[b], i, metric, i, n, buf)
                        drow = D[i, i:n]
                        v = buf[i:n]
                        vb = valid[b, i:n]
                        for q in range(v.shape[0]):
                            drow[q] = v[q]
                            if vb[q] and v[q] > Mb:
                                Mb = v[q]
            m_w = 0.0
            for i in range(pI[p] * T, min(pI[p] * T + T, n)):
                lo = max(J0, i)
                if lo >= J1:
                    continue
                v = buf[lo:J1]
                m = v.shape[0]
                vb = valid[b, lo:J1]
                if valid[b, i]:
                    if single:
                        drow = D[i, lo:J1]
                        for q in range(m):
                            v[q] = drow[q]
                    else:
                        _dist_to(X[b], XT[b], nrm[b], i, metric, lo, J1, buf)
                    if measure:
                        for q in range(m):
                            if vb[q] and v[q] > m_w:
                                m_w = v[q]
                        continue
                    _masked_sims(v, vb, kernel, scale, Mb)
                elif measure:
                    continue
                else:
                    for q in range(m):
                        v[q] = 0.0
                row = S[b, i, lo:J1]
                for q in range(m):
                    row[q] = v[q]
                for q in range(m):
                    S[b, lo + q, i] = v[q]
            if measure:
                umax[w] = m_w


# Small batches run on one thread: a parallel launch costs more than it saves there, and OpenMP/TBB
# workers that spin on a busy machine made the CREST step (100 problems of 60) 3x-30x slower with 2
# threads than with 1 (measured in benchmarks/selection.py, S1).
_PARALLEL_MIN_WORK = 4_000_000


@contextlib.contextmanager
def _threads_for(work: int):
    before = _active_threads()
    if work < _PARALLEL_MIN_WORK and before > 1:
        set_num_threads(1)
        try:
            yield
        finally:
            set_num_threads(before)
    else:
        yield


def _similarity_batched_impl(X, valid, metric, kernel, scale):
    """Dense similarities (B, n, n) of B padded problems, X's dtype; 0 on padded rows and columns.

    Examples
    --------
    The backends' running example (:func:`crestcore.backends._examples.two_problems`): two problems
    padded to four points, four points on a line and two points. With ``"max-minus"`` each problem's
    largest distance ``M`` (10, then 5) is on the diagonal:

    >>> import numpy as np
    >>> from crestcore import _reference_kernels as ref
    >>> from crestcore.backends._examples import two_problems
    >>> X, valid, _ = two_problems(np)
    >>> S = similarity_batched(X, valid, "euclidean", "max-minus", 1.0)
    >>> S[0].tolist()
    [[10.0, 9.0, 8.0, 0.0], [9.0, 10.0, 9.0, 1.0], [8.0, 9.0, 10.0, 2.0], [0.0, 1.0, 2.0, 10.0]]
    >>> S[1].tolist()
    [[5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    >>> np.array_equal(S, ref.similarity_batched(X, valid, "euclidean", "max-minus", 1.0))
    True
    """
    m, kk = _similarity_codes(metric, kernel)
    X = _features(X, 3)
    B, n, d = X.shape
    valid = _arr(valid, dtype=bool)
    if valid.shape != (B, n):
        raise ValueError(f"valid must have shape {(B, n)}, got {valid.shape}")
    S = np.empty((B, n, n), dtype=X.dtype)
    if B == 0 or n == 0:
        return S
    X64 = _arr(X, dtype=np.float64)
    XT = _arr(np.swapaxes(X64, 1, 2))
    nrm = np.zeros(B * n)
    if m == 2:
        _sqnorms(X64.reshape(B * n, d), nrm)
    nrm = nrm.reshape(B, n)
    nt = (n + _TILE - 1) // _TILE
    pI, pJ = _tile_pairs(nt)
    units = B * pI.shape[0]
    nch = min(units, 16 * get_num_threads())
    M = np.zeros(B)
    if kk == 0 and nt > 1:  # max-minus: the largest distance over valid pairs of each problem, first
        umax = np.zeros(units)
        _similarity_pass(X64, XT, nrm, valid, m, kk, 1.0, M, pI, pJ, nch, umax, S)
        M = umax.reshape(B, -1).max(axis=1)
    sc = float(scale) if kk == 1 else 1.0
    _similarity_pass(X64, XT, nrm, valid, m, kk, sc, M, pI, pJ, nch, np.zeros(0), S)
    return S


# --------------------------------------------------------------------------------------------------
# heap of (bound, index): max bound first, lowest index on ties
# --------------------------------------------------------------------------------------------------


@njit(cache=True)
def _better(k1, i1, k2, i2):
    """Whether key k1 (candidate i1) comes before key k2 (candidate i2): the larger key, the lower index on
    ties, and a NaN key after every number (NaN gains from non-finite similarities: a lazy loop that compared
    them as numbers never accepted its NaN top and ran forever, review 155; the wrappers refuse them after)."""
    if k1 > k2:
        return True
    if k1 == k2:
        return i1 < i2
    return k2 != k2 and (k1 == k1 or i1 < i2)


@njit(cache=True, nogil=True, inline='always')
def _heap_set(keys, ids, pos, k, v):
    """Write the entry (bound k, candidate v) at heap position pos: a bound and its candidate move together."""
    keys[pos] = k
    ids[pos] = v


@njit(cache=True)
def _sift_down(keys, ids, size, pos):
    k = keys[pos]
    v = ids[pos]
    while True:
        c = 2 * pos + 1
        if c >= size:
            break
        r = c + 1
        if r < size and _better(keys[r], ids[r], keys[c], ids[c]):
            c = r
        if _better(keys[c], ids[c], k, v):
            _heap_set(keys, ids, pos, keys[c], ids[c])
            pos = c
        else:
            break
    _heap_set(keys, ids, pos, k, v)


@njit(cache=True)
def _heapify(keys, ids, size):
    for p in range(size // 2 - 1, -1, -1):
        _sift_down(keys, ids, size, p)


@njit(cache=True)
def _heap_pop(keys, ids, size):
    """Remove the top; returns the new size."""
    size -= 1
    if size > 0:
        _heap_set(keys, ids, 0, keys[size], ids[size])
        _sift_down(keys, ids, size, np.int64(0))
    return size


@njit(cache=True)
def _heap_push(keys, ids, size, k, v):
    """Insert (k, v); returns the new size."""
    pos = size
    while pos > 0:
        parent = (pos - 1) // 2
        if _better(k, v, keys[parent], ids[parent]):
            _heap_set(keys, ids, pos, keys[parent], ids[parent])
            pos = parent
        else:
            break
    _heap_set(keys, ids, pos, k, v)
    return size + 1


@njit(cache=True)
def _runner_up(keys, ids, size):
    """Heap position of the best entry below the top (one of the root's children); -1 if none."""
    if size < 2:
        return -1
    if size > 2 and _better(keys[2], ids[2], keys[1], ids[1]):
        return 2
    return 1


@njit(cache=True)
def _reseat(keys, ids, size, stamp, t, g, j):
    """Lazy greedy with the top entry j's bound just made exact (g) at step t: pop it when it beats the
    runner-up (it is the pick), else put it back in the heap with its new bound. Returns (new size, picked).
    """
    r = _runner_up(keys, ids, size)
    if r < 0 or _better(g, j, keys[r], ids[r]):
        return _heap_pop(keys, ids, size), True
    keys[0] = g
    stamp[j] = t
    _sift_down(keys, ids, size, np.int64(0))
    return size, False


@njit(cache=True)
def _pop_stale(keys, ids, size, stamp, t, limit, out):
    """Pop up to ``limit`` entries from the top whose bound is stale at step t, into ``out``.

    Returns (count, new size). Stops at the first fresh entry (it is then the best remaining bound).
    """
    m = 0
    while size > 0 and m < limit and stamp[ids[0]] != t:
        out[m] = ids[0]
        m += 1
        size = _heap_pop(keys, ids, size)
    return m, size


@njit(cache=True)
def _sample_position(u, R, u32):
    """min(floor(u * R), R - 1), the product in u's original dtype (float32 when u32), as the reference."""
    if u32:
        p = math.floor(np.float32(u) * np.float32(R))
    else:
        p = math.floor(u * R)
    return max(min(p, R - 1), 0)


@njit(cache=True)
def _gain(row, cover):
    """sum_i max(row_i - cover_i, 0) in float64, in one fixed order.

    Four interleaved partial sums (over i = 0, 4, 8, ..., i = 1, 5, ... and so on, the tail added to
    the first) combined as (p0 + p1) + (p2 + p3). Every gain in this module is computed by this one
    function, so equal inputs give bit-identical gains whichever optimizer asks.
    """
    n = cover.shape[0]
    m = n - n % 4
    p0 = 0.0
    p1 = 0.0
    p2 = 0.0
    p3 = 0.0
    for i in range(0, m, 4):
        p0 += max(row[i] - cover[i], 0.0)
        p1 += max(row[i + 1] - cover[i + 1], 0.0)
        p2 += max(row[i + 2] - cover[i + 2], 0.0)
        p3 += max(row[i + 3] - cover[i + 3], 0.0)
    for i in range(m, n):
        p0 += max(row[i] - cover[i], 0.0)
    return (p0 + p1) + (p2 + p3)


@njit(cache=True, nogil=True, inline='always')
def _first_max(gs, m):
    """Position of the first largest of gs[:m] (m >= 1): for candidates listed in ascending order, the
    lowest index keeps ties."""
    bq = 0
    for q in range(1, m):
        if gs[q] > gs[bq]:
            bq = q
    return bq


@njit(cache=True, nogil=True, inline='always')
def _remove_at(js, p, nc):
    """Remove js[p] from the list js[:nc], keeping the order; returns the new length."""
    for q in range(p, nc - 1):
        js[q] = js[q + 1]
    return nc - 1


@njit(cache=True, nogil=True, inline='always')
def _valid_indices(valid, out):
    """Write the indices i with valid[i] into out, ascending; returns how many."""
    m = 0
    for i in range(valid.shape[0]):
        if valid[i]:
            out[m] = i
            m += 1
    return m


# --------------------------------------------------------------------------------------------------
# dense greedy: one problem given by its (n, n) similarity, read row- or candidate-major
# --------------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _gains_parallel(C, js, m, cover, out):
    """out[q] = gain of candidate js[q] for q < m, in parallel over candidates (C candidate-major)."""
    for q in prange(m):
        out[q] = _gain(C[js[q]], cover)


@njit(cache=True)
def _gains_of(C, js, m, cover, out, par):
    if par:
        _gains_parallel(C, js, m, cover, out)
    else:
        for q in range(m):
            out[q] = _gain(C[js[q]], cover)


@njit(cache=True, nogil=True, inline='always')
def _add_to_cover(row, cover):
    """cover[i] = max(cover[i], row[i]) for i < len(row): a pick's similarities join the cover."""
    for i in range(row.shape[0]):
        if row[i] > cover[i]:
            cover[i] = row[i]


@njit(cache=True)
def _solve_dense(C, valid, budget, opt, u, u32, out_idx, out_gain, par):
    """Greedy on one dense problem, candidate-major: ``C[j, i]`` is s_ij, so a column is a row.

    Writes ``out_idx[:t]`` / ``out_gain[:t]`` for the t picks made (t <= budget; fewer only when the
    valid candidates run out); the rest is left as the caller initialised it (-1 / 0). With ``par`` the
    full gain passes (lazy's first, every naive step) run in parallel over candidates; lazy
    re-evaluations stay serial (each reads one contiguous column, cheaper than a parallel launch).
    """
    n = valid.shape[0]
    cover = np.zeros(n)
    js = np.empty(n, dtype=np.int64)  # the remaining candidates, ascending (lazy: the heap's ids)
    gs = np.empty(n)  # their gains (lazy: the heap's bounds)
    nc = _valid_indices(valid, js)
    if opt == 1:  # lazy
        _gains_of(C, js, nc, cover, gs, par)  # exact at step 0
        _heapify(gs, js, nc)
        stamp = np.zeros(n, dtype=np.int64)  # the step at which j's bound was last made exact
        for t in range(budget):
            picked = False
            while nc > 0 and not picked:  # a bound made exact at this step is the naive pick
                j = js[0]
                g = gs[0] if stamp[j] == t else _gain(C[j], cover)
                nc, picked = _reseat(gs, js, nc, stamp, t, g, j)
            if not picked:
                break
            out_idx[t] = j
            out_gain[t] = g
            _add_to_cover(C[j], cover)
        return
    for t in range(budget):
        if nc == 0:
            break
        if opt == 0:  # naive: every remaining candidate
            _gains_of(C, js, nc, cover, gs, par)
            p = _first_max(gs, nc)
            g = gs[p]
        else:  # stochastic: the remaining candidates at the drawn positions
            p = -1
            g = 0.0
            for q in range(u.shape[1]):
                pq = _sample_position(u[t, q], nc, u32)
                if p >= 0 and js[pq] == js[p]:
                    continue
                gq = _gain(C[js[pq]], cover)
                if p < 0 or _better(gq, js[pq], g, js[p]):
                    p, g = pq, gq
        j = js[p]
        nc = _remove_at(js, p, nc)
        out_idx[t] = j
        out_gain[t] = g
        _add_to_cover(C[j], cover)


@njit(cache=True)
def _is_symmetric(A):
    n = A.shape[0]
    T = _TILE
    for I in range(0, n, T):
        for J in range(I, n, T):
            for i in range(I, min(I + T, n)):
                for j in range(max(J, i + 1), min(J + T, n)):
                    if A[i, j] != A[j, i]:
                        return False
    return True


@njit(parallel=True, cache=True)
def _is_symmetric_parallel(A):
    n = A.shape[0]
    T = _TILE
    nt = (n + T - 1) // T
    pI, pJ = _tile_pairs(nt)
    m = pI.shape[0]
    ok = np.ones(m, dtype=np.bool_)
    for p in prange(m):
        I = pI[p] * T
        J = pJ[p] * T
        for i in range(I, min(I + T, n)):
            for j in range(max(J, i + 1), min(J + T, n)):
                if A[i, j] != A[j, i]:
                    ok[p] = False
    return ok.all()


@njit(cache=True)
def _transpose(A, out):
    n = A.shape[0]
    T = _TILE
    for I in range(0, n, T):
        for J in range(0, n, T):
            for i in range(I, min(I + T, n)):
                for j in range(J, min(J + T, n)):
                    out[j, i] = A[i, j]


@njit(parallel=True, cache=True)
def _transpose_parallel(A, out):
    n = A.shape[0]
    T = _TILE
    nt = (n + T - 1) // T
    for tI in prange(nt):
        I = tI * T
        for J in range(0, n, T):
            for i in range(I, min(I + T, n)):
                for j in range(J, min(J + T, n)):
                    out[j, i] = A[i, j]


@njit(parallel=True, cache=True)
def _greedy_many(S, valid, budgets, opt, u, u32, par, out_idx, out_gain):
    """Many problems: one thread per problem, each solved serially (``par`` is False).

    Each problem is solved candidate-major: on the matrix itself when it is symmetric (as every
    similarity built here is), else on a transposed copy. ``par`` comes in as an argument, not a
    constant, so that numba compiles one specialisation of the solver, not one per literal.
    """
    B, n, _ = S.shape
    for b in prange(B):
        C = S[b]
        if not _is_symmetric(C):
            C = np.empty_like(S[b])
            _transpose(S[b], C)
        _solve_dense(C, valid[b], budgets[b], opt, u[b], u32, out_idx[b], out_gain[b], par)


@njit(cache=True)
def _greedy_few(S, valid, budgets, opt, u, u32, par, out_idx, out_gain):
    """Few large problems, one after the other, with parallel gain passes (``par`` True)."""
    B, n, _ = S.shape
    T = np.empty((0, 0), dtype=S.dtype)
    for b in range(B):
        C = S[b]
        if not _is_symmetric_parallel(C):
            if T.shape[0] != n:
                T = np.empty_like(S[b])
            _transpose_parallel(S[b], T)
            C = T
        _solve_dense(C, valid[b], budgets[b], opt, u[b], u32, out_idx[b], out_gain[b], par)


def _prepare_u(u, shape_bk, optimizer_code):
    """u as float64 (B, K, s) plus whether the caller's draws were float32 (then products are too)."""
    B, K = shape_bk
    if optimizer_code != 2:
        return np.zeros((max(B, 1), max(K, 1), 1)), False
    if u is None:
        raise ValueError("u (uniform draws of shape (B, K, s)) is required by the 'stochastic' optimizer")
    u = np.asarray(u)
    u32 = u.dtype == np.float32
    if u.ndim != 3 or u.shape[0] != B or u.shape[1] < K or u.shape[2] < 1:
        raise ValueError(f"u must have shape (B, K, s) = ({B}, >= {K}, >= 1), got {u.shape}")
    return _draws_in_range(_arr(u, dtype=np.float64)), bool(u32)


def _draws_in_range(u: np.ndarray) -> np.ndarray:
    """``u`` when it holds uniform draws in [0, 1] (1.0: a draw rounded up in float32, the sampling rule's last
    position), else a ValueError."""
    refuse_draws_outside(not u.size or (float(u.min()) >= 0.0 and float(u.max()) <= 1.0))
    return u


def _prepare_u_steps(u, k: int, optimizer_code: int, steps: str = "k"):
    """One problem's draws ``u`` (``steps`` >= k, s) as float64, and whether they were float32, as
    :func:`_prepare_u` (also for :mod:`.numba_sparse`; ``steps`` names the first axis in errors)."""
    if optimizer_code != 2:
        return np.zeros((1, 1)), False
    if u is None:
        raise ValueError(f"u (uniform draws of shape ({steps}, s)) is required by the 'stochastic' optimizer")
    u32 = np.asarray(u).dtype == np.float32
    uu = _arr(u, dtype=np.float64)
    if uu.ndim != 2 or uu.shape[0] < k or uu.shape[1] < 1:
        raise ValueError(f"u must have shape ({steps}, s) = ({k}, >= 1), got {uu.shape}")
    return _draws_in_range(uu), bool(u32)


def _greedy_batched_impl(S, valid, budgets, optimizer, u=None):
    """Facility-location greedy on B dense problems: indices (B, K) int64 and gains (B, K), S's dtype.

    ``S[b, i, j]`` is the similarity of ground point i to candidate j (need not be symmetric); picks
    are made among the valid candidates, ``budgets[b]`` in problem b (fewer only if the valid
    candidates run out), padded with -1 / 0. ``u`` (B, >= K, s): the stochastic optimizer's draws.

    Examples
    --------
    Budgets 2 and 1 on the similarities of the running example: the middle point, then the outlier;
    the second problem's row is padded with -1. The picks are the reference's:

    >>> import numpy as np
    >>> from crestcore import _reference_kernels as ref
    >>> from crestcore.backends._examples import two_problems
    >>> X, valid, budgets = two_problems(np)
    >>> S = similarity_batched(X, valid, "euclidean", "max-minus", 1.0)
    >>> idx, gains = greedy_batched(S, valid, budgets, "lazy")
    >>> idx.tolist(), gains.tolist()
    ([[1, 3], [0, -1]], [[29.0, 9.0], [5.0, 0.0]])
    >>> ref_idx, ref_gains = ref.greedy_batched(S, valid, budgets, "lazy")
    >>> np.array_equal(idx, ref_idx) and np.array_equal(gains, ref_gains)
    True
    """
    opt = _code(_OPTIMIZER_CODE, optimizer, "optimizer")
    S = _arr(S)
    if S.ndim != 3 or S.shape[1] != S.shape[2]:
        raise ValueError(f"S must be (B, n, n), got shape {S.shape}")
    B, n, _ = S.shape
    valid, budgets, K = _batch_args(valid, budgets, B, n)
    out_idx = np.full((B, K), -1, dtype=np.int64)
    out_gain = np.zeros((B, K), dtype=S.dtype)
    if B == 0 or K <= 0:
        return out_idx, out_gain
    uu, u32 = _prepare_u(u, (B, K), opt)
    threads = get_num_threads()
    if n >= _BIG_N and B < 2 * threads:
        _greedy_few(S, valid, budgets, opt, uu, u32, True, out_idx, out_gain)
    else:
        _greedy_many(S, valid, budgets, opt, uu, u32, False, out_idx, out_gain)
    return out_idx, out_gain


# --------------------------------------------------------------------------------------------------
# weights and objective
# --------------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _assign_kernel(S, valid, idx, asg, best):
    B, n, _ = S.shape
    K = idx.shape[1]
    total = B * n
    for r in prange(total):
        b = r // n
        i = r - b * n
        a = -1
        m = 0.0
        if valid[b, i]:
            for t in range(K):
                j = idx[b, t]
                if j < 0:
                    continue
                v = float(S[b, i, j])
                if a < 0 or v > m:  # strict: the earliest pick keeps ties
                    a = t
                    m = v
        asg[b, i] = a
        best[b, i] = m if a >= 0 else 0.0


@njit(cache=True)
def _assign_reduce(asg, best, weights, objective):
    B, n = asg.shape
    for b in range(B):
        o = 0.0
        for i in range(n):
            a = asg[b, i]
            if a >= 0:
                weights[b, a] += 1.0
                o += best[b, i]
        objective[b] = o


def _assign_batched_impl(S, valid, indices):
    """Cluster-size weights (B, K) and objectives (B,) of the picks (-1 = no pick), S's dtype.

    Examples
    --------
    The first problem of the running example with the picks of :func:`greedy_batched`'s example: three
    points go to pick 1, the outlier to itself; a problem without picks (-1) weighs nothing:

    >>> import numpy as np
    >>> from crestcore import _reference_kernels as ref
    >>> S = np.array([[[10.0, 9.0, 8.0, 0.0], [9.0, 10.0, 9.0, 1.0], [8.0, 9.0, 10.0, 2.0], [0.0, 1.0, 2.0, 10.0]]])
    >>> S, valid, idx = np.concatenate([S, S]), np.ones((2, 4), dtype=bool), np.array([[1, 3], [-1, -1]])
    >>> weights, objective = assign_batched(S, valid, idx)
    >>> weights.tolist(), objective.tolist()
    ([[3.0, 1.0], [0.0, 0.0]], [38.0, 0.0])
    >>> all(np.array_equal(a, b) for a, b in zip((weights, objective), ref.assign_batched(S, valid, idx)))
    True
    """
    S = _arr(S)
    B, n, _ = S.shape
    valid = _arr(valid, dtype=bool)
    idx = _arr(indices, dtype=np.int64)
    if idx.ndim != 2 or idx.shape[0] != B or valid.shape != (B, n):
        raise ValueError(f"indices must be (B, K) and valid (B, n) with B, n = {B}, {n}")
    K = idx.shape[1]
    if idx.size and idx.max() >= n:
        raise ValueError(f"indices must be < n = {n} (or -1 for no pick), got {idx.max()}")
    if K == 0 or B == 0:
        return np.zeros((B, K), dtype=S.dtype), np.zeros((B,), dtype=S.dtype)
    asg = np.empty((B, n), dtype=np.int64)
    best = np.empty((B, n))
    _assign_kernel(S, valid, idx, asg, best)
    weights = np.zeros((B, K))
    objective = np.zeros(B)
    _assign_reduce(asg, best, weights, objective)
    return weights.astype(S.dtype), objective.astype(S.dtype)


# --------------------------------------------------------------------------------------------------
# matrix-free path: one problem given by its features (n, d), similarities computed on the fly
# --------------------------------------------------------------------------------------------------

# In a lazy step, after this many serial re-evaluations the next ones go in parallel batches (each
# re-evaluation costs O(n d) here, so a batch is worth a parallel launch; few steps get that far).
_SERIAL_EVALS = 256


@njit(parallel=True, cache=True)
def _max_distance(X, XT, nrm, metric, nthr):
    n = X.shape[0]
    nch = min(n, 16 * nthr)
    part = np.zeros(nch)
    for c in prange(nch):
        buf = np.empty(n)
        m = 0.0
        for i in range(c, n, nch):  # interleaved rows balance the triangle between chunks
            _dist_to(X, XT, nrm, i, metric, i + 1, n, buf)
            for j in range(i + 1, n):
                if buf[j] > m:
                    m = buf[j]
        part[c] = m
    return part.max()


@njit(parallel=True, cache=True)
def _feature_gains(X, XT, nrm, metric, kernel, scale, M, r32, js, m, cover, nthr, out):
    """out[q] = exact gain of candidate js[q], q < m, in parallel over candidates."""
    n = X.shape[0]
    nch = min(m, 4 * nthr)
    for c in prange(nch):
        buf = np.empty(n)
        for q in range(c * m // nch, (c + 1) * m // nch):
            _sim_to(X, XT, nrm, js[q], metric, kernel, scale, M, np.int64(0), n, buf, r32)
            out[q] = _gain(buf, cover)


@njit(cache=True)
def _features_greedy(X, XT, nrm, k, metric, kernel, scale, M, r32, opt, u, u32, nthr, batch, out_idx, out_gain):
    n = X.shape[0]
    cover = np.zeros(n)
    buf = np.empty(n)
    js = np.arange(n)  # the remaining candidates, ascending (naive, stochastic)
    gs = np.empty(n)
    if opt == 1:  # lazy
        _feature_gains(X, XT, nrm, metric, kernel, scale, M, r32, js, n, cover, nthr, gs)  # exact at step 0
        keys = gs.copy()
        ids = js.copy()
        size = n
        _heapify(keys, ids, size)
        stamp = np.zeros(n, dtype=np.int64)
        for t in range(k):
            evals = 0
            picked = False
            while size > 0 and not picked:
                j = ids[0]
                if stamp[j] == t:  # exact at this step: the pick
                    g = keys[0]
                    size, picked = _reseat(keys, ids, size, stamp, t, g, j)
                    continue
                if evals >= _SERIAL_EVALS:  # many re-evaluations this step: parallel batches
                    m, size = _pop_stale(keys, ids, size, stamp, t, batch, js)
                    _feature_gains(X, XT, nrm, metric, kernel, scale, M, r32, js, m, cover, nthr, gs)
                    for q in range(m):
                        size = _heap_push(keys, ids, size, gs[q], js[q])
                        stamp[js[q]] = t
                    evals += m
                    continue
                _sim_to(X, XT, nrm, j, metric, kernel, scale, M, np.int64(0), n, buf, r32)
                g = _gain(buf, cover)
                evals += 1
                size, picked = _reseat(keys, ids, size, stamp, t, g, j)
            if not picked:
                break
            out_idx[t] = j
            out_gain[t] = g
            _sim_to(X, XT, nrm, j, metric, kernel, scale, M, np.int64(0), n, buf, r32)
            _add_to_cover(buf, cover)
    else:
        rem = np.arange(n)  # remaining candidates, ascending
        hit = np.zeros(n, dtype=np.bool_)  # stochastic: positions sampled at this step
        R = n
        for t in range(k):
            if R == 0:
                break
            if opt == 0:  # naive: every remaining candidate
                nc = R
                for q in range(R):
                    js[q] = rem[q]
            else:  # stochastic: positions min(floor(u * R), R - 1), deduplicated, ascending
                for q in range(u.shape[1]):
                    hit[_sample_position(u[t, q], R, u32)] = True
                nc = np.int64(0)
                for p in range(R):
                    if hit[p]:
                        hit[p] = False
                        js[nc] = rem[p]
                        nc += 1
            _feature_gains(X, XT, nrm, metric, kernel, scale, M, r32, js, nc, cover, nthr, gs)
            bq = _first_max(gs, nc)
            j = js[bq]
            out_idx[t] = j
            out_gain[t] = gs[bq]
            p = 0
            while rem[p] != j:
                p += 1
            R = _remove_at(rem, p, R)
            _sim_to(X, XT, nrm, j, metric, kernel, scale, M, np.int64(0), n, buf, r32)
            _add_to_cover(buf, cover)


@njit(parallel=True, cache=True)
def _feature_assign(X, XT, nrm, metric, kernel, scale, M, r32, picks, nthr, asg, best):
    """Each point's most similar pick (earliest on ties) and that similarity, in row chunks."""
    n = X.shape[0]
    k = picks.shape[0]
    nch = min(n, 4 * nthr)
    for c in prange(nch):
        lo = c * n // nch
        hi = (c + 1) * n // nch
        buf = np.empty(n)
        # through views of the chunk: indices from lo, whose sign LLVM cannot tell, made the update loop
        # scatters under Numba's index wraparound (5.5x slower in a session script)
        a = asg[lo:hi]
        bb = best[lo:hi]
        bf = buf[lo:hi]
        for i in range(hi - lo):
            a[i] = -1
            bb[i] = 0.0
        for t in range(k):
            _sim_to(X, XT, nrm, picks[t], metric, kernel, scale, M, lo, hi, buf, r32)
            for i in range(hi - lo):
                if a[i] < 0 or bf[i] > bb[i]:
                    a[i] = t
                    bb[i] = bf[i]


def greedy_features(X, k, metric, kernel, scale, optimizer, u=None, tile=2048):
    """Greedy on one problem given by features X (n, d), never forming the n x n similarity.

    Returns indices (k,) int64, gains (k,), weights (k,) and a 0-d objective, floats in X's dtype.
    ``tile`` is accepted for signature compatibility; memory here is O(n) per thread anyway.

    Examples
    --------
    Four points on a line, two picks, as the dense kernels pick them:

    >>> import numpy as np
    >>> from crestcore import _reference_kernels as ref
    >>> X = np.array([[0.0], [1.0], [2.0], [10.0]])
    >>> idx, gains, weights, objective = greedy_features(X, 2, "euclidean", "max-minus", 1.0, "lazy")
    >>> idx.tolist(), gains.tolist(), weights.tolist(), float(objective)
    ([1, 3], [29.0, 9.0], [3.0, 1.0], 38.0)
    >>> np.array_equal(idx, ref.greedy_features(X, 2, "euclidean", "max-minus", 1.0, "lazy")[0])
    True

    Stochastic greedy with draws ``u`` (k, s): step 0 looks at positions ``floor(0.9 * 4) = 3`` and
    ``floor(0.1 * 4) = 0`` of the remaining candidates, step 1 at position 1 of ``[1, 2, 3]``:

    >>> u = np.array([[0.9, 0.1], [0.5, 0.5]])
    >>> greedy_features(X, 2, "euclidean", "max-minus", 1.0, "stochastic", u)[0].tolist()
    [0, 2]
    >>> ref.greedy_features(X, 2, "euclidean", "max-minus", 1.0, "stochastic", u)[0].tolist()
    [0, 2]
    """
    m, kk = _similarity_codes(metric, kernel)
    opt = _code(_OPTIMIZER_CODE, optimizer, "optimizer")
    X = _features(X, 2)
    dtype = X.dtype
    n = X.shape[0]
    k = check_picks(k, n)
    uu, u32 = _prepare_u_steps(u, k, opt)
    nthr = get_num_threads()
    X64 = _arr(X, dtype=np.float64)
    XT = _arr(X64.T)
    nrm = np.zeros(n)
    if m == 2:
        _sqnorms(X64, nrm)
    sc = float(scale) if kk == 1 else 1.0
    M = float(_max_distance(X64, XT, nrm, m, nthr)) if (kk == 0 and n > 1) else 0.0
    r32 = dtype == np.float32  # similarities rounded as the dense paths store them
    out_idx = np.full(k, -1, dtype=np.int64)
    out_gain = np.zeros(k)
    if k > 0:
        _features_greedy(X64, XT, nrm, k, m, kk, sc, M, r32, opt, uu, u32, nthr, 64 * nthr, out_idx, out_gain)
        refuse_nonfinite_gains(bool(np.isfinite(out_gain).all()))
    weights = np.zeros(k)
    objective = 0.0
    if k > 0:
        asg = np.empty(n, dtype=np.int64)
        best = np.empty(n)
        _feature_assign(X64, XT, nrm, m, kk, sc, M, r32, out_idx, nthr, asg, best)
        weights = np.bincount(asg, minlength=k).astype(np.float64)
        objective = float(best.sum())
    return (
        out_idx,
        out_gain.astype(dtype),
        weights.astype(dtype),
        np.asarray(objective, dtype=dtype),
    )


# --------------------------------------------------------------------------------------------------
# fused dense path: similarities, greedy and cluster sizes of each problem in one pass (facility_batched)
# --------------------------------------------------------------------------------------------------

# Problems up to this size compute the upper triangle row by row and mirror it (the matrix is in cache);
# larger ones compute the upper triangle by _FILL_TILE tiles, each written to both triangles (no strided
# writes out of cache). Both give the same values.
_MIRROR_MAX_N = 512
# The fused kernel runs one thread per problem (problems split over threads, never one problem over
# several) once the batch has this much work (B * n * n * (d + 4)); below it one thread is faster.
_FUSED_PARALLEL_MIN_WORK = 250_000
# Block of gain terms tested at once for "all exactly 0" in _fused_gain (a multiple of 4).
_GAIN_BLOCK = 16


@njit(cache=True, nogil=True)
def _fused_gain(W, off, nw, mq, cover):
    """Gain of the candidate whose (candidate-major) column starts at W[off]: sum_i max(W - cover, 0),
    float64, partial sums assigned as the padded kernels assign them (p_{i mod 4} below mq, p0 after)."""
    m4 = nw if nw < mq else mq
    m4 -= m4 % 4
    p0 = 0.0
    p1 = 0.0
    p2 = 0.0
    p3 = 0.0
    w = W[off:off + nw]
    c = cover[:nw]
    # Blocks of _GAIN_BLOCK terms: a block whose terms are all exactly 0 (W <= cover: covered points, most
    # of them once the greedy is under way) is skipped. Adding +0.0 leaves a partial sum (>= +0) as it
    # is, so the four sums are bit for bit the full loop's; only the serial chain of additions shrinks.
    mb = m4 - m4 % _GAIN_BLOCK
    for i0 in range(0, mb, _GAIN_BLOCK):
        hit = False
        for q in range(i0, i0 + _GAIN_BLOCK):
            if not w[q] <= c[q]:  # a positive term (or a NaN, kept as the full loop would)
                hit = True
        if hit:
            for i in range(i0, i0 + _GAIN_BLOCK, 4):
                p0 += max(w[i] - c[i], 0.0)
                p1 += max(w[i + 1] - c[i + 1], 0.0)
                p2 += max(w[i + 2] - c[i + 2], 0.0)
                p3 += max(w[i + 3] - c[i + 3], 0.0)
    for i in range(mb, m4, 4):
        p0 += max(W[off + i] - cover[i], 0.0)
        p1 += max(W[off + i + 1] - cover[i + 1], 0.0)
        p2 += max(W[off + i + 2] - cover[i + 2], 0.0)
        p3 += max(W[off + i + 3] - cover[i + 3], 0.0)
    for i in range(m4, nw):
        v = max(W[off + i] - cover[i], 0.0)
        if i >= mq:
            p0 += v
        else:
            r = i % 4
            if r == 0:
                p0 += v
            elif r == 1:
                p1 += v
            elif r == 2:
                p2 += v
            else:
                p3 += v
    return (p0 + p1) + (p2 + p3)


# A column is kept in compacted form (its live entries only) from its first evaluation after the first
# pick that finds at most half of it live: four segments, one per partial sum of _fused_gain (the points
# i < mq with i mod 4 = r; segment 0 also takes the points from mq on), each ascending, values in the
# column's first half and the points' indices, as floats (exact below 2**24), at the same places in its
# second half. ``seg[j, r]`` is segment r's start, ``seg[j, 4 + r]`` its length.
_COMPACT_MAX_N = 1 << 24
# problems below this many points are not compacted: in cache and solved in a few picks, they gained
# nothing and paid the calls (the CREST step's 100 problems of about 60 points: 3.5 -> 4.3 ms)
_COMPACT_MIN_N = 512


@njit(cache=True, nogil=True, inline='always')
def _live_term(W, a, h, dst, cover, p, k):
    """Entry ``W[a]`` (index at ``W[a + h]``) of a segment: its term added to ``p``; the entry kept at
    ``W[dst + k]`` (moved forward, k <= its position) unless it is covered now. Returns (p, k)."""
    w = W[a]
    fi = W[a + h]
    c = cover[int(fi)]
    W[dst + k] = w
    W[dst + h + k] = fi
    return p + max(w - c, 0.0), k + (0 if w <= c else 1)


@njit(cache=True, nogil=True)
def _live_gain(W, off, h, sj, cover):
    """Gain of a compacted column (segments ``sj`` = ``seg[j]``), bit for bit the dense column's: each
    partial sum gets the same nonzero terms in the same order (the dropped entries were exact +0.0
    terms, and adding +0.0 to a sum >= +0 changes nothing). The four segments are summed interleaved
    (four independent chains, as the dense loop), and entries covered now (0 from here on: the cover
    only grows) are dropped in the same pass."""
    b0 = off + sj[0]
    b1 = off + sj[1]
    b2 = off + sj[2]
    b3 = off + sj[3]
    n0 = sj[4]
    n1 = sj[5]
    n2 = sj[6]
    n3 = sj[7]
    m = min(min(n0, n1), min(n2, n3))
    p0 = 0.0
    p1 = 0.0
    p2 = 0.0
    p3 = 0.0
    k0 = 0
    k1 = 0
    k2 = 0
    k3 = 0
    for q in range(m):
        p0, k0 = _live_term(W, b0 + q, h, b0, cover, p0, k0)
        p1, k1 = _live_term(W, b1 + q, h, b1, cover, p1, k1)
        p2, k2 = _live_term(W, b2 + q, h, b2, cover, p2, k2)
        p3, k3 = _live_term(W, b3 + q, h, b3, cover, p3, k3)
    for q in range(m, n0):
        p0, k0 = _live_term(W, b0 + q, h, b0, cover, p0, k0)
    for q in range(m, n1):
        p1, k1 = _live_term(W, b1 + q, h, b1, cover, p1, k1)
    for q in range(m, n2):
        p2, k2 = _live_term(W, b2 + q, h, b2, cover, p2, k2)
    for q in range(m, n3):
        p3, k3 = _live_term(W, b3 + q, h, b3, cover, p3, k3)
    sj[4] = k0
    sj[5] = k1
    sj[6] = k2
    sj[7] = k3
    return (p0 + p1) + (p2 + p3)


@njit(cache=True, nogil=True, inline='always')
def _scratch_cap(nw):
    """Room per segment in the scratch of :func:`_collecting_gain`: a quarter of the points, plus the
    at most 3 points from mq on (segment 0)."""
    return (nw + 3) // 4 + 4


@njit(cache=True, nogil=True)
def _collecting_gain(W, off, nw, mq, cover, sv, si):
    """:func:`_fused_gain` (the same sums, bit for bit), also writing the live entries of each partial
    sum's points to its segment of the scratch (segment r at ``r * _scratch_cap(nw)``), branch-free:
    every entry is written, a segment's count advances past the live ones. The stores run beside the
    chains of additions that bound the loop. Returns the gain and the number of live entries."""
    m4 = nw if nw < mq else mq
    m4 -= m4 % 4
    cap = _scratch_cap(nw)
    p0 = 0.0
    p1 = 0.0
    p2 = 0.0
    p3 = 0.0
    k0 = 0
    k1 = cap
    k2 = 2 * cap
    k3 = 3 * cap
    for i in range(0, m4, 4):
        w0 = W[off + i]
        w1 = W[off + i + 1]
        w2 = W[off + i + 2]
        w3 = W[off + i + 3]
        c0 = cover[i]
        c1 = cover[i + 1]
        c2 = cover[i + 2]
        c3 = cover[i + 3]
        p0 += max(w0 - c0, 0.0)
        p1 += max(w1 - c1, 0.0)
        p2 += max(w2 - c2, 0.0)
        p3 += max(w3 - c3, 0.0)
        sv[k0] = w0
        si[k0] = i
        k0 += 0 if w0 <= c0 else 1
        sv[k1] = w1
        si[k1] = i + 1
        k1 += 0 if w1 <= c1 else 1
        sv[k2] = w2
        si[k2] = i + 2
        k2 += 0 if w2 <= c2 else 1
        sv[k3] = w3
        si[k3] = i + 3
        k3 += 0 if w3 <= c3 else 1
    for i in range(m4, nw):
        w0 = W[off + i]
        c0 = cover[i]
        v = max(w0 - c0, 0.0)
        live = 0 if w0 <= c0 else 1
        r = 0 if i >= mq else i % 4
        if r == 0:
            p0 += v
            sv[k0] = w0
            si[k0] = i
            k0 += live
        elif r == 1:
            p1 += v
            sv[k1] = w0
            si[k1] = i
            k1 += live
        elif r == 2:
            p2 += v
            sv[k2] = w0
            si[k2] = i
            k2 += live
        else:
            p3 += v
            sv[k3] = w0
            si[k3] = i
            k3 += live
    # the segments' lengths, kept where _compact reads them
    si[4 * cap] = k0
    si[4 * cap + 1] = k1 - cap
    si[4 * cap + 2] = k2 - 2 * cap
    si[4 * cap + 3] = k3 - 3 * cap
    return (p0 + p1) + (p2 + p3), k0 + (k1 - cap) + (k2 - 2 * cap) + (k3 - 3 * cap)


@njit(cache=True, nogil=True)
def _compact(W, off, nw, h, sj, sv, si):
    """Rewrite column ``W[off:off + nw]`` as the live entries :func:`_collecting_gain` just wrote to the
    scratch, in four segments (see above)."""
    cap = _scratch_cap(nw)
    L = 0
    for r in range(4):
        cnt = int(si[4 * cap + r])
        sj[r] = L
        sj[4 + r] = cnt
        for q in range(cnt):
            W[off + L + q] = sv[r * cap + q]
            W[off + h + L + q] = si[r * cap + q]
        L += cnt


@njit(cache=True, nogil=True)
def _column_gain(W, j, nw, mq, cover, live, seg, sv, si, compact):
    """Gain of candidate j (its column of W, dense, or compacted when ``live[j]``). With ``compact``
    (a pick made), a dense column with at most half of it live is compacted after its gain is taken;
    a compacted one sheds its newly covered entries."""
    off = j * nw
    h = nw // 2
    if live[j]:
        return _live_gain(W, off, h, seg[j], cover)
    if not compact:
        return _fused_gain(W, off, nw, mq, cover)
    g, L = _collecting_gain(W, off, nw, mq, cover, sv, si)
    if L <= h:
        _compact(W, off, nw, h, seg[j], sv, si)
        live[j] = True
    return g


@njit(cache=True, nogil=True)
def _column_to_cover(W, j, nw, cover, live, seg):
    """:func:`_add_to_cover` for column j, dense or compacted (its dropped entries were covered already)."""
    off = j * nw
    if not live[j]:
        _add_to_cover(W[off:off + nw], cover)
        return
    h = nw // 2
    for r in range(4):
        a = off + seg[j, r]
        for q in range(seg[j, 4 + r]):
            i = int(W[a + h + q])
            w = W[a + q]
            if w > cover[i]:
                cover[i] = w


# Tile edge of _fill_tiled: rows of 256 vectorise well and a 256 x 256 float64 tile stays in L2 (measured
# on this machine: 64 took 1.4x as long, 1024 1.3x).
_FILL_TILE = 256

# relative slack of the radius bound D(i, j) <= r_i + r_j in _max_valid_distance: the computed distances
# and radii are within ~4 d eps (d <= 64: < 3e-14) of the exact ones, far inside it
_PRUNE_SLACK = 1e-9


@njit(cache=True, nogil=True)
def _max_valid_distance(X, valid, b, nw, metric, nrm):
    """M = the largest D over valid pairs (0 with fewer than two), each pair's value bit for bit the
    one the fill computes, so ``M - D`` is exactly what a full measuring pass would give.

    The valid points are visited in order of decreasing distance r_p to their mean, each against the
    points after it (the upper triangle, once), and the visit stops once ``r_p + r_{p+1}`` (times
    1 + _PRUNE_SLACK) is below the maximum found: by the triangle inequality no remaining pair can
    reach it. Cosine distances are not metric: the whole triangle is visited there.
    """
    d = X.shape[2]
    idx = np.empty(nw, dtype=np.int64)
    nv = _valid_indices(valid[b, :nw], idx)
    if nv < 2:
        return 0.0
    idx = idx[:nv]
    r = np.zeros(nv)
    if metric != 2:
        c = np.zeros(d)
        for p in range(nv):
            for k in range(d):
                c[k] += X[b, idx[p], k]
        for k in range(d):
            c[k] /= nv
        for p in range(nv):
            s = 0.0
            for k in range(d):
                v = X[b, idx[p], k] - c[k]
                s += v * v
            r[p] = math.sqrt(s)
        order = np.argsort(-r, kind="mergesort")
        idx = idx[order]
        r = r[order]
    XS = np.empty((d, nv))
    ns = np.empty(nv)
    for p in range(nv):
        ns[p] = nrm[idx[p]]
        for k in range(d):
            XS[k, p] = X[b, idx[p], k]
    xi = np.empty(d)
    buf = np.empty(nv)
    M = 0.0
    for p in range(nv - 1):
        if metric != 2:
            bound = (r[p] + r[p + 1]) * (1.0 + _PRUNE_SLACK)
            if metric == 1:
                bound = bound * bound
            if bound < M:
                break
        for k in range(d):
            xi[k] = XS[k, p]
        _tile_row(xi, ns[p], XS, ns, metric, p + 1, nv, buf)
        for q in range(nv - p - 1):
            if buf[q] > M:
                M = buf[q]
    return M


@njit(cache=True, nogil=True)
def _fill_tiled(X, valid, b, nw, metric, kernel, scale, M, XT, nrm, W, mq, G4):
    """W[i * nw + j] = s(i, j) over the first nw points (0 on invalid rows and columns), by square
    tiles of the upper triangle, each written to both triangles: every distance computed once.

    Also the gains at the empty cover, as partial sums: ``G4[r, j]`` (zeroed by the caller) gets the
    terms ``max(W[j, a] - 0.0, 0.0)`` of the points a whose partial sum is r (a mod 4 below mq, 0 from
    mq on), added in ascending a as the entries are written (entry (a, j) equals (j, a)), so that
    ``(G4[0, j] + G4[1, j]) + (G4[2, j] + G4[3, j])`` is bit for bit :func:`_fused_gain` of column j at
    the empty cover, without a pass over the matrix."""
    T = _FILL_TILE
    tile = np.empty((T, T))
    for I0 in range(0, nw, T):
        I1 = min(I0 + T, nw)
        for J0 in range(I0, nw, T):
            J1 = min(J0 + T, nw)
            m = J1 - J0
            vb = valid[b, J0:J1]
            for i in range(I0, I1):
                tr = tile[i - I0, :m]
                if valid[b, i]:
                    _tile_row(X[b, i], nrm[i], XT, nrm, metric, J0, J1, tr)
                    if J0 <= i < J1:
                        tr[i - J0] = 0.0
                    _masked_sims(tr, vb, kernel, scale, M)
                else:
                    for q in range(m):
                        tr[q] = 0.0
                wr = W[i * nw + J0:i * nw + J1]
                g = G4[0 if i >= mq else i & 3, J0:J1]
                for q in range(m):
                    wr[q] = tr[q]
                    g[q] += max(wr[q] - 0.0, 0.0)
            if J0 != I0:
                h = I1 - I0
                for q in range(m):
                    a = J0 + q
                    wc = W[a * nw + I0:a * nw + I1]
                    g = G4[0 if a >= mq else a & 3, I0:I1]
                    for p in range(h):
                        wc[p] = tile[p, q]
                        g[p] += max(wc[p] - 0.0, 0.0)


@njit(cache=True, nogil=True)
def _fused_buffers(n, d):
    """One thread's work buffers for :func:`_fused_problem`, problems of up to n points of d features:
    the features transposed, squared norms, a row of distances, the cover, gains (lazy: the heap's
    bounds), stamps, candidate indices, which columns are compacted, their segments, a column's
    scratch (values, indices), the first gains' partial sums of a tiled fill, and a small problem's
    upper triangle of distances, packed row after row (the exp kernel's input)."""
    return (np.empty(d * n), np.empty(n), np.empty(n), np.empty(n), np.empty(n),
            np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64), np.empty(n, dtype=np.bool_),
            np.empty((n, 8), dtype=np.int64), np.empty(n + 32), np.empty(n + 32), np.empty((4, n)),
            np.empty(min(n, _MIRROR_MAX_N) * (min(n, _MIRROR_MAX_N) + 1) // 2))


# Problems of at most this many points with the lazy or naive optimizer are solved by
# :func:`_dense_greedy` (every gain at every pick, vectorised across candidates) instead of a heap.
_DENSE_GREEDY_MAX_N = 128


@njit(cache=True, nogil=True)
def _dense_greedy(W, nw, mq, budget, cover, js, nc, G4, b, out_idx, out_gain):
    """Greedy on a small problem (W flat, nw x nw, symmetric), every remaining candidate's gain at every
    pick: the rows of W are walked once per pick and each row's terms ``max(W[i, j] - cover[i], 0)`` are
    added to the four partial sums of all candidates j at once (contiguous, vectorised), point i to sum
    ``i mod 4`` below mq and to sum 0 from mq on, in ascending i: each gain is bit for bit
    :func:`_fused_gain`'s (W is symmetric, so row i is column i). A row whose point is covered up to its
    own similarity ``W[i, i]`` (the row's largest: distances are >= 0 and the diagonal's exactly 0; a
    picked point, an invalid one) holds only zero terms and is skipped (adding +0 changes no sum). The
    first largest gain among the candidates ``js[:nc]`` (ascending) is picked: the lowest index keeps
    ties, as the lazy heap and the naive scan do. Returns the number of picks."""
    t_done = 0
    for t in range(budget):
        if nc == 0:
            break
        for r in range(4):
            for j in range(nw):
                G4[r, j] = 0.0
        for i in range(nw):
            c = cover[i]
            off = i * nw
            if c >= W[off + i]:  # covered by its own similarity, the row's largest: every term is +0
                continue
            a = G4[(i & 3) if i < mq else 0]
            for j in range(nw):
                a[j] += max(W[off + j] - c, 0.0)
        p = 0
        j = js[0]
        g = (G4[0, j] + G4[1, j]) + (G4[2, j] + G4[3, j])
        for q in range(1, nc):
            j = js[q]
            gq = (G4[0, j] + G4[1, j]) + (G4[2, j] + G4[3, j])
            if gq > g:
                p = q
                g = gq
        j = js[p]
        nc = _remove_at(js, p, nc)
        out_idx[b, t] = j
        out_gain[b, t] = g
        _add_to_cover(W[j * nw:j * nw + nw], cover)
        t_done = t + 1
    return t_done


@njit(cache=True, nogil=True)
def _fused_problem(X, valid, b, mq, budget, metric, kernel, scale, opt, u, u32, W, bufs,
                   out_idx, out_gain, out_w):
    """Problem b: similarities into W (flat, nw x nw, candidate-major = row-major: symmetric), greedy,
    cluster sizes, with the work buffers ``bufs`` of :func:`_fused_buffers`. Returns the objective
    (float64)."""
    xt, nrm, row, cover, gs, st, js, live, seg, sv, si, G4, pk = bufs
    n = X.shape[1]
    d = X.shape[2]
    nw = 0
    for i in range(n):
        if valid[b, i]:
            nw = i + 1
    if nw == 0:
        return 0.0
    XT = xt[:d * nw].reshape(d, nw)  # the features of the first nw points, transposed
    for k in range(d):
        for i in range(nw):
            XT[k, i] = X[b, i, k]
    if metric == 2:
        _sqnorms(X[b, :nw], nrm)
    M = 0.0
    mirror = nw <= _MIRROR_MAX_N
    if not mirror:  # large: M from the pruned triangle, then every distance once, in tiles
        if kernel == 0:
            M = _max_valid_distance(X, valid, b, nw, metric, nrm)
        for r in range(4):
            for j in range(nw):
                G4[r, j] = 0.0
        _fill_tiled(X, valid, b, nw, metric, kernel, scale, M, XT, nrm, W, mq, G4)
    else:
        # small problems (in cache): the upper triangle's distances row by row (j >= i, vectorised over j;
        # _tile_row's arithmetic written out: a call per row made the CREST step 10% slower), packed
        # row after row, the largest valid one (max-minus's M) taken on the way; then the kernel over
        # the whole packed triangle in one loop (rows of about 60 points, the CREST step's, ran most of a
        # vectorised loop per row in its scalar tail), written and mirrored into both triangles
        tri = 0
        for i in range(nw):
            vi = valid[b, i]
            m = nw - i
            for q in range(m):
                row[q] = 0.0
            if vi:
                if metric == 2:
                    for k in range(d):
                        xi = X[b, i, k]
                        for q in range(m):
                            row[q] += XT[k, i + q] * xi
                    ni = nrm[i]
                    for q in range(m):
                        row[q] = _cosine_distance(row[q], nrm[i + q], ni)
                else:
                    for k in range(d):
                        xi = X[b, i, k]
                        for q in range(m):
                            df = XT[k, i + q] - xi
                            row[q] += df * df
                    if metric == 0:
                        for q in range(m):
                            row[q] = math.sqrt(row[q])
                row[0] = 0.0
                if kernel == 0:
                    for q in range(m):
                        if valid[b, i + q] and row[q] > M:
                            M = row[q]
            dst = pk[tri:tri + m]  # a view: indices LLVM knows are >= 0 (pk[tri + q] compiled to scatters)
            for q in range(m):
                dst[q] = row[q]
            tri += m
        if kernel == 1:
            for q in range(tri):
                pk[q] = _exp(-pk[q] / scale)
        else:
            for q in range(tri):
                pk[q] = M - pk[q]
        # written through views (row slices): with flat indices such as W[i * nw + i + q], whose sign LLVM
        # cannot tell, Numba's negative-index wraparound made these loops gathers and scatters (1.34x
        # the fill of a 60-point problem with views)
        tri = 0
        for i in range(nw):
            vi = valid[b, i]
            m = nw - i
            src = pk[tri:tri + m]
            vr = valid[b, i:nw]
            Wi = W[i * nw + i:i * nw + nw]
            for q in range(m):
                Wi[q] = src[q] if (vi and vr[q]) else 0.0
            tri += m
        # the lower triangle row by row, each entry read from its mirror above the diagonal (the stores
        # contiguous)
        for i in range(1, nw):
            Wi = W[i * nw:i * nw + i]
            for q in range(i):
                Wi[q] = W[q * nw + i]
    # greedy over the valid candidates js[:nc] (ascending; lazy: the heap's ids, bounds in gs)
    # Columns of problems of _COMPACT_MIN_N points or more are compacted once most of their entries are
    # covered (_column_gain): their gains stay bit for bit the dense ones, and a re-evaluation reads only
    # the live entries. Smaller problems (in cache, few picks) call the block-skipping gain directly.
    cmp = _COMPACT_MIN_N <= nw < _COMPACT_MAX_N
    for j in range(nw):
        cover[j] = 0.0
        live[j] = False
    nc = _valid_indices(valid[b, :nw], js)
    t_done = 0
    if opt != 2 and mirror and nw <= _DENSE_GREEDY_MAX_N:
        t_done = _dense_greedy(W, nw, mq, budget, cover, js, nc, G4, b, out_idx, out_gain)
    elif opt == 1:  # lazy: a max-heap of stale bounds (bound desc, index asc); accept a fresh best
        for q in range(nc):
            j = js[q]
            if mirror:
                gs[q] = _fused_gain(W, j * nw, nw, mq, cover)
            else:  # summed during the fill
                gs[q] = (G4[0, j] + G4[1, j]) + (G4[2, j] + G4[3, j])
            st[j] = 0
        _heapify(gs, js, nc)
        for t in range(budget):
            if nc == 0:
                break
            while True:
                j = js[0]
                if st[j] == t:
                    g = gs[0]
                    nc = _heap_pop(gs, js, nc)
                    break
                if cmp:  # (written out at each call site: an inlined helper cost the CREST step 9 %)
                    g = _column_gain(W, j, nw, mq, cover, live, seg, sv, si, t > 0)
                else:
                    g = _fused_gain(W, j * nw, nw, mq, cover)
                r = _runner_up(gs, js, nc)
                if r < 0 or _better(g, j, gs[r], js[r]):
                    nc = _heap_pop(gs, js, nc)
                    break
                gs[0] = g
                st[j] = t
                _sift_down(gs, js, nc, np.int64(0))
            out_idx[b, t] = j
            out_gain[b, t] = g
            _column_to_cover(W, j, nw, cover, live, seg)
            t_done = t + 1
    else:
        for t in range(budget):
            if nc == 0:
                break
            if opt == 0:  # naive: every remaining candidate's gain at every step
                for q in range(nc):
                    if cmp:
                        gs[q] = _column_gain(W, js[q], nw, mq, cover, live, seg, sv, si, t > 0)
                    else:
                        gs[q] = _fused_gain(W, js[q] * nw, nw, mq, cover)
                p = _first_max(gs, nc)
                g = gs[p]
            else:  # stochastic: the remaining candidates (ascending) at the drawn positions
                p = -1
                g = 0.0
                for q in range(u.shape[2]):
                    pq = _sample_position(u[b, t, q], nc, u32)
                    if p >= 0 and js[pq] == js[p]:
                        continue
                    if cmp:
                        gq = _column_gain(W, js[pq], nw, mq, cover, live, seg, sv, si, t > 0)
                    else:
                        gq = _fused_gain(W, js[pq] * nw, nw, mq, cover)
                    if p < 0 or _better(gq, js[pq], g, js[p]):
                        p, g = pq, gq
            j = js[p]
            nc = _remove_at(js, p, nc)
            out_idx[b, t] = j
            out_gain[b, t] = g
            _column_to_cover(W, j, nw, cover, live, seg)
            t_done = t + 1
    # cluster sizes: each valid point to its most similar pick, the earliest on ties. The picks' rows
    # are read one after the other (contiguous; a later pick takes a point only when strictly more
    # similar), not every pick's entry per point (one cache line per read); the sums run over the points
    # in order, as before. ``row`` and ``st`` are free once the greedy is done. A compacted pick's
    # dropped entries cannot take a point: each was <= the cover of an earlier pick (compaction starts
    # after the first pick, whose column is dense), so a strictly larger value it is not.
    best = row[:nw]
    owner = st[:nw]
    h = nw // 2
    for i in range(nw):
        owner[i] = -1
        best[i] = 0.0
    for t in range(t_done):
        j = out_idx[b, t]
        off = j * nw
        if live[j]:
            for r in range(4):
                a = off + seg[j, r]
                for q in range(seg[j, 4 + r]):
                    i = int(W[a + h + q])
                    v = float(W[a + q])
                    if owner[i] < 0 or v > best[i]:
                        owner[i] = t
                        best[i] = v
            continue
        Wj = W[off:off + nw]
        for i in range(nw):
            v = float(Wj[i])
            if owner[i] < 0 or v > best[i]:
                owner[i] = t
                best[i] = v
    obj = 0.0
    for i in range(nw):
        if valid[b, i] and owner[i] >= 0:
            out_w[b, owner[i]] += 1.0
            obj += best[i]
    return obj


@njit(cache=True, nogil=True)
def _fused_serial(X, valid, budgets, metric, kernel, scale, opt, u, u32, W,
                  out_idx, out_gain, out_w, out_obj):
    B, n, d = X.shape
    mq = n - n % 4
    bufs = _fused_buffers(n, d)
    for b in range(B):
        out_obj[b] = _fused_problem(X, valid, b, mq, budgets[b], metric, kernel, scale, opt, u, u32,
                                    W, bufs, out_idx, out_gain, out_w)


@njit(parallel=True, cache=True, nogil=True)
def _fused_parallel(X, valid, budgets, metric, kernel, scale, opt, u, u32, Ws, nch,
                    out_idx, out_gain, out_w, out_obj):
    """As :func:`_fused_serial`, the problems dealt round-robin to ``nch`` threads, each with its own
    work buffers (``Ws[c]`` is thread c's similarity buffer, allocated by the caller: NumPy asks the kernel
    for huge pages on large arrays, Numba's allocator does not, and a CRAIG class's buffer of 141 MB took
    36,000 page faults at its first touch, about 10 % of B1's CRAIG call)."""
    B, n, d = X.shape
    mq = n - n % 4
    for c in prange(nch):
        W = Ws[c]
        bufs = _fused_buffers(n, d)
        for b in range(c, B, nch):
            out_obj[b] = _fused_problem(X, valid, b, mq, budgets[b], metric, kernel, scale, opt, u, u32,
                                        W, bufs, out_idx, out_gain, out_w)


def facility_batched(X, valid, budgets, metric, kernel, scale, optimizer, u=None):
    """``similarity_batched`` + ``greedy_batched`` + ``assign_batched`` in one call, never forming the
    (B, n, n) similarities: each problem's matrix is built in a work buffer (one per thread), solved and
    weighted there. Returns indices (B, K) int64, gains (B, K), weights (B, K), objectives (B,), floats
    in X's dtype; bit-for-bit what the three kernels return.

    Only the prefix of each problem up to its last valid point is computed (padding at the end costs
    nothing). Serial for small batches; above ``_FUSED_PARALLEL_MIN_WORK`` the problems are split over
    the threads (whole problems per thread, so results do not depend on the thread count).

    Examples
    --------
    The running example with budgets 2 and 1, in one call; the results equal the reference's three
    kernels in a row:

    >>> import numpy as np
    >>> from crestcore import _reference_kernels as ref
    >>> from crestcore.backends._examples import two_problems
    >>> args = (*two_problems(np), "euclidean", "max-minus", 1.0, "lazy")
    >>> idx, gains, weights, objective = out = facility_batched(*args)
    >>> idx.tolist(), weights.tolist(), objective.tolist()
    ([[1, 3], [0, -1]], [[3.0, 1.0], [2.0, 0.0]], [38.0, 5.0])
    >>> all(np.array_equal(a, b) for a, b in zip(out, ref.facility_batched(*args)))
    True
    """
    m, kk = _similarity_codes(metric, kernel)
    opt = _code(_OPTIMIZER_CODE, optimizer, "optimizer")
    X = _features(X, 3)
    if X.dtype not in _FLOATS:
        raise TypeError(f"X must be float32 or float64, got {X.dtype}")
    B, n, d = X.shape
    valid, budgets, K = _batch_args(valid, budgets, B, n)
    if B and int(budgets.min()) < 0:
        raise ValueError("budgets must be >= 0")
    K = max(K, 0)
    out_idx = np.full((B, K), -1, dtype=np.int64)
    out_gain = np.zeros((B, K))
    out_w = np.zeros((B, K))
    out_obj = np.zeros(B)
    if B and n:
        uu, u32 = _prepare_u(u, (B, K), opt)
        X64 = _arr(X, dtype=np.float64)
        sc = float(scale) if kk == 1 else 1.0
        threads = get_num_threads()
        nch = min(threads, B)
        if nch > 1 and B * n * n * (d + 4) >= _FUSED_PARALLEL_MIN_WORK:
            Ws = np.empty((nch, n * n), dtype=X.dtype)  # one similarity buffer a thread, from NumPy (huge pages)
            _fused_parallel(X64, valid, budgets, m, kk, sc, opt, uu, u32, Ws, nch,
                            out_idx, out_gain, out_w, out_obj)
        else:
            _fused_serial(X64, valid, budgets, m, kk, sc, opt, uu, u32, np.empty(n * n, dtype=X.dtype),
                          out_idx, out_gain, out_w, out_obj)
        refuse_nonfinite_gains(bool(np.isfinite(out_gain).all()))
    dt = X.dtype
    return out_idx, out_gain.astype(dt), out_w.astype(dt), out_obj.astype(dt)


# --------------------------------------------------------------------------------------------------
# host kernel: class-stratified subsets by Floyd's algorithm (crestcore.minibatch.draw_subsets)
# --------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _draw_stratified(pool, cls, r_c, draws, out):
    """Group ``pool`` by class (stable counting sort on ``cls``), then for every subset p and class c
    Floyd's algorithm over the class's members with the pre-drawn ``draws[p, off_c + t]`` uniform in
    ``[0, N_c - r_c + t]``; each class block of ``out[p]`` (classes in order, block c has ``r_c[c]``
    entries) is written sorted. The arguments are checked on the way, before any is used as an index:
    returns 0, or 1 (a ``cls`` outside ``[0, C)``), 2 (an ``r_c`` outside ``[0, N_c]``), 3 (a draw
    outside its range)."""
    N = pool.shape[0]
    C = r_c.shape[0]
    P = draws.shape[0]
    start = np.zeros(C + 1, dtype=np.int64)
    for i in range(N):
        c = cls[i]
        if c < 0 or c >= C:
            return 1
        start[c + 1] += 1
    for c in range(C):
        if r_c[c] < 0 or r_c[c] > start[c + 1]:
            return 2
        start[c + 1] += start[c]
    fill = start[:C].copy()
    members = np.empty(N, dtype=np.int64)
    ascending = True
    prev = np.int64(-1)
    for i in range(N):
        # unsigned indices (the classes were checked above, the slots are in [0, N)) and the cursor read and
        # written through a local: the signed form, with its wraparound selects, compiled to a loop 3.3x as
        # slow (185 against 57 us for 60,000 members, 10 classes)
        c = np.uint64(cls[i])
        f = fill[c]
        v = pool[i]
        members[np.uint64(f)] = v
        fill[c] = f + 1
        ascending = ascending and v > prev
        prev = v
    # Floyd's "taken" marks: an ascending pool (members of a class ascend with their position) marks
    # positions in a bitmap and reads them out in order, which sorts the block; any other pool stamps a
    # mark per position and sorts the block by insertion
    big = 0
    for c in range(C):
        big = max(big, start[c + 1] - start[c])
    words = np.zeros((big + 63) // 64 if ascending else 0, dtype=np.uint64)
    mark = np.zeros(0 if ascending else N, dtype=np.int64)  # position -> last (subset, class) stamp
    one = np.uint64(1)
    stamp = 0
    for p in range(P):
        off = 0
        for c in range(C):
            k = r_c[c]
            Nc = start[c + 1] - start[c]
            s0 = start[c]
            stamp += 1
            for t in range(k):
                x = draws[p, off + t]
                if x < 0 or x > Nc - k + t:
                    return 3
                if ascending:
                    if words[x >> 6] & (one << np.uint64(x & 63)):
                        x = Nc - k + t
                    words[x >> 6] |= one << np.uint64(x & 63)
                    continue
                if mark[s0 + x] == stamp:
                    x = Nc - k + t
                mark[s0 + x] = stamp
                v = members[s0 + x]
                q = off + t  # insertion into the sorted block
                while q > off and out[p, q - 1] > v:
                    out[p, q] = out[p, q - 1]
                    q -= 1
                out[p, q] = v
            if ascending:
                q = off
                for w in range((Nc + 63) >> 6):  # the taken positions in ascending order, clearing
                    bits = words[w]
                    if bits:
                        words[w] = 0
                        while bits:
                            out[p, q] = members[s0 + (w << 6) + np.int64(_trailing_zeros(bits))]
                            q += 1
                            bits &= bits - one
            off += k
    return 0


def draw_stratified(pool, cls, r_c, draws):
    """Class-blocked subsets (P, r) from Floyd draws; see :func:`crestcore.minibatch.draw_subsets`.

    ``pool`` (N,) int64 indices, ``cls`` (N,) int64 class position in ``[0, C)`` of each, ``r_c`` (C,)
    slots per class (``r_c[c] <= `` the class's size), ``draws`` (P, r) int64 with
    ``draws[p, off_c + t]`` in ``[0, N_c - r_c + t]``. Host NumPy arrays only, whatever the features'
    library (the draws are made on the host so that every backend gets the same subsets).

    Examples
    --------
    Two subsets of 3 from six examples of two classes, 2 slots for class 0 (examples 0-2) and 1 for
    class 1 (examples 3-5). Row 0 draws positions 0, then 1 in class 0 and 0 in class 1; row 1 draws
    1, then 0 and 2:

    >>> import numpy as np
    >>> from crestcore import _reference_kernels as ref
    >>> pool, cls, r_c = np.arange(6), np.array([0, 0, 0, 1, 1, 1]), np.array([2, 1])
    >>> draws = np.array([[0, 1, 0], [1, 0, 2]])
    >>> draw_stratified(pool, cls, r_c, draws).tolist()
    [[0, 1, 3], [0, 1, 5]]
    >>> ref.draw_stratified(pool, cls, r_c, draws).tolist()
    [[0, 1, 3], [0, 1, 5]]
    """
    pool = _arr(pool, dtype=np.int64)
    cls = _arr(cls, dtype=np.int64)
    r_c = _arr(r_c, dtype=np.int64)
    draws = _arr(draws, dtype=np.int64)
    if pool.ndim != 1 or cls.shape != pool.shape:
        raise ValueError(f"pool and cls must be 1-D of one length, got {pool.shape} and {cls.shape}")
    C = r_c.shape[0]
    if r_c.ndim != 1:
        raise ValueError("r_c must be 1-D with 0 <= r_c[c] <= the size of class c")
    r = int(r_c.sum())
    if draws.ndim != 2 or draws.shape[1] != r:
        raise ValueError(f"draws must be (P, {r}), got {draws.shape}")
    out = np.empty(draws.shape, dtype=np.int64)
    err = _draw_stratified(pool, cls, r_c, draws, out)  # checks the values in its own passes
    if err == 1:
        raise ValueError(f"cls must hold class positions in [0, {C})")
    if err == 2:
        raise ValueError("r_c must be 1-D with 0 <= r_c[c] <= the size of class c")
    if err == 3:
        raise ValueError("draws[p, off_c + t] must lie in [0, N_c - r_c + t]")
    return out


# --------------------------------------------------------------------------------------------------
# host kernels: the features' check and the labels' class counts, one pass each
# --------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _abs_max_bits(a, mask):
    """The largest ``a[i] & mask`` (unsigned): with ``mask`` clearing the sign bit, the bits of the largest
    ``|x|`` of the floats ``a`` holds (the order of non-negative floats is their bits' order; infinities and
    NaNs have the largest bits). Integer maxima, so the loop vectorises (no NaN rules to keep)."""
    best = mask ^ mask
    for i in range(a.size):
        best = max(best, a[i] & mask)
    return best


_ABS_BITS = {np.dtype(np.float64): (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
             np.dtype(np.float32): (np.uint32, 0x7FFF_FFFF, 0x7F80_0000)}


def finite_abs_max(X):
    """``max |x|`` over every entry of the float32 or float64 array ``X``, as a Python float; ``inf`` when
    an entry is NaN or infinite (and 0.0 for an empty array). One pass over ``X``'s bits (a strided
    array that is neither C- nor Fortran-ordered is copied first).

    Examples
    --------
    >>> import numpy as np
    >>> finite_abs_max(np.array([[1.5, -3.0], [2.0, 0.0]]))
    3.0
    >>> finite_abs_max(np.array([1.0, np.nan], dtype=np.float32))
    inf
    """
    X = np.asarray(X)
    if X.dtype not in _ABS_BITS:
        raise TypeError(f"X must be float32 or float64, got {X.dtype}")
    uint, mask, inf_bits = _ABS_BITS[X.dtype]
    flat = X.ravel(order="K")  # a view of a C- or Fortran-ordered array; other layouts are copied
    bits = int(_abs_max_bits(flat.view(uint), uint(mask)))
    if bits >= inf_bits:
        return math.inf
    return float(np.array(bits, dtype=uint).view(X.dtype))


@njit(cache=True, nogil=True)
def _class_counts(labels, limit):
    lo = labels[0]
    hi = labels[0]
    for i in range(labels.size):  # vectorised min and max
        v = labels[i]
        lo = min(lo, v)
        hi = max(hi, v)
    if lo < 0 or hi >= limit:
        return np.zeros(0, dtype=np.int64)
    counts = np.zeros(hi + 1, dtype=np.int64)
    for i in range(labels.size):
        counts[labels[i]] += 1
    return counts


def class_counts(labels, limit):
    """``np.bincount(labels)`` (int64, ``max(labels) + 1`` entries) when every label of the 1-D integer
    array lies in ``[0, limit)``, else an empty int64 array (the caller then sorts). A pass for the range and
    one for the counts (``np.bincount`` makes three, about 2.7x the time at 60,000 labels).

    Examples
    --------
    >>> import numpy as np
    >>> class_counts(np.array([2, 0, 2, 3]), 10).tolist()
    [1, 0, 2, 1]
    >>> class_counts(np.array([2, -1]), 10).tolist(), class_counts(np.array([12]), 10).tolist()
    ([], [])
    """
    raw = np.asarray(labels)
    if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {raw.shape}, dtype {raw.dtype}")
    if raw.size == 0:
        return np.zeros(0, dtype=np.int64)
    return _class_counts(_arr(raw, dtype=np.int64), int(limit))


@njit(cache=True, nogil=True)
def _order_scores(G, sx, sy, cols, offsets, metric, use_exp, bound, scale, tol, obj, w, g):
    """Per row and pick list one pass along the order, keeping the running best similarity, the gain
    increments and the first argmax (serial: in this loop a parallel region measured slower per element
    than the serial code, and GreeDi's workers run one thread each).

    The distance's pre-image ``e`` (the snapped squared distance, or the snapped cosine distance) is formed
    for every element by the reference's formula; the similarity (sqrt, then the kernel) only when ``e``
    is below the smallest ``e`` seen so far in the row. The similarity is a non-increasing function of
    ``e``, so that is necessary for a new best, and the record test itself (``s > best``) is made on the
    similarity, exactly as the reference makes it: the same picks win ties, and the increments are the
    reference's values."""
    n = G.shape[0]
    nq = offsets.shape[0] - 1
    for i in range(n):
        for q in range(nq):
            a = offsets[q]
            b = offsets[q + 1]
            if a == b:
                continue
            run = 0.0
            arg = a
            low = np.inf
            for j in range(a, b):
                c = cols[j]
                if metric == 2:  # cosine: G holds the unit rows' products
                    e = 1.0 - G[i, c]
                    if e < 0.0:
                        e = 0.0
                    elif e > 2.0:
                        e = 2.0
                    if e <= tol:
                        e = 0.0
                else:
                    ss = sx[i] + sy[c]
                    e = ss - 2.0 * G[i, c]
                    if e <= tol * ss:
                        e = 0.0
                if e >= low:
                    continue
                low = e
                dij = math.sqrt(e) if metric == 0 else e
                if use_exp:
                    s = _exp(-dij / scale)
                else:
                    s = bound - dij
                    if s < 0.0:
                        s = 0.0
                if s > run:
                    g[j] += s - run
                    run = s
                    arg = j
            w[arg] += 1.0
            obj[q] += run


def order_scores(G, sx, sy, cols, offsets, metric, kernel, bound, scale):
    """Objective, cluster sizes and gains of ordered pick lists, from inner products, in one pass.

    A block of n points against c candidate rows is given by ``G`` (n, c) (``x_i . y_j``; for cosine, of
    the unit-normalised rows), ``sx`` (n,) and ``sy`` (c,) the squared norms (unused for cosine). Pick
    list ``q`` is ``cols[offsets[q]:offsets[q + 1]]`` (columns, greedy order); for each:
    ``objective[q] = sum_i max_j s_ij``, ``weights[j]`` the number of points most similar to pick j
    (ties: the earliest), ``gains[j] = sum_i max(s_ij - max_{l < j} s_il, 0)``, with the distance of
    :func:`crestcore.pairwise_distances` (float64 snap) and ``s = max(bound - D, 0)`` (``"max-minus"``) or
    ``exp(-D / scale)`` (``"exp"``), in float64. The distances are formed element by element while
    scanning (never a distance matrix), and the values are the NumPy reference's
    (:func:`crestcore._reference_kernels.order_scores`) up to the order of the sums. Host NumPy arrays;
    one thread.

    Examples
    --------
    Three points on a line at 0, 1 and 3; the pick lists [point 0, point 2] and [point 1]:

    >>> import numpy as np
    >>> x = np.array([[0.0], [1.0], [3.0]])
    >>> sq = (x * x).ravel()
    >>> obj, w, g = order_scores(x @ x.T, sq, sq, np.array([0, 2, 1]), np.array([0, 2, 3]), "euclidean",
    ...                          "max-minus", 3.0, 1.0)
    >>> obj.tolist(), w.tolist(), g.tolist()
    ([8.0, 6.0], [2.0, 1.0, 3.0], [5.0, 3.0, 6.0])
    """
    G = _arr(G, dtype=np.float64)
    cols = _arr(cols, dtype=np.int64)
    offsets = _arr(offsets, dtype=np.int64)
    metric_code = _code(_METRIC_CODE, metric, "metric")
    if G.ndim != 2:
        raise ValueError(f"G must be 2-D, got shape {G.shape}")
    if metric_code == _METRIC_CODE["cosine"]:
        sx, sy = np.zeros(G.shape[0]), np.zeros(G.shape[1])
    sx = _arr(sx, dtype=np.float64)
    sy = _arr(sy, dtype=np.float64)
    if sx.shape != (G.shape[0],) or sy.shape != (G.shape[1],):
        raise ValueError(f"sx and sy must be ({G.shape[0]},) and ({G.shape[1]},), got {sx.shape} and {sy.shape}")
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != cols.size or \
            (np.diff(offsets) < 0).any():
        raise ValueError("offsets must rise from 0 to len(cols)")
    if cols.size and (cols.min() < 0 or cols.max() >= G.shape[1]):
        raise ValueError(f"cols must hold column indices in [0, {G.shape[1]})")
    use_exp = _code(_KERNEL_CODE, kernel, "kernel") == _KERNEL_CODE["exp"]
    obj = np.zeros(offsets.size - 1)
    w = np.zeros(cols.size)
    g = np.zeros(cols.size)
    tol = snap_tolerance(np.finfo(np.float64).eps)
    _order_scores(G, sx, sy, cols, offsets, metric_code, use_exp, float(bound), float(scale), tol, obj, w, g)
    return obj, w, g


# --------------------------------------------------------------------------------------------------
# public dense kernels: one thread for small batches (see _threads_for)
# --------------------------------------------------------------------------------------------------


def _dense_work(A) -> int:
    shape: tuple = getattr(A, "shape", ())
    return int(shape[0]) * int(shape[1]) * int(shape[1]) if len(shape) == 3 else 0


@functools.wraps(_similarity_batched_impl)
def similarity_batched(X, valid, metric, kernel, scale):
    with _threads_for(_dense_work(X)):
        return _similarity_batched_impl(X, valid, metric, kernel, scale)


@functools.wraps(_greedy_batched_impl)
def greedy_batched(S, valid, budgets, optimizer, u=None):
    with _threads_for(_dense_work(S)):
        idx, gains = _greedy_batched_impl(S, valid, budgets, optimizer, u)
    refuse_nonfinite_gains(bool(np.isfinite(gains).all()))
    return idx, gains


@functools.wraps(_assign_batched_impl)
def assign_batched(S, valid, indices):
    with _threads_for(_dense_work(S)):
        return _assign_batched_impl(S, valid, indices)
