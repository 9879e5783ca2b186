"""benchmarks/pipeline.py (E3): the table from rows, and one tiny run of each method on real data."""

from __future__ import annotations

import argparse

import pytest
from _helpers import load_benchmark

from crestcore.apps.datasets import fashion_mnist_available

pipeline = load_benchmark("pipeline.py", "pipeline_bench_under_test")


def _args(**kw):
    base = dict(n=600, epochs=2, m=32, budget=0.2, lr=0.05, workers=0, measure_workers=0, seeds=1, cap=0.5)
    return argparse.Namespace(**{**base, **kw})


def test_table_reports_every_method_and_run():
    rows = []
    for seed in range(2):
        for i, m in enumerate(pipeline.METHODS):
            row = {"method": m, "seed": seed, "steps": 10 * (i + 1), "wall_s": 1.0 + i + seed,
                   "test_acc": 0.5 + 0.01 * i, "fraction_all_passes": 0.1 * (i + 1)}
            if m.startswith("crest"):
                row.update(selections=2, checks=3)
            rows.append(row)
    text = pipeline.table(rows, _args(seeds=2), "python benchmarks/pipeline.py")
    for m in pipeline.METHODS:
        assert f"| {m} |" in text
    assert text.count("\n| ") >= 2 * len(pipeline.METHODS) + len(pipeline.METHODS)
    assert "| full | 10.00 +- 0.00 | 1.50 +- 0.50 | 1.00 |" in text
    # the measurement chunk the runs used: the saved runs before the option passed 256
    assert "`measure_batch_size=256`" in text
    assert "the default chunk (128 examples on the CPU)" in pipeline.table(rows, _args(measure_batch_size=None), "x")
    assert "`measure_batch_size=64`" in pipeline.table(rows, _args(measure_batch_size=64), "x")


@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST is not installed")
@pytest.mark.parametrize("method", ["full", "random", "crest", "crest-cap", "crest-paper"])
def test_one_tiny_run_per_method(method):
    import torch

    before = torch.get_num_threads()
    try:
        out = pipeline.run_one(method, 0, _args())
    finally:
        torch.set_num_threads(before)
    spe = round(0.2 * 19) if method != "full" else 19  # ceil(600 / 32) = 19 full steps per epoch
    assert out["steps"] == 2 * spe and 0 <= out["test_acc"] <= 1 and out["wall_s"] > 0
    if method.startswith("crest"):
        assert out["selections"] >= 1
