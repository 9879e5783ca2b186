"""crestcore.adapters.huggingface: CrestTrainer inside transformers.Trainer, and the sampler with plain
accelerate. The model is a tiny BERT built from a config in the test (no hub download)."""

from __future__ import annotations

import dataclasses
import os

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from crestcore import CrestConfig  # noqa: E402
from crestcore.adapters.huggingface import CrestTrainer, weighted_cross_entropy  # noqa: E402
from crestcore.adapters.torch import CrestBatchSampler, WeightedCollate, WeightedDataset  # noqa: E402

N, SEQ, C = 192, 8, 3



class Texts(torch.utils.data.Dataset):
    """Token sequences whose class is the first token mod 3: dict items, as a tokenized HF dataset gives."""

    def __init__(self, n=N, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 60, (n, SEQ), generator=g)
        self.targets = (self.ids[:, 0] % C).tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.int64),
                "labels": self.targets[i]}


def tiny_bert(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=SEQ, num_labels=C,
                                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return transformers.BertForSequenceClassification(cfg)


def test_crest_trainer_trains_on_crests_batches(tmp_path):
    model = tiny_bert()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=16, learning_rate=5e-3,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
        lr_scheduler_type="linear",
    )
    events = []
    trainer = CrestTrainer(model=model, args=args, train_dataset=Texts(),
                           data_collator=transformers.default_data_collator,
                           crest_config=CrestConfig(m=16, r=48), crest_budget=0.5,
                           crest_callbacks=[lambda e, step, v: events.append((e, step))])
    before = [p.detach().clone() for p in model.parameters()]
    out = trainer.train()
    crest = trainer.crest
    spe = round(0.5 * 12)  # ceil(192 / 16) = 12 full steps per epoch
    assert crest.steps_per_epoch == spe and trainer.state.global_step == out.global_step == 3 * spe
    assert crest.position == crest.total_steps == 3 * spe
    st = crest.stats
    assert st["counters"]["selections"] >= 1 and st["checks"] and all(np.isfinite(st["rho"]))
    assert [s for e, s in events if e == "epoch"] == [spe, 2 * spe, 3 * spe]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the Trainer's scheduler was sized from len(loader) * epochs: linear decay ends at 0
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_the_loss_is_the_weighted_mean_of_per_example_cross_entropy():
    logits = torch.randn(5, C)
    labels = torch.tensor([0, 1, 2, 1, 0])
    w = torch.tensor([0.5, 1.5, 1.0, 0.25, 1.75])
    want = (w * torch.nn.functional.cross_entropy(logits, labels, reduction="none")).mean()
    assert torch.allclose(weighted_cross_entropy(logits, labels, w), want)
    with pytest.raises(ValueError, match="weights"):
        weighted_cross_entropy(logits, labels, w[:3])
    # class indices stored as floats (a CSV's): a message of CREST's saying to cast them where the batches are made,
    # not torch's about target dtypes or shapes (review 151: crest_labels= had been the advice, and then this failed)
    with pytest.raises(TypeError, match="integer class indices as the batch's labels, got torch.float32: cast them"):
        weighted_cross_entropy(logits, labels.float(), w)
    for dtype in (torch.int32, torch.int16, torch.uint8):  # other integer class indices: the same loss (review 153)
        assert torch.allclose(weighted_cross_entropy(logits, labels.to(dtype), w), want)


def test_crest_trainer_refuses_what_it_cannot_do(tmp_path):
    base = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        CrestTrainer(model=tiny_bert(), args=transformers.TrainingArguments(gradient_accumulation_steps=2, **base),
                     train_dataset=Texts())
    with pytest.raises(ValueError, match="budget"):
        CrestTrainer(model=tiny_bert(), args=transformers.TrainingArguments(**base), train_dataset=Texts(),
                     crest_budget=0)
    with pytest.raises(ValueError, match="num_train_epochs"):  # at construction, as the other settings
        CrestTrainer(model=tiny_bert(), args=transformers.TrainingArguments(max_steps=5, **base),
                     train_dataset=Texts(), data_collator=transformers.default_data_collator)
    t = CrestTrainer(model=tiny_bert(), args=transformers.TrainingArguments(**base),
                     train_dataset=Texts(), data_collator=transformers.default_data_collator)
    t.args.max_steps = 5  # set afterwards: refused when training starts
    with pytest.raises(ValueError, match="num_train_epochs"):
        t.get_train_dataloader()

    class Stream(torch.utils.data.IterableDataset):  # a stream: CREST reads by index
        def __iter__(self):
            return iter(Texts()[i] for i in range(len(Texts())))

    for extra in ({}, {"max_steps": 4}):  # the Trainer asks a stream for max_steps, which CREST refuses: neither
        with pytest.raises(TypeError, match="train_dataset must be a map-style.*IterableDataset"):
            CrestTrainer(model=tiny_bert(), args=transformers.TrainingArguments(**base, **extra),
                         train_dataset=Stream(), data_collator=transformers.default_data_collator)
        with pytest.raises(TypeError, match="train_dataset must be a map-style"):  # positionally too
            CrestTrainer(tiny_bert(), transformers.TrainingArguments(**base, **extra),
                         transformers.default_data_collator, Stream())
    # the data's checks at construction too (review 20: they came inside train()), where no pass over the
    # items is needed: crest_labels given, m against the examples
    n = len(Texts())
    with pytest.raises(ValueError, match=r"crest_labels must be 1-D with one class index per example"):
        CrestTrainer(model=tiny_bert(), args=transformers.TrainingArguments(**base), train_dataset=Texts(),
                     crest_labels=[0, 1])
    with pytest.raises(ValueError, match="single class"):
        CrestTrainer(model=tiny_bert(), args=transformers.TrainingArguments(**base), train_dataset=Texts(),
                     crest_labels=[0] * n)
    with pytest.raises(ValueError, match=f"m={n + 1} exceeds the .*{n} examples"):
        CrestTrainer(model=tiny_bert(), args=transformers.TrainingArguments(**base), train_dataset=Texts(),
                     crest_config=CrestConfig(m=n + 1))
    # settings it would otherwise ignore silently
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        CrestTrainer(model=tiny_bert(), args=transformers.TrainingArguments(label_smoothing_factor=0.1, **base),
                     train_dataset=Texts())
    with pytest.raises(ValueError, match="compute_loss_func"):
        CrestTrainer(model=tiny_bert(), args=transformers.TrainingArguments(**base), train_dataset=Texts(),
                     compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum())
    # review 37: the Trainer's sampling strategy was ignored silently (CREST decides the batches)
    strategies = [f.name for f in dataclasses.fields(transformers.TrainingArguments)]
    if "train_sampling_strategy" in strategies:
        for strategy in ("group_by_length", "sequential"):
            with pytest.raises(ValueError, match=f"train_sampling_strategy='{strategy}' would be ignored"):
                CrestTrainer(model=tiny_bert(), train_dataset=Texts(),
                             args=transformers.TrainingArguments(train_sampling_strategy=strategy, **base))
    else:  # older transformers: the flag
        with pytest.raises(ValueError, match="group_by_length=True would be ignored"):
            CrestTrainer(model=tiny_bert(), args=transformers.TrainingArguments(group_by_length=True, **base),
                         train_dataset=Texts())
    # review 86: set after construction (a hyperparameter search applies its trial's settings inside train()),
    # accumulation trained 8 batches as 4 steps with books of 4; auto_find_batch_size retried a spent run
    t = CrestTrainer(model=tiny_bert(), args=transformers.TrainingArguments(**base), train_dataset=Texts(),
                     data_collator=transformers.default_data_collator)
    t.args.gradient_accumulation_steps = 2
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        t.get_train_dataloader()
    with pytest.raises(ValueError, match="auto_find_batch_size=True would retry"):
        CrestTrainer(model=tiny_bert(), args=transformers.TrainingArguments(auto_find_batch_size=True, **base),
                     train_dataset=Texts())
    # several processes: every one would train the one run's batches
    t = CrestTrainer(model=tiny_bert(), args=transformers.TrainingArguments(**base), train_dataset=Texts())
    t.accelerator.state.num_processes = 2
    try:
        with pytest.raises(ValueError, match="one process"):
            t.train()
    finally:
        t.accelerator.state.num_processes = 1


