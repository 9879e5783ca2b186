"""E1/E2: end-to-end training on Fashion-MNIST, full data vs the baselines vs CREST at a 10% budget.

Suites E1 and E2 (see ``benchmarks/README.md``): the same small CNN and recipe as ``crest demo``
(:mod:`crestcore.apps.train_demo`), 3 seeds. For each seed the methods run one after the other in one process
(so a change of machine load hits all of them), and the table reports:

* E1: test accuracy (mean +- std over seeds), relative error ``(acc_full - acc) / acc_full x 100``
  (per seed, against that seed's full-data run), training wall clock (median; every selection, model fit
  and check counted; test evaluations excluded), speedup vs full data (median of the per-seed ratios),
  selection time per method, next to the paper's Table 1 relative errors (CIFAR-10 / ResNet-20: another
  data set and model, for orientation only);
* E2: CREST's time split into selection (forward over the random subsets; facility location; the rest
  of the selection), quadratic model (gradient + Hutchinson probe), trust checks and training steps, in seconds
  per run and per call (the paper's Table 2), and the overhead as a share of the training-step time.

Run: ``crest bench e2e --out docs/benchmarks.md`` (or ``python benchmarks/e2e.py``); ``--methods all`` runs
full, sgd-budget, random, craig, gradmatch, glister, prune, crest and crest-drop. ``--out`` rewrites
only the block between ``<!-- e2e-bench:start -->`` and ``<!-- e2e-bench:end -->`` (appended when absent).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from crestcore.apps.cli import int_at_least
from crestcore.baselines import SOLVE_ON
from crestcore.controller import CONFIG_BACKENDS

START, END = "<!-- e2e-bench:start -->", "<!-- e2e-bench:end -->"

# targets of the issue (E1/E2)
TARGET_SPEEDUP = 8.0
TARGET_OVERHEAD_PCT = 15.0

# the paper's Table 1 (talk): relative error % at a 10% budget, CIFAR-10 / ResNet-20 (mean +- std)
PAPER_TABLE1 = {"sgd-budget": (21.3, 8.0), "random": (7.2, 1.4), "craig": (13.0, 5.1), "gradmatch": (6.0, 0.1),
                "glister": (7.0, 0.1), "crest": (5.5, 0.2)}


positive_int = int_at_least(1)  # argparse types: counts >= 1 (epochs, threads, limits)
non_negative_int = int_at_least(0)  # counts of worker processes


def budget_fraction(text: str) -> float:
    """An argparse type: a share of the full run's steps in (0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be a share of the full run's steps in (0, 1], got {v}")
    return v


