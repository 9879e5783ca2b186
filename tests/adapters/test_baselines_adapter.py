"""crestcore.adapters.baselines: SubsetLoader, the baselines behind CrestLoader's interface."""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from _helpers import torch_blobs, torch_mlp, weighted_step  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from crestcore.adapters.baselines import METHODS, SubsetLoader  # noqa: E402

N, D_IN, C, M = 240, 6, 3, 16



def make_data(n=N, seed=0):
    return torch_blobs(n, D_IN, C, seed=seed)


def mlp(seed=0, bn=False):
    return torch_mlp(D_IN, C, seed=seed, bn=bn)


def loader(method, model=None, data=None, **kw):
    X, y = data if data is not None else make_data()
    model = model if model is not None else mlp()
    kw = {"budget": 0.5, "epochs": 3, "m": M, "seed": 1, **kw}
    return SubsetLoader(model, TensorDataset(X, y), method=method, **kw)


def train(ld, steps=None, lr=0.1):
    """The user's loop (the same as for CrestLoader); returns [(indices, weights)] it trained on."""
    model = ld.model
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    seen = []
    for k, (x, y, w) in enumerate(ld.iter_run()):
        ld.observe(weighted_step(model, opt, x, y, w))
        seen.append((ld.last_indices, w.detach().numpy().copy()))
        if steps is not None and k + 1 >= steps:
            break
    return seen, opt


# ------------------------------------------------------------------------------------------------
# every method through the same loop
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_with_the_crestloader_loop(method):
    ld = loader(method)
    full_spe = math.ceil(N / M)  # 15
    spe = full_spe if method == "full" else round(0.5 * full_spe)  # 8 (round half to even: 7.5 -> 8)
    assert ld.full_steps_per_epoch == full_spe and ld.steps_per_epoch == spe
    assert 3 * len(ld) == ld.total_steps == 3 * spe
    seen, _ = train(ld)
    assert len(seen) == ld.total_steps and ld.position == ld.total_steps
    for idx, w in seen:
        assert idx.dtype == np.int64 and idx.ndim == 1 and idx.size <= M
        assert np.all(np.isfinite(w)) and np.all(w > 0) and w.shape == idx.shape
    if method not in ("full", "sgd-budget"):
        assert all(idx.size == M for idx, _ in seen)  # subset epochs: full batches of m
    st = ld.stats
    assert st["step"] == ld.total_steps and st["method"] == method
    assert st["counters"]["train_steps"] == ld.total_steps
    assert st["counters"]["train_examples"] == sum(idx.size for idx, _ in seen)
    # a finished loader warns and yields nothing more
    with pytest.warns(UserWarning, match="planned steps are used"):
        assert list(ld) == []


