#!/usr/bin/env python
"""The core's exact kNN search (``crestcore.sparse.exact_knn``, what ``facility_location(neighbors=K)`` runs
for torch, JAX and CuPy input, and for NumPy without faiss): each row's K nearest taken from chunk minima
(``_k_smallest``) against the stable argsort of the whole row it replaced, side by side in one process,
alternating, with the graphs compared.

With ``--copies``, what the search pays for listing copies of a row by index instead: the search on data
whose rows each come twice (float64), with the copy search (``_first_copies`` and the column gather) and
without it (the search before 2026-12-05), side by side, alternating; the copy search alone on distinct rows
at d and at 512; and whether NumPy and torch then give the same graph.

    flock /tmp/crest-bench.lock .venv/bin/python benchmarks/knn_exact.py [--n 20000] [--d 4] [--K 10] [--repeats 3]
    flock /tmp/crest-bench.lock .venv/bin/python benchmarks/knn_exact.py --copies --n 10000 --d 10 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="points (standard normal, float32)")
    ap.add_argument("--d", type=int, default=4, help="features")
    ap.add_argument("--K", type=int, default=10, help="neighbours a point")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each search (the best is shown)")
    ap.add_argument("--copies", action="store_true", help="time the copy search on rows that each come twice")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np
    import torch

    import crestcore.sparse as sp
    from crestcore._compat import to_numpy

    torch.set_num_threads(1)
    if a.copies:
        return _copies(a, np, torch, sp)
    X = np.random.default_rng(0).normal(size=(a.n, a.d)).astype(np.float32)
    new = sp._k_smallest

    def old(xp, D, K):
        return to_numpy(xp.argsort(D, axis=1, stable=True)[:, :K])

    print(f"exact_knn, n={a.n}, d={a.d}, K={a.K}, float32, one thread, best of {a.repeats}")
    for lib, data in (("numpy", X), ("torch", torch.from_numpy(X))):
        from array_api_compat import array_namespace

        xp = array_namespace(data)
        best = {"argsort": [], "chunk minima": []}
        graphs = {}
        for _ in range(a.repeats):
            for name, fn in (("argsort", old), ("chunk minima", new)):
                sp._k_smallest = fn
                t0 = time.perf_counter()
                graphs[name] = sp.exact_knn(xp, data, a.K, "euclidean")
                best[name].append(time.perf_counter() - t0)
        sp._k_smallest = new
        same = np.array_equal(graphs["argsort"], graphs["chunk minima"])
        o, w = min(best["argsort"]), min(best["chunk minima"])
        print(f"| {lib} | {o:.2f} s | {w:.2f} s | {o / w:.1f}x | {'yes' if same else 'NO'} |")
    return 0


def _copies(a, np, torch, sp) -> int:
    rng = np.random.default_rng(0)
    X = np.repeat(rng.normal(size=(a.n // 2, a.d)), 2, axis=0)[rng.permutation(2 * (a.n // 2))]
    found = sp._first_copies

    def search(copies: bool, data, lib=np):
        sp._first_copies = found if copies else (lambda _X: None)
        try:
            t = time.perf_counter()
            g = sp.exact_knn(lib, data, a.K, "euclidean")
            return time.perf_counter() - t, g
        finally:
            sp._first_copies = found

    best = {True: float("inf"), False: float("inf")}
    graphs = {}
    for _ in range(a.repeats):
        for copies in (True, False):
            s, graphs[copies] = search(copies, X)
            best[copies] = min(best[copies], s)
    same = {copies: bool(np.array_equal(graphs[copies], search(copies, torch.as_tensor(X), torch)[1]))
            for copies in (True, False)}
    print(f"exact_knn, n={X.shape[0]} ({a.n // 2} rows twice), d={a.d}, K={a.K}, one thread, best of {a.repeats}:")
    print(f"  with the copy search {best[True]:.2f} s, without {best[False]:.2f} s "
          f"({100 * (best[True] / best[False] - 1):+.0f} %)")
    print(f"  NumPy and torch graphs equal: with the copy search {same[True]}, without {same[False]}")
    for d in (a.d, 512):
        Y = np.random.default_rng(1).normal(size=(2 * a.n, d))
        t = time.perf_counter()
        assert found(Y) is None
        print(f"  the copy search alone on {2 * a.n} distinct rows of d={d}: {1e3 * (time.perf_counter() - t):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
