#!/usr/bin/env python
"""Selection benchmarks S1-S3 (see benchmarks/README.md): crestcore vs its peers, side by side.

    python benchmarks/selection.py [--suite S1,S2,S3] [--out docs/benchmarks.md] [--repeats 5] [--quick]

S1  the CREST selection step, Fashion-MNIST shape (P=10 subsets of r=600, C=10 classes, m=128, d=10):
    crestcore.minibatch_coresets (kernel="exp", metric="euclidean", class_budget="ceil") vs the CREST
    release's path (one submodlib LazyGreedy call per class per subset plus a Python weights loop,
    re-expressed here) vs apricot per problem, all on the same subsets.
S2  one dense problem (n=5000, d=10, k=500, float64 and float32): crestcore.facility_location
    (metric="sqeuclidean", kernel="max-minus" = apricot's 'euclidean' similarity) vs apricot lazy and
    naive vs submodlib LazyGreedy on a precomputed kernel.
S3  large n (n=60,000, d=10, k=10%): crestcore's matrix-free path, time and peak memory. Apricot is not
    run there (it needs n*n*8 bytes, ~29 GB); its memory is extrapolated.

Every (suite, method) runs in a fresh subprocess (its own Numba cache directory, so JIT compile time is
measured cold) with the same thread settings: a tiny warm-up call (compile), full-size warm-up calls
for ``--warmup-s`` seconds (at least one), then ``--repeats`` timed calls, whose median is reported, and
one more call with its peak memory measured around it. Objectives
of every method's picks are recomputed by one common float64 function on the same similarities.
"""

from __future__ import annotations

import os
import sys


def _early_threads(argv) -> int:
    """--threads must be known before NumPy/Numba import (they read the environment once)."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return int(os.environ.get("CREST_BENCH_THREADS", min(2, os.cpu_count() or 1)))


THREADS = _early_threads(sys.argv)
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
for _v in THREAD_VARS:
    os.environ[_v] = str(THREADS)

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT_TAG = "@@BENCH-RESULT@@"
RUN_CACHE: str | None = None  # Numba cache shared by this run's processes after the cold-compile measurement
S1_TARGET_S, S1_TARGET_RATIO = 1.5e-3, 35.0  # issue #14's S1 target: a step and the ratio to the release path
WARMUP_S = 0.25  # --warmup-s: full-size warm-up calls for at least this long before the timed ones
MARK_START = "<!-- selection-bench:start -->"
MARK_END = "<!-- selection-bench:end -->"

# --------------------------------------------------------------------------------------------------
# problem sizes
# --------------------------------------------------------------------------------------------------

FULL = {
    "S1": dict(n_total=60_000, C=10, P=10, r=600, m=128, seed=0),
    "S2": dict(n=5000, d=10, k=500, seed=1, dtypes=["float64", "float32"]),
    "S3": dict(ns=[20_000, 60_000], d=10, frac=0.10, seed=2, max_dense_bytes=1 << 30),
}
QUICK = {
    "S1": dict(n_total=6000, C=10, P=3, r=200, m=32, seed=0),
    "S2": dict(n=600, d=10, k=60, seed=1, dtypes=["float64", "float32"]),
    "S3": dict(ns=[3000, 6000], d=10, frac=0.10, seed=2, max_dense_bytes=8 << 20),
}

# --------------------------------------------------------------------------------------------------
# data (deterministic from the seed; regenerated identically in every process)
# --------------------------------------------------------------------------------------------------


def s1_data(n_total: int, C: int, seed: int):
    """Last-layer-gradient-like features g = softmax(z) - onehot(y), float64 like the release's arrays.

    Balanced labels (Fashion-MNIST: 6000 per class); logits pull ~80% of examples towards their class
    (well learnt: g near 0) and leave the rest confused, so the rows lie in the gradient space.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(C), n_total // C)
    labels = np.concatenate([labels, rng.integers(0, C, n_total - labels.size)])
    rng.shuffle(labels)
    onehot = np.eye(C)[labels]
    learnt = rng.random(n_total) < 0.8
    z = 1.5 * rng.standard_normal((n_total, C)) + 4.0 * onehot * learnt[:, None]
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return (p - onehot).astype(np.float64), labels.astype(np.int64)


def dense_data(n: int, d: int, seed: int, dtype: str):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(dtype)


# --------------------------------------------------------------------------------------------------
# process-level measurement helpers
# --------------------------------------------------------------------------------------------------


