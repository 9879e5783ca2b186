"""CREST against a random subset re-drawn every epoch with BatchNorm and Dropout in the model: which of the
two costs CREST accuracy. The data, split, optimizer and schedule of ``benchmarks/age_study.py`` (synthetic
10-class set, validation split only); the model an MLP 40-256-256-128-10 with, after each hidden linear
layer, nothing (``plain``), ``BatchNorm1d`` (``bn``), ``Dropout(0.2)`` after the ReLU (``drop``) or both
(``bn+drop``); one lr, 0.3, for every model and method (CREST's and Random's best on the age study's
MLP; not chosen per model and method, so the differences are indicative), budget 0.1, m = 128,
20 epochs, CREST's defaults except its weights: ``--weights`` (default ``cluster``, the cluster sizes, as
the first runs of 2026-12-02 used; ``uniform``: every pick weighted 1; ``tempered``: square roots, the
library's default since the weights study).
Differences CREST - Random paired by seed; with several ``--weights`` rules (comma-separated) each rule
is a method ``crest-<rule>``, and every rule after the first is also compared with the first. Each CREST
run's records hold its batches' effective number of examples, ``(sum w)^2 / sum w^2`` (mean and
least over the run).

    .venv/bin/python benchmarks/layers_study.py --json benchmarks/results/layers-study.json
    .venv/bin/python benchmarks/layers_study.py --weights uniform --json benchmarks/results/layers-study-uniform.json
    .venv/bin/python benchmarks/layers_study.py --weights cluster,tempered --lr 0.1 --json FILE
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


def run_one(kind: str, method: str, seed: int, a, weights: str = "cluster", ess: list | None = None) -> float:
    """Validation accuracy (%) of one run (``weights``: CREST's ``CrestConfig(weights=...)``); with a list
    ``ess``, each batch's effective number of examples ``(sum w)^2 / sum w^2`` is appended to it."""
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
        loader = CrestLoader(net, TensorDataset(X, Y), config=CrestConfig(m=a.m, weights=weights), budget=a.budget,
                             epochs=a.epochs, seed=seed)
        batches = loader.iter_run()
    net.train()
    for x, yb, w in batches:
        if ess is not None:
            ess.append(float(w.double().sum() ** 2 / (w.double() ** 2).sum()))
        weighted_step(net, opt, sched, x, yb, w)
    net.eval()
    with torch.no_grad():
        return 100 * float((net(torch.from_numpy(xva)).argmax(1) == torch.from_numpy(yva)).float().mean())


def _accs(rows: list, kind: str, method: str) -> list:
    return [r["val_acc"] for r in sorted(rows, key=lambda r: r["seed"]) if r["model"] == kind and r["method"] == method]


def _diff(a: list, b: list) -> str:
    d = np.subtract(a, b)
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return f"{d.mean():+.2f} +- {se:.2f}"


def table(rows: list, methods: list) -> str:
    """Markdown: per model, each CREST method's accuracies and its paired difference to Random; every
    method after the first is also compared with the first."""
    head = "| model | method | val acc (%) per seed | mean | - Random (paired) |"
    if len(methods) > 1:
        head += f" - {methods[0]} (paired) |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for kind in KINDS:
        base = _accs(rows, kind, "random")
        out.append(f"| {kind} | random | {', '.join(f'{v:.2f}' for v in base)} | {np.mean(base):.2f} | - |"
                   + (" - |" if len(methods) > 1 else ""))
        for k, meth in enumerate(methods):
            c = _accs(rows, kind, meth)
            line = f"| {kind} | {meth} | {', '.join(f'{v:.2f}' for v in c)} | {np.mean(c):.2f} | {_diff(c, base)} |"
            if len(methods) > 1:
                line += " - |" if k == 0 else f" {_diff(c, _accs(rows, kind, methods[0]))} |"
            out.append(line)
    return "\n".join(out)


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="1000,1001,1002")
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--m", type=int, default=128)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--weights", default="cluster",
                   help="CREST's CrestConfig(weights=...), comma-separated for several (default %(default)s)")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    rules = [w.strip() for w in a.weights.split(",") if w.strip()]
    if not rules or len(set(rules)) != len(rules):
        p.error(f"--weights needs distinct rules, got {a.weights!r}")
    names = {w: "crest" if len(rules) == 1 else f"crest-{w}" for w in rules}
    rows = []
    for kind in KINDS:
        for seed in seeds:
            rows.append({"model": kind, "method": "random", "seed": seed, "val_acc": run_one(kind, "random", seed, a)})
            print(json.dumps(rows[-1]), flush=True)
            for w in rules:
                ess: list = []
                acc = run_one(kind, "crest", seed, a, weights=w, ess=ess)
                rows.append({"model": kind, "method": names[w], "seed": seed, "val_acc": acc,
                             "batch_ess_mean": float(np.mean(ess)), "batch_ess_min": float(np.min(ess))})
                print(json.dumps(rows[-1]), flush=True)
    Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    print(f"lr {a.lr:g}, seeds {a.seeds}")
    print(table(rows, [names[w] for w in rules]))
    for w in rules:  # the effective number of examples of CREST's batches, over every model and seed
        e = [r["batch_ess_mean"] for r in rows if r["method"] == names[w]]
        print(f"{names[w]}: effective examples per batch (sum w)^2 / sum w^2, mean over runs {np.mean(e):.1f} "
              f"(runs {min(e):.1f}-{max(e):.1f}) of m = {a.m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
