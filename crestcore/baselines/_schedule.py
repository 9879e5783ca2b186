"""What a baseline trains on, step by step: the schedule of the loaders, framework-free.

:class:`SubsetSchedule` turns a baseline of this package into a sequence of weighted mini-batches of
dataset indices: when to select (every ``reselect_every`` epochs for CRAIG, GradMatch and GLISTER,
every epoch for random and prune), the measurement the selection needs (through a model interface
like the CREST controller's: ``ops.outputs(indices, embeddings=...)``), GLISTER's held-out validation
split, GradMatch's top-up, and the layout of each epoch's batches. A framework adapter keeps its own
data loading and hands the indices to it (``crestcore.adapters.baselines.SubsetLoader`` for PyTorch).
"""

from __future__ import annotations

import inspect
import math
import numbers
import time
import warnings
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np

from .._compat import device_of, from_numpy, namespace, on_cpu, to_numpy
from .._validation import apportion, check_count, check_int, state_array, user_stacklevel
from ..features import last_layer_gradients
from ..plan import _decimal_budget
from ._craig import craig
from ._glister import glister
from ._gradmatch import gradmatch
from ._pruning import prune_schedule
from ._random import random_subset

__all__ = ["SubsetSchedule", "METHODS", "SELECTING_METHODS", "SOLVE_ON", "method_arguments"]

METHODS = ("full", "sgd-budget", "random", "craig", "gradmatch", "glister", "prune")
SOLVE_ON = ("auto", "host")  # where craig, gradmatch and glister solve (SubsetSchedule's solve_on)
SELECTING_METHODS = ("craig", "gradmatch", "glister")  # measure the model and reselect every R epochs
# the schedule's method-specific arguments and the methods that read them
_USED_BY = {"reselect_every": SELECTING_METHODS, "fill": ("gradmatch",), "val_fraction": ("glister",),
            "glister_lr": ("glister",), "prune_ratio": ("prune",), "prune_anneal": ("prune",)}


