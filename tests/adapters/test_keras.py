"""crestcore.adapters.keras: CrestCallback + CrestDataset inside model.fit, and KerasModelOps.

The tests run on Keras's torch backend: ``KERAS_BACKEND=torch`` is set here before keras is first
imported. When keras was already imported with another backend in this pytest process, the torch-backend
tests rerun this file in a subprocess instead. The jax backend is tested in a subprocess (started at the
first test, so it overlaps with the torch tests) whenever jax is installed: a fit checked against a manual
drive of the controller, a simulated one-batch-ahead fetch (what Keras does with JAX on an accelerator),
and the model operations compared with the torch backend's on the same weights.
"""

from __future__ import annotations

import copy

import importlib.util
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("keras") is None or importlib.util.find_spec("torch") is None:
    pytest.skip("keras and torch are needed (pip install 'crestcore[keras,torch]')", allow_module_level=True)

if "keras" not in sys.modules:
    os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported
import keras  # noqa: E402

IN_PROCESS = keras.backend.backend() == "torch"
HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
HAS_JAX = importlib.util.find_spec("jax") is not None and importlib.util.find_spec("jaxlib") is not None

from crestcore import CrestConfig, DropConfig, crest_init, crest_next_batch  # noqa: E402
from crestcore.adapters.keras import (  # noqa: E402
    CrestCallback,
    CrestDataset,
    KerasModelOps,
    SubsetCallback,
    _example_problem,
    labels_from_targets,
)
from crestcore.adapters import keras as keras_adapter  # noqa: E402

if IN_PROCESS:
    import torch

_SUBPROCESS_TEST = "test_torch_backend_suite_in_subprocess"


@pytest.fixture(autouse=True)
def _torch_backend_here(request):
    if not IN_PROCESS and request.node.name != _SUBPROCESS_TEST:
        pytest.skip(f"keras was imported with the {keras.backend.backend()!r} backend in this process; "
                    f"{_SUBPROCESS_TEST} runs these tests on torch in a subprocess")
    if IN_PROCESS:
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # bitwise-repeatable CPU results
        yield
        torch.set_num_threads(before)
    else:
        yield


# ------------------------------------------------------------------------------------------------
# data, models
# ------------------------------------------------------------------------------------------------
def digits(n=480):
    """A slice of scikit-learn's digits (8x8 images, 10 classes), scaled to [0, 1]; synthetic if absent."""
    try:
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        return (X[:n] / 16.0).astype(np.float32), y[:n].astype(np.int64)
    except ImportError:  # pragma: no cover
        g = np.random.default_rng(0)
        centers = g.normal(size=(10, 64))
        y = np.arange(n) % 10
        return (centers[y] + 0.8 * g.normal(size=(n, 64))).astype(np.float32), y.astype(np.int64)


CFG = dict(m=32, r=96, P=2, T1=2, tau=0.005, h=1.0, b=1.0)
BUDGET = 0.25  # ceil(480 / 32) = 15 full steps per epoch -> 4 CREST steps per epoch

RECORD: list = []


class Recorder(keras.Sequential):
    """A Sequential whose train_step records what it trains on (x, y, sample_weight)."""

    def train_step(self, data):
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        RECORD.append(tuple(None if t is None else np.array(keras.ops.convert_to_numpy(t)) for t in (x, y, sw)))
        return super().train_step(data)


def mlp(seed=0, cls=keras.Sequential, softmax=False, d=64, classes=10, hidden=16, loss=None, lr=0.1, momentum=0.0):
    keras.utils.set_random_seed(seed)
    model = cls([keras.Input((d,)), keras.layers.Dense(hidden, activation="relu"),
                 keras.layers.Dense(classes, activation="softmax" if softmax else None)])
    if loss is None:
        loss = ("sparse_categorical_crossentropy" if softmax
                else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum), loss=loss)
    return model


class TrainOnly(keras.layers.Layer):
    """A layer whose weights act in training mode only (``training=False`` passes its input through)."""

    def build(self, shape):
        self.k = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x, training=None):
        return x * self.k if training else x


def flat(model):
    return np.concatenate([np.asarray(w).ravel() for w in model.get_weights()])


def fit(model, X, y, *, epochs=2, seed=3, config=None, **kw):
    crest = CrestCallback(X, y, config=config or CrestConfig(**CFG), budget=BUDGET, seed=seed, record=True, **kw)
    model.fit(crest.dataset, epochs=epochs, callbacks=[crest], verbose=0)  # shuffle=True (the default)
    return crest


def drive_by_hand(model, X, y, steps, seed=3, config=None, epoch_steps=None):
    """The controller driven directly, one train_on_batch per batch: the reference for fit."""
    cfg = config or CrestConfig(**CFG)
    ops = KerasModelOps(model, X, y)
    state = crest_init(cfg, y, seed=seed, epoch_steps=epoch_steps)
    seq = []
    for _ in range(steps):
        state, b = crest_next_batch(state, ops, cfg)
        model.train_on_batch(X[b.indices], y[b.indices], sample_weight=b.weights.astype(np.float32))
        seq.append(b)
    return state, seq


