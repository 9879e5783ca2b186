"""CREST's defaults against a random subset re-drawn every epoch (and against the paper's cluster-size
weights) on five data set and model pairs that no choice of a default used: an independent check.

Pairs (every data draw fixed by ``DATA_SEED``, never by a run's seed; inputs standardised with the
training part's statistics):

1. scikit-learn digits (a stratified 20 % test split held out first, then 20 % validation), MLP 64-128-10;
2. Fashion-MNIST, a 20,000-image subsample (80/20 training/validation; the official test set), a CNN with
   BatchNorm2d and Dropout;
3. the same with 20 % of the training part's labels replaced by a random other class, MLP 784-256-10;
4. ``make_classification``, 30 classes with a long tail (largest class about 20x the smallest), MLP
   50-256-256-30 (test and validation splits held out);
5. Fashion-MNIST long-tailed (class c keeps ``round(4000 * 0.05^(c / 9))`` images), MLP 784-256-10; the
   official, balanced test set, and its accuracy re-weighted to the training classes (``test_acc_lt``).

Methods: ``random`` (a fresh uniform subset of steps-per-epoch x m examples each epoch), ``crest``
(``CrestConfig(m=128)``, the defaults) and ``crest-cluster`` (``weights="cluster"``), budget 0.1, m =
128, 10 epochs of the full run, equal steps; SGD (momentum 0.9, Nesterov, weight decay 5e-4), linear
warm-up over 5 % of the steps then cosine to 0. Protocol (``--phase protocol``): each method's learning
rate chosen from {0.03, 0.1, 0.3} by mean validation accuracy over seeds 100-102 (a choice at the grid's
edge extends it once, to 0.01 or 1.0), then 5 new seeds (200-204) at the chosen rate, the test set read
once per final run. ``--phase supplement``: 40 epochs at the 10-epoch choices, seeds 300-304, the
validation split only. ``--phase variant --variant KEY=VALUE,...``: CREST's defaults and CREST with those
``CrestConfig`` overrides (method ``crest+KEY=VALUE,...``), each pair at the learning rate CREST's defaults
chose, 10 epochs, seeds 400-404, the validation split only; a variant passes a pair when its mean validation
accuracy is no more than 0.3 points below the defaults' and not worse by more than one standard error of
the paired differences. Records are appended to ``--json`` (JSON lines; a run already there is not run
again) and the tables printed from them.

    python benchmarks/unseen_study.py --json benchmarks/results/unseen-study-2026-12-02.jsonl --workers 2
    python benchmarks/unseen_study.py --phase supplement --json benchmarks/results/unseen-study-2026-12-02.jsonl
    python benchmarks/unseen_study.py --phase variant --variant r=256 --json benchmarks/results/unseen-study-2026-12-02.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

M, BUDGET = 128, 0.1
DATA_SEED = 18018
METHODS = ("random", "crest", "crest-cluster")
GRID = (0.03, 0.1, 0.3)
EXTEND = {0.03: 0.01, 0.3: 1.0}
SELECT_SEEDS, FINAL_SEEDS, SUPP_SEEDS = (100, 101, 102), (200, 201, 202, 203, 204), (300, 301, 302, 303, 304)
VARIANT_SEEDS, TOLERANCE = (400, 401, 402, 403, 404), 0.3
PAIRS = {1: "digits, MLP", 2: "Fashion-MNIST 20k, CNN with BatchNorm + Dropout", 3: "Fashion-MNIST 20k, 20 % noisy labels, MLP",
         4: "synthetic 30 classes, long tail, MLP", 5: "Fashion-MNIST long tail, MLP"}


def _split(y: np.ndarray, frac: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """``(rest, part)`` index arrays with ``frac`` of each class in ``part``."""
    part = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: int(round(frac * (y == c).sum()))]
                           for c in np.unique(y)])
    return np.setdiff1d(np.arange(y.size), part), np.sort(part)


def _standardise(train: np.ndarray, per_feature: bool):
    mu = train.mean(0) if per_feature else float(train.mean())
    sd = train.std(0) + 1e-6 if per_feature else float(train.std())
    return lambda a: ((a - mu) / sd).astype(np.float32)


_DATA: dict = {}


def data(pair: int):
    """``(xtr, ytr, xva, yva, xte, yte, classes)``, float32 inputs and int64 labels (pair 3: noisy ``ytr``)."""
    if pair in _DATA:
        return _DATA[pair]
    rng = np.random.default_rng([DATA_SEED, pair])
    if pair in (1, 4):
        if pair == 1:
            from sklearn.datasets import load_digits

            X, y = load_digits(return_X_y=True)
            X, C = X.astype(np.float32) / 16.0, 10
        else:
            from sklearn.datasets import make_classification

            w = 20.0 ** (-np.arange(30) / 29.0)
            X, y = make_classification(n_samples=20000, n_features=50, n_informative=20, n_redundant=10, n_classes=30,
                                       n_clusters_per_class=2, weights=list(w / w.sum()), class_sep=1.0,
                                       random_state=DATA_SEED)
            C = 30
        y = y.astype(np.int64)
        pool, test = _split(y, 0.2, rng)
        tr, va = _split(y[pool], 0.2, rng)
        f = _standardise(X[pool][tr], per_feature=True)
        out = (f(X[pool][tr]), y[pool][tr], f(X[pool][va]), y[pool][va], f(X[test]), y[test], C)
    elif pair in (2, 3, 5):
        from crestcore.apps.datasets import load_fashion_mnist

        xall, yall = load_fashion_mnist(split="train")
        xte, yte = load_fashion_mnist(split="test")
        xall, xte = xall.astype(np.float32) / 255.0, xte.astype(np.float32) / 255.0
        if pair == 5:
            sizes = [int(round(4000 * 0.05 ** (c / 9))) for c in range(10)]
            keep = np.concatenate([rng.permutation(np.flatnonzero(yall == c))[: sizes[c]] for c in range(10)])
        else:
            keep = rng.permutation(yall.size)[:20000]
        keep = np.sort(keep)
        Xp, yp = xall[keep], yall[keep]
        tr, va = _split(yp, 0.2, rng)
        f = _standardise(Xp[tr], per_feature=False)
        ytr = yp[tr].copy()
        if pair == 3:
            noise = np.random.default_rng([DATA_SEED, 3, 99])
            flip = noise.permutation(ytr.size)[: int(round(0.2 * ytr.size))]
            ytr[flip] = (ytr[flip] + noise.integers(1, 10, flip.size)) % 10
        shape = (-1, 1, 28, 28) if pair == 2 else (-1, 784)
        out = (f(Xp[tr]).reshape(shape), ytr, f(Xp[va]).reshape(shape), yp[va], f(xte).reshape(shape), yte, 10)
    else:
        raise ValueError(f"pair must be one of {tuple(PAIRS)}, got {pair!r}")
    _DATA[pair] = out
    return out


def model(pair: int, seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    if pair == 1:
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    if pair == 2:
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 7 * 7, 10))
    if pair in (3, 5):
        return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    return nn.Sequential(nn.Linear(50, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 30))


def _neighbour(name: str):
    """A script next to this one, loaded from its file (``benchmarks/`` stays off ``sys.path``: its
    ``distributed.py`` would shadow dask's package)."""
    if name not in _NEIGHBOURS:
        import importlib.util

        spec = importlib.util.spec_from_file_location(f"crest_bench_{name}", Path(__file__).with_name(f"{name}.py"))
        _NEIGHBOURS[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_NEIGHBOURS[name])
    return _NEIGHBOURS[name]


_NEIGHBOURS: dict = {}


def _scores(net, X, Y, C):
    import torch

    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(torch.from_numpy(X[i:i + 2048])).argmax(1) for i in range(0, len(X), 2048)]).numpy()
    recall = [float((pred[Y == c] == c).mean()) for c in range(C) if (Y == c).any()]
    return 100 * float((pred == Y).mean()), 100 * float(np.mean(recall)), recall


