#!/usr/bin/env python
"""The CREST selection path at E2's shapes (P = 5 subsets of r = 384 from 60,000 examples, C = 10,
m = 128), without the model: subsets, their union, logit gradients of torch CPU logits and
``minibatch_coresets(subsets=...)``, as ``crestcore.controller._select`` runs them.

    flock /tmp/crest-bench.lock .venv/bin/python benchmarks/e2_select_path.py [--threads 1] [--repeats 30] [--route both]

``--route torch`` solves the torch features on the torch kernels (the controller's route for CPU torch
tensors since 2026-11-30), ``--route numpy`` converts them to NumPy first (the Numba kernels, the route
before), ``both`` (default) times the two alternately in one process. Prints the median milliseconds of
each part (after one warm-up call per route that loads the kernels).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--P", type=int, default=5)
    ap.add_argument("--r", type=int, default=384)
    ap.add_argument("--route", choices=("torch", "numpy", "both"), default="both")
    args = ap.parse_args(argv)
    for v in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[v] = str(args.threads)
    import numpy as np
    import torch

    import crestcore
    from crestcore._compat import to_numpy
    from crestcore.features import last_layer_gradients

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n, C, m = 60_000, 10, 128
    labels = rng.integers(0, C, n)
    pool = np.arange(n)

    def step(seed, route):
        gen = np.random.default_rng(seed)
        t0 = time.perf_counter()
        subsets = crestcore.draw_subsets(labels, pool, args.r, args.P, gen)
        union = np.unique(subsets)
        pos = np.searchsorted(union, subsets)
        logits = torch.randn(union.size, C, generator=torch.Generator().manual_seed(seed))
        y = torch.from_numpy(labels[union])
        t1 = time.perf_counter()
        f, yy = last_layer_gradients(logits, y), y
        if route == "numpy":
            f, yy = to_numpy(f), to_numpy(y)
        t2 = time.perf_counter()
        crestcore.minibatch_coresets(f, yy, m=m, r=args.r, P=args.P, rng=gen, subsets=pos)
        t3 = time.perf_counter()
        return [1e3 * (t1 - t0), 1e3 * (t2 - t1), 1e3 * (t3 - t2), 1e3 * (t3 - t0)]

    routes = ("torch", "numpy") if args.route == "both" else (args.route,)
    times: dict[str, list] = {r: [] for r in routes}
    for r in routes:
        step(0, r)
    for s in range(1, args.repeats + 1):
        for r in routes:  # alternating: load drifts hit both routes alike
            times[r].append(step(s, r))
    for r in routes:
        med = np.median(times[r], axis=0)
        print(f"P={args.P} r={args.r} threads={args.threads} route={r}: subsets + union {med[0]:.2f} ms, features"
              f"{' + to_numpy' if r == 'numpy' else ''} {med[1]:.2f} ms, minibatch_coresets(subsets=) {med[2]:.2f} ms, "
              f"total {med[3]:.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
