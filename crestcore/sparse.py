"""Facility location on a sparse K-nearest-neighbour similarity (the ``neighbors=`` option).

The dense path needs the n x n similarity (memory O(n^2)); the matrix-free path recomputes it in tiles
(memory O(n d), time O(n^2 d) and more). Here each point ``i`` can only be represented by itself and by
its K nearest neighbours ``N(i)``:

    s_ij = kernel(D_ij)   for j in N(i) or j = i,     s_ij = 0 otherwise,

with the kernel of the dense path: ``max-minus`` uses ``M - D_ij`` with ``M`` the largest distance among
the graph's pairs (the dense path's ``M`` when the graph holds every pair, ``K = n - 1``), ``exp`` uses
``exp(-D_ij / scale)``; ``s_ii`` is ``M`` or 1. ``F(S) = sum_i max_{j in S} s_ij`` is the dense objective
on this similarity, still monotone submodular, so greedy keeps its ``(1 - 1/e)`` guarantee for it.
Memory is O(n K); a lazy greedy step touches only the points the re-evaluated candidates cover.

Weights on the same graph: point ``i`` goes to its most similar pick among ``N(i)`` and itself (the
earliest pick on ties); a point with no pick there is represented by no pick (it adds 0 to ``F``), so the
weights sum to the number of covered points, ``n`` when every point has a pick within its K nearest
neighbours. With ``K = n - 1`` everything equals the dense path.

Which pairs form the graph is the only approximate part: the graph comes from
``crestcore.backends.knn`` (faiss, exact or IVF; NumPy input with the ``[ann]`` extra) or from the exact
tiled search below (any array library, O(n^2 d) time, O(n) memory per row tile), or from the caller
(an (n, K) index array from any kNN library). Distances on the graph's pairs are always recomputed here,
exactly, in the compute dtype: an approximate search can only change which pairs are present.

Kernels (NumPy: ``crestcore.backends.numba_sparse``; others: the reference below, also the test oracle):

``sparse_greedy(nbr, sims, order, indptr, budget, optimizer, u) -> (indices (budget,), gains (budget,))``
``sparse_assign(nbr, sims, picks) -> (weights (k,), objective ())``

``nbr`` (n, K + 1) int64 holds each point's candidates (column 0 the point itself, -1 = none) and
``sims`` (n, K + 1) their similarities (0 where ``nbr`` is -1). ``order`` (E,) lists the flat positions
``i * (K + 1) + q`` of the E present entries sorted by candidate, then by point; candidate j's entries
are ``order[indptr[j]:indptr[j + 1]]``. Greedy, ties and the stochastic sample follow
:mod:`crestcore._reference_kernels`.
"""

from __future__ import annotations

import math
import numbers
import types

import array_api_compat
import numpy as np

from ._compat import device_of, from_numpy, namespace, namespace_name, to_numpy, wide_float
from .backends import check_picks, exact_shift, refuse_nonfinite_gains, snap_tolerance  # the kernel contract
from ._validation import all_finite, check_choice, check_float_matrix, check_int
from ._reference_kernels import _check_draws
from .similarity import METRICS, _distances, prepare

__all__ = [
    "SPARSE_KERNEL_NAMES",
    "check_neighbors",
    "sparse_bytes",
    "graph_bytes",
    "exact_knn",
    "knn_graph",
    "solve_sparse",
    "sparse_greedy",
    "sparse_assign",
]

SPARSE_KERNEL_NAMES = ("sparse_greedy", "sparse_assign")

# elements of one row tile in the exact search and in the edge-distance pass (bounds their memory)
_TILE_ELEMENTS = 1 << 22


