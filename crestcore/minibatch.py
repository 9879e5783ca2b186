"""The CREST selection step: P random subsets of size r, a mini-batch coreset of m picked from each.

All P (x C) facility-location problems are solved in one batched call (:func:`solve_batched`), not a
Python loop over problems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._compat import detached, device_of, from_numpy, index_dtype, namespace, namespace_name, take_rows, to_numpy
from ._validation import apportion, check_choice, check_epsilon, check_float_matrix, check_int, hamilton
from ._validation import labels_to_host, make_rng
from .backends import get_host_kernel
from .facility import BACKENDS, DENSE_FLOOR_BYTES, OPTIMIZERS, numba_route, resolve_dense_bytes, solve_batched
from .facility import _warn_host_torch, dense_batch_bytes, dense_path, on_host_device, pad_draws
from .facility import _pack, stochastic_draws_ragged
from .similarity import KERNELS, METRICS, compute_dtype, kernel_scale, prepare, restore

CLASS_BUDGETS = ("proportional", "ceil")

__all__ = ["Coresets", "minibatch_coresets", "draw_subsets", "CLASS_BUDGETS"]


@dataclass(frozen=True)
class Coresets:
    """P weighted mini-batch coresets, in the namespace and on the device of the features.

    indices : (P, m') int64 (int32 on JAX without x64) indices into the full dataset (``features`` rows).
        ``m' = m`` except with
        ``class_budget="ceil"``, where ``m' = C * ceil(m / C)`` as in the CREST release; slots a class
        could not fill (fewer examples of it in the subset than its budget) hold -1 with weight 0.
        Within a coreset, picks are grouped by class (ascending label), each class in greedy order.
    weights : (P, m') floating. Cluster sizes within the subset (and the class when per_class): the
        weights of coreset p sum to r, and per class to that class's count in subset p, when m is at
        least the number of classes in the subset. Below it (``class_budget="proportional"``) a class gets
        its one pick with probability ``m n_c / r`` and that pick's weight is its count divided by that
        probability, so the weights sum to r in expectation only, and a class given no pick represents
        nobody.
    gains : (P, m') floating marginal gains.
    objective : (P,) floating facility-location value of each coreset on its subset.
    subsets : (P, r) int64, the random subsets V_p (sorted), indices into the dataset.

    Examples
    --------
    :func:`minibatch_coresets` returns one; ``P`` is the number of coresets:

    >>> import numpy as np
    >>> X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5],
    ...               [10.0, 10.0], [10.0, 11.0], [12.0, 10.0], [11.0, 11.0]])
    >>> c = minibatch_coresets(X, None, m=2, r=4, P=3, rng=0)
    >>> c.P, c.indices.shape, c.subsets.shape
    (3, (3, 2), (3, 4))
    """

    indices: Any
    weights: Any
    gains: Any
    objective: Any
    subsets: Any

    @property
    def P(self) -> int:
        return int(self.indices.shape[0])


def _has_repeats(a: np.ndarray) -> bool:
    """Whether the 1-D int64 array ``a`` holds an index twice: O(n) through ``bincount`` for the usual dense
    non-negative index sets, else a sort."""
    if a.size and a.min() >= 0 and a.max() < 4 * a.size + 1024:
        return bool(np.bincount(a).max() > 1)
    return np.unique(a).size != a.size


def _class_positions(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes, cls, sizes): the sorted distinct labels, each entry's position among them and each
    class's count. O(n) through the ``class_counts`` host kernel for small non-negative labels (the usual
    case; labels that are already ``0..C-1``, every one present, are their own positions: no second pass),
    else a sort."""
    from ._reference_kernels import class_counts

    # one pass fewer than bincount where Numba runs already; the NumPy reference otherwise
    count = get_host_kernel("class_counts", start=False) or class_counts
    counts = count(labels, 4 * labels.size + 1024)
    if counts.size:
        present = counts > 0
        if present.all():
            return np.arange(counts.size), labels.astype(np.int64, copy=False), counts
        lut = np.cumsum(present) - 1
        return np.flatnonzero(present), lut[labels], counts[present]
    classes, cls, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    return classes, cls.reshape(-1).astype(np.int64), sizes


def _count_classes(labels: np.ndarray) -> int:
    """The number of distinct labels of the 1-D int array: O(n) through ``class_counts`` for small
    non-negative labels, else a sort (never a count array as long as the largest label: review 109, ids
    such as 10**11)."""
    from ._reference_kernels import class_counts

    count = get_host_kernel("class_counts", start=False) or class_counts
    counts = count(labels, 4 * labels.size + 1024)
    return int(np.count_nonzero(counts)) if counts.size else int(np.unique(labels).size)


