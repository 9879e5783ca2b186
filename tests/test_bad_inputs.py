"""Bad inputs to every public entry point: the exception type, and a message naming the argument.

One test per case (``pytest.mark.parametrize`` ids). Also: eager config validation (issue 15 item 4),
divergence reported as ``FloatingPointError`` (item 5), and refused corrupt or foreign checkpoints
(item 3).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import crestcore
from crestcore import (
    CrestConfig,
    DropConfig,
    QuadraticConfig,
    crest_init,
    crest_load_state_dict,
    crest_next_batch,
    crest_observe,
    crest_state_dict,
)
from crestcore.baselines import craig, glister, gradmatch, nonneg_ridge, prune_schedule, random_subset, reselect_due

X = np.random.default_rng(0).normal(size=(20, 3))
Y = np.arange(20) % 2
S = np.abs(np.random.default_rng(1).normal(size=(6, 6)))
LOGITS = np.random.default_rng(2).normal(size=(20, 2))
NAN_X = X.copy()
NAN_X[3, 1] = np.nan


def _ri(n):
    return np.arange(n, dtype=np.int64)


# (id, callable, exception type, regex the message must match: the argument's name)
CASES = [
    # --- facility_location
    ("fl-X-1d", lambda: crestcore.facility_location(X[0], 2), ValueError, r"\bX\b"),
    ("fl-X-nan", lambda: crestcore.facility_location(NAN_X, 2), ValueError, r"\bX\b"),
    ("fl-X-int", lambda: crestcore.facility_location(X.astype(int), 2), TypeError, r"\bX\b"),
    ("fl-X-list", lambda: crestcore.facility_location([[1.0, 2.0]], 1), TypeError, r"\bX\b"),
    ("fl-X-empty", lambda: crestcore.facility_location(np.zeros((0, 3)), 1), ValueError, r"\bX\b"),
    ("fl-k-0", lambda: crestcore.facility_location(X, 0), ValueError, r"\bk\b"),
    ("fl-k-big", lambda: crestcore.facility_location(X, 21), ValueError, r"\bk\b"),
    ("fl-k-float", lambda: crestcore.facility_location(X, 2.0), TypeError, r"\bk\b"),
    ("fl-k-bool", lambda: crestcore.facility_location(X, True), TypeError, r"\bk\b"),
    ("fl-metric", lambda: crestcore.facility_location(X, 2, metric="euclidian"), ValueError, "metric"),
    ("fl-kernel", lambda: crestcore.facility_location(X, 2, kernel="expo"), ValueError, "kernel"),
    ("fl-kernel-precomputed", lambda: crestcore.facility_location(S, 2, metric="precomputed", kernel="exp"),
     ValueError, "kernel"),
    ("fl-precomputed-negative", lambda: crestcore.facility_location(-S, 2, metric="precomputed"), ValueError, r"\bX\b"),
    ("fl-precomputed-nonsquare", lambda: crestcore.facility_location(X, 2, metric="precomputed"), ValueError, r"\bX\b"),
    ("fl-optimizer", lambda: crestcore.facility_location(X, 2, optimizer="lazzy"), ValueError, "optimizer"),
    ("fl-stochastic-no-rng", lambda: crestcore.facility_location(X, 2, optimizer="stochastic"), TypeError, "rng"),
    ("fl-epsilon", lambda: crestcore.facility_location(X, 2, optimizer="stochastic", rng=0, epsilon=1.5),
     ValueError, "epsilon"),
    ("fl-scale", lambda: crestcore.facility_location(X, 2, kernel="exp", scale=-1.0), ValueError, "scale"),
    ("fl-scale-out-of-range", lambda: crestcore.facility_location(X * 1e300, 2, kernel="exp", metric="sqeuclidean"),
     ValueError, "scale"),
    ("fl-max-dense-bytes", lambda: crestcore.facility_location(X, 2, max_dense_bytes=0), ValueError, "max_dense_bytes"),
    ("fl-backend", lambda: crestcore.facility_location(X, 2, backend="gpu"), ValueError, "backend"),
    ("fl-labels-length", lambda: crestcore.facility_location(X, 2, labels=Y[:5]), ValueError, "labels"),
    ("fl-labels-float", lambda: crestcore.facility_location(X, 2, labels=Y * 1.0), TypeError, "labels"),
    ("fl-objective-overflow", lambda: crestcore.facility_location(
        (np.random.default_rng(4).normal(size=(400, 3)) * 15000).astype(np.float16), 3), ValueError, "objective|gains"),
    # --- facility_objective / marginal_gains
    ("fo-S-nan", lambda: crestcore.facility_objective(np.full((3, 3), np.nan), _ri(1)), ValueError, r"\bS\b"),
    ("fo-selected-range", lambda: crestcore.facility_objective(S, np.array([7])), ValueError, "selected"),
    ("fo-selected-float", lambda: crestcore.facility_objective(S, np.array([0.0])), TypeError, "selected"),
    ("mg-S-1d", lambda: crestcore.marginal_gains(S[0], _ri(1)), ValueError, r"\bS\b"),
    # --- pairwise_distances
    ("pd-X-int", lambda: crestcore.pairwise_distances(X.astype(int)), TypeError, r"\bX\b"),
    ("pd-Y-features", lambda: crestcore.pairwise_distances(X, X[:, :2]), ValueError, r"\bY\b"),
    ("pd-X-inf", lambda: crestcore.pairwise_distances(np.full((2, 2), np.inf)), ValueError, r"\bX\b"),
    ("pd-metric", lambda: crestcore.pairwise_distances(X, metric="l1"), ValueError, "metric"),
    # --- minibatch_coresets
    ("mc-features-nan", lambda: crestcore.minibatch_coresets(NAN_X, Y, m=2, r=4, P=1, rng=0), ValueError, "features"),
    ("mc-m-gt-r", lambda: crestcore.minibatch_coresets(X, Y, m=5, r=4, P=1, rng=0), ValueError, r"\bm\b"),
    ("mc-r-gt-pool", lambda: crestcore.minibatch_coresets(X, Y, m=2, r=30, P=1, rng=0), ValueError, r"\br\b"),
    ("mc-P-0", lambda: crestcore.minibatch_coresets(X, Y, m=2, r=4, P=0, rng=0), ValueError, r"\bP\b"),
    ("mc-rng-missing", lambda: crestcore.minibatch_coresets(X, Y, m=2, r=4, P=1), TypeError, "rng"),
    ("mc-per-class", lambda: crestcore.minibatch_coresets(X, Y, m=2, r=4, P=1, rng=0, per_class="yes"),
     TypeError, "per_class"),
    ("mc-class-budget", lambda: crestcore.minibatch_coresets(X, Y, m=2, r=4, P=1, rng=0, class_budget="floor"),
     ValueError, "class_budget"),
    ("mc-pool-dup", lambda: crestcore.minibatch_coresets(X, Y, m=2, r=4, P=1, rng=0, pool=np.array([1, 1, 2, 3])),
     ValueError, "pool"),
    ("mc-pool-float", lambda: crestcore.minibatch_coresets(X, Y, m=2, r=4, P=1, rng=0, pool=np.array([1.0])),
     TypeError, "pool"),
    ("mc-subsets-shape", lambda: crestcore.minibatch_coresets(X, Y, m=2, r=4, P=1, subsets=np.zeros((2, 4), int)),
     ValueError, "subsets"),
    ("mc-subsets-dup", lambda: crestcore.minibatch_coresets(X, Y, m=2, r=4, P=1, subsets=np.array([[0, 0, 1, 2]])),
     ValueError, "subsets"),
    ("mc-max-dense-bytes-0", lambda: crestcore.minibatch_coresets(X, Y, m=2, r=4, P=1, rng=0, max_dense_bytes=0),
     ValueError, "max_dense_bytes"),
    ("mc-memory-guard", lambda: crestcore.minibatch_coresets(X, Y, m=2, r=16, P=3, rng=0, per_class=False,
                                                              max_dense_bytes=4000), ValueError, "max_dense_bytes"),
    # --- features
    ("ce-labels-range", lambda: crestcore.cross_entropy(LOGITS, Y + 5), ValueError, "labels"),
    ("llg-logits-nan", lambda: crestcore.last_layer_gradients(np.full((2, 2), np.nan), np.array([0, 1])),
     ValueError, "logits"),
    ("softmax-list", lambda: crestcore.softmax([[0.0, 1.0]]), TypeError, "logits"),
    # --- quadratic
    ("qc-beta1", lambda: QuadraticConfig(beta1=1.0), ValueError, "beta1"),
    ("qc-beta2-str", lambda: QuadraticConfig(beta2="0.9"), TypeError, "beta2"),
    ("qc-variant", lambda: QuadraticConfig(variant="adam"), ValueError, "variant"),
    ("qc-eps-nan", lambda: QuadraticConfig(eps=float("nan")), ValueError, "eps"),
    ("hd-hvp-not-callable", lambda: crestcore.hutchinson_diagonal(3, np.ones((1, 2))), TypeError, "hvp"),
    ("hd-probes-nan", lambda: crestcore.hutchinson_diagonal(lambda v: v, np.full((1, 2), np.nan)), ValueError, "probes"),
    ("qi-params-2d", lambda: crestcore.quadratic_init(np.zeros((2, 2))), ValueError, "params"),
    ("qa-loss-nan", lambda: crestcore.quadratic_anchor(crestcore.quadratic_init(np.zeros(2)), float("nan")),
     ValueError, "loss"),
    ("qp-delta-length", lambda: crestcore.quadratic_predict(
        crestcore.quadratic_anchor(crestcore.quadratic_init(np.zeros(2)), 1.0), np.zeros(3)), ValueError, "delta"),
    # --- trust
    ("re-loss-zero", lambda: crestcore.relative_error(0.0, 1.0), ValueError, "loss_random"),
    ("sr-tau", lambda: crestcore.should_reselect(0.5, 0.0), ValueError, "tau"),
    ("us-cap", lambda: crestcore.update_schedule(1.0, 1.0, cap=0), ValueError, "cap"),
    # --- dropping
    ("dc-alpha", lambda: DropConfig(alpha=0.0), ValueError, "alpha"),
    ("dc-alpha-str", lambda: DropConfig(alpha="0.1"), TypeError, "alpha"),
    ("dc-window-float", lambda: DropConfig(window=1.5), ValueError, "window"),
    ("dc-history-none", lambda: DropConfig(history=None), TypeError, "history"),
    ("dc-min-records", lambda: DropConfig(history=2, min_records=3), ValueError, "min_records"),
    ("di-n", lambda: crestcore.drop_init(0), ValueError, r"\bn\b"),
    ("dr-losses-nan", lambda: crestcore.drop_record(crestcore.drop_init(3), [0], [float("nan")], 0), ValueError, "losses"),
    # --- CrestConfig (eager: everything at construction)
    ("cc-kernel", lambda: CrestConfig(kernel="expo"), ValueError, "kernel"),
    ("cc-metric", lambda: CrestConfig(metric="euclidian"), ValueError, "metric"),
    ("cc-optimizer", lambda: CrestConfig(optimizer="lazzy"), ValueError, "optimizer"),
    ("cc-per-class", lambda: CrestConfig(per_class="yes"), TypeError, "per_class"),
    ("cc-embeddings", lambda: CrestConfig(embeddings=1), TypeError, "embeddings"),
    ("cc-check-union", lambda: CrestConfig(check_union=None), TypeError, "check_union"),
    ("cc-drop-dict", lambda: CrestConfig(drop={}), TypeError, "drop"),
    ("cc-quadratic-dict", lambda: CrestConfig(quadratic={"beta1": 0.5}), TypeError, "quadratic"),
    ("cc-r-lt-m", lambda: CrestConfig(m=16, r=4), ValueError, r"\br\b.*\bm\b"),
    ("cc-m-str", lambda: CrestConfig(m="16"), TypeError, r"\bm\b"),
    ("cc-tau-str", lambda: CrestConfig(tau="0.1"), TypeError, "tau"),
    ("cc-max-overhead-bool", lambda: CrestConfig(max_overhead=True), TypeError, "max_overhead"),
    ("cc-batches-none", lambda: CrestConfig(batches=None), TypeError, "batches"),
    ("cc-release-override", lambda: CrestConfig.release(kernel="gauss"), ValueError, "kernel"),
    ("cc-paper-override", lambda: CrestConfig.paper(T1=0), ValueError, "T1"),
    # --- controller
    ("ci-seed", lambda: crest_init(CrestConfig(m=4), Y, seed=-1), ValueError, "seed"),
    ("ci-epoch-steps", lambda: crest_init(CrestConfig(m=4), Y, seed=0, epoch_steps=0), ValueError, "epoch_steps"),
    ("ci-labels-float", lambda: crest_init(CrestConfig(m=4), Y * 1.0, seed=0), TypeError, "labels"),
    ("cls-not-dict", lambda: crest_load_state_dict([1, 2], np.zeros(3)), TypeError, r"\bd\b"),
    ("cls-params-2d", lambda: crest_load_state_dict({}, np.zeros((3, 3))), ValueError, "missing|params_like"),
    # --- baselines
    ("craig-gradients-nan", lambda: craig(NAN_X, Y, 2), ValueError, "gradients"),
    ("gm-lam", lambda: gradmatch(X, 2, lam=-1.0), ValueError, "lam"),
    ("gm-target-dtype", lambda: gradmatch(X, 2, target=np.zeros(3, dtype=np.float32)), TypeError, "target"),
    ("gm-labels-and-batch", lambda: gradmatch(X, 2, labels=Y, per_batch=Y), ValueError, "per_batch"),
    ("gm-overflow", lambda: gradmatch(X * 1e200, 2), ValueError, "overflow"),
    ("nr-target", lambda: nonneg_ridge(X, np.zeros(2)), ValueError, "target"),
    ("gl-val-labels", lambda: glister(LOGITS, LOGITS, Y + 3, 2), ValueError, "val_labels"),
    ("gl-eta", lambda: glister(LOGITS, LOGITS, Y, 2, eta=0.0), ValueError, "eta"),
    ("ps-ratio", lambda: prune_schedule(np.ones(4), ratio=1.0, epoch=0, epochs=2, rng=0), ValueError, "ratio"),
    ("ps-losses-inf", lambda: prune_schedule(np.array([1.0, np.inf]), epoch=0, epochs=2, rng=0), ValueError, "losses"),
    ("ps-epoch", lambda: prune_schedule(np.ones(4), epoch=2, epochs=2, rng=0), ValueError, "epoch"),
    ("rs-k", lambda: random_subset(5, 6, rng=0), ValueError, r"\bk\b"),
    ("rd-every", lambda: reselect_due(0, 0), ValueError, "every"),
]


@pytest.mark.parametrize("fn, exc, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_case_count():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_config_type_errors_are_value_errors_too():
    """Configs used to raise ValueError for every bad field; callers catching that keep working."""
    with pytest.raises(ValueError, match="per_class"):
        CrestConfig(per_class="yes")
    with pytest.raises(ValueError, match="alpha"):
        DropConfig(alpha="x")


def test_valid_configs_still_build():
    """Valid values are kept as given (a field silently dropped or replaced by its default would pass a
    bare construction)."""
    c = CrestConfig(m=4, r=4)
    assert (c.m, c.r) == (4, 4)
    assert CrestConfig.paper().check_size is None and CrestConfig.release().batches == "shuffled-union"
    c = CrestConfig(per_class=np.bool_(False), max_overhead=0.5, T2=10, drop=DropConfig(alpha=0.5))
    assert not c.per_class and c.max_overhead == 0.5 and c.T2 == 10 and c.drop.alpha == 0.5


def _fused_need(P, threads, n=16, d=3):
    """The fused Numba kernel's peak as the guard counts it, by hand: per thread a float64 n x n matrix,
    the transposed features and the small buffers (a packed triangle and 24 vectors of n); per problem the
    gathered features and their float64 copy."""
    per_thread = n * n * 8 + 8 * n * d + 8 * (n * (n + 1) // 2 + 24 * n)
    return min(P, threads) * per_thread + P * n * d * 16


def test_memory_guard_names_what_fits(monkeypatch):
    import crestcore.facility as fac

    monkeypatch.setattr(fac, "host_threads", lambda: 2)
    need3 = _fused_need(3, 2)
    assert fac.dense_batch_bytes("fused", 3, 16, 3, 8) == need3
    with pytest.raises(ValueError, match=r"P <= 2.*per_class=True"):
        crestcore.minibatch_coresets(X, Y, m=2, r=16, P=3, rng=0, per_class=False, max_dense_bytes=need3 - 1)
    cs = crestcore.minibatch_coresets(X, Y, m=2, r=16, P=2, rng=0, per_class=False, max_dense_bytes=need3 - 1)
    assert cs.indices.shape == (2, 2)
    with pytest.raises(ValueError, match=f"max_dense_bytes >= {need3}"):
        crestcore.minibatch_coresets(X, Y, m=2, r=16, P=3, rng=0, per_class=False, max_dense_bytes=need3 - 1)
    crestcore.minibatch_coresets(X, Y, m=2, r=16, P=3, rng=0, per_class=False, max_dense_bytes=need3)


def test_memory_guard_charges_the_fused_kernel_one_matrix_a_thread(monkeypatch):
    """Review 117: the guard charged the Numba path for every problem's matrix (10 coresets of r = 9,600
    refused as 8.59 GiB, where the kernel used 721 MiB: it solves problem after problem in one buffer a
    thread). With one thread, ten coresets cost one matrix and ten coresets' features; the threads are
    Numba's own count (review 120: numba.set_num_threads was not followed)."""
    import numba

    import crestcore.facility as fac

    need = _fused_need(10, 1)
    assert need < 10 * 16 * 16 * 8  # less than ten matrices
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        assert fac.host_threads() == 1
        cs = crestcore.minibatch_coresets(X, Y, m=2, r=16, P=10, rng=0, per_class=False, max_dense_bytes=need)
        assert cs.indices.shape == (10, 2)
        with pytest.raises(ValueError, match=f"max_dense_bytes >= {need}"):
            crestcore.minibatch_coresets(X, Y, m=2, r=16, P=10, rng=0, per_class=False, max_dense_bytes=need - 1)
    finally:
        numba.set_num_threads(before)


