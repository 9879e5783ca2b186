"""The pass logic of BudgetedPasses through CrestLoader: loads stop started passes and forget set_epoch,
the finished warning after a load, an epoch done at its share's last batch; rewound batches replayed at
the budget_counts="passes" cap."""
import itertools

import pytest

torch = pytest.importorskip("torch")

from crestcore import CrestConfig  # noqa: E402
from crestcore.adapters.torch import CrestBatchSampler, CrestLoader, _example_data  # noqa: E402


def _loader(epochs=2):
    torch.manual_seed(0)
    return CrestLoader(torch.nn.Linear(4, 2), _example_data(64), config=CrestConfig(m=8), budget=0.5, epochs=epochs,
                       seed=0)


def test_a_pass_started_before_a_load_stops():
    ld = _loader()
    old = iter(ld)
    next(old)
    ld.load_state_dict(ld.state_dict())
    assert list(old) == []  # the pass started before the load yields nothing more
    assert ld.position == 1


def test_a_set_epoch_before_a_load_is_forgotten():
    ld = _loader()
    saved = ld.state_dict()  # position 0
    ld.set_epoch(1)  # declared, then a checkpoint is loaded: the declaration belonged to the old run
    ld.load_state_dict(saved)
    assert len(list(ld)) == ld.steps_per_epoch  # epoch 0's share only, not epochs 0 and 1


def test_the_last_batch_of_a_share_finishes_the_epoch_even_if_the_consumer_stops_there():
    ld = _loader()
    got = list(itertools.islice(iter(ld), ld.steps_per_epoch))  # the generator is not resumed after its last item
    assert len(got) == ld.steps_per_epoch
    assert ld.stats["budget"]["epochs_done"] == 1


def test_the_finished_warning_comes_again_after_a_load():
    ld = _loader(epochs=1)
    list(ld)
    with pytest.warns(UserWarning, match="planned steps are used"):
        assert list(ld) == []
    ld.load_state_dict(ld.state_dict())
    with pytest.warns(UserWarning, match="planned steps are used"):
        assert list(ld) == []


def _sampler():
    torch.manual_seed(0)
    return CrestBatchSampler(torch.nn.Linear(4, 2), _example_data(64),
                             config=CrestConfig(m=8, r=32, P=4, coresets="at-anchor"), budget=0.5, epochs=2, seed=0,
                             budget_counts="passes")


def test_rewound_batches_are_replayed_at_the_passes_cap():
    ref = _sampler()
    first = list(ref)  # epoch 0's pass: stops at the cap
    assert 0 < len(first) < ref.steps_per_epoch  # the measurement passes took steps' place
    # its overhead alone fills the cap: a replay is checked against it
    assert ref.stats["budget"]["overhead_step_equivalents"] + 1 > ref.steps_per_epoch
    for trained in range(len(first)):
        s = _sampler()
        got = list(s)
        assert got == first
        s.rewind(trained)
        s.set_epoch(0)
        again = list(s)
        assert again == first[trained:], (trained, len(again), len(first))
        assert s.position == len(first)


def test_set_epoch_of_an_epoch_the_passes_cap_finished_early_is_ignored_and_said_once_per_load():
    """budget_counts="passes": an epoch ends at the cost cap before its share's end. A set_epoch naming it
    (accelerate's own count in a resumed process) is ignored, as for an epoch handed out in full: the pass
    yields the next epoch instead of nothing (every later pass was empty under accelerate). The warning is
    said once, and again after a load."""
    ref = _sampler()
    per_epoch = [len(list(ref)) for _ in range(ref.epochs)]
    s = _sampler()
    first = list(s)
    assert s.position < s.steps_per_epoch and s.stats["budget"]["epochs_done"] == 1  # finished early
    saved = s.state_dict()
    with pytest.warns(UserWarning, match=r"set_epoch\(0\) named an epoch whose share is handed out already"):
        s.set_epoch(0)
        second = list(s)
    assert [len(first), len(second)] == per_epoch and s.epoch == 2
    s.load_state_dict(saved)  # back after epoch 0: the same stale set_epoch is said again
    with pytest.warns(UserWarning, match=r"set_epoch\(0\) named an epoch"):
        s.set_epoch(0)
        assert len(list(s)) == per_epoch[1]


def _state_of(ld):
    """What a refused load must leave alone: the position, the controller's counters and selections, the
    pass bookkeeping, and the next batch the loader hands out."""
    return (ld.position, dict(ld.controller_state.counters), list(ld.stats["selections"]),
            ld._epochs_done, ld._open_epoch)


