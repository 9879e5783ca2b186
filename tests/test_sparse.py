"""The sparse nearest-neighbour path (``facility_location(..., neighbors=K)``), its kernels, the faiss
graph builder and the planner (``optimizer="auto"``).

The oracle is tests/reference.py on the sparse similarity built here from the definition (the reference
distances, the exact K nearest other points, the kernel on those pairs, 0 elsewhere); index comparisons
only on tie-free instances, as in tests/test_facility.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import crestcore
import reference as R
from crestcore import planner
from crestcore._compat import to_numpy
from array_api_compat import array_namespace
from crestcore.sparse import check_neighbors, exact_knn

METRICS = ("euclidean", "sqeuclidean", "cosine")
KERNELS = ("max-minus", "exp")


def _features(seed, n, d):
    return np.random.default_rng(seed).normal(size=(n, d))


def _knn_from_reference(X, K, metric):
    D = R.distances(X, metric)
    np.fill_diagonal(D, np.inf)
    return np.argsort(D, axis=1, kind="stable")[:, :K].astype(np.int64)


def _sparse_similarity(X, nbr, metric, kernel):
    """The documented sparse similarity, from the definition: kernel on the graph's pairs and the
    diagonal, 0 elsewhere; max-minus uses the largest distance among the graph's pairs."""
    n = X.shape[0]
    D = R.distances(X, metric)
    mask = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in nbr[i]:
            if j >= 0:
                mask[i, j] = True
    if kernel == "max-minus":
        M = D[mask].max() if mask.any() else 0.0
        S = np.where(mask, M - D, 0.0)
        np.fill_diagonal(S, M)
    else:
        S = np.where(mask, np.exp(-D / X.shape[1]), 0.0)
        np.fill_diagonal(S, 1.0)
    return S


def _sparse_weights(S, nbr, picks):
    """Each point to its most similar pick among itself and its neighbours (earliest on ties)."""
    w = np.zeros(len(picks))
    for i in range(S.shape[0]):
        cands = {i, *[int(j) for j in nbr[i] if j >= 0]}
        best, a = -np.inf, -1
        for t, j in enumerate(picks):
            if j in cands and S[i, j] > best:
                best, a = S[i, j], t
        if a >= 0:
            w[a] += 1
    return w


def _tie_free(expected, rel=1e-9):
    return expected["margin"] > rel * max(1.0, float(np.max(np.abs(expected["gains"]))))


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(3, 40), d=st.integers(1, 5),
       metric=st.sampled_from(METRICS), kernel=st.sampled_from(KERNELS),
       optimizer=st.sampled_from(("naive", "lazy")), backend=st.sampled_from(("auto", "reference")),
       given_graph=st.booleans(), data=st.data())
def test_sparse_equals_the_reference_on_the_sparse_similarity(seed, n, d, metric, kernel, optimizer, backend,
                                                                given_graph, data):
    K = data.draw(st.integers(1, n - 1), label="K")
    k = data.draw(st.integers(1, n), label="k")
    X = _features(seed, n, d)
    nbr = _knn_from_reference(X, K, metric)
    if not given_graph:  # the exact search must find the same graph: no distance ties at the K-th place
        D = np.sort(np.where(np.eye(n, dtype=bool), np.inf, R.distances(X, metric)), axis=1)
        assume(K == n - 1 or np.all(D[:, K] - D[:, K - 1] > 1e-9 * max(1.0, float(D[:, :-1].max()))))
    S = _sparse_similarity(X, nbr, metric, kernel)
    expected = R.facility_location(S, k, metric="precomputed")
    assume(_tie_free(expected))
    sel = crestcore.facility_location(X, k, metric=metric, kernel=kernel, optimizer=optimizer, backend=backend,
                                      neighbors=nbr if given_graph else K)
    assert sel.path == "sparse"
    np.testing.assert_array_equal(sel.indices, expected["indices"])
    scale = max(1.0, abs(expected["objective"]))
    np.testing.assert_allclose(sel.gains, expected["gains"], rtol=1e-9, atol=1e-9 * scale)
    assert float(sel.objective) == pytest.approx(expected["objective"], rel=1e-9, abs=1e-9 * scale)
    sims = S[:, sel.indices]
    if k > 1:  # tie-free assignment too
        top2 = np.sort(sims, axis=1)[:, -2:]
        assume(np.all((top2[:, 1] - top2[:, 0] > 1e-9 * scale) | (top2[:, 1] == 0)))
    np.testing.assert_array_equal(sel.weights, _sparse_weights(S, nbr, list(sel.indices)))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_complete_graph_equals_the_dense_path(metric, kernel, backend):
    """K = n - 1: every pair is in the graph, so picks, weights, gains and objective are the dense ones."""
    X = _features(7, 60, 4)
    for optimizer in ("lazy", "stochastic"):
        dense = crestcore.facility_location(X, 9, metric=metric, kernel=kernel, optimizer=optimizer, rng=3)
        sparse = crestcore.facility_location(X, 9, metric=metric, kernel=kernel, optimizer=optimizer, rng=3,
                                             neighbors=59, backend=backend)
        np.testing.assert_array_equal(sparse.indices, dense.indices)
        np.testing.assert_array_equal(sparse.weights, dense.weights)
        np.testing.assert_allclose(sparse.gains, dense.gains, rtol=1e-9)
        assert float(sparse.objective) == pytest.approx(float(dense.objective), rel=1e-12)


