"""crestcore.adapters.monitor: listeners, the TensorBoard and W&B writers, progress bars."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _helpers import torch_mlp, weighted_step  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from crestcore import CrestConfig, DropConfig  # noqa: E402
from crestcore.adapters.monitor import TensorBoardWriter, WandbWriter, scalars  # noqa: E402
from crestcore.adapters.torch import CrestLoader  # noqa: E402

N, D_IN, C = 240, 6, 3



def setup(**kw):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D_IN, generator=g)
    y = (X @ torch.randn(D_IN, C, generator=g)).argmax(1)
    model = torch_mlp(D_IN, C, bn=False)
    cfg = CrestConfig(m=24, r=60, tau=0.02, T2=3, drop=DropConfig(alpha=5.0, window=3, min_records=1))
    return model, CrestLoader(model, TensorDataset(X, y), config=cfg, budget=0.5, epochs=3, seed=0, **kw)


def train(model, loader):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(loader.epochs):
        for x, y, w in loader:
            loader.observe(weighted_step(model, opt, x, y, w))


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, event, step, values):
        self.calls.append((event, step, dict(values)))


def test_listeners_see_every_selection_check_drop_and_epoch():
    rec = Recorder()
    model, loader = setup(callbacks=[rec])
    train(model, loader)
    st = loader.stats
    events = [e for e, _, _ in rec.calls]
    assert events.count("epoch") == 3
    assert events.count("selection") == len(st["selections"]) >= 2
    assert events.count("check") == len(st["checks"]) >= 1
    assert events.count("drop") == len(st["drops"]) >= 1
    assert [s for e, s, _ in rec.calls if e == "selection"] == [t + 1 for t in st["selections"]]
    assert [s for e, s, _ in rec.calls if e == "epoch"] == [5, 10, 15]
    last = rec.calls[-1][2]
    assert last == scalars(st) and last["crest/selections"] == len(st["selections"])
    assert all(isinstance(v, float) for _, _, vals in rec.calls for v in vals.values())


@pytest.mark.parametrize("counts, cut, per_epoch_false, resumed_events", [
    ("steps", 5, [5, 10, 15], [5, 10, 15]), ("passes", 2, [5], [2, 4, 5])])
def test_epoch_events_come_at_every_epochs_end_in_one_pass_and_once_across_a_resume(counts, cut, per_epoch_false,
                                                                                   resumed_events):
    """Review 152: with per_epoch=False (one pass over the whole run) the "epoch" event came once, at the run's
    end, while stats["epoch"] advanced at every epoch; and a run saved with state_dict(trained=position - 1) on an
    epoch's last batch said that epoch again when the resumed run handed the batch out again (its selections and
    checks, made before the save, were not said again). Review 153: under "passes", where an epoch ends by its
    cost at the next request, the one pass said two epochs at one step, and the resumed run said the epoch the
    first run had stopped before, never. (Under "passes" the one pass has one event, at its end.)"""
    rec = Recorder()
    model, loader = setup(callbacks=[rec], per_epoch=False, budget_counts=counts)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y, w in loader:
        loader.observe(weighted_step(model, opt, x, y, w))
    assert [s for e, s, _ in rec.calls if e == "epoch"] == per_epoch_false

    first, second = Recorder(), Recorder()
    model, loader = setup(callbacks=[first], budget_counts=counts)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y, w in loader:
        if loader.position == cut:  # the epoch's last batch handed out, not trained: saved as such
            saved = loader.state_dict(trained=loader.position - 1)
            break
        loader.observe(weighted_step(model, opt, x, y, w))
    model2, resumed = setup(callbacks=[second], budget_counts=counts)
    model2.load_state_dict(model.state_dict())
    resumed.load_state_dict(saved)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    for e in range(resumed.epoch, resumed.epochs):
        resumed.set_epoch(e)
        for x, y, w in resumed:
            resumed.observe(weighted_step(model2, opt2, x, y, w))
    assert [s for e, s, _ in first.calls + second.calls if e == "epoch"] == resumed_events


def test_tensorboard_writer_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    sw = SummaryWriter(log_dir=str(tmp_path))
    model, loader = setup(callbacks=[TensorBoardWriter(sw, events=("epoch",))])
    train(model, loader)
    sw.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert "crest/fraction_all_passes" in acc.Tags()["scalars"]
    sel = acc.Scalars("crest/selections")
    assert [e.step for e in sel] == [5, 10, 15] and sel[-1].value == len(loader.stats["selections"])


def test_tensorboard_writer_writes_one_point_a_step_for_several_events(tmp_path):
    """A check, a selection and an epoch's end at one step: each scalar once at that step (the same value
    written again made duplicate points), a value that changed between them written again."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    sw = SummaryWriter(log_dir=str(tmp_path))
    model, loader = setup(callbacks=[TensorBoardWriter(sw)])
    train(model, loader)
    sw.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
        points = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert len(points) == len(set(points)), tag
    sel = acc.Scalars("crest/selections")
    assert sel[-1].value == len(loader.stats["selections"])
    assert len({e.step for e in sel}) == len(sel)  # the selections' count changes at most once a step


