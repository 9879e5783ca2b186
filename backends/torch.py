"""PyTorch kernels (CPU and CUDA): the batched facility-location hot loops on torch tensors.

Same names, signatures and semantics as :mod:`crestcore._reference_kernels` (read its docstring for the
contract): ``similarity_batched``, ``greedy_batched``, ``assign_batched``, ``greedy_features``, plus the
dispatch check ``usable_for``. Everything stays on the input's device and in its dtype (indices int64).

Design choices
--------------
* **Batched, no host sync in the greedy loop.** ``greedy_batched`` reads ``K = max(budgets)`` once
  (one sync, before the loop) and then runs ``K`` steps of fixed-shape tensor ops over all ``B``
  problems: no ``.item()``, ``int()``/``bool()`` of a tensor, ``nonzero`` or ``masked_select``. On CUDA
  the whole loop is queued asynchronously (``tests/backends/test_torch.py`` checks this with
  ``torch.cuda.set_sync_debug_mode("error")``, and on CPU by running the loop on the ``meta`` device,
  where any host read fails).
* **"lazy" == "naive" by construction.** Every step computes the exact gains of every candidate of
  every problem: ``gains[b, j] = sum_i max(S[b, i, j] - cover[b, i], 0)``. At CREST sizes (``n`` of a
  few hundred per class, ``B = P x C`` problems) this dense batched computation is a handful of
  memory-bound kernels per step, cheaper than the data-dependent control flow of a lazy queue, and it
  makes the two optimizers return the same picks trivially. ``"lazy"`` is accepted and runs this.
* **Memory.** One work buffer ``(B, n, c)`` is reused across steps; ``c = n`` unless ``B * n * n``
  exceeds ``_MAX_TEMP_ELEMENTS``, in which case the gain computation is chunked over candidates (a
  static Python loop, still no sync). ``similarity_batched`` builds the ``(B, n, n)`` result in place
  (one matmul output plus one temporary), never a ``(B, n, n)`` boolean mask.
* **Stochastic greedy** samples exactly as the reference: positions ``floor(u * R)`` (computed in
  ``u``'s dtype, as the reference does) into the remaining candidates ordered by index. The candidate
  at position ``p`` is found with a batched ``searchsorted`` of ``p + 1`` in the cumulative count of
  remaining candidates (static shapes; positions ``>= R`` hit nothing, as in the reference).
* **Ties** go to the lowest index everywhere: ``torch.argmax`` returns the first maximum.
* **Autograd.** Selection is discrete, so ``greedy_batched``, ``assign_batched`` and
  ``greedy_features`` work on detached inputs under ``torch.no_grad()``. ``usable_for`` declines
  ``similarity_batched`` for inputs that require grad, so that the generic reference keeps the graph.
* ``greedy_features`` (one problem from its features, never ``n x n``) is a blocked lazy greedy on the
  device: upper bounds live on the device, a block of the best bounds is re-evaluated exactly, and the
  stopping test (the best exact gain beats every remaining bound, ties to the
  lower index) costs one host sync per block evaluation, usually one per step. ``"naive"`` and
  ``"stochastic"`` need no sync at all. Similarity blocks hold at most ``tile * n`` elements (what
  ``tile`` full rows take, the caller's memory budget; capped at ``_MAX_TEMP_ELEMENTS``), shaped to the
  candidates evaluated, so a lazy block of a few hundred columns is one or two tensor operations
  rather than ``n / tile`` of them. Unlike the reference, the maximum distance of ``"max-minus"`` is
  taken with the global diagonal at exactly 0 (as the dense path does); the two differ only when every
  off-diagonal distance is below the rounding noise of a self-distance (all-identical points).

Only this module imports torch.
"""

from __future__ import annotations

import math

import torch

from .contract import KERNEL_NAMES, KERNELS, METRICS, OPTIMIZERS, snap_tolerance

__all__ = ["usable_for", "similarity_batched", "greedy_batched", "assign_batched", "greedy_features",
           "facility_batched"]

_FLOATS = (torch.float32, torch.float64)
_DEVICE_TYPES = ("cpu", "cuda")


# Upper bound on the elements of one work buffer (gain chunks, similarity tiles): 2**25 elements is
# 128 MiB in float32 / 256 MiB in float64.
_MAX_TEMP_ELEMENTS = 1 << 25
# A work buffer beside a dense (B, n, n) similarity tensor holds at most this fraction of it (but at
# least _MIN_TEMP_ELEMENTS), so the peak memory of a batched solve stays close to the similarities' own.
_TEMP_FRACTION = 8
_MIN_TEMP_ELEMENTS = 1 << 16


