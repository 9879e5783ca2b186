#!/usr/bin/env python
"""Selections on features of other layouts and dtypes than C-ordered float32, side by side in one process
(review 129's cliffs, 2026-12-05): each row's time against the same call on the C-ordered float32 array, so a
ratio near 1 means no cliff.

- ``minibatch_coresets`` (n = 10^6, d = 64, C = 10, m = 32, r = 320, P = 10): Fortran order, a column slice
  (a strided view), float16, and float32 of magnitude 1e-12 (rescaled by a power of two);
- ``gradmatch(per_batch=...)`` (n = 100,000, d = 64, batches of 128, k = 40) and GLISTER's stochastic greedy
  (n = 50,000, d = 320, k = 500): Fortran order and a column slice.

    flock /tmp/crest-bench.lock .venv/bin/python benchmarks/layouts.py [--repeats 3]

One thread. Prints best-of-``repeats`` times after a warm-up call each, and whether the picks equal C order's.
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    import numpy as np

    from crestcore import minibatch_coresets
    from crestcore.baselines import glister, gradmatch

    rng = np.random.default_rng(0)

    def best(f):
        out = f()
        ts = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return min(ts), np.asarray(out)

    def strided(X):
        wide = np.empty((X.shape[0], 2 * X.shape[1]), dtype=X.dtype)
        wide[:, ::2] = X
        return wide[:, ::2]

    def table(name, call, X, variants):
        base, want = best(lambda: call(X))
        print(f"{name}: C-ordered float32 {base * 1e3:.1f} ms")
        for label, A in variants:
            t, got = best(lambda A=A: call(A))
            print(f"   {label:28s} {t * 1e3:9.1f} ms  {t / base:6.2f}x  same picks: {np.array_equal(got, want)}")

    n, d = 1_000_000, 64
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, 10, n)
    table("minibatch_coresets (n = 10^6, d = 64)",
          lambda F: minibatch_coresets(F, y, m=32, r=320, P=10, rng=0).indices, X,
          [("Fortran order", np.asfortranarray(X)), ("a column slice", strided(X)),
           ("float16 (picks: of its values)", X.astype(np.float16)), ("float32 of magnitude 1e-12", X * np.float32(1e-12))])
    del X
    G = rng.standard_normal((100_000, 64)).astype(np.float32)
    batches = np.arange(100_000) // 128
    table("gradmatch per_batch (n = 10^5, d = 64)", lambda F: gradmatch(F, 40, per_batch=batches).indices, G,
          [("Fortran order", np.asfortranarray(G)), ("a column slice", strided(G))])
    E = rng.standard_normal((50_000, 320)).astype(np.float32)
    Ev, Zv, yv = (rng.standard_normal((1000, 32)).astype(np.float32), rng.standard_normal((1000, 10)).astype(np.float32),
                  rng.integers(0, 10, 1000))
    table("glister stochastic (n = 50,000, d = 320)",
          lambda F: glister(F, Zv, yv, 500, val_embeddings=Ev, optimizer="stochastic", rng=0).indices, E,
          [("Fortran order", np.asfortranarray(E)), ("a column slice", strided(E))])


if __name__ == "__main__":
    main()