def test_complete_graph_per_class_equals_the_dense_path():
    """With labels each class gets its own graph; K >= a class's size - 1 gives that class its complete graph."""
    X = _features(8, 90, 3)
    labels = np.repeat([2, 0, 5], [40, 30, 20])
    dense = crestcore.facility_location(X, 12, labels=labels)
    sparse = crestcore.facility_location(X, 12, labels=labels, neighbors=39)  # classes of 30 and 20: complete
    np.testing.assert_array_equal(sparse.indices, dense.indices)
    np.testing.assert_array_equal(sparse.weights, dense.weights)
    assert float(sparse.objective) == pytest.approx(float(dense.objective), rel=1e-12)
    # a given global graph: cross-class pairs are ignored
    nbr = _knn_from_reference(X, 89, "euclidean")
    given = crestcore.facility_location(X, 12, labels=labels, neighbors=nbr)
    np.testing.assert_array_equal(given.indices, dense.indices)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_lazy_equals_naive_on_a_larger_sparse_instance(backend):
    X = _features(12, 400, 6)
    naive = crestcore.facility_location(X, 40, neighbors=8, optimizer="naive", backend=backend)
    lazy = crestcore.facility_location(X, 40, neighbors=8, optimizer="lazy", backend=backend)
    np.testing.assert_array_equal(lazy.indices, naive.indices)
    np.testing.assert_array_equal(lazy.gains, naive.gains)
    np.testing.assert_array_equal(lazy.weights, naive.weights)


def test_numba_kernels_equal_the_reference_kernels():
    X = _features(13, 300, 5)
    for optimizer in ("lazy", "stochastic"):
        a = crestcore.facility_location(X, 30, neighbors=6, optimizer=optimizer, rng=5, backend="reference")
        b = crestcore.facility_location(X, 30, neighbors=6, optimizer=optimizer, rng=5)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.weights, b.weights)
        np.testing.assert_allclose(a.gains, b.gains, rtol=1e-10)
    # the stochastic sample is used: another seed picks differently
    c = crestcore.facility_location(X, 30, neighbors=6, optimizer="stochastic", rng=6)
    assert not np.array_equal(c.indices, b.indices)


def test_uncovered_points_count_for_nobody():
    """A hand-made graph where point 3 has only neighbour 2 and 2 is not picked: weights sum to the
    covered points, and the objective is the sum over covered points."""
    X = np.array([[0.0], [1.0], [5.0], [6.0], [0.5]])
    nbr = np.array([[4, -1], [4, -1], [3, -1], [2, -1], [0, 1]])
    sel = crestcore.facility_location(X, 1, neighbors=nbr, kernel="exp", scale=1.0)
    assert sel.indices.tolist() == [4]  # covers 0, 1 and itself
    np.testing.assert_array_equal(sel.weights, [3.0])
    assert float(sel.objective) == pytest.approx(1.0 + 2 * math.exp(-0.5), rel=1e-12)


def test_sparse_in_every_namespace(xp):
    X = _features(14, 50, 3)
    base = crestcore.facility_location(X, 6, neighbors=7, backend="reference")
    Xx = xp.asarray(X)
    sel = crestcore.facility_location(Xx, 6, neighbors=7)
    xp.assert_native(sel.indices, Xx, np.int64, ndim=1)
    xp.assert_native(sel.weights, Xx, np.float64, ndim=1)
    xp.assert_native(sel.objective, Xx, np.float64, ndim=0)
    np.testing.assert_array_equal(xp.to_numpy(sel.indices), base.indices)
    np.testing.assert_array_equal(xp.to_numpy(sel.weights), base.weights)


def test_input_is_not_modified():
    X = _features(15, 80, 3)
    nbr = _knn_from_reference(X, 5, "euclidean")
    X0, nbr0 = X.copy(), nbr.copy()
    crestcore.facility_location(X, 8, neighbors=nbr)
    crestcore.facility_location(X, 8, neighbors=5)
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(nbr, nbr0)


def test_float32_input_gives_float32_results():
    X = _features(16, 70, 3).astype(np.float32)
    sel = crestcore.facility_location(X, 7, neighbors=6)
    assert sel.weights.dtype == np.float32 and sel.gains.dtype == np.float32 and sel.objective.dtype == np.float32
    ref = crestcore.facility_location(X, 7, neighbors=6, backend="reference")
    np.testing.assert_array_equal(sel.indices, ref.indices)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_neighbors_at_least_n_is_refused_clearly():
    X = _features(0, 10, 2)
    with pytest.raises(ValueError, match=r"neighbors=10 must be smaller than the number of points n=10"):
        crestcore.facility_location(X, 3, neighbors=10)
    with pytest.raises(ValueError, match="neighbors must be >= 1"):
        crestcore.facility_location(X, 3, neighbors=0)
    with pytest.raises(TypeError, match="neighbors"):
        crestcore.facility_location(X, 3, neighbors=True)
    with pytest.raises(TypeError, match="neighbors"):
        crestcore.facility_location(X, 3, neighbors=2.5)
    with pytest.raises(ValueError, match="precomputed"):
        crestcore.facility_location(np.ones((10, 10)), 3, metric="precomputed", neighbors=3)


def _ring(n=10):
    i = np.arange(n)
    return np.stack([(i + 1) % n, (i + 2) % n], axis=1).astype(np.int64)


def _with(g, r, c, v):
    g = g.copy()
    g[r, c] = v
    return g


