"""Keras 3 adapter: CREST inside ``model.fit`` through one Callback and the PyDataset it serves.

Usage (``docs/keras.md`` has the whole story)::

    crest = CrestCallback(x_train, y_train, config=CrestConfig(m=128), budget=0.1, seed=0)
    model.fit(crest.dataset, epochs=20, callbacks=[crest])

:class:`CrestCallback` owns the CREST controller (:func:`crestcore.crest_next_batch`) and
:class:`KerasModelOps`, the operations the controller needs (eval-mode outputs for a set of example
indices, the flat trainable weights, the gradient of the weighted coreset loss, one Hutchinson probe
``z * (H z)``). ``crest.dataset`` is a :class:`keras.utils.PyDataset` of ``steps_per_epoch`` batches
``(x, y, sample_weight)``: the weighted mini-batch coresets.

How the batches stay right whatever Keras does
----------------------------------------------
* **The batch a step trains on is decided by the controller, not by Keras's index.** Every
  ``__getitem__`` call during ``fit`` serves the controller's next batch, whichever index Keras asks
  for; ``fit(shuffle=...)`` therefore changes nothing. The controller is asked lazily, at the moment
  Keras fetches a batch, which (torch backend, jax on CPU) is after the previous step's
  ``on_train_batch_end``: selections and trust checks measure the weights the next step starts from.
* **The extra fetch before the first epoch does not consume a step.** ``fit`` fetches one batch to
  build the model and calls the dataset's ``on_epoch_begin`` / ``on_epoch_end`` once extra around it,
  before any callback's ``on_train_begin``. Outside ``on_train_begin`` ... ``on_train_end`` the
  dataset serves a fixed shape probe (the first ``m`` examples, weight 0) and never asks the
  controller; the dataset's own epoch hooks are not used. A third such fetch in a row by a ``fit`` (the
  build fetch is one call, two when Keras fetches ahead) means the dataset is being trained on without
  its callback, and raises ``RuntimeError``; so does a fetch by ``evaluate`` or ``predict`` (fit's
  validation pass included). Which Keras loop fetches is read from the call stack.
* **A step is accounted when Keras reports it trained** (``on_train_batch_end``): the served batch is
  popped then. Should Keras fetch ahead (JAX on an accelerator fetches one batch ahead), the queue
  holds the batches served and not yet trained and every one is still trained exactly once, in order;
  the look-ahead batch is then chosen at the weights one step earlier.
* **Loss reduction.** The controller's loss is ``mean_i(w_i l_i) = sum_i(w_i l_i) / m``. Keras's
  default reduction (``"sum_over_batch_size"``, also ``"mean"``) divides the weighted sum by the batch
  size, not by the sum of the weights: that *is* the controller's loss, so the weights are served as
  they are. With ``reduction="sum"`` they are served divided by the batch size. A loss compiled with
  ``reduction="mean_with_sample_weight"`` (divides by the sum of the weights, which no rescaling of the
  weights can undo) is refused with a ``ValueError``, and so is a loss that ignores the sample weights, as
  one does that reduces over the batch itself (``ops.mean(...)``: Keras then trains on ``mean(w) * loss``),
  told from the compiled loss on a few examples when the fit begins (``_check_loss_weighs_examples``).

Backends
--------
The torch backend and the jax backend are supported. Forward passes use ``model(x, training=False)``
(torch) or ``model.stateless_call(..., training=False)`` (jax); the loss is computed with
``keras.ops``. Gradients and Hessian-vector products use ``torch.autograd.grad`` (double backward) on
torch and ``jax.grad`` / ``jax.jvp`` (jitted) on jax. In inference mode BatchNorm uses and never updates
its moving statistics and dropout is off; nothing the optimizer reads is touched (no ``.grad`` on torch,
no variable assignment on jax). On jax, the weights are read from the trainer's current state during
``fit`` (Keras detaches them from the variables within an epoch), never written. The TensorFlow backend
is refused with an error that says what it lacks (gradients/HVPs here, and ``fit`` feeds a PyDataset to
TensorFlow through ``tf.data`` with prefetching); the other backends cannot train.
The backend-specific operations live in one module per backend, ``_torch`` and ``_jax`` (and
``_generic`` for the backends that only measure), with the same function names and signatures, as in
Keras 3's own ``keras/src/backend/<name>/``; :class:`KerasModelOps` picks one from the backend's name.

Only the ``crestcore.adapters`` floor (and the demo layer, lazily) imports keras; the core never does.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
import weakref
from dataclasses import dataclass

import numpy as np

from crestcore.plan import budget_report, full_steps, planned_steps
from crestcore.validation import host_indices, int64_labels

try:
    import keras
    from keras import ops as kops
except ImportError as exc:  # pragma: no cover - depends on what is installed
    import importlib.util
    import os

    if importlib.util.find_spec("keras") is None:
        raise ImportError("crestcore.adapters.keras needs Keras 3: pip install 'crestcore[keras]'") from exc
    raise ImportError(  # Keras is there; its backend is not (KERAS_BACKEND unset means tensorflow)
        f"crestcore.adapters.keras: Keras is installed but its backend "
        f"({os.environ.get('KERAS_BACKEND') or 'tensorflow, the default'}) failed to import ({exc}). CREST "
        "runs on Keras's torch and jax backends: set KERAS_BACKEND=torch (or jax) before importing keras, "
        "with that library installed") from exc

if not str(getattr(keras, "__version__", "0")).startswith("3"):  # pragma: no cover
    raise ImportError(f"crestcore.adapters.keras needs Keras 3, found keras {keras.__version__}")

from crestcore.controller import (
    CONFIG_AS_BEFORE, Batch, CrestConfig, crest_init, crest_next_batch, crest_observe, crest_parameters_changed,
    crest_state_dict, crest_stats,
)

from crestcore.baselines import SubsetSchedule

from .. import _common

__all__ = ["CrestCallback", "CrestDataset", "KerasModelOps", "SubsetCallback", "SUPPORTED_BACKENDS",
           "labels_from_targets"]

SUPPORTED_BACKENDS = ("torch", "jax")
_FORMAT = "crestcore.adapters.keras.CrestCallback/1"
_SUBSET_FORMAT = "crestcore.adapters.keras.SubsetCallback/1"
def _clip_eps() -> float:
    """Keras's fuzz factor: its probability cross-entropies normalise each row to sum 1 and clip it to
    ``[epsilon, 1 - epsilon]`` before the log, so CREST does the same (the loss it measures is the one
    trained: a confidently wrong example's loss is -log(1e-7) = 16.1 there, not -log(p))."""
    return float(keras.config.epsilon())


def _log_probabilities(out):
    """``log`` of the rows of probabilities ``out`` as Keras's cross-entropy takes them (keras.ops: torch
    tensors with their graph, jax inside jit)."""
    eps = _clip_eps()
    p = out / kops.sum(out, axis=1, keepdims=True)
    return kops.log(kops.clip(p, eps, 1.0 - eps))
_CE_NAMES = ("sparse_categorical_crossentropy", "categorical_crossentropy")


def _backend() -> str:
    return keras.backend.backend()


def _require_supported(what: str, backend: str | None = None) -> None:
    """``NotImplementedError`` saying that ``backend`` (default Keras's) lacks ``what``, unless it is one of
    :data:`SUPPORTED_BACKENDS`."""
    backend = _backend() if backend is None else backend
    if backend not in SUPPORTED_BACKENDS:
        raise NotImplementedError(_unsupported(backend, what))


def _implementation(backend: str):
    """The module of :class:`KerasModelOps`'s operations on ``backend``: ``_torch``, ``_jax`` (the same
    function names and signatures), or ``_generic`` (forward passes only) for the other backends."""
    if backend == "torch":
        from . import _torch as impl
    elif backend == "jax":
        from . import _jax as impl
    else:
        from . import _generic as impl
    return impl


def _unsupported(backend: str, what: str) -> str:
    extra = ""
    if backend == "tensorflow":
        extra = (" Also, Keras feeds a PyDataset to TensorFlow through tf.data with prefetching, so batches "
                 "would be chosen before the steps before them have trained.")
    return (f"crestcore.adapters.keras: the {backend!r} Keras backend lacks {what}: it is implemented for "
            f"the {' and '.join(SUPPORTED_BACKENDS)} backends only.{extra} Set KERAS_BACKEND=torch (or jax) "
            "before keras is first imported.")


def _jax_contract_error(model, what: str) -> str:
    return (f"crestcore.adapters.keras: Keras {keras.__version__}'s JAX trainer does not hold its state where "
            f"this adapter reads it ({what}; model class {type(model).__name__}). During fit the adapter reads "
            "the weights from the trainer's private state (model._jax_state, model._jax_state_synced) because "
            "Keras detaches them from the variables within an epoch; this Keras release changed that state. "
            "Use a Keras version tested with crestcore (docs/keras.md) or the torch backend (KERAS_BACKEND=torch), "
            "and report the Keras version.")


# ------------------------------------------------------------------------------------------------
# data on the host
# ------------------------------------------------------------------------------------------------
def _host(a, what: str) -> np.ndarray:
    """A host NumPy view/copy of an array of any library (NumPy, torch, jax, TensorFlow, lists)."""
    if isinstance(a, np.ndarray):
        return a
    if type(a).__module__.startswith("torch"):
        return a.detach().cpu().numpy()
    if hasattr(a, "numpy") and callable(a.numpy) and "tensorflow" in type(a).__module__:
        return np.asarray(a.numpy())  # a TensorFlow tensor
    try:
        return np.asarray(a)
    except Exception as exc:
        raise TypeError(f"{what} must be an array NumPy can read, got {type(a).__name__}") from exc


def _in_memory(v, what: str) -> np.ndarray:
    """``v`` as a host array of numbers, or a TypeError saying CREST needs in-memory arrays. An array-like
    (NumPy, a tensor, a memmap, an h5py dataset, nested lists of numbers) reads as one; a stream of batches
    (a generator, a PyDataset, a tf.data or torch Dataset or DataLoader) has no shape, and a table of rows
    (a Hugging Face dataset) or a sparse matrix reads as Python objects."""
    a = None
    if hasattr(v, "shape") or hasattr(v, "__array__") or isinstance(v, (list, tuple)):
        a = _host(v, what)
    if a is None or a.dtype == object or a.ndim == 0:
        raise TypeError(
            f"{what} is a {type(v).__name__}: CREST reads any example at any time (its random subsets, its "
            "measurement passes), so it needs the training data as in-memory arrays of numbers (NumPy, or a dict "
            "/ list of them): materialise it first, e.g. np.concatenate over its batches, or np.asarray of a "
            "dataset's numeric columns (random augmentation belongs in the model then, as Keras preprocessing "
            "layers such as RandomFlip, which train augmented and measure in inference mode without it)")
    return a


def _as_inputs(x, what: str = "x"):
    """``x`` as NumPy: one array (n, ...), or a dict / list / tuple of arrays with the same n."""
    if isinstance(x, dict):
        out = {k: _in_memory(v, f"{what}[{k!r}]") for k, v in x.items()}
    elif isinstance(x, (list, tuple)) and x and not np.isscalar(x[0]) and hasattr(x[0], "shape"):
        out = type(x)(_in_memory(v, f"{what}[{i}]") for i, v in enumerate(x))
    else:
        out = _in_memory(x, what)
    leaves = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (list, tuple)) else [out]
    if not leaves:
        raise ValueError(f"{what} is empty")
    ns = {int(a.shape[0]) if a.ndim else -1 for a in leaves}
    if len(ns) != 1 or -1 in ns:
        raise ValueError(f"every array of {what} needs the examples along its first axis, with one length; got "
                         f"lengths {sorted(ns)}")
    return out, ns.pop()


def _take(x, idx: np.ndarray):
    if isinstance(x, dict):
        return {k: v[idx] for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(v[idx] for v in x)
    return x[idx]


def _one_hot_rows(y: np.ndarray) -> bool:
    """Whether every row of the 2-D targets ``y`` is one-hot (a single 1, zeros elsewhere)."""
    return bool(np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=1) == 1))