def batchnorm_lr0_run():
    """A BatchNormalization model trained at learning rate 0 through CrestCallback, inputs far from the
    moving statistics' start: (selections, max |rho|, checks, how far the moving mean moved). Only the
    statistics change, so with the anchor's statistics in every measurement no check fails."""
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(480, 8)) * 3 + 5).astype("float32")
    y = (X[:, :4].sum(1) > X[:, 4:].sum(1)).astype(np.int64) + 2 * (X[:, 0] > 5)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.BatchNormalization(),
                              keras.layers.ReLU(), keras.layers.Dense(4)])
    model.compile(optimizer=keras.optimizers.SGD(0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    bn = model.layers[1]
    before = np.array(keras.ops.convert_to_numpy(bn.moving_mean))
    # max_age=None: only a failed check reselects, so one selection shows that every check passed
    crest = CrestCallback(X, y, config=CrestConfig(m=16, max_age=None), budget=0.5, seed=0)
    model.fit(crest.dataset, epochs=2, callbacks=[crest], verbose=0)
    moved = float(np.abs(np.array(keras.ops.convert_to_numpy(bn.moving_mean)) - before).max())
    stats = crest.stats
    return len(stats["selections"]), max(abs(r) for r in stats["rho"]), len(stats["checks"]), moved


# ------------------------------------------------------------------------------------------------
# the jax backend, in a subprocess started at the first test (it overlaps with the torch tests)
# ------------------------------------------------------------------------------------------------
_JAX_SCRIPT = textwrap.dedent(r"""
    import os, sys, json, types
    os.environ["KERAS_BACKEND"] = "jax"
    import numpy as np
    sys.path.insert(0, os.environ["CREST_TEST_DIR"])
    import keras
    assert keras.backend.backend() == "jax"
    import test_keras as T
    from crestcore import CrestConfig, crest_init, crest_next_batch
    from crestcore.adapters.keras import CrestCallback, KerasModelOps
    out = sys.argv[1]
    X, y = T.digits()
    res = {}

    # 1. fit == the controller driven by hand with train_on_batch
    model = T.mlp(0)
    crest = T.fit(model, X, y, epochs=2)
    total = 2 * crest.steps_per_epoch
    ref = T.mlp(0)
    state, seq = T.drive_by_hand(ref, X, y, total, epoch_steps=crest.steps_per_epoch)
    res["position"] = crest.position
    res["total"] = total
    res["same_batches"] = all(np.array_equal(a.indices, i) and np.array_equal(a.weights, w)
                              for a, (i, w) in zip(seq, crest.trained)) and len(seq) == len(crest.trained)
    res["selections"] = list(crest.controller_state.log["selections"])  # an EventLog: list() for plain data
    res["selections_ref"] = list(state.log["selections"])
    res["max_param_diff"] = float(np.max(np.abs(T.flat(model) - T.flat(ref))))

    # 2. one batch ahead (Keras's JAX trainer on an accelerator): every served batch trained once, in order
    import jax
    import keras.src.backend.jax.trainer as jt

    class Ahead:
        def __getattr__(self, k):
            return getattr(jax, k)

        def default_backend(self):
            return "gpu"

    jt.jax = Ahead()
    model = T.mlp(0)
    crest = CrestCallback(X, y, config=CrestConfig(**T.CFG), budget=T.BUDGET, seed=3, record=True)
    handed = []
    nxt = crest._next_batch
    def spy():
        b = nxt(); handed.append(b); return b
    crest._next_batch = spy
    model.fit(crest.dataset, epochs=2, callbacks=[crest], verbose=0)
    res["ahead_position"] = crest.position
    res["ahead_handed"] = len(handed)
    res["ahead_in_order"] = all(np.array_equal(b.indices, i) for b, (i, _) in zip(handed, crest.trained))
    res["ahead_counted"] = crest.controller_state.counters["train_steps"]

    # 3. model operations on fixed weights, for comparison with the torch backend
    m = T.mlp(0, d=64, classes=10, hidden=16)
    m.set_weights([np.asarray(a) for a in np.load(os.environ["CREST_TEST_WEIGHTS"], allow_pickle=False).values()])
    ops = KerasModelOps(m, X, y)
    idx = np.arange(0, 96, 3)
    w = np.linspace(0.5, 1.5, idx.size)
    loss, g = ops.gradient(idx, w)
    np.savez(out, outputs=np.asarray(ops.outputs(idx)), grad=np.asarray(g), loss=loss,
             hutch=np.asarray(ops.hutchinson(idx, w, 7)), params=np.asarray(ops.params()))

    # 4. Keras's private JAX-trainer state that KerasModelOps reads during fit: within an epoch the
    #    weights live in model._jax_state (a dict), with model._jax_state_synced False. A Keras release
    #    that moves them must fail here, by name, not train CREST on the weights of the epoch's start.
    res["keras_version"] = keras.__version__
    broken, seen = [], []
    model = T.mlp(0)
    ops4 = KerasModelOps(model, X, y)
    start = T.flat(model)

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch != 2:
                return
            seen.append(batch)
            m = model  # not self.model: Keras's Callback.model syncs the JAX state back into the variables
            if not hasattr(m, "_jax_state_synced"):
                broken.append("the model has no attribute _jax_state_synced")
            elif m._jax_state_synced:
                broken.append("model._jax_state_synced is True within the epoch (weights not detached?)")
            st = getattr(m, "_jax_state", None)
            if not (isinstance(st, dict) and {"trainable_variables", "non_trainable_variables"} <= set(st)):
                broken.append(f"model._jax_state is {type(st).__name__}, not a dict with trainable_variables "
                              "and non_trainable_variables")
                return
            live = np.concatenate([np.asarray(t).ravel() for t in st["trainable_variables"]])
            if np.array_equal(live, start):
                broken.append("model._jax_state['trainable_variables'] did not move after 3 steps")
            if not np.array_equal(ops4.params(), live):
                broken.append("KerasModelOps.params() is not the trainer's current weights")

    model.fit(X[:128], y[:128], batch_size=16, epochs=1, shuffle=False, callbacks=[Probe()], verbose=0)
    res["jax_state_probed"] = seen
    res["jax_state_broken"] = broken
    # ... and the adapter refuses, naming the fix, a trainer state it does not recognise
    refusals = {}
    m5 = T.mlp(0)
    ops5 = KerasModelOps(m5, X, y)
    m5._jax_state, m5._jax_state_synced = {"weights": []}, False
    for case in ("reshaped", "missing"):
        try:
            ops5.params()
            refusals[case] = None
        except RuntimeError as exc:
            refusals[case] = str(exc)
        if case == "reshaped":
            object.__delattr__(m5, "_jax_state_synced")
    res["jax_state_refusals"] = refusals

    # 4. a subclassed model whose call() takes no training argument (Keras's trainer passes none then)
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden, self.out = keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)

        def call(self, x):
            return self.out(self.hidden(x))

    m6 = Sub()
    m6.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    c6 = CrestCallback(X, y, config=CrestConfig(m=32), budget=0.2, seed=0)
    m6.fit(c6.dataset, epochs=1, callbacks=[c6], verbose=0)
    res["no_training_arg"] = [c6.position, c6.steps_per_epoch]

    # 5. a bfloat16 model (ml_dtypes weights, which the core does not take: measured in float32) and
    #    float64 floatx without JAX_ENABLE_X64 (float64 variables holding float32 values)
    for policy, floatx in (("bfloat16", "float32"), ("float32", "float64")):
        keras.config.set_dtype_policy(policy)
        keras.config.set_floatx(floatx)
        m7 = T.mlp(0)
        c7 = CrestCallback(X, y, config=CrestConfig(m=32), budget=0.2, seed=0)
        m7.fit(c7.dataset, epochs=1, callbacks=[c7], verbose=0)
        res[f"dtype_{policy}_{floatx}"] = [c7.position, c7.steps_per_epoch]
    keras.config.set_dtype_policy("float32")
    keras.config.set_floatx("float32")

    # 6. BatchNormalization at learning rate 0: the measurements use the anchor's moving statistics
    res["batchnorm_lr0"] = list(T.batchnorm_lr0_run())

    # 7. a fit interrupted within a step (a callback before CREST's raising at the step's end, as Ctrl-C
    #    does) left that step's weights pinned: the next fit read them after Keras had deleted them
    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                raise KeyboardInterrupt

    m8 = T.mlp(0)
    c8 = CrestCallback(X, y, config=CrestConfig(m=32), budget=0.2, seed=0)
    res["interrupted"] = False
    try:
        m8.fit(c8.dataset, epochs=2, callbacks=[Stop(), c8], verbose=0)
    except KeyboardInterrupt:
        res["interrupted"] = True  # the case under test: without it the refit below proves nothing
    try:
        m8.fit(c8.dataset, epochs=1, callbacks=[c8], verbose=0)
        res["interrupted_refit"] = "ok"
    except Exception as exc:
        res["interrupted_refit"] = f"{type(exc).__name__}: {exc}"

    # 8. a model whose only trainable weights act with training=True: JAX's gradient of a weight the loss
    #    does not read is an exact 0, which was fitted silently; refused as on the torch backend
    TrainOnly = T.TrainOnly

    inp = keras.Input((64,))
    m9 = keras.Model(inp, TrainOnly()(keras.layers.Dense(10, trainable=False)(inp)))
    ops9 = KerasModelOps(m9, X, y)
    refused = []
    for call in (lambda: ops9.gradient(np.arange(8), np.ones(8)), lambda: ops9.hutchinson(np.arange(8), np.ones(8), 0)):
        try:
            call()
            refused.append(None)
        except RuntimeError as exc:
            refused.append(str(exc))
    res["train_only_refused"] = refused
    # ... and when the layer that was reached is frozen between two fits (review 21: the reach was traced
    #     once per KerasModelOps, which a second fit on the same model keeps)
    keras.utils.set_random_seed(0)
    dense = keras.layers.Dense(10)
    m10 = keras.Model(inp, TrainOnly()(dense(inp)))
    c10 = CrestCallback(X, y, config=CrestConfig(m=32), budget=0.2, seed=0, epochs=2)
    m10.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    m10.fit(c10.dataset, epochs=1, callbacks=[c10], verbose=0)
    dense.trainable = False
    m10.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    try:
        m10.fit(c10.dataset, epochs=2, initial_epoch=1, callbacks=[c10], verbose=0)
        res["refrozen"] = None
    except RuntimeError as exc:
        res["refrozen"] = str(exc)

    # 9. a fit interrupted inside a selection (Ctrl-C) keeps the callback's fit open and that step's weights
    #    pinned; the next fit's build fetch (after a compile, before on_train_begin) ran a selection on the
    #    pinned weights, not on the ones the user had set since (review 22). It is a shape probe now.
    keras.utils.set_random_seed(0)
    m11 = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    m11.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    c11 = CrestCallback(X, y, config=CrestConfig(**T.CFG), budget=T.BUDGET, seed=3, epochs=2)
    original, calls, seen = KerasModelOps.gradient, [0], []

    def interrupted(ops, idx, w):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return original(ops, idx, w)

    KerasModelOps.gradient = interrupted
    try:
        m11.fit(c11.dataset, epochs=2, callbacks=[c11], verbose=0)
    except KeyboardInterrupt:
        pass
    m11.set_weights([np.zeros((64, 10), "float32"), np.zeros(10, "float32")])
    m11.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def spied(ops, idx, w):
        seen.append(float(np.abs(ops.params()).sum()))
        return original(ops, idx, w)

    KerasModelOps.gradient = spied
    try:
        m11.fit(c11.dataset, epochs=2, callbacks=[c11], verbose=0)
    finally:
        KerasModelOps.gradient = original
    res["after_interrupt"] = [calls[0], seen[:1]]

    # 12. evaluate / predict on the dataset are refused before Keras's JAX trainer detaches the variables
    # (review 66: refused at the first fetch, after it, and the trained model was left without weights)
    from crestcore.adapters.keras import SubsetCallback

    def refused_and_kept(model, run, err, text=""):
        # [run() raised err naming text, the model's weights unchanged by it (get_weights fails once the
        # variables detached)]
        before = [np.asarray(a).copy() for a in model.get_weights()]
        try:
            run()
            refused = False
        except err as exc:
            refused = text in str(exc)
        try:
            same = len(before) > 0 and all(np.array_equal(a, np.asarray(b))
                                           for a, b in zip(before, model.get_weights()))
        except Exception:  # noqa: BLE001 - the variables detached
            same = False
        return [refused, same]

    def fit_once(model, callback):
        return lambda: model.fit(callback.dataset, epochs=1, callbacks=[callback], verbose=0)

    kept = []
    for make in (lambda: CrestCallback(X, y, config=CrestConfig(**T.CFG), budget=T.BUDGET, seed=3),
                 lambda: SubsetCallback(X, y, method="random", m=16, budget=T.BUDGET, epochs=1, seed=3)):
        for loop in ("evaluate", "predict"):
            m12, cb = T.mlp(0), make()
            fit_once(m12, cb)()
            kept.append(refused_and_kept(m12, lambda: getattr(m12, loop)(cb.dataset, verbose=0), RuntimeError))
    # 13. labels beyond the model's outputs: refused when the fit begins, the weights kept (review 66)
    m13 = T.mlp(0)
    c13 = CrestCallback(X, y + 10, config=CrestConfig(**T.CFG), budget=T.BUDGET, seed=3)
    kept.append(refused_and_kept(m13, fit_once(m13, c13), ValueError, "the labels hold class"))

    # 14-16. the first selection's other refusals, raised before the variables detach (review 66): labels
    #        beyond a subclassed model's outputs (no symbolic outputs to read before a step), embeddings=True
    #        on a model whose last layer is no Dense, a model none of whose trainable weights the measured
    #        loss reads (Sub: case 4's model)
    keras.utils.set_random_seed(0)
    m14 = Sub()
    m14.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    m14(X[:2])  # built: its weights exist before the fit, to compare after
    keras.utils.set_random_seed(0)
    m15 = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10), keras.layers.Activation("linear")])
    m15.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    keras.utils.set_random_seed(0)
    m16 = keras.Model(inp, TrainOnly()(keras.layers.Dense(10, trainable=False)(inp)))
    m16.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cases = [(m14, y + 10, {}, ValueError, "remap y to 0..C-1 (np.unique(y, return_inverse=True)[1]) or give the "
                                           "model 20 outputs"),
             (m15, y, {"embeddings": True}, ValueError, "Dense layer"),
             (m16, y, {}, RuntimeError, "no trainable variable gets a gradient")]
    for mk, yk, extra, err, text in cases:
        ck = CrestCallback(X, yk, config=CrestConfig(**T.CFG, **extra), budget=T.BUDGET, seed=3)
        kept.append(refused_and_kept(mk, fit_once(mk, ck), err, text))
    # 17. the same for a baseline that measures (review 79: SubsetCallback had no preflight, and its refusal
    #     inside the first step left the subclassed model without weights)
    keras.utils.set_random_seed(0)
    m17 = Sub()
    m17.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    m17(X[:2])
    c17 = SubsetCallback(X, y + 10, method="craig", m=16, budget=T.BUDGET, epochs=1, seed=3)
    kept.append(refused_and_kept(m17, fit_once(m17, c17), ValueError, "the labels hold class"))
    # a model whose one output is in a dict: the refusal that says how to build it, as on torch (review 124: jax's
    # preflight read the dict's .shape, an AttributeError)
    inp = keras.Input((64,))
    m22 = keras.Model(inp, {"main": keras.layers.Dense(10)(inp)})
    m22.compile(optimizer="sgd", loss={"main": keras.losses.SparseCategoricalCrossentropy(from_logits=True)})
    c22 = CrestCallback(X, y, config=CrestConfig(**T.CFG), budget=T.BUDGET, seed=3)
    kept.append(refused_and_kept(m22, fit_once(m22, c22), ValueError, "got a dict with 1 entry ('main')"))
    res["refused_and_kept"] = kept

    # 18. which of two same-shape layers trains swapped between measurements (review 84): jax reused the trace
    #     of the first set, whose stateless_call put each value into the other layer's variable (outputs off
    #     by 2.7, silently); the forward, gradient and curvature must be the fresh operations' after the swap
    keras.utils.set_random_seed(0)
    x18, y18 = X[:64, :8], y[:64] % 3
    inp = keras.Input((8,))
    a18, b18 = keras.layers.Dense(8, name="a"), keras.layers.Dense(8, name="b")
    m18 = keras.Model(inp, keras.layers.Dense(3, name="head")(b18(keras.ops.relu(a18(inp)))))
    b18.trainable = False
    ops18, idx18, w18 = KerasModelOps(m18, x18, y18), np.arange(16), np.linspace(0.5, 1.5, 16)
    ops18.outputs(idx18), ops18.gradient(idx18, w18), ops18.hutchinson(idx18, w18, 3)  # traced for {a, head}
    a18.trainable, b18.trainable = False, True
    fresh18 = KerasModelOps(m18, x18, y18)
    want = np.asarray(m18(x18[idx18], training=False))
    res["swapped_outputs"] = [float(np.abs(np.asarray(o.outputs(idx18)) - want).max()) for o in (ops18, fresh18)]
    res["swapped_gradient"] = float(np.abs(np.asarray(ops18.gradient(idx18, w18)[1])
                                           - np.asarray(fresh18.gradient(idx18, w18)[1])).max())
    res["swapped_hutchinson"] = float(np.abs(np.asarray(ops18.hutchinson(idx18, w18, 3))
                                             - np.asarray(fresh18.hutchinson(idx18, w18, 3))).max())

    # 19. a loss that takes the batch mean itself drops the sample weights (review 106): refused when the fit
    #     begins, the weights kept; per-example losses of the user's own train; the check moves no variable
    from crestcore.adapters import keras as KA

    m19 = T.mlp(0, loss=T._MeanCE())
    c19 = CrestCallback(X, y, config=CrestConfig(**T.CFG), budget=T.BUDGET, seed=3, outputs="logits")
    mean_loss = [refused_and_kept(m19, fit_once(m19, c19), ValueError, "ignores fit's sample weights")]
    for loss in (T._per_example_ce, T._PerExampleCE()):
        m20 = T.mlp(0, loss=loss)
        c20 = CrestCallback(X, y, config=CrestConfig(**T.CFG), budget=T.BUDGET, seed=3, outputs="logits")
        fit_once(m20, c20)()
        mean_loss.append(c20.position == c20.steps_per_epoch)
    keep = []
    for loss in (keras.losses.SparseCategoricalCrossentropy(from_logits=True), T._MeanCE()):
        m21 = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16), keras.layers.BatchNormalization(),
                                keras.layers.Dropout(0.5), keras.layers.Dense(10)])
        m21.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=loss)
        m21.fit(X[:32], y[:32], epochs=1, verbose=0)
        before = [np.array(v.value) for v in m21.variables + m21.optimizer.variables]
        try:
            KA._check_loss_weighs_examples(m21, X, y, y, "CrestCallback")
            refused = False
        except ValueError:
            refused = True
        after = [np.array(v.value) for v in m21.variables + m21.optimizer.variables]
        keep.append([refused, len(before) == len(after) and all(np.array_equal(a, b) for a, b in zip(before, after))])
    res["batch_mean_loss"] = mean_loss
    res["loss_check_kept"] = keep

    # 20. weights that never reach the compiled loss (review 156: an overridden compute_loss that leaves them out):
    #     refused at the first step on jax too (the step's trace calls the loss), the model still usable
    m23 = T.mlp(0, cls=T.DropsWeightsInComputeLoss)
    c23 = CrestCallback(X, y, config=CrestConfig(**T.CFG), budget=T.BUDGET, seed=3)
    try:
        fit_once(m23, c23)()
        msg = None
    except ValueError as exc:
        msg = str(exc)
    try:  # the same fit again (review 158: jax kept the first fit's compiled step, the spy saw nothing, it trained)
        fit_once(m23, CrestCallback(X, y, config=CrestConfig(**T.CFG), budget=T.BUDGET, seed=3))()
        again = None
    except ValueError as exc:
        again = str(exc)
    msg = msg if again == msg else f"again: {again}"
    try:
        usable = bool(np.all(np.isfinite(np.asarray(m23.predict(X[:4], verbose=0)))))
    except Exception:  # noqa: BLE001 - the variables detached
        usable = False
    m24 = T.mlp(0, cls=T.KeepsWeightsInComputeLoss)
    c24 = CrestCallback(X, y, config=CrestConfig(**T.CFG), budget=T.BUDGET, seed=3)
    fit_once(m24, c24)()
    step24 = m24.train_function  # checked and passed: a later fit runs it as it is (review 159: no retrace)
    c24b = CrestCallback(X, y, config=CrestConfig(**T.CFG), budget=T.BUDGET, seed=3)
    fit_once(m24, c24b)()
    res["weights_never_reach"] = [msg, usable, c24.position == c24.steps_per_epoch,
                                  type(m23._compile_loss) is type(m24._compile_loss),
                                  m24.train_function is step24 and c24b.position == c24b.steps_per_epoch]
    print("JSON" + json.dumps(res))
""")


def _fixed_weights(path):
    g = np.random.default_rng(11)
    shapes = [(64, 16), (16,), (16, 10), (10,)]
    np.savez(path, **{f"w{i}": (0.3 * g.normal(size=s)).astype(np.float32) for i, s in enumerate(shapes)})
    return path


@pytest.fixture(scope="module")
def jax_child(tmp_path_factory):
    """The jax-backend subprocess: (process, output npz path, weights path)."""
    if not HAS_JAX:
        if os.environ.get("CRESTCORE_TEST_REQUIRE_JAX") == "1":  # make test / .ci/run install jax: never skip there
            pytest.fail("jax is not installed but CRESTCORE_TEST_REQUIRE_JAX=1: install the keras-jax extra "
                        "(pip install -c constraints-dev.txt -e '.[keras-jax]')")
        pytest.skip("jax is not installed (pip install 'crestcore[keras-jax]' to test the jax backend)")
    d = tmp_path_factory.mktemp("keras_jax")
    weights = _fixed_weights(d / "weights.npz")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", CREST_TEST_DIR=str(HERE.parent),
               CREST_TEST_WEIGHTS=str(weights), XLA_FLAGS="--xla_cpu_multi_thread_eigen=false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _JAX_SCRIPT, str(d / "ops.npz")], env=env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc, d / "ops.npz", weights
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(autouse=True, scope="module")
def _start_jax_early(request):
    """Start the jax subprocess with the first test when the jax test is selected (so they overlap).
    Not under pytest-xdist, where the jax test may run on another worker: it starts the subprocess itself."""
    if (IN_PROCESS and HAS_JAX and not os.environ.get("PYTEST_XDIST_WORKER")
            and any(it.name == "test_jax_backend" for it in request.session.items)):
        request.getfixturevalue("jax_child")
    yield


# ------------------------------------------------------------------------------------------------
# fit serves the controller's batches
# ------------------------------------------------------------------------------------------------
def test_fit_trains_on_the_controllers_batches_and_weights():
    X, y = digits()
    RECORD.clear()
    model = mlp(0, cls=Recorder)
    crest = fit(model, X, y, epochs=2)
    total = 2 * crest.steps_per_epoch
    assert crest.steps_per_epoch == len(crest.dataset) == 4
    # the build fetch and the extra on_epoch_begin/end before the first epoch consumed no step
    assert crest.position == len(crest.trained) == len(RECORD) == total
    assert crest.controller_state.counters["train_steps"] == total
    # what the train step received is what the controller chose, in its order, whatever Keras's index
    for (xb, yb, sw), (idx, w) in zip(RECORD, crest.trained):
        np.testing.assert_array_equal(xb, X[idx])
        np.testing.assert_array_equal(yb, y[idx])
        np.testing.assert_array_equal(sw, w.astype(np.float32))  # default reduction: weights as they are
        assert abs(w.mean() - 1.0) < 1e-9
    # ... and it is exactly the run of the controller driven by hand (same selections, same weights)
    ref = mlp(0)
    state, seq = drive_by_hand(ref, X, y, total, epoch_steps=crest.steps_per_epoch)
    for b, (idx, w) in zip(seq, crest.trained):
        np.testing.assert_array_equal(b.indices, idx)
        np.testing.assert_array_equal(b.weights, w)
    assert state.log["selections"] == crest.stats["selections"]
    assert len(crest.stats["selections"]) >= 2 and crest.stats["selections"][0] == 0  # reselections happened
    assert [c[0] for c in state.log["checks"]] == [c["step"] for c in crest.stats["checks"]]
    np.testing.assert_array_equal(flat(model), flat(ref))


def test_reproducible_under_a_seed():
    X, y = digits()
    a = fit(mlp(0), X, y, epochs=1)
    m2 = mlp(0)
    b = fit(m2, X, y, epochs=1)
    m3 = mlp(0)
    c = fit(m3, X, y, epochs=1, seed=4)
    for (i1, w1), (i2, w2) in zip(a.trained, b.trained):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(w1, w2)
    assert a.stats["selections"] == b.stats["selections"]
    assert any(not np.array_equal(i1, i3) for (i1, _), (i3, _) in zip(a.trained, c.trained))


def test_build_fetch_is_a_probe_that_consumes_nothing():
    X, y = digits()
    crest = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=0)
    assert isinstance(crest.dataset, CrestDataset)
    for _ in range(4):  # a user's looks outside any fit: probes, never refused
        xb, yb, wb = crest.dataset[3]
    np.testing.assert_array_equal(xb, X[:32])
    np.testing.assert_array_equal(wb, np.zeros(32, np.float32))  # weight 0: training on a probe moves nothing
    crest.dataset.on_epoch_begin()  # Keras's build fetch comes between these two calls
    crest.dataset[3]
    crest.dataset.on_epoch_end()
    assert crest.controller_state.counters["train_steps"] == 0 and crest.position == 0
    crest.dataset.on_epoch_begin()  # looks inside an epoch that no Keras loop runs (a fit that raised left
    for _ in range(4):  # its epoch open): the user's, probes
        assert not crest.dataset[0][2].any()
    crest.dataset.on_epoch_end()
    class Steps(keras.callbacks.Callback):
        trained = 0

        def on_train_batch_end(self, batch, logs=None):
            Steps.trained += 1

    # a fit without the callback: refused at its first fetch (Keras's build fetch), before any step trained
    # (review 66: after two fetches, two steps on the weight-0 probes had trained, which move momentum and
    # BatchNorm statistics); the callbacks it has are not this one
    model = mlp(0)
    with pytest.raises(RuntimeError, match="without the CrestCallback"):
        model.fit(crest.dataset, epochs=1, verbose=0, callbacks=[Steps()])
    assert Steps.trained == 0
    with pytest.raises(RuntimeError, match="without the CrestCallback"):  # another callback's own
        model.fit(crest.dataset, epochs=1, verbose=0, callbacks=[keras.callbacks.History(),
                                                                 CrestCallback(X, y, config=CrestConfig(**CFG))])
    assert Steps.trained == 0
    # the callback inside a CallbackList in the list, or behind a user's callback that forwards its hooks, is
    # in the fit (review 73: refused at the first fetch when the check came in)
    nested = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=0)
    mlp(0).fit(nested.dataset, epochs=1, verbose=0, callbacks=[keras.callbacks.CallbackList([nested])])
    assert nested.position == nested.steps_per_epoch

    class Forwarding(keras.callbacks.Callback):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def set_model(self, model):
            self.inner.set_model(model)

        def set_params(self, params):
            self.inner.set_params(params)

        def __getattribute__(self, name):
            if name.startswith("on_"):
                return getattr(object.__getattribute__(self, "inner"), name)
            return object.__getattribute__(self, name)

    held = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=0)
    mlp(0).fit(held.dataset, epochs=1, verbose=0, callbacks=[Forwarding(held)])
    assert held.position == held.steps_per_epoch
    # a user's callback that records a long list is looked through quickly, whatever it holds
    recorder = Steps()
    recorder.values = [float(i) for i in range(50_000)]
    with pytest.raises(RuntimeError, match="without the CrestCallback"):
        mlp(0).fit(crest.dataset, epochs=1, verbose=0, callbacks=[recorder])
    assert Steps.trained == 0
    after = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=0)  # looked at after the recorder
    mlp(0).fit(after.dataset, epochs=1, verbose=0, callbacks=[after, recorder])
    assert after.position == after.steps_per_epoch
    for loop in (model.evaluate, model.predict):  # evaluate and predict: refused at once
        with pytest.raises(RuntimeError, match=f"model.{loop.__name__} read this dataset"):
            loop(crest.dataset, verbose=0)
    assert crest.controller_state.counters["train_steps"] == 0 and crest.position == 0


def test_fits_validation_pass_and_a_look_after_a_fit_that_raised_take_no_batch():
    """fit(..., validation_data=crest.dataset) is refused (its validation pass took the controller's next
    batches, and on_train_batch_end then recorded the wrong ones as trained: 5 of 15 right); after a fit
    that raised (no on_train_end), a look at crest.dataset is a probe, not the next batch."""
    X, y = digits()
    crest = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=0)
    model = mlp(0)
    w0 = [v.copy() for v in model.get_weights()]
    with pytest.raises(RuntimeError, match=r"fit\(validation_data=...\) is this callback's dataset"):
        model.fit(crest.dataset, epochs=2, callbacks=[crest], validation_data=crest.dataset, verbose=0)
    # refused before any step (review 97: after a whole training epoch, when Keras's validation first read it)
    assert crest.controller_state.counters["train_steps"] == crest.position == 0
    assert all(np.array_equal(a, b) for a, b in zip(w0, model.get_weights()))
    with pytest.raises(RuntimeError, match="model.evaluate read this dataset"):
        model.evaluate(crest.dataset, verbose=0)
    assert crest.controller_state.counters["train_steps"] == 0

    class Boom(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise KeyboardInterrupt  # Ctrl-C in a notebook: Keras calls no on_train_end

    crest = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=0)
    with pytest.raises(KeyboardInterrupt):
        model.fit(crest.dataset, epochs=1, callbacks=[crest, Boom()], verbose=0)
    handed = crest.controller_state.counters["train_steps"]
    for _ in range(3):
        assert not crest.dataset[0][2].any()  # weight 0: a probe
    assert crest.controller_state.counters["train_steps"] == handed


