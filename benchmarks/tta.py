"""Time to accuracy: full data vs Random vs CREST on Fashion-MNIST, clean and with 40 % label noise.

The protocol of RS2 (Okanovic et al., "Repeated Random Sampling for Minimizing the Time-to-Accuracy of
Learning"): every method gets the same training recipe and a budget of the full run's steps, its own
learning rate tuned on a validation split, several seeds, and its wall clock counts every selection.

1. Data sets (``--datasets``): ``fmnist`` (60k train / 10k test) and ``fmnist-noisy40``: the same with
   symmetric label noise on the *training* labels only: each, with probability 0.4, replaced by a
   uniformly random *other* class (:func:`symmetric_label_noise`, ``np.random.default_rng(NOISE_SEED)``,
   independent of the run seed). The test labels stay clean. (``fmnist-noisyNN`` works for any NN.)
2. Learning rate: a class-stratified 10 % validation split of the training set (``SPLIT_SEED``; for the
   noisy set its labels are noisy too, as a user's would be). For each (data set, method, budget), one
   run per ``--lrs`` value with ``--sweep-seed`` on the other 90 %, scored on the validation split; the
   best lr wins (ties: the smaller). The test set is not used. The sweep's cost is reported, and is in
   no wall clock.
3. Final runs: each method, budget and ``--seeds`` seed on the whole training set with its chosen lr,
   test accuracy at the end of the run (and at ``--evals`` points for the curves; evaluations are
   excluded from the wall clock). Within a seed the methods run one after another in this process.
4. Report: per data set and budget, test accuracy mean +- SE (std / sqrt(seeds), ddof 1) and every seed's
   value, relative error vs full data, wall clock, its ratio to Random's, speedup vs full, counted passes;
   CREST - Random paired by seed, and the verdict at the 10 % budget against :data:`TARGETS`.
5. Figures: test accuracy vs wall clock, mean over seeds, one PNG per data set (``--figdir``).
6. ``--suite ablations``: the CREST variants of :data:`ABLATIONS` at ``--ablation-budget``, same seeds,
   with the lr chosen for crest (Random's for the reference row; or ``--lr``); the sweep runs if the
   ``--json`` file does not hold it yet. Its table goes into its own block (``tta-ablations`` markers).
   ``--suite all`` runs both suites.

Sweep and ablation runs evaluate only at the end; final runs also at ``--evals`` points for the curves.

Every run goes through :func:`crestcore.apps.train_demo.train_method`. ``--json PATH`` is rewritten after
every run; ``--resume`` skips the runs it holds (key: data set, method or variant, budget, seed, lr,
phase), so an interrupted run continues, and a finished one is re-rendered without training.

Run: ``crest bench tta --json tta.json --out docs/benchmarks.md`` (or ``python benchmarks/tta.py``);
``--out`` rewrites only the block between ``<!-- tta-bench:start -->`` and ``<!-- tta-bench:end -->``
(and, for the ablations, ``<!-- tta-ablations:start -->`` ... ``end``); the rest of the file is kept.
Then the ablations: ``crest bench tta --suite ablations --json tta.json --resume --out docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # e2e.py sits next to this file (on the path already when run as a script)
    sys.path.append(_HERE)  # last: never shadows an installed module

from e2e import _warm_up  # noqa: E402  (loads the selection kernels outside every clock)
from e2e import budget_fraction, budget_list, lr_list, positive_float, positive_int, one_seed, seed_list, torch_device  # noqa: E402
from e2e import write_block as _write_block  # noqa: E402

from crestcore.apps.train_demo import (  # noqa: E402
    TrainSettings, _COLORS, _LABELS, load_data, machine_line, relative_error, train_method,
)

START, END = "<!-- tta-bench:start -->", "<!-- tta-bench:end -->"
ABL_START, ABL_END = "<!-- tta-ablations:start -->", "<!-- tta-ablations:end -->"
NOISE_SEED = 20230040  # label noise: fixed, independent of every run seed
SPLIT_SEED = 20230010  # the validation split
SUBSET_SEED = 0  # --limit-train / --limit-test subsets (the same for every seed)
VAL_FRACTION = 0.1
TARGET_BUDGET = 0.1
TARGETS = {
    "not_worse": "at least as accurate as Random (mean difference > -1 SE)",
    "better": "better by more than 2 SE",
    "wall": "wall clock <= 1.2x Random's",
}
WALL_RATIO_MAX = 1.2
METHODS = ("full", "random", "crest", "crest-drop")

# The ablations: name -> train_demo method, CrestConfig overrides (settings.extra["crest"]), TrainSettings
# overrides. m = 128 (so r = 2m is 256). "random" is the reference row.
ABLATIONS = {
    "random": {"method": "random"},
    "default": {"method": "crest"},
    "weights=uniform": {"method": "crest", "crest": {"weights": "uniform"}},
    "weights=tempered": {"method": "crest", "crest": {"weights": "tempered"}},  # cluster sizes ** 0.5
    "reselect=epoch": {"method": "crest", "crest": {"reselect": "epoch"}},  # every budgeted epoch, no trust check
    "r=2m": {"method": "crest", "crest": {"r": 256}},
    "r=8m": {"method": "crest", "crest": {"r": 1024}},
    "drop": {"method": "crest-drop"},
    "drop,min_records=2": {"method": "crest-drop", "settings": {"drop_min_records": 2}},
    "embeddings": {"method": "crest", "crest": {"embeddings": True}},  # last-layer weight gradients
    "check_union": {"method": "crest", "crest": {"check_union": True}},
    "max_overhead=0.2": {"method": "crest", "crest": {"max_overhead": 0.2}},  # cost-capped schedule
}


# --------------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------------


def symmetric_label_noise(y, rate: float, n_classes: int, seed: int) -> np.ndarray:
    """A copy of ``y`` where each label, with probability ``rate``, is replaced by a uniformly random
    *other* class (never itself). Deterministic in ``seed``; ``y`` is not modified."""
    y = np.asarray(y, dtype=np.int64)
    if not 0.0 <= rate <= 1.0 or n_classes < 2:
        raise ValueError(f"need 0 <= rate <= 1 and n_classes >= 2, got {rate}, {n_classes}")
    rng = np.random.default_rng(seed)
    flip = rng.random(y.size) < rate
    shift = rng.integers(1, n_classes, size=y.size)  # 1 .. C-1: uniform over the other classes
    out = y.copy()
    out[flip] = (y[flip] + shift[flip]) % n_classes
    return out


def stratified_split(y, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) index arrays (sorted): ``round(fraction * n_c)`` random examples of each
    class ``c`` go to the validation split."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    val = [rng.choice(idx, size=int(math.floor(fraction * idx.size + 0.5)), replace=False)
           for idx in (np.flatnonzero(y == c) for c in np.unique(y))]
    val = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(y.size), val), val


def choose_lr(val_acc: dict) -> float:
    """The learning rate with the best validation accuracy; ties go to the smaller one."""
    return max(val_acc, key=lambda lr: (val_acc[lr], -lr))


def mean_se(xs) -> tuple[float, float]:
    """(mean, standard error = std (ddof 1) / sqrt(n)); SE is nan for one value, both for none."""
    xs = [float(x) for x in xs]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan)


def paired(a: dict, b: dict) -> tuple[float, float, dict]:
    """``a - b`` paired by key (seed): (mean, SE of the per-key differences, the differences)."""
    d = {k: a[k] - b[k] for k in a if k in b}
    return (*mean_se(d.values()), d)


def verdict(diffs, wall_ratios) -> dict:
    """The targets (:data:`TARGETS`) from CREST - Random accuracy differences and CREST / Random wall
    clock ratios (per seed): name -> True / False (None when the SE is undefined)."""
    d, se = mean_se(diffs)
    r, _ = mean_se(wall_ratios)
    ok = not math.isnan(se)
    return {"not_worse": (d > -se) if ok else None, "better": (d > 2 * se) if ok else None,
            "wall": (r <= WALL_RATIO_MAX) if not math.isnan(r) else None}


def run_key(rec: dict) -> tuple:
    """The resume key of a record: data set, method (the variant for ablations), budget, seed, lr, phase."""
    return (rec["dataset"], rec.get("variant") or rec["method"], float(rec["budget"]), int(rec["seed"]),
            float(rec["lr"]), rec["phase"])


def noise_rate(name: str) -> float:
    """``fmnist`` -> 0, ``fmnist-noisyNN`` -> NN / 100; ValueError for anything else."""
    mt = re.fullmatch(r"fmnist(?:-noisy(\d{1,2}))?", name)
    if not mt:
        raise ValueError(f"unknown data set {name!r}: fmnist or fmnist-noisyNN (e.g. fmnist-noisy40)")
    return int(mt.group(1) or 0) / 100


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
    name: str
    x_train: object
    y_train: object  # noisy for fmnist-noisyNN
    x_test: object
    y_test: object  # always clean
    train_idx: np.ndarray  # the sweep's training part
    val_idx: np.ndarray  # the sweep's validation split
    flipped: float  # share of training labels changed by the noise

    def full(self):
        return self.x_train, self.y_train, self.x_test, self.y_test

    @functools.cached_property
    def sweep(self):
        """Train on 90 % of the training set, evaluate on the other 10 %: the test set is not in it."""
        import torch

        tr, va = torch.from_numpy(self.train_idx), torch.from_numpy(self.val_idx)
        return self.x_train[tr], self.y_train[tr], self.x_train[va], self.y_train[va]


def load_dataset(name: str, ns) -> Dataset:
    """Fashion-MNIST (``--limit-*`` subsets drawn with SUBSET_SEED), the named label noise on the training
    labels, the validation split."""
    import torch

    rate = noise_rate(name)
    x_tr, y_tr, x_te, y_te = load_data(ns.root, n_train=ns.limit_train, n_test=ns.limit_test, seed=SUBSET_SEED)
    y_clean = y_tr.numpy()
    y = symmetric_label_noise(y_clean, rate, int(y_clean.max()) + 1, NOISE_SEED) if rate > 0 else y_clean
    tr, va = stratified_split(y, VAL_FRACTION, SPLIT_SEED)
    return Dataset(name, x_tr, torch.from_numpy(y), x_te, y_te, tr, va, float(np.mean(y != y_clean)))


# --------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------


class Runner:
    """Runs (or, with resume, finds) one training run per key; keeps the records and the JSON file."""

    def __init__(self, ns, protocol: dict, records: list, total: int):
        self.ns, self.protocol, self.records, self.total = ns, protocol, records, total
        self.done = {run_key(r): r for r in records}
        self.t0 = time.perf_counter()

    def run(self, ds: Dataset, phase: str, method: str, budget: float, seed: int, lr: float, *,
            variant: str | None = None) -> dict:
        key = (ds.name, variant or method, float(budget), int(seed), float(lr), phase)
        if key in self.done:
            return self.done[key]
        spec = ABLATIONS[variant] if variant else {}
        s = TrainSettings(epochs=self.ns.epochs, budget=budget, lr=lr, seed=seed, threads=self.ns.threads,
                          device=self.ns.device, evals=self.ns.evals if phase == "final" else 1,
                          **spec.get("settings", {}))
        if spec.get("crest"):
            s.extra["crest"] = dict(spec["crest"])
        data = ds.sweep if phase == "sweep" else ds.full()
        load = os.getloadavg()[0]
        t = time.perf_counter()
        try:
            r = train_method(method, data, s, progress=False)
        except FloatingPointError as exc:  # diverged (e.g. a sweep's largest lr): a result, accuracy 0
            r = {"acc": 0.0, "wall": 0.0, "steps": None, "curve": [], "breakdown": {}, "counts": {},
                 "diverged": str(exc)}
        elapsed = time.perf_counter() - t
        rec = {"dataset": ds.name, "phase": phase, "method": method, "variant": variant, "budget": float(budget),
               "seed": int(seed), "lr": float(lr), "acc": r["acc"], "wall": r["wall"], "elapsed": elapsed,
               "steps": r["steps"], "n_train": int(data[0].shape[0]), "n_eval": int(data[2].shape[0]),
               "curve": r["curve"], "breakdown": r["breakdown"], "counts": r["counts"],
               "passes": (r.get("stats") or {}).get("budget", {}).get("fraction_all_passes"),
               "config": r.get("config"), "overrides": spec.get("crest"), "settings": spec.get("settings"),
               "load": load, "date": _dt.datetime.now().isoformat(timespec="seconds"),
               "diverged": r.get("diverged")}
        self.records.append(rec)
        self.done[key] = rec
        self.save()
        what = "val" if phase == "sweep" else "test"
        print(f"[{len(self.done)}/{self.total}] {phase:<8} {ds.name:<15} {variant or method:<18} b={budget:<5g} "
              f"seed {seed:<4} lr {lr:<6g} {what} acc {100 * rec['acc']:6.2f}%  wall {rec['wall']:7.1f} s  "
              f"(run {elapsed:.1f} s, load {load:.1f}, {(time.perf_counter() - self.t0) / 60:.1f} min)",
              file=sys.stderr, flush=True)
        return rec

    def save(self, **extra) -> None:
        if not self.ns.json:
            return
        path = Path(self.ns.json)
        tmp = path.with_name(path.name + ".tmp")
        from crestcore.apps.train_demo import strict_json

        # strict JSON: a ratio without a value (a NaN wall ratio of a tiny run) is null, not NaN
        tmp.write_text(strict_json({"protocol": self.protocol, "records": self.records, **extra}, default=str))
        os.replace(tmp, path)  # an interrupted write never leaves half a file


def pairs(methods, budgets) -> list[tuple[str, float]]:
    """(method, budget) of the main suite: full once (budget 1), every other method at every budget."""
    return [("full", 1.0)] * ("full" in methods) + [(m, b) for b in budgets for m in methods if m != "full"]


def chosen_lr(runner: Runner, ds: Dataset, method: str, budget: float) -> float:
    """The lr of (data set, method, budget): ``--lr``, or the sweep's choice (running the sweep if needed)."""
    if runner.ns.lr is not None:
        return runner.ns.lr
    return choose_lr({lr: runner.run(ds, "sweep", method, budget, runner.ns.sweep_seed, lr)["acc"]
                      for lr in runner.ns.lrs})


