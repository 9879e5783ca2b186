"""Agreement with the facility-location implementations people already use.

Both peers maximise the same objective on the same similarity matrix:

* apricot-select ``FacilityLocationSelection(metric="euclidean")`` builds ``max(D^2) - D^2`` from squared
  Euclidean distances (apricot/utils.py, ``_calculate_pairwise_distances``: ``squared=True``, then
  ``X_pairwise.max() - X_pairwise``), i.e. crestcore's ``metric="sqeuclidean", kernel="max-minus"``;
* submodlib's ``FacilityLocationFunction(mode="dense", sijs=S)`` takes the matrix itself
  (crestcore's ``metric="precomputed"``); it stores the kernel in float32.
"""

from __future__ import annotations

import numpy as np
import pytest

import crestcore
import reference as R

N, D, K = 300, 5, 30


@pytest.fixture(scope="module")
def instance():
    X = np.random.default_rng(2023).normal(size=(N, D))
    diff = X[:, None, :] - X[None, :, :]
    D2 = np.sum(diff * diff, axis=-1)  # squared distances by differences, not by crestcore
    S = D2.max() - D2
    sel = crestcore.facility_location(X, K, metric="sqeuclidean", kernel="max-minus", optimizer="lazy")
    return X, S, sel


def test_crestcore_objective_on_the_shared_matrix(instance):
    X, S, sel = instance
    assert float(sel.objective) == pytest.approx(R.objective(S, np.asarray(sel.indices)), rel=1e-10)
    pre = crestcore.facility_location(S, K, metric="precomputed", kernel=None)
    np.testing.assert_array_equal(np.asarray(pre.indices), np.asarray(sel.indices))


@pytest.mark.parametrize("optimizer", ["lazy", "naive"])
def test_apricot_facility_location(instance, optimizer):
    apricot = pytest.importorskip("apricot", reason="apricot-select is not installed (pip install apricot-select)")
    X, S, sel = instance
    model = apricot.FacilityLocationSelection(K, metric="euclidean", optimizer=optimizer, verbose=False).fit(X)
    ranking = np.asarray(model.ranking, dtype=np.int64)
    theirs = R.objective(S, ranking)
    assert float(np.sum(model.gains)) == pytest.approx(theirs, rel=1e-9)
    assert float(sel.objective) == pytest.approx(theirs, rel=1e-9)
    np.testing.assert_array_equal(np.asarray(sel.indices), ranking)  # random data: no ties
    np.testing.assert_allclose(np.asarray(sel.gains), np.asarray(model.gains), rtol=1e-8)


@pytest.mark.filterwarnings("ignore:Please import `csr_matrix`:DeprecationWarning")
def test_submodlib_facility_location(instance):
    submodlib = pytest.importorskip("submodlib", reason="submodlib-py is not installed (pip install submodlib-py)")
    X, S, sel = instance
    f = submodlib.FacilityLocationFunction(n=N, mode="dense", sijs=S, separate_rep=False)
    picks = f.maximize(budget=K, optimizer="LazyGreedy", stopIfZeroGain=False, stopIfNegativeGain=False,
                       verbose=False, show_progress=False)
    ranking = np.array([i for i, _ in picks], dtype=np.int64)
    theirs = R.objective(S, ranking)
    assert float(sel.objective) == pytest.approx(theirs, rel=1e-6)  # submodlib works in float32
    assert float(sel.objective) == pytest.approx(float(f.evaluate(set(ranking.tolist()))), rel=1e-6)
    np.testing.assert_array_equal(np.asarray(sel.indices), ranking)
