"""benchmarks/cap_study.py: the decision rule that chooses a default (a cost cap, other overrides) on
validation accuracy."""

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


CAPS = ["max_overhead=0.5", "max_overhead=1"]
COST = {"max_overhead=0.5": 0.15, "max_overhead=1": 0.2}


def test_the_cheapest_variant_within_tolerance_on_every_data_set_wins():
    res = {"a": _per([0.80, 0.82], **{"max_overhead=0.5": [0.80, 0.82], "max_overhead=1": [0.80, 0.82]}),
           "b": _per([0.50, 0.52], **{"max_overhead=0.5": [0.50, 0.52], "max_overhead=1": [0.50, 0.52]})}
    assert cap_study.choose(res, CAPS[::-1], COST, 0.3) == "max_overhead=0.5"
    assert cap_study.choose(res, CAPS, {**COST, "max_overhead=1": 0.1}, 0.3) == "max_overhead=1"


def test_a_cap_that_loses_on_one_data_set_is_not_chosen():
    res = {"a": _per([0.80, 0.82], **{"max_overhead=0.5": [0.80, 0.82], "max_overhead=1": [0.80, 0.82]}),
           "b": _per([0.50, 0.52], **{"max_overhead=0.5": [0.45, 0.47], "max_overhead=1": [0.50, 0.52]})}
    assert cap_study.choose(res, CAPS, COST, 0.3) == "max_overhead=1"
    res["b"]["max_overhead=1"] = {0: 0.495, 1: 0.515}  # -0.5 points: outside the 0.3-point tolerance
    assert cap_study.choose(res, CAPS, COST, 0.3) is None


def test_a_loss_beyond_one_standard_error_is_not_chosen_even_within_tolerance():
    res = {"a": _per([0.80, 0.82, 0.84], **{"max_overhead=1": [0.798, 0.818, 0.838]})}  # -0.2 +- 0
    assert cap_study.choose(res, ["max_overhead=1"], COST, 0.3) is None


def test_variant_overrides_are_parsed_with_their_types():
    assert cap_study.parse_overrides("coresets=just-in-time,check_size=128, max_overhead=0.5") == {
        "coresets": "just-in-time", "check_size": 128, "max_overhead": 0.5}
    assert cap_study.parse_overrides("embeddings=true,r=none") == {"embeddings": True, "r": None}
    with pytest.raises(ValueError, match="key=value"):
        cap_study.parse_overrides("coresets")
