"""The training demo (apps/train_demo.py, `crest demo`): helpers, timing attribution, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _helpers import assert_import_stays_light, load_benchmark

from crestcore.apps import cli
from crestcore.apps.datasets import fashion_mnist_available
from crestcore.apps.train_demo import (
    DEFAULT_METHODS,
    QUICK_METHODS,
    METHODS,
    TABLE_COLUMNS,
    ForgettingTracker,
    OpsTimer,
    TrainSettings,
    forgetting_events,
    format_table,
    lr_factor,
    moving_average,
    parse_methods,
    relative_error,
    summarize,
)

needs_fmnist = pytest.mark.skipif(
    not fashion_mnist_available() or not fashion_mnist_available(split="test"),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)

FIGURES = ("accuracy_vs_time.png", "coreset_updates.png", "rho.png", "forgetting.png")


# ---------------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------------


def test_relative_error():
    assert relative_error(0.9, 0.81) == pytest.approx(10.0)
    assert relative_error(0.8, 0.8) == 0.0
    assert relative_error(0.5, 0.6) == pytest.approx(-20.0)  # better than full data: negative
    with pytest.raises(ValueError):
        relative_error(0.0, 0.5)


def test_forgetting_events_hand_made():
    # correct, correct, wrong (1), correct, wrong (2), wrong, correct
    assert forgetting_events([1, 1, 0, 1, 0, 0, 1]) == 2
    assert forgetting_events([0, 0, 0]) == 0  # never learned: no forgetting event
    assert forgetting_events([1, 1, 1]) == 0
    assert forgetting_events([]) == 0 and forgetting_events([True]) == 0
    assert forgetting_events([True, False]) == 1


def test_forgetting_tracker_matches_sequences():
    rng = np.random.default_rng(0)
    n, T = 12, 30
    history = {i: [] for i in range(n)}
    tr = ForgettingTracker(n)
    for _ in range(T):
        idx = rng.choice(n, size=5, replace=False)
        ok = rng.random(5) < 0.6
        tr.update(idx, ok)
        for i, c in zip(idx, ok):
            history[int(i)].append(bool(c))
    for i in range(n):
        assert tr.scores[i] == forgetting_events(history[i])
        assert tr.seen[i] == len(history[i])
        assert tr.ever_correct[i] == any(history[i])


def test_forgetting_tracker_hand_made_and_repeats():
    tr = ForgettingTracker(3)
    tr.update([0, 1], [True, False])
    tr.update([0, 1], [False, True])
    tr.update([0, 0, 2], [True, False, True])  # repeated index: the last value counts
    # example 0: T, F (1), F ; example 1: F, T ; example 2: T
    assert tr.scores.tolist() == [1, 0, 0]
    assert tr.seen.tolist() == [3, 2, 1]
    with pytest.raises(ValueError):
        tr.update([0, 1], [True])


def test_lr_factor_warmup_then_cosine():
    total = 100
    f = [lr_factor(t, total, 0.1) for t in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # non-increasing after warm-up
    assert f[-1] < 0.01
    assert lr_factor(0, 1, 0.1) == pytest.approx(1.0)


def test_moving_average():
    np.testing.assert_allclose(moving_average([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(moving_average([5.0], 3), [5.0])


def test_table_columns_and_summary():
    def rec(acc, wall, crest=False):
        bd = {"train": wall * 0.8, "data": wall * 0.2 if not crest else 0.0}
        if crest:
            bd.update(select_forward=0.1 * wall, select_solve=0.05 * wall, model_fit=0.05 * wall, checks=0.0,
                      drops=0.0, data=0.0)
            bd["train"] = 0.8 * wall
        return {"acc": acc, "wall": wall, "steps": 10, "breakdown": bd,
                "counts": {"selections": 3 if crest else 0}}

    recs = {"full": rec(0.9, 100.0), "random": rec(0.81, 10.0), "crest": rec(0.855, 12.5, crest=True),
            "sgd-budget": rec(0.72, 10.0)}
    rows = summarize(recs)
    by = {r["method"]: r for r in rows}
    assert by["random"]["rel_error"] == pytest.approx(10.0)
    assert by["crest"]["rel_error"] == pytest.approx(5.0)
    assert by["full"]["rel_error"] == 0.0
    assert by["crest"]["speedup"] == pytest.approx(8.0)
    assert by["crest"]["overhead_pct"] == pytest.approx(25.0)  # 0.2 wall / 0.8 wall
    # every method that selects has updates and an overhead; full and sgd-budget select nothing
    assert by["random"]["overhead_pct"] == 0.0 and by["random"]["updates"] == 0
    assert by["sgd-budget"]["overhead_pct"] is None and by["sgd-budget"]["updates"] is None
    assert by["full"]["overhead_pct"] is None and by["sgd-budget"]["rel_error"] == pytest.approx(20.0)
    text = format_table(rows)
    head = text.splitlines()[0]
    pos = [head.index(c) for c in TABLE_COLUMNS]
    assert pos == sorted(pos)  # every column, in order
    assert len(text.splitlines()) == 2 + len(rows)
    assert "10.00" in text and "8.00x" in text


# ---------------------------------------------------------------------------------------------------
# attributing CREST's time
# ---------------------------------------------------------------------------------------------------


class _FakeOps:
    def outputs(self, idx, embeddings=False):
        return "z"

    def gradient(self, idx, w):
        return 0.0, "g"

    def hutchinson(self, idx, w, seed):
        return "h"

    def params(self):
        return "p"


def test_ops_timer_times_the_controllers_solve_with_the_same_picks():
    """An ops object without its own solve gets a timed ``coresets`` that is minibatch_coresets (the same
    call, so the same picks); one with its own (the distributed adapter's) has that one timed."""
    from crestcore import minibatch_coresets

    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(90, 4)), np.arange(90) % 3
    ops = _FakeOps()
    t = OpsTimer(ops)
    got = ops.coresets(feats, labels, m=6, r=30, P=2, rng=np.random.default_rng(5))
    want = minibatch_coresets(feats, labels, m=6, r=30, P=2, rng=np.random.default_rng(5))
    assert np.array_equal(got.indices, want.indices) and np.array_equal(got.weights, want.weights)
    assert [name for name, _ in t.events] == ["coresets"]

    class Own(_FakeOps):
        def coresets(self, features, labels, **kw):
            return "sharded"

    own = Own()
    t = OpsTimer(own)
    assert own.coresets(feats, labels) == "sharded" and [name for name, _ in t.events] == ["coresets"]