def _queued_batch(q, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``SubsetCallback`` checkpoint's queued batch, ``{"indices", "weights"}``, checked as a stored batch is
    (the weights as float64: whole-number weights are weights too)."""
    where = "SubsetCallback state dict"
    if not isinstance(q, dict) or not {"indices", "weights"} <= set(q):
        raise ValueError(f"{where}: a queued batch must be a dict holding indices and weights")
    w = np.asarray(q["weights"])
    if w.dtype.kind not in "iuf":  # (booleans and strings are no weights: review 174)
        raise ValueError(f"{where}: a queued batch's weights must be numbers, got dtype {w.dtype}")
    w = w.astype(np.float64)
    idx, w, _ = _common.stored_batch({"indices": q["indices"], "weights": w, "reselected": False}, n, where)
    return idx, w


def _refuse_multi_hot(y: np.ndarray) -> None:
    """Refuse 2-D targets of whole numbers that are not one-hot, beyond rows of zeros: multi-hot rows (several
    1s) or class indices per position (a value above 1), multi-label or per-token targets, which CREST,
    selecting whole examples by one class label, does not support, with ``labels=`` or without (reviews 169 and
    172: they were called soft labels, with labels= as the way out, which then trained on a loss CREST did not
    measure, or failed inside Keras)."""
    if y.ndim != 2 or y.shape[1] < 2:
        return
    if y.dtype == bool:  # multi-hot rows as booleans (review 173: skipped, then trained on with labels=)
        y = y.astype(np.int8)
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and bool(np.all(np.isfinite(y)))
                                                   and bool(np.all(y == np.round(y))))):
        return
    if bool(np.any(y.sum(axis=1) > 1)) or bool(np.any(y > 1)) or bool(np.any(y < 0)):
        raise ValueError(
            "y holds rows of whole numbers that are not one-hot (several 1s, or class indices per position: "
            "multi-label or per-token targets): CREST selects whole examples, each by one class label, and "
            "measures the softmax cross-entropy of that label; such targets are not supported, with labels= or "
            "without (the model would train on another loss than the one CREST measures)")


def labels_from_targets(y) -> np.ndarray:
    """The integer class of every example from Keras targets: class indices (n,) or (n, 1), or one-hot
    rows (n, C). Soft labels are refused (pass ``labels=``).

    Examples
    --------
    >>> import numpy as np
    >>> labels_from_targets(np.array([[2], [0], [1]]))
    array([2, 0, 1])
    >>> labels_from_targets(np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))  # one-hot rows
    array([1, 0])
    >>> labels_from_targets(np.array([[0.3, 0.7], [1.0, 0.0]]))
    Traceback (most recent call last):
        ...
    ValueError: y has rows that are not one-hot (soft labels?): pass labels= with one class index per example
    """
    y = _host(y, "y")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 1:
        if y.dtype == bool:
            raise TypeError("y must hold integer class indices, got booleans")
        if not np.issubdtype(y.dtype, np.integer):
            if not np.issubdtype(y.dtype, np.floating) or not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
                raise TypeError(f"y must hold integer class indices (or one-hot rows), got dtype {y.dtype}")
        lab = int64_labels(y, "y") if np.issubdtype(y.dtype, np.integer) else y.astype(np.int64)
    elif y.ndim == 2:
        if not _one_hot_rows(y):
            _refuse_multi_hot(y)
            raise ValueError("y has rows that are not one-hot (soft labels?): pass labels= with one class index "
                             "per example")
        lab = np.argmax(y, axis=1).astype(np.int64)
    else:
        raise ValueError(f"y must be class indices (n,) or one-hot rows (n, C), got shape {y.shape}")
    if lab.size and lab.min() < 0:
        raise ValueError(f"labels must be non-negative class indices, got minimum {lab.min()}")
    return lab




# ------------------------------------------------------------------------------------------------
# the compiled loss: reduction and logits/probabilities
# ------------------------------------------------------------------------------------------------
def _single_loss(model):
    loss = getattr(model, "loss", None)
    if isinstance(loss, dict):
        loss = list(loss.values())
    if isinstance(loss, (list, tuple)):
        if len(loss) != 1:
            used = sum(v is not None for v in loss)
            raise ValueError(f"CREST needs a classifier with one output and one loss; the model has {len(loss)} "
                             f"outputs (compiled with {used} loss(es) for them): build a model of the one output "
                             "you train for CREST's callback, e.g. keras.Model(model.inputs, model.outputs[0]) "
                             "sharing its layers")
        loss = loss[0]
    return loss


def loss_facts(model) -> dict:
    """What the compiled loss tells: ``reduction``, ``from_logits`` (None if unknown), ``crossentropy``."""
    loss = _single_loss(model)
    if loss is None:
        raise ValueError("compile the model with a cross-entropy loss before fit (model.compile(loss=...))")
    if isinstance(loss, str):
        name = loss.lower()
        # ("crossentropy" and "ce": Keras picks the sparse or the categorical one from the targets' shape)
        ce = name in _CE_NAMES or name in ("sparsecategoricalcrossentropy", "categoricalcrossentropy", "crossentropy",
                                           "ce")
        # Keras's string losses take probabilities (from_logits=False)
        return {"reduction": "sum_over_batch_size", "from_logits": False if ce else None, "crossentropy": ce}
    if isinstance(loss, keras.losses.Loss):
        fl = getattr(loss, "from_logits", None)
        if fl is None:
            fl = (getattr(loss, "_fn_kwargs", None) or {}).get("from_logits")
        ce = isinstance(loss, (keras.losses.SparseCategoricalCrossentropy, keras.losses.CategoricalCrossentropy))
        smooth = getattr(loss, "label_smoothing", None)
        if smooth is None:
            smooth = (getattr(loss, "_fn_kwargs", None) or {}).get("label_smoothing", 0.0)
        ignore = getattr(loss, "ignore_class", None)
        if ignore is None:
            ignore = (getattr(loss, "_fn_kwargs", None) or {}).get("ignore_class")
        return {"reduction": loss.reduction, "from_logits": None if fl is None else bool(fl), "crossentropy": ce,
                "label_smoothing": float(smooth or 0.0), "ignore_class": ignore}
    if callable(loss):
        ce = loss in (keras.losses.sparse_categorical_crossentropy, keras.losses.categorical_crossentropy)
        return {"reduction": "sum_over_batch_size", "from_logits": False if ce else None, "crossentropy": ce}
    raise TypeError(f"cannot read the compiled loss {loss!r}")


def _weight_scale(reduction, who: str = "CREST's coreset loss", unweighted: bool = False) -> str:
    """How served weights relate to the controller's: 'as-is' or 'per-batch' (divided by batch size).
    ``unweighted``: every served weight is 1, so a mean over the sample weights is the plain mean."""
    if reduction == "mean_with_sample_weight" and unweighted:
        return "as-is"
    if reduction in ("sum_over_batch_size", "mean"):
        return "as-is"
    if reduction in (None, "none"):
        raise ValueError("the model's loss has reduction=None: fit cannot train on an unreduced loss; compile with "
                         "the default reduction ('sum_over_batch_size')")
    if reduction == "sum":
        return "per-batch"
    if reduction == "mean_with_sample_weight":
        raise ValueError(
            "the model's loss uses reduction='mean_with_sample_weight', which divides by the sum of the "
            f"sample weights: {who} is mean(w_i * l_i) = sum(w_i * l_i) / batch size, and no "
            "rescaling of the weights can undo a division by their sum. Compile with the default reduction "
            "('sum_over_batch_size')."
        )
    raise ValueError(f"unknown loss reduction {reduction!r}")


def _loss_name(loss) -> str:
    """How the error messages name the compiled loss ``loss``: a string as it is, a function by its name, a
    ``keras.losses.Loss`` by its class (and the function a ``LossFunctionWrapper`` wraps)."""
    if isinstance(loss, str):
        return repr(loss)
    fn = getattr(loss, "fn", None) if type(loss).__name__ in ("LossFunctionWrapper", "_Wrapped") else None
    if callable(fn):
        return f"{type(loss).__name__} of {getattr(fn, '__qualname__', None) or getattr(fn, '__name__', repr(fn))}"
    if isinstance(loss, keras.losses.Loss):
        return f"{type(loss).__name__} (a keras.losses.Loss)"
    return getattr(loss, "__qualname__", None) or getattr(loss, "__name__", None) or type(loss).__name__


def _weighing_loss(model):
    """The loss Keras's ``compute_loss`` applies to the sample weights: the model's ``CompileLoss`` (single
    output: no loss-tracking metric, nothing it holds changes when called), or, should a Keras release not
    have it, the compiled loss as Keras wraps it (a function as a ``Loss`` whose ``call`` it is). None for a
    string Keras resolves from the targets' shapes ("crossentropy", "ce": Keras's own cross-entropies,
    which weigh each example)."""
    compiled = getattr(model, "_compile_loss", None)
    if compiled is not None and callable(compiled):
        return compiled
    loss = _single_loss(model)
    if isinstance(loss, str):
        if loss.lower() in ("crossentropy", "ce"):
            return None
        loss = keras.losses.get(loss)
    if not isinstance(loss, keras.losses.Loss):
        class _Wrapped(keras.losses.Loss):  # what Keras's LossFunctionWrapper (not exported) does with it
            def __init__(self, fn):
                super().__init__(name=getattr(fn, "__name__", None))
                self.fn = fn

            def call(self, y_true, y_pred):
                return self.fn(y_true, y_pred)

        loss = _Wrapped(loss)
    return loss


def _losses_under_weights(loss_fn, y_true, y_pred) -> np.ndarray | None:
    """The loss of the rows ``y_true``, ``y_pred`` (host arrays) with all the weight on one row, for every
    row (weights ``B * e_i``, mean 1): the per-example losses for a loss that weighs each example, one value
    repeated for a loss that ignores its weights. None when one is not finite."""
    b = int(y_pred.shape[0])
    yt, yp = kops.convert_to_tensor(y_true), kops.convert_to_tensor(y_pred)
    out = []
    for i in range(b):
        w = np.zeros(b, dtype=np.float32)
        w[i] = b
        out.append(float(np.asarray(kops.convert_to_numpy(loss_fn(yt, yp, kops.convert_to_tensor(w))),
                                    dtype=np.float64).reshape(-1).sum()))
    values = np.array(out)
    return values if np.all(np.isfinite(values)) else None


def _all_equal(values: np.ndarray | None) -> bool | None:
    """True when ``values`` are all one (nonzero) value, False when they differ, None when it cannot be
    told (not finite, or all 0: a loss the probe rows do not reach)."""
    if values is None or not np.any(values):
        return None
    return bool(values.max() - values.min() <= 1e-6 * np.abs(values).max())


def _check_loss_weighs_examples(model, x, y, labels: np.ndarray, who: str) -> None:
    """Refuse a compiled loss that ignores fit's sample weights (review 106): one that reduces over the batch
    itself (a function or ``Loss.call`` returning ``ops.mean(...)``, one value for the batch) makes Keras
    compute ``mean(w) * loss``, so the per-example weights (mean 1) drop out and every step trains
    unweighted. Told from the loss itself, as Keras applies it (:func:`_weighing_loss`): on the model's
    inference outputs for the first (up to) 4 examples, the loss with all the weight on one example and then
    on another must differ. Should those examples' losses all be equal (a model whose outputs do not depend
    on its input yet: zero-initialised), on a row of them with two columns swapped and with its label's
    column raised by 1 (the swap moves the cross-entropy unless the two columns are equal, the raise unless
    they are not). A handful of loss calls on a few rows and one inference forward of 4 examples, under
    ``torch.no_grad`` on torch: no variable, moving statistic or random stream moves (``training=False``
    draws nothing). A probe that fails (an exotic loss or model) or is not finite stays quiet, as does a
    loss whose probe rows all have loss 0: ``fit``'s own step tells what is wrong then."""
    k = min(int(labels.size), 4)
    sel = np.arange(k)
    try:
        loss_fn = _weighing_loss(model)
        if loss_fn is None or k < 1:
            return
        p = _probe_outputs(model, x, k)
        if p is None:
            return
        yt = np.asarray(y)[sel]
        same = _all_equal(_losses_under_weights(loss_fn, yt, p))
        if same is True and p.ndim == 2 and p.shape[1] >= 2:
            c = int(min(max(int(labels[0]), 0), p.shape[1] - 1))
            row = p[0]
            others = np.delete(np.arange(p.shape[1]), c)
            d = int(others[np.argmax(row[others])])
            swapped, raised = row.copy(), row.copy()
            swapped[[c, d]] = row[[d, c]]
            raised[c] += 1
            same = _all_equal(_losses_under_weights(loss_fn, yt[[0, 0, 0]], np.stack([row, swapped, raised])))
    except Exception:  # noqa: BLE001 - the probe failed, not the loss: fit's own step says what is wrong
        return
    if same:
        raise ValueError(
            f"the model's loss {_loss_name(_single_loss(model))} ignores fit's sample weights: it gives the same "
            "value whichever example they put all the weight on, as a loss does that reduces over the batch "
            "itself (returns ops.mean(...) or ops.sum(...), one value for the whole batch). Keras then computes "
            f"mean(weights) * loss, so {who}'s per-example weights (mean 1) drop out and every step would train "
            "unweighted. Return the per-example losses instead, one value per example (shape (batch,)), and let "
            "Keras reduce them with the weights (a Loss subclass's reduction=, default 'sum_over_batch_size')")


def _probe_outputs(model, x, k: int) -> np.ndarray | None:
    """The model's outputs on the first ``k`` examples of ``x`` (an inference forward, under ``torch.no_grad``
    on torch: nothing moves) as a host floating array of ``k`` rows, or None (a nested output)."""
    xb = keras.tree.map_structure(kops.convert_to_tensor, _take(x, np.arange(k)))
    if _backend() == "torch":
        import torch

        with torch.no_grad():
            out = model(xb, training=False)
    else:
        out = model(xb, training=False)
    if not hasattr(out, "shape") or keras.tree.is_nested(out):
        return None
    p = _host_value(out)
    return p if p.dtype.kind == "f" and p.ndim >= 1 and p.shape[0] == k else None


def _check_output_kind(model, x, n: int, kind: str, given: bool) -> None:
    """Where the last layer cannot be read (a subclassed model), the outputs of an inference forward on up to
    16 examples against the loss's ``from_logits``: rows of probabilities (non-negative, summing to 1) under a
    loss that takes logits, or rows that are no probabilities under one that takes probabilities, are warned
    about as a functional model's last layer is (review 131: CREST read logits as probabilities, clipping
    every negative one, silently). Not when ``outputs=`` was given, nor where the forward fails."""
    if given or _last_is_softmax(model) is not None or loss_facts(model)["from_logits"] is None:
        return
    try:
        p = _probe_outputs(model, x, min(16, int(n)))
    except Exception:  # noqa: BLE001 - fit's own step says what is wrong with the model
        return
    if p is None or p.ndim != 2 or p.shape[1] < 2 or not np.isfinite(p).all():
        return
    q = p.astype(np.float64)
    tol = 1e-2 if p.dtype.itemsize <= 2 else 1e-4
    probs = bool((q >= 0).all() and np.abs(q.sum(axis=1) - 1.0).max() <= tol)
    if kind == "logits" and probs:
        warnings.warn("the model's outputs look like probabilities (non-negative rows summing to 1: a softmax last "
                      "layer) but its loss has from_logits=True; CREST takes the outputs as logits (as the loss "
                      "does). Pass outputs= to override.", stacklevel=_common.user_stacklevel())
    elif kind == "probabilities" and not probs:
        warnings.warn("the model's loss takes probabilities (from_logits=False, the default of Keras's "
                      "cross-entropies and their string names) but its outputs are no probabilities (negative "
                      "values, or rows that do not sum to 1: no softmax last layer); CREST takes the outputs as "
                      "probabilities, as the loss does. If they are logits, compile with from_logits=True (or pass "
                      "outputs='logits').",
                      stacklevel=_common.user_stacklevel())


def _warn_other_loss(facts: dict, what: str) -> None:
    """Warn when the compiled loss is not the plain cross-entropy that ``what`` (the measurements of a
    selection) assume: another loss, smoothed labels, an ignored class."""
    if facts["crossentropy"] is False:
        # a focal or binary cross-entropy also has from_logits, but the selection would still measure plain
        # cross-entropy while the model trains on another loss
        warnings.warn(f"the model's loss is not a Keras categorical or sparse categorical cross-entropy: {what} "
                      "assume that cross-entropy of the last layer's outputs (outputs= says whether they are logits "
                      "or probabilities), so they measure a different loss from the one trained; fine for a "
                      "cross-entropy of your own that returns one value per example (a function or a Loss "
                      "subclass: one that takes the batch mean itself drops the sample weights and is refused), "
                      "else expect the selection to serve the cross-entropy, not your loss",
                      stacklevel=_common.user_stacklevel())
    elif facts.get("label_smoothing", 0.0) > 0:
        warnings.warn(f"the model's loss smooths its labels (label_smoothing={facts['label_smoothing']:g}): {what} "
                      "use the unsmoothed cross-entropy, so they measure a different loss from the one trained",
                      stacklevel=_common.user_stacklevel())
    elif facts.get("ignore_class") is not None:
        warnings.warn(f"the model's loss ignores class {facts['ignore_class']} (ignore_class=): {what} count that "
                      "class's examples, so they measure a different loss from the one trained; leave those "
                      "examples out of the data given to them", stacklevel=_common.user_stacklevel())


def _in_call_order(model) -> bool:
    """Whether the model lists its layers in call order (a Sequential or functional model; not a subclassed one)."""
    return isinstance(model, keras.Sequential) or any(c.__name__ == "Functional" for c in type(model).__mro__)


def _last_is_softmax(model) -> bool | None:
    """Whether the model's last layer is a softmax: True or False for a Sequential or functional model
    (their ``operations``, layers and operations such as ``keras.ops.softmax`` alike, are in call order; a
    nested model's own last one is looked at), None when it cannot be told: a subclassed model lists its
    layers in the order they were assigned, not called; a last ``Lambda`` or layer of the user's own runs
    code that cannot be read (review 156: ``Lambda(lambda t: keras.ops.softmax(t / T))`` was told its last
    layer is no softmax; the outputs probe, :func:`_check_output_kind`, decides there)."""
    steps = getattr(model, "operations", None) or getattr(model, "layers", None) or []
    if not _in_call_order(model) or not steps:
        return None
    k = len(steps) - 1
    while k > 0 and type(steps[k]).__name__ == "Cast" and not isinstance(steps[k], keras.layers.Layer):
        k -= 1  # a keras.ops.cast of the outputs (to float32 under mixed precision) is not the last layer
    last = steps[k]
    if isinstance(last, keras.Model):
        return _last_is_softmax(last)
    if isinstance(last, keras.layers.Softmax) or (
            type(last).__name__ == "Softmax" and type(last).__module__.startswith("keras.")):  # keras.ops.softmax
        return True
    act = getattr(last, "activation", None)
    if act is keras.activations.softmax or getattr(act, "__name__", "") == "softmax":
        return True  # (a Dense of the user's own with activation="softmax" too: review 158)
    if isinstance(last, keras.layers.Lambda) or (
            isinstance(last, keras.layers.Layer) and not _keras_module(type(last))):
        return None
    return False


def _check_fit_steps(callback, who: str) -> None:
    """fit(steps_per_epoch=k) other than len(callback.dataset) puts Keras's epochs out of step with the
    callback's (it runs out of data, and the budget report counts other epochs): refused, except for ``k`` =
    the steps left of an epoch that an earlier fit stopped inside (a checkpoint taken mid-epoch, a fit
    that stopped): a fit of one epoch that finishes it (a second epoch of such a fit is refused when it
    begins). A fit of whole epochs that starts inside one is warned about: its epochs and the run's stay
    that many steps apart, so a fit to the planned last epoch trains more or fewer steps than planned."""
    spe = len(callback.dataset)
    done = callback._position % spe
    steps = (callback.params or {}).get("steps")
    callback._finishing = False
    callback._fit_epochs = 0
    x = "crest" if who == "CrestCallback" else "sub"
    frame = _keras_loop()[0]
    if frame is not None and frame.f_locals.get("validation_data") is callback.dataset:
        # refused at the start, not after a training epoch when Keras's validation first reads it (review 97)
        raise RuntimeError("fit(validation_data=...) is this callback's dataset: " + callback._REFUSAL)
    if steps is not None and int(steps) != spe:
        if done and int(steps) == spe - done:
            callback._finishing = True
            return
        raise ValueError(f"fit runs {steps} steps an epoch, but {who} serves {len(callback.dataset)} (len of its "
                         f"dataset): pass the callback's dataset as fit's x (model.fit(crest.dataset, ...)) and leave "
                         "steps_per_epoch out (the budget sets the steps)"
                         + (f"; only the epoch an earlier fit stopped inside, after {done} of its {spe} steps, is "
                            f"finished by a fit of one epoch with steps_per_epoch={spe - done}: model.fit({x}.dataset, "
                            f"initial_epoch=e, epochs=e + 1, steps_per_epoch={spe - done}, ...)"
                            if done else ""))
    if done and not getattr(callback, "_rollback", False):  # (a rollback: said when its first epoch begins)
        k = callback._position // spe
        warnings.warn(
            f"{who} has trained {callback._position} steps, {done} into an epoch of {spe} (a checkpoint taken "
            f"inside an epoch, or a fit that stopped there), and this fit runs whole epochs of {spe} steps: its "
            f"epochs stay {done} steps apart from the run's, so a fit to the planned last epoch trains {done} steps "
            f"more than planned (from initial_epoch={k}) or {spe - done} fewer (from initial_epoch={k + 1}). "
            f"Finish the interrupted epoch first, model.fit({x}.dataset, initial_epoch={k}, epochs={k + 1}, "
            f"steps_per_epoch={spe - done}, ...), then continue with initial_epoch={k + 1}",
            stacklevel=_common.user_stacklevel())