def seed_list(text: str) -> list[int]:
    """An argparse type: comma-separated distinct integer seeds in [0, 2**63) (torch's seed is a signed
    64-bit integer), at least one (a repeated seed would run the same run twice and report its spread as the
    seeds'). Each item is plain digits: ``0,,1`` and ``1_0`` are refused, not read as ``0,1`` and 10."""
    parts = [t.strip() for t in text.split(",")]
    if parts == [""]:
        raise argparse.ArgumentTypeError("must name at least one seed")
    if not all(t.isascii() and t.isdigit() for t in parts):
        raise argparse.ArgumentTypeError(f"must be comma-separated non-negative integers, got {text!r}")
    seeds = [int(t) for t in parts]
    if any(v >= 2**63 for v in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be below 2**63 (torch's seed range), got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct (a repeated seed repeats its run), got {text!r}")
    return seeds


def one_seed(text: str) -> int:
    """An argparse type: one seed in [0, 2**63)."""
    t = text.strip()
    if not (t.isascii() and t.isdigit()) or int(t) >= 2**63:
        raise argparse.ArgumentTypeError(f"must be one integer in [0, 2**63), got {text!r}")
    return int(t)


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (a learning rate)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def _list_of(item, what: str):
    """An argparse type: a non-empty comma-separated list of distinct ``item`` values, each checked by
    ``item`` (a repeated value would repeat its rows in the report)."""
    def parse(text: str) -> list:
        parts = [t.strip() for t in text.split(",")]
        if parts == [""] or "" in parts:
            raise argparse.ArgumentTypeError(f"must be a non-empty comma-separated list of {what}, got {text!r}")
        out = []
        for t in parts:
            try:
                out.append(item(t))
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentTypeError(f"{t!r}: {exc}") from None
        if len(set(out)) != len(out):
            raise argparse.ArgumentTypeError(f"must not repeat a value, got {text!r}")
        return out

    return parse


budget_list = _list_of(budget_fraction, "shares in (0, 1]")
lr_list = _list_of(positive_float, "positive learning rates")


def torch_device(text: str) -> str:
    """An argparse type: a device torch can train on in this process (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    from crestcore.apps.train_demo import torch_device_problem

    if (problem := torch_device_problem(text)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="crest bench e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs of the full-data run (default: %(default)s)")
    p.add_argument("--budget", type=budget_fraction, default=0.1, help="share of the full run's steps (default: %(default)s)")
    p.add_argument("--seeds", type=seed_list, default="0,1,2", help="comma-separated distinct seeds (default: %(default)s)")
    p.add_argument("--methods", default="full,random,crest",
                   help="comma-separated methods of crestcore.apps.train_demo.METHODS, or 'all' "
                        "(default: %(default)s)")
    p.add_argument("--reselect-every", type=positive_int, default=None, metavar="R",
                   help="craig, gradmatch, glister: select every R epochs of the budgeted run "
                        "(default: ceil(epochs / 2), two selections per run)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default: %(default)s)")
    # default None, read as cpu after parsing: argparse runs a string default through its type, and the
    # probe imports torch, which --from-json (rendering a results file) does not need
    p.add_argument("--device", type=torch_device, default=None, help="torch device (default: cpu)")
    p.add_argument("--crest-backend", default="auto", choices=CONFIG_BACKENDS,
                   help="crest, crest-drop: CrestConfig(backend=...), the selection's kernels (default: %(default)s)")
    p.add_argument("--baseline-solve-on", default="auto", choices=SOLVE_ON,
                   help="craig, gradmatch, glister: SubsetLoader(solve_on=...), where they solve (default: %(default)s)")
    p.add_argument("--evals", type=positive_int, default=4, help="test evaluations per run (default: %(default)s)")
    p.add_argument("--limit-train", type=positive_int, default=None, help="N random training images (smoke tests)")
    p.add_argument("--limit-test", type=positive_int, default=None, help="N random test images (smoke tests)")
    p.add_argument("--root", default=None, help="Fashion-MNIST folder")
    p.add_argument("--out", default=None, help="markdown file whose e2e-bench block is rewritten")
    p.add_argument("--json", default=None, help="write the raw results here")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="do not train: re-render the tables of a --json file written earlier (and --out)")
    ns = p.parse_args(argv)
    ns.device = ns.device or "cpu"
    return ns


def settings_extra(ns) -> dict:
    """TrainSettings.extra for the CREST and baseline options given on the command line (none: the
    defaults)."""
    extra = {}
    backend = getattr(ns, "crest_backend", "auto")
    if backend != "auto":
        extra["crest"] = {"backend": backend}
    solve_on = getattr(ns, "baseline_solve_on", "auto")
    if solve_on != "auto":
        extra["baselines"] = {"solve_on": solve_on}
    return extra


def _mean_std(xs):
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(per_seed: list[dict], methods: list[str]) -> dict:
    """per_seed: [{method: record}] -> per-method summary (see the module docstring)."""
    from crestcore.apps.train_demo import overhead_seconds, relative_error

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
        if mth not in ("full", "sgd-budget"):
            sel_s = [sum(r["breakdown"].get(k, 0.0) for k in ("select_forward", "select_solve", "select_other"))
                     for r in recs]
            n_sel = [r["counts"]["selections"] for r in recs]
            d["selection"] = {
                "count": statistics.fmean(n_sel),
                "seconds": statistics.fmean(sel_s), "seconds_all": sel_s,
                "forward": statistics.fmean(r["breakdown"].get("select_forward", 0.0) for r in recs),
                "solve": statistics.fmean(r["breakdown"].get("select_solve", 0.0) for r in recs),
                "per_selection": statistics.fmean(x / max(1, c) for x, c in zip(sel_s, n_sel)),
                "pct_train": statistics.fmean(
                    100 * x / (r["breakdown"]["train"] + r["breakdown"]["data"]) for x, r in zip(sel_s, recs)),
                "overhead_s": statistics.fmean(overhead_seconds(r["breakdown"]) for r in recs),
                "fraction_all_passes": statistics.fmean(r["stats"]["budget"]["fraction_all_passes"] for r in recs)
                if all("stats" in r for r in recs) else None,
                "reselect_every": recs[0].get("reselect_every"),
            }
        if mth.startswith("crest"):
            keys = ("train", "data", "select_forward", "select_solve", "model_fit", "checks", "drops")
            if all("select_other" in r["breakdown"] for r in recs):  # split from the solve since 2026-12-04
                keys += ("select_other",)
            bd = {k: statistics.fmean(r["breakdown"].get(k, 0.0) for r in recs) for k in keys}
            cnt = {k: statistics.fmean(r["counts"].get(k, 0) for r in recs)
                   for k in ("selections", "fits", "checks", "coresets_made")}
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

    def ovh(d):
        return d.get("overhead_s", (d.get("selection") or {}).get("overhead_s", 0.0))

    budgeted = ", ".join(k for k in ms if k != "full") or "none"
    lines = [
        "## E1/E2: end-to-end training, full data vs the baselines vs CREST (Fashion-MNIST)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads, "
        f"device {meta['device']}; load average {meta['load_before']} before, {meta['load_after']} after; "
        f"total time {meta['total_s'] / 60:.1f} min.",
        "",
        f"{meta['n_train']} train / {meta['n_test']} test images, the `crest demo` CNN (~106k parameters), "
        f"SGD (momentum 0.9, Nesterov, weight decay 5e-4), batch m = {meta['m']}, peak lr {meta['lr']} with "
        f"linear warm-up and cosine decay over each run's own steps; full data {meta['epochs']} epochs; "
        f"the other methods ({budgeted}) get {meta['budget']:g} of its steps. Seeds {meta['seeds']}. Wall clock "
        "= training only (batch loading, steps, and every selection, CREST's quadratic-model fits and trust "
        "checks, prune's loss bookkeeping); test evaluations excluded.",
    ]
    if meta.get("methods_note"):
        lines += ["", meta["methods_note"]]
    lines += [
        "",
        "| method | steps | test acc % (mean +- std) | rel. error % | paper rel. error % at a 10 % budget (CIFAR-10, ResNet-20) "
        "| wall clock s (median) | speedup vs full (median) | selection s per run (mean) | ms per training step "
        "(median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mth, d in ms.items():
        a, sa = d["acc"]
        r, sr = d["rel_error"]
        paper = PAPER_TABLE1.get(mth)
        ptxt = f"{paper[0]:.1f} +- {paper[1]:.1f}" if paper else "-"
        sel = d.get("selection")
        stxt = f"{sel['seconds']:.1f}" if sel else "-"
        lines.append(f"| {mth} | {d['steps']} | {100 * a:.2f} +- {100 * sa:.2f} | {r:.2f} +- {sr:.2f} | {ptxt} | "
                     f"{d['wall_median']:.1f} | {d['speedup_median']:.2f}x | {stxt} | {d['ms_per_step']:.1f} |")
    lines += [
        "",
        "The paper's column is Table 1 of the CREST paper (talk): CIFAR-10 with ResNet-20, 200 epochs, GPU. "
        "**The data set, the model, the training length and the hardware differ**, so only the order of the "
        "methods can be compared, not the numbers. Its SGD-dagger is full-data SGD for the budget's number of "
        "steps (here `sgd-budget`); the paper has no column for `prune` or `crest-drop`. The baselines here run "
        "the one learning rate of every method, not tuned for them, and select only at the epochs named below: "
        "their accuracies are those of this configuration, not each method's best.",
    ]
    sel_rows = [(k, d) for k, d in ms.items() if d.get("selection")]
    if sel_rows:
        lines += [
            "",
            "Selection time per method (mean per run over the seeds; CREST: its selections only, without the "
            "quadratic model and the checks, which E2 lists):",
            "",
            "| method | selections per run | s per selection | of which forward s | selection s per run "
            "| % of training-step time | all counted passes, % of the full run's |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, d in sel_rows:
            sd = d["selection"]
            c = max(sd["count"], 1e-12)
            frac = sd.get("fraction_all_passes")
            lines.append(f"| {k} | {sd['count']:.1f} | {sd['seconds'] / c:.2f} | {sd['forward'] / c:.2f} | "
                         f"{sd['seconds']:.2f} | {sd['pct_train']:.1f} | "
                         f"{'-' if frac is None else f'{100 * frac:.1f}'} |")
        lines += ["", "Counted passes: training examples plus every measurement forward (and CREST's backward "
                      "passes, a backward = 2 forwards) in full-data steps, `stats['budget']['fraction_all_passes']`"
                      f" (the budget is {100 * meta['budget']:g} % of the full run's steps); CRAIG and GradMatch measure the whole "
                      "training set at each selection, GLISTER its training part plus the validation split."]
    if "full" in ms and len(ms) > 1:
        f = ms["full"]
        lines += ["", "The time of a training step (same batch size, same model) varied between runs with the "
                      "machine's load: " + ", ".join(f"{k} {d['ms_per_step']:.1f} ms" for k, d in ms.items())
                  + ". At the full run's step time, the budgeted runs would take: " + ", ".join(
                      f"{k} {(f['ms_per_step'] * d['steps'] / 1000 + ovh(d)):.1f} s "
                      f"({f['wall_median'] / (f['ms_per_step'] * d['steps'] / 1000 + ovh(d)):.2f}x)"
                      for k, d in ms.items() if k != "full")
                  + " (training steps at that rate plus the measured overhead; an estimate, not a measurement)."]
    for mth, d in ms.items():
        if not mth.startswith("crest"):
            continue
        bd, cnt = d["breakdown"], d["counts"]
        steps = d["steps"]
        split = "select_other" in bd  # runs before 2026-12-04 charged the rest of a selection to its solve
        sel = bd["select_forward"] + bd["select_solve"] + bd.get("select_other", 0.0)
        lines += [
            "",
            f"E2, {mth}: where its time goes (mean seconds per run over the seeds; config `{d['config']}`; "
            "the selection rows' calls are the selections and the coresets made just in time, "
            f"{d['counts']['selections']:.1f} + {d['counts'].get('coresets_made', 0.0):.1f} per run)",
            "",
            "| component | seconds per run | % of training-step time | calls per run | ms per call |",
            "|---|---|---|---|---|",
        ]
        train = bd["train"] + bd["data"]

        def row(name, sec, calls):  # called within this iteration only
            per = f"{1000 * sec / calls:.1f}" if calls else "-"
            lines.append(f"| {name} | {sec:.2f} | {100 * sec / train:.1f} | {calls:.1f} | {per} |")  # noqa: B023

        # the selection rows hold the selections' forwards and solves and those of the coresets made just
        # in time (one subset each: OpsTimer charges both alike), so their calls are the two counts together
        calls = cnt["selections"] + cnt.get("coresets_made", 0.0)
        row("selection: forward over the random subsets", bd["select_forward"], calls)
        if split:
            row("selection: facility location (the controller's minibatch_coresets calls)", bd["select_solve"], calls)
            row("selection: the rest (features, subsets, weights, quadratic model arithmetic, the batch)",
                bd["select_other"], calls)
        else:
            row("selection: features + facility location (and the rest of the selection)", bd["select_solve"], calls)
        row("selection total", sel, calls)
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
                 "facility location" if split else "features + facility location": bd["select_solve"],
                 "the rest of the selection": bd.get("select_other", 0.0),
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
            f"Overhead (selection + model + checks) = {o:.1f} +- {so:.1f} % (mean +- standard deviation over the "
            "seeds) of CREST's training-step time; "
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


def _warm_up(methods, crest_host: bool = False) -> float:
    """Call the selection kernels once on tiny inputs (numba loads or compiles its kernels at the first
    call); returns the seconds it took, which no run's clock includes."""
    import numpy as np

    from crestcore import last_layer_gradients
    from crestcore.baselines import craig, glister, gradmatch

    t = time.perf_counter()
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 10)).astype(np.float32)
    e = rng.normal(size=(200, 8)).astype(np.float32)
    y = np.arange(200) % 10
    g = last_layer_gradients(z, y)
    if any(m in methods for m in ("craig", "crest", "crest-drop")):
        craig(g, y, 20)
    if crest_host and any(m in methods for m in ("crest", "crest-drop")):
        # CREST's own host kernels, where a GPU model's selection solves by default and a CPU one's with
        # --crest-backend numba: its first selection compiled them inside the first CREST run's clock (on a
        # fresh H200 machine: 16.1 s against 5.1-5.2 s)
        from crestcore.apps.train_demo import warm_crest_host_kernels

        warm_crest_host_kernels()
    if "gradmatch" in methods:
        gradmatch(last_layer_gradients(z, y, embeddings=e), 20, labels=y)
    if "glister" in methods:
        glister(last_layer_gradients(z, y, embeddings=e), z[:50], y[:50], 20, val_embeddings=e[:50],
                optimizer="stochastic", rng=0)
    return time.perf_counter() - t


