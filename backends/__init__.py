"""Fast kernels, one module per array library, all with the same kernel names and signatures.

``crestcore.backends.numba``  NumPy input, Numba-jitted (parallel ``prange``) CPU kernels
``crestcore.backends.torch``  torch tensors, CPU and CUDA, batched, no host sync inside loops
``crestcore.backends.cupy``   CuPy arrays on the GPU

The contract (``crestcore.backends.contract``: kernel names and parameters, the similarity transforms,
the zero-distance snap, the stochastic sampling rule, the capability table) is re-exported here.
Kernels (see ``crestcore._reference_kernels`` for the exact behaviour every implementation meets):
``similarity_batched``, ``greedy_batched``, ``assign_batched``, ``greedy_features``, ``facility_batched``
(the first three in one call). Host kernels (``HOST_KERNEL_NAMES``: ``draw_stratified``,
``order_scores``, ``finite_abs_max``, ``class_counts``) take host NumPy arrays whatever the features'
library and exist in the Numba module only: :func:`get_host_kernel`.

:func:`get_kernel` is the dispatch rule: a native kernel is returned only when the namespace matches,
the optional dependency imports, and the module's cheap ``usable_for`` check passes; otherwise ``None``
and the caller runs the generic array-API reference. Nothing here imports the floors above
(``crestcore`` proper or the adapters), and importing this package imports no optional dependency.
"""

from __future__ import annotations

import importlib
import os
from typing import Any
from collections.abc import Callable

from .contract import (
    CAPABILITIES,
    HOST_KERNEL_NAMES,
    KERNEL_NAMES,
    KERNELS,
    METRICS,
    OPTIMIZERS,
    SIGNATURES,
    SPARSE_KERNEL_NAMES,
    array_api,
    backend_for_namespace,
    check_choice,
    check_picks,
    draw_bits,
    exact_shift,
    is_choice,
    refuse_draws_outside,
    refuse_nonfinite_gains,
    sample_sizes,
    snap_tolerance,
)

# namespace name (as crestcore._compat.namespace_name reports it) -> backend module, from the contract's
# capability table
_MODULES = {c.namespace: c.module for c in CAPABILITIES.values() if KERNEL_NAMES[0] in c.kernels}
_SPARSE_MODULES = {c.namespace: c.module for c in CAPABILITIES.values() if SPARSE_KERNEL_NAMES[0] in c.kernels}
_loaded: dict[str, Any] = {}
_failed: dict[str, str] = {}

__all__ = [
    "CAPABILITIES",
    "SIGNATURES",
    "KERNELS",
    "METRICS",
    "OPTIMIZERS",
    "check_choice",
    "check_picks",
    "is_choice",
    "refuse_nonfinite_gains",
    "refuse_draws_outside",
    "backend_for_namespace",
    "sample_sizes",
    "draw_bits",
    "snap_tolerance",
    "exact_shift",
    "array_api",
    "KERNEL_NAMES",
    "SPARSE_KERNEL_NAMES",
    "HOST_KERNEL_NAMES",
    "get_kernel",
    "get_host_kernel",
    "knn_builder",
    "backend_module",
    "available_backends",
    "available_bytes",
    "host_available_bytes",
]


# where Numba caches when it finds no place next to the package or in the user's cache folder (_import_kernels):
# a distributed rank's own slot, set by crestcore.adapters.distributed.numba_cache_slot; None: the temporary directory
_CACHE_FALLBACK: str | None = None


def _user_temp_folder() -> str:
    """This user's Numba cache folder in the temporary directory, ``crestcore-numba-<uid>`` (the fallback of
    :func:`_import_kernels`, and the base of a distributed rank's slot where its own base is not writable)."""
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"crestcore-numba-{os.getuid() if hasattr(os, 'getuid') else 0}")


