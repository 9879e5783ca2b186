"""Lightning adapter: CREST inside ``Trainer.fit`` through one Callback.

Usage (``docs/pytorch.md`` has the whole example)::

    crest = CrestCallback(train_set, config=CrestConfig(m=128), budget=0.1, seed=0)
    trainer = L.Trainer(max_epochs=200, callbacks=[crest])
    trainer.fit(module, train_dataloaders=crest.dataloader())

    # in the LightningModule
    def training_step(self, batch, batch_idx):
        x, y, w = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        return {"loss": (w * losses).mean(), "crest_losses": losses.detach()}  # crest_losses optional

The callback builds a :class:`crestcore.adapters.torch.CrestLoader` on the LightningModule at
``setup("fit")`` (``epochs`` defaults to ``trainer.max_epochs``), in per-epoch mode: every Lightning epoch
yields ``steps_per_epoch`` weighted coreset batches, so ``len(dataloader)`` is exact and Lightning
never pre-fetches (a pre-fetched batch would be selected before the previous optimizer step). Under
``budget_counts="passes"`` ``len`` is an upper bound: an epoch ends when its share of the measurement budget
is spent, and Lightning then skips its end-of-epoch validation (warned at the fit's start; validate by steps). Its
``state_dict`` carries the controller and the position into checkpoints; resuming from a checkpoint
(``trainer.fit(..., ckpt_path=...)``) continues with the same batches, mid-epoch included.

Lightning is an optional dependency (``pip install 'crestcore[lightning]'``); both the ``lightning``
package and the older ``pytorch_lightning`` work. One process (no DDP): a Trainer with several processes
is refused at ``setup``; the distributed adapter is separate. Every ``fit`` is a new CREST run (a fit with
``ckpt_path`` continues the checkpoint's).
"""

from __future__ import annotations

import math
import warnings
from typing import Any
from collections.abc import Callable

try:  # the unified package first, then the standalone one
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl
    except ImportError as exc:
        raise ImportError(
            "crestcore.adapters.lightning needs Lightning: pip install 'crestcore[lightning]'"
        ) from exc

import numpy as np
import torch

from crestcore.controller import CrestConfig

from . import _common
from ._common import check_count
from .monitor import scalars
from .torch import CrestLoader, _weighted_batch, check_loader_arguments, check_training_data

__all__ = ["CrestCallback"]


def _check_batch_limit(trainer, loader) -> bool:
    """Warn when ``Trainer(limit_train_batches=...)`` cuts CREST's epochs short, and say whether it does:
    Lightning reads a float as a fraction of the epoch's batches and an int as a count of them (the int 1
    is one batch an epoch, not the whole epoch, although ``1 == 1.0``)."""
    limit = getattr(trainer, "limit_train_batches", 1.0)
    if limit is None or isinstance(limit, bool):
        return False
    spe = int(loader.steps_per_epoch)
    cut = (float(limit) < 1.0) if isinstance(limit, float) else (int(limit) < spe)
    if cut:
        # fast_dev_run and overfit_batches set limit_train_batches themselves: name what the user passed
        dev, over = getattr(trainer, "fast_dev_run", False), getattr(trainer, "overfit_batches", 0)
        if dev:
            how, fix = f"Trainer(fast_dev_run={dev!r})", "a debugging run: CREST's run is not meant to finish there"
        elif over:
            how, fix = (f"Trainer(overfit_batches={over!r})", "and CREST's batches change at every step, so no "
                        "batch repeats: to overfit a few batches, train on them without CrestCallback")
        else:
            how, fix = f"Trainer(limit_train_batches={limit!r})", "leave it out and set the budget instead"
        warnings.warn(
            f"{how} cuts each epoch short of CREST's share ({spe} batches an epoch, set by the budget): CREST's "
            f"epochs then drift from Lightning's and none counts as finished; {fix}",
            stacklevel=_common.user_stacklevel())
    return cut


def _processed(trainer) -> int | None:
    """The batches the fit loop has processed (trained) in total, as its checkpoints count them; None where
    the Trainer has no such counter."""
    progress = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "batch_progress", None)
    processed = getattr(getattr(progress, "total", None), "processed", None)
    return int(processed) if isinstance(processed, int) else None


def _check_accumulation(trainer) -> None:
    accumulate = getattr(trainer, "accumulate_grad_batches", 1)
    if accumulate != 1:
        raise ValueError(
            f"CrestCallback needs Trainer(accumulate_grad_batches=1), got {accumulate!r} (also when a "
            "GradientAccumulationScheduler sets it): CREST's batches are the optimizer's mini-batches (its budget "
            "counts them as steps and its trust check expects the parameters to move at each); for a larger "
            "effective batch raise CrestConfig(m=...)"
        )


