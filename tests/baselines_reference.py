"""REFERENCE implementations of the baselines, frozen as they were before the fast versions (issue #14).

These are verbatim copies of ``crestcore.baselines`` GradMatch (``gradmatch``, ``nonneg_ridge`` and its
Lawson-Hanson refit, a general dense solve at every OMP step, so O(picks^4) per problem), GLISTER
(``glister``, the whole validation state recomputed from ``G_S`` after every pick) and CRAIG (``craig``,
per-class ``facility_location``) taken just before they were rewritten for speed, renamed ``*_reference``.
They are slow on purpose and are NOT part of the library: the tests compare the fast implementations with
them (same picks; weights/gains/objectives equal up to floating-point summation order), and
``benchmarks/baselines.py`` times them side by side with the fast ones ("old" column).

Do not optimise this file: its value is that it is the old code.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from crestcore._compat import device_of, from_numpy, namespace, to_numpy
from crestcore._validation import (
    DivergenceError,
    check_choice,
    check_epsilon,
    check_float_matrix,
    check_int,
    hamilton,
    labels_to_host,
)
from crestcore.baselines._common import check_bool, check_real, epoch_rng, host_selection
from crestcore.baselines._gradmatch import _check_target  # the input checks are the library's; the maths is frozen
from crestcore.facility import Selection, facility_location
from crestcore.similarity import compute_dtype, prepare

__all__ = ["gram_nnls_reference", "nonneg_ridge_reference", "omp_reference", "gradmatch_reference",
           "glister_reference", "craig_reference"]


# ================================================================================================
# GradMatch (copy of crestcore/baselines/_gradmatch.py)
# ================================================================================================

# ------------------------------------------------------------------------------------------------
# the small solver: min ||b - sum_j w_j a_j||^2 + lam ||w||^2  (w >= 0), on the Gram form, host float64
# ------------------------------------------------------------------------------------------------


def _solve_ref(Q: np.ndarray, h: np.ndarray) -> np.ndarray:
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


def gram_nnls_reference(Q: np.ndarray, h: np.ndarray, w0: np.ndarray | None = None, *, positive: bool = True,
                        lam: float = 0.0) -> np.ndarray:
    """Minimise ``1/2 w^T Q w - h^T w`` over ``w >= 0`` (Q symmetric PSD) by Lawson-Hanson active sets.

    ``w0`` (feasible, >= 0) warm-starts the passive set; OMP passes the previous solution with the new
    atom at 0, so a step usually costs one or two small solves. Without ``positive`` it is the plain
    (regularised) least-squares solution ``Q^-1 h``.
    """
    s = h.shape[0]
    if s == 0:
        return np.zeros(0)
    if not positive:
        return _solve_ref(Q, h)
    w = np.zeros(s) if w0 is None else np.maximum(np.asarray(w0, dtype=np.float64), 0.0)
    passive = w > 0
    # the Gram part's scale, lam left out (review 60; the frozen code used max|Q|, lam included, which
    # turned away every atom of gradients below about 1e-6 under lam = 0.5: changed here as in the library)
    gmax = float(np.max(np.diagonal(Q))) - lam
    scale = max(float(np.max(np.abs(h))), gmax * max(1.0, float(np.sum(w))), 1e-300)
    tol = 1e-12 * scale

    def inner(w, passive):
        # solve on the passive set; walk back to feasibility while some coordinate would go <= 0
        for _ in range(s + 1):
            idx = np.flatnonzero(passive)
            z = np.zeros(s)
            if idx.size:
                z[idx] = _solve_ref(Q[np.ix_(idx, idx)], h[idx])
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


def nonneg_ridge_reference(atoms, target, *, lam: float = 0.0, positive: bool = True):
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
    _check_target(xp, target, atoms, "atoms")
    lam = check_real(lam, "lam", low=0.0)
    positive = check_bool(positive, "positive")
    A = np.asarray(to_numpy(atoms), dtype=np.float64)
    b = np.asarray(to_numpy(target), dtype=np.float64)
    Q = A @ A.T + lam * np.eye(A.shape[0])
    w = gram_nnls_reference(Q, A @ b, positive=positive, lam=lam)
    return xp.astype(from_numpy(w, xp, device_of(atoms)), atoms.dtype)


# ------------------------------------------------------------------------------------------------
# OMP on one problem
# ------------------------------------------------------------------------------------------------


def omp_reference(xp, A, b, k: int, lam: float, tol: float, positive: bool):
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
        w = gram_nnls_reference(G + lam * np.eye(s + 1), h, np.append(w, 0.0), positive=positive, lam=lam)
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


def gradmatch_reference(
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
    the step the pick was added (so they sum to the objective unless a pick retired on the way).
    ``objective`` the explained amount ``sum_c (||b_c||^2 - J_c)`` at the end (the final regularised
    error of class c is ``||b_c||^2`` minus its share).
    """
    xp = namespace(gradients, labels, per_batch, target, names=("gradients", "labels", "per_batch", "target"))
    check_float_matrix(xp, gradients, "gradients")
    n = gradients.shape[0]
    if target is not None:
        if labels is not None:
            raise ValueError("target cannot be combined with labels (each class matches its own gradient sum)")
        _check_target(xp, target, gradients, "gradients")
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
        sup, w, g, expl = omp_reference(xp, atoms, b, k, lam, tol, positive)
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
        sup, w, g, expl = omp_reference(xp, A, b, int(kc), lam, tol, positive)
        out_i.append(members[sup])
        out_w.append(w)
        out_g.append(g)
        total += expl
    cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt))
    return finish(cat(out_i, np.int64), cat(out_w, np.float64), cat(out_g, np.float64), total)


