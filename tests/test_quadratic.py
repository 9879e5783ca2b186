"""Tests for crestcore/quadratic.py: Hutchinson's diagonal estimator and the piecewise-quadratic loss model.

Self-contained: no conftest fixtures.
"""

from __future__ import annotations

import itertools
import math

import warnings

import numpy as np
import pytest
try:
    import torch
except ImportError:  # the lower-bounds run (tests/conftest.py skips the tests that use it)
    torch = None
from hypothesis import given, settings
from hypothesis import strategies as st

from crestcore import (
    QuadraticConfig, hutchinson_diagonal, quadratic_anchor, quadratic_curvature, quadratic_init, quadratic_predict,
    quadratic_update,
)

SETTINGS = settings(deadline=None, max_examples=30)


def _sym(seed: int, D: int) -> np.ndarray:
    B = np.random.default_rng(seed).normal(size=(D, D))
    return (B + B.T) / 2


def _all_signs(D: int) -> np.ndarray:
    return np.array(list(itertools.product([-1.0, 1.0], repeat=D)))


def _sylvester(k: int) -> np.ndarray:
    H = np.ones((1, 1))
    for _ in range(k):
        H = np.block([[H, H], [H, -H]])
    return H


# --------------------------------------------------------------------------------------------
# Hutchinson
# --------------------------------------------------------------------------------------------
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), D=st.integers(1, 6))
def test_hutchinson_exact_with_all_sign_vectors(seed, D):
    # the mean over all 2^D sign vectors IS the expectation over Rademacher z: exactness here is
    # unbiasedness, for every symmetric matrix
    A = _sym(seed, D)
    est = hutchinson_diagonal(lambda v: A @ v, _all_signs(D))
    np.testing.assert_allclose(est, np.diag(A), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [0, 1, 2, 3])  # D = 1, 2, 4, 8
def test_hutchinson_exact_with_hadamard_rows(k):
    D = 2**k
    A = _sym(100 + k, D)
    est = hutchinson_diagonal(lambda v: A @ v, _sylvester(k))
    np.testing.assert_allclose(est, np.diag(A), rtol=1e-12, atol=1e-12)


def test_hutchinson_statistical_convergence_at_one_over_sqrt_k():
    """With k Rademacher probes, coordinate i's error has standard deviation
    sigma_i / sqrt(k), sigma_i^2 = sum_{j != i} A_ij^2 (z_i z_j are independent signs).
    Fixed seed; tolerance 5 sigma_i / sqrt(k) per coordinate (a false alarm has probability < 1e-5
    per coordinate), and the error must actually shrink as probes grow.
    """
    D = 12
    A = _sym(7, D) + np.diag(np.linspace(-3, 3, D))
    sigma = np.sqrt((A**2).sum(axis=1) - np.diag(A) ** 2)
    rng = np.random.default_rng(12345)
    rms = []
    for k in (16, 256, 4096):
        Z = rng.choice([-1.0, 1.0], size=(k, D))
        est = hutchinson_diagonal(lambda v: A @ v, Z)
        err = est - np.diag(A)
        assert np.all(np.abs(err) <= 5 * sigma / math.sqrt(k)), (k, err, sigma)
        rms.append(float(np.sqrt(np.mean((err / sigma) ** 2))))
    # each 16x more probes: the normalised rms error shrinks (1/sqrt(k) predicts 4x)
    assert rms[2] < rms[1] < rms[0]
    assert rms[2] * math.sqrt(4096) < 3.0  # normalised rms ~ 1 / sqrt(k)


def test_hutchinson_mean_of_many_estimates_is_unbiased():
    # 400 independent 4-probe estimates: their mean is within 4 standard errors of diag(A)
    D = 6
    A = _sym(3, D)
    sigma = np.sqrt((A**2).sum(axis=1) - np.diag(A) ** 2)
    rng = np.random.default_rng(99)
    ests = np.stack([hutchinson_diagonal(lambda v: A @ v, rng.choice([-1.0, 1.0], size=(4, D)))
                     for _ in range(400)])
    se = sigma / math.sqrt(4 * 400)
    assert np.all(np.abs(ests.mean(axis=0) - np.diag(A)) <= 4 * se)


