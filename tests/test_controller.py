"""Tests for crestcore/controller.py: Algorithm 1 as a state machine.

Two model sides:

* ``SoftmaxOps``: softmax regression in NumPy on scikit-learn's digits, with its exact gradient and
  exact Hessian-vector product (checked against torch autograd below). It trains for real.
* ``FakeOps``: a scripted model whose every example has the same cross-entropy ``level`` (set by the
  test before each step), constant gradient and a curvature scaled per call, and which counts every
  call. It lets a test choose the loss trace, hence rho, and check each decision of the controller.

Self-contained: no conftest fixtures.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import pickle
import warnings

import array_api_strict as xs
import numpy as np
import pytest
try:
    import torch
except ImportError:  # the lower-bounds run (tests/conftest.py skips the tests that use it)
    torch = None
from hypothesis import given, settings
from hypothesis import strategies as st

import crestcore as cc
from crestcore import (
    CrestConfig,
    DropConfig,
    crest_init,
    crest_load_state_dict,
    crest_next_batch,
    crest_observe,
    crest_state_dict,
    crest_stats,
    quadratic_curvature,
    relative_error,
    update_schedule,
)


# ================================================================================================
# a real model: softmax regression on digits
# ================================================================================================
@functools.cache
def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    X, y = X[perm] / 16.0, y[perm].astype(np.int64)
    X = np.hstack([X, np.ones((len(X), 1))])  # bias column
    return X[:1400], y[:1400], X[1400:], y[1400:]


class SoftmaxOps:
    """ModelOps for softmax regression ``z = x W`` (W (d, C)), loss mean_i(w_i * CE_i)."""

    def __init__(self, X, y, C=10):
        self.X, self.y, self.C = X, y, C
        self.W = np.zeros((X.shape[1], C))
        self.calls = {"outputs": [], "gradient": 0, "hutchinson": 0}

    def outputs(self, idx, embeddings=False):
        assert isinstance(idx, np.ndarray) and idx.dtype == np.int64
        self.calls["outputs"].append(idx.copy())
        Z = self.X[idx] @ self.W
        return (Z, self.X[idx].copy()) if embeddings else Z

    def params(self):
        return self.W.ravel().copy()

    def _probs(self, idx):
        return cc.softmax(self.X[idx] @ self.W)

    def loss_grad(self, idx, w):
        X, P = self.X[idx], self._probs(idx)
        G = P.copy()
        G[np.arange(len(idx)), self.y[idx]] -= 1.0
        loss = float(np.mean(w * cc.cross_entropy(X @ self.W, self.y[idx])))
        return loss, (X.T @ (G * w[:, None]) / len(idx)).ravel()

    def gradient(self, idx, w):
        self.calls["gradient"] += 1
        return self.loss_grad(idx, w)

    def hvp(self, idx, w, v):
        X, P = self.X[idx], self._probs(idx)
        A = X @ v.reshape(self.W.shape)
        HA = P * A - P * np.sum(P * A, axis=1, keepdims=True)
        return (X.T @ (HA * w[:, None]) / len(idx)).ravel()

    def hutchinson(self, idx, w, seed):
        self.calls["hutchinson"] += 1
        z = np.random.default_rng(seed).choice([-1.0, 1.0], size=self.W.size)
        return z * self.hvp(idx, w, z)

    def accuracy(self, X, y):
        return float(np.mean(np.argmax(X @ self.W, axis=1) == y))


M = 32
LR = 0.5
FULL_EPOCHS = 40
BUDGET = FULL_EPOCHS * (1400 // M) // 10  # 10% of the SGD steps of a 40-epoch full run: 172


def train_crest(cfg, seed, steps, ops=None, state=None, observe=False, record=None):
    Xtr, ytr, _, _ = digits()
    ops = ops if ops is not None else SoftmaxOps(Xtr, ytr)
    state = state if state is not None else crest_init(cfg, ytr, seed=seed)
    for _ in range(steps):
        state, batch = crest_next_batch(state, ops, cfg)
        if record is not None:
            record.append((batch, state.drop.active.copy()))
        loss, g = ops.loss_grad(batch.indices, batch.weights)
        if observe:
            per = cc.cross_entropy(ops.X[batch.indices] @ ops.W, ops.y[batch.indices])
            state = crest_observe(state, batch.indices, per)
        ops.W -= LR * g.reshape(ops.W.shape)
        if record is not None:
            record[-1] = record[-1] + (loss,)
    return ops, state


def train_random(seed, steps):
    Xtr, ytr, Xte, yte = digits()
    ops = SoftmaxOps(Xtr, ytr)
    rng = np.random.default_rng(seed)
    order = np.zeros(0, dtype=np.int64)
    for _ in range(steps):  # epochs of shuffled mini-batches, as plain SGD does
        if order.size < M:
            order = np.concatenate([order, rng.permutation(len(ytr))])
        idx, order = order[:M], order[M:]
        _, g = ops.loss_grad(idx, np.ones(M))
        ops.W -= LR * g.reshape(ops.W.shape)
    return ops.accuracy(Xte, yte)


def test_softmax_ops_match_torch_autograd():
    """The test's own model is right: gradient and Hessian-vector product equal autograd's."""
    Xtr, ytr, _, _ = digits()
    ops = SoftmaxOps(Xtr, ytr)
    rng = np.random.default_rng(0)
    ops.W = rng.normal(scale=0.3, size=ops.W.shape)
    idx = rng.choice(len(ytr), size=20, replace=False)
    w = rng.uniform(0.2, 3.0, size=20)
    Xt, yt, wt = torch.tensor(Xtr[idx]), torch.tensor(ytr[idx]), torch.tensor(w)

    def f(flat):
        z = Xt @ flat.reshape(ops.W.shape)
        return torch.mean(wt * torch.nn.functional.cross_entropy(z, yt, reduction="none"))

    W = torch.tensor(ops.W.ravel())
    v = torch.tensor(rng.normal(size=ops.W.size))
    loss, g = ops.gradient(idx, w)
    assert loss == pytest.approx(float(f(W)), rel=1e-12)
    np.testing.assert_allclose(g, torch.func.grad(f)(W).numpy(), rtol=1e-10, atol=1e-13)
    _, hv = torch.autograd.functional.hvp(f, W, v)
    np.testing.assert_allclose(ops.hvp(idx, w, v.numpy()), hv.numpy(), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# (1) a 10% budget reaches a useful accuracy, not much worse than random subsets
# ------------------------------------------------------------------------------------------------
def test_crest_at_ten_percent_budget_trains_digits(record_property, capsys):
    _, _, Xte, yte = digits()
    cfg = CrestConfig(m=M)
    crest = []
    for seed in (0, 1):
        ops, state = train_crest(cfg, seed, BUDGET)
        crest.append(ops.accuracy(Xte, yte))
        c = state.counters
        assert c["train_steps"] == BUDGET  # every batch handed out is a step the caller takes
        assert c["train_examples"] == BUDGET * M
        assert state.step == BUDGET - 1  # steps completed: the last one is still being trained
        assert c["selections"] >= 1 and c["checks"] >= 1
    rand = [train_random(seed, BUDGET) for seed in (0, 1, 2)]
    record_property("crest_acc", crest)
    record_property("random_acc", rand)
    with capsys.disabled():
        print(f"\n[digits, {BUDGET} steps of m={M}] CREST acc {crest} mean {np.mean(crest):.4f}; "
              f"random-subset SGD acc {rand} mean {np.mean(rand):.4f}")
    assert min(crest) >= 0.85
    assert np.mean(crest) >= np.mean(rand) - 0.03


# ------------------------------------------------------------------------------------------------
# (2) save / restore in the middle reproduces the uninterrupted run exactly
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    CrestConfig(m=M, tau=0.02),
    CrestConfig.release(m=M, tau=0.02),
    CrestConfig(m=M, tau=0.02, T2=15, drop=DropConfig(alpha=0.3, window=15, min_records=1, floor=200)),
    CrestConfig(m=M, tau=0.02, P=8, coresets="just-in-time", check_size=48),
], ids=["default", "release", "dropping", "just-in-time"])
def test_save_restore_mid_run_is_exact(cfg):
    k0, k1 = 25, 30
    observe = cfg.T2 is not None
    ops, state = train_crest(cfg, 3, k0, observe=observe)
    saved = pickle.loads(pickle.dumps(copy.deepcopy(crest_state_dict(state))))
    saved_W = ops.W.copy()
    tail_a = []
    ops_a, state_a = train_crest(cfg, 3, k1, ops=ops, state=state, observe=observe, record=tail_a)

    Xtr, ytr, _, _ = digits()
    ops_b = SoftmaxOps(Xtr, ytr)
    ops_b.W = saved_W
    state_b = crest_load_state_dict(saved, ops_b.params())
    tail_b = []
    ops_b, state_b = train_crest(cfg, 3, k1, ops=ops_b, state=state_b, observe=observe, record=tail_b)

    assert state_a.counters["selections"] > state.counters["selections"]  # reselections after restore
    for (ba, act_a, la), (bb, act_b, lb) in zip(tail_a, tail_b, strict=True):
        np.testing.assert_array_equal(ba.indices, bb.indices)
        np.testing.assert_array_equal(ba.weights, bb.weights)
        assert ba.reselected == bb.reselected
        np.testing.assert_array_equal(act_a, act_b)
        assert la == lb
    np.testing.assert_array_equal(ops_a.W, ops_b.W)
    assert state_a.counters == state_b.counters
    assert state_a.log == state_b.log
    assert (state_a.T1, state_a.P, state_a.step) == (state_b.T1, state_b.P, state_b.step)


class _TokenOps(SoftmaxOps):
    """SoftmaxOps saying that its outputs depend on nothing besides its parameters (``state_token``)."""

    def state_token(self, indices):
        return ()


def _prefetching_run(cfg, steps, monkeypatch, reuse: bool):
    """Softmax regression trained by a loop that asks for 4 batches ahead every 10 steps (as a DataLoader
    with workers does at an epoch's start), so those checks see the parameters the one before saw. Returns
    the ops, the state, the batches trained and how many checks took the last one's measurement (with
    ``reuse=False`` the controller's reuse is switched off: every check measures)."""
    import crestcore.controller as ctl

    hits = []
    same = ctl._same_as_last
    monkeypatch.setattr(ctl, "_same_as_last", (lambda *a: hits.append(same(*a)) or hits[-1]) if reuse
                        else (lambda *a: None))
    Xtr, ytr, _, _ = digits()
    ops = _TokenOps(Xtr, ytr)
    state = crest_init(cfg, ytr, seed=5)
    queue, batches = [], []
    for t in range(steps):
        while len(queue) < (4 if t % 10 == 0 else 1):
            state, b = crest_next_batch(state, ops, cfg)
            queue.append(b)
        b = queue.pop(0)
        batches.append(b)
        _, g = ops.loss_grad(b.indices, b.weights)
        if cfg.T2:
            state = crest_observe(state, b.indices, cc.cross_entropy(ops.X[b.indices] @ ops.W, ops.y[b.indices]))
        ops.W -= LR * g.reshape(ops.W.shape)
    return ops, state, batches, sum(h is not None for h in hits)


@pytest.mark.parametrize("cfg", [
    CrestConfig(m=M, tau=0.02),
    CrestConfig(m=M, tau=0.02, T2=15, drop=DropConfig(alpha=0.3, window=15, min_records=1, floor=200)),
    CrestConfig.paper(m=M, tau=0.02),
], ids=["default", "dropping", "paper"])
def test_a_check_at_the_parameters_of_the_last_one_reuses_its_measurement(cfg, monkeypatch):
    """A trust check whose parameters, anchor, quadratic model and check set are those of the check before
    measures nothing: it takes that check's L_R and F (and, for dropping, its losses), so the run is the
    one that measures every check (same batches, log, schedule and model), with fewer forwards."""
    with monkeypatch.context() as mp:
        ops_a, state_a, batches_a, reused = _prefetching_run(cfg, 60, mp, reuse=True)
    with monkeypatch.context() as mp:
        ops_b, state_b, batches_b, none = _prefetching_run(cfg, 60, mp, reuse=False)
    assert reused >= 5 and none == 0
    for a, b in zip(batches_a, batches_b, strict=True):
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(ops_a.W, ops_b.W)
    assert state_a.log == state_b.log and (state_a.T1, state_a.P, state_a.step) == (state_b.T1, state_b.P, state_b.step)
    np.testing.assert_array_equal(state_a.drop.active, state_b.drop.active)
    spared = state_b.counters["forward_examples"] - state_a.counters["forward_examples"]
    assert spared == reused * state_a.check_idx.size > 0  # every reused check spared its forward, nothing else
    assert state_a.counters["reused_examples"] == spared and state_b.counters["reused_examples"] == 0
    moved = ("forward_examples", "reused_examples")
    assert {k: v for k, v in state_a.counters.items() if k not in moved} == \
        {k: v for k, v in state_b.counters.items() if k not in moved}
    assert len(ops_b.calls["outputs"]) - len(ops_a.calls["outputs"]) == reused  # one forward each
    # the last check is held in memory only: a loaded state's first check measures, with the same decision
    passing = dataclasses.replace(cfg, tau=1e9)  # a check that passes: no selection after it
    state_c = state_a
    for _ in range(4):  # checks until one is the last thing its step did (no drop or selection after it)
        state_c, _ = crest_next_batch(state_c._replace(since_check=state_c.T1), ops_a, passing)
        if state_c.last_check is not None and state_c.last_check.selection == state_c.n_selections:
            break
    d = pickle.loads(pickle.dumps(crest_state_dict(state_c)))
    assert "last_check" not in d
    loaded = crest_load_state_dict(d, ops_a.params())
    assert loaded.last_check is None and state_c.last_check is not None
    results = []
    for start in (loaded, state_c):
        n0 = len(ops_a.calls["outputs"])
        after, b = crest_next_batch(start._replace(since_check=start.T1), ops_a, passing)  # a check is due
        results.append((len(ops_a.calls["outputs"]) - n0, after.log["checks"][-1][1:], b.indices.tolist()))
    assert results[0][0] == results[1][0] + 1  # the loaded state measured its check, the live one did not
    assert results[0][1:] == results[1][1:]


def test_a_check_after_anything_changed_measures_again():
    """Changed parameters (by one ulp) or state token, another config or ops, a new anchor, or ops without
    ``state_token`` (nothing says what else its outputs depend on): the check measures."""
    cfg = CrestConfig(m=M, tau=1e9, coresets="at-anchor", max_age=None)  # one selection, then checks only
    Xtr, ytr, _, _ = digits()
    ops = _TokenOps(Xtr, ytr)
    state = crest_init(cfg, ytr, seed=2)
    state, _ = crest_next_batch(state, ops, cfg)  # the selection
    ops.W[0, 0] += 0.5
    calls = lambda: len(ops.calls["outputs"])  # noqa: E731

    def step(st, o=ops, c=cfg):
        n0, k0 = len(o.calls["outputs"]), st.counters["checks"]
        st, _ = crest_next_batch(st, o, c)
        assert st.counters["checks"] == k0 + 1
        return st, len(o.calls["outputs"]) - n0

    state, measured = step(state)
    assert measured == 1
    state, measured = step(state)  # nothing changed
    assert measured == 0
    ops.W[3, 4] = np.nextafter(ops.W[3, 4], np.inf)  # one ulp
    state, measured = step(state)
    assert measured == 1
    ops.state_token = lambda idx: ("running statistics moved",)  # the parameters as they were, other state not
    state, measured = step(state)
    assert measured == 1
    state, measured = step(state)
    assert measured == 0
    state, measured = step(state, c=CrestConfig(m=M, tau=1e8, coresets="at-anchor", max_age=None))  # another config
    assert measured == 1
    other = SoftmaxOps(Xtr, ytr)  # without state_token
    other.W = ops.W.copy()
    later = CrestConfig(m=M, tau=1e8, coresets="at-anchor", max_age=None)
    state, measured = step(state, o=other, c=later)  # other ops, the same parameters
    assert measured == 1 and calls() >= 4
    state, measured = step(state, o=other, c=later)
    assert measured == 1 and state.last_check is None  # SoftmaxOps has no state_token: every check measures
    cfg = CrestConfig(m=M, tau=1e8, coresets="at-anchor", max_age=None)
    state, measured = step(state, o=ops, c=cfg)
    state, measured = step(state, o=ops, c=cfg)
    assert measured == 0
    state = state._replace(need_select=True)  # a new anchor (and check set) at these parameters
    state, _ = crest_next_batch(state, ops, cfg)
    state, measured = step(state, o=ops, c=cfg)
    assert measured == 1


def test_state_dict_is_plain_data_and_restores_to_torch():
    cfg = CrestConfig(m=M)
    ops, state = train_crest(cfg, 0, 5)
    d = crest_state_dict(state)
    assert isinstance(d["anchor"], np.ndarray) and isinstance(d["drop"], dict)
    restored = crest_load_state_dict(d, torch.zeros(ops.W.size, dtype=torch.float64))
    assert isinstance(restored.anchor, torch.Tensor)
    np.testing.assert_array_equal(restored.anchor.numpy(), state.anchor)
    assert isinstance(restored.quad.g_ema, torch.Tensor)
    with pytest.raises(ValueError, match="missing"):
        crest_load_state_dict({k: v for k, v in d.items() if k != "quad"}, ops.params())


def test_a_state_dict_of_lists_or_narrow_ints_restores_the_controllers_own_arrays():
    """Lists and int32 arrays pass the validation (a JSON round trip gives lists): the restored state
    holds int64 / float64 host arrays, and continues as the state it was saved from."""
    cfg = CrestConfig(m=M)
    ops, state = train_crest(cfg, 0, 5)
    d = crest_state_dict(state)
    odd = dict(d, labels=d["labels"].tolist(), batch_idx=d["batch_idx"].astype(np.int32),
               check_idx=d["check_idx"].tolist(), batch_w=d["batch_w"].tolist(),
               drop={k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d["drop"].items()})
    a, b = crest_load_state_dict(d, ops.params()), crest_load_state_dict(odd, ops.params())
    for k in ("labels", "batch_idx", "check_idx", "batch_w"):
        assert isinstance(getattr(b, k), np.ndarray) and getattr(b, k).dtype == getattr(a, k).dtype
        np.testing.assert_array_equal(getattr(b, k), getattr(a, k))
    for k in ("losses", "steps", "head", "active", "dropped_at"):
        assert getattr(b.drop, k).dtype == getattr(a.drop, k).dtype
    sa, ba = crest_next_batch(a, ops, cfg)
    sb, bb = crest_next_batch(b, ops, cfg)
    np.testing.assert_array_equal(ba.indices, bb.indices)
    assert bb.indices.dtype == np.int64


# ================================================================================================
# a scripted model: the test chooses the loss trace
# ================================================================================================
LIBS = {
    "numpy": (lambda a: a),
    "array_api_strict": (lambda a: xs.asarray(a)),
    "torch": (lambda a: torch.asarray(a)),
}


class FakeOps:
    """Every example's cross-entropy equals ``self.level`` (C = 2: logits 0 for the true class and
    log(expm1(level)) for the other); parameters ``self.w`` move only when the test moves them;
    gradient ``self.g``; Hutchinson probe ``scales[k] * ones`` on its k-th call. Counts everything."""

    def __init__(self, labels, lib="numpy", D=3, scales=(1.0,), emb_dim=0):
        self.labels = np.asarray(labels)
        self.conv = LIBS[lib]
        self.level = 1.0
        self.w = np.zeros(D)
        self.g = np.linspace(-1.0, 1.0, D)
        self.scales = list(scales)
        self.emb_dim = emb_dim
        self.nan = False
        self.n = {"outputs": 0, "outputs_examples": 0, "gradient": 0, "gradient_examples": 0,
                  "hutchinson": 0, "hutchinson_examples": 0}
        self.output_calls = []  # (idx, level)

    def logits_host(self, idx, level=None):
        level = self.level if level is None else level
        v = math.log(math.expm1(level))
        Z = np.full((idx.size, 2), v)
        Z[np.arange(idx.size), self.labels[idx]] = 0.0
        if self.nan:
            Z[0, 0] = np.nan
        return Z

    def outputs(self, idx, embeddings=False):
        assert isinstance(idx, np.ndarray) and idx.dtype == np.int64 and idx.ndim == 1
        self.n["outputs"] += 1
        self.n["outputs_examples"] += idx.size
        self.output_calls.append((idx.copy(), self.level))
        Z = self.conv(self.logits_host(idx))
        if embeddings:
            E = np.cos(np.outer(idx, np.arange(1, self.emb_dim + 1)))  # distinct per example
            return Z, self.conv(E)
        return Z

    def params(self):
        return self.conv(self.w.copy())

    def gradient(self, idx, w):
        assert isinstance(idx, np.ndarray) and idx.dtype == np.int64
        assert isinstance(w, np.ndarray) and w.dtype == np.float64 and w.shape == idx.shape
        self.n["gradient"] += 1
        self.n["gradient_examples"] += idx.size
        # the weighted mean loss outputs() gives these examples (the protocol's; the controller compares them)
        loss = float(np.mean(w * cc.cross_entropy(np.asarray(self.logits_host(idx), dtype=np.float64),
                                                  self.labels[idx])))
        return loss, self.conv(self.g.copy())

    def hutchinson(self, idx, w, seed):
        assert isinstance(idx, np.ndarray) and idx.dtype == np.int64
        assert isinstance(seed, int) and 0 <= seed < 2**31
        k = self.n["hutchinson"]
        self.n["hutchinson"] += 1
        self.n["hutchinson_examples"] += idx.size
        return self.conv(np.full(self.w.size, self.scales[k % len(self.scales)]))


def _labels(n=120):
    return np.arange(n, dtype=np.int64) % 2


def _mean_loss(level, size):
    """What the controller measures: the mean cross-entropy of ``size`` examples at ``level``."""
    ops = FakeOps(_labels(size))
    idx = np.arange(size, dtype=np.int64)
    return float(np.mean(cc.cross_entropy(ops.logits_host(idx, level), ops.labels[idx])))


def _run_trace(cfg, levels, ops, move=None):
    """Drive the controller; before call k the model's loss level is levels[k]. Returns per-call records."""
    state = crest_init(cfg, ops.labels, seed=5)
    rec = []
    for lev in levels:
        ops.level = lev
        before, n_out = state, len(ops.output_calls)
        state, batch = crest_next_batch(state, ops, cfg)
        rec.append((before, state, batch, ops.output_calls[n_out:]))
        if move is not None:
            ops.w = ops.w + move
    return state, rec


@settings(deadline=None, max_examples=25)
@given(
    levels=st.lists(st.sampled_from([0.3, 0.5, 0.55, 0.7, 1.0, 1.2, 2.0]), min_size=6, max_size=24),
    tau=st.sampled_from([0.01, 0.05, 0.1, 0.3, 0.6]),
    T1=st.integers(1, 3),
    h=st.sampled_from([0.5, 1.0, 1.7, 3.0]),
    b=st.sampled_from([0.5, 1.0, 2.5, 5.0]),
    scales=st.lists(st.sampled_from([0.2, 0.5, 1.0, 3.0, 7.0]), min_size=1, max_size=5),
    lib=st.sampled_from(["numpy", "array_api_strict", "torch"]),
)
def test_reselects_exactly_when_rho_exceeds_tau(levels, tau, T1, h, b, scales, lib):
    # the paper's schedule (all P coresets at the anchor, the check on all of V_1): its calls are traced
    # here one by one; the just-in-time default has its own trace tests
    cfg = CrestConfig(m=4, r=12, P=2, T1=T1, tau=tau, h=h, b=b, coresets="at-anchor", check_size=None)
    ops = FakeOps(_labels(), lib=lib, scales=scales)
    state, rec = _run_trace(cfg, levels, ops)
    r = 12
    anchor_level = None
    since = 0
    T1_now, P_now = T1, cfg.P
    h_norm_0 = None
    for k, (before, after, batch, calls) in enumerate(rec):
        checked = len(after.log["checks"]) > len(before.log["checks"])
        selected = len(after.log["selections"]) > len(before.log["selections"])
        assert batch.reselected == selected
        if k == 0:
            assert selected and not checked  # the first call selects
        else:
            since += 1
            # a check is due exactly when T1 steps passed since the last selection or check
            assert checked == (since >= T1_now), (k, since, T1_now)
            if not checked:
                assert not selected  # no selection without a check saying so (dropping is off)
        if checked:
            since = 0
            step, rho, L_R, F = after.log["checks"][-1]
            assert step == k
            assert L_R == pytest.approx(_mean_loss(levels[k], r), rel=1e-12)
            assert F == pytest.approx(_mean_loss(anchor_level, r), rel=1e-12)  # delta = 0: F = L_a
            assert rho == relative_error(L_R, F)
            # the decision: a selection follows this check iff rho > tau
            assert selected == (rho > tau), (k, rho, tau)
        if selected:
            since = 0
            anchor_level = levels[k]
            cap = math.ceil(120 / cfg.m)
            P_used = min(P_now, cap)  # this selection's P: the schedule set by the previous one
            assert after.batch_idx.shape == (P_used, cfg.m)  # P coresets of m
            # the selection's forward covered the union of P subsets of r, at this step's level
            idx, lev = calls[-1]
            assert lev == levels[k] and r <= idx.size <= P_used * r
            assert len(calls) == 1 + checked
            # curvature norms: ||H_0|| from the first selection, ||H_t|| from this one
            n_sel = after.counters["selections"]
            expect = scales[(n_sel - 1) % len(scales)] * math.sqrt(3)
            assert after.h_norm_t == pytest.approx(expect, rel=1e-9)
            h_norm_0 = h_norm_0 if h_norm_0 is not None else expect
            assert after.h_norm_0 == pytest.approx(h_norm_0, rel=1e-9)
            # the schedule comes from the curvature at the new anchor (the first keeps T1 and P)
            if n_sel == 1:
                T1_now, P_now = min(T1, cap), cfg.P
            else:
                T1_now, P_now = update_schedule(after.h_norm_0, after.h_norm_t, h=h, b=b, cap=cap)
            assert (after.T1, after.P) == (T1_now, P_now)
        else:
            assert len(calls) == int(checked)
            assert (after.T1, after.P) == (before.T1, before.P)
            # between selections, the coresets are used in turn
            assert after.cursor == before.cursor + 1
            np.testing.assert_array_equal(batch.indices, after.batch_idx[before.cursor % after.batch_idx.shape[0]])
    assert state.counters["checks"] == len(state.log["checks"])
    assert state.counters["selections"] == len(state.log["selections"])


def test_rho_equal_to_tau_does_not_reselect():
    r = 12
    L0, L1 = _mean_loss(1.0, r), _mean_loss(1.5, r)
    tau = relative_error(L1, L0)  # exactly the rho the controller will measure
    for t, expect in ((tau, False), (math.nextafter(tau, 0.0), True)):
        cfg = CrestConfig(m=4, r=r, P=2, T1=1, tau=t)
        ops = FakeOps(_labels())
        state, rec = _run_trace(cfg, [1.0, 1.5], ops)
        assert state.log["checks"][0][1] == tau
        assert rec[1][2].reselected is expect


def test_check_uses_the_quadratic_model_of_the_moved_parameters():
    cfg = CrestConfig(m=4, r=12, P=2, T1=1, tau=1e9)  # never reselect: one anchor
    ops = FakeOps(_labels(), scales=(2.0,))
    move = np.array([0.1, -0.2, 0.05])
    levels = [1.0, 1.1, 0.9, 1.3, 0.7]
    state, _ = _run_trace(cfg, levels, ops, move=move)
    L_a = _mean_loss(1.0, 12)
    assert len(state.log["checks"]) == len(levels) - 1
    for k, (step, _rho, L_R, F) in enumerate(state.log["checks"], start=1):
        delta = k * move  # parameters moved k times since the anchor
        expected_F = L_a + ops.g @ delta + 0.5 * 2.0 * delta @ delta
        assert step == k and F == pytest.approx(expected_F, rel=1e-12)
        assert L_R == pytest.approx(_mean_loss(levels[k], 12), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# (4) every forward and backward the controller asks for is counted
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lib", ["numpy", "torch", "array_api_strict"])
@pytest.mark.parametrize("fit_batches, embeddings, batches, check_union", [
    (1, False, "coreset", False), (3, True, "coreset", True), (2, False, "shuffled-union", True),
])
def test_counters_match_the_calls_made(lib, fit_batches, embeddings, batches, check_union):
    cfg = CrestConfig(m=4, r=12, P=3, T1=2, tau=0.05, fit_batches=fit_batches, embeddings=embeddings,
                      batches=batches, check_union=check_union, coresets="at-anchor", check_size=None)
    ops = FakeOps(_labels(), lib=lib, emb_dim=3 if embeddings else 0)
    levels = [1.0, 1.0, 1.02, 1.5, 1.5, 0.5, 0.5, 0.52, 0.52, 2.0, 2.0, 2.0]
    state, rec = _run_trace(cfg, levels, ops)
    c = state.counters
    handed = [batch for _, _, batch, _ in rec]  # each batch handed out is a step the caller takes
    assert c["train_steps"] == len(handed) == state.step + 1
    assert c["train_examples"] == sum(b.indices.size for b in handed)
    assert c["selections"] == len(state.log["selections"]) >= 2
    assert c["checks"] == len(state.log["checks"]) >= 2
    assert ops.n["outputs"] == c["selections"] + c["checks"]
    assert ops.n["gradient"] == ops.n["hutchinson"] <= fit_batches * c["selections"]
    # forward: every output call, plus one per gradient and per Hessian-vector product;
    # backward: one per gradient, two per Hessian-vector product (a double backward)
    assert c["forward_examples"] == (ops.n["outputs_examples"] + ops.n["gradient_examples"]
                                     + ops.n["hutchinson_examples"])
    assert c["backward_examples"] == ops.n["gradient_examples"] + 2 * ops.n["hutchinson_examples"]
    if batches == "coreset":
        assert ops.n["gradient"] == min(fit_batches, cfg.P) + sum(
            min(fit_batches, after.P) for before, after, _, _ in rec[1:] if after.counters["selections"] >
            before.counters["selections"])


def test_backend_numba_with_a_model_on_a_device_solves_on_the_host(monkeypatch):
    """CrestConfig(backend="numba") with a model whose outputs live on a device (a GPU; here
    array-api-strict's "device1") raised minibatch_coresets' refusal of device arrays at the first
    selection: the controller copies the selection's features and labels to the host for the Numba
    kernels, and the run is the one a host model makes."""
    import crestcore.controller as controller

    real = controller.minibatch_coresets

    dev = xs.Device("device1")
    monkeypatch.setitem(LIBS, "strict-device1", lambda a: xs.asarray(a, device=dev))
    seen = []

    def spy(feats, y, **kw):
        seen.append((type(feats).__module__.split(".")[0], kw["backend"]))
        return real(feats, y, **kw)

    monkeypatch.setattr(controller, "minibatch_coresets", spy)
    cfg = CrestConfig(m=4, r=12, P=3, T1=2, tau=0.05, backend="numba")
    levels = [1.0, 1.0, 1.02, 1.5, 1.5, 0.5, 0.5, 0.52, 0.52, 2.0, 2.0, 2.0]
    _, on_device = _run_trace(cfg, levels, FakeOps(_labels(), lib="strict-device1"))
    assert seen and all(s == ("numpy", "numba") for s in seen)
    _, on_host = _run_trace(cfg, levels, FakeOps(_labels(), lib="numpy"))
    assert len(on_device) == len(on_host)
    for (_, _, a, _), (_, _, b, _) in zip(on_device, on_host):
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.weights, b.weights)
    # an adapter's own solve (ops.coresets, as the distributed adapter has) gets host features too: it
    # passed backend="numba" on to minibatch_coresets with the device features, which refused them
    class SolvingOps(FakeOps):
        def coresets(self, feats, y, **kw):
            seen.append(("coresets", type(feats).__module__.split(".")[0]))
            return real(feats, y, **kw)

    _, own = _run_trace(cfg, levels, SolvingOps(_labels(), lib="strict-device1"))
    assert ("coresets", "numpy") in seen and ("coresets", "array_api_strict") not in seen
    for (_, _, a, _), (_, _, b, _) in zip(own, on_host):
        np.testing.assert_array_equal(a.indices, b.indices)


@pytest.mark.parametrize("backend, numba, solver", [("auto", True, ("numpy", "auto")),
                                                    ("auto", False, ("array_api_strict", "auto")),
                                                    ("device", True, ("array_api_strict", "auto"))])
def test_auto_solves_a_device_models_selection_on_the_host_and_device_where_it_is(monkeypatch, backend, numba,
                                                                                   solver):
    """The default, backend="auto", copies a device model's selection features to the host's Numba kernels
    when Numba imports (on one H200 2.2 against 5.8 ms a selection; before, it solved them on the device,
    as "device" still does), and solves them on the device when Numba does not import; host features
    stay where they are. Every route makes the host model's run."""
    import crestcore.backends
    import crestcore.controller as controller

    real = controller.minibatch_coresets
    dev = xs.Device("device1")
    monkeypatch.setitem(LIBS, "strict-device1", lambda a: xs.asarray(a, device=dev))
    if not numba:
        monkeypatch.setattr(crestcore.backends, "backend_module", lambda name: None)
    seen = []

    def spy(feats, y, **kw):
        seen.append((type(feats).__module__.split(".")[0], kw["backend"]))
        return real(feats, y, **kw)

    monkeypatch.setattr(controller, "minibatch_coresets", spy)
    cfg = CrestConfig(m=4, r=12, P=3, T1=2, tau=0.05, backend=backend)
    levels = [1.0, 1.0, 1.02, 1.5, 1.5, 0.5, 0.5, 0.52, 0.52, 2.0, 2.0, 2.0]
    _, on_device = _run_trace(cfg, levels, FakeOps(_labels(), lib="strict-device1"))
    assert seen and set(seen) == {solver}
    seen.clear()
    _, on_host = _run_trace(cfg, levels, FakeOps(_labels(), lib="numpy"))
    assert set(seen) == {("numpy", "auto")}  # host features: their own kernels, whatever the route
    assert len(on_device) == len(on_host) > 1
    for (_, _, a, _), (_, _, b, _) in zip(on_device, on_host):
        np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))
        np.testing.assert_allclose(np.asarray(a.weights), np.asarray(b.weights), rtol=1e-12)
    assert controller.selection_on_host("numba", False) and not controller.selection_on_host("reference", False)
    with pytest.raises(ValueError, match="backend"):
        CrestConfig(backend="gpu")


