"""Tests for crestcore/dropping.py: the loss history, the alpha rule and the pool limits.

A plain reference (a Python list of every (step, loss) record per example) decides who is learned;
the module's ring buffers must agree with it, and a plain copy-per-record ring buffer (the original
semantic) must agree with the in-place one record for record. Self-contained: no conftest fixtures.
"""

from __future__ import annotations

import copy
import pickle
import tracemalloc

import numpy as np
import pytest
try:
    import torch
except ImportError:  # the lower-bounds run (tests/conftest.py skips the tests that use it)
    torch = None
from hypothesis import given, settings
from hypothesis import strategies as st

import crestcore.dropping as dropping
from crestcore import DropConfig, drop_init, drop_record, drop_resize, drop_update

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
                     min_records=draw(st.integers(1, min(cfg.history, cfg.window + 1))),
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
    return [l for s, l in records if t - window <= s <= t]  # the closed window [t - window, t]


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
    # the window is [t - window, t]: a record at exactly t - window is inside, one step earlier is not
    # (example 2 is never recorded, so it stays and the floor of 1 never binds)
    s2 = drop_record(drop_init(3, cfg), [0], [5.0], step=4)
    s2 = drop_record(s2, [0, 1], [0.0, 0.0], step=15)
    assert drop_update(s2, 15, cfg)[1].tolist() == [0, 1]
    s3 = drop_record(drop_init(3, cfg), [0], [5.0], step=5)
    s3 = drop_record(s3, [0, 1], [0.0, 0.0], step=15)
    assert drop_update(s3, 15, cfg)[1].tolist() == [1]


def test_a_record_at_exactly_step_minus_window_counts():
    # the reproduction: a loss of 0.01 recorded at step 5, decision at step 10 with window 5
    cfg = DropConfig(alpha=0.1, window=5, min_records=1)
    s = drop_record(drop_init(2, cfg), [0], [0.01], step=5)
    assert drop_update(s, 10, cfg)[1].tolist() == [0]
    assert drop_update(s, 11, cfg)[1].tolist() == []  # one step later it has left the window


def test_the_drop_triggered_reselection_losses_count_at_the_next_decision():
    # The controller's timing: a drop decision at step t, the reselection it triggers records the
    # losses of its forward at step t, the next decision is at t + T2 with window = T2. Those losses
    # are the only ones of examples that the new coresets do not train on, and a high one must keep
    # an example even when it was trained to a low loss afterwards.
    T2 = 5
    cfg = DropConfig(alpha=0.1, window=T2, min_records=1)
    s = drop_init(4, cfg)
    s, gone = drop_update(s, T2, cfg)
    assert gone.tolist() == []
    s = drop_record(s, [0, 1, 2], [0.01, 3.0, 0.02], step=T2)  # the reselection's forward
    s = drop_record(s, [1, 2], [0.01, 0.01], step=T2 + 3)  # training on a coreset
    s, gone = drop_update(s, 2 * T2, cfg)
    # 0: only the reselection's low loss -> learned; 1: its high loss at t is in the window -> kept;
    # 2: low at t and after -> learned; 3: never measured -> kept
    assert gone.tolist() == [0, 2]


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


def test_a_second_record_at_the_same_step_replaces_the_first():
    cfg = DropConfig(alpha=0.1, window=10, history=3, min_records=2)
    s = drop_record(drop_init(3, cfg), [0, 1], [0.01, 0.01], 1)
    s = drop_record(s, [0, 1], [0.02, 5.0], 2)
    s = drop_record(s, [0, 1], [0.03, 0.04], 2)  # the same step: replaces, does not append
    assert s.head.tolist() == [2, 2, 0]
    np.testing.assert_array_equal(s.losses[:2, :2], [[0.01, 0.03], [0.01, 0.04]])
    np.testing.assert_array_equal(s.steps[:2, :2], [[1, 2], [1, 2]])
    assert np.isnan(s.losses[:, 2]).all() and (s.steps[:, 2] == -1).all()
    # 1's high loss at step 2 was replaced: both have two low records in the window
    assert drop_update(s, 5, cfg)[1].tolist() == [0, 1]
    # a record at the same step after the ring wrapped around replaces the newest slot, not slot 0
    w = drop_init(1, DropConfig(history=2, min_records=1))
    for step, loss in [(0, 1.0), (1, 2.0), (2, 3.0), (2, 4.0)]:
        w = drop_record(w, [0], [loss], step)
    assert w.head.tolist() == [3] and w.losses.tolist() == [[4.0, 2.0]] and w.steps.tolist() == [[2, 1]]