@pytest.mark.parametrize("who", ["crest", "subset"])
def test_a_callbacks_look_inside_fit_is_a_probe_and_spends_no_step(who):
    """Regression (review 38): a user callback reading crest.dataset[i] inside fit (to log a sample batch) got
    the controller's next batch, booked as trained and never trained: every later step's record named the
    batch Keras had trained one step earlier, and one coreset was never trained (SubsetCallback alike)."""
    X, y = digits()
    RECORD.clear()
    model = mlp(0, cls=Recorder)
    if who == "crest":
        cb = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=0, record=True)
    else:
        cb = SubsetCallback(X, y, method="random", budget=BUDGET, epochs=3, m=CFG["m"], seed=0)
    looked, booked = [], []

    class Look(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            looked.append(cb.dataset[0][2])

        def on_train_batch_end(self, batch, logs=None):
            booked.append(cb.last_indices)

    model.fit(cb.dataset, epochs=3, callbacks=[cb, Look()], verbose=0)
    assert len(looked) == 3 and not any(w.any() for w in looked)  # probes: weight 0
    assert cb.position == len(RECORD) == 3 * len(cb.dataset)
    for (x, _, _sw), idx in zip(RECORD, booked):  # every step's record is the batch Keras trained
        np.testing.assert_array_equal(x, X[idx])
    if who == "crest":
        for (x, _, sw), (idx, w) in zip(RECORD, cb.trained):
            np.testing.assert_array_equal(x, X[idx])
            np.testing.assert_allclose(sw, w, rtol=1e-6)


def test_batches_fetched_ahead_are_each_trained_once_in_order(monkeypatch):
    """Keras fetching one batch ahead (its JAX trainer does on accelerators): nothing lost or repeated."""
    from keras.src.backend.torch import trainer as tt

    orig = tt.TorchEpochIterator._get_iterator

    def one_ahead(self):
        it = orig(self)

        def gen():
            prev = None
            for batch in it:
                if prev is not None:
                    yield prev
                prev = batch
            if prev is not None:
                yield prev

        return gen()

    monkeypatch.setattr(tt.TorchEpochIterator, "_get_iterator", one_ahead)
    X, y = digits()
    RECORD.clear()
    model = mlp(0, cls=Recorder)
    crest = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3, record=True)
    handed = []
    nxt = crest._next_batch

    def spy():
        b = nxt()
        handed.append(b)
        return b

    crest._next_batch = spy
    reports = []

    class Mid(keras.callbacks.Callback):  # runs after crest's hook: the step's batch is accounted
        def on_train_batch_end(self, batch, logs=None):
            c = crest.controller_state.counters
            trained = sum(int(idx.size) for idx, _ in crest.trained)
            want = (trained + (c["forward_examples"] + 2 * c["backward_examples"]) / 3) / CFG["m"]
            reports.append((crest.position, len(crest._queue), crest.stats["budget"], want))

    model.fit(crest.dataset, epochs=2, callbacks=[crest, Mid()], verbose=0)
    total = 2 * crest.steps_per_epoch
    # the budget counts the steps trained, not the batch fetched ahead and waiting in the queue
    assert any(queued for _, queued, _, _ in reports)
    full = 2 * crest.full_steps_per_epoch
    for position, _, rep, want in reports:
        assert rep["steps_done"] == position and rep["fraction_steps"] == position / full
        assert rep["fraction_all_passes"] == pytest.approx(want / full, rel=1e-12)
    assert crest.position == len(handed) == len(RECORD) == total
    for b, (idx, w), (xb, _, sw) in zip(handed, crest.trained, RECORD):
        np.testing.assert_array_equal(b.indices, idx)
        np.testing.assert_array_equal(xb, X[idx])
        np.testing.assert_array_equal(sw, w.astype(np.float32))


# ------------------------------------------------------------------------------------------------
# loss reduction, logits or probabilities
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum"])
def test_one_step_is_sgd_on_the_controllers_weighted_loss(reduction):
    """Whatever the reduction, the update is -lr * grad mean_i(w_i l_i) with the controller's weights."""
    X, y = digits(160)
    lr = 0.5
    model = mlp(1, lr=lr, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction))
    w0 = model.get_weights()
    crest = CrestCallback(X, y, config=CrestConfig(m=32, r=64, P=1, T1=5), budget=0.2, seed=1, record=True)
    assert crest.steps_per_epoch == 1
    model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
    idx, w = crest.trained[0]
    assert np.ptp(w) > 0  # a genuinely weighted batch
    after = flat(model)
    model.set_weights(w0)
    _, g = crest.ops.gradient(idx, w)
    np.testing.assert_allclose(after, flat(model) - lr * g.cpu().numpy(), rtol=1e-5, atol=1e-6)


def test_mean_with_sample_weight_and_unreduced_losses_are_refused():
    X, y = digits(160)
    for red in ("mean_with_sample_weight", None):
        model = mlp(0, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=red))
        crest = CrestCallback(X, y, config=CrestConfig(m=32), budget=0.2)
        with pytest.raises(ValueError, match="reduction"):
            model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)


def test_probabilities_are_detected_and_handled_as_log_p():
    X, y = digits(160)
    onehot = np.eye(10, dtype=np.float32)[y]
    probs = mlp(2, softmax=True, loss="categorical_crossentropy")  # Keras string losses take probabilities
    logits = mlp(2)
    logits.set_weights(probs.get_weights())
    crest = CrestCallback(X, onehot, config=CrestConfig(m=32, r=64, P=1), budget=0.2, seed=0, record=True)
    np.testing.assert_array_equal(crest.labels, y)  # labels from one-hot targets
    probs.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
    assert crest.ops.from_probabilities and crest.position == 1
    probs.set_weights(logits.get_weights())
    idx = np.arange(40)
    p_ops, l_ops = crest.ops, KerasModelOps(logits, X, y)
    np.testing.assert_allclose(p_ops.outputs(idx).numpy(), torch.log_softmax(l_ops.outputs(idx), 1).numpy(),
                               atol=1e-5)
    w = np.linspace(0.5, 1.5, 40)
    np.testing.assert_allclose(p_ops.gradient(idx, w)[1].numpy(), l_ops.gradient(idx, w)[1].numpy(), atol=1e-5)
    np.testing.assert_allclose(p_ops.hutchinson(idx, w, 3).numpy(), l_ops.hutchinson(idx, w, 3).numpy(), atol=1e-4)


def test_outputs_kind_needs_an_option_when_it_cannot_be_told():
    X, y = digits(160)

    def my_loss(t, p):
        return keras.losses.sparse_categorical_crossentropy(t, p, from_logits=True)

    model = mlp(0, loss=my_loss)
    crest = CrestCallback(X, y, config=CrestConfig(m=32), budget=0.2)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="outputs="):
        warnings.simplefilter("ignore")
        model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
    crest = CrestCallback(X, y, config=CrestConfig(m=32, r=64), budget=0.2, outputs="logits")
    with pytest.warns(UserWarning, match="cross-entropy"):
        model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
    assert crest.position == 1 and not crest.ops.from_probabilities


def test_labels_from_targets():
    np.testing.assert_array_equal(labels_from_targets(np.array([[0, 1], [1, 0]])), [1, 0])
    np.testing.assert_array_equal(labels_from_targets(np.array([[2.0], [1.0]])), [2, 1])
    with pytest.raises(ValueError, match="one-hot"):
        labels_from_targets(np.array([[0.3, 0.7], [1, 0]]))
    with pytest.raises(TypeError):
        labels_from_targets(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"above 2\^63 - 1"):  # review 109 F2: not wrapped to negative classes
        labels_from_targets(np.array([1, 2**63 + 5], dtype=np.uint64))
    # review 169: multi-hot rows were called soft labels, with labels= as the way out (then a second refusal,
    # then a run that measures another loss than the model's); they are multi-label targets, not supported
    with pytest.raises(ValueError, match=r"not one-hot \(several 1s.*multi-label or per-token targets\).*not supported"):
        labels_from_targets(np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="soft labels"):  # all-zero rows are not multi-label
        labels_from_targets(np.array([[0.0, 0.0], [0.0, 1.0]]))


# ------------------------------------------------------------------------------------------------
# model operations
# ------------------------------------------------------------------------------------------------
def _softmax_regression():
    g = np.random.default_rng(5)
    X = g.normal(size=(50, 4)).astype(np.float32)
    y = g.integers(0, 3, 50)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.set_weights([g.normal(size=(4, 3)).astype(np.float32), g.normal(size=3).astype(np.float32)])
    return X, y, model


def test_gradient_and_hutchinson_are_exact_on_softmax_regression():
    X, y, model = _softmax_regression()
    ops = KerasModelOps(model, X, y, batch_size=7)  # chunked passes sum up exactly
    idx = np.array([3, 1, 4, 1, 5, 9, 2, 6, 40, 49])
    w = np.linspace(0.2, 2.0, idx.size)
    W, b = (np.asarray(a, np.float64) for a in model.get_weights())
    A = np.c_[X[idx].astype(np.float64)]
    Z = A @ W + b
    P = np.exp(Z - Z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    R = P - np.eye(3)[y[idx]]
    N = idx.size
    loss, g = ops.gradient(idx, w)
    ell = -np.log(P[np.arange(N), y[idx]])
    assert abs(loss - (w * ell).mean()) < 1e-5
    gW = A.T @ (w[:, None] * R) / N
    gb = (w[:, None] * R).sum(0) / N
    np.testing.assert_allclose(g.numpy(), np.r_[gW.ravel(), gb], rtol=1e-4, atol=1e-6)
    z = ops.rademacher(7).astype(np.float64)
    np.testing.assert_array_equal(np.abs(z), 1)
    zW, zb = z[:12].reshape(4, 3), z[12:]
    U = A @ zW + zb  # directional change of the logits
    JU = P * U - P * (P * U).sum(1, keepdims=True)  # (diag(p) - p p^T) u per example
    HW = A.T @ (w[:, None] * JU) / N
    Hb = (w[:, None] * JU).sum(0) / N
    np.testing.assert_allclose(ops.hutchinson(idx, w, 7).numpy(), z * np.r_[HW.ravel(), Hb], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ops.losses(idx), ell, rtol=1e-5)
    np.testing.assert_allclose(ops.params().numpy(), np.r_[W.ravel(), b], rtol=1e-6)


def test_ops_do_not_touch_batchnorm_dropout_or_grads():
    X, y = digits(160)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16), keras.layers.BatchNormalization(),
                              keras.layers.ReLU(), keras.layers.Dropout(0.5), keras.layers.Dense(10)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [np.array(w) for w in model.get_weights()]
    ops = KerasModelOps(model, X, y)
    idx = np.arange(64)
    o1 = ops.outputs(idx)
    ops.gradient(idx, np.ones(64))
    ops.hutchinson(idx, np.ones(64), 0)
    o2 = ops.outputs(idx)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)  # dropout off, BN in inference mode
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)  # moving statistics untouched
    assert all(v.value.grad is None for v in model.trainable_variables)


def test_embeddings_are_the_input_of_the_last_dense_layer():
    X, y = digits(160)
    model = mlp(0)
    ops = KerasModelOps(model, X, y)
    z, e = ops.outputs(np.arange(10), embeddings=True)
    hidden = keras.Model(model.inputs[0], model.layers[0].output)
    torch.testing.assert_close(e, hidden(X[:10]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z, ops.outputs(np.arange(10)))
    crest = fit(mlp(0), X, y, epochs=1, config=CrestConfig(m=32, r=64, P=1, embeddings=True))
    assert crest.position == crest.steps_per_epoch


def test_diverged_model_raises_floating_point_error():
    X, y = digits(160)
    model = mlp(0)
    model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])
    crest = CrestCallback(X, y, config=CrestConfig(m=32), budget=0.2)
    with pytest.raises(FloatingPointError, match="diverged"):
        model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)


def test_logits_masked_to_minus_inf_are_refused_as_a_mask_not_a_divergence():
    """Review 93's finding in the Keras callback: -inf logits (a mask) are not a divergence."""
    X, y = digits(160)
    model = mlp(0)
    mask = keras.ops.convert_to_tensor(np.array([0.0] * 9 + [-np.inf], "float32"))
    masked = keras.Sequential([model, keras.layers.Lambda(lambda z: z + mask)])
    ops = KerasModelOps(masked, X, y)
    with pytest.raises(ValueError, match="-inf in 10 of 10 rows") as exc:
        ops.outputs(np.arange(10))
    assert not isinstance(exc.value, FloatingPointError)


def test_a_state_saved_by_a_callback_listed_before_crests_matches_the_weights():
    """Review 97: a saver in callbacks=[saver, crest] took state_dict() in its batch-end hook, before CREST's
    own hook had accounted the step Keras had just trained: the state was one step behind the weights, and a
    run resumed from it trained that batch twice. The step is accounted at the save now, once."""
    X, y = digits()

    class Saver(keras.callbacks.Callback):
        def __init__(self, watched, at):
            super().__init__()
            self.watched, self.at, self.steps, self.saved = watched, at, 0, None

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            if self.steps == self.at:
                its = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
                self.saved = (its, self.watched.state_dict())

    plain = fit(mlp(0), X, y, epochs=2)
    model = mlp(0)
    crest = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3, record=True)
    sub = SubsetCallback(X, y, method="random", budget=BUDGET, epochs=2, m=CFG["m"], seed=3)
    savers = [Saver(crest, 5)]
    model.fit(crest.dataset, epochs=2, callbacks=[*savers, crest], verbose=0)
    its, state = savers[0].saved
    assert state["position"] == its == 5
    trained5 = crest.trained[4][0].tolist()  # the batch of the step just taken is not in the saved queue
    assert all(q["indices"].tolist() != trained5 for q in state["queue"])
    assert crest.position == plain.position == 8  # the step was accounted once, not twice
    assert [i.tolist() for i, _ in crest.trained] == [i.tolist() for i, _ in plain.trained]
    resumed = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3, record=True)
    resumed.load_state_dict(state)
    assert resumed.position == 5
    model = mlp(0)
    saver = Saver(sub, 3)
    model.fit(sub.dataset, epochs=2, callbacks=[saver, sub], verbose=0)
    assert saver.saved[1]["position"] == saver.saved[0] == 3 and sub.position == 8


# ------------------------------------------------------------------------------------------------
# dropping, stats, resume, misuse
# ------------------------------------------------------------------------------------------------
def test_dropping_gets_the_losses_of_the_trained_batches():
    X, y = digits(320)
    cfg = CrestConfig(m=32, r=64, P=2, T1=3, T2=2, drop=DropConfig(alpha=5.0, window=4, min_records=1))
    crest = fit(mlp(0, lr=0.2), X, y, epochs=2, config=cfg, log_stats=True)
    assert crest.observe_losses
    s = crest.stats
    assert s["drops"] and s["drops"][0][0] == 2
    assert s["pool"] < 320  # alpha = 5: everything seen is "learned"
    assert s["counters"]["train_steps"] == crest.position
    hist = crest.model.history.history
    assert "crest_selections" in hist and "crest_pool" in hist
    json.dumps(s)  # plain data


def test_the_losses_of_a_trained_batch_are_recorded_at_its_own_step(monkeypatch):
    # the losses of the batch trained at run position t are recorded at step t, passed explicitly: the step of
    # the batch handed out last when Keras fetches none ahead (as here), the trained batch's own when it does
    # (the queue's order gives it; the torch sampler's prefetching case is tested in test_sampler.py)
    X, y = digits(320)
    cfg = CrestConfig(m=32, r=64, P=2, T1=3, T2=2, drop=DropConfig(alpha=1e-9, window=4, min_records=1))
    seen = []
    real = keras_adapter.crest_observe

    def spy(state, indices, losses, step=None):
        seen.append((np.asarray(indices).copy(), step))
        return real(state, indices, losses, step=step)

    monkeypatch.setattr(keras_adapter, "crest_observe", spy)
    crest = fit(mlp(0), X, y, epochs=2, config=cfg)
    assert len(seen) == len(crest.trained) == crest.position
    for t, ((idx, step), (trained, _)) in enumerate(zip(seen, crest.trained)):
        assert step == t and np.array_equal(idx, trained)


def test_resume_continues_with_the_same_batches(tmp_path):
    X, y = digits()
    straight = mlp(0, cls=keras.Sequential, momentum=0.9)
    a = fit(straight, X, y, epochs=3)

    first = mlp(0, momentum=0.9)
    b = fit(first, X, y, epochs=2)
    first.save(tmp_path / "model.keras")
    blob = pickle.dumps(b.state_dict())

    model = keras.saving.load_model(tmp_path / "model.keras")
    c = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3, record=True)
    c.load_state_dict(pickle.loads(blob))
    assert c.position == 2 * c.steps_per_epoch
    model.fit(c.dataset, epochs=3, initial_epoch=2, callbacks=[c], verbose=0)
    assert c.position == 3 * c.steps_per_epoch
    for (i1, w1), (i2, w2) in zip(a.trained[2 * c.steps_per_epoch:], c.trained):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(w1, w2)
    np.testing.assert_allclose(flat(model), flat(straight), rtol=1e-5, atol=1e-6)
    other = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=4)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(pickle.loads(blob))