@pytest.mark.parametrize("graph, match", [
    (_ring()[:9], r"shape \(n, K\)"),
    (_ring().astype(np.float64), "integers"),
    (_with(_ring(), 4, 1, 12), r"indices in \[0, 10\)"),
    (_with(_ring(), 4, 1, -2), r"indices in \[0, 10\)"),
    (_with(_ring(), 0, 1, 0), "row 0 lists point 0 itself"),
    (_with(_ring(), 3, 1, 4), "row 3 lists a neighbour twice"),
    (np.zeros((10, 10), dtype=np.int64), "at most n - 1"),
])
def test_bad_neighbour_graphs_are_refused(graph, match):
    with pytest.raises((ValueError, TypeError), match=match):
        check_neighbors(graph, 10)
    assert check_neighbors(_with(_ring(), 3, 1, -1), 10).shape == (10, 2)  # -1 = no neighbour is fine


# ------------------------------------------------------------------------------------------------
# the faiss graph builder ([ann] extra)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, err, match", [
    (lambda X, bad: ("build", (bad, 5), {}), ValueError, "NaN or infinite"),
    (lambda X, bad: ("build", (X, 2.9), {}), TypeError, "K must be an integer"),
    (lambda X, bad: ("build", (X, True), {}), TypeError, "K must be an integer"),
    (lambda X, bad: ("build", (X, 2), dict(method="ivf", seed=-1)), ValueError, "seed must be >= 0"),
    (lambda X, bad: ("build", (X, 2), dict(nprobe=2.5)), TypeError, "nprobe must be an integer"),
    (lambda X, bad: ("build", (X.astype(np.int64), 2), {}), TypeError, "real floating"),
    (lambda X, bad: ("build", (X[:, :0], 2), {}), ValueError, "empty"),
    (lambda X, bad: ("exact_knn", (X.astype(np.int64), 2), {}), TypeError, "X must have a real floating"),
    (lambda X, bad: ("exact_knn", (bad, 2), {}), ValueError, "NaN or infinite"),
    (lambda X, bad: ("exact_knn", (X, 2.5), {}), TypeError, "K must be an integer"),
])
def test_the_graph_builders_check_their_arguments(call, err, match):
    """A NaN row once gave a graph of -1 for every point (faiss ranks NaN distances last), which as
    neighbors= made the selection the lowest indices with weight 1: refused now, as every entry point does."""
    X = np.random.default_rng(0).normal(size=(40, 4))
    bad = X.copy()
    bad[7, 1] = np.nan
    name, args, kw = call(X, bad)
    if name == "build":
        pytest.importorskip("faiss")
        from crestcore.backends import knn

        fn = knn.build
    else:
        def fn(X, K):
            return exact_knn(np, X, K, "euclidean")
    with pytest.raises(err, match=match):
        fn(*args, **kw)


def test_faiss_exact_graph_is_the_exact_graph():
    pytest.importorskip("faiss")
    from crestcore.backends import knn

    X = _features(20, 500, 8)
    for metric in METRICS:
        ref = exact_knn(np, X, 6, metric)
        got, how = knn.build(X, 6, metric, method="exact")
        assert how == "faiss-exact"
        # float32 search: compare as sets of neighbours (order within near-ties may differ)
        same = np.mean([len(set(a) & set(b)) / 6 for a, b in zip(ref, got)])
        assert same > 0.99
        assert not np.any(got == np.arange(500)[:, None])


def test_faiss_graph_does_not_depend_on_the_datas_scale():
    """faiss searches in float32: data far outside float32's range (or far from the origin) is centred
    and rescaled first, so the graph is the one of the data at a tame scale (before: overflow to inf or
    underflow to 0 in the squared distances, and other neighbours)."""
    pytest.importorskip("faiss")
    from crestcore.backends import knn

    X = _features(30, 300, 3)
    for metric in METRICS:
        base, _ = knn.build(X, 5, metric, method="exact")
        for scale in (1e20, 1e-25):
            got, _ = knn.build(X * scale, 5, metric, method="exact")
            np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(base, axis=1))
    far, _ = knn.build(X + 1e6, 5, "euclidean", method="exact")
    ref = exact_knn(np, X, 5, "euclidean")
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ref, far)]) > 0.99


def test_faiss_cosine_graph_of_directions_close_together_is_the_exact_graph():
    """Directions 1e-4 apart around a common one: cosine distances of about 1e-8, below what float32's
    inner products resolve (review 69: the faiss graph held 0.9 % of the true neighbours). Unit rows are
    searched by their centred euclidean distances; rows of zeros keep the inner-product search."""
    pytest.importorskip("faiss")
    from crestcore.backends import knn

    X = 7.0 + 1e-3 * np.random.default_rng(0).normal(size=(600, 3))
    ref = exact_knn(np, X, 8, "cosine")
    got, how = knn.build(X, 8, "cosine", method="exact")
    assert how == "faiss-exact"
    assert np.mean([len(set(a) & set(b)) / 8 for a, b in zip(ref, got)]) > 0.99
    Z = np.vstack([X[:100], np.zeros((2, 3))])  # zero rows: cosine distance 1 from every row
    got, _ = knn.build(Z, 4, "cosine", method="exact")
    assert not np.isin(got[:100], [100, 101]).any()  # never a unit row's near neighbour


def test_faiss_ivf_graph_is_deterministic_and_accurate_on_clustered_data():
    pytest.importorskip("faiss")
    from crestcore.backends import knn

    rng = np.random.default_rng(21)
    centers = rng.normal(size=(20, 8)) * 5
    X = centers[rng.integers(0, 20, 3000)] + rng.normal(size=(3000, 8))
    X0 = X.copy()
    a, how = knn.build(X, 10, "euclidean", method="ivf", seed=1)
    b, _ = knn.build(X, 10, "euclidean", method="ivf", seed=1)
    assert how == "faiss-ivf"
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(X, X0)
    ref = exact_knn(np, X, 10, "euclidean")
    recall = np.mean([len(set(r) & set(g)) / 10 for r, g in zip(ref, a)])
    assert recall > 0.9
    with pytest.raises(ValueError, match="K must be"):
        knn.build(X, 3000, "euclidean")


