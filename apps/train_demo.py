"""``crest demo``: train a small CNN on Fashion-MNIST on full data, on the baselines' subsets and with CREST.

This module sits on top of everything (like the CLI and :mod:`crestcore.apps.demo`): the core never imports
it. torch, tqdm and matplotlib are imported inside the functions that use them, so ``import
crestcore.apps.train_demo`` imports none of them.

What it does (see ``docs/demo.md``)
-----------------------------------
* ``full``: SGD over the whole training set for ``epochs`` epochs (``ceil(n / m)`` steps each).
* ``sgd-budget``: the full data, shuffled, for ``budget`` of the full run's steps (then it stops).
* ``random``: the same recipe for ``budget`` of the steps: every epoch a fresh uniformly random subset of
  ``steps_per_epoch * m`` examples, in mini-batches of ``m``.
* ``craig``, ``gradmatch``, ``glister``: the same number of steps on the baseline's weighted subset of
  ``steps_per_epoch * m`` examples, selected on last-layer gradients at the current model every
  ``reselect_every`` epochs (GLISTER on a validation split held out of the training set).
* ``prune``: InfoBatch-style loss-based pruning at the same number of steps.
* ``crest``: the same number of steps on CREST's weighted mini-batch coresets
  (:class:`crestcore.adapters.torch.CrestLoader`, ``budget_counts="steps"``), learned-example dropping
  off; ``crest-drop``: the same with dropping on.

Every method but CREST iterates a :class:`crestcore.adapters.baselines.SubsetLoader` (same loop, same
budget accounting as ``CrestLoader``); its selection time is part of the wall clock.

Every method uses the same model initialisation, SGD (momentum 0.9, Nesterov, weight decay 5e-4) and a
linear warm-up + cosine learning-rate schedule over its own number of steps. Test accuracy is measured
``evals`` times during training; the evaluation time is *excluded* from the wall clock, which counts the
batch loading, every training step and, for CREST, every selection, quadratic-model fit, trust check and
drop decision (they all happen inside the loader's ``next``).

The overhead of CREST is measured from the outside: the loader's :class:`TorchModelOps` methods and the
controller's solve (``ops.coresets``) are wrapped with timers (:class:`OpsTimer`), and the time spent in each
``next(loader)`` is attributed to selection (forward over the random subsets; facility location; the rest of
the selection), quadratic model (gradient and Hutchinson probes), checks, or batch loading.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable

import numpy as np

from crestcore.apps import require

__all__ = [
    "TrainSettings",
    "ForgettingTracker",
    "forgetting_events",
    "relative_error",
    "format_table",
    "TABLE_COLUMNS",
    "OpsTimer",
    "load_data",
    "build_cnn",
    "train_method",
    "run_training_demo",
    "make_figures",
    "crest_config",
    "METHODS",
    "DEFAULT_METHODS",
    "QUICK_METHODS",
    "parse_methods",
]

METHODS = ("full", "sgd-budget", "random", "craig", "gradmatch", "glister", "prune", "crest", "crest-drop")
# what `crest demo` runs without --methods: the quick four (full, random, crest, crest-drop); `--methods all`
# adds every baseline
QUICK_METHODS = ("full", "random", "crest", "crest-drop")
DEFAULT_METHODS = QUICK_METHODS  # `crest demo`: ~1-2 min on 2 cores; `--methods all` adds every baseline (~4-10 min)
_BASELINES = ("full", "sgd-budget", "random", "craig", "gradmatch", "glister", "prune")


def parse_methods(text: str) -> tuple[str, ...]:
    """``"all"`` or a comma-separated list of :data:`METHODS` -> a tuple in the given order (duplicates
    dropped); ValueError naming the first unknown method.

    Examples
    --------
    >>> parse_methods("crest, random,crest")
    ('crest', 'random')
    >>> parse_methods("all") == METHODS
    True
    >>> parse_methods("crest,sgd")
    Traceback (most recent call last):
        ...
    ValueError: unknown method 'sgd'; choose from all, full, sgd-budget, ...
    """
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise ValueError(f"no method given; choose from all, {', '.join(METHODS)}")
    out: list[str] = []
    for name in names:
        expand = METHODS if name == "all" else (name,)
        for mth in expand:
            if mth not in METHODS:
                raise ValueError(f"unknown method {mth!r}; choose from all, {', '.join(METHODS)}")
            if mth not in out:
                out.append(mth)
    return tuple(out)

# Fashion-MNIST training-set pixel mean and standard deviation (of x / 255)
_MEAN, _STD = 0.2860, 0.3530


# --------------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    """The training recipe shared by every method, and CREST's options.

    epochs : epochs of the full-data run; the budgeted methods get ``budget`` of its steps.
    m : mini-batch size. lr : peak learning rate (linear warm-up over ``warmup`` of a run's steps, then
    cosine to 0). evals : test evaluations during a run (plus one before the first step).
    crest_* : options of :class:`crestcore.CrestConfig` (see :func:`crest_config`).

    Examples
    --------
    >>> s = TrainSettings(epochs=20, budget=0.1, crest_tau=0.05)
    >>> s.m, s.lr, s.epochs, s.crest_tau
    (128, 0.05, 20, 0.05)
    """

    epochs: int = 5
    budget: float = 0.1
    m: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup: float = 0.1
    evals: int = 6
    seed: int = 0
    device: str = "cpu"
    threads: int | None = 2
    # CREST: None = the library's CrestConfig default; extra["crest"] = more CrestConfig overrides,
    # extra["baselines"] = more SubsetLoader keyword arguments (e.g. solve_on)
    crest_r: int | None = None
    crest_P: int | None = None
    crest_T1: int | None = None
    crest_tau: float | None = None
    crest_h: float | None = None
    crest_b: float | None = None
    crest_fit_batches: int | None = None
    # dropping (the crest-drop method): a decision every drop_every steps (default: once per epoch of
    # the budgeted run), alpha, window (default: the same number of steps), min_records
    drop_every: int | None = None
    drop_alpha: float = 0.1
    drop_min_records: int = 1
    measure_batch_size: int = 256  # CPU: batches past ~256 run the eval forward ~1.5x slower per example (measured)
    # baselines (crestcore.adapters.baselines.SubsetLoader): craig, gradmatch and glister reselect every
    # reselect_every epochs of the budgeted run (None: ceil(epochs / 2), i.e. two selections per run);
    # glister holds out val_fraction of the training set; prune's ratio and annealing (InfoBatch's)
    reselect_every: int | None = None
    val_fraction: float = 0.1
    prune_ratio: float = 0.5
    prune_anneal: float = 0.875
    extra: dict = field(default_factory=dict)

    def reselect_epochs(self) -> int:
        """``reselect_every`` as the baselines use it: the given value, else ``ceil(epochs / 2)``.

        Examples
        --------
        >>> TrainSettings(epochs=5).reselect_epochs(), TrainSettings(epochs=5, reselect_every=1).reselect_epochs()
        (3, 1)
        """
        return self.reselect_every if self.reselect_every is not None else max(1, math.ceil(self.epochs / 2))


def crest_config(s: TrainSettings, *, dropping: bool = False, steps_per_epoch: int = 1):
    """The :class:`crestcore.CrestConfig` of a run with settings ``s``.

    Examples
    --------
    >>> config = crest_config(TrainSettings(m=64, crest_tau=0.05))
    >>> config.m, config.tau, config.T2
    (64, 0.05, None)
    >>> config = crest_config(TrainSettings(m=64), dropping=True, steps_per_epoch=47)
    >>> config.T2, config.drop.window, config.drop.alpha
    (47, 47, 0.1)
    """
    from crestcore.controller import CrestConfig
    from crestcore.dropping import DropConfig

    kw = {"m": s.m}
    for name in ("r", "P", "T1", "tau", "h", "b", "fit_batches"):
        v = getattr(s, "crest_" + name)
        if v is not None:
            kw[name] = v
    if dropping:
        T2 = s.drop_every if s.drop_every is not None else max(1, steps_per_epoch)
        kw["T2"] = T2
        kw["drop"] = DropConfig(alpha=s.drop_alpha, window=T2, min_records=s.drop_min_records)
    kw.update(s.extra.get("crest", {}))
    return CrestConfig(**kw)


# --------------------------------------------------------------------------------------------------
# small pure helpers (unit-tested)
# --------------------------------------------------------------------------------------------------


def relative_error(acc_full: float, acc: float) -> float:
    """``(acc_full - acc) / acc_full * 100`` (percent; negative when ``acc`` beats full data).

    Examples
    --------
    >>> round(relative_error(0.90, 0.88), 4)
    2.2222
    >>> relative_error(0.80, 0.84) < 0
    True
    """
    if not acc_full > 0:
        raise ValueError(f"acc_full must be > 0, got {acc_full!r}")
    return (acc_full - acc) / acc_full * 100.0


def forgetting_events(correct_sequence) -> int:
    """Forgetting events of one example: how many times its classification goes from correct at one
    evaluation to wrong at the next (``True, False`` pairs in the sequence of its evaluations).

    Examples
    --------
    >>> forgetting_events([True, False, True, True, False, False])
    2
    >>> forgetting_events([False, False, True])  # learned, never forgotten
    0
    """
    seq = [bool(c) for c in correct_sequence]
    return sum(1 for a, b in zip(seq, seq[1:]) if a and not b)


class ForgettingTracker:
    """Forgetting scores of ``n`` examples, updated from successive evaluations.

    ``update(indices, correct)`` records whether each example of ``indices`` is classified correctly at
    this evaluation; an example's score is its number of forgetting events so far (correct at its
    previous evaluation, wrong at this one). ``seen`` counts evaluations, ``ever_correct`` flags examples
    classified correctly at least once. A repeated index within one update counts once (its last value).

    Examples
    --------
    >>> tracker = ForgettingTracker(4)
    >>> tracker.update([0, 1, 2], [True, True, False])
    >>> tracker.update([0, 1, 2], [False, True, True])
    >>> tracker.scores, tracker.seen, tracker.ever_correct
    (array([1, 0, 0, 0]), array([2, 2, 2, 0]), array([ True,  True,  True, False]))
    """

    def __init__(self, n: int):
        self.n = int(n)
        self.last = np.full(self.n, -1, dtype=np.int8)  # -1 never seen, 0 wrong, 1 correct
        self.scores = np.zeros(self.n, dtype=np.int64)
        self.seen = np.zeros(self.n, dtype=np.int64)
        self.ever_correct = np.zeros(self.n, dtype=bool)

    def update(self, indices, correct) -> None:
        """Record one evaluation of the examples ``indices``: ``correct`` says which were classified
        correctly; an example correct at its previous evaluation and wrong now is forgotten once more.

        Examples
        --------
        >>> tracker = ForgettingTracker(3)
        >>> for correct in ([True, True, False], [False, True, True], [True, False, True]):
        ...     tracker.update([0, 1, 2], correct)
        >>> tracker.scores
        array([1, 1, 0])
        """
        idx = np.asarray(indices, dtype=np.int64).ravel()
        ok = np.asarray(correct, dtype=bool).ravel()
        if idx.size != ok.size:
            raise ValueError(f"indices ({idx.size}) and correct ({ok.size}) differ in length")
        _, last = np.unique(idx[::-1], return_index=True)
        keep = idx.size - 1 - last
        idx, ok = idx[keep], ok[keep]
        self.scores[idx] += (self.last[idx] == 1) & ~ok
        self.last[idx] = ok.astype(np.int8)
        self.seen[idx] += 1
        self.ever_correct[idx] |= ok


TABLE_COLUMNS = ("method", "steps", "test acc %", "rel. error %", "wall clock s", "speedup", "updates",
                 "overhead %")


def format_table(rows: list[dict]) -> str:
    """The result table (one row per method) as text, columns :data:`TABLE_COLUMNS`.

    Each row: ``method``, ``steps``, ``acc`` (fraction), ``rel_error`` (%), ``wall`` (s), ``speedup``
    (full wall / this wall), ``updates`` (selections; None for full and sgd-budget), ``overhead_pct``
    (selection + CREST's model, checks and dropping + prune's bookkeeping, % of the method's training-step
    time; None for full and sgd-budget).

    Examples
    --------
    >>> rows = [
    ...     {"method": "full", "steps": 2345, "acc": 0.912, "rel_error": 0.0, "wall": 300.0, "speedup": 1.0},
    ...     {"method": "crest", "steps": 235, "acc": 0.884, "rel_error": 3.07, "wall": 41.0, "speedup": 7.32,
    ...      "updates": 12, "overhead_pct": 18.4},
    ... ]
    >>> print(format_table(rows))
    method        steps  test acc %  rel. error %  wall clock s  speedup  updates  overhead %
    -----------------------------------------------------------------------------------------
    full           2345       91.20          0.00         300.0    1.00x        -           -
    crest           235       88.40          3.07          41.0    7.32x       12        18.4
    """
    widths = (12, 6, 11, 13, 13, 8, 8, 11)
    head = " ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(TABLE_COLUMNS, widths)))
    lines = [head, "-" * len(head)]
    for r in rows:
        upd = "-" if r.get("updates") is None else str(r["updates"])
        ovh = "-" if r.get("overhead_pct") is None else f"{r['overhead_pct']:.1f}"
        cells = (r["method"], str(r["steps"]), f"{100 * r['acc']:.2f}", f"{r['rel_error']:.2f}",
                 f"{r['wall']:.1f}", f"{r['speedup']:.2f}x", upd, ovh)
        lines.append(" ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths))))
    return "\n".join(lines)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Learning-rate multiplier at ``step`` of ``total``: linear warm-up over ``ceil(warmup * total)``
    steps, then cosine decay to 0."""
    w = max(1, math.ceil(warmup * total)) if warmup > 0 else 0
    if step < w:
        return (step + 1) / w
    rest = max(1, total - w)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - w, rest) / rest))


