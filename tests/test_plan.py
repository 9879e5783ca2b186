"""crestcore.plan: the budgeted run's step counts, written once for every loader."""

from __future__ import annotations

import math
import numbers

import numpy as np

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crestcore import planner
from crestcore.plan import budget_steps, examples_spent, full_steps
from crestcore.sparse import graph_bytes


@given(st.integers(1, 10**7), st.integers(1, 4096))
def test_full_steps_is_the_ceiling(n, m):
    s = full_steps(n, m)
    assert (s - 1) * m < n <= s * m


@given(st.floats(1e-6, 4.0), st.integers(1, 10**6))
def test_budget_steps_rounds_half_up_and_is_at_least_one(budget, full):
    s = budget_steps(budget, full)
    x = budget * full
    assert s >= 1
    half_up = max(1, math.floor(x + 0.5))
    # a product a relative 1e-9 below a half rounds up too (0.009 * 1500 is 13.499999999999998 in binary)
    assert s == half_up or (s == half_up + 1 and half_up + 0.5 - x <= 1e-9 * max(1.0, x))
    assert abs(s - x) <= 0.5 + 1e-9 * max(1.0, x) or s == 1


def test_budget_steps_ties_round_up_and_known_values():
    assert budget_steps(0.5, 5) == 3  # 2.5 -> 3
    assert budget_steps(0.1, 469) == 47
    assert budget_steps(0.1, 1) == 1


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), float("inf"), True, "0.1", None])
def test_bad_budgets_are_named(bad):
    with pytest.raises(ValueError, match="budget"):
        budget_steps(bad, 10)


@pytest.mark.parametrize("args,name", [((0, 4), "n"), ((10, 0), "m"), ((10.0, 4), "n"), ((10, True), "m")])
def test_bad_sizes_are_named(args, name):
    with pytest.raises(ValueError, match=f"^{name} must"):
        full_steps(*args)
    with pytest.raises(ValueError, match="full must"):
        budget_steps(0.1, 0)


def test_hamilton_refuses_what_it_cannot_split():
    from crestcore.plan import hamilton

    with pytest.raises(ValueError, match="total"):
        hamilton(-1, [3, 4])
    with pytest.raises(TypeError, match="total"):
        hamilton(2.5, [3, 4])
    with pytest.raises(ValueError, match="sizes"):
        hamilton(2, [3.5, 4.0])
    with pytest.raises(ValueError, match="sizes"):
        hamilton(2, [[3, 4]])
    with pytest.raises(ValueError, match="sizes"):
        hamilton(2, [3, -1])
    sizes = [5, 3, 2]
    assert hamilton(10, sizes).tolist() == [5, 3, 2] and sizes == [5, 3, 2]
    assert hamilton(0, []).tolist() == []


def test_budget_report_refuses_what_it_cannot_divide_by_or_read():
    from crestcore.plan import budget_report, examples_spent

    c = {"train_examples": 10, "forward_examples": 3, "backward_examples": 0}
    for kw, match in ((dict(m=0), "m"), (dict(full_data_steps=0), "full_data_steps")):
        args = dict(budget=0.1, counts="steps", m=8, full_data_steps=10, planned_steps=1, steps_done=1, counters=c)
        with pytest.raises(ValueError, match=match):
            budget_report(**{**args, **kw})
    with pytest.raises(ValueError, match="backward_examples"):
        examples_spent({"train_examples": 1, "forward_examples": 0})


@given(total=st.integers(0, 60), sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12),
       seed=st.integers(0, 2**31), at_least_one=st.booleans())
