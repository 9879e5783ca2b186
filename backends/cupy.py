"""CuPy kernels: the batched facility-location hot loops on CuPy arrays (GPU).

Same names, signatures and semantics as :mod:`crestcore._reference_kernels` (read its docstring for the
contract) and as :mod:`crestcore.backends.torch`: both run :mod:`crestcore.backends._device`'s program
(its docstring has the design: batched, no host sync in the greedy loop, "lazy" == "naive", memory caps,
sampling, ties). This module holds what is CuPy's own:

* :class:`_CupyOps`, CuPy's spelling of the operations the program needs: ``copyto(..., where=)``
  fills, fancy-indexed gathers and scatters, and a row-wise ``searchsorted`` made of one 1-D
  ``searchsorted`` over the row-offset cumulative counts of all problems (CuPy's is 1-D only);
* ``usable_for``: CuPy arrays on one device, floating ones float32/float64 (float16 goes to the
  reference); ``available_bytes``: the device's free memory.

Only array operations that CuPy and NumPy share with the same semantics are used, which lets the test
suite exercise this module's logic on the CPU with NumPy standing in for CuPy; the GPU tests run it for
real. Importing this module imports cupy (the dispatcher treats an ImportError as "not available").
"""

from __future__ import annotations

from . import _device
from .contract import missing_library

try:
    import cupy as cp
except ImportError as exc:  # the optional dependency: say which extra brings it
    raise missing_library("crestcore.backends.cupy", "CuPy", "cupy", exc) from exc

__all__ = ["usable_for", "similarity_batched", "greedy_batched", "assign_batched", "greedy_features",
           "facility_batched"]

_FLOATS = (cp.dtype(cp.float32), cp.dtype(cp.float64))


class _CupyOps(_device.Ops):
    """CuPy's spelling of the operations of :class:`crestcore.backends._device.Ops`: arrays are made on
    the current device (``device`` is None)."""

    xp = cp
    int64, bool_, float64 = cp.int64, cp.bool_, cp.float64

    def device(self, x):
        return None

    def on_gpu(self, x) -> bool:
        return True

    def zeros(self, shape, dtype, device):
        return cp.zeros(shape, dtype=dtype)

    def empty(self, shape, dtype, device):
        return cp.empty(shape, dtype=dtype)

    def full(self, shape, value, dtype, device):
        return cp.full(shape, value, dtype=dtype)

    def arange(self, start, stop, device):
        return cp.arange(start, stop)

    def astype(self, x, dtype=None, device=None):
        return x if dtype is None else x.astype(dtype, copy=False)

    def copy(self, x):
        return x.copy()

    def concat(self, parts, axis):
        return cp.concatenate(parts, axis=axis)

    def fill_where_(self, a, mask, value):
        cp.copyto(a, value, where=mask)

    def snap_(self, a, tol):
        cp.copyto(a, 0.0, where=a <= tol)

    def clamp_min_(self, a, low):
        return cp.maximum(a, low, out=a)

    def zero_diagonal_(self, D):
        ar = cp.arange(D.shape[-1])
        D[:, ar, ar] = 0.0

    def take(self, a, idx):
        return a[idx]

    def take_along_rows(self, a, idx):
        return a[cp.arange(a.shape[0])[:, None], idx]

    def put_along_rows_(self, a, idx, values):
        a[cp.arange(a.shape[0])[:, None], idx] = values

    def take_columns(self, S, idx):
        B, n, _ = S.shape
        return S[cp.arange(B)[:, None, None], cp.arange(n)[None, :, None], idx[:, None, :]]

    def count_rows(self, labels, K, dtype, where=None):
        member = labels[:, :, None] == cp.arange(K)[None, None, :]
        if where is not None:
            member &= where[:, :, None]
        return cp.sum(member, axis=1).astype(dtype)

    def searchsorted(self, a, v):
        if a.ndim == 1:
            return cp.searchsorted(a, v, side="left")
        (B, n), s = a.shape, v.shape[1]
        # one sorted 1-D sequence: row b's counts shifted by b * (n + 1) stay below row b + 1's
        rows = cp.arange(B, dtype=cp.int64)[:, None]
        flat = (a + rows * (n + 1)).reshape(-1)
        loc = cp.searchsorted(flat, (v + rows * (n + 1)).reshape(-1), side="left").reshape(B, s)
        return loc - rows * n  # local index; n when v exceeds the row's last count

    def top_k(self, x, k):
        top = cp.argsort(-x)[:k]
        return x[top], top


_OPS = _CupyOps()


def _device_key(a):
    dev = getattr(a, "device", None)
    return getattr(dev, "id", dev)


def _accepts(name: str, a) -> bool:
    """A CuPy array, float32/float64 or bool/integer."""
    if not isinstance(a, cp.ndarray):
        return False
    kind = a.dtype.kind
    return a.dtype in _FLOATS if kind == "f" else kind in ("b", "i", "u")


