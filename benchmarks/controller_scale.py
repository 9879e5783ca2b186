#!/usr/bin/env python
"""The controller's costs that grow with the number of examples n (no model: labels only).

    flock /tmp/crest-bench.lock .venv/bin/python benchmarks/controller_scale.py --n 100000 1000000

For each n: a drop decision (``drop_update`` on a history where a third of the examples have two low
losses in the window, ten balanced classes, floor 1000; min of 5 calls), the pool size a loader's events
and ``stats`` ask at every step (``dropping.pool_size``, median of 200 calls), and the size of the
controller's state dict without dropping (``T2=None``) and with it (the default 8-slot history).

And a just-in-time selection's random subsets with ``reselect="epoch"`` (P one budgeted epoch of coresets of
m = 128 at a 10 % budget, r 1 % of n), side by side: what a format-3 state kept (all P x r rows, drawn at
the selection) against the recipe kept now (the pool when examples were dropped, each class's count and the
stream's state: the rows drawn when their step comes), and the time of the eager draw against the
selection's one row plus the later rows one at a time (the same rows, checked).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=float, nargs="+", default=[1e5, 1e6])
    args = ap.parse_args(argv)
    import numpy as np

    from crestcore import CrestConfig, crest_init, crest_state_dict
    from crestcore.dropping import DropConfig, drop_init, drop_record, drop_update, pool_size

    for n in (int(v) for v in args.n):
        labels = (np.arange(n) * 7919 % 10).astype(np.int64)
        cfg = DropConfig(alpha=0.1, window=50, floor=1000)
        state = drop_init(n, cfg)
        idx = np.arange(0, n, 3)
        for step in (10, 20):
            state = drop_record(state, idx, np.full(idx.size, 0.01) + (idx % 7) * 1e-3, step)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            _, dropped = drop_update(state, 30, cfg, labels)
            times.append(time.perf_counter() - t0)
        pool = []
        for _ in range(200):
            t0 = time.perf_counter()
            pool_size(state)
            pool.append(time.perf_counter() - t0)
        sizes = {}
        for name, t2 in (("T2=None", None), ("T2=20", 20)):
            d = crest_state_dict(crest_init(CrestConfig(m=128, T2=t2), labels, seed=0))
            sizes[name] = sum(np.asarray(v).nbytes for v in d["drop"].values()) + d["labels"].nbytes
        print(f"n={n}: drop decision {1e3 * min(times):.1f} ms ({dropped.size} dropped); pool_size "
              f"{1e6 * float(np.median(pool)):.1f} us; state (labels + drop arrays) "
              + ", ".join(f"{k} {v / n:.1f} B/example" for k, v in sizes.items()))
        _subsets(n, labels)


def _subsets(n: int, labels) -> None:
    import types

    import numpy as np

    from crestcore.controller import _selection_subsets, _subset_row
    from crestcore.minibatch import _draw_blocked

    P, r = max(1, n // 10 // 128), max(512, n // 100)
    for name, pool in (("every example", np.arange(n)), ("70 % kept", np.flatnonzero(np.arange(n) % 10 < 7))):
        t0 = time.perf_counter()
        eager, _ = _draw_blocked(labels, pool, r, P, np.random.default_rng([0, 1]), whole=pool.size == n)
        eager = np.sort(eager, axis=1)
        t_eager = time.perf_counter() - t0
        t0 = time.perf_counter()
        first, recipe = _selection_subsets(labels, pool, r, P, 1, np.random.default_rng([0, 1]))
        t_first = time.perf_counter() - t0
        state = types.SimpleNamespace(labels=labels, draw=recipe, subsets=np.zeros((0, 0), dtype=np.int64))
        t0 = time.perf_counter()
        rows = [_subset_row(state, p) for p in range(1, P)]
        t_rows = time.perf_counter() - t0
        same = np.array_equal(np.concatenate([first, *rows]), eager)
        kept = sum(np.asarray(v).nbytes for v in recipe.values())
        print(f"  subsets, {name}: P={P} r={r}: eager draw {t_eager:.2f} s, {eager.nbytes / 1e6:.1f} MB kept; "
              f"recipe {kept / 1e6:.2f} MB kept, first row {1e3 * t_first:.1f} ms, later rows "
              f"{1e3 * t_rows / max(1, P - 1):.2f} ms each; the same rows: {same}")


if __name__ == "__main__":
    sys.exit(main())
