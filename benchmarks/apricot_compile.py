#!/usr/bin/env python
"""S2's apricot ratio taken apart: how much of an apricot ``fit`` is its per-fit Numba compile.

apricot's ``FacilityLocationSelection.fit`` compiles its gain kernels afresh on every call, so S2's ratio
(crestcore warm against apricot's ``fit`` as users call it) counts that compile for apricot and none for
crestcore (whose kernels are cached on disk). This runs, alternately in one process, crestcore's warm
S2 call, apricot's full-size fit and apricot's fit of a tiny problem (60 points, k = 5: nearly all
compile), and prints the medians, the ratio as S2 counts it and the ratio on apricot's compute alone
(full fit minus tiny fit). ``python benchmarks/apricot_compile.py --repeats 5``.
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    a = ap.parse_args(argv)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(a.threads))
    import numpy as np
    from apricot import FacilityLocationSelection

    import crestcore

    rng = np.random.default_rng(0)
    X = rng.standard_normal((5000, 10)).astype(a.dtype)
    tiny = rng.standard_normal((60, 10)).astype(a.dtype)

    def ours():
        return crestcore.facility_location(X, 500, metric="sqeuclidean", kernel="max-minus")

    def apricot(data, k):
        return FacilityLocationSelection(k, metric="euclidean", optimizer="lazy").fit(data)

    ours()  # crestcore's kernels compiled (or loaded from the cache) outside the timing, as in S2
    times: dict[str, list[float]] = {"crestcore": [], "apricot fit": [], "apricot tiny fit": []}
    for _ in range(a.repeats):
        for name, call in (("crestcore", ours), ("apricot fit", lambda: apricot(X, 500)),
                           ("apricot tiny fit", lambda: apricot(tiny, 5))):
            t = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    load = os.getloadavg()[0]
    print(f"| {a.dtype} | {1e3 * med['crestcore']:.0f} ms | {med['apricot fit']:.2f} s | "
          f"{med['apricot tiny fit']:.2f} s | {med['apricot fit'] / med['crestcore']:.1f}x | "
          f"{(med['apricot fit'] - med['apricot tiny fit']) / med['crestcore']:.1f}x | {load:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
