"""PyTorch adapter for the baselines: :class:`SubsetLoader`, a drop-in sibling of ``CrestLoader``.

A training loop written for :class:`crestcore.adapters.torch.CrestLoader` trains with any baseline of
:mod:`crestcore.baselines` by swapping the loader::

    loader = SubsetLoader(model, dataset, method="craig", budget=0.1, epochs=10, m=128, seed=0)
    for epoch in range(10):                      # each pass is one epoch's share, as for CrestLoader
        for x, y, w in loader:                   # w: per-example weights, mean 1 (see *Weights*)
            losses = F.cross_entropy(model(x), y, reduction="none")
            loss = (w * losses).mean()
            ...
            loader.observe(losses)               # needed by method="prune", accepted by all

Methods (``METHODS``):

* ``full``: every example each epoch, shuffled, ``ceil(n / m)`` steps per epoch (the last batch of an
  epoch may be smaller); ``budget`` is ignored (it is the reference run).
* ``sgd-budget``: the full data, shuffled, for the budget's number of steps and then stops: the same
  batches as ``full`` with the same seed, cut after ``total_steps`` (no subset, just fewer steps; the
  paper's SGD-dagger column).
* ``random``: each epoch a fresh uniformly random subset of ``steps_per_epoch * m`` examples
  (:func:`crestcore.baselines.random_subset`).
* ``craig``: CRAIG, per-class facility location on the last-layer gradients of the whole training set at
  the current model (:func:`crestcore.baselines.craig`), reselected every ``reselect_every`` epochs.
* ``gradmatch``: GradMatch, per-class regularised non-negative OMP on the last-layer gradients
  (:func:`crestcore.baselines.gradmatch`), reselected every ``reselect_every`` epochs.
* ``glister``: GLISTER on a validation split held out of the training set (``val_fraction``,
  class-stratified, drawn once from the seed; those examples are never trained on), greedy on the
  one-step Taylor model of the last layer (:func:`crestcore.baselines.glister`), reselected every
  ``reselect_every`` epochs.
* ``prune``: loss-based dynamic pruning in the style of InfoBatch
  (:func:`crestcore.baselines.prune_schedule`): each epoch, part of the well-learned examples (latest
  training loss below the mean) are left out and the kept ones are up-weighted; ``steps_per_epoch``
  batches are drawn from the kept set; annealed (no pruning in the last ``1 - prune_anneal`` of the
  epochs). It needs the per-example training losses: call :meth:`SubsetLoader.observe` after each step.

Budget (identical to ``CrestLoader``'s)
---------------------------------------
``full_steps_per_epoch = ceil(n / m)`` with n the whole dataset (GLISTER's held-out part included, so
every method gets the same number of steps), ``steps_per_epoch = max(1, round(budget *
full_steps_per_epoch))`` (half rounds up), ``total_steps = epochs * steps_per_epoch`` (``full``:
``full_steps_per_epoch``). With ``budget_counts="steps"`` exactly ``total_steps`` batches are yielded.
With ``"passes"`` a batch is yielded only while the training examples so far plus the selection's
measurement passes, in step-equivalents (``(forward + 2 * backward examples) / 3 / m``), stay within the
same cap. ``stats["budget"]`` reports both fractions whichever mode is used. Every forward a selection
runs (the whole training set for CRAIG and GradMatch, the training pool plus the validation split for
GLISTER) is counted in ``stats["counters"]["forward_examples"]``; random, prune, full and sgd-budget
measure nothing (prune reuses the training losses).

A subset epoch is ``steps_per_epoch`` mini-batches of exactly ``m`` examples drawn from the epoch's
selection in a fresh random order; a selection smaller than ``steps_per_epoch * m`` (small datasets,
GradMatch stopping early) is cycled, each cycle in a new order.

Weights
-------
The baselines return weights on a *sum* scale (``sum_S w_j l_j`` estimates ``sum_i l_i``). The loader
yields them rescaled to mean 1, so that ``(w * losses).mean()`` keeps the learning rate of a plain mean:
``weights="selection"`` (default) divides by the mean over the epoch's selection (the relative weights
of the batches are kept; for prune this makes ``mean(w * loss)`` an unbiased estimate of the full-data
mean loss), ``weights="batch"`` by the mean over each batch (every batch's weights average exactly 1).
Uniform methods (full, sgd-budget, random, glister) yield weights of exactly 1.

Measurement passes run in eval mode through :class:`~crestcore.adapters.torch.TorchModelOps` (BatchNorm
statistics untouched, modes and buffers restored); nothing touches ``.grad`` or torch's global RNG.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError("crestcore.adapters.baselines needs PyTorch: pip install 'crestcore[torch]'") from exc
from torch import nn
from torch.utils.data import TensorDataset

from crestcore.plan import BudgetedPasses, full_steps
from crestcore.baselines import METHODS, SELECTING_METHODS, SubsetSchedule
from crestcore.adapters.torch import (  # the torch adapter's data access, shared on purpose
    TorchModelOps,
    _as_labels,
    _Fetcher,
    _found_origin,
    _length,
    _observed_losses,
    _weighted_batch,
    dataset_labels,
)

from . import _common
from ._common import (check_budget, check_budget_counts, check_checkpoint, check_count, labels_digest,
                      measure_anchor, user_stacklevel)

__all__ = ["SubsetLoader", "METHODS", "SELECTING_METHODS"]

_FORMAT = "crestcore.adapters.baselines.SubsetLoader/1"


def _portable(a):
    """Host arrays as CPU tensors (``torch.load(weights_only=True)`` reads them), nested containers kept."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.array(a, copy=True))
    if isinstance(a, dict):
        return {k: _portable(v) for k, v in a.items()}
    return a


