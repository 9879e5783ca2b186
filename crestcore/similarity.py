"""Pairwise distances and similarity kernels (generic array-API reference).

Facility location needs non-negative similarities ``s_ij``. They are built from a distance ``D`` with
one of two kernels:

* ``"max-minus"`` (CRAIG, and the paper's (SCS) objective): ``s_ij = max(D) - D_ij``, the maximum taken
  over the pairs of one problem (one class, one random subset, ...);
* ``"exp"`` (the CREST release): ``s_ij = exp(-D_ij / scale)``, ``scale`` defaulting to the number of
  features (the release divides by the number of classes, which is its feature dimension).

Distances (``metric``): ``"euclidean"``, ``"sqeuclidean"`` and ``"cosine"`` (``1 - cos``, a zero vector
has cosine similarity 0 with everything else). The diagonal of a distance matrix is exactly 0, a zero row's
included: every point, a zero row too, is at distance 0 from itself and so covers itself.

The batched functions work on ``B`` problems padded to a common size ``n``: ``valid`` (B, n) marks real
points; padded rows and columns of the similarity are exactly 0, so they add nothing to any objective.

Numerics policy (docs/selection.md), applied at every public entry point before any backend runs:
:func:`compute_dtype` (half precision is upcast to float32; float32 and float64 stay), then
:func:`rescale_exponent` / :func:`pow2_scale` (data whose magnitude could overflow or underflow the
computation is divided by a power of two, which scales every distance exactly and leaves the picks
unchanged), and :func:`restore` to bring gains and objectives back to the input's scale and dtype.
"""

from __future__ import annotations

import math
import numbers

from ._compat import detached, float_errors_quiet, namespace, native_order, to_numpy
from ._validation import all_finite, isdtype, not_floating
from .backends import KERNELS, METRICS, array_api, exact_shift, snap_tolerance  # the kernel contract

__all__ = [
    "METRICS",
    "KERNELS",
    "pairwise_distances",
    "similarity_batched",
    "kernel_scale",
    "compute_dtype",
    "rescale_exponent",
    "pow2_scale",
    "prepare",
    "restore",
]


def compute_dtype(xp, dtype):
    """The dtype distances are computed and accumulated in: float32 for half precision (float16,
    bfloat16) and float32 input, float64 for float64 input.

    Examples
    --------
    >>> import numpy as np
    >>> compute_dtype(np, np.float16), compute_dtype(np, np.float64)
    (<class 'numpy.float32'>, <class 'numpy.float64'>)
    """
    return xp.float32 if int(xp.finfo(dtype).bits) < 32 else dtype


def accumulating(xp, x):
    """``x`` in the dtype sums over it are accumulated in (:func:`compute_dtype`: float32 for float16 and
    bfloat16, else ``x`` itself): a half-precision curvature norm, or a row of 128,256 exponentials, must not
    overflow where its entries do not (review 134)."""
    wide = compute_dtype(xp, x.dtype)
    return x if wide == x.dtype else xp.astype(x, wide)


def _max_exponent(xp, dtype) -> int:
    return math.frexp(float(xp.finfo(dtype).max))[1]  # 128 for float32, 1024 for float64


def rescale_exponent(xp, *arrays, amax: float | None = None) -> int:
    """0 when ``max|A|`` over the (finite) ``arrays`` lies in ``[2^-(R+1), 2^R)`` (``R`` a quarter of the
    dtype's exponent range: 32 for float32, 256 for float64), so squares and Gram sums of the data can
    neither overflow nor underflow; otherwise the ``e`` with ``max|A| = f 2^e``, ``f`` in [0.5, 1).
    Dividing by ``2^e`` (:func:`pow2_scale`) then brings the data into [0.5, 1) exactly.

    Examples
    --------
    >>> import numpy as np
    >>> rescale_exponent(np, np.array([1.0, -3.0], dtype=np.float32))  # a safe range: no rescaling
    0
    >>> rescale_exponent(np, np.array([3e30, 1.0], dtype=np.float32))  # squares would overflow
    102
    """
    present = [a for a in arrays if a is not None]
    if amax is None:  # else the caller measured max|A| already (check_float_matrix returns it)
        amax = max(float(to_numpy(xp.max(xp.abs(a)))) for a in present)  # detached
    if amax == 0.0:
        return 0
    _, e = math.frexp(amax)
    R = _max_exponent(xp, present[0].dtype) // 4
    return 0 if -R <= e <= R else int(e)