def available_bytes(x) -> int | None:
    """Free memory of the array's GPU (``cudaMemGetInfo`` on its device)."""
    with cp.cuda.Device(_device_key(x)):
        free, _ = cp.cuda.runtime.memGetInfo()
    return int(free)


def usable_for(name: str, *arrays) -> bool:
    """True when every non-None argument is a CuPy array on one device, floating ones float32/float64
    (float16 goes to the reference), the others bool or integer.

    Examples
    --------
    >>> import cupy as cp, numpy as np
    >>> X = cp.zeros((1, 3, 2))
    >>> usable_for("similarity_batched", X, cp.ones((1, 3), dtype=bool))
    True
    >>> usable_for("similarity_batched", X.astype(cp.float16)), usable_for("similarity_batched", np.zeros((1, 3, 2)))
    (False, False)
    >>> usable_for("sparse_greedy", X)  # not a kernel of this module
    False
    """
    return _device.usable_for(name, arrays, _accepts, _device_key, lambda a: a.dtype.kind == "f")


def similarity_batched(X, valid, metric: str, kernel: str, scale: float):
    """Dense similarities (B, n, n) of B padded problems; see the reference for the contract.

    Examples
    --------
    >>> import cupy as cp
    >>> from crestcore import _reference_kernels as ref
    >>> from crestcore.backends._examples import two_problems
    >>> X, valid, _ = two_problems(cp)
    >>> S = similarity_batched(X, valid, "euclidean", "max-minus", 1.0)
    >>> bool(cp.allclose(S, ref.similarity_batched(X, valid, "euclidean", "max-minus", 1.0)))
    True
    """
    return _device.similarity_batched(_OPS, X, valid, metric, kernel, scale)


def greedy_batched(S, valid, budgets, optimizer, u=None):
    """Facility-location greedy on B dense problems at once -> (indices (B, K) int64, gains (B, K)).

    ``K = max(budgets)`` is read once before the loop; the loop never syncs with the host.

    Examples
    --------
    >>> import cupy as cp
    >>> from crestcore.backends._examples import two_problems
    >>> X, valid, budgets = two_problems(cp)
    >>> idx, gains = greedy_batched(similarity_batched(X, valid, "euclidean", "max-minus", 1.0), valid,
    ...                             budgets, "lazy")
    >>> idx.tolist(), gains.tolist()
    ([[1, 3], [0, -1]], [[29.0, 9.0], [5.0, 0.0]])
    """
    return _device.greedy_batched(_OPS, S, valid, budgets, optimizer, u)


def assign_batched(S, valid, indices):
    """Cluster-size weights (B, K) and objectives (B,) of the picks ``indices`` (-1 = no pick).

    Examples
    --------
    >>> import cupy as cp
    >>> S = cp.asarray([[[2.0, 1.0, 0.0], [1.0, 2.0, 1.0], [0.0, 1.0, 2.0]]])
    >>> weights, objective = assign_batched(S, cp.ones((1, 3), dtype=bool), cp.asarray([[0, 2]]))
    >>> weights.tolist(), objective.tolist()
    ([[2.0, 1.0]], [5.0])
    """
    return _device.assign_batched(_OPS, S, valid, indices)


def greedy_features(X, k, metric, kernel, scale, optimizer, u=None, tile=2048):
    """Greedy on one problem of n points given by features X (n, d), in tiles; never n x n.

    Returns (indices (k,) int64, gains (k,), weights (k,), objective 0-d), in X's dtype.

    Examples
    --------
    >>> import cupy as cp
    >>> idx, gains, weights, objective = greedy_features(cp.asarray([[0.0], [1.0], [2.0], [10.0]]), 2,
    ...                                                  "euclidean", "max-minus", 1.0, "lazy")
    >>> idx.tolist(), weights.tolist(), float(objective)
    ([1, 3], [3.0, 1.0], 38.0)
    """
    return _device.greedy_features(_OPS, X, k, metric, kernel, scale, optimizer, u, tile)


def facility_batched(X, valid, budgets, metric, kernel, scale, optimizer, u=None):
    """``similarity_batched``, then ``greedy_batched``, then ``assign_batched`` (as in the torch module).

    Examples
    --------
    >>> import cupy as cp
    >>> from crestcore.backends._examples import two_problems
    >>> idx, gains, weights, objective = facility_batched(*two_problems(cp), "euclidean", "max-minus", 1.0,
    ...                                                   "lazy")
    >>> objective.tolist()
    [38.0, 5.0]
    """
    S = similarity_batched(X, valid, metric, kernel, scale)
    # S is exactly symmetric by construction: the greedy reads candidates as rows, no check
    idx, gains = _device.greedy_batched(_OPS, S, valid, budgets, optimizer, u, symmetric=True)
    weights, objective = assign_batched(S, valid, idx)
    return idx, gains, weights, objective