def methods_note(methods, epochs: int, reselect_every, s0, warm: float) -> str:
    """One paragraph on the baselines' settings (those that ran)."""
    import math

    R = reselect_every if reselect_every is not None else max(1, math.ceil(epochs / 2))
    parts = []
    if "sgd-budget" in methods:
        parts.append("`sgd-budget`: the full data shuffled (the full run's first batches), stopped after the "
                     "budget's steps")
    if "random" in methods:
        parts.append("`random`: a fresh uniform random subset of steps-per-epoch x m examples each epoch")
    sel = [m for m in ("craig", "gradmatch", "glister") if m in methods]
    if sel:
        parts.append(
            f"{', '.join(f'`{m}`' for m in sel)}: a weighted subset of steps-per-epoch x m examples selected "
            f"on last-layer gradients of the whole training set at the current model, reselected every "
            f"R = {R} of the {epochs} epochs of the budgeted run (selections at epochs "
            f"{', '.join(str(e) for e in range(0, epochs, R))}; epoch 0 is the initial model); CRAIG: per-class "
            "facility location on the gradients w.r.t. the logits, `max-minus` kernel, lazy greedy, weights = "
            "cluster sizes; GradMatch: per-class non-negative OMP (lam 0.5) on the gradients w.r.t. the last "
            "linear layer's weight (640 features), topped up with random examples when OMP stops early; "
            f"GLISTER: {100 * s0.val_fraction:g} % of the training set held out (class-stratified) as its "
            "validation set and never trained on, stochastic greedy (epsilon 0.1) on the last layer's weight "
            "gradients, GLISTER's one-step model `theta - eta * sum_S g_j` with eta = the learning rate "
            f"{s0.lr:g}" + ("; solved on the host (`solve_on=\"host\"`)"
                            if s0.extra.get("baselines", {}).get("solve_on") == "host" else ""))
    if "prune" in methods:
        parts.append(f"`prune`: InfoBatch-style, each epoch {100 * s0.prune_ratio:g} % of the examples whose last "
                     "training loss is below the mean are left out and the kept ones up-weighted, the batches "
                     "drawn from the kept set; examples not yet trained on are never pruned; no pruning in the "
                     f"last {100 * (1 - s0.prune_anneal):g} % of the epochs")
    if not parts:
        return ""
    txt = ("Methods (`crestcore.adapters.baselines.SubsetLoader`; weights rescaled to mean 1 over each "
           "selection): " + "; ".join(parts) + ".")
    if warm > 0.05:
        txt += f" The selection kernels were loaded once before the runs ({warm:.1f} s, not in any clock)."
    return txt


