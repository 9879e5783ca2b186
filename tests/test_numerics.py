"""The numerics policy (docs/selection.md): compute in >= float32, exact power-of-two rescaling of data
whose magnitude would overflow or underflow, results in the input's dtype, ties to the lowest index.

Data for the invariance properties are small integers, exactly representable in every dtype tested
(bfloat16 included): scaling them by 2^k is exact, so the picks must be *identical*, not close.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import crestcore
from crestcore.baselines import gradmatch, nonneg_ridge
from crestcore.similarity import compute_dtype, pow2_scale, rescale_exponent

torch = pytest.importorskip("torch")

# dtype name -> (k range keeping integer data in [-8, 8] and every result inside the dtype)
K_RANGE = {"float16": (-10, 3), "bfloat16": (-110, 100), "float32": (-110, 100), "float64": (-1000, 1000)}
NP_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}


def _int_data(seed: int, n: int, d: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-8, 9, size=(n, d)).astype(np.float64)


def _make(lib: str, dt: str, A: np.ndarray):
    if lib == "numpy":
        return A.astype(NP_DTYPES[dt])
    return torch.from_numpy(A).to(TORCH_DTYPES[dt])


def _np(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return x.detach().float().numpy() if x.dtype == torch.bfloat16 else x.detach().numpy()


LIB_DTYPES = [("numpy", d) for d in NP_DTYPES] + [("torch", d) for d in TORCH_DTYPES]


@pytest.mark.parametrize("lib,dt", LIB_DTYPES)
@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), data=st.data(),
       metric=st.sampled_from(("euclidean", "sqeuclidean", "cosine")),
       optimizer=st.sampled_from(("naive", "lazy")), labelled=st.booleans())
def test_picks_invariant_under_power_of_two_scaling(lib, dt, seed, data, metric, optimizer, labelled):
    lo, hi = K_RANGE[dt]
    if metric == "sqeuclidean":  # distances grow like 4^k: keep them and the objective in range
        lo, hi = lo // 2, hi // 2
        if dt == "float16":  # 30 points' first gain, up to 30 x 3 x 16^2 x 4^k, fits float16 only for k <= 0
            hi = 0
    k = data.draw(st.integers(lo, hi), label="k")
    A = _int_data(seed, 30, 3)
    labels = np.random.default_rng(seed).integers(0, 3, size=30) if labelled else None
    lab = None if labels is None else (labels if lib == "numpy" else torch.from_numpy(labels))
    base = crestcore.facility_location(_make(lib, dt, A), 6, labels=lab, metric=metric, optimizer=optimizer)
    scaled = crestcore.facility_location(_make(lib, dt, A * 2.0**k), 6, labels=lab, metric=metric,
                                         optimizer=optimizer)
    assert np.array_equal(_np(base.indices), _np(scaled.indices))
    assert np.array_equal(_np(base.weights), _np(scaled.weights))
    assert scaled.weights.dtype == base.weights.dtype == _make(lib, dt, A).dtype
    assert scaled.objective.dtype == _make(lib, dt, A).dtype
    if dt in ("float32", "float64") and metric != "cosine":
        p = 2 if metric == "sqeuclidean" else 1
        # gains are sums of exactly scaled similarities: exactly scaled too
        assert np.array_equal(_np(scaled.gains), _np(base.gains) * 2.0 ** (p * k))


@pytest.mark.parametrize("dt", ["float16", "bfloat16", "float32", "float64"])
@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), data=st.data())
def test_minibatch_coresets_invariant_under_scaling(dt, seed, data):
    lo, hi = K_RANGE[dt]
    k = data.draw(st.integers(lo, hi), label="k")
    A = _int_data(seed, 60, 3)
    y = torch.from_numpy(np.arange(60) % 3)
    base = crestcore.minibatch_coresets(_make("torch", dt, A), y, m=4, r=20, P=2, rng=seed)
    scaled = crestcore.minibatch_coresets(_make("torch", dt, A * 2.0**k), y, m=4, r=20, P=2, rng=seed)
    assert torch.equal(base.indices, scaled.indices)
    assert torch.equal(base.weights, scaled.weights)
    assert scaled.objective.dtype == TORCH_DTYPES[dt]


@settings(max_examples=15)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(-50, 50),
       metric=st.sampled_from(("euclidean", "sqeuclidean", "cosine")), labelled=st.booleans())
def test_torch_and_numpy_agree_on_float32(seed, k, metric, labelled):
    A = (_int_data(seed, 40, 4) * 2.0**k).astype(np.float32)
    labels = np.random.default_rng(seed).integers(0, 2, size=40) if labelled else None
    a = crestcore.facility_location(A, 7, labels=labels, metric=metric)
    t = crestcore.facility_location(torch.from_numpy(A), 7, metric=metric,
                                    labels=None if labels is None else torch.from_numpy(labels))
    assert np.array_equal(a.indices, t.indices.numpy())
    assert np.array_equal(a.weights, t.weights.numpy())


def test_float16_of_ordinary_size_is_computed_in_float32():
    g = torch.Generator().manual_seed(0)
    X = torch.rand(50, 4, generator=g).mul(255)
    half = crestcore.facility_location(X.half(), 5)
    ref = crestcore.facility_location(X.half().float(), 5)
    assert torch.equal(half.indices, ref.indices)
    assert half.weights.dtype == torch.float16 and torch.isfinite(half.objective)
    assert torch.equal(half.weights, ref.weights.half())
    assert float(half.weights.min()) > 0  # not one pick carrying all 50


@pytest.mark.parametrize("factor", [1e200, 1e-200, 1e300, 2.0**-1000])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_extreme_float64_scales_pick_as_unit_scale(factor, backend):
    A = np.random.default_rng(0).normal(size=(50, 4))
    base = crestcore.facility_location(A, 5, backend=backend)
    s = crestcore.facility_location(A * factor, 5, backend=backend)
    assert np.array_equal(base.indices, s.indices)
    assert np.array_equal(base.weights, s.weights)
    assert np.isfinite(s.objective) and s.objective > 0


@pytest.mark.parametrize("factor", [1e20, 1e-20, 1e35])
def test_float32_extreme_scales_torch_matches_numpy(factor):
    A = (np.random.default_rng(1).normal(size=(50, 4)) * factor).astype(np.float32)
    a = crestcore.facility_location(A, 5)
    t = crestcore.facility_location(torch.from_numpy(A), 5)
    b = crestcore.facility_location(A.astype(np.float64), 5)
    assert np.array_equal(a.indices, t.indices.numpy())
    assert np.array_equal(a.indices, b.indices)
    assert np.isfinite(a.objective) and torch.isfinite(t.objective)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("factor", [1.0, 1e200, 1e-200])
def test_duplicates_tie_to_lowest_index_at_every_scale(backend, factor):
    A = np.repeat(np.random.default_rng(2).normal(size=(5, 3)), 4, axis=0) * factor  # each row 4 times
    s = crestcore.facility_location(A, 5, backend=backend)
    # every pick is the first copy of its row: rows 4i .. 4i+3 are identical
    assert set((np.asarray(s.indices) % 4).tolist()) == {0}


def test_exp_kernel_rescaling_keeps_similarities():
    A = np.random.default_rng(3).normal(size=(40, 3))
    base = crestcore.facility_location(A, 5, kernel="exp", scale=2.0)
    s = crestcore.facility_location(A * 2.0**600, 5, kernel="exp", scale=2.0 * 2.0**600)
    assert np.array_equal(base.indices, s.indices)
    assert np.allclose(base.objective, s.objective, rtol=1e-12)


def test_exp_kernel_scale_beyond_every_float_after_rescaling_is_refused():
    """Tiny data (2^-935) with squared distances: the rescaled scale 3 * 2^1870 overflows even a Python
    float; refused with the ValueError naming scale, not an OverflowError (hypothesis found it)."""
    X = np.zeros((12, 3))
    X[0, 0] = 3.13926753e-282
    with pytest.raises(ValueError, match="scale"):
        crestcore.facility_location(X, 4, metric="sqeuclidean", kernel="exp")


def test_exp_kernel_scale_out_of_range_is_refused():
    A = np.random.default_rng(3).normal(size=(40, 3)) * 1e300
    with pytest.raises(ValueError, match="scale"):
        crestcore.facility_location(A, 5, kernel="exp", metric="sqeuclidean")


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_an_exp_scale_outside_the_dtype_is_refused_on_every_path_for_data_not_rescaled(metric):
    """Review 177: the scale's range was checked only for data the policy rescaled; a float32 scale of 1e-50 on
    data of magnitude 1 became 0 in the reference and torch kernels, whose NaN similarities were blamed on the
    features, while the Numba path (float64) returned the lowest indices. Every path refuses it by name now."""
    X = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    arrays = [(X, {}), (X, {"backend": "reference"})]
    if torch is not None:
        arrays.append((torch.from_numpy(X), {}))
    for A, kw in arrays:
        for scale in (1e-39, 1e-50, 1e39):
            with pytest.raises(ValueError, match=rf"scale={re.escape(repr(scale))} is out of range in (torch\.)?float32"):
                crestcore.facility_location(A, 4, metric=metric, kernel="exp", scale=scale, **kw)
        with pytest.warns(RuntimeWarning, match="every pick gained exactly 1"):  # in range: computed, and said
            crestcore.facility_location(A, 4, metric=metric, kernel="exp", scale=1e-30, **kw)
    with pytest.raises(ValueError, match="scale=1e-50 is out of range"):
        crestcore.minibatch_coresets(X, None, m=2, r=10, P=1, rng=0, kernel="exp", scale=1e-50)
    with pytest.raises(ValueError, match=r"out of range in float32: .* every pair in float32;"):  # (not a type's repr)
        crestcore.facility_location(X.astype(np.float16), 4, kernel="exp", scale=1e-39)


def test_extended_precision_is_refused_as_the_dtype_it_is():
    """Review 177: np.longdouble (float128 on x86-64) was accepted, and its finite values beyond float64's range
    refused as "NaN or infinite"; it is refused with the dtype message, which never listed it."""
    if np.dtype(np.longdouble).itemsize <= 8:
        pytest.skip("long double is float64 on this platform")
    X = np.random.default_rng(31).normal(size=(20, 3)).astype(np.longdouble)
    for A in (X, X * np.longdouble("1e400")):
        with pytest.raises(TypeError, match=r"X must have a real floating dtype \(float16, bfloat16, float32 or "
                                            r"float64\), got float128"):
            crestcore.facility_location(A, 5)
    with pytest.raises(TypeError, match="features must have a real floating dtype"):
        crestcore.minibatch_coresets(X, None, m=2, r=10, P=1, rng=0)


def test_objective_that_overflows_the_dtype_is_refused():
    A = np.random.default_rng(4).normal(size=(400, 3)).astype(np.float16) * np.float16(60000.0 / 4)
    with pytest.raises(ValueError, match="objective|gains"):
        crestcore.facility_location(A, 3)


def test_pairwise_distances_policy():
    A = np.random.default_rng(5).normal(size=(6, 3))
    D = crestcore.pairwise_distances(A)
    D_big = crestcore.pairwise_distances(A * 2.0**700)
    assert np.array_equal(D_big, D * 2.0**700)
    h = crestcore.pairwise_distances(torch.from_numpy(A * 200).half())
    assert h.dtype == torch.float16 and torch.isfinite(h).all()
    assert torch.equal(h, crestcore.pairwise_distances(torch.from_numpy(A * 200).half().float()).half())


def test_rescale_exponent_and_pow2_scale():
    assert rescale_exponent(np, np.ones((2, 2))) == 0
    assert rescale_exponent(np, np.zeros((2, 2))) == 0
    assert rescale_exponent(np, np.full((2, 2), 2.0**300)) == 301
    assert rescale_exponent(np, np.full((2, 2), np.float32(2.0**40))) == 41
    assert rescale_exponent(np, np.full((2, 2), np.float32(2.0**20))) == 0
    x = np.array([3.0, -5.0])
    assert np.array_equal(pow2_scale(pow2_scale(x, -1070), 1070), x)  # 2^-1070 alone is subnormal
    assert compute_dtype(np, np.float16) == np.float32
    assert compute_dtype(np, np.float64) == np.float64


@pytest.mark.parametrize("factor", [2.0**400, 2.0**-400])
def test_gradmatch_extreme_scales(factor):
    A = np.random.default_rng(0).normal(size=(50, 4))
    base = gradmatch(A, 5)
    s = gradmatch(A * factor, 5, lam=0.5 * factor * factor)
    assert np.array_equal(base.indices, s.indices)
    assert np.allclose(base.weights, s.weights, rtol=1e-12)
    assert np.isclose(s.objective / factor**2, base.objective, rtol=1e-12)


def test_gradmatch_1e200_is_not_silently_empty():
    A = np.random.default_rng(0).normal(size=(50, 4)) * 1e200
    with pytest.raises(ValueError, match="overflow"):  # |g|^2 ~ 1e400: not representable in float64
        gradmatch(A, 5)


@pytest.mark.parametrize("power", [0, 540, 700, -560, -660])
@pytest.mark.parametrize("positive", [True, False])
def test_nonneg_ridge_weights_do_not_depend_on_the_data_scale(power, positive):
    """Atoms and target scaled by 2^power (lam by its square) give the same weights: at 2^540 (1e162) the
    Gram products overflowed float64 and the weights came back [0, 0] (positive=False: LinAlgError), at
    2^-560 they underflowed to the same zeros (review 122)."""
    rng = np.random.default_rng(1)
    atoms, target = rng.normal(size=(4, 6)), rng.normal(size=6)
    target = target + 2.0 * atoms[0] + 0.5 * atoms[2]
    for lam in ((0.0, 0.3) if abs(2 * power) < 1000 else (0.0,)):  # lam * 2^(2 power) must be a float64
        base = nonneg_ridge(atoms, target, lam=lam, positive=positive)
        assert np.any(base > 0)
        got = nonneg_ridge(np.ldexp(atoms, power), np.ldexp(target, power), lam=math.ldexp(lam, 2 * power),
                           positive=positive)
        np.testing.assert_allclose(got, base, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="lam=.*beyond float64 relative to the squared atoms"):
        nonneg_ridge(np.ldexp(atoms, -600), np.ldexp(target, -600), lam=1e300)
    # the target alone scaled: the weights scale with it (review 126: one power of two for atoms and target
    # lost a target 1e150 times the atoms, all-zero weights at 1e200)
    base = nonneg_ridge(atoms, target, positive=positive)
    got = nonneg_ridge(atoms, np.ldexp(target, power), positive=positive)
    np.testing.assert_allclose(got, np.ldexp(base, power), rtol=1e-12, atol=0)


def test_gradmatch_half_precision_computes_in_float32():
    A = np.random.default_rng(0).normal(size=(50, 4))
    h = gradmatch(torch.from_numpy(A).half(), 5)
    f = gradmatch(torch.from_numpy(A).half().float(), 5)
    assert torch.equal(h.indices, f.indices) and h.weights.dtype == torch.float16


finite64 = st.floats(allow_nan=False, allow_infinity=False, width=64)
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=40)
@given(X=st.one_of(hnp.arrays(np.float64, (12, 3), elements=finite64),
                   hnp.arrays(np.float32, (12, 3), elements=finite32),
                   hnp.arrays(np.float16, (12, 3), elements=st.floats(allow_nan=False, allow_infinity=False,
                                                                      width=16))),
       metric=st.sampled_from(("euclidean", "sqeuclidean", "cosine")),
       kernel=st.sampled_from(("max-minus", "exp")), backend=st.sampled_from(("auto", "reference")))
def test_no_silent_nan(X, metric, kernel, backend):
    """Any finite input gives finite results or raises a ValueError."""
    try:
        s = crestcore.facility_location(X, 4, metric=metric, kernel=kernel, backend=backend)
    except ValueError:
        return
    for v in (s.weights, s.gains, s.objective):
        assert np.all(np.isfinite(v))
    assert s.weights.sum() == 12


@settings(max_examples=25)
@given(X=hnp.arrays(np.float64, (30, 3), elements=finite64), seed=st.integers(0, 2**16))
def test_no_silent_nan_minibatch(X, seed):
    try:
        c = crestcore.minibatch_coresets(X, np.arange(30) % 2, m=3, r=10, P=2, rng=seed)
    except ValueError:
        return
    for v in (c.weights, c.gains, c.objective):
        assert np.all(np.isfinite(v))


# --------------------------------------------------------------------------------------------------
# half-precision models (issue 15 item 2, the parts in the core)
# --------------------------------------------------------------------------------------------------
def test_to_numpy_bfloat16_is_exact_float32():
    from crestcore._compat import to_numpy

    t = torch.tensor([1.5, -3.0, 2.0**-100, 3.0e38], dtype=torch.bfloat16)
    a = to_numpy(t)
    assert a.dtype == np.float32 and np.array_equal(a, t.float().numpy())


def _train_loader(dt, autocast=False):
    from torch import nn
    from torch.utils.data import TensorDataset

    from crestcore.adapters.torch import CrestLoader

    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(80, 3, generator=g).to(dt), torch.arange(80) % 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).to(dt)
    loader = CrestLoader(model, ds, config=crestcore.CrestConfig(m=8), budget=0.5, epochs=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for x, y, w in loader.iter_run():
            loss = (torch.nn.functional.cross_entropy(model(x).float(), y, reduction="none") * w).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return loader


@pytest.mark.parametrize("dt", ["bfloat16", "float16"])
def test_half_precision_model_trains_with_crest_loader(dt):
    torch.set_num_threads(1)
    loader = _train_loader(TORCH_DTYPES[dt])
    assert loader.position == loader.total_steps == 10
    assert all(math.isfinite(c["rho"]) for c in loader.stats["checks"])


def test_crest_loader_under_cpu_bfloat16_autocast():
    torch.set_num_threads(1)
    loader = _train_loader(torch.float32, autocast=True)
    assert loader.position == loader.total_steps == 10


def test_facility_objective_and_gains_half_and_huge():
    from crestcore import facility_objective, marginal_gains

    S = np.abs(np.random.default_rng(6).normal(size=(300, 300))) * 300  # float16 sums exceed 65504
    sel = np.array([0, 5])
    ref = facility_objective(S.astype(np.float16).astype(np.float32), sel)
    with pytest.raises(ValueError, match="objective"):  # the true objective is beyond float16
        facility_objective(S.astype(np.float16), sel)
    small = S[:20, :20].astype(np.float16)
    assert facility_objective(small, sel) == facility_objective(small.astype(np.float32), sel).astype(np.float16)
    assert np.isfinite(ref)
    big = S[:20, :20] * 1e300  # float64 sums overflow unless rescaled
    assert facility_objective(big, sel) == pytest.approx(facility_objective(S[:20, :20], sel) * 1e300, rel=1e-12)
    g = marginal_gains(big, sel)
    assert np.all(np.isfinite(g))
    assert np.allclose(g / 1e300, marginal_gains(S[:20, :20], sel), rtol=1e-12)


def test_glister_half_precision_computes_in_float32():
    from crestcore.baselines import glister

    rng = np.random.default_rng(7)
    G = rng.normal(size=(30, 3))
    V = rng.normal(size=(10, 3))
    yv = np.arange(10) % 3
    h = glister(torch.from_numpy(G).half(), torch.from_numpy(V).half(), torch.from_numpy(yv), 4)
    f = glister(torch.from_numpy(G).half().float(), torch.from_numpy(V).half().float(), torch.from_numpy(yv), 4)
    assert torch.equal(h.indices, f.indices) and h.gains.dtype == torch.float16


def test_quadratic_predict_overflow_is_divergence():
    q = crestcore.quadratic_anchor(crestcore.quadratic_init(np.zeros(3)), 1.0)
    q = crestcore.quadratic_update(q, np.full(3, 1e200), np.full(3, 1e100))
    with pytest.raises(FloatingPointError, match="prediction"):
        crestcore.quadratic_predict(q, np.full(3, 1e200))


@settings(max_examples=25)
@given(X=hnp.arrays(np.float64, (8, 3), elements=finite64),
       metric=st.sampled_from(("euclidean", "sqeuclidean", "cosine")))
def test_no_silent_nan_pairwise_distances(X, metric):
    try:
        D = crestcore.pairwise_distances(X, metric=metric)
    except ValueError:
        return
    assert np.all(np.isfinite(D)) and np.all(D >= 0)


@settings(max_examples=25)
@given(X=hnp.arrays(np.float64, (10, 3), elements=finite64))
def test_no_silent_nan_gradmatch(X):
    try:
        s = gradmatch(X, 3)
    except ValueError:
        return
    for v in (s.weights, s.gains, s.objective):
        assert np.all(np.isfinite(v))


def test_anchor_loss_inf_is_divergence():
    with pytest.raises(FloatingPointError, match="loss"):
        crestcore.quadratic_anchor(crestcore.quadratic_init(np.zeros(2)), float("inf"))


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("factor", [2.0**700, 2.0**-700])
def test_matrix_free_path_follows_the_policy(lib, factor):
    A = np.random.default_rng(8).normal(size=(60, 3))
    mk = (lambda a: a) if lib == "numpy" else torch.from_numpy
    base = crestcore.facility_location(mk(A), 5, max_dense_bytes=2000)  # 60^2 x 8 > 2000: tiled path
    s = crestcore.facility_location(mk(A * factor), 5, max_dense_bytes=2000)
    assert np.array_equal(_np(base.indices), _np(s.indices))
    assert np.array_equal(_np(base.weights), _np(s.weights))
    assert np.isfinite(float(s.objective)) and float(s.objective) > 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cosine_does_not_depend_on_a_rows_scale_on_any_path(dtype):
    """A cosine is the same for a row and for that row times any positive factor: rows scaled far below or
    above the rest (their squared norms underflow or overflow the dtype) must give the selection of the
    unscaled data, on the dense, the sparse and the per-class paths of every backend. Before, the
    reference (also torch's path) treated a row of magnitude 1e-30 in float32 as a zero row."""
    import crestcore

    rng = np.random.default_rng(4)
    X = rng.standard_normal((48, 5)).astype(dtype)
    y = np.arange(48) % 3
    tiny, huge = (1e-30, 1e30) if dtype == np.float32 else (1e-200, 1e200)
    Xs = X.copy()
    Xs[[3, 17]] *= dtype(tiny)
    Xs[[8, 30]] *= dtype(huge)
    torch = pytest.importorskip("torch")
    cases = [("auto", X, Xs), ("reference", X, Xs), ("auto", torch.from_numpy(X), torch.from_numpy(Xs))]
    _same_cosine_selections(cases, y, 9, ({}, dict(neighbors=10)))
    D = crestcore.pairwise_distances(Xs, metric="cosine")
    np.testing.assert_allclose(D, crestcore.pairwise_distances(X, metric="cosine"), atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cosine_of_rows_just_inside_the_unscaled_range(dtype):
    """Review 75: rows whose largest magnitude is just under the bound above which a cosine rescales them
    (2^32 in float32, 2^256 in float64) are left as they are, and the product of two of their squared norms
    overflows. The Numba kernel's denominator sqrt(|x|^2 |y|^2) (and the sparse path's, on every backend)
    then was inf: every cosine 0, every distance 1, and the selection the lowest indices, silently."""
    top = 2.0 ** (31 if dtype == np.float32 else 255)
    X = np.random.default_rng(5).standard_normal((40, 16)).astype(dtype)
    X /= np.abs(X).max(axis=1, keepdims=True)  # every row's largest magnitude 1, then 2^31 / 2^255
    Xs = X * dtype(top)
    y = np.arange(40) % 2
    torch = pytest.importorskip("torch")
    cases = [("auto", X, Xs), ("reference", X, Xs), ("auto", torch.from_numpy(X), torch.from_numpy(Xs))]
    if dtype == np.float64:
        cases.append(("numba", X, Xs))
    _same_cosine_selections(cases, y, 6, ({}, dict(neighbors=39), dict(neighbors=8)))
    _same_cosine_selections([("auto", X, Xs)], y, 6, (dict(max_dense_bytes=1),))


def _same_cosine_selections(cases, y, k, options):
    """For each (backend, A, As): facility_location (with each of ``options``) and minibatch_coresets pick the
    same rows of A and of As (A's rows rescaled), with the same weights and objective."""
    import crestcore
    import torch

    for backend, A, As in cases:
        for kw in options:
            a = crestcore.facility_location(A, k, metric="cosine", backend=backend, **kw)
            b = crestcore.facility_location(As, k, metric="cosine", backend=backend, **kw)
            np.testing.assert_array_equal(np.asarray(b.indices), np.asarray(a.indices), err_msg=f"{backend} {kw}")
            np.testing.assert_array_equal(np.asarray(b.weights), np.asarray(a.weights))
            np.testing.assert_allclose(float(b.objective), float(a.objective), rtol=1e-5)
        lab = torch.from_numpy(y) if isinstance(A, torch.Tensor) else y
        a = crestcore.minibatch_coresets(A, lab, m=k, r=A.shape[0], P=1, rng=0, metric="cosine", backend=backend)
        b = crestcore.minibatch_coresets(As, lab, m=k, r=A.shape[0], P=1, rng=0, metric="cosine", backend=backend)
        np.testing.assert_array_equal(np.asarray(b.indices), np.asarray(a.indices), err_msg=backend)


@pytest.mark.parametrize("case", ["torch-dense", "torch-matrix-free", "reference", "torch-knn", "reference-knn",
                                  "score-orders", "torch-minibatch"])
def test_a_cloud_far_from_the_origin_selects_as_the_same_cloud_at_the_origin(case):
    """Euclidean selection is translation invariant; the Gram-form paths (torch, CuPy, the reference, the
    exact kNN search, score_orders) translate every problem next to the origin first, exactly (the
    contract's exact_shift), so a float32 cloud 100 +- 0.01 selects as the same cloud at the origin.
    (Computed in place, |a|^2 + |b|^2 - 2 a.b cancelled every distance in the cloud down to the
    zero-distance snap: the picks were the lowest indices, one pick weighed 755 of 2000.)"""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    far = (100.0 + 0.01 * rng.normal(size=(400, 6))).astype(np.float32)
    base = far - np.float32(100.0)  # exact (Sterbenz): one and the same cloud, at the origin
    assert ((base + np.float32(100.0)) == far).all()

    def run(X):
        if case == "score-orders":
            return crestcore.score_orders(X, X, [[5, 17, 230, 99]], bound=1.0)[0][1]
        if case == "torch-minibatch":
            c = crestcore.minibatch_coresets(torch.from_numpy(X), torch.from_numpy(np.arange(400) % 2), m=8,
                                             r=100, P=2, rng=0)
            return np.concatenate([c.indices.numpy().ravel(), c.weights.numpy().ravel()])
        kw = {"torch-matrix-free": dict(max_dense_bytes=1000), "reference": dict(backend="reference"),
              "torch-knn": dict(neighbors=8), "reference-knn": dict(neighbors=8, backend="reference")}.get(case, {})
        data = X if case.startswith("reference") else torch.from_numpy(X)
        sel = crestcore.facility_location(data, 12, **kw)
        return np.concatenate([np.asarray(sel.indices, dtype=np.float64), np.asarray(sel.weights, dtype=np.float64)])

    near, away = run(base), run(far)
    np.testing.assert_array_equal(away, near)
    if case != "score-orders" and case != "torch-minibatch":
        assert np.asarray(away[12:]).max() < 150, "no pick stands for most of the cloud"


@pytest.mark.parametrize("case", ["torch", "torch-matrix-free", "reference", "torch-knn", "numpy-knn",
                                  "torch-minibatch", "pairwise"])
@pytest.mark.parametrize("constant", [1e100, 0.75])
def test_a_constant_coordinate_changes_no_distance(case, constant):
    """A coordinate equal on every row adds nothing to any distance; on the Gram-form paths it must become
    exactly 0 before the products. (Shifted by its rounded mean it kept 0.25 (0.75), or an ulp of 1e100
    when the mean rounded: every real distance cancelled, picks [0..5] weighed [40, 0, 0, 0, 0, 0].)"""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    small = 1.0 if constant > 1 else 1e-9
    base = small * rng.normal(size=(40, 3))
    X = np.concatenate([base, np.full((40, 1), constant)], axis=1)

    def run(A):
        if case == "pairwise":
            return crestcore.pairwise_distances(torch.from_numpy(A)).numpy()
        if case == "torch-minibatch":
            c = crestcore.minibatch_coresets(torch.from_numpy(A), torch.from_numpy(np.arange(40) % 2), m=6,
                                             r=20, P=2, rng=0)
            return np.concatenate([c.indices.numpy().ravel(), c.weights.numpy().ravel()])
        kw = {"torch-matrix-free": dict(max_dense_bytes=1000), "reference": dict(backend="reference"),
              "torch-knn": dict(neighbors=8), "numpy-knn": dict(neighbors=8)}.get(case, {})
        sel = crestcore.facility_location(A if case in ("reference", "numpy-knn") else torch.from_numpy(A), 6, **kw)
        return np.concatenate([np.asarray(sel.indices, dtype=np.float64), np.asarray(sel.weights, dtype=np.float64)])

    if case == "pairwise":
        np.testing.assert_allclose(run(X), run(base), rtol=1e-6, atol=1e-6 * small)
    else:
        np.testing.assert_array_equal(run(X), run(base))


def test_the_shift_of_integer_arrays_is_an_integer_data_value():
    from crestcore.backends import exact_shift

    torch = pytest.importorskip("torch")
    X = np.array([[1000, 5], [1003, 5], [999, 7]], dtype=np.int64)
    assert exact_shift(np, X).tolist() == [[1000, 0]]
    assert exact_shift(np, X, np.array([True, True, False])).tolist() == [[1003, 5]]  # a mask: no INT64_MIN
    from array_api_compat import array_namespace

    t = torch.from_numpy(X)
    assert exact_shift(array_namespace(t), t).tolist() == [[1000, 0]]
    # half precision: compared in float32 (float16 sums overflow near 6e4: warnings), shifted by its own value
    H = (60000 + np.arange(80).reshape(40, 2)).astype(np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = exact_shift(np, H, np.ones(40, dtype=bool))
    assert s.dtype == np.float16 and np.isin(s[0], H).all()


def test_the_shift_is_exact_and_leaves_a_mass_at_the_origin_where_it_is():
    """exact_shift moves only coordinates whose values all lie far from 0 (|s| >= 4 (max - min)), by a
    value within a factor 2 of each of them, so X - shift is exact (checked with fractions over scales,
    offsets and dtypes); CREST's own features, last-layer gradients with a tight mass of well-learned
    examples at 0, are then left in place and torch picks what NumPy (direct differences) picks (a plain
    mean shift had moved that mass to about 0.5, and 6-10 of 60 torch picks differed)."""
    from fractions import Fraction

    from crestcore.backends import exact_shift

    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        for offset, spread in ((0.0, 1.0), (0.5, 0.5), (100.0, 0.01), (1e6, 1.0), (-3e5, 1e-3), (1.0, 1e-6)):
            X = (offset + spread * rng.normal(size=(50, 3))).astype(dtype)
            X[:, 2] = X[0, 2]  # a constant coordinate
            s = exact_shift(np, X)
            D = X - s
            for i, j in ((0, 0), (7, 1), (49, 2), (13, 0)):
                assert Fraction(float(D[i, j])) == Fraction(float(X[i, j])) - Fraction(float(s[0, j]))
            if X[0, 2] != 0 and offset != 0:  # a constant coordinate far from 0 becomes exactly 0
                assert (D[:, 2] == 0).all()
    n, C = 1500, 10
    y = rng.integers(0, C, n)
    logits = rng.normal(size=(n, C))
    logits[np.arange(n), y] += np.where(rng.uniform(size=n) < 0.5, 12.0, 0.0)  # half of them learned
    p = np.exp(logits - logits.max(1, keepdims=True))
    G = (p / p.sum(1, keepdims=True) - np.eye(C)[y]).astype(np.float32)
    assert np.abs(exact_shift(np, G)).max() == 0  # every coordinate has values near 0: nothing moves
    a = crestcore.facility_location(G, 60, labels=y)
    t = crestcore.facility_location(torch.from_numpy(G), 60, labels=torch.from_numpy(y))
    assert np.setdiff1d(np.asarray(a.indices), t.indices.numpy()).size <= 1


@pytest.mark.parametrize("case", ["torch", "torch-matrix-free", "reference"])
@pytest.mark.parametrize("side", [1.0, -1.0])
def test_a_cloud_far_from_the_origin_with_an_outlier_selects_as_at_the_origin(case, side):
    """The shift is the data value nearest the mean: the largest value (an outlier above the cloud) left
    the float32 cloud 1000 +- 1e-3 a spread from the origin, where its distances cancelled (0 of 25
    random cases right, review)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    far = (1000.0 + 1e-3 * rng.normal(size=(200, 2))).astype(np.float32)
    far[-1] = 1000.0 + side * 10.0  # one outlier
    base = far - np.float32(1000.0)  # exact (Sterbenz): one and the same cloud, at the origin
    assert np.array_equal(base + np.float32(1000.0), far)

    def run(X):
        kw = {"torch-matrix-free": dict(max_dense_bytes=1000), "reference": dict(backend="reference")}.get(case, {})
        sel = crestcore.facility_location(X if case == "reference" else torch.from_numpy(X), 8, **kw)
        return np.asarray(sel.indices).tolist(), np.asarray(sel.weights).tolist()

    assert run(far) == run(base)


def test_the_host_helpers_take_numpy_itself_as_numpy_1_x_has_it(monkeypatch):
    """Review 108: `numpy>=1.24` is declared, but score_orders, the Dask adapter and the faiss search hand
    `numpy` itself to helpers that used NumPy 2's array-API names (`bool`, `astype`, `pow`): on NumPy 1.24-1.26
    score_orders raised AttributeError. The helpers take NumPy's module as its array-API namespace; here
    NumPy 2 without those three names stands in for NumPy 1.x."""
    from crestcore.backends.contract import exact_shift
    from crestcore.similarity import prepare, restore

    X = np.random.default_rng(0).normal(size=(50, 4)) + 1000
    tiny = np.array([[3 * 2.0**-110, 2.0**-108], [3.0, 4.0]], dtype=np.float32)
    want = (restore(np, np.array([0.5], dtype=np.float32), 3, np.dtype("float64"), "gains"),
            prepare(np, tiny, metric="cosine", kernel=None, scale=1.0)[0], exact_shift(np, X),
            exact_shift(np, X.astype(np.int64)))
    with monkeypatch.context() as m:
        for name in ("bool", "astype", "pow"):
            m.delattr(np, name)
        got = (restore(np, np.array([0.5], dtype=np.float32), 3, np.dtype("float64"), "gains"),
               prepare(np, tiny, metric="cosine", kernel=None, scale=1.0)[0], exact_shift(np, X),
               exact_shift(np, X.astype(np.int64)))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
        assert g.dtype == w.dtype


_REGISTRY_CHECK = r"""
import warnings
import numpy as np
import crestcore
from crestcore.baselines import gradmatch

shown = []
warnings.showwarning = lambda *a, **k: shown.append(str(a[0]))
rng = np.random.default_rng(0)
p = rng.normal(size=8).astype(np.float32)
state = crestcore.quadratic_anchor(crestcore.quadratic_init(p), 1.0)
G = rng.normal(size=(40, 6)).astype(np.float32)
for i in range(5):
    if i:  # (the first round imports what the calls import, SciPy among them, whose imports set filters)
        warnings.warn("the user's deprecation", UserWarning)  # default action: once for this line
    d = crestcore.hutchinson_diagonal(lambda z: 2.0 * z, rng.choice([-1.0, 1.0], size=(3, 8)).astype(np.float32))
    state = crestcore.quadratic_update(state, grad=p, zhz=d)
    crestcore.curvature_norm(state)
    crestcore.quadratic_predict(state, p * 0.1)
    crestcore.facility_location(G, 5)  # float32 features: the similarity's cast
    gradmatch(G, 5)
print("SHOWN", len(shown))
"""


def test_core_calls_leave_the_users_warnings_shown_once():
    """Review 163: every trust check and selection made Python forget which warnings it had shown (the core
    silenced NumPy's overflow warnings with ``warnings.catch_warnings``, whose exit resets every module's
    registry of warnings shown): a user's once-per-line warning came back after each check. NumPy's
    ``errstate`` silences them without touching the warnings module. In a fresh interpreter: pytest's own
    warning capture changes the filters."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _REGISTRY_CHECK], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONWARNINGS": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SHOWN 1" in out.stdout, out.stdout