def moving_average(x, k: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0 or k <= 1:
        return x
    k = min(k, x.size)
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.empty_like(x)
    for i in range(x.size):  # trailing window, shorter at the start
        a = max(0, i - k + 1)
        out[i] = (c[i + 1] - c[a]) / (i + 1 - a)
    return out


# --------------------------------------------------------------------------------------------------
# data and model
# --------------------------------------------------------------------------------------------------


def _import_torch():
    """Import torch; before its first import, default ``OMP_WAIT_POLICY`` to ``PASSIVE``.

    With OpenMP's default busy-waiting, torch with 2 threads on a shared 2-core machine slows down by
    10x-30x as soon as another process competes for the cores (measured: 25 ms -> 700 ms per step);
    passive waiting costs little when the machine is idle. An explicit setting is kept."""
    import sys

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    return torch


def torch_device_problem(device) -> str | None:
    """Why torch cannot train on ``device`` here, in one line, or None when it can.

    The name must parse (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...), hold data (not ``meta``), and take a
    tensor in this process: a device type this torch build lacks (``mps`` or ``xpu`` on Linux), a CUDA
    device without a GPU or past the GPUs present, fail the probe. torch has one CPU device (``cpu`` or
    ``cpu:0``); a run on ``cpu:1`` would report a device it did not use.

    Examples
    --------
    >>> torch_device_problem("cpu") is None
    True
    >>> torch_device_problem("meta")
    'meta holds no data, so nothing can train on it; e.g. cpu or cuda'
    """
    torch = _import_torch()
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        return f"{device!r} is not a torch device ({exc}); e.g. cpu or cuda"
    if dev.type == "meta":
        return "meta holds no data, so nothing can train on it; e.g. cpu or cuda"
    if dev.type == "cpu" and dev.index not in (None, 0):
        return f"torch has one CPU device (cpu or cpu:0), not {device!r}"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"device {device!r} requested but torch.cuda.is_available() is False"
    try:
        torch.empty(1, device=dev)
    except Exception as exc:  # whatever the build raises for a device it cannot reach (AssertionError for CUDA)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if len(text) > 160:  # torch's message for a missing backend lists every dispatch key (1,250 characters)
            text = text[:157] + "..."
        return f"torch cannot use device {device!r} here ({text})"
    return None


def load_data(root=None, *, n_train: int | None = None, n_test: int | None = None, seed: int = 0):
    """Fashion-MNIST as normalised float32 tensors ``(x_train, y_train, x_test, y_test)``, x (n, 1, 28, 28).

    ``n_train`` / ``n_test`` keep a uniformly random subset (seeded) for quick runs.

    Examples
    --------
    A folder laid out like Fashion-MNIST's (the real one is read from ``root=None``):

    >>> from crestcore.apps.datasets import fashion_mnist_stand_in
    >>> folder = fashion_mnist_stand_in(n_train=64, n_test=32)  # 64 training, 32 test images
    >>> x_train, y_train, x_test, y_test = load_data(folder.name, n_train=48)
    >>> x_train.shape, x_train.dtype, y_train.dtype, x_test.shape
    (torch.Size([48, 1, 28, 28]), torch.float32, torch.int64, torch.Size([32, 1, 28, 28]))
    >>> folder.cleanup()
    """
    x_train, y_train, x_test, y_test = load_arrays(root, n_train=n_train, n_test=n_test, seed=seed)
    torch = _import_torch()
    return (torch.from_numpy(x_train).unsqueeze(1).contiguous(), torch.from_numpy(y_train),
            torch.from_numpy(x_test).unsqueeze(1).contiguous(), torch.from_numpy(y_test))


def load_arrays(root=None, *, n_train: int | None = None, n_test: int | None = None, seed: int = 0):
    """Fashion-MNIST as normalised NumPy arrays ``(x_train, y_train, x_test, y_test)``: x float32 (n, 28, 28)
    (pixels / 255, less the training-set mean, over its standard deviation), y int64.

    ``n_train`` / ``n_test`` keep a uniformly random subset (seeded by ``seed``, in the order of the data
    set). The demos lay these arrays out for their framework: :func:`load_data` (PyTorch, NCHW) and
    :func:`crestcore.apps.keras_demo.load_keras_data` (Keras, NHWC) train on the same examples.

    Examples
    --------
    >>> import tempfile
    >>> from crestcore.apps.datasets import write_fashion_mnist_stand_in
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     write_fashion_mnist_stand_in(folder, n_train=64, n_test=32)
    ...     x_train, y_train, x_test, y_test = load_arrays(folder, n_train=48)
    >>> x_train.shape, x_train.dtype, y_train.dtype, x_test.shape
    ((48, 28, 28), dtype('float32'), dtype('int64'), (32, 28, 28))
    """
    from .datasets import load_fashion_mnist

    xtr, ytr = load_fashion_mnist(root, split="train")
    xte, yte = load_fashion_mnist(root, split="test")
    rng = np.random.default_rng([seed, 7])

    def prep(x, y, k):
        if k is not None and k < x.shape[0]:
            keep = np.sort(rng.choice(x.shape[0], size=k, replace=False))
            x, y = x[keep], y[keep]
        return ((x.astype(np.float32) / 255.0) - _MEAN) / _STD, y.astype(np.int64)

    return (*prep(xtr, ytr, n_train), *prep(xte, yte, n_test))


def build_cnn(num_classes: int = 10):
    """The demo's small CNN (~106k parameters): two strided 3x3/5x5 convolutions with ReLU, then a
    64-unit hidden layer and the linear classifier (the last ``nn.Linear`` gives the logits).

    Examples
    --------
    >>> import torch
    >>> model = build_cnn()
    >>> model(torch.zeros(5, 1, 28, 28)).shape
    torch.Size([5, 10])
    >>> sum(p.numel() for p in model.parameters())
    106122
    """
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 64), nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def evaluate(model, x, y, device, batch: int = 2000) -> float:
    """Test accuracy (fraction) in eval mode; the model's mode is restored."""
    import torch

    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for a in range(0, x.shape[0], batch):
            z = model(x[a:a + batch].to(device))
            correct += int((z.argmax(1).cpu() == y[a:a + batch]).sum())
    model.train(was)
    return correct / max(1, x.shape[0])


