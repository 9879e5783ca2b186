"""Facility location past one machine: GreeDi (Mirzasoleiman et al., NeurIPS 2013) on dask.distributed.

    sel = crestcore.adapters.dask.facility_location(X, k, client=None, partitions=None, seed=0, **options)

1. **Partition** the rows into ``m`` contiguous blocks (the row chunks of a ``dask.array``, or ``m`` equal
   blocks); each block is loaded or scattered to one worker once and stays there. The caller's array is
   never gathered on one process, nor is any n x n block formed.
2. **Local greedy**: each worker runs :func:`crestcore.facility_location` on its block (``**options``:
   metric, kernel, optimizer, epsilon, scale, neighbors, max_dense_bytes, backend), ``k`` picks (per class
   with ``labels``: class c gets its share ``k_c`` of k, the Hamilton split of :func:`facility_location`,
   or the whole class in the block when that is smaller).
3. **Merge**: greedy over the union of the partial solutions (at most ``m k`` rows, which come back with
   the partial solutions), on the process that called.
4. **Choose**: the merged solution and every partial one are evaluated on the common objective
   ``F(S) = sum_{i in V} max_{j in S} s_ij`` over *all* points, with their cluster sizes and gains: each
   worker scores its block with :func:`crestcore.score_orders` (one distance pass over the union of the
   candidates, at most ``m k`` rows, scores them all), and the best is returned (the merged one on ties).
   Per class with labels.

The common objective uses the kernel of the options: ``exp`` as is; ``max-minus`` with ``M`` the
diameter bound ``2 max_i |x_i - mean|`` of the class (``2`` for cosine, squared for sqeuclidean), which
every distance respects, so no similarity is clipped and the comparison between solutions does not
depend on M (``F = n M - sum_i min_j D_ij``); the objective's value does, so it is not the
single-machine objective (which uses the exact largest distance). Weights are cluster sizes over all
points, gains the common objective's increments along the returned order.

Determinism: every random draw (stochastic greedy) comes from ``numpy.random.SeedSequence([seed, p, c])``
for partition ``p`` and class ``c`` (the merge uses ``p = m``), so the result depends on ``seed`` and the
partitioning only, not on which worker ran what or on retries. ``partitions=1`` runs
:func:`crestcore.facility_location` itself on one worker (``rng=seed``): exactly the single-machine result.

GreeDi's guarantee for ``m`` partitions is ``(1 - 1/e)^2 / min(m, k)`` of the optimum in the worst case;
in practice it is close to centralized greedy (docs/benchmarks.md, S4).
"""

from __future__ import annotations

import math
import numbers
import os

import numpy as np

import crestcore
from crestcore.plan import hamilton
from crestcore.validation import check_choice, check_epsilon, check_int, int64_labels, not_floating
from crestcore.facility import BACKENDS, OPTIMIZERS, Selection
from crestcore.similarity import KERNELS, METRICS, kernel_scale, restore

__all__ = ["facility_location"]

_OPTIONS = ("metric", "kernel", "optimizer", "epsilon", "scale", "neighbors", "max_dense_bytes", "backend")


def _check_options(options: dict) -> dict:
    if "rng" in options:
        raise TypeError("rng is not an option here: pass seed= (each partition's draws are derived from it)")
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; the options of crestcore.facility_location passed on are {_OPTIONS}")
    if options.get("metric", "euclidean") not in METRICS:
        raise ValueError(f"metric must be one of {METRICS} here (features are partitioned), got {options['metric']!r}")
    kern = options.get("kernel")
    if kern is not None and kern not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kern!r}")
    nb = options.get("neighbors")
    if nb is not None and (isinstance(nb, bool) or not isinstance(nb, numbers.Integral)):
        raise TypeError("neighbors must be an integer K here (an index graph refers to the whole data set)")
    # the rest of facility_location's choices too, with its checks, here before any chunk is read or sent
    # (review 152: a typo was found on the workers, after every chunk had been computed, with a worker error
    # logged per partition)
    check_choice(options.get("optimizer", "lazy"), "optimizer", OPTIMIZERS + ("auto",))
    check_choice(options.get("backend", "auto"), "backend", BACKENDS)
    check_epsilon(options.get("epsilon", 0.1))
    if options.get("max_dense_bytes") is not None:
        check_int(options["max_dense_bytes"], "max_dense_bytes")
    return options


# --------------------------------------------------------------------------------------------------
# worker tasks (pure functions of their arguments: a retry recomputes the same result)
# --------------------------------------------------------------------------------------------------


