"""Tests for crestcore/features.py: last-layer gradient features and the cross-entropy they differentiate.

Every closed form is checked against torch autograd (float64), the ground truth for "the gradient of
the cross-entropy loss". Self-contained: no conftest fixtures.
"""

from __future__ import annotations

import array_api_strict as xs
import numpy as np
import pytest
try:
    import torch
except ImportError:  # the lower-bounds run (tests/conftest.py skips the tests that use it)
    torch = None
from hypothesis import given, settings
from hypothesis import strategies as st

from crestcore import cross_entropy, last_layer_gradients, softmax

SETTINGS = settings(deadline=None, max_examples=30)


def _problem(seed: int, n: int, C: int, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(n, C))
    labels = rng.integers(0, C, size=n)
    return logits, labels


# --------------------------------------------------------------------------------------------
# against autograd
# --------------------------------------------------------------------------------------------
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 20), C=st.integers(2, 12),
       scale=st.sampled_from([0.1, 1.0, 5.0, 30.0]))
def test_logit_gradient_equals_autograd(seed, n, C, scale):
    logits, labels = _problem(seed, n, C, scale)
    z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(labels)
    # the gradient of the *summed* loss w.r.t. the logits: row i is example i's own gradient
    torch.nn.functional.cross_entropy(z, y, reduction="sum").backward()
    expected = z.grad.numpy()
    got = last_layer_gradients(logits, labels)
    assert got.shape == (n, C)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    # properties of softmax - onehot: rows sum to 0, the true class is in (-1, 0], others in [0, 1)
    np.testing.assert_allclose(got.sum(axis=1), 0.0, atol=1e-12)
    assert np.all(got[np.arange(n), labels] <= 0) and np.all(got[np.arange(n), labels] > -1 - 1e-15)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8), C=st.integers(2, 6), h=st.integers(1, 7))
def test_embedding_gradient_equals_per_example_autograd_of_last_linear_weight(seed, n, C, h):
    rng = np.random.default_rng(seed)
    lin = torch.nn.Linear(h, C, bias=True).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(rng.normal(size=(C, h))))
        lin.bias.copy_(torch.tensor(rng.normal(size=C)))
    emb = torch.tensor(rng.normal(size=(n, h)))
    y = torch.tensor(rng.integers(0, C, size=n))
    expected = np.empty((n, C * h))
    for i in range(n):  # per-example gradient of the loss w.r.t. the weight (C, h), row-major
        lin.zero_grad()
        torch.nn.functional.cross_entropy(lin(emb[i : i + 1]), y[i : i + 1]).backward()
        expected[i] = lin.weight.grad.numpy().reshape(-1)
    with torch.no_grad():
        logits = lin(emb).numpy()
    got = last_layer_gradients(logits, y.numpy(), embeddings=emb.numpy())
    assert got.shape == (n, C * h)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_embedding_gradient_in_torch_matches_numpy():
    logits, labels = _problem(3, 7, 4)
    emb = np.random.default_rng(4).normal(size=(7, 5))
    ref = last_layer_gradients(logits, labels, embeddings=emb)
    got = last_layer_gradients(torch.tensor(logits), torch.tensor(labels), embeddings=torch.tensor(emb))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-13, atol=1e-15)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 20), C=st.integers(2, 12))
def test_from_probabilities_equals_logits_path(seed, n, C):
    logits, labels = _problem(seed, n, C)
    probs = softmax(logits)
    np.testing.assert_allclose(
        last_layer_gradients(probs, labels, from_probabilities=True),
        last_layer_gradients(logits, labels), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        cross_entropy(probs, labels, from_probabilities=True),
        cross_entropy(logits, labels), rtol=1e-9, atol=1e-12)


def test_cross_entropy_of_zero_probability_is_large_and_finite():
    p = np.array([[1.0, 0.0], [0.5, 0.5]])
    ce = cross_entropy(p, np.array([1, 0]), from_probabilities=True)
    assert np.all(np.isfinite(ce)) and ce[0] > 700  # -log(tiny)
    assert ce[1] == pytest.approx(np.log(2.0))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 20), C=st.integers(2, 12),
       scale=st.sampled_from([0.01, 1.0, 10.0, 100.0]))
