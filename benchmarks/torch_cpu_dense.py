#!/usr/bin/env python
"""``facility_location`` on a CPU torch tensor: the route ``backend="auto"`` takes (the torch kernels, whose
dense greedy re-evaluates every candidate at each pick: its "lazy" is the naive greedy, made for a GPU)
against ``backend="numba"`` (the same tensor as a zero-copy view on the Numba kernels, torch tensors out)
and against the NumPy array itself, side by side in one process, each route alternately, after one
warm-up call each.

    flock /tmp/crest-bench.lock .venv/bin/python benchmarks/torch_cpu_dense.py [--n 4000] [--d 10] [--k 400]

Prints the median seconds of each route per dtype, its ratio to ``backend="numba"``, and whether the
picks agree.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    for name, default in (("n", 4000), ("d", 10), ("k", 400), ("repeats", 3), ("threads", 1)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args(argv)
    import numpy as np
    import torch

    import crestcore

    warnings.simplefilter("ignore", RuntimeWarning)  # the warning this measures the cause of
    torch.set_num_threads(a.threads)
    X = np.random.default_rng(0).normal(size=(a.n, a.d))
    print(f"n = {a.n}, d = {a.d}, k = {a.k}, {a.threads} thread(s), medians of {a.repeats}")
    for dtype in (np.float32, np.float64):
        Xd = X.astype(dtype)
        T = torch.from_numpy(Xd)
        routes = {"numpy (Numba)": lambda Xd=Xd: crestcore.facility_location(Xd, a.k),
                  "torch, backend='auto'": lambda T=T: crestcore.facility_location(T, a.k),
                  "torch, backend='numba'": lambda T=T: crestcore.facility_location(T, a.k, backend="numba")}
        picks = {name: np.asarray(f().indices) for name, f in routes.items()}  # the warm-up call
        times: dict[str, list[float]] = {name: [] for name in routes}
        for _ in range(a.repeats):
            for name, f in routes.items():
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
        base = statistics.median(times["torch, backend='numba'"])
        for name, ts in times.items():
            same = np.array_equal(picks[name], picks["numpy (Numba)"])
            print(f"  {np.dtype(dtype).name:8s} {name:24s} {statistics.median(ts):8.3f} s  "
                  f"{statistics.median(ts) / base:6.1f}x  picks as NumPy's: {same}")


if __name__ == "__main__":
    main()