def test_a_record_at_a_step_recorded_before_replaces_it_when_later_steps_came_in_between():
    # a training loss observed after the batches handed out ahead of it were measured comes out of step
    # order: its step's earlier record is replaced wherever it sits, so a step still counts once
    cfg = DropConfig(alpha=0.1, window=10, history=4, min_records=2)
    s = drop_init(2, cfg)
    for step, loss in [(5, 0.01), (7, 0.02), (5, 0.5)]:  # step 5 again after step 7
        s = drop_record(s, [0], [loss], step)
    assert s.head.tolist() == [2, 0] and s.steps[0].tolist() == [5, 7, -1, -1]
    np.testing.assert_array_equal(s.losses[0, :2], [0.5, 0.02])
    assert drop_update(s, 8, cfg)[1].tolist() == []  # step 5's last loss (0.5) is not below alpha
    s = drop_record(s, [0], [0.03], 3)  # an earlier step, new: appended
    assert s.head.tolist() == [3, 0] and s.steps[0].tolist() == [5, 7, 3, -1]
    # after the ring wrapped, the slot holding the step is the one replaced
    w = drop_init(1, DropConfig(history=2, min_records=1))
    for step, loss in [(4, 1.0), (6, 2.0), (8, 3.0), (6, 4.0)]:  # 4 overwritten by 8; 6 sits in slot 1
        w = drop_record(w, [0], [loss], step)
    assert w.head.tolist() == [3] and w.steps.tolist() == [[8, 6]] and w.losses.tolist() == [[3.0, 4.0]]


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


def test_inputs_not_mutated_and_read_only_states_are_copied_on_write():
    cfg = DropConfig(alpha=0.1, min_records=1)
    s0 = drop_init(4, cfg)
    for a in s0:
        if isinstance(a, np.ndarray):
            a.setflags(write=False)  # read-only state arrays must still work: copied, never written
    snap0 = [np.copy(a) for a in s0]
    idx = np.array([0, 1, 2])
    losses = np.array([0.0, 0.0, 5.0])
    idx.setflags(write=False)
    losses.setflags(write=False)
    s1 = drop_record(s0, idx, losses, 3)
    for a, b in zip(s0, snap0):
        np.testing.assert_array_equal(a, b)
    assert s1.losses is not s0.losses and s1.steps is not s0.steps and s1.head is not s0.head
    drop_update(s0, 3, cfg)  # s0 was not written, so it is still a valid state
    snap1 = [np.copy(a) for a in s1]
    labels = np.array([0, 0, 1, 1])
    s2, dropped = drop_update(s1, 3, cfg, labels)
    assert dropped.tolist() == [0]
    for a, b in zip(s1, snap1):
        np.testing.assert_array_equal(a, b)
    assert s2.active is not s1.active and s2.dropped_at is not s1.dropped_at
    np.testing.assert_array_equal(idx, [0, 1, 2])
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])


# --------------------------------------------------------------------------------------------
# in-place records: O(batch) per record, the ownership contract, snapshots
# --------------------------------------------------------------------------------------------
class RefRing:
    """The original semantic, plainly: a ring of ``history`` (loss, step) slots per example."""

    def __init__(self, n, history):
        self.H = history
        self.L = [[np.nan] * history for _ in range(n)]
        self.S = [[-1] * history for _ in range(n)]
        self.head = [0] * n

    def record(self, idx, losses, step):
        last = {}
        for i, l in zip(idx, losses):
            last[int(i)] = float(l)  # a repeated index keeps its last loss
        for i, l in last.items():
            h = self.head[i]
            if step in self.S[i]:  # a record at the same step (anywhere in the ring, at most one): replaced
                self.L[i][self.S[i].index(step)] = l
            else:
                self.L[i][h % self.H] = l
                self.S[i][h % self.H] = step
                self.head[i] = h + 1

    def check(self, state):
        np.testing.assert_array_equal(state.losses, np.array(self.L, dtype=np.float64))
        np.testing.assert_array_equal(state.steps, np.array(self.S, dtype=np.int64))
        np.testing.assert_array_equal(state.head, np.array(self.head, dtype=np.int64))
        assert state.losses.dtype == np.float64 and state.steps.dtype == np.int64 and state.head.dtype == np.int64


