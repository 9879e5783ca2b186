"""The fast GradMatch / GLISTER / CRAIG against the frozen slow implementations (tests/baselines_reference.py).

GradMatch's refit now updates an inverse Gram matrix in O(s^2) per step instead of refactoring it,
GLISTER keeps its validation state in a class-major layout and stops recomputing the loss at every
pick, and the stochastic draw maps positions without listing the remaining candidates. None of that
may change a result: the picks must be the same, and the weights, gains and objective equal up to
floating-point summation order (1e-9 relative in float64; float32 results are the float64 host values
rounded to float32, so they may differ by an ulp).
"""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import to_numpy
from baselines_reference import (
    craig_reference,
    glister_reference,
    gradmatch_reference,
    gram_nnls_reference,
    nonneg_ridge_reference,
)
from hypothesis import given
from hypothesis import strategies as st

from crestcore.baselines import craig, glister, gradmatch, nonneg_ridge
from crestcore.baselines._glister import _kth_remaining
from crestcore.baselines._gradmatch import _gram_nnls, _GramInverse

seeds = st.integers(0, 2**32 - 1)


def _close(a, b, rtol):
    """|a - b| <= rtol * max|b| elementwise (relative to the vector's scale: gains may cross 0)."""
    a, b = np.asarray(to_numpy(a), dtype=np.float64), np.asarray(to_numpy(b), dtype=np.float64)
    assert a.shape == b.shape
    if a.size == 0:
        return
    scale = max(float(np.max(np.abs(b))), 1e-300)
    err = float(np.max(np.abs(a - b)))
    assert err <= rtol * scale, f"max abs diff {err:.3g} > {rtol:g} x {scale:.3g}"


def _rtol(dtype, float32: float = 3e-7) -> float:
    return 1e-9 if dtype == np.float64 else float32


# GLISTER's float32 gains come from a validation gradient summed over the validation set in another
# order (class-major layout): a few float32 ulps of the summands, relative to the largest gain
GLISTER_F32 = 1e-5


def _same_selection(new, old, dtype, G=None, float32: float = 3e-7):
    """Same picks, and weights / gains / objective within the tolerance.

    With ``G``, a pick may differ where the two picked rows of G are identical: BLAS computes identical
    rows' scores with different instruction sequences (e.g. the last rows of a matrix-vector product go
    through a tail loop), so an exact tie is broken by rounding noise in the old code and in the new one
    alike, and the two may break it differently. Swapping identical gradients changes no weight, gain
    or objective, which are still compared.
    """
    a, b = to_numpy(new.indices), to_numpy(old.indices)
    if not np.array_equal(a, b):
        assert G is not None and a.shape == b.shape, (a, b)
        G = to_numpy(G)
        assert np.array_equal(G[a], G[b]), (a, b)
    rt = _rtol(dtype, float32)
    _close(new.weights, old.weights, rt)
    _close(new.gains, old.gains, rt)
    _close(new.objective, old.objective, rt)
    for a, b in ((new.weights, old.weights), (new.gains, old.gains), (new.objective, old.objective)):
        assert to_numpy(a).dtype == to_numpy(b).dtype


def _tol(lam, tol, dtype):
    """GradMatch's tol for a comparison: with lam = 0 the residual can reach rounding level (a support
    spanning the gradients), after which every correlation is rounding noise and the picks are arbitrary
    in the old code and the new one alike; a tolerance above that level stops both first. With lam > 0
    the residual stays away from 0 and tol = 0 is compared as is."""
    if lam > 0.0:
        return tol
    return max(tol, 1e-6 if dtype == np.float64 else 1e-2)


