"""GradMatch's NNLS keeps a small but representable gradient (its rounding level is 1e-12 of the
Gram scale)."""
import numpy as np

from crestcore.baselines import gradmatch


def test_a_small_but_representable_gradient_keeps_its_weight():
    G = np.array([[1.0, 0.0], [0.0, 1e-5]])
    sel = gradmatch(G, 2, lam=0.0, positive=True)
    idx, w = np.asarray(sel.indices), np.asarray(sel.weights)
    got = dict(zip(idx.tolist(), w.tolist()))
    assert sorted(got) == [0, 1], got
    np.testing.assert_allclose([got[0], got[1]], [1.0, 1.0], rtol=1e-6)



def test_a_big_atom_refused_by_the_refits_tolerance_leaves_the_smaller_ones_to_try():
    """A best candidate that retires at once is not always at rounding level: the refit's tolerance scales
    with the candidate's own squared norm, so an atom of norm 1e6 with a real correlation is refused, and an
    atom of norm 1 after it still explains the rest (review 73: an early stop on the first retirement, tried
    for tol=0's cost, returned a residual of 1e-7 here and was withdrawn)."""
    A = np.array([[1.0, 0.0], [0.0, 1e6], [0.0, 1.0]])
    b = np.array([1.0, 1e-7])
    sel = gradmatch(A, 3, lam=0.0, tol=0.0, target=b)
    r = b - (np.asarray(sel.weights)[:, None] * A[np.asarray(sel.indices)]).sum(axis=0)
    assert sorted(np.asarray(sel.indices).tolist()) == [0, 2] and float(np.linalg.norm(r)) < 1e-15