def test_an_adapter_can_keep_autos_solve_on_the_device(monkeypatch):
    """Review 58: under torch.distributed with several processes every rank would run the threaded host
    kernels on the node's shared cores; an adapter's ``host_selection = False`` (the distributed one's with
    more than one process) keeps "auto"'s solve on the device, and "numba" still takes the host."""
    import crestcore.controller as controller

    real = controller.minibatch_coresets
    dev = xs.Device("device1")
    monkeypatch.setitem(LIBS, "strict-device1", lambda a: xs.asarray(a, device=dev))
    seen = []

    def spy(feats, y, **kw):
        seen.append(type(feats).__module__.split(".")[0])
        return real(feats, y, **kw)

    monkeypatch.setattr(controller, "minibatch_coresets", spy)

    class Ranked(FakeOps):
        host_selection = False

    levels = [1.0, 1.0, 1.02, 1.5, 1.5, 0.5]
    for backend, lib in (("auto", "array_api_strict"), ("numba", "numpy")):
        seen.clear()
        cfg = CrestConfig(m=4, r=12, P=3, T1=2, tau=0.05, backend=backend)
        _run_trace(cfg, levels, Ranked(_labels(), lib="strict-device1"))
        assert seen and set(seen) == {lib}


def test_auto_takes_jax_bfloat16_features_off_the_host_as_numba_and_device_do(monkeypatch):
    """Review 54: a jax model's bfloat16 logits on a GPU (stand-in: jax arrays counted as off the host) under
    the default backend="auto" were copied to a NumPy bfloat16 array (ml_dtypes), which minibatch_coresets
    refuses; "numba" and "device" worked. The copy is float32 now, as torch's bfloat16 comes to the host."""
    jnp = pytest.importorskip("jax.numpy")
    import crestcore.controller as controller

    real = controller.on_host_device
    monkeypatch.setattr(controller, "on_host_device", lambda X: False if "jax" in type(X).__module__ else real(X))
    gen = np.random.default_rng(0)
    y = gen.integers(0, 3, 200).astype(np.int64)
    X, W = gen.normal(size=(200, 5)), gen.normal(size=(5, 3)) * 0.1

    class JaxOps:
        def outputs(self, idx, embeddings=False):
            return jnp.asarray(X[idx] @ W, dtype=jnp.bfloat16)

        def params(self):
            return jnp.asarray(W.ravel())

        def gradient(self, idx, w):
            return 1.0, jnp.zeros(W.size)

        def hutchinson(self, idx, w, seed):
            return jnp.ones(W.size) * 0.1

    picks = {}
    for backend in ("numba", "device", "auto"):
        cfg = CrestConfig(m=8, r=60, P=2, backend=backend)
        _, batch = crest_next_batch(crest_init(cfg, y, seed=0), JaxOps(), cfg)
        picks[backend] = np.asarray(batch.indices)
    np.testing.assert_array_equal(picks["auto"], picks["numba"])
    np.testing.assert_array_equal(picks["auto"], picks["device"])


# ------------------------------------------------------------------------------------------------
# (5) the release's configuration runs and does what it says
# ------------------------------------------------------------------------------------------------
def test_release_configuration_trains():
    _, ytr, Xte, yte = digits()
    cfg = CrestConfig.release(m=M)
    assert cfg.kernel == "exp" and cfg.class_budget == "ceil" and cfg.batches == "shuffled-union"
    assert cfg.quadratic.variant == "adahessian" and cfg.check_union
    record = []
    ops, state = train_crest(cfg, 0, BUDGET, record=record)
    assert ops.accuracy(Xte, yte) >= 0.85
    selections = 0
    for batch, _, _ in record:  # every batch: about m real examples (no pick dropped)
        selections += batch.reselected
        assert M // 2 <= batch.indices.size <= 2 * M and np.all(batch.indices >= 0)
        assert np.all(batch.weights >= 0) and batch.weights.sum() > 0
        if selections > 1:  # (the first selection is at W = 0: a class's features are all equal, and
            assert np.all(batch.weights > 0)  # ties give one pick all; its batches are exempt)
    # the union of the coresets, weights mean 1 over all of it: every pick is in a batch
    real = state.batch_idx >= 0
    assert state.batch_w[real].mean() == pytest.approx(1.0, rel=1e-12)
    # the trust check is measured on the union of all P subsets
    assert state.check_idx.size > 128 and np.all(np.diff(state.check_idx) > 0)
    # AdaHessian curvature: positive, EMAs carried across anchors
    curv = quadratic_curvature(state.quad, cfg.quadratic)
    assert np.all(curv > 0)
    assert state.quad.n_h == state.counters["selections"] * cfg.fit_batches
    assert state.counters["selections"] >= 2