def _check_step_limits(trainer, planned: int, loader, per: float = 1.0) -> None:
    """A fit without ``max_epochs`` ends at CREST's last planned step (global step ``planned``; checked at
    the fit's start, after a checkpoint's restore, or under manual optimization after the first trained
    batch, whose ``per`` optimizer steps a batch ``planned`` counts): refuse a ``min_steps`` beyond it
    (Lightning would then loop over empty epochs forever, ``max_time`` included) and warn that a
    ``max_steps`` beyond it stops a schedule sized from it early."""
    rate = "" if per == 1 else f", {per:g} optimizer steps a batch as the first batch took"
    low = getattr(trainer, "min_steps", None)
    if low is not None and low > planned:
        raise ValueError(
            f"Trainer(min_steps={low}) cannot be reached: CREST plans {loader.total_steps} steps ({loader.epochs} "
            f"epochs at {loader.steps_per_epoch} a budgeted epoch{rate}), so the fit would stop at global step {planned} "
            "and Lightning, held by min_steps, would loop over empty epochs without end. Lower min_steps, or raise "
            "the budget or CrestCallback(epochs=...)")
    high = getattr(trainer, "max_steps", -1)
    if high is not None and high > planned:
        # under manual optimization a batch is not one optimizer step (accumulation: fewer; several optimizers:
        # more, the global step counting each), so total_steps, CREST's batches, is no scheduler's length there
        size = ("crest.loader.total_steps" if per == 1 else
                f"the steps its optimizer takes in CREST's {loader.total_steps} batches ({planned} global steps in "
                "all; Lightning counts every optimizer's)")
        warnings.warn(
            f"Trainer(max_steps={high}) without max_epochs, but CREST plans {loader.total_steps} steps "
            f"({loader.epochs} epochs{rate}): the fit stops at global step {planned}, and a per-step scheduler sized "
            f"from trainer.estimated_stepping_batches ({high}) stops at about {planned / high:.0%} of its "
            f"schedule. Size it from {size}, or set max_epochs (and leave max_steps unset)",
            stacklevel=_common.user_stacklevel())


def _skipped(outputs, module) -> bool:
    """Whether Lightning skipped the step: ``training_step`` returned None (passed on as None, or as ``{}``
    under automatic optimization; under manual optimization the step trained whatever it returned)."""
    if outputs is None:
        return True
    return isinstance(outputs, dict) and not outputs and bool(getattr(module, "automatic_optimization", True))


def _data_function(data) -> bool:
    """Whether ``data`` (the callback's ``dataset`` or ``measure_dataset``) is a function that returns the
    dataset when the fit is set up, rather than a dataset: callable, and neither indexable nor sized."""
    return data is not None and callable(data) and not hasattr(data, "__getitem__") and not hasattr(data, "__len__")


def _called(function, name: str):
    """What the function given as ``name`` returns at setup; None is refused with what to do."""
    data = function()
    if data is None:
        raise ValueError(
            f"CrestCallback's {name} function returned None at the fit's setup: it must return the dataset "
            "(a LightningDataModule builds it in its setup, which the Trainer runs before the callback's when "
            "the DataModule is passed to fit: trainer.fit(module, datamodule=dm))")
    return data


def _check_epoch_validation(trainer, loader: CrestLoader) -> None:
    """Under ``budget_counts="passes"`` an epoch's pass ends when its share of the measurement budget is spent,
    before ``len(dataloader)`` batches; Lightning learns of it only from the loader's end and then leaves its
    epoch loop without the validation it runs at an epoch's end (review 124: none in 4 epochs, no checkpoint
    by ``monitor=``, ``EarlyStopping`` failing on the missing metric). Said when the fit validates by epochs."""
    if loader.budget_counts != "passes" or getattr(trainer, "check_val_every_n_epoch", None) is None:
        return
    try:
        validates = bool(trainer.enable_validation)
    except Exception:  # noqa: BLE001 - a Lightning without the property: not said
        return
    if validates:
        warnings.warn(
            "CrestCallback(budget_counts='passes'): an epoch ends when its share of the measurement budget is spent, "
            "before len(dataloader) batches, and Lightning then skips the validation it runs at an epoch's end (and "
            "what monitors it: ModelCheckpoint(monitor=...), EarlyStopping, ReduceLROnPlateau). Validate by steps, "
            "Trainer(check_val_every_n_epoch=None, val_check_interval=k), or count the budget in training steps "
            "(budget_counts='steps', the default)", stacklevel=_common.user_stacklevel())


def _scheduler_steps(trainer) -> list[int] | None:
    """Under manual optimization with ``budget_counts``-relevant schedulers: each configured scheduler's step
    count (``last_epoch``), to tell at the first epoch's end whether ``training_step`` steps them per batch
    (review 159: its interval says nothing there); None otherwise."""
    module = getattr(trainer, "lightning_module", None)
    if module is None or getattr(module, "automatic_optimization", True) is not False:
        return None
    configs = getattr(trainer, "lr_scheduler_configs", None) or []
    return [int(getattr(c.scheduler, "last_epoch", 0)) for c in configs] or None


def _has_length(config) -> bool:
    """Whether a scheduler config's schedule has a length a budget could cut short: not a ``ReduceLROnPlateau``
    (stepped on a monitored metric, however often: review 160 saw it warned about after step-based validation)."""
    plateau = getattr(getattr(torch.optim, "lr_scheduler", None), "ReduceLROnPlateau", None)
    return not (getattr(config, "reduce_on_plateau", False) is True
                or (plateau is not None and isinstance(getattr(config, "scheduler", None), plateau)))


def _check_step_schedulers(trainer, loader: CrestLoader, before: list[int] | None = None) -> None:
    """Under ``budget_counts="passes"`` the fit trains fewer batches than ``len(dataloader)`` per epoch (the
    measurement passes take their share of the budget), so a scheduler stepped per batch and sized from
    ``trainer.estimated_stepping_batches`` stops short of its end (review 157: a OneCycle schedule at 7 of its 20
    steps, its learning rate near the peak); said at the fit's start when one has ``interval="step"``, and under
    manual optimization (``before``: the schedulers' step counts at the fit's start, :func:`_scheduler_steps`) at
    the first epoch's end when one with a length (not ``ReduceLROnPlateau``) was stepped more than once in it
    (review 158)."""
    if loader.budget_counts != "passes":
        return
    configs = getattr(trainer, "lr_scheduler_configs", None) or []
    now = _scheduler_steps(trainer) if before is not None else None
    manual = now is not None and len(now) == len(before) == len(configs) and any(
        b - a >= 2 and _has_length(c) for a, b, c in zip(before, now, configs))
    if manual or (before is None and any(getattr(c, "interval", None) == "step" and _has_length(c) for c in configs)):
        warnings.warn(
            "CrestCallback(budget_counts='passes') with a learning-rate scheduler stepped every batch "
            f"({'stepped more than once in the first epoch' if manual else 'interval=step'}): the measurement passes take "
            "their share of each epoch's budget, so the fit trains fewer batches than "
            "trainer.estimated_stepping_batches counts, and a schedule sized from it (OneCycleLR, a cosine decay) "
            "stops before its end. Count the budget in training steps (budget_counts='steps', the default: the "
            "schedule's length is then exact), or step the scheduler per epoch",
            stacklevel=_common.user_stacklevel())


