"""PyTorch kernels (CPU and CUDA): the batched facility-location hot loops on torch tensors.

Same names, signatures and semantics as :mod:`crestcore._reference_kernels` (read its docstring for the
contract): ``similarity_batched``, ``greedy_batched``, ``assign_batched``, ``greedy_features``,
``facility_batched``, plus the dispatch check ``usable_for``. Everything stays on the input's device
and in its dtype (indices int64).

The kernels are :mod:`crestcore.backends._device`'s program, shared with the CuPy module (its docstring
has the design: batched, no host sync in the greedy loop, "lazy" == "naive", memory caps, sampling,
ties); this module holds what is torch's own:

* :class:`_TorchOps`, torch's spelling of the operations the program needs (``masked_fill_``,
  ``gather``/``scatter_``, a batched ``searchsorted``, ``topk``, tensors made on the input's device);
* **Autograd.** Selection is discrete, so ``greedy_batched``, ``assign_batched`` and
  ``greedy_features`` work on detached inputs under ``torch.no_grad()``. ``usable_for`` declines
  ``similarity_batched`` and ``facility_batched`` for inputs that require grad, so that the generic
  reference keeps the graph;
* ``usable_for``: tensors on one CPU or CUDA device, floating ones float32/float64 (float16/bfloat16
  go to the reference); ``available_bytes``: a CUDA device's free memory;
* **Threads on the CPU.** The batched kernels run small CPU problems (at most ``_ONE_THREAD_MAX`` =
  131,072 similarity entries, B x n x n: a CREST step's per-class problems) on one intra-op thread, the
  caller's ``torch.set_num_threads`` put back afterwards. Their tensors sit just above torch's grain size
  (32,768 elements), so each of a greedy's hundred-odd operations forked onto the OpenMP team, whose
  threads fall asleep between the selection's operations when a training loop interleaves other work:
  waking them cost more than the work (a CREST step's solve at P = 1, r = 600: 5.8-6.3 ms a call on two
  threads, 2.6-4.0 ms on one, ``benchmarks/e2_select_path.py`` on the 2-core machine). The results were
  the same bit for bit on one and two threads in every case tested (``tests/backends/test_torch_threads.py``:
  60 random batches with ties, both dtypes, every metric, kernel and optimizer); that torch computes each
  element of these small operations alike on any thread count is what we expect of it, not a documented
  guarantee. The count is set for the calling thread alone, through the OpenMP runtime torch runs on
  (``omp_set_num_threads``); other threads, and threads started during the call, keep theirs (with
  ``torch.set_num_threads``, process-wide, a thread whose first torch operation fell inside the call kept
  one thread for its life: review 163); MKL's own count is left as it is. Where torch runs on no OpenMP
  runtime found loaded, the process's count is changed only while no other Python thread runs.

Only this module imports torch.
"""

from __future__ import annotations

import contextlib
from typing import Any

from . import _device
from .contract import missing_library

try:
    import torch
except ImportError as exc:  # the optional dependency: say which extra brings it
    raise missing_library("crestcore.backends.torch", "PyTorch", "torch", exc) from exc

__all__ = ["usable_for", "similarity_batched", "greedy_batched", "assign_batched", "greedy_features",
           "facility_batched"]