def _proc_status_kb(field: str):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) on Linux; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_kb():
    hwm = _proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _malloc_release() -> bool:
    """Make freed memory visible to RSS before a peak measurement (glibc): hand free heap pages back and
    serve every allocation >= 64 KiB by mmap (unmapped on free), so memory freed by the warm-up/timed calls
    and reused from the heap cannot hide the measured call's allocations."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 64 * 1024) == 1  # M_MMAP_THRESHOLD (fixed: disables the dynamic threshold)
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
        return bool(ok)
    except Exception:
        return False


def _sha(a) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# common objective functions (orchestrator side; one function per suite for every method)
# --------------------------------------------------------------------------------------------------


def _sqdist_direct(A, B):
    """Exact squared euclidean distances by differences, float64, chunked over rows of A."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    out = np.empty((A.shape[0], B.shape[0]))
    step = max(1, int(2e7 // max(1, B.shape[0] * A.shape[1])))
    for a in range(0, A.shape[0], step):
        diff = A[a : a + step, None, :] - B[None, :, :]
        out[a : a + step] = np.einsum("ijk,ijk->ij", diff, diff)
    return out


def s1_objective(F, labels, subsets, picks, scale):
    """Sum over subsets p and classes c of F_pc(S) with s_ij = exp(-||g_i - g_j||_2 / scale)."""
    per_subset, problems = [], []
    for p in range(subsets.shape[0]):
        sub = subsets[p]
        pk = np.asarray([q for q in picks[p] if q >= 0], dtype=np.int64)
        if not np.all(np.isin(pk, sub)) or np.unique(pk).size != pk.size:
            raise ValueError(f"subset {p}: picks outside the subset or repeated")
        tot = 0.0
        for c in np.unique(labels[sub]):
            mem = sub[labels[sub] == c]
            pc = pk[labels[pk] == c]
            if pc.size == 0:
                problems.append(0.0)
                continue
            S = np.exp(-np.sqrt(_sqdist_direct(F[mem], F[pc])) / scale)
            v = float(S.max(axis=1).sum())
            problems.append(v)
            tot += v
        per_subset.append(tot)
    return float(sum(per_subset)), per_subset, problems


def s1_divergence(F, labels, subsets, picks_a, picks_b, scale):
    """Where two methods' greedy orders differ on a (subset, class) problem: the first step at which they
    differ and the relative gap between the two candidates' exact float64 gains at that step (computed on
    the common prefix). Returns (n_problems_differing, max_relative_gain_gap)."""
    n_diff, worst = 0, 0.0
    for p in range(subsets.shape[0]):
        sub = subsets[p]
        a_all = np.asarray([q for q in picks_a[p] if q >= 0], dtype=np.int64)
        b_all = np.asarray([q for q in picks_b[p] if q >= 0], dtype=np.int64)
        for c in np.unique(labels[sub]):
            a = a_all[labels[a_all] == c]
            b = b_all[labels[b_all] == c]
            if a.size == b.size and np.array_equal(a, b):
                continue
            n_diff += 1
            t = next((i for i in range(min(a.size, b.size)) if a[i] != b[i]), None)
            if t is None:
                continue
            mem = sub[labels[sub] == c]
            S = np.exp(-np.sqrt(_sqdist_direct(F[mem], F[mem])) / scale)
            pos = {int(g): i for i, g in enumerate(mem)}
            pref = [pos[int(g)] for g in a[:t]]
            cover = S[:, pref].max(axis=1) if pref else np.zeros(mem.size)
            gains = np.maximum(S - cover[:, None], 0.0).sum(axis=0)
            ga, gb = gains[pos[int(a[t])]], gains[pos[int(b[t])]]
            worst = max(worst, abs(ga - gb) / max(abs(ga), abs(gb), 1e-300))
    return n_diff, float(worst)


def maxminus_sq_objective(X, picks):
    """F(S) with s_ij = max(D^2) - D^2_ij (squared euclidean, max over all pairs) for one dense problem."""
    X = np.asarray(X, dtype=np.float64)
    picks = np.asarray(picks, dtype=np.int64)
    n = X.shape[0]
    if n <= 20_000:  # exact differences
        M = 0.0
        for a in range(0, n, 500):
            M = max(M, float(_sqdist_direct(X[a : a + 500], X).max()))
        mind = _sqdist_direct(X, X[picks]).min(axis=1)
        return float(np.sum(M - mind)), M
    # large n: Gram form in float64, tile by tile; exact zero for a point's distance to itself
    sq = np.einsum("ij,ij->i", X, X)
    M = 0.0
    tile = 500
    for a in range(0, n, tile):
        G = X[a : a + tile] @ X.T
        D = sq[a : a + tile, None] + sq[None, :] - 2.0 * G
        M = max(M, float(D.max()))
    P = X[picks]
    sqp = sq[picks]
    total = 0.0
    pos = np.full(n, -1, dtype=np.int64)
    pos[picks] = np.arange(picks.size)
    for a in range(0, n, tile):
        D = sq[a : a + tile, None] + sqp[None, :] - 2.0 * (X[a : a + tile] @ P.T)
        np.maximum(D, 0.0, out=D)
        rows = np.arange(a, min(n, a + tile))
        hit = pos[rows] >= 0
        D[np.flatnonzero(hit), pos[rows[hit]]] = 0.0
        total += float(np.sum(M - D.min(axis=1)))
    return total, M


# --------------------------------------------------------------------------------------------------
# the CREST release's selection path, re-expressed (per subset, per class: one submodlib LazyGreedy
# call on exp(-d / n_features) built by submodlib from the features; weights by a Python loop)
# --------------------------------------------------------------------------------------------------


def _release_class(Xc, budget, precomputed_S=None):
    from submodlib import FacilityLocationFunction

    n_c = Xc.shape[0]
    if precomputed_S is None:  # as released: submodlib builds its 'euclidean' kernel from the data
        fl = FacilityLocationFunction(n=n_c, mode="dense", data=Xc, metric="euclidean")
    else:
        fl = FacilityLocationFunction(n=n_c, mode="dense", separate_rep=False, sijs=precomputed_S)
    picked = fl.maximize(budget=budget, optimizer="LazyGreedy", stopIfZeroGain=False,
                         stopIfNegativeGain=False, verbose=False, show_progress=False)
    order = np.asarray([e[0] for e in picked], dtype=np.int64)
    sims = fl.sijs
    sizes = np.zeros(budget, dtype=np.float64)
    for i in range(n_c):  # the release's weights: cluster sizes, one row at a time
        row = sims[i, order]
        if np.max(row) <= 0:
            continue
        sizes[int(np.argmax(row))] += 1
    sizes[sizes == 0] = 1
    return order, sizes


def release_step(F, labels, r, P, m, seed, scale, precompute=False):
    """P coresets from the same subsets crestcore draws (crestcore.draw_subsets, same seed)."""
    from crestcore import draw_subsets

    subsets = draw_subsets(labels, np.arange(F.shape[0], dtype=np.int64), r, P, np.random.default_rng(seed))
    classes = np.unique(labels)
    per = math.ceil(m / classes.size)  # the release's equal_num budget: ceil(B / C) per class
    out_idx, out_w = [], []
    for p in range(P):
        sub = subsets[p]
        preds = F[sub]
        y = labels[sub]
        idx_p, w_p = [], []
        for c in classes:
            cls = np.flatnonzero(y == c)
            Xc = preds[cls]
            S = np.exp(-np.sqrt(_sqdist_direct(Xc, Xc)) / scale) if precompute else None
            order, sizes = _release_class(Xc, min(per, cls.size - 1), S)
            idx_p.append(sub[cls[order]])
            w_p.append(sizes)
        out_idx.append(np.concatenate(idx_p))
        out_w.append(np.concatenate(w_p))
    return subsets, out_idx, out_w


def apricot_step(F, labels, r, P, m, seed, scale):
    """apricot FacilityLocationSelection per (subset, class) problem on the same exp kernel."""
    from apricot import FacilityLocationSelection

    from crestcore import draw_subsets

    subsets = draw_subsets(labels, np.arange(F.shape[0], dtype=np.int64), r, P, np.random.default_rng(seed))
    classes = np.unique(labels)
    per = math.ceil(m / classes.size)
    out_idx, out_w = [], []
    for p in range(P):
        sub = subsets[p]
        y = labels[sub]
        idx_p, w_p = [], []
        for c in classes:
            mem = sub[y == c]
            S = np.exp(-np.sqrt(_sqdist_direct(F[mem], F[mem])) / scale)
            k = min(per, mem.size)
            sel = FacilityLocationSelection(k, metric="precomputed", optimizer="lazy").fit(S)
            order = np.asarray(sel.ranking, dtype=np.int64)
            w = np.bincount(np.argmax(S[:, order], axis=1), minlength=k).astype(np.float64)
            idx_p.append(mem[order])
            w_p.append(w)
        out_idx.append(np.concatenate(idx_p))
        out_w.append(np.concatenate(w_p))
    return subsets, out_idx, out_w


# --------------------------------------------------------------------------------------------------
# worker: one (suite, method) per fresh process
# --------------------------------------------------------------------------------------------------


def _dispatch_info(kind: str):
    """Which crestcore kernels would run natively (numba) for NumPy input here."""
    from crestcore.backends import available_backends, get_kernel

    info = {"backends": available_backends()}
    S = np.zeros((2, 4, 4))
    valid = np.ones((2, 4), dtype=bool)
    budgets = np.array([2, 2], dtype=np.int64)
    idx = np.zeros((2, 2), dtype=np.int64)
    X = np.zeros((2, 4, 3))
    try:
        info["native"] = {
            "similarity_batched": get_kernel("similarity_batched", "numpy", X, valid) is not None,
            "greedy_batched": get_kernel("greedy_batched", "numpy", S, valid, budgets) is not None,
            "assign_batched": get_kernel("assign_batched", "numpy", S, valid, idx) is not None,
            "greedy_features": get_kernel("greedy_features", "numpy", np.zeros((8, 3))) is not None,
        }
    except Exception as exc:  # a half-written backend must not kill the benchmark
        info["native"] = {"error": repr(exc)[:200]}
    return info


def _build(spec):
    """(tiny_call, full_call, payload_fn) for this spec. payload_fn(out) -> JSON-able dict."""
    suite, method, prm = spec["suite"], spec["method"], spec["params"]
    if suite == "S1":
        F, labels = s1_data(prm["n_total"], prm["C"], prm["seed"])
        P, r, m, C, seed = prm["P"], prm["r"], prm["m"], prm["C"], prm["seed"]
        scale = float(C)
        if method.startswith("crestcore"):  # crestcore, crestcore-1thread, crestcore-reference
            from crestcore import minibatch_coresets

            backend = "reference" if method == "crestcore-reference" else "auto"

            def run(P_=P):
                return minibatch_coresets(F, labels, m=m, r=r, P=P_, rng=seed, per_class=True, kernel="exp",
                                          metric="euclidean", optimizer="lazy", class_budget="ceil",
                                          scale=scale, backend=backend)

            def payload(cs):
                idx = np.asarray(cs.indices)
                return {"subsets_sha": _sha(np.asarray(cs.subsets)), "picks": idx.tolist(),
                        "weights": np.asarray(cs.weights).tolist(),
                        "own_objective": float(np.sum(np.asarray(cs.objective, dtype=np.float64)))}

            return (lambda: run(1)), run, payload
        if method == "draw-subsets":
            from crestcore import draw_subsets
            from crestcore.backends import get_host_kernel

            # as inside the crestcore step, where the solve has started Numba: its host kernel draws (a
            # process without Numba draws with the NumPy reference, the same subsets, for small draws)
            get_host_kernel("draw_stratified")

            pool = np.arange(F.shape[0], dtype=np.int64)

            def run(P_=P):
                return draw_subsets(labels, pool, r, P_, np.random.default_rng(seed))

            return (lambda: run(1)), run, (lambda out: {"subsets_sha": _sha(out)})
        if method in ("release", "release-precomputed"):
            pre = method == "release-precomputed"

            def run(P_=P):
                return release_step(F, labels, r, P_, m, seed, scale, precompute=pre)
        elif method == "apricot":
            def run(P_=P):
                return apricot_step(F, labels, r, P_, m, seed, scale)
        else:
            raise ValueError(method)

        def payload(out):
            subsets, idx, w = out
            return {"subsets_sha": _sha(subsets), "picks": [a.tolist() for a in idx],
                    "weights": [a.tolist() for a in w]}

        return (lambda: run(1)), run, payload

    if suite == "S2":
        X = dense_data(prm["n"], prm["d"], prm["seed"], prm["dtype"])
        k = prm["k"]
        Xt = dense_data(64, prm["d"], 99, prm["dtype"])
        if method.startswith("crestcore"):
            from crestcore import facility_location

            opt = "naive" if method == "crestcore-naive" else "lazy"
            forced = method == "crestcore-matrixfree"

            def call(A, kk):
                # forced: a quarter of the dense size (tiles of n/16 rows), so the warm-up takes the same path
                mdb = (A.shape[0] ** 2 * A.itemsize) // 4 if forced else 1 << 30
                return facility_location(A, kk, metric="sqeuclidean", kernel="max-minus", optimizer=opt,
                                         max_dense_bytes=mdb)

            def payload(sel):
                return {"picks": np.asarray(sel.indices).tolist(),
                        "own_objective": float(np.asarray(sel.objective, dtype=np.float64))}

            return (lambda: call(Xt, 8)), (lambda: call(X, k)), payload
        if method.startswith("apricot"):
            from apricot import FacilityLocationSelection

            opt = "naive" if method == "apricot-naive" else "lazy"

            def call(A, kk):
                return FacilityLocationSelection(kk, metric="euclidean", optimizer=opt).fit(A)

            def payload(sel):
                return {"picks": np.asarray(sel.ranking).tolist(),
                        "own_objective": float(np.sum(sel.gains))}

            return (lambda: call(Xt, 8)), (lambda: call(X, k)), payload
        if method == "submodlib-lazy":
            from submodlib import FacilityLocationFunction

            def call(A, kk):
                sq = np.einsum("ij,ij->i", A, A)
                D = sq[:, None] + sq[None, :] - 2.0 * (A @ A.T)
                np.maximum(D, 0, out=D)
                np.fill_diagonal(D, 0)
                S = D.max() - D
                fl = FacilityLocationFunction(n=A.shape[0], mode="dense", separate_rep=False, sijs=S)
                return fl.maximize(budget=kk, optimizer="LazyGreedy", stopIfZeroGain=False,
                                   stopIfNegativeGain=False, verbose=False, show_progress=False)

            def payload(out):
                return {"picks": [int(e[0]) for e in out], "own_objective": float(sum(e[1] for e in out))}

            return (lambda: call(Xt, 8)), (lambda: call(X, k)), payload
        raise ValueError(method)

    if suite == "S3":
        from crestcore import facility_location

        n = prm["n"]
        X = dense_data(n, prm["d"], prm["seed"], "float64")
        k = max(1, int(round(prm["frac"] * n)))
        mdb = prm["max_dense_bytes"]
        Xt = dense_data(400, prm["d"], 99, "float64")

        def call(A, kk, mdb_):
            return facility_location(A, kk, metric="sqeuclidean", kernel="max-minus", optimizer="lazy",
                                     max_dense_bytes=mdb_)

        def payload(sel):
            return {"picks": np.asarray(sel.indices).tolist(), "k": k,
                    "own_objective": float(np.asarray(sel.objective, dtype=np.float64)),
                    "matrix_free": n * n * 8 > mdb}

        return (lambda: call(Xt, 40, 1 << 16)), (lambda: call(X, k, mdb)), payload
    raise ValueError(suite)


def worker(spec) -> dict:
    res = {"suite": spec["suite"], "method": spec["method"], "params": spec["params"]}
    try:
        res["loadavg_before"] = os.getloadavg()[0]
    except OSError:
        pass
    t0 = time.perf_counter()
    tiny, full, payload = _build(spec)
    res["setup_s"] = time.perf_counter() - t0
    if spec["method"].startswith("crestcore"):
        res["dispatch"] = _dispatch_info(spec["suite"])
    t0 = time.perf_counter()
    tiny()
    res["tiny_first_s"] = time.perf_counter() - t0
    if spec.get("compile_only"):
        return res
    repeats = int(spec["repeats"])

    def measured_call():
        """One full-size call with its peak RSS above the RSS just before it."""
        gc.collect()
        res["malloc_release_ok"] = _malloc_release()
        res["peak_reset_ok"] = _reset_peak()
        rss0 = _proc_status_kb("VmRSS") or 0
        t0 = time.perf_counter()
        o = full()
        dt = time.perf_counter() - t0
        peak = _peak_kb()
        res["rss_before_mb"] = rss0 / 1024
        res["peak_rss_mb"] = peak / 1024
        res["peak_extra_mb"] = (peak - rss0) / 1024
        return o, dt

    if repeats == 0:  # one run only: it is both the timed and the memory-measured call
        out, res["first_s"] = measured_call()
        times = []
    else:  # full-size warm-up calls, timed calls, then a separate memory-measured call
        t0 = time.perf_counter()
        out = full()
        res["first_s"] = time.perf_counter() - t0
        # more full-size calls until warmup_s has passed: a process's first calls run slower (allocator,
        # caches; 1.76 -> 1.26 ms over the first five S1 steps), and a training loop calls the step again
        # and again, so the steady state is what is timed, for every method alike
        warm = 1
        while time.perf_counter() - t0 < float(spec.get("warmup_s", 0.0)):
            out = full()
            warm += 1
        res["warmup_calls"] = warm
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = full()
            times.append(time.perf_counter() - t0)
        out, res["mem_call_s"] = measured_call()
    try:
        res["loadavg_after"] = os.getloadavg()[0]
    except OSError:
        pass
    res["times_s"] = times
    res["median_s"] = float(np.median(times)) if times else res["first_s"]
    res["timed_runs"] = len(times) if times else 1
    res.update(payload(out))
    return res


# --------------------------------------------------------------------------------------------------
# orchestrator
# --------------------------------------------------------------------------------------------------


def run_worker(spec, cache_dir=None, timeout=None, threads=None) -> dict:
    env = dict(os.environ)
    cache_dir = cache_dir or RUN_CACHE
    own_cache = cache_dir is None
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="crest-bench-numba-")
    env["NUMBA_CACHE_DIR"] = cache_dir
    env["PYTHONUNBUFFERED"] = "1"
    spec = {"warmup_s": WARMUP_S, **spec}
    label = f"{spec['suite']}/{spec['method']}" + (f"[{spec['params'].get('dtype', '')}]" if "dtype" in spec["params"] else "")
    print(f"  running {label} ...", end="", flush=True, file=sys.stderr)
    t0 = time.perf_counter()
    try:
        cp = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--threads", str(threads or THREADS), "--worker",
                             json.dumps(spec)], env=env, capture_output=True, text=True, timeout=timeout,
                            cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        print(f" TIMEOUT after {timeout}s", file=sys.stderr)
        return {"suite": spec["suite"], "method": spec["method"], "params": spec["params"],
                "error": f"timed out after {timeout} s"}
    finally:
        if own_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
    wall = time.perf_counter() - t0
    for line in cp.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            print(f" {res.get('median_s', res.get('tiny_first_s', 0)):.4g} s (process {wall:.1f} s)", file=sys.stderr)
            return res
    print(" FAILED", file=sys.stderr)
    tail = (cp.stderr or "")[-1500:]
    last = tail.strip().splitlines()[-1] if tail.strip() else ""
    if last.startswith("ModuleNotFoundError"):  # a peer library not installed (review 90)
        last += " (the peers come with the bench extra: pip install -e '.[bench]')"
    return {"suite": spec["suite"], "method": spec["method"], "params": spec["params"],
            "error": f"worker exit {cp.returncode}: {last}", "stderr_tail": tail}


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def suite_s1(sizes, repeats, timeout, apricot_repeats=0):
    prm = sizes["S1"]
    C = prm["C"]
    methods = [("crestcore", repeats), ("crestcore-1thread", repeats), ("crestcore-reference", repeats),
               ("release", repeats), ("release-precomputed", repeats), ("apricot", apricot_repeats),
               ("draw-subsets", repeats)]
    # JIT compile, cold (empty cache directory) and then from the on-disk cache (second process)
    cache = tempfile.mkdtemp(prefix="crest-bench-numba-cold-")
    try:
        cold = run_worker({"suite": "S1", "method": "crestcore", "params": prm, "repeats": 0,
                           "compile_only": True}, cache_dir=cache, timeout=timeout)
        warm = run_worker({"suite": "S1", "method": "crestcore", "params": prm, "repeats": 0,
                           "compile_only": True}, cache_dir=cache, timeout=timeout)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    rows = {}
    for meth, rep in methods:
        rows[meth] = run_worker({"suite": "S1", "method": meth, "params": prm, "repeats": rep}, timeout=timeout,
                                threads=1 if meth == "crestcore-1thread" else None)
    F, labels = s1_data(prm["n_total"], C, prm["seed"])
    from crestcore import draw_subsets

    subsets = draw_subsets(labels, np.arange(F.shape[0], dtype=np.int64), prm["r"], prm["P"],
                           np.random.default_rng(prm["seed"]))
    ref_sha = _sha(subsets)
    for _meth, row in rows.items():
        if "error" in row:
            continue
        row["same_subsets"] = row["subsets_sha"] == ref_sha
        if "picks" not in row:
            continue
        obj, per_subset, per_problem = s1_objective(F, labels, subsets, row["picks"], float(C))
        row["objective"], row["objective_per_subset"], row["objective_per_problem"] = obj, per_subset, per_problem
        row["picks_total"] = int(sum(1 for p in row["picks"] for q in p if q >= 0))
    base = rows.get("crestcore")
    draw = rows.get("draw-subsets", {}).get("median_s")
    for meth, row in rows.items():
        if "error" in row or base is None or "error" in base:
            continue
        row["ratio"] = row["median_s"] / base["median_s"]
        if draw is not None and "picks" in row and base["median_s"] > draw:
            row["ratio_ex_draw"] = max(row["median_s"] - draw, 0.0) / (base["median_s"] - draw)
        if "picks" not in row:
            continue
        row["obj_rel_diff"] = _rel(row["objective"], base["objective"])
        a = np.asarray(row["objective_per_problem"])
        b = np.asarray(base["objective_per_problem"])
        row["max_problem_rel_diff"] = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))
        same = [set(q for q in x if q >= 0) == set(q for q in y if q >= 0) for x, y in zip(row["picks"], base["picks"])]
        row["same_picks"] = f"{sum(same)}/{len(same)} coresets"
        if meth != "crestcore":
            row["diverging_problems"], row["max_gain_gap_at_divergence"] = s1_divergence(
                F, labels, subsets, row["picks"], base["picks"], float(C))
    return {"params": prm, "rows": rows, "compile": {"cold": cold, "warm_cache": warm}}


