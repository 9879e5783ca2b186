"""Hugging Face adapter: CREST inside ``transformers.Trainer`` (and with ``accelerate``).

:class:`CrestTrainer` is a ``Trainer`` whose training batches are CREST's weighted coresets::

    from crestcore import CrestConfig
    from crestcore.adapters.huggingface import CrestTrainer

    trainer = CrestTrainer(model=model, args=TrainingArguments(..., num_train_epochs=3), train_dataset=train,
                           data_collator=collator, crest_config=CrestConfig(m=32), crest_budget=0.1)
    trainer.train()

Its training comes from two overridden methods (the others it overrides keep the books: ``train`` and the
checkpoint writers for CREST's state, ``num_examples`` and ``get_total_train_batch_size``):
``get_train_dataloader`` (a ``DataLoader`` over the training set driven by a
:class:`crestcore.adapters.torch.CrestBatchSampler`, with the Trainer's collator, workers and pinned
memory, prepared by the Trainer's ``Accelerator``) and ``compute_loss`` (the weighted mean of
the per-example cross-entropy of the model's logits). ``len`` of that loader is one epoch's share, so
the Trainer's step count, schedulers and logging follow the budget. Items are dicts of features with a
label under ``labels``, ``label`` or ``label_ids`` (the usual Hugging Face layout); the model returns
an output with ``.logits`` (any ``...ForSequenceClassification`` / ``...ForImageClassification``).

With plain ``accelerate``, use the sampler directly (``docs/pytorch.md`` has the loop)::

    sampler = CrestBatchSampler(model, train, config=CrestConfig(m=32), budget=0.1, epochs=3,
                                collate_fn=collator)
    loader = accelerator.prepare(sampler.dataloader(collate_fn=WeightedCollate(collator)))

Checkpoints: every checkpoint the Trainer writes also holds CREST's state (``crest_state.pt``: the
controller, the run position and the batches handed out to the loader's workers but not yet trained), and
``trainer.train(resume_from_checkpoint=...)`` restores it, so a resumed run trains the same batches as
one that never stopped. Limits: one process (the distributed adapter is separate).
``transformers`` and ``accelerate`` are optional: ``pip install 'crestcore[huggingface]'``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
import os
import warnings

try:
    import transformers
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "crestcore.adapters.huggingface needs transformers: pip install 'crestcore[huggingface]'"
    ) from exc
import numpy as np
import torch
import torch.nn.functional as F

from crestcore.controller import CrestConfig

from . import _common
from .monitor import check_listeners
from .torch import (_LABEL_KEYS, CrestBatchSampler, WeightedCollate, WeightedDataset, WeightedKey, _output_logits,
                     dataset_labels)
from .torch import check_loader_arguments, check_map_style, check_training_data

__all__ = ["CrestTrainer", "weighted_cross_entropy", "CREST_STATE_NAME"]

CREST_STATE_NAME = "crest_state.pt"  # CREST's state in each of the Trainer's checkpoint folders


class _ResumedEpoch:
    """The batch sampler of a run resumed in the middle of an epoch. The Trainer skips the epoch's first
    ``lead`` batches (they were trained before the checkpoint) by discarding that many index lists of its
    loader unread (accelerate's ``skip_first_batches``). CREST's restored sampler continues with the
    first *untrained* batch, so the resumed pass leads with ``lead`` stand-ins for the Trainer to discard:
    the first ``m`` examples with zero weights (harmless even if something trained them).
    Later passes are the sampler's own."""

    leads_with_stand_ins = True  # a skip over it discards the stand-ins (the sampler's skip refusal knows)

    def __init__(self, sampler: CrestBatchSampler, lead: int, stand_in: list):
        self.sampler, self._lead, self._stand_in = sampler, int(lead), stand_in

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        lead, self._lead = self._lead, 0
        for _ in range(lead):
            yield list(self._stand_in)
        yield from self.sampler


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``mean_i w_i * CE(logits_i, labels_i)``: the training loss on a CREST batch (weights have mean 1).

    Examples
    --------
    >>> import torch
    >>> logits = torch.zeros(3, 2)
    >>> labels = torch.tensor([0, 1, 1])
    >>> weighted_cross_entropy(logits, labels, torch.ones(3))  # log 2 for every example
    tensor(0.6931)
    >>> weighted_cross_entropy(logits, labels, torch.tensor([3.0, 0.0, 0.0]))
    tensor(0.6931)
    """
    losses = _example_losses(logits, labels, weights, "weighted_cross_entropy needs")
    return (weights.to(losses.dtype) * losses).mean()


# the CrestTrainer whose training step runs now (training_step sets it): _CrestBatch tells it of reads
_STEP: contextvars.ContextVar = contextvars.ContextVar("crestcore_hf_step", default=None)


class _CrestBatch(dict):
    """A training batch (a plain dict's, or a BatchEncoding's items, which also read as attributes) that tells the
    trainer whose step runs when CREST's weights are read from it (by key, attribute, ``get`` or ``pop``;
    ``model(**batch)`` unpacks a dict without these calls, so passing the batch on does not count).
    Module-level, holding no trainer: it pickles (not for ``torch.load``'s default ``weights_only``, which reads
    plain dicts only: save ``dict(batch)``), and the Trainer's ``type(batch)({...})`` (moving it to the device)
    keeps it."""

    def _read(self, key):
        if key == "crest_weight":
            trainer = _STEP.get()
            if trainer is not None:
                trainer._crest_used = True

    def __getitem__(self, key):
        self._read(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._read(key)
        return super().get(key, default)

    def pop(self, key, *default):
        self._read(key)
        return super().pop(key, *default)

    def copy(self):
        return type(self)(self)

    def __getattr__(self, name):
        # a BatchEncoding's items read as attributes (inputs.input_ids), as the batch it replaces allowed
        if name.startswith("__") or name not in self:
            raise AttributeError(name)
        self._read(name)
        return dict.__getitem__(self, name)


def _owner(trainer) -> str:
    """The ``compute_loss`` a trainer's steps run, by its qualified name."""
    return type(trainer).compute_loss.__qualname__