def test_default_coreset_batches_are_m_with_mean_one_weights():
    Xtr, ytr, _, _ = digits()
    cfg = CrestConfig(m=M)
    ops, state = train_crest(cfg, 0, 3)
    assert state.batch_idx.shape == (cfg.P, M) and 1 <= state.made <= cfg.P  # just in time: made as used
    np.testing.assert_allclose(state.batch_w[:state.made].mean(axis=1), 1.0, rtol=1e-12)
    for p in range(state.made):  # a coreset holds distinct examples, class-stratified
        assert np.unique(state.batch_idx[p]).size == M
        assert np.unique(ytr[state.batch_idx[p]]).size == 10


# ------------------------------------------------------------------------------------------------
# (6) dropping learned examples shrinks the pool; selection draws from the pool only
# ------------------------------------------------------------------------------------------------
def test_dropping_shrinks_the_pool_and_selection_uses_it():
    Xtr, ytr, _, _ = digits()
    cfg = CrestConfig(m=M, T2=20, drop=DropConfig(alpha=0.25, window=20, min_records=1, min_per_class=40))
    record = []
    ops, state = train_crest(cfg, 0, 140, observe=True, record=record)
    active = state.drop.active
    assert active.sum() < len(ytr)  # the pool shrank
    dropped = sum(k for _, k in state.log["drops"])
    assert dropped == len(ytr) - active.sum()
    assert all(step % cfg.T2 == 0 for step, _ in state.log["drops"])
    for c in range(10):  # min_per_class held
        assert active[ytr == c].sum() >= 40
    for batch, active_then, _ in record:  # every batch comes from the pool of its time
        assert np.all(active_then[batch.indices])
    # the selection forwards after the first drop only covered the pool of their time
    first_drop = min(step for step, k in state.log["drops"] if k > 0)
    sel_after = [s for s in state.log["selections"] if s >= first_drop]
    assert first_drop in sel_after  # a drop triggers a reselection at once
    assert np.all(state.drop.active[state.check_idx])


def test_dropping_never_shrinks_the_pool_below_a_selection():
    # everything is "learned" (alpha huge): the pool must still hold enough examples for a coreset of m
    Xtr, ytr, Xte, yte = digits()
    cfg = CrestConfig(m=M, T2=5, drop=DropConfig(alpha=1e6, window=5, min_records=1))
    with pytest.warns(UserWarning, match=f"shrunk the pool to {M} examples.*one mini-batch") as caught:
        ops, state = train_crest(cfg, 0, 40, observe=True)
    assert state.drop.active.sum() >= M
    said = [w for w in caught if "shrunk the pool" in str(w.message)]
    assert len(said) == 1 and said[0].filename == __file__  # once, when the pool reached one batch
    # the bare controller's epoch is now one step: max_age="epoch" reselects at every step, and the warning says so
    # (review 148)
    shrunk = state.log["drops"][-1][0]
    assert set(range(shrunk + 1, 40)) <= set(state.log["selections"])
    assert "reselects them at every step: max_age='epoch' is one step now" in str(said[0].message)
    with pytest.warns(UserWarning, match="shrunk the pool") as caught:  # without an age bound: no such words
        train_crest(dataclasses.replace(cfg, max_age=None), 0, 80, observe=True)
    assert not [w for w in caught if "every step" in str(w.message)]


# ------------------------------------------------------------------------------------------------
# (7) bad input
# ------------------------------------------------------------------------------------------------
def test_nan_outputs_give_a_clear_error():
    cfg = CrestConfig(m=4, r=12)
    ops = FakeOps(_labels())
    ops.nan = True
    with pytest.raises(ValueError, match="outputs"):
        crest_next_batch(crest_init(cfg, ops.labels, seed=0), ops, cfg)
    # NaN appearing later (at a check) too
    ops.nan = False
    state, _ = crest_next_batch(crest_init(cfg, ops.labels, seed=0), ops, cfg)
    ops.nan = True
    with pytest.raises(ValueError, match="outputs"):
        crest_next_batch(state, ops, cfg)


def test_outputs_of_the_wrong_shape():
    cfg = CrestConfig(m=4, r=12)

    class Short(FakeOps):
        def outputs(self, idx, embeddings=False):
            return super().outputs(idx)[:-1]

    ops = Short(_labels())
    with pytest.raises(ValueError, match="outputs"):
        crest_next_batch(crest_init(cfg, ops.labels, seed=0), ops, cfg)


def test_zero_random_subset_loss_does_not_crash_training():
    # a model that fits the check subset perfectly (cross-entropy exactly 0.0, e.g. a float32 net with
    # large margins): rho = |0 - F| / 0 is not a reason to stop the user's training loop
    cfg = CrestConfig(m=4, r=12, T1=1)

    class Perfect(FakeOps):
        def logits_host(self, idx, level=None):
            Z = np.full((idx.size, 2), -1000.0)
            Z[np.arange(idx.size), self.labels[idx]] = 0.0
            return Z

    ops = Perfect(_labels())
    state = crest_init(cfg, ops.labels, seed=0)
    for _ in range(3):
        state, batch = crest_next_batch(state, ops, cfg)
        assert batch.indices.shape == (4,)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tau=0.0), "tau"), (dict(tau=-1.0), "tau"), (dict(tau=float("nan")), "tau"),
    (dict(tau=float("inf")), "tau"), (dict(m=0), "m"), (dict(P=0), "P"), (dict(T1=1.5), "T1"),
    (dict(r=0), "r"), (dict(T2=0), "T2"), (dict(P_cap=-1), "P_cap"), (dict(h=0.0), "h"),
    (dict(b=float("nan")), "b"), (dict(batches="random"), "batches"), (dict(class_budget="x"), "class_budget"),
    (dict(fit_batches=0), "fit_batches"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrestConfig(**kwargs)


def test_subset_smaller_than_the_batch_is_rejected():
    with pytest.raises(ValueError, match=r"\bm\b|\br\b"):
        cfg = CrestConfig(m=8, r=4)
        ops = FakeOps(_labels())
        crest_next_batch(crest_init(cfg, ops.labels, seed=0), ops, cfg)


@pytest.mark.parametrize("labels, seed, exc, match", [
    (np.arange(10) % 2, 0, ValueError, "m"),  # m = 16 > n = 10
    (np.zeros(50, dtype=np.int64), 0, ValueError, "single class"),
    (np.zeros(0, dtype=np.int64), 0, ValueError, "labels"),
    (np.zeros((5, 10), dtype=np.int64), 0, ValueError, "labels"),
    (np.arange(50) % 2 * 1.0, 0, TypeError, "labels"),
    (np.arange(50) % 2 - 1, 0, ValueError, "labels"),
    (np.arange(50) % 2, -1, ValueError, "seed"),
    (np.arange(50) % 2, 1.5, ValueError, "seed"),
    (np.arange(50) % 2, True, ValueError, "seed"),
])
def test_bad_init(labels, seed, exc, match):
    with pytest.raises(exc, match=match):
        crest_init(CrestConfig(m=16), labels, seed=seed)


def test_init_accepts_labels_from_any_library():
    y = np.arange(40) % 4
    a = crest_init(CrestConfig(m=8), y, seed=0)
    b = crest_init(CrestConfig(m=8), torch.tensor(y), seed=0)
    c = crest_init(CrestConfig(m=8), xs.asarray(y), seed=0)
    for s in (b, c):
        np.testing.assert_array_equal(s.labels, a.labels)
        assert s.labels.dtype == np.int64 and s.n_classes == 4


# ================================================================================================
# the schedule, the cap, dropping and batch layout (issue: CREST has to beat re-drawn random)
# ================================================================================================
def _select_only(cfg, levels, scales, n=120, **init):
    ops = FakeOps(_labels(n), scales=scales)
    state = crest_init(cfg, ops.labels, seed=5, **init)
    out = []
    for lev in levels:
        ops.level = lev
        state, batch = crest_next_batch(state, ops, cfg)
        out.append((state, batch))
    return state, out


def test_first_reselection_takes_t1_from_the_new_anchors_curvature():
    # ||H_0|| = 1 * sqrt(3) at the first anchor, ||H_1|| = 4 * sqrt(3) at the second: T1 = ceil(8 / 4) = 2.
    # (Computing the update from the abandoned first anchor gave ceil(h) = 8 whatever the curvature.)
    cfg = CrestConfig(m=4, r=12, P=2, T1=1, tau=0.01, h=8.0, b=1.5)
    state, out = _select_only(cfg, [1.0, 2.0], scales=(1.0, 4.0))
    assert state.counters["selections"] == 2
    assert (state.T1, state.P) == (2, 3)
    # the curvature 4x smaller instead: T1 = ceil(8 * 4 / 1) = 32, capped at one virtual epoch (120 / 4)
    state, _ = _select_only(cfg, [1.0, 2.0], scales=(4.0, 1.0))
    assert (state.T1, state.P) == (30, 30)


def test_cap_is_one_budgeted_epoch():
    cfg = CrestConfig(m=4, r=12, P=2, T1=1, tau=0.01, h=8.0, b=5.0)
    # T1 = 32 and P = 160 uncapped; the loaders' budgeted epoch (epoch_steps) caps both
    state, _ = _select_only(cfg, [1.0, 2.0], scales=(4.0, 1.0), epoch_steps=7)
    assert (state.T1, state.P) == (7, 7)
    # P_cap wins over epoch_steps
    cfg2 = CrestConfig(m=4, r=12, P=2, T1=1, tau=0.01, h=8.0, b=5.0, P_cap=5)
    state, _ = _select_only(cfg2, [1.0, 2.0], scales=(4.0, 1.0), epoch_steps=7)
    assert (state.T1, state.P) == (5, 5)
    # a selection never draws more than the cap, even when the configured P is larger
    cfg3 = CrestConfig(m=4, r=12, P=9, T1=3)
    state, _ = _select_only(cfg3, [1.0], scales=(1.0,), epoch_steps=4)
    assert state.batch_idx.shape[0] == 4
    with pytest.raises(ValueError, match="epoch_steps"):
        crest_init(cfg3, _labels(), seed=0, epoch_steps=0)


def test_reselect_epoch_selects_every_budgeted_epoch_without_checks():
    cfg = CrestConfig(m=4, r=12, reselect="epoch")
    state, out = _select_only(cfg, [1.0] * 13, scales=(1.0, 3.0), epoch_steps=5)
    assert state.log["selections"] == [0, 5, 10]
    assert state.counters["checks"] == 0
    assert all(s.batch_idx.shape[0] == 5 for s, _ in out)


def test_drop_triggered_reselection_keeps_the_trust_check_running():
    # T1 = 6 > T2 = 4: the drop-triggered reselections at steps 4, 8, ... must not reset the check clock
    drop = DropConfig(alpha=10.0, window=4, min_records=1, floor=1)  # every recorded example is learned
    cfg = CrestConfig(m=4, r=12, P=2, T1=6, tau=1e9, h=6.0, T2=4, drop=drop)  # constant curvature: T1 = 6
    ops = FakeOps(_labels(400), scales=(1.0,))
    state = crest_init(cfg, ops.labels, seed=5)
    for _ in range(20):
        state, batch = crest_next_batch(state, ops, cfg)
    drops = [d for d in state.log["drops"] if d[1] > 0]
    assert len(drops) >= 2  # the pool did shrink, more than once
    checks = [c[0] for c in state.log["checks"]]
    assert checks == [6, 12, 18]
    # P never exceeds what the next drop decision lets the run use
    for step in state.log["selections"]:
        assert step % 4 == 0


@pytest.mark.parametrize("coresets", ["just-in-time", "at-anchor"])
def test_dropping_that_drops_nothing_leaves_the_batches_as_they_are(coresets):
    """Drop decisions (T2) that drop nothing change no batch: the run trains on the batches of the same
    run without dropping. (A selection used to draw only the steps left before the next decision of
    coresets; when that decision dropped nothing, the cut-down set was cycled until the next failed
    check: T2 = 1 trained 64 steps on one coreset.) A decision that does drop starts a new selection."""
    drop = DropConfig(alpha=1e-9, window=4, min_records=1)  # nothing is ever learned
    runs = []
    for T2 in (None, 1, 4, 7):
        cfg = CrestConfig(m=4, r=12, P=10, T1=3, tau=0.01, T2=T2, drop=drop, coresets=coresets)
        ops = FakeOps(_labels(400))
        state = crest_init(cfg, ops.labels, seed=5)
        batches = []
        for t in range(40):
            ops.level = 1.0 + 0.1 * (t % 5)  # the model's loss moves: checks fail now and then
            state, batch = crest_next_batch(state, ops, cfg)
            state = crest_observe(state, batch.indices, np.full(batch.indices.size, ops.level))
            batches.append(batch.indices)
        assert state.drop.active.all()
        runs.append((state.log["selections"], batches))
    for sel, batches in runs[1:]:
        assert list(sel) == list(runs[0][0])
        for a, b in zip(batches, runs[0][1]):
            np.testing.assert_array_equal(a, b)
    assert np.unique(np.concatenate(runs[0][1])).size > 40  # many coresets, not one cycled


def test_a_drop_decision_that_drops_starts_a_new_selection():
    drop = DropConfig(alpha=10.0, window=1, min_records=1)  # every recorded example is learned
    cfg = CrestConfig(m=4, r=12, P=10, T1=50, tau=10.0, T2=3, drop=drop)
    ops = FakeOps(_labels(400))
    state = crest_init(cfg, ops.labels, seed=5)
    for _ in range(7):
        state, batch = crest_next_batch(state, ops, cfg)
        state = crest_observe(state, batch.indices, np.full(batch.indices.size, 0.5))
    assert [d[0] for d in state.log["drops"] if d[1] > 0][:2] == [3, 6]
    assert list(state.log["selections"])[:3] == [0, 3, 6]


def test_crest_observe_records_at_the_step_it_is_given():
    # a loop whose loader fetches ahead passes the trained batch's step: the records carry it, a later step
    # than the one handed out last (or a negative one, or a bool) is refused by name
    cfg = CrestConfig(m=4, r=12, P=10, T1=50, tau=10.0, T2=100, drop=DropConfig(history=8))
    ops = FakeOps(_labels(400))
    state = crest_init(cfg, ops.labels, seed=5)
    handed = []
    for _ in range(4):
        state, batch = crest_next_batch(state, ops, cfg)
        handed.append(batch.indices)
    assert state.step == 3
    state = crest_observe(state, handed[0], np.full(handed[0].size, 7.0), step=0)
    state = crest_observe(state, handed[1], np.full(handed[1].size, 8.0), step=np.int64(1))
    for t, value in ((0, 7.0), (1, 8.0)):
        rows = state.drop.losses[handed[t]]
        steps = state.drop.steps[handed[t]]
        assert ((rows == value) == (steps == t)).all() and (rows == value).any(axis=1).all()
    state = crest_observe(state, handed[3], np.full(handed[3].size, 9.0))  # default: the step handed out last
    assert (state.drop.steps[handed[3]][state.drop.losses[handed[3]] == 9.0] == 3).all()
    for bad in (4, -1, True, 1.0):
        with pytest.raises(ValueError, match=r"step must be an integer in \[0, 3\]"):
            crest_observe(state, handed[2], np.full(handed[2].size, 1.0), step=bad)


def _rare_class_labels():
    y = np.zeros(400, dtype=np.int64)
    y[:3] = 1  # a rare class
    return y


@pytest.mark.parametrize("batches", ["coreset", "shuffled-union"])
def test_no_pick_is_silently_dropped(batches):
    y = _rare_class_labels()
    cfg = CrestConfig.release(m=100, r=120, P=1, batches=batches)  # 50 + 3 picks < m
    ops = FakeOps(y)
    ops.labels = y
    state = crest_init(cfg, y, seed=3)
    state, batch = crest_next_batch(state, ops, cfg)  # used to crash: cannot reshape 84 into (1, 128)
    real = state.batch_idx >= 0
    assert batch.indices.size == real.sum() and batch.indices.size <= 120
    assert batch.weights.mean() == pytest.approx(1.0, rel=1e-12)
    # P = 3 coresets of different lengths: every pick is handed out, weights mean 1 as configured
    cfg = CrestConfig.release(m=40, r=120, P=3, batches=batches, class_budget="ceil")
    state = crest_init(cfg, y, seed=4)
    state, _ = crest_next_batch(state, ops, cfg)
    lens = (state.batch_idx >= 0).sum(axis=1)
    handed = []
    for k in range(state.batch_idx.shape[0]):
        if k:
            state, b = crest_next_batch(state, ops, cfg)
        else:
            b = _
        handed.append(b.indices)
        if batches == "coreset":
            assert b.weights.mean() == pytest.approx(1.0, rel=1e-12)
    assert sum(h.size for h in handed) == lens.sum()
    if batches == "shuffled-union":
        allw = state.batch_w[state.batch_idx >= 0]
        assert allw.mean() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("rule", ["cluster", "uniform", "tempered"])
def test_weight_rules(rule):
    Xtr, ytr, _, _ = digits()
    cfg = CrestConfig(m=M, weights=rule)
    ops, state = train_crest(cfg, 0, 1)
    real = state.batch_idx[:state.made] >= 0  # the coresets made so far (just in time: as used)
    for p in range(state.made):
        w = state.batch_w[p][real[p]]
        assert w.mean() == pytest.approx(1.0, rel=1e-12)
        if rule == "uniform":
            np.testing.assert_allclose(w, 1.0)
    if rule != "uniform":
        assert state.batch_w[:state.made][real].std() > 0
    with pytest.raises(ValueError, match="weights"):
        CrestConfig(weights="sizes")
    with pytest.raises(ValueError, match="reselect"):
        CrestConfig(reselect="never")


def test_max_overhead_bounds_the_counted_passes():
    Xtr, ytr, _, _ = digits()
    for frac in (0.1, 0.3):
        cfg = CrestConfig(m=M, T1=1, tau=1e-6, max_overhead=frac)  # every check fails: wants to reselect always
        ops, state = train_crest(cfg, 0, 120)
        c = state.counters
        spent = c["forward_examples"] + 2 * c["backward_examples"]
        # at most one selection (P r forward + the fit) or check past the allowance
        r = max(10 * math.ceil(0.01 * ytr.size / 10), 4 * M)
        one = state.P * r + 8 * M + r
        assert spent <= frac * 3 * c["train_examples"] + one
        assert state.counters["selections"] >= 2  # the gate delays, it does not forbid
    free = CrestConfig(m=M, T1=1, tau=1e-6)
    _, st_free = train_crest(free, 0, 120)
    assert st_free.counters["checks"] > state.counters["checks"]
    with pytest.raises(ValueError, match="max_overhead"):
        CrestConfig(max_overhead=0.0)


def test_paper_config_is_the_papers_algorithm():
    p = CrestConfig.paper()
    assert (p.P, p.T1, p.tau, p.h, p.b) == (5, 1, 0.1, 1.0, 5.0)
    assert (p.weights, p.reselect, p.max_overhead, p.batches, p.kernel) == (
        "cluster", "trust", None, "coreset", "max-minus")
    assert p.quadratic.variant == "hutchinson"
    assert CrestConfig.paper(m=64).m == 64


def test_exploding_finite_logits_are_reported_as_divergence():
    class Exploding(FakeOps):
        def logits_host(self, idx, level=None):
            Z = np.zeros((idx.size, 2), dtype=np.float32)
            Z[:, 0], Z[:, 1] = 3e38, -3e38  # finite, but the log-sum-exp overflows in float32
            return Z

    ops = Exploding(_labels())
    ops.labels = np.ones(120, dtype=np.int64)
    ops.labels[::2] = 0
    cfg = CrestConfig(m=4, r=12, P=2)
    state = crest_init(cfg, ops.labels, seed=0)
    with pytest.raises(FloatingPointError, match="step 0"):
        crest_next_batch(state, ops, cfg)


def test_a_loss_mean_that_overflows_is_reported_as_divergence():
    class Huge(FakeOps):
        def logits_host(self, idx, level=None):
            Z = np.zeros((idx.size, 2), dtype=np.float32)
            Z[np.arange(idx.size), 1 - self.labels[idx]] = 3e38 if self.level > 5 else 0.0
            return Z  # every loss finite (3e38) but their float32 mean overflows

    ops = Huge(_labels())
    cfg = CrestConfig(m=4, r=12, P=2, T1=1)
    state = crest_init(cfg, ops.labels, seed=0)
    state, _ = crest_next_batch(state, ops, cfg)
    ops.level = 10.0
    with pytest.raises(FloatingPointError, match="step 1"):
        crest_next_batch(state, ops, cfg)


# ------------------------------------------------------------------------------------------------
# coresets="just-in-time" and check_size
# ------------------------------------------------------------------------------------------------
def test_just_in_time_coreset_p_is_selected_from_subset_p_at_the_parameters_of_step_p():
    """The P subsets are the anchor's draw; coreset p is what facility location picks from V_p with the
    features of the parameters at step p, after that step's check; the anchor's check set is V_1."""
    from crestcore.minibatch import draw_subsets

    Xtr, ytr, _, _ = digits()
    P, seed = 5, 4
    cfg = CrestConfig(m=M, P=P, T1=1, tau=1e9, coresets="just-in-time")  # no check ever fails
    ops = SoftmaxOps(Xtr, ytr)
    state = crest_init(cfg, ytr, seed=seed)
    r = max(10 * math.ceil(0.01 * ytr.size / 10), 4 * M)
    V = draw_subsets(ytr, np.arange(ytr.size), r, P, np.random.default_rng([seed, 0]))
    for k in range(P + 3):
        W_now = ops.W.copy()
        n_calls = len(ops.calls["outputs"])
        state, batch = crest_next_batch(state, ops, cfg)
        calls = ops.calls["outputs"][n_calls:]
        if k < P:  # a coreset of its own, from V_k, at this step's parameters
            assert state.made == k + 1 and calls[-1].tolist() == V[k].tolist()
            Z = Xtr[V[k]] @ W_now
            feats = cc.last_layer_gradients(Z, ytr[V[k]])
            # per class: the greedy's first b_c picks among V_k's members of the class (b_c: the class's
            # share of m, its leftover picks drawn at random, read off the batch)
            lab = ytr[batch.indices]
            assert batch.indices.size == M and set(batch.indices.tolist()) <= set(V[k].tolist())
            for c in np.unique(ytr[V[k]]):
                own = ytr[V[k]] == c
                b_c = int(np.sum(lab == c))
                assert b_c >= 1  # m = 32 >= 10 classes: each present class has a pick
                want = cc.facility_location(feats[own], b_c, kernel=cfg.kernel, metric=cfg.metric)
                assert sorted(batch.indices[lab == c].tolist()) == sorted(V[k][own][want.indices].tolist())
        else:  # all P made: they are cycled, nothing more is forwarded but the checks
            assert state.made == P and all(c.tolist() == V[0].tolist() for c in calls)
            np.testing.assert_array_equal(batch.indices, state.batch_idx[k % P][state.batch_idx[k % P] >= 0])
        if k:  # every step after the first checks on V_1
            assert calls[0].tolist() == V[0].tolist()
        _, g = ops.loss_grad(batch.indices, batch.weights)
        ops.W -= LR * g.reshape(ops.W.shape)
    assert state.counters["selections"] == 1


def test_checks_reuse_checks_only_the_steps_that_cycle_a_coreset():
    """checks="reuse" with just-in-time coresets: a step that selects its own coreset is not checked (no
    forward of the check set), the steps that cycle the coresets made are, every T1 from there; the
    coresets are the same as with checks="every" while no check fails."""
    Xtr, ytr, _, _ = digits()
    P = 4
    logs = {}
    for rule in ("every", "reuse"):
        cfg = CrestConfig(m=M, P=P, T1=1, tau=1e9, check_size=40, checks=rule)  # no check ever fails
        ops = SoftmaxOps(Xtr, ytr)
        state = crest_init(cfg, ytr, seed=3)
        batches = []
        for k in range(P + 3):
            n_calls = len(ops.calls["outputs"])
            state, batch = crest_next_batch(state, ops, cfg)
            calls = ops.calls["outputs"][n_calls:]
            batches.append(batch.indices.tolist())
            checked = any(c.tolist() == state.check_idx.tolist() for c in calls)
            if rule == "reuse":
                assert checked == (k >= P), k  # steps 1..P-1 each made a coreset; from step P they are cycled
            else:
                assert checked == (k >= 1), k
            _, g = ops.loss_grad(batch.indices, batch.weights)
            ops.W -= LR * g.reshape(ops.W.shape)
        logs[rule] = (batches, [c[0] for c in state.log["checks"]], state.counters)
    assert logs["every"][0] == logs["reuse"][0]  # the same batches
    assert logs["reuse"][1] == list(range(P, P + 3)) and logs["every"][1] == list(range(1, P + 3))
    assert logs["every"][2]["forward_examples"] - logs["reuse"][2]["forward_examples"] == (P - 1) * 40


def test_checks_reuse_counts_the_skipped_steps_towards_t1():
    """T1 = 3: "every" checks at steps 3, 6, 9; "reuse" skips step 3 (it selects its own coreset), so the
    due check runs at step 4, the first that cycles a coreset, and every 3 steps from there."""
    Xtr, ytr, _, _ = digits()
    checked = {}
    for rule in ("every", "reuse"):
        cfg = CrestConfig(m=M, P=4, T1=3, b=4, tau=1e9, check_size=40, checks=rule)  # P stays 4, no failure
        ops, state = train_crest(cfg, 3, 12)
        checked[rule] = [c[0] for c in state.log["checks"]]
    assert checked["every"] == [3, 6, 9]
    assert checked["reuse"] == [4, 7, 10]


@settings(deadline=None, max_examples=15)
@given(P=st.integers(2, 7), T1=st.integers(1, 3), tau=st.sampled_from([0.005, 0.05, 1.0]),
       cap=st.sampled_from([None, 0.3, 1.0]), max_age=st.sampled_from([None, "epoch", 5]),
       fit_batches=st.integers(1, 2), drop=st.booleans(), seed=st.integers(0, 50))
def test_checks_reuse_skips_exactly_the_steps_that_select_their_own_coreset(P, T1, tau, cap, max_age,
                                                                            fit_batches, drop, seed):
    """Whatever the schedule: no step whose batch is a just-in-time coreset selected at that step is
    checked, and no step that trains on a coreset selected earlier skips a check that was due and
    affordable (the fitted coresets of fit_batches > 1, a cap that defers the next coreset's forward)."""
    from crestcore.controller import _affordable

    Xtr, ytr, _, _ = digits()
    extra = dict(T2=4, drop=DropConfig(alpha=0.3, window=4, min_records=1, floor=300)) if drop else {}
    cfg = CrestConfig(m=M, P=P, T1=T1, tau=tau, max_overhead=cap, check_size=20, max_age=max_age,
                      fit_batches=fit_batches, checks="reuse", **extra)
    ops = SoftmaxOps(Xtr, ytr)
    state = crest_init(cfg, ytr, seed=seed, epoch_steps=12)
    for k in range(40):
        before = state
        state, batch = crest_next_batch(state, ops, cfg)
        if k and not batch.reselected:
            checked = state.counters["checks"] > before.counters["checks"]
            fresh = state.made > before.made  # selected now, from its own subset
            due = not before.need_select and before.since_check + 1 >= before.T1 and _affordable(before, cfg)
            assert not (checked and fresh), k
            assert checked or fresh or not due, k
        _, g = ops.loss_grad(batch.indices, batch.weights)
        if drop:
            state = crest_observe(state, batch.indices, cc.cross_entropy(ops.X[batch.indices] @ ops.W,
                                                                           ops.y[batch.indices]))
        ops.W -= LR * g.reshape(ops.W.shape)


def test_checks_reuse_reselects_once_the_coresets_made_are_used_up_when_every_check_fails():
    """Every check fails: with checks="every" each step is a new selection (and a model fit); with
    "reuse" the steps that make their own coreset are not checked, so a selection lasts its P steps."""
    levels = [1.0, 1.5, 0.6, 2.0, 0.8, 1.9, 0.5, 1.7, 0.9, 2.2]
    P = 3
    out = {}
    for rule in ("every", "reuse"):
        cfg = CrestConfig(m=4, r=12, P=P, T1=1, b=P, tau=0.01, checks=rule)  # b = P: P stays 3
        state, rec = _run_trace(cfg, levels, FakeOps(_labels()))
        out[rule] = [k for k, (_, _, batch, _) in enumerate(rec) if batch.reselected]
        assert state.counters["selections"] == len(out[rule])
    assert out["every"] == list(range(len(levels)))
    assert out["reuse"] == list(range(0, len(levels), P))


@pytest.mark.parametrize("kwargs", [dict(coresets="at-anchor"), dict(reselect="epoch", P_cap=4)],
                         ids=["at-anchor", "reselect-epoch"])
def test_checks_reuse_is_checks_every_with_at_anchor_coresets_or_epoch_reselection(kwargs):
    """At-anchor coresets: every step trains on a coreset selected at the anchor, so both rules check
    alike; reselect="epoch" never checks. The same run, bit for bit."""
    runs = []
    for rule in ("every", "reuse"):
        cfg = CrestConfig(m=M, P=4, tau=0.02, checks=rule, **kwargs)
        ops, state = train_crest(cfg, 2, 30)
        runs.append((ops.W, state.log, state.counters))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] and runs[0][2] == runs[1][2]
    assert runs[0][2]["selections"] > 1
    assert (runs[0][2]["checks"] > 0) == (kwargs.get("reselect") != "epoch")