class _WandbRun:
    """W&B's rules for an explicit ``step=``: a log below the last step is dropped, logs at the same step
    merge into one row (later keys overwrite); without ``step=`` every log is a new row."""

    def __init__(self):
        self.rows, self.step, self.defined = [], -1, []

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))

    def log(self, values, step=None):
        if step is None:
            step = self.step + 1
        if step < self.step:
            return
        if step == self.step and self.rows:
            self.rows[-1].update(values)
        else:
            self.rows.append(dict(values))
        self.step = step



def test_the_tensorboard_writer_takes_a_path_retries_a_failed_write_and_leaves_no_file_when_refused(tmp_path):
    """Review 30: a pathlib.Path log directory was refused; a value was marked written before its write, so a
    write that failed once was never retried at the same step; a refused events= left an event file."""
    pytest.importorskip("tensorboard")
    from crestcore.adapters.monitor import TensorBoardWriter

    with pytest.raises(ValueError):
        TensorBoardWriter(tmp_path / "refused", events=("bogus",))
    assert not (tmp_path / "refused").exists()
    w = TensorBoardWriter(tmp_path / "runs")  # a Path
    w.close()
    assert any((tmp_path / "runs").iterdir())

    class Flaky:
        def __init__(self):
            self.points, self.fail = [], True

        def add_scalar(self, tag, value, step):
            if self.fail:
                self.fail = False
                raise OSError("disk full")
            self.points.append((tag, value, step))

    flaky = Flaky()
    listener = TensorBoardWriter(flaky)
    with pytest.raises(OSError):
        listener("check", 3, {"crest/rho": 0.5})
    listener("selection", 3, {"crest/rho": 0.5})  # the same step and value: written now
    assert flaky.points == [("crest/rho", 0.5, 3)]

def test_the_tensorboard_writer_writes_a_nan_once_a_step_and_names_a_bad_events_argument(tmp_path):
    """Review 32: a NaN equals nothing, so a NaN scalar (a rho without a value) was written once per event
    of its step (three events, three points at step 7); events=5 raised "'int' object is not iterable"."""
    from crestcore.adapters.monitor import TensorBoardWriter

    class Points:
        def __init__(self):
            self.points = []

        def add_scalar(self, tag, value, step):
            self.points.append((tag, step))

    sink = Points()
    listener = TensorBoardWriter(sink)
    for event in ("check", "selection", "epoch"):
        listener(event, 7, {"crest/rho": float("nan"), "crest/p": 2.0})
    listener("check", 8, {"crest/rho": float("nan")})
    assert sorted(sink.points) == [("crest/p", 7), ("crest/rho", 7), ("crest/rho", 8)]
    with pytest.raises(TypeError, match="events"):
        TensorBoardWriter(Points(), events=5)
    for bad in ([1, "x"], [["check"]]):  # review 34: sorting or hashing them raised errors naming nothing
        with pytest.raises(ValueError, match="events must be among"):
            TensorBoardWriter(Points(), events=bad)


