"""B1: baseline selection speed. CRAIG, GradMatch and GLISTER per selection, old vs new, side by side.

"old" is the slow implementation frozen in ``tests/baselines_reference.py`` (the code before issue #14
item 5); "new" is ``crestcore.baselines``. Both run on the same inputs in the same process, alternating,
and every pair is checked: same picks (or the first position where they differ), the largest relative
difference of the weights, and of the objective.

The inputs have the shapes of one E1 selection (``crest bench e2e``, ``SubsetLoader``): n training
examples of C = 10 classes, a budget of ``round(0.1 * ceil(n / 128)) * 128`` examples (6,016 at
n = 60,000), and

* CRAIG: ``craig(G, labels, k)`` on the gradients w.r.t. the logits (n, 10), float32;
* GradMatch: ``gradmatch(G, k, labels=labels, lam=0.5, tol=1e-6)`` on the gradients w.r.t. the last
  linear layer's weight (n, 10 * 64 = 640), float32;
* GLISTER: 10 % of the set held out, class-stratified, as the validation split;
  ``glister(G_pool, z_val, y_val, k, val_embeddings=e_val, eta=0.05, optimizer="stochastic",
  epsilon=0.1, rng=...)`` with the weight gradients (640) of the remaining 90 %.

``--features synthetic`` (default): logits ``N(0, 1)`` plus a class signal, ReLU'd Gaussian embeddings
(h = 64), uniform labels. ``--features real``: Fashion-MNIST through the demo CNN after 100 SGD steps
(needs torch and the data; the first n training images).

    .venv/bin/python benchmarks/baselines.py --quick                      # n = 6,000, a smoke test
    .venv/bin/python benchmarks/baselines.py --out docs/benchmarks.md      # n = 60,000 (old GradMatch: minutes)

Threads: ``--threads`` (default 1) is set for OpenMP/OpenBLAS/MKL/Numba before NumPy is imported.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

START, END = "<!-- baselines-bench:start -->", "<!-- baselines-bench:end -->"
METHODS = ("craig", "gradmatch", "glister")
_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=60_000, help="training examples (default 60,000)")
    ap.add_argument("--quick", action="store_true", help="n = 6,000 (a smoke test; overrides --n)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of craig, gradmatch, glister")
    ap.add_argument("--features", default="synthetic",
                    help="comma list of synthetic, real (real: Fashion-MNIST through the demo CNN; needs torch)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each (old, new) pair (default 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-old", action="store_true", help="time the new implementations only")
    ap.add_argument("--out", help="write the B1 table between the baselines-bench markers of this markdown file")
    ap.add_argument("--json", help="write the raw results here")
    ns = ap.parse_args(argv)
    if ns.quick:
        ns.n = 6_000
    ns.methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    ns.features = [f.strip() for f in ns.features.split(",") if f.strip()]
    if not ns.features or any(f not in ("synthetic", "real") for f in ns.features):
        ap.error("--features must be a comma list of synthetic, real")
    bad = [m for m in ns.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {METHODS}")
    if ns.n < 200:
        ap.error("--n must be at least 200")
    if ns.repeats < 1 or ns.threads < 1:
        ap.error("--repeats and --threads must be >= 1")
    return ns


def _set_threads(t: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(t)


def budget(n: int, m: int = 128, fraction: float = 0.1) -> int:
    """E1's subset size: ``steps_per_epoch * m``, the loaders' ``budget_steps(fraction, ceil(n / m))``."""
    from crestcore.plan import budget_steps, full_steps

    return min(n, budget_steps(fraction, full_steps(n, m)) * m)


def synthetic_features(n: int, seed: int, C: int = 10, h: int = 64):
    import numpy as np

    rng = np.random.default_rng([seed, 14])
    y = rng.integers(0, C, n)
    z = rng.normal(size=(n, C)) + 2.0 * np.eye(C)[y]  # a weakly trained classifier's logits
    e = np.maximum(rng.normal(size=(n, h)), 0.0)
    return z.astype(np.float32), e.astype(np.float32), y.astype(np.int64)


def real_features(n: int, seed: int, steps: int = 100):
    """Logits and penultimate features of the demo CNN on the first n Fashion-MNIST training images,
    after ``steps`` SGD steps (batch 128, lr 0.05, momentum 0.9) from a seeded initialisation."""
    import numpy as np
    import torch

    from crestcore.apps.train_demo import build_cnn, load_data

    torch.manual_seed(seed)
    xtr, ytr, _, _ = load_data()
    xtr, ytr = xtr[:n], ytr[:n]
    model = build_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, n, (128,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    body = model[:-1]
    zs, es = [], []
    with torch.no_grad():
        for a in range(0, n, 2000):
            e = body(xtr[a : a + 2000])
            es.append(e)
            zs.append(model[-1](e))
    z = torch.cat(zs).numpy().astype(np.float32)
    e = torch.cat(es).numpy().astype(np.float32)
    return z, e, ytr.numpy().astype(np.int64)


def val_split(labels, seed: int, fraction: float = 0.1):
    """SubsetLoader's GLISTER split (its own function, so the same examples): (pool, validation) indices."""
    import numpy as np

    from crestcore.baselines._schedule import _validation_split

    val = _validation_split(np.asarray(labels), fraction, seed)
    keep = np.ones(labels.size, dtype=bool)
    keep[val] = False
    return np.flatnonzero(keep).astype(np.int64), val


