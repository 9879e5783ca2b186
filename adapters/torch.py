"""PyTorch adapter: the model operations CREST needs, and a loader of weighted coreset mini-batches.

Two public classes (plus a helper):

* :class:`TorchModelOps` implements the controller's :class:`crestcore.ModelOps` for any classifier
  ``nn.Module`` and any map-style ``torch.utils.data.Dataset``: eval-mode logits (and the penultimate
  embedding) for a set of example indices, per-example losses, the flat trainable-parameter vector,
  the gradient of the weighted coreset loss and one Hutchinson probe ``z * (H z)`` by double backward.
* :class:`CrestLoader` is what a training loop iterates instead of its ``DataLoader``: it yields
  ``(x, y, weights)`` mini-batches (the weighted coresets), runs selection, trust checks and dropping
  inside, and has ``len``, ``set_epoch``, ``state_dict`` / ``load_state_dict`` (exact resume) and
  ``stats``. See ``docs/pytorch.md`` for the quickstart and the budget accounting.

Measurement passes (selection, checks, the gradient/curvature fit) run with every module in eval
mode: BatchNorm uses (the anchor's) running statistics and never updates them, dropout is off. The modes of all
modules, and every buffer, are restored exactly afterwards. Gradients are taken with
``torch.autograd.grad``, so no ``.grad`` attribute (the optimizer's input) is ever touched. The
quadratic model is therefore fitted to the eval-mode loss, the same loss the trust check measures.

Only the ``crestcore.adapters`` floor imports torch; ``crestcore`` itself never does.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import dataclasses
import functools
import inspect
import itertools
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping

import numpy as np

from crestcore.dropping import pool_size
from crestcore.plan import _BREAK_ADVICE, BudgetedPasses
from crestcore.validation import all_finite, host_indices, int64_labels, stored_batch
try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "crestcore.adapters.torch needs PyTorch: pip install 'crestcore[torch]'"
    ) from exc
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, ConcatDataset, Subset, TensorDataset
from torch.utils.data import default_collate

from crestcore.controller import (
    CONFIG_AS_BEFORE,
    Batch,
    CrestConfig,
    crest_init,
    crest_next_batch,
    crest_parameters_changed,
    crest_observe,
    crest_state_dict,
    crest_stats,
)

from . import _common

__all__ = ["TorchModelOps", "CrestLoader", "CrestBatchSampler", "WeightedDataset", "WeightedCollate", "WeightedKey",
           "dataset_labels"]

_FORMAT = "crestcore.adapters.torch.CrestLoader/1"


# ------------------------------------------------------------------------------------------------
# data access
# ------------------------------------------------------------------------------------------------
_CLASSIFICATION = ("CREST is for single-label classification: it selects, fits and checks on the softmax "
                   "cross-entropy of one class index per example. Regression targets and float, soft or multi-label "
                   "targets are not supported: labels= (crest_labels= on CrestTrainer) helps only when the items "
                   "carry a class index in another form, since CREST would measure that cross-entropy, not the "
                   "loss the training step takes")
_ONE_LABEL = ("CREST selects whole examples, each by one class label; per-token or multi-label targets are not "
              "supported (pass labels=, one class index per example, if the examples have one; crest_labels= on "
              "CrestTrainer)")


def _label_value(v, i: int) -> int:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"example {i}'s label has shape {tuple(v.shape)}; expected one class index: {_ONE_LABEL}")
        v = v.reshape(()).item()
    elif isinstance(v, np.ndarray):
        if v.size != 1:
            raise ValueError(f"example {i}'s label has shape {v.shape}; expected one class index: {_ONE_LABEL}")
        v = v.reshape(()).item()
    elif isinstance(v, (list, tuple)):
        if len(v) == 1:  # [c], as a size-1 tensor is
            return _label_value(v[0], i)
        raise ValueError(f"example {i}'s label is a {type(v).__name__} of {len(v)}; expected one class index: "
                         f"{_ONE_LABEL}")
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"example {i}'s label is {v!r} ({type(v).__name__}); expected an integer class index")
    return int(v)


def _as_labels(lab, n: int, what: str) -> np.ndarray:
    if isinstance(lab, torch.Tensor):
        if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
            shape = "" if lab.ndim <= 1 else f" of shape {tuple(lab.shape)} (multi-label or soft targets?)"
            raise TypeError(f"{what} must hold integer class indices, got dtype {lab.dtype}{shape}: {_CLASSIFICATION}")
        lab = lab.detach().cpu().numpy()
    elif isinstance(lab, (list, tuple)):
        try:
            lab = np.asarray([_label_value(v, i) for i, v in enumerate(lab)], dtype=np.int64)
        except (TypeError, ValueError) as exc:  # e.g. a `labels` attribute holding class names
            raise type(exc)(f"{what}: {exc} (pass labels=, one class index per example, to override; "
                            "crest_labels= on CrestTrainer)") from None
    try:
        lab = np.asarray(lab)
    except ValueError as exc:  # ragged rows: per-token labels of different lengths
        raise ValueError(f"{what} does not hold one class index per example ({exc}): {_ONE_LABEL}") from None
    if lab.dtype == object and lab.ndim == 1 and any(isinstance(v, (list, tuple, np.ndarray)) for v in lab[:64]):
        raise ValueError(f"{what} holds sequences, not one class index per example: {_ONE_LABEL}")
    if lab.ndim == 2 and lab.shape == (n, 1):  # a column of class indices
        lab = lab[:, 0]
    if lab.ndim != 1 or lab.shape[0] != n:
        hint = (_ONE_LABEL if lab.ndim > 1 else
                "pass labels=, one class index per example (crest_labels= on CrestTrainer)")
        raise ValueError(f"{what} must be 1-D with one class index per example ({n}), got shape {lab.shape}: "
                         + hint)
    if lab.dtype == bool or not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"{what} must hold integer class indices, got dtype {lab.dtype}: {_CLASSIFICATION}")
    if n and lab.min() < 0:
        raise ValueError(f"{what} must be non-negative class indices, got minimum {lab.min()}")
    return int64_labels(lab, what)


def _batch_loads(dataset) -> bool:
    """Whether the dataset loads a batch of keys at once (``__getitems__``, which may return the items in
    another order), seen through torch's ``Subset``, whose own ``__getitems__`` keeps the order and asks the
    dataset under it."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return callable(getattr(dataset, "__getitems__", None))


def _labels_without_items(dataset) -> bool:
    """Whether :func:`dataset_labels` finds ``dataset``'s labels without loading its examples."""
    if isinstance(dataset, TensorDataset):
        return True
    if isinstance(dataset, Subset):
        return _labels_without_items(dataset.dataset)
    if isinstance(dataset, ConcatDataset):
        return all(_labels_without_items(d) for d in dataset.datasets)
    return _label_attribute(dataset) is not None or _label_column(dataset) is not None


def _joint_transform(dataset) -> bool:
    """Whether ``dataset`` is a torchvision ``VisionDataset`` given a joint ``transforms(input, target)`` of
    the user's own (its ``StandardTransform``, which only wraps ``transform`` and ``target_transform``, is
    not one): that may change the targets, so its ``targets`` attribute is not what the items carry. (A
    dataset of another kind that calls its image transforms ``transforms`` is not affected.)"""
    if not any(c.__name__ == "VisionDataset" for c in type(dataset).__mro__):
        return False
    t = getattr(dataset, "transforms", None)
    return t is not None and callable(t) and type(t).__name__ != "StandardTransform"


def _shown_columns(dataset) -> list | None:
    """For a Hugging Face ``datasets.Dataset`` whose items are its rows as stored (no ``set_transform`` /
    ``with_transform``, which may change the labels), the columns its items carry: those its format shows (all
    of them, untransformed, with ``output_all_columns``: review 180); else None."""
    if type(dataset).__module__.split(".")[0] != "datasets" or not hasattr(dataset, "column_names"):
        return None
    fmt = getattr(dataset, "format", None)
    if not isinstance(fmt, dict) or fmt.get("type") == "custom":
        return None
    cols = list(dataset.column_names)
    return cols if fmt.get("output_all_columns") else list(fmt.get("columns") or cols)


def _label_column(dataset, keys=None) -> str | None:
    """For a Hugging Face ``datasets.Dataset`` whose items are its rows as stored, the name of its label column
    (the first of ``keys``, default ``_LABEL_KEYS``, its items carry), else None."""
    keys = _LABEL_KEYS if keys is None else keys
    shown = _shown_columns(dataset)
    return None if shown is None else next((k for k in keys if k in shown), None)


def _label_attribute(dataset) -> str | None:
    """The name of the attribute (``targets`` or ``labels``) holding the items' labels, if any."""
    if _joint_transform(dataset):
        return None
    for attr in ("targets", "labels"):
        v = getattr(dataset, attr, None)
        if v is not None and not callable(v):
            return attr
    return None


def _in_ddp(model: nn.Module) -> bool:
    """Whether ``model`` trains in a ``DistributedDataParallel`` of more than one process: it is one or holds one,
    or one wraps it (the loader given ``ddp.module`` while the DDP model trains: review 168; found through the
    garbage collector's referrers, once, at a pass under several processes)."""
    import gc

    DDP = nn.parallel.DistributedDataParallel

    def several(d) -> bool:
        group = getattr(d, "process_group", None)
        try:
            return group is None or group.size() > 1
        except Exception:  # noqa: BLE001 - a group that cannot say: counted as several
            return True

    if any(isinstance(m, DDP) and several(m) for m in model.modules()):
        return True
    for holder in gc.get_referrers(model):  # DDP keeps its module in its _modules dict, in the DDP's __dict__
        if isinstance(holder, dict) and holder.get("module") is model:
            for up in gc.get_referrers(holder):
                found = [up] if isinstance(up, DDP) else [d for d in gc.get_referrers(up) if isinstance(d, DDP)
                                                          and getattr(d, "__dict__", None) is up] \
                    if isinstance(up, dict) else []
                if any(several(d) for d in found):
                    return True
    return False


def _dtype_error(exc: BaseException) -> bool:
    """Whether torch's error is about mismatched dtypes (its messages vary by operation: "expected scalar type",
    "must have the same dtype", convolution's "Input type (unsigned char) and bias type (float) should be the
    same")."""
    msg = str(exc)
    if "cuda" in msg.lower() or "device" in msg:  # ("Input type (torch.FloatTensor) and weight type
        return False  # (torch.cuda.FloatTensor) should be the same": devices, not dtypes, review 168)
    return "dtype" in msg or "scalar type" in msg or ("type (" in msg and "should be the same" in msg)


def _inner_ops(ops):
    """The TorchModelOps under a wrapper (the distributed adapter's ``inner``), else ``ops``."""
    while "inner" in vars(ops):
        ops = vars(ops)["inner"]
    return ops


def _label_origin(dataset) -> str:
    if isinstance(dataset, TensorDataset):
        return "the TensorDataset's second tensor"
    if isinstance(dataset, (Subset, ConcatDataset)):
        inner = dataset.dataset if isinstance(dataset, Subset) else dataset.datasets[0] if dataset.datasets else None
        kind = type(dataset).__name__
        return f"a {kind} of {_label_origin(inner)}" if inner is not None else f"the {kind}'s parts"
    attr = _label_attribute(dataset)
    col = None if attr is not None else _label_column(dataset)
    if col is not None:
        return f"the dataset's {col!r} column"
    return f"dataset.{attr}" if attr is not None else "the dataset's label attributes"


def _found_origin(dataset) -> str:
    """Where :func:`dataset_labels` found ``dataset``'s labels, for the labels check's warning."""
    if not _labels_without_items(dataset):  # read item by item (review 118: not "without reading the items")
        return "read from the items once, item[1] or a dict item's label key"
    return "found without reading the items: " + _label_origin(dataset)


def dataset_labels(dataset, keys=None) -> np.ndarray:
    """The integer class label of every example of ``dataset`` as a host int64 array (n,); ``keys``: the keys
    a dict item or a ``datasets.Dataset`` column holds its label under (default ``("labels", "label",
    "label_ids")``; ``CrestTrainer`` passes ``TrainingArguments(label_names=[key])``'s).

    Read without touching the examples where possible: ``TensorDataset`` (its second tensor; a
    ``ValueError`` asks for ``labels=`` when a later tensor is an integer vector too, a categorical input
    or example ids, say),
    ``Subset`` and ``ConcatDataset`` (recursively), or a ``targets`` / ``labels`` attribute (torchvision
    datasets; mapped through the dataset's ``target_transform`` when it has one, as its items are; a
    torchvision dataset given a joint ``transforms`` has its items read), or the label column (``labels``,
    ``label`` or ``label_ids``) of a Hugging Face ``datasets.Dataset`` without a ``set_transform``.
    Otherwise every example is loaded once and its second field taken (``dataset[i][1]``); pass ``labels=``
    to :class:`CrestLoader` to avoid that pass.

    Examples
    --------
    >>> import torch
    >>> from torch.utils.data import ConcatDataset, Subset, TensorDataset
    >>> data = TensorDataset(torch.zeros(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]))
    >>> dataset_labels(data)
    array([0, 1, 2, 0, 1, 2])
    >>> dataset_labels(ConcatDataset([Subset(data, [5, 4]), data]))
    array([2, 1, 0, 1, 2, 0, 1, 2])
    """
    if isinstance(keys, str):  # one key (a string is no sequence of keys: its letters were taken for them)
        keys = (keys,)
    keys = _LABEL_KEYS if keys is None else tuple(keys)
    if not keys or not all(isinstance(k, str) for k in keys):
        raise TypeError(f"keys must be label keys (strings), got {keys!r}")
    n = _length(dataset)
    if isinstance(dataset, TensorDataset):
        if len(dataset.tensors) < 2:
            raise ValueError("a TensorDataset needs (inputs, labels) tensors to give labels; pass labels= "
                             "(crest_labels= on CrestTrainer)")
        # more than one integer vector after the inputs (a categorical feature, example ids): which is the
        # class is not for CREST to guess (it took the second, a model's categorical input, silently)
        # (an (n, 1) column counts as a vector: it is read as one, so (x, cat column, y) is as ambiguous as
        # (x, cat, y): review 154)
        ints = [k for k, t in enumerate(dataset.tensors)
                if k >= 1 and (t.ndim == 1 or (t.ndim == 2 and t.shape[1] == 1))
                and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool]
        if len(ints) > 1:
            raise ValueError(
                f"this TensorDataset holds {len(dataset.tensors)} tensors, of which tensors {ints} are integer "
                "vectors or columns (class labels, a categorical input, example ids, ...): CREST cannot tell which "
                "one holds "
                f"the class labels. Pass labels=dataset.tensors[k] with k the one that does (one of {ints}; "
                "crest_labels= on CrestTrainer)")
        second = dataset.tensors[1]
        if ints and ints[0] > 1:  # the second is no integer vector or column, a later one is
            # (inputs, more inputs, labels): tabular categorical and numeric features, say (review 151: refused as
            # if the task were no classification)
            raise ValueError(
                f"the TensorDataset's second tensor (shape {tuple(second.shape)}, {second.dtype}) is not one class "
                f"index per example, but tensors[{ints[0]}] is an integer vector: if it holds the class labels (a "
                f"TensorDataset of several inputs before the labels), pass labels=dataset.tensors[{ints[0]}] "
                "(crest_labels= on CrestTrainer), and forward= to give the model its inputs (the default calls "
                "model(batch[0]))")
        return _as_labels(second, n, "the TensorDataset's second tensor")
    if isinstance(dataset, Subset) and _labels_without_items(dataset.dataset):
        base = dataset_labels(dataset.dataset, keys)
        return _as_labels(base[np.asarray(dataset.indices, dtype=np.int64)], n, "the Subset's labels")
    # (a Subset of a dataset whose labels need its items: read the Subset's own items below, not the base's)
    if isinstance(dataset, ConcatDataset):
        parts = [dataset_labels(d, keys) for d in dataset.datasets]
        return _as_labels(np.concatenate(parts) if parts else np.zeros(0, np.int64), n, "labels")
    col = _label_column(dataset, keys)
    if col is not None:  # a datasets.Dataset: its label column, read from its Arrow table without decoding rows
        return _as_labels(dataset.with_format("numpy")[col], n, f"the dataset's {col!r} column")
    attr = _label_attribute(dataset)
    if attr is not None:
        v = getattr(dataset, attr)
        tt = getattr(dataset, "target_transform", None)
        if tt is None:
            return _as_labels(v if not isinstance(v, (list, tuple)) else list(v), n, f"dataset.{attr}")
        # torchvision applies target_transform to each raw target in __getitem__: so do the labels
        raw = v.tolist() if isinstance(v, (torch.Tensor, np.ndarray)) else list(v)
        with _random_states_kept():
            try:
                mapped = [tt(t) for t in raw]
            except Exception as exc:
                raise ValueError(f"dataset.target_transform failed on dataset.{attr} ({type(exc).__name__}: {exc}); "
                                 "pass labels= (the class index of each example as the items carry it; "
                                 "crest_labels= on CrestTrainer)") from exc
        return _as_labels(mapped, n, f"dataset.target_transform(dataset.{attr})")
    shown = _shown_columns(dataset)
    if shown is not None:
        # a Hugging Face dataset's rows hold its columns, none of them a label key: no pass over them would find one
        # (review 179: a warning about a missing `targets` attribute of a dataset with a `targets` column, a pass
        # announced over every row, and the refusal at the first)
        cols = list(dataset.column_names)
        hidden = [k for k in keys if k in cols and k not in shown]
        raise TypeError(
            f"cannot find the labels of this {type(dataset).__name__}: "
            + (f"its label column {hidden[0]!r} is not among the columns its format shows, {shown}"
               if hidden else f"none of its columns {cols} is one of the label keys {keys}")
            + "; pass labels= (one class index per example; crest_labels= on CrestTrainer, where labels under "
            "another key are named by TrainingArguments(label_names=[key]))")
    why = ("its joint `transforms` may change the targets" if _joint_transform(dataset)
           else "it has no `targets` or `labels` attribute")
    out = np.empty(n, dtype=np.int64)
    with _random_states_kept():  # random transforms in __getitem__ must not advance the user's RNGs
        for i in range(n):
            item = dataset[i]
            if i == 0:  # the warning names the item's other integer fields: items (x, lengths, y) had the lengths
                # taken as the classes after a warning that named item[1] only (review 130)
                others = ([k for k in range(2, len(item)) if _integer_scalar(item[k]) is not None]
                          if isinstance(item, (tuple, list)) else [])
                also = (f" Its items hold integers at item{others} too: if one of those is the class label (items "
                        "(x, lengths, y), say), pass labels= with it." if others else "")
                warnings.warn(
                    f"crestcore: reading all {n} examples of the {type(dataset).__name__} once to find their labels "
                    f"({why}), taking each item's second field (item[1]) or, for dict items, the first of the keys "
                    f"{keys}: pass labels= (one class index per example; crest_labels= on CrestTrainer) if "
                    "that is not the class label, or to skip this pass (or give the dataset a `targets` attribute). "
                    "The global random states are restored afterwards." + also,
                    stacklevel=_common.user_stacklevel())
            if isinstance(item, dict):
                key = next((k for k in keys if k in item), None)
                if key is None:
                    raise TypeError(f"cannot find the labels of this dataset: its dict items have none of the keys "
                                    f"{keys}; pass labels= (one class index per example; crest_labels= "
                                    "on CrestTrainer, where labels under another key are named by "
                                    "TrainingArguments(label_names=[key]))")
                out[i] = _item_label(item[key], i)
                continue
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise TypeError(
                    "cannot find the labels of this dataset: its items are not (input, label, ...) tuples "
                    "and it has no `targets` attribute; pass labels= (one class index per example; "
                    "crest_labels= on CrestTrainer)"
                )
            out[i] = _item_label(item[1], i)
    return _as_labels(out, n, "the dataset's labels")


def _item_label(v, i: int) -> int:
    """An item's label field as a class index, an error saying to pass labels= when it is not one (float 0/1
    targets for a BCE loss, say: review 130)."""
    try:
        return _label_value(v, i)
    except (TypeError, ValueError) as exc:
        if (isinstance(v, torch.Tensor) and v.numel() != 1) or (isinstance(v, np.ndarray) and v.size != 1):
            raise  # a vector (multi-hot, one-hot, soft targets): the refusal as it is, no cast to suggest (review 151)
        try:
            whole = float(v.reshape(()).item() if hasattr(v, "reshape") else v).is_integer()
        except (TypeError, ValueError, RuntimeError):
            whole = True
        if not whole:  # a fractional target: regression (review 133: told to cast it to class indices first)
            raise type(exc)(f"{exc}: CREST is for classification (one class index per example); regression "
                            "targets are not supported") from None
        raise type(exc)(f"{exc} (pass labels=, one integer class index per example, e.g. labels=targets.long(); "
                        "crest_labels= on CrestTrainer)") from None


def _integer_scalar(v) -> int | None:
    """``v`` as an int when it is one integer (a Python or NumPy integer, a 0-d or one-element integer tensor or
    array: what :func:`_label_value` takes, but a list), else None."""
    if isinstance(v, (list, tuple)):
        return None
    try:
        return _label_value(v, 0)
    except (TypeError, ValueError):
        return None


@contextlib.contextmanager
def _random_states_kept():
    """Python's, NumPy's legacy and torch's CPU (and CUDA, where initialised) global RNG states, restored."""
    import random

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextlib.contextmanager
def _measurement_randomness(idx: np.ndarray, anchor: int = 0):
    """A measurement's in-process loads draw their random transforms from a stream of their own: torch's CPU,
    NumPy's legacy and Python's global RNGs seeded inside from the anchor's number and the loaded indices,
    the user's states restored after. A measurement then never moves the training's randomness (the
    augmentations and dropout masks that follow a selection); a new anchor draws fresh inputs."""
    import random
    import zlib

    seed = zlib.crc32(np.ascontiguousarray(idx, dtype=np.int64).tobytes(), zlib.crc32(np.int64(anchor).tobytes()))
    with _random_states_kept():
        torch.random.default_generator.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        yield


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``d model wraps (the same parameters and buffers), else ``model``.

    CREST's measurement passes take double-backward Hessian-vector products, which compiled graphs do not
    support (AOTAutograd refuses ``create_graph`` on them); they run the original module, eagerly, on the
    very parameters the compiled model trains. The training steps still run the compiled model."""
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        return inner
    return model


def check_map_style(dataset, name: str = "dataset") -> None:
    """``dataset`` must be a map-style dataset (``__getitem__`` and ``__len__``, not an ``IterableDataset``,
    whose ``__getitem__`` is torch's ``NotImplementedError``): a ``TypeError`` naming it. CREST reads
    examples by index (random subsets, coresets), which a stream cannot serve."""
    if (not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__")
            or isinstance(dataset, torch.utils.data.IterableDataset)):
        raise TypeError(f"{name} must be a map-style Dataset (__getitem__ and __len__), got {type(dataset).__name__}: "
                        "CREST reads examples by index (its random subsets and coresets), which a stream "
                        "(IterableDataset) cannot serve")


def _length(dataset) -> int:
    try:
        return int(len(dataset))
    except TypeError as exc:
        raise TypeError(
            f"the dataset must be a map-style torch Dataset with __len__ and __getitem__, got "
            f"{type(dataset).__name__}"
        ) from exc



def _graph_reused(e: Exception) -> bool:
    """Whether torch refused a backward through a freed graph: a module kept a tensor made with gradients
    across forwards (LeViT's eval-mode attention-bias cache, rebuilt at the first measured forward after
    ``train()``), and the next chunk's backward went through it again. The pass is then run again with
    the graphs retained (each freed with its chunk's loss), at the cost of the memory a backward frees."""
    return isinstance(e, RuntimeError) and "backward through the graph a second time" in str(e)


def _reentrant_checkpoint(e: Exception) -> None:
    """Re-raise torch's refusal of ``torch.autograd.grad`` through ``checkpoint(use_reentrant=True)`` naming
    CREST's passes and the fix (torch's message also offers a ``backward()`` change that is not the user's)."""
    if "use_reentrant=True" in str(e):
        raise RuntimeError(
            "CREST's measurements take gradients and Hessian-vector products with torch.autograd.grad, which "
            "torch.utils.checkpoint(..., use_reentrant=True) inside the model refuses: use "
            "checkpoint(..., use_reentrant=False) (the same values and memory saving, and torch's recommended "
            "setting)"
        ) from e


def _grads(loss, params, create_graph: bool = False, retain_graph: bool = False):
    """``torch.autograd.grad`` of ``loss`` w.r.t. ``params`` (None for a parameter it does not use), or None
    for a loss that needs no gradient (no parameter reached, as a layer merged in eval mode: the caller says
    why); torch's refusals through compiled code or reentrant checkpoints explained."""
    if not loss.requires_grad:
        return None
    try:
        return torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True,
                                   retain_graph=retain_graph or create_graph)
    except RuntimeError as e:
        if create_graph:
            _compiled_double_backward(e)
        _reentrant_checkpoint(e)
        raise


def add_grad(loss, params, acc, retain_graph: bool = False) -> list[bool]:
    """Add the gradient of ``loss`` w.r.t. ``params`` into the tensors ``acc``, in place (a parameter the
    loss does not use adds nothing). ``torch.autograd.grad``: no ``.grad`` attribute is touched. Returns
    whether the loss uses each parameter (none, adding nothing, for a loss that needs no gradient).
    ``retain_graph``: for a module that keeps a tensor made with gradients across forwards (see
    :func:`_graph_reused`)."""
    grads = _grads(loss, params, retain_graph=retain_graph)
    if grads is None:
        return [False] * len(params)
    for s, g in zip(acc, grads):
        if g is not None:
            s.add_(g)
    return [g is not None for g in grads]


def _compiled_double_backward(e: Exception) -> None:
    """Re-raise torch's refusal of a double backward through compiled code with what to do about it."""
    text = str(e)
    if "donated buffer" in text or "does not currently support double backward" in text:
        has_stance = hasattr(getattr(torch, "compiler", None), "set_stance")
        raise RuntimeError(
            "CREST's curvature estimate (the quadratic model's Hutchinson probe) takes a double backward, which "
            "torch.compile'd code refuses. " + (
                "CREST's measurements run compiled code eagerly (torch.compiler.set_stance('force_eager')), so "
                "this compiled code was reached outside them, or in a way the stance does not cover (a "
                "forward= or loss_fn of yours that compiles, a call to add_hvp of your own): run that code "
                "eagerly in the measurements, or compile the whole model instead (torch.compile(model), "
                "whose original module CREST measures)" if has_stance else
                f"This torch ({torch.__version__}) has no torch.compiler.set_stance (torch >= 2.6), with which "
                "CREST runs compiled code eagerly in its measurements: compile the whole model instead "
                "(torch.compile(model), whose original module CREST measures), not a part of it")
        ) from e


def add_hvp(loss, params, vectors, acc, grad_acc=None, retain_graph: bool = False) -> list[bool]:
    """Add ``H v`` of ``loss`` w.r.t. ``params`` (double backward) into the tensors ``acc``, in place;
    with ``grad_acc``, add the gradient (the first backward's, no extra pass) into it too. Returns whether
    the loss uses each parameter.

    ``vectors`` are shaped like ``params``; a loss that is linear in every parameter adds nothing.
    """
    grads = _grads(loss, params, create_graph=True)
    if grads is None:
        return [False] * len(params)
    if grad_acc is not None:
        for s, g in zip(grad_acc, grads):
            if g is not None:
                s.add_(g.detach())
    dot = None
    for g, v in zip(grads, vectors):
        if g is not None and g.requires_grad:
            term = (g * v).sum()
            dot = term if dot is None else dot + term
    used = [g is not None for g in grads]
    if dot is None:  # H = 0
        return used
    try:
        hv = torch.autograd.grad(dot, params, allow_unused=True, retain_graph=retain_graph)
    except (NotImplementedError, RuntimeError) as e:
        _compiled_double_backward(e)
        if "derivative for" not in str(e) or "not implemented" not in str(e):
            raise
        raise NotImplementedError(
            "CREST's curvature estimate (the quadratic model's Hutchinson probe, a Hessian-vector product "
            "by double backward) needs second derivatives of the loss, and an operation of this model has "
            f"none ({e}). Replace that operation, inside the model, by one written with operations that have "
            "them: for instance nn.EmbeddingBag(mode='mean') by nn.Embedding followed by a mean over the bag, a "
            "fused attention kernel by the math one, torch.cdist(a, b) by ((a[:, None] - b[None]) ** 2).sum(-1)"
            ".clamp_min(1e-12).sqrt()"
        ) from e
    for s, h in zip(acc, hv):
        if h is not None:
            s.add_(h.detach())
    return used

def _double_backward_attention():
    """``scaled_dot_product_attention`` on its math kernel: the fused (flash, memory-efficient) kernels
    have no double backward, which the Hessian-vector products need (transformers use SDPA by default)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


_RUNNING_NAMES = ("running_mean", "running_var", "running_std")  # normalisation statistics by name
# the buffers a check's token copies at most (bytes; the running statistics aside); above it every check measures
TOKEN_BUFFER_BYTES = 16 * 2**20


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns as integers of its element size (a complex tensor's as its real pairs'), so that
    equality is bit for bit: a NaN equals itself, -0.0 differs from +0.0."""
    if t.is_quantized:  # its values with their scale and zero point (a view of a quantized tensor crashes torch)
        t = t.dequantize()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t if t.dtype == torch.bool else t.view(_BITS[t.element_size()])


class _Values:
    """Tensors compared bit for bit on their device: a part of a check's token."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: list):
        self.tensors = tensors

    def __eq__(self, other) -> bool:
        return (isinstance(other, _Values) and len(other.tensors) == len(self.tensors)
                and all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                        and torch.equal(_bits(a), _bits(b)) for a, b in zip(self.tensors, other.tensors)))

    __hash__ = None  # type: ignore[assignment]


def _check_materialized(model) -> None:
    """Refuse a model with lazy parameters or buffers not yet materialised (``nn.LazyLinear``,
    ``nn.LazyBatchNorm1d`` before their first forward) or with parameters or buffers on the ``meta``
    device (deferred initialisation before ``to_empty``): CREST measures the model before its first
    training step, where torch's own error names no fix."""
    lazy = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if torch.nn.parameter.is_lazy(t)]
    if lazy:
        more = f" and {len(lazy) - 3} more" if len(lazy) > 3 else ""
        raise ValueError(
            f"the model has lazy parameters or buffers not yet materialised ({', '.join(lazy[:3])}{more}): CREST "
            "measures the model before the first training step, so run one forward on a batch before iterating "
            "(as torch asks before building the optimizer)"
        )
    meta = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if meta:
        more = f" and {len(meta) - 3} more" if len(meta) > 3 else ""
        raise ValueError(
            f"the model has parameters or buffers on the meta device ({', '.join(meta[:3])}{more}), which hold no "
            "values: CREST measures the model before the first training step, so materialise it before iterating "
            "(model.to_empty(device=...) and initialise the weights, or load_state_dict(..., assign=True))"
        )


