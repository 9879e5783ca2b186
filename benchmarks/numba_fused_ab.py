"""The Numba fused dense kernel (``facility_batched``) of two commits side by side in one process.

``backends/numba.py`` of ``--old`` (a git revision of this checkout) is loaded next to the working tree's
(its kernels compiled without Numba's on-disk cache) and both run alternately on the same inputs:

- ``craig``: B1's CRAIG call, ``crestcore.baselines.craig(G, labels, k)`` on the synthetic logit gradients
  of ``benchmarks/baselines.py`` (n = 60,000, 10 classes, float32, k = 6,016), with the module's
  ``facility_batched`` swapped between the two versions;
- ``class``: the kernel on one class of that call (about 6,000 points, k = 600);
- ``S2-float64`` / ``S2-float32``: S2's dense problem (5,000 standard normal points, d = 10, k = 500,
  euclidean, max-minus, lazy);
- ``S1-shape``: the CREST step's batch of tiny problems (100 problems of 66 standard normal points,
  d = 10, k = 13, euclidean, ``exp`` kernel, lazy), where a gain costs little and overheads show.

The table gives medians, their ratio and whether every output (indices, gains, weights, objectives) is
identical. Thread count: ``--threads`` (Numba, OpenMP and BLAS). Used for the 2026-12-01 change (compacted
columns in the lazy greedy): ``python benchmarks/numba_fused_ab.py --old 5f1ad3e``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from at_revision import module_at  # noqa: E402


def load_old(rev: str):
    """``backends/numba.py`` at ``rev`` as the module ``crestcore.backends._numba_old`` (no disk cache)."""
    return module_at(rev, "backends/numba.py", "crestcore.backends._numba_old", "crestcore.backends",
                     edit=lambda src: src.replace("cache=True", "cache=False"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="git revision whose backends/numba.py is the baseline")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", default="craig,class,S2-float64,S2-float32,S1-shape,S1-naive,small-128",
                    help="comma-separated subset of the cases")
    a = ap.parse_args(argv)
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from baselines import budget, synthetic_features

    from crestcore import last_layer_gradients
    from crestcore.backends import numba as new
    from crestcore.baselines import craig

    old = load_old(a.old)
    current = new.facility_batched
    z, _, y = synthetic_features(60000, 0)
    G = last_layer_gradients(z, y)
    k = budget(y.size)

    def run_craig(fb):
        new.facility_batched = fb
        try:
            s = craig(G, y, k)
        finally:
            new.facility_batched = current
        return (np.asarray(s.indices), np.asarray(s.weights), np.asarray(s.gains))

    rng = np.random.default_rng(0)
    S2 = rng.standard_normal((1, 5000, 10))
    cls = G[y == 0][None]
    cases = {"craig": (None, None)}
    cases["class"] = (cls, 600)
    cases["S2-float64"] = (S2, 500)
    cases["S2-float32"] = (S2.astype(np.float32), 500)
    cases["S1-shape"] = (rng.standard_normal((100, 66, 10)), 13)
    cases["S1-naive"] = cases["S1-shape"]
    cases["small-128"] = (rng.standard_normal((20, 128, 10)), 26)
    wanted = a.cases.split(",")
    unknown = sorted(set(wanted) - set(cases))
    if unknown:
        ap.error(f"unknown cases {unknown}; choose from {sorted(cases)}")
    cases = {name: case for name, case in cases.items() if name in wanted}
    print(f"threads {a.threads}, old = {a.old}, repeats {a.repeats} (alternating)")
    print("| case | old ms | new ms | speedup | identical |")
    print("|---|---|---|---|---|")
    for name, (X, kk) in cases.items():
        if X is None:
            def call(fb):
                return run_craig(fb)
        else:
            valid = np.ones(X.shape[:2], dtype=bool)
            b = np.full(X.shape[0], kk)
            kernel = "exp" if name.startswith("S1") else "max-minus"
            opt = "naive" if name == "S1-naive" else "lazy"

            def call(fb, X=X, valid=valid, b=b, kernel=kernel, opt=opt):
                return fb(X, valid, b, "euclidean", kernel, 1.0, opt)
        ro, rn = call(old.facility_batched), call(current)  # also compiles both
        same = all(np.array_equal(p, q) for p, q in zip(ro, rn))
        to, tn = [], []
        for _ in range(a.repeats):
            for fb, acc in ((old.facility_batched, to), (current, tn)):
                t = time.perf_counter()
                call(fb)
                acc.append(time.perf_counter() - t)
        mo, mn = 1e3 * float(np.median(to)), 1e3 * float(np.median(tn))
        print(f"| {name} | {mo:.1f} | {mn:.1f} | {mo / mn:.2f}x | {'yes' if same else 'NO'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