def test_memory_guard_counts_the_reference_paths_temporaries():
    # the array-API reference cannot work in place: 16 x (4.5 * 16 + 3) x 8 = 9600 bytes per coreset
    with pytest.raises(ValueError, match=r"reference path.*max_dense_bytes >= 9600"):
        crestcore.minibatch_coresets(X, Y, m=2, r=16, P=1, rng=0, per_class=False, max_dense_bytes=9599,
                                     backend="reference")
    crestcore.minibatch_coresets(X, Y, m=2, r=16, P=1, rng=0, per_class=False, max_dense_bytes=9600,
                                 backend="reference")


def test_memory_guard_counts_the_float32_upcast_of_half_inputs():
    Xh = torch.from_numpy(X).half()  # torch: imported (importorskip) at module level below
    # float16 input is computed in float32 (native torch kernels): 16 x 23 x 4 = 1472 bytes, not 736
    with pytest.raises(ValueError, match="max_dense_bytes >= 1472"):
        crestcore.minibatch_coresets(Xh, torch.from_numpy(Y), m=2, r=16, P=1, rng=0, per_class=False,
                                     max_dense_bytes=1400)


# --------------------------------------------------------------------------------------------------
# divergence is reported as divergence (FloatingPointError)
# --------------------------------------------------------------------------------------------------
def test_hutchinson_nan_hvp_is_divergence():
    with pytest.raises(FloatingPointError, match="hvp.*probe 0"):
        crestcore.hutchinson_diagonal(lambda v: v * np.nan, np.ones((2, 3)))


