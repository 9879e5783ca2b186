"""Slow, obviously-correct references in plain NumPy (float64, explicit loops).

Written from the definitions only, independently of ``crestcore``: nothing here imports the library.
Every fast path in the library is checked against these (differential tests).

Conventions (the ones ``crestcore.facility_location`` documents):

* ``S[i, j]`` is the similarity of ground point ``i`` to candidate ``j``;
  ``F(A) = sum_i max_{j in A} S[i, j]`` with ``max`` over the empty set = 0.
* Greedy adds ``argmax_j F(A + j) - F(A)`` over the unselected candidates, lowest index on ties.
* Weights: every point goes to the pick it is most similar to (the earliest pick on ties); a pick's
  weight is the number of points it receives.
* ``"max-minus"`` kernel: ``max(D) - D`` with the maximum over the pairs of one problem;
  ``"exp"``: ``exp(-D / scale)``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

__all__ = [
    "distances",
    "similarity",
    "objective",
    "gain",
    "naive_greedy",
    "brute_force_optimum",
    "assign_weights",
    "hamilton",
    "facility_location",
]


# ----------------------------------------------------------------------------------------------
# distances and similarities, one pair at a time
# ----------------------------------------------------------------------------------------------


def distances(X, metric: str = "euclidean") -> np.ndarray:
    """Pairwise distances by explicit differences (no Gram-matrix trick), exact 0 on the diagonal."""
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    D = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if metric == "euclidean":
                D[i, j] = math.sqrt(float(np.sum((X[i] - X[j]) ** 2)))
            elif metric == "sqeuclidean":
                D[i, j] = float(np.sum((X[i] - X[j]) ** 2))
            elif metric == "cosine":
                ni = math.sqrt(float(np.sum(X[i] ** 2)))
                nj = math.sqrt(float(np.sum(X[j] ** 2)))
                cos = 0.0 if ni == 0.0 or nj == 0.0 else float(np.sum(X[i] * X[j])) / (ni * nj)
                D[i, j] = min(2.0, max(0.0, 1.0 - cos))
            else:
                raise ValueError(metric)
    return D


def similarity(X, metric: str = "euclidean", kernel: str = "max-minus", scale: float | None = None) -> np.ndarray:
    """The (n, n) similarity of one problem: ``max(D) - D`` or ``exp(-D / scale)``."""
    D = distances(X, metric)
    if kernel == "max-minus":
        return D.max() - D
    if kernel == "exp":
        s = float(np.asarray(X).shape[1]) if scale is None else float(scale)
        return np.exp(-D / s)
    raise ValueError(kernel)


# ----------------------------------------------------------------------------------------------
# the objective and greedy, by loops
# ----------------------------------------------------------------------------------------------


def objective(S, A) -> float:
    """``F(A) = sum_i max_{j in A} S[i, j]`` (0 for the empty set)."""
    S = np.asarray(S, dtype=np.float64)
    A = [int(a) for a in A]
    total = 0.0
    for i in range(S.shape[0]):
        best = 0.0
        for a in A:
            if S[i, a] > best:
                best = S[i, a]
        total += best
    return total


def gain(S, A, j) -> float:
    """``F(A + j) - F(A)``, computed point by point (never negative for S >= 0)."""
    S = np.asarray(S, dtype=np.float64)
    g = 0.0
    for i in range(S.shape[0]):
        cover = max([S[i, a] for a in A], default=0.0)
        if S[i, j] > cover:
            g += S[i, j] - cover
    return g


def naive_greedy(S, k: int):
    """Plain greedy, lowest index on ties.

    Returns ``(picks, gains, margin)``: ``margin`` is the smallest gap, over the steps, between the
    winning gain and the best other candidate's gain (``inf`` when a step had one candidate). A test
    compares indices only when the margin is well above the floating-point noise of the paths compared.
    """
    S = np.asarray(S, dtype=np.float64)
    n = S.shape[0]
    picks: list[int] = []
    gains: list[float] = []
    margin = math.inf
    for _ in range(k):
        # how well each point is covered by the picks so far (0 before the first pick)
        cover = [max([S[i, a] for a in picks], default=0.0) for i in range(n)]
        best_j, best_g, second = -1, -math.inf, -math.inf
        for j in range(n):
            if j in picks:
                continue
            g = 0.0
            for i in range(n):
                if S[i, j] > cover[i]:
                    g += S[i, j] - cover[i]
            if g > best_g:  # strict: the lowest index keeps a tie
                second = best_g
                best_j, best_g = j, g
            elif g > second:
                second = g
        picks.append(best_j)
        gains.append(best_g)
        margin = min(margin, best_g - second)
    return np.array(picks, dtype=np.int64), np.array(gains, dtype=np.float64), margin


def brute_force_optimum(S, k: int):
    """``(max F(A) over all |A| = k, one maximiser)`` by enumerating every k-subset (n <= 10)."""
    S = np.asarray(S, dtype=np.float64)
    n = S.shape[0]
    if n > 10:
        raise ValueError("brute force is for n <= 10")
    best, arg = -math.inf, None
    for A in itertools.combinations(range(n), k):
        f = objective(S, A)
        if f > best:
            best, arg = f, A
    return best, np.array(arg, dtype=np.int64)


def assign_weights(S, picks) -> np.ndarray:
    """Cluster sizes: each point counted once, at the pick with the largest S[i, pick] (earliest on ties)."""
    S = np.asarray(S, dtype=np.float64)
    picks = [int(p) for p in picks]
    w = np.zeros(len(picks), dtype=np.float64)
    for i in range(S.shape[0]):
        best_t, best_s = 0, S[i, picks[0]]
        for t in range(1, len(picks)):
            if S[i, picks[t]] > best_s:
                best_t, best_s = t, S[i, picks[t]]
        w[best_t] += 1
    return w


# ----------------------------------------------------------------------------------------------
# budget split
# ----------------------------------------------------------------------------------------------


def hamilton(total: int, sizes) -> np.ndarray:
    """Largest-remainder split of ``total`` proportional to ``sizes``, in exact integer arithmetic.

    ``floor(total * n_c / n)`` each; the leftover units go to the largest remainders (lower group on
    equal remainders). Then, when ``total >= #non-empty groups``, each empty-handed non-empty group
    (in order) takes one unit from the group holding the most units (the lower group on ties).
    """
    sizes = [int(s) for s in sizes]
    n = sum(sizes)
    if n == 0:
        return np.zeros(len(sizes), dtype=np.int64)
    base = [total * s // n for s in sizes]
    rem = [total * s % n for s in sizes]  # remainder numerators over the common denominator n
    left = total - sum(base)
    order = sorted(range(len(sizes)), key=lambda c: (-rem[c], c))
    for c in order[:left]:
        base[c] += 1
    nonempty = [c for c in range(len(sizes)) if sizes[c] > 0]
    if total >= len(nonempty):
        for c in nonempty:
            if base[c] == 0:
                donor = max(range(len(sizes)), key=lambda g: (base[g], -g))
                base[donor] -= 1
                base[c] += 1
    return np.array(base, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# the whole selection, composed from the pieces above
# ----------------------------------------------------------------------------------------------


def facility_location(X, k: int, labels=None, *, metric="euclidean", kernel="max-minus", scale=None):
    """Reference of ``crestcore.facility_location`` (naive greedy; features, or ``metric="precomputed"``).

    Returns a dict with ``indices``, ``weights``, ``gains``, ``objective`` and ``margin`` (see
    :func:`naive_greedy`), classes in ascending label order.
    """
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if labels is None:
        groups = [np.arange(n)]
    else:
        labels = np.asarray(labels)
        groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    budgets = hamilton(k, [g.size for g in groups])
    idx, wts, gns, obj, margin = [], [], [], 0.0, math.inf
    for g, kc in zip(groups, budgets):
        if kc == 0:
            continue
        if metric == "precomputed":
            S = X[np.ix_(g, g)]
        else:
            S = similarity(X[g], metric, kernel, scale)
        picks, gains, mg = naive_greedy(S, int(kc))
        idx.append(g[picks])
        wts.append(assign_weights(S, picks))
        gns.append(gains)
        obj += objective(S, picks)
        margin = min(margin, mg)
    return {
        "indices": np.concatenate(idx),
        "weights": np.concatenate(wts),
        "gains": np.concatenate(gns),
        "objective": obj,
        "margin": margin,
    }
