"""GLISTER (Killamsetty et al., AAAI 2021): greedy validation log-likelihood, one-step Taylor model."""

from __future__ import annotations

import math

import numpy as np

from .._compat import device_of, from_numpy, is_numpy_namespace, namespace, take_rows, to_numpy, wide_float
from .._validation import DivergenceError, check_choice, check_epsilon, check_float_matrix, check_int, check_labels
from ..similarity import compute_dtype
from ..facility import Selection
from ._common import check_real, epoch_rng, host_selection, set_row

OPTIMIZERS = ("naive", "stochastic")


def _val_state(xp, val_logits, onehot, E, G_S, eta: float, C: int):
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
    # summed in the widest float (the objective is the difference of two such sums: in float32 over 100,000
    # validation examples it came out 3.5 where float64 gave 3.51223)
    per_example = xp.log(xp.sum(e, axis=1)) - xp.sum(z * onehot, axis=1)
    loss = xp.sum(xp.astype(per_example, wide_float(xp)))
    return gval, loss


def _val_grad_T(xp, ZT, onehotT, E):
    """Gradient of the summed validation loss w.r.t. the last layer, from logits laid out class-major.

    ``ZT`` is (C, n_v): the reductions over the classes then run along the leading axis, element-wise over
    the n_v contiguous columns, instead of over rows of C values each (several times slower in NumPy).
    """
    ZT = ZT - xp.max(ZT, axis=0, keepdims=True)
    e = xp.exp(ZT)
    R = e / xp.sum(e, axis=0, keepdims=True) - onehotT
    if E is None:
        return xp.sum(R, axis=1)
    return xp.reshape(xp.matmul(R, E), (-1,))


class _HostValGrad:
    """:func:`_val_grad_T` for NumPy input, in preallocated buffers: the same operations on the same
    values (so the same results, bit for bit), without a fresh (C, n_v) temporary per operation.

    ``logits(G_S)`` writes the validation logits at ``theta_S`` into the scratch buffer, ``grad()`` turns
    them into the validation gradient (overwriting the buffer, and the gradient of the previous call).
    """

    def __init__(self, Z0T, onehotT, E, ET, eta: float):
        C, n_v = Z0T.shape
        dt = Z0T.dtype
        self.Z0T, self.E, self.ET, self.eta = Z0T, E, ET, eta
        self.onehotT = np.ascontiguousarray(onehotT)  # a contiguous copy of the transposed view
        self.buf = np.empty((C, n_v), dtype=dt)
        self.col = np.empty((1, n_v), dtype=dt)  # per validation example: the max, then the sum
        self.M = None if E is None else np.empty((C, E.shape[1]), dtype=dt)
        self.out = None if E is None else np.empty((C, E.shape[1]), dtype=dt)

    def logits(self, G_S) -> None:
        """``Z0T - eta * G_S[:, None]`` (bias on the logits) or ``Z0T - (eta * G_S as (C, h)) @ ET``."""
        M = self.M
        if M is None:
            np.subtract(self.Z0T, self.eta * G_S[:, None], out=self.buf)
        else:
            np.multiply(self.eta, G_S.reshape(M.shape), out=M)  # eta on the small factor
            np.subtract(self.Z0T, np.matmul(M, self.ET), out=self.buf)

    def grad(self, ZT=None):
        """The validation gradient from the logits in the buffer (or from ``ZT``, left untouched)."""
        buf, col = self.buf, self.col
        np.max(buf if ZT is None else ZT, axis=0, keepdims=True, out=col)
        np.subtract(buf if ZT is None else ZT, col, out=buf)
        np.exp(buf, out=buf)
        np.sum(buf, axis=0, keepdims=True, out=col)
        np.divide(buf, col, out=buf)
        np.subtract(buf, self.onehotT, out=buf)
        if self.E is None:
            return np.sum(buf, axis=1)
        return np.matmul(buf, self.E, out=self.out).reshape(-1)


