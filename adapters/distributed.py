"""CREST under ``torch.distributed`` (DistributedDataParallel, ``torchrun``): one coreset schedule, sharded work.

The controller (:func:`crestcore.crest_next_batch`) is deterministic given its seed and what the model
operations return, so it runs whole on every rank and the ranks stay in lockstep as long as every
:class:`crestcore.ModelOps` result is *bit-identical* on all ranks. This module makes them so while
splitting the work:

* :class:`DistributedModelOps` wraps a :class:`~crestcore.adapters.torch.TorchModelOps`.
  ``outputs(indices)`` runs each rank's contiguous share of the indices and all-gathers the logits
  (and embeddings): a forward over the random subsets, for selection or for the trust check, costs
  ``1 / world`` of it per rank, and every rank then holds the same logits, hence the same features,
  the same anchor loss ``L_R`` and the same check loss. ``gradient`` and ``hutchinson`` compute each
  rank's share of the weighted loss sum ``sum_i w_i l_i / N`` and all-reduce it (SUM), so every rank
  gets the same vector, as DDP's own gradient all-reduce does. ``params()`` is the local flat
  parameter vector, identical on all ranks under DDP. ``coresets(...)`` solves the rank's share of the
  ``P`` coreset problems (each with its ``C`` per-class problems) by :func:`crestcore.minibatch_coresets`
  on pre-drawn subset rows, and all-gathers the results: int64 indices as int64 (never cast to float),
  float weights, gains and objectives as floats.
* :class:`DistributedCrestLoader` is :class:`~crestcore.adapters.torch.CrestLoader` over those
  operations: every rank runs the same global schedule and yields its share of each global mini-batch
  of ``m``, ``indices[rank::world]`` (as ``DistributedSampler`` strides), with weights rescaled so that
  the unchanged loss line ``(w * per_example_loss).mean()`` followed by DDP's gradient averaging gives
  exactly the single-process weighted-mean gradient. ``observe`` all-gathers the per-example losses so
  the drop policy's loss history is the same global history on every rank. ``set_epoch``,
  ``state_dict`` / ``load_state_dict`` (per rank) and ``stats`` work as in the single-process loader.
  With ``verify=True`` (default) the controller state is fingerprinted and compared across ranks (one
  int64 all-gather) after every step that selected, checked or dropped, so a divergence fails at once
  with the step and the ranks, instead of desynchronising collectives later.

Everything each rank calls is collective: every rank builds the loader with the same arguments,
iterates it the same number of times and calls ``observe`` (when it does) at the same steps. A rank that
fails leaves the others blocked in a collective until the process group's timeout
(``init_process_group(timeout=...)``) or until the launcher (``torchrun``) tears the job down; the
error raised then names the collective, the rank and the step. See ``docs/distributed.md``.

The controller selects through :meth:`DistributedModelOps.coresets` (an adapter's optional
``coresets`` operation, see :class:`crestcore.ModelOps`), which shares the problems out over the ranks.
The stochastic optimizer draws its random numbers for all problems at once from the controller's generator,
so with ``optimizer="stochastic"`` every rank solves all problems (same result, no sharding).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import math
import os
import sys
import tempfile
from pathlib import Path
from collections.abc import Callable

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError("crestcore.adapters.distributed needs PyTorch: pip install 'crestcore[torch]'") from exc
import torch.distributed as dist
from torch import nn

from crestcore.controller import Batch, selection_on_host
from crestcore.minibatch import Coresets
from crestcore.minibatch import minibatch_coresets as _minibatch_coresets

from crestcore.validation import host_indices

from . import _common
from ._common import training_loss_error, weighted_examples
from .torch import _PROBE_CLASSES, CrestLoader, TorchModelOps, _callable_name, _example_data, _inner_ops

__all__ = [
    "DistributedModelOps",
    "DistributedCrestLoader",
    "CollectiveError",
    "batch_share",
    "shard_bounds",
    "numba_cache_slot",
    "selection_sharded",
]


class CollectiveError(RuntimeError):
    """A collective of the distributed adapter failed, timed out, or found the ranks out of step.

    Examples
    --------
    Raised on every rank when the ranks disagree, e.g. on the loader's arguments; it is a
    ``RuntimeError``, as torch's collective failures are:

    >>> error = CollectiveError("CREST distributed: the ranks disagree on the loader's arguments")
    >>> isinstance(error, RuntimeError)
    True
    """


# ------------------------------------------------------------------------------------------------
# pure helpers
# ------------------------------------------------------------------------------------------------
def shard_bounds(k: int, world: int) -> np.ndarray:
    """Boundaries ``(world + 1,)`` of the contiguous shares of ``k`` items: rank ``q`` gets
    ``[b[q], b[q + 1])``; the first ``k % world`` ranks get one item more (``numpy.array_split``).

    Examples
    --------
    >>> shard_bounds(10, 4)  # rank 0 gets items 0-2, rank 1 3-5, rank 2 6-7, rank 3 8-9
    array([ 0,  3,  6,  8, 10])
    """
    if world < 1:
        raise ValueError(f"world must be a positive integer, got {world!r}")
    base, extra = divmod(int(k), int(world))
    sizes = np.full(world, base, dtype=np.int64)
    sizes[:extra] += 1
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def batch_share(indices, weights, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank ``rank``'s share of one global weighted mini-batch: ``indices[rank::world]`` and its weights
    times ``world * k_rank / m``.

    The shares of all ranks partition the batch (nothing lost or duplicated). The factor makes the
    per-rank loss ``mean_share(w' * l)`` equal ``(world / m) sum_share(w * l)``, so the average over
    ranks (DDP's gradient averaging) is the single-process ``mean(w * l)`` over the whole batch; it is
    exactly 1 when ``world`` divides ``m``.

    Examples
    --------
    A batch of five over two ranks: rank 0 trains three examples, rank 1 two, and the factors make the
    average of the two ranks' mean losses the weighted mean over all five:

    >>> import numpy as np
    >>> indices, weights = np.array([10, 11, 12, 13, 14]), np.ones(5)
    >>> batch_share(indices, weights, rank=0, world=2)
    (array([10, 12, 14]), array([1.2, 1.2, 1.2]))
    >>> batch_share(indices, weights, rank=1, world=2)
    (array([11, 13]), array([0.8, 0.8]))
    """
    idx = np.asarray(indices)
    w = np.asarray(weights, dtype=np.float64)
    m = idx.size
    if not (0 <= rank < world):
        raise ValueError(f"rank must lie in [0, {world}), got {rank!r}")
    if m < world:
        raise ValueError(
            f"a global mini-batch of {m} examples cannot be split over {world} ranks without an empty "
            f"share: use m >= world size (CrestConfig(m=...))"
        )
    sel = slice(rank, None, world)
    k = len(range(rank, m, world))
    return idx[sel].copy(), w[sel] * (world * k / m)