def _state_dict_copy(state):
    # exactly what crestcore.controller.crest_state_dict / crest_load_state_dict do with the drop state
    saved = {k: np.asarray(v).copy() for k, v in state._asdict().items()}
    return dropping.DropState(**{k: np.asarray(v).copy() for k, v in saved.items()})


@st.composite
def record_programs(draw):
    n = draw(st.integers(1, 8))
    history = draw(st.integers(1, 4))
    ops = []
    for _ in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(["record"] * 6 + ["drop_copy", "state_dict", "deepcopy", "update"]))
        branch = draw(st.integers(0, 7))
        if kind == "record":
            k = draw(st.integers(0, 2 * n))
            idx = draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k))
            losses = draw(st.lists(st.sampled_from([0.0, 0.01, 0.05, 0.2, 1.5]), min_size=k, max_size=k))
            ops.append((kind, branch, idx, losses, draw(st.integers(0, 8))))
        else:
            ops.append((kind, branch, None, None, draw(st.integers(0, 8))))
    return n, history, ops


@settings(deadline=None, max_examples=80)
@given(prog=record_programs())
def test_in_place_records_equal_the_copying_reference(prog):
    # random records (repeated indices, repeated and decreasing steps) on several branches made by
    # drop_copy, a state-dict round trip, deepcopy and drop_update; every live branch always equals
    # its own plain reference
    n, history, ops = prog
    cfg = DropConfig(alpha=0.1, window=3, history=history, min_records=1)
    branches = [(drop_init(n, cfg), RefRing(n, history))]
    for kind, b, idx, losses, step in ops:
        b %= len(branches)
        state, ref = branches[b]
        if kind == "record":
            i_in, l_in = np.array(idx, dtype=np.int64), np.array(losses, dtype=np.float64)
            i_keep, l_keep = i_in.copy(), l_in.copy()
            state = drop_record(state, i_in, l_in, step)
            np.testing.assert_array_equal(i_in, i_keep)  # the caller's inputs are not written
            np.testing.assert_array_equal(l_in, l_keep)
            ref.record(idx, losses, step)
            branches[b] = (state, ref)
        elif kind == "update":
            state, _ = drop_update(state, step, cfg)
            branches[b] = (state, ref)  # the loss history is unchanged (and still shared)
        else:
            snap = {"drop_copy": dropping.drop_copy, "state_dict": _state_dict_copy,
                    "deepcopy": copy.deepcopy}[kind](state)
            branches.append((snap, copy.deepcopy(ref)))
        for s_, r_ in branches:
            r_.check(s_)


def test_drop_record_writes_in_place_and_consumes_the_state_passed_in():
    cfg = DropConfig(alpha=0.1, window=10, min_records=1)
    s0 = drop_init(4, cfg)
    s1 = drop_record(s0, [0, 1], [0.01, 2.0], 3)
    # the buffers are shared, not copied: s0 now shows s1's records
    assert s1.losses is s0.losses and s1.steps is s0.steps and s1.head is s0.head
    assert s1.active is s0.active and s1.dropped_at is s0.dropped_at
    for call in (lambda: drop_record(s0, [2], [0.0], 4), lambda: drop_update(s0, 4, cfg),
                 lambda: dropping.drop_copy(s0)):
        with pytest.raises(RuntimeError, match="consumed"):
            call()
    # the failed calls left s1 intact and live
    assert s1.head.tolist() == [1, 1, 0, 0]
    s2 = drop_record(s1, [2], [0.02], 4)
    assert drop_update(s2, 4, cfg)[1].tolist() == [0, 2]
    # drop_update reads the history and copies the pool: its input and output are both live (they
    # share the history); the first one recorded into consumes the other
    u, gone = drop_update(s2, 4, cfg)
    assert gone.tolist() == [0, 2] and s2.active.all() and not u.active[0]
    assert u.losses is s2.losses
    u2 = drop_record(u, [3], [0.5], 5)
    with pytest.raises(RuntimeError, match="consumed"):
        drop_record(s2, [3], [0.5], 5)
    assert u2.head.tolist() == [1, 1, 1, 1]