def test_hutchinson_torch_probes_stay_in_torch():
    A = torch.tensor(_sym(5, 4))
    est = hutchinson_diagonal(lambda v: A @ v, torch.tensor(_all_signs(4)))
    assert isinstance(est, torch.Tensor) and est.dtype == torch.float64
    np.testing.assert_allclose(est.numpy(), np.diag(A.numpy()), atol=1e-12)


def test_hutchinson_bad_inputs():
    A = np.eye(3)
    probes = _all_signs(3)
    with pytest.raises(ValueError, match="hvp"):
        hutchinson_diagonal(lambda v: np.ones(4), probes)  # H v of the wrong shape
    with pytest.raises(ValueError, match="probes"):
        hutchinson_diagonal(lambda v: A @ v, np.zeros((0, 3)))  # no probes
    with pytest.raises(ValueError, match="probes"):
        hutchinson_diagonal(lambda v: A @ v, np.ones(3))  # 1-D
    with pytest.raises(TypeError, match="probes"):
        hutchinson_diagonal(lambda v: A @ v, np.ones((2, 3), dtype=np.int64))
    with pytest.raises(TypeError, match="hvp"):
        hutchinson_diagonal(A, probes)  # not callable


# --------------------------------------------------------------------------------------------
# the quadratic model is exact on a quadratic loss
# --------------------------------------------------------------------------------------------
class DiagQuadratic:
    """L(w) = c + g.w + 1/2 w.(a * w): gradient g + a*w, Hessian diag(a)."""

    def __init__(self, seed: int, D: int):
        rng = np.random.default_rng(seed)
        self.c = float(rng.normal())
        self.g = rng.normal(size=D)
        self.a = rng.normal(size=D)  # any signs: the hutchinson variant keeps the sign

    def loss(self, w):
        return self.c + self.g @ w + 0.5 * w @ (self.a * w)

    def grad(self, w):
        return self.g + self.a * w

    def hvp(self, v):
        return self.a * v


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), D=st.integers(1, 6), n_updates=st.integers(1, 12),
       beta1=st.floats(0.0, 0.99), beta2=st.floats(0.0, 0.9999))
def test_hutchinson_model_is_exact_on_a_diagonal_quadratic(seed, D, n_updates, beta1, beta2):
    q = DiagQuadratic(seed, D)
    rng = np.random.default_rng(seed + 1)
    w_a = rng.normal(size=D)
    cfg = QuadraticConfig(beta1=beta1, beta2=beta2)
    zhz = hutchinson_diagonal(q.hvp, _all_signs(D))  # exact diag
    state = quadratic_anchor(quadratic_init(w_a), q.loss(w_a), cfg)
    for _ in range(n_updates):  # the same exact sample each time: bias-corrected EMA == sample
        state = quadratic_update(state, q.grad(w_a), zhz, cfg)
    for _ in range(5):
        delta = rng.normal(scale=2.0, size=D)
        expected = q.loss(w_a + delta)
        assert quadratic_predict(state, delta, cfg) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    np.testing.assert_allclose(quadratic_curvature(state, cfg), q.a, rtol=1e-9, atol=1e-12)


def test_model_exact_after_reanchoring_at_a_new_point():
    q = DiagQuadratic(11, 5)
    cfg = QuadraticConfig()
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=5), rng.normal(size=5)
    s = quadratic_anchor(quadratic_init(w1), q.loss(w1), cfg)
    s = quadratic_update(s, q.grad(w1), q.hvp(np.ones(5)), cfg)
    s = quadratic_anchor(s, q.loss(w2), cfg)  # hutchinson: restart, so w1's gradient is forgotten
    s = quadratic_update(s, q.grad(w2), q.hvp(np.ones(5)), cfg)
    d = rng.normal(size=5)
    assert quadratic_predict(s, d, cfg) == pytest.approx(q.loss(w2 + d), rel=1e-12)


