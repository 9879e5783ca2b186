"""crestcore/minibatch.py: the CREST selection step (P class-stratified subsets, a coreset from each).

The batched solver is checked against the plain loop it replaces: every (subset, class) problem solved
on its own with ``crestcore.facility_location`` (itself checked against tests/reference.py in
test_facility.py), with the per-class budget computed by the documented rule in tests/reference.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import crestcore
import reference as R


def _features(seed: int, n: int, d: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def _labels(seed: int, n: int, n_classes: int, *, skew: bool = False) -> np.ndarray:
    """Every class present; non-contiguous label values; optionally very unbalanced."""
    rng = np.random.default_rng(seed + 1)
    p = np.geomspace(1.0, 0.05, n_classes) if skew else np.ones(n_classes)
    rest = rng.choice(n_classes, size=n - n_classes, p=p / p.sum())
    values = np.array([3, -1, 10, 4, 0])[:n_classes]
    return values[rng.permutation(np.concatenate([np.arange(n_classes), rest]))].astype(np.int64)


def _np(x) -> np.ndarray:
    return np.asarray(x)


@st.composite
def instances(draw, max_n=60, max_classes=4, labelled=None):
    """(X, labels or None, pool, m, r, P, seed) for a valid call."""
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    n = draw(st.integers(2, max_n), label="n")
    with_labels = draw(st.booleans(), label="labelled") if labelled is None else labelled
    C = draw(st.integers(1, min(max_classes, n)), label="C") if with_labels else 0
    labels = _labels(seed, n, C, skew=draw(st.booleans(), label="skew")) if C else None
    if draw(st.booleans(), label="use pool"):
        size = draw(st.integers(1, n), label="pool size")
        pool = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)
    else:
        pool = None
    pool_size = n if pool is None else pool.size
    r = draw(st.integers(1, pool_size), label="r")
    m = draw(st.integers(1, r), label="m")
    P = draw(st.integers(1, 4), label="P")
    return _features(seed, n), labels, pool, m, r, P, seed


def _class_values(labels, pool):
    return np.unique(labels[pool])


def _checked_budgets(m, counts, class_budget, got):
    """The per-class budgets ``got`` of one subset (picks per class, ascending label) checked against the
    documented rule; returns the probability that each class got its picks (the weights are divided by
    it). ``ceil``: ``min(ceil(m / C), count)``. Proportional: class c's share ``q_c = m n_c / r`` rounded
    down or up at random, every present class at least one pick when m allows (taken from a class with
    the most), so a class goes without a pick only when m is below the number of classes present; then a
    class with ``q_c < 1`` gets its one pick with probability ``q_c``."""
    if class_budget == "ceil":
        np.testing.assert_array_equal(got, np.minimum(math.ceil(m / len(counts)), counts))
        return np.ones(len(counts))
    assert got.sum() == m and np.all(got <= counts)
    q = m * counts / counts.sum()
    present = counts > 0
    if m >= int(present.sum()):
        assert np.all(got[present] >= 1)
        assert np.all(got <= np.ceil(q))
        # a class below its share rounded down gave picks to classes raised to one, each time as a class with the
        # most picks: it keeps at least the most any class has, less one (it may give more than one: m = 5 over
        # counts 5, 14, 1, 3 of 23, shares rounded to 2, 3, 0, 0, gives 2, 1, 1, 1)
        donors = got < np.floor(q)
        assert np.all(got[donors] >= got.max() - 1)
        return np.ones(len(counts))
    assert np.all((got == np.floor(q)) | (got == np.ceil(q)))
    return np.where((got == 1) & (q < 1), q, 1.0)


# ================================================================================================
# shapes and the subsets
# ================================================================================================


@given(inst=instances(), per_class=st.booleans())
def test_shapes_and_subsets(inst, per_class):
    X, labels, pool, m, r, P, seed = inst
    n = X.shape[0]
    out = crestcore.minibatch_coresets(X, labels, m=m, r=r, P=P, rng=seed, pool=pool, per_class=per_class)
    assert isinstance(out, crestcore.Coresets) and out.P == P
    idx, w, g, obj, subs = (_np(a) for a in (out.indices, out.weights, out.gains, out.objective, out.subsets))
    assert idx.shape == w.shape == g.shape == (P, m) and idx.dtype == np.int64
    assert obj.shape == (P,) and subs.shape == (P, r) and subs.dtype == np.int64
    pool_set = set(range(n)) if pool is None else set(pool.tolist())
    for p in range(P):
        assert np.all(np.diff(subs[p]) > 0)  # sorted and distinct
        assert set(subs[p].tolist()) <= pool_set
        assert np.unique(idx[p]).size == m  # m distinct picks
        assert set(idx[p].tolist()) <= set(subs[p].tolist())  # each pick is a member of its subset
        if labels is None or not per_class or m >= np.unique(labels[subs[p]]).size:
            assert float(np.sum(w[p])) == r  # every class has a pick: each member is represented once
        assert float(np.sum(g[p])) == pytest.approx(float(obj[p]), rel=1e-9, abs=1e-9)
    if labels is not None:
        pool_idx = np.arange(n) if pool is None else pool
        classes, pool_counts = np.unique(labels[pool_idx], return_counts=True)
        # documented stratification (draw_subsets): class c gets floor or ceil of r n_c / n in every subset
        q = r * pool_counts / pool_counts.sum()
        first = np.array([np.sum(labels[subs[0]] == c) for c in classes])
        assert first.sum() == r and np.all((first == np.floor(q)) | (first == np.ceil(q)))
        for p in range(P):
            got = np.array([np.sum(labels[subs[p]] == c) for c in classes])
            np.testing.assert_array_equal(got, first)


@given(inst=instances(labelled=True), class_budget=st.sampled_from(("proportional", "ceil")))
def test_coresets_are_class_stratified_with_class_weights(inst, class_budget):
    X, labels, pool, m, r, P, seed = inst
    out = crestcore.minibatch_coresets(X, labels, m=m, r=r, P=P, rng=seed, pool=pool, class_budget=class_budget)
    idx, w, g, subs = _np(out.indices), _np(out.weights), _np(out.gains), _np(out.subsets)
    pool_idx = np.arange(X.shape[0]) if pool is None else pool
    classes = _class_values(labels, pool_idx)
    C = classes.size
    per = math.ceil(m / C)
    width = C * per if class_budget == "ceil" else m
    assert idx.shape == (P, width)
    for p in range(P):
        counts = np.array([np.sum(labels[subs[p]] == c) for c in classes])
        real = idx[p] >= 0
        budgets = np.array([np.sum(labels[idx[p][real]] == c) for c in classes])
        chance = _checked_budgets(m, counts, class_budget, budgets)
        assert np.all(w[p][~real] == 0) and np.all(g[p][~real] == 0)
        if class_budget == "proportional":
            assert np.all(real)
        picked = idx[p][real]
        assert np.unique(picked).size == picked.size
        assert set(picked.tolist()) <= set(subs[p].tolist())
        # grouped by ascending label, budgets[c] picks of class c
        np.testing.assert_array_equal(labels[picked], np.repeat(classes, budgets))
        for c, cnt, pc in zip(classes, counts, chance):
            sel = real & (labels[np.where(real, idx[p], 0)] == c)
            if sel.any():  # weights sum to the class's count in the subset, over its chance of a pick
                assert float(np.sum(w[p][sel])) == pytest.approx(cnt / pc, rel=1e-12)
        if class_budget == "ceil":
            for c in range(C):  # class c owns slots [c * per, (c + 1) * per): picks first, then holes
                slot = idx[p][c * per : (c + 1) * per]
                np.testing.assert_array_equal(slot >= 0, np.arange(per) < budgets[c])


def test_ceil_budget_leaves_holes_when_a_class_is_short():
    labels = np.array([0] * 30 + [1] * 3 + [2] * 27)
    X = _features(0, labels.size)
    out = crestcore.minibatch_coresets(X, labels, m=9, r=20, P=3, rng=0, class_budget="ceil")
    idx, w, g = _np(out.indices), _np(out.weights), _np(out.gains)
    # r = 20 split 30:3:27 -> 10, 1, 9 per subset; ceil(9 / 3) = 3 slots per class, class 1 fills one
    assert idx.shape == (3, 9)
    for p in range(3):
        np.testing.assert_array_equal(idx[p] >= 0, [True] * 4 + [False] * 2 + [True] * 3)
        np.testing.assert_array_equal(idx[p][4:6], [-1, -1])
        np.testing.assert_array_equal(w[p][4:6], [0, 0])
        np.testing.assert_array_equal(g[p][4:6], [0, 0])
        assert float(np.sum(w[p])) == 20
        np.testing.assert_array_equal(w[p][3], 1)  # the single class-1 member represents itself


def test_ceil_budget_width_with_balanced_classes():
    labels = np.repeat([5, 6, 7], 20)
    out = crestcore.minibatch_coresets(_features(1, 60), labels, m=10, r=30, P=2, rng=1, class_budget="ceil")
    assert _np(out.indices).shape == (2, 3 * 4)  # C * ceil(m / C)
    assert np.all(_np(out.indices) >= 0)


# ================================================================================================
# randomness
# ================================================================================================


def test_same_seed_same_result_different_seed_different_subsets():
    X, labels = _features(3, 80), _labels(3, 80, 3)
    a = crestcore.minibatch_coresets(X, labels, m=5, r=20, P=4, rng=42)
    b = crestcore.minibatch_coresets(X, labels, m=5, r=20, P=4, rng=42)
    c = crestcore.minibatch_coresets(X, labels, m=5, r=20, P=4, rng=np.random.default_rng(42))
    for f in ("indices", "weights", "gains", "objective", "subsets"):
        np.testing.assert_array_equal(_np(getattr(a, f)), _np(getattr(b, f)))
        np.testing.assert_array_equal(_np(getattr(a, f)), _np(getattr(c, f)))
    d = crestcore.minibatch_coresets(X, labels, m=5, r=20, P=4, rng=43)
    assert not np.array_equal(_np(a.subsets), _np(d.subsets))
    # the P subsets of one call are different draws, not copies
    assert len({tuple(s) for s in _np(a.subsets).tolist()}) > 1


def test_generator_state_advances():
    X = _features(4, 50)
    gen = np.random.default_rng(0)
    a = crestcore.minibatch_coresets(X, None, m=3, r=10, P=2, rng=gen)
    b = crestcore.minibatch_coresets(X, None, m=3, r=10, P=2, rng=gen)
    assert not np.array_equal(_np(a.subsets), _np(b.subsets))


def test_stochastic_optimizer_is_valid_and_reproducible():
    X, labels = _features(5, 90), _labels(5, 90, 3)
    a = crestcore.minibatch_coresets(X, labels, m=9, r=45, P=3, rng=1, optimizer="stochastic", epsilon=0.2)
    b = crestcore.minibatch_coresets(X, labels, m=9, r=45, P=3, rng=1, optimizer="stochastic", epsilon=0.2)
    np.testing.assert_array_equal(_np(a.indices), _np(b.indices))
    idx, subs, w = _np(a.indices), _np(a.subsets), _np(a.weights)
    for p in range(3):
        assert np.unique(idx[p]).size == 9 and set(idx[p].tolist()) <= set(subs[p].tolist())
        assert float(np.sum(w[p])) == 45


# ================================================================================================
# the batched solver equals the loop over problems
# ================================================================================================


@given(inst=instances(max_n=45), per_class=st.booleans(), class_budget=st.sampled_from(("proportional", "ceil")),
       metric=st.sampled_from(("euclidean", "sqeuclidean", "cosine")), kernel=st.sampled_from(("max-minus", "exp")),
       optimizer=st.sampled_from(("naive", "lazy")), backend=st.sampled_from(("auto", "reference")))
def test_batched_equals_per_problem_loop(inst, per_class, class_budget, metric, kernel, optimizer, backend):
    X, labels, pool, m, r, P, seed = inst
    out = crestcore.minibatch_coresets(
        X, labels, m=m, r=r, P=P, rng=seed, pool=pool, per_class=per_class, class_budget=class_budget,
        metric=metric, kernel=kernel, optimizer=optimizer, backend=backend,
    )
    idx, w, g, obj, subs = (_np(a) for a in (out.indices, out.weights, out.gains, out.objective, out.subsets))
    by_class = per_class and labels is not None
    pool_idx = np.arange(X.shape[0]) if pool is None else pool
    classes = _class_values(labels, pool_idx) if by_class else np.array([0])
    for p in range(P):
        sub = subs[p]
        lab = labels[sub] if by_class else np.zeros(r, dtype=np.int64)
        counts = np.array([np.sum(lab == c) for c in classes])
        real = idx[p] >= 0
        if by_class:
            budgets = np.array([np.sum(labels[idx[p][real]] == c) for c in classes])
            chance = _checked_budgets(m, counts, class_budget, budgets)
        else:
            budgets, chance = np.array([m]), np.ones(1)
        exp_idx, exp_w, exp_g, exp_obj, margin = [], [], [], 0.0, math.inf
        for c, kc, pc in zip(classes, budgets, chance):
            members = sub[lab == c]
            if kc > 0:
                # tie-free check on the independent reference, then the library on this one problem
                _, ref_gains, ref_margin = R.naive_greedy(R.similarity(X[members], metric, kernel), int(kc))
                margin = min(margin, ref_margin / max(1.0, float(ref_gains[0])))
                one = crestcore.facility_location(X[members], int(kc), metric=metric, kernel=kernel,
                                                  optimizer=optimizer, backend=backend)
                exp_idx.append(members[_np(one.indices)])
                exp_w.append(_np(one.weights) / pc)
                exp_g.append(_np(one.gains))
                exp_obj += float(one.objective)
            if class_budget == "ceil" and by_class:  # holes up to the class's slot width
                holes = math.ceil(m / classes.size) - kc
                exp_idx.append(np.full(holes, -1))
                exp_w.append(np.zeros(holes))
                exp_g.append(np.zeros(holes))
        assume(margin > 1e-9)
        np.testing.assert_array_equal(idx[p], np.concatenate(exp_idx))
        np.testing.assert_array_equal(w[p], np.concatenate(exp_w))
        np.testing.assert_allclose(g[p], np.concatenate(exp_g), rtol=1e-9, atol=1e-9)
        assert float(obj[p]) == pytest.approx(exp_obj, rel=1e-9, abs=1e-9)


def test_per_class_false_solves_whole_subsets():
    X, labels = _features(6, 60), _labels(6, 60, 3)
    out = crestcore.minibatch_coresets(X, labels, m=6, r=24, P=2, rng=3, per_class=False)
    idx, subs, w = _np(out.indices), _np(out.subsets), _np(out.weights)
    for p in range(2):
        one = crestcore.facility_location(X[subs[p]], 6)
        np.testing.assert_array_equal(idx[p], subs[p][_np(one.indices)])
        np.testing.assert_array_equal(w[p], _np(one.weights))
    # the subsets are still stratified (labels were given)
    np.testing.assert_array_equal(np.bincount(np.searchsorted([-1, 3, 10], labels[subs[0]])),
                                  R.hamilton(24, np.unique(labels, return_counts=True)[1]))


def test_a_single_class_equals_no_classes():
    X = _features(7, 40)
    one = crestcore.minibatch_coresets(X, np.full(40, 2), m=5, r=15, P=3, rng=9)
    none = crestcore.minibatch_coresets(X, None, m=5, r=15, P=3, rng=9)
    for f in ("indices", "weights", "subsets"):
        np.testing.assert_array_equal(_np(getattr(one, f)), _np(getattr(none, f)))
    np.testing.assert_allclose(_np(one.objective), _np(none.objective), rtol=1e-12)


def test_pool_restricts_everything():
    X, labels = _features(8, 100), _labels(8, 100, 4)
    pool = np.arange(30, 70)
    out = crestcore.minibatch_coresets(X, labels, m=8, r=40, P=3, rng=0, pool=pool)
    subs, idx = _np(out.subsets), _np(out.indices)
    for p in range(3):  # r = pool size: every subset is the whole pool
        np.testing.assert_array_equal(subs[p], pool)
    assert np.all((idx >= 30) & (idx < 70))
    # a pool given in the features' library is accepted too
    import torch

    t = crestcore.minibatch_coresets(torch.asarray(X), torch.asarray(labels), m=8, r=40, P=3, rng=0,
                                     pool=torch.asarray(pool))
    np.testing.assert_array_equal(t.indices.numpy(), idx)


def test_m_equal_r_selects_the_whole_subset():
    X, labels = _features(9, 30), _labels(9, 30, 2)
    out = crestcore.minibatch_coresets(X, labels, m=10, r=10, P=2, rng=2)
    for p in range(2):
        assert sorted(_np(out.indices)[p].tolist()) == _np(out.subsets)[p].tolist()
        np.testing.assert_array_equal(_np(out.weights)[p], np.ones(10))


# ================================================================================================
# every array library
# ================================================================================================


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("class_budget", ["proportional", "ceil"])
def test_every_namespace_gives_the_numpy_answer(xp, dtype, class_budget):
    labels = np.repeat([0, 1, 2], [30, 4, 26])
    X = _features(10, 60, 4)
    base = crestcore.minibatch_coresets(X, labels, m=9, r=30, P=3, rng=5, class_budget=class_budget,
                                        backend="reference")
    Xx, lx = xp.asarray(X, dtype=dtype), xp.asarray(labels)
    out = crestcore.minibatch_coresets(Xx, lx, m=9, r=30, P=3, rng=5, class_budget=class_budget)
    xp.assert_native(out.indices, Xx, np.int64, ndim=2)
    xp.assert_native(out.subsets, Xx, np.int64, ndim=2)
    xp.assert_native(out.weights, Xx, dtype, ndim=2)
    xp.assert_native(out.gains, Xx, dtype, ndim=2)
    xp.assert_native(out.objective, Xx, dtype, ndim=1)
    np.testing.assert_array_equal(xp.to_numpy(out.subsets), _np(base.subsets))
    np.testing.assert_array_equal(xp.to_numpy(out.indices), _np(base.indices))
    np.testing.assert_array_equal(xp.to_numpy(out.weights), _np(base.weights))
    rtol = 1e-4 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(xp.to_numpy(out.objective), _np(base.objective), rtol=rtol)


def test_the_memory_guard_sizes_features_beyond_the_kernels_direct_limit_as_the_reference():
    """d above the Numba kernels' direct limit: the solve runs the array-API reference (about 4.5x the
    dense matrices at its peak); the guard used the native factor (1.25x) and let a 3x larger peak through."""
    from crestcore.backends import numba as nbk

    d = nbk._DIRECT_MAX_FEATURES + 1
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, d))
    y = np.arange(4000) % 4
    B, n = 4, 1000  # P = 1 subset of all 4000, 4 classes of 1000
    native_estimate = int(B * n * (1.25 * n + d) * 8)
    with pytest.raises(ValueError, match="reference path"):
        crestcore.minibatch_coresets(X, y, m=8, r=4000, P=1, rng=0, max_dense_bytes=int(1.01 * native_estimate))


def test_subsets_outside_the_pool_are_refused():
    """With both pool and subsets, a member outside the pool was merged into another class's problem (or
    an IndexError when its label sorted above every pool class)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 3))
    y = np.arange(30) % 3
    pool = np.flatnonzero(y != 2)
    inside = np.array([np.sort(rng.choice(pool, 8, replace=False)) for _ in range(2)])
    crestcore.minibatch_coresets(X, y, m=4, r=8, P=2, pool=pool, subsets=inside)
    outside = inside.copy()
    outside[0, 0] = 2  # class 2: not in the pool
    outside[0] = np.sort(outside[0])
    with pytest.raises(ValueError, match="pool"):
        crestcore.minibatch_coresets(X, y, m=4, r=8, P=2, pool=pool, subsets=outside)