def run_one(job: dict) -> dict:
    """One run: ``job`` = ``{"pair", "method", "lr", "seed", "phase", "epochs"}``; validation accuracy and
    balanced accuracy, and for ``phase == "final"`` the test set's."""
    import torch
    from torch.utils.data import TensorDataset

    from crestcore import CrestConfig
    from crestcore.adapters.torch import CrestLoader
    from crestcore.plan import budget_steps, full_steps

    torch.set_num_threads(1)
    pair, method, lr, seed, epochs = job["pair"], job["method"], job["lr"], job["seed"], job["epochs"]
    xtr, ytr, xva, yva, xte, yte, C = data(pair)
    X, Y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    net = model(pair, seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    spe = budget_steps(BUDGET, full_steps(len(Y), M))
    total = spe * epochs
    warm = max(1, int(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, total - warm))))
    t0 = time.perf_counter()
    loader = None
    if method == "random":
        g = np.random.default_rng([seed, 1])
        parts = [torch.from_numpy(b) for _ in range(epochs)
                 for b in np.array_split(g.choice(len(Y), spe * M, replace=False), spe)]
        batches = ((X[i], Y[i], torch.ones(len(i))) for i in parts)
    else:
        over = ({"weights": "cluster"} if method == "crest-cluster" else
                _neighbour("cap_study").parse_overrides(method.partition("+")[2]))
        cfg = CrestConfig(m=M, **over)
        loader = CrestLoader(net, TensorDataset(X, Y), config=cfg, budget=BUDGET, epochs=epochs, seed=seed)
        batches = loader.iter_run()
    steps, ess = 0, []
    net.train()
    for x, yb, w in batches:
        wd = w.double()
        ess.append(float(wd.sum() ** 2 / (wd ** 2).sum()))
        _neighbour("age_study").weighted_step(net, opt, sched, x, yb, w)
        steps += 1
    wall = time.perf_counter() - t0
    if steps != total:
        raise RuntimeError(f"{method} trained {steps} steps, not the {total} every method gets")
    va_acc, va_bal, _ = _scores(net, xva, yva, C)
    out = dict(job, steps=steps, n_train=len(Y), wall_s=wall, val_acc=va_acc, val_bal=va_bal, ess_mean=float(np.mean(ess)))
    if job["phase"] == "final":  # the test set: final runs only, once each
        te_acc, te_bal, recall = _scores(net, xte, yte, C)
        out.update(test_acc=te_acc, test_bal=te_bal)
        if pair == 5:
            out["test_acc_lt"] = 100 * float(np.dot(np.bincount(ytr, minlength=C) / len(ytr), recall))
    if loader is not None:
        out["selections"] = len(loader.stats["selections"])
    return out


