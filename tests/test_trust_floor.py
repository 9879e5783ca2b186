"""crestcore.relative_error's floor (|L_R| against a positive floor, a floor <= 0 refused) and the
schedule's rounding slack for P."""
import pytest

from crestcore import relative_error


def test_relative_error_floor_uses_the_absolute_loss():
    # a user loss that may go negative: measured against |L_R|, not against the floor
    assert relative_error(-2.0, -1.0, floor=1e-12) == pytest.approx(0.5)
    assert relative_error(-4.0, -5.0, floor=1e-12) == pytest.approx(0.25)
    # below the floor the floor is the denominator
    assert relative_error(0.0, 1e-13, floor=1e-12) == pytest.approx(0.1)
    assert relative_error(1e-14, 0.0, floor=1e-12) == pytest.approx(1e-2)


@pytest.mark.parametrize("floor", [0.0, -0.0, -1e-12])
def test_relative_error_refuses_a_floor_that_is_not_positive(floor):
    with pytest.raises(ValueError, match="floor"):
        relative_error(1.0, 1.0, floor=floor)
    with pytest.raises(ValueError, match="floor"):
        relative_error(0.0, 0.0, floor=floor)


def test_update_schedule_p_rounds_with_the_same_slack_as_t1():
    # b * T1 = 0.14 * 50 is 7.000000000000001 in binary: P is 7 (as the code comment says), not 8
    from crestcore import update_schedule

    assert update_schedule(1.0, 1.0, h=50, b=0.14) == (50, 7)
    assert update_schedule(1.0, 1.0, h=50, b=0.14, cap=100) == (50, 7)
    # a real excess still rounds up
    assert update_schedule(1.0, 1.0, h=50, b=0.1401) == (50, 8)