def test_a_second_train_call_is_a_new_crest_run(tmp_path):
    """As a plain Trainer's second train() is a new pass over the data, a CrestTrainer's is a new CREST
    run (before: the used-up sampler was reused and the second call trained nothing)."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=1, learning_rate=5e-3, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    model = tiny_bert()
    trainer = CrestTrainer(model=model, args=args, train_dataset=Texts(),
                           data_collator=transformers.default_data_collator,
                           crest_config=CrestConfig(m=16, r=48), crest_budget=0.5)
    first = trainer.train().global_step
    sampler = trainer.crest
    before = [p.detach().clone() for p in model.parameters()]
    second = trainer.train().global_step
    assert first == second == 6 and trainer.crest is not sampler and trainer.crest.position == 6
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_datasets_dataset_keeps_only_the_columns_the_model_takes(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = Texts(n=64)
    data = datasets.Dataset.from_dict({"input_ids": texts.ids.tolist(), "labels": texts.targets,
                                       "note": ["x"] * 64, "idx": list(range(64))})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=1, learning_rate=5e-3, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = CrestTrainer(model=tiny_bert(), args=args, train_dataset=data,
                           data_collator=transformers.default_data_collator,
                           crest_config=CrestConfig(m=8, r=24), crest_budget=0.5)
    assert trainer.train().global_step == 4
    assert "note" not in trainer.crest.dataset.column_names and "idx" not in trainer.crest.dataset.column_names


class _WithExtraKeys(Texts):
    """Texts whose items also carry keys the model's forward does not take (an id, a note)."""

    def __getitem__(self, i):
        return {**super().__getitem__(i), "example_id": i, "note": torch.zeros(2)}


class _StrictBert(torch.nn.Module):
    """The tiny BERT behind a forward that takes only its own arguments (no **kwargs)."""

    def __init__(self):
        super().__init__()
        self.bert = tiny_bert()

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


@pytest.mark.parametrize("remove", [True, False])
def test_item_keys_the_model_does_not_take_are_dropped_as_the_trainer_drops_them(tmp_path, remove):
    # a plain Trainer drops them for any dataset (remove_unused_columns, in the collator): so does CrestTrainer,
    # in its training batches and its measurement passes; with remove_unused_columns=False neither does
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=1, learning_rate=5e-3, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, remove_unused_columns=remove)
    trainer = CrestTrainer(model=_StrictBert(), args=args, train_dataset=_WithExtraKeys(n=64),
                           data_collator=transformers.default_data_collator,
                           crest_config=CrestConfig(m=8, r=24), crest_budget=0.5)
    if not remove:
        with pytest.raises(TypeError, match="example_id"):
            trainer.train()
        return
    assert trainer.train().global_step == 4
    assert trainer.crest.stats["selections"]


