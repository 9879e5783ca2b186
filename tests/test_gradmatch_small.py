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


def test_an_exact_fit_with_tol_0_stops_instead_of_trying_every_atom(monkeypatch):
    """tol=0 after an exact fit (d < k): every remaining atom still correlates positively at rounding level,
    and each was picked, refit to weight 0 and retired, one correlation pass over all n each (review 70: 4000
    tries, O(n^2 d), for the same 10 picks). A best candidate that retires at once with the fit unchanged
    ends the loop: in exact arithmetic a positive correlation always earns a positive weight."""
    import crestcore.baselines._gradmatch as gm

    refits = [0]
    real = gm._gram_nnls

    def counted(*a, **kw):
        refits[0] += 1
        return real(*a, **kw)

    monkeypatch.setattr(gm, "_gram_nnls", counted)
    G = np.random.default_rng(0).normal(size=(2000, 10)) + 0.3
    exact = gradmatch(G, 100, lam=0.0, tol=0.0)
    assert refits[0] <= 12, refits[0]  # 10 picks, a retired try or two
    assert np.array_equal(np.sort(exact.indices), np.sort(gradmatch(G, 100, lam=0.0).indices))