def test_apportion_rounds_each_share_down_or_up_and_adds_up(total, sizes, seed, at_least_one):
    from crestcore.plan import apportion

    sizes = np.array(sizes)
    n = int(sizes.sum())
    units, p = apportion(total, sizes, np.random.default_rng(seed), at_least_one=at_least_one)
    if n == 0:
        assert units.sum() == 0 and np.all(p == 1)
        return
    q = total * sizes / n
    assert units.sum() == total and units.dtype == np.int64
    if total <= n:
        assert np.all(units <= sizes)
    nonempty = sizes > 0
    if at_least_one and total >= int(nonempty.sum()):
        assert np.all(units[nonempty] >= 1) and np.all(p[nonempty] == 1)
        assert np.all(units <= np.ceil(q))
    else:
        assert np.all((units == np.floor(q)) | (units == np.ceil(q)))
        np.testing.assert_allclose(p, np.where(q >= 1, 1.0, q), rtol=1e-12)


def test_apportion_gives_every_group_its_share_on_average():
    """The leftover units go to group c with probability equal to the fractional part of its share, so
    the mean over draws is the share itself (a fixed largest-remainder rule gives them to the same groups)."""
    from crestcore.plan import apportion

    sizes = np.array([7, 7, 7, 3, 1, 0])
    rng = np.random.default_rng(5)
    draws = np.array([apportion(4, sizes, rng)[0] for _ in range(6000)])
    np.testing.assert_allclose(draws.mean(axis=0), 4 * sizes / sizes.sum(), atol=0.03)  # s.e. <= 0.0065
    with pytest.raises(ValueError, match="sizes"):
        apportion(3, [2, -1], rng)
    with pytest.raises(TypeError, match="rng"):
        apportion(3, [2, 1], "seed")


def test_set_epoch_warns_about_a_skipped_epoch_and_not_about_completing_a_started_one():
    """set_epoch(e) ahead of the run: warned when epoch `now` has not started (also right after exactly one
    epoch's batches, the pass paused after its last one: the fix for "passes" first took that for a started
    epoch) and when a whole epoch after it is skipped; not when it completes an epoch broken off, also after
    a checkpoint of the broken-off run is loaded (the started epoch is in the state)."""
    import itertools
    import warnings

    from crestcore.plan import _StepNumbers

    def ahead(run):
        loader = _StepNumbers(n=1000, m=100, budget=0.3, epochs=4)  # 3 batches an epoch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loader = run(loader)
        return [str(w.message) for w in caught if "ahead of the run" in str(w.message)], loader

    def exact_stop(ld):
        list(itertools.islice(iter(ld), 3))  # exactly epoch 0's batches: the pass is paused, not ended
        ld.set_epoch(2)  # epoch 1 skipped
        assert list(ld) == [4, 5, 6, 7, 8, 9]
        return ld

    def complete(ld):
        list(itertools.islice(iter(ld), 2))  # epoch 0 broken off after 2 of its 3 batches
        ld.set_epoch(1)
        assert list(ld) == [3, 4, 5, 6]
        return ld

    def complete_after_load(ld):
        list(itertools.islice(iter(ld), 2))
        other = _StepNumbers(n=1000, m=100, budget=0.3, epochs=4)
        other._load_pass_state(ld._pass_state(), ld._pass_state()["position"])
        other.set_epoch(1)
        assert list(other) == [3, 4, 5, 6]
        return other

    def skip_two(ld):
        list(itertools.islice(iter(ld), 2))  # epoch 0 started, epoch 1 skipped whole
        ld.set_epoch(2)
        assert list(ld) == [3, 4, 5, 6, 7, 8, 9]
        return ld

    for run, warned in ((exact_stop, True), (complete, False), (complete_after_load, False), (skip_two, True)):
        messages, _ = ahead(run)
        assert len(messages) == int(warned), (run.__name__, messages)


