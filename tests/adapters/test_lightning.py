"""crestcore.adapters.lightning: the CrestCallback inside Trainer.fit (skipped without Lightning)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

import torch.nn.functional as F  # noqa: E402
from _helpers import torch_mlp, weighted_step  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from crestcore import CrestConfig  # noqa: E402
from crestcore.adapters.lightning import CrestCallback  # noqa: E402
from crestcore.adapters.torch import CrestLoader  # noqa: E402

N, D_IN, C = 240, 6, 3
CFG = dict(config=CrestConfig(m=24, r=60, tau=0.05), budget=0.3, seed=2)  # 3 steps per epoch


@pytest.fixture(autouse=True)
def _quiet_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        warnings.filterwarnings("ignore", ".*litlogger.*")
        warnings.filterwarnings("ignore", ".*callbacks used to create the checkpoint.*")
        yield
    torch.set_num_threads(before)


def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D_IN, generator=g)
    y = (X @ torch.randn(D_IN, C, generator=g)).argmax(1)
    return TensorDataset(X, y)


def net(seed=0):
    return torch_mlp(D_IN, C, seed=seed)


class Module(pl.LightningModule):
    def __init__(self, seed=0):
        super().__init__()
        self.net = net(seed)
        self.seen = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, w = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        crest = next(c for c in self.trainer.callbacks if isinstance(c, CrestCallback))
        self.seen.append(crest.loader.last_indices)
        return {"loss": (w * losses).mean(), "crest_losses": losses.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(tmp_path, max_epochs, cb, **kw):
    return pl.Trainer(max_epochs=max_epochs, callbacks=[cb], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      accelerator="cpu", deterministic=True, **kw)


def plain_loop(epochs):
    """The same run in a plain PyTorch loop: the reference for the batches and the final parameters."""
    model = net(0)
    ds = data()
    loader = CrestLoader(model, ds, epochs=epochs, **CFG)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for x, y, w in loader.iter_run():
        loader.observe(weighted_step(model, opt, x, y, w).detach())
        seen.append(loader.last_indices)
    return seen, model, loader


def test_callback_runs_a_short_fit_like_the_plain_loop(tmp_path):
    cb = CrestCallback(data(), **CFG)
    module = Module()
    t = trainer(tmp_path, 3, cb)
    t.fit(module, train_dataloaders=cb.dataloader())
    assert len(cb.dataloader()) == 3 and t.global_step == 9 == cb.stats["step"]
    seen, model, loader = plain_loop(3)
    assert len(module.seen) == len(seen) == 9
    for a, b in zip(module.seen, seen):
        np.testing.assert_array_equal(a, b)
    for p, q in zip(module.net.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert cb.stats == loader.stats
    assert cb.stats["counters"]["selections"] >= 1 and cb.stats["checks"]


def test_the_loaders_measurement_options_reach_the_callbacks_loader(tmp_path):
    """measure_cache_bytes, progress and reuse_checks are CrestLoader's, passed through (review 68: the
    docstring promised CrestLoader's parameters and these were refused as unexpected)."""
    cb = CrestCallback(data(), measure_cache_bytes=0, progress=True, reuse_checks=False, **CFG)
    trainer(tmp_path, 1, cb).fit(Module(), train_dataloaders=cb.dataloader())
    ops = cb.loader.ops
    assert ops.cache_bytes == 0 and ops.reuse_checks is False and ops.progress is not None



class DataModule(pl.LightningDataModule):
    """A DataModule that builds its training set in ``setup`` (a new object at every fit) and serves CREST's
    dataloader from ``train_dataloader``."""

    def __init__(self):
        super().__init__()
        self.train_set = self.crest = None
        self.setups = 0

    def setup(self, stage):
        self.train_set, self.setups = data(), self.setups + 1

    def train_dataloader(self):
        return self.crest.dataloader()


