"""How long one selection's coresets may be trained on: CREST with ``max_age="epoch"`` (the default since
2026-12-02) against ``max_age=None`` (the paper's rule: only a failed trust check reselects) and a random
subset re-drawn every epoch, at several learning rates, on the validation split of a synthetic data set
the other studies do not use.

At a small learning rate the quadratic model stays right, every trust check passes, and under the paper's
rule the run trains on the first selection's P coresets until it ends. This study measures that (the
selections a run makes, the distinct examples it trains on) and what a bound on a selection's age does
to it. The data: ``sklearn.datasets.make_classification`` (20,000 examples, 40 features of which 20
informative and 10 redundant, 10 classes of 2 clusters, 5 % of the labels flipped, ``random_state=0``),
standardised; 80 % training part, 20 % validation split (stratified); the test set is not made. The model:
an MLP 40-256-256-10; SGD, momentum 0.9, Nesterov, weight decay 5e-4, a per-step schedule (5 % linear
warm-up, then cosine) sized ``len(loader) * epochs``; budget 0.1, m = 128, 20 epochs (260 steps).

    .venv/bin/python benchmarks/age_study.py --json benchmarks/results/age-study.json --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

START, END = "<!-- age-study:start -->", "<!-- age-study:end -->"
VARIANTS = ("crest", "crest-max_age=None", "random")


def _data():
    import numpy as np
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=20000, n_features=40, n_informative=20, n_redundant=10, n_classes=10,
                               n_clusters_per_class=2, flip_y=0.05, class_sep=1.0, random_state=0)
    rng = np.random.default_rng(20230010)
    val = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: int(round(0.2 * (y == c).sum()))]
                          for c in range(10)])
    train = np.setdiff1d(np.arange(y.size), val)
    mu, sd = X[train].mean(0), X[train].std(0) + 1e-12
    X = ((X - mu) / sd).astype(np.float32)
    return X[train], y[train].astype(np.int64), X[val], y[val].astype(np.int64)


def weighted_step(model, opt, sched, x, y, w) -> None:
    """One step of the user's loop: the ``w``-weighted mean cross-entropy, backward, the optimizer's and
    the per-step schedule's steps."""
    import torch.nn.functional as F

    loss = (w * F.cross_entropy(model(x), y, reduction="none")).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def run_one(variant: str, lr: float, seed: int, a) -> dict:
    import numpy as np
    import torch
    from torch.utils.data import TensorDataset

    from crestcore import CrestConfig
    from crestcore.adapters.torch import CrestLoader
    from crestcore.plan import budget_steps, full_steps

    torch.set_num_threads(a.threads)
    xtr, ytr, xva, yva = _data()
    X, Y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(40, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    spe = budget_steps(a.budget, full_steps(len(Y), a.m))
    total = spe * a.epochs
    warm = max(1, int(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, total - warm))))
    seen: set[int] = set()
    t0 = time.perf_counter()
    loader = None
    if variant == "random":
        g = np.random.default_rng([seed, 1])
        epochs = [[torch.from_numpy(b) for b in np.array_split(g.choice(len(Y), spe * a.m, replace=False), spe)]
                  for _ in range(a.epochs)]
    else:
        config = CrestConfig(m=a.m, max_age=None) if variant == "crest-max_age=None" else CrestConfig(m=a.m)
        loader = CrestLoader(model, TensorDataset(X, Y), config=config, budget=a.budget, epochs=a.epochs, seed=seed)
        assert len(loader) == spe
    steps = 0
    for e in range(a.epochs):
        batches = epochs[e] if loader is None else loader
        for item in batches:
            if loader is None:
                x, yb, w = X[item], Y[item], torch.ones(len(item))
                seen.update(item.tolist())
            else:
                x, yb, w = item
                seen.update(loader.last_indices.tolist())
            weighted_step(model, opt, sched, x, yb, w)
            steps += 1
    wall = time.perf_counter() - t0
    with torch.no_grad():
        acc = float((model(torch.from_numpy(xva)).argmax(1) == torch.from_numpy(yva)).float().mean())
    out = {"variant": variant, "lr": lr, "seed": seed, "steps": steps, "val_acc": 100 * acc, "wall_s": wall,
           "distinct_examples": len(seen), "pool": len(Y), "epochs": a.epochs, "m": a.m, "budget": a.budget}
    if loader is not None:
        out.update(selections=len(loader.stats["selections"]), checks=len(loader.stats["checks"]))
    return out