def suite_s2(sizes, repeats, timeout):
    prm0 = sizes["S2"]
    out = {}
    for dt in prm0["dtypes"]:
        prm = {k: v for k, v in prm0.items() if k != "dtypes"}
        prm["dtype"] = dt
        methods = [("crestcore", repeats), ("crestcore-naive", 0), ("crestcore-matrixfree", repeats),
                   ("apricot-lazy", repeats), ("apricot-naive", 0), ("submodlib-lazy", repeats)]
        rows = {}
        for meth, rep in methods:
            rows[meth] = run_worker({"suite": "S2", "method": meth, "params": prm, "repeats": rep}, timeout=timeout)
        X = dense_data(prm["n"], prm["d"], prm["seed"], dt)
        for row in rows.values():
            if "error" in row:
                continue
            picks = np.asarray(row["picks"], dtype=np.int64)
            row["valid_picks"] = bool(picks.size == prm["k"] and np.unique(picks).size == picks.size)
            row["objective"], row["M"] = maxminus_sq_objective(X, picks)
        base = rows.get("crestcore")
        for row in rows.values():
            if "error" in row or base is None or "error" in base:
                continue
            row["ratio"] = row["median_s"] / base["median_s"]
            row["obj_rel_diff"] = _rel(row["objective"], base["objective"])
            row["same_picks"] = f"{len(set(row['picks']) & set(base['picks']))}/{prm['k']}"
        out[dt] = {"params": prm, "rows": rows}
    return out


