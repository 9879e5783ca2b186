"""GradMatch (Killamsetty et al., ICML 2021): gradient matching by regularised non-negative OMP."""

from __future__ import annotations

import math

import numpy as np

from .._compat import device_of, float_errors_quiet, from_numpy, is_numpy_namespace, namespace, take_rows, to_numpy
from ..similarity import prepare, restore
from .._validation import check_class_budgets, check_float_matrix, check_int, hamilton, labels_to_host
from ..facility import Selection, _problems_from_labels
from ._common import check_bool, check_real, host_selection, set_row


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


class _GramInverse:
    """``inv(Q[order, order])`` for a changing index set, kept up to date in O(s^2) per index in or out.

    Lawson-Hanson solves on passive sets that differ from the previous one by an index or two, and OMP
    grows its support by one atom per step; re-factoring the s x s system each time made GradMatch cost
    O(picks^4). Here an index joins by bordering (the Schur complement ``delta = Q_aa - q^T u`` with
    ``u = inv q`` is the square of the Cholesky pivot it would get; the solution grows in O(s) from the
    previous one) and leaves by the reverse formula ``inv' = inv_rest - b b^T / c``. The last solution is
    remembered, so the warm start's re-solve of an unchanged set is free. Every new solution is accepted
    only when the residual of ``Q z = h`` is at the level of a backward-stable solve (after one step of
    iterative refinement if needed); otherwise (an ill-conditioned or singular system, or error
    accumulated over many updates) that solve is done by :func:`_solve` on the submatrix, exactly as
    before, and the inverse is rebuilt from scratch.

    The cache assumes that ``Q[order, order]`` does not change while it is in use (true within one
    refit, and in OMP, whose Gram matrix only grows).
    """

    # accept z when ||Q z - h||_inf <= RTOL * (s ||Q||_max ||z||_inf + ||h||_inf): a few units of
    # float64 rounding, what a backward-stable solve (and one refinement step from a decent inverse)
    # reaches; the solution then differs from a Cholesky solve's by about cond(Q) * 1e-16
    RTOL = 1e-15

    # bordering updates are kept as a low-rank term and folded into the dense inverse every FOLD adds
    FOLD = 32

    def __init__(self):
        self.order = np.zeros(0, dtype=np.int64)  # indices of Q, in the order they joined
        self.ascending = True  # whether ``order`` is ascending (kept up to date by every change)
        # inv(Q[order, order]) = B (padded with zeros to the current size) + X diag(dx) X^T
        self.B = np.zeros((0, 0))
        self.X = np.zeros((0, self.FOLD))  # columns [u; -1] of the adds since the last fold, zero-padded
        self.dx = np.zeros(0)
        self.ok = True  # False: the inverse is not usable (singular set); solve by _solve until rebuilt
        self.z = None  # the last accepted solution on ``order`` (factor order) and the h it solved
        self.hz = None

    def remap(self, keep: np.ndarray) -> None:
        """The caller kept rows/columns ``keep`` of Q (ascending): drop the others, renumber the rest."""
        mark = np.zeros(int(max(keep.max(initial=-1), self.order.max(initial=-1))) + 1, dtype=bool)
        mark[keep] = True
        for p in np.flatnonzero(~mark[self.order])[::-1]:
            self._drop(int(p))
        new = np.cumsum(mark) - 1
        self.order = new[self.order]

    def apply(self, v: np.ndarray) -> np.ndarray:
        """``inv(Q[order, order]) @ v``."""
        s, sb, t = self.order.size, self.B.shape[0], self.dx.size
        y = np.zeros(s)
        np.matmul(self.B, v[:sb], out=y[:sb])
        if t:
            X = self.X[:s, :t]
            y += X @ (self.dx * (v @ X))
        return y

    def _fold(self) -> None:
        s, sb, t = self.order.size, self.B.shape[0], self.dx.size
        if sb == s and t == 0:
            return
        B = np.zeros((s, s))
        B[:sb, :sb] = self.B
        if t:
            X = self.X[:s, :t]
            B += (X * self.dx) @ X.T
        self.B, self.dx = B, np.zeros(0)
        self.X = np.zeros((max(s, 16), self.FOLD))

    def _drop(self, p: int) -> None:
        self.z = None
        if not self.ok:
            self.order = np.delete(self.order, p)
            self._recheck_order()
            return
        self._fold()
        c = self.B[p, p]
        rest = np.r_[0:p, p + 1 : self.order.size]
        bcol = self.B[rest, p]
        B = self.B[np.ix_(rest, rest)]
        if c > 0.0:
            B -= np.outer(bcol, bcol / c)
        else:
            self.ok = False
        self.B = B
        self.order = self.order[rest]
        self._recheck_order()

    def _recheck_order(self) -> None:
        # a drop keeps an ascending order ascending, and may make another one so
        if not self.ascending:
            o = self.order
            self.ascending = bool(np.all(o[1:] > o[:-1]))

    def _add(self, Q: np.ndarray, a: int, floor: float):
        o = self.order
        s = o.size
        if self.ok:
            q = Q[o, a]
            u = self.apply(q)
            delta = Q[a, a] - q @ u
            if not delta > floor:  # (numerically) not positive definite: leave it to _solve
                self.ok = False
        if not self.ok:  # nothing to update: the next solve rebuilds
            self.ascending = self.ascending and (s == 0 or a > o[-1])
            self.order = np.concatenate((o, (a,)))
            return None, None, None
        # the bordered inverse is pad(inv) + x x^T / delta with x = [u; -1]
        if self.dx.size == self.FOLD:
            self._fold()
        self.ascending = self.ascending and (s == 0 or a > o[-1])
        self.order = np.concatenate((o, (a,)))
        if self.X.shape[0] < s + 1:
            X = np.zeros((max(2 * (s + 1), 16), self.FOLD))
            X[: self.X.shape[0]] = self.X
            self.X = X
        t = self.dx.size
        self.X[:s, t] = u
        self.X[s, t] = -1.0
        self.dx = np.concatenate((self.dx, (1.0 / delta,)))
        return q, u, delta

    def _rebuild(self, Q: np.ndarray, idx: np.ndarray) -> None:
        self.order = idx.copy()
        self.ascending = bool(np.all(idx[1:] > idx[:-1]))
        self.ok = False
        self.B, self.dx, self.X = np.zeros((idx.size, idx.size)), np.zeros(0), np.zeros((max(idx.size, 16), self.FOLD))
        if idx.size:
            try:
                L = np.linalg.cholesky(Q[np.ix_(idx, idx)])
            except np.linalg.LinAlgError:
                return
            d = np.diag(L)
            if d.min() > 1e-7 * d.max():  # the condition _solve uses
                Li = np.linalg.inv(L)
                self.B = Li.T @ Li
                self.ok = True

    def _accept(self, Qs, hs, z, qmax) -> bool:
        zmax = float(np.abs(z).max())  # NaN or inf exactly when some entry of z is not finite
        if not math.isfinite(zmax):
            return False
        res = hs - Qs @ z
        bound = self.RTOL * (hs.size * qmax * zmax + float(np.abs(hs).max()))
        return float(np.abs(res).max()) <= bound

    def prefix_solution(self, m: int, h: np.ndarray) -> np.ndarray | None:
        """The remembered solution when the set is ``0..m-1`` in that order and it solved ``h[:m]``
        (what :meth:`solve` returns for ``idx = arange(m)`` without touching the inverse), else None."""
        o = self.order
        if self.ok and self.z is not None and self.ascending and o.size == m and m and o[-1] == m - 1 \
                and self.hz.shape == (m,) and bool((h[:m] == self.hz).all()):  # np.array_equal(h[o], hz)
            return self.z
        return None

    def grow_last(self, Q: np.ndarray, h: np.ndarray, qmax: float) -> np.ndarray:
        """``solve(Q, h, arange(s), qmax)`` for an (s, s) Q when :meth:`prefix_solution` ``(s - 1, h)``
        returned the solution on ``0..s-2``: index ``s - 1`` joins. The same operations as
        :meth:`solve`, without its bookkeeping of which indices come and go."""
        return self._finish(Q, h, None, qmax, (h.shape[0] - 1,), self.z)

    def solve(self, Q: np.ndarray, h: np.ndarray, idx: np.ndarray, qmax: float) -> np.ndarray:
        """``Q[idx, idx] z = h[idx]`` (idx ascending, non-empty); z in the order of idx.

        ``qmax`` is ``max |Q[idx, idx]|`` or an upper bound of it.
        """
        mark = np.zeros(Q.shape[0], dtype=bool)
        mark[idx] = True
        o = self.order
        if not mark[o].all():
            for p in np.flatnonzero(~mark[o])[::-1]:
                self._drop(int(p))
            o = self.order
        mark[o] = False
        new = np.flatnonzero(mark)  # ascending
        z_prev = None
        if self.z is not None and self.ok and np.array_equal(h[o], self.hz):
            z_prev = self.z  # the solution on the current set: grow it, or return it
        return self._finish(Q, h, idx, qmax, new, z_prev)

    def _finish(self, Q, h, idx, qmax, new, z_prev) -> np.ndarray:
        """:meth:`solve` once the indices to drop have left: add ``new`` (ascending) to the set, grow
        ``z_prev`` (the solution on the set before, or None) or solve afresh, check, fall back.
        ``idx`` None stands for all of Q's indices."""
        if len(new):
            diag = Q.diagonal() if idx is None else Q.diagonal()[idx]
            floor = 1e-14 * float(diag.max())  # a pivot below 1e-7 x the largest: singular
            for a in new:
                q, u, delta = self._add(Q, int(a), floor)
                if z_prev is not None and self.ok:
                    gamma = (h[a] - q @ z_prev) / delta
                    z_prev = np.concatenate((z_prev - gamma * u, (gamma,)))
                else:
                    z_prev = None
            fresh = True
        else:
            fresh = False
        o = self.order
        natural = self.ascending  # the factor order is idx's
        hs = h[o]
        if self.ok:
            if z_prev is not None and not fresh:
                return z_prev if natural else z_prev[np.argsort(o)]
            contiguous = natural and o[-1] == o.size - 1
            Qs = Q[: o.size, : o.size] if contiguous else Q[np.ix_(o, o)]
            z = self.apply(hs) if z_prev is None else z_prev
            good = self._accept(Qs, hs, z, qmax)
            if not good:  # one step of iterative refinement
                z = z + self.apply(hs - Qs @ z)
                good = self._accept(Qs, hs, z, qmax)
            if good:
                self.z, self.hz = z, hs
                return z if natural else z[np.argsort(o)]
        # the slow, exact path of old: factor (or least squares) from scratch, and start the inverse anew
        if idx is None:
            idx = np.arange(Q.shape[0])
        z = _solve(Q[np.ix_(idx, idx)], h[idx])
        self._rebuild(Q, idx)
        self.z, self.hz = (z, h[idx]) if self.ok else (None, None)
        return z


