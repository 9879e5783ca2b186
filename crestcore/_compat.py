"""The one place that talks to array-api-compat.

Everything in ``crestcore`` resolves the array namespace of its inputs here, once, at the public
boundary. Helpers for the few host round trips the core needs (labels, random draws) live here too.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import array_api_compat
import array_api_compat.numpy  # the namespace of plain NumPy arrays (namespace's fast path)
from array_api_compat import array_namespace, device as _device, is_array_api_obj

__all__ = [
    "namespace",
    "device_of",
    "to_numpy",
    "from_numpy",
    "is_numpy_namespace",
    "namespace_name",
    "as_array",
]


def namespace(*arrays: Any, names: tuple[str, ...] | None = None):
    """Return the array-API namespace shared by ``arrays`` (``None`` entries are skipped).

    Raises ``TypeError`` naming the arguments when they come from different libraries (or are not
    arrays), and ``ValueError`` when they live on different devices.
    """
    if any(a is not None for a in arrays) and all(a is None or type(a) is np.ndarray for a in arrays):
        return array_api_compat.numpy  # plain host NumPy arrays (what array_namespace returns for them)
    present = [(i, a) for i, a in enumerate(arrays) if a is not None]
    labels = names or tuple(f"argument {i}" for i in range(len(arrays)))
    for i, a in present:
        if not is_array_api_obj(a):
            raise TypeError(
                f"{labels[i]} must be an array (NumPy, torch, CuPy, array-api-strict, ...), "
                f"got {type(a).__name__}"
            )
        if isinstance(a, np.ma.MaskedArray):  # its operations ignore masked entries, the kernels would not
            raise TypeError(
                f"{labels[i]} is a numpy.ma.MaskedArray, whose masks no computation here honours: pass the "
                f"rows you mean, e.g. {labels[i]}.data[~numpy.ma.getmaskarray({labels[i]}).any(axis=1)]"
            )
        layout = getattr(a, "layout", None)  # torch's sparse layouts (no torch import in the core)
        if layout is not None and str(layout) != "torch.strided":
            raise TypeError(f"{labels[i]} is a {layout} tensor: pass a dense one ({labels[i]}.to_dense())")
    try:
        xp = array_namespace(*[a for _, a in present])
    except TypeError as exc:
        kinds = ", ".join(f"{labels[i]}: {type(a).__module__}.{type(a).__name__}" for i, a in present)
        raise TypeError(f"arrays from different libraries cannot be mixed ({kinds})") from exc
    traced = [labels[i] for i, a in present if type(a).__module__.startswith("jax") and "Tracer" in type(a).__name__]
    if traced:  # (a tracer has no device: the device check below blamed a device mismatch, review 134)
        raise TypeError(f"{traced[0]} is a JAX tracer: crestcore's functions check their inputs on the host (values, "
                        "finiteness) and cannot run inside jax.jit, jax.grad or jax.vmap; call them on concrete "
                        "arrays, outside the traced function")
    if len(present) > 1:
        devs = [(labels[i], _device(a)) for i, a in present]
        first = devs[0][1]
        for lab, dev in devs[1:]:
            if dev != first:
                raise ValueError(
                    f"{lab} is on device {dev!r} but {devs[0][0]} is on {first!r}; move them to one device"
                )
    return xp


def native_order(dtype):
    """A NumPy dtype in the host's byte order (``'>f8'`` -> ``float64`` on a little-endian host); any other
    dtype as it is. Results are returned in the input's dtype in this order: array-API dtypes carry no byte
    order, and NumPy's own operations return native arrays (review 122: a big-endian input gave big-endian
    weights and gains but a native objective).

    Examples
    --------
    >>> import numpy as np
    >>> native_order(np.dtype(">f4")) == np.float32, native_order(np.dtype("float64")) == np.float64
    (True, True)
    """
    if isinstance(dtype, np.dtype) and not dtype.isnative:
        return dtype.newbyteorder("=")
    return dtype


def namespace_name(xp) -> str:
    """'numpy', 'torch', 'cupy', 'array_api_strict', ... for a compat namespace."""
    if array_api_compat.is_numpy_namespace(xp):
        return "numpy"
    if array_api_compat.is_torch_namespace(xp):
        return "torch"
    if array_api_compat.is_cupy_namespace(xp):
        return "cupy"
    name = getattr(xp, "__name__", type(xp).__name__)
    return name.split(".")[-1] if name.startswith("array_api_compat") else name.split(".")[0]


_INDEX_DTYPES: dict[int, Any] = {}


def index_dtype(xp):
    """The namespace's dtype for indices: its array-API default for indexing, int64 in every library
    but JAX without ``jax_enable_x64`` (int32: an int64 request is truncated there, with a warning per
    call). int64 where the namespace does not say.

    >>> import numpy as np
    >>> index_dtype(namespace(np.zeros(2)))
    dtype('int64')
    """
    key = id(xp)
    if key not in _INDEX_DTYPES:
        dt = xp.int64
        info = getattr(xp, "__array_namespace_info__", None)
        if callable(info):
            try:
                dt = info().default_dtypes()["indexing"]
            except Exception:  # an older namespace: int64
                pass
        if "jax" not in namespace_name(xp):  # jax's default follows jax_enable_x64, which may change: not cached
            _INDEX_DTYPES[key] = dt
        return dt
    return _INDEX_DTYPES[key]


def wide_float(xp):
    """The namespace's widest real floating dtype for accumulations: float64, but float32 in JAX without
    ``jax_enable_x64`` (a float64 request is truncated there, with a warning per call).

    >>> import numpy as np
    >>> wide_float(namespace(np.zeros(2))) == np.float64
    True
    """
    info = getattr(xp, "__array_namespace_info__", None)
    if callable(info) and "jax" in namespace_name(xp):
        try:
            if "float64" not in info().dtypes(kind="real floating"):
                return xp.float32
        except Exception:  # an older namespace: float64
            pass
    return xp.float64


def float_errors_quiet():
    r"""A context in which NumPy's floating-point errors (overflow, invalid, divide, underflow: NumPy's
    ``RuntimeWarning``\ s, casts included) pass silently, for code that checks the result's finiteness itself.
    ``numpy.errstate``, not ``warnings.catch_warnings``: that one's exit resets every module's record of the
    warnings already shown, so a user's once-per-line warning came back after every trust check (review 163),
    and its filter is the whole process's while it lasts. Other array libraries do not warn there."""
    return np.errstate(all="ignore")