def main_suite(runner: Runner, ds: Dataset) -> None:
    ns = runner.ns
    chosen = {p: chosen_lr(runner, ds, *p) for p in pairs(ns.methods, ns.budgets)}
    for seed in ns.seeds:
        for (method, budget), lr in chosen.items():
            runner.run(ds, "final", method, budget, seed, lr)


def ablation_suite(runner: Runner, ds: Dataset) -> None:
    ns = runner.ns
    lrs = {m: chosen_lr(runner, ds, m, ns.ablation_budget) for m in ("random", "crest")}
    for seed in ns.seeds:
        for v in ns.ablations:
            m = ABLATIONS[v]["method"]
            runner.run(ds, "ablation", m, ns.ablation_budget, seed, lrs["random" if m == "random" else "crest"],
                       variant=v)


def check_ablations(names) -> None:
    """Fail before any run when a variant's CrestConfig field does not exist or is not passed through
    (``train_demo.crest_config`` must apply ``settings.extra["crest"]``)."""
    from crestcore import CrestConfig
    from crestcore.apps.train_demo import crest_config

    fields = {f.name for f in dataclasses.fields(CrestConfig)}
    for v in names:
        spec = ABLATIONS[v]
        ov = spec.get("crest", {})
        if set(ov) - fields:
            raise ValueError(f"ablation {v!r}: CrestConfig has no field {sorted(set(ov) - fields)} here")
        if ov:
            cfg = crest_config(TrainSettings(extra={"crest": dict(ov)}, **spec.get("settings", {})),
                               dropping=spec["method"] == "crest-drop")
            if any(getattr(cfg, k) != val for k, val in ov.items()):
                raise ValueError(f"ablation {v!r}: train_demo.crest_config does not apply settings.extra['crest']")