def test_a_state_of_a_longer_planned_run_is_loaded_with_a_warning():
    """Regression (review 61): a state saved by a 3-epoch run loaded into CrestCallback(epochs=2) silently
    (CrestLoader warns when the plan shrinks; the budget report counts the callback's epochs); a plan that
    grows, as CrestLoader's may, is not warned about (review 64), and epochs=None takes the saved plan."""
    X, y = digits()
    crest = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3, epochs=3)
    mlp(0).fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
    saved = crest.state_dict()
    assert saved["epochs"] == 3
    with pytest.warns(UserWarning, match="planned for 3 epochs, this callback plans 2"):
        CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3, epochs=2).load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3, epochs=4).load_state_dict(saved)
        same = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3)
        same.load_state_dict(saved)
    assert same.epochs == 3


class _StopAfter(keras.callbacks.Callback):
    """Saves the model and ``crest.state_dict()`` after the ``at``-th step of its fit, then stops the fit: a
    checkpoint taken inside an epoch (listed after the CREST callback, so the step is accounted)."""

    def __init__(self, crest, at, path):
        super().__init__()
        self.crest, self.at, self.path, self.k, self.blob = crest, at, path, 0, None

    def on_train_batch_end(self, batch, logs=None):
        self.k += 1
        if self.k == self.at:
            self.model.save(self.path)
            self.blob = pickle.dumps(self.crest.state_dict())
            self.model.stop_training = True


def test_resume_inside_an_epoch_finishes_it_with_steps_per_epoch(tmp_path):
    """A checkpoint taken inside an epoch: fit(initial_epoch=e, epochs=e + 1, steps_per_epoch=the steps left)
    finishes that epoch, then whole epochs continue, and the run is the uninterrupted one's (same batches,
    same parameters, the planned steps). The documented whole-epoch resume from there is warned about (it
    trains past the plan), and a finishing fit of two epochs is refused when its second begins."""
    X, y = digits()
    straight = mlp(0, momentum=0.9)
    a = fit(straight, X, y, epochs=3)
    spe = a.steps_per_epoch
    assert spe == 4

    first = mlp(0, momentum=0.9)
    b = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3, record=True)
    stop = _StopAfter(b, spe + 2, tmp_path / "model.keras")
    first.fit(b.dataset, epochs=3, callbacks=[b, stop], verbose=0)
    assert b.position == spe + 2

    def resumed():
        c = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3, record=True)
        c.load_state_dict(pickle.loads(stop.blob))
        return keras.saving.load_model(tmp_path / "model.keras"), c

    model, c = resumed()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the finishing fit and the whole epochs after it warn about nothing
        model.fit(c.dataset, initial_epoch=1, epochs=2, steps_per_epoch=spe - 2, callbacks=[c], verbose=0)
        assert c.position == 2 * spe
        model.fit(c.dataset, initial_epoch=2, epochs=3, callbacks=[c], verbose=0)
    assert c.position == 3 * spe == a.position
    assert c.stats["budget"]["planned_steps"] == 3 * spe
    for (i1, w1), (i2, w2) in zip(a.trained[spe + 2:], c.trained):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(w1, w2)
    np.testing.assert_allclose(flat(model), flat(straight), rtol=1e-5, atol=1e-6)

    model, c = resumed()  # the whole-epoch recipe from inside an epoch: warned, with the numbers to fix it
    with pytest.warns(UserWarning, match=r"6 steps, 2 into an epoch of 4.*2 steps more than planned "
                                         r"\(from initial_epoch=1\).*initial_epoch=1, epochs=2, steps_per_epoch=2"):
        model.fit(c.dataset, initial_epoch=1, epochs=3, callbacks=[c], verbose=0)
    assert c.position == 3 * spe + 2  # what the warning said: 2 past the plan

    model, c = resumed()
    with pytest.raises(ValueError, match="for one epoch"):  # a finishing fit runs one epoch
        model.fit(c.dataset, initial_epoch=1, epochs=3, steps_per_epoch=spe - 2, callbacks=[c], verbose=0)
    assert c.position == 2 * spe  # the interrupted epoch was finished before the refusal
    model, c = resumed()
    with pytest.raises(ValueError, match="steps_per_epoch=2"):  # other short epochs: refused, naming the fix
        model.fit(c.dataset, initial_epoch=1, epochs=2, steps_per_epoch=1, callbacks=[c], verbose=0)


def _corrupt(state, what):
    s = copy.deepcopy(state)
    if what == "negative position":
        s["position"] -= 3 * s["position"]
    elif what == "position ahead of the controller":
        s["position"] += 1
    elif what == "position not an integer":
        s["position"] = float(s["position"])
    elif what == "queued index out of range":
        s["queue"][0]["indices"][0] = s["n"]
    elif what == "NaN queued weight":
        s["queue"][0]["weights"][1] = np.nan
    elif what == "queued weights of another length":
        s["queue"][0]["weights"] = s["queue"][0]["weights"][:-1]
    elif what == "queue dropped":
        s["queue"] = []
    elif what == "epochs zero":
        s["epochs"] = 0
    elif what == "truncated drop pool":
        s["crest"]["drop"]["active"] = s["crest"]["drop"]["active"][: s["n"] // 2]
    return s


@pytest.mark.parametrize("what, pattern", [
    ("negative position", "position"),
    ("position ahead of the controller", "position"),
    ("position not an integer", "position"),
    ("queued index out of range", "indices"),
    ("NaN queued weight", "weights"),
    ("queued weights of another length", "weights"),
    ("queue dropped", "queued"),
    ("epochs zero", "epochs"),
    ("truncated drop pool", "active|pool|drop"),
])
def test_a_corrupt_state_dict_is_refused(what, pattern):
    """A state whose fields disagree (position, the queue of handed-out batches, the controller's count)
    is refused with a ValueError saying what is wrong, and the callback keeps its own state."""
    X, y = digits(160)
    cfg = CrestConfig(m=32, r=64)
    a = CrestCallback(X, y, config=cfg, budget=0.4, seed=1)
    mlp(0).fit(a.dataset, epochs=1, callbacks=[a], verbose=0)
    if not a._queue:  # a batch fetched ahead and not trained, as a Keras backend that prefetches leaves it
        a._queue.append(keras_adapter._Entry(a._next_batch(), False))
    state = a.state_dict()
    assert len(state["queue"]) == 1
    b = CrestCallback(X, y, config=cfg, budget=0.4, seed=1)
    b.load_state_dict(copy.deepcopy(state))  # the consistent state loads
    assert b.position == a.position and len(b._queue) == 1
    c = CrestCallback(X, y, config=cfg, budget=0.4, seed=1)
    with pytest.raises(ValueError, match=pattern):
        c.load_state_dict(_corrupt(state, what))
    assert c.position == 0 and c._queue == []


def test_misuse_is_refused_clearly():
    X, y = digits(160)
    with pytest.raises(ValueError, match="single class"):
        CrestCallback(X, np.zeros(160, np.int64))
    with pytest.raises(ValueError, match="exceeds"):
        CrestCallback(X[:20], y[:20], config=CrestConfig(m=32))
    with pytest.raises(ValueError, match="budget"):
        CrestCallback(X, y, budget=0)
    with pytest.raises(ValueError, match="y has"):
        CrestCallback(X, y[:10])
    model = mlp(0)
    crest = CrestCallback(X, y, config=CrestConfig(m=32), budget=0.2)
    with pytest.raises(ValueError, match="runs 5 steps an epoch.*crest.dataset"):  # the callback with other data
        model.fit(X, y, batch_size=32, epochs=1, callbacks=[crest], verbose=0)
    with pytest.raises(RuntimeError, match="crest.dataset"):  # other data of as many steps as CREST's
        mlp(0).fit(X, y, batch_size=160, epochs=1, callbacks=[crest], verbose=0)
    crest = CrestCallback(X, y, config=CrestConfig(m=32), budget=0.2)
    with pytest.raises(ValueError, match="steps_per_epoch out"):  # Keras's epochs out of step with CREST's
        mlp(0).fit(crest.dataset, epochs=3, steps_per_epoch=3, callbacks=[crest], verbose=0)
    crest = CrestCallback(X, y, config=CrestConfig(m=32), budget=0.2)
    with pytest.raises(RuntimeError, match="callbacks"):  # the dataset without its callback
        mlp(0).fit(crest.dataset, epochs=3, verbose=0)
    for name in ("observe_losses", "record", "log_stats"):  # review 25: "false" read as True
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            CrestCallback(X, y, config=CrestConfig(m=32, T2=5), **{name: "false"})
    with pytest.raises(ValueError, match="observe_losses=True feeds the drop policy, which is off"):
        CrestCallback(X, y, config=CrestConfig(m=32), observe_losses=True)  # a forward a step, kept nowhere
    assert CrestCallback(X, y, config=CrestConfig(m=32, T2=5), observe_losses=np.bool_(False)).observe_losses is False
    from crestcore.adapters.keras import _unsupported

    msg = _unsupported("tensorflow", "gradients and Hessian-vector products")
    assert "'tensorflow'" in msg and "torch" in msg and "tf.data" in msg


# ------------------------------------------------------------------------------------------------
# the demo: `crest demo --framework keras`
# ------------------------------------------------------------------------------------------------
def _public_functions(path: Path) -> dict:
    import ast

    tree = ast.parse(path.read_text())
    return {f.name: [a.arg for a in f.args.posonlyargs + f.args.args + f.args.kwonlyargs]
            for f in tree.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("_")}


def test_backend_modules_share_one_set_of_functions():
    """Keras 3's layout: one module per backend with the same function names and signatures, and
    KerasModelOps reaches the backend through exactly these."""
    pkg = Path(keras_adapter.__file__).parent
    mods = {name: _public_functions(pkg / f"_{name}.py") for name in ("torch", "jax", "generic")}
    assert mods["torch"] == mods["jax"] == mods["generic"], mods
    assert set(mods["torch"]) == {"pinned", "params", "outputs", "gradient", "hutchinson", "live_non_trainable",
                                  "measuring", "preflight"}
    used = set(re.findall(r"self\._impl\.(\w+)\(", (pkg / "__init__.py").read_text()))
    assert used == set(mods["torch"]), used
    for backend in keras_adapter.SUPPORTED_BACKENDS:
        assert keras_adapter._implementation(backend).__name__.endswith("._" + backend)
    assert keras_adapter._implementation("tensorflow").__name__.endswith("._generic")


def test_keras_demo_module_imports_no_framework():
    code = ("import sys, json, crestcore.apps.keras_demo\n"
            "print(json.dumps([m for m in ('keras', 'torch', 'jax') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_keras_demo_schedule_is_the_pytorch_demos():
    from crestcore.apps.keras_demo import _warmup_cosine
    from crestcore.apps.train_demo import lr_factor

    for total, warmup in ((50, 0.1), (7, 0.0), (3, 0.5)):
        sched = _warmup_cosine(keras, 0.05, total, warmup)
        got = [float(keras.ops.convert_to_numpy(sched(t))) for t in range(total + 2)]
        np.testing.assert_allclose(got, [0.05 * lr_factor(t, total, warmup) for t in range(total + 2)], rtol=1e-5,
                                   atol=1e-9)


def test_keras_demo_runs_the_comparison(tmp_path):
    from crestcore.apps.datasets import fashion_mnist_available
    from crestcore.apps.keras_demo import run_keras_comparison
    from crestcore.apps.train_demo import TrainSettings

    if not (fashion_mnist_available(split="train") and fashion_mnist_available(split="test")):
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    s = TrainSettings(epochs=1, budget=0.5, m=64, evals=1, crest_r=128, crest_T1=1, threads=1)
    res = run_keras_comparison(tmp_path, settings=s, backend="torch", progress=False, n_train=256, n_test=64,
                               print_fn=None, figures=False, methods=("random", "crest", "crest-drop"))
    assert [r["method"] for r in res["rows"]] == ["full", "random", "crest", "crest-drop"]
    assert [r["steps"] for r in res["rows"]] == [4, 2, 2, 2]
    assert res["runs"]["crest"]["stats"]["step"] == 2 and res["runs"]["crest"]["counts"]["selections"] >= 1
    assert (tmp_path / "results.json").is_file()


# ------------------------------------------------------------------------------------------------
# the jax backend (subprocess), and the whole suite in a subprocess when keras has another backend
# ------------------------------------------------------------------------------------------------
def test_jax_backend(jax_child):
    proc, out_npz, weights = jax_child
    try:
        stdout, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # pragma: no cover
        proc.kill()
        pytest.fail("the jax-backend subprocess did not finish in 300 s")
    assert proc.returncode == 0, stdout[-4000:]
    res = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("JSON"))[4:])
    assert res["position"] == res["total"] and res["same_batches"], res
    assert res["selections"] == res["selections_ref"] and len(res["selections"]) >= 2
    assert res["max_param_diff"] < 1e-5
    assert res["ahead_position"] == res["ahead_handed"] == res["ahead_counted"] == res["total"]
    assert res["ahead_in_order"]
    # Keras's private JAX-trainer state, read by KerasModelOps during fit
    assert res["jax_state_probed"] == [2], res["jax_state_probed"]
    assert not res["jax_state_broken"], (
        f"Keras {res['keras_version']} changed the JAX trainer's private state that "
        f"crestcore.adapters.keras._jax._weights reads: {res['jax_state_broken']}")
    assert res["no_training_arg"][0] == res["no_training_arg"][1] > 0, res["no_training_arg"]
    for case in ("dtype_bfloat16_float32", "dtype_float32_float64"):
        assert res[case][0] == res[case][1] > 0, (case, res[case])
    selections, rho, checks, moved = res["batchnorm_lr0"]
    assert selections == 1 and rho < 1e-5 and checks > 10 and moved > 0.1, res["batchnorm_lr0"]
    assert res["interrupted"] and res["interrupted_refit"] == "ok"
    assert res["after_interrupt"] == [2, [0.0]], res["after_interrupt"]  # measured the weights set since
    assert res["refrozen"] and "no trainable variable gets a gradient" in res["refrozen"], res["refrozen"]
    assert len(res["train_only_refused"]) == 2 and all(
        msg and "no trainable variable gets a gradient" in msg for msg in res["train_only_refused"]), res
    assert res["refused_and_kept"] == [[True, True]] * 10, res["refused_and_kept"]
    assert max(res["swapped_outputs"]) < 1e-5 and res["swapped_gradient"] < 1e-6, res  # review 84
    assert res["swapped_hutchinson"] < 1e-6, res
    # review 106: a loss that takes the batch mean itself is refused on jax too, and the check moves nothing
    assert res["batch_mean_loss"] == [[True, True], True, True], res["batch_mean_loss"]
    assert res["loss_check_kept"] == [[False, True], [True, True]], res["loss_check_kept"]
    msg, usable, keeps, restored, kept_step = res["weights_never_reach"]  # review 156, on jax
    assert msg and "its compiled loss got no sample weights" in msg and usable and keeps and restored, res
    assert kept_step, res
    for case, msg in res["jax_state_refusals"].items():
        assert msg is not None, f"an unrecognised JAX-trainer state ({case}) was read without an error"
        assert "model._jax_state" in msg and "KERAS_BACKEND=torch" in msg, (case, msg)
    # the model operations agree with the torch backend's on the same weights
    X, y = digits()
    model = mlp(0)
    model.set_weights([np.asarray(a) for a in np.load(weights).values()])
    ops = KerasModelOps(model, X, y)
    idx = np.arange(0, 96, 3)
    w = np.linspace(0.5, 1.5, idx.size)
    jx = np.load(out_npz)
    loss, g = ops.gradient(idx, w)
    np.testing.assert_allclose(jx["params"], ops.params().numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(jx["outputs"], ops.outputs(idx).numpy(), rtol=1e-5, atol=1e-5)
    assert abs(float(jx["loss"]) - loss) < 1e-5
    np.testing.assert_allclose(jx["grad"], g.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(jx["hutch"], ops.hutchinson(idx, w, 7).numpy(), rtol=1e-3, atol=1e-5)


def test_torch_backend_suite_in_subprocess():
    if IN_PROCESS:
        pytest.skip("keras runs on torch in this process: the tests above ran here")
    env = dict(os.environ, KERAS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE)],
                         env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def _keras_demo_data(n=160):
    y = np.arange(n) % 10
    x = (np.random.default_rng(0).normal(size=(n, 28, 28, 1)) + y[:, None, None, None] / 5).astype("float32")
    return x, y


def test_keras_demo_baselines_follow_the_pytorch_demos_schedule(monkeypatch):
    """Every baseline of the Keras demo is crestcore.baselines.SubsetSchedule: sgd-budget trains the full
    run's first batches, and a selection at an epoch's first step measures the model after every earlier
    step (Keras fetches each batch when its step runs)."""
    from crestcore.apps import keras_demo
    from crestcore.apps.train_demo import TrainSettings
    from crestcore.baselines import SubsetSchedule

    x, y = _keras_demo_data()
    seen: dict = {}
    real = SubsetSchedule.next_indices

    def spy(self, position, ops=None, sync=None):
        idx, w = real(self, position, ops, sync)
        applied = None if ops is None else int(keras.ops.convert_to_numpy(ops.model.optimizer.iterations))
        seen.setdefault(self.method, []).append((position, applied, idx.tolist(), w.tolist()))
        return idx, w

    monkeypatch.setattr(SubsetSchedule, "next_indices", spy)
    recs = {}
    for method in ("full", "sgd-budget", "craig", "prune"):
        s = TrainSettings(epochs=3, budget=0.25, m=16, evals=1, threads=1)
        recs[method] = keras_demo.train_keras_method(method, (x, y, x[:20], y[:20]), s, progress=False)
    assert recs["full"]["steps"] == 30 and recs["sgd-budget"]["steps"] == 9
    assert [b for _, _, b, _ in seen["sgd-budget"]] == [b for _, _, b, _ in seen["full"][:9]]
    assert sorted(sum((b for _, _, b, _ in seen["full"][:10]), [])) == list(range(160))  # one pass
    assert [p for p, _, _, _ in seen["craig"]] == list(range(9))
    assert all(applied == p for p, applied, _, _ in seen["craig"])  # fetched when its step runs
    assert recs["craig"]["counts"]["selections"] == 2  # epochs 0 and 2 (reselect every ceil(3 / 2) = 2)
    st = recs["prune"]["stats"]
    assert st["counters"]["forward_examples"] == 9 * 16  # one measured batch of losses per step
    assert [r["pruned"] > 0 for r in st["selections"]] == [False, True, True]


def test_keras_demo_baselines_run_on_jax():
    """On jax the measured baselines read the step's weights that the Keras trainer holds apart (pinned)."""
    pytest.importorskip("jax")
    code = (
        "import numpy as np\n"
        "from crestcore.apps import keras_demo\n"
        "from crestcore.apps.train_demo import TrainSettings\n"
        "y = np.arange(160) % 10\n"
        "x = (np.random.default_rng(0).normal(size=(160, 28, 28, 1)) + y[:, None, None, None] / 5).astype('float32')\n"
        "for m in ('craig', 'prune'):\n"
        "    r = keras_demo.train_keras_method(m, (x, y, x[:20], y[:20]), TrainSettings(epochs=3, budget=0.25, m=16,\n"
        "                                      evals=1, threads=1), backend='jax', progress=False)\n"
        "    print(m, r['steps'], r['counts']['selections'], r['stats']['counters']['forward_examples'])\n"
    )
    env = dict(os.environ, KERAS_BACKEND="jax")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(ROOT), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["craig 9 2 320", "prune 9 3 144"]


def _subset_fit(method, epochs, resume_at=None, **kw):
    """Train a small classifier with SubsetCallback; with ``resume_at`` (an epoch), save there, rebuild
    model and callback, restore and finish. Returns the trained (indices) per step and the final weights."""
    keras.utils.set_random_seed(5)  # the same initial weights for both runs
    model, x, y = _example_problem()
    args = dict(method=method, budget=0.5, epochs=epochs, m=8, seed=1, **kw)
    sub = SubsetCallback(x, y, **args)
    trained = []

    class Log(keras.callbacks.Callback):
        def __init__(self, cb):
            super().__init__()
            self.cb = cb

        def on_train_batch_end(self, batch, logs=None):
            trained.append(self.cb.last_indices.tolist())

    stop = epochs if resume_at is None else resume_at
    model.fit(sub.dataset, epochs=stop, callbacks=[sub, Log(sub)], verbose=0)
    if resume_at is not None:
        import pickle
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            model.save(f"{d}/m.keras")
            blob = pickle.dumps(sub.state_dict())
            model = keras.saving.load_model(f"{d}/m.keras")
        sub = SubsetCallback(x, y, **args)
        sub.load_state_dict(pickle.loads(blob))
        model.fit(sub.dataset, epochs=epochs, initial_epoch=resume_at, callbacks=[sub, Log(sub)], verbose=0)
    return trained, flat(model), sub


@pytest.mark.parametrize("method", ["craig", "glister", "prune", "sgd-budget"])
def test_subset_callback_resumes_with_the_same_batches(method):
    a, wa, sa = _subset_fit(method, 3)
    b, wb, sb = _subset_fit(method, 3, resume_at=1)
    assert a == b and sa.position == sb.position == 3 * sa.steps_per_epoch
    np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    assert sa.stats["counters"] == sb.stats["counters"]
    if method in ("craig", "glister"):
        assert sa.stats["counters"]["forward_examples"] > 0


@pytest.mark.parametrize("method", ["random", "craig"])
def test_subset_callback_reports_its_budget_as_the_torch_loader_does(method):
    """stats["budget"] comes from the one framework-free report (crestcore.plan.budget_report) that
    SubsetLoader and CrestCallback use: the steps trained against the full-data run's, and every pass."""
    from crestcore.plan import budget_report

    _, _, sub = _subset_fit(method, 2)
    rep = sub.stats["budget"]
    full = 2 * sub.full_steps_per_epoch
    assert rep == budget_report(budget=0.5, counts="steps", m=8, full_data_steps=full,
                                planned_steps=2 * sub.steps_per_epoch, steps_done=sub.position,
                                counters=sub.stats["counters"], epochs_done=2)
    assert rep["fraction_steps"] == sub.position / full == 2 * sub.steps_per_epoch / full
    c = sub.stats["counters"]
    measured = (c["forward_examples"] + 2 * c["backward_examples"]) / 3
    assert rep["fraction_all_passes"] == pytest.approx((c["train_examples"] + measured) / 8 / full)
    assert (rep["overhead_step_equivalents"] > 0) == (method == "craig")


def test_subset_callback_serves_only_inside_a_fit_with_it():
    model, x, y = _example_problem()
    sub = SubsetCallback(x, y, method="random", budget=0.5, m=8)
    with pytest.raises(RuntimeError, match="callbacks=\\[sub\\]"):
        model.fit(sub.dataset, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="method"):
        SubsetCallback(x, y, method="coreset", budget=0.5, m=8)
    assert SubsetCallback(x, y, method="craig", budget=0.5, m=8, solve_on="host").schedule.solve_on == "host"
    with pytest.raises(ValueError, match="solve_on"):
        SubsetCallback(x, y, method="craig", budget=0.5, m=8, solve_on="gpu")


@pytest.mark.parametrize("which", ["crest", "subset"])
def test_the_datasets_worker_settings_are_fixed(which):
    """A worker pool fetches batches before the steps before them have trained: setting workers or
    multiprocessing on the callback's dataset is refused at once (before, SubsetCallback's baseline
    batches then went out of order and its losses reached the wrong examples, or a fit failed with a
    message telling the user to add the callback they had added)."""
    model, x, y = _example_problem()
    cb = (CrestCallback(x, y, config=CrestConfig(m=8), budget=0.25) if which == "crest"
          else SubsetCallback(x, y, method="prune", budget=0.5, m=8))
    with pytest.raises(ValueError, match="workers=1"):
        cb.dataset.workers = 3
    with pytest.raises(ValueError, match="multiprocessing"):
        cb.dataset.use_multiprocessing = True
    cb.dataset.workers, cb.dataset.use_multiprocessing = 1, False  # the fixed settings themselves are fine
    assert (cb.dataset.workers, cb.dataset.use_multiprocessing) == (1, False)


def test_unfreezing_between_fits_starts_a_new_anchor():
    """Layers frozen for a first fit, unfrozen for the next (the callback kept): the controller starts a
    new anchor over the new trainable weights instead of refusing its own state as a foreign model's."""
    X, y = digits()
    model = mlp(0)
    model.layers[0].trainable = False
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    crest = fit(model, X, y, epochs=1)
    head = 16 * 10 + 10
    assert int(crest.controller_state.anchor.shape[0]) == head
    model.layers[0].trainable = True
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
    assert int(crest.controller_state.anchor.shape[0]) == 64 * 16 + 16 + head


# ------------------------------------------------------------------------------------------------
# what a probe found (2026-12-01): each case as a user meets it
# ------------------------------------------------------------------------------------------------
def _small(n=240, seed=0):
    g = np.random.default_rng(seed)
    y = np.arange(n) % 3
    return (g.normal(size=(n, 8)) + y[:, None]).astype("float32"), y


def _dense3(loss=None, units=3, activation=None):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(units, activation=activation)])
    model.compile(optimizer="sgd", loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("which", ["crest", "subset"])
def test_class_weight_is_refused_by_name(which):
    """Keras's own error named an argument the user did not pass ("class_weight and sample_weight at the
    same time"; review 66): the refusal names class_weight and why."""
    x, y = _small()
    cb = (CrestCallback(x, y, config=CrestConfig(m=16), budget=0.25, seed=0) if which == "crest"
          else SubsetCallback(x, y, method="random", m=16, budget=0.25, epochs=1, seed=0))
    with pytest.raises(ValueError, match=r"fit\(class_weight=...\) cannot be used with"):
        _dense3().fit(cb.dataset, epochs=1, callbacks=[cb], class_weight={0: 1.0, 1: 2.0, 2: 1.0}, verbose=0)
    assert cb.position == 0


def test_batches_looked_at_before_fit_do_not_count_as_a_fit_without_the_callback():
    x, y = _small()
    crest = CrestCallback(x, y, config=CrestConfig(m=16), budget=0.25, seed=0)
    for _ in range(3):  # a notebook cell run a few times
        assert crest.dataset[0][0].shape == (16, 8)
    _dense3().fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
    assert crest.position == crest.steps_per_epoch
    # a fit without the callback is still refused
    with pytest.raises(RuntimeError):
        _dense3().fit(crest.dataset, epochs=1, verbose=0)


@pytest.mark.parametrize("loss", [keras.losses.CategoricalFocalCrossentropy(from_logits=True),
                                  keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)])
