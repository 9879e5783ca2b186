"""``crest demo``: a weighted facility-location coreset of Fashion-MNIST, against a random subset.

This module sits on top of everything (like the CLI): the core never imports it. tqdm and matplotlib
are imported inside the functions that use them, so importing this module imports neither.

What it does
------------
1. Load the 60,000 Fashion-MNIST training images; features are the 784 pixels scaled to [0, 1]
   (float32).
2. For each class, select ``k_c = max(1, round(fraction * n_c))`` images with
   :func:`crestcore.facility_location` (per-class facility location, cluster-size weights).
3. Draw a uniformly random subset of the same size per class and evaluate its facility-location
   objective ``F(R) = sum_i max_{j in R} s_ij`` exactly, with the same similarity as the selection,
   tile by tile (never a dense n x n matrix). The coreset is re-evaluated by the same routine, so the
   ratio compares like with like; the objective ``facility_location`` reported is shown next to it
   as a cross-check.
4. Print a table and save two figures: the selected images of each class ordered by weight, and the
   random picks with the weights they would get (their cluster sizes).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from collections.abc import Callable

import numpy as np

from crestcore.apps import require
from crestcore.facility import facility_location
from crestcore.similarity import KERNELS, METRICS, kernel_scale, pairwise_distances

from .datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from .train_demo import strict_json

__all__ = ["run_selection_demo", "evaluate_subset", "max_distance", "format_table"]

_TILE = 2048


def _ratio(f_coreset: float, f_random: float) -> float | None:
    """F(coreset) / F(random); None where both are 0 (a class of one image: the ratio is undefined, not
    infinite); inf where only F(random) is 0 (not reached with either kernel, whose s_jj is positive)."""
    if f_random > 0:
        return f_coreset / f_random
    return None if f_coreset == 0 else math.inf


def _fmt_ratio(x: float | None) -> str:
    return f"{'n/a':>7}" if x is None else f"{x:>7.4f}"


# --------------------------------------------------------------------------------------------------
# exact, tiled evaluation of a subset
# --------------------------------------------------------------------------------------------------


def max_distance(X: np.ndarray, metric: str, tile: int = _TILE) -> float:
    """``max_{i,j} D(x_i, x_j)`` over all pairs of the rows of ``X``, exactly, in tiles.

    This is the ``M`` of the "max-minus" kernel ``s_ij = M - D_ij`` that ``facility_location`` uses for
    one problem (one class): the maximum over the pairs *of that class*, not of the whole data set.
    Computed in X's dtype by the same ``pairwise_distances``, so it is the same number up to the
    rounding of a differently blocked matrix product.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    >>> max_distance(X, "euclidean"), max_distance(X, "sqeuclidean", tile=1)
    (5.0, 25.0)
    """
    n = X.shape[0]
    M = 0.0
    for a in range(0, n, tile):
        for b in range(a, n, tile):
            D = pairwise_distances(X[a : a + tile], X[b : b + tile], metric=metric)
            M = max(M, float(D.max()))
    return M


def evaluate_subset(
    X: np.ndarray,
    subset: np.ndarray,
    *,
    metric: str,
    kernel: str,
    scale: float | None = None,
    M: float | None = None,
    tile: int = _TILE,
) -> dict:
    """Facility-location objective of ``subset`` (row indices of ``X``) over all rows of ``X``, exactly.

    ``F(R) = sum_i max_{j in R} s_ij`` with ``s = M - D`` ("max-minus", ``M`` the maximum pairwise
    distance within ``X``, computed here if not given) or ``s = exp(-D / scale)`` ("exp", ``scale``
    defaulting to the number of features, as in ``facility_location``). Works tile by tile: memory is
    ``tile x len(subset)``. A point's distance to itself is exactly 0 (as on every path of the core).

    Returns a dict: ``objective`` (float), ``mean_distance`` (mean distance of a point to its nearest
    member of the subset), ``weights`` (cluster sizes: how many points have each member as their most
    similar one, earliest member on ties; they sum to ``len(X)``), ``M``, ``scale``.

    Examples
    --------
    Four points on a line; the subset {0, 3} serves the two points on its left and right:

    >>> import numpy as np
    >>> X = np.array([[0.0], [1.0], [5.0], [6.0]])
    >>> result = evaluate_subset(X, np.array([0, 3]), metric="euclidean", kernel="max-minus")
    >>> result["M"], result["objective"], result["mean_distance"], result["weights"]
    (6.0, 22.0, 0.5, array([2, 2]))
    """
    subset = np.asarray(subset, dtype=np.int64)
    n = X.shape[0]
    if subset.ndim != 1 or subset.size == 0:
        raise ValueError("subset must be a non-empty 1-D array of row indices")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    sc = kernel_scale(scale, X.shape[1])
    if kernel == "max-minus" and M is None:
        M = max_distance(X, metric, tile)
    C = X[subset]
    objective = 0.0
    dist_sum = 0.0
    counts = np.zeros(subset.size, dtype=np.int64)
    for a in range(0, n, tile):
        D = pairwise_distances(X[a : a + tile], C, metric=metric)
        rows = np.arange(a, a + D.shape[0])
        D = np.where(rows[:, None] == subset[None, :], np.zeros_like(D), D)  # exact self-distance 0
        S = (M - D) if kernel == "max-minus" else np.exp(-D / sc)
        S = S.astype(np.float64)
        objective += float(S.max(axis=1).sum())
        dist_sum += float(D.min(axis=1).astype(np.float64).sum())
        counts += np.bincount(S.argmax(axis=1), minlength=subset.size)  # earliest member on ties
    return {
        "objective": objective,
        "mean_distance": dist_sum / n,
        "weights": counts,
        "M": M,
        "scale": sc,
    }


# --------------------------------------------------------------------------------------------------
# table and figures
# --------------------------------------------------------------------------------------------------


def format_table(results: dict) -> str:
    """The demo's result table as text (one row per class, then the total).

    Examples
    --------
    The table of a selection demo run on a stand-in for Fashion-MNIST (20 random images of two classes;
    written by :func:`~crestcore.apps.datasets.fashion_mnist_stand_in`):

    >>> from pathlib import Path
    >>> from crestcore.apps.datasets import fashion_mnist_stand_in
    >>> folder = fashion_mnist_stand_in(n_train=20, num_classes=2)
    >>> results = run_selection_demo(Path(folder.name) / "out", fraction=0.2, root=folder.name,
    ...                              progress=False, top=2, print_fn=None)
    >>> print(format_table(results))
    class             n    k    F(coreset)     F(random)   ratio d(coreset)  d(random)  time s
    ------------------------------------------------------------------------------------------
    T-shirt/top      10    2 ...
    Trouser          10    2 ...
    ------------------------------------------------------------------------------------------
    total            20    4 ...
    <BLANKLINE>
    F = sum_i max_(j in subset) s_ij per class; ...
    >>> folder.cleanup()
    """
    head = (
        f"{'class':<12} {'n':>6} {'k':>4} {'F(coreset)':>13} {'F(random)':>13} {'ratio':>7} "
        f"{'d(coreset)':>10} {'d(random)':>10} {'time s':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results["classes"]:
        lines.append(
            f"{r['name']:<12} {r['n']:>6} {r['k']:>4} {r['objective_coreset']:>13.1f} "
            f"{r['objective_random']:>13.1f} {_fmt_ratio(r['ratio'])} {r['mean_distance_coreset']:>10.3f} "
            f"{r['mean_distance_random']:>10.3f} {r['time_s']:>7.2f}"
        )
    t = results["total"]
    lines.append("-" * len(head))
    lines.append(
        f"{'total':<12} {t['n']:>6} {t['k']:>4} {t['objective_coreset']:>13.1f} "
        f"{t['objective_random']:>13.1f} {_fmt_ratio(t['ratio'])} {t['mean_distance_coreset']:>10.3f} "
        f"{t['mean_distance_random']:>10.3f} {t['time_s']:>7.2f}"
    )
    p = results["params"]
    lines.append("")
    lines.append(
        f"F = sum_i max_(j in subset) s_ij per class; s = {p['kernel']} kernel on {p['metric']} distances "
        f"of {results['n_features']}-d pixels in [0, 1]; ratio = F(coreset) / F(random);"
    )
    lines.append(
        "d = mean distance of an image to its nearest pick. time = facility-location selection per class "
        f"(optimizer {p['optimizer']}); warm-up (JIT compile, first call) {results['time_warmup_s']:.2f} s."
    )
    lines.append(
        f"F(coreset) as reported by facility_location: {t['objective_coreset_reported']:.1f} "
        f"(max relative difference to the tiled re-evaluation {results['max_rel_diff_reported']:.1e})."
    )
    return "\n".join(lines)


def _save_grid(path: Path, images, labels_per_row, picks, weights, title: str, top: int) -> None:
    """One row per class: up to ``top`` images ordered by weight (largest first), weight in each title."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend (Agg canvas)

    n_rows = len(picks)
    fig = Figure(figsize=(1.1 * top + 1.6, 1.25 * n_rows + 0.8), dpi=100)
    axes = fig.subplots(n_rows, top, squeeze=False)
    for r in range(n_rows):
        idx, w = picks[r], weights[r]
        order = np.argsort(-np.asarray(w), kind="stable")[:top]
        for c in range(top):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < order.size:
                ax.imshow(images[idx[order[c]]], cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
                ax.set_title(f"w={int(round(float(w[order[c]])))}", fontsize=7, pad=2)
        axes[r, 0].set_ylabel(labels_per_row[r], fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.1, right=0.99, top=1 - 0.55 / (1.25 * n_rows + 0.8), bottom=0.01,
                        wspace=0.08, hspace=0.35)
    fig.savefig(path)


# --------------------------------------------------------------------------------------------------
# the demo
# --------------------------------------------------------------------------------------------------


def _subsample(labels: np.ndarray, limit_per_class: int, rng: np.random.Generator) -> np.ndarray:
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size > limit_per_class:
            idx = np.sort(rng.choice(idx, size=limit_per_class, replace=False))
        keep.append(idx)
    return np.sort(np.concatenate(keep))


def run_selection_demo(
    out_dir,
    fraction: float = 0.01,
    seed: int = 0,
    metric: str = "euclidean",
    kernel: str = "max-minus",
    optimizer: str = "lazy",
    progress: bool = True,
    *,
    root=None,
    limit_per_class: int | None = None,
    top: int = 12,
    print_fn: Callable[[str], None] | None = print,
) -> dict:
    """Select a weighted ``fraction``-per-class coreset of Fashion-MNIST and compare it with random.

    Parameters
    ----------
    out_dir : folder for ``selected_per_class.png``, ``random_per_class.png`` and ``results.json``
        (created if needed).
    fraction : share of each class to select, in (0, 1]; ``k_c = max(1, round(fraction * n_c))``
        (0.01 -> 60 of the 6,000 images per class).
    seed : seeds the random baseline, ``limit_per_class`` subsampling and stochastic greedy.
    metric, kernel, optimizer : passed to :func:`crestcore.facility_location`.
    progress : show a tqdm progress bar over the classes (if tqdm is installed).
    root : Fashion-MNIST folder (default ``/usr/share/datasets/fashion-mnist``).
    limit_per_class : use at most this many (randomly chosen) images per class; for quick runs/tests.
    top : images per class row in the figures.
    print_fn : where the table goes (``None``: print nothing).

    Returns
    -------
    A plain dict (JSON-serialisable): ``params``, ``n``, ``n_features``, ``classes`` (per class: name,
    n, k, time_s, objectives, ratio, mean distances, picked indices and weights), ``total``,
    ``time_warmup_s``, ``time_total_s``, ``max_rel_diff_reported``, ``paths``.

    Examples
    --------
    On a stand-in for Fashion-MNIST (``root=``): 40 random 28 x 28 images of the ten classes, in the
    data set's gzipped IDX files; half of each class is selected:

    >>> from pathlib import Path
    >>> from crestcore.apps.datasets import fashion_mnist_stand_in
    >>> folder = fashion_mnist_stand_in(n_train=40, num_classes=10)
    >>> results = run_selection_demo(Path(folder.name) / "out", fraction=0.5, root=folder.name,
    ...                              progress=False, top=2, print_fn=None)
    >>> [(c["name"], c["n"], c["k"]) for c in results["classes"][:2]]
    [('T-shirt/top', 4, 2), ('Trouser', 4, 2)]
    >>> results["total"]["k"], sorted(Path(p).name for p in results["paths"].values())
    (20, ['random_per_class.png', 'results.json', 'selected_per_class.png'])
    >>> folder.cleanup()
    """
    fraction = float(fraction)
    if not (0.0 < fraction <= 1.0) or not math.isfinite(fraction):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if limit_per_class is not None and int(limit_per_class) < 1:
        raise ValueError(f"limit_per_class must be a positive integer, got {limit_per_class!r}")
    require("the selection demo", "pip install matplotlib", "matplotlib")  # before the output folder is made
    out = Path(out_dir)
    t_start = time.perf_counter()

    images, labels = load_fashion_mnist(root, split="train")
    rng = np.random.default_rng(seed)
    keep = np.arange(labels.shape[0])  # each row's index in the training set (results.json saves those)
    if limit_per_class is not None:
        keep = _subsample(labels, int(limit_per_class), rng)
        images, labels = images[keep], labels[keep]
    X = images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)
    X = np.ascontiguousarray(X)
    classes = np.unique(labels)

    # Warm-up: the first call of a native (Numba) kernel compiles it; keep that out of the timings. It
    # solves the first class's problem (its size and k, its own seed: the timed calls' draws are not
    # touched), so it compiles the kernels the per-class calls take (a small problem took another path,
    # and the first class's time held the compile, 85 % of the total with a cold cache: review 78).
    t0 = time.perf_counter()
    first = X[labels == classes[0]]
    k_first = max(1, min(first.shape[0], int(round(fraction * first.shape[0]))))
    facility_location(first, k_first, metric=metric, kernel=kernel, optimizer=optimizer, rng=seed)
    t_warm = time.perf_counter() - t0

    bar = None
    it = classes
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(classes, desc="facility location", unit="class", file=sys.stderr)
            it = bar
        except ImportError:  # progress bars are optional
            pass

    # One class at a time so the progress bar can move; facility_location(X, k, labels=labels) does
    # the same per-class selection in one call (solving the classes batched).
    per_class = []
    picks_sel, weights_sel, picks_rnd, weights_rnd = [], [], [], []
    for c in it:
        name = FASHION_MNIST_CLASSES[int(c)] if int(c) < len(FASHION_MNIST_CLASSES) else str(int(c))
        if bar is not None:
            bar.set_postfix_str(name)
        members = np.flatnonzero(labels == c)
        Xc = X[members]
        n_c = members.size
        k_c = max(1, min(n_c, int(round(fraction * n_c))))

        t0 = time.perf_counter()
        sel = facility_location(Xc, k_c, metric=metric, kernel=kernel, optimizer=optimizer, rng=rng)
        t_sel = time.perf_counter() - t0
        local = np.asarray(sel.indices, dtype=np.int64)
        w_sel = np.asarray(sel.weights, dtype=np.float64)

        rand_local = np.sort(rng.choice(n_c, size=k_c, replace=False))
        M = max_distance(Xc, metric) if kernel == "max-minus" else None
        ev_sel = evaluate_subset(Xc, local, metric=metric, kernel=kernel, M=M)
        ev_rnd = evaluate_subset(Xc, rand_local, metric=metric, kernel=kernel, M=M)

        reported = float(np.asarray(sel.objective))
        per_class.append(
            {
                "label": int(c),
                "name": name,
                "n": int(n_c),
                "k": int(k_c),
                "time_s": t_sel,
                "objective_coreset": ev_sel["objective"],
                "objective_coreset_reported": reported,
                "objective_random": ev_rnd["objective"],
                "ratio": _ratio(ev_sel["objective"], ev_rnd["objective"]),
                "mean_distance_coreset": ev_sel["mean_distance"],
                "mean_distance_random": ev_rnd["mean_distance"],
                "max_distance": M,
                # Fashion-MNIST training-set indices, also of a subsample (review 135: its positions were saved)
                "indices": keep[members[local]].tolist(),
                "weights": w_sel.tolist(),
                "random_indices": keep[members[rand_local]].tolist(),
                "random_weights": ev_rnd["weights"].astype(float).tolist(),
            }
        )
        picks_sel.append(members[local])
        weights_sel.append(w_sel)
        picks_rnd.append(members[rand_local])
        weights_rnd.append(ev_rnd["weights"])
    if bar is not None:
        bar.close()

    n_tot = int(sum(r["n"] for r in per_class))
    F_sel = sum(r["objective_coreset"] for r in per_class)
    F_rnd = sum(r["objective_random"] for r in per_class)
    total = {
        "n": n_tot,
        "k": int(sum(r["k"] for r in per_class)),
        "time_s": sum(r["time_s"] for r in per_class),
        "objective_coreset": F_sel,
        "objective_coreset_reported": sum(r["objective_coreset_reported"] for r in per_class),
        "objective_random": F_rnd,
        "ratio": _ratio(F_sel, F_rnd),
        "mean_distance_coreset": sum(r["mean_distance_coreset"] * r["n"] for r in per_class) / n_tot,
        "mean_distance_random": sum(r["mean_distance_random"] * r["n"] for r in per_class) / n_tot,
    }
    rel = max(
        abs(r["objective_coreset_reported"] - r["objective_coreset"]) / max(abs(r["objective_coreset"]), 1e-300)
        for r in per_class
    )

    out.mkdir(parents=True, exist_ok=True)
    row_names = [r["name"] for r in per_class]
    sel_png = out / "selected_per_class.png"
    rnd_png = out / "random_per_class.png"
    _save_grid(
        sel_png, images, row_names, picks_sel, weights_sel,
        f"Facility-location coreset ({fraction:g} per class, {kernel} / {metric}): top {top} picks by "
        f"weight (cluster size); F = {F_sel:.4g}",
        top,
    )
    _save_grid(
        rnd_png, images, row_names, picks_rnd, weights_rnd,
        f"Uniform random subset, same size per class: {top} picks by weight (cluster size); "
        f"F = {F_rnd:.4g} (coreset/random = {_fmt_ratio(total['ratio']).strip()})",
        top,
    )

    results = {
        "params": {
            "fraction": fraction, "seed": int(seed), "metric": metric, "kernel": kernel,
            "optimizer": optimizer, "limit_per_class": limit_per_class, "root": None if root is None else os.fspath(root),
        },
        "n": int(X.shape[0]),
        "n_features": int(X.shape[1]),
        "classes": per_class,
        "total": total,
        "time_warmup_s": t_warm,
        "max_rel_diff_reported": rel,
        "paths": {"selected": str(sel_png), "random": str(rnd_png), "results": str(out / "results.json")},
    }
    results["time_total_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(strict_json(results))  # strict JSON: a ratio without a value is null
    if print_fn is not None:
        print_fn(format_table(results))
        print_fn(f"\nwall clock {results['time_total_s']:.1f} s; figures: {sel_png}, {rnd_png}")
    return results