def _exponent(a: float) -> int | None:
    """``e`` with ``a = f 2^e``, ``0.5 <= f < 1`` (``np.frexp``), or None for 0."""
    return int(np.frexp(a)[1]) if a > 0.0 else None


def _stats(block, p: int, start: int, labels_p, classes):
    """NaN check (naming the chunk), and per class the row count, the sum of the rows and the exponent
    ``e`` of the class's largest magnitude in the block (None without rows or with zeros only), the sum
    taken at that power-of-two scale ``2^-e``: a plain float64 sum of large finite values overflowed
    (review 69), and one scale for all classes flushed a class far smaller than the largest to zero."""
    B = np.asarray(block)
    if not np.all(np.isfinite(B)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(B), axis=1))[0])
        raise ValueError(f"X: row chunk {p} (rows {start}-{start + B.shape[0] - 1}) contains NaN or infinite "
                         f"values (first at row {start + bad})")
    counts = np.zeros(len(classes), dtype=np.int64)
    sums = np.zeros((len(classes), B.shape[1]))
    exps: list[int | None] = []
    for ci, c in enumerate(classes):
        rows = B[labels_p == c]
        counts[ci] = rows.shape[0]
        e = _exponent(float(np.abs(rows).max())) if rows.size else None
        exps.append(e)
        sums[ci] = np.ldexp(rows.astype(np.float64), -(e or 0)).sum(axis=0)
    return counts, sums, exps


def _for_rows(options: dict, rows: int) -> dict:
    """``options`` for a problem of ``rows`` points: a kNN graph of K neighbours needs K < rows, so K is
    shrunk to ``rows - 1`` on a small block or merge set (as the single-machine path shrinks it per class),
    and a problem of one point is solved densely."""
    K = options.get("neighbors")
    if K is None or K < rows:
        return options
    out = dict(options)
    if rows > 1:
        out["neighbors"] = rows - 1
    else:
        del out["neighbors"]
    return out


def _local(block, p: int, start: int, labels_p, classes, budgets, means, E, metric, seed: int, options):
    """Greedy per class on one block: global picks, their rows, and the class's largest distance from
    its mean within the block (for the common objective's M), in the class's units ``X 2^-E[ci]`` as
    ``means``."""
    B = np.asarray(block)
    out = []
    for ci, c in enumerate(classes):
        idx = np.flatnonzero(labels_p == c)
        r = 0.0
        if idx.size:
            diff = np.ldexp(B[idx].astype(np.float64), -E[ci]) - means[ci]
            top = float(np.abs(diff).max())  # norms of diff / top: no overflow or underflow at any scale
            r = top * float(np.sqrt(((diff / top) ** 2).sum(axis=1).max())) if 0.0 < top < np.inf else top
        kk = int(min(budgets[ci], idx.size))
        if kk == 0:
            out.append((np.zeros(0, dtype=np.int64), np.zeros((0, B.shape[1]), dtype=B.dtype), r))
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed, p, ci]))
        sel = crestcore.facility_location(B[idx], kk, rng=rng, **_for_rows(options, idx.size))
        loc = idx[np.asarray(sel.indices)]
        out.append((start + loc, B[loc].copy(), r))
    return out


def _scores(block, start: int, labels_p, classes, metric, kernel, scale, Ms, E, candidates):
    """For every class: this block's share of every candidate solution's objective, cluster sizes and
    gains along its order (:func:`crestcore.score_orders`: one distance pass over the union of the
    candidates, all of them scored in it). ``candidates`` is (per class the union's rows, per class the
    candidates as orders of those rows). The max-minus kernel's are scored on ``X 2^-E[ci]``, the units
    of the class's bound ``Ms[ci]`` (a bound in X's own units under- or overflowed at extreme scales,
    review 69): objective and gains then come in those units (the driver scales them back). A point of the
    block among the union's rows is at distance 0 from that row (``ids``: its global index; a cosine zero row
    was at distance 1 from itself, review 87)."""
    unions, union_idx, orders = candidates
    B = np.asarray(block)
    scaled = kernel == "max-minus"
    out = []
    for ci, c in enumerate(classes):
        idx = np.flatnonzero(labels_p == c)
        pts, cand = B[idx], unions[ci]
        if scaled:
            pts, cand = np.ldexp(pts.astype(np.float64), -E[ci]), np.ldexp(cand.astype(np.float64), -E[ci])
        out.append(crestcore.score_orders(pts, cand, orders[ci], metric=metric, kernel=kernel,
                                          bound=Ms[ci] if scaled else None, scale=scale,
                                          ids=(start + idx, union_idx[ci])))
    return out


def _single(block, k, labels, seed, options):
    return crestcore.facility_location(np.asarray(block), k, labels=labels, rng=seed, **options)


