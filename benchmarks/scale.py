#!/usr/bin/env python
"""S4: selection past the n x n wall (issue #12): sparse kNN, matrix-free, GreeDi on Dask, apricot's kNN mode.

    python benchmarks/scale.py [--ns 60000,200000] [--fracs 0.01,0.1] [--methods ...] [--timeout 600]
                               [--out docs/benchmarks.md] [--json PATH]

Data: n points in d = 64 with low intrinsic dimension (a mixture of 100 Gaussians in 10-D mapped linearly
to 64-D, plus 0.1 isotropic noise; seed 0), float64. Methods (each in a fresh subprocess, 2 threads,
warm Numba cache; time = the one full call, peak RSS = the subprocess's maximum resident set):

  dense-lazy        crestcore.facility_location(optimizer="lazy") where n x n float64 fits (never at these n)
  mf-lazy           matrix-free lazy (max_dense_bytes=1): skipped when estimated above --timeout
  mf-stochastic     matrix-free stochastic greedy, epsilon=0.1
  sparse-K          crestcore.facility_location(neighbors=K) (faiss graph, lazy), K = 16
  sparse-K-stoch    the same with stochastic greedy
  greedi            crestcore.adapters.dask.facility_location, 2-worker LocalCluster, 2 partitions, lazy on
                    each partition with neighbors=16 (time includes the cluster's start)
  apricot-knn       apricot FacilityLocationSelection(n_neighbors=16, optimizer="lazy") (its sparse mode)

Common evaluation of every method's picks: the k-medoid cost ``c(S) = mean_i min_{j in S} |x_i - x_j|``
over all n points (exact 1-NN search of the picks, faiss IndexFlatL2), and the facility-location
objective ``F(S) = n (M - c(S))`` with M the exact largest pairwise distance (computed once, n <= 60,000)
relative to the reference method (mf-lazy where it ran, else mf-stochastic, else sparse-16).
"""

from __future__ import annotations

import os
import sys

# benchmarks/distributed.py would shadow the dask.distributed package: drop this folder from the path
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

THREADS = int(os.environ.get("CREST_BENCH_THREADS", "2"))
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_v] = str(THREADS)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARK_START = "<!-- scale-bench:start -->"
MARK_END = "<!-- scale-bench:end -->"
K_NEIGHBORS = 16
METHODS = ("dense-lazy", "mf-lazy", "mf-stochastic", "sparse-16", "sparse-16-stoch", "greedi", "apricot-knn")