# ------------------------------------------------------------------------------------------------
# the planner
# ------------------------------------------------------------------------------------------------


def test_planner_decisions():
    # fits densely
    p = planner.plan_problem(1000, 10, 100, 8, 1 << 30)
    assert p.path == "dense" and p.optimizer == "lazy" and p.bytes == 8_000_000
    # dense too big, matrix-free cheap enough
    p = planner.plan_problem(5000, 10, 500, 8, 100_000_000)
    assert p.path == "matrix-free" and p.bytes <= 100_000_000
    # big n: sparse with the default K
    p = planner.plan_problem(60_000, 64, 6000, 8, 1 << 30)
    assert p.path == "sparse" and p.neighbors == planner.AUTO_NEIGHBORS and p.bytes <= 1 << 30
    # tight memory lowers K, never below MIN_NEIGHBORS, and never past the budget
    budget = crestcore.sparse.sparse_bytes(60_000, 64, 6)
    p = planner.plan_problem(60_000, 64, 6000, 8, budget)
    assert p.path == "sparse" and p.neighbors == 6 and p.bytes <= budget
    # a given K is kept
    p = planner.plan_problem(60_000, 64, 6000, 8, 1 << 30, neighbors=5)
    assert p.neighbors == 5
    # nothing fits: the error names the max_dense_bytes that would do, and that value works
    with pytest.raises(ValueError, match=r"max_dense_bytes >= (\d+) \(the sparse path, neighbors=4\)") as e:
        planner.plan_problem(60_000, 64, 6000, 8, 10_000_000)
    need = int(str(e.value).split("max_dense_bytes >= ")[1].split(" ")[0])
    assert planner.plan_problem(60_000, 64, 6000, 8, need).bytes <= need


def test_auto_records_the_plan_and_solves_on_it():
    X = _features(30, 400, 3)
    dense = crestcore.facility_location(X, 20, optimizer="auto")
    assert dense.path == "dense" and "fits max_dense_bytes" in dense.plan
    np.testing.assert_array_equal(dense.indices, crestcore.facility_location(X, 20).indices)
    mf = crestcore.facility_location(X, 20, optimizer="auto", max_dense_bytes=400 * 400 * 8 - 1)
    assert mf.path == "matrix-free" and "matrix-free work" in mf.plan
    np.testing.assert_array_equal(mf.indices, dense.indices)
    # force the sparse choice by a tiny work limit
    old = planner.MATRIX_FREE_MAX_WORK
    try:
        planner.MATRIX_FREE_MAX_WORK = 1.0
        sp = crestcore.facility_location(X, 20, optimizer="auto", max_dense_bytes=300_000)
    finally:
        planner.MATRIX_FREE_MAX_WORK = old
    assert sp.path == "sparse"
    K = int(sp.plan.split("sparse (neighbors=")[1].split(")")[0])  # lowered to fit the budget
    assert planner.MIN_NEIGHBORS <= K < planner.AUTO_NEIGHBORS
    assert crestcore.sparse.graph_bytes(400, 3, K) <= 300_000 < crestcore.sparse.graph_bytes(400, 3, K + 1)
    np.testing.assert_array_equal(sp.indices, crestcore.facility_location(X, 20, neighbors=K).indices)
    # per class: the small classes go dense, the big one not
    labels = (np.arange(400) < 300).astype(np.int64)
    two = crestcore.facility_location(X, 20, labels=labels, optimizer="auto", max_dense_bytes=200 * 200 * 8)
    assert two.path == "dense+matrix-free"
    with pytest.raises(ValueError, match="too small for any path"):
        crestcore.facility_location(X, 20, optimizer="auto", max_dense_bytes=1000)


def test_max_minus_on_a_graph_of_exact_duplicates_still_covers_every_group():
    """Every point with K or more exact duplicates: every edge of the graph is at distance 0, so its
    largest distance M is 0; with M = 0 every similarity was 0 and the greedy took the lowest indices
    (all from one group). Any positive M keeps duplicates covering each other: one pick per group."""
    rng = np.random.default_rng(3)
    X = np.repeat(rng.normal(size=(6, 3)) * 10, 5, axis=0)  # 6 groups of 5 identical points
    for backend in ("auto", "reference"):
        sel = crestcore.facility_location(X, 6, neighbors=4, backend=backend)
        groups = np.asarray(sel.indices) // 5
        assert sorted(groups.tolist()) == list(range(6)), (backend, sel.indices)
        assert float(np.sum(sel.weights)) == 30


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_float32_gains_of_a_large_graph_are_accurate_on_the_reference_path(backend):
    """The reference (and the torch/CuPy paths that run it) sums each candidate's gain as a difference of
    two prefix sums over the whole graph: in float32 that difference lost about log10(n K) digits (at
    n = 20,000, K = 10 the gains were off by about 1e-3 relative, and the picks left the exact greedy's).
    The sums now run in float64, as the Numba kernel's."""
    if backend == "torch":
        torch = pytest.importorskip("torch")
    X = _features(21, 20000, 4).astype(np.float32)
    kw = dict(neighbors=10, optimizer="lazy", metric="euclidean", kernel="exp")
    exact = crestcore.facility_location(X, 60, **kw)  # Numba: float64 sums per candidate
    got = crestcore.facility_location(torch.from_numpy(X) if backend == "torch" else X, 60,
                                      backend="reference" if backend == "reference" else "auto", **kw)
    gi, gg = np.asarray(got.indices), np.asarray(got.gains, dtype=np.float64)
    np.testing.assert_array_equal(gi, exact.indices)
    np.testing.assert_allclose(gg, np.asarray(exact.gains, dtype=np.float64), rtol=2e-7)


