"""E3: CREST inside a user's own data pipeline: an image dataset with a per-item transform, read by a
``DataLoader`` with worker processes. Wall clock of full-data training, a random subset re-drawn every
epoch and CREST, all at the same learning-rate schedule, through the same ``DataLoader`` settings.

    .venv/bin/python benchmarks/pipeline.py                         # table on stdout
    .venv/bin/python benchmarks/pipeline.py --out docs/benchmarks.md --json benchmarks/results/pipeline-DATE.json

The data: ``--n`` (default 20,000) Fashion-MNIST training images kept as uint8; ``__getitem__`` converts
one image to float, normalises it and flips it left-right with probability 1/2 (``torch.rand``: a random
per-item transform, as a torchvision pipeline has). The measurement passes read the same images
without the flip (``measure_dataset``). Every method reads its batches through
``DataLoader(num_workers=--workers, persistent_workers=True)``: full data with ``shuffle=True``; Random
with a ``RandomSampler`` of ``steps_per_epoch * m`` examples drawn afresh each epoch; CREST with
:class:`crestcore.adapters.torch.CrestBatchSampler` (measurement passes through ``--measure-workers``
workers). The model is the demo's small CNN, SGD with Nesterov momentum, a per-step OneCycle schedule
sized ``len(loader) * epochs``; one intra-op thread. Wall clock covers building the loader and training
(CREST's selections and checks included), not the test evaluation.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)

START, END = "<!-- pipeline-bench:start -->", "<!-- pipeline-bench:end -->"
METHODS = ("full", "random", "crest", "crest-inproc", "crest-reuse", "crest-paper", "crest-passes", "crest-cap")


def _datasets(n: int, seed: int):
    import numpy as np
    import torch

    from crestcore.apps.datasets import load_fashion_mnist

    xtr, ytr = load_fashion_mnist(split="train")
    xte, yte = load_fashion_mnist(split="test")
    keep = np.sort(np.random.default_rng([seed, 7]).choice(xtr.shape[0], size=n, replace=False))
    return (torch.from_numpy(xtr[keep]), torch.from_numpy(ytr[keep].astype(np.int64)),
            torch.from_numpy(xte), torch.from_numpy(yte.astype(np.int64)))


class ImageSet:
    """uint8 images; ``__getitem__`` normalises one image and, with ``flip``, flips it with p = 1/2."""

    def __init__(self, images, labels, flip: bool):
        self.images, self.targets, self.flip = images, labels, flip

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        import torch

        x = (self.images[i].float().div_(255.0).sub_(0.2860).div_(0.3530)).unsqueeze(0)
        if self.flip and float(torch.rand(())) < 0.5:
            x = torch.flip(x, dims=(2,))
        return x, self.targets[i]


def run_one(method: str, seed: int, a) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, RandomSampler

    from crestcore import CrestConfig
    from crestcore.adapters.torch import CrestBatchSampler
    from crestcore.apps.train_demo import build_cnn, evaluate

    torch.set_num_threads(1)
    xtr, ytr, xte, yte = _datasets(a.n, 0)
    train_set, measure_set = ImageSet(xtr, ytr, flip=True), ImageSet(xtr, ytr, flip=False)
    torch.manual_seed(seed)
    model = build_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    from crestcore.plan import budget_steps, full_steps

    full_spe = full_steps(a.n, a.m)
    spe = budget_steps(a.budget, full_spe)
    kw = dict(num_workers=a.workers, persistent_workers=a.workers > 0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    sampler = None
    if method == "full":
        loader = DataLoader(train_set, batch_size=a.m, shuffle=True, generator=g, **kw)
    elif method == "random":
        loader = DataLoader(train_set, batch_size=a.m, generator=g, drop_last=True,
                            sampler=RandomSampler(train_set, replacement=False, num_samples=spe * a.m, generator=g),
                            **kw)
    else:
        # crest-paper: the paper's schedule (all P coresets at the anchor, the check on all of V_1), the
        # defaults before 2026-11-30
        jit = dict(coresets="at-anchor", check_size=None) if method == "crest-paper" else {}
        if method == "crest-reuse":  # the opt-in cheaper checks (docs/benchmarks.md, checks-study)
            jit = dict(checks="reuse")
        cfg = CrestConfig(m=a.m, max_overhead=a.cap if method == "crest-cap" else None, **jit)
        sampler = CrestBatchSampler(model, train_set, config=cfg, budget=a.budget, epochs=a.epochs,
                                    seed=seed, measure_dataset=measure_set,
                                    measure_batch_size=getattr(a, "measure_batch_size", None),
                                    measure_workers=0 if method in ("crest-inproc", "crest-reuse") else a.measure_workers,
                                    budget_counts="passes" if method == "crest-passes" else "steps")
        loader = sampler.dataloader(**kw)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=len(loader) * a.epochs)
    steps = 0
    for _ in range(a.epochs):
        for batch in loader:
            x, y = batch[0], batch[1]
            losses = F.cross_entropy(model(x), y, reduction="none")
            loss = (batch[2] * losses).mean() if sampler is not None else losses.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
    wall = time.perf_counter() - t0
    acc = evaluate(model, xte.float().div(255.0).sub(0.2860).div(0.3530).unsqueeze(1), yte, "cpu")
    out = {"method": method, "seed": seed, "steps": steps, "wall_s": wall, "test_acc": acc,
           "fraction_all_passes": steps / (full_spe * a.epochs)}
    if sampler is not None:
        st = sampler.stats
        out.update(selections=len(st["selections"]), checks=len(st["checks"]),
                   fraction_all_passes=st["budget"]["fraction_all_passes"])
    return out


def _child(args) -> dict:
    """One run in a child process (see ``e2e.run_child``): ``args`` is ``[spec]``, a JSON method, seed and
    the parent's options."""
    ns = json.loads(args[0])
    return run_one(ns["method"], ns["seed"], argparse.Namespace(**ns["args"]))