def pow2_scale(A, e: int):
    """``A * 2**e``, exact (a power of two) unless the result leaves the dtype's normal range. Applied
    in steps of at most ``2^100`` so that every factor is representable in A's dtype.

    Examples
    --------
    >>> import numpy as np
    >>> pow2_scale(np.array([3.0, 0.5]), -2)
    array([0.75 , 0.125])
    >>> float(pow2_scale(np.array([1.0]), 300)[0]) == 2.0 ** 300
    True
    """
    while e != 0:  # steps of at most 2^100: a normal number in float32 and float64 alike
        step = max(-100, min(100, e))
        A = A * (2.0 ** step)
        e -= step
    return A


def _cosine_rows(xp, A):
    """Cosine's own scaling: every row of ``A`` whose ``max|a|`` lies outside ``[2^-R, 2^R]``
    (:func:`rescale_exponent`'s safe range) times the power of two that brings it to about 1; the
    other rows, zero rows among them, are left exactly as they are. Exact, and a cosine does not depend
    on a row's scale: a row far smaller or larger than the rest keeps its direction instead of having
    its squared norm underflow to 0 (a zero row's similarities) or overflow.

    Examples
    --------
    >>> import numpy as np
    >>> A = np.array([[3 * 2.0 ** -110, 2.0 ** -108], [3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    >>> _cosine_rows(np, A)  # row 0's squared norm would underflow in float32
    array([[0.75, 1.  ],
           [3.  , 4.  ],
           [0.  , 0.  ]], dtype=float32)
    """
    xp = array_api(xp)
    R = _max_exponent(xp, A.dtype) // 4
    a = xp.max(xp.abs(A), axis=-1, keepdims=True)
    out = (a > 0) & ((a < 2.0 ** -R) | (a > 2.0 ** R))
    if not bool(xp.any(out)):
        return A
    e = xp.floor(xp.log2(xp.where(out, a, xp.ones_like(a))))  # 0 where the row stays
    half = xp.floor(e / 2)  # two factors, each representable even for subnormal rows
    return A * xp.pow(2.0, -half) * xp.pow(2.0, half - e)


def prepare(xp, X, *, metric: str, kernel: str | None, scale: float, Y=None, amax: float | None = None):
    """The numerics policy on a (finite, real floating) feature or similarity array.

    Returns ``(Xc, Yc, scale_c, back)``: the data in :func:`compute_dtype`, divided by ``2^e`` when
    :func:`rescale_exponent` asks for it (cosine distances: each row by its own power of two instead,
    :func:`_cosine_rows`); the ``exp`` kernel's scale divided alike (so ``D / scale``,
    hence every similarity, is unchanged); and the power of two by which gains and objectives computed
    on ``Xc`` must be multiplied (:func:`restore`): ``e`` for euclidean distances and for precomputed
    similarities, ``2e`` for squared ones, 0 for cosine distances and for the ``exp`` kernel, whose
    values do not depend on the data's scale. Raises ``ValueError`` naming ``scale`` when the rescaled
    length scale leaves the compute dtype's normal range (every similarity would be 0 or 1).

    Examples
    --------
    Features of magnitude ``2^99`` in float32 would overflow squared distances; they are brought into
    [0.5, 1), and euclidean results must be multiplied back by ``2^100``:

    >>> import numpy as np
    >>> X = np.array([[2.0 ** 99, 0.0], [0.0, 2.0 ** 98]], dtype=np.float32)
    >>> Xc, Yc, scale, back = prepare(np, X, metric="euclidean", kernel=None, scale=1.0)
    >>> Xc, back
    (array([[0.5 , 0.  ],
           [0.  , 0.25]], dtype=float32), 100)
    """
    xp = array_api(xp)
    cd = compute_dtype(xp, X.dtype)
    Xc = X if X.dtype == cd else xp.astype(X, cd)
    Yc = None if Y is None else (Y if Y.dtype == cd else xp.astype(Y, cd))
    if metric == "cosine":  # each row on its own: a cosine does not depend on the rows' scales
        Xc = _cosine_rows(xp, Xc)
        Yc = None if Yc is None else _cosine_rows(xp, Yc)
        return Xc, Yc, (_exp_scale(xp, scale, cd, 0) if kernel == "exp" else scale), 0
    e = rescale_exponent(xp, Xc, Yc, amax=amax if Y is None else None)  # amax: max|X|, if known
    power = {"euclidean": 1, "sqeuclidean": 2, "cosine": 0, "precomputed": 1}[metric]
    if e == 0:
        # the exp kernel's scale checked as a rescaled one is (review 177: a float32 scale of 1e-50 became 0, and
        # the reference and torch kernels blamed the features for the NaN similarities it made)
        return Xc, Yc, (_exp_scale(xp, scale, cd, 0) if kernel == "exp" else scale), 0
    Xc = pow2_scale(Xc, -e)
    Yc = None if Yc is None else pow2_scale(Yc, -e)
    if kernel == "exp":
        return Xc, Yc, _exp_scale(xp, scale, cd, power * e), 0
    return Xc, Yc, scale, power * e