def test_exact_ties_break_alike_on_every_backend():
    """Two candidates with equal gains in exact arithmetic (a mutual-nearest pair): the reference (every
    non-NumPy input) sums each candidate's terms in entry order, as the Numba kernel does, so the tie stays
    a tie and breaks to the lower index on both."""
    torch = pytest.importorskip("torch")
    X = np.array([[-0.29], [-0.78], [-0.26], [0.01], [-0.28], [1.29]])
    host = crestcore.facility_location(X, 2, neighbors=1)
    ref = crestcore.facility_location(X, 2, neighbors=1, backend="reference")
    dev = crestcore.facility_location(torch.from_numpy(X), 2, neighbors=1)
    for other in (ref, dev):
        np.testing.assert_array_equal(np.asarray(to_numpy(other.indices)), np.asarray(host.indices))
        np.testing.assert_array_equal(np.asarray(to_numpy(other.weights)), np.asarray(host.weights))
    X = np.random.default_rng(0).normal(size=(24, 3))
    a = crestcore.facility_location(X, 13, neighbors=12)
    b = crestcore.facility_location(torch.from_numpy(X), 13, neighbors=12)
    np.testing.assert_array_equal(np.asarray(to_numpy(b.indices)), np.asarray(a.indices))


def test_an_unsigned_graph_entry_beyond_n_is_refused_not_wrapped():
    """uint64 2^64 - 1 wrapped to -1 ('no neighbour') in the int64 cast and was accepted."""
    X = np.random.default_rng(0).normal(size=(6, 2))
    g = np.array([[1], [0], [3], [2], [5], [2**64 - 1]], dtype=np.uint64)
    with pytest.raises(ValueError, match=r"indices in \[0, 6\)"):
        crestcore.facility_location(X, 2, neighbors=g)
    ok = g.copy()
    ok[5, 0] = 4
    assert np.asarray(crestcore.facility_location(X, 2, neighbors=ok).indices).size == 2


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_the_faiss_graph_orders_tied_neighbours_by_index_like_the_exact_search(metric):
    """All-identical points: every distance ties; faiss returned them highest index first under cosine, so
    the picks were [1, 0, 2, 3] against the documented lowest index first (review)."""
    pytest.importorskip("faiss")
    from crestcore.backends import knn
    from crestcore.sparse import exact_knn

    X = np.ones((10, 3))
    nbr, how = knn.build(X, 3, metric)
    np.testing.assert_array_equal(nbr, exact_knn(np, X, 3, metric))
    sel = crestcore.facility_location(X, 4, metric=metric, neighbors=3)
    assert "faiss" in sel.plan and np.asarray(sel.indices).tolist() == [0, 1, 2, 3]


def test_a_graph_without_a_single_edge_is_refused():
    """An all -1 graph (what a search over data with a NaN row once returned) made the selection the first
    k points with weight 1 each; a graph with some -1 entries (fewer neighbours found) is still fine."""
    X = np.random.default_rng(0).normal(size=(30, 3))
    empty = np.full((30, 4), -1, dtype=np.int64)
    with pytest.raises(ValueError, match="no edge at all"):
        crestcore.facility_location(X, 5, neighbors=empty)
    some = exact_knn(np, X, 4, "euclidean")
    some[:, 2:] = -1
    assert crestcore.facility_location(X, 5, neighbors=some).indices.shape == (5,)


def test_jax_without_x64_runs_the_sparse_path_quietly_in_float32():
    """JAX without ``jax_enable_x64`` has no float64: the reference sparse greedy asked for float64
    accumulators and JAX warned at every step of every call (22 warnings for 10 picks); it now accumulates in
    the namespace's widest float, with the NumPy reference's picks on the same float32 features."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    import warnings

    if jax.config.jax_enable_x64:
        pytest.skip("jax_enable_x64 is on in this process")
    X = _features(17, 120, 4).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sel = crestcore.facility_location(jnp.asarray(X), 9, neighbors=8)
    ref = crestcore.facility_location(X, 9, neighbors=8, backend="reference")
    np.testing.assert_array_equal(np.asarray(sel.indices), ref.indices)
    np.testing.assert_allclose(np.asarray(sel.weights), ref.weights)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_a_class_of_one_point_adds_nothing_to_the_sparse_objective(lib):
    """Review 19: a class of one point has no edges on the sparse path; its M fell back to the constant 1
    (meant for graphs whose every edge is at distance 0), so its pick gained 1 and the objective was
    1.0656 instead of the dense path's 0.0656 on data of scale 1e-3. It keeps the dense path's M = 0."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(21, 2)) * 1e-3
    y = np.r_[np.zeros(20, int), [1]]
    if lib == "torch":
        torch = pytest.importorskip("torch")
        X, y = torch.from_numpy(X), torch.from_numpy(y)
    dense = crestcore.facility_location(X, 4, labels=y)
    sparse = crestcore.facility_location(X, 4, labels=y, neighbors=20)
    assert sparse.path.startswith("sparse") and dense.path == "dense", (sparse.path, dense.path)
    for a, b in ((dense.indices, sparse.indices), (dense.weights, sparse.weights)):
        np.testing.assert_array_equal(np.asarray(to_numpy(a)), np.asarray(to_numpy(b)))
    np.testing.assert_allclose(np.asarray(to_numpy(sparse.gains)), np.asarray(to_numpy(dense.gains)), rtol=1e-12,
                               atol=1e-18)
    assert float(sparse.objective) == pytest.approx(float(dense.objective), rel=1e-12)
    assert float(sparse.objective) < 0.1


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_a_class_whose_given_neighbours_are_all_in_other_classes_adds_nothing(lib):
    """Review 24: with a given graph and labels, a class whose rows list only other classes' points has no
    edge (its columns hold -1) but kept its columns, and the fallback M = 1 meant for graphs whose every
    edge is at distance 0 added exactly 1 per pick whatever the data's scale. Its M is 0 now, as for a
    class of one point, at every scale; the other class's gains are its edges' similarities."""
    X = np.array([[0.0], [1.0], [100.0], [101.0], [102.0]])
    y = np.array([0, 1, 0, 1, 1])
    G = np.array([[1], [0], [3], [4], [3]])  # points 0 and 2 (class 0) list only class-1 points
    for scale in (1e-3, 1.0, 1e3):
        Xs, ys = X * scale, y
        if lib == "torch":
            torch = pytest.importorskip("torch")
            Xs, ys = torch.from_numpy(Xs), torch.from_numpy(y)
        sel = crestcore.facility_location(Xs, 3, labels=ys, neighbors=G)
        idx, gains = np.asarray(to_numpy(sel.indices)), np.asarray(to_numpy(sel.gains))
        assert sel.path == "sparse"
        assert gains[y[idx] == 0].tolist() == [0.0]
        np.testing.assert_allclose(gains[y[idx] == 1], [scale, scale], rtol=1e-12)  # M = 1 * scale, edges 3<->4
        assert float(sel.objective) == pytest.approx(2 * scale, rel=1e-12)


