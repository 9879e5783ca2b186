"""Facility-location selection on raw arrays: objective, gains, greedy (naive, lazy, stochastic), weights.

``F(S) = sum_{i in V} max_{j in S} s_ij`` is monotone submodular for ``s >= 0``; greedy maximisation
under ``|S| <= k`` reaches at least ``(1 - 1/e)`` of the optimum. The public entry point is
:func:`facility_location`; :func:`solve_batched` is the batched engine the CREST selection step
(:mod:`crestcore.minibatch`) shares. Kernels come from ``crestcore.backends`` when one fits the input,
else from the generic array-API reference (:mod:`crestcore._reference_kernels`).
"""

from __future__ import annotations

import logging
import math
import warnings
import numbers
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _reference_kernels as ref
from ._compat import (detached, device_of, from_numpy, index_dtype, is_numpy_namespace, namespace, namespace_name,
                      native_order, take_rows, to_numpy)
from ._validation import (check_choice, check_class_budgets, check_epsilon, check_float_matrix, check_float_rows,
                          check_int, hamilton, isdtype, labels_to_host, make_rng, not_floating, user_stacklevel)
from .backends import draw_bits, exact_shift, get_host_kernel, sample_sizes
from .similarity import KERNELS, METRICS, kernel_scale, prepare, restore

_log = logging.getLogger("crestcore")

OPTIMIZERS = ("naive", "lazy", "stochastic")
BACKENDS = ("auto", "reference", "numba")

__all__ = [
    "Selection",
    "facility_location",
    "facility_objective",
    "marginal_gains",
    "score_orders",
    "solve_batched",
    "OPTIMIZERS",
]


def _numba_host(a: np.ndarray) -> np.ndarray:
    """A host array as the Numba kernels take it: a bfloat16 NumPy view (jax's, through ml_dtypes, which
    NumPy's own dtype checks do not know) in float32, as torch's bfloat16 reaches the host already."""
    return a.astype(np.float32) if a.dtype.name == "bfloat16" else a


def on_host_device(X) -> bool:
    """Whether ``X`` lives in host memory: NumPy, CPU torch, jax on cpu:0, array-api-strict's CPU_DEVICE
    (the arrays ``backend="numba"`` takes)."""
    return "cpu" in str(device_of(X)).lower()


def numba_route(xp, X, solve, host_args: dict):
    """``backend="numba"``: solve host features on the Numba kernels whatever their library (CPU torch
    tensors share their memory with the NumPy view, no copy) and return the result's arrays in ``X``'s
    namespace, on its device and, for the floating fields, in its dtype. ``solve(**numpy_args)`` is the
    caller with ``backend="auto"``; ``host_args`` its array arguments (None stays None)."""
    dev = device_of(X)
    if not on_host_device(X):
        raise ValueError(f"backend='numba' runs the Numba kernels on the host, but the features are on "
                         f"{dev}: pass host arrays, or backend='auto' to solve where they are")
    from .backends import backend_module

    if backend_module("numpy") is None:
        raise ImportError("backend='numba' needs numba, which cannot import here: `pip install numba` (a "
                          "dependency of crestcore), or use backend='auto'")
    out = solve(**{k: (None if v is None else _numba_host(to_numpy(v))) for k, v in host_args.items()})
    dtype = native_order(X.dtype)  # the results in the features' dtype, in the host's byte order
    if is_numpy_namespace(xp) and dtype in (np.float32, np.float64):
        return out  # else NumPy bfloat16 (ml_dtypes), solved in float32: its results go back to bfloat16
    moved = {}
    for f in dataclasses.fields(out):
        v = getattr(out, f.name)
        if isinstance(v, (np.ndarray, np.generic)):  # 0-d results may come back as NumPy scalars
            host = np.asarray(v)
            v = from_numpy(host, xp, dev)
            if np.issubdtype(host.dtype, np.floating) and v.dtype != dtype:
                v = xp.astype(v, dtype)
        moved[f.name] = v
    return dataclasses.replace(out, **moved)


@dataclass(frozen=True)
class Selection:
    """A weighted selection, in the namespace and on the device of the input.

    indices : (k,) int64 (int32 on JAX without ``jax_enable_x64``). The picks; per class (ascending label)
        when labels were given, each class's picks in greedy order.
    weights : (k,) floating. Cluster sizes: how many points have this pick as their most similar pick
        (in its own class when labels were given). They sum to n, except that a class given no pick
        (only possible when k < #classes) represents nobody, and on the sparse path (``neighbors=``) a
        point with no pick among its neighbours counts for none: there they sum to the points covered.
        In X's dtype: a 16-bit float holds integers exactly up to 2048 (float16) or 256 (bfloat16), so
        larger cluster sizes are rounded to its precision there (pass float32 features for exact counts).
    gains : (k,) floating. The marginal gain of each pick when it was made (non-increasing per problem
        for "naive" and "lazy"; stochastic greedy's sampled gains need not be monotone).
    objective : 0-d floating array. ``F(S)`` summed over the problems.
    path : how the problems were solved: "dense" (batched n x n similarities), "matrix-free" (tiled,
        never n x n; for problems above ``max_dense_bytes``), "sparse" (K-nearest-neighbour similarity,
        ``neighbors=``), or several joined by "+" ("dense+matrix-free"); "greedi" from
        ``crestcore.adapters.dask.facility_location`` (partitions solved apart, then merged); "" where the
        selection did not come from facility location.
    plan : with ``optimizer="auto"`` or ``neighbors=``, what was chosen and why (one line, see
        :mod:`crestcore.planner`); "" otherwise.

    Examples
    --------
    :func:`facility_location` returns one; ``len`` is the number of picks:

    >>> import numpy as np
    >>> X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [10.0, 10.0], [10.0, 11.0], [12.0, 10.0]])
    >>> sel = facility_location(X, 2)
    >>> len(sel), sel.indices.tolist(), sel.weights.tolist(), sel.path
    (2, [3, 0], [3.0, 3.0], 'dense')
    """

    indices: Any
    weights: Any
    gains: Any
    objective: Any
    path: str = ""
    plan: str = ""

    def __len__(self) -> int:
        return int(self.indices.shape[0])


# max_dense_bytes=None: this fraction of the memory available now where the data lives (host RAM, or the
# GPU's free memory), at least 64 MiB; 1 GiB where the available memory cannot be told
DENSE_MEMORY_FRACTION = 0.25
DENSE_FLOOR_BYTES = 1 << 26
_FALLBACK_DENSE_BYTES = 1 << 30


def resolve_dense_bytes(max_dense_bytes, xp, X, name: str = "max_dense_bytes") -> int:
    """``max_dense_bytes`` checked, or for None the default sized from the memory available now."""
    if max_dense_bytes is not None:
        return check_int(max_dense_bytes, name, low=1)
    from crestcore.backends import available_bytes

    avail = available_bytes(namespace_name(xp), X)
    if avail is None:  # cannot be told (0 can: a container at its memory limit gets the floor)
        return _FALLBACK_DENSE_BYTES
    return max(DENSE_FLOOR_BYTES, int(avail * DENSE_MEMORY_FRACTION))


