"""crestcore.score_orders: objective, cluster sizes and gains of ordered pick lists on a set of points.

Checked against the definitions computed directly from the similarity matrix (``facility_objective``
on prefixes of the order, nearest-pick counts), against the NumPy reference kernel, for additivity over
blocks of points (what GreeDi's workers rely on), and for its argument checks.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import crestcore
from crestcore import _reference_kernels as ref
from crestcore.backends import get_host_kernel

METRICS = ("euclidean", "sqeuclidean", "cosine")


def _instance(seed: int, n: int, c: int, d: int, lists: int):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    C = rng.normal(size=(c, d))
    orders = [rng.permutation(c)[: int(rng.integers(0, c + 1))] for _ in range(lists)]
    return X, C, orders


def _similarity(X, C, metric, kernel, bound, scale):
    D = crestcore.pairwise_distances(X, C, metric=metric)
    return np.maximum(bound - D, 0.0) if kernel == "max-minus" else np.exp(-D / scale)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), c=st.integers(1, 12), d=st.integers(1, 5),
       lists=st.integers(1, 4), metric=st.sampled_from(METRICS), kernel=st.sampled_from(("max-minus", "exp")),
       clip=st.booleans())
def test_scores_follow_their_definitions(seed, n, c, d, lists, metric, kernel, clip):
    X, C, orders = _instance(seed, n, c, d, lists)
    D = crestcore.pairwise_distances(X, C, metric=metric)
    # a bound below the largest distance clips some similarities to 0 (rows with no positive similarity)
    bound = float(D.max()) * (0.3 if clip else 1.0)
    scale = 0.7
    S = _similarity(X, C, metric, kernel, bound, scale)
    got = crestcore.score_orders(X, C, orders, metric=metric, kernel=kernel, bound=bound, scale=scale)
    assert len(got) == len(orders)
    for o, (obj, w, g) in zip(orders, got):
        assert w.shape == g.shape == o.shape and w.dtype == g.dtype == np.float64
        if o.size == 0:
            assert obj == 0.0
            continue
        # the objective, and the gains as increments of the objective along the order
        prefix = [float(crestcore.facility_objective(S, o[: j + 1])) for j in range(o.size)]
        assert obj == pytest.approx(prefix[-1], rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(g, np.diff(prefix, prepend=0.0), rtol=1e-9, atol=1e-9)
        # every point counted once, at its most similar pick (ties: the earliest in the order)
        sub = S[:, o]
        nearest = np.argmax(sub, axis=1)
        np.testing.assert_array_equal(w, np.bincount(nearest, minlength=o.size))
        assert w.sum() == n


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 30), c=st.integers(1, 10), lists=st.integers(0, 3),
       metric=st.sampled_from(METRICS), kernel=st.sampled_from(("max-minus", "exp")))
def test_numba_kernel_gives_the_reference_values(seed, n, c, lists, metric, kernel):
    kern = get_host_kernel("order_scores")
    if kern is None:
        pytest.skip("numba does not import here")
    rng = np.random.default_rng(seed)
    # small-integer points: repeated points and tied distances are frequent, and the Gram sums are exact
    X = rng.integers(-2, 3, size=(n, 2)).astype(np.float64)
    Y = rng.integers(-2, 3, size=(c, 2)).astype(np.float64)
    if metric == "cosine":
        unit = [A / np.where(np.linalg.norm(A, axis=1) > 0, np.linalg.norm(A, axis=1), 1.0)[:, None] for A in (X, Y)]
        G = unit[0] @ unit[1].T
    else:
        G = X @ Y.T
    sx, sy = (X * X).sum(axis=1), (Y * Y).sum(axis=1)
    orders = [rng.permutation(c)[: int(rng.integers(0, c + 1))] for _ in range(lists)]
    cols = np.concatenate(orders).astype(np.int64) if orders else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([o.size for o in orders])]).astype(np.int64)
    a = kern(G, sx, sy, cols, offsets, metric, kernel, 3.0, 2.0)
    b = ref.order_scores(G, sx, sy, cols, offsets, metric, kernel, 3.0, 2.0)
    np.testing.assert_array_equal(a[1], b[1])  # the same nearest picks, ties included
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)


def test_scores_add_over_blocks_of_points():
    X, C, orders = _instance(3, 500, 20, 4, 3)
    whole = crestcore.score_orders(X, C, orders, bound=8.0)
    parts = [crestcore.score_orders(X[a:a + 137], C, orders, bound=8.0) for a in range(0, 500, 137)]
    for q in range(len(orders)):
        assert whole[q][0] == pytest.approx(sum(p[q][0] for p in parts), rel=1e-12)
        np.testing.assert_array_equal(whole[q][1], sum(p[q][1] for p in parts))
        np.testing.assert_allclose(whole[q][2], sum(p[q][2] for p in parts), rtol=1e-12)


def test_tiles_do_not_change_the_result(monkeypatch):
    X, C, orders = _instance(4, 300, 30, 3, 2)
    whole = crestcore.score_orders(X, C, orders, kernel="exp")
    monkeypatch.setattr(crestcore.facility, "_SCORE_TILE_ELEMENTS", 64)  # tiles of 2 rows
    tiled = crestcore.score_orders(X, C, orders, kernel="exp")
    for (o1, w1, g1), (o2, w2, g2) in zip(whole, tiled):
        assert o1 == pytest.approx(o2, rel=1e-12)
        np.testing.assert_array_equal(w1, w2)
        np.testing.assert_allclose(g1, g2, rtol=1e-12)


def test_inputs_are_not_modified():
    X, C, orders = _instance(5, 50, 8, 3, 2)
    copies = X.copy(), C.copy(), [o.copy() for o in orders]
    crestcore.score_orders(X, C, orders, bound=5.0)
    np.testing.assert_array_equal(X, copies[0])
    np.testing.assert_array_equal(C, copies[1])
    for o, oc in zip(orders, copies[2]):
        np.testing.assert_array_equal(o, oc)


@pytest.mark.parametrize("kwargs, args, error, match", [
    ({}, ("list", "C", "orders"), TypeError, "X must be a NumPy array"),
    ({}, ("X", np.zeros((2, 3)), "orders"), ValueError, "same number of features"),
    ({}, (np.array([[np.nan, 0.0]]), "C", "orders"), ValueError, "X contains NaN"),
    ({}, ("X", np.zeros((2, 2), dtype=np.int64), "orders"), TypeError, "C must have a real floating dtype"),
    ({"bound": None}, ("X", "C", "orders"), ValueError, "bound must be"),
    ({"bound": -1.0}, ("X", "C", "orders"), ValueError, "bound must be"),
    ({"kernel": "exp", "scale": 0.0}, ("X", "C", "orders"), ValueError, "scale"),
    ({"kernel": "rbf", "bound": 1.0}, ("X", "C", "orders"), ValueError, "kernel must be"),
    ({"metric": "manhattan", "bound": 1.0}, ("X", "C", "orders"), ValueError, "metric must be"),
    ({"bound": 1.0}, ("X", "C", [np.array([0, 2])]), ValueError, r"orders\[0\] must hold row indices"),
    ({"bound": 1.0}, ("X", "C", [np.array([1]), np.array([0, 0])]), ValueError, r"orders\[1\] must not repeat"),
    ({"bound": 1.0}, ("X", "C", [np.array([0.5])]), ValueError, r"orders\[0\] must be a 1-D integer"),
    ({"bound": 1.0}, ("X", "C", np.array([[0, 1]])), TypeError, "orders must be a sequence"),
])
def test_bad_arguments_are_named(kwargs, args, error, match):
    X, C = np.zeros((3, 2)), np.ones((2, 2))
    real = {"X": X, "C": C, "orders": [np.array([0, 1])], "list": [[0.0, 1.0]]}
    call = [real[a] if isinstance(a, str) else a for a in args]
    with pytest.raises(error, match=match):
        crestcore.score_orders(*call, **kwargs)


def test_a_bound_or_scale_that_is_not_a_number_is_refused_naming_it():
    import crestcore
    from crestcore.similarity import kernel_scale

    X = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match="bound"):
        crestcore.score_orders(X, X[:3], [np.array([0, 1])], kernel="max-minus", bound="10")
    for bad in ("1", True):
        with pytest.raises(TypeError, match="scale"):
            kernel_scale(bad, 3)


@pytest.mark.parametrize("metric, kernel, power", [
    ("euclidean", "max-minus", 1), ("sqeuclidean", "max-minus", 2), ("euclidean", "exp", 0),
    ("cosine", "max-minus", 0),
])
@pytest.mark.parametrize("e", [600, -600])
def test_scores_do_not_depend_on_the_datas_magnitude(metric, kernel, power, e):
    """The numerics policy of the selection functions: data of magnitude 2^600 (or 2^-600) in float64
    scores as the same data at magnitude 1, objective and gains scaled by 2^(power e) (before, the inner
    products overflowed to inf, or underflowed to 0, and the scores were NaN or wrong)."""
    X, C, orders = _instance(5, 40, 12, 3, 3)
    bound = 12.0 if metric != "sqeuclidean" else 150.0
    kw = dict(metric=metric, kernel=kernel)
    base = crestcore.score_orders(X, C, orders, bound=bound if kernel == "max-minus" else None, **kw)
    e = e // power if power > 1 else e  # a squared bound of 2^1200 is no float64
    s = 2.0 ** e
    big = crestcore.score_orders(X * s, C * s, orders, bound=bound * s ** power if kernel == "max-minus" else None,
                                 scale=None if kernel == "max-minus" else 3 * s, **kw)
    for (o0, w0, g0), (o1, w1, g1) in zip(base, big):
        np.testing.assert_array_equal(w1, w0)
        np.testing.assert_allclose(o1, o0 * 2.0 ** (power * e), rtol=1e-12)
        np.testing.assert_allclose(g1, g0 * 2.0 ** (power * e), rtol=1e-12, atol=0)
