"""crestcore/facility.py: the facility-location objective, greedy (naive, lazy, stochastic), weights.

Every claim is checked against tests/reference.py (plain loops in float64), on random instances drawn by
hypothesis. Index comparisons are made only on tie-free inputs: the reference greedy reports the smallest
gap between the winning and the runner-up gain, and a test compares indices only when that gap is far
above the rounding noise of the paths compared (``_tie_free``). Exact ties are tested separately with
small-integer similarity matrices, where every sum is exact and "lowest index wins" is checkable.
"""

from __future__ import annotations

import functools
import math

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import crestcore
import reference as R

METRICS = ("euclidean", "sqeuclidean", "cosine")
KERNELS = ("max-minus", "exp")
ONE_MINUS_INV_E = 1.0 - 1.0 / math.e

seeds = st.integers(0, 2**32 - 1)
metrics = st.sampled_from(METRICS)
kernels = st.sampled_from(KERNELS)
backends = st.sampled_from(("auto", "reference"))
exact_optimizers = st.sampled_from(("naive", "lazy"))


def _features(seed: int, n: int, d: int, *, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) * scale


def _labels(seed: int, n: int, n_classes: int) -> np.ndarray:
    """Labels with every class present, in shuffled order, with non-contiguous label values."""
    rng = np.random.default_rng(seed + 1)
    base = np.concatenate([np.arange(n_classes), rng.integers(0, n_classes, n - n_classes)])
    values = np.array([7, -3, 0, 42, 5, 11])[:n_classes]  # class order = ascending label value
    return values[rng.permutation(base)].astype(np.int64)


def _tie_free(expected: dict, rel: float = 1e-9) -> bool:
    """The reference's decisions are separated by more than ``rel`` of the first gain."""
    scale = max(1.0, float(np.max(np.abs(expected["gains"]))))
    return expected["margin"] > rel * scale


def _tie_free_problem(data, seed, n, d, n_classes, metric, kernel, *, scale=1.0):
    """``(k, X, labels, expected)`` of a property test against the reference: ``k`` drawn in [1, n], the
    features, labels of ``n_classes`` classes (None for 0), and the reference's answer; hypothesis
    discards the draws with more classes than points or with near-tied reference decisions."""
    assume(n_classes <= n)
    k = data.draw(st.integers(1, n), label="k")
    X = _features(seed, n, d, scale=scale)
    labels = _labels(seed, n, n_classes) if n_classes else None
    expected = R.facility_location(X, k, labels, metric=metric, kernel=kernel)
    assume(_tie_free(expected))
    return k, X, labels, expected


def _np(x) -> np.ndarray:
    return np.asarray(x)


def _check_against_reference(sel, expected, *, rtol=1e-9):
    scale = max(1.0, abs(expected["objective"]))
    np.testing.assert_array_equal(_np(sel.indices), expected["indices"])
    np.testing.assert_array_equal(_np(sel.weights), expected["weights"])
    np.testing.assert_allclose(_np(sel.gains), expected["gains"], rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(float(sel.objective), expected["objective"], rtol=rtol, atol=rtol * scale)


# ================================================================================================
# the objective and the gains (facility_objective, marginal_gains)
# ================================================================================================

nonneg_square = st.integers(1, 8).flatmap(
    lambda n: hnp.arrays(np.float64, (n, n), elements=st.floats(0.0, 10.0, allow_subnormal=False))
)


@given(S=nonneg_square, data=st.data())
def test_objective_is_monotone_and_submodular(S, data):
    """f(A + v) >= f(A) and f(A + v) - f(A) >= f(B + v) - f(B) for A subset of B, v outside B."""
    n = S.shape[0]
    B = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n - 1), label="B")
    A = data.draw(st.lists(st.sampled_from(B), unique=True) if B else st.just([]), label="A")
    v = data.draw(st.sampled_from([j for j in range(n) if j not in B]), label="v")

    def f(sel):
        return float(crestcore.facility_objective(S, np.asarray(sel, dtype=np.int64)))

    tol = 1e-9 * max(1.0, float(S.sum()))
    assert f(A + [v]) >= f(A) - tol
    assert f(A + [v]) - f(A) >= f(B + [v]) - f(B) - tol
    # and the library's objective is the definition
    assert f(B) == pytest.approx(R.objective(S, B), rel=1e-12, abs=1e-12)


@given(S=nonneg_square, data=st.data())
def test_marginal_gains_are_objective_differences(S, data):
    n = S.shape[0]
    A = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n), label="A")
    sel = np.asarray(A, dtype=np.int64)
    g = _np(crestcore.marginal_gains(S, sel))
    assert g.shape == (n,)
    expected = [R.gain(S, A, j) for j in range(n)]
    np.testing.assert_allclose(g, expected, rtol=1e-12, atol=1e-12)
    assert np.all(g[sel] == 0)  # nothing to gain from a candidate already chosen
    assert np.all(g >= 0)


def test_objective_and_gains_in_every_namespace(xp):
    rng = np.random.default_rng(3)
    S = rng.random((9, 9))
    for sel in ([], [4], [0, 8, 3]):
        sel_np = np.asarray(sel, dtype=np.int64)
        S_x, sel_x = xp.asarray(S), xp.asarray(sel_np)
        f = crestcore.facility_objective(S_x, sel_x)
        g = crestcore.marginal_gains(S_x, sel_x)
        xp.assert_native(f, S_x, np.float64, ndim=0)
        xp.assert_native(g, S_x, np.float64, ndim=1)
        assert float(xp.to_numpy(f)) == pytest.approx(R.objective(S, sel), rel=1e-12)
        np.testing.assert_allclose(xp.to_numpy(g), [R.gain(S, sel, j) for j in range(9)], rtol=1e-12)


# ================================================================================================
# greedy quality and agreement with the independent naive greedy
# ================================================================================================


@given(seed=seeds, n=st.integers(2, 9), d=st.integers(1, 4), metric=metrics, kernel=kernels,
       optimizer=exact_optimizers, data=st.data())
def test_greedy_reaches_1_minus_1_over_e_of_the_optimum(seed, n, d, metric, kernel, optimizer, data):
    k = data.draw(st.integers(1, n), label="k")
    X = _features(seed, n, d)
    sel = crestcore.facility_location(X, k, metric=metric, kernel=kernel, optimizer=optimizer)
    S = R.similarity(X, metric, kernel)
    opt, _ = R.brute_force_optimum(S, k)
    achieved = R.objective(S, _np(sel.indices))
    assert achieved >= ONE_MINUS_INV_E * opt - 1e-9 * max(1.0, opt)
    assert achieved <= opt + 1e-9 * max(1.0, opt)


@given(S=st.integers(2, 9).flatmap(lambda n: hnp.arrays(np.float64, (n, n), elements=st.integers(0, 5))),
       data=st.data())
def test_greedy_bound_on_precomputed_with_ties(S, data):
    n = S.shape[0]
    k = data.draw(st.integers(1, n), label="k")
    sel = crestcore.facility_location(S, k, metric="precomputed", kernel=None, optimizer="lazy")
    opt, _ = R.brute_force_optimum(S, k)
    assert float(sel.objective) >= ONE_MINUS_INV_E * opt - 1e-12
    assert float(sel.objective) == R.objective(S, _np(sel.indices))


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # assume(tie-free) filters
@given(seed=seeds, n=st.integers(2, 40), d=st.integers(1, 6), metric=metrics, kernel=kernels,
       optimizer=exact_optimizers, backend=backends, n_classes=st.integers(0, 4), data=st.data())
def test_greedy_equals_independent_naive_greedy(seed, n, d, metric, kernel, optimizer, backend, n_classes, data):
    """Indices (tie-free inputs), weights, gains and objective of the library == the loop reference."""
    scale = data.draw(st.sampled_from([1e-2, 1.0, 30.0]), label="scale")
    k, X, labels, expected = _tie_free_problem(data, seed, n, d, n_classes, metric, kernel, scale=scale)
    sel = crestcore.facility_location(X, k, labels=labels, metric=metric, kernel=kernel,
                                      optimizer=optimizer, backend=backend)
    _check_against_reference(sel, expected)


small_int_square = st.integers(1, 12).flatmap(
    lambda n: hnp.arrays(np.float64, (n, n), elements=st.integers(0, 3))
)