def test_a_loss_crest_does_not_measure_is_warned_about(loss):
    x, y = _small()
    yy = np.eye(3, dtype="float32")[y]
    crest = CrestCallback(x, yy, config=CrestConfig(m=16), budget=0.25, seed=0)
    with pytest.warns(UserWarning, match="measure a different loss"):
        _dense3(loss).fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)


def test_one_output_column_is_refused_with_the_fix():
    x, y = _small()
    y2 = (y > 0).astype("float32")
    crest = CrestCallback(x, y2, config=CrestConfig(m=16), budget=0.25, seed=0, outputs="probabilities")
    model = _dense3(keras.losses.BinaryCrossentropy(), units=1, activation="sigmoid")
    with pytest.raises(ValueError, match="one column per class"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)


def test_several_outputs_targets_are_refused_naming_y():
    x, y = _small()
    for targets in ({"a": y, "b": y}, [y, y]):
        with pytest.raises(ValueError, match="y must be one array of targets"):
            CrestCallback(x, targets, config=CrestConfig(m=16), budget=0.25)
    # a list of one-hot rows is one array of targets
    rows = list(np.eye(3, dtype="float32")[y])
    assert CrestCallback(x, rows, config=CrestConfig(m=16), budget=0.25).n == y.size


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_measure_batch_size_is_checked_at_construction(bad):
    x, y = _small()
    with pytest.raises((ValueError, TypeError), match="measure_batch_size"):
        CrestCallback(x, y, config=CrestConfig(m=16), budget=0.25, measure_batch_size=bad)


def test_numpy_scalar_budgets_are_accepted():
    x, y = _small()
    for b in (np.float32(0.25), np.float64(0.25)):
        assert CrestCallback(x, y, config=CrestConfig(m=16), budget=b).steps_per_epoch == \
            CrestCallback(x, y, config=CrestConfig(m=16), budget=0.25).steps_per_epoch
    with pytest.raises(ValueError, match="budget"):
        CrestCallback(x, y, config=CrestConfig(m=16), budget=np.bool_(True))


def test_unusual_models_and_losses_get_served_or_named_clearly():
    """From a review with models the tests had not seen: a bfloat16 model trains with CREST (its probes in
    float32; ml_dtypes' bfloat16 probe had failed to convert to a torch tensor); a one-unit sigmoid
    classifier is refused for its single output column by the callback in use (the message had asked
    for outputs=, which could not help, and named CrestCallback from SubsetCallback); a loss that
    ignores a class warns that CREST measures that class."""
    X, y = digits(160)
    keras.config.set_dtype_policy("bfloat16")
    try:
        model = mlp(0)
        crest = CrestCallback(X, y, config=CrestConfig(m=32), budget=0.2, seed=0)
        model.fit(crest.dataset, epochs=2, callbacks=[crest], verbose=0)
        assert crest.position == 2 * crest.steps_per_epoch
    finally:
        keras.config.set_dtype_policy("float32")
    binary = keras.Sequential([keras.Input((64,)), keras.layers.Dense(1, activation="sigmoid")])
    binary.compile(optimizer="sgd", loss="binary_crossentropy")
    yb = (y % 2).astype(np.int64)
    for cb in (CrestCallback(X, yb, config=CrestConfig(m=32), budget=0.2),
               SubsetCallback(X, yb, method="craig", m=32, budget=0.2)):
        with pytest.raises(ValueError, match="1 output column.*Dense\\(2\\)"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            binary.fit(cb.dataset, epochs=1, callbacks=[cb], verbose=0)
    ignoring = mlp(0, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0))
    crest = CrestCallback(X, y, config=CrestConfig(m=32), budget=0.2, seed=0)
    with pytest.warns(UserWarning, match="ignores class 0"):
        ignoring.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)


def test_probability_outputs_measure_keras_clipped_cross_entropy():
    """A softmax model compiled with a probability loss: Keras clips the probabilities to [epsilon,
    1 - epsilon] before the log, so CREST's losses (and features) do the same; a confidently wrong example
    measured -log(1e-30) = 69 against the 16.1 Keras trains on."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6)).astype("float32")
    y = rng.integers(0, 3, 300)
    inp = keras.Input((6,))
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(inp))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.layers[-1].kernel.assign(rng.normal(size=(6, 3)).astype("float32") * 12)  # saturated
    ops = KerasModelOps(model, x, y, outputs="probabilities")
    ours = np.asarray(ops.losses(np.arange(300)), dtype=np.float64)
    theirs = keras.ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(y, model(x, training=False)))
    assert ours.max() > 15  # saturated examples are there
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_probability_outputs_of_many_classes_measure_the_loss_keras_trains():
    """Review 116: the controller took the cross-entropy of log(clip(p)), log(sum clip(p)) - log clip(p_y):
    for confident 1,000-class examples 9.99e-5 against the 1.19e-7 Keras trains on ((C - 1) eps more),
    while the gradient and the probes differentiate -log clip(p_y). The losses CREST measures (ops.losses,
    and the anchor and check losses through example_losses) are Keras's now."""
    C, n = 1000, 8
    x = np.eye(n, 4, dtype="float32")
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(C, activation="softmax")(inp))
    kernel = np.zeros((4, C), "float32")
    kernel[np.arange(4), np.arange(4)] = 25.0  # example i (< 4) confident in class i
    model.layers[-1].kernel.assign(kernel)
    y = np.arange(n) % 4
    ops = KerasModelOps(model, x, y, outputs="probabilities")
    theirs = keras.ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(y, model(x, training=False)))
    ours = np.asarray(ops.losses(np.arange(n)))
    assert theirs[:4].max() < 1e-6  # confident: (C - 1) eps = 1e-4 would dwarf these
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-9)
    logits = np.asarray(keras.ops.convert_to_numpy(ops.outputs(np.arange(n))))
    np.testing.assert_allclose(ops.example_losses(logits, y), theirs, rtol=1e-5, atol=1e-9)
    loss, _ = ops.gradient(np.arange(n), np.ones(n))  # the gradient pass's loss is the same function
    np.testing.assert_allclose(float(loss), theirs.mean(), rtol=1e-5, atol=1e-9)


def test_batchnorm_statistics_moved_by_training_are_not_the_quadratic_models_error():
    """Learning rate 0: only BatchNormalization's moving statistics change. Measured with the anchor's
    statistics, every check sees the anchor loss again and nothing is reselected (with the live ones the
    statistics' drift counted as the quadratic model's error). The jax backend runs the same in
    test_jax_backend."""
    selections, rho, checks, moved = batchnorm_lr0_run()
    assert moved > 0.1  # the statistics did move
    assert checks > 10 and selections == 1 and rho < 1e-5, (selections, rho, checks)


def test_the_anchor_statistics_survive_a_checkpoint():
    X, y = digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16), keras.layers.BatchNormalization(),
                              keras.layers.Dense(10)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    crest = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=0)
    model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
    saved = pickle.loads(pickle.dumps(crest.state_dict()))
    assert saved["anchor_stats"] and all(isinstance(v, np.ndarray) for v in saved["anchor_stats"].values())
    again = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=0)
    again.load_state_dict(saved)
    resaved = again.state_dict()  # saved again before any fit made the ops: the statistics are kept
    assert {k: v.tolist() for k, v in resaved["anchor_stats"].items()} == \
        {k: v.tolist() for k, v in saved["anchor_stats"].items()}
    again.set_model(model)
    again.on_train_begin()  # the ops made at fit's start take the checkpoint's statistics
    assert set(again.ops._anchor) == {int(k) for k in saved["anchor_stats"]}
    for k, v in saved["anchor_stats"].items():
        np.testing.assert_array_equal(again.ops._anchor[int(k)], v)
    again.on_train_end()


def test_a_subclassed_models_last_layer_is_not_guessed_from_its_layer_list():
    """model.layers of a subclassed model is in assignment order: a softmax head created before a hidden
    layer read as 'no softmax', and the warning told a correct probability model to compile with
    from_logits=True (review). Now no guess: the loss decides, and without a Keras cross-entropy the
    callback asks for outputs=."""
    from crestcore.adapters.keras import resolve_outputs

    class HeadFirst(keras.Model):
        def __init__(self):
            super().__init__()
            self.head = keras.layers.Dense(3, activation="softmax")
            self.hidden = keras.layers.Dense(8)

        def call(self, x):
            return self.head(self.hidden(x))

    model = HeadFirst()
    model(np.zeros((2, 4), np.float32))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_outputs(model, None) == "probabilities"
    model.compile(optimizer="sgd", loss=lambda y, p: keras.ops.mean(p))
    with pytest.raises(ValueError, match="subclassed model's last layer cannot be read"):
        resolve_outputs(model, None)
    seq = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    seq.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.warns(UserWarning, match="last layer is no softmax"):  # a Sequential's order is known
        resolve_outputs(seq, None)