def _keras_loop(own=None):
    """``(frame, name, model, looked)`` of the innermost Keras loop (``fit``, ``evaluate`` or ``predict`` of a
    ``keras.Model``) on this thread's stack, or ``(None, None, None, False)``. ``looked``: whether a method of
    a Keras callback other than ``own`` runs between that loop and here: a callback (``on_epoch_begin``
    logging a sample batch, say) reading the dataset, which Keras's own data fetches never do."""
    f = sys._getframe(1)
    looked = False
    while f is not None:
        obj = f.f_locals.get("self")
        if f.f_code.co_name in ("fit", "evaluate", "predict") and isinstance(obj, keras.Model):
            return f, f.f_code.co_name, obj, looked
        looked = looked or (isinstance(obj, keras.callbacks.Callback) and obj is not own)
        f = f.f_back
    return None, None, None, False


def _check_one_step_per_execution(model, who: str) -> None:
    """Refuse ``model.compile(steps_per_execution=k)`` with k > 1 (at the fit's start, and at Keras's build fetch,
    which on torch fetches a whole execution's batches before any hook runs: review 156)."""
    spe = getattr(model, "steps_per_execution", 1)
    if spe not in (None, 1):
        raise ValueError(f"{who} needs model.compile(steps_per_execution=1), got {spe}: several steps per "
                         "execution fetch their batches before the steps before them have trained")


def _fit_has(frame, callback, every: bool = False):
    """Whether the ``fit`` running in ``frame`` (from :func:`_keras_loop`) has ``callback`` among its
    callbacks (``callback`` a class: one of that class), as the callback found (truthy) or False (``every``:
    the list of all found, empty for none): its ``callbacks`` argument (the user's list, or the
    ``CallbackList`` Keras makes of it), with lists, tuples, dicts and ``CallbackList`` objects unwrapped at
    any depth, and a user's callback's own attributes looked into (one that forwards its hooks to callbacks
    it holds, review 73); None when the ``callbacks`` cannot be read (the frame of another ``fit``
    signature)."""
    if frame is None or "callbacks" not in frame.f_locals:
        return None
    def holders(items):  # what may hold a callback: containers and callbacks, not the values a list records
        return [v for v in items if isinstance(v, (list, tuple, dict, keras.callbacks.Callback))]

    stack, seen, found = [frame.f_locals["callbacks"]], set(), []
    while stack:
        c = stack.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        if c is callback or (isinstance(callback, type) and isinstance(c, callback)):
            if not every:
                return c
            found.append(c)
            continue
        if len(seen) > 10_000:
            return None  # too much to look through: not known (the fetch count decides)
        if isinstance(c, (list, tuple)):
            stack.extend(holders(c))
        elif isinstance(c, dict):
            stack.extend(holders(c.values()))
        elif isinstance(c, keras.callbacks.Callback):
            inner = getattr(c, "callbacks", None)
            if isinstance(inner, (list, tuple)):  # a CallbackList (Keras's, or one nested in the list)
                stack.extend(holders(inner))
            if not type(c).__module__.startswith(("keras.", "crestcore.")):  # a user's: what it holds
                stack.extend(holders(v for k, v in vars(c).items() if k not in ("model", "_model", "params")))
    return found if every else False


def _backup_in_fit(who: str) -> bool:
    """Whether this ``fit`` has a ``BackupAndRestore`` (which may roll the weights back behind the run; said at
    the first epoch). One that backs up inside epochs (``save_freq=<steps>``) is warned about now: Keras
    resumes such a backup at its epoch's first batch, so the run trains that epoch's steps before the backup
    again and goes on out of step (review 143: weights 0.016 from the uninterrupted run's, silently)."""
    backups = _fit_has(_keras_loop()[0], keras.callbacks.BackupAndRestore, every=True) or []
    freq = next((b.save_freq for b in backups if getattr(b, "save_freq", "epoch") != "epoch"), "epoch")
    if freq != "epoch":  # (every one looked at: review 144 found a second one hid the first)
        warnings.warn(
            f"{who}: BackupAndRestore(save_freq={freq!r}) backs up inside epochs, and Keras resumes such a backup "
            "at the start of its epoch: the run would train that epoch's batches before the backup again and go on "
            "out of step with the uninterrupted run. Back up at epochs' ends (save_freq='epoch', its default) and "
            f"save the callback's state_dict() with it", stacklevel=_common.user_stacklevel())
    return bool(backups)


def _fit_epoch_begins(callback, who: str, epoch: int | None = None) -> None:
    """A fit that finishes an interrupted epoch (``steps_per_epoch`` = its steps left) runs one epoch: its
    second is refused when it begins. A fit whose first epoch is ahead of the run's next one and that ends
    before the run's plan does (Keras's ``BackupAndRestore`` resuming a new process at a later epoch, or
    ``fit(initial_epoch=...)`` with the callback's state not loaded) is warned about: the callback plans its
    run from its own position, so Keras's later epochs train the run's first ones and part of its budget
    is never trained."""
    callback._fit_epochs += 1
    spe = len(callback.dataset)
    last = (callback.params or {}).get("epochs")
    k = callback._position // spe if spe else 0
    if (callback._fit_epochs == 1 and epoch is not None and spe and not callback._finishing
            and int(epoch) * spe < callback._position and (int(epoch) > 0 or getattr(callback, "_rollback", False))):
        # behind the run (a loop of fits from epoch 0 that continue it is a usage): the weights rolled back
        # (BackupAndRestore retrying in the same process restores the last finished epoch's) while the
        # callback goes on from its own position (review 79: it served steps the restored weights had not
        # trained from, skipped the ones in between and ran past its plan, silently at an epoch's end)
        x = "crest" if who == "CrestCallback" else "sub"
        warnings.warn(
            f"Keras starts this fit at epoch {int(epoch)} (step {int(epoch) * spe} of the run), but {who} has "
            f"trained {callback._position} steps: the model's weights were rolled back (keras.callbacks."
            f"BackupAndRestore restores its last backup after a failure: the last finished epoch's, or with "
            f"save_freq=<steps> one taken inside an epoch, which Keras then starts again at its first batch), and "
            f"{who} cannot roll back with them, so it continues from its own position: the steps since the backup "
            f"are not trained again from the restored weights, and the fit trains past the run's plan. To resume "
            f"in step, back up at epochs' ends only (save_freq='epoch'), save {x}.state_dict() with the weights at "
            f"every epoch's end and call {x}.load_state_dict() with the one the weights came from before the fit "
            "(BackupAndRestore saves the model only)",
            stacklevel=_common.user_stacklevel())
    if (callback._fit_epochs == 1 and epoch is not None and not callback._finishing and spe
            and callback._position % spe == 0 and int(epoch) > k
            and last is not None and callback.epochs is not None and int(last) - int(epoch) < int(callback.epochs) - k):
        # only a fit ahead of the run (fits from epoch 0 that continue it, one per epoch in a loop, are a
        # usage) that ends before the run's plan does: a fit of the epochs the run plans (a warm-up without
        # the callback, then CrestCallback(epochs=2) with fit(initial_epoch=2, epochs=4)) is the run
        x = "crest" if who == "CrestCallback" else "sub"
        warnings.warn(
            f"Keras starts this fit at epoch {int(epoch)}, but {who}'s run is at its epoch {k} ({callback._position} "
            f"steps trained): its epochs {k}, {k + 1}, ... train as Keras's {int(epoch)}, {int(epoch) + 1}, ..., and its "
            f"budget report counts its own. To continue a saved run (a checkpoint, or keras.callbacks."
            f"BackupAndRestore), call {x}.load_state_dict() with the state saved at that epoch before fit "
            f"({x}.state_dict() saved alongside the weights); to start a new run, leave initial_epoch out",
            stacklevel=_common.user_stacklevel())
    if (epoch is not None and spe and callback.epochs is not None and not callback._finishing
            and callback._position >= int(callback.epochs) * spe and not callback._past_plan_said
            and callback._plan_given):
        # a plan given (epochs=, or a loaded run's), not one taken from the first fit's epochs (fits that go on
        # after it continue the run); the message of a loaded state with a longer plan names this warning
        # (review 97: there was none)
        callback._past_plan_said = True
        warnings.warn(
            f"{who}: Keras begins an epoch past the run's plan: {who} planned {int(callback.epochs)} epochs "
            f"({int(callback.epochs) * spe} steps) and has trained {callback._position}. It goes on serving its "
            "budget's share of each epoch, and its budget report (stats['budget']) counts the longer run. Build it "
            "with epochs= the run's length to plan them (a fit that continues a loaded state: fit(initial_epoch=...) "
            "at the saved epoch, up to the planned epochs)", stacklevel=_common.user_stacklevel())
    if callback._finishing and callback._fit_epochs > 1:
        steps = (callback.params or {}).get("steps")
        raise ValueError(f"fit(steps_per_epoch={steps}) finished the epoch an earlier fit had stopped inside; "
                         f"{who} serves whole epochs of {len(callback.dataset)} steps after it: run that fit for "
                         "one epoch (epochs=initial_epoch + 1) and the next fits without steps_per_epoch")


def _columns_error(cols: int) -> ValueError:
    return ValueError(f"the model returns {cols} output column(s): CREST needs one column per class "
                      "(at least 2). For a binary classifier, end with Dense(2) and a (sparse) categorical "
                      "cross-entropy instead of one sigmoid unit")


def resolve_outputs(model, outputs: str | None, who: str = "CrestCallback") -> str:
    """'logits' or 'probabilities': the option when given, else the compiled loss's ``from_logits``,
    else a softmax last layer means probabilities; otherwise a ``ValueError`` asks ``who`` (the callback)
    for the option. A model with one output column (a sigmoid binary classifier) is refused first, since
    no option makes it usable."""
    shape = getattr((getattr(model, "outputs", None) or [None])[0], "shape", None)
    if shape is not None and len(shape) == 2 and shape[-1] is not None and int(shape[-1]) < 2:
        raise _columns_error(int(shape[-1]))
    if outputs is not None:
        if outputs not in ("logits", "probabilities"):
            raise ValueError(f"outputs must be 'logits', 'probabilities' or None (detect), got {outputs!r}")
        return outputs
    fl = loss_facts(model)["from_logits"]
    if fl is not None:
        kind = "logits" if fl else "probabilities"
        soft = _last_is_softmax(model)  # None: not known (a subclassed model), so no warning either way
        if fl and soft:
            warnings.warn("the model's last layer is a softmax but its loss has from_logits=True; CREST takes the "
                          "outputs as logits (as the loss does). Pass outputs= to override.",
                          stacklevel=_common.user_stacklevel())
        elif not fl and soft is False:
            warnings.warn("the model's loss takes probabilities (from_logits=False, the default of Keras's "
                          "cross-entropies and their string names) but its last layer is no softmax; CREST takes "
                          "the outputs as probabilities, as the loss does. If they are logits, compile with "
                          "from_logits=True (or pass outputs='logits').", stacklevel=_common.user_stacklevel())
        return kind
    soft = _last_is_softmax(model)
    if soft:
        return "probabilities"
    last = ("the last layer is no softmax" if soft is False else
            "its last layer, a Lambda or a layer of your own, runs code that cannot be read" if _in_call_order(model)
            else "a subclassed model's last layer cannot be read from model.layers, whose order is the assignment's")
    raise ValueError(
        "cannot tell whether the model's last layer gives logits or probabilities (the loss is not a Keras "
        f"cross-entropy with from_logits, and {last}): pass "
        f"{who}(..., outputs='logits') or outputs='probabilities'"
    )


def _host_value(x) -> np.ndarray:
    """A host NumPy copy of a variable's value: a torch tensor by ``detach().cpu()`` (NumPy's ``np.array`` on
    a torch Parameter, which Keras's ``convert_to_numpy`` falls back to, warns on every call), bfloat16 as
    float32; anything else through ``keras.ops.convert_to_numpy``."""
    if callable(getattr(x, "detach", None)):
        t = x.detach().cpu()
        try:
            return t.numpy().copy()
        except TypeError:  # bfloat16: no NumPy dtype
            return t.float().numpy()
    return np.array(kops.convert_to_numpy(x))


def _variable_values(ops):
    """The current non-trainable values where the variables are the weights (torch and the generic
    backends), not the anchor's."""
    return [v.value for v in ops.model.non_trainable_variables]


def _moving_statistic(variable) -> bool:
    """Whether a non-trainable variable is a normalisation layer's moving statistic, which the training
    steps move by themselves (Keras's BatchNormalization names them ``moving_mean``, ``moving_variance``)."""
    name = str(getattr(variable, "name", "")).rsplit("/", 1)[-1]
    return name in ("moving_mean", "moving_variance") and "float" in str(getattr(variable, "dtype", "float"))


def _anchor_items(ops) -> list:
    """``(position now, kept value)`` of the anchor's non-trainable values (``KerasModelOps.new_anchor``):
    matched to the very variables the anchor read, so that a layer frozen or unfrozen since (which moves
    the positions in ``non_trainable_variables``) does not put one variable's value into another of the
    same shape (variable paths can repeat: two layers given one name); by position for an anchor restored
    from a checkpoint (the same model, rebuilt)."""
    kept = ops._anchor or {}
    held = ops._anchor_vars
    variables = ops.model.non_trainable_variables
    if held is None:  # by position: only onto moving statistics (a checkpoint of an older version kept more)
        return [(i, a) for i, a in kept.items() if i < len(variables) and _moving_statistic(variables[i])]
    now = {id(v): j for j, v in enumerate(variables)}
    return [(now[id(held[i])], a) for i, a in kept.items() if i < len(held) and id(held[i]) in now]


@contextlib.contextmanager
def _assigned_anchor(ops):
    """The anchor's moving statistics (BatchNormalization's, kept by ``KerasModelOps.new_anchor``) in the
    variables for a measurement, the current ones back afterwards
    (torch and the generic backends; jax hands them to its stateless calls instead)."""
    if not ops._anchor:
        yield
        return
    variables = ops.model.non_trainable_variables
    saved = {}
    for i, a in _anchor_items(ops):
        if i < len(variables) and tuple(variables[i].shape) == a.shape:
            saved[i] = _host_value(variables[i].value)
            variables[i].assign(a.astype(saved[i].dtype, copy=False))
    try:
        yield
    finally:
        for i, v in saved.items():
            variables[i].assign(v)


def _check_reached(used: bool) -> None:
    """Refuse a measurement in which no trainable variable got a gradient (the model's output does not
    depend on any with ``training=False``): the quadratic model would be fitted to zeros."""
    if not used:
        raise RuntimeError(
            "no trainable variable gets a gradient in CREST's measurements, which call the model with "
            "training=False: the quadratic model and the trust checks have nothing to fit. A layer whose "
            "trainable weights take part in training mode only cannot be measured so")


def _crossentropy(out, y, from_probabilities: bool):
    """Per-example cross-entropy with keras.ops (works on torch tensors with their graph, and inside jax.jit)."""
    out = kops.cast(out, "float32")
    if from_probabilities:
        return -kops.take_along_axis(_log_probabilities(out), y[:, None], axis=1)[:, 0]
    z = out - kops.max(out, axis=1, keepdims=True)
    return kops.logsumexp(z, axis=1) - kops.take_along_axis(z, y[:, None], axis=1)[:, 0]


def _check_finite_np(a: np.ndarray, what: str):
    bad = ~np.isfinite(a)
    if bad.any():
        rows = int(bad.reshape(bad.shape[0], -1).any(axis=1).sum()) if a.ndim else 1
        neg_inf = not bool((np.isnan(a) | (a == np.inf)).any())
        raise _common.measurement_error(what, rows, a.shape[0] if a.ndim else 1, neg_inf=neg_inf)