def test_a_fractional_epoch_count_reports_only_the_batches_the_trainer_trained(tmp_path):
    """num_train_epochs=1.5 stops within the second epoch while the loader has fetched a batch ahead: that
    batch is not in CREST's report of the run."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=1.5, learning_rate=5e-3, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = CrestTrainer(model=tiny_bert(), args=args, train_dataset=Texts(n=128),
                           data_collator=transformers.default_data_collator,
                           crest_config=CrestConfig(m=16), crest_budget=0.25)
    steps = trainer.train().global_step
    st = trainer.crest.stats
    assert steps == 3 and st["budget"]["steps_done"] == st["counters"]["train_steps"] == steps
    assert st["counters"]["train_examples"] == 16 * steps and st["budget"]["epochs_done"] == 1


def test_a_datasets_datasets_labels_come_from_its_label_column_without_reading_rows(recwarn):
    datasets = pytest.importorskip("datasets")
    from crestcore.adapters.torch import dataset_labels

    y = [2, 0, 1, 1, 0, 2, 2]
    data = datasets.Dataset.from_dict({"input_ids": [[1, 2]] * 7, "label": y})
    assert dataset_labels(data).tolist() == y
    # the rows' order after shuffle/select, a Subset, a ClassLabel column and a torch format are all kept
    shuffled = data.shuffle(seed=3)
    assert dataset_labels(shuffled).tolist() == list(shuffled["label"]) != y
    assert dataset_labels(data.select([6, 1, 3])).tolist() == [2, 0, 1]
    assert dataset_labels(torch.utils.data.Subset(data, [5, 1])).tolist() == [2, 0]
    named = data.cast_column("label", datasets.ClassLabel(names=["a", "b", "c"]))
    assert dataset_labels(named).tolist() == dataset_labels(data.with_format("torch")).tolist() == y
    assert not [w for w in recwarn if "reading all" in str(w.message)]  # no pass over the rows
    # a transform may change what the items carry: the items are read (with the usual warning)
    moved = data.with_transform(lambda b: {"input_ids": b["input_ids"], "label": [v + 1 for v in b["label"]]})
    with pytest.warns(UserWarning, match="reading all 7 examples"):
        assert dataset_labels(moved).tolist() == [v + 1 for v in y]
    tokens = datasets.Dataset.from_dict({"input_ids": [[1, 2]] * 3, "labels": [[0, 1], [1, -100], [2, 2]]})
    with pytest.raises(ValueError, match="per-token or multi-label targets are not supported"):
        dataset_labels(tokens)
    ragged = datasets.Dataset.from_dict({"input_ids": [[1, 2]] * 3, "labels": [[0], [1, -100], [2, 2, 1]]})
    with pytest.raises(ValueError, match="not hold one class index per example.*per-token"):
        dataset_labels(ragged)
    hidden = data.with_format("torch", columns=["input_ids"])  # the items do not carry the label column
    # (refused at once, without a pass over the rows, which would find no label either: review 179)
    with pytest.raises(TypeError, match=r"its label column 'label' is not among the columns its format shows"):
        dataset_labels(hidden)


def test_the_sampler_with_plain_accelerate():
    acc = accelerate.Accelerator(cpu=True)
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    ds = Texts()
    sampler = CrestBatchSampler(model, ds, config=CrestConfig(m=16, r=48), budget=0.5, epochs=2, seed=0,
                                collate_fn=transformers.default_data_collator, measure_batch_size=64)
    model, opt = acc.prepare(model, opt)
    loader = acc.prepare(sampler.dataloader(collate_fn=transformers.default_data_collator))
    assert len(loader) == sampler.steps_per_epoch
    steps = 0
    for _ in range(2):
        for batch in loader:
            w = batch.pop("crest_weight")
            labels = batch.pop("labels")
            loss = weighted_cross_entropy(model(**batch).logits, labels, w)
            opt.zero_grad()
            acc.backward(loss)
            opt.step()
            steps += 1
    assert steps == sampler.total_steps == sampler.position
    assert sampler.stats["counters"]["selections"] >= 1


def test_under_accelerate_with_workers_each_batchs_losses_are_recorded_at_its_step(monkeypatch):
    """Review 96: accelerate's prepared loader takes a batch from the DataLoader before it yields the one
    before, one beyond the workers' prefetch; observe(indices=) looked for the trained batch only within the
    prefetch window and, with num_workers=2, recorded 23 of 24 batches' losses at the step of the cycled
    coreset's next copy, five steps later (the drop policy's records, and a resume, then differed)."""
    from crestcore import DropConfig

    recorded = []
    original = CrestBatchSampler._observe

    def spy(self, indices, losses, step=None):
        recorded.append(step)
        return original(self, indices, losses, step)

    monkeypatch.setattr(CrestBatchSampler, "_observe", spy)
    acc = accelerate.Accelerator(cpu=True)
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    config = CrestConfig(m=16, r=48, tau=0.05, T2=3, drop=DropConfig(alpha=0.05, window=8, min_records=1))
    sampler = CrestBatchSampler(model, Texts(), config=config, budget=1.0, epochs=2, seed=0,
                                collate_fn=transformers.default_data_collator)
    model, opt = acc.prepare(model, opt)
    collate = WeightedCollate(transformers.default_data_collator, indices=True)
    loader = acc.prepare(sampler.dataloader(indices=True, num_workers=2, collate_fn=collate))
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            w, idx, labels = batch.pop("crest_weight"), batch.pop("crest_index"), batch.pop("labels")
            losses = torch.nn.functional.cross_entropy(model(**batch).logits, labels, reduction="none")
            opt.zero_grad()
            acc.backward((w * losses).mean())
            opt.step()
            sampler.observe(losses.detach(), indices=idx)
    assert len(recorded) == sampler.total_steps > 10
    assert recorded == list(range(len(recorded)))


def test_a_state_saved_before_accelerates_batch_was_counted_resumes_without_a_false_warning():
    """Review 100: since accelerate's one-batch look-ahead is counted, a state saved before (its fetch_ahead
    workers x prefetch_factor only) was told on resume, under the very same loader, that it fetched another
    number of batches ahead and would continue differently. Such a state is compared without that batch."""
    acc = accelerate.Accelerator(cpu=True)

    def build():
        s = CrestBatchSampler(tiny_bert(), Texts(), config=CrestConfig(m=16, r=48), budget=0.5, epochs=2, seed=0,
                              collate_fn=transformers.default_data_collator)
        return s, acc.prepare(s.dataloader(collate_fn=transformers.default_data_collator))

    sampler, loader = build()
    steps = sum(1 for _ in loader)
    state = sampler.state_dict(trained=steps)
    assert (state["fetch_ahead"], state["fetch_ahead_accelerate"]) == (1, 1)
    old = {k: v for k, v in state.items() if k != "fetch_ahead_accelerate"}
    old["fetch_ahead"] = 0  # what the code of 2026-12-04 saved under this loader
    for saved, said in ((old, False), (state, False), ({**state, "fetch_ahead": 3}, True)):
        resumed, loader = build()
        resumed.load_state_dict(saved)
        loader.set_epoch(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            next(iter(loader))
        assert any("resumed under a DataLoader" in str(w.message) for w in caught) == said


def _accelerated_sampler(seed, tmp_path=None, workers=0, **kw):
    """A sampler, its accelerate-prepared DataLoader (batches carry their indices), a model and an optimizer;
    with ``tmp_path``, the sampler registered for accelerate's own checkpointing."""
    acc = accelerate.Accelerator(cpu=True)
    # no dropout: a resumed loop's new DataLoader iterator draws its base seed from torch's global generator,
    # after load_state restored it, so a dropout model's masks differ from the uninterrupted run's (torch's, not CREST's)
    model = tiny_bert(seed, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=5e-2)
    sampler = CrestBatchSampler(model, Texts(), config=CrestConfig(m=16, r=48), budget=0.5, epochs=3, seed=0,
                                collate_fn=transformers.default_data_collator, **kw)
    model, opt = acc.prepare(model, opt)
    loader = acc.prepare(sampler.dataloader(indices=True, num_workers=workers, collate_fn=WeightedCollate(
        transformers.default_data_collator, indices=True)))
    if tmp_path is not None:
        acc.register_for_checkpointing(sampler)

    def step(batch):
        w, labels, idx = batch.pop("crest_weight"), batch.pop("labels"), batch.pop("crest_index")
        loss = weighted_cross_entropy(model(**batch).logits, labels, w)
        opt.zero_grad()
        acc.backward(loss)
        opt.step()
        return tuple(idx.tolist())

    return acc, sampler, loader, step


def test_accelerates_own_checkpointing_resumes_a_sampler_exactly_mid_epoch(tmp_path):
    """Review 157: accelerate's register_for_checkpointing(sampler) calls state_dict() without trained=, and
    the batch its prepared loader holds ahead of the loop's was stored as trained: a mid-epoch save_state /
    load_state resumed one batch late (9 of the 10 remaining batches, batch 8 never trained), silently. The
    sampler counts what the DataLoader gave the loop, that held batch left out, so the resume is exact."""
    acc, sampler, loader, step = _accelerated_sampler(0, tmp_path)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in range(3):
            loader.set_epoch(epoch)
            for batch in loader:
                seen.append(step(batch))
                if len(seen) == 8:  # epoch 1, its second batch of six
                    acc.save_state(str(tmp_path / "ckpt"))
    assert len(seen) == 18
    acc, resumed, loader, step = _accelerated_sampler(5, tmp_path)
    acc.load_state(str(tmp_path / "ckpt"))
    assert resumed.position == 8
    rest = []
    for epoch in range(resumed.epoch, 3):
        loader.set_epoch(epoch)
        rest.extend(step(batch) for batch in loader)
    assert rest == seen[8:]


@pytest.mark.parametrize("workers", [0, 2])
def test_under_accelerate_stats_count_the_batches_the_loop_was_given(workers):
    """Review 157: inside an accelerate loop ``stats["step"]`` (and the training counters, the budget fractions)
    counted the batch the prepared loader holds ahead as trained, one more than the loop had got at every step
    but an epoch's last; ``state_dict()`` without trained= too."""
    _, sampler, loader, step = _accelerated_sampler(0, workers=workers)
    got = 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            step(batch)
            got += 1
            assert sampler.stats["step"] == sampler.stats["counters"]["train_steps"] == got
            assert sampler.state_dict()["position"] == got
    assert sampler.position == got == 12


@pytest.mark.parametrize("workers", [2, 0])
def test_under_accelerate_a_loop_left_one_batch_before_the_epochs_end_is_counted_or_warned_about(workers):
    """Review 158: with workers, a loop that left an epoch one batch before its end (a step limit) had the batch the
    prepared loader held counted as trained, by stats and by state_dict() (what save_state calls), silently: the
    resumed run trained 11 of 12 batches. stats count what the loop got; state_dict() without trained= warns.
    Review 160: without workers too."""
    _, sampler, loader, step = _accelerated_sampler(0, workers=workers)
    for k, batch in enumerate(loader, start=1):
        step(batch)
        if k == 5:  # of 6
            break
    assert sampler.position == 6 and sampler.stats["step"] == 5
    with pytest.warns(UserWarning, match=r"state_dict\(\) without trained="):
        sampler.state_dict()
    assert sampler.state_dict(trained=5)["position"] == 5


