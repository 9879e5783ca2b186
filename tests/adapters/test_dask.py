"""crestcore.adapters.dask: GreeDi on a 2-process LocalCluster (skipped without dask.distributed)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("dask.distributed")

import crestcore  # noqa: E402
from crestcore.adapters import dask as cdask  # noqa: E402


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def _features(seed, n, d):
    return np.random.default_rng(seed).normal(size=(n, d))


def _objective(X, picks, M):
    """The common max-minus objective sum_i max_j (M - D_ij), from the definition."""
    D = np.sqrt(((X[:, None, :] - X[None, picks, :]) ** 2).sum(axis=2))
    return float((M - D).max(axis=1).sum())


def test_one_partition_is_the_single_machine_result(client):
    X = _features(0, 300, 4)
    labels = np.repeat([3, 1], [180, 120])
    for kw in (dict(), dict(optimizer="stochastic"), dict(neighbors=10), dict(kernel="exp", metric="cosine")):
        single = crestcore.facility_location(X, 20, labels=labels, rng=7, **kw)
        got = cdask.facility_location(X, 20, labels=labels, client=client, partitions=1, seed=7, **kw)
        np.testing.assert_array_equal(got.indices, single.indices)
        np.testing.assert_array_equal(got.weights, single.weights)
        np.testing.assert_array_equal(got.gains, single.gains)
        assert float(got.objective) == float(single.objective)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_results_come_in_the_inputs_dtype_whatever_the_partitions(client, dtype):
    X = _features(1, 60, 3).astype(dtype)
    for parts in (1, 3):
        got = cdask.facility_location(X, 6, client=client, partitions=parts, seed=0)
        assert got.weights.dtype == got.gains.dtype == got.objective.dtype == dtype, parts


def test_greedi_on_numpy_and_dask_input_agree_and_are_deterministic(client):
    X = _features(1, 400, 3)
    a = cdask.facility_location(X, 15, client=client, partitions=2, seed=3, optimizer="stochastic")
    b = cdask.facility_location(X, 15, client=client, partitions=2, seed=3, optimizer="stochastic")
    Xd = da.from_array(X, chunks=(200, 3))
    c = cdask.facility_location(Xd, 15, client=client, seed=3, optimizer="stochastic")  # chunks = partitions
    for other in (b, c):
        np.testing.assert_array_equal(other.indices, a.indices)
        np.testing.assert_array_equal(other.weights, a.weights)
    assert a.path == "greedi" and "2 partitions" in a.plan
    assert float(np.sum(a.weights)) == 400
    assert np.unique(a.indices).size == 15
    # the reported objective is the common objective of the picks, and the gains add up to it
    M = 2 * np.sqrt(((X - X.mean(axis=0)) ** 2).sum(axis=1).max())
    assert float(a.objective) == pytest.approx(_objective(X, a.indices, M), rel=1e-9)
    assert float(np.sum(a.gains)) == pytest.approx(float(a.objective), rel=1e-9)


def test_greedi_at_extreme_magnitudes_picks_as_at_unit_scale(client):
    """The numerics policy holds for GreeDi too: data times a power of two (about 1e162 and 1e-169)
    gives the same picks and weights and the objective times the same factor (the common objective's
    bound M had overflowed to inf, refused as an argument the caller never passed, or underflowed to 0,
    putting every weight on the first pick)."""
    X = _features(22, 60, 3)
    ref = cdask.facility_location(X, 6, client=client, partitions=3, seed=0)
    for c in (2.0**540, 2.0**-560):
        got = cdask.facility_location(X * c, 6, client=client, partitions=3, seed=0)
        np.testing.assert_array_equal(got.indices, ref.indices)
        np.testing.assert_array_equal(got.weights, ref.weights)
        assert float(got.objective) == pytest.approx(float(ref.objective) * c, rel=1e-12)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_greedi_picks_alike_at_any_scale_and_offset(client, metric):
    """Review 69: with squared distances the common objective's bound 4 r^2 underflowed to 0 for data
    below about 1e-154 (every candidate scored 0, the merged one won the tie, all the weight went to the
    first pick), and the class means were plain float64 sums, which overflowed for large finite data
    (refused as a bound=inf the caller never passed). The bounds and means are taken on X 2^-E now."""
    X = _features(10, 60, 3)
    ref = cdask.facility_location(X, 4, client=client, partitions=3, metric=metric)
    p = 1 if metric == "euclidean" else 2
    for c in (1e-300, 2.0**-500, 2.0**-300, 2.0**300, 1e150):
        got = cdask.facility_location(X * c, 4, client=client, partitions=3, metric=metric)
        np.testing.assert_array_equal(got.indices, ref.indices)
        np.testing.assert_array_equal(got.weights, ref.weights)
        want = float(ref.objective) * c ** p if abs(math.log10(c)) * p < 300 else None
        if want is not None:
            assert float(got.objective) == pytest.approx(want, rel=1e-9)
    # a large offset: finite data whose plain sums overflow
    Y = 3e306 + 1e304 * _features(11, 200, 2)
    got = cdask.facility_location(Y, 4, client=client, partitions=2, metric="euclidean")
    assert got.indices.size == 4 and float(got.weights.sum()) == 200 and math.isfinite(float(got.objective))


def test_greedi_is_no_worse_than_its_candidates_and_close_to_centralized(client):
    X = _features(2, 600, 4)
    k = 30
    sel = cdask.facility_location(X, k, client=client, partitions=3, seed=0)
    M = 2 * np.sqrt(((X - X.mean(axis=0)) ** 2).sum(axis=1).max())
    got = _objective(X, sel.indices, M)
    # the best single partition's own greedy, evaluated alike, cannot beat what GreeDi returns
    for p in range(3):
        part = np.arange(p * 200, (p + 1) * 200)
        local = part[crestcore.facility_location(X[part], k).indices]
        assert got >= _objective(X, local, M) - 1e-9 * abs(got)
    central = crestcore.facility_location(X, k).indices
    assert got >= 0.98 * _objective(X, central, M)


def test_greedi_within_its_guarantee_on_brute_forceable_instances(client):
    """(1 - 1/e)^2 / min(m, k) of the optimum (the worst-case bound), on instances small enough to
    enumerate every k-subset; in practice it is much closer, which the second assertion records."""
    for seed in range(3):
        X = _features(10 + seed, 12, 2)
        k, m = 3, 2
        sel = cdask.facility_location(X, k, client=client, partitions=m, seed=seed)
        M = 2 * np.sqrt(((X - X.mean(axis=0)) ** 2).sum(axis=1).max())
        opt = max(_objective(X, list(s), M) for s in itertools.combinations(range(12), k))
        got = _objective(X, sel.indices, M)
        assert got <= opt + 1e-9
        assert got >= (1 - 1 / math.e) ** 2 / min(m, k) * opt
        assert got >= (1 - 1 / math.e) * opt


def test_uint64_labels_past_int64_are_refused_not_wrapped(client):
    """Review 109 F2: the cast to int64 wrapped them to negative values, reordering the classes."""
    X = np.random.default_rng(0).normal(size=(40, 3))
    labels = np.array([1, 2**63 + 5] * 20, dtype=np.uint64)
    with pytest.raises(ValueError, match=r"labels holds values above 2\^63 - 1"):
        cdask.facility_location(X, 4, labels=labels, client=client, partitions=2)


def test_labels_get_the_single_machine_budgets(client):
    X = _features(4, 500, 3)
    labels = np.random.default_rng(4).integers(0, 3, 500)
    sel = cdask.facility_location(X, 25, labels=labels, client=client, partitions=2, seed=0)
    single = crestcore.facility_location(X, 25, labels=labels)
    np.testing.assert_array_equal(np.bincount(labels[sel.indices], minlength=3),
                                  np.bincount(labels[single.indices], minlength=3))
    assert np.all(np.diff(labels[sel.indices]) >= 0)  # grouped by ascending label
    for c in range(3):
        assert float(np.sum(sel.weights[labels[sel.indices] == c])) == np.sum(labels == c)


def test_neighbors_shrink_on_small_blocks_and_dask_partitions_are_equal(client):
    """An integer ``neighbors`` works when a block's class or the merge set has K or fewer points (K is
    shrunk there, as the single-machine path shrinks it per class); ``partitions=`` gives dask input the
    same equal blocks as NumPy input, and empty row chunks are skipped."""
    X = _features(5, 400, 5)
    y = np.random.default_rng(6).integers(0, 4, 400)
    for k, labels in ((5, None), (8, y), (40, y)):
        sel = cdask.facility_location(X, k, labels=labels, client=client, partitions=2, neighbors=16, seed=1)
        assert np.unique(sel.indices).size == k and float(np.sum(sel.weights)) == 400
    X10 = _features(7, 10, 3)
    for parts in (4, 5):
        a = cdask.facility_location(X10, 2, client=client, partitions=parts, seed=2)
        b = cdask.facility_location(da.from_array(X10, chunks=(3, 3)), 2, client=client, partitions=parts, seed=2)
        np.testing.assert_array_equal(a.indices, b.indices)
        assert f"{parts} partitions" in b.plan
    gaps = da.from_array(X, chunks=((200, 0, 200), (5,)))
    sel = cdask.facility_location(gaps, 10, client=client, seed=3)
    assert "2 partitions" in sel.plan and np.unique(sel.indices).size == 10


def test_bad_input_is_refused_clearly(client):
    X = _features(5, 200, 3)
    Xn = X.copy()
    Xn[130, 1] = np.nan
    with pytest.raises(ValueError, match=r"row chunk 1 \(rows 100-199\) contains NaN"):
        cdask.facility_location(da.from_array(Xn, chunks=(100, 3)), 5, client=client, seed=0)
    with pytest.raises(ValueError, match=r"k=120 is larger than partition 0 can give"):
        cdask.facility_location(X, 120, client=client, partitions=2)
    unknown = da.from_array(X, chunks=(50, 3))
    unknown = unknown[unknown[:, 0] > 0]
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        cdask.facility_location(unknown, 5, client=client)
    with pytest.raises(TypeError, match="seed"):
        cdask.facility_location(X, 5, client=client, rng=0)
    with pytest.raises(TypeError, match="unknown option"):
        cdask.facility_location(X, 5, client=client, labelz=None)
    with pytest.raises(ValueError, match="k must be"):
        cdask.facility_location(X, 0, client=client)
    with pytest.raises(TypeError, match="X must be"):
        cdask.facility_location([[1.0]], 1, client=client)
    np.testing.assert_array_equal(np.isnan(Xn).sum(), 1)  # the input was not modified
    # facility_location's other choices are refused before any chunk is computed (review 152: on the workers,
    # after every chunk had been read, with a worker error logged per partition)

    def unread(block):
        raise RuntimeError("a chunk was computed")

    untouched = da.from_array(X, chunks=(50, 3)).map_blocks(unread, dtype=X.dtype)
    for bad, err, what in (({"optimizer": "lazzy"}, ValueError, "optimizer must be one of"),
                           ({"backend": "numpy"}, ValueError, "backend must be one of"),
                           ({"optimizer": "stochastic", "epsilon": 2.0}, ValueError, r"epsilon must be in \(0, 1\)"),
                           ({"epsilon": "0.1"}, TypeError, "epsilon must be a number"),
                           ({"max_dense_bytes": "1GB"}, TypeError, "max_dense_bytes must be an integer"),
                           ({"max_dense_bytes": -5}, ValueError, "max_dense_bytes must be >= 1")):
        with pytest.raises(err, match=what):
            cdask.facility_location(untouched, 5, client=client, **bad)


def test_without_a_client_a_local_cluster_is_started_and_closed():
    X = _features(6, 120, 2)
    sel = cdask.facility_location(X, 4, partitions=2, seed=0)
    assert sel.indices.shape == (4,) and sel.path == "greedi"


def test_tasks_rerun_after_a_worker_dies_give_the_same_result(tmp_path):
    """Dask reruns the tasks of a worker that died (on a restarted worker, its input blocks recomputed from
    the dask array); every task is a pure function of its arguments, so the result is unchanged. A worker
    plugin kills its process once when a local-greedy task starts and once when a scoring task starts."""
    import os

    class DieOnce(distributed.WorkerPlugin):
        def __init__(self, prefixes, folder):
            self.prefixes, self.folder = prefixes, folder

        def transition(self, key, start, finish, **kwargs):
            name = str(key[0] if isinstance(key, tuple) else key)
            for prefix in self.prefixes:
                marker = os.path.join(self.folder, prefix)
                if finish == "executing" and name.startswith(prefix + "-") and not os.path.exists(marker):
                    open(marker, "w").close()
                    os._exit(1)

    X = _features(7, 400, 3)
    Xd = da.from_array(X, chunks=(200, 3))
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    c = distributed.Client(cluster)
    try:
        ref = cdask.facility_location(Xd, 12, client=c, seed=5, optimizer="stochastic")
        c.register_plugin(DieOnce(["_local", "_scores"], str(tmp_path)))
        got = cdask.facility_location(Xd, 12, client=c, seed=5, optimizer="stochastic")
    finally:
        c.close()
        cluster.close()
    assert sorted(os.listdir(tmp_path)) == ["_local", "_scores"]  # both kills happened
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.weights, ref.weights)
    np.testing.assert_array_equal(got.gains, ref.gains)
    assert float(got.objective) == float(ref.objective)


def test_a_closed_client_is_refused_naming_it():
    """A client closed before the call: a ValueError that says so (dask's 'IOLoop is closed' before)."""
    with distributed.Client(processes=False, dashboard_address=":0") as c:
        pass
    with pytest.raises(ValueError, match="client is closed"):
        cdask.facility_location(_features(1, 100, 3), 5, client=c, seed=0)


def test_neighbors_of_n_or_more_are_refused_whatever_the_partitions(client):
    """The single-machine call refuses neighbors >= n; GreeDi did too with one partition but shrank it
    per block with several."""
    X = _features(5, 300, 3)
    for parts in (1, 3):
        with pytest.raises(ValueError, match=r"neighbors must be in \[1, 299\]"):
            cdask.facility_location(X, 5, client=client, partitions=parts, neighbors=300)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_greedi_scales_each_class_on_its_own(client, metric):
    """Classes far apart in magnitude (2^1100 for distances, 2^530 for squared ones): each class picks as it
    does at unit scale. One power-of-two scale for all of X (that of its largest magnitude) flushed the
    small class's rows to zero or to subnormals (2^-560 times 2^-543 is below float64's smallest
    subnormal), so its picks were arbitrary."""
    X = _features(12, 90, 3)
    labels = np.repeat([0, 1], [50, 40])
    ref = cdask.facility_location(X, 8, labels=labels, client=client, partitions=3, seed=1, metric=metric)
    p = 1 if metric == "euclidean" else 2
    cases = {1: ((2.0**540, 2.0**-560), (1.0, 2.0**-1000), (2.0**300, 1.0)),  # squared: half the exponents
             2: ((2.0**250, 2.0**-280), (1.0, 2.0**-500), (2.0**150, 1.0))}[p]
    for big, small in cases:
        Y = X * np.where(labels == 0, big, small)[:, None]
        got = cdask.facility_location(Y, 8, labels=labels, client=client, partitions=3, seed=1, metric=metric)
        np.testing.assert_array_equal(got.indices, ref.indices)
        np.testing.assert_array_equal(got.weights, ref.weights)
        in0 = labels[ref.indices] == 0
        for cls, c in ((in0, big), (~in0, small)):
            scaled = np.asarray(ref.gains)[cls] * c ** p
            fine = np.abs(scaled) > 1e-290  # the gains that float64 still holds at full precision
            np.testing.assert_allclose(np.asarray(got.gains)[cls][fine], scaled[fine], rtol=1e-9)


def test_a_cosine_zero_row_covers_itself_as_on_one_machine(client):
    """Review 87: the blocks scored the candidate solutions with a zero row at cosine distance 1 from its own
    copy among the candidates (facility_location puts every point at distance 0 from itself), so the merged
    solution scored below a partial one and GreeDi returned other picks than one machine."""
    X = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.05], [1.0, -0.05]])
    one = crestcore.facility_location(X, 2, metric="cosine")
    for parts in (1, 2):
        sel = cdask.facility_location(X, 2, client=client, partitions=parts, metric="cosine")
        assert sel.indices.tolist() == one.indices.tolist() == [1, 0], (parts, sel.plan)
        assert sel.weights.tolist() == one.weights.tolist() == [3.0, 1.0]
    # score_orders with the ids: the zero row is one point with its copy (weights 3 and 1), not a stranger
    ids = np.arange(4)
    assert crestcore.score_orders(X, X, [np.array([1, 0])], metric="cosine", bound=2.0)[0][1].tolist() == [4.0, 0.0]
    scored = crestcore.score_orders(X, X, [np.array([1, 0])], metric="cosine", bound=2.0, ids=(ids, ids))[0]
    assert scored[1].tolist() == [3.0, 1.0] and scored[0] == pytest.approx(sum(scored[2]))
    for metric in ("euclidean", "sqeuclidean"):  # the other metrics' self-distances were 0 already: unchanged
        a = crestcore.score_orders(X, X, [np.array([1, 0])], metric=metric, bound=4.0)[0]
        b = crestcore.score_orders(X, X, [np.array([1, 0])], metric=metric, bound=4.0, ids=(ids, ids))[0]
        assert a[0] == b[0] and a[1].tolist() == b[1].tolist() and a[2].tolist() == b[2].tolist()
    with pytest.raises(ValueError, match="candidate_ids must be distinct"):
        crestcore.score_orders(X, X, [np.array([1])], metric="cosine", bound=2.0, ids=(ids, np.zeros(4, int)))


def test_labelled_greedi_returns_every_classs_budget(client):
    """Review 161: with labels, a partition holding fewer of a class than its budget gave fewer picks, and its
    partial solution could win the final comparison over a poor merged one (stochastic greedy on a small union):
    5 picks for k = 6, silently. Only solutions of the whole budget compete."""
    from crestcore.adapters import dask as cdask

    rng = np.random.default_rng(366)  # (the review's random search: 10 points, 2 partitions, one class, k = 6)
    n, parts, C = int(rng.integers(10, 40)), int(rng.integers(2, 6)), int(rng.integers(1, 4))
    X, labels = rng.normal(size=(n, 1)), rng.integers(0, C, n)
    k = int(rng.integers(C, n))
    assert (n, parts, C, k) == (10, 2, 1, 6)
    sel = cdask.facility_location(X, k, labels=labels, client=client, partitions=parts, seed=366,
                                  optimizer="stochastic")
    picks = np.asarray(sel.indices).tolist()
    assert len(picks) == k and len(set(picks)) == k, sel.plan
    assert float(np.asarray(sel.weights).sum()) == n