def _running_stats(model: nn.Module) -> list:
    """``(name, buffer)`` of the model's normalisation running statistics, which its training forwards move
    by themselves: the floating buffers of torch's BatchNorm and InstanceNorm layers (``_NormBase``), and
    any module's floating buffers named ``running_mean``, ``running_var`` or ``running_std`` (a
    normalisation layer of another library: a batch renormalisation's mean and std together). Names as
    ``model.named_buffers()`` gives them, each buffer once. Other floating buffers (a temperature the loop
    anneals, a pruning mask, a ``running_scale`` of the user's) are the user's state: measurements see
    them live."""
    out, seen = [], set()
    for mname, mod in model.named_modules():
        norm = isinstance(mod, nn.modules.batchnorm._NormBase)
        for bname, b in mod.named_buffers(recurse=False):
            if (b is not None and b.is_floating_point() and id(b) not in seen
                    and (norm or bname in _RUNNING_NAMES)):
                seen.add(id(b))
                out.append((f"{mname}.{bname}" if mname else bname, b))
    return out


_SHARED_LOCK = threading.Lock()
_shared_held: dict[str, list] = {}  # a process-wide setting's name -> [holders, the context that set it]


@contextlib.contextmanager
def _shared_setting(name: str, make):
    """``make()``'s context (a process-wide setting changed and put back) held while any thread holds it:
    the first to enter enters it, the last to leave exits it. Entered and exited by each holder, two loaders
    measuring in two threads put the setting back in the wrong order and left it changed for the process
    (review 114: attention's fast path off, every later ``torch.compile`` run eagerly)."""
    with _SHARED_LOCK:
        held = _shared_held.get(name)
        if held is None:
            ctx = make()
            ctx.__enter__()
            held = _shared_held[name] = [0, ctx]
        held[0] += 1
    try:
        yield
    finally:
        with _SHARED_LOCK:
            held[0] -= 1
            if held[0] == 0:
                del _shared_held[name]
                held[1].__exit__(None, None, None)


def _eager():
    """Every ``torch.compile``d function run eagerly (``torch.compiler.set_stance("force_eager")``, torch >=
    2.6): a compiled submodule, a LightningModule whose forward Lightning compiled (``trainer.fit(
    torch.compile(module))``), ``nn.Module.compile()``. The measurements take double-backward Hessian-vector
    products, which compiled graphs refuse (AOTAutograd's donated buffers). Process-wide: shared between
    threads (:func:`_shared_setting`)."""
    stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    if stance is None:
        return contextlib.nullcontext()
    return _shared_setting("compile stance", lambda: stance("force_eager"))


@contextlib.contextmanager
def _torch_rng_kept(device: torch.device):
    """torch's CPU generator (and ``device``'s, if CUDA) as they were: a model that draws in eval mode
    (Monte Carlo dropout) draws the same numbers at every measured forward and leaves the user's stream
    alone. A microsecond or two (Python's and NumPy's states, which a forward rarely draws from, would
    cost 70 us a forward)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


_FRAMEWORKS = ("torch", "transformers", "accelerate", "lightning", "pytorch_lightning", "peft", "crestcore")


def _own_train(module: nn.Module) -> bool:
    """Whether ``module``'s class has a ``train()`` of the user's (or a third library's) own: not torch's,
    nor one a framework defines for every model (Hugging Face's ``PreTrainedModel``, DDP, torch.ao's fused
    modules)."""
    f = type(module).train
    return f is not nn.Module.train and str(getattr(f, "__module__", "")).split(".")[0] not in _FRAMEWORKS


# the widest label space a probe of the user's loss_fn is built for (161 x 65,536 logits: 42 MB in float32);
# wider ones (label ids such as 10**11 make max + 1 that wide) are not probed
_PROBE_CLASSES = 1 << 16


# the logits one probe of the user's loss_fn builds (161 margins x classes probed x classes), at most this many
# or 161 x classes where one class alone is more (42 MB in float32 at _PROBE_CLASSES): every class up to about
# 160 classes, fewer above (spread over the classes, class 0 and the last among them), class 0 alone from about
# 13,000
_PROBE_LOGITS = 4 * 2**20


def _warn_loss_floor(loss_fn, config: CrestConfig, classes: int, owner: str) -> None:
    """With dropping on (``T2``), warn when the user's ``loss_fn`` cannot go below ``DropConfig.alpha`` on an
    example its model gets right (label smoothing has such a floor: 0.50 for 0.1 over ten classes), so that no
    example can ever be dropped as learned (review 106: 0 of 1,797 dropped, silently). The probe is one
    row per logit margin t from 0 to 40, the right class at t / 2 and every other at -t / 2 (a softmax loss
    sees the margin alone; a one-vs-rest sigmoid loss, BCE or focal, also sees every other class's logit
    go down, which it needs to reach its own floor: review 107), for every class (a class-weighted loss has a
    floor per class: review 176, where class 0's alone was probed and the advice left the other nine classes
    undroppable), or for as many classes as ``_PROBE_LOGITS`` allows, on the CPU; a ``loss_fn`` that cannot take
    it (another device, another output form) is not checked."""
    if loss_fn is None or config.T2 is None or not 2 <= classes <= _PROBE_CLASSES:
        return
    margins = torch.linspace(0.0, 40.0, 161)
    k = margins.numel()
    probed = np.unique(np.linspace(0, classes - 1, max(1, min(classes, _PROBE_LOGITS // (k * classes))))
                       .round().astype(np.int64))
    rows = probed.size * k  # one call: every probed class's margins, (class, margin) row-major
    try:
        logits = (-margins / 2)[None, :, None].repeat(probed.size, 1, classes)
        cls = torch.as_tensor(probed)
        logits[torch.arange(probed.size), :, cls] = margins / 2
        with torch.no_grad():
            ell = torch.as_tensor(loss_fn(logits.reshape(rows, classes), cls.repeat_interleave(k))).reshape(-1)
        if ell.numel() != rows:
            return
        # each probed class's floor, read back inside the try (a loss on another device is not checked, as before
        # the per-class probe: review 178), detached (a loss that requires grad is read and checked)
        low = ell.detach().reshape(probed.size, k).min(dim=1).values.double().cpu().numpy()
    except Exception:  # noqa: BLE001 - a loss_fn for another device or output form: not checked here
        return
    alpha = float(config.drop.alpha)
    stuck = probed[np.isfinite(low) & (low >= alpha)]
    if stuck.size == 0:
        return
    top = float(low[np.isfinite(low)].max())
    named = f"class {', '.join(str(int(c)) for c in stuck[:5])}{', ...' if stuck.size > 5 else ''}"
    which = (f"on {classes} classes" if stuck.size == probed.size == classes else
             f"for {stuck.size} of the {classes} classes ({named})" if probed.size == classes else
             f"for {stuck.size} of the {probed.size} classes probed (of {classes}; {named})")
    spread = "" if float(low.min()) == top or not np.all(np.isfinite(low)) else (
        f"; the floors differ by class, {float(low.min()):.3g} to {top:.3g} (class weights? with class-weighted "
        "label smoothing, unequal logits of the other classes reach a little below the probe's, which sets them "
        "equal)")
    warnings.warn(
        f"{owner}: loss_fn's smallest loss on a correctly classified example is about {top:.3g} (over logit "
        f"margins 0-40 {which}), not below DropConfig.alpha={alpha:g}{spread}: with dropping on (T2="
        f"{config.T2}) no example of {'these classes' if stuck.size < classes else 'any class'} can ever count as "
        f"learned (label smoothing has such a floor). Pass an alpha above the largest floor, e.g. the floor plus "
        f"yours, which keeps your margin above it, CrestConfig(..., drop=DropConfig(alpha={top + alpha:.2g})), or a "
        "loss_fn without one",
        stacklevel=_common.user_stacklevel())


def _gradients_possible() -> None:
    """Refuse a gradient measurement under ``torch.inference_mode()``, which ``torch.enable_grad`` cannot lift
    (review 106: the failure then read as a model whose parameters get no gradient, naming LoRA layers)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "CREST's measurements need gradients, and this call runs under torch.inference_mode(), which they "
            "cannot switch off (torch.no_grad they can): iterate the loader outside inference mode; "
            "torch.no_grad() around the training loop is fine")


def _buffer_snapshot(model: nn.Module) -> list:
    """``(module, name, buffer, copy)`` of every buffer of every module of ``model``, for :func:`_put_back`."""
    return [(mod, name, b, b.detach().clone()) for mod in model.modules()
            for name, b in mod._buffers.items() if b is not None]


def _put_back(mod: nn.Module, name: str, b: torch.Tensor, snapshot: torch.Tensor) -> None:
    """Buffer ``name`` of ``mod`` back to ``b`` holding ``snapshot``'s values, written through ``.data`` (no
    autograd version bump): also when the forward reassigned the buffer or resized it. A TorchScript
    module's buffers cannot be reassigned from Python, nor by its forward: only their values go back."""
    try:
        if mod._buffers[name] is not b:  # reassigned by the forward
            mod._buffers[name] = b
    except (KeyError, TypeError, AttributeError, RuntimeError):  # a ScriptModule's wrapper of its buffers
        pass
    if b.shape == snapshot.shape and b.dtype == snapshot.dtype:
        b.data.copy_(snapshot)
    else:  # resized (an observer's first use) or retyped
        b.data = snapshot


