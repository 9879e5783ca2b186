"""crestcore.backends.numba.facility_batched (the fused dense path) and draw_stratified (host draws).

The fused kernel must return bit for bit what the module's three kernels return one after the other
(``similarity_batched``, ``greedy_batched``, ``assign_batched``), on every metric, kernel, optimizer and
dtype, with padding anywhere, on one thread or several.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from crestcore.backends import get_kernel  # noqa: E402
from crestcore.backends import numba as nbk  # noqa: E402
from crestcore.facility import stochastic_draws  # noqa: E402

METRICS = ("euclidean", "sqeuclidean", "cosine")
KERNELS = ("max-minus", "exp")
OPTIMIZERS = ("naive", "lazy", "stochastic")
FEW = settings(deadline=None, max_examples=8, suppress_health_check=[HealthCheck.too_slow])


def batch(seed, B, n, d, dtype, *, trailing):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, n + 1, size=B)
    sizes[0] = n
    valid = np.arange(n)[None, :] < sizes[:, None]
    if not trailing:  # padding anywhere, not only at the end
        valid = rng.permuted(valid, axis=1)
    X = rng.standard_normal((B, n, d)) * rng.uniform(0.2, 3.0)
    X[~valid] = rng.uniform(-1e3, 1e3, size=(int((~valid).sum()), d))
    if n > 3:  # duplicated points: exact ties
        X[0, 1] = X[0, 0]
    budgets = np.array([rng.integers(0, max(1, s) + 1) for s in sizes], dtype=np.int64)
    u = stochastic_draws(rng, np.maximum(sizes, 1), np.maximum(budgets, 1), 0.3)
    return X.astype(dtype), valid, budgets, u.astype(dtype)


def composed(X, valid, budgets, metric, kernel, optimizer, u):
    S = nbk.similarity_batched(X, valid, metric, kernel, 2.5)
    i, g = nbk.greedy_batched(S, valid, budgets, optimizer, u)
    w, o = nbk.assign_batched(S, valid, i)
    return i, g, w, o


def assert_bitwise(got, want):
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("metric", METRICS)
@FEW
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 5), n=st.integers(1, 70), d=st.integers(1, 5),
       trailing=st.booleans())
def test_fused_is_bitwise_the_three_kernels(metric, kernel, optimizer, dtype, seed, B, n, d, trailing):
    X, valid, budgets, u = batch(seed, B, n, d, dtype, trailing=trailing)
    uu = u if optimizer == "stochastic" else None
    got = nbk.facility_batched(X, valid, budgets, metric, kernel, 2.5, optimizer, uu)
    assert_bitwise(got, composed(X, valid, budgets, metric, kernel, optimizer, uu))


@pytest.mark.parametrize("n", [520, 700])  # above _MIRROR_MAX_N: full rows instead of a mirrored triangle
def test_fused_large_problems_full_rows(n):
    X, valid, budgets, _ = batch(3, 2, n, 3, np.float64, trailing=True)
    budgets = np.array([40, 25])
    for metric, kernel in (("euclidean", "max-minus"), ("cosine", "exp")):
        got = nbk.facility_batched(X, valid, budgets, metric, kernel, 2.5, "lazy")
        assert_bitwise(got, composed(X, valid, budgets, metric, kernel, "lazy", None))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("metric", METRICS)
def test_fused_large_problems_tiles_and_pruned_maximum(metric, dtype):
    """Above _MIRROR_MAX_N: tiled fill and max-minus's M from the pruned pass, padding anywhere, float32
    too (its M was a second full pass before); and points on a sphere around their mean, where the radius
    bound prunes nothing."""
    X, valid, budgets, _ = batch(5, 2, 600, 4, dtype, trailing=False)
    budgets = np.array([50, 20])
    got = nbk.facility_batched(X, valid, budgets, metric, "max-minus", 2.5, "lazy")
    assert_bitwise(got, composed(X, valid, budgets, metric, "max-minus", "lazy", None))
    rng = np.random.default_rng(7)
    Y = rng.standard_normal((1, 530, 3))
    Y = (Y / np.linalg.norm(Y, axis=2, keepdims=True)).astype(dtype)
    v = np.ones((1, 530), dtype=bool)
    got = nbk.facility_batched(Y, v, np.array([30]), metric, "max-minus", 2.5, "lazy")
    assert_bitwise(got, composed(Y, v, np.array([30]), metric, "max-minus", "lazy", None))


def test_fused_threads_change_nothing(monkeypatch):
    """Problems split over threads (the parallel variant) give the serial results bit for bit."""
    X, valid, budgets, u = batch(11, 9, 40, 4, np.float64, trailing=True)
    serial = nbk.facility_batched(X, valid, budgets, "euclidean", "exp", 2.5, "lazy")
    monkeypatch.setattr(nbk, "_FUSED_PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(nbk, "get_num_threads", lambda: 3)  # three chunks whatever the machine has
    par = nbk.facility_batched(X, valid, budgets, "euclidean", "exp", 2.5, "lazy")
    assert_bitwise(par, serial)


def test_fused_dispatch_and_argument_errors():
    X = np.zeros((2, 3, 4))
    v = np.ones((2, 3), dtype=bool)
    b = np.ones(2, dtype=np.int64)
    assert get_kernel("facility_batched", "numpy", X, v, b) is nbk.facility_batched
    assert get_kernel("facility_batched", "numpy", np.zeros((2, 1000, 193)), v, b) is None  # BLAS wins there
    assert get_kernel("facility_batched", "numpy", np.zeros((2, 3, 193)), v, b) is nbk.facility_batched  # small n
    with pytest.raises(ValueError, match="metric"):
        nbk.facility_batched(X, v, b, "manhattan", "exp", 1.0, "lazy")
    with pytest.raises(ValueError, match="optimizer"):
        nbk.facility_batched(X, v, b, "euclidean", "exp", 1.0, "fast")
    with pytest.raises(ValueError, match="u"):
        nbk.facility_batched(X, v, b, "euclidean", "exp", 1.0, "stochastic", None)
    with pytest.raises(ValueError, match="valid"):
        nbk.facility_batched(X, v[:1], b, "euclidean", "exp", 1.0, "lazy")
    with pytest.raises(ValueError, match="budgets"):
        nbk.facility_batched(X, v, -b, "euclidean", "exp", 1.0, "lazy")
    Xc = X.copy()
    nbk.facility_batched(Xc, v, b, "euclidean", "max-minus", 1.0, "lazy")
    np.testing.assert_array_equal(Xc, X)  # inputs untouched


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fused_compacted_columns(optimizer, dtype):
    """Problems large enough for the greedy to compact its columns (a column re-evaluated after the first
    pick with at most half of it live keeps only its live entries): gains, picks, weights and objectives
    stay bit for bit the three kernels', with duplicated points (exact ties) and padding anywhere."""
    rng = np.random.default_rng(17)
    centres = rng.standard_normal((12, 4)) * 4.0
    X = (centres[rng.integers(0, 12, size=(2, 900))] + rng.standard_normal((2, 900, 4))).astype(dtype)
    X[0, 10:20] = X[0, 0]
    valid = np.ones((2, 900), dtype=bool)
    valid[1, rng.choice(900, size=150, replace=False)] = False
    budgets = np.array([180, 90])
    u = stochastic_draws(rng, valid.sum(axis=1), budgets, 0.2).astype(dtype)
    uu = u if optimizer == "stochastic" else None
    for metric, kernel in (("euclidean", "max-minus"), ("sqeuclidean", "exp"), ("cosine", "max-minus")):
        got = nbk.facility_batched(X, valid, budgets, metric, kernel, 2.5, optimizer, uu)
        assert_bitwise(got, composed(X, valid, budgets, metric, kernel, optimizer, uu))
