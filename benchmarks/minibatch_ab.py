"""``crestcore.minibatch_coresets`` of two commits side by side in one process.

``crestcore/minibatch.py`` of ``--old`` (a git revision of this checkout) is loaded next to the working
tree's (both use the working tree's kernels) and both run alternately on the same inputs, on NumPy (the
Numba kernels) and on torch CPU tensors (the torch kernels), one coreset (P = 1, m = 128, the defaults
otherwise):

- ``C2000``: 4,000 standard normal points of d = 2,000 (a 2,000-class head's logit gradients have C
  columns) in 2,000 classes of 2, r = 2,000 (one member per class per subset);
- ``imagenet``: 40,000 points of d = 1,000 in 1,000 classes, r = 13,000 (the default r for ImageNet's
  1.28 million examples: 13 members per class per subset);
- ``S1``: S1's shape, 20,000 points of d = 10 in 10 classes, r = 600 (every class gets picks: the
  same work in both);
- ``S1P10``: the S1 benchmark's 60,000 points and its ten coresets (P = 10; the defaults otherwise);
- ``longtail``: 50,000 points of d = 16, one class of 90 % and 999 classes sharing the rest, P = 100
  coresets of m = 32 from subsets of r = 640 (review 129: every (subset, class) problem was built padded
  to the large class's share, picks or not);
- ``longtail10``: the same with one class of 90 % and nine of about 1 % each, P = 5 (the torch kernels
  solved the nine small problems padded to the large one's size).

Besides the times, the peak of traced allocations (``tracemalloc``) of one more call of each.

The table gives medians, their ratio and whether every output (indices, weights, gains, objectives,
subsets) is identical. Used for the 2026-12-03 change (problems without a pick left out of the batched
solve): ``python benchmarks/minibatch_ab.py --old 21b7b77``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from at_revision import module_at  # noqa: E402

# n, C, r, d, m, P, long-tailed labels (one class of 90 %)
CASES = {"C2000": (4000, 2000, 2000, 2000, 128, 1, False), "imagenet": (40000, 1000, 13000, 1000, 128, 1, False),
         "S1": (20000, 10, 600, 10, 128, 1, False), "S1P10": (60000, 10, 600, 10, 128, 10, False), "longtail": (50000, 1000, 640, 16, 32, 100, True),
         "longtail10": (50000, 10, 640, 16, 32, 5, True)}


def load_old(rev: str):
    """``crestcore/minibatch.py`` at ``rev`` as the module ``crestcore._minibatch_old``."""
    return module_at(rev, "crestcore/minibatch.py", "crestcore._minibatch_old", "crestcore")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="git revision whose crestcore/minibatch.py is the baseline")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    a = ap.parse_args(argv)
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    import numpy as np
    import torch

    import crestcore.minibatch as new

    torch.set_num_threads(a.threads)
    old = load_old(a.old)
    print(f"minibatch_coresets, {a.old} against the working tree; {a.threads} thread(s), medians of {a.repeats} "
          "alternating calls after one warm-up each\n")
    import tracemalloc

    print("| case | input | old | new | old / new | peak old | peak new | same outputs |")
    print("|---|---|---|---|---|---|---|---|")
    for case in a.cases.split(","):
        n, C, r, d, m, P, tail = CASES[case]
        rng = np.random.default_rng(0)
        X = rng.normal(size=(n, d)).astype(np.float32)
        y = (np.arange(n) % C).astype(np.int64)
        if tail:  # class 0 holds 90 %, the other C - 1 share the rest
            y = np.zeros(n, dtype=np.int64)
            y[: n // 10] = np.arange(n // 10) % (C - 1) + 1
            y = rng.permutation(y)
        for lib in ("numpy", "torch"):
            Xi, yi = (X, y) if lib == "numpy" else (torch.from_numpy(X), torch.from_numpy(y))
            outs, times = {}, {"old": [], "new": []}
            for rep in range(a.repeats + 1):
                # the order swapped every repeat: a first-call or cache effect hits both sides alike
                pair = (("old", old), ("new", new))
                for name, mod in pair if rep % 2 else pair[::-1]:
                    t = time.perf_counter()
                    cs = mod.minibatch_coresets(Xi, yi, m=m, r=r, P=P, rng=0)
                    if rep:
                        times[name].append(time.perf_counter() - t)
                    outs[name] = [np.asarray(v) for v in (cs.indices, cs.weights, cs.gains, cs.objective, cs.subsets)]
            peaks = {}
            for name, mod in (("old", old), ("new", new)):
                tracemalloc.start()
                try:
                    mod.minibatch_coresets(Xi, yi, m=m, r=r, P=P, rng=0)
                    peaks[name] = tracemalloc.get_traced_memory()[1] / 2**20
                finally:
                    tracemalloc.stop()
            same = all(np.array_equal(u, v) for u, v in zip(outs["old"], outs["new"]))
            mo, mn = statistics.median(times["old"]), statistics.median(times["new"])
            print(f"| {case} (n={n}, C={C}, r={r}, d={d}, m={m}, P={P}) | {lib} | {mo * 1e3:.1f} ms | "
                  f"{mn * 1e3:.1f} ms | {mo / mn:.2f}x | {peaks['old']:.1f} MiB | {peaks['new']:.1f} MiB | "
                  f"{'yes' if same else 'NO'} |")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
