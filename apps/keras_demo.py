"""``crest demo --framework keras``: the training demo's comparison (full data, random, CREST, CREST with
dropping by default; every method of the PyTorch demo on request, its baselines through the same
:class:`crestcore.baselines.SubsetSchedule`) on Fashion-MNIST, trained through Keras 3 ``model.fit`` with
:mod:`crestcore.adapters.keras`.

This module sits on the applications floor, like :mod:`crestcore.apps.train_demo` (whose settings, CREST
configuration, table and figures it reuses): nothing below imports it, and ``import
crestcore.apps.keras_demo`` imports neither keras nor torch. Keras takes its backend (and device) from the
environment once, when it is first imported. This module writes no environment variable:
:func:`keras_environment` says which ones pick a backend and device, the ``crest`` entry point
(:mod:`crestcore.apps.cli`) sets them before keras is imported, and a script calling
:func:`run_keras_comparison` sets ``KERAS_BACKEND`` itself before its first ``import keras``. A keras
imported with another backend than ``backend=`` (default ``KERAS_BACKEND``, else ``"torch"``) is an error.

The recipe mirrors the PyTorch demo: the same examples (``n_train`` / ``n_test`` subsets drawn the same
way), the same CNN shape (two strided convolutions, a 64-unit hidden layer, a linear classifier giving
logits), the same initial weights for every method (``keras.utils.set_random_seed(seed)``), SGD with
Nesterov momentum 0.9 and weight decay 5e-4, linear warm-up + cosine over each run's own steps, the same
step counts and the same CrestConfig. Differences that come from Keras: NHWC images and Keras's default
initialisers, and Keras's weight decay is decoupled (``w -= lr * wd * w``; PyTorch adds ``wd * w`` to the
gradient). The full and random runs serve the same index sequences as the PyTorch demo.

The wall clock counts everything ``fit`` does between its first and last step (batch loading, the steps,
and for CREST every selection, fit of the quadratic model, trust check and drop decision: they happen
when Keras fetches a batch) and excludes the test evaluations. No forgetting figure (Keras's train step
does not expose the per-example predictions it makes).
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import asdict
from collections.abc import Callable

import numpy as np

from crestcore.apps import require

from .train_demo import (
    TrainSettings, crest_config, crest_runs_numba, eval_steps, finish_comparison, format_table, load_arrays, make_figures,
    methods_to_run, relative_error, selects, start_comparison, warm_selection_kernels,
)

#: the methods the Keras comparison trains: the PyTorch demo's (its default four unless asked)
METHODS = ("full", "sgd-budget", "random", "craig", "gradmatch", "glister", "prune", "crest", "crest-drop")
DEFAULT_METHODS = ("full", "random", "crest", "crest-drop")  # the PyTorch demo's default four

__all__ = ["run_keras_comparison", "train_keras_method", "load_keras_data", "build_keras_cnn", "import_keras",
           "keras_environment"]


def keras_environment(backend: str = "torch", device: str | None = None) -> dict[str, str]:
    """The environment variables that make a keras imported afterwards run ``backend`` on ``device``.

    Keras reads them once, at its first import, so they must be in ``os.environ`` before it. This function
    only computes them (``KERAS_BACKEND``; ``KERAS_TORCH_DEVICE`` for a device on torch;
    ``JAX_PLATFORMS=cpu`` for a CPU run on jax); ``crest demo --framework keras`` sets them.

    Examples
    --------
    >>> keras_environment("torch", "cuda:1")
    {'KERAS_BACKEND': 'torch', 'KERAS_TORCH_DEVICE': 'cuda:1'}
    >>> keras_environment("jax", "cpu")
    {'KERAS_BACKEND': 'jax', 'JAX_PLATFORMS': 'cpu'}
    >>> keras_environment("torch", "cpu:0")  # torch's CPU device, as Keras compares it
    {'KERAS_BACKEND': 'torch', 'KERAS_TORCH_DEVICE': 'cpu'}

    A launcher puts them in the environment of the process that runs keras, e.g.
    ``subprocess.run(cmd, env={**os.environ, **keras_environment("jax")})``.
    """
    if backend not in ("torch", "jax"):
        raise ValueError(f"backend must be 'torch' or 'jax' (the Keras backends CREST supports), got {backend!r}")
    env = {"KERAS_BACKEND": backend}
    if backend == "torch" and device is not None:
        # torch's one CPU device is "cpu": Keras compares KERAS_TORCH_DEVICE with the tensors' device, which
        # torch reports as "cpu", so "cpu:0" made every fit fail with "No gradients provided"
        env["KERAS_TORCH_DEVICE"] = "cpu" if str(device).strip() in ("cpu:0",) else str(device)
    elif backend == "jax" and device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _same_torch_device(have, want: str) -> bool:
    """Whether torch device ``have`` is ``want`` ("cuda" matches every CUDA device, "cuda:1" only that one)."""
    import torch  # imported already: keras runs on it

    want = torch.device(want)
    return have.type == want.type and (want.index is None or have.index == want.index)


def import_keras(backend: str | None = None, device: str | None = None):
    """Import keras and check that it runs ``backend`` (default ``KERAS_BACKEND``, else "torch").

    Nothing is written to the environment: Keras takes its backend and device from it at its first import
    (:func:`keras_environment` lists the variables), so a keras not yet imported must find
    ``KERAS_BACKEND=backend`` there; a keras already imported with another backend is refused. On torch,
    a Keras device other than ``device`` ("cpu", "cuda", "cuda:1", ...) draws a warning.

    Examples
    --------
    Keras runs the backend ``KERAS_BACKEND`` named when it was first imported:

    >>> import os
    >>> keras = import_keras()
    >>> keras.backend.backend() == os.environ.get("KERAS_BACKEND", "torch")
    True
    >>> other = "jax" if keras.backend.backend() == "torch" else "torch"
    >>> import_keras(other)
    Traceback (most recent call last):
        ...
    ValueError: keras is imported with the ... backend in this process; the demo was asked for ...
    """
    want = backend or os.environ.get("KERAS_BACKEND") or "torch"
    env = os.environ.get("KERAS_BACKEND")
    hint = (f"set KERAS_BACKEND={want} before keras is first imported (`crest demo --framework keras` does it; "
            "keras_environment() lists the variables)")
    if "keras" not in sys.modules and env is not None and env != want:
        raise ValueError(f"KERAS_BACKEND is {env!r} but the demo was asked for the {want!r} backend; {hint}")
    try:
        import keras
    except ImportError as exc:
        if env is None and getattr(exc, "name", None) != "keras":  # Keras's default backend is missing
            raise ImportError(f"{exc}; {hint}") from exc
        raise
    have = keras.backend.backend()
    if have != want:
        raise ValueError(f"keras is imported with the {have!r} backend in this process; the demo was asked "
                         f"for {want!r} ({hint})")
    if device is not None and have == "torch":
        where = keras.ops.zeros((1,)).device  # a torch tensor, made where Keras puts everything
        if not _same_torch_device(where, str(device)):
            warnings.warn(f"keras runs on {where}, not {device} (set KERAS_TORCH_DEVICE={device} before keras is "
                          "first imported)", stacklevel=2)
    return keras


def load_keras_data(root=None, *, n_train: int | None = None, n_test: int | None = None, seed: int = 0):
    """Fashion-MNIST as normalised float32 NumPy ``(x_train, y_train, x_test, y_test)``, x (n, 28, 28, 1).

    The ``n_train`` / ``n_test`` subsets are the PyTorch demo's (same seeded draw).

    Examples
    --------
    A folder laid out like Fashion-MNIST's (the real one is read from ``root=None``):

    >>> from crestcore.apps.datasets import fashion_mnist_stand_in
    >>> folder = fashion_mnist_stand_in(n_train=64, n_test=32)  # 64 training, 32 test images
    >>> x_train, y_train, x_test, y_test = load_keras_data(folder.name, n_train=48)
    >>> x_train.shape, x_train.dtype, y_train.dtype, x_test.shape
    ((48, 28, 28, 1), dtype('float32'), dtype('int64'), (32, 28, 28, 1))
    >>> folder.cleanup()
    """
    x_train, y_train, x_test, y_test = load_arrays(root, n_train=n_train, n_test=n_test, seed=seed)
    return np.ascontiguousarray(x_train[..., None]), y_train, np.ascontiguousarray(x_test[..., None]), y_test


def build_keras_cnn(keras, num_classes: int = 10):
    """The demo CNN in Keras: Conv 5x5/2 (16) + ReLU, Conv 3x3/2 (32) + ReLU, Dense 64 + ReLU, Dense
    ``num_classes`` (logits).

    Examples
    --------
    >>> import numpy as np
    >>> keras = import_keras()
    >>> model = build_keras_cnn(keras)
    >>> tuple(model(np.zeros((5, 28, 28, 1), dtype="float32")).shape)
    (5, 10)
    >>> model.count_params()  # the PyTorch demo's CNN has as many
    106122
    """
    L = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(16, 5, strides=2, padding="same", activation="relu"),
        L.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
        L.Flatten(),
        L.Dense(64, activation="relu"),
        L.Dense(num_classes),
    ])


def _warmup_cosine(keras, peak: float, total: int, warmup: float):
    """``train_demo.lr_factor`` as a Keras schedule (keras.ops: traceable on every backend)."""
    ops = keras.ops
    w = max(1, math.ceil(warmup * total)) if warmup > 0 else 0
    rest = max(1, total - w)

    class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            t = ops.cast(step, "float32")
            cos = 0.5 * (1.0 + ops.cos(math.pi * ops.minimum(t - w, float(rest)) / rest))
            if w == 0:
                return peak * cos
            return peak * ops.where(t < w, (t + 1.0) / w, cos)

        def get_config(self):
            return {"peak": peak, "total": total, "warmup": warmup}

    return WarmupCosine()


def _accuracy(keras, model, x, y, batch: int = 2000) -> float:
    if keras.backend.backend() == "jax":
        model.jax_state_sync()  # Keras's JAX trainer detaches the weights within an epoch
    correct = 0
    for a in range(0, x.shape[0], batch):
        z = keras.ops.convert_to_numpy(model(x[a:a + batch], training=False))
        correct += int((np.argmax(z, axis=1) == y[a:a + batch]).sum())
    return correct / max(1, x.shape[0])


def train_keras_method(method: str, data, s: TrainSettings, *, backend: str | None = None, progress: bool = True,
                       desc: str | None = None) -> dict:
    """Train one method through ``model.fit`` and return its record (the fields of
    ``train_demo.train_method``'s, less the forgetting tracker and the per-step batch list).

    Examples
    --------
    Half the steps of one epoch of CREST on synthetic images, in batches of 16:

    >>> import numpy as np
    >>> from crestcore.apps.train_demo import TrainSettings
    >>> y = np.arange(96) % 10  # 64 training and 32 test images of 10 classes (synthetic)
    >>> x = (np.random.default_rng(0).normal(size=(96, 28, 28, 1)) + y[:, None, None, None] / 5).astype("float32")
    >>> data = (x[:64], y[:64], x[64:], y[64:])
    >>> settings = TrainSettings(epochs=1, budget=0.5, m=16, evals=1, threads=None)
    >>> record = train_keras_method("crest", data, settings, progress=False)
    >>> record["steps"], record["counts"]["selections"] >= 1, 0.0 <= record["acc"] <= 1.0
    (2, True, True)
    """
    keras = import_keras(backend, s.device)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if keras.backend.backend() == "torch" and s.threads:
        import torch

        torch.set_num_threads(int(s.threads))
    x_tr, y_tr, x_te, y_te = data
    n, m = int(x_tr.shape[0]), int(s.m)
    from crestcore.plan import budget_steps, full_steps

    full_spe = full_steps(n, m)
    spe = full_spe if method == "full" else budget_steps(s.budget, full_spe)
    total = s.epochs * spe

    keras.utils.set_random_seed(s.seed)  # the same initial weights for every method
    model = build_keras_cnn(keras, int(y_tr.max()) + 1)
    opt = keras.optimizers.SGD(learning_rate=_warmup_cosine(keras, s.lr, total, s.warmup), momentum=s.momentum,
                               nesterov=s.nesterov, weight_decay=s.weight_decay)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    crest = None
    if method.startswith("crest"):
        from crestcore.adapters.keras import CrestCallback

        cfg = crest_config(s, dropping=method == "crest-drop", steps_per_epoch=spe)
        crest = CrestCallback(x_tr, y_tr, config=cfg, budget=s.budget, epochs=s.epochs, seed=s.seed,
                              measure_batch_size=s.measure_batch_size)
        if crest.steps_per_epoch != spe:
            raise RuntimeError(f"CrestCallback plans {crest.steps_per_epoch} steps per epoch, expected {spe}")
        dataset = crest.dataset
    else:  # the baselines: the PyTorch demo's schedule (crestcore.baselines.SubsetSchedule), same seeds
        from crestcore.adapters.keras import SubsetCallback

        from crestcore.baselines import method_arguments

        sub = SubsetCallback(x_tr, np.asarray(y_tr, dtype=np.int64), method=method, budget=s.budget, epochs=s.epochs,
                             m=m, seed=s.seed, measure_batch_size=s.measure_batch_size,
                             **method_arguments(method, reselect_every=s.reselect_epochs(),
                                                val_fraction=s.val_fraction, glister_lr=s.lr,
                                                prune_ratio=s.prune_ratio, prune_anneal=s.prune_anneal))
        if sub.steps_per_epoch != spe:
            raise RuntimeError(f"SubsetCallback plans {sub.steps_per_epoch} steps per epoch, expected {spe}")
        dataset = sub.dataset

    rec = _recorder(keras, model, x_te, y_te, total, eval_steps(total, s.evals), crest, progress=progress,
                    desc=desc or method)
    model.fit(dataset, epochs=s.epochs, callbacks=[crest if crest is not None else sub, rec], verbose=0)
    rec.close()

    bd = {"train": rec.wall, "data": 0.0}
    counts = {"selections": 0, "fits": 0, "checks": 0, "drop_decisions": 0}
    out = {"method": method, "steps": total, "steps_per_epoch": spe, "acc": rec.curve[-1]["acc"], "wall": rec.wall,
           "curve": rec.curve, "breakdown": bd, "counts": counts, "backend": keras.backend.backend()}
    if crest is None:  # a baseline: its selections (and prune's loss measurements) are overhead
        st = sub.stats
        sel = float(sum(r["seconds"] for r in st["selections"]))
        obs = sub.timings["observe"]
        bd.update({"select": sel, "drops": obs, "train": max(0.0, rec.wall - sel - obs)})
        counts["selections"] = len(st["selections"])
        out["stats"] = st
    else:
        st = crest.stats
        t = crest.timings
        bd.update({"select": t["selection"], "model_fit": 0.0, "checks": t["check"],
                   "controller_other": max(0.0, t["controller"] - t["selection"] - t["check"]), "drops": t["observe"]})
        bd["train"] = max(0.0, rec.wall - t["controller"] - t["observe"])
        counts.update(selections=len(st["selections"]), fits=len(st["selections"]), checks=len(st["checks"]),
                      drop_decisions=len(st["drops"]))
        out["stats"] = st
        out["config"] = repr(crest.config)
        if rec.pool:
            out["pool"] = rec.pool
    return out


def _recorder(keras, model, x_te, y_te, total, eval_at, crest, *, progress, desc):
    """A Keras callback measuring wall clock (evaluations excluded) and test accuracy at given steps."""

    class Recorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.curve, self.pool, self.wall = [], [], 0.0
            self._step = 0
            self._bar = None

        def _now(self):
            return time.perf_counter() - self._t0 - self._excluded

        def on_train_begin(self, logs=None):
            self.curve.append({"step": 0, "wall": 0.0, "acc": _accuracy(keras, model, x_te, y_te), "updates": 0})
            if progress:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="step", leave=True, dynamic_ncols=True)
            self._excluded = 0.0
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self._step += 1
            self.wall = self._now()
            if crest is not None and crest.config.T2 is not None:
                self.pool.append(int(crest.controller_state.drop.active.sum()))
            if self._step in eval_at:
                t = time.perf_counter()
                acc = _accuracy(keras, model, x_te, y_te)
                self._excluded += time.perf_counter() - t
                upd = len(crest.controller_state.log["selections"]) if crest is not None else 0
                self.curve.append({"step": self._step, "wall": self.wall, "acc": acc, "updates": upd})
                if self._bar is not None:
                    self._bar.set_postfix(acc=f"{100 * acc:.1f}%")
            if self._bar is not None:
                self._bar.update(1)

        def close(self):
            if self._bar is not None:
                self._bar.close()

    return Recorder()


def _summarize(records: dict) -> list[dict]:
    full = records.get("full")
    rows = []
    for name, r in records.items():
        measured = selects(name)  # CREST and the baselines alike: their selections are overhead (as in the torch demo)
        bd = r["breakdown"]
        overhead = sum(bd.get(k, 0.0) for k in ("select", "checks", "controller_other", "drops"))
        rows.append({
            "method": name, "steps": r["steps"], "acc": r["acc"],
            "rel_error": relative_error(full["acc"], r["acc"]) if full and full["acc"] > 0 else float("nan"),
            "wall": r["wall"], "speedup": (full["wall"] / r["wall"]) if full and r["wall"] > 0 else float("nan"),
            "updates": r["counts"]["selections"] if measured else None,
            "overhead_pct": 100.0 * overhead / bd["train"] if measured and bd["train"] > 0 else None,
        })
    return rows


def run_keras_comparison(
    out="./crest-keras-demo-out",
    *,
    settings: TrainSettings | None = None,
    methods=DEFAULT_METHODS,
    backend: str | None = None,
    progress: bool = True,
    root=None,
    n_train: int | None = None,
    n_test: int | None = None,
    print_fn: Callable[[str], None] | None = print,
    figures: bool = True,
) -> dict:
    """The training demo through Keras: train every method of ``methods`` (``full`` always runs), print the
    table, save figures (accuracy vs wall clock, coreset updates, rho) and ``results.json`` in ``out``.

    Same arguments as :func:`crestcore.apps.train_demo.run_training_demo`, plus ``backend`` (the Keras
    backend: "torch" or "jax"; default ``KERAS_BACKEND``, else "torch"; a keras not yet imported must find
    it in ``KERAS_BACKEND``, see :func:`import_keras`). Returns the results dict.

    Examples
    --------
    On a stand-in for Fashion-MNIST (``root=``), without figures:

    >>> from pathlib import Path
    >>> from crestcore.apps.datasets import fashion_mnist_stand_in
    >>> folder = fashion_mnist_stand_in(n_train=64, n_test=32)  # 64 training, 32 test images
    >>> from crestcore.apps.train_demo import TrainSettings
    >>> settings = TrainSettings(epochs=1, budget=0.5, m=16, evals=1, threads=None)
    >>> results = run_keras_comparison(Path(folder.name) / "out", settings=settings, methods=["random", "crest"],
    ...                                progress=False, root=folder.name, print_fn=None, figures=False)
    >>> [(row["method"], row["steps"]) for row in results["rows"]]
    [('full', 4), ('random', 2), ('crest', 2)]
    >>> folder.cleanup()
    """
    require("the Keras demo", "pip install 'crestcore[keras,demo]'", "keras",
            *(["matplotlib"] if figures else []), *(["tqdm"] if progress else []))
    s = settings or TrainSettings()
    methods = methods_to_run(methods, METHODS, s.budget)
    if backend is not None and backend not in ("torch", "jax"):
        raise ValueError(f"backend must be 'torch' or 'jax' (the Keras backends CREST supports), got {backend!r}")
    t_start = time.perf_counter()
    data = load_keras_data(root, n_train=n_train, n_test=n_test, seed=s.seed)  # FileNotFoundError if missing
    keras = import_keras(backend, s.device)
    out = start_comparison(out, data, f"Keras {keras.__version__} on {keras.backend.backend()}; CNN, m={s.m}, "
                           f"{s.epochs} epochs of full data, budget {s.budget:g}, seed {s.seed}, device {s.device}",
                           print_fn)
    n = int(data[0].shape[0])
    # Keras on JAX hands CREST host NumPy features (the Numba kernels); on torch as the PyTorch demo's
    on_cpu = str(s.device).split(":")[0] == "cpu"
    warm_selection_kernels(methods, print_fn, crest_host=keras.backend.backend() == "jax"
                           or crest_runs_numba(crest_config(s).backend, on_cpu))
    records = {}
    for mth in methods:
        records[mth] = train_keras_method(mth, data, s, backend=backend, progress=progress, desc=f"{mth:<10}")
    rows = _summarize(records)
    table = format_table(rows)
    paths = {}
    if figures:
        paths = make_figures(records, out, tau=crest_config(s).tau, forgetting=None,
                             title=f" (Keras/{keras.backend.backend()}, seed {s.seed})")
    results = {
        "framework": "keras", "backend": keras.backend.backend(), "keras": keras.__version__,
        "settings": asdict(s), "n_train": n, "n_test": int(data[2].shape[0]),
        "table": table, "rows": rows, "runs": records,
        "paths": {**paths, "results": str(out / "results.json")},
    }
    notes = [_breakdown_line(name, r) for name, r in records.items() if name.startswith("crest")]
    return finish_comparison(results, out, t_start, table=table, notes=notes, print_fn=print_fn,
                             json_default=float)


def _breakdown_line(name: str, r: dict) -> str:
    """Where a CREST run's time went, in one line (``train_demo.breakdown_line`` for the Keras records)."""
    bd, c = r["breakdown"], r["counts"]
    return (f"{name}: train {bd['train']:.1f}s, selections {bd['select']:.1f}s, checks {bd['checks']:.1f}s,"
            f" drops {bd['drops']:.1f}s; {c['selections']} selections, {c['checks']} checks")
