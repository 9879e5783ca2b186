"""benchmarks/baselines.py (B1): E1's budget, the GLISTER split, and one tiny old-vs-new run into a file."""

from __future__ import annotations

import numpy as np
from _helpers import load_benchmark

bench = load_benchmark("baselines.py", "baselines_bench_under_test")


def test_budget_is_e1s_subset_size():
    assert bench.budget(60_000) == 47 * 128 == 6016
    assert bench.budget(600) == 128
    assert bench.budget(100) == 100  # never more than n


def test_val_split_is_class_stratified_and_disjoint():
    y = np.repeat(np.arange(4), [50, 30, 10, 2])
    pool, val = bench.val_split(y, seed=0)
    assert np.intersect1d(pool, val).size == 0 and pool.size + val.size == y.size
    np.testing.assert_array_equal(np.bincount(y[val], minlength=4), [5, 3, 1, 1])
    # SubsetLoader's own split, as the docstring says (review 78: it drew another with another seed tag)
    from crestcore.baselines._schedule import _validation_split

    np.testing.assert_array_equal(val, _validation_split(y, 0.1, 0))


def test_tiny_run_writes_the_table_between_its_markers(tmp_path):
    out = tmp_path / "bench.md"
    out.write_text("# doc\n\nkept\n")
    assert bench.main(["--n", "600", "--out", str(out), "--json", str(tmp_path / "b1.json")]) == 0
    text = out.read_text()
    assert text.startswith("# doc\n\nkept\n") and bench.START in text and bench.END in text
    for m in bench.METHODS:
        row = next(line for line in text.splitlines() if line.startswith(f"| {m} |"))
        assert "| yes |" in row  # the same picks as the old code
    bench.main(["--n", "600", "--methods", "craig", "--no-old", "--out", str(out)])
    text2 = out.read_text()
    assert text2.count(bench.START) == 1 and "| craig |" in text2 and "| gradmatch |" not in text2