# --------------------------------------------------------------------------------------------------
# timing CREST's model operations from the outside
# --------------------------------------------------------------------------------------------------


class OpsTimer:
    """Wraps a :class:`~crestcore.adapters.torch.TorchModelOps` instance's methods with timers.

    The controller calls ``outputs`` (a forward over the random subsets at a selection, over the check
    sample at a trust check), ``gradient`` and ``hutchinson`` (the quadratic model's fit), ``params``, and
    its solve, ``ops.coresets`` when the adapter has one, else :func:`crestcore.minibatch_coresets`: an ops
    object without one gets a timed ``coresets`` that calls :func:`crestcore.minibatch_coresets` with the
    same arguments (the same picks). Each call is appended to ``events`` as ``(name, seconds)``;
    :meth:`attribute` splits the time of one ``next(loader)`` into categories.

    Examples
    --------
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from crestcore.adapters.torch import TorchModelOps
    >>> data = TensorDataset(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 2)
    >>> ops = TorchModelOps(torch.nn.Linear(4, 2), data)
    >>> timer = OpsTimer(ops)
    >>> logits = ops.outputs([0, 1, 2])
    >>> [name for name, seconds in timer.events]
    ['outputs']
    """

    CATEGORIES = ("select_forward", "select_solve", "select_other", "model_fit", "checks", "drops", "data")
    FITS = ("gradient", "hutchinson", "gradient_and_hutchinson")  # the model fit's calls

    def __init__(self, ops, sync: Callable[[], None] | None = None):
        self.ops = ops
        self.sync = sync or (lambda: None)
        self.events: list[tuple[str, float]] = []
        for name in ("outputs", "gradient", "hutchinson", "params", "gradient_and_hutchinson", "coresets"):
            if getattr(ops, name, None) is not None:
                setattr(ops, name, self._wrap(name, getattr(ops, name)))
        if getattr(ops, "coresets", None) is None:  # the controller's own solve, timed: the same call
            from crestcore import minibatch_coresets

            ops.coresets = self._wrap("coresets", minibatch_coresets)

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            self.sync()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.events.append((name, time.perf_counter() - t))

        timed.__wrapped__ = fn
        return timed

    def attribute(self, total: float, selected: bool, checked: bool, dropped: bool, made: bool = False) -> dict:
        """Split ``total`` seconds of one ``next(loader)`` (whose ops calls are in ``events``) into
        categories, then clear the events.

        In one ``next`` the controller may run a check (one ``outputs``) and then a selection (one
        ``outputs``, one ``coresets``, then ``gradient``/``hutchinson``). With a selection, the last
        ``outputs`` before the first ``gradient`` is the selection's forward and earlier ones are checks;
        without one, every ``outputs`` is a check. The ``coresets`` calls (facility location) are the
        selection's solve (``select_solve``). The time outside the ops calls goes to the rest of the
        selection (``select_other``: the features, the subsets and their union, the weights, the quadratic
        model's arithmetic, a check's prediction in the same step, handing out the batch) when a selection
        ran, else to the check (the quadratic model's prediction), else to the drop decision, else to
        loading the batch (``data``). With ``made`` (``coresets="just-in-time"`` selected this step's
        coreset, no selection ran) the last ``outputs`` is that coreset's forward, its ``coresets`` call
        its solve and the rest of the time ``select_other``.

        Examples
        --------
        A step that ran a trust check (an ``outputs`` of 0.2 s) and then a selection (an ``outputs`` of
        0.5 s, a solve of 0.1 s and a model fit of 0.3 s) in 1.5 s; what the ops calls leave is the rest of
        the selection:

        >>> timer = OpsTimer(type("Ops", (), {"outputs": None, "gradient": None, "hutchinson": None,
        ...                                   "params": None, "coresets": None})())
        >>> timer.events = [("outputs", 0.2), ("outputs", 0.5), ("coresets", 0.1), ("gradient", 0.2),
        ...                 ("hutchinson", 0.1)]
        >>> split = timer.attribute(1.5, selected=True, checked=True, dropped=False)
        >>> {k: round(v, 6) for k, v in split.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'select_forward': 0.5, 'select_solve': 0.1, 'select_other': 0.4, 'model_fit': 0.3, 'checks': 0.2,
         'drops': 0.0, 'data': 0.0}
        >>> timer.events
        []
        """
        out = dict.fromkeys(self.CATEGORIES, 0.0)
        ev = self.events
        first_fit = next((i for i, (n, _) in enumerate(ev) if n in self.FITS), None)
        sel_out = None
        if selected or made:
            cands = [i for i, (n, _) in enumerate(ev) if n == "outputs" and (first_fit is None or i < first_fit)]
            sel_out = cands[-1] if cands else None
        spent = 0.0
        for i, (n, dt) in enumerate(ev):
            spent += dt
            if n in self.FITS:
                out["model_fit"] += dt
            elif n == "outputs":
                out["select_forward" if i == sel_out else "checks"] += dt
            elif n == "coresets":  # facility location, at a selection or a coreset made just in time
                out["select_solve"] += dt
            else:  # params(): a copy of the weights, at an anchor or a check
                out["select_other" if selected else "checks"] += dt
        rest = max(0.0, total - spent)
        key = "select_other" if selected or made else "checks" if checked else "drops" if dropped else "data"
        out[key] += rest
        self.events = []
        return out