def test_cross_entropy_equals_torch(seed, n, C, scale):
    logits, labels = _problem(seed, n, C, scale)
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels),
                                                 reduction="none").numpy()
    np.testing.assert_allclose(cross_entropy(logits, labels), expected, rtol=1e-12, atol=1e-12)


def test_softmax_rows_sum_to_one_and_shift_invariant():
    logits, _ = _problem(0, 6, 5)
    p = softmax(logits)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-14)
    np.testing.assert_allclose(softmax(logits + 1234.5), p, rtol=1e-10)


# --------------------------------------------------------------------------------------------
# numerical stability
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_logits_are_finite_and_exact(dtype):
    logits = np.array([[1e4, -1e4, 0.0], [0.0, 1e4, 1e4], [-1e4, -1e4, -1e4]], dtype=dtype)
    labels = np.array([1, 0, 2])
    g = last_layer_gradients(logits, labels)
    ce = cross_entropy(logits, labels)
    assert np.all(np.isfinite(g)) and np.all(np.isfinite(ce))
    np.testing.assert_allclose(g, [[1, -1, 0], [-1, 0.5, 0.5], [1 / 3, 1 / 3, -2 / 3]], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ce, [2e4, 1e4 + np.log(2.0), np.log(3.0)], rtol=1e-6)
    emb = np.ones((3, 2), dtype=dtype) * 1e3
    assert np.all(np.isfinite(last_layer_gradients(logits, labels, embeddings=emb)))


def test_float32_cross_entropy_with_large_offset_keeps_precision():
    # logits = 1e4 + O(1) in float32: the loss is O(1) and must not lose digits to cancellation against
    # 1e4 (log(sum exp(z - max)) - (z_y - max) is exact to float32 rounding; torch gets 2.5e-7 here)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=50)
    z32 = (rng.normal(size=(50, 5)) + 1e4).astype(np.float32)
    exact = cross_entropy(z32.astype(np.float64), labels)  # the same (rounded) inputs, float64 maths
    ref_torch = torch.nn.functional.cross_entropy(torch.tensor(z32), torch.tensor(labels),
                                                  reduction="none").numpy()
    np.testing.assert_allclose(ref_torch, exact, atol=1e-5)  # what float32 can do
    np.testing.assert_allclose(cross_entropy(z32, labels), exact, atol=1e-5)


# --------------------------------------------------------------------------------------------
# namespace and dtype in = namespace and dtype out
# --------------------------------------------------------------------------------------------
def _call(func: str, logits, labels, embeddings, probs):
    """The case ``func`` of the namespace test: a public function of crestcore/features.py on these inputs."""
    return {
        "grad": lambda: last_layer_gradients(logits, labels),
        "grad_emb": lambda: last_layer_gradients(logits, labels, embeddings=embeddings),
        "grad_prob": lambda: last_layer_gradients(probs, labels, from_probabilities=True),
        "ce": lambda: cross_entropy(logits, labels),
        "ce_prob": lambda: cross_entropy(probs, labels, from_probabilities=True),
        "softmax": lambda: softmax(logits),
    }[func]()


