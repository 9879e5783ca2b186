"""benchmarks/age_study.py and benchmarks/layers_study.py: one short run of each variant and model, and the
age study's table (the studies' figures are in docs/benchmarks.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
from _helpers import load_benchmark  # noqa: E402

age_study = load_benchmark("age_study.py", "age_study_under_test")
layers_study = load_benchmark("layers_study.py", "layers_study_under_test")


@pytest.fixture
def benchmarks_importable(monkeypatch):
    """layers_study imports age_study as its neighbour: benchmarks/ on sys.path for the test only (kept
    there, its distributed.py would shadow dask's distributed package in later worker processes)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_age_study_runs_each_variant_and_tabulates_them():
    a = argparse.Namespace(m=128, budget=0.1, epochs=1, threads=1, lrs=[0.03], seeds=[7])
    rows = [age_study.run_one(v, 0.03, 7, a) for v in age_study.VARIANTS]
    assert all(r["steps"] == 13 for r in rows)  # 0.1 of the 125 full-data steps of the training part
    crest, paper, random = rows
    assert crest["selections"] >= 1 and paper["selections"] >= 1 and "selections" not in random
    assert 0 < crest["distinct_examples"] <= 13 * 128 and random["distinct_examples"] == 13 * 128
    table = age_study.table(rows, a, "python benchmarks/age_study.py")
    assert table.startswith(age_study.START) and table.endswith(age_study.END)
    assert table.count("| 0.03 |") == 3


@pytest.mark.parametrize("kind", layers_study.KINDS)
def test_layers_study_models_train_and_score_on_the_validation_split(kind, benchmarks_importable):
    a = argparse.Namespace(lr=0.3, m=128, budget=0.1, epochs=1, weights="cluster")
    net = layers_study._model(kind, 0)
    names = {type(m).__name__ for m in net.modules()}
    assert ("BatchNorm1d" in names) == ("bn" in kind) and ("Dropout" in names) == ("drop" in kind)
    acc = layers_study.run_one(kind, "crest" if kind == "bn+drop" else "random", 0, a)
    assert 0.0 <= acc <= 100.0


def test_layers_study_table_pairs_each_rule_with_random_and_with_the_first_rule():
    rows = [{"model": k, "method": m, "seed": s, "val_acc": v}
            for k in layers_study.KINDS
            for m, base in (("random", 70.0), ("crest-cluster", 71.0), ("crest-tempered", 72.0))
            for s, v in ((2, base + 1.0), (1, base))]  # seeds out of order: pairing is by seed
    lines = layers_study.table(rows, ["crest-cluster", "crest-tempered"]).splitlines()
    assert len(lines) == 2 + 3 * len(layers_study.KINDS)
    tempered = [ln for ln in lines if "| crest-tempered |" in ln]
    assert len(tempered) == len(layers_study.KINDS)
    assert all(ln.endswith("| +2.00 +- 0.00 | +1.00 +- 0.00 |") for ln in tempered)
    assert all("72.00, 73.00" in ln for ln in tempered)


def test_layers_study_records_the_effective_examples_of_crest_batches(benchmarks_importable):
    a = argparse.Namespace(lr=0.3, m=128, budget=0.1, epochs=1, weights="cluster")
    ess: list = []
    layers_study.run_one("plain", "crest", 0, a, weights="uniform", ess=ess)
    assert ess and all(e == pytest.approx(128.0) for e in ess)  # uniform weights: every pick counts once
    cluster: list = []
    layers_study.run_one("plain", "crest", 0, a, weights="cluster", ess=cluster)
    assert len(cluster) == len(ess) and all(1.0 <= e < 128.0 for e in cluster)


unseen_study = load_benchmark("unseen_study.py", "unseen_study_under_test")


def test_unseen_study_runs_each_method_at_equal_steps_and_tabulates_paired_differences(tmp_path):
    rows = [unseen_study.run_one(dict(pair=1, method=m, lr=0.3, seed=s, phase="final", epochs=1))
            for m in unseen_study.METHODS for s in (200, 201)]
    assert {r["steps"] for r in rows} == {1}  # 0.1 of the 9 full-data steps of digits' training part, 1 epoch
    assert all(0 <= r["test_acc"] <= 100 and 0 <= r["val_acc"] <= 100 for r in rows)
    assert all("selections" in r for r in rows if r["method"] != "random")
    lines = unseen_study.table(rows, [1], "final", ("test_acc",)).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| 1 digits, MLP | test_acc | 0.3 / 0.3 / 0.3 |")
    assert lines[2].count("(win)") + lines[2].count("(level)") + lines[2].count("(loss)") == 2
    # the learning rate is chosen on the selection phase's validation accuracy, never on the test set
    sel = [dict(pair=1, method="crest", lr=lr, seed=s, phase="select", val_acc=acc)
           for lr, acc in ((0.1, 80.0), (0.3, 90.0)) for s in (100, 101)]
    sel.append(dict(pair=1, method="crest", lr=0.1, seed=200, phase="final", val_acc=99.0, test_acc=99.0))
    assert unseen_study.chosen(sel, 1, "crest") == (0.3, {0.1: 80.0, 0.3: 90.0})


def test_unseen_study_variant_phase_runs_the_overrides_and_applies_the_rule():
    # a variant run takes its CrestConfig overrides from the method name
    run = unseen_study.run_one(dict(pair=1, method="crest+r=256", lr=0.3, seed=400, phase="variant", epochs=1))
    assert run["steps"] == 1 and "selections" in run and "test_acc" not in run  # validation only

    def rows(diffs):
        out = []
        for s, dv in zip(unseen_study.VARIANT_SEEDS, diffs):
            out.append(dict(pair=1, method="crest", lr=0.3, seed=s, phase="variant", val_acc=90.0, wall_s=1.0))
            out.append(dict(pair=1, method="crest+r=256", lr=0.3, seed=s, phase="variant", val_acc=90.0 + dv,
                            wall_s=0.5))
        return out

    text, ok = unseen_study.variant_table(rows([0.1, -0.1, 0.0, 0.2, -0.2]), [1], "crest+r=256")
    assert ok and text.splitlines()[2].endswith("| yes | 1.00 / 0.50 |")
    # 0.4 points below the defaults on average, every seed behind: fails both conditions
    assert not unseen_study.variant_table(rows([-0.4] * 5), [1], "crest+r=256")[1]
    # 0.2 points below (within 0.3) but by more than one standard error: fails
    assert not unseen_study.variant_table(rows([-0.2, -0.25, -0.15, -0.2, -0.2]), [1], "crest+r=256")[1]
    # a pair without runs cannot pass
    assert not unseen_study.variant_table(rows([0.0] * 5), [1, 2], "crest+r=256")[1]