# --------------------------------------------------------------------------------------------------
# one training run
# --------------------------------------------------------------------------------------------------


def _sync_fn(device):
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def eval_steps(total: int, evals: int) -> set[int]:
    """Steps (1-based counts of completed steps) after which the test accuracy is measured: ``evals``
    of them (at most one per step), evenly spread, the last step among them.

    Examples
    --------
    >>> sorted(eval_steps(10, 4)), sorted(eval_steps(2, 6))
    ([2, 5, 8, 10], [1, 2])
    """
    k = max(1, min(evals, total))
    return {int(round(total * (i + 1) / k)) for i in range(k)}


def sgd_optimizer(params, s: TrainSettings, total: int):
    """The recipe's optimizer for a run of ``total`` steps: ``(optimizer, scheduler)``, SGD with the peak
    learning rate ``s.lr``, momentum, Nesterov and weight decay of ``s``, and the per-step schedule of
    :func:`lr_factor` (linear warm-up over ``s.warmup`` of the steps, then cosine to 0). One training step
    with them is :func:`sgd_step`.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> opt, sched = sgd_optimizer(model.parameters(), TrainSettings(lr=0.1, warmup=0.5), total=4)
    >>> opt.param_groups[0]["lr"]  # the first of two warm-up steps: half the peak
    0.05
    >>> sgd_step(opt, sched, model(torch.ones(1, 3)).sum())
    >>> opt.param_groups[0]["lr"]
    0.1
    """
    import torch

    opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, nesterov=s.nesterov, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, total, s.warmup))
    return opt, sched