def test_a_whole_run_sampler_works_under_accelerate():
    """Review 158: accelerate's prepared loader calls set_epoch at each iteration, which a per_epoch=False
    sampler refused, telling the user to drop the option: the call is ignored there, and the one pass trains
    the whole run."""
    _, sampler, loader, step = _accelerated_sampler(0, per_epoch=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = sum(1 for batch in loader if step(batch))
    assert got == sampler.total_steps == sampler.position == 18
    with pytest.raises(ValueError, match="set_epoch is for per-epoch passes"):
        sampler.set_epoch(0)  # the user's own call is still refused


def test_accelerates_skip_loader_which_does_not_look_ahead_counts_no_batch_ahead():
    """Review 100: accelerate's SkipDataLoader yields each batch as it gets it; counted like its shards as a
    batch ahead, observe(losses) without indices= was refused though the batch in hand is the last handed out."""
    from accelerate.data_loader import SkipDataLoader

    sampler = CrestBatchSampler(tiny_bert(), Texts(), config=CrestConfig(m=16, r=48), budget=0.5, epochs=1, seed=0,
                                collate_fn=transformers.default_data_collator)
    loader = SkipDataLoader(WeightedDataset(Texts()), batch_sampler=sampler, skip_batches=0,
                            collate_fn=WeightedCollate(transformers.default_data_collator))
    batch = next(iter(loader))
    sampler.observe(torch.ones(batch["crest_weight"].shape[0]))  # accepted: no look-ahead
    assert sampler.state_dict()["fetch_ahead"] == 0


def test_a_sampler_resumed_under_accelerate_trains_the_rest_of_the_run():
    """accelerate's prepared loader calls set_epoch with its own count at every iteration (0 in a resumed
    process): an epoch handed out already is ignored (said once), so the resumed run trains its remaining
    batches instead of none."""
    acc = accelerate.Accelerator(cpu=True)
    kw = dict(config=CrestConfig(m=16, r=48), budget=0.5, epochs=3, seed=0,
              collate_fn=transformers.default_data_collator, measure_batch_size=64)
    first = CrestBatchSampler(tiny_bert(), Texts(), **kw)
    for _batch in acc.prepare(first.dataloader(collate_fn=transformers.default_data_collator)):
        pass  # epoch 0
    state = first.state_dict()
    resumed = CrestBatchSampler(tiny_bert(), Texts(), **kw)
    resumed.load_state_dict(state)
    loader = acc.prepare(resumed.dataloader(collate_fn=transformers.default_data_collator))
    with pytest.warns(UserWarning, match=r"set_epoch\(0\) named an epoch whose share is handed out already"):
        got = sum(1 for epoch in range(resumed.epoch, resumed.epochs) for _batch in loader)
    assert got == resumed.total_steps - state["position"] > 0 and resumed.position == resumed.total_steps


def test_skipping_the_first_batches_of_a_resumed_sampler_is_refused():
    """accelerate's skip_first_batches (its mid-epoch resume) over a restored sampler discarded batches CREST
    had not trained, and counted them as trained (review 67: 10 of 12 steps, silently); refused, and the
    plain resume trains the rest of the run."""
    acc = accelerate.Accelerator(cpu=True)
    kw = dict(config=CrestConfig(m=16, r=48), budget=0.5, epochs=2, seed=0,
              collate_fn=transformers.default_data_collator, measure_batch_size=64)
    first = CrestBatchSampler(tiny_bert(), Texts(), **kw)
    loader = acc.prepare(first.dataloader(collate_fn=transformers.default_data_collator))
    for step, _batch in enumerate(loader):
        if step == 3:
            break
    state = first.state_dict(trained=4)
    resumed = CrestBatchSampler(tiny_bert(), Texts(), **kw)
    resumed.load_state_dict(state)
    loader = acc.prepare(resumed.dataloader(collate_fn=transformers.default_data_collator))
    with pytest.raises(ValueError, match="skips the first 4 batches of CrestBatchSampler's pass"):
        next(iter(acc.skip_first_batches(loader, 4)))
    assert resumed.position == 4

    class Wrapper:  # a user's generator between the skip and the sampler (review 73: the skip went through)
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __iter__(self):
            yield from self.inner

    from accelerate.data_loader import SkipBatchSampler

    wrapped = torch.utils.data.DataLoader(WeightedDataset(Texts()), batch_sampler=SkipBatchSampler(
        Wrapper(resumed), skip_batches=2), collate_fn=transformers.default_data_collator)
    with pytest.raises(ValueError, match="skips the first 2 batches"):
        next(iter(wrapped))
    assert resumed.position == 4
    got = sum(1 for _batch in loader)  # the plain resume: the rest of the epoch
    assert got == resumed.steps_per_epoch - 4 and resumed.position == resumed.steps_per_epoch


def _resume_args(out, **kw):
    return transformers.TrainingArguments(
        output_dir=str(out), num_train_epochs=2, per_device_train_batch_size=16, learning_rate=5e-3,
        report_to=[], use_cpu=True, save_strategy="steps", save_steps=4, logging_strategy="no",
        disable_tqdm=True, seed=0, lr_scheduler_type="linear", **kw)


class _Recording(CrestTrainer):
    """Records each training batch (its token sum and weights) as the Trainer hands it to the loss."""

    def compute_loss(self, model, inputs, **kw):
        if "crest_weight" in inputs:
            self.batches.append((int(inputs["input_ids"].sum()), inputs["crest_weight"].tolist()))
        return super().compute_loss(model, inputs, **kw)


def _resume_trainer(out, **kw):
    model = tiny_bert()
    # no dropout: with DataLoader workers even a plain Trainer's resumed run draws other dropout masks
    # (measured: 0.009 max parameter difference on this model), so exactness is tested without it
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    t = _Recording(model=model, args=_resume_args(out, **kw), train_dataset=Texts(),
                   data_collator=transformers.default_data_collator,
                   crest_config=CrestConfig(m=16, r=48), crest_budget=0.5)
    t.batches = []
    return t


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_trainer_trains_the_same_batches_as_one_that_never_stopped(tmp_path, workers):
    """6 steps an epoch, checkpoints every 4: checkpoint-4 is in the middle of epoch 0 and (with
    workers) the loader has handed out batches beyond it. Resuming from it restores CREST's state and
    ends with the parameters, CREST counters and schedule of the uninterrupted run."""
    kw = dict(dataloader_num_workers=workers, dataloader_persistent_workers=workers > 0)
    whole = _resume_trainer(tmp_path / "a", **kw)
    whole.train()
    ckpt = tmp_path / "a" / "checkpoint-4"
    assert (ckpt / "crest_state.pt").is_file()
    state = torch.load(ckpt / "crest_state.pt", weights_only=True)
    assert state["position"] == 4
    if workers:  # batches prefetched beyond step 4 were saved to be handed out first after the restore
        assert len(state["pending"]) > 0

    resumed = _resume_trainer(tmp_path / "b", **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.train(resume_from_checkpoint=str(ckpt))
    # the same settings: no "resumed under a DataLoader that fetches 0 batches ahead" (review 67: the resumed
    # epoch's wrapper hid the DataLoader from the sampler, which then took its look-ahead for 0)
    assert not [w for w in caught if "resumed under a DataLoader" in str(w.message)], [str(w.message) for w in caught]
    # nor a pass taken for one left early: the resumed epoch's wrapper keeps the DataLoader's requests from the
    # sampler's count once it has ended (review 142: "gave your loop only -1 of them" on an exact resume)
    assert not [w for w in caught if "gave your loop only" in str(w.message)], [str(w.message) for w in caught]
    assert resumed.crest._pass_ahead == whole.crest._pass_ahead == 2 * workers + 1  # accelerate holds one more
    assert resumed.state.global_step == whole.state.global_step == 12
    assert resumed.crest.position == whole.crest.position == 12
    # the stats count the batches trained (review 146: one short under accelerate's held batch with workers)
    assert resumed.crest.stats["step"] == whole.crest.stats["step"] == whole.crest.stats["budget"]["steps_done"] == 12
    assert resumed.batches == whole.batches[4:] and len(resumed.batches) > 0  # the untrained rest, no stand-in
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    sa, sb = whole.crest.stats, resumed.crest.stats
    assert sa["counters"] == sb["counters"]
    np.testing.assert_allclose(sa["rho"][-3:], sb["rho"][-3:], rtol=1e-4)


def test_resuming_from_a_checkpoint_without_crest_state_is_refused(tmp_path):
    whole = _resume_trainer(tmp_path / "a")
    whole.train()
    ckpt = tmp_path / "a" / "checkpoint-4"
    (ckpt / "crest_state.pt").unlink()
    with pytest.raises(ValueError, match="crest_state.pt"):
        _resume_trainer(tmp_path / "b").train(resume_from_checkpoint=str(ckpt))


def test_a_checkpoint_pushed_to_the_hub_holds_crests_state(tmp_path, monkeypatch):
    """With push_to_hub the Trainer starts uploading the checkpoint folder inside _save_checkpoint: CREST's
    state must be in the folder by then (before, it was written after the upload had started, so a
    pushed checkpoint could lack it and not resume). The upload is replaced by a recorder; no hub."""
    pushed = []
    monkeypatch.setattr(transformers.Trainer, "_push_from_checkpoint",
                        lambda self, folder, *a, **k: pushed.append(sorted(os.listdir(folder))))
    t = _resume_trainer(tmp_path / "a")
    t.args.push_to_hub, t.args.hub_strategy = True, "checkpoint"
    t.train()
    assert len(pushed) == 3 and all("crest_state.pt" in files for files in pushed)
    state = torch.load(tmp_path / "a" / "checkpoint-8" / "crest_state.pt", weights_only=True)
    assert state["position"] == 8  # written once, at the checkpoint's step


def _short_trainer(tmp_path, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=16, learning_rate=5e-3,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    kw.setdefault("data_collator", transformers.default_data_collator)
    cls = kw.pop("trainer_class", CrestTrainer)
    model = kw.pop("model", None) or tiny_bert()
    return cls(model=model, args=args, train_dataset=Texts(), crest_config=CrestConfig(m=16, r=48),
               crest_budget=0.25, **kw)


def test_a_collator_returning_a_batch_encoding_trains(tmp_path):
    """DataCollatorWithPadding returns a BatchEncoding (a UserDict, not a dict): the measurement passes
    read it as the dict of the model's inputs it is."""
    def collate(features):
        return transformers.BatchEncoding(transformers.default_data_collator(features))

    trainer = _short_trainer(tmp_path, data_collator=collate)
    out = trainer.train()
    assert out.global_step == trainer.crest.total_steps == trainer.crest.position > 0
    assert trainer.crest.stats["counters"]["selections"] >= 1


def test_a_collator_that_builds_its_batch_from_the_keys_it_knows_trains_weighted(tmp_path):
    """A hand-written padding collator reads the keys it knows and drops the rest: CREST's weights went
    with them and every step trained unweighted, silently (review 67). They go around the collator now:
    the run trains the batches and weights of a run with the default collator, to the bit."""
    def pad(features):  # a collator of the usual hand-written kind: input_ids, attention_mask and labels only
        ids = torch.nn.utils.rnn.pad_sequence([f["input_ids"] for f in features], batch_first=True)
        return {"input_ids": ids, "attention_mask": (ids != 0).long(),
                "labels": torch.tensor([f["labels"] for f in features])}

    runs = []
    for collate in (transformers.default_data_collator, pad):
        trainer = _short_trainer(tmp_path / str(len(runs)), data_collator=collate)
        seen = []
        original = trainer.compute_loss

        def spy(model, inputs, _orig=original, _seen=seen, **kw):
            if model.training:
                _seen.append(inputs["crest_weight"].tolist())
            return _orig(model, inputs, **kw)

        trainer.compute_loss = spy
        trainer.train()
        runs.append((seen, [p.detach().clone() for p in trainer.model.parameters()]))
    (w0, p0), (w1, p1) = runs
    assert len(w1) == len(w0) > 0 and w1 == w0 and any(len(set(w)) > 1 for w in w1)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_crest_loss_fn_is_the_loss_trained_and_measured(tmp_path):
    """A class-weighted loss (review 67: CrestTrainer had no loss_fn; only a compute_loss override, which
    CREST's measurements would not follow): the training loss is its CREST-weighted mean, and the sampler
    measures it."""
    cw = torch.tensor([1.0, 3.0, 0.5])

    def weighted(z, y):
        return torch.nn.functional.cross_entropy(z, y, weight=cw, reduction="none")

    trainer = _short_trainer(tmp_path, crest_loss_fn=weighted)
    trainer.train()
    assert trainer.crest.ops.loss_fn is weighted
    batch = transformers.default_data_collator([Texts()[i] for i in range(4)])
    batch["crest_weight"] = torch.tensor([0.5, 1.0, 1.5, 1.0])
    trainer.model.eval()  # (no dropout: the same logits in both calls)
    got = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        z = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = (batch["crest_weight"] * weighted(z, batch["labels"])).mean()
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    # a training step evaluates the loss once: the drop policy observes the per-example losses trained on
    # (it evaluated crest_loss_fn a second time on the detached logits)
    calls = []

    def counted(z, y):
        calls.append(1)
        return weighted(z, y)

    class Observer:
        def observe(self, losses, indices):
            self.seen = (losses, indices)

    trainer.crest_loss_fn, trainer.crest = counted, Observer()
    trainer.crest_config = dataclasses.replace(trainer.crest_config, T2=2)  # the drop policy observes the losses
    batch["crest_index"] = torch.tensor([0, 1, 2, 3])
    got = trainer.compute_loss(trainer.model, dict(batch))  # (eval mode: nothing observed)
    assert len(calls) == 1 and not hasattr(trainer.crest, "seen")
    calls.clear()
    trainer.model.train()
    for mod in trainer.model.modules():  # training mode without dropout's randomness
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    got = trainer.compute_loss(trainer.model, dict(batch))
    assert len(calls) == 1
    torch.testing.assert_close(trainer.crest.seen[0], weighted(z, batch["labels"]), rtol=1e-5, atol=1e-6)
    assert trainer.crest.seen[1].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="crest_loss_fn must be callable"):
        _short_trainer(tmp_path, crest_loss_fn="weighted")


def _sorted_token_data(n=64, V=30):
    """Variable-length token lists whose class is their length mod 3, a collator that sorts the rows longest
    first (labels sorted along) and returns the order, a model over it and a crest_forward undoing the order."""
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(2, 12, (n,), generator=g)
    seqs = [torch.randint(1, V, (int(k),), generator=g) for k in lens]
    data = [{"input_ids": s, "labels": int(len(s) % C)} for s in seqs]

    def sort_collate(items):
        order = sorted(range(len(items)), key=lambda k: -len(items[k]["input_ids"]))
        ids = torch.nn.utils.rnn.pad_sequence([items[k]["input_ids"] for k in order], batch_first=True)
        return {"input_ids": ids, "attention_mask": (ids != 0).long(),
                "labels": torch.tensor([items[k]["labels"] for k in order]), "order": torch.tensor(order)}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.h = torch.nn.Embedding(V, 8, padding_idx=0), torch.nn.Linear(8, C)

        def forward(self, input_ids, attention_mask=None, order=None, labels=None):
            mask = attention_mask.unsqueeze(-1).float()
            return {"logits": self.h((self.e(input_ids) * mask).sum(1) / mask.sum(1))}

    def undo(model, batch):  # the logits back in item order
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"][
            torch.argsort(batch["order"])]

    return data, sort_collate, Net, undo


def test_a_training_batch_whose_labels_are_not_crests_is_refused(tmp_path):
    """Review 118: with a collator that sorts the rows (labels along) and a crest_forward that undoes the
    order for the logits, compute_loss paired item-order logits and weights with sorted labels: 44-88 % of
    the rows trained on another example's label, silently when crest_labels was given. Labels taken before
    the dataset was shuffled did the same to CREST's measurements. The first training batch's labels are
    compared with CREST's for its examples now."""
    data, sort_collate, Net, undo = _sorted_token_data(n=192)  # three measurement chunks of 64
    labels = [d["labels"] for d in data]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=16, learning_rate=5e-3,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
        remove_unused_columns=False)
    kw = dict(args=args, train_dataset=data, crest_config=CrestConfig(m=16), crest_budget=0.5)
    trainer = CrestTrainer(model=Net(), data_collator=sort_collate, crest_forward=undo, crest_labels=labels, **kw)
    with pytest.warns(UserWarning, match="another order"), pytest.raises(
            ValueError, match=r"labels of the first training batch are not the labels CREST uses"):
        trainer.train()
    # labels from before a shuffle: the same refusal (and the measurement pass's warning before it)
    shuffled = list(np.random.default_rng(0).permutation(labels))
    trainer = CrestTrainer(model=Net(), data_collator=sort_collate, crest_forward=undo, crest_labels=shuffled,
                           **kw)
    with pytest.warns(UserWarning, match="labels passed as labels="), pytest.raises(ValueError, match="shuffle"):
        trainer.train()

    def item_order(items):  # the labels in item order, only the inputs sorted: trains
        out = sort_collate(items)
        out["labels"] = torch.tensor([it["labels"] for it in items])
        return out

    trainer = CrestTrainer(model=Net(), data_collator=item_order, crest_forward=undo, crest_labels=labels, **kw)
    assert trainer.train().global_step == trainer.crest.total_steps > 0


