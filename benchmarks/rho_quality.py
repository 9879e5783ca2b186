"""Is CREST's trust ratio rho predictive? The quadratic loss model's error along real SGD trajectories.

CREST keeps its coresets while ``rho = |L_R(w) - F(w - w_a)| / L_R(w)`` stays below tau (0.1), with
``F(delta) = L_a + g . delta + 1/2 delta . (h * delta)`` fitted at the anchor ``w_a`` (see
``crestcore/quadratic.py`` and ``crestcore/controller.py``). This script measures, for several ways of
fitting ``g`` and ``h``, how well ``F`` predicts the loss ``L_R`` on the random subset V at horizons of
t steps after the anchor, and whether it predicts better than the trivial "nothing changed" model
``F = L_a``.

Protocol (``docs/rho.md`` has the results and the discussion):

* Training: the demo CNN (:func:`crestcore.apps.train_demo.build_cnn`) on a Fashion-MNIST subset, SGD
  (momentum 0.9, Nesterov, weight decay 5e-4), peak lr 0.05 with linear warm-up over 10 % of the steps
  then cosine to 0 (:func:`crestcore.apps.train_demo.lr_factor`), mini-batches of m = 128. Two trajectories
  (``--trajectories``): ``random`` (uniformly random mini-batches, the brief's) and ``coreset`` (CREST's
  weighted coresets: the P coresets selected at the latest anchor, cycled, loss ``mean(w_i l_i)``, as
  ``CrestConfig(batches="coreset")`` trains).
* Anchors every K steps (step 0, K, 2K, ... while the longest horizon fits in the run). At an anchor, the
  controller's selection path is replayed with public functions: P class-stratified random subsets of
  r (:func:`crestcore.draw_subsets`), one eval forward over their union, last-layer gradient features
  (:func:`crestcore.last_layer_gradients`), P mini-batch coresets of m (:func:`crestcore.minibatch_coresets`,
  the controller's defaults), cluster-size weights rescaled to mean 1 per coreset; V = subset 0 (the
  controller's ``check_idx``), ``L_a`` the mean eval loss on V.
* Fits at the anchor, through :class:`crestcore.adapters.torch.TorchModelOps` (``gradient``,
  ``hutchinson``) and the library's EMAs (``quadratic_anchor`` / ``quadratic_update`` /
  ``quadratic_predict``), one variant per row of the table:

  - ``const``: F = L_a (no change; rho = |L_R - L_a| / L_R).
  - ``first-order``: g of coreset 0, h = 0.
  - ``default``: g and one probe on coreset 0, hutchinson EMAs restarted (the library default).
  - ``fit4``: ``fit_batches = 4``: coresets 0..3, one gradient and one probe each.
  - ``probes16``: g of coreset 0, 16 probes on coreset 0 (the first is ``default``'s).
  - ``adahessian-carry``: the release variant (RMS curvature, EMAs carried across anchors, no bias
    correction), fed the same g and probe as ``default`` at every anchor.
  - ``hutch-carry``: the hutchinson EMAs (g and h) carried across anchors (not restarted; bias-corrected
    by the total count).
  - ``hutch-carry-h``: g fresh at the anchor, only the curvature EMA carried.
  - ``gV``: the exact gradient of V's loss (r examples) with ``default``'s curvature.
  - ``gV-first-order``: the exact gradient of V's loss, h = 0.
  - ``random-batch``: g and one probe on a uniformly random batch of m (no coreset).
  - ``oracle-Qc`` (hindsight, not implementable): ``g_c . delta + 1/2 delta . H_c delta`` with H_c the full
    Hessian of coreset 0's loss at the anchor, applied to the actual delta (a Hessian-vector product).
  - ``oracle-QV`` (hindsight): the same with V's exact gradient and V's full Hessian: the second-order
    Taylor expansion of L_V itself along the realised delta. What no fit of g and h can beat.
  - ``trapezoid-V`` (a different check, not a fit): ``L_a + 1/2 (g_V(w_a) + g_V(w)) . delta``, V's exact
    gradient at the anchor and at the checked point (one more backward over V per check); exact for
    any quadratic loss, so its rho measures how far L_V is from quadratic between w_a and w.

* At t = 1, 2, 5, 10, 20, 50, 100 steps after each anchor: ``L_R = L_V(w_{a+t})`` (eval mode) and every
  variant's ``F(w_{a+t} - w_a)``; ``rho = |L_R - F| / L_R`` (the controller's formula).

Report per trajectory, variant and horizon: median and 90th percentile of rho over the anchors (all
seeds pooled), the fraction with rho <= tau (the check would pass), the median of
``|L_R - F| / |L_R - L_a|`` (below 1: the model beats "no change") and the fraction of anchors where it
does; per variant the Spearman correlation between its rho and the actual relative loss change
``|L_R - L_a| / L_R`` over all (anchor, horizon) pairs; and the size of the linear and quadratic terms.

Run (measured 500 s with the defaults, 3 seeds x 2 trajectories, on 2 shared cores)::

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/rho_quality.py \\
        --json benchmarks/results/rho_quality.json --out docs/rho.md

``--out`` rewrites only the block between ``<!-- rho-table:start -->`` and ``<!-- rho-table:end -->``;
``--from-json`` re-renders the tables from a saved ``--json`` without training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402 (the thread settings above must come first)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = (
    "const", "first-order", "default", "fit4", "probes16", "adahessian-carry", "hutch-carry",
    "hutch-carry-h", "gV", "gV-first-order", "random-batch", "oracle-Qc", "oracle-QV", "trapezoid-V",
)
MARK_START, MARK_END = "<!-- rho-table:start -->", "<!-- rho-table:end -->"


# --------------------------------------------------------------------------------------------------
# one training run with anchors
# --------------------------------------------------------------------------------------------------
def run_seed(data, seed: int, trajectory: str, a) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    from crestcore import (
        QuadraticConfig, draw_subsets, last_layer_gradients, minibatch_coresets, quadratic_anchor,
        quadratic_curvature, quadratic_init, quadratic_predict, quadratic_update,
    )
    from crestcore.adapters.torch import TorchModelOps
    from crestcore.apps.train_demo import build_cnn, lr_factor, sgd_step

    x, y = data
    n = int(x.shape[0])
    m, r, K = a.m, a.r, a.K
    horizons = sorted(a.horizons)
    Hmax = horizons[-1]
    steps_per_epoch = math.ceil(n / m)
    total = a.epochs * steps_per_epoch
    anchors = [s for s in range(0, total - Hmax + 1, K)]
    labels = y.numpy().astype(np.int64)

    torch.manual_seed(seed)
    model = build_cnn(int(labels.max()) + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, total, 0.1))
    ops = TorchModelOps(model, TensorDataset(x, y), labels=labels, batch_size=1024)
    batch_rng = np.random.default_rng([seed, 1])

    hut, ada = QuadraticConfig(), QuadraticConfig(variant="adahessian")
    carry_ada = carry_hut = carry_h = None  # states carried across anchors
    P = max(a.fit_batches, a.P_train if trajectory == "coreset" else 1)

    def set_params(vec):
        torch.nn.utils.vector_to_parameters(vec, params)

    def hvp(idx, w, v):
        """H v of mean(w_i l_i) over idx at the current parameters (eval mode; the CNN has no BN/dropout)."""
        model.eval()
        xb, yb = x[torch.from_numpy(idx)], y[torch.from_numpy(idx)]
        wt = torch.as_tensor(w, dtype=torch.float32)
        loss = (wt * F.cross_entropy(model(xb), yb, reduction="none")).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        gv = torch.cat([g.reshape(-1) for g in grads])
        hv = torch.cat([h.reshape(-1) for h in torch.autograd.grad((gv * v).sum(), params)])
        model.train()
        return hv.detach()

    def loss_on(idx):
        with torch.no_grad():
            return float(ops.losses(idx).mean())

    live = []  # anchors whose horizons are still ahead
    records = []
    train_rows = None
    t0 = time.perf_counter()
    for step in range(total + 1):
        # ---- measurements due at this step (before training it) ----
        for an in list(live):
            t = step - an["step"]
            if t not in horizons:
                continue
            w = ops.params()
            delta = w - an["w"]
            L = loss_on(an["V"])
            _, gV_w = ops.gradient(an["V"], np.ones(an["V"].size))  # for trapezoid-V
            rec = {"seed": seed, "anchor": an["step"], "t": t, "L_a": an["L_a"], "L_R": L,
                   "lr_anchor": an["lr"], "dnorm": float(delta.norm()), "F": {}, "lin": {}, "quad": {}}
            for name, (state, cfg) in an["states"].items():
                Fv = quadratic_predict(state, delta, cfg)
                q = 0.5 * float((quadratic_curvature(state, cfg) * delta * delta).sum())
                rec["F"][name], rec["quad"][name] = Fv, q
                rec["lin"][name] = Fv - an["L_a"] - q
            rec["F"]["const"], rec["lin"]["const"], rec["quad"]["const"] = an["L_a"], 0.0, 0.0
            # hindsight oracles: exact Hessian-vector products with delta at the anchor
            set_params(an["w"])
            for name, idx, wts, g in (("oracle-Qc", an["c0"][0], an["c0"][1], an["g0"]),
                                      ("oracle-QV", an["V"], np.ones(an["V"].size), an["gV"])):
                lin = float((g * delta).sum())
                q = 0.5 * float((delta * hvp(idx, wts, delta)).sum())
                rec["F"][name], rec["lin"][name], rec["quad"][name] = an["L_a"] + lin + q, lin, q
            set_params(w)
            lin = 0.5 * float(((an["gV"] + gV_w) * delta).sum())
            rec["F"]["trapezoid-V"], rec["lin"]["trapezoid-V"], rec["quad"]["trapezoid-V"] = an["L_a"] + lin, lin, 0.0
            records.append(rec)
            if t == Hmax:
                live.remove(an)
        if step == total:
            break
        # ---- an anchor: selection and fits ----
        if step in anchors:
            gen = np.random.default_rng([seed, 2, step])
            subsets = draw_subsets(labels, np.arange(n), r, P, gen)
            union = np.unique(subsets)
            pos = np.searchsorted(union, subsets)
            logits = ops.outputs(union)
            yu = torch.from_numpy(labels[union])
            feats = last_layer_gradients(logits, yu)
            cs = minibatch_coresets(feats, yu, m=m, r=r, P=P, rng=gen, subsets=pos)
            loc = np.asarray(cs.indices)
            valid = loc >= 0
            wgt = np.asarray(cs.weights, dtype=np.float64) * valid
            rows = []
            for p in range(P):
                ri = union[loc[p][valid[p]]]
                rw = wgt[p][valid[p]]
                rows.append((ri, rw * rw.size / max(rw.sum(), 1e-300)))
            V = subsets[0]
            ell = F.cross_entropy(logits, yu, reduction="none")
            L_a = float(ell[torch.from_numpy(np.searchsorted(union, V))].mean())
            w_a = ops.params()
            seeds = [int(s) for s in gen.integers(2**31 - 1, size=a.probes + a.fit_batches + 2)]
            c0i, c0w = rows[0]
            _, g0 = ops.gradient(c0i, c0w)
            probes = [ops.hutchinson(c0i, c0w, seeds[k]) for k in range(a.probes)]
            extra = []
            for p in range(1, a.fit_batches):
                _, gp = ops.gradient(*rows[p])
                extra.append((gp, ops.hutchinson(*rows[p], seeds[a.probes + p])))
            L_V, gV = ops.gradient(V, np.ones(V.size))
            ri = np.sort(gen.choice(n, size=m, replace=False))
            _, gR = ops.gradient(ri, np.ones(m))
            zR = ops.hutchinson(ri, np.ones(m), seeds[-1])

            states = {}
            base = quadratic_anchor(quadratic_init(w_a), L_a, hut)
            states["default"] = (quadratic_update(base, g0, probes[0], hut), hut)
            s = states["default"][0]
            states["first-order"] = (s._replace(h_ema=torch.zeros_like(s.h_ema), n_h=0), hut)
            s4 = s
            for gp, zp in extra:
                s4 = quadratic_update(s4, gp, zp, hut)
            states["fit4"] = (s4, hut)
            s16 = s
            for z in probes[1:]:
                s16 = quadratic_update(s16, None, z, hut)
            states["probes16"] = (s16, hut)
            sV = quadratic_update(base, gV, probes[0], hut)
            states["gV"] = (sV, hut)
            states["gV-first-order"] = (sV._replace(h_ema=torch.zeros_like(sV.h_ema), n_h=0), hut)
            states["random-batch"] = (quadratic_update(base, gR, zR, hut), hut)
            # carried across anchors
            carry_ada = quadratic_anchor(carry_ada if carry_ada is not None else quadratic_init(w_a), L_a, ada)
            carry_ada = quadratic_update(carry_ada, g0, probes[0], ada)
            states["adahessian-carry"] = (carry_ada, ada)
            prev = carry_hut if carry_hut is not None else quadratic_init(w_a)
            carry_hut = quadratic_update(prev._replace(anchor_loss=L_a), g0, probes[0], hut)
            states["hutch-carry"] = (carry_hut, hut)
            prev = carry_h if carry_h is not None else quadratic_init(w_a)
            carry_h = quadratic_update(prev._replace(anchor_loss=L_a, g_ema=torch.zeros_like(prev.g_ema), n_g=0),
                                       g0, probes[0], hut)
            states["hutch-carry-h"] = (carry_h, hut)
            live.append({"step": step, "w": w_a, "V": V, "L_a": L_a, "c0": (c0i, c0w), "g0": g0, "gV": gV,
                         "states": states, "lr": opt.param_groups[0]["lr"],
                         "h_norm": float(quadratic_curvature(s, hut).norm())})
            if abs(L_V - L_a) > 1e-4 * max(1.0, L_a):  # the same loss two ways
                raise RuntimeError(f"anchor loss mismatch: {L_V} vs {L_a}")
            if trajectory == "coreset":
                train_rows, cursor = rows, 0
        # ---- one training step ----
        model.train()
        if trajectory == "coreset":
            bi, bw = train_rows[cursor % len(train_rows)]
            cursor += 1
        else:
            bi, bw = batch_rng.choice(n, size=m, replace=False), np.ones(m)
        tb = torch.from_numpy(np.asarray(bi, dtype=np.int64))
        losses = F.cross_entropy(model(x[tb]), y[tb], reduction="none")
        loss = (torch.as_tensor(bw, dtype=losses.dtype) * losses).mean()
        sgd_step(opt, sched, loss)
    return {"seed": seed, "trajectory": trajectory, "total_steps": total, "anchors": anchors,
            "seconds": time.perf_counter() - t0, "records": records}


# --------------------------------------------------------------------------------------------------
# statistics and tables
# --------------------------------------------------------------------------------------------------
def spearman(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 3:
        return float("nan")

    def rank(v):
        order = np.argsort(v, kind="mergesort")
        rk = np.empty(v.size)
        rk[order] = np.arange(v.size)
        for val in np.unique(v):  # average ties
            sel = v == val
            if sel.sum() > 1:
                rk[sel] = rk[sel].mean()
        return rk

    ra, rb = rank(a), rank(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def summarise(records, tau: float, horizons, variants=VARIANTS) -> dict:
    out = {}
    for v in variants:
        per_t = {}
        all_rho, all_change = [], []
        for t in horizons:
            rs = [r for r in records if r["t"] == t]
            if not rs:
                continue
            L = np.array([r["L_R"] for r in rs])
            La = np.array([r["L_a"] for r in rs])
            Fv = np.array([r["F"][v] for r in rs])
            rho = np.abs(L - Fv) / np.maximum(L, 1e-12)
            err0 = np.abs(L - La)
            ratio = np.abs(L - Fv) / np.maximum(err0, 1e-12)
            per_t[t] = {
                "n": int(L.size), "median": float(np.median(rho)), "p90": float(np.quantile(rho, 0.9)),
                "pass": float(np.mean(rho <= tau)), "ratio_median": float(np.median(ratio)),
                "beats_const": float(np.mean(np.abs(L - Fv) < err0)),
                "lin_median": float(np.median([abs(r["lin"][v]) for r in rs])),
                "quad_median": float(np.median([r["quad"][v] for r in rs])),
                "change_median": float(np.median(err0 / np.maximum(L, 1e-12))),
                "signed_median": float(np.median((Fv - L) / np.maximum(L, 1e-12))),
            }
            all_rho += list(rho)
            all_change += list(err0 / np.maximum(L, 1e-12))
        out[v] = {"per_t": per_t, "spearman_change": spearman(all_rho, all_change)}
    return out


def phase_table(records, variants, horizons, total_steps: int, tau: float) -> list[str]:
    """Median rho by phase of training (anchor in the first, middle or last third of the run)."""
    lines = ["| phase (anchor step) | t | " + " | ".join(variants) + " |",
             "|---|--:|" + "--:|" * len(variants)]
    cuts = [0, total_steps / 3, 2 * total_steps / 3, total_steps + 1]
    names = ["early", "mid", "late"]
    for i, name in enumerate(names):
        rs = [r for r in records if cuts[i] <= r["anchor"] < cuts[i + 1]]
        if not rs:
            continue
        for t in horizons:
            sub = [r for r in rs if r["t"] == t]
            if not sub:
                continue
            cells = []
            for v in variants:
                rho = [abs(r["L_R"] - r["F"][v]) / r["L_R"] for r in sub]
                cells.append(f"{np.median(rho):.3f}")
            lo, hi = int(cuts[i]), int(min(cuts[i + 1], total_steps)) - 1
            lines.append(f"| {name} ({lo}-{hi}, n={len(sub)}) | {t} | " + " | ".join(cells) + " |")
    return lines


def render(result: dict) -> str:
    a = result["args"]
    tau = a["tau"]
    horizons = sorted(a["horizons"])
    out = []
    out.append(f"Run {result['date']}, {result['seconds']:.0f} s, `{result['command']}`; "
               f"torch {result['torch']}, {result['machine']}. "
               f"n_train {a['n_train']}, {a['epochs']} epochs ({result['total_steps']} steps), m {a['m']}, "
               f"r {a['r']}, anchors every K = {a['K']} steps, seeds {a['seeds']}, tau {tau}.")
    out.append("")
    for traj, recs in result["records"].items():
        summ = summarise(recs, tau, horizons)
        n_anchor = len({(r['seed'], r['anchor']) for r in recs})
        out.append(f"### Trajectory `{traj}` ({n_anchor} anchors)")
        out.append("")
        out.append("Each cell: median rho / 90th percentile / fraction of anchors with rho <= tau. "
                   "Last column: Spearman correlation of the variant's rho with the actual relative "
                   "change |L_R - L_a| / L_R over all (anchor, t) pairs.")
        out.append("")
        out.append("| variant | " + " | ".join(f"t={t}" for t in horizons) + " | Spearman |")
        out.append("|---|" + "--:|" * (len(horizons) + 1))
        for v in VARIANTS:
            cells = []
            for t in horizons:
                c = summ[v]["per_t"].get(t)
                cells.append("" if c is None else f"{c['median']:.3f} / {c['p90']:.2f} / {c['pass']:.0%}")
            out.append(f"| {v} | " + " | ".join(cells) + f" | {summ[v]['spearman_change']:.2f} |")
        out.append("")
        out.append("Error relative to the constant predictor: median of |L_R - F| / |L_R - L_a| "
                   "(below 1: better than \"no change\") / fraction of anchors where |L_R - F| < |L_R - L_a|.")
        out.append("")
        out.append("| variant | " + " | ".join(f"t={t}" for t in horizons) + " |")
        out.append("|---|" + "--:|" * len(horizons))
        for v in VARIANTS:
            if v == "const":
                continue
            cells = []
            for t in horizons:
                c = summ[v]["per_t"].get(t)
                cells.append("" if c is None else f"{c['ratio_median']:.2f} / {c['beats_const']:.0%}")
            out.append(f"| {v} | " + " | ".join(cells) + " |")
        out.append("")
        out.append("Signed error (F - L_R) / L_R, median; |linear term| and quadratic term (medians, in loss "
                   "units); actual relative change |L_R - L_a| / L_R (median) and ||delta|| (median):")
        out.append("")
        out.append("Last column: the diagonal curvature's share of the curvature term along the realised delta, "
                   "median over anchors of (1/2 delta.(h16 * delta)) / (1/2 delta.H_c delta), h16 the 16-probe "
                   "Hutchinson diagonal and H_c the full Hessian, both of coreset 0's loss at the anchor.")
        out.append("")
        out.append("| t | change | \\|\\|delta\\|\\| | " + " | ".join(
            f"{v}: signed / lin / quad" for v in ("default", "probes16", "fit4", "adahessian-carry", "oracle-QV"))
            + " | diag / full |")
        out.append("|--:|--:|--:|" + "--:|" * 6)
        for t in horizons:
            sub = [r for r in recs if r["t"] == t]
            if not sub:
                continue
            cells = []
            for v in ("default", "probes16", "fit4", "adahessian-carry", "oracle-QV"):
                c = summ[v]["per_t"][t]
                cells.append(f"{c['signed_median']:+.3f} / {c['lin_median']:.3f} / {c['quad_median']:.3g}")
            dn = np.median([r["dnorm"] for r in sub])
            share = np.median([r["quad"]["probes16"] / r["quad"]["oracle-Qc"] for r in sub if r["quad"]["oracle-Qc"] > 0])
            out.append(f"| {t} | {summ['const']['per_t'][t]['change_median']:.3f} | {dn:.3f} | " + " | ".join(cells)
                       + f" | {share:.3f} |")
        out.append("")
        for v in ("default", "const"):
            top = sorted(((abs(r["L_R"] - r["F"][v]) / r["L_R"], r["t"], r["anchor"], r["seed"], r["L_a"], r["L_R"])
                          for r in recs if r["t"] >= 50), reverse=True)[:3]
            out.append(f"Largest rho of `{v}` (t >= 50): " + "; ".join(
                f"{x[0]:.2f} (t={x[1]}, anchor step {x[2]}, seed {x[3]}, L_a {x[4]:.2f} -> L_R {x[5]:.2f})" for x in top)
                + ".")
            out.append("")
        out.append("")
        out.append("Median rho by phase of training:")
        out.append("")
        pv = ("const", "first-order", "default", "fit4", "probes16", "adahessian-carry", "gV", "oracle-QV")
        out += phase_table(recs, pv, [t for t in horizons if t >= 5], result["total_steps"], tau)
        out.append("")
    return "\n".join(out)


def write_block(path: Path, block: str):
    text = path.read_text() if path.exists() else ""
    new = f"{MARK_START}\n{block}\n{MARK_END}"
    if MARK_START in text and MARK_END in text:
        text = re.sub(re.escape(MARK_START) + r".*?" + re.escape(MARK_END), lambda _: new, text, flags=re.S)
    else:
        text = (text.rstrip() + "\n\n" if text else "") + new + "\n"
    path.write_text(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--trajectories", nargs="+", default=["random", "coreset"], choices=["random", "coreset"])
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--m", type=int, default=128)
    p.add_argument("--r", type=int, default=384)
    p.add_argument("--K", type=int, default=50, help="steps between anchors")
    p.add_argument("--horizons", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50, 100])
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--fit-batches", type=int, default=4)
    p.add_argument("--P-train", type=int, default=10, help="coresets per anchor on the coreset trajectory")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="markdown file: rewrite the rho-table block")
    p.add_argument("--from-json", type=Path, default=None, help="render a saved --json without training")
    a = p.parse_args(argv)

    if a.from_json:
        result = json.loads(a.from_json.read_text())
    else:
        import torch

        from crestcore.apps.train_demo import load_data

        torch.set_num_threads(a.threads)
        x, y, _, _ = load_data(n_train=a.n_train, n_test=10, seed=0)
        t0 = time.perf_counter()
        result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                  "command": "python benchmarks/rho_quality.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
                  "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores, {a.threads} torch thread(s)",
                  "records": {}, "runs": []}
        for traj in a.trajectories:
            result["records"][traj] = []
            for seed in a.seeds:
                res = run_seed((x, y), seed, traj, a)
                result["records"][traj] += res.pop("records")
                result["runs"].append(res)
                result["total_steps"] = res["total_steps"]
                print(f"[{traj} seed {seed}] {len(res['anchors'])} anchors, {res['seconds']:.0f} s", flush=True)
        result["seconds"] = time.perf_counter() - t0
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(result))
    text = render(result)
    print(text)
    if a.out:
        write_block(a.out, text)


if __name__ == "__main__":
    main()