def sparse_bytes(n: int, d: int, K: int) -> int:
    """Upper estimate of the sparse path's working memory for one problem of n points, d features, K
    neighbours: the graph, the similarities and their candidate-major order (about 64 bytes per pair),
    plus the graph builder's copies of the features (42 n d: a float64 copy, the column statistics of the
    contract's exact shift, then float32 copies for the search; reviews measured the faiss builder at 26-35
    bytes a feature value and a whole call at 38 (float32 input) and 42 (float64), where 8 had been counted).

    Examples
    --------
    60,000 points with 64 features and 16 neighbours: about 230 MB, where the dense similarity takes
    14.4 GB in float32:

    >>> sparse_bytes(60000, 64, 16)
    227608576
    """
    n, d, K = (check_int(v, name, low=0) for v, name in ((n, "n"), (d, "d"), (K, "K")))
    return 64 * n * (K + 1) + 42 * n * d + (1 << 20)


def graph_bytes(n: int, d: int, K: int) -> int:
    """:func:`sparse_bytes` without its fixed 1 MiB of work buffers: what ``max_dense_bytes`` bounds on the
    sparse path (``64 n (K + 1) + 42 n d``), as on the other paths, whose fixed work buffers come on top of
    the bound too (a six-point problem under a 1,000-byte bound is not refused for them).

    Examples
    --------
    >>> graph_bytes(1000, 64, 6)
    3136000
    """
    return sparse_bytes(n, d, K) - sparse_bytes(0, 0, 0)


def check_neighbors(neighbors, n: int):
    """``neighbors`` as an int K (``1 <= K < n``) or as a host (n, K) int64 index graph (validated).

    Examples
    --------
    >>> import numpy as np
    >>> check_neighbors(2, 6)
    2
    >>> check_neighbors(np.array([[1], [0], [1]], dtype=np.int32), 3).tolist()
    [[1], [0], [1]]
    >>> check_neighbors(6, 6)
    Traceback (most recent call last):
        ...
    ValueError: neighbors=6 must be smaller than the number of points n=6 ...
    """
    if isinstance(neighbors, (bool, np.bool_, str, bytes)):
        raise TypeError("neighbors must be an integer K or an (n, K) integer array of neighbour indices, got "
                        f"{type(neighbors).__name__} {neighbors!r}")
    if isinstance(neighbors, numbers.Integral):
        K = int(neighbors)
        if K < 1:
            raise ValueError(f"neighbors must be >= 1, got {K}")
        if K >= n:
            whole = (f"neighbors={n - 1} is the complete graph, i.e. the dense problem" if n > 1
                     else "a single point has none: leave neighbors out")
            raise ValueError(
                f"neighbors={K} must be smaller than the number of points n={n} (each point has at most n - 1 "
                f"neighbours; {whole})"
            )
        return K
    if isinstance(neighbors, numbers.Number):
        raise TypeError(f"neighbors must be an integer K or an (n, K) integer array, got {neighbors!r}")
    try:
        nbr = np.asarray(to_numpy(neighbors))
    except Exception as exc:  # not an array of any kind
        raise TypeError(
            f"neighbors must be an integer K or an (n, K) integer array of neighbour indices, got "
            f"{type(neighbors).__name__}"
        ) from exc
    if nbr.ndim != 2 or nbr.shape[0] != n or nbr.shape[1] < 1:
        raise ValueError(f"neighbors as an index graph must have shape (n, K) = ({n}, >= 1), got {nbr.shape}")
    if nbr.dtype.kind not in "iu":
        raise TypeError(f"neighbors as an index graph must hold integers, got dtype {nbr.dtype}")
    if nbr.dtype.kind == "u" and nbr.size and int(nbr.max()) >= n:  # before the cast: 2^64 - 1 would wrap to -1
        raise ValueError(f"neighbors must hold indices in [0, {n}) or -1 for 'no neighbour'")
    nbr = nbr.astype(np.int64)
    if nbr.shape[1] >= n:
        raise ValueError(f"neighbors has {nbr.shape[1]} columns; at most n - 1 = {n - 1} neighbours per point")
    if nbr.size and (nbr.min() < -1 or nbr.max() >= n):
        raise ValueError(f"neighbors must hold indices in [0, {n}) or -1 for 'no neighbour'")
    if nbr.size and bool(np.all(nbr == -1)):  # every point alone: the picks would be the lowest indices
        raise ValueError("neighbors holds no edge at all (every entry is -1): a graph search that found no "
                         "neighbours (data with NaN rows, say) would make the selection the first k points")
    rows = np.arange(n, dtype=np.int64)[:, None]
    if np.any(nbr == rows):
        i = int(np.flatnonzero(np.any(nbr == rows, axis=1))[0])
        raise ValueError(
            f"neighbors row {i} lists point {i} itself; pass each point's K nearest *other* points (a kNN query "
            f"of K + 1 returns the point itself first: drop that column)"
        )
    s = np.sort(nbr, axis=1)
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    if np.any(dup):
        i = int(np.flatnonzero(np.any(dup, axis=1))[0])
        raise ValueError(f"neighbors row {i} lists a neighbour twice")
    return nbr