def test_a_datamodule_builds_the_dataset_the_callback_trains_on(tmp_path):
    """``CrestCallback(lambda: dm.train_set)``: the function is called at the fit's setup, after the
    DataModule's, which built the set there (before, the callback needed the dataset when it was built, so
    a DataModule had to be set up by hand first, and the Trainer's own setup then built another set). Each
    fit calls it again; what it returns gets the construction-time checks. Same run as the plain loop."""
    dm = DataModule()
    cb = dm.crest = CrestCallback(lambda: dm.train_set, **CFG)
    assert cb.dataset is not None and dm.setups == 0
    module = Module()
    t = trainer(tmp_path, 3, cb)
    t.fit(module, datamodule=dm)
    assert dm.setups == 1 and cb.dataset is dm.train_set and cb.loader.dataset is dm.train_set
    seen, model, loader = plain_loop(3)
    assert t.global_step == 9 == len(module.seen)
    for a, b in zip(module.seen, seen):
        np.testing.assert_array_equal(a, b)
    for p, q in zip(module.net.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    first = dm.train_set  # a second fit: the DataModule's new set, checked as a dataset given directly is
    pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu").fit(Module(), datamodule=dm)
    assert dm.setups == 2 and cb.loader.dataset is dm.train_set is not first

    for bad, match in ((lambda: None, "returned None at the fit's setup"),
                       (lambda: TensorDataset(torch.zeros(10, D_IN), torch.zeros(10, dtype=torch.long)),
                        "holds a single class")):
        cb = CrestCallback(bad, **CFG)
        with pytest.raises(ValueError, match=match):
            trainer(tmp_path, 1, cb).fit(Module(), train_dataloaders=cb.dataloader())
    with pytest.raises(ValueError, match="measure_dataset has 5 examples"):  # a function for the measurements
        cb = CrestCallback(data(), measure_dataset=lambda: TensorDataset(torch.zeros(5, D_IN)), **CFG)
        trainer(tmp_path, 1, cb).fit(Module(), train_dataloaders=cb.dataloader())

def test_a_module_lightning_compiles_is_measured_eagerly(tmp_path):
    """trainer.fit(torch.compile(module)): Lightning unwraps the compiled wrapper and compiles the module's
    forward in place, so the callback gets a plain LightningModule whose forward is compiled; before, the
    Hessian-vector probe failed inside torch ("double backward" / "donated buffers"). The measurements now
    run it eagerly: the same batches as the uncompiled run's."""
    cb = CrestCallback(data(), **CFG)
    module = Module()
    t = trainer(tmp_path, 2, cb)
    t.fit(torch.compile(module, backend="aot_eager"), train_dataloaders=cb.dataloader())
    assert t.global_step == 6 == cb.stats["step"] and cb.stats["checks"]
    seen, _model, _loader = plain_loop(2)
    assert len(module.seen) == len(seen) == 6
    for a, b in zip(module.seen, seen):
        np.testing.assert_array_equal(a, b)


def _resumed(tmp_path, make):
    """Two epochs of ``make()``, their checkpoint, and a third epoch resumed from it by ``make(seed=5)`` (other
    weights: the checkpoint must bring them back): (first module, second callback, second module)."""
    cb = CrestCallback(data(), **CFG)
    module = make()
    t = trainer(tmp_path, 2, cb)
    t.fit(module, train_dataloaders=cb.dataloader())
    path = tmp_path / "two.ckpt"
    t.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["callbacks"]["CrestCallback"]["position"] == 6
    cb2, module2 = CrestCallback(data(), **CFG), make(seed=5)
    trainer(tmp_path, 3, cb2).fit(module2, train_dataloaders=cb2.dataloader(), ckpt_path=path)
    return module, cb2, module2


def test_checkpoint_restores_the_controller(tmp_path):
    module, cb2, module2 = _resumed(tmp_path, Module)
    seen, model, loader = plain_loop(3)
    assert len(module2.seen) == 3
    for a, b in zip(module.seen + module2.seen, seen):
        np.testing.assert_array_equal(a, b)
    for p, q in zip(module2.net.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert cb2.stats["selections"] == loader.stats["selections"]
    assert cb2.stats["counters"] == loader.stats["counters"]



class FineTuned(Module):
    """Its first layer frozen at construction and trained from epoch 1 on (an epoch hook, as Lightning's
    BaseFinetuning freezes and unfreezes)."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.net[0].requires_grad_(False)

    def on_train_epoch_start(self):
        self.net[0].requires_grad_(self.current_epoch >= 1)


def test_a_checkpoint_saved_after_an_unfreezing_resumes(tmp_path):
    """Review 77: Lightning loads the callback's state before the epoch hook unfreezes the layer again, and
    the load refused the checkpoint ("anchor has ... parameters but the model has ..."). The state names the
    parameters it is over; the hook restores that set before the first step: the uninterrupted run's batches
    and weights."""
    module, cb2, module2 = _resumed(tmp_path, FineTuned)
    cb3, module3 = CrestCallback(data(), **CFG), FineTuned()
    trainer(tmp_path, 3, cb3).fit(module3, train_dataloaders=cb3.dataloader())
    assert len(module2.seen) == 3 and len(module3.seen) == 9
    for a, b in zip(module.seen + module2.seen, module3.seen):
        np.testing.assert_array_equal(a, b)
    for p, q in zip(module2.net.parameters(), module3.net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert cb2.stats["selections"] == cb3.stats["selections"]


def test_mid_epoch_checkpoint_resumes_exactly(tmp_path):
    cb = CrestCallback(data(), **CFG)
    module = Module()
    every = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    t = pl.Trainer(max_epochs=2, callbacks=[cb, every], logger=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", deterministic=True)
    t.fit(module, train_dataloaders=cb.dataloader())
    path = tmp_path / "epoch=1-step=4.ckpt"  # one step into the second epoch
    assert torch.load(path, weights_only=True)["callbacks"]["CrestCallback"]["position"] == 4

    cb2 = CrestCallback(data(), **CFG)
    module2 = Module(seed=5)
    t2 = trainer(tmp_path, 3, cb2)
    t2.fit(module2, train_dataloaders=cb2.dataloader(), ckpt_path=path)
    seen, model, _ = plain_loop(3)
    assert t2.global_step == 9 and len(module2.seen) == 5
    for a, b in zip(module.seen[:4] + module2.seen, seen):
        np.testing.assert_array_equal(a, b)
    for p, q in zip(module2.net.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "bf16-mixed"])
def test_half_precision_fits(tmp_path, precision):
    """Lightning's true half precision casts the module (and the batches it gives training_step) to
    bfloat16/float16; CREST's measurement passes must feed it inputs of that dtype and compute features
    in float32. Mixed precision autocasts training_step only; the measurement stays float32."""
    cb = CrestCallback(data(), **CFG)
    module = Module()
    t = trainer(tmp_path, 2, cb, precision=precision)
    t.fit(module, train_dataloaders=cb.dataloader())
    want = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "bf16-mixed": torch.float32}[precision]
    assert next(module.net.parameters()).dtype == want
    assert t.global_step == 6 == cb.stats["step"]
    assert cb.stats["counters"]["selections"] >= 1 and cb.stats["checks"]
    assert all(np.isfinite(r) for r in cb.stats["rho"])
    ops = cb.loader.ops
    z, e = ops.outputs(np.arange(8), embeddings=True)
    _, g = ops.gradient(np.arange(8), np.ones(8))
    assert z.dtype == e.dtype == g.dtype == ops.params().dtype == torch.float32


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(budget=-1.0), ValueError, "budget"),
    (dict(config="paper"), TypeError, "config"),
    (dict(epochs=0), ValueError, "epochs"),
    (dict(seed=-3), ValueError, "seed"),
    (dict(budget_counts="epochs"), ValueError, "budget_counts"),
    (dict(measure_batch_size=0), ValueError, "measure_batch_size"),
    (dict(forward="model"), TypeError, "forward"),
    (dict(losses_key=3), TypeError, "losses_key"),
    # review 20: the data's checks came at setup inside fit, after the sanity validation steps
    (dict(labels=np.zeros(10, dtype=int)), ValueError, "labels must be 1-D with one class index per example"),
    (dict(labels=np.zeros(N, dtype=int)), ValueError, "single class"),
    (dict(config=CrestConfig(m=N + 1)), ValueError, f"m={N + 1} exceeds the dataset's {N} examples"),
    (dict(measure_dataset=TensorDataset(torch.zeros(5, D_IN))), ValueError, "measure_dataset has 5 examples"),
    (dict(log_stats="no"), TypeError, "log_stats must be a bool"),
    (dict(progress=1), TypeError, "progress must be a bool"),
    (dict(reuse_checks=None), TypeError, "reuse_checks must be a bool"),
    (dict(measure_cache_bytes=-1), ValueError, "measure_cache_bytes"),
])
def test_callback_validates_its_arguments_at_construction(kwargs, error, name):
    with pytest.raises(error, match=name):
        CrestCallback(data(), **kwargs)



def test_dropping_on_without_losses_under_the_key_is_warned_about_once(tmp_path):
    """Review 25: with dropping on, a training_step returning its losses under a misspelled key was ignored
    without a word, and the drops changed. Warned once a fit now (naming the keys it got); losses_key=None
    observes none, without a warning; the correct key, as before."""
    cfg = dict(CFG, config=CrestConfig(m=24, r=60, tau=0.05, T2=2))

    class Misspelled(Module):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            return {"loss": out["loss"], "crest_loss": out["crest_losses"]}

    cb = CrestCallback(data(), **cfg)
    for _fit in range(2):  # once a fit (review 27: it was once a callback)
        with pytest.warns(UserWarning, match=r"holds \['crest_loss', 'loss'\]\) has no 'crest_losses'") as got:
            trainer(tmp_path, 2, cb).fit(Misspelled(), train_dataloaders=cb.dataloader())
        assert sum("has no 'crest_losses'" in str(w.message) for w in got) == 1

    class SkipsFirst(Module):  # a step returning None is skipped by Lightning: nothing to observe, no warning
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            return None if batch_idx == 0 else out

    cb = CrestCallback(data(), **cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "CrestCallback: dropping is on")
        trainer(tmp_path, 1, cb).fit(SkipsFirst(), train_dataloaders=cb.dataloader())

    class Manual(Module):  # manual optimization: a step returning None trained (review 29: it was taken as skipped)
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            out, opt = super().training_step(batch, batch_idx), self.optimizers()
            opt.zero_grad()
            self.manual_backward(out["loss"])
            opt.step()

    cb = CrestCallback(data(), **cfg)
    with pytest.warns(UserWarning, match="has no 'crest_losses'"):
        trainer(tmp_path, 1, cb).fit(Manual(), train_dataloaders=cb.dataloader())
    for module, key in ((Misspelled(), None), (Module(), "crest_losses")):
        cb = CrestCallback(data(), losses_key=key, **cfg)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "CrestCallback: dropping is on")
            trainer(tmp_path, 2, cb).fit(module, train_dataloaders=cb.dataloader())
    assert cb.stats["step"] == 6

def test_the_dataloader_outside_a_fit_says_so_at_iter_and_len():
    """Review 21: with the lazy iterator (the loader read at the first batch) iter() stopped raising."""
    cb = CrestCallback(data(), **CFG)
    for look in (len, iter):
        with pytest.raises(RuntimeError, match="used before the callback was set up"):
            look(cb.dataloader())


def test_callback_refuses_an_iterable_dataset():
    with pytest.raises(TypeError, match="dataset"):
        CrestCallback(iter(range(10)))


class OneCycleModule(Module):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        total = self.trainer.estimated_stepping_batches  # len(dataloader) * max_epochs
        self.planned = total
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_a_scheduler_sized_from_estimated_stepping_batches_ends_at_its_end(tmp_path):
    cb = CrestCallback(data(), **CFG)
    module = OneCycleModule()
    t = trainer(tmp_path, 3, cb)
    t.fit(module, train_dataloaders=cb.dataloader())
    assert module.planned == t.global_step == cb.loader.total_steps == 9
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.1, total_steps=9)
    for _ in range(9):
        ref_opt.step()
        ref.step()
    lr = t.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12) and lr < 0.1 * 0.1  # its low end


def test_a_second_fit_is_a_new_crest_run(tmp_path):
    """Every Trainer.fit starts at epoch 0: the callback starts a new CREST run there (before, a second
    fit on the same module reused the finished loader and trained 0 steps, with only a warning), sized
    from the new Trainer's max_epochs."""
    cb = CrestCallback(data(), **CFG)
    module = Module()
    trainer(tmp_path, 2, cb).fit(module, train_dataloaders=cb.dataloader())
    first = len(module.seen)
    t2 = trainer(tmp_path, 3, cb)
    t2.fit(module, train_dataloaders=cb.dataloader())
    assert first == 6 and t2.global_step == 9 == len(module.seen) - first == cb.stats["step"]
    assert cb.loader.epochs == 3


def test_several_processes_are_refused_at_setup(tmp_path):
    """Each process would select and train the same batches: a Trainer with world_size > 1 is refused with
    a message naming the distributed loader (checked on the hook, without starting processes)."""
    cb = CrestCallback(data(), **CFG)

    class TwoProcesses:
        world_size, max_epochs = 2, 3

    with pytest.raises(ValueError, match="DistributedCrestLoader"):
        cb.setup(TwoProcesses(), Module(), "fit")
    assert cb.loader is None


def test_gradient_accumulation_and_a_module_without_forward_are_refused_at_setup(tmp_path):
    """Trainer(accumulate_grad_batches=2) would take half the optimizer steps CREST plans and reports (the
    Hugging Face adapter refuses it too); a LightningModule without forward() (legal in Lightning) cannot
    be measured by calling it, and the error names ``forward=``, with which it fits."""

    class NoForward(Module):
        forward = pl.LightningModule.forward

        def training_step(self, batch, batch_idx):
            x, y, w = batch
            return (w * F.cross_entropy(self.net(x), y, reduction="none")).mean()

    cb = CrestCallback(data(), **CFG)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=1\), got 2"):
        trainer(tmp_path, 3, cb, accumulate_grad_batches=2).fit(Module(), train_dataloaders=cb.dataloader())
    with pytest.raises(ValueError, match="NoForward has no forward.*forward="):
        trainer(tmp_path, 3, cb).fit(NoForward(), train_dataloaders=cb.dataloader())
    cb = CrestCallback(data(), forward=lambda module, batch: module.net(batch[0]), **CFG)
    t = trainer(tmp_path, 1, cb)
    t.fit(NoForward(), train_dataloaders=cb.dataloader())
    assert t.global_step == cb.stats["step"] > 0


def test_the_batch_size_finder_is_refused(tmp_path):
    """Review 133: Tuner.scale_batch_size's trials all trained CREST's batches of m, so each "succeeded" and the
    size it found (written into the DataModule) was meaningless, silently. Refused at setup, naming m."""
    from lightning.pytorch.tuner import Tuner

    class DM(pl.LightningDataModule):
        def __init__(self, cb):
            super().__init__()
            self.cb, self.batch_size = cb, 16

        def train_dataloader(self):
            return self.cb.dataloader()

    cb = CrestCallback(data(), **CFG)
    with pytest.raises(ValueError, match=r"batch-size finder.*CrestConfig\(m=\.\.\.\)"):
        Tuner(trainer(tmp_path, 3, cb)).scale_batch_size(Module(), datamodule=DM(cb), mode="power", max_trials=3)


# ------------------------------------------------------------------------------------------------
# settings that slipped past setup (review)
# ------------------------------------------------------------------------------------------------
def test_an_accumulation_scheduler_and_another_dataloader_are_refused(tmp_path):
    """A GradientAccumulationScheduler sets accumulate_grad_batches at each epoch's start, after setup's
    check (9 CREST batches, 3 optimizer steps); a fit training on another dataloader trained the full data
    while CREST reported step 0."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    cb = CrestCallback(data(), **CFG)
    t = pl.Trainer(max_epochs=3, callbacks=[cb, GradientAccumulationScheduler({0: 3})], logger=False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir=tmp_path, accelerator="cpu")
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=1\), got 3.*GradientAccumulationScheduler"):
        t.fit(Module(), train_dataloaders=cb.dataloader())
    cb = CrestCallback(data(), **CFG)
    own = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data().tensors, torch.ones(N)), batch_size=24)
    with pytest.raises(RuntimeError, match="did not come from CREST's loader"):
        trainer(tmp_path, 3, cb).fit(Module(), train_dataloaders=own)

    class Combined(Module):  # review 96: a longer loader combined with mode="max_size" outlasts CREST's share
        def training_step(self, batch, batch_idx):
            return None if batch["crest"] is None else super().training_step(batch["crest"], batch_idx)

    from lightning.pytorch.utilities import CombinedLoader

    cb = CrestCallback(data(), **CFG)
    combined = CombinedLoader({"crest": cb.dataloader(), "other": own}, mode="max_size")
    with pytest.raises(RuntimeError, match="did not come from CREST's loader.*CombinedLoader.*mode='min_size'"):
        trainer(tmp_path, 3, cb).fit(Combined(), train_dataloaders=combined)


def test_crests_batches_are_refused_to_other_loops_and_to_a_second_pass_in_one_epoch(tmp_path):
    """Review 112: crest.dataloader() as the validation loader served the sanity check and validation from
    CREST's training steps (8 of 12 trained, 6 with the sanity check, the stats saying 12); a CombinedLoader
    in its default mode='max_size_cycle' started CREST's loader again inside Lightning's first epoch, which
    trained all three CREST epochs. Both refused; mode='min_size' trains one share an epoch."""
    from lightning.pytorch.utilities import CombinedLoader

    class Validated(Module):
        def validation_step(self, batch, batch_idx):
            return None

    for sanity in (2, 0):
        cb = CrestCallback(data(), **CFG)
        with pytest.raises(RuntimeError, match=f"the Trainer's {'sanity check' if sanity else 'validation'} loop "
                                               "reads crest.dataloader"):
            trainer(tmp_path, 3, cb, num_sanity_val_steps=sanity).fit(
                Validated(), train_dataloaders=cb.dataloader(), val_dataloaders=cb.dataloader())

    class Combined(Module):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch["crest"], batch_idx)

    own = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data().tensors, torch.ones(N)), batch_size=8)
    cb = CrestCallback(data(), **CFG)
    with pytest.raises(RuntimeError, match="read a second time in Trainer epoch 0.*max_size_cycle.*min_size"):
        trainer(tmp_path, 3, cb).fit(Combined(), train_dataloaders={"crest": cb.dataloader(), "other": own})
    t = trainer(tmp_path, 3, cb)  # the same callback on a new Trainer: a new run, not refused for the old pass
    t.fit(Combined(), train_dataloaders=CombinedLoader({"crest": cb.dataloader(), "other": own}, mode="min_size"))
    assert t.global_step == cb.stats["step"] == 3 * len(cb.dataloader()) == 9  # one share in each of 3 epochs


def test_max_steps_beyond_the_plan_stops_instead_of_looping(tmp_path):
    cb = CrestCallback(data(), epochs=2, **CFG)
    # max_time: without the stop the fit would loop over empty epochs forever; bounded, it fails below
    t = pl.Trainer(max_steps=10, max_epochs=-1, max_time={"seconds": 120}, callbacks=[cb], logger=False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir=tmp_path, accelerator="cpu")
    with pytest.warns(UserWarning, match="all 6 planned steps .* stopping the fit"):
        t.fit(Module(), train_dataloaders=cb.dataloader())
    assert t.global_step == 6 == cb.stats["step"] and t.current_epoch <= 3


def test_continuing_a_fitted_trainer_plans_only_the_epochs_it_trains(tmp_path):
    """Raising max_epochs from 3 to 5 and fitting again trains epochs 3 and 4: a new run of 2 epochs (it
    was planned for 5 and took the shares of epochs 3 and 4: 6 of 15 steps, fraction 0.12 of a 0.3
    budget); fitting a finished Trainer again trains nothing and keeps the record."""
    cb = CrestCallback(data(), **CFG)
    module = Module()
    t = trainer(tmp_path, 3, cb)
    t.fit(module, train_dataloaders=cb.dataloader())
    first = cb.stats
    t.fit(module, train_dataloaders=cb.dataloader())  # max_epochs reached: Lightning trains nothing
    assert t.global_step == 9 and cb.stats["step"] == first["step"] == 9
    assert cb.stats["selections"] == first["selections"]
    t.fit_loop.max_epochs = 5
    t.fit(module, train_dataloaders=cb.dataloader())
    assert t.global_step == 15 and cb.loader.epochs == 2 and cb.stats["step"] == cb.loader.total_steps == 6
    assert cb.stats["budget"]["fraction_steps"] == pytest.approx(0.3, abs=0.05)


def test_a_checkpoint_of_a_continued_fit_resumes_the_same_plan(tmp_path):
    """A run that started at epoch 3 (a continued fit) keeps its 2-epoch plan when resumed in a fresh
    Trainer(max_epochs=5) from its checkpoint (the loader was planned from epoch 0: 5 epochs, a budget
    report of half the fraction)."""
    cb = CrestCallback(data(), **CFG)
    module = Module()
    t = trainer(tmp_path, 3, cb)
    t.fit(module, train_dataloaders=cb.dataloader())
    t.fit_loop.max_epochs = 5
    t.fit(module, train_dataloaders=cb.dataloader())
    state = cb.state_dict()
    assert state["lightning_epoch0"] == 3 and cb.loader.epochs == 2
    fresh = CrestCallback(data(), **CFG)
    fresh.load_state_dict(state)  # before setup, as Lightning may call it: kept until setup
    fresh.setup(type("T", (), {"world_size": 1, "max_epochs": 5, "current_epoch": 0, "accumulate_grad_batches": 1,
                               "limit_train_batches": 1.0})(), module, "fit")
    assert fresh.loader.epochs == 2 and fresh.loader.position == cb.loader.position
    assert fresh.stats["budget"]["fraction_steps"] == pytest.approx(cb.stats["budget"]["fraction_steps"])


def test_min_steps_beyond_the_plan_is_refused_instead_of_looping_forever(tmp_path):
    # Lightning holds a fit that should stop until min_steps; empty epochs add no step, and max_time stops
    # through the same flag: the fit looped without end
    cb = CrestCallback(data(), epochs=2, **CFG)
    t = pl.Trainer(max_steps=10, min_steps=10, max_epochs=-1, max_time={"seconds": 60}, callbacks=[cb],
                   logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir=tmp_path, accelerator="cpu")
    with pytest.raises(ValueError, match="min_steps=10.* plans 6 steps"):
        t.fit(Module(), train_dataloaders=cb.dataloader())
    assert t.global_step == 0  # refused at setup, before any step


def test_max_steps_beyond_the_plan_warns_about_the_schedule_before_training(tmp_path):
    cb = CrestCallback(data(), epochs=2, **CFG)
    seen = []

    class Early(pl.Callback):
        def on_train_batch_start(self, trainer, *a):
            seen.append(len(caught))

    t = pl.Trainer(max_steps=10, max_epochs=-1, callbacks=[cb, Early()], logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                   accelerator="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(Module(), train_dataloaders=cb.dataloader())
    early = [str(w.message) for w in caught[:seen[0]]]  # said before the first step
    assert any("max_steps=10" in m and "estimated_stepping_batches (10)" in m and "60%" in m for m in early)
    assert t.global_step == 6


def test_the_step_limits_are_checked_after_a_checkpoint_restores_the_global_step(tmp_path):
    """A checkpoint of a continued fit (global steps 6..12) resumed with min_steps=10 reaches step 12: the
    check must read the restored global step and CREST position, not setup's 0 (it refused the fit)."""
    import glob

    cb = CrestCallback(data(), epochs=2, **CFG)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1)
    t = pl.Trainer(max_epochs=-1, max_steps=30, callbacks=[cb, saver], logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    module = Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t.fit(module, train_dataloaders=cb.dataloader())
        t.fit(module, train_dataloaders=cb.dataloader())  # a continued fit: global steps 6..12
    assert t.global_step == 12
    path = next(p for p in glob.glob(str(tmp_path / "ck" / "*.ckpt")) if "step=8" in p)
    cb2 = CrestCallback(data(), epochs=2, **CFG)
    t2 = pl.Trainer(max_epochs=-1, max_steps=12, min_steps=10, callbacks=[cb2], logger=False,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    default_root_dir=tmp_path, accelerator="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # max_steps=12 is the run's real end: nothing to warn
        warnings.filterwarnings("ignore", ".*does not have many workers.*|.*callbacks used to create.*|.*LeafSpec.*")
        t2.fit(Module(), train_dataloaders=cb2.dataloader(), ckpt_path=path)
    assert t2.global_step == 12


def test_the_stop_without_max_steps_says_why(tmp_path):
    cb = CrestCallback(data(), epochs=2, **CFG)
    t = pl.Trainer(max_epochs=-1, callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu")
    with pytest.warns(UserWarning, match="stopping the fit \\(no max_epochs: every later epoch would be empty\\)"):
        t.fit(Module(), train_dataloaders=cb.dataloader())
    assert t.global_step == 6


@pytest.mark.parametrize("limit, cut", [(1, True), (2, True), (0.5, True), (3, False), (100, False), (1.0, False)])
def test_limit_train_batches_is_read_as_lightning_reads_it(tmp_path, limit, cut):
    """Review 20: the check compared limit_train_batches with 1.0, but Lightning reads an int as a count of
    batches: ``1`` (equal to 1.0) trained one batch an epoch without a warning, and an int of at least the
    epoch's batches (cutting nothing) was warned about."""
    cb = CrestCallback(data(), **CFG)  # 3 batches an epoch
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer(tmp_path, 2, cb, limit_train_batches=limit).fit(Module(), train_dataloaders=cb.dataloader())
    said = [w for w in seen if "limit_train_batches" in str(w.message) and "CREST" in str(w.message)]
    assert bool(said) == cut, [str(w.message) for w in said]
    # Lightning ends the passes early on purpose and trains what they handed out: no "left before its end"
    # (review 39: that warning, new for a loader's passes broken off, fired here from the second epoch)
    assert not [w for w in seen if "left before its end" in str(w.message)]
    assert cb.stats["step"] == (min(3, limit if isinstance(limit, int) else int(3 * limit)) * 2)


def test_a_batch_limit_is_said_once_not_again_as_a_set_epoch_of_the_users(tmp_path):
    """Review 43: with limit_train_batches cutting CREST's epochs (warned at setup), the callback's own
    set_epoch calls then warned that "set_epoch(3) is ahead of the run ... Epochs count from 0; to continue a
    saved run, load its state_dict", advice about a call the user never made."""
    cb = CrestCallback(data(), **CFG)  # 3 batches an epoch
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer(tmp_path, 4, cb, limit_train_batches=1).fit(Module(), train_dataloaders=cb.dataloader())
    text = [str(w.message) for w in seen]
    assert sum("limit_train_batches=1" in t for t in text) == 1, text
    assert not [t for t in text if "set_epoch" in t], text
    assert cb.stats["step"] == 4


class _PlainModule(Module):
    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        w = batch[2] if len(batch) == 3 else torch.ones(len(y))
        self.seen.append(len(y))
        return (w * F.cross_entropy(self(x), y, reduction="none")).mean()


def test_a_checkpoint_without_crest_state_starts_a_run_over_the_epochs_left(tmp_path):
    """Review 20: adding CREST to a run saved without it (fit's ckpt_path) planned CREST's run from epoch 0
    at setup, before Lightning restored the epoch: set_epoch then jumped ahead of it with a warning whose
    advice could not be followed, and of the 4 epochs' 12 planned steps 6 trained, epochs_done 0. Now a new
    run over the epochs left (2, as for a continued fit), said in a warning."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    first = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                       accelerator="cpu", default_root_dir=tmp_path,
                       callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    first.fit(_PlainModule(), train_dataloaders=torch.utils.data.DataLoader(data(), batch_size=24))
    cb = CrestCallback(data(), **CFG)  # 3 batches an epoch
    module = _PlainModule()
    t = trainer(tmp_path, 4, cb)
    with pytest.warns(UserWarning, match="holds no CREST state; the fit continues at epoch 2, and CREST starts a "
                                         "new run over its 2 epochs"):
        t.fit(module, train_dataloaders=cb.dataloader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert module.seen == [24] * 6 and cb.stats["step"] == 6 == cb.loader.total_steps
    assert cb.stats["budget"]["epochs_done"] == 2


class _NoTargets(torch.utils.data.Dataset):
    def __init__(self):
        self.base, self.reads = data(), 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        return self.base[i]


def test_a_checkpoint_without_crest_state_reads_label_less_data_once(tmp_path):
    """Review 21: the new run over the epochs left built a second loader, which read a dataset without a
    `targets` attribute in full again to find its labels (and said so twice)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    first = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                       accelerator="cpu", default_root_dir=tmp_path,
                       callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    first.fit(_PlainModule(), train_dataloaders=torch.utils.data.DataLoader(data(), batch_size=24))
    ds = _NoTargets()
    cb = CrestCallback(ds, **CFG)
    assert ds.reads == 0  # not at construction: the labels need a pass over the items
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer(tmp_path, 3, cb).fit(_PlainModule(), train_dataloaders=cb.dataloader(),
                                     ckpt_path=str(tmp_path / "last.ckpt"))
    passes = [w for w in seen if "to find their labels" in str(w.message)]
    assert len(passes) == 1, [str(w.message)[:80] for w in passes]
    assert cb.stats["step"] == 6 and cb.stats["budget"]["epochs_done"] == 2


class TwoOptimizers(Module):
    """Manual optimization with two optimizers: two optimizer steps (global steps) a CREST batch."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y, w = batch
        first, second = self.optimizers()
        loss = (w * F.cross_entropy(self(x), y, reduction="none")).mean()
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()

    def configure_optimizers(self):
        layers = [m for m in self.net if isinstance(m, torch.nn.Linear)]
        return [torch.optim.SGD(layers[0].parameters(), lr=0.1),
                torch.optim.SGD([p for m in layers[1:] for p in m.parameters()], lr=0.1)]


def _said(record, what: str) -> list:
    return [str(w.message) for w in record if what in str(w.message)]


@pytest.mark.parametrize("max_steps,warned", [(12, False), (16, True)])
def test_max_steps_under_manual_optimization_counts_its_optimizer_steps(tmp_path, max_steps, warned):
    """Review 53: with two optimizer steps a CREST batch (manual optimization, two optimizers) the max_steps
    check counted a batch as one global step: max_steps=12, exactly CREST's 6 planned batches, was warned
    about ("the fit stops at global step 6", about 50 % of a schedule). The rate is read from the first
    trained batch: no warning there, and one naming global step 12 for a max_steps beyond it."""
    cb = CrestCallback(data(), epochs=2, **CFG)  # 3 batches an epoch: 6 planned, 12 optimizer steps
    tr = trainer(tmp_path, None, cb, max_steps=max_steps)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        tr.fit(TwoOptimizers(), train_dataloaders=cb.dataloader())
    assert cb.stats["step"] == 6 and tr.global_step == 12
    said = _said(rec, f"Trainer(max_steps={max_steps}) without max_epochs")
    assert len(said) == int(warned)
    if warned:
        assert "2 optimizer steps a batch" in said[0] and "stops at global step 12" in said[0]
        # (review 140: the advice named crest.loader.total_steps, CREST's 6 batches, under any rate)
        assert "the steps its optimizer takes in CREST's 6 batches (12 global steps" in said[0]
        assert "Size it from crest.loader.total_steps" not in said[0]


@pytest.mark.parametrize("second,warned", [(4, False), (3, True)])
def test_a_continued_fit_compares_epochs_with_the_epochs_it_trains(tmp_path, second, warned):
    """Review 53: a second fit on a Trainer fitted before is a new CREST run over the epochs it trains, from
    the current epoch to max_epochs; the epochs/max_epochs warning compared epochs with max_epochs itself,
    so raising max_epochs from 2 to 4 (2 epochs, CREST's 2) was warned about as "the last 2 epochs yield
    no batches", and to 3 (1 epoch of CREST's 2) as its opposite."""
    cb = CrestCallback(data(), epochs=2, **CFG)
    tr = trainer(tmp_path, 2, cb)
    module = Module()
    tr.fit(module, train_dataloaders=cb.dataloader())
    tr.fit_loop.max_epochs = second
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        tr.fit(module, train_dataloaders=cb.dataloader())
    said = _said(rec, "CrestCallback(epochs=2)")
    assert len(said) == int(warned)
    if warned:
        assert "from epoch 2: this fit trains 1" in said[0] and "1 epochs of the budget untrained" in said[0]
    assert cb.stats["step"] == 3 * (second - 2)


@pytest.mark.parametrize("kw,named", [(dict(fast_dev_run=2), "Trainer(fast_dev_run=2)"),
                                      (dict(overfit_batches=2), "Trainer(overfit_batches=2)"),
                                      (dict(limit_train_batches=2), "Trainer(limit_train_batches=2)")])
def test_the_cut_epoch_warning_names_the_option_the_user_passed(tmp_path, kw, named):
    """Review 53: fast_dev_run and overfit_batches set limit_train_batches themselves, and the warning named
    limit_train_batches, which the user never passed; overfit_batches does not repeat CREST's batches."""
    cb = CrestCallback(data(), epochs=2, **CFG)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer(tmp_path, 2, cb, **kw).fit(Module(), train_dataloaders=cb.dataloader())
    said = _said(rec, "cuts each epoch short of CREST's share")
    assert len(said) == 1 and said[0].startswith(named)
    if "overfit_batches" in kw:
        assert "no batch repeats" in said[0]


class _FailsAtStep4(Module):
    def training_step(self, batch, batch_idx):
        if self.global_step == 4:
            raise RuntimeError("a failure inside the step")
        return super().training_step(batch, batch_idx)


def test_a_checkpoint_written_inside_a_step_resumes_with_that_steps_batch(tmp_path):
    """Review 91: OnExceptionCheckpoint (or a preemption's checkpoint) writes the callback's state while the
    step's batch is handed out but not trained; the state counted it as trained, and the resumed fit, which
    Lightning restarts at the completed batches, skipped it: 8 of 9 steps, other weights. The batch is the
    resumed fit's first now: the uninterrupted run's batches and weights."""
    cb, module = CrestCallback(data(), **CFG), _FailsAtStep4()
    saver = pl.callbacks.OnExceptionCheckpoint(dirpath=tmp_path)
    first = pl.Trainer(max_epochs=3, callbacks=[cb, saver], logger=False, enable_progress_bar=False,
                       enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu", deterministic=True)
    with pytest.raises(RuntimeError, match="inside the step"):
        first.fit(module, train_dataloaders=cb.dataloader())
    assert len(module.seen) == 4  # the failing step's batch never trained
    _resumes_as_uninterrupted(tmp_path, tmp_path / "on_exception.ckpt", module.seen)


def _resumes_as_uninterrupted(tmp_path, path, before):
    """The checkpoint at ``path`` (global step 4, CREST's position 4), resumed by a new fit, trains the rest of
    the uninterrupted run: after the 4 batches ``before``, its batches and its final parameters."""
    saved = torch.load(path, weights_only=True)
    assert saved["global_step"] == 4 and saved["callbacks"]["CrestCallback"]["position"] == 4
    cb2, module2 = CrestCallback(data(), **CFG), Module(seed=5)
    t2 = trainer(tmp_path, 3, cb2)
    t2.fit(module2, train_dataloaders=cb2.dataloader(), ckpt_path=path)
    seen, model, _ = plain_loop(3)
    assert t2.global_step == 9
    for a, b in zip(list(before[:4]) + module2.seen, seen, strict=True):
        np.testing.assert_array_equal(a, b)
    for p, q in zip(module2.net.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


class _SaveAtStep(pl.Callback):
    """A user's "save every N steps" callback: a checkpoint from its on_train_batch_end, after the step."""

    def __init__(self, path, step):
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("saver_first", [True, False])
def test_a_checkpoint_from_another_callbacks_batch_end_resumes_after_that_batch(tmp_path, saver_first):
    """Review 140: a checkpoint written by a callback listed before CREST's, from its on_train_batch_end (the
    step has run), counted the batch as untrained: the resumed fit, which Lightning restarts after the batch
    it has processed, trained that batch twice and never trained the run's last. The uninterrupted run's
    batches and weights now, whichever callback comes first."""
    path = tmp_path / "at4.ckpt"
    cb, module = CrestCallback(data(), **CFG), Module()
    saver = _SaveAtStep(path, 4)
    first = pl.Trainer(max_epochs=3, callbacks=[saver, cb] if saver_first else [cb, saver], logger=False,
                       enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                       default_root_dir=tmp_path, accelerator="cpu", deterministic=True)
    first.fit(module, train_dataloaders=cb.dataloader())
    _resumes_as_uninterrupted(tmp_path, path, module.seen)


def test_with_dropping_a_checkpoint_written_before_crests_batch_end_is_warned_about(tmp_path):
    """Review 142: the batch counted as trained (review 140's fix), but its losses reach the drop policy in
    CrestCallback's own on_train_batch_end, which runs after an earlier callback's save: the checkpoint held the
    batch without its losses, and the resumed run's drop decisions went another way, silently. Said when such a
    checkpoint is written (moving the callback first changed other callbacks' order: review 144); a saver listed
    after CrestCallback, or dropping off, is quiet."""
    from crestcore import DropConfig

    dropping = dict(CFG, config=CrestConfig(m=24, r=60, tau=0.05, T2=2,
                                            drop=DropConfig(alpha=2.0, window=4, min_records=1, floor=60)))
    for cfg, saver_first, warned in ((dropping, True, True), (dropping, False, False), (CFG, True, False)):
        cb, saver = CrestCallback(data(), **cfg), _SaveAtStep(tmp_path / "at4.ckpt", 4)
        t = pl.Trainer(max_epochs=3, callbacks=[saver, cb] if saver_first else [cb, saver], logger=False,
                       enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                       default_root_dir=tmp_path, accelerator="cpu", deterministic=True)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            t.fit(Module(), train_dataloaders=cb.dataloader())
        said = _said(rec, "holds the batch as trained but not its losses")
        assert len(said) == int(warned) and t.callbacks.index(cb) == int(saver_first)  # the order kept


def test_a_checkpoint_loaded_to_evaluate_leaves_the_crest_run_alone(tmp_path):
    """Review 143: Lightning loads the callbacks' states with every checkpoint, for validate/test/predict too:
    trainer.test() after a fit with a ModelCheckpoint rewound CREST's record and loader to the checkpoint's
    point, and a checkpoint evaluated before any fit was applied to the next fit as if it resumed it. CREST's
    state is restored by fit(ckpt_path=...) only."""

    class Tested(Module):
        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_loss", F.cross_entropy(self(x), y))

        validation_step = test_step

    cb = CrestCallback(data(), **CFG)
    every = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    t = pl.Trainer(max_epochs=3, callbacks=[cb, every], logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu", deterministic=True)
    t.fit(Tested(), train_dataloaders=cb.dataloader())
    ckpt = str(next(tmp_path.glob("epoch=0-*.ckpt")))  # the run at step 3
    before = (cb.stats["step"], cb.stats["selections"], cb.loader.position)
    t.test(ckpt_path=ckpt, dataloaders=torch.utils.data.DataLoader(data(), batch_size=60), verbose=False)
    assert (cb.stats["step"], cb.stats["selections"], cb.loader.position) == before == (9, before[1], 9)
    fresh = CrestCallback(data(), **CFG)
    t2 = trainer(tmp_path, 3, fresh)
    t2.validate(Tested(), ckpt_path=ckpt, dataloaders=torch.utils.data.DataLoader(data(), batch_size=60),
                verbose=False)
    t2.fit(Tested(), train_dataloaders=fresh.dataloader())  # a new run: not the checkpoint's continued
    assert fresh.stats["step"] == 9 and fresh.stats["selections"] == before[1]
    # a checkpoint without CREST's state, tested, leaves no flag behind that drops the next load_state_dict of
    # the user's (review 144)
    plain = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                       enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu")
    plain.fit(Tested(), train_dataloaders=torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*data().tensors[:2], torch.ones(len(data()))), batch_size=60))
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    later = CrestCallback(data(), **CFG)
    trainer(tmp_path, 3, later).test(Tested(), ckpt_path=str(tmp_path / "plain.ckpt"), verbose=False,
                                     dataloaders=torch.utils.data.DataLoader(data(), batch_size=60))
    state = torch.load(ckpt, weights_only=True)["callbacks"]["CrestCallback"]
    later.load_state_dict(state)
    assert later.state_dict()["position"] == 3  # kept for the next fit, as before


@pytest.mark.parametrize("num_training,warned", [(100, True), (5, False)])
def test_a_learning_rate_sweep_longer_than_the_plan_is_warned_about(tmp_path, num_training, warned):
    """Review 147: the LR finder's trials train CREST's planned batches; a sweep longer than the plan stopped
    early and Lightning gave no suggestion, or one from the part that ran, written into the module. Said at
    setup; a sweep within the plan is quiet."""
    from lightning.pytorch.tuner import Tuner

    class Tuned(Module):
        def __init__(self):
            super().__init__()
            self.lr = 0.1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    cb = CrestCallback(data(), **CFG)  # 3 steps an epoch: 9 planned
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        Tuner(trainer(tmp_path, 3, cb)).lr_find(Tuned(), train_dataloaders=cb.dataloader(), num_training=num_training)
    said = _said(rec, "the learning-rate finder sweeps")
    assert len(said) == int(warned) and (not warned or "CREST plans 9" in said[0])


def test_passes_budgets_warn_that_lightning_skips_epoch_end_validation(tmp_path):
    """Review 124: under budget_counts="passes" an epoch ends when its measurement budget is spent, before
    len(dataloader) batches, and Lightning then skips its end-of-epoch validation (none ran in four epochs),
    silently. Said at the fit's start when it validates by epochs; validation by steps runs and is not warned."""

    class Validated(Module):
        def __init__(self):
            super().__init__()
            self.validated_at = []

        def validation_step(self, batch, batch_idx):
            if batch_idx == 0:
                self.validated_at.append(int(self.trainer.global_step))

    val = torch.utils.data.DataLoader(data(), batch_size=60)
    cfg = dict(CFG, budget=0.5, budget_counts="passes")
    cb = CrestCallback(data(), **cfg)
    module = Validated()
    with pytest.warns(UserWarning, match="skips the validation it runs at an epoch's end"):
        trainer(tmp_path, 4, cb, num_sanity_val_steps=0).fit(module, train_dataloaders=cb.dataloader(),
                                                              val_dataloaders=val)
    assert cb.stats["step"] < 4 * len(cb.dataloader())  # the epochs ended early: the case warned about
    cb = CrestCallback(data(), **cfg)
    module = Validated()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*skips the validation.*")
        t = trainer(tmp_path, 4, cb, num_sanity_val_steps=0, check_val_every_n_epoch=None, val_check_interval=2)
        t.fit(module, train_dataloaders=cb.dataloader(), val_dataloaders=val)
    assert module.validated_at == list(range(2, t.global_step + 1, 2)) and len(module.validated_at) >= 2
    cb = CrestCallback(data(), **dict(CFG, budget=0.5))  # steps (the default): every epoch's validation runs
    module = Validated()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*skips the validation.*")
        trainer(tmp_path, 4, cb, num_sanity_val_steps=0).fit(module, train_dataloaders=cb.dataloader(),
                                                              val_dataloaders=val)
    assert len(module.validated_at) == 4


class _OneCycle(Module):
    """A OneCycle schedule stepped every batch, sized from trainer.estimated_stepping_batches."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        self.planned = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=self.planned)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _ManualOneCycle(_OneCycle):
    """The same schedule under manual optimization, stepped by training_step (interval left at "epoch")."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y, w = batch
        opt, sched = self.optimizers(), self.lr_schedulers()
        opt.zero_grad()
        self.manual_backward((w * F.cross_entropy(self(x), y, reduction="none")).mean())
        opt.step()
        sched.step()

    def configure_optimizers(self):
        out = super().configure_optimizers()
        return {"optimizer": out["optimizer"], "lr_scheduler": {"scheduler": out["lr_scheduler"]["scheduler"]}}


class _ManualPerEpoch(_ManualOneCycle):
    """Manual optimization with a StepLR stepped once an epoch, in on_train_epoch_end (review 159: warned about)."""

    def training_step(self, batch, batch_idx):
        x, y, w = batch
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward((w * F.cross_entropy(self(x), y, reduction="none")).mean())
        opt.step()

    def on_train_epoch_end(self):
        self.lr_schedulers().step()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


def test_passes_budgets_warn_that_a_per_step_schedule_stops_short(tmp_path):
    """Review 157: under budget_counts="passes" a OneCycle schedule sized from estimated_stepping_batches stopped at
    7 of its 20 steps, its learning rate near the peak, and the callback said nothing (it warns about the same
    scheduler failure for max_steps and epochs). Said at the fit's start; a steps budget, whose length is exact,
    is quiet and ends its schedule."""
    cb = CrestCallback(data(), **dict(CFG, budget=0.5, budget_counts="passes"))
    module = _OneCycle()
    with pytest.warns(UserWarning, match="with a learning-rate scheduler stepped every batch"):
        t = trainer(tmp_path, 4, cb)
        t.fit(module, train_dataloaders=cb.dataloader())
    assert t.global_step < module.planned  # the case warned about: the schedule stopped short
    cb = CrestCallback(data(), **dict(CFG, budget=0.5))
    module = _OneCycle()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*stepped every batch.*")
        t = trainer(tmp_path, 4, cb)
        t.fit(module, train_dataloaders=cb.dataloader())
    assert t.global_step == module.planned and t.optimizers[0].param_groups[0]["lr"] < 0.01  # (peak 0.1)
    cb = CrestCallback(data(), **dict(CFG, budget=0.5, budget_counts="passes"))  # review 158: manual stepping
    with pytest.warns(UserWarning, match=r"stepped every batch \(stepped more than once in the first epoch\)"):
        trainer(tmp_path, 4, cb).fit(_ManualOneCycle(), train_dataloaders=cb.dataloader())
    cb = CrestCallback(data(), **dict(CFG, budget=0.5, budget_counts="passes"))
    module = _ManualPerEpoch()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*stepped every batch.*")
        trainer(tmp_path, 3, cb).fit(module, train_dataloaders=cb.dataloader())
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)


class _PlateauByStep(Module):
    """ReduceLROnPlateau on the validation loss, validation every 2 batches: Lightning's recipe (interval "step",
    frequency 2, a monitor), or under manual optimization stepped at each validation's end."""

    def __init__(self, manual):
        super().__init__()
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        x, y, w = batch
        loss = (w * F.cross_entropy(self(x), y, reduction="none")).mean()
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def on_validation_epoch_end(self):
        if not self.automatic_optimization and "val_loss" in self.trainer.callback_metrics:
            self.lr_schedulers().step(self.trainer.callback_metrics["val_loss"])

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
        if not self.automatic_optimization:
            return {"optimizer": opt, "lr_scheduler": sched}
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 2,
                                                   "monitor": "val_loss"}}


@pytest.mark.parametrize("manual", [False, True])
def test_a_plateau_scheduler_stepped_by_validation_is_no_per_step_schedule(tmp_path, manual):
    """Review 160: ReduceLROnPlateau stepped after step-based validation was warned about as a schedule "stepped
    every batch" that a passes budget stops short: it has no length to run out of."""
    val = torch.utils.data.DataLoader(data(), batch_size=60)
    cb = CrestCallback(data(), **dict(CFG, budget=0.5, budget_counts="passes"))
    module = _PlateauByStep(manual)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*stepped every batch.*")
        t = trainer(tmp_path, 3, cb, num_sanity_val_steps=0, check_val_every_n_epoch=None, val_check_interval=2)
        t.fit(module, train_dataloaders=cb.dataloader(), val_dataloaders=val)
    assert t.global_step >= 4


class _BatchNormed(Module):
    """Module's MLP with a BatchNorm layer; records each step's (epoch, inputs, weights, BatchNorm's input)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(D_IN, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, C))
        self.inputs = []

    def training_step(self, batch, batch_idx):
        with torch.no_grad():  # what the BatchNorm layer sees in this step
            self.inputs.append((int(self.trainer.current_epoch), batch[0].clone(), batch[2].clone(),
                                self.net[0](batch[0])))
        return super().training_step(batch, batch_idx)


def _swa_fit(tmp_path, dataset, kw):
    """Three epochs of _BatchNormed with CREST and StochasticWeightAveraging (from epoch 1): (callback, module)."""
    cb = CrestCallback(dataset, **kw)
    module = _BatchNormed()
    swa = pl.callbacks.StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    pl.Trainer(max_epochs=3, callbacks=[cb, swa], logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu",
               deterministic=True).fit(module, train_dataloaders=cb.dataloader())
    return cb, module


def test_stochastic_weight_averagings_batch_norm_epoch_gets_the_datas_statistics(tmp_path):
    """Review 124: Lightning's StochasticWeightAveraging adds an epoch after max_epochs for a model with
    BatchNorm, resets the averaged model's statistics and recomputes them over the training batches. Past
    CREST's plan that epoch got no batch, and the model kept mean 0, variance 1. It now gets len(dataloader)
    unweighted batches of m examples drawn from the whole training set (no CREST step is taken or counted),
    and the statistics are theirs."""

    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*all planned steps are used.*")
        cb, module = _swa_fit(tmp_path, data(), CFG)
    steps = len(cb.dataloader())
    assert cb.stats["step"] == 3 * steps  # the BN epoch took no CREST step
    last = [rec for rec in module.inputs if rec[0] == 3]  # the epoch SWA added
    assert len(last) == steps
    X, _ = data().tensors
    order = np.random.default_rng([CFG["seed"], 0x5A7]).permutation(N)[: steps * 24]
    for a, (_, x, w, _) in zip(range(0, order.size, 24), last):
        assert torch.equal(x, X[np.sort(order[a : a + 24])]) and torch.equal(w, torch.ones_like(w))
    bn = module.net[1]
    assert int(bn.num_batches_tracked) == steps
    h = [rec[3] for rec in last]
    torch.testing.assert_close(bn.running_mean, torch.stack([b.mean(0) for b in h]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([b.var(0) for b in h]).mean(0))


def test_stochastic_weight_averagings_epoch_with_a_partial_batch_or_inside_crests_plan(tmp_path):
    """Review 126: the BatchNorm epoch cut its batches from the whole training set, and a last batch of one
    example (n = 241, m = 24, budget 1.0) failed in BatchNorm; with CrestCallback(epochs=4) beyond
    max_epochs=3 SWA's epoch fell inside CREST's plan, was served CREST's batches, and the fit failed on SWA's
    accumulate_grad_batches with a message that blamed the user. Whole batches only, and the epoch is SWA's
    wherever it falls."""

    X, y = data().tensors
    for ds, kw in ((TensorDataset(torch.cat([X, X[:1]]), torch.cat([y, y[:1]])), dict(CFG, budget=1.0)),
                   (data(), dict(CFG, epochs=4))):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*CrestCallback\\(epochs=4\\) but Trainer.*")
            cb, module = _swa_fit(tmp_path, ds, kw)
        bn_epoch = [(x.shape[0], float(w.std())) for epoch, x, w, _ in module.inputs if epoch == 3]
        assert bn_epoch and all(size == 24 and std == 0.0 for size, std in bn_epoch), bn_epoch
        assert cb.stats["step"] == 3 * len(cb.dataloader())  # SWA's epoch took no CREST step


def test_a_batch_hook_that_may_transform_the_inputs_is_warned_about_without_forward(tmp_path):
    """Review 181: a standardisation in Lightning's on_after_batch_transfer (on the module or the DataModule) was
    invisible to CREST's measurement passes, which read the dataset and call the model without the hooks: half
    the first coreset and the trust checks' rho changed, silently. Warned at setup where no forward= is given;
    with forward= (repeating the transform), or without such hooks, nothing is said."""

    class Hooked(Module):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            x, y, w = batch
            return (x - 1.0) / 2.0, y, w

    class HookedData(DataModule):
        def on_before_batch_transfer(self, batch, dataloader_idx):
            return batch

    cb = CrestCallback(data(), **CFG)
    with pytest.warns(UserWarning, match=r"Hooked.on_after_batch_transfer may change the training batches.*"
                                         r"pass CrestCallback\(forward="):
        trainer(tmp_path, 1, cb).fit(Hooked(), train_dataloaders=cb.dataloader())
    patched = Module()  # a hook assigned on the instance, which Lightning calls too (review 182)
    patched.on_after_batch_transfer = lambda batch, dataloader_idx: batch
    cb = CrestCallback(data(), **CFG)
    with pytest.warns(UserWarning, match=r"Module.on_after_batch_transfer may change"):
        trainer(tmp_path, 1, cb).fit(patched, train_dataloaders=cb.dataloader())
    hooked = HookedData()
    cb2 = hooked.crest = CrestCallback(lambda: hooked.train_set, **CFG)
    with pytest.warns(UserWarning, match=r"HookedData.on_before_batch_transfer may change"):
        trainer(tmp_path, 1, cb2).fit(Module(), datamodule=hooked)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        fwd = CrestCallback(data(), forward=lambda module, batch: module((batch[0] - 1.0) / 2.0), **CFG)
        trainer(tmp_path, 1, fwd).fit(Hooked(), train_dataloaders=fwd.dataloader())
        plain = CrestCallback(data(), **CFG)
        trainer(tmp_path, 1, plain).fit(Module(), train_dataloaders=plain.dataloader())


def test_crests_batches_are_refused_to_another_trainer_and_to_a_dataloader_over_them(tmp_path):
    """Review 181: a new Trainer's predict over crest.dataloader() after a fit took two planned steps, counted as
    trained, and its validate was told of a CombinedLoader; a DataLoader wrapping crest.dataloader() (for loading
    workers) failed in a worker with "'_CrestTrainLoader' object is not subscriptable". Both are refused, saying
    what the loader is for."""

    class Predicting(Module):
        def predict_step(self, batch, batch_idx):
            return self(batch[0])

    cb = CrestCallback(data(), **CFG)
    module = Predicting()
    trainer(tmp_path, 2, cb, max_steps=2).fit(module, train_dataloaders=cb.dataloader())
    steps = cb.stats["counters"]["train_steps"]
    other = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                       default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="read outside the training loop of the fit it was set up for"):
        other.predict(module, dataloaders=cb.dataloader())
    assert cb.stats["counters"]["train_steps"] == steps  # no planned step taken
    with pytest.raises(TypeError, match=r"crest.dataloader\(\) is a loader of CREST's batches, not a dataset"):
        next(iter(torch.utils.data.DataLoader(cb.dataloader(), batch_size=None)))
