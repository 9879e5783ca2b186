#!/usr/bin/env python
"""What the exact kNN search (``crestcore.sparse.exact_knn``) pays for listing copies of a row by index: the
search on data whose rows each come twice, with the copy search (``_first_copies`` and the column gather) and
without it (the search before 2026-12-05), side by side in one process, alternating, best of the repeats; the
copy search alone on distinct rows at two widths; and whether NumPy and torch then give the same graph.

    flock /tmp/crest-bench.lock .venv/bin/python benchmarks/knn_copies.py [--n 10000] [--d 10] [--K 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000, help="points (n / 2 distinct rows, each twice; float64)")
    ap.add_argument("--d", type=int, default=10, help="features")
    ap.add_argument("--K", type=int, default=10, help="neighbours a point")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each search (the best is shown)")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np
    import torch

    import crestcore.sparse as sp

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(a.n // 2, a.d))
    X = np.repeat(base, 2, axis=0)[rng.permutation(2 * (a.n // 2))]
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
    raise SystemExit(main())