def test_with_more_classes_than_picks_every_class_is_picked_and_weighted_without_bias():
    """200 classes of 50, m = 128 < C, r = 1000 (5 of each class in a subset): each class gets its one pick
    with probability 128/200, and then weight 5 / 0.64, so that its expected weight is its 5 members.
    With the fixed split classes 128-199 were never picked, at any selection."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(200), 50)
    X = rng.normal(size=(labels.size, 4))
    picked = np.zeros(200)
    weight = np.zeros(200)
    draws = 60
    for seed in range(draws):
        out = crestcore.minibatch_coresets(X, labels, m=128, r=1000, P=2, rng=seed)
        idx, w = _np(out.indices), _np(out.weights)
        for p in range(2):
            cls = labels[idx[p]]
            assert np.unique(cls).size == 128  # one pick for 128 classes of the subset
            np.testing.assert_allclose(w[p], 5 / 0.64)
            picked[cls] += 1
            weight += np.bincount(cls, weights=w[p], minlength=200)
    assert picked.min() > 0 and np.abs(picked / (2 * draws) - 0.64).max() < 0.25
    assert abs(weight.sum() / (2 * draws) - 1000) < 1e-9  # the coreset stands for the whole subset
    assert np.abs(weight / (2 * draws) - 5).mean() < 0.8  # about 5 per class on average


def test_a_share_of_the_rows_gives_those_rows_coresets():
    """Row p's random class budgets depend only on rng and p: one process of several solving rows 2-3 (with
    rows=) gets exactly what the call over all four rows gives them."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(30), 8)
    X = rng.normal(size=(labels.size, 3))
    subs = np.stack([np.sort(rng.choice(labels.size, 60, replace=False)) for _ in range(4)])
    kw = dict(m=20, r=60, subsets=subs)
    whole = crestcore.minibatch_coresets(X, labels, P=4, rng=np.random.default_rng(7), **kw)
    part = crestcore.minibatch_coresets(X, labels, P=2, rng=np.random.default_rng(7),
                                        **{**kw, "subsets": subs[2:]}, rows=np.array([2, 3]))
    np.testing.assert_array_equal(part.indices, whole.indices[2:])
    np.testing.assert_array_equal(part.weights, whole.weights[2:])
    with pytest.raises(ValueError, match="rows"):
        crestcore.minibatch_coresets(X, labels, P=2, rng=0, **{**kw, "subsets": subs[2:]}, rows=[3, 3])
    with pytest.raises(TypeError, match="rows must be an array of integer row numbers, got dtype float64"):
        crestcore.minibatch_coresets(X, labels, P=2, rng=0, **{**kw, "subsets": subs[2:]}, rows=[2.0, 3.0])
    with pytest.raises(ValueError, match="subsets"):
        crestcore.minibatch_coresets(X, labels, m=20, r=60, P=2, rng=0, rows=[0, 1])


