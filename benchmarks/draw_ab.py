#!/usr/bin/env python
"""The host draw of ``draw_subsets`` (``draw_stratified``): the NumPy reference of two commits and the
Numba kernel side by side in one process.

``crestcore/_reference_kernels.py`` of ``--old`` (a git revision of this checkout) is loaded next to the
working tree's; the three run alternately on the same Floyd draws (class-balanced labels, C = 10) at the
shapes of a CREST selection; the table gives the medians and whether every output is identical. Used for
the 2026-12-01 reference without a loop over the slots: ``python benchmarks/draw_ab.py --old 113f5b6``.

``--kernel-old REV`` also loads ``backends/numba.py`` of ``REV`` (its kernels compiled without the on-disk
cache) and times its ``draw_stratified`` beside the working tree's (used for the 2026-12-06 grouping loop:
``python benchmarks/draw_ab.py --old HEAD --kernel-old 306cf01``).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from device_greedy_ab import load_old

SHAPES = [(20_000, 5, 510), (60_000, 10, 600), (60_000, 100, 600), (20_000, 300, 510), (1_000_000, 20, 10_000)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="git revision whose crestcore/_reference_kernels.py is 'old'")
    ap.add_argument("--kernel-old", default=None,
                    help="git revision whose backends/numba.py draw_stratified is timed beside the working tree's")
    ap.add_argument("--repeats", type=int, default=41)
    a = ap.parse_args(argv)
    from crestcore import _reference_kernels as new
    from crestcore.backends.numba import draw_stratified as numba_draw

    old = load_old(a.old, "crestcore/_reference_kernels.py", "crestcore")
    sides = {"old reference": old.draw_stratified, "new reference": new.draw_stratified, "numba": numba_draw}
    if a.kernel_old is not None:
        from at_revision import module_at

        sides["old numba"] = module_at(a.kernel_old, "backends/numba.py", "crestcore.backends._numba_draw_old",
                                       "crestcore.backends",
                                       edit=lambda src: src.replace("cache=True", "cache=False")).draw_stratified
    rng = np.random.default_rng(0)
    extra = " old Numba kernel ms | old / new kernel |" if a.kernel_old is not None else ""
    print(f"| pool | P | r | old reference ms | new reference ms | Numba kernel ms | old / new |{extra} same |")
    print("|---|---|---|---|---|---|---|" + ("---|---|" if extra else "") + "---|")
    for n, P, r in SHAPES:
        labels = rng.integers(0, 10, n)
        sizes = np.bincount(labels, minlength=10)
        r_c = np.full(10, r // 10)
        blk = np.repeat(np.arange(10), r_c)
        t = np.arange(r_c.sum()) - np.repeat(np.cumsum(r_c) - r_c, r_c)
        high = (sizes - r_c)[blk] + t + 1  # Floyd's draw at slot t is uniform in [0, N_c - r_c + t]
        times: dict[str, list] = {k: [] for k in sides}
        for f in sides.values():  # warm-up (Numba's load on the first shape)
            f(np.arange(n), labels, r_c, np.zeros((P, int(r_c.sum())), dtype=np.int64))
        order = list(sides)
        for rep in range(a.repeats):
            draws = np.minimum(rng.random((P, r_c.sum())) * high, high - 1).astype(np.int64)
            res = {}
            # interleaved, the order rotated every repeat: load drifts and a first-call or cache effect hit
            # every side alike (the order was fixed before 2026-12-05)
            for k in order[rep % len(order):] + order[:rep % len(order)]:
                t0 = time.perf_counter()
                res[k] = sides[k](np.arange(n), labels, r_c, draws)
                times[k].append(time.perf_counter() - t0)
            same = all(np.array_equal(res[order[0]], x) for x in res.values())
            if not same:
                print(f"outputs differ at n={n} P={P} r={r}", file=sys.stderr)
                return 1
        med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
        kern = (f" {med['old numba']:.3f} | {med['old numba'] / med['numba']:.2f}x |" if a.kernel_old is not None
                else "")
        print(f"| {n:,} | {P} | {int(r_c.sum())} | {med['old reference']:.2f} | {med['new reference']:.2f} | "
              f"{med['numba']:.3f} | {med['old reference'] / med['new reference']:.2f}x |{kern} yes |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