def _gram_nnls(Q: np.ndarray, h: np.ndarray, w0: np.ndarray | None = None, *, positive: bool = True,
               cache: _GramInverse | None = None, qmax: float | None = None, lam: float = 0.0) -> np.ndarray:
    """Minimise ``1/2 w^T Q w - h^T w`` over ``w >= 0`` (Q symmetric PSD) by Lawson-Hanson active sets.

    ``w0`` (feasible, >= 0) warm-starts the passive set; OMP passes the previous solution with the new
    atom at 0, so a step usually costs one solve, on the previous passive set plus the new atom. The
    solves go through ``cache`` (a :class:`_GramInverse` the caller may keep across calls on a growing
    Q), so each costs O(s^2) instead of a fresh O(s^3) factorisation. ``qmax`` is ``max |Q|`` when the
    caller knows it. ``lam``: the ridge term on Q's diagonal (``Q = G + lam I``, G a Gram matrix). Without
    ``positive`` it is the plain (regularised) least-squares solution ``Q^-1 h``.

    The optimality test off the passive set, ``h_t - Q_t w > tol``, has ``tol`` at the rounding level of
    its products: ``1e-12 * max(|h|, max|G| * max(1, sum w))``. The ridge term is left out of that scale:
    off the diagonal Q is G, so lam enters none of those products (with it, ``tol >= 1e-12 * lam``
    turned away every atom of gradients below about 1e-6 under the default lam = 0.5, and OMP returned
    short or empty selections).
    """
    s = h.shape[0]
    if s == 0:
        return np.zeros(0)
    if cache is None:
        cache = _GramInverse()
    if qmax is None:
        qmax = float(np.max(np.abs(Q)))
    if not positive:
        return cache.solve(Q, h, np.arange(s), qmax)
    w = np.zeros(s) if w0 is None else np.maximum(np.asarray(w0, dtype=np.float64), 0.0)
    passive = w > 0
    gmax = float(Q.diagonal().max()) - lam  # max |G| (G is positive semidefinite: its largest entry is diagonal)
    scale = max(float(np.abs(h).max()), gmax * max(1.0, float(w.sum())), 1e-300)
    tol = 1e-12 * scale

    def inner(w, passive, z=None):
        # solve on the passive set; walk back to feasibility while some coordinate would go <= 0.
        # ``z``: the first solve's result when the caller has it already
        for _ in range(s + 1):
            idx = np.flatnonzero(passive)
            if z is None:
                z = np.zeros(s)
                if idx.size:
                    z[idx] = cache.solve(Q, h, idx, qmax)
            if idx.size == 0 or np.all(z[idx] > 0):
                return z, passive
            neg = idx[z[idx] <= 0]
            step = w[neg] / np.maximum(w[neg] - z[neg], 1e-300)
            alpha = float(np.min(step))
            w = w + alpha * (z - w)
            passive = passive & (w > 0)
            passive[neg[step <= alpha]] = False  # the blocking coordinates leave exactly
            w = np.where(passive, w, 0.0)
            z = None
        return w, passive

    rounds = 3 * s + 10
    # OMP's step: the previous support (all positive) plus a new atom at 0, with the solution on the
    # previous support in the cache. The general path below would take the cached solution, find the
    # new atom the only candidate and grow the inverse by it; this does the same operations on the
    # same values, without the index bookkeeping (most of a step's cost on a large support)
    z1 = None
    if s > 1 and not passive[-1] and np.count_nonzero(passive) == s - 1:
        z1 = cache.prefix_solution(s - 1, h)
        if z1 is not None and not (z1 > 0).all():
            z1 = None
    if z1 is not None:
        w = np.zeros(s)  # the first inner's result
        w[:-1] = z1
        # h[off] - Q[off] @ w for off = [s - 1], the only index off the passive set: the same (1, s) by
        # (s,) product on a view of the row instead of a copy
        d = h[s - 1 : s] - Q[s - 1 : s] @ w
        if not d[0] > tol:
            return w
        z = cache.grow_last(Q, h, qmax)
        if (z > 0).all():
            return z
        passive = np.ones(s, dtype=bool)
        w, passive = inner(w, passive, z)
        rounds -= 1
    elif passive.any():
        w, passive = inner(w, passive)
    for _ in range(rounds):
        off = np.flatnonzero(~passive)
        if off.size == 0:
            break
        d = h[off] - Q[off] @ w  # minus the gradient off the passive set; KKT: d <= 0 there
        if not np.any(d > tol):
            break
        t = int(off[np.argmax(np.where(d > tol, d, -np.inf))])
        passive = passive.copy()
        passive[t] = True
        w, passive = inner(w, passive)
    return w