def _exp_scale(xp, scale, cd, shift: int) -> float:
    """The exp kernel's length scale for distances divided by ``2^shift``: ``scale / 2^shift``, which must be
    in the compute dtype's normal range (else every ``exp(-D / scale)`` is exactly 0 or 1, or the scale itself
    rounds to 0 or inf in that dtype): ``ValueError`` naming ``scale`` otherwise."""
    try:
        sc = math.ldexp(float(scale), -shift)
    except OverflowError:  # beyond every float: out of range below, as is a finite value beyond fi.max
        sc = math.inf
    fi = xp.finfo(cd)
    if not (float(fi.smallest_normal) <= sc <= float(fi.max)):
        name = cd.__name__ if isinstance(cd, type) else str(cd)  # (NumPy's compute dtype is a scalar type)
        data = f"for data of magnitude 2^{shift}" if shift else f"in {name}"
        raise ValueError(
            f"scale={scale!r} is out of range {data}: the exp kernel's exp(-D / scale) would be exactly 0 or 1 "
            f"for every pair in {name}; pass a scale comparable to the distances, or rescale the data"
        )
    return sc


def restore(xp, A, back: int, dtype, what: str, *, selection: bool = True):
    """``A * 2**back`` cast to ``dtype`` (the input's); ``ValueError`` naming ``what`` when the value
    does not fit that dtype (instead of a silent ``inf``). ``selection``: ``A`` is a selection's result,
    and the message says that its picks are not affected.

    Examples
    --------
    >>> import numpy as np
    >>> gains = np.array([0.5, 0.25], dtype=np.float32)
    >>> restore(np, gains, 3, np.dtype("float64"), "gains")
    array([4., 2.])
    >>> restore(np, gains, 200, gains.dtype, "gains")
    Traceback (most recent call last):
        ...
    ValueError: computing the gains overflows float32 ...
    """
    dtype = native_order(dtype)  # the input's dtype in the host's byte order
    if back == 0 and A.dtype == dtype:
        return A
    xp = array_api(xp)
    with float_errors_quiet():  # NumPy warns on overflow; it is reported as an error just below
        if back != 0:
            A = pow2_scale(A, back)
        if A.dtype != dtype:
            A = xp.astype(A, dtype)
    if not all_finite(xp, A):
        name = _dtype_name(dtype)
        raise ValueError(
            f"computing the {what} overflows {name} (the values are out of {name}'s range"
            f"{'; the picks are not affected' if selection else ''}): pass the data in a wider dtype, or divide "
            f"it by a power of two"
        )
    return A


def _dtype_name(dtype) -> str:
    """``float16`` for NumPy's ``np.float16`` class as for ``np.dtype('float16')``; any other dtype as it prints."""
    return dtype.__name__ if isinstance(dtype, type) else str(dtype)