def test_predict_with_torch_vectors():
    q = DiagQuadratic(2, 4)
    w = np.zeros(4)
    s = quadratic_anchor(quadratic_init(torch.tensor(w)), q.loss(w))
    s = quadratic_update(s, torch.tensor(q.grad(w)), torch.tensor(q.a))
    d = np.array([0.5, -1.0, 2.0, 0.1])
    out = quadratic_predict(s, torch.tensor(d))
    assert type(out) is float and out == pytest.approx(q.loss(d), rel=1e-12)
    # review 134: a delta of training parameters (params - anchor, requires_grad) built a graph and torch warned
    p = torch.nn.Parameter(torch.tensor(d))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quadratic_predict(s, p - torch.zeros(4, dtype=torch.float64)) == pytest.approx(q.loss(d), rel=1e-12)


# --------------------------------------------------------------------------------------------
# EMAs
# --------------------------------------------------------------------------------------------
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), beta1=st.floats(0.0, 0.999), beta2=st.floats(0.0, 0.9999))
def test_single_update_gives_exactly_the_sample(seed, beta1, beta2):
    rng = np.random.default_rng(seed)
    g, z = rng.normal(size=4), rng.normal(size=4)
    cfg = QuadraticConfig(beta1=beta1, beta2=beta2)
    s = quadratic_update(quadratic_anchor(quadratic_init(np.zeros(4)), 1.0, cfg), g, z, cfg)
    # F(delta) - L_a = g.delta + 1/2 delta.(h delta): recover g and h from the model itself
    np.testing.assert_allclose(quadratic_curvature(s, cfg), z, rtol=1e-12, atol=1e-15)
    for i in range(4):
        e = np.zeros(4)
        e[i] = 1.0
        f_plus = quadratic_predict(s, e, cfg) - 1.0
        f_minus = quadratic_predict(s, -e, cfg) - 1.0
        assert (f_plus - f_minus) / 2 == pytest.approx(g[i], rel=1e-12, abs=1e-15)
        assert f_plus + f_minus == pytest.approx(z[i], rel=1e-12, abs=1e-15)


def test_two_updates_follow_the_bias_corrected_ema():
    cfg = QuadraticConfig(beta1=0.5, beta2=0.75)
    x1, x2 = np.array([1.0, -2.0]), np.array([3.0, 4.0])
    s = quadratic_anchor(quadratic_init(np.zeros(2)), 0.0, cfg)
    s = quadratic_update(s, x1, x1, cfg)
    s = quadratic_update(s, x2, x2, cfg)
    g = (0.5 * 0.5 * x1 + 0.5 * x2) / (1 - 0.5**2)
    h = (0.75 * 0.25 * x1 + 0.25 * x2) / (1 - 0.75**2)
    np.testing.assert_allclose(quadratic_curvature(s, cfg), h, rtol=1e-14)
    d = np.array([1.0, 0.0])
    assert quadratic_predict(s, d, cfg) == pytest.approx(g[0] + 0.5 * h[0], rel=1e-14)


def test_gradient_only_and_curvature_only_updates_are_independent():
    cfg = QuadraticConfig()
    s = quadratic_anchor(quadratic_init(np.zeros(2)), 2.0, cfg)
    s = quadratic_update(s, grad=np.array([1.0, 1.0]), config=cfg)
    assert (s.n_g, s.n_h) == (1, 0)
    assert quadratic_predict(s, np.array([1.0, 0.0]), cfg) == pytest.approx(3.0)  # no curvature yet
    s = quadratic_update(s, zhz=np.array([4.0, 4.0]), config=cfg)
    assert (s.n_g, s.n_h) == (1, 1)
    assert quadratic_predict(s, np.array([1.0, 0.0]), cfg) == pytest.approx(5.0)


