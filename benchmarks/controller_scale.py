#!/usr/bin/env python
"""The controller's costs that grow with the number of examples n (no model: labels only).

    flock /tmp/crest-bench.lock .venv/bin/python benchmarks/controller_scale.py --n 100000 1000000

For each n: a drop decision (``drop_update`` on a history where a third of the examples have two low
losses in the window, ten balanced classes, floor 1000; min of 5 calls), the pool size a loader's events
and ``stats`` ask at every step (``dropping.pool_size``, median of 200 calls), and the size of the
controller's state dict without dropping (``T2=None``) and with it (the default 8-slot history).
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


if __name__ == "__main__":
    sys.exit(main())