def test_labels_as_one_element_tensors_train(tmp_path):
    """Review 118: items whose label is a (1,) tensor collate to (B, 1) labels; the sampler took them, a
    plain Trainer trains on them, and CrestTrainer refused its first step after a selection had run."""
    class Column(Texts):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {**item, "labels": torch.tensor([item["labels"]])}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=16, learning_rate=5e-3,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = CrestTrainer(model=tiny_bert(), args=args, train_dataset=Column(), crest_config=CrestConfig(m=16, r=48),
                           crest_budget=0.25, data_collator=transformers.default_data_collator)
    assert trainer.train().global_step == trainer.crest.total_steps > 0
    z = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    torch.testing.assert_close(weighted_cross_entropy(z, torch.tensor([[1], [0]]), torch.ones(2)),
                               weighted_cross_entropy(z, torch.tensor([1, 0]), torch.ones(2)))


def test_a_training_batch_without_weights_is_refused(tmp_path):
    trainer = _short_trainer(tmp_path)
    batch = transformers.default_data_collator([Texts()[i] for i in range(4)])
    trainer.crest, trainer.is_in_train = object(), True  # inside train(), a batch from an overriding loader
    trainer.model.train()
    with pytest.raises(ValueError, match="a training batch without CREST's weights"):
        trainer.compute_loss(trainer.model, batch)
    trainer.model.eval()  # evaluation batches: the Trainer's own loss
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))