def test_drop_copy_is_an_independent_snapshot():
    cfg = DropConfig(alpha=0.1, window=10, history=2, min_records=1)
    s = drop_record(drop_init(3, cfg), [0, 1], [0.01, 2.0], 1)
    snap = dropping.drop_copy(s)
    frozen = [np.copy(a) for a in snap]
    for f in ("losses", "steps", "head", "active", "dropped_at"):
        assert not np.shares_memory(getattr(snap, f), getattr(s, f))
    s = drop_record(s, [0, 1, 2], [5.0, 0.0, 0.0], 2)  # the original goes on in place
    s, gone = drop_update(s, 2, cfg)
    for a, b in zip(snap, frozen):
        np.testing.assert_array_equal(a, b)  # the snapshot did not move
    assert gone.tolist() == [2] and drop_update(snap, 2, cfg)[1].tolist() == [0]
    # the snapshot is a live state of its own: recording into it leaves the original alone
    head_s = s.head.copy()
    snap2 = drop_record(snap, [2], [0.0], 3)
    np.testing.assert_array_equal(s.head, head_s)
    assert snap2.head.tolist() == [1, 1, 1]
    drop_record(s, [2], [0.0], 3)  # and the original is still live
    assert "drop_copy" in dropping.__all__


def test_state_dict_snapshots_stay_independent():
    # crest_state_dict copies every field with np.asarray(v).copy(); crest_load_state_dict builds
    # DropState(**copies): both a snapshot and every restore of it must be independent of the
    # state that keeps training, and of each other
    cfg = DropConfig(alpha=0.1, window=10, min_records=1)
    s = drop_record(drop_init(3, cfg), [0, 1], [0.01, 2.0], 1)
    saved = pickle.loads(pickle.dumps({k: np.asarray(v).copy() for k, v in s._asdict().items()}))
    frozen = {k: v.copy() for k, v in saved.items()}
    s = drop_record(s, [0, 1, 2], [5.0, 5.0, 5.0], 2)
    a = dropping.DropState(**{k: np.asarray(v).copy() for k, v in saved.items()})
    b = dropping.DropState(**{k: np.asarray(v).copy() for k, v in saved.items()})
    a = drop_record(a, [2], [0.0], 2)
    b = drop_record(b, [1], [0.0], 2)
    for k, v in saved.items():
        np.testing.assert_array_equal(v, frozen[k])
    assert a.head.tolist() == [1, 1, 1] and b.head.tolist() == [1, 2, 0] and s.head.tolist() == [2, 2, 1]
    assert drop_update(a, 2, cfg)[1].tolist() == [0, 2] and drop_update(s, 2, cfg)[1].tolist() == []


def test_a_state_without_ownership_is_copied_on_its_first_record():
    # a DropState built from the five arrays alone (e.g. a checkpoint from before the ownership
    # fields) owns nothing: its first record copies once, later records are in place
    cfg = DropConfig(alpha=0.1, window=10, min_records=1)
    arrays = {k: np.copy(v) for k, v in drop_init(3, cfg)._asdict().items()
              if k in ("losses", "steps", "head", "active", "dropped_at")}
    legacy = dropping.DropState(**arrays)
    s1 = drop_record(legacy, [0], [0.01], 1)
    assert s1.losses is not arrays["losses"] and arrays["head"].tolist() == [0, 0, 0]
    s2 = drop_record(s1, [1], [0.01], 2)
    assert s2.losses is s1.losses and drop_update(s2, 2, cfg)[1].tolist() == [0, 1]
    drop_record(legacy, [2], [0.0], 1)  # never written: still usable
    # likewise a state-dict round trip of such a state (its ownership fields are object arrays)
    rt = dropping.DropState(**{k: np.asarray(v).copy() for k, v in legacy._asdict().items()})
    assert drop_record(rt, [2], [0.0], 1).head.tolist() == [0, 0, 1]


def test_drop_record_cost_does_not_scale_with_n():
    # a record of a batch of 128 writes 128 rows in place: no allocation of the size of the state
    # (the old copy per record allocated 2 * n * history * 8 + n * 8 bytes = 40 MB here)
    n, b = 1_000_000, 128
    cfg = DropConfig(history=2)
    s = drop_init(n, cfg)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, n, b), rng.random(b)) for _ in range(3)]
    s = drop_record(s, *batches[0], 0)
    was_tracing = tracemalloc.is_tracing()
    tracemalloc.start()
    try:
        for step, (idx, losses) in zip((1, 1, 2), batches):  # append, replace at the same step, append
            tracemalloc.reset_peak()
            s = drop_record(s, idx, losses, step)
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < 1 << 20, f"drop_record allocated {peak} bytes at its peak on n={n}"
    finally:
        if not was_tracing:
            tracemalloc.stop()
    assert int(s.head.sum()) > 0