def sgd_step(opt, sched, loss) -> None:
    """One training step: clear the gradients, back-propagate ``loss``, step the optimizer and then its
    learning-rate schedule (see :func:`sgd_optimizer`, whose example takes one)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def train_method(method: str, data, s: TrainSettings, *, progress: bool = True, track_forgetting: bool = False,
                 desc: str | None = None) -> dict:
    """Train one method of :data:`METHODS` and return its record.

    The record: ``acc`` (final test accuracy), ``wall`` (training seconds, evaluation excluded),
    ``steps``, ``curve`` (list of ``{step, wall, acc, updates}``), ``breakdown`` (seconds per category:
    ``train`` = forward/backward/optimizer steps, ``data`` = batch loading, for CREST the
    :class:`OpsTimer` categories, for the baselines ``select_forward`` / ``select_solve`` (the
    selection's measurement forward and the rest of it) and ``observe`` (prune's loss bookkeeping)),
    ``counts`` (number of selections, fits, checks), ``stats`` (the loader's), and for CREST
    ``batches`` (indices of every training batch, int32 (steps, m)) and ``pool`` (active pool size after
    each step). With ``track_forgetting`` (full data), ``forgetting``
    is a :class:`ForgettingTracker` fed with the training forward's predictions at every presentation.

    Examples
    --------
    Half the steps of one epoch of CREST on synthetic images, in batches of 16:

    >>> import torch
    >>> y = torch.arange(96) % 10  # 64 training and 32 test images of 10 classes (synthetic)
    >>> x = torch.randn(96, 1, 28, 28, generator=torch.Generator().manual_seed(0)) + y[:, None, None, None] / 5
    >>> data = (x[:64], y[:64], x[64:], y[64:])
    >>> record = train_method("crest", data, TrainSettings(epochs=1, budget=0.5, m=16, evals=1, threads=None),
    ...                       progress=False)
    >>> record["steps"], record["counts"]["selections"] >= 1, 0.0 <= record["acc"] <= 1.0
    (2, True, True)
    """
    torch = _import_torch()
    import torch.nn.functional as F

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if s.threads:
        torch.set_num_threads(int(s.threads))
    device = torch.device(s.device)
    sync = _sync_fn(device)
    x_tr, y_tr, x_te, y_te = data
    n = int(x_tr.shape[0])
    m = int(s.m)
    from crestcore.plan import budget_steps, full_steps

    full_spe = full_steps(n, m)
    spe = full_spe if method == "full" else budget_steps(s.budget, full_spe)
    total = s.epochs * spe
    reselect = s.reselect_epochs()

    torch.manual_seed(s.seed)  # the same initial weights for every method
    model = build_cnn(int(y_tr.max()) + 1).to(device)
    opt, sched = sgd_optimizer(model.parameters(), s, total)
    x_dev, y_dev = x_tr.to(device), y_tr.to(device)

    loader = timer = sub = None
    batches = np.zeros((total, m), dtype=np.int32) if method.startswith("crest") else None
    pool = [] if method == "crest-drop" else None
    if method.startswith("crest"):
        from torch.utils.data import TensorDataset

        from crestcore.adapters.torch import CrestLoader

        cfg = crest_config(s, dropping=method == "crest-drop", steps_per_epoch=spe)
        loader = CrestLoader(model, TensorDataset(x_dev, y_dev), config=cfg, budget=s.budget, epochs=s.epochs,
                             seed=s.seed, labels=y_tr.numpy(), measure_batch_size=s.measure_batch_size)
        if loader.total_steps != total:  # same rounding as ours; guard against drift
            raise RuntimeError(f"CrestLoader plans {loader.total_steps} steps, expected {total}")
        timer = OpsTimer(loader.ops, sync)
        batch_iter = loader.iter_run()  # every epoch's share, one after the other
    else:
        from torch.utils.data import TensorDataset

        from crestcore.adapters.baselines import SubsetLoader

        from crestcore.baselines import method_arguments

        sub = SubsetLoader(model, TensorDataset(x_dev, y_dev), method=method, budget=s.budget, epochs=s.epochs,
                           m=m, seed=s.seed, labels=y_tr.numpy(), measure_batch_size=s.measure_batch_size,
                           **method_arguments(method, reselect_every=reselect, val_fraction=s.val_fraction,
                                              glister_lr=s.lr, prune_ratio=s.prune_ratio,
                                              prune_anneal=s.prune_anneal),
                           **s.extra.get("baselines", {}))
        if sub.total_steps != total:
            raise RuntimeError(f"SubsetLoader plans {sub.total_steps} steps, expected {total}")
        batch_iter = sub.iter_run()

    tracker = ForgettingTracker(n) if track_forgetting else None
    bd = {"train": 0.0, "data": 0.0}
    if timer is not None:
        bd.update(dict.fromkeys(OpsTimer.CATEGORIES, 0.0))
    if sub is not None and method not in ("full", "sgd-budget"):
        bd.update(select_forward=0.0, select_solve=0.0)
        if method == "prune":
            bd["observe"] = 0.0
    counts = {"selections": 0, "fits": 0, "checks": 0, "drop_decisions": 0, "coresets_made": 0}
    eval_at = eval_steps(total, s.evals)
    wall = 0.0
    curve = [{"step": 0, "wall": 0.0, "acc": evaluate(model, x_te, y_te, device), "updates": 0}]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc or method, unit="step", leave=True, dynamic_ncols=True)
    model.train()
    for step in range(total):
        sync()
        t0 = time.perf_counter()
        if loader is not None:
            c0 = dict(loader.controller_state.counters)
            d0 = len(loader.controller_state.log["drops"])
            made0 = loader.controller_state.made
            xb, yb, wb = next(batch_iter)
            sync()
            t1 = time.perf_counter()
            c1 = loader.controller_state.counters
            sel = c1["selections"] > c0["selections"]
            chk = c1["checks"] > c0["checks"]
            drp = len(loader.controller_state.log["drops"]) > d0
            made = not sel and loader.controller_state.made > made0  # coresets="just-in-time"
            for k, v in timer.attribute(t1 - t0, sel, chk, drp, made=made).items():
                bd[k] += v
            counts["coresets_made"] += int(made)
            counts["selections"] += int(sel)
            counts["fits"] += int(sel)
            counts["checks"] += c1["checks"] - c0["checks"]
            counts["drop_decisions"] += int(drp)
            idx = loader.last_indices
            batches[step, : idx.size] = idx
        else:
            n_sel = sub.stats["counters"]["selections"]
            xb, yb, wb = next(batch_iter)
            sync()
            t1 = time.perf_counter()
            spent = 0.0
            for rec_ in sub.stats["selections"][n_sel:]:  # a selection ran inside this next()
                bd["select_forward"] += rec_["forward_seconds"]
                bd["select_solve"] += rec_["solve_seconds"]
                spent += rec_["seconds"]
                counts["selections"] += 1
            bd["data"] += max(0.0, (t1 - t0) - spent)
            if spent > t1 - t0:  # clock granularity: keep the parts summing to the wall clock
                bd["select_solve"] -= spent - (t1 - t0)
            idx = sub.last_indices
        logits = model(xb)
        losses = F.cross_entropy(logits, yb, reduction="none")
        loss = (wb * losses).mean()  # weights mean 1 (exactly 1 for full, sgd-budget and random)
        sgd_step(opt, sched, loss)
        sync()
        t2 = time.perf_counter()
        bd["train"] += t2 - t1
        if loader is not None and method == "crest-drop":
            loader.observe(losses.detach())  # feeds the drop policy
            t3 = time.perf_counter()
            bd["drops"] += t3 - t2
            t2 = t3
            pool.append(int(loader.controller_state.drop.active.sum()))
        elif sub is not None and method == "prune":
            sub.observe(losses.detach())  # the pruning rule reads the training losses
            t3 = time.perf_counter()
            bd["observe"] += t3 - t2
            t2 = t3
        wall += t2 - t0
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"{method}: the training loss is not finite at step {step}")
        if tracker is not None:
            correct = (logits.detach().argmax(1) == yb).cpu().numpy()
            tracker.update(idx, correct)
        if (step + 1) in eval_at:
            curve.append({"step": step + 1, "wall": wall, "acc": evaluate(model, x_te, y_te, device),
                          "updates": counts["selections"]})
        if bar is not None:
            bar.update(1)
            if (step + 1) in eval_at:
                bar.set_postfix(acc=f"{100 * curve[-1]['acc']:.1f}%")
    if bar is not None:
        bar.close()
    rec = {
        "method": method, "steps": total, "steps_per_epoch": spe, "acc": curve[-1]["acc"], "wall": wall,
        "curve": curve, "breakdown": bd, "counts": counts,
    }
    if sub is not None:
        rec["stats"] = sub.stats
        rec["reselect_every"] = reselect if method in ("craig", "gradmatch", "glister") else None
    if loader is not None:
        rec["stats"] = loader.stats
        rec["batches"] = batches
        rec["config"] = config_summary(loader.config)
        if pool is not None:
            rec["pool"] = pool
    if tracker is not None:
        rec["forgetting"] = tracker
    return rec


def config_summary(c) -> str:
    """The CrestConfig options that matter here, in one short line."""
    txt = (f"m={c.m}, r={c.r if c.r is not None else 'default'}, P={c.P} and T1={c.T1} at the start, "
           f"tau={c.tau:g}, h={c.h:g}, b={c.b:g}, fit_batches={c.fit_batches}, kernel={c.kernel}, "
           f"per_class={c.per_class}, batches={c.batches}")
    if c.backend != "auto":
        txt += f", backend={c.backend}"
    if c.T2 is not None:
        txt += (f", dropping every T2={c.T2} steps (alpha={c.drop.alpha:g}, window={c.drop.window}, "
                f"min_records={c.drop.min_records})")
    return txt


def overhead_seconds(bd: dict) -> float:
    """A method's overhead: selection (forward + solve + CREST's rest of a selection step) + CREST's
    quadratic model, checks and drop bookkeeping + prune's loss bookkeeping (0 for full and sgd-budget)."""
    return sum(bd.get(k, 0.0) for k in ("select_forward", "select_solve", "select_other", "model_fit", "checks",
                                        "drops", "observe"))


def selects(name: str) -> bool:
    """Whether a method selects (has updates and an overhead): everything but full and sgd-budget."""
    return name not in ("full", "sgd-budget")


