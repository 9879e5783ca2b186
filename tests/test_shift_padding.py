"""The exact shift of far-from-zero features over a padded problem's valid rows only (padded rows gather
example 0, which may lie far from a class's cloud), and integer data keeping its dtype."""
import numpy as np
import pytest

import crestcore


@pytest.mark.parametrize("case", ["torch-minibatch", "torch-facility"])
def test_a_far_class_padded_with_a_near_example_selects_as_at_the_origin(case):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    near = rng.normal(size=(300, 6)).astype(np.float32)  # class 0 at the origin, example 0 among them
    far = (100.0 + 0.01 * rng.normal(size=(100, 6))).astype(np.float32)  # class 1: fewer rows, padded
    y = np.r_[np.zeros(300, np.int64), np.ones(100, np.int64)]
    X_far = np.concatenate([near, far])
    X_base = np.concatenate([near, far - np.float32(100.0)])  # class 1 translated exactly (Sterbenz)
    assert np.array_equal(X_base[300:] + np.float32(100.0), far)

    def run(X):
        if case == "torch-minibatch":
            c = crestcore.minibatch_coresets(torch.from_numpy(X), torch.from_numpy(y), m=16, r=200, P=2, rng=0)
            return np.concatenate([c.indices.numpy().ravel(), c.weights.numpy().ravel()])
        sel = crestcore.facility_location(torch.from_numpy(X), 24, labels=torch.from_numpy(y))
        return np.concatenate([np.asarray(sel.indices, np.float64), np.asarray(sel.weights, np.float64)])

    np.testing.assert_array_equal(run(X_far), run(X_base))


def test_the_shift_of_integer_arrays_keeps_their_dtype():
    """contract.exact_shift: 'integer data stays integer'; the existing test compares tolist() values,
    which a float64 shift passes (1000.0 == 1000)."""
    torch = pytest.importorskip("torch")
    from array_api_compat import array_namespace

    from crestcore.backends import exact_shift

    X = np.array([[1000, 5], [1003, 5], [999, 7]], dtype=np.int64)
    s = exact_shift(np, X)
    assert s.dtype == np.int64 and (X - s).dtype == np.int64
    assert exact_shift(np, X.astype(np.int32)).dtype == np.int32
    t = torch.from_numpy(X)
    assert exact_shift(array_namespace(t), t).dtype == torch.int64