def _ordered(state, i):
    """Example ``i``'s records, oldest first, as (step, loss) pairs: the ring's slots from its head."""
    H, h = state.losses.shape[1], int(state.head[i])
    c = min(h, H)
    return [(int(state.steps[i, (h - c + j) % H]), float(state.losses[i, (h - c + j) % H])) for j in range(c)]


@settings(deadline=None, max_examples=60)
@given(H=st.integers(0, 5), H2=st.integers(0, 6), steps=st.lists(st.integers(0, 9), max_size=25),
       monotone=st.booleans(), more=st.lists(st.integers(0, 3), max_size=8))
def test_drop_resize_keeps_each_examples_most_recent_records(H, H2, steps, monotone, more):
    """A ring resized to H2 holds each example's last min(records, H, H2) records in the order they came,
    the pool untouched; with steps in order and H2 <= H it is the ring that always had H2 slots, and the
    two stay equal under further records (same-step records replacing the newest)."""
    if monotone:
        steps = sorted(steps)
    n, rng = 3, np.random.default_rng(len(steps))
    program = [(rng.integers(0, n, size=2), rng.random(2), t) for t in steps]
    a, b = drop_init(n, history=H), drop_init(n, history=H2)
    for idx, vals, t in program:
        a, b = drop_record(a, idx, vals, t), drop_record(b, idx, vals, t)
    before = [_ordered(a, i) for i in range(n)]
    r = drop_resize(a, H2)
    assert r.losses.shape == (n, H2) and r.active is a.active and np.array_equal(r.dropped_at, a.dropped_at)
    assert all(_ordered(a, i) == before[i] for i in range(n))  # a is not written and stays usable
    for i in range(n):
        keep = min(len(before[i]), H2)
        assert _ordered(r, i) == (before[i][len(before[i]) - keep:] if keep else [])
    if monotone and H2 <= H:
        t0 = steps[-1] if steps else 0
        for k, dt in enumerate(more):
            idx, vals = np.array([k % n]), np.array([0.5 + k])
            r, b = drop_record(r, idx, vals, t0 + dt), drop_record(b, idx, vals, t0 + dt)
            t0 += dt
        assert all(_ordered(r, i) == _ordered(b, i) for i in range(n))


def test_drop_resize_bad_history_and_consumed_state():
    s = drop_init(2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="history"):
            drop_resize(s, bad)
    old, s = s, drop_record(s, np.array([0]), np.array([0.1]), 0)
    with pytest.raises(RuntimeError, match="consumed"):
        drop_resize(old, 4)

# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=-1.0), "alpha"), (dict(alpha=float("nan")), "alpha"),
    (dict(alpha=float("inf")), "alpha"), (dict(window=0), "window"), (dict(history=1.5), "history"),
    (dict(min_records=0), "min_records"), (dict(floor=0), "floor"), (dict(min_per_class=True), "min_per_class"),
    (dict(history=2, min_records=3), "min_records"),
    (dict(window=2, min_records=4), r"min_records \(4\) cannot exceed window \+ 1 \(3\)"),
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


def test_drop_record_refuses_losses_shaped_unlike_the_indices():
    """A (2, 2) block of losses for 4 indices is refused (it used to be flattened silently); a (k, 1)
    column is k losses."""
    from crestcore import DropConfig, drop_init, drop_record

    state = drop_init(10, DropConfig())
    with pytest.raises(ValueError, match=r"one loss per index: shape \(2, 2\)"):
        drop_record(state, np.arange(4), np.ones((2, 2)), 0)
    state = drop_record(state, np.arange(4), np.full((4, 1), 0.5), 0)
    assert state.losses[:4, 0].tolist() == [0.5] * 4


def test_pool_size_counts_each_active_array_once_and_follows_drops():
    from crestcore.dropping import drop_copy, pool_size

    config = DropConfig(alpha=0.1, window=10, min_records=1)
    state = drop_init(6, config)
    assert pool_size(state) == 6
    state = drop_record(state, np.arange(6), np.array([0.01, 0.02, 0.5, 0.5, 0.5, 0.5]), step=1)
    assert pool_size(state) == 6  # a record keeps the active array
    new, dropped = drop_update(state, step=1, config=config)
    assert dropped.tolist() == [0, 1] and pool_size(new) == 4 and pool_size(state) == 6
    assert pool_size(drop_copy(new)) == int(new.active.sum()) == 4