def summarize(records: dict) -> list[dict]:
    """Table rows (see :func:`format_table`) from the records of one seed, keyed by method."""
    full = records.get("full")
    rows = []
    for name, r in records.items():
        bd = r["breakdown"]
        crest = selects(name)
        train_time = bd["train"] + bd["data"]
        rows.append({
            "method": name, "steps": r["steps"], "acc": r["acc"],
            # (no relative error against a full run of accuracy 0, say on a tiny test set: NaN, written as null,
            # as the Keras demo does; it raised after every method had trained, review 135)
            "rel_error": relative_error(full["acc"], r["acc"]) if full and full["acc"] > 0 else float("nan"),
            "wall": r["wall"], "speedup": (full["wall"] / r["wall"]) if full else float("nan"),
            "updates": r["counts"]["selections"] if crest else None,
            "overhead_pct": 100.0 * overhead_seconds(bd) / train_time if crest and train_time > 0 else None,
        })
    return rows


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------

_COLORS = {"full": "black", "random": "tab:orange", "crest": "tab:blue", "crest-drop": "tab:green",
           "sgd-budget": "tab:gray", "craig": "tab:red", "gradmatch": "tab:purple", "glister": "tab:brown",
           "prune": "tab:pink"}
_LABELS = {"full": "full data", "random": "random", "crest": "CREST", "crest-drop": "CREST + dropping",
           "sgd-budget": "SGD (budget steps)", "craig": "CRAIG", "gradmatch": "GradMatch", "glister": "GLISTER",
           "prune": "prune (InfoBatch-style)"}


def forgetting_traces(records: dict, scores: np.ndarray, never: np.ndarray | None = None) -> dict:
    """Per CREST run: the mean forgetting score (and share never learned) of each step's batch."""
    out = {}
    for name, r in records.items():
        if r.get("batches") is None:
            continue
        b = r["batches"].astype(np.int64)
        out[name] = {"mean_score": scores[b].mean(axis=1).tolist()}
        if never is not None:
            out[name]["never_learned"] = never[b].mean(axis=1).tolist()
    return out


