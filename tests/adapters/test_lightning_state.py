"""CrestCallback: the limit_train_batches warning and the start epoch of a restored continued fit."""
import warnings

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

from _helpers import torch_mlp  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from crestcore import CrestConfig  # noqa: E402
from crestcore.adapters.lightning import CrestCallback  # noqa: E402

N, D_IN, C = 240, 6, 3
CFG = dict(config=CrestConfig(m=24, r=60, tau=0.05), budget=0.3, seed=2)


def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D_IN, generator=g)
    return TensorDataset(X, (X @ torch.randn(D_IN, C, generator=g)).argmax(1))


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch_mlp(D_IN, C, seed=0)

    def forward(self, x):
        return self.net(x)


def fake_trainer(current_epoch=0, max_epochs=5, limit=1.0):
    return type("T", (), {"world_size": 1, "max_epochs": max_epochs, "current_epoch": current_epoch,
                          "accumulate_grad_batches": 1, "limit_train_batches": limit})()


def test_limit_train_batches_is_warned_about():
    cb = CrestCallback(data(), **CFG)
    with pytest.warns(UserWarning, match="limit_train_batches"):
        cb.setup(fake_trainer(limit=0.5), Module(), "fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CrestCallback(data(), **CFG).setup(fake_trainer(limit=1.0), Module(), "fit")


def test_a_restored_continued_run_keeps_its_start_epoch_in_the_next_checkpoint():
    module = Module()
    cb = CrestCallback(data(), **CFG)
    cb.setup(fake_trainer(current_epoch=3), module, "fit")  # a continued fit: epochs 3 and 4
    state = cb.state_dict()
    assert state["lightning_epoch0"] == 3 and cb.loader.epochs == 2
    fresh = CrestCallback(data(), **CFG)
    fresh.load_state_dict(state)
    fresh.setup(fake_trainer(current_epoch=0), module, "fit")  # a fresh Trainer resuming from ckpt_path
    assert fresh.loader.epochs == 2
    assert fresh.state_dict()["lightning_epoch0"] == 3  # the next checkpoint still says where the run started


def test_a_refused_checkpoint_of_a_continued_run_leaves_the_callback_as_it_was():
    """Review 172: loading a continued run's checkpoint (another lightning_epoch0) put a rebuilt loader and the
    new start epoch in place before the loader checked the state, so a refused one left the callback describing
    a new run at position 0. The rebuilt loader is put in place once it accepted the state."""
    module = Module()
    cb = CrestCallback(data(), **CFG)
    cb.setup(fake_trainer(current_epoch=0), module, "fit")
    loader = cb.loader
    state = cb.state_dict()
    with pytest.raises(ValueError, match="position must be an integer"):
        cb.load_state_dict(dict(state, lightning_epoch0=1, position=10**6))
    assert cb.loader is loader and cb._epoch0 == 0 and cb.state_dict()["lightning_epoch0"] == 0
    cb.load_state_dict(dict(state, lightning_epoch0=1))  # accepted: rebuilt over the epochs from 1
    assert cb.loader is not loader and cb._epoch0 == 1 and cb.loader.epochs == 4


def test_a_checkpoint_refused_at_setup_is_kept_for_the_retry():
    """Review 173: a state given to load_state_dict before setup (by hand, before fit) and refused there (a
    continued run at or beyond max_epochs: "raise max_epochs") was dropped, so the retry the error asks for
    silently started a new CREST run from step 0. It is kept until it loads, and the error says so."""
    module = Module()
    cb = CrestCallback(data(), **CFG)
    cb.setup(fake_trainer(current_epoch=0, max_epochs=5), module, "fit")
    state = dict(cb.state_dict(), lightning_epoch0=3)
    again = CrestCallback(data(), **CFG)
    again.load_state_dict(state)  # before setup: kept for it
    with pytest.raises(ValueError, match="raise max_epochs") as refused:
        again.setup(fake_trainer(current_epoch=0, max_epochs=3), module, "fit")
    assert any("stays pending for the next fit" in note for note in refused.value.__notes__)
    again.setup(fake_trainer(current_epoch=0, max_epochs=6), module, "fit")  # the retry loads it
    assert again._restored and again._epoch0 == 3 and again.loader.epochs == 3