_USE_THE_WEIGHTS = (
    "For a loss of your own (class weights, say) pass crest_loss_fn=lambda logits, labels: F.cross_entropy(logits, "
    "labels, weight=w, reduction='none') and drop the override, or call super().compute_loss(model, inputs, ...) "
    "from it; an override that weights its per-example losses itself takes the weights off the batch first, "
    "w = inputs.pop('crest_weight') (and inputs.pop('crest_index', None)), before calling the model")


def _example_parts():
    """The examples' fine-tuning run: ``(model, args, data, labels, folder)``, a one-layer BERT (untrained) for 64
    token sequences of two classes (``data``: dicts with ``input_ids`` and ``labels``), ``TrainingArguments`` of two
    epochs on the CPU writing nothing (``folder``, a temporary directory, is their output_dir: clean it up), and
    the labels."""
    import tempfile

    ids = torch.randint(3, 60, (64, 8), generator=torch.Generator().manual_seed(0))
    labels = (ids[:, 0] % 2).tolist()
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(64)]
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=8, num_labels=2))
    folder = tempfile.TemporaryDirectory()
    args = transformers.TrainingArguments(
        output_dir=folder.name, num_train_epochs=2, learning_rate=5e-3, use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, per_device_train_batch_size=8)
    return model, args, data, labels, folder