def _kth_remaining(removed_sorted: np.ndarray, pos: np.ndarray, ranks: np.ndarray | None = None) -> np.ndarray:
    """The ``pos``-th (0-based) indices not in ``removed_sorted`` (ascending distinct ints), vectorised.

    The m-th removed index has ``removed[m] - m`` kept indices below it, so the answer to position p is
    ``p`` plus the number of removed indices with ``removed[m] - m <= p``. ``ranks``: ``0..size-1``
    when the caller keeps it (a loop over picks need not make it afresh).
    """
    below = removed_sorted - (np.arange(removed_sorted.size) if ranks is None else ranks)
    return pos + np.searchsorted(below, pos, side="right")


def glister(
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

    Greedy adds the best gain (ties in the computed gains: lowest index; the gains come from one
    matrix-vector product, whose BLAS may round bit-identical rows an ulp apart, so a later duplicate
    example can win), then recomputes the validation logits at
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
    rng : int seed or ``numpy.random.Generator``; required by (and only used by) "stochastic" (checked
        with any optimizer, as :func:`crestcore.facility_location` does).

    Returns
    -------
    Selection in the namespace, device and dtype of ``train_grads``: ``indices`` the picks in greedy
    order; ``weights`` all ``n / k`` (GLISTER trains unweighted; n/k puts the subset on the same
    sum-of-losses scale as the other baselines); ``gains`` the first-order gain of each pick when it was
    made (may be negative: the budget is always filled); ``objective`` the exact decrease of the
    validation loss under the update, ``L_V(theta) - L_V(theta_S)``.

    Examples
    --------
    Six training examples of two classes and a validation set where three of four examples are of
    class 0, two of them scored as class 1. The gradients are w.r.t. the logits (a bias on the logits);
    greedy picks the class-0 examples whose step raises the class-0 logit most:

    >>> import numpy as np
    >>> from crestcore import last_layer_gradients
    >>> from crestcore.baselines import glister
    >>> logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0], [1.0, 0.0], [1.0, 1.0]])
    >>> labels = np.array([0, 0, 0, 1, 1, 1])
    >>> grads = last_layer_gradients(logits, labels)  # softmax(z) - onehot(y), (6, 2)
    >>> val_logits = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    >>> val_labels = np.array([0, 0, 0, 1])
    >>> sel = glister(grads, val_logits, val_labels, 2, eta=0.1)
    >>> sel.indices, sel.weights  # weights n / k
    (array([1, 2]), array([3., 3.]))
    >>> np.round(sel.gains, 4), round(float(sel.objective), 4)  # the validation loss drops
    (array([0.2138, 0.1345]), 0.3357)
    """
    xp = namespace(train_grads, val_logits, val_labels, val_embeddings,
                   names=("train_grads", "val_logits", "val_labels", "val_embeddings"))
    check_float_matrix(xp, train_grads, "train_grads")
    check_float_matrix(xp, val_logits, "val_logits")
    n, d = train_grads.shape
    n_v, C = val_logits.shape
    if val_logits.dtype != train_grads.dtype:
        raise TypeError(f"val_logits dtype {val_logits.dtype} differs from train_grads dtype {train_grads.dtype}")
    val_labels = check_labels(xp, val_labels, n_v, "val_labels", of="val_logits", classes=C)
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
    optimizer = check_choice(optimizer, "optimizer", OPTIMIZERS)
    eps = check_epsilon(epsilon)
    gen = epoch_rng(rng, None) if optimizer == "stochastic" or rng is not None else None  # a bad rng is refused
    if optimizer != "stochastic":  # anyway (as facility_location does); only stochastic draws from it
        gen = None

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
    onehotT = xp.matrix_transpose(onehot)
    G_S = xp.zeros((d,), dtype=dt, device=dev)
    neg_inf = xp.asarray(-math.inf, dtype=dt, device=dev)
    avail = xp.ones((n,), dtype=xp.bool, device=dev)
    removed = np.zeros(0, dtype=np.int64)  # the picks, ascending (stochastic: maps draws to candidates)
    s = max(1, math.ceil(n / k * math.log(1.0 / eps)))
    picks: list[int] = []
    gains: list[float] = []
    # The state after each pick: the validation logits at theta_S, laid out (C, n_v), rebuilt from
    # G_S = sum_S g_j (a C x h by h x n_v product, the same cost as adding the new pick's own change,
    # and free of rounding accumulated over the picks), and the validation gradient there. The loss is
    # only needed at the start and at the end (the objective). Z0T is made contiguous (a bare transpose
    # would keep NumPy's results column-major, and the class reductions slow); 0 + z is exact.
    Z0T = xp.zeros((C, n_v), dtype=dt, device=dev) + xp.matrix_transpose(val_logits)
    # E^T as its own contiguous array: NumPy's BLAS call on a transposed view ran 2x slower here
    ET = None if E is None else xp.zeros((E.shape[1], n_v), dtype=dt, device=dev) + xp.matrix_transpose(E)
    _, loss0 = _val_state(xp, val_logits, onehot, E, G_S, eta, C)
    host = is_numpy_namespace(xp)
    if host:
        vg = _HostValGrad(Z0T, onehotT, E, ET, eta)
        gval = vg.grad(Z0T)
        removed = np.zeros(min(k, n), dtype=np.int64)  # the picks, ascending, in removed[:t]
        steps = np.arange(min(k, n), dtype=np.int64)
    else:
        gval = _val_grad_T(xp, Z0T, onehotT, E)
    for t in range(k):
        if gen is None:
            g = eta * xp.matmul(train_grads, gval)
            j = int(to_numpy(xp.argmax(xp.where(avail, g, neg_inf))))
            gj = float(to_numpy(g[j]))
            avail = set_row(xp, avail, j, False)
        elif host:  # the same as below, without the wrappers and with removed kept in place
            pos = gen.choice(n - t, size=min(s, n - t), replace=False)
            done = removed[:t]
            cand = _kth_remaining(done, pos.astype(np.int64, copy=False), steps[:t])
            cand.sort()
            g = eta * np.matmul(take_rows(np, train_grads, cand), gval)
            loc = int(g.argmax())
            j, gj = int(cand[loc]), float(g[loc])
            at = int(done.searchsorted(j))
            removed[at + 1 : t + 1] = removed[at:t]  # NumPy copies overlapping slices safely
            removed[at] = j
        else:
            # the same draw as gen.choice(np.flatnonzero(remaining), ...): positions among the remaining
            pos = gen.choice(n - t, size=min(s, n - t), replace=False)
            cand = np.sort(_kth_remaining(removed, np.asarray(pos, dtype=np.int64))).astype(np.int64)
            g = eta * xp.matmul(take_rows(xp, train_grads, from_numpy(cand, xp, dev)), gval)
            loc = int(to_numpy(xp.argmax(g)))
            j, gj = int(cand[loc]), float(to_numpy(g[loc]))
            removed = np.insert(removed, int(np.searchsorted(removed, j)), j)
        picks.append(j)
        gains.append(gj)
        if host:
            G_S += train_grads[j, ...]  # G_S is this function's own array
            if t + 1 < k:
                vg.logits(G_S)
                gval = vg.grad()
            continue
        G_S = G_S + train_grads[j, ...]
        if t + 1 < k:
            if E is None:
                ZT = Z0T - eta * G_S[:, None]
            else:
                ZT = Z0T - xp.matmul(eta * xp.reshape(G_S, (C, E.shape[1])), ET)  # eta on the small factor
            gval = _val_grad_T(xp, ZT, onehotT, E)
    _, loss = _val_state(xp, val_logits, onehot, E, G_S, eta, C)
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
