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



def test_glister_validation_split_rounds_halves_up_as_budgets_do():
    """Review 76: round() took 2.5 of a class of 25 to 2 and 3.5 of 35 to 4 (halves to even, and the binary
    product's halves either way); the split now rounds as the budgets do: half up, the fraction as written."""
    from crestcore.baselines._schedule import _validation_split

    y = np.repeat([0, 1, 2, 3], [25, 35, 15, 5])
    val = _validation_split(y, 0.1, seed=0)
    assert np.bincount(y[val]).tolist() == [3, 4, 2, 1]  # 2.5, 3.5, 1.5 and 0.5 up
    val = _validation_split(np.repeat([0, 1], [7, 5]), 0.5, seed=0)
    assert np.bincount(np.repeat([0, 1], [7, 5])[val]).tolist() == [4, 3]  # 3.5 and 2.5 up


def test_reselection_cadence_and_weights_modes():
    X, y = _data()
    ops = EmbeddingOps(X, y, C=3)
    s = _schedule("craig", y, reselect_every=2, weights="batch")
    for t in range(12):
        _, w = s.next_indices(t, ops)
        assert w.mean() == pytest.approx(1.0)
    assert [r["epoch"] for r in s.log] == [0, 2]



@pytest.mark.parametrize("weights", ["selection", "batch"])
def test_uniform_methods_give_weights_of_exactly_one(weights):
    """Review 28: the docs say random and glister yield weights of exactly 1; dividing equal weights by their
    mean gave 0.9999999999999997 for some sizes (a float64 model then trained on 1.0000000000000002). Equal
    weights are exactly 1 now; unequal ones still average 1."""
    bad = 0
    for n in range(50, 400, 7):
        X, y = _data(n=n, seed=n)
        ops = EmbeddingOps(X, y, C=3)
        for m in (3, 7, 10):
            full = -(-n // m)
            for method in ("random", "glister"):
                s = SubsetSchedule(method, y, m=m, seed=n, steps_per_epoch=max(1, round(0.3 * full)),
                                   full_steps_per_epoch=full, epochs=1, weights=weights)
                _, w = s.next_indices(0, ops)
                bad += not np.all(w == 1.0)
    assert bad == 0
    X, y = _data()
    s = _schedule("craig", y, weights=weights)
    _, w = s.next_indices(0, EmbeddingOps(X, y, C=3))
    assert w.min() < w.max() and w.mean() == pytest.approx(1.0)
    # a state saved before (equal weights a rounding off 1) resumes with weights of exactly 1 (review 29)
    s = _schedule("random", y, weights=weights)
    s.next_indices(0, EmbeddingOps(X, y, C=3))
    state = s.state()
    for key in ("selection", "plan"):
        if state.get(key) is not None and state[key].get("weights") is not None and weights == "selection":
            state[key]["weights"] = np.full_like(np.asarray(state[key]["weights"]), 0.9999999999999998)
    r = _schedule("random", y, weights=weights)
    r.load_state(state)
    _, w = r.next_indices(1, EmbeddingOps(X, y, C=3))
    assert np.all(w == 1.0)

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
    (dict(options={"optimizer": "stochastic", "rng": np.random.default_rng(0)}), "rng must be an int seed"),
    # review 141: glister's eta given in options won over glister_lr, which the settings still reported
    (dict(method="glister", options={"eta": 0.5}), r"\['eta'\].*eta is set by glister_lr="),
])
def test_bad_arguments_are_refused_by_name(kwargs, match):
    _, y = _data()
    method = kwargs.pop("method", "craig")
    with pytest.raises((ValueError, TypeError), match=match):
        _schedule(method, y, **kwargs)
    with pytest.raises(ValueError, match="labels"):
        _schedule("random", y.astype(float))