def suite_s3(sizes, repeats, timeout):
    prm0 = sizes["S3"]
    rows = {}
    for n in prm0["ns"]:
        prm = {"n": n, "d": prm0["d"], "frac": prm0["frac"], "seed": prm0["seed"],
               "max_dense_bytes": prm0["max_dense_bytes"]}
        # minutes per run at full size: one timed run (the first full-size call), as BENCHMARKS.md allows for S3
        row = run_worker({"suite": "S3", "method": "crestcore-matrixfree", "params": prm, "repeats": 0},
                         timeout=timeout)
        if "error" not in row:
            X = dense_data(n, prm["d"], prm["seed"], "float64")
            row["objective"], row["M"] = maxminus_sq_objective(X, np.asarray(row["picks"], dtype=np.int64))
            row["own_rel_diff"] = _rel(row["own_objective"], row["objective"])
        rows[n] = row
    return {"params": prm0, "rows": rows}


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def machine_info():
    info = {"nproc": os.cpu_count(), "cpu": platform.processor() or "?", "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import os as _os

        info["affinity"] = len(_os.sched_getaffinity(0))
    except Exception:
        pass
    vers = {}
    for mod, name in (("numpy", "numpy"), ("numba", "numba"), ("apricot", "apricot-select"),
                      ("submodlib", "submodlib-py"), ("sklearn", "scikit-learn"), ("crestcore", "crestcore")):
        try:
            from importlib.metadata import version

            vers[name] = version(name)
        except Exception:
            try:
                vers[name] = __import__(mod).__version__
            except Exception:
                vers[name] = "missing"
    info["versions"] = vers
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    info["threads"] = {v: os.environ.get(v) for v in THREAD_VARS}
    return info


def _t(s):
    if s is None:
        return "-"
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _mb(x):
    return "-" if x is None else (f"{x / 1024:.2f} GB" if x >= 1024 else f"{x:.0f} MB")


def _x(r):
    return "-" if r is None else (f"{r:.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x")


def _f2(v):
    return f"{v[0]:.2f}" if v else "?"


def _loads(rows) -> str:
    parts = []
    for meth, row in rows.items():
        if "loadavg_before" in row:
            parts.append(f"{meth} {row['loadavg_before']:.1f}->{row.get('loadavg_after', float('nan')):.1f}")
    return "1-min load average before->after each method: " + "; ".join(parts) if parts else ""


def _timing(row) -> str:
    """A method's median time (with the number of timed runs) and its ratio to crestcore: two table cells."""
    return f"{_t(row['median_s'])} (n={row['timed_runs']}) | {_x(row.get('ratio'))}"


def _method_table(header: str, rows: dict, names: dict, cells) -> list[str]:
    """The lines of a markdown table with one row per method, and a blank line after it: ``header``, the
    separator, then per method of ``rows`` (named by ``names``, else its key) its name, its timing cells
    (:func:`_timing`) and ``cells(row)`` (the rest of the row, from the end of the timing cell on), or an
    error row for a method that failed."""
    ncols = header.count("|") - 1
    lines = [header, "|" + "---|" * ncols]
    for meth, row in rows.items():
        name = names.get(meth, meth)
        if "error" in row:
            lines.append(f"| {name} | error: {row['error']} |" + " |" * (ncols - 2))
        else:
            lines.append(f"| {name} | {_timing(row)}{cells(row)}")
    return lines + [""]


def _native(row):
    d = row.get("dispatch", {}).get("native", {})
    if "error" in d:
        return f"dispatch error: {d['error']}"
    return ", ".join(f"{k}={'numba' if v else 'reference'}" for k, v in d.items())


S1_NAMES = {
    "crestcore": "crestcore `minibatch_coresets` (numba path, one batched call)",
    "crestcore-1thread": "crestcore `minibatch_coresets`, numba path with 1 thread (info: contention check)",
    "crestcore-reference": "crestcore `minibatch_coresets`, `backend=\"reference\"` (info)",
    "draw-subsets": "`crestcore.draw_subsets` alone, Numba started as in the step (info: part of every row above)",
    "release": "CREST release path: submodlib LazyGreedy per class per subset (kernel built by submodlib from the data) + Python weights loop",
    "release-precomputed": "release path with the exp kernel precomputed in NumPy (`sijs=`), else the same",
    "apricot": "apricot `FacilityLocationSelection(metric='precomputed', optimizer='lazy')` per problem, same exp kernel",
}
S1_SHORT = {"crestcore-1thread": "crestcore 1 thread", "crestcore-reference": "crestcore reference",
            "release": "release", "release-precomputed": "release (precomputed kernel)", "apricot": "apricot"}
S2_NAMES = {
    "crestcore": "crestcore `facility_location` lazy (metric=sqeuclidean, kernel=max-minus)",
    "crestcore-naive": "crestcore naive (info; **one run**)",
    "crestcore-matrixfree": "crestcore lazy, matrix-free path forced (`max_dense_bytes` = n^2 x itemsize / 4; info)",
    "apricot-lazy": "apricot `FacilityLocationSelection(metric='euclidean', optimizer='lazy').fit(X)`",
    "apricot-naive": "apricot `optimizer='naive'` (**one run**)",
    "submodlib-lazy": "submodlib LazyGreedy, precomputed kernel (kernel build in NumPy included)",
}


def render(results, args, argv) -> str:
    mi = results["machine"]
    L = [MARK_START, "", "## Selection benchmarks (S1-S3)", ""]
    L.append(f"Generated by `benchmarks/selection.py` on {results['date']}. Reproduce with:")
    L.append("")
    L.append("```")
    L.append(results["command"])
    L.append("```")
    L.append("")
    L.append(f"- Machine: {mi['nproc']} logical CPUs ({mi['cpu']}), Python {mi['python']}, {mi['platform']}")
    L.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in mi["versions"].items()))
    if "loadavg_start" in mi:
        la = lambda v: "/".join(f"{x:.2f}" for x in v)  # noqa: E731
        L.append(f"- Load average (1/5/15 min) at start {la(mi['loadavg_start'])}, at end "
                 f"{la(mi.get('loadavg_end', ()))} (other jobs share this machine)")
        if max(mi["loadavg_start"][0], mi.get("loadavg_end", (0,))[0]) > (mi["nproc"] or 1):
            L.append("- **Warning: the load average exceeded the number of CPUs during this run; parallel "
                     "(Numba prange) kernels suffer more than single-threaded peers under contention, so the "
                     "ratios below are noisier than usual and likely unfavourable to crestcore.**")
    L.append("- Threads pinned for every process: " + ", ".join(f"{k}={v}" for k, v in mi["threads"].items()))
    L.append("- Method: each method in a fresh process; a tiny warm-up call (JIT compile: measured cold, with an "
             "empty Numba cache, for S1 below; later processes of the run share one on-disk cache, so their tiny "
             "call is a cache load unless a new dtype specialization compiles), "
             + (f"full-size warm-up calls for at least {results['warmup_s']:g} s (at least one; a process's first "
                "calls run slower), " if results.get("warmup_s") else "one full-size warm-up call, ")
             + "the median of the timed calls (n in each row), then one more call for peak "
             "memory (glibc heap trimmed and allocations >= 64 KiB forced to mmap, VmHWM reset via "
             "/proc/self/clear_refs; reported as the peak RSS increase over the RSS before the call; methods "
             "marked n=1 run once, timed and measured in the same call). "
             "Objectives of every method's picks recomputed by one common float64 function on the same similarities. "
             "The machine is shared: read the ratios, not the absolute times.")
    if results.get("quick"):
        L.append("- **--quick run: reduced sizes, smoke test only; not a result.**")
    nb = results.get("numba_status", "")
    if nb:
        L.append(f"- crestcore NumPy dispatch: {nb}")
    L.append("")
    for key, meta in results.get("reused", {}).items():
        la = meta.get("machine", {})
        L.append(f"- {key} below is reused from an earlier run on {meta.get('date')} (`{meta.get('command')}`, "
                 f"1-min load average at its start/end {_f2(la.get('loadavg_start'))}/{_f2(la.get('loadavg_end'))}), "
                 "not re-measured by the command above.")
    if results.get("reused"):
        L.append("")

    if "S1" in results:
        s = results["S1"]
        p = s["params"]
        rows = s["rows"]
        per = math.ceil(p["m"] / p["C"])
        L.append(f"### S1: CREST selection step (P={p['P']} subsets of r={p['r']}, C={p['C']}, m={p['m']} -> "
                 f"{per} per class, {p['C'] * per} per coreset, d={p['C']}, float64 features from {p['n_total']} "
                 "examples)")
        L.append("")
        L.append("crestcore runs `kernel=\"exp\", metric=\"euclidean\", class_budget=\"ceil\", scale=C` (the release's "
                 "`exp(-||g_i-g_j||_2 / C)` per class); every method works on the same subsets "
                 "(`crestcore.draw_subsets`, same seed; drawing them is inside every timed step). Objective = "
                 "sum over the P x C problems of F(S) on the exp kernel, recomputed in float64.")
        L.append("")

        def s1_cells(row):
            subsets_rss = f"{'yes' if row.get('same_subsets') else 'NO'} | {_mb(row.get('peak_extra_mb'))} |"
            if "objective" not in row:
                return f" | - | - | - | {subsets_rss}"
            exd = f" ({_x(row['ratio_ex_draw'])})" if "ratio_ex_draw" in row else ""
            return (f"{exd} | {row['objective']:.6f} | {row.get('obj_rel_diff', 0):.1e} / "
                    f"{row.get('max_problem_rel_diff', 0):.1e} | {row.get('same_picks', '-')} | {subsets_rss}")

        L += _method_table("| method | median time per step | ratio vs crestcore (without subset drawing) | objective | rel. diff vs crestcore (total / worst problem) | identical pick sets (ties may break differently) | same subsets | peak extra RSS |",
                           rows, S1_NAMES, s1_cells)
        dv = [(S1_SHORT.get(m, m), r["diverging_problems"], r["max_gain_gap_at_divergence"])
              for m, r in rows.items() if "diverging_problems" in r]
        if dv:
            L.append("Greedy orders compared per (subset, class) problem with crestcore's: "
                     + "; ".join(f"{m}: {d} of {p['P'] * p['C']} problems differ, largest relative gap between the "
                                 f"two candidates' exact gains at the first differing step {g:.1e}" for m, d, g in dv)
                     + ". A gap of 0 means every split is an exact tie (pairs of mutually closest points have equal "
                     "gains); crestcore breaks ties to the lowest index, the peers do not, and after a split the "
                     "greedy paths, and so the objectives, may differ slightly either way.")
            L.append("")
        L.append(_loads(rows))
        L.append("")
        c = s["compile"]
        cc = rows.get("crestcore", {})
        L.append(f"crestcore first calls: tiny warm-up in a fresh process with an empty Numba cache (import of the "
                 f"backend + JIT compile) {_t(c['cold'].get('tiny_first_s'))}; the same in a second process with the "
                 f"on-disk cache filled by the first {_t(c['warm_cache'].get('tiny_first_s'))}; first full-size step "
                 f"after the warm-up {_t(cc.get('first_s'))}. Kernels used: {_native(cc) if cc else '-'}.")
        rel = rows.get("release", {})
        if "ratio" in rel:
            ok = rel["ratio"] >= S1_TARGET_RATIO and cc.get("median_s", math.inf) <= S1_TARGET_S
            L.append("")
            L.append(f"**Target (issue #14): <= {S1_TARGET_S * 1e3:g} ms a step and >= {S1_TARGET_RATIO:g}x the "
                     f"release path; measured {_t(cc.get('median_s'))} and {_x(rel['ratio'])} -> "
                     f"{'met' if ok else 'NOT met'} in this run** ({_x(rel.get('ratio_ex_draw'))} with the shared "
                     "subset-drawing time subtracted from both). "
                     + (f"Against crestcore with 1 Numba thread (same run, same load): "
                        f"{_x(rel['median_s'] / rows['crestcore-1thread']['median_s'])}. "
                        if "median_s" in rows.get("crestcore-1thread", {}) else "")
                     + "(vs release with a NumPy-precomputed kernel: "
                     f"{_x(rows.get('release-precomputed', {}).get('ratio'))}; vs apricot per problem: "
                     f"{_x(rows.get('apricot', {}).get('ratio'))}, apricot recompiles its Numba kernels in every `fit`; "
                     f"its row is {rows.get('apricot', {}).get('timed_runs', '?')} full step(s) of P x C fits, "
                     "raise with --apricot-s1-repeats.)")
        L.append("")
        L.append("Release path details: per subset and class, `FacilityLocationFunction(n, mode=\"dense\", data=X_c, "
                 "metric=\"euclidean\")` (submodlib's kernel is exp(-d / n_features), float32 precision) then "
                 "`maximize(budget=ceil(m/C), optimizer=\"LazyGreedy\")`, weights by a Python loop over the class's "
                 "rows; `show_progress=False` (the release left submodlib's progress output on), the per-subset "
                 "feature gather and one-hot subtraction, the class interleaving and the mean-1 rescaling are "
                 "left out of every method. Features are computed once, outside the timing.")
        L.append("")

    if "S2" in results:
        for dt, s in results["S2"].items():
            p = s["params"]
            rows = s["rows"]
            L.append(f"### S2: one dense problem, n={p['n']}, d={p['d']}, k={p['k']}, {dt} (standard normal features)")
            L.append("")
            L.append("Similarity for every method: apricot's `metric='euclidean'`, i.e. max(D^2) - D^2 with squared "
                     "euclidean D^2 (read in apricot/utils.py `_calculate_pairwise_distances`: sklearn "
                     "`pairwise_distances(squared=True)`, then `X.max() - X`); crestcore runs "
                     "`metric=\"sqeuclidean\", kernel=\"max-minus\"`. Objective recomputed in float64 on the "
                     f"{dt} data. apricot converts the similarity to float64 whatever the input dtype.")
            L.append("")

            def s2_cells(row):
                return (f" | {row['objective']:.2f} | {row.get('obj_rel_diff', 0):.1e} | {row.get('same_picks', '-')} | "
                        f"{_mb(row.get('peak_extra_mb'))} | {_t(row.get('tiny_first_s'))} |")

            L += _method_table("| method | median time | ratio vs crestcore | objective | rel. diff vs crestcore | common picks | peak extra RSS | first call (tiny: compile or cache load) |",
                               rows, S2_NAMES, s2_cells)
            L.append(_loads(rows))
            al = rows.get("apricot-lazy", {})
            if "ratio" in al:
                L.append("")
                L.append(f"**Target >= 5x faster than apricot lazy ({dt}): measured {_x(al['ratio'])} -> "
                         f"{'met' if al['ratio'] >= 5 else 'NOT met'}.** apricot's time is `fit` as users call it, "
                         "including its per-fit Numba recompilation.")
            L.append("")

    if "S3" in results:
        s = results["S3"]
        p = s["params"]
        L.append(f"### S3: large n, matrix-free path (d={p['d']}, k={p['frac']:.0%} of n, float64, "
                 f"max_dense_bytes={p['max_dense_bytes']})")
        L.append("")
        L.append("crestcore `facility_location(metric=\"sqeuclidean\", kernel=\"max-minus\", optimizer=\"lazy\")`; "
                 "the matrix-free path triggers because n*n*8 > max_dense_bytes. One timed run per size (the "
                 "first full-size call after a tiny warm-up that compiles the same path). Objective recomputed in "
                 "float64 tile by tile (Gram form, exact zero self-distance). apricot is not run: it stores the "
                 "dense n x n float64 similarity.")
        L.append("")
        L.append("| n | k | crestcore time | peak extra RSS | objective (common fn) | crestcore's own objective, rel. diff | apricot memory (n^2 x 8 bytes, not run) |")
        L.append("|---|---|---|---|---|---|---|")
        for n, row in s["rows"].items():
            n = int(n)
            ap = n * n * 8 / 2**30
            if "error" in row:
                L.append(f"| {n} | | error: {row['error']} | | | | {ap:.1f} GiB |")
                continue
            L.append(f"| {n} | {row['k']} | {_t(row['first_s'])} | {_mb(row.get('peak_extra_mb'))} | "
                     f"{row['objective']:.6g} | {row.get('own_rel_diff', 0):.1e} | {ap:.1f} GiB |")
        ok = [(int(n), r) for n, r in s["rows"].items() if "error" not in r]
        if len(ok) >= 2:
            (n1, r1), (n2, r2) = ok[0], ok[-1]
            a = math.log(r2["first_s"] / r1["first_s"]) / math.log(n2 / n1)
            t1m = r2["first_s"] * (1e6 / n2) ** a
            L.append("")
            L.append(f"Extrapolation to n = 1,000,000 (k = 10%): time grows as n^{a:.2f} between n={n1} and n={n2}, "
                     f"so about {_t(t1m)} ({t1m / 3600:.2g} h) on this machine at that rate (lazy greedy with k proportional to n is "
                     f"at least quadratic); crestcore's peak memory is bounded by the tile size "
                     f"(~max_dense_bytes) plus O(n) vectors, measured {_mb(r1.get('peak_extra_mb'))} at n={n1} and "
                     f"{_mb(r2.get('peak_extra_mb'))} at n={n2}. apricot would need 1e12 x 8 bytes = 7.3 TiB for its "
                     "dense similarity alone.")
        s2 = results.get("S2", {}).get("float64", {}).get("rows", {}).get("apricot-lazy")
        if s2 and "peak_extra_mb" in s2:
            nn = results["S2"]["float64"]["params"]["n"]
            per = s2["peak_extra_mb"] * 2**20 / (nn * nn * 8)
            L.append("")
            L.append(f"apricot's measured peak in S2 (n={nn}) was {per:.1f}x n^2 x 8 bytes; at n=60,000 that "
                     f"factor gives {per * 60000**2 * 8 / 2**30:.0f} GiB (this machine: "
                     f"{_mem_total_gib():.0f} GiB).")
        L.append("")
    L.append(MARK_END)
    return "\n".join(L) + "\n"