def is_numpy_namespace(xp) -> bool:
    return bool(array_api_compat.is_numpy_namespace(xp))


def device_of(x: Any):
    return _device(x)


def on_cpu(x: Any) -> bool:
    """Whether ``x`` lives in host memory as NumPy or a CPU torch tensor (a free ``to_numpy``)."""
    if isinstance(x, np.ndarray):
        return True
    if array_api_compat.is_torch_array(x):
        return x.device.type == "cpu"
    return False


class _LazyTorchDtypes:
    """torch dtypes NumPy cannot hold, resolved on first use (importing crestcore imports no torch)."""

    def __contains__(self, dtype) -> bool:
        import sys

        torch = sys.modules.get("torch")
        return torch is not None and dtype == torch.bfloat16


_NO_NUMPY_EQUIVALENT = _LazyTorchDtypes()


_ONCE: dict[str, tuple] = {}  # key -> (weak reference to the last read-only array asked about, its value)


_FROZEN: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()


def frozen_copy(a) -> np.ndarray:
    """A new read-only array with ``a``'s values (``a`` itself is not changed), known to
    :func:`once_per_array` as one nothing can write: no view of it was ever handed out writeable."""
    out = np.array(a, copy=True)
    out.flags.writeable = False
    _FROZEN[id(out)] = out
    return out