def make_data(n: int, d: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    C = rng.normal(size=(100, 10)) * 3
    z = C[rng.integers(0, 100, n)] + rng.normal(size=(n, 10))
    W = rng.normal(size=(10, d)) / np.sqrt(10)
    return z @ W + 0.1 * rng.normal(size=(n, d))


def _estimate_seconds(method: str, n: int, d: int, k: int) -> float:
    """Rough time model from the measured matrix-free rows at n = 60,000, d = 64 on this 2-core machine
    (lazy, k = 6,000: 891 s; stochastic: 193 s), quadratic in n and linear in d."""
    if method == "mf-lazy":
        return 891.0 * (n / 60_000) ** 2 * (d / 64) * max(0.3, k / 6000) ** 0.5
    if method == "mf-stochastic":
        return 193.0 * (n / 60_000) ** 2 * (d / 64)
    return 0.0


def run_child(method: str, n: int, k: int, out: str) -> None:
    """One method, one size: writes picks and timing to ``out`` (.npz)."""
    import crestcore

    X = make_data(n)
    tiny = X[:400]
    t_total = time.perf_counter()
    if method == "dense-lazy":
        crestcore.facility_location(tiny, 4)
        t = time.perf_counter()
        idx = crestcore.facility_location(X, k, max_dense_bytes=1 << 62).indices
    elif method in ("mf-lazy", "mf-stochastic"):
        opt = "lazy" if method == "mf-lazy" else "stochastic"
        crestcore.facility_location(tiny, 4, optimizer=opt, rng=0, max_dense_bytes=1)
        t = time.perf_counter()
        idx = crestcore.facility_location(X, k, optimizer=opt, epsilon=0.1, rng=0, max_dense_bytes=1).indices
    elif method.startswith("sparse"):
        opt = "stochastic" if method.endswith("stoch") else "lazy"
        crestcore.facility_location(tiny, 4, neighbors=5, optimizer=opt, rng=0)
        t = time.perf_counter()
        idx = crestcore.facility_location(X, k, neighbors=K_NEIGHBORS, optimizer=opt, epsilon=0.1, rng=0).indices
    elif method == "greedi":
        from dask.distributed import Client, LocalCluster

        from crestcore.adapters import dask as cdask

        t = time.perf_counter()  # the cluster's start is in the time, as with client=None
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            idx = cdask.facility_location(X, k, client=client, partitions=2, seed=0, neighbors=K_NEIGHBORS).indices
            seconds = time.perf_counter() - t
            peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        np.savez(out, idx=np.asarray(idx, dtype=np.int64), seconds=seconds, rss=rss,
                 worker_rss=np.asarray(sorted(peaks.values()), dtype=np.int64), total=time.perf_counter() - t_total)
        return
    elif method == "apricot-knn":
        from apricot import FacilityLocationSelection

        FacilityLocationSelection(4, metric="euclidean", n_neighbors=5, optimizer="lazy").fit(tiny)
        t = time.perf_counter()
        sel = FacilityLocationSelection(k, metric="euclidean", n_neighbors=K_NEIGHBORS, optimizer="lazy").fit(X)
        idx = np.asarray(sel.ranking)
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    np.savez(out, idx=np.asarray(idx, dtype=np.int64), seconds=seconds, rss=rss,
             total=time.perf_counter() - t_total)


def min_dist_cost(X: np.ndarray, picks: np.ndarray) -> float:
    import faiss

    index = faiss.IndexFlatL2(X.shape[1])
    index.add(np.ascontiguousarray(X[picks], dtype=np.float32))
    D, _ = index.search(np.ascontiguousarray(X, dtype=np.float32), 1)
    return float(np.sqrt(np.maximum(D[:, 0].astype(np.float64), 0)).mean())


def exact_max_distance(X: np.ndarray) -> float:
    from crestcore.backends import numba as nb

    X64 = np.ascontiguousarray(X, dtype=np.float64)
    return float(nb._max_distance(X64, np.ascontiguousarray(X64.T), np.zeros(X.shape[0]), 0, THREADS))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="60000,200000")
    ap.add_argument("--fracs", default="0.01,0.1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--previous", default=None,
                    help="a JSON file of an earlier run (--json): its rows stay in the table; a size measured again "
                         "keeps the previous run's other methods")
    ap.add_argument("--child", nargs=4, metavar=("METHOD", "N", "K", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        run_child(a.child[0], int(a.child[1]), int(a.child[2]), a.child[3])
        return
    ns = [int(x) for x in a.ns.split(",")]
    fracs = [float(x) for x in a.fracs.split(",")]
    methods = a.methods.split(",")
    rows = json.loads(Path(a.previous).read_text()) if a.previous else []
    tmp = Path(tempfile.mkdtemp(prefix="crest-scale-"))
    for n in ns:
        X = make_data(n)
        M = exact_max_distance(X) if n <= 60_000 else None
        for frac in fracs:
            k = max(1, int(round(frac * n)))
            res = {}
            for m in methods:
                note = ""
                if m == "dense-lazy" and n * n * 8 > 0.25 * 24e9:
                    res[m] = dict(status=f"skipped: n x n float64 = {n * n * 8 / 1e9:.0f} GB does not fit")
                    continue
                est = _estimate_seconds(m, n, 64, k)
                if est > a.timeout:
                    res[m] = dict(status=f"skipped: estimated {est / 60:.0f} min > {a.timeout / 60:.0f} min")
                    continue
                out = tmp / f"{m}-{n}-{k}.npz"
                cmd = [sys.executable, __file__, "--child", m, str(n), str(k), str(out)]
                t0 = time.perf_counter()
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                except subprocess.TimeoutExpired:
                    res[m] = dict(status=f"timed out after {a.timeout:.0f} s")
                    continue
                if proc.returncode != 0:
                    err = proc.stderr.strip().splitlines()
                    res[m] = dict(status="failed: " + (err[-1][:200] if err else f"exit code {proc.returncode}"))
                    continue
                z = np.load(out)
                idx = z["idx"]
                cost = min_dist_cost(X, idx)
                extra = {"worker_rss": [int(v) for v in z["worker_rss"]]} if "worker_rss" in z.files else {}
                res[m] = dict(extra, status="ok" + note, seconds=float(z["seconds"]), rss=int(z["rss"]), cost=cost,
                              wall=time.perf_counter() - t0, distinct=int(np.unique(idx).size))
                print(n, k, m, res[m], flush=True)
            old = next((i for i, row in enumerate(rows) if row["n"] == n and row["k"] == k), None)
            if old is not None:  # the same size in --previous: its other methods join this row
                res = {**{m: r for m, r in rows.pop(old)["results"].items() if m not in res}, **res}
            ref = next((r for r in ("mf-lazy", "mf-stochastic", "sparse-16") if res.get(r, {}).get("status") == "ok"), None)
            for r in res.values():
                if r.get("status") == "ok" and ref is not None:
                    r["cost_ratio"] = res[ref]["cost"] / r["cost"]
                    if M is not None:
                        r["F_ratio"] = (M - r["cost"]) / (M - res[ref]["cost"])
            rows.append(dict(n=n, k=k, ref=ref, M=M, results=res))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    md = render(rows, " ".join(shlex.quote(x) for x in ["benchmarks/scale.py"] + (argv or sys.argv[1:])))
    print(md)
    if a.out:
        path = Path(a.out)
        text = path.read_text() if path.exists() else ""
        block = f"{MARK_START}\n{md}\n{MARK_END}"
        if MARK_START in text:
            text = text.split(MARK_START)[0] + block + text.split(MARK_END, 1)[1]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        path.write_text(text)


def render(rows, command: str) -> str:
    load = os.getloadavg()
    lines = [
        "## S4: selection past the n x n wall (sparse kNN, matrix-free, GreeDi on Dask, apricot kNN)",
        "",
        f"`flock /tmp/crest-bench.lock .venv/bin/python {command}` on {datetime.date.today()}, {THREADS} threads, "
        f"shared 2-core machine (load average at the end {load[0]:.1f}; other engineers were running jobs). d = 64, "
        "float64, clustered data (see the script). cost = mean distance of a point to its nearest pick over all n "
        "(lower is better); F ratio = facility-location objective `n (M - cost)` with the exact largest distance M, "
        "relative to the reference row (n <= 60,000 only); cost ratio = reference cost / cost. GreeDi's RSS is "
        "the driver's, then each worker process's peak in brackets (older rows: the driver's only).",
        "",
    ]
    for row in rows:
        lines += [f"### n = {row['n']:,}, k = {row['k']:,} (reference: {row['ref']})", "",
                  "| method | status | time (s) | peak RSS (MB) | cost | cost ratio | F ratio |",
                  "|---|---|---|---|---|---|---|"]
        for m, r in row["results"].items():
            if r.get("status") == "ok":
                rss = f"{r['rss'] / 1e6:.0f}"
                if r.get("worker_rss"):
                    rss += " [" + ", ".join(f"{v / 1e6:.0f}" for v in r["worker_rss"]) + "]"
                f_ratio = f"{r['F_ratio']:.5f}" if "F_ratio" in r else "-"
                lines.append(f"| {m} | ok | {r['seconds']:.1f} | {rss} | {r['cost']:.4f} | "
                             f"{r.get('cost_ratio', float('nan')):.4f} | {f_ratio} |")
            else:
                lines.append(f"| {m} | {r['status']} | - | - | - | - | - |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