def _mem_total_gib():
    kb = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    kb = int(line.split()[1])
    except OSError:
        pass
    return (kb or 0) / 2**20


def write_doc(path: Path, section: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        text = path.read_text()
        if MARK_START in text and MARK_END in text:
            pre = text.split(MARK_START, 1)[0]
            post = text.split(MARK_END, 1)[1]
            text = pre + section.rstrip("\n") + post
        else:
            text = text.rstrip("\n") + "\n\n" + section
    else:
        text = "# Benchmarks\n\nLatest results; see `benchmarks/README.md` for how to run.\n\n" + section
    path.write_text(text)


def numba_status() -> str:
    try:
        from crestcore.backends import available_backends, get_kernel

        st = available_backends().get("numba")
        S = np.zeros((1, 4, 4))
        k = get_kernel("greedy_batched", "numpy", S, np.ones((1, 4), bool), np.array([1], dtype=np.int64))
        if st == "ok" and k is not None:
            return "numba backend active (`crestcore.backends.numba`)"
        return f"**numba backend NOT active ({st}); crestcore ran its generic reference kernels**"
    except Exception as exc:
        return f"**numba backend check failed: {exc!r}**"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="S1,S2", help="comma list of S1,S2,S3 (default S1,S2; S3 takes minutes)")
    ap.add_argument("--out", default=None,
                    help="markdown file whose selection-bench block is rewritten (default: none; `make bench` "
                         "passes docs/benchmarks.md)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up (default 5; 2 with --quick)")
    ap.add_argument("--warmup-s", type=float, default=0.25,
                    help="full-size warm-up calls until this many seconds have passed (at least one; default 0.25)")
    ap.add_argument("--quick", action="store_true", help="small sizes: smoke test")
    ap.add_argument("--threads", type=int, default=THREADS, help="BLAS/OpenMP/Numba threads (default 2)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per method process")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--apricot-s1-repeats", type=int, default=0,
                    help="timed S1 steps for apricot after its first (default 0: one step, ~100 fits, minutes)")
    ap.add_argument("--reuse-json", default=None,
                    help="a --json file of an earlier run: suites not run now are taken from it (marked as such)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker is not None:
        res = worker(json.loads(args.worker))
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    suites = [s.strip().upper() for s in args.suite.split(",") if s.strip()]
    bad = [s for s in suites if s not in ("S1", "S2", "S3")]
    if bad:
        ap.error(f"unknown suite(s) {bad}; choose from S1,S2,S3")
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    if repeats < 1:
        ap.error("--repeats must be >= 1")
    sizes = QUICK if args.quick else FULL
    cmd = "python benchmarks/selection.py " + " ".join(shlex.quote(a) for a in argv)
    results = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "command": cmd.strip(),
               "machine": machine_info(), "repeats": repeats, "quick": args.quick, "numba_status": numba_status(),
               "warmup_s": args.warmup_s}
    global RUN_CACHE, WARMUP_S
    WARMUP_S = args.warmup_s
    RUN_CACHE = tempfile.mkdtemp(prefix="crest-bench-numba-run-")
    print(f"crestcore selection benchmarks: suites {suites}, repeats {repeats}, threads {THREADS}; "
          f"{results['numba_status']}", file=sys.stderr)
    if "S1" in suites:
        print("S1 ...", file=sys.stderr)
        results["S1"] = suite_s1(sizes, repeats, args.timeout, args.apricot_s1_repeats)
    if "S2" in suites:
        print("S2 ...", file=sys.stderr)
        results["S2"] = suite_s2(sizes, repeats, args.timeout)
    if "S3" in suites:
        print("S3 ...", file=sys.stderr)
        results["S3"] = suite_s3(sizes, repeats, args.timeout)
    shutil.rmtree(RUN_CACHE, ignore_errors=True)
    if args.reuse_json:
        old = json.loads(Path(args.reuse_json).read_text())
        for key in ("S1", "S2", "S3"):
            if key not in results and key in old:
                results[key] = old[key]
                # a suite the old file itself reused keeps the run that measured it
                first = old.get("reused", {}).get(key) or {"date": old.get("date"), "command": old.get("command"),
                                                           "machine": old.get("machine", {})}
                results.setdefault("reused", {})[key] = first
    try:
        results["machine"]["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    section = render(results, args, argv)
    if args.out:
        out = Path(args.out)
        if not out.is_absolute():
            out = Path.cwd() / out
        write_doc(out, section)
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(section)
    if args.json:
        slim = json.loads(json.dumps(results, default=str))
        tables = [slim.get("S1", {}).get("rows", {}), slim.get("S3", {}).get("rows", {})]
        tables += [v.get("rows", {}) for v in slim.get("S2", {}).values()]
        for table in tables:
            for row in table.values():
                for big in ("picks", "weights", "objective_per_problem"):
                    row.pop(big, None)
        Path(args.json).write_text(json.dumps(slim, indent=1, default=str))
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
