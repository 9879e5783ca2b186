"""The training-step plan of a budgeted run, framework-free: written once, used by every loader.

A run over ``n`` examples in mini-batches of ``m`` has ``full_steps(n, m) = ceil(n / m)`` steps per
full-data epoch; a budget (a positive fraction of those) gives ``budget_steps(budget, full)`` steps per budgeted
epoch, rounded half up and never fewer than one.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["full_steps", "budget_steps"]


def full_steps(n: int, m: int) -> int:
    """Steps of one full-data epoch: ``ceil(n / m)``.

    >>> full_steps(60000, 128)
    469
    """
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return -(-int(n) // int(m))


def budget_steps(budget: float, full: int) -> int:
    """Steps of one budgeted epoch: ``max(1, floor(budget * full + 1/2))`` (half rounds up).

    ``budget`` is a positive fraction of the full-data steps (above 1: more steps than a full epoch);
    ``full`` the full-data epoch's steps (:func:`full_steps`).

    >>> budget_steps(0.1, 469)
    47
    >>> budget_steps(0.001, 10)
    1
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not (
            math.isfinite(float(budget)) and float(budget) > 0):
        raise ValueError(f"budget must be a positive finite fraction of the full-data steps, got {budget!r}")
    if isinstance(full, bool) or not isinstance(full, numbers.Integral) or full < 1:
        raise ValueError(f"full must be a positive integer (steps of a full-data epoch), got {full!r}")
    return max(1, int(math.floor(float(budget) * int(full) + 0.5)))
