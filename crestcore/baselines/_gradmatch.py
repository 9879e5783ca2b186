"""GradMatch (Killamsetty et al., ICML 2021): gradient matching by regularised non-negative OMP."""

from __future__ import annotations

import math
import warnings

import numpy as np

from .._compat import device_of, from_numpy, namespace, to_numpy
from ..similarity import prepare
from .._validation import check_float_matrix, check_int, hamilton, labels_to_host
from ..facility import Selection
from ._common import check_bool, check_real, host_selection


# ------------------------------------------------------------------------------------------------
# the small solver: min ||b - sum_j w_j a_j||^2 + lam ||w||^2  (w >= 0), on the Gram form, host float64
# ------------------------------------------------------------------------------------------------


def _solve(Q: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``Q z = h`` for a symmetric PSD Q; the minimum-norm solution when Q is (numerically) singular.

    With ``lam = 0`` a support with more atoms than dimensions (or duplicate gradients) makes the Gram
    matrix singular, where a plain solve returns huge, meaningless weights.
    """
    try:
        L = np.linalg.cholesky(Q)
        d = np.diag(L)
        if d.min() > 1e-7 * d.max():  # condition number of Q below ~1e14
            return np.linalg.solve(L.T, np.linalg.solve(L, h))
    except np.linalg.LinAlgError:
        pass
    return np.linalg.lstsq(Q, h, rcond=None)[0]


def _gram_nnls(Q: np.ndarray, h: np.ndarray, w0: np.ndarray | None = None, *, positive: bool = True) -> np.ndarray:
    """Minimise ``1/2 w^T Q w - h^T w`` over ``w >= 0`` (Q symmetric PSD) by Lawson-Hanson active sets.

    ``w0`` (feasible, >= 0) warm-starts the passive set; OMP passes the previous solution with the new
    atom at 0, so a step usually costs one or two small solves. Without ``positive`` it is the plain
    (regularised) least-squares solution ``Q^-1 h``.
    """
    s = h.shape[0]
    if s == 0:
        return np.zeros(0)
    if not positive:
        return _solve(Q, h)
    w = np.zeros(s) if w0 is None else np.maximum(np.asarray(w0, dtype=np.float64), 0.0)
    passive = w > 0
    scale = max(float(np.max(np.abs(h))), float(np.max(np.abs(Q))) * max(1.0, float(np.sum(w))), 1e-300)
    tol = 1e-12 * scale

    def inner(w, passive):
        # solve on the passive set; walk back to feasibility while some coordinate would go <= 0
        for _ in range(s + 1):
            idx = np.flatnonzero(passive)
            z = np.zeros(s)
            if idx.size:
                z[idx] = _solve(Q[np.ix_(idx, idx)], h[idx])
            if idx.size == 0 or np.all(z[idx] > 0):
                return z, passive
            neg = idx[z[idx] <= 0]
            step = w[neg] / np.maximum(w[neg] - z[neg], 1e-300)
            alpha = float(np.min(step))
            w = w + alpha * (z - w)
            passive = passive & (w > 0)
            passive[neg[step <= alpha]] = False  # the blocking coordinates leave exactly
            w = np.where(passive, w, 0.0)
        return w, passive

    if passive.any():
        w, passive = inner(w, passive)
    for _ in range(3 * s + 10):
        d = h - Q @ w  # minus the gradient; KKT: d <= 0 off the passive set
        cand = (~passive) & (d > tol)
        if not cand.any():
            break
        t = int(np.argmax(np.where(cand, d, -np.inf)))
        passive = passive.copy()
        passive[t] = True
        w, passive = inner(w, passive)
    return w


def nonneg_ridge(atoms, target, *, lam: float = 0.0, positive: bool = True):
    """Weights ``w`` minimising ``||target - sum_j w_j atoms[j]||^2 + lam ||w||^2`` subject to ``w >= 0``.

    The refit GradMatch's OMP runs on its support at every step, exposed for testing and reuse: an
    active-set (Lawson-Hanson) solver on the Gram form, in float64 on the host (the problem is s x s for
    s atoms). With ``positive=False`` it is ridge regression, ``(A A^T + lam I)^-1 A target``.

    For a fixed set of atoms, ``||w||`` is non-increasing in ``lam`` (with or without the sign
    constraint); for orthogonal atoms ``w_j = max(0, a_j . target) / (||a_j||^2 + lam)``.

    atoms : (s, d) real floating array (rows are the atoms). target : (d,) in the same namespace and dtype.
    Returns (s,) weights in the namespace, device and dtype of ``atoms``.
    """
    xp = namespace(atoms, target, names=("atoms", "target"))
    check_float_matrix(xp, atoms, "atoms")
    if target.ndim != 1 or target.shape[0] != atoms.shape[1]:
        raise ValueError(f"target must be 1-D of length {atoms.shape[1]} (atoms' columns), got shape "
                         f"{tuple(target.shape)}")
    if target.dtype != atoms.dtype:
        raise TypeError(f"target dtype {target.dtype} differs from atoms dtype {atoms.dtype}")
    if not bool(xp.all(xp.isfinite(target))):
        raise ValueError("target contains NaN or infinite values")
    lam = check_real(lam, "lam", low=0.0)
    positive = check_bool(positive, "positive")
    A = np.asarray(to_numpy(atoms), dtype=np.float64)
    b = np.asarray(to_numpy(target), dtype=np.float64)
    Q = A @ A.T + lam * np.eye(A.shape[0])
    w = _gram_nnls(Q, A @ b, positive=positive)
    return xp.astype(from_numpy(w, xp, device_of(atoms)), atoms.dtype)


# ------------------------------------------------------------------------------------------------
# OMP on one problem
# ------------------------------------------------------------------------------------------------


def _omp(xp, A, b, k: int, lam: float, tol: float, positive: bool):
    """Regularised (non-negative) OMP of target ``b`` (d,) with atoms ``A`` (n, d), at most k picks.

    Returns host arrays (local picks, weights, gains) and the explained amount ``||b||^2 - J``.
    """
    n = A.shape[0]
    dev = device_of(A)
    bnorm2 = float(to_numpy(xp.sum(b * b)))
    J = bnorm2
    support: list[int] = []  # the active picks, in pick order
    gains: list[float] = []
    w = np.zeros(0)
    G = np.zeros((0, 0))
    h = np.zeros(0)
    r = b
    avail = xp.ones((n,), dtype=xp.bool, device=dev)
    pos = xp.arange(n, device=dev)
    neg_inf = xp.asarray(-math.inf, dtype=A.dtype, device=dev)
    tried = 0
    while len(support) < k and tried < n:
        rnorm2 = float(to_numpy(xp.sum(r * r)))
        if bnorm2 == 0.0 or math.sqrt(max(rnorm2, 0.0)) <= tol * math.sqrt(bnorm2):
            break
        c = xp.matmul(A, r)
        score = c if positive else xp.abs(c)
        score = xp.where(avail, score, neg_inf)
        j = int(to_numpy(xp.argmax(score)))
        if not float(to_numpy(score[j])) > 0.0:
            break  # no remaining atom can lower the error with a positive weight
        tried += 1
        avail = xp.where(pos == j, xp.zeros_like(avail), avail)
        a_j = A[j, ...]
        s = len(support)
        if s:
            S = xp.take(A, from_numpy(np.asarray(support, dtype=np.int64), xp, dev), axis=0)
            col = np.asarray(to_numpy(xp.matmul(S, a_j)), dtype=np.float64)
        else:
            col = np.zeros(0)
        G2 = np.empty((s + 1, s + 1))
        G2[:s, :s] = G
        G2[:s, s] = col
        G2[s, :s] = col
        G2[s, s] = float(to_numpy(xp.sum(a_j * a_j)))
        G = G2
        h = np.append(h, float(to_numpy(xp.sum(a_j * b))))
        support.append(j)
        gains.append(0.0)
        w = _gram_nnls(G + lam * np.eye(s + 1), h, np.append(w, 0.0), positive=positive)
        # a pick whose refit weight is 0 retires for good: it leaves the support and is never picked
        # again, so the support grows by at most one per step and ends with k weighted examples
        live = w > 0 if positive else w != 0
        if not live.all():
            keep = np.flatnonzero(live)
            support = [support[i] for i in keep]
            gains = [gains[i] for i in keep]
            w, G, h = w[keep], G[np.ix_(keep, keep)], h[keep]
        if support:
            S = xp.take(A, from_numpy(np.asarray(support, dtype=np.int64), xp, dev), axis=0)
            r = b - xp.matmul(xp.astype(from_numpy(w, xp, dev), A.dtype), S)
        else:
            r = b
        J_new = float(to_numpy(xp.sum(r * r))) + lam * float(w @ w)
        if live[-1]:
            gains[-1] = J - J_new
        J = J_new
    return np.asarray(support, dtype=np.int64), w, np.asarray(gains, dtype=np.float64), bnorm2 - J


def gradmatch(
    gradients,
    k,
    *,
    labels=None,
    lam: float = 0.5,
    tol: float = 1e-6,
    per_batch=None,
    positive: bool = True,
    target=None,
) -> Selection:
    """GradMatch: a weighted subset whose weighted gradient sum matches the full gradient sum.

    For each problem (each class when ``labels`` is given, else the whole set) with target
    ``b = sum_i g_i`` (the sum of the problem's gradients), orthogonal matching pursuit greedily builds a
    support S of at most ``k_c`` examples minimising the regularised matching error

        J(w) = ||b - sum_{j in S} w_j g_j||^2 + lam ||w||^2,   w >= 0.

    Each step adds the example whose gradient has the largest positive correlation ``g_j . r`` with
    the residual ``r = b - sum_S w_j g_j`` (the steepest descent coordinate of J; ``|g_j . r|`` when
    ``positive=False``), then refits all weights of the support by non-negative regularised least
    squares (:func:`nonneg_ridge`, warm-started). ``J`` never increases along the steps (the previous
    weights stay feasible), so with ``lam = 0`` the residual norm never increases. An example whose
    refit weight drops to 0 leaves the support for good (the support grows by at most one per step),
    so the budget is filled with examples that carry weight. It stops when ``k_c`` examples are in the
    support, when ``||r|| <= tol * ||b||``, or when no remaining example correlates positively with the
    residual.

    Parameters
    ----------
    gradients : (n, d) real floating array, e.g. :func:`crestcore.last_layer_gradients` (with
        embeddings: the last linear layer's gradient) of the training set at the current model.
    k : budget, ``1 <= k <= n`` examples (``1 <= k <= #batches`` batches with ``per_batch``).
    labels : optional (n,) integer array: one problem per class, class c getting the Hamilton share of
        k proportional to its size (as in :func:`crestcore.facility_location`), matching that class's
        gradient sum. Cannot be combined with ``per_batch``.
    lam : L2 regularisation (>= 0, default 0.5). It shrinks the weights: for a fixed support ``||w||``
        is non-increasing in lam, and for orthogonal gradients ``w_j = (g_j . b)_+ / (||g_j||^2 + lam)``.
        It is on the scale of ``||g||^2``.
    tol : relative stopping tolerance (>= 0) on the residual, ``||r|| <= tol ||b||``. 0 never stops early
        (except when no example correlates positively with the residual).
    per_batch : optional (n,) integer array assigning every example to a mini-batch (any integer ids).
        The per-batch variant: the atoms are the batches' gradient sums, the target the sum of all, and k
        counts batches. Every example of a selected batch is returned, with its batch's weight and gain.
    positive : non-negative weights (default, GradMatch); False allows any sign.
    target : optional (d,) array, same namespace and dtype: the vector to match instead of the sum of
        all gradients (e.g. a validation gradient sum, GradMatch's validation variant). Not with
        ``labels`` (each class matches its own sum).

    Returns
    -------
    Selection in the namespace, device and dtype of ``gradients``:
    ``indices`` the support per problem (classes in ascending label order), each in pick order (with
    ``per_batch``: the selected batches in pick order, each batch's examples ascending); there are
    fewer than k picks only when the tolerance or the lack of positively correlated examples stopped it
    first. ``weights`` the fitted w (sum semantics: ``sum_S w_j g_j``
    approximates ``sum_i g_i``; when a class's gradients form tight clusters they approach the cluster
    sizes, but in general they need not sum to the class size). ``gains`` the decrease of J at
    the step the pick was added (so they sum to the objective unless a pick retired on the way). ``objective`` the explained amount ``sum_c (||b_c||^2 - J_c)`` at the
    end (the final regularised error of class c is ``||b_c||^2`` minus its share).
    """
    xp = namespace(gradients, labels, per_batch, target, names=("gradients", "labels", "per_batch", "target"))
    check_float_matrix(xp, gradients, "gradients")
    n = gradients.shape[0]
    if target is not None:
        if labels is not None:
            raise ValueError("target cannot be combined with labels (each class matches its own gradient sum)")
        if target.ndim != 1 or target.shape[0] != gradients.shape[1]:
            raise ValueError(f"target must be 1-D of length {gradients.shape[1]} (gradients' columns), "
                             f"got shape {tuple(target.shape)}")
        if target.dtype != gradients.dtype:
            raise TypeError(f"target dtype {target.dtype} differs from gradients dtype {gradients.dtype}")
        if not bool(xp.all(xp.isfinite(target))):
            raise ValueError("target contains NaN or infinite values")
    lam = check_real(lam, "lam", low=0.0)
    tol = check_real(tol, "tol", low=0.0)
    positive = check_bool(positive, "positive")
    if labels is not None and per_batch is not None:
        raise ValueError("labels and per_batch cannot be combined (the per-batch variant matches the "
                         "whole gradient sum with batches)")
    dev = device_of(gradients)
    in_dtype = gradients.dtype
    # numerics policy (docs/selection.md): compute in >= float32; gradients (and target) whose magnitude
    # could overflow or underflow are divided by 2^e, lam by 2^2e (J scales with the square of the
    # gradients, the weights not at all); gains and the objective are scaled back by 2^2e at the end
    gradients, target, _, back = prepare(xp, gradients, metric="sqeuclidean", kernel=None, scale=1.0, Y=target)
    try:
        lam = math.ldexp(lam, -back)
    except OverflowError:
        raise ValueError(
            f"lam={lam!r} is beyond float64 relative to the squared gradients (about 2^{back}): every weight "
            "would underflow to 0; scale lam with the gradients (it is on the scale of ||g||^2)"
        ) from None

    def finish(idx, weights, gains, expl):
        with np.errstate(over="ignore"):  # an overflow becomes inf here and is reported just below
            gains = np.ldexp(np.asarray(gains, dtype=np.float64), back)
            expl = float(np.ldexp(np.float64(expl), back))
        with warnings.catch_warnings():  # an overflowing cast is reported just below
            warnings.simplefilter("ignore", RuntimeWarning)
            sel = host_selection(xp, dev, in_dtype, idx, weights, gains, expl)
        for what, v in (("weights", sel.weights), ("gains", sel.gains), ("objective", sel.objective)):
            if not bool(xp.all(xp.isfinite(v))):
                raise ValueError(f"the {what} of this selection overflow {in_dtype}: pass the gradients in a "
                                 "wider dtype, or divide them by a power of two")
        return sel

    if per_batch is not None:
        batch_h = labels_to_host(xp, per_batch, n, name="per_batch")
        ids, inverse = np.unique(batch_h, return_inverse=True)
        k = check_int(k, "k", low=1, high=int(ids.size))
        members = [np.flatnonzero(inverse == b).astype(np.int64) for b in range(ids.size)]
        atoms = xp.stack([xp.sum(xp.take(gradients, from_numpy(m, xp, dev), axis=0), axis=0) for m in members])
        b = xp.sum(gradients, axis=0) if target is None else target
        sup, w, g, expl = _omp(xp, atoms, b, k, lam, tol, positive)
        if sup.size:
            idx = np.concatenate([members[s] for s in sup])
            reps = np.array([members[s].size for s in sup])
            weights, gains = np.repeat(w, reps), np.repeat(g, reps)
        else:
            idx, weights, gains = np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
        return finish(idx, weights, gains, expl)

    k = check_int(k, "k", low=1, high=n)
    if labels is None:
        problems = [np.arange(n, dtype=np.int64)]
    else:
        lab_h = labels_to_host(xp, labels, n)
        problems = [np.flatnonzero(lab_h == c).astype(np.int64) for c in np.unique(lab_h)]
    budgets = hamilton(k, np.array([p.size for p in problems]))
    out_i, out_w, out_g, total = [], [], [], 0.0
    for members, kc in zip(problems, budgets):
        if kc == 0:
            continue
        A = gradients if labels is None else xp.take(gradients, from_numpy(members, xp, dev), axis=0)
        b = xp.sum(A, axis=0) if target is None else target
        sup, w, g, expl = _omp(xp, A, b, int(kc), lam, tol, positive)
        out_i.append(members[sup])
        out_w.append(w)
        out_g.append(g)
        total += expl
    cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt))
    return finish(cat(out_i, np.int64), cat(out_w, np.float64), cat(out_g, np.float64), total)