def test_probe_size_measures_the_hessian_vector_product_on_a_seeded_sample_of_the_coreset():
    """probe_size=k: the gradient on the whole fitted coreset, the probe on k of its examples (drawn from
    the selection's seed, their weights kept); counted as such; None, or k >= the coreset, is the
    unsampled fit, bit for bit."""

    class Logged(SoftmaxOps):
        def __init__(self, *a):
            super().__init__(*a)
            self.fits = []

        def gradient(self, idx, w):
            self.fits.append(("gradient", np.asarray(idx).copy(), np.asarray(w).copy()))
            return self.loss_grad(idx, w)

        def hutchinson(self, idx, w, seed):
            self.fits.append(("hutchinson", np.asarray(idx).copy(), np.asarray(w).copy()))
            z = np.random.default_rng(seed).choice([-1.0, 1.0], size=self.W.size)
            return z * self.hvp(idx, w, z)

    Xtr, ytr, _, _ = digits()
    runs = {}
    for k in (None, 8, M, 10 * M):
        cfg = CrestConfig(m=M, tau=0.02, probe_size=k)
        ops = Logged(Xtr, ytr)
        ops, state = train_crest(cfg, 4, 25, ops=ops)
        runs[k] = (ops, state)
        grads = [f for f in ops.fits if f[0] == "gradient"]
        probes = [f for f in ops.fits if f[0] == "hutchinson"]
        assert len(grads) == len(probes) == state.counters["selections"] > 1
        for (_, gi, gw), (_, hi, hw) in zip(grads, probes):
            assert gi.size == M
            if k == 8:
                pos = {int(i): j for j, i in enumerate(gi)}
                at = [pos[int(i)] for i in hi]  # a KeyError if a probed example is not the coreset's
                assert len(set(at)) == 8 and at == sorted(at)  # 8 distinct examples, in the coreset's order
                np.testing.assert_array_equal(hw, gw[at])
            else:
                np.testing.assert_array_equal(hi, gi)
                np.testing.assert_array_equal(hw, gw)
    base = runs[None][1].counters
    for k in (M, 10 * M):  # no sample: the same run
        np.testing.assert_array_equal(runs[k][0].W, runs[None][0].W)
        assert runs[k][1].counters == base and runs[k][1].log == runs[None][1].log
    c8 = runs[8][1].counters
    fits = c8["selections"]
    outputs = sum(int(i.size) for i in runs[8][0].calls["outputs"])
    assert c8["forward_examples"] - outputs == fits * (M + 8)
    assert c8["backward_examples"] == fits * (M + 2 * 8)
    again = train_crest(CrestConfig(m=M, tau=0.02, probe_size=8), 4, 25, ops=Logged(Xtr, ytr))
    np.testing.assert_array_equal(again[0].W, runs[8][0].W)  # seeded: the same run again


def test_a_resumed_run_under_max_overhead_decides_as_the_uninterrupted_one_with_reused_checks():
    """With ops.state_token a check at unchanged parameters reuses the last check's measurement, which a
    loaded state does not hold: the resumed run measured it, and under max_overhead that extra count
    crossed the cap, so it cycled an old coreset where the uninterrupted run selected a new one (review
    71: other batches from the first step after the load). A reused check counts as measured for the cap
    (counters["reused_examples"]); a state saved before that counter loads with it at 0."""

    class TokenOps(SoftmaxOps):
        def state_token(self, idx):
            return 0  # the outputs depend on params() alone

    Xtr, ytr, _, _ = digits()
    X, y = Xtr[:300], ytr[:300]
    config = CrestConfig(m=8, max_overhead=1.0, tau=10.0, check_size=128)
    frozen, save, steps = range(3, 11), 8, 20  # steps 3-10 leave the parameters as they were

    def run(ops, state, start, log):
        for t in range(start, steps):
            if t == save and start == 0:
                log["saved"] = (crest_state_dict(state), ops.W.copy())
            state, b = crest_next_batch(state, ops, config)
            log.setdefault("batches", []).append(b.indices.tolist())
            _, g = ops.loss_grad(b.indices, b.weights)
            ops.W -= (0.0 if t in frozen else 0.5) * g.reshape(ops.W.shape)
        return state

    log: dict = {}
    full = run(TokenOps(X, y), crest_init(config, y, seed=0), 0, log)
    assert full.counters["reused_examples"] > 0  # the case: checks answered from memory
    d, W = log["saved"]
    for old_format in (False, True):
        dd = copy.deepcopy(d)
        if old_format:
            del dd["counters"]["reused_examples"]
        ops = TokenOps(X, y)
        ops.W = W.copy()
        log2: dict = {}
        run(ops, crest_load_state_dict(dd, ops.params()), save, log2)
        if not old_format:
            assert log2["batches"] == log["batches"][save:]


def test_probe_every_probes_the_curvature_at_every_kth_selection_only():
    """probe_every=k: selections 0, k, 2k, ... fit the gradient and a Hutchinson probe; the others the
    gradient alone, the last probe's curvature kept; counted as such."""

    class Logged(SoftmaxOps):
        def __init__(self, *a):
            super().__init__(*a)
            self.fits = []

        def gradient(self, idx, w):
            self.fits.append("gradient")
            return self.loss_grad(idx, w)

        def hutchinson(self, idx, w, seed):
            self.fits.append("hutchinson")
            z = np.random.default_rng(seed).choice([-1.0, 1.0], size=self.W.size)
            return z * self.hvp(idx, w, z)

    Xtr, ytr, _, _ = digits()
    runs = {}
    for k in (1, 3):
        seen = []  # (selection number, curvature average after it) at every selection
        ops = Logged(Xtr, ytr)
        cfg = CrestConfig(m=M, tau=0.005, probe_every=k)
        state = crest_init(cfg, ytr, seed=4)
        for _ in range(60):
            before = state.counters["selections"]
            state, batch = crest_next_batch(state, ops, cfg)
            if state.counters["selections"] > before:
                seen.append((before, state.quad.n_h, np.array(state.quad.h_ema, copy=True)))
            _, g = ops.loss_grad(batch.indices, batch.weights)
            ops.W -= LR * g.reshape(ops.W.shape)
        runs[k] = (ops, state, seen)
        assert len(seen) > 3
        for j, (sel, n_h, h) in enumerate(seen):
            assert n_h == 1  # the hutchinson variant: one probe, this anchor's or the last probing one's
            if sel % k:
                np.testing.assert_array_equal(h, seen[j - 1][2])  # the curvature of the last probe, kept
            elif j:
                assert not np.array_equal(h, seen[j - 1][2])  # a new probe
        assert ops.fits.count("gradient") == len(seen)
        assert ops.fits.count("hutchinson") == sum(1 for s, _, _ in seen if s % k == 0)
    # the counters: a fit without the probe is one forward and one backward of the coreset
    o3, s3, seen3 = runs[3]
    assert o3.fits.count("hutchinson") < len(seen3)
    outputs = sum(int(i.size) for i in o3.calls["outputs"])
    probes = o3.fits.count("hutchinson")
    fits = len(seen3)
    assert s3.counters["forward_examples"] - outputs == 2 * M * probes + M * (fits - probes)
    assert s3.counters["backward_examples"] == 3 * M * probes + M * (fits - probes)
    with pytest.raises(ValueError, match="probe_every"):
        CrestConfig(probe_every=0)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_a_selection_cut_short_forwards_only_the_subsets_it_used(lib):
    """Every check fails: at-anchor forwards P subsets per selection, just-in-time one; the counters
    hold every example forwarded either way."""
    levels = [1.0, 1.5, 0.6, 2.0, 0.8, 1.9, 0.5]
    spent = {}
    for mode in ("at-anchor", "just-in-time"):
        cfg = CrestConfig(m=4, r=12, P=3, T1=1, tau=0.01, coresets=mode)
        ops = FakeOps(_labels(), lib=lib)
        state, rec = _run_trace(cfg, levels, ops)
        c = state.counters
        assert c["selections"] == len(levels)  # each check failed
        assert c["forward_examples"] == (ops.n["outputs_examples"] + ops.n["gradient_examples"]
                                         + ops.n["hutchinson_examples"])
        sel_examples = ops.n["outputs_examples"] - 12 * c["checks"]
        spent[mode] = sel_examples
        if mode == "just-in-time":  # V_1 alone (r = 12 distinct examples) per selection
            assert sel_examples == 12 * c["selections"]
    assert spent["just-in-time"] * 2 < spent["at-anchor"]


def test_check_size_measures_the_check_on_a_random_part_of_v1():
    Xtr, ytr, _, _ = digits()
    cfg = CrestConfig(m=M, check_size=40, tau=0.02)
    ops, state = train_crest(cfg, 0, 30)
    from crestcore.minibatch import draw_subsets

    assert state.check_idx.size == 40 and np.all(np.diff(state.check_idx) > 0)
    # the check set of the first selection is inside its V_1
    first = crest_init(cfg, ytr, seed=0)
    first, _ = crest_next_batch(first, SoftmaxOps(Xtr, ytr), cfg)
    r = max(10 * math.ceil(0.01 * ytr.size / 10), 4 * M)
    V1 = draw_subsets(ytr, np.arange(ytr.size), r, cfg.P, np.random.default_rng([0, 0]))[0]
    assert first.check_idx.size == 40 and np.isin(first.check_idx, V1).all()
    assert first.quad.anchor_loss == pytest.approx(
        float(np.mean(cc.cross_entropy(np.zeros((40, 10)), ytr[first.check_idx]))))
    assert CrestConfig(m=M, check_size=10_000).check_size == 10_000  # larger than V_1: all of V_1


def _ops_returning(**over):
    """SoftmaxOps on digits whose ModelOps methods are replaced by ``over`` (name -> function of self)."""
    Xtr, ytr, _, _ = digits()
    cls = type("Broken", (SoftmaxOps,), dict(over))  # functions become methods: self is their first argument
    return cls(Xtr, ytr), ytr