# --------------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------------


def lr_table(records, ns, ds_name) -> list[dict]:
    """The sweep of one data set: per (method, budget) every lr's validation accuracy and the choice."""
    rows = []
    needed = pairs(ns.methods, ns.budgets) if ns.suite != "ablations" else []
    if ns.suite != "main":
        needed += [(m, ns.ablation_budget) for m in ("random", "crest") if (m, ns.ablation_budget) not in needed]
    for method, budget in needed:
        recs = [r for r in records if r["phase"] == "sweep" and r["dataset"] == ds_name and r["method"] == method
                and r["budget"] == budget and r["seed"] == ns.sweep_seed and r["lr"] in ns.lrs]
        acc = {r["lr"]: r["acc"] for r in recs}
        if ns.lr is None and len(acc) == len(ns.lrs):
            rows.append({"method": method, "budget": budget, "val_acc": acc, "lr": choose_lr(acc),
                         "cost_s": sum(r["elapsed"] for r in recs), "wall_s": sum(r["wall"] for r in recs)})
    return rows


def summarize(records, ns) -> dict:
    """Per data set: the sweep, the main rows, CREST - Random, the verdict, mean curves, the ablations."""
    out = {}
    for ds_name in ns.datasets:
        sw = lr_table(records, ns, ds_name)
        lr_of = {(r["method"], r["budget"]): r["lr"] for r in sw}

        def by_seed(phase, method, budget, lr, variant=None):  # used within this iteration only
            return {r["seed"]: r for r in records if r["phase"] == phase and r["dataset"] == ds_name  # noqa: B023
                    and r["method"] == method and r["budget"] == budget and r["lr"] == lr
                    and r.get("variant") == variant and r["seed"] in ns.seeds}

        d = {"sweep": sw, "rows": [], "diff": {}, "ablations": []}
        lr_for = (lambda m, b: ns.lr) if ns.lr is not None else (lambda m, b: lr_of.get((m, b)))  # noqa: B023
        if ns.suite != "ablations":
            full = by_seed("final", "full", 1.0, lr_for("full", 1.0))
            final = {p: by_seed("final", *p, lr_for(*p)) for p in pairs(ns.methods, ns.budgets)}
            for (method, budget), recs in final.items():
                if recs:
                    d["rows"].append(row(method, budget, lr_for(method, budget), recs, full,
                                         final.get(("random", budget), {})))
            for b in ns.budgets:
                c, r = final.get(("crest", b), {}), final.get(("random", b), {})
                if c and r:
                    diff, se, per = paired({s: x["acc"] for s, x in c.items()}, {s: x["acc"] for s, x in r.items()})
                    wr = ratios(c, r, per)
                    d["diff"][b] = {"mean": diff, "se": se, "per_seed": per, "wall_ratio": mean_se(wr),
                                    "verdict": verdict(per.values(), wr)}
        if ns.suite != "main":
            b = ns.ablation_budget
            lrs = {m: lr_for(m, b) for m in ("random", "crest")}
            runs = {v: by_seed("ablation", ABLATIONS[v]["method"], b,
                               lrs["random" if ABLATIONS[v]["method"] == "random" else "crest"], v)
                    for v in ns.ablations}
            acc = {v: {s: x["acc"] for s, x in rs.items()} for v, rs in runs.items()}
            for v, rs in runs.items():
                if not rs:
                    continue
                ref = runs.get("random", {})
                d["ablations"].append({
                    "variant": v, "method": ABLATIONS[v]["method"], "lr": next(iter(rs.values()))["lr"],
                    "overrides": {**ABLATIONS[v].get("crest", {}), **ABLATIONS[v].get("settings", {})},
                    "acc": mean_se(acc[v].values()), "accs": acc[v],
                    "vs_default": paired(acc[v], acc["default"])[:2] if "default" in acc else None,
                    "vs_random": paired(acc[v], acc["random"])[:2] if "random" in acc else None,
                    "wall": mean_se(x["wall"] for x in rs.values() if x["wall"] > 0),
                    "wall_ratio": mean_se(ratios(rs, ref, rs)),
                    "passes": mean_or_none(x["passes"] for x in rs.values()),
                })
        out[ds_name] = d
    return out