@pytest.mark.parametrize("lib", ["numpy", "torch", "array_api_strict"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("func", ["grad", "grad_emb", "grad_prob", "ce", "ce_prob", "softmax"])
def test_result_in_input_namespace_and_dtype(lib, dtype, func):
    logits64, labels = _problem(7, 5, 4)
    emb64 = np.random.default_rng(8).normal(size=(5, 3))
    probs64 = softmax(logits64)
    ref = _call(func, logits64, labels, emb64, probs64)

    def conv(a):
        a = a.astype(dtype) if a.dtype.kind == "f" else a
        if lib == "torch":
            return torch.asarray(a)
        if lib == "array_api_strict":
            return xs.asarray(a)
        return a

    out = _call(func, conv(logits64), conv(labels), conv(emb64), conv(probs64))
    if lib == "torch":
        assert isinstance(out, torch.Tensor) and str(out.dtype) == f"torch.{dtype}"
        host = out.numpy()
    elif lib == "array_api_strict":
        assert type(out).__module__.startswith("array_api_strict")
        assert out.dtype == getattr(xs, dtype)
        host = np.from_dlpack(out)
    else:
        assert isinstance(out, np.ndarray) and out.dtype == np.dtype(dtype)
        host = out
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(host, ref, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------
# bad input names the argument
# --------------------------------------------------------------------------------------------
GOOD_Z = np.zeros((3, 4))
GOOD_Y = np.array([0, 1, 3])


@pytest.mark.parametrize("func", [last_layer_gradients, cross_entropy])
@pytest.mark.parametrize("logits, labels, exc, match", [
    (np.array([[0.0, np.nan, 1.0, 2.0], [0, 0, 0, 0], [0, 0, 0, 0]]), GOOD_Y, ValueError, "logits"),
    (np.array([[0.0, np.inf, 1.0, 2.0], [0, 0, 0, 0], [0, 0, 0, 0]]), GOOD_Y, ValueError, "logits"),
    (GOOD_Z, np.array([0, 1, 4]), ValueError, "labels"),  # out of range (C = 4)
    (GOOD_Z, np.array([0, -1, 2]), ValueError, "labels"),  # negative
    (GOOD_Z, np.array([0.0, 1.0, 2.0]), TypeError, "labels"),  # float labels
    (GOOD_Z, np.array([0, 1]), ValueError, "labels"),  # length mismatch
    (GOOD_Z, np.array([[0, 1, 2]]), ValueError, "labels"),  # 2-D labels
    (np.zeros(4), np.array([0]), ValueError, "logits"),  # 1-D logits
    (np.zeros((0, 4)), np.zeros(0, dtype=np.int64), ValueError, "logits"),  # empty
    (np.zeros((3, 4), dtype=np.int64), GOOD_Y, TypeError, "logits"),  # integer logits
    (GOOD_Z, [0, 1, 3], TypeError, "labels"),  # not an array
    *([(GOOD_Z, torch.tensor([0, 1, 3]), TypeError, "different libraries")]  # mixed namespaces
      if torch is not None else []),
])
def test_bad_inputs_name_the_argument(func, logits, labels, exc, match):
    with pytest.raises(exc, match=match):
        func(logits, labels)


@pytest.mark.parametrize("emb, exc, match", [
    (np.zeros((2, 5)), ValueError, "embeddings"),  # row mismatch
    (np.zeros(3), ValueError, "embeddings"),  # 1-D
    (np.zeros((3, 5), dtype=np.float32), TypeError, "embeddings"),  # dtype differs from logits
    (np.full((3, 5), np.nan), ValueError, "embeddings"),
    (np.zeros((3, 5), dtype=np.int64), TypeError, "embeddings"),
])
def test_bad_embeddings(emb, exc, match):
    with pytest.raises(exc, match=match):
        last_layer_gradients(GOOD_Z, GOOD_Y, embeddings=emb)


@pytest.mark.parametrize("probs", [
    np.array([[0.5, 0.6, 0.0, 0.0]] * 3),  # rows do not sum to 1
    np.array([[1.5, -0.5, 0.0, 0.0]] * 3),  # negative entry
])
def test_from_probabilities_rejects_non_probabilities(probs):
    with pytest.raises(ValueError, match="probabilities"):
        last_layer_gradients(probs, GOOD_Y, from_probabilities=True)


def test_inputs_not_mutated_and_read_only_ok():
    logits, labels = _problem(1, 6, 3)
    emb = np.random.default_rng(2).normal(size=(6, 2))
    copies = [a.copy() for a in (logits, labels, emb)]
    for a in (logits, labels, emb):
        a.setflags(write=False)
    last_layer_gradients(logits, labels, embeddings=emb)
    cross_entropy(logits, labels)
    for a, c in zip((logits, labels, emb), copies):
        np.testing.assert_array_equal(a, c)


def test_non_contiguous_input():
    logits, labels = _problem(5, 6, 8)
    view = logits[:, ::2]
    lab = labels % 4
    np.testing.assert_allclose(last_layer_gradients(view, lab),
                               last_layer_gradients(np.ascontiguousarray(view), lab), rtol=1e-15)


def test_softmax_validates_its_input():
    for bad, exc in (([[np.nan, 1.0]], ValueError), ([[1, 2]], TypeError), ([[True, False]], TypeError),
                     (3.0, ValueError), (np.zeros((0, 3)), ValueError)):
        with pytest.raises(exc, match="logits"):
            softmax(np.asarray(bad))


def test_probabilities_are_checked_by_cross_entropy_too_with_a_dtype_tolerance():
    """cross_entropy(from_probabilities=True) accepted rows that are no probabilities (and returned -0.69 for
    a row summing to 2); last_layer_gradients refused bfloat16 softmax rows, whose sums miss 1 by a few ulps."""
    y = np.array([0, 1])
    for bad in ([[2.0, 0.0], [0.5, 0.5]], [[1.5, -0.5], [0.5, 0.5]]):
        with pytest.raises(ValueError, match="probabilities"):
            cross_entropy(np.array(bad), y, from_probabilities=True)
    with pytest.raises(TypeError, match="from_probabilities"):
        cross_entropy(np.array([[0.5, 0.5]]), np.array([0]), from_probabilities=1)
    z = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 4
    p = softmax(z)
    assert float((p.float().sum(1) - 1).abs().max()) > 1e-3  # the case the fixed tolerance refused
    yt = torch.arange(64) % 10
    g = last_layer_gradients(p, yt, from_probabilities=True)
    assert g.dtype == torch.bfloat16
    assert torch.isfinite(cross_entropy(p, yt, from_probabilities=True)).all()


@pytest.mark.parametrize("C", [10, 1000, 32000])
def test_the_probability_check_does_not_widen_with_the_number_of_classes(C):
    """Review 102: the tolerance was ``max(1e-3, C eps)``, 7.8 for bfloat16 at 1,000 classes, so rows summing to
    5 were taken as probabilities and the "gradients" summed to 4 per row, not 0. The rows are now summed in
    float32 against ``max(1e-3, 2 eps)``: real half-precision softmax rows of any width pass, wrong ones do
    not, in bfloat16, float16 and float32 alike."""
    g = torch.Generator().manual_seed(C)
    z = 3.0 * torch.randn(32, C, generator=g)
    y = torch.arange(32) % C
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for p in (torch.softmax(z, 1).to(dtype), torch.softmax(z.to(dtype), 1)):
            grads = last_layer_gradients(p, y, from_probabilities=True)
            assert grads.dtype == dtype
            assert float(grads.float().sum(1).abs().max()) < 0.02  # a gradient's row sums to 0
        for wrong in (5.0 * torch.softmax(z, 1), torch.softmax(z, 1) + 0.05 / C):
            with pytest.raises(ValueError, match="probabilities"):
                last_layer_gradients(wrong.to(dtype), y, from_probabilities=True)
            with pytest.raises(ValueError, match="probabilities"):
                cross_entropy(wrong.to(dtype), y, from_probabilities=True)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "uint64"])
def test_torch_unsigned_labels_give_the_int64_answer(dtype):
    """Review 102: torch's uint16/32/64 have no ordering comparison, promotion or indexing, so the label check
    of cross_entropy, last_layer_gradients and glister raised torch's bare NotImplementedError, while the
    selections took the same labels. They are now used as int64; a uint64 label past int64's range is still
    refused as out of range."""
    from crestcore.baselines import glister

    dt = getattr(torch, dtype)
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y64 = torch.tensor([0, 1, 2, 1, 0, 2])
    y = y64.to(dt)
    assert torch.equal(cross_entropy(z, y), cross_entropy(z, y64))
    assert torch.equal(last_layer_gradients(z, y), last_layer_gradients(z, y64))
    a, b = glister(z, z, y, 2), glister(z, z, y64, 2)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    if dtype == "uint64":
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
            cross_entropy(z, torch.tensor([0, 1, 2**63 + 5, 1, 0, 2], dtype=dt))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype, big", [(np.float16, 40000.0), (np.float32, 2e38), (np.float64, 1e308)])
def test_cross_entropy_of_finite_logits_spread_past_the_dtype_is_zero_or_inf_never_nan(dtype, big):
    """Review 33: the other class shifts to -inf (finite logits further apart than the dtype's largest
    number), and summing z * onehot computed -inf * 0 = NaN where the loss is 0; the controller would have
    called such a step diverged. torch agrees: 0 for the winning label, inf for the losing one."""
    z = np.array([[big, -big], [-big, big]], dtype=dtype)
    y = np.array([0, 0])
    loss = cross_entropy(z, y)
    assert loss.dtype == dtype and loss[0] == 0 and np.isposinf(loss[1])
    zt = torch.from_numpy(z)
    lt = cross_entropy(zt, torch.from_numpy(y))
    assert lt[0].item() == 0 and lt[1].item() == float("inf")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_of_a_confident_example_keeps_its_precision(dtype):
    """Review 83: log(1 + s) rounded 1 + s first, so a confident example's loss was a multiple of the
    dtype's epsilon, and 0 below it (float32: every loss under 6e-8), while its gradient stayed exact; the
    trust check then compared zero losses with non-zero predictions. log1p keeps the dtype's precision."""
    logits = np.array([[18.0, 0.0, -1.0], [16.0, 0.0, 0.0], [40.0, 1.0, 2.0], [3.0, 3.0, 0.0]])
    labels = np.array([0, 0, 0, 1])
    exact = np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(4), labels]  # well within float64 here
    exact[:3] = np.log1p(np.exp(logits[:3, 1:] - logits[:3, :1]).sum(axis=1))
    got = cross_entropy(logits.astype(dtype), labels)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, exact, rtol=4 * np.finfo(dtype).eps)


