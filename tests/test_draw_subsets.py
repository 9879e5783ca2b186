"""crestcore.draw_subsets: Floyd's algorithm for all P class-stratified subsets in one host call.

The Numba host kernel and the NumPy reference must return the same subsets; the subsets must be
uniform within each class, with the Hamilton split of r over the classes in every subset.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import crestcore
from crestcore import minibatch
from crestcore._reference_kernels import draw_stratified as ref_draw
from _helpers import fresh_python


def _both(monkeypatch, labels, pool, r, P, seed):
    with monkeypatch.context() as mp:
        mp.setattr(minibatch, "_NATIVE_DRAW_CELLS", 0)  # every draw is "large": the Numba kernel
        a = crestcore.draw_subsets(labels, pool, r, P, np.random.default_rng(seed))
    with monkeypatch.context() as mp:
        mp.setattr(minibatch, "get_host_kernel", lambda name, start=True: None)  # no Numba: the NumPy reference
        b = crestcore.draw_subsets(labels, pool, r, P, np.random.default_rng(seed))
    return a, b


@pytest.mark.parametrize("seed", range(6))
def test_numba_and_reference_draw_the_same_subsets(monkeypatch, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    labels = rng.integers(-3, 7, size=n) * (1 if seed % 2 else 1000)  # negative and sparse labels too
    pool = rng.permutation(n)[: int(rng.integers(10, n + 1))]  # unsorted pool
    r = int(rng.integers(1, pool.size + 1))
    P = int(rng.integers(1, 9))
    # an unsorted pool (the kernel sorts each class block by insertion) and an ascending one (positions
    # through a bitmap, read out in order)
    for pl in (pool, np.sort(pool)):
        for lab in (labels, None):
            a, b = _both(monkeypatch, lab, pl, r, P, seed)
            np.testing.assert_array_equal(a, b)
            assert a.shape == (P, r) and a.dtype == np.int64
            assert (np.diff(a, axis=1) > 0).all(), "rows sorted, entries distinct"
            assert np.isin(a, pl).all()


@pytest.mark.parametrize("n_classes", [300, 150_000])
def test_many_classes_same_subsets(monkeypatch, n_classes):
    """More than 256 (the reference sorts 16-bit class positions) and more than 65,536 classes present
    (int64 positions)."""
    rng = np.random.default_rng(n_classes)
    n = 200_000
    labels = rng.integers(0, n_classes, size=n) * 3 + 1  # sparse label values
    pool = np.sort(rng.permutation(n)[:190_000])
    present = np.unique(labels[pool]).size
    assert present > (256 if n_classes == 300 else 65_536)
    a, b = _both(monkeypatch, labels, pool, 500, 2, 7)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("seed", range(3))
def test_large_classes_same_subsets_either_pool_order(monkeypatch, seed):
    """Classes of hundreds to thousands of members (bitmaps of many words), most of a class drawn."""
    rng = np.random.default_rng(100 + seed)
    n = 5000
    labels = rng.integers(0, 3, size=n)
    pool = rng.permutation(n)[:4000]
    for pl in (pool, np.sort(pool)):
        for r in (3, 700, 3900):
            a, b = _both(monkeypatch, labels, pl, r, 3, seed)
            np.testing.assert_array_equal(a, b)
            assert (np.diff(a, axis=1) > 0).all()


def _floyd_slot_by_slot(pool, cls, r_c, draws):
    """Floyd's algorithm as written: one slot at a time, a set of taken positions per (row, class)."""
    members = [pool[cls == c] for c in range(r_c.size)]
    out = np.zeros(draws.shape, dtype=np.int64)
    for p in range(draws.shape[0]):
        off = 0
        for c, k in enumerate(r_c):
            taken: set[int] = set()
            for t in range(k):
                x = int(draws[p, off + t])
                taken.add(members[c].size - k + t if x in taken else x)
            out[p, off:off + k] = np.sort(members[c][sorted(taken)])
            off += k
    return out


