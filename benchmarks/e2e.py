"""E1/E2: end-to-end training on Fashion-MNIST, full data vs Random vs CREST at a 10% budget.

Suites E1 and E2 of ``shared/guide/BENCHMARKS.md``: the same small CNN and recipe as ``crest demo``
(:mod:`crestcore.train_demo`), 3 seeds. For each seed the methods run one after the other in one process
(so a change of machine load hits all of them), and the table reports:

* E1: test accuracy (mean +- std over seeds), relative error ``(acc_full - acc) / acc_full x 100``
  (per seed, against that seed's full-data run), training wall clock (median; every selection, model fit
  and check counted; test evaluations excluded), speedup vs full data (median of the per-seed ratios);
* E2: CREST's time split into selection (forward over the random subsets; features + facility
  location), quadratic model (gradient + Hutchinson probe), trust checks and training steps, in seconds
  per run and per call (the paper's Table 2), and the overhead as a share of the training-step time.

Run: ``crest bench e2e --out docs/benchmarks.md`` (or ``python benchmarks/e2e.py``). ``--out`` rewrites
only the block between ``<!-- e2e-bench:start -->`` and ``<!-- e2e-bench:end -->`` (appended when absent).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

START, END = "<!-- e2e-bench:start -->", "<!-- e2e-bench:end -->"

# targets of the issue (E1/E2)
TARGET_SPEEDUP = 8.0
TARGET_OVERHEAD_PCT = 15.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="crest bench e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10, help="epochs of the full-data run (default: %(default)s)")
    p.add_argument("--budget", type=float, default=0.1, help="share of the full run's steps (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--methods", default="full,random,crest",
                   help="comma-separated methods of crestcore.train_demo.METHODS (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--evals", type=int, default=4, help="test evaluations per run (default: %(default)s)")
    p.add_argument("--limit-train", type=int, default=None, help="N random training images (smoke tests)")
    p.add_argument("--limit-test", type=int, default=None, help="N random test images (smoke tests)")
    p.add_argument("--root", default=None, help="Fashion-MNIST folder")
    p.add_argument("--out", default=None, help="markdown file whose e2e-bench block is rewritten")
    p.add_argument("--json", default=None, help="write the raw results here")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="do not train: re-render the tables of a --json file written earlier (and --out)")
    return p.parse_args(argv)


def _mean_std(xs):
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(per_seed: list[dict], methods: list[str]) -> dict:
    """per_seed: [{method: record}] -> per-method summary (see the module docstring)."""
    from crestcore.train_demo import overhead_seconds, relative_error

    out = {}
    for mth in methods:
        recs = [s[mth] for s in per_seed]
        accs = [r["acc"] for r in recs]
        rel = [relative_error(s["full"]["acc"], s[mth]["acc"]) for s in per_seed]
        walls = [r["wall"] for r in recs]
        speed = [s["full"]["wall"] / s[mth]["wall"] for s in per_seed]
        d = {
            "steps": recs[0]["steps"],
            "acc": _mean_std(accs), "rel_error": _mean_std(rel),
            "wall_median": statistics.median(walls), "walls": walls,
            "speedup_median": statistics.median(speed), "speedups": speed,
            "accs": accs, "rel_errors": rel,
            "ms_per_step": statistics.median(
                1000 * (r["breakdown"]["train"] + r["breakdown"]["data"]) / r["steps"] for r in recs),
        }
        if mth.startswith("crest"):
            keys = ("train", "data", "select_forward", "select_solve", "model_fit", "checks", "drops")
            bd = {k: statistics.fmean(r["breakdown"].get(k, 0.0) for r in recs) for k in keys}
            cnt = {k: statistics.fmean(r["counts"][k] for r in recs) for k in ("selections", "fits", "checks")}
            ovh = [100 * overhead_seconds(r["breakdown"]) / (r["breakdown"]["train"] + r["breakdown"]["data"])
                   for r in recs]
            d.update(breakdown=bd, counts=cnt, overhead_pct=_mean_std(ovh), overhead_pcts=ovh,
                     overhead_s=statistics.fmean(overhead_seconds(r["breakdown"]) for r in recs),
                     fraction_all_passes=statistics.fmean(r["stats"]["budget"]["fraction_all_passes"]
                                                          for r in recs),
                     config=recs[0]["config"],
                     selection_steps=[r["stats"]["selections"] for r in recs], total_steps=recs[0]["steps"])
        out[mth] = d
    return out


def markdown(summary: dict, meta: dict) -> str:
    ms = summary
    lines = [
        "## E1/E2: end-to-end training, full data vs Random vs CREST (Fashion-MNIST)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads, "
        f"device {meta['device']}; load average {meta['load_before']} before, {meta['load_after']} after; "
        f"total time {meta['total_s'] / 60:.1f} min.",
        "",
        f"{meta['n_train']} train / {meta['n_test']} test images, the `crest demo` CNN (~106k parameters), "
        f"SGD (momentum 0.9, Nesterov, weight decay 5e-4), batch m = {meta['m']}, peak lr {meta['lr']} with "
        f"linear warm-up and cosine decay over each run's own steps; full data {meta['epochs']} epochs; "
        f"Random and CREST get {meta['budget']:g} of its steps (Random: a fresh uniform random subset each "
        f"epoch). Seeds {meta['seeds']}. Wall clock = training only (batch loading, steps, and for CREST every "
        "selection, quadratic-model fit and trust check); test evaluations excluded.",
        "",
        "| method | steps | test acc % (mean +- std) | rel. error % | wall clock s (median) | speedup vs full (median) "
        "| ms per training step (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mth, d in ms.items():
        a, sa = d["acc"]
        r, sr = d["rel_error"]
        lines.append(f"| {mth} | {d['steps']} | {100 * a:.2f} +- {100 * sa:.2f} | {r:.2f} +- {sr:.2f} | "
                     f"{d['wall_median']:.1f} | {d['speedup_median']:.2f}x | {d['ms_per_step']:.1f} |")
    if "full" in ms and len(ms) > 1:
        f = ms["full"]
        lines += ["", "The time of a training step (same batch size, same model) varied between runs with the "
                      "machine's load: " + ", ".join(f"{k} {d['ms_per_step']:.1f} ms" for k, d in ms.items())
                  + ". At the full run's step time, the budgeted runs would take: " + ", ".join(
                      f"{k} {(f['ms_per_step'] * d['steps'] / 1000 + d.get('overhead_s', 0.0)):.1f} s "
                      f"({f['wall_median'] / (f['ms_per_step'] * d['steps'] / 1000 + d.get('overhead_s', 0.0)):.2f}x)"
                      for k, d in ms.items() if k != "full")
                  + " (training steps at that rate plus the measured overhead; an estimate, not a measurement)."]
    for mth, d in ms.items():
        if not mth.startswith("crest"):
            continue
        bd, cnt = d["breakdown"], d["counts"]
        steps = d["steps"]
        sel = bd["select_forward"] + bd["select_solve"]
        lines += [
            "",
            f"E2, {mth}: where its time goes (mean seconds per run over the seeds; config `{d['config']}`)",
            "",
            "| component | seconds per run | % of training-step time | calls per run | ms per call |",
            "|---|---|---|---|---|",
        ]
        train = bd["train"] + bd["data"]

        def row(name, sec, calls):
            per = f"{1000 * sec / calls:.1f}" if calls else "-"
            lines.append(f"| {name} | {sec:.2f} | {100 * sec / train:.1f} | {calls:.1f} | {per} |")

        row("selection: forward over the random subsets", bd["select_forward"], cnt["selections"])
        row("selection: features + facility location", bd["select_solve"], cnt["selections"])
        row("selection total", sel, cnt["selections"])
        row("quadratic model (gradient + Hutchinson)", bd["model_fit"], cnt["fits"])
        row("trust checks", bd["checks"], cnt["checks"])
        if bd.get("drops"):
            row("drop bookkeeping", bd["drops"], steps)
        row("training steps (incl. batch loading)", train, steps)
        o, so = d["overhead_pct"]
        if d.get("selection_steps"):
            lines += ["", "Selections at steps (per seed): " + "; ".join(
                ", ".join(map(str, st)) for st in d["selection_steps"])
                + f" of {d['total_steps']}. After the last one every trust check passed (rho <= tau), so its "
                  "coresets were cycled until the end of the run."]
        parts = {"the selection's forward over the random subsets": bd["select_forward"],
                 "features + facility location": bd["select_solve"],
                 "the quadratic model's gradient + Hutchinson probe": bd["model_fit"],
                 "trust checks": bd["checks"], "drop bookkeeping": bd.get("drops", 0.0)}
        top = sorted(parts.items(), key=lambda kv: -kv[1])
        lines += [
            "",
            "Largest overhead components: " + "; ".join(
                f"{k} {v:.2f} s ({100 * v / train:.0f} %)" for k, v in top[:3]) + ".",
        ]
        lines += [
            "",
            f"Overhead (selection + model + checks) = {o:.1f} +- {so:.1f} % of CREST's training-step time; "
            f"all forward/backward passes CREST spent = {100 * d['fraction_all_passes']:.1f} % of the full run's "
            "(`stats['budget']['fraction_all_passes']`).",
        ]
    # targets
    if "crest" in ms and "full" in ms:
        c = ms["crest"]
        lines += ["", "Targets:", ""]
        sp = c["speedup_median"]
        lines.append(f"- CREST >= {TARGET_SPEEDUP:g}x faster than full data: {sp:.2f}x "
                     f"({'met' if sp >= TARGET_SPEEDUP else 'missed'}).")
        if "random" in ms:
            rc, rr = c["rel_error"][0], ms["random"]["rel_error"][0]
            lines.append(f"- relative error no worse than Random's: CREST {rc:.2f} % vs Random {rr:.2f} % "
                         f"({'met' if rc <= rr else 'missed'}; per seed CREST "
                         f"{', '.join(f'{x:.2f}' for x in c['rel_errors'])} vs Random "
                         f"{', '.join(f'{x:.2f}' for x in ms['random']['rel_errors'])}).")
        o = c["overhead_pct"][0]
        lines.append(f"- overhead <= {TARGET_OVERHEAD_PCT:g} % of CREST's training time: {o:.1f} % "
                     f"({'met' if o <= TARGET_OVERHEAD_PCT else 'missed'}).")
    return "\n".join(lines)


def write_block(path, block: str) -> None:
    """Replace the text between the e2e-bench markers of ``path`` (append the markers when absent);
    every other part of the file is kept byte for byte."""
    p = Path(path)
    text = p.read_text() if p.exists() else ""
    new = f"{START}\n{block.rstrip()}\n{END}"
    if START in text and END in text and text.index(START) < text.index(END):
        a = text.index(START)
        b = text.index(END) + len(END)
        text = text[:a] + new + text[b:]
    else:
        if text and not text.endswith("\n"):
            text += "\n"
        text += ("\n" if text else "") + new + "\n"
    p.write_text(text)


def main(argv=None) -> int:
    ns = parse_args(argv)
    if ns.from_json:
        raw = json.loads(Path(ns.from_json).read_text())
        per_seed = raw["runs"]
        summary = aggregate(per_seed, list(per_seed[0]))
        md = markdown(summary, raw["meta"])
        print(md)
        if ns.out:
            write_block(ns.out, md)
            print(f"\nwrote the e2e-bench block of {ns.out}")
        return 0
    from crestcore.train_demo import (
        METHODS, TrainSettings, _import_torch, breakdown_line, format_table, load_data, machine_line,
        summarize, train_method,
    )

    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(f"unknown method {bad[0]!r}; choose from {METHODS}", file=sys.stderr)
        return 2
    if "full" not in methods:
        methods.insert(0, "full")
    seeds = [int(x) for x in ns.seeds.split(",") if x.strip()]
    t0 = time.perf_counter()
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    torch = _import_torch()
    per_seed = []
    data_cache = {}
    for seed in seeds:
        s = TrainSettings(epochs=ns.epochs, budget=ns.budget, seed=seed, threads=ns.threads, device=ns.device,
                          evals=ns.evals)
        key = (ns.limit_train, ns.limit_test, seed if ns.limit_train or ns.limit_test else 0)
        if key not in data_cache:
            data_cache.clear()
            data_cache[key] = load_data(ns.root, n_train=ns.limit_train, n_test=ns.limit_test, seed=seed)
        data = data_cache[key]
        recs = {}
        for mth in methods:
            r = train_method(mth, data, s, progress=ns.progress, desc=f"seed {seed} {mth}")
            r.pop("batches", None)
            recs[mth] = r
            print(f"seed {seed} {mth:<10} acc {100 * r['acc']:.2f}%  wall {r['wall']:.1f}s", flush=True)
        print(format_table(summarize(recs)), flush=True)
        for mth in methods:
            if mth.startswith("crest"):
                print(breakdown_line(mth, recs[mth]), flush=True)
        per_seed.append(recs)
    summary = aggregate(per_seed, methods)
    s0 = TrainSettings()
    meta = {
        "command": "crest bench e2e " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": machine_line(),
        "torch": torch.__version__, "threads": ns.threads, "device": ns.device,
        "load_before": load_before, "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "total_s": time.perf_counter() - t0,
        "n_train": int(next(iter(data_cache.values()))[0].shape[0]),
        "n_test": int(next(iter(data_cache.values()))[2].shape[0]),
        "m": s0.m, "lr": s0.lr, "epochs": ns.epochs, "budget": ns.budget, "seeds": ", ".join(map(str, seeds)),
    }
    md = markdown(summary, meta)
    print()
    print(md)
    if ns.out:
        write_block(ns.out, md)
        print(f"\nwrote the e2e-bench block of {ns.out}")
    if ns.json:
        raw = {"meta": meta, "summary": summary,
               "runs": [{k: {kk: vv for kk, vv in v.items() if kk != "forgetting"} for k, v in recs.items()}
                        for recs in per_seed]}
        Path(ns.json).write_text(json.dumps(raw, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