def test_the_trainers_throughput_counts_the_examples_crest_trained(tmp_path):
    trainer = _short_trainer(tmp_path)
    out = trainer.train()
    crest = trainer.crest
    assert trainer.num_examples(trainer.get_train_dataloader()) == crest.steps_per_epoch * 16
    reported = out.metrics["train_samples_per_second"] * out.metrics["train_runtime"]
    assert reported == pytest.approx(crest.total_steps * 16, rel=0.01)  # not the data set's 192 x 2 epochs


def test_the_drop_policy_gets_each_trained_batchs_losses(tmp_path, monkeypatch):
    """With CrestConfig(T2=...) the trainer observes the per-example training losses of every trained
    batch, for that batch's own examples (the prepared loader runs a batch ahead)."""
    from crestcore import DropConfig

    seen = []
    original = CrestBatchSampler.observe

    def spy(self, losses, indices=None):
        seen.append((np.asarray(indices).copy(), losses.detach().clone()))
        return original(self, losses, indices=indices)

    monkeypatch.setattr(CrestBatchSampler, "observe", spy)
    trained = []

    class Recording(CrestTrainer):
        def compute_loss(self, model, inputs, **kw):
            if "crest_index" in inputs:
                trained.append(np.asarray(inputs["crest_index"]).copy())
            return super().compute_loss(model, inputs, **kw)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=16, learning_rate=5e-3,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = Recording(model=tiny_bert(), args=args, train_dataset=Texts(),
                        data_collator=transformers.default_data_collator, crest_budget=0.25,
                        crest_config=CrestConfig(m=16, r=48, T2=2, drop=DropConfig(alpha=0.2, window=2)))
    out = trainer.train()
    assert len(seen) == len(trained) == out.global_step > 0
    for (idx, losses), batch in zip(seen, trained):
        assert np.array_equal(idx, batch) and losses.shape == (16,) and bool(torch.isfinite(losses).all())
    assert trainer.crest.stats["drops"], "the drop policy made its decisions"


class _DictOut(torch.nn.Module):
    """The tiny BERT returning a plain dict ``{"logits": ...}``."""

    def __init__(self):
        super().__init__()
        self.bert = tiny_bert()

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.bert(input_ids=input_ids, attention_mask=attention_mask).logits}


class _LossFirst(_DictOut):
    """A custom model returning ``(loss, logits)`` whether or not labels are given."""

    def forward(self, input_ids, attention_mask=None):
        logits = super().forward(input_ids, attention_mask)["logits"]
        return logits.sum() * 0.0, logits


def _custom_trainer(tmp_path, model, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=1, learning_rate=5e-3, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, label_names=["labels"])
    return CrestTrainer(model=model, args=args, train_dataset=Texts(n=64),
                        data_collator=transformers.default_data_collator,
                        **{"crest_config": CrestConfig(m=8, r=24), "crest_budget": 0.5, **kw})


def test_a_model_returning_a_dict_of_logits_trains(tmp_path):
    # the measurement passes read a dict's "logits"; the training loss did too late (KeyError: 0)
    trainer = _custom_trainer(tmp_path, _DictOut())
    assert trainer.train().global_step == trainer.crest.total_steps == 4