def test_cross_entropy_is_differentiated_as_a_log_sum_exp_where_the_top_logit_is_tied():
    """Review 134: the top entry's exp(0) entered the log-sum-exp as a constant 1, so torch's gradient was wrong
    wherever the largest logit is tied (at a zero-initialised last layer: [0.11, -0.56, 0.44] for
    softmax - onehot = [1/3, -2/3, 1/3]); the values were right."""
    torch = pytest.importorskip("torch")
    for z0 in ([[0.0, 0.0, 0.0]], [[2.0, 2.0, 0.0], [1.0, 3.0, 3.0]], [[0.5, -1.0, 4.0]]):
        z = torch.tensor(z0, dtype=torch.float64, requires_grad=True)
        y = torch.tensor([1] * len(z0))
        cross_entropy(z, y).sum().backward()
        want = torch.softmax(z.detach(), dim=1) - torch.nn.functional.one_hot(y, 3).double()
        torch.testing.assert_close(z.grad, want)
        torch.testing.assert_close(cross_entropy(z, y).detach(),
                                   torch.nn.functional.cross_entropy(z.detach(), y, reduction="none"))


def test_half_precision_rows_of_many_classes_are_summed_in_float32():
    """Review 134: a float16 row of 128,256 near-uniform exponentials summed past 65,504: every probability 0,
    every example's features -onehot(y) (all of a class alike), every loss inf. Summed in float32, the results
    in float16."""
    rng = np.random.default_rng(0)
    z = (0.1 * rng.standard_normal((3, 128_256))).astype(np.float16)
    y = np.array([0, 5, 77])
    p = softmax(z)
    assert p.dtype == np.float16
    np.testing.assert_allclose(p.astype(np.float64).sum(axis=1), 1.0, atol=1e-2)
    ref = z.astype(np.float64)
    lse = np.log(np.exp(ref - ref.max(axis=1, keepdims=True)).sum(axis=1)) + ref.max(axis=1)
    ce = cross_entropy(z, y)
    assert ce.dtype == np.float16
    np.testing.assert_allclose(ce.astype(np.float64), lse - ref[np.arange(3), y], rtol=2e-3)
    g = last_layer_gradients(z, y)
    assert (np.count_nonzero(g, axis=1) > 1000).all()


