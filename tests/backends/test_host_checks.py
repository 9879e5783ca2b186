"""The host kernels behind the boundary checks: ``finite_abs_max`` (the features' finiteness and largest
magnitude, one pass over their bits) and ``class_counts`` (the labels' counts, one pass fewer than
``np.bincount``). The Numba kernels must return what the NumPy reference returns, and the core must give
the same answers and errors whichever of the two it runs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from array_api_compat import array_namespace
from hypothesis import given, settings
from hypothesis import strategies as st

import crestcore
from crestcore import _reference_kernels as ref

nb = pytest.importorskip("crestcore.backends.numba")

_SPECIAL = [0.0, -0.0, 1.0, -1.0, 5e-324, -5e-324, 1e-310, 1.7976931348623157e308, -1.7976931348623157e308,
            3.4028234663852886e38, -3.4028234663852886e38, 1e-45, math.inf, -math.inf, math.nan]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_SPECIAL) | st.floats(allow_nan=True, allow_infinity=True), min_size=1,
                max_size=70),
       st.sampled_from([np.float32, np.float64]))
def test_finite_abs_max_is_the_references(values, dtype):
    with np.errstate(over="ignore"):
        X = np.array(values, dtype=np.float64).astype(dtype)
    got, want = nb.finite_abs_max(X), ref.finite_abs_max(X)
    assert type(got) is float and type(want) is float
    if math.isinf(want):
        assert math.isinf(got) and got > 0
    else:
        assert got == want and got == float(np.max(np.abs(X)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_abs_max_on_layouts_and_a_bad_entry_anywhere(dtype):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(301, 13)).astype(dtype)
    X[18, 5] = -9.5  # the largest magnitude is a negative entry (in the strided view too)
    for view in (X, np.asfortranarray(X), X[::3, 1::2], X.T):
        assert nb.finite_abs_max(view) == ref.finite_abs_max(view) == 9.5
    X[18, 5] = 0.0
    assert nb.finite_abs_max(X[::3, ::2]) == ref.finite_abs_max(X[::3, ::2]) == float(np.abs(X[::3, ::2]).max())
    assert nb.finite_abs_max(np.zeros((0, 3), dtype=dtype)) == ref.finite_abs_max(np.zeros((0, 3), dtype=dtype)) == 0.0
    for bad in (np.nan, np.inf, -np.inf):
        for pos in ((0, 0), (150, 6), (300, 12)):  # first, middle, last: the scan looks at every entry
            Y = X.copy()
            Y[pos] = bad
            assert nb.finite_abs_max(Y) == ref.finite_abs_max(Y) == math.inf
    with pytest.raises(TypeError, match="float32 or float64"):
        nb.finite_abs_max(np.zeros(3, dtype=np.float16))
    with pytest.raises(TypeError, match="float32 or float64"):
        ref.finite_abs_max(np.zeros(3, dtype=np.int64))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-5, 40), min_size=0, max_size=300), st.integers(1, 50))
def test_class_counts_is_the_references(labels, limit):
    y = np.array(labels, dtype=np.int64)
    got, want = nb.class_counts(y, limit), ref.class_counts(y, limit)
    assert got.dtype == want.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    if y.size and y.min() >= 0 and y.max() < limit:
        np.testing.assert_array_equal(got, np.bincount(y))
    else:
        assert got.size == 0


def test_class_counts_takes_other_integer_dtypes_and_refuses_other_shapes_and_floats():
    y = np.array([3, 0, 3, 1], dtype=np.int32)
    for kern in (nb.class_counts, ref.class_counts):
        np.testing.assert_array_equal(kern(y, 10), [1, 1, 0, 2])
        with pytest.raises(ValueError, match="1-D"):
            kern(np.zeros((2, 2), dtype=np.int64), 10)
        with pytest.raises(ValueError, match="integer"):  # not truncated to class labels
            kern(np.array([0.5, 1.7]), 10)


def test_the_core_checks_alike_with_and_without_the_kernels(monkeypatch):
    """check_float_matrix and the class positions with the Numba kernels (loaded here) and with the NumPy
    reference (Numba not loaded): the same max|X|, the same refusal of a NaN, the same subsets and picks."""
    import crestcore.backends as B
    from crestcore import minibatch
    from crestcore._validation import check_float_matrix

    rng = np.random.default_rng(1)
    X = rng.normal(size=(500, 6))
    y = rng.integers(0, 4, size=500) * 3  # classes 0, 3, 6, 9: not their own positions
    assert B.get_host_kernel("finite_abs_max") is nb.finite_abs_max  # the backend is loaded (started)
    assert B.get_host_kernel("finite_abs_max", start=False) is not None
    a = check_float_matrix(array_namespace(X), X, "X")
    cs_a = crestcore.minibatch_coresets(X, y, m=8, r=100, P=3, rng=2)
    bad = X.copy()
    bad[-1, -1] = np.nan
    with pytest.raises(ValueError, match="features contains NaN"):
        crestcore.minibatch_coresets(bad, y, m=8, r=100, P=3, rng=2)
    monkeypatch.setattr(B, "get_host_kernel", lambda name, start=True: None)
    monkeypatch.setattr(minibatch, "get_host_kernel", lambda name, start=True: None)
    assert check_float_matrix(array_namespace(X), X, "X") == a == float(np.abs(X).max())
    cs_b = crestcore.minibatch_coresets(X, y, m=8, r=100, P=3, rng=2)
    np.testing.assert_array_equal(cs_a.subsets, cs_b.subsets)
    np.testing.assert_array_equal(cs_a.indices, cs_b.indices)
    with pytest.raises(ValueError, match="features contains NaN"):
        crestcore.minibatch_coresets(bad, y, m=8, r=100, P=3, rng=2)


def test_the_default_memory_guard_reads_the_available_memory_only_above_its_floor(monkeypatch):
    """max_dense_bytes=None is never below 64 MiB, so a CREST step that needs less does not read the
    available memory; one that needs more is sized from it (and refused here, with 100 MB free)."""
    import crestcore.backends as B

    reads = []

    def hundred_mb():
        reads.append(1)
        return 100_000_000

    monkeypatch.setattr(B, "host_available_bytes", hundred_mb)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 4))
    crestcore.minibatch_coresets(X, None, m=4, r=600, P=2, rng=0)  # at most 2 x 600 x (600 + 4) x 8 bytes: 6 MB
    assert reads == []
    # one 2900 x 2900 problem (the fused kernel's one buffer): 2900 x (2900 + 4) x 8 bytes = 67.4 MB > 64 MiB
    with pytest.raises(ValueError, match="max_dense_bytes"):
        crestcore.minibatch_coresets(X, None, m=4, r=2900, P=1, rng=0)
    assert reads == [1]
    crestcore.minibatch_coresets(X[:300], None, m=4, r=300, P=1, rng=0, max_dense_bytes=2 << 20)
    assert reads == [1]


def _cgroup_tree(root, proc_lines, files):
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text("".join(line + "\n" for line in proc_lines))
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cgroup_limits_bound_the_available_memory(tmp_path, monkeypatch):
    """Review 19: the default max_dense_bytes read /proc/meminfo only, which shows the host's memory inside
    a container; a dense problem sized from it could be killed at the container's limit. The memory
    cgroup's headroom (limit - usage + inactive file pages, the tightest of the cgroup and its ancestors)
    now bounds it, on cgroup v2 and v1; no limit ('max', or v1's ~2^63) bounds nothing."""
    import crestcore.backends as B
    from crestcore.backends import cgroup_headroom

    GiB = 1 << 30
    v2 = tmp_path / "v2"
    _cgroup_tree(v2, ["0::/job/step"], {
        "sys/fs/cgroup/job/step/memory.max": "max",
        "sys/fs/cgroup/job/step/memory.current": str(3 * GiB),
        "sys/fs/cgroup/job/step/memory.stat": f"anon {2 * GiB}\ninactive_file {GiB}\n",
        "sys/fs/cgroup/job/memory.max": str(8 * GiB),
        "sys/fs/cgroup/job/memory.current": str(3 * GiB),
        "sys/fs/cgroup/job/memory.stat": f"inactive_file {GiB}\n",
    })
    assert cgroup_headroom(str(v2)) == 6 * GiB  # the ancestor's limit: 8 - 3 + 1
    v1 = tmp_path / "v1"
    _cgroup_tree(v1, ["4:memory:/docker/abc", "1:cpu:/"], {
        "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": str(4 * GiB),
        "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes": str(GiB),
        "sys/fs/cgroup/memory/docker/abc/memory.stat": "cache 5\ntotal_inactive_file 0\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712",
        "sys/fs/cgroup/memory/memory.usage_in_bytes": str(GiB),
    })
    assert cgroup_headroom(str(v1)) == 3 * GiB
    free = tmp_path / "free"
    _cgroup_tree(free, ["0::/"], {"sys/fs/cgroup/memory.max": "max", "sys/fs/cgroup/memory.current": "10"})
    assert cgroup_headroom(str(free)) is None
    assert cgroup_headroom(str(tmp_path / "nothing")) is None
    # host_available_bytes takes the smaller of MemAvailable and the cgroup's headroom
    monkeypatch.setattr(B, "cgroup_headroom", lambda: 12345)
    assert B.host_available_bytes() == 12345
    monkeypatch.setattr(B, "cgroup_headroom", lambda: None)
    assert B.host_available_bytes() > 12345