def test_crest_forward_gives_the_logits_of_a_custom_output_to_measurements_and_loss(tmp_path):
    with pytest.raises(ValueError, match="crest_forward="):  # the hint names the keyword CrestTrainer takes
        _custom_trainer(tmp_path, _LossFirst()).train()
    calls = []

    def forward(model, batch):
        calls.append(sorted(batch))
        batch.pop("labels")  # a forward may take its batch apart: the loss still has the labels
        return model(batch["input_ids"], batch["attention_mask"])[1]

    trainer = _custom_trainer(tmp_path, _LossFirst(), crest_forward=forward)
    assert trainer.train().global_step == 4 and trainer.crest.stats["selections"]
    # measurement passes and training steps alike, each given the batch with its labels
    assert calls and all(keys == ["attention_mask", "input_ids", "labels"] for keys in calls)
    inputs = {"input_ids": trainer.train_dataset.ids[:4], "attention_mask": torch.ones(4, SEQ, dtype=torch.int64),
              "labels": torch.tensor(trainer.train_dataset.targets[:4]),
              "crest_weight": torch.tensor([0.5, 1.0, 1.5, 1.0])}
    trainer.model.eval()  # no dropout: the two forwards below agree
    loss = trainer.compute_loss(trainer.model, inputs)
    logits = trainer.model(inputs["input_ids"], inputs["attention_mask"])[1]
    assert torch.allclose(loss, weighted_cross_entropy(logits, inputs["labels"], inputs["crest_weight"]))
    # an output without logits is named as such at the loss, not a KeyError
    trainer.crest_forward = None
    with pytest.raises(ValueError, match="no \\(batch, classes\\) logits"):
        trainer.compute_loss(trainer.model, inputs)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(crest_config={"m": 16}), TypeError, "crest_config"),
    (dict(crest_budget=0), ValueError, "crest_budget"),
    (dict(crest_seed=-1), ValueError, "crest_seed"),
    (dict(crest_measure_batch_size=0), ValueError, "crest_measure_batch_size"),
    (dict(crest_callbacks=[1]), TypeError, "crest_callbacks"),
    (dict(crest_forward=3), TypeError, "crest_forward"),
])
def test_bad_crest_arguments_are_named_as_the_user_typed_them(tmp_path, kwargs, error, name):
    with pytest.raises(error, match=f"^{name} "):
        _custom_trainer(tmp_path, tiny_bert(), **kwargs)


def test_crest_measure_batch_size_none_takes_the_measurement_default(tmp_path):
    trainer = _custom_trainer(tmp_path, tiny_bert(), crest_measure_batch_size=None)
    trainer.get_train_dataloader()
    assert trainer.crest.ops.batch_size == 128  # TorchModelOps' default when measuring on the CPU


def test_labels_dropped_by_remove_unused_columns_are_explained(tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=1, learning_rate=5e-3, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)  # no label_names
    trainer = CrestTrainer(model=_DictOut(), args=args, train_dataset=Texts(n=64),
                           data_collator=transformers.default_data_collator,
                           crest_config=CrestConfig(m=8, r=24), crest_budget=0.5)
    with pytest.raises(ValueError, match="label_names"):
        trainer.train()


