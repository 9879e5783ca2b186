"""Tests for crestcore/dropping.py: the loss history, the alpha rule and the pool limits.

A plain reference (a Python list of every (step, loss) record per example) decides who is learned;
the module's ring buffers must agree with it. Self-contained: no conftest fixtures.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crestcore import DropConfig, drop_init, drop_record, drop_update

SETTINGS = settings(deadline=None, max_examples=60)


# --------------------------------------------------------------------------------------------
# a reference over random loss traces
# --------------------------------------------------------------------------------------------
@st.composite
def traces(draw, max_n=12, max_events=25):
    n = draw(st.integers(1, max_n))
    cfg = DropConfig(
        alpha=draw(st.sampled_from([0.05, 0.1, 0.5])),
        window=draw(st.integers(1, 30)),
        history=draw(st.integers(1, 6)),
        min_records=1,
        floor=1,
        min_per_class=1,
    )
    cfg = DropConfig(alpha=cfg.alpha, window=cfg.window, history=cfg.history,
                     min_records=draw(st.integers(1, cfg.history)),
                     floor=draw(st.integers(1, n)), min_per_class=draw(st.integers(1, 3)))
    n_ev = draw(st.integers(0, max_events))
    step = 0
    events = []  # (step, indices, losses) in non-decreasing step order
    for _ in range(n_ev):
        step += draw(st.integers(0, 6))
        k = draw(st.integers(1, n))
        idx = draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k))
        losses = draw(st.lists(st.sampled_from([0.0, 0.01, 0.049, 0.05, 0.09, 0.1, 0.2, 0.49, 0.5, 2.0]),
                               min_size=k, max_size=k))
        events.append((step, idx, losses))
    t = step + draw(st.integers(0, 10))
    labels = np.array(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))
    return n, cfg, events, t, labels


def _replay(n, cfg, events):
    state = drop_init(n, cfg)
    log = [[] for _ in range(n)]  # one record (step, loss) per example and step: the last one
    for step, idx, losses in events:
        state = drop_record(state, np.array(idx), np.array(losses), step)
        last = {}
        for i, l in zip(idx, losses):
            last[i] = l
        for i, l in last.items():
            if log[i] and log[i][-1][0] == step:  # a second record at the same step replaces the first
                log[i][-1] = (step, l)
            else:
                log[i].append((step, l))
    return state, log


def _kept(log_i, history):
    return log_i[-history:]  # the ring buffer keeps the last `history` records


def _in_window(records, t, window):
    return [l for s, l in records if t - window < s <= t]


@SETTINGS
@given(tr=traces())
def test_never_drops_an_example_with_a_high_loss_in_the_window(tr):
    n, cfg, events, t, labels = tr
    state, log = _replay(n, cfg, events)
    for lab in (None, labels):
        new, dropped = drop_update(state, t, cfg, lab)
        for i in dropped:
            win = _in_window(_kept(log[i], cfg.history), t, cfg.window)
            assert len(win) >= cfg.min_records
            assert all(l < cfg.alpha for l in win), (i, win)


@SETTINGS
@given(tr=traces())
def test_drops_exactly_the_learned_examples_when_the_limits_do_not_bind(tr):
    n, cfg, events, t, _ = tr
    cfg = DropConfig(alpha=cfg.alpha, window=cfg.window, history=cfg.history,
                     min_records=cfg.min_records, floor=1)
    state, log = _replay(n, cfg, events)
    learned = []
    for i in range(n):
        win = _in_window(_kept(log[i], cfg.history), t, cfg.window)
        if len(win) >= cfg.min_records and all(l < cfg.alpha for l in win):
            learned.append(i)
    new, dropped = drop_update(state, t, cfg)
    if len(learned) <= n - 1:  # the floor of 1 does not bind
        assert sorted(dropped.tolist()) == learned
    else:  # everybody learned: all but one leave, the one with the largest max loss stays
        assert len(dropped) == n - 1
    assert dropped.dtype == np.int64 and list(dropped) == sorted(dropped)
    assert np.array_equal(~new.active, np.isin(np.arange(n), dropped))
    assert np.all(new.dropped_at[dropped] == t) and np.all(new.dropped_at[new.active] == -1)


@SETTINGS
@given(tr=traces())
def test_floor_and_per_class_limits(tr):
    n, cfg, events, t, labels = tr
    state, log = _replay(n, cfg, events)
    new, dropped = drop_update(state, t, cfg, labels)
    assert new.active.sum() >= min(cfg.floor, n)
    for c in np.unique(labels):
        before = int((labels == c).sum())
        after = int(new.active[labels == c].sum())
        assert after >= min(before, cfg.min_per_class)  # never empties a class
        assert after >= 1
    # within the limits, the learned examples with the smallest worst loss go first
    new_nolab, dropped_nolab = drop_update(state, t, cfg)
    learned = [i for i in range(n)
               if len(w := _in_window(_kept(log[i], cfg.history), t, cfg.window)) >= cfg.min_records
               and all(l < cfg.alpha for l in w)]
    order = sorted(learned, key=lambda i: (max(_in_window(_kept(log[i], cfg.history), t, cfg.window)), i))
    k = max(0, min(len(learned), n - cfg.floor))
    assert sorted(dropped_nolab.tolist()) == sorted(order[:k])


def test_old_records_outside_the_window_are_ignored():
    cfg = DropConfig(alpha=0.1, window=10, history=8, min_records=1)
    s = drop_init(4, cfg)
    s = drop_record(s, [0, 1, 2], [5.0, 0.01, 5.0], step=0)  # old: 0 and 2 high, 1 low
    s = drop_record(s, [0, 2, 3], [0.01, 0.5, 0.02], step=15)  # in the window (5, 15]
    _, dropped = drop_update(s, 15, cfg)
    # 0: the old high loss is outside the window -> learned; 1: no in-window record -> kept;
    # 2: high in the window -> kept; 3: low -> learned
    assert dropped.tolist() == [0, 3]
    # the window is (t - window, t]: a record at exactly t - window is outside
    # (example 2 is never recorded, so it stays and the floor of 1 never binds)
    s2 = drop_record(drop_init(3, cfg), [0], [5.0], step=5)
    s2 = drop_record(s2, [0, 1], [0.0, 0.0], step=15)
    assert drop_update(s2, 15, cfg)[1].tolist() == [0, 1]
    s3 = drop_record(drop_init(3, cfg), [0], [5.0], step=6)
    s3 = drop_record(s3, [0, 1], [0.0, 0.0], step=15)
    assert drop_update(s3, 15, cfg)[1].tolist() == [1]


def test_records_after_the_decision_step_are_ignored():
    cfg = DropConfig(alpha=0.1, window=10, min_records=1)
    s = drop_record(drop_init(3, cfg), [0, 1], [0.01, 0.01], step=3)
    s = drop_record(s, [1], [9.0], step=20)  # measured after step 10
    assert drop_update(s, 10, cfg)[1].tolist() == [0, 1]


def test_min_records():
    cfg = DropConfig(alpha=0.1, window=100, history=4, min_records=3)
    s = drop_init(2, cfg)
    for step in range(2):
        s = drop_record(s, [0, 1], [0.0, 0.0], step)
    s = drop_record(s, [1], [0.0], 2)
    assert drop_update(s, 5, cfg)[1].tolist() == [1]


def test_loss_equal_to_alpha_keeps_the_example():
    cfg = DropConfig(alpha=0.1, min_records=1)
    s = drop_record(drop_init(3, cfg), [0, 1, 2], [0.1, np.nextafter(0.1, 0), 0.0], 0)
    assert drop_update(s, 0, cfg)[1].tolist() == [1, 2]


def test_ring_buffer_keeps_the_last_history_records():
    # documented: only the last `history` losses are kept; an older in-window high loss is forgotten
    cfg = DropConfig(alpha=0.1, window=100, history=2, min_records=1)
    s = drop_record(drop_init(2, cfg), [0, 1], [5.0, 5.0], 0)
    s = drop_record(s, [0, 1], [0.0, 0.0], 1)
    s = drop_record(s, [0], [0.0], 2)
    assert drop_update(s, 3, cfg)[1].tolist() == [0]
    assert s.head.tolist() == [3, 2]


def test_drop_record_keeps_the_last_of_repeated_indices():
    cfg = DropConfig(history=4)
    s = drop_record(drop_init(5, cfg), np.array([3, 1, 3, 3]), np.array([5.0, 1.0, 6.0, 0.25]), 7)
    assert s.head.tolist() == [0, 1, 0, 1, 0]  # one record per example, not three
    assert s.losses[3, 0] == 0.25 and np.isnan(s.losses[3, 1:]).all()
    assert s.losses[1, 0] == 1.0 and s.steps[3, 0] == 7 and s.steps[1, 0] == 7


def test_drop_record_accepts_torch_and_lists():
    cfg = DropConfig()
    a = drop_record(drop_init(3, cfg), torch.tensor([0, 2]), torch.tensor([0.5, 1.5], dtype=torch.float32), 1)
    b = drop_record(drop_init(3, cfg), [0, 2], [0.5, 1.5], 1)
    np.testing.assert_array_equal(a.losses, b.losses)
    np.testing.assert_array_equal(a.steps, b.steps)


def test_per_class_limit_prefers_other_classes():
    cfg = DropConfig(alpha=0.1, min_records=1, min_per_class=2)
    labels = np.array([0, 0, 0, 1, 1])
    s = drop_record(drop_init(5, cfg), np.arange(5), np.array([0.0, 0.01, 0.02, 0.0, 0.0]), 0)
    new, dropped = drop_update(s, 0, cfg, labels)
    assert dropped.tolist() == [0]  # class 0 keeps 2 (the worst losses stay), class 1 keeps its 2
    new2, dropped2 = drop_update(new, 0, cfg, labels)
    assert dropped2.tolist() == []  # the limits bind: nothing more
    cfg_f = DropConfig(alpha=0.1, min_records=1, floor=4)
    assert drop_update(s, 0, cfg_f)[1].tolist() == [0]  # floor 4 of 5: one leaves, the smallest max


def test_dropped_examples_stay_dropped():
    cfg = DropConfig(alpha=0.1, min_records=1)
    s = drop_record(drop_init(3, cfg), [0, 1, 2], [0.0, 1.0, 1.0], 0)
    s, d = drop_update(s, 0, cfg)
    assert d.tolist() == [0]
    s = drop_record(s, [0], [9.0], 1)  # a later record does not bring it back
    s, d2 = drop_update(s, 1, cfg)
    assert not s.active[0] and s.dropped_at[0] == 0 and d2.tolist() == []


def test_inputs_not_mutated_and_states_are_new_objects():
    cfg = DropConfig(alpha=0.1, min_records=1)
    s0 = drop_init(4, cfg)
    for a in s0:
        a.setflags(write=False)  # read-only state arrays must still work
    snap0 = [a.copy() for a in s0]
    idx = np.array([0, 1, 2])
    losses = np.array([0.0, 0.0, 5.0])
    idx.setflags(write=False)
    losses.setflags(write=False)
    s1 = drop_record(s0, idx, losses, 3)
    for a, b in zip(s0, snap0):
        np.testing.assert_array_equal(a, b)
    assert s1.losses is not s0.losses and s1.steps is not s0.steps and s1.head is not s0.head
    snap1 = [a.copy() for a in s1]
    labels = np.array([0, 0, 1, 1])
    s2, dropped = drop_update(s1, 3, cfg, labels)
    assert dropped.tolist() == [0]
    for a, b in zip(s1, snap1):
        np.testing.assert_array_equal(a, b)
    assert s2.active is not s1.active and s2.dropped_at is not s1.dropped_at
    np.testing.assert_array_equal(idx, [0, 1, 2])
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=-1.0), "alpha"), (dict(alpha=float("nan")), "alpha"),
    (dict(alpha=float("inf")), "alpha"), (dict(window=0), "window"), (dict(history=1.5), "history"),
    (dict(min_records=0), "min_records"), (dict(floor=0), "floor"), (dict(min_per_class=True), "min_per_class"),
    (dict(history=2, min_records=3), "min_records"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DropConfig(**kwargs)


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_bad_init(n):
    with pytest.raises(ValueError, match="n must be"):
        drop_init(n)


@pytest.mark.parametrize("idx, losses, step, exc, match", [
    ([0, 1], [0.1], 0, ValueError, "indices"),  # length mismatch
    ([0, 5], [0.1, 0.2], 0, ValueError, "indices"),  # out of range
    ([-1], [0.1], 0, ValueError, "indices"),
    ([0], [float("nan")], 0, ValueError, "losses"),
    ([0], [float("inf")], 0, ValueError, "losses"),
    ([0], [0.1], -1, ValueError, "step"),
    ([0], [0.1], 1.5, ValueError, "step"),
    (np.array([0.7, 1.2]), [0.1, 0.2], 0, TypeError, "indices"),  # float indices are not indices
    (np.array([True, False]), [0.1, 0.2], 0, TypeError, "indices"),  # nor are booleans
])
def test_drop_record_bad_inputs(idx, losses, step, exc, match):
    with pytest.raises(exc, match=match):
        drop_record(drop_init(5), idx, losses, step)


@pytest.mark.parametrize("step, labels, exc, match", [
    (0, np.array([0, 1]), ValueError, "labels"),  # wrong length
    (-1, None, ValueError, "step"),
    (2.5, None, ValueError, "step"),
    (0, np.array([0.5, 1.0, 0.0]), TypeError, "labels"),  # float labels are not classes
])
def test_drop_update_bad_inputs(step, labels, exc, match):
    with pytest.raises(exc, match=match):
        drop_update(drop_init(3), step, DropConfig(), labels)
