"""CREST against a random subset re-drawn every epoch with BatchNorm and Dropout in the model: which of the
two costs CREST accuracy. The data, split, optimizer and schedule of ``benchmarks/age_study.py`` (synthetic
10-class set, validation split only); the model an MLP 40-256-256-128-10 with, after each hidden linear
layer, nothing (``plain``), ``BatchNorm1d`` (``bn``), ``Dropout(0.2)`` after the ReLU (``drop``) or both
(``bn+drop``); one lr, 0.3, for every model and method (CREST's and Random's best on the age study's
MLP; not chosen per model and method, so the differences are indicative), budget 0.1, m = 128,
20 epochs, CREST's defaults (``--weights uniform``: CREST's picks weighted 1 instead of by cluster size).
Differences CREST - Random paired by seed.

    .venv/bin/python benchmarks/layers_study.py --json benchmarks/results/layers-study.json
    .venv/bin/python benchmarks/layers_study.py --weights uniform --json benchmarks/results/layers-study-uniform.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

KINDS = ("plain", "bn", "drop", "bn+drop")


def _model(kind: str, seed: int):
    import torch

    torch.manual_seed(seed)
    layers, d = [], 40
    for h in (256, 256, 128):
        layers.append(torch.nn.Linear(d, h))
        if "bn" in kind:
            layers.append(torch.nn.BatchNorm1d(h))
        layers.append(torch.nn.ReLU())
        if "drop" in kind:
            layers.append(torch.nn.Dropout(0.2))
        d = h
    layers.append(torch.nn.Linear(d, 10))
    return torch.nn.Sequential(*layers)


def run_one(kind: str, method: str, seed: int, a) -> float:
    """Validation accuracy (%) of one run."""
    import torch
    from torch.utils.data import TensorDataset

    from age_study import _data, weighted_step
    from crestcore import CrestConfig
    from crestcore.adapters.torch import CrestLoader
    from crestcore.plan import budget_steps, full_steps

    torch.set_num_threads(1)
    xtr, ytr, xva, yva = _data()
    X, Y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    net = _model(kind, seed)
    opt = torch.optim.SGD(net.parameters(), lr=a.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    spe = budget_steps(a.budget, full_steps(len(Y), a.m))
    total = spe * a.epochs
    warm = max(1, int(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, total - warm))))
    if method == "random":
        g = np.random.default_rng([seed, 1])
        parts = [torch.from_numpy(b) for _ in range(a.epochs)
                 for b in np.array_split(g.choice(len(Y), spe * a.m, replace=False), spe)]
        batches = ((X[i], Y[i], torch.ones(len(i))) for i in parts)
    else:
        loader = CrestLoader(net, TensorDataset(X, Y), config=CrestConfig(m=a.m, weights=a.weights), budget=a.budget,
                             epochs=a.epochs, seed=seed)
        batches = loader.iter_run()
    net.train()
    for x, yb, w in batches:
        weighted_step(net, opt, sched, x, yb, w)
    net.eval()
    with torch.no_grad():
        return 100 * float((net(torch.from_numpy(xva)).argmax(1) == torch.from_numpy(yva)).float().mean())


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="1000,1001,1002")
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--m", type=int, default=128)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--weights", default="cluster", help="CREST's CrestConfig(weights=...) (default %(default)s)")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = []
    for kind in KINDS:
        for seed in seeds:
            for method in ("random", "crest"):
                rows.append({"model": kind, "method": method, "seed": seed, "val_acc": run_one(kind, method, seed, a)})
                print(json.dumps(rows[-1]), flush=True)
    Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    print("| model | CREST val acc (%) per seed | Random | CREST - Random (paired) |\n|---|---|---|---|")
    for kind in KINDS:
        c = [r["val_acc"] for r in rows if r["model"] == kind and r["method"] == "crest"]
        r_ = [r["val_acc"] for r in rows if r["model"] == kind and r["method"] == "random"]
        d = np.subtract(c, r_)
        print(f"| {kind} | {', '.join(f'{v:.2f}' for v in c)} | {', '.join(f'{v:.2f}' for v in r_)} | "
              f"{d.mean():+.2f} +- {d.std(ddof=1) / math.sqrt(len(d)):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