def test_hutchinson_overflowing_estimate_is_divergence():
    with pytest.raises(FloatingPointError, match="overflows"):
        crestcore.hutchinson_diagonal(lambda v: v * 1e306, np.full((3, 2), 10.0))  # terms 1e308, sum inf


def test_quadratic_update_exploding_curvature_is_divergence():
    q = crestcore.quadratic_init(np.zeros(4, dtype=np.float32))
    cfg = QuadraticConfig(variant="adahessian")
    with pytest.raises(FloatingPointError, match="curvature"):  # (1e20)^2 overflows float32's EMA
        crestcore.quadratic_update(q, None, np.full(4, 1e20, dtype=np.float32), cfg)
    # finite h whose norm (6e38) exceeds float32: the norm is taken of h scaled by a power of two (review 155),
    # a finite Python float the trust schedule uses as it is, so nothing later fails and this is no divergence
    near_max = crestcore.quadratic_update(q, None, np.full(4, 3e38, dtype=np.float32))
    assert crestcore.quadratic.curvature_norm(near_max) == pytest.approx(2 * float(np.float32(3e38)), rel=1e-6)


def test_quadratic_update_nan_gradient_is_divergence():
    q = crestcore.quadratic_init(np.zeros(3))
    with pytest.raises(FloatingPointError, match="grad"):
        crestcore.quadratic_update(q, np.array([0.0, np.nan, 1.0]))