def test_the_trainer_logs_and_saves_crests_batch_size(tmp_path):
    """Review 20: the Trainer logged "Total train batch size = 8" (per_device_train_batch_size, which CREST's
    batches do not use) for batches of m = 32."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=8, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = CrestTrainer(model=tiny_bert(), args=args, train_dataset=Texts(), crest_config=CrestConfig(m=32, r=96),
                           crest_budget=0.4, data_collator=transformers.default_data_collator)
    assert trainer.get_total_train_batch_size(args) == 32
    trainer.train()
    # the Trainer's own record stays the argument's: a resume compares it with per_device_train_batch_size
    # (review 21: with m there, every resume logged a mismatch)
    assert trainer.state.train_batch_size == 8


class _WeightedLossBert(_StrictBert):
    """The tiny BERT whose forward, given labels, computes a class-weighted cross-entropy of its own."""

    def forward(self, input_ids, attention_mask=None, labels=None):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        if labels is not None:
            out.loss = torch.nn.functional.cross_entropy(out.logits, labels, weight=torch.tensor([1.0, 4.0, 0.5]))
        return out


def test_a_model_computing_another_loss_from_its_labels_is_warned_about(tmp_path):
    """Review 86: CrestTrainer trains CREST's weighted cross-entropy of the logits; a model whose forward makes
    another loss from the labels had it replaced in training (and used in evaluation) without a word. The
    comparison's forward leaves the training's random stream (BERT's dropout) and modes untouched."""
    def run(model, checked=False):
        trainer = _custom_trainer(tmp_path, model)
        trainer._crest_loss_checked = checked
        trainer.train()
        return [p.detach().clone() for p in model.parameters()]

    with pytest.warns(UserWarning, match="computes its own loss from the labels.*crest_loss_fn"):
        run(_WeightedLossBert())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # BERT's own loss is the cross-entropy: nothing to say
        checked = run(_StrictBert())
    for a, b in zip(checked, run(_StrictBert(), checked=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_without_crest_config_m_follows_the_batch_size_a_search_sets(tmp_path):
    """Review 86: without crest_config, m is per_device_train_batch_size; a hyperparameter search sets that
    inside train(), after construction, where it had no effect (m stayed the constructor's). Each new run takes
    the batch size of its arguments; a given crest_config keeps its m."""
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, report_to=[], use_cpu=True,
                                          save_strategy="no", per_device_train_batch_size=16)
    t = CrestTrainer(model=tiny_bert(), args=args, train_dataset=Texts(), data_collator=transformers.default_data_collator)
    t.args.per_device_train_batch_size = 8
    t.get_train_dataloader()
    assert t.crest_config.m == t.crest.config.m == 8 and t.get_total_train_batch_size(t.args) == 8
    given = CrestTrainer(model=tiny_bert(), args=args, train_dataset=Texts(),
                         data_collator=transformers.default_data_collator, crest_config=CrestConfig(m=12))
    given.args.per_device_train_batch_size = 4
    given.get_train_dataloader()
    assert given.crest.config.m == 12


class _Targets(Texts):
    """Texts whose label key is "targets", the label argument of _TargetsModel."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        item["targets"] = item.pop("labels")
        return item


class _TargetsModel(_DictOut):
    def forward(self, input_ids, attention_mask=None, targets=None):
        return super().forward(input_ids, attention_mask)


def test_the_trainers_own_label_name_is_honoured(tmp_path):
    """Review 133: TrainingArguments(label_names=["targets"]) (a model whose label argument is "targets") could not
    be trained at all, and the error told the user to set label_names; its labels are read from that key, in the
    items and in the batches. The smoothing refusal names crest_loss_fn, with which label smoothing trains."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=1, learning_rate=5e-3, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, label_names=["targets"])
    data = _Targets(n=64)
    trainer = CrestTrainer(model=_TargetsModel(), args=args, train_dataset=data,
                           data_collator=transformers.default_data_collator, crest_config=CrestConfig(m=8, r=24),
                           crest_budget=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (reading the items for their labels: said)
        assert trainer.train().global_step == trainer.crest.total_steps == 4
    np.testing.assert_array_equal(trainer.crest.labels, np.asarray(data.targets))
    from crestcore.adapters.torch import dataset_labels

    items = [data[i] for i in range(8)]  # dict items without a targets attribute to read
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert dataset_labels(items, keys="targets").tolist() == data.targets[:8]  # one key as a string
    with pytest.raises(TypeError, match="keys must be label keys"):
        dataset_labels(items, keys=[0])
    with pytest.raises(TypeError, match=r"none of the keys.*TrainingArguments\(label_names=\[key\]\)"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dataset_labels(items)  # review 137: this first error named crest_labels only, the next label_names
    with pytest.raises(ValueError, match=r"label_smoothing_factor \(0\.1\).*crest_loss_fn=lambda z, y: "
                                         r"torch\.nn\.functional\.cross_entropy\(z, y, label_smoothing=0\.1"):
        CrestTrainer(model=tiny_bert(), args=transformers.TrainingArguments(
            output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to=[], use_cpu=True), train_dataset=Texts())


def test_accelerates_skip_first_batches_on_a_crest_loader_says_why_not():
    """Review 140: skip_first_batches(CrestLoader, k) died in accelerate on a missing .sampler, an
    AttributeError that said nothing about resuming; the attribute's error now says that the loader
    continues from its restored position, and hasattr still sees no sampler."""
    from accelerate import skip_first_batches

    from crestcore.adapters.torch import CrestLoader

    loader = CrestLoader(tiny_bert(), Texts(), config=CrestConfig(m=16, r=48), budget=0.5, epochs=1, seed=0,
                         collate_fn=transformers.default_data_collator)
    assert not hasattr(loader, "sampler") and getattr(loader, "sampler", None) is None
    with pytest.raises(AttributeError, match="CrestLoader has no sampler.*Do not skip batches after a resume"):
        skip_first_batches(loader, 2)


def test_a_compute_loss_of_a_subclass_that_ignores_crests_weights_is_said(tmp_path):
    """Review 179: the usual Hugging Face override, ``labels = inputs.pop("labels"); outputs = model(**inputs)``,
    handed crest_weight and crest_index to the model's forward, which ignored them: every step trained the coreset
    unweighted, silently (a forward without **kwargs refused them with a TypeError naming crest_weight). Such a
    run is warned about once (a warning, not a refusal, since reads from a copy of the batch cannot be seen:
    review 182), the refusing forward's TypeError explained; an override that takes the weights off the batch
    (also from its copy()), or calls super().compute_loss (also on parts of the batch), trains weighted and says
    nothing; the batch pickles."""
    import pickle

    class Plain(CrestTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            return torch.nn.functional.cross_entropy(model(**inputs).logits, labels)

    class Strict(torch.nn.Module):  # a forward without **kwargs
        def __init__(self):
            super().__init__()
            self.bert = tiny_bert()

        def forward(self, input_ids, attention_mask=None, labels=None):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask)

    trainer = _short_trainer(tmp_path, trainer_class=Plain)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer.train()
    unread = [w for w in said if "did not call CrestTrainer.compute_loss" in str(w.message)]
    assert len(unread) == 1 and "Plain.compute_loss" in str(unread[0].message)  # once a run
    with pytest.raises(ValueError, match=r"the model was called with CREST's batch keys .*Plain.compute_loss passes "
                                         r"the whole batch to the model"):
        _short_trainer(tmp_path, trainer_class=Plain, model=Strict()).train()

    seen = []

    class Own(CrestTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            pickle.loads(pickle.dumps(inputs))  # (the batch type is a module's: it pickles)
            inputs = inputs.copy()
            w, _ = inputs.pop("crest_weight"), inputs.pop("crest_index", None)
            labels = inputs.pop("labels")
            losses = torch.nn.functional.cross_entropy(model(**inputs).logits, labels, reduction="none")
            seen.append(w)
            return (w * losses).mean()

    class Super(CrestTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class Halves(CrestTrainer):  # review 180: the batch split, each half through CrestTrainer.compute_loss
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            half = [{k: v[i::2] for k, v in inputs.items()} for i in (0, 1)]
            return sum(super(Halves, self).compute_loss(model, h) for h in half) / 2

    for cls in (Own, Super, Halves):
        trainer = _short_trainer(tmp_path, trainer_class=cls)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            assert trainer.train().global_step == trainer.crest.total_steps
        assert not [w for w in said if "did not call CrestTrainer.compute_loss" in str(w.message)], cls
    assert len(seen) == trainer.crest.total_steps and all(float(w.mean()) == pytest.approx(1.0) for w in seen)


def test_a_datasets_dataset_without_a_label_column_is_refused_at_once_naming_its_columns(recwarn):
    """Review 179: a datasets.Dataset whose label column is named `targets` (no label_names given) was warned
    about as having no `targets` attribute, with a pass over all its rows announced, then refused at the first
    row; it is refused at once, its columns named, with label_names= and crest_labels= as the ways out."""
    datasets = pytest.importorskip("datasets")
    from crestcore.adapters.torch import dataset_labels

    ds = datasets.Dataset.from_dict({"input_ids": [[3, 4], [5, 6]] * 4, "targets": [0, 1] * 4})
    with pytest.raises(TypeError, match=r"none of its columns \['input_ids', 'targets'\] is one of the label keys "
                                        r".*TrainingArguments\(label_names=\[key\]\)"):
        dataset_labels(ds)
    assert not [w for w in recwarn if "reading all" in str(w.message)]
    assert dataset_labels(ds, ("targets",)).tolist() == [0, 1] * 4


def test_a_format_that_outputs_all_columns_keeps_the_label_column_readable():
    """Review 180: a format of some columns with output_all_columns=True carries the label column in every item,
    but the refusal of a dataset without a visible label column refused it (a Subset of it worked)."""
    datasets = pytest.importorskip("datasets")
    from crestcore.adapters.torch import dataset_labels

    y = [2, 0, 1, 1, 0, 2, 2]
    data = datasets.Dataset.from_dict({"input_ids": [[1, 2]] * 7, "label": y})
    shown = data.with_format("torch", columns=["input_ids"], output_all_columns=True)
    assert "label" in shown[0]
    assert dataset_labels(shown).tolist() == y


def test_a_batch_encodings_reads_are_seen(tmp_path):
    """Review 183: DataCollatorWithPadding's batches are BatchEncodings, passed untracked, so the docstring's own
    override (taking crest_weight off the batch) was warned about at every run. A BatchEncoding batch comes as
    the tracked dict, its items readable as attributes too; an override that ignores the weights is still
    warned about."""

    def collate(features):
        return transformers.BatchEncoding(transformers.default_data_collator(features))

    class Attributes(CrestTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            path = tmp_path / "batch.pt"
            torch.save(dict(inputs), path)  # (as a plain dict: torch.load's weights_only reads those)
            assert torch.equal(torch.load(path)["crest_weight"], inputs["crest_weight"])
            w = inputs.crest_weight  # (a BatchEncoding's attribute access kept)
            logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits
            return (w * torch.nn.functional.cross_entropy(logits, inputs.labels, reduction="none")).mean()

    class Plain(CrestTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            return torch.nn.functional.cross_entropy(model(**inputs).logits, labels)

    for cls, warned in ((Attributes, False), (Plain, True)):
        trainer = _short_trainer(tmp_path, trainer_class=cls, data_collator=collate)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            trainer.train()
        assert bool([w for w in said if "did not call CrestTrainer.compute_loss" in str(w.message)]) == warned, cls