def make_figures(records: dict, out, *, tau: float, forgetting: dict | None = None,
                 dataset_mean_score: float | None = None, title: str = "") -> dict:
    """Write the four figures into ``out``; return their paths.

    accuracy_vs_time.png: test accuracy vs training wall clock (evaluation excluded), every method.
    coreset_updates.png: (left) cumulative coreset updates vs iterations, (right) test accuracy vs the
    number of coreset updates (the talk's Figure 8). rho.png: rho_t at each trust check, tau dashed,
    selections marked. forgetting.png: mean forgetting score of the examples in CREST's batches over
    training, dropping off and on (the talk's Figure 9), the whole training set's mean dashed.

    Examples
    --------
    The figures of two short runs on synthetic images:

    >>> import torch
    >>> y = torch.arange(96) % 10  # 64 training and 32 test images of 10 classes (synthetic)
    >>> x = torch.randn(96, 1, 28, 28, generator=torch.Generator().manual_seed(0)) + y[:, None, None, None] / 5
    >>> data = (x[:64], y[:64], x[64:], y[64:])
    >>> settings = TrainSettings(epochs=1, budget=0.5, m=16, evals=2, threads=None)
    >>> records = {name: train_method(name, data, settings, progress=False) for name in ("full", "crest")}
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = tempfile.TemporaryDirectory()
    >>> paths = make_figures(records, folder.name, tau=0.1)
    >>> sorted(Path(p).name for p in paths.values())
    ['accuracy_vs_time.png', 'coreset_updates.png', 'rho.png']
    >>> folder.cleanup()
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    paths = {}
    crest_runs = [k for k in records if k.startswith("crest")]

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lows = []
    for name, r in records.items():
        pts = [p for p in r["curve"] if p["wall"] > 0]  # the initial evaluation sits at 0 s (log axis)
        if not pts:
            continue
        lows.append(min(100 * p["acc"] for p in pts))
        ax.plot([p["wall"] for p in pts], [100 * p["acc"] for p in pts], "o-", color=_COLORS.get(name),
                label=f"{_LABELS.get(name, name)} ({100 * r['acc']:.1f}%)", ms=4)
    init = records[next(iter(records))]["curve"][0]["acc"]
    ax.set_xlabel("training wall clock (s, log scale; test evaluations excluded)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xscale("log")
    if lows:
        ax.set_ylim(bottom=max(0.0, min(lows) - 3))
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"Test accuracy vs wall clock{title} (at 0 s: {100 * init:.1f}%)", fontsize=10)
    fig.tight_layout()
    paths["accuracy_vs_time"] = str(out / "accuracy_vs_time.png")
    fig.savefig(paths["accuracy_vs_time"], dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in crest_runs:
        r = records[name]
        sel = r["stats"]["selections"]
        steps = np.arange(r["steps"] + 1)
        cum = np.searchsorted(np.asarray(sel), steps, side="right")
        a1.step(steps, cum, where="post", color=_COLORS.get(name), label=_LABELS.get(name, name))
        a2.plot([p["updates"] for p in r["curve"][1:]], [100 * p["acc"] for p in r["curve"][1:]], "o-",
                color=_COLORS.get(name), label=_LABELS.get(name, name), ms=4)
    a1.set_xlabel("training iterations")
    a1.set_ylabel("number of coreset updates")
    a1.set_title("Coreset updates vs iterations", fontsize=10)
    a2.set_xlabel("number of coreset updates")
    a2.set_ylabel("test accuracy (%)")
    a2.set_title("Test accuracy vs coreset updates", fontsize=10)
    for a in (a1, a2):
        a.grid(alpha=0.3)
        if crest_runs:  # without a CREST run the panels are empty: no legend to draw
            a.legend(fontsize=8)
    fig.tight_layout()
    paths["coreset_updates"] = str(out / "coreset_updates.png")
    fig.savefig(paths["coreset_updates"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in crest_runs:
        ch = records[name]["stats"]["checks"]
        if ch:
            st = [c["step"] for c in ch]
            rho = [max(c["rho"], 1e-6) for c in ch]
            ax.plot(st, rho, ".-", color=_COLORS.get(name), label=_LABELS.get(name, name), lw=0.8, ms=4)
            fail = [(t, v) for t, v in zip(st, rho) if v > tau]
            if fail:
                ax.plot(*zip(*fail), "x", color=_COLORS.get(name), ms=7)
    ax.axhline(tau, color="red", ls="--", lw=1, label=f"tau = {tau:g}")
    ax.set_yscale("log")
    ax.set_xlabel("training iterations")
    ax.set_ylabel("rho_t = |L_R - F| / L_R")
    ax.set_title("Trust check rho_t over training (x: reselection)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths["rho"] = str(out / "rho.png")
    fig.savefig(paths["rho"], dpi=120)
    plt.close(fig)

    if forgetting:
        names = [k for k in ("crest", "crest-drop") if k in forgetting] or list(forgetting)
        fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), sharey=True, squeeze=False)
        for ax, name in zip(axes[0], names):
            tr = np.asarray(forgetting[name]["mean_score"])
            k = max(1, records[name]["steps_per_epoch"] // 2)
            steps = np.arange(1, tr.size + 1)
            ax.plot(steps, tr, color=_COLORS.get(name), alpha=0.25, lw=0.7)
            ax.plot(steps, moving_average(tr, k), color=_COLORS.get(name), lw=2,
                    label=f"selected examples (moving mean, {k} steps)")
            if dataset_mean_score is not None:
                ax.axhline(dataset_mean_score, color="gray", ls="--", lw=1, label="all training examples")
            drop_note = "learned examples dropped" if name == "crest-drop" else "learned examples kept"
            pool = records[name].get("pool")
            if pool:
                n0 = int(records[name]["stats"]["pool"]) + sum(k for _, k in records[name]["stats"]["drops"])
                drop_note += f"\n(pool {n0} -> {pool[-1]} examples in {len(records[name]['stats']['drops'])} " \
                             "drop decisions)"
            ax.set_title(f"{_LABELS.get(name, name)}: {drop_note}", fontsize=10)
            ax.set_xlabel("training iterations")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        axes[0][0].set_ylabel("mean forgetting score")
        fig.suptitle("Forgetting score of the examples CREST trains on (scores from the full-data run)",
                     fontsize=10)
        fig.tight_layout()
        paths["forgetting"] = str(out / "forgetting.png")
        fig.savefig(paths["forgetting"], dpi=120)
        plt.close(fig)
    return paths


# --------------------------------------------------------------------------------------------------
# the demo
# --------------------------------------------------------------------------------------------------


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def _finite_or_none(x):
    """``x`` with every non-finite float replaced by None, recursively (dicts and lists)."""
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_or_none(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def strict_json(obj, *, default=None, indent: int | None = 1) -> str:
    """``obj`` as strict JSON text: every non-finite number (a NaN, a 0/0 ratio's infinity) becomes ``null``.

    JSON has no NaN or Infinity, but ``json.dumps`` writes them, and strict readers (``JSON.parse``, jq,
    ``json.loads(..., parse_constant=...)``) refuse the file. ``default`` converts what JSON cannot hold, as
    for ``json.dumps``; the values it returns are cleaned too.

    Examples
    --------
    >>> strict_json({"ratio": float("nan"), "runs": [1.5, float("inf")]}, indent=None)
    '{"ratio": null, "runs": [1.5, null]}'
    """
    plain = json.loads(json.dumps(obj, default=default))  # what JSON would hold, NaN still in it
    return json.dumps(_finite_or_none(plain), indent=indent, allow_nan=False)


def _jsonable(records: dict) -> dict:
    out = {}
    for name, r in records.items():
        d = {k: v for k, v in r.items() if k not in ("batches", "forgetting")}
        out[name] = d
    return out


def methods_to_run(methods, known, budget: float) -> list[str]:
    """The methods a comparison trains, in order: ``methods`` (each one of ``known``), with ``full`` put
    first when it is missing (relative errors, speedups and forgetting scores are measured against it).
    ValueError for an unknown method or a ``budget`` outside (0, 1].

    Examples
    --------
    >>> methods_to_run(["crest", "random"], METHODS, 0.1)
    ['full', 'crest', 'random']
    >>> methods_to_run(["crest"], METHODS, 1.5)
    Traceback (most recent call last):
        ...
    ValueError: budget must be in (0, 1], got 1.5
    """
    methods = list(methods)
    for mth in methods:
        if mth not in known:
            raise ValueError(f"unknown method {mth!r}; choose from {known}")
    if "full" not in methods:
        methods.insert(0, "full")
    if not (0 < budget <= 1):
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    return methods


def warm_selection_kernels(methods, print_fn: Callable[[str], None] | None = print, *,
                           crest_host: bool = False) -> float | None:
    """Compile the Numba kernels the methods' selections run on before any method is timed: a first call in
    a fresh process compiles them (about a minute on 2 cores from an empty cache), which is no cost of a
    method's. With ``craig`` in ``methods``: per-class dense facility location on NumPy features, float32
    and float64, the serial and the threaded kernel. With ``crest`` or ``crest-drop`` and ``crest_host``
    (CREST's selection solves on the host's kernels: a GPU model's by default, or ``backend="numba"``): a
    tiny CREST run on them (:func:`warm_crest_host_kernels`; its first selection compiled them inside the
    first CREST run's clock: 16.1 s against 5.1-5.2 s on a fresh H200 machine). Returns the seconds it
    took (None when nothing was warmed) and prints them with ``print_fn``.

    Examples
    --------
    >>> warm_selection_kernels(["full", "random"], print_fn=None) is None
    True
    >>> warm_selection_kernels(["craig"], print_fn=None) >= 0.0
    True
    """
    crest = crest_host and any(m in methods for m in ("crest", "crest-drop"))
    if "craig" not in methods and not crest:
        return None
    from crestcore import facility_location

    t0 = time.perf_counter()
    if "craig" in methods:
        # two classes of 32 points run the serial kernel; two of 128 the threaded one that CRAIG's real
        # selections take when Numba has more than one thread (its first call compiled it inside CRAIG's
        # first timed selection: 12 s of a 1000-example run's 12.1 s)
        for n in (64, 256):
            X = np.random.default_rng(0).normal(size=(n, 10))
            for dtype in (np.float32, np.float64):
                facility_location(X.astype(dtype), 8, labels=np.arange(n) % 2)
        if any(m in methods for m in ("crest", "crest-drop")):
            # Numba is loaded now, so CREST's draws take its host kernels (the class counts, the stratified
            # draw) even where its solve does not: compiled here, not in the first CREST run's clock (0.8 s
            # of 1.0 s on an empty cache: review 135)
            from crestcore import draw_subsets

            y = np.arange(64) % 2
            draw_subsets(y, np.arange(64), 8, 2, np.random.default_rng(0))
    if crest:
        warm_crest_host_kernels()
    dt = time.perf_counter() - t0
    if print_fn is not None:
        print_fn(f"selection kernels ready in {dt:.1f} s (Numba's compile on a first call; not counted in any "
                 "method's wall clock)")
    return dt


def crest_runs_numba(backend: str, on_cpu: bool) -> bool:
    """Whether CREST's selection with ``CrestConfig(backend=backend)`` runs the Numba kernels for a model on
    the CPU (``on_cpu``) or on a device: always with ``"numba"``; with ``"auto"`` for a device's model when
    Numba imports (its features go to the host); never with ``"device"`` or ``"reference"``, nor a CPU
    model's default (the torch kernels).

    Examples
    --------
    >>> crest_runs_numba("numba", on_cpu=True), crest_runs_numba("auto", on_cpu=True)
    (True, False)
    >>> crest_runs_numba("device", on_cpu=False)
    False
    """
    from crestcore.controller import selection_on_host

    return backend == "numba" or selection_on_host(backend, on_cpu)


def warm_crest_host_kernels() -> bool:
    """Run a tiny CREST loop (a linear model on 300 random CPU examples, ``CrestConfig(backend="numba")``) in
    float32 and float64, once with Numba's serial fused kernel and once with its threaded one, so that every
    host kernel a CREST selection calls (the fused solve, the stratified draw, the class counts, the
    finiteness check) is compiled or loaded. Returns False, doing nothing, when torch or Numba does not
    import (``tests/test_train_demo.py`` checks what it runs)."""
    try:
        import torch

        import crestcore.backends.numba as nb
    except ImportError:
        return False
    from crestcore import CrestConfig
    from crestcore.adapters.torch import CrestLoader

    gen = torch.Generator().manual_seed(0)
    work = nb._FUSED_PARALLEL_MIN_WORK
    with torch.random.fork_rng(devices=[]):  # the layers' initialisation draws: not the caller's RNG
        try:
            for threshold in (0, 1 << 62):  # which variant a call takes depends on its size and the threads
                nb._FUSED_PARALLEL_MIN_WORK = threshold
                for dtype in (torch.float32, torch.float64):
                    X = torch.randn(300, 6, generator=gen, dtype=dtype)
                    y = torch.arange(300) % 3
                    model = torch.nn.Linear(6, 3).to(dtype)
                    loader = CrestLoader(model, torch.utils.data.TensorDataset(X, y), budget=0.2, epochs=1,
                                         seed=0, config=CrestConfig(m=16, T1=1, backend="numba"))
                    for xb, yb, w in loader:
                        model.zero_grad()
                        (torch.nn.functional.cross_entropy(model(xb), yb, reduction="none") * w).mean().backward()
        finally:
            nb._FUSED_PARALLEL_MIN_WORK = work
    return True


def start_comparison(out, data, what: str, print_fn: Callable[[str], None] | None = print) -> Path:
    """The start of a comparison, once its ``data`` ``(x_train, y_train, x_test, y_test)`` is loaded: make
    the folder ``out`` (and its parents), and with ``print_fn`` (None: nothing) print the line
    ``Fashion-MNIST: <n> train / <n> test images; <what>``. Returns ``out`` as a Path.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> data = (np.zeros((64, 28, 28)), np.zeros(64), np.zeros((32, 28, 28)), np.zeros(32))
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     out = start_comparison(Path(folder) / "out", data, "CNN, seed 0")
    ...     out.is_dir()
    Fashion-MNIST: 64 train / 32 test images; CNN, seed 0
    True
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if print_fn is not None:
        print_fn(f"Fashion-MNIST: {int(data[0].shape[0])} train / {int(data[2].shape[0])} test images; {what}")
    return out


def finish_comparison(results: dict, out: Path, t_start: float, *, table: str, notes=(),
                      print_fn: Callable[[str], None] | None = print, json_default=None) -> dict:
    """The end of a comparison: record the time since ``t_start`` as ``results["time_total_s"]``, write
    ``results`` to ``out/results.json`` (``json_default`` converts what JSON cannot hold), then with
    ``print_fn`` (None: nothing) print the ``table``, the ``notes`` (one line each) and the total time.
    Returns ``results``.

    Examples
    --------
    >>> import tempfile
    >>> import time
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     results = finish_comparison({"rows": []}, Path(folder), time.perf_counter(), table="(the table)",
    ...                                 notes=["crest: (its time split)"])
    ...     sorted(path.name for path in Path(folder).iterdir())
    <BLANKLINE>
    (the table)
    crest: (its time split)
    <BLANKLINE>
    wall clock excludes test evaluations. Total demo time 0 s. Figures and results.json in .../
    ['results.json']
    """
    results["time_total_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(strict_json(results, default=json_default))  # strict: NaN -> null
    if print_fn is not None:
        print_fn("")
        print_fn(table)
        for line in notes:
            print_fn(line)
        print_fn(f"\nwall clock excludes test evaluations. Total demo time {results['time_total_s']:.0f} s. "
                 f"Figures and results.json in {out}/")
    return results


def run_training_demo(
    out="./crest-demo-out",
    *,
    settings: TrainSettings | None = None,
    methods=DEFAULT_METHODS,
    progress: bool = True,
    root=None,
    n_train: int | None = None,
    n_test: int | None = None,
    print_fn: Callable[[str], None] | None = print,
    figures: bool = True,
) -> dict:
    """Train every method of ``methods`` (names of :data:`METHODS`, or a string for :func:`parse_methods`
    such as ``"all"``) with ``settings``, print a table, save figures and results.json.

    Returns the results dict (also written to ``out/results.json``).

    Examples
    --------
    On a stand-in for Fashion-MNIST (``root=``), without figures:

    >>> from pathlib import Path
    >>> from crestcore.apps.datasets import fashion_mnist_stand_in
    >>> folder = fashion_mnist_stand_in(n_train=64, n_test=32)  # 64 training, 32 test images
    >>> settings = TrainSettings(epochs=1, budget=0.5, m=16, evals=1, threads=None)
    >>> results = run_training_demo(Path(folder.name) / "out", settings=settings, methods="random,crest",
    ...                             progress=False, root=folder.name, print_fn=None, figures=False)
    >>> [(row["method"], row["steps"]) for row in results["rows"]]
    [('full', 4), ('random', 2), ('crest', 2)]
    >>> (Path(folder.name) / "out" / "results.json").is_file()
    True
    >>> folder.cleanup()
    """
    require("the training demo", "pip install 'crestcore[torch,demo]'", "torch",
            *(["matplotlib"] if figures else []), *(["tqdm"] if progress else []))
    s = settings or TrainSettings()
    methods = methods_to_run(parse_methods(methods) if isinstance(methods, str) else methods, METHODS, s.budget)
    t_start = time.perf_counter()
    data = load_data(root, n_train=n_train, n_test=n_test, seed=s.seed)  # FileNotFoundError if missing
    import torch

    if (problem := torch_device_problem(s.device)) is not None:
        raise ValueError(problem)
    out = start_comparison(out, data, f"CNN, m={s.m}, {s.epochs} epochs of full data, budget {s.budget:g}, "
                           f"seed {s.seed}, device {s.device}, "
                           f"torch threads {torch.get_num_threads() if not s.threads else s.threads}", print_fn)
    n = int(data[0].shape[0])
    crest_backend = s.extra.get("crest", {}).get("backend", "auto")
    warm_selection_kernels(methods, print_fn,
                           crest_host=crest_runs_numba(crest_backend, str(s.device).split(":")[0] == "cpu"))
    records = {}
    for mth in methods:
        records[mth] = train_method(mth, data, s, progress=progress, track_forgetting=mth == "full",
                                    desc=f"{mth:<10}")
    rows = summarize(records)
    table = format_table(rows)

    ft = records["full"].pop("forgetting")
    scores = ft.scores.astype(np.float64)
    never = (~ft.ever_correct).astype(np.float64)
    forgetting = forgetting_traces(records, scores, never)
    tau = crest_config(s).tau
    paths = {}
    if figures:
        paths = make_figures(records, out, tau=tau, forgetting=forgetting, dataset_mean_score=float(scores.mean()),
                             title=f" (seed {s.seed})")
    results = {
        "settings": asdict(s),
        "n_train": n, "n_test": int(data[2].shape[0]),
        "machine": machine_line(),
        "torch": torch.__version__,
        "table": table,
        "rows": rows,
        "runs": _jsonable(records),
        "forgetting": {
            "definition": "forgetting events per example in the full-data run: correct at one presentation "
                          "(training forward before the update), wrong at the next",
            "dataset_mean": float(scores.mean()),
            "dataset_never_learned": float(never.mean()),
            "histogram": np.bincount(ft.scores).tolist(),
            "traces": forgetting,
        },
        "paths": {**paths, "results": str(out / "results.json")},
    }
    notes = [breakdown_line(name, records[name]) for name in records if selects(name)]
    return finish_comparison(results, out, t_start, table=table, notes=notes, print_fn=print_fn)


def breakdown_line(name: str, r: dict) -> str:
    bd = r["breakdown"]
    parts = [f"{k} {bd.get(k, 0.0):.1f}s" for k in ("train", "data", "select_forward", "select_solve",
                                                      "select_other", "model_fit", "checks", "drops", "observe")
             if k in bd]
    c = r["counts"]
    if not name.startswith("crest"):
        return f"{name}: {', '.join(parts)}; {c['selections']} selections"
    return (f"{name}: {', '.join(parts)}; {c['selections']} selections, {c['checks']} checks"
            + (f", {c['drop_decisions']} drop decisions, pool {r['pool'][-1]}" if r.get("pool") else ""))