def test_gradmatch_tops_up_each_class_to_its_share_and_fills_the_budget():
    """OMP stopping early in one class (identical gradients: one pick matches the class's sum) leaves that
    class short; the top-up gives each class what it lacks of its share of k, and the budget is filled
    (before: the fill followed the pool's class shares and left the selection short of k)."""
    n, h = 40, 6
    lab = np.arange(n) % 2
    rng = np.random.default_rng(0)
    Z, E = np.zeros((n, 2)), rng.normal(size=(n, h))
    E[lab == 0] = 1.0

    class Ops:
        def outputs(self, idx, embeddings=False):
            return (Z[idx], E[idx]) if embeddings else Z[idx]

    s = SubsetSchedule("gradmatch", lab, m=4, seed=0, steps_per_epoch=8, full_steps_per_epoch=10, epochs=1,
                       options={"lam": 0.0})
    s.next_indices(0, Ops())
    rec, idx = s.log[-1], s.selection[0]
    assert rec["picked"] < s.subset_size == 32 and rec["size"] == 32 and np.unique(idx).size == 32
    assert [int((lab[idx] == c).sum()) for c in (0, 1)] == [16, 16]

    # classes too small for their share: what they cannot supply comes from the others
    lab = np.array([0] + [1] * 2 + [2] * 47)
    Z, E = rng.normal(size=(50, 3)), rng.normal(size=(50, h))
    for spe in (9, 12):
        s = SubsetSchedule("gradmatch", lab, m=5, seed=1, steps_per_epoch=spe, full_steps_per_epoch=10, epochs=1,
                           options={"tol": 0.9})
        s.next_indices(0, Ops())
        assert s.log[-1]["size"] == s.subset_size == min(50, 5 * spe)


def test_gradmatch_cycle_with_nothing_picked_fills_at_random_and_says_so():
    """Regression (review 62): when no gradient correlates positively with their sum (a model that fits its
    data: float32 gradients of 0), OMP picks nothing and fill='cycle' raised FloatingPointError ('the
    selection is empty') mid-run; it now fills that selection at random, as fill='random' does, warned."""
    n = 40
    lab = np.arange(n) % 2
    Z = np.where(lab[:, None] == np.arange(2)[None, :], 100.0, -100.0).astype(np.float32)  # certain, right
    E = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)

    class Ops:
        def outputs(self, idx, embeddings=False):
            return (Z[idx], E[idx]) if embeddings else Z[idx]

    s = SubsetSchedule("gradmatch", lab, m=4, seed=0, steps_per_epoch=2, full_steps_per_epoch=10, epochs=1,
                       fill="cycle")
    with pytest.warns(UserWarning, match="picked no example at epoch 0.*filled at random"):
        idx, w = s.next_indices(0, Ops())
    assert s.log[-1]["picked"] == 0 and s.log[-1]["size"] == 8 and idx.size == 4 and np.all(w > 0)


