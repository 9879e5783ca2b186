"""Random: a uniform random subset of the budget, redrawn each epoch."""

from __future__ import annotations

import numpy as np

from .._compat import device_of
from .._validation import check_int, isdtype
from ._common import epoch_rng, host_selection, resolve_xp


def random_subset(n, k, *, rng, epoch=None, xp=None, device=None, dtype=None):
    """A uniform random subset of ``k`` of the ``n`` examples, each weighted ``n / k``.

    Parameters
    ----------
    n : number of examples (int >= 1).
    k : budget, ``1 <= k <= n``.
    rng : int seed or ``numpy.random.Generator``: the only source of randomness.
    epoch : optional int >= 0. With an int seed, the subset of epoch e depends on ``(rng, e)`` alone
        (``numpy.random.default_rng([seed, e])``): pass the epoch to redraw every epoch reproducibly.
        Without it an int seed gives the same subset on every call. A Generator is used as is (each call
        advances it), and ``epoch`` then does not enter the draw.
    xp : array namespace module of the result (``numpy`` by default, ``torch``, ``array_api_strict``...).
    device : device of the result in ``xp`` (default: the library's default device).
    dtype : floating dtype of the weights/gains/objective (default: the library's default float).

    Returns
    -------
    Selection: ``indices`` (k,) int64 (int32 on JAX without x64) sorted ascending, drawn uniformly without replacement (every
    k-subset equally likely); ``weights`` all ``n / k`` (so the weighted sum over the subset is an
    unbiased estimate of the full-data sum); ``gains`` all 0 and ``objective`` 0 (nothing is optimised).

    Examples
    --------
    Four of ten examples, each standing for ``n / k = 2.5`` of them; an int seed with the epoch redraws
    every epoch reproducibly:

    >>> from crestcore.baselines import random_subset
    >>> sel = random_subset(10, 4, rng=0, epoch=0)
    >>> sel.indices, sel.weights
    (array([2, 4, 5, 7]), array([2.5, 2.5, 2.5, 2.5]))
    >>> float(sel.weights.sum())  # n
    10.0
    >>> random_subset(10, 4, rng=0, epoch=1).indices  # the next epoch's subset
    array([3, 5, 7, 8])
    >>> random_subset(10, 4, rng=0, epoch=0).indices  # epoch 0 again: the same draw
    array([2, 4, 5, 7])
    """
    n = check_int(n, "n", low=1)
    k = check_int(k, "k", low=1, high=n)
    if epoch is not None:
        epoch = check_int(epoch, "epoch", low=0)
    gen = epoch_rng(rng, epoch)
    ns, probe = resolve_xp(xp, device)
    dev = device_of(probe)
    if dtype is None:
        dtype = ns.asarray(0.0, device=dev).dtype
    else:
        try:
            floating = isdtype(ns, dtype, "real floating")
        except (TypeError, AttributeError, ValueError):  # a string such as "float32" is no dtype object
            floating = False
        if not floating:
            raise TypeError(f"dtype must be a real floating dtype of the array library (e.g. xp.float32), "
                            f"got {dtype!r}")
    idx = np.sort(gen.choice(n, size=k, replace=False)).astype(np.int64)
    return host_selection(ns, dev, dtype, idx, np.full(k, n / k), np.zeros(k), 0.0)
