"""Hugging Face adapter: CREST inside ``transformers.Trainer`` (and with ``accelerate``).

:class:`CrestTrainer` is a ``Trainer`` whose training batches are CREST's weighted coresets::

    from crestcore import CrestConfig
    from crestcore.adapters.huggingface import CrestTrainer

    trainer = CrestTrainer(model=model, args=TrainingArguments(..., num_train_epochs=3), train_dataset=train,
                           data_collator=collator, crest_config=CrestConfig(m=32), crest_budget=0.1)
    trainer.train()

It overrides two methods, nothing else: ``get_train_dataloader`` (a ``DataLoader`` over the training set
driven by a :class:`crestcore.adapters.torch.CrestBatchSampler`, with the Trainer's collator, workers
and pinned memory, prepared by the Trainer's ``Accelerator``) and ``compute_loss`` (the weighted mean of
the per-example cross-entropy of the model's logits). ``len`` of that loader is one epoch's share, so
the Trainer's step count, schedulers and logging follow the budget. Items are dicts of features with a
label under ``labels``, ``label`` or ``label_ids`` (the usual Hugging Face layout); the model returns
an output with ``.logits`` (any ``...ForSequenceClassification`` / ``...ForImageClassification``).

With plain ``accelerate``, use the sampler directly (``docs/pytorch.md`` has the loop)::

    sampler = CrestBatchSampler(model, train, config=CrestConfig(m=32), budget=0.1, epochs=3,
                                collate_fn=collator)
    loader = accelerator.prepare(sampler.dataloader(collate_fn=collator))

Limits: one process (the distributed adapter is separate); ``resume_from_checkpoint`` restores the
model and optimizer but not CREST's state (a resumed Trainer re-runs the skipped batches' selections).
``transformers`` and ``accelerate`` are optional: ``pip install 'crestcore[huggingface]'``.
"""

from __future__ import annotations

import math

try:
    import transformers
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "crestcore.adapters.huggingface needs transformers: pip install 'crestcore[huggingface]'"
    ) from exc
import torch
import torch.nn.functional as F

from crestcore.controller import CrestConfig

from .torch import CrestBatchSampler, WeightedDataset, check_loader_arguments

__all__ = ["CrestTrainer", "weighted_cross_entropy"]

_LABEL_KEYS = ("labels", "label", "label_ids")


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``mean_i w_i * CE(logits_i, labels_i)``: the training loss on a CREST batch (weights have mean 1)."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or weights.shape != labels.shape:
        raise ValueError(f"weighted_cross_entropy needs logits (k, C), labels (k,) and weights (k,); got "
                         f"{tuple(logits.shape)}, {tuple(labels.shape)} and {tuple(weights.shape)}")
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    return (weights.to(losses.dtype) * losses).mean()


class CrestTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains on CREST's weighted coreset batches.

    Extra keyword arguments (the rest are the Trainer's):

    crest_config : :class:`crestcore.CrestConfig`; ``m`` is the batch size (``per_device_train_batch_size``
        is not used for training batches). Default ``CrestConfig(m=args.per_device_train_batch_size)``.
    crest_budget : fraction of the full-data steps (default 0.1).
    crest_seed : seeds CREST's draws (default ``args.seed``).
    crest_labels : (n,) class indices; default read from the items' label key.
    crest_measure_batch_size : examples per measurement forward (default 64).
    crest_callbacks : listeners ``(event, step, scalars)`` (:mod:`crestcore.adapters.monitor`).

    ``trainer.crest`` is the :class:`~crestcore.adapters.torch.CrestBatchSampler` once training started
    (``trainer.crest.stats``).
    """

    def __init__(self, *args, crest_config: CrestConfig | None = None, crest_budget: float = 0.1,
                 crest_seed: int | None = None, crest_labels=None, crest_measure_batch_size: int = 64,
                 crest_callbacks=None, **kwargs):
        super().__init__(*args, **kwargs)
        m = crest_config.m if crest_config is not None else int(self.args.per_device_train_batch_size)
        config = crest_config if crest_config is not None else CrestConfig(m=m)
        seed = int(self.args.seed) if crest_seed is None else crest_seed
        check_loader_arguments(config=config, budget=crest_budget, seed=seed,
                               measure_batch_size=crest_measure_batch_size, check_model=False)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError("CrestTrainer needs gradient_accumulation_steps=1: CREST's batches are its "
                             "mini-batches (set the batch size with crest_config=CrestConfig(m=...))")
        self.crest_config = config
        self.crest_budget = float(crest_budget)
        self.crest_seed = int(seed)
        self.crest_labels = crest_labels
        self.crest_measure_batch_size = int(crest_measure_batch_size)
        self.crest_callbacks = crest_callbacks
        self.crest: CrestBatchSampler | None = None
        # compute_loss returns a mean over the batch: the Trainer must not expect a sum over tokens
        self.model_accepts_loss_kwargs = False

    def _planned_epochs(self) -> int:
        if self.args.max_steps is not None and self.args.max_steps > 0:
            raise ValueError("CrestTrainer plans the run in epochs: set num_train_epochs, not max_steps")
        return max(1, int(math.ceil(self.args.num_train_epochs)))

    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise ValueError("CrestTrainer: training requires a train_dataset.")
        if self.crest is None or self.crest.model is not self.model:
            self.crest = CrestBatchSampler(
                self.model, self.train_dataset, config=self.crest_config, budget=self.crest_budget,
                epochs=self._planned_epochs(), seed=self.crest_seed, labels=self.crest_labels,
                collate_fn=self.data_collator, measure_batch_size=self.crest_measure_batch_size,
                callbacks=self.crest_callbacks,
            )
        a = self.args
        loader = torch.utils.data.DataLoader(
            WeightedDataset(self.train_dataset), batch_sampler=self.crest, collate_fn=self.data_collator,
            num_workers=a.dataloader_num_workers, pin_memory=a.dataloader_pin_memory,
            persistent_workers=a.dataloader_persistent_workers and a.dataloader_num_workers > 0,
        )
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "crest_weight" not in inputs:  # evaluation batches: the Trainer's own loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        weights = inputs.pop("crest_weight")
        inputs.pop("crest_index", None)
        key = next((k for k in _LABEL_KEYS if k in inputs), None)
        if key is None:
            raise ValueError(f"CrestTrainer: the batch has none of the label keys {_LABEL_KEYS}")
        labels = inputs.pop(key)
        outputs = model(**inputs)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        loss = weighted_cross_entropy(logits, labels, weights)
        return (loss, outputs) if return_outputs else loss