def test_arguments_a_method_does_not_read_are_warned_about_and_method_arguments_drops_them():
    """Regression (review 62): reselect_every=2 with random (which draws every epoch), fill with craig,
    val_fraction with prune... were accepted silently, where options= for prune is refused. A value other
    than the default for an argument the method never reads is warned about; method_arguments keeps only
    those that apply, and defaults passed explicitly say nothing."""
    import warnings

    from crestcore.baselines import method_arguments

    y = np.arange(40) % 2
    kw = dict(m=4, seed=0, steps_per_epoch=2, full_steps_per_epoch=10, epochs=2)
    with pytest.warns(UserWarning, match=r"'random' does not use reselect_every=2: it draws a new subset every epoch"):
        SubsetSchedule("random", y, reselect_every=2, **kw)
    with pytest.warns(UserWarning, match=r"'craig' does not use fill='cycle', val_fraction=0.2"):
        SubsetSchedule("craig", y, fill="cycle", val_fraction=0.2, **kw)
    every = dict(reselect_every=3, fill="cycle", val_fraction=0.2, glister_lr=0.1, prune_ratio=0.3, prune_anneal=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in METHODS:
            if method in ("full", "sgd-budget"):
                continue
            SubsetSchedule(method, y, **method_arguments(method, **every), **kw)
        SubsetSchedule("random", y, reselect_every=1, fill="random", **kw)  # the defaults, given
    assert method_arguments("gradmatch", **every) == {"reselect_every": 3, "fill": "cycle"}


def test_prune_past_its_planned_epochs_keeps_the_last_rule_and_says_so():
    X, y = _data()
    s = _schedule("prune", y, epochs=1)
    for t in range(s.steps_per_epoch):
        idx, _ = s.next_indices(t)
        s.observe(idx, np.abs(X[idx, 0]))
    with pytest.warns(UserWarning, match="epochs="):
        idx, w = s.next_indices(s.steps_per_epoch)  # epoch 1 of a schedule built for one epoch
    assert idx.size == s.m and s.log[-1]["epoch"] == 1


@pytest.mark.parametrize("method, options, match", [
    ("prune", {"ratio": 0.9}, "prune_ratio"),
    ("random", {"tol": 0.1}, "takes none"),
    ("gradmatch", {"lamda": 0.1}, "lam"),
    ("gradmatch", {"labels": None}, "allowed"),
    ("glister", {"val_embeddings": None}, "allowed"),
    # signed weights cannot train: they were dropped and refilled at random, silently
    ("gradmatch", {"positive": False}, "positive=False"),
])
def test_options_the_method_would_not_accept_are_refused_when_built(method, options, match):
    _, y = _data()
    with pytest.raises(ValueError, match=match):
        _schedule(method, y, options=options)
    _schedule("gradmatch", y, options={"lam": 0.1, "positive": True})  # accepted


def test_craig_weights_classes_by_their_chance_of_a_pick_when_k_is_below_the_classes():
    """Regression (review 62): with k below the number of classes a class is selected with probability
    p_c = k n_c / n, but a picked class kept its cluster-size weight n_c, so its expected weight went as
    n_c^2: 50 classes of two examples (9.1 % of the data) got 1.8 % of CRAIG's weight. Its picks weigh
    n_c / p_c now, and the classes' weight shares, averaged over selections, are their shares of the data."""
    sizes = [20] * 10 + [2] * 10
    y = np.repeat(np.arange(20), sizes)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(y.size, 4))
    ops = EmbeddingOps(X, y, C=20)
    epochs = 150
    s = SubsetSchedule("craig", y, m=6, seed=0, steps_per_epoch=2, full_steps_per_epoch=37, epochs=epochs,
                       weights="selection")
    k = 12  # below the 20 classes: every class of two examples is picked with p = 12 * 2 / 220
    small = np.zeros(epochs)
    for e in range(epochs):
        s.next_indices(e * 2, ops)
        cls = y[s.sel_idx]
        assert s.sel_idx.size == k
        picked_small = np.unique(cls[cls >= 10])
        for c in picked_small:  # a class of two: its one pick weighs 2 / p (before the mean-1 rescaling)
            w_c = s.sel_w[cls == c].sum() / s.sel_w.sum() * s.log[-1]["weight_sum"]
            assert w_c == pytest.approx(2 / (k * 2 / y.size), rel=1e-9)
        small[e] = s.sel_w[cls >= 10].sum() / s.sel_w.sum()
    share = 20 / y.size  # the small classes' share of the data, 9.1 %
    assert abs(small.mean() - share) < 0.02, (small.mean(), share)


