"""crestcore.backends.torch runs small CPU problems on one intra-op thread: the same results as on the
caller's threads, the caller's thread count back afterwards (also after an error), and nothing changed for
larger problems or a caller on one thread."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crestcore.backends import _device
from crestcore.backends import torch as tk


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _problem(seed: int):
    """A random padded batch at most ``_ONE_THREAD_MAX`` entries, float32 or float64, with duplicate points
    (exact ties) in a third of them; with its metric, kernel, optimizer and stochastic draws."""
    rng = np.random.default_rng(seed)
    B = int(rng.integers(1, 101))
    n = int(rng.integers(2, int((tk._ONE_THREAD_MAX // B) ** 0.5) + 1))
    d = int(rng.choice([1, 3, 10, 64]))
    dt = (torch.float32, torch.float64)[seed % 2]
    X = torch.from_numpy(rng.normal(size=(B, n, d))).to(dt)
    if seed % 3 == 0:
        X = torch.round(X * 2) / 2
    valid = torch.from_numpy(rng.random((B, n)) < 0.9)
    budgets = torch.from_numpy(rng.integers(0, min(n, 20) + 1, B))
    metric = ("euclidean", "sqeuclidean", "cosine")[seed % 3]
    kernel = ("max-minus", "exp")[(seed // 3) % 2]
    opt = ("lazy", "naive", "stochastic")[(seed // 2) % 3]
    K = max(int(budgets.max()), 1)
    u = torch.from_numpy(rng.random((B, K, 4))).to(dt) if opt == "stochastic" else None
    return X, valid, budgets, metric, kernel, opt, u


@pytest.mark.parametrize("seed", range(60))
def test_one_thread_gives_the_callers_results(seed, two_threads, monkeypatch):
    X, valid, budgets, metric, kernel, opt, u = _problem(seed)
    assert tk._entries(X) <= tk._ONE_THREAD_MAX
    one = tk.facility_batched(X, valid, budgets, metric, kernel, 1.0, opt, u)
    S1 = tk.similarity_batched(X, valid, metric, kernel, 1.0)
    g1 = tk.greedy_batched(S1, valid, budgets, opt, u)
    a1 = tk.assign_batched(S1, valid, g1[0])
    monkeypatch.setattr(tk, "_ONE_THREAD_MAX", -1)  # every call on the caller's two threads
    two = tk.facility_batched(X, valid, budgets, metric, kernel, 1.0, opt, u)
    S2 = tk.similarity_batched(X, valid, metric, kernel, 1.0)
    g2 = tk.greedy_batched(S2, valid, budgets, opt, u)
    a2 = tk.assign_batched(S2, valid, g2[0])
    for a, b in zip((*one, S1, *g1, *a1), (*two, S2, *g2, *a2)):
        assert torch.equal(a, b)


def _spy(monkeypatch, name):
    """Record torch's thread count inside ``_device.<name>`` (what the kernel's operations run with)."""
    seen = []
    real = getattr(_device, name)

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(_device, name, spy)
    return seen


def test_small_cpu_calls_run_on_one_thread_and_give_the_count_back(two_threads, monkeypatch):
    X, valid, budgets, metric, kernel, opt, u = _problem(1)
    seen = _spy(monkeypatch, "similarity_batched")
    tk.facility_batched(X, valid, budgets, metric, kernel, 1.0, opt, u)
    tk.similarity_batched(X, valid, metric, kernel, 1.0)
    assert seen == [1, 1] and torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="metric"):  # refused inside the one-thread block
        tk.facility_batched(X, valid, budgets, "manhattan", kernel, 1.0, opt, u)
    assert torch.get_num_threads() == 2


def test_large_problems_and_one_thread_callers_are_left_alone(two_threads, monkeypatch):
    seen = _spy(monkeypatch, "similarity_batched")
    B, n = 3, int((tk._ONE_THREAD_MAX // 3) ** 0.5) + 1  # just over the limit
    X = torch.randn(B, n, 2, generator=torch.Generator().manual_seed(0))
    valid, budgets = torch.ones(B, n, dtype=torch.bool), torch.full((B,), 2)
    assert tk._entries(X) > tk._ONE_THREAD_MAX
    tk.facility_batched(X, valid, budgets, "euclidean", "max-minus", 1.0, "lazy")
    torch.set_num_threads(1)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda k: calls.append(k))
    small = X[:, :8]
    tk.facility_batched(small, valid[:, :8], budgets, "euclidean", "max-minus", 1.0, "lazy")
    assert seen == [2, 1] and calls == []  # a one-thread caller: no change made, none to undo


def test_other_threads_keep_their_count(two_threads, monkeypatch):
    """Review 163: the one-thread setting was torch's process-wide count, and a thread whose first torch
    operation fell inside the call kept one thread for its life. Set on the calling thread only, threads started
    during the call (and after it) see the caller's count."""
    import threading

    X, valid, budgets, metric, kernel, opt, u = _problem(1)
    real = _device.similarity_batched
    inside, started = [], []

    def spy(*args, **kwargs):
        inside.append(torch.get_num_threads())
        t = threading.Thread(target=lambda: started.append(torch.get_num_threads()))
        t.start()
        t.join()
        return real(*args, **kwargs)

    monkeypatch.setattr(_device, "similarity_batched", spy)
    tk.facility_batched(X, valid, budgets, metric, kernel, 1.0, opt, u)
    assert inside == [1] and started == [2], (inside, started)
    later = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [2] and torch.get_num_threads() == 2


def test_without_openmp_found_the_process_count_changes_only_when_no_other_thread_runs(two_threads, monkeypatch):
    """Torch without an OpenMP runtime found: ``torch.set_num_threads`` around the call, only while this is the
    only Python thread (no other thread can start torch work inside the call)."""
    import threading

    X, valid, budgets, metric, kernel, opt, u = _problem(1)
    monkeypatch.setattr(tk, "_OPENMP", False)
    seen = _spy(monkeypatch, "similarity_batched")
    if threading.active_count() == 1:
        tk.facility_batched(X, valid, budgets, metric, kernel, 1.0, opt, u)
        assert seen == [1] and torch.get_num_threads() == 2
        seen.clear()
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        tk.facility_batched(X, valid, budgets, metric, kernel, 1.0, opt, u)
    finally:
        stop.set()
        other.join()
    assert seen == [2] and torch.get_num_threads() == 2