def write_block(path, block: str, start: str = START, end: str = END) -> None:
    """Replace the text between the ``start`` and ``end`` markers of ``path`` (default: e2e-bench's;
    appended when absent); every other part of the file is kept byte for byte."""
    p = Path(path)
    text = p.read_text() if p.exists() else ""
    new = f"{start}\n{block.rstrip()}\n{end}"
    if start in text and end in text and text.index(start) < text.index(end):
        a = text.index(start)
        b = text.index(end) + len(end)
        text = text[:a] + new + text[b:]
    else:
        if text and not text.endswith("\n"):
            text += "\n"
        text += ("\n" if text else "") + new + "\n"
    p.write_text(text)


def publish(text: str, *, out=None, json_path=None, payload=None, start: str = START, end: str = END) -> None:
    """Print the markdown ``text``; write ``payload`` as JSON to ``json_path`` and ``text`` between the
    ``start`` and ``end`` markers of the markdown file ``out`` (see :func:`write_block`), each when given."""
    print(text)
    if json_path:
        Path(json_path).write_text(json.dumps(payload, indent=1))
    if out:
        write_block(out, text, start, end)


def md_row(*cells) -> str:
    """One markdown table row of ``cells`` (each written with ``str``): ``| a | b | c |``."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def parse_with_outputs(ap: argparse.ArgumentParser, argv, block: str, json_help: str) -> argparse.Namespace:
    """``ap.parse_args(argv)`` after adding the two options of a benchmark that publishes a table:
    ``--out`` (the markdown file whose ``block`` markers get the table, see :func:`publish`) and ``--json``
    (``json_help``)."""
    ap.add_argument("--out", help=f"write the table between the {block} markers of this markdown file")
    ap.add_argument("--json", help=json_help)
    return ap.parse_args(argv)


# A benchmark that measures in fresh processes (benchmarks/memory.py, benchmarks/pipeline.py) starts itself
# again as ``script --child ARGS``; the child prints its result as one JSON line, the last of its output.
CHILD_FLAG = "--child"


def answer_child(argv, measure) -> bool:
    """The child's side of :func:`run_child`: when ``argv`` (default ``sys.argv[1:]``) is ``--child ARGS``,
    print ``measure(ARGS)`` (a dict) as one JSON line and return True; else (a normal run) return False."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not (argv and argv[0] == CHILD_FLAG):
        return False
    print(json.dumps(measure(argv[1:])))
    return True