def test_wandb_writer_logs_to_the_run_it_is_given():
    """Every event is its own row with its CREST step, plotted against ``crest/step``; the user's own logs
    keep W&B's step. Before, events were logged with step= (handed-out batches): several events at one
    step overwrote each other's ``crest/event``, and a loop logging its loss at step t (0-based) lost
    every log, being one below the writer's step."""
    run = _WandbRun()
    model, loader = setup(callbacks=[WandbWriter(run)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    user = 0
    for _ in range(loader.epochs):
        for x, y, w in loader:
            loss = weighted_step(model, opt, x, y, w)
            loader.observe(loss)
            run.log({"loss": float(loss.mean())}, step=run.step + 1)  # the loop's own step, as usual
            user += 1
    st = loader.stats
    events = [r["crest/event"] for r in run.rows if "crest/event" in r]
    assert len(events) == len(st["selections"]) + len(st["checks"]) + len(st["drops"]) + 3
    assert sum(1 for r in run.rows if "loss" in r) == user  # none of the loop's logs was dropped
    crest_steps = [r["crest/step"] for r in run.rows if "crest/step" in r]
    assert crest_steps == sorted(crest_steps) and crest_steps[-1] == st["step"]
    assert ("crest/*", "crest/step") in run.defined


def test_bad_listeners_and_writers_are_refused():
    with pytest.raises(TypeError, match="callbacks"):
        setup(callbacks=[3])
    with pytest.raises(TypeError, match="progress"):
        setup(progress="yes")
    with pytest.raises(ValueError, match="events"):
        WandbWriter(type("R", (), {"log": lambda self, v: None})(), events=("selections",))
    with pytest.raises(TypeError, match="add_scalar"):
        TensorBoardWriter(object())
    sw = type("W", (), {"add_scalar": lambda self, *a, **k: None})()
    assert TensorBoardWriter(sw, events="check").events == ("check",)  # one event by name, not its letters


def test_progress_bars_only_for_passes_over_a_second(monkeypatch, capsys):
    """A pass that outlasts the threshold shows a tqdm bar; short passes print nothing."""
    model, loader = setup(progress=True)
    bars = []

    import tqdm.auto

    class FakeBar:
        def __init__(self, total, initial, **kw):
            bars.append(self)
            self.n, self.total = initial, total

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", FakeBar)
    loader.ops.batch_size = 16
    idx = np.arange(200)
    loader.ops.outputs(idx)  # fast: no bar
    assert bars == []
    loader.ops.progress.after = 0.0  # every pass counts as slow now
    loader.ops.outputs(idx)
    assert len(bars) == 1 and bars[0].n == 200 and bars[0].closed


def test_events_cost_the_same_late_in_a_long_run(monkeypatch):
    """An event comes at every trust check: the listener's scalars are built without the full ``stats``
    lists (a run with a check at every step was quadratic in its length), and equal ``scalars(stats)``."""
    import crestcore.adapters.torch as adapter

    calls = []
    real = adapter.crest_stats
    monkeypatch.setattr(adapter, "crest_stats", lambda state: calls.append(1) or real(state))
    seen = []
    model, loader = setup(callbacks=[lambda e, s, v: seen.append((e, dict(v)))])
    train(model, loader)
    assert calls == [] and len(seen) > 5
    assert seen[-1][1] == scalars(loader.stats)
    rhos = [v["crest/rho"] for e, v in seen if e == "check"]
    assert rhos == [c["rho"] for c in loader.stats["checks"]]


def test_a_listener_that_raises_costs_no_batch_and_no_other_listener_its_event():
    class Broken:
        def __call__(self, event, step, values):
            raise OSError("disk full")

    rec = Recorder()
    model, loader = setup(callbacks=[Broken(), rec])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, loader)
    said = [w for w in caught if issubclass(w.category, RuntimeWarning) and "listener" in str(w.message)]
    assert len(said) == 1 and "raised OSError: disk full" in str(said[0].message)  # once, not at every event
    st = loader.stats
    assert st["step"] == st["counters"]["train_steps"] == loader.total_steps
    assert [e for e, _, _ in rec.calls].count("selection") == len(st["selections"])
    assert loader.listener_failures == {0: len(rec.calls)} and len(rec.calls) > 5  # every event counted


def test_the_tensorboard_writer_flushes_and_closes_its_writer():
    class Writer:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append("add")

        def flush(self):
            self.calls.append("flush")

        def close(self):
            self.calls.append("close")

    w = Writer()
    tb = TensorBoardWriter(w)
    tb("check", 3, {"crest/rho": 0.1})
    tb.flush()
    tb.close()
    assert w.calls == ["add", "flush", "close"]
    TensorBoardWriter(type("AddOnly", (), {"add_scalar": lambda self, *a: None})()).close()  # nothing to close


def test_a_progress_bar_counts_the_time_before_it_was_shown(monkeypatch):
    """The bar appears once a pass has run ``after`` seconds; its elapsed time is the pass's, not the bar's
    (it showed 00:00 for a pass of 1.6 s)."""
    import time

    import tqdm.auto

    closed = []

    class Recorded(tqdm.auto.tqdm):
        def close(self):
            closed.append(self.format_dict["elapsed"])
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
    model, loader = setup(progress=True)
    loader.ops.batch_size = 16
    loader.ops.progress.after = 0.2
    model.register_forward_hook(lambda *a: time.sleep(0.05))  # 13 forwards of 16: about 0.65 s
    t0 = time.perf_counter()
    loader.ops.outputs(np.arange(200))
    took = time.perf_counter() - t0
    assert closed and took - 0.1 <= closed[0] <= took + 0.05  # (tqdm closes twice: once from __del__)


@pytest.mark.parametrize("missing, says", [("torch", r"PyTorch's SummaryWriter: pip install 'crestcore\[torch,monitor\]'"),
                                           ("tensorboard", "TensorBoard: pip install tensorboard")])
def test_the_tensorboard_writer_names_the_module_that_is_missing(tmp_path, monkeypatch, missing, says):
    """Review 108: without torch (the monitor extra does not install it) the writer asked for tensorboard."""
    import builtins

    from crestcore.adapters.monitor import TensorBoardWriter

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=f"TensorBoardWriter needs {says}"):
        TensorBoardWriter(tmp_path / "runs")
