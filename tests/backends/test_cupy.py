"""crestcore.backends.cupy: differential tests against the generic reference kernels.

The GPU tests (marked ``gpu``) run only when CuPy imports *and* ``cupy.cuda.is_available()`` is True
and a first operation succeeds: CuPy imports fine without a GPU and fails on its first operation.

One test is not a GPU test and says so: ``test_array_program_on_numpy_stand_in`` executes the module's
source with NumPy bound to the name ``cupy``. The module only uses operations whose NumPy and CuPy
semantics coincide, so this checks its array logic (indexing, sampling, ties, tiling) everywhere,
including machines without CuPy; it proves nothing about CUDA, which the ``gpu`` tests cover.

Picks are compared as in ``test_torch.py`` (both replay the trajectories with tests/_greedy_replay.py):
exactly where the reference's best-vs-second gain gap exceeds a tolerance at every step, otherwise as a
valid greedy run within that tolerance.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from _greedy_replay import KERNELS, METRICS, OPTIMIZERS, features_problem, features_strategies, host, padded_batch
from _greedy_replay import assert_features_matches, assert_greedy_matches
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crestcore
from crestcore import _reference_kernels as ref
from crestcore.backends import _device


def _gpu_reason():
    try:
        import cupy
    except Exception as exc:  # not installed, or a broken install
        return f"cupy does not import: {type(exc).__name__}: {exc}"
    try:
        if not cupy.cuda.is_available():
            return "cupy.cuda.is_available() is False"
        float(cupy.ones(2).sum())
    except Exception as exc:
        return f"cupy not usable: {type(exc).__name__}: {exc}"
    return None


GPU_REASON = _gpu_reason()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=GPU_REASON or "")
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}
FEW = settings(deadline=None, max_examples=max(5, settings().max_examples // 2),
               suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------
# data (host NumPy) and the features path's checks
# --------------------------------------------------------------------------------------------------


def make_batch(seed, B, n, d, dtype, *, eps=0.1):
    """A padded batch (:func:`_greedy_replay.padded_batch`) in ``dtype``."""
    X, valid, budgets, u = padded_batch(seed, B, n, d, eps=eps)
    return X.astype(dtype), valid, budgets, u.astype(dtype)


def _dense_S(X_host, metric, kernel, scale):
    X = X_host[None]
    return ref.similarity_batched(X, np.ones(X.shape[:2], dtype=bool), metric, kernel, scale)[0]


def assert_features_result(X, k, metric, kernel, scale, optimizer, u, got, want, xp_module):
    """Arrays of ``xp_module`` in ``X``'s dtype, and the reference's trajectory, cluster sizes and
    objective within rounding (:func:`_greedy_replay.assert_features_matches`)."""
    Xh = host(X)
    idx, gains, weights, obj = got
    for a in got:
        assert isinstance(a, xp_module.ndarray)
    assert idx.dtype == np.int64 and idx.shape == (k,)
    assert gains.dtype == Xh.dtype and weights.dtype == Xh.dtype and obj.dtype == Xh.dtype and obj.shape == ()
    S = _dense_S(Xh, metric, kernel, scale)
    assert_features_matches(Xh, S, k, metric, optimizer, u, got, want[0], rtol=RTOL[Xh.dtype])


# --------------------------------------------------------------------------------------------------
# the shared differential checks, for any module implementing the kernels and an array constructor
# --------------------------------------------------------------------------------------------------


def check_batched(kmod, asarray, seed, B, n, d, dtype, metric, kernel, optimizer, eps):
    Xh, Vh, bh, uh = make_batch(seed, B, n, d, dtype, eps=eps)
    X, valid, budgets, u = asarray(Xh), asarray(Vh), asarray(bh), asarray(uh)
    S_got = kmod.similarity_batched(X, valid, metric, kernel, float(d))
    S = ref.similarity_batched(X, valid, metric, kernel, float(d))
    assert S_got.dtype == np.dtype(dtype) and S_got.shape == (B, n, n)
    atol = 50 * float(np.finfo(dtype).eps) * max(1.0, float(np.abs(host(S)).max()))
    np.testing.assert_allclose(host(S_got), host(S), rtol=0, atol=atol)
    assert (host(S_got)[~(Vh[:, :, None] & Vh[:, None, :])] == 0).all()
    uu = u if optimizer == "stochastic" else None
    got = kmod.greedy_batched(S, valid, budgets, optimizer, uu)
    want = ref.greedy_batched(S, valid, budgets, optimizer, uu)
    assert got[0].dtype == np.int64 and got[1].dtype == np.dtype(dtype)
    assert_greedy_matches(S, valid, budgets, optimizer, uu, got, want, rtol=RTOL[np.dtype(dtype)])
    w_got, o_got = kmod.assign_batched(S, valid, got[0])
    w_ref, o_ref = ref.assign_batched(S, valid, got[0])
    assert w_got.dtype == np.dtype(dtype) and o_got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(host(w_got), host(w_ref))
    scale = max(1.0, float(host(S).sum(axis=(1, 2)).max()))
    np.testing.assert_allclose(host(o_got), host(o_ref), rtol=0, atol=RTOL[np.dtype(dtype)] * scale)


def check_features(kmod, asarray, xp_module, data, seed, n, d, dtype, metric, kernel, optimizer):
    Xh, k, tile, uh = features_problem(data, seed, n, d, optimizer)
    X = asarray(Xh.astype(dtype))
    u = None if uh is None else asarray(uh.astype(dtype))
    got = kmod.greedy_features(X, k, metric, kernel, float(d), optimizer, u, tile)
    want = ref.greedy_features(X, k, metric, kernel, float(d), optimizer, u, tile)
    assert_features_result(X, k, metric, kernel, float(d), optimizer, u, got, want, xp_module)


# --------------------------------------------------------------------------------------------------
# the module's array program on a NumPy stand-in (CPU; not a GPU test)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standin():
    """backends/cupy.py executed with NumPy bound to ``cupy`` (a private module name inside the package, so its
    relative imports resolve; nothing registered in sys.modules)."""
    origin = importlib.util.find_spec("crestcore.backends").origin
    path = Path(origin).with_name("cupy.py")
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = np
    try:
        # a name inside the package, so the module's relative imports resolve
        spec = importlib.util.spec_from_file_location("crestcore.backends._cupy_on_numpy", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if saved is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved
    assert mod.cp is np
    return mod


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@FEW
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 5), n=st.integers(1, 24), d=st.integers(1, 5),
       metric=st.sampled_from(METRICS), kernel=st.sampled_from(KERNELS),
       optimizer=st.sampled_from(OPTIMIZERS), eps=st.sampled_from([0.01, 0.1, 0.5]))
def test_array_program_on_numpy_stand_in(standin, dtype, seed, B, n, d, metric, kernel, optimizer, eps):
    check_batched(standin, np.asarray, seed, B, n, d, dtype, metric, kernel, optimizer, eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@FEW
@given(**features_strategies(max_n=50))
def test_features_program_on_numpy_stand_in(standin, dtype, seed, n, d, data, metric, kernel, optimizer):
    check_features(standin, np.asarray, np, data, seed, n, d, dtype, metric, kernel, optimizer)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_stand_in_distances_in_row_blocks_are_bitwise_the_whole(standin, monkeypatch, metric):
    Xh, Vh, _, _ = make_batch(7, 4, 33, 3, np.float64)
    whole = standin.similarity_batched(Xh, Vh, metric, "max-minus", 1.0)
    monkeypatch.setattr(_device, "_MIN_TEMP_ELEMENTS", 1)
    monkeypatch.setattr(_device, "_MAX_TEMP_ELEMENTS", 5 * 33)  # 5 rows per block, straddling problems
    assert _device._temp_cap(4 * 33 * 33) // 33 == 5
    blocked = standin.similarity_batched(Xh, Vh, metric, "max-minus", 1.0)
    np.testing.assert_array_equal(whole, blocked)
    want = ref.similarity_batched(Xh, Vh, metric, "max-minus", 1.0)
    np.testing.assert_allclose(blocked, want, rtol=0, atol=1e-12 * max(1.0, float(np.abs(want).max())))


def test_stand_in_chunking_changes_nothing(standin, monkeypatch):
    Xh, Vh, bh, uh = make_batch(2, 5, 33, 3, np.float64)
    S = ref.similarity_batched(Xh, Vh, "euclidean", "exp", 3.0)
    full = [standin.greedy_batched(S, Vh, bh, o, uh) for o in OPTIMIZERS]
    Xf = np.random.default_rng(1).standard_normal((90, 3))
    feat = standin.greedy_features(Xf, 12, "cosine", "max-minus", 3.0, "lazy", None, 4096)
    monkeypatch.setattr(_device, "_MAX_TEMP_ELEMENTS", 5 * 33 * 4)
    assert _device._gain_chunk(5, 33) == 4
    for o, (i0, g0) in zip(OPTIMIZERS, full):
        i1, g1 = standin.greedy_batched(S, Vh, bh, o, uh)
        np.testing.assert_array_equal(i0, i1)
        np.testing.assert_allclose(g0, g1, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(_device, "_MAX_TEMP_ELEMENTS", 64)
    feat2 = standin.greedy_features(Xf, 12, "cosine", "max-minus", 3.0, "lazy", None, 4096)
    np.testing.assert_array_equal(feat[0], feat2[0])
    np.testing.assert_array_equal(feat[2], feat2[2])


# --------------------------------------------------------------------------------------------------
# on the GPU
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cupy_mod():
    import cupy

    return cupy


@pytest.fixture(scope="module")
def ck():
    from crestcore.backends import cupy as ck

    return ck


@gpu
@needs_gpu
def test_usable_for_and_dispatch(cupy_mod, ck):
    cp = cupy_mod
    from crestcore.backends import get_kernel

    S = cp.zeros((2, 3, 3), dtype=cp.float32)
    v = cp.ones((2, 3), dtype=bool)
    b = cp.ones(2, dtype=cp.int64)
    assert ck.usable_for("greedy_batched", S, v, b)
    assert ck.usable_for("assign_batched", S.astype(cp.float64), v, None)
    assert not ck.usable_for("greedy_batched", S.astype(cp.float16), v, b)
    assert not ck.usable_for("greedy_batched", cp.asnumpy(S), v, b)
    assert not ck.usable_for("greedy_features", cp.zeros((3, 2), dtype=cp.int64))
    assert not ck.usable_for("nope", S)
    assert get_kernel("greedy_batched", "cupy", S, v, b) is ck.greedy_batched
    assert get_kernel("greedy_batched", "cupy", S.astype(cp.float16), v, b) is None


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@FEW
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 5), n=st.integers(1, 24), d=st.integers(1, 5),
       metric=st.sampled_from(METRICS), kernel=st.sampled_from(KERNELS),
       optimizer=st.sampled_from(OPTIMIZERS), eps=st.sampled_from([0.01, 0.1, 0.5]))
def test_batched_kernels_match_reference(cupy_mod, ck, dtype, seed, B, n, d, metric, kernel, optimizer, eps):
    check_batched(ck, cupy_mod.asarray, seed, B, n, d, dtype, metric, kernel, optimizer, eps)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@FEW
@given(**features_strategies(max_n=50))
def test_greedy_features_matches_reference(cupy_mod, ck, dtype, seed, n, d, data, metric, kernel, optimizer):
    check_features(ck, cupy_mod.asarray, cupy_mod, data, seed, n, d, dtype, metric, kernel, optimizer)


def assert_same_selection(cp, a, r):
    """The same picks and weights, or (a near-tie broken the other way by differently ordered sums)
    the same objective."""
    ai, ri = cp.asnumpy(a.indices), cp.asnumpy(r.indices)
    if np.array_equal(ai, ri):
        np.testing.assert_array_equal(cp.asnumpy(a.weights), cp.asnumpy(r.weights))
    np.testing.assert_allclose(cp.asnumpy(a.objective), cp.asnumpy(r.objective), rtol=1e-9, atol=1e-9)


@gpu
@needs_gpu
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_public_api_auto_equals_reference(cupy_mod, optimizer):
    cp = cupy_mod
    rng = np.random.default_rng(0)
    Xh = rng.standard_normal((1500, 10))
    yh = rng.integers(0, 10, size=1500)
    X, y = cp.asarray(Xh), cp.asarray(yh)
    X0 = X.copy()
    a = crestcore.facility_location(X, 40, labels=y, optimizer=optimizer, rng=1)
    r = crestcore.facility_location(X, 40, labels=y, optimizer=optimizer, rng=1, backend="reference")
    for arr in (a.indices, a.weights, a.gains, a.objective):
        assert isinstance(arr, cp.ndarray)
    assert a.indices.dtype == np.int64 and a.weights.dtype == np.float64
    assert_same_selection(cp, a, r)
    assert float(a.weights.sum()) == 1500
    kw = dict(m=32, r=400, P=3, rng=4, optimizer=optimizer)
    c = crestcore.minibatch_coresets(X, y, **kw)
    cr = crestcore.minibatch_coresets(X, y, backend="reference", **kw)
    assert isinstance(c.indices, cp.ndarray) and c.indices.dtype == np.int64
    np.testing.assert_array_equal(cp.asnumpy(c.subsets), cp.asnumpy(cr.subsets))
    assert_same_selection(cp, c, cr)
    np.testing.assert_array_equal(cp.asnumpy(c.weights.sum(axis=1)), [400.0] * 3)
    # the matrix-free path, and the dense path on the same input
    kwm = dict(optimizer=optimizer, rng=2, metric="cosine")
    m = crestcore.facility_location(X[:300], 12, max_dense_bytes=300 * 300 * 8 - 1, **kwm)
    mr = crestcore.facility_location(X[:300], 12, max_dense_bytes=300 * 300 * 8 - 1, backend="reference", **kwm)
    md = crestcore.facility_location(X[:300], 12, **kwm)
    assert isinstance(m.indices, cp.ndarray) and m.weights.dtype == np.float64
    assert_same_selection(cp, m, mr)
    assert_same_selection(cp, md, mr)
    assert bool(cp.all(X == X0)), "input mutated"
    # float32 stays float32
    f = crestcore.minibatch_coresets(X.astype(cp.float32), y, m=16, r=200, P=2, rng=0)
    assert f.weights.dtype == np.float32 and f.objective.dtype == np.float32