def method_arguments(method: str, **arguments) -> dict:
    """``arguments`` without those of :class:`SubsetSchedule` (and the loaders built on it) that ``method``
    does not read: a caller that sets them for every method passes only what applies (given to another
    method, they are warned about).

    Examples
    --------
    >>> method_arguments("random", reselect_every=3, prune_ratio=0.3, m=8)
    {'m': 8}
    >>> method_arguments("prune", reselect_every=3, prune_ratio=0.3, m=8)
    {'prune_ratio': 0.3, 'm': 8}
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return {k: v for k, v in arguments.items() if k not in _USED_BY or method in _USED_BY[k]}

# tags that separate the random streams of one seed: default_rng([seed, epoch, tag])
_TAG_ORDER, _TAG_SELECT, _TAG_VAL, _TAG_FILL, _TAG_SPLIT = 101, 102, 103, 104, 105

# per-method defaults of the options forwarded to the core functions (overridable with options=)
_DEFAULT_OPTIONS: dict[str, dict] = {
    "craig": {},
    "gradmatch": {"lam": 0.5, "tol": 1e-6},
    "glister": {"optimizer": "stochastic", "epsilon": 0.1},
    "prune": {},
}
# whether the last-layer gradient includes the penultimate embedding (the last linear layer's weight,
# C * h features) or is the gradient w.r.t. the logits (C features)
_DEFAULT_EMBEDDINGS = {"craig": False, "gradmatch": True, "glister": True}


def _fraction(v, name: str, *, low_open=True, high=1.0, high_open=True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    v = float(v)
    ok = (v > 0 if low_open else v >= 0) and (v < high if high_open else v <= high)
    if not ok:
        raise ValueError(f"{name} must be in {'(' if low_open else '['}0, {high}{')' if high_open else ']'}, "
                         f"got {v!r}")
    return v


def _rng(seed: int, epoch: int, tag: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), int(tag)])


def _validation_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """GLISTER's held-out examples: ``fraction * size`` of each class rounded half up, the fraction read as
    written (as budgets are, :func:`crestcore.plan.budget_steps`), at least 1, never all; drawn once from
    the seed; sorted dataset indices. (Python's ``round`` rounded exact halves to even and the binary
    product's halves either way: 2.5 of a class of 25 held out 2, 3.5 of 35 held out 4.)"""
    gen = _rng(seed, 0, _TAG_VAL)
    val = []
    exact = _decimal_budget(fraction)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(math.floor(exact * members.size + Fraction(1, 2)))
        k = min(max(k, 1), members.size - 1) if members.size > 1 else 0
        if k:
            val.append(gen.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(val)).astype(np.int64) if val else np.zeros(0, np.int64)


# what the schedule passes to the core functions itself (not accepted in options)
_OWN_ARGUMENTS = {"craig": ("gradients", "labels", "k"),
                  "gradmatch": ("gradients", "k", "labels", "per_batch", "target"),  # (the last two clash with labels)
                  # (eta is glister_lr=: given both ways, options' won and the settings named glister_lr's, review 141)
                  "glister": ("train_grads", "val_logits", "val_labels", "k", "val_embeddings", "eta")}
# where an argument of the schedule's own sets it (named in the refusal)
_OWN_HINTS = {("glister", "eta"): "glister_lr="}


def _check_options(method: str, options: dict) -> None:
    """Refuse, when the schedule is built, options its method's core function would not accept."""
    if not options:
        return
    if method not in _OWN_ARGUMENTS:
        hint = " (prune's are prune_ratio= and prune_anneal=)" if method == "prune" else ""
        raise ValueError(f"options are keyword arguments of craig, gradmatch or glister; method {method!r} "
                         f"takes none{hint}, got {sorted(options)}")
    fns: dict[str, Callable[..., Any]] = {"craig": craig, "gradmatch": gradmatch, "glister": glister}
    params = inspect.signature(fns[method]).parameters
    own = _OWN_ARGUMENTS[method]
    bad = sorted(k for k in options if k not in params or k in own)
    if bad:
        allowed = sorted(k for k in params if k not in own)
        hints = [f"{k} is set by {_OWN_HINTS[method, k]}" for k in bad if (method, k) in _OWN_HINTS]
        raise ValueError(f"options {bad} are not keyword arguments {method}() accepts here"
                         + (f" ({'; '.join(hints)})" if hints else "") + f"; allowed: {allowed}")
    if "rng" in options and not (isinstance(options["rng"], numbers.Integral) and not isinstance(options["rng"], bool)):
        raise ValueError(f"options: rng must be an int seed, got {type(options['rng']).__name__}: a Generator's "
                         "state is not in the loader's checkpoints (a resumed run would draw differently) and "
                         "every selection would share it; leave rng out to draw from the loader's seed")
    if method == "gradmatch" and options.get("positive", True) is not True:
        raise ValueError(f"options: positive={options['positive']!r} is not for training batches: a schedule "
                         "trains on non-negative weights rescaled to mean 1 (a negative weight would be dropped "
                         "and its slot filled at random); call crestcore.baselines.gradmatch(positive=False) "
                         "directly for signed weights")


def _mean_one(w: np.ndarray) -> np.ndarray:
    """``w`` rescaled to mean 1; equal weights (the uniform methods') are exactly 1, not ``w / mean(w)``,
    which rounds to 0.9999999999999997 for some sizes."""
    return np.ones_like(w) if w.size and w.min() == w.max() else w / w.mean()


class SubsetSchedule:
    """The weighted mini-batches of a baseline ``method`` (one of :data:`METHODS`), as dataset indices.

    ``labels`` (n,) host integer labels; ``m`` the mini-batch size; ``steps_per_epoch`` and
    ``full_steps_per_epoch`` the budgeted and the full-data steps of an epoch (``full`` and
    ``sgd-budget`` walk the full data, the others draw ``steps_per_epoch`` batches of exactly ``m`` per
    epoch from that epoch's selection, cycled in a fresh order when the selection is smaller);
    ``epochs`` the epochs of the run (prune's annealing). The options are ``SubsetLoader``'s (see
    ``crestcore.adapters.baselines``): ``reselect_every``, ``weights`` (``"selection"`` or ``"batch"``:
    over what the weights are rescaled to mean 1), ``embeddings``, ``val_fraction``, ``glister_lr``,
    ``prune_ratio``, ``prune_anneal``, ``fill``, ``options`` (keyword arguments of the core
    function) and ``solve_on``: where craig, gradmatch and glister solve, ``"auto"`` (default: a model's
    host outputs in NumPy, device outputs (a GPU) in their own library on their device) or ``"host"``
    (the outputs copied to NumPy on the host whatever their device: the selections are sequential, a
    few thousand picks, each a read back to the host on a device).

    :meth:`next_indices` gives the batch of a step (selecting first when one is due, measuring the
    model through ``ops.outputs(indices, embeddings=...)``, which returns the logits, and with
    ``embeddings=True`` the pair (logits, penultimate features), in any array library); :meth:`observe`
    records the training losses prune reads; ``counters`` counts the examples trained on and measured;
    ``log`` lists the selections; :meth:`state` / :meth:`load_state` checkpoint it as host arrays.

    Examples
    --------
    A random 24 of 48 examples each epoch, in batches of 8 (no model needed):

    >>> import numpy as np
    >>> schedule = SubsetSchedule("random", np.arange(48) % 2, m=8, seed=0, steps_per_epoch=3,
    ...                           full_steps_per_epoch=6, epochs=2)
    >>> idx, w = schedule.next_indices(0)
    >>> idx.shape, w.tolist() == [1.0] * 8, schedule.subset_size
    ((8,), True, 24)
    >>> epoch0 = np.concatenate([idx] + [schedule.next_indices(t)[0] for t in (1, 2)])
    >>> np.unique(epoch0).size, schedule.counters["selections"]  # 24 distinct examples, one draw
    (24, 1)
    """

    def __init__(self, method: str, labels, *, m: int, seed: int, steps_per_epoch: int, full_steps_per_epoch: int,
                 epochs: int, reselect_every: int = 1, weights: str = "selection", embeddings: bool | None = None,
                 val_fraction: float = 0.1, glister_lr: float = 0.05, prune_ratio: float = 0.5,
                 prune_anneal: float = 0.875, fill: str = "random", options: dict | None = None,
                 solve_on: str = "auto"):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if weights not in ("selection", "batch"):
            raise ValueError(f"weights must be 'selection' or 'batch', got {weights!r}")
        if fill not in ("random", "cycle"):
            raise ValueError(f"fill must be 'random' or 'cycle', got {fill!r}")
        if solve_on not in SOLVE_ON:
            raise ValueError(f"solve_on must be one of {SOLVE_ON}, got {solve_on!r}")
        if embeddings is not None and not isinstance(embeddings, bool):
            raise TypeError(f"embeddings must be a bool or None, got {type(embeddings).__name__}")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options must be a dict of keyword arguments, got {type(options).__name__}")
        lab = np.asarray(labels)
        if lab.ndim != 1 or lab.size == 0 or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError("labels must be a non-empty 1-D array of integer class labels")
        self.method = method
        self.labels = lab.astype(np.int64)
        self.n = int(lab.size)
        self.m = check_count(m, "m")
        self.seed = check_count(seed, "seed", low=0)
        self.steps_per_epoch = check_count(steps_per_epoch, "steps_per_epoch")
        self.full_steps_per_epoch = check_count(full_steps_per_epoch, "full_steps_per_epoch")
        if method in ("full", "sgd-budget") and self.full_steps_per_epoch != -(-self.n // self.m):
            # their passes over all n examples are cut into full_steps_per_epoch batches of m
            raise ValueError(f"full_steps_per_epoch must be ceil(n / m) = {-(-self.n // self.m)} for n={self.n} "
                             f"labels and m={self.m}, got {self.full_steps_per_epoch}")
        self.epochs = check_count(epochs, "epochs")
        self.weights_mode = weights
        self.reselect_every = check_count(reselect_every, "reselect_every")
        self.embeddings = _DEFAULT_EMBEDDINGS.get(method, False) if embeddings is None else embeddings
        self.val_fraction = _fraction(val_fraction, "val_fraction")
        self.glister_lr = _fraction(glister_lr, "glister_lr", high=math.inf)
        self.prune_ratio = _fraction(prune_ratio, "prune_ratio", low_open=False)
        self.prune_anneal = _fraction(prune_anneal, "prune_anneal", low_open=False, high_open=False)
        self.fill = fill
        self.solve_on = solve_on
        _check_options(method, options or {})
        # arguments this method never reads, given other values than their defaults (review 62: accepted
        # silently, where options= for prune is refused; reselect_every=2 with random still drew every epoch)
        given = {"reselect_every": reselect_every, "fill": fill, "val_fraction": val_fraction,
                 "glister_lr": glister_lr, "prune_ratio": prune_ratio, "prune_anneal": prune_anneal}
        defaults = {k: v.default for k, v in inspect.signature(SubsetSchedule.__init__).parameters.items()}
        unused = [f"{k}={v!r}" for k, v in given.items() if method not in _USED_BY[k] and v != defaults[k]]
        if unused:
            warnings.warn(f"crestcore: method {method!r} does not use {', '.join(unused)}: "
                          + ("it draws a new subset every epoch; " if method in ("random", "prune") else "")
                          + "the argument has no effect", stacklevel=user_stacklevel())
        self.options = {**_DEFAULT_OPTIONS.get(method, {}), **(options or {})}
        self._warned_epochs = False
        self._warned_unobserved = False
        if method == "glister":
            self.val_indices = _validation_split(self.labels, self.val_fraction, self.seed)
            if self.val_indices.size == 0:
                raise ValueError("glister needs a validation split: the dataset is too small to hold one out")
            held = self.val_indices.size / self.n
            # per class too: on imbalanced data the whole set's share stays near val_fraction while each small
            # class loses a third or half of its examples (review 62: classes of 2 and 3 beside one of 990)
            _, cls, sizes = np.unique(self.labels, return_inverse=True, return_counts=True)
            share = np.bincount(cls.reshape(-1)[self.val_indices], minlength=sizes.size) / sizes
            hit = share > 2 * self.val_fraction
            if held > 1.5 * self.val_fraction or hit.any():  # one example of every class is held out, however small
                classes = (f", and {int(hit.sum())} of the {sizes.size} classes (of {int(sizes[hit].min())}-"
                           f"{int(sizes[hit].max())} examples) lose {share[hit].min():.0%}-{share[hit].max():.0%} "
                           "of theirs" if hit.any() else "")
                warnings.warn(
                    f"crestcore: glister holds out {self.val_indices.size} of {self.n} examples ({held:.0%}, "
                    f"val_fraction={self.val_fraction}){classes}: at least one example of every class with two "
                    "or more is held out, and these are never trained on; with small classes, pass a smaller "
                    "val_fraction or use another method",
                    stacklevel=user_stacklevel(),
                )
            keep = np.ones(self.n, dtype=bool)
            keep[self.val_indices] = False
            self.pool = np.flatnonzero(keep).astype(np.int64)
        else:
            self.val_indices = np.zeros(0, dtype=np.int64)
            self.pool = np.arange(self.n, dtype=np.int64)
        self.subset_size = min(self.pool.size, self.steps_per_epoch * self.m)
        # run state
        self.sel_idx: np.ndarray | None = None  # current selection (dataset indices) ...
        self.sel_w: np.ndarray | None = None  # ... and its weights, rescaled (selection mode) or raw
        self.sel_epoch = -1
        self.plan_key: int | None = None  # epoch (subset methods) or full-data pass (full, sgd-budget)
        self.plan_start = 0  # the step of the planned epoch's first batch (next_indices(epoch=) counts from it)
        self.plan_idx: np.ndarray | None = None
        self.plan_w: np.ndarray | None = None
        self.losses = np.zeros(self.n, dtype=np.float64)  # prune: latest training loss per example
        self.seen = np.zeros(self.n, dtype=bool)
        self.counters = {"train_steps": 0, "train_examples": 0, "forward_examples": 0, "backward_examples": 0,
                         "selections": 0}
        self.log: list[dict] = []

    _SETTINGS = ("weights", "reselect_every", "embeddings", "val_fraction", "glister_lr", "prune_ratio",
                 "prune_anneal", "fill", "options")

    def settings(self) -> str:
        """The options that decide the batches besides method, sizes and seed (a checkpoint compares them,
        and names the ones that differ), as a keyword repr.

        Examples
        --------
        >>> import numpy as np
        >>> SubsetSchedule("craig", np.arange(8) % 2, m=2, seed=0, steps_per_epoch=2, full_steps_per_epoch=4,
        ...                epochs=1).settings()
        "Settings(weights='selection', reselect_every=1, embeddings=False, val_fraction=0.1, glister_lr=0.05,
        prune_ratio=0.5, prune_anneal=0.875, fill='random', options=[])"
        """
        return self._named(self._values())

    def _values(self) -> tuple:
        return (self.weights_mode, self.reselect_every, self.embeddings, self.val_fraction, self.glister_lr,
                self.prune_ratio, self.prune_anneal, self.fill, sorted(self.options.items()))

    @classmethod
    def _named(cls, values) -> str:
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in zip(cls._SETTINGS, values)) + ")"

    def saved_header(self, state):
        """A checkpoint ``state`` whose ``settings`` are in the keyword form of :meth:`settings` (a shallow
        copy; anything but a dict as it is): states saved before 2026-12-05 hold the bare tuple repr of the
        same values in the same order, which a comparison could not break into fields. Such a repr equal to
        this schedule's own in that form is its settings; another one is read as Python literals where it
        can be (a repr holding ``np.float64(...)`` cannot: it stays as it is, and a load says only that the
        options differ).

        Examples
        --------
        >>> import numpy as np
        >>> schedule = SubsetSchedule("craig", np.arange(8) % 2, m=2, seed=0, steps_per_epoch=2,
        ...                           full_steps_per_epoch=4, epochs=1)
        >>> old = {"format": "x", "settings": "('selection', 2, False, 0.1, 0.05, 0.5, 0.875, 'random', [])"}
        >>> schedule.saved_header(old)["settings"]
        "Settings(weights='selection', reselect_every=2, embeddings=False, val_fraction=0.1, glister_lr=0.05,
        prune_ratio=0.5, prune_anneal=0.875, fill='random', options=[])"
        """
        saved = state.get("settings") if isinstance(state, dict) else None
        if not (isinstance(saved, str) and saved.startswith("(")):
            return state
        if saved == repr(self._values()):
            return {**state, "settings": self.settings()}
        import ast

        try:
            values = ast.literal_eval(saved)
        except (ValueError, SyntaxError):
            return state
        if isinstance(values, tuple) and len(values) == len(self._SETTINGS):
            return {**state, "settings": self._named(values)}
        return state

    # -- the batches ----------------------------------------------------------------------------
    def next_indices(self, position: int, ops=None, sync: Callable[[], None] | None = None,
                     epoch: int | None = None):
        """``(indices, weights)`` of the batch at step ``position`` (host int64, float64), selecting
        first when a selection is due (CRAIG, GradMatch and GLISTER measure ``ops``; ``sync`` is called
        around the timed measurement, e.g. a device synchronisation). Counts the step as trained.

        ``epoch``: the loader's epoch this batch belongs to, when its epochs are not blocks of
        ``steps_per_epoch`` steps (``budget_counts="passes"`` ends a pass early by the measurement's cost):
        the reselection cadence (``reselect_every``) and the epoch's batch plan follow it, from the step
        its first batch was handed out at. Default: epoch ``position // steps_per_epoch``.

        Examples
        --------
        The full data in a new order each pass, ``full_steps_per_epoch`` batches a pass:

        >>> import numpy as np
        >>> s = SubsetSchedule("full", np.arange(10) % 2, m=4, seed=0, steps_per_epoch=3,
        ...                    full_steps_per_epoch=3, epochs=1)
        >>> sorted(np.concatenate([s.next_indices(t)[0] for t in range(3)]).tolist()) == list(range(10))
        True
        """
        idx, w = self._indices(check_int(position, "position", low=0), ops, sync, epoch)
        self.counters["train_steps"] += 1
        self.counters["train_examples"] += int(idx.size)
        return idx, w

    def _indices(self, t: int, ops, sync, epoch: int | None = None):
        if self.method in ("full", "sgd-budget"):
            p, b = divmod(t, self.full_steps_per_epoch)  # full-data pass p, its batch b
            if self.plan_key != p:
                self.plan_idx = _rng(self.seed, p, _TAG_ORDER).permutation(self.n).astype(np.int64)
                self.plan_w = None
                self.plan_key = p
            assert self.plan_idx is not None
            idx = self.plan_idx[b * self.m:(b + 1) * self.m]
            return idx.copy(), np.ones(idx.size)
        if epoch is None:
            e, b = divmod(t, self.steps_per_epoch)
        else:
            e = int(epoch)
            b = (t - self.plan_start if self.plan_key == e else 0) % self.steps_per_epoch
        if self.plan_key != e:
            self._plan_epoch(e, t, ops, sync)
        assert self.plan_idx is not None and self.plan_w is not None
        sl = slice(b * self.m, (b + 1) * self.m)
        idx, w = self.plan_idx[sl].copy(), self.plan_w[sl].copy()
        if self.weights_mode == "batch":
            w = _mean_one(w)
        return idx, w

    def _plan_epoch(self, e: int, t: int, ops, sync) -> None:
        """Select (when due) for epoch ``e`` and lay out its ``steps_per_epoch * m`` batch slots."""
        if self.sel_idx is None or self._selection_due(e):
            self._select(e, t, ops, sync)
        assert self.sel_idx is not None and self.sel_w is not None
        gen = _rng(self.seed, e, _TAG_ORDER)
        need = self.steps_per_epoch * self.m
        k = self.sel_idx.size
        reps = -(-need // k)
        order = np.concatenate([gen.permutation(k) for _ in range(reps)])[:need]
        self.plan_idx = self.sel_idx[order]
        self.plan_w = self.sel_w[order]
        self.plan_key, self.plan_start = e, t

    def _selection_due(self, e: int) -> bool:
        if self.method in SELECTING_METHODS:
            # the first epoch of each block of reselect_every that trains: a due epoch whose pass handed out
            # no batch (budget_counts='passes', a selection's forward ate its share) passes the selection on
            # to the next epoch of its block, instead of leaving the old one for up to 2 R - 1 epochs (review 70)
            return self.sel_epoch < 0 or e // self.reselect_every != self.sel_epoch // self.reselect_every
        return e != self.sel_epoch  # random and prune draw every epoch

    def _select(self, e: int, t: int, ops, sync) -> None:
        sync = sync or (lambda: None)
        sync()
        t0 = time.perf_counter()
        fwd_s = 0.0
        fwd_examples = 0
        k = self.subset_size
        gen = _rng(self.seed, e, _TAG_SELECT)
        info: dict = {}
        if self.method == "random":
            sel = random_subset(self.pool.size, k, rng=gen)
            idx, w = self.pool[to_numpy(sel.indices)], to_numpy(sel.weights)
        elif self.method == "prune":
            idx, w, info = self._select_prune(e, gen)
        else:
            if ops is None:
                raise ValueError(f"method {self.method!r} measures the model: pass ops (outputs(indices, embeddings))")
            feats, fwd_s, fwd_examples = self._features(ops, sync)
            idx, w, info = self._select_gradients(e, k, gen, feats)
        idx = np.asarray(idx, dtype=np.int64)
        w = np.asarray(w, dtype=np.float64)
        if idx.size == 0 or not np.all(np.isfinite(w)) or w.sum() <= 0:
            raise FloatingPointError(f"{self.method}: the selection at epoch {e} is empty or "
                                     "has no positive weight")
        raw_sum = float(w.sum())
        if self.weights_mode == "selection":
            w = _mean_one(w)
        self.sel_idx, self.sel_w, self.sel_epoch = idx, w, e
        sync()
        dt = time.perf_counter() - t0
        self.counters["selections"] += 1
        self.counters["forward_examples"] += fwd_examples
        self.log.append({"step": t, "epoch": e, "seconds": dt, "forward_seconds": fwd_s,
                         "solve_seconds": dt - fwd_s, "size": int(idx.size), "weight_sum": raw_sum, **info})

    def _select_prune(self, e: int, gen):
        if e >= self.epochs:  # trained past the epochs it was built for (a Keras fit with more epochs)
            if not self._warned_epochs:
                warnings.warn(f"prune: epoch {e} is past the {self.epochs} epoch(s) the schedule was built for "
                              "(epochs=): it keeps the last epoch's rule from here on. Pass the run's epochs as "
                              "epochs= so that the pruning anneals over them.", stacklevel=user_stacklevel())
                self._warned_epochs = True
            e = self.epochs - 1
        seen = np.flatnonzero(self.seen)
        if e > 0 and not seen.size and not self._warned_unobserved:
            # an epoch has been trained and not one loss was recorded: prune would be random sampling
            warnings.warn("prune: no training losses were observed during the epochs so far, so nothing can "
                          "be pruned (every example counts as unseen). Pass each step's per-example losses "
                          "to the loader's observe(losses) (the schedule's observe(indices, losses)).",
                          stacklevel=user_stacklevel())
            self._warned_unobserved = True
        if seen.size:
            sel = prune_schedule(self.losses[seen], ratio=self.prune_ratio, epoch=e, epochs=self.epochs,
                                 anneal=self.prune_anneal, rng=gen)
            kept, kw = seen[to_numpy(sel.indices)], to_numpy(sel.weights)
        else:
            kept, kw = np.zeros(0, np.int64), np.zeros(0)
        # examples without a loss yet are never pruned and do not move the threshold (weight 1)
        unseen = np.flatnonzero(~self.seen)
        idx = np.concatenate([kept, unseen])
        w = np.concatenate([kw, np.ones(unseen.size)])
        order = np.argsort(idx, kind="stable")
        return idx[order], w[order], {"pruned": int(self.n - idx.size)}

    def _features(self, ops, sync):
        """The model's outputs on the pool (and glister's validation split), eval mode; counted. On a CPU
        model (or with ``solve_on="host"``) the solve runs on the host in NumPy, else in the outputs'
        library on their device."""
        sync()
        t0 = time.perf_counter()
        measure = self.pool if self.method != "glister" else np.concatenate([self.pool, self.val_indices])
        fresh = getattr(ops, "new_anchor", None)
        if fresh is not None:  # a new selection: inputs an adapter kept from the last one are not reused
            fresh()
        out = ops.outputs(measure, embeddings=self.embeddings)
        if self.embeddings and not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError(f"embeddings=True needs outputs(indices, embeddings=True) to return the pair (logits, "
                             f"embeddings); the adapter returned {type(out).__name__}")
        z, emb = out if self.embeddings else (out, None)
        sync()
        fwd = time.perf_counter() - t0
        if on_cpu(z) or self.solve_on == "host":
            z = to_numpy(z)
            emb = None if emb is None else to_numpy(emb)
            lab = self.labels[measure]
        else:
            lab = from_numpy(self.labels[measure], namespace(z), device_of(z))
        return (z, emb, lab), fwd, int(measure.size)

    def _select_gradients(self, e, k, gen, feats):
        z, emb, lab = feats
        npool = self.pool.size
        zp, lp = z[:npool, ...], lab[:npool]
        ep = None if emb is None else emb[:npool, ...]
        G = last_layer_gradients(zp, lp, embeddings=ep)
        opts = dict(self.options)
        info: dict = {}
        chance = None
        if self.method in ("craig", "gradmatch"):
            # the per-class split with its leftover picks drawn at random at every selection (each class's
            # expected share is proportional): a fixed Hamilton split gives the leftovers to the same
            # classes every time, so with k below the number of classes the same classes were never picked
            if opts.get("class_budgets") is None:
                _, cls, sizes = np.unique(self.labels[self.pool], return_inverse=True, return_counts=True)
                units, p = apportion(k, sizes, _rng(self.seed, e, _TAG_SPLIT), at_least_one=True)
                opts["class_budgets"] = units
                # each pool position's chance of a pick in its class, where some class may go without one
                chance = p[cls.reshape(-1)] if bool(np.any(p < 1.0)) else None
            self._split = np.asarray(opts["class_budgets"], dtype=np.int64)
        if self.method == "craig":
            if opts.get("optimizer") == "stochastic" and "rng" not in opts:
                opts["rng"] = gen
            sel = craig(G, lp, k, **opts)
        elif self.method == "gradmatch":
            sel = gradmatch(G, k, labels=lp, **opts)
        else:  # glister
            zv, lv = z[npool:, ...], lab[npool:]
            ev = None if emb is None else emb[npool:, ...]
            opts["eta"] = self.glister_lr
            if opts.get("optimizer") == "stochastic" and "rng" not in opts:
                opts["rng"] = gen
            sel = glister(G, zv, lv, k, val_embeddings=ev, **opts)
        loc, w = to_numpy(sel.indices).astype(np.int64), to_numpy(sel.weights).astype(np.float64)
        if self.method == "gradmatch":
            keep = w > 0
            loc, w = loc[keep], w[keep]
            info["picked"] = int(loc.size)
            short = k - loc.size
            if short > 0 and self.fill == "cycle" and loc.size == 0:
                # nothing to cycle (review 62: a FloatingPointError mid-run): no training gradient correlates
                # positively with their sum, as when the model fits its training data
                warnings.warn(
                    f"gradmatch picked no example at epoch {e}: no training gradient correlates positively with "
                    "the gradients' sum (the model fits its training data, or its gradients are 0 in their "
                    "dtype), so fill='cycle' has nothing to train on; this selection is filled at random, as "
                    "fill='random' does", stacklevel=user_stacklevel())
            if short > 0 and (self.fill == "random" or loc.size == 0):
                loc, w = self._top_up(e, loc, w, short)
                info["filled"] = int(loc.size - info["picked"])
        if chance is not None:
            # k below the number of classes: a class is in the selection with probability p_c only, so its
            # examples weigh 1 / p_c (as CREST's coresets do): each class's expected weight is what its picks
            # carry when picked (CRAIG: its size; without the division 50 classes of two examples got 1.8 % of
            # CRAIG's weight for 9.1 % of the data)
            w = w / chance[loc]
        return self.pool[loc], w, info

    def _top_up(self, e: int, loc: np.ndarray, w: np.ndarray, short: int):
        """GradMatch stopped early: ``short`` uniformly random examples more, weighted 1 (itself, on the sum
        scale). Each class first gets what it lacks of its share of the budget (the selection's split of k by
        class sizes that GradMatch's per-class budgets use); what a class cannot supply (too few examples
        left in it) is then drawn from the examples left in the other classes."""
        npool = self.pool.size
        lab_h = self.labels[self.pool]
        taken = np.zeros(npool, dtype=bool)
        taken[loc] = True
        fill_gen = _rng(self.seed, e, _TAG_FILL)
        cls, pos, counts = np.unique(lab_h, return_inverse=True, return_counts=True)
        share = self._split  # the selection's own per-class split of k = loc.size + short
        lack = np.maximum(share - np.bincount(pos[loc], minlength=cls.size), 0)
        extra = []
        for c in range(cls.size):
            free = np.flatnonzero((pos == c) & ~taken)
            q = int(min(lack[c], free.size))
            if q:
                got = fill_gen.choice(free, size=q, replace=False)
                taken[got] = True
                extra.append(got)
        left = short - sum(x.size for x in extra)
        if left > 0:  # classes short of examples: the rest from whatever is left, uniformly
            free = np.flatnonzero(~taken)
            if free.size:
                extra.append(fill_gen.choice(free, size=min(left, free.size), replace=False))
        if not extra:
            return loc, w
        more = np.concatenate(extra).astype(np.int64)
        return np.concatenate([loc, more]), np.concatenate([w, np.ones(more.size)])

    # -- feedback and checkpoints ---------------------------------------------------------------
    def observe(self, indices: np.ndarray, losses: np.ndarray) -> None:
        """Record the training losses of the examples ``indices`` (host; one finite loss per index, in
        ``[0, n)``: a batch's mean loss or an index out of range is refused); only prune reads them.

        Examples
        --------
        >>> import numpy as np
        >>> s = SubsetSchedule("prune", np.arange(10) % 2, m=4, seed=0, steps_per_epoch=2,
        ...                    full_steps_per_epoch=3, epochs=2)
        >>> s.observe(np.array([1, 3]), np.array([0.5, 0.25]))
        >>> int(s.seen.sum()), float(s.losses[3])
        (2, 0.25)
        """
        idx = np.asarray(indices)
        vals = np.asarray(losses, dtype=np.float64)
        if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)) or (
                idx.size and (idx.min() < 0 or idx.max() >= self.n)):
            raise ValueError(f"indices must be a 1-D integer array of example indices in [0, {self.n})")
        if vals.shape != idx.shape:
            raise ValueError(f"losses must hold one loss per index: shape {idx.shape}, got {vals.shape} (per-example "
                             "losses, reduction='none', not the batch's mean)")
        if not np.all(np.isfinite(vals)):
            raise ValueError("losses must be finite (a NaN or infinite training loss: training has diverged)")
        if self.method == "prune":
            idx = idx.astype(np.int64)  # (an empty list comes as float64)
            self.losses[idx] = vals
            self.seen[idx] = True

    @property
    def selection(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The current selection: (dataset indices, weights as yielded before per-batch rescaling)."""
        return None if self.sel_idx is None or self.sel_w is None else (self.sel_idx.copy(), self.sel_w.copy())

    def state(self) -> dict:
        """The run state as host arrays, numbers and lists (:meth:`load_state` restores it).

        Examples
        --------
        >>> import numpy as np
        >>> s = SubsetSchedule("random", np.arange(12) % 3, m=4, seed=1, steps_per_epoch=1,
        ...                    full_steps_per_epoch=3, epochs=2)
        >>> _ = s.next_indices(0)
        >>> other = SubsetSchedule("random", np.arange(12) % 3, m=4, seed=1, steps_per_epoch=1,
        ...                        full_steps_per_epoch=3, epochs=2)
        >>> other.load_state(s.state())
        >>> bool((other.next_indices(1)[0] == s.next_indices(1)[0]).all())
        True
        """
        return {
            "selection": None if self.sel_idx is None else {
                "indices": self.sel_idx.copy(), "weights": np.array(self.sel_w), "epoch": self.sel_epoch},
            "plan": None if self.plan_key is None else {
                "key": self.plan_key, "start": self.plan_start, "indices": np.array(self.plan_idx),
                "weights": None if self.plan_w is None else self.plan_w.copy()},
            "losses": self.losses.copy() if self.method == "prune" else None,
            "seen": self.seen.copy() if self.method == "prune" else None,
            "counters": dict(self.counters),
            "selections": [dict(s) for s in self.log],
        }

    def _loaded_weights(self, w: np.ndarray) -> np.ndarray:
        """Weights from a state: in "selection" mode equal weights within rounding of 1 (a state saved before
        they were made exactly 1: 0.9999999999999998 until the next selection) are exactly 1."""
        if self.weights_mode == "selection" and w.size and w.min() == w.max() and abs(float(w[0]) - 1.0) < 1e-12:
            return np.ones_like(w)
        return w

    def load_state(self, state: dict, where: str = "subset schedule state") -> None:
        """Restore :meth:`state` (arrays may come back in any library: they are copied to the host). Every
        field is checked before anything changes: a corrupt or foreign state raises a ``ValueError`` naming
        the field (``where`` prefixes it: the owner's state dict) and leaves the schedule as it was.

        Examples
        --------
        A schedule restored after its first selection continues with the same batches:

        >>> import numpy as np
        >>> make = lambda: SubsetSchedule("random", np.arange(20) % 2, m=5, seed=4, steps_per_epoch=2,
        ...                               full_steps_per_epoch=4, epochs=3)
        >>> a, b = make(), make()
        >>> _ = a.next_indices(0)
        >>> b.load_state(a.state())
        >>> all(np.array_equal(a.next_indices(t)[0], b.next_indices(t)[0]) for t in range(1, 6))
        True
        >>> bad = a.state()
        >>> bad["selection"]["indices"] = None
        >>> b.load_state(bad)
        Traceback (most recent call last):
            ...
        ValueError: subset schedule state: selection.indices must be a 1-D array (or nested lists), got NoneType
        """
        loaded = self._checked_state(state, where)
        for k, v in loaded.items():
            setattr(self, k, v)

    def _checked_state(self, state, where: str) -> dict:
        """The attributes :meth:`load_state` sets, from ``state``, every field checked (a ``ValueError`` naming
        it otherwise): indices of this data set's examples, finite non-negative weights one per index, an epoch
        plan of the size this schedule lays out, whole-number counters."""
        n = self.n

        def bad(msg):
            return ValueError(f"{where}: {msg}")

        def number(v, name, low):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or int(v) < low:
                raise bad(f"{name} must be an integer >= {low}, got {type(v).__name__} {v!r}")
            return int(v)

        def part(name, keys):
            v = state.get(name)
            if v is not None and (not isinstance(v, dict) or set(keys) - set(v)):
                raise bad(f"{name} must be None or a dict holding {', '.join(keys)}")
            return v

        def indices(v, name, size=None, within=None):
            a = state_array(v, where, name, 1, "i")
            if a.size and (a.min() < 0 or a.max() >= n):
                raise bad(f"{name} must hold example indices in [0, {n})")
            if size is not None and a.size != size:
                raise bad(f"{name} must hold {size} indices, got {a.size}")
            if within is not None and within.size < n and not np.isin(a, within).all():
                # (glister's held-out validation examples are never trained on: review 178)
                raise bad(f"{name} holds examples outside the pool this schedule selects from (glister's held-out "
                          "validation examples, or another data set's)")
            return a.astype(np.int64)

        def weights(v, name, size):
            a = state_array(v, where, name, 1, "f")
            if a.size != size or not np.all(np.isfinite(a)) or (a.size and a.min() < 0) or (a.size and a.sum() <= 0):
                raise bad(f"{name} must hold {size} finite non-negative weights (one per index), not all 0")
            return self._loaded_weights(a.astype(np.float64))

        if not isinstance(state, dict):
            raise bad(f"the state must be a dict (from state()), got {type(state).__name__}")
        out: dict[str, Any] = {}
        sel = part("selection", ("indices", "weights", "epoch"))
        if sel is None:
            out.update(sel_idx=None, sel_w=None, sel_epoch=-1)
        else:
            idx = indices(sel["indices"], "selection.indices", within=self.pool)
            if idx.size == 0:
                raise bad("selection.indices is empty: a selection holds at least one example")
            out.update(sel_idx=idx, sel_w=weights(sel["weights"], "selection.weights", idx.size),
                       sel_epoch=number(sel["epoch"], "selection.epoch", 0))
        plan = part("plan", ("key", "indices", "weights"))
        if plan is None:
            out.update(plan_key=None, plan_idx=None, plan_w=None)
        else:
            full = self.method in ("full", "sgd-budget")  # a permutation of the data, unweighted; else the epoch's slots
            key = number(plan["key"], "plan.key", 0)
            idx = indices(plan["indices"], "plan.indices", n if full else self.steps_per_epoch * self.m,
                          within=None if full else self.pool)
            if full and not np.array_equal(np.sort(idx), np.arange(n)):
                raise bad(f"plan.indices must be a permutation of the {n} examples for method {self.method!r}")
            if full and plan["weights"] is not None:
                raise bad(f"plan.weights must be None for method {self.method!r} (unweighted passes)")
            if not full and plan["weights"] is None:
                raise bad(f"plan.weights must hold the planned epoch's weights for method {self.method!r}")
            out.update(plan_key=key, plan_idx=idx,
                       plan_start=number(plan.get("start", key * self.steps_per_epoch), "plan.start", 0),
                       plan_w=None if full else weights(plan["weights"], "plan.weights", idx.size))
        if self.method == "prune":
            losses = state_array(state.get("losses"), where, "losses", 1, "f")
            seen = state_array(state.get("seen"), where, "seen", 1, "b")
            if losses.size != n or seen.size != n or not np.all(np.isfinite(losses)):
                raise bad(f"losses and seen must hold one entry per example ({n}), the losses finite")
            out.update(losses=losses.astype(np.float64), seen=seen.copy())
        counters = state.get("counters")
        if not isinstance(counters, dict) or set(self.counters) - set(counters):
            raise bad(f"counters must be a dict holding {', '.join(self.counters)}")
        out["counters"] = {k: number(counters[k], f"counters.{k}", 0) for k in self.counters}
        log = state.get("selections", [])
        if not isinstance(log, (list, tuple)) or not all(isinstance(r, dict) for r in log):
            raise bad("selections must be a list of records (dicts)")
        out["log"] = [dict(r) for r in log]
        return out