def test_prune_schedule_huge_losses_keep_the_highest():
    losses = np.array([1e308, 1.5e308, 0.5e308, 1e307, 1.7e308])
    sel = prune_schedule(losses, ratio=0.99, epoch=0, epochs=10, rng=0)
    kept = set(sel.indices.tolist())
    assert {1, 4} <= kept  # above the mean (9.6e307): never pruned
    assert np.isfinite(sel.objective) and sel.objective == pytest.approx(9.6e307, rel=1e-12)
    small = prune_schedule(losses / 1e300, ratio=0.99, epoch=0, epochs=10, rng=0)
    assert np.array_equal(small.indices, sel.indices)


class ExplodingOps:
    """A linear model whose logits are finite but astronomically large and whose HVP is NaN."""

    def __init__(self, labels, hvp_value=np.nan):
        self.labels = labels
        self.W = np.ones(6)
        self.hvp_value = hvp_value

    def outputs(self, idx, embeddings=False):
        Z = np.zeros((idx.size, 2))
        Z[np.arange(idx.size), self.labels[idx]] = 1e30
        return Z

    def params(self):
        return self.W.copy()

    def gradient(self, idx, w):
        return 1.0, np.full(6, 1e30)

    def hutchinson(self, idx, w, seed):
        return np.full(6, self.hvp_value)