# ------------------------------------------------------------------------------------------------
# model operations
# ------------------------------------------------------------------------------------------------
class KerasModelOps:
    """The controller's :class:`crestcore.ModelOps` for a compiled Keras classifier and in-memory data.

    Parameters
    ----------
    model : a built ``keras.Model`` whose output is (batch, C) logits or probabilities.
    x : the inputs, an array (n, ...) or a dict / list of arrays (multi-input models), anything NumPy
        reads (torch and jax arrays and TensorFlow tensors included). NumPy arrays and CPU torch tensors
        are read in place, not copied: changing them during fit changes what CREST serves; device arrays
        are copied to the host once.
    labels : (n,) integer class indices.
    outputs : "logits" or "probabilities" (the model's last layer). Probabilities ``p`` are handed to
        the controller as ``log(clip(p / sum p, eps, 1 - eps))`` with Keras's ``epsilon()``, as Keras's own
        probability cross-entropy takes them (docs/keras.md).
    batch_size : examples per forward in measurement passes (memory; a measurement's last float bits may
        change with it, as the reductions' order does).
    last_layer : for ``outputs(..., embeddings=True)``: the ``Dense`` layer (or its name) whose input is
        the penultimate embedding; default the model's last layer. Sequential and functional models only.

    Return types: on torch, torch tensors on Keras's device; on jax, host NumPy arrays (copies, so
    nothing the jitted train step donates is kept). Hutchinson probes ``z`` are drawn with NumPy from
    ``seed``, identical on every backend and device. NaN or infinite outputs raise ``FloatingPointError``.

    Examples
    --------
    Drive the controller by hand (:class:`CrestCallback` does this inside ``fit``). The examples of this
    module take their model and data from ``_example_problem()``: a compiled linear classifier and 64
    points of two classes (:class:`CrestCallback`'s example builds the same by hand):

    >>> model, x, y = _example_problem()
    >>> from crestcore import CrestConfig, crest_init, crest_next_batch
    >>> ops = KerasModelOps(model, x, y)
    >>> config = CrestConfig(m=8)
    >>> state, batch = crest_next_batch(crest_init(config, ops.labels, seed=0), ops, config)
    >>> batch.indices.shape, batch.reselected
    ((8,), True)
    """

    def __init__(self, model, x, labels, *, outputs: str = "logits", batch_size: int = 512, last_layer=None):
        self.backend = _backend()
        if outputs not in ("logits", "probabilities"):
            raise ValueError(f"outputs must be 'logits' or 'probabilities', got {outputs!r}")
        _common.check_count(batch_size, "batch_size")
        self.model = model
        self.x, self.n = _as_inputs(x)
        lab = np.asarray(labels)
        if lab.shape != (self.n,) or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"labels must be (n,) = ({self.n},) integers, got shape {lab.shape}, dtype {lab.dtype}")
        self.labels = int64_labels(lab)
        self.from_probabilities = outputs == "probabilities"
        self.batch_size = int(batch_size)
        self._last_layer = last_layer
        self._emb_model = None
        self._pinned = None
        self._compiled = None  # the backend's compiled functions (jax), made on first use
        self._impl = _implementation(self.backend)
        self._anchor: dict | None = None  # index in non_trainable_variables -> its value at the last new_anchor
        self._anchor_vars: tuple | None = None  # those variables (held: their ids stay theirs; None: by position)

    # -- the trainable weights ------------------------------------------------------------------
    def _tvars(self):
        tv = list(self.model.trainable_variables)
        if not tv:
            raise ValueError("the model has no trainable weights (is it built?): nothing to train")
        return tv

    def pin(self) -> None:
        """Remember where the weights of the upcoming step are (jax; a reference, no copy). Called by
        :class:`CrestCallback` at ``on_train_batch_begin`` and cleared at ``on_train_batch_end``.

        Examples
        --------
        >>> model, x, y = _example_problem()  # a linear classifier and 64 examples of two classes
        >>> ops = KerasModelOps(model, x, y)
        >>> ops.pin()  # the weights the next step starts from
        >>> tuple(ops.params().shape)
        (10,)
        >>> ops.unpin()
        """
        self._pinned = None
        self._pinned = self._impl.pinned(self)

    def unpin(self) -> None:
        """Forget the weights :meth:`pin` remembered: measurements read the model's current weights again.

        Examples
        --------
        >>> import numpy as np
        >>> model, x, y = _example_problem()  # a linear classifier and 64 examples of two classes
        >>> ops = KerasModelOps(model, x, y)
        >>> ops.pin()
        >>> ops.unpin()
        >>> tuple(ops.outputs(np.arange(3)).shape)
        (3, 2)
        """
        self._pinned = None

    def params(self):
        """A copy of the flat trainable weights (D,), in ``model.trainable_variables`` order.

        Examples
        --------
        >>> import numpy as np
        >>> import keras
        >>> model, x, y = _example_problem()  # a linear classifier and 64 examples of two classes
        >>> ops = KerasModelOps(model, x, y)
        >>> w = ops.params()  # the Dense kernel (4 x 2), then its bias (2)
        >>> tuple(w.shape)
        (10,)
        >>> bool(np.allclose(keras.ops.convert_to_numpy(w)[8:], 0.0))  # the bias starts at zero
        True
        """
        return self._impl.params(self)

    def _dtype_np(self):
        """The probes' NumPy dtype: the dtype of the weights' values as :meth:`params` gives them (jax keeps
        float32 values for a float64 variable without JAX_ENABLE_X64), float32 for bfloat16 and other
        dtypes NumPy does not have natively (ml_dtypes' bfloat16 would not convert to a torch tensor)."""
        name = keras.backend.standardize_dtype(self.params().dtype)
        return np.dtype(name) if name in ("float16", "float32", "float64") else np.dtype(np.float32)

    def rademacher(self, seed: int) -> np.ndarray:
        """The probe ``z`` (D,) of :meth:`hutchinson`: +-1 from ``numpy.random.default_rng(seed)``.

        Examples
        --------
        >>> import numpy as np
        >>> model, x, y = _example_problem()  # a linear classifier and 64 examples of two classes
        >>> ops = KerasModelOps(model, x, y)
        >>> z = ops.rademacher(seed=3)
        >>> z.shape, sorted(set(z.tolist())), bool(np.array_equal(z, ops.rademacher(seed=3)))
        ((10,), [-1.0, 1.0], True)
        """
        D = sum(int(np.prod(v.shape)) for v in self._tvars())
        bits = np.random.default_rng(int(seed)).integers(0, 2, size=D, dtype=np.int8)
        return (bits.astype(self._dtype_np()) * 2 - 1)

    # -- helpers --------------------------------------------------------------------------------
    def _check_out(self, out, k: int):
        if not hasattr(out, "shape"):
            inner = (f" with {len(out)} entr{'y' if len(out) == 1 else 'ies'} ({', '.join(map(repr, out))})"
                     if isinstance(out, dict) else f" of {len(out)}" if isinstance(out, (list, tuple)) else "")
            raise ValueError(f"the model must return one (batch, classes) output tensor; got a {type(out).__name__}"
                             f"{inner} (CREST needs a classifier with one output: build the model with the logits "
                             "or probabilities themselves as its output, e.g. keras.Model(inputs, logits), not in "
                             "a dict or list)")
        shape = tuple(out.shape)
        if len(shape) != 2 or shape[0] != k:
            raise ValueError(f"the model must return (batch, classes) outputs; got shape {shape} for {k} examples")
        if shape[1] < 2:
            raise _columns_error(shape[1])

    def _to_logits_np(self, out: np.ndarray) -> np.ndarray:
        out = out.astype(np.float32, copy=False)
        if self.from_probabilities:
            eps = np.float32(_clip_eps())
            with np.errstate(divide="ignore", invalid="ignore"):
                p = out / out.sum(axis=1, keepdims=True)
            return np.log(np.clip(p, eps, 1 - eps))
        return out

    def _embedding_model(self):
        if self._emb_model is not None:
            return self._emb_model
        m = self.model
        if not getattr(m, "inputs", None) or not getattr(m, "outputs", None):
            raise ValueError("embeddings=True needs a Sequential or functional Keras model (subclassed models "
                             "have no graph to read the penultimate embedding from)")
        layer = self._last_layer if self._last_layer is not None else m.layers[-1]
        if isinstance(layer, str):
            layer = m.get_layer(layer)
        if not isinstance(layer, keras.layers.Dense):
            raise ValueError(f"embeddings=True needs the classifier to be a Dense layer (got "
                             f"{type(layer).__name__}); pass last_layer=")
        inputs = m.inputs[0] if len(m.inputs) == 1 else m.inputs
        self._emb_model = keras.Model(inputs, [layer.input, m.outputs[0]])
        return self._emb_model

    def preflight(self, embeddings: bool = False) -> int | None:
        """What the first measurement would refuse, checked before any: the backend's own preflight on the
        first examples (on jax, by abstract evaluation before Keras's trainer detaches the variables; nothing
        on the other backends, where a refusal at the first selection leaves the weights in place). Returns
        the model's output width where it was read, else None.

        Examples
        --------
        >>> model, x, y = _example_problem()  # a linear classifier and 64 examples of two classes
        >>> ops = KerasModelOps(model, x, y)
        >>> ops.preflight() in (None, 2)  # 2 on jax, None on torch
        True
        """
        return self._impl.preflight(self, np.arange(min(self.n, 8), dtype=np.int64), _common.check_bool(
            embeddings, "embeddings"))

    def new_anchor(self) -> None:
        """Keep the normalisation layers' moving statistics as they are now (BatchNormalization's
        ``moving_mean`` and ``moving_variance``, and any variable of those names): the measurements until
        the next anchor run with them, so the statistics the training steps move between the anchor and a
        check do not count as the quadratic model's error. Other non-trainable values (a frozen layer, a
        temperature the loop anneals) are measured as they are. The controller calls this at every
        selection.

        Examples
        --------
        >>> model, x, y = _example_problem()  # a linear classifier: no non-trainable weights to keep
        >>> ops = KerasModelOps(model, x, y)
        >>> ops.new_anchor()
        >>> ops._anchor
        {}
        """
        kept = {}
        variables = self.model.non_trainable_variables
        for i, v in enumerate(self._impl.live_non_trainable(self)):
            if i < len(variables) and _moving_statistic(variables[i]):
                kept[i] = _host_value(v)
        self._anchor = kept
        self._anchor_vars = tuple(variables)

    # -- ModelOps: outputs ----------------------------------------------------------------------
    def outputs(self, indices, embeddings: bool = False):
        """Inference-mode logits (k, C) for ``indices`` (float32; ``log p`` for probability outputs);
        with ``embeddings=True`` also the input of the last Dense layer (k, h).

        Examples
        --------
        >>> import numpy as np
        >>> model, x, y = _example_problem()  # a linear classifier and 64 examples of two classes
        >>> ops = KerasModelOps(model, x, y)
        >>> tuple(ops.outputs(np.array([0, 5, 7])).shape)
        (3, 2)
        >>> logits, embeddings = ops.outputs(np.array([0, 5, 7]), embeddings=True)
        >>> tuple(embeddings.shape)  # the Dense layer's input: the 4 features here
        (3, 4)
        """
        with self._impl.measuring(self):
            return self._impl.outputs(self, host_indices(indices, self.n), embeddings)

    def _host_outputs(self, idx: np.ndarray, embeddings: bool, call):
        """Host float32 logits (and embeddings) of ``idx`` by chunks; ``call(chunk)`` gives
        ``(embeddings or None, outputs)`` of at least the chunk's rows (a backend may pad)."""
        logits, embs = [], []
        for a, b in _common.chunk_spans(idx.size, self.batch_size):
            k = b - a
            e, out = call(idx[a:b])
            out = np.asarray(kops.convert_to_numpy(out))[:k]
            self._check_out(out, k)
            logits.append(self._to_logits_np(out))
            if embeddings:
                embs.append(np.asarray(kops.convert_to_numpy(e), dtype=np.float32)[:k].reshape(k, -1))
        if not logits:
            raise ValueError("outputs needs at least one index")
        z = np.concatenate(logits)
        _check_finite_np(z, "outputs")
        return (z, np.concatenate(embs)) if embeddings else z

    def losses(self, indices):
        """Inference-mode per-example cross-entropy (k,) at the current weights (host NumPy float64).

        Examples
        --------
        >>> import numpy as np
        >>> model, x, y = _example_problem()  # a linear classifier and 64 examples of two classes
        >>> ops = KerasModelOps(model, x, y)
        >>> losses = ops.losses(np.array([0, 1, 2]))
        >>> losses.shape, losses.dtype, bool((losses > 0).all())
        ((3,), dtype('float64'), True)
        """
        idx = host_indices(indices, self.n)
        z = np.asarray(kops.convert_to_numpy(self.outputs(idx)), dtype=np.float64)
        y = self.labels[idx]
        if self.from_probabilities:  # z = log(clip(p)): Keras's loss is -z_y (see example_losses)
            return -z[np.arange(idx.size), y]
        zs = z - z.max(axis=1, keepdims=True)
        return np.log(np.exp(zs).sum(axis=1)) - zs[np.arange(idx.size), y]

    def example_losses(self, logits, labels):
        """The per-example training loss of the controller's logits (:class:`crestcore.ModelOps`): for a
        model returning probabilities, whose logits here are ``log(clip(p / sum p, eps, 1 - eps))``, the
        loss Keras trains, ``-log clip(p_y)`` (the cross-entropy of those logits, ``log(sum clip(p)) -
        log clip(p_y)``, is larger by up to ``(C - 1) eps`` where classes are clipped up to ``eps``: 1e-4
        against a loss of 1.2e-7 for a confident 1,000-class example, review 116); None for logits (the
        controller's cross-entropy is Keras's then).

        Examples
        --------
        >>> import numpy as np
        >>> model, x, y = _example_problem()
        >>> ops = KerasModelOps(model, x, y)
        >>> ops.example_losses(np.zeros((2, 2)), np.array([0, 1])) is None  # logits: the controller's own
        True
        >>> probs = KerasModelOps(model, x, y, outputs="probabilities")
        >>> probs.example_losses(np.log(np.array([[0.25, 0.75], [0.5, 0.5]])), np.array([1, 0])).round(4).tolist()
        [0.2877, 0.6931]
        """
        if not self.from_probabilities:
            return None
        import array_api_compat

        xp = array_api_compat.array_namespace(logits, labels)  # host NumPy, or the backend's tensors
        k, C = logits.shape
        pos = xp.arange(k, dtype=labels.dtype, device=array_api_compat.device(logits)) * C + labels
        return -xp.take(xp.reshape(logits, (-1,)), pos, axis=0)

    # -- ModelOps: gradient and Hutchinson ------------------------------------------------------
    def gradient(self, indices, weights):
        """``(loss, flat gradient)`` of ``mean_i(w_i * l_i)`` (cross-entropy, inference mode) over ``indices``.

        Examples
        --------
        A weight of 0 removes an example; here the loss is example 0's:

        >>> import numpy as np
        >>> model, x, y = _example_problem()  # a linear classifier and 64 examples of two classes
        >>> ops = KerasModelOps(model, x, y)
        >>> loss, grad = ops.gradient(np.array([0, 1]), np.array([2.0, 0.0]))
        >>> tuple(grad.shape), abs(loss - float(ops.losses(np.array([0]))[0])) < 1e-5
        ((10,), True)
        """
        _require_supported("gradients of the weighted coreset loss", self.backend)
        idx, w = _common.weighted_examples(indices, weights, self.n, "gradient")
        with self._impl.measuring(self):
            return self._impl.gradient(self, idx, w)

    def hutchinson(self, indices, weights, seed: int):
        """One Hutchinson probe ``z * (H z)`` of the weighted loss's Hessian, ``z`` = :meth:`rademacher`.

        Examples
        --------
        >>> import numpy as np
        >>> model, x, y = _example_problem()  # a linear classifier and 64 examples of two classes
        >>> ops = KerasModelOps(model, x, y)
        >>> probe = ops.hutchinson(np.arange(16), np.ones(16), seed=0)
        >>> tuple(probe.shape)
        (10,)
        """
        _require_supported("Hessian-vector products (the Hutchinson probe)", self.backend)
        idx, w = _common.weighted_examples(indices, weights, self.n, "hutchinson")
        with self._impl.measuring(self):
            return self._impl.hutchinson(self, idx, w, self.rademacher(seed))


# ------------------------------------------------------------------------------------------------
# the dataset and the callback
# ------------------------------------------------------------------------------------------------
_LOSS_CALLS = {"compute_loss": 4, "_compute_loss": 4, "compiled_loss": 3, "loss": 3}  # the weights' position
_BATCH_LOOKS = ("unpack_x_y_sample_weight", "len", "isinstance", "type")  # calls that do not hand the batch on


# calls whose sample_weight weighs a metric, not the loss (_step_passes_weights): a metric's, JAX's stateless one,
# the model's compute_metrics (review 167)
_METRIC_CALLS = frozenset({"update_state", "stateless_update_state", "compute_metrics"})


def _call_name(call) -> str:
    f = call.func
    return f.attr if type(f).__name__ == "Attribute" else f.id if type(f).__name__ == "Name" else ""


