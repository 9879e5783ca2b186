"""The kernel contract: what every backend module implements and what the core's reference encodes.

One module that the dispatch (``crestcore.backends``), every backend module and the tests read:

* the kernel names and their parameters (:data:`SIGNATURES`): every backend module that offers a kernel
  offers it under this name with exactly these parameters (``tests/backends/test_contract.py``);
* the distances and similarity transforms (:data:`METRICS`, :data:`KERNELS`): ``"max-minus"`` is
  ``s_ij = M - D_ij`` with ``M`` the largest distance of the problem (so ``s >= 0`` and ``s_ii = M``),
  ``"exp"`` is ``s_ij = exp(-D_ij / scale)``;
* the zero-distance snap (:data:`SNAP_ULPS`, :func:`snap_tolerance`): a distance computed through
  ``|a|^2 + |b|^2 - 2 a.b`` within ``SNAP_ULPS * eps * (|a|^2 + |b|^2)`` of 0 is exactly 0, so identical
  points are at distance 0 on every backend;
* stochastic greedy's sampling rule (:func:`sample_size`): each step looks at
  ``ceil(n / k * ln(1 / epsilon))`` random remaining candidates (at least one, at most n), at positions
  ``floor(u * R)`` of the ``R`` remaining, the product in the draws' dtype (:func:`draw_bits`);
* what the kernels take and refuse (:func:`check_choice`, :func:`check_picks`,
  :func:`refuse_nonfinite_gains`): every kernel checks its choices and counts, pads with -1 the picks of a
  problem whose valid candidates run out, and refuses non-finite gains. They compute without rescaling, so
  they expect what ``crestcore``'s callers give them: finite features of moderate magnitude (scaled by a
  power of two, :func:`crestcore.similarity.prepare`); features near 1e150 or above give non-finite
  similarities (refused), features near 1e-150 or below distances that underflow to 0 (the greedy then
  sees ties everywhere); NaN similarities handed to ``greedy_batched`` are refused by the reference and the
  torch kernel, while the Numba kernels' greedies (naive, lazy and stochastic) may pass over a candidate whose
  gain is NaN and return picks: validate ``S`` before a direct call;
* the capability table (:data:`CAPABILITIES`): per backend, the array library it serves, the floating
  dtypes it computes in, the devices and the kernels it offers. The dispatch maps namespaces to modules
  from it, the docs print it and the tests check every module against it.

Pure Python and NumPy: importing it imports no optional dependency.

Examples
--------
>>> SIGNATURES["greedy_batched"]
('S', 'valid', 'budgets', 'optimizer', 'u')
>>> sample_size(1000, 10, 0.1)
231
>>> CAPABILITIES["torch"].devices
('cpu', 'cuda')
>>> backend_for_namespace("numpy")
'numba'
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

__all__ = [
    "KERNEL_NAMES", "SPARSE_KERNEL_NAMES", "HOST_KERNEL_NAMES", "SIGNATURES", "METRICS", "KERNELS",
    "OPTIMIZERS", "SNAP_ULPS", "snap_tolerance", "exact_shift", "array_api", "sample_sizes", "sample_size",
    "draw_bits",
    "missing_library", "check_choice", "is_choice", "check_picks", "refuse_nonfinite_gains",
    "refuse_draws_outside",
    "Capability", "CAPABILITIES",
    "backend_for_namespace",
]

# dense kernels: every backend module offers these
KERNEL_NAMES = ("similarity_batched", "greedy_batched", "assign_batched", "greedy_features", "facility_batched")
# the sparse neighbour-graph kernels (crestcore.sparse holds their reference); NumPy only for now
SPARSE_KERNEL_NAMES = ("sparse_greedy", "sparse_assign")
# host kernels: host NumPy arrays whatever library the features are in (Numba only; NumPy reference)
HOST_KERNEL_NAMES = ("draw_stratified", "order_scores", "finite_abs_max", "class_counts")

# parameter names, in order, of every kernel (the reference in crestcore/_reference_kernels.py and
# crestcore/sparse.py defines the behaviour)
SIGNATURES: dict[str, tuple[str, ...]] = {
    "similarity_batched": ("X", "valid", "metric", "kernel", "scale"),
    "greedy_batched": ("S", "valid", "budgets", "optimizer", "u"),
    "assign_batched": ("S", "valid", "indices"),
    "greedy_features": ("X", "k", "metric", "kernel", "scale", "optimizer", "u", "tile"),
    "facility_batched": ("X", "valid", "budgets", "metric", "kernel", "scale", "optimizer", "u"),
    "sparse_greedy": ("nbr", "sims", "order", "indptr", "budget", "optimizer", "u"),
    "sparse_assign": ("nbr", "sims", "picks"),
    "draw_stratified": ("pool", "cls", "r_c", "draws"),
    "order_scores": ("G", "sx", "sy", "cols", "offsets", "metric", "kernel", "bound", "scale"),
    "finite_abs_max": ("X",),
    "class_counts": ("labels", "limit"),
}

METRICS = ("euclidean", "sqeuclidean", "cosine")
KERNELS = ("max-minus", "exp")
OPTIMIZERS = ("naive", "lazy", "stochastic")

SNAP_ULPS = 8.0


def snap_tolerance(eps: float) -> float:
    """The relative tolerance under which a distance is snapped to exactly 0, for a dtype with machine
    epsilon ``eps`` (relative to ``|a|^2 + |b|^2``).

    >>> snap_tolerance(2.0 ** -52) == 8 * 2.0 ** -52
    True
    """
    return SNAP_ULPS * float(eps)


def _astype(xp, X, dtype):
    f = getattr(xp, "astype", None)  # (a raw torch namespace has none: the tensor's own .to)
    return f(X, dtype) if f is not None else X.to(dtype)


def _is_floating(xp, X) -> bool:
    isdtype = getattr(xp, "isdtype", None)
    if callable(isdtype):
        return bool(isdtype(X.dtype, "real floating"))
    return bool(getattr(X.dtype, "is_floating_point", False)) or getattr(X.dtype, "kind", "") == "f"


def array_api(xp):
    """NumPy's own module as its array-API namespace (``array_api_compat.numpy``: NumPy before 2.0 has no
    ``bool``, ``astype`` or ``pow``, review 108); any other namespace as it is. For the helpers, here and in
    the core, that take ``xp`` and are called with ``numpy`` itself on host arrays.

    >>> import numpy as np
    >>> array_api(np).__name__
    'array_api_compat.numpy'
    """
    if xp is np:
        import array_api_compat.numpy as xp
    return xp


def exact_shift(xp, X, valid=None):
    """The translation the Gram-form distances take first, shape (..., 1, d): per problem (the leading
    axes of ``X`` (..., n, d); ``valid`` (..., n) marks its rows, default all), a coordinate whose values
    all lie far from 0 (``|s| >= 4 (max - min)``) is shifted by ``s``, the value of the data nearest to
    the coordinate's mean (one of the data's own numbers); every other coordinate by 0. Where it shifts,
    every value lies within a factor 2 of ``s``, so ``X - shift`` is exact (Sterbenz's lemma; integer data
    stays integer, duplicates stay bit-identical, a constant coordinate becomes exactly 0) and every
    point's coordinate gets smaller: ``|a|^2 + |b|^2 - 2 a.b`` then keeps the distances of a cloud far
    from the origin (100 +- 0.01 in float32: computed in place, every distance in it cancelled to the
    zero-distance snap), an outlier does not drag the cloud's shift away from it (as the largest value
    would: a cloud at 1000 +- 1e-3 with one point at 1010), and no point near the origin is moved away
    from it (a mean shift of data with a tight mass at the origin, such as CREST's last-layer gradients of
    well-learned examples, made that mass's distances cancel instead). Euclidean distances do not change
    under a translation; cosine ones do, so it is for ``"euclidean"`` and ``"sqeuclidean"``.

    >>> import numpy as np
    >>> X = np.array([[1000.5, 2.0, 0.1], [1003.25, 2.0, -0.3], [999.0, 2.0, 0.2]])
    >>> exact_shift(np, X).tolist(), (X - exact_shift(np, X)).tolist()
    ([[1000.5, 2.0, 0.0]], [[0.0, 0.0, 0.1], [2.75, 0.0, -0.3], [-1.5, 0.0, 0.2]])
    """
    xp = array_api(xp)
    if X.shape[-2] == 0:
        return xp.zeros_like(X[..., :1, :])
    if not _is_floating(xp, X):  # integers: found in float64 (the shift is a data value, so it is an integer)
        return _astype(xp, exact_shift(xp, _astype(xp, X, xp.float64), valid), X.dtype)
    amax = getattr(xp, "amax", None) or xp.max  # torch.max with an axis returns (values, indices)
    amin = getattr(xp, "amin", None) or xp.min
    # half-precision data is compared in float32 (its sums and ranges overflow float16), the shift is X's own
    Xw = _astype(xp, X, xp.float32) if xp.finfo(X.dtype).bits < 32 else X
    inf, ninf = xp.full_like(Xw, math.inf), xp.full_like(Xw, -math.inf)
    if valid is None:
        v = xp.ones_like(Xw, dtype=xp.bool)
        mean = xp.mean(Xw, axis=-2, keepdims=True)
    else:
        v = xp.broadcast_to(valid[..., None], Xw.shape)
        w = xp.where(v, xp.ones_like(Xw), xp.zeros_like(Xw))
        count = xp.sum(w, axis=-2, keepdims=True)
        mean = xp.sum(Xw * w, axis=-2, keepdims=True) / xp.where(count > 0, count, xp.ones_like(count))
    hi = amax(xp.where(v, Xw, ninf), axis=-2, keepdims=True)
    lo = amin(xp.where(v, Xw, inf), axis=-2, keepdims=True)
    above = amin(xp.where(v & (Xw >= mean), Xw, inf), axis=-2, keepdims=True)  # data values either side
    below = amax(xp.where(v & (Xw <= mean), Xw, ninf), axis=-2, keepdims=True)  # of the mean, nearest it
    use_above = xp.isfinite(above) & (~xp.isfinite(below) | (above - mean <= mean - below))
    s = xp.where(use_above, above, below)
    ok = xp.isfinite(s)  # a data value exists: hi and lo are finite too (a problem without valid rows: no shift)
    s = xp.where(ok, s, xp.zeros_like(s))
    far = ok & (xp.abs(s) >= 4.0 * xp.where(ok, hi - lo, xp.zeros_like(hi)))
    out = xp.where(far, s, xp.zeros_like(s))
    return out if out.dtype == X.dtype else _astype(xp, out, X.dtype)  # a data value of X: exact in its dtype


def sample_sizes(sizes, budgets, epsilon: float) -> np.ndarray:
    """Candidates stochastic greedy looks at per step, per problem: ``ceil(n / k * ln(1 / epsilon))``
    clipped to ``[1, max(n, 1)]`` (Mirzasoleiman et al. 2015, "Lazier than lazy greedy"); int64.

    >>> sample_sizes([5000, 10], [500, 20], 0.1).tolist()
    [24, 2]
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    budgets = np.asarray(budgets, dtype=np.int64)
    s = np.ceil(sizes / np.maximum(budgets, 1) * math.log(1.0 / float(epsilon))).astype(np.int64)
    return np.clip(s, 1, np.maximum(sizes, 1))


def sample_size(n: int, k: int, epsilon: float) -> int:
    """:func:`sample_sizes` for one problem.

    >>> sample_size(5000, 500, 0.1)
    24
    """
    return int(sample_sizes([n], [k], epsilon)[0])


def check_choice(value, name: str, choices) -> None:
    """A ValueError naming the argument and the choices unless ``value`` is one of them (compared only with
    choices whose type it has: an array is refused, not compared elementwise).

    >>> check_choice("lazy", "optimizer", OPTIMIZERS)
    >>> check_choice("greedy", "optimizer", OPTIMIZERS)
    Traceback (most recent call last):
    ...
    ValueError: optimizer must be one of ('naive', 'lazy', 'stochastic'), got 'greedy'
    """
    if not is_choice(value, choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def is_choice(value, choices) -> bool:
    """Whether ``value`` is one of ``choices``, compared only with choices whose type it has (``value in choices``
    compares an array elementwise and fails on its truth value).

    >>> is_choice("lazy", OPTIMIZERS), is_choice(np.array(["lazy", "naive"]), OPTIMIZERS)
    (True, False)
    """
    return any(value is c or (isinstance(value, type(c)) and bool(value == c)) for c in choices)


def check_picks(k, n: int, name: str = "k") -> int:
    """The number of picks ``k`` of a one-problem kernel (``greedy_features``) as an int in ``[0, n]``, else a
    ValueError (a greedy cannot pick more points than it has; the reference picked duplicates).

    >>> check_picks(3, 9)
    3
    >>> check_picks(np.array(3), 9)  # a 0-d integer array (budgets[p]) too
    3
    >>> check_picks(10, 9)
    Traceback (most recent call last):
    ...
    ValueError: k must be in [0, 9], got 10
    """
    try:  # an integer of any library, a 0-d one included; not a bool, nor a one-element array (review 164)
        boolean = isinstance(k, (bool, np.bool_)) or "bool" in str(getattr(k, "dtype", ""))
        value = None if boolean or getattr(k, "ndim", 0) != 0 else operator.index(k)
    except TypeError:
        value = None
    if value is None:
        raise TypeError(f"{name} must be an integer number of picks, got {type(k).__name__} {k!r}")
    if not 0 <= value <= n:
        raise ValueError(f"{name} must be in [0, {n}], got {value}")
    return value


def refuse_nonfinite_gains(finite: bool) -> None:
    """The kernels' answer to non-finite gains (``finite`` False): a ValueError. The kernels compute the
    distances in float64 (the torch and CuPy ones in the features' dtype) without rescaling, so features that
    hold NaN or inf, or whose distances overflow (magnitudes near 1e150 and above in float64), give NaN or
    infinite similarities; ``crestcore``'s own callers validate the features and scale them by a power of two
    first (:func:`crestcore.similarity.prepare`), so this is for direct calls of the kernels. (Features of
    magnitude near 1e-150 and below underflow to zero distances instead: scale them first too.)

    >>> refuse_nonfinite_gains(True)
    >>> refuse_nonfinite_gains(False)
    Traceback (most recent call last):
    ...
    ValueError: the greedy's gains are not finite: the similarities hold NaN or inf (features that do, or ...
    """
    if not finite:
        raise ValueError(
            "the greedy's gains are not finite: the similarities hold NaN or inf (features that do, or whose "
            "distances overflow: the kernels compute without rescaling). Validate the features and scale them "
            "by a power of two first, as crestcore.similarity.prepare does (facility_location and "
            "minibatch_coresets do both)")


def refuse_draws_outside(in_range: bool) -> None:
    """The kernels' answer to stochastic draws outside ``[0, 1]`` or NaN (``in_range`` False): a ValueError (1.0
    is a float32 draw rounded up, which the sampling rule maps to the last candidate).

    >>> refuse_draws_outside(True)
    >>> refuse_draws_outside(False)
    Traceback (most recent call last):
    ...
    ValueError: u must hold uniform draws in [0, 1] (1 in float32 rounding: the last candidate)
    """
    if not in_range:
        raise ValueError("u must hold uniform draws in [0, 1] (1 in float32 rounding: the last candidate)")


def missing_library(owner: str, library: str, extra: str, exc: ImportError) -> ImportError:
    """The ``ImportError`` a backend module ``owner`` raises when its ``library`` does not import: it names
    the extra installing it (the dispatch catches it and uses the reference).

    Examples
    --------
    >>> try:
    ...     import not_a_module_here
    ... except ImportError as exc:
    ...     err = missing_library("crestcore.backends.example", "Nothing", "nothing", exc)
    >>> str(err).split(" (")[0], str(err).rsplit(": ", 1)[1]
    ('crestcore.backends.example needs Nothing, which cannot import here', "pip install 'crestcore[nothing]'")
    """
    return ImportError(f"{owner} needs {library}, which cannot import here ({exc}): pip install 'crestcore[{extra}]'")


# float32 reaches every position floor(u * R) of up to 2^24 remaining candidates (24 significand bits)
FLOAT32_DRAW_LIMIT = 2**24


def draw_bits(feature_bits: int, max_candidates: int) -> int:
    """The width (32 or 64) of stochastic greedy's draws ``u`` and of the products ``u * R`` that map them
    to candidates, for features computed in ``feature_bits`` and problems of at most ``max_candidates``
    points: float64 for float64 features, and for float32 features once a problem has more than 2^24
    points (in float32, ``u`` near 1 is spaced 2^-24, so ``floor(u * R)`` skips positions there and some
    candidates could never be sampled); float32 otherwise.

    >>> draw_bits(32, 60_000), draw_bits(64, 10), draw_bits(32, 2**24), draw_bits(32, 2**24 + 1)
    (32, 64, 32, 64)
    """
    return 64 if int(feature_bits) >= 64 or int(max_candidates) > FLOAT32_DRAW_LIMIT else 32


@dataclass(frozen=True)
class Capability:
    """What one backend module accepts. ``namespace``: the array library it serves (as
    ``crestcore._compat.namespace_name`` reports it); ``module``: its module in ``crestcore.backends``;
    ``dtypes``: the floating dtypes it computes in (others go to the reference); ``devices``; ``kernels``.

    Examples
    --------
    >>> cap = CAPABILITIES["numba_sparse"]
    >>> cap.namespace, cap.dtypes, cap.kernels
    ('numpy', ('float32', 'float64'), ('sparse_greedy', 'sparse_assign'))
    >>> Capability("numpy", "mine", ("float64",), ("cpu",), KERNEL_NAMES).notes
    ''
    """

    namespace: str
    module: str
    dtypes: tuple[str, ...]
    devices: tuple[str, ...]
    kernels: tuple[str, ...]
    notes: str = ""


CAPABILITIES: dict[str, Capability] = {
    "numba": Capability(
        "numpy", "numba", ("float32", "float64"), ("cpu",), KERNEL_NAMES + HOST_KERNEL_NAMES,
        "direct-difference distances up to 192 features (more: the reference's BLAS product, faster on large problems)"),
    "numba_sparse": Capability("numpy", "numba_sparse", ("float32", "float64"), ("cpu",), SPARSE_KERNEL_NAMES),
    "torch": Capability(
        "torch", "torch", ("float32", "float64"), ("cpu", "cuda"), KERNEL_NAMES,
        "float16/bfloat16 and inputs that require grad go to the reference"),
    "cupy": Capability("cupy", "cupy", ("float32", "float64"), ("cuda",), KERNEL_NAMES,
                       "float16 goes to the reference"),
}


def backend_for_namespace(namespace_name: str, sparse: bool = False) -> str | None:
    """The backend module serving an array namespace (its dense or its sparse kernels), or None.

    Examples
    --------
    >>> backend_for_namespace("torch"), backend_for_namespace("numpy", sparse=True)
    ('torch', 'numba_sparse')
    >>> backend_for_namespace("jax") is None  # no native kernels: the generic reference runs
    True
    """
    want = SPARSE_KERNEL_NAMES[0] if sparse else KERNEL_NAMES[0]
    for cap in CAPABILITIES.values():
        if cap.namespace == namespace_name and want in cap.kernels:
            return cap.module
    return None