def test_controller_nan_hvp_is_floating_point_error():
    lab = np.arange(40) % 2
    cfg = CrestConfig(m=4)
    ops = ExplodingOps(lab)
    with pytest.raises(FloatingPointError, match="zhz"):
        crest_next_batch(crest_init(cfg, lab, seed=0), ops, cfg)


def test_controller_huge_finite_curvature_has_a_finite_norm():
    """A finite curvature whose squared norm overflows float64 (entries 1e300) was refused as divergence: its
    norm was taken of the squares in the working dtype. It is taken of h scaled by a power of two now (review
    155), finite, and the schedule runs on it."""
    lab = np.arange(40) % 2
    cfg = CrestConfig(m=4)
    ops = ExplodingOps(lab, hvp_value=1e300)
    state, _ = crest_next_batch(crest_init(cfg, lab, seed=0), ops, cfg)
    assert state.h_norm_0 == pytest.approx(np.sqrt(6.0) * 1e300, rel=1e-12)


# --------------------------------------------------------------------------------------------------
# checkpoint integrity (crest_load_state_dict)
# --------------------------------------------------------------------------------------------------
class LinOps:
    def __init__(self, labels, D=6):
        self.labels = labels
        self.W = np.linspace(-1, 1, D)

    def outputs(self, idx, embeddings=False):
        Z = np.zeros((idx.size, 2))
        Z[:, 0] = self.W[0] * idx / 40.0
        Z[:, 1] = -Z[:, 0]
        return Z

    def params(self):
        return self.W.copy()

    def gradient(self, idx, w):
        return 1.0, np.full(self.W.size, 0.01)

    def hutchinson(self, idx, w, seed):
        return np.full(self.W.size, 0.1)


@pytest.fixture(scope="module")
def saved():
    lab = np.arange(40) % 2
    cfg = CrestConfig(m=4, T2=2, drop=DropConfig(window=2))
    ops = LinOps(lab)
    state = crest_init(cfg, lab, seed=0)
    for _ in range(5):
        state, b = crest_next_batch(state, ops, cfg)
        state = crest_observe(state, b.indices, np.full(b.indices.size, 0.5))
    return crest_state_dict(state), ops


def _corrupt(d, path, value):
    d = copy.deepcopy(d)
    cur = d
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value(cur[path[-1]]) if callable(value) else value
    return d


