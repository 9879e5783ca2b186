"""Tests for crestcore/trust.py: rho_t, the reselect decision and the T1 / P schedule.

Self-contained: no conftest fixtures.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from crestcore import (
    QuadraticConfig,
    quadratic_anchor,
    quadratic_init,
    quadratic_predict,
    quadratic_update,
    relative_error,
    should_reselect,
    update_schedule,
)

SETTINGS = settings(deadline=None, max_examples=60)
pos = st.floats(1e-6, 1e6, allow_nan=False, allow_infinity=False)


# --------------------------------------------------------------------------------------------
# rho
# --------------------------------------------------------------------------------------------
def _quadratic_loss(seed, D=6):
    rng = np.random.default_rng(seed)
    g, a = rng.normal(size=D), rng.uniform(0.1, 2.0, size=D)
    # the minimum of c + g.w + 1/2 w.(a w) is c - 1/2 sum(g^2 / a): keep the loss >= 1 everywhere
    c = 1.0 + 0.5 * float(np.sum(g * g / a)) + abs(float(rng.normal()))
    return (lambda w: c + g @ w + 0.5 * w @ (a * w)), (lambda w: g + a * w), a


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1))
def test_rho_is_zero_when_the_model_is_exact_and_grows_with_model_error(seed):
    loss, grad, a = _quadratic_loss(seed)
    rng = np.random.default_rng(seed + 1)
    w_a = rng.normal(size=6)
    delta = rng.normal(scale=0.5, size=6)
    cfg = QuadraticConfig()
    rhos = []
    for err in (0.0, 0.1, 0.3, 1.0, 3.0):  # curvature off by a growing factor
        s = quadratic_anchor(quadratic_init(w_a), loss(w_a), cfg)
        s = quadratic_update(s, grad(w_a), a * (1.0 + err), cfg)
        rhos.append(relative_error(loss(w_a + delta), quadratic_predict(s, delta, cfg)))
    assert rhos[0] < 1e-12
    assert all(r1 < r2 for r1, r2 in zip(rhos, rhos[1:]))


@SETTINGS
@given(L=pos, F=st.floats(-1e6, 1e6))
def test_rho_formula(L, F):
    assert relative_error(L, F) == abs(L - F) / L
    assert relative_error(L, L) == 0.0


@SETTINGS
@given(L=pos, e1=st.floats(0, 1e6), e2=st.floats(0, 1e6), sign=st.sampled_from([-1.0, 1.0]))
def test_rho_monotone_in_model_error(L, e1, e2, sign):
    lo, hi = sorted((e1, e2))
    assert relative_error(L, L + sign * lo) <= relative_error(L, L + sign * hi)


def test_rho_accepts_numpy_and_0d_scalars():
    assert relative_error(np.float32(2.0), np.array(1.0)) == pytest.approx(0.5)


@pytest.mark.parametrize("L, F, exc, match", [
    (0.0, 1.0, ValueError, "loss_random"), (-1.0, 1.0, ValueError, "loss_random"),
    (float("nan"), 1.0, ValueError, "loss_random"), (float("inf"), 1.0, ValueError, "loss_random"),
    (1.0, float("nan"), ValueError, "predicted"), (1.0, float("-inf"), ValueError, "predicted"),
    ("a", 1.0, TypeError, "loss_random"), (1.0, None, TypeError, "predicted"),
    # a 0-d bool array was read as 1.0 and a complex scalar as its real part (review 134)
    (np.array(True), 1.0, TypeError, "loss_random"), (2.0, np.complex128(1.5 + 2j), TypeError, "predicted"),
    (2.0, 1.5 + 0j, TypeError, "predicted"), (np.array(2.0 + 0j), 1.0, TypeError, "loss_random"),
])
def test_rho_bad_inputs(L, F, exc, match):
    with pytest.raises(exc, match=match):
        relative_error(L, F)


# --------------------------------------------------------------------------------------------
# the decision
# --------------------------------------------------------------------------------------------
@SETTINGS
@given(rho=st.floats(0, 1e6), tau=st.floats(1e-12, 1e6))
def test_should_reselect_exactly_when_rho_exceeds_tau(rho, tau):
    assert should_reselect(rho, tau) is (rho > tau)


@SETTINGS
@given(tau=st.floats(1e-12, 1e6))
def test_rho_equal_to_tau_does_not_reselect(tau):
    assert should_reselect(tau, tau) is False
    assert should_reselect(math.nextafter(tau, math.inf), tau) is True
    assert should_reselect(0.0, tau) is False


@pytest.mark.parametrize("rho, tau, exc, match", [
    (0.5, 0.0, ValueError, "tau"), (0.5, -0.1, ValueError, "tau"), (0.5, float("nan"), ValueError, "tau"),
    (0.5, float("inf"), ValueError, "tau"), (float("nan"), 0.1, ValueError, "rho"),
    (-0.1, 0.1, ValueError, "rho"), (float("inf"), 0.1, ValueError, "rho"), ("x", 0.1, TypeError, "rho"),
])
def test_should_reselect_bad_inputs(rho, tau, exc, match):
    with pytest.raises(exc, match=match):
        should_reselect(rho, tau)


# --------------------------------------------------------------------------------------------
# the schedule
# --------------------------------------------------------------------------------------------
@SETTINGS
@given(h0=st.floats(0, 1e4), ht=st.floats(1e-3, 1e4), h=st.floats(0.01, 10), b=st.floats(0.01, 10),
       cap=st.one_of(st.none(), st.integers(1, 500)))
@example(h0=247.0, ht=0.01, h=0.01, b=1.0, cap=None)  # float h * h0 / ht lands an ulp above 247
@example(h0=170.0, ht=1.0, h=1.0, b=1.1, cap=None)  # b * T1 lands 1.5e-14 above 187
def test_update_schedule_rule(h0, ht, h, b, cap):
    assume(h * h0 / ht < 1e7)
    T1, P = update_schedule(h0, ht, h=h, b=b, cap=cap)
    assert type(T1) is int and type(P) is int
    # the documented rule, on the exact value of h * h0 / ht (float arithmetic can land an ulp above an
    # integer: 0.01 * 247 / 0.01 is 247.00000000000003), with its relative 1e-9 slack below that value
    exact = Fraction(h) * Fraction(h0) / Fraction(ht)
    t1 = max(1, math.ceil(exact))
    if t1 > 1 and exact - (t1 - 1) <= Fraction(1e-9) * max(1, exact):
        t1 -= 1
    if cap is not None:
        t1 = min(t1, cap)  # the check interval never exceeds the cap (one virtual epoch) either
    # P's ceil forgives the same relative 1e-9 (b = 1.1 is 1.1000000000000000888 as a float: 1.1 * 170 is
    # 187.000000000000015, P 187, not 188; hypothesis found it on 2026-12-05)
    exact_p = Fraction(b) * t1
    p = max(1, math.ceil(exact_p))
    if p > 1 and exact_p - (p - 1) <= Fraction(1e-9) * max(1, exact_p):
        p -= 1
    if cap is not None:
        p = min(p, cap)
    assert (T1, P) == (t1, p)
    assert T1 >= 1 and P >= 1
    if cap is not None:
        assert T1 <= cap and P <= cap


@pytest.mark.parametrize("h0, ht, h, b, cap, expected", [
    (1.0, 1.0, 1.0, 5.0, None, (1, 5)),  # the release's start: T1 = 1, P = 5
    (1.0, 0.3, 1.0, 5.0, None, (4, 20)),  # ceil(3.33) = 4
    (1.0, 0.3, 1.0, 5.0, 10, (4, 10)),  # P capped
    (10.0, 1.0, 1.0, 5.0, 6, (6, 6)),  # T1 capped too
    (1.0, 4.0, 1.0, 5.0, None, (1, 5)),  # T1 never below 1
    (0.0, 4.0, 1.0, 5.0, None, (1, 5)),
    (2.0, 1.0, 1.5, 0.5, None, (3, 2)),  # P = ceil(b * T1) = ceil(1.5) = 2
    (1.0, 1.0, 1.0, 0.01, None, (1, 1)),  # P never below 1
])
def test_update_schedule_examples(h0, ht, h, b, cap, expected):
    assert update_schedule(h0, ht, h=h, b=b, cap=cap) == expected


def test_zero_current_curvature():
    assert update_schedule(1.0, 0.0, cap=7) == (7, 7)
    assert update_schedule(1.0, 0.0, b=0.1, cap=7) == (7, 1)
    with pytest.raises(ValueError, match="h_norm_t"):
        update_schedule(1.0, 0.0)


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((float("nan"), 1.0), {}, ValueError, "h_norm_0"),
    ((1.0, float("inf")), {}, ValueError, "h_norm_t"),
    ((-1.0, 1.0), {}, ValueError, "norms"),
    ((1.0, -1.0), {}, ValueError, "norms"),
    ((1.0, 1.0), dict(h=0.0), ValueError, "h and b"),
    ((1.0, 1.0), dict(b=-1.0), ValueError, "h and b"),
    ((1.0, 1.0), dict(b=float("nan")), ValueError, "b must be finite"),
    ((1.0, 1.0), dict(cap=0), ValueError, "cap"),
    ((1.0, 1.0), dict(cap=2.5), ValueError, "cap"),
    ((1.0, 1.0), dict(cap=True), ValueError, "cap"),
    (("one", 1.0), {}, TypeError, "h_norm_0"),
])
def test_update_schedule_bad_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        update_schedule(*args, **kwargs)


@pytest.mark.parametrize("norm", [1.7320508075688772, 0.1, 3.3e-7, 12345.678])
@pytest.mark.parametrize("h", [1.0, 6.0, 100.0])
def test_equal_curvature_gives_exactly_h(norm, h):
    # ceil(h * n / n) must not gain a step from rounding (6 * 1.732.. / 1.732.. = 6.000000000000001)
    assert update_schedule(norm, norm, h=h, b=1.0) == (int(h), int(h))
    # a real excess of one part in a million still rounds up
    assert update_schedule(norm * (1 + 1e-6), norm, h=h, b=1.0)[0] == int(h) + 1


def test_update_schedule_on_a_vanishing_curvature_norm():
    """A curvature norm so small that h * h_norm_0 / h_norm_t overflows is flat (T1 = cap), as 0 is,
    instead of a NaN from the rounding slack; and the slack never takes more than the rounding's share."""
    from crestcore.trust import update_schedule

    assert update_schedule(1.0, 5e-324, cap=10) == (10, 10)
    with pytest.raises(ValueError, match="infinite"):
        update_schedule(1.0, 5e-324)
    assert update_schedule(1.0, 1e-12)[0] == 10**12  # ceil(1e12), not 1e12 - 1000
    assert update_schedule(1.0, 1.0 - 2**-52)[0] == 1  # equal curvature up to an ulp: no extra step


def test_update_schedule_names_an_infinite_cap_or_an_overflowing_b():
    """cap=inf or nan, and b so large that b * T1 overflows, raise ValueErrors naming the argument (they
    raised bare OverflowError / ValueError from int() and math.ceil); with a cap, P is the cap."""
    import math

    from crestcore import update_schedule

    for cap in (math.inf, math.nan, "3", 2.5):
        with pytest.raises(ValueError, match="cap must be a positive integer"):
            update_schedule(1.0, 0.5, cap=cap)
    with pytest.raises(ValueError, match=r"b \* T1 overflows \(b=1e\+308"):
        update_schedule(1.0, 0.5, b=1e308)
    assert update_schedule(1.0, 0.5, b=1e308, cap=40) == (2, 40)
