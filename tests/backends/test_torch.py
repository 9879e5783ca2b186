"""crestcore.backends.torch: differential tests against the generic reference kernels, on CPU tensors
and (marked ``gpu``, skipped without a CUDA device) on CUDA tensors.

How picks are compared. Two correct greedy implementations may legitimately differ when two candidates'
gains are closer than the rounding noise of the sums. So each problem's reference trajectory is
replayed in float64: where every step's best-vs-second gain gap exceeds ``tol`` the indices must match
exactly; otherwise the torch trajectory must itself be a ``tol``-greedy run (each pick a candidate of its
step, its gain within ``tol`` of that step's best, its reported gain right). Gains, weights and
objectives are compared within a dtype tolerance. The replay is shared with the other backends' tests
(tests/_greedy_replay.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _greedy_replay import KERNELS, METRICS, OPTIMIZERS, features_problem, features_strategies, host, padded_batch
from _greedy_replay import assert_features_matches, assert_greedy_matches
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import crestcore
from crestcore import _reference_kernels as ref
from crestcore.backends import _device, get_kernel
from crestcore.backends import torch as tk
from crestcore.facility import stochastic_draws

CUDA = torch.cuda.is_available()
_cuda_marks = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="torch.cuda.is_available() is False")]
DEVICES = ["cpu", pytest.param("cuda", marks=_cuda_marks, id="cuda")]
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}

# half the loaded profile's examples (conftest: default 25, ci 15, thorough 300): this file has many
# parametrised hypothesis tests and stays well under a minute with the default profile
FEW = settings(deadline=None, max_examples=max(5, settings().max_examples // 2),
               suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _no_tf32():
    """CUDA correctness: full-precision float32 matmuls (TF32 off), restored afterwards."""
    if not CUDA:
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def make_batch(seed, B, n, d, dtype, device, *, eps=0.1):
    """A padded batch (:func:`_greedy_replay.padded_batch`) as tensors on ``device``, X and u in ``dtype``."""
    X, valid, budgets, u = padded_batch(seed, B, n, d, eps=eps)
    t = lambda a, dt=None: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
    return t(X, dtype), t(valid), t(budgets), t(u, dtype)


# --------------------------------------------------------------------------------------------------
# usable_for and dispatch
# --------------------------------------------------------------------------------------------------


def test_usable_for_accepts_float32_float64_torch_tensors():
    for dt in (torch.float32, torch.float64):
        S = torch.zeros(2, 3, 3, dtype=dt)
        v = torch.ones(2, 3, dtype=torch.bool)
        b = torch.ones(2, dtype=torch.int64)
        assert tk.usable_for("greedy_batched", S, v, b)
        assert tk.usable_for("similarity_batched", torch.zeros(2, 3, 4, dtype=dt), v)
        assert tk.usable_for("greedy_features", torch.zeros(5, 2, dtype=dt))
        assert tk.usable_for("assign_batched", S, v, None)  # None is skipped


def test_usable_for_declines_what_the_reference_must_handle():
    v = torch.ones(2, 3, dtype=torch.bool)
    for dt in (torch.float16, torch.bfloat16, torch.complex64):
        assert not tk.usable_for("greedy_batched", torch.zeros(2, 3, 3, dtype=dt), v)
    assert not tk.usable_for("greedy_batched", np.zeros((2, 3, 3)), np.ones((2, 3), bool))
    assert not tk.usable_for("greedy_batched", torch.zeros(2, 3, 3), v.numpy())  # mixed libraries
    assert not tk.usable_for("greedy_features", torch.zeros(5, 2, dtype=torch.int64))  # not floating
    assert not tk.usable_for("greedy_batched", torch.zeros(2, 3, 3), torch.ones(2, 3, device="meta"))
    assert not tk.usable_for("greedy_features", torch.zeros(5, 2, device="meta"))  # neither cpu nor cuda
    assert not tk.usable_for("no_such_kernel", torch.zeros(5, 2))
    assert not tk.usable_for("greedy_features")
    # similarity keeps the autograd graph in the reference; selection kernels detach
    X = torch.zeros(2, 3, 4, requires_grad=True)
    assert not tk.usable_for("similarity_batched", X, v)
    assert tk.usable_for("greedy_features", torch.zeros(5, 2, requires_grad=True))


@pytest.mark.skipif(not CUDA, reason="torch.cuda.is_available() is False")
@pytest.mark.gpu
def test_usable_for_declines_two_devices():
    assert not tk.usable_for("greedy_batched", torch.zeros(2, 3, 3, device="cuda"), torch.ones(2, 3, dtype=torch.bool))
    assert tk.usable_for("greedy_batched", torch.zeros(2, 3, 3, device="cuda"),
                         torch.ones(2, 3, dtype=torch.bool, device="cuda"))


def test_dispatch_picks_the_torch_kernels():
    S = torch.zeros(2, 3, 3)
    v = torch.ones(2, 3, dtype=torch.bool)
    b = torch.ones(2, dtype=torch.int64)
    assert get_kernel("greedy_batched", "torch", S, v, b) is tk.greedy_batched
    assert get_kernel("assign_batched", "torch", S, v, b) is tk.assign_batched
    assert get_kernel("greedy_batched", "torch", S.half(), v, b) is None


# --------------------------------------------------------------------------------------------------
# kernels vs the reference, hypothesis-driven
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 5), n=st.integers(1, 24), d=st.integers(1, 6),
       metric=st.sampled_from(METRICS), kernel=st.sampled_from(KERNELS), scale=st.floats(0.1, 10.0))
def test_similarity_batched_matches_reference(device, dtype, seed, B, n, d, metric, kernel, scale):
    X, valid, _, _ = make_batch(seed, B, n, d, dtype, device)
    got = tk.similarity_batched(X, valid, metric, kernel, scale)
    want = ref.similarity_batched(X, valid, metric, kernel, scale)
    assert got.dtype == dtype and got.device == X.device and got.shape == (B, n, n)
    g, w = host(got), host(want)
    atol = 50 * float(torch.finfo(dtype).eps) * max(1.0, float(np.abs(w).max()))
    np.testing.assert_allclose(g, w, rtol=0, atol=atol)
    V = host(valid)
    pair = V[:, :, None] & V[:, None, :]
    assert (g[~pair] == 0).all(), "padded rows and columns must be exactly 0"
    assert (g >= 0).all()
    diag = np.diagonal(g, axis1=1, axis2=2)[V]
    if kernel == "exp":
        assert (diag == 1).all()
    else:
        np.testing.assert_array_equal(diag, g.max(axis=2)[V])  # a point is its own best candidate


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 6), n=st.integers(1, 30), d=st.integers(1, 5),
       metric=st.sampled_from(METRICS), kernel=st.sampled_from(KERNELS),
       optimizer=st.sampled_from(OPTIMIZERS), eps=st.sampled_from([0.01, 0.1, 0.5]))
def test_greedy_and_assign_match_reference(device, dtype, seed, B, n, d, metric, kernel, optimizer, eps):
    X, valid, budgets, u = make_batch(seed, B, n, d, dtype, device, eps=eps)
    S = ref.similarity_batched(X, valid, metric, kernel, float(d))
    u = u if optimizer == "stochastic" else None
    got = tk.greedy_batched(S, valid, budgets, optimizer, u)
    want = ref.greedy_batched(S, valid, budgets, optimizer, u)
    assert got[0].dtype == torch.int64 and got[1].dtype == dtype
    assert got[0].device == S.device and got[1].device == S.device
    assert_greedy_matches(S, valid, budgets, optimizer, u, got, want, rtol=RTOL[dtype])

    # assignment of the same picks: identical weights, objective within rounding
    w_got, o_got = tk.assign_batched(S, valid, got[0])
    w_ref, o_ref = ref.assign_batched(S, valid, got[0])
    assert w_got.dtype == dtype and o_got.dtype == dtype and w_got.device == S.device
    np.testing.assert_array_equal(host(w_got), host(w_ref))
    scale = max(1.0, float(host(S).sum(axis=(1, 2)).max()))
    np.testing.assert_allclose(host(o_got), host(o_ref), rtol=0, atol=RTOL[dtype] * scale)
    # weights are cluster sizes: they add up to the problem size wherever something was picked
    V = host(valid)
    picked = host(budgets) > 0
    np.testing.assert_array_equal(host(w_got).sum(axis=1)[picked], V.sum(axis=1)[picked])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 4), n=st.integers(1, 20), K=st.integers(0, 8))
def test_assign_batched_with_holes_matches_reference(device, dtype, seed, B, n, K):
    """Picks with -1 anywhere (not only trailing), rows without any pick, random similarities."""
    rng = np.random.default_rng(seed)
    S = torch.as_tensor(rng.random((B, n, n)), dtype=dtype, device=device)
    valid = torch.as_tensor(rng.random((B, n)) < 0.8, device=device)
    idx = np.full((B, K), -1, dtype=np.int64)
    for b in range(B):
        m = int(rng.integers(0, min(K, n) + 1))
        slots = rng.choice(K, size=m, replace=False) if m else []
        idx[b, slots] = rng.choice(n, size=m, replace=False)
    idx = torch.as_tensor(idx, device=device)
    w_got, o_got = tk.assign_batched(S, valid, idx)
    w_ref, o_ref = ref.assign_batched(S, valid, idx)
    assert w_got.shape == (B, K) and o_got.shape == (B,)
    np.testing.assert_array_equal(host(w_got), host(w_ref))
    np.testing.assert_allclose(host(o_got), host(o_ref), rtol=RTOL[dtype], atol=RTOL[dtype])


def _dense_S(X, metric, kernel, scale):
    """The dense (n, n) similarities of one problem, by the reference, in X's dtype (host)."""
    Xc = X.detach().cpu()[None]
    return ref.similarity_batched(Xc, torch.ones(Xc.shape[:2], dtype=torch.bool), metric, kernel, scale)[0]