def problems(z, e, y, seed: int):
    """The (callable name, args, kwargs) of one E1 selection per method, on host NumPy arrays."""
    from crestcore import last_layer_gradients

    n = y.size
    k = budget(n)
    out = {}
    out["craig"] = ((last_layer_gradients(z, y), y, k), {})
    out["gradmatch"] = ((last_layer_gradients(z, y, embeddings=e), k), dict(labels=y, lam=0.5, tol=1e-6))
    pool, val = val_split(y, seed)
    Gp = last_layer_gradients(z[pool], y[pool], embeddings=e[pool])
    kg = min(pool.size, k)
    out["glister"] = ((Gp, z[val], y[val], kg),
                      dict(val_embeddings=e[val], eta=0.05, optimizer="stochastic", epsilon=0.1, rng=seed))
    return out


def _implementations():
    sys.path.insert(0, str(_ROOT / "tests"))
    from baselines_reference import craig_reference, glister_reference, gradmatch_reference

    from crestcore.baselines import craig, glister, gradmatch

    return {"craig": (craig, craig_reference), "gradmatch": (gradmatch, gradmatch_reference),
            "glister": (glister, glister_reference)}


def compare(new, old) -> dict:
    import numpy as np

    a, b = np.asarray(new.indices), np.asarray(old.indices)
    same = a.shape == b.shape and bool(np.array_equal(a, b))
    m = min(a.size, b.size)
    diff = np.flatnonzero(a[:m] != b[:m])
    first = None if same else int(diff[0]) if diff.size else m
    res = {"same_picks": same, "first_difference": first, "picks_new": int(a.size), "picks_old": int(b.size)}
    if same:
        wn, wo = np.asarray(new.weights, np.float64), np.asarray(old.weights, np.float64)
        res["weights_rel"] = float(np.max(np.abs(wn - wo)) / max(np.max(np.abs(wo)), 1e-300)) if wo.size else 0.0
    on, oo = float(new.objective), float(old.objective)
    res["objective_rel"] = abs(on - oo) / max(abs(oo), 1e-300)
    return res


def run(ns) -> dict:
    rows = []
    for features in ns.features:
        z, e, y = real_features(ns.n, ns.seed) if features == "real" else synthetic_features(ns.n, ns.seed)
        for row in run_features(ns, z, e, y):
            rows.append({"features": features, **row})
    return {"rows": rows}