@pytest.mark.parametrize("over, err, match", [
    (dict(hutchinson=lambda self, i, w, s: None), TypeError, r"ops\.hutchinson returned None"),
    (dict(gradient=lambda self, i, w: (1.0, None)), TypeError, r"ops\.gradient returned None"),
    (dict(gradient=lambda self, i, w: self.loss_grad(i, w)[1]), TypeError, r"ops\.gradient must return \(loss, flat"),
    (dict(gradient_and_hutchinson=lambda self, i, w, s: (1.0, None, None)), TypeError,
     r"ops\.gradient_and_hutchinson returned None"),
    (dict(gradient_and_hutchinson=lambda self, i, w, s: self.loss_grad(i, w)), TypeError,
     r"ops\.gradient_and_hutchinson must return"),
    (dict(gradient=lambda self, i, w: (1.0, self.loss_grad(i, w)[1][:-1])), ValueError,
     r"ops\.gradient's.*grad has length"),
    (dict(gradient=lambda self, i, w: (1.0, self.loss_grad(i, w)[1].astype(np.float32))), TypeError,
     r"ops\.gradient's.*cast float64 weights"),
])
def test_a_model_fit_that_gets_the_wrong_thing_from_the_ops_names_the_method(over, err, match):
    """What a ModelOps method returns is checked where the controller reads it: None (which the quadratic
    model would take as "no sample" and run on with no curvature), a wrong arity, a wrong length or dtype,
    each an error naming the method."""
    ops, ytr = _ops_returning(**over)
    cfg = CrestConfig(m=M)
    with pytest.raises(err, match=match):
        crest_next_batch(crest_init(cfg, ytr, seed=0), ops, cfg)


def test_controller_functions_name_a_wrong_argument():
    Xtr, ytr, _, _ = digits()
    ops, cfg = SoftmaxOps(Xtr, ytr), CrestConfig(m=M)
    state = crest_init(cfg, ytr, seed=0)
    with pytest.raises(TypeError, match=r"config must be a CrestConfig.*\(state, ops, config\)"):
        crest_next_batch(state, cfg, ops)
    with pytest.raises(TypeError, match=r"state must be the CrestState.*\(state, ops, config\)"):
        crest_next_batch(cfg, ops, state)
    with pytest.raises(TypeError, match=r"crest_init: config must be a CrestConfig, got dict"):
        crest_init({"m": M}, ytr, seed=0)
    with pytest.raises(TypeError, match=r"crest_stats: state must be"):
        cc.crest_stats({})
    with pytest.raises(TypeError, match=r"crest_state_dict: state must be"):
        crest_state_dict(None)
    with pytest.raises(TypeError, match=r"crest_observe: state must be"):
        crest_observe(None, np.array([0]), np.array([0.1]))

    class NoParams:
        def outputs(self, idx, embeddings=False):
            return np.zeros((len(idx), 10))

    with pytest.raises(TypeError, match=r"has no params\(\)"):
        crest_next_batch(state, NoParams(), cfg)

    class NoFit(SoftmaxOps):
        gradient = None

    with pytest.raises(TypeError, match=r"has no gradient\(\)"):
        crest_next_batch(state, NoFit(Xtr, ytr), cfg)
    # the config a loop passes is the one that runs, from the first call (crest_init's T1 and P were once
    # kept silently); a state that has started keeps its own schedule
    other = CrestConfig(m=M, T1=4, P=2)
    started, _ = crest_next_batch(state, ops, other)
    assert started.batch_idx.shape[0] == 2 and started.T1 == 4
    again, _ = crest_next_batch(started, ops, cfg)
    assert again.T1 == 4 and again.step == 1


def test_a_tight_cap_is_crossed_by_at_most_the_step_that_crosses_it():
    """max_overhead=0.05: after the first selection, a step spends on measurement only when the passes
    spent so far are within the cap (so each crossing is one step's worth); with at-anchor coresets, whose
    selection forwards the union of its P subsets at once, the run ends above the cap."""
    Xtr, ytr, _, _ = digits()
    for mode in ("at-anchor", "just-in-time"):
        cfg = CrestConfig(m=M, max_overhead=0.05, coresets=mode)
        ops = SoftmaxOps(Xtr, ytr)
        state = crest_init(cfg, ytr, seed=1)
        spending_steps = 0
        for k in range(400):
            before = state.counters
            spent_before = before["forward_examples"] + 2 * before["backward_examples"]
            state, batch = crest_next_batch(state, ops, cfg)
            c = state.counters
            spent = c["forward_examples"] + 2 * c["backward_examples"]
            if k and spent > spent_before:  # this step measured: it was allowed when it started
                assert spent_before <= 0.05 * 3 * before["train_examples"], (mode, k)
                spending_steps += 1
            _, g = ops.loss_grad(batch.indices, batch.weights)
            ops.W -= LR * g.reshape(ops.W.shape)
        assert spending_steps >= 2, mode
        if mode == "at-anchor":
            assert spent > 0.05 * 3 * c["train_examples"]  # crossed: the documented overshoot


def test_a_drop_rule_without_t2_warns_that_nothing_is_dropped():
    with pytest.warns(UserWarning, match=r"T2 is None, so nothing is ever dropped") as rec:
        CrestConfig(m=M, drop=DropConfig(alpha=0.3))
    assert rec[0].filename == __file__  # points at the line that built the config
    import dataclasses

    with pytest.warns(UserWarning, match="T2 is None") as rec:
        CrestConfig.paper(m=M, drop=DropConfig(alpha=0.3))
    assert rec[0].filename == __file__
    with pytest.warns(UserWarning, match="T2 is None") as rec:
        dataclasses.replace(CrestConfig(m=M, T2=5, drop=DropConfig(alpha=0.3)), T2=None)
    assert rec[0].filename == __file__

    class MyDrop(DropConfig):
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CrestConfig(m=M)
        CrestConfig(m=M, T2=5, drop=DropConfig(alpha=0.3))
        CrestConfig(m=M, drop=MyDrop())  # a subclass at the defaults drops nothing either way


def test_the_stats_of_a_consumed_state_are_still_read():
    """crest_stats reads the log, counters, schedule and pool, which a later record never writes in place:
    a logger holding the previous state keeps working (the consumed-state check is for the loss history)."""
    Xtr, ytr, _, _ = digits()
    cfg = CrestConfig(m=M, T2=5)
    state = crest_init(cfg, ytr, seed=0)
    old = crest_observe(state, np.arange(4), np.full(4, 0.5))
    crest_observe(old, np.arange(4), np.full(4, 0.4))  # consumes old
    assert cc.crest_stats(old)["pool"] == ytr.size
    with pytest.raises(RuntimeError, match="already passed"):
        crest_state_dict(old)  # its loss history is not its own any more


def test_the_probe_sample_is_drawn_at_random_from_the_whole_coreset():
    """probe_size=k: over the selections of a run the probed positions of the coreset vary and reach its
    whole length (not its first k, which would bias the curvature towards the greedy's first picks)."""

    class Logged(SoftmaxOps):
        positions: list = []

        def gradient_and_hutchinson(self, idx, w, seed):  # not used with a sample: the two calls are
            raise AssertionError("the fused call with probe_size < m")

        def gradient(self, idx, w):
            self.last = np.asarray(idx).copy()
            return self.loss_grad(idx, w)

        def hutchinson(self, idx, w, seed):
            pos = {int(i): j for j, i in enumerate(self.last)}
            self.positions.append([pos[int(i)] for i in idx])
            z = np.random.default_rng(seed).choice([-1.0, 1.0], size=self.W.size)
            return z * self.hvp(idx, w, z)

    Xtr, ytr, _, _ = digits()
    ops = Logged(Xtr, ytr)
    ops.positions = []
    _, state = train_crest(CrestConfig(m=M, tau=0.005, probe_size=8), 1, 40, ops=ops)
    assert len(ops.positions) == state.counters["selections"] >= 5
    assert len({tuple(p) for p in ops.positions}) == len(ops.positions)  # another sample each time
    reached = set().union(*map(set, ops.positions))
    assert max(reached) >= M - 4 and len(reached) > 3 * 8  # spread over the coreset, not its head


def test_a_consumed_state_says_what_to_keep_instead():
    Xtr, ytr, _, _ = digits()
    cfg = CrestConfig(m=M, T2=5)
    ops = SoftmaxOps(Xtr, ytr)
    state = crest_init(cfg, ytr, seed=0)
    new = crest_observe(state, np.arange(4), np.full(4, 0.5))
    crest_observe(new, np.arange(4), np.full(4, 0.4))  # consumes new
    for call in (lambda: crest_next_batch(new, ops, cfg), lambda: crest_observe(new, np.arange(2), np.ones(2))):
        with pytest.raises(RuntimeError, match=r"already passed to crest_next_batch or crest_observe.*crest_state_dict"):
            call()


@pytest.mark.parametrize("kwargs, match", [
    (dict(coresets="lazy"), "coresets"),
    (dict(coresets="just-in-time", batches="shuffled-union"), "batches='coreset'"),
    (dict(coresets="just-in-time", check_union=True), "check_union"),
    (dict(check_size=0), "check_size"),
    (dict(checks="sometimes"), "checks"),
    (dict(probe_size=0), "probe_size"),
    (dict(probe_size=2.5), "probe_size"),
    (dict(checks=None), "checks"),
])
def test_bad_just_in_time_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrestConfig(**kwargs)


def test_release_and_paper_select_every_coreset_at_the_anchor():
    assert CrestConfig.release().coresets == CrestConfig.paper().coresets == "at-anchor"
    assert CrestConfig.release().check_size is CrestConfig.paper().check_size is None


def test_a_state_saved_between_just_in_time_coresets_restores_exactly():
    cfg = CrestConfig(m=M, P=6, tau=1e9, coresets="just-in-time")
    ops, state = train_crest(cfg, 1, 3)
    assert 0 < state.made < state.batch_idx.shape[0]  # saved with coresets still to select
    saved = copy.deepcopy(crest_state_dict(state))
    W = ops.W.copy()
    ops_a, state_a = train_crest(cfg, 1, 6, ops=ops, state=state)
    Xtr, ytr, _, _ = digits()
    ops_b = SoftmaxOps(Xtr, ytr)
    ops_b.W = W.copy()
    ops_b, state_b = train_crest(cfg, 1, 6, ops=ops_b, state=crest_load_state_dict(saved, ops_b.params()))
    np.testing.assert_array_equal(ops_a.W, ops_b.W)
    np.testing.assert_array_equal(state_a.batch_idx, state_b.batch_idx)
    assert state_a.counters == state_b.counters
    bad = copy.deepcopy(saved)
    bad["batch_idx"][-1, 0] = 3  # a row not selected yet must still be padding
    with pytest.raises(ValueError, match="padding"):
        crest_load_state_dict(bad, ops_b.params())
    # the rows not made are drawn from the state's recipe, O(n) (review 123: all P rows were kept, P x r, which
    # grew as n^2); a state without it (or with a broken one) is refused
    assert saved["subsets"].size == 0 and set(saved["draw"]) == {"pool", "r_c", "rng"}
    bad = copy.deepcopy(saved)
    bad["draw"] = None
    with pytest.raises(ValueError, match="subsets has 0 rows and there is no draw"):
        crest_load_state_dict(bad, ops_b.params())
    for key, value, text in (("r_c", lambda v: v.astype(np.int64) + 10_000, "r_c"), ("rng", lambda v: v[:5], "6 words"),
                             ("rng", lambda v: np.r_[v[:4], 7, v[5]], "not a PCG64 state"),
                             ("rng", lambda v: np.r_[v[:5], -1], "not a PCG64 state"),
                             ("rng", lambda v: np.r_[v[:3], v[3] & ~1, v[4:]], "not a PCG64 state"),
                             ("pool", lambda v: np.array([3, 1]), "ascending")):
        bad = copy.deepcopy(saved)
        bad["draw"][key] = value(bad["draw"][key])
        with pytest.raises(ValueError, match=text):
            crest_load_state_dict(bad, ops_b.params())
    # a format-3 state (every row of the selection's subsets stored) continues as before
    from crestcore.controller import _subset_row

    old = copy.deepcopy(saved)
    loaded = crest_load_state_dict(saved, ops_b.params())
    old["subsets"] = np.concatenate([_subset_row(loaded, p) for p in range(loaded.batch_idx.shape[0])])
    old["format_version"] = 3
    del old["draw"]
    ops_c = SoftmaxOps(Xtr, ytr)
    ops_c.W = W.copy()
    ops_c, state_c = train_crest(cfg, 1, 6, ops=ops_c, state=crest_load_state_dict(old, ops_c.params()))
    np.testing.assert_array_equal(ops_a.W, ops_c.W)
    np.testing.assert_array_equal(state_a.batch_idx, state_c.batch_idx)
    bad = copy.deepcopy(old)
    bad["subsets"] = bad["subsets"][:1]
    with pytest.raises(ValueError, match="subsets"):
        crest_load_state_dict(bad, ops_b.params())
    bad = copy.deepcopy(saved)
    bad["made"] = 99
    with pytest.raises(ValueError, match="made"):
        crest_load_state_dict(bad, ops_b.params())


def test_an_adapters_fused_gradient_and_probe_is_used_and_counted_once():
    """``gradient_and_hutchinson`` on the ops: the same run, one forward and one backward fewer per fit."""

    class Fused(SoftmaxOps):
        def gradient_and_hutchinson(self, idx, w, seed):
            self.calls["fused"] = self.calls.get("fused", 0) + 1
            loss, g = self.loss_grad(idx, w)
            z = np.random.default_rng(seed).choice([-1.0, 1.0], size=self.W.size)
            return loss, g, z * self.hvp(idx, w, z)

    Xtr, ytr, _, _ = digits()
    cfg = CrestConfig(m=M, tau=0.02)
    ops_a, st_a = train_crest(cfg, 2, 40)
    ops_b, st_b = train_crest(cfg, 2, 40, ops=Fused(Xtr, ytr))
    np.testing.assert_array_equal(ops_a.W, ops_b.W)
    assert st_a.log == st_b.log
    fits = st_b.counters["selections"] * cfg.fit_batches
    assert ops_b.calls["fused"] == fits and ops_b.calls["gradient"] == ops_b.calls["hutchinson"] == 0
    ca, cb = st_a.counters, st_b.counters
    assert ca["forward_examples"] - cb["forward_examples"] == fits * M
    assert ca["backward_examples"] - cb["backward_examples"] == fits * M


@settings(deadline=None, max_examples=12)
@given(
    jit=st.booleans(), drop=st.booleans(), cap=st.sampled_from([None, 0.5, 2.0]),
    tau=st.sampled_from([0.005, 0.05, 1.0]), P=st.integers(1, 6), check_size=st.sampled_from([None, 20]),
    cut=st.integers(1, 39), checks=st.sampled_from(["every", "reuse"]),
)
def test_any_schedule_accounts_every_forward_and_resumes_exactly(jit, drop, cap, tau, P, check_size, cut, checks):
    """Whatever the options (just-in-time or at-anchor coresets, dropping, a cost cap, the check's size):
    the counters hold every example the ops were asked to forward, without a cap every batch comes from
    the pool of its step, and a state saved at any step continues exactly as the run that never stopped."""
    Xtr, ytr, _, _ = digits()
    extra = dict(T2=10, drop=DropConfig(alpha=0.3, window=10, min_records=1, floor=300)) if drop else {}
    cfg = CrestConfig(m=M, P=P, T1=1, tau=tau, max_overhead=cap, check_size=check_size, checks=checks,
                      coresets="just-in-time" if jit else "at-anchor", **extra)
    record: list = []
    ops, state = train_crest(cfg, 7, cut, observe=drop, record=record)
    saved = copy.deepcopy(crest_state_dict(state))
    W = ops.W.copy()
    ops_a, state_a = train_crest(cfg, 7, 40 - cut, ops=ops, state=state, observe=drop, record=record)
    c = state_a.counters
    outputs = sum(int(i.size) for i in ops_a.calls["outputs"])
    # the rest are the model fits: a gradient and a probe, 2 forwards and 3 backwards per example
    assert 3 * (c["forward_examples"] - outputs) == 2 * c["backward_examples"]
    if cap is None:
        for batch, active_then, _ in record:
            assert np.all(active_then[batch.indices])
    ops_b = SoftmaxOps(Xtr, ytr)
    ops_b.W = W
    _, state_b = train_crest(cfg, 7, 40 - cut, ops=ops_b, state=crest_load_state_dict(saved, ops_b.params()),
                             observe=drop)
    np.testing.assert_array_equal(ops_a.W, ops_b.W)
    assert state_a.counters == state_b.counters and state_a.log == state_b.log


def test_embeddings_need_the_pair_from_outputs():
    from crestcore.controller import _SoftmaxOps

    class LogitsOnly(_SoftmaxOps):
        def outputs(self, indices, embeddings=False):
            return super().outputs(indices)  # ignores embeddings=True

    X, y = np.random.default_rng(0).normal(size=(64, 3)), np.arange(64) % 2
    ops = LogitsOnly(X, y, 2)
    cfg = CrestConfig(m=8, embeddings=True)
    with pytest.raises(ValueError, match="pair"):
        crest_next_batch(crest_init(cfg, y, seed=0), ops, cfg)


def test_saving_a_state_whose_drop_history_was_consumed_is_refused():
    """A later step recorded losses into the shared history in place: the older state's history is not
    its own any more, and saving it would store the later records under the older step."""
    cfg = CrestConfig(m=M, T2=5, drop=DropConfig(alpha=0.1, window=5, min_records=1))
    ops, state = train_crest(cfg, 0, 3, observe=True)
    older = state
    state, batch = crest_next_batch(state, ops, cfg)
    state = crest_observe(state, batch.indices, np.ones(batch.indices.size))
    with pytest.raises(RuntimeError, match="consumed"):
        crest_state_dict(older)
    crest_state_dict(state)  # the live one saves


def test_the_log_grows_in_constant_time_and_every_state_keeps_its_own():
    """Each check appends a record: the log is shared between states (no copy per check; a run checking at
    every step was quadratic in its length), and an earlier state still sees only its own records."""
    from crestcore.controller import _SoftmaxOps, crest_stats

    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    X = rng.normal(size=(200, 2)) + 2.0 * y[:, None]
    ops, config = _SoftmaxOps(X, y, C=2), CrestConfig(m=10, T1=1, tau=1e9, max_age=None)
    state = crest_init(config, y, seed=0)
    states = []
    for _ in range(30):
        state, batch = crest_next_batch(state, ops, config)
        ops.W -= 0.5 * ops.gradient(batch.indices, batch.weights)[1].reshape(ops.W.shape)
        states.append(state)
    assert len(state.log["checks"]) == 29
    assert all(s.log["checks"]._items is state.log["checks"]._items for s in states)  # one shared list
    early = states[9]
    assert len(early.log["checks"]) == 9 and early.log["checks"] == state.log["checks"][:9]
    # a state branched off an earlier one (e.g. a run resumed from it) appends to its own copy
    branch, _ = crest_next_batch(early, ops, config)
    assert len(branch.log["checks"]) == 10 and len(early.log["checks"]) == 9
    assert len(state.log["checks"]) == 29 and state.log["checks"][:9] == branch.log["checks"][:9]
    assert crest_stats(state)["checks"][-1]["step"] == state.log["checks"][-1][0]


@pytest.mark.parametrize("config", [CrestConfig(m=10, tau=0.05), CrestConfig.paper(m=10, tau=0.05)],
                         ids=["default", "paper"])