# ================================================================================================
# GLISTER (copy of crestcore/baselines/_glister.py)
# ================================================================================================

GLISTER_OPTIMIZERS = ("naive", "stochastic")


def _val_state_ref(xp, val_logits, onehot, E, G_S, eta: float, C: int):
    """Validation logits after the step ``W - eta G_S`` and the gradient of the summed validation loss."""
    if E is None:
        Z = val_logits - eta * G_S[None, :]
    else:
        h = E.shape[1]
        Z = val_logits - eta * xp.matmul(E, xp.matrix_transpose(xp.reshape(G_S, (C, h))))
    z = Z - xp.max(Z, axis=1, keepdims=True)
    e = xp.exp(z)
    P = e / xp.sum(e, axis=1, keepdims=True)
    R = P - onehot
    if E is None:
        gval = xp.sum(R, axis=0)
    else:
        gval = xp.reshape(xp.matmul(xp.matrix_transpose(R), E), (-1,))
    # the per-example losses summed in float64 (the objective's definition since review 28: a float32 sum over a
    # large validation set quantised it)
    loss = xp.sum(xp.astype(xp.log(xp.sum(e, axis=1)) - xp.sum(z * onehot, axis=1), xp.float64))
    return gval, loss


def glister_reference(
    train_grads,
    val_logits,
    val_labels,
    k,
    *,
    val_embeddings=None,
    eta: float = 0.01,
    optimizer: str = "naive",
    epsilon: float = 0.1,
    rng=None,
) -> Selection:
    """GLISTER: pick k training examples whose one SGD step most lowers the validation loss.

    The model is the last layer only, linearised around the current parameters theta (GLISTER's
    one-step Taylor approximation): choosing a set S moves the last layer to
    ``theta_S = theta - eta * sum_{j in S} g_j``, with ``g_j`` the training gradients at theta. With
    ``L_V(theta) = sum_v CE(z_v(theta), y_v)`` the summed validation cross-entropy (minus the validation
    log-likelihood), the gain of adding j to S is the first-order decrease

        gain_j(S) = L_V(theta_S) - L_V(theta_S - eta g_j) + O(eta^2) = eta * g_j . grad L_V(theta_S).

    Greedy adds the best gain (ties: lowest index), then recomputes the validation logits at
    ``theta_S`` (``z_v - eta G_S e_v`` for the last linear layer's weight, ``z_v - eta G_S`` for a bias
    on the logits, where ``G_S = sum_S g_j``) and the validation gradient there; the training gradients
    are not recomputed (that is the approximation).

    Parameters
    ----------
    train_grads : (n, d) real floating array of training gradients at theta. Either ``d = C``: the
        gradient w.r.t. the logits, ``softmax(z) - onehot(y)`` (the last layer is a bias on the logits),
        or ``d = C * h`` with ``val_embeddings`` given: the gradient w.r.t. the last linear layer's
        weight (C, h), flattened row-major, as :func:`crestcore.last_layer_gradients` with
        ``embeddings=`` returns it. To include a bias, append a constant-1 column to the train and
        validation embeddings.
    val_logits : (n_v, C) validation logits at theta, same namespace and dtype.
    val_labels : (n_v,) integer validation labels in [0, C).
    k : budget, ``1 <= k <= n``.
    val_embeddings : optional (n_v, h) penultimate validation features (see ``train_grads``).
    eta : step size of the one-step update (> 0), on the scale of the learning rate for a summed loss.
    optimizer : "naive" (exact greedy: all remaining candidates each step) or "stochastic" (stochastic
        greedy: each step evaluates ``ceil(n / k * ln(1 / epsilon))`` random remaining candidates).
    epsilon : stochastic greedy's parameter in (0, 1).
    rng : int seed or ``numpy.random.Generator``; required by (and only used by) "stochastic".

    Returns
    -------
    Selection in the namespace, device and dtype of ``train_grads``: ``indices`` the picks in greedy
    order; ``weights`` all ``n / k`` (GLISTER trains unweighted; n/k puts the subset on the same
    sum-of-losses scale as the other baselines); ``gains`` the first-order gain of each pick when it was
    made (may be negative: the budget is always filled); ``objective`` the exact decrease of the
    validation loss under the update, ``L_V(theta) - L_V(theta_S)``.
    """
    xp = namespace(train_grads, val_logits, val_labels, val_embeddings,
                   names=("train_grads", "val_logits", "val_labels", "val_embeddings"))
    check_float_matrix(xp, train_grads, "train_grads")
    check_float_matrix(xp, val_logits, "val_logits")
    n, d = train_grads.shape
    n_v, C = val_logits.shape
    if val_logits.dtype != train_grads.dtype:
        raise TypeError(f"val_logits dtype {val_logits.dtype} differs from train_grads dtype {train_grads.dtype}")
    if val_labels.ndim != 1:
        raise ValueError(f"val_labels must be 1-D, got shape {tuple(val_labels.shape)}")
    if val_labels.shape[0] != n_v:
        raise ValueError(f"val_labels has length {val_labels.shape[0]} but val_logits has {n_v} rows")
    if not xp.isdtype(val_labels.dtype, "integral"):
        raise TypeError(f"val_labels must have an integer dtype, got {val_labels.dtype}")
    if bool(xp.any(val_labels < 0)) or bool(xp.any(val_labels >= C)):
        raise ValueError(f"val_labels must lie in [0, {C}) for {C} classes (val_logits has {C} columns)")
    E = val_embeddings
    if E is None:
        if d != C:
            raise ValueError(f"train_grads has {d} columns but val_logits has {C}: without val_embeddings "
                             "the gradients must be w.r.t. the logits (d = C)")
    else:
        check_float_matrix(xp, E, "val_embeddings")
        if E.shape[0] != n_v:
            raise ValueError(f"val_embeddings has {E.shape[0]} rows but val_logits has {n_v}")
        if E.dtype != train_grads.dtype:
            raise TypeError(f"val_embeddings dtype {E.dtype} differs from train_grads dtype {train_grads.dtype}")
        if d != C * E.shape[1]:
            raise ValueError(f"train_grads has {d} columns but C * h = {C} * {E.shape[1]} = {C * E.shape[1]} "
                             "(the flattened last-layer weight gradient)")
    k = check_int(k, "k", low=1, high=n)
    eta = check_real(eta, "eta", low=0.0, low_open=True)
    optimizer = check_choice(optimizer, "optimizer", GLISTER_OPTIMIZERS)
    eps = check_epsilon(epsilon)
    gen = epoch_rng(rng, None) if optimizer == "stochastic" else None

    dev = device_of(train_grads)
    in_dtype = train_grads.dtype
    # numerics policy (docs/selection.md): half precision is computed in float32. No rescaling: the
    # softmax of the updated logits is not scale invariant (eta carries the scale).
    cd = compute_dtype(xp, in_dtype)
    if cd != in_dtype:
        train_grads, val_logits = xp.astype(train_grads, cd), xp.astype(val_logits, cd)
        E = None if E is None else xp.astype(E, cd)
    dt = cd
    onehot = xp.astype(val_labels[:, None] == xp.arange(C, device=dev)[None, :], dt)
    G_S = xp.zeros((d,), dtype=dt, device=dev)
    neg_inf = xp.asarray(-math.inf, dtype=dt, device=dev)
    avail = xp.ones((n,), dtype=xp.bool, device=dev)
    pos = xp.arange(n, device=dev)
    remaining = np.ones(n, dtype=bool)
    s = max(1, math.ceil(n / k * math.log(1.0 / eps)))
    picks: list[int] = []
    gains: list[float] = []
    gval, loss0 = _val_state_ref(xp, val_logits, onehot, E, G_S, eta, C)
    for _ in range(k):
        if gen is None:
            g = eta * xp.matmul(train_grads, gval)
            j = int(to_numpy(xp.argmax(xp.where(avail, g, neg_inf))))
            gj = float(to_numpy(g[j]))
        else:
            rem = np.flatnonzero(remaining)
            cand = np.sort(gen.choice(rem, size=min(s, rem.size), replace=False)).astype(np.int64)
            g = eta * xp.matmul(xp.take(train_grads, from_numpy(cand, xp, dev), axis=0), gval)
            loc = int(to_numpy(xp.argmax(g)))
            j, gj = int(cand[loc]), float(to_numpy(g[loc]))
        picks.append(j)
        gains.append(gj)
        remaining[j] = False
        avail = xp.where(pos == j, xp.zeros_like(avail), avail)
        G_S = G_S + train_grads[j, ...]
        gval, loss = _val_state_ref(xp, val_logits, onehot, E, G_S, eta, C)
    objective = float(to_numpy(loss0)) - float(to_numpy(loss))
    sel = host_selection(xp, dev, in_dtype, np.asarray(picks, dtype=np.int64), np.full(k, n / k),
                         np.asarray(gains), objective)
    for what, v in (("weights", sel.weights), ("gains", sel.gains), ("objective", sel.objective)):
        if not bool(xp.all(xp.isfinite(v))):
            raise DivergenceError(
                f"glister: the {what} are not finite in {in_dtype} (exploding gradients or logits, or values "
                "beyond the dtype's range): lower eta, or pass the inputs in a wider dtype"
            )
    return sel


# ================================================================================================
# CRAIG (copy of crestcore/baselines/_craig.py, docstring shortened)
# ================================================================================================


def craig_reference(gradients, labels, k, *, metric="euclidean", kernel="max-minus", optimizer="lazy",
                    epsilon=0.1, rng=None, scale=None, max_dense_bytes=None, backend="auto"):
    """CRAIG as it was: exactly ``facility_location(gradients, k, labels=labels, ...)`` (its own input checks,
    which only renamed facility_location's errors, left out: the maths is what is frozen)."""
    return facility_location(
        gradients, k, labels=labels, metric=metric, kernel=kernel, optimizer=optimizer,
        epsilon=epsilon, rng=rng, scale=scale, max_dense_bytes=max_dense_bytes, backend=backend,
    )