def once_per_array(key: str, a: np.ndarray, fn) -> Any:
    """``fn(a)``, computed once per array ``a`` made by :func:`frozen_copy` (per ``key``, for the last
    such array asked about, held weakly): a value of an array nobody can write cannot go stale. Any other
    array is computed every time: a writeable one, a read-only view (its base may be written: review 72,
    a hand-built drop state's pool counted stale and dropped below the floor), or a read-only owner that
    a writeable view taken before it was frozen can still write (review 73). For O(n) summaries asked at
    every step of arrays that change only by being replaced (the pool mask, the labels), which the
    controller and the drop module make by :func:`frozen_copy`."""
    if _FROZEN.get(id(a)) is not a:
        return fn(a)
    ref, value = _ONCE.get(key, (None, None))
    if ref is not None and ref() is a:
        return value
    value = fn(a)
    _ONCE[key] = (weakref.ref(a), value)
    return value


def take_rows(xp, a: Any, idx: Any) -> Any:
    """``xp.take(a, idx, axis=0)``; a NumPy array not in C order by fancy indexing, which copies only the rows
    taken: ``np.take`` first copies all of such an array (a Fortran-ordered one, a column slice), 126 ms
    against 2-5 ms for 5,000 rows of a Fortran-ordered 10^6 x 64 array, and at every step of a greedy that
    gathers per step (review 129: GLISTER's stochastic greedy 450x slower)."""
    if isinstance(a, np.ndarray) and not a.flags.c_contiguous:
        return a[np.asarray(idx)]
    return xp.take(a, idx, axis=0)


def detached(x: Any) -> Any:
    """``x`` without its autograd graph where it has one (a torch tensor that requires grad; duck-typed, no
    torch import): selections are not differentiable, and their outputs should carry no graph (the generic
    reference path's did, and torch warned on its asarray calls). A NumPy array of the other byte order comes
    as a native copy: the compiled kernels take native arrays only, and such an input went to the generic
    path, several times slower (review 122)."""
    if getattr(x, "requires_grad", False) and callable(getattr(x, "detach", None)):
        return x.detach()
    if isinstance(x, np.ndarray) and not x.dtype.isnative:
        return x.astype(native_order(x.dtype))
    return x


def to_numpy(x: Any) -> np.ndarray:
    """Copy an array of any supported library to host NumPy (one transfer). bfloat16 tensors, which
    NumPy cannot represent, come back as float32 (exactly: every bfloat16 is a float32)."""
    if isinstance(x, np.ndarray):
        return x
    if array_api_compat.is_torch_array(x):
        x = x.detach()
        if x.dtype in _NO_NUMPY_EQUIVALENT:  # NumPy has no bfloat16: the exact float32 values instead
            x = x.float()
        return x.cpu().numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if hasattr(x, "__dlpack__"):  # array-api-strict and other host libraries
        try:
            return np.from_dlpack(x)
        except Exception:
            pass
    out = np.asarray(x)
    if out.dtype == object:
        raise TypeError(f"cannot copy a {type(x).__name__} to NumPy")
    return out


def from_numpy(a: np.ndarray, xp, device=None):
    """Move a host NumPy array into namespace ``xp`` on ``device``."""
    if array_api_compat.is_numpy_namespace(xp):
        return a
    if array_api_compat.is_torch_namespace(xp):
        import sys

        torch = sys.modules["torch"]  # imported by the caller's data (xp is its namespace); the core imports no torch
        a = _contiguous(a)
        if not a.flags.writeable:  # torch warns on (and would share) a read-only buffer: a copy instead
            a = a.copy()
        return torch.as_tensor(a, device=device)
    return xp.asarray(_contiguous(a), device=device)


def _contiguous(a: np.ndarray) -> np.ndarray:
    """C-contiguous copy when needed, keeping 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else np.array(a, order="C")


def host_to(a: np.ndarray, like):
    """Host array ``a`` in the namespace, device and (floating) dtype of ``like``."""
    xp = array_namespace(like)
    out = from_numpy(a, xp, _device(like))
    if np.issubdtype(a.dtype, np.floating):
        out = xp.astype(out, like.dtype)
    return out


def as_array(value, xp, like):
    """A scalar or host array in ``xp`` on the device of ``like``."""
    return xp.asarray(value, device=_device(like))