_BATCH_HOOKS = ("on_before_batch_transfer", "on_after_batch_transfer")


def _warn_batch_hooks(trainer, pl_module) -> None:
    """Warn when the module or the DataModule changes the training batches in a batch hook (Lightning's place for
    on-device preprocessing) and no ``forward=`` is given: CREST's measurement passes read the dataset's items and
    call the model on them without those hooks, so every selection, check and fit measured inputs the model does
    not train on (review 181: a standardisation there changed half the first coreset and rho three to tenfold,
    silently)."""
    owners = [(pl_module, pl.LightningModule)]
    dm = getattr(trainer, "datamodule", None)
    if dm is not None:
        owners.append((dm, pl.LightningDataModule))
    found = [f"{type(obj).__name__}.{name}" for obj, parent in owners for name in _BATCH_HOOKS
             if name in vars(obj) or getattr(type(obj), name, None) is not getattr(parent, name, None)]
    # (a hook assigned on the instance is called too: review 182)
    if found:
        warnings.warn(
            f"CrestCallback: {', '.join(found)} may change the training batches, but CREST's measurement passes (its "
            "selections' features, trust checks and model fits) read the dataset's items and call the model on them "
            "without Lightning's batch hooks: if the hook transforms the inputs (normalises, augments on the "
            "device), pass CrestCallback(forward=lambda module, batch: module(transform(batch[0]))) with the same "
            "transform (without random augmentation), else CREST measures inputs the model does not train on; if "
            "it only moves or packs the batch, ignore this", stacklevel=_common.user_stacklevel())


def _check_lr_finder(trainer, loader) -> None:
    """Lightning's learning-rate finder (``Tuner.lr_find`` adds a ``LearningRateFinder`` to the callbacks for
    its fit) trains CREST's planned batches: a sweep longer than the plan stopped early, and Lightning then
    gave no suggestion or one read from the part of the sweep that ran, written into the module (review 147:
    3.0e-6 from a sweep stopped at 4.4e-6 of its 1.0). Said at setup."""
    finder = getattr(getattr(pl, "callbacks", None), "LearningRateFinder", None)
    for cb in getattr(trainer, "callbacks", None) or []:
        steps = getattr(cb, "_num_training_steps", None)
        if finder is not None and isinstance(cb, finder) and isinstance(steps, int) and steps > loader.total_steps:
            warnings.warn(
                f"CrestCallback: the learning-rate finder sweeps {steps} steps (num_training), but CREST plans "
                f"{loader.total_steps} ({loader.epochs} epochs at {loader.steps_per_epoch} a budgeted epoch): the "
                "sweep stops early, and its suggestion, if any, is read from the part that ran. Pass "
                f"num_training={loader.total_steps} or less", stacklevel=_common.user_stacklevel())


def _swa_batch_norm_epoch(trainer) -> bool:
    """Whether this epoch is the one Lightning's ``StochasticWeightAveraging`` adds after ``max_epochs`` for a
    model with BatchNorm: it resets the averaged model's BatchNorm statistics and recomputes them over the
    training batches, with no backward and no optimizer step."""
    swa = getattr(getattr(pl, "callbacks", None), "StochasticWeightAveraging", None)
    for cb in getattr(trainer, "callbacks", None) or []:
        if swa is not None and isinstance(cb, swa) and getattr(cb, "_model_contains_batch_norm", False):
            try:
                return int(trainer.current_epoch) == int(cb.swa_end) + 1
            except Exception:  # noqa: BLE001 - an SWA without the property: not its epoch as far as we know
                return False
    return False