def _example_losses(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, who: str) -> torch.Tensor:
    """The per-example cross-entropies (float32 at least) of :func:`weighted_cross_entropy`, the shapes
    checked first (``who`` leads the message)."""
    if labels.ndim == 2 and labels.shape[1] == 1:  # a column of class indices (size-1 label tensors, collated)
        labels = labels[:, 0]
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or weights.shape != labels.shape:
        raise ValueError(f"{who} logits (k, C), labels (k,) and weights (k,); got {tuple(logits.shape)}, "
                         f"{tuple(labels.shape)} and {tuple(weights.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        # (class indices stored as floats, from a CSV or pandas: crest_labels= gives CREST the classes, but the
        # batches' labels are the collator's, and torch's cross-entropy took them for probabilities' shapes or
        # failed with its own message: review 151)
        raise TypeError(f"{who} integer class indices as the batch's labels, got {labels.dtype}: cast them to "
                        "integers in the dataset or the data collator (crest_labels= gives CREST the classes, but "
                        "the training step's loss reads the labels of each batch)")
    if labels.dtype not in (torch.int64, torch.uint8):  # int32, int16 class indices (torch takes int64 or uint8)
        labels = labels.long()
    return F.cross_entropy(logits.float(), labels, reduction="none")


def _is_hf_dataset(data) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(data, datasets.Dataset)


class _ForwardColumns:
    """A data collator that first drops the keys of dict items that the model's ``forward`` does not take
    (keeping the label keys; CREST's ``crest_weight`` / ``crest_index`` never reach it: the training loader's
    ``WeightedCollate`` takes them out first), as the Trainer's own
    ``RemoveColumnsCollator`` does for a dataset that is not a ``datasets.Dataset``; other items pass as
    they are. A class (not a closure), so that ``DataLoader`` workers started with ``spawn`` can pickle it."""

    def __init__(self, collate, columns):
        from crestcore.adapters.torch import _row_safe

        self.collate = collate
        self.columns = frozenset(columns)
        self.crest_rows = _row_safe(collate)  # dropping keys keeps a row-per-example collate so

    def __call__(self, features):
        return self.collate([{k: v for k, v in f.items() if k in self.columns} if isinstance(f, dict) else f
                             for f in features])


def _warn_own_loss(model, inputs: dict, key: str, labels) -> None:
    """Warn when the model, given the labels, computes another loss than the cross-entropy of its logits
    (review 86: a class-weighted loss in its ``forward`` was replaced by plain cross-entropy in training, and
    only evaluation used it). One forward with the labels, in eval mode without gradients, on a forked RNG:
    the training's own random stream is untouched."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return
    if key not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    devices = [labels.device] if labels.device.type == "cuda" else []
    modes = [(m, m.training) for m in model.modules()]  # (a frozen part kept in eval mode stays so)
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            out = model(**inputs, **{key: labels})
            own = getattr(out, "loss", None) if not isinstance(out, dict) else out.get("loss")
            logits = _output_logits(out)
            if (not isinstance(own, torch.Tensor) or own.numel() != 1 or not isinstance(logits, torch.Tensor)
                    or logits.ndim != 2):
                return
            plain = F.cross_entropy(logits.float(), labels.reshape(-1).long())
        except Exception:  # noqa: BLE001 - a forward that does not take the labels so: nothing to compare
            return
        finally:
            for m, mode in modes:
                m.training = mode
    if not torch.isclose(own.float(), plain, rtol=1e-3, atol=1e-6):
        warnings.warn(
            f"CrestTrainer: the model computes its own loss from the labels ({float(own):.6g} on the first training "
            f"batch), not the cross-entropy of its logits ({float(plain):.6g}); CREST trains and measures the "
            "weighted cross-entropy, so training does not use the model's loss (evaluation does). Pass "
            "crest_loss_fn=lambda logits, labels: ... (per-example losses) for that loss",
            stacklevel=_common.user_stacklevel())


def _refuse_unsupported(trainer) -> None:
    """Trainer settings CREST would otherwise ignore or break silently."""
    a = trainer.args
    if a.world_size > 1 or trainer.accelerator.num_processes > 1:
        raise ValueError(f"CrestTrainer runs in one process ({a.world_size} here): every process would train "
                         "one run's batches, and the step count would be wrong. For several processes use "
                         "crestcore.adapters.distributed.DistributedCrestLoader in your own loop")
    if a.gradient_accumulation_steps != 1:  # (also when set after construction: a hyperparameter search's trial)
        raise ValueError("CrestTrainer needs gradient_accumulation_steps=1: CREST's batches are its "
                         "mini-batches (set the batch size with crest_config=CrestConfig(m=...))")
    if getattr(a, "auto_find_batch_size", False):
        raise ValueError("CrestTrainer: auto_find_batch_size=True would retry with a smaller "
                         "per_device_train_batch_size, which CREST's batches do not use (their size is "
                         "crest_config's m), from the middle of the spent run; set it False and choose m")
    if getattr(a, "label_smoothing_factor", 0.0):
        ls = a.label_smoothing_factor
        raise ValueError("CrestTrainer computes CREST's weighted cross-entropy itself: label_smoothing_factor "
                         f"({ls}) would be ignored; set it to 0 and pass the smoothed loss as CREST's, which the "
                         "training step and CREST's measurements then both use: crest_loss_fn=lambda z, y: "
                         f"torch.nn.functional.cross_entropy(z, y, label_smoothing={ls}, reduction='none')")
    strategy = getattr(a, "train_sampling_strategy", None)
    if getattr(a, "group_by_length", False) or strategy not in (None, "random"):
        what = "group_by_length=True" if getattr(a, "group_by_length", False) else f"train_sampling_strategy={strategy!r}"
        raise ValueError(f"CrestTrainer: CREST decides the training batches and their order, so {what} would be "
                         "ignored; leave the Trainer's sampling at its default ('random')")
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ValueError("CrestTrainer computes CREST's weighted cross-entropy itself: compute_loss_func would "
                         "not be called; leave it None and pass a per-example loss as crest_loss_fn=lambda logits, "
                         "labels: ... (reduction='none'), which the training step and CREST's measurements both use")


class CrestTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains on CREST's weighted coreset batches.

    Extra keyword arguments (the rest are the Trainer's):

    crest_config : :class:`crestcore.CrestConfig`; ``m`` is the batch size (``per_device_train_batch_size``
        is not used for training batches). Default ``CrestConfig(m=args.per_device_train_batch_size)``.
    crest_budget : fraction of the full-data steps (default 0.1).
    crest_seed : seeds CREST's draws (default ``args.seed``).
    crest_labels : (n,) class indices; default read from the items' label key.
    crest_measure_batch_size : examples per measurement forward (default 64; None: 128 on the CPU, 512 on an
        accelerator).
    crest_callbacks : listeners ``(event, step, scalars)`` (:mod:`crestcore.adapters.monitor`).
    crest_forward : ``forward(model, batch) -> logits`` (batch: the collated dict, labels included), for a
        model whose output is not ``.logits``, a ``"logits"`` entry or logits first in a tuple; used for the
        measurement passes and for the training loss alike. Default: the model called with the batch's
        inputs (labels left out), its logits found as just said.
    crest_loss_fn : ``loss_fn(logits, labels) -> (k,)`` per-example losses (``reduction="none"``), for a loss
        other than the plain cross-entropy (class weights): the training loss is the CREST-weighted mean of
        it, and CREST's quadratic model, trust checks and drop decisions measure it too (the sampler's
        ``loss_fn``). Default the cross-entropy.

    ``trainer.crest`` is the :class:`~crestcore.adapters.torch.CrestBatchSampler` once training started
    (``trainer.crest.stats``).

    Examples
    --------
    A one-layer BERT classifying 64 token sequences, trained for a quarter of the steps of two epochs
    (the Trainer writes nothing with ``save_strategy="no"``; its folder is a temporary one all the same):

    >>> import tempfile
    >>> import torch
    >>> import transformers
    >>> from crestcore import CrestConfig
    >>> ids = torch.randint(3, 60, (64, 8), generator=torch.Generator().manual_seed(0))
    >>> labels = (ids[:, 0] % 2).tolist()
    >>> data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(64)]
    >>> model = transformers.BertForSequenceClassification(transformers.BertConfig(
    ...     vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...     intermediate_size=32, max_position_embeddings=8, num_labels=2))
    >>> folder = tempfile.TemporaryDirectory()
    >>> args = transformers.TrainingArguments(
    ...     output_dir=folder.name, num_train_epochs=2, learning_rate=5e-3, use_cpu=True, report_to=[],
    ...     save_strategy="no", logging_strategy="no", disable_tqdm=True)
    >>> trainer = CrestTrainer(model=model, args=args, train_dataset=data,
    ...                        data_collator=transformers.default_data_collator,
    ...                        crest_config=CrestConfig(m=8), crest_budget=0.25, crest_labels=labels)
    >>> result = trainer.train()
    {'train_runtime': ...}
    >>> result.global_step, trainer.crest.steps_per_epoch  # 8 full-data steps per epoch, a quarter
    (4, 2)
    >>> folder.cleanup()
    """

    def __init__(self, *args, crest_config: CrestConfig | None = None, crest_budget: float = 0.1,
                 crest_seed: int | None = None, crest_labels=None, crest_measure_batch_size: int | None = 64,
                 crest_callbacks=None, crest_forward=None, crest_loss_fn=None, **kwargs):
        # before the Trainer's own checks: an IterableDataset there asks for max_steps, which CREST refuses
        train_dataset = kwargs["train_dataset"] if "train_dataset" in kwargs else (args[3] if len(args) > 3 else None)
        if train_dataset is not None:
            check_map_style(train_dataset, "train_dataset")
        super().__init__(*args, **kwargs)
        if crest_config is not None and not isinstance(crest_config, CrestConfig):
            raise TypeError(f"crest_config must be a crestcore.CrestConfig or None, got {type(crest_config).__name__}")
        config = crest_config if crest_config is not None else CrestConfig(m=int(self.args.per_device_train_batch_size))
        seed = int(self.args.seed) if crest_seed is None else crest_seed
        # the loader's checks, their errors naming the crest_* keywords this class takes
        check_loader_arguments(config=config, budget=crest_budget, seed=seed, forward=crest_forward,
                               loss_fn=crest_loss_fn, measure_batch_size=crest_measure_batch_size, check_model=False,
                               prefix="crest_")
        check_listeners(crest_callbacks, "crest_callbacks")
        if self.train_dataset is not None:  # as far as it can be checked without a pass over the items
            check_training_data(self.train_dataset, config.m, crest_labels, read_items=False, name="train_dataset",
                                labels_name="crest_labels")
        _refuse_unsupported(self)
        self._planned_epochs()  # max_steps refused here, not only when train() starts
        self.crest_config = config
        self._crest_m_from_args = crest_config is None  # m follows per_device_train_batch_size at each new run
        self.crest_budget = float(crest_budget)
        self.crest_seed = int(seed)
        self.crest_labels = crest_labels
        self.crest_measure_batch_size = crest_measure_batch_size  # checked above (check_loader_arguments)
        self.crest_callbacks = crest_callbacks
        self.crest_forward = crest_forward
        self.crest_loss_fn = crest_loss_fn
        self.crest: CrestBatchSampler | None = None
        self._crest_saved_in: str | None = None  # the checkpoint folder CREST's state was last written to
        self._crest_resume: str | None = None  # the checkpoint folder train() resumes from
        self._crest_new_run = True  # the next training dataloader starts a new CREST run
        self._crest_loss_checked = False  # the model's own loss compared with CREST's (first training batch)
        self._crest_pairs_checked = False  # the batch's labels compared with CREST's (first training batch)
        # whether the running training step's loss read CREST's weights, and whether a step that did not was said
        # this run (training_step; reviews 179, 182)
        self._crest_used = False
        self._crest_unread_warned = False
        # compute_loss returns a mean over the batch: the Trainer must not expect a sum over tokens
        self.model_accepts_loss_kwargs = False

    def get_total_train_batch_size(self, args) -> int:
        """The batch size the Trainer logs as "Total train batch size": CREST's ``m`` (one process, no
        accumulation), not ``per_device_train_batch_size``, which CREST's batches do not use. (The Trainer's
        own record, ``trainer_state.json``'s ``train_batch_size``, stays the argument's: a resume compares the
        two.)"""
        return int(self.crest_config.m)

    def _planned_epochs(self) -> int:
        if self.args.max_steps is not None and self.args.max_steps > 0:
            raise ValueError("CrestTrainer plans the run in epochs: set num_train_epochs, not max_steps")
        return max(1, int(math.ceil(self.args.num_train_epochs)))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; resuming from a checkpoint also restores CREST's state from it. Every other
        call is a new CREST run (a fresh schedule of ``num_train_epochs``), as a plain Trainer's second
        ``train()`` is a new pass over the data."""
        _refuse_unsupported(self)
        path = resume_from_checkpoint
        if isinstance(path, bool):
            path = transformers.trainer_utils.get_last_checkpoint(self.args.output_dir) if path else None
        self._crest_resume = None if path is None else str(path)
        self._crest_new_run = path is None
        try:
            out = super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._crest_resume = None
        crest = self.crest
        if crest is not None and crest.position > self.state.global_step:
            # the loader fetched batches beyond the last trained one (it runs ahead; a fractional
            # num_train_epochs stops within an epoch): they were not trained, so stats do not count them
            crest.rewind(int(self.state.global_step))
        return out

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        self._crest_saved_in = None
        super()._save_checkpoint(model, trial, *args, **kwargs)
        folder = os.path.join(self._get_output_dir(trial=trial),
                              f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self._crest_saved_in != folder:  # not written before a hub push (push_to_hub off)
            self._save_crest(folder)

    def _push_from_checkpoint(self, checkpoint_folder, *args, **kwargs):
        # the Trainer starts the hub upload of the checkpoint inside _save_checkpoint: CREST's state goes
        # into the folder first, so that the pushed checkpoint can be resumed
        self._save_crest(checkpoint_folder)
        return super()._push_from_checkpoint(checkpoint_folder, *args, **kwargs)

    def _save_crest(self, folder: str) -> None:
        if self.crest is None or not self.args.should_save:
            return
        # the Trainer has trained global_step batches of the run; the loader's workers may hold more
        torch.save(self.crest.state_dict(trained=int(self.state.global_step)),
                   os.path.join(folder, CREST_STATE_NAME))
        self._crest_saved_in = folder

    def _restore_crest(self, folder: str):
        """Load CREST's state saved with the checkpoint ``folder``; the batch sampler for the resumed run."""
        file = os.path.join(folder, CREST_STATE_NAME)
        if not os.path.isfile(file):
            raise ValueError(f"CrestTrainer: resume_from_checkpoint={folder!r} holds no {CREST_STATE_NAME} "
                             "(not written by a CrestTrainer); CREST's state cannot be restored from it")
        self.crest.load_state_dict(torch.load(file, weights_only=True))
        step = transformers.TrainerState.load_from_json(
            os.path.join(folder, transformers.trainer.TRAINER_STATE_NAME)).global_step
        if self.crest.position != step:
            raise ValueError(f"CrestTrainer: {file} is at batch {self.crest.position} of the run but the "
                             f"checkpoint's trainer state at step {step}; they were not saved together")
        lead = step % len(self.crest)
        if lead == 0 or self.args.ignore_data_skip:
            return self.crest
        stand_in = [WeightedKey(i, 0.0) for i in range(min(self.crest_config.m, self.crest.n))]
        return _ResumedEpoch(self.crest, lead, stand_in)

    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise ValueError("CrestTrainer: training requires a train_dataset.")
        _refuse_unsupported(self)  # (after the Trainer applied a hyperparameter search's trial to args)
        train_dataset = self.train_dataset
        collate = self.data_collator
        # as the Trainer does (remove_unused_columns): only the columns the model's forward takes, from a
        # datasets.Dataset by dropping its columns, from any other dataset in the collator (training batches
        # and measurement passes alike)
        if _is_hf_dataset(train_dataset):
            train_dataset = self._remove_unused_columns(train_dataset, description="training")
        elif self.args.remove_unused_columns:
            self._set_signature_columns_if_needed()
            collate = _ForwardColumns(self.data_collator, self._signature_columns)
        if (self.crest is None or self.crest.model is not self.model or self._crest_resume is not None
                or self._crest_new_run):
            self._crest_new_run = False
            self._crest_pairs_checked = False  # a new run's first batch is compared again
            self._crest_unread_warned = False
            size = int(self.args.per_device_train_batch_size)
            if self._crest_m_from_args and self.crest_config.m != size:
                # the batch size set after construction (a hyperparameter search's trial sets it inside train():
                # it had no effect, review 86) is this run's m, as at construction
                self.crest_config = dataclasses.replace(self.crest_config, m=size)
            labels = self.crest_labels
            key = self._crest_label_key()
            if labels is None and key is not None:  # items whose label is under the Trainer's own label name
                labels = dataset_labels(train_dataset, keys=(key,))
            with _common.budget_said():  # said at construction
                self.crest = CrestBatchSampler(
                    self.model, train_dataset, config=self.crest_config, budget=self.crest_budget,
                    epochs=self._planned_epochs(), seed=self.crest_seed, labels=labels,
                    collate_fn=collate, measure_batch_size=self.crest_measure_batch_size,
                    callbacks=self.crest_callbacks, forward=self.crest_forward, loss_fn=self.crest_loss_fn,
                )
        batch_sampler = self.crest
        if self._crest_resume is not None:
            batch_sampler = self._restore_crest(self._crest_resume)
            self._crest_resume = None  # restored once; a later call (a new epoch loop) builds nothing new
        a = self.args
        workers = int(a.dataloader_num_workers)
        extra = {}
        if workers > 0:  # the Trainer's own worker settings (seeded workers, prefetching, start method)
            extra = {"prefetch_factor": getattr(a, "dataloader_prefetch_factor", None),
                     "multiprocessing_context": getattr(a, "dataloader_multiprocessing_context", None),
                     "worker_init_fn": functools.partial(transformers.trainer_utils.seed_worker, num_workers=workers,
                                                         rank=a.process_index)}
        # with the drop policy on, each item carries its index: the losses of a trained batch are recorded
        # for its own examples (the prepared loader runs a batch ahead, so "the batch handed out last" is not).
        # The weights (and indices) go around the user's collator: one that builds its batch from the keys it
        # knows (a hand-written padding collator) dropped them, and every step trained unweighted (review 67)
        # every item carries its index: the first training batch's labels are compared with CREST's for those
        # examples (review 118), and with the drop policy on, the losses are recorded for their own examples
        with_index = True
        loader = torch.utils.data.DataLoader(
            WeightedDataset(self.crest.dataset, indices=with_index),
            batch_sampler=batch_sampler, collate_fn=WeightedCollate(collate, indices=with_index),
            num_workers=workers, pin_memory=a.dataloader_pin_memory,
            persistent_workers=a.dataloader_persistent_workers and workers > 0, **extra,
        )
        return self.accelerator.prepare(loader)

    def num_examples(self, dataloader) -> int:
        """The examples of one epoch of the training loader: CREST's batches times ``m`` (the Trainer's own
        count, the data set's length, would make its "Num examples" and ``train_samples_per_second``
        report the whole data set as trained, ``1 / budget`` times too many); other loaders as the Trainer
        counts them."""
        ds = getattr(dataloader, "dataset", None)
        if self.crest is not None and isinstance(ds, WeightedDataset) and ds.dataset is self.crest.dataset:
            return len(self.crest) * self.crest_config.m
        return super().num_examples(dataloader)

    def _crest_label_key(self) -> str | None:
        """``TrainingArguments(label_names=[key])``'s one key where it is none of the usual label keys (a model
        whose label argument is, say, ``targets``), else None."""
        names = list(getattr(self.args, "label_names", None) or [])
        return names[0] if len(names) == 1 and names[0] not in _LABEL_KEYS else None

    def training_step(self, model, inputs, *args, **kwargs):
        """The Trainer's step, with a warning (once a run) where its loss may not have read CREST's weights: a
        ``compute_loss`` of a subclass that passes the batch to the model (the usual ``labels =
        inputs.pop("labels"); outputs = model(**inputs)``) gives them to its forward, which may ignore them, and
        the coreset trained unweighted, silently (review 179). A step reads them when :meth:`compute_loss` runs on
        the batch (or a part of it), or when the override reads ``inputs["crest_weight"]`` from the batch it is
        given, a plain dict's (``get``, ``pop`` and ``copy()`` count too; unpacking the batch into the model's call
        does not; a ``BatchEncoding`` batch comes as a dict whose items read as attributes too; a read from
        another copy, ``dict(inputs)`` say, or from a batch of another mapping type cannot be seen, hence a
        warning and not a refusal: review 182). A forward that refuses the ``crest_*`` keys is said to be that.

        Examples
        --------
        A subclass that computes its own loss takes the weights (and indices) off the batch and weights its
        per-example losses (``crest_loss_fn=`` does the same without a subclass):

        >>> import torch
        >>> class Weighted(CrestTrainer):
        ...     def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ...         w, _ = inputs.pop("crest_weight"), inputs.pop("crest_index", None)
        ...         labels = inputs.pop("labels")
        ...         losses = torch.nn.functional.cross_entropy(model(**inputs).logits, labels, reduction="none")
        ...         return (w * losses).mean()
        >>> model, args, data, labels, folder = _example_parts()  # a one-layer BERT, 64 sequences of two classes
        >>> trainer = Weighted(model=model, args=args, train_dataset=data, crest_budget=0.25, crest_labels=labels)
        >>> trainer.train().global_step
        {'train_runtime': ...}
        4
        >>> folder.cleanup()
        """
        if "crest_weight" not in inputs:
            return super().training_step(model, inputs, *args, **kwargs)
        self._crest_used = False
        # a plain dict, or a BatchEncoding (DataCollatorWithPadding's: a UserDict, whose unpacking into the model's
        # call reads every key, so it is tracked as a dict with its items as attributes too; review 183); another
        # mapping is passed as it is, its reads unseen
        tracked = type(inputs) is dict or isinstance(inputs, transformers.BatchEncoding)
        token = _STEP.set(self)
        try:
            loss = super().training_step(model, _CrestBatch(inputs) if tracked else inputs, *args, **kwargs)
        except TypeError as exc:
            if "crest_weight" not in str(exc) and "crest_index" not in str(exc):
                raise
            raise ValueError(
                f"CrestTrainer: the model was called with CREST's batch keys ({exc}): {_owner(self)} passes the whole "
                "batch to the model. " + _USE_THE_WEIGHTS) from exc
        finally:
            _STEP.reset(token)
        if not self._crest_used and not self._crest_unread_warned:
            self._crest_unread_warned = True  # (once a run)
            seen = ("no read of inputs['crest_weight'] was seen" if tracked else
                    f"its reads of the batch (a {type(inputs).__name__}) cannot be seen")
            warnings.warn(
                f"CrestTrainer: {_owner(self)} did not call CrestTrainer.compute_loss in this training step, and "
                f"{seen}: unless it weights its per-example losses by the batch's crest_weight, the coreset trains "
                "unweighted (the usual outputs = model(**inputs) hands CREST's keys to the model's forward, which may "
                "ignore them), and the drop policy sees no losses. " + _USE_THE_WEIGHTS + ". If it does weight them "
                "(taken from a copy of the batch, say), ignore this (said once a run).",
                stacklevel=_common.user_stacklevel())
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "crest_weight" not in inputs:  # evaluation batches: the Trainer's own loss
            if model.training and self.crest is not None and self.is_in_train:
                raise ValueError(
                    "CrestTrainer: a training batch without CREST's weights ('crest_weight'): it would train "
                    "unweighted. Batches come from CrestTrainer.get_train_dataloader; an override of it must wrap "
                    "its collator in crestcore.adapters.torch.WeightedCollate")
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        weights = inputs.pop("crest_weight")
        index = inputs.pop("crest_index", None)
        self._crest_used = True
        # the Trainer's own label name (a model whose label argument is, say, "targets"; review 133), then the
        # usual keys
        own = self._crest_label_key()
        keys = _LABEL_KEYS if own is None else (own, *_LABEL_KEYS)
        key = next((k for k in keys if k in inputs), None)
        if key is None:
            raise ValueError(
                f"CrestTrainer: the batch has none of the label keys {keys}. A model whose forward takes no "
                "labels argument needs TrainingArguments(label_names=['labels']) (else the Trainer's "
                "remove_unused_columns drops them), or remove_unused_columns=False; labels under another key need "
                "TrainingArguments(label_names=[that key])")
        if self.crest_forward is not None:  # the measurement passes' forward, on the same batch (a copy: it
            labels = inputs[key]  # may pop the labels)
            outputs = logits = self.crest_forward(model, dict(inputs))
        else:
            labels = inputs.pop(key)
            outputs = model(**inputs)
            logits = _output_logits(outputs)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(
                f"CrestTrainer: the model's output gives no (batch, classes) logits (got {got}): return an output "
                "with .logits, a dict with a 'logits' entry or logits first in a tuple, or pass "
                "crest_forward=lambda model, batch: ... returning them")
        if self.crest_loss_fn is None:
            ell = _example_losses(logits, labels, weights, "CrestTrainer needs")  # weighted_cross_entropy's
            if not self._crest_loss_checked and self.crest_forward is None and model.training:
                self._crest_loss_checked = True
                _warn_own_loss(model, inputs, key, labels)
        else:
            ell = self.crest_loss_fn(logits, labels)
            if not isinstance(ell, torch.Tensor) or tuple(ell.shape) != (logits.shape[0],):
                raise ValueError(f"crest_loss_fn must return per-example losses of shape ({logits.shape[0]},) "
                                 f"(reduction='none'), got {getattr(ell, 'shape', type(ell).__name__)}")
        loss = (weights.to(ell.dtype) * ell).mean()
        if index is not None and self.crest is not None and model.training and not self._crest_pairs_checked:
            self._crest_pairs_checked = True
            self._check_batch_labels(labels, index)
        if index is not None and self.crest is not None and model.training and self.crest_config.T2 is not None:
            # the drop policy (CrestConfig(T2=...)) learns from the training losses of the trained examples
            # (the same per-example losses, computed once)
            self.crest.observe(ell.detach().float(), indices=index)
        return (loss, outputs) if return_outputs else loss

    def _check_batch_labels(self, labels: torch.Tensor, index: torch.Tensor) -> None:
        """The first training batch's labels against the labels CREST selects, fits and checks with for the
        same examples (``crest_labels``, or those read from the items): a mismatch means every measurement
        is of other examples' losses than the step trains, or that the step pairs its logits with other
        rows' labels (review 118), so it is refused."""
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            return
        got = labels.detach().reshape(-1).cpu().numpy().astype(np.int64)
        want = self.crest.labels[index.detach().cpu().numpy().astype(np.int64)]
        if got.shape != want.shape or np.array_equal(got, want):
            return
        bad = int((got != want).sum())
        raise ValueError(
            f"CrestTrainer: the labels of the first training batch are not the labels CREST uses for its examples "
            f"({bad} of {got.size} rows differ). CREST selects, weights, fits and checks example crest_index[r] "
            "with its label in crest_labels (or the label read from its item), so the step would train other "
            "losses than CREST measures. Either crest_labels do not list the train_dataset's labels in its order "
            "(taken before a shuffle, filter or split of the dataset?), or the data collator reorders the rows "
            "(sorted by length, say) while crest_forward undoes the order for the logits but not for the labels: "
            "return the labels (and every per-example field) in item order from the collator, or keep its rows "
            "in item order")
