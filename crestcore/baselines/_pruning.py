"""Loss-based dynamic pruning in the style of InfoBatch (Qin et al., ICLR 2024), as a pure function."""

from __future__ import annotations

import math

import numpy as np

from .._compat import detached, device_of, from_numpy, index_dtype, namespace, to_numpy
from .._validation import check_int
from ..facility import Selection
from ..similarity import prepare, restore
from ._common import check_real, check_vector, epoch_rng


def prune_schedule(losses, *, ratio: float = 0.5, epoch, epochs, anneal: float = 0.875, rng) -> Selection:
    """This epoch's kept examples and weights: prune part of the well-learned ones, rescale the rest.

    An example is *well learned* when its latest loss is strictly below the mean loss (by more than two
    units in the last place of the mean, which is computed from a correctly rounded sum, so that no loss
    at or above the exact mean counts). While pruning is
    on, ``n_keep = ceil((1 - ratio) * n_low)`` of the ``n_low`` well-learned examples are kept, drawn
    uniformly without replacement, and each kept one is weighted ``n_low / n_keep`` (= ``1 / (1 -
    ratio)`` when ``(1 - ratio) n_low`` is an integer; the exact inverse of its inclusion probability
    otherwise). Every other example is kept with weight 1. So the weighted sum over the kept examples
    of any per-example quantity (loss, gradient) is an unbiased estimate of its full-data sum, and
    no example at or above the mean is ever pruned.

    Annealing: pruning is on for epochs ``epoch < anneal * epochs`` (0-based) and off afterwards, when
    every example is kept with weight 1 (InfoBatch's delta, default 0.875: the last 12.5% of the epochs
    train on the full data). ``anneal=1`` never switches it off, ``anneal=0`` never prunes.

    Nothing global is touched: no DataLoader patching, no global RNG. The caller feeds the returned
    indices to its loader, multiplies each example's loss by its weight, and writes the new losses of
    the examples it trained on back into its own ``losses`` array for the next epoch (pruned examples
    keep their old loss). Examples with no loss yet should carry a value at or above the others (e.g.
    the maximum), so they are never pruned; all-equal losses prune nothing.

    Parameters
    ----------
    losses : (n,) finite real floating array, the latest per-example loss (any array-API library).
    ratio : fraction of the well-learned examples pruned, in [0, 1).
    epoch : this epoch, ``0 <= epoch < epochs``.
    epochs : total number of epochs (>= 1).
    anneal : fraction of the epochs with pruning, in [0, 1].
    rng : int seed or ``numpy.random.Generator``: the only source of randomness. An int seed is combined
        with ``epoch`` (``numpy.random.default_rng([seed, epoch])``), so every epoch draws afresh and any
        epoch is reproducible on its own; a Generator is used as is.

    Returns
    -------
    Selection in the namespace, device and dtype of ``losses``: ``indices`` the kept examples ascending
    (int64); ``weights`` 1 or ``n_low / n_keep``; ``gains`` the kept examples' losses (the score the rule
    used); ``objective`` the threshold, the mean loss.

    Examples
    --------
    Six losses with mean about 0.61: four are well learned (below the mean) and half of them are
    pruned; the two kept ones count twice, and the two above the mean are always kept:

    >>> import numpy as np
    >>> from crestcore.baselines import prune_schedule
    >>> losses = np.array([0.1, 0.2, 0.3, 1.0, 2.0, 0.05])
    >>> sel = prune_schedule(losses, ratio=0.5, epoch=0, epochs=8, rng=0)
    >>> sel.indices, sel.weights
    (array([2, 3, 4, 5]), array([2., 1., 1., 2.]))
    >>> round(float(sel.objective), 4), float(sel.weights.sum())  # the mean loss; n = 6
    (0.6083, 6.0)

    The last 12.5 % of the epochs (``anneal=0.875``) train on everything, unweighted:

    >>> last = prune_schedule(losses, ratio=0.5, epoch=7, epochs=8, rng=0)
    >>> last.indices, last.weights
    (array([0, 1, 2, 3, 4, 5]), array([1., 1., 1., 1., 1., 1.]))
    """
    losses = detached(losses)
    xp = namespace(losses, names=("losses",))
    check_vector(xp, losses, "losses")
    n = losses.shape[0]
    ratio = check_real(ratio, "ratio", low=0.0, high=1.0, high_open=True)
    epochs = check_int(epochs, "epochs", low=1)
    epoch = check_int(epoch, "epoch", low=0, high=epochs - 1)
    anneal = check_real(anneal, "anneal", low=0.0, high=1.0)
    gen = epoch_rng(rng, epoch)
    dev = device_of(losses)

    # numerics policy (docs/selection.md): the mean is taken in >= float32 on losses divided by a power
    # of two when huge (or tiny) losses would overflow (underflow) it; the comparison with the mean is
    # unchanged by that exact scaling, and the mean (at most the largest loss) always fits back
    lc, _, _, e = prepare(xp, losses, metric="euclidean", kernel=None, scale=1.0)
    mean_c = xp.mean(lc)
    # "below the mean" on the host in float64 (exact for every input dtype): the mean from the correctly
    # rounded sum (math.fsum) is within about an ulp of the exact one, and a loss counts as below it only
    # by more than two ulps of it, so no loss at or above the exact mean is ever pruned, equal losses
    # included. (Losses minus the largest one, as before, round when a loss is below half the largest:
    # 1.1 of [1.1, 1.8, 0.4], above the exact mean, was pruned.)
    host = np.asarray(to_numpy(lc), dtype=np.float64)
    mean_h = math.fsum(host.tolist()) / n
    low = host < mean_h - 2.0 * float(np.spacing(abs(mean_h)))
    mean = restore(xp, mean_c, e, losses.dtype, "mean loss")
    weights = np.ones(n)
    keep = np.ones(n, dtype=bool)
    # half-open in exact arithmetic: 0.55 * 100 is 55.00000000000001 in binary, and epoch 55 is already off
    active = epoch < anneal * epochs - 1e-9 * max(1.0, anneal * epochs)
    low_idx = np.flatnonzero(low)
    if active and ratio > 0.0 and low_idx.size:
        n_low = low_idx.size
        n_keep = min(n_low, max(1, math.ceil((1.0 - ratio) * n_low - 1e-9)))
        kept_low = gen.choice(low_idx, size=n_keep, replace=False)
        keep[low_idx] = False
        keep[kept_low] = True
        weights[kept_low] = n_low / n_keep
    idx = np.flatnonzero(keep).astype(np.int64)
    idx_d = from_numpy(idx, xp, dev)
    return Selection(
        indices=xp.astype(idx_d, index_dtype(xp)),
        weights=restore(xp, from_numpy(weights[idx], xp, dev), 0, losses.dtype, "weights"),
        gains=xp.take(losses, idx_d, axis=0),
        objective=xp.asarray(mean),
    )