def _positions_in(classes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each entry of ``values`` (all among the sorted distinct ``classes``) as its position in ``classes``:
    a lookup table for small non-negative labels, else a binary search."""
    if classes.size and classes[0] >= 0 and classes[-1] < 4 * max(values.size, classes.size) + 1024:
        lut = np.zeros(int(classes[-1]) + 1, dtype=np.int64)
        lut[classes] = np.arange(classes.size)
        return lut[values]
    return np.searchsorted(classes, values)


_NATIVE_DRAW_CELLS = 1 << 21  # P x r above which the host draw starts Numba (the reference takes about 40 ms there)


def _pool_classes(labels_host: np.ndarray | None, pool: np.ndarray, whole: bool) -> tuple[np.ndarray, np.ndarray]:
    """(cls, sizes): each pool member's class position and each class's count in the pool (one class
    without labels). ``whole``: the pool is ``0..n-1`` of the n labels (no gather of the pool's labels)."""
    if labels_host is None:
        return np.zeros(pool.size, dtype=np.int64), np.array([pool.size], dtype=np.int64)
    _, cls, sizes = _class_positions(labels_host if whole else labels_host[pool])
    return cls, sizes


def _floyd_draws(sizes: np.ndarray, r_c: np.ndarray, rng: np.random.Generator, rows: int) -> np.ndarray:
    """(rows, r) positions for Floyd's algorithm from the next ``rows * r`` uniforms of ``rng``: slot t of
    class c's block uniform in ``[0, N_c - r_c + t]``."""
    r = int(r_c.sum())
    blk = np.repeat(np.arange(sizes.size), r_c)
    t = np.arange(r) - np.repeat(np.cumsum(r_c) - r_c, r_c)
    high = (sizes - r_c)[blk] + t + 1
    return np.minimum(np.floor(rng.random((rows, r)) * high).astype(np.int64), high - 1)


def _draw_rows(pool: np.ndarray, cls: np.ndarray, sizes: np.ndarray, r_c: np.ndarray, rng: np.random.Generator,
               rows: int, native: bool = True) -> np.ndarray:
    """``rows`` class-blocked subsets (rows, r) from the next ``rows * r`` uniforms of ``rng``: row q from
    the q-th r of them alone (so any row can be drawn later from the stream's state, advanced past the rows
    before it: :func:`crestcore.controller` draws a just-in-time selection's rows when their step comes)."""
    draws = _floyd_draws(sizes, r_c, rng, rows)
    # both give the same subsets; the reference is vectorised (two sorts per row, O(P r log r)) and within
    # 2-6x of the kernel, so Numba (a start of 0.5-0.9 s) is started for the draw only when it is large
    kern = get_host_kernel("draw_stratified", start=draws.size > _NATIVE_DRAW_CELLS) if native else None
    if kern is None:
        from ._reference_kernels import draw_stratified

        kern = draw_stratified
    return kern(pool, cls, r_c, draws)


def _draw_blocked(labels_host: np.ndarray | None, pool: np.ndarray, r: int, P: int,
                  rng: np.random.Generator, native: bool = True, whole: bool = False):
    """P class-blocked subsets: ``(blocked (P, r), r_c (C,))``, block c of every row holding the
    ``r_c[c]`` members of the pool's c-th class (ascending label) drawn for that subset, sorted.
    ``whole``: the pool is ``0..n-1`` of the n labels (no gather of the pool's labels)."""
    cls, sizes = _pool_classes(labels_host, pool, whole)
    r_c, _ = apportion(r, sizes, rng)  # class c's expected share of every subset is its share of the pool
    return _draw_rows(pool, cls, sizes, r_c, rng, P, native), r_c


def _class_budgets(m: int, counts: np.ndarray, gen: np.random.Generator | None, rows: np.ndarray):
    """Per-subset class budgets ``(P, C)`` summing to ``m`` (each class's share of its subset, every
    present class at least one pick when ``m`` allows) and, where some present class may go without a
    pick (``m`` below the number of classes present), the probability ``(P, C)`` that each got one, else
    None. ``rows``: the subsets' row numbers. With ``gen`` the leftover picks are drawn
    (:func:`apportion`: every class's expected share is its proportional one); without it
    :func:`hamilton`'s fixed split (the same classes every time)."""
    if gen is None:
        present = int((counts > 0).sum(axis=1).max(initial=0))
        if m < present:  # a fixed split would give the picks to the same classes and reweight nothing (review 109)
            raise TypeError(
                f"rng is required: m ({m}) is below the number of classes in a subset ({present}), so which classes "
                "get a pick is drawn at random, each pick's weight divided by its chance (every class's expected "
                "weight its count); pass rng=, an int seed or a numpy.random.Generator")
        return np.stack([hamilton(m, row) for row in counts]), None
    key = int(gen.integers(2**62))  # row p's rounding from (key, p) alone: a share of the rows rounds alike
    budgets, p = _apportion_rows(m, counts, _RowGenerators(key, rows))
    chance = np.where(budgets > 0, p, 1.0)
    return budgets, (chance if bool(np.any(chance < 1.0)) else None)


class _RowGenerators:
    """Row q's generator ``default_rng([key, rows[q]])``, made when first asked for (most rows of a CREST
    step draw, but making all P up front cost about 10 us a row whether or not they did)."""

    def __init__(self, key: int, rows: np.ndarray):
        self.key, self.rows = key, rows
        self.made: dict[int, np.random.Generator] = {}

    def __getitem__(self, q) -> np.random.Generator:
        g = self.made.get(int(q))
        if g is None:
            g = self.made[int(q)] = np.random.default_rng([self.key, int(self.rows[q])])
        return g


def _apportion_rows(total: int, counts: np.ndarray, gens) -> tuple[np.ndarray, np.ndarray]:
    """:func:`crestcore.plan.apportion` ``(total, counts[p], gens[p], at_least_one=True)`` for every row p
    of ``counts`` (P, C) at once: the same units and probabilities, the same draws from each row's own
    generator in the same order (the order of the groups and the threshold, then, in the rare rows where
    a non-empty group got no unit, the donors one by one as there); the arithmetic is vectorised over
    the rows (a call per row cost about 25 us of Python overhead, a CREST step ten of them)."""
    counts = counts.astype(np.int64)
    P, C = counts.shape
    n = counts.sum(axis=1)  # (P,)
    nz = np.maximum(n, 1)
    prod = int(total) * counts
    units = prod // nz[:, None]
    rem = prod % nz[:, None]
    left = int(total) - units.sum(axis=1)
    p = np.where(units > 0, 1.0, rem / nz[:, None])
    p[n == 0] = 1.0
    units[n == 0] = 0
    draw = np.flatnonzero((n > 0) & (left > 0))
    if draw.size:
        order = np.empty((draw.size, C), dtype=np.int64)
        u = np.empty(draw.size, dtype=np.int64)
        for t, q in enumerate(draw):
            order[t] = gens[q].permutation(C)
            u[t] = int(gens[q].integers(int(n[q])))
        r_o = np.take_along_axis(rem[draw], order, axis=1)
        hi = np.cumsum(r_o, axis=1)
        lo = hi - r_o
        nn = n[draw][:, None]

        def below(x):  # thresholds u, u + n, ... below x (at most one in each group's stretch)
            return np.maximum(0, (x - u[:, None] + nn - 1) // nn)

        add = np.zeros((draw.size, C), dtype=np.int64)
        np.put_along_axis(add, order, below(hi) - below(lo), axis=1)
        units[draw] += add
    nonempty = counts > 0
    fix = (n > 0) & (total >= nonempty.sum(axis=1)) & (nonempty & (units == 0)).any(axis=1)
    for q in np.flatnonzero(fix):  # as apportion's loop, on the row's generator after its draws above
        row = units[q]
        for c in np.flatnonzero(nonempty[q] & (row == 0)):
            most = int(row.max())
            if most <= 1:
                break
            donors = np.flatnonzero(row == most)
            row[donors[int(gens[q].integers(donors.size))]] -= 1
            row[c] += 1
    grant = (n > 0)[:, None] & (total >= nonempty.sum(axis=1))[:, None] & nonempty & (units > 0)
    p = np.where(grant, 1.0, p)
    return units, p


def draw_subsets(labels_host: np.ndarray | None, pool: np.ndarray, r: int, P: int,
                 rng: np.random.Generator | int):
    """P random subsets of size r from ``pool`` (host int array), class-stratified when labels are given.

    Parameters
    ----------
    labels_host : (n,) host integer class of every example (the pool indexes it), or None: plain uniform
        subsets, no stratification.
    pool : (N,) distinct non-negative example indices to draw from.
    r : the size of each subset, ``1 <= r <= N``.
    P : the number of subsets, at least 1.
    rng : a ``numpy.random.Generator`` (advanced by the draw) or an int seed.

    Stratification: class c of the pool gets ``r_c`` slots, its share ``q_c = r n_c / n`` of r rounded down
    or up at random (up with probability ``q_c - floor(q_c)``, :func:`crestcore.plan.apportion`), the same
    in the P subsets of one call: every class's expected share of a subset is its share of the pool (a
    fixed rounding would give the leftover slots to the same classes at every selection); its members
    are drawn uniformly without replacement (Floyd's algorithm, one
    uniform draw per slot from ``rng``, all P subsets in one host kernel). Each subset is sorted.
    Returns (P, r) int64. The draws are made on the host, so the same seed gives the same subsets
    whatever library the features are in.

    Examples
    --------
    Three subsets of 4 from a pool of 8 with two classes of 4: each subset holds 2 of each class.

    >>> import numpy as np
    >>> labels = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    >>> V = draw_subsets(labels, np.arange(8), 4, 3, np.random.default_rng(0))
    >>> V.tolist()
    [[1, 3, 6, 7], [2, 4, 5, 6], [1, 3, 5, 6]]
    >>> (labels[V] == 0).sum(axis=1).tolist()
    [2, 2, 2]
    """
    rng = make_rng(rng)
    raw = np.asarray(pool)
    if raw.size == 0:  # ([] is float64 to NumPy: the empty pool is what is wrong, review 113)
        raise ValueError("pool must be a non-empty 1-D array of integer example indices, got an empty one")
    if not np.issubdtype(raw.dtype, np.integer) or raw.dtype == bool:  # a wrong type: TypeError (review 109)
        raise TypeError(f"pool must be an array of integer example indices, got dtype {raw.dtype}")
    if raw.ndim != 1:
        raise ValueError(f"pool must be a non-empty 1-D array of integer example indices, got shape {raw.shape}")
    pool = raw.astype(np.int64)
    if pool.min() < 0 or _has_repeats(pool):
        raise ValueError("pool must hold distinct non-negative example indices")
    if labels_host is not None:
        lab = np.asarray(labels_host)
        if not np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool:
            raise TypeError(f"labels_host must be an integer array or None, got dtype {lab.dtype}")
        if lab.ndim != 1:
            raise ValueError(f"labels_host must be a 1-D integer array or None, got shape {lab.shape}")
        if pool.max() >= lab.size:
            raise ValueError(f"pool holds index {int(pool.max())}, beyond the {lab.size} labels")
        labels_host = lab
    P = check_int(P, "P", low=1)
    r = check_int(r, "r", low=1, high=pool.size)
    blocked, _ = _draw_blocked(labels_host, pool, r, P, rng)
    return np.sort(blocked, axis=1)


class DenseMemoryError(ValueError):
    """:func:`minibatch_coresets` refused a batched dense solve above ``max_dense_bytes`` (a ``ValueError``
    whose message names what would fit; its own type lets a caller with other knobs, the CREST controller,
    name those instead)."""


def _guard_memory(dtype_bytes: int, B: int, n_max: int, d: int, P: int, per_class: bool, limit: int | None,
                  path: str, xp, features) -> None:
    """Refuse, before allocating, a batched dense solve above ``limit`` bytes (see ``max_dense_bytes``;
    None: the default, read from the available memory only for a solve above its 64 MiB floor), its peak
    on ``path`` by :func:`crestcore.facility.dense_batch_bytes` (the fused Numba kernel holds one matrix per
    thread, not one per problem: review 117 saw it refused at 8.59 GiB where it used 721 MiB)."""
    need = dense_batch_bytes(path, B, n_max, d, dtype_bytes)
    if limit is None:
        if need <= DENSE_FLOOR_BYTES:  # the default is never below the floor
            return
        limit = resolve_dense_bytes(None, xp, features)
    if need <= limit:
        return
    per = -(-B // P)  # problems per coreset, rounded up: a hint that is then refused helps nobody (review 120)
    fit = next((q for q in range(P - 1, 0, -1) if dense_batch_bytes(path, q * per, n_max, d, dtype_bytes) <= limit), 0)
    hint = f"P <= {fit}" if fit >= 1 else "no P fits"
    raise DenseMemoryError(
        f"minibatch_coresets would need {_size(need)} ({B} dense {n_max} x {n_max} similarity "
        f"problems on the {path} path, with its work buffers, plus features) but max_dense_bytes={limit}: "
        f"pass max_dense_bytes >= {need}, a smaller P ({hint}), or solve the P coresets in several calls"
        + ("" if per_class else ", or per_class=True with labels (one smaller problem per class)")
    )


def _size(nbytes: int) -> str:
    """``nbytes`` in the unit that shows it: GiB, MiB or KiB (a need of 3 MiB is not "0.00 GiB")."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if round(nbytes / scale, 2) >= 1.0:  # just under a GiB reads 1.00 GiB, not 1024.00 MiB
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 2**10:.2f} KiB"


def _abs_max(xp, A) -> float:
    """``max|A|`` of a finite array: the host kernel's one pass over a NumPy array's bits where Numba is loaded,
    else one reduction."""
    if isinstance(A, np.ndarray) and A.dtype in (np.float32, np.float64) and A.flags.c_contiguous:
        kern = get_host_kernel("finite_abs_max", start=False)
        if kern is not None:
            return float(kern(A))
    return float(to_numpy(xp.max(xp.abs(A))))


def minibatch_coresets(
    features,
    labels,
    *,
    m: int,
    r: int,
    P: int,
    rng=None,
    per_class: bool = True,
    kernel: str = "max-minus",
    metric: str = "euclidean",
    optimizer: str = "lazy",
    epsilon: float = 0.1,
    class_budget: str = "proportional",
    scale: float | None = None,
    pool=None,
    subsets=None,
    backend: str = "auto",
    max_dense_bytes: int | None = None,
    rows=None,
) -> Coresets:
    """The CREST selection step: ``P`` weighted mini-batch coresets of size ``m``.

    Draws P random subsets V_1..V_P of size r from the pool (class-stratified when ``labels`` is given;
    see :func:`draw_subsets`), then picks m examples from each V_p by facility-location greedy on
    ``features`` (typically last-layer gradients), weighting every pick by its cluster size.

    Parameters
    ----------
    features : (n, d) real floating array (any array-API library).
    labels : (n,) integer array in the same namespace, or None (no stratification, whole-subset problems).
    m, r, P : coreset size, subset size (``m <= r <= pool size``), number of coresets.
    rng : int seed or ``numpy.random.Generator`` (required; the only source of randomness).
    per_class : one problem per class inside each subset (the release's choice) or one per subset.
    kernel, metric, optimizer, epsilon, scale : as for :func:`crestcore.facility_location`.
    class_budget : "proportional" (default: class c's share ``m n_c / r`` of m in its subset, rounded down
        or up at random with ``rng`` (:func:`crestcore.plan.apportion`; :func:`crestcore.plan.hamilton`'s
        fixed split when ``rng`` is None), every class of the subset at least one pick when m allows (taken
        from a class with the most picks, which can leave that one a pick below its rounded-down share), so a
        coreset has exactly m picks; when m is below the number of classes present, a class gets its
        one pick with probability its share and that pick's weight is divided by it, so every class's
        expected weight is its count (this needs ``rng``: None is then refused with a ``TypeError``) or
        "ceil" (the release: ``ceil(m / C)`` per class).
    pool : optional 1-D integer array (host NumPy or features' namespace) of the active example indices
        (e.g. after dropping learned examples); default all n.
    subsets : optional (P, r) integer array of pre-drawn subsets (rows of ``features``, distinct within a
        row; each row is taken sorted, and returned so). Then no subsets are drawn and ``rng`` is only
        needed by the stochastic optimizer. This is how a training loop computes features for the subsets'
        union only and selects on them. With ``pool`` too, every member must be in the pool. Passing a
        call's own ``subsets`` back with the same ``rng`` does not reproduce its coresets exactly: the
        classes' shares of m are rounded at random from the generator after the draw of the subsets (so a
        call that draws them and one that is given them round from different points of the stream;
        ``class_budget="ceil"`` does not round at random).
    backend : "auto", "reference" or "numba", as for :func:`crestcore.facility_location`.
    rows : optional 1-D array of P distinct non-negative integers, with ``subsets``: the rows' numbers in a
        larger set of subsets (default ``0..P-1``). The random rounding of row p's class budgets depends
        only on ``rng`` and p, so solving a share of the rows (one process of several) gives those rows'
        coresets of the call that solves them all, with ``optimizer="lazy"`` or ``"naive"``, up to gains equal
        in exact arithmetic (the rounding of a problem's gains depends on the width its group is padded to,
        that of the largest problem beside it, so such a tie can break another way in a share); not with
        ``"stochastic"``, whose draws are made for all the call's problems at once (they depend on which rows
        the call holds).
    max_dense_bytes : memory guard (default None: a quarter of the memory available now where the
        features live, as for :func:`crestcore.facility_location`). All problems are solved densely in one batch; when
        their padded similarity matrices with the solver's work buffers (on NumPy input one matrix per
        Numba thread, which solves the problems one after the other; 1.25x every problem's matrix on
        the torch and CuPy kernels; 4.5x on the generic array-API reference, which cannot work in place)
        and the gathered features would exceed this many bytes, the call is
        refused with a ``ValueError`` before anything is allocated, naming what would make it fit (a
        smaller ``P``, ``per_class``, or a larger ``max_dense_bytes``).

    Returns
    -------
    Coresets (see its docstring for shapes).

    Examples
    --------
    Eight examples of two classes; three coresets of 2 picks, each from a class-stratified random subset
    of 6 (3 per class), one pick per class weighted by the 3 members of its class in the subset:

    >>> import numpy as np
    >>> X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [10.0, 10.0],
    ...               [10.0, 11.0], [12.0, 10.0], [0.5, 0.5], [11.0, 11.0]])
    >>> y = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    >>> c = minibatch_coresets(X, y, m=2, r=6, P=3, rng=0)
    >>> c.subsets.tolist()
    [[0, 1, 3, 5, 6, 7], [1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 5, 7]]
    >>> c.indices.tolist()
    [[6, 7], [6, 3], [0, 7]]
    >>> c.weights.tolist()
    [[3.0, 3.0], [3.0, 3.0], [3.0, 3.0]]

    The same seed gives the same coresets on the generic reference:

    >>> ref = minibatch_coresets(X, y, m=2, r=6, P=3, rng=0, backend="reference")
    >>> np.array_equal(ref.indices, c.indices) and np.array_equal(ref.subsets, c.subsets)
    True
    """
    features = detached(features)
    xp = namespace(features, labels, names=("features", "labels"))
    backend = check_choice(backend, "backend", BACKENDS)
    if backend == "numba":
        def solve(features, labels, pool, subsets, rows):
            return minibatch_coresets(features, labels, m=m, r=r, P=P, rng=rng, per_class=per_class, kernel=kernel,
                                      metric=metric, optimizer=optimizer, epsilon=epsilon,
                                      class_budget=class_budget, scale=scale, pool=pool, subsets=subsets,
                                      backend="auto", max_dense_bytes=max_dense_bytes, rows=rows)

        return numba_route(xp, features, solve, {"features": features, "labels": labels, "pool": pool,
                                                 "subsets": subsets, "rows": rows})
    check_float_matrix(xp, features, "features")  # (its max|X| is of all n rows: the scale is the gathered rows')
    n, d = features.shape
    labels_host = labels_to_host(xp, labels, n) if labels is not None else None
    if pool is None:
        pool_h = np.arange(n, dtype=np.int64)
    else:
        from ._compat import to_numpy

        pool_h = np.asarray(to_numpy(pool))
        if pool_h.ndim != 1 or not np.issubdtype(pool_h.dtype, np.integer):
            raise TypeError("pool must be a 1-D integer array of example indices")
        if pool_h.size == 0:
            raise ValueError("pool is empty")
        pool_h = pool_h.astype(np.int64)
        if pool_h.min() < 0 or pool_h.max() >= n or _has_repeats(pool_h):
            raise ValueError(f"pool must hold distinct indices in [0, {n})")
    P = check_int(P, "P", low=1)
    r = check_int(r, "r", low=1, high=int(pool_h.size))
    m = check_int(m, "m", low=1, high=r)
    kernel = check_choice(kernel, "kernel", KERNELS)
    metric = check_choice(metric, "metric", METRICS)
    optimizer = check_choice(optimizer, "optimizer", OPTIMIZERS)
    class_budget = check_choice(class_budget, "class_budget", CLASS_BUDGETS)
    if max_dense_bytes is not None:
        max_dense_bytes = resolve_dense_bytes(max_dense_bytes, xp, features)
    eps = check_epsilon(epsilon)
    if isinstance(per_class, np.bool_):  # NumPy's bool (its type is also called "bool")
        per_class = bool(per_class)
    if not isinstance(per_class, bool):
        raise TypeError(f"per_class must be a bool, got {type(per_class).__name__}")
    gen = make_rng(rng) if (subsets is None or optimizer == "stochastic" or rng is not None) else None
    sc = kernel_scale(scale, d)
    dev = device_of(features)
    in_dtype = features.dtype
    # numerics policy (docs/selection.md): compute in >= float32, features rescaled by a power of two
    # when their magnitude (max|X| over the rows the problems gather) could overflow or underflow; gains and
    # objectives are scaled back at the end. Applied to those rows, not all n (review 129: a float16 array's
    # whole float32 copy, or a rescaled one, at every call)
    cd = compute_dtype(xp, features.dtype)

    row_ids = np.arange(P, dtype=np.int64)
    if rows is not None:
        if subsets is None:
            raise ValueError("rows= numbers the rows of given subsets: pass subsets= too")
        row_ids = np.asarray(rows)
        if not np.issubdtype(row_ids.dtype, np.integer) or row_ids.dtype == bool:
            raise TypeError(f"rows must be an array of integer row numbers, got dtype {row_ids.dtype}")
        if row_ids.shape != (P,) or (P and row_ids.min() < 0) or np.unique(row_ids).size != P:
            raise ValueError(f"rows must be a 1-D array of {P} distinct non-negative integers (one per row of "
                             f"subsets), got {rows!r}")
        row_ids = row_ids.astype(np.int64)
    blocked = None
    if subsets is None:
        # (P, r) host, class blocks; backend="reference" draws with the NumPy reference (same subsets)
        assert gen is not None  # made whenever subsets are drawn
        blocked, r_c = _draw_blocked(labels_host, pool_h, r, P, gen, native=backend != "reference",
                                      whole=pool is None)
        subsets = np.sort(blocked, axis=1)
    else:
        from ._compat import to_numpy

        subsets = np.asarray(to_numpy(subsets))
        if subsets.ndim != 2 or not np.issubdtype(subsets.dtype, np.integer):
            raise TypeError("subsets must be a 2-D (P, r) integer array")
        if subsets.shape != (P, r):
            raise ValueError(f"subsets has shape {subsets.shape}, expected (P, r) = ({P}, {r})")
        if subsets.min() < 0 or subsets.max() >= n:
            raise ValueError(f"subsets must hold row indices in [0, {n})")
        # each row sorted, as drawn ones are: the problems, and so the picks, do not depend on the order a
        # row lists its members in (ties break to the lowest index), and the result's subsets are sorted
        subsets = np.sort(subsets, axis=1).astype(np.int64)
        if r > 1 and bool((subsets[:, 1:] == subsets[:, :-1]).any()):
            raise ValueError("subsets rows must hold distinct indices")
        if pool is not None and not np.isin(subsets, pool_h).all():
            # the per-class problems are the pool's classes: a member outside the pool has no place there
            raise ValueError("subsets must be drawn from pool: they hold indices that pool does not")
    included = None  # (P, C): the probability that class c of subset p got a pick, where below 1
    # Only the problems with a pick are built and solved (with fewer picks than classes, m < C, most classes of
    # a subset get none; their tables padded to the largest of them, sliced per size group below): tables of
    # every (subset, class) problem padded to the largest class held 887 MiB for 64,000 members with one large
    # class and 999 small ones (review 129).
    if per_class and labels_host is not None and blocked is not None:
        # drawn here: class c has r_c[c] members in every subset, block c of each row, sorted
        C = r_c.size
        if class_budget == "ceil":
            per = math.ceil(m / C)
            b_c = np.tile(np.minimum(per, r_c), (P, 1))
            width = C * per
        else:
            b_c, included = _class_budgets(m, np.tile(r_c, (P, 1)), gen, row_ids)
            width = m
        budgets = b_c.reshape(P * C)
        sizes = np.tile(r_c, P)
        live = np.flatnonzero(budgets > 0)
        lp, lc = np.divmod(live, C)
        n_max = max(int(r_c[lc].max(initial=0)), 1)
        tt = np.arange(n_max)
        valid_s = tt[None, :] < r_c[lc][:, None]  # (live, n_max)
        col = (np.cumsum(r_c) - r_c)[lc][:, None] + tt[None, :]
        pad_s = np.where(valid_s, blocked[lp[:, None], np.where(valid_s, col, 0)], 0)
    elif per_class and labels_host is not None:
        classes, _, _ = _class_positions(labels_host if pool is None else labels_host[pool_h])
        C = classes.size
        cls = _positions_in(classes, labels_host[subsets])  # (P, r) class position of each member
        counts = np.bincount((np.arange(P)[:, None] * C + cls).ravel(), minlength=P * C).reshape(P, C)
        if class_budget == "ceil":
            per = math.ceil(m / C)
            budgets = np.minimum(per, counts)
            width = C * per
        else:
            budgets, included = _class_budgets(m, counts, gen, row_ids)
            width = m
        budgets = budgets.reshape(P * C)
        sizes = counts.reshape(P * C)
        live = np.flatnonzero(budgets > 0)
        n_max = max(int(sizes[live].max(initial=0)), 1)
        # group each subset's members by class (members stay in index order within a class): one sort of
        # the keys class * n + index along each row
        key = np.sort(cls * n + subsets, axis=1)
        mcls = key // n
        mem = key - mcls * n
        start = np.cumsum(counts, axis=1) - counts  # (P, C) first position of each class
        rank = np.arange(r)[None, :] - np.take_along_axis(start, mcls, axis=1)
        row_of = np.full(P * C, -1, dtype=np.int64)
        row_of[live] = np.arange(live.size)
        at = row_of[(np.arange(P)[:, None] * C + mcls).ravel()]
        kept = at >= 0  # members of a problem with a pick
        pad_s = np.zeros((live.size, n_max), dtype=np.int64)
        valid_s = np.zeros((live.size, n_max), dtype=bool)
        pad_s[at[kept], rank.ravel()[kept]] = mem.ravel()[kept]
        valid_s[at[kept], rank.ravel()[kept]] = True
    else:
        C = 1
        pad_s, valid_s = subsets.copy(), np.ones((P, r), dtype=bool)
        budgets = np.full(P, m, dtype=np.int64)
        sizes = np.full(P, r, dtype=np.int64)
        live = np.arange(P)
        width = m
    B = budgets.size
    # padding slots hold their problem's first member (every live problem has one, packed first), not row 0: the
    # gathered rows are then exactly the problems' own, and their max|X| sets the scale below
    pad_s = np.where(valid_s, pad_s, pad_s[:, :1])
    # the problems are solved in groups within a factor two of their group's largest, as facility_location packs
    # them, each group gathered at its own width: the torch, CuPy and generic kernels work on a whole padded batch
    # (one class of 576 members with nine of 7 took 4.7x the time of two classes on CPU torch: review 129), and
    # every kernel's gathered features are a padded table (one class of 25,000 beside 99 of 250 gathered 163,815
    # rows for 10,000 members, 8.4 GiB with embeddings: review 138)
    lsizes = sizes[live]
    groups = ([np.arange(live.size)] if live.size == 0 or lsizes.max() <= 2 * lsizes.min()
              else [np.sort(np.asarray(g, dtype=np.int64)) for g in _pack(lsizes, 1, 1 << 62, 0)])
    one = len(groups) == 1  # (every live problem in order: the tables as they are)
    widths = [int(pad_s.shape[1]) if one else max(int(lsizes[g].max(initial=0)), 1) for g in groups]
    itemsize = int(xp.finfo(cd).bits) // 8
    paths = []
    for grp, w_g in zip(groups, widths):
        # asked about each group's batched (B, n, d) problems, not the (n, d) features: the kernels' rules depend
        # on the batch's shape (the Numba kernels decline many features in large problems); a stand-in in the
        # compute dtype (np.empty's memory is never touched; off NumPy the path depends on the dtype and d only)
        stand_in = (np.empty((1, w_g, d), dtype=cd) if namespace_name(xp) == "numpy"
                    else xp.zeros((1, 1, d), dtype=cd, device=dev))
        paths.append(dense_path(xp, stand_in, force_reference=backend == "reference"))
        # one group's solve at a time: each within the bound
        _guard_memory(itemsize, grp.size, w_g, d, P, per_class and labels_host is not None, max_dense_bytes,
                      paths[-1], xp, features)
    if backend == "auto" and namespace_name(xp) == "torch" and on_host_device(features) and any(
            q != "fused" for q in paths):
        # torch's dense greedy on CPU tensors, silent at 13 s where the Numba kernels take 0.5 s (review 117)
        _warn_host_torch(sum(g.size * w_g ** 2 * int(budgets[live[g]].max())
                             for g, w_g, q in zip(groups, widths, paths) if q != "fused"), "minibatch_coresets")
    # drawn for every problem (only the draws each uses kept), so that the stream, and each problem's draws,
    # are those of a solve of all
    u_all = (stochastic_draws_ragged(gen, sizes, budgets, eps) if optimizer == "stochastic" and gen is not None
             else None)
    tables = [pad_s if one else np.ascontiguousarray(pad_s[grp, :w_g]) for grp, w_g in zip(groups, widths)]
    gathered = [take_rows(xp, features, from_numpy(np.ascontiguousarray(t).reshape(-1), xp, dev)) for t in tables]
    # max|X| over the gathered rows: a row no problem holds (outside the pool or every subset) must not set the
    # scale (review 132: one float32 row of 1e24 elsewhere scaled the problems' squared distances to 0 on the
    # torch and generic kernels, every objective 0 and the picks the lowest indices); one scale for the call
    amax = max(_abs_max(xp, rows) for rows in gathered)
    lb = budgets[live]
    K = int(lb.max(initial=0))
    parts = []
    for grp, w_g, table, rows in zip(groups, widths, tables, gathered):
        rows, _, sc_g, back = prepare(xp, rows, metric=metric, kernel=kernel, scale=sc, amax=amax)
        Xg = xp.reshape(rows, (grp.size, w_g, d))
        vg = from_numpy(np.ascontiguousarray(valid_s if one else valid_s[grp, :w_g]), xp, dev)
        li_g, g_g, w_gg, obj_g = solve_batched(
            xp, Xg, vg, lb if one else lb[grp], metric=metric, kernel=kernel, scale=sc_g, optimizer=optimizer,
            u_host=None if u_all is None else pad_draws(u_all, live[grp]), force_reference=backend == "reference",
        )
        del Xg, rows  # (the group's features: freed before the next group's solve)
        # local -> global indices without leaving the device: gather from the group's rows of the index table
        Bg, Kg = li_g.shape
        pad_g = from_numpy(np.ascontiguousarray(table), xp, dev)
        safe = xp.where(li_g >= 0, li_g, xp.zeros_like(li_g))
        offs = xp.reshape(xp.arange(Bg, device=dev, dtype=index_dtype(xp)), (Bg, 1)) * w_g
        glob_g = xp.take(xp.reshape(pad_g, (-1,)), xp.reshape(safe + offs, (-1,)), axis=0)
        glob_g = xp.where(li_g >= 0, xp.reshape(glob_g, (Bg, Kg)), xp.full_like(li_g, -1))
        if Kg < K:  # every group's results K columns wide (its budgets are at most its own largest)
            glob_g, g_g, w_gg = (xp.concat([a, xp.full((Bg, K - Kg), f, dtype=a.dtype, device=dev)], axis=1)
                                 for a, f in ((glob_g, -1), (g_g, 0), (w_gg, 0)))
        parts.append((glob_g, g_g, w_gg, obj_g))
    if one:
        glob, g, w, obj = parts[0]
    else:  # the groups' rows back in live order
        inv = from_numpy(np.argsort(np.concatenate(groups), kind="stable"), xp, dev)
        glob, g, w, obj = (xp.take(xp.concat([pt[j] for pt in parts], axis=0), inv, axis=0) for j in range(4))
    # slot layout: each problem's picks -> the first budgets[b] (or the class's fixed width) slots of its
    # coreset, class-major; take-positions (on the host) into the flat (live, K) results
    row_of = np.full(B, -1, dtype=np.int64)
    row_of[live] = np.arange(live.size)
    slot_w = (math.ceil(m / C) if (class_budget == "ceil" and C > 1) else None)
    if slot_w is None:
        t = np.arange(K)[None, :]
        take = (row_of[:, None] * K + t)[t < budgets[:, None]].reshape(P, width)
    else:
        t = np.arange(slot_w)[None, :]
        take = np.where(t < budgets[:, None], row_of[:, None] * K + t, -1).reshape(P, width)
    tk = from_numpy(take.reshape(-1), xp, dev)
    tk_safe = xp.where(tk >= 0, tk, xp.zeros_like(tk))
    hole = xp.reshape(tk < 0, (P, width))

    def gather(a, fill):
        v = xp.reshape(xp.take(xp.reshape(a, (-1,)), tk_safe, axis=0), (P, width))
        return xp.where(hole, xp.full_like(v, fill), v)

    if included is not None:  # a class picked with probability p < 1 stands for its members / p
        w = w / from_numpy(np.ascontiguousarray(included.reshape(B)[live]).reshape(live.size, 1), xp, dev)
    indices = gather(glob, -1)
    weights = restore(xp, gather(w, 0), 0, in_dtype, "weights (cluster sizes)")
    gains = restore(xp, gather(g, 0), back, in_dtype, "gains")
    # each coreset's objective: the sum over its problems with a pick (the others' is 0)
    per_problem = obj if live.size == B else xp.take(
        xp.concat([obj, xp.zeros((1,), dtype=obj.dtype, device=dev)], axis=0),
        from_numpy(np.where(row_of >= 0, row_of, live.size), xp, dev), axis=0)
    objective = restore(xp, xp.sum(xp.reshape(per_problem, (P, C)), axis=1), back, in_dtype, "objectives")
    return Coresets(indices=indices, weights=weights, gains=gains, objective=objective,
                    subsets=from_numpy(subsets, xp, dev))
