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
