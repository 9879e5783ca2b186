"""What the framework adapters share, written once: argument checks, divergence errors, chunking, the cost
of the measurement passes and the checkpoint plumbing around the controller state.

Framework-free (NumPy and the core's public modules only), so the Keras adapter imports it on any Keras
backend, torch installed or not. The error messages are the adapters' own: each helper takes the words
that differ between them (the owner's class name, "dataset" or "data") as arguments.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import warnings

import numpy as np

from crestcore.controller import Batch, CrestConfig, crest_load_state_dict, crest_state_dict
from crestcore.validation import (DivergenceError, check_count, host_indices, host_weights,  # noqa: F401 (re-exported)
                                  masked_outputs_error, stored_batch, user_stacklevel)


# ------------------------------------------------------------------------------------------------
# argument checks (the errors name the argument)
# ------------------------------------------------------------------------------------------------
def check_config(config) -> CrestConfig:
    """The loader's ``config``: ``CrestConfig()`` for None, else it must be a :class:`crestcore.CrestConfig`."""
    config = config if config is not None else CrestConfig()
    if not isinstance(config, CrestConfig):
        raise TypeError(f"config must be a crestcore.CrestConfig, got {type(config).__name__}")
    return config


def check_bool(value, name: str) -> bool:
    """An adapter's on/off option: True or False (a NumPy bool too), not a value Python reads as one (the
    string ``"false"`` is true); the error names ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    return bool(value)


def check_budget(budget, name: str = "budget") -> None:
    """``budget`` must be a positive finite fraction (a real number, NumPy scalars included, not a bool) of the
    full-data steps; the error names ``name``."""
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, numbers.Real) or not (
            math.isfinite(budget) and budget > 0):
        raise ValueError(f"{name} must be a positive finite fraction of the full-data steps, got {budget!r}")
    if budget > 1 and not _BUDGET_SAID.get():  # allowed (more steps than full data), far more often a percentage
        warnings.warn(f"crestcore: budget={budget!r} trains {budget!r} times the full-data steps; the budget is a "
                      f"fraction (budget=0.1 for 10 %)", stacklevel=user_stacklevel())


# set by budget_said: the warning was given at the adapter's construction
_BUDGET_SAID = contextvars.ContextVar("crestcore_budget_said", default=False)


@contextlib.contextmanager
def budget_said():
    """For an adapter that checked ``budget`` at its own construction (the warning at the user's line) and
    builds its loader later, inside a framework's call: the loader does not say it again. A context variable,
    not a warnings filter: ``warnings.catch_warnings`` resets every module's record of the warnings already
    shown (review 163) and filters the whole process while it lasts."""
    token = _BUDGET_SAID.set(True)
    try:
        yield
    finally:
        _BUDGET_SAID.reset(token)


# set by held_warnings: the list the adapters' warnings go to instead of being shown
_HELD = contextvars.ContextVar("crestcore_held_warnings", default=None)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the user's line, or, inside :func:`held_warnings`, kept for its caller to show
    later (or never). For warnings that hold only once something else is decided (a checkpoint's notices,
    shown once every rank has accepted it)."""
    held = _HELD.get()
    if held is not None:
        held.append((message, category))
        return
    warnings.warn(message, category, stacklevel=user_stacklevel())


def say(held) -> None:
    """Show the warnings :func:`held_warnings` kept, in their order, through :func:`warn` (an outer
    :func:`held_warnings` keeps them in turn). A checkpoint load says its notices so once every check has passed
    and before it changes anything: a refused state says nothing, and a warnings filter that raises (``error``)
    leaves the loader as it was."""
    for message, category in tuple(held):
        warn(message, category)


@contextlib.contextmanager
def held_warnings():
    """Keep the warnings :func:`warn` gives inside the block in the list it yields, as ``(message,
    category)`` pairs, instead of showing them. A context variable, not ``warnings.catch_warnings``, whose
    exit makes every warning of the process already shown once at a line show again (review 164), and
    whose filters hold for every thread while it lasts."""
    held: list[tuple[str, type[Warning]]] = []
    token = _HELD.set(held)
    try:
        yield held
    finally:
        _HELD.reset(token)


def check_budget_counts(budget_counts) -> None:
    """``budget_counts`` must be ``"steps"`` or ``"passes"`` (what counts against the budget)."""
    if budget_counts not in ("steps", "passes"):
        raise ValueError(f"budget_counts must be 'steps' or 'passes', got {budget_counts!r}")


def check_training_labels(labels: np.ndarray, m: int, data: str = "dataset") -> None:
    """The training labels (n,) must hold two classes or more, and the mini-batch size ``m`` must not
    exceed ``n``; ``data`` names the training set in the errors ("dataset", "data")."""
    classes = np.unique(labels)
    if classes.size < 2:
        raise ValueError(f"the training {data} holds a single class (label {int(classes[0])}): a classifier, and "
                         "CREST's per-class selection, need at least two")
    if m > labels.size:
        raise ValueError(f"the mini-batch size m={m} exceeds the {data}'s {labels.size} examples")


def weighted_examples(indices, weights, n: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``indices`` (in ``[0, n)``) and their ``weights`` as host int64 / float64 arrays, at least one
    example: the arguments of a weighted-loss operation ``what`` ("gradient", "hutchinson")."""
    idx = host_indices(indices, n)
    w = host_weights(weights, idx.size)
    if idx.size == 0:
        raise ValueError(f"{what} needs at least one example")
    return idx, w


# ------------------------------------------------------------------------------------------------
# measurement passes and divergence
# ------------------------------------------------------------------------------------------------
def chunk_spans(k: int, size: int):
    """``(a, b)`` for the consecutive chunks ``[a, b)`` of ``k`` items, at most ``size`` each, and none of a
    single item after a full one: ``k = q size + 1`` ends in chunks of ``size - 1`` and 2 (a layer that takes
    its batch's statistics in eval mode, ``BatchNorm(track_running_stats=False)``, fails on a chunk of one;
    review 93).

    >>> list(chunk_spans(5, 2)), list(chunk_spans(7, 3)), list(chunk_spans(6, 3))
    ([(0, 2), (2, 4), (4, 5)], [(0, 3), (3, 5), (5, 7)], [(0, 3), (3, 6)])
    """
    last = k - 2 if size > 2 and k > size and k % size == 1 else None  # where the last chunk of one starts
    for a in range(0, k, size):
        if last is not None and a + size > last:
            yield a, last
            yield last, k
            return
        yield a, min(k, a + size)


def measurement_error(what: str, count: int, total: int, *, neg_inf: bool = False) -> ValueError:
    """The error for NaN or infinite ``what`` (outputs, losses, gradients, ...) of ``count`` of the
    ``total`` examples of a measurement pass: the model has diverged (a ``DivergenceError``, as every
    divergence). ``neg_inf``: every non-finite value is ``-inf``; of outputs, that is a mask of classes, not a
    divergence (:func:`crestcore.validation.masked_outputs_error`)."""
    if neg_inf and what == "outputs":
        return masked_outputs_error(count, total)
    return DivergenceError(
        f"CREST: the model produced NaN or infinite {what} ({count} of {total} in this measurement pass): "
        "training has diverged. Lower the learning rate, add gradient clipping, or check the data and the loss."
    )


def at_step(exc: FloatingPointError, where: str) -> FloatingPointError:
    """``exc`` with ``where`` (the loader and step) appended to its message, of its own class where that
    class takes a message alone (a ``DivergenceError`` stays one), else a ``FloatingPointError``."""
    msg = f"{exc} [{where}]"
    try:
        out = type(exc)(msg)
    except Exception:  # noqa: BLE001 - a user's subclass with another constructor
        return FloatingPointError(msg)
    return out if isinstance(out, FloatingPointError) else FloatingPointError(msg)

def training_loss_error(who: str, step: int, bad: int, total: int, where: str = "") -> FloatingPointError:
    """The error for ``bad`` NaN or infinite training losses of the ``total`` examples observed at ``step``;
    ``who`` leads the message ("CREST", a loader's name), ``where`` follows the step (e.g. " on rank 1")."""
    return DivergenceError(
        f"{who}: the training loss is NaN or infinite at step {step}{where} ({bad} of {total} examples): "
        "training has diverged. Lower the learning rate, add gradient clipping, or check the data."
    )


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
def map_nested(x, leaf):
    """``x`` with every value nested in dicts, lists and tuples replaced by ``leaf(value)`` (the containers
    are rebuilt as dicts, lists and tuples)."""
    if isinstance(x, dict):
        return {k: map_nested(v, leaf) for k, v in x.items()}
    if isinstance(x, list):
        return [map_nested(v, leaf) for v in x]
    if isinstance(x, tuple):
        return tuple(map_nested(v, leaf) for v in x)
    return leaf(x)


def batch_record(batch: Batch) -> dict:
    """A handed-out batch as a checkpoint record (host copies): what ``stored_batch`` reads back."""
    return {"indices": batch.indices.copy(), "weights": batch.weights.copy(), "reselected": bool(batch.reselected)}


def stored_batches(records, n: int, where: str, name: str, convert=None) -> list[Batch]:
    """The batches of a checkpoint's list ``name`` (each record passed through ``convert`` first, if
    given), checked as ``stored_batch`` does; ``where`` names the checkpoint in the errors."""
    if not isinstance(records, list):
        raise ValueError(f"{where}: {name} must be a list of batches, got {type(records).__name__}")
    return [Batch(*stored_batch(r if convert is None else convert(r), n, where)) for r in records]


def labels_digest(labels) -> str:
    """A checkpoint's fingerprint of the labels (sha256 of them as int64): a state saved for a dataset of the
    same size with other labels is refused on load.

    Examples
    --------
    >>> labels_digest([0, 1, 1])[:12]
    'ccb1ac866b7d'
    """
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()


def check_checkpoint(state, *, fmt: str, owner: str, kind: str, fingerprint: dict, same: str,
                     options: tuple[str, object, str]) -> None:
    """Check the header of a state dict ``owner.load_state_dict`` got: its ``format`` must be ``fmt`` and
    every ``fingerprint`` value the one it was saved with (else a ``ValueError`` asking to resume with the
    same ``same``; ``kind`` is "loader" or "callback"). ``options`` is ``(key, value, what)`` or ``(key,
    value, what, as_before)``: a saved ``state[key]`` other than ``value`` only warns ``what`` (the run
    continues with the new options), naming the fields that differ when both are dataclass reprs;
    ``as_before`` maps fields added since to the repr that behaves as a run saved without them did (no
    warning when those are the only differences)."""
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ValueError(f"not a {owner} state dict (missing or unknown 'format')")
    for k, v in fingerprint.items():
        if state.get(k) != v:
            raise ValueError(f"the state dict was saved with {k}={state.get(k)!r}, this {kind} has {k}={v!r}; "
                             f"resume with the same {same}")
    key, value, what, *rest = options
    saved = state.get(key)
    if saved != value:
        diff = _repr_difference(saved, value, rest[0] if rest else {})
        if diff == "" and _repr_difference(saved, value):  # only fields added since, as the saved run behaved
            return
        warn(f"{owner}.load_state_dict: {what}" + (f" ({diff}; the run continues with this one's)" if diff else ""))


def _repr_fields(text) -> dict | None:
    """``Name(a=1, b=Other(c=2))`` -> ``{"a": "1", "b": "Other(c=2)"}`` (top-level fields of a dataclass
    repr), or None for anything else."""
    if not isinstance(text, str) or "(" not in text or not text.endswith(")"):
        return None
    body, fields, depth, start = text[text.index("(") + 1:-1], {}, 0, 0
    for i, ch in enumerate(body + ","):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            name, sep, val = body[start:i].strip().partition("=")
            if sep:
                fields[name.strip()] = val.strip()
            start = i + 1
    return fields


def _repr_difference(saved, now, as_before: dict | None = None) -> str | None:
    """The fields two config reprs differ in, as ``name: saved -> now`` (a field the saved one lacks, added
    since, as ``name: (not saved) -> now``, unless ``now`` holds it at its ``as_before`` repr: the value a
    run saved before the field existed behaved as); "" when no field differs, None when they cannot be
    compared."""
    a, b = _repr_fields(saved), _repr_fields(now)
    if a is None or b is None:
        return None
    a = {**{k: v for k, v in (as_before or {}).items() if k not in a}, **a}
    parts = [f"{k}: {a.get(k, '(not saved)')} -> {b.get(k, '(gone)')}" for k in list(b) + [k for k in a if k not in b]
             if a.get(k) != b.get(k)]
    return "; ".join(parts)


def measure_anchor(state: dict, where: str) -> int | None:
    """A loader state's ``measure_anchor`` (the anchors its measurements were made at: their random
    transforms are drawn for that number, so a resumed run must go on counting from it; review 88), checked;
    None for a checkpoint saved before 2026-12-05."""
    number = state.get("measure_anchor")
    if number is not None and (isinstance(number, bool) or not isinstance(number, (int, np.integer)) or number < 0):
        raise ValueError(f"{where}: measure_anchor must be a non-negative integer, got {number!r}")
    return None if number is None else int(number)


def restore_controller(saved: dict, labels: np.ndarray, like, data: str = "a dataset"):
    """The controller state of a checkpoint, saved for these ``labels`` (else a ``ValueError``; ``data``
    names the training set), validated and with its vectors like ``like`` (``crest_load_state_dict``)."""
    if not isinstance(saved, dict):
        raise ValueError("corrupt or foreign state dict: its crest entry must be the controller's state (a dict "
                         f"from crest_state_dict), got {type(saved).__name__}")
    state = crest_load_state_dict(saved, like)  # (validated first: a corrupt labels field is said to be that)
    if not np.array_equal(state.labels, labels):
        raise ValueError(f"the state dict was saved for {data} with different labels")
    return state


def rehomed(state, like):
    """The controller ``state`` with its vectors moved to where ``like`` (a flat parameter vector) lives:
    its array library, device and dtype (a round trip through ``crest_state_dict``)."""
    return crest_load_state_dict(crest_state_dict(state), like)
