"""Algorithm 1 (CREST) as an explicit state machine, driven through a small model interface.

The controller owns no model. An adapter gives it exactly these operations (:class:`ModelOps`):

* ``outputs(indices)`` -> eval-mode logits ``(len(indices), C)`` (and, when the config asks for
  embeddings, ``outputs(indices, embeddings=True)`` -> ``(logits, penultimate (len, h))``);
* ``params()`` -> a *copy* of the flat parameter vector (D,);
* ``gradient(indices, weights)`` -> ``(loss, flat gradient)`` of the weighted mean loss
  ``mean(w_i * l_i)`` at the current parameters;
* ``hutchinson(indices, weights, seed)`` -> one probe ``z * (H z)`` with ``z`` Rademacher drawn from
  ``seed`` and ``H`` the Hessian of that weighted loss.

Indices handed to the adapter are host NumPy int64 arrays; vectors stay in the adapter's namespace.

The loop, per training step: ``state, batch = crest_next_batch(state, ops, config)``; train one step on
``batch.indices`` with ``batch.weights``; optionally ``state = crest_observe(state, idx, losses)``
with the per-example training losses (feeds the drop policy). Inside ``crest_next_batch``:

1. Selection (when due): P class-stratified random subsets of r from the pool; one forward over
   their union; last-layer gradient features; P mini-batch coresets of m by batched facility
   location; anchor ``w_a`` and the anchor loss ``L_R(w_a)`` from the same forward. (With
   ``coresets="just-in-time"`` only ``V_1`` is forwarded here, and coreset p is selected from ``V_p``
   at step p, at that step's parameters.)
2. Quadratic model at the anchor: gradient and Hutchinson curvature of the weighted coreset loss on
   ``fit_batches`` coresets, smoothed by EMAs.
3. The batch: coreset ``p`` in turn (weights the square roots of the cluster sizes, the default
   ``weights="tempered"``, or the cluster sizes, the paper's; scaled to mean 1), cycling if more steps
   than coresets pass before a reselection.
4. Every T1 steps: ``rho = |L_R(w) - F(w - w_a)| / L_R(w)``, L_R on the same random examples the
   anchor loss was measured on (V_1, or the union of the subsets with ``check_union``); if
   ``rho > tau``: reselect; the new anchor's curvature sets ``T1 <- ceil(h ||H_0|| / ||H_t||)`` at
   once and ``P <- min(ceil(b T1), P_cap)`` for the selection after it (as the release does: a selection
   draws the P set by the one before).
5. Every T2 steps (when dropping is on): examples whose recent losses all stayed below alpha leave
   the pool (see :mod:`crestcore.dropping`).

Every forward and backward the controller asks for is counted (in examples) in ``state.counters``.
The loss is cross-entropy (the features are its closed-form last-layer gradient).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field, replace
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import array_api_compat
import numpy as np

from ._compat import device_of, from_numpy, frozen_copy, namespace, namespace_name, once_per_array, to_numpy
from ._validation import (DivergenceError, all_finite, apportion, field_bool, field_choice, field_instance, field_int,
                          field_real, host_array, isdtype, masked_outputs_error, plain_fields, state_array,
                          user_stacklevel)
from .dropping import (DropConfig, DropState, _check_live, _undone_on_error, drop_init, drop_record, drop_resize,
                       drop_update, pool_size)
from .features import _gradient_features, _logits_cross_entropy, _shifted, cross_entropy, softmax
from .facility import OPTIMIZERS, _numba_host, on_host_device
from ._reference_kernels import draw_grouped, group_by_class
from .minibatch import (CLASS_BUDGETS, DenseMemoryError, _count_classes, _draw_rows, _floyd_draws, _pool_classes,
                        minibatch_coresets)
from .quadratic import (
    QuadraticConfig,
    QuadraticState,
    quadratic_anchor,
    curvature_norm,
    quadratic_init,
    quadratic_predict,
    quadratic_update,
)
from .similarity import KERNELS, METRICS, compute_dtype
from .trust import relative_error, should_reselect, update_schedule

__all__ = [
    "CrestConfig",
    "CrestState",
    "Batch",
    "ModelOps",
    "crest_init",
    "crest_next_batch",
    "crest_observe",
    "crest_parameters_changed",
    "crest_stats",
    "crest_state_dict",
    "crest_load_state_dict",
]


_LOSS_FLOOR = 1e-12
WEIGHTS = ("cluster", "uniform", "tempered")
RESELECT = ("trust", "epoch")
BATCHES = ("coreset", "shuffled-union")
CORESETS = ("at-anchor", "just-in-time")
CHECKS = ("every", "reuse")
CONFIG_BACKENDS = ("auto", "device", "numba", "reference")  # minibatch_coresets' three and "device"
# CrestConfig fields added since checkpoints were first saved whose value here (as its repr) is how a run
# saved before the field existed behaved: a loader resuming such a checkpoint with it counts no difference
# (max_age is not one: its default changed what a run does)
CONFIG_AS_BEFORE = {"checks": "'every'", "probe_size": "None", "probe_every": "1"}


@runtime_checkable
class ModelOps(Protocol):
    """What an adapter supplies (see the module docstring). Optionally it may also define
    ``coresets(features, labels, **kw)`` with :func:`crestcore.minibatch_coresets`'s signature and
    result; the controller then selects through it (the distributed adapter shards the problems so; the
    features and labels it gets are host NumPy arrays when the config's ``backend`` copies them there, as
    the default does for a model on a GPU; a ``host_selection`` attribute False keeps the default's solve on
    the device, as the distributed adapter's does with more than one process);
    ``gradient_and_hutchinson(indices, weights, seed)`` -> ``(loss, gradient, z * (H z))``, equal
    to the two calls, from one forward: the model fit then uses it; and ``new_anchor()``, called at
    every selection before its forward: an adapter that keeps the inputs of its measurement passes (the
    PyTorch adapter does, so that the checks see the anchor's inputs) forgets them there; and
    ``example_losses(logits, labels)`` -> the per-example training loss of those logits ``(k,)`` in
    their library, or ``None`` for cross-entropy: the anchor loss, the trust checks and the drop records
    then measure the loss the model is trained on (a class-weighted or label-smoothed cross-entropy);
    the selection's features stay the cross-entropy's logit gradients; and ``state_token(indices)`` -> a
    value that compares equal (``==``) between two calls when a measurement of ``indices`` would see
    the same inputs and nothing besides ``params()`` that the outputs depend on has changed in between
    (BatchNorm's running statistics, frozen weights), or None when it cannot tell: a trust check whose
    parameters, token and selection are the last check's then takes that check's measurement instead
    of a forward (a ``DataLoader`` with workers asks for several batches in a row at an epoch's start,
    before the first of them trains). Without it every check measures.

    Examples
    --------
    ``_SoftmaxOps`` of this module is softmax regression ``z = x W`` on NumPy data, written as the four
    operations (each method's example below shows its formula; the PyTorch adapter,
    ``crestcore.adapters.torch.TorchModelOps``, does the same for any ``nn.Module``). One step with it:

    >>> import numpy as np
    >>> from crestcore import CrestConfig, crest_init, crest_next_batch
    >>> rng = np.random.default_rng(0)
    >>> y = np.arange(200) % 2
    >>> X = rng.normal(size=(200, 2)) + 2.0 * y[:, None]
    >>> ops = _SoftmaxOps(X, y, C=2)
    >>> config = CrestConfig(m=10)
    >>> state = crest_init(config, y, seed=0)
    >>> state, batch = crest_next_batch(state, ops, config)
    >>> batch.indices.shape, batch.reselected
    ((10,), True)
    """

    def outputs(self, indices: np.ndarray, embeddings: bool = False) -> Any:
        """Eval-mode logits ``(len(indices), C)`` of the examples ``indices`` (host int64); with
        ``embeddings=True`` the pair ``(logits, penultimate features (len(indices), h))``.

        Examples
        --------
        For softmax regression ``z = x W`` the logits are rows of ``X W``; the penultimate features are
        the inputs of the last (here the only) layer:

        >>> import numpy as np
        >>> X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> W = np.array([[2.0, 0.0], [0.0, 3.0]])
        >>> def outputs(indices, embeddings=False):
        ...     return (X[indices] @ W, X[indices]) if embeddings else X[indices] @ W
        >>> outputs(np.array([2, 0]))
        array([[2., 3.],
               [2., 0.]])
        """
        ...

    def params(self) -> Any:
        """A copy of the flat parameter vector (D,), in the model's namespace and on its device.

        Examples
        --------
        >>> import numpy as np
        >>> W = np.zeros((2, 3))
        >>> def params():
        ...     return W.ravel().copy()  # a copy: training must not change what the controller holds
        >>> anchor = params()
        >>> W += 1.0
        >>> anchor.shape, float(anchor.sum())
        ((6,), 0.0)
        """
        ...

    def gradient(self, indices: np.ndarray, weights: np.ndarray) -> tuple[float, Any]:
        """``(loss, flat gradient)`` of the weighted mean loss ``mean_i(w_i * l_i)`` over the examples
        ``indices`` at the current parameters; the gradient is shaped like :meth:`params` and in its dtype
        (``weights`` arrive as a float64 host array: cast them to the model's dtype first in a float32
        model, or the product comes out float64 and is refused). Measured as :meth:`outputs` measures (eval
        mode: no dropout, BatchNorm's running statistics), so the loss is the one the selection's forward saw:
        the controller compares the two and warns when the loss is about k times the forward's (a weighted sum
        of the k examples instead of the mean). ``indices`` may repeat an example (``batches="shuffled-union"``): each
        occurrence counts, with its own weight (``np.add.at``, not ``g[idx] += v``).

        Examples
        --------
        Softmax regression ``z = x W`` at ``W = 0``: every loss is ``log 2``:

        >>> import numpy as np
        >>> from crestcore import cross_entropy, softmax
        >>> X, y, W = np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([0, 1]), np.zeros((2, 2))
        >>> def gradient(indices, weights):
        ...     Xi, yi = X[indices], y[indices]
        ...     loss = float(np.mean(weights * cross_entropy(Xi @ W, yi)))
        ...     G = softmax(Xi @ W)
        ...     G[np.arange(len(yi)), yi] -= 1.0
        ...     return loss, (Xi.T @ (G * weights[:, None]) / len(yi)).ravel()
        >>> loss, grad = gradient(np.array([0, 1]), np.array([1.0, 1.0]))
        >>> round(loss, 4), grad
        (0.6931, array([-0.25,  0.25,  0.5 , -0.5 ]))
        """
        ...

    def hutchinson(self, indices: np.ndarray, weights: np.ndarray, seed: int) -> Any:
        """One Hutchinson probe ``z * (H z)``: ``z`` Rademacher (+-1) drawn from ``seed``, ``H`` the
        Hessian of the weighted mean loss of :meth:`gradient` (measured as it is); shaped like :meth:`params`.
        The probe must depend on ``seed`` alone (no other random state): a resumed run draws the same seeds
        and repeats the run's decisions exactly. ``z * (H z)``, not ``H z``: its mean over probes is the
        Hessian's diagonal.

        Examples
        --------
        For a loss whose Hessian is diagonal, one probe is exactly the diagonal (``z * z = 1``):

        >>> import numpy as np
        >>> H = np.diag([1.0, 2.0, 3.0])
        >>> def hutchinson(indices, weights, seed):
        ...     z = np.random.default_rng(seed).choice([-1.0, 1.0], size=3)
        ...     return z * (H @ z)
        >>> hutchinson(np.array([0, 1]), np.array([1.0, 1.0]), seed=7)
        array([1., 2., 3.])
        """
        ...


class _SoftmaxOps:
    """The examples' :class:`ModelOps`: softmax regression ``z = x W`` on NumPy inputs ``X`` (n, d) with
    integer labels ``y`` in ``[0, C)``, ``W`` (d, C) starting at zero; each operation is the formula
    its :class:`ModelOps` example shows."""

    def __init__(self, X: np.ndarray, y: np.ndarray, C: int) -> None:
        self.X, self.y, self.W = X, y, np.zeros((X.shape[1], C))

    def outputs(self, indices: np.ndarray, embeddings: bool = False) -> np.ndarray:
        return self.X[indices] @ self.W

    def params(self) -> np.ndarray:
        return self.W.ravel().copy()

    def gradient(self, indices: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray]:
        X, y = self.X[indices], self.y[indices]
        loss = float(np.mean(weights * cross_entropy(X @ self.W, y)))
        G = softmax(X @ self.W)
        G[np.arange(len(y)), y] -= 1.0
        return loss, (X.T @ (G * weights[:, None]) / len(y)).ravel()

    def hutchinson(self, indices: np.ndarray, weights: np.ndarray, seed: int) -> np.ndarray:
        X = self.X[indices]
        z = np.random.default_rng(seed).choice([-1.0, 1.0], size=self.W.size)
        P, A = softmax(X @ self.W), X @ z.reshape(self.W.shape)
        HA = P * A - P * np.sum(P * A, axis=1, keepdims=True)
        return z * (X.T @ (HA * weights[:, None]) / len(indices)).ravel()


@dataclass(frozen=True)
class CrestConfig:
    """Options of CREST. Defaults are the intended algorithm; :meth:`release` gives the release's.

    m : mini-batch (coreset) size. r : random subset size (default ``max(C ceil(0.01 n / C), 4 m)``, C the
    number of classes the labels hold, at most the pool). P : coresets per selection at the start (release
    5). T1 : steps between checks at the start (release 1). tau : trust threshold (release 0.1). h, b :
    multipliers of the T1 and P updates (release 1 and 5); every selection after the first sets
    ``T1 = ceil(h ||H_0|| / ||H_t||)`` from the curvature at its new anchor and ``P = ceil(b T1)`` for the
    next one. P_cap : most coresets per selection and longest check interval (default: one budgeted epoch
    of steps, the ``epoch_steps`` the loaders give :func:`crest_init`, as the release caps; bare,
    ``ceil(pool / m)``).
    fit_batches : coresets used to fit g and diag(H) at each anchor.
    probe_size : None (default: the whole coreset) or the number of a fitted coreset's examples, drawn at
        random from it (its weights kept), that the Hutchinson probe's Hessian-vector product is measured
        on; the gradient is always the whole coreset's. The probe's double backward costs about 2.6
        gradients on a small CNN on a CPU (the whole fit 3.6), and the curvature term is a small part of the
        model's prediction. Opt-in: 32 was level on Fashion-MNIST's validation split for 10 % less wall
        clock with a CNN, but 0.07 +- 0.06 points behind on one of five unseen pairs, and slower on MLPs
        (it takes two calls where the default makes one fused call; docs/benchmarks.md).
    probe_every : the curvature is probed at every ``probe_every``-th selection (and whenever the model
        starts anew: the first selection, new trainable parameters); the selections between fit the
        gradient alone and keep the curvature of the last probe (the model's prediction at a check then
        uses that anchor's diag(H), and the schedule's T1 and P come from that probe's norm(H): they stay what
        the last probed selection set, not re-measured at the new anchor). Default 1 (every selection). The
        probe's double backward is most of a fit's cost (about 2.6 of 3.6 gradients on a small CNN on a CPU).
        Opt-in: 4 was level on a CNN for 16 % less wall clock, but 0.37 +- 0.14 points behind on a 30-class
        long-tailed MLP, where checks fail often (docs/benchmarks.md).
    T2 : steps between drop decisions; None (default) turns dropping off. drop : the drop rule.
    quadratic : the loss model. kernel, metric, optimizer, per_class, class_budget : selection options
    (see :func:`crestcore.minibatch_coresets`). embeddings : select on last-linear-layer weight
    gradients (needs ``outputs(..., embeddings=True)``) instead of logit gradients.
    batches : "coreset" (coreset p is mini-batch p) or "shuffled-union" (the release: the P coresets
    concatenated, weights rescaled to mean 1 over them, shuffled into mini-batches of m; the P random
    subsets overlap, so an example two coresets picked appears twice, possibly in one mini-batch, as in
    the release).
    check_union : the trust check's loss L_R on the union of all P subsets (the release; its cost
    grows with P) instead of on the first random subset V_1 (r examples, an unbiased sample too).
    check_size : the number of examples of V_1, drawn at random at each selection, the trust check
    measures L_R on (the anchor loss is measured on the same examples); default 128; None: all of V_1
    (the paper's check, :meth:`paper`).
    coresets : None (default: "just-in-time" where it applies, with ``batches="coreset"`` and no
    ``check_union``, else "at-anchor"), "at-anchor" (all P coresets selected at the anchor, from one
    forward over the union of the P subsets; the paper and the release) or "just-in-time" (the P
    subsets are drawn at the anchor,
    but coreset p is selected from V_p only when step p of the selection needs it, at the parameters of
    that step, after the trust check allowed it: a selection that a failed check cuts short after k
    steps costs k forwards of r, not P; needs ``batches="coreset"`` and no ``check_union``).
    weights : "tempered" (default since 2026-12-02: the square roots of the cluster sizes), "cluster"
    (the cluster sizes, the paper's; ``paper()`` and ``release()``) or "uniform" (every pick weight 1);
    always rescaled to mean 1 over a batch (over the union with "shuffled-union"). No pick is ever
    dropped: batches of unequal length stay unequal. (Tempered weights were chosen on validation splits:
    ahead of the cluster sizes on clean labels and on MLPs with BatchNorm and Dropout, level on 40 %
    label noise, where uniform weights collapse; in an independent check on other data they trailed the
    cluster sizes on 20 % noisy labels in longer runs; docs/benchmarks.md.)
    checks : which steps the trust check runs at. "every" (default): any step, every T1 steps (the
        paper's rule). "reuse": every step still counts towards T1, but a due check waits for a step that
        trains on a coreset selected at earlier parameters. With just-in-time coresets a step whose
        coreset is selected at that step, from its own random subset, has nothing stale for the check to
        guard; a failed check there would start a new selection (new subsets, a new anchor, model fit and
        schedule) whose first coreset is selected at the same parameters. With at-anchor coresets (and so
        with ``batches="shuffled-union"`` or ``check_union``), and with ``reselect="epoch"``, the two rules
        are the same. Opt-in: cheaper (fewer checks and selections), level with "every" on Fashion-MNIST's
        validation split, but 0.13 +- 0.11 points behind on one of five unseen pairs (docs/benchmarks.md).
    reselect : "trust" (the rho_t check every T1 steps decides) or "epoch" (no checks and no model fit:
    P = one budgeted epoch of coresets, reselected every budgeted epoch, or P_cap of them every P_cap steps when
    P_cap is set; an ablation of the trust check).
    max_age : the most training steps one selection's coresets are trained on before a new selection,
        even when every trust check passes: "epoch" (default) one budgeted epoch of steps (the
        ``epoch_steps`` the loaders give :func:`crest_init`; bare, ``ceil(pool / m)``; ``P_cap`` does not
        change it, but with ``reselect="epoch"`` it is that mode's period, ``P_cap`` when set), a positive
        integer, or None (only the trust check and drops reselect: the paper's
        rule, :meth:`paper` and :meth:`release`). Without it a small learning rate, whose quadratic model
        stays trustworthy, kept cycling the first selection's P coresets for a whole run (5 batches, 4 %
        of the data, in a 220-step run). Like every reselection it waits for ``max_overhead`` to allow
        it: a cap too tight for any reselection keeps cycling the coresets made.
    max_overhead : None (no limit) or a positive fraction: the measurement passes CREST spends
    (selection forwards, model fits, checks; counted in forward-equivalents, a backward = 2 forwards)
    never exceed this fraction of the training passes (3 forward-equivalents per trained example) by
    more than the step that crosses it: one check, one selection, or a check and the selection its
    failure starts. A due check, epoch reselection or
    drop-triggered reselection waits until the count allows it; meanwhile the coresets are cycled. A
    reselection due by ``max_age`` or a drop comes before a check due at the same step (the check would
    measure the anchor it replaces, and spent first it left no room for the reselection, at every step). A
    check answered from the last check's measurement (unchanged parameters, ``ops.state_token``) counts as
    measured here (``counters["reused_examples"]``), so a run resumed from a checkpoint decides as the
    uninterrupted one. Not capped: the selection that new trainable parameters start
    (:func:`crest_parameters_changed`, a layer frozen or unfrozen), since the quadratic model of the old
    ones cannot check anything.
    Deterministic: counts, not clocks. With just-in-time coresets (the default) each later coreset's
    forward must fit under the cap too, so a cap too tight for it keeps cycling the coresets made so far
    (at the extreme the first one, for a whole short run); with a tight cap prefer
    ``coresets="at-anchor"``, whose selection makes all P at once (its one forward over the union of the P
    subsets can cross a tight cap by that much: at a very tight cap by more than the cap itself).
    backend : where the selection solves. "auto" (the default): CPU features on their own library's
    kernels (CPU torch tensors on the torch kernels, which start no Numba); features on a device (a GPU)
    copied to the host's Numba kernels when Numba imports (P x r x C numbers, tens of kilobytes a
    selection, C x h columns a row with embeddings of width h; where the picks go anyway: on one H200, E1's
    selection path took 2.2 against 5.8 ms a call on the CUDA kernels, and CREST's run 5.2 against 8.6 s;
    docs/benchmarks.md, "On a GPU, second lease"), else on the device's kernels. "device": always the
    features' own library's kernels, where they are (CUDA tensors on the CUDA kernels). "numba": always the
    Numba kernels on the host (a long CPU run of a small model, with many hundreds of selections, repays
    Numba's one-off start of 0.5-0.9 s by 1-3 ms a selection). "reference": the generic array-API code.
    Features copied to the host are NumPy arrays: an adapter's own ``coresets`` gets them so, and
    ``crestcore.adapters.distributed`` solves them whole on every rank (the unsharded fallback); with more
    than one process it keeps "auto"'s solve on the GPUs (the ranks would share the host's cores; untimed).

    Examples
    --------
    >>> config = CrestConfig(m=64, T2=20, drop=DropConfig(alpha=0.05))
    >>> config.m, config.P, config.tau, config.T2
    (64, 5, 0.1, 20)
    >>> CrestConfig(m=64, r=32)
    Traceback (most recent call last):
        ...
    ValueError: CrestConfig.r (32) must be >= m (64): ...
    """

    m: int = 128
    r: int | None = None
    P: int = 5
    T1: int = 1
    tau: float = 0.1
    h: float = 1.0
    b: float = 5.0
    P_cap: int | None = None
    fit_batches: int = 1
    probe_size: int | None = None
    probe_every: int = 1
    T2: int | None = None
    drop: DropConfig = field(default_factory=DropConfig)
    quadratic: QuadraticConfig = field(default_factory=QuadraticConfig)
    kernel: str = "max-minus"
    metric: str = "euclidean"
    optimizer: str = "lazy"
    per_class: bool = True
    class_budget: str = "proportional"
    embeddings: bool = False
    batches: str = "coreset"
    check_union: bool = False
    check_size: int | None = 128
    coresets: str | None = None
    weights: str = "tempered"
    reselect: str = "trust"
    checks: str = "every"
    max_age: int | str | None = "epoch"
    max_overhead: float | None = None
    backend: str = "auto"

    def __post_init__(self):
        # every field, at construction (issue 15): a bad config fails here, not at the first batch
        o = "CrestConfig"
        for name in ("m", "P", "T1", "fit_batches", "probe_every"):
            field_int(o, name, getattr(self, name))
        for name in ("r", "P_cap", "T2", "check_size", "probe_size"):
            field_int(o, name, getattr(self, name), optional=True)
        if self.r is not None and self.r < self.m:
            raise ValueError(f"CrestConfig.r ({self.r}) must be >= m ({self.m}): each coreset of m is picked "
                             f"from a random subset of r examples")
        for name in ("tau", "h", "b"):
            field_real(o, name, getattr(self, name), low=0.0, low_open=True)
        field_real(o, "max_overhead", self.max_overhead, low=0.0, low_open=True, optional=True)
        field_instance(o, "drop", self.drop, DropConfig)
        field_instance(o, "quadratic", self.quadratic, QuadraticConfig)
        field_choice(o, "kernel", self.kernel, KERNELS)
        field_choice(o, "metric", self.metric, METRICS)
        field_choice(o, "optimizer", self.optimizer, OPTIMIZERS)
        field_choice(o, "class_budget", self.class_budget, CLASS_BUDGETS)
        field_choice(o, "batches", self.batches, BATCHES)
        field_choice(o, "weights", self.weights, WEIGHTS)
        field_choice(o, "reselect", self.reselect, RESELECT)
        field_choice(o, "checks", self.checks, CHECKS)
        if isinstance(self.max_age, str) and self.max_age != "epoch":
            raise ValueError(f"CrestConfig.max_age must be 'epoch', a positive integer or None, got {self.max_age!r}")
        if self.max_age != "epoch":
            field_int(o, "max_age", self.max_age, optional=True)
        field_choice(o, "backend", self.backend, CONFIG_BACKENDS)
        if self.coresets is not None:  # None: the default, just in time wherever it applies (just_in_time)
            field_choice(o, "coresets", self.coresets, CORESETS)
        for name in ("per_class", "embeddings", "check_union"):
            field_bool(o, name, getattr(self, name))
        if self.T2 is None and _fields(self.drop) != _fields(DropConfig()):
            warnings.warn(f"CrestConfig: drop={self.drop!r} is set but T2 is None, so nothing is ever dropped: "
                          "set T2 (the steps between drop decisions) to turn dropping on",
                          stacklevel=user_stacklevel(skip=("dataclasses",)))
        if self.coresets == "just-in-time" and (self.batches != "coreset" or self.check_union):
            raise ValueError(
                f"CrestConfig.coresets='just-in-time' selects coreset p when step p needs it, so it needs "
                f"batches='coreset' (got {self.batches!r}) and check_union=False (got {self.check_union}): "
                "both use all P coresets or subsets at the anchor; set coresets='at-anchor' with them"
            )
        plain_fields(self)

    @property
    def just_in_time(self) -> bool:
        """Whether coreset p is selected when step p needs it: ``coresets="just-in-time"``, or the default
        (None) with ``batches="coreset"`` and no ``check_union``.

        Examples
        --------
        >>> CrestConfig(m=8).just_in_time, CrestConfig.paper(m=8).just_in_time
        (True, False)
        >>> CrestConfig(m=8, batches="shuffled-union").just_in_time  # the default falls back to at-anchor
        False
        """
        if self.coresets is not None:
            return self.coresets == "just-in-time"
        return self.batches == "coreset" and not self.check_union

    @classmethod
    def paper(cls, **overrides) -> CrestConfig:
        """Algorithm 1 as the paper states it, with its hyperparameters (P = 5, T1 = 1, tau = 0.1, h = 1,
        b = 5, cluster-size weights, the trust check, no overhead cap) and none of the release's bugs.
        Dropping learned examples (Algorithm 1's T2 and alpha) stays off, as in the defaults: pass
        ``T2=...`` (and ``drop=DropConfig(alpha=...)``) to turn it on.

        Examples
        --------
        >>> config = CrestConfig.paper(m=32)
        >>> config.m, config.P, config.T1, config.tau, config.weights
        (32, 5, 1, 0.1, 'cluster')
        """
        base: dict[str, Any] = dict(P=5, T1=1, tau=0.1, h=1.0, b=5.0, weights="cluster", reselect="trust", checks="every",
                                    max_age=None, max_overhead=None, kernel="max-minus", batches="coreset",
                                    quadratic=QuadraticConfig(), coresets="at-anchor", check_size=None)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def release(cls, **overrides) -> CrestConfig:
        """The design choices of the authors' release (docs/algorithm.md lists them), never its bugs.

        Examples
        --------
        >>> config = CrestConfig.release(m=128)
        >>> config.kernel, config.batches, config.quadratic.variant, config.check_union
        ('exp', 'shuffled-union', 'adahessian', True)
        """
        base: dict[str, Any] = dict(
            kernel="exp", class_budget="ceil", batches="shuffled-union",
            quadratic=QuadraticConfig(variant="adahessian"), check_union=True, coresets="at-anchor",
            check_size=None, max_age=None, weights="cluster", checks="every",
        )
        base.update(overrides)
        return cls(**base)


class Batch(NamedTuple):
    """The next mini-batch (:func:`crest_next_batch`): dataset ``indices``, per-example ``weights``
    (mean 1 over a coreset) and whether a new selection was made for it. Train one step on
    ``mean_i(weights_i * loss_i)`` over ``indices``.

    Examples
    --------
    >>> import numpy as np
    >>> from crestcore import cross_entropy
    >>> batch = Batch(np.array([4, 0, 2]), np.array([1.5, 0.5, 1.0]), reselected=False)
    >>> logits, labels = np.zeros((5, 2)), np.array([0, 1, 0, 1, 0])
    >>> losses = cross_entropy(logits[batch.indices], labels[batch.indices])
    >>> round(float(np.mean(batch.weights * losses)), 4)  # the loss the training step minimises
    0.6931
    """

    indices: np.ndarray  # (m,) int64 dataset indices
    weights: np.ndarray  # (m,) float64, mean 1 over a coreset
    reselected: bool  # a new selection was made for this batch


class CrestState(NamedTuple):
    """The whole controller state as plain data: labels and seed, the step and schedule (``T1``, ``P``),
    the coresets of the current selection, the anchor and the quadratic model, the drop policy's loss
    history, the cost ``counters`` and a ``log`` of selections, checks and drops (each an
    :class:`EventLog`, a sequence that reads like a list; ``list(...)`` of it, or :func:`crest_stats`, is
    plain data for JSON). Made by
    :func:`crest_init`; every controller function returns a new one. With dropping on (``T2``) the loss
    history is written in place, so a state passed to :func:`crest_next_batch` or :func:`crest_observe`
    is consumed by the call (using it again raises ``RuntimeError``): keep the returned state, and take
    a snapshot with :func:`crest_state_dict` before the call when one is needed. A call that raises
    (Ctrl-C, a divergence, an error of ``ops``) undoes the records it wrote, so the state passed in stays
    usable: saved, or passed again once the cause is fixed. Saved and restored with
    :func:`crest_state_dict` / :func:`crest_load_state_dict`.

    Examples
    --------
    >>> import numpy as np
    >>> state = crest_init(CrestConfig(m=4), np.array([0, 1, 0, 1, 1, 0, 1, 0]), seed=0)
    >>> state.step, state.T1, state.P, state.n_classes, state.need_select
    (0, 1, 5, 2, True)
    >>> state.counters["selections"], state.log["checks"]
    (0, [])
    """

    seed: int
    labels: np.ndarray  # (n,) int64 host
    n_classes: int
    step: int  # training steps completed
    since_check: int
    T1: int
    P: int
    need_select: bool
    want_select: bool  # the pool changed (a drop): reselect as soon as max_overhead allows
    pending: bool  # a batch was handed out and not yet accounted
    n_selections: int
    cursor: int
    batch_idx: np.ndarray  # (nb, m) int64
    batch_w: np.ndarray  # (nb, m) float64
    made: int  # rows of batch_idx selected so far (the rest wait for coresets="just-in-time")
    subsets: np.ndarray  # (nb, r) int64: a format-3 state's random subsets (kept for "just-in-time"); else (0, 0)
    check_idx: np.ndarray  # (u,) int64 sorted: the examples the trust check's L_R is measured on
    anchor: Any  # flat params at the anchor (adapter namespace) or None
    quad: QuadraticState | None
    h_norm_0: float
    h_norm_t: float
    drop: DropState
    counters: dict
    epoch_steps: int  # steps of one budgeted epoch (the cap of P and T1); 0: unknown
    log: dict  # EventLogs: selections (steps), checks (step, rho, L_R, F), drops (step, count)
    # "just-in-time": how the selection's random subsets are drawn again when their step comes (see _subset_row):
    # {"pool": the pool (empty: every example), "r_c": each class's members per subset, "rng": the stream
    # before the subsets' draws}; None when every row is made (or a format-3 state holds them in subsets)
    draw: Any = None
    # the last trust check, to answer the next one without a forward when nothing it depends on changed
    # (see _check); held in memory only: crest_state_dict leaves it out, so a loaded state's first check
    # measures (in a run that trains, the parameters have moved since the last check anyway)
    last_check: Any = None


class EventLog(Sequence):
    """An append-only sequence of log records that states share: :meth:`appended` returns a log one record
    longer in O(1) and leaves this one as it was (a state keeps seeing its own records). The controller
    logs a record at every trust check, so copying the list instead made a long run quadratic. Reads
    like a list (``len``, indexing, slicing to a list, iteration) and compares equal to the list of its
    records.

    Examples
    --------
    >>> a = EventLog()
    >>> b = a.appended(3)
    >>> c = b.appended(4)
    >>> d = b.appended(5)  # b's records are shared; d takes its own copy
    >>> list(a), b, c, d, c[-1], len(d)
    ([], [3], [3, 4], [3, 5], 4, 2)
    """

    __slots__ = ("_items", "_n")

    def __init__(self, records=()):
        self._items = list(records)
        self._n = len(self._items)

    @classmethod
    def _view(cls, items: list, n: int) -> EventLog:
        log = cls.__new__(cls)
        log._items, log._n = items, n
        return log

    def appended(self, record) -> EventLog:
        """This log with ``record`` added at the end (this log is unchanged)."""
        if self._n == len(self._items):  # the newest view of the shared list: extend it in place
            self._items.append(record)
            return EventLog._view(self._items, self._n + 1)
        return EventLog._view(self._items[: self._n] + [record], self._n + 1)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._items[: self._n][i]
        if not -self._n <= i < self._n:
            raise IndexError("log index out of range")
        return self._items[i if i >= 0 else self._n + i]

    def __iter__(self):
        return iter(self._items[: self._n])  # a copy: records appended meanwhile are not this log's

    def __eq__(self, other) -> bool:
        if isinstance(other, (EventLog, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(list(self))


def _logged(state: CrestState, key: str, record) -> dict:
    """``state.log`` with ``record`` appended to ``key`` (O(1); ``state`` keeps its own log)."""
    return {**state.log, key: state.log[key].appended(record)}


def _counters():
    return {"train_steps": 0, "train_examples": 0, "forward_examples": 0, "backward_examples": 0,
            "selections": 0, "checks": 0, "reused_examples": 0}


# counters added since states were first saved, with the value a state saved before them holds
_COUNTERS_ADDED = {"reused_examples": 0}


def crest_init(config: CrestConfig, labels, *, seed: int, epoch_steps: int | None = None) -> CrestState:
    """A fresh controller for a dataset with integer ``labels`` (n,) (any array library).

    ``epoch_steps``: training steps in one epoch of the budgeted run (``budget * ceil(n / m)`` rounded half
    up, :func:`crestcore.plan.budget_steps`, what the loaders pass). It caps the number of coresets per
    selection and the check interval, as the release caps them, unless ``config.P_cap`` is set; without
    either the cap is one virtual epoch of the pool, ``ceil(pool / m)``.

    Examples
    --------
    >>> import numpy as np
    >>> labels = np.arange(1000) % 10
    >>> state = crest_init(CrestConfig(m=32), labels, seed=0, epoch_steps=4)
    >>> state.n_classes, state.epoch_steps, int(state.drop.active.sum())
    (10, 4, 1000)
    >>> crest_init(CrestConfig(m=32), np.zeros(100, dtype=int), seed=0)
    Traceback (most recent call last):
        ...
    ValueError: labels hold a single class: a classifier needs at least two
    """
    if not isinstance(config, CrestConfig):
        raise TypeError(f"crest_init: config must be a CrestConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        # (below 2^64: a checkpoint stores it as an integer array, review 89)
        raise ValueError(f"seed must be a non-negative integer below 2**64, got {seed!r}")
    if epoch_steps is not None and (
        isinstance(epoch_steps, bool) or not isinstance(epoch_steps, (int, np.integer)) or epoch_steps < 1
    ):
        raise ValueError(f"epoch_steps must be a positive integer or None, got {epoch_steps!r}")
    lab = np.asarray(to_numpy(labels))
    if lab.ndim != 1 or lab.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"labels must have an integer dtype, got {lab.dtype}")
    if int(lab.min()) < 0:
        raise ValueError("labels must be non-negative class indices")
    if int(lab.max()) > np.iinfo(np.int64).max:  # uint64 beyond int64: would wrap to negative classes
        raise ValueError(f"labels must be class indices, got {int(lab.max())}")
    lab = frozen_copy(lab.astype(np.int64))  # read-only: a state's labels never change (once_per_array)
    C = int(lab.max()) + 1
    if np.unique(lab).size < 2:
        raise ValueError("labels hold a single class: a classifier needs at least two")
    n = lab.size
    if config.m > n:
        raise ValueError(f"m ({config.m}) exceeds the number of examples ({n})")
    return CrestState(
        seed=int(seed), labels=lab, n_classes=C, step=0, since_check=0, T1=config.T1, P=config.P,
        need_select=True, want_select=False, pending=False, n_selections=0, cursor=0,
        batch_idx=np.zeros((0, config.m), dtype=np.int64), batch_w=np.zeros((0, config.m)), made=0,
        subsets=np.zeros((0, 0), dtype=np.int64), check_idx=np.zeros(0, dtype=np.int64), anchor=None, quad=None,
        h_norm_0=math.nan, h_norm_t=math.nan, counters=_counters(),
        drop=drop_init(n, config.drop, history=None if config.T2 else 0),  # no loss history without dropping
        epoch_steps=int(epoch_steps or 0), log={"selections": EventLog(), "checks": EventLog(), "drops": EventLog()},
    )


def _subset_size(config: CrestConfig, pool: int, labels: np.ndarray) -> int:
    """``config.r``, else ``max(C ceil(0.01 pool / C), 4 m)`` with C the number of classes the labels hold
    (not the largest label + 1: ids such as {3, 7, 100} or 10 classes of a 1000-way label space would
    otherwise round r up to a multiple of the id range); at most the pool."""
    if config.r is not None:
        return int(min(config.r, pool))
    C = once_per_array("classes", labels, _count_classes)  # read-only labels: counted once
    return int(min(max(C * math.ceil(0.01 * pool / C), 4 * config.m), pool))


def _labels_in(xp, lab_host, like):
    return from_numpy(lab_host, xp, device_of(like))


def _forward(state: CrestState, ops, idx: np.ndarray, config: CrestConfig):
    # the ops get copies of the host arrays the controller keeps (here and in the model fit): an ops that wrote
    # the indices it was given changed the controller's own records (the check's examples, a coreset), or
    # failed far from the write (review 127); read-only views made torch warn at every from_numpy
    mine = idx.copy()
    out = ops.outputs(mine, embeddings=True) if config.embeddings else ops.outputs(mine)
    if config.embeddings and not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError("CrestConfig(embeddings=True) needs outputs(indices, embeddings=True) to return the "
                         f"pair (logits, embeddings); the adapter returned {type(out).__name__}")
    logits, emb = (out if config.embeddings else (out, None))
    # (embeddings of another library than the logits: said, not an AttributeError on their dtype: review 178)
    xp = namespace(logits, emb, names=("outputs", "embeddings"))
    if logits.ndim != 2 or logits.shape[0] != idx.size:
        raise ValueError(f"outputs returned shape {tuple(logits.shape)} for {idx.size} indices")
    # (an integer array failed deep in the features: review 127; NumPy's bfloat16 from ml_dtypes, which NumPy does
    # not count as floating, is widened below like any half-precision output: review 128)
    if not (isdtype(xp, logits.dtype, "real floating") or getattr(logits.dtype, "name", "") == "bfloat16"):
        raise TypeError(f"outputs must return real floating logits, got dtype {logits.dtype}")
    if not all_finite(xp, logits):
        if not bool(xp.any(xp.isnan(logits) | (logits == math.inf))):
            raise masked_outputs_error(int(xp.sum(xp.astype(xp.any(logits == -math.inf, axis=1), xp.int64))),
                                       idx.size)
        raise DivergenceError(
            f"CREST: the model's outputs are NaN or infinite at step {state.step}: training has diverged. "
            "Lower the learning rate or clip the gradients.")
    # half-precision outputs (an adapter of the user's under autocast) are widened to float32, as the gradient
    # and the curvature are: a bfloat16 log-sum-exp rounds every loss below about 2e-3 to 0, and the trust
    # check then compared a zero loss with a non-zero prediction (review 83)
    wide = compute_dtype(xp, logits.dtype)
    if wide != logits.dtype:
        logits = xp.astype(logits, wide)
    if emb is not None and compute_dtype(xp, emb.dtype) != emb.dtype:
        emb = xp.astype(emb, compute_dtype(xp, emb.dtype))
    lab = state.labels[idx]
    top = int(lab.max()) if idx.size else -1
    if top >= logits.shape[1]:
        raise ValueError(
            f"the labels hold class {top} but the model gives {logits.shape[1]} outputs: CREST's labels (labels= "
            "if you gave them, else what the adapter found: a torch dataset's `targets`, the `y` given to Keras's "
            f"callback) must be the class indices 0..{logits.shape[1] - 1} the model is trained on. If the targets "
            "the model trains on hold that class too (classes numbered from 1, say), the model cannot represent it: "
            f"remap them to 0..C-1 or give the model {top + 1} outputs; labels= only changes what CREST measures")
    y = _labels_in(xp, lab, logits)
    own = getattr(ops, "example_losses", None)
    losses = own(logits, y) if own is not None else None
    exps = None
    if losses is None:  # (the logits and labels checked above: finite, the labels in range)
        shifted = _shifted(xp, logits)
        losses = _logits_cross_entropy(xp, logits, y, shifted)
        exps = shifted[1]  # (kept for the features, whose softmax starts from them too)
        del shifted
    elif tuple(losses.shape) != (idx.size,) or namespace(losses, names=("example_losses",)) is not xp:
        raise ValueError(f"example_losses must return ({idx.size},) per-example losses in the logits' library, "
                         f"got {type(losses).__name__} of shape {tuple(getattr(losses, 'shape', ()))}")
    if not all_finite(xp, losses):
        if own is not None:  # the adapter's (the user's) loss: it may fail on finite logits by itself
            raise DivergenceError(
                f"CREST: the per-example losses of the adapter's example_losses (the loss_fn you gave) are NaN "
                f"or infinite at step {state.step}, on finite logits: check that loss function on these "
                "logits and labels; if training has diverged, lower the learning rate or clip the gradients.")
        raise DivergenceError(  # finite logits too large for their dtype's log-sum-exp
            f"CREST: the model's loss is not finite at step {state.step} (its logits are finite but "
            "exploding): training has diverged. Lower the learning rate or clip the gradients."
        )
    return xp, logits, emb, y, losses, exps


def _epoch(state: CrestState, config: CrestConfig) -> int:
    """One budgeted epoch of steps (the ``epoch_steps`` the loaders give), else one virtual epoch of the
    pool."""
    if state.epoch_steps:
        return int(state.epoch_steps)
    return max(1, math.ceil(pool_size(state.drop) / config.m))


def _cap(state: CrestState, config: CrestConfig) -> int:
    """Most coresets per selection and longest check interval: ``P_cap``, else one epoch (:func:`_epoch`,
    as the release caps)."""
    return int(config.P_cap) if config.P_cap is not None else _epoch(state, config)


def _max_age(state: CrestState, config: CrestConfig) -> int:
    """The most steps on one selection's coresets (``max_age``; "epoch": :func:`_epoch`, not ``P_cap``, but
    with ``reselect="epoch"`` that mode's own period, :func:`_cap`: ``P_cap`` coresets every ``P_cap``
    steps, as documented, not a selection every epoch whose later coresets are never trained)."""
    age = config.max_age
    assert age is not None, "max_age=None sets no bound"
    if isinstance(age, str):
        return _cap(state, config) if config.reselect == "epoch" else _epoch(state, config)
    return int(age)


def _transform_weights(w: np.ndarray, valid: np.ndarray, rule: str) -> np.ndarray:
    """Cluster-size weights -> the configured weights (before normalisation); padding stays 0."""
    if rule == "uniform":
        return valid.astype(np.float64)
    if rule == "tempered":
        return np.sqrt(np.maximum(w, 0.0)) * valid
    return w * valid


def _pack(rows_i: list, rows_w: list) -> tuple[np.ndarray, np.ndarray]:
    """Ragged batches -> (nb, width) arrays padded with index -1 and weight 0 (no pick is dropped)."""
    width = max(1, max(r.size for r in rows_i))
    bi = np.full((len(rows_i), width), -1, dtype=np.int64)
    bw = np.zeros((len(rows_i), width), dtype=np.float64)
    for p, (ri, rw) in enumerate(zip(rows_i, rows_w)):
        bi[p, : ri.size] = ri
        bw[p, : rw.size] = rw
    return bi, bw


def _row(state: CrestState, b: int) -> tuple[np.ndarray, np.ndarray]:
    keep = state.batch_idx[b] >= 0
    return state.batch_idx[b][keep], state.batch_w[b][keep]


_WORD = (1 << 64) - 1


def _stream_words(gen: np.random.Generator) -> np.ndarray:
    """The state of ``gen`` (PCG64, as ``default_rng`` makes) as 6 int64 words: the 128-bit state and
    increment, and the buffered 32-bit half (plain integers: any checkpoint format stores them)."""
    st = gen.bit_generator.state
    if st.get("bit_generator") != "PCG64":  # pragma: no cover - the controller's generators are default_rng's
        raise RuntimeError(f"expected a PCG64 stream, got {st.get('bit_generator')}")
    x, inc = int(st["state"]["state"]), int(st["state"]["inc"])
    words = [x >> 64, x & _WORD, inc >> 64, inc & _WORD, int(st["has_uint32"]), int(st["uinteger"])]
    return np.array(words, dtype=np.uint64).view(np.int64)


def _skip_draws(bits, k: int) -> None:
    """Move the PCG64 ``bits`` past ``k`` 64-bit draws (``k`` uniform doubles) as drawing them would: its
    buffered 32-bit half stays (``advance`` clears it; doubles never use it)."""
    before = bits.state
    bits.advance(int(k))
    after = bits.state
    after["has_uint32"], after["uinteger"] = before["has_uint32"], before["uinteger"]
    bits.state = after


def _stream_at(words: np.ndarray, skip: int) -> np.random.Generator:
    """The generator :func:`_stream_words` saved, ``skip`` draws on."""
    w = [int(v) for v in np.asarray(words, dtype=np.int64).view(np.uint64)]
    bits = np.random.PCG64()
    bits.state = {"bit_generator": "PCG64", "state": {"state": (w[0] << 64) | w[1], "inc": (w[2] << 64) | w[3]},
                  "has_uint32": w[4], "uinteger": w[5]}
    if skip:
        _skip_draws(bits, skip)
    return np.random.Generator(bits)


def _selection_subsets(labels: np.ndarray, pool: np.ndarray, r: int, P: int, now: int,
                       gen: np.random.Generator) -> tuple[np.ndarray, dict | None]:
    """The selection's P class-stratified random subsets of r from ``pool`` (:func:`crestcore.draw_subsets`
    without its checks of the pool, ``flatnonzero`` of the active mask), of which only the first ``now``
    rows are drawn: ``(rows (now, r), recipe)``, the recipe (None when ``now == P``) drawing row p later,
    when its just-in-time coreset is made (:func:`_subset_row`). ``gen`` ends where drawing all P rows
    would leave it, so the selection's other draws, and the rows, are those of the eager draw; the state
    then holds O(n) for the subsets, not P x r (with P up to a budgeted epoch of steps and r 1 % of the
    pool, the rows grew as n^2: 250 MB of a checkpoint at 10^6 examples, review 123)."""
    whole = pool.size == labels.size  # nothing dropped: the pool is every example
    cls, sizes = _pool_classes(labels, pool, whole)
    r_c, _ = apportion(r, sizes, gen)  # class c's expected share of every subset is its share of the pool
    recipe = None
    if now < P:
        recipe = {"pool": np.zeros(0, dtype=np.int64) if whole else pool.astype(np.int64),
                  "r_c": np.asarray(r_c, dtype=np.int64), "rng": frozen_copy(_stream_words(gen))}
    rows = np.sort(_draw_rows(pool, cls, sizes, r_c, gen, now), axis=1)
    if now < P:
        _skip_draws(gen.bit_generator, (P - now) * r)
    return rows, recipe


def _subset_row(state: CrestState, p: int) -> np.ndarray:
    """Random subset p (1, r) of the state's selection: a format-3 state's stored row, else drawn from its
    recipe (the same row the selection would have drawn with the others). The pool grouped by class is
    made once per selection (its recipe's stream words are a frozen array: once_per_array), so a row costs
    O(r log r), not a pass over the pool (17 ms a row at 10^6 examples)."""
    if state.draw is None:
        return state.subsets[p : p + 1]
    d = state.draw

    def grouped(_):
        whole = d["pool"].size == 0
        pool = np.arange(state.labels.size, dtype=np.int64) if whole else d["pool"]
        cls, sizes = _pool_classes(state.labels, pool, whole)
        return group_by_class(pool, cls, sizes.size), sizes

    members, sizes = once_per_array("subset rows", d["rng"], grouped)
    r_c = d["r_c"]
    draws = _floyd_draws(sizes, r_c, _stream_at(d["rng"], p * int(r_c.sum())), 1)
    return np.sort(draw_grouped(members, sizes, r_c, draws), axis=1)


def _union_positions(subsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct indices of ``subsets`` and each entry's position in them, from one stable sort
    (``np.unique`` followed by ``searchsorted`` gives the same; it took 0.49 ms against 0.03 ms for 10
    subsets of 600)."""
    flat = subsets.ravel()
    order = np.argsort(flat, kind="stable")
    s = flat[order]
    first = np.ones(s.size, dtype=bool)
    np.not_equal(s[1:], s[:-1], out=first[1:])
    pos = np.empty(flat.size, dtype=np.int64)
    pos[order] = np.cumsum(first) - 1
    return s[first], pos.reshape(subsets.shape)


def selection_on_host(backend: str, features_on_host: bool, auto_host: bool = True) -> bool:
    """Whether a selection with ``CrestConfig(backend=backend)`` copies its features to the host's Numba
    kernels: never when they are on the host already; with ``"numba"`` always; with ``"auto"`` when Numba
    imports and ``auto_host`` (an adapter's ``host_selection``: False under torch.distributed with more than
    one process, whose ranks would share the host's cores), otherwise the device's own kernels solve them;
    with ``"device"`` and ``"reference"`` never.

    Examples
    --------
    >>> selection_on_host("auto", features_on_host=True), selection_on_host("device", features_on_host=False)
    (False, False)
    >>> selection_on_host("numba", features_on_host=False)
    True
    """
    if features_on_host or backend in ("device", "reference"):
        return False
    if backend == "numba":
        return True
    if not auto_host:
        return False
    from .backends import backend_module

    return backend_module("numpy") is not None


def _coresets(state: CrestState, ops, config: CrestConfig, subsets: np.ndarray, gen: np.random.Generator):
    """One forward over the union of ``subsets`` (k, r) at the current parameters and a mini-batch
    coreset from each. Returns the forward's namespace, ``union`` (host, sorted), per-example ``losses``
    (over ``union``), and the picks as dataset indices ``idx`` (k, width; -1 padding), ``valid`` and
    the configured (not yet normalised) weights ``w``."""
    union, pos = _union_positions(subsets)
    xp, logits, emb, y, losses, exps = _forward(state, ops, union, config)
    feats = _gradient_features(xp, logits, y, emb, exps=exps)  # (the logits and labels checked by _forward)
    del exps
    # an adapter may shard the solve; otherwise the features' own library solves it (CPU tensors on the
    # torch kernels: a few ms slower per call than Numba at these shapes, but no Numba start-up, 0.5-0.9 s
    # once per process, which a short CPU run paid at its first selection)
    if selection_on_host(config.backend, on_host_device(feats), getattr(ops, "host_selection", True)):
        # a model on a device (a GPU) with the host's kernels: the features (P x r x C numbers, C x h a
        # row with embeddings) and labels come to the host, where the picks go anyway; an adapter's own
        # solve (ops.coresets) gets them there too
        feats, y = _numba_host(to_numpy(feats)), to_numpy(y)  # jax's bfloat16 as float32, as torch's comes
    solve = getattr(ops, "coresets", None) or minibatch_coresets
    try:
        cs = solve(
            feats, y, m=config.m, r=subsets.shape[1], P=subsets.shape[0], rng=gen, subsets=pos,
            per_class=config.per_class, kernel=config.kernel, metric=config.metric, optimizer=config.optimizer,
            class_budget=config.class_budget, backend="auto" if config.backend == "device" else config.backend,
        )
    except DenseMemoryError as exc:
        # the memory guard's advice names minibatch_coresets' arguments: say what a CREST user sets
        raise ValueError(
            f"CREST's selection from {subsets.shape[0]} random subset(s) of r = {subsets.shape[1]} examples does "
            f"not fit in memory ({exc}). Set a smaller CrestConfig(r=...) (each class's dense problem grows as "
            f"(r / C)^2; the default r is 1 % of the pool, at least 4 m) or, at the anchor, a smaller P"
        ) from exc
    loc = np.asarray(to_numpy(cs.indices))
    valid = loc >= 0
    raw = np.asarray(to_numpy(cs.weights), dtype=np.float64)
    _warn_copied_features(state, config, valid, raw)
    w = _transform_weights(raw, valid, config.weights)
    idx = np.where(valid, union[np.maximum(loc, 0)], -1)
    return xp, union, losses, idx, valid, w


def _warn_copied_features(state: CrestState, config: CrestConfig, valid: np.ndarray, weights: np.ndarray) -> None:
    """Warn (once: no counts in the text) when most picks of a selection carry weight 0, i.e. their features
    equal an earlier pick's: a last layer initialised to zero gives every example of a class the same logit
    gradient, and each coreset is then about one weighted example per class (review 109). Not for a
    just-in-time run's single first coreset: its next one is selected after a step has moved the layer (with
    ``fit_batches`` of 2 or more, the step-0 selection's later coresets are trained at the same layer: warned)."""
    if state.step == 0 and config.just_in_time and valid.shape[0] == 1:
        return
    picks = int(np.count_nonzero(valid))
    if picks < 4 or 2 * int(np.count_nonzero(valid & (weights == 0))) <= picks:
        return
    fix = ("CrestConfig(embeddings=True) selects on the last layer's weight gradients, which tell such examples "
           "apart by their penultimate features" if not config.embeddings else
           "with embeddings=True the examples' penultimate features are the same too")
    warnings.warn(
        "CREST: most picks of this selection carry weight 0: their selection features equal earlier picks', so "
        "each coreset trains on a few weighted examples per class. Where the data hold that few distinct "
        "examples, this is the right coreset; otherwise the features do not tell the examples apart, as at a last "
        "layer initialised to zero (every example of a class has the same logit gradient until training moves "
        "it): " + fix,
        RuntimeWarning, stacklevel=user_stacklevel())


def _coreset_rows(idx: np.ndarray, valid: np.ndarray, w: np.ndarray) -> tuple[list, list]:
    """Coreset p is batch p, its weights scaled to mean 1 over its picks."""
    rows_i = [idx[p][valid[p]] for p in range(idx.shape[0])]
    rows_w = [w[p][valid[p]] for p in range(idx.shape[0])]
    return rows_i, [rw * rw.size / max(rw.sum(), 1e-300) for rw in rows_w]


def _select(state: CrestState, ops, config: CrestConfig, reason: str) -> CrestState:
    """A selection. ``reason``: "first", "check" (a failed trust check), "epoch" (the fixed interval of
    ``reselect="epoch"``), "drop" (the pool shrank) or "age" (``max_age`` steps on one selection)."""
    gen = np.random.default_rng([state.seed, state.n_selections])
    fresh = getattr(ops, "new_anchor", None)
    if fresh is not None:  # the inputs kept for the last anchor's measurements are not this one's
        fresh()
    pool = np.flatnonzero(state.drop.active)
    if pool.size < config.m:
        raise ValueError(f"the pool has {pool.size} examples, fewer than m={config.m}")
    cap = _cap(state, config)
    r = _subset_size(config, pool.size, state.labels)
    P = cap if config.reselect == "epoch" else min(state.P, cap)
    P = max(1, P)
    jit = config.just_in_time
    # "just-in-time": the coresets the quadratic model is fitted on now, the rest when their step comes
    now = max(1, min(config.fit_batches, P)) if jit else P
    subsets, recipe = _selection_subsets(state.labels, pool, r, P, now, gen)
    if not jit and P > 1 and r >= pool.size:
        warnings.warn(  # no counts in the text: said once, not again at every size the pool shrinks to
            "CREST's random subsets are the whole pool (r is at least the pool's size): every subset of a "
            "selection is the pool, so its P at-anchor coresets are selected from the same examples at the same "
            "parameters and differ only where the class budgets' random rounding or a stochastic optimizer makes "
            "them (with fixed budgets and the lazy greedy they are one coreset, trained P times). Pass "
            "CrestConfig(r=...) well below the pool, or use the default just-in-time coresets (selected at each "
            "step's own parameters); on data this small, training on all of it costs little",
            stacklevel=user_stacklevel())
    # the classes of all labels (counted once per labels array) bound the pool's: the pool is counted only
    # where r is below twice that
    if config.per_class and r < 2 * once_per_array("classes", state.labels, _count_classes):
        classes = _count_classes(state.labels[pool])
        if classes > 1 and r < 2 * classes:
            # (the default r is max(C, 4 m) where the pool holds at most 100 examples a class: many classes and
            # a small m land here by default)
            fix = ("CrestConfig(per_class=False) (one problem per subset, across classes; the pool itself "
                   "holds fewer than two examples a class)" if pool.size < 2 * classes else
                   "CrestConfig(r=...) with several examples per class, or CrestConfig(per_class=False) (one "
                   "problem per subset, across classes),")
            warnings.warn(  # said once (Python's default filter): no counts in the text, which change as the pool shrinks
                "CREST's random subsets hold fewer than two examples of each class on average (r below twice the "
                "number of classes in the pool): the per-class facility-location problems leave (almost) "
                "nothing to choose, every pick being its class's only member, so the coresets are a random "
                f"sample at the cost of a forward over every subset. {fix} lets the greedy choose, but is no "
                "sure gain: on 100 synthetic classes with m = 32 both trained 1-8 points below this random sample "
                "(3 seeds); compare them on a validation split, or train on a random subset "
                "re-drawn every epoch, which is what this is without the forwards",
                stacklevel=user_stacklevel())
    xp, union, losses, idx, valid, w = _coresets(state, ops, config, subsets, gen)
    if config.batches == "coreset":
        rows_i, rows_w = _coreset_rows(idx, valid, w)
    else:  # the release: union of the coresets, mean-1 weights over it, shuffled into batches of ~m
        flat_i, flat_w = idx[valid], w[valid]
        flat_w = flat_w * flat_w.size / max(flat_w.sum(), 1e-300)
        perm = gen.permutation(flat_i.size)
        parts = np.array_split(perm, max(1, int(round(flat_i.size / config.m))))
        rows_i = [flat_i[q] for q in parts]
        rows_w = [flat_w[q] for q in parts]
    made = len(rows_i)
    if jit:  # rows still to be selected: padding only, until their step
        rows_i += [np.zeros(0, dtype=np.int64)] * (P - now)
        rows_w += [np.zeros(0)] * (P - now)
    batch_idx, batch_w = _pack(rows_i, rows_w)
    check_idx = union if config.check_union else subsets[0]
    if config.check_size is not None and config.check_size < check_idx.size:
        check_idx = np.sort(gen.choice(check_idx, size=config.check_size, replace=False))
    on_check = from_numpy(np.searchsorted(union, check_idx), xp, device_of(losses))
    anchor_loss = float(to_numpy(xp.mean(xp.take(losses, on_check, axis=0))))
    if not math.isfinite(anchor_loss):
        raise DivergenceError(
            f"CREST: the anchor loss is not finite at step {state.step}: training has diverged. Lower the "
            "learning rate or clip the gradients."
        )

    # quadratic model at the anchor
    anchor = ops.params()
    _finite_params(anchor, state.step, "selection (the new anchor)")
    # the trainable parameters changed since the last anchor (a layer unfrozen or frozen between fits, with
    # a selection, not a check, the first step after it): a new model on the new parameters, its curvature
    # the schedule's new reference, as _check starts one
    resized = state.anchor is not None and anchor.shape != state.anchor.shape
    prev = state.quad if state.quad is not None and not resized else None
    quad = quadratic_anchor(prev if prev is not None else quadratic_init(anchor), anchor_loss, config.quadratic)
    c = dict(state.counters)
    c["forward_examples"] += int(union.size)
    fused = getattr(ops, "gradient_and_hutchinson", None)
    # the curvature is probed at every probe_every-th selection, and whenever the model starts anew; the
    # selections between keep the last probed curvature (the hutchinson variant's anchor restarted it)
    probe = prev is None or prev.n_h == 0 or state.counters["selections"] % config.probe_every == 0
    if prev is not None and not probe:
        quad = quad._replace(h_ema=prev.h_ema, n_h=prev.n_h)
    # reselect="epoch" never checks, so the model (and its schedule, fixed at the cap) is not fitted
    fit_losses = None  # the forward's losses on the host, for the fits' loss check (read once, if a fit runs)
    for p in range(min(config.fit_batches, made) if config.reselect != "epoch" else 0):
        bi, bw = rows_i[p].copy(), rows_w[p].copy()  # the ops' copies, as _forward's
        seed = int(gen.integers(2**31 - 1))
        k = config.probe_size
        names = ("gradient", "hutchinson")
        if not probe:  # the gradient alone: the curvature average stays as it is
            fit_loss, g = _returned(_method(ops, "gradient")(bi, bw), "gradient", 2, _GRADIENT)
            zhz = None
            c["forward_examples"] += bi.size
            c["backward_examples"] += bi.size
        elif k is not None and k < bi.size:  # the gradient on the coreset, the probe on k of its examples
            fit_loss, g = _returned(_method(ops, "gradient")(bi, bw), "gradient", 2, _GRADIENT)
            part = np.sort(np.random.default_rng([seed, 1]).choice(bi.size, size=k, replace=False))
            # mean(w l) over a uniform sample estimates the coreset's without bias
            zhz = _present(_method(ops, "hutchinson")(bi[part], bw[part], seed), "hutchinson", _PROBE)
            c["forward_examples"] += bi.size + k
            c["backward_examples"] += bi.size + 2 * k
        elif fused is not None:  # one forward; the probe's first backward gives the gradient
            fit_loss, g, zhz = _returned(fused(bi, bw, seed), "gradient_and_hutchinson", 3,
                                "(loss, flat gradient, probe z * (H z)), vectors like params()")
            names = ("gradient_and_hutchinson",) * 2
            c["forward_examples"] += bi.size
            c["backward_examples"] += 2 * bi.size
        else:  # gradient: one forward + one backward; Hessian-vector product: its own forward and a double backward
            fit_loss, g = _returned(_method(ops, "gradient")(bi, bw), "gradient", 2, _GRADIENT)
            zhz = _present(_method(ops, "hutchinson")(bi, bw, seed), "hutchinson", _PROBE)
            c["forward_examples"] += 2 * bi.size
            c["backward_examples"] += 3 * bi.size
        if fit_losses is None:
            fit_losses = np.asarray(to_numpy(losses), dtype=np.float64)
        _check_fit_loss(fit_loss, rows_i[p], rows_w[p], union, fit_losses, names[0])  # (the controller's own)
        try:
            quad = quadratic_update(quad, g, zhz, config.quadratic)
        except DivergenceError:
            raise
        except (TypeError, ValueError) as e:
            raise type(e)(f"CREST's model fit: the gradient ('grad') is ops.{names[0]}'s, the probe ('zhz') "
                          f"ops.{names[1]}'s; both must be flat vectors like ops.params() (its length and "
                          f"dtype: cast float64 weights to the parameters' dtype): {e}") from e
        _check_fit_gradient(g, fit_loss, names[0])  # (after the update has checked g: a vector like params())
    h_norm = curvature_norm(quad, config.quadratic)
    # The schedule (Algorithm 1: T1 <- h ||H_0|| / ||H_t||, P <- b T1) is set from the curvature measured
    # at the new anchor, as the release does; the first selection measures ||H_0|| and keeps T1 and P.
    first = math.isnan(state.h_norm_0) or resized
    h0 = h_norm if first else state.h_norm_0
    if config.reselect == "epoch":
        T1, P_next = cap, cap
    elif first:
        T1, P_next = min(state.T1, cap), state.P
    elif h0 == 0.0 and h_norm == 0.0:  # no curvature information at all: keep the schedule
        T1, P_next = min(state.T1, cap), state.P
    else:
        T1, P_next = update_schedule(h0, h_norm, h=config.h, b=config.b, cap=cap)
    c["selections"] += 1
    log = _logged(state, "selections", state.step)
    # last, after everything that can raise: a record consumes state.drop (see crestcore.dropping)
    drop = drop_record(state.drop, union, to_numpy(losses), state.step) if config.T2 else state.drop
    return state._replace(
        need_select=False, want_select=False, n_selections=state.n_selections + 1, cursor=0,
        since_check=state.since_check if reason == "drop" else 0, T1=T1, P=P_next,
        batch_idx=batch_idx, batch_w=batch_w, made=made,
        subsets=np.zeros((0, 0), dtype=np.int64), draw=recipe, check_idx=check_idx, anchor=anchor,
        quad=quad, h_norm_0=h0, h_norm_t=h_norm, drop=drop, counters=c, log=log,
    )


def _check_fit_loss(loss, idx: np.ndarray, w: np.ndarray, union: np.ndarray, losses: np.ndarray, name: str) -> None:
    """Warn (once) when the loss ``ops.gradient`` (or the fused call) returned for a coreset of k >= 4 examples
    is about k times the weighted mean of the losses the selection's forward measured for the same examples
    (within a factor 4/3): a gradient of the weighted sum instead of the mean, which failed 96 % of the trust
    checks against 37 % and nearly doubled the selections, silently (review 127). Only that ratio: the two
    losses may differ for good reasons (inputs drawn again under random transforms, BatchNorm without running
    statistics, a coreset split otherwise across ranks: 0.29-1.95 in review 128's runs of correct adapters)."""
    k = idx.size
    if k < 4:
        return
    try:
        got = float(to_numpy(loss).reshape(())) if hasattr(loss, "shape") else float(loss)
    except (TypeError, ValueError):
        return  # not a number: the protocol's loss is informational, nothing else reads it
    want = float(np.mean(w * losses[np.searchsorted(union, idx)]))
    if math.isfinite(got) and want > 0 and 0.75 * k <= got / want <= k / 0.75:
        warnings.warn(
            f"CREST: ops.{name} returned a loss about k times the weighted mean loss mean_i(w_i * l_i) the selection's "
            "forward measured on the same k examples: a gradient of the weighted sum instead of the mean? The "
            "gradient and the curvature fitted to the quadratic model must be the mean's, or the trust checks "
            "compare the loss with a prediction k times too steep. See ModelOps.gradient", RuntimeWarning,
            stacklevel=user_stacklevel())


def _check_fit_gradient(g, loss, name: str) -> None:
    """Warn when the gradient fitted to the quadratic model is exactly zero while the loss is not: a loss that
    does not depend on the parameters through the logits (a binary model's ``loss_fn`` reading the constant
    column of a two-column ``forward=``, a network whose units are all dead). The model is then flat, every
    trust check passes with a prediction equal to the anchor's loss, and selections come only from the
    schedule's cap, silently (review 130)."""
    xp = array_api_compat.array_namespace(g)
    if g.shape[0] == 0 or bool(xp.any(g != 0)):
        return
    try:
        got = float(to_numpy(loss).reshape(())) if hasattr(loss, "shape") else float(loss)
    except (TypeError, ValueError):
        return
    if math.isfinite(got) and got != 0.0:
        warnings.warn(
            f"CREST: ops.{name} returned a gradient that is exactly zero at the new anchor while the coreset's "
            f"loss is {got:.4g}: the loss does not depend on the trainable parameters (a loss_fn that reads a "
            "constant column, a binary model's forward= that prepends a zero column with a loss_fn reading column "
            "0 instead of the logit's column 1, or a network whose units are all inactive), or, at so small a loss, "
            "a float16 model's backward underflowing to zero (train it in bfloat16 or float32, or under autocast). "
            "The quadratic model is flat: every trust check passes and CREST reselects only at the schedule's cap",
            RuntimeWarning,
            stacklevel=user_stacklevel())


def _select_next(state: CrestState, ops, config: CrestConfig) -> CrestState:
    """``coresets="just-in-time"``: select the selection's next coreset from its random subset, at the
    current parameters; it becomes batch row ``state.made``."""
    p = state.made
    gen = np.random.default_rng([state.seed, state.n_selections, p])
    _, union, losses, idx, valid, w = _coresets(state, ops, config, _subset_row(state, p), gen)
    (ri,), (rw,) = _coreset_rows(idx, valid, w)
    bi, bw = state.batch_idx, state.batch_w
    if ri.size > bi.shape[1]:  # a wider coreset than the padding holds ("ceil" class budgets)
        bi = np.pad(bi, ((0, 0), (0, ri.size - bi.shape[1])), constant_values=-1)
        bw = np.pad(bw, ((0, 0), (0, ri.size - bw.shape[1])))
    else:
        bi, bw = bi.copy(), bw.copy()
    bi[p], bw[p] = -1, 0.0
    bi[p, : ri.size], bw[p, : rw.size] = ri, rw
    c = dict(state.counters)
    c["forward_examples"] += int(union.size)
    drop = drop_record(state.drop, union, to_numpy(losses), state.step) if config.T2 else state.drop
    return state._replace(batch_idx=bi, batch_w=bw, made=p + 1, counters=c, drop=drop)


def _shared(a, b) -> bool:
    """Whether two parameter vectors share memory that a training step could change under the anchor
    (NumPy: by their bounds; torch and CuPy: the same data pointer; JAX arrays are immutable, so the same
    array twice is no view of anything), without importing their libraries."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return bool(np.may_share_memory(a, b))
    if array_api_compat.is_jax_array(a) or array_api_compat.is_jax_array(b):
        return False
    pa, pb = getattr(a, "data_ptr", None), getattr(b, "data_ptr", None)  # torch
    if callable(pa) and callable(pb):
        return bool(a.numel()) and pa() == pb()
    qa = getattr(getattr(a, "data", None), "ptr", None)  # CuPy: a memory pointer with .ptr
    qb = getattr(getattr(b, "data", None), "ptr", None)
    if qa is not None and qb is not None:
        return bool(a.size) and qa == qb
    return a is b


def _check_alive(a, what: str) -> None:
    """A ``ValueError`` when the array ``params()`` returned earlier has been deleted since (a JAX training
    step that donates its parameters, ``jax.jit(..., donate_argnums=...)``, deletes the array it was given)."""
    is_deleted = getattr(a, "is_deleted", None)
    if callable(is_deleted) and bool(is_deleted()):
        raise ValueError(
            f"the array ops.params() returned at {what} has been deleted since (a training step that donates its "
            "parameters, jax.jit(..., donate_argnums=...), deletes the array it is given): params() must return "
            "a copy (jnp.array(w, copy=True)) when the step donates them")


def _finite_params(w, step: int, where: str) -> None:
    """A ``DivergenceError`` naming ``ops.params()`` when the parameter vector ``w`` is not finite."""
    xp = namespace(w, names=("params()",))
    if not all_finite(xp, w):
        raise DivergenceError(
            f"CREST: ops.params() holds NaN or infinite values at step {step} ({where}): training has diverged "
            "(or a parameter the measured examples do not reach went non-finite). Lower the learning rate or "
            "clip the gradients.")


class _LastCheck(NamedTuple):
    """A trust check's inputs and results: the parameters it measured (``params()``'s copy), the ops'
    ``state_token(check_idx)`` after its pass, the selection it checked (``n_selections``: the anchor,
    quadratic model and check set change only at a selection), the config (compared by value) and ops (by
    identity), and ``L_R``, ``F`` and the check set's per-example losses (host; only with dropping on)."""

    params: Any
    token: Any
    selection: int
    config: Any
    ops: Any
    L_R: float
    F: float
    losses: np.ndarray | None
    still: int = 0  # the checks in a row before this one that measured these same parameters
    warned: bool = False  # the warning on an untrained model was given in this run


# this many trust checks in a row at bit-equal parameters, over selections too, are warned about once a run:
# the model measured is not the one trained (review 106: a loader built on a model the loop then replaced ran
# every check and selection on the untrained model, silently). A DataLoader's look-ahead at an epoch's start
# (num_workers * prefetch_factor batches: 32 with 16 workers) and gradient accumulation (one optimizer step
# per k batches) give such runs too, far shorter than this (review 107: 25 warned with 16 workers)
_STILL_CHECKS = 200


def _unchanged_since(last, w) -> bool:
    """Whether the parameters ``w`` equal those the last check measured (bit for bit, same layout; False for
    an array deleted since, which :func:`_same_as_last` reports)."""
    prev = last.params
    is_deleted = getattr(prev, "is_deleted", None)
    if (type(w) is not type(prev) or tuple(w.shape) != tuple(prev.shape) or device_of(w) != device_of(prev)
            or w.dtype != prev.dtype or (callable(is_deleted) and bool(is_deleted()))):
        return False
    return bool(namespace(w, names=("params()",)).all(w == prev))


def _state_token(ops, indices: np.ndarray):
    """``ops.state_token(indices)``, or None when the ops has none (then no check reuses the last one's)."""
    get = getattr(ops, "state_token", None)
    return get(indices.copy()) if callable(get) else None  # a copy, as every array handed to the ops


def _same_as_last(state: CrestState, w, ops, config: CrestConfig, equal: bool) -> _LastCheck | None:
    """The last check when this one would measure exactly what it measured: the same parameters (equal
    values), state token (the ops says nothing else the outputs depend on changed), anchor, quadratic
    model, check set, ops and config, so the same ``L_R`` and ``F``. A ``DataLoader`` with workers asks
    for several batches in a row at an epoch's start before the first of them trains
    (``num_workers * prefetch_factor`` and one more), and each of those steps is checked at the
    parameters the one before was. The ops' token is asked for last, only when everything else agrees
    (most checks come after a step that moved the parameters). ``equal``: whether ``w`` equals the last
    check's parameters (:func:`_unchanged_since`, compared once for this and for the warning on an untrained
    model)."""
    last = state.last_check
    if (last is None or last.token is None or state.anchor is None or state.quad is None
            or last.selection != state.n_selections or last.ops is not ops or last.config != config):
        return None
    _check_alive(last.params, "the last trust check")
    if _shared(w, last.params):
        raise ValueError(
            "ops.params() returned memory shared with what it returned at the last trust check (a view of the "
            "live parameters?): params() must return a copy")
    if not equal:
        return None
    return last if bool(last.token == _state_token(ops, state.check_idx)) else None


def _loss_floor(w) -> float:
    """rho's floor: 1e-12, or the machine epsilon of the parameters' dtype where that is coarser (float32:
    1.2e-7). The model's prediction F comes from the gradient at the anchor, computed in that dtype: where an
    example's probability of its class rounds to 1, its share of the gradient is lost (review 85: a float32
    gradient 71 % off at a check loss of 2.4e-10), so a loss below the dtype's epsilon is not predicted to
    better than that, and float32 runs failed or passed checks on that rounding where float64 did not."""
    return max(_LOSS_FLOOR, float(namespace(w, names=("params()",)).finfo(w.dtype).eps))


def _check(state: CrestState, ops, config: CrestConfig) -> CrestState:
    w = ops.params()
    if state.anchor is not None:
        _check_alive(state.anchor, "the selection (the anchor)")
    if state.anchor is not None and type(w) is not type(state.anchor):  # (the same type: the same library)
        libs = [namespace_name(namespace(v, names=(name,))) for v, name in ((w, "params()"), (state.anchor, "anchor"))]
        if libs[0] != libs[1]:  # (it failed later, mixing the two libraries, naming neither: review 127)
            raise TypeError(
                f"ops.params() returns {libs[0]} arrays but the state's anchor is a {libs[1]} array: a state restored "
                "with crest_load_state_dict(d, params_like) takes params_like's library; pass ops.params() as "
                "params_like")
    if state.anchor is not None and _shared(w, state.anchor):
        raise ValueError(
            "ops.params() returned memory shared with the anchor it returned at the selection (a view of the "
            "live parameters?): params() must return a copy, or the quadratic model always predicts the "
            "anchor's loss and every trust check is wrong")
    if state.anchor is not None and w.shape == state.anchor.shape and w.dtype != state.anchor.dtype:
        raise TypeError(
            f"ops.params() is {w.dtype} but the state's anchor is {state.anchor.dtype}: a state restored with "
            "crest_load_state_dict(d, params_like) takes params_like's dtype; pass ops.params() as params_like "
            "(review 89: the checks ran in the other dtype, and the next selection failed naming ops.gradient)")
    if state.anchor is not None and w.shape != state.anchor.shape:
        # the trainable parameters changed since the anchor (a layer unfrozen or frozen mid-run): the
        # quadratic model belongs to the old ones, so no check is possible; a new selection starts a new
        # model on the new parameters, its curvature the new reference for the schedule (as at the first)
        return crest_parameters_changed(state)
    prev = state.last_check
    equal = prev is not None and _unchanged_since(prev, w)
    same = _same_as_last(state, w, ops, config, equal)
    reused = 0
    if same is not None:  # nothing changed since the last check: its L_R and F, without a forward
        L_R, F, losses_h, spent, token = same.L_R, same.F, same.losses, 0, same.token
        reused = int(state.check_idx.size)
    else:
        xp, logits, emb, y, losses, _ = _forward(state, ops, state.check_idx, config)
        L_R = float(to_numpy(xp.mean(losses)))
        namespace(w, state.anchor, names=("params()", "anchor"))  # same library and device
        assert state.quad is not None, "a trust check runs only after a selection set the quadratic model"
        try:
            F = quadratic_predict(state.quad, w - state.anchor, config.quadratic)
        except ValueError:
            _finite_params(w, state.step, "trust check")  # a non-finite parameter: say so, not "delta"
            raise
        if not (math.isfinite(L_R) and math.isfinite(F)):  # huge finite losses whose mean overflows
            raise DivergenceError(
                f"CREST: the trust check's loss is not finite at step {state.step} (L_R = {L_R}, model F = {F}): "
                "training has diverged. Lower the learning rate or clip the gradients."
            )
        losses_h, spent = (to_numpy(losses) if config.T2 else None), int(state.check_idx.size)
        token = _state_token(ops, state.check_idx)  # after the pass: its inputs are what the next check compares
    # rho's denominator (only it: L_R - F is the model's error as measured) is floored, so a fully learned
    # sample (L_R near 0) gives rho = |L_R - F| / floor, not a failed check on noise; |L_R| there for a user
    # loss that may go negative
    rho = relative_error(L_R, F, floor=_loss_floor(w))
    c = dict(state.counters)
    c["forward_examples"] += spent
    c["reused_examples"] += reused
    c["checks"] += 1
    log = _logged(state, "checks", (state.step, rho, L_R, F))
    drop = drop_record(state.drop, state.check_idx, losses_h, state.step) if config.T2 else state.drop
    still = prev.still + 1 if (prev is not None and equal) else 0
    warned = prev is not None and prev.warned
    if still >= _STILL_CHECKS and not warned:
        warned = True
        warnings.warn(
            f"CREST: the model's parameters have not changed over the last {_STILL_CHECKS} trust checks: every "
            "check and selection measures a model that is not trained. Is the model given to CREST the one your "
            "optimizer steps (not one built again after the loader, and not a copy)? A learning rate of 0 does "
            "this too", RuntimeWarning, stacklevel=user_stacklevel())
    last = (None if token is None else
            _LastCheck(w, token, state.n_selections, config, ops, L_R, F, losses_h, still, warned))
    new = state._replace(since_check=0, counters=c, log=log, drop=drop, last_check=last)
    if should_reselect(rho, config.tau):
        new = new._replace(need_select=True)  # the new anchor's curvature sets T1 and P (in _select)
    return new


def _affordable(state: CrestState, config: CrestConfig) -> bool:
    """Whether the measurement passes spent so far leave room for more under ``max_overhead``. A check
    answered from the last one's measurement counts as measured (``reused_examples``): what the cap allows
    then does not depend on whether the last check is in memory, which a state loaded from a checkpoint's
    is not (review 71: a resumed run measured that check, crossed the cap and cycled a coreset where the
    uninterrupted run selected one)."""
    if config.max_overhead is None:
        return True
    c = state.counters
    spent = c["forward_examples"] + c["reused_examples"] + 2 * c["backward_examples"]
    return spent <= config.max_overhead * 3 * c["train_examples"]


def _fields(obj) -> dict:
    """A dataclass's field values by name (a subclass at the defaults compares equal to its base)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _arguments(where: str, state, config=None, ops=None, *, live: bool = True) -> None:
    """TypeErrors that name what a controller function got in place of its state, config or ops."""
    if not isinstance(state, CrestState):
        raise TypeError(f"{where}: state must be the CrestState crest_init (or the previous call) returned, got "
                        f"{type(state).__name__}" + (" (the arguments are (state, ops, config))"
                                                     if isinstance(state, CrestConfig) else ""))
    if config is not None and not isinstance(config, CrestConfig):
        raise TypeError(f"{where}: config must be a CrestConfig, got {type(config).__name__}"
                        + (" (the arguments are (state, ops, config))" if where == "crest_next_batch" else ""))
    if ops is not None:
        missing = [name for name in ("outputs", "params") if not callable(getattr(ops, name, None))]
        if missing:
            raise TypeError(f"{where}: ops ({type(ops).__name__}) has no {' or '.join(m + '()' for m in missing)}: it "
                            "must implement ModelOps (outputs, params, gradient, hutchinson)")
    if live and state.drop.clock is not None:  # live=False: the caller reads nothing written in place
        try:
            _check_live(state.drop)
        except RuntimeError:
            raise RuntimeError(
                f"{where}: this CrestState was already passed to crest_next_batch or crest_observe, which "
                "consumed it (with dropping on, the loss history is updated in place): use the state the call "
                "returned, and keep a snapshot with crest_state_dict(state) before the call") from None


def _method(ops, name: str):
    """``ops.<name>``, or a TypeError naming the ModelOps method the model fit needs."""
    f = getattr(ops, name, None)
    if not callable(f):
        raise TypeError(f"ops ({type(ops).__name__}) has no {name}(): CREST's model fit at each selection needs "
                        "ModelOps.gradient and ModelOps.hutchinson (or gradient_and_hutchinson)")
    return f


def _returned(result, name: str, n: int, what: str) -> tuple:
    """``result`` of ``ops.<name>`` as an n-tuple whose vectors are not None, or a TypeError naming it."""
    if not isinstance(result, (tuple, list)) or len(result) != n:
        size = f" of {len(result)}" if isinstance(result, (tuple, list)) else ""
        raise TypeError(f"ops.{name} must return {what}, got a {type(result).__name__}{size}")
    for v in result[1:]:
        _present(v, name, what)
    return tuple(result)


def _present(v, name: str, what: str):
    """``v`` from ``ops.<name>``; None (which the quadratic model would read as "no sample" and run on
    without it) is a TypeError naming the method."""
    if v is None:
        raise TypeError(f"ops.{name} returned None where it must return {what}")
    return v


_GRADIENT = "(loss, flat gradient like params())"
_PROBE = "the probe z * (H z), a flat vector like params()"


def _makes_coreset(state: CrestState, config: CrestConfig) -> bool:
    """Whether the next batch is a just-in-time coreset selected now, at the current parameters, rather
    than one of the coresets made so far, cycled."""
    return (state.made < state.batch_idx.shape[0] and state.cursor >= state.made and not state.want_select
            and _affordable(state, config))


def crest_next_batch(state: CrestState, ops: ModelOps, config: CrestConfig):
    """Account for the step just trained (if any), run due checks/drops/selection, return the next batch.

    Examples
    --------
    Thirty SGD steps of softmax regression on two Gaussian blobs, each on the next weighted coreset
    (``_SoftmaxOps``, the example of :class:`ModelOps`, implements it in NumPy):

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = np.arange(200) % 2
    >>> X = rng.normal(size=(200, 2)) + 2.0 * y[:, None]
    >>> ops, config = _SoftmaxOps(X, y, C=2), CrestConfig(m=10)
    >>> state = crest_init(config, y, seed=0)
    >>> for step in range(30):
    ...     state, batch = crest_next_batch(state, ops, config)
    ...     loss, grad = ops.gradient(batch.indices, batch.weights)
    ...     ops.W -= 0.5 * grad.reshape(ops.W.shape)  # the training step
    >>> batch.indices.shape, round(float(batch.weights.mean()), 6)
    ((10,), 1.0)
    >>> state.counters["train_steps"], state.counters["checks"] > 0, state.n_selections >= 1
    (30, True, True)
    """
    _arguments("crest_next_batch", state, config, ops)
    # atomic for the caller: a call that raises (a diverged selection after a check, Ctrl-C inside a forward)
    # undoes the loss records it wrote in place, so the state passed in stays usable (a checkpoint, a retry)
    with _undone_on_error():
        return _next_batch(state, ops, config)


def _next_batch(state: CrestState, ops: ModelOps, config: CrestConfig):
    if state.n_selections == 0 and state.step == 0 and not state.pending:
        # the schedule starts from this config's T1 and P (not those crest_init, or a checkpoint saved
        # before the first step, was given): the config passed here is the one that runs
        state = state._replace(T1=config.T1, P=config.P)
    reason = "first" if state.n_selections == 0 else "check"
    if config.T2 is not None and state.drop.losses.shape[1] != config.drop.history:
        # dropping turned on for a state made without it (no loss history kept), or a config whose
        # DropConfig.history differs from the one the state was made with (a resume under a new config): the
        # config's ring, keeping the most recent records (a ring narrower than min_records dropped nothing)
        state = state._replace(drop=drop_resize(state.drop, config.drop.history))
    if state.pending:
        state = state._replace(step=state.step + 1, since_check=state.since_check + 1, pending=False)
        # a reselection already due (the pool shrank since the last selection, or max_age steps trained on
        # it) comes first: the trust check would measure an anchor it replaces. After the check it waited
        # for max_overhead to allow it again, which every due check then spent first (review 89: a cap of
        # 1.0 above what the run spent uncapped made one selection in 200 steps)
        if not state.need_select and _affordable(state, config):
            if state.want_select:
                state, reason = state._replace(need_select=True), "drop"
            elif config.max_age is not None and state.cursor >= _max_age(state, config):
                state, reason = state._replace(need_select=True), "age"
        # the trust check runs every T1 steps (when max_overhead allows) whatever else happens at this step;
        # with checks="reuse" a step that trains on a coreset selected now waits (since_check keeps counting)
        if not state.need_select and state.since_check >= state.T1 and _affordable(state, config):
            if config.reselect == "epoch":
                state = state._replace(need_select=True)
                reason = "epoch"
            elif config.checks == "every" or not _makes_coreset(state, config):
                state = _check(state, ops, config)
                reason = "check"
        if config.T2 is not None and state.step % config.T2 == 0:
            # the pool never shrinks below one mini-batch, whatever the configured floor
            floor = max(config.drop.floor, config.m)
            before = pool_size(state.drop)
            drop, gone = drop_update(state.drop, state.step, replace(config.drop, floor=floor), state.labels)
            if gone.size and pool_size(drop) <= config.m < before:
                # an epoch of one batch (no epoch_steps given): max_age="epoch" reselects at every step (review 148)
                every = (config.max_age is not None and _max_age(state._replace(drop=drop), config) <= 1)
                warnings.warn(
                    f"CREST's drop policy has shrunk the pool to {pool_size(drop)} examples at step {state.step}, "
                    f"one mini-batch (m = {config.m}): every selection from now on picks the same examples, so "
                    "the rest of the run trains on one batch" + (
                        f" (and reselects them at every step: max_age={config.max_age!r} is one step now, each "
                        "selection a forward, a gradient and a curvature probe over them)" if every else "")
                    + ". Keep more with DropConfig(floor=...) or a smaller "
                    "alpha (the examples whose losses stayed below it leave)", stacklevel=user_stacklevel())
            log = _logged(state, "drops", (state.step, int(gone.size)))
            state = state._replace(drop=drop, log=log, want_select=state.want_select or bool(gone.size))
        if state.want_select and not state.need_select and _affordable(state, config):
            state = state._replace(need_select=True)  # the new pool gets new coresets
            reason = "drop"
        if (not state.need_select and config.max_age is not None and state.cursor >= _max_age(state, config)
                and _affordable(state, config)):
            state = state._replace(need_select=True)  # trained on long enough: fresh coresets, a new anchor
            reason = "age"
    reselected = False
    if state.need_select:
        state = _select(state, ops, config, reason)
        reselected = True
    if _makes_coreset(state, config):
        state = _select_next(state, ops, config)  # coresets="just-in-time": this step's coreset, now
        row = state.made - 1
    else:  # the next coreset, cycling through those selected when more steps pass than there are
        row = state.cursor % state.made
    bi, bw = _row(state, row)
    batch = Batch(bi.copy(), bw.copy(), reselected)
    c = dict(state.counters)  # the batch handed out is the training step the caller takes next
    c["train_steps"] += 1
    c["train_examples"] += int(batch.indices.size)
    return state._replace(cursor=state.cursor + 1, pending=True, counters=c), batch


def crest_parameters_changed(state: CrestState) -> CrestState:
    """The state for a model whose trainable parameters changed (a layer frozen, unfrozen or swapped for
    another, even of the same size): the quadratic model and its anchor belong to the old ones, so the next
    :func:`crest_next_batch` starts a new selection and a new model over the new set, whose curvature is the
    schedule's new reference (as at the first selection). The adapters call it when the set they train
    changes; before any selection it changes nothing.

    Examples
    --------
    >>> import numpy as np
    >>> y = np.arange(200) % 2
    >>> X = np.random.default_rng(0).normal(size=(200, 2)) + 2.0 * y[:, None]
    >>> ops, config = _SoftmaxOps(X, y, C=2), CrestConfig(m=10)
    >>> state, _ = crest_next_batch(crest_init(config, y, seed=0), ops, config)
    >>> state = crest_parameters_changed(state)
    >>> state.need_select, state.anchor is None, state.quad is None
    (True, True, True)
    """
    if not isinstance(state, CrestState):
        raise TypeError(f"state must be a CrestState (from crest_init), got {type(state).__name__}")
    if state.anchor is None and state.quad is None:
        return state
    return state._replace(need_select=True, quad=None, anchor=None, h_norm_0=math.nan)


def crest_observe(state: CrestState, indices, losses, step: int | None = None) -> CrestState:
    """Record per-example training losses for the drop policy, as measured at ``step``: the step of the
    batch they were trained on (default ``state.step``, the batch handed out last). A loop whose loader
    fetches batches ahead of training (a ``DataLoader`` with workers) passes the trained batch's own step,
    which is at most ``state.step``.

    Examples
    --------
    >>> import numpy as np
    >>> config = CrestConfig(m=2, T2=10)
    >>> state = crest_init(config, np.array([0, 1, 0, 1]), seed=0)
    >>> state = crest_observe(state, np.array([1, 3]), np.array([0.02, 0.7]))
    >>> state.drop.losses[:, 0]
    array([ nan, 0.02,  nan, 0.7 ])
    """
    _arguments("crest_observe", state)
    if step is None:
        step = state.step
    elif isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step <= state.step:
        raise ValueError(f"step must be an integer in [0, {state.step}] (a batch handed out already), got {step!r}")
    return state._replace(drop=drop_record(state.drop, indices, losses, int(step)))


def crest_stats(state: CrestState) -> dict:
    """The controller's record as plain data: selection steps, trust checks (step, rho, the loss on the
    random examples ``loss_random`` and the model's prediction ``predicted``), drops (step, count), the
    schedule (``T1``, ``P``), the pool size and the counters. The adapters' ``stats`` add their position
    and budget to it.

    Examples
    --------
    >>> import numpy as np
    >>> state = crest_init(CrestConfig(m=4), np.arange(40) % 2, seed=0)
    >>> s = crest_stats(state)
    >>> s["selections"], s["checks"], s["T1"], s["pool"], s["counters"]["train_steps"]
    ([], [], 1, 40, 0)
    """
    _arguments("crest_stats", state, live=False)  # the log, counters and pool: never written in place
    checks = [{"step": int(t), "rho": float(r), "loss_random": float(lr), "predicted": float(f)}
              for t, r, lr, f in state.log["checks"]]
    return {
        "selections": [int(t) for t in state.log["selections"]],
        "checks": checks,
        "rho": [c["rho"] for c in checks],
        "drops": [(int(t), int(k)) for t, k in state.log["drops"]],
        "T1": int(state.T1),
        "P": int(state.P),
        "pool": pool_size(state.drop),
        "counters": {k: int(v) for k, v in state.counters.items()},
    }


def crest_state_dict(state: CrestState) -> dict:
    """Plain NumPy arrays and Python numbers/lists; :func:`crest_load_state_dict` restores exactly. Integer
    arrays are stored in the narrowest signed dtype that holds their values (the labels of ten classes in
    int8), and the rows a just-in-time selection has not made yet as the recipe that draws them (O(n)).

    Examples
    --------
    >>> import pickle
    >>> import numpy as np
    >>> state = crest_init(CrestConfig(m=2), np.array([0, 1, 0, 1]), seed=3)
    >>> d = crest_state_dict(state)
    >>> d["seed"], d["step"], d["format_version"]
    (3, 0, 4)
    >>> pickle.loads(pickle.dumps(d))["labels"]  # plain data: any checkpoint format stores it
    array([0, 1, 0, 1], dtype=int8)
    """
    _arguments("crest_state_dict", state)
    d = {k: getattr(state, k) for k in CrestState._fields if k != "last_check"}  # (held in memory only)
    for k in ("labels", "batch_idx", "batch_w", "check_idx", "subsets"):  # copies: the dict is the caller's
        d[k] = np.array(d[k], copy=True)
    d["draw"] = None if state.draw is None else {k: np.array(v, copy=True) for k, v in state.draw.items()}
    d["anchor"] = None if state.anchor is None else np.asarray(to_numpy(state.anchor)).copy()
    if state.quad is not None:
        q = state.quad
        d["quad"] = {"anchor_loss": q.anchor_loss, "g_ema": np.asarray(to_numpy(q.g_ema)).copy(),
                     "h_ema": np.asarray(to_numpy(q.h_ema)).copy(), "n_g": q.n_g, "n_h": q.n_h}
    _check_live(state.drop)  # a consumed drop state (a later record rewrote its history) has no true copy
    d["drop"] = {k: np.asarray(v).copy() for k, v in state.drop._asdict().items()}
    d["counters"] = dict(state.counters)
    d["log"] = {k: list(v) for k, v in state.log.items()}
    d["format_version"] = STATE_FORMAT
    return _narrowed(d)


def _narrowed(x):
    """``x`` (nested dicts) with each integer array in the narrowest signed dtype that holds its values (a load
    widens them to int64 again): the per-example labels, pool records and drop steps of a run without drops
    took 24 of a checkpoint's 25 MB at 10^6 examples in int64 (review 123), 3 MB in int8."""
    if isinstance(x, dict):
        return {k: _narrowed(v) for k, v in x.items()}
    if isinstance(x, np.ndarray) and x.size and np.issubdtype(x.dtype, np.signedinteger):
        low, high = int(x.min()), int(x.max())
        for dt in (np.int8, np.int16, np.int32):
            info = np.iinfo(dt)
            if info.min <= low and high <= info.max:
                return x.astype(dt)
    return x


# 1: before epoch_steps / want_select (filled with defaults on load); 2: format_version; 3: made and
# subsets (coresets="just-in-time"; a version-2 state has every row made); 4: draw, the recipe of the rows
# not yet made instead of the subsets themselves (a version-3 state keeps its subsets)
STATE_FORMAT = 4


def _bad(msg: str):
    return ValueError(f"corrupt or foreign CREST state dict: {msg}")


def _int_of(d, name, low=0):
    v = d[name]
    a = np.asarray(v)
    if a.ndim != 0 or a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise _bad(f"{name} must be an integer, got {type(v).__name__} {v!r}")
    if int(a) < low:
        raise _bad(f"{name} must be >= {low}, got {int(a)}")
    return int(a)


def _bool_of(d, name):
    a = np.asarray(d[name])
    if a.ndim != 0 or a.dtype != bool:
        raise _bad(f"{name} must be a bool, got {d[name]!r}")
    return bool(a)


def _host(v, name, ndim, kind):
    return state_array(v, "corrupt or foreign CREST state dict", name, ndim, kind)


def _validate_recipe(recipe, labels, n: int) -> None:
    """A state dict's ``draw``: the pool (distinct ascending example indices, or empty: all), each class's
    members per subset (no more than the pool holds) and the 6 words of the stream."""
    if not isinstance(recipe, dict) or set(recipe) != {"pool", "r_c", "rng"}:
        raise _bad("draw must be None or a dict with pool, r_c and rng")
    pool = _host(recipe["pool"], "draw['pool']", 1, "i")
    if pool.size and (pool.min() < 0 or pool.max() >= n or np.any(np.diff(pool) <= 0)):
        raise _bad(f"draw['pool'] must hold distinct ascending example indices in [0, {n})")
    rc = _host(recipe["r_c"], "draw['r_c']", 1, "i")
    members = np.asarray(host_array(labels, 1))
    counts = np.unique(members if not pool.size else members[pool], return_counts=True)[1]
    if rc.shape != counts.shape or rc.min(initial=0) < 0 or np.any(rc > counts) or rc.sum() < 1:
        raise _bad("draw['r_c'] must give each class of the pool a count of members per subset it can hold")
    words = _host(recipe["rng"], "draw['rng']", 1, "i")
    if words.shape != (6,):
        raise _bad("draw['rng'] must be the 6 words of a PCG64 stream")
    w = [int(v) for v in words.astype(np.int64).view(np.uint64)]
    if w[3] % 2 == 0 or w[4] not in (0, 1) or w[5] >> 32:  # PCG64's increment is odd; a buffered 32-bit half
        raise _bad("draw['rng'] is not a PCG64 state (an odd increment, a flag of 0 or 1 and a 32-bit half)")


def _validate_state_dict(d: dict, D: int) -> None:
    """Shapes, ranges and cross-field consistency of a state dict (after defaults are filled)."""
    ver = d.get("format_version", 1)
    if isinstance(ver, bool) or not isinstance(ver, (int, np.integer)) or not 1 <= int(ver) <= STATE_FORMAT:
        raise _bad(f"format_version {ver!r} is not one this crestcore reads (1 to {STATE_FORMAT})")
    labels = _host(d["labels"], "labels", 1, "i")
    n = labels.size
    if n == 0 or labels.min() < 0:
        raise _bad("labels must be a non-empty array of non-negative class indices")
    C = _int_of(d, "n_classes", low=2)
    if labels.max() >= C:
        raise _bad(f"labels hold class {int(labels.max())} but n_classes is {C}")
    _int_of(d, "seed")
    step = _int_of(d, "step")
    _int_of(d, "since_check")
    _int_of(d, "T1", low=1)
    _int_of(d, "P", low=1)
    n_sel = _int_of(d, "n_selections")
    cursor = _int_of(d, "cursor")
    _int_of(d, "epoch_steps")
    need = _bool_of(d, "need_select")
    _bool_of(d, "want_select")
    pending = _bool_of(d, "pending")
    bi = _host(d["batch_idx"], "batch_idx", 2, "i")
    bw = _host(d["batch_w"], "batch_w", 2, "f")
    if bi.shape != bw.shape:
        raise _bad(f"batch_idx {bi.shape} and batch_w {bw.shape} differ in shape")
    if bi.size and (bi.min() < -1 or bi.max() >= n):
        raise _bad(f"batch_idx must hold example indices in [0, {n}) or -1 (padding)")
    if not np.all(np.isfinite(bw)) or (bw.size and bw.min() < 0):
        raise _bad("batch_w must hold finite non-negative weights")
    if np.any((bi < 0) & (bw != 0)):
        raise _bad("batch_w must be 0 on padding slots (batch_idx == -1)")
    made = _int_of(d, "made")
    if made > bi.shape[0]:
        raise _bad(f"made ({made}) exceeds the {bi.shape[0]} stored batch rows")
    if not need and n_sel > 0 and (made == 0 or np.any((bi[:made] >= 0).sum(axis=1) == 0)):
        raise _bad("the stored batches are empty but no selection is due")
    if np.any(bi[made:] >= 0):
        raise _bad(f"batch rows from made ({made}) on must be padding (-1) until they are selected")
    sub = _host(d["subsets"], "subsets", 2, "i")
    if sub.size and (sub.shape[0] != bi.shape[0] or sub.min() < 0 or sub.max() >= n):
        raise _bad(f"subsets must hold one row of example indices in [0, {n}) per batch row "
                   f"({bi.shape[0]}), got shape {sub.shape}")
    recipe = d["draw"]
    if recipe is not None:
        _validate_recipe(recipe, d["labels"], n)
    if made < bi.shape[0] and sub.shape[0] != bi.shape[0] and recipe is None:
        raise _bad(f"{bi.shape[0] - made} batch rows wait to be selected but subsets has {sub.shape[0]} rows "
                   "and there is no draw to make them")
    if n_sel > 0 and not need and cursor < 1 and pending:
        raise _bad(f"cursor {cursor} is inconsistent with a pending batch")
    if n_sel == 0 and not need:
        raise _bad("no selection was made yet (n_selections = 0) but need_select is False")
    if int(d["since_check"]) > step:
        raise _bad(f"since_check ({int(d['since_check'])}) exceeds step ({step})")
    chk = _host(d["check_idx"], "check_idx", 1, "i")
    if chk.size and (chk.min() < 0 or chk.max() >= n):
        raise _bad(f"check_idx must hold example indices in [0, {n})")
    for name in ("h_norm_0", "h_norm_t"):
        v = d[name]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or (
            not math.isnan(float(v)) and not (math.isfinite(float(v)) and float(v) >= 0)
        ):
            raise _bad(f"{name} must be NaN (not measured yet) or a finite number >= 0, got {v!r}")
    if d["anchor"] is not None:
        a = _host(d["anchor"], "anchor", 1, "f")
        if a.size != D:
            raise _bad(f"anchor has {a.size} parameters but the model has {D}: the state was saved for "
                       "another model (architecture), or before layers were frozen or unfrozen (load it first, "
                       "then change which parameters train; a loop of your own that changed them before saving "
                       "calls crest_parameters_changed(state) first, as the adapters do)")
        if not np.all(np.isfinite(a)):
            raise _bad("anchor contains NaN or infinite values")
    q = d["quad"]
    if q is not None:
        if not isinstance(q, dict) or not {"anchor_loss", "g_ema", "h_ema", "n_g", "n_h"} <= set(q):
            raise _bad("quad must be a dict with anchor_loss, g_ema, h_ema, n_g, n_h")
        for name in ("g_ema", "h_ema"):
            v = _host(q[name], f"quad.{name}", 1, "f")
            if v.size != D:
                raise _bad(f"quad.{name} has {v.size} entries but the model has {D} parameters: the state "
                           "was saved for another model (architecture), or before layers were frozen or unfrozen "
                           "(load it first, then change which parameters train; a loop of your own that changed "
                           "them before saving calls crest_parameters_changed(state) first)")
            if not np.all(np.isfinite(v)):
                raise _bad(f"quad.{name} contains NaN or infinite values")
        _int_of(q, "n_g")
        _int_of(q, "n_h")
        al = q["anchor_loss"]
        if isinstance(al, bool) or not isinstance(al, (int, float, np.floating, np.integer)) or math.isinf(float(al)):
            raise _bad(f"quad.anchor_loss must be a finite number (or NaN before the first anchor), got {al!r}")
    elif d["anchor"] is not None:
        raise _bad("an anchor without a quadratic model (quad is None)")
    dr = d["drop"]
    if not isinstance(dr, dict) or not {"losses", "steps", "head", "active", "dropped_at"} <= set(dr):
        raise _bad("drop must be a dict with losses, steps, head, active, dropped_at")
    active = _host(dr["active"], "drop.active", 1, "b")
    if active.size != n:
        raise _bad(f"drop.active has {active.size} entries but there are {n} examples (labels)")
    if not active.any():
        raise _bad("drop.active is empty: the pool holds no example")
    dropped = _host(dr["dropped_at"], "drop.dropped_at", 1, "i")
    head = _host(dr["head"], "drop.head", 1, "i")
    L = _host(dr["losses"], "drop.losses", 2, "f")
    S = _host(dr["steps"], "drop.steps", 2, "i")
    if dropped.size != n or head.size != n or L.shape[0] != n or S.shape != L.shape:
        raise _bad(f"drop arrays must have {n} rows like labels: dropped_at {dropped.shape}, head "
                   f"{head.shape}, losses {L.shape}, steps {S.shape}")
    if head.size and head.min() < 0:  # (n, 0) histories: a state without dropping keeps no losses
        raise _bad("drop.head (records written per example) must be >= 0")
    if np.any(np.isinf(L)):  # any finite loss, as drop_record takes (a signed or rounded-negative loss too)
        raise _bad("drop.losses must hold finite losses (NaN: empty slot)")
    if np.any((S < 0) != np.isnan(L)) or (S.size and S.min() < -1) or (S.size and S.max() > step):
        raise _bad(f"drop.steps must be -1 exactly on empty slots and in [0, step={step}] elsewhere")
    if np.any(active != (dropped < 0)) or (dropped.size and dropped.max() > step):
        raise _bad("drop.dropped_at must be -1 exactly for active examples and at most step")
    if dr.get("clock") is not None:
        clock = _host(dr["clock"], "drop.clock", 1, "i")
        if clock.size != 1:
            raise _bad("drop.clock must hold one integer (the records made to the histories)")
        # a state is saved live (its version equal to the clock): another pair loaded, and the next step said
        # the caller had reused a consumed state (review 178)
        if "version" not in dr or _int_of(dr, "version") != int(clock[0]):
            raise _bad(f"drop.version ({dr.get('version')!r}) must equal drop.clock[0] ({int(clock[0])}): a saved "
                       "state is live")
    elif "version" in dr:
        _int_of(dr, "version")
    c = d["counters"]
    if not isinstance(c, dict) or set(_counters()) - set(c) - set(_COUNTERS_ADDED):
        raise _bad(f"counters must be a dict with {sorted(set(_counters()) - set(_COUNTERS_ADDED))}")
    c = {**_COUNTERS_ADDED, **c}
    for k in _counters():
        _int_of(c, k)
    if int(c["train_steps"]) != step + int(pending):
        raise _bad(f"counters.train_steps ({int(c['train_steps'])}) must equal step ({step}) plus the pending "
                   f"batch ({int(pending)})")
    if n_sel > int(c["train_steps"]):
        raise _bad(f"n_selections ({n_sel}) exceeds the batches handed out ({int(c['train_steps'])}): at most one "
                   "selection per batch")
    if int(c["selections"]) != n_sel:
        raise _bad(f"counters.selections ({int(c['selections'])}) differs from n_selections ({n_sel})")
    lg = d["log"]
    if not isinstance(lg, dict) or {"selections", "checks", "drops"} - set(lg):
        raise _bad("log must be a dict with selections, checks and drops")
    # the records as the run writes them: selection steps, (step, rho, L_R, F) checks, (step, dropped) drops
    for k, nd, kind, width in (("selections", 1, "i", None), ("checks", 2, "f", 4), ("drops", 2, "i", 2)):
        rec = _host(list(lg[k]) if isinstance(lg[k], EventLog) else lg[k], f"log.{k}", nd, kind)
        if width is not None and rec.size and rec.shape[1] != width:
            raise _bad(f"log.{k} records must hold {width} numbers each, got shape {rec.shape}")


def crest_load_state_dict(d: dict, params_like, *, labels=None) -> CrestState:
    """Restore a state; vectors go to the namespace/device/dtype of ``params_like`` (e.g. ops.params()).

    The state is validated first: shapes, ranges and cross-field consistency (the drop pool and the
    number of examples, step / pending batch / counters, finite weights and model vectors, the anchor's
    length and the model's parameter count ``params_like.shape[0]``). A corrupt or foreign state raises
    ``ValueError`` saying what is wrong. States carry ``format_version`` (absent: version 1).

    ``labels`` (optional, the training set's (n,) class indices, as given to :func:`crest_init`): the
    state must have been saved for these labels, else ``ValueError``. A state keeps its own labels and
    draws its subsets from them, so a checkpoint resumed on another data set (other size, other order)
    would select indices of the old one, silently; pass them (review 89).

    Examples
    --------
    ``params_like`` is any vector shaped like the model's flat parameters (``ops.params()``):

    >>> import numpy as np
    >>> state = crest_init(CrestConfig(m=2), np.array([0, 1, 0, 1]), seed=3)
    >>> restored = crest_load_state_dict(crest_state_dict(state), np.zeros(6))
    >>> restored.seed, restored.step, bool(np.array_equal(restored.labels, state.labels))
    (3, 0, True)
    >>> crest_load_state_dict({"seed": 3}, np.zeros(6))
    Traceback (most recent call last):
        ...
    ValueError: state dict is missing [...]
    """
    if not isinstance(d, dict):
        raise TypeError(f"d must be a dict (from crest_state_dict), got {type(d).__name__}")
    d = {"want_select": False, "epoch_steps": 0, "draw": None, **d}  # fields added after the first format
    if "made" not in d and "batch_idx" in d:  # before format 3 every stored row was selected
        d = {"made": int(np.asarray(d["batch_idx"]).shape[0]) if np.ndim(d["batch_idx"]) == 2 else 0,
             "subsets": np.zeros((0, 0), dtype=np.int64), **d}
    saved = [k for k in CrestState._fields if k != "last_check"]  # (held in memory only: a load measures)
    missing = set(saved) - set(d)
    if missing:
        raise ValueError(f"state dict is missing {sorted(missing)}")
    xp = namespace(params_like, names=("params_like",))
    if params_like.ndim != 1:
        raise ValueError(f"params_like must be the flat (D,) parameter vector, got shape {tuple(params_like.shape)}")
    _validate_state_dict(d, int(params_like.shape[0]))
    if labels is not None:
        namespace(labels, names=("labels",))  # an array of a supported library
        given, saved_labels = np.asarray(to_numpy(labels)), np.asarray(host_array(d["labels"], 1))
        if given.ndim != 1:
            raise ValueError(f"labels must be the (n,) class indices given to crest_init, got shape {given.shape}")
        if given.shape != saved_labels.shape or not np.array_equal(given, saved_labels):
            raise ValueError(
                f"the state dict was saved for other labels ({saved_labels.size} examples"
                + ("" if given.size != saved_labels.size else ", the same count in another order or with other "
                   "classes") + f"; labels has {given.size}): it belongs to another training set")

    def vec(a, dtype=params_like.dtype):
        return xp.astype(from_numpy(np.asarray(a), xp, device_of(params_like)), dtype)

    fields = {k: d[k] for k in saved}
    # the arrays as the controller keeps them (host NumPy, int64 / float64), whatever the dict held
    # (lists, int32 arrays, tensors: the validator accepted them)
    for k, dt, nd in (("labels", np.int64, 1), ("batch_idx", np.int64, 2), ("batch_w", np.float64, 2),
                      ("check_idx", np.int64, 1)):
        fields[k] = np.array(host_array(d[k], nd), dtype=dt)
    fields["labels"] = frozen_copy(fields["labels"])  # as crest_init keeps them
    for k in ("seed", "n_classes", "step", "since_check", "T1", "P", "n_selections", "cursor", "epoch_steps"):
        fields[k] = int(d[k])
    for k in ("need_select", "want_select", "pending"):
        fields[k] = bool(d[k])
    for k in ("h_norm_0", "h_norm_t"):
        fields[k] = float(d[k])
    fields["anchor"] = None if d["anchor"] is None else vec(d["anchor"])
    if d["quad"] is not None:
        q = d["quad"]
        wide = compute_dtype(xp, params_like.dtype)  # the averages' dtype (quadratic_init's): float32 for half
        fields["quad"] = QuadraticState(float(q["anchor_loss"]), vec(q["g_ema"], wide), vec(q["h_ema"], wide),
                                        int(q["n_g"]), int(q["n_h"]))
    dr = dict(d["drop"])
    kinds: dict[str, Any] = {"losses": np.float64, "steps": np.int64, "head": np.int64, "active": np.bool_,
                             "dropped_at": np.int64}
    for k, dt in kinds.items():
        dr[k] = np.array(host_array(dr[k]), dtype=dt)
    if dr.get("clock") is not None:
        dr["clock"] = np.array(np.asarray(dr["clock"]), dtype=np.int64)
    if "version" in dr:
        dr["version"] = int(np.asarray(dr["version"]))
    dr["active"] = frozen_copy(dr["active"])  # as the drop module makes its pool masks (see pool_size)
    fields["drop"] = DropState(**dr)
    fields["made"] = int(d["made"])
    fields["subsets"] = np.array(host_array(d["subsets"], 2), dtype=np.int64)
    if d["draw"] is not None:
        fields["draw"] = {k: np.array(host_array(d["draw"][k], 1), dtype=np.int64) for k in ("pool", "r_c", "rng")}
        fields["draw"]["rng"] = frozen_copy(fields["draw"]["rng"])  # the key of the grouped pool (_subset_row)
    fields["counters"] = {**_COUNTERS_ADDED, **d["counters"]}  # (a state saved before a counter was added)
    # records as the run writes them (checks and drops are tuples; JSON gives them back as lists)
    fields["log"] = {k: EventLog(tuple(r) if isinstance(r, list) else r for r in v) for k, v in d["log"].items()}
    return CrestState(**fields)
