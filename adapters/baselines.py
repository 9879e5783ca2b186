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
full_steps_per_epoch))``, ``total_steps = epochs * steps_per_epoch`` (``full``:
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

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from crestcore import last_layer_gradients
from crestcore.plan import BudgetedPasses, full_steps
from crestcore.baselines import craig, glister, gradmatch, prune_schedule, random_subset
from crestcore.adapters.torch import (  # the torch adapter's data access, shared on purpose
    TorchModelOps,
    _as_labels,
    _Fetcher,
    _length,
    _observed_losses,
    _weighted_batch,
    dataset_labels,
)

from ._common import check_budget, check_budget_counts, check_checkpoint, check_count, examples_spent

__all__ = ["SubsetLoader", "METHODS", "SELECTING_METHODS"]

METHODS = ("full", "sgd-budget", "random", "craig", "gradmatch", "glister", "prune")
SELECTING_METHODS = ("craig", "gradmatch", "glister")  # measure the model and reselect every R epochs
_FORMAT = "crestcore.adapters.baselines.SubsetLoader/1"

# tags that separate the random streams of one seed: default_rng([seed, epoch, tag])
_TAG_ORDER, _TAG_SELECT, _TAG_VAL, _TAG_FILL = 101, 102, 103, 104

# per-method defaults of the options forwarded to the core functions (overridable with options=)
_DEFAULT_OPTIONS = {
    "craig": {},
    "gradmatch": {"lam": 0.5, "tol": 1e-6},
    "glister": {"optimizer": "stochastic", "epsilon": 0.1},
    "prune": {},
}
# whether the last-layer gradient includes the penultimate embedding (the last linear layer's weight,
# C * h features) or is the gradient w.r.t. the logits (C features)
_DEFAULT_EMBEDDINGS = {"craig": False, "gradmatch": True, "glister": True}


def _check_fraction(v, name: str, *, low_open=True, high=1.0, high_open=True) -> float:
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


def _host(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _portable(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, copy=True))


def _unportable(t, dtype) -> np.ndarray:
    return np.asarray(_host(t), dtype=dtype).copy()


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
        of this run, each ``steps_per_epoch`` steps) and train on that selection in between.
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
        (itself); ``"cycle"`` trains on the smaller selection, cycled.
    options : extra keyword arguments for the core function (``craig``: metric, kernel, optimizer, ...;
        ``gradmatch``: lam, tol, positive; ``glister``: eta, optimizer, epsilon). Defaults: gradmatch
        ``lam=0.5, tol=1e-6``, glister ``optimizer="stochastic", epsilon=0.1``.
    labels, collate_fn, measure_dataset, measure_batch_size, measure_workers, last_layer, forward, loss_fn :
        as for ``CrestLoader``.

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
        labels=None,
        collate_fn: Callable | None = None,
        measure_dataset=None,
        measure_batch_size: int = 512,
        measure_workers: int = 0,
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
        check_budget_counts(budget_counts)
        if weights not in ("selection", "batch"):
            raise ValueError(f"weights must be 'selection' or 'batch', got {weights!r}")
        if fill not in ("random", "cycle"):
            raise ValueError(f"fill must be 'random' or 'cycle', got {fill!r}")
        reselect_every = check_count(reselect_every, "reselect_every")
        if embeddings is not None and not isinstance(embeddings, bool):
            raise TypeError(f"embeddings must be a bool or None, got {type(embeddings).__name__}")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options must be a dict of keyword arguments, got {type(options).__name__}")
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
        self.method = method
        self.n = n
        self.labels = lab
        self.m = m
        self.seed = int(seed)
        self.budget = 1.0 if method == "full" else float(budget)
        self.weights_mode = weights
        self.reselect_every = reselect_every
        self.embeddings = _DEFAULT_EMBEDDINGS.get(method, False) if embeddings is None else embeddings
        self.val_fraction = _check_fraction(val_fraction, "val_fraction")
        self.glister_lr = _check_fraction(glister_lr, "glister_lr", high=math.inf)
        self.prune_ratio = _check_fraction(prune_ratio, "prune_ratio", low_open=False)
        self.prune_anneal = _check_fraction(prune_anneal, "prune_anneal", low_open=False, high_open=False)
        self.fill = fill
        self.options = {**_DEFAULT_OPTIONS.get(method, {}), **(options or {})}
        self._device = None if device is None else torch.device(device)
        self.ops = TorchModelOps(
            model, measure_dataset if measure_dataset is not None else dataset, labels=lab, loss_fn=loss_fn,
            device=device, batch_size=measure_batch_size, collate_fn=collate_fn, last_layer=last_layer,
            forward=forward, num_workers=measure_workers,
        )
        self._fetch = _Fetcher(dataset, collate_fn)
        self._plan_passes(n=n, m=m, budget=self.budget, epochs=epochs, per_epoch=per_epoch,
                          budget_counts=budget_counts,
                          steps_per_epoch=full_steps(n, m) if method == "full" else None)

        # glister's validation split: class-stratified, fixed for the run
        if method == "glister":
            gen = _rng(self.seed, 0, _TAG_VAL)
            val = []
            for c in np.unique(lab):
                members = np.flatnonzero(lab == c)
                k = int(round(self.val_fraction * members.size))
                k = min(max(k, 1), members.size - 1) if members.size > 1 else 0
                if k:
                    val.append(gen.choice(members, size=k, replace=False))
            self.val_indices = np.sort(np.concatenate(val)).astype(np.int64) if val else np.zeros(0, np.int64)
            if self.val_indices.size == 0:
                raise ValueError("glister needs a validation split: the dataset is too small to hold one out")
            keep = np.ones(n, dtype=bool)
            keep[self.val_indices] = False
            self.pool = np.flatnonzero(keep).astype(np.int64)
        else:
            self.val_indices = np.zeros(0, dtype=np.int64)
            self.pool = np.arange(n, dtype=np.int64)
        self.subset_size = min(self.pool.size, self.steps_per_epoch * m)

        # run state
        self._last: tuple[np.ndarray, np.ndarray] | None = None
        self._sel_idx: np.ndarray | None = None  # current selection (dataset indices) ...
        self._sel_w: np.ndarray | None = None  # ... and its weights, already rescaled (selection mode) or raw
        self._sel_epoch = -1
        self._plan_key: int | None = None  # epoch (subset methods) or full-data pass (full, sgd-budget)
        self._plan_idx: np.ndarray | None = None
        self._plan_w: np.ndarray | None = None
        self._losses = np.zeros(n, dtype=np.float64)  # prune: latest training loss per example
        self._seen = np.zeros(n, dtype=bool)
        self._counters = {"train_steps": 0, "train_examples": 0, "forward_examples": 0, "backward_examples": 0,
                          "selections": 0}
        self._selections: list[dict] = []

    # -- accounting and stepping (the pass logic is BudgetedPasses') ------------------------------
    def _cost(self) -> tuple[float, float]:
        return examples_spent(self._counters)

    def _step(self):
        idx, w = self._next_indices()
        self._position += 1
        self._counters["train_steps"] += 1
        self._counters["train_examples"] += int(idx.size)
        self._last = (idx, w)
        return self._make_batch(idx, w)

    def _make_batch(self, idx: np.ndarray, w: np.ndarray):
        return _weighted_batch(self, idx, w)

    # -- the batches ----------------------------------------------------------------------------
    def _next_indices(self) -> tuple[np.ndarray, np.ndarray]:
        t = self._position
        if self.method in ("full", "sgd-budget"):
            p, b = divmod(t, self.full_steps_per_epoch)  # full-data pass p, its batch b
            if self._plan_key != p:
                self._plan_idx = _rng(self.seed, p, _TAG_ORDER).permutation(self.n).astype(np.int64)
                self._plan_w = None
                self._plan_key = p
            idx = self._plan_idx[b * self.m:(b + 1) * self.m]
            return idx.copy(), np.ones(idx.size)
        e, b = divmod(t, self.steps_per_epoch)
        if self._plan_key != e:
            self._plan_epoch(e)
        sl = slice(b * self.m, (b + 1) * self.m)
        idx, w = self._plan_idx[sl].copy(), self._plan_w[sl].copy()
        if self.weights_mode == "batch":
            w = w / w.mean()
        return idx, w

    def _plan_epoch(self, e: int) -> None:
        """Select (when due) for epoch ``e`` and lay out its ``steps_per_epoch * m`` batch slots."""
        if self._sel_idx is None or self._selection_due(e):
            self._select(e)
        gen = _rng(self.seed, e, _TAG_ORDER)
        need = self.steps_per_epoch * self.m
        k = self._sel_idx.size
        reps = -(-need // k)
        order = np.concatenate([gen.permutation(k) for _ in range(reps)])[:need]
        self._plan_idx = self._sel_idx[order]
        self._plan_w = self._sel_w[order]
        self._plan_key = e

    def _selection_due(self, e: int) -> bool:
        if self.method in SELECTING_METHODS:
            return e % self.reselect_every == 0 or self._sel_epoch < 0
        return e != self._sel_epoch  # random and prune draw every epoch

    def _sync(self):
        if self.ops.device.type == "cuda":
            torch.cuda.synchronize(self.ops.device)

    def _select(self, e: int) -> None:
        self._sync()
        t0 = time.perf_counter()
        fwd_s = 0.0
        fwd_examples = 0
        k = self.subset_size
        gen = _rng(self.seed, e, _TAG_SELECT)
        info: dict = {}
        if self.method == "random":
            sel = random_subset(self.pool.size, k, rng=gen)
            idx, w = self.pool[_host(sel.indices)], _host(sel.weights)
        elif self.method == "prune":
            idx, w, info = self._select_prune(e, gen)
        else:
            feats, fwd_s, fwd_examples = self._features()
            idx, w, info = self._select_gradients(e, k, gen, feats)
        idx = np.asarray(idx, dtype=np.int64)
        w = np.asarray(w, dtype=np.float64)
        if idx.size == 0 or not np.all(np.isfinite(w)) or w.sum() <= 0:
            raise FloatingPointError(f"SubsetLoader({self.method!r}): the selection at epoch {e} is empty or "
                                     "has no positive weight")
        raw_sum = float(w.sum())
        if self.weights_mode == "selection":
            w = w / w.mean()
        self._sel_idx, self._sel_w, self._sel_epoch = idx, w, e
        self._sync()
        dt = time.perf_counter() - t0
        self._counters["selections"] += 1
        self._counters["forward_examples"] += fwd_examples
        self._selections.append({"step": self._position, "epoch": e, "seconds": dt, "forward_seconds": fwd_s,
                                 "solve_seconds": dt - fwd_s, "size": int(idx.size), "weight_sum": raw_sum,
                                 **info})

    def _select_prune(self, e: int, gen):
        seen = np.flatnonzero(self._seen)
        if seen.size:
            sel = prune_schedule(self._losses[seen], ratio=self.prune_ratio, epoch=e, epochs=self.epochs,
                                 anneal=self.prune_anneal, rng=gen)
            kept, kw = seen[_host(sel.indices)], _host(sel.weights)
        else:
            kept, kw = np.zeros(0, np.int64), np.zeros(0)
        # examples without a loss yet are never pruned and do not move the threshold (weight 1)
        unseen = np.flatnonzero(~self._seen)
        idx = np.concatenate([kept, unseen])
        w = np.concatenate([kw, np.ones(unseen.size)])
        order = np.argsort(idx, kind="stable")
        return idx[order], w[order], {"pruned": int(self.n - idx.size)}

    def _features(self):
        """Last-layer gradients of the pool (and glister's validation outputs), eval mode; counted."""
        self._sync()
        t0 = time.perf_counter()
        measure = self.pool if self.method != "glister" else np.concatenate([self.pool, self.val_indices])
        out = self.ops.outputs(measure, embeddings=self.embeddings)
        z, emb = out if self.embeddings else (out, None)
        self._sync()
        fwd = time.perf_counter() - t0
        host = z.device.type == "cpu"  # solve on the host with NumPy on a CPU model, else in torch on device
        if host:
            z = z.detach().cpu().numpy()
            emb = None if emb is None else emb.detach().cpu().numpy()
            lab = self.labels[measure]
        else:
            lab = torch.from_numpy(self.labels[measure]).to(z.device)
        return (z, emb, lab), fwd, int(measure.size)

    def _select_gradients(self, e, k, gen, feats):
        z, emb, lab = feats
        npool = self.pool.size
        zp, lp = z[:npool], lab[:npool]
        ep = None if emb is None else emb[:npool]
        G = last_layer_gradients(zp, lp, embeddings=ep)
        opts = dict(self.options)
        info: dict = {}
        if self.method == "craig":
            if opts.get("optimizer") == "stochastic" and "rng" not in opts:
                opts["rng"] = gen
            sel = craig(G, lp, k, **opts)
        elif self.method == "gradmatch":
            sel = gradmatch(G, k, labels=lp, **opts)
        else:  # glister
            zv, lv = z[npool:], lab[npool:]
            ev = None if emb is None else emb[npool:]
            opts.setdefault("eta", self.glister_lr)
            if opts.get("optimizer") == "stochastic" and "rng" not in opts:
                opts["rng"] = gen
            sel = glister(G, zv, lv, k, val_embeddings=ev, **opts)
        loc, w = _host(sel.indices).astype(np.int64), _host(sel.weights).astype(np.float64)
        if self.method == "gradmatch":
            keep = w > 0
            loc, w = loc[keep], w[keep]
            info["picked"] = int(loc.size)
            short = k - loc.size
            if short > 0 and self.fill == "random":
                lab_h = self.labels[self.pool]
                taken = np.zeros(npool, dtype=bool)
                taken[loc] = True
                fill_gen = _rng(self.seed, e, _TAG_FILL)
                # top up each class in proportion to its share of the shortfall (largest remainders)
                cls, counts = np.unique(lab_h, return_counts=True)
                quota = short * counts / counts.sum()
                base = np.floor(quota).astype(int)
                rest = short - base.sum()
                base[np.argsort(-(quota - base), kind="stable")[:rest]] += 1
                extra = []
                for c, q in zip(cls, base):
                    free = np.flatnonzero((lab_h == c) & ~taken)
                    if q and free.size:
                        extra.append(fill_gen.choice(free, size=min(q, free.size), replace=False))
                if extra:
                    extra = np.concatenate(extra).astype(np.int64)
                    loc = np.concatenate([loc, extra])
                    w = np.concatenate([w, np.ones(extra.size)])
                info["filled"] = int(loc.size - info["picked"])
        return self.pool[loc], w, info

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
        return None if self._sel_idx is None else (self._sel_idx.copy(), self._sel_w.copy())

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
        vals = _observed_losses(losses, idx.size, self._position - 1, "SubsetLoader")
        if self.method == "prune":
            self._losses[idx] = vals
            self._seen[idx] = True

    @property
    def stats(self) -> dict:
        """Plain data: position, selections (step, epoch, seconds, forward/solve seconds, size, ...),
        total selection time, counters (counted forward/backward examples) and the budget report."""
        sel = [dict(s) for s in self._selections]
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
            "counters": {k: int(v) for k, v in self._counters.items()},
            "budget": self._budget_report(),
        }

    # -- checkpoints ----------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {"method": self.method, "n": self.n, "m": self.m, "seed": self.seed,
                "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs}

    def _settings(self) -> str:
        return repr((self.weights_mode, self.reselect_every, self.embeddings, self.val_fraction, self.glister_lr,
                     self.prune_ratio, self.prune_anneal, self.fill, sorted(self.options.items())))

    def state_dict(self) -> dict:
        """Everything needed to continue with the same batches: position, the current selection and epoch
        layout, prune's loss record, counters and the selection log. Tensors, numbers and strings only
        (``torch.load(..., weights_only=True)`` reads it). Restore the model too: a later selection
        measures it.

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
        """
        return {
            "format": _FORMAT,
            **self._fingerprint(),
            "budget": self.budget,
            "budget_counts": self.budget_counts,
            "settings": self._settings(),
            **self._pass_state(),
            "last": None if self._last is None else {"indices": _portable(self._last[0]),
                                                     "weights": _portable(self._last[1])},
            "selection": None if self._sel_idx is None else {
                "indices": _portable(self._sel_idx), "weights": _portable(self._sel_w), "epoch": self._sel_epoch},
            "plan": None if self._plan_key is None else {
                "key": self._plan_key, "indices": _portable(self._plan_idx),
                "weights": None if self._plan_w is None else _portable(self._plan_w)},
            "losses": _portable(self._losses) if self.method == "prune" else None,
            "seen": _portable(self._seen) if self.method == "prune" else None,
            "counters": dict(self._counters),
            "selections": [dict(s) for s in self._selections],
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
        check_checkpoint(state, fmt=_FORMAT, owner="SubsetLoader", kind="loader", fingerprint=self._fingerprint(),
                         same="method, dataset, m, seed, budget and epochs",
                         options=("settings", self._settings(), "the loader's options differ from the saved ones"))
        pos = state.get("position")
        if isinstance(pos, bool) or not isinstance(pos, (int, np.integer)) or not 0 <= int(pos) <= self.total_steps:
            raise ValueError(f"SubsetLoader state dict: position must be an integer in [0, {self.total_steps}], "
                             f"got {pos!r}")
        last = state.get("last")
        self._last = None if last is None else (_unportable(last["indices"], np.int64),
                                                _unportable(last["weights"], np.float64))
        sel = state.get("selection")
        if sel is None:
            self._sel_idx = self._sel_w = None
            self._sel_epoch = -1
        else:
            self._sel_idx = _unportable(sel["indices"], np.int64)
            self._sel_w = _unportable(sel["weights"], np.float64)
            self._sel_epoch = int(sel["epoch"])
        plan = state.get("plan")
        if plan is None:
            self._plan_key = self._plan_idx = self._plan_w = None
        else:
            self._plan_key = int(plan["key"])
            self._plan_idx = _unportable(plan["indices"], np.int64)
            self._plan_w = None if plan["weights"] is None else _unportable(plan["weights"], np.float64)
        if self.method == "prune":
            self._losses = _unportable(state["losses"], np.float64)
            self._seen = _unportable(state["seen"], bool)
        self._counters = {k: int(v) for k, v in state["counters"].items()}
        self._selections = [dict(s) for s in state.get("selections", [])]
        self._load_pass_state(state, int(pos))