def test_jax_tracers_are_refused_saying_why():
    """Review 134: under jax.grad a tracer (no device) was blamed on a device mismatch with the labels, and under
    jax.jit the host check failed inside JAX; the error now says the functions run on concrete arrays only."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    with pytest.raises(TypeError, match="logits is a JAX tracer.*cannot run inside jax.jit, jax.grad"):
        jax.grad(lambda z: cross_entropy(z, jnp.array([0])).sum())(jnp.zeros((1, 3)))
    with pytest.raises(TypeError, match="logits is a JAX tracer"):
        jax.jit(softmax)(jnp.zeros((1, 3)))
    assert float(cross_entropy(jnp.zeros((1, 3)), jnp.array([0]))[0]) == pytest.approx(np.log(3.0))


@pytest.mark.parametrize("lib", ["numpy", "array_api_strict", "torch"])
def test_the_controllers_unchecked_versions_equal_the_public_functions(lib):
    """The controller's forward computes its losses and features with the unchecked versions (its logits and
    labels checked already; 2026-12-06: the checks and an expm1 over the whole array were a third to a half of
    a selection at 10^3 classes): they must equal the public functions bit for bit, ties and confident rows
    included."""
    from crestcore.features import _gradient_features, _logits_cross_entropy, _shifted

    if lib == "torch" and torch is None:
        pytest.skip("torch is not installed")
    rng = np.random.default_rng(5)
    z = rng.normal(scale=4.0, size=(40, 7))
    z[:10, :3] = z[:10].max(axis=1, keepdims=True)  # tied top logits
    z[10:15] = 0.0  # every logit tied
    z[15:20, 2] += 60.0  # confident rows: losses far below eps
    y = rng.integers(0, 7, 40)
    emb = rng.normal(size=(40, 3))
    conv = {"numpy": np.asarray, "array_api_strict": xs.asarray, "torch": lambda a: torch.as_tensor(a)}[lib]
    Z, Y, E = conv(z), conv(y), conv(emb)
    from crestcore._compat import namespace

    xp = namespace(Z)
    # the controller's forward shifts and exponentiates once for the loss and the features (whose softmax then
    # divides the exponentials in place: each use gets its own here)
    pairs = [(cross_entropy(Z, Y), _logits_cross_entropy(xp, Z, Y)),
             (cross_entropy(Z, Y), _logits_cross_entropy(xp, Z, Y, _shifted(xp, Z))),
             (last_layer_gradients(Z, Y), _gradient_features(xp, Z, Y)),
             (last_layer_gradients(Z, Y), _gradient_features(xp, Z, Y, exps=_shifted(xp, Z)[1])),
             (last_layer_gradients(Z, Y, embeddings=E), _gradient_features(xp, Z, Y, E, exps=_shifted(xp, Z)[1]))]
    for a, b in pairs:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert float(np.asarray(cross_entropy(Z, Y))[15:20].max()) > 0.0  # log1p kept the confident losses


def test_the_rows_entries_past_the_index_dtype_are_summed_not_gathered(monkeypatch):
    """Review 178: the label's and the top entry's gathers index the flat array, which wraps past 2^31 entries
    where the indices are 32-bit (JAX without x64); there the entry is summed with zeros, the same value. The
    index dtype is narrowed here to reach that path on a small array."""
    import crestcore.features as features

    z, y = _problem(3, 40, 9)
    want = cross_entropy(z, y)
    from crestcore._compat import namespace

    monkeypatch.setattr(features, "index_dtype", lambda xp: xp.int8)  # 40 x 9 = 360 entries > 127
    assert np.array_equal(features._row_entries(namespace(z), z, y), z[np.arange(40), y])
    assert np.array_equal(cross_entropy(z, y), want)
