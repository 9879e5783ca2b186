#!/usr/bin/env python
"""Two dense-path choices of ``facility_location``, each side by side with its alternative in one process,
alternately, after a warm-up call each (review 117's cliffs, 2026-12-05):

1. ``labels=`` with classes far apart in size on a CPU torch tensor (one class of ``--big`` points and
   ``--small-classes`` classes of ``--small`` points): the library's call against a plain loop of one call
   per class with the same budgets, and against ``backend="numba"``. The torch kernels pad a batch to its
   largest problem; batches now hold problems within a factor two of their largest.
2. NumPy features of ``d`` = 64 to 256 columns: the Numba kernel's direct distances (the default up to
   192 features) against the generic Gram-form path (what NumPy input beyond the kernel's limit gets; forced
   here by lowering the limit for the call).
3. ``minibatch_coresets``' per-class problems of about 32 to 400 points at ``d`` = 193 to 4,096 (review 129):
   the Numba kernel against the generic path, and which one the default takes (the kernel keeps problems of
   at most 128 points up to 8,192 features, and those with ``n d <= 153,600``).

    flock /tmp/crest-bench.lock .venv/bin/python benchmarks/dense_paths.py [--repeats 3] [--threads 2]

Prints medians, ratios and whether the picks agree.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings


def _timed(routes: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in routes}
    for _ in range(repeats):
        for name, f in routes.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    for name, default in (("repeats", 3), ("threads", 2), ("big", 2000), ("small", 20), ("small_classes", 100),
                          ("n", 4000), ("k", 400)):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    a = ap.parse_args(argv)
    import numba
    import numpy as np
    import torch

    import crestcore
    import crestcore.backends.numba as nbk
    from crestcore.plan import hamilton

    warnings.simplefilter("ignore", RuntimeWarning)
    torch.set_num_threads(a.threads)
    numba.set_num_threads(a.threads)
    rng = np.random.default_rng(0)

    n = a.big + a.small * a.small_classes
    k = n // 40
    y = np.concatenate([np.zeros(a.big, np.int64), 1 + np.arange(a.small * a.small_classes) % a.small_classes])
    T = torch.from_numpy(rng.normal(size=(n, 16)))
    yt = torch.from_numpy(y)
    classes = np.unique(y)
    members = [np.flatnonzero(y == c) for c in classes]
    budgets = hamilton(k, np.array([m.size for m in members]))

    def loop():
        return np.concatenate([m[np.asarray(crestcore.facility_location(T[torch.from_numpy(m)], int(b)).indices)]
                               for m, b in zip(members, budgets) if b > 0])

    routes = {"torch, labels= (auto)": lambda: np.asarray(crestcore.facility_location(T, k, labels=yt).indices),
              "torch, a loop over the classes": loop,
              "torch, labels=, backend='numba'": lambda: np.asarray(
                  crestcore.facility_location(T, k, labels=yt, backend="numba").indices)}
    picks = {name: np.sort(f()) for name, f in routes.items()}
    med = _timed(routes, a.repeats)
    base = med["torch, a loop over the classes"]
    print(f"1. labels=: one class of {a.big} and {a.small_classes} of {a.small} (n = {n}, d = 16, k = {k}), "
          f"{a.threads} thread(s), medians of {a.repeats}")
    for name, s in med.items():
        print(f"   {name:34s} {s:8.3f} s  {s / base:6.2f}x the loop  picks as the loop's: "
              f"{np.array_equal(picks[name], picks['torch, a loop over the classes'])}")

    print(f"2. NumPy features, n = {a.n}, k = {a.k}, {a.threads} thread(s), medians of {a.repeats}")
    limit = nbk._DIRECT_MAX_FEATURES
    for d in (64, 96, 128, 192, 256):
        X = rng.normal(size=(a.n, d))

        def generic(X=X):
            nbk._DIRECT_MAX_FEATURES = 0  # the kernels decline every d: the generic path
            try:
                return np.asarray(crestcore.facility_location(X, a.k).indices)
            finally:
                nbk._DIRECT_MAX_FEATURES = limit

        def kernel(X=X):
            nbk._DIRECT_MAX_FEATURES = 1 << 30
            try:
                return np.asarray(crestcore.facility_location(X, a.k).indices)
            finally:
                nbk._DIRECT_MAX_FEATURES = limit

        routes = {"kernel": kernel, "generic": generic}
        picks = {name: f() for name, f in routes.items()}
        med = _timed(routes, a.repeats)
        default = "kernel" if d <= limit else "generic"
        print(f"   d = {d:3d}: Numba kernel {med['kernel']:6.3f} s, generic Gram path {med['generic']:6.3f} s "
              f"({med['generic'] / med['kernel']:4.2f}x); default: {default}; same picks: "
              f"{np.array_equal(picks['kernel'], picks['generic'])}")


    print(f"3. minibatch_coresets per class (10 classes of n = 20,000), {a.threads} thread(s), medians of {a.repeats}")
    y3 = rng.integers(0, 10, 20_000)
    for npts in (32, 128, 256, 400):
        r, m, P = npts * 10, max(10, npts // 4), max(1, 1280 // npts)
        for d in (193, 512, 2048, 4096):
            X = rng.standard_normal((20_000, d)).astype(np.float32)

            def route(limit_now, X=X, r=r, m=m, P=P):
                def run():
                    nbk._DIRECT_MAX_FEATURES = limit_now
                    try:
                        return np.asarray(crestcore.minibatch_coresets(X, y3, m=m, r=r, P=P, rng=0).indices)
                    finally:
                        nbk._DIRECT_MAX_FEATURES = limit
                return run

            routes = {"kernel": route(1 << 30), "generic": route(0), "default": route(limit)}
            picks = {name: f() for name, f in routes.items()}
            med = _timed(routes, a.repeats)
            fused, calls = nbk.facility_batched, []
            nbk.facility_batched = lambda *args, _f=fused, _c=calls, **kw: _c.append(1) or _f(*args, **kw)
            try:
                routes["default"]()  # which path the default takes: the fused kernel called or not
            finally:
                nbk.facility_batched = fused
            took = "kernel" if calls else "generic"
            print(f"   ~{npts:3d} points, d = {d:4d}: kernel {med['kernel'] * 1e3:8.1f} ms, generic "
                  f"{med['generic'] * 1e3:8.1f} ms ({med['generic'] / med['kernel']:4.2f}x), default "
                  f"{med['default'] * 1e3:8.1f} ms (the {took}); same picks: "
                  f"{np.array_equal(picks['kernel'], picks['generic'])}")


if __name__ == "__main__":
    main()
