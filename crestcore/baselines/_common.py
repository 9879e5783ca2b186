"""Helpers shared by the baselines: boundary checks, per-epoch randomness, results."""

from __future__ import annotations

import math
import numbers

import numpy as np

from .._compat import from_numpy, index_dtype, namespace
from .._validation import isdtype, make_rng, not_floating
from ..facility import Selection
from ..similarity import restore


def set_row(xp, a, i: int, value):
    """``a`` with ``a[i] = value`` (a row, or an element of a vector): written in place where the
    library allows it, else built anew (JAX arrays are immutable; the array API has no functional update,
    so the row is chosen with ``where``, O(size) instead of O(row))."""
    try:
        a[i, ...] = value
        return a
    except TypeError:
        hit = xp.arange(a.shape[0], device=a.device) == i
        hit = xp.reshape(hit, (a.shape[0],) + (1,) * (a.ndim - 1))
        return xp.where(hit, xp.asarray(value, dtype=a.dtype, device=a.device), a)


def check_real(value, name: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number in the stated interval; errors name the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    bad_low = low is not None and (v <= low if low_open else v < low)
    bad_high = high is not None and (v >= high if high_open else v > high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        interval = ("(" if low_open or low is None else "[") + f"{lo}, {hi}" + (")" if high_open or high is None else "]")
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_vector(xp, x, name: str, *, floating: bool = True):
    """x must be a non-empty 1-D array (finite real floating when ``floating``)."""
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got {x.ndim}-D with shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if floating:
        if not isdtype(xp, x.dtype, "real floating"):
            raise not_floating(name, x.dtype)
        if not bool(xp.all(xp.isfinite(x))):
            raise ValueError(f"{name} contains NaN or infinite values")


def epoch_rng(rng, epoch: int | None, name: str = "rng") -> np.random.Generator:
    """The Generator for one draw.

    An int seed combined with an ``epoch`` gives ``default_rng([seed, epoch])``: a fresh, independent
    stream per epoch that depends on ``(seed, epoch)`` alone (so any epoch can be reproduced on its
    own, e.g. after a resume). A Generator is used as it is (its draws advance it); ``epoch`` then does
    not enter the draw.
    """
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        if int(rng) < 0:
            raise ValueError(f"{name} seed must be non-negative, got {int(rng)}")
        if epoch is not None:
            return np.random.default_rng([int(rng), int(epoch)])
    return make_rng(rng, name)


def resolve_xp(xp, device):
    """The array-API namespace for a module (``numpy``, ``torch``, ``array_api_strict``, ...) or None."""
    if xp is None:
        xp = np
    if not hasattr(xp, "asarray"):
        raise TypeError(f"xp must be an array namespace module (numpy, torch, ...), got {type(xp).__name__}")
    try:
        probe = xp.asarray([0], device=device) if device is not None else xp.asarray([0])
    except Exception as exc:  # noqa: BLE001 - report what the library said
        raise ValueError(f"cannot create an array with xp={getattr(xp, '__name__', xp)!r} "
                         f"on device={device!r}: {exc}") from exc
    return namespace(probe, names=("xp",)), probe


def host_selection(xp, like_dev, dtype, indices: np.ndarray, weights: np.ndarray, gains: np.ndarray,
                   objective: float) -> Selection:
    """A Selection built from host arrays, moved to ``xp`` on ``like_dev`` with floating ``dtype``; a
    value that does not fit ``dtype`` (weights of 70,000 in float16) is refused with a ``ValueError`` by
    the numerics policy (:func:`crestcore.similarity.restore`), never returned as ``inf``."""
    idx = xp.astype(from_numpy(np.asarray(indices, dtype=np.int64), xp, like_dev), index_dtype(xp))

    def moved(a, what):
        return restore(xp, from_numpy(np.asarray(a, dtype=np.float64), xp, like_dev), 0, dtype, what)

    return Selection(indices=idx, weights=moved(weights, "weights"), gains=moved(gains, "gains"),
                     objective=moved(objective, "objective"))


def reselect_due(epoch, every, *, start: int = 0) -> bool:
    """True when a selection made every ``every`` epochs from ``start`` is due at ``epoch``.

    CRAIG, GradMatch and GLISTER reselect their subset every R epochs and train on it in between:
    ``reselect_due(e, R)`` is True for e = start, start + R, start + 2R, ... (0-based epochs), False
    before ``start``.

    Examples
    --------
    >>> from crestcore.baselines import reselect_due
    >>> [epoch for epoch in range(10) if reselect_due(epoch, 3)]
    [0, 3, 6, 9]
    >>> [epoch for epoch in range(10) if reselect_due(epoch, 3, start=2)]
    [2, 5, 8]
    """
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
        raise TypeError(f"epoch must be an integer, got {type(epoch).__name__}")
    if isinstance(every, bool) or not isinstance(every, numbers.Integral):
        raise TypeError(f"every must be an integer, got {type(every).__name__}")
    if isinstance(start, bool) or not isinstance(start, numbers.Integral):
        raise TypeError(f"start must be an integer, got {type(start).__name__}")
    if int(epoch) < 0:
        raise ValueError(f"epoch must be >= 0, got {int(epoch)}")
    if int(every) < 1:
        raise ValueError(f"every must be >= 1, got {int(every)}")
    if int(start) < 0:
        raise ValueError(f"start must be >= 0, got {int(start)}")
    e, r, s = int(epoch), int(every), int(start)
    return e >= s and (e - s) % r == 0


__all__ = ["check_real", "check_bool", "check_vector", "epoch_rng", "resolve_xp", "host_selection",
           "reselect_due"]