def test_given_subsets_without_rng_are_refused_when_m_is_below_the_classes_present():
    """Review 109 F3: with subsets= and rng=None the class budgets took the fixed Hamilton split, which with m
    below the number of classes gave every pick to the same classes, reweighting none (weights summing to 50
    of r = 60, every call); the unbiased draw needs rng, so None is refused there. With m at least the number
    of classes the fixed split stays (every class gets a pick; the weights sum to r)."""
    lab = np.array([0] * 50 + [1] * 3 + [2] * 2 + [3] * 1 + [4] * 4)
    X = np.random.default_rng(0).normal(size=(lab.size, 2))
    V = np.arange(lab.size)[None, :]
    with pytest.raises(TypeError, match=r"rng is required: m \(3\) is below the number of classes in a subset \(5\)"):
        crestcore.minibatch_coresets(X, lab, m=3, r=60, P=1, subsets=V)
    c = crestcore.minibatch_coresets(X, lab, m=5, r=60, P=1, subsets=V)
    assert sorted(lab[c.indices[0]].tolist()) == [0, 1, 2, 3, 4] and c.weights.sum() == 60
    ceil = crestcore.minibatch_coresets(X, lab, m=3, r=60, P=1, subsets=V, class_budget="ceil")  # no draw there
    assert ceil.weights.sum() == 60


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), P=st.integers(1, 7), C=st.integers(1, 12), total=st.integers(0, 200),
       high=st.sampled_from([1, 3, 80, 1000]), sparse=st.booleans())