def _mean_se(v):
    m = statistics.fmean(v)
    return m, (statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else float("nan"))


def table(rows: list[dict], a, command: str) -> str:
    lines = [START, "### CREST's `max_age` at several learning rates (age-study) on a validation split", "",
             f"Command: `{command}`. Synthetic data (`make_classification`, 20,000 x 40, 10 classes, 5 % flipped "
             f"labels), MLP 40-256-256-10, budget {a.budget}, m = {a.m}, {a.epochs} epochs; trained on the 80 % "
             "training part, scored on the 20 % validation split; seeds " + ", ".join(map(str, a.seeds)) + ". "
             "`distinct` is the number of distinct examples a run trained on (of the training part's 15,999).", "",
             "| lr | variant | val acc (%) per seed | mean +- SE | selections | distinct examples | wall s |",
             "|---|---|---|---|---|---|---|"]
    for lr in a.lrs:
        for v in VARIANTS:
            rs = [r for r in rows if r["lr"] == lr and r["variant"] == v]
            if not rs:
                continue
            m, se = _mean_se([r["val_acc"] for r in rs])
            sel = "-" if v == "random" else ", ".join(str(r["selections"]) for r in rs)
            accs = ", ".join(f"{r['val_acc']:.2f}" for r in rs)
            distinct = ", ".join(str(r["distinct_examples"]) for r in rs)
            wall = statistics.fmean(r["wall_s"] for r in rs)
            lines.append(f"| {lr} | {v} | {accs} | {m:.2f} +- {se:.2f} | {sel} | {distinct} | {wall:.1f} |")
    lines += ["", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lrs", default="0.03,0.1,0.3")
    p.add_argument("--seeds", default="1000,1001,1002")
    p.add_argument("--m", type=int, default=128)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", required=True, help="the records (resumed when present)")
    p.add_argument("--out", help="markdown file whose age-study block is rewritten")
    a = p.parse_args(argv)
    a.lrs = [float(v) for v in a.lrs.split(",")]
    a.seeds = [int(v) for v in a.seeds.split(",")]
    path = Path(a.json)
    rows = json.loads(path.read_text()) if path.exists() else []
    def key(r):  # a record of these settings (records of other --epochs, --m or --budget are not reused;
        # records written before 2026-12-05 do not say theirs: the defaults, which they ran with)
        return (r["variant"], r["lr"], r["seed"], r.get("epochs", 20), r.get("m", 128), r.get("budget", 0.1))

    done = {key(r) for r in rows}
    for lr in a.lrs:
        for seed in a.seeds:
            for v in VARIANTS:
                if (v, lr, seed, a.epochs, a.m, a.budget) in done:
                    continue
                rows.append(run_one(v, lr, seed, a))
                print(json.dumps(rows[-1]), flush=True)
                path.write_text(json.dumps(rows, indent=1))
    command = "python benchmarks/age_study.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    text = table([r for r in rows if key(r)[2:] in {(s, a.epochs, a.m, a.budget) for s in a.seeds}], a, command)
    print(text)
    if a.out:
        doc = Path(a.out).read_text()
        if START in doc:
            i, j = doc.index(START), doc.index(END) + len(END)
            doc = doc[:i] + text + doc[j:]
        else:
            doc = doc.rstrip("\n") + "\n\n" + text + "\n"
        Path(a.out).write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
