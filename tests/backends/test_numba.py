"""crestcore.backends.numba: differential tests against the generic reference kernels.

How picks are compared. Two correct greedy implementations may differ when two candidates' gains are
closer than the rounding noise of their sums (the reference sums in the input dtype, the Numba kernels
in float64 in a fixed order). So each problem's reference trajectory is replayed in float64: the picks
must agree exactly up to the first step whose best-vs-second gap is below ``tol`` (all of them on
continuous random data, almost always), and the Numba trajectory must itself be a ``tol``-greedy run.
On integer-valued similarities every sum is exact in both, so there the two must agree exactly, ties
included (lowest index), for every optimizer.

Lazy greedy is compared with naive greedy on the Numba path bit for bit (indices and gains). The replay
is shared with the other backends' tests (tests/_greedy_replay.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

import _greedy_replay  # noqa: E402
from _greedy_replay import KERNELS, METRICS, OPTIMIZERS, padded_batch  # noqa: E402

import crestcore  # noqa: E402
from crestcore import _reference_kernels as ref  # noqa: E402
from crestcore.backends import get_kernel  # noqa: E402
from crestcore.backends import numba as nbk  # noqa: E402
from crestcore.facility import stochastic_draws  # noqa: E402

DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]
RTOL = {np.dtype(np.float32): 2e-4, np.dtype(np.float64): 1e-9}

FEW = settings(deadline=None, max_examples=10, suppress_health_check=[HealthCheck.too_slow])


def each_dtype_and_optimizer(**strategies):
    """Decorator of the differential property tests: the test for every dtype and optimizer
    (parametrized), each on FEW hypothesis examples of a ``seed`` and ``strategies``."""

    def decorate(test):
        test = FEW(given(seed=st.integers(0, 2**32 - 1), **strategies)(test))
        return pytest.mark.parametrize("dtype", DTYPES)(pytest.mark.parametrize("optimizer", OPTIMIZERS)(test))

    return decorate


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def make_batch(seed, B, n, d, dtype, *, eps=0.1):
    """A padded batch (:func:`_greedy_replay.padded_batch`) in ``dtype``, with budgets up to half of each
    problem, as in CREST."""
    X, valid, budgets, u = padded_batch(seed, B, n, d, eps=eps, half_budgets=True)
    return X.astype(dtype), valid, budgets, u.astype(dtype)


def integer_batch(seed, B, n, dtype, *, high=4):
    """Integer-valued similarities with many exact ties (zero on padding), plus the rest of a batch."""
    rng = np.random.default_rng(seed)
    _, valid, budgets, u = make_batch(seed, B, n, 2, dtype)
    S = rng.integers(0, high, size=(B, n, n)).astype(dtype)
    S = np.where(valid[:, :, None] & valid[:, None, :], S, 0).astype(dtype)
    return S, valid, budgets, u


# --------------------------------------------------------------------------------------------------
# float64 replay of greedy trajectories
# --------------------------------------------------------------------------------------------------


def assert_greedy_matches(S, valid, budgets, optimizer, u, got, want, noise=0.0):
    """``got`` = (indices, gains) under test, ``want`` = the reference's, both on similarities ``S``
    (B, n, n). The picks must be equal up to the first step where they differ, and that step must be a
    near tie (gap <= tol) of the reference's (whose stochastic positions are clamped to ``R - 1``).
    Returns how many problems agreed over their whole budget (:func:`_greedy_replay.assert_greedy_matches`)."""
    return _greedy_replay.assert_greedy_matches(S, valid, budgets, optimizer, u, got, want,
                                                rtol=RTOL[np.dtype(S.dtype)], mode="clamped", agree="prefix",
                                                noise=noise)


def F(S64, picks):
    picks = [p for p in picks if p >= 0]
    return float(S64[:, picks].max(axis=1).sum()) if picks else 0.0


# --------------------------------------------------------------------------------------------------
# usable_for and dispatch
# --------------------------------------------------------------------------------------------------


def test_usable_for_accepts_numpy_float32_float64():
    for dt in (np.float32, np.float64):
        S = np.zeros((2, 3, 3), dtype=dt)
        v = np.ones((2, 3), dtype=bool)
        assert nbk.usable_for("greedy_batched", S, v, np.ones(2, dtype=np.int64))
        assert nbk.usable_for("greedy_batched", S, v, np.ones(2, dtype=np.int32))
        assert nbk.usable_for("similarity_batched", np.zeros((2, 3, 4), dtype=dt), v)
        assert nbk.usable_for("assign_batched", S, v, None)
        assert nbk.usable_for("greedy_features", np.zeros((5, 2), dtype=dt))


def test_usable_for_declines_what_the_reference_must_handle():
    v = np.ones((2, 3), dtype=bool)
    for dt in (np.float16, np.complex64, np.longdouble):
        if np.dtype(dt) in (np.dtype(np.float64),):  # longdouble is float64 on some platforms
            continue
        assert not nbk.usable_for("greedy_batched", np.zeros((2, 3, 3), dtype=dt), v)
    assert not nbk.usable_for("greedy_features", np.zeros((5, 2), dtype=">f8" if np.little_endian else "<f8"))
    assert not nbk.usable_for("greedy_features", np.zeros((5, 2), dtype=object))
    assert not nbk.usable_for("greedy_batched", [[0.0]], v)  # not an ndarray
    assert not nbk.usable_for("greedy_features", np.ma.zeros((5, 2)))  # a subclass with its own meaning
    torch = pytest.importorskip("torch")
    assert not nbk.usable_for("greedy_batched", torch.zeros(2, 3, 3), v)
    assert not nbk.usable_for("no_such_kernel", np.zeros((5, 2)))
    assert not nbk.usable_for("greedy_features")


def test_a_memmap_takes_the_numba_kernels_with_the_arrays_picks(tmp_path):
    """Review 108: np.load(..., mmap_mode="r"), the usual holder of a large embedding file, failed the exact
    ndarray type test, so its n x n similarities were built on the generic path (5-10x slower, silently).
    It takes the fused kernel now: the same picks, weights and gains, plain ndarrays out."""
    X = np.random.default_rng(0).normal(size=(300, 6))
    np.save(tmp_path / "X.npy", X)
    Xm = np.load(tmp_path / "X.npy", mmap_mode="r")
    assert type(Xm) is np.memmap and type(Xm[None]) is np.memmap
    v = np.ones((1, 300), dtype=bool)
    assert nbk.usable_for("facility_batched", Xm[None], v, np.array([30]))
    assert get_kernel("facility_batched", "numpy", Xm[None], v, np.array([30])) is nbk.facility_batched
    a, b = crestcore.facility_location(X, 30), crestcore.facility_location(Xm, 30)
    for name in ("indices", "weights", "gains"):
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name))
        assert type(getattr(b, name)) is np.ndarray
    other = np.zeros((5, 2)).view(type("Subclass", (np.ndarray,), {}))  # other subclasses: the reference
    assert not nbk.usable_for("greedy_features", other)


def test_dispatch_picks_the_numba_kernels():
    S = np.zeros((2, 3, 3))
    v = np.ones((2, 3), dtype=bool)
    b = np.ones(2, dtype=np.int64)
    assert get_kernel("greedy_batched", "numpy", S, v, b) is nbk.greedy_batched
    assert get_kernel("assign_batched", "numpy", S, v, b) is nbk.assign_batched
    assert get_kernel("similarity_batched", "numpy", np.zeros((2, 3, 4)), v) is nbk.similarity_batched
    assert get_kernel("greedy_features", "numpy", np.zeros((5, 2), np.float32)) is nbk.greedy_features
    assert get_kernel("greedy_batched", "numpy", S.astype(np.float16), v, b) is None


def test_bad_arguments_raise_naming_them():
    S = np.zeros((1, 3, 3))
    v = np.ones((1, 3), dtype=bool)
    with pytest.raises(ValueError, match="optimizer"):
        nbk.greedy_batched(S, v, np.ones(1, np.int64), "fast")
    with pytest.raises(ValueError, match="u"):
        nbk.greedy_batched(S, v, np.ones(1, np.int64), "stochastic", None)
    with pytest.raises(ValueError, match="metric"):
        nbk.similarity_batched(np.zeros((1, 3, 2)), v, "manhattan", "exp", 1.0)
    with pytest.raises(ValueError, match="kernel"):
        nbk.similarity_batched(np.zeros((1, 3, 2)), v, "cosine", "rbf", 1.0)
    with pytest.raises(ValueError, match="u"):
        nbk.greedy_features(np.zeros((3, 2)), 1, "euclidean", "exp", 1.0, "stochastic", None)
    with pytest.raises(ValueError, match="indices"):
        nbk.assign_batched(S, v, np.array([[0, 3]]))  # out of range: refused, never read out of bounds


# --------------------------------------------------------------------------------------------------
# similarity_batched
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("metric", METRICS)
@FEW
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 4), n=st.integers(1, 90), d=st.integers(1, 6))
@example(seed=427, B=4, n=76, d=1)  # two points 7.3e-8 apart: snapped to 0 by the reference only
def test_similarity_matches_reference(metric, kernel, dtype, seed, B, n, d):
    X, valid, _, _ = make_batch(seed, B, n, d, dtype)
    if metric == "cosine" and n > 1:  # a zero vector: cosine 0 with everything
        X[0, np.flatnonzero(valid[0])[0]] = 0.0
    S = nbk.similarity_batched(X, valid, metric, kernel, 2.5)
    R = ref.similarity_batched(X, valid, metric, kernel, 2.5)
    assert S.dtype == X.dtype and S.shape == (B, n, n)
    pair = valid[:, :, None] & valid[:, None, :]
    assert (S[~pair] == 0).all(), "padded rows and columns must be exactly 0"
    np.testing.assert_array_equal(S, np.swapaxes(S, 1, 2))  # exactly symmetric
    diag = np.diagonal(S, axis1=1, axis2=2)
    top = S.max(axis=(1, 2)) if kernel == "max-minus" else np.ones(B, dtype)
    np.testing.assert_array_equal(np.where(valid, diag, 0), np.where(valid, top[:, None], 0))
    assert (S >= 0).all()
    # the reference uses the Gram trick and snaps a squared distance within 8 eps (|a|^2 + |b|^2) of 0 to 0;
    # Numba takes direct differences and snaps nothing: a euclidean distance can differ by up to
    # sqrt(8 eps * 2 |x|^2) = 4 sqrt(eps) |x| (float64 too: two points 7.3e-8 apart at |x| ~ 1.5, seed 427,
    # were 0 in the reference and 7.3e-8 here), the squared and cosine ones by a few eps * |x|^2
    scale = float(np.abs(R).max()) if R.size else 1.0
    xmax = float(np.abs(X[valid]).max()) if valid.any() else 0.0
    eps = float(np.finfo(dtype).eps)
    atol = (3e-3 if dtype == np.float32 else 1e-9) * max(1.0, scale)
    if metric == "euclidean":
        atol = max(atol, 8.0 * np.sqrt(eps) * max(1.0, xmax))
    np.testing.assert_allclose(S, R, rtol=0, atol=atol)


def test_similarity_is_accurate_where_the_gram_trick_is_not():
    """Direct differences: points at distance 1e-4 next to norms 1e4 keep their distance in float64."""
    X = np.array([[[1e4, 0.0], [1e4 + 1e-4, 0.0], [1e4, 1.0]]])
    v = np.ones((1, 3), dtype=bool)
    S = nbk.similarity_batched(X, v, "euclidean", "max-minus", 1.0)
    M = np.sqrt(1 + 1e-8)
    np.testing.assert_allclose(S[0, 0, 1], M - 1e-4, rtol=1e-12)
    np.testing.assert_allclose(S[0, 0, 2], M - 1.0, rtol=1e-12)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("row", ["0.1", "1/3", "normal"])
def test_identical_points_are_at_distance_exactly_zero(metric, row):
    """All-identical points (cosine included: the dot and the norms are bit-equal) give an all-ties
    input; the documented answer is picks 0, 1, 2 and all the weight on the first."""
    d = 64
    x = {"0.1": np.full(d, 0.1), "1/3": np.full(d, 1 / 3), "normal": np.random.default_rng(0).normal(size=d)}[row]
    X = np.repeat(x[None, None, :], 9, axis=1)
    v = np.ones((1, 9), dtype=bool)
    np.testing.assert_array_equal(nbk.similarity_batched(X, v, metric, "exp", 1.0), np.ones((1, 9, 9)))
    np.testing.assert_array_equal(nbk.similarity_batched(X, v, metric, "max-minus", 1.0), np.zeros((1, 9, 9)))
    for opt in ("lazy", "naive"):
        idx, gains, w, obj = nbk.greedy_features(X[0], 3, metric, "exp", 1.0, opt, None, 4)
        np.testing.assert_array_equal(idx, [0, 1, 2])
        np.testing.assert_array_equal(gains, [9, 0, 0])
        np.testing.assert_array_equal(w, [9, 0, 0])
        assert obj == 9


# --------------------------------------------------------------------------------------------------
# greedy_batched
# --------------------------------------------------------------------------------------------------


@each_dtype_and_optimizer(B=st.integers(1, 6), n=st.integers(1, 70), kernel=st.sampled_from(KERNELS),
                          metric=st.sampled_from(METRICS))
def test_greedy_batched_matches_reference(optimizer, dtype, seed, B, n, kernel, metric):
    X, valid, budgets, u = make_batch(seed, B, n, 3, dtype)
    S = ref.similarity_batched(X, valid, metric, kernel, 3.0)
    uu = u if optimizer == "stochastic" else None
    got = nbk.greedy_batched(S, valid, budgets, optimizer, uu)
    want = ref.greedy_batched(S, valid, budgets, optimizer, uu)
    assert got[1].dtype == S.dtype
    assert_greedy_matches(S, valid, budgets, optimizer, uu, got, want)
    if optimizer != "stochastic":  # exactly non-increasing gains (monotone rounding, fixed order)
        for b in range(B):
            g = got[1][b, : budgets[b]]
            assert (np.diff(g) <= 0).all()


def test_greedy_batched_agrees_on_most_problems_index_for_index():
    """Guard against a vacuous comparison: on continuous data nearly every problem is tie-free."""
    X, valid, budgets, u = make_batch(7, 40, 50, 4, np.float64)
    S = ref.similarity_batched(X, valid, "euclidean", "max-minus", 1.0)
    for opt in OPTIMIZERS:
        uu = u if opt == "stochastic" else None
        got = nbk.greedy_batched(S, valid, budgets, opt, uu)
        want = ref.greedy_batched(S, valid, budgets, opt, uu)
        assert assert_greedy_matches(S, valid, budgets, opt, uu, got, want) >= 36


@each_dtype_and_optimizer(B=st.integers(1, 5), n=st.integers(1, 40), high=st.integers(1, 5))
def test_greedy_batched_exact_with_ties(optimizer, dtype, seed, B, n, high):
    """Integer similarities: all sums exact, many ties. Picks and gains equal the reference's exactly."""
    S, valid, budgets, u = integer_batch(seed, B, n, dtype, high=high)
    uu = u if optimizer == "stochastic" else None
    gi, gg = nbk.greedy_batched(S, valid, budgets, optimizer, uu)
    wi, wg = ref.greedy_batched(S, valid, budgets, optimizer, uu)
    np.testing.assert_array_equal(gi, wi)
    np.testing.assert_array_equal(gg, wg)
    w1, o1 = nbk.assign_batched(S, valid, gi)
    w0, o0 = ref.assign_batched(S, valid, wi)
    np.testing.assert_array_equal(w1, w0)
    np.testing.assert_array_equal(o1, o0)


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 5), n=st.integers(1, 80), ties=st.booleans())
def test_lazy_is_naive_bit_for_bit(dtype, seed, B, n, ties):
    if ties:
        S, valid, budgets, _ = integer_batch(seed, B, n, dtype, high=3)
    else:
        X, valid, budgets, _ = make_batch(seed, B, n, 4, dtype)
        S = nbk.similarity_batched(X, valid, "euclidean", "exp", 4.0)
    budgets = np.array([int(valid[b].sum()) for b in range(B)])  # run to the end: all the way down
    li, lg = nbk.greedy_batched(S, valid, budgets, "lazy")
    ni, ng = nbk.greedy_batched(S, valid, budgets, "naive")
    np.testing.assert_array_equal(li, ni)
    np.testing.assert_array_equal(lg, ng)