def kernel_scale(scale, n_features: int) -> float:
    """The ``exp`` kernel's length scale: ``scale`` if given, else the number of features.

    Examples
    --------
    >>> kernel_scale(None, 10), kernel_scale(2.5, 10)
    (10.0, 2.5)
    """
    if scale is None:
        return float(max(n_features, 1))
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a positive finite number or None, got {scale!r}")
    s = float(scale)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return s


def _sqnorms(xp, X):
    return xp.sum(X * X, axis=-1)


def pairwise_distances(X, Y=None, *, metric: str = "euclidean"):
    """Distances between the rows of ``X`` (..., n, d) and ``Y`` (..., m, d): shape (..., n, m).

    Leading batch dimensions broadcast. With ``Y`` omitted the result is exactly symmetric (each entry
    below the diagonal is its mirror above it) and the diagonal is exactly zero, a zero row's under
    ``"cosine"`` included (the distance of a point to itself). With ``Y`` given no entry is known to pair a
    point with itself: under ``"cosine"`` a zero row is at distance 1 from every row of ``Y``, an equal zero
    row included, so ``pairwise_distances(X, X)`` differs from ``pairwise_distances(X)`` on a zero row's
    diagonal entry.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    >>> pairwise_distances(X)
    array([[0.        , 5.        , 1.        ],
           [5.        , 0.        , 4.24264069],
           [1.        , 4.24264069, 0.        ]])
    >>> pairwise_distances(X, X[:1], metric="sqeuclidean")
    array([[ 0.],
           [25.],
           [ 1.]])
    >>> pairwise_distances(X[1:], metric="cosine").round(4)
    array([[0. , 0.2],
           [0.2, 0. ]])
    """
    X, Y = detached(X), detached(Y)
    xp = namespace(X, Y, names=("X", "Y"))
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    for name, A in (("X", X), ("Y", Y)):
        if A is None:
            continue
        if A.ndim < 2:
            raise ValueError(f"{name} must be at least 2-D (..., n, d), got shape {tuple(A.shape)}")
        if not isdtype(xp, A.dtype, "real floating"):
            raise not_floating(name, A.dtype)
        if 0 in tuple(A.shape):
            raise ValueError(f"{name} is empty (shape {tuple(A.shape)})")
    same = Y is None
    if not same and X.shape[-1] != Y.shape[-1]:
        raise ValueError(f"X has {X.shape[-1]} features but Y has {Y.shape[-1]}")
    for name, A in (("X", X), ("Y", Y)):
        if A is not None and not all_finite(xp, A):
            raise ValueError(f"{name} contains NaN or infinite values")
    if not same and X.dtype != Y.dtype:
        raise TypeError(f"X and Y must have the same dtype, got {X.dtype} and {Y.dtype}")
    dtype = X.dtype
    X, Y, _, back = prepare(xp, X, metric=metric, kernel=None, scale=1.0, Y=Y)
    D = _distances(xp, X, X if same else Y, metric, same)
    return restore(xp, D, back, dtype, "distances", selection=False)


def _gram_distances(xp, G, sx, sy, metric: str, tol: float):
    """Distances from inner products: ``G`` (..., n, m) holds ``x_i . y_j`` (for ``"cosine"``: of the
    unit-normalised rows, and ``sx``, ``sy`` are unused), ``sx`` (..., n) and ``sy`` (..., m) the squared
    norms. A value within ``tol`` (relative to ``|x|^2 + |y|^2``; absolute for cosine) of 0 is exactly 0
    (the contract's snap, :func:`crestcore.backends.contract.snap_tolerance`). The one formula of the
    Gram-form distances: :func:`pairwise_distances` and the ``order_scores`` kernels use it.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[0.0, 0.0], [3.0, 4.0]])
    >>> sq = (X * X).sum(axis=1)
    >>> _gram_distances(np, X @ X.T, sq, sq, "euclidean", 1e-15).tolist()
    [[0.0, 5.0], [5.0, 0.0]]
    """
    if metric == "cosine":
        D = xp.clip(1.0 - G, 0.0, 2.0)
        return xp.where(D <= tol, xp.zeros_like(D), D)
    sx, sy = sx[..., :, None], sy[..., None, :]
    D = sx + sy - 2.0 * G
    D = xp.where(D <= tol * (sx + sy), xp.zeros_like(D), D)
    return xp.sqrt(D) if metric == "euclidean" else D