class _CrestTrainLoader:
    """What ``trainer.fit`` iterates: a thin view of the callback's loader (built at ``setup``).

    Its own ``state_dict`` is only the position (Lightning stores it with the loops and then treats the
    loader as resumable); the controller's state travels in the callback's ``state_dict``.
    """

    def __init__(self, callback: CrestCallback):
        self._cb = callback

    def __len__(self) -> int:
        return len(self._cb._require_loader())

    def __getitem__(self, index):
        # a DataLoader given this loader as its dataset (DataLoader(crest.dataloader(), num_workers=2)) reads it by
        # index, in its workers, where the error was "'_CrestTrainLoader' object is not subscriptable" (review 181)
        raise TypeError(
            "crest.dataloader() is a loader of CREST's batches, not a dataset: hand it to the Trainer as it is. "
            "Its batches are loaded in the training process; measure_workers= loads CREST's measurement passes in "
            "worker processes, and for the training batches in workers use CrestBatchSampler in a loop of your "
            "own (docs/pytorch.md)")

    def __iter__(self):
        self._cb._require_loader()  # outside a fit the callback set up: its error now, as len() gives it
        return self._batches()

    def _batches(self):
        # the callback's loader is read at the first batch, not when Lightning makes the iterator: a fit
        # resumed from a checkpoint makes it before on_train_start, where the callback may still replace the
        # loader (a checkpoint without CREST's state, _foreign_checkpoint)
        trainer = self._cb._trainer
        if trainer is not None:
            self._check_training_loop(trainer)
        if self._cb._bn_epoch:
            yield from self._cb._batch_norm_batches()
        else:
            yield from self._cb._require_loader()
        if trainer is not None:
            self._cb._passed_epoch = int(trainer.current_epoch)

    def _check_training_loop(self, trainer) -> None:
        """Refuse a read of CREST's batches by another loop than the training loop's, and a second pass in one
        Trainer epoch (review 112: each took planned training steps, and the stats still counted them)."""
        other = next((name for name, flag in (("sanity check", "sanity_checking"), ("validation", "validating"),
                                             ("test", "testing"), ("predict", "predicting"))
                      if getattr(trainer, flag, False)), None)
        if other is not None:
            raise RuntimeError(
                f"CrestCallback: the Trainer's {other} loop reads crest.dataloader(): its batches are CREST's "
                "training steps, chosen and counted for training (a loop that reads them takes them from the "
                f"training epochs). Pass the {other} loop a DataLoader of its own")
        if not getattr(trainer, "training", True):
            # the fit's Trainer is not training: another Trainer (a predict or validate of a new one) reads them
            # (review 181: predict took two planned steps, counted as trained; validate was told of a CombinedLoader)
            raise RuntimeError(
                "CrestCallback: crest.dataloader() is read outside the training loop of the fit it was set up for "
                "(by another Trainer's loop, or after the fit): its batches are CREST's training steps, chosen and "
                "counted for training. Give other loops a DataLoader of their own")
        if self._cb._passed_epoch == int(trainer.current_epoch):
            raise RuntimeError(
                f"CrestCallback: crest.dataloader() is read a second time in Trainer epoch {trainer.current_epoch} "
                "after its pass ended: a CombinedLoader in its default mode='max_size_cycle' starts the shorter "
                "loader again, and CREST's next epochs would train inside this one. Combine it with "
                "mode='min_size'")

    def state_dict(self) -> dict:
        loader, trained = self._cb.loader, self._cb._trained()
        return {"position": None if loader is None else (loader.position if trained is None else trained)}

    def load_state_dict(self, state: dict) -> None:
        loader = self._cb.loader
        pos = state.get("position") if isinstance(state, dict) else None
        if loader is not None and pos is not None and pos != loader.position:
            warnings.warn(
                f"CrestCallback: the checkpoint's loop state is at CREST step {pos} but the callback's state "
                f"at step {loader.position}; was the checkpoint saved with this callback?",
                stacklevel=_common.user_stacklevel(),
            )