@pytest.mark.parametrize("threads", [1, 64], ids=["few-problems-path", "many-problems-path"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_large_problems_both_layouts(threads, symmetric, monkeypatch):
    """n >= 256: candidate-major solve, on the matrix itself (symmetric) or a transposed copy, with the
    parallel per-problem path (few problems) or one thread per problem (many)."""
    monkeypatch.setattr(nbk, "get_num_threads", lambda: threads)
    rng = np.random.default_rng(3)
    B, n = 2, 300
    valid = np.ones((B, n), dtype=bool)
    valid[1, 250:] = False
    if symmetric:
        S = nbk.similarity_batched(rng.standard_normal((B, n, 5)), valid, "sqeuclidean", "max-minus", 1.0)
    else:
        S = rng.random((B, n, n)) ** 4  # s_ij != s_ji: the candidate is the column
        S[~(valid[:, :, None] & valid[:, None, :])] = 0
    budgets = np.array([40, 25])
    u = stochastic_draws(rng, valid.sum(1), budgets, 0.1)
    for opt in OPTIMIZERS:
        uu = u if opt == "stochastic" else None
        got = nbk.greedy_batched(S, valid, budgets, opt, uu)
        want = ref.greedy_batched(S, valid, budgets, opt, uu)
        assert assert_greedy_matches(S, valid, budgets, opt, uu, got, want) == B
        np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(nbk.greedy_batched(S, valid, budgets, "lazy")[1],
                                  nbk.greedy_batched(S, valid, budgets, "naive")[1])


@pytest.mark.parametrize("path", ["dense", "features"])
def test_stochastic_float32_draw_of_one_samples_the_last_candidate(path):
    """A float64 draw just below 1 becomes exactly 1.0 in float32; then u * R = R, and the position is
    clamped to R - 1 (the last remaining candidate), as in the reference, on both paths."""
    assert np.float32(1.0 - 2.0**-26) == np.float32(1.0)
    rng = np.random.default_rng(1)
    n, k = 30, 6
    u = rng.random((3, k, 3)).astype(np.float32)
    u[:, :, 0] = np.float32(1.0)
    u[:, 2, :] = np.float32(1.0)  # a step where every draw is 1.0: the last remaining candidate only
    if path == "dense":
        S = rng.random((3, n, n)).astype(np.float32)
        valid = np.ones((3, n), dtype=bool)
        budgets = np.full(3, k)
        gi, gg = nbk.greedy_batched(S, valid, budgets, "stochastic", u)
        wi, wg = ref.greedy_batched(S, valid, budgets, "stochastic", u)
        np.testing.assert_allclose(gg, wg, rtol=1e-5)
    else:
        X = rng.standard_normal((n, 3)).astype(np.float32)
        gi = nbk.greedy_features(X, k, "euclidean", "exp", 1.0, "stochastic", u[0], 8)[0][None]
        wi = ref.greedy_features(X, k, "euclidean", "exp", 1.0, "stochastic", u[0], 8)[0][None]
    np.testing.assert_array_equal(gi, wi)
    for b in range(gi.shape[0]):  # step 2 took the highest index not picked in steps 0 and 1
        assert gi[b, 2] == max(set(range(n)) - set(gi[b, :2].tolist()))


def test_padding_budgets_zero_and_single_point_problems():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((4, 6, 2))
    valid = np.zeros((4, 6), dtype=bool)
    valid[0] = True
    valid[1, 3] = True  # a single point
    valid[2, :4] = True
    valid[3, 2:] = True
    budgets = np.array([6, 1, 0, 2])
    S = nbk.similarity_batched(X, valid, "euclidean", "max-minus", 1.0)
    for opt in OPTIMIZERS:
        u = stochastic_draws(rng, valid.sum(1), budgets, 0.1) if opt == "stochastic" else None
        gi, gg = nbk.greedy_batched(S, valid, budgets, opt, u)
        assert gi.shape == (4, 6)
        assert sorted(gi[0].tolist()) == list(range(6))
        assert gi[1].tolist() == [3, -1, -1, -1, -1, -1]
        assert (gi[2] == -1).all() and (gg[2] == 0).all()
        assert set(gi[3, :2].tolist()) <= {2, 3, 4, 5} and (gi[3, 2:] == -1).all()
        w, o = nbk.assign_batched(S, valid, gi)
        np.testing.assert_array_equal(w.sum(axis=1), [6, 1, 0, 4])
        assert o[2] == 0
    empty = nbk.greedy_batched(np.zeros((0, 3, 3)), np.zeros((0, 3), bool), np.zeros(0, np.int64), "lazy")
    assert empty[0].shape == (0, 0) and empty[0].dtype == np.int64


# --------------------------------------------------------------------------------------------------
# assign_batched
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 6), n=st.integers(1, 60))
def test_assign_matches_reference(dtype, seed, B, n):
    X, valid, budgets, _ = make_batch(seed, B, n, 3, dtype)
    S = ref.similarity_batched(X, valid, "euclidean", "exp", 3.0)
    idx, _ = ref.greedy_batched(S, valid, budgets, "naive")
    w1, o1 = nbk.assign_batched(S, valid, idx)
    w0, o0 = ref.assign_batched(S, valid, idx)
    assert w1.dtype == S.dtype and o1.dtype == S.dtype
    np.testing.assert_array_equal(w1, w0)  # continuous similarities: no ties between picks
    np.testing.assert_allclose(o1, o0, rtol=RTOL[np.dtype(dtype)])
    for b in range(B):
        assert w1[b].sum() == (valid[b].sum() if budgets[b] else 0)
        np.testing.assert_allclose(o1[b], F(S[b].astype(np.float64), idx[b]), rtol=RTOL[np.dtype(dtype)])


