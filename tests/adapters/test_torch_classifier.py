"""The torch adapter's classifier check (_explains: three rows, float32 tolerance, a log-softmax's row
offset), checkpoints whose pending batches exceed the plan, dataset_labels' copy and refusals."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from crestcore.adapters.torch import _explains  # noqa: E402


def test_explains_needs_three_rows():
    """_explains: 'on a batch of at least three rows' -- two rows fit any per-column scale and offset, so
    they cannot tell a classifier from an unrelated layer of the same width."""
    g = torch.Generator().manual_seed(0)
    out, z = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)  # unrelated
    assert not _explains(out, z)
    out3, z3 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    assert not _explains(out3, z3)
    assert _explains(out3, torch.log_softmax(out3, dim=1))  # a row offset explains
    assert _explains(out3, 2.0 * out3 + torch.arange(4.0))  # a temperature and a column offset explain


def test_a_scale_per_class_after_the_classifier_does_not_explain_the_logits():
    """Review 116: logits fc(e) * a with a per-class scale a = (0.2, 1, 5) were taken as explained by fc,
    with no warning; embeddings=True then selected on (softmax - onehot) e^T while fc's weight gradients
    are (a * (softmax - onehot)) e^T (cosines down to 0.53, up to 3 of 10 picks a class changed). Only
    one scale for all classes (a temperature, whose features are a uniform multiple) explains them now."""
    g = torch.Generator().manual_seed(3)
    out = torch.randn(32, 3, generator=g, dtype=torch.float64)
    a = torch.tensor([0.2, 1.0, 5.0], dtype=torch.float64)
    assert not _explains(out, out * a)
    assert not _explains(out, torch.log_softmax(out * a + 0.5, dim=1))
    assert _explains(out, out * 2.5 + torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64))
    assert _explains(out, torch.log_softmax(out / 0.7, dim=1))


def test_explains_tolerates_float32_rounding_only():
    """float32 outputs explain logits to 1e-5 of their scale (1e-2 is for float16/bfloat16 only): a layer
    whose output differs from the logits by 0.1 % of their scale is not the classifier."""
    g = torch.Generator().manual_seed(1)
    out = torch.randn(16, 5, generator=g)
    noise = 1e-3 * torch.randn(16, 5, generator=g)
    assert _explains(out, torch.log_softmax(out, dim=1))
    assert not _explains(out, torch.log_softmax(out, dim=1) + noise)
    half = out.to(torch.bfloat16)
    assert _explains(half, (out + 1e-3 * noise).to(torch.bfloat16))  # half precision: its own rounding


def test_the_classifier_under_a_log_softmax_is_found_among_layers_of_its_width():
    """docs/pytorch.md: the classifier's output may differ from the returned logits by a row offset
    (log-softmax). With a hidden layer of the same width C, only the explained call identifies it; no
    torch test had a log-softmax model."""
    from torch.utils.data import TensorDataset

    from crestcore.adapters.torch import TorchModelOps

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.hidden = torch.nn.Linear(4, 3)  # width C = 3 as well
            self.head = torch.nn.Linear(3, 3)

        def forward(self, x):
            return torch.log_softmax(self.head(torch.relu(self.hidden(x))), dim=1)

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(32, 4, generator=g), torch.arange(32) % 3
    net = Net()
    ops = TorchModelOps(net, TensorDataset(X, y))
    idx = np.arange(10)
    logits, emb = ops.outputs(idx, embeddings=True)
    with torch.no_grad():
        want = torch.relu(net.hidden(X[:10]))
    torch.testing.assert_close(torch.as_tensor(emb), want)


def test_a_checkpoint_whose_pending_batches_exceed_the_plan_is_refused():
    """CrestLoader.load_state_dict: position plus pending batches must fit in the planned steps (a run
    planned for fewer epochs than the checkpoint's cannot replay them)."""
    from crestcore import CrestConfig
    from crestcore.adapters.torch import CrestBatchSampler, _example_data

    def sampler(epochs):
        return CrestBatchSampler(torch.nn.Linear(4, 2), _example_data(), config=CrestConfig(m=4), budget=1.0,
                                 epochs=epochs, seed=0)

    s = sampler(2)  # 16 examples: 4 batches an epoch, 8 planned
    it = iter(s)
    for _ in range(4):
        next(it)
    it = iter(s)
    for _ in range(2):
        next(it)  # 6 handed out
    state = s.state_dict(trained=3)  # position 3, 3 pending
    assert state["position"] == 3 and len(state["pending"]) == 3
    short = sampler(1)  # 4 planned steps: 3 + 3 do not fit
    with pytest.raises(ValueError, match="exceed"):
        short.load_state_dict(state)


def test_uint64_labels_past_int64_are_refused_not_wrapped_to_negative_ones():
    """Review 109 F2: dataset_labels cast uint64 targets of 2^63 and more to negative int64 values (and the
    loader then reported a minimum the data never held); labels= the same."""
    from crestcore import CrestConfig
    from crestcore.adapters.torch import CrestLoader, dataset_labels

    class Targets(torch.utils.data.Dataset):
        def __init__(self, t):
            self.targets = t

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return torch.zeros(3), int(self.targets[i])

    big = np.array([0, 1, 2**63 + 5, 1] * 5, dtype=np.uint64)
    with pytest.raises(ValueError, match=r"above 2\^63 - 1"):
        dataset_labels(Targets(big))
    with pytest.raises(ValueError, match=r"above 2\^63 - 1"):
        CrestLoader(torch.nn.Linear(3, 3), Targets(big % 3), config=CrestConfig(m=4), labels=big)
    small = np.array([0, 1, 2, 1] * 5, dtype=np.uint64)  # uint64 within range: taken as they are
    np.testing.assert_array_equal(dataset_labels(Targets(small)), small.astype(np.int64))


def test_dataset_labels_is_a_copy_and_refuses_negative_labels():
    """dataset_labels: 'a host int64 array' of its own -- for an int64 TensorDataset it must not be a view
    of the dataset's label tensor (writing it would relabel the data); negative ids are refused."""
    from torch.utils.data import TensorDataset

    from crestcore.adapters.torch import dataset_labels

    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ds = TensorDataset(torch.zeros(6, 3), y)
    lab = dataset_labels(ds)
    assert lab.dtype == np.int64 and not np.shares_memory(lab, y.numpy())
    lab[0] = 2
    assert int(ds.tensors[1][0]) == 0
    with pytest.raises(ValueError, match="non-negative"):
        dataset_labels(TensorDataset(torch.zeros(3, 3), torch.tensor([0, -1, 1])))


def test_a_huge_label_id_builds_the_loader_and_fails_where_labels_meet_outputs():
    """Read-through: with dropping on and a loss_fn, the loss-floor probe built 161 x (largest label + 1)
    logits at construction (64 TB for a label id of 10**11); wider label spaces than 65,536 are not probed,
    and the first batch names the mismatch with the model's 3 outputs (review 109's message)."""
    from torch.utils.data import TensorDataset

    from crestcore import CrestConfig
    from crestcore.adapters.torch import CrestLoader

    y = torch.tensor([0, 1, 10**11] * 20)
    loader = CrestLoader(torch.nn.Linear(3, 3), TensorDataset(torch.randn(60, 3), y), config=CrestConfig(m=6, T2=5),
                         budget=0.5, epochs=1, loss_fn=torch.nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(ValueError, match="labels hold class 100000000000 but the model gives 3 outputs"):
        next(iter(loader))
