"""benchmarks/cap_study.py: the decision rule that chooses a default cost cap on validation accuracy."""

from __future__ import annotations

import math

import pytest
from _helpers import load_benchmark

cap_study = load_benchmark("cap_study.py", "cap_study_under_test")


def _per(default, **caps):
    out = {"default": dict(enumerate(default))}
    for name, accs in caps.items():
        out[name] = dict(enumerate(accs))
    return out


def test_paired_differences_are_per_seed_in_points():
    mean, se = cap_study.paired({0: 0.80, 1: 0.90}, {0: 0.81, 1: 0.88})
    assert mean == pytest.approx(-0.5)
    assert se == pytest.approx(1.5)
    assert math.isnan(cap_study.paired({0: 0.8}, {1: 0.8})[0])  # no common seed


def test_the_smallest_cap_within_tolerance_on_every_data_set_wins():
    res = {"a": _per([0.80, 0.82], **{"max_overhead=0.5": [0.80, 0.82], "max_overhead=1": [0.80, 0.82]}),
           "b": _per([0.50, 0.52], **{"max_overhead=0.5": [0.50, 0.52], "max_overhead=1": [0.50, 0.52]})}
    assert cap_study.choose(res, [1.0, 0.5], 0.3) == 0.5


def test_a_cap_that_loses_on_one_data_set_is_not_chosen():
    res = {"a": _per([0.80, 0.82], **{"max_overhead=0.5": [0.80, 0.82], "max_overhead=1": [0.80, 0.82]}),
           "b": _per([0.50, 0.52], **{"max_overhead=0.5": [0.45, 0.47], "max_overhead=1": [0.50, 0.52]})}
    assert cap_study.choose(res, [0.5, 1.0], 0.3) == 1.0
    res["b"]["max_overhead=1"] = {0: 0.495, 1: 0.515}  # -0.5 points: outside the 0.3-point tolerance
    assert cap_study.choose(res, [0.5, 1.0], 0.3) is None


def test_a_loss_beyond_one_standard_error_is_not_chosen_even_within_tolerance():
    res = {"a": _per([0.80, 0.82, 0.84], **{"max_overhead=1": [0.798, 0.818, 0.838]})}  # -0.2 +- 0
    assert cap_study.choose(res, [1.0], 0.3) is None