def _digest(*parts) -> int:
    """A 64-bit fingerprint (signed, for an int64 tensor) of arrays and plain values."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        if isinstance(p, torch.Tensor):
            p = p.detach().cpu().numpy()
        if isinstance(p, np.ndarray):
            a = np.ascontiguousarray(p)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(repr(p).encode())
        h.update(b"|")
    return int.from_bytes(h.digest(), "little", signed=True)


# ------------------------------------------------------------------------------------------------
# one Numba cache directory per process
# ------------------------------------------------------------------------------------------------
# Numba's on-disk cache is not safe for several processes compiling into one directory at once: saving a
# new specialisation reads the function's index (``*.nbi``), picks the first free data-file number and
# writes the index back. Two ranks compiling different specialisations of one kernel from a cold cache
# both pick ``.1.nbc``; the index then maps one signature to the other's machine code, and a later process
# loading it runs code compiled for other argument types (seen here: ``f(3)`` returned ``7.0``, the float64
# specialisation, for an int64 key). Every rank of a job starts from the same cold cache on a fresh machine,
# so the distributed adapter gives each process its own cache directory, a "slot" held with an exclusive
# lock for the life of the process and reused by later runs (the cache stays warm across runs).
_SLOT: dict = {}


def _slot_base() -> Path:
    user = os.environ.get("NUMBA_CACHE_DIR")
    if user:
        return Path(user) / "crestcore-slots"
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "crestcore" / "numba"


def selection_sharded(config, world_size: int, model_on_host: bool) -> bool:
    """Whether a job's selections with more than one subset are shared out over its ranks
    (``stats["distributed"]["selection_sharded"]``): not with one process, not with the stochastic optimizer
    (its draws are taken for all problems at once), not when every call has one subset (the default
    just-in-time coresets with ``fit_batches=1``: each call's one subset is solved whole on every rank), and
    not when the features go to the host (``backend="numba"`` with a GPU model: every rank solves the host
    copy whole; the default ``"auto"`` keeps a GPU model's solve on the device with more than one process,
    :attr:`DistributedModelOps.host_selection`).

    Examples
    --------
    >>> from crestcore import CrestConfig
    >>> selection_sharded(CrestConfig(), 2, True)  # just in time: one subset a call
    False
    >>> anchor = CrestConfig(coresets="at-anchor")  # P subsets a call
    >>> selection_sharded(anchor, 2, True), selection_sharded(anchor, 1, True)
    (True, False)
    >>> selection_sharded(anchor, 2, False)  # a GPU model: "auto" solves on the GPUs with two ranks
    True
    >>> selection_sharded(CrestConfig(coresets="at-anchor", backend="numba"), 2, False)  # the host's kernels
    False
    """
    return (world_size > 1 and config.optimizer != "stochastic"
            and (not config.just_in_time or config.fit_batches > 1)
            and not selection_on_host(config.backend, model_on_host, world_size == 1))


def numba_cache_slot(base=None) -> Path | None:
    """This process's own Numba cache directory for crestcore's kernels, claimed once per process.

    The slot is ``<base>/slot<i>`` for the first ``i`` whose lock file this process can lock exclusively
    (``fcntl.flock``, held until the process exits), so no two live processes ever share one, and a later
    run reuses a free slot with the kernels already compiled. ``base`` defaults to
    ``$NUMBA_CACHE_DIR/crestcore-slots`` when ``NUMBA_CACHE_DIR`` is set, else ``~/.cache/crestcore/numba``
    (``$XDG_CACHE_HOME`` honoured); an unwritable base falls back to the temporary directory.

    The Numba kernels (``crestcore.backends.numba`` and ``crestcore.backends.numba_sparse``) are pointed at
    the slot, at once when they are
    imported already (their in-memory specialisations stay), else by an import hook when they are
    imported (claiming a slot does not import Numba, which takes seconds and would skew the ranks; a kernel
    module reloaded later with ``importlib.reload`` is not re-pointed again). Returns the slot, or
    ``None`` when Numba is not installed (nothing to protect). Numba's global configuration and
    ``os.environ`` are left as they were, so other Numba code and subprocesses are not redirected, except where
    Numba finds no cache folder at all (a read-only install without a writable home): then the kernels' import
    sets Numba's cache folder to the slot for the whole process (said in a warning).

    Examples
    --------
    :class:`DistributedModelOps` claims the slot itself; a rank may claim it earlier, before anything
    compiles:

    >>> slot = numba_cache_slot()
    >>> slot == numba_cache_slot()  # once per process
    True
    >>> slot is None or slot.name.startswith("slot")
    True
    """
    if "path" in _SLOT:
        return _SLOT["path"]
    import importlib.util

    if importlib.util.find_spec("numba") is None:
        return None
    from crestcore.backends import _private_folder, _user_temp_folder

    shared = Path(_user_temp_folder())
    bases = [Path(base) if base is not None else _slot_base(), shared]
    slot, lock, errors = None, None, []
    for b in bases:
        try:
            if b is shared:  # in the temporary directory: a folder only this user can write (review 154)
                b = Path(_private_folder(b))
            else:
                b.mkdir(parents=True, exist_ok=True)
            slot, lock = _claim(b)
            break
        except OSError as exc:
            errors.append(f"{b}: {exc}")
    if slot is None:
        raise RuntimeError(
            "crestcore.adapters.distributed: no writable directory for this rank's own Numba cache ("
            + "; ".join(errors) + "). Ranks sharing one Numba cache corrupt it when they compile at once: set "
            "NUMBA_CACHE_DIR to a writable directory (each rank gets a slot below it)."
        )
    _SLOT.update(path=slot, lock=lock)
    # the slot too where Numba finds no cache folder at all and crestcore's import falls back to one (review 153:
    # the kernels went to a folder every rank shared)
    import crestcore.backends

    crestcore.backends._CACHE_FALLBACK = str(slot)
    waiting = []
    for name in _KERNELS:
        kernels = sys.modules.get(name)
        if kernels is not None:
            _repoint(kernels, slot)
        else:
            waiting.append(name)
    if waiting:  # not imported yet (importing Numba takes seconds): re-point the kernels when they are imported
        sys.meta_path.insert(0, _RepointOnImport(slot, waiting))
    return slot


def _config_fields(config, prefix: str = "config.") -> dict:
    """``{"config.<field>": value}`` of a config dataclass, nested ones flattened (``config.drop.alpha``), so that
    the ranks' agreement names the field that differs (review 161: "the config" alone, among some forty)."""
    import dataclasses

    out: dict = {prefix.rstrip("."): type(config).__qualname__}  # (a subclass of a config class differs too)
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out.update(_config_fields(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v if isinstance(v, int) and not isinstance(v, bool) else repr(v)
    return out


# every module of crestcore's with cached jitted kernels (tests/adapters/test_distributed.py checks the list)
_KERNELS = ("crestcore.backends.numba", "crestcore.backends.numba_sparse")


def _repoint(kernels, slot: Path) -> None:
    """Point the cache of every cached jitted function of ``kernels`` at ``slot``, with the kernels a wheel ships
    copied there first (a new slot would compile them all again)."""
    import numba.core.config as ncfg

    from crestcore.backends import _seed_shipped_kernels

    _seed_shipped_kernels(kernels.__name__.rsplit(".", 1)[-1], str(slot))
    before = ncfg.CACHE_DIR
    ncfg.CACHE_DIR = str(slot)
    try:
        for obj in vars(kernels).values():
            cache = getattr(obj, "_cache", None)
            if cache is not None and type(cache).__name__ != "NullCache" and hasattr(obj, "enable_caching"):
                obj.enable_caching()  # a new FunctionCache, whose locator reads CACHE_DIR now
    finally:
        ncfg.CACHE_DIR = before


class _RepointOnImport:
    """An import hook: once each of the kernel modules ``names`` has executed, re-point its caches; it
    removes itself when the last one has."""

    def __init__(self, slot: Path, names):
        self.slot, self.names = slot, set(names)

    def find_spec(self, name, path=None, target=None):
        if name not in self.names:
            return None
        import importlib.machinery

        self.names.discard(name)
        if not self.names:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run, slot = spec.loader.exec_module, self.slot

        def exec_module(module):
            run(module)
            _repoint(module, slot)

        spec.loader.exec_module = exec_module
        return spec


def _claim(base: Path):
    """The first ``base/slot<i>`` whose lock this process takes; (path, open lock file)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: a directory of one's own, by process id
        d = base / f"pid{os.getpid()}"
        d.mkdir(exist_ok=True)
        return d, None
    for i in range(4096):
        d = base / f"slot{i}"
        d.mkdir(exist_ok=True)
        f = open(d / ".lock", "a+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        atexit.register(f.close)  # held for the process's life, closed at its end (not left to the finaliser)
        return d, f
    raise OSError(f"all 4096 Numba cache slots under {base} are locked by live processes")


# ------------------------------------------------------------------------------------------------
# model operations
# ------------------------------------------------------------------------------------------------
def _require_initialized():
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "the distributed CREST adapter needs an initialised process group: call "
            "torch.distributed.init_process_group(backend, timeout=...) first (torchrun sets the "
            "environment it reads)"
        )


class DistributedModelOps:
    """:class:`crestcore.ModelOps` whose results are identical on every rank, with the work sharded.

    Parameters
    ----------
    ops : the rank's :class:`~crestcore.adapters.torch.TorchModelOps` (over the unwrapped module, not
        the DDP wrapper: measurement passes must not trigger DDP's gradient hooks).
    group : the process group (default: the world).
    broadcast_buffers : measure with rank 0's buffers (BatchNorm running statistics): they are broadcast
        into the model for the duration of each measurement and the rank's own buffers restored after.
        Under DDP (``broadcast_buffers=True``, its default) these are the buffers every rank's next
        training forward uses anyway. Without it, ranks whose buffers differ measure slightly different
        models (the results are still identical on every rank, being gathered or reduced).

    Attributes other than the ModelOps methods (``device``, ``labels``, ``model``, ``rademacher``, ...)
    are the wrapped ops'. ``sharded_solves`` counts the coreset solves that were sharded (those of at
    least two problem rows).

    Examples
    --------
    Under ``torchrun`` every rank wraps its own ops over the same dataset (here one rank).
    ``_OneProcess(n)`` starts the group of the examples, one gloo process (as :class:`DistributedCrestLoader`'s
    example does by hand), and makes ``n`` random examples of two classes:

    >>> import torch
    >>> from crestcore import CrestConfig, crest_init, crest_next_batch
    >>> from crestcore.adapters.torch import TorchModelOps
    >>> group = _OneProcess(64)
    >>> ops = DistributedModelOps(TorchModelOps(torch.nn.Linear(4, 2), group.data))
    >>> config = CrestConfig(m=8)
    >>> state, batch = crest_next_batch(crest_init(config, ops.labels, seed=0), ops, config)
    >>> ops.world_size, batch.indices.shape
    (1, (8,))
    >>> group.close()
    """

    def __init__(self, ops: TorchModelOps, *, group=None, broadcast_buffers: bool = True):
        _require_initialized()
        if not isinstance(ops, TorchModelOps):
            raise TypeError(f"ops must be a crestcore.adapters.torch.TorchModelOps, got {type(ops).__name__}")
        self.inner = ops
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # before any kernel of this rank compiles: never the cache directory of another rank
        self.numba_cache = numba_cache_slot()
        self.backend = str(dist.get_backend(group))
        self._src = 0 if group is None else dist.get_global_rank(group, 0)
        self.broadcast_buffers = bool(broadcast_buffers)
        self.sharded_solves = 0
        self._token_prev = None  # (this rank's last state token, the number the ranks gave it)
        self._token_serial = 0
        self.context: Callable[[], str] = lambda: ""  # the loader says which step is being measured

    def __getattr__(self, name):
        if name == "inner":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def state_token(self, indices):
        """A token for the trust check's reuse that every rank holds alike (a collective: one all-reduce of two
        integers). Each rank asks its inner ops for its own share of ``indices`` (the rows its part of a
        measurement reads, as :meth:`outputs` shares them out); the token is None on every rank when any rank's
        is None (every check then measures), and otherwise a number that stays the same for as long as no
        rank's own token changed since the last call, and is new once one did. So the ranks take the same
        decision, as one process takes it: a check at the parameters of the last one, with nothing else
        changed on any rank, takes that check's measurement (no forward, none counted), and the counters, a
        ``budget_counts="passes"`` run's length and ``max_overhead``'s decisions do not depend on the number
        of processes. (Before, the token was None: every check measured under torch.distributed.)

        Examples
        --------
        >>> import torch
        >>> group = _OneProcess()  # one gloo process, as ``torchrun --nproc-per-node 1`` runs, and 32 examples
        >>> ops = DistributedModelOps(TorchModelOps(torch.nn.Linear(4, 2), group.data))
        >>> first = ops.state_token([0, 5, 9])  # a TensorDataset's rows: the same inputs every time
        >>> first is not None and first == ops.state_token([0, 5, 9])
        True
        >>> group.close()
        """
        idx = host_indices(indices, self.inner.n)
        W = self.world_size
        if W > 1 and idx.size >= W:
            b = shard_bounds(idx.size, W)
            idx = idx[b[self.rank]: b[self.rank + 1]]
        local = self.inner.state_token(idx)
        prev = self._token_prev
        same = local is not None and prev is not None and bool(prev[0] == local)
        flags = self.all_reduce_sum(torch.tensor([int(local is None), int(not same)], dtype=torch.int64),
                                    "all_reduce of the trust check's state tokens")
        if int(flags[0]):  # a rank cannot tell: every rank measures
            self._token_prev = None
            return None
        if not int(flags[1]) and prev is not None:  # nothing changed on any rank since the last token
            return ("ranks", prev[1])
        self._token_serial += 1
        self._token_prev = (local, self._token_serial)
        return ("ranks", self._token_serial)

    # -- communication --------------------------------------------------------------------------
    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on a device the backend handles: CPU for gloo, the current CUDA device for NCCL."""
        if self.backend == "gloo":
            return t.cpu()
        if self.backend == "nccl":
            return t.to(torch.device("cuda", torch.cuda.current_device()))
        return t

    def _collective(self, what: str, fn):
        try:
            return fn()
        except RuntimeError as exc:
            where = self.context()
            raise CollectiveError(
                f"CREST distributed: rank {self.rank} of {self.world_size} ({self.backend}): the collective "
                f"'{what}'{' ' + where if where else ''} failed: {exc}. Another rank has most likely failed "
                "or stopped iterating (see its log); a collective waits at most the process group's timeout "
                "(init_process_group(timeout=...))."
            ) from exc

    def gather_rows(self, t: torch.Tensor, counts, what: str) -> torch.Tensor:
        """Concatenate every rank's ``t`` (``counts[q]`` rows on rank ``q``, same trailing shape and dtype
        everywhere) in rank order, on every rank. Rows are padded to the largest count for the wire.

        Examples
        --------
        With one rank the gathered rows are that rank's; with ``world`` ranks, every rank's in rank order:

        >>> import torch
        >>> group = _OneProcess()  # one gloo process, as ``torchrun --nproc-per-node 1`` runs, and 32 examples
        >>> ops = DistributedModelOps(TorchModelOps(torch.nn.Linear(4, 2), group.data))
        >>> ops.gather_rows(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), [2], "an example's rows")
        tensor([[1., 2.],
                [3., 4.]])
        >>> group.close()
        """
        counts = [int(c) for c in counts]
        if t.shape[0] != counts[self.rank]:
            raise ValueError(f"rank {self.rank} holds {t.shape[0]} rows, expected {counts[self.rank]}")
        k_max = max(counts)
        dev = t.device
        pad = t.new_zeros((k_max, *t.shape[1:]))
        pad[: t.shape[0]] = t
        pad = self._wire(pad)
        out = [torch.empty_like(pad) for _ in range(self.world_size)]
        self._collective(what, lambda: dist.all_gather(out, pad, group=self.group))
        return torch.cat([o[:c] for o, c in zip(out, counts)]).to(dev)

    def all_reduce_sum(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """The sum of every rank's ``t`` (same shape and dtype everywhere), on every rank; ``what`` names
        the collective in a :class:`CollectiveError`.

        Examples
        --------
        >>> import torch
        >>> group = _OneProcess()  # one gloo process, as ``torchrun --nproc-per-node 1`` runs, and 32 examples
        >>> ops = DistributedModelOps(TorchModelOps(torch.nn.Linear(4, 2), group.data))
        >>> ops.all_reduce_sum(torch.tensor([1.0, 2.0]), "an example's sum")
        tensor([1., 2.])
        >>> group.close()
        """
        return self._in_place(t, what, lambda w: dist.all_reduce(w, op=dist.ReduceOp.SUM, group=self.group))

    def broadcast(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Rank 0's ``t`` (of the group), on every rank; ``what`` names the collective in a
        :class:`CollectiveError`.

        Examples
        --------
        >>> import torch
        >>> group = _OneProcess()  # one gloo process, as ``torchrun --nproc-per-node 1`` runs, and 32 examples
        >>> ops = DistributedModelOps(TorchModelOps(torch.nn.Linear(4, 2), group.data))
        >>> ops.broadcast(torch.tensor([3, 1, 2]), "an example's broadcast")
        tensor([3, 1, 2])
        >>> group.close()
        """
        return self._in_place(t, what, lambda w: dist.broadcast(w, src=self._src, group=self.group))

    def _in_place(self, t: torch.Tensor, what: str, collective) -> torch.Tensor:
        """Run the in-place ``collective(w)`` (named ``what``) on ``w``, a copy of ``t`` on the wire's
        device; the result on ``t``'s device."""
        w = self._wire(t.contiguous()).clone()
        self._collective(what, lambda: collective(w))
        return w.to(t.device)

    def agree(self, value, what: str) -> None:
        """Raise :class:`CollectiveError` on every rank unless every rank passes the same int64 ``value``, or
        the same values of a dict ``{name: value}`` (any values: they are fingerprinted; the error then
        names the ones that differ, and an int's value on each rank group).

        Examples
        --------
        Every rank passes a fingerprint of what must agree (here the dataset size):

        >>> import torch
        >>> group = _OneProcess()  # one gloo process, as ``torchrun --nproc-per-node 1`` runs, and 32 examples
        >>> ops = DistributedModelOps(TorchModelOps(torch.nn.Linear(4, 2), group.data))
        >>> ops.agree(32, "the dataset size")
        >>> group.close()
        """
        named = value if isinstance(value, dict) else {what: int(value)}
        digests = [v if (isinstance(v, int) and not isinstance(v, bool) and -(1 << 63) <= v < (1 << 63))
                   else _digest(v) for v in named.values()]  # an int as it is (shown), where int64 holds it
        t = torch.tensor([digests], dtype=torch.int64)
        got = self.gather_rows(t, [1] * self.world_size, f"verify {what}").cpu().tolist()  # (ranks, values)
        differ = []
        for j, name in enumerate(named):
            groups: dict[int, list[int]] = {}
            for q in range(self.world_size):
                groups.setdefault(got[q][j], []).append(q)
            if len(groups) > 1:
                shown = (f" ({', '.join(f'{v} on ranks {r}' for v, r in groups.items())})"
                         if isinstance(value, dict) and isinstance(named[name], int) and named[name] == digests[j]
                         else "")
                differ.append(f"{name}{shown}: rank groups {sorted(groups.values())}")
        if differ:
            raise CollectiveError(
                f"CREST distributed: the ranks disagree on {'; '.join(differ)}. "
                "Every rank must build the loader with the same dataset, labels, config, seed and budget, "
                "train a DDP-wrapped model (identical parameters), and iterate and observe in lockstep."
            )

    @contextlib.contextmanager
    def _rank0_buffers(self):
        bufs = list(self.inner.model.buffers()) if (self.broadcast_buffers and self.world_size > 1) else []
        if not bufs:
            yield
            return
        saved = [b.detach().clone() for b in bufs]
        with torch.no_grad():
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for b in bufs:
                by_dtype.setdefault(b.dtype, []).append(b)
            for group in by_dtype.values():
                flat = torch.cat([b.detach().reshape(-1) for b in group])
                flat = self.broadcast(flat, "broadcast of rank 0's buffers")
                for b, v in zip(group, torch.split(flat, [b.numel() for b in group])):
                    b.copy_(v.view_as(b))
        try:
            yield
        finally:
            with torch.no_grad():
                for b, s in zip(bufs, saved):
                    b.copy_(s)

    def new_anchor(self) -> None:
        """The inner ops' :meth:`~crestcore.adapters.torch.TorchModelOps.new_anchor` with rank 0's buffers
        in place (a collective): every rank keeps rank 0's BatchNorm statistics for the anchor, the ones
        the measurements broadcast (each rank kept its own, and the ranks' shares of a pass were then
        measured with different statistics).

        Examples
        --------
        >>> import torch
        >>> group = _OneProcess()  # one gloo process, as ``torchrun --nproc-per-node 1`` runs, and 32 examples
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
        >>> ops = DistributedModelOps(TorchModelOps(net, group.data))
        >>> ops.new_anchor()
        >>> sorted(ops.inner._anchor_buffers)
        ['1.running_mean', '1.running_var']
        >>> group.close()
        """
        with self._rank0_buffers():
            self.inner.new_anchor()

    # -- ModelOps -------------------------------------------------------------------------------
    def outputs(self, indices, embeddings: bool = False):
        """Eval-mode logits (and embeddings) for ``indices``, each rank computing its contiguous share;
        the pieces are all-gathered so every rank returns the same (k, C) tensor.

        Examples
        --------
        >>> import torch
        >>> group = _OneProcess()  # one gloo process, as ``torchrun --nproc-per-node 1`` runs, and 32 examples
        >>> ops = DistributedModelOps(TorchModelOps(torch.nn.Linear(4, 2), group.data))
        >>> ops.outputs([0, 5, 9]).shape
        torch.Size([3, 2])
        >>> group.close()
        """
        idx = host_indices(indices, self.inner.n)
        W = self.world_size
        if W == 1:
            with self._rank0_buffers():
                return self.inner.outputs(idx, embeddings=embeddings)
        k = idx.size
        if k < W:  # too few to share out: every rank computes them, rank 0's copy is kept
            with self._rank0_buffers():
                out = self.inner.outputs(idx, embeddings=embeddings)
            packed, C = self._pack(out, embeddings)
            packed = self.broadcast(packed, f"broadcast of the outputs of {k} examples")
        else:
            b = shard_bounds(k, W)
            with self._rank0_buffers():
                out = self.inner.outputs(idx[b[self.rank]: b[self.rank + 1]], embeddings=embeddings)
            packed, C = self._pack(out, embeddings)
            packed = self.gather_rows(packed, np.diff(b), f"all_gather of the outputs of {k} examples")
        if not embeddings:
            return packed
        return packed[:, :C], packed[:, C:]

    @staticmethod
    def _pack(out, embeddings):
        if not embeddings:
            return out, out.shape[1]
        z, e = out
        return torch.cat([z, e.to(z.dtype)], dim=1), z.shape[1]

    def losses(self, indices):
        """Eval-mode per-example losses (k,) from the gathered logits (the same on every rank).

        Examples
        --------
        >>> import torch
        >>> group = _OneProcess()  # one gloo process, as ``torchrun --nproc-per-node 1`` runs, and 32 examples
        >>> ops = DistributedModelOps(TorchModelOps(torch.nn.Linear(4, 2), group.data))
        >>> ops.losses([0, 5, 9]).shape
        torch.Size([3])
        >>> group.close()
        """
        idx = host_indices(indices, self.inner.n)
        z = self.outputs(idx)
        with torch.no_grad():
            return self.inner.loss_fn(z, self.inner._labels_on(idx, z.device))

    def params(self):
        """The rank's flat parameter vector (identical on every rank under DDP).

        Examples
        --------
        >>> import torch
        >>> group = _OneProcess()  # one gloo process, as ``torchrun --nproc-per-node 1`` runs, and 32 examples
        >>> ops = DistributedModelOps(TorchModelOps(torch.nn.Linear(4, 2), group.data))
        >>> ops.params().shape  # 4 * 2 weights and 2 biases
        torch.Size([10])
        >>> group.close()
        """
        return self.inner.params()

    def _zero_share(self, vectors: int, scalars: int) -> torch.Tensor:
        """A rank's all-zero contribution when it holds no example: ``vectors`` parameter-sized blocks and
        ``scalars`` numbers, in the dtype the other ranks' shares come in (half widened to float32)."""
        p = self.inner.params()
        return torch.zeros(vectors * p.numel() + scalars, dtype=torch.promote_types(p.dtype, torch.float32),
                           device=p.device)

    def _share(self, indices, weights, what):
        idx, w = weighted_examples(indices, weights, self.inner.n, what)
        b = shard_bounds(idx.size, self.world_size)
        lo, hi = int(b[self.rank]), int(b[self.rank + 1])
        return idx, w, lo, hi

    def gradient(self, indices, weights):
        """``(loss, flat gradient)`` of ``mean(w_i l_i)`` over all ``indices``: each rank differentiates its
        contiguous share's ``sum w_i l_i / N``, and the shares are all-reduced (SUM).

        Examples
        --------
        The result is the single-process gradient, whatever the world size:

        >>> import torch
        >>> group = _OneProcess()  # one gloo process, as ``torchrun --nproc-per-node 1`` runs, and 32 examples
        >>> ops = DistributedModelOps(TorchModelOps(torch.nn.Linear(4, 2), group.data))
        >>> loss, grad = ops.gradient([0, 5, 9], [1.0, 2.0, 0.0])
        >>> single = ops.inner.gradient([0, 5, 9], [1.0, 2.0, 0.0])
        >>> bool(torch.allclose(grad, single[1])), abs(loss - single[0]) < 1e-6
        (True, True)
        >>> group.close()
        """
        if self.world_size == 1:
            with self._rank0_buffers():
                return self.inner.gradient(indices, weights)
        idx, w, lo, hi = self._share(indices, weights, "gradient")
        with self._rank0_buffers():  # on every rank, a share or none: the broadcast is a collective (review 161)
            loss, g = self.inner.gradient(idx[lo:hi], w[lo:hi]) if hi > lo else (0.0, None)
        if g is not None:
            f = (hi - lo) / idx.size
            part = torch.cat([g * f, torch.tensor([loss * f], dtype=g.dtype, device=g.device)])
        else:
            part = self._zero_share(1, 1)
        total = self.all_reduce_sum(part, f"all_reduce of the gradient over {idx.size} examples")
        return float(total[-1]), total[:-1]

    def hutchinson(self, indices, weights, seed: int):
        """One probe ``z * (H z)`` of ``mean(w_i l_i)``'s Hessian: ``z`` is drawn from ``seed`` on every rank
        (the same Rademacher vector), each rank's share of ``z * (H z)`` is all-reduced (SUM).

        Examples
        --------
        >>> import torch
        >>> group = _OneProcess()  # one gloo process, as ``torchrun --nproc-per-node 1`` runs, and 32 examples
        >>> ops = DistributedModelOps(TorchModelOps(torch.nn.Linear(4, 2), group.data))
        >>> probe = ops.hutchinson([0, 5, 9], [1.0, 1.0, 1.0], seed=4)
        >>> probe.shape, bool(torch.equal(probe, ops.inner.hutchinson([0, 5, 9], [1.0, 1.0, 1.0], seed=4)))
        (torch.Size([10]), True)
        >>> group.close()
        """
        if self.world_size == 1:
            with self._rank0_buffers():
                return self.inner.hutchinson(indices, weights, seed)
        idx, w, lo, hi = self._share(indices, weights, "hutchinson")
        with self._rank0_buffers():  # on every rank, a share or none: the broadcast is a collective (review 161)
            part = self.inner.hutchinson(idx[lo:hi], w[lo:hi], seed) * ((hi - lo) / idx.size) if hi > lo else None
        if part is None:
            part = self._zero_share(1, 0)
        return self.all_reduce_sum(part, f"all_reduce of the Hutchinson probe over {idx.size} examples")

    def gradient_and_hutchinson(self, indices, weights, seed: int):
        """``(loss, gradient, z * (H z))`` of ``mean(w_i l_i)``, sharded as :meth:`gradient` and
        :meth:`hutchinson` are (each rank its contiguous share, from one forward), in one all-reduce.

        Examples
        --------
        >>> import torch
        >>> group = _OneProcess()  # one gloo process, as ``torchrun --nproc-per-node 1`` runs, and 32 examples
        >>> ops = DistributedModelOps(TorchModelOps(torch.nn.Linear(4, 2), group.data))
        >>> loss, grad, probe = ops.gradient_and_hutchinson([0, 5, 9], [1.0, 2.0, 0.5], seed=3)
        >>> bool(torch.equal(grad, ops.gradient([0, 5, 9], [1.0, 2.0, 0.5])[1]))
        True
        >>> bool(torch.equal(probe, ops.hutchinson([0, 5, 9], [1.0, 2.0, 0.5], seed=3)))
        True
        >>> group.close()
        """
        if self.world_size == 1:
            with self._rank0_buffers():
                return self.inner.gradient_and_hutchinson(indices, weights, seed)
        idx, w, lo, hi = self._share(indices, weights, "gradient_and_hutchinson")
        D = self.inner.params().numel()
        with self._rank0_buffers():  # on every rank, a share or none: the broadcast is a collective (review 161)
            loss, g, probe = (self.inner.gradient_and_hutchinson(idx[lo:hi], w[lo:hi], seed) if hi > lo
                              else (0.0, None, None))
        if g is not None:
            f = (hi - lo) / idx.size
            part = torch.cat([g * f, probe * f, torch.tensor([loss * f], dtype=g.dtype, device=g.device)])
        else:
            part = self._zero_share(2, 1)
        total = self.all_reduce_sum(part, f"all_reduce of the gradient and Hutchinson probe over {idx.size} examples")
        return float(total[-1]), total[:D], total[D:2 * D]

    # -- the coreset solve ----------------------------------------------------------------------
    @property
    def host_selection(self) -> bool:
        """Whether ``CrestConfig(backend="auto")`` may copy a GPU model's selection features to the host's
        Numba kernels (the controller reads it): with one process, as a single-process run; with more, no,
        the selection stays on the GPUs (every rank would run the threaded host kernels on the node's shared
        cores; untimed), and ``backend="numba"`` still asks for the host."""
        return self.world_size == 1

    def coresets(self, features, labels, *, m, r, P, rng=None, subsets=None, optimizer="lazy", **kwargs) -> Coresets:
        """:func:`crestcore.minibatch_coresets` with the ``P`` problems shared out over the ranks.

        Rank ``q`` solves its contiguous share of the pre-drawn ``subsets`` rows (each row's ``C``
        per-class problems included); indices (int64), weights, gains and objectives are all-gathered, so
        every rank returns the same :class:`crestcore.Coresets`. Falls back to the unsharded call (on
        every rank; the same result) with one process, for a single problem row (P = 1), without
        ``subsets``, for non-torch features, or with the stochastic optimizer (its random draws are taken
        for all problems at once).

        Examples
        --------
        The controller calls it with the features of the random subsets' union:

        >>> import torch
        >>> group = _OneProcess()  # one gloo process, as ``torchrun --nproc-per-node 1`` runs, and 32 examples
        >>> ops = DistributedModelOps(TorchModelOps(torch.nn.Linear(4, 2), group.data))
        >>> import numpy as np
        >>> from crestcore import last_layer_gradients
        >>> logits = ops.outputs(np.arange(32))
        >>> labels = torch.arange(32) % 2
        >>> coresets = ops.coresets(last_layer_gradients(logits, labels), labels, m=4, r=16, P=2,
        ...                         rng=np.random.default_rng(0))
        >>> coresets.indices.shape
        torch.Size([2, 4])
        >>> group.close()
        """
        W = self.world_size
        # one problem row (a just-in-time coreset, the default schedule's usual call) has nothing to share:
        # every rank solves it, as the unsharded call does, and it is not counted as sharded
        if (W == 1 or P < 2 or subsets is None or optimizer == "stochastic"
                or not isinstance(features, torch.Tensor)):
            return _minibatch_coresets(features, labels, m=m, r=r, P=P, rng=rng, subsets=subsets,
                                       optimizer=optimizer, **kwargs)
        subs = np.asarray(subsets.detach().cpu().numpy() if isinstance(subsets, torch.Tensor) else subsets)
        if subs.ndim != 2 or subs.shape[0] != P:
            raise ValueError(f"subsets has shape {subs.shape}, expected (P, r) = ({P}, {r})")
        b = shard_bounds(P, W)
        lo, hi = int(b[self.rank]), int(b[self.rank + 1])
        own = np.arange(lo, hi) if hi > lo else np.array([0])  # a rank with no problem solves row 0 for shapes
        cs = _minibatch_coresets(features, labels, m=m, r=r, P=int(own.size), rng=rng, subsets=subs[own],
                                 rows=own, optimizer=optimizer, **kwargs)
        k = hi - lo
        counts = np.diff(b)
        indices = self.gather_rows(cs.indices[:k].to(torch.int64), counts,
                                   f"all_gather of the coreset indices of {P} problems")
        floats = [cs.weights[:k], cs.gains[:k], cs.objective[:k, None]]
        if len({t.dtype for t in floats}) == 1:
            got = self.gather_rows(torch.cat(floats, dim=1), counts,
                                   f"all_gather of the coreset weights of {P} problems")
            wd = cs.weights.shape[1]
            weights, gains, objective = got[:, :wd], got[:, wd: 2 * wd], got[:, 2 * wd]
        else:
            weights, gains, objective = (
                self.gather_rows(t, counts, f"all_gather of the coreset weights of {P} problems") for t in floats)
            objective = objective[:, 0]
        self.sharded_solves += 1
        return Coresets(indices=indices, weights=weights.contiguous(), gains=gains.contiguous(),
                        objective=objective.contiguous(),
                        subsets=torch.as_tensor(subs.astype(np.int64), device=features.device))


# ------------------------------------------------------------------------------------------------
# the loader
# ------------------------------------------------------------------------------------------------
class DistributedCrestLoader(CrestLoader):
    """:class:`~crestcore.adapters.torch.CrestLoader` for DDP: every rank runs one global coreset schedule
    and yields its share ``indices[rank::world]`` of each global mini-batch of ``m``.

    Parameters
    ----------
    model : the model being trained, DDP-wrapped or not (measurement passes use the underlying module).
    dataset : the training set, the same on every rank (each rank loads only the examples it needs).
    group : the process group (default: the world). ``torch.distributed`` must be initialised.
    verify : after every step at which the controller measured or decided (a selection, a trust check, a
        drop decision), fingerprint its state, the batch and the parameters and compare across ranks (one
        int64 all-gather); a divergence raises :class:`CollectiveError` on every rank at that step.
    broadcast_buffers : see :class:`DistributedModelOps`.
    **kwargs : every option of :class:`~crestcore.adapters.torch.CrestLoader` (``config``, ``budget``,
        ``epochs``, ``seed``, ...), identical on every rank.

    Yields ``(x, y, w)`` for the rank's share (``ceil`` or ``floor`` of ``m / world`` examples). ``w`` is
    the coreset weights times ``world * k / m`` (1 when ``world`` divides ``m``), so the single-process
    loss line ``(w * F.cross_entropy(model(x), y, reduction="none")).mean()`` under DDP's gradient
    averaging gives exactly the single-process weighted-mean gradient of the global batch.
    ``last_indices`` / ``last_weights`` are the global batch's; ``local_indices`` / ``local_weights`` the
    rank's share. ``len()``, ``set_epoch``, budgets and ``stats`` are global (the same on every rank).

    Examples
    --------
    The training loop of every rank (here one) is the single-process loop over a DDP model:

    >>> import tempfile
    >>> import torch
    >>> import torch.distributed as dist
    >>> from torch.utils.data import TensorDataset
    >>> from crestcore import CrestConfig
    >>> store = tempfile.TemporaryDirectory()  # one process, as ``torchrun --nproc-per-node 1`` runs
    >>> dist.init_process_group("gloo", init_method=f"file://{store.name}/pg", rank=0, world_size=1)
    >>> y = torch.arange(64) % 2
    >>> data = TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), y)
    >>> model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> loader = DistributedCrestLoader(model, data, config=CrestConfig(m=8), budget=0.25, epochs=2, seed=0)
    >>> for epoch in range(loader.epochs):
    ...     loader.set_epoch(epoch)
    ...     for x, y, w in loader:
    ...         losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    ...         optimizer.zero_grad()
    ...         (w * losses).mean().backward()
    ...         optimizer.step()
    >>> loader.stats["step"], loader.stats["distributed"]["world_size"], x.shape
    (4, 1, torch.Size([8, 4]))
    >>> dist.destroy_process_group()
    >>> store.cleanup()
    """

    _one_process = False  # (one schedule over every rank: the one-process refusal is not for it)

    def __init__(self, model: nn.Module, dataset, *, group=None, verify: bool = True,
                 broadcast_buffers: bool = True, **kwargs):
        _require_initialized()
        self.ddp_model = model
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        super().__init__(module, dataset, **kwargs)
        self.ops = DistributedModelOps(self.ops, group=group, broadcast_buffers=broadcast_buffers)
        self.ops.context = lambda: f"at step {self._position}"
        self.group = group
        self.rank = self.ops.rank
        self.world_size = self.ops.world_size
        self.verify = bool(verify)
        # verify and broadcast_buffers decide which collectives a rank issues: ranks that differ in them
        # would wait in mismatched collectives until the process group's timeout, so they are agreed first
        # (with the same collectives on every rank, whatever the flags)
        self.ops.agree(_digest(self.verify, bool(broadcast_buffers)), "verify and broadcast_buffers")
        if self.config.m < self.world_size:
            raise ValueError(
                f"CrestConfig(m={self.config.m}) is smaller than the world size {self.world_size}: every rank "
                "needs at least one example of each global mini-batch"
            )
        inner = _inner_ops(self.ops)
        # which layer the embeddings come from, and which forward and collate measure (by name: functions do
        # not compare across processes): ranks that differ selected from a mix of two layers' features, or were
        # aborted by gloo with a message that named none of them (review 125)
        layer = next((name or "(the model)" for name, mod in inner.model.named_modules() if mod is inner._last_layer),
                     None) if inner._last_layer is not None else None
        fields = _config_fields(self.config)
        # the fields' names first, in one value: ranks whose config classes differ in their fields would gather
        # rows of different lengths below, which gloo answers by killing a rank (review 167)
        self.ops.agree({"the config's class and fields": [f"{k}" for k in fields] + [str(fields["config"])]},
                       "the config's fields")
        self.ops.agree(
            {"the dataset size": int(self.n), "the labels": self.labels, **fields,
             "seed": int(self.seed), "budget": self.budget, "epochs": int(self.epochs), "per_epoch": self.per_epoch,
             "budget_counts": self.budget_counts, "the planned steps": int(self.total_steps),
             "last_layer": layer, "forward": _callable_name(inner._forward),
             "collate_fn": None if inner._collate is None else _callable_name(inner._collate)},
            "the loader's arguments",
        )
        # the loss every rank measures with: ranks whose loss_fn differ decide checks differently and would
        # wait in mismatched collectives until the process group's timeout; its values on a fixed probe agree
        self.ops.agree(_digest(self._loss_probe()), "loss_fn (its values on a fixed probe of logits and labels)")

    def _loss_probe(self):
        """The measurement loss on fixed logits and labels (C classes, on the model's device, in the model's
        dtype, at least float32), rounded to float32: a fingerprint of ``loss_fn`` that does not depend on
        the process. A loss that fails on the probe gives its type's name and its failure instead."""
        inner = _inner_ops(self.ops)
        # at most _PROBE_CLASSES columns and 64 rows: a fingerprint needs no more (a label id of 10**11, or a
        # 50,000-word vocabulary, made it (C, C) logits)
        C = min(max(2, int(self.labels.max()) + 1 if self.labels.size else 2), _PROBE_CLASSES)
        k = max(4, min(C, 64))
        dev = next((p.device for p in inner.model.parameters()), torch.device("cpu"))
        # logits as the measurements give them: the model's floating dtype, widened to float32 at least
        dtype = inner._dtype()
        dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        z = (torch.linspace(-3.0, 3.0, k * C, dtype=torch.float64).reshape(k, C).sin() * 2.0).to(dev, dtype)
        y = torch.arange(k, device=dev) % C
        try:
            with torch.no_grad():
                return inner.loss_fn(z, y).detach().to(torch.float32).cpu().numpy()
        except Exception as exc:  # a loss_fn that needs something else (other shapes): its failure, compared
            return f"{type(inner.loss_fn).__qualname__}: {type(exc).__name__}: {exc}"

    # -- the controller step, sharded and verified ----------------------------------------------
    def _advance(self):
        before = dict(self._state.counters), len(self._state.log["drops"])
        state, batch = super()._advance()
        # Ranks can only part ways where the controller used a measurement (a selection, a trust check)
        # or the merged loss history (a drop decision): verify there. Whether such a step happened is
        # decided by the (verified) state, so every rank takes part in the same verifications.
        worked = (state.counters["forward_examples"] != before[0]["forward_examples"]  # selections, checks,
                  or len(state.log["drops"]) != before[1])  # just-in-time coresets
        if self.verify and worked:
            p = self.ops.params().detach().to(torch.float64)
            self.ops.agree(_digest(
                state.step, state.cursor, state.n_selections, state.T1, state.P, state.need_select,
                batch.indices, batch.weights, batch.reselected, state.batch_idx, state.batch_w, state.check_idx,
                state.drop.active, list(state.log["checks"][-1:]), torch.stack([p.sum(), p.abs().sum()]),
            ), f"the controller state at step {self._position}")
        return state, batch

    def _make_batch(self, batch: Batch):
        li, lw = batch_share(batch.indices, batch.weights, self.rank, self.world_size)
        return super()._make_batch(Batch(li, lw, batch.reselected))

    @property
    def local_indices(self) -> np.ndarray | None:
        """Dataset indices of this rank's share of the batch yielded last (host int64), or None."""
        if self._batch is None:
            return None
        return batch_share(self._batch.indices, self._batch.weights, self.rank, self.world_size)[0]

    @property
    def local_weights(self) -> np.ndarray | None:
        """The weights yielded with :attr:`local_indices` (rescaled; see the class docstring), float64."""
        if self._batch is None:
            return None
        return batch_share(self._batch.indices, self._batch.weights, self.rank, self.world_size)[1]

    def observe(self, losses) -> None:
        """Feed this rank's per-example training losses (its share, in the order yielded) to the drop
        policy. Collective when dropping is on (``CrestConfig(T2=...)``): the shares are all-gathered into
        the global batch's losses, so every rank records the same history. Call it on every rank or none.

        Examples
        --------
        >>> import torch
        >>> from crestcore import CrestConfig
        >>> group = _OneProcess(64)  # one gloo process, as ``torchrun --nproc-per-node 1`` runs, and 64 examples
        >>> model = torch.nn.Linear(4, 2)
        >>> loader = DistributedCrestLoader(model, group.data, config=CrestConfig(m=8, T2=2), budget=0.5, seed=0)
        >>> for x, y, w in loader:
        ...     loader.observe(torch.nn.functional.cross_entropy(model(x), y, reduction="none"))
        >>> loader.stats["step"]
        4
        >>> group.close()
        """
        if self._batch is None:
            raise RuntimeError("observe() needs a batch: call it after training on a yielded batch")
        m = self._batch.indices.size
        counts = [len(range(q, m, self.world_size)) for q in range(self.world_size)]
        k, shape = counts[self.rank], tuple(losses.shape) if hasattr(losses, "shape") else np.shape(losses)
        if math.prod(shape) == k and shape not in ((k,), (k, 1)) and not (k == 1 and shape == ()):
            # one loss per example, as CrestLoader.observe takes them: a (2, 4) array is not a share of 8 (review 125)
            raise ValueError(f"observe() got losses of shape {shape} for this rank's share of {k} examples: pass "
                             f"one loss per example, shape ({k},) or ({k}, 1) (reduction='none')")
        if isinstance(losses, torch.Tensor):
            t = losses.detach().reshape(-1).to(torch.float64)
        else:
            t = torch.as_tensor(np.asarray(losses, dtype=np.float64).reshape(-1))
        if t.numel() != counts[self.rank]:
            raise ValueError(
                f"observe() got {t.numel()} losses for this rank's share of {counts[self.rank]} examples "
                "(pass the per-example losses of the batch this rank trained on, reduction='none')"
            )
        if self.config.T2 is None:  # no drop policy: nothing to merge, only the local check
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise training_loss_error("CREST", self._position - 1, bad, t.numel(), f" on rank {self.rank}")
            return
        parts = self.ops.gather_rows(t, counts, "all_gather of the training losses (observe)").cpu().numpy()
        full = np.empty(m, dtype=np.float64)
        b = np.concatenate([[0], np.cumsum(counts)])
        for q in range(self.world_size):
            full[q::self.world_size] = parts[b[q]: b[q + 1]]
        super().observe(full)

    # -- observability and checkpoints ----------------------------------------------------------
    @property
    def stats(self) -> dict:
        """The single-process loader's stats (global: the same on every rank) plus ``distributed``."""
        s = super().stats
        s["distributed"] = {
            "rank": self.rank,
            "world_size": self.world_size,
            "backend": self.ops.backend,
            "sharded_solves": self.ops.sharded_solves,
            "selection_sharded": selection_sharded(
                self.config, self.world_size,
                next((p.device.type for p in _inner_ops(self.ops).model.parameters()), "cpu") == "cpu"),
            "numba_cache": None if self.ops.numba_cache is None else str(self.ops.numba_cache),
        }
        return s

    def state_dict(self, trained: int | None = None) -> dict:
        """As the single-process loader's (the same on every rank; save it from every rank or from rank 0),
        ``trained=`` included. The global schedule does not depend on the world size, so it also resumes on
        another one.

        Examples
        --------
        >>> import torch
        >>> from crestcore import CrestConfig
        >>> group = _OneProcess(64)  # one gloo process, as ``torchrun --nproc-per-node 1`` runs, and 64 examples
        >>> loader = DistributedCrestLoader(torch.nn.Linear(4, 2), group.data, config=CrestConfig(m=8), budget=0.5)
        >>> batch = next(iter(loader))
        >>> loader.state_dict()["position"]
        1
        >>> group.close()
        """
        d = super().state_dict(trained)
        d["world_size"] = self.world_size
        d["sharded_solves"] = int(self.ops.sharded_solves)  # stats count the whole run, as the others do
        return d

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output on every rank (collective: the restored states are compared).

        Call it on every rank. A checkpoint refused on some ranks (a corrupt or foreign state) raises
        :class:`CollectiveError` on every rank, naming the refusal on the ranks that refused it, and leaves
        every rank's loader as it was; refused on all ranks, each raises its own reason.

        Examples
        --------
        A restored loader continues with the batches the saved one would have yielded:

        >>> import torch
        >>> from crestcore import CrestConfig
        >>> group = _OneProcess(64)  # one gloo process, as ``torchrun --nproc-per-node 1`` runs, and 64 examples
        >>> model = torch.nn.Linear(4, 2)
        >>> loader = DistributedCrestLoader(model, group.data, config=CrestConfig(m=8), budget=0.5, seed=0)
        >>> passes = iter(loader)
        >>> first = next(passes)
        >>> resumed = DistributedCrestLoader(model, group.data, config=CrestConfig(m=8), budget=0.5, seed=0)
        >>> resumed.load_state_dict(loader.state_dict())
        >>> bool(torch.equal(next(passes)[1], next(iter(resumed))[1]))
        True
        >>> group.close()
        """
        # every rank reaches the agreements below, also one whose checkpoint is refused (a rank that raised
        # before them left its peers in a collective it never joined: gloo aborted them, review 77); a
        # refusal anywhere restores every rank's loader as it was before the call
        kept, inner = dict(vars(self)), _inner_ops(self.ops)
        # every attribute of the ops the load may set (the anchor's buffers, the count of anchors measured,
        # which seeds the measurements' random transforms: review 125, a rank that accepted a checkpoint refused
        # elsewhere kept the checkpoint's count, and its augmented measurements differed from then on)
        kept_ops = (dict(vars(inner)), self.ops.sharded_solves)
        error = None
        with _common.held_warnings() as said:  # said once the ranks agree the load stands
            try:
                super().load_state_dict(state)
                solves = state.get("sharded_solves", 0)
                self.ops.sharded_solves = int(solves) if isinstance(solves, (int, np.integer)) and solves >= 0 else 0
            except Exception as exc:  # (any: a rank that leaves here early leaves its peers waiting)
                error = exc
        try:
            self.ops.agree(int(error is None), "whether the checkpoint loaded (1) or was refused (0)")
            if error is None:
                self.ops.agree(
                    _digest(self._position, self._state.step, self._state.cursor, self._state.n_selections,
                            self._state.batch_idx, self._state.batch_w, self._state.drop.active),
                    "the restored loader state (load the same checkpoint on every rank)",
                )
        except CollectiveError as exc:
            self._restore(kept, kept_ops)
            if error is not None:
                raise CollectiveError(f"{exc} This rank refused the checkpoint: {error}") from error
            raise
        if error is not None:  # refused on every rank alike: each raises its own reason
            self._restore(kept, kept_ops)
            raise error
        try:  # (a load rolled back above said nothing of the state it did not keep)
            _common.say(said)
        except Exception:  # a warnings filter that raises (error): the loader as it was, as CrestLoader leaves it
            self._restore(kept, kept_ops)
            raise

    def _restore(self, kept: dict, kept_ops: tuple) -> None:
        """The loader (and its ops' attributes and solve count) as :meth:`load_state_dict` found them."""
        vars(self).clear()
        vars(self).update(kept)
        inner = _inner_ops(self.ops)
        vars(inner).clear()
        vars(inner).update(kept_ops[0])
        self.ops.sharded_solves = kept_ops[1]


# ------------------------------------------------------------------------------------------------
# the examples' setup
# ------------------------------------------------------------------------------------------------
class _OneProcess:
    """The process group of the examples: ``torch.distributed`` initialised with one gloo process, as
    ``torchrun --nproc-per-node 1`` starts one (its file store in a temporary folder), and ``data``, the
    torch adapter's example training set of ``n`` random points of 4 features in two classes.
    :meth:`close` destroys the group."""

    def __init__(self, n: int = 32):
        self._store = tempfile.TemporaryDirectory()
        dist.init_process_group("gloo", init_method=f"file://{self._store.name}/pg", rank=0, world_size=1)
        self.data = _example_data(n)

    def close(self) -> None:
        """Destroy the process group and remove its file store."""
        dist.destroy_process_group()
        self._store.cleanup()