def test_adahessian_curvature_is_rms_plus_eps_and_emas_persist_across_anchors():
    """The release's AdaHessian: EMAs bias-corrected by the samples folded in so far (its step counter,
    kept across anchors): one sample gives g itself and |z * Hz| + eps (before, 0.1 g and 0.0316 |z * Hz|:
    the model's first-order term was a tenth of the gradient's)."""
    cfg = QuadraticConfig(variant="adahessian", beta1=0.9, beta2=0.999, eps=1e-4)
    g1, z1 = np.array([1.0, -2.0, 0.0]), np.array([-3.0, 0.5, 0.0])
    g2, z2 = np.array([0.5, 0.5, 0.5]), np.array([1.0, -1.0, 2.0])
    s = quadratic_anchor(quadratic_init(np.zeros(3)), 1.0, cfg)
    s = quadratic_update(s, g1, z1, cfg)
    # curvature = sqrt(EMA(zhz^2) / (1 - beta2^n)) + eps, always positive even for negative zhz
    np.testing.assert_allclose(quadratic_curvature(s, cfg), np.abs(z1) + 1e-4, rtol=1e-12)
    assert np.all(quadratic_curvature(s, cfg) > 0)
    d = np.array([1.0, 1.0, 1.0])
    expected = 1.0 + g1 @ d + 0.5 * (np.abs(z1) + 1e-4) @ (d * d)
    assert quadratic_predict(s, d, cfg) == pytest.approx(expected, rel=1e-12)
    # a new anchor keeps the EMAs (the release never resets them); only the anchor loss changes
    s2 = quadratic_anchor(s, 7.0, cfg)
    assert s2.anchor_loss == 7.0
    np.testing.assert_array_equal(s2.g_ema, s.g_ema)
    np.testing.assert_array_equal(s2.h_ema, s.h_ema)
    assert (s2.n_g, s2.n_h) == (s.n_g, s.n_h)
    s3 = quadratic_update(s2, g2, z2, cfg)
    np.testing.assert_allclose(s3.g_ema, 0.9 * 0.1 * g1 + 0.1 * g2, rtol=1e-14)
    bc2 = 1 - 0.999**2
    np.testing.assert_allclose(quadratic_curvature(s3, cfg),
                               np.sqrt((0.999 * 0.001 * z1**2 + 0.001 * z2**2) / bc2) + 1e-4, rtol=1e-12)
    expected3 = 7.0 + (0.9 * 0.1 * g1 + 0.1 * g2) / (1 - 0.9**2) @ d
    assert quadratic_predict(s3, d, cfg) == pytest.approx(
        expected3 + 0.5 * quadratic_curvature(s3, cfg) @ (d * d), rel=1e-12)


def test_hutchinson_variant_restarts_emas_at_each_anchor():
    cfg = QuadraticConfig()
    s = quadratic_anchor(quadratic_init(np.zeros(2)), 1.0, cfg)
    s = quadratic_update(s, np.array([5.0, 5.0]), np.array([2.0, 2.0]), cfg)
    s2 = quadratic_anchor(s, 3.0, cfg)
    assert (s2.anchor_loss, s2.n_g, s2.n_h) == (3.0, 0, 0)
    np.testing.assert_array_equal(s2.g_ema, 0.0)
    np.testing.assert_array_equal(s2.h_ema, 0.0)
    s3 = quadratic_update(s2, np.array([1.0, 0.0]), np.array([0.0, 4.0]), cfg)
    assert quadratic_predict(s3, np.array([1.0, 1.0]), cfg) == pytest.approx(3.0 + 1.0 + 2.0, rel=1e-12)


def test_states_are_new_objects_and_inputs_not_mutated():
    cfg = QuadraticConfig()
    s0 = quadratic_anchor(quadratic_init(np.zeros(3)), 1.0, cfg)
    g = np.array([1.0, 2.0, 3.0])
    z = np.array([0.5, 0.5, 0.5])
    for a in (g, z, s0.g_ema, s0.h_ema):
        a.setflags(write=False)
    s1 = quadratic_update(s0, g, z, cfg)
    np.testing.assert_array_equal(s0.g_ema, 0.0)
    np.testing.assert_array_equal(g, [1.0, 2.0, 3.0])
    assert s1 is not s0 and s1.g_ema is not s0.g_ema


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def _fitted(cfg=None):
    cfg = QuadraticConfig() if cfg is None else cfg
    s = quadratic_anchor(quadratic_init(np.zeros(3)), 1.0, cfg)
    return quadratic_update(s, np.ones(3), np.ones(3), cfg)