def _step_passes_weights(source: str) -> bool | None:
    """Whether the source of a ``train_step(self, data)`` hands fit's sample weights on (review 106), read
    from its syntax tree: True when any of

    * a call gets a ``sample_weight=`` keyword other than ``None`` (``compute_loss(..., sample_weight=sw)``,
      ``self.compiled_loss(y, y_pred, sample_weight=sw)``, a loss object's);
    * ``compute_loss`` gets a fourth positional argument, or ``compiled_loss`` / ``loss`` (``self.loss(y,
      y_pred, sw)``) a third;
    * a name the weights were unpacked into is read again: the third target of
      ``x, y, sw = keras.utils.unpack_x_y_sample_weight(data)`` (or ``= data``, ``= data[:3]``), ``sw = data[2]``
      or ``data[-1]``, any name of an unpacking with a starred target (``x, *rest = data``);
    * ``data[2]``, ``data[-1]``, a slice holding them, or an index that is not a constant is read other
      than into such a name;
    * the batch itself is handed to a call other than ``unpack_x_y_sample_weight``, ``len``, ``isinstance``
      or ``type`` (``super().train_step(data)``), or read in any other way than those, indexed, or unpacked.

    The step's batch is its last parameter without a default (``data``: ``train_step(self, data)`` on torch
    and TensorFlow, ``train_step(self, state, data)`` on JAX; review 112: the JAX form's ``state`` was read
    as the batch). False otherwise, so these are caught: ``x, y =
    data[0], data[1]`` (or ``= data``); ``x, y, _ = unpack_x_y_sample_weight(data)``; ``sample_weight``
    unpacked and then never read (left out of ``compute_loss``, or ``sample_weight=None``). What a metric's
    ``update_state`` (or ``stateless_update_state``, or the model's ``compute_metrics``) is given does not
    count (review 160: a step whose loss is a loss object of its own, called without the weights, and which
    handed them to its metrics only, trained unweighted, silently). None when the source does not parse."""
    import ast
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return None
    fn = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))),
              None)
    if fn is None:
        return None
    params = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    required = params[:len(params) - len(fn.args.defaults)]  # an extra parameter with a default is not the batch
    batch = required[-1] if len(required) >= 2 else None  # train_step(self, data), JAX's (self, state, data)

    def is_batch(node) -> bool:
        return isinstance(node, ast.Name) and node.id == batch

    def as_int(node):  # a constant integer (-1 is a unary minus of 1), else None
        try:
            v = ast.literal_eval(node)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    def weights_at(sub):
        """Where the weights are in ``sub``, a subscript of the batch (x, y, sample_weight): 0 for ``data[2]``
        or ``data[-1]``, their position in a slice (``data[1:]``: 1), -1 for an index or a bound that is not
        a constant (it may hold them), None when it does not hold them."""
        if not (isinstance(sub, ast.Subscript) and is_batch(sub.value)):
            return None
        k = sub.slice
        if isinstance(k, ast.Slice):
            parts = (k.lower, k.upper, k.step)
            bounds = [None if b is None else as_int(b) for b in parts]
            if any(b is None and e is not None for b, e in zip(bounds, parts)) or bounds[2] == 0:
                return -1
            kept = list(range(3)[slice(*bounds)])
            return kept.index(2) if 2 in kept else None
        i = as_int(k)
        return -1 if i is None else 0 if i in (2, -1) else None

    # the names the weights are unpacked into; reads of the batch (or of its weights) that hand nothing on (a
    # metric's update_state weighs its running value, not the loss)
    weights, looked = set(), set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and _call_name(node) in _METRIC_CALLS:
            looked.update(id(n) for a in [*node.args, *(k.value for k in node.keywords)] for n in ast.walk(a))
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign):
            value = node.value
            at = 2 if is_batch(value) or (isinstance(value, ast.Call)
                                          and _call_name(value) == "unpack_x_y_sample_weight") else None
            sliced = weights_at(value)
            if sliced is not None and sliced >= 0:
                at = sliced  # w = data[2] (a name), x, y, w = data[:3] (a tuple)
            for target in node.targets:
                if isinstance(target, ast.Name) and sliced == 0 and not isinstance(value.slice, ast.Slice):
                    weights.add(target.id)
                    looked.add(id(value))
                elif isinstance(target, (ast.Tuple, ast.List)) and at is not None:
                    if any(isinstance(e, ast.Starred) for e in target.elts):  # x, *rest = data: any may hold them
                        weights.update(n.id for e in target.elts for n in ast.walk(e) if isinstance(n, ast.Name))
                    elif at < len(target.elts) and isinstance(target.elts[at], ast.Name):
                        weights.add(target.elts[at].id)
                    looked.add(id(value))  # unpacked: the weights, if any, go on as the name they are given
            if is_batch(value) and any(isinstance(t, (ast.Tuple, ast.List)) for t in node.targets):
                looked.add(id(value))  # x, y = data
        elif isinstance(node, ast.Call) and _call_name(node) in _BATCH_LOOKS:
            looked.update(id(a) for a in node.args if is_batch(a))
        if isinstance(node, ast.Subscript) and is_batch(node.value):
            looked.add(id(node.value))  # data[0]: its weights, if any, are the subscript's (below)
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and _call_name(node) not in _METRIC_CALLS:
            if any(k.arg == "sample_weight" and not (isinstance(k.value, ast.Constant) and k.value.value is None)
                   for k in node.keywords):
                return True
            if any(k.arg is None for k in node.keywords) and _call_name(node) in _LOSS_CALLS:
                return True  # **kwargs: may hold them
            need = _LOSS_CALLS.get(_call_name(node))
            if need is not None and (len(node.args) >= need or any(isinstance(a, ast.Starred) for a in node.args)):
                return True
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and id(node) not in looked:
            if node.id in weights or node.id == batch:
                return True
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and id(node) not in looked \
                and weights_at(node) is not None:
            return True
    return False


def _own_method(model, name: str) -> bool:
    """Whether the model's class overrides Keras's ``name`` (``train_step``, ``compute_loss``) with its own."""
    fn = getattr(type(model), name, None)
    return fn is not None and not _keras_module(fn)


def _keras_module(obj) -> bool:
    """Whether ``obj`` (a function or class) is Keras's own: its module is ``keras`` or under ``keras.`` (a user
    module named ``keras_models`` is not: review 158)."""
    mod = getattr(obj, "__module__", "") or ""
    return mod == "keras" or mod.startswith("keras.")


# model -> the JAX step function a fit's weight check watched and passed (or could not watch): a later fit that
# runs the same compiled step needs neither the check nor the step built again (review 159: rebuilding it at
# every fit cost each one-epoch fit a trace)
_CHECKED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# the loss objects a spy has swapped the class of -> their own class (a first step that raised left its spy's
# class on the loss, since Keras then calls no on_train_end: the next spy starts from the original, review 158)
_SPIED_LOSSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _LossWeightSpy:
    """Whether the model's compiled loss (``model._compile_loss``, what Keras's ``compute_loss`` applies) got
    ``fit``'s sample weights during a training step (review 156: a ``train_step`` that hands the weights to its
    metrics only, or an overridden ``compute_loss`` that calls ``super().compute_loss`` without them, trained
    every step unweighted, silently; the step's source passed the syntax check, and the loss probe goes around
    ``compute_loss``). The loss object's class is swapped for a subclass that notes each call's
    ``sample_weight`` (None or not) and calls the original, for one training step; :meth:`remove` restores it.
    On JAX the step's trace calls it (the callback has the step function built again at the fit's start, so
    that a step function kept from an earlier fit is traced, and seen, again)."""

    def __init__(self, model):
        self.loss = getattr(model, "_compile_loss", None)
        try:
            self.cls = _SPIED_LOSSES.get(self.loss, type(self.loss))
        except TypeError:  # not weak-referenceable: no spy (usable() is False)
            self.loss, self.cls = None, type(None)
        self.got = self.missed = False
        self.on = False
        self.fit_frame = None  # the frame of the fit whose first step is watched

    def usable(self) -> bool:
        return self.loss is not None and callable(self.loss)

    def install(self, fit_frame=None) -> None:
        """Watch the loss from now on, within the fit running in ``fit_frame`` (None: any call): a call made
        outside that fit (its first step raised, so no batch-end hook removed the spy, and the user goes on
        with another fit or an evaluation: review 163) restores the loss's own class instead."""
        spy, cls = self, self.cls
        self.fit_frame = fit_frame

        def __call__(obj, *args, **kwargs):
            if spy.fit_frame is not None and not _on_stack(spy.fit_frame):
                spy.remove()  # the watched fit is gone: the loss gets its own class back, this call included
                return cls.__call__(obj, *args, **kwargs)
            sw = kwargs["sample_weight"] if "sample_weight" in kwargs else args[2] if len(args) > 2 else None
            if sw is None:
                spy.missed = True
            else:
                spy.got = True
            return cls.__call__(obj, *args, **kwargs)

        _SPIED_LOSSES[self.loss] = cls
        self.loss.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                          "__qualname__": cls.__qualname__})
        self.on = True

    def remove(self) -> bool | None:
        """Restore the loss's class; True when a call got the weights, False when the loss was called and never
        with them, None when it was not called."""
        if self.loss is not None and self.loss in _SPIED_LOSSES:
            self.loss.__class__ = _SPIED_LOSSES.pop(self.loss)
        self.on = False
        self.fit_frame = None
        return True if self.got else False if self.missed else None


def _on_stack(frame) -> bool:
    """Whether ``frame`` is on the calling thread's stack."""
    f = sys._getframe(1)
    while f is not None:
        if f is frame:
            return True
        f = f.f_back
    return False


def _unwatched_step(model, who: str) -> None:
    """Where the compiled loss could not be watched (a torch step compiled with ``jit_compile``; a step or a
    ``compute_loss`` that never calls it): the ``train_step``'s source is read (:func:`_warn_own_train_step`),
    and an overridden ``compute_loss`` whose source never reads its ``sample_weight`` is warned about (review 158:
    one computing its own loss without the weights trained unweighted, silently)."""
    _warn_own_train_step(model, who)
    if not _own_method(model, "compute_loss"):
        return
    import ast
    import inspect
    import textwrap

    fn = type(model).compute_loss
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):  # no source to read: nothing to go by
        return
    node = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if node is None:
        return
    a = node.args
    params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    name = "sample_weight" if "sample_weight" in params else params[4] if len(params) > 4 else None
    if a.vararg is not None or a.kwarg is not None or name is None:
        return  # (*args, **kwargs: the weights may be in them)
    if not any(isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load) for n in ast.walk(node)):
        warnings.warn(
            f"{type(model).__name__} overrides compute_loss, and its source never reads {name}: {who}'s weights "
            "reach the loss as fit's sample weights, so a compute_loss that leaves them out trains unweighted. "
            f"Weigh each example's loss by {name} (or pass it on: super().compute_loss(..., sample_weight={name}))",
            stacklevel=_common.user_stacklevel())


def _warn_own_train_step(model, who: str) -> None:
    """Warn when the model's class overrides ``train_step`` with a step that hands ``fit``'s sample weights to
    nothing: the weights reach the loss as ``fit``'s sample weights, and a step that leaves them out trains
    unweighted, with nothing said (review 79). What counts as handing them on is :func:`_step_passes_weights`'s
    (review 106: the check had been whether the source contains ``sample_weight``, which the name
    ``keras.utils.unpack_x_y_sample_weight`` always does, so ``x, y, _ = unpack_x_y_sample_weight(data)`` and
    ``sample_weight`` unpacked and then left out of ``compute_loss`` passed). Warned about: ``x, y = data`` or
    ``data[0], data[1]``; ``x, y, _ = keras.utils.unpack_x_y_sample_weight(data)``; ``x, y, sample_weight =
    ...`` with ``sample_weight`` never read again (``compute_loss(x=x, y=y, y_pred=y_pred)``, or
    ``sample_weight=None``). A step whose source cannot be read is not warned about; one that does not parse
    (a lambda inside a longer expression) is warned about when it never names ``sample_weight`` outside
    ``unpack_x_y_sample_weight``. A heuristic: a step that reads the weights for something else than its
    loss (only to log them) is not warned about."""
    import inspect

    step = getattr(type(model), "train_step", None)
    if step is None or _keras_module(step):
        return
    try:
        source = inspect.getsource(step)
    except (OSError, TypeError):  # defined where its source cannot be read: nothing to go by
        return
    passes = _step_passes_weights(source)
    if passes is None:
        passes = "sample_weight" in source.replace("unpack_x_y_sample_weight", "")
    if not passes:
        warnings.warn(
            f"{type(model).__name__} overrides train_step, and its source never passes the sample weights on (no "
            "sample_weight= to compute_loss or the loss, and the weights unpacked from the batch, if any, are "
            f"never read): {who}'s weights reach the loss as fit's sample weights, so a step that leaves them "
            "out trains unweighted. Take them with x, y, sample_weight = "
            "keras.utils.unpack_x_y_sample_weight(data) and pass sample_weight=sample_weight to compute_loss",
            stacklevel=_common.user_stacklevel())


def _check_label_width(model, labels: np.ndarray, width: int | None = None) -> None:
    """Labels beyond the model's outputs, refused when the fit begins, where the model's output width is
    known (a built Sequential or functional model, or ``width`` as the backend's preflight read it): the
    controller's own check comes at the first selection, inside the first step, and on jax Keras's trainer
    has detached the model's variables by then, so a refusal there left the model without weights (review
    66)."""
    if width is None:
        outs = getattr(model, "outputs", None)
        try:
            width = outs[0].shape[-1] if outs else None
        except (AttributeError, IndexError, TypeError, ValueError):  # a subclassed model: no symbolic outputs
            width = None
    if isinstance(width, int) and labels.size and int(labels.max()) >= width:
        raise ValueError(
            f"the labels hold class {int(labels.max())} but the model gives {width} outputs: CREST's labels (labels= "
            "if you gave them, else the y given to the callback) must be the class indices "
            f"0..{width - 1} the model is trained on. If y holds that class too (classes numbered from 1, say), the "
            "model cannot represent it: remap y to 0..C-1 (np.unique(y, return_inverse=True)[1]) or give the model "
            f"{int(labels.max()) + 1} outputs; labels= only changes what CREST measures, not what Keras trains on")


class CrestDataset(keras.utils.PyDataset):
    """What ``fit`` iterates: ``len`` is the callback's ``steps_per_epoch``; every ``__getitem__`` during
    ``fit`` serves the controller's next weighted coreset batch ``(x, y, sample_weight)``, whatever the
    index (``fit(shuffle=...)`` is irrelevant). Outside ``fit`` (Keras's build fetch) it serves a fixed
    shape probe and asks the controller nothing; a ``fit`` whose ``callbacks`` do not hold the callback
    raises ``RuntimeError`` at its first fetch. Built by :class:`CrestCallback` (and by
    :class:`SubsetCallback`, whose baseline batches it serves the same way); one worker, no multiprocessing
    (a worker pool would fetch batches before the steps before them have trained).

    Examples
    --------
    >>> model, x, y = _example_problem()  # a linear classifier and 64 examples of two classes
    >>> from crestcore import CrestConfig
    >>> crest = CrestCallback(x, y, config=CrestConfig(m=8), budget=0.25)
    >>> len(crest.dataset)  # 8 full-data steps per epoch, a quarter of them
    2
    >>> xb, yb, wb = crest.dataset[0]  # outside fit: a shape probe, the first m examples, weight 0
    >>> xb.shape, wb.tolist() == [0.0] * 8
    ((8, 4), True)
    """

    def __init__(self, callback: CrestCallback | SubsetCallback):
        super().__init__(workers=1, use_multiprocessing=False, max_queue_size=1)
        self._cb = callback
        self.in_epoch = False  # between Keras's on_epoch_begin and on_epoch_end: fit's fetches are in there

    # one worker, no multiprocessing, fixed here: a pool fetches batches before the steps before them have
    # trained (CREST's would measure a stale model; a baseline's losses would reach the wrong examples)
    def _fixed(name: str, allowed, what: str):  # type: ignore[misc]  # a property factory, used below only
        def get(self):
            return getattr(self, "_" + name)

        def put(self, value):
            if value != allowed:
                raise ValueError(f"{type(self._cb).__name__}'s dataset runs with {what} (got {name}={value!r}): "
                                 "a worker pool fetches batches before the steps before them have trained")
            setattr(self, "_" + name, value)

        return property(get, put)

    workers = _fixed("workers", 1, "workers=1")
    use_multiprocessing = _fixed("use_multiprocessing", False, "no multiprocessing")
    del _fixed

    def __len__(self) -> int:
        return self._cb.steps_per_epoch

    def __getitem__(self, index):
        return self._cb._serve(index)

    # fit calls these once extra around its build fetch; CREST's bookkeeping lives in the callback. Keras
    # fetches only between the two (its build fetch included), so a batch looked at outside them
    # (crest.dataset[0] in a notebook) is the user's and never counts as a fetch of a fit without the callback
    def on_epoch_begin(self):
        self.in_epoch = True
        # evaluate / predict (or fit's validation) over this dataset is refused here, before its first fetch:
        # on jax, Keras's trainer detaches the model's variables before that fetch, and a refusal there left
        # the trained model without weights for good (review 66)
        loop = _keras_loop()[1]
        if loop in ("evaluate", "predict"):
            raise RuntimeError(f"model.{loop} read this dataset (validation_data= it, or evaluate/predict on it): "
                               + self._cb._REFUSAL)

    def on_epoch_end(self):
        self.in_epoch = False


@dataclass
class _Entry:
    batch: Batch
    served: bool


def _portable_leaf(x):
    if isinstance(x, np.generic):
        return x.item()
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy().copy()
    return x


def _portable(x):
    """``x`` (nested dicts, lists, tuples) with torch tensors as NumPy copies and NumPy scalars as numbers."""
    return _common.map_nested(x, _portable_leaf)


