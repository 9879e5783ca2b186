"""Float64 replays of greedy facility-location runs: the yardstick the backend tests share
(tests/backends/test_numba.py, test_torch.py, test_cupy.py; imported as ``_greedy_replay``).

Two correct greedy implementations may legitimately differ where two candidates' gains are closer than
the rounding noise of their sums. So a reference trajectory is replayed in float64 (:func:`trace`) and
the kernel's picks must equal it where the reference's decisions are clear, while the kernel's own
trajectory must itself be a ``tol``-greedy run: each pick a candidate of its step, its gain within
``tol`` of that step's best, its reported gain right (:func:`assert_greedy_matches`).

Every function takes NumPy, torch or CuPy arrays (or plain sequences) and compares on the host.
"""

from __future__ import annotations

import math

import numpy as np
from _helpers import to_numpy
from hypothesis import strategies as st

from crestcore.facility import stochastic_draws

METRICS = ("euclidean", "sqeuclidean", "cosine")
KERNELS = ("max-minus", "exp")
OPTIMIZERS = ("naive", "lazy", "stochastic")


def host(x) -> np.ndarray:
    """``x`` on the host: an array of any library in the matrix (:func:`_helpers.to_numpy`), or a plain
    sequence (``np.asarray``)."""
    return np.asarray(x) if isinstance(x, (list, tuple)) else to_numpy(x)