def test_assign_ties_go_to_the_earliest_pick_and_holes_are_skipped():
    S = np.ones((1, 4, 4))
    valid = np.ones((1, 4), dtype=bool)
    idx = np.array([[-1, 2, 0, -1]])  # a hole before the first real pick
    w, o = nbk.assign_batched(S, valid, idx)
    np.testing.assert_array_equal(w, [[0, 4, 0, 0]])
    assert o[0] == 4
    w, o = nbk.assign_batched(S, valid, np.array([[-1, -1]]))
    np.testing.assert_array_equal(w, [[0, 0]])
    assert o[0] == 0


# --------------------------------------------------------------------------------------------------
# greedy_features (matrix-free)
# --------------------------------------------------------------------------------------------------


@each_dtype_and_optimizer(n=st.integers(1, 120), d=st.integers(1, 5), metric=st.sampled_from(METRICS),
                          kernel=st.sampled_from(KERNELS))
def test_greedy_features_matches_reference(optimizer, dtype, seed, n, d, metric, kernel):
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, d)) * rng.uniform(0.3, 3)).astype(dtype)
    k = int(rng.integers(1, n + 1))
    u = stochastic_draws(rng, [n], [k], 0.1)[0].astype(dtype) if optimizer == "stochastic" else None
    got = nbk.greedy_features(X, k, metric, kernel, 2.0, optimizer, u, 32)
    want = ref.greedy_features(X, k, metric, kernel, 2.0, optimizer, u, 32)
    idx, gains, weights, obj = got
    assert idx.dtype == np.int64 and idx.shape == (k,)
    assert gains.dtype == dtype and weights.dtype == dtype and obj.dtype == dtype and obj.shape == ()
    # the dense problem in float64 (accurate distances, as the kernel computes them)
    S = nbk.similarity_batched(X[None].astype(np.float64), np.ones((1, n), bool), metric, kernel, 2.0)
    noise = (1e-3 if dtype == np.float32 else 1e-9) * max(1.0, float(np.abs(S).max())) * n
    assert_greedy_matches(S, np.ones((1, n), bool), [k], optimizer, None if u is None else u[None],
                          (idx[None], gains[None]), (want[0][None], want[1][None]), noise=noise)
    assert weights.sum() == n
    np.testing.assert_allclose(float(obj), F(S[0], idx), rtol=RTOL[np.dtype(dtype)] * 10, atol=noise)
    if np.array_equal(idx, want[0]):
        np.testing.assert_allclose(float(obj), float(want[3]), rtol=RTOL[np.dtype(dtype)] * 10, atol=noise)
        # weights: each point's most similar pick; compare where the assignment is not a near tie
        sims = np.sort(S[0][:, idx], axis=1)
        clear = (sims[:, -1] - sims[:, -2] > noise) if k > 1 else np.ones(n, bool)
        if clear.all():
            np.testing.assert_array_equal(weights, want[2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_features_equals_dense_numba_path(dtype):
    """Same float64 similarities on both Numba paths: identical picks and gains, lazy == naive."""
    rng = np.random.default_rng(9)
    X = rng.standard_normal((400, 6)).astype(dtype)
    S = nbk.similarity_batched(X[None], np.ones((1, 400), bool), "cosine", "max-minus", 1.0)
    for opt in ("lazy", "naive"):
        idx, gains, weights, obj = nbk.greedy_features(X, 30, "cosine", "max-minus", 1.0, opt, None, 64)
        di, dg = nbk.greedy_batched(S, np.ones((1, 400), bool), np.array([30]), opt)
        np.testing.assert_array_equal(idx, di[0])
        np.testing.assert_allclose(gains, dg[0], rtol=RTOL[np.dtype(dtype)])
        w, o = nbk.assign_batched(S, np.ones((1, 400), bool), di)
        np.testing.assert_array_equal(weights, w[0])
    lazy = nbk.greedy_features(X, 60, "euclidean", "exp", 3.0, "lazy", None, 64)
    naive = nbk.greedy_features(X, 60, "euclidean", "exp", 3.0, "naive", None, 64)
    for a, b in zip(lazy, naive):
        np.testing.assert_array_equal(a, b)


def test_greedy_features_lazy_parallel_batches_keep_naive_picks():
    """Enough points that lazy re-evaluates hundreds of candidates in a step (parallel batches)."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((1500, 3))
    lazy = nbk.greedy_features(X, 40, "euclidean", "max-minus", 1.0, "lazy", None, 64)
    naive = nbk.greedy_features(X, 40, "euclidean", "max-minus", 1.0, "naive", None, 64)
    for a, b in zip(lazy, naive):
        np.testing.assert_array_equal(a, b)
    want = ref.greedy_features(X, 40, "euclidean", "max-minus", 1.0, "lazy", None, 512)
    np.testing.assert_array_equal(lazy[0], want[0])
    np.testing.assert_allclose(lazy[1], want[1], rtol=1e-9)
    np.testing.assert_array_equal(lazy[2], want[2])


# --------------------------------------------------------------------------------------------------
# inputs: read-only, non-contiguous, never mutated
# --------------------------------------------------------------------------------------------------


def _frozen_strided(a):
    """A read-only, non-contiguous view with the same values as ``a``."""
    big = np.zeros(a.shape + (2,), dtype=a.dtype)
    big[..., 0] = a
    v = big[..., 0]
    assert not v.flags.c_contiguous or v.size <= 1
    v.flags.writeable = False
    return v


@pytest.mark.parametrize("dtype", DTYPES)
def test_read_only_non_contiguous_inputs_are_accepted_and_unchanged(dtype):
    X, valid, budgets, u = make_batch(21, 5, 30, 3, dtype)
    S = nbk.similarity_batched(X, valid, "euclidean", "max-minus", 1.0)
    Xf, vf, bf, uf = (_frozen_strided(a) for a in (X, valid, budgets, u))
    Sf = _frozen_strided(S)
    copies = [a.copy() for a in (Xf, vf, bf, uf, Sf)]
    np.testing.assert_array_equal(nbk.similarity_batched(Xf, vf, "euclidean", "max-minus", 1.0), S)
    for opt in OPTIMIZERS:
        ui = uf if opt == "stochastic" else None
        gi, gg = nbk.greedy_batched(Sf, vf, bf, opt, ui)
        ci, cg = nbk.greedy_batched(S, valid, budgets, opt, u if ui is not None else None)
        np.testing.assert_array_equal(gi, ci)
        np.testing.assert_array_equal(gg, cg)
        gi = _frozen_strided(gi)
        w, o = nbk.assign_batched(Sf, vf, gi)
        np.testing.assert_array_equal(w, nbk.assign_batched(S, valid, np.ascontiguousarray(gi))[0])
    X2 = _frozen_strided(X[0])
    u2 = _frozen_strided(u[0])
    for opt in OPTIMIZERS:
        a = nbk.greedy_features(X2, 5, "cosine", "exp", 1.0, opt, u2, 8)
        b = nbk.greedy_features(np.ascontiguousarray(X[0]), 5, "cosine", "exp", 1.0, opt, u[0], 8)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    for a, c in zip((Xf, vf, bf, uf, Sf), copies):
        np.testing.assert_array_equal(a, c)


def test_contiguous_read_only_inputs_compile_nothing_new():
    """Read-only arrays are a separate numba type; the wrappers hand the jitted code writable copies,
    so a read-only input neither fails nor doubles the compiled specialisations."""
    import numba

    X, valid, budgets, u = make_batch(23, 4, 20, 3, np.float64)
    arrays = [np.array(a) for a in (X, valid, budgets, u)]
    for a in arrays:
        a.flags.writeable = False
    X, valid, budgets, u = arrays
    S = nbk.similarity_batched(X, valid, "euclidean", "exp", 1.0)
    S.flags.writeable = False
    gi, _ = nbk.greedy_batched(S, valid, budgets, "stochastic", u)
    gi.flags.writeable = False
    nbk.assign_batched(S, valid, gi)
    nbk.greedy_features(X[0], 3, "euclidean", "exp", 1.0, "stochastic", u[0], 8)
    seen = 0
    for name in dir(nbk):
        f = getattr(nbk, name)
        if isinstance(f, numba.core.registry.CPUDispatcher):
            for sig in f.signatures:
                arrays = [t for t in sig if isinstance(t, numba.types.Array)]
                seen += len(arrays)
                assert all(t.mutable for t in arrays), f"{name} compiled for a read-only array: {sig}"
    assert seen > 0  # the jitted entry points were called (their signatures are known)


def test_writable_inputs_are_not_mutated():
    X, valid, budgets, u = make_batch(22, 3, 20, 2, np.float64)
    keep = [a.copy() for a in (X, valid, budgets, u)]
    S = nbk.similarity_batched(X, valid, "cosine", "exp", 1.0)
    S0 = S.copy()
    for opt in OPTIMIZERS:
        gi, _ = nbk.greedy_batched(S, valid, budgets, opt, u)
        nbk.assign_batched(S, valid, gi)
        nbk.greedy_features(X[0], 3, "euclidean", "max-minus", 1.0, opt, u[0], 8)
    for a, c in zip((X, valid, budgets, u, S), keep + [S0]):
        np.testing.assert_array_equal(a, c)


# --------------------------------------------------------------------------------------------------
# end to end through the public API
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def numba_calls(monkeypatch):
    """Counts the Numba kernel calls made through crestcore.backends.get_kernel."""
    calls = {}
    for name in ("similarity_batched", "greedy_batched", "assign_batched", "greedy_features", "facility_batched"):
        fn = getattr(nbk, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **k)

        monkeypatch.setattr(nbk, name, wrapped)
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("matrix_free", [False, True], ids=["dense", "matrix-free"])
def test_facility_location_auto_equals_reference(optimizer, dtype, matrix_free, numba_calls):
    rng = np.random.default_rng(12)
    n = 90
    X = rng.standard_normal((n, 4)).astype(dtype)
    labels = rng.integers(0, 3, size=n)
    for extra in (dict(), dict(labels=labels), dict(metric="cosine", kernel="exp")):
        if matrix_free:  # just below the dense size of the smallest problem: the tiled path, in big tiles
            smallest = np.bincount(labels).min() if "labels" in extra else n
            mdb = int(smallest) ** 2 * np.dtype(dtype).itemsize - 1
        else:
            mdb = 1 << 30
        kw = dict(optimizer=optimizer, rng=5, max_dense_bytes=mdb)
        a = crestcore.facility_location(X, 10, backend="auto", **kw, **extra)
        b = crestcore.facility_location(X, 10, backend="reference", **kw, **extra)
        np.testing.assert_array_equal(a.indices, b.indices)
        for x, y in ((a.gains, b.gains), (a.weights, b.weights), (a.objective, b.objective)):
            assert x.dtype == dtype
            np.testing.assert_allclose(x, y, rtol=RTOL[np.dtype(dtype)] * 10)
        assert float(a.weights.sum()) == n
    # the auto runs went through Numba: matrix-free one call per problem (1 + 3 classes + 1), dense one
    # fused batched call per run
    if matrix_free:
        assert numba_calls == {"greedy_features": 5}, numba_calls
    else:
        assert numba_calls == {"facility_batched": 3}, numba_calls


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_float32_dense_and_matrix_free_paths_agree_bit_for_bit(metric, kernel):
    """Review 19: the matrix-free path kept its similarities in float64 while the dense paths store a
    float32 problem's in float32, so their gains differed in most inputs and their picks on near-ties
    (the default ``max_dense_bytes``, read from the memory free at the call, chose between them); a tight
    angular cluster under cosine got entirely different picks. Now both greedy over the same numbers."""
    rng = np.random.default_rng(0)
    cases = [(rng.normal(size=(50, 4)) * 3 + 1).astype(np.float32) for _ in range(12)]
    cases.append((1e3 + np.random.default_rng(1).normal(size=(40, 3)) * 0.01).astype(np.float32))
    for optimizer in OPTIMIZERS:
        for X in cases:
            kw = dict(metric=metric, kernel=kernel, optimizer=optimizer, rng=3)
            a = crestcore.facility_location(X, 10, **kw)
            b = crestcore.facility_location(X, 10, max_dense_bytes=1, **kw)
            assert (a.path, b.path) == ("dense", "matrix-free")
            for x, y in ((a.indices, b.indices), (a.gains, b.gains), (a.weights, b.weights),
                         (a.objective, b.objective)):
                np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_facility_location_max_dense_bytes_1000(optimizer, numba_calls):
    """The lead's recipe: a tiny max_dense_bytes sends every problem down the matrix-free path."""
    rng = np.random.default_rng(13)
    X = rng.standard_normal((40, 3))
    a = crestcore.facility_location(X, 6, optimizer=optimizer, rng=2, max_dense_bytes=1000)
    b = crestcore.facility_location(X, 6, optimizer=optimizer, rng=2, max_dense_bytes=1000, backend="reference")
    assert numba_calls == {"greedy_features": 1}
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.gains, b.gains, rtol=1e-9)
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_allclose(a.objective, b.objective, rtol=1e-9)


@FEW
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 120), d=st.integers(1, 5),
       optimizer=st.sampled_from(OPTIMIZERS), matrix_free=st.booleans())
