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