# n^2 k of the dense problems above which torch's greedy on the CPU takes about a second or more (one thread:
# 3.3 s in float32 at n = 4,000, k = 400, 6.4e9; benchmarks/torch_cpu_dense.py)
_HOST_TORCH_WARN_WORK = 2_000_000_000


def _warn_host_torch(work: int, who: str = "facility_location") -> None:
    """Say once (no numbers in the text) that CPU tensors take torch's dense greedy, which re-evaluates every
    candidate at each pick (made for a GPU), where the Numba kernels are about 40x faster at large k (review
    108: a silent slow path); small problems, such as CREST's per-step ones, are not warned about."""
    if work <= _HOST_TORCH_WARN_WORK:
        return
    from .backends import backend_module

    if backend_module("numpy") is None:  # no Numba here: torch's kernels are the fastest there are
        return
    warnings.warn(
        f"{who} on CPU torch tensors runs torch's dense greedy, which re-evaluates every candidate "
        "at each pick (made for a GPU): at this size the Numba kernels are tens of times faster. Pass "
        "backend='numba' (a zero-copy view of the tensors; the results come back as tensors)",
        RuntimeWarning, stacklevel=user_stacklevel())


def _kernel(name: str, xp, *arrays, force_reference: bool):
    if not force_reference:
        from crestcore.backends import get_kernel

        k = get_kernel(name, namespace_name(xp), *arrays)
        if k is not None:
            return k
    return getattr(ref, name)


_EXACT_STEP_LIMIT = 1 << 22  # remaining candidates up to which an exact step's draws map exactly in float32


def _skip_draws(rng: np.random.Generator, count: int, chunk: int) -> None:
    """Advance ``rng`` past ``count`` float64 uniforms, as ``rng.random(count)`` would, without keeping them:
    PCG64's ``advance`` (one 64-bit output a double; the 32-bit half it may hold for a later 32-bit draw is
    kept, as ``random`` keeps it) where the bit generator is exactly PCG64 or PCG64DXSM, else drawn and
    discarded ``chunk`` at a time."""
    if count <= 0:
        return
    bitgen: Any = rng.bit_generator
    if type(bitgen) in (np.random.PCG64, np.random.PCG64DXSM):  # exactly: a subclass may draw otherwise
        held = bitgen.state
        bitgen.advance(count)
        if held["has_uint32"]:  # advance drops the held half; random() would have left it for the next draw
            state = bitgen.state
            state["has_uint32"], state["uinteger"] = held["has_uint32"], held["uinteger"]
            bitgen.state = state
        return
    while count > 0:
        rng.random(min(count, chunk))
        count -= chunk


def _exact_steps(u: np.ndarray, sizes: np.ndarray, s_b: np.ndarray) -> None:
    """In place: the draws ``u`` (B, K, s) of every step whose sample reaches the candidates remaining map to
    each of them once, in order (``(q + 1/2) / R``; see :func:`stochastic_draws`)."""
    K, s = u.shape[1], u.shape[2]
    R = sizes[:, None] - np.arange(K)[None, :]  # (B, K): the candidates remaining at each step
    b, t = np.nonzero((s_b[:, None] >= R) & (R >= 1) & (R <= _EXACT_STEP_LIMIT))
    if b.size:
        Rbt = R[b, t][:, None].astype(np.float64)
        q = np.minimum(np.arange(s)[None, :], Rbt - 1)
        u[b, t, :] = (q + 0.5) / Rbt