_FLOATS = (torch.float32, torch.float64)
_ONE_THREAD_MAX = 1 << 17  # similarity entries (B x n x n) up to which a CPU call runs on one thread
_INTS = (torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_DEVICE_TYPES = ("cpu", "cuda")


class _TorchOps(_device.Ops):
    """torch's spelling of the operations of :class:`crestcore.backends._device.Ops`: every array is
    made on the device it is asked for."""

    xp = torch
    int64, bool_, float64 = torch.int64, torch.bool, torch.float64

    def device(self, x):
        return x.device

    def on_gpu(self, x) -> bool:
        return x.device.type == "cuda"

    def zeros(self, shape, dtype, device):
        return torch.zeros(shape, dtype=dtype, device=device)

    def empty(self, shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device)

    def full(self, shape, value, dtype, device):
        return torch.full(shape, value, dtype=dtype, device=device)

    def arange(self, start, stop, device):
        return torch.arange(start, stop, device=device)

    def astype(self, x, dtype=None, device=None):
        return x.to(device=device, dtype=dtype)

    def copy(self, x):
        return x.clone()

    def concat(self, parts, axis):
        return torch.cat(parts, dim=axis)

    def fill_where_(self, a, mask, value):
        a.masked_fill_(mask, value)

    def snap_(self, a, tol):
        torch.nn.functional.threshold_(a, tol, 0.0)

    def clamp_min_(self, a, low):
        return a.clamp_min_(low)

    def zero_diagonal_(self, D):
        D.diagonal(dim1=-2, dim2=-1).zero_()

    def take(self, a, idx):
        return a.index_select(0, idx)

    def take_along_rows(self, a, idx):
        return torch.gather(a, 1, idx)

    def put_along_rows_(self, a, idx, values):
        a.scatter_(1, idx, values)

    def take_columns(self, S, idx):
        B, n, _ = S.shape
        return torch.gather(S, 2, idx[:, None, :].expand(B, n, idx.shape[1]))

    def count_rows(self, labels, K, dtype, where=None):
        ones = torch.ones(labels.shape, dtype=dtype, device=labels.device) if where is None else where.to(dtype)
        return torch.zeros((labels.shape[0], K), dtype=dtype, device=labels.device).scatter_add_(1, labels, ones)

    def searchsorted(self, a, v):
        return torch.searchsorted(a, v.contiguous())

    def top_k(self, x, k):
        return torch.topk(x, k)


_OPS = _TorchOps()


def _accepts(name: str, a) -> bool:
    """A tensor on a CPU or CUDA device, float32/float64 (not requiring grad where the similarities
    are built) or bool/integer."""
    if not isinstance(a, torch.Tensor) or a.device.type not in _DEVICE_TYPES or a.is_complex():
        return False
    if a.is_floating_point():
        return a.dtype in _FLOATS and not (name in ("similarity_batched", "facility_batched") and a.requires_grad)
    return a.dtype in _INTS


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
    return _device.usable_for(name, arrays, _accepts, lambda a: a.device, lambda a: a.is_floating_point())


# the OpenMP runtime torch's intra-op threads run on, found at the first small CPU call (_own_openmp): a ctypes
# library whose omp_set_num_threads sets the calling thread's count alone, or False (none found)
_OPENMP: Any = None


def _own_openmp():
    """The OpenMP runtime torch runs its CPU operations on, already loaded in this process (never loaded here: a
    second OpenMP runtime in a process can abort it), when setting its thread count on this thread is seen by
    torch (``torch.get_num_threads()`` reads the calling thread's OpenMP setting); else False."""
    global _OPENMP
    if _OPENMP is None:
        _OPENMP = False
        import ctypes
        import os
        import sys

        noload = getattr(os, "RTLD_NOLOAD", None)
        names = {"linux": ("libgomp.so.1", "libomp.so", "libiomp5.so"),
                 "darwin": ("libomp.dylib", "libiomp5.dylib")}.get(sys.platform, ())
        before = torch.get_num_threads()
        for name in names if noload is not None and before > 1 else ():
            try:
                lib = ctypes.CDLL(name, mode=noload | getattr(os, "RTLD_LAZY", 1))
                lib.omp_set_num_threads(1)
            except (OSError, AttributeError):  # not loaded, or not an OpenMP runtime
                continue
            seen = torch.get_num_threads()
            lib.omp_set_num_threads(before)
            if seen == 1 and torch.get_num_threads() == before:
                _OPENMP = lib
                break
    return _OPENMP


@contextlib.contextmanager
def _threads_for(x, entries: int):
    """One intra-op thread for a small CPU problem (``entries`` similarity entries at most
    ``_ONE_THREAD_MAX``), the caller's count put back after (also on an error); otherwise nothing
    changes (CUDA tensors, larger problems, a caller on one thread already).

    The count is set on the calling thread only, through torch's OpenMP runtime: ``torch.set_num_threads`` sets
    the process's count, which a thread whose first torch operation fell inside the call kept for its life
    (review 163). Where that runtime is not found (torch without OpenMP), the process's count is changed only
    while no other Python thread runs, and otherwise left alone."""
    before = torch.get_num_threads()
    if x.device.type != "cpu" or entries > _ONE_THREAD_MAX or before == 1:
        yield
        return
    omp = _own_openmp()
    if omp:
        omp.omp_set_num_threads(1)
        try:
            yield
        finally:
            omp.omp_set_num_threads(before)
        return
    import threading

    if threading.active_count() > 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _entries(x) -> int:
    """B x n x n of a (B, n, d) or (B, n, n) argument (0 for another shape: the kernel's own check
    refuses it)."""
    return int(x.shape[0]) * int(x.shape[1]) ** 2 if x.ndim == 3 else 0


def available_bytes(x) -> int | None:
    """Free memory of a CUDA tensor's device (``torch.cuda.mem_get_info``); None for CPU tensors (the
    caller reads the host's)."""
    if isinstance(x, torch.Tensor) and x.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(x.device)
        return int(free)
    return None


def similarity_batched(X, valid, metric: str, kernel: str, scale: float):
    """Dense similarities (B, n, n) of B padded problems; see the reference for the contract.

    Examples
    --------
    The backends' running example (:func:`crestcore.backends._examples.two_problems`): with
    ``"max-minus"`` each problem's largest distance ``M`` (10, then 5) is on the diagonal, the padding is 0:

    >>> import torch
    >>> from crestcore import _reference_kernels as ref
    >>> from crestcore.backends._examples import two_problems
    >>> X, valid, _ = two_problems(torch)
    >>> S = similarity_batched(X, valid, "euclidean", "max-minus", 1.0)
    >>> S[0].tolist()
    [[10.0, 9.0, 8.0, 0.0], [9.0, 10.0, 9.0, 1.0], [8.0, 9.0, 10.0, 2.0], [0.0, 1.0, 2.0, 10.0]]
    >>> S[1].tolist()
    [[5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    >>> torch.allclose(S, ref.similarity_batched(X, valid, "euclidean", "max-minus", 1.0))
    True
    """
    with _threads_for(X, _entries(X)):
        return _device.similarity_batched(_OPS, X, valid, metric, kernel, scale)


@torch.no_grad()
def greedy_batched(S, valid, budgets, optimizer, u=None):
    """Facility-location greedy on B dense problems at once -> (indices (B, K) int64, gains (B, K)).

    ``K = max(budgets)`` is read once before the loop; the loop itself never syncs with the host.
    ``"lazy"`` runs the same exact dense computation as ``"naive"``.

    Examples
    --------
    Budgets 2 and 1 on the similarities of the running example: the middle point, then the outlier;
    the second problem's row is padded with -1. The picks are the reference's:

    >>> import torch
    >>> from crestcore import _reference_kernels as ref
    >>> from crestcore.backends._examples import two_problems
    >>> X, valid, budgets = two_problems(torch)
    >>> S = similarity_batched(X, valid, "euclidean", "max-minus", 1.0)
    >>> idx, gains = greedy_batched(S, valid, budgets, "lazy")
    >>> idx.tolist(), gains.tolist()
    ([[1, 3], [0, -1]], [[29.0, 9.0], [5.0, 0.0]])
    >>> torch.equal(idx, ref.greedy_batched(S, valid, budgets, "lazy")[0])
    True
    """
    with _threads_for(S, _entries(S)):
        return _device.greedy_batched(_OPS, S.detach(), valid, budgets, optimizer, u)


@torch.no_grad()
def _greedy_loop(S, valid, budgets, K: int, optimizer: str, u=None):
    """The greedy loop for a known ``K`` (host int), without the one host read of ``greedy_batched``:
    fixed-shape device work only (tests run it on the ``meta`` device, where any host read fails)."""
    return _device.greedy_loop(_OPS, S.detach(), valid, budgets, K, optimizer, u)


@torch.no_grad()
def assign_batched(S, valid, indices):
    """Cluster-size weights (B, K) and objectives (B,) of the picks ``indices`` (-1 = no pick).

    Examples
    --------
    The first problem of the running example with the picks 1 and 3: three points go to pick 1, the
    outlier to itself:

    >>> import torch
    >>> from crestcore import _reference_kernels as ref
    >>> S = torch.tensor([[[10.0, 9.0, 8.0, 0.0], [9.0, 10.0, 9.0, 1.0], [8.0, 9.0, 10.0, 2.0],
    ...                    [0.0, 1.0, 2.0, 10.0]]])
    >>> valid, idx = torch.ones(1, 4, dtype=torch.bool), torch.tensor([[1, 3]])
    >>> weights, objective = assign_batched(S, valid, idx)
    >>> weights.tolist(), objective.tolist()
    ([[3.0, 1.0]], [38.0])
    >>> torch.equal(weights, ref.assign_batched(S, valid, idx)[0])
    True
    """
    with _threads_for(S, _entries(S)):
        return _device.assign_batched(_OPS, S.detach(), valid, indices)


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
    return _device.greedy_features(_OPS, X.detach(), k, metric, kernel, scale, optimizer, u, tile)


def facility_batched(X, valid, budgets, metric, kernel, scale, optimizer, u=None):
    """``similarity_batched``, then ``greedy_batched``, then ``assign_batched``: indices (B, K), gains
    (B, K), weights (B, K), objectives (B,). The batched device kernels gain nothing from fusing (the
    (B, n, n) similarities are built once either way); the kernel exists so that every backend has the
    same kernels (the Numba one fuses).

    Examples
    --------
    The running example with budgets 2 and 1, in one call; the results equal the reference's:

    >>> import torch
    >>> from crestcore import _reference_kernels as ref
    >>> from crestcore.backends._examples import two_problems
    >>> args = (*two_problems(torch), "euclidean", "max-minus", 1.0, "lazy")
    >>> idx, gains, weights, objective = facility_batched(*args)
    >>> idx.tolist(), weights.tolist(), objective.tolist()
    ([[1, 3], [0, -1]], [[3.0, 1.0], [2.0, 0.0]], [38.0, 5.0])
    >>> all(torch.allclose(a, b) for a, b in zip((idx, gains, weights, objective), ref.facility_batched(*args)))
    True
    """
    with _threads_for(X, _entries(X)):
        S = similarity_batched(X, valid, metric, kernel, scale)
        # S is exactly symmetric by construction: the greedy reads candidates as rows, no check
        idx, gains = _device.greedy_batched(_OPS, S.detach(), valid, budgets, optimizer, u, symmetric=True)
        weights, objective = assign_batched(S, valid, idx)
    return idx, gains, weights, objective