@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 5), n=st.integers(2, 700), kind=st.integers(0, 2),
       f32=st.booleans())
def test_k_smallest_is_the_stable_argsorts_first_k(seed, rows, n, kind, f32):
    """The exact kNN search takes each row's K nearest from chunk minima instead of sorting the row (35.8 ->
    4.4 s for n = 20,000, K = 10 on the reference path): the same positions as a stable argsort, ties to the
    lower position, with many ties, on NumPy and torch."""
    from crestcore.sparse import _k_smallest

    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, min(n, 40)))
    D = (rng.normal(size=(rows, n)), rng.integers(0, 4, size=(rows, n)).astype(float),
         np.round(rng.normal(size=(rows, n)), 1))[kind].astype(np.float32 if f32 else np.float64)
    D[np.arange(rows), rng.integers(0, n, size=rows)] = np.inf  # each row's own position
    want = np.argsort(D, axis=1, kind="stable")[:, :K]
    np.testing.assert_array_equal(_k_smallest(array_namespace(D), D, K), want)
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(D)
    np.testing.assert_array_equal(_k_smallest(array_namespace(t), t, K), want)


def test_auto_graph_searches_exactly_where_ivf_misses_and_ivf_says_so():
    """Review 35: above 20,000 points the default graph was IVF with 8 probes whatever the data; on
    unstructured data its recall was 0.2-0.3 (1.00 on clustered data), without a word. The recall is now
    measured on sampled points: method='auto' searches exactly below 0.9, method='ivf' warns."""
    pytest.importorskip("faiss")
    import warnings

    from crestcore.backends import knn

    X = np.random.default_rng(3).normal(size=(20_001, 32)).astype(np.float32)
    got, how = knn.build(X, 8)
    assert how == "faiss-exact"
    np.testing.assert_array_equal(got, knn.build(X, 8, method="exact")[0])
    with pytest.warns(UserWarning, match="recall on 512 sampled points is 0"):
        _, how = knn.build(X, 8, method="ivf")
    assert how == "faiss-ivf"
    # clustered data keeps IVF, quietly (its recall is about 1)
    rng = np.random.default_rng(4)
    C = rng.normal(size=(50, 16)) * 20
    Y = (C[rng.integers(0, 50, 20_001)] + rng.normal(size=(20_001, 16))).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, how = knn.build(Y, 8)
    assert how == "faiss-ivf"


def test_a_large_k_is_searched_exactly_and_short_ivf_rows_are_said():
    """Review 35: IVF scans about nprobe n / nlist points a query, so K = 3,000 at n = 20,001 gave rows of
    826-1,172 neighbours and -1 for the rest, silently; facility_location's plan still said K=3000. A K
    above a quarter of the points scanned is searched exactly; an explicit IVF with short rows warns."""
    pytest.importorskip("faiss")
    from crestcore.backends import knn

    rng = np.random.default_rng(5)
    C = rng.normal(size=(50, 8)) * 20
    X = (C[rng.integers(0, 50, 20_001)] + rng.normal(size=(20_001, 8))).astype(np.float32)
    got, how = knn.build(X, 300)  # IVF would scan about 8 x 20,001 / 141 = 1,135 points a query
    assert how == "faiss-exact" and (got >= 0).all()
    with pytest.warns(UserWarning, match="fewer than K=300 neighbours"):
        knn.build(X, 300, method="ivf", nprobe=1)  # about 142 points a query
    with pytest.raises(ValueError, match="below 2\\*\\*31"):
        knn.build(X, 3, method="ivf", seed=2**31)


def test_a_neighbors_graph_above_max_dense_bytes_is_refused_naming_a_k_that_fits():
    """Review 35: neighbors=K ignored max_dense_bytes: K = 19,999 at n = 20,000 started a graph of about
    25 GB (8x the dense matrix the bound exists to avoid) and died in an allocation."""
    X = np.random.default_rng(6).normal(size=(3000, 8))
    with pytest.raises(ValueError, match=r"neighbors=2999 needs about \d+ bytes.*pass neighbors <= (\d+)") as e:
        crestcore.facility_location(X, 10, neighbors=2999, max_dense_bytes=50 * 2**20)
    fit = int(__import__("re").search(r"neighbors <= (\d+)", str(e.value)).group(1))
    assert crestcore.facility_location(X, 10, neighbors=fit, max_dense_bytes=50 * 2**20).indices.shape == (10,)
    for bad in (np.True_, "3"):
        with pytest.raises(TypeError, match="neighbors must be an integer"):
            crestcore.facility_location(X, 10, neighbors=bad)