def _temp_cap(total: int) -> int:
    """Elements of one work buffer beside a tensor of ``total`` elements: at most 1/_TEMP_FRACTION of it
    and _MAX_TEMP_ELEMENTS, at least _MIN_TEMP_ELEMENTS."""
    return min(_MAX_TEMP_ELEMENTS, max(total // _TEMP_FRACTION, _MIN_TEMP_ELEMENTS))


# --------------------------------------------------------------------------------------------------
# dispatch check
# --------------------------------------------------------------------------------------------------


def usable_for(name: str, *arrays) -> bool:
    """True when these kernel arguments are torch tensors this module handles.

    Every non-None argument must be a torch tensor on one CPU or CUDA device; floating tensors must be
    float32 or float64 (float16/bfloat16 go to the reference), the others bool or integer.
    ``similarity_batched`` is declined for inputs that require grad (the reference keeps the graph).

    Examples
    --------
    >>> import numpy as np, torch
    >>> S, valid, budgets = torch.zeros(1, 3, 3), torch.ones(1, 3, dtype=torch.bool), torch.tensor([2])
    >>> usable_for("greedy_batched", S, valid, budgets)
    True
    >>> usable_for("greedy_batched", S.half(), valid, budgets)  # float16: the reference
    False
    >>> usable_for("similarity_batched", torch.zeros(1, 3, 2, requires_grad=True), valid)
    False
    >>> usable_for("greedy_batched", np.zeros((1, 3, 3)), valid, budgets)  # NumPy: not this module's
    False
    """
    if name not in KERNEL_NAMES:
        return False
    present = [a for a in arrays if a is not None]
    if not present:
        return False
    device = None
    for a in present:
        if not isinstance(a, torch.Tensor):
            return False
        if a.device.type not in _DEVICE_TYPES:
            return False
        if device is None:
            device = a.device
        elif a.device != device:
            return False
        if a.is_complex():
            return False
        if a.is_floating_point():
            if a.dtype not in _FLOATS:
                return False
            if name in ("similarity_batched", "facility_batched") and a.requires_grad:
                return False
        elif a.dtype != torch.bool and a.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                       torch.uint8):
            return False
    # the main operand (S or X) must be floating
    return present[0].is_floating_point()


def available_bytes(x) -> int | None:
    """Free memory of a CUDA tensor's device (``torch.cuda.mem_get_info``); None for CPU tensors (the
    caller reads the host's)."""
    if isinstance(x, torch.Tensor) and x.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(x.device)
        return int(free)
    return None


def _check(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# similarities
# --------------------------------------------------------------------------------------------------


def _sqnorms(X):
    return torch.sum(X * X, dim=-1)


def _normalized(X):
    nx = torch.sqrt(_sqnorms(X))
    nx = torch.where(nx > 0, nx, torch.ones_like(nx))
    return X / nx[..., None]


def _distances_inplace(A, Bm, sqa, sqb, metric):
    """Distances between rows of A (..., p, d) and Bm (..., q, d) as a fresh tensor, with the formula
    and rounding of :func:`crestcore.similarity.pairwise_distances` (``sqa``/``sqb``: squared norms;
    for cosine ``A``/``Bm`` already normalized and the norms unused): values within ``8 eps`` (relative
    to ``|a|^2 + |b|^2``) of 0 are snapped to exactly 0, so identical points are at distance 0."""
    tol = snap_tolerance(torch.finfo(A.dtype).eps)  # the contract's zero-distance snap
    G = torch.matmul(A, Bm.transpose(-1, -2))
    if metric == "cosine":
        # clip(1 - cos, 0, 2), then D <= tol -> 0, in place on the matmul output
        G.neg_().add_(1.0).clamp_(0.0, 2.0)
        return torch.nn.functional.threshold_(G, tol, 0.0)
    # (a + b) - 2 G, rounded as the reference rounds it, in blocks of rows of the contiguous (L * p, q)
    # view, so that the (a + b) term and the snap mask are small work buffers and every op on G works in
    # place: never a second (..., p, q) tensor
    p, q = G.shape[-2], G.shape[-1]
    Gf = G.reshape(-1, q)
    L = Gf.shape[0] // max(1, p)
    sa, sb = sqa.reshape(-1), sqb.reshape(L, q)
    rows = max(1, min(Gf.shape[0], _temp_cap(Gf.numel()) // max(1, q)))
    for r0 in range(0, Gf.shape[0], rows):
        r1 = min(Gf.shape[0], r0 + rows)
        g = Gf[r0:r1]
        owner = torch.arange(r0, r1, device=G.device) // p  # the problem of each row
        T = sb.index_select(0, owner).add_(sa[r0:r1, None])  # b + a == a + b exactly
        g.mul_(-2.0).add_(T)  # T - 2 g: the doubling and the negation are exact, one rounded add
        T.mul_(tol)  # exact: tol is a power of 2
        g.masked_fill_(g <= T, 0.0)
        del T  # freed before the next block's is made
    if metric == "euclidean":
        G.sqrt_()
    return G


def similarity_batched(X, valid, metric: str, kernel: str, scale: float):
    """Dense similarities (B, n, n) of B padded problems; see the reference for the contract.

    Examples
    --------
    Two problems padded to four points: four points on a line, and two points (the last two rows are
    padding). With ``"max-minus"`` each problem's largest distance ``M`` (10, then 5) is on the diagonal:

    >>> import torch
    >>> from crestcore import _reference_kernels as ref
    >>> X = torch.tensor([[[0.0], [1.0], [2.0], [10.0]], [[0.0], [5.0], [0.0], [0.0]]], dtype=torch.float64)
    >>> valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    >>> budgets = torch.tensor([2, 1])
    >>> S = similarity_batched(X, valid, "euclidean", "max-minus", 1.0)
    >>> S[0].tolist()
    [[10.0, 9.0, 8.0, 0.0], [9.0, 10.0, 9.0, 1.0], [8.0, 9.0, 10.0, 2.0], [0.0, 1.0, 2.0, 10.0]]
    >>> S[1].tolist()
    [[5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    >>> torch.allclose(S, ref.similarity_batched(X, valid, "euclidean", "max-minus", 1.0))
    True
    """
    _check(metric, "metric", METRICS)
    _check(kernel, "kernel", KERNELS)
    valid = valid.to(dtype=torch.bool)
    Xn = _normalized(X) if metric == "cosine" else X
    sq = None if metric == "cosine" else _sqnorms(X)
    D = _distances_inplace(Xn, Xn, sq, sq, metric)
    D.diagonal(dim1=-2, dim2=-1).zero_()
    not_row = ~valid[:, :, None]
    not_col = ~valid[:, None, :]
    D.masked_fill_(not_row, 0.0)
    D.masked_fill_(not_col, 0.0)
    if kernel == "max-minus":
        M = torch.amax(D, dim=(1, 2)) if D.numel() else D.new_zeros(D.shape[:1])
        S = torch.sub(M[:, None, None], D, out=D)  # M - D
    else:
        S = torch.div(D, -scale, out=D).exp_()  # exp(-D / scale): D / -s == -(D / s) exactly
    S.masked_fill_(not_row, 0.0)
    S.masked_fill_(not_col, 0.0)
    return S


# --------------------------------------------------------------------------------------------------
# batched greedy
# --------------------------------------------------------------------------------------------------


def _gain_chunk(B: int, n: int) -> int:
    """Candidates per gain chunk: the (B, n, chunk) buffer is a small fraction of S (B, n, n)."""
    return max(1, min(n, _temp_cap(B * n * n) // max(1, B * n)))


def _dense_gains(S, cover, buf, chunk):
    """gains[b, j] = sum_i max(S[b, i, j] - cover[b, i], 0), chunked over candidates j."""
    n = S.shape[2]
    c_cover = cover[:, :, None]
    parts = []
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        blk = buf[:, :, : c1 - c0]
        torch.sub(S[:, :, c0:c1], c_cover, out=blk)
        blk.clamp_min_(0.0)
        parts.append(torch.sum(blk, dim=1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _stochastic_mask(remaining, u_t):
    """(B, n) bool: the remaining candidates at positions floor(u_t * R) (R = number remaining)."""
    B, n = remaining.shape
    R = torch.sum(remaining.to(u_t.dtype), dim=1)
    pos = torch.minimum(torch.floor(u_t * R[:, None]), R[:, None] - 1)  # in u's dtype, as the reference
    target = (pos.to(torch.int64) + 1).contiguous()
    cum = torch.cumsum(remaining.to(torch.int64), dim=1)
    loc = torch.searchsorted(cum, target)  # first j with cum[j] == pos + 1; n when pos >= R
    hit = torch.zeros((B, n + 1), dtype=torch.bool, device=remaining.device)
    hit.scatter_(1, loc, True)
    return hit[:, :n] & remaining


def greedy_batched(S, valid, budgets, optimizer, u=None):
    """Facility-location greedy on B dense problems at once -> (indices (B, K) int64, gains (B, K)).

    ``K = max(budgets)`` is read once before the loop; the loop itself never syncs with the host.
    ``"lazy"`` runs the same exact dense computation as ``"naive"`` (see the module docstring).

    Examples
    --------
    Budgets 2 and 1 on the similarities of :func:`similarity_batched`'s example: the middle point,
    then the outlier; the second problem's row is padded with -1. The picks are the reference's:

    >>> import torch
    >>> from crestcore import _reference_kernels as ref
    >>> X = torch.tensor([[[0.0], [1.0], [2.0], [10.0]], [[0.0], [5.0], [0.0], [0.0]]], dtype=torch.float64)
    >>> valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    >>> budgets = torch.tensor([2, 1])
    >>> S = similarity_batched(X, valid, "euclidean", "max-minus", 1.0)
    >>> idx, gains = greedy_batched(S, valid, budgets, "lazy")
    >>> idx.tolist(), gains.tolist()
    ([[1, 3], [0, -1]], [[29.0, 9.0], [5.0, 0.0]])
    >>> torch.equal(idx, ref.greedy_batched(S, valid, budgets, "lazy")[0])
    True
    """
    _check(optimizer, "optimizer", OPTIMIZERS)
    if optimizer == "stochastic" and u is None:
        raise ValueError("optimizer='stochastic' needs the uniform draws u (B, K, s)")
    B = S.shape[0]
    K = int(torch.max(budgets)) if B and budgets.numel() else 0
    return _greedy_loop(S, valid, budgets, K, optimizer, u)


@torch.no_grad()
def _greedy_loop(S, valid, budgets, K: int, optimizer: str, u=None):
    """The greedy loop for a known ``K`` (host int): fixed-shape device work only."""
    S = S.detach()
    B, n, _ = S.shape
    dev, dt = S.device, S.dtype
    if K <= 0 or B == 0:
        return (torch.zeros((B, max(K, 0)), dtype=torch.int64, device=dev),
                torch.zeros((B, max(K, 0)), dtype=dt, device=dev))
    budgets = budgets.to(device=dev)
    valid = valid.to(device=dev, dtype=torch.bool)
    cover = torch.zeros((B, n), dtype=dt, device=dev)
    remaining = valid.clone()
    neg_inf = torch.full((), -math.inf, dtype=dt, device=dev)
    minus_one = torch.full((), -1, dtype=torch.int64, device=dev)
    zero = torch.zeros((), dtype=dt, device=dev)
    chunk = _gain_chunk(B, n)
    buf = torch.empty((B, n, min(chunk, n)), dtype=dt, device=dev)
    idx_cols, gain_cols = [], []
    for t in range(K):
        gains = _dense_gains(S, cover, buf, chunk)
        cand = remaining
        if optimizer == "stochastic":
            cand = _stochastic_mask(remaining, u[:, t, :])
        j = torch.argmax(torch.where(cand, gains, neg_inf), dim=1)  # first maximum: lowest index
        active = budgets > t
        g = torch.gather(gains, 1, j[:, None])[:, 0]
        col = torch.gather(S, 2, j[:, None, None].expand(B, n, 1))[:, :, 0]  # S[b, :, j_b]
        cover = torch.where(active[:, None], torch.maximum(cover, col), cover)
        keep = torch.gather(remaining, 1, j[:, None]) & ~active[:, None]
        remaining.scatter_(1, j[:, None], keep)
        idx_cols.append(torch.where(active, j, minus_one))
        gain_cols.append(torch.where(active, g, zero))
    return torch.stack(idx_cols, dim=1), torch.stack(gain_cols, dim=1)


@torch.no_grad()
def assign_batched(S, valid, indices):
    """Cluster-size weights (B, K) and objectives (B,) of the picks ``indices`` (-1 = no pick).

    Examples
    --------
    The picks of :func:`greedy_batched`'s example: three points go to pick 1, the outlier to itself:

    >>> import torch
    >>> from crestcore import _reference_kernels as ref
    >>> X = torch.tensor([[[0.0], [1.0], [2.0], [10.0]], [[0.0], [5.0], [0.0], [0.0]]], dtype=torch.float64)
    >>> valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    >>> budgets = torch.tensor([2, 1])
    >>> S = similarity_batched(X, valid, "euclidean", "max-minus", 1.0)
    >>> idx = torch.tensor([[1, 3], [0, -1]])
    >>> weights, objective = assign_batched(S, valid, idx)
    >>> weights.tolist(), objective.tolist()
    ([[3.0, 1.0], [2.0, 0.0]], [38.0, 5.0])
    >>> torch.equal(weights, ref.assign_batched(S, valid, idx)[0])
    True
    """
    S = S.detach()
    B, n, _ = S.shape
    K = indices.shape[1]
    dev, dt = S.device, S.dtype
    if K == 0:
        return torch.zeros((B, 0), dtype=dt, device=dev), torch.zeros((B,), dtype=dt, device=dev)
    indices = indices.to(device=dev, dtype=torch.int64)
    valid = valid.to(device=dev, dtype=torch.bool)
    real = indices >= 0
    safe = indices.clamp_min(0)
    sims = torch.gather(S, 2, safe[:, None, :].expand(B, n, K))  # (B, n, K): S[b, i, pick_t]
    sims.masked_fill_(~real[:, None, :], -math.inf)
    a = torch.argmax(sims, dim=2)  # earliest pick on ties
    best = torch.amax(sims, dim=2)
    counted = valid & torch.any(real, dim=1)[:, None]
    weights = torch.zeros((B, K), dtype=dt, device=dev)
    weights.scatter_add_(1, a, counted.to(dt))
    objective = torch.sum(torch.where(counted, best, torch.zeros((), dtype=dt, device=dev)), dim=1)
    return weights, objective


# --------------------------------------------------------------------------------------------------
# matrix-free path: one problem from its features
# --------------------------------------------------------------------------------------------------


class _Features:
    """Similarity tiles of one problem (n, d), computed on demand, never n x n."""

    def __init__(self, X, metric, kernel, scale, tile):
        self.n = X.shape[0]
        self.metric, self.kernel, self.scale = metric, kernel, float(scale)
        self.tile = max(1, int(tile))
        # elements of one similarity block: what ``tile`` full rows would take, capped
        self.budget = max(1, min(_MAX_TEMP_ELEMENTS, self.tile * max(self.n, 1)))
        self.dev, self.dt = X.device, X.dtype
        self.X = _normalized(X) if metric == "cosine" else X
        self.sq = None if metric == "cosine" else _sqnorms(X)
        self.ar = torch.arange(self.n, device=self.dev)
        self.M = self._max_distance() if kernel == "max-minus" else None

    def _row_chunk(self, ncols: int) -> int:
        return max(1, min(self.n, self.budget // max(1, ncols)))

    def distances(self, r0: int, r1: int, cols):
        """D (r1 - r0, len(cols)) with exact zeros where the global row index equals the column."""
        Xc = self.X.index_select(0, cols)
        sqc = None if self.sq is None else self.sq.index_select(0, cols)
        sqr = None if self.sq is None else self.sq[r0:r1]
        D = _distances_inplace(self.X[r0:r1], Xc, sqr, sqc, self.metric)
        # the global diagonal: column c holds point cols[c], on row cols[c] - r0 when that is in range
        ri = cols - r0
        inside = (ri >= 0) & (ri < r1 - r0)
        ri = ri.clamp(0, max(r1 - r0 - 1, 0))
        ci = torch.arange(cols.shape[0], device=self.dev)
        D[ri, ci] = torch.where(inside, torch.zeros((), dtype=self.dt, device=self.dev), D[ri, ci])
        return D

    def sims(self, r0: int, r1: int, cols):
        D = self.distances(r0, r1, cols)
        if self.kernel == "max-minus":
            return torch.sub(self.M, D, out=D)  # M - D
        return torch.div(D, -self.scale, out=D).exp_()  # exp(-D / scale)

    def _max_distance(self):
        M = torch.zeros((), dtype=self.dt, device=self.dev)
        rstep = min(self.tile, self.n)
        cstep = max(1, min(self.n, self.budget // rstep))
        for r0 in range(0, self.n, rstep):
            r1 = min(self.n, r0 + rstep)
            for c0 in range(0, self.n, cstep):
                c1 = min(self.n, c0 + cstep)
                M = torch.maximum(M, torch.amax(self.distances(r0, r1, self.ar[c0:c1])))
        return M

    def gains(self, cols, cover):
        """Exact gains (len(cols),) of the candidates ``cols`` (device int64) given ``cover`` (n,)."""
        out = []
        Mc = self.M - cover if self.kernel == "max-minus" else None
        cstep = max(1, min(len(cols), self.budget // min(self.tile, self.n))) if len(cols) else 1
        for c0 in range(0, len(cols), cstep):
            cc = cols[c0 : c0 + cstep]
            step = self._row_chunk(len(cc))
            g = torch.zeros((len(cc),), dtype=self.dt, device=self.dev)
            for r0 in range(0, self.n, step):
                r1 = min(self.n, r0 + step)
                if self.kernel == "max-minus":  # max(M - D - c, 0) as max((M - c) - D, 0): one pass
                    Sb = self.distances(r0, r1, cc)
                    torch.sub(Mc[r0:r1, None], Sb, out=Sb)
                else:
                    Sb = self.sims(r0, r1, cc)
                    Sb.sub_(cover[r0:r1, None])
                g += torch.sum(Sb.clamp_min_(0.0), dim=0)
            out.append(g)
        return out[0] if len(out) == 1 else torch.cat(out)

    def column(self, j):
        """S[:, j] (n,) for a device index tensor j of shape (1,)."""
        step = self._row_chunk(1)
        parts = [self.sims(r0, min(self.n, r0 + step), j)[:, 0] for r0 in range(0, self.n, step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _lazy_block(n: int, device) -> int:
    cap = 1024 if device.type == "cuda" else 256
    return max(1, min(n, max(8, min(cap, n // 16 if device.type == "cuda" else n // 64))))


@torch.no_grad()
def greedy_features(X, k, metric, kernel, scale, optimizer, u=None, tile=2048):
    """Greedy on one problem of n points given by features X (n, d), in tiles; never n x n.

    Returns (indices (k,) int64, gains (k,), weights (k,), objective 0-d), on X's device and dtype.

    Examples
    --------
    Four points on a line, two picks, as the dense kernels pick them; stochastic greedy's draws ``u``
    (k, s) pick the reference's sample:

    >>> import torch
    >>> from crestcore import _reference_kernels as ref
    >>> X = torch.tensor([[0.0], [1.0], [2.0], [10.0]], dtype=torch.float64)
    >>> idx, gains, weights, objective = greedy_features(X, 2, "euclidean", "max-minus", 1.0, "lazy")
    >>> idx.tolist(), gains.tolist(), weights.tolist(), objective.item()
    ([1, 3], [29.0, 9.0], [3.0, 1.0], 38.0)
    >>> u = torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64)
    >>> greedy_features(X, 2, "euclidean", "max-minus", 1.0, "stochastic", u)[0].tolist()
    [0, 2]
    >>> ref.greedy_features(X, 2, "euclidean", "max-minus", 1.0, "stochastic", u)[0].tolist()
    [0, 2]
    """
    _check(metric, "metric", METRICS)
    _check(kernel, "kernel", KERNELS)
    _check(optimizer, "optimizer", OPTIMIZERS)
    if optimizer == "stochastic" and u is None:
        raise ValueError("optimizer='stochastic' needs the uniform draws u (k, s)")
    X = X.detach()
    n = X.shape[0]
    k = int(k)
    dev, dt = X.device, X.dtype
    if k <= 0 or n == 0:
        return (torch.zeros((0,), dtype=torch.int64, device=dev), torch.zeros((0,), dtype=dt, device=dev),
                torch.zeros((0,), dtype=dt, device=dev), torch.zeros((), dtype=dt, device=dev))
    F = _Features(X, metric, kernel, scale, tile)
    ar = F.ar
    neg_inf = torch.full((), -math.inf, dtype=dt, device=dev)
    cover = torch.zeros((n,), dtype=dt, device=dev)
    taken = torch.zeros((n,), dtype=torch.bool, device=dev)
    picks, pick_gains = [], []
    if optimizer == "lazy":
        ub = F.gains(ar, cover)  # exact initial gains = upper bounds from now on
        block = _lazy_block(n, dev)
    for t in range(k):
        if optimizer == "naive":
            g_all = torch.where(taken, neg_inf, F.gains(ar, cover))
            j = torch.argmax(g_all)
            g = g_all[j]
        elif optimizer == "stochastic":
            R = torch.sum((~taken).to(torch.float64))
            pos = torch.floor(u[t].to(torch.float64) * R)
            pos = torch.minimum(pos, R - 1.0).to(torch.int64)
            cum = torch.cumsum((~taken).to(torch.int64), dim=0)
            cands = torch.searchsorted(cum, (pos + 1).contiguous())
            g_c = F.gains(cands, cover)
            full = torch.full((n,), -math.inf, dtype=dt, device=dev)
            full.index_put_((cands,), g_c)  # duplicates carry equal values
            j = torch.argmax(full)  # lowest index among the best sampled
            g = full[j]
        else:  # blocked lazy greedy: re-evaluate the best bounds a block at a time
            fresh = torch.zeros((n,), dtype=torch.bool, device=dev)
            exact = torch.full((n,), -math.inf, dtype=dt, device=dev)
            while True:
                key = torch.where(taken | fresh, neg_inf, ub)
                vals, top = torch.topk(key, block)
                ok = torch.isfinite(vals)
                g_top = F.gains(top, cover)
                exact[top] = torch.where(ok, g_top, exact[top])
                ub[top] = torch.where(ok, g_top, ub[top])
                fresh[top] = fresh[top] | ok
                c = torch.argmax(exact)  # exact is -inf outside fresh; lowest index on ties
                others = torch.where(taken | fresh, neg_inf, ub)
                o = torch.argmax(others)
                gc, go = exact[c], others[o]
                stop = ~torch.isfinite(go) | (gc > go) | ((gc == go) & (c < o))
                if bool(stop):  # one host sync per block evaluation
                    break
            j, g = c, exact[c]
        col = F.column(j.reshape(1))
        cover = torch.maximum(cover, col)
        taken[j] = True
        if optimizer == "lazy":
            ub[j] = -math.inf
        picks.append(j)
        pick_gains.append(g)
    idx = torch.stack(picks).to(torch.int64)
    gains = torch.stack(pick_gains).to(dt)
    # weights: every point to its most similar pick (earliest pick on ties), tile by tile
    counts = torch.zeros((k,), dtype=dt, device=dev)
    objective = torch.zeros((), dtype=torch.float64, device=dev)
    step = F._row_chunk(k)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        Sp = F.sims(r0, r1, idx)  # self-similarity is exactly M (max-minus) or 1 (exp)
        a = torch.argmax(Sp, dim=1)
        counts.scatter_add_(0, a, torch.ones((r1 - r0,), dtype=dt, device=dev))
        objective += torch.sum(torch.amax(Sp, dim=1).to(torch.float64))
    return idx, gains, counts, objective.to(dt)


def facility_batched(X, valid, budgets, metric, kernel, scale, optimizer, u=None):
    """``similarity_batched``, then ``greedy_batched``, then ``assign_batched``: indices (B, K), gains
    (B, K), weights (B, K), objectives (B,). The batched device kernels gain nothing from fusing (the
    (B, n, n) similarities are built once either way); the kernel exists so that every backend has the
    same kernels (the Numba one fuses).

    Examples
    --------
    The two padded problems of :func:`similarity_batched`'s example with budgets 2 and 1, in one call;
    the results equal the reference's:

    >>> import torch
    >>> from crestcore import _reference_kernels as ref
    >>> X = torch.tensor([[[0.0], [1.0], [2.0], [10.0]], [[0.0], [5.0], [0.0], [0.0]]], dtype=torch.float64)
    >>> valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    >>> budgets = torch.tensor([2, 1])
    >>> out = facility_batched(X, valid, budgets, "euclidean", "max-minus", 1.0, "lazy")
    >>> idx, gains, weights, objective = out
    >>> idx.tolist(), weights.tolist(), objective.tolist()
    ([[1, 3], [0, -1]], [[3.0, 1.0], [2.0, 0.0]], [38.0, 5.0])
    >>> expected = ref.facility_batched(X, valid, budgets, "euclidean", "max-minus", 1.0, "lazy")
    >>> all(torch.allclose(a, b) for a, b in zip(out, expected))
    True
    """
    S = similarity_batched(X, valid, metric, kernel, scale)
    idx, gains = greedy_batched(S, valid, budgets, optimizer, u)
    weights, objective = assign_batched(S, valid, idx)
    return idx, gains, weights, objective
