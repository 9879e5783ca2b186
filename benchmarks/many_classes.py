"""CREST's per-step cost with many classes: a linear model over C classes on n synthetic examples, the
torch adapter's ``CrestLoader``, one intra-op thread; the median time ``next(loader)`` takes at a step that
makes a coreset (a forward over r examples, the selection) and at a step that only checks (a forward over
128), and the model's own training step, over ``--steps`` steps. What grows with C is CREST's work on the
(r, C) logits, not the model's.

    python benchmarks/many_classes.py --classes 10000 --r 2048 [--n 1000000] [--steps 60]

Used for the 2026-12-06 finiteness checks by one sum (docs/benchmarks.md, "Many classes"), run once on the
code before the change (``git stash``) and once after.
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=10_000)
    ap.add_argument("--r", type=int, default=2048)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    from crestcore import CrestConfig
    from crestcore.adapters.torch import CrestLoader

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # (the few-examples-per-class notice of a small r)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.n, 8, generator=g)
    y = torch.randint(0, a.classes, (a.n,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, a.classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = CrestLoader(model, TensorDataset(x, y), config=CrestConfig(m=128, r=a.r), budget=0.1, epochs=200,
                         seed=0)
    steps = loader.iter_run()  # (past one epoch: --steps may exceed an epoch of steps)
    making, checking, training = [], [], []
    for _ in range(a.steps):
        st = loader.controller_state
        before = (st.made, st.counters["selections"])
        t0 = time.perf_counter()
        xb, yb, w = next(steps)
        dt = time.perf_counter() - t0
        t1 = time.perf_counter()
        loss = (w * F.cross_entropy(model(xb), yb, reduction="none")).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        training.append(time.perf_counter() - t1)
        st = loader.controller_state
        (making if (st.made, st.counters["selections"]) != before else checking).append(dt)
    print(_report(a, {"a step that makes a coreset": making, "a check-only step": checking,
                      "the model's training step": training}))
    return 0


def _report(a, times: dict) -> str:
    """One line: the median milliseconds of each kind of step (and how many there were), the peak RSS."""
    import numpy as np

    parts = [f"{kind} {1e3 * float(np.median(t)):.2f} ms (median of {len(t)})" for kind, t in times.items() if t]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return f"C = {a.classes}, r = {a.r}, n = {a.n}: " + ", ".join(parts) + f"; peak RSS {peak:.0f} MB"


if __name__ == "__main__":
    raise SystemExit(main())