def _gradients(rng, n, d, dup: bool, dtype):
    G = rng.normal(size=(n, d)) + 0.5  # positively correlated, like one class's gradients
    if dup and n >= 2:  # ties: repeated rows
        reps = rng.integers(0, n, size=max(1, n // 3))
        G[reps] = G[rng.integers(0, n)]
    return G.astype(dtype)


# ================================================================================================
# GradMatch
# ================================================================================================


@given(seed=seeds, n=st.integers(1, 40), d=st.integers(1, 12), C=st.integers(0, 4), data=st.data(),
       lam=st.sampled_from((0.0, 0.1, 0.5, 2.0)), positive=st.booleans(), tol=st.sampled_from((0.0, 1e-6, 0.3)),
       dup=st.booleans(), dtype=st.sampled_from((np.float64, np.float32)))
def test_gradmatch_equals_the_reference(seed, n, d, C, data, lam, positive, tol, dup, dtype):
    rng = np.random.default_rng(seed)
    G = _gradients(rng, n, d, dup, dtype)
    labels = None if C == 0 else rng.integers(0, C, n)
    k = data.draw(st.integers(1, n), label="k")
    kw = dict(labels=labels, lam=lam, tol=_tol(lam, tol, dtype), positive=positive)
    _same_selection(gradmatch(G, k, **kw), gradmatch_reference(G, k, **kw), dtype, G)


@given(seed=seeds, n=st.integers(2, 30), d=st.integers(1, 6), nb=st.integers(1, 8), data=st.data(),
       lam=st.sampled_from((0.0, 0.5)), target=st.booleans())
def test_gradmatch_per_batch_and_target_equal_the_reference(seed, n, d, nb, data, lam, target):
    rng = np.random.default_rng(seed)
    G = _gradients(rng, n, d, False, np.float64)
    batches = rng.integers(0, nb, n)
    kb = data.draw(st.integers(1, np.unique(batches).size), label="k")
    kw = dict(per_batch=batches, lam=lam, tol=_tol(lam, 1e-6, np.float64),
              target=rng.normal(size=d) if target else None)
    _same_selection(gradmatch(G, kb, **kw), gradmatch_reference(G, kb, **kw), np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_gradmatch_fixed_edge_cases_equal_the_reference(dtype, lam):
    rng = np.random.default_rng(4)
    same = np.tile(rng.normal(size=(1, 5)), (7, 1))  # all identical: every correlation ties
    tiny = np.concatenate([rng.normal(size=(30, 5)) + 1.0, rng.normal(size=(1, 5))])  # a class of one
    lab_tiny = np.r_[np.zeros(30, np.int64), 1]
    wide = rng.normal(size=(25, 3)) + 0.2  # more picks than dimensions (a singular Gram with lam = 0)
    for G, labels, ks in ((same, None, (1, 3, 7)), (tiny, lab_tiny, (1, 2, 5, 31)), (wide, None, (3, 10, 25))):
        G = G.astype(dtype)
        for k in ks:
            for positive in (True, False):
                kw = dict(labels=labels, lam=lam, tol=_tol(lam, 0.0, dtype), positive=positive)
                _same_selection(gradmatch(G, k, **kw), gradmatch_reference(G, k, **kw), dtype, G)


def test_gradmatch_many_picks_with_retirements_equal_the_reference():
    # a larger problem, long enough for atoms to retire and for the inverse to be updated many times
    rng = np.random.default_rng(11)
    n, d, C = 600, 40, 3
    centers = rng.normal(size=(C, d))
    labels = rng.integers(0, C, n)
    G = centers[labels] + 0.3 * rng.normal(size=(n, d))
    for lam in (0.0, 0.5):
        tol = _tol(lam, 0.0, np.float64)
        new = gradmatch(G, 150, labels=labels, lam=lam, tol=tol)
        old = gradmatch_reference(G, 150, labels=labels, lam=lam, tol=tol)
        _same_selection(new, old, np.float64)


def test_gradmatch_in_every_namespace_equals_the_reference(xp):
    rng = np.random.default_rng(2)
    G = _gradients(rng, 24, 5, True, np.float64)
    labels = rng.integers(0, 3, 24)
    want = gradmatch_reference(G, 8, labels=labels)
    Gx = xp.asarray(G)
    got = gradmatch(Gx, 8, labels=xp.asarray(labels))
    xp.assert_native(got.weights, Gx, np.float64, ndim=1)
    _same_selection(got, want, np.float64, G)


@given(seed=seeds, s=st.integers(1, 10), d=st.integers(1, 12), lam=st.sampled_from((0.0, 0.1, 2.0)),
       positive=st.booleans(), dtype=st.sampled_from((np.float64, np.float32)))
def test_nonneg_ridge_equals_the_reference(seed, s, d, lam, positive, dtype):
    rng = np.random.default_rng(seed)
    A = (rng.normal(size=(s, d)) + 0.3).astype(dtype)
    b = rng.normal(size=d).astype(dtype) + A.sum(axis=0)
    new = nonneg_ridge(A, b, lam=lam, positive=positive)
    old = nonneg_ridge_reference(A, b, lam=lam, positive=positive)
    assert new.dtype == old.dtype
    _close(new, old, _rtol(dtype))


@given(seed=seeds, s=st.integers(1, 25), lam=st.sampled_from((0.0, 1e-3, 1.0)), data=st.data())
def test_gram_nnls_with_a_cache_across_a_growing_system_equals_the_reference(seed, s, lam, data):
    # the OMP usage: Q grows by a row and column per call, the cache persists across the calls
    rng = np.random.default_rng(seed)
    d = data.draw(st.integers(1, 30), label="d")
    A = rng.normal(size=(s, d)) + 0.2
    Q = A @ A.T + lam * np.eye(s)
    h = A @ (A.sum(axis=0) + rng.normal(size=d))
    cache = _GramInverse()
    w = np.zeros(0)
    for m in range(1, s + 1):
        w0 = np.append(w, 0.0)
        w = _gram_nnls(Q[:m, :m], h[:m], w0, cache=cache, lam=lam)
        want = gram_nnls_reference(Q[:m, :m], h[:m], w0, lam=lam)
        _close(w, want, 1e-9)
        w = want  # the next warm start as the reference would have it


@given(seed=seeds, s=st.integers(1, 30), steps=st.integers(1, 12))
def test_gram_inverse_solves_any_sequence_of_index_sets(seed, s, steps):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(s, s + 3))
    Q = A @ A.T + 0.1 * np.eye(s)
    h = rng.normal(size=s)
    cache = _GramInverse()
    qmax = float(np.max(np.abs(Q)))
    for _ in range(steps):
        idx = np.flatnonzero(rng.random(s) < rng.random())
        if idx.size == 0:
            continue
        z = cache.solve(Q, h, idx, qmax)
        want = np.linalg.solve(Q[np.ix_(idx, idx)], h[idx])
        _close(z, want, 1e-9)
    keep = np.flatnonzero(rng.random(s) < 0.6)
    if keep.size:  # renumbering after the caller compacts Q
        cache.remap(keep)
        Qk, hk = Q[np.ix_(keep, keep)], h[keep]
        z = cache.solve(Qk, hk, np.arange(keep.size), qmax)
        _close(z, np.linalg.solve(Qk, hk), 1e-9)


def test_gram_inverse_falls_back_on_a_singular_system():
    a = np.array([1.0, 2.0, 0.5])
    Q = np.outer(a, a)  # rank one
    h = Q @ np.ones(3)
    z = _GramInverse().solve(Q, h, np.arange(3), float(Q.max()))
    np.testing.assert_allclose(z, np.linalg.lstsq(Q, h, rcond=None)[0], rtol=1e-12)


# ================================================================================================
# GLISTER
# ================================================================================================


def _glister_problem(rng, n, n_v, C, h, dup, dtype):
    z = rng.normal(size=(n, C))
    y = rng.integers(0, C, n)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    L = p - np.eye(C)[y]
    if h == 0:
        G, E = L, None
    else:
        emb = np.maximum(rng.normal(size=(n, h)), 0.0)
        G = (L[:, :, None] * emb[:, None, :]).reshape(n, C * h)
        E = np.maximum(rng.normal(size=(n_v, h)), 0.0).astype(dtype)
    if dup and n >= 2:
        G[rng.integers(0, n, size=max(1, n // 3))] = G[rng.integers(0, n)]
    zv = rng.normal(size=(n_v, C)).astype(dtype)
    yv = rng.integers(0, C, n_v)
    return G.astype(dtype), zv, yv, E


@given(seed=seeds, n=st.integers(1, 40), n_v=st.integers(1, 15), C=st.integers(1, 5), h=st.integers(0, 4),
       data=st.data(), eta=st.sampled_from((0.01, 0.3, 2.0)), stochastic=st.booleans(), dup=st.booleans(),
       dtype=st.sampled_from((np.float64, np.float32)))
def test_glister_equals_the_reference(seed, n, n_v, C, h, data, eta, stochastic, dup, dtype):
    rng = np.random.default_rng(seed)
    G, zv, yv, E = _glister_problem(rng, n, n_v, C, h, dup, dtype)
    k = data.draw(st.integers(1, n), label="k")
    eps = data.draw(st.sampled_from((0.01, 0.1, 0.9)), label="epsilon")
    kw = dict(val_embeddings=E, eta=eta, optimizer="stochastic" if stochastic else "naive", epsilon=eps)
    new = glister(G, zv, yv, k, rng=seed if stochastic else None, **kw)
    old = glister_reference(G, zv, yv, k, rng=seed if stochastic else None, **kw)
    a, b = to_numpy(new.indices), to_numpy(old.indices)
    if np.array_equal(a, b):
        _same_selection(new, old, dtype, G, GLISTER_F32)
        return
    # a tie broken the other way: two identical gradients (any dtype; BLAS rounds identical rows
    # differently), or in float32 two gains equal within float32 rounding. The greedy paths part there
    # (and a stochastic run then draws from different remaining sets), so only the steps before are
    # compared, after checking that it was such a tie (gains recomputed in float64 at the old state)
    t = int(np.argmax(a != b))
    if not np.array_equal(G[a[t]], G[b[t]]):
        assert dtype == np.float32, (t, a, b)
        gains = _glister_gains64(G, zv, yv, E, eta, b[:t])
        assert abs(gains[a[t]] - gains[b[t]]) <= 1e-4 * np.max(np.abs(gains)), (t, a, b)
    _close(to_numpy(new.gains)[: t + 1], to_numpy(old.gains)[: t + 1], _rtol(dtype, GLISTER_F32))


def _glister_gains64(G, zv, yv, E, eta, picks):
    """GLISTER's first-order gains of every candidate after ``picks``, from the definition, in float64."""
    G, zv = G.astype(np.float64), zv.astype(np.float64)
    C = zv.shape[1]
    G_S = G[picks].sum(axis=0)
    Z = zv - eta * (G_S[None, :] if E is None else E.astype(np.float64) @ G_S.reshape(C, -1).T)
    P = np.exp(Z - Z.max(axis=1, keepdims=True))
    R = P / P.sum(axis=1, keepdims=True) - np.eye(C)[yv]
    gval = R.sum(axis=0) if E is None else (R.T @ E.astype(np.float64)).reshape(-1)
    return eta * (G @ gval)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_glister_fixed_edge_cases_equal_the_reference(dtype):
    rng = np.random.default_rng(5)
    G, zv, yv, E = _glister_problem(rng, 12, 6, 3, 2, False, dtype)
    same = np.tile(G[:1], (12, 1))  # identical candidates: every gain ties, the lowest index wins
    for grads in (G, same):
        for k in (1, 5, 12):
            for opt, r in (("naive", None), ("stochastic", 3), ("stochastic", np.random.default_rng(9))):
                kw = dict(val_embeddings=E, eta=0.5, optimizer=opt)
                r2 = r if not isinstance(r, np.random.Generator) else np.random.default_rng(9)
                _same_selection(glister(grads, zv, yv, k, rng=r, **kw),
                                glister_reference(grads, zv, yv, k, rng=r2, **kw), dtype, grads, GLISTER_F32)


def test_glister_in_every_namespace_equals_the_reference(xp):
    rng = np.random.default_rng(3)
    G, zv, yv, E = _glister_problem(rng, 20, 8, 3, 2, True, np.float64)
    for opt in ("naive", "stochastic"):
        want = glister_reference(G, zv, yv, 6, val_embeddings=E, eta=0.3, optimizer=opt, rng=1)
        Gx = xp.asarray(G)
        got = glister(Gx, xp.asarray(zv), xp.asarray(yv), 6, val_embeddings=xp.asarray(E), eta=0.3,
                      optimizer=opt, rng=1)
        xp.assert_native(got.gains, Gx, np.float64, ndim=1)
        _same_selection(got, want, np.float64, G)


@given(n=st.integers(1, 200), data=st.data())
def test_kth_remaining_lists_the_remaining_indices_in_order(n, data):
    removed = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=n - 1), label="removed")),
                       dtype=np.int64)
    left = np.setdiff1d(np.arange(n), removed)
    pos = np.arange(left.size)
    np.testing.assert_array_equal(_kth_remaining(removed, pos), left)


def test_glister_inputs_untouched():
    rng = np.random.default_rng(8)
    G, zv, yv, E = _glister_problem(rng, 15, 6, 3, 2, False, np.float64)
    arrays = [G, zv, yv, E]
    for a in arrays:
        a.flags.writeable = False
    glister(G, zv, yv, 4, val_embeddings=E, optimizer="stochastic", rng=0)
    gradmatch(G, 4, labels=rng.integers(0, 2, 15))


# ================================================================================================
# CRAIG
# ================================================================================================


@given(seed=seeds, n=st.integers(1, 60), d=st.integers(1, 6), C=st.integers(1, 5), data=st.data(),
       dup=st.booleans(), dtype=st.sampled_from((np.float64, np.float32)))
def test_craig_equals_the_reference(seed, n, d, C, data, dup, dtype):
    rng = np.random.default_rng(seed)
    G = _gradients(rng, n, d, dup, dtype)
    labels = rng.integers(0, C, n)
    k = data.draw(st.integers(1, n), label="k")
    opt = data.draw(st.sampled_from(("lazy", "naive", "stochastic")), label="optimizer")
    new = craig(G, labels, k, optimizer=opt, rng=seed)
    old = craig_reference(G, labels, k, optimizer=opt, rng=seed)
    assert np.array_equal(to_numpy(new.indices), to_numpy(old.indices))
    for a, b in ((new.weights, old.weights), (new.gains, old.gains), (new.objective, old.objective)):
        _close(a, b, _rtol(dtype))


def test_gradmatch_gain_of_a_pick_is_kept_when_a_later_pick_retires():
    """Review 99 (a surviving mutant): a pick whose NNLS weight is 0 retires at once; the gains of the picks
    before it are the decreases of J at their own steps and must not be overwritten by the retired step's.
    Atom 1's correlation with the residual, 1e-14, is above 0 (so OMP picks it) but within the NNLS tolerance
    (so its weight is 0)."""
    from crestcore.baselines import gradmatch

    sel = gradmatch(np.array([[1.0, 0.0], [0.0, -1e-14]]), 2, lam=0.0, target=np.array([1.0, -1.0]))
    assert sel.indices.tolist() == [0]
    assert sel.gains.tolist() == [1.0] == [float(sel.objective)]


def test_stochastic_glister_breaks_ties_to_the_lowest_index_on_numpy_as_elsewhere():
    """Review 99 (a surviving mutant): on NumPy input the stochastic candidates were sorted before the
    arg-max (ties to the lowest index, as documented and as on every other library) by no test's notice;
    twelve identical rows tie everywhere."""
    xs = pytest.importorskip("array_api_strict")
    from crestcore.baselines import glister

    G = np.tile([[0.5, -0.2, -0.3]], (12, 1))
    V = np.array([[0.1, 0.2, -0.3], [0.0, 0.4, 0.1]])
    y = np.array([1, 2])
    host = glister(G, V, y, 4, optimizer="stochastic", rng=0).indices
    other = glister(xs.asarray(G), xs.asarray(V), xs.asarray(y), 4, optimizer="stochastic", rng=0).indices
    assert host.tolist() == [0, 4, 1, 2] == np.asarray(other).tolist()
