#!/usr/bin/env python
"""The CREST selection path at E2's shapes of 2026-11-30 (by default P = 5 subsets of r = 384 from 60,000
examples, C = 10, m = 128; E1's calls since the just-in-time defaults are one subset of 600, ``--P 1
--r 600``), without the model: subsets, their union, logit gradients of torch CPU logits and
``minibatch_coresets(subsets=...)``, as ``crestcore.controller._select`` runs them.

    flock /tmp/crest-bench.lock .venv/bin/python benchmarks/e2_select_path.py [--threads 1] [--repeats 30] [--route both]

``--route torch`` solves the torch features on the torch kernels (the controller's route for CPU torch
tensors since 2026-11-30) and draws the subsets with the NumPy reference (such a loop does not start
Numba), ``--route numpy`` converts them to NumPy first (the Numba kernels, which then also draw), ``both``
(default) times the two alternately in one process, ``all`` also S1's call at the same shapes
(``benchmarks/selection.py``'s crestcore row: ``minibatch_coresets`` on float64 features of all n
examples, drawing inside, ``class_budget="ceil"``), so the ratios to S1 come from one run. Prints the
median milliseconds of each part (after one warm-up call per route that loads the kernels); the total
is the path without the model's forward (stood in for by random logits, not timed).

``--device cuda`` puts the logits (so the features) on the GPU, as a CUDA model's forward does; its routes
(``both``) are ``torch`` (the CUDA kernels, the route ``backend="auto"`` takes for CUDA tensors) and
``numpy`` (features and labels moved to NumPy by hand, then the Numba kernels; ``backend="numba"``
itself refuses device arrays). ``--route numba`` passes the tensors with ``backend="numba"`` (host
tensors only). Every timed call ends with a device synchronisation, since the loader needs the picks
on the host before the next batch.
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
    ap.add_argument("--route", choices=("torch", "numpy", "numba", "both", "all"), default="both")
    ap.add_argument("--device", default="cpu", help="torch device of the logits (cpu or cuda)")
    ap.add_argument("--one-thread", choices=("compare",), default=None,
                    help="time the torch route three ways, alternately: small CPU problems on one thread set for "
                         "the calling thread (the library since 2026-12-06), on one thread set for the process "
                         "(torch.set_num_threads, before), and on the caller's threads")
    args = ap.parse_args(argv)
    for v in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[v] = str(args.threads)
    from crestcore.apps.train_demo import torch_device_problem

    if (problem := torch_device_problem(args.device)) is not None:
        ap.error(f"argument --device: {problem}")
    if args.route == "numba" and not args.device.startswith("cpu"):
        ap.error("argument --route: numba takes host tensors only (backend='numba' refuses device arrays); "
                 "--route numpy moves them to the host first")
    import numpy as np
    import torch

    import crestcore
    import crestcore.minibatch as mb
    from crestcore._compat import to_numpy
    from crestcore.controller import _selection_subsets, _union_positions
    from crestcore.features import last_layer_gradients

    host_kernel = mb.get_host_kernel
    route_now = {"name": ""}

    cuda = torch.device(args.device).type == "cuda"

    def get_host_kernel(name, start=True):  # a CPU torch loop has not started Numba: reference draws
        cpu_torch = route_now["name"] == "torch" and not cuda
        return None if cpu_torch and name == "draw_stratified" else host_kernel(name, start)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    mb.get_host_kernel = get_host_kernel

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n, C, m = 60_000, 10, 128
    labels = rng.integers(0, C, n)
    pool = np.arange(n)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from selection import s1_data

    F1, labels1 = s1_data(n, C, 0)

    def step(seed, route):
        route_now["name"] = route
        if route == "s1":
            t0 = time.perf_counter()
            crestcore.minibatch_coresets(F1, labels1, m=m, r=args.r, P=args.P, rng=seed, per_class=True,
                                         kernel="exp", metric="euclidean", optimizer="lazy",
                                         class_budget="ceil", scale=float(C))
            t3 = time.perf_counter()
            return [np.nan, np.nan, np.nan, 1e3 * (t3 - t0)]
        gen = np.random.default_rng(seed)
        t0 = time.perf_counter()
        subsets, _ = _selection_subsets(labels, pool, args.r, args.P, args.P, gen)  # the controller's draw (all rows)
        union, pos = _union_positions(subsets)
        t1 = time.perf_counter()
        # a stand-in for the model's forward over the union (not timed: E2 times the forward apart)
        logits = torch.randn(union.size, C, generator=torch.Generator().manual_seed(seed)).to(args.device)
        y = torch.from_numpy(labels[union]).to(args.device)
        sync()
        t1b = time.perf_counter()
        f, yy = last_layer_gradients(logits, y), y
        if route == "numpy":
            f, yy = to_numpy(f), to_numpy(y)
        sync()
        t2 = time.perf_counter()
        res = crestcore.minibatch_coresets(f, yy, m=m, r=args.r, P=args.P, rng=gen, subsets=pos,
                                           backend="numba" if route == "numba" else "auto")
        to_numpy(res.indices)  # the loader indexes its dataset with the picks: they come to the host
        sync()
        t3 = time.perf_counter()
        return [1e3 * (t1 - t0), 1e3 * (t2 - t1b), 1e3 * (t3 - t2), 1e3 * (t3 - t2 + t2 - t1b + t1 - t0)]

    both = ("torch", "numpy")
    routes = {"both": both, "all": (*both, "s1")}.get(args.route, (args.route,))
    if args.one_thread == "compare":
        routes = ("torch:thread", "torch:process", "torch:off")
        from crestcore.backends import torch as tk

        omp, limit = tk._own_openmp(), tk._ONE_THREAD_MAX
        plain = step

        def step(seed, route):  # noqa: F811 - the torch route under one of the three settings
            name, how = route.split(":")
            tk._OPENMP = omp if how == "thread" else False  # (False: torch.set_num_threads, no other thread here)
            tk._ONE_THREAD_MAX = -1 if how == "off" else limit
            try:
                return plain(seed, name)
            finally:
                tk._OPENMP, tk._ONE_THREAD_MAX = omp, limit
    times: dict[str, list] = {r: [] for r in routes}
    for r in routes:
        step(0, r)
    for s in range(1, args.repeats + 1):
        for r in routes:  # alternating: load drifts hit both routes alike
            times[r].append(step(s, r))
    s1 = np.median(times["s1"], axis=0)[3] if "s1" in times else None
    for r in routes:
        med = np.median(times[r], axis=0)
        if r == "s1":
            print(f"P={args.P} r={args.r} threads={args.threads} S1's call: total {med[3]:.2f} ms")
            continue
        print(f"P={args.P} r={args.r} threads={args.threads} device={args.device} route={r}: subsets + union {med[0]:.2f} ms, features"
              f"{' + to_numpy' if r == 'numpy' else ''} {med[1]:.2f} ms, minibatch_coresets(subsets=) {med[2]:.2f} ms, "
              f"total {med[3]:.2f} ms" + (f" ({med[3] / s1:.2f}x S1)" if s1 else ""))


if __name__ == "__main__":
    sys.exit(main())
