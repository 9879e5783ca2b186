"""K-nearest-neighbour graphs with faiss (the ``[ann]`` extra), for NumPy input.

:func:`build` returns, for each row of X, the indices of its K nearest *other* rows (an (n, K) int64
array, nearest first, -1 where the search found fewer) and the method used. It is what
``crestcore.facility_location(..., neighbors=K)`` calls for NumPy input when faiss imports; the graph
can also be built here once and passed as ``neighbors=`` to several calls.

Methods (``method="auto"`` picks ``exact`` up to ``EXACT_MAX_N`` points, ``ivf`` above where IVF finds
the neighbours: see below):

* ``exact``: ``faiss.IndexFlatL2`` / ``IndexFlatIP`` (cosine on row-normalised data), brute force with
  BLAS, O(n^2 d) time, O(n d) memory.
* ``ivf``: ``faiss.IndexIVFFlat`` with ``nlist = min(n // 39, round(sqrt(n)))`` lists (k-means trained on
  at most ``64 nlist`` rows drawn with ``seed``) and ``nprobe`` lists searched per query (default 8).
  Approximate: a missed neighbour only removes a pair from the similarity (the facility-location
  code recomputes every distance it keeps exactly, in the input's precision). Its recall depends on the
  data: about 1.00 on clustered embeddings, 0.2-0.3 at ``nprobe=8`` on unstructured (uniform or Gaussian)
  data in 64 dimensions. So the recall is measured on ``RECALL_SAMPLE`` points drawn with ``seed``
  against the exact search: ``method="auto"`` doubles ``nprobe`` once when it is below ``RECALL_TARGET``
  and searches exactly when that does not reach it either (more probes cost about what the exact search
  does); ``method="ivf"`` keeps the ``nprobe`` asked for and warns. ``method="auto"`` also searches
  exactly when ``K + 1`` is above a quarter of the points IVF scans a query (``nprobe n / nlist``), where
  rows would come back short; ``method="ivf"`` warns about short rows.

The search runs in float32 (faiss's type) whatever the input dtype; the kept pairs' distances are
recomputed by the caller. Chosen over pynndescent by measurement (docs/benchmarks.md, S4: at
n = 60,000, d = 64 on clustered data faiss IVF built the graph ~30x faster at the same recall). Deterministic for a given
``seed`` and thread count (faiss parallelises with OpenMP: ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import warnings

import numpy as np

from .contract import METRICS, exact_shift

__all__ = ["available", "build", "METHODS", "EXACT_MAX_N"]

METHODS = ("auto", "exact", "ivf")
EXACT_MAX_N = 20_000
RECALL_SAMPLE = 512  # queries whose IVF neighbours are checked against the exact search
RECALL_TARGET = 0.9  # below it, method="auto" searches exactly and method="ivf" warns


def available() -> bool:
    """True when faiss can be imported (without importing it).

    Examples
    --------
    >>> import importlib.util
    >>> available() == (importlib.util.find_spec("faiss") is not None)
    True
    """
    return importlib.util.find_spec("faiss") is not None


def _ties_by_index(D: np.ndarray, I: np.ndarray, similarity: bool) -> np.ndarray:
    """Each row of a search result ``(D, I)`` reordered nearest first and, among equal distances (or
    similarities), lowest index first, as the core's exact search orders them (faiss leaves ties in an
    order of its own: for all-identical points under cosine, highest index first)."""
    key = -D if similarity else D
    o = np.argsort(I, axis=1, kind="stable")
    o = np.take_along_axis(o, np.argsort(np.take_along_axis(key, o, axis=1), axis=1, kind="stable"), axis=1)
    return np.take_along_axis(I, o, axis=1)


def _drop_self(I: np.ndarray, K: int) -> np.ndarray:
    """From a (n, K + 1) result, each row's K neighbours other than the row itself (in order)."""
    n = I.shape[0]
    own = I == np.arange(n, dtype=I.dtype)[:, None]
    missing = ~own.any(axis=1)
    own[missing, K] = True  # the row itself was not returned (duplicates at distance 0): drop the last
    return I[~own].reshape(n, K)