def assert_features_result(X, k, metric, kernel, scale, optimizer, u, got, want):
    """Tensors on ``X``'s device in its dtype, and the reference's trajectory, cluster sizes and
    objective within rounding (:func:`_greedy_replay.assert_features_matches`)."""
    idx, gains, weights, obj = got
    assert idx.dtype == torch.int64 and idx.shape == (k,) and idx.device == X.device
    for a in (gains, weights, obj):
        assert a.dtype == X.dtype and a.device == X.device
    assert obj.shape == ()
    S = _dense_S(X, metric, kernel, scale)
    assert_features_matches(X, S, k, metric, optimizer, u, got, want[0], rtol=RTOL[X.dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(**features_strategies(max_n=60))
def test_greedy_features_matches_reference(device, dtype, seed, n, d, data, metric, kernel, optimizer):
    Xh, k, tile, uh = features_problem(data, seed, n, d, optimizer)
    X = torch.as_tensor(Xh, dtype=dtype, device=device)
    u = None if uh is None else torch.as_tensor(uh, dtype=dtype, device=device)
    scale = float(d)
    got = tk.greedy_features(X, k, metric, kernel, scale, optimizer, u, tile)
    want = ref.greedy_features(X, k, metric, kernel, scale, optimizer, u, tile)
    assert_features_result(X, k, metric, kernel, scale, optimizer, u, got, want)


def test_lazy_equals_naive():
    X, valid, budgets, _ = make_batch(7, 6, 40, 4, torch.float64, "cpu")
    S = ref.similarity_batched(X, valid, "euclidean", "max-minus", 1.0)
    a = tk.greedy_batched(S, valid, budgets, "lazy")
    b = tk.greedy_batched(S, valid, budgets, "naive")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    Xf = torch.as_tensor(np.random.default_rng(3).standard_normal((160, 6)))
    la = tk.greedy_features(Xf, 20, "euclidean", "max-minus", 6.0, "lazy", None, 64)
    na = tk.greedy_features(Xf, 20, "euclidean", "max-minus", 6.0, "naive", None, 64)
    assert torch.equal(la[0], na[0])
    torch.testing.assert_close(la[1], na[1], rtol=1e-12, atol=1e-9)


def test_chunked_gains_and_tiles_change_nothing(monkeypatch):
    """Force the memory limits down: chunked candidates / small tiles give the same results."""
    X, valid, budgets, u = make_batch(11, 5, 33, 3, torch.float64, "cpu")
    S = ref.similarity_batched(X, valid, "euclidean", "exp", 3.0)
    Xf = torch.as_tensor(np.random.default_rng(5).standard_normal((90, 3)))
    full = [tk.greedy_batched(S, valid, budgets, opt, u) for opt in OPTIMIZERS]
    feat = tk.greedy_features(Xf, 12, "cosine", "max-minus", 3.0, "lazy", None, 4096)
    monkeypatch.setattr(_device, "_MAX_TEMP_ELEMENTS", 5 * 33 * 4)  # 4 candidates per chunk
    assert _device._gain_chunk(5, 33) == 4
    for opt, (i0, g0) in zip(OPTIMIZERS, full):
        i1, g1 = tk.greedy_batched(S, valid, budgets, opt, u)
        assert torch.equal(i0, i1)
        torch.testing.assert_close(g0, g1, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(_device, "_MAX_TEMP_ELEMENTS", 64)
    feat2 = tk.greedy_features(Xf, 12, "cosine", "max-minus", 3.0, "lazy", None, 4096)
    assert torch.equal(feat[0], feat2[0]) and torch.equal(feat[2], feat2[2])


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_distances_in_row_blocks_are_bitwise_the_whole(monkeypatch, metric, dtype):
    """The distances are finished in blocks of rows that straddle problem boundaries (5 rows, n = 33):
    bit for bit what one block gives, and the similarities match the reference as before."""
    X, valid, _, _ = make_batch(7, 4, 33, 3, dtype, "cpu")
    whole = tk.similarity_batched(X, valid, metric, "max-minus", 1.0)
    monkeypatch.setattr(_device, "_MIN_TEMP_ELEMENTS", 1)
    monkeypatch.setattr(_device, "_MAX_TEMP_ELEMENTS", 5 * 33)  # 5 rows of the (4 * 33, 33) view per block
    assert _device._temp_cap(4 * 33 * 33) // 33 == 5
    blocked = tk.similarity_batched(X, valid, metric, "max-minus", 1.0)
    assert torch.equal(whole, blocked)
    want = ref.similarity_batched(X, valid, metric, "max-minus", 1.0)
    atol = 50 * float(torch.finfo(dtype).eps) * max(1.0, float(want.abs().max()))
    torch.testing.assert_close(blocked, want, rtol=0, atol=atol)


def test_edge_cases_match_reference():
    S = torch.rand(3, 4, 4, dtype=torch.float64)
    valid = torch.ones(3, 4, dtype=torch.bool)
    zero = torch.zeros(3, dtype=torch.int64)
    i, g = tk.greedy_batched(S, valid, zero, "naive")  # K = 0
    assert i.shape == (3, 0) and g.shape == (3, 0) and i.dtype == torch.int64
    w, o = tk.assign_batched(S, valid, i)
    assert w.shape == (3, 0) and torch.equal(o, torch.zeros(3, dtype=torch.float64))
    full = torch.full((3,), 4, dtype=torch.int64)  # k = n: every point, in greedy order
    i, _ = tk.greedy_batched(S, valid, full, "lazy")
    assert torch.equal(torch.sort(i, dim=1).values, torch.arange(4).expand(3, 4))
    assert torch.equal(i, ref.greedy_batched(S, valid, full, "lazy")[0])
    # all-identical points: every gain after the first is 0, lowest indices, all weight on the first
    X = torch.ones(1, 6, 3, dtype=torch.float64)
    v1 = torch.ones(1, 6, dtype=torch.bool)
    S1 = tk.similarity_batched(X, v1, "euclidean", "exp", 3.0)
    i, g = tk.greedy_batched(S1, v1, torch.tensor([3]), "lazy")
    assert i.tolist() == [[0, 1, 2]] and g[0, 1:].tolist() == [0.0, 0.0]
    w, _ = tk.assign_batched(S1, v1, i)
    assert w.tolist() == [[6.0, 0.0, 0.0]]
    # greedy_features, k = n, n = 1
    one = tk.greedy_features(torch.ones(1, 2), 1, "euclidean", "max-minus", 2.0, "lazy")
    assert one[0].tolist() == [0] and one[2].tolist() == [1.0]
    X = torch.as_tensor(np.random.default_rng(0).standard_normal((9, 2)))
    got = tk.greedy_features(X, 9, "euclidean", "exp", 2.0, "naive")
    assert sorted(got[0].tolist()) == list(range(9)) and got[2].tolist() == [1.0] * 9


def test_stochastic_without_draws_is_an_error():
    S = torch.rand(1, 3, 3)
    with pytest.raises(ValueError, match="u"):
        tk.greedy_batched(S, torch.ones(1, 3, dtype=torch.bool), torch.tensor([1]), "stochastic")
    with pytest.raises(ValueError, match="optimizer"):
        tk.greedy_batched(S, torch.ones(1, 3, dtype=torch.bool), torch.tensor([1]), "greedy")
    with pytest.raises(ValueError, match="metric"):
        tk.similarity_batched(torch.rand(1, 3, 2), torch.ones(1, 3, dtype=torch.bool), "manhattan", "exp", 1.0)


# --------------------------------------------------------------------------------------------------
# no host synchronisation inside the loops
# --------------------------------------------------------------------------------------------------


def test_greedy_loop_has_no_host_sync_meta_device():
    """On the meta device every value read on the host raises: the loops must never read one."""
    B, n, K, s = 4, 9, 5, 3
    S = torch.empty(B, n, n, device="meta")
    valid = torch.empty(B, n, dtype=torch.bool, device="meta")
    budgets = torch.empty(B, dtype=torch.int64, device="meta")
    u = torch.empty(B, K, s, device="meta")
    with pytest.raises(RuntimeError):
        bool(S.sum() > 0)  # the premise
    for opt in OPTIMIZERS:
        idx, gains = tk._greedy_loop(S, valid, budgets, K, opt, u)
        assert idx.shape == (B, K) and gains.shape == (B, K)
    w, o = tk.assign_batched(S, valid, idx)
    assert w.shape == (B, K) and o.shape == (B,)
    for metric in METRICS:
        for kernel in KERNELS:
            out = tk.similarity_batched(torch.empty(B, n, 3, device="meta"), valid, metric, kernel, 1.0)
            assert out.shape == (B, n, n)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="torch.cuda.is_available() is False")
def test_greedy_loop_has_no_host_sync_cuda():
    X, valid, budgets, u = make_batch(3, 8, 40, 5, torch.float32, "cuda")
    K = int(budgets.max())
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        S = tk.similarity_batched(X, valid, "euclidean", "max-minus", 1.0)
        for opt in OPTIMIZERS:
            idx, _ = tk._greedy_loop(S, valid, budgets, K, opt, u)
            tk.assign_batched(S, valid, idx)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------
# public API end to end with torch input
# --------------------------------------------------------------------------------------------------


def _features(seed, n, d, C, dtype, device):
    rng = np.random.default_rng(seed)
    X = torch.as_tensor(rng.standard_normal((n, d)), dtype=dtype, device=device)
    y = torch.as_tensor(rng.integers(0, C, size=n), device=device)
    return X, y


def _assert_torch(out, like, dtype):
    assert isinstance(out, torch.Tensor) and out.device == like.device and out.dtype == dtype


def assert_same_selection(a, r, n_points=None):
    """``a`` (auto) and ``r`` (reference) results of the public API on float64 input: the same picks and
    weights, or (when a near-tie between equal-gain candidates was broken the other way by rounding of
    differently ordered sums) the same objective."""
    if torch.equal(a.indices, r.indices):
        assert torch.equal(a.weights, r.weights)
        torch.testing.assert_close(a.gains, r.gains, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(a.objective, r.objective, rtol=1e-9, atol=1e-9)
    if n_points is not None:
        assert float(a.weights.sum()) == n_points


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_facility_location_auto_equals_reference(device, optimizer, kernel):
    X, y = _features(1, 300, 6, 4, torch.float64, device)
    kw = dict(labels=y, kernel=kernel, optimizer=optimizer, rng=5)
    a = crestcore.facility_location(X, 30, **kw)
    r = crestcore.facility_location(X, 30, backend="reference", **kw)
    _assert_torch(a.indices, X, torch.int64)
    for arr in (a.weights, a.gains, a.objective):
        _assert_torch(arr, X, torch.float64)
    if device == "cpu":  # the same torch operations in the same order: identical on the CPU
        assert torch.equal(a.indices, r.indices)
    assert_same_selection(a, r, 300)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_facility_location_matrix_free_path(device, optimizer):
    """max_dense_bytes below one problem's n x n: the greedy_features path, auto vs reference, and vs
    the dense path on the same input (picks compared where no near-tie makes them ambiguous)."""
    n, k = 240, 15
    X, _ = _features(2, n, 5, 1, torch.float64, device)
    kw = dict(metric="cosine", optimizer=optimizer, rng=3)
    a = crestcore.facility_location(X, k, max_dense_bytes=n * n * 8 - 1, **kw)
    r = crestcore.facility_location(X, k, max_dense_bytes=n * n * 8 - 1, backend="reference", **kw)
    d = crestcore.facility_location(X, k, **kw)  # dense
    _assert_torch(a.indices, X, torch.int64)
    _assert_torch(a.weights, X, torch.float64)
    _assert_torch(a.objective, X, torch.float64)
    S = _dense_S(X, "cosine", "max-minus", 1.0)
    u = None
    if optimizer == "stochastic":  # the draws facility_location makes from rng=3
        u = torch.as_tensor(stochastic_draws(np.random.default_rng(3), [n], [k], 0.1)[0], dtype=torch.float64)
    one = (torch.ones((1, n), dtype=torch.bool), torch.tensor([k]))
    for got, mode in ((a, "features"), (d, "batched")):
        exact = assert_greedy_matches(S[None], *one, optimizer, None if u is None else u[None],
                                      (got.indices.cpu()[None], got.gains.cpu()[None]),
                                      (r.indices.cpu()[None], None), rtol=RTOL[S.dtype], mode=mode, noise=1e-9)
        if exact:
            assert torch.equal(got.weights.cpu(), r.weights.cpu())
        torch.testing.assert_close(got.objective.cpu(), r.objective.cpu(), rtol=1e-9, atol=1e-9)
    assert float(a.weights.sum()) == n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("class_budget", ["proportional", "ceil"])
def test_minibatch_coresets_auto_equals_reference(device, optimizer, class_budget):
    X, y = _features(4, 2000, 10, 10, torch.float64, device)
    kw = dict(m=32, r=300, P=4, rng=9, optimizer=optimizer, class_budget=class_budget)
    a = crestcore.minibatch_coresets(X, y, **kw)
    r = crestcore.minibatch_coresets(X, y, backend="reference", **kw)
    _assert_torch(a.indices, X, torch.int64)
    _assert_torch(a.subsets, X, torch.int64)
    for arr in (a.weights, a.gains, a.objective):
        _assert_torch(arr, X, torch.float64)
    assert torch.equal(a.subsets, r.subsets)
    if device == "cpu":
        assert torch.equal(a.indices, r.indices)
    assert_same_selection(a, r)
    assert torch.equal(a.weights.sum(dim=1), torch.full((4,), 300.0, dtype=torch.float64, device=X.device))


@pytest.mark.parametrize("device", DEVICES)
def test_minibatch_coresets_float32(device):
    """float32: outputs stay float32 on the device; objectives agree with the reference."""
    X, y = _features(6, 3000, 10, 10, torch.float32, device)
    kw = dict(m=64, r=600, P=3, rng=2)
    a = crestcore.minibatch_coresets(X, y, **kw)
    r = crestcore.minibatch_coresets(X, y, backend="reference", **kw)
    _assert_torch(a.indices, X, torch.int64)
    _assert_torch(a.weights, X, torch.float32)
    _assert_torch(a.objective, X, torch.float32)
    torch.testing.assert_close(a.objective, r.objective, rtol=1e-4, atol=1e-3)
    assert (a.indices >= 0).all() and float(a.weights.sum()) == 3 * 600
    same = (a.indices == r.indices).float().mean().item()
    assert same > 0.9, f"only {same:.0%} of float32 picks agree"


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_are_not_mutated_and_non_contiguous_inputs_work(device):
    rng = np.random.default_rng(0)
    base = torch.as_tensor(rng.standard_normal((500, 12)), device=device)
    X = base[:, ::2]  # non-contiguous (500, 6)
    assert not X.is_contiguous()
    y = torch.as_tensor(rng.integers(0, 5, size=500), device=device)
    X0, y0 = X.clone(), y.clone()
    a = crestcore.facility_location(X, 20, labels=y)
    b = crestcore.facility_location(X.contiguous(), 20, labels=y)
    c = crestcore.minibatch_coresets(X, y, m=16, r=100, P=2, rng=1)
    d = crestcore.minibatch_coresets(X.contiguous(), y, m=16, r=100, P=2, rng=1)
    assert torch.equal(X, X0) and torch.equal(y, y0)
    assert torch.equal(a.indices, b.indices) and torch.equal(c.indices, d.indices)
    # kernels directly: non-contiguous S (a transpose) and u (a slice), inputs untouched
    Xb, valid, budgets, u = make_batch(1, 4, 20, 3, torch.float64, device)
    S = ref.similarity_batched(Xb, valid, "sqeuclidean", "max-minus", 1.0)
    St = S.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert not St.is_contiguous()
    uu = torch.cat([u, u], dim=2)[:, :, : u.shape[2]]
    keep = [t.clone() for t in (Xb, valid, budgets, u, S)]
    for opt in OPTIMIZERS:
        i0, g0 = tk.greedy_batched(S, valid, budgets, opt, u)
        i1, g1 = tk.greedy_batched(St, valid, budgets, opt, uu)
        assert torch.equal(i0, i1) and torch.equal(g0, g1)
        w0, o0 = tk.assign_batched(S, valid, i0)
        w1, o1 = tk.assign_batched(St, valid, i0)
        assert torch.equal(w0, w1)
    tk.similarity_batched(Xb, valid, "euclidean", "max-minus", 1.0)
    tk.greedy_features(Xb[0], 3, "euclidean", "max-minus", 1.0, "lazy", None, 4)
    for t0, t in zip(keep, (Xb, valid, budgets, u, S)):
        assert torch.equal(t0, t)


def test_features_requiring_grad_are_accepted():
    X, y = _features(8, 200, 4, 3, torch.float32, "cpu")
    X.requires_grad_(True)
    a = crestcore.facility_location(X, 10, labels=y)
    b = crestcore.facility_location(X.detach(), 10, labels=y)
    assert torch.equal(a.indices, b.indices)
    c = crestcore.minibatch_coresets(X, y, m=8, r=60, P=2, rng=0)
    assert c.indices.shape == (2, 8)


@FEW
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(33, 80), levels=st.integers(2, 4),
       metric=st.sampled_from(["euclidean", "sqeuclidean"]), kernel=st.sampled_from(KERNELS),
       path=st.sampled_from(["dense", "matrix-free", "per-class"]))
@example(seed=0, n=39, levels=2, metric="euclidean", kernel="max-minus", path="dense")
@example(seed=0, n=39, levels=2, metric="euclidean", kernel="max-minus", path="matrix-free")
@example(seed=0, n=39, levels=2, metric="euclidean", kernel="max-minus", path="per-class")
@example(seed=14, n=65, levels=2, metric="euclidean", kernel="exp", path="matrix-free")
def test_duplicate_points_tie_to_the_lowest_index_on_every_backend(seed, n, levels, metric, kernel, path):
    """Integer-lattice points (many duplicates; the Gram products are exact integers, so a duplicate's
    similarity column is bit for bit its twin's on every backend): their gains are bit-identical and
    the lower index is picked, NumPy (Numba) and torch alike and as the reference does. (torch's sum over
    a column block used to round the columns past its vector width in another order, so a later twin
    won by an ulp: candidates past index 32, which n >= 33 makes appear. The matrix-free path summed a
    lazy re-evaluation of a few candidates in other row chunks than the full pass, so a twin re-evaluated
    alone came out 2 ulps above its lower-index twin's bound: the example with n = 65, "exp".)"""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, levels, (n, 2)).astype(np.float64)
    labels = rng.integers(0, 2, n) if path == "per-class" else None
    kw = dict(metric=metric, kernel=kernel, max_dense_bytes=100 if path == "matrix-free" else None)
    kw = {k: v for k, v in kw.items() if v is not None}
    kn = dict(kw, labels=labels) if labels is not None else kw
    kt = dict(kw, labels=torch.from_numpy(labels)) if labels is not None else kw
    k = 6
    Xt = torch.from_numpy(X)
    results = [crestcore.facility_location(X, k, **kn), crestcore.facility_location(X, k, backend="reference", **kn),
               crestcore.facility_location(Xt, k, **kt), crestcore.facility_location(Xt, k, backend="reference", **kt)]
    for sel in results:
        picks = host(sel.indices).tolist()
        for p in picks:  # each pick is the lowest-index copy of its point that was not picked before it
            twins = np.flatnonzero((X == X[p]).all(axis=1) & ((labels == labels[p]) if labels is not None else True))
            earlier = [q for q in twins if q < p]
            assert all(q in picks[: picks.index(p)] for q in earlier), (p, twins.tolist(), picks)
    # torch and the reference on torch run the same operations: the same picks
    assert torch.equal(results[2].indices, results[3].indices)


def test_a_float32_draw_just_below_a_position_picks_the_candidate_every_path_picks():
    # min(floor(u * R), R - 1) in the draw's own dtype, as the reference, the Numba kernels and the dense
    # path take it: in float64 this draw (just below 17 / 1000) mapped to position 16, in float32 to 17
    R = 1000
    u = np.nextafter(np.float32(17 / R), np.float32(0))
    assert np.floor(u * np.float32(R)) == 17 and np.floor(np.float64(u) * R) == 16
    X = np.random.default_rng(0).normal(size=(R, 2)).astype(np.float32)
    U = np.full((1, 1), u, dtype=np.float32)
    want = ref.greedy_features(X, 1, "euclidean", "max-minus", 1.0, "stochastic", U, 256)[0]
    got = tk.greedy_features(torch.from_numpy(X), 1, "euclidean", "max-minus", 1.0, "stochastic",
                             torch.from_numpy(U), 256)[0]
    assert want.tolist() == [17] and got.tolist() == [17]
