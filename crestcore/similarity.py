"""Pairwise distances and similarity kernels (generic array-API reference).

Facility location needs non-negative similarities ``s_ij``. They are built from a distance ``D`` with
one of two kernels:

* ``"max-minus"`` (CRAIG, and the paper's (SCS) objective): ``s_ij = max(D) - D_ij``, the maximum taken
  over the pairs of one problem (one class, one random subset, ...);
* ``"exp"`` (the CREST release): ``s_ij = exp(-D_ij / scale)``, ``scale`` defaulting to the number of
  features (the release divides by the number of classes, which is its feature dimension).

Distances (``metric``): ``"euclidean"``, ``"sqeuclidean"`` and ``"cosine"`` (``1 - cos``, a zero vector
has cosine similarity 0 with everything). The diagonal of a distance matrix is exactly 0.

The batched functions work on ``B`` problems padded to a common size ``n``: ``valid`` (B, n) marks real
points; padded rows and columns of the similarity are exactly 0, so they add nothing to any objective.
"""

from __future__ import annotations

import math

from ._compat import namespace

METRICS = ("euclidean", "sqeuclidean", "cosine")
KERNELS = ("max-minus", "exp")

__all__ = ["METRICS", "KERNELS", "pairwise_distances", "similarity_batched", "kernel_scale"]


def kernel_scale(scale, n_features: int) -> float:
    """The ``exp`` kernel's length scale: ``scale`` if given, else the number of features."""
    if scale is None:
        return float(max(n_features, 1))
    s = float(scale)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return s


def _sqnorms(xp, X):
    return xp.sum(X * X, axis=-1)


def pairwise_distances(X, Y=None, *, metric: str = "euclidean"):
    """Distances between the rows of ``X`` (..., n, d) and ``Y`` (..., m, d): shape (..., n, m).

    Leading batch dimensions broadcast. With ``Y`` omitted the diagonal is exactly zero.
    """
    xp = namespace(X, Y, names=("X", "Y"))
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    for name, A in (("X", X), ("Y", Y)):
        if A is None:
            continue
        if A.ndim < 2:
            raise ValueError(f"{name} must be at least 2-D (..., n, d), got shape {tuple(A.shape)}")
        if not xp.isdtype(A.dtype, "real floating"):
            raise TypeError(f"{name} must have a real floating dtype, got {A.dtype}")
    same = Y is None
    Y = X if same else Y
    if X.shape[-1] != Y.shape[-1]:
        raise ValueError(f"X has {X.shape[-1]} features but Y has {Y.shape[-1]}")
    # The Gram-matrix forms below lose up to a few ulps of (|x|^2 + |y|^2) to cancellation; values
    # within that rounding error of 0 are set to exactly 0, so identical points are at distance 0.
    tol = 8.0 * float(xp.finfo(X.dtype).eps)
    if metric == "cosine":
        nx = xp.sqrt(_sqnorms(xp, X))
        ny = xp.sqrt(_sqnorms(xp, Y))
        nx = xp.where(nx > 0, nx, xp.ones_like(nx))
        ny = xp.where(ny > 0, ny, xp.ones_like(ny))
        cos = xp.matmul(X / nx[..., None], xp.matrix_transpose(Y / ny[..., None]))
        D = xp.clip(1.0 - cos, 0.0, 2.0)
        D = xp.where(D <= tol, xp.zeros_like(D), D)
    else:
        G = xp.matmul(X, xp.matrix_transpose(Y))
        sx, sy = _sqnorms(xp, X)[..., :, None], _sqnorms(xp, Y)[..., None, :]
        D = sx + sy - 2.0 * G
        D = xp.where(D <= tol * (sx + sy), xp.zeros_like(D), D)
        if metric == "euclidean":
            D = xp.sqrt(D)
    if same:
        n = X.shape[-2]
        eye = xp.eye(n, dtype=xp.bool, device=_dev(X))
        D = xp.where(eye, xp.zeros_like(D), D)
    return D


def _dev(x):
    from ._compat import device_of

    return device_of(x)


def similarity_batched(X, valid, metric: str, kernel: str, scale: float):
    """Dense similarities of ``B`` padded problems.

    Parameters
    ----------
    X : (B, n, d) floating array (padded rows may hold anything finite).
    valid : (B, n) bool array.
    metric, kernel : see the module docstring.
    scale : the ``exp`` kernel's length scale (ignored by ``max-minus``).

    Returns
    -------
    S : (B, n, n) array of X's dtype, ``S[b, i, j]`` the similarity of ground point ``i`` to candidate
        ``j``; 0 wherever ``i`` or ``j`` is padding.
    """
    xp = namespace(X, valid, names=("X", "valid"))
    D = pairwise_distances(X, metric=metric)
    pair = valid[:, :, None] & valid[:, None, :]
    zero = xp.zeros_like(D)
    if kernel == "max-minus":
        M = xp.max(xp.where(pair, D, zero), axis=(1, 2))
        S = M[:, None, None] - D
    elif kernel == "exp":
        S = xp.exp(-D / scale)
    else:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return xp.where(pair, S, zero)