def _no_mha_fastpath():
    """Attention's inference fast path off (``torch.backends.mha``): in eval mode without gradients,
    ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` run a fused kernel on nested tensors whose
    padded positions come out as 0, while the gradient passes take the ordinary path; a model that reads the
    padded positions (a mean over all of them) would be measured as two functions. Process-wide: shared
    between threads (:func:`_shared_setting`)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "get_fastpath_enabled"):  # pragma: no cover - torch < 2.1
        return contextlib.nullcontext()
    return _shared_setting("mha fast path", lambda: _mha_fastpath_off(mha))


@contextlib.contextmanager
def _mha_fastpath_off(mha):
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def _rnn_without_cudnn(model: nn.Module):
    """cuDNN off for a model with recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``): on CUDA their cuDNN
    kernels refuse a backward in eval mode and have no double backward, which the measurements need
    (nothing changes on the CPU, where cuDNN is not used)."""
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return torch.backends.cudnn.flags(enabled=False)
    return contextlib.nullcontext()


class _Progress:
    """Progress bars (tqdm) for measurement passes, shown only once a pass has run ``after`` seconds, so
    short passes print nothing; without tqdm, one warning and no bars."""

    def __init__(self, after: float = 1.0):
        self.after = float(after)
        self._warned = False

    def start(self, total: int):
        return _ProgressPass(self, total)


class _ProgressPass:
    def __init__(self, owner: _Progress, total: int):
        self.owner, self.total, self.done, self.bar = owner, int(total), 0, None
        self.t0 = time.perf_counter()

    def advance(self, k: int) -> None:
        self.done += int(k)
        if self.bar is None and time.perf_counter() - self.t0 >= self.owner.after and self.done < self.total:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                if not self.owner._warned:
                    self.owner._warned = True
                    warnings.warn("progress=True needs tqdm (pip install tqdm); no progress is shown",
                                  stacklevel=_common.user_stacklevel())
                return
            self.bar = tqdm(total=self.total, initial=self.done, desc="CREST measurement pass", unit="ex",
                            leave=False)
            if isinstance(getattr(self.bar, "start_t", None), float):  # its clock from the pass's start, not
                self.bar.start_t -= time.perf_counter() - self.t0  # from the bar's (shown after `after` s)
        elif self.bar is not None:
            self.bar.update(int(k))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _IndexLists:
    """A ``batch_sampler`` whose batches are set before each pass (``items``: lists of indices)."""

    def __init__(self):
        self.items: list[list[int]] = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class _Fetcher:
    """Collated examples for a set of indices, through the dataset's own ``__getitem__`` (transforms
    included) and ``collate_fn`` (default ``default_collate``). A ``TensorDataset`` is sliced directly."""

    def __init__(self, dataset, collate_fn=None):
        self.dataset = dataset
        self.collate = collate_fn if collate_fn is not None else _DefaultCollate()
        self._tensors = type(dataset) is TensorDataset and collate_fn is None
        self.random_free = self._tensors  # its loads draw no random numbers
        if self._tensors:
            for x in dataset.tensors:  # (review 170: torch's bare "Could not run 'aten::index_select'" otherwise)
                if x.layout not in (torch.strided, torch.sparse_coo):
                    raise TypeError(
                        f"the TensorDataset holds a tensor of layout {x.layout}, whose rows torch cannot select: "
                        "give it as a sparse COO tensor (x.to_sparse_coo()) or a dense one, or pass collate_fn= "
                        "to build the batches from its items")

    def __call__(self, idx: np.ndarray):
        if self._tensors:
            t = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
            # a sparse COO tensor's rows by index_select (advanced indexing raised torch's bare
            # NotImplementedError, review 169), coalesced as a loaded batch is; dense ones by indexing, which
            # keeps their memory format (channels_last) and a subclass's own indexing
            return tuple(x.index_select(0, t.to(x.device)).coalesce() if x.layout == torch.sparse_coo
                         else x[t.to(x.device)] for x in self.dataset.tensors)
        keys = [int(i) for i in idx]
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(keys) if callable(getitems) else [self.dataset[i] for i in keys]
        return _plain(self.collate(items))


class _DefaultCollate:
    """``default_collate`` for the measurement passes of a loader given no ``collate_fn``: its errors
    (items of unequal sizes, say) get a note that the passes collate with it, and that a ``DataLoader``'s
    own ``collate_fn`` (padding) must be given to the loader too. Picklable (measurement workers)."""

    def __call__(self, items):
        try:
            return default_collate(items)
        except Exception as exc:
            if hasattr(exc, "add_note"):  # Python >= 3.11; before, the error as it is
                exc.add_note(
                    "[crestcore: CREST's measurement passes collate the dataset's items with default_collate, "
                    "since the CrestLoader / CrestBatchSampler was given no collate_fn: if your DataLoader collates "
                    "its own way (padding, say), give the same collate_fn= to the CREST loader too]")
            raise


def _plain(batch):
    """A collated batch that is a mapping but not a ``dict`` (a Hugging Face ``BatchEncoding``, a
    ``UserDict``) as a plain ``dict`` of the same entries; anything else as it is."""
    if isinstance(batch, collections.abc.Mapping) and not isinstance(batch, dict):
        return dict(batch)
    return batch


def _same_batch(a, b) -> bool:
    """Whether two collated batches are equal, field by field: tensors and arrays bit for bit (NaN equal to
    NaN); mappings by key, sequences element by element, dataclasses and other objects by their fields; floats
    with NaN equal to NaN; anything else by ``==``. True where equality cannot be told (an object whose ``==``
    fails or is not a truth value): only a batch shown to differ counts as a random collate (review 153: a
    deterministic dataclass batch counted as one, which also skipped the order check)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b)))
    if isinstance(a, (np.ndarray, np.generic)) or isinstance(b, (np.ndarray, np.generic)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype == object:  # (elements that are tensors or objects: one by one)
            return all(_same_batch(x, y) for x, y in zip(a.ravel(), b.ravel()))
        try:
            return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fcmM"))
        except (TypeError, ValueError):
            return True
    if isinstance(a, collections.abc.Mapping) and isinstance(b, collections.abc.Mapping):
        return a.keys() == b.keys() and all(_same_batch(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_batch(x, y) for x, y in zip(a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, (float, complex)):
        return a == b or (a != a and b != b)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return all(_same_batch(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    fields = _object_fields(a)
    if fields:  # an object of fields (in __dict__ or __slots__): compared by them, whatever its own == says (review
        # 154: slots objects fell back to identity, objects whose == returns a tensor to "cannot tell")
        return fields == _object_fields(b) and all(_same_batch(getattr(a, f), getattr(b, f)) for f in fields)
    try:
        same = a == b
    except Exception:
        return True
    if type(a).__eq__ is object.__eq__ or not isinstance(same, (bool, np.bool_)):
        return True  # identity, or no truth value: cannot tell
    return bool(same)


def _object_fields(a) -> list[str]:
    """The attribute names of an object's state: its ``__dict__`` and the ``__slots__`` of its classes (those set)."""
    names = list(getattr(a, "__dict__", {}) or {})
    for cls in type(a).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in ((slots,) if isinstance(slots, str) else slots):
            if name not in ("__dict__", "__weakref__") and name not in names and hasattr(a, name):
                names.append(name)
    return names


def _nbytes(batch) -> int:
    """Bytes of the tensors (and NumPy arrays) in a collated batch."""
    if isinstance(batch, torch.Tensor):
        return batch.element_size() * batch.nelement()
    if isinstance(batch, np.ndarray):
        return int(batch.nbytes)
    if isinstance(batch, dict):
        return sum(_nbytes(v) for v in batch.values())
    if isinstance(batch, (tuple, list)):
        return sum(_nbytes(v) for v in batch)
    return 64


def _rows_tree(batches: list, take=None, counts=None):
    """Collated batches joined along their first dimension (``take`` None), or the rows ``take`` (a
    slice or an integer index tensor) of one joined batch; tensors nested in tuples, lists, NamedTuples and
    dicts. None when a leaf is not a tensor with a row per example (it cannot be indexed by example): with
    ``counts`` (the examples of each batch), a leaf whose first dimension is not its batch's example count
    (a sequence-first layout, a shared tensor) is not one."""
    first = batches[0] if take is None else batches
    if isinstance(first, torch.Tensor):
        if first.ndim == 0:
            return None
        if take is None:
            # chunks padded to their own longest item (a padding collate_fn) cannot be joined: not kept
            same = all(isinstance(b, torch.Tensor) and b.ndim == first.ndim and b.shape[1:] == first.shape[1:]
                       and b.dtype == first.dtype for b in batches)
            if counts is not None:
                same = same and all(b.shape[0] == c for b, c in zip(batches, counts))
            return torch.cat(batches) if same else None
        return first[take] if isinstance(take, slice) else first.index_select(0, take)
    parts = (lambda i: [b[i] for b in batches]) if take is None else (lambda i: first[i])
    if isinstance(first, tuple) or isinstance(first, list):
        out = [_rows_tree(parts(i), take, counts) for i in range(len(first))]
        if any(o is None for o in out):
            return None
        return type(first)(*out) if hasattr(first, "_fields") else type(first)(out)
    if isinstance(first, dict):
        got = {k: _rows_tree(parts(k), take, counts) for k in first}
        return None if any(v is None for v in got.values()) else got
    return None


def _tensor_leaves(batch) -> list:
    """The tensors of a collated batch (nested in tuples, lists, NamedTuples, dicts), in order."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        return [t for b in batch for t in _tensor_leaves(b)]
    return []


def _to_device(batch, device, non_blocking: bool = False, floats: torch.dtype | None = None):
    """``batch`` (tensors nested in tuples, lists, NamedTuples, dicts) moved to ``device``; with ``floats``,
    its floating-point tensors are also cast to that dtype (integer tensors, e.g. labels, are not)."""
    if isinstance(batch, torch.Tensor):
        if floats is not None and batch.is_floating_point() and batch.dtype != floats:
            return batch.to(device, dtype=floats, non_blocking=non_blocking)
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # NamedTuple
        return type(batch)(*(_to_device(b, device, non_blocking, floats) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device, non_blocking, floats) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, non_blocking, floats) for k, v in batch.items()}
    return batch


def _unshared(batch, host):
    """``batch`` (``host`` moved to a device) with every tensor that is still ``host``'s own memory
    replaced by a copy."""
    if isinstance(batch, torch.Tensor):
        same = isinstance(host, torch.Tensor) and batch.data_ptr() == host.data_ptr() and batch.device == host.device
        return batch.clone() if same else batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_unshared(b, h) for b, h in zip(batch, host)))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_unshared(b, h) for b, h in zip(batch, host))
    if isinstance(batch, dict):
        return {k: _unshared(v, host[k]) for k, v in batch.items()}
    return batch


def _same_rows(a, b) -> bool:
    """Whether two row trees (as :func:`_rows_tree` gives) hold the same tensors, bit for bit."""
    la, lb = _tensor_leaves(a), _tensor_leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
                                      for x, y in zip(la, lb))


# distinct examples loaded again and found equal to their kept rows before a dataset counts as deterministic,
# and the kept examples a pass that takes kept rows loads again all the same, to compare
_VERIFY_ROWS, _SPOT_ROWS = 512, 8

# examples per measurement forward on the CPU when none is given (TorchModelOps' batch_size)
CPU_MEASURE_BATCH = 128

# the most passes kept at once (the least recently used are dropped first, also when their bytes exceed
# cache_bytes):
# a selection keeps its forward and, with just-in-time coresets, one pass per coreset
_CACHE_PASSES = 256

_HALF = (torch.float16, torch.bfloat16)


def _no_autocast(device_type: str):
    """A region with autocast off on ``device_type`` (nothing to turn off where autocast does not exist)."""
    try:
        return torch.autocast(device_type, enabled=False)
    except (RuntimeError, ValueError):  # a device type without autocast
        return contextlib.nullcontext()


def _canonical(name: str) -> str:
    """A parameter's name without the segments wrappers add: ``module.`` of ``DataParallel`` and
    ``DistributedDataParallel`` in front, ``_orig_mod.`` of ``torch.compile`` anywhere; so a checkpoint
    names the same parameters whether its model was wrapped at the save, at the load, or both."""
    parts = name.split(".")
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p != "_orig_mod")


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is float16 or bfloat16 (what CREST computes features, gradients and the
    quadratic model in), else unchanged."""
    return t.float() if t.dtype in _HALF else t


_LABEL_KEYS = ("labels", "label", "label_ids")


def _label_columns(host, k: int) -> list:
    """The columns of ``k`` rows a collated batch could hold its labels in (the fields of a tuple or list,
    the values of a dict: tensors of shape (k,) or (k, 1), integer or float with whole values), as int64
    host arrays."""
    fields = host.values() if isinstance(host, dict) else host if isinstance(host, (tuple, list)) else ()
    out = []
    for f in fields:
        if (not isinstance(f, torch.Tensor) or f.shape not in ((k,), (k, 1)) or f.dtype.is_complex
                or f.dtype == torch.bool):
            continue
        v = f.detach().reshape(k).cpu()
        if v.dtype.is_floating_point and not (bool(torch.isfinite(v).all()) and torch.equal(v, v.round())):
            continue
        out.append(v.to(torch.int64).numpy())
    return out


def _row_safe(collate) -> bool:
    """Whether rows picked from a batch ``collate`` made are what it makes of those items (so a pass may be
    served from kept rows): torch's ``default_collate`` (no collate given) and Hugging Face's
    ``default_data_collator`` stack the items' fields; a collate of yours says so with an attribute
    ``crest_rows = True`` (a wrapper forwards its inner collate's)."""
    if collate is None or collate is default_collate or getattr(collate, "crest_rows", False) is True:
        return True
    return (getattr(collate, "__module__", None) == "transformers.data.data_collator"
            and getattr(collate, "__name__", None) == "default_data_collator")


def _a_function_of(got: np.ndarray, want: np.ndarray) -> bool:
    """Whether ``got`` is a function of ``want`` (equal entries of ``want`` have equal entries of ``got``):
    labels mapped by a ``__getitem__`` (``1 - y``), not reordered."""
    return all(np.unique(got[want == v]).size == 1 for v in np.unique(want))


def _explains(out: torch.Tensor, z: torch.Tensor) -> bool:
    """Whether the logits ``z`` are the layer output ``out`` changed by an offset per row (as log-softmax
    does), by one scale (a temperature) and an offset per column (a learned bias), or by both (log-softmax
    after a temperature or a bias), to the rounding of the output's dtype, on a batch of at least three
    rows. A scale per column (a per-class logit scale) is not: the layer's weight gradients are then the
    logit gradients scaled per class, not the features ``embeddings=True`` computes (review 116)."""
    if out.shape != z.shape or out.shape[0] < 3:
        return False
    tol = 1e-2 if out.dtype in (torch.float16, torch.bfloat16) else 1e-5
    with torch.no_grad():
        o, zz = out.detach().double(), z.detach().double()
        scale = float(zz.abs().max().clamp_min(1e-30))
        d = zz - o
        if float((d - d.mean(dim=1, keepdim=True)).abs().max()) <= tol * scale:
            return True
        for oo, z2 in ((o, zz), (o - o.mean(dim=1, keepdim=True), zz - zz.mean(dim=1, keepdim=True))):
            oc, zc = oo - oo.mean(dim=0), z2 - z2.mean(dim=0)
            if bool((oc.abs().amax(dim=0) == 0).any()):  # a constant output column explains nothing
                continue
            a = float((oc * zc).sum() / (oc * oc).sum())  # one scale for every column
            if a != 0 and float((zc - a * oc).abs().max()) <= tol * scale:
                return True
        return False


def _gives_logits(out: torch.Tensor, z: torch.Tensor) -> bool:
    """Whether a layer output ``out`` is the logits ``z`` as the model returns them, or explains them
    (:func:`_explains`)."""
    return (out.shape == z.shape and torch.equal(out.detach().to(z.dtype), z)) or _explains(out, z)


def _named_logits(out):
    """A model output's logits where it names them: a dict's ``"logits"`` entry, an output object's ``.logits``
    tensor (a dataclass, a Hugging Face ``ModelOutput``); else ``out``."""
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if not isinstance(out, torch.Tensor) and isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    return out


def _output_logits(out):
    """The logits of a model called with keyword inputs (the Hugging Face convention): the output's
    ``.logits``, a dict's ``"logits"`` entry, else a tuple's first element; anything else as it is."""
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    return _named_logits(out) if logits is None else logits


def _binds(model: nn.Module, *args, **kwargs) -> bool:
    """Whether ``model.forward``'s signature takes these arguments (True when it cannot be told): a
    ``TypeError`` from a call that binds was raised inside the forward, not by the call."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):  # the wrapped module's
        model = model.module
    try:
        inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin)
        return True
    return True


def _flag_second(model: nn.Module) -> bool:
    """Whether ``model.forward``'s second positional parameter defaults to a bool: a flag such as
    ``return_features=False`` or CORDS' ``last=False``, not an input (review 136: warned about as one)."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) > 1 and isinstance(params[1].default, bool)


def _default_forward(model: nn.Module, batch, seen: dict | None = None):
    if isinstance(batch, (tuple, list)):
        try:
            out = model(batch[0])
        except TypeError as exc:
            if "argument" not in str(exc) or _binds(model, batch[0]):  # raised inside the forward: the user's
                raise
            raise TypeError(
                f"the model was called with the batch's first field, as (inputs, labels, ...) batches are, and "
                f"refused it ({exc}); for a model of several inputs pass "
                "forward=lambda model, batch: model(*batch[0]) (or however the batch holds them) returning the logits"
            ) from exc
        return _named_logits(out)
    if isinstance(batch, torch.Tensor):
        return _named_logits(model(batch))
    if isinstance(batch, dict):  # Hugging Face style: keyword inputs; the output's .logits (or its first field)
        inputs = {k: v for k, v in batch.items() if k not in _LABEL_KEYS and not k.startswith("crest_")}
        try:
            out = model(**inputs)
        except TypeError as exc:
            if "argument" not in str(exc) or _binds(model, **inputs):  # raised inside the forward: the user's
                raise
            raise TypeError(
                f"the batch is a dict, so the model was called with keywords {sorted(inputs)} and refused them "
                f"({exc}); pass forward=lambda model, batch: model(batch['...']) returning the logits"
            ) from exc
        if seen is not None and getattr(out, "logits", None) is None and isinstance(out, (tuple, list)):
            seen["tuple"] = True  # the logits taken by convention: the first element
            if "first" not in seen:  # where the elements' memory is, at the forward whose linear outputs
                # _logits notes (pointers of two forwards cannot be compared: memory is reused)
                first = out[0] if isinstance(out[0], torch.Tensor) and out[0].ndim == 2 else None
                seen["first"] = None if first is None else first.data_ptr()
                seen["others"] = [(t.data_ptr(), int(t.shape[1])) for t in out[1:] if first is not None
                                  and isinstance(t, torch.Tensor) and t.ndim == 2 and t.is_floating_point()
                                  and t.shape[0] == first.shape[0]]
        return _output_logits(out)
    raise TypeError(
        f"cannot tell the model's input in a batch of type {type(batch).__name__}; pass "
        "forward=lambda model, batch: model(...) returning the logits"
    )


def _cross_entropy(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def _example_data(n: int = 16) -> TensorDataset:
    """The examples' training set: ``n`` random points of 4 features (``torch.randn`` from a generator
    seeded with 0) with the labels ``0, 1, 0, 1, ...``."""
    return TensorDataset(torch.randn(n, 4, generator=torch.Generator().manual_seed(0)), torch.arange(n) % 2)


def _zero_classifier() -> nn.Linear:
    """The examples' untrained classifier: ``nn.Linear(4, 2)`` with every weight and bias zero (zero
    logits, so the cross-entropy is ``log 2`` on every example)."""
    model = nn.Linear(4, 2)
    for p in model.parameters():
        nn.init.zeros_(p)
    return model




# ------------------------------------------------------------------------------------------------
# model operations
# ------------------------------------------------------------------------------------------------
class TorchModelOps:
    """The controller's :class:`crestcore.ModelOps` for a PyTorch classifier and a map-style dataset.

    Parameters
    ----------
    model : the ``nn.Module``; ``forward(model, batch)`` must give (k, C) logits.
    dataset : any ``torch.utils.data.Dataset`` with ``__len__``; examples are loaded by index through
        ``__getitem__`` (its transforms included) or ``__getitems__`` and collated by ``collate_fn``.
    labels : (n,) integer labels; default :func:`dataset_labels`. The losses use these labels.
    loss_fn : ``loss_fn(logits, labels) -> (k,)`` per-example losses (``reduction="none"``) for
        ``gradient``, ``hutchinson``, ``losses`` and the controller's anchor, trust-check and drop losses
        (:meth:`example_losses`): a class-weighted or label-smoothed cross-entropy, say, the one the
        training step minimises. Default cross-entropy. The selection's features stay the cross-entropy's
        logit gradients (the paper's last-layer gradients).
    device : where the measurement runs; default the device of the model's parameters at each call.
    batch_size : examples per forward in measurement passes (memory and speed; results equal up to
        floating-point rounding, which another chunking may change in the last bits). Default
        ``CPU_MEASURE_BATCH`` (128) when measuring on the CPU, 512 on an accelerator: on the CPU a forward
        over 512 examples at once took 1.1-2.5 times as long as four of 128 on convolutional models and up to
        1.2 times on a transformer (large activations allocated afresh at every call), and 1-15 % less on
        an MLP (docs/benchmarks.md, "Measurement chunks on the CPU"). The gradient and Hessian-vector
        passes of the model fit use the same chunks.
    num_workers : worker processes that load the examples of the measurement passes (a persistent
        ``DataLoader`` with this ``collate_fn``, chunks in order); 0 (default) loads them in this process.
    cache_bytes : host memory for the collated batches of recent measurement passes (default 256 MiB; 0
        turns it off). Used with torch's ``default_collate`` and Hugging Face's ``default_data_collator``
        only: a ``collate_fn`` of yours may return fields that are not a row per example (a sorting
        collate's order, a batch's longest length), which a pass served by picking rows of a kept one would
        corrupt, so with one every pass is loaded, unless it has an attribute ``crest_rows = True`` (its
        batches are a row per example, each the item's own, whatever else is in the batch). The
        trust checks re-read the examples the anchor loss was measured on; kept, they
        are not loaded again and see exactly the anchor's inputs (random transforms included). A kept pass
        serves whole the passes until the next :meth:`new_anchor` (the controller calls it at every
        selection, the baselines' schedule before every selection), so a dataset with random transforms
        gives each selection fresh inputs. Once the dataset has shown it loads alike every time (512
        distinct examples, or half the dataset if fewer, loaded again and each equal bit for bit to its
        kept rows), later anchors take the kept rows of the examples they hold and load the others, and 8
        held ones to compare (any difference ends this for good). A transform that changes few examples,
        or items changed in place during training, can go unnoticed: give such a dataset
        ``cache_bytes=0``. The passes of earlier anchors share ``cache_bytes`` (the least recently used
        dropped first); the row index this needs (8 bytes an example) is kept only where it is at most a
        sixteenth of ``cache_bytes``. Set at construction: changing the attribute later takes effect only at
        the next pass kept, and never turns the index on or off.
    collate_fn : as for a ``DataLoader``; default ``default_collate``.
    reuse_checks : let a trust check at unchanged parameters take the last check's measurement (default
        True; see :meth:`state_token`); False: every check measures.
    check_labels : compare the labels with those the items of the first measurement pass carry, chunk
        by chunk (``item[1]``, or a dict item's label key) and warn when they differ; default: unless the
        labels were found from a ``TensorDataset`` (its second tensor is where they come from). Labels found
        from the dataset (its ``targets``, say) may differ from what a ``__getitem__`` that maps them returns;
        labels given may have been taken before the dataset was shuffled or filtered (review 118). The loaders
        check both, and a ``measure_dataset``'s items against the training set's labels (the same examples,
        in order).
    last_layer : for ``outputs(..., embeddings=True)``: the ``nn.Linear`` (or its name in
        ``model.named_modules()``) whose input is the penultimate embedding. Default: found at the first
        measurement and checked at every later one: the ``nn.Linear`` call of the forward whose output is
        the logits the model returns (so an auxiliary head running after the classifier is not taken), else
        the one whose output gives them up to a per-row offset (log-softmax) or a scale and a per-column
        offset (a temperature, a learned bias; not a scale per class), else the last ``nn.Linear``
        executed if it is the only one mapping to the C logits; otherwise an error.
    forward : ``forward(model, batch) -> logits`` with ``batch`` the collated examples on the device;
        default ``model(batch[0])``.

    Every measurement puts all modules in eval mode under a snapshot of the buffers, and restores each
    module's ``training`` flag and every buffer afterwards. Gradients use ``torch.autograd.grad`` with
    respect to the parameters with ``requires_grad`` (the same set as :meth:`params`), never ``.grad``.
    NaN or infinite logits or losses raise ``FloatingPointError``.

    Precision: the measurement passes give floating-point inputs in the dtype of the model's first floating-point
    parameter, trainable or not (a ``.half()`` / ``.bfloat16()`` model, or Lightning's ``"bf16-true"``, works
    unchanged), and
    logits, embeddings, gradients, Hessian probes and ``params()`` of a float16 or bfloat16 model come back
    in float32, so CREST's features, losses and quadratic model are computed in at least float32. The
    backward passes themselves run in the model's dtype, as its training step's do (the chunks' gradients
    are summed in float32): in float16, whose smallest step is 6e-8, the gradient of an almost learned
    coreset (losses of about 1e-5 and below) underflows in part or wholly to zero, as the training step's
    own does (review 176); bfloat16 has float32's range. A float32 model trained under ``torch.autocast``
    is measured in float32 (outside the autocast region).

    Examples
    --------
    Drive the controller by hand with a linear classifier on 64 examples of two classes
    (:class:`CrestLoader` does this, and the training step, for you):

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from crestcore import CrestConfig, crest_init, crest_next_batch
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.arange(64) % 2
    >>> data = TensorDataset(torch.randn(64, 4, generator=g) + 2.0 * y[:, None], y)
    >>> model = torch.nn.Linear(4, 2)
    >>> ops = TorchModelOps(model, data)
    >>> config = CrestConfig(m=8)
    >>> state = crest_init(config, ops.labels, seed=0)
    >>> state, batch = crest_next_batch(state, ops, config)
    >>> batch.indices.shape, batch.reselected, ops.params().shape
    ((8,), True, torch.Size([10]))
    """

    def __init__(
        self,
        model: nn.Module,
        dataset,
        *,
        labels=None,
        loss_fn: Callable | None = None,
        device=None,
        batch_size: int | None = None,
        collate_fn: Callable | None = None,
        last_layer: nn.Module | str | None = None,
        forward: Callable | None = None,
        num_workers: int = 0,
        cache_bytes: int = 256 << 20,
        check_labels: bool | None = None,
        reuse_checks: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _common.check_count(num_workers, "num_workers", low=0)
        model = uncompiled(model)
        self.model = model
        self.dataset = dataset
        self.n = _length(dataset)
        if self.n == 0:
            raise ValueError("the dataset is empty: CREST needs examples to select from")
        self.labels = dataset_labels(dataset) if labels is None else _as_labels(labels, self.n, "labels")
        # labels found by dataset_labels: compared once with the labels the items carry (below, _probe_labels)
        self._check_labels = (not (labels is None and isinstance(dataset, TensorDataset)) if check_labels is None
                              else bool(check_labels))
        self._measure_set = False  # dataset is a loader's measure_dataset, checked against the training labels
        # does the user's collate keep the items' order? checked at the first measurement passes (_check_collate)
        self._order_tries = (0, 0) if collate_fn is not None else None  # (passes tried, passes that kept it)
        self._labels_origin = _found_origin(dataset) if labels is None else "as given"
        self.loss_fn = loss_fn if loss_fn is not None else _cross_entropy
        self._device = None if device is None else torch.device(device)
        self.batch_size = batch_size  # validated by the setter
        self._fetch = _Fetcher(dataset, collate_fn)
        self.num_workers = int(num_workers)
        if self.num_workers and self._fetch._tensors and any(x.is_sparse for x in dataset.tensors):
            raise ValueError(  # (review 172: torch's error at the first selection)
                "measurement workers (measure_workers > 0; num_workers of TorchModelOps) with a TensorDataset of "
                "sparse tensors: the workers batch its items with default_collate, which cannot batch sparse "
                "tensors; keep the measurement passes in the training process (measure_workers=0: a TensorDataset's "
                "rows are sliced there, which costs little) or pass collate_fn=")
        self.cache_bytes = _common.check_count(cache_bytes, "cache_bytes", low=0)
        if not isinstance(reuse_checks, bool):
            raise TypeError(f"reuse_checks must be a bool, got {type(reuse_checks).__name__}")
        self.reuse_checks = reuse_checks
        # a TensorDataset is sliced in place: nothing to save by keeping its batches; a collate_fn of the
        # user's may put fields in a batch that are not a row per example (the order of a sorting collate, a
        # batch's longest length), which serving a pass by picking rows of a kept one would corrupt
        self._cacheable = self.cache_bytes > 0 and not self._fetch._tensors and _row_safe(collate_fn)
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._anchor_buffers: dict | None = None  # the buffers at the last new_anchor(), for its measurements
        self._warned_repeat = False  # last_layer called more than once in a forward: said once
        self._warned_unused = False  # trainable parameters without a gradient in the measurements: said once
        self._retain_graphs = False  # gradient passes retain each chunk's graph (see _graph_reused)
        self._seen: dict = {}  # what the default forward found ("tuple": the logits were a tuple's first element)
        self._layout_ok: bool | None = None  # whether the collate puts examples first (decided at the first keep)
        self._cache_sizes: dict = {}
        self._cache_serial: dict = {}  # key -> the number of the pass kept under it (never reused)
        self._passes_kept = 0
        # rows kept across anchors while the dataset proves deterministic (_verify): None unproven, then a bool
        # (the row index costs 8 bytes an example: only where that is a small part of cache_bytes)
        self._static: bool | None = None if 8 * self.n <= self.cache_bytes // 16 else False
        self._verified: set = set()  # examples loaded again and found equal to their kept rows
        self._spot_draws = 0  # passes assembled from kept rows (seeds the choice of the rows compared)
        self._row_bytes = float("inf")  # host bytes of one kept example (the last kept pass's)
        self._gen = 0  # the anchor the kept passes belong to (new_anchor counts them)
        self._serial_key: dict = {}  # pass number -> its key in _cache
        self._row_pass: np.ndarray | None = None  # (n,) the number of a kept pass holding each example, or -1
        self._row_at: np.ndarray | None = None  # (n,) its row there
        self.progress = None  # a _Progress: a bar for measurement passes that run longer than a second
        self._pool = None  # the persistent DataLoader of the measurement passes (num_workers > 0), made lazily
        self._collate = collate_fn
        self._outputs_looked_at = False  # the first measured outputs are checked for probabilities once
        self._found_layer = None  # (module, which of its calls) the classifier found for embeddings
        self._shape_only_warned = False  # a classifier found by its shape only was named once
        self._forward = forward if forward is not None else _default_forward
        self._check_inputs = forward is None  # the default forward's model(batch[0]) looked at once (_probe_inputs)
        self._last_layer = self._resolve_layer(last_layer) if last_layer is not None else None
        if self._last_layer is not None and not isinstance(self._last_layer, nn.Linear):
            raise TypeError(f"last_layer must be an nn.Linear, got {type(self._last_layer).__name__}")
        if not self._trainable():
            raise ValueError("the model has no parameter with requires_grad=True: nothing to train")

    # -- helpers --------------------------------------------------------------------------------
    def _resolve_layer(self, layer):
        if isinstance(layer, str):
            mods = dict(self.model.named_modules())
            # a torch.compile'd model lists its modules under "_orig_mod." (review 63: refused as not a module);
            # self.model is the module it wraps, where the name is the part after it
            name = layer[len("_orig_mod."):] if layer.startswith("_orig_mod.") and layer not in mods else layer
            if name not in mods:
                raise ValueError(f"last_layer {layer!r} is not a module of the model")
            return mods[name]
        if not any(m is layer for m in self.model.modules()):
            raise ValueError("last_layer is not a module of the model")
        return layer

    def _trainable(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        """The measurement device: the one given, else the model's (first parameter or buffer)."""
        if self._device is not None:
            return self._device
        for t in self.model.parameters():
            return t.device
        for t in self.model.buffers():
            return t.device
        return torch.device("cpu")

    @property
    def batch_size(self) -> int:
        """Examples per forward in measurement passes: the one given, else ``CPU_MEASURE_BATCH`` on the CPU
        and 512 on an accelerator (for the device of this call)."""
        if self._batch_size is not None:
            return self._batch_size
        return CPU_MEASURE_BATCH if self.device.type == "cpu" else 512

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        self._batch_size = _common.check_count(value, "batch_size", optional=True)

    def _dtype(self) -> torch.dtype:
        """The dtype the measurement passes give floating-point inputs: the model's first floating-point
        parameter's, trainable or not (a frozen bfloat16 backbone under a float32 head takes bfloat16)."""
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    _autocast_said = False  # the warning of a measurement inside a caching autocast region, once

    def _warn_cached_autocast(self) -> None:
        """A measurement inside a ``torch.autocast`` region whose weight cache is on: a loop that iterates the
        loader inside one region (review 165) trains a forward that reuses the low-precision weights cast at the
        region's first forward until the region ends (torch's cache), so the optimizer's steps never reach it,
        while CREST measures the weights that move. Said once."""
        if self._autocast_said:
            return
        dev = self.device.type
        try:
            on = bool(torch.is_autocast_enabled(dev))
        except TypeError:  # (torch before 2.4: no device argument)
            on = bool(torch.is_autocast_cpu_enabled() if dev == "cpu" else torch.is_autocast_enabled())
        except (RuntimeError, ValueError):  # a device type without autocast (meta)
            on = False
        if not (on and torch.is_autocast_cache_enabled()):
            return  # (the usual case, at every measurement: the parameters are not scanned)
        if any(p.requires_grad and p.dtype == torch.float32 for p in self.model.parameters()):
            # (the cache holds casts of float32 weights only: review 168, a float64 model's are not cast)
            self._autocast_said = True
            warnings.warn(
                "CREST measures inside a torch.autocast region (your loop advances the loader inside one) whose "
                "weight cache is on: torch keeps the low-precision copies of the weights it cast at the region's "
                "first forward until the region ends, so a forward and optimizer steps inside the same region "
                "train on those stale copies (the loss does not move), while CREST measures the weights that "
                "move. Wrap only the forward and the loss in torch.autocast, as torch advises, or pass "
                "cache_enabled=False", stacklevel=_common.user_stacklevel())

    @contextlib.contextmanager
    def _measuring(self):
        """All modules in eval mode; every module's mode and every buffer restored afterwards.

        The modes go back through each module's own ``train(mode)`` (a module whose ``train`` does something,
        as a LoRA layer that merges its weights in eval mode and unmerges them in training mode, is left as
        it was, not flagged as training while merged). The buffers are written through ``.data``: their
        values are the user's again afterwards, bit for bit, and a buffer that a forward reassigned or
        resized is put back as it was, while their autograd version counters do not move (a graph the user
        holds across ``next(loader)``, with a buffer saved for its backward, still backpropagates)."""
        self._warn_cached_autocast()
        modes = [(m, m.training) for m in self.model.modules()]  # parents before their children
        saved = _buffer_snapshot(self.model)
        evaled: list = []
        # everything that changes the model is inside the try: a KeyboardInterrupt between eval() and the
        # try left the model in eval mode with the anchor's running statistics for a loop that caught it and
        # went on training (review 114)
        try:
            self.model.eval()
            # the buffers as eval() left them (the live objects: eval() may reassign them), for the modules'
            # own train() to read back (a module that keeps a weight in a buffer at eval() and restores it at
            # train()); only where such a train() exists (torch's and the frameworks' own do not read them)
            evaled = _buffer_snapshot(self.model) if any(_own_train(m) for m, _ in modes) else []
            if self._anchor_buffers:  # the anchor's running statistics: the measured loss moves with the weights
                for name, b in _running_stats(self.model):  # never another buffer (an older checkpoint's)
                    a = self._anchor_buffers.get(name)
                    if a is not None and a.shape == b.shape and a.dtype == b.dtype:
                        b.data.copy_(a)
            # outside autocast (a loop may call the loader inside an autocast region): the model is
            # measured in its own dtype, as documented; recurrent layers off cuDNN, whose RNN kernels have
            # no backward in eval mode and no double backward (the native ones have both); attention's
            # inference fast path off, which in eval mode without gradients computes another function than
            # the gradient passes (padded positions as 0)
            with _no_autocast(self.device.type), _rnn_without_cudnn(self.model), _eager(), _no_mha_fastpath():
                yield
        finally:
            # each module's own train(): what it does there (unmerging, unfolding, dropping a cache) acts on
            # the user's buffers, and the buffers it wrote (a merged weight kept as a buffer) are then put
            # back as they were before the pass
            for mod, name, b, s in evaled:  # the buffers as eval() left them, for train() to see
                _put_back(mod, name, b, s)
            for m, mode in modes:
                if m.training != mode:
                    m.train(mode)
            for m, mode in modes:  # exact flags (a train() of a parent set its children's)
                m.training = mode
            for mod, name, b, s in saved:  # and as they were, whatever train() wrote
                _put_back(mod, name, b, s)

    def _batches(self, idx: np.ndarray, dev):
        """``((a, b), batch)`` for consecutive chunks ``idx[a:b]`` of at most ``batch_size``: loaded in this
        process, or with ``num_workers > 0`` by a persistent ``DataLoader``'s worker processes (transforms
        and decoding in parallel, the chunks in order), on ``dev`` in the parameters' dtype.

        The examples of recent measurement passes are kept on the host (up to ``cache_bytes``, when the
        collated batches are tensors with a row per example): a pass over examples that a recent pass read
        (the trust check's examples, the coresets the quadratic model is fitted on: all inside the
        selection's forward) takes their rows instead of loading them again, so every measurement of a
        selection sees the very inputs the anchor saw, random transforms included."""
        if self._order_tries is not None:
            self._check_collate(idx, dev)
        spans = list(_common.chunk_spans(idx.size, self.batch_size))
        cached = self._cached(idx, spans) if self._cacheable and spans else None
        if cached is not None:
            source, keep = cached, None
        else:
            # a deterministic dataset's kept rows, for a pass small enough to keep (one too big loads chunk by chunk)
            assemble = self._static and spans and idx.size * self._row_bytes <= self.cache_bytes // 2
            source = self._assembled(idx, spans) if assemble else self._host_batches(idx, spans)
            keep = [] if self._cacheable else None
        bar = self.progress.start(idx.size) if self.progress is not None and spans else None
        size = 0
        probing = self._check_labels and cached is None  # the labels are probed over a whole pass, once
        try:
            for (a, b), host in zip(spans, source):
                if self._check_inputs:
                    self._probe_inputs(host, idx[a:b])
                if probing and self._check_labels:
                    self._probe_labels(host, idx[a:b], first=a == 0)
                if keep is not None:
                    keep.append(host)
                    size += _nbytes(host)
                    if size > self.cache_bytes // 2:  # too big to keep
                        keep = None
                batch = _to_device(host, dev, floats=self._dtype())
                if keep is not None or cached is not None:  # kept rows: a forward that writes its input
                    batch = _unshared(batch, host)  # in place must not change them
                yield (a, b), batch
                if bar is not None:
                    bar.advance(b - a)
            if keep is not None and len(keep) == len(spans):
                self._remember(idx, keep, size)
        finally:
            if probing:
                self._check_labels = False
            if bar is not None:
                bar.close()

    def _check_collate(self, idx: np.ndarray, dev) -> None:
        """Whether the user's ``collate_fn`` keeps the items' order: CREST pairs row k of a collated batch
        with the batch's k-th example (its label in every measurement, its weight in ``CrestLoader``'s
        batches), so a collate that reorders the rows (sorting by length for ``pack_padded_sequence``)
        would pair every measurement and weight with another example.

        At most ``min(16, batch_size)`` examples spread over the pass are loaded here once, collated in
        their order (twice) and in a shuffled order, and measured: the shuffled batch's outputs must be
        the first's shuffled alike. A pass decides when the outputs tell the examples apart; the check
        ends after three passes that kept the order (other examples each time: a sort that happens to
        leave one sample in place, as ties do, is caught by another), with an error at the first that
        did not. Passes whose outputs cannot tell (every example measured alike, as with a zero head) do
        not count, up to 12 passes in all. Skipped for good when the same batch measures differently twice
        (a random model), when ``__getitems__`` does not return a list of the examples, or when the check's own
        load or forward fails (the pass then runs, and fails, as without it); and, with a warning, when the same
        items collate into two different batches (a random collate: mixup or cutmix, random noise or crops)."""
        k = min(16, self.batch_size, idx.size)
        if k < 2:
            return
        tries, kept = self._order_tries
        if tries >= 12:
            self._order_tries = None
            return
        self._order_tries = (tries + 1, kept)
        keys = [int(i) for i in idx[np.unique(np.linspace(0, idx.size - 1, k).round().astype(np.int64))]]
        perm = np.random.default_rng(tries).permutation(len(keys))
        if np.array_equal(perm, np.arange(len(keys))):
            perm = np.roll(perm, 1)
        try:
            # extra loads: random transforms in __getitem__ (or a random collate) must not advance the user's RNGs
            with _random_states_kept(), torch.no_grad():
                getitems = getattr(self.dataset, "__getitems__", None)
                items = getitems(keys) if callable(getitems) else [self.dataset[i] for i in keys]
                if not isinstance(items, (list, tuple)) or len(items) != len(keys):
                    self._order_tries = None  # not a list of the examples: nothing to reorder here
                    return
                batches = [_plain(self._fetch.collate(list(order))) for order in (items, items, [items[i] for i in perm])]
                random = not _same_batch(batches[0], batches[1])
                if not random:
                    z = [self._logits(_to_device(b, dev, floats=self._dtype()), len(keys)).double() for b in batches]
        except Exception:  # the check's own load or forward: the pass runs (and fails) as it would without it
            self._order_tries = None
            return
        if random:  # the same items collated twice, two batches: a collate that mixes them (review 151)
            self._order_tries = None
            warnings.warn(
                f"crestcore: the collate_fn of CREST's measurement passes ({_callable_name(self._fetch.collate)}) "
                "collated the same examples "
                "into two different batches: with a random collate (mixup or cutmix, which mix the examples and "
                "their labels; random noise or crops of the batch) CREST's measurement passes (the selections' "
                "features, the trust checks, the model fit) measure other inputs at every pass, mixed ones against "
                "their own example's label. Batch-level augmentation belongs to the training batches only: give "
                "CREST a collate_fn that does not draw (torch.utils.data.default_collate, or yours without the "
                "augmentation), and augment in the training step, or, with a CrestBatchSampler, in the "
                "DataLoader's collate (sampler.dataloader(collate_fn=WeightedCollate(mix))). (Said once.)",
                stacklevel=_common.user_stacklevel())
            return
        tol = (1e-2 if self._dtype() in _HALF else 1e-5) * float(z[0].abs().max().clamp_min(1e-30))
        order = torch.as_tensor(perm, device=z[0].device)

        def same(a, b):
            return float((a - b).abs().max()) <= tol

        if not same(z[0], z[1]):  # not deterministic: this check cannot tell
            self._order_tries = None
        elif not same(z[2], z[0][order]):
            self._order_tries = (tries, kept)  # refused again if tried again: raising does not spend the check
            raise ValueError(
                "the collate_fn does not keep the items' order: the same examples collated in another order "
                "give outputs that are not the first batch's in that order (a collate that sorts the rows, say "
                "by length for pack_padded_sequence). CREST pairs row k of a collated batch with its k-th "
                "example (its label, its weight), so every measurement and weight would belong to another "
                "example. Keep the items' order (sort inside the model's forward, or pack with "
                "enforce_sorted=False), or undo the sort in forward=")
        elif not same(z[0], z[0][order]):  # the order shows in the outputs: this pass kept it
            self._order_tries = None if kept + 1 >= 3 else (tries + 1, kept + 1)

    def _probe_inputs(self, host, idx: np.ndarray) -> None:
        """Warn (once, at the first chunk measured) when the default forward calls ``model(batch[0])`` but the
        batch's second field is a per-example tensor that is not the labels (a later field is), and the
        model's ``forward`` takes a second input: a model that packs by lengths or masks padding when given
        them, ``forward(x, lengths=None)``, is then measured on another function than the one trained
        (review 130: a loss of 0.98 measured against 0.55 trained, silently)."""
        self._check_inputs = False
        k = idx.size
        if not isinstance(host, (tuple, list)) or len(host) < 3:
            return
        extra = host[1]
        if not isinstance(extra, torch.Tensor) or extra.ndim == 0 or extra.shape[0] != k:
            return
        want = self.labels[idx]
        if any(np.array_equal(c, want) for c in _label_columns((extra,), k)):
            return  # the second field is the labels: (x, y, ...)
        if not any(np.array_equal(c, want) for c in _label_columns(host[2:], k)):
            return  # the labels are in no field: nothing tells what the second one is
        if _binds(self.model, host[0], extra) and _binds(self.model, host[0]) and not _flag_second(self.model):
            warnings.warn(
                "crestcore: CREST's measurement passes call the model with the batch's first field, model(batch[0]) "
                "(no forward= given), but the batch's second field is a per-example tensor that is not the labels "
                "(a later field is), and the model's forward takes a second input. If the model uses it (lengths to "
                "pack by, a padding mask), every selection, check and fit measures another function than the one "
                "you train: pass forward=lambda model, batch: model(batch[0], batch[1]) (crest_forward= on "
                "CrestTrainer); if it does not, ignore this.", stacklevel=_common.user_stacklevel())

    def _probe_labels(self, host, idx: np.ndarray, first: bool = True) -> None:
        """The labels found without the items (a ``targets`` attribute, say) against the labels the items
        of one chunk of the first measurement pass carry (``item[1]`` collated, or a dict item's label key;
        any column of the collated batch equal to them will do), a warning when they differ (a
        ``__getitem__`` that maps its targets), since CREST would select, check and drop by the wrong
        classes. Every chunk of that pass is probed (its examples spread over the whole dataset: a first
        chunk alone, the lowest indices, missed the second part of a ``ConcatDataset`` whose ``targets``
        disagreed with its items), until one warns; ``first``: the pass's first chunk, where the item
        order is probed too."""
        cols = _label_columns(host, idx.size)
        if any(np.array_equal(c, self.labels[idx]) for c in cols):
            if first:
                self._probe_item_order(idx)
            return
        self._check_labels = False  # one warning (or none) from here: the probing ends
        if not first:  # the first chunk's labels were the items' in their order: a mismatch here is one
            self._warn_labels(host, idx)
            return
        want = np.sort(self.labels[idx])
        # the labels reordered: the same labels, but not a function of the expected ones (which a
        # __getitem__ that maps its targets gives, 1 - y say: warned about below as such)
        moved = [int((c != self.labels[idx]).sum()) for c in cols
                 if np.array_equal(np.sort(c), want) and not _a_function_of(c, self.labels[idx])]
        # a reordering only where something can reorder them: the user's collate_fn (its check compares the
        # outputs, which a forward= undoing a sorting collate keeps in order, not the rows) or the dataset's
        # __getitems__ where the item-order probe (which raises where it reorders) did not see it keep the
        # order; otherwise the same labels in other rows are labels that differ (noisy labels drawn in
        # __getitem__), said below as such
        if idx.size > 1 and moved:
            items_kept = self._probe_item_order(idx)  # the dataset's own __getitems__ first (an error there)
            moved = moved if (self._collate is not None or (_batch_loads(self.dataset) and not items_kept)) else []
        if idx.size > 1 and moved:
            warnings.warn(
                f"crestcore: {self._reordered(min(moved), idx.size, 'the first measurement pass')}. If forward= "
                "undoes the collate's order, the measurements are right; CrestLoader's weights are appended "
                "after the collate in the order asked for (loader.last_indices'), and so are CrestBatchSampler's "
                "through WeightedCollate: give row r the weight w[order[r]] (w[order]), and observe() the losses in "
                "that order too (only a collate handed WeightedDataset's items as they are sorts their weights "
                "along).", stacklevel=_common.user_stacklevel())
            return
        self._warn_labels(host, idx)

    def _warn_labels(self, host, idx: np.ndarray) -> None:
        """The warning of :meth:`_probe_labels` when the items' labels (``item[1]``, or a dict item's label
        key) differ from the labels CREST uses for some examples of ``idx``."""
        got = host[1] if isinstance(host, (tuple, list)) and len(host) > 1 else None
        if isinstance(host, dict):
            got = next((host[k] for k in _LABEL_KEYS if k in host), None)
        # the label field as a column of class indices: (k,) or (k, 1), integer or whole-valued float (review
        # 119: a (1,) label tensor per item, or float targets, were never compared)
        col = _label_columns((got,), idx.size) if isinstance(got, torch.Tensor) else []
        if not col:
            return
        got_np, want = col[0], self.labels[idx]
        bad = int((got_np != want).sum())
        if bad and self._labels_origin == "as given" and not self._measure_set and (
                not np.isin(got_np, np.unique(self.labels)).all()
                or np.unique(got_np - want).size == 1
                or (_a_function_of(got_np, want) and not _a_function_of(want, got_np))):
            # given labels beside a field in another encoding (1-based classes, a constant offset however few
            # classes the chunk holds (review 136: a chunk without the top class took them for a relabelling);
            # example ids: values CREST's labels do not take; or a coarser labelling of them), which is why they
            # were given: no warning (labels taken before a shuffle or a filter take CREST's values, not as a
            # function of them; another one-to-one relabelling within CREST's classes is labels= from another
            # encoder's class order, the items' labels the ones trained on: warned, review 130)
            return
        if bad and self._measure_set:
            given = self._labels_origin == "as given"
            warnings.warn(
                f"crestcore: the items of measure_dataset carry labels that differ from the training set's "
                f"({self._labels_origin}) for {bad} of {idx.size} examples of the first measurement pass (read "
                "as item[1], or a dict item's label key): measure_dataset must hold the same examples as the "
                "training set, in the same order (each selection, check and fit would measure other examples "
                "than CREST picks)" + (", and labels= must give their classes in that order (labels taken before "
                "a shuffle or a filter would pair each example with another's class; the training set's items "
                "are not compared with them)" if given else "") + ". If both hold and its items' labels are "
                "mapped (a target_transform), pass labels= with the labels the items carry; if item[1] is not "
                "the label, ignore this.", stacklevel=_common.user_stacklevel())
        elif bad and self._labels_origin == "as given":
            warnings.warn(
                f"crestcore: the labels passed as labels= (crest_labels= on CrestTrainer) differ from the labels the "
                f"dataset's items carry for {bad} of {idx.size} examples of the first measurement pass (read as "
                "item[1], or a dict item's label key): labels= must give every example's class in the dataset's "
                "order (labels taken before the dataset was shuffled, filtered or split pair each example with "
                "another's class, and CREST would select, check and drop by the wrong classes); if item[1] is not "
                "the class label, ignore this.", stacklevel=_common.user_stacklevel())
        elif bad:
            warnings.warn(
                f"crestcore: the labels CREST uses ({self._labels_origin}) "
                f"differ from the labels the dataset's items carry for {bad} of {idx.size} examples of the "
                "first measurement pass (read as item[1], or a dict item's label key): if __getitem__ maps its "
                "targets, pass labels= with the labels the items carry (crest_labels= on CrestTrainer), since "
                "CREST would select, check and drop by the wrong classes; if item[1] is not the label, ignore "
                "this.", stacklevel=_common.user_stacklevel())

    def _reordered(self, bad: int, k: int, where: str) -> str:
        return (f"the examples of {where} come back in another order than CREST asked for them: the labels "
                f"their rows carry are the asked examples' labels ({self._labels_origin}), reordered ({bad} of {k} "
                "rows differ). CREST pairs row k of a collated batch with the k-th example it asked for (its "
                "label, its weight), so every measurement and weight would belong to another example. A "
                "collate_fn that sorts the rows (by length, for pack_padded_sequence) or a __getitems__ that "
                "returns the items in another order than its keys (sorted for h5py, say) does this: keep the "
                "keys' order (undo the sort before returning; sort inside the model's forward, or pack with "
                "enforce_sorted=False)")

    def _probe_item_order(self, idx: np.ndarray) -> bool:
        """Once, with the label probe: a dataset's own ``__getitems__`` asked for a few keys in descending order
        must return the items in that order (the first pass asks in ascending order, which a ``__getitems__``
        that sorts its keys, as h5py needs, hands back unchanged). The same keys loaded one by one are the
        reference: their label column (the one equal to the labels) must come back the same. True when it
        came back the same (the order seen kept), False when the probe could not tell."""
        getitems = getattr(self.dataset, "__getitems__", None)
        if not callable(getitems) or idx.size < 2:
            return False
        keys = np.unique(idx)[::-1][:8]
        want = self.labels[keys]
        if keys.size < 2 or np.unique(want).size < 2:
            return False  # one class: the labels cannot tell an order
        ks = [int(i) for i in keys]
        try:
            with _random_states_kept(), torch.no_grad():
                batched = _plain(self._fetch.collate(list(getitems(ks))))
                single = _plain(self._fetch.collate([self.dataset[k] for k in ks]))
        except Exception:  # the probe's own loads: the passes run (and fail) as they would without it
            return False
        one, many = _label_columns(single, keys.size), _label_columns(batched, keys.size)
        if len(one) != len(many):
            return False
        kept = False
        for a, b in zip(one, many):
            if (np.array_equal(a, want) and not np.array_equal(b, want)
                    and np.array_equal(np.sort(b), np.sort(want))):
                raise ValueError(self._reordered(int((b != want).sum()), keys.size,
                                                 "a batched __getitems__ asked for keys in descending order"))
            kept = kept or (np.array_equal(a, want) and np.array_equal(b, want))
        return kept

    def new_anchor(self) -> None:
        """Start a new anchor: the kept measurement passes no longer serve whole, so a dataset with random
        transforms gives the next passes fresh inputs; the rows of a dataset that has shown it loads alike
        every time stay (see ``cache_bytes``). The controller calls this at every selection, so that the
        trust checks and the model fit of a selection see that selection's inputs. It also keeps the
        normalisation layers' running statistics as they are now (BatchNorm's; see ``_running_stats``): the
        measurements until the next anchor run with them, not with the statistics the training steps have
        moved since. Other floating buffers (a temperature the loop anneals, a pruning mask) are measured
        as they are.

        Examples
        --------
        >>> import torch
        >>> ops = TorchModelOps(torch.nn.Linear(4, 2), _example_data())  # 16 random points of 4 features
        >>> ops.new_anchor()  # nothing kept yet: nothing to forget
        """
        _check_materialized(self.model)
        if self._static is False:
            self._forget(list(self._cache))
        self._gen += 1  # a deterministic dataset's rows stay (_assembled); the passes serve this anchor no more
        # the running statistics now (BatchNorm's) are the anchor's: every measurement until the next anchor
        # runs with them, so the training steps' updates of the statistics between the anchor and a check do
        # not count as the quadratic model's error (the model sees the parameters only); other floating
        # buffers (a temperature, a pruning mask) are the user's and stay live
        self._anchor_buffers = {name: b.detach().clone() for name, b in _running_stats(self.model)}

    def _examples_first(self, idx: np.ndarray) -> bool:
        """Whether the collate puts the examples first in every tensor it returns, decided once: a batch of
        one example and one of two must have leaves of first dimension 1 and 2. A sequence-first layout
        ``(T, B, ...)``, or a tensor shared by the batch, cannot be told by shape from example-first rows when
        its first size happens to equal a pass's example count (three extra loads, once)."""
        if self._layout_ok is None:
            two = np.array([idx[0], idx[min(1, idx.size - 1)]], dtype=np.int64)
            with _random_states_kept():  # random transforms in __getitem__ must not advance the user's RNGs
                one, both = self._fetch(two[:1]), self._fetch(two)
            first = [t.shape[0] if t.ndim else None for t in _tensor_leaves(one)]
            second = [t.shape[0] if t.ndim else None for t in _tensor_leaves(both)]
            self._layout_ok = bool(first) and all(a == 1 for a in first) and all(b == 2 for b in second)
        return self._layout_ok

    def _remember(self, idx: np.ndarray, batches: list, size: int) -> None:
        if not self._examples_first(idx):  # a fixed property of the collate: stop keeping passes
            self._cacheable = False
            return
        counts = [b - a for a, b in _common.chunk_spans(idx.size, self.batch_size)]  # the chunks _batches read
        joined = _rows_tree(batches, counts=counts)
        if joined is None:  # not indexable by example: not kept
            return
        if self._static is None:
            self._verify(idx, joined)
        order = np.argsort(idx, kind="stable")
        key = idx.tobytes()
        self._forget([key] if key in self._cache else [])
        self._cache[key] = (idx[order], order, joined, self._gen)
        self._cache_sizes[key] = size
        self._passes_kept += 1
        self._cache_serial[key] = self._passes_kept
        self._serial_key[self._passes_kept] = key
        self._row_bytes = size / max(idx.size, 1)
        if self._static is not False:
            if self._row_pass is None:
                self._row_pass, self._row_at = np.full(self.n, -1, np.int32), np.zeros(self.n, np.int32)
            self._row_pass[idx], self._row_at[idx] = self._passes_kept, np.arange(idx.size)
        while sum(self._cache_sizes.values()) > self.cache_bytes or len(self._cache) > _CACHE_PASSES:
            self._forget([next(iter(self._cache))])

    def _forget(self, keys: list) -> None:
        """Drop the kept passes of these keys, and their rows from the row index."""
        for key in keys:
            members = self._cache.pop(key)[0]
            self._cache_sizes.pop(key)
            serial = self._cache_serial.pop(key)
            self._serial_key.pop(serial)
            if self._row_pass is not None:
                self._row_pass[members[self._row_pass[members] == serial]] = -1

    def _not_static(self) -> None:
        """The dataset gave an example other rows than a kept pass holds (random transforms): rows are kept
        within an anchor only from now on."""
        self._static = False
        self._forget([key for key, kept in self._cache.items() if kept[3] != self._gen])
        self._row_pass = self._row_at = None
        self._verified.clear()

    def _kept_rows(self, idx: np.ndarray, where: np.ndarray) -> list:
        """``[(positions, rows)]``: the kept rows of ``idx[positions]`` for the positions ``where`` (all held by
        a kept pass), one entry per pass they are read from."""
        held = self._row_pass[idx[where]]
        out = []
        for serial in np.unique(held):
            at = where[held == serial]
            key = self._serial_key[int(serial)]
            self._cache.move_to_end(key)  # used: the least recently used pass is dropped first
            rows = torch.from_numpy(self._row_at[idx[at]])
            out.append((at, _rows_tree(self._cache[key][2], rows)))
        return out

    def _as_kept(self, idx: np.ndarray, where: np.ndarray, fresh, fresh_of: np.ndarray) -> bool:
        """Whether the rows just loaded for ``idx[where]`` (``fresh``, whose rows are the examples
        ``idx[fresh_of]`` in that order, ``fresh_of`` sorted) equal the kept rows, bit for bit."""
        return all(_same_rows(rows, _rows_tree(fresh, torch.from_numpy(np.searchsorted(fresh_of, at))))
                   for at, rows in self._kept_rows(idx, where))

    def _verify(self, idx: np.ndarray, joined) -> None:
        """Compare the rows a pass loaded (``joined``, in ``idx``'s order) for examples a kept pass holds with
        the kept rows: any difference (random transforms) keeps rows within an anchor only; after
        ``_VERIFY_ROWS`` distinct examples equal (half the dataset, if that is fewer), the dataset counts as
        deterministic and later anchors take their rows too (:meth:`_assembled`)."""
        if self._row_pass is None:
            return
        hit = np.flatnonzero(self._row_pass[idx] >= 0)
        if not self._as_kept(idx, hit, joined, np.arange(idx.size)):  # joined: a row per position of idx
            self._not_static()
            return
        self._verified.update(idx[hit].tolist())
        if len(self._verified) >= min(_VERIFY_ROWS, max(self.n // 2, 1)):
            self._static = True
            self._verified.clear()

    def _assembled(self, idx: np.ndarray, spans):
        """With a deterministic dataset, the host batches of ``idx`` with the rows of kept passes (of any
        anchor) for the examples they hold and the others loaded; a few held examples (``_SPOT_ROWS``) are
        loaded too and compared with their kept rows, and any difference ends this for good (the pass is
        then loaded in full, as is a pass no kept pass holds any example of)."""
        held = self._row_pass[idx] >= 0
        hit = np.flatnonzero(held)
        if hit.size == 0:
            yield from self._host_batches(idx, spans)
            return
        self._spot_draws += 1
        spot = np.random.default_rng(self._spot_draws).choice(hit, size=min(_SPOT_ROWS, hit.size), replace=False)
        load = np.union1d(np.flatnonzero(~held), spot)
        sub = idx[load]
        sub_spans = list(_common.chunk_spans(sub.size, self.batch_size))
        loaded = _rows_tree(list(self._host_batches(sub, sub_spans)), counts=[b - a for a, b in sub_spans])
        if loaded is not None:
            if self._as_kept(idx, np.sort(spot), loaded, load):
                pieces = [(load, loaded)] + self._kept_rows(idx, np.setdiff1d(hit, spot))
                joined = _rows_tree([rows for _, rows in pieces])
                if joined is not None:
                    where = np.empty(idx.size, np.int64)
                    where[np.concatenate([at for at, _ in pieces])] = np.arange(idx.size)
                    full = _rows_tree(joined, torch.from_numpy(where))
                    del loaded, pieces, joined  # only the assembled pass stays alive while it is measured
                    for a, b in spans:
                        yield _rows_tree(full, slice(a, b))
                    return
        self._not_static()
        yield from self._host_batches(idx, spans)

    def _covering_pass(self, idx: np.ndarray):
        """``(key, rows)`` of the most recent kept pass of this anchor that read every example of ``idx``
        (``rows``: their rows there), marked as used (the least recently used pass is dropped first); or
        None."""
        for key in reversed(self._cache):
            keys, order, _, gen = self._cache[key]
            if gen != self._gen:
                continue
            at = np.minimum(np.searchsorted(keys, idx), keys.size - 1)
            if np.array_equal(keys[at], idx):
                self._cache.move_to_end(key)
                return key, order[at]
        return None

    def _cached(self, idx: np.ndarray, spans):
        """The host batches of ``idx`` taken from the most recent kept pass of this anchor that read all of
        them, or None."""
        found = self._covering_pass(idx)
        if found is None:
            return None
        key, rows = found
        joined = self._cache[key][2]
        if key == idx.tobytes():  # the same pass again: slices, no copies
            return (_rows_tree(joined, slice(a, b)) for a, b in spans)
        return (_rows_tree(joined, torch.from_numpy(rows[a:b].copy())) for a, b in spans)

    def _host_batches(self, idx: np.ndarray, spans):
        if self.num_workers == 0:
            for a, b in spans:
                if self._fetch.random_free:  # a TensorDataset's rows: nothing random to keep apart
                    yield self._fetch(idx[a:b])
                    continue
                with _measurement_randomness(idx[a:b], self._gen):  # not the user's RNGs (workers: their own)
                    batch = self._fetch(idx[a:b])
                yield batch
            return
        pool = self._worker_pool()
        pool.batch_sampler.items = [idx[a:b].tolist() for a, b in spans]
        handed = 0
        try:
            for batch in pool:
                handed += 1
                yield _plain(batch)
        finally:
            # a pass broken off before its last chunk (an error, an interrupt) leaves the workers mid-pass:
            # the next starts new ones (a pass whose chunks were all taken is closed unfinished, as usual)
            if handed < len(spans):
                self._drop_pool()

    def __getstate__(self) -> dict:
        # the measurement workers are this process's (their iterator does not pickle, nor deepcopy: review 139);
        # a copy starts its own at its first pass, as after a pass broken off
        return {**self.__dict__, "_pool": None}

    def _drop_pool(self) -> None:
        """Shut the measurement workers down; the next pass starts new ones."""
        pool, self._pool = self._pool, None
        it = getattr(pool, "_iterator", None)
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception:  # noqa: BLE001 - workers already gone: nothing left to shut down
                pass

    def _worker_pool(self):
        it = getattr(self._pool, "_iterator", None)
        if it is not None and not all(w.is_alive() for w in getattr(it, "_workers", ())):
            # a worker died between passes (a Ctrl-C sent to the process group kills the workers too): every
            # later pass failed with "DataLoader worker exited unexpectedly" (review 114)
            self._drop_pool()
        if self._pool is None:
            from torch.utils.data import DataLoader

            # its own generator: the workers' base seed is drawn from it, never from torch's global RNG
            # (the user's), which a DataLoader without one advances
            self._pool = DataLoader(self.dataset, batch_sampler=_IndexLists(), num_workers=self.num_workers,
                                    collate_fn=self._collate if self._collate is not None else _DefaultCollate(),
                                    persistent_workers=True, generator=torch.Generator().manual_seed(0))
        return self._pool

    def _logits(self, batch, k: int):
        # at the first forward, where the model's linear layers put their outputs (read by _check_width)
        made: set = set()

        def note(module, args, output):
            if isinstance(output, torch.Tensor):
                made.add(output.data_ptr())

        watch = "linear" not in self._seen and self._forward is _default_forward
        hooks = [m.register_forward_hook(note) for m in self.model.modules() if isinstance(m, nn.Linear)] if watch else []
        try:
            with _torch_rng_kept(self.device):  # a model random in eval mode (MC dropout): the user's RNG stays
                out = (_default_forward(self.model, batch, self._seen) if self._forward is _default_forward
                       else self._forward(self.model, batch))
            if watch:
                self._seen["linear"] = made
        except RuntimeError as exc:  # name CREST's cast when the model fails on a dtype
            if not _dtype_error(exc):
                raise
            raise RuntimeError(
                f"{exc} [crestcore: the measurement passes give the model the dataset's inputs, floating-point ones "
                f"cast to the dtype of its first floating-point parameter ({self._dtype()}), others (integer "
                "images) as they are; where your step casts or transforms the inputs otherwise (x.float() / 255, "
                "a normalisation, a first layer in another dtype), pass forward= that does the same: "
                "forward=lambda model, batch: model(transform(batch[0]))]"
            ) from exc
        finally:
            for h in hooks:
                h.remove()
            if watch and "linear" not in self._seen:  # that forward failed: the next one is looked at instead
                self._seen.pop("first", None)
                self._seen.pop("others", None)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != k:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"the model must return (batch, classes) logits; got {got} for {k} examples "
                "(pass forward= to extract the logits; crest_forward= on CrestTrainer)"
            )
        if not out.is_floating_point():
            raise TypeError(f"the model returned {out.dtype} outputs; logits must be floating point")
        if out.shape[1] == 1:
            raise ValueError(
                "the model returns one output per example: CREST is for classification and measures the softmax "
                "cross-entropy over C >= 2 logits (a regression model is not supported). For a sigmoid / "
                "BCEWithLogits classifier give it two, e.g. "
                "forward=lambda model, batch: torch.cat([torch.zeros_like(z := model(batch[0])), z], 1), whose "
                "cross-entropy is the binary cross-entropy of z. A loss_fn= then gets these two columns and the "
                "labels as class indices: the logit is column 1, e.g. loss_fn=lambda z, y: "
                "F.binary_cross_entropy_with_logits(z[:, 1], y.float(), pos_weight=..., reduction='none') (on "
                "CrestTrainer: crest_forward= and crest_loss_fn=, whose batch is the collated dict: "
                "model(**batch).logits in place of model(batch[0]))"
            )
        return _wide(out)

    def _check_width(self, width: int) -> None:
        """Warn once when the measured logits have more columns than the labels' classes (``max + 1``): a tuple
        output's first element (the convention for dict batches), or a plain output of more than twice as many
        columns; or when a tuple's first element is not an
        ``nn.Linear``'s output while another element, as wide as the classes or wider, is (both as noted at
        the first forward): the features of a ``(features, logits)`` output fit every check of shape, and
        with a hidden width equal to the classes, only where they come from tells them from the logits.
        (Fewer columns than classes are refused where the labels are read against them.)"""
        classes = int(self.labels.max()) + 1 if self.labels.size else 0
        if not self._seen.get("tuple"):
            # a plain output more than twice as wide as the classes the labels hold (review 133: a LightningModule's
            # forward returning the backbone's 16 features, its training_step applying the head, measured as
            # 16-class logits against 3 classes, silently); counted as distinct classes, so a run on classes
            # 90..99 of a 100-class head is told as one on 0..9 is (review 136); a head a few classes wider than
            # the labels use (classes absent from the data) is common and not warned about
            held = int(np.unique(self.labels).size)
            if width > 2 * held:
                warnings.warn(
                    f"the model's measured outputs have {width} columns, more than twice the {held} classes the "
                    "labels hold: CREST takes them as the logits. If they are not (a forward that returns features, "
                    "the head applied in the training step), pass forward= (crest_forward= on CrestTrainer) "
                    "returning the logits; a head of more classes than these labels use (a run on some of its "
                    "classes) is measured correctly and can ignore this", stacklevel=_common.user_stacklevel())
            return
        # another element that an nn.Linear returned, as wide as the classes, while the first is not one's:
        # (features, logits) with a hidden width of the classes; not (logits, probabilities), (logits,
        # aux_logits) or (logits, features), whose first element is the classifier's output
        linear = self._seen.get("linear") or set()
        rival = (max([w for ptr, w in self._seen.get("others", []) if ptr in linear], default=0)
                 if self._seen.get("first") not in linear else 0)
        if width > classes:  # a wider head of its own is fine (absent classes)
            warnings.warn(
                f"the model's measured outputs have {width} columns, more than the labels' {classes} classes: "
                "CREST takes them as the logits (of a tuple output, the first element). If they are not the "
                "logits (the features of a (features, logits) output), pass forward= (crest_forward= on "
                "CrestTrainer) returning the logits; a head with more classes than these labels use is "
                "measured correctly and can ignore this", stacklevel=_common.user_stacklevel())
        elif rival >= classes:
            warnings.warn(
                f"the model returned a tuple: CREST takes its first element ({width} columns) as the logits, but "
                f"another element of {rival} columns is the output of a linear layer, and the first is not (the "
                f"labels have {classes} classes): if that element is the logits (a (features, logits) output whose "
                "hidden width equals the classes), pass forward= (crest_forward= on CrestTrainer) returning it; "
                "if the first element is the logits, this can be ignored", stacklevel=_common.user_stacklevel())

    @staticmethod
    def _warn_if_probabilities(out: torch.Tensor, dtype) -> None:
        """Warn when the first measured outputs look like probabilities (every row non-negative and summing
        to 1, to the rounding of the model's dtype) rather than logits: the softmax of probabilities is not
        the model's prediction, so the losses, checks and selection features would all be wrong.
        Log-probabilities are fine (their softmax is p)."""
        tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3  # the model's dtype rounds the sums
        with torch.no_grad():
            z = out.detach().double()
            if bool((z < 0).any()):
                return
            if not bool(((z.sum(dim=1) - 1.0).abs() <= tol).all()):
                return
        warnings.warn(
            "crestcore: the model's outputs look like probabilities (every row of the first measured batch is "
            "non-negative and sums to 1), but CREST measures the softmax cross-entropy of logits: its losses, "
            "trust checks and selection features would be those of softmax(p). Return logits (drop the final "
            "softmax), or give CREST log-probabilities, e.g. forward=lambda model, batch: "
            "model(batch[0]).clamp_min(1e-30).log() (their softmax is p, their cross-entropy -log p_y)",
            stacklevel=_common.user_stacklevel(),
        )

    def _labels_on(self, idx: np.ndarray, device) -> torch.Tensor:
        return torch.from_numpy(self.labels[idx]).to(device)

    @staticmethod
    def _check_finite(t: torch.Tensor, what: str):
        if all_finite(torch, t):  # one sum: the entrywise test only to count a failure (review 171)
            return
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            count = int(bad.reshape(bad.shape[0], -1).any(dim=1).sum()) if t.ndim else 1
            neg_inf = not bool((torch.isnan(t) | (t == torch.inf)).any())
            raise _common.measurement_error(what, count, t.shape[0] if t.ndim else 1, neg_inf=neg_inf)

    # -- ModelOps -------------------------------------------------------------------------------
    def outputs(self, indices, embeddings: bool = False):
        """Eval-mode logits (k, C) for ``indices``; with ``embeddings=True`` also the input of the last
        linear layer (k, h), in the logits' dtype. No graph is built; the model is left as it was.

        Examples
        --------
        ``_example_data()`` is this module's example training set: 16 random points of 4 features, in two
        classes.

        >>> import numpy as np
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> ops = TorchModelOps(model, _example_data())
        >>> ops.outputs(np.array([0, 5, 7])).shape
        torch.Size([3, 2])
        >>> logits, embeddings = ops.outputs(np.array([0, 5, 7]), embeddings=True)
        >>> embeddings.shape  # the input of the last nn.Linear
        torch.Size([3, 3])
        """
        idx = host_indices(indices, self.n)
        dev = self.device
        logits, embs = [], []
        with self._measuring(), torch.no_grad():
            for (a, b), batch in self._batches(idx, dev):
                if not embeddings:
                    logits.append(self._logits(batch, b - a))
                    continue
                z, e = self._logits_and_embedding(batch, b - a)
                logits.append(z)
                embs.append(e)
        z = torch.cat(logits) if logits else torch.zeros(0, 0, device=dev)
        self._check_finite(z, "outputs")
        if not self._outputs_looked_at and z.shape[0] >= 2:
            self._outputs_looked_at = True  # the first measured outputs of at least two rows, once
            self._check_width(z.shape[1])
            self._warn_if_probabilities(z, self._dtype())
        if not embeddings:
            return z
        e = torch.cat(embs).to(z.dtype)
        self._check_finite(e, "embeddings")
        return z, e

    def _logits_and_embedding(self, batch, k: int):
        seen: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

        def hook(module, inputs, output):
            seen.append((module, inputs[0], output))

        layers = [self._last_layer] if self._last_layer is not None else [
            m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not layers:
            raise ValueError("embeddings need an nn.Linear last layer and the model has none: pass last_layer= (an "
                             "nn.Linear of the model that maps to the logits), or use features from the logits alone: "
                             "CrestConfig(embeddings=False) for CREST, SubsetLoader(..., embeddings=False) for the "
                             "baselines")
        handles = [m.register_forward_hook(hook) for m in layers]
        try:
            z = self._logits(batch, k)
        finally:
            for h in handles:
                h.remove()
        if not seen:
            raise ValueError("the last linear layer was not called in the forward (pass last_layer=)")
        if self._last_layer is not None:
            _, e, _ = seen[-1]
            if len(seen) > 1 and not self._warned_repeat:
                self._warned_repeat = True
                warnings.warn(
                    f"last_layer ran {len(seen)} times in one forward (a head shared by several views or "
                    "branches?): CREST's embeddings are the input of its last call only, which is part of what "
                    "produced the logits; pass forward= returning logits from one call, or use "
                    "CrestConfig(embeddings=False)", stacklevel=_common.user_stacklevel())
        else:
            e = self._found_input(seen, z, k)
        if e.ndim != 2 or e.shape[0] != k:
            raise ValueError(
                f"the last linear layer's input has shape {tuple(e.shape)}; embeddings must be (batch, h)"
            )
        return z, e.detach()

    def _found_input(self, seen, z: torch.Tensor, k: int) -> torch.Tensor:
        """The classifier's input. The classifier (a module and which of its calls in a forward) is found
        at the first measurement and checked at every later one: kept while its output still gives the
        logits (equal, or explained up to a row offset or a scale and a column offset: a learned offset after
        it moves in training), found again otherwise (a layer that matched at initialisation only, such as
        the wide part of a wide-and-deep model whose deep head starts at zero), which may raise then."""
        if self._found_layer is not None:
            module, ordinal = self._found_layer
            calls = [(e, out) for m, e, out in seen if m is module]
            if len(calls) > ordinal:
                e, out = calls[ordinal]
                if k < 3 or _gives_logits(out, z):  # (fewer than three rows cannot tell)
                    return e
        e, module, ordinal = self._classifier_input(seen, z)
        self._found_layer = (module, ordinal)
        out = [o for m, _, o in seen if m is module][ordinal]
        # (an output column that is constant over the batch, as a zero-initialised head gives, cannot say)
        constant = bool((out.detach().amax(dim=0) == out.detach().amin(dim=0)).any()) if out.ndim == 2 else True
        if k >= 3 and not constant and not _gives_logits(out, z) and not self._shape_only_warned:
            self._shape_only_warned = True  # the fallback by shape: say which layer, once
            name = next((n for n, m in self.model.named_modules() if m is module), type(module).__name__)
            warnings.warn(
                f"crestcore: embeddings=True selects on the input of the layer {name!r}, taken as the classifier "
                f"only because it is the last nn.Linear executed and the only one with {z.shape[1]} outputs: its "
                "output does not give the logits the model returns. If it is the classifier (its logits changed "
                "after it by more than an offset or a scale), pass last_layer= to confirm it; if the logits come "
                "from no nn.Linear (a cosine or tied-embedding head), use embeddings=False (logit gradients).",
                stacklevel=_common.user_stacklevel())
        return e

    @staticmethod
    def _classifier_input(seen, z: torch.Tensor) -> tuple[torch.Tensor, nn.Module, int]:
        """The input of the classifier (and the classifier) among the ``nn.Linear`` calls ``seen`` in a
        forward that returned the logits ``z``: the last call whose output is the logits as returned; else
        the one call whose output explains them up to a row offset or a scale and a column offset
        (:func:`_explains`); else the last call, when it is the only one mapping to as many features as
        ``z`` has; else an error asking for ``last_layer=`` (an auxiliary head, or a hidden layer of width
        C, would otherwise pass silently)."""
        C = z.shape[1]
        # (module, its input, its output, which of that module's calls it is)
        calls = [(m, e, out, sum(1 for m2, _, _ in seen[:i] if m2 is m)) for i, (m, e, out) in enumerate(seen)]
        fits = [c for c in calls if c[0].out_features == C]
        exact = [c for c in fits if c[2].shape == z.shape and torch.equal(c[2].detach().to(z.dtype), z)]
        if exact:  # (equal beats explained: an exact match among several explained calls is the classifier)
            m, e, _, n = exact[-1]
            return e, m, n
        # logits changed after the classifier by an offset per row (log-softmax) or a scale and offset per
        # column (a temperature, a learned bias): the one call whose output explains the logits so
        explained = [c for c in fits if _explains(c[2], z)]
        if len(explained) == 1:
            m, e, _, n = explained[0]
            return e, m, n
        if len(fits) == 1 and fits[0][0] is seen[-1][0] and fits[0][1] is seen[-1][1]:
            m, e, _, n = fits[0]
            return e, m, n
        if not fits or len(fits) == 1:
            raise ValueError(f"the last nn.Linear executed maps to {seen[-1][0].out_features} features but the model "
                             f"returns {C} logits; pass last_layer= (the classifier, an nn.Linear), or, when no "
                             "nn.Linear computes the logits (a tied-embedding or cosine head), use embeddings=False")
        raise ValueError(f"{len(fits)} nn.Linear calls in the forward map to {C} features and none returns the "
                         "logits as the model returns them (an auxiliary head, or a hidden layer of that width): pass "
                         "last_layer= (the classifier layer), or, when no single nn.Linear computes the logits (heads "
                         "averaged or summed, an ensemble), use embeddings=False")

    def losses(self, indices):
        """Eval-mode per-example losses (k,) at the current parameters (no graph).

        Examples
        --------
        A model that predicts nothing yet (``_zero_classifier()``, a linear classifier with zero weights) has
        loss ``log 2`` on every example of ``_example_data()`` (16 random points of 4 features):

        >>> import numpy as np
        >>> ops = TorchModelOps(_zero_classifier(), _example_data())
        >>> ops.losses(np.array([0, 1, 2]))
        tensor([0.6931, 0.6931, 0.6931])
        """
        idx = host_indices(indices, self.n)
        z = self.outputs(idx)
        with torch.no_grad():
            return self._call_loss_fn(z, self._labels_on(idx, z.device))

    def example_losses(self, logits, labels):
        """The user's ``loss_fn`` on logits the controller measured, per example, or ``None`` without one
        (the controller then uses its own cross-entropy, the same loss).

        Examples
        --------
        >>> import numpy as np, torch
        >>> smooth = lambda z, y: torch.nn.functional.cross_entropy(z, y, reduction="none", label_smoothing=0.5)
        >>> ops = TorchModelOps(_zero_classifier(), _example_data(), loss_fn=smooth)
        >>> z = torch.tensor([[2.0, 0.0]])
        >>> plain = TorchModelOps(_zero_classifier(), _example_data())
        >>> ops.example_losses(z, torch.tensor([0])), plain.example_losses(z, torch.tensor([0]))
        (tensor([0.6269]), None)
        """
        if self.loss_fn is _cross_entropy:
            return None
        with torch.no_grad():
            ell = self._call_loss_fn(logits, labels)
        if not isinstance(ell, torch.Tensor) or ell.shape != (logits.shape[0],):
            raise ValueError(f"loss_fn must return per-example losses of shape ({logits.shape[0]},) "
                             f"(reduction='none'), got {getattr(ell, 'shape', type(ell).__name__)}")
        return ell.to(logits.dtype) if ell.dtype != logits.dtype else ell

    def params(self):
        """A copy of the flat vector of the trainable parameters (D,); float32 for a half-precision model.

        Examples
        --------
        >>> import torch
        >>> model = torch.nn.Linear(4, 2).half()
        >>> p = TorchModelOps(model, _example_data()).params()  # 16 random points of 4 features
        >>> p.shape, p.dtype  # 4 * 2 weights and 2 biases
        (torch.Size([10]), torch.float32)
        """
        return _wide(torch.cat([p.detach().reshape(-1) for p in self._trainable()]))  # cat: a fresh copy

    def state_token(self, indices):
        """What a measurement of ``indices`` depends on besides :meth:`params` and the selection, as a value
        that compares equal when none of it changed (the controller then answers a trust check at unchanged
        parameters with the last check's measurement), or None when this cannot be told:

        * the inputs: a ``TensorDataset``'s rows (read directly, always the same), or the kept pass that
          would serve ``indices`` (the very rows the last measurement of them saw); None when no kept pass
          holds them all, since loading them again may draw other random transforms (``cache_bytes=0``, a
          pass too big to keep, a collate whose batches cannot be kept);
        * each frozen parameter by identity and in-place version counter (a write through ``.data``, such
          as ``p.data.copy_(...)``, bypasses the counter), and every buffer by value, bit for bit (a copy
          on its device; but a normalisation layer's ``num_batches_tracked``, which its eval-mode forward
          does not read, and its running statistics); None when those buffers take more than
          ``TOKEN_BUFFER_BYTES`` (16 MiB): every check then measures;
        * the running statistics (BatchNorm's) are the anchor's in every measurement (kept at
          :meth:`new_anchor`, at each selection), so the training steps' updates of them do not count;
          None while the measurements run with the live ones (before a first anchor).

        It cannot see Python attributes the forward reads, or state inside ``forward=`` or ``loss_fn``
        closures: a model whose outputs change through those between two steps that leave the parameters
        as they were should be given ``reuse_checks=False``.

        Examples
        --------
        >>> import numpy as np, torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
        >>> model[0].requires_grad_(False)  # a frozen first layer
        Linear(...)
        >>> class Items(torch.utils.data.Dataset):  # items read one at a time, as a transform would
        ...     def __init__(self, data): self.data, self.targets = data, data.tensors[1]
        ...     def __len__(self): return len(self.data)
        ...     def __getitem__(self, i): return self.data[i]
        >>> ops = TorchModelOps(model, Items(_example_data()))  # 16 random points of 4 features
        >>> ops.new_anchor()
        >>> idx = np.arange(8)
        >>> ops.state_token(idx) is None  # not measured yet: loading them may draw other inputs
        True
        >>> _ = ops.outputs(idx)  # a measurement keeps its rows
        >>> token = ops.state_token(idx)
        >>> token is not None and token == ops.state_token(idx)
        True
        >>> with torch.no_grad():
        ...     model[0].weight.add_(1.0)  # the frozen weights written
        Parameter containing:...
        >>> token == ops.state_token(idx)
        False
        """
        if not self.reuse_checks:
            return None
        stats = _running_stats(self.model)
        if self._anchor_buffers is None and stats:
            return None  # measured with the live statistics (a checkpoint from before the anchor's were kept)
        if self._fetch._tensors:  # a TensorDataset's rows, read directly: the same inputs every time
            source = ("tensors",)
        else:
            source = self._kept_pass(host_indices(indices, self.n)) if self._cacheable else None
        if source is None:
            return None
        # every buffer by value (bit for bit, on its device: a NaN equals itself, -0.0 is not +0.0, a write
        # through .data or a buffer replaced twice is seen), but the running statistics (the anchor's in
        # every measurement) and a normalisation layer's batch counter, which its eval-mode forward never
        # reads (it moves at every training forward, and would end every reuse after a step)
        anchored = {id(b) for _, b in stats}
        values = [b for mod in self.model.modules() for name, b in mod.named_buffers(recurse=False)
                  if b is not None and id(b) not in anchored
                  and not (name == "num_batches_tracked" and isinstance(mod, nn.modules.batchnorm._NormBase))]
        if sum(b.numel() * b.element_size() for b in values) > TOKEN_BUFFER_BYTES or any(
                b.layout != torch.strided or b.is_meta or b.is_nested for b in values):
            return None  # too large to copy at every check, or not a dense tensor: every check measures
        return (source, tuple((id(p), p.data_ptr(), p._version) for p in self.model.parameters() if not p.requires_grad),
                _Values([b.detach().clone() for b in values]))

    def _kept_pass(self, idx: np.ndarray):
        """The number of the kept pass :meth:`_cached` would serve ``idx`` from (the most recent that read
        them all; every pass kept gets a new number, so a pass over the same examples kept again, with
        other random transforms, is another), or None. The pass is marked as used, as :meth:`_cached` marks
        it: a check answered from the last one must leave the kept passes in the order a measured one
        leaves them."""
        found = self._covering_pass(idx)
        return None if found is None else self._cache_serial.get(found[0])

    def _call_loss_fn(self, z, labels):
        """``loss_fn(z, labels)``, with a hint where it fails on a dtype: the logits of a float16 or bfloat16
        model reach it in float32 (review 165: a loss with class weights in the model's dtype failed with torch's
        bare "expected scalar type Float")."""
        try:
            return self.loss_fn(z, labels)
        except RuntimeError as exc:
            if not _dtype_error(exc) or self.loss_fn is _cross_entropy:
                raise
            raise RuntimeError(
                f"{exc} [crestcore: loss_fn gets the logits in {z.dtype} (CREST computes its losses in at least "
                "float32, also for a float16 or bfloat16 model): tensors of its own, such as class weights, must "
                "be in that dtype, or cast in the function]") from exc

    def _weighted_losses(self, batch, idx, w, a, b, N):
        z = self._logits(batch, b - a)
        ell = self._call_loss_fn(z, self._labels_on(idx[a:b], z.device))
        if not isinstance(ell, torch.Tensor) or ell.shape != (b - a,):
            raise ValueError(f"loss_fn must return per-example losses of shape ({b - a},)")
        wt = torch.as_tensor(w[a:b], dtype=ell.dtype, device=ell.device)
        return (wt * ell).sum() / N, ell

    def gradient(self, indices, weights):
        """``(loss, flat gradient)`` of ``mean(w_i * loss_i)`` over ``indices`` (eval mode).

        Examples
        --------
        Weights scale each example's share of the loss; a weight of 0 removes it:

        >>> import numpy as np
        >>> import torch
        >>> ops = TorchModelOps(torch.nn.Linear(4, 2), _example_data())  # 16 random points of 4 features
        >>> loss, grad = ops.gradient(np.array([0, 1]), np.array([2.0, 0.0]))
        >>> grad.shape, abs(loss - ops.losses(np.array([0])).item()) < 1e-6
        (torch.Size([10]), True)
        >>> model_grads = [p.grad for p in ops.model.parameters()]  # the optimizer's .grad is untouched
        >>> model_grads
        [None, None]
        """
        idx, w = _common.weighted_examples(indices, weights, self.n, "gradient")
        _gradients_possible()
        params = self._trainable()
        dev = self.device

        def run():
            acc = [torch.zeros_like(p, dtype=_wide(p).dtype) for p in params]  # half grads summed in float32
            used = [False] * len(params)
            total = 0.0
            with self._measuring(), torch.enable_grad():
                for (a, b), batch in self._batches(idx, dev):
                    part, ell = self._weighted_losses(batch, idx, w, a, b, idx.size)
                    self._check_finite(ell.detach(), "losses")
                    used = [u or v for u, v in zip(used, add_grad(part, params, acc, self._retain_graphs))]
                    total += float(part.detach())
                    del part, ell  # this chunk's graph (if retained) freed before the next forward
            return total, acc, used

        total, acc, used = self._retrying(run)
        self._check_unused(params, used)
        flat = _wide(torch.cat([g.reshape(-1) for g in acc]))
        self._check_finite(flat, "gradients")
        return total, flat

    def _retrying(self, run):
        """``run()``, once more with the graphs retained if a module kept a tensor with a graph across the
        pass's forwards (:func:`_graph_reused`); later passes retain them from the start."""
        try:
            return run()
        except RuntimeError as e:
            if self._retain_graphs or not _graph_reused(e):
                raise
        self._retain_graphs = True
        return run()

    def _check_unused(self, params: list, used: list) -> None:
        """Trainable parameters that get no gradient in a measurement over examples (the model runs in eval
        mode there): the quadratic model takes them as constant. None reached at all is refused (nothing to
        fit; a layer that merges its weights in eval mode, as loralib's ``merge_weights=True``); some not
        reached are warned about once, where a module of the user's own changes what it computes through
        its ``train()`` (such a merging layer). Elsewhere parameters an eval forward leaves out (experts not
        routed to, a head used in training only, a value read under no_grad) are the model's design, and the
        warning would be noise."""
        if not params or all(used):
            return
        names = {id(p): n for n, p in self.model.named_parameters()}
        unused = [names.get(id(p), "?") for p, u in zip(params, used) if not u]
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        listed = f"{', '.join(unused[:3])}{more}"
        if not any(used):
            raise RuntimeError(
                f"no trainable parameter ({listed}) gets a gradient in CREST's measurements, which run the model "
                "in eval mode on these examples: the quadratic model and the trust checks have nothing to fit. "
                "A layer that merges its trainable weights into frozen ones in eval mode does this (loralib's "
                "merge_weights=True: build it with merge_weights=False), as do trainable parameters used only in "
                "training mode, only under torch.no_grad, or only by examples with a branch these skipped")
        if self._warned_unused or not any(_own_train(m) for m in self.model.modules()):
            return
        self._warned_unused = True
        warnings.warn(
            f"{len(unused)} trainable parameter(s) ({listed}) get no gradient in CREST's measurements, which run "
            "the model in eval mode, and a module of the model has a train() of its own: the quadratic model "
            "takes them as constant. If that module uses them in training mode only (a LoRA layer that merges "
            "its weights in eval mode: merge_weights=False avoids it), the trust checks do not see what their "
            "steps change; parameters the eval forward leaves out by design are harmless",
            stacklevel=_common.user_stacklevel())

    def rademacher(self, seed: int) -> torch.Tensor:
        """The probe ``z`` (D,) of :meth:`hutchinson`: +-1 from a ``torch.Generator`` seeded with
        ``seed`` on the parameters' device (so CPU and CUDA draw different, equally valid, probes).

        Examples
        --------
        >>> import torch
        >>> ops = TorchModelOps(torch.nn.Linear(4, 2), _example_data())  # 16 random points of 4 features
        >>> z = ops.rademacher(seed=3)
        >>> z.shape, sorted(set(z.tolist())), bool(torch.equal(z, ops.rademacher(seed=3)))
        (torch.Size([10]), [-1.0, 1.0], True)
        """
        params = self._trainable()
        D = sum(p.numel() for p in params)
        dev = params[0].device
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(seed))
        bits = torch.randint(0, 2, (D,), generator=gen, device=dev)
        # in the trainable parameters' dtype (that of params()'s concatenation before widening), not the
        # model's first floating parameter's: a frozen float64 parameter before a float32 layer gave a float64
        # probe, refused against the float32 vectors (review 83)
        return bits.to(functools.reduce(torch.promote_types, (p.dtype for p in params))) * 2 - 1

    def hutchinson(self, indices, weights, seed: int):
        """One Hutchinson probe ``z * (H z)`` of the weighted loss's Hessian (double backward).

        Examples
        --------
        The probes average to the Hessian's diagonal. For a linear classifier with zero weights on two
        classes (``_zero_classifier()``) that diagonal is ``mean(x_k^2) / 4`` for the weights of feature
        ``k`` and ``1/4`` for the biases:

        >>> import numpy as np
        >>> import torch
        >>> data = _example_data()  # 16 random points x of 4 features, in two classes
        >>> ops = TorchModelOps(_zero_classifier(), data)
        >>> x = data.tensors[0]
        >>> idx, w = np.arange(16), np.ones(16)
        >>> estimate = sum(ops.hutchinson(idx, w, seed=s) for s in range(200)) / 200
        >>> exact = torch.cat([(x**2).mean(0).repeat(2) / 4, torch.full((2,), 0.25)])
        >>> bool(torch.allclose(estimate, exact, atol=0.1))
        True
        """
        return self._probe(indices, weights, seed, "hutchinson", with_gradient=False)[2]

    def gradient_and_hutchinson(self, indices, weights, seed: int):
        """``(loss, flat gradient, z * (H z))``: :meth:`gradient` and :meth:`hutchinson` from one forward
        and the one backward the Hessian-vector product needs anyway (the controller's model fit calls
        this when an adapter has it: one forward and one backward fewer per fitted coreset). A subclass
        that redefines :meth:`gradient` or :meth:`hutchinson` gets the two calls instead.

        Examples
        --------
        >>> import numpy as np
        >>> import torch
        >>> ops = TorchModelOps(torch.nn.Linear(4, 2), _example_data())  # 16 random points of 4 features
        >>> idx, w = np.array([0, 3, 5]), np.array([1.0, 2.0, 0.5])
        >>> loss, grad, probe = ops.gradient_and_hutchinson(idx, w, seed=1)
        >>> bool(torch.equal(grad, ops.gradient(idx, w)[1])), bool(torch.equal(probe, ops.hutchinson(idx, w, 1)))
        (True, True)
        """
        cls = type(self)
        if cls.gradient is not TorchModelOps.gradient or cls.hutchinson is not TorchModelOps.hutchinson:
            # a subclass redefines one of them: its own definitions, called as the two calls
            loss, grad = self.gradient(indices, weights)
            return loss, grad, self.hutchinson(indices, weights, seed)
        return self._probe(indices, weights, seed, "gradient_and_hutchinson", with_gradient=True)

    def _probe(self, indices, weights, seed: int, what: str, with_gradient: bool):
        idx, w = _common.weighted_examples(indices, weights, self.n, what)
        _gradients_possible()
        params = self._trainable()
        z = self.rademacher(seed)
        # (each parameter's part in its own dtype: +-1 is exact in any, and the double backward then runs in
        # the parameters' dtypes)
        zs = [t.view_as(p).to(p.dtype) for t, p in zip(torch.split(z, [p.numel() for p in params]), params)]
        dev = self.device

        def run():
            acc = [torch.zeros_like(p, dtype=_wide(p).dtype) for p in params]  # half grads summed in float32
            gacc = [torch.zeros_like(p, dtype=_wide(p).dtype) for p in params] if with_gradient else None
            used = [False] * len(params)
            total = 0.0
            with self._measuring(), torch.enable_grad(), _double_backward_attention():
                for (a, b), batch in self._batches(idx, dev):
                    part, ell = self._weighted_losses(batch, idx, w, a, b, idx.size)
                    self._check_finite(ell.detach(), "losses")
                    used = [u or v for u, v in zip(used, add_hvp(part, params, zs, acc, grad_acc=gacc,
                                                                 retain_graph=self._retain_graphs))]
                    if gacc is not None:
                        total += float(part.detach())
                    del part, ell  # this chunk's graph (if retained) freed before the next forward
            return total, acc, gacc, used

        total, acc, gacc, used = self._retrying(run)
        self._check_unused(params, used)
        out = _wide(z) * _wide(torch.cat([h.reshape(-1) for h in acc]))
        self._check_finite(out, "Hessian-vector products")
        if gacc is None:
            return total, None, out
        flat = _wide(torch.cat([g.reshape(-1) for g in gacc]))
        self._check_finite(flat, "gradients")
        return total, flat, out


# ------------------------------------------------------------------------------------------------
# state dict conversion (torch.load(weights_only=True) safe: tensors, numbers, strings, containers)
# ------------------------------------------------------------------------------------------------
def _portable_leaf(x):
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.array(x, copy=True))
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().clone()
    return x


def _to_portable(x):
    """``x`` (nested dicts, lists, tuples) with NumPy arrays as CPU tensors and NumPy scalars as numbers."""
    return _common.map_nested(x, _portable_leaf)


def _from_portable(x):
    """:func:`_to_portable`'s inverse for arrays: every tensor nested in ``x`` as a NumPy copy."""
    return _common.map_nested(x, lambda v: v.detach().cpu().numpy().copy() if isinstance(v, torch.Tensor) else v)


def check_training_data(dataset, m: int, labels=None, measure_dataset=None, *, read_items: bool = True,
                        name: str = "dataset", labels_name: str = "labels") -> np.ndarray | None:
    """The checks of a CREST run's data, made where it is built: a non-empty map-style ``dataset``, its
    labels (``labels``, else :func:`dataset_labels`: two classes at least, ``m`` at most the examples) and
    a ``measure_dataset`` of the same length. Returns the labels, or None when they were not read:
    ``read_items=False`` (an integration checking at construction what its loader reads later) reads them
    only where that needs no pass over the items (given, or a ``targets``/``labels`` attribute or column).

    Examples
    --------
    >>> data = TensorDataset(torch.zeros(6, 2), torch.tensor([0, 1, 0, 1, 0, 1]))
    >>> check_training_data(data, 4).tolist()
    [0, 1, 0, 1, 0, 1]
    >>> check_training_data(data, 8)
    Traceback (most recent call last):
        ...
    ValueError: the mini-batch size m=8 exceeds the dataset's 6 examples
    """
    check_map_style(dataset, name)
    n = _length(dataset)
    if n == 0:
        raise ValueError(f"the training {name} is empty: CREST needs examples to select from")
    lab = None
    if labels is not None:
        lab = _as_labels(labels, n, labels_name)
    elif read_items or _labels_without_items(dataset):
        lab = dataset_labels(dataset)
    if lab is not None:
        _common.check_training_labels(lab, m)
    elif m > n:
        raise ValueError(f"the mini-batch size m={m} exceeds the {name}'s {n} examples")
    if measure_dataset is not None and _length(measure_dataset) != n:
        raise ValueError(
            f"measure_dataset has {_length(measure_dataset)} examples but {name} has {n}; it must hold "
            "the same examples in the same order"
        )
    return lab


def check_loader_arguments(*, config=None, budget=0.1, epochs=1, seed=0, budget_counts="steps", model=None,
                           per_epoch=True, measure_batch_size=None, collate_fn=None, forward=None, loss_fn=None,
                           device=None, measure_workers=0, check_model: bool = True,
                           prefix: str = "") -> CrestConfig:
    """The argument checks of :class:`CrestLoader`'s ``__init__`` (errors name the argument), as a function
    other adapters can call eagerly in their own ``__init__`` (``check_model=False`` when the model is
    not known yet, e.g. a Lightning callback; ``prefix``: the adapter's own prefix of the names its user
    types, e.g. ``"crest_"``). Returns the config (``CrestConfig()`` for None)."""
    config = _common.check_config(config)
    _common.check_budget(budget, prefix + "budget")
    _common.check_count(epochs, prefix + "epochs")
    _common.check_count(seed, prefix + "seed", low=0)
    _common.check_budget_counts(budget_counts)
    if check_model and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(per_epoch, (bool, np.bool_)):
        raise TypeError(f"per_epoch must be a bool, got {type(per_epoch).__name__} {per_epoch!r}")
    _common.check_count(measure_batch_size, prefix + "measure_batch_size", optional=True)
    _common.check_count(measure_workers, prefix + "measure_workers", low=0)
    for name, fn in (("collate_fn", collate_fn), ("forward", forward), ("loss_fn", loss_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{prefix}{name} must be callable or None, got {type(fn).__name__}")
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be a torch device (or its name), got {device!r}") from exc
    return config


def _weighted_batch(loader, indices: np.ndarray, weights: np.ndarray):
    """What a loader (:class:`CrestLoader`, ``SubsetLoader``) yields for one batch: the examples ``indices``
    collated and moved to its ``device`` (default the model's), with their ``weights`` as a tensor in the
    model's floating dtype (float32 for a float16 or bfloat16 model: weights are not rounded to half
    precision), added as :class:`WeightedDataset` adds them: appended to a tuple or list batch
    (``(x, y, w)``), as the key ``"crest_weight"`` of a dict batch, else paired (``(x, w)``)."""
    dev = loader._device if loader._device is not None else loader.ops.device
    data = _to_device(loader._fetch(indices), dev)
    dt = loader.ops._dtype()
    w = torch.as_tensor(weights, dtype=torch.float32 if dt in _HALF else dt).to(dev)  # never rounded to 8 bits
    if isinstance(data, dict):
        return {**data, "crest_weight": w}
    if isinstance(data, (tuple, list)):
        return (*data, w)
    return data, w


def _observed_losses(losses, k: int, step: int, who: str) -> np.ndarray:
    """The ``k`` per-example training losses a loader's ``observe`` got, detached, as host float64 (one
    copy). A wrong count raises ``ValueError``; NaN or infinite losses a ``FloatingPointError`` that names
    ``step``, led by ``who`` ("CREST", the loader's name). Float32 and float64 losses keep their values (a
    float64 model's were rounded to float32 here, so a loss just below ``alpha`` dropped its example under
    the distributed loader, which keeps float64, and not here); half precision is widened."""
    if isinstance(losses, torch.Tensor):
        losses = _wide(losses.detach()).cpu().numpy()
    vals = np.asarray(losses, dtype=np.float64)
    if vals.size == k and vals.shape not in ((k,), (k, 1)) and not (k == 1 and vals.ndim == 0):
        # one loss per example, as a vector or a column: a (2, 5) array is not a batch of 10 (review 62)
        raise ValueError(f"observe() got losses of shape {vals.shape} for a batch of {k} examples: pass one loss "
                         f"per example, shape ({k},) or ({k}, 1) (reduction='none')")
    vals = vals.reshape(-1)
    if vals.size != k:
        raise ValueError(
            f"observe() got {vals.size} losses for a batch of {k} examples "
            "(pass the per-example losses, reduction='none')"
        )
    if not np.all(np.isfinite(vals)):
        raise _common.training_loss_error(who, step, int((~np.isfinite(vals)).sum()), vals.size)
    return vals


# ------------------------------------------------------------------------------------------------
# the loader
# ------------------------------------------------------------------------------------------------
class CrestLoader(BudgetedPasses):
    """An iterable of weighted coreset mini-batches ``(x, y, weights)`` for a training loop (a dataset of
    dict items yields dict batches with the weights under ``"crest_weight"``, as :class:`WeightedDataset`).

    Parameters
    ----------
    model : the classifier being trained (the measurement passes use it; it is never modified).
    dataset : the training set (any map-style ``Dataset``; its transforms apply to the yielded batches).
    config : :class:`crestcore.CrestConfig` (``m`` is the mini-batch size); default ``CrestConfig()``.
    budget : fraction of the full-data training steps to train for (see *Budget*); positive.
    epochs : the number of full-data epochs the budget is a fraction of.
    seed : seeds every random draw of CREST (subsets, probes); independent of torch's global RNG.
    device : where yielded batches go; default the model's device at each step.
    per_epoch : True (default, the ``DataLoader`` habit): each pass yields the next epoch's share and
        ``len()`` is ``steps_per_epoch``, so ``len(loader) * epochs`` is the run (what a per-step LR
        scheduler, or Lightning's ``estimated_stepping_batches``, is sized from). :meth:`set_epoch` is
        optional. False: one pass yields the whole run and ``len()`` is ``total_steps``.
    budget_counts : "steps" (default; the paper's and the release's accounting) or "passes" (the
        measurement passes CREST spends count against the budget too, in step-equivalents).
    labels : (n,) class indices; default :func:`dataset_labels` (read from the dataset).
    collate_fn : as for a ``DataLoader``.
    measure_dataset : the same examples, in the same order, for the measurement passes, e.g. without
        random augmentation; default ``dataset``.
    measure_batch_size : examples per forward in measurement passes (memory and speed, up to floating-point
        rounding, unless a layer uses the batch's own statistics in eval mode, as
        ``BatchNorm(track_running_stats=False)`` does); default 128 on the CPU, 512 on an accelerator
        (see :class:`TorchModelOps`'s ``batch_size``).
    measure_workers : worker processes that load the measurement passes' examples (a persistent
        ``DataLoader`` over ``measure_dataset``: decoding and transforms in parallel); 0 loads them in
        this process.
    measure_cache_bytes : host memory for recently measured batches (see :class:`TorchModelOps`'s
        ``cache_bytes``; default 256 MiB, 0 off): the trust checks' examples are loaded once per selection.
    reuse_checks : a trust check at the parameters of the check before, on the same kept inputs, takes its
        measurement (default True; see :meth:`TorchModelOps.state_token`); False: every check measures.
    last_layer, forward, loss_fn : as for :class:`TorchModelOps`.
    callbacks : listeners ``listener(event, step, scalars)`` (one callable or a list), called at every
        selection, check, drop decision and epoch end with the scalars of ``stats``: see
        :mod:`crestcore.adapters.monitor` (TensorBoard and W&B writers); a listener that raises is counted in
        ``listener_failures`` and warned about once, and training goes on. Default none.
    progress : a tqdm progress bar for measurement passes that run longer than a second (needs tqdm).
        Default False.

    Budget
    ------
    ``full_steps_per_epoch = ceil(n / m)`` (a ``DataLoader`` with batch ``m``),
    ``steps_per_epoch = max(1, round(budget * full_steps_per_epoch))`` and
    ``total_steps = epochs * steps_per_epoch``. With ``budget_counts="steps"`` exactly ``total_steps``
    batches are yielded. With ``"passes"`` a batch is yielded only while the training steps so far plus
    CREST's measurement passes, in step-equivalents (``(forward + 2 * backward examples) / 3 / m``;
    a backward costs about two forwards), stay within the same cap; ``len()`` is then an upper bound.
    ``stats["budget"]`` reports both fractions whichever mode is used.

    Examples
    --------
    Train a linear classifier on 64 examples for a quarter of the steps of two epochs:

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from crestcore import CrestConfig
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.arange(64) % 2
    >>> data = TensorDataset(torch.randn(64, 4, generator=g) + 2.0 * y[:, None], y)
    >>> model = torch.nn.Linear(4, 2)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> loader = CrestLoader(model, data, config=CrestConfig(m=8), budget=0.25, epochs=2, seed=0)
    >>> len(loader), loader.total_steps  # 8 full-data steps per epoch, a quarter of them
    (2, 4)
    >>> for epoch in range(loader.epochs):
    ...     for x, y, w in loader:
    ...         losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    ...         optimizer.zero_grad()
    ...         (w * losses).mean().backward()
    ...         optimizer.step()
    >>> x.shape, w.shape
    (torch.Size([8, 4]), torch.Size([8]))
    >>> loader.stats["step"], loader.stats["budget"]["fraction_steps"]
    (4, 0.25)
    """

    @property
    def config(self) -> CrestConfig:
        """The run's :class:`~crestcore.CrestConfig`, fixed at construction (its plan and selections were sized
        from it: build a new loader for another one)."""
        return self._config

    @config.setter
    def config(self, value) -> None:
        raise AttributeError(f"{type(self).__name__}.config is fixed at construction (the run's plan, batch size "
                             "and selections were made from it): build a new loader with the new config")

    @property
    def model(self) -> nn.Module:
        """The model CREST measures, fixed at construction."""
        return self._model

    @model.setter
    def model(self, value) -> None:
        raise AttributeError(f"{type(self).__name__}.model is fixed at construction (every measurement runs on "
                             "it): build a new loader for another model, and train the model you gave it")

    def __init__(
        self,
        model: nn.Module,
        dataset,
        *,
        config: CrestConfig | None = None,
        budget: float = 0.1,
        epochs: int = 1,
        seed: int = 0,
        device=None,
        per_epoch: bool = True,
        budget_counts: str = "steps",
        labels=None,
        collate_fn: Callable | None = None,
        measure_dataset=None,
        measure_batch_size: int | None = None,
        measure_workers: int = 0,
        measure_cache_bytes: int = 256 << 20,
        last_layer: nn.Module | str | None = None,
        forward: Callable | None = None,
        loss_fn: Callable | None = None,
        callbacks=None,
        progress: bool = False,
        reuse_checks: bool = True,
    ):
        from .monitor import check_listeners

        self._listeners = check_listeners(callbacks)
        self.listener_failures: dict[int, int] = {}  # failures per listener (by its position in callbacks)
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
        self._config = check_loader_arguments(
            config=config, budget=budget, epochs=epochs, seed=seed, budget_counts=budget_counts, model=model,
            per_epoch=per_epoch, measure_batch_size=measure_batch_size, collate_fn=collate_fn, forward=forward,
            loss_fn=loss_fn, device=device, measure_workers=measure_workers,
        )
        lab = check_training_data(dataset, self.config.m, labels, measure_dataset)
        n = lab.size
        _warn_loss_floor(loss_fn, self.config, int(lab.max()) + 1 if n else 0, type(self).__name__)
        self._model = model
        self.dataset = dataset
        self.n = n
        self.labels = lab
        self.budget = float(budget)
        self.seed = int(seed)
        self._device = None if device is None else torch.device(device)
        self.ops = TorchModelOps(
            model, measure_dataset if measure_dataset is not None else dataset, labels=lab, loss_fn=loss_fn,
            device=device, batch_size=measure_batch_size, collate_fn=collate_fn, last_layer=last_layer,
            forward=forward, num_workers=measure_workers, cache_bytes=measure_cache_bytes,
            check_labels=True, reuse_checks=reuse_checks,
        )
        if labels is None:  # the labels the ops got were found here, from the training set: say so if checked
            self.ops._labels_origin = _found_origin(dataset)
        # a measure_dataset is checked against the training labels even when labels= gives them: the same
        # examples in the same order is a promise only its items can confirm
        self.ops._measure_set = measure_dataset is not None
        if progress:
            self.ops.progress = _Progress()
        self._fetch = _Fetcher(dataset, collate_fn)
        self._plan_passes(n=n, m=self.config.m, budget=self.budget, epochs=int(epochs), per_epoch=per_epoch,
                          budget_counts=budget_counts)
        self._state = crest_init(self.config, lab, seed=self.seed, epoch_steps=self.steps_per_epoch)
        self._batch: Batch | None = None
        self._pending: list[Batch] = []  # handed out before a checkpoint and not trained: replayed first
        self._replayed = False  # whether the batch handed out last was one of those
        self._loaded_position = 0  # the position a state was loaded at (trained= never goes below it)
        self._handed: list[Batch] = []  # the batches handed out last (see _handed_keep), in order
        self._handed_epoch: list[int] = []  # the epoch of the pass that handed out each
        self._handed_from = 0  # the run position of _handed[0]
        self._trainable_ids: tuple | None = None  # the parameters the last step trained (their identities)

    # -- copies ---------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        # the identities of the parameters the last step trained are this model's: a copy (deepcopy, pickle)
        # holds another model, whose parameters never matched them, and its first step took that for a changed
        # set, a selection out of turn, and went on as another run (review 139); carried by name instead
        state = self.__dict__.copy()
        if self._trainable_ids is not None:
            names, stale = self._trainable_names()
            state["_trainable_ids"] = ("by name", None if stale else tuple(names))
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        held = state.get("_trainable_ids")
        if isinstance(held, tuple) and held[:1] == ("by name",):
            named = {_canonical(k): p for k, p in _inner_ops(self.ops).model.named_parameters()}
            names = held[1]
            # (a set that had changed before the copy stays changed: no parameter's identity is -1)
            self._trainable_ids = ((-1,) if names is None or any(k not in named for k in names)
                                   else tuple(id(named[k]) for k in names))

    # -- accounting and stepping ----------------------------------------------------------------
    _one_process = True  # (the distributed adapter's loader runs one schedule over every rank)

    def _pass_started(self) -> None:
        """A pass of one training across several processes (``torch.distributed`` with a DDP-wrapped model, or a
        loader sharded by ``accelerate``) is refused (review 166: a sampler under ``accelerate``'s sharding of its
        batches ran a controller per rank, each training half of its own schedule, their drops and trust checks
        apart, silently), as the Lightning and Hugging Face integrations refuse the setting."""
        if not self._one_process:
            return
        dist = getattr(torch, "distributed", None)
        if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
            return
        # one training across the processes: a model in DDP (wrapped, wrapping one, or given as ddp.module), or a
        # pass read through accelerate's loader, which shards it over them (independent runs, one per process,
        # are left alone: review 167)
        model = getattr(_inner_ops(self.ops), "model", None)
        ddp = isinstance(model, nn.Module) and _in_ddp(model)
        if ddp or getattr(self, "_loader_shard", None) is not None:
            raise RuntimeError(
                f"{type(self).__name__} runs one training in one process, and this one is rank {dist.get_rank()} of "
                f"{dist.get_world_size()} of a training across processes ("
                f"{'the model is in a DistributedDataParallel' if ddp else 'accelerate shards the loader'}): "
                "each process would run its own CREST schedule and train a share of its own batches. For one "
                "training across processes use crestcore.adapters.distributed.DistributedCrestLoader "
                "(docs/distributed.md)")

    def _replaying(self) -> bool:
        return bool(self._pending)

    def _counters(self) -> dict:
        c = self._state.counters
        if not self._pending:
            return c
        # batches the controller handed out but not trained (after rewind or a load): not counted as trained
        # until they are handed out again (their measurement work was done and stays counted)
        c = dict(c)
        c["train_steps"] -= len(self._pending)
        c["train_examples"] -= sum(int(b.indices.size) for b in self._pending)
        return c

    def _step(self):
        events = ()
        self._replayed = bool(self._pending)
        if self._pending:  # batches the controller handed out before a checkpoint, not trained then
            batch = self._pending.pop(0)
        else:
            trainable = self.ops._trainable()  # one walk over the parameters a step
            ids = tuple(id(p) for p in trainable)
            if self._trainable_ids is not None and ids != self._trainable_ids:
                # a layer frozen, unfrozen or swapped since the last step (even for one of the same size): a
                # new selection and quadratic model over the new set now, not at the next check (before the
                # vectors follow a moved model: those of the old set cannot be moved onto the new one, review 82)
                self._state = crest_parameters_changed(self._state)
            self._trainable_ids = ids
            self._sync_device(trainable)
            before = self._event_counts(self._state)
            # the controller's state is taken only from a step that succeeds; so is the measurements' anchor count
            # (an interrupt or error inside a selection had advanced it, and a dataset with random transforms
            # measured other draws at the retried selection than the uninterrupted run: review 139)
            inner = _inner_ops(self.ops)
            anchor = (getattr(inner, "_gen", None), getattr(inner, "_anchor_buffers", None))
            try:
                state, batch = self._advance()
            except BaseException as exc:
                if anchor[0] is not None:
                    inner._gen, inner._anchor_buffers = anchor
                if isinstance(exc, FloatingPointError):
                    raise _common.at_step(exc, f"{type(self).__name__} at step {self._position}") from exc
                raise
            self._state = state
            if self._listeners:
                events = [e for e, a, b in zip(("check", "drop", "selection"), before, self._event_counts(state))
                          if b > a]
        self._position += 1
        self._batch = batch
        self._remember_handed(batch)
        for e in events:
            self._emit(e)
        return self._make_batch(batch)

    def _handed_keep(self) -> int:
        """Batches handed out that are kept for :meth:`state_dict` ``(trained=)``: the last two (a loop
        that saves with the current batch untrained); the sampler keeps an epoch and a prefetch window."""
        return 2

    def _remember_handed(self, batch: Batch) -> None:
        if not self._handed or self._handed_from + len(self._handed) != self._position - 1:
            self._handed, self._handed_epoch, self._handed_from = [], [], self._position - 1
        self._handed.append(batch)
        e = self._pass_e
        self._handed_epoch.append(e if e is not None else (self._position - 1) // self.steps_per_epoch)
        keep = self._handed_keep()
        if len(self._handed) > 2 * keep:  # trimmed in blocks: amortised O(1) a batch
            drop = len(self._handed) - keep
            self._handed, self._handed_from = self._handed[drop:], self._handed_from + drop
            self._handed_epoch = self._handed_epoch[drop:]

    @staticmethod
    def _event_counts(state) -> tuple[int, int, int]:
        return int(state.counters["checks"]), len(state.log["drops"]), int(state.counters["selections"])

    def _emit(self, event: str) -> None:
        if not self._listeners:
            return
        from .monitor import scalars

        st = self._state  # what scalars() reads, without stats' full lists: an event comes at every check
        checks = st.log["checks"]
        values = scalars({"selections": st.log["selections"], "checks": checks, "drops": st.log["drops"],
                          "rho": [checks[-1][1]] if len(checks) else [], "T1": st.T1, "P": st.P,
                          "pool": pool_size(st.drop), "budget": self._budget_report(trained=False)})
        # (the budget of the batches handed out, as the event's step counts them: a sampler's stats count those
        # its loop was given, and the two mixed made a flat curve under workers, review 146)
        for k, listener in enumerate(self._listeners):
            try:
                listener(event, self._position, values)
            except Exception as exc:  # a logger's failure must not cost the run its batch or other listeners
                failed = self.listener_failures.get(k, 0)
                self.listener_failures[k] = failed + 1
                if failed:  # warned once: a listener that fails at every event would warn at every check
                    continue
                warnings.warn(f"crestcore: the listener {listener!r} raised {type(exc).__name__}: {exc} at the "
                              f"{event!r} event of step {self._position}; the run and the other listeners go on (its "
                              "failures, this one included, are counted in listener_failures; no further warning)",
                              RuntimeWarning, stacklevel=_common.user_stacklevel())

    def _on_epoch_done(self, at_step: bool = False) -> None:
        # an epoch completed as a batch replayed after a load or a rewind is handed out was reported when that batch
        # was first handed out, as its selections and checks were (review 152: the resumed run said "epoch" twice);
        # one that ends at a pass's end (under "passes", by its cost at the next request) is reported now, the first
        # run having stopped before it (review 153)
        if not (at_step and getattr(self, "_replayed", False)):  # (a loader pickled before the attribute: none)
            self._emit("epoch")

    def _advance(self):
        """One controller step: ``(state, batch)``. The hook subclasses wrap (e.g. the distributed
        loader runs it with sharded selection and checks that every rank took the same step). Autocast is
        off for all of it, the selection's kernels included, not only the model passes: a loop that
        iterates the loader inside ``torch.autocast`` gets the batches and weights of one that does not
        (the similarities had come out in bfloat16 there, and 14 of 17 batches differed)."""
        inner = _inner_ops(self.ops)
        if isinstance(inner, TorchModelOps):
            inner._warn_cached_autocast()  # (before autocast is turned off here)
        with _no_autocast(self.ops.device.type):
            return crest_next_batch(self._state, self.ops, self.config)

    def _make_batch(self, batch: Batch):
        return _weighted_batch(self, batch.indices, batch.weights)

    def _sync_device(self, trainable: list) -> None:
        """Move the controller's vectors to the model's device if the model moved (e.g. after a resume);
        ``trainable``: the parameters that train now (``ops._trainable()``)."""
        anchor = self._state.anchor
        if anchor is None or not trainable:
            return
        first = trainable[0]
        # params() (and so the anchor) concatenates the trainable parameters (their promoted dtype: float64
        # for a float32 body with a float64 head), float32 for a half-precision model: compare with that
        dt = first.dtype
        for p in trainable[1:]:
            dt = torch.promote_types(dt, p.dtype)
        if anchor.device != first.device or anchor.dtype != (torch.float32 if dt in _HALF else dt):
            self._state = _common.rehomed(self._state, self.ops.params())

    @property
    def sampler(self):
        """No such thing: said by name (accelerate's ``skip_first_batches(loader, k)`` failed on this attribute
        with an AttributeError that did not say why skipping is wrong here; review 140). ``hasattr`` and
        ``getattr(loader, "sampler", None)`` still see none."""
        raise AttributeError(
            f"{type(self).__name__} has no sampler: it chooses its own batches, and a resumed run continues from "
            "the position load_state_dict restored, with the first batch not trained. Do not skip batches after a "
            "resume (accelerate's skip_first_batches, or `if i < done: continue` in the loop): the skipped batches "
            "would be lost, counted as trained")

    # -- feedback and observability -------------------------------------------------------------
    @property
    def last_indices(self) -> np.ndarray | None:
        """Dataset indices of the batch yielded last (host int64), or None before the first."""
        return None if self._batch is None else self._batch.indices.copy()

    @property
    def last_weights(self) -> np.ndarray | None:
        return None if self._batch is None else self._batch.weights.copy()

    def observe(self, losses) -> None:
        """Feed the per-example training losses (k,) of the batch yielded last to the drop policy.

        Optional. Recorded only when dropping is on (``CrestConfig(T2=...)``); always checked: NaN or
        infinite losses raise ``FloatingPointError``. Detached; one host copy.

        Examples
        --------
        With dropping on (``T2``), the per-example training losses feed the drop decisions:

        >>> import torch
        >>> from crestcore import CrestConfig
        >>> data = _example_data(64)  # this module's example data: 64 random points of 4 features, two classes
        >>> model = torch.nn.Linear(4, 2)
        >>> loader = CrestLoader(model, data, config=CrestConfig(m=8, T2=2), budget=0.5, epochs=1)
        >>> for x, y, w in loader:
        ...     losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        ...     loader.observe(losses)
        >>> loader.observe(torch.full((8,), float("nan")))
        Traceback (most recent call last):
            ...
        crestcore._validation.DivergenceError: ...
        """
        if self._batch is None:
            raise RuntimeError("observe() needs a batch: call it after training on a yielded batch")
        self._observe(self._batch.indices, losses)

    def _observe(self, indices: np.ndarray, losses, step: int | None = None) -> None:
        """Check and record the training losses of the examples ``indices`` (host int64), trained in the
        batch handed out at run position ``step`` (default the batch handed out last): recorded at that
        batch's step, named in the error message."""
        last = self._position - 1
        step = last if step is None else step
        vals = _observed_losses(losses, indices.size, step, "CREST")
        if self.config.T2 is not None:  # the loss history only feeds drop decisions
            # the controller's step of that batch: the batch it made last is at its current step, and that is
            # the last one handed out, or (while batches of a rewind or a checkpoint are handed out again)
            # the last of those still pending
            newest = last + len(self._pending)
            self._state = crest_observe(self._state, indices, vals, step=self._state.step - (newest - step))

    @property
    def stats(self) -> dict:
        """Plain data: counters, selection steps, trust checks (step, rho, L_R, F), drops, schedule, budget."""
        return {"step": self._position, "epoch": self.epoch, "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch, **crest_stats(self._state),
                "counters": {k: int(v) for k, v in self._counters().items()},
                "budget": self._budget_report()}

    @property
    def controller_state(self):
        """The controller's :class:`crestcore.CrestState` (read-only by convention)."""
        return self._state

    # -- checkpoints ----------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {"n": self.n, "m": self.config.m, "seed": self.seed, "steps_per_epoch": self.steps_per_epoch,
                "budget": self.budget}

    def state_dict(self, trained: int | None = None) -> dict:
        """Everything needed to continue with the same batches: the controller state and the position.

        Holds tensors, numbers and strings only, so ``torch.load(..., weights_only=True)`` reads it.
        ``trained``: the batches of the run your loop has trained, when it saves with the batch it was
        handed last not yet trained (a preemption check at the top of the step): ``position - 1`` stores
        that batch as pending, to be handed out again first. Default: every batch handed out counts as
        trained.

        Examples
        --------
        >>> import io
        >>> import torch
        >>> from crestcore import CrestConfig
        >>> data = _example_data(64)  # this module's example data: 64 random points of 4 features, two classes
        >>> loader = CrestLoader(torch.nn.Linear(4, 2), data, config=CrestConfig(m=8), budget=0.5)
        >>> batch = next(iter(loader))
        >>> buffer = io.BytesIO()
        >>> torch.save(loader.state_dict(), buffer)
        >>> _ = buffer.seek(0)
        >>> torch.load(buffer, weights_only=True)["position"]
        1
        >>> loader.state_dict(trained=0)["position"]  # the batch handed out, not trained: handed out again
        0
        """
        if trained is None or (trained == self._position and not isinstance(trained, bool)):
            return self._state_dict(self._position, self._batch, self._pending, self._epochs_done)
        low = self._handed_from + 1 if self._handed_from > 0 else 0  # the last trained batch must be known
        low = max(low, self._loaded_position)  # a loaded state's batches were trained by the run that saved it
        if not self._handed:  # nothing handed out since the start or a load: only the position itself
            low = self._position
        if isinstance(trained, bool) or not isinstance(trained, (int, np.integer)) or not \
                low <= trained <= self._position:
            span = f"[{low}, {self._position}]" if low < self._position else f"{self._position}"
            raise ValueError(f"trained must be an integer in {span} (batches of the run trained; "
                             f"{self._position} are handed out, the batches before {low} are not kept), "
                             f"got {trained!r}")
        k = int(trained) - self._handed_from
        # the epoch of the first untrained batch is not done: a resumed run replays it in that epoch's pass
        return self._state_dict(int(trained), self._handed[k - 1] if k > 0 else None,
                                self._handed[k:] + self._pending, min(self._epochs_done, self._handed_epoch[k]))

    def _state_dict(self, position: int, batch: Batch | None, pending: list, epochs_done: int) -> dict:
        """The state with the run cut at ``position`` (batches handed out beyond it as ``pending``)."""
        names, stale = self._trainable_names()
        return {
            "format": _FORMAT,
            **self._fingerprint(),
            "epochs": self.epochs,
            "budget": self.budget,
            "budget_counts": self.budget_counts,
            "config": repr(self.config),
            **self._pass_state(position, epochs_done),
            "batch": None if batch is None else _to_portable(_common.batch_record(batch)),
            "pending": [_to_portable(_common.batch_record(b)) for b in pending],
            # (a set changed since the last step: saved as the next step makes it, a new selection due)
            "crest": _to_portable(crest_state_dict(crest_parameters_changed(self._state) if stale else self._state)),
            # the parameters the controller's vectors are over (the set of the last step), by name: a run
            # resumed with another set trainable at the load (a layer unfrozen by an epoch hook that runs
            # after it) compares against these at its first step
            "trainable": names,
            # the anchor's buffers, which the measurements until the next selection run with
            "anchor_buffers": dict(_inner_ops(self.ops)._anchor_buffers or {}),
            # the anchors measured so far: a measurement's random transforms are drawn for its anchor's number
            "measure_anchor": int(_inner_ops(self.ops)._gen),
        }

    def _trainable_names(self) -> tuple[list[str], bool]:
        """``(names, stale)``: the (wrapper-free) names of the parameters the controller state is over, the
        set the last step trained (no step yet: the set that trains now); ``stale`` when a parameter of that
        set is no longer the model's (a layer swapped since the last step): the names are then those of the
        set that trains now, for a state saved as changed, as the next step would make it."""
        named = list(_inner_ops(self.ops).model.named_parameters())
        if self._trainable_ids is None:
            return [_canonical(name) for name, p in named if p.requires_grad], False
        ids = set(self._trainable_ids)
        if not ids <= {id(p) for _, p in named}:
            return [_canonical(name) for name, p in named if p.requires_grad], True
        return [_canonical(name) for name, p in named if id(p) in ids], False

    def _saved_trainable(self, names, where: str) -> list[torch.Tensor] | None:
        """The model's parameters a checkpoint's ``trainable`` names (wrapper-free, in the model's order),
        or None when the model has no such names (another wrapper around it, a LightningModule's inner
        network saved alone): the set that trains now then stands for it, as for a checkpoint that names
        none (a state of another size is refused by the controller's checks)."""
        if not isinstance(names, (list, tuple)) or not all(isinstance(k, str) for k in names):
            raise ValueError(f"{where}: trainable must be a list of parameter names")
        live = {_canonical(k): p for k, p in _inner_ops(self.ops).model.named_parameters()}
        if not all(k in live for k in names):
            return None
        return [live[k] for k in names]

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; the next pass continues exactly where it was saved.

        Restore the model's and optimizer's states too (the controller measures the model). The parameters
        that train may differ at the load from those of the saved run's last step (a layer unfrozen in an
        epoch hook that runs after the load): the first step compares the set it trains with the saved one
        and, if they differ, starts a new selection over the new set, as a run that changed its set does.

        Examples
        --------
        A loader restored from a checkpoint yields the batches the saved one would have yielded:

        >>> import torch
        >>> from crestcore import CrestConfig
        >>> data = _example_data(64)  # this module's example data: 64 random points of 4 features, two classes
        >>> model = torch.nn.Linear(4, 2)
        >>> loader = CrestLoader(model, data, config=CrestConfig(m=8), budget=0.5, seed=0)
        >>> passes = iter(loader)
        >>> first = next(passes)
        >>> saved = loader.state_dict()
        >>> resumed = CrestLoader(model, data, config=CrestConfig(m=8), budget=0.5, seed=0)
        >>> resumed.load_state_dict(saved)
        >>> bool(torch.equal(next(passes)[1], next(iter(resumed))[1]))
        True
        """
        with _common.held_warnings() as said:  # the notices: said once every check has passed (review 170)
            _common.check_checkpoint(
                state, fmt=_FORMAT, owner=type(self).__name__, kind="loader", fingerprint=self._fingerprint(),
                same="dataset, config.m, seed and budget",
                options=("config", repr(self.config), "the CrestConfig differs from the saved one", CONFIG_AS_BEFORE))
            where = f"{type(self).__name__} state dict"
            names = state.get("trainable")  # absent before 2026-12-05: the set that trains now
            saved_set = None if names is None else self._saved_trainable(names, where)
            like = self.ops.params() if saved_set is None else _wide(
                torch.cat([p.detach().reshape(-1) for p in saved_set]) if saved_set else
                torch.zeros(0, dtype=self.ops.params().dtype, device=self.ops.device))
            crest = _common.restore_controller(_from_portable(state.get("crest")), self.labels, like)
            pos = state.get("position")
            if isinstance(pos, bool) or not isinstance(pos, (int, np.integer)) or not 0 <= int(pos) <= self.total_steps:
                saved = state.get("epochs")
                more = (f": the state was saved by a run planned for {saved} epochs, this loader plans {self.epochs} "
                        f"(epochs=, or Trainer(max_epochs=) with Lightning; it may grow, not shrink)"
                        if isinstance(saved, (int, np.integer)) and saved != self.epochs else "")
                raise ValueError(f"{where}: position must be an integer in [0, {self.total_steps}] "
                                 f"(the planned steps), got {pos!r}{more}")
            pos = int(pos)
            pending = _common.stored_batches(state.get("pending", []), self.n, where, "pending", convert=_from_portable)
            if int(crest.counters["train_steps"]) != pos + len(pending):
                raise ValueError(f"{where}: position {pos} and {len(pending)} pending batches differ from the "
                                 f"controller's {int(crest.counters['train_steps'])} batches handed out")
            if pos + len(pending) > self.total_steps:
                raise ValueError(f"{where}: position {pos} plus {len(pending)} pending batches exceed the "
                                 f"{self.total_steps} planned steps")
            b = state.get("batch")
            if (b is None) != (pos == 0):
                raise ValueError(f"{where}: batch must be present exactly when position > 0 "
                                 f"(position {pos}, batch {'missing' if b is None else 'present'})")
            batch = None
            if b is not None:
                batch = Batch(*stored_batch(_from_portable(b), self.n, where))
            anchor = state.get("anchor_buffers")  # absent from checkpoints before 2026-12-01: the live buffers
            if anchor is not None:
                live = dict(self.ops.model.named_buffers())
                if not isinstance(anchor, dict) or any(
                        not isinstance(t, torch.Tensor) or k not in live or t.shape != live[k].shape
                        for k, t in anchor.items()):
                    raise ValueError(f"{where}: anchor_buffers must map the model's buffer names to tensors of their "
                                     "shapes (a checkpoint of another model?)")
            number = _common.measure_anchor(state, where)  # (checked before anything changes)
        self._checked_pass_state(state, pos)  # the pass plan: the last check
        saved_epochs = state.get("epochs")  # a shorter plan is said once
        if isinstance(saved_epochs, (int, np.integer)) and not isinstance(saved_epochs, bool) and saved_epochs > self.epochs:
            said.append((
                f"{type(self).__name__}: the state was saved by a run planned for {int(saved_epochs)} epochs, this "
                f"loader plans {self.epochs}: the run continues from step {pos} and ends at step {self.total_steps} "
                "(the budget report counts this shorter run). Build it with the saved epochs= to finish that run.",
                UserWarning))
        _common.say(said)  # before anything changes: a warnings filter that raises leaves the loader as it was
        self._load_pass_state(state, pos)
        self._state = crest
        # the loaded vectors are over the saved set (checkpoints before 2026-12-05: the set as it is now): the
        # first step compares the set it trains with it
        self._trainable_ids = tuple(id(p) for p in (self.ops._trainable() if saved_set is None else saved_set))
        self._batch = batch
        self._pending = pending
        # the window of batches handed out starts with the loaded last one (trained): state_dict(trained=)
        # at the first step after the load needs it
        self._loaded_position = self._position
        if batch is not None:
            self._handed, self._handed_from = [batch], self._position - 1
            self._handed_epoch = [(self._position - 1) // self.steps_per_epoch]
        else:
            self._handed, self._handed_epoch, self._handed_from = [], [], self._position
        _inner_ops(self.ops)._anchor_buffers = {k: t.detach().clone() for k, t in anchor.items()} if anchor else None
        if number is not None:
            _inner_ops(self.ops)._gen = number


# ------------------------------------------------------------------------------------------------
# the batch sampler: CREST's batches through the user's own DataLoader
# ------------------------------------------------------------------------------------------------
class WeightedKey(tuple):
    """``(index, weight)``: what :class:`CrestBatchSampler` hands the ``DataLoader`` for each example.
    :class:`WeightedDataset` turns it into the example plus its weight; a plain tuple, so it pickles to
    worker processes unchanged.

    Examples
    --------
    >>> key = WeightedKey(7, 1.25)
    >>> key[0], float(key[1]), isinstance(key, tuple)
    (7, 1.25, True)
    """

    __slots__ = ()

    def __new__(cls, index: int, weight: float):
        return super().__new__(cls, (int(index), np.float32(weight)))

    def __reduce__(self):
        return WeightedKey, (self[0], self[1])


def _callable_name(fn) -> str:
    """A callable's name for a message: ``module.qualname`` of a function, the class name of an instance,
    ``functools.partial(name, ...)`` of a partial."""
    if isinstance(fn, functools.partial):
        return f"functools.partial({_callable_name(fn.func)}, ...)"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else str(name)


class WeightedDataset:
    """``dataset`` read through :class:`WeightedKey` s: item ``(i, w)`` is ``dataset[i]`` with the weight ``w``
    appended (``(x, y)`` becomes ``(x, y, w)``; a non-tuple item ``x`` becomes ``(x, w)``; a dict item gets
    the key ``"crest_weight"``, and ``"crest_index"`` with ``indices=True``). The weight is a
    float32 scalar, so ``default_collate`` stacks a batch's weights into a float32 tensor. Plain integer
    keys read ``dataset`` unchanged (weight-free evaluation through the same object). Map-style,
    picklable, and its own transforms are the dataset's: safe in ``DataLoader`` worker processes.

    Examples
    --------
    >>> data = _example_data()  # this module's example data: 16 points of 4 features, two classes
    >>> weighted = WeightedDataset(data)
    >>> x, y, w = weighted[WeightedKey(3, 0.5)]
    >>> bool(torch.equal(x, data[3][0])), int(y), float(w)
    (True, 1, 0.5)
    >>> len(weighted[3])  # a plain index reads the dataset's item unchanged
    2
    """

    def __init__(self, dataset, *, indices: bool = False):
        check_map_style(dataset)
        if not isinstance(indices, bool):
            raise TypeError(f"indices must be a bool, got {type(indices).__name__}")
        self.dataset = dataset
        self.indices = indices  # also append the example's index: (x, y, w, i), for observe(indices=)

    def __len__(self) -> int:
        return len(self.dataset)

    def _with(self, item, i, w):
        if isinstance(item, dict):  # Hugging Face style features: the weight (and index) as extra keys
            return {**item, "crest_weight": w, **({"crest_index": i} if self.indices else {})}
        extra = (w, i) if self.indices else (w,)
        if isinstance(item, (tuple, list)):  # (x, y, ...) and NamedTuples: the fields, then the weight
            return (*item, *extra)
        return (item, *extra)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            i, w = key
            return self._with(self.dataset[i], int(i), w)
        return self.dataset[key]

    def __getitems__(self, keys):
        getitems = getattr(self.dataset, "__getitems__", None)
        if not keys or not isinstance(keys[0], tuple) or not callable(getitems):
            return [self[k] for k in keys]
        items = getitems([int(k[0]) for k in keys])
        return [self._with(item, int(k[0]), k[1]) for item, k in zip(items, keys)]


class WeightedCollate:
    """A ``collate_fn`` for :class:`WeightedDataset` items from one written for the dataset's own items: it
    collates the items without the fields ``WeightedDataset`` appends (the weight; with ``indices=True``
    the index too), then appends them, the weights as a float32 tensor and the indices as int64, so
    ``(x, y)`` items collated by ``collate_fn`` into ``(xs, lengths, ys)`` come out as
    ``(xs, lengths, ys, w)``. Tuple items reach ``collate_fn`` as plain tuples (a NamedTuple as a plain
    tuple, as ``WeightedDataset`` returns it; a non-tuple item ``x``, which ``WeightedDataset`` made
    ``(x, w)``, as the 1-tuple ``(x,)``). Dict items: the ``"crest_weight"`` (and ``"crest_index"``) keys
    are taken out, and put back as tensors into the mapping ``collate_fn`` returns (a tuple result gets
    them appended). Picklable when ``collate_fn`` is (worker processes).

    A padding collate from the PyTorch tutorials reads its items' fields by position and drops a field it
    does not expect: given ``WeightedDataset``'s items it drops the weights, and a loop that reads three
    fields trains unweighted, with nothing said: wrap such a collate in this class.

    Examples
    --------
    >>> import torch
    >>> def pad(items):  # a collate written for (sequence, label) items
    ...     xs = torch.nn.utils.rnn.pad_sequence([x for x, _ in items], batch_first=True)
    ...     return xs, torch.tensor([len(x) for x, _ in items]), torch.tensor([y for _, y in items])
    >>> items = [(torch.ones(2), 1, 0.5), (torch.ones(3), 0, 2.0)]  # WeightedDataset's (x, y, w)
    >>> xs, lengths, ys, w = WeightedCollate(pad)(items)
    >>> xs.shape, lengths.tolist(), ys.tolist(), w.tolist()
    (torch.Size([2, 3]), [2, 3], [1, 0], [0.5, 2.0])
    """

    def __init__(self, collate_fn=None, *, indices: bool = False):
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable or None, got {type(collate_fn).__name__}")
        if not isinstance(indices, bool):
            raise TypeError(f"indices must be a bool, got {type(indices).__name__}")
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self.indices = indices

    def __call__(self, items):
        keys = ("crest_weight", "crest_index") if self.indices else ("crest_weight",)
        if items and isinstance(items[0], Mapping):
            out = self.collate_fn([{k: v for k, v in it.items() if k not in keys} for it in items])
            w = [it["crest_weight"] for it in items]
            i = [it["crest_index"] for it in items] if self.indices else None
        else:
            k = len(keys)
            out = self.collate_fn([tuple(it[:-k]) for it in items])
            w = [it[-k] for it in items]
            i = [it[-1] for it in items] if self.indices else None
        extra = {"crest_weight": torch.tensor([float(v) for v in w], dtype=torch.float32)}
        if i is not None:
            extra["crest_index"] = torch.tensor([int(v) for v in i], dtype=torch.int64)
        if isinstance(out, collections.abc.MutableMapping):  # a dict, a Hugging Face BatchEncoding: kept
            out.update(extra)
            return out
        return (*out, *extra.values()) if isinstance(out, (tuple, list)) else (out, *extra.values())


class _IteratorSettings:
    """The settings of a ``DataLoader`` that :class:`CrestBatchSampler` reads, from its iterator's own copies
    (for a sampler reached through a wrapper's generator, where no frame holds the ``DataLoader``)."""

    def __init__(self, it):
        self.collate_fn = getattr(it, "_collate_fn", None)
        self.num_workers = getattr(it, "_num_workers", 0)
        self.prefetch_factor = getattr(it, "_prefetch_factor", None)
        self.in_order = getattr(it, "_in_order", True)


def _calling_loader_iterator(me, depth: int = 12):
    """``(iterator, loader)`` of the ``DataLoader`` iterator that is calling ``iter()`` on a batch sampler, or
    ``(None, None)``. Called directly, the caller's frame is the iterator's ``__init__`` / ``_reset(loader)``,
    which holds the ``DataLoader``; through a batch-sampler wrapper (``CrestTrainer``'s resumed epoch,
    accelerate's shards), ``iter()`` runs inside the wrapper's generator at the iterator's first
    ``next()``, a few frames below the iterator's own method: the nearest frame whose ``self`` is a
    ``DataLoader`` iterator above generator frames only, with that iterator's copies of the loader's
    settings (review 67: the wrapper hid
    the loader, and a resumed run under workers was told it fetched 0 batches ahead)."""
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    try:
        f = sys._getframe(2)
    except ValueError:  # pragma: no cover - a stack without that frame
        return None, None
    led = False  # a wrapper on the way leads the pass with stand-ins for a skip above it to discard
    for _ in range(depth):
        if f is None:
            break
        try:
            loc = f.f_locals
        except AttributeError:  # pragma: no cover - interpreters without frame locals
            return None, None
        it = loc.get("self")
        led = led or bool(getattr(it, "leads_with_stand_ins", False))
        if isinstance(it, _BaseDataLoaderIter):
            loader = loc.get("loader")
            return it, (loader if loader is not None else _IteratorSettings(it))
        skip = getattr(it, "skip_batches", None)
        # every frame of this walk below here is a generator passing the sampler's batches up, so a skip
        # here skips the sampler's (through any wrapper between: accelerate's shards, a user's generator)
        if isinstance(skip, int) and not isinstance(skip, bool) and skip > 0 and not led:
            raise ValueError(
                f"a {type(it).__name__} skips the first {skip} batches of CrestBatchSampler's pass (accelerate's "
                "skip_first_batches, the usual mid-epoch resume): the sampler restores its own position, so its "
                "next batch is already the first one not trained, and the skipped batches would be lost while "
                "counted as trained. To resume, load_state_dict() (with the state saved by "
                "state_dict(trained=...)) and iterate the loader as it is, without skipping")
        if (isinstance(it, BatchSampler) and getattr(it, "sampler", None) is me) or not (
                f.f_code.co_flags & inspect.CO_GENERATOR):
            return it, None  # a BatchSampler over the sampler (given as sampler=), or a caller that is no wrapper
        f = f.f_back  # a wrapper's generator (accelerate's SkipBatchSampler among them): look further up
    return None, None


def _wrapper_look_ahead(depth: int = 24):
    """The ``accelerate`` data loader (``DataLoaderShard``, ``DataLoaderDispatcher``, what
    ``Accelerator.prepare`` and the Hugging Face ``Trainer`` make of a ``DataLoader``) iterating the
    ``DataLoader`` whose iterator calls ``iter()`` on the sampler, else None: it takes the next batch from the
    ``DataLoader`` before it yields the current one, one batch beyond the workers' prefetch (review 96: under
    ``num_workers=2`` a cycled coreset's later copy then lay in the window of ``observe(indices=)`` and took the
    losses of the batch trained five steps before it), until the ``DataLoader`` ends (its ``end_of_dataloader``
    set: the last batch is given to the loop then)."""
    try:
        f = sys._getframe(2)
    except ValueError:  # pragma: no cover - a stack without that frame
        return None
    for _ in range(depth):
        if f is None:
            break
        obj = f.f_locals.get("self") if f.f_code.co_name == "__iter__" else None
        # the two that look ahead (accelerate's SkipDataLoader, its other DataLoaderAdapter, yields each batch
        # as it gets it; review 100), by class name along the class's own line: no import of accelerate here
        if obj is not None and type(obj).__module__.startswith("accelerate.") and any(
                c.__name__ in ("DataLoaderShard", "DataLoaderDispatcher") for c in type(obj).__mro__):
            return obj
        f = f.f_back
    return None


def _accelerate_caller(depth: int = 4) -> bool:
    """Whether an ``accelerate`` data loader's own method is among the callers of the caller (its ``set_epoch``,
    which its ``__iter__`` calls at every iteration)."""
    f = sys._getframe(2)
    for _ in range(depth):
        if f is None:
            return False
        obj = f.f_locals.get("self")
        if obj is not None and type(obj).__module__.startswith("accelerate."):
            return True
        f = f.f_back
    return False


class _CountedPass:
    """A :class:`CrestBatchSampler` pass as its multi-process DataLoader reads it: the batches handed out and
    the DataLoader's requests for index lists, counted. Such a DataLoader asks for ``window`` index lists
    (``num_workers x prefetch_factor``) before its first batch and one more for each batch it gives the loop,
    also once the pass has ended, so a pass its loop read to the end got ``window + handed`` requests and one
    left earlier fewer: the batches the workers had fetched ahead were never trained."""

    def __init__(self, sampler: CrestBatchSampler, batches, window: int, held: int = 0, shard=None):
        self.sampler, self.batches, self.window, self.held = sampler, batches, int(window), int(held)
        self.shard = shard  # a weak reference to the accelerate loader that holds ``held`` batch, or None
        self.requests = self.handed = 0
        self.ended = False
        self.loads = sampler._loads  # a state loaded after this: the batches handed out were the old run's
        self.said = False  # the stale batches told about (once a pass)

    def __iter__(self):
        return self

    def __next__(self):
        self.requests += 1
        if self.handed and self.sampler._loads != self.loads and self.requests > self.window:
            self.stale()
        if self.ended:
            raise StopIteration
        self.sampler._advancing = self  # (the pass's start, _pass_started, reads which pass it is)
        try:
            item = next(self.batches)
        except StopIteration:
            self.ended = True
            raise
        finally:
            self.sampler._advancing = None
        self.handed += 1
        return item

    def __getstate__(self) -> dict:
        return {**self.__dict__, "batches": None}  # (a copy's record of the pass; the pass itself is the original's)

    def untrained(self) -> bool:
        """Whether the pass ran to its end while its DataLoader gave the loop fewer batches than it handed out."""
        return self.ended and self.requests - self.window < self.handed

    def given(self) -> int:
        """The batches the loop got: the DataLoader gave every one it was asked for; left early, a wrapper that
        holds one (accelerate's) had one more from it than it gave the loop (a pass read to its end got them
        all: review 146 found every full epoch one short under accelerate)."""
        got = self.requests - self.window
        if got < self.handed:
            return max(got - self.held, 0)
        # every batch reached the wrapper; it gave the loop the last one only if it reached its end (review 158:
        # a loop left one batch before the epoch's end had that batch counted as trained). Its end flag tells
        # that only while this is the sampler's last pass: the wrapper's next pass resets it before its first
        # batch (so the warning at that pass's start cannot tell, docs/pytorch.md)
        shard = self.shard() if self.shard is not None else None
        holding = (self.held and shard is not None and self.sampler._counted is self
                   and getattr(shard, "end_of_dataloader", True) is False)
        return got - 1 if holding else got

    def stale(self) -> None:
        """A request after a ``load_state_dict``: the DataLoader has just given the loop a batch its workers had
        fetched before the load, a batch of the old run that no count or checkpoint of the loaded one holds
        (review 139: a loop that rolled back to a checkpoint and read on trained 30 batches for a plan of 26).
        Said once a pass."""
        if self.said:
            return
        self.said = True
        warnings.warn(
            f"CrestBatchSampler: load_state_dict was called while this DataLoader's pass was running, and the "
            f"DataLoader has just given your loop a batch its workers had fetched before the load (up to "
            f"{self.window + self.held} such): it belongs to the run before the load, and no count or checkpoint of "
            "the loaded run holds it. Leave the loop after load_state_dict (skip the batches it still yields) and "
            "start a new pass, iter(loader), which begins at the loaded position", stacklevel=_common.user_stacklevel())


class CrestBatchSampler(CrestLoader):
    """CREST's weighted coreset batches for **your own** ``DataLoader`` (workers, pinned memory,
    persistent workers, your ``collate_fn``)::

        sampler = CrestBatchSampler(model, train_set, config=CrestConfig(m=128), budget=0.1, epochs=200)
        loader = DataLoader(WeightedDataset(train_set), batch_sampler=sampler, num_workers=2, pin_memory=True,
                            persistent_workers=True)              # or: loader = sampler.dataloader(num_workers=2, ...)
        for epoch in range(200):
            for x, y, w in loader:                                # w: float32 weights, mean 1
                loss = (w.to(device) * F.cross_entropy(model(x.to(device)), y.to(device), reduction="none")).mean()

    Each pass over the sampler yields one epoch's share of index lists, ``len(sampler)`` batches (the
    ``DataLoader``'s length), as lists of :class:`WeightedKey`; :class:`WeightedDataset` appends each
    example's weight. Everything else is :class:`CrestLoader`'s (one implementation): the budget,
    ``set_epoch``, ``iter_run``, ``stats``, ``observe``, the measurement passes (``measure_dataset``,
    ``measure_batch_size``, ``measure_workers``) in the training process.

    Prefetching. A ``DataLoader`` with ``num_workers=w`` asks for ``w * prefetch_factor`` batches before
    it returns the first and one more as it returns it, and stays ``w * prefetch_factor`` ahead, so CREST
    decides a batch that many optimizer steps before it is trained: its selections and trust checks
    measure the model as it was then (with ``num_workers=0`` and a plain ``DataLoader`` there is no lag;
    a loader prepared by ``accelerate`` fetches one batch ahead even then; the checks of the batches
    handed out in a row at an epoch's start take the measurement of the check before them). The run
    stays deterministic for a fixed ``num_workers`` and ``prefetch_factor``. Checkpoints: :meth:`state_dict`
    takes ``trained``, the number of batches of the run you have trained (e.g. your global step); batches
    handed out beyond it are stored and handed out first after :meth:`load_state_dict`, so a resumed run
    trains the same batches. Without ``trained`` every handed-out batch counts as trained, which is exact
    at an epoch's end.
    ``observe(losses, indices=...)`` feeds the drop policy with the indices of the batch the losses
    belong to (``WeightedDataset(dataset, indices=True)`` appends them to each item: ``x, y, w, i``).

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(4, 2)
    >>> sampler = CrestBatchSampler(model, _example_data(64), config=CrestConfig(m=8), budget=0.5, seed=0)
    >>> loader = sampler.dataloader()  # DataLoader(WeightedDataset(data), batch_sampler=sampler)
    >>> x, y, w = next(iter(loader))
    >>> x.shape, w.dtype, round(float(w.mean()), 4), len(loader) == len(sampler)
    (torch.Size([8, 4]), torch.float32, 1.0, True)
    """

    _kind = "sampler"

    def __init__(self, model: nn.Module, dataset, **kwargs):
        if "device" in kwargs:
            raise TypeError("CrestBatchSampler has no device: the DataLoader yields host batches; move them "
                            "in your step (pin_memory=True speeds that up)")
        super().__init__(model, dataset, **kwargs)
        self._observed_step = -1  # the step of the batch observe(indices=) got last (for its error message)
        self._warned_last = False  # last_indices / last_weights read under a DataLoader that fetches ahead
        self._unmatched_warned = False
        self._ambiguous_warned = False  # observe(indices=) matched several unobserved batches, none in order
        self._collate_warned = False
        self._weights_kept: bool | None = None  # the sampler's collate_fn tried on weighted items (once)
        self._ahead = 64  # batches a DataLoader may fetch ahead (its workers x prefetch_factor, at least 64)
        self._loader_ahead = 0  # the batches the DataLoader that called iter() last fetches ahead
        self._pass_ahead = 0  # ... and that of the DataLoader the running pass hands its batches to
        self._saved_ahead: int | None = None  # a loaded state's: compared with the first pass's after the load
        self._loader_held = self._pass_held = 0  # of those, accelerate's one batch (_wrapper_look_ahead)
        self._loader_shard = self._pass_shard = None  # weak references to that accelerate loader
        self._saved_held: int | None = None  # a loaded state's; None: saved before that batch was counted
        self._ahead_known = False  # whether a pass ran (since construction or a load): _pass_ahead is its window
        self._loader_iter = self._pass_iter = None  # weak references to those DataLoaders' iterators
        self._pass_from = 0  # the run position at the start of the last pass
        self._counted: _CountedPass | None = None  # the last pass advanced (its DataLoader's requests counted)
        self._advancing: _CountedPass | None = None  # the counted pass whose next() runs now, else None

    def __getstate__(self) -> dict:
        # the DataLoaders' iterators are this object's and this process's (weak references, which do not pickle;
        # a deepcopy kept the original's and read its counts: review 139), as are the passes running over them
        return {**super().__getstate__(), "_loader_iter": None, "_pass_iter": None, "_advancing": None,
                "_loader_shard": None, "_pass_shard": None}

    def __iter__(self):
        # The usual first mistake, DataLoader(train_set, batch_sampler=sampler) without WeightedDataset, ends
        # in the dataset's own indexing error about a float32 (the key's weight). The DataLoader's iterator
        # calls iter() on its batch sampler from its own method, so that frame names the dataset: when it is
        # the training set itself, say what to do. Anything unexpected in the frame skips the check.
        # The same frame tells two more mistakes: the sampler given as sampler= (a BatchSampler over it calls
        # iter()), and a DataLoader that delivers batches out of order (in_order=False).
        it, loader = _calling_loader_iterator(self)
        ds = getattr(it, "_dataset", None)
        # sampler= with a batch_size wraps it in a BatchSampler; with batch_size=None (torch's idiom for a sampler
        # that yields whole batches) the loader's iterator reads it directly, and would fetch each batch of keys as
        # one item (review 121)
        whole = ("CrestBatchSampler yields whole batches: pass it as DataLoader(..., batch_sampler=sampler) "
                 "(not sampler=, and without batch_size), or use sampler.dataloader(...)")
        if isinstance(it, BatchSampler) and getattr(it, "sampler", None) is self:
            raise TypeError(whole)
        problem = None
        if (loader is not None and getattr(loader, "sampler", None) is self
                and getattr(loader, "batch_sampler", self) is None):
            problem = whole
        elif ds is not None and ds is self.dataset:
            problem = (f"this DataLoader reads the training set itself (a {type(ds).__name__}), but "
                       "CrestBatchSampler yields (index, weight) "
                       "keys: wrap it, DataLoader(WeightedDataset(train_set), batch_sampler=sampler, ...), or use "
                       "sampler.dataloader(...)")
        elif ds is not None and type(ds).__module__.startswith("torch.utils.data"):
            problem = (f"this DataLoader reads a {type(ds).__name__}, but CrestBatchSampler yields (index, weight) "
                       "keys of the training set it was built with: DataLoader(WeightedDataset(train_set), "
                       "batch_sampler=sampler, ...), or sampler.dataloader(...) (to train on a part of a data set, "
                       "build the sampler on that part)")
        elif isinstance(ds, WeightedDataset) and ds.dataset is not self.dataset and len(ds) != self.n:
            problem = (f"this DataLoader reads WeightedDataset(a {type(ds.dataset).__name__} of {len(ds)} examples), but "
                       f"the sampler was built on a {type(self.dataset).__name__} of {self.n}: its indices are positions "
                       "in that one, so wrap the dataset the sampler was built on (to train on a part of a data set, "
                       "build the sampler on that part and wrap the same part)")
        elif ds is not None and self.ops._collate is None and getattr(loader, "collate_fn", default_collate) not in (
                default_collate, None):
            problem = (f"this DataLoader collates with its own collate_fn ({_callable_name(loader.collate_fn)}), but "
                       "the sampler was given none: its measurement passes (the selections' features, the trust "
                       "checks, the model fit) would collate the items with default_collate and measure other "
                       "inputs than the ones you train on. Give the sampler your collate_fn f, which takes the "
                       "dataset's items as they are, CrestBatchSampler(..., collate_fn=f), and the DataLoader "
                       "WeightedCollate(f), which takes the weight WeightedDataset appends out of each item before "
                       "f and appends the weights after it (f alone would collate the weight as one of the item's "
                       "fields): sampler.dataloader(collate_fn=WeightedCollate(f)). A collate that mixes examples "
                       "or their labels (mixup, cutmix) is for the training batches only: then give the sampler "
                       "one that does not mix, CrestBatchSampler(..., collate_fn=torch.utils.data.default_collate) "
                       "or yours without the mixing, so that its passes measure the examples themselves")
        elif (isinstance(ds, WeightedDataset) and getattr(loader, "collate_fn", None) is self.ops._collate
              and not (_row_safe(self.ops._collate) and not getattr(self.ops._collate, "crest_rows", False))
              and not self._collate_keeps_weights(ds)):
            # (default_collate and Hugging Face's default_data_collator stack the weight field as it is)
            problem = (f"this DataLoader collates with the sampler's own collate_fn ({_callable_name(loader.collate_fn)}), "
                       "which takes the dataset's items, but the DataLoader's items are WeightedDataset's, with the "
                       "weight appended, and this collate does not return the weights as its last field (tried on "
                       "two items): a collate that reads its items' fields by position drops the weights or takes "
                       "another field for them, silently. Give the DataLoader WeightedCollate(f) (the weight taken "
                       "out before f and appended after it): sampler.dataloader(collate_fn=WeightedCollate(f))")
        elif ds is not None and getattr(loader, "in_order", True) is False and getattr(loader, "num_workers", 0) > 0:
            problem = ("this DataLoader has in_order=False: its workers deliver batches as they finish, but the "
                       "sampler's checkpoints (state_dict(trained=)), rewind() and observe(indices=) count the "
                       "batches trained in the order it handed them out, and CREST's decisions would depend on "
                       "the workers' timing; leave in_order=True")
        if (problem is None and ds is not None and self.ops._collate not in (None, default_collate)
                and not self._collate_warned and getattr(loader, "collate_fn", None) is default_collate):
            self._collate_warned = True
            warnings.warn(f"CrestBatchSampler: the sampler's measurement passes collate with your collate_fn "
                          f"({_callable_name(self.ops._collate)}), but this DataLoader with default_collate: if the "
                          "two make different inputs (padding, normalising), CREST measures other inputs than the "
                          "ones you train on; give the DataLoader a collate_fn too (sampler.dataloader(collate_fn=...))",
                          stacklevel=_common.user_stacklevel())
        if problem is not None:
            if not hasattr(it, "_shutdown"):  # refused in the iterator's __init__, before any worker started:
                it._shutdown = True  # its __del__ then has nothing to shut down (no AttributeError there)
            raise TypeError(problem)
        self._loader_ahead = self._loader_held = 0
        self._loader_shard = None
        self._loader_iter = weakref.ref(it) if ds is not None and it is not None else None
        if ds is not None:  # the untrained batches a checkpoint may need are at most those fetched ahead
            ahead = int(getattr(loader, "num_workers", 0) or 0) * int(getattr(loader, "prefetch_factor", 0) or 0)
            shard = _wrapper_look_ahead()  # accelerate's loaders hold one batch more
            self._loader_held = int(shard is not None)
            self._loader_shard = weakref.ref(shard) if shard is not None else None
            ahead += self._loader_held
            self._ahead = max(self._ahead, ahead)
            self._loader_ahead = ahead
        # the DataLoader's requests reach the pass only where it reads this sampler itself: through a wrapper
        # (CrestTrainer's resumed epoch, accelerate's shards, a user's generator) they stop at the wrapper once
        # it has ended, and every full pass looked left early (review 142)
        direct = it is not None and getattr(it, "_index_sampler", None) is self
        window = self._loader_ahead - self._loader_held if direct else 0
        # counted where workers fetch ahead, or an accelerate loader holds a batch (review 160: without workers its
        # held batch was counted as trained after a loop left one batch before the epoch's end)
        return (_CountedPass(self, super().__iter__(), window, self._loader_held, self._loader_shard)
                if window > 0 or (direct and self._loader_held) else super().__iter__())

    def set_epoch(self, epoch: int) -> None:
        """As :meth:`CrestLoader.set_epoch`; with ``per_epoch=False`` (one pass is the whole run) the call an
        ``accelerate`` loader makes at each of its iterations is ignored (review 158: it was refused, telling the
        user to drop an option they need, for a call they never made).

        Examples
        --------
        >>> import torch
        >>> sampler = CrestBatchSampler(torch.nn.Linear(4, 2), _example_data(), config=CrestConfig(m=4),
        ...                             budget=1.0, epochs=2)  # 4 batches of 4 a pass
        >>> loader = sampler.dataloader()
        >>> for epoch in range(2):
        ...     sampler.set_epoch(epoch)
        ...     batches = sum(1 for _ in loader)
        >>> batches, sampler.position
        (4, 8)
        """
        if not self.per_epoch and _accelerate_caller():
            return
        super().set_epoch(epoch)

    def _handed_ahead(self, name: str) -> None:
        """Said once: under a DataLoader that fetches ahead, the batch handed out last is not the one the loop
        holds."""
        if self._pass_ahead and not self._warned_last:
            self._warned_last = True
            warnings.warn(
                f"CrestBatchSampler.{name} is the batch handed to the DataLoader last, and its workers fetch up to "
                f"{self._pass_ahead} batches ahead of the one your loop holds: for the batch in hand, build the "
                "DataLoader over WeightedDataset(dataset, indices=True) (sampler.dataloader(indices=True)), whose "
                "batches carry their indices (x, y, w, i), and its weights are w (said once).",
                stacklevel=_common.user_stacklevel())

    @property
    def last_indices(self) -> np.ndarray | None:
        """Dataset indices of the batch handed out last (host int64), or None before the first: under a
        ``DataLoader`` with workers, up to ``num_workers * prefetch_factor`` batches ahead of the one the loop
        holds (warned about once; ``WeightedDataset(indices=True)`` gives each batch its own)."""
        self._handed_ahead("last_indices")
        return super().last_indices

    @property
    def last_weights(self) -> np.ndarray | None:
        self._handed_ahead("last_weights")
        return super().last_weights

    _look_advice = "call sampler.rewind(batches_trained) before the next pass"
    _run_loop_advice = ""  # (iter_run is the loader's; a DataLoader reads a sampler pass by pass)

    def _broken_pass(self, handed: int, named_later: bool = False) -> None:
        if not self._pass_ahead:  # no look-ahead: as CrestLoader's (said once)
            super()._broken_pass(handed, named_later)
            return
        # its DataLoader fetched ahead: batches handed out may never have been trained (said every time)
        warnings.warn(
            f"CrestBatchSampler: the last pass was left before its end after handing out {handed} batches "
            f"to a DataLoader whose workers fetch up to {self._pass_ahead} batches ahead; they all count as "
            "trained, and this pass continues after them. If the loop was broken off (or a batch taken with "
            "next(iter(loader))), call sampler.rewind(batches_trained) before the next pass: the fetched, "
            "untrained batches are then handed out again, first." + ("" if named_later else f" {_BREAK_ADVICE}"),
            stacklevel=_common.user_stacklevel())

    def _pass_started(self) -> None:
        super()._pass_started()
        last, self._counted = self._counted, self._advancing
        if last is not None and last is not self._advancing and last.untrained():
            # the last pass ran to its share's end (so no broken pass was seen), but its DataLoader gave the loop
            # fewer batches than it handed out: a loop left within the workers' last prefetch window (a break
            # near the epoch's end, zip with a shorter iterable, short epochs), review 140
            warnings.warn(
                f"CrestBatchSampler: the last pass handed out {last.handed} batches, but its DataLoader gave your "
                f"loop only {last.given()} of them before the loop left it (its workers fetch up to {last.window} "
                f"batches ahead); all count as trained, and this pass continues after them. If the loop was broken "
                f"off (zip with a shorter iterable, a break near the epoch's end), call "
                f"sampler.rewind(batches_trained) before the next pass: the fetched, untrained batches are then "
                f"handed out again, first.", stacklevel=_common.user_stacklevel())
        self._pass_ahead, self._ahead_known = self._loader_ahead, True
        self._pass_held, self._pass_shard = self._loader_held, self._loader_shard
        self._pass_iter, self._pass_from = self._loader_iter, self._position
        saved, self._saved_ahead = self._saved_ahead, None
        saved_held, self._saved_held = self._saved_held, None
        now = self._pass_ahead
        if saved is not None and saved_held is None:  # saved before 2026-12-05: its count left accelerate's
            now -= self._pass_held  # batch out, which was held then as now (review 100)
        if saved is not None and saved != now:
            basis = ("num_workers x prefetch_factor" if saved_held is None and self._pass_held
                     else "num_workers x prefetch_factor, one more under accelerate")
            warnings.warn(
                f"CrestBatchSampler resumed under a DataLoader that fetches {now} batches ahead; the saved run's "
                f"fetched {saved} ({basis}): the controller makes each batch that many steps before it is trained, "
                "so its selections, checks and drop decisions now measure other parameters and the run continues "
                "differently from the saved one's. Resume with the saved run's num_workers and prefetch_factor to "
                "continue it exactly", stacklevel=_common.user_stacklevel())

    def _state_dict(self, position: int, batch: Batch | None, pending: list, epochs_done: int) -> dict:
        # how far ahead the saving run's DataLoader fetched (None before any pass: unknown; a loaded state's
        # own value until a pass runs): a resume under another count is told it differs
        if self._saved_ahead is not None:
            ahead, held = self._saved_ahead, self._saved_held
        else:
            ahead, held = (self._pass_ahead, self._pass_held) if self._ahead_known else (None, None)
        return {**super()._state_dict(position, batch, pending, epochs_done), "fetch_ahead": ahead,
                "fetch_ahead_accelerate": held}

    def _fetched_untrained(self) -> int | None:
        """The batches handed out that the DataLoader has not given the loop (its workers fetched them ahead):
        from its live iterator's count of the batches it yielded (``_num_yielded``), else from the last counted
        pass's requests (:class:`_CountedPass`, where the DataLoader read the sampler itself); None where that
        cannot be told (a pass left before its end, its iterator gone, through a wrapper)."""
        if not self._pass_ahead or not self._position:
            return 0
        live = self._live_untrained()
        if live is not None:
            return live
        counted = self._counted
        if counted is not None:
            return max(0, counted.handed - counted.given())
        return None if self._open_handed else 0

    def _live_untrained(self) -> int | None:
        """The batches handed out that the DataLoader has not given the loop, counted exactly from its live
        iterator (``_num_yielded``, less the batch an ``accelerate`` loader took from it and holds until the
        DataLoader ends: review 157, a checkpoint inside its loop skipped that batch), else None."""
        it = self._pass_iter() if self._pass_iter is not None else None
        yielded = getattr(it, "_num_yielded", None)
        if not isinstance(yielded, int):
            return None
        held = 0
        if self._pass_held and yielded > 0:
            shard = self._pass_shard() if self._pass_shard is not None else None
            held = int(shard is not None and getattr(shard, "end_of_dataloader", True) is False)
        return max(0, self._position - self._pass_from - yielded + held)

    def _untrained_ahead(self) -> bool:
        """Whether batches of the last pass were fetched ahead but not given to the loop (or may have been)."""
        k = self._fetched_untrained()
        return k is None or k > 0

    def _trained_view(self) -> tuple[int, dict, int]:
        """``(steps, counters, epochs_done)`` of the run as the loop has trained it: the batches the workers
        fetched ahead are handed out (the controller made them, and charged their measurements) but not trained
        yet, and ``stats`` counted them as trained, up to the prefetch window ahead during a run and for good
        after a loop left early (review 145: 15 trained reported for 11)."""
        counters = dict(self._counters())
        k = min(self._fetched_untrained() or 0, len(self._handed))
        if not k:
            return self._position, counters, self._epochs_done
        counters["train_steps"] -= k
        counters["train_examples"] -= sum(int(b.indices.size) for b in self._handed[-k:])
        # an epoch is done once its share's last batch is trained: not before the first batch not given (review
        # 146: whole-run passes and passes budgets, where the epochs do not follow from the steps)
        done = min(self._epochs_done, self._handed_epoch[-k]) if len(self._handed_epoch) >= k else self._epochs_done
        return self._position - k, counters, done

    @property
    def stats(self) -> dict:
        """As :attr:`CrestLoader.stats`, with ``step``, the training counters and the budget report those of the
        batches your loop has been given: the ones the DataLoader's workers fetched ahead are left out."""
        st = super().stats
        steps, counters, _ = self._trained_view()
        st["step"] = steps
        st["counters"] = {k: int(v) for k, v in counters.items()}
        return st

    def _handed_keep(self) -> int:
        # an epoch's batches and a prefetch window (state_dict(trained=) anywhere in the epoch; with
        # per_epoch=False one pass is the whole run, and the window may exceed an epoch's share)
        return self.steps_per_epoch + self._ahead

    def _make_batch(self, batch: Batch):
        return [WeightedKey(i, w) for i, w in zip(batch.indices.tolist(), batch.weights.tolist())]

    def load_state_dict(self, state: dict) -> None:
        """As :meth:`CrestLoader.load_state_dict`: the batches stored as pending (handed out beyond ``trained``)
        come first in the next pass.

        Examples
        --------
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> sampler = CrestBatchSampler(model, _example_data(), config=CrestConfig(m=4), budget=1.0, seed=0)
        >>> it = iter(sampler.dataloader())
        >>> first, second = next(it), next(it)  # two batches handed out, the first trained
        >>> resumed = CrestBatchSampler(model, _example_data(), config=CrestConfig(m=4), budget=1.0, seed=0)
        >>> resumed.load_state_dict(sampler.state_dict(trained=1))
        >>> resumed.position, bool(torch.equal(next(iter(resumed.dataloader()))[0], second[0]))
        (1, True)
        """
        super().load_state_dict(state)
        self._counted = None  # (rewind() comes here too: the last pass's batches are accounted for)
        # the last pass's iterator counts the old run's batches (a later state loaded beside a live persistent
        # iterator read as batches fetched ahead: review 146)
        self._pass_iter, self._pass_shard, self._pass_from = None, None, self._position
        self._observed_step = self._position - 1
        self._ahead_known = False
        ahead = state.get("fetch_ahead")  # absent before 2026-12-04, None before a pass: nothing to compare
        self._saved_ahead = int(ahead) if isinstance(ahead, (int, np.integer)) and not isinstance(ahead, bool) else None
        held = state.get("fetch_ahead_accelerate")  # of it, accelerate's batch; absent before 2026-12-05
        self._saved_held = int(held) if isinstance(held, (int, np.integer)) and not isinstance(held, bool) else None

    def rewind(self, trained: int) -> None:
        """Tell the sampler that only the first ``trained`` batches of the run were trained: the batches it
        handed out after them (a ``DataLoader`` with worker processes fetches ahead, and a pass you broke
        off leaves them untrained) are handed out again, first, by the next pass. The same as saving
        ``state_dict(trained=trained)`` and loading it.

        Examples
        --------
        >>> import torch
        >>> sampler = CrestBatchSampler(torch.nn.Linear(4, 2), _example_data(), config=CrestConfig(m=4),
        ...                             budget=1.0)  # 16 examples: 4 batches of 4 a pass
        >>> it = iter(sampler)
        >>> first, second = next(it), next(it)  # two batches fetched, only the first trained
        >>> sampler.rewind(1)
        >>> sampler.position, next(iter(sampler)) == second  # the untrained batch comes again, first
        (1, True)
        """
        last = self._state.last_check  # the controller's state is the same after the rewind: its last check too
        self.load_state_dict(self.state_dict(trained=trained))
        self._state = self._state._replace(last_check=last)

    def _collate_keeps_weights(self, ds: WeightedDataset) -> bool:
        """Whether the sampler's own collate_fn, handed WeightedDataset's items (weight appended), returns what
        it makes of the dataset's items plus the weights as its last field (a dict: a ``"crest_weight"``
        entry), as ``default_collate`` does. Tried once per sampler, on two items read under kept random
        states (their loads move no RNG of the training); a collate that fails on the weighted items does not
        keep them."""
        if self._weights_kept is None:
            f, k = self.ops._collate, min(2, self.n)
            w = [np.float32(0.5 + j) for j in range(k)]
            try:
                with _random_states_kept():
                    raw = [self.dataset[j] for j in range(k)]
                    plain = f(list(raw))
            except Exception:  # the measurement passes report a collate failing on the dataset's own items
                self._weights_kept = True
                return True
            want = torch.tensor(w, dtype=torch.float32)
            try:
                with _random_states_kept():
                    out = f([ds._with(item, j, w[j]) for j, item in enumerate(raw)])
                extra = 2 if ds.indices else 1  # WeightedDataset(indices=True) appends (w, i)
                if isinstance(out, Mapping) and isinstance(plain, Mapping):
                    got = out.get("crest_weight")
                    same = set(out) - set(plain) == ({"crest_weight", "crest_index"} if ds.indices else {"crest_weight"})
                elif isinstance(out, (tuple, list)) and isinstance(plain, (tuple, list)):
                    got, same = out[-extra], len(out) == len(plain) + extra
                else:
                    got, same = None, False
                self._weights_kept = bool(same and isinstance(got, torch.Tensor) and got.shape == want.shape
                                          and torch.allclose(got.detach().cpu().to(torch.float32), want))
            except Exception:
                self._weights_kept = False
        return self._weights_kept

    def dataloader(self, *, indices: bool = False, **kwargs):
        """``DataLoader(WeightedDataset(dataset, indices=indices), batch_sampler=self, **kwargs)``:
        ``num_workers``, ``pin_memory``, ``persistent_workers``, ``prefetch_factor``, ``collate_fn``, ...
        are yours.

        Examples
        --------
        >>> import torch
        >>> sampler = CrestBatchSampler(torch.nn.Linear(4, 2), _example_data(), config=CrestConfig(m=4), budget=1.0)
        >>> x, y, w, i = next(iter(sampler.dataloader(indices=True)))  # the batch's dataset indices too
        >>> x.shape, i.dtype
        (torch.Size([4, 4]), torch.int64)
        """
        from torch.utils.data import DataLoader

        for bad in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
            if bad in kwargs:
                raise TypeError(f"dataloader() got {bad}=: CREST decides the batches (m = config.m) and their order")
        return DataLoader(WeightedDataset(self.dataset, indices=indices), batch_sampler=self, **kwargs)

    def observe(self, losses, indices=None) -> None:
        """The per-example training losses of one trained batch, for the drop policy and the NaN check.
        ``indices``: that batch's dataset indices (needed when a ``DataLoader`` prefetches; default the
        batch handed out last, right only with ``num_workers=0`` and a loader that fetches nothing ahead:
        not under ``accelerate``).

        Examples
        --------
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> sampler = CrestBatchSampler(model, _example_data(), config=CrestConfig(m=4, T2=2), budget=1.0)
        >>> for x, y, w, i in sampler.dataloader(indices=True):
        ...     losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        ...     sampler.observe(losses.detach(), indices=i)
        >>> sampler.stats["step"]
        4
        """
        if indices is None:
            if self._pass_ahead:  # the batch handed out last is not the one trained: its losses would go there
                raise ValueError(
                    f"CrestBatchSampler.observe(losses) without indices=, but the DataLoader fetches up to "
                    f"{self._pass_ahead} batches ahead (its workers; accelerate's loaders one more): the batch "
                    "handed out last is not the one "
                    "these losses belong to. Pass the batch's indices: DataLoader(WeightedDataset(dataset, "
                    "indices=True), ...) (or sampler.dataloader(indices=True)) yields x, y, w, i; then "
                    "sampler.observe(losses, indices=i)")
            return super().observe(losses)
        idx = np.asarray(indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else indices)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or (
                idx.size and (idx.min() < 0 or idx.max() >= self.n)):
            raise ValueError(f"indices must be a 1-D integer array of dataset indices in [0, {self.n})")
        idx = idx.astype(np.int64)
        # the step of the batch these indices came in (under prefetching not the one handed out last): the
        # first one handed out after the batch observed before (batches are trained in the order handed
        # out, and a coreset cycled through may come again later), in any order (a collate_fn may reorder
        # a batch: each loss goes with its own index; a coreset holds no index twice)
        first = max(0, self._observed_step + 1 - self._handed_from)  # the scan starts after it: O(1) in order
        key = np.sort(idx)
        # the batch just trained is among the last handed out (the DataLoader fetches at most its prefetch
        # window ahead of the loop): the next batch in order, when it lies there, is taken at once (a loop
        # that observes every batch); otherwise a cycled coreset's later copy in the window is its batch,
        # not an earlier one the loop left unobserved
        last = self._handed_from + len(self._handed) - 1
        hits = []
        for i in range(first, len(self._handed)):
            if self._handed[i].indices.size == key.size and np.array_equal(np.sort(self._handed[i].indices), key):
                hits.append(self._handed_from + i)
                if hits[0] == self._observed_step + 1 and hits[0] >= last - self._pass_ahead:
                    break
        step = hits[0] if hits else None
        if len(hits) > 1:
            near = [h for h in hits if h >= last - self._pass_ahead]
            step = near[0] if near else step
            if len(near) != 1 and not self._ambiguous_warned:
                self._ambiguous_warned = True
                warnings.warn(
                    f"observe(indices=...) got the examples of the batches at steps {hits} (a coreset cycled "
                    f"through comes again), none of them observed: its losses are recorded at step {step}, which may "
                    "not be the batch they came from. Observe every trained batch, in order, right after its step, "
                    "to keep the drop policy's records exact (warned once)",
                    stacklevel=_common.user_stacklevel())
        if step is None and self.config.T2 is not None and not self._unmatched_warned:
            self._unmatched_warned = True
            warnings.warn(
                "observe(indices=...) got indices that are no batch handed out since the last one observed (not "
                "this sampler's batch, or a batch observed twice): its losses are recorded at the step of the "
                "batch handed out last (warned once)", stacklevel=_common.user_stacklevel())
        self._observe(idx, losses, step)
        if step is not None:  # only once recorded: a call refused (a wrong count, NaN) leaves its batch unobserved
            self._observed_step = step

    def state_dict(self, trained: int | None = None) -> dict:
        """:meth:`CrestLoader.state_dict` with the batches handed out after the first ``trained`` of the
        run stored as pending (see the class docstring). ``trained=None``: the batches the DataLoader has given
        your loop (the one in hand included) while its iterator is alive, which it counts, beyond its workers'
        prefetch and the batch an ``accelerate`` loader holds (so ``accelerator.register_for_checkpointing(
        sampler)`` checkpoints exactly); else all handed out, warned about where the DataLoader fetched ahead
        and may not have given them all (its iterator gone after a pass left early).

        Examples
        --------
        >>> import torch
        >>> sampler = CrestBatchSampler(torch.nn.Linear(4, 2), _example_data(), config=CrestConfig(m=4), budget=1.0)
        >>> it = iter(sampler.dataloader())
        >>> _ = next(it), next(it)  # two batches handed out, one trained
        >>> len(sampler.state_dict(trained=1)["pending"])  # the untrained one is stored, to come first after a load
        1
        """
        if trained is None and self._pass_ahead and self._position:
            live = self._live_untrained()
            if live:
                trained = self._position - live
            elif live is None and self._untrained_ahead():
                warnings.warn(
                    f"CrestBatchSampler.state_dict() without trained=, after a DataLoader that fetches up to "
                    f"{self._pass_ahead} batches ahead left a pass early and its iterator is gone: all "
                    f"{self._position} batches handed out count as trained, so a run resumed from this state "
                    "would skip those fetched but not trained. Pass trained= (the batches of the run your loop "
                    "has trained, e.g. its step count).", stacklevel=_common.user_stacklevel())
        return super().state_dict(trained)
