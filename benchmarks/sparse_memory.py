#!/usr/bin/env python
"""Peak memory of the sparse path against the bound it is held to (``crestcore.sparse.graph_bytes``).

Each case runs in a fresh process: a small call first (the kernels and faiss loaded), then the features
made, then ``facility_location(X, k, neighbors=K, max_dense_bytes=graph_bytes(n, d, K))`` under
``tracemalloc`` (NumPy's and faiss's Python-visible allocations; RSS growth is printed beside it). The
figure of merit is the peak over the bound: at most 1 where the estimate holds.

    .venv/bin/python benchmarks/sparse_memory.py            # the default cases, a table on stdout
"""

from __future__ import annotations

import json
import subprocess
import sys

CASE = r"""
import json, resource, tracemalloc, numpy as np, crestcore
from crestcore.sparse import graph_bytes
n, d, K, dtype = {case!r}
crestcore.facility_location(np.random.default_rng(1).normal(size=(300, d)).astype(dtype), 5, neighbors=K)
X = np.random.default_rng(0).normal(size=(n, d)).astype(dtype)
bound = graph_bytes(n, d, K)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
tracemalloc.start()
sel = crestcore.facility_location(X, 50, neighbors=K, max_dense_bytes=bound)
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
print(json.dumps(dict(bound=bound, peak=peak, rss=rss, path=sel.path, plan=sel.plan)))
"""

CASES = [(20000, 256, 8, "float32"), (20000, 256, 8, "float64"), (20000, 768, 8, "float32"),
         (20000, 768, 8, "float64"), (60000, 64, 16, "float32")]


def main() -> int:
    print("| n | d | K | dtype | bound (graph_bytes) MB | tracemalloc peak MB | peak / bound | RSS growth MB | bytes a value |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in CASES:
        out = subprocess.run([sys.executable, "-c", CASE.format(case=case)], capture_output=True, text=True,
                             timeout=600)
        if out.returncode:
            print(f"| {' | '.join(map(str, case))} | failed: {out.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        n, d, K, dtype = case
        print(f"| {n} | {d} | {K} | {dtype} | {r['bound'] / 1e6:.0f} | {r['peak'] / 1e6:.0f} | "
              f"{r['peak'] / r['bound']:.2f} | {r['rss'] / 1e6:.0f} | "
              f"{(r['peak'] - 64 * n * (K + 1)) / (n * d):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