def test_bad_update_inputs():
    s = _fitted()
    with pytest.raises(ValueError, match="grad"):
        quadratic_update(s, np.array([1.0, np.nan, 0.0]), None)
    with pytest.raises(ValueError, match="zhz"):
        quadratic_update(s, None, np.array([1.0, np.inf, 0.0]))
    with pytest.raises(ValueError, match="grad"):
        quadratic_update(s, np.ones(4), None)
    with pytest.raises(ValueError, match="grad"):
        quadratic_update(s, np.ones((3, 1)), None)
    with pytest.raises(TypeError, match="grad"):
        quadratic_update(s, np.ones(3, dtype=np.int64), None)
    with pytest.raises(TypeError):
        quadratic_update(s, torch.ones(3, dtype=torch.float64), None)  # mixed namespaces


def test_bad_predict_inputs():
    s = _fitted()
    with pytest.raises(ValueError, match="delta"):
        quadratic_predict(s, np.ones(2))
    with pytest.raises(ValueError, match="delta"):
        quadratic_predict(s, np.array([0.0, np.nan, 0.0]))
    unanchored = quadratic_init(np.zeros(3))
    with pytest.raises(ValueError, match="anchor"):
        quadratic_predict(unanchored, np.zeros(3))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_non_finite_delta_named_where_the_model_is_zero(bad, lib):
    # delta's finiteness is checked only once the prediction comes out non-finite: that must hold even
    # where the gradient and the curvature are exactly 0 (0 * inf is NaN, not 0)
    s = quadratic_update(quadratic_anchor(quadratic_init(np.zeros(3)), 1.0),
                         grad=np.array([1.0, 0.0, 2.0]), zhz=np.array([1.0, 0.0, 0.5]))
    delta = np.array([0.1, bad, 0.2])
    if lib == "torch":
        s = s._replace(g_ema=torch.from_numpy(s.g_ema), h_ema=torch.from_numpy(s.h_ema))
        delta = torch.from_numpy(delta)
    with pytest.raises(ValueError, match="delta contains NaN or infinite"):
        quadratic_predict(s, delta)