def test_ops_timer_attribution():
    ops = _FakeOps()
    t = OpsTimer(ops)
    assert ops.outputs([1]) == "z" and ops.gradient([1], [1.0]) == (0.0, "g")
    t.events = []
    # a check, then a selection in the same next(): outputs (check), params, outputs (select), the solve, fit
    t.events = [("outputs", 1.0), ("params", 0.1), ("outputs", 2.0), ("coresets", 0.5), ("params", 0.1),
                ("gradient", 3.0), ("hutchinson", 4.0)]
    out = t.attribute(12.5, selected=True, checked=True, dropped=False)
    assert out["checks"] == pytest.approx(1.0)
    assert out["select_forward"] == pytest.approx(2.0)
    assert out["model_fit"] == pytest.approx(7.0)
    assert out["select_solve"] == pytest.approx(0.5)  # the solve's own calls only
    assert out["select_other"] == pytest.approx(0.2 + 1.8)  # params copies + the rest of the time
    assert sum(out.values()) == pytest.approx(12.5)
    assert t.events == []
    # a check only
    t.events = [("outputs", 1.0), ("params", 0.5)]
    out = t.attribute(2.0, selected=False, checked=True, dropped=False)
    assert out["checks"] == pytest.approx(2.0) and out["select_forward"] == 0.0
    # nothing due: batch loading
    out = t.attribute(0.3, selected=False, checked=False, dropped=False)
    assert out["data"] == pytest.approx(0.3)
    out = t.attribute(0.3, selected=False, checked=False, dropped=True)
    assert out["drops"] == pytest.approx(0.3)
    # coresets="just-in-time": a check, then this step's coreset (its forward, its solve, the rest)
    t.events = [("outputs", 1.0), ("params", 0.1), ("outputs", 2.0), ("coresets", 0.25)]
    out = t.attribute(4.0, selected=False, checked=True, dropped=False, made=True)
    assert out["checks"] == pytest.approx(1.1) and out["select_forward"] == pytest.approx(2.0)
    assert out["select_solve"] == pytest.approx(0.25) and out["select_other"] == pytest.approx(0.65)
    assert out["model_fit"] == 0.0
    # the fused model fit is a fit
    t.events = [("outputs", 2.0), ("gradient_and_hutchinson", 3.0)]
    out = t.attribute(6.0, selected=True, checked=False, dropped=False)
    assert out["select_forward"] == pytest.approx(2.0) and out["model_fit"] == pytest.approx(3.0)