def _check_target(xp, target, matrix, name: str) -> None:
    """``target`` must be a finite 1-D vector with one entry per column of ``matrix`` (the argument
    ``name``, already checked) and its dtype; the errors name both."""
    if target.ndim != 1 or target.shape[0] != matrix.shape[1]:
        raise ValueError(f"target must be 1-D of length {matrix.shape[1]} ({name}' columns), got shape "
                         f"{tuple(target.shape)}")
    if target.dtype != matrix.dtype:
        raise TypeError(f"target dtype {target.dtype} differs from {name} dtype {matrix.dtype}")
    if not bool(xp.all(xp.isfinite(target))):
        raise ValueError("target contains NaN or infinite values")


def _scaled_lam(lam: float, back: int, what: str = "gradients") -> float:
    """``lam`` on the rescaled data's scale (``2^-back``, the squared rescaling of :func:`prepare`); a ``lam``
    that leaves float64's range there is refused: every weight would underflow to 0."""
    try:
        return math.ldexp(lam, -back)
    except OverflowError:
        raise ValueError(
            f"lam={lam!r} is beyond float64 relative to the squared {what} (about 2^{back}): every weight "
            f"would underflow to 0; scale lam with the {what} (it is on the scale of their squared norms)"
        ) from None


def nonneg_ridge(atoms, target, *, lam: float = 0.0, positive: bool = True):
    """Weights ``w`` minimising ``||target - sum_j w_j atoms[j]||^2 + lam ||w||^2`` subject to ``w >= 0``.

    The refit GradMatch's OMP runs on its support at every step, exposed for testing and reuse: an
    active-set (Lawson-Hanson) solver on the Gram form, in float64 on the host (the problem is s x s for
    s atoms). With ``positive=False`` it is ridge regression, ``(A A^T + lam I)^-1 A target``.

    For a fixed set of atoms, ``||w||`` is non-increasing in ``lam`` (with or without the sign
    constraint); for orthogonal atoms ``w_j = max(0, a_j . target) / (||a_j||^2 + lam)``.

    atoms : (s, d) real floating array (rows are the atoms). target : (d,) in the same namespace and dtype.
    Returns (s,) weights in the namespace, device and dtype of ``atoms``.

    Examples
    --------
    Two orthogonal atoms: the exact fit, its shrinkage by ``lam``, and the sign constraint at work:

    >>> import numpy as np
    >>> from crestcore.baselines import nonneg_ridge
    >>> atoms = np.array([[1.0, 0.0], [0.0, 2.0]])
    >>> target = np.array([3.0, 4.0])
    >>> nonneg_ridge(atoms, target)  # 3 * [1, 0] + 2 * [0, 2] is the target
    array([3., 2.])
    >>> nonneg_ridge(atoms, target, lam=1.0)  # (a_j . target) / (||a_j||^2 + lam)
    array([1.5, 1.6])
    >>> nonneg_ridge(atoms, -target), nonneg_ridge(atoms, -target, positive=False)
    (array([0., 0.]), array([-3., -2.]))
    """
    xp = namespace(atoms, target, names=("atoms", "target"))
    check_float_matrix(xp, atoms, "atoms")
    _check_target(xp, target, atoms, "atoms")
    lam = check_real(lam, "lam", low=0.0)
    positive = check_bool(positive, "positive")
    # the numerics policy: atoms whose Gram products would overflow or underflow float64 are divided by a power
    # of two 2^a, lam by its square, and the target by its own 2^t; the weights of the scaled problem times
    # 2^(t - a) are the problem's (at 1e160 or 1e-170 the unscaled products came back as all-zero weights,
    # silently: review 122; one power for both lost a target 1e150 times the atoms: review 126)
    atoms_c, _, _, back = prepare(xp, atoms, metric="sqeuclidean", kernel=None, scale=1.0)
    target_c, _, _, back_t = prepare(xp, xp.reshape(target, (1, -1)), metric="sqeuclidean", kernel=None, scale=1.0)
    lam = _scaled_lam(lam, back, "atoms")
    A = np.asarray(to_numpy(atoms_c), dtype=np.float64)
    b = np.asarray(to_numpy(target_c), dtype=np.float64).reshape(-1)
    Q = A @ A.T + lam * np.eye(A.shape[0])
    w = _gram_nnls(Q, A @ b, positive=positive, lam=lam)
    # sqeuclidean's back is twice each power
    return restore(xp, from_numpy(w, xp, device_of(atoms)), (back_t - back) // 2, atoms.dtype, "weights")


# ------------------------------------------------------------------------------------------------
# OMP on one problem
# ------------------------------------------------------------------------------------------------


def _omp(xp, A, b, k: int, lam: float, tol: float, positive: bool):
    """Regularised (non-negative) OMP of target ``b`` (d,) with atoms ``A`` (n, d), at most k picks.

    Returns host arrays (local picks, weights, gains) and the explained amount ``||b||^2 - J``.

    Per step: one correlation pass ``A r`` (O(n d), the dominant cost), the new atom's Gram column
    against the support (O(s d)), the refit through the incrementally updated inverse Gram (O(s^2)
    unless the active set changes a lot), and the residual ``r = b - w S`` (O(s d)). The support's
    gradients, the Gram matrix and ``h = S b`` live in buffers that grow by one row per step.
    """
    n, d = A.shape
    dev = device_of(A)
    host = is_numpy_namespace(xp)  # NumPy: call NumPy itself (the same operations without the wrappers)
    matmul = np.matmul if host else xp.matmul
    bnorm2 = float(to_numpy(xp.sum(b * b)))
    J = bnorm2
    # buffers for the support (it never exceeds min(k, n)); they start small and double when full, so
    # a run that stops early never holds a k x k matrix
    cap = min(k, n, 64)
    Q = np.zeros((cap, cap))  # G + lam I on the support, support order
    h = np.zeros(cap)
    rows = xp.zeros((cap, d), dtype=A.dtype, device=dev)  # the support's gradients, support order
    support = np.zeros(cap, dtype=np.int64)  # the active picks, in pick order
    gains = np.zeros(cap)
    s = 0
    qmax = 0.0  # max |Q| over the support
    cache = _GramInverse()
    w = np.zeros(0)
    r = b
    rnorm2 = bnorm2
    avail = xp.ones((n,), dtype=xp.bool, device=dev)
    taken = np.zeros(n, dtype=bool)  # host: ~avail
    neg_inf = xp.asarray(-math.inf, dtype=A.dtype, device=dev)
    tried = 0
    while s < k and tried < n:
        if bnorm2 == 0.0 or math.sqrt(max(rnorm2, 0.0)) <= tol * math.sqrt(bnorm2):
            break
        if host:
            # OpenBLAS's float32 product can leave the invalid flag set on finite inputs and finite results, and
            # NumPy then warned "invalid value encountered in matmul" on correct picks (review 141); the flag is
            # not read, the result is checked instead (finite atoms, residual and rescaling: finite correlations)
            with np.errstate(invalid="ignore"):
                c = matmul(A, r)
            if not np.isfinite(c).all():
                raise FloatingPointError("gradmatch: the correlations of the atoms with the residual are not finite")
        else:
            c = matmul(A, r)
        if host:  # c is a fresh array: mask it in place
            score = c if positive else np.abs(c, out=c)
            np.putmask(score, taken, -math.inf)
            j = int(score.argmax())
            sj = float(score[j])
        else:
            score = c if positive else xp.abs(c)
            score = xp.where(avail, score, neg_inf)
            j = int(to_numpy(xp.argmax(score)))
            sj = float(to_numpy(score[j]))
        if not sj > 0.0:
            break  # no remaining atom can lower the error with a positive weight
        tried += 1
        taken[j] = True
        if not host:
            avail = set_row(xp, avail, j, False)
        a_j = A[j, ...]
        if s == cap:
            cap = min(2 * cap, k, n)
            Q2 = np.zeros((cap, cap))
            Q2[:s, :s] = Q[:s, :s]
            Q, h, support, gains = Q2, np.resize(h, cap), np.resize(support, cap), np.resize(gains, cap)
            rows = xp.concat([rows, xp.zeros((cap - s, d), dtype=A.dtype, device=dev)], axis=0)
        if s:
            col = np.asarray(to_numpy(matmul(rows[:s, ...], a_j)), dtype=np.float64)
            Q[:s, s] = col
            Q[s, :s] = col
            qmax = max(qmax, float(np.abs(col).max()))
        if host:  # ndarray.sum is np.sum without its wrapper
            Q[s, s] = float((a_j * a_j).sum()) + lam
            h[s] = float((a_j * b).sum())
        else:
            Q[s, s] = float(to_numpy(xp.sum(a_j * a_j))) + lam
            h[s] = float(to_numpy(xp.sum(a_j * b)))
        qmax = max(qmax, abs(Q[s, s]))
        rows = set_row(xp, rows, s, a_j)
        support[s] = j
        gains[s] = 0.0
        s += 1
        w0 = np.zeros(s)  # the warm start: the previous weights and the new atom at 0
        w0[:-1] = w
        w = _gram_nnls(Q[:s, :s], h[:s], w0, positive=positive, cache=cache, qmax=qmax, lam=lam)
        # a pick whose refit weight is 0 retires for good: it leaves the support and is never picked
        # again, so the support grows by at most one per step and ends with k weighted examples
        live = w > 0 if positive else w != 0
        if not live.all():
            keep = np.flatnonzero(live)
            m = keep.size
            support[:m], gains[:m], h[:m] = support[keep], gains[keep], h[keep]
            Q[:m, :m] = Q[np.ix_(keep, keep)]
            w = w[keep]
            kept_rows = xp.take(rows, from_numpy(keep, xp, dev), axis=0)
            rows = xp.concat([kept_rows, xp.zeros((cap - m, d), dtype=A.dtype, device=dev)], axis=0)
            cache.remap(keep)
            qmax = float(np.max(np.abs(Q[:m, :m]))) if m else 0.0
            s = m
        if not s:
            r = b
        elif host:
            r = b - w.astype(A.dtype) @ rows[:s, ...]
        else:
            r = b - xp.matmul(xp.astype(from_numpy(w, xp, dev), A.dtype), rows[:s, ...])
        rnorm2 = float((r * r).sum()) if host else float(to_numpy(xp.sum(r * r)))
        J_new = rnorm2 + lam * float(w @ w)
        if live[-1]:
            gains[s - 1] = J - J_new
        J = J_new
    return support[:s].copy(), w, gains[:s].copy(), bnorm2 - J


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
    class_budgets=None,
) -> Selection:
    """GradMatch: a weighted subset whose weighted gradient sum matches the full gradient sum.

    For each problem (each class when ``labels`` is given, else the whole set) with target
    ``b = sum_i g_i`` (the sum of the problem's gradients), orthogonal matching pursuit greedily builds a
    support S of at most ``k_c`` examples minimising the regularised matching error

        J(w) = ||b - sum_{j in S} w_j g_j||^2 + lam ||w||^2,   w >= 0.

    Each step adds the example whose gradient has the largest positive correlation ``g_j . r`` with
    the residual ``r = b - sum_S w_j g_j`` (the steepest descent coordinate of J; ``|g_j . r|`` when
    ``positive=False``; ties in the computed correlations: lowest index, but they come from one
    matrix-vector product, whose BLAS may round bit-identical rows an ulp apart, so NumPy and torch can
    pick different copies of a duplicated gradient, with the same weights and objective), then refits all
    weights of the support by non-negative regularised least
    squares (:func:`nonneg_ridge`, warm-started). ``J`` never increases along the steps (the previous
    weights stay feasible), so with ``lam = 0`` the residual norm never increases. An example whose
    refit weight drops to 0 leaves the support for good (the support grows by at most one per step),
    so the budget is filled with examples that carry weight. It stops when ``k_c`` examples are in the
    support, when ``||r|| <= tol * ||b||``, or when no remaining example correlates positively with the
    residual (beyond ``1e-12 * max(|h|, max|G| * max(1, sum(w)))``, the rounding level of the support's
    Gram products, with G the Gram matrix of the gradients and h their products with b, whatever their
    scale: a pick below it gets weight 0 in the refit and retires, so gradients whose coordinates differ
    in scale by 1e3 or more can end a little above ``tol`` with fewer than ``k_c`` picks).

    Parameters
    ----------
    gradients : (n, d) real floating array, e.g. :func:`crestcore.last_layer_gradients` (with
        embeddings: the last linear layer's gradient) of the training set at the current model.
    k : budget, ``1 <= k <= n`` examples (``1 <= k <= #batches`` batches with ``per_batch``).
    labels : optional (n,) integer array: one problem per class, class c getting the Hamilton share of
        k proportional to its size (as in :func:`crestcore.facility_location`), matching that class's
        gradient sum. Cannot be combined with ``per_batch``.
    class_budgets : with ``labels``, the picks of each class present (ascending label order), adding up
        to ``k``, instead of the Hamilton split (as for :func:`crestcore.facility_location`).
    lam : L2 regularisation (>= 0, default 0.5). It shrinks the weights: for a fixed support ``||w||``
        is non-increasing in lam, and for orthogonal gradients ``w_j = (g_j . b)_+ / (||g_j||^2 + lam)``.
        It is on the scale of ``||g||^2``.
    tol : relative stopping tolerance (>= 0) on the residual, ``||r|| <= tol ||b||``. 0 never stops early
        (except when no example correlates positively with the residual): after an exact fit every
        remaining example whose correlation is positive by rounding is tried and retired, a refit each
        (0.2 s at n = 4,000, d = 10, against 1 ms with the default 1e-6).
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
    the step the pick was added (so they sum to the objective unless a pick retired on the way; with
    ``per_batch`` every example of a picked batch carries its batch's gain, so the gains of the distinct
    batches sum to it).
    ``objective`` the explained amount ``sum_c (||b_c||^2 - J_c)`` at the end (the final regularised
    error of class c is ``||b_c||^2`` minus its share).

    Examples
    --------
    A tiny 2-class gradient matrix, two picks per class. Without regularisation the weighted picks
    reproduce each class's gradient sum exactly, with weights that need not sum to the class size:

    >>> import numpy as np
    >>> from crestcore.baselines import gradmatch
    >>> G = np.array([[1.0, 0.0], [1.0, 0.2], [0.8, 0.0], [0.2, 0.6],    # class 0
    ...               [0.0, 1.0], [0.2, 1.0], [0.0, 0.8], [0.6, 0.2]])   # class 1
    >>> y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    >>> sel = gradmatch(G, 4, labels=y, lam=0.0)
    >>> sel.indices, np.round(sel.weights, 4)
    (array([1, 3, 5, 7]), array([2.9286, 0.3571, 2.9286, 0.3571]))
    >>> sel.weights[:2] @ G[sel.indices[:2]], G[y == 0].sum(axis=0)  # class 0: matched
    (array([3. , 0.8]), array([3. , 0.8]))
    >>> round(float(sel.weights.sum()), 4), round(float(sel.objective), 4)  # explained: ||b_0||^2 + ||b_1||^2
    (6.5714, 19.28)

    The default ``lam=0.5`` shrinks the weights, trading the exact match for smaller weights:

    >>> shrunk = gradmatch(G, 4, labels=y)
    >>> shrunk.indices, np.round(shrunk.weights, 4)
    (array([1, 0, 5, 4]), array([1.3282, 1.1145, 1.3282, 1.1145]))
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
    if class_budgets is not None and labels is None:
        raise ValueError("class_budgets needs labels (one count per class)")
    if labels is not None and per_batch is not None:
        raise ValueError("labels and per_batch cannot be combined (the per-batch variant matches the "
                         "whole gradient sum with batches)")
    dev = device_of(gradients)
    in_dtype = gradients.dtype
    # numerics policy (docs/selection.md): compute in >= float32; gradients (and target) whose magnitude
    # could overflow or underflow are divided by 2^e, lam by 2^2e (J scales with the square of the
    # gradients, the weights not at all); gains and the objective are scaled back by 2^2e at the end
    gradients, target, _, back = prepare(xp, gradients, metric="sqeuclidean", kernel=None, scale=1.0, Y=target)
    lam = _scaled_lam(lam, back)

    def finish(idx, weights, gains, expl):
        with np.errstate(over="ignore"):  # an overflow becomes inf here and is reported just below
            gains = np.ldexp(np.asarray(gains, dtype=np.float64), back)
            expl = float(np.ldexp(np.float64(expl), back))
        with float_errors_quiet():  # an overflowing cast is reported just below
            sel = host_selection(xp, dev, in_dtype, idx, weights, gains, expl)
        for what, v in (("weights", sel.weights), ("gains", sel.gains), ("objective", sel.objective)):
            if not bool(xp.all(xp.isfinite(v))):
                raise ValueError(f"the {what} of this selection overflow {in_dtype}: pass the gradients in a "
                                 "wider dtype, or divide them by a power of two")
        return sel

    if per_batch is not None:
        batch_h = labels_to_host(xp, per_batch, n, name="per_batch")
        members = _problems_from_labels(batch_h, n)  # one sort, not a comparison per batch (review 117)
        k = check_int(k, "k", low=1, high=len(members))
        atoms = xp.stack([xp.sum(take_rows(xp, gradients, from_numpy(m, xp, dev)), axis=0) for m in members])
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
        problems = _problems_from_labels(lab_h, n)
    sizes = np.array([p.size for p in problems])
    if class_budgets is None:
        budgets = hamilton(k, sizes)
    else:
        budgets = check_class_budgets(class_budgets, sizes, k)
    out_i, out_w, out_g, total = [], [], [], 0.0
    for rows, kc in zip(problems, budgets):
        if kc == 0:
            continue
        A = gradients if labels is None else take_rows(xp, gradients, from_numpy(rows, xp, dev))
        b = xp.sum(A, axis=0) if target is None else target
        sup, w, g, expl = _omp(xp, A, b, int(kc), lam, tol, positive)
        out_i.append(rows[sup])
        out_w.append(w)
        out_g.append(g)
        total += expl
    cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt))
    return finish(cat(out_i, np.int64), cat(out_w, np.float64), cat(out_g, np.float64), total)