def _training_data(x, y, labels, measure_x, outputs, m: int):
    """The callbacks' data, checked: ``(x, y, measure_x, labels)`` with x and measure_x as
    :func:`_as_inputs` gives them, y on the host and labels (n,) int64 (from ``y`` unless given)."""
    if outputs is not None and outputs not in ("logits", "probabilities"):
        raise ValueError(f"outputs must be 'logits', 'probabilities' or None (detect), got {outputs!r}")
    x, n = _as_inputs(x, "x")
    if n == 0:
        raise ValueError("the training data is empty: there are no examples to select from")
    if isinstance(y, dict) or (isinstance(y, (list, tuple)) and 0 < len(y) != n and all(
            getattr(v, "ndim", 0) >= 1 and v.shape[0] == n for v in y)):  # one array per output
        raise ValueError(f"y must be one array of targets (one classifier output); got a {type(y).__name__} of "
                         f"{len(y)} target arrays: CREST selects for a model with one classification output")
    y = _host(y, "y")
    if y.shape[0] != n:
        rows = (f" (x is a {type(x).__name__} of {len(x)} arrays, read as {len(x)} model inputs as Keras reads it: "
                "for one input, pass np.stack(x))" if isinstance(x, (list, tuple)) and len(x) == y.shape[0] else "")
        raise ValueError(f"x has {n} examples but y has {y.shape[0]}{rows}")
    if labels is None:
        lab = labels_from_targets(y)
    else:
        if y.ndim == 2 and y.shape[1] > 1 and not _one_hot_rows(y):
            _refuse_multi_hot(y)
            # soft targets (mixup, distillation): trained on, but CREST measures labels= (review 79)
            warnings.warn(
                "y holds soft or multi-label targets (rows that are not one-hot): the model trains on its loss of "
                "them, while CREST's selections and trust checks measure the softmax cross-entropy of labels=, a "
                "different loss; fine for targets near one-hot, else expect the selection to serve the hard "
                "labels' loss",
                stacklevel=_common.user_stacklevel())
        lab = np.asarray(_host(labels, "labels"))
        if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool:
            raise ValueError(f"labels must be ({n},) integer class indices, got shape {lab.shape}, dtype {lab.dtype}")
        if lab.min() < 0:
            raise ValueError("labels must be non-negative class indices")
        lab = int64_labels(lab)
        _warn_other_labels(y, lab)
    _common.check_training_labels(lab, m, "data")
    if measure_x is None:
        return x, y, x, lab
    mx, mn = _as_inputs(measure_x, "measure_x")
    if mn != n:
        raise ValueError(f"measure_x has {mn} examples but x has {n}; it must hold the same examples in the same order")
    return x, y, mx, lab


def _warn_other_labels(y, lab: np.ndarray) -> None:
    """Warn when ``labels=`` names other classes than hard targets ``y`` (class indices or one-hot rows) do
    (review 84): the model trains on ``y`` while the selections and trust checks measure ``labels=``."""
    try:
        hard = labels_from_targets(y)
    except (TypeError, ValueError):  # soft or other targets: nothing to compare (soft ones are warned about)
        return
    off = int(np.count_nonzero(hard != lab)) if hard.shape == lab.shape else 0
    if off:
        warnings.warn(
            f"labels= names another class than y at {off} of {lab.size} examples: the model trains on y, while "
            "CREST's selections and trust checks measure labels=. Pass the classes of y (or leave labels= out: "
            "they are read from y); if y's classes are out of the model's outputs' range, remap y (or widen the "
            "model) instead", stacklevel=_common.user_stacklevel())