def test_budget_steps_rounds_the_decimal_budget_half_up_at_any_size():
    """Review 30: a relative slack of 1e-9 (for 0.009 * 1500 = 13.499999999999998 in binary) rounded
    fractions just below one half up at about a million steps: 0.4999 * 1000001 = 499900.4999 gave 499901.
    The decimal budget times the steps, exactly, rounded half up."""
    from fractions import Fraction

    from crestcore.plan import budget_steps

    assert budget_steps(0.4999, 1_000_001) == 499900 and budget_steps(0.009, 1500) == 14
    rng = np.random.default_rng(0)
    for _ in range(2000):
        b = round(float(rng.uniform(0.0001, 1.0)), int(rng.integers(1, 6)))
        if b <= 0:
            continue
        full = int(rng.integers(1, 10**7))
        exact = Fraction(repr(b)) * full
        assert budget_steps(b, full) == max(1, int(exact + Fraction(1, 2))), (b, full)


def test_budget_steps_reads_each_budget_type_as_the_number_it_was_written_as():
    """Review 32: an exact Fraction was first cut to a 17-digit decimal (1/6 of 9 steps, exactly 3/2, gave 1
    step instead of 2: 1,483 of 340,489 Fraction/size pairs wrong); np.float32(0.009), which prints and
    was written as 0.009, was widened to 0.008999999612569809 (13 steps of 1500 against 14 for 0.009);
    a Decimal was refused; a huge integer raised OverflowError instead of giving its steps."""
    from decimal import Decimal
    from fractions import Fraction

    assert budget_steps(Fraction(1, 6), 9) == 2
    rng = np.random.default_rng(1)
    for _ in range(3000):
        b = Fraction(int(rng.integers(1, 50)), int(rng.integers(1, 50)))
        full = int(rng.integers(1, 200))
        assert budget_steps(b, full) == max(1, int(b * full + Fraction(1, 2))), (b, full)
    for dtype in (np.float16, np.float32, np.float64):
        for text in ("0.009", "0.015", "0.1", "0.25", "0.5"):
            b = dtype(text)
            exact = Fraction(str(b)) * 1500
            assert str(b) == text or dtype is np.float16
            assert budget_steps(b, 1500) == max(1, int(exact + Fraction(1, 2))), (dtype, text)
    assert budget_steps(np.float32(0.009), 1500) == budget_steps(0.009, 1500) == 14
    assert budget_steps(np.float32(0.015), 100) == 2  # 1.5 rounds up
    assert budget_steps(Decimal("0.1"), 469) == 47 and budget_steps(np.int64(2), 3) == 6
    assert budget_steps(10**400, 1) == 10**400

    class Ratio:  # an exact rational of another library (gmpy's mpq, sympy's Rational): read exactly too
        numerator, denominator = 1, 6

        def __float__(self):
            return 1 / 6

    numbers.Rational.register(Ratio)
    assert budget_steps(Ratio(), 9) == 2  # review 34: read through float, 1 step
    for bad in (Decimal("NaN"), Decimal("-0.1"), Fraction(0), np.bool_(True), np.float32("inf")):
        with pytest.raises(ValueError, match="budget"):
            budget_steps(bad, 10)


def test_a_pass_is_superseded_only_when_another_takes_a_batch_and_then_says_so():
    """Review 46: ``iter()`` on a loader while a pass ran ended the running pass after its current batch,
    silently (an epoch of 6 steps trained 2, and a scheduler sized from ``len()`` ended far from its end).
    An iterator only built now leaves the running pass alone; one that takes a batch supersedes it, and the
    old pass, asked for its next batch, raises instead of ending quietly. A pass started before a state
    was loaded still ends quietly (it belonged to the old run)."""
    from crestcore.plan import _StepNumbers

    loader = _StepNumbers(n=1000, m=100, budget=0.6, epochs=2)  # 6 batches an epoch
    got = []
    for step in loader:
        got.append(step)
        if step == 2:
            iter(loader)  # built, never read: a helper looking at the loader
    assert got == [1, 2, 3, 4, 5, 6] and loader.epoch == 1

    running = iter(loader)
    assert next(running) == 7
    assert next(iter(loader)) == 8  # another pass takes a batch while the first is open
    with pytest.raises(RuntimeError, match="this pass was superseded: another pass over the same loader took its "
                                           "first batch.*one pass at a time"):
        next(running)

    loader = _StepNumbers(n=1000, m=100, budget=0.6, epochs=2)
    old = iter(loader)
    assert next(old) == 1
    loader._load_pass_state({"epochs_done": 0}, 0)  # what load_state_dict does to the passes
    assert list(old) == []  # quietly: the pass was the old run's
    assert list(loader) == [1, 2, 3, 4, 5, 6]


