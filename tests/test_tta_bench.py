"""benchmarks/tta.py (`crest bench tta`): the pure helpers, the harness with a fake trainer, one smoke run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from _helpers import load_benchmark

from crestcore.apps.datasets import fashion_mnist_available

tta = load_benchmark("tta.py", "tta_bench_under_test")

needs_fmnist = pytest.mark.skipif(
    not fashion_mnist_available() or not fashion_mnist_available(split="test"),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


# ---------------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------------


def test_label_noise_rate_other_class_deterministic():
    y = np.arange(100_000) % 10
    before = y.copy()
    z = tta.symmetric_label_noise(y, 0.4, 10, seed=5)
    assert np.array_equal(y, before)  # the input is not modified
    changed = z != y
    assert abs(changed.mean() - 0.4) < 0.01  # 4 sigma of Binomial(1e5, 0.4) is 0.006
    assert np.array_equal(z, tta.symmetric_label_noise(y, 0.4, 10, seed=5))
    assert not np.array_equal(z, tta.symmetric_label_noise(y, 0.4, 10, seed=6))
    assert z.min() >= 0 and z.max() <= 9
    # the new class is uniform over the 9 others: every (old, new != old) pair about equally often
    pairs = np.zeros((10, 10))
    np.add.at(pairs, (y[changed], z[changed]), 1)
    assert np.all(np.diag(pairs) == 0)
    off = pairs[~np.eye(10, dtype=bool)]
    assert off.min() > 0.8 * off.mean() and off.max() < 1.2 * off.mean()
    assert np.array_equal(tta.symmetric_label_noise(y, 0.0, 10, seed=5), y)
    assert np.all(tta.symmetric_label_noise(y, 1.0, 10, seed=5) != y)  # rate 1: never the same class
    with pytest.raises(ValueError):
        tta.symmetric_label_noise(y, 1.5, 10, seed=0)


def test_stratified_split():
    y = np.repeat(np.arange(4), [100, 50, 31, 5])
    np.random.default_rng(0).shuffle(y)
    tr, va = tta.stratified_split(y, 0.1, seed=3)
    assert np.intersect1d(tr, va).size == 0 and np.array_equal(np.union1d(tr, va), np.arange(y.size))
    assert [int((y[va] == c).sum()) for c in range(4)] == [10, 5, 3, 1]  # round(0.1 n_c), 0.5 rounds up
    tr2, va2 = tta.stratified_split(y, 0.1, seed=3)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    assert not np.array_equal(va, tta.stratified_split(y, 0.1, seed=4)[1])


def test_choose_lr_best_and_ties_to_the_smaller():
    assert tta.choose_lr({0.025: 0.80, 0.05: 0.85, 0.1: 0.84}) == 0.05
    assert tta.choose_lr({0.2: 0.85, 0.05: 0.85, 0.1: 0.85, 0.025: 0.7}) == 0.05
    assert tta.choose_lr({0.1: 0.5}) == 0.1


def test_mean_se_and_paired():
    m, se = tta.mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    m, se = tta.mean_se([0.7])
    assert m == 0.7 and math.isnan(se)
    assert all(math.isnan(x) for x in tta.mean_se([]))
    a = {0: 0.80, 1: 0.90, 2: 0.70, 3: 0.5}
    b = {0: 0.78, 1: 0.87, 2: 0.69, 7: 0.1}  # paired by seed: 3 and 7 have no partner
    d, se, per = tta.paired(a, b)
    assert per == pytest.approx({0: 0.02, 1: 0.03, 2: 0.01})
    assert d == pytest.approx(0.02) and se == pytest.approx(0.01 / math.sqrt(3))
    # the paired SE is far below the unpaired one when the seeds move both methods together
    assert se < tta.mean_se([0.80, 0.90, 0.70])[1] / 5


def test_verdict():
    v = tta.verdict([0.02, 0.021, 0.019], [1.1, 1.15, 1.05])  # clearly better, cheap
    assert v == {"not_worse": True, "better": True, "wall": True}
    v = tta.verdict([0.01, -0.01, 0.004], [1.3, 1.3, 1.3])  # a wash, too slow
    assert v == {"not_worse": True, "better": False, "wall": False}
    v = tta.verdict([-0.02, -0.021, -0.019], [1.0, 1.2, 1.4])  # worse; mean ratio exactly 1.2 passes
    assert v == {"not_worse": False, "better": False, "wall": True}
    assert tta.verdict([0.01], [1.0])["better"] is None  # one seed: no SE, no verdict


def test_noise_rate_and_parse_args():
    assert tta.noise_rate("fmnist") == 0 and tta.noise_rate("fmnist-noisy40") == 0.4
    with pytest.raises(ValueError):
        tta.noise_rate("cifar10")
    ns = tta.parse_args(["--methods", "random,crest", "--ablations", "drop,min_records=2,r=2m,drop"])
    assert ns.methods == ["full", "random", "crest"]
    assert ns.ablations == ["drop,min_records=2", "r=2m", "drop"]
    with pytest.raises(SystemExit):
        tta.parse_args(["--seeds", "0,1000"])  # the sweep seed may not be a final seed
    with pytest.raises(SystemExit):
        tta.parse_args(["--ablations", "nope"])


def test_ablation_table_is_checked(monkeypatch):
    monkeypatch.setitem(tta.ABLATIONS, "bogus", {"method": "crest", "crest": {"no_such_field": 1}})
    with pytest.raises(ValueError, match="no_such_field"):
        tta.check_ablations(["bogus"])
    import crestcore.apps.train_demo as td

    real = td.crest_config
    monkeypatch.setattr(td, "crest_config", lambda s, **kw: real(td.TrainSettings(), **kw))  # ignores extra
    with pytest.raises(ValueError, match="extra"):
        tta.check_ablations(["r=2m"])


def test_ablation_table_against_this_crestcore():
    import dataclasses

    from crestcore import CrestConfig

    fields = {f.name for f in dataclasses.fields(CrestConfig)}
    if not {"weights", "reselect"} <= fields:
        pytest.skip("this crestcore's CrestConfig has no weights / reselect options yet")
    tta.check_ablations(list(tta.ABLATIONS))  # every variant exists and reaches the config


def test_write_block_keeps_the_rest(tmp_path):
    p = tmp_path / "b.md"
    p.write_text(f"# head\n\n{tta.START}\nold\n{tta.END}\n\ntail\n")
    tta.write_block(p, "new")
    tta.write_block(p, "abl", tta.ABL_START, tta.ABL_END)  # appended: absent
    tta.write_block(p, "abl2", tta.ABL_START, tta.ABL_END)
    assert p.read_text() == f"# head\n\n{tta.START}\nnew\n{tta.END}\n\ntail\n\n{tta.ABL_START}\nabl2\n{tta.ABL_END}\n"


# ---------------------------------------------------------------------------------------------------
# the harness with a fake trainer (no Fashion-MNIST, no training)
# ---------------------------------------------------------------------------------------------------

N_TRAIN, N_TEST = 400, 100


class FakeTrainer:
    """Stands in for train_method; records every call. Synthetic data: training labels 0..4, test labels
    5..9, so a call can tell whether it was given test data. The validation accuracy prefers the largest
    lr, the test accuracy the smallest: a sweep scored on the test set would choose differently."""

    def __init__(self, test_x, fail_after=None):
        self.test_x, self.calls, self.fail_after = test_x, [], fail_after

    def __call__(self, method, data, s, progress=False):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        x_tr, y_tr, x_ev, y_ev = data
        on_test = bool((y_ev >= 5).all())
        self.calls.append(dict(method=method, lr=s.lr, seed=s.seed, budget=s.budget, n_train=int(x_tr.shape[0]),
                               on_test=on_test, is_test_x=x_ev is self.test_x, extra=dict(s.extra),
                               drop_min_records=s.drop_min_records, evals=s.evals))
        if on_test:
            acc = {"full": 0.9, "random": 0.80 + 0.001 * s.seed}.get(method, 0.82 + 0.002 * s.seed) - s.lr / 10
        else:
            acc = 0.5 + s.lr
        steps = 50 if method == "full" else 5
        wall = {"full": 10.0, "random": 1.0}.get(method, 1.1)
        curve = [{"step": 0, "wall": 0.0, "acc": 0.1, "updates": 0},
                 {"step": steps, "wall": wall, "acc": acc, "updates": 1}]
        return {"method": method, "steps": steps, "acc": acc, "wall": wall, "curve": curve,
                "breakdown": {"train": wall, "data": 0.0}, "counts": {"selections": 1},
                "stats": {"budget": {"fraction_all_passes": steps / 50}}}


@pytest.fixture
def fake(monkeypatch):
    torch = pytest.importorskip("torch")  # (the lower-bounds run has none)

    g = torch.Generator().manual_seed(0)
    x_tr, x_te = torch.randn(N_TRAIN, 1, 28, 28, generator=g), torch.randn(N_TEST, 1, 28, 28, generator=g)
    y_tr, y_te = torch.arange(N_TRAIN) % 5, 5 + torch.arange(N_TEST) % 5
    trainer = FakeTrainer(x_te)
    monkeypatch.setattr(tta, "load_data", lambda root, n_train=None, n_test=None, seed=0: (x_tr, y_tr, x_te, y_te))
    monkeypatch.setattr(tta, "train_method", trainer)
    monkeypatch.setattr(tta, "_warm_up", lambda methods: 0.0)
    return trainer


ARGS = ["--datasets", "fmnist,fmnist-noisy40", "--seeds", "0,1,2", "--lrs", "0.2,0.05,0.1", "--budgets", "0.1,0.2",
        "--methods", "random,crest"]


def test_sweep_never_sees_the_test_set(fake, tmp_path):
    assert tta.main([*ARGS, "--json", str(tmp_path / "r.json"), "--figdir", str(tmp_path / "fig")]) == 0
    sweep = [c for c in fake.calls if c["seed"] == 1000]
    final = [c for c in fake.calls if c["seed"] != 1000]
    assert len(sweep) == 2 * 3 * (1 + 2 * 2) and len(final) == 2 * 3 * (1 + 2 * 2)
    assert not any(c["on_test"] or c["is_test_x"] for c in sweep)
    assert all(abs(c["n_train"] - 0.9 * N_TRAIN) <= 5 and c["evals"] == 1 for c in sweep)  # per-class rounding
    assert all(c["on_test"] and c["is_test_x"] and c["n_train"] == N_TRAIN for c in final)
    assert {c["lr"] for c in final} == {0.2}  # the validation's choice; the test set would pick 0.05
    raw = json.loads((tmp_path / "r.json").read_text())
    for ds in ("fmnist", "fmnist-noisy40"):
        assert [r["lr"] for r in raw["summary"][ds]["sweep"]] == [0.2] * 5
    # seeds run one after another, each with all its methods: full, then every (method, budget)
    assert [(c["method"], c["budget"]) for c in final[:5]] == [("full", 1.0), ("random", 0.1), ("crest", 0.1),
                                                               ("random", 0.2), ("crest", 0.2)]
    assert [c["seed"] for c in final[:15]] == [0] * 5 + [1] * 5 + [2] * 5


def test_noisy_dataset_changes_training_labels_only(fake):
    ns = tta.parse_args([])
    clean, noisy = tta.load_dataset("fmnist", ns), tta.load_dataset("fmnist-noisy40", ns)
    assert clean.flipped == 0 and np.array_equal(clean.y_train.numpy(), np.arange(N_TRAIN) % 5)
    changed = noisy.y_train.numpy() != clean.y_train.numpy()
    assert 0.3 < changed.mean() < 0.5 and noisy.flipped == changed.mean()
    assert noisy.y_train.max() <= 4  # another class of the same label set
    assert noisy.y_test is clean.y_test and noisy.x_train is clean.x_train  # test labels clean, images shared
    assert np.array_equal(noisy.y_train.numpy(), tta.load_dataset("fmnist-noisy40", ns).y_train.numpy())
    # the validation split is stratified on the labels the user has (the noisy ones) and holds them
    xs, ys, xv, yv = noisy.sweep
    assert np.array_equal(yv.numpy(), noisy.y_train.numpy()[noisy.val_idx]) and xs.shape[0] + xv.shape[0] == N_TRAIN


def test_report_numbers_and_verdict(fake, tmp_path):
    out = tmp_path / "bench.md"
    out.write_text("# head\n\ntail\n")
    assert tta.main([*ARGS, "--json", str(tmp_path / "r.json"), "--out", str(out),
                     "--figdir", str(tmp_path / "fig")]) == 0
    text = out.read_text()
    assert text.startswith("# head\n\ntail\n") and tta.START in text and tta.ABL_START not in text
    # crest - random = 2.0, 2.2, 2.4 points at lr 0.2 (0.82 + 0.002 s vs 0.80 + 0.001 s)
    assert "CREST - Random at budget 0.1: +2.10 ± 0.06 points (per seed +2.00, +2.10, +2.20)" in text
    assert ("**Verdict (fmnist-noisy40, budget 0.1):** CREST at least as accurate as Random (mean difference > "
            "-1 SE): **met**; better by more than 2 SE: **met**; wall clock <= 1.2x Random's: 1.10 ± 0.00x, "
            "**met**.") in text
    assert "| crest | 0.1 | 0.2 | 5 | 80.20 ± 0.12 | 80.00, 80.20, 80.40 |" in text
    assert "| full | 1 | 0.2 | 50 | 88.00 | " not in text and "| full | 1 | 0.2 | 50 | 88.00 ± 0.00 |" in text
    assert "| random | 0.1 | **70.00** | 55.00 | 60.00 | 0.2 | " in text  # lrs in --lrs order
    assert "Figure: `" in text  # figures not under docs/ next to --out: listed as paths
    assert (tmp_path / "fig" / "tta_fmnist.png").is_file()
    raw = json.loads((tmp_path / "r.json").read_text())
    assert raw["summary"]["fmnist"]["rows"][2]["accs"] == pytest.approx({"0": 0.8, "1": 0.802, "2": 0.804})
    assert len(raw["records"]) == 60


def test_figures_linked_relative_under_docs(fake, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    out = docs / "benchmarks.md"
    assert tta.main([*ARGS, "--datasets", "fmnist", "--out", str(out), "--figdir", str(docs / "fig")]) == 0
    assert "![time to accuracy, fmnist](fig/tta_fmnist.png)" in out.read_text()


def test_resume_skips_recorded_runs(fake, tmp_path):
    j = str(tmp_path / "r.json")
    args = [*ARGS, "--datasets", "fmnist", "--json", j, "--figdir", str(tmp_path / "fig")]
    fake.fail_after = 7  # interrupted during the 8th run
    with pytest.raises(KeyboardInterrupt):
        tta.main(args)
    assert len(json.loads(Path(j).read_text())["records"]) == 7
    assert tta.main(args) == 2  # the file exists: --resume or remove it
    fake.fail_after = None
    assert tta.main([*args, "--resume"]) == 0
    assert len(fake.calls) == 30 and len({(c["method"], c["budget"], c["seed"], c["lr"]) for c in fake.calls}) == 30
    assert tta.main([*args, "--resume"]) == 0 and len(fake.calls) == 30  # all recorded: re-render only
    assert tta.main([*args, "--resume", "--seeds", "0,1,2,3"]) == 0 and len(fake.calls) == 35  # one more seed
    assert tta.main([*args, "--resume", "--epochs", "3"]) == 2  # another protocol: refused


def test_ablations_run_the_table(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(tta, "check_ablations", lambda names: None)
    out = tmp_path / "b.md"
    out.write_text(f"{tta.START}\nmain results\n{tta.END}\n")
    assert tta.main(["--suite", "ablations", "--datasets", "fmnist", "--seeds", "0,1", "--lrs", "0.05,0.1",
                     "--out", str(out), "--figdir", str(tmp_path / "fig")]) == 0
    runs = [c for c in fake.calls if c["seed"] != 1000]
    assert len(runs) == 2 * len(tta.ABLATIONS)
    assert {(c["method"], c["budget"]) for c in fake.calls if c["seed"] == 1000} == {("random", 0.1), ("crest", 0.1)}
    for c, (name, spec) in zip(runs, tta.ABLATIONS.items()):
        assert c["method"] == spec["method"] and c["extra"].get("crest", {}) == spec.get("crest", {}), name
        assert c["drop_min_records"] == (2 if name == "drop,min_records=2" else 1) and c["lr"] == 0.1
    text = out.read_text()
    assert text.startswith(f"{tta.START}\nmain results\n{tta.END}\n")  # the main block is not touched
    assert "| r=2m | crest | r=256 | 0.1 | 81.10 ± 0.10 | 81.00, 81.20 | +0.00 ± 0.00 | +2.05 ± 0.05 |" in text
    assert "| drop,min_records=2 | crest-drop | drop_min_records=2 |" in text


# ---------------------------------------------------------------------------------------------------
# end to end on Fashion-MNIST
# ---------------------------------------------------------------------------------------------------


@needs_fmnist
def test_smoke_fashion_mnist(tmp_path, monkeypatch):
    """The whole harness, tiny: 600 training / 200 test images, one epoch, two seeds, two lrs."""
    pytest.importorskip("torch")  # the training recipe (the lower-bounds run has no torch)
    from crestcore.apps.train_demo import train_method

    seen = []

    def spy(method, data, s, progress=False):
        seen.append((s.seed, int(data[2].shape[0])))
        return train_method(method, data, s, progress=progress)

    monkeypatch.setattr(tta, "train_method", spy)
    out, j = tmp_path / "bench.md", tmp_path / "r.json"
    args = ["--datasets", "fmnist", "--limit-train", "600", "--limit-test", "200", "--epochs", "1", "--seeds", "0,1",
            "--lrs", "0.05,0.1", "--budgets", "0.1", "--evals", "2", "--threads", "1", "--json", str(j),
            "--out", str(out), "--figdir", str(tmp_path / "fig")]
    assert tta.main(args) == 0
    assert len(seen) == 16 and all(abs(n - 60) <= 5 for s, n in seen if s == 1000)  # the validation split
    assert all(n == 200 for s, n in seen if s < 2)  # the test set
    raw = json.loads(j.read_text())
    finals = [r for r in raw["records"] if r["phase"] == "final"]
    assert len(finals) == 8 and all(0 <= r["acc"] <= 1 and r["wall"] > 0 for r in finals)
    assert all(r["passes"] is not None for r in finals if r["method"].startswith("crest"))
    text = out.read_text()
    assert "**Verdict (fmnist, budget 0.1):**" in text and "| crest-drop | 0.1 |" in text
    assert (tmp_path / "fig" / "tta_fmnist.png").is_file()
    assert tta.main([*args, "--resume"]) == 0 and len(seen) == 16  # nothing left to train


@pytest.mark.slow
@needs_fmnist
def test_smoke_noisy_and_ablations(tmp_path):
    j = str(tmp_path / "r.json")
    base = ["--datasets", "fmnist-noisy40", "--limit-train", "1000", "--limit-test", "200", "--epochs", "2",
            "--seeds", "0,1", "--lrs", "0.05,0.1", "--budgets", "0.1", "--evals", "2", "--json", j,
            "--figdir", str(tmp_path / "fig"), "--out", str(tmp_path / "b.md")]
    assert tta.main(base) == 0
    assert tta.main([*base, "--suite", "all", "--resume"]) == 0
    text = (tmp_path / "b.md").read_text()
    assert tta.START in text and tta.ABL_START in text and "| weights=tempered | crest |" in text


def test_cli_finds_the_benchmark():
    from crestcore.apps import cli

    assert cli.main(["bench", "tta", "--help"]) == 0  # benchmarks/tta.py, run by `crest bench tta`