def _example_blobs() -> TensorDataset:
    """The examples' training set, as :class:`SubsetLoader`'s example draws it: torch's global generator
    seeded with 0, then 48 points of 4 features in two Gaussian blobs (labels ``0, 1, 0, 1, ...``, class 1
    shifted by 2)."""
    torch.manual_seed(0)
    y = torch.arange(48) % 2
    return TensorDataset(torch.randn(48, 4) + 2.0 * y[:, None], y)


class SubsetLoader(BudgetedPasses):
    """An iterable of weighted mini-batches ``(x, y, weights)`` chosen by a baseline ``method``.

    Parameters
    ----------
    model : the classifier being trained (selections measure it in eval mode; it is never modified).
    dataset : the training set (map-style ``Dataset``; its transforms apply to the yielded batches).
    method : one of :data:`METHODS` (see the module docstring).
    budget : fraction of the full-data steps (positive; ignored by ``full``).
    epochs : the number of full-data epochs the budget is a fraction of.
    m : mini-batch size.
    seed : seeds every random draw of the loader (orders, subsets, the validation split, pruning);
        independent of torch's global RNG.
    device : where yielded batches go; default the model's device at each step.
    per_epoch, budget_counts : as for ``CrestLoader`` (default: each pass is the next epoch and ``len()``
        is ``steps_per_epoch``; ``per_epoch=False``: one pass is the run and ``len()`` is ``total_steps``).
    weights : ``"selection"`` (default) or ``"batch"``: over what the weights are rescaled to mean 1.
    reselect_every : R, for craig, gradmatch and glister: select at epochs 0, R, 2R, ... (0-based epochs
        of this run: the loader's passes with ``budget_counts="passes"`` and per-epoch passes, where a
        selection's forwards shorten its epoch; otherwise blocks of ``steps_per_epoch`` steps, also for a
        ``set_epoch`` ahead of the run and with ``per_epoch=False``, whose one pass has no epochs of its
        own) and train on that selection in between.
    embeddings : for craig, gradmatch and glister: True uses the gradient w.r.t. the last linear layer's
        weight (``C * h`` features, :func:`crestcore.last_layer_gradients` with embeddings), False the
        gradient w.r.t. the logits (``C`` features). Default per method: craig False (CRAIG's choice),
        gradmatch and glister True.
    val_fraction : glister's held-out validation share of the training set, in (0, 1) (default 0.1).
    glister_lr : the step size ``eta`` of glister's one-step model, which moves the last layer by
        ``eta`` times the *summed* gradient of the chosen subset (GLISTER's Taylor step
        ``theta - eta * sum_S g_j``; the training learning rate, as GLISTER does). Default 0.05. A step
        on the mean gradient (``eta = lr / k``) would be too small to give diminishing returns: greedy
        then takes the top-k of a linear score, and on Fashion-MNIST picked 90 % of its subset from two
        classes.
    prune_ratio, prune_anneal : :func:`crestcore.baselines.prune_schedule`'s ``ratio`` and ``anneal``
        (defaults 0.5 and 0.875).
    fill : gradmatch only, when OMP stops with fewer than k picks: ``"random"`` (default) tops the
        selection up with uniformly random examples of the same classes, each weighted 1 on the sum scale
        (itself); ``"cycle"`` trains on the smaller selection, cycled (an empty one, when no gradient
        correlates positively with their sum, is filled at random, with a warning).
    options : extra keyword arguments for the core function (``craig``: metric, kernel, optimizer, ...;
        ``gradmatch``: lam, tol (``positive=True`` only: training weights are non-negative); ``glister``: eta,
        optimizer, epsilon). Defaults: gradmatch ``lam=0.5, tol=1e-6``, glister ``optimizer="stochastic",
        epsilon=0.1``. ``rng``, if given, is an int seed (a Generator's state would not be checkpointed);
        by default the stochastic draws come from the loader's ``seed``.
    solve_on : where craig, gradmatch and glister solve: ``"auto"`` (default: NumPy on the host for a CPU
        model, torch on the device for a GPU model) or ``"host"`` (the measured outputs copied to the
        host, a few megabytes, and solved in NumPy/Numba whatever the model's device). Their picks are
        sequential, each a read back to the host on a GPU: on one H200 a selection at n = 60,000 took
        GradMatch 6.9 s, GLISTER 4.6 s and CRAIG 1.6 s on the device (docs/benchmarks.md, "On a GPU"),
        where the host took 2.7-4.3, 2.3-3.0 and 1.4-2.1 s on a 2-core CPU; ``"host"`` was not timed on
        a GPU.
    labels, collate_fn, measure_dataset, measure_batch_size, measure_workers, measure_cache_bytes,
        last_layer, forward : as for ``CrestLoader`` (``measure_cache_bytes=0`` for a dataset changed in place
        between selections: the kept measurement rows would be served stale).
    loss_fn : accepted as for ``CrestLoader``, but the baselines' selections use the gradients of the
        cross-entropy of the logits (their methods' own features), whatever it is: given, it is warned about.

    Attributes: ``n``, ``labels``, ``full_steps_per_epoch``, ``steps_per_epoch``, ``total_steps``,
    ``pool`` (indices that may be trained on: all, or glister's training part), ``val_indices``
    (glister's validation split, else empty), ``ops`` (the :class:`TorchModelOps`).

    Examples
    --------
    CRAIG at half the steps, on a linear classifier and 48 examples of two classes in batches of 8:
    each pass is one epoch's share, three batches drawn from a 24-example weighted subset that is
    reselected every epoch:

    >>> import torch
    >>> import torch.nn.functional as F
    >>> from torch.utils.data import TensorDataset
    >>> from crestcore.adapters.baselines import SubsetLoader
    >>> _ = torch.manual_seed(0)
    >>> y = torch.arange(48) % 2
    >>> data = TensorDataset(torch.randn(48, 4) + 2.0 * y[:, None], y)
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> loader = SubsetLoader(model, data, method="craig", budget=0.5, epochs=2, m=8, seed=0)
    >>> len(loader), loader.total_steps, loader.subset_size
    (3, 6, 24)
    >>> for epoch in range(loader.epochs):
    ...     for x, yb, w in loader:
    ...         losses = F.cross_entropy(model(x), yb, reduction="none")
    ...         opt.zero_grad()
    ...         (w * losses).mean().backward()
    ...         opt.step()
    >>> x.shape, w.shape
    (torch.Size([8, 4]), torch.Size([8]))
    >>> indices, weights = loader.selection  # the last epoch's subset, weights rescaled to mean 1
    >>> indices.size, round(float(weights.mean()), 6)
    (24, 1.0)
    >>> [s["weight_sum"] for s in loader.stats["selections"]]  # CRAIG's raw weights sum to n
    [48.0, 48.0]
    >>> loader.stats["counters"]["forward_examples"]  # each selection measured all 48 examples
    96
    """

    def __init__(
        self,
        model: nn.Module,
        dataset,
        *,
        method: str,
        budget: float = 0.1,
        epochs: int = 1,
        m: int = 128,
        seed: int = 0,
        device=None,
        per_epoch: bool = True,
        budget_counts: str = "steps",
        weights: str = "selection",
        reselect_every: int = 1,
        embeddings: bool | None = None,
        val_fraction: float = 0.1,
        glister_lr: float = 0.05,
        prune_ratio: float = 0.5,
        prune_anneal: float = 0.875,
        fill: str = "random",
        options: dict | None = None,
        solve_on: str = "auto",
        labels=None,
        collate_fn: Callable | None = None,
        measure_dataset=None,
        measure_batch_size: int | None = None,
        measure_workers: int = 0,
        measure_cache_bytes: int = 256 << 20,
        last_layer: nn.Module | str | None = None,
        forward: Callable | None = None,
        loss_fn: Callable | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method != "full":
            check_budget(budget)
        epochs = check_count(epochs, "epochs")
        m = check_count(m, "m")
        check_count(seed, "seed", low=0)
        check_count(measure_batch_size, "measure_batch_size", optional=True)
        check_budget_counts(budget_counts)
        n = _length(dataset)
        if n == 0:
            raise ValueError("the training dataset is empty")
        lab = dataset_labels(dataset) if labels is None else _as_labels(labels, n, "labels")
        if np.unique(lab).size < 2:
            raise ValueError("the training dataset holds a single class; a classifier needs at least two")
        if m > n:
            raise ValueError(f"the mini-batch size m={m} exceeds the dataset's {n} examples")
        if measure_dataset is not None and _length(measure_dataset) != n:
            raise ValueError(f"measure_dataset has {_length(measure_dataset)} examples but dataset has {n}; "
                             "it must hold the same examples in the same order")
        self.model = model
        self.dataset = dataset
        self.n = n
        self.labels = lab
        self.m = m
        self.seed = int(seed)
        self.budget = 1.0 if method == "full" else float(budget)
        self._device = None if device is None else torch.device(device)
        self._plan_passes(n=n, m=m, budget=self.budget, epochs=epochs, per_epoch=per_epoch,
                          budget_counts=budget_counts,
                          steps_per_epoch=full_steps(n, m) if method == "full" else None)
        # which examples each step trains on: the framework-free schedule of crestcore.baselines
        self.schedule = SubsetSchedule(
            method, lab, m=m, seed=self.seed, steps_per_epoch=self.steps_per_epoch,
            full_steps_per_epoch=self.full_steps_per_epoch, epochs=epochs, reselect_every=reselect_every,
            weights=weights, embeddings=embeddings, val_fraction=val_fraction, glister_lr=glister_lr,
            prune_ratio=prune_ratio, prune_anneal=prune_anneal, fill=fill, options=options, solve_on=solve_on,
        )
        if budget_counts == "passes" and method in SELECTING_METHODS:
            # a selection's forward over the pool (and glister's validation split) in step-equivalents (a
            # forward is a third of a training step), against the budget's steps between two selections
            sch = self.schedule
            cost = (sch.pool.size + sch.val_indices.size) / 3.0 / m
            share = self.steps_per_epoch * min(sch.reselect_every, self.epochs)  # one selection for the run at most
            if cost > 0.5 * share:
                warnings.warn(
                    f"SubsetLoader: under budget_counts='passes' each {method} selection's forward over "
                    f"{sch.pool.size + sch.val_indices.size} examples costs about {cost:.1f} of the "
                    f"{share} steps the budget allows between two selections ({min(cost / share, 1):.0%}): "
                    "the run trains little (as little as a batch an epoch; an epoch's pass may end before "
                    "its first batch, and its selection with it). Raise the budget or reselect_every, or count "
                    "budget_counts='steps'", stacklevel=user_stacklevel())
        self.ops = TorchModelOps(
            model, measure_dataset if measure_dataset is not None else dataset, labels=lab, loss_fn=loss_fn,
            device=device, batch_size=measure_batch_size, collate_fn=collate_fn, last_layer=last_layer,
            # (workers only where the method measures the model: review 173, a sparse dataset refused for nothing)
            forward=forward, num_workers=measure_workers if method in SELECTING_METHODS else 0, check_labels=True,
            cache_bytes=measure_cache_bytes,
        )
        if loss_fn is not None and method in SELECTING_METHODS:
            warnings.warn(  # (review 88: accepted and silently unused)
                f"SubsetLoader: loss_fn is not used by {method}'s selections, which measure the gradients of the "
                "cross-entropy of the logits (the method's own features); your training step's loss is yours",
                stacklevel=user_stacklevel())
        if labels is None:  # found here from the training set (the labels check's warning names where)
            self.ops._labels_origin = _found_origin(dataset)
        self._fetch = _Fetcher(dataset, collate_fn)
        self._last: tuple[np.ndarray, np.ndarray] | None = None
        self._before_last: tuple[np.ndarray, np.ndarray] | None = None  # the batch handed out before _last
        self._last_position = -1  # the run position after _last was handed out (-1: none yet)
        self._last_epoch = 0
        self._replay_at: int | None = None  # a state saved with trained=: the position handed out again
        self._loaded_at = 0  # the position a state was loaded at (trained= never goes below it)

    # the schedule's settings, read as the loader's own
    method = property(lambda self: self.schedule.method)
    pool = property(lambda self: self.schedule.pool)
    val_indices = property(lambda self: self.schedule.val_indices)
    subset_size = property(lambda self: self.schedule.subset_size)
    embeddings = property(lambda self: self.schedule.embeddings)
    options = property(lambda self: self.schedule.options)
    weights_mode = property(lambda self: self.schedule.weights_mode)
    reselect_every = property(lambda self: self.schedule.reselect_every)

    # -- accounting and stepping (the pass logic is BudgetedPasses') ------------------------------
    def _counters(self) -> dict:
        return self.schedule.counters

    def _step(self):
        epoch = self._schedule_epoch() if self.budget_counts == "passes" else None
        idx, w = self.schedule.next_indices(self._position, self.ops, sync=self._sync, epoch=epoch)
        self._position += 1
        if self._replay_at is not None and self._position > self._replay_at:
            self._replay_at = None  # the batch a trained= state left untrained is handed out again
        # the batch before (state_dict(trained=position - 1)) and the epoch of this one's pass
        self._before_last = self._last if self._last_position == self._position - 1 else None
        self._last, self._last_position = (idx, w), self._position
        self._last_epoch = self._pass_e if self._pass_e is not None else (self._position - 1) // self.steps_per_epoch
        return self._make_batch(idx, w)

    def _replaying(self) -> bool:
        # the batch a state saved with trained= left untrained: its step (its selection, if it made one,
        # included) was paid and checked in the run that saved it; under "passes" it is handed out again
        # without a second check (which counted that selection's cost and ended the pass before it)
        return self._replay_at is not None and self._position == self._replay_at

    def _schedule_epoch(self) -> int | None:
        """Under "passes" a pass ends early by the measurement's cost, so the loader's epochs are not blocks of
        ``steps_per_epoch`` steps: the schedule follows the loader's epoch. A pass that yields the shares of
        epochs ``first .. e`` (a set_epoch ahead of the run, or one completing a broken-off epoch) walks them
        in turn, each epoch's plan until its share of the budget is spent, never past ``e``. None: one pass for the
        whole run (``per_epoch=False``), blocks of steps."""
        e = self._pass_e
        if e is None:
            return None
        key, first = self.schedule.plan_key, self._pass_first
        cur = key if key is not None and first <= key <= e else first
        train, overhead = self._cost()
        # the next step belongs to the first epoch whose share (training and measurement, as the pass's cap
        # counts them) it fits in: the split of a plain loop's passes
        while cur < e and (train + overhead) / self._pass_m + 1 > (cur + 1) * self.steps_per_epoch + 1e-9:
            cur += 1
        return cur

    def _make_batch(self, idx: np.ndarray, w: np.ndarray):
        return _weighted_batch(self, idx, w)

    def _sync(self):
        if self.ops.device.type == "cuda":
            torch.cuda.synchronize(self.ops.device)

    # -- feedback and observability -------------------------------------------------------------
    @property
    def last_indices(self) -> np.ndarray | None:
        """Dataset indices of the batch yielded last (host int64), or None before the first."""
        return None if self._last is None else self._last[0].copy()

    @property
    def last_weights(self) -> np.ndarray | None:
        return None if self._last is None else self._last[1].copy()

    @property
    def selection(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The current selection: (dataset indices, weights as yielded before per-batch rescaling)."""
        return self.schedule.selection

    def observe(self, losses) -> None:
        """Feed the per-example training losses (k,) of the batch yielded last.

        Needed by ``prune`` (its pruning rule reads them); accepted by every method. Always checked:
        NaN or infinite losses raise ``FloatingPointError``. Detached; one host copy.

        Examples
        --------
        ``prune`` reads the observed losses at its next epoch: examples below the mean loss are
        partly left out (none before any loss was seen):

        >>> import torch
        >>> import torch.nn.functional as F
        >>> data = _example_blobs()  # the class example's 48 examples of two classes (seeds torch with 0)
        >>> model = torch.nn.Linear(4, 2)
        >>> loader = SubsetLoader(model, data, method="prune", budget=0.5, epochs=4, m=8, seed=0)
        >>> for epoch in range(2):
        ...     for x, yb, w in loader:
        ...         losses = F.cross_entropy(model(x), yb, reduction="none")
        ...         loader.observe(losses)
        >>> [s["pruned"] > 0 for s in loader.stats["selections"]]
        [False, True]
        """
        if self._last is None:
            raise RuntimeError("observe() needs a batch: call it after training on a yielded batch")
        idx = self._last[0]
        self.schedule.observe(idx, _observed_losses(losses, idx.size, self._position - 1, "SubsetLoader"))

    @property
    def stats(self) -> dict:
        """Plain data: position, selections (step, epoch, seconds, forward/solve seconds, size, ...),
        total selection time, counters (counted forward/backward examples) and the budget report."""
        sel = [dict(s) for s in self.schedule.log]
        return {
            "method": self.method,
            "step": self._position,
            "epoch": self.epoch,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "subset_size": self.subset_size,
            "selections": sel,
            "selection_steps": [s["step"] for s in sel],
            "selection_time_s": float(sum(s["seconds"] for s in sel)),
            "selection_forward_s": float(sum(s["forward_seconds"] for s in sel)),
            "selection_solve_s": float(sum(s["solve_seconds"] for s in sel)),
            "counters": {k: int(v) for k, v in self.schedule.counters.items()},
            "budget": self._budget_report(),
        }

    # -- checkpoints ----------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {"method": self.method, "n": self.n, "m": self.m, "seed": self.seed,
                "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs, "budget": self.budget}

    def _settings(self) -> str:
        return self.schedule.settings()

    def _labels_digest(self) -> str:
        return labels_digest(self.labels)

    def state_dict(self, trained: int | None = None) -> dict:
        """Everything needed to continue with the same batches: position, the current selection and epoch
        layout, prune's loss record, counters and the selection log. Tensors, numbers and strings only
        (``torch.load(..., weights_only=True)`` reads it). Restore the model too: a later selection
        measures it. ``trained``: ``position - 1`` when the loop saves with the batch handed out last not
        yet trained (a preemption check at the top of the step): the resumed run hands it out again
        (its selection, if it made one, is kept: it measured the model the loop has now). Default: every
        batch handed out counts as trained.

        Examples
        --------
        >>> import io
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> data = TensorDataset(torch.randn(48, 4), torch.arange(48) % 2)
        >>> loader = SubsetLoader(torch.nn.Linear(4, 2), data, method="random", budget=0.5, epochs=2, m=8)
        >>> batch = next(iter(loader))
        >>> state = loader.state_dict()
        >>> state["format"], state["position"]
        ('crestcore.adapters.baselines.SubsetLoader/1', 1)
        >>> buffer = io.BytesIO()
        >>> torch.save(state, buffer)
        >>> _ = buffer.seek(0)
        >>> torch.load(buffer, weights_only=True)["position"]
        1
        >>> loader.state_dict(trained=0)["position"]  # the batch handed out, not trained: handed out again
        0
        """
        schedule = self.schedule.state()
        last, passes = self._last, self._pass_state()
        # a batch to hand out again first: the one trained= leaves untrained, or one a loaded state left so
        replay = self._replay_at if self._replay_at is not None and self._replay_at >= self._position else None
        if trained is not None and not (trained == self._position and not isinstance(trained, bool)):
            ok = self._last_position == self._position and self._position - 1 >= self._loaded_at and (
                self._position == 1 or self._before_last is not None)
            if isinstance(trained, bool) or not isinstance(trained, (int, np.integer)) or not ok \
                    or int(trained) != self._position - 1:
                span = (f"{self._position - 1} or {self._position}" if ok else f"{self._position}")
                raise ValueError(f"trained must be {span} (the batches of the run trained; {self._position} are "
                                 f"handed out, and only the last can be untrained), got {trained!r}")
            last = self._before_last
            # the last batch is handed out again: it is not counted, and its epoch's pass is not done
            counters = dict(schedule["counters"])
            counters["train_steps"] -= 1
            counters["train_examples"] -= int(self._last[0].size)
            schedule["counters"] = counters
            passes = self._pass_state(int(trained), min(self._epochs_done, self._last_epoch))
            replay = int(trained)
        return {
            "format": _FORMAT,
            **self._fingerprint(),
            "budget": self.budget,
            "budget_counts": self.budget_counts,
            "settings": self._settings(),
            "labels_sha256": self._labels_digest(),
            **passes,
            "last": None if last is None else {"indices": _portable(last[0]), "weights": _portable(last[1])},
            "replay": replay,  # the position whose batch is handed out again first, else None
            # the anchors measured so far: a measurement's random transforms are drawn for its anchor's number
            "measure_anchor": int(self.ops._gen),
            **{k: _portable(v) for k, v in schedule.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; the next pass continues exactly where it was saved.

        Examples
        --------
        A loader rebuilt with the same arguments resumes after the saved step with the same batches:

        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> data = TensorDataset(torch.randn(48, 4), torch.arange(48) % 2)
        >>> model = torch.nn.Linear(4, 2)
        >>> loader = SubsetLoader(model, data, method="random", budget=0.5, epochs=2, m=8, seed=0)
        >>> batches = iter(loader)
        >>> _ = next(batches)
        >>> state = loader.state_dict()
        >>> _ = next(batches)
        >>> resumed = SubsetLoader(model, data, method="random", budget=0.5, epochs=2, m=8, seed=0)
        >>> resumed.load_state_dict(state)
        >>> _ = next(iter(resumed))
        >>> resumed.position, bool((resumed.last_indices == loader.last_indices).all())
        (2, True)
        """
        with _common.held_warnings() as said:  # the notices: said once every check has passed (review 170)
            check_checkpoint(self.schedule.saved_header(state), fmt=_FORMAT, owner="SubsetLoader", kind="loader",
                             fingerprint=self._fingerprint(),
                             same="method, dataset, m, seed, budget and epochs",
                             options=("settings", self._settings(), "the loader's options differ from the saved ones"))
            saved = state.get("labels_sha256")  # (checkpoints before 2026-12-01 have none)
            if saved is not None and saved != self._labels_digest():
                raise ValueError("the state dict was saved for a dataset with different labels: its selection and "
                                 "records belong to those; resume with the same dataset")
            pos = state.get("position")
            if isinstance(pos, bool) or not isinstance(pos, (int, np.integer)) or not 0 <= int(pos) <= self.total_steps:
                raise ValueError(f"SubsetLoader state dict: position must be an integer in [0, {self.total_steps}], "
                                 f"got {pos!r}")
            self._checked_pass_state(state, int(pos))  # a refused state changes nothing
            number = measure_anchor(state, "SubsetLoader state dict")
            last = state.get("last")
            if last is not None:  # the batch handed out last: checked as every stored batch is
                if not isinstance(last, dict) or not {"indices", "weights"} <= set(last):
                    raise ValueError("SubsetLoader state dict: last must be None or a dict holding indices and "
                                     "weights")
                last = _common.stored_batch({**last, "reselected": False}, self.n, "SubsetLoader state dict")[:2]
        before = self.schedule.state()
        try:
            self.schedule.load_state(state, where="SubsetLoader state dict")
            _common.say(said)  # every check passed: the notices (a filter that raises leaves the loader as it was)
        except Exception:
            self.schedule.load_state(before)  # a state the schedule cannot read leaves it as it was
            raise
        self._last = last
        # the loaded last batch is the one before the next: state_dict(trained=) works at the first step
        self._before_last, self._last_position = None, (int(pos) if last is not None else -1)
        self._loaded_at = int(pos)
        replay = state.get("replay")  # absent before 2026-12-04: none
        self._replay_at = int(replay) if isinstance(replay, (int, np.integer)) and not isinstance(replay, bool) \
            and int(replay) == int(pos) else None
        self._load_pass_state(state, int(pos))
        if number is not None:
            self.ops._gen = number