def _budget(cb, counters: dict, m: int) -> dict:
    """A callback's ``stats["budget"]``: the steps trained, over the epochs it was told or the epochs begun
    (whichever is more), against the full-data run's. Batches served and not trained yet (Keras fetching
    ahead, a fit that stopped) are not counted."""
    spe = cb.steps_per_epoch
    epochs = max(cb.epochs or 1, math.ceil(cb._position / spe))
    c = dict(counters)
    c["train_examples"] = c["train_examples"] - cb._untrained_examples()
    return budget_report(budget=cb.budget, counts="steps", m=m, full_data_steps=epochs * cb.full_steps_per_epoch,
                         planned_steps=epochs * spe, steps_done=cb._position, counters=c,
                         epochs_done=cb._position // spe)


class _TrainedSteps:
    """What both callbacks share: serving a batch (the weights as the loss's reduction needs them, the
    shape probe of Keras's build fetch) and what they report of the steps trained (``position``,
    ``last_indices``)."""

    _step_open = False  # between this callback's batch-begin and batch-end hooks: the step is not accounted
    _past_plan_said = False  # the warning of an epoch past the run's planned epochs, once
    _plan_given = True  # the epochs planned were given (CrestCallback: not taken from its first fit's)

    _weight_spy: _LossWeightSpy | None = None  # armed at on_train_begin, installed for the fit's first step
    _weight_who = ""

    ops = None  # each class's model operations (KerasModelOps), None until a fit needs them

    def on_train_batch_begin(self, batch, logs=None):
        if self.ops is not None:
            self.ops.pin()  # jax: the weights of this step, held apart from the variables within an epoch
        self._step_open = True
        self._arm_weight_spy()

    def on_train_batch_end(self, batch, logs=None):
        self._weights_reached_loss()
        if self._step_open:
            self._account_step()

    def _account_step(self) -> None:  # the step just trained: its batch leaves the queue (each class's own)
        raise NotImplementedError

    def _check_own_step(self, model, who: str) -> None:
        """At a fit's start, for weighted batches: a model whose class overrides ``train_step`` or ``compute_loss``
        gets its compiled loss watched for the fit's first step (:class:`_LossWeightSpy`, decided at its end);
        where that cannot be watched (no compiled loss; a torch step compiled with ``jit_compile``) the
        ``train_step``'s source is read (:func:`_warn_own_train_step`), as before."""
        self._drop_weight_spy()
        if not (_own_method(model, "train_step") or _own_method(model, "compute_loss")):
            return
        spy = _LossWeightSpy(model)
        spy.remove()  # a spy's class left on the loss by a first step that raised (no on_train_end then)
        jax = _backend() == "jax"
        step = getattr(model, "train_function", None)
        if jax and step is not None and _CHECKED_STEPS.get(model) is step:
            return  # this compiled step was checked by an earlier fit (it is run, not traced, again)
        if spy.usable() and not (_backend() == "torch" and getattr(model, "jit_compile", False) is True):
            self._weight_spy, self._weight_who = spy, who
            make = getattr(model, "make_train_function", None)
            if jax and step is not None and callable(make):
                # a step function compiled by an earlier fit (a warm-up fit, or this one run again after its
                # refusal) is not traced again, and the spy would see nothing (review 158): build it afresh
                make(force=True)
        else:
            _unwatched_step(model, who)

    def _arm_weight_spy(self) -> None:
        """At the first step's beginning: watch the compiled loss during this step."""
        spy = self._weight_spy
        if spy is not None and not spy.on:
            spy.install(self._fit_frame)

    def _drop_weight_spy(self) -> bool | None:
        spy, self._weight_spy = self._weight_spy, None
        return None if spy is None else spy.remove()

    def _weights_reached_loss(self) -> None:
        """At the first step's end: refuse a step whose compiled loss never got the weights; when the loss was
        not called (the step's own loss), fall back to reading the step's source."""
        if self._weight_spy is None or not self._weight_spy.on:
            return
        model, who = self._fit_model, self._weight_who
        got = self._drop_weight_spy()
        if got is not False and _backend() == "jax" and getattr(model, "train_function", None) is not None:
            _CHECKED_STEPS[model] = model.train_function  # (passed, or not watchable: said below, once)
        if got is None:
            _unwatched_step(model, who)
        elif got is False:
            own = [f for f in ("train_step", "compute_loss") if _own_method(model, f)]
            raise ValueError(
                f"{type(model).__name__} overrides {' and '.join(own)}, and in the first training step its compiled "
                f"loss got no sample weights (sample_weight=None at every call): {who}'s per-example weights never "
                "reached the loss, so every step would train unweighted (passing them to the metrics does not weigh "
                "the loss). Hand them on: in train_step, x, y, sample_weight = "
                "keras.utils.unpack_x_y_sample_weight(data) and self.compute_loss(x=x, y=y, y_pred=y_pred, "
                "sample_weight=sample_weight); in an overridden compute_loss, super().compute_loss(x=x, y=y, "
                "y_pred=y_pred, sample_weight=sample_weight, training=training)")

    def _account_before_save(self) -> None:
        """``state_dict()`` in the batch-end hook of a callback listed before this one (a saver in
        ``callbacks=[saver, crest]``): Keras has trained the step, which this callback's own hook, still to come,
        accounts for. It is accounted now, as that hook would (its losses observed on the same weights), so the
        state matches the model's weights; the hook then has nothing left to do. (The saved state was one step
        behind, and a resumed run trained that batch twice: review 97.)"""
        if not self._step_open:
            return
        # only under Keras's own batch-end dispatch (its CallbackList) of this callback's fit: not from another
        # fit nested in a hook, nor from a hook of the batch's beginning calling a batch-end method (review 100)
        dispatched = False
        f = sys._getframe(2)
        while f is not None:
            obj = f.f_locals.get("self")
            if f.f_code.co_name in ("fit", "evaluate", "predict") and isinstance(obj, keras.Model):
                if dispatched and f is self._fit_frame:
                    self._account_step()
                return
            if f.f_code.co_name in ("on_train_batch_end", "_on_train_batch_end") and isinstance(
                    obj, keras.callbacks.CallbackList):
                dispatched = True
            f = f.f_back

    x: object
    y: np.ndarray
    _scale: str
    _idle_fetches: int
    _position: int
    _last: tuple[np.ndarray, np.ndarray] | None
    _finishing = False  # this fit finishes an epoch an earlier one stopped inside (_check_fit_steps)
    # the frame of the fit whose on_train_begin ran: a fit that raised never calls on_train_end, and the next
    # fit's build fetch (before its on_train_begin) must not count as a training fetch of the old one (it
    # measured with that fit's pinned weights: on JAX, weights the user had changed since). Held until
    # on_train_end or the next fit's on_train_begin: after a fit that raised, that fit's frame (and its
    # locals) stays alive until then
    _fit_frame = None
    _fit_epochs = 0  # epochs begun in this fit

    def _make(self, idx: np.ndarray, w: np.ndarray):
        """``(x, y, sample_weight)`` of the examples ``idx``: the weights as they are (float32) under the
        default reduction, divided by the batch size under ``reduction="sum"``."""
        w = np.asarray(w, dtype=np.float64)
        if self._scale == "per-batch":
            w = w / w.size
        return _take(self.x, idx), self.y[idx], w.astype(np.float32)

    def _end_fit(self) -> None:
        """A fit's end (``on_train_end``): no fetch counts as a training fetch until the next fit begins."""
        self._drop_weight_spy()
        self._fitting = False
        self._fit_frame = None
        self._idle_fetches = 0
        if self.ops is not None:
            self.ops.unpin()

    def _training_fetch(self) -> tuple[bool, str | None]:
        """``(serve, loop)``: whether this fetch is one of the training fetches of the callback's own running
        ``fit`` (the callback is in that fit, and the innermost Keras loop on this thread's stack is the
        ``fit`` of its model), and the name of that innermost loop (``"fit"``, ``"evaluate"``,
        ``"predict"`` or None: a user's look). The stack, not a flag alone, says it: a ``fit`` that raised
        never calls ``on_train_end``, and fit's validation pass (``validation_data=crest.dataset``) runs
        inside it."""
        frame, loop, owner, looked = _keras_loop(own=self)
        if looked:
            return False, None  # a callback's look inside a Keras loop (to log a batch): the probe, nothing spent
        if loop == "fit" and frame is not None and frame.f_locals.get("class_weight") is not None:
            # Keras's own error ("cannot specify class_weight and sample_weight at the same time") names an
            # argument the user did not pass: the sample weights are CREST's
            raise ValueError(
                f"fit(class_weight=...) cannot be used with {type(self).__name__}: its batches carry per-example "
                "weights (as sample weights), which Keras does not combine with class weights, and the "
                "selection measures the plain cross-entropy. Leave class_weight out")
        has = _fit_has(frame, self) if loop == "fit" else None
        if has:
            # this fit's own build fetch: on torch a whole execution's batches are fetched before on_train_begin
            # (more than the fetches a fit without the callback is allowed below): say what to change instead
            _check_one_step_per_execution(frame.f_locals.get("self"), type(self).__name__)
        if has is False:
            # a fit without this callback, refused at its first fetch (Keras's build fetch, before any step):
            # counting fetches let it train two steps on the weight-0 probes first (review 66), which moved
            # momentum and BatchNorm statistics all the same
            raise RuntimeError(self._REFUSAL)
        return bool(self._fitting and loop == "fit" and owner is getattr(self, "_fit_model", None)
                    and frame is self._fit_frame), loop

    def _idle_probe(self, m: int, refusal: str, loop: str | None):
        """Keras's build fetch (before on_train_begin; two calls when Keras fetches one batch ahead), or a
        user's look outside any Keras loop: a fixed shape probe of the first ``m`` examples, weight 0. A ``fit``
        without the callback is refused at its first fetch (:meth:`_training_fetch`, from fit's ``callbacks``);
        where those cannot be read, more than two fetches inside Keras's epochs (between the dataset's
        ``on_epoch_begin`` and ``on_epoch_end``) by a ``fit`` mean the dataset is being trained on without
        it; any fetch by ``evaluate`` or ``predict`` (also fit's validation pass) would score probes:
        ``RuntimeError`` rather than probes."""
        if loop in ("evaluate", "predict"):
            raise RuntimeError(f"model.{loop} read this dataset (validation_data= it, or evaluate/predict on it): "
                               + refusal)
        if loop == "fit" and self.dataset.in_epoch:  # fetched by a fit without the callback (a look is the user's)
            self._idle_fetches += 1
            if self._idle_fetches > 2:
                raise RuntimeError(refusal)
        probe = np.arange(m, dtype=np.int64)
        # weight 0: a probe that a fit without the callback trains on (before the refusal above) moves no
        # weight through its loss (its shapes are all Keras's build needs)
        return _take(self.x, probe), self.y[probe], np.zeros(m, dtype=np.float32)

    @property
    def position(self) -> int:
        """Steps trained so far."""
        return self._position

    @property
    def last_indices(self):
        """Dataset indices of the batch trained last (host int64), or None."""
        return None if self._last is None else self._last[0].copy()


class CrestCallback(_TrainedSteps, keras.callbacks.Callback):
    """CREST for ``model.fit``: pass ``crest.dataset`` as ``x`` and the callback in ``callbacks``.

    Parameters
    ----------
    x, y : the training inputs and targets, in memory (anything NumPy reads; ``x`` may be a dict or list
        of arrays). ``y`` is served as given (class indices or one-hot rows, whatever the loss expects).
    config : :class:`crestcore.CrestConfig`; ``m`` is the mini-batch size. Default ``CrestConfig()``.
    budget : fraction of the full-data training steps per epoch (positive).
    epochs : the epochs the budget refers to (reporting only); default the epochs the first ``fit`` trains
        (its ``epochs`` less its ``initial_epoch``).
    seed : seeds every random draw of CREST (subsets, probes); independent of Keras's seeds.
    labels : (n,) class indices; default from ``y`` (class indices or one-hot rows).
    outputs : "logits", "probabilities" or None (default: detect from the compiled loss's
        ``from_logits``, else a softmax last layer means probabilities, else a ``ValueError``).
    measure_x : the same examples, same order, for the measurement passes (e.g. without augmentation).
    measure_batch_size : examples per forward in measurement passes (memory; a measurement's last float bits
        may change with it, as the reductions' order does).
    last_layer : the classifier ``Dense`` layer (or its name) for ``CrestConfig(embeddings=True)``.
    observe_losses : feed the inference-mode losses of every trained batch to the drop policy (one extra
        forward of ``m`` examples per step, counted). Default: on exactly when dropping is on (``T2``);
        True with dropping off is refused (the losses would be kept nowhere).
    record : keep ``trained``: a list of ``(indices, weights)`` of every trained step (the controller's
        weights; see :attr:`last_weights` for what Keras received).
    log_stats : add ``crest_*`` numbers (selections, checks, T1, P, pool, last rho) to the epoch logs
        (so to ``History`` and the progress bar).

    Budget: ``full_steps_per_epoch = ceil(n / m)``, ``steps_per_epoch = max(1, round(budget *
    full_steps_per_epoch))`` (half up) = ``len(crest.dataset)``; ``fit(epochs=E)`` trains ``E *
    steps_per_epoch`` steps. The measurement passes are counted in ``stats["budget"]``.

    Examples
    --------
    A linear classifier on 64 examples, trained for a quarter of the steps of two epochs:

    >>> import numpy as np
    >>> import keras
    >>> y = np.arange(64) % 2
    >>> x = (np.random.default_rng(0).normal(size=(64, 4)) + 2.0 * y[:, None]).astype("float32")
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> from crestcore import CrestConfig
    >>> crest = CrestCallback(x, y, config=CrestConfig(m=8), budget=0.25, seed=0)
    >>> history = model.fit(crest.dataset, epochs=2, callbacks=[crest], verbose=0)
    >>> crest.steps_per_epoch, crest.stats["step"], crest.stats["selections"][0]
    (2, 4, 0)
    """

    # what a read of crest.dataset outside its fit's training steps is told
    _REFUSAL = ("crest.dataset serves CREST's batches only to the training steps of model.fit(crest.dataset, "
                "callbacks=[crest]) (without the CrestCallback, add it to fit's callbacks; model.evaluate, "
                "model.predict and fit's validation cannot read it: use your own arrays, e.g. "
                "model.evaluate(x, y), validation_data=(x_val, y_val))")

    def __init__(
        self,
        x,
        y,
        *,
        config: CrestConfig | None = None,
        budget: float = 0.1,
        epochs: int | None = None,
        seed: int = 0,
        labels=None,
        outputs: str | None = None,
        measure_x=None,
        measure_batch_size: int = 512,
        last_layer=None,
        observe_losses: bool | None = None,
        record: bool = False,
        log_stats: bool = False,
    ):
        super().__init__()
        _require_supported("gradients and Hessian-vector products")
        self.config = _common.check_config(config)
        _common.check_budget(budget)
        _common.check_count(epochs, "epochs", optional=True)
        _common.check_count(seed, "seed", low=0)
        self.x, self.y, self.measure_x, self.labels = _training_data(x, y, labels, measure_x, outputs, self.config.m)
        self.n = n = len(self.labels)
        self.budget = float(budget)
        self.epochs = None if epochs is None else int(epochs)
        self._plan_given = epochs is not None  # a plan of the user's (or a loaded run's), not the first fit's
        self.seed = int(seed)
        self.outputs_option = outputs
        self.measure_batch_size = _common.check_count(measure_batch_size, "measure_batch_size")
        self.last_layer = last_layer
        dropping = self.config.T2 is not None
        self.observe_losses = dropping if observe_losses is None else _common.check_bool(observe_losses,
                                                                                        "observe_losses")
        if self.observe_losses and not dropping:
            raise ValueError("observe_losses=True feeds the drop policy, which is off (CrestConfig(T2=None)): it "
                             "would cost a forward of m examples a step, counted in the budget, for losses kept "
                             "nowhere. Turn dropping on (CrestConfig(T2=...)) or leave observe_losses unset")
        self.record = _common.check_bool(record, "record")
        self.log_stats = _common.check_bool(log_stats, "log_stats")
        m = self.config.m
        self.full_steps_per_epoch = full_steps(n, m)
        self.steps_per_epoch = planned_steps(self.budget, self.full_steps_per_epoch)
        self.dataset = CrestDataset(self)
        self.ops: KerasModelOps | None = None
        self.trained: list[tuple[np.ndarray, np.ndarray]] = []
        self.timings = {"controller": 0.0, "selection": 0.0, "check": 0.0, "observe": 0.0}
        self._state = crest_init(self.config, self.labels, seed=self.seed, epoch_steps=self.steps_per_epoch)
        self._position = 0  # steps trained
        self._queue: list[_Entry] = []
        self._loaded_unchecked = False  # a state loaded before ops measured the model: _sync_state checks it
        self._last: tuple[np.ndarray, np.ndarray] | None = None
        self._fitting = False
        self._idle_fetches = 0
        self._scale = "as-is"
        self._ops_model = None
        self._loaded = False  # load_state_dict since the last fit began: a new model object is expected
        self._trainable_ids: tuple | None = None  # the variables the last fit trained (their identities)
        self._trainable_names: list[str] | None = None  # their paths: the set the anchor is over, saved
        self._saved_names: list[str] | None = None  # a loaded state's, until the next fit compares them
        self._epochs_from_fit = False  # epochs=None taken from fit at this fit's start: fixed at its first epoch

    # -- serving --------------------------------------------------------------------------------
    def _serve(self, index):
        serve, loop = self._training_fetch()
        if not serve:
            return self._idle_probe(self.config.m, self._REFUSAL, loop)
        for e in self._queue:
            if not e.served:
                e.served = True
                return self._make(e.batch.indices, e.batch.weights)
        batch = self._next_batch()
        self._queue.append(_Entry(batch, True))
        return self._make(batch.indices, batch.weights)

    def _untrained_examples(self) -> int:
        """Examples of the batches the controller handed out (and counted) that have not trained yet."""
        return sum(int(e.batch.indices.size) for e in self._queue)

    def _next_batch(self) -> Batch:
        c0 = self._state.counters
        t0 = time.perf_counter()
        try:
            state, batch = crest_next_batch(self._state, self.ops, self.config)
        except FloatingPointError as exc:
            raise _common.at_step(exc, f"CrestCallback at step {self._position}") from exc
        dt = time.perf_counter() - t0
        self.timings["controller"] += dt
        if batch.reselected:
            self.timings["selection"] += dt
        elif state.counters["checks"] > c0["checks"]:
            self.timings["check"] += dt
        self._state = state
        return batch

    # -- Keras hooks ----------------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        _require_supported("gradients and Hessian-vector products")
        model = self.model
        _check_one_step_per_execution(model, "CrestCallback")
        accumulate, opt = None, getattr(model, "optimizer", None)
        while opt is not None and accumulate in (None, 1):  # a LossScaleOptimizer wraps the one that accumulates
            accumulate = getattr(opt, "gradient_accumulation_steps", None)
            opt = getattr(opt, "inner_optimizer", None)
        if accumulate not in (None, 1):
            # the weights would move every k-th batch only: the trust checks between measure unchanged weights,
            # T1 and P adapt to that, and the budget counts batches, not the optimizer's steps
            raise ValueError(
                f"CrestCallback needs an optimizer without gradient_accumulation_steps, got {accumulate!r}: CREST's "
                "batches are the optimizer's steps (its trust checks measure the weights each step moved, its "
                "budget counts steps). For larger batches raise CrestConfig(m=...) instead")
        ds = self.dataset
        if ds.workers != 1 or ds.use_multiprocessing:
            raise ValueError("crest.dataset must run with workers=1 and use_multiprocessing=False: a worker pool "
                             "fetches batches before the steps before them have trained")
        facts = loss_facts(model)
        self._scale = _weight_scale(facts["reduction"])
        kind = resolve_outputs(model, self.outputs_option)  # (its refusals first: then no warning before them)
        _check_output_kind(model, self.x, self.labels.size, kind, self.outputs_option is not None)
        _check_loss_weighs_examples(model, self.x, self.y, self.labels, "CrestCallback")
        _warn_other_loss(facts, "CREST's features and trust check")
        if self.config.weights != "uniform":
            self._check_own_step(model, "CrestCallback")
        _check_label_width(model, self.labels)
        if self._ops_model is not None and self._ops_model is not model and self._position and not self._loaded:
            warnings.warn(
                f"CrestCallback: this callback trained {self._position} steps of its run on another model object; "
                "it continues that run (its step count and budget report) on this one, with a new selection and "
                "quadratic model. For a new run build a new CrestCallback; to resume a saved run, "
                "load_state_dict() first", stacklevel=_common.user_stacklevel())
        ids = tuple(id(v) for v in model.trainable_variables)
        names = [v.path for v in model.trainable_variables]
        changed = self._trainable_ids is not None and ids != self._trainable_ids and not (
            self._loaded and self._ops_model is not model)  # (a loaded run's new model: by the names below)
        if self._loaded and self._saved_names is not None and names != self._saved_names:
            # a loaded run's anchor is over the variables it names: another set in this model (a layer frozen
            # or unfrozen in the saved run, not in this one, even one of the same size) counts as a change;
            # a model that names none of them (rebuilt in the same process: other paths) takes its own set
            known = {v.path for v in model.variables}
            changed = changed or all(k in known for k in self._saved_names)
        if changed:
            # layers frozen, unfrozen or swapped between fits (even for ones of the same size): a new
            # selection and quadratic model over the new set at the first step
            self._state = crest_parameters_changed(self._state)
        self._trainable_ids, self._trainable_names, self._saved_names = ids, names, None
        self._loaded = False
        if self.ops is None or self._ops_model is not model or self.ops.from_probabilities != (kind == "probabilities"):
            self.ops = KerasModelOps(model, self.measure_x, self.labels, outputs=kind,
                                     batch_size=self.measure_batch_size, last_layer=self.last_layer)
            self.ops._anchor = getattr(self, "_anchor_stats", None)  # a loaded checkpoint's anchor statistics
            self._ops_model = model
        self.ops.unpin()  # a fit interrupted within a step (Ctrl-C, a callback that raised) left its weights pinned
        # the first selection's refusals now, while the weights are in the variables (on jax; review 66)
        _check_label_width(model, self.labels, self.ops.preflight(self.config.embeddings))
        self._sync_state()
        for e in self._queue:  # nothing is in flight when fit starts (e.g. after a fit that raised)
            e.served = False
        # a BackupAndRestore in this fit may roll the weights back behind the run (said at the first epoch)
        self._rollback = _backup_in_fit("CrestCallback")
        _check_fit_steps(self, "CrestCallback")
        planned = (self.params or {}).get("epochs")
        self._epochs_from_fit = False
        if self.epochs is None and planned:
            self.epochs = int(planned)  # fit's last epoch: the run's epochs once its first epoch is known
            self._epochs_from_fit = self._position == 0
        self._fitting = True
        self._fit_model = model  # (self.model inside a JAX step would sync the trainer's detached state)
        self._fit_frame = _keras_loop()[0]
        self._idle_fetches = 0

    def _account_step(self) -> None:
        self._step_open = False
        if self.ops is not None:
            self.ops.unpin()
        entry = next((e for e in self._queue if e.served), None)
        if entry is None:
            raise RuntimeError(
                "Keras trained a step on a batch CrestCallback did not serve: pass crest.dataset as fit's x "
                "(model.fit(crest.dataset, callbacks=[crest], ...))"
            )
        # the batches in the queue are the last ones handed out, in order, the last at the controller's step
        at = self._state.step - (len(self._queue) - 1 - self._queue.index(entry))
        self._queue.remove(entry)
        b = entry.batch
        self._position += 1
        self._last = (b.indices.copy(), np.asarray(b.weights, dtype=np.float64).copy())
        if self.record:
            self.trained.append(self._last)
        if self.observe_losses:
            t0 = time.perf_counter()
            losses = self.ops.losses(b.indices)
            if not np.all(np.isfinite(losses)):
                raise _common.measurement_error("losses", int((~np.isfinite(losses)).sum()), losses.size)
            st = crest_observe(self._state, b.indices, losses, step=at)  # the trained batch's step
            c = dict(st.counters)
            c["forward_examples"] += int(b.indices.size)
            self._state = st._replace(counters=c)
            self.timings["observe"] += time.perf_counter() - t0

    def on_epoch_begin(self, epoch, logs=None):
        if self._epochs_from_fit:  # a new run's epochs=None: the epochs this fit trains (review 79: a fit from
            # initial_epoch=2 to epochs=4 after a warm-up without CREST planned 4 and counted its budget so)
            self._epochs_from_fit = False
            self.epochs = max(1, int(self.epochs) - int(epoch))
            if int(epoch) > 0:  # a warm-up before, or a saved run not loaded: it cannot tell which
                warnings.warn(
                    f"Keras starts this fit at epoch {int(epoch)}, and CrestCallback starts a new run there, of the "
                    f"{self.epochs} epochs this fit trains. If the fit continues a saved run (a checkpoint, or "
                    "keras.callbacks.BackupAndRestore in a new process), call crest.load_state_dict() with the state "
                    "saved at that epoch before fit (crest.state_dict() saved alongside the weights); if the epochs "
                    f"before were a warm-up without CREST, build the callback with epochs={self.epochs} to say so "
                    "(and not see this)", stacklevel=_common.user_stacklevel())
        _fit_epoch_begins(self, "CrestCallback", epoch)

    def on_epoch_end(self, epoch, logs=None):
        if not self.log_stats or logs is None:
            return
        s = self.stats
        logs.update({
            "crest_selections": float(len(s["selections"])), "crest_checks": float(len(s["checks"])),
            "crest_T1": float(s["T1"]), "crest_P": float(s["P"]), "crest_pool": float(s["pool"]),
        })
        if s["rho"]:
            logs["crest_rho"] = float(s["rho"][-1])

    def on_train_end(self, logs=None):
        self._end_fit()
        for e in self._queue:  # fetched ahead and not trained: served first by the next fit
            e.served = False

    def _sync_state(self):
        """Put the controller's vectors in the namespace of ``ops.params()`` (after a load, or a new backend)."""
        anchor = self._state.anchor
        if anchor is None:
            return
        p = self.ops.params()
        resized = anchor.shape[0] != p.shape[0]
        if resized and not self._loaded_unchecked:
            # the trainable weights changed within this run (layers frozen or unfrozen between fits): the
            # controller starts a new anchor over the new set at its next step
            return
        if type(anchor) is not type(p) or getattr(anchor, "dtype", None) != p.dtype or (
                hasattr(p, "device") and getattr(anchor, "device", None) != p.device) or (
                resized):  # a loaded state of another model: crest_load_state_dict says so
            self._state = _common.rehomed(self._state, p)
        self._loaded_unchecked = False

    # -- observability --------------------------------------------------------------------------
    @property
    def last_weights(self):
        """The controller's weights of the batch trained last (float64), or None. Keras got them as they are
        (float32) under the default loss reduction, divided by the batch size under ``reduction="sum"``."""
        return None if self._last is None else self._last[1].copy()

    @property
    def controller_state(self):
        """The controller's :class:`crestcore.CrestState` (read-only by convention)."""
        return self._state

    def _budget_report(self) -> dict:
        return _budget(self, self._state.counters, self.config.m)

    @property
    def stats(self) -> dict:
        """Plain data: selections (steps), checks (step, rho, L_R, F), drops, T1, P, pool, counters, budget."""
        return {"step": self._position, "steps_per_epoch": self.steps_per_epoch, **crest_stats(self._state),
                "budget": self._budget_report(), "timings": dict(self.timings)}

    # -- checkpoints ----------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {"n": self.n, "m": self.config.m, "seed": self.seed, "steps_per_epoch": self.steps_per_epoch,
                "budget": self.budget}

    def state_dict(self) -> dict:
        """The controller state, the position and the batches handed out and not yet trained: NumPy arrays,
        Python numbers, strings, lists and dicts (``pickle`` it next to ``model.save(...)``).

        Examples
        --------
        >>> model, x, y = _example_problem()  # a linear classifier and 64 examples of two classes
        >>> import pickle
        >>> from crestcore import CrestConfig
        >>> crest = CrestCallback(x, y, config=CrestConfig(m=8), budget=0.25, seed=0)
        >>> history = model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
        >>> state = pickle.loads(pickle.dumps(crest.state_dict()))
        >>> state["position"], state["budget"]
        (2, 0.25)
        """
        self._account_before_save()
        # the ops' anchor statistics, else those of a checkpoint loaded before the ops were made (at fit)
        kept = self.ops._anchor if self.ops is not None else getattr(self, "_anchor_stats", None)
        return {
            "format": _FORMAT,
            **self._fingerprint(),
            "epochs": self.epochs,
            "budget": self.budget,
            "config": repr(self.config),
            "position": self._position,
            "queue": [_common.batch_record(e.batch) for e in self._queue],
            "crest": _portable(crest_state_dict(self._state)),
            # the anchor's moving statistics, which the measurements until the next selection use
            "anchor_stats": None if kept is None else {str(i): a.copy() for i, a in kept.items()},
            # the paths of the variables the anchor is over (the last fit's; a loaded state's until a fit)
            "trainable": list(self._saved_names if self._saved_names is not None else self._trainable_names or []),
            # whether the plan was given (epochs=, or a loaded run's given one) or taken from the first fit
            "plan_given": bool(self._plan_given),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (restore the model and its optimizer too, e.g.
        ``keras.saving.load_model``); the next ``fit`` continues with the same batches.

        Examples
        --------
        Resume in a new process: rebuild the callback with the same arguments, then restore:

        >>> model, x, y = _example_problem()  # a linear classifier and 64 examples of two classes
        >>> from crestcore import CrestConfig
        >>> crest = CrestCallback(x, y, config=CrestConfig(m=8), budget=0.25, seed=0)
        >>> history = model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
        >>> resumed = CrestCallback(x, y, config=CrestConfig(m=8), budget=0.25, seed=0)
        >>> resumed.load_state_dict(crest.state_dict())
        >>> resumed.position
        2
        """
        # every check before any change (review 170: a bad anchor_stats was refused after the state and position
        # were loaded), the notices said once they have all passed
        with _common.held_warnings() as said:
            _common.check_checkpoint(
                state, fmt=_FORMAT, owner="CrestCallback", kind="callback", fingerprint=self._fingerprint(),
                same="data, config.m, seed and budget",
                options=("config", repr(self.config), "the CrestConfig differs from the saved one", CONFIG_AS_BEFORE))
            d = state.get("crest")
            anchor = None if not isinstance(d, dict) or d.get("anchor") is None else np.asarray(d["anchor"])
            # the flat parameter vector's length is what crest_load_state_dict checks the anchor against: the
            # model's when this callback has measured it already, else the anchor's own (then checked against the
            # model at the next fit's on_train_begin, by _sync_state)
            size = (int(self.ops.params().shape[0]) if self.ops is not None
                    else (anchor.size if anchor is not None else 1))
            like = np.zeros(size, dtype=anchor.dtype if anchor is not None else np.float32)
            crest = _common.restore_controller(d, self.labels, like, "data")  # validates the controller state
            where = "CrestCallback state dict"
            pos = state.get("position")
            if isinstance(pos, bool) or not isinstance(pos, (int, np.integer)) or pos < 0:
                raise ValueError(f"{where}: position must be a non-negative integer (steps trained), got {pos!r}")
            epochs = state.get("epochs")
            if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer))
                                       or epochs < 1):
                raise ValueError(f"{where}: epochs must be a positive integer or None, got {epochs!r}")
            batches = _common.stored_batches(state.get("queue", []), self.n, where, "queue")
            names = state.get("trainable")  # absent before 2026-12-05, empty before a fit: the set that trains then
            if names is not None and not (isinstance(names, (list, tuple)) and all(isinstance(k, str) for k in names)):
                raise ValueError(f"{where}: trainable must be a list of variable paths")
            handed = int(crest.counters["train_steps"])
            if handed != int(pos) + len(batches):
                raise ValueError(f"{where}: the controller handed out {handed} batches but position {int(pos)} and "
                                 f"{len(batches)} queued batches account for {int(pos) + len(batches)}")
            kept = state.get("anchor_stats")  # absent from checkpoints before 2026-12-01: the live statistics
            if kept is not None and not (isinstance(kept, dict) and all(
                    isinstance(k, str) and k.isdigit() and isinstance(v, np.ndarray) for k, v in kept.items())):
                raise ValueError(f"{where}: anchor_stats must map variable positions to arrays")
        if epochs is not None and self.epochs is not None and int(epochs) > self.epochs:  # a plan may grow
            # as CrestLoader says of a shorter plan (review 61: loaded silently); the batches do not depend on it
            said.append((
                f"CrestCallback: the state was saved by a run planned for {int(epochs)} epochs, this callback "
                f"plans {self.epochs}: the batches go on as saved, and the budget report (stats['budget']) and "
                "the warning past the planned epochs count this callback's epochs. Build it with the saved "
                "epochs= (or epochs=None: the saved plan) to continue that run.", UserWarning))
        _common.say(said)  # before anything changes: a warnings filter that raises leaves the callback as it was
        self._state = crest
        self._position = int(pos)
        if self.epochs is None and epochs is not None:
            self.epochs = int(epochs)
            # the saved run's plan, as given as it was there (absent before 2026-12-05: as taken from a fit,
            # which never warned then); one taken from the first fit keeps growing quietly (review 100)
            self._plan_given = bool(state.get("plan_given", False))
        self._queue = [_Entry(b, False) for b in batches]
        self._anchor_stats = None if kept is None else {int(k): np.array(v) for k, v in kept.items()}
        if self.ops is not None:
            self.ops._anchor, self.ops._anchor_vars = self._anchor_stats, None
        self._saved_names = list(names) if names else None
        self._loaded_unchecked = self.ops is None  # checked against the model at the next fit's start
        self._loaded = True
        # the loaded anchor is over the model's trainable set as it is now: a change after the load counts
        known = self._ops_model
        self._trainable_ids = None if known is None else tuple(id(v) for v in known.trainable_variables)
        if self.ops is not None:
            self._sync_state()


class SubsetCallback(_TrainedSteps, keras.callbacks.Callback):
    """A baseline of :mod:`crestcore.baselines` for ``model.fit``, as :class:`CrestCallback` is CREST: pass
    ``sub.dataset`` as ``x`` and the callback in ``callbacks``.

    The batches are :class:`crestcore.baselines.SubsetSchedule`'s (the PyTorch ``SubsetLoader``'s, with
    the same seeds): ``method`` one of ``full``, ``sgd-budget``, ``random``, ``craig``, ``gradmatch``,
    ``glister``, ``prune``; ``budget``, ``epochs`` (the run's epochs: prune anneals over them), ``m``,
    ``seed``, ``reselect_every``, ``weights``, ``embeddings``, ``val_fraction``, ``glister_lr``,
    ``prune_ratio``, ``prune_anneal``, ``fill``, ``options`` and ``solve_on`` as for ``SubsetLoader``. ``x``, ``y``,
    ``labels``, ``outputs``, ``measure_x``, ``measure_batch_size`` and ``last_layer`` as for
    :class:`CrestCallback`. CRAIG, GradMatch and GLISTER measure the model (inference mode) at the start
    of each selecting epoch, after every step before it; prune reads each trained batch's losses from an
    inference-mode forward after the step (``fit`` does not expose the training forward's per-example
    losses; one forward of ``m`` examples per step, counted in ``stats["counters"]``).

    ``len(sub.dataset)`` is ``steps_per_epoch`` (``full``: every example, ``ceil(n / m)`` steps); train
    ``fit(epochs=epochs)``.

    Examples
    --------
    CRAIG at a quarter of the steps, on a linear classifier and 64 examples of two classes:

    >>> model, x, y = _example_problem()
    >>> sub = SubsetCallback(x, y, method="craig", budget=0.25, epochs=2, m=8, seed=0)
    >>> history = model.fit(sub.dataset, epochs=2, callbacks=[sub], verbose=0)
    >>> sub.position, len(sub.stats["selections"]), sub.stats["counters"]["forward_examples"]
    (4, 2, 128)
    """

    _REFUSAL = ("sub.dataset serves the baseline's batches only to the training steps of model.fit(sub.dataset, "
                "callbacks=[sub]) (without the SubsetCallback, add it to fit's callbacks; model.evaluate, "
                "model.predict and fit's validation cannot read it: use your own arrays)")

    def __init__(self, x, y, *, method: str, budget: float = 0.1, epochs: int = 1, m: int = 128, seed: int = 0,
                 labels=None, outputs: str | None = None, measure_x=None, measure_batch_size: int = 512,
                 last_layer=None, reselect_every: int = 1, weights: str = "selection", embeddings: bool | None = None,
                 val_fraction: float = 0.1, glister_lr: float = 0.05, prune_ratio: float = 0.5,
                 prune_anneal: float = 0.875, fill: str = "random", options: dict | None = None,
                 solve_on: str = "auto"):
        super().__init__()
        _require_supported("measurement forwards")
        if method != "full":
            _common.check_budget(budget)
        epochs = _common.check_count(epochs, "epochs")
        m = _common.check_count(m, "m")
        _common.check_count(seed, "seed", low=0)
        self.x, self.y, self.measure_x, self.labels = _training_data(x, y, labels, measure_x, outputs, m)
        n = len(self.labels)
        self.n, self.m, self.seed, self.epochs = n, m, int(seed), epochs
        self.budget = 1.0 if method == "full" else float(budget)
        self.outputs_option = outputs
        self.measure_batch_size = _common.check_count(measure_batch_size, "measure_batch_size")
        self.last_layer = last_layer
        self.full_steps_per_epoch = full_steps(n, m)
        self.steps_per_epoch = (self.full_steps_per_epoch if method == "full"
                                else planned_steps(self.budget, self.full_steps_per_epoch))
        self.schedule = SubsetSchedule(
            method, self.labels, m=m, seed=self.seed, steps_per_epoch=self.steps_per_epoch,
            full_steps_per_epoch=self.full_steps_per_epoch, epochs=epochs, reselect_every=reselect_every,
            weights=weights, embeddings=embeddings, val_fraction=val_fraction, glister_lr=glister_lr,
            prune_ratio=prune_ratio, prune_anneal=prune_anneal, fill=fill, options=options, solve_on=solve_on)
        self.dataset = CrestDataset(self)
        self.ops: KerasModelOps | None = None
        self._position = 0  # steps trained
        self._queue: list[tuple[np.ndarray, np.ndarray]] = []  # served, not trained yet
        self._last: tuple[np.ndarray, np.ndarray] | None = None
        self._fitting = False
        self._scale = "as-is"
        self.timings = {"observe": 0.0}  # seconds spent measuring prune's losses
        self._idle_fetches = 0

    @property
    def method(self) -> str:
        return self.schedule.method

    @property
    def _measures(self) -> bool:
        return self.method in ("craig", "gradmatch", "glister", "prune")

    def _serve(self, index=None):
        serve, loop = self._training_fetch()
        if not serve:
            return self._idle_probe(self.m, self._REFUSAL, loop)
        idx, w = self.schedule.next_indices(self._position + len(self._queue), self.ops)
        self._queue.append((idx, w))
        return self._make(idx, w)

    def _untrained_examples(self) -> int:
        """Examples of the batches served (and counted) that have not trained yet."""
        return sum(int(idx.size) for idx, _ in self._queue)

    # -- Keras hooks ----------------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        model = self.model
        _check_one_step_per_execution(model, "SubsetCallback")
        self._rollback = _backup_in_fit("SubsetCallback")
        _check_fit_steps(self, "SubsetCallback")
        facts = loss_facts(model)
        self._scale = _weight_scale(facts["reduction"], f"the {self.method} baseline's weighted loss",
                                    unweighted=self.method in ("full", "sgd-budget", "random"))
        if self.method not in ("full", "sgd-budget", "random"):
            _check_loss_weighs_examples(model, self.x, self.y, self.labels, f"the {self.method} baseline")
            self._check_own_step(model, "SubsetCallback")
        planned = (self.params or {}).get("epochs")
        if planned and int(planned) > self.epochs:
            self._past_plan_said = True  # said here, at the start: not again when an epoch past the plan begins
            warnings.warn(f"SubsetCallback(epochs={self.epochs}) but fit(epochs={planned}): the baseline's schedule "
                          f"(its budget, prune's annealing) covers {self.epochs} epochs; build it with "
                          f"epochs={planned}", stacklevel=_common.user_stacklevel())
        if self._measures:
            kind = resolve_outputs(model, self.outputs_option, "SubsetCallback")
            _check_output_kind(model, self.measure_x, self.labels.size, kind, self.outputs_option is not None)
            _warn_other_loss(facts, f"the {self.method} selection's measurements")
            if self.ops is None or self.ops.model is not model or self.ops.from_probabilities != (kind == "probabilities"):
                self.ops = KerasModelOps(model, self.measure_x, self.labels, outputs=kind,
                                         batch_size=self.measure_batch_size, last_layer=self.last_layer)
            self.ops.unpin()  # a fit interrupted within a step left its weights pinned
            # the first selection's refusals now, while the weights are in the variables (on jax, a refusal
            # inside the first step left the model without them: review 79, as CrestCallback's in review 66)
            _check_label_width(model, self.labels, self.ops.preflight(self.schedule.embeddings))
        for idx, _ in self._queue:  # served and never trained (a fit that stopped): served again, counted once
            self.schedule.counters["train_steps"] -= 1
            self.schedule.counters["train_examples"] -= int(idx.size)
        self._queue.clear()
        self._fitting = True
        self._fit_model = model  # (self.model inside a JAX step would sync the trainer's detached state)
        self._fit_frame = _keras_loop()[0]
        self._idle_fetches = 0

    def on_epoch_begin(self, epoch, logs=None):
        _fit_epoch_begins(self, "SubsetCallback", epoch)

    def _account_step(self) -> None:
        self._step_open = False
        if self.ops is not None:
            self.ops.unpin()
        if not self._queue:
            raise RuntimeError("Keras trained a step on a batch SubsetCallback did not serve: pass sub.dataset as "
                               "fit's x (model.fit(sub.dataset, callbacks=[sub], ...))")
        idx, w = self._queue.pop(0)
        self._position += 1
        self._last = (idx, np.asarray(w, dtype=np.float64))
        if self.method == "prune":
            assert self.ops is not None
            t0 = time.perf_counter()
            losses = self.ops.losses(idx)
            if not np.all(np.isfinite(losses)):
                raise _common.measurement_error("losses", int((~np.isfinite(losses)).sum()), losses.size)
            self.schedule.observe(idx, losses)
            self.schedule.counters["forward_examples"] += int(idx.size)
            self.timings["observe"] += time.perf_counter() - t0

    def on_train_end(self, logs=None):
        self._end_fit()

    # -- observability and checkpoints ----------------------------------------------------------
    @property
    def stats(self) -> dict:
        """Plain data: the method, position, selections (step, epoch, seconds, size, ...) and counters."""
        return {"method": self.method, "step": self._position, "steps_per_epoch": self.steps_per_epoch,
                "selections": [dict(r) for r in self.schedule.log],
                "counters": {k: int(v) for k, v in self.schedule.counters.items()},
                "budget": _budget(self, self.schedule.counters, self.m)}

    def _fingerprint(self) -> dict:
        return {"method": self.method, "n": self.n, "m": self.m, "seed": self.seed,
                "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs, "budget": self.budget}

    def state_dict(self) -> dict:
        """The schedule's state, the position and the batches served and not trained yet: NumPy arrays,
        numbers, strings, lists and dicts (``pickle`` it next to ``model.save(...)``).

        Examples
        --------
        A callback rebuilt with the same arguments continues with the same batches:

        >>> import numpy as np
        >>> model, x, y = _example_problem()  # a linear classifier and 64 examples of two classes
        >>> sub = SubsetCallback(x, y, method="random", budget=0.25, epochs=2, m=8, seed=0)
        >>> history = model.fit(sub.dataset, epochs=1, callbacks=[sub], verbose=0)
        >>> resumed = SubsetCallback(x, y, method="random", budget=0.25, epochs=2, m=8, seed=0)
        >>> resumed.load_state_dict(sub.state_dict())
        >>> _ = model.fit(sub.dataset, epochs=2, initial_epoch=1, callbacks=[sub], verbose=0)
        >>> _ = model.fit(resumed.dataset, epochs=2, initial_epoch=1, callbacks=[resumed], verbose=0)
        >>> resumed.position, bool(np.array_equal(resumed.last_indices, sub.last_indices))
        (4, True)
        """
        self._account_before_save()
        return {"format": _SUBSET_FORMAT, **self._fingerprint(), "budget": self.budget,
                "settings": self.schedule.settings(), "position": self._position,
                "labels_sha256": _common.labels_digest(self.labels),
                "queue": [{"indices": i.copy(), "weights": w.copy()} for i, w in self._queue],
                "schedule": self.schedule.state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (restore the model too: later selections measure it).

        Examples
        --------
        A state saved for another baseline is refused (see :meth:`state_dict` for a resume):

        >>> model, x, y = _example_problem()  # a linear classifier and 64 examples of two classes
        >>> saved = SubsetCallback(x, y, method="random", budget=0.25, m=8).state_dict()
        >>> SubsetCallback(x, y, method="craig", budget=0.25, m=8).load_state_dict(saved)
        Traceback (most recent call last):
            ...
        ValueError: the state dict was saved with method='random', this callback has method='craig'; ...
        """
        with _common.held_warnings() as said:  # the notices: said once every check has passed (review 170)
            _common.check_checkpoint(
                self.schedule.saved_header(state), fmt=_SUBSET_FORMAT, owner="SubsetCallback", kind="callback",
                fingerprint=self._fingerprint(),
                same="method, data, m, seed, budget and epochs",
                options=("settings", self.schedule.settings(), "the baseline's options differ from the saved ones"))
            saved = state.get("labels_sha256")  # (states before 2026-12-04 have none)
            if saved is not None and saved != _common.labels_digest(self.labels):
                raise ValueError("the state dict was saved for data with different labels: its selection and "
                                 "records belong to those; resume with the same data")
            pos = state.get("position")  # (no upper bound: a fit with more epochs than planned trains on, warned)
            if isinstance(pos, bool) or not isinstance(pos, (int, np.integer)) or pos < 0:
                raise ValueError(f"SubsetCallback state dict: position must be a non-negative integer, got {pos!r}")
            queue = state.get("queue", [])  # checked before anything changes (review 172: read after the load)
            if not isinstance(queue, list):
                raise ValueError(f"SubsetCallback state dict: queue must be a list of batches, got "
                                 f"{type(queue).__name__}")
            queue = [_queued_batch(q, self.n) for q in queue]
        before = self.schedule.state()
        try:
            self.schedule.load_state(state.get("schedule"), where="SubsetCallback state dict: schedule")
            _common.say(said)  # every check passed: the notices (a filter that raises leaves the callback as it was)
        except Exception:
            self.schedule.load_state(before)  # a state the schedule cannot read leaves it as it was
            raise
        self._position = int(pos)
        self._queue = queue


# ------------------------------------------------------------------------------------------------
# the examples' setup
# ------------------------------------------------------------------------------------------------
def _example_problem():
    """The examples' classification problem, ``(model, x, y)``: ``x`` holds 64 float32 points (64, 4) of two
    Gaussian blobs, ``y`` their labels ``0, 1, 0, 1, ...`` (class 1 shifted by 2), and ``model`` is a new
    linear classifier for them (one ``Dense`` layer), compiled for SGD on the cross-entropy of its logits."""
    y = np.arange(64) % 2
    x = (np.random.default_rng(0).normal(size=(64, 4)) + 2.0 * y[:, None]).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, x, y