# --------------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------------


def _equal_blocks(n: int, m: int) -> list[int]:
    """Row counts of ``min(m, n)`` blocks of ``n`` rows as equal as rounding allows."""
    m = min(m, n)
    return np.diff(np.linspace(0, n, m + 1).round().astype(np.int64)).tolist()


class _Blocks:
    """The row blocks on the workers, and one map over them that survives the loss of a worker.

    Dask input is computed block by block on the workers (a lost block is recomputed from its graph).
    NumPy blocks are scattered, and scattered data has no recipe: when the only worker holding a scattered
    block (or a scattered shared argument) dies, dask cancels the tasks that need it. :meth:`map` then
    scatters again what was lost and resubmits (at most ``attempts`` times); every task is a pure function
    of its arguments, so a rerun gives the same result.
    """

    def __init__(self, client, X, partitions, n):
        import dask.array as da

        self.client = client
        if isinstance(X, da.Array):
            if partitions is not None:  # the same equal blocks as for NumPy input
                X = X.rechunk({0: tuple(_equal_blocks(n, int(partitions))), 1: -1})
            else:  # the array's own row blocks, without empty ones
                X = X.rechunk({0: tuple(c for c in X.chunks[0] if c > 0), 1: -1})
            sizes = list(X.chunks[0])
            self.X = None
            self.futures = client.compute(X.to_delayed().ravel().tolist())
        else:
            m = partitions if partitions is not None else max(1, len(client.scheduler_info()["workers"]))
            sizes = _equal_blocks(n, m)
            self.X = X
        self.bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if self.X is not None:
            self.futures = [self._scatter(p) for p in range(len(sizes))]

    def __len__(self) -> int:
        return len(self.futures)

    def _scatter(self, p):
        # hash=False: a fresh key per call (equal blocks scattered by two calls must not share a key that
        # the first call releases)
        return self.client.scatter(self.X[self.bounds[p]:self.bounds[p + 1]], hash=False)

    def map(self, fn, per_block, shared=None, attempts: int = 3):
        """``[fn(block_p, *per_block[p], shared?) for p]`` gathered; ``shared`` (if not None) is scattered
        once and passed last."""
        from distributed.client import FutureCancelledError

        for attempt in range(attempts):
            # not broadcast: a worker that restarts during a broadcast makes dask's replicate fail; the workers
            # fetch the one copy as their tasks need it
            extra = () if shared is None else (self.client.scatter([shared], hash=False)[0],)
            tasks = [self.client.submit(fn, self.futures[p], *per_block[p], *extra) for p in range(len(self))]
            try:
                return self.client.gather(tasks)
            except FutureCancelledError:
                if attempt == attempts - 1 or (self.X is None and shared is None):  # nothing we could scatter again
                    raise
                if self.X is not None:  # scatter again the blocks that went with a worker
                    self.futures = [f if f.status == "finished" else self._scatter(p)
                                    for p, f in enumerate(self.futures)]