def _key(r: dict) -> tuple:
    return (r["pair"], r["method"], float(r["lr"]), r["seed"], r["phase"], r.get("epochs", 10))


def _run_all(jobs: list, path: Path, workers: int) -> list:
    done = {_key(r) for r in _records(path)}
    todo = [j for j in jobs if _key(j) not in done]
    if todo:
        with ProcessPoolExecutor(max_workers=workers) as pool, path.open("a") as f:
            for r in pool.map(run_one, todo):
                f.write(json.dumps(r) + "\n")
                f.flush()
                print(json.dumps(r), flush=True)
    return _records(path)


def _records(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def chosen(rows: list, pair: int, method: str) -> tuple[float, dict]:
    """The learning rate with the best mean validation accuracy over the selection seeds, and every rate's."""
    means: dict = {}
    for r in rows:
        if r["phase"] == "select" and r["pair"] == pair and r["method"] == method:
            means.setdefault(float(r["lr"]), []).append(r["val_acc"])
    means = {lr: float(np.mean(v)) for lr, v in sorted(means.items())}
    return max(means, key=means.get), means


def _select(pairs, path: Path, workers: int) -> list:
    jobs = [dict(pair=p, method=m, lr=lr, seed=s, phase="select", epochs=10)
            for p in pairs for m in METHODS for lr in GRID for s in SELECT_SEEDS]
    rows = _run_all(jobs, path, workers)
    ext = []
    for p in pairs:
        for m in METHODS:
            best, _ = chosen(rows, p, m)
            if best in EXTEND:  # at the grid's edge: one step further, once
                ext += [dict(pair=p, method=m, lr=EXTEND[best], seed=s, phase="select", epochs=10) for s in SELECT_SEEDS]
    return _run_all(ext, path, workers) if ext else rows


def _mse(v) -> tuple[float, float]:
    v = np.asarray(v, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan


def _paired(a: dict, b: dict) -> str:
    seeds = sorted(set(a) & set(b))
    m, se = _mse([a[s] - b[s] for s in seeds])
    verdict = "win" if m > 2 * se else "loss" if m < -2 * se else "level"
    return f"{m:+.2f} +- {se:.2f} ({verdict})"


def table(rows: list, pairs, phase: str, keys: tuple) -> str:
    """Markdown: per pair and score, each method's mean +- SE over the phase's seeds and the paired
    differences crest - random and crest - crest-cluster (win / loss: beyond 2 standard errors)."""
    out = ["| pair | score | lr (random / crest / cluster) | random | crest | crest-cluster | crest - random | "
           "crest - crest-cluster | wall s (random / crest) |", "|" + "---|" * 9]
    for p in pairs:
        by = {m: {r["seed"]: r for r in rows if r["phase"] == phase and r["pair"] == p and r["method"] == m}
              for m in METHODS}
        if not all(by.values()):
            continue
        for key in keys:
            if key not in next(iter(by["random"].values())):
                continue
            v = {m: {s: r[key] for s, r in by[m].items()} for m in METHODS}
            lrs = " / ".join(f"{next(iter(by[m].values()))['lr']:g}" for m in METHODS)
            cells = " | ".join("{:.2f} +- {:.2f}".format(*_mse(list(v[m].values()))) for m in METHODS)
            wall = " / ".join(f"{np.mean([r['wall_s'] for r in by[m].values()]):.2f}" for m in ("random", "crest"))
            out.append(f"| {p} {PAIRS[p]} | {key} | {lrs} | {cells} | {_paired(v['crest'], v['random'])} | "
                       f"{_paired(v['crest'], v['crest-cluster'])} | {wall} |")
    return "\n".join(out)


def variant_table(rows: list, pairs, method: str) -> tuple[str, bool]:
    """Markdown for ``--phase variant``: per pair the defaults' and the variant's validation accuracy, their
    paired difference and whether the variant passes (no more than ``TOLERANCE`` points below the defaults'
    mean and not worse by more than one standard error); and whether it passes every pair."""
    out = [f"| pair | lr | crest (defaults) | {method} | difference (points) | passes | wall s (defaults / variant) |",
           "|" + "---|" * 7]
    every = True
    for p in pairs:
        by = {m: {r["seed"]: r for r in rows if r["phase"] == "variant" and r["pair"] == p and r["method"] == m}
              for m in ("crest", method)}
        seeds = sorted(set(by["crest"]) & set(by[method]))
        if not seeds:
            every = False
            continue
        a = [by["crest"][s]["val_acc"] for s in seeds]
        b = [by[method][s]["val_acc"] for s in seeds]
        mean, se = _mse(np.subtract(b, a))
        ok = mean >= -TOLERANCE and mean >= -(0.0 if math.isnan(se) else se)
        every = every and ok
        walls = " / ".join(f"{np.mean([by[m][s]['wall_s'] for s in seeds]):.2f}" for m in ("crest", method))
        out.append(f"| {p} {PAIRS[p]} | {by['crest'][seeds[0]]['lr']:g} | "
                   "{:.2f} +- {:.2f} | {:.2f} +- {:.2f} | ".format(*_mse(a), *_mse(b))
                   + f"{mean:+.2f} +- {se:.2f} | {'yes' if ok else 'no'} | {walls} |")
    return "\n".join(out), every


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="JSON-lines records (appended; runs already there are not run again)")
    p.add_argument("--pairs", default="1,2,3,4,5")
    p.add_argument("--phase", choices=("protocol", "supplement", "variant"), default="protocol")
    p.add_argument("--variant", help="--phase variant: CrestConfig overrides, key=value,key=value")
    p.add_argument("--workers", type=int, default=1, help="runs at once, one torch thread each (default 1)")
    a = p.parse_args(argv)
    pairs = [int(x) for x in a.pairs.split(",")]
    if any(x not in PAIRS for x in pairs):
        p.error(f"--pairs takes numbers among {tuple(PAIRS)}, got {a.pairs!r}")
    if (a.phase == "variant") != bool(a.variant):
        p.error("--variant goes with --phase variant, and --phase variant needs it")
    if a.variant:
        _neighbour("cap_study").parse_overrides(a.variant)  # a malformed spec fails before any run
    path = Path(a.json)
    rows = _select(pairs, path, a.workers)
    lr = {(q, m): chosen(rows, q, m)[0] for q in pairs for m in METHODS}
    if a.phase == "protocol":
        jobs = [dict(pair=q, method=m, lr=lr[q, m], seed=s, phase="final", epochs=10)
                for q in pairs for m in METHODS for s in FINAL_SEEDS]
        rows = _run_all(jobs, path, a.workers)
        print(table(rows, pairs, "final", ("test_acc", "test_bal", "test_acc_lt")))
    elif a.phase == "variant":
        method = f"crest+{a.variant}"
        jobs = [dict(pair=q, method=m, lr=lr[q, "crest"], seed=s, phase="variant", epochs=10)
                for q in pairs for m in ("crest", method) for s in VARIANT_SEEDS]
        rows = _run_all(jobs, path, a.workers)
        text, every = variant_table(rows, pairs, method)
        print(text)
        print(f"\n{method} passes every pair: {'yes' if every else 'no'}")
    else:
        jobs = [dict(pair=q, method=m, lr=lr[q, m], seed=s, phase="supp", epochs=40)
                for q in pairs for m in METHODS for s in SUPP_SEEDS]
        rows = _run_all(jobs, path, a.workers)
        print(table(rows, pairs, "supp", ("val_acc", "val_bal")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