def test_a_model_whose_one_output_is_in_a_dict_is_told_how_to_build_it():
    inp = keras.Input((4,))
    model = keras.Model(inp, {"main": keras.layers.Dense(3)(inp)})
    model.compile(optimizer="sgd", loss={"main": keras.losses.SparseCategoricalCrossentropy(from_logits=True)})
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(64, 4)).astype("float32"), np.arange(64) % 3
    crest = CrestCallback(X, y, config=CrestConfig(m=8), budget=0.5, seed=0)
    with pytest.raises(ValueError, match=r"got a dict with 1 entry \('main'\).*keras.Model\(inputs, logits\)"):
        model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)


def test_a_list_of_rows_as_x_is_told_to_stack_them():
    x, y = np.zeros((20, 3), np.float32), np.arange(20) % 2
    with pytest.raises(ValueError, match=r"x is a list of 20 arrays, read as 20 model inputs.*np.stack\(x\)"):
        CrestCallback([r for r in x], y)


def test_unfreezing_when_the_next_step_is_an_age_reselection():
    """The defaults, three epochs frozen: the next fit's first step is a reselection (max_age="epoch"), not
    a trust check, and it fitted the old quadratic model with a gradient of the new size."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = (X[:1500] / 16.0).astype("float32"), y[:1500]
    model = mlp(0)
    model.layers[0].trainable = False
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss)
    crest = CrestCallback(X, y, config=CrestConfig(m=32), budget=0.1, seed=0)
    model.fit(crest.dataset, epochs=3, callbacks=[crest], verbose=0)
    step = crest.stats["step"]
    model.layers[0].trainable = True
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss)
    model.fit(crest.dataset, epochs=4, initial_epoch=3, callbacks=[crest], verbose=0)
    assert step in crest.stats["selections"] and not any(c["step"] == step for c in crest.stats["checks"])
    assert int(crest.controller_state.anchor.shape[0]) == sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_anchor_statistics_follow_their_variables_when_a_layer_is_unfrozen():
    """The anchor's BatchNorm statistics were kept by position in non_trainable_variables: unfreezing the
    layer before BatchNorm moved the positions, and a measurement ran BatchNorm with that layer's bias (a
    vector of the same shape) as its moving variance."""
    from crestcore.adapters.keras import KerasModelOps, _assigned_anchor

    x, y = _small()
    base = keras.layers.Dense(8, bias_initializer=keras.initializers.Constant(-5.0))
    bn = keras.layers.BatchNormalization()
    model = keras.Sequential([keras.Input((8,)), base, bn, keras.layers.Dense(3)])
    base.trainable = False
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ops = KerasModelOps(model, x, y)
    ops.new_anchor()  # kept: BatchNorm's mean and variance (1.0), not the frozen kernel and bias
    base.trainable = True
    assert [v.path for v in model.non_trainable_variables] == [bn.moving_mean.path, bn.moving_variance.path]
    with _assigned_anchor(ops):
        variance = np.array(keras.ops.convert_to_numpy(bn.moving_variance))
    np.testing.assert_array_equal(variance, np.ones(8))  # not the bias, -5
    assert np.isfinite(ops.losses(np.arange(16))).all()
    # an anchor restored from a checkpoint (no paths) is matched by position, as saved
    ops._anchor_vars = None
    from crestcore.adapters.keras import _anchor_items

    assert [i for i, _ in _anchor_items(ops)] == []  # positions 2, 3 are gone: nothing put anywhere
    base.trainable = False  # the model as the checkpoint saw it
    assert [i for i, _ in _anchor_items(ops)] == [2, 3]


def test_only_moving_statistics_are_the_anchors_other_non_trainable_values_are_measured_live():
    """The anchor keeps BatchNormalization's moving statistics (the training steps move them by themselves),
    not every non-trainable value: a temperature the loop anneals (or a frozen layer the user rewrites) is
    the model trained now, and a measurement with the anchor's value measured another model, silently."""
    from crestcore.adapters.keras import KerasModelOps

    class Tempered(keras.layers.Layer):
        def build(self, shape):
            self.temperature = self.add_weight(shape=(), initializer="ones", trainable=False, name="temperature")

        def call(self, z):
            return z / self.temperature

    x, y = _small()
    x = x * 3.0 + 2.0  # far from BatchNorm's initial statistics
    bn = keras.layers.BatchNormalization()
    temp = Tempered()
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8), bn, keras.layers.Dense(3), temp])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ops = KerasModelOps(model, x, y)
    ops.new_anchor()
    anchor = [np.array(keras.ops.convert_to_numpy(v)) for v in (bn.moving_mean, bn.moving_variance)]
    model(x[:64], training=True)  # a training forward moves the moving statistics
    moved = np.array(keras.ops.convert_to_numpy(bn.moving_mean))
    assert not np.allclose(moved, anchor[0])
    temp.temperature.assign(4.0)
    ref = keras.models.clone_model(model)
    ref.set_weights(model.get_weights())
    ref.layers[1].moving_mean.assign(anchor[0])
    ref.layers[1].moving_variance.assign(anchor[1])
    expected = np.array(keras.ops.convert_to_numpy(ref(x[:40], training=False)))
    got = np.array(keras.ops.convert_to_numpy(ops.outputs(np.arange(40))))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert float(keras.ops.convert_to_numpy(temp.temperature)) == 4.0  # restored after the measurement
    np.testing.assert_array_equal(np.array(keras.ops.convert_to_numpy(bn.moving_mean)), moved)


def test_data_that_is_not_in_memory_is_refused_by_name():
    x, y = _small()

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]

    for data in ((b for b in [x]), Batches()):
        with pytest.raises(TypeError, match="in-memory arrays"):
            CrestCallback(data, y, config=CrestConfig(m=16), budget=0.25)


@pytest.mark.parametrize("loss", [keras.losses.CategoricalFocalCrossentropy(from_logits=True),
                                  keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)])
def test_a_baseline_that_measures_warns_about_a_loss_it_does_not_measure(loss):
    x, y = _small()
    yy = np.eye(3, dtype="float32")[y]
    sub = SubsetCallback(x, yy, method="craig", budget=0.25, m=16, seed=0)
    with pytest.warns(UserWarning, match="craig selection's measurements .* measure a different loss"):
        _dense3(loss).fit(sub.dataset, epochs=1, callbacks=[sub], verbose=0)
    with warnings.catch_warnings():  # a baseline that measures nothing has nothing to warn about
        warnings.simplefilter("error", UserWarning)
        sub = SubsetCallback(x, yy, method="random", budget=0.25, m=16, seed=0)
        _dense3(loss).fit(sub.dataset, epochs=1, callbacks=[sub], verbose=0)


def test_a_mean_over_the_sample_weights_is_exact_for_unweighted_baselines_only():
    x, y = _small()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")
    sub = SubsetCallback(x, y, method="random", budget=0.25, m=16, seed=0)
    _dense3(loss).fit(sub.dataset, epochs=1, callbacks=[sub], verbose=0)  # every weight is 1: the plain mean
    assert sub.position == sub.steps_per_epoch
    sub = SubsetCallback(x, y, method="craig", budget=0.25, m=16, seed=0)
    with pytest.raises(ValueError, match="the craig baseline's weighted loss"):
        _dense3(loss).fit(sub.dataset, epochs=1, callbacks=[sub], verbose=0)


def test_a_fit_longer_than_the_baselines_schedule_is_warned_about():
    x, y = _small()
    sub = SubsetCallback(x, y, method="random", budget=0.25, m=16, seed=0)  # epochs=1
    with pytest.warns(UserWarning, match="SubsetCallback\\(epochs=1\\) but fit\\(epochs=2\\)") as rec:
        _dense3().fit(sub.dataset, epochs=2, callbacks=[sub], verbose=0)
    assert [w.filename for w in rec if "but fit" in str(w.message)] == [__file__]  # the fit's line, not Keras's


def test_a_callback_reused_on_a_new_model_says_it_continues_its_run():
    x, y = _small()
    crest = CrestCallback(x, y, config=CrestConfig(m=16), budget=0.25, seed=0)
    model = _dense3()
    model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
    with warnings.catch_warnings():  # the same model again: a continued fit, nothing to say
        warnings.simplefilter("error", UserWarning)
        model.fit(crest.dataset, epochs=2, initial_epoch=1, callbacks=[crest], verbose=0)
    with pytest.warns(UserWarning, match="trained 8 steps of its run on another model object"):
        _dense3().fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)  # a notebook's rebuilt model
    state = crest.state_dict()
    with warnings.catch_warnings():  # a saved run loaded for the new model: expected, nothing to say
        warnings.simplefilter("error", UserWarning)
        crest.load_state_dict(state)
        _dense3().fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)


def test_a_fit_past_the_planned_epochs_is_warned_about_once():
    """Review 97: CrestCallback(epochs=2) with fit(epochs=4), or a loaded run refit without initial_epoch, went
    on past the plan silently (the budget report widened it), though a message promised a warning."""
    x, y = _small()
    crest = CrestCallback(x, y, config=CrestConfig(m=16), budget=0.25, seed=0, epochs=2)
    with pytest.warns(UserWarning, match=r"past the run's plan: CrestCallback planned 2 epochs \(8 steps\)") as got:
        _dense3().fit(crest.dataset, epochs=4, callbacks=[crest], verbose=0)
    assert sum("past the run's plan" in str(w.message) for w in got) == 1 and crest.position == 16
    within = CrestCallback(x, y, config=CrestConfig(m=16), budget=0.25, seed=0, epochs=4)
    with warnings.catch_warnings():  # two fits of the planned epochs, or a plan taken from the first fit
        warnings.simplefilter("error", UserWarning)
        model = _dense3()
        model.fit(within.dataset, epochs=2, callbacks=[within], verbose=0)
        model.fit(within.dataset, epochs=4, initial_epoch=2, callbacks=[within], verbose=0)


def test_the_step_is_accounted_at_a_save_only_under_its_own_fits_batch_end():
    """Review 100: a save from another fit nested in a hook of this one, or from a batch-begin hook calling a
    batch-end method, accounted the step before Keras had trained it (the state one step ahead)."""
    x, y = _small()
    crest = CrestCallback(x, y, config=CrestConfig(m=16), budget=0.25, seed=0, epochs=1)
    saved = []

    class Saver(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            saved.append(crest.state_dict()["position"])

    class Nested(keras.callbacks.Callback):  # trains another model at each step's beginning, saving there
        def on_train_batch_begin(self, batch, logs=None):
            aux = _dense3()
            aux.fit(x[:8], y[:8], epochs=1, verbose=0, callbacks=[Saver()])

    class Delegating(keras.callbacks.Callback):  # a batch-begin hook that calls its own batch-end method
        def on_train_batch_begin(self, batch, logs=None):
            self.on_train_batch_end(batch)

        def on_train_batch_end(self, batch, logs=None):
            saved.append(crest.state_dict()["position"])

    _dense3().fit(crest.dataset, epochs=1, callbacks=[crest, Nested()], verbose=0)
    assert saved == [0, 1, 2, 3] and crest.position == 4  # before each step: the steps trained so far
    saved.clear()
    crest = CrestCallback(x, y, config=CrestConfig(m=16), budget=0.25, seed=0, epochs=1)
    _dense3().fit(crest.dataset, epochs=1, callbacks=[crest, Delegating()], verbose=0)
    assert saved == [0, 1, 1, 2, 2, 3, 3, 4] and crest.position == 4


def test_a_plan_taken_from_the_first_fit_grows_quietly_after_a_save_and_load():
    """Review 100: a loaded state's plan counted as given, so a run whose plan came from its first fit warned
    past that plan after a save and load, where the same run without them was quiet."""
    x, y = _small()
    crest = CrestCallback(x, y, config=CrestConfig(m=16), budget=0.25, seed=0)
    model = _dense3()
    model.fit(crest.dataset, epochs=2, callbacks=[crest], verbose=0)
    again = CrestCallback(x, y, config=CrestConfig(m=16), budget=0.25, seed=0)
    again.load_state_dict(crest.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.fit(again.dataset, epochs=4, initial_epoch=2, callbacks=[again], verbose=0)
    given = CrestCallback(x, y, config=CrestConfig(m=16), budget=0.25, seed=0, epochs=2)
    _dense3().fit(given.dataset, epochs=2, callbacks=[given], verbose=0)
    loaded = CrestCallback(x, y, config=CrestConfig(m=16), budget=0.25, seed=0)
    loaded.load_state_dict(given.state_dict())
    with pytest.warns(UserWarning, match="past the run's plan"):
        _dense3().fit(loaded.dataset, epochs=4, initial_epoch=2, callbacks=[loaded], verbose=0)


def test_array_likes_with_a_shape_are_read_and_streams_of_batches_are_refused():
    import torch

    from crestcore.adapters.keras import _as_inputs

    x, y = _small()

    class Dataset:  # h5py.Dataset's name and its array face: a shape, indexing, np.asarray reads it
        shape, dtype = x.shape, x.dtype

        def __array__(self, dtype=None, copy=None):
            return x

        def __getitem__(self, i):
            return x[i]

        def __len__(self):
            return len(x)

    assert _as_inputs(Dataset())[1] == len(x)
    assert _as_inputs(x.tolist())[1] == len(x)  # nested lists: read by NumPy as before

    class Slices:  # tf.data-like: iterable batches, no shape
        def __iter__(self):
            return iter([x[:8]])

    class Rows:  # a Hugging Face datasets.Dataset: a shape, but rows of dicts
        shape = (len(x), 1)

        def __array__(self, dtype=None, copy=None):
            out = np.empty(len(x), dtype=object)
            out[:] = [{"x": r} for r in x]
            return out

    class Sparse:  # a scipy sparse matrix: a shape, but np.asarray gives a 0-d object array
        shape = x.shape

        def __array__(self, dtype=None, copy=None):
            out = np.empty((), dtype=object)
            out[()] = "a sparse matrix"
            return out

    tensors = torch.utils.data.TensorDataset(torch.from_numpy(x))
    for data in (Slices(), tensors, iter([x]), Rows(), Sparse(), {"a": tensors}):
        with pytest.raises(TypeError, match="in-memory arrays"):
            _as_inputs(data)


def test_anchor_statistics_follow_their_variables_even_when_paths_repeat():
    """Two BatchNorm layers given one name in a subclassed model: their variables share paths, so a match
    by path could not tell them apart; the anchor holds the variables themselves."""
    from crestcore.adapters.keras import KerasModelOps, _assigned_anchor

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.base = keras.layers.Dense(8, bias_initializer=keras.initializers.Constant(-5.0))
            self.bn1 = keras.layers.BatchNormalization(name="bn")
            self.bn2 = keras.layers.BatchNormalization(name="bn")
            self.head = keras.layers.Dense(3)

        def call(self, x, training=False):
            return self.head(self.bn2(self.bn1(self.base(x), training=training), training=training))

    x, y = _small()
    model = Net()
    model(x[:2])
    model.base.trainable = False
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert len({v.path for v in model.non_trainable_variables}) < len(model.non_trainable_variables)  # repeats
    ops = KerasModelOps(model, x, y)
    ops.new_anchor()
    model.base.trainable = True
    with _assigned_anchor(ops):
        variance = np.array(keras.ops.convert_to_numpy(model.bn1.moving_variance))
    np.testing.assert_array_equal(variance, np.ones(8))  # not the base's bias, -5
    assert np.isfinite(ops.losses(np.arange(16))).all()


def test_swapping_which_layer_trains_between_fits_reselects_at_the_first_step():
    """Two same-size layers, one trained per fit: no change of size for the controller to see; the callback
    tells it that the set changed, so the next fit starts with a selection over the new set."""
    x, y = _small()
    inp = keras.Input((8,))
    a, b = keras.layers.Dense(8, name="a"), keras.layers.Dense(8, name="b")
    out = keras.layers.Dense(3, name="head")(keras.layers.Add()([a(inp), b(inp)]))
    model = keras.Model(inp, out)
    b.trainable = False
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer="sgd", loss=loss)
    # checks that always pass and no age limit: nothing but the change itself starts a selection
    crest = CrestCallback(x, y, config=CrestConfig(m=16, tau=1e9, max_age=None), budget=0.25, seed=0)
    model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
    step = crest.stats["step"]
    a.trainable, b.trainable = False, True
    model.compile(optimizer="sgd", loss=loss)
    model.fit(crest.dataset, epochs=2, initial_epoch=1, callbacks=[crest], verbose=0)
    assert step in crest.stats["selections"]
    # the docs' order for a checkpoint: load it, then change which layers train (the same model object)
    saved, step = crest.state_dict(), crest.stats["step"]
    crest.load_state_dict(saved)
    a.trainable, b.trainable = True, False
    model.compile(optimizer="sgd", loss=loss)
    model.fit(crest.dataset, epochs=3, initial_epoch=2, callbacks=[crest], verbose=0)
    assert step in crest.stats["selections"]


def _named_pair(trained):
    """Two same-size layers ``a`` and ``b`` (explicit names, so a rebuilt model has the same variable paths, as
    in a new process), ``trained`` the one whose weights train."""
    inp = keras.Input((8,))
    a, b = keras.layers.Dense(8, name="a"), keras.layers.Dense(8, name="b")
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(keras.layers.Add()([a(inp), b(inp)])), name="pair")
    (b if trained == "a" else a).trainable = False
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("resumed_with", ["a", "b"])
def test_a_loaded_run_over_another_set_of_the_same_size_reselects(resumed_with):
    """The Keras side of the torch loaders' named sets: a run saved after it swapped which layer trains
    (``b``, the anchor over it) and resumed on a model rebuilt as the script starts (``a`` trains) measured
    its trust checks with the quadratic model of ``b``'s weights against ``a``'s, silently. The state names
    the variables the anchor is over: another set is a change (a selection at the first step), the same set
    is not."""
    x, y = _small()
    config = CrestConfig(m=16, tau=1e9, max_age=None)  # nothing but a change of set starts a selection
    model = _named_pair("a")
    crest = CrestCallback(x, y, config=config, budget=0.25, seed=0)
    model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
    model.get_layer("a").trainable, model.get_layer("b").trainable = False, True
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(crest.dataset, epochs=2, initial_epoch=1, callbacks=[crest], verbose=0)
    saved, step = crest.state_dict(), crest.stats["step"]
    assert saved["trainable"] == ["b/kernel", "b/bias", "head/kernel", "head/bias"]
    rebuilt = _named_pair(resumed_with)
    rebuilt.set_weights(model.get_weights())
    resumed = CrestCallback(x, y, config=config, budget=0.25, seed=0)
    resumed.load_state_dict(saved)
    rebuilt.fit(resumed.dataset, epochs=3, initial_epoch=2, callbacks=[resumed], verbose=0)
    assert (step in resumed.stats["selections"]) == (resumed_with == "a")
    resumed.load_state_dict(dict(saved, trainable=["other/kernel"]))  # names this model lacks: its own set
    with pytest.raises(ValueError, match="trainable must be a list of variable paths"):
        resumed.load_state_dict(dict(saved, trainable="b/kernel"))