def build(X, K: int, metric: str = "euclidean", *, method: str = "auto", seed: int = 0,
          nprobe: int = 8) -> tuple[np.ndarray, str]:
    """(n, K) int64 neighbour indices of the rows of X (NumPy, (n, d)), and the method used
    ("faiss-exact" or "faiss-ivf").

    Examples
    --------
    Two clusters of three points (needs faiss, the ``[ann]`` extra): each point's two nearest others
    are the rest of its cluster, as the core's exact search finds them:

    >>> import numpy as np
    >>> from crestcore.sparse import exact_knn
    >>> X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [10.0, 10.0], [10.0, 11.0], [12.0, 10.0]])
    >>> nbr, how = build(X, 2)
    >>> nbr.tolist(), how
    ([[1, 2], [0, 2], [0, 1], [4, 5], [3, 5], [3, 4]], 'faiss-exact')
    >>> np.array_equal(nbr, exact_knn(np, X, 2, "euclidean"))
    True

    The graph can be built once and passed to several selections:

    >>> from crestcore import facility_location
    >>> facility_location(X, 2, neighbors=nbr).indices.tolist()
    [0, 3]
    """
    import faiss

    if not isinstance(X, np.ndarray) or X.ndim != 2:
        raise TypeError(f"X must be a 2-D NumPy array, got {type(X).__name__}"
                        + (f" of shape {X.shape}" if isinstance(X, np.ndarray) else ""))
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n, d = X.shape
    for name, value, low in (("K", K, 1), ("nprobe", nprobe, 1), ("seed", seed, 0)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
        if int(value) < low:
            raise ValueError(f"{name} must be >= {low}, got {int(value)}")
    if int(seed) >= 2**31:  # faiss's k-means seed is a C int
        raise ValueError(f"seed must be below 2**31 (faiss's k-means seed), got {int(seed)}")
    K = int(K)
    if not 1 <= K < n:
        raise ValueError(f"K must be in [1, n - 1] = [1, {n - 1}], got {K}")
    if not np.issubdtype(X.dtype, np.floating):
        raise TypeError(f"X must have a real floating dtype, got {X.dtype}")
    if d == 0:
        raise ValueError(f"X is empty (shape {X.shape})")
    if not np.isfinite(X).all():  # a NaN row would leave every point without neighbours (faiss ranks NaN last)
        raise ValueError("X contains NaN or infinite values")
    # faiss works in float32: the rows are brought to a float32-safe range in float64 first (never the
    # caller's buffer). Cosine: unit rows (a row's norm in float32 could overflow or underflow). Euclidean:
    # centred, then divided by a power of two near the largest coordinate: the neighbours of every point
    # are unchanged (translation, and an exact rescaling), and squared distances neither overflow nor
    # underflow float32 whatever the data's scale.
    A64 = np.array(X, dtype=np.float64, copy=True)
    unit = metric == "cosine"
    if unit:
        big = np.max(np.abs(A64), axis=1, keepdims=True)
        A64 /= np.where(big > 0, big, 1.0)  # exact enough: a rescale before the norm, no overflow in it
        nrm = np.sqrt((A64 ** 2).sum(axis=1))
        A64 /= np.where(nrm > 0, nrm, 1.0)[:, None]
        # between unit rows the cosine distance is half the squared euclidean one, so without zero rows
        # (at cosine distance 1 from everything, which no point of the unit sphere is) the neighbours are
        # the euclidean ones of the unit rows, which are centred and rescaled below as any data: directions
        # closer than float32 resolves on the sphere (a spread of 1e-3 about a common direction) kept their
        # neighbourhoods (review 69: the inner-product search found 0.9 % of them)
        unit = bool((nrm > 0).all())
        ftype = faiss.METRIC_INNER_PRODUCT if not unit else faiss.METRIC_L2
    if metric != "cosine" or unit:  # squared and plain euclidean distances order neighbours alike
        # first the contract's exact shift (a constant coordinate becomes exactly 0: its mean alone could
        # leave an ulp of a large value, which swamped every other coordinate), then the mean
        A64 -= exact_shift(np, A64)
        A64 -= A64.mean(axis=0)
        top = float(np.max(np.abs(A64))) if A64.size else 0.0
        if top > 0 and math.isfinite(top):
            A64 *= 2.0 ** -math.frexp(top)[1]
        ftype = faiss.METRIC_L2
    A = np.ascontiguousarray(A64, dtype=np.float32)
    del A64  # only the float32 rows from here (the peak: A, and the index's copy of it)
    auto = method == "auto"
    kq = min(n, K + 1)
    nlist = max(1, min(n // 39, int(round(math.sqrt(n)))))
    if auto:
        # IVF scans about nprobe * n / nlist points a query: with K near that, rows come back short of K
        method = "exact" if n <= EXACT_MAX_N or 4 * kq > min(nlist, int(nprobe)) * n / nlist else "ivf"
    similarity = ftype == faiss.METRIC_INNER_PRODUCT
    if method == "ivf":
        quant = faiss.IndexFlat(d, ftype)
        index = faiss.IndexIVFFlat(quant, d, nlist, ftype)
        index.cp.seed = int(seed)
        rng = np.random.default_rng(seed)
        m = min(n, 64 * nlist)
        train = A if m == n else A[np.sort(rng.choice(n, size=m, replace=False))]
        index.train(train)
        index.add(A)
        # the recall on a sample of queries against the exact search: IVF's recall depends on the data (1.00
        # on clustered embeddings, 0.2-0.3 at nprobe 8 on unstructured data, review 35)
        sample = np.sort(rng.choice(n, size=min(n, RECALL_SAMPLE), replace=False))
        exact_d, _ = faiss.knn(A[sample], A, kq, metric=ftype)  # brute force, no second copy of A
        probes = [min(nlist, int(nprobe))]
        if auto:
            probes += [p for p in (2 * probes[0],) if p <= nlist]
        for probe in probes:
            index.nprobe = probe
            got_d, got_i = index.search(A[sample], kq)
            recall = _recall(exact_d, got_d, got_i, sample, similarity)
            if recall >= RECALL_TARGET:
                break
        if auto and recall < RECALL_TARGET:
            method = "exact"  # IVF with more probes costs about what the exact search does (review 35)
        elif recall < RECALL_TARGET:
            warnings.warn(
                f"the IVF graph's recall on {sample.size} sampled points is {recall:.2f} at nprobe={index.nprobe} "
                f"(nlist={nlist}): the selection sees only that share of each point's {K} nearest neighbours. "
                "Raise nprobe, or use method='exact' (method='auto' does when the recall is below "
                f"{RECALL_TARGET})", UserWarning, stacklevel=2)
        if method == "ivf":
            D, I = index.search(A, kq)
            short = int((I < 0).any(axis=1).sum())
            if short and not auto:
                warnings.warn(f"{short} of {n} rows have fewer than K={K} neighbours: IVF scans about "
                              f"{index.nprobe * n // nlist} points a query; lower K, raise nprobe or use "
                              "method='exact'", UserWarning, stacklevel=2)
    if method == "exact":
        flat = faiss.IndexFlat(d, ftype)
        flat.add(A)
        D, I = flat.search(A, kq)
    I = _ties_by_index(D, I.astype(np.int64), similarity)
    return _drop_self(I, K), f"faiss-{method}"


def _recall(exact_d: np.ndarray, got_d: np.ndarray, got_i: np.ndarray, rows: np.ndarray, similarity: bool) -> float:
    """The share of each sampled point's K neighbours (the (K + 1)-column search less the point itself,
    which every search finds: counted, it made the recall of K = 1 read 0.90 where it was 0.81) that the
    search found among the exact ones, ties included: a found entry counts when it is at least as near as
    the exact search's last (a point at the same distance is as good)."""
    last = exact_d[:, -1:]
    tol = 1e-6 * np.maximum(np.abs(last), 1e-30)  # float32 search: equal distances may differ in the last bit
    near = got_d >= last - tol if similarity else got_d <= last + tol
    K = got_i.shape[1] - 1
    hits = (near & (got_i >= 0) & (got_i != rows[:, None])).sum(axis=1)
    return float(np.minimum(hits, K).sum()) / float(K * got_i.shape[0])