def test_the_ivf_recall_leaves_each_point_itself_out():
    """Review 36: the (K + 1)-column search finds every point itself, and counting it made the recall read
    (1 + K r) / (K + 1): at K = 1 on Gaussian data (n = 25,000, d = 16) 0.90 where it was 0.81, so 'auto'
    kept IVF below its 0.9 rule."""
    pytest.importorskip("faiss")
    from crestcore.backends import knn

    rows = np.array([0, 1])
    got_i = np.array([[0, 5, 9], [1, 7, 8]])
    got_d = np.array([[0.0, 1.0, 5.0], [0.0, 1.0, 2.0]])
    exact_d = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    assert knn._recall(exact_d, got_d, got_i, rows, similarity=False) == 0.75  # 1 + 2 of 4, self left out
    # K = 1 on Gaussian data: 8 probes find 0.81 of the nearest neighbours, which the old count read as
    # 0.90 and kept; now the probes are doubled (or the search made exact) until the sample says 0.9
    X = np.random.default_rng(7).normal(size=(25_000, 16)).astype(np.float32)
    got, _ = knn.build(X, 1)
    rows = np.random.default_rng(9).choice(25_000, 400, replace=False)
    X64 = X.astype(np.float64)
    D = ((X64[rows, None, :] - X64[None, :, :]) ** 2).sum(axis=2)
    D[np.arange(rows.size), rows] = np.inf
    assert np.mean(got[rows, 0] == D.argmin(axis=1)) > 0.86


def test_a_tiny_sparse_problem_under_a_small_bound_is_not_refused_for_fixed_buffers():
    """Review 36: the refusal counted sparse_bytes' fixed 1 MiB of work buffers (they come on top of the
    bound, as on the other paths), so six points with neighbors=1 under a 1,300-byte bound (their graph and
    the builder's copies: 1,272 bytes) were refused; the advice named optimizer='auto', which keeps the given K."""
    X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [10.0, 10.0], [10.0, 11.0], [12.0, 10.0]])
    assert crestcore.sparse.graph_bytes(6, 2, 1) == 1272
    assert crestcore.facility_location(X, 2, neighbors=1, max_dense_bytes=1300).indices.shape == (2,)
    Y = np.random.default_rng(8).normal(size=(3000, 8))
    with pytest.raises(ValueError, match="leave neighbors out with optimizer='auto'"):
        crestcore.facility_location(Y, 10, neighbors=2999, max_dense_bytes=50 * 2**20)