# --------------------------------------------------------------------------------------------------
# the graph
# --------------------------------------------------------------------------------------------------


def _namespace_of(xp, X):
    """``X``'s array-API namespace, after checking that ``xp`` (the library module, e.g. ``numpy`` or ``torch``,
    or its compat namespace) is X's own library."""
    own = namespace(X, names=("X",))
    if xp is own:
        return own
    # a library's own module (numpy, torch, jax, ...) or its compat namespace (jax.numpy); a submodule
    # (numpy.random), a string or None is not one, although its name starts like one
    name = getattr(xp, "__name__", None)
    library = isinstance(xp, types.ModuleType) and name == namespace_name(own)
    known = isinstance(name, str) and any(is_ns(xp) for is_ns in _NAMESPACE_TESTS)
    if not ((library or known) and namespace_name(xp) == namespace_name(own)):
        raise TypeError(f"xp must be the library of X ({namespace_name(own)}), "
                        f"got {getattr(xp, '__name__', None) or type(xp).__name__!r}")
    return own


_NAMESPACE_TESTS = tuple(getattr(array_api_compat, f"is_{lib}_namespace") for lib in (
    "numpy", "torch", "cupy", "jax", "dask", "array_api_strict") if hasattr(array_api_compat, f"is_{lib}_namespace"))


def _graph_rows(X) -> int:
    """X's number of rows, refused below 2 (a point's neighbours are other points)."""
    n = int(X.shape[0])
    if n < 2:
        raise ValueError(f"X has {n} row(s): a neighbour graph needs at least 2 points (K in [1, n - 1])")
    return n


def _first_copies(X) -> np.ndarray | None:
    """For each row of X the index of the first row equal to it (host int64), or None when all rows differ."""
    host = np.ascontiguousarray(to_numpy(X))
    _, first, inverse = np.unique(host, axis=0, return_index=True, return_inverse=True)
    if first.size == host.shape[0]:
        return None
    return first[inverse.reshape(-1)].astype(np.int64)