def _private_folder(path) -> str:
    """``path``, made if missing, as a folder only this user can write (a cache whose index Numba loads with pickle
    must not be another user's to fill): this user's own is kept (its group and others' write permission taken
    away: a umask of 002 made it group-writable, review 154), another user's gives way to a new private folder
    beside it (``tempfile.mkdtemp``)."""
    import tempfile

    path = str(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    if not hasattr(os, "getuid"):  # (no owners to tell apart)
        return path
    st = os.stat(path)
    if st.st_uid != os.getuid():
        return tempfile.mkdtemp(prefix=os.path.basename(path.rstrip(os.sep)) + "-", dir=os.path.dirname(path) or None)
    if st.st_mode & 0o022:
        os.chmod(path, st.st_mode & ~0o022)
    return path


def _outside_stacklevel() -> int:
    """The ``stacklevel`` of ``warnings.warn``, called by the caller of this function, that names the first frame
    outside crestcore (the user's call)."""
    import sys

    f: Any = sys._getframe(1)
    level = 1
    while f is not None and str(f.f_globals.get("__name__", "")).startswith("crestcore"):
        f, level = f.f_back, level + 1
    return level


def _index_head(path: str):
    """``(numba version, source stamp, overloads)`` of a Numba cache index file (its format: the pickled version
    string, then the pickled ``(stamp, overloads)``), or ``None`` when it is missing or unreadable."""
    import pickle

    try:
        with open(path, "rb") as f:
            version = pickle.load(f)
            stamp, overloads = pickle.loads(f.read())
    except Exception:  # missing, truncated or of another format: not an index this code can use
        return None
    return version, stamp, overloads


def _copy_replacing(src: str, dst: str) -> None:
    """Copy a file so that a concurrent reader sees the old file or the whole new one (a temporary name, then
    ``os.replace``, as Numba writes its own)."""
    import shutil
    import uuid

    tmp = f"{dst}.tmp.{uuid.uuid4().hex[:16]}"
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _seed_shipped_kernels(mod: str, cache_dir: str | None = None) -> int:
    """Copy the compiled kernels a wheel ships (``backends/__pycache__``, written by ``make wheel``) into the folder
    Numba caches ``crestcore.backends.<mod>`` in, when that is not the package's own folder: Numba reads its in-tree
    cache only where it can also write there, so a package installed by root and run as another user, or a
    read-only container image, compiled every kernel again (review 149). Returns the number of indexes copied.

    Called by the kernel modules as they are imported, before their kernels find their cache. ``cache_dir``: a
    Numba cache folder crestcore chose for the kernels (a distributed rank's slot, which may lie below a user's
    ``NUMBA_CACHE_DIR``: the slot is crestcore's, and a new one gets the shipped kernels); None: the fallback folder of
    :func:`_import_kernels` where it set one, else the folder Numba chooses itself, only while ``NUMBA_CACHE_DIR``
    is unset (a user's own cache folder or locator classes are left alone: an empty one may be there to time a
    cold start).
    Only an index of this source (its stamp) and this Numba version is copied, and only where the target's index
    is missing or stale: a user's own fresh cache is kept. Best effort: any failure leaves the folder to Numba,
    which compiles as it would have."""
    try:
        from numba import __version__ as numba_version
        from numba.core import caching
        from numba.core import config as numba_config
    except Exception:
        return 0
    config: Any = numba_config
    cache_dir = _FALLBACK_SET if cache_dir is None else cache_dir
    if getattr(config, "CACHE_LOCATOR_CLASSES", None) or (cache_dir is None and config.CACHE_DIR):
        return 0
    here = os.path.dirname(os.path.abspath(__file__))
    source, shipped = os.path.join(here, f"{mod}.py"), os.path.join(here, "__pycache__")
    try:
        names = sorted(f for f in os.listdir(shipped) if f.startswith(f"{mod}.") and f.endswith(".nbi"))
    except OSError:
        return 0
    if not names or not os.path.isfile(source):
        return 0
    copied, before = 0, config.CACHE_DIR
    try:
        if cache_dir is not None:
            config.CACHE_DIR = str(cache_dir)
        locator = None
        classes: list[Any] = list(caching.CacheImpl._locator_classes)
        for cls in classes:  # Numba's own choice of folder, in its order
            locator = cls.from_function(_seed_shipped_kernels, source)  # (the folder depends on the file only)
            if locator is not None:
                break
        if locator is None:
            return 0
        target = os.path.abspath(locator.get_cache_path())
        if os.path.samefile(target, shipped):
            return 0  # the package's own folder: Numba reads the shipped kernels there itself
        stamp = locator.get_source_stamp()
        for name in names:
            head = _index_head(os.path.join(shipped, name))
            if head is None or head[0] != numba_version or head[1] != stamp:
                continue  # another Numba's or another source's kernels: Numba would not load them
            own = _index_head(os.path.join(target, name))
            if own is not None and own[0] == numba_version and own[1] == stamp:
                continue  # the user's cache of this source: theirs, possibly with more kernels
            for data in head[2].values():  # the data first: the index that names them comes last
                if not (isinstance(data, str) and os.path.basename(data) == data):
                    raise ValueError(f"unexpected data file name in {name}: {data!r}")
                _copy_replacing(os.path.join(shipped, data), os.path.join(target, data))
            _copy_replacing(os.path.join(shipped, name), os.path.join(target, name))
            copied += 1
    except Exception:  # an optimisation only: Numba compiles what was not copied, as it would have
        return copied
    finally:
        config.CACHE_DIR = before
    return copied


# the folder _import_kernels's fallback gave Numba (config.CACHE_DIR), which _seed_shipped_kernels fills
_FALLBACK_SET: str | None = None


def _import_kernels(mod: str):
    """``crestcore.backends.<mod>``, imported. A Numba module whose cached kernels find nowhere to cache
    (the installed package's folder is not writable, as in a container run as another user, and neither is the
    user's cache folder, as with ``HOME=/``: Numba raises "no locator available" at the import) is imported again
    with Numba's cache folder set to one of this user's in the temporary directory, said once (review 149: the
    first selection failed with Numba's bare error). Numba's ``CACHE_DIR`` then stays set for the process: any
    other cached Numba function would have failed the same way."""
    global _FALLBACK_SET
    try:
        return importlib.import_module(f"crestcore.backends.{mod}")
    except RuntimeError as exc:
        if "no locator available" not in str(exc) or not mod.startswith("numba"):
            raise
        import sys
        import warnings

        from numba.core import config as numba_config

        config: Any = numba_config  # (its settings are set at import: no attributes for a type checker)
        if config.CACHE_DIR:  # a cache folder was given and still fails: nothing of ours to fix
            raise
        # a distributed rank's own slot where it claimed one (crestcore.adapters.distributed.numba_cache_slot: ranks
        # must not share a cache, review 153), else this user's folder in the temporary directory, used only when it
        # is this user's and nobody else can write it (Numba's index is a pickle), else a new private one
        folder = _CACHE_FALLBACK or _user_temp_folder()
        try:
            folder = _private_folder(folder)
        except OSError as err:
            raise RuntimeError(f"{exc}. crestcore: Numba can cache its kernels neither next to the installed "
                               f"package nor in your cache folder, nor in {folder} ({err}): set NUMBA_CACHE_DIR to a "
                               "writable folder") from exc
        config.CACHE_DIR = _FALLBACK_SET = folder
        sys.modules.pop(f"crestcore.backends.{mod}", None)  # (the failed import's partial module)
        warnings.warn(f"crestcore: Numba cannot cache the kernels next to the installed package or in your cache "
                      f"folder (neither is writable: {exc}); they are cached in {folder} instead, for every Numba "
                      "function of this process. Set NUMBA_CACHE_DIR to a writable folder to choose where.",
                      RuntimeWarning, stacklevel=_outside_stacklevel())
        return importlib.import_module(f"crestcore.backends.{mod}")


def backend_module(namespace_name: str):
    """The backend module for an array namespace, or ``None`` when none exists or it cannot import.

    Examples
    --------
    >>> backend_module("numpy").__name__
    'crestcore.backends.numba'
    >>> backend_module("array_api_strict") is None
    True
    """
    mod = _MODULES.get(namespace_name)
    if mod is None:
        return None
    if mod in _loaded:
        return _loaded[mod]
    if mod in _failed:
        return None
    try:
        m = _import_kernels(mod)
    except ImportError as exc:  # the optional dependency is not installed
        _failed[mod] = str(exc)
        if mod == "numba":  # a core dependency: its absence costs ~250x on every NumPy selection, say so once
            import warnings

            warnings.warn(
                f"crestcore: the Numba kernels for NumPy input cannot import ({exc}); NumPy selection runs "
                "on the generic array-API reference, about 250x slower. Install numba (`pip install numba`, "
                "a dependency of crestcore) to get them back.",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    _loaded[mod] = m
    return m


def get_kernel(name: str, namespace_name: str, *arrays: Any) -> Callable | None:
    """The native kernel ``name`` for these arrays, or ``None`` (use the generic reference).

    Examples
    --------
    >>> import numpy as np
    >>> S, valid, budgets = np.zeros((1, 3, 3)), np.ones((1, 3), dtype=bool), np.array([2])
    >>> from crestcore.backends import numba
    >>> get_kernel("greedy_batched", "numpy", S, valid, budgets) is numba.greedy_batched
    True
    >>> get_kernel("greedy_batched", "numpy", S.astype(np.float16), valid, budgets) is None
    True
    """
    if name in SPARSE_KERNEL_NAMES:
        m = _sparse_module(namespace_name)
        return getattr(m, name) if m is not None and m.usable_for(name, *arrays) else None
    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown kernel {name!r}; known: {KERNEL_NAMES + SPARSE_KERNEL_NAMES}")
    m = backend_module(namespace_name)
    if m is None or not m.usable_for(name, *arrays):
        return None
    return getattr(m, name)


def get_host_kernel(name: str, start: bool = True) -> Callable | None:
    """The Numba host kernel ``name`` (host NumPy arrays, whatever library the features are in), or
    ``None`` when Numba cannot import (the caller runs the NumPy reference, which gives the same result).

    With ``start=False`` the kernel is returned only when the Numba backend is loaded already: a caller
    whose reference is cheap for its inputs need not start Numba (0.5-0.9 s once per process, its import
    and its first dispatch) when nothing else in the process uses it, e.g. a torch training loop.

    Examples
    --------
    Two subsets of 2 from five examples of one class, from Floyd draws:

    >>> import numpy as np
    >>> draw = get_host_kernel("draw_stratified")
    >>> draw(np.arange(5), np.zeros(5, dtype=np.int64), np.array([2]), np.array([[0, 0], [3, 4]])).tolist()
    [[0, 4], [3, 4]]
    """
    if name not in HOST_KERNEL_NAMES:
        raise ValueError(f"unknown host kernel {name!r}; known: {HOST_KERNEL_NAMES}")
    if not isinstance(start, bool):
        raise TypeError(f"start must be True or False, got {start!r}")
    if not start and _MODULES["numpy"] not in _loaded:
        return None
    m = backend_module("numpy")
    return None if m is None else getattr(m, name)


def available_backends() -> dict[str, str]:
    """Which backends import here: ``{'numba': 'ok' | reason, ...}`` (imports them).

    Examples
    --------
    >>> status = available_backends()
    >>> sorted(status), status["numba"]
    (['cupy', 'numba', 'torch'], 'ok')
    """
    out = {}
    for ns, mod in _MODULES.items():
        out[mod] = "ok" if backend_module(ns) is not None else _failed.get(mod, "not importable")
    return out


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2's "max" (no limit): None


def _stat_value(path: str, keys: tuple) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                k, _, v = line.partition(" ")
                if k in keys and v.strip().isdigit():
                    return int(v)
    except OSError:
        pass
    return 0


def cgroup_headroom(root: str = "/") -> int | None:
    """Bytes this process's memory cgroup (Linux, v2 or v1) can still take before its limit: the smallest
    ``limit - usage + inactive file pages`` over the process's cgroup and its ancestors that have a limit
    (a container's limit is one of them; ``/proc/meminfo`` shows the host's memory there), or None where
    no limit is set or none can be read. ``root``: where ``/proc`` and ``/sys`` are (tests).

    Examples
    --------
    >>> room = cgroup_headroom()
    >>> room is None or room >= 0
    True
    """
    places: list[tuple[str, str, str, str, tuple[str, ...]]] = []  # (root, cgroup, limit, usage, stat keys)
    try:
        with open(os.path.join(root, "proc/self/cgroup")) as fh:
            for line in fh:
                parts = line.rstrip("\n").split(":", 2)
                if len(parts) != 3:
                    continue
                hier, ctrl, rel = parts
                if hier == "0" and ctrl == "":
                    places.append((os.path.join(root, "sys/fs/cgroup"), rel, "memory.max", "memory.current",
                                   ("inactive_file",)))
                elif "memory" in ctrl.split(","):
                    places.append((os.path.join(root, "sys/fs/cgroup/memory"), rel, "memory.limit_in_bytes",
                                   "memory.usage_in_bytes", ("total_inactive_file", "inactive_file")))
    except OSError:
        return None
    best = None
    for base, rel, limit_file, usage_file, keys in places:
        rel = rel.strip("/")
        while True:  # the cgroup, then each ancestor (a namespaced path may not exist: skipped)
            d = os.path.join(base, rel) if rel else base
            limit = _read_int(os.path.join(d, limit_file))
            usage = _read_int(os.path.join(d, usage_file))
            if limit is not None and usage is not None and limit < (1 << 60):  # v1's "no limit" is ~2^63
                stat = os.path.join(d, "memory.stat")
                room = max(0, limit - usage + min(usage, _stat_value(stat, keys)))
                best = room if best is None else min(best, room)
            if not rel:
                break
            rel = os.path.dirname(rel)
    return best


def host_available_bytes() -> int | None:
    """Memory the host can give now without swapping (Linux ``MemAvailable``; else free physical pages),
    bounded by this process's memory cgroup limit where one is set (:func:`cgroup_headroom`: a container's
    ``/proc/meminfo`` shows the host's memory), or None where nothing can be read.

    Examples
    --------
    >>> free = host_available_bytes()
    >>> free is None or free >= 0
    True
    """
    free = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if free is None:
        try:
            free = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            free = None
    room = cgroup_headroom()
    if room is not None:
        free = room if free is None else min(free, room)
    return free


def available_bytes(namespace_name: str, array: Any) -> int | None:
    """Memory available now where ``array`` lives: the backend module's ``available_bytes`` (a GPU's
    free memory for device arrays), else the host's; None when it cannot be told.

    Examples
    --------
    A NumPy array lives on the host, so this is the host's available memory:

    >>> import numpy as np
    >>> free = available_bytes("numpy", np.zeros(3))
    >>> free is None or free > 0
    True
    """
    # NumPy arrays are on the host (and numba need not be imported for that); a torch or CuPy array's
    # library is imported already, so its backend module is cheap to load
    m = backend_module(namespace_name) if namespace_name in ("torch", "cupy") else None
    fn = getattr(m, "available_bytes", None) if m is not None else None
    if fn is not None:
        got = fn(array)
        if got is not None:
            return int(got)
    return host_available_bytes()


def _sparse_module(namespace_name: str):
    """The sparse-kernel module for a namespace (it builds on the dense one, so needs it to import)."""
    mod = _SPARSE_MODULES.get(namespace_name)
    if mod is None or backend_module(namespace_name) is None:
        return None
    if mod not in _loaded and mod not in _failed:
        try:
            _loaded[mod] = _import_kernels(mod)
        except ImportError as exc:
            _failed[mod] = str(exc)
    return _loaded.get(mod)


def knn_builder(namespace_name: str, array: Any = None) -> Callable | None:
    """The K-nearest-neighbour graph builder for these arrays (``crestcore.backends.knn.build``: faiss,
    NumPy input), or ``None`` when faiss is not installed or the input is not NumPy (then the core's
    exact tiled search runs). Imports faiss only when called for NumPy input.

    Examples
    --------
    >>> from crestcore.backends import knn
    >>> knn_builder("numpy") is (knn.build if knn.available() else None)
    True
    >>> knn_builder("torch") is None  # the core's exact tiled search runs
    True
    """
    if namespace_name != "numpy":
        return None
    from . import knn

    return knn.build if knn.available() else None