def test_no_trainable_variable_reached_with_training_false_is_refused():
    """Third verification: a model whose only trainable weights act with ``training=True`` gave an all-zero
    gradient silently on the torch backend (the shared ``add_grad`` now returns "unused" for a loss that
    needs no gradient, which the Keras measurements ignored); it is refused, as torch refused it before."""
    inp = keras.Input((4,))
    model = keras.Model(inp, TrainOnly()(keras.layers.Dense(3, trainable=False)(inp)))
    X = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    ops = KerasModelOps(model, X, np.arange(16) % 3)
    with pytest.raises(RuntimeError, match="no trainable variable gets a gradient"):
        ops.gradient(np.arange(8), np.ones(8))
    with pytest.raises(RuntimeError, match="no trainable variable gets a gradient"):
        ops.hutchinson(np.arange(8), np.ones(8), seed=0)


def test_a_fit_starting_at_another_epoch_than_the_runs_next_is_warned_about():
    """Review 20: keras.callbacks.BackupAndRestore restarting a new process at epoch 2 (or a forgotten
    load_state_dict with fit(initial_epoch=2)) silently started CREST's run over: Keras's epochs 2 and 3
    trained the run's epochs 0 and 1 and the budget report counted those. Warned about now; a fit that
    continues the run at its next epoch is not."""
    X, y = digits()
    model = mlp(0)
    crest = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3)
    with pytest.warns(UserWarning, match=r"Keras starts this fit at epoch 2, and CrestCallback starts a new run "
                                         r"there, of the 1 epochs this fit trains.*load_state_dict.*warm-up"):
        model.fit(crest.dataset, epochs=3, initial_epoch=2, callbacks=[crest], verbose=0)
    # review 79: the run is the fit's epochs (it planned fit's `epochs`, 3, and its budget report counted them)
    assert crest.epochs == 1 and crest.stats["budget"]["planned_steps"] == len(crest.dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the run's next epoch (1) is Keras's next: nothing to say
        model.fit(crest.dataset, epochs=2, initial_epoch=1, callbacks=[crest], verbose=0)
    sub = SubsetCallback(X, y, method="random", budget=BUDGET, seed=0, epochs=2)
    with pytest.warns(UserWarning, match="Keras starts this fit at epoch 1, but SubsetCallback's run"):
        mlp(0).fit(sub.dataset, epochs=2, initial_epoch=1, callbacks=[sub], verbose=0)
    # review 21: a warm-up without the callback, then a run of the epochs it plans, is the run: quiet
    warm = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3, epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlp(0).fit(warm.dataset, epochs=4, initial_epoch=2, callbacks=[warm], verbose=0)
    assert warm.stats["budget"]["epochs_done"] == 2


def test_optimizer_gradient_accumulation_is_refused():
    """Review 20: Keras's own gradient_accumulation_steps moved the weights every k-th batch only, so the
    trust checks between measured unchanged weights (rho exactly 0) and the budget counted batches for
    steps, without a word; refused, as Lightning's and the Trainer's accumulation are."""
    X, y = digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    crest = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3)
    with pytest.raises(ValueError, match="without gradient_accumulation_steps, got 4.*CrestConfig\\(m=...\\)"):
        model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
    # wrapped for mixed precision (review 21: the wrapper's own attribute is None)
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1, gradient_accumulation_steps=3)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="without gradient_accumulation_steps, got 3"):
        model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)


def test_subset_callback_refuses_a_state_of_other_labels_or_past_its_run():
    """Review 57: SubsetCallback.load_state_dict accepted a state saved for data with other labels (prune's
    loss record and a CRAIG selection of other examples resumed silently), as SubsetLoader does not; a
    position must be a non-negative integer (not bounded above: review 58, a fit with more epochs than
    the callback's trains on, warned, and its state must load)."""
    _, x, y = _example_problem()
    saved = SubsetCallback(x, y, method="random", budget=0.25, epochs=2, m=8, seed=0).state_dict()
    other = np.asarray(y).copy()
    other[:2] = other[1::-1]  # two labels swapped: the same size and classes
    with pytest.raises(ValueError, match="different labels"):
        SubsetCallback(x, other, method="random", budget=0.25, epochs=2, m=8, seed=0).load_state_dict(saved)
    for pos in (-1, 1.5):  # (no upper bound: a fit with more epochs than planned trains on, warned)
        with pytest.raises(ValueError, match="position must be a non-negative integer"):
            SubsetCallback(x, y, method="random", budget=0.25, epochs=2, m=8, seed=0).load_state_dict(
                {**saved, "position": pos})
    same = SubsetCallback(x, y, method="random", budget=0.25, epochs=2, m=8, seed=0)
    same.load_state_dict(saved)
    assert same.position == saved["position"]


def test_callbacks_refuse_a_state_without_its_parts_by_name():
    """Review of 2026-12-06: a CrestCallback state whose crest entry was None or missing failed with a bare
    AttributeError or KeyError, a SubsetCallback state without its schedule with a KeyError; each is a
    ValueError naming the entry, and the callback keeps its state."""
    _, x, y = _example_problem()
    from crestcore import CrestConfig as Config

    saved = CrestCallback(x, y, config=Config(m=8), budget=0.25, seed=0).state_dict()
    for bad in ({**saved, "crest": None}, {k: v for k, v in saved.items() if k != "crest"}):
        crest = CrestCallback(x, y, config=Config(m=8), budget=0.25, seed=0)
        with pytest.raises(ValueError, match="crest entry must be the controller's state"):
            crest.load_state_dict(bad)
        assert crest.position == 0
    sub = SubsetCallback(x, y, method="random", budget=0.25, epochs=2, m=8, seed=0)
    saved = sub.state_dict()
    for bad, match in (({k: v for k, v in saved.items() if k != "schedule"}, "the state must be a dict"),
                       ({**saved, "schedule": {**saved["schedule"], "counters": None}}, "counters must be a dict")):
        with pytest.raises(ValueError, match=f"SubsetCallback state dict: schedule: {match}"):
            sub.load_state_dict(bad)
        assert repr(sub.state_dict()) == repr(saved)


@pytest.mark.parametrize("name", ["crossentropy", "ce"])
def test_keras_generic_crossentropy_names_are_crossentropy(name):
    """Review 79: loss="crossentropy" (Keras picks the sparse or categorical one from the targets) was warned
    about as "not a Keras categorical or sparse categorical cross-entropy"."""
    model = mlp(softmax=True, loss=name)
    facts = keras_adapter.loss_facts(model)
    assert facts["crossentropy"] is True and facts["from_logits"] is False


def test_an_own_train_step_without_sample_weights_is_warned_about():
    """Review 79: keras.io's "customizing fit" step (the weights unpacked, then left out of compute_loss)
    trained unweighted, silently. A step whose source never passes them on is warned about; one that
    passes them on is not."""
    X, y = digits()

    class Unweighted(keras.Sequential):
        def train_step(self, data):
            x, yy = data[0], data[1]
            return super().train_step((x, yy))

    class Weighted(keras.Sequential):
        def train_step(self, data):
            x, yy, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            return super().train_step((x, yy, sample_weight))

    model = mlp(0, cls=Unweighted)
    crest = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3)
    with pytest.raises(ValueError, match="overrides train_step, and in the first training step its compiled loss got "
                                         "no sample weights"):
        model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
    model = mlp(0, cls=Weighted)
    crest = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)


class MetricsOnlyStep(keras.Sequential):
    """keras.io's "customizing fit" step with the weights handed to the metrics only (torch's signature)."""

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=True)
        loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
        self.optimizer.apply(self._grads(loss), self.trainable_weights)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred, sample_weight=sample_weight)
        return {m.name: m.result() for m in self.metrics}

    def _grads(self, loss):
        self.zero_grad()
        loss.backward()
        return [v.value.grad for v in self.trainable_weights]


class DropsWeightsInComputeLoss(keras.Sequential):
    """Keras's built-in train_step, and a compute_loss override (an L2 term) that calls the parent without them."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x=x, y=y, y_pred=y_pred, training=training)
        return loss + 1e-4 * sum(keras.ops.sum(w ** 2) for w in self.trainable_weights)


class KeepsWeightsInComputeLoss(keras.Sequential):
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
        return loss + 1e-4 * sum(keras.ops.sum(w ** 2) for w in self.trainable_weights)


class OwnUnweightedComputeLoss(keras.Sequential):
    """A compute_loss of its own that never calls the compiled loss, nor reads the weights (review 158)."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, y_pred, from_logits=True))


class OwnLossStep(keras.Sequential):
    """A train_step with its own loss object, not compile's: the compiled loss is never called."""

    def train_step(self, data):
        x, y = data[0], data[1]
        y_pred = self(x, training=True)
        loss = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, y_pred, from_logits=True))
        self.zero_grad()
        loss.backward()
        self.optimizer.apply([v.value.grad for v in self.trainable_weights], self.trainable_weights)
        return {"loss": loss}


def test_weights_that_never_reach_the_compiled_loss_are_refused_at_the_first_step():
    """Review 156: a train_step that hands CREST's weights to its metrics only, and an overridden compute_loss that
    calls super().compute_loss without them, trained every step unweighted, silently (the step's source
    passed the syntax check; the loss probe goes around compute_loss). The compiled loss is watched during
    the first step; a step that uses its own loss object is read from its source (warned), one that hands
    them on is quiet, and the loss object is left as it was."""
    X, y = digits()

    def run(cls, *, weights="tempered", method=None):
        model = mlp(0, cls=cls)
        loss_class = type(model._compile_loss)
        if method is None:
            cb = CrestCallback(X, y, config=CrestConfig(**CFG, weights=weights), budget=BUDGET, seed=3)
        else:
            cb = SubsetCallback(X, y, method=method, m=16, budget=BUDGET, epochs=1, seed=3)
        try:
            model.fit(cb.dataset, epochs=1, callbacks=[cb], verbose=0)
        finally:
            assert type(model._compile_loss) is loss_class  # the spy's class swap is undone, also on a refusal
        return cb

    for cls in (MetricsOnlyStep, DropsWeightsInComputeLoss):
        with pytest.raises(ValueError, match=f"{cls.__name__} overrides .*its compiled loss got no sample weights"):
            run(cls)
        with pytest.raises(ValueError, match="its compiled loss got no sample weights"):
            run(cls, method="craig")  # a weighted baseline
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb = run(KeepsWeightsInComputeLoss)
        assert cb.position == cb.steps_per_epoch
        run(MetricsOnlyStep, weights="uniform")  # every weight 1: nothing to lose
        run(MetricsOnlyStep, method="random")  # an unweighted baseline
    with pytest.warns(UserWarning, match="overrides train_step, and its source never passes the sample weights on"):
        run(OwnLossStep)
    with pytest.warns(UserWarning, match="overrides compute_loss, and its source never reads sample_weight"):
        run(OwnUnweightedComputeLoss)  # review 158: the compiled loss is never called, so the spy saw nothing


def test_a_first_step_that_raises_gives_the_loss_its_class_back_at_the_next_call():
    """Review 163: a first step that raised (a callback before CREST's, Ctrl-C) never reached the batch-end hook
    that removes the spy on the compiled loss, and Keras calls no on_train_end: the loss kept the spy's class
    through later fits without CREST. Its next call outside the watched fit restores it."""
    X, y = digits()
    model = mlp(0, cls=KeepsWeightsInComputeLoss)
    loss_class = type(model._compile_loss)

    class Boom(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise KeyboardInterrupt("Ctrl-C")

    cb = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3)
    with pytest.raises(KeyboardInterrupt):
        model.fit(cb.dataset, epochs=1, callbacks=[Boom(), cb], verbose=0)
    assert type(model._compile_loss) is not loss_class  # (the step raised inside the watch)
    before = [w.copy() for w in model.get_weights()]
    model.fit(X[:64], y[:64], epochs=1, batch_size=32, verbose=0)  # the user goes on without CREST
    assert type(model._compile_loss) is loss_class
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # it trained


def test_a_backup_and_restore_rollback_in_the_same_process_is_warned_about(tmp_path):
    """Review 79: BackupAndRestore's retry in the same process (its docstring's try: fit / except / fit
    again) rolls the weights back to the last finished epoch, but the callback went on from its own
    position: steps skipped, the run trained past its plan, and at an epoch's end nothing was said."""
    X, y = digits()

    class FailOnce(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.fired, self.epoch = False, 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_epoch_end(self, epoch, logs=None):  # after the epoch's steps, before BackupAndRestore's backup
            if epoch == 1 and not self.fired:
                self.fired = True
                raise RuntimeError("simulated failure")

    model = mlp(0)
    crest = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3)
    callbacks = [FailOnce(), keras.callbacks.BackupAndRestore(str(tmp_path)), crest]
    with pytest.raises(RuntimeError, match="simulated failure"):
        model.fit(crest.dataset, epochs=3, callbacks=callbacks, verbose=0)
    assert crest.position == 2 * len(crest.dataset)  # epochs 0 and 1 trained; the backup holds epoch 0's end
    with pytest.warns(UserWarning, match=r"Keras starts this fit at epoch 1 .* weights were rolled back"):
        model.fit(crest.dataset, epochs=3, callbacks=callbacks, verbose=0)


def test_a_backup_inside_epochs_is_warned_about(tmp_path):
    """Review 143: BackupAndRestore(save_freq=<steps>) resumed in a new process starts the backup's epoch at its
    first batch again, so the run trained that epoch's steps before the backup twice and ended 0.016 from the
    uninterrupted run's weights, silently; the docs said to back up at epochs' ends. Said at the fit's start;
    the default, save_freq="epoch", is quiet."""
    X, y = digits()
    model = mlp(0)
    crest = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3)
    with pytest.warns(UserWarning, match=r"BackupAndRestore\(save_freq=2\) backs up inside epochs"):
        model.fit(crest.dataset, epochs=1, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "steps"), save_freq=2),
                             keras.callbacks.BackupAndRestore(str(tmp_path / "ends")), crest])  # (each looked at)
    crest = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        model.fit(crest.dataset, epochs=1, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "epochs")), crest])


def test_soft_targets_with_labels_are_warned_about():
    """Review 79: soft targets (mixup, distillation) with labels= trained on their own cross-entropy while
    CREST measured the hard labels', with nothing said (label smoothing, the same mismatch, was warned)."""
    X, y = digits()
    soft = np.full((y.size, 10), 0.02, dtype="float32")
    soft[np.arange(y.size), y] = 0.82
    with pytest.warns(UserWarning, match="y holds soft or multi-label targets"):
        CrestCallback(X, soft, labels=y, config=CrestConfig(**CFG), budget=BUDGET, seed=3)
    onehot = np.eye(10, dtype="float32")[y]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CrestCallback(X, onehot, labels=y, config=CrestConfig(**CFG), budget=BUDGET, seed=3)


def test_labels_that_disagree_with_hard_targets_are_warned_about():
    """Review 84: labels= naming other classes than y's class indices (or one-hot rows) was taken without a
    word: the model trained on y while the selections measured labels=."""
    X, y = digits()
    other = (y + 1) % 10
    for targets in (y, np.eye(10, dtype="float32")[y]):
        with pytest.warns(UserWarning, match=f"labels= names another class than y at {y.size} of {y.size}"):
            CrestCallback(X, targets, labels=other, config=CrestConfig(**CFG), budget=BUDGET, seed=3)
        with pytest.warns(UserWarning, match="labels= names another class than y"):
            SubsetCallback(X, targets, labels=other, method="random", budget=BUDGET, seed=3, epochs=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            CrestCallback(X, targets, labels=y, config=CrestConfig(**CFG), budget=BUDGET, seed=3)


def _mean_ce(y_true, y_pred):
    """A loss that takes the batch mean itself: one value for the whole batch."""
    return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True))


def _per_example_ce(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)