def test_apportion_rows_is_apportion_per_row(seed, P, C, total, high, sparse):
    """The class budgets' batched rounding equals crestcore.plan.apportion(at_least_one=True) row by row,
    each row on its own generator: the same units, probabilities and draws (empty rows, groups below one
    unit, the at-least-one fix included)."""
    from crestcore.minibatch import _apportion_rows
    from crestcore.plan import apportion

    rng = np.random.default_rng(seed)
    counts = rng.integers(0, high + 1, (P, C)) * (rng.random((P, C)) < (0.5 if sparse else 1.0))
    key = int(rng.integers(2**62))
    units, p = _apportion_rows(total, counts, [np.random.default_rng([key, q]) for q in range(P)])
    for q in range(P):
        u1, p1 = apportion(total, counts[q], np.random.default_rng([key, q]), at_least_one=True)
        np.testing.assert_array_equal(units[q], u1)
        np.testing.assert_array_equal(p[q], p1)


@pytest.mark.parametrize("class_budget", ["proportional", "ceil"])
def test_backend_numba_solves_host_input_on_the_numba_kernels(xp, class_budget, monkeypatch):
    """backend="numba": any host library's features are solved on the Numba kernels (the NumPy answer, in
    the input's namespace, device and dtype); device input is refused, not copied silently."""
    from crestcore.backends import numba as nb

    labels = np.repeat([0, 1, 2], [30, 4, 26])
    X = _features(11, 60, 4).astype(np.float32)
    base = crestcore.minibatch_coresets(X, labels, m=9, r=30, P=3, rng=5, class_budget=class_budget)
    Xx, lx = xp.asarray(X, dtype=np.float32), xp.asarray(labels)
    calls = []
    real = nb.facility_batched
    monkeypatch.setattr(nb, "facility_batched", lambda *a, **k: calls.append(1) or real(*a, **k))
    if "cuda" in xp.name or xp.name == "cupy":
        with pytest.raises(ValueError, match="backend='numba' runs the Numba kernels on the host"):
            crestcore.minibatch_coresets(Xx, lx, m=9, r=30, P=3, rng=5, class_budget=class_budget,
                                         backend="numba")
        return
    out = crestcore.minibatch_coresets(Xx, lx, m=9, r=30, P=3, rng=5, class_budget=class_budget,
                                       backend="numba")
    assert calls, "the Numba kernel was not called"
    xp.assert_native(out.indices, Xx, np.int64, ndim=2)
    xp.assert_native(out.subsets, Xx, np.int64, ndim=2)
    xp.assert_native(out.weights, Xx, np.float32, ndim=2)
    xp.assert_native(out.objective, Xx, np.float32, ndim=1)
    for f in ("indices", "subsets", "weights", "gains", "objective"):
        np.testing.assert_array_equal(xp.to_numpy(getattr(out, f)), _np(getattr(base, f)))


