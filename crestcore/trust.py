"""The trust check: how far the quadratic model can be trusted, and the schedule it drives.

``rho_t = |L_R(w_t) - F(delta_t)| / L_R(w_t)`` with ``L_R`` the loss on the random subsets. When
``rho_t > tau`` the coresets are reselected; the new anchor's curvature makes the check interval
``T1 = ceil(h * ||H_0|| / ||H_t||)`` and the number of coresets of the next selection
``P = min(max(1, ceil(b * T1)), cap)`` (the controller draws a selection's coresets before its curvature is measured).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._compat import detached

__all__ = ["relative_error", "should_reselect", "update_schedule"]


def _finite(x, name):
    if isinstance(x, (str, bytes, bool, np.bool_, complex)):  # float("2.0") and float(True) would pass
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    kind = str(getattr(x, "dtype", ""))
    if "bool" in kind or "complex" in kind:  # a 0-d bool array read as 1.0, a complex one as its real part
        raise TypeError(f"{name} must be a real number, got {type(x).__name__} of dtype {kind}")
    try:
        v = float(detached(x))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}") from exc
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def relative_error(loss_random, predicted, *, floor: float | None = None) -> float:
    """``rho = |L_R - F| / L_R``. ``loss_random`` must be positive and finite, unless ``floor`` is given:
    then the denominator is ``max(|L_R|, floor)`` (a fully learned sample whose float32 losses underflow to
    0, or a user loss that may go negative, is measured against the floor, not refused).

    Examples
    --------
    The loss measured on the random subset is 2.0 and the quadratic model predicted 1.5:

    >>> relative_error(2.0, 1.5)
    0.25

    A sample learned to a loss of exactly 0, predicted exactly, is trusted (the controller's floor: 1e-12, or the
    parameters' dtype's epsilon where coarser):

    >>> relative_error(0.0, 0.0, floor=1e-12)
    0.0
    """
    L = _finite(loss_random, "loss_random")
    F = _finite(predicted, "predicted")
    if floor is not None:
        fl = _finite(floor, "floor")
        if fl <= 0:
            raise ValueError(f"floor must be > 0, got {fl}")
        return _ratio(L, F, max(abs(L), fl))
    if L <= 0:
        raise ValueError(f"loss_random must be > 0 (rho divides by it), got {L}")
    return _ratio(L, F, L)


def _ratio(L: float, F: float, D: float) -> float:
    """``|L - F| / D``; where ``L - F`` overflows (finite values of opposite signs near the float range),
    ``|L / D - F / D|`` instead (``relative_error(1e308, -1e308)`` was inf, not 2)."""
    num = abs(L - F)
    return num / D if math.isfinite(num) else abs(L / D - F / D)


def should_reselect(rho, tau) -> bool:
    """True exactly when ``rho > tau``.

    Examples
    --------
    >>> should_reselect(0.25, tau=0.05)
    True
    >>> should_reselect(0.01, tau=0.05)
    False
    """
    r = _finite(rho, "rho")
    t = _finite(tau, "tau")
    if t <= 0:
        raise ValueError(f"tau must be > 0, got {t}")
    if r < 0:
        raise ValueError(f"rho must be >= 0, got {r}")
    return r > t


def update_schedule(h_norm_0, h_norm_t, *, h: float = 1.0, b: float = 5.0, cap: int | None = None):
    """New ``(T1, P)``: ``T1 = max(1, ceil(h * ||H_0|| / ||H_t||))``, ``P = max(1, ceil(b * T1))``,
    both capped at ``cap`` when one is given. Each ``ceil`` forgives a relative excess of 1e-9 (never more
    than 1/2) over an integer: rounding in the norms or in ``b * T1`` (equal curvature measured as a ratio
    1 + 1 ulp; ``0.14 * 50 = 7.000000000000001``) adds no step, so a ratio of ``1 + 1e-12`` gives
    ``T1 = 1``, not 2.

    A zero ``||H_t||`` (flat model) gives the largest interval allowed: ``T1 = cap`` when a cap is
    given, else it is an error.

    Examples
    --------
    The curvature norm has grown fourfold since the first selection, so the interval shrinks fourfold
    (here to one step); with a flatter model it grows, up to ``cap``:

    >>> update_schedule(1.0, 4.0, h=4, b=5)
    (1, 5)
    >>> update_schedule(2.0, 1.0, h=4, b=5, cap=20)
    (8, 20)
    >>> update_schedule(2.0, 0.0, cap=20)
    (20, 20)
    """
    h0 = _finite(h_norm_0, "h_norm_0")
    ht = _finite(h_norm_t, "h_norm_t")
    hh = _finite(h, "h")
    bb = _finite(b, "b")
    if h0 < 0 or ht < 0:
        raise ValueError(f"curvature norms must be >= 0, got h_norm_0={h0}, h_norm_t={ht}")
    if hh <= 0 or bb <= 0:
        raise ValueError(f"h and b must be > 0, got h={hh}, b={bb}")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, numbers.Real) or not math.isfinite(cap)
                            or int(cap) != cap or cap < 1):
        raise ValueError(f"cap must be a positive integer, got {cap!r}")
    if ht == 0:
        if cap is None:
            raise ValueError("h_norm_t is 0 and no cap is given: T1 would be infinite")
        T1 = int(cap)
    else:
        x = hh * (h0 / ht)
        if not math.isfinite(x):  # a curvature norm so small that the ratio overflows: flat, as ht == 0
            if cap is None:
                raise ValueError(f"h * h_norm_0 / h_norm_t overflows (h_norm_t={ht}) and no cap is given: "
                                 "T1 would be infinite")
            T1 = int(cap)
        else:
            # a relative 1e-9 slack: rounding in the norms (equal curvature, ratio 1 +- 1 ulp) adds no step,
            # and never more than one step away from ceil(x)
            T1 = max(1, math.ceil(x - min(1e-9 * max(1.0, x), 0.5)))
        if cap is not None:
            T1 = min(T1, int(cap))
    if not math.isfinite(bb * T1):
        if cap is None:
            raise ValueError(f"b * T1 overflows (b={bb}, T1={T1}) and no cap is given: P would be infinite")
        P = int(cap)
    else:
        y = bb * T1  # the same slack as T1's: b = 0.14, T1 = 50 gives 7.000000000000001, P = 7
        P = max(1, math.ceil(y - min(1e-9 * max(1.0, y), 0.5)))
    if cap is not None:
        P = min(P, int(cap))
    return T1, P