def _distances(xp, X, Y, metric: str, same: bool, valid=None, shift: bool = True):
    # The Gram-matrix forms below lose up to a few ulps of (|x|^2 + |y|^2) to cancellation; values
    # within that rounding error of 0 are set to exactly 0, so identical points are at distance 0.
    tol = snap_tolerance(xp.finfo(X.dtype).eps)  # the kernel contract's zero-distance snap
    if metric == "cosine":
        nx = xp.sqrt(_sqnorms(xp, X))
        ny = xp.sqrt(_sqnorms(xp, Y))
        nx = xp.where(nx > 0, nx, xp.ones_like(nx))
        ny = xp.where(ny > 0, ny, xp.ones_like(ny))
        cos = xp.matmul(X / nx[..., None], xp.matrix_transpose(Y / ny[..., None]))
        D = _gram_distances(xp, cos, None, None, metric, tol)
    else:
        # both translated by Y's exact shift (the contract's exact_shift) next to the origin: the Gram form
        # keeps the distances of points far from the origin relative to their spread
        if shift:  # (a caller that tiles one data set shifts it once, beforehand: shift=False)
            sh = exact_shift(xp, Y, valid)  # valid: Y's real rows (padded problems), as the fast kernels take it
            X = X - sh
            Y = X if same else Y - sh
        G = xp.matmul(X, xp.matrix_transpose(Y))
        D = _gram_distances(xp, G, _sqnorms(xp, X), _sqnorms(xp, Y), metric, tol)
    if same:
        # exactly symmetric: the matmul may round G[i, j] and G[j, i] differently, so every entry below
        # the diagonal takes its mirror above it (a point's similarity column is then its row, and the
        # fast kernels may read candidates as rows); the diagonal is exactly 0
        n = X.shape[-2]
        ar = xp.arange(n, device=_dev(X))
        D = xp.where(ar[:, None] < ar[None, :], D, xp.matrix_transpose(D))
        D = xp.where(ar[:, None] == ar[None, :], xp.zeros_like(D), D)
    return D


def _dev(x):
    from ._compat import device_of

    return device_of(x)


def similarity_batched(X, valid, metric: str, kernel: str, scale: float):
    """Dense similarities of ``B`` padded problems.

    Parameters
    ----------
    X : (B, n, d) floating array (padded rows may hold anything finite).
    valid : (B, n) bool array.
    metric, kernel : see the module docstring.
    scale : the ``exp`` kernel's length scale (ignored by ``max-minus``).

    Returns
    -------
    S : (B, n, n) array of X's dtype, ``S[b, i, j]`` the similarity of ground point ``i`` to candidate
        ``j``; 0 wherever ``i`` or ``j`` is padding.

    Examples
    --------
    Two problems padded to three points; the second has two real points:

    >>> import numpy as np
    >>> X = np.array([[[0.0], [1.0], [3.0]],
    ...               [[0.0], [2.0], [9.0]]])
    >>> valid = np.array([[True, True, True], [True, True, False]])
    >>> similarity_batched(X, valid, "euclidean", "max-minus", 1.0)
    array([[[3., 2., 0.],
            [2., 3., 1.],
            [0., 1., 3.]],
    <BLANKLINE>
           [[2., 0., 0.],
            [0., 2., 0.],
            [0., 0., 0.]]])
    """
    xp = namespace(X, valid, names=("X", "valid"))
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    D = _distances(xp, X, X, metric, True, valid)  # X is already in the compute dtype and range (prepare)
    pair = valid[:, :, None] & valid[:, None, :]
    zero = xp.zeros_like(D)
    if kernel == "max-minus":
        M = xp.max(xp.where(pair, D, zero), axis=(1, 2))
        S = M[:, None, None] - D
    elif kernel == "exp":
        S = xp.exp(-D / scale)
    else:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return xp.where(pair, S, zero)