def test_a_json_round_trip_resumes_exactly_and_the_dict_is_the_callers(config):
    """JSON writes an empty (0, m) array as [] (a fresh state's batches; the paper schedule's subsets):
    the loader reads it back, at any step, and the resumed run is the uninterrupted one. The dict holds
    copies: changing it does not change the running state."""
    import json

    from crestcore.controller import _SoftmaxOps

    def to_json(d):
        return json.loads(json.dumps(d, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else o.item()))

    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    X = rng.normal(size=(200, 2)) + 2.0 * y[:, None]

    def run(steps, state=None, ops=None):
        ops = ops or _SoftmaxOps(X, y, C=2)
        state = state if state is not None else crest_init(config, y, seed=0)
        out = []
        for _ in range(steps):
            state, batch = crest_next_batch(state, ops, config)
            ops.W -= 0.5 * ops.gradient(batch.indices, batch.weights)[1].reshape(ops.W.shape)
            out.append((batch.indices.tolist(), batch.weights.tolist()))
        return state, ops, out

    _, _, whole = run(12)
    for cut in (0, 1, 5):
        state, ops, first = run(cut)
        d = crest_state_dict(state)
        for arr in (d["batch_w"], d["labels"], d["check_idx"]):
            arr[...] = 0  # the caller's copy
        d = to_json(crest_state_dict(state))
        resumed = crest_load_state_dict(d, ops.params())
        _, _, rest = run(12 - cut, resumed, ops)
        assert first + rest == whole


def test_core_review_fixes_divergence_negative_losses_epoch_fits_and_rounding():
    """Findings of a review of the framework-free core, each pinned:
    NaN logits are a divergence (FloatingPointError, as the docs say; was a plain ValueError), and so are
    NaN losses given to crest_observe; a finite negative loss (a signed or rounded-negative loss) that
    crest_observe records survives crest_state_dict -> crest_load_state_dict (loading called it
    corrupt); reselect="epoch" fits no quadratic model (nothing checks it; its cost was counted); P =
    ceil(b T1) with the same rounding slack as T1 (b = 0.14, T1 = 50: 7, not 8)."""
    from crestcore.validation import DivergenceError

    y = _labels(120)
    ops = FakeOps(y)
    cfg = CrestConfig(m=4, r=12, T2=5)
    state, _ = crest_next_batch(crest_init(cfg, y, seed=0), ops, cfg)
    with pytest.raises(FloatingPointError, match="diverged"):
        crest_observe(state, np.array([0, 1]), np.array([0.1, np.nan]))
    state = crest_observe(state, np.array([0, 1]), np.array([-1e-9, 0.3]))
    back = crest_load_state_dict(crest_state_dict(state), ops.params())
    assert back.drop.losses[0, ~np.isnan(back.drop.losses[0])].tolist() == [-1e-9]

    class NaNOps(FakeOps):
        def outputs(self, idx, embeddings=False):
            Z = super().outputs(idx, embeddings)
            return Z * np.nan

    with pytest.raises(DivergenceError, match="NaN or infinite at step 0.*diverged"):
        crest_next_batch(crest_init(cfg, y, seed=0), NaNOps(y), cfg)

    class MaskedOps(FakeOps):  # review 93: -inf logits alone are a mask of classes, not a divergence
        def outputs(self, idx, embeddings=False):
            Z = np.array(super().outputs(idx, embeddings), dtype=float)
            Z[:, 0] = -np.inf
            return Z

    with pytest.raises(ValueError, match=r"outputs hold -inf in 12 of 12 rows") as exc:
        crest_next_batch(crest_init(cfg, y, seed=0), MaskedOps(y), cfg)
    assert not isinstance(exc.value, FloatingPointError)

    epoch_cfg = CrestConfig(m=4, r=12, reselect="epoch")
    ops = FakeOps(y)
    state = crest_init(epoch_cfg, y, seed=0, epoch_steps=5)
    for _ in range(16):
        state, _ = crest_next_batch(state, ops, epoch_cfg)
    assert state.counters["selections"] == 4 and state.counters["checks"] == 0
    assert ops.n["gradient"] == ops.n["hutchinson"] == 0 and state.counters["backward_examples"] == 0

    assert update_schedule(50.0, 1.0, h=1.0, b=0.14) == (50, 7)
    assert update_schedule(1.0, 1.0, h=1.0, b=2.5) == (1, 3)  # a true fraction still rounds up


def test_the_event_log_survives_json_as_it_was():
    import json

    y = _labels(120)
    ops, cfg = FakeOps(y), CrestConfig(m=4, r=12, tau=0.01, T2=3)
    state = crest_init(cfg, y, seed=0)
    for t in range(9):
        ops.level = 1.0 + 0.2 * (t % 3)
        state, batch = crest_next_batch(state, ops, cfg)
    assert len(state.log["checks"]) > 0 and len(state.log["drops"]) > 0
    text = json.dumps(crest_state_dict(state), default=lambda o: o.tolist() if isinstance(o, np.ndarray) else o.item())
    back = crest_load_state_dict(json.loads(text), ops.params())
    assert back.log == state.log


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_params_returning_a_view_is_refused_at_the_first_check(lib):
    """ModelOps.params() must return a copy: a view of the live parameters makes the anchor move with
    training, so the quadratic model always predicts the anchor's loss and every rho is wrong, silently.
    The first check notices the shared memory."""
    y = _labels(120)

    class ViewOps(FakeOps):
        def __init__(self, labels):
            super().__init__(labels, lib=lib)
            self.live = self.w if lib == "numpy" else torch.from_numpy(self.w)  # shares self.w's memory

        def params(self):
            return self.live[:]  # a view, not a copy

    ops, cfg = ViewOps(y), CrestConfig(m=4, r=12)
    state, _ = crest_next_batch(crest_init(cfg, y, seed=0), ops, cfg)
    with pytest.raises(ValueError, match="params\\(\\) must return a copy"):
        crest_next_batch(state, ops, cfg)


def test_a_jax_model_returning_its_stored_parameters_runs_without_warnings():
    """JAX arrays are immutable: params() returning the array a model stores is no view of anything, but the
    check's sharing test fell back to identity and refused it at the first check at unchanged parameters
    ("a view of the live parameters?"); and every selection on JAX (int64 off, its default) warned that an
    int64 request was truncated (30 warnings in 40 steps). Both gone: the run, unchanged parameters
    included, makes no warning, and its indices are int32 where JAX holds no int64."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    y = _labels(120)
    X = np.random.default_rng(0).normal(size=(120, 3)) + y[:, None]

    def loss(w, idx, wts):
        z = jnp.asarray(X[idx], jnp.float32) @ w.reshape(3, 3)
        return jnp.mean(jnp.asarray(wts, jnp.float32)
                        * (jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, jnp.asarray(y[idx])[:, None], 1)[:, 0]))

    class JaxOps:
        def __init__(self):
            self.w = jnp.zeros(9, jnp.float32)

        def outputs(self, indices, embeddings=False):
            return jnp.asarray(X[indices], jnp.float32) @ self.w.reshape(3, 3)

        def params(self):
            return self.w  # the stored array itself

        def gradient(self, indices, weights):
            return jax.value_and_grad(loss)(self.w, indices, weights)

        def hutchinson(self, indices, weights, seed):
            z = jnp.asarray(np.random.default_rng(seed).choice([-1.0, 1.0], size=9), jnp.float32)
            return z * jax.jvp(lambda v: jax.grad(loss)(v, indices, weights), (self.w,), (z,))[1]

        def state_token(self, indices):
            return 0  # nothing but params() matters

    ops, cfg = JaxOps(), CrestConfig(m=12, r=36)
    state = crest_init(cfg, y, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(12):
            state, batch = crest_next_batch(state, ops, cfg)
            if t % 3 != 2:  # two steps of three train; the third is checked at unchanged parameters (the
                # first trains: at still-zero parameters the second coreset would be warned about, review 109)
                ops.w = ops.w - 0.1 * ops.gradient(batch.indices, batch.weights)[1]
    assert state.n_selections >= 1 and len(state.log["checks"]) >= 8
    # a training step that donates the parameters deletes the array params() returned: refused by name
    donate = jax.jit(lambda w, g: w - 0.1 * g, donate_argnums=0)
    state = crest_init(cfg, y, seed=0)
    state, batch = crest_next_batch(state, ops, cfg)
    ops.w = donate(ops.w, ops.gradient(batch.indices, batch.weights)[1])
    if state.anchor.is_deleted():  # the CPU backend may ignore the donation (it warns): nothing deleted then
        with pytest.raises(ValueError, match=r"has been deleted since .*donate_argnums.*must return a copy"):
            crest_next_batch(state, ops, cfg)
    sel = cc.facility_location(jnp.asarray(X, jnp.float32), 4, labels=jnp.asarray(y))
    assert sel.indices.dtype == jnp.int32 and np.array_equal(np.asarray(sel.indices),
                                                             cc.facility_location(X.astype(np.float32), 4, labels=y).indices)


@given(st.integers(1, 6), st.integers(1, 40), st.integers(1, 60), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_union_positions_is_unique_and_searchsorted(P, r, n, seed):
    """The controller's union of the subsets and the positions in it: what np.unique + searchsorted give,
    for subsets with repeats across and within rows."""
    from crestcore.controller import _union_positions

    subsets = np.random.default_rng(seed).integers(0, n, size=(P, r))
    union, pos = _union_positions(subsets)
    np.testing.assert_array_equal(union, np.unique(subsets))
    np.testing.assert_array_equal(pos, np.searchsorted(np.unique(subsets), subsets))
    assert pos.dtype == np.int64 and pos.shape == subsets.shape
    np.testing.assert_array_equal(union[pos], subsets)


def test_backend_numba_solves_cpu_torch_features_on_the_numba_kernels(monkeypatch):
    """CrestConfig(backend="numba"): a training loop whose outputs are CPU torch tensors selects on the
    Numba kernels (the same batches as its default route, the torch kernels, here); "auto" does not."""
    from crestcore.backends import numba as nb

    class TorchOutputs(SoftmaxOps):
        def outputs(self, idx, embeddings=False):
            return torch.from_numpy(np.asarray(super().outputs(idx)))

    calls = []
    real = nb.facility_batched
    monkeypatch.setattr(nb, "facility_batched", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for backend in ("auto", "numba"):
        cfg = CrestConfig(m=M, backend=backend)
        Xtr, ytr, _, _ = digits()
        record: list = []
        train_crest(cfg, 0, 12, ops=TorchOutputs(Xtr, ytr), record=record)
        runs[backend] = [(b.indices.copy(), b.weights.copy()) for b, *_ in record]
        assert bool(calls) == (backend == "numba")
    for (ia, wa), (ib, wb) in zip(runs["auto"], runs["numba"]):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_allclose(wa, wb, rtol=1e-6)
    with pytest.raises(ValueError, match="CrestConfig.backend"):
        CrestConfig(backend="cuda")


def test_the_default_subset_size_counts_the_classes_present_not_the_label_range():
    """Ten classes whose ids lie in a 1000-way label space: r is what ids 0..9 give (it was rounded up to a
    multiple of 1000, half the data set per selection)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 2000)
    X = rng.normal(size=(2000, 4)) + y[:, None]
    cfg = CrestConfig(m=32)
    rs = {}
    for name, lab in (("dense", y), ("sparse", y * 100 + 7)):
        ops = _SoftmaxOps_for(X, lab)
        state, _ = crest_next_batch(crest_init(cfg, lab, seed=0), ops, cfg)
        rs[name] = int(state.draw["r_c"].sum())  # each subset's size (the rows not made yet are drawn from it)
    assert rs["dense"] == rs["sparse"] == 128  # max(10 ceil(20 / 10), 4 m)


def test_a_huge_label_id_gets_the_outputs_message_not_a_dense_class_count():
    """Review 109 F1: ids {0, 1, 10**11} were counted with a dense bincount (745 GiB) before the forward's
    check that names the fix; the classes are counted by sorting when the ids are that sparse."""
    from crestcore.controller import _SoftmaxOps

    y = np.array([0, 1, 10**11] * 20)
    X = np.random.default_rng(0).normal(size=(60, 3))
    for r in (None, 4):  # the default r (counts the classes) and r below twice their number (counts the pool's)
        cfg = CrestConfig(m=2, r=r)
        with (pytest.warns(UserWarning, match="fewer than two examples") if r else contextlib.nullcontext(),
              pytest.raises(ValueError, match="labels hold class 100000000000 but the model gives 3 outputs")):
            crest_next_batch(crest_init(cfg, y, seed=0), _SoftmaxOps(X, y, 3), cfg)


