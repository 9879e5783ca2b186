"""Dropping learned examples: a loss history per example, the alpha rule, pool bookkeeping.

Every recorded per-example loss goes into that example's ring buffer of the last ``history`` values,
with the training step it was measured at. At a drop decision at step ``t`` an active example is
*learned* when it has at least ``min_records`` losses recorded in the window ``(t - window, t]`` and
every one of them is below ``alpha``. Learned examples leave the pool, except that the pool never
shrinks below ``floor`` examples and no class loses its last ``min_per_class`` examples; when those
limits bind, the learned examples with the smallest maximum loss leave first (ties: lowest index).

This is index bookkeeping, kept on the host in NumPy (like the random draws); the losses may come
from any array library and are copied once per record.

The release's rule (``faithful``): slots indexed by epoch, decision every 20 epochs, keep examples
with any slot above alpha or never seen, only while more than 40,000 remain; this module's window and
floor parameters express it (window = 5 epochs of steps, floor = 40,000).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ._compat import to_numpy

__all__ = ["DropConfig", "DropState", "drop_init", "drop_record", "drop_update"]


@dataclass(frozen=True)
class DropConfig:
    alpha: float = 0.1
    window: int = 100  # steps
    history: int = 8  # losses kept per example
    min_records: int = 2
    floor: int = 1  # the pool never shrinks below this many examples
    min_per_class: int = 1

    def __post_init__(self):
        if not (self.alpha > 0 and np.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha!r}")
        for name in ("window", "history", "min_records", "floor", "min_per_class"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.min_records > self.history:
            raise ValueError(f"min_records ({self.min_records}) cannot exceed history ({self.history})")


class DropState(NamedTuple):
    losses: np.ndarray  # (n, history) float64, NaN = empty slot
    steps: np.ndarray  # (n, history) int64, step of each record, -1 = empty
    head: np.ndarray  # (n,) int64 next slot to write
    active: np.ndarray  # (n,) bool, the pool
    dropped_at: np.ndarray  # (n,) int64 step an example was dropped, -1 if active


def drop_init(n: int, config: DropConfig = DropConfig()) -> DropState:
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    n = int(n)
    H = config.history
    return DropState(
        losses=np.full((n, H), np.nan),
        steps=np.full((n, H), -1, dtype=np.int64),
        head=np.zeros(n, dtype=np.int64),
        active=np.ones(n, dtype=bool),
        dropped_at=np.full(n, -1, dtype=np.int64),
    )


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return int(step)


def drop_record(state: DropState, indices, losses, step: int) -> DropState:
    """Record per-example ``losses`` of examples ``indices`` measured at ``step``. Returns a new state.

    A repeated index within one call keeps its last loss; a second record of an example at the same
    step replaces the first (one measurement per step counts once towards ``min_records``).
    """
    idx = np.asarray(to_numpy(indices))
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"indices must hold integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64, copy=False).ravel()
    vals = np.asarray(to_numpy(losses), dtype=np.float64).ravel()
    n = state.active.size
    if idx.size != vals.size:
        raise ValueError(f"indices ({idx.size}) and losses ({vals.size}) differ in length")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"indices must lie in [0, {n})")
    if not np.all(np.isfinite(vals)):
        raise ValueError("losses contain NaN or infinite values")
    step = _check_step(step)
    # keep the last occurrence of repeated indices
    _, last = np.unique(idx[::-1], return_index=True)
    keep = idx.size - 1 - last
    idx, vals = idx[keep], vals[keep]
    H = state.losses.shape[1]
    L, S, head = state.losses.copy(), state.steps.copy(), state.head.copy()
    # a second measurement at the same step replaces the first: one step, one record
    prev = (head[idx] - 1) % H
    same = (head[idx] > 0) & (S[idx, prev] == step)
    slot = np.where(same, prev, head[idx] % H)
    L[idx, slot] = vals
    S[idx, slot] = step
    head[idx] += np.where(same, 0, 1)
    return state._replace(losses=L, steps=S, head=head)


def drop_update(state: DropState, step: int, config: DropConfig = DropConfig(), labels=None):
    """Decide which active examples are learned at ``step`` and drop them within the limits.

    Returns ``(new_state, dropped_indices)``. ``labels`` (n,) integers enable the per-class limit.
    """
    n = state.active.size
    step = _check_step(step)
    lab = None
    if labels is not None:
        lab = np.asarray(to_numpy(labels))
        if not np.issubdtype(lab.dtype, np.integer):
            raise TypeError(f"labels must hold integers, got dtype {lab.dtype}")
        lab = lab.astype(np.int64).ravel()
        if lab.size != n:
            raise ValueError(f"labels has length {lab.size}, expected {n}")
    in_win = (state.steps > step - config.window) & (state.steps >= 0) & (state.steps <= step)
    cnt = in_win.sum(axis=1)
    below = np.where(in_win, state.losses < config.alpha, True).all(axis=1)
    learned = state.active & (cnt >= config.min_records) & below
    cand = np.flatnonzero(learned)
    if cand.size == 0:
        return state, cand
    worst = np.where(in_win, state.losses, -np.inf).max(axis=1)
    cand = cand[np.lexsort((cand, worst[cand]))]  # smallest max loss first, lowest index on ties
    budget = int(state.active.sum()) - config.floor
    if budget <= 0:
        return state, cand[:0]
    chosen = []
    if lab is None:
        chosen = list(cand[:budget])
    else:
        left = {c: int(v) for c, v in zip(*np.unique(lab[state.active], return_counts=True))}
        for i in cand:
            if len(chosen) >= budget:
                break
            c = int(lab[i])
            if left[c] > config.min_per_class:
                left[c] -= 1
                chosen.append(int(i))
    chosen = np.asarray(sorted(chosen), dtype=np.int64)
    active = state.active.copy()
    active[chosen] = False
    dropped_at = state.dropped_at.copy()
    dropped_at[chosen] = int(step)
    return state._replace(active=active, dropped_at=dropped_at), chosen