def test_bad_anchor_and_init():
    with pytest.raises(ValueError, match="loss"):
        quadratic_anchor(quadratic_init(np.zeros(2)), float("nan"))
    with pytest.raises(ValueError, match="params"):
        quadratic_init(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="params"):
        quadratic_init(np.array([0.0, np.inf]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta1=1.0), "beta1"), (dict(beta1=-0.1), "beta1"), (dict(beta2=1.5), "beta2"),
    (dict(beta2=float("nan")), "beta2"), (dict(variant="newton"), "variant"), (dict(eps=-1.0), "eps"),
    (dict(eps=float("nan")), "eps"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuadraticConfig(**kwargs)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_sums_are_accumulated_in_float32(lib, half):
    """100,000 parameters of curvature 1: the norm (316.2) and the prediction (-99,999) are ordinary
    values, though their sums pass float16's largest value (65,504); they used to raise DivergenceError."""
    from crestcore import curvature_norm

    if lib == "numpy":
        if half == "bfloat16":
            pytest.skip("NumPy has no bfloat16")
        arr = lambda v: np.full(100_000, v, dtype=np.float16)  # noqa: E731
    else:
        arr = lambda v: torch.full((100_000,), v, dtype=getattr(torch, half))  # noqa: E731
    state = quadratic_update(quadratic_init(arr(0.0)), zhz=arr(1.0))
    assert curvature_norm(state) == pytest.approx(math.sqrt(100_000), rel=1e-6)
    state = quadratic_update(quadratic_anchor(state, 1.0), grad=arr(1.0))
    assert quadratic_predict(state, arr(-1.0)) == pytest.approx(1.0 - 100_000, rel=1e-6)
    wide = torch.float32 if lib == "torch" else np.dtype(np.float32)
    assert state.g_ema.dtype == wide and state.h_ema.dtype == wide
    # (the averages are kept in float32 for half-precision parameters: see the next test)


@pytest.mark.parametrize("lib,half,k", [("torch", "bfloat16", 300), ("torch", "float16", 3000),
                                         ("numpy", "float16", 3000)])
def test_hutchinson_diagonal_sums_half_precision_probes_in_float32(lib, half, k):
    """Regression (review 60): the probes' terms were summed in their own half precision, where a bfloat16
    sum stops growing at 256 (a diagonal of exactly 1 came back 0.85 from 300 probes) and a float16 one at
    2048 (0.68 from 3000); the estimate keeps the probes' dtype, its sum is float32."""
    if lib == "numpy":
        probes = np.ones((k, 3), dtype=np.float16)
    else:
        probes = torch.ones((k, 3), dtype=getattr(torch, half))
    est = hutchinson_diagonal(lambda v: v, probes)
    assert est.dtype == probes.dtype
    assert [float(v) for v in est] == [1.0, 1.0, 1.0]


def test_hutchinson_diagonal_keeps_a_wider_hvps_dtype():
    """Regression (review 64): the half-precision fix cast every estimate to the probes' dtype, so float32
    probes with a float64 hvp came back float32 (float64 before), and float16 probes with a float32 hvp of 1e5
    raised DivergenceError; the estimate is in the probes' and the products' promoted dtype."""
    est = hutchinson_diagonal(lambda v: v.astype(np.float64) * 3.0, np.ones((4, 2), dtype=np.float32))
    assert est.dtype == np.float64 and est.tolist() == [3.0, 3.0]
    est = hutchinson_diagonal(lambda v: v.to(torch.float32) * 1e5, torch.ones((4, 2), dtype=torch.float16))
    assert est.dtype == torch.float32 and est.tolist() == [1e5, 1e5]


def test_hutchinson_diagonal_in_float16_reports_no_divergence_for_a_mean_that_fits():
    """Regression (review 60): ten float16 terms of 1e4 overflow float16 when summed in it (DivergenceError
    'the curvature is not finite'), while their mean 1e4 is a float16 value."""
    Hd = np.diag([1e4, 2.0, 3.0]).astype(np.float16)
    est = hutchinson_diagonal(lambda v: Hd @ v, np.ones((10, 3), dtype=np.float16))
    assert est.dtype == np.float16
    np.testing.assert_array_equal(est, np.array([1e4, 2.0, 3.0], dtype=np.float16))


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_averages_do_not_drift(half):
    """Regression (review 38): the averages were kept in the parameters' half precision, where
    0.999 * h rounds back to h: the release's curvature average (adahessian, kept across anchors) of a
    constant sample 1.0 read 1.14 after 300 selections and 0.73 after 3000 in bfloat16. They are kept in
    float32 now, and a state dict restores them so."""
    cfg = QuadraticConfig(variant="adahessian")
    dt = getattr(torch, half)
    st = quadratic_init(torch.zeros(4, dtype=dt))
    for _ in range(300):
        st = quadratic_anchor(st, 1.0, cfg)
        st = quadratic_update(st, torch.zeros(4, dtype=dt), torch.ones(4, dtype=dt), cfg)
    ref = quadratic_init(torch.zeros(4, dtype=torch.float32))
    for _ in range(300):
        ref = quadratic_anchor(ref, 1.0, cfg)
        ref = quadratic_update(ref, torch.zeros(4), torch.ones(4), cfg)
    assert st.h_ema.dtype == torch.float32
    torch.testing.assert_close(quadratic_curvature(st, cfg), quadratic_curvature(ref, cfg))


def test_an_exploding_curvature_is_reported_as_divergence():
    """Finite curvature samples whose estimate overflows (AdaHessian's squares of 1e20 past float32's range) are
    divergence, named as such, with the dtype. Samples of 1e30 in float32, whose squares overflow but whose norm
    (2e30) does not, were refused too, because the norm squared in the working dtype; the norm is taken of h
    scaled by a power of two now (review 155)."""
    from crestcore._validation import DivergenceError
    from crestcore.quadratic import QuadraticConfig, curvature_norm

    state = quadratic_init(np.zeros(4, dtype=np.float32))
    with pytest.raises(DivergenceError, match=r"curvature estimate .* overflows float32"):
        quadratic_update(state, zhz=np.full(4, 1e20, dtype=np.float32), config=QuadraticConfig(variant="adahessian"))
    big = quadratic_update(state, zhz=np.full(4, 1e30, dtype=np.float32))
    assert curvature_norm(big) == pytest.approx(2 * float(np.float32(1e30)), rel=1e-6)


def test_samples_of_another_dtype_are_refused_and_a_tensor_loss_is_read_without_warning():
    """A float64 gradient for a float32 model would promote the model's vectors silently: refused,
    naming the argument. A loss tensor that requires grad is read detached (no torch warning)."""
    import warnings

    state = quadratic_init(np.zeros(3, dtype=np.float32))
    for kw in (dict(grad=np.zeros(3)), dict(zhz=np.ones(3))):
        with pytest.raises(TypeError, match=f"{next(iter(kw))} has dtype float64 but the model's vectors are float32"):
            quadratic_update(state, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = quadratic_anchor(state, torch.tensor(2.0, requires_grad=True) * 1.5)
    assert state.anchor_loss == 3.0


def test_hutchinson_diagonal_takes_array_api_strict_probes():
    import array_api_strict as xs

    from crestcore import hutchinson_diagonal

    H = np.diag([2.0, 3.0, 4.0, 5.0])
    probes = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=float)
    Hs = xs.asarray(H)
    out = hutchinson_diagonal(lambda v: xs.matmul(Hs, v), xs.asarray(probes))
    assert isinstance(out, type(Hs))
    np.testing.assert_allclose(np.asarray(out), [2.0, 3.0, 4.0, 5.0])


def test_autograd_inputs_leave_no_graph_in_the_model_or_the_estimate():
    """Review 24: quadratic_update kept the autograd graph of a grad/zhz that required grad inside the
    state (after 50 updates a chain of 101 nodes, growing with every update of a training loop), and
    hutchinson_diagonal returned a graph-carrying estimate from an autograd hvp. Both detach now, with the
    same values, and warn about nothing."""
    import warnings

    import crestcore

    w = torch.randn(100, dtype=torch.float64, requires_grad=True)
    st_ = crestcore.quadratic_anchor(crestcore.quadratic_init(torch.zeros(100, dtype=torch.float64)), 1.0)
    ref = crestcore.quadratic_anchor(crestcore.quadratic_init(torch.zeros(100, dtype=torch.float64)), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(5):
            st_ = crestcore.quadratic_update(st_, grad=w * (i + 1), zhz=w * w)
            ref = crestcore.quadratic_update(ref, grad=(w * (i + 1)).detach(), zhz=(w * w).detach())
        assert not st_.g_ema.requires_grad and not st_.h_ema.requires_grad
        assert st_.g_ema.grad_fn is None and st_.h_ema.grad_fn is None
        torch.testing.assert_close(st_.g_ema, ref.g_ema, rtol=0, atol=0)
        torch.testing.assert_close(st_.h_ema, ref.h_ema, rtol=0, atol=0)
        H = torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64)).requires_grad_(True)
        probes = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]],
                              dtype=torch.float64, requires_grad=True)
        est = crestcore.hutchinson_diagonal(lambda v: H @ v, probes)
    assert not est.requires_grad
    torch.testing.assert_close(est, torch.arange(1.0, 5.0, dtype=torch.float64))


def test_a_state_of_another_type_is_refused_by_name():
    """Review 134: a swapped argument (an array where the state goes) failed with an AttributeError about g_ema."""
    for f in (lambda st: quadratic_update(st, np.zeros(3)), lambda st: quadratic_predict(st, np.zeros(3)),
              lambda st: quadratic_anchor(st, 1.0), lambda st: quadratic_curvature(st)):
        with pytest.raises(TypeError, match="state must be a QuadraticState"):
            f(np.zeros(3))