def test_glister_warns_when_small_classes_hold_out_more_than_val_fraction():
    """60 classes of 2 examples: one of each is held out (half the set, against val_fraction 0.1), and a
    warning says so; 3 classes of 40 hold out 10 % and do not warn."""
    import warnings

    from crestcore.baselines._schedule import SubsetSchedule

    kw = dict(m=8, seed=0, steps_per_epoch=2, full_steps_per_epoch=15, epochs=2)
    with pytest.warns(UserWarning, match=r"holds out 60 of 120 examples \(50%, val_fraction=0.1\)"):
        SubsetSchedule("glister", np.repeat(np.arange(60), 2), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = SubsetSchedule("glister", np.repeat(np.arange(3), 40), **kw)
    assert s.val_indices.size == 12
    # review 62: imbalanced, the whole set's share stays near 10 % while the small classes lose a third or half
    y = np.repeat(np.arange(6), [990, 2, 2, 2, 3, 3])
    with pytest.warns(UserWarning, match=r"holds out 104 of 1002 examples \(10%, val_fraction=0.1\), and 5 of "
                                         r"the 6 classes \(of 2-3 examples\) lose 33%-50% of theirs"):
        SubsetSchedule("glister", y, **kw)


def test_full_data_methods_refuse_a_full_epoch_that_is_not_ceil_n_over_m():
    """full and sgd-budget cut their passes over all n examples into full_steps_per_epoch batches of m:
    another count handed out empty batches (counted as steps) or skipped examples."""
    _, y = _data(n=10)
    for method in ("full", "sgd-budget"):
        with pytest.raises(ValueError, match=r"full_steps_per_epoch must be ceil\(n / m\) = 3"):
            SubsetSchedule(method, y, m=4, seed=0, steps_per_epoch=3, full_steps_per_epoch=4, epochs=1)
        SubsetSchedule(method, y, m=4, seed=0, steps_per_epoch=3, full_steps_per_epoch=3, epochs=1)


def test_prune_without_observed_losses_warns_once():
    """prune reads the training losses observe() records: a run that never records one would be random
    sampling under prune's name, so the first selection after an epoch says so (once)."""
    _, y = _data(n=40)
    s = SubsetSchedule("prune", y, m=4, seed=0, steps_per_epoch=5, full_steps_per_epoch=10, epochs=4)
    for t in range(5):
        s.next_indices(t)
    with pytest.warns(UserWarning, match="no training losses were observed"):
        s.next_indices(5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(6, 20):
            s.next_indices(t)
    observed = SubsetSchedule("prune", y, m=4, seed=0, steps_per_epoch=5, full_steps_per_epoch=10, epochs=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(10):
            idx, _ = observed.next_indices(t)
            observed.observe(idx, np.linspace(0.0, 1.0, idx.size))


@pytest.mark.parametrize("method", ["craig", "gradmatch", "glister"])
def test_array_api_strict_outputs_select_as_numpy_outputs(method):
    """The schedule sliced the outputs with one index on a 2-D array (z[:npool]), which the array API
    does not allow: array-api-strict outputs failed; NumPy's answer is expected."""
    import array_api_strict as xs

    rs = np.random.default_rng(0)
    n, d, C = 40, 4, 3
    y = rs.integers(0, C, n)
    X = rs.normal(size=(n, d)) + y[:, None]
    W = rs.normal(size=(d, C))

    class Ops:
        def __init__(self, lib):
            self.lib = lib

        def outputs(self, idx, embeddings=False):
            z = X[idx] @ W
            if self.lib == "strict":
                return (xs.asarray(z), xs.asarray(X[idx])) if embeddings else xs.asarray(z)
            return (z, X[idx]) if embeddings else z

    picks = {}
    for lib in ("numpy", "strict"):
        s = SubsetSchedule(method, y, m=4, seed=0, steps_per_epoch=2, full_steps_per_epoch=10, epochs=1)
        idx, w = s.next_indices(0, Ops(lib))
        picks[lib] = (np.asarray(idx).tolist(), np.round(np.asarray(w, dtype=float), 9).tolist())
    assert picks["numpy"] == picks["strict"]


def test_outputs_without_the_embeddings_pair_are_refused_clearly():
    y = np.arange(40) % 2

    class LogitsOnly:
        def outputs(self, idx, embeddings=False):
            return np.zeros((len(idx), 2))

    s = SubsetSchedule("craig", y, m=4, seed=0, steps_per_epoch=2, full_steps_per_epoch=10, epochs=1,
                       embeddings=True)
    with pytest.raises(ValueError, match="pair"):
        s.next_indices(0, LogitsOnly())


class DeviceOps(EmbeddingOps):
    """EmbeddingOps whose outputs live on array-api-strict's second device: a model on a GPU, as the
    schedule sees it (no host memory, its own library)."""

    def outputs(self, indices, embeddings=False):
        import array_api_strict as xs

        out = super().outputs(indices, embeddings)
        dev = xs.Device("device1")
        put = lambda a: xs.asarray(a, device=dev)  # noqa: E731
        return tuple(put(a) for a in out) if embeddings else put(out)


@pytest.mark.parametrize("method", ["craig", "gradmatch", "glister"])
def test_solve_on_host_solves_a_device_model_in_numpy(method, monkeypatch):
    """solve_on="host": a model's device outputs are copied to the host and solved in NumPy, and the
    batches are a host model's; "auto" (default) solves them in their own library on their device."""
    import crestcore.baselines._schedule as sched

    X, y = _data()
    real = getattr(sched, method)  # the core function of the same name
    seen = []

    def spy(G, *args, **kw):
        seen.append(type(G).__module__.split(".")[0])
        return real(G, *args, **kw)

    monkeypatch.setattr(sched, method, spy)

    def run(ops, **kw):
        s = _schedule(method, y, **kw)
        return [s.next_indices(t, ops) for t in range(2 * s.steps_per_epoch)]

    host = run(EmbeddingOps(X, y, C=3))
    on_host = run(DeviceOps(X, y, C=3), solve_on="host")
    assert seen[-2:] == ["numpy", "numpy"]
    on_device = run(DeviceOps(X, y, C=3))
    assert seen[-1] == "array_api_strict"
    for (a, wa), (b, wb) in zip(host, on_host):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(wa, wb)
    assert len(on_device) == len(host)
    with pytest.raises(ValueError, match="solve_on"):
        _schedule(method, y, solve_on="gpu")


def _trained_schedule(method):
    X, y = _data()
    s = _schedule(method, y)
    ops = EmbeddingOps(X, y, 3)
    for t in range(4):
        idx, _ = s.next_indices(t, ops)
        s.observe(idx, np.full(idx.size, 0.5))
    return s, y


SCHEDULE_CORRUPT = [
    ("selection-indices-none", "craig", ("selection", "indices"), None, "selection.indices must be a 1-D array"),
    ("selection-indices-range", "craig", ("selection", "indices"), lambda a: a + 1000, "selection.indices must hold"),
    ("selection-weights-short", "random", ("selection", "weights"), lambda a: a[:-1], "selection.weights must hold"),
    ("selection-weights-nan", "random", ("selection", "weights"), lambda a: a * np.nan, "selection.weights must hold"),
    ("selection-epoch-text", "random", ("selection", "epoch"), "x", "selection.epoch must be an integer"),
    ("selection-not-dict", "random", ("selection",), 5, "selection must be None or a dict"),
    ("plan-key-missing", "random", ("plan",), {"indices": [], "weights": []}, "plan must be None or a dict"),
    ("plan-indices-size", "random", ("plan", "indices"), lambda a: a[:3], "plan.indices must hold 24 indices"),
    ("plan-weights-none", "random", ("plan", "weights"), None, "plan.weights must hold the planned"),
    ("full-plan-weighted", "full", ("plan", "weights"), lambda _: np.ones(120), "plan.weights must be None"),
    ("prune-losses-none", "prune", ("losses",), None, "losses must be a 1-D array"),
    ("prune-seen-short", "prune", ("seen",), lambda a: a[:5], "losses and seen must hold one entry"),
    ("counters-none", "random", ("counters",), None, "counters must be a dict"),
    ("counter-float", "random", ("counters", "train_steps"), 1.5, "counters.train_steps must be an integer"),
    ("log-not-records", "random", ("selections",), [1, 2], "selections must be a list of records"),
    # review 178: accepted, and trained on example 0 alone, on glister's held-out examples, or with weight 0
    ("full-plan-not-a-permutation", "full", ("plan", "indices"), lambda a: a * 0, "must be a permutation"),
    ("glister-selection-held-out", "glister", ("selection", "indices"), "held-out",
     "outside the pool this schedule selects from"),
    ("selection-weights-zero", "random", ("selection", "weights"), lambda a: a * 0.0, "not all 0"),
]


@pytest.mark.parametrize("method, path, value, match", [c[1:] for c in SCHEDULE_CORRUPT],
                         ids=[c[0] for c in SCHEDULE_CORRUPT])
def test_a_corrupt_state_is_refused_by_field_and_changes_nothing(method, path, value, match):
    """A state whose fields are not what :meth:`SubsetSchedule.state` writes is refused with the field's name,
    and the schedule keeps its own state (before 2026-12-06 it took any value: ``selection.indices=5`` trained
    on example 5 alone, ``None`` gave NumPy's "cannot copy a NoneType", a missing key a bare KeyError)."""
    s, y = _trained_schedule(method)
    bad = s.state()
    cur = bad
    for k in path[:-1]:
        cur = cur[k]
    if value == "held-out":  # the held-out validation examples as the selection
        value = s.val_indices[: cur[path[-1]].size]
        cur["weights"] = np.ones(value.size)
    cur[path[-1]] = value(cur[path[-1]]) if callable(value) else value
    other = _schedule(method, y)
    before = other.state()
    with pytest.raises(ValueError, match=match):
        other.load_state(bad, where="test state")
    after = other.state()
    assert after.keys() == before.keys()
    assert all((after[k] is None and before[k] is None) or repr(after[k]) == repr(before[k]) for k in before)
    other.load_state(s.state())  # the intact state still loads
    assert repr(other.state()) == repr(s.state())