@pytest.mark.parametrize("method", METHODS)
def test_weights_mean_one_per_selection_and_per_batch(method):
    ld = loader(method)
    seen, _ = train(ld)
    if method in ("full", "sgd-budget", "random", "glister"):
        assert all(np.all(w == 1.0) for _, w in seen)
    if ld.selection is not None:
        assert ld.selection[1].mean() == pytest.approx(1.0, abs=1e-12)
    ldb = loader(method, weights="batch")
    for _, w in train(ldb)[0]:
        assert w.mean() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_under_a_seed(method):
    a, _ = train(loader(method, model=mlp(0)))
    b, _ = train(loader(method, model=mlp(0)))
    assert len(a) == len(b)
    for (ia, wa), (ib, wb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(wa, wb)
    if method not in ("full",):  # another seed, other batches
        c, _ = train(loader(method, model=mlp(0), seed=2))
        assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


@pytest.mark.parametrize("method", ["random", "craig", "gradmatch", "glister", "prune", "sgd-budget"])
@pytest.mark.parametrize("cut", [5, 8, 11])  # mid-epoch, at an epoch boundary, mid-epoch after a reselection
def test_state_dict_resume_is_exact(method, cut):
    ref = loader(method, model=mlp(0), reselect_every=1)
    ref_seen, _ = train(ref)

    a = loader(method, model=mlp(0), reselect_every=1)
    seen_a, opt_a = train(a, steps=cut)
    buf = io.BytesIO()
    torch.save({"loader": a.state_dict(), "model": a.model.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)

    model_b = mlp(5)  # other weights: the checkpoint restores them
    model_b.load_state_dict(ck["model"])
    b = loader(method, model=model_b, reselect_every=1)
    b.load_state_dict(ck["loader"])
    assert b.position == cut
    np.testing.assert_array_equal(b.last_indices, seen_a[-1][0])
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9)
    opt_b.load_state_dict(ck["opt"])
    rest = []
    for x, y, w in b.iter_run():
        b.observe(weighted_step(model_b, opt_b, x, y, w))
        rest.append((b.last_indices, w.numpy().copy()))
    assert len(seen_a) + len(rest) == len(ref_seen)
    for (i1, w1), (i2, w2) in zip(seen_a + rest, ref_seen):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(w1, w2)
    assert b.stats["counters"] == ref.stats["counters"]
    assert len(b.stats["selections"]) == len(ref.stats["selections"])


@pytest.mark.parametrize("method", ["craig", "gradmatch", "glister"])
def test_resume_is_exact_on_a_dataset_with_random_transforms(method):
    """Review 88: a measurement's loads draw their transforms from a stream seeded by its anchor's number,
    which a resumed loader counted from 0 again: the selections after the resume measured other noise (and
    differed). The state carries the number."""
    X, y = make_data()

    def run(ld, model, steps=None, ck=None):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if ck is not None:
            opt.load_state_dict(ck["opt"])
            torch.set_rng_state(ck["rng"])
        seen = []
        for k, (x, yb, w) in enumerate(ld.iter_run()):
            ld.observe(weighted_step(model, opt, x, yb, w))
            seen.append((ld.last_indices, w.numpy().copy()))
            if steps is not None and k + 1 >= steps:
                return seen, {"loader": ld.state_dict(), "model": copy.deepcopy(model.state_dict()),
                              "opt": copy.deepcopy(opt.state_dict()), "rng": torch.get_rng_state()}
        return seen, None

    def build(model):
        return SubsetLoader(model, _Noisy(TensorDataset(X, y)), method=method, budget=0.5, epochs=3, m=M, seed=1,
                            reselect_every=1)

    torch.manual_seed(0)
    ref_model = mlp(0)
    ref, _ = run(build(ref_model), ref_model)
    torch.manual_seed(0)
    first_model = mlp(0)
    first, ck = run(build(first_model), first_model, steps=8)  # at an epoch's end: the next one reselects
    assert ck["loader"]["measure_anchor"] == 1
    model = mlp(5)
    model.load_state_dict(ck["model"])
    resumed = build(model)
    resumed.load_state_dict(ck["loader"])
    rest, _ = run(resumed, model, ck=ck)
    assert len(first) + len(rest) == len(ref)
    for (i1, w1), (i2, w2) in zip(first + rest, ref):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(w1, w2)


def _fields(settings: str) -> list[str]:
    """The values of a ``Settings(a=1, b=[...])`` repr, in order."""
    from crestcore.adapters._common import _repr_fields

    return list(_repr_fields(settings).values())


def test_load_state_dict_checks_the_fingerprint():
    a = loader("random")
    train(a, steps=2)
    sd = a.state_dict()
    with pytest.raises(ValueError, match="seed"):
        loader("random", seed=3).load_state_dict(sd)
    with pytest.raises(ValueError, match="method"):
        loader("craig").load_state_dict(sd)
    with pytest.raises(ValueError, match="format"):
        loader("random").load_state_dict({"position": 3})
    # the options that differ are named (review 104: a bare "options differ", where CrestLoader names them),
    # also against a state saved before 2026-12-05, whose settings were a bare tuple repr
    with pytest.warns(UserWarning, match=r"options differ from the saved ones \(weights: 'selection' -> 'batch'; "
                                         r"reselect_every: 1 -> 2; the run continues"):
        loader("random", weights="batch", reselect_every=2).load_state_dict(sd)
    import ast

    old = {**sd, "settings": repr(tuple(ast.literal_eval(v) for v in _fields(sd["settings"])))}
    with pytest.warns(UserWarning, match=r"\(prune_ratio: 0.5 -> 0.3; the run continues"):
        loader("random", prune_ratio=0.3).load_state_dict(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader("random").load_state_dict(old)  # the same options in the old form: no warning
        # review 107: an old repr holding a NumPy scalar (np.float64(0.25)) is no Python literal, and it was
        # read as every option differing; one equal to the loader's own old repr is its settings
        a = loader("gradmatch", options={"lam": np.float64(0.25)})
        train(a, steps=1)
        s = a.schedule
        a_old = {**a.state_dict(), "settings": repr(s._values())}
        assert "np.float64(0.25)" in a_old["settings"]
        loader("gradmatch", options={"lam": np.float64(0.25)}).load_state_dict(a_old)
    X, y = make_data()
    relabelled = y.clone()
    relabelled[:10] = (relabelled[:10] + 1) % int(y.max() + 1)  # the same size, other labels
    with pytest.raises(ValueError, match="different labels"):
        loader("random", data=(X, relabelled)).load_state_dict(sd)
    loader("random", data=(X.clone(), y.clone())).load_state_dict(sd)  # equal labels in new tensors: accepted


# ------------------------------------------------------------------------------------------------
# budget accounting (CrestLoader's)
# ------------------------------------------------------------------------------------------------
def test_budget_counts_and_counted_selection_passes():
    n_full = 3 * math.ceil(N / M)
    for method in METHODS:
        ld = loader(method, reselect_every=2)
        train(ld)
        st = ld.stats
        c, b = st["counters"], st["budget"]
        assert b["full_data_steps"] == n_full and b["planned_steps"] == ld.total_steps
        assert b["fraction_steps"] == pytest.approx(ld.total_steps / n_full)
        overhead = (c["forward_examples"] + 2 * c["backward_examples"]) / 3
        assert b["overhead_step_equivalents"] == pytest.approx(overhead / M)
        assert b["fraction_all_passes"] == pytest.approx((c["train_examples"] + overhead) / M / n_full)
        n_sel = len(st["selections"])
        assert c["selections"] == n_sel
        if method in ("craig", "gradmatch", "glister"):
            assert [s["epoch"] for s in st["selections"]] == [0, 2]  # every R = 2 epochs
            assert c["forward_examples"] == n_sel * N  # the whole training set (glister: pool + validation)
            assert st["selection_time_s"] == pytest.approx(
                sum(s["forward_seconds"] + s["solve_seconds"] for s in st["selections"]))
            assert st["selection_forward_s"] > 0
        else:
            assert c["forward_examples"] == 0 and c["backward_examples"] == 0
        if method in ("random", "prune"):
            assert [s["epoch"] for s in st["selections"]] == [0, 1, 2]
        if method in ("full", "sgd-budget"):
            assert n_sel == 0


def test_passes_mode_charges_the_selection_forwards():
    steps = loader("craig", budget_counts="steps")
    passes = loader("craig", budget_counts="passes")
    n_steps = len(train(steps)[0])
    n_passes = len(train(passes)[0])
    assert n_steps == steps.total_steps
    assert n_passes < n_steps  # the forwards over the whole set count against the same cap
    b = passes.stats["budget"]
    one_selection = N / 3 / M / b["full_data_steps"]  # checked before a step, as CrestLoader does
    assert b["fraction_all_passes"] <= b["planned_steps"] / b["full_data_steps"] + one_selection + 1e-9
    rnd = loader("random", budget_counts="passes")
    assert len(train(rnd)[0]) == rnd.total_steps  # nothing measured: the whole budget trains


def test_full_ignores_budget_and_sgd_budget_is_its_prefix():
    full = loader("full", budget=0.2)
    sgd = loader("sgd-budget", budget=0.2)
    assert full.total_steps == 3 * 15 and full.budget == 1.0
    assert sgd.total_steps == 3 * 3  # round(0.2 * 15) = 3 per epoch
    f, _ = train(full)
    s, _ = train(sgd)
    for (i1, _), (i2, _) in zip(s, f):
        np.testing.assert_array_equal(i1, i2)  # the full run's first batches, just fewer of them
    first_epoch = np.concatenate([i for i, _ in f[:15]])
    assert np.array_equal(np.sort(first_epoch), np.arange(N))  # a full epoch sees every example once
    assert len(s) == 9 and np.unique(np.concatenate([i for i, _ in s])).size == 9 * M  # no repeat in 9 steps


def test_random_redraws_every_epoch_without_repeats():
    ld = loader("random")
    seen, _ = train(ld)
    spe = ld.steps_per_epoch
    epochs = [np.concatenate([i for i, _ in seen[e * spe:(e + 1) * spe]]) for e in range(3)]
    for ep in epochs:
        assert np.unique(ep).size == spe * M  # one epoch: a subset of spe * m distinct examples
    assert not np.array_equal(np.sort(epochs[0]), np.sort(epochs[1]))


# ------------------------------------------------------------------------------------------------
# method specifics
# ------------------------------------------------------------------------------------------------
def test_glister_holds_out_a_stratified_validation_split():
    X, y = make_data()
    ld = loader("glister", data=(X, y), val_fraction=0.25)
    seen, _ = train(ld)
    val = ld.val_indices
    lab = y.numpy()
    for c in range(C):
        assert abs((lab[val] == c).sum() - 0.25 * (lab == c).sum()) <= 1
    trained = np.concatenate([i for i, _ in seen])
    assert not np.intersect1d(trained, val).size  # never trained on
    assert np.array_equal(np.sort(np.concatenate([ld.pool, val])), np.arange(N))
    assert loader("glister", data=(X, y), val_fraction=0.25).val_indices.tolist() == val.tolist()


def test_craig_weights_are_cluster_sizes_rescaled():
    ld = loader("craig")
    train(ld, steps=1)
    s = ld.stats["selections"][0]
    assert s["size"] == ld.subset_size == 8 * M and s["weight_sum"] == pytest.approx(N)
    idx, w = ld.selection
    assert np.unique(idx).size == idx.size and w.mean() == pytest.approx(1.0)


def test_gradmatch_tops_up_a_short_selection():
    # a huge tolerance stops OMP after its first pick per class: the rest is filled with random examples
    ld = loader("gradmatch", options={"tol": 0.999})
    train(ld, steps=1)
    s = ld.stats["selections"][0]
    assert s["picked"] < ld.subset_size and s["picked"] + s["filled"] == ld.subset_size == s["size"]
    cyc = loader("gradmatch", options={"tol": 0.999}, fill="cycle")
    seen, _ = train(cyc, steps=cyc.steps_per_epoch)
    assert cyc.stats["selections"][0]["size"] < cyc.subset_size
    assert all(i.size == M for i, _ in seen)  # the small selection is cycled into full batches


def test_prune_reads_observed_losses_and_anneals():
    X, y = make_data()
    ld = loader("prune", data=(X, y), epochs=4, budget=1.0, prune_ratio=0.5, prune_anneal=0.75)
    spe = ld.steps_per_epoch
    sels = []
    model = ld.model
    for e in range(4):
        ld.set_epoch(e)
        for x, yb, _w in ld:
            losses = F.cross_entropy(model(x), yb, reduction="none")
            ld.observe(losses)  # no update: only the losses matter here
        sels.append(ld.stats["selections"][-1])
    assert sels[0]["pruned"] == 0  # nothing observed yet
    assert sels[1]["pruned"] > 0 and sels[2]["pruned"] > 0  # well-learned examples thinned
    assert sels[3]["pruned"] == 0  # annealed: epoch 3 >= 0.75 * 4
    for s in sels:
        assert s["weight_sum"] == pytest.approx(N)  # inverse inclusion probabilities: unbiased
    assert ld.position == 4 * spe
    # unseen examples are never pruned: with nothing observed, every example is kept
    fresh = loader("prune", data=(X, y))
    train(fresh, steps=1)
    assert fresh.stats["selections"][0]["size"] == N


def test_selection_measures_in_eval_mode_without_side_effects():
    model = mlp(bn=True)
    model.train()
    X, y = make_data()
    with torch.no_grad():
        model(X)  # some running statistics
    bn = model[1]
    before = copy.deepcopy(bn.state_dict())
    ld = loader("craig", model=model, data=(X, y))
    next(iter(ld))  # the selection runs here
    assert model.training and bn.training
    for k, v in before.items():
        assert torch.equal(v, bn.state_dict()[k]), k


@pytest.mark.parametrize("every", [1, 2])
def test_passes_mode_reselects_at_the_loaders_epochs(every):
    """budget_counts="passes" ends a loader epoch early by the selection's forwards, so the run position
    falls behind epoch * steps_per_epoch; the cadence counted epochs from the position, and CRAIG with
    reselect_every=1 selected in loader epochs 0, 2, 4 only (the others trained on the last epoch's
    selection, logged under another epoch). Now it follows the loader's epochs, with and without a resume."""
    n_epochs = 6

    def make():
        return loader("craig", budget=0.6, epochs=n_epochs, budget_counts="passes", reselect_every=every)

    def run(cut=None):
        ld = make()
        opt = torch.optim.SGD(ld.model.parameters(), lr=0.1)
        per_epoch, seen = [], []
        for e in range(n_epochs):
            before, k, again = ld.stats["counters"]["selections"], 0, True
            while again:  # one pass; after a checkpoint cut it, the resumed loader's pass completes the epoch
                again = False
                for x, y, w in ld:
                    ld.observe(weighted_step(ld.model, opt, x, y, w))
                    seen.append(ld.last_indices)
                    k += 1
                    if (e, k) == cut:  # a checkpoint mid-epoch, restored into new objects
                        buf = io.BytesIO()
                        torch.save({"ld": ld.state_dict(), "model": ld.model.state_dict(), "opt": opt.state_dict()},
                                   buf)
                        buf.seek(0)
                        saved = torch.load(buf, weights_only=False)
                        ld = make()
                        ld.model.load_state_dict(saved["model"])
                        ld.load_state_dict(saved["ld"])
                        opt = torch.optim.SGD(ld.model.parameters(), lr=0.1)
                        opt.load_state_dict(saved["opt"])
                        again = True
                        break
            per_epoch.append((k, ld.stats["counters"]["selections"] - before))
        return ld, per_epoch, seen

    ld, per_epoch, seen = run()
    assert all(k > 0 for k, _ in per_epoch), per_epoch  # every epoch trains (the share exceeds a selection)
    assert [sel for _, sel in per_epoch] == [1 if e % every == 0 else 0 for e in range(n_epochs)], per_epoch
    assert [s["epoch"] for s in ld.stats["selections"]] == list(range(0, n_epochs, every))
    with_sel = [k for k, sel in per_epoch if sel]
    assert max(with_sel) < ld.steps_per_epoch  # a selection's forwards take a share of its epoch's budget
    assert all(k > max(with_sel) for k, sel in per_epoch[1:] if not sel)  # ... which later epochs catch up
    _, _, resumed = run(cut=(1, 2))
    assert len(resumed) == len(seen) and all(np.array_equal(a, b) for a, b in zip(resumed, seen))


@pytest.mark.parametrize("method", ["random", "craig"])
def test_a_pass_over_several_epochs_shares_keeps_their_epochs_under_passes(method):
    """set_epoch(2) on a fresh loader yields the shares of epochs 0-2 in one pass (warned). Under "passes"
    the schedule followed the pass's epoch for all of them and cycled epoch 2's plan (random: 18 of 27
    batches repeated the one an epoch earlier, 1 selection); such a pass keeps blocks of steps_per_epoch
    steps, as "steps" mode does (random, which measures nothing, the same batches)."""
    runs = {}
    for counts in ("steps", "passes"):
        ld = loader(method, budget=0.6, epochs=6, budget_counts=counts)
        ld.set_epoch(2)
        with pytest.warns(UserWarning, match="ahead of the run"):
            seen = [ld.last_indices for _ in ld]
        spe = ld.steps_per_epoch
        assert not any(np.array_equal(seen[i], seen[i - spe]) for i in range(spe, len(seen)))
        assert [s["epoch"] for s in ld.stats["selections"]][:2] == [0, 1]
        runs[counts] = seen
    if method == "random":
        assert len(runs["steps"]) == len(runs["passes"])
        assert all(np.array_equal(a, b) for a, b in zip(runs["steps"], runs["passes"]))


@pytest.mark.parametrize("scenario", ["complete", "skip"])
def test_a_pass_completing_a_broken_epoch_walks_its_epochs_under_passes(scenario):
    """Under "passes", epoch 2 broken off after 2 batches and set_epoch(3) (the documented way to complete
    it), or epoch 2 skipped with set_epoch(3) after epoch 1 (warned): the pass yields epochs 2 and 3 in
    turn, each with its own selection (the first fix sent it back to a finished epoch: [0, 1, 2, 1, 4, 5]),
    and no batch is repeated."""
    ld = loader("craig", budget=0.6, epochs=6, budget_counts="passes")
    opt = torch.optim.SGD(ld.model.parameters(), lr=0.1)
    seen, e = [], 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while e < 6:
            for k, (x, y, w) in enumerate(ld, 1):
                ld.observe(weighted_step(ld.model, opt, x, y, w))
                seen.append(ld.last_indices)
                if scenario == "complete" and e == 2 and k == 2:
                    break
            if e == (2 if scenario == "complete" else 1):
                ld.set_epoch(3)
                e = 3
                continue
            e += 1
    assert [s["epoch"] for s in ld.stats["selections"]] == [0, 1, 2, 3, 4, 5]
    assert not any(np.array_equal(seen[i], seen[j]) for i in range(len(seen)) for j in range(i))
    ahead = [str(w.message) for w in caught if "ahead of the run" in str(w.message)]
    # completing a broken-off epoch is no skip (under "passes" the position lags: it was taken for one)
    assert len(ahead) == (0 if scenario == "complete" else 1), ahead
    per_epoch = np.bincount([s["epoch"] for s in ld.stats["selections"]], minlength=6)
    assert per_epoch.tolist() == [1] * 6


def test_the_loaders_warnings_name_the_users_line():
    """The pass's and the schedule's warnings are raised inside a generator and the schedule: a fixed
    stacklevel named sys:1 or crestcore's own file; they name the line of the user's loop now."""
    ld = loader("random", epochs=1)
    ld.set_epoch(0)
    list(ld)
    with pytest.warns(UserWarning, match="all planned steps are used") as rec:
        list(ld)
    assert rec[0].filename == __file__
    ahead = loader("random", epochs=3)
    ahead.set_epoch(2)
    with pytest.warns(UserWarning, match="ahead of the run") as rec:
        next(iter(ahead))
    assert rec[0].filename == __file__
    prune = loader("prune", epochs=3)
    with pytest.warns(UserWarning, match="no training losses were observed") as rec:
        for _ in prune.iter_run():
            pass
    assert rec[0].filename == __file__


def test_set_epoch_and_per_epoch_passes():
    ld = loader("random", per_epoch=True)
    assert len(ld) == ld.steps_per_epoch
    counts = []
    for e in range(3):
        ld.set_epoch(e)
        counts.append(sum(1 for _ in ld))
    assert counts == [ld.steps_per_epoch] * 3 and ld.epoch == 3
    with pytest.raises(ValueError, match="beyond"):
        ld.set_epoch(3)


def test_errors():
    with pytest.raises(ValueError, match="method"):
        loader("nope")
    with pytest.raises(ValueError, match="weights"):
        loader("random", weights="sum")
    with pytest.raises(ValueError, match="budget"):
        loader("random", budget=0)
    with pytest.raises(ValueError, match="exceeds"):
        loader("random", m=N + 1)
    ld = loader("prune")
    with pytest.raises(RuntimeError, match="observe"):
        ld.observe(torch.zeros(M))
    next(iter(ld))
    with pytest.raises(ValueError, match="losses"):
        ld.observe(torch.zeros(M + 1))
    with pytest.raises(FloatingPointError):
        ld.observe(torch.full((M,), float("nan")))


@pytest.mark.parametrize("method", ["craig", "gradmatch"])
def test_a_selection_smaller_than_the_class_count_does_not_starve_the_same_classes(method):
    """100 balanced classes, selections of 96: each selection leaves 4 classes out, drawn afresh (a fixed
    Hamilton split left out classes 96-99 at every selection, so they were never trained on)."""
    C = 100
    y = torch.arange(500) % C
    ds = TensorDataset(torch.randn(500, 16, generator=torch.Generator().manual_seed(0)), y)
    loader = SubsetLoader(torch.nn.Linear(16, C), ds, method=method, budget=0.2, epochs=6, m=16, seed=0)
    absent, seen = [], set()
    for _x, yb, _w in loader.iter_run():
        seen |= set(yb.tolist())
        if len(loader.stats["selections"]) > len(absent):
            absent.append(frozenset(range(C)) - set(y[loader.selection[0]].tolist()))
    assert loader.subset_size == 96 and len(absent) == 6 and all(len(a) == 4 for a in absent)
    assert len(set(absent)) > 1  # not the same classes every time
    assert seen == set(range(C))


def test_class_budgets_override_the_hamilton_split():
    """The core functions take a caller's per-class split (validated by name); the Hamilton split passed
    explicitly gives the default call's result."""
    from crestcore import facility_location
    from crestcore._validation import hamilton
    from crestcore.baselines import craig, gradmatch

    rng = np.random.default_rng(0)
    G, lab = rng.normal(size=(60, 5)), np.repeat(np.arange(3), 20)
    default = craig(G, lab, 7)
    same = craig(G, lab, 7, class_budgets=hamilton(7, np.array([20, 20, 20])))
    assert np.array_equal(default.indices, same.indices) and np.array_equal(default.weights, same.weights)
    sel = craig(G, lab, 7, class_budgets=[0, 5, 2])
    assert np.bincount(lab[sel.indices], minlength=3).tolist() == [0, 5, 2]
    gm = gradmatch(G, 7, labels=lab, class_budgets=[4, 0, 3])
    assert set(np.bincount(lab[gm.indices], minlength=3)[[1]].tolist()) == {0}
    for bad, match in (([1, 2], "one count per class"), ([3, 3, 3], "add up to 9, but k is 7"),
                       ([-1, 4, 4], ">= 0"), ([7, 0, 0.0], "integers")):
        with pytest.raises((ValueError, TypeError), match=match):
            facility_location(G, 7, labels=lab, class_budgets=bad)
    with pytest.raises(ValueError, match="class_budgets needs labels"):
        facility_location(G, 7, class_budgets=[7])
    with pytest.raises(ValueError, match="class_budgets needs labels"):
        gradmatch(G, 7, class_budgets=[7])


def test_the_measurement_chunk_size_is_the_cpu_default_unless_given_and_named_when_bad():
    assert loader("craig").ops.batch_size == 128  # measured on the CPU here: TorchModelOps' default
    assert loader("craig", measure_batch_size=32).ops.batch_size == 32
    with pytest.raises(ValueError, match="^measure_batch_size "):
        loader("craig", measure_batch_size=0)


@pytest.mark.parametrize("method", ["craig", "gradmatch", "glister"])
def test_solve_on_host_gives_the_cpu_model_the_same_batches(method):
    """solve_on="host" reaches the schedule (a GPU model's outputs would be solved in NumPy); a CPU
    model's outputs are on the host already, so its batches are the default's."""
    ld = loader(method, solve_on="host")
    assert ld.schedule.solve_on == "host"
    a, _ = train(ld, steps=6)
    b, _ = train(loader(method), steps=6)
    for (ia, wa), (ib, wb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(wa, wb)
    with pytest.raises(ValueError, match="solve_on"):
        loader(method, solve_on="cuda")


class _Noisy(torch.utils.data.Dataset):
    """A random augmentation drawn from torch's global RNG, as torchvision's transforms draw."""

    def __init__(self, data):
        self.data, self.targets = data, data.tensors[1]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return x + 0.05 * torch.randn_like(x), y


@pytest.mark.parametrize("method", ["craig", "gradmatch", "glister", "crest"])
def test_measurement_loads_leave_the_global_rng_where_the_training_loads_leave_it(method):
    """Review 57: with random transforms and measurements loaded in the training process (the default),
    a selection's forward over the training set advanced torch's global RNG, so the augmentations and
    dropout masks after it differed from Random's at the same seed (docs/baselines.md: "torch's global RNG
    untouched"). The measurement loads now draw from their own stream, seeded by the loaded indices: the
    global RNG moves by the training batch's own loads only, and the same examples load the same way."""
    data = _Noisy(TensorDataset(*make_data()))
    model = mlp()
    if method == "crest":
        from crestcore import CrestConfig
        from crestcore.adapters.torch import CrestLoader

        ld = CrestLoader(model, data, config=CrestConfig(m=M, r=60), budget=0.5, epochs=1, seed=0)
    else:
        ld = SubsetLoader(model, data, method=method, budget=0.5, epochs=3, m=M, seed=1)
    torch.manual_seed(0)
    next(iter(ld))
    after_loader = torch.rand(3)
    torch.manual_seed(0)
    _ = [data[int(i)] for i in ld.last_indices]  # the batch's own loads, nothing else
    torch.testing.assert_close(after_loader, torch.rand(3), rtol=0, atol=0)
    assert ld.stats["counters"]["forward_examples"] > 0  # a measurement ran
    from crestcore.adapters.torch import _measurement_randomness

    idx = np.arange(5)
    with _measurement_randomness(idx):
        a = torch.rand(2)
    with _measurement_randomness(idx):
        b = torch.rand(2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_peeked_batch_is_said_to_count_as_trained_as_crestloader_says():
    """Review 57: next(iter(loader)) before the loop spent a batch of a SubsetLoader's run silently (the
    loop trained 11 of the 12 planned, stats counted 12); CrestLoader warned. Both say it now, once."""
    ld = loader("random", epochs=2)
    next(iter(ld))
    with pytest.warns(UserWarning, match="left before its end after handing out 1 batch"):
        trained = sum(1 for _ in iter(ld))
    assert trained == len(ld) - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        trained += sum(1 for _ in iter(ld))
    assert trained + 1 == 2 * len(ld) == ld.stats["step"]


def test_observe_takes_one_loss_per_example_as_a_vector_or_a_column_only():
    """Regression (review 62): observe() reshaped any array, so a (2, 5) array passed as the losses of a batch
    of 10; (k,) and (k, 1) are taken, anything else of k values is refused naming the shapes."""
    ld = loader("prune", epochs=2)
    x, y, w = next(iter(ld))
    k = y.shape[0]
    ld.observe(torch.ones(k, 1))
    ld.observe(torch.ones(k))
    ld._last = (ld._last[0][:1], ld._last[1][:1])  # a batch of one (the last of a full pass): a 0-d loss is its
    ld.observe(torch.tensor(0.5))  # loss (review 65: criterion(...).squeeze() was refused)
    ld._last = (ld._last[0].repeat(k), ld._last[1].repeat(k))
    with pytest.raises(ValueError, match=rf"losses of shape \(2, {k // 2}\) for a batch of {k} examples"):
        ld.observe(torch.ones(2, k // 2))


def test_a_due_selection_whose_epoch_trains_nothing_is_made_at_the_next_epoch_that_trains():
    """Under budget_counts='passes' a selection's forward can empty the next epochs' passes; a due epoch
    that handed out no batch lost its selection for good (review 70: selections at epochs 0 and 4 of 8 with
    reselect_every=2; epochs 3 and 7 trained on subsets selected 3 epochs before). The first epoch of the
    block that trains selects now."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the passes budget's warning (the case it warns of)
        ld = loader("craig", data=make_data(960), budget=0.1, m=16, epochs=8, budget_counts="passes", reselect_every=2)
    per_epoch = [sum(1 for _ in ld) for _ in range(8)]
    made = [s["epoch"] for s in ld.stats["selections"]]
    assert 0 in per_epoch  # the case: some epochs train nothing
    for e, b in enumerate(per_epoch):
        if b:  # an epoch that trains uses a selection made in its own block of reselect_every epochs
            assert max(s for s in made if s <= e) // 2 == e // 2, (per_epoch, made)


def test_passes_budget_that_one_selection_exhausts_is_warned_about():
    """Regression (review 62): under budget_counts='passes', a CRAIG selection whose forward (200 examples:
    6.7 step-equivalents of m = 10) cost more than an epoch's share (6 steps) left one batch an epoch, an
    epoch with none (its selection skipped) and the spend 10 % over the cap, silently. Warned when built now;
    a budget that leaves most of it to training is not."""
    import warnings

    X, y = make_data(200)
    with pytest.warns(UserWarning, match=r"budget_counts='passes' each craig selection's forward over 200 examples"):
        loader("craig", data=(X, y), budget=0.3, epochs=7, m=10, reselect_every=1, budget_counts="passes")
    # one selection for the whole run (reselect_every beyond epochs), costing most of it (review 65: unwarned)
    with pytest.warns(UserWarning, match=r"budget_counts='passes'"):
        loader("craig", data=(X, y), budget=0.1, epochs=3, m=10, reselect_every=10, budget_counts="passes")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader("craig", data=(X, y), budget=0.5, epochs=7, m=10, reselect_every=3, budget_counts="passes")


def test_loss_fn_is_said_to_be_unused_and_the_measurement_cache_can_be_turned_off():
    """Review 88: loss_fn was accepted and silently unused by the selections (CRAIG, GradMatch and GLISTER
    measure cross-entropy's gradients); SubsetLoader had no measure_cache_bytes, the documented remedy for a
    dataset changed in place between selections."""
    def mse(z, y):
        return ((z - torch.nn.functional.one_hot(y, C).float()) ** 2).sum(dim=1)

    for method in ("craig", "gradmatch", "glister"):
        with pytest.warns(UserWarning, match=f"loss_fn is not used by {method}'s selections"):
            loader(method, loss_fn=mse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader("prune", loss_fn=mse)  # (prune reads the losses the loop observes)
        assert loader("craig", measure_cache_bytes=0).ops.cache_bytes == 0
        assert loader("craig").ops.cache_bytes == 256 << 20


def test_a_refused_state_says_nothing_of_its_options():
    """Review 170: load_state_dict said "the loader's options differ ... the run continues" and then refused
    the state (a position out of range); the notices are said once every check has passed."""
    a = loader("random")
    train(a, steps=2)
    sd = a.state_dict()
    b = loader("random", weights="batch")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="position must be an integer"):
            b.load_state_dict(dict(sd, position=10**6))
    assert [str(w.message) for w in said] == [] and b.position == 0


def test_a_sparse_dataset_with_workers_is_refused_only_where_the_method_measures():
    """Review 173: SubsetLoader refused a sparse TensorDataset with measure_workers > 0 for every method, also
    random, full and sgd-budget, which never start the workers (they ran before); the methods that measure
    (craig, gradmatch, glister) are refused at construction, naming measure_workers=0."""
    y = torch.arange(60) % 3
    x = torch.eye(60)[:, :12].to_sparse()
    for method in ("random", "full", "sgd-budget"):
        sub = SubsetLoader(torch.nn.Linear(12, 3), TensorDataset(x, y), method=method, budget=0.5, epochs=1, m=6,
                           seed=0, measure_workers=1)
        xb, yb, w = next(iter(sub))
        assert xb.is_sparse and xb.shape[0] == 6
    with pytest.raises(ValueError, match="measure_workers=0"):
        SubsetLoader(torch.nn.Linear(12, 3), TensorDataset(x, y), method="craig", budget=0.5, epochs=1, m=6,
                     seed=0, measure_workers=1)


@pytest.mark.parametrize("field, value, match", [
    ("last", {"indices": None, "weights": [1.0]}, "indices must be a 1-D array"),
    ("last", {"weights": [1.0]}, "last must be None or a dict holding indices and weights"),
    ("last", 5, "last must be None or a dict"),
    ("selection", {"indices": [3], "weights": [1.0]}, "selection must be None or a dict holding"),
    ("counters", None, "counters must be a dict"),
], ids=["last-indices-none", "last-no-indices", "last-number", "selection-no-epoch", "counters-none"])
def test_a_corrupt_state_is_refused_by_field_and_leaves_the_loader_as_it_was(field, value, match):
    """Review of 2026-12-06: SubsetLoader's state fields were read without a check (a KeyError, NumPy's
    "cannot copy a NoneType", or a selection of one example taken as it was); each is refused by its name."""
    a = loader("craig")
    train(a, steps=3)
    b = loader("craig")
    before = b.state_dict()
    with pytest.raises(ValueError, match=f"SubsetLoader state dict: .*{match}"):
        b.load_state_dict(dict(a.state_dict(), **{field: value}))
    assert repr(b.state_dict()) == repr(before)