@given(S=small_int_square, backend=backends, optimizer=exact_optimizers, data=st.data())
@example(S=np.zeros((5, 5)), backend="auto", optimizer="lazy", data=None).via("all gains zero")
@example(S=np.ones((6, 6)), backend="auto", optimizer="lazy", data=None).via("all similarities equal")
def test_exact_ties_break_to_the_lowest_index(S, backend, optimizer, data):
    """Small-integer, asymmetric similarities: sums are exact, so ties are real and checkable."""
    n = S.shape[0]
    k = data.draw(st.integers(1, n), label="k") if data is not None else min(3, n)
    sel = crestcore.facility_location(S, k, metric="precomputed", kernel=None, optimizer=optimizer,
                                      backend=backend)
    expected = R.facility_location(S, k, metric="precomputed")
    np.testing.assert_array_equal(_np(sel.indices), expected["indices"])
    np.testing.assert_array_equal(_np(sel.weights), expected["weights"])
    np.testing.assert_array_equal(_np(sel.gains), expected["gains"])
    assert float(sel.objective) == expected["objective"]


@given(S=small_int_square, n_classes=st.integers(1, 3), backend=backends, optimizer=exact_optimizers,
       data=st.data())
def test_exact_ties_per_class(S, n_classes, backend, optimizer, data):
    n = S.shape[0]
    assume(n_classes <= n)
    labels = _labels(int(S.sum()), n, n_classes)
    k = data.draw(st.integers(1, n), label="k")
    sel = crestcore.facility_location(S, k, labels=labels, metric="precomputed", kernel=None,
                                      optimizer=optimizer, backend=backend)
    expected = R.facility_location(S, k, labels, metric="precomputed")
    np.testing.assert_array_equal(_np(sel.indices), expected["indices"])
    np.testing.assert_array_equal(_np(sel.weights), expected["weights"])
    assert float(sel.objective) == expected["objective"]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_lazy_equals_naive_on_a_larger_instance(metric, kernel):
    """n = 150 makes lazy greedy's stale bounds matter (the dense and the matrix-free lazy)."""
    X = _features(11, 150, 5)
    naive = crestcore.facility_location(X, 20, metric=metric, kernel=kernel, optimizer="naive")
    for mdb in (1 << 30, 150 * 150 * 8 - 1):
        lazy = crestcore.facility_location(X, 20, metric=metric, kernel=kernel, optimizer="lazy",
                                           max_dense_bytes=mdb)
        np.testing.assert_array_equal(_np(lazy.indices), _np(naive.indices))
        np.testing.assert_array_equal(_np(lazy.weights), _np(naive.weights))
        np.testing.assert_allclose(_np(lazy.gains), _np(naive.gains), rtol=1e-9)


# ================================================================================================
# stochastic greedy
# ================================================================================================


@pytest.mark.parametrize("epsilon", [0.1, 0.5])
def test_stochastic_greedy_is_near_naive_in_expectation(epsilon):
    """Statistical test, fixed seeds: mean over 40 seeds >= (1 - 1/e - epsilon) x the naive objective.

    The guarantee is in expectation; the tolerance is the guarantee itself, which is far below what
    stochastic greedy reaches in practice, so a failure means a broken sampler, not bad luck.
    """
    X = _features(5, 80, 3)
    k = 8
    naive = float(crestcore.facility_location(X, k, optimizer="naive").objective)
    values = []
    for seed in range(40):
        sel = crestcore.facility_location(X, k, optimizer="stochastic", epsilon=epsilon, rng=seed)
        idx = _np(sel.indices)
        assert idx.shape == (k,) and idx.dtype == np.int64
        assert np.unique(idx).size == k and idx.min() >= 0 and idx.max() < 80
        assert float(np.sum(_np(sel.weights))) == 80
        values.append(float(sel.objective))
    assert np.mean(values) >= (ONE_MINUS_INV_E - epsilon) * naive


@given(seed=seeds, n=st.integers(1, 30), epsilon=st.floats(0.01, 0.99), n_classes=st.integers(0, 3),
       data=st.data())