def run_features(ns, z, e, y) -> list:
    import numpy as np

    probs = problems(z, e, y, ns.seed)
    impls = _implementations()
    # warm-up on a slice (Numba kernels load or compile, BLAS initialises): not timed. A tenth of the
    # data, so that CRAIG's batched call takes the same kernel path as the timed one (with several
    # threads, classes of 600 points or more go to the parallel variant, which compiles separately)
    zw, ew, yw = z[: max(600, y.size // 10)], e[: max(600, y.size // 10)], y[: max(600, y.size // 10)]
    for meth, (args, kw) in problems(zw, ew, yw, ns.seed).items():
        if meth in ns.methods:
            for f in impls[meth][:1] if ns.no_old else impls[meth]:
                f(*args, **kw)
    rows = []
    for meth in ns.methods:
        args, kw = probs[meth]
        new_f, old_f = impls[meth]
        t_new, t_old = [], []
        sel_new = sel_old = None
        for r in range(ns.repeats):
            order = [("new", new_f), ("old", old_f)] if r % 2 == 0 else [("old", old_f), ("new", new_f)]
            for tag, f in order:
                if tag == "old" and ns.no_old:
                    continue
                t = time.perf_counter()
                sel = f(*args, **kw)
                dt = time.perf_counter() - t
                if tag == "new":
                    t_new.append(dt)
                    sel_new = sel
                else:
                    t_old.append(dt)
                    sel_old = sel
            print(f"{meth}: new {t_new[-1]:.2f} s" + ("" if ns.no_old else f", old {t_old[-1]:.2f} s"),
                  file=sys.stderr, flush=True)
        row = {"method": meth, "n": int(args[0].shape[0]), "d": int(args[0].shape[1]),
               "k": int(args[3] if meth == "glister" else args[2] if meth == "craig" else args[1]),
               "new_s": float(np.median(t_new)), "new_all_s": t_new}
        if not ns.no_old:
            row.update(old_s=float(np.median(t_old)), old_all_s=t_old, **compare(sel_new, sel_old))
        if meth == "glister":
            row["n_val"] = int(args[1].shape[0])
        rows.append(row)
    return rows


TARGETS = {"craig": 1.0, "gradmatch": 3.0, "glister": 3.0}
CALLS = {
    "craig": "craig(G, labels, k) on logit gradients",
    "gradmatch": "gradmatch(G, k, labels=labels, lam=0.5, tol=1e-6) on weight gradients",
    "glister": "glister(G_pool, z_val, y_val, k, val_embeddings=e_val, eta=0.05, optimizer='stochastic', epsilon=0.1)",
}


def markdown(res: dict, meta: dict) -> str:
    lines = [
        "## B1: baseline selection speed (CRAIG, GradMatch, GLISTER), old vs new",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; machine: {meta['machine']}; threads {meta['threads']} "
        f"(OpenMP/OpenBLAS/Numba); load average {meta['load_before']} before, {meta['load_after']} after "
        "(a shared machine: other jobs ran at the same time, so absolute times are inflated and noisy; "
        "old and new ran alternately in one process, read the ratios).",
        "",
        f"Features: {meta['features']}. One E1 selection (`SubsetLoader`, budget 10 %, m = 128, 10 classes): "
        "\"old\" is the code before issue #14 item 5, frozen in `tests/baselines_reference.py`; \"new\" is "
        "`crestcore.baselines`.",
        "",
        "| method | call | inputs | n | features | k | old s | new s | speedup | target (new) | same picks "
        "| weights max rel. diff | objective rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        n = f"{r['n']:,}" + (f" (+{r['n_val']:,} val)" if "n_val" in r else "")
        tgt = TARGETS[r["method"]]
        met = ("met" if r["new_s"] <= tgt else "missed") if meta["n"] >= 60_000 else "(set for n = 60,000)"
        if "old_s" in r:
            old = f"{r['old_s']:.2f}"
            sp = f"{r['old_s'] / r['new_s']:.1f}x"
            same = "yes" if r["same_picks"] else f"no (first at {r['first_difference']})"
            wrel = f"{r['weights_rel']:.1e}" if "weights_rel" in r else "-"
            orel = f"{r['objective_rel']:.1e}"
        else:
            old = sp = same = wrel = orel = "-"
        lines.append(f"| {r['method']} | `{CALLS[r['method']]}` | {r['features']} | {n} | {r['d']} | {r['k']:,} | {old} | "
                     f"{r['new_s']:.2f} | {sp} | <= {tgt:g} s: {met} | {same} | {wrel} | {orel} |")
    return "\n".join(lines) + "\n"


def write_block(path, block: str) -> None:
    """Replace the text between the baselines-bench markers of ``path`` (appended when absent)."""
    p = Path(path)
    text = p.read_text() if p.exists() else ""
    new = f"{START}\n{block.rstrip()}\n{END}"
    if START in text and END in text and text.index(START) < text.index(END):
        text = text[: text.index(START)] + new + text[text.index(END) + len(END):]
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + ("\n" if text else "") + new + "\n"
    p.write_text(text)


def main(argv=None) -> int:
    ns = parse_args(argv)
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    res = run(ns)
    desc = {"synthetic": "synthetic = logits N(0,1) + 2 x onehot, ReLU'd N(0,1) embeddings (h = 64), uniform "
                         "labels: the shapes of E1, not its values",
            "real": "real = the first n Fashion-MNIST training images through the demo CNN after 100 SGD steps "
                    "(its logits and 64 penultimate features)"}
    feats = "; ".join(desc[f] for f in ns.features)
    meta = {
        "command": "python benchmarks/baselines.py "
                   + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
                   f"Python {platform.python_version()}",
        "threads": os.environ.get("OMP_NUM_THREADS", "unset"), "load_before": load_before, "n": ns.n,
        "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()), "features": feats,
    }
    md = markdown(res, meta)
    print(md)
    if ns.json:
        Path(ns.json).write_text(json.dumps({"meta": meta, **res}, indent=1))
    if ns.out:
        write_block(ns.out, md)
    return 0


if __name__ == "__main__":
    _set_threads(parse_args().threads)  # before anything imports NumPy or Numba
    raise SystemExit(main())