def test_backend_numba_keeps_low_precision_dtypes_and_refuses_device_tensors():
    torch = pytest.importorskip("torch")
    X = torch.from_numpy(_features(12, 80, 3).astype(np.float32))
    y = torch.from_numpy(np.repeat([0, 1], 40))
    for dt in (torch.bfloat16, torch.float16):
        auto = crestcore.minibatch_coresets(X.to(dt), y, m=8, r=40, P=2, rng=3)
        host = crestcore.minibatch_coresets(X.to(dt), y, m=8, r=40, P=2, rng=3, backend="numba")
        assert host.weights.dtype == auto.weights.dtype == dt and host.objective.dtype == dt
        assert torch.equal(host.indices, auto.indices) and torch.equal(host.weights, auto.weights)
        sel = crestcore.facility_location(X.to(dt), 6, labels=y, backend="numba")
        ref = crestcore.facility_location(X.to(dt), 6, labels=y)
        assert torch.equal(sel.indices, ref.indices) and torch.equal(sel.weights, ref.weights)
        assert isinstance(sel.objective, torch.Tensor) and sel.objective.dtype == dt
    with pytest.raises(ValueError, match="the features are on meta"):
        crestcore.minibatch_coresets(X.to("meta"), y.to("meta"), m=8, r=40, P=2, rng=3, backend="numba")
    with pytest.raises(ValueError, match="backend must be one of"):
        crestcore.facility_location(X, 6, backend="numbaa")
    # a neighbour graph given as an array travels to the host with the features; a count K stays a count
    g = crestcore.facility_location(X, 6, neighbors=5, backend="numba")
    assert g.path == "sparse" and torch.equal(g.indices, crestcore.facility_location(X, 6, neighbors=5).indices)