CORRUPT = [
    ("truncated-pool", ("drop", "active"), lambda a: a[: a.size // 2], "drop.active"),
    ("negative-step", ("step",), -3, r"\bstep\b"),
    ("step-vs-counters", ("step",), lambda s: s + 7, "train_steps"),
    ("nan-batch-weight", ("batch_w",), lambda w: np.where(np.arange(w.size).reshape(w.shape) == 0, np.nan, w),
     "batch_w"),
    ("batch-index-range", ("batch_idx",), lambda b: b.astype(np.int64) + 1000, "batch_idx"),
    ("batch-shapes", ("batch_w",), lambda w: w[:, :1], "batch_idx|batch_w"),
    ("foreign-anchor", ("anchor",), lambda a: np.zeros(a.size + 5), "anchor.*another model"),
    ("foreign-g-ema", ("quad", "g_ema"), lambda a: np.zeros(a.size - 1), "g_ema"),
    ("nan-h-ema", ("quad", "h_ema"), lambda a: a * np.nan, "h_ema"),
    ("n-classes", ("n_classes",), 1, "n_classes"),
    ("labels-float", ("labels",), lambda a: a * 1.0, "labels"),
    ("T1-zero", ("T1",), 0, "T1"),
    ("pending-str", ("pending",), "yes", "pending"),
    ("format-future", ("format_version",), 99, "format_version"),
    ("dropped-at-inconsistent", ("drop", "dropped_at"), lambda a: a * 0 + 3, "dropped_at"),
    ("losses-inf", ("drop", "losses"), lambda a: np.where(np.isnan(a), np.inf, a), "drop.losses"),
    ("counters-missing", ("counters",), {}, "counters"),
    ("h-norm-negative", ("h_norm_t",), -1.0, "h_norm_t"),
    ("since-check-beyond-step", ("since_check",), 10_000, "since_check"),
    ("no-selection-yet", ("n_selections",), 0, "n_selections|selections"),
    # fields that are no arrays at all, named (NumPy's "cannot copy a NoneType" named none of them)
    ("batch-idx-none", ("batch_idx",), None, "batch_idx must be a 2-D array"),
    ("subsets-dict", ("subsets",), {"a": 1}, "subsets must be a 2-D array"),
    ("g-ema-none", ("quad", "g_ema"), None, "quad.g_ema must be a 1-D array"),
    ("drop-losses-ragged", ("drop", "losses"), [[1.0], [1.0, 2.0]], "drop.losses must be a 2-D array"),
    ("drop-clock-text", ("drop", "clock"), "x", "drop.clock"),
    ("drop-version-none", ("drop", "version"), None, "version must be an integer"),
    ("log-checks-int", ("log", "checks"), 5, "log.checks"),
    ("log-checks-width", ("log", "checks"), [[1.0, 2.0]], "log.checks records must hold 4"),
    ("log-selections-nested", ("log", "selections"), [[1]], "log.selections must be 1-D"),
    # review 178: a clock and version that disagree loaded, and the next step blamed the caller for reusing a state
    ("drop-version-not-the-clock", ("drop", "version"), lambda v: int(v) + 5, "drop.version .* must equal drop.clock"),
    ("drop-clock-without-version", ("drop",), lambda dr: {k: v for k, v in dr.items() if k != "version"},
     "must equal drop.clock"),
    ("labels-none", ("labels",), None, "labels must be a 1-D array"),
]


@pytest.mark.parametrize("path, value, match", [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_corrupt_state_is_refused(saved, path, value, match):
    d, ops = saved
    bad = _corrupt(d, path, value)
    with pytest.raises(ValueError, match=match):
        crest_load_state_dict(bad, ops.params())


def test_intact_state_loads_and_continues_identically(saved):
    d, ops = saved
    cfg = CrestConfig(m=4, T2=2, drop=DropConfig(window=2))
    a = crest_load_state_dict(copy.deepcopy(d), ops.params())
    b = crest_load_state_dict(copy.deepcopy(d), ops.params())
    for _ in range(4):
        a, ba = crest_next_batch(a, ops, cfg)
        b, bb = crest_next_batch(b, ops, cfg)
        assert np.array_equal(ba.indices, bb.indices) and np.array_equal(ba.weights, bb.weights)
    assert d["format_version"] == 4


def test_version_1_state_without_new_fields_loads(saved):
    d, ops = saved
    old = {k: v for k, v in copy.deepcopy(d).items()
           if k not in ("format_version", "epoch_steps", "want_select", "made", "subsets")}
    st = crest_load_state_dict(old, ops.params())
    assert st.epoch_steps == 0 and st.want_select is False
    assert st.made == st.batch_idx.shape[0] and st.subsets.size == 0  # every stored row was selected


def test_state_from_another_model_is_refused(saved):
    d, ops = saved
    with pytest.raises(ValueError, match="anchor has 6 parameters but the model has 9"):
        crest_load_state_dict(copy.deepcopy(d), np.zeros(9))


# --------------------------------------------------------------------------------------------------
# the torch adapter: __init__ and load_state_dict
# --------------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from crestcore.adapters.torch import CrestLoader  # noqa: E402


def _data(n=40):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, generator=g), torch.arange(n) % 2)


def _model(out=2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, out))


LOADER_CASES = [
    ("config-dict", dict(config={"m": 4}), TypeError, "config"),
    ("budget-zero", dict(budget=0.0), ValueError, "budget"),
    ("epochs-zero", dict(epochs=0), ValueError, "epochs"),
    ("seed-negative", dict(seed=-1), ValueError, "seed"),
    ("budget-counts", dict(budget_counts="time"), ValueError, "budget_counts"),
    ("per-epoch-str", dict(per_epoch="yes"), TypeError, "per_epoch"),
    ("measure-batch-size", dict(measure_batch_size=0), ValueError, "measure_batch_size"),
    ("loss-fn", dict(loss_fn="ce"), TypeError, "loss_fn"),
    ("forward", dict(forward=3), TypeError, "forward"),
    ("collate-fn", dict(collate_fn=1.5), TypeError, "collate_fn"),
    ("device", dict(device="nowhere:7"), ValueError, "device"),
    ("m-too-big", dict(config=CrestConfig(m=64)), ValueError, r"\bm\b"),
]


@pytest.mark.parametrize("kw, exc, match", [c[1:] for c in LOADER_CASES], ids=[c[0] for c in LOADER_CASES])
def test_crest_loader_init_bad_arguments(kw, exc, match):
    kw = {"config": CrestConfig(m=4), **kw}
    with pytest.raises(exc, match=match):
        CrestLoader(_model(), _data(), **kw)


def test_crest_loader_model_must_be_module():
    with pytest.raises(TypeError, match="model"):
        CrestLoader(lambda x: x, _data(), config=CrestConfig(m=4))


@pytest.fixture(scope="module")
def loader_state():
    torch.set_num_threads(1)
    model = _model()
    loader = CrestLoader(model, _data(), config=CrestConfig(m=4), budget=0.5, epochs=2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    return loader.state_dict(), model


LOADER_CORRUPT = [
    ("position-negative", lambda s: s.update(position=-2), "position"),
    ("position-beyond", lambda s: s.update(position=10_000), "position"),
    ("position-vs-controller", lambda s: s.update(position=1), "position"),
    ("batch-weight-nan", lambda s: s["batch"].update(weights=s["batch"]["weights"] * float("nan")), "weights"),
    ("batch-index-range", lambda s: s["batch"].update(indices=s["batch"]["indices"] + 100), "indices"),
    ("batch-missing", lambda s: s.update(batch=None), "batch"),
    ("pool-truncated", lambda s: s["crest"]["drop"].update(active=s["crest"]["drop"]["active"][:20]), "drop.active"),
    ("crest-none", lambda s: s.update(crest=None), "crest entry must be the controller's state"),
    ("crest-missing", lambda s: s.pop("crest"), "crest entry must be the controller's state"),
    ("batch-indices-none", lambda s: s["batch"].update(indices=None), "indices must be a 1-D array"),
]


@pytest.mark.parametrize("corrupt, match", [c[1:] for c in LOADER_CORRUPT], ids=[c[0] for c in LOADER_CORRUPT])
def test_crest_loader_refuses_corrupt_state(loader_state, corrupt, match):
    state, model = loader_state
    bad = copy.deepcopy(state)
    corrupt(bad)
    loader = CrestLoader(model, _data(), config=CrestConfig(m=4), budget=0.5, epochs=2)
    with pytest.raises(ValueError, match=match):
        loader.load_state_dict(bad)


def test_crest_loader_refuses_another_architecture(loader_state):
    state, _ = loader_state
    other = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    loader = CrestLoader(other, _data(), config=CrestConfig(m=4), budget=0.5, epochs=2)
    with pytest.raises(ValueError, match="another model"):
        loader.load_state_dict(copy.deepcopy(state))


def test_crest_loader_intact_state_loads(loader_state):
    state, model = loader_state
    loader = CrestLoader(model, _data(), config=CrestConfig(m=4), budget=0.5, epochs=2)
    loader.load_state_dict(copy.deepcopy(state))
    assert loader.position == 3 and math.isfinite(float(loader._batch.weights.sum()))


def _ops_cases():
    from crestcore.adapters.baselines import SubsetLoader
    from crestcore.adapters.torch import TorchModelOps, check_loader_arguments

    cases = [
        ("tmo-model", lambda: TorchModelOps(lambda x: x, _data()), TypeError, "model"),
        ("tmo-batch-size", lambda: TorchModelOps(_model(), _data(), batch_size=0), ValueError, "batch_size"),
        ("sl-method", lambda: SubsetLoader(_model(), _data(), method="herding"), ValueError, "method"),
        ("sl-fill", lambda: SubsetLoader(_model(), _data(), method="random", m=4, fill="none"), ValueError, "fill"),
        ("sl-options", lambda: SubsetLoader(_model(), _data(), method="random", m=4, options=[1]), TypeError,
         "options"),
        ("cla-budget", lambda: check_loader_arguments(budget=-1.0, check_model=False), ValueError, "budget"),
        ("cla-config", lambda: check_loader_arguments(config="paper", check_model=False), TypeError, "config"),
    ]
    try:
        import lightning.pytorch  # noqa: F401

        from crestcore.adapters.lightning import CrestCallback

        cases.append(("lightning-epochs", lambda: CrestCallback(_data(), epochs=0), ValueError, "epochs"))
    except ImportError:
        pass
    return cases


ADAPTER_CASES = _ops_cases()


@pytest.mark.parametrize("fn, exc, match", [c[1:] for c in ADAPTER_CASES], ids=[c[0] for c in ADAPTER_CASES])
def test_adapter_bad_arguments(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_a_numpy_extension_dtype_is_refused_naming_the_argument():
    """ml_dtypes' bfloat16 in a NumPy array (NumPy's isdtype raises TypeError for it): the library's own
    message, naming the argument, on the selection, the baselines and the quadratic model alike."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    Xb = X.astype(ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match="X is a NumPy bfloat16 array"):
        crestcore.facility_location(Xb, 3)
    with pytest.raises(TypeError, match="gradients is a NumPy bfloat16 array"):
        craig(Xb, Y, 3)
    with pytest.raises(TypeError, match="real floating"):
        crestcore.quadratic_init(np.zeros(3).astype(ml_dtypes.bfloat16))


def test_masked_and_sparse_arrays_and_a_bad_rng_are_refused_naming_the_argument():
    """A numpy.ma.MaskedArray (whose masks the kernels would not honour: NumPy's broadcasting error came
    out of the middle of a computation) and a sparse torch tensor are refused naming the argument; an
    rng that is neither a seed nor a Generator is refused even where the optimizer does not draw."""
    import crestcore

    X = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(TypeError, match="X is a numpy.ma.MaskedArray"):
        crestcore.facility_location(np.ma.masked_array(X, mask=np.zeros_like(X, dtype=bool)), 2)
    with pytest.raises(TypeError, match="features is a numpy.ma.MaskedArray"):
        crestcore.minibatch_coresets(np.ma.masked_array(X), np.arange(10) % 2, m=2, r=4, P=1, rng=0)
    with pytest.raises(TypeError, match="rng must be"):
        crestcore.facility_location(X, 2, rng="abc")
    assert crestcore.facility_location(X, 2, rng=3).indices.tolist() == crestcore.facility_location(X, 2).indices.tolist()
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="X is a torch.sparse_coo tensor.*to_dense"):
        crestcore.facility_location(torch.from_numpy(X).to_sparse(), 2)


def test_small_functions_refuse_what_they_silently_took():
    """Values the trust, quadratic, drop and baseline functions accepted and misread (a string parsed as a
    number, a bool as 1.0, a dict as a config, labels of the wrong shape), refused by name."""
    from crestcore import (DropConfig, drop_init, drop_record, drop_update, hutchinson_diagonal, quadratic_anchor,
                           quadratic_init, quadratic_update, relative_error, should_reselect)
    from crestcore.baselines import random_subset

    for call, exc, word in (
        (lambda: relative_error("2.0", "1.5"), TypeError, "loss_random"),
        (lambda: relative_error(True, False), TypeError, "loss_random"),
        (lambda: should_reselect(True, 0.5), TypeError, "rho"),
        (lambda: quadratic_anchor(quadratic_init(np.zeros(2)), None), TypeError, "loss"),
        (lambda: quadratic_anchor(quadratic_init(np.zeros(2)), True), TypeError, "loss"),
        (lambda: quadratic_anchor(quadratic_init(np.zeros(2)), np.array([1.0, 2.0])), TypeError, "loss"),
        (lambda: quadratic_update(quadratic_init(np.zeros(2)), np.ones(2), config={"beta1": 0.5}), TypeError,
         "config"),
        (lambda: drop_init(2.0), ValueError, "n"),
        (lambda: drop_update(drop_init(4), 1, DropConfig(), labels=np.zeros((2, 2), dtype=int)), ValueError,
         "labels"),
        (lambda: drop_update(drop_init(4), 1, {"alpha": 1}), TypeError, "config"),
        (lambda: random_subset(10, 2, rng=0, dtype="float32"), TypeError, "dtype"),
        (lambda: hutchinson_diagonal(lambda v: [1.0, 2.0], np.eye(2)), TypeError, "hvp"),
    ):
        with pytest.raises(exc, match=word):
            call()
    assert float(quadratic_anchor(quadratic_init(np.zeros(2)), np.array([1.5])).anchor_loss) == 1.5
    probes = np.eye(2)

    def writes(v):
        v *= 2.0  # an hvp that writes its input
        return v

    # H = 2 I on the probes e_1, e_2: mean of z * (H z) = [1, 1] however the hvp treats its input (it was
    # [2, 2], with z overwritten by H z), and the caller's probes are not written
    np.testing.assert_array_equal(hutchinson_diagonal(writes, probes), [1.0, 1.0])
    np.testing.assert_array_equal(probes, np.eye(2))
    state = drop_record(drop_init(3), np.array([0]), np.array([-0.5]), step=1)  # a negative loss is a loss
    assert state.losses[0, 0] == -0.5


def test_review_60_edge_values_get_their_finite_answers():
    """Regression (review 60): score_orders with a unit bound on data near 1e-300 raised a bare
    OverflowError (the rescaled bound passed float64's range) where every similarity is the bound (the
    objective n * bound); relative_error(1e308, -1e308) overflowed to inf where rho is 2."""
    X = np.random.default_rng(0).normal(size=(6, 3))
    for scale in (1e-300, 1e-100, 1.0):
        obj = crestcore.score_orders(X * scale, X * scale, [np.array([0])], metric="sqeuclidean", bound=1e3)[0][0]
        assert obj == pytest.approx(6e3, rel=1e-12 if scale < 1 else 1e-2)
    assert crestcore.score_orders(X * 1e-300, X * 1e-300, [np.array([0])], metric="sqeuclidean", bound=1.0)[0][0] == 6.0
    assert crestcore.relative_error(1e308, -1e308) == 2.0
    assert crestcore.relative_error(-1e308, 1e308, floor=1.0) == 2.0
    assert crestcore.relative_error(2.0, 1.5) == 0.25


def test_review_60_messages_and_an_unused_rng():
    """Regression (review 60): glister accepted any rng under the naive optimizer (facility_location
    refuses it); a NumPy bfloat16 array got 'must have a real floating dtype (..., bfloat16, ...), got
    bfloat16' from prune_schedule; random_subset's overflow named '<class 'numpy.float16'>' and picks."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from crestcore.baselines import glister, prune_schedule, random_subset

    X = np.random.default_rng(0).normal(size=(6, 3))
    with pytest.raises(TypeError, match="rng"):
        glister(X, X[:2], np.array([0, 1]), 2, rng="not a seed")
    with pytest.raises(TypeError, match="ml_dtypes.*cast it to float32"):
        prune_schedule(np.ones(4, dtype=ml_dtypes.bfloat16), epoch=0, epochs=2, rng=0)
    with pytest.raises(ValueError, match=r"overflows float16 \(") as info:
        random_subset(200000, 1, rng=0, dtype=np.float16)
    assert "class" not in str(info.value)


def test_embeddings_of_another_library_than_the_logits_are_refused_by_the_controller():
    """Review 178: ops whose outputs gave torch logits with NumPy embeddings failed in the controller's forward
    with an AttributeError on the embeddings' dtype; refused as arrays of different libraries, as
    last_layer_gradients refuses them."""
    from crestcore.controller import _SoftmaxOps

    class Mixed(_SoftmaxOps):
        def outputs(self, indices, embeddings=False):
            z = torch.from_numpy(self.X[indices] @ self.W)
            return (z, self.X[indices].copy()) if embeddings else z

    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    ops = Mixed(rng.normal(size=(60, 4)), y, 3)
    cfg = CrestConfig(m=6, embeddings=True)
    with pytest.raises(TypeError, match="different libraries cannot be mixed .*embeddings: numpy.ndarray"):
        crest_next_batch(crest_init(cfg, y, seed=0), ops, cfg)