def run_child(script, args, *, env, timeout: float, what: str, tail: int = 2000) -> dict:
    """Run ``script --child ARGS`` in a fresh Python process with the environment ``env`` and return the JSON
    object its last output line holds; RuntimeError naming ``what``, with the last ``tail`` characters of
    its stderr, when it fails."""
    import subprocess

    res = subprocess.run([sys.executable, str(script), CHILD_FLAG, *args], capture_output=True, text=True,
                         env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{res.stderr[-tail:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ns = parse_args(argv)
    if ns.from_json:
        try:
            raw = json.loads(Path(ns.from_json).read_text())
        except (OSError, ValueError) as exc:
            print(f"--from-json: cannot read {ns.from_json}: {exc}", file=sys.stderr)
            return 2
        if not isinstance(raw, dict) or raw.get("meta", {}).get("partial") or "command" not in raw.get("meta", {}):
            print(f"--from-json: {ns.from_json} is not a finished run's file (a run that broke off leaves "
                  "its seeds' runs with no command, date or budget to report; run it again with --json)",
                  file=sys.stderr)
            return 2
        try:
            per_seed = raw["runs"]
            summary = aggregate(per_seed, list(per_seed[0]))
            md = markdown(summary, raw["meta"])
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            print(f"--from-json: {ns.from_json} does not hold e2e's results ({type(exc).__name__}: {exc})",
                  file=sys.stderr)
            return 2
        print(md)
        if ns.out:
            write_block(ns.out, md)
            print(f"\nwrote the e2e-bench block of {ns.out}")
        return 0
    from crestcore.apps.train_demo import (
        TrainSettings, _import_torch, breakdown_line, format_table, load_data, machine_line, parse_methods,
        selects, strict_json, summarize, train_method,
    )

    try:
        methods = list(parse_methods(ns.methods))
    except ValueError as exc:
        print(f"--methods: {exc}", file=sys.stderr)
        return 2
    if ns.reselect_every is not None and ns.reselect_every < 1:
        print(f"--reselect-every must be a positive integer, got {ns.reselect_every}", file=sys.stderr)
        return 2
    if "full" not in methods:
        methods.insert(0, "full")
    seeds = list(ns.seeds)
    t0 = time.perf_counter()
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    torch = _import_torch()
    from crestcore.apps.train_demo import crest_runs_numba

    # load the compiled kernels once, outside every clock
    warm = _warm_up(methods, crest_host=crest_runs_numba(ns.crest_backend, str(ns.device).startswith("cpu")))
    per_seed = []
    data_cache = {}
    for seed in seeds:
        s = TrainSettings(epochs=ns.epochs, budget=ns.budget, seed=seed, threads=ns.threads, device=ns.device,
                          evals=ns.evals, reselect_every=ns.reselect_every, extra=settings_extra(ns))
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
            if selects(mth):
                print(breakdown_line(mth, recs[mth]), flush=True)
        per_seed.append(recs)
        if ns.json:  # partial results after every seed (a long run that breaks off keeps what it did)
            Path(ns.json).write_text(strict_json({"meta": {"partial": True}, "runs": [
                {k: {kk: vv for kk, vv in v.items() if kk != "forgetting"} for k, v in r.items()}
                for r in per_seed]}, default=str))
    summary = aggregate(per_seed, methods)
    s0 = TrainSettings(extra=settings_extra(ns))
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
        "methods_note": methods_note(methods, ns.epochs, ns.reselect_every, s0, warm),
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
        Path(ns.json).write_text(strict_json(raw, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