def padded_batch(seed: int, B: int, n: int, d: int, *, eps: float = 0.1, half_budgets: bool = False):
    """A padded batch of ``B`` problems on the host, in float64: ``X`` (B, n, d) with finite junk in the
    padding (anywhere, not only at the end), ``valid`` (B, n), ``budgets`` (B,) int64 (the first problem
    full, with a budget >= 1) and ``u`` (B, K, s), the stochastic draws for ``eps``.

    ``half_budgets``: budgets up to half of each problem instead of all of it (a greedy run to the very
    end meets structural ties: two points that only cover each other have equal gains, decided there
    by rounding alone)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, n + 1, size=B)
    sizes[0] = n  # at least one full problem
    valid = np.arange(n)[None, :] < sizes[:, None]
    perm = rng.permuted(np.broadcast_to(np.arange(n), (B, n)).copy(), axis=1)
    valid = np.take_along_axis(valid, perm, axis=1)  # padding anywhere, not only at the end
    X = rng.standard_normal((B, n, d)) * rng.uniform(0.2, 3.0)
    X[~valid] = rng.uniform(-1e3, 1e3, size=(int((~valid).sum()), d))  # finite junk
    most = (sizes + 1) // 2 if half_budgets else sizes
    budgets = np.array([rng.integers(0, s + 1) for s in most], dtype=np.int64)
    budgets[0] = max(1, budgets[0])
    u = stochastic_draws(rng, sizes, budgets, eps)
    return X, valid, budgets, u


def features_strategies(max_n: int) -> dict:
    """The hypothesis arguments of the matrix-free differential tests (``@given(**features_strategies(50))``):
    a ``seed``, ``n`` in [1, max_n] points of ``d`` in [1, 5] dimensions, ``metric``, ``kernel``,
    ``optimizer``, and ``data`` to draw ``k`` and the tile with (:func:`features_problem`)."""
    return dict(seed=st.integers(0, 2**32 - 1), n=st.integers(1, max_n), d=st.integers(1, 5), data=st.data(),
                metric=st.sampled_from(METRICS), kernel=st.sampled_from(KERNELS),
                optimizer=st.sampled_from(OPTIMIZERS))


def features_problem(data, seed: int, n: int, d: int, optimizer: str):
    """One matrix-free problem on the host in float64: ``X`` (n, d), ``k`` in [1, n] and ``tile`` in
    [1, n + 3] (both drawn from the hypothesis ``data``), and the stochastic draws ``u`` (k, s) (None
    unless ``optimizer`` is "stochastic")."""
    k = data.draw(st.integers(1, n), label="k")
    tile = data.draw(st.integers(1, n + 3), label="tile")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) * rng.uniform(0.2, 3.0)
    u = stochastic_draws(rng, [n], [k], 0.1)[0] if optimizer == "stochastic" else None
    return X, k, tile, u


def stochastic_candidates(remaining: np.ndarray, u_row: np.ndarray, mode: str) -> np.ndarray:
    """The stochastic candidate set of one step (a mask over the points), as each path defines it:

    * ``"batched"``: the remaining points at ranks ``floor(u * R)``, computed in ``u``'s dtype
      (``R`` = number remaining); a position ``>= R`` hits nothing;
    * ``"clamped"``: the same with the position clamped to ``R - 1`` (the reference's rule);
    * ``"features"``: positions ``floor(u * R)`` in float64, clipped to ``R - 1`` (``greedy_features``).
    """
    if mode == "features":
        rem = np.flatnonzero(remaining)
        pos = np.minimum(np.floor(u_row.astype(np.float64) * rem.size).astype(np.int64), rem.size - 1)
        hit = np.zeros_like(remaining)
        hit[rem[pos]] = True
        return hit
    R = u_row.dtype.type(remaining.sum())
    pos = np.floor(u_row * R)
    if mode == "clamped":
        pos = np.minimum(pos, R - 1)
    rank = np.cumsum(remaining) - 1
    return np.isin(rank, pos) & remaining


def trace(S64, valid, picks, optimizer, u, mode="batched"):
    """Walk ``picks`` (up to the first -1) on the float64 similarities ``S64`` (n, n) of one problem: per
    step the best-vs-second gap among the step's candidates, the best gain, the pick's gain and whether
    the pick was a candidate (``mode``: the stochastic candidates' rule, :func:`stochastic_candidates`)."""
    n = S64.shape[0]
    cover = np.zeros(n)
    remaining = valid.copy()
    steps = []
    for t, j in enumerate(picks):
        if j < 0:
            break
        g = np.maximum(S64 - cover[:, None], 0.0).sum(axis=0)
        cand = remaining if optimizer != "stochastic" else stochastic_candidates(remaining, u[t], mode)
        cg = np.where(cand, g, -np.inf)
        order = np.argsort(-cg, kind="stable")
        second = cg[order[1]] if n > 1 else -np.inf
        steps.append(dict(gap=cg[order[0]] - second, best=cg[order[0]], gain=g[j], cand=bool(cand[j])))
        cover = np.maximum(cover, S64[:, j])
        remaining[j] = False
    return steps


def _agreed_prefix(got, want, kb, ref_steps, tol, b) -> bool:
    """Picks ``got`` equal ``want`` up to the first step where they differ, which must be a near tie
    (gap <= tol) of the reference's; True when they agree over the whole budget ``kb``."""
    same = 0
    while same < kb and got[same] == want[same]:
        same += 1
    if same < kb:
        assert ref_steps[same]["gap"] <= tol, (
            f"problem {b} step {same}: picks {got[same]} != {want[same]} with a clear gap "
            f"{ref_steps[same]['gap']} > tol {tol}")
    return same == kb


def assert_greedy_matches(S, valid, budgets, optimizer, u, got, want, *, rtol, mode="batched", noise=0.0,
                          agree="clear"):
    """``got`` = (indices, gains) of the kernel under test, ``want`` = the reference's (its indices are
    used), on the dense similarities ``S`` (B, n, n); ``u`` the draws (B, K, s) or None.

    Per problem, with ``tol = rtol * max(1, largest column sum) + noise`` (``noise``: extra absolute
    tolerance on a gain, e.g. for similarities the kernel computed itself, in tiles):

    * ``agree="clear"``: the indices are equal wherever every step of the reference has a clear gap
      (> tol); returns how many problems were compared index for index;
    * ``agree="prefix"``: the indices are equal up to the first step where they differ, which must be a
      near tie of the reference's; returns how many problems agreed over their whole budget.

    In both, the picks past the budget are -1 with gain 0, and the kernel's run is a ``tol``-greedy one
    (``mode``: the stochastic candidates' rule, :func:`stochastic_candidates`)."""
    S64 = host(S).astype(np.float64)
    V, bud = host(valid), host(budgets)
    gi, gg = host(got[0]), host(got[1]).astype(np.float64)
    wi = host(want[0])
    U = None if u is None else host(u)
    assert gi.dtype == np.int64 and gi.shape == wi.shape and gg.shape == gi.shape
    agreed = 0
    for b in range(S64.shape[0]):
        kb = int(bud[b])
        assert (gi[b, kb:] == -1).all() and (gg[b, kb:] == 0).all(), "padding after the budget"
        tol = rtol * max(1.0, float(S64[b].sum(axis=0).max())) + noise
        ub = None if U is None else U[b]
        ref_steps = trace(S64[b], V[b], wi[b, :kb], optimizer, ub, mode)
        if agree == "prefix":
            agreed += _agreed_prefix(gi[b], wi[b], kb, ref_steps, tol, b)
        elif all(s["gap"] > tol for s in ref_steps):
            np.testing.assert_array_equal(gi[b], wi[b])
            agreed += 1
        steps = trace(S64[b], V[b], gi[b, :kb], optimizer, ub, mode)
        assert len(steps) == kb, "fewer picks than the budget"
        assert len(set(gi[b, :kb].tolist())) == kb, "a point picked twice"
        for t, s in enumerate(steps):
            assert s["cand"], f"problem {b} step {t}: the pick is not a candidate"
            assert s["gain"] >= s["best"] - tol, f"step {t}: gain {s['gain']} < best {s['best']}"
            assert abs(gg[b, t] - s["gain"]) <= tol, f"step {t}: reported gain {gg[b, t]}, true {s['gain']}"
    return agreed


def elem_noise(X, metric: str, S) -> float:
    """Rounding noise of one similarity computed in ``X``'s dtype with another tiling: a few ulps of the
    largest similarity of ``S``, plus for "euclidean" the square root of a few ulps of ``|x|^2``
    (near-duplicate points)."""
    Xh, Sh = host(X), host(S)
    eps = float(np.finfo(Xh.dtype).eps)
    noise = 16 * eps * max(1.0, float(np.abs(Sh).max()) if Sh.size else 1.0)
    if metric == "euclidean":
        noise += 4 * math.sqrt(eps) * float(np.linalg.norm(Xh.astype(np.float64), axis=1).max())
    return noise


def assert_features_matches(X, S, k, metric, optimizer, u, got, want_indices, *, rtol):
    """``got`` = (indices, gains, weights, objective) of a matrix-free ``greedy_features`` run on ``X``
    (n, d), ``want_indices`` the reference's picks, ``S`` the problem's dense similarities (n, n), ``u``
    the draws (K, s) or None: a ``tol``-greedy trajectory (:func:`assert_greedy_matches`, with
    ``n`` similarities' rounding noise per gain), weights that are the picks' cluster sizes (assignments
    within rounding of a tie may go either way) and the objective ``sum_i max_j S[i, pick_j]``."""
    n = X.shape[0]
    idx, gains, weights, obj = got
    elem = elem_noise(X, metric, S)
    assert_greedy_matches(host(S)[None], np.ones((1, n), dtype=bool), np.array([k]), optimizer,
                          None if u is None else host(u)[None], (host(idx)[None], host(gains)[None]),
                          (host(want_indices)[None], None), rtol=rtol, mode="features", noise=n * elem)
    w = host(weights)
    assert w.sum() == n
    sims = host(S).astype(np.float64)[:, host(idx)]
    ambiguous = 0
    if k > 1:
        top2 = np.sort(sims, axis=1)[:, -2:]
        ambiguous = int((top2[:, 1] - top2[:, 0] <= 2 * elem).sum())
    expected = np.bincount(np.argmax(sims, axis=1), minlength=k)
    assert np.abs(w - expected).sum() <= 2 * ambiguous
    np.testing.assert_allclose(float(host(obj)), sims.max(axis=1).sum(), rtol=rtol, atol=n * elem)