# ---------------------------------------------------------------------------------------------------
# CLI wiring and imports
# ---------------------------------------------------------------------------------------------------


def test_train_demo_import_stays_light():
    assert_import_stays_light(("crestcore.apps.train_demo", "crestcore.apps.cli"),
                              ("torch", "matplotlib", "tqdm", "numba"))


def test_cli_defaults_match_settings():
    s = TrainSettings()
    for k, v in cli._TRAIN_DEFAULTS.items():
        assert getattr(s, k) == v, k


@pytest.mark.parametrize(
    "argv",
    [["demo", "--selection", "--epochs", "2"], ["demo", "--top", "3", "--budget", "0.2"],
     ["demo", "--methods", "full,nope"], ["demo", "--epochs", "0"], ["demo", "--budget", "0"]],
)
def test_demo_usage_errors(argv, capsys):
    assert cli.main(argv) == 2


def test_parse_methods():
    assert parse_methods("all") == METHODS
    assert set(METHODS) == {"full", "sgd-budget", "random", "craig", "gradmatch", "glister", "prune", "crest",
                            "crest-drop"}
    assert parse_methods(" craig, full ,craig") == ("craig", "full")  # order kept, duplicates dropped
    assert parse_methods("crest,all")[0] == "crest" and len(parse_methods("crest,all")) == len(METHODS)
    for bad in ("", "full,nope", "CRAIG"):
        with pytest.raises(ValueError):
            parse_methods(bad)
    assert DEFAULT_METHODS == QUICK_METHODS  # the default demo stays quick; --methods all adds the baselines


@pytest.mark.parametrize("argv", [["demo", "--methods", ""], ["demo", "--methods", "all,nope"]])
def test_demo_methods_usage_errors(argv, capsys):
    assert cli.main(argv) == 2
    assert "--methods" in capsys.readouterr().err


