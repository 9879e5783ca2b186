"""crestcore.baselines.SubsetSchedule: a baseline as weighted mini-batches of indices, framework-free."""

from __future__ import annotations

import numpy as np
import pytest

from crestcore.baselines import METHODS, SubsetSchedule
from crestcore.controller import _SoftmaxOps


class EmbeddingOps(_SoftmaxOps):
    """Softmax regression on NumPy data whose penultimate features are the inputs (no torch anywhere)."""

    def __init__(self, X, y, C):
        super().__init__(X, y, C)
        self.W = np.random.default_rng(0).normal(size=self.W.shape)
        self.calls = 0

    def outputs(self, indices, embeddings=False):
        self.calls += 1
        z = self.X[indices] @ self.W
        return (z, self.X[indices].copy()) if embeddings else z


def _data(n=120, C=3, d=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % C
    X = rng.normal(size=(n, d)) + y[:, None]
    return X, y


def _schedule(method, y, **kw):
    args = dict(m=8, seed=2, steps_per_epoch=3, full_steps_per_epoch=15, epochs=4)
    args.update(kw)
    return SubsetSchedule(method, y, **args)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_numpy_ops_and_counts_what_it_measures(method):
    X, y = _data()
    ops = EmbeddingOps(X, y, C=3)
    s = _schedule(method, y)
    steps = 4 * (s.full_steps_per_epoch if method in ("full", "sgd-budget") else s.steps_per_epoch)
    for t in range(steps):
        idx, w = s.next_indices(t, ops)
        assert idx.dtype == np.int64 and w.dtype == np.float64 and idx.size == w.size <= 8
        assert np.all(np.isin(idx, s.pool)) and np.all(w > 0)
        s.observe(idx, np.full(idx.size, 0.1 + (t % 3)))
    c = s.counters
    assert c["train_steps"] == steps
    measured = s.pool.size + s.val_indices.size
    if method in ("craig", "gradmatch", "glister"):
        assert ops.calls == c["selections"] == 4 and c["forward_examples"] == 4 * measured
    else:
        assert ops.calls == 0 and c["forward_examples"] == 0
    for rec in s.log:  # every selection records when and how large
        assert rec["size"] > 0 and rec["seconds"] >= rec["forward_seconds"] >= 0


def test_glister_holds_out_a_stratified_validation_split_it_never_trains_on():
    X, y = _data(n=150)
    s = _schedule("glister", y, val_fraction=0.2)
    assert s.val_indices.size == 30 and np.bincount(y[s.val_indices]).tolist() == [10, 10, 10]
    assert np.intersect1d(s.val_indices, s.pool).size == 0 and s.pool.size + s.val_indices.size == 150
    ops = EmbeddingOps(X, y, C=3)
    seen = np.concatenate([s.next_indices(t, ops)[0] for t in range(12)])
    assert np.intersect1d(seen, s.val_indices).size == 0


def test_reselection_cadence_and_weights_modes():
    X, y = _data()
    ops = EmbeddingOps(X, y, C=3)
    s = _schedule("craig", y, reselect_every=2, weights="batch")
    for t in range(12):
        _, w = s.next_indices(t, ops)
        assert w.mean() == pytest.approx(1.0)
    assert [r["epoch"] for r in s.log] == [0, 2]


def test_a_selecting_method_without_ops_says_what_it_needs():
    _, y = _data()
    with pytest.raises(ValueError, match="ops"):
        _schedule("gradmatch", y).next_indices(0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="coreset"), "method"),
    (dict(weights="mean"), "weights"),
    (dict(fill="zeros"), "fill"),
    (dict(embeddings=1), "embeddings"),
    (dict(options=[("lam", 1)]), "options"),
    (dict(m=0), "m must"),
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(prune_anneal=1.5), "prune_anneal"),
])
def test_bad_arguments_are_refused_by_name(kwargs, match):
    _, y = _data()
    method = kwargs.pop("method", "craig")
    with pytest.raises((ValueError, TypeError), match=match):
        _schedule(method, y, **kwargs)
    with pytest.raises(ValueError, match="labels"):
        _schedule("random", y.astype(float))