class CrestCallback(pl.Callback):
    """CREST for a LightningModule: weighted coreset batches, selection and checks inside ``fit``.

    Parameters are those of :class:`~crestcore.adapters.torch.CrestLoader` (the model is the
    LightningModule; ``epochs=None`` takes ``trainer.max_epochs``; ``dataset`` and ``measure_dataset`` may
    also be functions without arguments that return the dataset, called at each fit's setup, after a
    LightningDataModule's, which builds it: ``CrestCallback(lambda: dm.train_set, ...)``), except three that
    the Trainer decides: ``device`` (the module's), ``per_epoch`` (always True: the Trainer's epochs are
    CREST's) and ``callbacks`` (the statistics go to the Trainer's loggers, ``log_stats``); plus:

    losses_key : key of a ``training_step`` output dict holding the per-example training losses of the
        batch (detached), fed to the drop policy; None observes none. With dropping on (``T2``) an output
        without it is warned about once (the drop policy then sees the measurement passes' losses alone).
    log_stats : log ``crest/*`` scalars (selections, checks, last rho, T1, P, budget fractions) at the
        end of every training epoch with ``pl_module.log``.

    Attributes: ``loader`` (the ``CrestLoader``, after setup) and ``stats`` (its ``stats``).

    With dropping on, list it before a callback of yours that saves checkpoints from ``on_train_batch_end``:
    the batch's losses reach the drop policy in this callback's ``on_train_batch_end`` (a checkpoint written
    before it is warned about).

    Examples
    --------
    A linear classifier on 64 examples, trained for a quarter of the steps of two epochs:

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from crestcore import CrestConfig
    >>> class Classifier(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = torch.nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         return self.net(x)
    ...     def training_step(self, batch, batch_idx):
    ...         x, y, w = batch
    ...         losses = torch.nn.functional.cross_entropy(self(x), y, reduction="none")
    ...         return {"loss": (w * losses).mean(), "crest_losses": losses.detach()}
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> y = torch.arange(64) % 2
    >>> x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) + 2.0 * y[:, None]
    >>> crest = CrestCallback(TensorDataset(x, y), config=CrestConfig(m=8), budget=0.25, seed=0)
    >>> trainer = pl.Trainer(max_epochs=2, callbacks=[crest], accelerator="cpu", devices=1, logger=False,
    ...                      enable_checkpointing=False, enable_progress_bar=False,
    ...                      enable_model_summary=False)
    >>> trainer.fit(Classifier(), train_dataloaders=crest.dataloader())
    >>> trainer.global_step, crest.stats["step"], crest.stats["selections"][0]  # the first one at step 0
    (4, 4, 0)
    """

    def __init__(
        self,
        dataset,
        *,
        config: CrestConfig | None = None,
        budget: float = 0.1,
        epochs: int | None = None,
        seed: int = 0,
        budget_counts: str = "steps",
        labels=None,
        collate_fn: Callable | None = None,
        measure_dataset=None,
        measure_batch_size: int | None = None,
        measure_workers: int = 0,
        last_layer=None,
        forward: Callable | None = None,
        loss_fn: Callable | None = None,
        losses_key: str | None = "crest_losses",
        log_stats: bool = True,
        measure_cache_bytes: int = 256 << 20,
        progress: bool = False,
        reuse_checks: bool = True,
    ):
        super().__init__()
        # every argument is checked here, not at the first batch deep inside Trainer.fit
        check_count(epochs, "epochs", optional=True)
        config = check_loader_arguments(
            config=config, budget=budget, epochs=1 if epochs is None else epochs, seed=seed,
            budget_counts=budget_counts, per_epoch=True, measure_batch_size=measure_batch_size,
            collate_fn=collate_fn, forward=forward, loss_fn=loss_fn, measure_workers=measure_workers,
            check_model=False,
        )
        # the data as far as it can be checked without the module (last_layer is looked up at setup) and
        # without a pass over the items (labels found only by reading them are read once, at setup); a
        # dataset given as a function (a DataModule's, built in its setup) is checked when it is called
        if not _data_function(dataset):
            check_training_data(dataset, config.m, labels,
                                None if _data_function(measure_dataset) else measure_dataset, read_items=False)
        if losses_key is not None and not isinstance(losses_key, str):
            raise TypeError(f"losses_key must be a str or None, got {type(losses_key).__name__}")
        _common.check_bool(log_stats, "log_stats")
        _common.check_bool(progress, "progress")
        _common.check_bool(reuse_checks, "reuse_checks")
        _common.check_count(measure_cache_bytes, "measure_cache_bytes", low=0)
        self.dataset = dataset  # the dataset of the fit set up last, once a function given here was called
        self._data = (dataset, measure_dataset)  # as given: a function is called at each fit's setup
        self.epochs = epochs
        self.losses_key = losses_key
        self.log_stats = bool(log_stats)
        self._kwargs = dict(
            config=config, budget=budget, seed=seed, budget_counts=budget_counts, labels=labels,
            collate_fn=collate_fn, measure_dataset=measure_dataset, measure_batch_size=measure_batch_size,
            measure_workers=measure_workers, last_layer=last_layer, forward=forward, loss_fn=loss_fn,
            measure_cache_bytes=measure_cache_bytes, progress=progress, reuse_checks=reuse_checks,
        )
        self.loader: CrestLoader | None = None
        self._pending: dict | None = None
        self._load_for_fit = True  # the checkpoint Lightning loads next is fit's (on_load_checkpoint says)
        self._epoch0 = 0  # the Trainer epoch this callback's CREST run started at (a continued fit: later)
        self._cut = False  # limit_train_batches cuts CREST's epochs (warned at setup)
        self._restored = False  # a checkpoint's CREST state was loaded into this fit's loader
        self._limits_from: tuple[int, int] | None = None  # (global step, position) whose rate checks the limits
        self._last_position = -1  # the loader's position at the last batch start (is the batch CREST's?)
        self._in_flight = False  # a batch handed to a step that has not ended (on_train_batch_end)
        self._processed_at_start: int | None = None  # Lightning's processed-batch count when it started
        self._losses_warned = False  # dropping on and no losses under losses_key: said once
        self._losses_seen = False  # a training_step output held the losses (the order of the hooks matters then)
        self._trainer = None  # the Trainer of the fit set up last (which loop reads the batches)
        self._passed_epoch: int | None = None  # the Trainer epoch whose pass of CREST's loader ended last
        self._bn_epoch = False  # StochasticWeightAveraging's BatchNorm epoch (no CREST epoch): unweighted batches
        self._module = None  # the LightningModule and max_epochs of the fit set up last (for _load)
        self._max_epochs: int | None = None

    # -- the train dataloader -------------------------------------------------------------------
    def dataloader(self) -> _CrestTrainLoader:
        """The iterable to pass as ``train_dataloaders`` (or return from ``train_dataloader()``).

        Examples
        --------
        Its batches come from the callback's loader, which the Trainer sets up: pass the callback to the
        Trainer that fits with this dataloader (the class example shows the whole run). Alone it says so:

        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from crestcore import CrestConfig
        >>> data = TensorDataset(torch.zeros(64, 4), torch.arange(64) % 2)
        >>> crest = CrestCallback(data, config=CrestConfig(m=8), budget=0.25)
        >>> len(crest.dataloader())
        Traceback (most recent call last):
            ...
        RuntimeError: CrestCallback's dataloader is used before the callback was set up: ...
        """
        return _CrestTrainLoader(self)

    def _require_loader(self) -> CrestLoader:
        if self.loader is None:
            raise RuntimeError(
                "CrestCallback's dataloader is used before the callback was set up: pass the callback to "
                "the Trainer (callbacks=[crest]) that fits with crest.dataloader()"
            )
        return self.loader

    @property
    def stats(self) -> dict | None:
        return None if self.loader is None else self.loader.stats

    # -- hooks ----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        processes = int(getattr(trainer, "world_size", 1) or 1)
        if processes > 1:
            raise ValueError(
                f"CrestCallback runs in one process ({processes} here: devices/num_nodes): every process would "
                "select and train the same batches, and the step count would be wrong. For several processes "
                "use crestcore.adapters.distributed.DistributedCrestLoader in your own loop"
            )
        _check_accumulation(trainer)
        from lightning.pytorch.callbacks import BatchSizeFinder

        if any(isinstance(cb, BatchSizeFinder) for cb in getattr(trainer, "callbacks", [])):
            # (review 133: every trial trained CREST's batches of m, so every one "succeeded", and the size found
            # was written into the DataModule, where nothing uses it)
            raise ValueError(
                "CrestCallback cannot run under Lightning's batch-size finder (Tuner.scale_batch_size, "
                "BatchSizeFinder): its trials would train CREST's batches, of CrestConfig(m=...) examples whatever "
                "batch size they try, so the size it finds is meaningless. Choose m in CrestConfig(m=...) instead (a "
                "Trainer the finder ran on keeps it among its callbacks: fit with a new Trainer)")
        if self._kwargs["forward"] is None and type(pl_module).forward in (pl.LightningModule.forward,
                                                                           torch.nn.Module.forward):
            raise ValueError(
                f"CrestCallback measures the model by calling it, and {type(pl_module).__name__} has no "
                "forward(): define forward, or pass CrestCallback(forward=lambda module, batch: "
                "module.net(batch[0])) with the call your training_step makes"
            )
        # every fit is a new CREST run over the epochs it trains: a finished loader kept from an earlier fit
        # would hand out nothing. A Trainer fitted before starts at its current epoch (a continued fit trains
        # only the epochs up to max_epochs); a fit with ckpt_path restores the run's state after this
        # (load_state_dict, with the epoch its run started at) and continues it.
        epoch0 = int(getattr(trainer, "current_epoch", 0) or 0)
        epochs = self.epochs
        if epochs is None:
            epochs = trainer.max_epochs
            if epochs is None or epochs < 1:
                raise ValueError(
                    "CrestCallback needs the number of epochs the budget is a fraction of: set "
                    "Trainer(max_epochs=...) or CrestCallback(epochs=...)"
                )
            epochs -= epoch0
            if epochs < 1:  # the Trainer has trained its max_epochs: this fit trains nothing, keep the record
                return
        most = trainer.max_epochs
        span = None if most is None or most < 1 else int(most) - epoch0  # the epochs this fit trains
        if self.epochs is not None and span is not None and span != int(epochs):
            fits = f"Trainer(max_epochs={most})" + (f" from epoch {epoch0}: this fit trains {span}" if epoch0 else "")
            warnings.warn(
                f"CrestCallback(epochs={epochs}) but {fits}: CREST plans its budget over {epochs} epochs, so "
                + (f"the last {span - epochs} epochs yield no batches, and a per-step scheduler sized from "
                   f"trainer.estimated_stepping_batches (which counts {span} epochs) stops at about "
                   f"{epochs / span:.0%} of its schedule" if span > epochs else
                   f"the fit ends after {span} epochs with {epochs - span} epochs of the budget untrained")
                + "; leave epochs=None to take max_epochs", stacklevel=_common.user_stacklevel())
        self._module, self._max_epochs = pl_module, trainer.max_epochs
        self._trainer, self._passed_epoch = trainer, None
        self._resolve_data()
        if self._kwargs["forward"] is None:
            _warn_batch_hooks(trainer, pl_module)
        self.loader = self._new_loader(pl_module, epochs, self._kwargs)
        _check_lr_finder(trainer, self.loader)
        self._epoch0 = epoch0
        self._restored = False
        self._losses_warned = False  # said once a fit
        self._cut = _check_batch_limit(trainer, self.loader)
        if self._pending is not None:  # kept until it loads: a refused one is there for the retry (review 173)
            try:
                self._load(self._pending)
            except Exception as exc:
                exc.add_note("CrestCallback: the state given to load_state_dict stays pending for the next fit (a fit "
                             "of this callback starts from it once it loads); build a new CrestCallback to start "
                             "afresh")
                raise
            self._pending = None

    def _resolve_data(self) -> None:
        """The datasets of this fit: a function given for ``dataset`` or ``measure_dataset`` is called now
        (after a LightningDataModule's ``setup``, which the Trainer runs before its callbacks'), and what it
        returns gets the checks a dataset given directly got at construction."""
        dataset, measure = self._data
        called = False
        if _data_function(dataset):
            dataset, called = _called(dataset, "dataset"), True
        if _data_function(measure):
            measure, called = _called(measure, "measure_dataset"), True
        if called:
            kw = self._kwargs
            check_training_data(dataset, kw["config"].m, kw["labels"], measure, read_items=False)
        self.dataset, self._kwargs = dataset, dict(self._kwargs, measure_dataset=measure)

    def on_train_start(self, trainer, pl_module) -> None:
        loader = self._require_loader()
        now = int(getattr(trainer, "current_epoch", 0) or 0)
        if not self._restored and loader.position == 0 and now != self._epoch0:
            loader = self._foreign_checkpoint(trainer, pl_module, now)
        self._last_position = loader.position
        self._in_flight = False
        _check_epoch_validation(trainer, loader)
        _check_step_schedulers(trainer, loader)
        self._sched_steps = _scheduler_steps(trainer) if loader.budget_counts == "passes" else None
        most = trainer.max_epochs
        self._limits_from = None  # a manual-optimization rate is read again in every fit
        if most is None or most < 0:  # no max_epochs: the fit ends when CREST's planned steps are trained
            # here, not at setup: a fit with ckpt_path has restored the global step and CREST's position now
            if getattr(pl_module, "automatic_optimization", True):  # one optimizer step a batch
                end = int(trainer.global_step) + loader.total_steps - loader.position
                _check_step_limits(trainer, end, loader)
            else:  # manual optimization: as many as the step takes, read once the first batch has trained
                self._limits_from = (int(trainer.global_step), loader.position)

    def _batch_norm_batches(self):
        """StochasticWeightAveraging's BatchNorm epoch, no CREST epoch (review 124: it got no batch, and the
        averaged model kept the reset statistics, mean 0 and variance 1): ``len(dataloader)`` batches of ``m``
        examples (at most the training set's whole batches: a last batch of one example failed in BatchNorm,
        review 126) drawn without replacement from the whole training set (from the run's seed), weight 1, so
        the statistics are those of the data. No CREST step: nothing is selected, counted or observed."""
        loader = self._require_loader()
        m = loader.config.m
        batches = max(1, min(len(loader), loader.n // m))
        order = np.random.default_rng([loader.seed, 0x5A7]).permutation(loader.n)[: batches * m]
        for a in range(0, order.size, m):
            idx = np.sort(order[a : a + m])
            yield _weighted_batch(loader, idx, np.ones(idx.size))

    def _new_loader(self, module, epochs: int, kwargs: dict) -> CrestLoader:
        with _common.budget_said():  # said at construction
            loader = CrestLoader(module, self.dataset, epochs=int(epochs), per_epoch=True, **kwargs)
        loader._warned_broken = True  # Lightning's loop ends passes early on purpose (limit_train_batches: said)
        return loader

    def _rebuilt(self, module, epochs: int) -> CrestLoader:
        """The loader of this fit planned anew over ``epochs`` (a checkpoint's run, or one without CREST's
        state): labels the loader built at setup found by reading the dataset are taken from it, not read
        again, and still checked against the items as that loader would have."""
        old = self.loader
        kwargs = dict(self._kwargs)
        found = kwargs["labels"] is None and old is not None
        if found:
            kwargs["labels"] = old.labels
        loader = self._new_loader(module, epochs, kwargs)
        if found:
            loader.ops._check_labels = old.ops._check_labels or loader.ops._check_labels
            loader.ops._labels_origin = old.ops._labels_origin
        return loader

    def _foreign_checkpoint(self, trainer, pl_module, now: int) -> CrestLoader:
        """``fit(ckpt_path=...)`` restored a checkpoint without CREST's state (one saved before CREST was
        added): the Trainer continues at epoch ``now``, which setup could not see. A new CREST run over the
        epochs from there to max_epochs, as for a continued fit, said in a warning (before, the run was
        planned from epoch 0 and ``set_epoch`` jumped ahead of it)."""
        epochs = self.epochs
        if epochs is None:
            epochs = int(trainer.max_epochs) - now if trainer.max_epochs is not None and trainer.max_epochs >= 1 else None
        warnings.warn(
            f"CrestCallback: the checkpoint the Trainer resumed from (fit's ckpt_path) holds no CREST state; the "
            f"fit continues at epoch {now}, and CREST starts a new run over "
            + (f"its {epochs} epochs to max_epochs" if epochs else "the remaining epochs")
            + " (the checkpoint's own training is not part of CREST's budget report)",
            stacklevel=_common.user_stacklevel())
        if epochs is not None and epochs >= 1:
            self.loader = self._rebuilt(pl_module, int(epochs))
        self._epoch0 = now
        return self._require_loader()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        loader = self._require_loader()
        e = trainer.current_epoch - self._epoch0
        # (also inside CREST's plan: CrestCallback(epochs=) beyond max_epochs puts SWA's epoch there, review 126)
        self._bn_epoch = _swa_batch_norm_epoch(trainer)
        if 0 <= e < loader.epochs and not self._bn_epoch:
            # with limit_train_batches cutting the epochs, their drift was said at setup: not again as a
            # set_epoch of the user's, ahead of the run
            loader._drift_said = self._cut
            loader.set_epoch(e)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._bn_epoch:  # SWA's statistics pass: no CREST step (SWA sets the accumulation for it)
            return
        _check_accumulation(trainer)  # a GradientAccumulationScheduler sets it at each epoch's start
        loader = self._require_loader()
        if loader.position == self._last_position:
            raise RuntimeError(
                "CrestCallback: this batch did not come from CREST's loader (its position did not move): the "
                "Trainer trains on another dataloader (a LightningDataModule's or the module's own "
                "train_dataloader?), or a CombinedLoader goes on after CREST's loader has yielded its share of the "
                "epoch (mode='max_size': CREST's loader yields only its budget's share of each epoch; combine it "
                "with mode='min_size'). Pass train_dataloaders=crest.dataloader() to fit, or return "
                "crest.dataloader() from train_dataloader()")
        self._last_position = loader.position
        self._in_flight = True
        self._processed_at_start = _processed(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_flight = False
        if self._bn_epoch:  # nothing trains in SWA's statistics pass: its losses are no CREST step's
            return
        if self._limits_from is not None and self.loader is not None:
            g0, p0 = self._limits_from
            done, steps = self.loader.position - p0, int(trainer.global_step) - g0
            if done > 0 and steps > 0:  # the optimizer steps a batch takes under this manual optimization
                self._limits_from = None
                per = steps / done
                _check_step_limits(trainer, g0 + math.ceil(per * (self.loader.total_steps - p0)), self.loader, per)
        key, loader = self.losses_key, self.loader
        if loader is None or key is None:
            return
        if isinstance(outputs, dict) and key in outputs:
            self._losses_seen = True
            loader.observe(outputs[key])
        elif not _skipped(outputs, pl_module) and loader.config.T2 is not None and not self._losses_warned:
            self._losses_warned = True  # a misspelled key changed which examples were dropped, without a word
            got = (f"holds {sorted(map(str, outputs))}" if isinstance(outputs, dict) else
                   f"is a {type(outputs).__name__}")
            warnings.warn(
                f"CrestCallback: dropping is on (CrestConfig(T2={loader.config.T2})) but training_step's output "
                f"(as Lightning passes it on: {got}) has no {key!r}: the drop policy sees only the measurement "
                f"passes' losses. Return a dict with the per-example losses under {key!r} (detached), or pass "
                "losses_key=None to observe none (warned once a fit)", stacklevel=_common.user_stacklevel())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # a batch whose on_train_batch_start returned -1 (the rest of the epoch skipped) never reaches
        # on_train_batch_end; Lightning counts it processed, and an epoch-end checkpoint is past it (review 146)
        self._in_flight = False
        if self.loader is None:
            return
        loader = self.loader
        before, self._sched_steps = getattr(self, "_sched_steps", None), None  # (the fit's first epoch only)
        if before is not None:
            _check_step_schedulers(trainer, loader, before)
        unbounded = trainer.max_epochs is None or trainer.max_epochs < 0
        if unbounded and loader.position >= loader.total_steps and not trainer.should_stop:
            # every later epoch would be empty: with max_steps and no max_epochs the fit would never end
            high = trainer.max_steps
            if high is not None and 0 <= high <= trainer.global_step:  # max_steps is reached: it stops anyway
                return self._log_epoch(pl_module, loader)
            why = (f"max_steps={high} cannot be reached" if high is not None and high >= 0 else
                   "no max_epochs: every later epoch would be empty")
            warnings.warn(f"CrestCallback: all {loader.total_steps} planned steps ({loader.epochs} epochs) are "
                          f"trained at global step {trainer.global_step}; stopping the fit ({why})",
                          stacklevel=_common.user_stacklevel())
            trainer.should_stop = True
        self._log_epoch(pl_module, loader)

    def _log_epoch(self, pl_module, loader) -> None:
        if self.log_stats:
            pl_module.log_dict(scalars(loader.stats), on_step=False, on_epoch=True)

    # -- checkpoints ----------------------------------------------------------------------------
    def _trained(self) -> int | None:
        """The batches of the run trained: the loader's position, less the batch of a step that has not ended
        (a checkpoint written from inside it, OnExceptionCheckpoint's or a preemption's, review 91: it was
        counted as trained, and the resumed fit, which Lightning restarts at the completed batches, skipped
        it); None when nothing is in flight. A batch whose step has run counts as trained, as Lightning counts
        it (it resumes after a batch it has processed): a checkpoint written in the ``on_train_batch_end`` of a
        callback listed before this one, after the optimizer step, counted it as untrained, and the resumed
        fit trained it twice and never trained the run's last batch (review 140)."""
        if not (self._in_flight and self.loader is not None and self.loader.position):
            return None
        now = _processed(self._trainer)
        if now is not None and self._processed_at_start is not None and now > self._processed_at_start:
            return None  # Lightning has processed this batch: it resumes after it
        return self.loader.position - 1

    def state_dict(self) -> dict[str, Any]:
        if self.loader is not None:
            trained = self._trained()
            if (self._in_flight and trained is None and self.loader.config.T2 is not None and self.losses_key
                    is not None and not self._bn_epoch and self._losses_seen):
                # a checkpoint written after the step, before this callback's on_train_batch_end, where the batch's
                # losses reach the drop policy: it holds the batch as trained without them, and a run resumed
                # from it can drop other examples (review 142: weights 0.06 from the uninterrupted run's). (Moving
                # this callback first among the Trainer's callbacks instead changed the others' order: review 144)
                warnings.warn(
                    "CrestCallback: a checkpoint written after this batch's step but before CrestCallback's "
                    "on_train_batch_end (by a callback listed before it, or on an error raised there) holds the "
                    "batch as trained but not its losses, which the drop policy receives there: a run resumed from "
                    "it can drop other examples. List CrestCallback before callbacks that save checkpoints or may "
                    "raise in on_train_batch_end (Lightning's ModelCheckpoint runs last by itself)",
                    stacklevel=_common.user_stacklevel())
            return {**self.loader.state_dict(trained=trained), "lightning_epoch0": int(self._epoch0)}
        return dict(self._pending) if self._pending is not None else {}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # (Lightning calls this just before load_state_dict, with the Trainer: which entry point loads it; the
        # state is then handed over only where the checkpoint holds one for this callback, so the flag is set
        # only then: a stale one dropped the next load_state_dict of the user's, review 144)
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        states = checkpoint.get("callbacks") if isinstance(checkpoint, dict) else None
        mine = isinstance(states, dict) and bool(
            states.get(self.state_key, states.get(getattr(self, "_legacy_state_key", None))))
        self._load_for_fit = not mine or fn is None or str(getattr(fn, "value", fn)) == "fit"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for_fit, self._load_for_fit = self._load_for_fit, True
        if not state_dict or not for_fit:
            # a checkpoint loaded to evaluate (validate, test or predict with ckpt_path, the default test() after a
            # fit with a ModelCheckpoint) rewound the run's record and loader to it, failed on another run's plan,
            # or, before any fit, was applied to the next fit as if it resumed it (review 143): CREST's state is
            # restored by fit(ckpt_path=...) only
            return
        if self.loader is not None:
            self._load(dict(state_dict))
        else:
            self._pending = dict(state_dict)

    def _load(self, state: dict) -> None:
        """Restore a checkpoint into the loader built at setup. A run that started at a later epoch (a
        continued fit, ``lightning_epoch0``) plans the epochs from there to max_epochs: the loader is
        rebuilt for them first (one planned from epoch 0 would have grown the run's budget)."""
        state = dict(state)  # (the pending one is kept whole for a retry)
        epoch0 = int(state.pop("lightning_epoch0", 0))
        loader = self.loader
        if epoch0 != self._epoch0 and self.epochs is None and self._max_epochs:
            epochs = int(self._max_epochs) - epoch0
            if epochs < 1:
                raise ValueError(f"CrestCallback: the checkpoint's CREST run started at epoch {epoch0}, at or "
                                 f"beyond Trainer(max_epochs={self._max_epochs}): raise max_epochs")
            loader = self._rebuilt(self._module, epochs)
        loader.load_state_dict(state)  # (put in place once it accepted the state: a refused one changes nothing)
        self.loader, self._epoch0 = loader, epoch0
        self._restored = True
