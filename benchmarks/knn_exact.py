#!/usr/bin/env python
"""The core's exact kNN search (``crestcore.sparse.exact_knn``, what ``facility_location(neighbors=K)`` runs
for torch, JAX and CuPy input, and for NumPy without faiss): each row's K nearest taken from chunk minima
(``_k_smallest``) against the stable argsort of the whole row it replaced, side by side in one process,
alternating, with the graphs compared.

    flock /tmp/crest-bench.lock .venv/bin/python benchmarks/knn_exact.py [--n 20000] [--d 4] [--K 10] [--repeats 3]
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
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np
    import torch

    import crestcore.sparse as sp
    from crestcore._compat import to_numpy

    torch.set_num_threads(1)
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


if __name__ == "__main__":
    sys.exit(main())