def test_numpy_bool_per_class_and_a_small_memory_need_in_its_unit():
    """per_class=np.True_ is a bool (its error once read "must be a bool, got bool"); a refused dense
    problem states its need in the unit that shows it, not as "0.00 GiB"."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(300, 5)), np.arange(300) % 3
    a = crestcore.minibatch_coresets(X, y, m=12, r=60, P=2, rng=0, per_class=np.True_)
    b = crestcore.minibatch_coresets(X, y, m=12, r=60, P=2, rng=0, per_class=True)
    np.testing.assert_array_equal(a.indices, b.indices)
    from crestcore.minibatch import DenseMemoryError

    with pytest.raises(DenseMemoryError, match=r"would need \d+\.\d\d KiB"):
        crestcore.minibatch_coresets(X, y, m=12, r=60, P=2, rng=0, max_dense_bytes=1000, per_class=False)


@pytest.mark.parametrize("backend", ["numpy", "torch", "reference"])
def test_given_subsets_are_taken_sorted_so_ties_go_to_the_lowest_index(backend):
    """A pre-drawn subset listing its members in another order is the same problem: rows 3 and 7 are
    duplicates, and the pick is 3 (ties to the lowest index) whatever order the row lists them in; the
    result's subsets are sorted, as its docstring says (before, the given order was kept and 7 was picked
    from [7, 3, ...])."""
    X = np.zeros((10, 2))
    X[:, 0] = np.arange(10.0)
    X[7] = X[3]
    rows = np.array([[7, 3, 0, 1, 2, 4, 5, 6], [6, 5, 4, 2, 1, 0, 3, 7]])
    conv = (lambda a: a)
    if backend == "torch":
        torch = pytest.importorskip("torch")
        conv = torch.from_numpy
    kw = dict(m=1, r=8, P=2, rng=0, backend="reference" if backend == "reference" else "auto")
    got = crestcore.minibatch_coresets(conv(X), None, subsets=conv(rows), **kw)
    want = crestcore.minibatch_coresets(conv(X), None, subsets=conv(np.sort(rows, axis=1)), **kw)
    assert _np(got.indices).tolist() == [[3], [3]]
    np.testing.assert_array_equal(_np(got.subsets), np.sort(rows, axis=1))
    for a, b in zip((got.indices, got.weights, got.gains, got.objective, got.subsets),
                    (want.indices, want.weights, want.gains, want.objective, want.subsets)):
        np.testing.assert_array_equal(_np(a), _np(b))
    assert rows[0, 0] == 7  # the caller's array is not sorted in place


@pytest.mark.parametrize("optimizer", ["lazy", "stochastic"])
def test_problems_without_a_pick_are_not_solved(optimizer, monkeypatch):
    """With fewer picks than classes (m < C) most classes of a subset get no pick; those problems are left
    out of the batched solve (at C = 1000, r = 13,000, m = 128 a call took 7.5-12x longer with them:
    benchmarks/minibatch_ab.py), and each class's picks and weights are those of its own problem: no pick
    for the others."""
    import crestcore.minibatch as mb

    seen = []
    solve = mb.solve_batched

    def spy(xp, X, valid, budgets, **kw):
        seen.append(np.asarray(budgets).copy())
        return solve(xp, X, valid, budgets, **kw)

    monkeypatch.setattr(mb, "solve_batched", spy)
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(40), 6)
    X = rng.normal(size=(labels.size, 3))
    out = crestcore.minibatch_coresets(X, labels, m=10, r=120, P=3, rng=5, optimizer=optimizer)
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], np.ones(30))  # 10 classes with a pick in each of 3 subsets, of 120
    idx, w, subs = _np(out.indices), _np(out.weights), _np(out.subsets)
    for p in range(3):
        assert (idx[p] >= 0).all() and np.unique(labels[idx[p]]).size == 10
        for c in np.unique(labels[idx[p]]):
            members = subs[p][labels[subs[p]] == c]
            one = crestcore.facility_location(X[members], 1, optimizer="lazy")
            if optimizer == "lazy":  # the class's own problem gives the same pick
                assert idx[p][labels[idx[p]] == c].tolist() == members[_np(one.indices)].tolist()
        np.testing.assert_allclose(w[p].sum(), 120.0)  # the coreset stands for its subset (weights / p)


def test_features_in_any_layout_are_gathered_by_the_rows_taken():
    """Review 129: ``np.take(X, rows, axis=0)`` copies all of an array that is not in C order first (a
    Fortran-ordered one, a column slice), and the selections gather rows that way: once per call in
    minibatch_coresets, and per step or per class in GLISTER's stochastic greedy and GradMatch (450x and 150x
    slower than C order at n = 10^5). Rows are gathered by fancy indexing there: the same picks, and no copy of
    the whole array (traced allocations within a quarter of its size of the C-ordered call's)."""
    import tracemalloc

    from crestcore.baselines import glister, gradmatch

    rng = np.random.default_rng(0)
    n, d = 100_000, 40
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, 10, n)
    Zv, yv, Ev = (rng.standard_normal((50, 10)).astype(np.float32), rng.integers(0, 10, 50),
                  rng.standard_normal((50, 4)).astype(np.float32))
    calls = {
        "minibatch_coresets": lambda A: crestcore.minibatch_coresets(A, y, m=16, r=200, P=4, rng=0).indices,
        "gradmatch per_batch": lambda A: gradmatch(A, 5, per_batch=np.arange(n) // 2000).indices,
        "glister stochastic": lambda A: glister(A, Zv, yv, 20, val_embeddings=Ev, optimizer="stochastic",
                                                rng=0).indices,
    }
    wide = rng.standard_normal((n, 2 * d)).astype(np.float32)
    wide[:, ::2] = X
    def traced(call, A):
        call(A)  # warm (kernels loaded)
        tracemalloc.start()
        try:
            return np.asarray(call(A)), tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    for name, call in calls.items():
        want, base = traced(call, X)
        for layout, A in (("Fortran", np.asfortranarray(X)), ("strided", wide[:, ::2])):
            assert not A.flags.c_contiguous
            got, peak = traced(call, A)
            np.testing.assert_array_equal(got, want, err_msg=f"{name}, {layout}")
            assert peak < base + X.nbytes / 4, f"{name} on a {layout} array: peak {peak} bytes, C order {base}"


def test_half_precision_and_tiny_features_are_converted_and_rescaled_in_the_rows_gathered_only():
    """Review 129: minibatch_coresets converted all n rows of float16 features to float32, and rescaled all of
    features of a tiny magnitude, at every call, for the P x r rows it selects from (793 ms against 22 ms for
    float32 at n = 10^6). The numerics policy now applies to the gathered rows: the same picks as the whole
    array converted by the caller, and allocations far below a whole copy; a NaN anywhere is still refused."""
    import tracemalloc

    rng = np.random.default_rng(0)
    n, d = 200_000, 16
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, 10, n)
    def call(F):
        return crestcore.minibatch_coresets(F, y, m=16, r=200, P=4, rng=0)

    def traced(F):
        call(F)
        tracemalloc.start()
        try:
            return call(F), tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    _, base = traced(X)  # float32 in a safe range: nothing converted
    for name, A, same_as in (("float16", X.astype(np.float16), X.astype(np.float16).astype(np.float32)),
                             ("tiny float32", X * np.float32(2.0 ** -60), X)):
        want = call(same_as)
        got, peak = traced(A)
        np.testing.assert_array_equal(got.indices, want.indices, err_msg=name)
        np.testing.assert_array_equal(got.weights, want.weights.astype(got.weights.dtype), err_msg=name)
        assert got.weights.dtype == A.dtype
        assert peak < base + A.nbytes / 4, f"{name}: peak {peak} bytes, float32 {base}"
        bad = A.copy()
        bad[n - 1, 3] = np.nan
        with pytest.raises(ValueError, match="features contains NaN or infinite values"):
            call(bad)