def test_a_selection_on_features_equal_within_each_class_is_warned_about():
    """Review 109 O1: at a zero last layer every example of a class has the same logit gradient, and each
    coreset is one weighted example per class (the rest weight 0). At-anchor coresets keep it for the whole
    selection: warned at once, naming embeddings=True. A just-in-time run's first coreset is not warned
    about (the step moves the layer); one still at zero parameters at its second step is."""
    from crestcore.controller import _SoftmaxOps

    y = np.repeat(np.arange(4), 60)
    X = np.random.default_rng(0).normal(size=(240, 5)) + y[:, None]
    cfg = CrestConfig.paper(m=16, r=80)
    with pytest.warns(RuntimeWarning, match=r"most picks of this selection carry weight 0.*embeddings=True"):
        state, batch = crest_next_batch(crest_init(cfg, y, seed=0), _SoftmaxOps(X, y, 4), cfg)
    assert np.count_nonzero(batch.weights == 0) > 8  # the degenerate coreset the warning describes
    class WithInputs(_SoftmaxOps):  # softmax regression's "penultimate features" are its inputs
        def outputs(self, indices, embeddings=False):
            z = self.X[indices] @ self.W
            return (z, self.X[indices]) if embeddings else z

    emb = CrestConfig.paper(m=16, r=80, embeddings=True)  # the penultimate features tell the examples apart
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state, batch = crest_next_batch(crest_init(emb, y, seed=0), WithInputs(X, y, 4), emb)
    assert np.count_nonzero(batch.weights == 0) == 0
    cfg = CrestConfig(m=16, r=80)  # just in time, trained at every step: quiet
    ops, state = _SoftmaxOps(X, y, 4), crest_init(cfg, y, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            state, batch = crest_next_batch(state, ops, cfg)
            ops.W -= 0.5 * ops.gradient(batch.indices, batch.weights)[1].reshape(ops.W.shape)
    ops, state = _SoftmaxOps(X, y, 4), crest_init(cfg, y, seed=0)  # never trained: warned at the second step
    state, batch = crest_next_batch(state, ops, cfg)
    with pytest.warns(RuntimeWarning, match="most picks of this selection carry weight 0"):
        crest_next_batch(state, ops, cfg)
    cfg = CrestConfig(m=16, r=80, fit_batches=2)  # review 113: the second coreset of step 0 trains at step 1
    with pytest.warns(RuntimeWarning, match="most picks of this selection carry weight 0"):
        crest_next_batch(crest_init(cfg, y, seed=0), _SoftmaxOps(X, y, 4), cfg)


def _SoftmaxOps_for(X, lab):
    from crestcore.controller import _SoftmaxOps

    return _SoftmaxOps(X, lab, int(lab.max()) + 1)


def test_uint64_labels_beyond_int64_are_refused_not_wrapped():
    y = np.array([0, 1, 2**63 + 5, 1], dtype=np.uint64)
    with pytest.raises(ValueError, match="class indices"):
        crest_init(CrestConfig(m=2), y, seed=0)


def test_first_selection_caps_the_configured_T1():
    # C6: the configured T1 (10) is above the cap (epoch_steps = 4): the first selection keeps T1 but capped
    cfg = CrestConfig(m=4, r=12, P=2, T1=10)
    state, _ = _select_only(cfg, [1.0], scales=(1.0,), epoch_steps=4)
    assert state.T1 == 4
    cfg = CrestConfig(m=4, r=12, P=2, T1=10, P_cap=3)
    state, _ = _select_only(cfg, [1.0], scales=(1.0,))
    assert state.T1 == 3


def test_tempered_weights_are_the_square_roots_of_the_cluster_sizes():
    # C5: weights="tempered" must be sqrt(cluster size), normalised to mean 1 per coreset
    _, cl = train_crest(CrestConfig(m=32, weights="cluster"), 0, 1)
    _, te = train_crest(CrestConfig(m=32, weights="tempered"), 0, 1)
    np.testing.assert_array_equal(cl.batch_idx[:cl.made], te.batch_idx[:te.made])  # same picks: same selection
    checked = False
    for p in range(cl.made):
        keep = cl.batch_idx[p] >= 0
        root = np.sqrt(cl.batch_w[p][keep])  # cluster weights are sizes scaled to mean 1; sqrt is scale-free
        np.testing.assert_allclose(te.batch_w[p][keep], root / root.mean(), rtol=1e-10)
        checked |= bool(np.ptp(cl.batch_w[p][keep]) > 0)
    assert checked  # some coreset has unequal cluster sizes, so sqrt makes a difference
    # the defaults since 2026-12-02 (chosen on validation splits, docs/benchmarks.md); the paper's and the
    # release's presets keep the paper's cluster sizes
    assert CrestConfig().weights == "tempered"
    assert CrestConfig.paper().weights == "cluster" and CrestConfig.release().weights == "cluster"
    _, default = train_crest(CrestConfig(m=32), 0, 1)
    np.testing.assert_array_equal(default.batch_w[:default.made], te.batch_w[:te.made])


def test_anchor_loss_is_the_mean_loss_on_the_check_examples():
    # C11: the anchor loss L_a of the quadratic model must be measured on the trust check's examples
    # (check_idx: check_size of V_1), not on all the examples the selection forwarded (with the defaults
    # the two coincide when r <= check_size = 128 and one coreset is fitted at the anchor)
    Xtr, ytr, _, _ = digits()
    ops = SoftmaxOps(Xtr, ytr)
    ops.W = np.random.default_rng(0).normal(size=ops.W.shape)  # per-example losses differ
    cfg = CrestConfig(m=32, check_size=16)  # fewer than the subset's r: the check set is a strict sample
    state = crest_init(cfg, ytr, seed=0)
    state, _ = crest_next_batch(state, ops, cfg)  # the first selection, no training step: W is the anchor
    assert state.check_idx.size == 16
    per = cc.cross_entropy(Xtr[state.check_idx] @ ops.W, ytr[state.check_idx])
    assert state.quad.anchor_loss == pytest.approx(float(np.mean(per)), rel=1e-12)


def test_virtual_epoch_cap_rounds_up():
    # C13: without epoch_steps or P_cap the cap is one virtual epoch of the pool, ceil(n / m):
    # n = 122, m = 4 -> 31 (120 / 4 = 30 in the existing test hides floor vs ceil)
    cfg = CrestConfig(m=4, r=12, P=2, T1=1, tau=0.01, h=8.0, b=1.5)
    state, _ = _select_only(cfg, [1.0, 2.0], scales=(4.0, 1.0), n=122)
    assert (state.T1, state.P) == (31, 31)


def test_the_controllers_subsets_are_draw_subsets_of_its_generator():
    """The controller draws without draw_subsets' checks (and without gathering the labels when nothing is
    dropped): the subsets are draw_subsets' for the selection's generator."""
    Xtr, ytr, _, _ = digits()
    cfg = CrestConfig(m=32, P=4)
    from crestcore.controller import _subset_row

    state, _ = crest_next_batch(crest_init(cfg, ytr, seed=3), SoftmaxOps(Xtr, ytr), cfg)
    rows = np.concatenate([_subset_row(state, p) for p in range(state.batch_idx.shape[0])])
    want = cc.draw_subsets(ytr, np.arange(ytr.size), rows.shape[1], rows.shape[0], np.random.default_rng([3, 0]))
    np.testing.assert_array_equal(rows, want)
    assert rows.shape[0] == 4 and state.subsets.size == 0  # the rows are drawn when their step comes


def test_without_dropping_no_loss_history_is_kept_and_turning_it_on_starts_one():
    """T2=None: the state keeps no per-example loss history (8 float64 and 8 int64 slots per example,
    1.3 GB at n = 10^7, in memory and in every checkpoint); observed losses are still checked. A state
    resumed under a config with dropping gets an empty history, and drops go on as from a fresh state."""
    y = np.arange(400) % 4
    state = crest_init(CrestConfig(m=8), y, seed=0)
    assert state.drop.losses.shape == (400, 0) and state.drop.steps.shape == (400, 0)
    state = crest_observe(state, np.array([1, 2]), np.array([0.5, 0.1]))
    with pytest.raises(FloatingPointError):
        crest_observe(state, np.array([1]), np.array([np.nan]))
    d = crest_state_dict(state)
    assert d["drop"]["losses"].nbytes == 0
    back = crest_load_state_dict(d, np.zeros(3))
    assert back.drop.losses.shape == (400, 0)
    cfg = CrestConfig(m=8, T2=5, drop=DropConfig(alpha=10.0, window=5, min_records=1))
    X = np.random.default_rng(0).normal(size=(400, 3)) + y[:, None]
    ops = _SoftmaxOps_for(X, y)
    for _ in range(12):
        back, batch = crest_next_batch(back, ops, cfg)
        back = crest_observe(back, batch.indices, np.full(batch.indices.size, 0.01))
    assert back.drop.losses.shape == (400, cfg.drop.history) and not back.drop.active.all()



def test_a_config_with_another_drop_history_resizes_the_states_history():
    """A state made under DropConfig(history=2) and continued under history=8, min_records=4 (a resume under
    a changed config, which the loaders warn about and say the run continues with): the ring takes the
    new config's 8 slots, keeping the records it had. Before, it kept 2, no example could ever hold 4 records
    in the window, and nothing was dropped for the rest of the run, without a word; and the other way round
    up to 8 old records kept counting where the config said 2."""
    y = np.arange(400) % 4
    X = np.random.default_rng(0).normal(size=(400, 3)) + y[:, None]
    ops = _SoftmaxOps_for(X, y)
    old = CrestConfig(m=8, T2=5, drop=DropConfig(alpha=10.0, window=40, history=2, min_records=2))
    new = CrestConfig(m=8, T2=5, drop=DropConfig(alpha=10.0, window=40, history=8, min_records=4))
    state = crest_init(old, y, seed=0)

    def steps(state, config, k):
        for _ in range(k):
            state, batch = crest_next_batch(state, ops, config)
            state = crest_observe(state, batch.indices, np.full(batch.indices.size, 0.01))
        return state

    state = steps(state, old, 3)
    assert state.drop.losses.shape == (400, 2)
    had = {i: sorted(int(t) for t in state.drop.steps[i] if t >= 0) for i in range(400)}
    resumed = crest_load_state_dict(crest_state_dict(state), ops.params())
    resumed, _ = crest_next_batch(resumed, ops, new)
    assert resumed.drop.losses.shape == (400, 8)
    for i in range(400):  # the records it had are kept (the step just accounted may have added one)
        now = sorted(int(t) for t in resumed.drop.steps[i] if t >= 0)
        assert set(had[i]) <= set(now)
    resumed = steps(resumed, new, 30)
    assert not resumed.drop.active.all() and crest_stats(resumed)["pool"] < 400
    back = steps(crest_load_state_dict(crest_state_dict(resumed), ops.params()), old, 1)
    assert back.drop.losses.shape == (400, 2)

def test_a_selection_too_large_for_memory_names_crest_config_r(monkeypatch):
    """The memory guard's advice named minibatch_coresets' arguments (max_dense_bytes, P), which a CREST
    user does not set; the controller says to set CrestConfig(r=...)."""
    import crestcore.backends as B

    monkeypatch.setattr(B, "host_available_bytes", lambda: 1)  # the default limit: its 64 MiB floor
    y = np.arange(20_000) % 2
    X = np.random.default_rng(0).normal(size=(20_000, 3))
    cfg = CrestConfig(m=8, r=12_000)  # two classes of 6,000: 2 x 6000^2 x 8 bytes is over the floor
    with pytest.raises(ValueError, match=r"CrestConfig\(r=\.\.\.\)"):
        crest_next_batch(crest_init(cfg, y, seed=0), _SoftmaxOps_for(X, y), cfg)


def test_a_states_labels_are_read_only_so_their_class_count_cannot_go_stale():
    y = np.arange(40) % 4
    state = crest_init(CrestConfig(m=4), y, seed=0)
    back = crest_load_state_dict(crest_state_dict(state), np.zeros(2))
    for s in (state, back):
        assert not s.labels.flags.writeable
        with pytest.raises(ValueError):
            s.labels[0] = 3
    assert y.flags.writeable  # the caller's array is left as it was


# ------------------------------------------------------------------------------------------------
# rho at a loss of 0, a loss that may be negative, and non-finite parameters (review)
# ------------------------------------------------------------------------------------------------
def _frozen_run(ops, steps=12, **cfg):
    """Steps with a model that never changes: the quadratic model predicts every check exactly."""
    config = CrestConfig(m=10, T1=1, tau=0.1, **cfg)
    state = crest_init(config, ops.y, seed=0)
    for _ in range(steps):
        state, _ = crest_next_batch(state, ops, config)
    return state


def test_a_learned_sample_whose_losses_are_zero_is_trusted_when_predicted_exactly():
    """float32 cross-entropy is exactly 0 on confidently right examples: rho's floor is for its
    denominator only, so L_R = F = 0 gives rho = 0 (it gave 1, and a reselection at every check)."""
    from crestcore.controller import _SoftmaxOps, crest_stats

    class Learned(_SoftmaxOps):
        def outputs(self, indices, embeddings=False):
            z = np.full((indices.size, 2), -200.0, dtype=np.float32)
            z[np.arange(indices.size), self.y[indices]] = 200.0  # log-sum-exp - z_y = 0 in float32
            return z

    y = np.arange(200) % 2
    ops = Learned(np.random.default_rng(0).normal(size=(200, 2)), y, C=2)
    state = _frozen_run(ops)
    st = crest_stats(state)
    assert st["selections"] == [0] and len(st["checks"]) >= 10
    assert all(c["loss_random"] == c["predicted"] == c["rho"] == 0.0 for c in st["checks"])


def test_a_loss_that_goes_negative_is_checked_against_its_magnitude():
    from crestcore.controller import _SoftmaxOps, crest_stats

    class Shifted(_SoftmaxOps):
        def example_losses(self, logits, labels):
            return cc.cross_entropy(logits, labels) - 2.0  # a user loss below 0 (log 2 - 2 at W = 0)

    y = np.arange(200) % 2
    ops = Shifted(np.random.default_rng(0).normal(size=(200, 2)), y, C=2)
    st = crest_stats(_frozen_run(ops))
    assert st["selections"] == [0]  # it was 1e11 and a reselection at every check
    assert all(c["rho"] == 0.0 and c["loss_random"] < 0 for c in st["checks"])


def test_non_finite_losses_of_the_adapters_own_loss_name_it():
    from crestcore.controller import _SoftmaxOps

    class Broken(_SoftmaxOps):
        def example_losses(self, logits, labels):
            with np.errstate(invalid="ignore"):
                return np.log(cc.cross_entropy(logits, labels) - 1.0)  # NaN on finite logits

    y = np.arange(200) % 2
    with pytest.raises(FloatingPointError, match="example_losses .* on finite logits"):
        _frozen_run(Broken(np.random.default_rng(0).normal(size=(200, 2)), y, C=2), steps=1)


@pytest.mark.parametrize("when", ["first anchor", "later anchor", "at a check"])
def test_non_finite_parameters_are_a_divergence_naming_params(when):
    from crestcore.controller import _SoftmaxOps
    from crestcore.validation import DivergenceError

    class Poisoned(_SoftmaxOps):
        calls = 0

        def params(self):
            self.calls += 1
            self.W = self.W + 0.05  # the model moves: checks fail at a tiny tau, selections follow
            w = super().params()
            bad = {"first anchor": self.calls == 1, "later anchor": self.calls >= 3,
                   "at a check": self.calls == 2}[when]
            if bad:
                w[0] = np.nan  # a parameter the measured examples' outputs do not show
            return w

    y = np.arange(200) % 2
    ops = Poisoned(np.random.default_rng(0).normal(size=(200, 2)), y, C=2)
    config = CrestConfig(m=10, T1=1, tau=1e-9 if when == "later anchor" else 0.1)  # tiny tau: reselect at once
    state = crest_init(config, y, seed=0)
    with pytest.raises(DivergenceError, match=r"ops.params\(\) holds NaN"):
        for _ in range(6):
            state, _ = crest_next_batch(state, ops, config)


@pytest.mark.parametrize("max_age", ["epoch", 7, None])
def test_a_selection_is_trained_on_at_most_max_age_steps_even_when_every_check_passes(max_age):
    """A trust check that always passes (a huge tau: a small learning rate's quadratic model stays right)
    used to cycle the first selection's coresets for the whole run. max_age bounds the steps on one
    selection: one budgeted epoch (the default), a number of steps, or None (the paper's rule: only the
    check reselects)."""
    from crestcore.controller import _SoftmaxOps

    rng = np.random.default_rng(0)
    y = np.arange(400) % 2
    X = rng.normal(size=(400, 2)) + 2.0 * y[:, None]
    ops, config = _SoftmaxOps(X, y, C=2), CrestConfig(m=10, tau=1e9, max_age=max_age)
    state = crest_init(config, y, seed=0, epoch_steps=4)
    seen = set()
    for _ in range(40):
        state, batch = crest_next_batch(state, ops, config)
        ops.W -= 0.01 * ops.gradient(batch.indices, batch.weights)[1].reshape(ops.W.shape)
        seen.add(tuple(batch.indices))
    steps = list(state.log["selections"])
    every = {"epoch": 4, 7: 7, None: None}[max_age]
    if every is None:
        assert steps == [0] and len(seen) <= 4  # P = min(5, the cap of 4) coresets, cycled for 40 steps
    else:
        assert steps == list(range(0, 40, every))
        assert len(seen) > 4 * len(steps) // 2  # fresh coresets at each selection


def test_max_age_epoch_is_the_budgeted_epoch_whatever_p_cap_says():
    """P_cap bounds the coresets per selection and the check interval, not a selection's age: with P_cap=2
    the default bound still reselects once a budgeted epoch (it reselected every 2 steps)."""
    from crestcore.controller import _SoftmaxOps

    rng = np.random.default_rng(0)
    y = np.arange(400) % 2
    X = rng.normal(size=(400, 2)) + 2.0 * y[:, None]
    ops, config = _SoftmaxOps(X, y, C=2), CrestConfig(m=10, tau=1e9, P_cap=2)
    state = crest_init(config, y, seed=0, epoch_steps=8)
    for _ in range(32):
        state, batch = crest_next_batch(state, ops, config)
        ops.W -= 0.01 * ops.gradient(batch.indices, batch.weights)[1].reshape(ops.W.shape)
    assert list(state.log["selections"]) == [0, 8, 16, 24]


def test_max_age_is_checked_and_the_papers_and_releases_rule_is_the_check_alone():
    assert CrestConfig.paper().max_age is None and CrestConfig.release().max_age is None
    assert CrestConfig().max_age == "epoch" and CrestConfig(max_age=3).max_age == 3
    for bad, err in (("week", ValueError), (0, ValueError), (True, TypeError), (2.5, TypeError)):
        with pytest.raises(err, match="max_age"):
            CrestConfig(max_age=bad)


class UnfreezingOps(SoftmaxOps):
    """SoftmaxOps with a bias that is frozen until ``unfreeze()``: then params(), gradients and probes
    grow by C entries, as a model's trainable parameters do when a layer is unfrozen between fits."""

    def __init__(self, X, y, C=10):
        super().__init__(X, y, C)
        self.b, self.trainable_bias = np.zeros(C), False

    def _extend(self, v, tail):
        return np.concatenate([v, tail]) if self.trainable_bias else v

    def params(self):
        return self._extend(super().params(), self.b.copy())

    def gradient(self, idx, w):
        loss, g = super().gradient(idx, w)
        return loss, self._extend(g, np.zeros(self.C))

    def hutchinson(self, idx, w, seed):
        return self._extend(super().hutchinson(idx, w, seed), np.zeros(self.C))


def test_a_selection_right_after_the_parameters_grew_starts_a_new_model():
    """A layer unfrozen between two fits, and the first step after it an age reselection (no check due):
    the selection fitted the old quadratic model with a gradient of the new size ("grad has length ...")."""
    Xtr, ytr, _, _ = digits()
    cfg = CrestConfig(m=M, T1=100, h=1000.0, max_age=3)  # checks far apart, a reselection every 3 steps
    ops = UnfreezingOps(Xtr, ytr)
    state = crest_init(cfg, ytr, seed=0)
    for _ in range(5):
        state, batch = crest_next_batch(state, ops, cfg)
    assert state.log["selections"] == [0, 3] and not state.log["checks"]
    ops.trainable_bias = True
    for _ in range(2):
        state, batch = crest_next_batch(state, ops, cfg)
    assert state.log["selections"] == [0, 3, 6] and not state.log["checks"]  # a selection came first
    assert state.anchor.shape == state.quad.g_ema.shape == (ops.W.size + ops.C,)
    assert state.h_norm_0 == state.h_norm_t  # the new parameters' curvature is the schedule's reference
    for _ in range(9):  # and training goes on, on the grown parameters
        state, batch = crest_next_batch(state, ops, cfg)
    assert state.log["selections"][-1] == 15 and state.quad.g_ema.shape == (ops.W.size + ops.C,)


def test_parameters_changed_validates_its_argument_and_leaves_a_fresh_state_alone():
    state = crest_init(CrestConfig(m=4), np.arange(20) % 2, seed=0)
    assert cc.crest_parameters_changed(state) is state  # nothing selected yet: nothing to reset
    with pytest.raises(TypeError, match="state must be a CrestState"):
        cc.crest_parameters_changed({"anchor": None})


@pytest.mark.parametrize("fault", [KeyboardInterrupt, FloatingPointError])
def test_a_call_that_raises_after_its_check_leaves_the_state_usable(fault):
    """Regression (review 38): with dropping on, a trust check records its losses into the history in place;
    when the same crest_next_batch call raised afterwards (the just-in-time coreset's forward: Ctrl-C, a
    divergence on examples the check did not cover), the state passed in was consumed: crest_state_dict and
    every later call failed with "already passed to crest_next_batch". The call undoes its records: the
    state is saved and the run retried as if the failed call had not happened."""
    Xtr, ytr, _, _ = digits()
    cfg = CrestConfig(m=M, T2=3, drop=DropConfig(history=4, window=6, min_records=1, alpha=0.05))

    def run(steps, fail_at=None):
        ops = SoftmaxOps(Xtr, ytr)
        state, out, saved, armed = crest_init(cfg, ytr, seed=0), [], None, fail_at is not None
        step = 0
        while step < steps:
            before = len(ops.calls["outputs"])
            real = ops.outputs

            def outputs(idx, embeddings=False, _armed=armed, _step=step, _before=before, _real=real):
                # the second forward of one call at the armed step: the check's has been recorded
                if _armed and _step == fail_at and len(ops.calls["outputs"]) - _before == 1:
                    raise fault("injected")
                return _real(idx, embeddings)

            ops.outputs = outputs
            try:
                state, batch = crest_next_batch(state, ops, cfg)
            except fault:
                armed = False
                saved = crest_state_dict(state)  # the state passed in is live: it can be saved
                assert state.counters == crest_load_state_dict(saved, ops.params()).counters
                continue  # and the same call retried
            finally:
                ops.outputs = real
            out.append((batch.indices.tolist(), batch.weights.tolist()))
            loss, grad = ops.gradient(batch.indices, batch.weights)
            ops.W -= 0.5 * grad.reshape(ops.W.shape)
            step += 1
        return out, state, saved

    ref, ref_state, _ = run(40)
    checked = [s for s, *_ in ref_state.log["checks"]]
    fail_at = next(s for s in checked if s > 3)  # a step whose call checks, then forwards the next coreset
    got, state, saved = run(40, fail_at)
    assert saved is not None  # the fault was injected (and survived)
    assert got == ref and state.counters == ref_state.counters
    assert np.array_equal(state.drop.losses, ref_state.drop.losses, equal_nan=True)


def test_a_state_restored_for_half_precision_parameters_keeps_its_averages_in_float32():
    """The quadratic model's averages are kept in the accumulation dtype (float32 for half precision, as
    quadratic_init makes them, review 38): a state dict restored for bfloat16 parameters gives them back so,
    and the next bfloat16 samples update them."""
    from crestcore import quadratic_update

    Xtr, ytr, _, _ = digits()
    cfg = CrestConfig(m=M)
    ops = SoftmaxOps(Xtr, ytr)
    state = crest_init(cfg, ytr, seed=0)
    for _ in range(3):
        state, batch = crest_next_batch(state, ops, cfg)
    like = torch.zeros(ops.params().size, dtype=torch.bfloat16)
    back = crest_load_state_dict(crest_state_dict(state), like)
    assert back.anchor.dtype == torch.bfloat16
    assert back.quad.g_ema.dtype == back.quad.h_ema.dtype == torch.float32
    torch.testing.assert_close(back.quad.h_ema, torch.as_tensor(state.quad.h_ema, dtype=torch.float32))
    q = quadratic_update(back.quad, torch.ones_like(like), torch.ones_like(like), cfg.quadratic)
    assert q.g_ema.dtype == torch.float32 and q.n_g == back.quad.n_g + 1


def test_at_anchor_coresets_from_subsets_that_are_the_whole_pool_are_warned_about():
    """When r reaches the pool every random subset is the pool, so at-anchor coresets are P copies of one
    coreset, trained P times in a row (review 40: at n = 64, 6 of 8 batches repeated and 17 of 64 examples
    were ever trained), silently. Now warned (they differ only by the class budgets' rounding; review 42: not
    "one coreset" as a first wording said); just-in-time coresets (the default), selected at each step's own
    parameters, and r below the pool are not."""
    Xtr, ytr, _, _ = digits()
    X, y = Xtr[:64], ytr[:64]
    paper = CrestConfig.paper(m=8)
    state = crest_init(dataclasses.replace(paper, r=64), y, seed=0)
    with pytest.warns(UserWarning, match=r"subsets are the whole pool.*same examples at the same parameters"):
        state, batch = crest_next_batch(state, SoftmaxOps(X, y), dataclasses.replace(paper, r=64))
    for cfg in (CrestConfig(m=8, r=64), dataclasses.replace(paper, r=32)):
        state = crest_init(cfg, y, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            crest_next_batch(state, SoftmaxOps(X, y), cfg)


def test_subsets_with_under_two_examples_a_class_are_warned_about():
    """Regression (review 59): with many classes and few examples each (C = 40, r = 40 here; C = 1000, n =
    3000, m = 32 in the review) every random subset holds one example of each class, so the per-class
    problems leave nothing to choose and the coresets are a random sample, at a forward's cost, silently.
    Warned now; several examples a class, or per_class=False, are not."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(40), 5)
    X = rng.normal(size=(200, 6)) + y[:, None] * 0.1
    cfg = CrestConfig(m=8, r=40)
    # its alternatives are offered as no sure gain (review 151: on 100 classes both trained below the random sample)
    with pytest.warns(UserWarning, match=r"fewer than two examples of each class.*per_class=False.*lets the greedy "
                                         r"choose, but is no sure gain.*random subset re-drawn every epoch"):
        crest_next_batch(crest_init(cfg, y, seed=0), SoftmaxOps(X, y, C=40), cfg)
    for ok in (CrestConfig(m=8, r=120), CrestConfig(m=8, r=40, per_class=False)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            crest_next_batch(crest_init(ok, y, seed=0), SoftmaxOps(X, y, C=40), ok)


@pytest.mark.parametrize("max_age,expected", [("epoch", [0, 50, 100]), (None, [0, 50, 100]), (20, [0, 20, 40, 60, 80,
                                                                                                    100, 120, 140])])
def test_reselect_epoch_with_p_cap_selects_p_cap_coresets_every_p_cap_steps(max_age, expected):
    """Review 50: ``reselect="epoch"`` with ``P_cap`` above one epoch (50 against 25 steps here) reselected every
    epoch under the default ``max_age="epoch"``, silently, so the later 25 of each selection's 50 coresets
    were never trained; the documented rule is P_cap coresets every P_cap steps. The default age is now that
    mode's period; an integer ``max_age`` still bounds it."""
    from crestcore.controller import _SoftmaxOps

    rng = np.random.default_rng(0)
    y = np.arange(400) % 2
    X = rng.normal(size=(400, 2)) + 2.0 * y[:, None]
    ops = _SoftmaxOps(X, y, C=2)
    config = CrestConfig(m=16, reselect="epoch", P_cap=50, max_age=max_age)  # one epoch: ceil(400 / 16) = 25
    state = crest_init(config, y, seed=0)
    for _ in range(150):
        state, batch = crest_next_batch(state, ops, config)
        _, g = ops.gradient(batch.indices, batch.weights)
        ops.W -= 0.5 * g.reshape(ops.W.shape)
    assert list(state.log["selections"]) == expected


def test_configs_from_numpy_scalars_are_the_typed_configs():
    """Review 77: CrestConfig(m=np.int64(16)) kept the NumPy scalar, so its repr (what a checkpoint compares)
    differed from CrestConfig(m=16)'s and a resumed run said its config differed from the saved one. The
    configs hold Python scalars of the same values now."""
    from crestcore import DropConfig, QuadraticConfig

    a = CrestConfig(m=np.int64(16), r=np.int32(64), tau=np.float64(0.05), per_class=np.True_, T2=np.int64(5),
                    drop=DropConfig(alpha=np.float64(0.2), window=np.int16(4)),
                    quadratic=QuadraticConfig(beta1=np.float64(0.8)))
    b = CrestConfig(m=16, r=64, tau=0.05, per_class=True, T2=5, drop=DropConfig(alpha=0.2, window=4),
                    quadratic=QuadraticConfig(beta1=0.8))
    assert repr(a) == repr(b) and a == b
    assert type(a.m) is int and type(a.tau) is float and type(a.per_class) is bool and type(a.drop.window) is int
    assert CrestConfig(tau=np.float32(0.05)).tau == float(np.float32(0.05))  # the value kept, in a Python float


def test_half_precision_outputs_are_measured_in_float32():
    """Review 83: a ModelOps of the user's returning float16 logits (autocast) had its losses computed in
    float16, whose log-sum-exp rounds a confident example's loss to 0 and 40 % off above it: the trust
    check's numbers (and the drop records) differed from the same logits' in float32. The controller widens
    half-precision outputs first, as it keeps the gradient and curvature in float32."""
    from crestcore.controller import _SoftmaxOps

    rng = np.random.default_rng(0)
    y = np.arange(400) % 2
    X = rng.normal(size=(400, 3)) + 4.0 * y[:, None]

    class Half(_SoftmaxOps):
        def outputs(self, indices, embeddings=False):
            return super().outputs(indices).astype(np.float16)

    class Widened(Half):
        def outputs(self, indices, embeddings=False):
            return super().outputs(indices).astype(np.float32)  # the same float16 values

    logs = []
    for cls in (Half, Widened):
        ops, cfg = cls(X, y, C=2), CrestConfig(m=16, check_size=64)
        ops.W = np.array([[-3.0, 3.0]] * 3)  # a trained-looking start (float16 rounds its losses)
        state = crest_init(cfg, y, seed=0)
        for _ in range(30):
            state, batch = crest_next_batch(state, ops, cfg)
            _, g = ops.gradient(batch.indices, batch.weights)
            ops.W = ops.W - 0.5 * g.reshape(ops.W.shape)
        logs.append(list(state.log["checks"]))
    assert len(logs[0]) > 10 and logs[0] == logs[1]


def test_every_divergence_is_a_divergence_error():
    """Review 81: the docs say a divergence raises DivergenceError (a FloatingPointError and a ValueError);
    finite logits whose loss overflows, a non-finite anchor or check loss and a loss function giving NaN
    raised plain FloatingPointErrors, which `except DivergenceError` / `except ValueError` missed."""
    from crestcore.controller import _SoftmaxOps
    from crestcore.validation import DivergenceError

    y = np.arange(40) % 2
    ops = _SoftmaxOps(np.ones((40, 1)), y, C=2)
    ops.W = np.array([[1e308, -1e308]])  # finite logits, an overflowing log-sum-exp
    with pytest.raises(DivergenceError, match="logits are finite but exploding"):
        with np.errstate(over="ignore", invalid="ignore"):
            crest_next_batch(crest_init(CrestConfig(m=4), y, seed=0), ops, CrestConfig(m=4))


def test_a_state_loaded_with_labels_must_have_been_saved_for_them():
    """Review 89: a bare controller's checkpoint resumed on another data set (800 examples, or the same 600 in
    another order) loaded without a word and drew its subsets from the old labels. ``labels=`` ties the load
    to the training set; seeds are below 2^64 (a larger one was accepted and its checkpoint refused)."""
    y = np.arange(600) % 3
    saved = crest_state_dict(crest_init(CrestConfig(m=16), y, seed=0))
    restored = crest_load_state_dict(saved, np.zeros(6), labels=y)
    assert np.array_equal(restored.labels, y)
    with pytest.raises(ValueError, match=r"saved for other labels \(600 examples; labels has 800\)"):
        crest_load_state_dict(saved, np.zeros(6), labels=np.arange(800) % 3)
    with pytest.raises(ValueError, match="the same count in another order"):
        crest_load_state_dict(saved, np.zeros(6), labels=np.random.default_rng(0).permutation(y))
    with pytest.raises(ValueError, match=r"labels must be the \(n,\) class indices.*\(600, 1\)"):
        crest_load_state_dict(saved, np.zeros(6), labels=y[:, None])
    with pytest.raises(ValueError, match="below 2\\*\\*64"):
        crest_init(CrestConfig(m=16), y, seed=2**64)
    big = crest_init(CrestConfig(m=16), y, seed=2**64 - 1)
    assert crest_load_state_dict(crest_state_dict(big), np.zeros(6)).seed == 2**64 - 1


def test_a_state_restored_in_another_dtype_than_the_parameters_is_refused_naming_params_like():
    """Review 89: a float32 model's state restored with params_like=np.zeros(D) (float64) ran its checks in
    float64 and failed at the next selection with an error about ops.gradient; now the first check says which
    argument to fix."""
    from _helpers import float32_ops

    from crestcore.controller import _SoftmaxOps

    F32 = float32_ops(_SoftmaxOps)
    y = np.arange(200) % 2
    ops = F32(np.random.default_rng(0).normal(size=(200, 2)), y, C=2)
    config = CrestConfig(m=10, T1=1)
    state = crest_init(config, y, seed=0)
    state, _ = crest_next_batch(state, ops, config)
    restored = crest_load_state_dict(crest_state_dict(state), np.zeros(ops.params().size))
    with pytest.raises(TypeError, match="ops.params\\(\\) is float32 but the state's anchor is float64.*params_like"):
        crest_next_batch(restored, ops, config)
    same = crest_load_state_dict(crest_state_dict(state), ops.params())
    crest_next_batch(same, ops, config)  # the parameters' own dtype: goes on


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(20, 400), C=st.integers(1, 6), P=st.integers(1, 7),
       now=st.integers(1, 7), dropped=st.floats(0.0, 0.6), half=st.booleans())
def test_subsets_drawn_at_their_step_are_the_eager_draws_rows(seed, n, C, P, now, dropped, half):
    """A just-in-time selection keeps a recipe, not its P x r subsets (review 123: they grew as n^2): every row
    drawn later from it is the row the eager draw of all P made, and the selection's generator ends where the
    eager draw left it, a buffered 32-bit half included (the later draws of the selection unchanged)."""
    from crestcore.controller import _selection_subsets, _subset_row
    from crestcore.minibatch import _draw_blocked

    now = min(now, P)
    g = np.random.default_rng(seed)
    labels = g.integers(0, C, size=n)
    pool = np.flatnonzero(g.random(n) >= dropped)
    if pool.size < 2:
        pool = np.arange(n)
    r = int(g.integers(1, pool.size + 1))
    eager_gen, lazy_gen = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 1])
    if half:  # a 32-bit draw before leaves half of a 64-bit output buffered
        eager_gen.integers(0, 7, dtype=np.int32), lazy_gen.integers(0, 7, dtype=np.int32)
    blocked, _ = _draw_blocked(labels, pool, r, P, eager_gen, whole=pool.size == n)
    eager = np.sort(blocked, axis=1)
    rows, recipe = _selection_subsets(labels, pool, r, P, now, lazy_gen)
    np.testing.assert_array_equal(rows, eager[:now])
    assert (recipe is None) == (now == P)
    if recipe is not None:
        import types

        state = types.SimpleNamespace(labels=labels, draw=recipe, subsets=np.zeros((0, 0), dtype=np.int64))
        for p in range(P):
            np.testing.assert_array_equal(_subset_row(state, p)[0], eager[p])
    assert eager_gen.integers(2**31 - 1, size=3).tolist() == lazy_gen.integers(2**31 - 1, size=3).tolist()
    assert eager_gen.random() == lazy_gen.random()