def exact_knn(xp, X, K: int, metric: str) -> np.ndarray:
    """Exact K nearest other points of every row of X (n, d), as host (n, K) int64, nearest first, ties
    to the lower index. Any array library; tiles of rows, O(n) memory per row, O(n^2 d) time. The distances
    are computed in X's dtype by the Gram form (one matrix product per tile), whose rounding depends on a
    column's position: copies of one row (found on the host first) are therefore given their first copy's
    distance, so that they tie exactly and are listed by index in every library; other ties hold as far
    as the computed distances are equal. float32 X loses neighbours in clusters far tighter than the
    data's extent; pass float64 X for such data.

    Examples
    --------
    Two clusters of three points: each point's two nearest others are the rest of its cluster.

    >>> import numpy as np
    >>> X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [10.0, 10.0], [10.0, 11.0], [12.0, 10.0]])
    >>> exact_knn(np, X, 2, "euclidean").tolist()
    [[1, 2], [0, 2], [0, 1], [4, 5], [3, 5], [3, 4]]
    """
    xp = _namespace_of(xp, X)
    check_float_matrix(xp, X, "X")
    check_choice(metric, "metric", METRICS)
    n = _graph_rows(X)
    K = check_int(K, "K", high=n - 1)
    dev = device_of(X)
    tile = max(1, min(n, _TILE_ELEMENTS // max(n, 1)))
    out = np.empty((n, K), dtype=np.int64)
    cols = xp.arange(n, device=dev)[None, :]
    # the numerics policy's preparation and the Gram form's exact shift once for the whole data set, not
    # per tile (each an O(n d) pass: per tile they cost as much as the tiles' products); the distances are
    # only ranked, so a power-of-two rescaling changes nothing
    first = _first_copies(X)
    X, _, _, _ = prepare(xp, X, metric=metric, kernel=None, scale=1.0)
    if metric != "cosine":
        X = X - exact_shift(xp, X)
    same = None if first is None else from_numpy(first, xp, dev)
    for a in range(0, n, tile):
        b = min(n, a + tile)
        D = _distances(xp, X[a:b, :], X, metric, False, shift=False)
        if same is not None:  # every copy of a row gets its first copy's column: bit-equal, so tied exactly
            D = xp.take(D, same, axis=1)
        rows = xp.arange(a, b, device=dev)[:, None]
        D = xp.where(rows == cols, xp.full_like(D, math.inf), D)
        out[a:b] = _k_smallest(xp, D, K)
    return out


# the K smallest of a row are looked for in chunks of this many positions (a sort of the whole row when
# K chunks would cover it)
_CHUNK = 64


def _k_smallest(xp, D, K: int) -> np.ndarray:
    """Host (rows, K) int64: the positions of each row's K smallest values of ``D`` (rows, n), smallest first,
    ties to the lower position: the first K of a stable argsort, without sorting the row (at n = 20,000,
    K = 10 the sort took four fifths of an exact kNN graph's time).

    The row is cut into chunks of ``_CHUNK`` positions; the K chunks with the smallest (minimum, chunk) pairs
    hold the row's K smallest (value, position) pairs (a chunk left out has K chunks before it, each with an
    entry before all of its own), so those ``K * _CHUNK`` candidates, in position order, are sorted stably
    instead of the row. The chunks are chosen by K arg-minimum passes over the chunk minima (the array API's
    argmin returns the first occurrence). Padding past n is +inf, after every real value."""
    rows, n = D.shape
    c = _CHUNK
    if K * c >= n:
        return to_numpy(xp.argsort(D, axis=1, stable=True)[:, :K])
    dev = device_of(D)
    nc = -(-n // c)
    width = nc * c
    if width > n:
        D = xp.concat([D, xp.full((rows, width - n), math.inf, dtype=D.dtype, device=dev)], axis=1)
    mins = xp.min(xp.reshape(D, (rows, nc, c)), axis=2)  # (rows, nc)
    ccols = xp.reshape(xp.arange(nc, device=dev), (1, nc))
    inf = xp.full_like(mins, math.inf)
    chosen = []
    for _ in range(K):
        j = xp.argmin(mins, axis=1)
        chosen.append(j)
        mins = xp.where(ccols == xp.reshape(j, (rows, 1)), inf, mins)
    chunks = xp.sort(xp.stack(chosen, axis=1), axis=1)  # (rows, K), ascending: candidates in position order
    offs = xp.reshape(xp.arange(c, device=dev, dtype=chunks.dtype), (1, 1, c))
    pos = xp.reshape(xp.reshape(chunks, (rows, K, 1)) * c + offs, (rows, K * c))  # positions in the row
    base = xp.reshape(xp.arange(rows, device=dev, dtype=chunks.dtype), (rows, 1))
    vals = xp.reshape(xp.take(xp.reshape(D, (-1,)), xp.reshape(pos + base * width, (-1,)), axis=0), (rows, K * c))
    order = xp.argsort(vals, axis=1, stable=True)[:, :K]
    picked = xp.take(xp.reshape(pos, (-1,)), xp.reshape(order + base * (K * c), (-1,)), axis=0)
    return to_numpy(xp.reshape(picked, (rows, K))).astype(np.int64)


def knn_graph(xp, X, K: int, metric: str, *, force_reference: bool = False) -> tuple[np.ndarray, str]:
    """The (n, K) neighbour graph of X (host int64, -1 = none) and the method that built it: the
    ``crestcore.backends.knn`` builder where one serves X's library, else :func:`exact_knn`.

    Examples
    --------
    ``force_reference=True`` always runs the exact search here (without it, NumPy input goes to faiss
    when it is installed, and the method reads ``"faiss-exact"``):

    >>> import numpy as np
    >>> X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [10.0, 10.0], [10.0, 11.0], [12.0, 10.0]])
    >>> nbr, how = knn_graph(np, X, 1, "euclidean", force_reference=True)
    >>> nbr.tolist(), how
    ([[1], [0], [0], [4], [3], [3]], 'exact')
    """
    xp = _namespace_of(xp, X)
    check_float_matrix(xp, X, "X")
    _graph_rows(X)
    if not force_reference:
        from crestcore.backends import knn_builder

        build = knn_builder(namespace_name(xp), X)
        if build is not None:
            return build(X, K, metric)
    return exact_knn(xp, X, K, metric), "exact"


def _edge_distances(xp, X, nbr: np.ndarray, metric: str):
    """D (n, K) between each row and its graph neighbours, by direct differences in X's dtype (0 where
    ``nbr`` is -1)."""
    n, K = nbr.shape
    d = X.shape[1]
    dev = device_of(X)
    tile = max(1, _TILE_ELEMENTS // max(1, K * d))
    parts = []
    for a in range(0, n, tile):
        b = min(n, a + tile)
        idx = from_numpy(np.maximum(nbr[a:b], 0).reshape(-1), xp, dev)
        Xn = xp.reshape(xp.take(X, idx, axis=0), (b - a, K, d))
        Xi = X[a:b, :][:, None, :]
        if metric == "cosine":
            dot = xp.sum(Xn * Xi, axis=2)
            ni = xp.sum(Xi * Xi, axis=2)
            nn = xp.sum(Xn * Xn, axis=2)
            # the product of the square roots: the squared norms' product overflows (or underflows) for
            # rows near the bounds of the range a cosine leaves unscaled (review 75); parallel rows whose
            # quotient rounds off 1 by an ulp are snapped to 0 below
            den = xp.sqrt(ni) * xp.sqrt(nn)
            ok = den > 0
            cos = xp.where(ok, dot / xp.where(ok, den, xp.ones_like(den)), xp.zeros_like(dot))
            D = xp.clip(1.0 - cos, 0.0, 2.0)
            # the contract's snap (absolute for cosine), as the dense paths: parallel rows at exactly 0
            D = xp.where(D <= snap_tolerance(xp.finfo(X.dtype).eps), xp.zeros_like(D), D)
        else:
            diff = Xn - Xi
            D = xp.sum(diff * diff, axis=2)
            if metric == "euclidean":
                D = xp.sqrt(D)
        parts.append(D)
    D = xp.concat(parts, axis=0) if parts else xp.zeros((0, K), dtype=X.dtype, device=dev)
    present = from_numpy(nbr >= 0, xp, dev)
    return xp.where(present, D, xp.zeros_like(D))


def _similarities(xp, X, nbr: np.ndarray, metric: str, kernel: str, scale: float):
    """(nbr_self, sims) of the (n, K + 1) layout: column 0 is the point itself."""
    n = X.shape[0]
    dev = device_of(X)
    present = from_numpy(nbr >= 0, xp, dev)
    D = _edge_distances(xp, X, nbr, metric)
    if kernel == "max-minus":
        # a graph without edges (one point: a class of one; or a given graph whose rows list only other
        # classes' points, -1 here) keeps the dense path's M = 0, not a unitless 1 that added 1 to the
        # objective per pick whatever the data's scale
        edges = bool(np.any(nbr >= 0))
        M = xp.max(D) if edges else xp.asarray(0.0, dtype=X.dtype, device=dev)
        complete = nbr.shape[1] == n - 1 and bool(np.all(nbr >= 0))
        if edges and not complete:
            # every edge of the graph at distance 0 (each point has K or more exact duplicates): M = 0 would
            # make every similarity 0 and the greedy arbitrary; any positive M keeps "a duplicate covers its
            # point". A complete graph at distance 0 is n identical points, whose dense M is 0: kept (review
            # 87: the sparse path at K = n - 1 reported an objective of n where the dense one, equal to it
            # by contract, reported 0)
            M = xp.where(M > 0, M, xp.ones_like(M))
        S = xp.where(present, M - D, xp.zeros_like(D))
        self_s = xp.zeros((n, 1), dtype=X.dtype, device=dev) + M  # M is a 0-d array
    else:
        S = xp.where(present, xp.exp(-D / scale), xp.zeros_like(D))
        self_s = xp.ones((n, 1), dtype=X.dtype, device=dev)
    nbr_self = np.concatenate([np.arange(n, dtype=np.int64)[:, None], nbr], axis=1)
    return nbr_self, xp.concat([self_s, S], axis=1)


def _candidate_order(nbr_self: np.ndarray):
    """(order, indptr): the present entries' flat positions sorted by candidate, then by point."""
    n, K1 = nbr_self.shape
    flat = nbr_self.reshape(-1)
    pos = np.flatnonzero(flat >= 0)
    # positions are ascending in the point; a stable sort by candidate keeps that order within a column
    order = pos[np.argsort(flat[pos], kind="stable")].astype(np.int64)
    counts = np.bincount(flat[pos], minlength=n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return order, indptr


def solve_sparse(xp, X, nbr: np.ndarray, budget: int, *, metric: str, kernel: str, scale: float,
                 optimizer: str, u, force_reference: bool = False):
    """One problem on its neighbour graph ``nbr`` (host (n, K) int64, local indices, -1 = none).

    Returns local indices (budget,) int64, gains, weights (budget,) and a 0-d objective, in ``xp``.

    Examples
    --------
    Two picks on the 2-nearest-neighbour graph of two clusters: one per cluster, each covering its
    three points:

    >>> import numpy as np
    >>> from array_api_compat import array_namespace
    >>> X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [10.0, 10.0], [10.0, 11.0], [12.0, 10.0]])
    >>> xp = array_namespace(X)  # the namespace the library passes (NumPy's own module on NumPy 2 only)
    >>> nbr = exact_knn(xp, X, 2, "euclidean")
    >>> idx, gains, weights, objective = solve_sparse(xp, X, nbr, 2, metric="euclidean", kernel="max-minus",
    ...                                               scale=1.0, optimizer="lazy", u=None)
    >>> idx.tolist(), weights.tolist(), round(float(objective), 4)
    ([0, 3], [3.0, 3.0], 8.4164)
    """
    nbr_self, sims = _similarities(xp, X, nbr, metric, kernel, scale)
    order, indptr = _candidate_order(nbr_self)
    dev = device_of(X)
    nbr_d = from_numpy(nbr_self, xp, dev)
    order_d = from_numpy(order, xp, dev)
    indptr_d = from_numpy(indptr, xp, dev)
    greedy = _sparse_kernel("sparse_greedy", xp, sims, force_reference)
    idx, gains = greedy(nbr_d, sims, order_d, indptr_d, int(budget), optimizer, u)
    assign = _sparse_kernel("sparse_assign", xp, sims, force_reference)
    weights, objective = assign(nbr_d, sims, idx)
    return idx, gains, weights, objective


def _sparse_kernel(name: str, xp, arr, force_reference: bool):
    if not force_reference:
        from crestcore.backends import get_kernel

        k = get_kernel(name, namespace_name(xp), arr)
        if k is not None:
            return k
    return globals()[name]


# --------------------------------------------------------------------------------------------------
# reference kernels (array API; greedy bookkeeping on the host)
# --------------------------------------------------------------------------------------------------


def _cover(xp, nbr, sims, selected_host):
    """cover_i = max over the picks among point i's candidates of s_ij (0 if none)."""
    dev = device_of(sims)
    sel = from_numpy(selected_host, xp, dev)
    present = nbr >= 0
    is_pick = xp.take(sel, xp.reshape(xp.where(present, nbr, xp.zeros_like(nbr)), (-1,)), axis=0)
    is_pick = xp.reshape(is_pick, nbr.shape) & present
    return xp.max(xp.where(is_pick, sims, xp.zeros_like(sims)), axis=1)


def sparse_greedy(nbr, sims, order, indptr, budget, optimizer, u=None):
    """Reference sparse greedy; ``lazy`` and ``naive`` coincide by construction here (every step
    recomputes every gain, as segment sums over the candidate-major order).

    Examples
    --------
    Three points, one neighbour each (point 0's is 1, point 1's is 0, point 2's is 1), in the layout
    of the module docstring: column 0 of ``nbr`` is the point itself, and the candidate-major order
    lists candidate 0's entries (flat positions 0 and 3), then candidate 1's (1, 2, 5), then
    candidate 2's (4):

    >>> import numpy as np
    >>> nbr = np.array([[0, 1], [1, 0], [2, 1]])
    >>> sims = np.array([[1.0, 0.5], [1.0, 0.5], [1.0, 0.2]])
    >>> order, indptr = np.array([0, 3, 1, 2, 5, 4]), np.array([0, 2, 5, 6])
    >>> idx, gains = sparse_greedy(nbr, sims, order, indptr, 2, "lazy")
    >>> idx.tolist(), gains.round(6).tolist()
    ([1, 2], [1.7, 0.8])

    Stochastic greedy maps each draw to the ``floor(u R)``-th remaining candidate (here one draw per
    step: candidate 2 of 0, 1, 2, then candidate 0 of 0, 1):

    >>> sparse_greedy(nbr, sims, order, indptr, 2, "stochastic", np.array([[0.9], [0.1]]))[0].tolist()
    [2, 0]
    """
    xp = namespace(sims, names=("sims",))
    n, K1 = nbr.shape
    budget = check_picks(budget, n, "budget")  # (review 167: True, 2.7 and budgets above n were taken)
    _check_draws(u, optimizer, (budget,))  # the dense kernels' refusals (review 160: a NaN draw crashed)
    refuse_nonfinite_gains(all_finite(xp, sims))  # (NaN gains were returned: review 160)
    dev = device_of(sims)
    rows = order // K1
    # in float64, as the Numba kernel, which sums each candidate's terms in entry order (float32 in JAX
    # without x64, which has no float64)
    wide = wide_float(xp)
    vals = xp.astype(xp.take(xp.reshape(sims, (-1,)), order, axis=0), wide)
    lo, hi = indptr[:-1], indptr[1:]
    ptr = np.asarray(to_numpy(indptr), dtype=np.int64)  # host copy (indptr may be in the caller's library)
    deg = ptr[1:] - ptr[:-1]
    W = int(deg.max()) if deg.size else 0
    padded = n * W <= max(4 * n * K1, 1 << 20)
    if padded:
        # the candidates' terms laid out (n, W) in entry order, padding 0: a running sum along each row
        # adds them in the Numba kernel's order (exact ties stay exact); unless a hub's degree would
        # make the layout too large, then the difference of two prefix sums over the whole graph
        # (exact ties can then come out an ulp apart)
        slot = np.arange(W, dtype=np.int64)[None, :]
        inside = slot < deg[:, None]
        at = from_numpy(np.where(inside, ptr[:-1, None] + slot, 0).reshape(-1), xp, dev)
        keep = from_numpy(inside, xp, dev)
    selected = np.zeros(n, dtype=bool)
    picks, pick_gains = [], []
    cover = xp.zeros((n,), dtype=wide, device=dev)
    for t in range(int(budget)):
        cands = np.flatnonzero(~selected)
        if cands.size == 0:
            break
        c = xp.maximum(vals - xp.take(cover, rows, axis=0), xp.zeros_like(vals))
        if padded and W:
            terms = xp.where(keep, xp.reshape(xp.take(c, at, axis=0), (n, W)), xp.zeros((), dtype=wide, device=dev))
            g = to_numpy(xp.cumulative_sum(terms, axis=1)[:, -1]).astype(np.float64)
        elif padded:
            g = np.zeros(n)
        else:
            cs = xp.cumulative_sum(c, include_initial=True)
            g = to_numpy(xp.take(cs, hi, axis=0) - xp.take(cs, lo, axis=0)).astype(np.float64)
        if optimizer == "stochastic":
            pos = np.floor(to_numpy(u[t, :]) * cands.size)  # in u's dtype, as the dense path
            cands = np.unique(cands[np.minimum(pos.astype(np.int64), cands.size - 1)])
        best = int(np.argmax(g[cands]))  # cands ascending: the first maximum is the lowest index
        j = int(cands[best])
        picks.append(j)
        pick_gains.append(float(g[j]))
        selected[j] = True
        cover = xp.astype(_cover(xp, nbr, sims, selected), wide)
    idx = np.full(int(budget), -1, dtype=np.int64)
    idx[: len(picks)] = picks
    gains = np.zeros(int(budget))
    gains[: len(picks)] = pick_gains
    return from_numpy(idx, xp, dev), xp.astype(from_numpy(gains, xp, dev), sims.dtype)


def sparse_assign(nbr, sims, picks):
    """Weights (k,) and objective of the picks: each point to its most similar pick among its
    candidates (earliest pick on ties); points with no pick there count for nobody.

    Examples
    --------
    The graph of :func:`sparse_greedy`'s example: points 0 and 1 go to pick 1, point 2 to itself.

    >>> import numpy as np
    >>> nbr = np.array([[0, 1], [1, 0], [2, 1]])
    >>> sims = np.array([[1.0, 0.5], [1.0, 0.5], [1.0, 0.2]])
    >>> weights, objective = sparse_assign(nbr, sims, np.array([1, 2]))
    >>> weights.tolist(), float(objective)
    ([2.0, 1.0], 2.5)
    """
    xp = namespace(sims, names=("sims",))
    n, K1 = nbr.shape
    dev = device_of(sims)
    p = to_numpy(picks).astype(np.int64)
    k = p.size
    rank = np.full(n, k, dtype=np.int64)  # k = "not a pick"
    real = p >= 0
    rank[p[real]] = np.flatnonzero(real)
    nbr_h = to_numpy(nbr)
    r = np.where(nbr_h >= 0, rank[np.maximum(nbr_h, 0)], k)  # (n, K1) pick rank of each candidate
    r_d = from_numpy(r, xp, dev)
    is_pick = r_d < k
    best = xp.max(xp.where(is_pick, sims, xp.full_like(sims, -math.inf)), axis=1)
    covered = xp.any(is_pick, axis=1)
    # the earliest pick among those achieving the best similarity
    hit = is_pick & (sims == best[:, None])
    first = to_numpy(xp.min(xp.where(hit, r_d, xp.full_like(r_d, k)), axis=1))
    weights = np.bincount(first[first < k], minlength=k).astype(np.float64)
    objective = xp.sum(xp.where(covered, best, xp.zeros_like(best)))
    return xp.astype(from_numpy(weights, xp, dev), sims.dtype), objective
