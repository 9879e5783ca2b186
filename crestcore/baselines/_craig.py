"""CRAIG (Mirzasoleiman, Bilmes, Leskovec, ICML 2020): per-class facility location on gradients."""

from __future__ import annotations

from .._compat import namespace
from .._validation import check_float_matrix, check_int, labels_to_host
from ..facility import Selection, facility_location


def craig(
    gradients,
    labels,
    k,
    *,
    metric: str = "euclidean",
    kernel: str = "max-minus",
    optimizer: str = "lazy",
    epsilon: float = 0.1,
    rng=None,
    scale: float | None = None,
    max_dense_bytes: int | None = None,
    backend: str = "auto",
    class_budgets=None,
) -> Selection:
    """CRAIG's coreset of the whole training set: per-class facility location, cluster-size weights.

    CRAIG picks, within each class, the examples whose (last-layer) gradients best cover the others':
    it maximises ``F(S) = sum_i max_{j in S} (max D - D_ij)`` with ``D`` the euclidean distance between
    gradients, which minimises an upper bound on the error of the weighted subset gradient
    ``sum_{j in S} w_j g_j`` against the full gradient ``sum_i g_i``; the weight of a pick is the number
    of examples of its class closest to it. It is reselected every R epochs (see
    :func:`crestcore.baselines.reselect_due`) on gradients computed at the current model.

    This is exactly :func:`crestcore.facility_location` on ``gradients`` with ``labels`` (same picks,
    weights, gains and objective): class c gets the Hamilton share of ``k`` proportional to its size,
    and a class larger than ``max_dense_bytes`` allows (``n_c^2 * itemsize`` bytes) is solved by the
    matrix-free path, which computes similarities in tiles and never forms the ``n_c x n_c`` matrix.

    Parameters
    ----------
    gradients : (n, d) real floating array: per-example gradient features, e.g.
        :func:`crestcore.last_layer_gradients` of the whole training set at the current model.
    labels : (n,) integer array in the same namespace (one problem per class), or None (one problem).
    k : budget, ``1 <= k <= n``. With ``k >= #classes`` every class gets a pick and the weights of
        class c sum to its size (all weights sum to n).
    metric, kernel, optimizer, epsilon, rng, scale, max_dense_bytes, backend, class_budgets : as for
        :func:`crestcore.facility_location` (CRAIG's choices are the defaults: euclidean distances and the
        ``max-minus`` kernel; ``rng`` is needed by ``optimizer="stochastic"`` only).

    Returns
    -------
    Selection in the namespace, device and dtype of ``gradients``: picks per class (ascending label),
    each class in greedy order; ``weights`` cluster sizes; ``gains`` the facility-location marginal gain
    of each pick; ``objective`` F summed over the classes.

    Examples
    --------
    A tiny 2-class gradient matrix: in each class three gradients lie close together and one lies
    apart. With two picks per class CRAIG takes a centre of the cluster and the outlier, weighted by
    the examples each one covers:

    >>> import numpy as np
    >>> from crestcore.baselines import craig
    >>> G = np.array([[1.0, 0.0], [1.0, 0.2], [0.8, 0.0], [0.2, 0.6],    # class 0
    ...               [0.0, 1.0], [0.2, 1.0], [0.0, 0.8], [0.6, 0.2]])   # class 1
    >>> y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    >>> sel = craig(G, y, 4)
    >>> sel.indices, sel.weights
    (array([2, 3, 6, 7]), array([3., 1., 3., 1.]))
    >>> float(sel.weights.sum())  # the weights of each class sum to its size
    8.0
    >>> np.round(sel.gains, 4), round(float(sel.objective), 4)
    (array([2.6686, 0.8485, 2.6686, 0.8485]), 7.0343)
    """
    xp = namespace(gradients, labels, names=("gradients", "labels"))
    check_float_matrix(xp, gradients, "gradients")
    n = gradients.shape[0]
    k = check_int(k, "k", low=1, high=n)
    if labels is not None:
        labels_to_host(xp, labels, n)  # shape/dtype errors name `labels`
    return facility_location(
        gradients, k, labels=labels, metric=metric, kernel=kernel, optimizer=optimizer,
        epsilon=epsilon, rng=rng, scale=scale, max_dense_bytes=max_dense_bytes, backend=backend,
        class_budgets=class_budgets,
    )