def run(a) -> list[dict]:
    from e2e import run_child

    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    for seed in range(a.seeds):
        for method in METHODS:  # interleaved: machine load drifts hit every method alike
            spec = json.dumps({"method": method, "seed": seed, "args": vars(a)})
            row = run_child(__file__, [spec], env=env, timeout=3600, what=f"{method} seed {seed}", tail=3000)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _chunk(a) -> str:
    """The measurement chunk a run used, in the table's words (runs saved before the option passed 256)."""
    size = getattr(a, "measure_batch_size", 256)
    return "the default chunk (128 examples on the CPU)" if size is None else f"`measure_batch_size={size}`"


def table(rows: list[dict], a, command: str) -> str:
    from e2e import md_row

    by = {m: [r for r in rows if r["method"] == m] for m in METHODS}
    full_wall = statistics.mean(r["wall_s"] for r in by["full"])

    def ms(vals):
        if len(vals) < 2:
            return f"{vals[0]:.2f}"
        return f"{statistics.mean(vals):.2f} +- {statistics.stdev(vals) / math.sqrt(len(vals)):.2f}"

    lines = [
        "### E3: CREST in the user's DataLoader (image set with a per-item transform, worker processes)",
        "",
        f"Command: `{command}` ({_dt.date.today().isoformat()}; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end). {a.n} Fashion-MNIST images, uint8, normalised and randomly "
        f"flipped in `__getitem__`; `DataLoader(num_workers={a.workers}, persistent_workers=True)` for every "
        f"method; CREST through `CrestBatchSampler` (measurement passes: `measure_workers={a.measure_workers}`, "
        f"{_chunk(a)}, no flip), `CrestConfig(m={a.m})` defaults. {a.epochs} epochs, m = {a.m}, budget {a.budget}, "
        f"OneCycle lr {a.lr} for every method (not tuned per method: this measures wall clock; the "
        f"accuracies are indicative), one intra-op thread. Mean +- standard error over {a.seeds} seeds; "
        f"every run below.",
        "",
        "`crest-passes` is CREST with `budget_counts=\"passes\"`: its measurement passes count against the",
        f"budget too: its forward and backward passes are held to the budget's steps ({100 * a.budget:g} % of the "
        "full run's, rounded to whole steps an epoch; the last selection may pass the count by its own cost).",
        f"`crest-cap` is CREST with `CrestConfig(max_overhead={a.cap})`: its measurement passes are held to",
        f"{a.cap:g} of its training passes (checks and reselections wait until the count allows them).",
        "`crest` runs `CrestConfig(m=m)`'s defaults: coreset p selected just in time, at step p (a selection",
        "cut short by a failed check forwards only the subsets it used), the check on 128 examples of V_1.",
        "`crest-inproc` is `crest` with the measurement passes loaded in the training process",
        "(`measure_workers=0`, the sampler's default) instead of worker processes.",
        "`crest-reuse` is `crest-inproc` with `CrestConfig(checks=\"reuse\")` (opt-in: it failed one of the",
        "two gates of its validation study): only the steps that cycle a coreset are checked.",
        "`crest-paper` is the paper's schedule, `CrestConfig(coresets=\"at-anchor\", check_size=None)` (the",
        "defaults before 2026-11-30): all P coresets at the anchor, the check on all r examples of V_1.",
        "*passes / full*: training plus measurement passes in step-equivalents, over the full run's steps.",
        "",
        "| method | steps | wall s | wall / full | passes / full | test accuracy (%) |",
        "|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        rs = by[m]
        walls = [r["wall_s"] for r in rs]
        lines.append(md_row(m, ms([r["steps"] for r in rs]), ms(walls), f"{statistics.mean(walls) / full_wall:.2f}",
                            f"{statistics.mean(r['fraction_all_passes'] for r in rs):.2f}",
                            ms([100 * r["test_acc"] for r in rs])))
    lines += ["", "Every run:", "", "| method | seed | steps | wall s | test acc (%) | CREST selections / checks |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        extra = f"{r['selections']} / {r['checks']}" if "selections" in r else "-"
        lines.append(md_row(r["method"], r["seed"], r["steps"], f"{r['wall_s']:.2f}", f"{100 * r['test_acc']:.2f}", extra))
    return "\n".join(lines)


def main(argv=None) -> int:
    from e2e import (
        answer_child, budget_fraction, non_negative_int, parse_with_outputs, positive_float, positive_int, publish,
    )

    if answer_child(argv, _child):
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=positive_int, default=20000)
    ap.add_argument("--epochs", type=positive_int, default=5)
    ap.add_argument("--m", type=positive_int, default=128)
    ap.add_argument("--budget", type=budget_fraction, default=0.1)
    ap.add_argument("--lr", type=positive_float, default=0.05)
    ap.add_argument("--workers", type=non_negative_int, default=2)
    ap.add_argument("--measure-workers", type=non_negative_int, default=2)
    ap.add_argument("--measure-batch-size", type=positive_int, default=None,
                    help="chunk of the measurement passes (default: the sampler's own, 128 examples on the CPU; "
                         "the runs before 2026-12-03 passed 256)")
    ap.add_argument("--seeds", type=positive_int, default=2)
    ap.add_argument("--cap", type=positive_float, default=0.5, help="max_overhead of the crest-cap row")
    a = parse_with_outputs(ap, argv, "pipeline-bench", "write every run here")
    from crestcore.apps.datasets import fashion_mnist_available

    if not fashion_mnist_available():
        print("Fashion-MNIST is not installed (Debian package dataset-fashion-mnist; `make setup` installs it)")
        return 2
    rows = run(a)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()
                     if k not in ("out", "json") and ap.get_default(k) != v)
    command = "python benchmarks/pipeline.py" + (f" {flags}" if flags else "") + (
        f" --out {shlex.quote(a.out)}" if a.out else "")
    publish(table(rows, a, command), out=a.out, json_path=a.json, payload={"args": vars(a), "rows": rows},
            start=START, end=END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