@pytest.mark.parametrize("given", [False, True])
def test_long_tailed_classes_build_and_solve_only_the_problems_with_picks(given):
    """Review 129: every (subset, class) problem was built padded to the largest class's share of r, picks or
    not (one class of 90 % and 999 small ones, P = 100: 887 MiB for 64,000 members, unseen by the memory
    guard), the stochastic draws were one padded block, and the torch kernels solved one padded batch (nine
    small classes beside a large one: 4.7x the time of two classes). Only the problems with a pick are built,
    the draws are kept ragged, and the torch, CuPy and generic kernels solve groups of similar sizes: the same
    coresets on every backend, and allocations far below the padded tables."""
    import tracemalloc

    rng = np.random.default_rng(0)
    n, d, C = 10_000, 8, 200
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = np.zeros(n, dtype=np.int64)
    y[: n // 10] = np.arange(n // 10) % (C - 1) + 1
    y = rng.permutation(y)
    subsets = crestcore.draw_subsets(y, np.arange(n), 640, 20, np.random.default_rng(1)) if given else None
    kw = dict(m=32, r=640, P=20, rng=0, subsets=subsets)
    for optimizer in ("lazy", "stochastic"):
        base = crestcore.minibatch_coresets(X, y, optimizer=optimizer, **kw)
        tracemalloc.start()
        try:
            crestcore.minibatch_coresets(X, y, optimizer=optimizer, **kw)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # 11.5-15.5 MiB; with every problem's tables padded 31.5-37 MiB (lazy) and 76 MiB (stochastic)
        assert peak < 22 * 2**20, (optimizer, peak)
        ref = crestcore.minibatch_coresets(X, y, optimizer=optimizer, backend="reference", **kw)
        for f in ("indices", "weights", "subsets"):
            np.testing.assert_array_equal(getattr(ref, f), getattr(base, f), err_msg=f"{optimizer} {f}")
        np.testing.assert_allclose(ref.objective, base.objective, rtol=1e-5)
        torch = pytest.importorskip("torch")
        tt = crestcore.minibatch_coresets(torch.from_numpy(X), torch.from_numpy(y), optimizer=optimizer,
                                          **{**kw, "subsets": None if subsets is None else torch.from_numpy(subsets)})
        np.testing.assert_array_equal(tt.indices.numpy(), base.indices, err_msg=optimizer)
        np.testing.assert_array_equal(tt.weights.numpy(), base.weights, err_msg=optimizer)


def test_small_problems_of_many_features_stay_on_the_fused_kernel(monkeypatch):
    """Review 129: past 192 features every problem went to the generic path (a BLAS Gram product and
    exact_shift's passes over (B, n, d)), 2.5-4.5x slower than the Numba kernel for problems of 32-64 points up
    to d = 4,096. Small problems stay on the kernel, with the generic path's picks; large ones still go to BLAS."""
    from crestcore.backends import get_kernel
    from crestcore.backends import numba as nb

    assert get_kernel("facility_batched", "numpy", np.zeros((1, 64, 4096))) is nb.facility_batched
    assert get_kernel("facility_batched", "numpy", np.zeros((1, 256, 512))) is nb.facility_batched
    assert get_kernel("facility_batched", "numpy", np.zeros((1, 256, 2048))) is None
    assert get_kernel("facility_batched", "numpy", np.zeros((1, 1000, 193))) is None
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 300)).astype(np.float32)
    y = np.arange(3000) % 10
    calls = []
    real = nb.facility_batched
    monkeypatch.setattr(nb, "facility_batched", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = crestcore.minibatch_coresets(X, y, m=32, r=320, P=4, rng=0)
    assert calls, "the fused kernel was not called"
    monkeypatch.setattr(nb, "_DIRECT_MAX_FEATURES", 0)  # every d to the generic path
    want = crestcore.minibatch_coresets(X, y, m=32, r=320, P=4, rng=0)
    assert len(calls) == 1
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.weights, want.weights)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_row_no_problem_holds_does_not_set_the_scale(backend):
    """Review 132: one float32 row of magnitude 1e24 outside the pool (never in a subset) set the power-of-two
    rescaling of every problem: their squared distances became 0 on the torch and generic kernels, every
    objective 0 and the picks the lowest indices, silently; tiny features (1e-25) beside one ordinary row
    elsewhere were not rescaled at all. The scale is the gathered rows'."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 8)).astype(np.float32)
    y = rng.integers(0, 4, 400)
    pool = np.arange(1, 399)  # rows 0 (which padding slots gathered before) and 399 in no problem
    conv = (lambda a: a)
    if backend == "torch":
        torch = pytest.importorskip("torch")
        conv = torch.from_numpy
    kw = dict(m=12, r=200, P=2, rng=0, pool=conv(pool), backend="reference" if backend == "reference" else "auto")
    for base, odd in ((X, 1e24), (X * np.float32(1e-25), 1.0)):
        clean = crestcore.minibatch_coresets(conv(base), conv(y), **kw)
        other = base.copy()
        other[[0, -1]] = odd
        got = crestcore.minibatch_coresets(conv(other), conv(y), **kw)
        assert float(np.asarray(clean.objective).min()) > 0
        np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(clean.indices))
        np.testing.assert_array_equal(np.asarray(got.objective), np.asarray(clean.objective))


def test_long_tailed_problems_gather_their_features_at_their_own_width(monkeypatch):
    """Review 138: every problem with a pick gathered its features padded to the largest class's share (one class
    of 25,000 beside 99 of 250: 163,815 rows gathered for 10,000 members, 8.4 GiB with embeddings), on every
    kernel; each size group now gathers at its own width: at most twice the members, the same coresets."""
    import crestcore.minibatch as mb

    rng = np.random.default_rng(0)
    y = np.concatenate([np.zeros(2500, np.int64)] + [np.full(25, c, np.int64) for c in range(1, 100)])
    rng.shuffle(y)
    X = rng.standard_normal((y.size, 12)).astype(np.float32)
    want = crestcore.minibatch_coresets(X, y, m=64, r=2000, P=5, rng=1, backend="reference")
    rows = []
    real = mb.take_rows
    monkeypatch.setattr(mb, "take_rows", lambda xp, A, idx: rows.append(int(idx.shape[0])) or real(xp, A, idx))
    got = crestcore.minibatch_coresets(X, y, m=64, r=2000, P=5, rng=1)
    assert sum(rows) <= 2 * 5 * 2000, rows
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.weights, want.weights)