def ratios(a: dict, b: dict, seeds) -> list:
    """Per-seed wall-clock ratios a / b over the seeds both ran; a diverged run (wall 0) has none."""
    return [a[s]["wall"] / b[s]["wall"] for s in seeds if s in a and s in b and a[s]["wall"] > 0 and b[s]["wall"] > 0]


def mean_or_none(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def row(method, budget, lr, recs, full, random) -> dict:
    """One line of the main table from the per-seed records of (method, budget)."""
    seeds = sorted(recs)
    accs = {s: recs[s]["acc"] for s in seeds}
    rel = [relative_error(full[s]["acc"], accs[s]) for s in seeds if s in full]
    curves = [recs[s]["curve"] for s in seeds if recs[s]["curve"]] or [[]]  # a diverged run has none
    k = min(len(c) for c in curves)
    return {
        "method": method, "budget": budget, "lr": lr, "steps": recs[seeds[0]]["steps"], "seeds": seeds,
        "acc": mean_se(accs.values()), "accs": accs, "rel_error": mean_se(rel), "rel_errors": rel,
        "wall": mean_se(recs[s]["wall"] for s in seeds if recs[s]["wall"] > 0), "walls": [recs[s]["wall"] for s in seeds],
        "wall_ratio": mean_se(ratios(recs, random, seeds)),
        "speedup": mean_se(ratios(full, recs, seeds)),
        "passes": mean_or_none(recs[s]["passes"] for s in seeds),
        "curve": {"wall": [statistics.fmean(c[i]["wall"] for c in curves) for i in range(k)],
                  "acc": [statistics.fmean(c[i]["acc"] for c in curves) for i in range(k)]},
    }


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def pm(ms, scale: float = 1.0, digits: int = 2, sign: bool = False) -> str:
    m, se = ms
    if m is None or math.isnan(m):
        return "-"
    txt = f"{scale * m:+.{digits}f}" if sign else f"{scale * m:.{digits}f}"
    return txt if math.isnan(se) else f"{txt} ± {scale * se:.{digits}f}"


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def met(flag) -> str:
    return "n/a (one seed)" if flag is None else "**met**" if flag else "**missed**"


def header(title: str, meta: dict, ns) -> list[str]:
    """Title, command, date, machine, load, and the protocol paragraphs shared by both blocks."""
    L = [
        f"## {title}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; machine: {meta['machine']}; torch {meta['torch']}, {ns.threads} threads, "
        f"device {ns.device}; load average {meta['load_before']} before, {meta['load_after']} after "
        f"(1-min load at the start of the runs: {meta['load_runs']}); this invocation {meta['total_s'] / 60:.1f} min.",
        "",
        f"Protocol: the `crest demo` CNN and recipe (`crestcore.apps.train_demo.train_method`: SGD, momentum 0.9, "
        f"Nesterov, weight decay 5e-4, m = 128, linear warm-up and cosine decay over each run's own steps), "
        f"{meta['n_train']} training / {meta['n_test']} test images, full data {ns.epochs} epochs; Random (a "
        "fresh uniform subset each epoch), CREST and CREST with dropping get a budget of the full run's steps. "
        f"Seeds {', '.join(map(str, ns.seeds))}. `fmnist-noisyNN`: NN % of the training labels replaced by a "
        f"uniformly random other class (fixed seed {NOISE_SEED}, the same for every run); test labels clean. "
        "Wall clock = training only (batch loading, steps, every selection, CREST's model fits and checks); "
        "test evaluations are excluded. Accuracy: test set, end of run. ± = standard error over seeds "
        "(std with ddof 1 / sqrt(seeds)); differences are paired by seed.",
        "",
    ]
    if ns.lr is not None:
        return L + [f"Learning rate: {ns.lr:g} for every run (`--lr`; no sweep).", ""]
    return L + [
        f"Learning rate: per (data set, method, budget), chosen among {', '.join(f'{x:g}' for x in ns.lrs)} "
        f"by validation accuracy (one run each, seed {ns.sweep_seed}, not a final seed; ties go to the "
        f"smaller lr), training on 90 % of the training set and scoring on a class-stratified 10 % "
        f"validation split (fixed seed {SPLIT_SEED}; **noisy labels for the noisy data set**, as a user "
        "would have). The test set is not used. The sweep's cost is in no wall clock below.", ""]


def dataset_title(ds_name: str, meta: dict) -> str:
    rate = noise_rate(ds_name)
    return f"### {ds_name}" + (f" ({100 * rate:g} % symmetric label noise on the training labels; "
                               f"{100 * meta['flipped'][ds_name]:.1f} % changed)" if rate else " (clean labels)")


def sweep_lines(d: dict, ns) -> list[str]:
    if not d["sweep"]:
        return []
    L = ["Learning-rate sweep: validation accuracy % (chosen lr in bold; 0.00: the run diverged, its loss "
         "became NaN):", "",
         "| method | budget | " + " | ".join(f"lr {x:g}" for x in ns.lrs) + " | chosen lr | cost s |",
         "|---|---|" + "---|" * len(ns.lrs) + "---|---|"]
    for r in d["sweep"]:
        cells = [f"**{100 * r['val_acc'][x]:.2f}**" if x == r["lr"] else f"{100 * r['val_acc'][x]:.2f}"
                 for x in ns.lrs]
        L.append(f"| {r['method']} | {r['budget']:g} | " + " | ".join(cells) + f" | {r['lr']:g} | {r['cost_s']:.0f} |")
    return L + ["", f"Sweep cost: {sum(r['cost_s'] for r in d['sweep']):.0f} s in all "
                    f"({sum(r['wall_s'] for r in d['sweep']):.0f} s of it training wall clock); not included "
                    "in any wall clock.", ""]


def markdown_main(summary: dict, meta: dict, ns, figures: dict) -> str:
    L = header("Time to accuracy (RS2 protocol): full data vs Random vs CREST, Fashion-MNIST clean and noisy",
               meta, ns)
    for ds_name, d in summary.items():
        L += [dataset_title(ds_name, meta), "", *sweep_lines(d, ns)]
        if d["rows"]:
            L += ["| method | budget | lr | steps | test acc % | per seed | rel. error % vs full | wall clock s "
                  "| wall / Random | speedup vs full | counted passes % |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in d["rows"]:
                per = ", ".join(f"{100 * r['accs'][s]:.2f}" for s in r["seeds"])
                ratio = "-" if r["method"] == "full" else "1" if r["method"] == "random" else pm(r["wall_ratio"])
                L.append(f"| {r['method']} | {r['budget']:g} | {r['lr']:g} | {r['steps']} | {pm(r['acc'], 100)} | "
                         f"{per} | {pm(r['rel_error'])} | {pm(r['wall'], digits=1)} | {ratio} | "
                         f"{pm(r['speedup'])}x | {pct(r['passes'])} |")
            L += ["", "Counted passes: `stats['budget']['fraction_all_passes']`, every forward/backward pass "
                      "(training, selection, checks) in full-data steps, as % of the full run's.", ""]
        for b, x in d["diff"].items():
            per = ", ".join(f"{100 * v:+.2f}" for v in x["per_seed"].values())
            L.append(f"- CREST - Random at budget {b:g}: {pm((x['mean'], x['se']), 100, sign=True)} points "
                     f"(per seed {per}); wall clock ratio {pm(x['wall_ratio'])}.")
        if TARGET_BUDGET in d["diff"]:
            x = d["diff"][TARGET_BUDGET]
            v = x["verdict"]
            L += ["", f"**Verdict ({ds_name}, budget {TARGET_BUDGET:g}):** CREST {TARGETS['not_worse']}: "
                      f"{met(v['not_worse'])}; {TARGETS['better']}: {met(v['better'])}; {TARGETS['wall']}: "
                      f"{pm(x['wall_ratio'])}x, {met(v['wall'])}."]
        if ds_name in figures:
            L += ["", figures[ds_name]]
        L.append("")
    return "\n".join(L).rstrip() + "\n"


def markdown_ablations(summary: dict, meta: dict, ns) -> str:
    L = header(f"Ablations of CREST at budget {ns.ablation_budget:g} (time-to-accuracy protocol)", meta, ns)
    L += ["Variants: CrestConfig overrides (`settings.extra['crest']`) or TrainSettings fields, at the lr chosen "
          "for `crest` (Random's reference row at Random's); differences paired by seed.", ""]
    for ds_name, d in summary.items():
        if not d["ablations"]:
            continue
        L += [dataset_title(ds_name, meta), "", *sweep_lines(d, ns),
              "| variant | method | overrides | lr | test acc % | per seed | vs default (paired) | "
              "vs Random (paired) | wall clock s | wall / Random | counted passes % |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for a in d["ablations"]:
            ov = ", ".join(f"{k}={v}" for k, v in a["overrides"].items()) or "-"
            per = ", ".join(f"{100 * v:.2f}" for v in a["accs"].values())
            vd = pm(a["vs_default"], 100, sign=True) if a["vs_default"] and a["variant"] != "default" else "-"
            vr = pm(a["vs_random"], 100, sign=True) if a["vs_random"] and a["variant"] != "random" else "-"
            L.append(f"| {a['variant']} | {a['method']} | {ov} | {a['lr']:g} | {pm(a['acc'], 100)} | {per} | "
                     f"{vd} | {vr} | {pm(a['wall'], digits=1)} | {pm(a['wall_ratio'])} | {pct(a['passes'])} |")
        L.append("")
    return "\n".join(L).rstrip() + "\n"


def make_figures(summary: dict, figdir: Path) -> dict:
    """Test accuracy vs wall clock (mean over seeds), one PNG per data set -> {data set: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir.mkdir(parents=True, exist_ok=True)
    paths = {}
    styles = ["-", "--", ":", "-."]
    for ds_name, d in summary.items():
        if not d["rows"]:
            continue
        budgets = sorted({r["budget"] for r in d["rows"] if r["method"] != "full"})
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in d["rows"]:
            w, a = r["curve"]["wall"], r["curve"]["acc"]
            pts = [(x, 100 * y) for x, y in zip(w, a) if x > 0]  # log axis: the step-0 point is off it
            if not pts:
                continue
            ls = "-" if r["method"] == "full" else styles[budgets.index(r["budget"]) % len(styles)]
            lab = _LABELS.get(r["method"], r["method"]) + ("" if r["method"] == "full" else f", {r['budget']:g}")
            ax.plot(*zip(*pts), ls, marker="o", ms=3, color=_COLORS.get(r["method"]), label=lab)
        ax.set_xscale("log")
        ax.set_xlabel("training wall clock s (log; selection included, evaluations excluded)")
        ax.set_ylabel("test accuracy % (mean over seeds)")
        ax.set_title(f"Time to accuracy: {ds_name}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        paths[ds_name] = figdir / f"tta_{ds_name}.png"
        fig.savefig(paths[ds_name], dpi=120)
        plt.close(fig)
    return paths


def figure_refs(paths: dict, out) -> dict:
    """Markdown per data set: an image link relative to ``out`` when the figures are under docs/ next to
    it, else the path."""
    refs = {}
    for ds_name, p in paths.items():
        p = Path(p).resolve()
        base = Path(out).resolve().parent if out else None
        if base is not None and "docs" in p.parts and p.is_relative_to(base):
            refs[ds_name] = f"![time to accuracy, {ds_name}]({os.path.relpath(p, base)})"
        else:
            refs[ds_name] = f"Figure: `{p}`"
    return refs


def write_block(path, block: str, start: str = START, end: str = END) -> None:
    """``e2e.write_block`` with this benchmark's markers by default."""
    _write_block(path, block, start, end)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="crest bench tta", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--suite", choices=("main", "ablations", "all"), default="main", help="default: %(default)s")
    a("--datasets", default="fmnist,fmnist-noisy40", help="fmnist, fmnist-noisyNN (default: %(default)s)")
    a("--methods", default="full,random,crest,crest-drop", help="main suite (default: %(default)s)")
    a("--budgets", type=budget_list, default="0.05,0.1,0.2", help="share of the full run's steps (default: %(default)s)")
    a("--seeds", type=seed_list, default="0,1,2,3,4", help="final seeds, distinct (default: %(default)s)")
    a("--lrs", type=lr_list, default="0.025,0.05,0.1,0.2", help="learning rates of the sweep (default: %(default)s)")
    a("--sweep-seed", type=one_seed, default=1000, help="seed of the sweep runs (default: %(default)s)")
    a("--lr", type=positive_float, default=None, help="use this lr everywhere, no sweep")
    a("--epochs", type=positive_int, default=10, help="epochs of the full-data run (default: %(default)s)")
    a("--evals", type=positive_int, default=10, help="test evaluations per final run, for the curves (default: %(default)s)")
    a("--ablations", default=",".join(ABLATIONS), help="variants of the ablation suite (default: all)")
    a("--ablation-budget", type=budget_fraction, default=TARGET_BUDGET, help="default: %(default)s")
    a("--threads", type=positive_int, default=2, help="torch CPU threads (default: %(default)s)")
    a("--device", type=torch_device, default=None, help="torch device (default: cpu)")
    a("--limit-train", type=positive_int, default=None, help="N random training images (smoke tests)")
    a("--limit-test", type=positive_int, default=None, help="N random test images (smoke tests)")
    a("--root", default=None, help="Fashion-MNIST folder")
    a("--out", default=None, help="markdown file whose tta-bench block is rewritten")
    a("--json", default=None, help="every record, rewritten after each run")
    a("--resume", action="store_true", help="continue the --json file: skip the runs it holds")
    a("--figdir", default=str(Path(__file__).resolve().parent / "out" / "tta"), help="default: benchmarks/out/tta")
    ns = p.parse_args(argv)
    ns.device = ns.device or "cpu"  # None by default: argparse would probe a string default through torch
    try:
        ns.datasets = [t.strip() for t in ns.datasets.split(",") if t.strip()]
        for name in ns.datasets:
            noise_rate(name)
        ns.methods = [t.strip() for t in ns.methods.split(",") if t.strip()]
        if bad := [m for m in ns.methods if m not in METHODS]:
            raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
        if "full" not in ns.methods:
            ns.methods.insert(0, "full")  # relative errors and speedups need it
        ns.ablations = merge_commas([t.strip() for t in ns.ablations.split(",") if t.strip()])
        if bad := [v for v in ns.ablations if v not in ABLATIONS]:
            raise ValueError(f"--ablations: unknown {bad}; choose from {', '.join(ABLATIONS)}")
        if ns.sweep_seed in ns.seeds:
            raise ValueError(f"--sweep-seed {ns.sweep_seed} is also a final seed")
    except ValueError as exc:
        p.error(str(exc))
    return ns


def merge_commas(parts: list[str]) -> list[str]:
    """Rejoin variant names that contain a comma ("drop,min_records=2") after splitting on commas."""
    out = []
    for t in parts:
        if out and f"{out[-1]},{t}" in ABLATIONS:
            out[-1] = f"{out[-1]},{t}"
        else:
            out.append(t)
    return out


def protocol_of(ns) -> dict:
    """What a resumed run must share with the records it continues."""
    return {"epochs": ns.epochs, "evals": ns.evals, "limit_train": ns.limit_train, "limit_test": ns.limit_test,
            "threads": ns.threads, "device": ns.device, "noise_seed": NOISE_SEED, "split_seed": SPLIT_SEED,
            "subset_seed": SUBSET_SEED, "val_fraction": VAL_FRACTION}


def load_records(ns, protocol) -> list:
    if not ns.json or not Path(ns.json).exists():
        return []
    if not ns.resume:
        raise ValueError(f"{ns.json} exists: pass --resume to continue it, or remove it")
    raw = json.loads(Path(ns.json).read_text())
    if raw.get("protocol") != protocol:
        raise ValueError(f"{ns.json} was written with {raw.get('protocol')}, not {protocol}; cannot resume")
    return raw["records"]


def planned(ns) -> int:
    """How many runs this invocation needs in all (resumed ones included)."""
    sw = set(pairs(ns.methods, ns.budgets)) if ns.suite != "ablations" else set()
    n = len(ns.seeds) * len(sw)
    if ns.suite != "main":
        sw |= {(m, ns.ablation_budget) for m in ("random", "crest")}
        n += len(ns.seeds) * len(ns.ablations)
    return len(ns.datasets) * (n + (0 if ns.lr is not None else len(sw) * len(ns.lrs)))


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ns = parse_args(args)
    protocol = protocol_of(ns)
    try:
        records = load_records(ns, protocol)
        if ns.suite != "main":
            check_ablations(ns.ablations)
    except ValueError as exc:
        print(f"crest bench tta: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    runner = Runner(ns, protocol, records, planned(ns))
    if len(records):
        print(f"resuming {ns.json}: {len(records)} runs recorded", file=sys.stderr)
    warm = _warm_up(["crest"])
    meta = {"flipped": {}}
    for name in ns.datasets:
        ds = load_dataset(name, ns)
        meta.update(flipped={**meta["flipped"], name: ds.flipped}, n_train=int(ds.x_train.shape[0]),
                    n_test=int(ds.x_test.shape[0]))
        if ns.suite != "ablations":
            main_suite(runner, ds)
        if ns.suite != "main":
            ablation_suite(runner, ds)
        del ds
    import torch

    summary = summarize(runner.records, ns)
    loads = [r["load"] for r in runner.records if r["phase"] != "sweep"] or [math.nan]
    meta.update(command="crest bench tta " + shlex.join(args), date=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                machine=machine_line(), torch=torch.__version__, load_before=load_before,
                load_after=" ".join(f"{x:.1f}" for x in os.getloadavg()),
                load_runs=f"{min(loads):.1f} to {max(loads):.1f}", total_s=time.perf_counter() - t0, warm_up_s=warm)
    paths = {}
    try:
        paths = make_figures(summary, Path(ns.figdir))
    except ImportError as exc:
        print(f"no figures: {exc}", file=sys.stderr)
    blocks = []
    if ns.suite != "ablations":
        blocks.append((markdown_main(summary, meta, ns, figure_refs(paths, ns.out)), START, END))
    if ns.suite != "main":
        blocks.append((markdown_ablations(summary, meta, ns), ABL_START, ABL_END))
    for md, start, end in blocks:
        print(md)
        if ns.out:
            write_block(ns.out, md, start, end)
            print(f"wrote the {start[5:-10]} block of {ns.out}", file=sys.stderr)
    runner.save(meta=meta, summary=summary, figures={k: str(v) for k, v in paths.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