def test_stochastic_returns_k_distinct_valid_indices(seed, n, epsilon, n_classes, data):
    assume(n_classes <= n)
    k = data.draw(st.integers(1, n), label="k")
    X = _features(seed, n, 2)
    labels = _labels(seed, n, n_classes) if n_classes else None
    sel = crestcore.facility_location(X, k, labels=labels, optimizer="stochastic", epsilon=epsilon, rng=seed)
    idx = _np(sel.indices)
    assert idx.shape == (k,) and np.unique(idx).size == k
    assert idx.min() >= 0 and idx.max() < n
    if k >= n_classes:  # every class has a pick, so every point is represented
        assert float(np.sum(_np(sel.weights))) == n
    # the objective it reports is the objective of what it picked
    if labels is None:
        assert float(sel.objective) == pytest.approx(R.objective(R.similarity(X), idx), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("case", ["plain", "labels", "matrix-free", "sparse"])
def test_stochastic_greedy_with_a_tiny_epsilon_is_greedy_on_every_backend(case):
    """A step whose sample is at least the candidates remaining looks at every one of them (draws mapped
    to the positions 0 .. R-1): with epsilon = 1e-12 every step is such a step, so the picks are naive
    greedy's, on NumPy (Numba), torch and the reference alike. (The sample was drawn with replacement,
    capped at n, so about 1/e of the candidates went unseen at every step: 24 of 40 seeds picked
    otherwise than greedy at n = 50, k = 2.)"""
    X = _features(11, 50, 3)
    kw = dict(labels=_labels(11, 50, 3)) if case == "labels" else {}
    if case == "matrix-free":
        kw["max_dense_bytes"] = 1000
    if case == "sparse":
        kw["neighbors"] = 49
    inputs = [("numpy", X, kw), ("reference", X, dict(kw, backend="reference"))]
    torch = pytest.importorskip("torch") if case != "sparse" else None
    if torch is not None:
        tkw = dict(kw, labels=torch.from_numpy(kw["labels"])) if "labels" in kw else kw
        inputs.append(("torch", torch.from_numpy(X), tkw))
    for k in (1, 2, 7):
        for name, data, kk in inputs:
            greedy = _np(crestcore.facility_location(data, k, optimizer="naive", **kk).indices)
            for seed in range(5):
                sel = crestcore.facility_location(data, k, optimizer="stochastic", epsilon=1e-12, rng=seed, **kk)
                np.testing.assert_array_equal(_np(sel.indices), greedy, err_msg=f"{name} k={k} seed={seed}")


def test_stochastic_draws_map_an_exact_steps_draws_to_every_remaining_candidate():
    """Per step, ``floor(u R)`` (in float64 and in float32, as the kernels compute it) covers all R
    remaining positions exactly when the sample size reaches R, and only the drawn ones before."""
    from crestcore.backends import sample_sizes
    from crestcore.facility import stochastic_draws

    sizes, budgets, eps = np.array([50, 9, 3]), np.array([45, 4, 3]), 0.01
    u = stochastic_draws(np.random.default_rng(0), sizes, budgets, eps)
    s_b = sample_sizes(sizes, budgets, eps)
    for b in range(3):
        for t in range(int(budgets[b])):
            R = int(sizes[b]) - t
            for dt in (np.float64, np.float32):
                pos = np.minimum(np.floor(u[b, t].astype(dt) * dt(R)), R - 1).astype(np.int64)
                if s_b[b] >= R:
                    assert set(pos.tolist()) == set(range(R)), (b, t, dt)
                else:
                    assert len(set(pos[: s_b[b]].tolist())) <= s_b[b] < R
    assert s_b[0] < 50 and s_b[0] >= 50 - 44  # problem 0: sampled steps first, exact steps at the end


@pytest.mark.parametrize("bitgen", ["PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"])
@pytest.mark.parametrize("held", [False, True])
@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_stochastic_draws_ragged_read_the_padded_stream(bitgen, held, chunk):
    """Each problem's ragged draws are the used part of the one ``(B, K, s)`` block the host stream is read
    as (streamed in blocks of 7 values, so that every problem crosses a block boundary, the rows past a
    problem's budget skipped: PCG64's ``advance`` or drawn and discarded; or drawn at once and sliced), exact
    steps remapped, and the generator ends exactly where reading the block leaves it, also when it held
    the unused 32-bit half of a draw before (``integers`` leaves one; review 26: ``advance`` dropped it,
    and every later draw of a CREST run changed)."""
    from crestcore.backends import sample_sizes
    from crestcore.facility import stochastic_draws, stochastic_draws_ragged

    sizes, budgets, eps = np.array([50, 9, 3, 40, 2]), np.array([20, 4, 3, 0, 1]), 0.05
    make = getattr(np.random, bitgen)
    ref_rng, rng = np.random.Generator(make(3)), np.random.Generator(make(3))
    if held:
        ref_rng.integers(10), rng.integers(10)
    K, s_b = int(budgets.max()), sample_sizes(sizes, budgets, eps)
    block = ref_rng.random((sizes.size, K, int(s_b.max())))  # the stream as one padded block
    ragged = stochastic_draws_ragged(rng, sizes, budgets, eps, chunk=chunk)
    assert rng.bit_generator.state.keys() == ref_rng.bit_generator.state.keys()
    np.testing.assert_array_equal(rng.integers(2**31 - 1, size=5), ref_rng.integers(2**31 - 1, size=5))
    np.testing.assert_array_equal(rng.random(5), ref_rng.random(5))  # the same state after
    for b in range(sizes.size):
        k_b, sb = int(budgets[b]), int(s_b[b])
        assert ragged[b].shape == (k_b, sb)
        R = sizes[b] - np.arange(k_b)
        exact = sb >= R
        np.testing.assert_array_equal(ragged[b][~exact], block[b, :k_b, :sb][~exact])
        for t in np.flatnonzero(exact):  # every remaining position once, in order
            pos = np.minimum(np.floor(ragged[b][t] * R[t]), R[t] - 1)
            assert pos.tolist() == np.minimum(np.arange(sb), R[t] - 1).tolist()
    padded = stochastic_draws(np.random.Generator(make(3)), sizes, budgets, eps) if not held else None
    if padded is not None:
        for b in range(sizes.size):  # the padded block's used part; a sampled step's spare columns repeat its first
            np.testing.assert_array_equal(padded[b, : budgets[b], : s_b[b]], ragged[b])
            sampled = s_b[b] < sizes[b] - np.arange(budgets[b])
            np.testing.assert_array_equal(padded[b, : budgets[b], s_b[b]:][sampled],
                                          np.repeat(ragged[b][sampled, :1], padded.shape[2] - s_b[b], axis=1))



def test_the_padded_stochastic_block_is_the_only_block():
    """The padded draws' spare columns are filled in place: the peak is one block (8 MiB here), not two
    (review 29: a broadcast source overlapping the block was copied whole, 15.5 MiB at 1M values)."""
    import tracemalloc

    from crestcore.facility import stochastic_draws

    sizes, budgets = np.array([4000] + [40] * 399), np.array([400] + [4] * 399)  # (400, 400, 6): ~1M values
    tracemalloc.start()
    try:
        u = stochastic_draws(np.random.default_rng(0), sizes, budgets, 0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.3 * u.nbytes, (peak / 2**20, u.nbytes / 2**20)

def test_stochastic_greedy_with_many_classes_keeps_only_the_draws_it_uses():
    """One class of 1,200 points (on the matrix-free path) and 2,000 of two points: the draws were one
    padded (2001, 300, 19) float64 array and its copy (about 180 MiB) for about 50 kB used. Only each
    problem's own draws are kept now (each dense group's padded to the group); the picks are those of
    the whole padded block's rows (every sample as wide as the widest, as before)."""
    import tracemalloc

    import crestcore.facility as fac

    rng = np.random.default_rng(0)
    X = rng.normal(size=(1200 + 4000, 2))
    y = np.concatenate([np.zeros(1200, dtype=np.int64), 1 + np.repeat(np.arange(2000), 2)])
    kw = dict(labels=y, optimizer="stochastic", epsilon=0.01, rng=1, max_dense_bytes=1 << 20)
    crestcore.facility_location(X[:60], 3, labels=y[:60] % 2, optimizer="stochastic", rng=0)  # compiled
    tracemalloc.start()
    try:
        sel = crestcore.facility_location(X, 1500, **kw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sel.path == "dense+matrix-free" and peak < 24 * 2**20, peak / 2**20

    ragged = fac.stochastic_draws_ragged

    def padded(gen, sizes, budgets, eps):  # as before: every problem's rows of the whole padded block
        u = fac.pad_draws(ragged(gen, sizes, budgets, eps))
        return [u[b, : budgets[b]] for b in range(len(sizes))]

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(fac, "stochastic_draws_ragged", padded)
        ref = crestcore.facility_location(X, 1500, **kw)
    finally:
        mp.undo()
    np.testing.assert_array_equal(sel.indices, ref.indices)
    np.testing.assert_array_equal(sel.weights, ref.weights)
    assert float(sel.objective) == float(ref.objective)



def test_objective_and_gains_of_autograd_similarities_are_differentiable_without_a_warning():
    """Review 24: facility_objective of a similarity matrix that requires grad warned (torch's asarray on
    a tensor with a graph). It no longer warns and stays differentiable in S (review 26: detaching it, the
    first fix, broke .backward()): each row's gradient is 1 at its best selected column, 0 elsewhere.
    marginal_gains keeps its graph too; both give the detached input's values."""
    torch = pytest.importorskip("torch")
    S = torch.rand(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    sel = torch.tensor([1, 4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obj, gains = crestcore.facility_objective(S, sel), crestcore.marginal_gains(S, sel)
        obj.backward()
    best = sel[S.detach()[:, sel].argmax(dim=1)]
    expected = torch.zeros(6, 6, dtype=torch.float64)
    expected[torch.arange(6), best] = 1.0
    torch.testing.assert_close(S.grad, expected, rtol=0, atol=0)
    assert gains.requires_grad
    with torch.no_grad():
        ref_obj, ref_gains = crestcore.facility_objective(S.detach(), sel), crestcore.marginal_gains(S.detach(), sel)
    assert float(obj.detach()) == float(ref_obj)
    torch.testing.assert_close(gains.detach(), ref_gains, rtol=0, atol=0)
    assert isinstance(crestcore.facility_objective(S.detach().numpy(), sel.numpy()), np.ndarray)  # 0-d, not a scalar
    empty = crestcore.facility_objective(S, torch.zeros(0, dtype=torch.int64))  # review 27: 0 with a graph too
    empty.backward()
    assert float(empty.detach()) == 0.0 and isinstance(crestcore.facility_objective(S.detach().numpy(), sel.numpy()[:0]),
                                                        np.ndarray)


def test_the_numba_route_returns_a_numpy_bfloat16_problems_results_in_bfloat16():
    """Review 24: backend="numba" on a NumPy bfloat16 array (ml_dtypes, as JAX hands them out) solved in
    float32 and returned float32 weights, gains and objective, where torch's and JAX's bfloat16 came back
    in bfloat16 and the docs promise the input's dtype. The same picks as the float32 problem."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    X = np.random.default_rng(8).normal(size=(60, 3)).astype(ml_dtypes.bfloat16)
    sel = crestcore.facility_location(X, 4, backend="numba")
    ref = crestcore.facility_location(X.astype(np.float32), 4, backend="numba")
    for name in ("weights", "gains", "objective"):
        assert getattr(sel, name).dtype == X.dtype, name
    np.testing.assert_array_equal(sel.indices, ref.indices)
    np.testing.assert_array_equal(sel.weights.astype(np.float32), ref.weights.astype(X.dtype).astype(np.float32))
    cs = crestcore.minibatch_coresets(X, None, m=2, r=10, P=2, rng=0, backend="numba")
    assert cs.weights.dtype == X.dtype


def test_an_exp_kernel_whose_similarities_all_vanish_is_warned_about():
    """Review 24: the exp kernel at the default scale (the number of features) on features of magnitude
    1e3: every similarity between distinct points is below the float resolution, every pick gains exactly
    1, and the picks were the first k rows without a word. Warned about now; a scale of the data's typical
    distance selects as before, without a warning."""
    X = np.random.default_rng(0).normal(size=(200, 3)) * 1000.0
    for dt in (np.float32, np.float64):
        with pytest.warns(RuntimeWarning, match="every pick gained exactly 1"):
            sel = crestcore.facility_location(X.astype(dt), 5, kernel="exp")
        assert sel.indices.tolist() == [0, 1, 2, 3, 4]
    with pytest.warns(RuntimeWarning, match="every pick gained exactly 1"):  # on a kNN graph too (review 27)
        crestcore.facility_location(X, 5, kernel="exp", neighbors=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sel = crestcore.facility_location(X, 5, kernel="exp", scale=2000.0)
        assert sel.indices.tolist() != [0, 1, 2, 3, 4]
        # review 26: picks that could cover nothing else gain exactly 1 on ordinary data: no warning
        rs = np.random.default_rng(0)
        Z = rs.normal(size=(13, 2))
        crestcore.facility_location(Z, 3, labels=np.r_[0, 1, 2, np.full(10, 3)], kernel="exp", scale=1.0,
                                    class_budgets=[1, 1, 1, 0])  # classes of one point; a class without a pick
        crestcore.facility_location(Z[:6], 3, labels=np.arange(6), kernel="exp", scale=1.0)
        yc = np.arange(20) % 2  # a given graph whose rows list only the other class: no edge within a class
        nb = np.array([[j for j in range(20) if yc[j] != yc[i]][:3] for i in range(20)])
        crestcore.facility_location(rs.normal(size=(20, 2)), 4, labels=yc, neighbors=nb, kernel="exp", scale=1.0)

def test_stochastic_draws_are_float64_above_float32s_reach(monkeypatch):
    """Above 2^24 points a float32 ``u * R`` skips positions (``u`` near 1 is spaced 2^-24): some candidates
    could never be sampled. The draws then take float64 on every path (dense batch, per class on the
    matrix-free and sparse paths, minibatch coresets), float32 below it for float32 features. The limit
    is lowered here so that small problems cross it; the draws that reach the kernels are recorded."""
    import crestcore.backends.contract as contract
    import crestcore.facility as fac
    from crestcore.backends import draw_bits

    # float32 cannot reach position R - 2 of R = 2^24 + 3 (the last draws below 1 all land on R - 1 or R - 3)
    R = 2**24 + 3
    top = np.nextafter(np.float32(1.0), np.float32(0.0))
    reach32 = {int(np.floor(np.float32(top - i * np.float32(2.0**-24)) * np.float32(R))) for i in range(4)}
    assert R - 2 not in reach32 and draw_bits(32, R) == 64 and draw_bits(32, 2**24) == 32

    seen: list[tuple[int, str]] = []
    real = fac.draws_on

    def recording(xp, u_host, X, max_candidates):
        u = real(xp, u_host, X, max_candidates)
        seen.append((int(max_candidates), str(u.dtype).rsplit(".", 1)[-1]))
        return u

    monkeypatch.setattr(fac, "draws_on", recording)
    monkeypatch.setattr(contract, "FLOAT32_DRAW_LIMIT", 40)
    X = _features(4, 90, 3).astype(np.float32)
    y = np.array([0] * 60 + [1] * 30)
    cases = {
        "dense": dict(labels=y),
        "matrix-free": dict(labels=y, max_dense_bytes=1),
        "sparse": dict(labels=y, neighbors=8),
    }
    for name, kw in cases.items():
        seen.clear()
        crestcore.facility_location(X, 10, optimizer="stochastic", rng=0, **kw)
        assert seen, name
        for size, dt in seen:
            assert dt == ("float64" if size > 40 else "float32"), (name, size, dt)
        assert {size for size, _ in seen} >= ({60, 30} if name != "dense" else {60}), (name, seen)
    seen.clear()
    crestcore.minibatch_coresets(X[:30], None, m=4, r=30, P=2, rng=0, optimizer="stochastic")
    assert seen and all(dt == "float32" for _, dt in seen), seen
    seen.clear()
    crestcore.minibatch_coresets(X, None, m=4, r=60, P=2, rng=0, optimizer="stochastic")
    assert seen and all(dt == "float64" for _, dt in seen), seen
    seen.clear()
    crestcore.facility_location(X.astype(np.float64), 5, optimizer="stochastic", rng=0, max_dense_bytes=1)
    assert seen == [(90, "float64")]


def test_stochastic_is_reproducible_from_the_seed():
    X = _features(2, 50, 3)
    a = crestcore.facility_location(X, 6, optimizer="stochastic", rng=123)
    b = crestcore.facility_location(X, 6, optimizer="stochastic", rng=np.random.default_rng(123))
    np.testing.assert_array_equal(_np(a.indices), _np(b.indices))
    differ = [
        not np.array_equal(_np(crestcore.facility_location(X, 6, optimizer="stochastic", rng=s).indices),
                           _np(a.indices))
        for s in range(10)
    ]
    assert any(differ)  # the seed is actually used


# ================================================================================================
# gains, objective along the order, weights
# ================================================================================================


@given(seed=seeds, n=st.integers(1, 30), d=st.integers(1, 4), metric=metrics, kernel=kernels,
       optimizer=st.sampled_from(("naive", "lazy", "stochastic")), n_classes=st.integers(0, 3), data=st.data())
def test_gains_objective_and_weights_are_consistent(seed, n, d, metric, kernel, optimizer, n_classes, data):
    """Per class: gains[t] = F(picks[:t+1]) - F(picks[:t]) (so F never decreases and sum(gains) = F),
    gains non-increasing for the exact optimizers, weights sum to the class size."""
    assume(n_classes <= n)
    k = data.draw(st.integers(1, n), label="k")
    X = _features(seed, n, d)
    labels = _labels(seed, n, n_classes) if n_classes else np.zeros(n, dtype=np.int64)
    sel = crestcore.facility_location(X, k, labels=labels if n_classes else None, metric=metric,
                                      kernel=kernel, optimizer=optimizer, rng=seed)
    idx, gains, weights = _np(sel.indices), _np(sel.gains), _np(sel.weights)
    assert idx.shape == gains.shape == weights.shape == (k,)
    if k >= n_classes:  # every class has a pick (else see test_budget_split_when_classes_outnumber_k)
        assert float(np.sum(weights)) == n
    assert float(np.sum(gains)) == pytest.approx(float(sel.objective), rel=1e-9, abs=1e-9)
    total = 0.0
    pick_labels = labels[idx]
    assert np.all(np.diff(pick_labels) >= 0) or n_classes == 0  # grouped by ascending label
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        mine = np.flatnonzero(pick_labels == c)
        if mine.size == 0:
            continue
        assert float(np.sum(weights[mine])) == members.size
        S = R.similarity(X[members], metric, kernel)
        local = np.searchsorted(members, idx[mine])
        assert np.array_equal(members[local], idx[mine])
        prev = 0.0
        tol = 1e-9 * max(1.0, float(gains[mine[0]]))
        for t in range(mine.size):
            f = R.objective(S, local[: t + 1])
            assert f >= prev - tol
            assert gains[mine[t]] == pytest.approx(f - prev, rel=1e-7, abs=tol)
            prev = f
        if optimizer != "stochastic":  # stochastic greedy looks at a random sample each step
            assert np.all(np.diff(gains[mine]) <= tol)
        total += prev
    assert float(sel.objective) == pytest.approx(total, rel=1e-9, abs=1e-9)


@given(seed=seeds, n=st.integers(2, 30), d=st.integers(1, 4), metric=st.sampled_from(("euclidean", "sqeuclidean")),
       kernel=kernels, data=st.data())
def test_weights_are_explicit_cluster_sizes(seed, n, d, metric, kernel, data):
    k = data.draw(st.integers(1, n), label="k")
    X = _features(seed, n, d)
    sel = crestcore.facility_location(X, k, metric=metric, kernel=kernel)
    expected = R.facility_location(X, k, metric=metric, kernel=kernel)
    assume(_tie_free(expected))
    S = R.similarity(X, metric, kernel)
    # tie-free assignment too: every point's best pick beats its second best clearly
    sims = S[:, _np(sel.indices)]
    if k > 1:
        top2 = np.sort(sims, axis=1)[:, -2:]
        assume(np.all(top2[:, 1] - top2[:, 0] > 1e-9 * max(1.0, float(S.max()))))
    np.testing.assert_array_equal(_np(sel.weights), R.assign_weights(S, _np(sel.indices)))
    assert np.all(_np(sel.weights) >= 1)  # distinct points: every pick represents at least itself


def test_k_equal_n_selects_everything():
    X = _features(4, 12, 3)
    sel = crestcore.facility_location(X, 12)
    assert sorted(_np(sel.indices).tolist()) == list(range(12))
    np.testing.assert_array_equal(_np(sel.weights), np.ones(12))
    S = R.similarity(X)
    assert float(sel.objective) == pytest.approx(12 * S.max(), rel=1e-12)
    assert len(sel) == 12


# ================================================================================================
# permutation equivariance
# ================================================================================================


@given(seed=seeds, n=st.integers(2, 30), d=st.integers(1, 4), metric=metrics, kernel=kernels,
       n_classes=st.integers(0, 3), data=st.data())
def test_permuting_the_rows_permutes_the_picks(seed, n, d, metric, kernel, n_classes, data):
    k, X, labels, _ = _tie_free_problem(data, seed, n, d, n_classes, metric, kernel)
    perm = np.asarray(data.draw(st.permutations(range(n)), label="perm"), dtype=np.int64)
    a = crestcore.facility_location(X, k, labels=labels, metric=metric, kernel=kernel)
    b = crestcore.facility_location(X[perm], k, labels=None if labels is None else labels[perm],
                                    metric=metric, kernel=kernel)
    inv = np.argsort(perm)
    np.testing.assert_array_equal(_np(b.indices), inv[_np(a.indices)])
    np.testing.assert_array_equal(_np(b.weights), _np(a.weights))
    assert float(b.objective) == pytest.approx(float(a.objective), rel=1e-9)


# ================================================================================================
# every array library gives the same answer, in its own arrays
# ================================================================================================

CASES = ("plain", "labels", "matrix-free", "precomputed", "stochastic", "exp-cosine")


@functools.cache
def _tie_free_instance(n, d, k, labels_seed, n_classes, metric, kernel, rel):
    """First seed whose reference decisions are separated by ``rel`` (float32 needs a wide margin)."""
    labels = _labels(labels_seed, n, n_classes) if n_classes else None
    for seed in range(100):
        X = _features(1000 + seed, n, d)
        exp = R.facility_location(X, k, labels, metric=metric, kernel=kernel)
        if _tie_free(exp, rel):
            return X, exp
    raise AssertionError("no tie-free instance found")  # pragma: no cover


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("case", CASES)
def test_every_namespace_gives_the_numpy_answer(xp, dtype, backend, case):
    n, d, k = 36, 4, 6
    labels = _labels(9, n, 3) if case in ("labels", "matrix-free") else None
    metric, kernel = ("cosine", "exp") if case == "exp-cosine" else ("euclidean", "max-minus")
    X, expected = _tie_free_instance(n, d, k, 9, 3 if labels is not None else 0, metric, kernel, rel=2e-5)
    kwargs = dict(metric=metric, kernel=kernel, backend=backend)
    data = X
    if case == "matrix-free":
        kwargs["max_dense_bytes"] = 64  # every class is solved without its dense matrix
    if case == "precomputed":
        data = R.similarity(X, metric, kernel)
        kwargs.update(metric="precomputed", kernel=None)
    if case == "stochastic":
        kwargs.update(optimizer="stochastic", rng=7)
        expected = None  # compared with NumPy's own stochastic run (same host draws for every library)
    base = crestcore.facility_location(data, k, labels=labels, **{**kwargs, "backend": "reference"})
    Xx = xp.asarray(data, dtype=dtype)
    lab = None if labels is None else xp.asarray(labels)
    sel = crestcore.facility_location(Xx, k, labels=lab, **kwargs)

    xp.assert_native(sel.indices, Xx, np.int64, ndim=1)
    xp.assert_native(sel.weights, Xx, dtype, ndim=1)
    xp.assert_native(sel.gains, Xx, dtype, ndim=1)
    xp.assert_native(sel.objective, Xx, dtype, ndim=0)
    rtol = 1e-4 if dtype == np.float32 else 1e-9
    np.testing.assert_array_equal(xp.to_numpy(sel.indices), _np(base.indices))
    np.testing.assert_array_equal(xp.to_numpy(sel.weights), _np(base.weights))
    np.testing.assert_allclose(xp.to_numpy(sel.gains), _np(base.gains), rtol=rtol, atol=rtol * float(base.objective))
    np.testing.assert_allclose(float(xp.to_numpy(sel.objective)), float(base.objective), rtol=rtol)
    if expected is not None:
        np.testing.assert_array_equal(_np(base.indices), expected["indices"])


# ================================================================================================
# precomputed, matrix-free and dense paths agree
# ================================================================================================


@given(seed=seeds, n=st.integers(2, 30), d=st.integers(1, 4), metric=metrics, kernel=kernels,
       optimizer=exact_optimizers, n_classes=st.integers(0, 3), data=st.data())
def test_precomputed_equals_features_path(seed, n, d, metric, kernel, optimizer, n_classes, data):
    """Given the same similarities, metric="precomputed" picks what the features path picks.

    With labels only the within-class blocks matter; the rest of the matrix is filled with junk.
    """
    k, X, labels, expected = _tie_free_problem(data, seed, n, d, n_classes, metric, kernel)
    if labels is None:
        S = R.similarity(X, metric, kernel)
    else:
        S = np.random.default_rng(seed).random((n, n)) * 1e3  # junk across classes
        for c in np.unique(labels):
            g = np.flatnonzero(labels == c)
            S[np.ix_(g, g)] = R.similarity(X[g], metric, kernel)
    a = crestcore.facility_location(X, k, labels=labels, metric=metric, kernel=kernel, optimizer=optimizer)
    b = crestcore.facility_location(S, k, labels=labels, metric="precomputed", kernel=None, optimizer=optimizer)
    np.testing.assert_array_equal(_np(b.indices), _np(a.indices))
    np.testing.assert_array_equal(_np(b.weights), _np(a.weights))
    assert float(b.objective) == pytest.approx(float(a.objective), rel=1e-9, abs=1e-9)
    _check_against_reference(b, expected)


@given(seed=seeds, n=st.integers(2, 60), d=st.integers(1, 4), metric=metrics, kernel=kernels,
       optimizer=st.sampled_from(("naive", "lazy", "stochastic")), n_classes=st.integers(0, 3),
       data=st.data())
def test_matrix_free_path_equals_dense_path(seed, n, d, metric, kernel, optimizer, n_classes, data):
    """A small ``max_dense_bytes`` sends (some or all) problems down the tiled matrix-free path."""
    k, X, labels, expected = _tie_free_problem(data, seed, n, d, n_classes, metric, kernel)
    sizes = [n] if labels is None else np.unique(labels, return_counts=True)[1].tolist()
    # between "the smallest problem is big" and "only the largest is": tiles of a few rows each
    mdb = data.draw(st.sampled_from([min(sizes) ** 2 * 8 - 1, max(sizes) ** 2 * 8 - 1]), label="max_dense_bytes")
    assume(mdb >= 1)
    dense = crestcore.facility_location(X, k, labels=labels, metric=metric, kernel=kernel,
                                        optimizer=optimizer, rng=seed)
    free = crestcore.facility_location(X, k, labels=labels, metric=metric, kernel=kernel,
                                       optimizer=optimizer, rng=seed, max_dense_bytes=mdb)
    np.testing.assert_array_equal(_np(free.indices), _np(dense.indices))
    np.testing.assert_array_equal(_np(free.weights), _np(dense.weights))
    np.testing.assert_allclose(_np(free.gains), _np(dense.gains), rtol=1e-9, atol=1e-9)
    assert float(free.objective) == pytest.approx(float(dense.objective), rel=1e-9, abs=1e-9)
    if optimizer != "stochastic":
        np.testing.assert_array_equal(_np(free.indices), expected["indices"])


# ================================================================================================
# per-class budgets (Hamilton) and all-identical points
# ================================================================================================

class_sizes = st.lists(st.integers(1, 30), min_size=1, max_size=5)


@given(sizes=class_sizes, data=st.data())
@example(sizes=[4, 28, 28], data=None).via("exact remainder tie: 20*4/60 and 20*28/60 both end in 1/3")
@example(sizes=[3, 16, 13, 25], data=None).via("exact remainder tie between classes 0 and 1")
@example(sizes=[1, 1, 30], data=None).via("small classes get one pick each")
def test_per_class_budget_is_the_documented_hamilton_split(sizes, data):
    n = sum(sizes)
    if data is None:
        k = {60: 20, 57: 19, 32: 3}[n]
    else:
        k = data.draw(st.integers(1, n), label="k")
    values = np.array([7, -3, 0, 42, 5])[: len(sizes)]  # label values, not positions, order the classes
    labels = np.random.default_rng(n).permutation(np.repeat(values, sizes))
    X = _features(n, n, 2)
    sel = crestcore.facility_location(X, k, labels=labels, optimizer="lazy")
    idx = _np(sel.indices)
    order = np.argsort(values, kind="stable")
    expected = R.hamilton(k, np.asarray(sizes)[order])  # by ascending label
    got = np.array([np.sum(labels[idx] == values[c]) for c in order])
    np.testing.assert_array_equal(got, expected)
    assert idx.size == k and np.unique(idx).size == k
    # picks are grouped by ascending label
    assert np.all(np.diff(np.searchsorted(np.sort(values), labels[idx])) >= 0)
    # weights per class sum to the class size (classes with no pick have no weights)
    w = _np(sel.weights)
    for c, size in zip(values, sizes):
        if np.any(labels[idx] == c):
            assert float(np.sum(w[labels[idx] == c])) == size


def test_budget_split_when_classes_outnumber_k():
    """k < #classes: the largest classes get the picks (no class can get one of nothing)."""
    labels = np.repeat(np.arange(5), [10, 2, 7, 1, 5])
    X = _features(0, labels.size, 2)
    sel = crestcore.facility_location(X, 3, labels=labels)
    got = np.bincount(labels[_np(sel.indices)], minlength=5)
    np.testing.assert_array_equal(got, R.hamilton(3, [10, 2, 7, 1, 5]))
    np.testing.assert_array_equal(got, [1, 0, 1, 0, 1])
    assert float(np.sum(_np(sel.weights))) == 10 + 7 + 5  # only classes with picks are represented


IDENTICAL_ROWS = {
    "0.1": lambda d: np.full((1, d), 0.1),
    "1/3": lambda d: np.full((1, d), 1.0 / 3.0),
    "normal": lambda d: np.random.default_rng(0).normal(size=(1, d)),
}


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("d", [3, 64])
@pytest.mark.parametrize("row", sorted(IDENTICAL_ROWS))
def test_all_identical_points_give_the_documented_answer(xp, metric, kernel, d, row):
    """Docstring: every gain after the first is 0, the picks are the lowest indices, the first pick of
    each problem carries all the weight. (Identical points are at distance exactly 0 from each other,
    so all similarities of a problem are equal: an all-ties input.)"""
    row = IDENTICAL_ROWS[row](d)
    X = np.repeat(row, 9, axis=0)
    Xx = xp.asarray(X)
    sel = crestcore.facility_location(Xx, 3, metric=metric, kernel=kernel)
    np.testing.assert_array_equal(xp.to_numpy(sel.indices), [0, 1, 2])
    np.testing.assert_array_equal(xp.to_numpy(sel.weights), [9, 0, 0])
    g = xp.to_numpy(sel.gains)
    assert np.all(np.abs(g[1:]) <= 1e-12 * max(1.0, abs(g[0])))
    # per class: each class's first pick carries the whole class
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 1, 0])
    sel = crestcore.facility_location(Xx, 4, labels=xp.asarray(labels), metric=metric, kernel=kernel)
    np.testing.assert_array_equal(xp.to_numpy(sel.indices), [1, 3, 0, 2])
    np.testing.assert_array_equal(xp.to_numpy(sel.weights), [4, 0, 5, 0])


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_all_zero_points(metric):
    sel = crestcore.facility_location(np.zeros((6, 2)), 2, metric=metric)
    np.testing.assert_array_equal(_np(sel.indices), [0, 1])
    np.testing.assert_array_equal(_np(sel.weights), [6, 0])
    np.testing.assert_array_equal(_np(sel.gains), [0, 0])


def test_selection_dataclass():
    sel = crestcore.facility_location(_features(0, 10, 2), 3)
    assert isinstance(sel, crestcore.Selection)
    assert len(sel) == 3
    with pytest.raises(AttributeError):
        sel.indices = None  # frozen


def test_default_max_dense_bytes_follows_available_memory_and_the_path_is_reported(monkeypatch, caplog):
    """max_dense_bytes=None is a quarter of the memory available now (at least 64 MiB); the path taken
    is in the result and on the crestcore logger."""
    import logging

    import crestcore.backends as B
    from crestcore.facility import resolve_dense_bytes

    X = np.random.default_rng(0).normal(size=(3000, 4))  # a dense 3000 x 3000 float64 similarity: 72 MB
    avail = B.host_available_bytes()
    assert avail is None or avail > 0
    # the memory available moves between two reads on a shared machine: the default follows a fixed reading
    monkeypatch.setattr(B, "host_available_bytes", lambda: avail)
    assert resolve_dense_bytes(None, np, X) == (max(1 << 26, int(avail * 0.25)) if avail else 1 << 30)
    assert resolve_dense_bytes(123, np, X) == 123
    if avail is not None and avail * 0.25 > 3000 * 3000 * 8:
        assert crestcore.facility_location(X, 10).path == "dense"
    # a machine with 100 MB free: a quarter is under the 64 MiB floor, and 72 MB does not fit it
    monkeypatch.setattr(B, "host_available_bytes", lambda: 100_000_000)
    assert resolve_dense_bytes(None, np, X) == 1 << 26
    # none available (a container at its memory limit reads 0) is the floor too, not the 1 GiB of "cannot
    # be told" (review 103: 0 was taken for None)
    monkeypatch.setattr(B, "host_available_bytes", lambda: 0)
    assert resolve_dense_bytes(None, np, X) == 1 << 26
    monkeypatch.setattr(B, "host_available_bytes", lambda: None)
    assert resolve_dense_bytes(None, np, X) == 1 << 30
    monkeypatch.setattr(B, "host_available_bytes", lambda: 100_000_000)
    with caplog.at_level(logging.INFO, logger="crestcore"):
        sel = crestcore.facility_location(X, 10)
    assert sel.path == "matrix-free"
    assert any("matrix-free path" in r.getMessage() for r in caplog.records)
    ref = crestcore.facility_location(X, 10, max_dense_bytes=1 << 30)
    assert ref.path == "dense"
    np.testing.assert_array_equal(sel.indices, ref.indices)
    small = X[:600]
    two = crestcore.facility_location(small, 10, labels=(np.arange(600) < 500).astype(np.int64),
                                      max_dense_bytes=300 * 300 * 8)
    assert two.path == "dense+matrix-free"


@pytest.mark.parametrize("neighbors", [None, 3])
def test_parallel_rows_are_at_cosine_distance_zero_on_every_backend(neighbors):
    """Parallel rows (every row of a 2-class logit gradient is a multiple of [1, -1]) are at cosine
    distance exactly 0 on every path, so Numba, torch and the reference pick and weigh alike."""
    torch = pytest.importorskip("torch")
    X = np.array([[0.1], [-1.0], [-2.0], [0.7]])
    kw = dict(metric="cosine", neighbors=neighbors)
    host = crestcore.facility_location(X, 3, **kw)
    ref = crestcore.facility_location(X, 3, backend="reference", **kw)
    dev = crestcore.facility_location(torch.from_numpy(X), 3, **kw)
    for other in (ref, dev):
        np.testing.assert_array_equal(_np(other.indices), _np(host.indices))
        np.testing.assert_array_equal(_np(other.weights), _np(host.weights))
    np.testing.assert_array_equal(_np(host.weights), [2, 2, 0])
    G = np.outer(np.random.default_rng(0).normal(size=40), [1.0, -1.0])
    a = crestcore.facility_location(G, 4, metric="cosine")
    b = crestcore.facility_location(G, 4, metric="cosine", backend="reference")
    np.testing.assert_array_equal(_np(a.weights), _np(b.weights))


def test_negative_seed_is_named_and_grad_tensors_do_not_warn():
    X = np.random.default_rng(0).normal(size=(10, 2))
    with pytest.raises(ValueError, match="rng seed must be non-negative"):
        crestcore.facility_location(X, 3, optimizer="stochastic", rng=-1)
    with pytest.raises(ValueError, match="rng seed must be non-negative"):
        crestcore.minibatch_coresets(X, None, m=2, r=5, P=2, rng=-1)
    torch = pytest.importorskip("torch")
    Xt = torch.from_numpy(X).requires_grad_(True)  # e.g. gradients straight from a model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sel = crestcore.facility_location(Xt, 3)
    assert not sel.weights.requires_grad


def test_objective_and_gains_refuse_negative_similarities():
    S = -np.array([[1.0, 0.5], [0.5, 1.0]])
    for f in (crestcore.facility_objective, crestcore.marginal_gains):
        with pytest.raises(ValueError, match="non-negative"):
            f(S, np.array([0]))


def test_the_bound_suggested_for_classes_fits_every_class():
    """With labels, "auto" plans the largest class first, so when a class does not fit, the bound the
    error suggests is one that fits every class (it was the first class's: 64000 for n = 500, and the
    rerun failed on the class of 2500)."""
    import re

    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 4))
    labels = np.repeat([0, 1], [500, 2500])
    with pytest.raises(ValueError, match="n=2500") as err:
        crestcore.facility_location(X, 20, labels=labels, optimizer="auto", max_dense_bytes=1000)
    bound = int(re.search(r"max_dense_bytes >= (\d+)", str(err.value)).group(1))
    sel = crestcore.facility_location(X, 20, labels=labels, optimizer="auto", max_dense_bytes=bound)
    assert np.asarray(sel.indices).size == 20


def test_numpy_objectives_are_0d_arrays_as_documented():
    X = np.random.default_rng(0).normal(size=(8, 2))
    assert type(crestcore.facility_location(X, 2).objective) is np.ndarray
    assert crestcore.facility_location(X, 2).objective.shape == ()
    S = np.eye(3)
    for picks in ([0], []):
        out = crestcore.facility_objective(S, np.array(picks, dtype=np.int64))
        assert type(out) is np.ndarray and out.shape == ()


def test_pairwise_distances_refuses_empty_input_by_name():
    for shape in ((0, 3), (3, 0)):
        with pytest.raises(ValueError, match="X is empty"):
            crestcore.pairwise_distances(np.zeros(shape))
    with pytest.raises(ValueError, match="Y is empty"):
        crestcore.pairwise_distances(np.ones((2, 3)), np.zeros((0, 3)))


def _grid_with_duplicates(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 80))
    base = rng.integers(0, 3, size=(n // 2, 2)).astype(float)  # 9 distinct points: many equal gains
    X = np.concatenate([base, base])[rng.permutation(2 * (n // 2))]
    return X, int(rng.integers(2, 8))


def test_matrix_free_lazy_breaks_ties_as_naive_greedy():
    # R4: the reference greedy_features lazy stop rule "(exact == bound and c < o)": some of these seeds
    # hit a stale lower-index bound equal to the best exact gain
    for seed in range(130):
        X, k = _grid_with_duplicates(seed)
        naive = crestcore.facility_location(X, k, backend="reference", optimizer="naive", metric="sqeuclidean")
        for backend in ("reference", "auto"):
            lazy = crestcore.facility_location(X, k, backend=backend, max_dense_bytes=64, metric="sqeuclidean")
            assert lazy.path == "matrix-free"
            np.testing.assert_array_equal(lazy.indices, naive.indices, err_msg=f"seed {seed} {backend}")
            np.testing.assert_array_equal(lazy.weights, naive.weights, err_msg=f"seed {seed} {backend}")


def test_tensors_that_require_grad_give_outputs_without_a_graph_and_no_warning():
    """Selections are not differentiable: the generic reference path's outputs carried the input's autograd
    graph, and torch warned in its asarray calls; trust functions warned converting such a scalar."""
    import warnings

    torch = pytest.importorskip("torch")
    X = torch.tensor(np.random.default_rng(0).normal(size=(8, 2)), requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for backend in ("auto", "reference"):
            sel = crestcore.facility_location(X, 2, backend=backend)
            assert not (sel.gains.requires_grad or sel.objective.requires_grad or sel.weights.requires_grad)
        cs = crestcore.minibatch_coresets(X, None, m=2, r=4, P=2, rng=0, backend="reference")
        assert not cs.weights.requires_grad
        assert not crestcore.pairwise_distances(X).requires_grad
        assert crestcore.relative_error(torch.tensor(2.0, requires_grad=True), 1.5) == pytest.approx(0.25)
    assert X.requires_grad and X.grad is None  # the caller's tensor is untouched


def test_bfloat16_host_features_of_jax_take_the_numba_route_and_numpy_bfloat16_is_named():
    """jax's bfloat16 reaches the host as an ml_dtypes array, which NumPy's dtype checks do not count as
    floating: backend="numba" solves it in float32 (as a torch bfloat16 tensor), with the picks of the
    generic path; a NumPy bfloat16 array itself gets an error that says what it is."""
    jnp = pytest.importorskip("jax.numpy")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    X = np.random.default_rng(0).normal(size=(40, 3))
    Xb = jnp.asarray(X, dtype=jnp.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # jax's int64 -> int32 notes
        a = crestcore.facility_location(Xb, 5, backend="numba")
        b = crestcore.facility_location(Xb, 5)
    assert np.asarray(a.indices).tolist() == np.asarray(b.indices).tolist()
    assert a.weights.dtype == jnp.bfloat16
    with pytest.raises(TypeError, match="NumPy bfloat16 array"):
        crestcore.facility_location(X.astype(ml_dtypes.bfloat16), 5)


def test_a_generator_passed_to_an_optimizer_that_draws_nothing_is_not_advanced():
    # rng is only used by "stochastic": lazy and naive (and CRAIG's lazy per-class solves) leave a shared
    # Generator's stream where it was, as the docs say, with the same picks
    from crestcore.baselines import craig

    X = np.random.default_rng(7).normal(size=(60, 3))
    y = np.arange(60) % 3
    for call in (lambda g: crestcore.facility_location(X, 5, rng=g),
                 lambda g: crestcore.facility_location(X, 5, optimizer="naive", rng=g), lambda g: craig(X, y, 6, rng=g)):
        g = np.random.default_rng(0)
        before = g.bit_generator.state
        out = call(g)
        assert g.bit_generator.state == before
        np.testing.assert_array_equal(np.asarray(out.indices), np.asarray(call(None).indices))
    g = np.random.default_rng(0)
    crestcore.facility_location(X, 5, optimizer="stochastic", rng=g)
    assert g.bit_generator.state != np.random.default_rng(0).bit_generator.state  # the draws come from it


def test_a_zero_row_under_cosine_covers_itself_and_nothing_else():
    """Review 33: the docs said a zero row is at cosine distance 1 from every point, itself included; the
    code (rightly) keeps the diagonal at 0. What the docs now say, checked: distance 0 to itself, 1 to every
    other point (another zero row included); with Y given no entry is a point's own, so 1 throughout."""
    from crestcore import pairwise_distances

    X = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    D = pairwise_distances(X, metric="cosine")
    assert D[0].tolist() == [0.0, 1.0, 1.0] and D[2].tolist() == [1.0, 1.0, 0.0]
    assert pairwise_distances(X, X, metric="cosine")[0].tolist() == [1.0, 1.0, 1.0]
    from crestcore import facility_location

    # max-minus similarities 1 - D: 1 on the diagonal, 0 elsewhere, so each pick covers itself only (gain 1),
    # ties to the lowest index; the uncovered zero row 2 joins the earliest pick's weight
    sel = facility_location(X, 2, metric="cosine")
    assert sel.indices.tolist() == [0, 1] and sel.gains.tolist() == [1.0, 1.0] and float(sel.objective) == 2.0
    assert sel.weights.tolist() == [2.0, 1.0]


def test_objective_and_gains_take_a_rectangular_similarity_of_points_by_candidates():
    """Review 102: both were documented for a square S but take any (n, c) one, rows the points to cover and
    columns the candidates (the docs now say so). Checked against the definition, sum over the rows of the
    best selected column, and the gain as the difference of two objectives."""
    S = np.random.default_rng(5).uniform(size=(4, 6))
    for sel in ([], [2], [0, 5], [1, 3, 4]):
        picked = np.asarray(sel, dtype=np.int64)
        want = float(S[:, picked].max(axis=1).sum()) if sel else 0.0
        assert float(crestcore.facility_objective(S, picked)) == pytest.approx(want, rel=1e-12)
        gains = crestcore.marginal_gains(S, picked)
        assert gains.shape == (6,)
        for j in range(6):
            grown = np.union1d(picked, [j]).astype(np.int64)
            assert gains[j] == pytest.approx(float(S[:, grown].max(axis=1).sum()) - want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("how", [dict(optimizer="auto"), dict(neighbors=3), dict()], ids=["auto", "neighbors", "lazy"])
def test_a_class_without_picks_is_neither_sized_nor_solved(how):
    """Review 103: a class with a budget of 0 (given, or k below the number of classes) was still planned,
    searched and solved: a call whose picking class fits was refused for the other's memory ("too small for
    any path on a problem of n=2000, ... k=0"), its graph or similarity was built (4.4 s for a 12,000-point
    class at budget 0), and the path and plan counted it. It is now left out before any of that: the result,
    path and plan are those of the picking class alone."""
    X = np.random.default_rng(0).normal(size=(2010, 4))
    labels = np.r_[np.zeros(2000, np.int64), np.ones(10, np.int64)]
    # (4,500 bytes: the ten points' graph with neighbors=3 and its builder's copies of their features take 4,240)
    got = crestcore.facility_location(X, 2, labels=labels, class_budgets=[0, 2], max_dense_bytes=4500, **how)
    alone = crestcore.facility_location(X[2000:], 2, max_dense_bytes=4500, **how)
    np.testing.assert_array_equal(got.indices, 2000 + alone.indices)
    np.testing.assert_array_equal(got.weights, alone.weights)
    assert float(got.objective) == float(alone.objective)
    assert got.path == alone.path
    if how:
        assert "1 " in got.plan and "n=10," in got.plan and "n=2000" not in got.plan


def test_cpu_tensors_are_told_of_the_numba_kernels_at_large_problems(monkeypatch):
    """Review 108: a CPU tensor took torch's dense greedy (every candidate re-evaluated at each pick) silently,
    37-39x slower than backend='numba' at n = 4,000, k = 400 (benchmarks/torch_cpu_dense.py). Above the work
    bound it is said once; backend='numba', NumPy input and small problems stay quiet."""
    torch = pytest.importorskip("torch")
    import crestcore.facility as fac

    X = np.random.default_rng(0).normal(size=(60, 3))
    T = torch.from_numpy(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        crestcore.facility_location(T, 5)  # 60^2 x 5: far below the bound
        monkeypatch.setattr(fac, "_HOST_TORCH_WARN_WORK", 1000)
        crestcore.facility_location(X, 5)
        quiet = crestcore.facility_location(T, 5, backend="numba")
    with pytest.warns(RuntimeWarning, match="torch's dense greedy.*backend='numba'"):
        loud = crestcore.facility_location(T, 5)
    assert torch.equal(loud.indices, quiet.indices)


def test_minibatch_coresets_on_cpu_tensors_is_told_of_the_numba_kernels(monkeypatch):
    """Review 117: minibatch_coresets on CPU torch ran torch's dense greedy silently (13 s where
    backend='numba' took 0.5 s, the same coresets); facility_location warned for the same work."""
    torch = pytest.importorskip("torch")
    import crestcore.facility as fac

    X = np.random.default_rng(0).normal(size=(200, 3))
    T = torch.from_numpy(X)
    kw = dict(m=8, r=60, P=2, rng=0, per_class=False)
    monkeypatch.setattr(fac, "_HOST_TORCH_WARN_WORK", 1000)
    with pytest.warns(RuntimeWarning, match="minibatch_coresets on CPU torch.*backend='numba'"):
        loud = crestcore.minibatch_coresets(T, None, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = crestcore.minibatch_coresets(T, None, backend="numba", **kw)
        crestcore.minibatch_coresets(X, None, **kw)
    assert torch.equal(loud.indices, quiet.indices)


def test_classes_are_split_by_one_sort():
    """Review 117: one comparison of the whole label array per class, O(n C) (6.5 s of a 7.6 s call at
    10^5 classes); one stable sort gives the same problems: each class's members ascending, classes in
    ascending label order."""
    from crestcore.facility import _problems_from_labels

    rng = np.random.default_rng(0)
    for labels in (rng.integers(0, 7, 500), rng.integers(-3, 10**9, 300), np.zeros(5, np.int64),
                   np.array([], dtype=np.int64)):
        got = _problems_from_labels(labels, labels.size)
        want = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        assert len(got) == len(want) and all(np.array_equal(a, b) and a.dtype == np.int64 for a, b in zip(got, want))


def test_classes_far_apart_in_size_are_not_padded_into_one_batch():
    """Review 117: the batched (torch, CuPy, generic) kernels work on the padded batch, every problem as
    large as its largest and with as many picks: one class of 2,000 points with a hundred of 20 took 20.6 s
    and 1.8 GB on torch, against 0.47 s for a loop over the classes. A batch now holds problems within a
    factor of two of its largest."""
    from crestcore.facility import _pack

    sizes = np.array([2000] + [20] * 100 + [15, 9], dtype=np.int64)
    groups = _pack(sizes, 8, 1 << 40, 3)
    assert groups[0] == [0]
    assert all(2 * min(sizes[g]) >= max(sizes[g]) for g in groups)
    assert sorted(p for g in groups for p in g) == list(range(sizes.size))
    assert len(groups) == 3  # [2000], the twenties with the 15, [9]


def test_the_generic_dense_path_is_sized_with_its_temporaries():
    """Review 117: NumPy input with more features than the Numba kernels take directly (and
    backend='reference', and the other libraries' generic code) peaked at about 4x max_dense_bytes, which
    the dense/matrix-free choice counted once: such a problem now goes matrix-free unless 4.5 similarity
    matrices fit, and the dense solve it does take stays within the bound."""
    import tracemalloc

    from crestcore.backends import numba as nbk

    rng = np.random.default_rng(0)
    n = 1200
    dense_matrix = n * n * 8
    X = rng.normal(size=(n, nbk._DIRECT_MAX_FEATURES + 1))
    sel = crestcore.facility_location(X, 10, max_dense_bytes=2 * dense_matrix)
    assert sel.path == "matrix-free"
    Xs = rng.normal(size=(n, 4))
    assert crestcore.facility_location(Xs, 10, max_dense_bytes=2 * dense_matrix).path == "dense"  # Numba: one
    assert crestcore.facility_location(Xs, 10, max_dense_bytes=2 * dense_matrix,
                                       backend="reference").path == "matrix-free"
    bound = 5 * dense_matrix
    crestcore.facility_location(Xs[:50], 3, backend="reference")  # first calls' one-off allocations
    tracemalloc.start()
    try:
        sel = crestcore.facility_location(Xs, 10, max_dense_bytes=bound, backend="reference")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sel.path == "dense" and peak <= 1.05 * bound, (peak, bound)


def test_a_precomputed_matrix_is_solved_without_gathered_copies():
    """Review 117: one precomputed problem was gathered twice and stacked (rows, columns, stack) and
    masked against a full zero matrix: 4-5 copies of the input. Now one masked copy, and a transposed one
    for a matrix that is not symmetric (review 120): within PEAK_FACTOR["precomputed"] = 2.25."""
    import tracemalloc

    rng = np.random.default_rng(1)
    n = 1000
    F = rng.normal(size=(n, 3))
    S = np.exp(-((F[:, None, :] - F[None, :, :]) ** 2).sum(-1))
    crestcore.facility_location(S, 10, metric="precomputed")  # the kernels' first load or compile: ~30 MB
    tracemalloc.start()
    try:
        sel = crestcore.facility_location(S, 10, metric="precomputed")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 1.5 * S.nbytes, peak / S.nbytes
    want = crestcore.facility_location(S, 10, metric="precomputed", backend="reference")
    assert np.array_equal(np.asarray(sel.indices), np.asarray(want.indices))
    A = S * rng.uniform(0.5, 1.0, size=S.shape)  # not symmetric
    crestcore.facility_location(A, 10, metric="precomputed")  # (its kernels too)
    tracemalloc.start()
    try:
        crestcore.facility_location(A, 10, metric="precomputed")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= crestcore.facility.PEAK_FACTOR["precomputed"] * A.nbytes, peak / A.nbytes