class _MeanCE(keras.losses.Loss):
    def call(self, y_true, y_pred):
        return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True))


class _PerExampleCE(keras.losses.Loss):
    def call(self, y_true, y_pred):
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)


@pytest.mark.parametrize("which", ["crest", "craig"])
@pytest.mark.parametrize("loss", [_mean_ce, _MeanCE(), _MeanCE(reduction="sum")],
                         ids=["function", "Loss subclass", "Loss subclass, reduction sum"])
def test_a_loss_that_takes_the_batch_mean_itself_is_refused(which, loss):
    """Review 106: a compiled loss that returns ops.mean(...) (one value for the batch) makes Keras compute
    mean(w) * loss, so CREST's weights (mean 1) dropped out and every step trained unweighted, silently; the
    only warning said the loss was "fine for a cross-entropy of your own (a Loss subclass)". Refused when the
    fit begins, naming the loss and the fix, with the weights as they were."""
    x, y = _small()
    model = _dense3(loss)
    before = [np.array(w) for w in model.get_weights()]
    cb = (CrestCallback(x, y, config=CrestConfig(m=16), budget=0.25, seed=0, outputs="logits") if which == "crest"
          else SubsetCallback(x, y, method="craig", budget=0.25, m=16, seed=0, outputs="logits"))
    name = "_mean_ce" if loss is _mean_ce else "_MeanCE"
    with pytest.raises(ValueError, match=f"{name}.*ignores fit's sample weights.*one value per example"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(cb.dataset, epochs=1, callbacks=[cb], verbose=0)
    assert cb.position == 0
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_loss_that_takes_the_batch_mean_itself_is_fine_for_an_unweighted_baseline():
    """Review 106: random, full and sgd-budget serve weight 1 everywhere, so mean(w) * loss is their loss."""
    x, y = _small()
    sub = SubsetCallback(x, y, method="random", budget=0.25, m=16, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _dense3(_mean_ce).fit(sub.dataset, epochs=1, callbacks=[sub], verbose=0)
    assert sub.position == sub.steps_per_epoch


@pytest.mark.parametrize("loss", [
    "sparse_categorical_crossentropy", "crossentropy",
    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum"),
    keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean"),
    keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0),
    keras.losses.CategoricalFocalCrossentropy(from_logits=True),
    _per_example_ce, _PerExampleCE(), _PerExampleCE(reduction="sum"),
], ids=lambda v: v if isinstance(v, str) else getattr(v, "__name__", None) or
        f"{type(v).__name__}-{v.reduction}-{getattr(v, '_fn_kwargs', {}).get('ignore_class')}")
def test_losses_that_weigh_each_example_are_not_refused(loss):
    """Review 106: the check of the sample weights stays quiet for every loss that honours them: Keras's
    string and class losses with the reductions the callback takes, and per-example functions and Loss
    subclasses; a zero-initialised model, whose examples all have one loss, included. The warning for a
    loss of the user's own no longer calls every Loss subclass fine."""
    x, y = _small()
    softmax = isinstance(loss, str)
    if isinstance(loss, keras.losses.CategoricalFocalCrossentropy):
        y = np.eye(3, dtype="float32")[y]
    for init in ("glorot_uniform", "zeros"):
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(
            3, activation="softmax" if softmax else None, kernel_initializer=init)])
        model.compile(optimizer="sgd", loss=loss)
        crest = CrestCallback(x, y, config=CrestConfig(m=16), budget=0.25, seed=0,
                              outputs="probabilities" if softmax else "logits")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
        assert crest.position == crest.steps_per_epoch
        for w in caught:
            assert "fine for a cross-entropy of your own (a Loss subclass)" not in str(w.message), str(w.message)
        if loss in (_per_example_ce,) or isinstance(loss, _PerExampleCE):
            assert any("one value per example" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_the_loss_weight_check_leaves_every_variable_and_random_stream_as_it_was():
    """Review 106: the check of the compiled loss's sample weights runs a forward pass and the loss on a
    few examples when the fit begins: no variable (the model's, the optimizer's, a dropout layer's seed),
    no moving statistic and no random stream (torch's, NumPy's, Keras's global seed) may move, whether the
    loss is refused or not."""
    X, y = digits(160)
    for loss in (keras.losses.SparseCategoricalCrossentropy(from_logits=True), _MeanCE()):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16), keras.layers.BatchNormalization(),
                                  keras.layers.ReLU(), keras.layers.Dropout(0.5), keras.layers.Dense(10)])
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=loss)
        model.fit(X[:32], y[:32], epochs=1, verbose=0)  # built, with optimizer and seed-generator state
        before = [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.variables + model.optimizer.variables]
        torch_rng, np_rng = torch.random.get_rng_state(), np.random.get_state()
        from keras.src.backend.common import global_state
        keras_seed = global_state.get_global_attribute("global_seed_generator")
        keras_seed = None if keras_seed is None else np.array(keras.ops.convert_to_numpy(keras_seed.state.value))
        grads = [None if v.value.grad is None else v.value.grad.clone() for v in model.trainable_variables]
        try:
            keras_adapter._check_loss_weighs_examples(model, X, y, y, "CrestCallback")
            refused = False
        except ValueError:
            refused = True
        assert refused == isinstance(loss, _MeanCE)
        after = [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.variables + model.optimizer.variables]
        assert len(before) == len(after)
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)
        assert torch.equal(torch_rng, torch.random.get_rng_state())
        np_now = np.random.get_state()
        assert np_rng[0] == np_now[0] and np.array_equal(np_rng[1], np_now[1]) and np_rng[2:] == np_now[2:]
        now = global_state.get_global_attribute("global_seed_generator")
        assert (keras_seed is None and now is None) or np.array_equal(
            keras_seed, np.array(keras.ops.convert_to_numpy(now.state.value)))
        for g, v in zip(grads, model.trainable_variables):  # no .grad written or accumulated
            assert (g is None and v.value.grad is None) or torch.equal(g, v.value.grad)


def _step_source_warns(step) -> bool:
    """Whether the adapter warns about a model class whose train_step is ``step``."""
    cls = type("Own", (keras.Sequential,), {"train_step": step})
    model = cls([keras.Input((8,)), keras.layers.Dense(3)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keras_adapter._warn_own_train_step(model, "CrestCallback")
    return any("overrides train_step" in str(w.message) for w in caught)


def test_an_own_train_step_that_unpacks_the_weights_and_drops_them_is_warned_about():
    """Review 106: the check tested whether the step's source contains "sample_weight", which the name
    keras.utils.unpack_x_y_sample_weight always does: `x, y, _ = unpack_x_y_sample_weight(data)` (the
    weights thrown away) and a step that unpacks sample_weight and leaves it out of compute_loss both trained
    unweighted without a word. Steps that pass the weights on stay quiet."""
    X, y = digits()

    class Discards(keras.Sequential):
        def train_step(self, data):
            x, yy, _ = keras.utils.unpack_x_y_sample_weight(data)
            return super().train_step((x, yy))

    model = mlp(0, cls=Discards)
    crest = CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3)
    with pytest.raises(ValueError, match="its compiled loss got no sample weights"):
        model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)

    def unpacked_then_left_out(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=True)
        loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
        return self.apply(loss)

    def unpacked_then_none(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=True)
        return self.apply(self.compute_loss(x, y, y_pred, sample_weight=None))

    def thrown_away(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self.apply(self.compute_loss(x=x, y=y, y_pred=self(x, training=True)))

    def indexed(self, data):
        x, y = data[0], data[1]
        return self.apply(self.compute_loss(x=x, y=y, y_pred=self(x, training=True)))

    def from_unpack_import(self, data):
        x, y, sw = unpack_x_y_sample_weight(data)  # noqa: F821 - never run, only read
        return self.apply(self.compute_loss(x=x, y=y, y_pred=self(x, training=True)))

    def jax_thrown_away(self, state, data):  # review 112: JAX's train_step(self, state, data); the optimizer
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)  # state, third in `state`, was read as the weights
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        loss, grads = self.stateless_compute_loss(trainable, non_trainable, x, y)
        return self.optimizer.stateless_apply(optimizer_vars, grads, trainable)

    def extra_parameter(self, data, training=True):  # the batch is the last parameter without a default
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self.apply(self.compute_loss(x=x, y=y, y_pred=self(x, training=training)))

    def own_loss_object_metrics_only(self, data):  # review 160: the weights reach the metrics only
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=True)
        loss = self.loss_fn(y, y_pred)
        for metric in self.metrics:
            metric.update_state(y, y_pred, sample_weight=sample_weight)
        return self.apply(loss)

    def metrics_only_positional(self, data):
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=True)
        self.accuracy.update_state(y, y_pred, sw)
        return self.apply(self.loss_fn(y, y_pred))

    def compute_metrics_only(self, data):  # review 167: the model's compute_metrics, the loss unweighted
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=True)
        self.apply(self.loss_fn(y, y_pred))
        return self.compute_metrics(x, y, y_pred, sample_weight=sw)

    def jax_stateless_metrics_only(self, state, data):  # review 167: JAX's stateless metric update
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        loss, grads = self.stateless_compute_loss(trainable, non_trainable, x, y)
        new = self.accuracy.stateless_update_state(metrics_vars, y, x, sample_weight=sw)
        return self.optimizer.stateless_apply(optimizer_vars, grads, trainable), new

    for step in (unpacked_then_left_out, unpacked_then_none, thrown_away, indexed, from_unpack_import,
                 jax_thrown_away, extra_parameter, own_loss_object_metrics_only, metrics_only_positional,
                 compute_metrics_only, jax_stateless_metrics_only):
        assert _step_source_warns(step), step.__name__

    def keyword(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        return self.apply(self.compute_loss(x=x, y=y, y_pred=self(x, training=True), sample_weight=sample_weight))

    def positional(self, data):
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        return self.apply(self.compute_loss(x, y, self(x, training=True), sw))

    def compiled_loss(self, data):
        x, y, w = keras.utils.unpack_x_y_sample_weight(data)
        return self.apply(self.compiled_loss(y, self(x, training=True), sample_weight=w))

    def own_loss(self, data):
        x, y, w = keras.utils.unpack_x_y_sample_weight(data)
        return self.apply(self.loss(y, self(x, training=True), w))

    def direct(self, data):
        x, y = data[0], data[1]
        return self.apply(self.compute_loss(x=x, y=y, y_pred=self(x, training=True), sample_weight=data[2]))

    def handed_on(self, data):
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        return super(type(self), self).train_step((x, y, sw))

    def whole_batch(self, data):
        return super(type(self), self).train_step(data)

    def old_guide(self, data):
        if len(data) == 3:
            x, y, sample_weight = data
        else:
            sample_weight = None
            x, y = data
        return self.apply(self.compute_loss(y=y, y_pred=self(x, training=True), sample_weight=sample_weight))

    def jax_passed_on(self, state, data):
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        return self.stateless_compute_loss(trainable, non_trainable, x, y, sample_weight=sw)

    def whole_batch_extra(self, data, log_every=10):  # review 113: the extra parameter is not the batch
        return super(type(self), self).train_step(data)

    def guide_with_metrics(self, data):  # keras.io's step: the loss and the metrics both weighted
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=True)
        loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        for metric in self.metrics:
            metric.update_state(y, y_pred, sample_weight=sample_weight)
        return self.apply(loss)

    def weighed_by_hand_with_a_monitor(self, data):  # review 164: weighed by hand, an unweighted loss logged
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=True)
        per = keras.losses.sparse_categorical_crossentropy(y, y_pred, from_logits=True)
        loss = keras.ops.sum(per * sample_weight) / keras.ops.sum(sample_weight)
        self.monitor.update_state(self.monitor_ce(y, y_pred))
        return self.apply(loss)

    for step in (keyword, positional, compiled_loss, own_loss, direct, handed_on, whole_batch, old_guide,
                 jax_passed_on, whole_batch_extra, guide_with_metrics, weighed_by_hand_with_a_monitor):
        assert not _step_source_warns(step), step.__name__


@pytest.mark.parametrize("spe", [2, 4])
def test_several_steps_per_execution_are_refused_by_name(spe):
    """Review 156: on torch, Keras's build fetch reads a whole execution's batches before any hook runs, and with
    steps_per_execution >= 3 the callback's fetch count refused the fit as one "without the CrestCallback" (the
    callback was there); both callbacks now name the setting to change."""
    X, y = digits()
    for make in (lambda: CrestCallback(X, y, config=CrestConfig(**CFG), budget=BUDGET, seed=3),
                 lambda: SubsetCallback(X, y, method="random", m=16, budget=BUDGET, epochs=1, seed=3)):
        model = mlp(0)
        model.compile(optimizer=keras.optimizers.SGD(0.1), steps_per_execution=spe,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        cb = make()
        with pytest.raises(ValueError, match=rf"{type(cb).__name__} needs model.compile\(steps_per_execution=1\), "
                                             rf"got {spe}"):
            model.fit(cb.dataset, epochs=1, callbacks=[cb], verbose=0)


def test_a_refused_state_leaves_the_callback_as_it_was_and_says_nothing():
    """Review 170: CrestCallback.load_state_dict checked anchor_stats after it had loaded the controller state and
    the position, so a state refused there left the callback half-loaded; and the notices (a CrestConfig that
    differs) were said before a later check refused the state. Every check comes first now, the notices are said
    once they have all passed, and a warnings filter that raises leaves the callback as it was."""
    X, y = digits()
    b = fit(mlp(0), X, y, epochs=1)
    saved = b.state_dict()
    c = CrestCallback(X, y, config=CrestConfig(**dict(CFG, tau=0.01)), budget=BUDGET, seed=3)
    fresh = c._state
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="anchor_stats must map"):
            c.load_state_dict(dict(saved, anchor_stats={"x": 1}))
    assert [str(w.message) for w in said] == [] and c.position == 0 and c._state is fresh
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="the CrestConfig differs"):
            c.load_state_dict(saved)
    assert c.position == 0 and c._state is fresh
    with pytest.warns(UserWarning, match="the CrestConfig differs"):
        c.load_state_dict(saved)
    assert c.position == saved["position"] > 0


def test_multi_hot_targets_are_refused_with_labels_too():
    """Review 170: with labels= multi-hot targets were taken after a warning, and fit trained the model on a
    multi-label loss that CREST does not measure, while the docs and the refusal without labels= call them
    unsupported. Refused either way now."""
    X, y = digits()
    multi = np.eye(10, dtype="float32")[y]
    multi[:, 0] = 1.0  # every row also in class 0
    with pytest.raises(ValueError, match="multi-label or per-token targets.*with labels= or without"):
        CrestCallback(X, multi, labels=y, config=CrestConfig(**CFG), budget=BUDGET, seed=3)


def test_per_token_class_targets_are_refused_as_such():
    """Review 172: (n, T) targets of class indices above 1 were called soft labels without labels= and, with
    labels=, accepted until fit failed inside Keras with a bare shape error; refused either way."""
    X, y = digits()
    per_token = np.stack([y % 3, (y + 1) % 3, (y + 2) % 3], axis=1)
    with pytest.raises(ValueError, match="multi-label or per-token targets"):
        labels_from_targets(per_token)
    with pytest.raises(ValueError, match="multi-label or per-token targets"):
        CrestCallback(X, per_token.astype("float32"), labels=y, config=CrestConfig(**CFG), budget=BUDGET, seed=3)


def test_a_subset_callbacks_refused_queue_leaves_it_as_it_was():
    """Review 172: SubsetCallback read its queue after loading the schedule and the position (and after its
    notice), so a bad queue entry failed with a bare KeyError and left the callback half-loaded."""
    X, y = digits()
    a = SubsetCallback(X, y, method="random", budget=BUDGET, m=32, seed=3)
    keras.utils.set_random_seed(0)
    model = mlp(0)
    model.fit(a.dataset, epochs=1, callbacks=[a], verbose=0)
    saved = a.state_dict()
    b = SubsetCallback(X, y, method="random", budget=BUDGET, m=32, seed=3)
    schedule = b.schedule.state()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="SubsetCallback state dict: a queued batch must be a dict holding "
                                             "indices and weights"):
            b.load_state_dict(dict(saved, queue=[{"indices": [1, 2]}]))
        with pytest.raises(ValueError, match="queue must be a list"):
            b.load_state_dict(dict(saved, queue=None))
    assert said == [] and b.position == 0 and repr(b.schedule.state()) == repr(schedule)
    b.load_state_dict(saved)
    assert b.position == saved["position"]


def test_boolean_multi_hot_targets_are_refused_and_whole_number_queue_weights_taken():
    """Review 173: boolean multi-hot targets were skipped by the multi-label refusal (trained on with labels=), and
    a SubsetCallback queue with whole-number weights, taken before, was refused naming a key it never stores."""
    X, y = digits()
    multi = np.eye(10, dtype=bool)[y]
    multi[:, 0] = True
    with pytest.raises(ValueError, match="multi-label or per-token targets"):
        CrestCallback(X, multi, labels=y, config=CrestConfig(**CFG), budget=BUDGET, seed=3)
    from crestcore.adapters.keras import _queued_batch

    idx, w = _queued_batch({"indices": [3, 1], "weights": [2, 1]}, 10)
    assert idx.tolist() == [3, 1] and w.tolist() == [2.0, 1.0] and w.dtype == np.float64
    for bad in ([True, False], ["1.0", "2.0"]):  # review 174: no weights, as stored_batch refuses them
        with pytest.raises(ValueError, match="weights must be numbers"):
            _queued_batch({"indices": [3, 1], "weights": bad}, 10)