def stochastic_draws(rng: np.random.Generator, sizes, budgets, epsilon: float) -> np.ndarray:
    """Uniform draws (B, K, s) for stochastic greedy; ``s = ceil(n_b / k_b * ln(1 / epsilon))``.

    Each draw ``u`` is mapped by every backend to the ``floor(u R)``-th of the ``R`` candidates remaining
    (a sample with replacement: its chance of missing a set of ``a`` candidates, ``(1 - a/R)^s``, is the
    bound the approximation guarantee uses). A step whose sample is at least as large as the candidates
    remaining (``R = n_b - t``: every step takes one) looks at every one of them, an exact greedy step:
    its draws are replaced by ``(q + 1/2) / R``, which map to the positions ``q = 0 .. R - 1`` (the rest
    repeat the last). So a tiny ``epsilon`` gives the greedy picks. Problems needing fewer than ``s_max``
    samples repeat their first draw in the spare columns (duplicates change nothing). Drawn on the host
    so every backend sees the same sample: the host stream read as one ``(B, K, s)`` block, row ``t`` of
    problem ``b`` at offset ``(b K + t) s``, padding included (:func:`stochastic_draws_ragged` keeps only
    the part each problem uses, for problems of very different sizes).

    >>> u = stochastic_draws(np.random.default_rng(0), [4], [2], 1e-6)  # s = 4 >= R: both steps exact
    >>> np.minimum(np.floor(u * np.array([4, 3])[None, :, None]), np.array([3, 2])[None, :, None]).tolist()
    [[[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 2.0]]]
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    budgets = np.asarray(budgets, dtype=np.int64)
    B = sizes.size
    K = int(budgets.max()) if B else 0
    s_b = sample_sizes(sizes, budgets, epsilon)  # the contract's rule
    s = int(s_b.max()) if B else 1
    u = rng.random((B, K, s))
    spare = np.arange(s)[None, None, :] >= s_b[:, None, None]
    np.copyto(u, u[:, :, :1].copy(), where=spare)  # in place (a copied column: an overlapping source is copied whole)
    _exact_steps(u, sizes, s_b)
    return u


def stochastic_draws_ragged(rng: np.random.Generator, sizes, budgets, epsilon: float,
                            chunk: int = 1 << 20) -> list:
    """Stochastic greedy's uniform draws per problem: ``u_b`` of shape ``(k_b, s_b)``, the values
    ``stochastic_draws(...)[b, :k_b, :s_b]``, with ``rng`` left in the same state. With one large class and
    many small ones the padded ``(B, max k, max s)`` block is mostly padding (one class of 20,000 points and
    500 of 10 at ``epsilon=0.01``: 359 MiB padded for 0.9 MiB used); past ``chunk`` values the host stream
    is read problem by problem in blocks of at most ``chunk`` values (one row when a row is longer) and only
    the draws a problem uses are kept; below it, the block is drawn at once and sliced (faster for many
    small problems).

    >>> rng = np.random.default_rng(0)
    >>> [u.shape for u in stochastic_draws_ragged(rng, [1000, 10], [100, 1], 0.1)]
    [(100, 24), (1, 10)]
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    budgets = np.asarray(budgets, dtype=np.int64)
    B = sizes.size
    if B == 0:
        return []
    K = int(budgets.max())
    s_b = sample_sizes(sizes, budgets, epsilon)  # the contract's rule
    s = int(s_b.max())
    if B * K * s <= chunk:
        u = stochastic_draws(rng, sizes, budgets, epsilon)
        return [u[b, : budgets[b], : s_b[b]].copy() for b in range(B)]
    out = []
    for b in range(B):
        k_b, sb = int(budgets[b]), int(s_b[b])
        u = np.empty((1, k_b, sb))
        rows = max(1, chunk // s)
        for t0 in range(0, k_b, rows):
            t1 = min(k_b, t0 + rows)
            u[0, t0:t1] = rng.random((t1 - t0, s))[:, :sb]
        _skip_draws(rng, (K - k_b) * s, chunk)  # the rows past this problem's budget
        _exact_steps(u, sizes[b : b + 1], s_b[b : b + 1])
        out.append(u[0])
    return out


def pad_draws(ragged: list, problems=None) -> np.ndarray:
    """The ragged draws of ``problems`` (default: all) as one ``(len(problems), max k_b, max s_b)`` array:
    a problem's spare columns repeat its first draw (duplicates in a sample change nothing), its rows
    past its budget hold 0.5 (no kernel reads a step past a problem's budget)."""
    problems = range(len(ragged)) if problems is None else problems
    parts = [ragged[p] for p in problems]
    K = max((u.shape[0] for u in parts), default=0)
    s = max((u.shape[1] for u in parts), default=1)
    out = np.full((len(parts), K, s), 0.5)
    for b, u in enumerate(parts):
        k_b, sb = u.shape
        out[b, :k_b, :sb] = u
        out[b, :k_b, sb:] = u[:, :1]
    return out


def draws_on(xp, u_host: np.ndarray, X, max_candidates: int):
    """The host draws ``u_host`` on X's device (X in its compute dtype, float32 or float64) in the contract's
    draw dtype (``draw_bits``): X's, except float64 for float32 problems of more than 2^24 points."""
    bits = draw_bits(int(xp.finfo(X.dtype).bits), max_candidates)
    return xp.astype(from_numpy(u_host, xp, device_of(X)), xp.float64 if bits == 64 else xp.float32)


def solve_batched(
    xp,
    X,
    valid,
    budgets_host: np.ndarray,
    *,
    metric: str,
    kernel: str | None,
    scale: float,
    optimizer: str,
    u_host: np.ndarray | None,
    force_reference: bool = False,
):
    """Solve B padded dense problems in one batched call.

    X is (B, n, d) features, or with ``metric == "precomputed"`` (B, n, n) similarities. Returns local
    indices (B, K), gains (B, K), weights (B, K), objectives (B,), all in ``xp``.

    Examples
    --------
    Two problems of three points each, with budgets 1 and 2 (``K = 2``: the first problem's row is
    padded with -1 and weight 0); the native kernels and the generic reference agree:

    >>> import numpy as np
    >>> X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [10.0, 10.0], [10.0, 11.0], [12.0, 10.0]])
    >>> Xb, valid = X.reshape(2, 3, 2), np.ones((2, 3), dtype=bool)
    >>> opts = dict(metric="euclidean", kernel="max-minus", scale=1.0, optimizer="lazy", u_host=None)
    >>> idx, gains, weights, objective = solve_batched(np, Xb, valid, np.array([1, 2]), **opts)
    >>> idx.tolist(), weights.tolist()
    ([[0, -1], [0, 2]], [[3.0, 0.0], [2.0, 1.0]])
    >>> ref = solve_batched(np, Xb, valid, np.array([1, 2]), force_reference=True, **opts)
    >>> np.array_equal(ref[0], idx) and np.allclose(ref[3], objective)
    True
    """
    dev = device_of(X)
    budgets = from_numpy(budgets_host.astype(np.int64), xp, dev)
    u = None if u_host is None else draws_on(xp, u_host, X, int(X.shape[1]))
    if metric != "precomputed" and not force_reference:
        from crestcore.backends import get_kernel

        fused = get_kernel("facility_batched", namespace_name(xp), X, valid, budgets)
        if fused is not None:  # one call: similarities, greedy and weights (Numba never forms (B, n, n))
            return fused(X, valid, budgets, metric, kernel, scale, optimizer, u)
    if metric == "precomputed":  # (a copy: the kernels may work in place, and the input is the caller's)
        zero = xp.zeros((), dtype=X.dtype, device=dev)
        S = xp.where(valid[:, :, None] & valid[:, None, :], X, zero)
    else:
        sim = _kernel("similarity_batched", xp, X, valid, force_reference=force_reference)
        S = sim(X, valid, metric, kernel, scale)
    greedy = _kernel("greedy_batched", xp, S, valid, budgets, force_reference=force_reference)
    idx, gains = greedy(S, valid, budgets, optimizer, u)
    assign = _kernel("assign_batched", xp, S, valid, idx, force_reference=force_reference)
    weights, objective = assign(S, valid, idx)
    return idx, gains, weights, objective


def _problems_from_labels(labels_host: np.ndarray | None, n: int):
    """Each class's members (ascending), classes in ascending label order: one stable sort, O(n log n)
    (a comparison of the whole array per class cost O(n C): 6.5 s of a 7.6 s call at 10^5 classes, review
    117)."""
    if labels_host is None:
        return [np.arange(n, dtype=np.int64)]
    order = np.argsort(labels_host, kind="stable").astype(np.int64)
    ordered = labels_host[order]
    cuts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    return np.split(order, cuts) if order.size else []


# Bytes a batched dense solve holds at its peak per entry of its padded (B, n, n) similarities, as a multiple
# of one such array: "fused", the Numba kernel that solves problem after problem in one n x n work buffer per
# thread (a multiple of one problem's matrix, not of the batch's); "native", the torch and CuPy kernels, in
# place beside small work buffers (benchmarks/memory.py measured 1.05-1.12x); "reference", the generic
# array-API code, which builds the distances functionally with several full-size temporaries alive at once
# (measured 3.7-4.1x; review 117 saw 3.9x of max_dense_bytes where only 1x was counted).
# "precomputed": a given similarity matrix, copied once under the mask, and once more transposed where the
# Numba greedy walks a non-symmetric matrix's columns (review 120 measured 2.1x).
PEAK_FACTOR = {"fused": 1.0, "native": 1.25, "reference": 4.5, "precomputed": 2.25}


def dense_path(xp, X3, *, force_reference: bool = False, precomputed: bool = False) -> str:
    """Which dense solver :func:`solve_batched` runs on the batched problems ``X3`` (B, n, d), or on
    (B, n, n) similarities with ``precomputed``: a key of :data:`PEAK_FACTOR`."""
    from crestcore.backends import get_kernel

    if force_reference:
        return "reference"
    if precomputed:
        return "precomputed"
    ns = namespace_name(xp)
    # (the device backends' facility_batched builds the (B, n, n) similarities: only the host's fuses)
    if ns == "numpy" and get_kernel("facility_batched", ns, X3) is not None:
        return "fused"
    return "native" if get_kernel("similarity_batched", ns, X3) is not None else "reference"


def host_threads() -> int:
    """The threads the host kernels run on now: Numba's ``get_num_threads()`` (which follows
    ``numba.set_num_threads`` and the CPU affinity) where the Numba backend is loaded, else the cores. Each
    of the fused kernel's threads holds its own n x n work buffer."""
    import os
    import sys

    nb = sys.modules.get("crestcore.backends.numba")
    count = getattr(nb, "get_num_threads", None)
    if callable(count):
        return max(1, int(count()))
    return max(1, os.cpu_count() or 1)


def _thread_scratch(n: int) -> int:
    """Bytes of the fused kernel's small per-thread buffers (``_fused_buffers``): a packed triangle of at
    most 512 points and about two dozen length-n vectors."""
    m = min(n, 512)
    return 8 * (m * (m + 1) // 2 + 24 * n)


def dense_batch_bytes(path: str, B: int, n_max: int, d: int, itemsize: int, threads: int | None = None) -> int:
    """The peak bytes of a batched dense solve of ``B`` problems padded to ``n_max`` points of ``d``
    features (``d = 0`` for precomputed similarities) on ``path`` (:func:`dense_path`), with the gathered
    features: the fused kernel holds one matrix per thread (``threads``, default :func:`host_threads`) with
    the features transposed and small buffers, and reads a float64 copy of the gathered features; the others
    hold one matrix per problem times their factor."""
    if path == "fused":
        mats = min(B, threads if threads is not None else host_threads())
        per_thread = n_max * n_max * itemsize + 8 * n_max * d + _thread_scratch(n_max)
        return math.ceil(mats * per_thread + B * n_max * d * (8 + itemsize))
    return math.ceil(B * n_max * n_max * itemsize * PEAK_FACTOR[path] + B * n_max * d * itemsize)


def _pack(sizes: np.ndarray, itemsize: int, max_dense_bytes: int, per_point_extra: int, path: str = "native"):
    """Group problems (sorted by size) into batches whose padded dense solve fits the limit
    (:func:`dense_batch_bytes`), each batch's problems within a factor of two of its largest: the torch,
    CuPy and generic kernels work on the whole padded batch (every problem as large as the largest, and
    as many picks), so one class of 2,000 points with a hundred of 20 cost 44x a loop over the classes
    (review 117)."""
    order = np.argsort(-sizes, kind="stable")
    groups: list[list[int]] = []
    cur: list[int] = []
    cur_n = 0
    threads = host_threads() if path == "fused" else None  # once, not per problem (review 120)
    for p in order:
        n_p = int(sizes[p])
        n_max = max(cur_n, n_p)
        if cur and (dense_batch_bytes(path, len(cur) + 1, n_max, per_point_extra, itemsize, threads) > max_dense_bytes
                    or 2 * n_p < cur_n):
            groups.append(cur)
            cur, n_max = [], n_p
        cur.append(int(p))
        cur_n = n_max
    if cur:
        groups.append(cur)
    return groups


def facility_location(
    X,
    k,
    *,
    labels=None,
    metric: str = "euclidean",
    kernel: str | None = None,
    optimizer: str = "lazy",
    epsilon: float = 0.1,
    rng=None,
    scale: float | None = None,
    max_dense_bytes: int | None = None,
    backend: str = "auto",
    neighbors=None,
    class_budgets=None,
) -> Selection:
    """Select ``k`` representative rows of ``X`` by facility-location greedy, with cluster-size weights.

    Parameters
    ----------
    X : (n, d) real floating array of any array-API library (NumPy, torch CPU/CUDA, CuPy,
        array-api-strict), or with ``metric="precomputed"`` an (n, n) non-negative similarity matrix
        (``X[i, j]`` = similarity of point i to candidate j).
    k : number of picks, ``1 <= k <= n``.
    labels : optional (n,) integer array in X's namespace. Then one problem per class, solved together:
        class c gets ``k_c`` picks by the largest-remainder (Hamilton) split of k proportional to class
        sizes (``floor(k n_c / n)`` plus one for the largest fractional parts, lower label on ties; when
        ``k >= #classes`` every class gets at least one). Weights and the objective are per class.
    metric : "euclidean" (default), "sqeuclidean", "cosine" or "precomputed".
    kernel : "max-minus" (``max(D) - D`` per problem, CRAIG and the paper's objective; the default for
        features) or "exp" (``exp(-D / scale)``, the CREST release). None picks the default; it must be
        None with ``metric="precomputed"``.
    optimizer : "lazy" (default; the same picks as "naive", much faster), "naive", or "stochastic"
        (stochastic greedy: each step looks at ``ceil(n/k ln(1/epsilon))`` random remaining candidates,
        all of them once no more remain, so a tiny ``epsilon`` gives the greedy picks;
        ``(1 - 1/e - epsilon)``-approximate in expectation; needs ``rng``), or "auto": lazy greedy on the
        path :func:`crestcore.planner.plan_problem` picks per problem from n, d, k and
        ``max_dense_bytes`` (dense, matrix-free or sparse), its size-dependent arrays within
        ``max_dense_bytes`` (fixed work buffers of tens to a couple of hundred MB come on top; see
        docs/selection.md); a ``ValueError`` names what would fit when nothing does.
    epsilon : stochastic greedy's accuracy parameter in (0, 1).
    rng : int seed or ``numpy.random.Generator``; only used (and then required) by "stochastic".
    scale : the "exp" kernel's length scale; default the number of features (the other kernels have no
        scale and ignore it).
    max_dense_bytes : problems whose dense solve would exceed this many bytes (the similarity matrix on
        the Numba kernels, times :data:`PEAK_FACTOR`'s 1.25 on torch and CuPy and 4.5 on the generic code)
        are solved by the matrix-free tiled path, which never forms the n x n matrix (slower). Default
        None: a quarter of the memory available now where X lives (the host's ``MemAvailable``, bounded by
        the memory cgroup's limit in a container, or the GPU's free memory), at least 64 MiB. The path
        taken is ``Selection.path`` and is logged on the ``crestcore`` logger (INFO when a problem goes
        matrix-free).
    backend : "auto" (native kernels where they fit the input, else the generic code), "reference"
        (always the generic array-API code; for testing) or "numba" (host input of any library, e.g. CPU
        torch tensors, solved on the Numba kernels through a NumPy view, results back in X's namespace
        and dtype: a CPU torch caller that makes many small selections trades Numba's one-off start,
        0.5-0.9 s a process, for a few milliseconds less per call; device input is refused).
    neighbors : None (default: the full similarity), an int K, or an (n, K) integer array of neighbour
        indices (-1 = none; cross-class pairs are ignored with labels). With K, each point is represented
        only by itself and its K nearest neighbours (in its class): the sparse path of
        :mod:`crestcore.sparse`, memory O(n K). The graph comes from faiss for NumPy input when the
        ``[ann]`` extra is installed (exact up to 20,000 points, IVF above), else from an exact tiled
        search; distances on the graph's pairs are recomputed exactly. ``1 <= K < n`` (a class with
        fewer than K + 1 points gets its complete graph). Weights count the points that have a pick
        among their neighbours.
    class_budgets : with ``labels``, the picks of each class present (ascending label order), adding up
        to ``k``, instead of the Hamilton split: e.g. a split whose leftover picks are drawn at random
        (:func:`crestcore.plan.apportion`), so that repeated selections with ``k`` below the number of
        classes do not always leave out the same classes.

    Returns
    -------
    Selection, with arrays in X's namespace, on X's device, in X's dtype (indices int64; int32 on JAX
    without x64). Ties break to
    the lowest index. All-identical points are a valid input: every gain after the first is 0, the picks
    are the lowest indices (with ``optimizer="lazy"`` or ``"naive"``; stochastic greedy picks among the
    candidates it samples) and the first pick of each problem carries all the weight (except all-zero rows
    under ``metric="cosine"``: a zero row has no direction, so its cosine distance is 1 to every other
    point, another zero row included, and 0 to itself, as every point's).

    Examples
    --------
    Two clusters of three points; two picks, one per cluster, each weighted by its cluster's size:

    >>> import numpy as np
    >>> X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [10.0, 10.0], [10.0, 11.0], [12.0, 10.0]])
    >>> sel = facility_location(X, 2)
    >>> sel.indices.tolist(), sel.weights.tolist(), sel.gains.round(2).tolist()
    ([3, 0], [3.0, 3.0], [49.67, 39.05])

    With labels, each class is its own problem (here one pick per class, picks in ascending label):

    >>> facility_location(X, 2, labels=np.array([0, 0, 0, 1, 1, 1])).indices.tolist()
    [0, 3]

    A memory bound below the dense 6 x 6 similarity (288 bytes) takes the matrix-free path, with the
    same picks:

    >>> small = facility_location(X, 2, max_dense_bytes=200)
    >>> small.path, small.indices.tolist()
    ('matrix-free', [3, 0])

    A precomputed similarity matrix (``S[i, j]``: how well candidate j represents point i):

    >>> S = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.0]])
    >>> sel = facility_location(S, 2, metric="precomputed")
    >>> sel.indices.tolist(), sel.weights.tolist(), float(sel.objective)
    ([1, 2], [2.0, 1.0], 2.5)
    """
    X = detached(X)
    xp = namespace(X, labels, names=("X", "labels"))
    backend = check_choice(backend, "backend", BACKENDS)
    if backend == "numba":
        arrays = {"X": X, "labels": labels, "class_budgets": class_budgets}
        if neighbors is not None and not isinstance(neighbors, numbers.Integral):
            arrays["neighbors"] = neighbors  # a graph; a count K stays as it is

        def solve(X, labels, class_budgets, neighbors=neighbors):
            return facility_location(X, k, labels=labels, metric=metric, kernel=kernel, optimizer=optimizer,
                                     epsilon=epsilon, rng=rng, scale=scale, max_dense_bytes=max_dense_bytes,
                                     backend="auto", neighbors=neighbors, class_budgets=class_budgets)

        return numba_route(xp, X, solve, arrays)
    metric = check_choice(metric, "metric", METRICS + ("precomputed",))
    precomputed = metric == "precomputed"
    check_float_matrix(xp, X, "X", square=precomputed)
    n = X.shape[0]
    k = check_int(k, "k", low=1, high=n)
    if precomputed:
        if kernel is not None:
            raise ValueError("kernel must be None with metric='precomputed' (X already holds similarities)")
        if bool(xp.any(X < 0)):
            raise ValueError("X (precomputed similarities) must be non-negative for facility location")
    else:
        kernel = check_choice("max-minus" if kernel is None else kernel, "kernel", KERNELS)
    optimizer = check_choice(optimizer, "optimizer", OPTIMIZERS + ("auto",))
    auto = optimizer == "auto"
    if neighbors is not None:
        if precomputed:
            raise ValueError("neighbors cannot be used with metric='precomputed' (the graph's distances are "
                             "computed from the features X)")
        from .sparse import check_neighbors

        neighbors = check_neighbors(neighbors, n)
    if auto:
        optimizer = "lazy"
    max_dense_bytes = resolve_dense_bytes(max_dense_bytes, xp, X)
    eps = check_epsilon(epsilon)
    gen = make_rng(rng) if optimizer == "stochastic" or rng is not None else None  # a bad rng is refused anyway
    sc = given_scale = kernel_scale(scale, X.shape[1]) if not precomputed else 1.0
    labels_host = labels_to_host(xp, labels, n) if labels is not None else None
    in_dtype = X.dtype
    # numerics policy (docs/selection.md): compute in >= float32, data rescaled by a power of two when
    # its magnitude could overflow or underflow; gains and objective are scaled back at the end
    X, _, sc, back = prepare(xp, X, metric=metric, kernel=kernel, scale=sc)

    problems = _problems_from_labels(labels_host, n)
    sizes = np.array([p.size for p in problems], dtype=np.int64)
    if class_budgets is None:
        budgets = hamilton(k, sizes)
    elif labels_host is None:
        raise ValueError("class_budgets needs labels (one count per class)")
    else:
        budgets = check_class_budgets(class_budgets, sizes, k)
    dev = device_of(X)
    itemsize = int(xp.finfo(X.dtype).bits) // 8  # no device round trip
    force_ref = backend == "reference"

    n_prob = len(problems)
    out_idx: list[Any] = [None] * n_prob
    out_gain: list[Any] = [None] * n_prob
    out_w: list[Any] = [None] * n_prob
    out_obj: list[Any] = [None] * n_prob
    u_all = stochastic_draws_ragged(gen, sizes, budgets, eps) if optimizer == "stochastic" and gen is not None else None

    # a problem without a pick (a class budget of 0: k below the number of classes, or given) adds nothing to
    # the result; it is not sized, planned, searched or solved (its graph or similarity cost the whole call)
    live = [p for p in range(n_prob) if budgets[p] > 0]
    plan_text = ""
    # the dense solver these problems would get, and its peak memory per similarity entry (review 117)
    # (asked about the largest problem's shape, a broadcast stand-in: the Numba kernels' rules depend on n and d)
    n_top = max((int(sizes[p]) for p in live), default=1)
    dpath = dense_path(xp, xp.broadcast_to(xp.zeros((1, 1, 1), dtype=X.dtype, device=device_of(X)),
                                           (1, n_top, int(X.shape[1]))),
                       force_reference=force_ref, precomputed=precomputed)
    peak = PEAK_FACTOR[dpath]
    if auto or neighbors is not None:
        from .planner import plan_problem

        k_nb = neighbors if isinstance(neighbors, int) else (None if neighbors is None else int(neighbors.shape[1]))
        if auto:
            # the largest class first: when a class does not fit, the bound the error suggests is the
            # largest class's, which fits every class (not the first class's, which a later one exceeds)
            plans = {p: plan_problem(int(sizes[p]), X.shape[1], int(budgets[p]), itemsize, max_dense_bytes,
                                     neighbors=k_nb, precomputed=precomputed, peak=peak)
                     for p in sorted(live, key=lambda q: (-int(sizes[q]), q))}
            kinds = {p: plans[p].path for p in live}
        else:
            kinds = dict.fromkeys(live, "sparse")
            if isinstance(neighbors, int):  # a graph built here: its memory is bounded like the other paths'
                from .sparse import graph_bytes

                for p in sorted(live, key=lambda q: (-int(sizes[q]), q)):
                    kp = min(neighbors, int(sizes[p]) - 1)
                    # the graph's own bytes: the fixed work buffers come on top of the bound, as on the
                    # other paths (a six-point problem under a 200-byte bound is not refused for them)
                    need = graph_bytes(int(sizes[p]), X.shape[1], kp)
                    if need > max_dense_bytes:
                        fit = next((kk for kk in range(kp, 0, -1)
                                    if graph_bytes(int(sizes[p]), X.shape[1], kk) <= max_dense_bytes), None)
                        raise ValueError(
                            f"neighbors={neighbors} needs about {need} bytes for its graph on a problem of "
                            f"n={int(sizes[p])} points, above max_dense_bytes={max_dense_bytes}: pass "
                            + (f"neighbors <= {fit} or " if fit else "")
                            + f"max_dense_bytes >= {need} (or leave neighbors out with optimizer='auto', which "
                            "sizes the path to the bound)")
        sparse_p = [p for p in live if kinds[p] == "sparse"]
        big = [p for p in live if kinds[p] == "matrix-free"]
        largest = max(live, key=lambda q: (int(sizes[q]), -q))
        counted = list(kinds.values())
        plan_text = (f"{'auto' if auto else 'neighbors'}: " + ", ".join(
            f"{counted.count(c)} {c}" for c in ("dense", "matrix-free", "sparse") if c in counted)
            + f" problem(s); largest (n={int(sizes[largest])}, d={X.shape[1]}, k={int(budgets[largest])}): "
            + (plans[largest].reason if auto else f"neighbors={min(int(k_nb or 0), int(sizes[largest]) - 1)}"))
    else:
        sparse_p = []
        big = [p for p in live if not precomputed and sizes[p] * sizes[p] * itemsize * peak > max_dense_bytes]
    dense = [p for p in live if p not in big and p not in sparse_p]
    extra = 0 if precomputed else X.shape[1]
    groups = [[dense[g] for g in group]
              for group in (_pack(sizes[dense], itemsize, max_dense_bytes, extra, dpath) if dense else [])]
    if backend == "auto" and dense and namespace_name(xp) == "torch" and on_host_device(X):
        # the work of the padded batches the kernels run: every problem of a batch as large as its largest,
        # with as many picks
        _warn_host_torch(sum(len(g) * int(sizes[g].max()) ** 2 * int(budgets[g].max()) for g in groups))
    path = "+".join(c for c, ps in (("dense", dense), ("matrix-free", big), ("sparse", sparse_p)) if ps)
    _log.log(logging.INFO if big else logging.DEBUG,
             "facility_location: %d problem(s), largest n=%d: %s path (max_dense_bytes=%d; a dense n x n "
             "similarity of the largest takes %d bytes)", len(live), int(sizes[live].max()), path, max_dense_bytes,
             int(sizes[live].max()) ** 2 * itemsize)
    for p in big:
        pidx = from_numpy(problems[p], xp, dev)
        Xp = take_rows(xp, X, pidx)
        u = None
        if u_all is not None:
            u = draws_on(xp, u_all[p], X, int(sizes[p]))
        gf = _kernel("greedy_features", xp, Xp, force_reference=force_ref)
        tile = max(64, int(max_dense_bytes // max(1, sizes[p] * itemsize * 4)))
        li, g, w, obj = gf(Xp, int(budgets[p]), metric, kernel, sc, optimizer, u, min(tile, 4096))
        out_idx[p] = xp.take(pidx, li, axis=0)
        out_gain[p], out_w[p], out_obj[p] = g, w, obj

    graph_methods = set()
    edgeless: set[int] = set()  # sparse problems whose graph has no edge
    for p in sparse_p:
        from .sparse import knn_graph, solve_sparse

        members = problems[p]
        pidx = from_numpy(members, xp, dev)
        Xp = take_rows(xp, X, pidx)
        n_p = int(sizes[p])
        if isinstance(neighbors, np.ndarray):  # a given graph, restricted to the problem's points
            loc = np.full(n, -1, dtype=np.int64)
            loc[members] = np.arange(n_p)
            g = neighbors[members]
            nbr = np.where(g >= 0, loc[np.maximum(g, 0)], -1)
            graph_methods.add("given")
        else:
            K_p = min(int((plans[p].neighbors if auto else neighbors) or 0), n_p - 1)
            if K_p >= 1:
                nbr, how = knn_graph(xp, Xp, K_p, metric, force_reference=force_ref)
                graph_methods.add(how)
            else:
                nbr = np.zeros((n_p, 0), dtype=np.int64)
        if not bool(np.any(nbr >= 0)):  # no edge: a pick covers nothing but itself, whatever the kernel
            edgeless.add(p)
        u = None
        if u_all is not None:
            u = draws_on(xp, u_all[p], X, int(sizes[p]))
        assert kernel is not None  # the sparse path refuses metric="precomputed", so the kernel is set
        li, g_, w_, obj_ = solve_sparse(xp, Xp, nbr, int(budgets[p]), metric=metric, kernel=kernel, scale=sc,
                                        optimizer=optimizer, u=u, force_reference=force_ref)
        out_idx[p] = xp.take(pidx, li, axis=0)
        out_gain[p], out_w[p], out_obj[p] = g_, w_, obj_
    if graph_methods:
        plan_text += f"; graph: {'+'.join(sorted(graph_methods))}"
        _log.info("facility_location: %s", plan_text)

    for group in groups:
        n_max = int(sizes[group].max())
        pad_idx = np.zeros((len(group), n_max), dtype=np.int64)
        valid_h = np.zeros((len(group), n_max), dtype=bool)
        for b, p in enumerate(group):
            pad_idx[b, : sizes[p]] = problems[p]
            valid_h[b, : sizes[p]] = True
        flat = from_numpy(pad_idx.reshape(-1), xp, dev)
        if precomputed and len(group) == 1 and n_max == n:  # the whole matrix, in order: no gathered copies
            Xb = xp.reshape(X, (1, n, n))  # (solve_batched's masking copies it before any kernel sees it)
        elif precomputed:  # each problem's block, rows then columns (not every problem's rows at once: B n_max x n)
            Xb = xp.stack([xp.take(take_rows(xp, X, pb), pb, axis=1)
                           for pb in (from_numpy(pad_idx[b], xp, dev) for b in range(len(group)))])
        else:
            Xb = xp.reshape(take_rows(xp, X, flat), (len(group), n_max, X.shape[1]))
        valid = from_numpy(valid_h, xp, dev)
        u = None
        if u_all is not None:
            u = pad_draws(u_all, group)
        li, g, w, obj = solve_batched(
            xp, Xb, valid, budgets[group], metric=metric, kernel=kernel, scale=sc,
            optimizer=optimizer, u_host=u, force_reference=force_ref,
        )
        for b, p in enumerate(group):
            kb = int(budgets[p])
            loc = li[b, :kb]
            out_idx[p] = xp.take(from_numpy(problems[p], xp, dev), loc, axis=0)
            out_gain[p], out_w[p], out_obj[p] = g[b, :kb], w[b, :kb], obj[b]

    indices = xp.concat([xp.astype(out_idx[p], index_dtype(xp)) for p in live])
    gains = xp.concat([out_gain[p] for p in live])
    weights = xp.concat([out_w[p] for p in live])
    objective = xp.sum(xp.stack([xp.asarray(out_obj[p], device=dev) for p in live]))
    # the problems where a pick could cover another point (two points or more, not all picked, a sparse one
    # with an edge): a gain of exactly 1 at every pick of all of them means the similarities vanished
    open_ = [p for p in live if p not in edgeless and 1 <= budgets[p] < sizes[p]]
    if kernel == "exp" and open_ and all(bool(to_numpy(xp.all(out_gain[p] == 1.0))) for p in open_):
        warnings.warn(
            f"facility_location: with kernel='exp' and scale={given_scale:g} every pick gained exactly 1 (itself): the "
            "similarities exp(-D / scale) between distinct points are below the float resolution, so every "
            "selection is equally good and the picks carry no information (they are the lowest indices). Pass "
            "a scale of about the data's typical distance (the default is the number of features)",
            RuntimeWarning, stacklevel=user_stacklevel())
    return Selection(
        indices=indices,
        weights=restore(xp, weights, 0, in_dtype, "weights (cluster sizes)"),
        gains=restore(xp, gains, back, in_dtype, "gains"),
        objective=xp.asarray(restore(xp, objective, back, in_dtype, "objective")),  # NumPy: 0-d, not a scalar
        path=path,
        plan=plan_text,
    )


def _check_dense_and_selected(S, selected):
    xp = namespace(S, selected, names=("S", "selected"))
    check_float_rows(xp, S, "S", "2-D similarity matrix")
    if S.shape[0] and S.shape[1] and float(to_numpy(xp.min(S))) < 0:
        # F(empty) = 0 and the gains' cover of 0 assume s >= 0 (facility_location refuses negative
        # similarities too): with negative entries the objective and the gains would contradict each other
        raise ValueError("S must be non-negative: facility location's objective and gains assume similarities >= 0")
    if selected.ndim != 1:
        raise ValueError(f"selected must be 1-D, got shape {tuple(selected.shape)}")
    if not isdtype(xp, selected.dtype, "integral"):
        raise TypeError(f"selected must hold integer indices, got dtype {selected.dtype}")
    if selected.shape[0] and (bool(xp.any(selected < 0)) or bool(xp.any(selected >= S.shape[1]))):
        raise ValueError(f"selected must hold column indices in [0, {S.shape[1]})")
    return xp


def facility_objective(S, selected):
    """``F(selected) = sum_i max_{j in selected} S[i, j]`` for a dense non-negative similarity matrix S (n, c):
    row i a point to cover, column j a candidate (square, (n, n), when the candidates are the points).

    ``selected`` is a 1-D integer array of candidate (column) indices (may be empty: F = 0). Differentiable in ``S``
    where its library is (a torch ``S`` that requires grad gives an objective with its graph).

    Examples
    --------
    >>> import numpy as np
    >>> S = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.0]])
    >>> float(facility_objective(S, np.array([0]))), float(facility_objective(S, np.array([0, 2])))
    (1.5, 2.5)
    """
    selected = detached(selected)
    xp = _check_dense_and_selected(S, selected)
    if selected.shape[0] == 0:  # 0 as a sum over no column of S: differentiable like any other objective
        out0 = xp.sum(xp.take(S, selected, axis=1))
        return xp.asarray(out0) if isinstance(out0, (np.generic, float)) else out0
    dtype = S.dtype
    S, _, _, back = prepare(xp, S, metric="precomputed", kernel=None, scale=1.0)  # numerics policy
    cols = xp.take(S, selected, axis=1)
    out = restore(xp, xp.sum(xp.max(cols, axis=1)), back, dtype, "objective", selection=False)
    # NumPy: 0-d, not a scalar; an array stays itself (a torch S that requires grad keeps its graph: the
    # objective is differentiable in S, and asarray would warn about it)
    return xp.asarray(out) if isinstance(out, (np.generic, float)) else out


def marginal_gains(S, selected):
    """Gains ``F(selected + j) - F(selected)`` of every candidate j (c,), for a dense non-negative S (n, c)
    (rows the points, columns the candidates, as in :func:`facility_objective`).

    Examples
    --------
    The first greedy step takes the largest gain (candidate 1); after it, the gains shrink:

    >>> import numpy as np
    >>> S = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.0]])
    >>> marginal_gains(S, np.array([], dtype=np.int64)).tolist()
    [1.5, 1.7, 1.2]
    >>> marginal_gains(S, np.array([1])).tolist()
    [0.5, 0.0, 0.8]
    """
    selected = detached(selected)
    xp = _check_dense_and_selected(S, selected)
    dtype = S.dtype
    S, _, _, back = prepare(xp, S, metric="precomputed", kernel=None, scale=1.0)  # numerics policy
    if selected.shape[0] == 0:
        cover = xp.zeros((S.shape[0],), dtype=S.dtype, device=device_of(S))
    else:
        cover = xp.max(xp.take(S, selected, axis=1), axis=1)
    gains = xp.sum(xp.maximum(S - cover[:, None], xp.zeros_like(S)), axis=0)
    return restore(xp, gains, back, dtype, "gains", selection=False)


_SCORE_TILE_ELEMENTS = 1 << 22  # inner products held at once by score_orders (32 MiB in float64)


def _gram_rows(A, metric):
    """Rows in float64 for inner products, and their squared norms (cosine: the unit rows, as
    :func:`crestcore.pairwise_distances` normalises them; the norms are then unused)."""
    A = A.astype(np.float64)
    sq = np.einsum("ij,ij->i", A, A)
    if metric == "cosine":
        nrm = np.sqrt(sq)
        return A / np.where(nrm > 0, nrm, 1.0)[:, None], sq
    return A, sq


def score_orders(X, C, orders, *, metric: str = "euclidean", kernel: str = "max-minus",
                 bound: float | None = None, scale: float | None = None, ids=None,
                 ) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """Score ordered pick lists on a set of points: the objective, cluster sizes and gains of each list.

    The picks are rows of ``C`` (candidate rows, e.g. the union of several solutions); pick list ``o``
    names rows of ``C`` in greedy order. With ``s_ij`` the similarity of point ``x_i`` to row ``c_j``
    (``max(bound - D_ij, 0)`` for ``kernel="max-minus"``, ``exp(-D_ij / scale)`` for ``"exp"``, ``D`` the
    ``metric`` distance), each list gets:

    * objective ``sum_i max_{j in o} s_ij`` (0 for an empty list);
    * weights: per pick, the number of points most similar to it (ties: the earliest pick in the order);
    * gains: per pick, ``sum_i max(s_ij - max_{l before j} s_il, 0)`` (they add up to the objective).

    All three add over points, so a data set held in blocks is scored block by block and the results
    summed (what :func:`crestcore.adapters.dask.facility_location` does on every worker). The inner
    products with the candidate rows are computed once for all lists (one matrix product per row tile of
    at most 2^22 entries, never an n x c matrix), and every list is scored from them in one pass, the
    distances formed on the fly as :func:`crestcore.pairwise_distances` forms them (the Numba host kernel
    when Numba imports, else the NumPy reference: the same values up to the order of the sums), in
    float64. Host NumPy arrays only.

    Parameters
    ----------
    X : (n, d) NumPy array of points (real floating, finite).
    C : (c, d) NumPy array of candidate rows.
    orders : sequence of 1-D integer arrays, each a list of distinct rows of ``C`` in greedy order.
    metric : ``"euclidean"``, ``"sqeuclidean"`` or ``"cosine"``.
    kernel : ``"max-minus"`` or ``"exp"``.
    bound : the max-minus kernel's M, required with it (for values comparable between blocks or
        solutions, one bound of every distance of the problem); unused by ``"exp"``.
    scale : the exp kernel's scale, positive; default d (as in :func:`facility_location`); unused by
        ``"max-minus"``.
    ids : optional ``(point_ids, candidate_ids)``, integer arrays of lengths n and c naming the points
        and the candidate rows: a point and a candidate of the same id are one point, at distance 0 from
        itself as in :func:`facility_location` (it matters for a zero row under ``"cosine"``, whose
        cosine with anything is 0: without ``ids`` it is at distance 1 from its own copy among the
        candidates). Candidate ids must be distinct.

    Returns
    -------
    list of ``(objective, weights, gains)`` per pick list: a float and two float64 NumPy arrays of the
    list's length.

    Examples
    --------
    Three points on a line at 0, 1 and 3; the pick lists [point 0, point 2] and [point 1]:

    >>> import numpy as np
    >>> X = np.array([[0.0], [1.0], [3.0]])
    >>> scores = score_orders(X, X, [np.array([0, 2]), np.array([1])], bound=3.0)
    >>> [(obj, w.tolist(), g.tolist()) for obj, w, g in scores]
    [(8.0, [2.0, 1.0], [5.0, 3.0]), (6.0, [3.0], [6.0])]
    """
    for name, A in (("X", X), ("C", C)):
        if not isinstance(A, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array, got {type(A).__name__}")
        if A.ndim != 2:
            raise ValueError(f"{name} must be 2-D (rows, features), got shape {A.shape}")
        if A.dtype.kind != "f":
            raise not_floating(name, A.dtype)
        if not np.all(np.isfinite(A)):
            raise ValueError(f"{name} contains NaN or infinite values")
    if X.shape[1] != C.shape[1]:
        raise ValueError(f"X and C must have the same number of features, got {X.shape[1]} and {C.shape[1]}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "max-minus":
        if (bound is None or isinstance(bound, bool) or not isinstance(bound, numbers.Real)
                or not math.isfinite(float(bound)) or bound < 0):
            raise ValueError(f"bound must be a finite number >= 0 for kernel='max-minus', got {bound!r}")
        scale_v, bound_v = 1.0, float(bound)
    else:
        scale_v, bound_v = kernel_scale(scale, X.shape[1]), 0.0
    if isinstance(orders, np.ndarray):
        raise TypeError("orders must be a sequence of 1-D index arrays (one per pick list), not one array")
    if ids is not None:
        if not (isinstance(ids, (tuple, list)) and len(ids) == 2):
            raise ValueError("ids must be a pair (point_ids, candidate_ids)")
        xid, cid = (np.asarray(v) for v in ids)
        for name, arr, n in (("point_ids", xid, X.shape[0]), ("candidate_ids", cid, C.shape[0])):
            if arr.shape != (n,) or (arr.size and arr.dtype.kind not in "iu"):
                raise ValueError(f"ids: {name} must be a 1-D integer array of length {n}, got shape {arr.shape}, "
                                 f"dtype {arr.dtype}")
        if np.unique(cid).size != cid.size:
            raise ValueError("ids: candidate_ids must be distinct")
    lists = []
    for q, o in enumerate(orders):
        o = np.asarray(o)
        if o.ndim != 1 or (o.size and o.dtype.kind not in "iu"):
            raise ValueError(f"orders[{q}] must be a 1-D integer array, got shape {o.shape} and dtype {o.dtype}")
        o = o.astype(np.int64)
        if o.size and (o.min() < 0 or o.max() >= C.shape[0]):
            raise ValueError(f"orders[{q}] must hold row indices of C in [0, {C.shape[0]})")
        if np.unique(o).size != o.size:
            raise ValueError(f"orders[{q}] must not repeat a row")
        lists.append(o)
    offsets = np.concatenate([[0], np.cumsum([o.size for o in lists])]).astype(np.int64)
    objective = np.zeros(len(lists))
    weights = np.zeros(int(offsets[-1]))
    gains = np.zeros(int(offsets[-1]))
    used = np.unique(np.concatenate(lists)) if offsets[-1] else np.zeros(0, dtype=np.int64)
    back = 0
    if used.size and X.shape[0]:
        # the selection functions' numerics policy: data far from magnitude 1 is scored at magnitude 1 (a
        # power of two, exact; cosine row by row), the bound and scale alike, and the sums scaled back
        X64, C64 = np.asarray(X, dtype=np.float64), np.asarray(C[used], dtype=np.float64)
        Xc, Cc, scale_v, back = prepare(np, X64, metric=metric, kernel="exp" if kernel == "exp" else None,
                                        scale=scale_v, Y=C64)
        if back < 0 and math.frexp(bound_v)[1] - back > 64:
            # a bound beyond 2^64 times the rescaled distances (O(1)): every similarity bound - D rounds
            # to the bound in float64 whatever the scale, and the rescaled bound can pass float64's range
            # (data near 1e-300 with a bound of 1: an OverflowError): scored unscaled, where it is exact
            Xc, Cc, back = X64, C64, 0
        bound_v = math.ldexp(bound_v, -back)
        if metric != "cosine":  # next to the origin, exactly, for the Gram form (as pairwise_distances)
            sh = exact_shift(np, np.concatenate([Xc, Cc]))
            Xc, Cc = Xc - sh, Cc - sh
        cols = np.searchsorted(used, np.concatenate(lists))  # the lists as columns of D (rows of C used)
        kern = get_host_kernel("order_scores") or ref.order_scores
        R, sr = _gram_rows(Cc, metric)
        if ids is not None:  # the used candidates' ids, sorted, for the search of each tile's own points
            c_ids = cid[used].astype(np.int64)
            c_order = np.argsort(c_ids, kind="stable")
            c_sorted = c_ids[c_order]
        tile = max(1, _SCORE_TILE_ELEMENTS // used.size)
        for a in range(0, X.shape[0], tile):
            P, sp = _gram_rows(Xc[a:a + tile], metric)
            G = P @ R.T
            if ids is not None:  # a point against its own copy: distance 0 (D = sp + sr - 2G = 0 exactly)
                x_ids = xid[a:a + tile].astype(np.int64)
                at = np.minimum(np.searchsorted(c_sorted, x_ids), c_sorted.size - 1)
                hit = np.flatnonzero(c_sorted[at] == x_ids)
                col = c_order[at[hit]]
                G[hit, col] = 1.0 if metric == "cosine" else 0.5 * (sp[hit] + sr[col])
            o, w, g = kern(G, sp, sr, cols, offsets, metric, kernel, bound_v, scale_v)
            objective += o
            weights += w
            gains += g
    objective = restore(np, objective, back, np.dtype(np.float64), "objective")
    gains = restore(np, gains, back, np.dtype(np.float64), "gains")
    return [(float(objective[q]), weights[offsets[q]:offsets[q + 1]], gains[offsets[q]:offsets[q + 1]])
            for q in range(len(lists))]