@pytest.mark.parametrize("seed", range(4))
def test_reference_draw_is_floyd_slot_by_slot_even_when_draws_collide(seed):
    """The reference finds Floyd's collisions without a loop over the slots (repeats by a sort, chains
    through earlier slots' fallbacks by repeated gathers); draws skewed to the top or the bottom of their
    ranges make long chains of collisions. Checked against the slot-by-slot algorithm, and the sort's
    lexicographic fallback (for keys that would overflow int64) against its fast path."""
    from crestcore._reference_kernels import _repeated_draws

    rng = np.random.default_rng(seed)
    for _ in range(300):
        C = int(rng.integers(1, 6))
        sizes = rng.integers(0, 12, C)
        if sizes.sum() == 0:
            continue
        cls = rng.permutation(np.repeat(np.arange(C), sizes))
        pool = rng.permutation(3 * cls.size)[: cls.size]
        r_c = np.array([rng.integers(0, s + 1) for s in sizes])
        P = int(rng.integers(1, 5))
        blk = np.repeat(np.arange(C), r_c)
        t = np.arange(r_c.sum()) - np.repeat(np.cumsum(r_c) - r_c, r_c)
        high = (sizes - r_c)[blk] + t + 1
        u = rng.random((P, high.size)) ** rng.choice([0.2, 1.0, 5.0])
        draws = np.minimum(u * high, high - 1).astype(np.int64)
        np.testing.assert_array_equal(ref_draw(pool, cls, r_c, draws), _floyd_slot_by_slot(pool, cls, r_c, draws))
        start = np.repeat(np.cumsum(r_c) - r_c, r_c)
        span = int(sizes.max()) + 1
        np.testing.assert_array_equal(_repeated_draws(draws, start, span),
                                      _repeated_draws(draws, start, 2**62 // max(1, high.size) ** 2 + 1))


def test_per_class_sizes_are_the_proportional_shares_rounded_at_random():
    """Class c gets floor or ceil of q_c = r n_c / n slots, the same in every subset of one draw, and
    q_c on average: the leftover slots are drawn (a fixed largest-remainder split gave them to the same
    classes every time, the lowest ones on ties, so V_p's class mix, the anchor loss and the coreset
    weights were biased towards them)."""
    rng = np.random.default_rng(3)
    labels = rng.choice(5, size=1000, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    pool = np.arange(1000)
    q = 97 * np.bincount(labels) / 1000
    seen = []
    for seed in range(400):
        sub = crestcore.draw_subsets(labels, pool, 97, 3, np.random.default_rng(seed))
        got = np.bincount(labels[sub[0]], minlength=5)
        assert got.sum() == 97 and np.all((got == np.floor(q)) | (got == np.ceil(q)))
        for row in sub[1:]:
            np.testing.assert_array_equal(np.bincount(labels[row], minlength=5), got)
        seen.append(got)
    frac = q - np.floor(q)  # P(ceil) per class; the mean's standard error is below 0.025
    np.testing.assert_allclose(np.mean(seen, axis=0), q, atol=0.1)
    assert np.all(np.abs(np.mean(np.array(seen) == np.ceil(q), axis=0) - frac)[frac > 0] < 0.1)


def test_equal_classes_share_the_leftover_slots_evenly():
    """Ten classes of 100 and r = 25: 2.5 slots each, so half the draws give a class 3. With the fixed split
    classes 0-4 got 3 every time."""
    labels = np.repeat(np.arange(10), 100)
    counts = np.array([np.bincount(labels[crestcore.draw_subsets(labels, np.arange(1000), 25, 1,
                                                                  np.random.default_rng(s))[0]], minlength=10)
                       for s in range(600)])
    assert set(np.unique(counts).tolist()) == {2, 3} and np.all(counts.sum(axis=1) == 25)
    assert np.all(np.abs(counts.mean(axis=0) - 2.5) < 0.08)  # standard error 0.02


def test_subsets_are_uniform_within_each_class():
    """Chi-square over many seeds on a tiny instance: class 0 has 5 members, class 1 has 3, r = 4, so the
    shares are 2.5 and 1.5 slots: the splits (3, 1) and (2, 2) each half the time, and within a split
    every combination equally likely: all 30 + 30 subsets equally likely."""
    labels = np.array([0, 1, 0, 0, 1, 0, 1, 0])
    pool = np.arange(8)
    zero, one = [0, 2, 3, 5, 7], [1, 4, 6]
    subsets = [a + b for k0 in (3, 2) for a, b in itertools.product(
        itertools.combinations(zero, k0), itertools.combinations(one, 4 - k0))]
    combos = {tuple(sorted(c)): i for i, c in enumerate(subsets)}
    assert len(combos) == 60
    counts = np.zeros(len(combos))
    for seed in range(600):  # 600 seeds x 25 subsets
        for row in crestcore.draw_subsets(labels, pool, 4, 25, np.random.default_rng(seed)):
            counts[combos[tuple(row.tolist())]] += 1
    expected = counts.sum() / len(combos)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 98.3, (chi2, counts)  # df = 59: P(chi2 > 98.3) = 0.001


def test_uniform_over_the_pool_without_labels():
    pool = np.array([9, 2, 7, 4])
    counts = {}
    for seed in range(200):
        for row in crestcore.draw_subsets(None, pool, 2, 30, np.random.default_rng(seed)):
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert len(counts) == math.comb(4, 2)
    c = np.array(list(counts.values()), dtype=float)
    e = c.sum() / c.size
    assert float(((c - e) ** 2 / e).sum()) < 20.5  # df = 5: P(chi2 > 20.5) = 0.001


def test_same_seed_same_subsets_and_inputs_untouched():
    labels = np.arange(300) % 7
    pool = np.arange(300)[::-1].copy()
    keep = (labels.copy(), pool.copy())
    a = crestcore.draw_subsets(labels, pool, 50, 4, np.random.default_rng(5))
    b = crestcore.draw_subsets(labels, pool, 50, 4, np.random.default_rng(5))
    c = crestcore.draw_subsets(labels, pool, 50, 4, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(labels, keep[0])
    np.testing.assert_array_equal(pool, keep[1])


def test_minibatch_coresets_same_subsets_for_torch_input():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 4))
    y = rng.integers(0, 5, size=500)
    a = crestcore.minibatch_coresets(X, y, m=10, r=60, P=3, rng=11)
    b = crestcore.minibatch_coresets(torch.from_numpy(X), torch.from_numpy(y), m=10, r=60, P=3, rng=11)
    np.testing.assert_array_equal(a.subsets, b.subsets.numpy())
    np.testing.assert_array_equal(a.indices, b.indices.numpy())


def test_reference_kernel_floyd_fallback_and_bounds():
    """Floyd's rule: a draw that hits a taken position takes j = N_c - r_c + t instead."""
    pool = np.array([10, 11, 12, 13])
    cls = np.zeros(4, dtype=np.int64)
    # r_c = 3: slots draw in [0, 1], [0, 2], [0, 3]; draws 1, 1 (taken -> 2), 2 (taken -> 3)
    out = ref_draw(pool, cls, np.array([3]), np.array([[1, 1, 2]]))
    np.testing.assert_array_equal(out, [[11, 12, 13]])
    nb = pytest.importorskip("crestcore.backends.numba")
    np.testing.assert_array_equal(nb.draw_stratified(pool, cls, np.array([3]), np.array([[1, 1, 2]])), out)
    with pytest.raises(ValueError, match="draws"):
        nb.draw_stratified(pool, cls, np.array([3]), np.array([[2, 0, 0]]))  # slot 0 draws in [0, 1]
    with pytest.raises(ValueError, match="r_c"):
        nb.draw_stratified(pool, cls, np.array([5]), np.zeros((1, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="r_c"):
        nb.draw_stratified(pool, cls, np.array([-1, 1]), np.zeros((1, 0), dtype=np.int64))
    for bad in (-1, 1, 256):  # a class position outside [0, C) is refused before it is used as an index
        for kern in (nb.draw_stratified, ref_draw):
            with pytest.raises(ValueError, match="cls"):
                kern(pool, np.array([0, 0, bad, 0]), np.array([1]), np.zeros((1, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="draws"):
        nb.draw_stratified(pool, cls, np.array([2]), np.array([[0, -1]]))


def test_bad_arguments_are_refused_naming_them():
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    gen = np.random.default_rng(0)
    from crestcore import draw_subsets

    assert draw_subsets(labels, np.arange(8), 4, 2, 0).shape == (2, 4)  # an int seed is a seed
    for pool, match in ((np.array([0, 0, 1, 2]), "distinct"), (np.array([-1, 2, 3, 4]), "non-negative"),
                        (np.array([[0, 1], [2, 3]]), "1-D"), (np.array([0, 1, 2, 9]), "beyond")):
        with pytest.raises(ValueError, match=match):
            draw_subsets(labels, pool, 2, 1, gen)
    # a wrong dtype is a wrong type: TypeError, as for minibatch_coresets' arguments (review 109 F5)
    with pytest.raises(TypeError, match="pool must be an array of integer example indices, got dtype float64"):
        draw_subsets(labels, np.array([0.0, 1.0, 2.0, 3.0]), 2, 1, gen)
    with pytest.raises(TypeError, match="labels_host must be an integer array or None, got dtype float64"):
        draw_subsets(labels.astype(float), np.arange(8), 2, 1, gen)
    for empty in ([], np.zeros(0, dtype=np.int64)):  # [] is float64 to NumPy: still the empty pool's error
        with pytest.raises(ValueError, match="non-empty"):
            draw_subsets(labels, empty, 2, 1, gen)
    with pytest.raises(ValueError, match="labels_host must be a 1-D"):
        draw_subsets(labels[None], np.arange(8), 2, 1, gen)
    with pytest.raises(ValueError, match="r"):
        draw_subsets(labels, np.arange(8), 9, 1, gen)
    with pytest.raises(ValueError, match="P"):
        draw_subsets(labels, np.arange(8), 2, 0, gen)
    with pytest.raises(TypeError, match="rng"):
        draw_subsets(labels, np.arange(8), 2, 1, None)


def test_a_small_draw_does_not_start_numba_and_a_large_one_does():
    """The reference draws small subsets in a few ms, the same subsets as the Numba kernel (above): a
    process that does not use Numba otherwise (a torch training loop) is not made to start it, 0.5-0.9 s.
    A draw of more than 2^21 slots in all (P x r) starts it."""
    code = (
        "import sys, numpy as np, crestcore\n"
        "lab = np.arange(20000) % 10\n"
        "crestcore.draw_subsets(lab, np.arange(20000), 512, 10, np.random.default_rng(0))\n"
        "print('numba' in sys.modules)\n"
        "crestcore.draw_subsets(lab, np.arange(20000), 512, 300, np.random.default_rng(0))\n"
        "print('numba' in sys.modules)\n"
        "crestcore.draw_subsets(lab, np.arange(20000), 512, 4097, np.random.default_rng(0))\n"
        "print('numba' in sys.modules)\n"
    )
    assert fresh_python(code) == ["False", "False", "True"]