@pytest.mark.parametrize("bad", ["per_epoch", "epochs_done", "open_epoch"])
def test_a_refused_state_dict_leaves_the_loader_as_it_was(bad):
    """Regression: a state of another pass plan (per_epoch, budget_counts) or a corrupt epochs_done was refused
    only after the controller state had been swapped in: the loader kept its position with the other run's
    controller, and a loop that caught the error trained batches of neither run."""
    other = CrestLoader(torch.nn.Linear(4, 2), _example_data(64), config=CrestConfig(m=8), budget=0.5, epochs=2,
                        seed=0, per_epoch=False)
    it = iter(other)
    for _ in range(3):
        next(it)
    saved = other.state_dict()
    if bad != "per_epoch":  # a state of this loader's plan, one field corrupt
        saved = {**saved, "per_epoch": True, bad: -1}
    ld, twin = _loader(), _loader()
    a, b = iter(ld), iter(twin)
    next(a), next(b)
    before = _state_of(ld)
    with pytest.raises(ValueError, match=bad):
        ld.load_state_dict(saved)
    assert _state_of(ld) == before
    assert ld.controller_state.counters == twin.controller_state.counters
    nxt, ref = next(iter(ld)), next(iter(twin))  # the run goes on as if nothing had been loaded
    assert all(torch.equal(x, y) for x, y in zip(nxt, ref))


def test_a_refused_subset_loader_state_leaves_it_as_it_was():
    from crestcore.adapters.baselines import SubsetLoader

    def make():
        torch.manual_seed(0)
        return SubsetLoader(torch.nn.Linear(4, 2), _example_data(64), method="random", budget=0.5, epochs=2, m=8,
                            seed=0)

    ld, twin, other = make(), make(), make()
    next(iter(ld)), next(iter(twin))
    it = iter(other)
    for _ in range(3):  # another point of the run: its schedule and last batch differ from ld's
        next(it)
    saved = other.state_dict()
    before = (ld.position, ld.schedule.state()["counters"], ld.last_indices.tolist())
    for bad in ({**saved, "epochs_done": 7}, {**saved, "counters": None, "selection": {"indices": [0]}}):
        with pytest.raises((ValueError, KeyError, TypeError)):
            ld.load_state_dict(bad)
        assert (ld.position, ld.schedule.state()["counters"], ld.last_indices.tolist()) == before
    assert torch.equal(next(iter(ld))[0], next(iter(twin))[0])


def test_a_loop_breaking_out_of_an_epoch_is_told_to_call_set_epoch():
    """Review 80: `for epoch in range(E): for b in loader: ... break` (early stopping within an epoch) ended
    its run a share short, and the only warning said to ignore it when the batches were trained. It names
    set_epoch now, with which the same loop trains the whole plan."""
    def run(set_epoch):
        ld = _loader(epochs=3)
        counts = []
        for epoch in range(3):
            if set_epoch:
                ld.set_epoch(epoch)
            k = 0
            for _ in ld:
                k += 1
                if epoch == 1 and k == 1:
                    break
            counts.append(k)
        return ld, counts

    with pytest.warns(UserWarning, match=r"instead of starting the next epoch.*must call loader.set_epoch"):
        ld, counts = run(False)
    assert ld.position < ld.total_steps  # the short run the warning is about
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ld, counts = run(True)
    assert ld.position == ld.total_steps and counts[1] == 1


def test_a_batch_taken_to_look_at_is_said_once_and_a_saved_state_gives_it_back():
    """Regression (review 37): next(iter(loader)) before the loop handed out the first batch, counted it as
    trained, and the loop never saw it (a scheduler sized from len(loader) * epochs stopped a step short):
    silently. The next pass says so, once; saving the state before the look and loading it after keeps
    the batch for the loop."""
    ld = _loader()
    with pytest.warns(UserWarning, match="left before its end after handing out 1 batch;"):
        peeked = next(iter(ld))
        got = list(ld)
    assert len(got) == ld.steps_per_epoch - 1  # the look cost the run its first batch
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per loader
        next(iter(ld))
        list(ld)
    fresh = _loader()
    saved = fresh.state_dict()
    look = next(iter(fresh))
    fresh.load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the load accounted for the look: nothing to say
        epoch = list(fresh)
    assert len(epoch) == fresh.steps_per_epoch and fresh.position == fresh.steps_per_epoch
    assert all(torch.equal(a, b) for a, b in zip(look, epoch[0]))
    assert all(torch.equal(a, b) for a, b in zip(peeked, epoch[0]))


def test_a_sampler_without_workers_says_so_too():
    torch.manual_seed(0)
    s = CrestBatchSampler(torch.nn.Linear(4, 2), _example_data(64), config=CrestConfig(m=8), budget=0.5, epochs=2,
                          seed=0)
    next(iter(s))
    with pytest.warns(UserWarning, match="sampler.rewind"):
        list(s)