def _drop_update_loop(state, step, config, labels):
    """The per-candidate loop drop_update ran before it was vectorised (the reference for the test below)."""
    in_win = (state.steps >= max(step - config.window, 0)) & (state.steps <= step)
    cnt = in_win.sum(axis=1)
    below = np.where(in_win, state.losses < config.alpha, True).all(axis=1)
    cand = np.flatnonzero(state.active & (cnt >= config.min_records) & below)
    worst = np.where(in_win, state.losses, -np.inf).max(axis=1)
    cand = cand[np.lexsort((cand, worst[cand]))]
    budget = int(state.active.sum()) - config.floor
    if cand.size == 0 or budget <= 0:
        return np.zeros(0, dtype=np.int64)
    left = {c: int(v) for c, v in zip(*np.unique(labels[state.active], return_counts=True))}
    chosen = []
    for i in cand:
        if len(chosen) >= budget:
            break
        if left[int(labels[i])] > config.min_per_class:
            left[int(labels[i])] -= 1
            chosen.append(int(i))
    return np.asarray(sorted(chosen), dtype=np.int64)


@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(0, 40), st.integers(1, 4), st.booleans())
@settings(max_examples=60, deadline=None)
def test_per_class_limits_are_the_candidate_loops(seed, n_classes, floor, min_per_class, big_ids):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    labels = rng.integers(0, n_classes, n) * (10**12 if big_ids else 1)
    config = DropConfig(alpha=0.3, window=10, min_records=1, floor=max(1, floor), min_per_class=min_per_class)
    state = drop_init(n, config)
    state = drop_record(state, np.arange(n), rng.random(n) * 0.6, step=1)
    state = state._replace(active=rng.random(n) < 0.9) if rng.random() < 0.5 else state
    state = state._replace(dropped_at=np.where(state.active, -1, 0))
    _, got = drop_update(state, 1, config, labels)
    np.testing.assert_array_equal(got, _drop_update_loop(state, 1, config, labels))


def test_pool_size_is_never_stale():
    """A writeable mask (a user's, written in place) is counted every time; the masks the module makes are
    read-only, so their cached count cannot go stale."""
    from crestcore.dropping import pool_size

    state = drop_init(10)
    assert pool_size(state) == 10
    with pytest.raises(ValueError):
        state.active[:4] = False  # read-only
    mine = state._replace(active=np.ones(10, dtype=bool))
    assert pool_size(mine) == 10
    mine.active[:4] = False
    assert pool_size(mine) == 6
    # a read-only mask whose memory changes through another handle: a read-only view of a writeable base
    # (review 72: the count of 10 was kept after the base dropped to 5, and drop_update dropped below the
    # floor) and a read-only owner written through a view taken before it was frozen (review 73)
    config = DropConfig(alpha=0.5, window=10, min_records=1, floor=6)
    for held_is_the_view in (True, False):
        owner = np.ones(10, dtype=bool)
        view = owner[:]
        held, other = (view, owner) if held_is_the_view else (owner, view)
        held.flags.writeable = False
        kept = drop_init(10)._replace(active=held)
        assert pool_size(kept) == 10
        other[5:] = False
        assert pool_size(kept) == 5
        kept = drop_record(kept, np.arange(10), np.full(10, 0.01), step=1)
        _, dropped = drop_update(kept, step=1, config=config)
        assert dropped.size == 0  # the pool (5) is below the floor


def test_a_hand_built_state_with_an_integer_active_mask_is_refused():
    """Review 134: an int 0/1 `active` indexed positions 0 and 1 where it should mask, the class counts were
    wrong, and min_per_class let a class lose every example; refused by name in drop_record and drop_update."""
    s = drop_init(3)
    bad = s._replace(active=s.active.astype(np.int64))
    with pytest.raises(TypeError, match="state.active must be a 1-D bool NumPy array"):
        drop_update(bad, 5, DropConfig(min_records=1), labels=np.array([0, 0, 1]))
    with pytest.raises(TypeError, match="state.active must be a 1-D bool NumPy array"):
        drop_record(bad, np.array([0]), np.array([0.1]), 1)