def test_a_budget_rounded_up_past_one_and_a_half_times_is_warned_about():
    """Regression (review 59): on a small data set the floor of one step an epoch made budget=0.1 a third of
    the data (n = 40, m = 16: 1 of 3 steps; with CREST's measurement passes 139 % of the full run's), and no
    loader said so. planned_steps, which every loader's plan uses, warns when the share is above 1.5 times
    the budget; ordinary rounding does not."""
    import warnings

    from crestcore.plan import planned_steps

    with pytest.warns(UserWarning, match=r"rounds to 1 step an epoch \(33% of the data, against the 10%"):
        assert planned_steps(0.1, 3) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [planned_steps(0.1, 469), planned_steps(0.5, 3), planned_steps(0.1, 10)] == [47, 2, 1]


@pytest.mark.parametrize("call, err, match", [
    (lambda: planner.plan_problem(-5, 10, 3, 4, 100), ValueError, "n must be >= 0"),
    (lambda: planner.plan_problem(1.5, 10, 1, 4, 100), TypeError, "n must be an integer"),
    (lambda: planner.plan_problem(100, 10, 500, 4, 10**9), ValueError, r"k must be in \[0, 100\]"),
    (lambda: planner.plan_problem(10**6, 64, 5, 4, 2**30, neighbors=-3), ValueError, "neighbors must be >= 1"),
    (lambda: planner.plan_problem(10**6, 10, 5, 0, 10), ValueError, "itemsize must be >= 1"),
    (lambda: planner.plan_problem(100, 0, 5, 4, 10), ValueError, "d must be >= 1"),
    (lambda: graph_bytes(-10, 2, 3), ValueError, "n must be >= 0"),
    (lambda: examples_spent(None), TypeError, "counters must be a run's counters dict"),
])
def test_the_planning_helpers_check_their_arguments(call, err, match):
    """Review 94: plan_problem(-5, ...) planned a dense problem, neighbors=-3 a sparse one with -3
    neighbours, itemsize=0 a million points densely; graph_bytes(-10, ...) was negative, and
    examples_spent(None) failed inside without naming counters."""
    with pytest.raises(err, match=match):
        call()


def test_hamilton_takes_a_missing_groups_unit_from_the_lowest_of_the_largest():
    """Review 99 (a surviving mutant): the donor among groups tied for the most units is the lowest one, as
    documented; no case pinned it. 6 over [10, 10, 10, 1]: base split [2, 2, 2, 0], the last group takes its
    unit from group 0."""
    from crestcore.plan import hamilton

    assert hamilton(6, [10, 10, 10, 1]).tolist() == [1, 2, 2, 1]


def test_splits_beyond_int64_are_refused_not_wrapped():
    """Review 134: total * size in int64 wrapped: hamilton(2**40, [2**40, 2**30]) gave [1, 1], and uint64 sizes
    above 2^63 went negative; both are refused, naming the range."""
    from crestcore.plan import apportion, hamilton

    for sizes in ([2**40, 2**30], np.array([2**63 + 5, 1], dtype=np.uint64)):
        with pytest.raises(ValueError, match="beyond the exact int64 arithmetic"):
            hamilton(2**40, sizes)
        with pytest.raises(ValueError, match="beyond the exact int64 arithmetic"):
            apportion(2**40, sizes, np.random.default_rng(0))
    assert hamilton(10**9, [10**9, 3]).tolist() == [999_999_997, 3]