def test_demo_missing_dataset(tmp_path, capsys):
    assert cli.main(["demo", "--root", str(tmp_path), "--no-progress", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "dataset-fashion-mnist" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------
# end to end on a tiny slice of the real data
# ---------------------------------------------------------------------------------------------------


@needs_fmnist
def test_demo_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["demo", "--out", str(out), "--limit-train", "300", "--limit-test", "100", "--epochs", "1",
                   "--evals", "2", "--no-progress", "--threads", "1", "--methods", "all"])
    assert rc == 0
    text = capsys.readouterr().out
    head = next(line for line in text.splitlines() if line.startswith("method"))
    for c in TABLE_COLUMNS:
        assert c in head
    for name in METHODS:  # --methods all: every method
        assert any(line.startswith(name + " ") for line in text.splitlines()), name
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, name
    res = json.loads((out / "results.json").read_text())
    assert res["n_train"] == 300 and res["n_test"] == 100
    rows = {r["method"]: r for r in res["rows"]}
    acc_full = rows["full"]["acc"]
    for name, r in rows.items():
        assert r["rel_error"] == pytest.approx((acc_full - r["acc"]) / acc_full * 100)
        run = res["runs"][name]
        assert r["speedup"] == pytest.approx(res["runs"]["full"]["wall"] / run["wall"])
        # the wall clock is exactly the sum of its parts (evaluation excluded)
        assert sum(run["breakdown"].values()) == pytest.approx(run["wall"], rel=1e-9, abs=1e-9)
        assert run["curve"][0]["step"] == 0 and run["curve"][-1]["step"] == run["steps"]
    assert res["runs"]["full"]["steps"] == 3  # ceil(300 / 128)
    assert res["runs"]["random"]["steps"] == res["runs"]["crest"]["steps"] == 1  # 10% of 3, at least 1
    crest = res["runs"]["crest"]
    assert crest["counts"]["selections"] >= 1 and crest["stats"]["selections"][0] == 0
    tr = res["forgetting"]["traces"]["crest"]
    assert len(tr["mean_score"]) == crest["steps"]
    assert sum(res["forgetting"]["histogram"]) == 300


@needs_fmnist
def test_demo_all_methods_tiny(tmp_path):
    from crestcore.apps.train_demo import run_training_demo

    s = TrainSettings(epochs=2, m=32, budget=0.25, evals=1, threads=1, crest_r=64)
    res = run_training_demo(tmp_path, settings=s, methods="all", progress=False, n_train=400, n_test=50,
                            print_fn=None, figures=False)
    runs = res["runs"]
    assert list(runs) == list(METHODS)
    spe = round(0.25 * 13)  # ceil(400 / 32) = 13 full steps per epoch
    assert runs["full"]["steps"] == 2 * 13
    for name in METHODS[1:]:
        assert runs[name]["steps"] == 2 * spe, name  # the same budget for every method
    for name, run in runs.items():
        assert sum(run["breakdown"].values()) == pytest.approx(run["wall"], rel=1e-9, abs=1e-9), name
    for name in ("craig", "gradmatch", "glister"):
        st = runs[name]["stats"]
        assert runs[name]["reselect_every"] == 1  # ceil(2 epochs / 2)
        assert [x["epoch"] for x in st["selections"]] == [0, 1]
        assert runs[name]["counts"]["selections"] == 2
        assert st["counters"]["forward_examples"] == 2 * 400
        assert runs[name]["breakdown"]["select_forward"] > 0
    assert runs["sgd-budget"]["stats"]["selections"] == []
    assert runs["prune"]["breakdown"]["observe"] > 0
    for name in ("crest", "crest-drop"):  # the solve timed by its own calls, the rest of a selection apart
        bd = runs[name]["breakdown"]
        assert bd["select_solve"] > 0 and bd["select_other"] > 0 and bd["select_forward"] > 0, name
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["sgd-budget"]["updates"] is None and rows["craig"]["updates"] == 2
    json.dumps(res)  # results.json holds plain data


@needs_fmnist
def test_bench_e2e_all_methods_markdown(tmp_path):
    e2e = load_benchmark("e2e.py", "e2e_bench_under_test")
    out = tmp_path / "bench.md"
    out.write_text("# head\n\n<!-- e2e-bench:start -->\nold\n<!-- e2e-bench:end -->\n\ntail\n")
    rc = e2e.main(["--methods", "all", "--epochs", "1", "--seeds", "0", "--limit-train", "300",
                   "--limit-test", "50", "--evals", "1", "--threads", "1", "--out", str(out),
                   "--json", str(tmp_path / "raw.json")])
    assert rc == 0
    text = out.read_text()
    assert text.startswith("# head") and text.rstrip().endswith("tail") and "\nold\n" not in text
    for name in METHODS:
        assert f"| {name} |" in text, name
    assert "paper rel. error % at a 10 % budget (CIFAR-10, ResNet-20)" in text and "| 21.3 +- 8.0 |" in text
    assert "Selection time per method" in text
    # E2's selection rows count the selections and the coresets made just in time: a run with 3 of one
    # and 7 of the other, 1 s of solves and 0.5 s of the rest shows 10 calls of 100 ms and 50 ms
    raw = json.loads((tmp_path / "raw.json").read_text())
    run = raw["runs"][0]["crest"]
    run["counts"].update(selections=3, coresets_made=7)
    run["breakdown"].update(select_solve=1.0, select_other=0.5)
    (tmp_path / "edited.json").write_text(json.dumps(raw))
    assert e2e.main(["--from-json", str(tmp_path / "edited.json"), "--out", str(tmp_path / "edited.md")]) == 0
    lines = (tmp_path / "edited.md").read_text().splitlines()
    solve = next(x for x in lines if x.startswith("| selection: facility location "))
    rest = next(x for x in lines if x.startswith("| selection: the rest "))
    assert [c.strip() for c in solve.split("|")[4:6]] == ["10.0", "100.0"]
    assert [c.strip() for c in rest.split("|")[4:6]] == ["10.0", "50.0"]
    # a JSON written before the split (no select_other) keeps its one row, named for what it held
    for seed_runs in raw["runs"]:
        for name, r in seed_runs.items():
            if name.startswith("crest"):
                r["breakdown"].pop("select_other", None)
    (tmp_path / "old.json").write_text(json.dumps(raw))
    assert e2e.main(["--from-json", str(tmp_path / "old.json"), "--out", str(tmp_path / "old.md")]) == 0
    text = (tmp_path / "old.md").read_text()
    assert "| selection: features + facility location (and the rest of the selection) |" in text
    assert "| selection: the rest " not in text
    # re-rendering from the JSON gives the same block
    rc = e2e.main(["--from-json", str(tmp_path / "raw.json"), "--out", str(tmp_path / "again.md")])
    assert rc == 0 and "| gradmatch |" in (tmp_path / "again.md").read_text()


@needs_fmnist
def test_bench_e2e_crest_backend_reaches_the_crest_runs(tmp_path):
    """``--crest-backend numba`` is CrestConfig(backend="numba") for crest and crest-drop, and the tables
    say so; the default leaves the library's "auto" and the config line unchanged. The same for
    ``--baseline-solve-on host``."""
    e2e = load_benchmark("e2e.py", "e2e_bench_backend_under_test")
    common = ["--methods", "crest,crest-drop", "--epochs", "1", "--seeds", "0", "--limit-train", "300",
              "--limit-test", "50", "--evals", "1", "--threads", "1"]
    assert e2e.main([*common, "--crest-backend", "numba", "--json", str(tmp_path / "numba.json")]) == 0
    assert e2e.main([*common, "--json", str(tmp_path / "auto.json")]) == 0
    numba = json.loads((tmp_path / "numba.json").read_text())["runs"][0]
    auto = json.loads((tmp_path / "auto.json").read_text())["runs"][0]
    for name in ("crest", "crest-drop"):
        assert numba[name]["config"].endswith("backend=numba") or ", backend=numba," in numba[name]["config"]
        assert "backend=" not in auto[name]["config"]
    # --baseline-solve-on host: SubsetLoader(solve_on="host") for the selecting baselines, said in the note
    out = tmp_path / "host.md"
    assert e2e.main(["--methods", "craig", "--epochs", "1", "--seeds", "0", "--limit-train", "300",
                     "--limit-test", "50", "--evals", "1", "--threads", "1", "--baseline-solve-on", "host",
                     "--out", str(out)]) == 0
    assert 'solved on the host (`solve_on="host"`)' in out.read_text()


@needs_fmnist
def test_crest_drop_run_records_pool_and_checks(tmp_path):
    from crestcore.apps.train_demo import run_training_demo

    s = TrainSettings(epochs=2, m=32, budget=0.5, evals=1, threads=1, crest_T1=1, crest_r=64,
                      drop_alpha=10.0)  # alpha 10: every example measured counts as learned
    res = run_training_demo(tmp_path, settings=s, methods=("full", "crest-drop"), progress=False, n_train=400,
                            n_test=50, print_fn=None)
    run = res["runs"]["crest-drop"]
    assert run["steps"] == 2 * 7  # round(0.5 * ceil(400 / 32)) = 7 per epoch
    assert len(run["stats"]["checks"]) >= 1
    assert run["counts"]["drop_decisions"] >= 1 and run["pool"][-1] < 400
    assert len(run["pool"]) == run["steps"]
    for name in ("accuracy_vs_time.png", "coreset_updates.png", "rho.png", "forgetting.png"):
        assert (tmp_path / name).is_file()


def test_keras_backend_needs_the_keras_framework(capsys):
    assert cli.main(["demo", "--keras-backend", "torch", "--no-progress"]) == 2
    assert "--framework keras" in capsys.readouterr().err


def test_keras_environment_names_the_variables():
    from crestcore.apps.keras_demo import keras_environment

    assert keras_environment("torch") == {"KERAS_BACKEND": "torch"}
    assert keras_environment("torch", "cuda:1") == {"KERAS_BACKEND": "torch", "KERAS_TORCH_DEVICE": "cuda:1"}
    assert keras_environment("jax", "cpu") == {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    assert keras_environment("jax", "cuda") == {"KERAS_BACKEND": "jax"}
    with pytest.raises(ValueError, match="tensorflow"):
        keras_environment("tensorflow")


def _child(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_TORCH_DEVICE", "JAX_PLATFORMS")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)


def test_keras_demo_writes_no_environment():
    """Importing the Keras demo and asking it for keras write nothing to os.environ; a KERAS_BACKEND naming
    another backend is refused before keras is imported."""
    r = _child(
        "import os, sys\n"
        "before = dict(os.environ)\n"
        "import crestcore.apps.keras_demo as kd\n"
        "assert dict(os.environ) == before\n"
        "os.environ['KERAS_BACKEND'] = 'jax'\n"
        "try:\n"
        "    kd.import_keras('torch', 'cpu')\n"
        "except ValueError as exc:\n"
        "    assert 'KERAS_BACKEND' in str(exc) and \"'jax'\" in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('a mismatched KERAS_BACKEND was accepted')\n"
        "assert 'keras' not in sys.modules\n"
        "assert dict(os.environ) == {**before, 'KERAS_BACKEND': 'jax'}\n"
        "print('ok')\n"
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_cli_chooses_the_keras_backend_before_keras_is_imported():
    r = _child(
        "import os, sys\n"
        "from crestcore.apps import cli\n"
        "cli._choose_keras_backend('torch', 'cpu')\n"
        "assert os.environ['KERAS_BACKEND'] == 'torch' and os.environ['KERAS_TORCH_DEVICE'] == 'cpu'\n"
        "assert 'keras' not in sys.modules\n"
        "del os.environ['KERAS_BACKEND']\n"
        "sys.modules['keras'] = object()  # a keras imported earlier keeps its backend\n"
        "cli._choose_keras_backend('jax', 'cpu')\n"
        "assert 'KERAS_BACKEND' not in os.environ and 'JAX_PLATFORMS' not in os.environ\n"
        "print('ok')\n"
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_the_keras_demo_offers_every_method_of_the_pytorch_demo():
    from crestcore.apps import keras_demo

    assert keras_demo.METHODS == METHODS
    assert keras_demo.DEFAULT_METHODS == DEFAULT_METHODS  # the same quick default


def test_the_keras_demo_table_shows_the_baselines_overhead_too():
    """Its selections cost a baseline wall clock as CREST's cost CREST: the Keras table reports their
    updates and overhead like the PyTorch demo's (it showed them for CREST only)."""
    pytest.importorskip("keras")
    from crestcore.apps.keras_demo import _summarize

    def rec(steps, wall, bd, selections):
        return {"steps": steps, "acc": 0.8, "wall": wall, "breakdown": bd, "counts": {"selections": selections}}

    rows = {r["method"]: r for r in _summarize({
        "full": rec(100, 10.0, {"train": 10.0, "data": 0.0}, 0),
        "craig": rec(10, 3.0, {"train": 1.0, "data": 0.0, "select": 2.0, "drops": 0.0}, 2),
        "crest": rec(10, 2.0, {"train": 1.0, "data": 0.0, "select": 0.5, "checks": 0.3, "controller_other": 0.2,
                               "drops": 0.0}, 3),
    })}
    assert rows["craig"]["overhead_pct"] == pytest.approx(200.0) and rows["craig"]["updates"] == 2
    assert rows["crest"]["overhead_pct"] == pytest.approx(100.0) and rows["crest"]["updates"] == 3
    assert rows["full"]["overhead_pct"] is None and rows["full"]["updates"] is None


def test_the_kernel_warm_up_runs_the_threaded_kernel_craig_takes(monkeypatch):
    """Review 51: the demo's warm-up solved two classes of 32 points, which run Numba's serial kernel; with
    more than one Numba thread CRAIG's real selections take the threaded one, which then compiled inside
    CRAIG's first timed selection (12 s of a 1000-example run's 12.1 s, a 0.02x "speedup"; docs/demo.md
    says the warm-up keeps the compile out). The warm-up now also solves a problem above the threaded
    kernel's threshold, in both dtypes. (The kernel is recorded, not compiled, here.)"""
    nbk = pytest.importorskip("crestcore.backends.numba")
    from crestcore.apps.train_demo import warm_selection_kernels

    seen = []

    def threaded(X, *args):
        seen.append(args[8].dtype)  # the similarity buffer's dtype is the features' (X is a float64 copy)

    monkeypatch.setattr(nbk, "get_num_threads", lambda: 2)
    monkeypatch.setattr(nbk, "_fused_parallel", threaded)
    assert warm_selection_kernels(["craig"], print_fn=None) >= 0.0
    assert {np.dtype(np.float32), np.dtype(np.float64)} <= set(seen)


def test_the_crest_warm_up_runs_both_fused_kernels_in_both_dtypes(monkeypatch):
    """A GPU model's CREST selection solves on the host's Numba kernels by default; its first selection
    compiled them inside the first CREST run's clock (16.1 s against 5.1-5.2 s on a fresh H200 machine).
    The warm-up runs CREST's own calls through the serial and the threaded fused kernel in float32 and
    float64, and the stratified draw; it is asked for only when CREST solves on the host."""
    nbk = pytest.importorskip("crestcore.backends.numba")
    from crestcore.apps import train_demo

    seen = {"serial": set(), "parallel": set(), "draw": 0}
    serial = nbk._fused_serial

    def record_serial(X, *args):
        seen["serial"].add(args[8].dtype)  # the similarity buffer's dtype is the features'
        return serial(X, *args)

    def record_parallel(X, *args):
        seen["parallel"].add(args[8].dtype)  # recorded, not compiled (the outputs stay empty: no picks)
        return serial(X, *args[:8], args[8][0], *args[10:])  # (thread 0's buffer of the threads')

    draw = nbk.draw_stratified

    def record_draw(*args):
        seen["draw"] += 1
        return draw(*args)

    monkeypatch.setattr(nbk, "get_num_threads", lambda: 2)
    monkeypatch.setattr(nbk, "_fused_serial", record_serial)
    monkeypatch.setattr(nbk, "_fused_parallel", record_parallel)
    monkeypatch.setattr(nbk, "draw_stratified", record_draw)
    assert train_demo.warm_crest_host_kernels() is True
    both = {np.dtype(np.float32), np.dtype(np.float64)}
    assert seen["serial"] >= both and seen["parallel"] >= both and seen["draw"] > 0
    assert nbk._FUSED_PARALLEL_MIN_WORK == 250_000  # put back
    # only where CREST solves on the host: a CPU run's default (the torch kernels) warms nothing of CREST's
    called = []
    monkeypatch.setattr(train_demo, "warm_crest_host_kernels", lambda: called.append(1) or True)
    assert train_demo.warm_selection_kernels(["crest"], print_fn=None) is None and not called
    assert train_demo.warm_selection_kernels(["crest"], print_fn=None, crest_host=True) >= 0 and called