def test_a_state_dict_stays_linear_in_the_examples():
    """Review 123: with reselect="epoch" (P one budgeted epoch of coresets) and r 1 % of the pool, the kept
    P x r subsets grew as n^2 (250 of a checkpoint's 277 MB at 10^6 examples), and the per-example int64 arrays
    of a run without drops took 24 MB more. The state dict now holds a few bytes an example."""
    n = 20_000
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, n)
    X = rng.normal(size=(n, 4)) + y[:, None]
    cfg = CrestConfig(m=32, reselect="epoch")
    state = crest_init(cfg, y, seed=0, epoch_steps=n // 10 // 32)
    state, _ = crest_next_batch(state, _SoftmaxOps_for(X, y), cfg)
    d = crest_state_dict(state)

    def nbytes(x):
        if isinstance(x, dict):
            return sum(nbytes(v) for v in x.values())
        return x.nbytes if isinstance(x, np.ndarray) else 0

    assert state.batch_idx.shape[0] == n // 10 // 32 and state.made == 1  # P rows, one made
    assert d["subsets"].size == 0 and d["draw"]["pool"].size == 0  # nothing dropped: no pool stored
    assert d["labels"].dtype == np.int8 and d["drop"]["head"].dtype == np.int8
    assert nbytes(d) < 6 * n, nbytes(d)  # labels, pool mask, drop head and dropped_at a byte each; the batches
    back = crest_load_state_dict(d, _SoftmaxOps_for(X, y).params())
    assert back.labels.dtype == np.int64 and np.array_equal(back.labels, y)


def test_a_drop_state_rebuilt_from_a_narrowed_state_dict_records_late_steps():
    """Review 126: a DropState rebuilt from a state dict's drop fields (int8 there) overflowed once a drop
    decision wrote a step past 127; the drop functions write into int64 copies of a hand-built state's arrays."""
    from crestcore.dropping import DropState

    y = np.arange(300) % 3
    d = crest_state_dict(crest_init(CrestConfig(m=8, T2=2), y, seed=0))
    assert d["drop"]["dropped_at"].dtype == np.int8
    cfg = DropConfig(alpha=0.5, window=400, min_records=1)
    runs = []
    for drop in (DropState(**d["drop"]), cc.drop_init(300, DropConfig())):
        for step in (100, 130, 300, 40000):
            drop = cc.drop_record(drop, np.arange(60), np.full(60, 0.01), step=step)
        runs.append(cc.drop_update(drop, 40000, cfg, labels=y))
    (a, da), (b, db) = runs
    np.testing.assert_array_equal(da, db)
    np.testing.assert_array_equal(a.dropped_at, b.dropped_at)
    assert set(np.unique(a.dropped_at).tolist()) == {-1, 40000}


def test_an_ops_whose_gradient_loss_is_not_the_weighted_mean_is_warned_about():
    """Review 127: a hand-written ModelOps whose gradient and probe are of the weighted sum (the loss k times
    the mean) failed 96 % of its trust checks and nearly doubled the selections, silently. The loss
    ops.gradient returns is compared with the weighted mean of the losses the selection's forward measured for
    the same examples; a correct ops is not warned about. Logits of an integer dtype are refused by name."""
    from crestcore.controller import ModelOps, _SoftmaxOps

    Xtr, ytr, _, _ = digits()
    cfg = CrestConfig(m=M)

    class Summed(_SoftmaxOps):
        def gradient(self, idx, w):
            loss, g = super().gradient(idx, w)
            return loss * idx.size, g * idx.size

    with pytest.warns(RuntimeWarning, match="about k times the weighted mean loss"):
        crest_next_batch(crest_init(cfg, ytr, seed=0), Summed(Xtr, ytr, 10), cfg)
    ops = _SoftmaxOps(Xtr, ytr, 10)
    assert isinstance(ops, ModelOps)  # runtime_checkable: the four methods
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*about k times the weighted mean loss.*")
        state = crest_init(cfg, ytr, seed=0)
        for _ in range(6):
            state, _ = crest_next_batch(state, ops, cfg)
            ops.W -= 0.5 * ops.gradient(state.batch_idx[0][state.batch_idx[0] >= 0],
                                        np.ones(int((state.batch_idx[0] >= 0).sum())))[1].reshape(ops.W.shape)

    class Counts(_SoftmaxOps):
        def outputs(self, idx, embeddings=False):
            return np.round(super().outputs(idx)).astype(np.int64)

    with pytest.raises(TypeError, match="outputs must return real floating logits, got dtype int64"):
        crest_next_batch(crest_init(cfg, ytr, seed=0), Counts(Xtr, ytr, 10), cfg)


def test_an_exactly_zero_gradient_under_a_nonzero_loss_is_warned_about():
    """Review 130: a loss that does not depend on the parameters (a constant column read) gave an exactly zero
    gradient; the model was flat and every check passed, silently. Warned at the fit; a real gradient is not,
    nor a zero gradient of a zero loss (nothing left to learn)."""
    from crestcore.controller import _SoftmaxOps

    Xtr, ytr, _, _ = digits()
    cfg = CrestConfig(m=M)

    class Flat(_SoftmaxOps):
        def gradient(self, idx, w):
            loss, g = super().gradient(idx, w)
            return loss, np.zeros_like(g)

    class Done(Flat):
        def gradient(self, idx, w):
            return 0.0, super().gradient(idx, w)[1]

    with pytest.warns(RuntimeWarning, match=r"exactly zero at the new anchor while the coreset's loss is 2\.3"):
        crest_next_batch(crest_init(cfg, ytr, seed=0), Flat(Xtr, ytr, 10), cfg)
    for ops in (_SoftmaxOps(Xtr, ytr, 10), Done(Xtr, ytr, 10)):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", ".*exactly zero.*")
            crest_next_batch(crest_init(cfg, ytr, seed=0), ops, cfg)

    class Listed(_SoftmaxOps):  # the check comes after the fit has checked the gradient, whose error names it
        def gradient(self, idx, w):
            loss, g = super().gradient(idx, w)
            return loss, list(g)

    with pytest.raises(TypeError, match="CREST's model fit: the gradient .* is ops.gradient's"):
        crest_next_batch(crest_init(cfg, ytr, seed=0), Listed(Xtr, ytr, 10), cfg)


def test_a_state_restored_in_another_library_than_the_ops_is_told_to_pass_ops_params():
    """Review 127: a run whose ops.params() are of one library, restored with a params_like of another, failed
    at its first check mixing the two, naming neither params_like nor the fix."""
    from crestcore.controller import _SoftmaxOps

    Xtr, ytr, _, _ = digits()
    cfg = CrestConfig(m=M, T1=1)
    ops = _SoftmaxOps(Xtr, ytr, 10)
    state, _ = crest_next_batch(crest_init(cfg, ytr, seed=0), ops, cfg)
    d = crest_state_dict(state)
    other = crest_load_state_dict(d, xs.asarray(ops.params()))
    with pytest.raises(TypeError, match=r"params\(\) returns numpy arrays but the state's anchor is a "
                                        r"array_api_strict array.*pass ops\.params\(\) as params_like"):
        for _ in range(3):
            other, _ = crest_next_batch(other, ops, cfg)
    same = crest_load_state_dict(d, ops.params())
    for _ in range(3):
        same, _ = crest_next_batch(same, ops, cfg)


def test_the_arrays_handed_to_the_ops_are_theirs_to_write():
    """Review 127: an ops that wrote the indices (or weights) it was given changed the controller's own
    records, or failed far from the write; the controller hands copies, and the run is the one of an ops
    that does not write them."""
    from crestcore.controller import _SoftmaxOps

    Xtr, ytr, _, _ = digits()
    cfg = CrestConfig(m=M)

    class Writes(_SoftmaxOps):
        def outputs(self, idx, embeddings=False):
            out = super().outputs(idx)
            idx[:] = 0
            return out

    class WritesWeights(_SoftmaxOps):
        def gradient(self, idx, w):
            out = super().gradient(idx, w)
            w *= 0.0
            return out

    runs = []
    for ops in (_SoftmaxOps(Xtr, ytr, 10), Writes(Xtr, ytr, 10), WritesWeights(Xtr, ytr, 10)):
        state, batches = crest_init(cfg, ytr, seed=0), []
        with warnings.catch_warnings():
            warnings.filterwarnings("error", ".*about k times the weighted mean loss.*")  # checked on the controller's own
            for _ in range(4):
                state, batch = crest_next_batch(state, ops, cfg)
                batches.append((batch.indices.tolist(), batch.weights.tolist()))
        runs.append((batches, state.check_idx.tolist()))
    assert runs[0] == runs[1] == runs[2]


def test_numpy_bfloat16_logits_run_and_a_state_token_gets_a_copy():
    """Review 128: NumPy bfloat16 logits (ml_dtypes, as np.asarray of a JAX bfloat16 array gives) were refused
    as not floating by the integer-logits check, though they ran before (widened like any half-precision
    output); state_token got the state's own check_idx, which an ops that reordered it left unsorted."""
    from crestcore.controller import _SoftmaxOps

    ml_dtypes = pytest.importorskip("ml_dtypes")
    Xtr, ytr, _, _ = digits()
    cfg = CrestConfig(m=M, T1=1)

    class Bf16(_SoftmaxOps):
        def outputs(self, idx, embeddings=False):
            return super().outputs(idx).astype(ml_dtypes.bfloat16)

        def state_token(self, idx):
            idx[::-1].sort()  # reorders what it was given, in place
            return None

    ops, state = Bf16(Xtr, ytr, 10), crest_init(cfg, ytr, seed=0)
    for _ in range(4):
        state, _ = crest_next_batch(state, ops, cfg)
    assert crest_stats(state)["checks"] and np.all(np.diff(state.check_idx) > 0)