def test_facility_location_auto_vs_reference_trajectory(seed, n, d, optimizer, matrix_free):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    k = int(rng.integers(1, n + 1))
    kw = dict(optimizer=optimizer, rng=seed, max_dense_bytes=n * n * 8 - 1 if matrix_free else 1 << 30)
    a = crestcore.facility_location(X, k, backend="auto", **kw)
    b = crestcore.facility_location(X, k, backend="reference", **kw)
    one = np.ones((1, n), dtype=bool)
    S = nbk.similarity_batched(X[None], one, "euclidean", "max-minus", 1.0)
    # the draws facility_location made from this seed
    u = stochastic_draws(np.random.default_rng(seed), [n], [k], 0.1) if optimizer == "stochastic" else None
    full = assert_greedy_matches(S, one, [k], optimizer, u, (a.indices[None], a.gains[None]),
                                 (b.indices[None], b.gains[None]), noise=1e-12 * n * max(1.0, float(S.max())))
    np.testing.assert_allclose(float(a.objective), F(S[0], a.indices), rtol=1e-9)
    assert float(a.weights.sum()) == n
    if full:
        np.testing.assert_allclose(float(a.objective), float(b.objective), rtol=1e-9)
        np.testing.assert_allclose(a.gains, b.gains, rtol=1e-9, atol=1e-9 * float(b.gains[0]))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_minibatch_step_auto_equals_reference(optimizer, numba_calls):
    """The CREST selection step (P x C small problems solved in one batched call) through the public API."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2000, 10))
    labels = rng.integers(0, 10, size=2000)
    kw = dict(m=32, r=300, P=4, rng=1, optimizer=optimizer)
    a = crestcore.minibatch_coresets(feats, labels, backend="auto", **kw)
    b = crestcore.minibatch_coresets(feats, labels, backend="reference", **kw)
    assert numba_calls == {"facility_batched": 1}, numba_calls  # one fused batched call
    np.testing.assert_array_equal(a.subsets, b.subsets)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_allclose(a.gains, b.gains, rtol=1e-9)
    np.testing.assert_allclose(a.objective, b.objective, rtol=1e-9)


def test_the_first_selection_leaves_torchs_thread_count_alone():
    """Numba's OpenMP layer, when it starts, sets the process's OpenMP thread count to NUMBA_NUM_THREADS;
    torch built on the same runtime then ran the user's model on that count instead of theirs from CREST's
    first selection on (and the first run of a process rounded differently from the next). In a fresh
    process: torch's count before and after a selection, and Numba's own count, are what was set."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("torch")
    code = (
        "import json, numpy as np, torch\n"
        "torch.set_num_threads(1)\n"
        "torch.ones(64, 64) @ torch.ones(64, 64)  # torch's OpenMP state in use, as in training\n"
        "assert torch.get_num_threads() == 1\n"
        "from crestcore import minibatch_coresets\n"
        "X = np.random.default_rng(0).standard_normal((20000, 10)).astype(np.float32)\n"
        "minibatch_coresets(X, np.arange(20000) % 10, m=128, r=512, P=5, rng=0)\n"
        "import numba\n"
        "print(json.dumps([torch.get_num_threads(), numba.get_num_threads(), numba.config.NUMBA_NUM_THREADS]))\n"
    )
    # the defaults (no thread variables set), as a user's process has them
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    torch_threads, numba_threads, numba_default = json.loads(out.stdout.strip().splitlines()[-1])
    assert torch_threads == 1 and numba_threads == numba_default
