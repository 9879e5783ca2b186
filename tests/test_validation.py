"""Bad input is part of the contract: every public function rejects it with a ValueError/TypeError that
names the argument, or gives a documented correct answer; no input is ever mutated."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

import crestcore

N, D = 20, 3
_rng = np.random.default_rng(0)
X0 = _rng.normal(size=(N, D))
L0 = np.repeat(np.arange(4), 5)[_rng.permutation(N)].astype(np.int64)
S0 = np.abs(_rng.normal(size=(N, N)))


def _with(a, i, j, value):
    b = a.copy()
    b[i, j] = value
    return b


def _word(name: str) -> str:
    """A regex matching ``name`` as a whole word (so "k" does not match "kernel")."""
    return rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])"


def _torch():
    return pytest.importorskip("torch")


# ================================================================================================
# facility_location
# ================================================================================================

FL_BAD = [
    # X
    ("nan", lambda: dict(X=_with(X0, 3, 1, np.nan), k=3), ValueError, "X"),
    ("inf", lambda: dict(X=_with(X0, 0, 0, np.inf), k=3), ValueError, "X"),
    ("-inf", lambda: dict(X=_with(X0, 0, 0, -np.inf), k=3), ValueError, "X"),
    ("empty rows", lambda: dict(X=np.zeros((0, 3)), k=1), ValueError, "X"),
    ("empty cols", lambda: dict(X=np.zeros((5, 0)), k=1), ValueError, "X"),
    ("1-D X", lambda: dict(X=X0[:, 0].copy(), k=1), ValueError, "X"),
    ("3-D X", lambda: dict(X=X0[None], k=1), ValueError, "X"),
    ("int X", lambda: dict(X=np.arange(60).reshape(20, 3), k=2), TypeError, "X"),
    ("bool X", lambda: dict(X=X0 > 0, k=2), TypeError, "X"),
    ("complex X", lambda: dict(X=X0.astype(complex), k=2), TypeError, "X"),
    ("list X", lambda: dict(X=X0.tolist(), k=2), TypeError, "X"),
    # k
    ("k > n", lambda: dict(X=X0, k=N + 1), ValueError, "k"),
    ("k = 0", lambda: dict(X=X0, k=0), ValueError, "k"),
    ("k < 0", lambda: dict(X=X0, k=-2), ValueError, "k"),
    ("k float", lambda: dict(X=X0, k=2.0), TypeError, "k"),
    ("k bool", lambda: dict(X=X0, k=True), TypeError, "k"),
    ("k str", lambda: dict(X=X0, k="3"), TypeError, "k"),
    ("k None", lambda: dict(X=X0, k=None), TypeError, "k"),
    # labels
    ("labels short", lambda: dict(X=X0, k=2, labels=L0[:-1]), ValueError, "labels"),
    ("labels long", lambda: dict(X=X0, k=2, labels=np.concatenate([L0, [0]])), ValueError, "labels"),
    ("labels float", lambda: dict(X=X0, k=2, labels=L0.astype(np.float64)), TypeError, "labels"),
    ("labels bool", lambda: dict(X=X0, k=2, labels=L0 > 1), TypeError, "labels"),
    ("labels 2-D", lambda: dict(X=X0, k=2, labels=L0[:, None]), ValueError, "labels"),
    ("labels list", lambda: dict(X=X0, k=2, labels=L0.tolist()), TypeError, "labels"),
    # choices
    ("metric", lambda: dict(X=X0, k=2, metric="manhattan"), ValueError, "metric"),
    ("kernel", lambda: dict(X=X0, k=2, kernel="rbf"), ValueError, "kernel"),
    ("kernel unknown", lambda: dict(X=X0, k=2, kernel="gauss"), ValueError, "kernel"),
    ("optimizer", lambda: dict(X=X0, k=2, optimizer="greedy"), ValueError, "optimizer"),
    ("backend", lambda: dict(X=X0, k=2, backend="gpu"), ValueError, "backend"),
    # precomputed
    ("kernel with precomputed", lambda: dict(X=S0, k=2, metric="precomputed", kernel="exp"), ValueError, "kernel"),
    ("negative precomputed", lambda: dict(X=_with(S0, 2, 5, -0.5), k=2, metric="precomputed", kernel=None),
     ValueError, "X"),
    ("non-square precomputed", lambda: dict(X=S0[:, :-1], k=2, metric="precomputed", kernel=None), ValueError, "X"),
    ("nan precomputed", lambda: dict(X=_with(S0, 1, 1, np.nan), k=2, metric="precomputed", kernel=None),
     ValueError, "X"),
    # stochastic, epsilon, scale, max_dense_bytes
    ("stochastic without rng", lambda: dict(X=X0, k=2, optimizer="stochastic"), TypeError, "rng"),
    ("stochastic rng str", lambda: dict(X=X0, k=2, optimizer="stochastic", rng="seed"), TypeError, "rng"),
    ("epsilon 0", lambda: dict(X=X0, k=2, optimizer="stochastic", rng=0, epsilon=0.0), ValueError, "epsilon"),
    ("epsilon 1", lambda: dict(X=X0, k=2, optimizer="stochastic", rng=0, epsilon=1.0), ValueError, "epsilon"),
    ("epsilon < 0", lambda: dict(X=X0, k=2, optimizer="stochastic", rng=0, epsilon=-0.1), ValueError, "epsilon"),
    ("epsilon > 1", lambda: dict(X=X0, k=2, optimizer="stochastic", rng=0, epsilon=2.0), ValueError, "epsilon"),
    ("epsilon nan", lambda: dict(X=X0, k=2, optimizer="stochastic", rng=0, epsilon=float("nan")), ValueError,
     "epsilon"),
    ("epsilon str", lambda: dict(X=X0, k=2, optimizer="stochastic", rng=0, epsilon="0.1"), TypeError, "epsilon"),
    ("scale 0", lambda: dict(X=X0, k=2, kernel="exp", scale=0.0), ValueError, "scale"),
    ("scale < 0", lambda: dict(X=X0, k=2, kernel="exp", scale=-1.0), ValueError, "scale"),
    ("scale inf", lambda: dict(X=X0, k=2, kernel="exp", scale=float("inf")), ValueError, "scale"),
    ("max_dense_bytes 0", lambda: dict(X=X0, k=2, max_dense_bytes=0), ValueError, "max_dense_bytes"),
]


@pytest.mark.parametrize("make, exc, name", [pytest.param(*c[1:], id=c[0]) for c in FL_BAD])
def test_facility_location_rejects(make, exc, name):
    kwargs = make()
    with pytest.raises(exc, match=_word(name)):
        crestcore.facility_location(kwargs.pop("X"), kwargs.pop("k"), **kwargs)


def test_mixed_namespaces_name_the_arguments():
    torch = _torch()
    with pytest.raises(TypeError, match=r"X.*labels"):
        crestcore.facility_location(X0, 2, labels=torch.asarray(L0))
    with pytest.raises(TypeError, match=r"X.*labels"):
        crestcore.facility_location(torch.asarray(X0), 2, labels=L0)
    with pytest.raises(TypeError, match=r"features.*labels"):
        crestcore.minibatch_coresets(X0, torch.asarray(L0), m=2, r=8, P=1, rng=0)
    with pytest.raises(TypeError, match=r"S.*selected"):
        crestcore.facility_objective(S0, torch.asarray([1]))
    with pytest.raises(TypeError, match=r"S.*selected"):
        crestcore.marginal_gains(torch.asarray(S0), np.array([1]))
    with pytest.raises(TypeError, match=r"X.*Y"):
        crestcore.pairwise_distances(X0, torch.asarray(X0))


def test_mixed_namespaces_array_api_strict():
    xs = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match=r"X.*labels"):
        crestcore.facility_location(xs.asarray(X0), 2, labels=L0)


# ================================================================================================
# minibatch_coresets
# ================================================================================================


def _mb(**over):
    kw = dict(features=X0, labels=L0, m=4, r=12, P=2, rng=0)
    kw.update(over)
    return kw


MB_BAD = [
    ("features nan", lambda: _mb(features=_with(X0, 0, 0, np.nan)), ValueError, "features"),
    ("features inf", lambda: _mb(features=_with(X0, 0, 0, np.inf)), ValueError, "features"),
    ("features empty", lambda: _mb(features=np.zeros((0, 3)), labels=None), ValueError, "features"),
    ("features 1-D", lambda: _mb(features=X0[:, 0].copy()), ValueError, "features"),
    ("features 3-D", lambda: _mb(features=X0[None]), ValueError, "features"),
    ("features int", lambda: _mb(features=np.arange(60).reshape(20, 3)), TypeError, "features"),
    ("features bool", lambda: _mb(features=X0 > 0), TypeError, "features"),
    ("features list", lambda: _mb(features=X0.tolist()), TypeError, "features"),
    ("labels short", lambda: _mb(labels=L0[:-1]), ValueError, "labels"),
    ("labels float", lambda: _mb(labels=L0.astype(np.float32)), TypeError, "labels"),
    ("labels 2-D", lambda: _mb(labels=L0[None, :]), ValueError, "labels"),
    ("m > r", lambda: _mb(m=13, r=12), ValueError, "m"),
    ("m = 0", lambda: _mb(m=0), ValueError, "m"),
    ("m float", lambda: _mb(m=4.0), TypeError, "m"),
    ("m bool", lambda: _mb(m=True), TypeError, "m"),
    ("r > n", lambda: _mb(r=N + 1), ValueError, "r"),
    ("r > pool", lambda: _mb(r=6, pool=np.arange(5)), ValueError, "r"),
    ("r = 0", lambda: _mb(m=1, r=0), ValueError, "r"),
    ("r float", lambda: _mb(r=12.0), TypeError, "r"),
    ("P = 0", lambda: _mb(P=0), ValueError, "P"),
    ("P < 0", lambda: _mb(P=-3), ValueError, "P"),
    ("P float", lambda: _mb(P=2.5), TypeError, "P"),
    ("P bool", lambda: _mb(P=True), TypeError, "P"),
    ("rng None", lambda: _mb(rng=None), TypeError, "rng"),
    ("rng str", lambda: _mb(rng="0"), TypeError, "rng"),
    ("pool 2-D", lambda: _mb(pool=np.arange(12).reshape(3, 4)), TypeError, "pool"),
    ("pool float", lambda: _mb(pool=np.arange(15.0)), TypeError, "pool"),
    ("pool bool", lambda: _mb(pool=np.ones(N, dtype=bool)), TypeError, "pool"),
    ("pool out of range", lambda: _mb(pool=np.arange(5, N + 1)), ValueError, "pool"),
    ("pool negative", lambda: _mb(pool=np.arange(-1, 15)), ValueError, "pool"),
    ("pool duplicates", lambda: _mb(pool=np.array([0, 1, 2, 2] + list(range(5, 15)))), ValueError, "pool"),
    ("pool empty", lambda: _mb(pool=np.array([], dtype=np.int64)), ValueError, "pool"),
    ("per_class not bool", lambda: _mb(per_class=1), TypeError, "per_class"),
    ("metric", lambda: _mb(metric="l1"), ValueError, "metric"),
    ("metric precomputed", lambda: _mb(metric="precomputed"), ValueError, "metric"),
    ("kernel", lambda: _mb(kernel="gauss"), ValueError, "kernel"),
    ("optimizer", lambda: _mb(optimizer="fast"), ValueError, "optimizer"),
    ("class_budget", lambda: _mb(class_budget="floor"), ValueError, "class_budget"),
    ("backend", lambda: _mb(backend="cuda"), ValueError, "backend"),
    ("epsilon 0", lambda: _mb(optimizer="stochastic", epsilon=0.0), ValueError, "epsilon"),
    ("epsilon 1.5", lambda: _mb(optimizer="stochastic", epsilon=1.5), ValueError, "epsilon"),
    ("scale < 0", lambda: _mb(kernel="exp", scale=-2.0), ValueError, "scale"),
]


@pytest.mark.parametrize("make, exc, name", [pytest.param(*c[1:], id=c[0]) for c in MB_BAD])
def test_minibatch_coresets_rejects(make, exc, name):
    kw = make()
    with pytest.raises(exc, match=_word(name)):
        crestcore.minibatch_coresets(kw.pop("features"), kw.pop("labels"), **kw)


# ================================================================================================
# facility_objective, marginal_gains, pairwise_distances
# ================================================================================================

SEL = np.array([1, 4], dtype=np.int64)

HELPER_BAD = [
    ("objective S 1-D", lambda: crestcore.facility_objective(S0[0].copy(), SEL), ValueError, "S"),
    ("objective selected 2-D", lambda: crestcore.facility_objective(S0, SEL[None]), ValueError, "selected"),
    ("objective selected float", lambda: crestcore.facility_objective(S0, SEL.astype(float)), TypeError,
     "selected"),
    ("objective selected >= n", lambda: crestcore.facility_objective(S0, np.array([N])), (ValueError, IndexError),
     "selected"),
    ("objective selected < 0", lambda: crestcore.facility_objective(S0, np.array([-1])), (ValueError, IndexError),
     "selected"),
    ("objective S nan", lambda: crestcore.facility_objective(_with(S0, 0, 1, np.nan), SEL), ValueError, "S"),
    ("objective S list", lambda: crestcore.facility_objective(S0.tolist(), SEL), TypeError, "S"),
    ("gains S 1-D", lambda: crestcore.marginal_gains(S0[0].copy(), SEL), ValueError, "S"),
    ("gains selected 2-D", lambda: crestcore.marginal_gains(S0, SEL[None]), ValueError, "selected"),
    ("gains selected float", lambda: crestcore.marginal_gains(S0, SEL.astype(float)), TypeError, "selected"),
    ("gains selected >= n", lambda: crestcore.marginal_gains(S0, np.array([N])), (ValueError, IndexError),
     "selected"),
    ("gains selected < 0", lambda: crestcore.marginal_gains(S0, np.array([-1])), (ValueError, IndexError),
     "selected"),
    ("gains S nan", lambda: crestcore.marginal_gains(_with(S0, 0, 1, np.nan), SEL), ValueError, "S"),
    ("distances metric", lambda: crestcore.pairwise_distances(X0, metric="chebyshev"), ValueError, "metric"),
    ("distances X 1-D", lambda: crestcore.pairwise_distances(X0[0].copy()), ValueError, "X"),
    ("distances d mismatch", lambda: crestcore.pairwise_distances(X0, X0[:, :2].copy()), ValueError, r"X.*Y|Y.*X"),
]


@pytest.mark.parametrize("call, exc, name", [pytest.param(*c[1:], id=c[0]) for c in HELPER_BAD])
def test_helpers_reject(call, exc, name):
    pattern = name if "|" in name else _word(name)
    with pytest.raises(exc, match=pattern):
        call()


def test_empty_selection_is_documented_zero():
    assert float(crestcore.facility_objective(S0, np.array([], dtype=np.int64))) == 0.0
    np.testing.assert_allclose(np.asarray(crestcore.marginal_gains(S0, np.array([], dtype=np.int64))),
                               S0.sum(axis=0), rtol=1e-12)


# ================================================================================================
# inputs are never mutated; read-only arrays are accepted
# ================================================================================================


def _readonly(a: np.ndarray) -> np.ndarray:
    b = np.array(a, copy=True)
    b.flags.writeable = False
    return b


PUBLIC_CALLS = {
    "facility_location": lambda X, L, S, sel, pool: crestcore.facility_location(X, 5, labels=L),
    "facility_location stochastic": lambda X, L, S, sel, pool: crestcore.facility_location(
        X, 5, optimizer="stochastic", rng=1),
    "facility_location matrix-free": lambda X, L, S, sel, pool: crestcore.facility_location(
        X, 5, labels=L, max_dense_bytes=64),
    "facility_location precomputed": lambda X, L, S, sel, pool: crestcore.facility_location(
        S, 5, labels=L, metric="precomputed", kernel=None),
    "minibatch_coresets": lambda X, L, S, sel, pool: crestcore.minibatch_coresets(
        X, L, m=4, r=10, P=2, rng=0, pool=pool),
    "minibatch_coresets ceil": lambda X, L, S, sel, pool: crestcore.minibatch_coresets(
        X, L, m=4, r=10, P=2, rng=0, pool=pool, class_budget="ceil", optimizer="stochastic"),
    "facility_objective": lambda X, L, S, sel, pool: crestcore.facility_objective(S, sel),
    "marginal_gains": lambda X, L, S, sel, pool: crestcore.marginal_gains(S, sel),
    "pairwise_distances": lambda X, L, S, sel, pool: crestcore.pairwise_distances(X, X, metric="cosine"),
    "pairwise_distances self": lambda X, L, S, sel, pool: crestcore.pairwise_distances(X),
    "draw_subsets": lambda X, L, S, sel, pool: crestcore.draw_subsets(L, pool, 6, 3, np.random.default_rng(0)),
}


def _fields(result):
    if isinstance(result, (crestcore.Selection, crestcore.Coresets)):
        return [np.asarray(v) for v in vars(result).values()]
    return [np.asarray(result)]


@pytest.mark.parametrize("call", list(PUBLIC_CALLS.values()), ids=list(PUBLIC_CALLS))
def test_read_only_inputs_are_accepted_and_never_mutated(call):
    inputs = dict(X=X0, L=L0, S=S0, sel=SEL, pool=np.arange(2, 18, dtype=np.int64))
    ro = {k: _readonly(v) for k, v in inputs.items()}
    before = {k: v.copy() for k, v in ro.items()}
    out_ro = call(**ro)
    out_rw = call(**{k: v.copy() for k, v in inputs.items()})
    for k in ro:
        np.testing.assert_array_equal(ro[k], before[k], err_msg=f"{k} was mutated")
    for a, b in zip(_fields(out_ro), _fields(out_rw)):
        np.testing.assert_array_equal(a, b)


def test_torch_inputs_are_never_mutated():
    torch = _torch()
    X, L = torch.asarray(X0.copy()), torch.asarray(L0.copy())
    crestcore.facility_location(X, 5, labels=L, max_dense_bytes=64)
    crestcore.minibatch_coresets(X, L, m=4, r=10, P=2, rng=0)
    np.testing.assert_array_equal(X.numpy(), X0)
    np.testing.assert_array_equal(L.numpy(), L0)


# ================================================================================================
# layouts: non-contiguous and transposed arrays give the contiguous answer
# ================================================================================================


def _layouts(xp):
    """(name, X as laid out, labels as laid out) for X0 / L0, in library ``xp``."""
    wide = np.zeros((N, 2 * D))
    wide[:, ::2] = X0
    tall = np.zeros((2 * N,), dtype=np.int64)
    tall[::2] = L0
    return [
        ("strided columns", xp.asarray(wide)[:, ::2], xp.asarray(L0)),
        ("fortran order", xp.asarray(X0.T.copy()).T, xp.asarray(L0)),
        ("strided labels", xp.asarray(X0), xp.asarray(tall)[::2]),
    ]


def test_non_contiguous_inputs_give_the_contiguous_answer(xp):
    X, L = xp.asarray(X0), xp.asarray(L0)
    base_fl = crestcore.facility_location(X, 6, labels=L)
    base_fl_free = crestcore.facility_location(X, 6, max_dense_bytes=64)
    base_mb = crestcore.minibatch_coresets(X, L, m=4, r=12, P=2, rng=3)
    for name, Xl, Ll in _layouts(xp):
        fl = crestcore.facility_location(Xl, 6, labels=Ll)
        np.testing.assert_array_equal(xp.to_numpy(fl.indices), xp.to_numpy(base_fl.indices), err_msg=name)
        np.testing.assert_array_equal(xp.to_numpy(fl.weights), xp.to_numpy(base_fl.weights), err_msg=name)
        np.testing.assert_allclose(xp.to_numpy(fl.gains), xp.to_numpy(base_fl.gains), rtol=1e-10, err_msg=name)
        free = crestcore.facility_location(Xl, 6, max_dense_bytes=64)
        np.testing.assert_array_equal(xp.to_numpy(free.indices), xp.to_numpy(base_fl_free.indices), err_msg=name)
        mb = crestcore.minibatch_coresets(Xl, Ll, m=4, r=12, P=2, rng=3)
        np.testing.assert_array_equal(xp.to_numpy(mb.indices), xp.to_numpy(base_mb.indices), err_msg=name)
        np.testing.assert_array_equal(xp.to_numpy(mb.weights), xp.to_numpy(base_mb.weights), err_msg=name)


def test_reversed_rows_numpy():
    """Negative strides: the answer for X[::-1] is the contiguous answer for the same rows."""
    Xr = X0[::-1]
    a = crestcore.facility_location(Xr, 5, labels=L0[::-1])
    b = crestcore.facility_location(np.ascontiguousarray(Xr), 5, labels=np.ascontiguousarray(L0[::-1]))
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.weights, b.weights)


# ================================================================================================
# documented answers for odd but valid input
# ================================================================================================


def test_a_single_class_equals_no_labels():
    a = crestcore.facility_location(X0, 5, labels=np.full(N, 3))
    b = crestcore.facility_location(X0, 5)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert float(a.objective) == pytest.approx(float(b.objective), rel=1e-12)


def test_single_point():
    sel = crestcore.facility_location(X0[:1], 1)
    np.testing.assert_array_equal(sel.indices, [0])
    np.testing.assert_array_equal(sel.weights, [1])
    out = crestcore.minibatch_coresets(X0[:1], None, m=1, r=1, P=2, rng=0)
    np.testing.assert_array_equal(out.indices, [[0], [0]])


def test_numpy_integer_k_is_accepted():
    a = crestcore.facility_location(X0, np.int64(4))
    b = crestcore.facility_location(X0, 4)
    np.testing.assert_array_equal(a.indices, b.indices)


def test_kernel_none_means_the_default():
    """Documented: kernel=None is the default: max-minus for features, no kernel for precomputed."""
    sel = crestcore.facility_location(S0, 2, metric="precomputed")
    assert np.asarray(sel.indices).shape == (2,)
    a = crestcore.facility_location(X0, 2)
    b = crestcore.facility_location(X0, 2, kernel="max-minus")
    np.testing.assert_array_equal(a.indices, b.indices)
    assert float(a.objective) == float(b.objective)
    with pytest.raises(ValueError, match="kernel"):
        crestcore.facility_location(S0, 2, metric="precomputed", kernel="max-minus")


def test_uint64_labels_beyond_int64_are_refused_not_reordered():
    """Class positions are int64: a uint64 label above 2^63 - 1 would wrap negative and put its class
    before the others (the per-class picks come in ascending label order); it is refused naming the
    labels. uint64 labels within range are fine."""
    import crestcore

    X = np.array([[0.0], [1.0], [10.0], [11.0]])
    big = np.array([1, 1, 2**63 + 1, 2**63 + 1], dtype=np.uint64)
    with pytest.raises(ValueError, match="labels holds values above 2\\^63"):
        crestcore.facility_location(X, 2, labels=big)
    with pytest.raises(ValueError, match="labels holds values above 2\\^63"):
        crestcore.minibatch_coresets(X, big, m=2, r=4, P=1, rng=0)
    ok = crestcore.facility_location(X, 2, labels=np.array([1, 1, 2**62, 2**62], dtype=np.uint64))
    assert ok.indices.tolist() == [0, 2]


def test_a_missing_rng_says_a_seed_is_needed():
    """Review 90: rng=None (no seed) said only "rng must be an int seed or a numpy.random.Generator, got None";
    nothing draws from a global RNG, so the message says to pass a seed."""
    with pytest.raises(TypeError, match=r"got None \(this call draws random numbers.*pass a seed\)"):
        crestcore.minibatch_coresets(np.zeros((20, 2)), np.arange(20) % 2, m=2, r=10, P=1)
    with pytest.raises(TypeError, match="got True$"):  # (a bool is no seed, and says only that)
        crestcore.minibatch_coresets(np.zeros((20, 2)), np.arange(20) % 2, m=2, r=10, P=1, rng=True)


def test_big_endian_inputs_give_native_results_equal_to_the_native_inputs():
    """Every floating result of a big-endian float64 input is native float64 and equals the native input's
    (review 122: the weights and gains came back big-endian, the objective native, and backend="numba"
    big-endian throughout; array-API dtypes carry no byte order)."""
    from crestcore import (cross_entropy, facility_location, facility_objective, last_layer_gradients,
                           marginal_gains, minibatch_coresets, pairwise_distances, softmax)
    from crestcore.baselines import craig, glister, gradmatch, nonneg_ridge

    other = ">" if np.little_endian else "<"
    rng = np.random.default_rng(0)
    X = rng.normal(size=(24, 3))
    y = np.arange(24) % 3
    S = np.exp(-pairwise_distances(X))
    calls = [
        *(lambda A, b=b: facility_location(A, 4, backend=b) for b in ("auto", "numba", "reference")),
        lambda A: facility_location(A, 4, labels=y),
        lambda A: minibatch_coresets(A, y, m=3, r=12, P=2, rng=0),
        lambda A: minibatch_coresets(A, y, m=3, r=12, P=2, rng=0, backend="numba"),
        lambda A: gradmatch(A, 4), lambda A: craig(A, y, 4), lambda A: glister(A, A[:6], y[:6], 4),
        lambda A: nonneg_ridge(A[:4], A[5]), lambda A: pairwise_distances(A),
        lambda A: softmax(A), lambda A: cross_entropy(A, y), lambda A: last_layer_gradients(A, y),
    ]
    similarity = [lambda A: facility_objective(A, np.array([0, 3])), lambda A: marginal_gains(A, np.array([0, 3])),
                  lambda A: facility_location(A, 4, metric="precomputed")]
    for data, fns in ((X, calls), (S, similarity)):
        swapped = data.astype(np.dtype(np.float64).newbyteorder(other))
        for fn in fns:
            got, want = fn(swapped), fn(data)
            fields = ([getattr(got, f.name) for f in dataclasses.fields(got)] if dataclasses.is_dataclass(got)
                      else [got])
            wants = ([getattr(want, f.name) for f in dataclasses.fields(want)] if dataclasses.is_dataclass(want)
                     else [want])
            for g, w in zip(fields, wants):
                if isinstance(g, np.ndarray) and g.dtype.kind == "f":
                    assert g.dtype == np.float64 and g.dtype.isnative, (fn, g.dtype)
                    np.testing.assert_array_equal(g, w)


def test_errors_name_the_argument_and_an_empty_batch_of_lists_is_a_batch():
    """Review 122: a torch.Generator as rng read "must be a numpy.random.Generator, got Generator"; an empty
    batch given as lists ([] is float64 to NumPy) was refused as non-integer indices; string losses and a
    complex anchor loss failed inside NumPy or float() without naming the argument."""
    from crestcore import DropConfig, QuadraticConfig, draw_subsets, drop_init, drop_record, quadratic_anchor, \
        quadratic_init

    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"rng must be an int seed or a numpy\.random\.Generator, got torch\.Generator"):
        draw_subsets(np.arange(10) % 2, np.arange(10), 4, 2, torch.Generator())
    state = drop_init(6, DropConfig())
    state = drop_record(state, [], [], step=1)  # an empty batch, as lists
    assert state.active.all()
    state = drop_record(state, [0, 1], [0.1, 0.2], step=2)
    with pytest.raises(TypeError, match="losses must hold real numbers"):
        drop_record(state, [0], ["a"], step=3)
    with pytest.raises(TypeError, match="losses must hold real numbers"):
        drop_record(state, [0], [1 + 2j], step=3)
    quad = quadratic_init(np.zeros(3))
    for bad in (1 + 2j, np.complex128(1.0), torch.tensor(1 + 0j)):
        with pytest.raises(TypeError, match="loss must be a real number"):
            quadratic_anchor(quad, bad, QuadraticConfig())


def test_the_finiteness_pass_reads_strided_and_read_only_host_arrays_in_blocks(monkeypatch):
    """Review 129: a column slice of features (and a read-only array) went to a NumPy max and min, two slow
    passes over a strided view (0.28 s at 10^6 x 64); the host kernel reads contiguous copies of blocks of rows.
    The same max|X|, and a NaN or an infinity anywhere is refused."""
    import array_api_compat

    from crestcore._validation import check_float_matrix
    from crestcore.backends import get_host_kernel

    real = get_host_kernel("finite_abs_max")  # loaded: the kernel's path
    from crestcore.backends import numba as nbk

    calls = []
    monkeypatch.setattr(nbk, "finite_abs_max", lambda A: calls.append(A.shape) or real(A))
    xp = array_api_compat.array_namespace(np.zeros(1))
    rng = np.random.default_rng(0)
    wide = rng.standard_normal((70_000, 12))
    for X in (wide[:, ::3], wide[::2], wide.astype(np.float32)[:, 1:5]):
        want = float(np.abs(X).max())
        calls.clear()
        assert check_float_matrix(xp, X, "X") == want
        assert len(calls) >= 2 and sum(c[0] for c in calls) == X.shape[0]  # blocks of rows, each once
        ro = X.copy()
        ro.flags.writeable = False
        assert check_float_matrix(xp, ro, "X") == want
        for bad in (np.nan, -np.inf):
            Y = X.copy() if X.flags.c_contiguous else X  # (a view of wide: written and put back)
            keep = Y[-1, -1]
            Y[-1, -1] = bad
            try:
                with pytest.raises(ValueError, match="X contains NaN or infinite values"):
                    check_float_matrix(xp, Y, "X")
            finally:
                Y[-1, -1] = keep


def test_the_public_label_and_weight_checks_refuse_what_they_used_to_cast():
    """Review 155: crestcore.validation.int64_labels, documented as a boundary check, cast float labels (0.7 and
    1.9 to 0 and 1, NaN to -2^63), booleans, strings and 2-D arrays, and failed on a list with an
    AttributeError; host_weights parsed strings, took booleans and cut complex values to their real parts;
    stored_batch read a string "False" as True."""
    from crestcore.validation import host_weights, int64_labels, stored_batch

    assert int64_labels([2, 0]).tolist() == [2, 0] and int64_labels(np.array([3, 1], np.uint8)).dtype == np.int64
    for bad in (np.array([0.7, 1.9]), np.array([np.nan, 1.0]), np.array([True, False]), np.array(["3", "1"])):
        with pytest.raises(TypeError, match="y must hold integer class indices"):
            int64_labels(bad, "y")
    with pytest.raises(ValueError, match="y must be 1-D"):
        int64_labels(np.array([[1, 2]]), "y")
    assert host_weights([1, 0.5], 2).tolist() == [1.0, 0.5]
    for bad in (["1.5", "2"], [True, False], np.array([1 + 2j, 3])):
        with pytest.raises(TypeError, match="w must be real numbers"):
            host_weights(bad, 2, "w")
    with pytest.raises(ValueError, match="ckpt: a batch's reselected must be a boolean, got 'False'"):
        stored_batch({"indices": [1, 2], "weights": [1.0, 2.0], "reselected": "False"}, 3, "ckpt")
    assert stored_batch({"indices": [1, 2], "weights": [1.0, 2.0], "reselected": np.bool_(False)}, 3, "c")[2] is False
    for ok in (1, np.array(True), np.int8(0)):  # (review 159: 0/1 and 0-d arrays, as before)
        assert stored_batch({"indices": [1], "weights": [1.0], "reselected": ok}, 3, "c")[2] is bool(ok)


def test_host_weights_take_bfloat16():
    """Review 159: the dtype check of review 155 refused ml_dtypes' (and so JAX's) bfloat16 weights."""
    from crestcore.validation import host_weights

    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert host_weights(np.array([1.5, 2.0], dtype=ml_dtypes.bfloat16), 2).tolist() == [1.5, 2.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_curvature_norm_neither_underflows_nor_overflows_where_the_norm_is_representable(dtype):
    """Review 155: curvature_norm squared in the working dtype, so a float32 curvature near 1e-24 had norm 0
    (the check interval then went to its cap) and one near 1e19 was refused as overflowing float32; the
    norm is taken of h scaled by a power of two, bit for bit the unscaled one in between."""
    from crestcore import quadratic_init, quadratic_update
    from crestcore.quadratic import curvature_norm

    tiny, huge = (1e-24, 1e19) if dtype == np.float32 else (1e-170, 1e155)
    for v in (tiny, huge, 0.75):
        state = quadratic_update(quadratic_init(np.zeros(10, dtype=dtype)), zhz=np.full(10, v, dtype=dtype))
        got = curvature_norm(state)
        want = float(np.sqrt(10.0)) * float(dtype(v))
        assert got == pytest.approx(want, rel=1e-6), (v, got)
        if v == 0.75:  # in range: the unscaled float32/64 sum, bit for bit
            h = np.full(10, v, dtype=dtype)
            assert got == float(np.sqrt(np.sum(h * h)))


def test_weights_and_stored_flags_name_themselves_on_inputs_numpy_cannot_hold():
    """Review 160: a list of Decimals failed with to_numpy's bare "cannot copy a list to NumPy", an object
    array of floats was refused, and a batch's reselected of None gave a bare TypeError."""
    from decimal import Decimal
    from fractions import Fraction

    from crestcore._validation import host_weights, stored_batch

    assert host_weights(np.array([1.0, 0.5], dtype=object), 2).tolist() == [1.0, 0.5]
    assert host_weights(np.array([Fraction(1, 2), 1], dtype=object), 2).tolist() == [0.5, 1.0]
    assert host_weights([Fraction(1, 2), Fraction(1)], 2).tolist() == [0.5, 1.0]  # (review 164: a list too)
    with pytest.raises(TypeError, match="w must be real numbers, got dtype object"):
        host_weights([Decimal("1"), Decimal("0.5")], 2, name="w")
    with pytest.raises(TypeError, match="w must be real numbers, got dtype object"):
        host_weights(np.array([True, 1.0], dtype=object), 2, name="w")
    for flag in (None, object()):
        with pytest.raises(ValueError, match="ckpt: a batch's reselected must be a boolean"):
            stored_batch({"indices": [1], "weights": [1.0], "reselected": flag}, 3, "ckpt")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_all_finite_answers_as_the_entrywise_test_does(dtype):
    """all_finite (one sum, the entrywise test only when the sum is not finite; review 171) gives the answer of
    xp.all(xp.isfinite(x)) for NaN, +-inf, both infinities (their sum is NaN), sums that overflow on finite
    entries, and empty arrays, on NumPy and torch, without NumPy's overflow warning."""
    import warnings

    from crestcore.validation import all_finite

    big = float(np.finfo(dtype).max)
    cases = [np.ones((3, 4)), np.zeros((0, 5)), np.array([[1.0, np.nan]]), np.array([np.inf, 1.0]),
             np.array([-np.inf, 2.0]), np.array([np.inf, -np.inf]), np.array([big, big, -1.0]),
             np.array([[big, big], [big, np.nan]]), np.array(3.0), np.array(np.inf)]
    libs = [np]
    try:
        import torch

        libs.append(torch)
    except ImportError:  # pragma: no cover
        pass
    for case in cases:
        a = case.astype(dtype)
        expected = bool(np.all(np.isfinite(a)))
        for xp in libs:
            x = a if xp is np else xp.from_numpy(a)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert all_finite(xp, x) is expected, (xp.__name__, dtype, case)


def test_all_finite_takes_narrow_floats_entrywise():
    """Review 174: all_finite summed float8 logits, for which torch has no CPU sum (NotImplementedError where the
    entrywise test answered); half and narrower floats take the entrywise test."""
    torch = pytest.importorskip("torch")
    from crestcore.validation import all_finite

    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).to(torch.float8_e5m2)
    assert all_finite(torch, x) is True
    y = torch.tensor([1.0, float("nan")]).to(torch.float8_e5m2)
    assert all_finite(torch, y) is False