def facility_location(X, k, *, labels=None, client=None, partitions=None, seed=0, **options) -> Selection:
    """GreeDi facility location on dask.distributed (see the module docstring).

    Parameters
    ----------
    X : (n, d) NumPy array or ``dask.array`` (chunked by rows, known chunk sizes; e.g.
        ``da.from_array(np.load(path, mmap_mode="r"), chunks=(100_000, -1))``).
    k : number of picks, ``1 <= k <= n``; without labels every partition must hold at least k rows.
    labels : optional (n,) integers (NumPy, or a dask array of O(n) integers, computed): per-class budgets as
        in :func:`crestcore.facility_location`, GreeDi per class.
    client : a ``dask.distributed.Client``; None starts a ``LocalCluster`` of worker processes for this call
        and closes it after.
    partitions : number of partitions m; None: the row chunks of a dask array, or one per worker for NumPy.
    seed : int >= 0, the only source of randomness (stochastic greedy's draws, derived per partition).
    **options : passed to every :func:`crestcore.facility_location` call (``metric``, ``kernel``,
        ``optimizer``, ``epsilon``, ``scale``, ``neighbors`` as an int, ``max_dense_bytes``, ``backend``).

    Returns
    -------
    Selection of NumPy arrays in X's dtype: global indices (per class in ascending label), cluster-size
    weights over all n points, gains and objective on the common objective; ``path`` "greedi" and ``plan``
    what won. With one partition the call is :func:`crestcore.facility_location` itself, its result as it
    returns it: with ``neighbors=K`` its weights then count each point only where a pick is among its K
    neighbours (they sum to fewer than n), while two or more partitions score every point against every pick
    (review 161).

    Examples
    --------
    Two clusters of three points in two partitions (one cluster each), on an in-process cluster of one
    worker; the merged solution wins and takes one pick per cluster (the merge sees only the partial
    solutions, so its picks may differ from the single-machine ones):

    >>> import numpy as np
    >>> from dask.distributed import Client, LocalCluster
    >>> X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [10.0, 10.0], [10.0, 11.0], [12.0, 10.0]])
    >>> cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0")
    >>> client = Client(cluster)
    >>> sel = facility_location(X, 2, client=client, partitions=2)
    >>> one = facility_location(X, 2, client=client, partitions=1)
    >>> client.close(); cluster.close()
    >>> sel.indices.tolist(), sel.weights.tolist(), sel.path
    ([1, 3], [3.0, 3.0], 'greedi')
    >>> sel.plan
    'greedi: 2 partitions; winner: merged'

    With one partition it is the single-machine :func:`crestcore.facility_location`:

    >>> import crestcore
    >>> one.indices.tolist() == crestcore.facility_location(X, 2).indices.tolist()
    True
    """
    try:
        import dask.array as da
        import distributed  # noqa: F401  (the client, the scheduler)
    except ImportError as exc:
        raise ImportError(f"crestcore.adapters.dask needs dask.distributed ({exc}): pip install "
                          "'crestcore[dask]'") from exc

    options = _check_options(dict(options))
    is_dask = isinstance(X, da.Array)
    if not is_dask and not isinstance(X, np.ndarray):
        raise TypeError(f"X must be a NumPy array or a dask.array, got {type(X).__name__}")
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X must be a non-empty 2-D (n, d) array, got shape {X.shape}")
    if is_dask and any(math.isnan(c) for c in X.chunks[0] + X.chunks[1]):
        raise ValueError("X has unknown chunk sizes (e.g. after boolean indexing); call X.compute_chunk_sizes() "
                         "first")
    if X.dtype.kind != "f":
        raise not_floating("X", X.dtype)
    n, d = (int(s) for s in X.shape)
    k = check_int(k, "k", low=1, high=n)
    if options.get("neighbors") is not None:  # as the single-machine call refuses it, whatever the blocks
        check_int(options["neighbors"], "neighbors", low=1, high=n - 1)
    seed = check_int(seed, "seed", low=0)
    if partitions is not None:
        partitions = check_int(partitions, "partitions", low=1, high=n)
    if labels is None:
        lab = np.zeros(n, dtype=np.int64)
    else:
        lab = np.asarray(labels.compute() if isinstance(labels, da.Array) else labels)
        if lab.ndim != 1 or lab.shape[0] != n:
            raise ValueError(f"labels must be 1-D with one label per row of X (n={n}), got shape {lab.shape}")
        if lab.dtype.kind not in "iu":
            raise TypeError(f"labels must have an integer dtype, got {lab.dtype}")
        lab = int64_labels(lab)
    classes, class_sizes = np.unique(lab, return_counts=True)
    budgets = hamilton(k, class_sizes)
    metric = options.get("metric", "euclidean")
    kernel = options.get("kernel") or "max-minus"
    scale = kernel_scale(options.get("scale"), d)

    own = client is None
    cluster = None
    if own:
        from dask.distributed import Client, LocalCluster

        workers = max(1, min(partitions or os.cpu_count() or 1, os.cpu_count() or 1))
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
        client = Client(cluster)
    elif getattr(client, "status", None) in ("closing", "closed"):
        raise ValueError("client is closed: pass an open dask.distributed.Client (or client=None for a local cluster)")
    try:
        blocks = _Blocks(client, X, partitions, n)
        bounds, m = blocks.bounds, len(blocks)
        if m == 1:
            sel = blocks.map(_single, [(k, labels if labels is None else lab, seed, options)])[0]
            return Selection(sel.indices, sel.weights, sel.gains, sel.objective, path=sel.path,
                             plan="greedi: partitions=1, the single-machine facility_location" +
                             (f"; {sel.plan}" if sel.plan else ""))
        if labels is None:
            small = [p for p in range(m) if bounds[p + 1] - bounds[p] < k]
            if small:
                p = small[0]
                raise ValueError(
                    f"k={k} is larger than partition {p} can give (rows {bounds[p]}-{bounds[p + 1] - 1}, "
                    f"{bounds[p + 1] - bounds[p]} rows): every partition must hold at least k rows; use at most "
                    f"{n // k} partitions (partitions=) or larger row chunks"
                )
        labs = [lab[bounds[p]:bounds[p + 1]] for p in range(m)]
        stats = blocks.map(_stats, [(p, int(bounds[p]), labs[p], classes) for p in range(m)])
        counts = sum(s[0] for s in stats)
        # every class in its own units X 2^-E[ci] (E[ci]: the exponent of the class's largest magnitude), its
        # mean from the blocks' sums at their own scales: finite, and the radii and bounds below neither
        # under- nor overflow, whatever the other classes' magnitudes
        E = [max((s[2][ci] for s in stats if s[2][ci] is not None), default=0) for ci in range(len(classes))]
        means = np.stack([sum(np.ldexp(s[1][ci], (E[ci] if s[2][ci] is None else s[2][ci]) - E[ci]) for s in stats)
                          for ci in range(len(classes))]) / np.maximum(counts, 1)[:, None]
        local = blocks.map(_local, [(p, int(bounds[p]), labs[p], classes, budgets, means, E, metric, seed, options)
                                    for p in range(m)])
        # the merge, per class, over the union of the partial solutions (sorted by global index); the
        # candidates are the merged solution and every partial one, as orders of rows of the union
        unions, union_idx, orders, Ms = [], [], [], []
        for ci in range(len(classes)):
            parts = [local[p][ci] for p in range(m)]
            r = max(pp[2] for pp in parts)
            Ms.append({"euclidean": 2.0 * r, "sqeuclidean": 4.0 * r * r, "cosine": 2.0}[metric])
            U = np.concatenate([pp[0] for pp in parts])
            rows = np.concatenate([pp[1] for pp in parts])
            order = np.argsort(U, kind="stable")
            U, rows = U[order], rows[order]
            rng = np.random.default_rng(np.random.SeedSequence([seed, m, ci]))
            if budgets[ci] == 0:
                merged = np.zeros(0, dtype=np.int64)
            else:
                msel = crestcore.facility_location(rows, int(budgets[ci]), rng=rng,
                                                   **_for_rows(options, rows.shape[0]))
                merged = np.asarray(msel.indices).astype(np.int64)
            orders.append([merged] + [np.searchsorted(U, pp[0]) for pp in parts])
            unions.append(rows)
            union_idx.append(U)
        # choose per class on the common objective: every block scores every candidate in one pass
        shares = blocks.map(_scores, [(int(bounds[p]), labs[p], classes, metric, kernel, scale, Ms, E)
                                      for p in range(m)], shared=(unions, union_idx, orders))
    finally:
        if own:
            client.close()
            cluster.close()

    # max-minus values were scored on X 2^-E[ci]: a similarity M - D scales as D (2^E for euclidean, 2^(2E)
    # for squared distances; cosine's are scale-free), exactly, by powers of two
    p_units = {"euclidean": 1, "sqeuclidean": 2, "cosine": 0}[metric] if kernel == "max-minus" else 0
    idx_out, w_out, g_out, total, won = [], [], [], 0.0, []
    for ci in range(len(classes)):
        if budgets[ci] == 0:
            continue
        objs = [sum(shares[p][ci][q][0] for p in range(m)) for q in range(len(orders[ci]))]
        # only solutions of the class's whole budget compete: a partition holding fewer of the class gave fewer
        # picks, and won now and then over a poor merged solution (review 161: 5 picks for k = 6); the merged
        # one always has them all (the union holds at least the budget's members)
        objs = [o if len(orders[ci][q]) == int(budgets[ci]) else -np.inf for q, o in enumerate(objs)]
        best = int(np.argmax(objs))  # the merged solution (0) on ties
        won.append("merged" if best == 0 else f"partition {best - 1}")
        idx_out.append(union_idx[ci][orders[ci][best]])
        w_out.append(sum(shares[p][ci][best][1] for p in range(m)))
        g_out.append(np.ldexp(np.asarray(sum(shares[p][ci][best][2] for p in range(m)), dtype=np.float64),
                              p_units * E[ci]))
        total += float(np.ldexp(objs[best], p_units * E[ci]))
    plan = (f"greedi: {m} partitions; winner per class: " + ", ".join(won) if len(classes) > 1
            else f"greedi: {m} partitions; winner: {won[0]}")
    # in X's dtype, as the one-partition path returns them (a value beyond float16's range is an error)
    return Selection(
        indices=np.concatenate(idx_out).astype(np.int64),
        weights=restore(np, np.concatenate(w_out).astype(np.float64), 0, X.dtype, "weights (cluster sizes)"),
        gains=restore(np, np.concatenate(g_out).astype(np.float64), 0, X.dtype, "gains"),
        objective=restore(np, np.asarray(total, dtype=np.float64), 0, X.dtype, "objective"),
        path="greedi",
        plan=plan,
    )