def test_auto_bounds_the_sparse_graph_as_an_explicit_neighbors_does(monkeypatch):
    """Review 52: under optimizer='auto' the planner counted sparse_bytes' fixed 1 MiB of work buffers in
    the bound, an explicit neighbors=K did not (review 36), so auto refused bounds the documented
    64 n (K + 1) + 42 n d allows: n = 1000, d = 64 under that bound at K = 6 fits 6 neighbours. (Since the
    builder's copies are counted, 42 n d, the sparse path needs more than the matrix-free one at such a size:
    the matrix-free path is ruled out here by its work limit, as it is for the large problems auto sends to
    the sparse path.)"""
    monkeypatch.setattr(planner, "MATRIX_FREE_MAX_WORK", 0.0)
    bound = crestcore.sparse.graph_bytes(1000, 64, 6)
    X = np.random.default_rng(3).normal(size=(1000, 64))
    auto = crestcore.facility_location(X, 20, optimizer="auto", max_dense_bytes=bound)
    assert auto.path == "sparse" and "sparse (neighbors=6)" in auto.plan
    given = crestcore.facility_location(X, 20, neighbors=6, max_dense_bytes=bound)
    np.testing.assert_array_equal(auto.indices, given.indices)
    assert planner.plan_problem(1000, 64, 20, 8, bound).bytes == bound
    assert planner.plan_problem(1000, 64, 20, 8, bound - 1).neighbors == 5


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_identical_points_on_a_complete_graph_are_the_dense_problem(backend):
    """Review 87: n identical points have M = 0 on the dense path (every similarity 0); the sparse path at
    K = n - 1, equal to it by contract, replaced the M of its all-zero edges by 1 and reported an objective of n
    (per class with labels: each class's size added). A graph that is not complete keeps the positive M."""
    X = np.ones((7, 3))
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    for kw, K in ((dict(), 6), (dict(labels=labels), 3)):
        dense = crestcore.facility_location(X, 2, backend=backend, **kw)
        sparse = crestcore.facility_location(X, 2, backend=backend, neighbors=K, **kw)
        assert sparse.path == "sparse" and float(sparse.objective) == float(dense.objective) == 0.0
        np.testing.assert_array_equal(np.asarray(sparse.indices), np.asarray(dense.indices))
        np.testing.assert_array_equal(np.asarray(sparse.weights), np.asarray(dense.weights))
        np.testing.assert_array_equal(np.asarray(sparse.gains), np.asarray(dense.gains))
    # two groups of identical points, each point's 2 neighbours its duplicates: one pick covers each group
    Y = np.repeat(np.array([[0.0, 0.0], [5.0, 0.0]]), 4, axis=0)
    sel = crestcore.facility_location(Y, 2, backend=backend, neighbors=2)
    assert sorted(np.asarray(sel.indices) // 4) == [0, 1] and float(sel.objective) > 0


def test_the_graph_builders_take_the_library_module_of_their_input():
    """``exact_knn(numpy, X, ...)`` is how the docs call it; ``exact_knn(torch, X_t, ...)`` raised an
    AttributeError (the bare torch module has no ``isdtype``), and a NumPy module with a torch tensor said
    that float64 is not a floating dtype (review 94). The module now names X's library, which must match."""
    torch = pytest.importorskip("torch")
    from crestcore.sparse import knn_graph

    X = np.random.default_rng(3).normal(size=(30, 3))
    Xt = torch.from_numpy(X)
    ref = exact_knn(np, X, 4, "euclidean")
    np.testing.assert_array_equal(exact_knn(torch, Xt, 4, "euclidean"), ref)
    nbr, how = knn_graph(torch, Xt, 4, "euclidean", force_reference=True)
    assert how == "exact"
    np.testing.assert_array_equal(nbr, ref)
    with pytest.raises(TypeError, match=r"xp must be the library of X \(torch\)"):
        exact_knn(np, Xt, 4, "euclidean")
    with pytest.raises(TypeError, match=r"xp must be the library of X \(numpy\)"):
        knn_graph(torch, X, 4, "euclidean")


@pytest.mark.parametrize("xp", [None, "numpy", np.random, np.linalg], ids=["None", "str", "numpy.random", "numpy.linalg"])
def test_the_graph_builders_refuse_an_xp_that_is_not_a_library_module(xp):
    """``exact_knn(None, X)`` raised a bare AttributeError, and ``exact_knn(numpy.random, X)`` was accepted
    because its name starts with "numpy": neither is an array library. Both builders now refuse them, naming
    ``xp``; the library's module and its compat namespace are still taken."""
    import array_api_compat.numpy as compat_np

    from crestcore.sparse import knn_graph

    X = np.random.default_rng(4).normal(size=(12, 3))
    for build in (exact_knn, lambda xp, X, K, m: knn_graph(xp, X, K, m, force_reference=True)):
        with pytest.raises(TypeError, match=r"xp must be the library of X \(numpy\)"):
            build(xp, X, 2, "euclidean")
    np.testing.assert_array_equal(exact_knn(compat_np, X, 2, "euclidean"), exact_knn(np, X, 2, "euclidean"))
    # the library's top-level module is taken where its namespace is a submodule (review 107: jax was refused
    # with "xp must be the library of X (jax), got 'jax'")
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    Xj = jnp.asarray(X)
    np.testing.assert_array_equal(exact_knn(jax, Xj, 2, "euclidean"), exact_knn(jnp, Xj, 2, "euclidean"))
    with pytest.raises(TypeError, match=r"xp must be the library of X \(jax\), got 'numpy'"):
        exact_knn(np, Xj, 2, "euclidean")


def test_the_graph_builders_refuse_too_few_points_and_bad_shapes_alike_on_every_route():
    """Review 103: one point gave "K must be in [1, 0]", an empty X on the faiss route "K must be in [1, n - 1]
    = [1, -1]" where the tiled route said "X is empty", and a 1-D X a TypeError on one route and a
    ValueError on the other. Each route now refuses these first, with one message."""
    from crestcore.sparse import knn_graph

    builders = [lambda X: exact_knn(np, X, 1, "euclidean"),
                lambda X: knn_graph(np, X, 1, "euclidean"),
                lambda X: knn_graph(np, X, 1, "euclidean", force_reference=True)]
    for build in builders:
        with pytest.raises(ValueError, match=r"X has 1 row\(s\): a neighbour graph needs at least 2 points"):
            build(np.zeros((1, 3)))
        with pytest.raises(ValueError, match=r"X is empty"):
            build(np.zeros((0, 3)))
        with pytest.raises(ValueError, match=r"X must be 2-D"):
            build(np.zeros(5))


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_copies_of_a_row_tie_exactly_and_are_listed_by_index_in_every_library(metric):
    """Review 103: copies of a non-integer row came out of the Gram form an ulp apart, depending on their
    columns, so the tiled search listed them by rounding, not by index, and where K cut through a group of
    copies, NumPy and torch built different "exact" graphs and picked differently. Copies now get their first
    copy's distance: each row lists its own copies first, then the nearest other group's copies, each group
    in index order, in NumPy and in torch alike."""
    torch = pytest.importorskip("torch")
    for seed in range(6):
        rng = np.random.default_rng(seed)
        base = rng.normal(size=(10, 6))
        group = np.repeat(np.arange(10), 5)[rng.permutation(50)]
        X = base[group]
        Xb = base / np.linalg.norm(base, axis=1, keepdims=True) if metric == "cosine" else base
        between = ((Xb[:, None, :] - Xb[None, :, :]) ** 2).sum(-1)
        np.fill_diagonal(between, np.inf)
        K = 7  # the 4 other copies, then 3 of the nearest group's 5: the cut goes through a 5-way tie
        want = np.array([np.r_[np.flatnonzero((group == group[i]) & (np.arange(50) != i)),
                               np.flatnonzero(group == np.argmin(between[group[i]]))[:3]] for i in range(50)])
        np.testing.assert_array_equal(exact_knn(np, X, K, metric), want)
        np.testing.assert_array_equal(exact_knn(torch, torch.as_tensor(X), K, metric), want)
    # rows that all differ take the plain path (no copies to find)
    from crestcore.sparse import _first_copies

    assert _first_copies(np.random.default_rng(0).normal(size=(20, 3))) is None
