"""crestcore.adapters.distributed: CREST under torch.distributed, with real processes (gloo, loopback).

The multi-process tests launch this file as a script, once per rank (``python test_distributed.py
--worker SCENARIO ...``), with the environment ``torchrun`` would set (MASTER_ADDR=127.0.0.1, a free
MASTER_PORT, RANK, WORLD_SIZE). Every launch is bounded: the process group's timeout is PG_TIMEOUT_S and
the whole job is killed after JOB_TIMEOUT_S.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from torch.utils.data import TensorDataset  # noqa: E402

from crestcore import CrestConfig, DropConfig  # noqa: E402
from crestcore.adapters.torch import CrestLoader  # noqa: E402
from crestcore.adapters import distributed as D  # noqa: E402

# tests/_helpers.py, also when this file runs as a worker script (conftest.py has not put tests/ on the path)
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _helpers import torch_blobs, weighted_step  # noqa: E402

N, D_IN, C = 480, 6, 3
M = 15  # odd on purpose: the two ranks get 8 and 7 examples, so the weights are rescaled
EPOCHS, BUDGET, SEED = 5, 0.25, 3
RESUME_AT = 17  # a checkpoint is taken after this many steps, mid-epoch
PG_TIMEOUT_S = 20
JOB_TIMEOUT_S = 150
HERE = Path(__file__).resolve()


# ------------------------------------------------------------------------------------------------
# the shared problem (the workers and the single-process reference build exactly the same)
# ------------------------------------------------------------------------------------------------
def make_data():
    return torch_blobs(N, D_IN, C, noise=0.5, dtype=torch.float64)


class RowLinear(nn.Linear):
    """``nn.Linear`` whose output rows do not depend on the batch they are computed in: a broadcast
    product and a sum over the input features, where a BLAS matrix product (``nn.Linear``) may round a
    row differently for another number of rows (on some CPUs it does: a row of a 15-example batch and
    the same row in the rank's 8-example share differed in the last bit). The exact comparisons of a
    two-rank job with one process need the ranks' shares to compute what the whole batch computes."""

    def forward(self, x):
        return (x[..., :, None] * self.weight.t()).sum(-2) + self.bias


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(RowLinear(D_IN, 24), nn.Tanh(), RowLinear(24, C)).double()


def ddp_step(model, opt, x, y, w, indices, world: int = 2):
    """One step of the user's loop with DDP's arithmetic in one process: each rank's share of the batch
    (``batch_share``: rows ``r::world``, rescaled weights) gives the gradient of its weighted mean loss,
    DDP averages them (each divided by the world size, then summed), the optimizer steps. The same
    values, bit for bit, as a ``world``-rank job whose ranks hold these shares; returns the per-example
    losses in the batch's order (what ``observe`` gathers)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    losses = torch.empty(len(y), dtype=x.dtype)
    for r in range(world):
        rows = torch.arange(r, len(y), world)
        lw = torch.as_tensor(D.batch_share(indices, w.detach().numpy(), r, world)[1], dtype=w.dtype)
        ell = F.cross_entropy(model(x[rows]), y[rows], reduction="none")
        grads = torch.autograd.grad((lw * ell).mean(), params)
        for t, g in zip(total, grads):
            t += g / world
        losses[rows] = ell.detach()
    opt.zero_grad()
    for p, t in zip(params, total):
        p.grad = t
    opt.step()
    return losses


def make_config(jit=None):
    # small tau and T1: several trust checks and reselections in 40 steps; dropping on (merged losses);
    # embeddings on (logits and embeddings gathered together). CREST_TEST_JIT=1 (a job's ranks): coresets
    # selected just in time, the check on 30 examples
    jit = os.environ.get("CREST_TEST_JIT") == "1" if jit is None else jit
    extra = dict(coresets="just-in-time", check_size=30) if jit else dict(coresets="at-anchor", check_size=None)
    if os.environ.get("CREST_TEST_CEIL") == "1":  # m = 14, each of 3 classes ceil(14 / 3) = 5: batches of 15
        extra.update(m=M - 1, class_budget="ceil")
    return CrestConfig(**{"m": M, **extra, "r": 60, "P": 3, "T1": 2, "tau": 0.02, "h": 1.0, "b": 2.0, "T2": 8,
                          "embeddings": True, "drop": DropConfig(alpha=0.3, window=8, min_records=1)})


def make_opt(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def full_loss(model, X, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(X), y))


def train(loader, model, opt, records, *, stop_at=None, world=None):
    """The user's loop (set_epoch, the weighted loss line, observe). Returns at ``stop_at`` steps. With
    ``world``, a one-process loader's steps take DDP's arithmetic over that many ranks (:func:`ddp_step`)."""
    for epoch in range(loader.epoch, loader.epochs):
        loader.set_epoch(epoch)
        for x, y, w in loader:
            if world is None:
                loader.observe(weighted_step(model, opt, x, y, w))
            else:
                loader.observe(ddp_step(model, opt, x, y, w, loader.last_indices, world))
            st = loader.controller_state
            rec = {"pos": loader.position, "idx": loader.last_indices, "w": loader.last_weights,
                   "selections": st.counters["selections"], "checks": st.counters["checks"],
                   "pool": int(st.drop.active.sum()), "batch_idx": st.batch_idx.copy(),
                   "batch_w": st.batch_w.copy()}
            if hasattr(loader, "local_indices"):
                rec["local_idx"] = loader.local_indices
                rec["local_w"] = w.detach().numpy().copy()
                assert np.array_equal(loader.local_weights, rec["local_w"])
            records.append(rec)
            if stop_at is not None and loader.position >= stop_at:
                return


# ------------------------------------------------------------------------------------------------
# worker side (runs in a subprocess, one per rank)
# ------------------------------------------------------------------------------------------------
def _init_group(timeout=None):
    import torch.distributed as dist

    timeout = float(os.environ.get("CREST_TEST_PG_TIMEOUT", PG_TIMEOUT_S)) if timeout is None else timeout
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    return dist


def _teardown(dist) -> None:
    """End a rank in the order that leaves no process-group work to the interpreter's exit: every rank
    past its last collective (a barrier), what the caller released of the objects that hold the group
    (DDP wrappers, loaders, ops: ``del`` them first) collected while the interpreter is alive, then
    ``destroy_process_group``. Ranks that only destroyed the group aborted now and then at exit
    ("terminate called without an active exception", 1 job in 12 here) after finishing their work."""
    import gc

    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def worker_train(out: Path):
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist = _init_group()
    rank = dist.get_rank()
    X, y = make_data()
    result = {"rank": rank, "world": dist.get_world_size()}

    # -- the sharded operations against the unsharded ones, on this rank -------------------------
    model = make_model()
    ddp = DDP(model)
    loader = D.DistributedCrestLoader(ddp, TensorDataset(X, y), config=make_config(), budget=BUDGET,
                                      epochs=EPOCHS, seed=SEED)
    ops, inner = loader.ops, loader.ops.inner
    from crestcore import draw_subsets, minibatch_coresets

    checks = {}
    feats = torch.randn(200, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lab = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(2))
    for P in (5, 1):  # 5: uneven shares; 1: fewer problems than ranks
        subs = draw_subsets(lab.numpy(), np.arange(200), 40, P, np.random.default_rng(P))
        full = minibatch_coresets(feats, lab, m=10, r=40, P=P, rng=np.random.default_rng(0), subsets=subs)
        shard = ops.coresets(feats, lab, m=10, r=40, P=P, rng=np.random.default_rng(0), subsets=subs)
        checks[f"coresets P={P}"] = all(
            torch.equal(getattr(full, f), getattr(shard, f)) for f in ("indices", "weights", "gains", "objective"))
        checks[f"coresets P={P} int64"] = shard.indices.dtype == torch.int64
    for k in (1, 7, 40):  # 1: fewer examples than ranks
        idx = np.arange(3, 3 + 3 * k, 3)
        z, e = ops.outputs(idx, embeddings=True)
        z0, e0 = inner.outputs(idx, embeddings=True)
        checks[f"outputs k={k}"] = bool(torch.allclose(z, z0, rtol=0, atol=1e-12)
                                        and torch.allclose(e, e0, rtol=0, atol=1e-12))
        wts = np.linspace(0.5, 1.5, k)
        l1, g1 = ops.gradient(idx, wts)
        l0, g0 = inner.gradient(idx, wts)
        checks[f"gradient k={k}"] = bool(abs(l1 - l0) < 1e-12 and torch.allclose(g1, g0, rtol=1e-10, atol=1e-13))
        h1, h0 = ops.hutchinson(idx, wts, 11), inner.hutchinson(idx, wts, 11)
        checks[f"hutchinson k={k}"] = bool(torch.allclose(h1, h0, rtol=1e-10, atol=1e-13))
        # the fused fit is sharded like the two calls (not the inner, unsharded method): equal to them
        lf, gf, hf = ops.gradient_and_hutchinson(idx, wts, 11)
        checks[f"fused fit k={k}"] = bool(torch.equal(gf, g1) and torch.equal(hf, h1) and abs(lf - l1) < 1e-12)
        result[f"grad k={k}"] = g1.numpy().copy()  # must be bit-identical across ranks
    # measurement with rank 0's buffers (BatchNorm statistics differ per rank between DDP forwards)
    from crestcore.adapters.torch import TorchModelOps

    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(D_IN, 8), nn.BatchNorm1d(8), nn.Linear(8, C)).double()
    with torch.no_grad():
        bn[1].running_mean.fill_(float(rank))
    bops = D.DistributedModelOps(TorchModelOps(bn, TensorDataset(X, y)))
    idx = np.arange(0, 60, 2)
    z = bops.outputs(idx)
    checks["own buffers restored"] = bool((bn[1].running_mean == rank).all())
    with torch.no_grad():
        bn[1].running_mean.fill_(0.0)
    z0 = bops.inner.outputs(idx)
    checks["measured with rank 0's buffers"] = bool(torch.allclose(z, z0, rtol=0, atol=1e-12))
    with torch.no_grad():
        bn[1].running_mean.fill_(float(rank))
    wts = np.linspace(0.5, 1.5, idx.size)
    _, gf, hf = bops.gradient_and_hutchinson(idx, wts, 5)
    with torch.no_grad():
        bn[1].running_mean.fill_(0.0)
    _, g0, h0 = bops.inner.gradient_and_hutchinson(idx, wts, 5)
    checks["fused fit with rank 0's buffers"] = bool(torch.allclose(gf, g0, rtol=1e-10, atol=1e-13)
                                                     and torch.allclose(hf, h0, rtol=1e-10, atol=1e-12))
    # review 161: one example, so a rank without a share (a probe_size below the world size): every rank takes
    # part in the buffers' broadcast (the rank without a share skipped it, and every rank hung until the timeout)
    one, w1 = np.array([4]), np.ones(1)
    with torch.no_grad():
        bn[1].running_mean.fill_(float(rank))
    l1, g1 = bops.gradient(one, w1)
    h1 = bops.hutchinson(one, w1, 5)
    lf, gf, hf = bops.gradient_and_hutchinson(one, w1, 5)
    with torch.no_grad():
        bn[1].running_mean.fill_(0.0)
    l0, g0 = bops.inner.gradient(one, w1)
    h0 = bops.inner.hutchinson(one, w1, 5)
    checks["one example with buffers"] = bool(
        abs(l1 - l0) < 1e-12 and torch.allclose(g1, g0, rtol=1e-10, atol=1e-13)
        and torch.allclose(h1, h0, rtol=1e-10, atol=1e-12) and torch.equal(gf, g1) and torch.equal(hf, h1))
    # the anchor keeps rank 0's statistics on every rank (each rank kept its own: the ranks' shares of a
    # pass were measured with different statistics), and the live ones are left as they were
    with torch.no_grad():
        bn[1].running_mean.fill_(float(rank))
    bops.new_anchor()
    kept = bops.inner._anchor_buffers["1.running_mean"]
    checks["anchor keeps rank 0's statistics"] = bool((kept == 0).all() and (bn[1].running_mean == rank).all())
    with torch.no_grad():
        bn[1].running_mean.fill_(float(rank) + 5.0)  # training moves them on, differently per rank
    za = bops.outputs(idx)
    with torch.no_grad():
        bn[1].running_mean.fill_(0.0)
    bops.inner._anchor_buffers = None
    checks["measured with the anchor's statistics"] = bool(torch.allclose(za, bops.inner.outputs(idx), rtol=0,
                                                                          atol=1e-12))
    result["checks"] = checks

    # -- training, with a checkpoint mid-epoch ---------------------------------------------------
    opt = make_opt(ddp)
    result["loss_before"] = full_loss(model, X, y)
    records: list = []
    train(loader, ddp, opt, records, stop_at=RESUME_AT)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "crest": loader.state_dict()}, buf)
    train(loader, ddp, opt, records)
    result["records"] = records
    result["loss_after"] = full_loss(model, X, y)
    result["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    result["stats"] = loader.stats

    # -- resume from the checkpoint on fresh objects ---------------------------------------------
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = make_model()
    model2.load_state_dict(ckpt["model"])
    ddp2 = DDP(model2)
    opt2 = make_opt(ddp2)
    opt2.load_state_dict(ckpt["opt"])
    loader2 = D.DistributedCrestLoader(ddp2, TensorDataset(X, y), config=make_config(), budget=BUDGET,
                                       epochs=EPOCHS, seed=SEED)
    loader2.load_state_dict(ckpt["crest"])
    resumed: list = []
    train(loader2, ddp2, opt2, resumed)
    result["resumed"] = resumed
    result["params_resumed"] = torch.cat([p.detach().reshape(-1) for p in model2.parameters()]).numpy()
    with open(out / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(result, f)
    del ddp, ddp2, loader, loader2, ops, inner, bops, opt, opt2, model, model2
    _teardown(dist)


def _ddp_job(config, **kwargs):
    """This rank's process group, rank, DDP-wrapped model and loader on the shared problem."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist = _init_group()
    X, y = make_data()
    ddp = DDP(make_model())
    loader = D.DistributedCrestLoader(ddp, TensorDataset(X, y), config=config, budget=BUDGET, epochs=EPOCHS,
                                      seed=SEED, **kwargs)
    return dist, dist.get_rank(), ddp, loader


def worker_fail(out: Path):
    """Rank 1 dies at step 3; rank 0 must fail with a clear error, not wait forever."""
    dist, rank, ddp, loader = _ddp_job(make_config())
    opt = make_opt(ddp)
    for k, (x, y_, w) in enumerate(loader):
        if rank == 1 and k == 3:
            raise RuntimeError("injected failure on rank 1")
        weighted_step(ddp, opt, x, y_, w)
    (out / f"rank{rank}.done").write_text("finished")  # must never happen


def worker_flags(out: Path):
    """Rank 1 builds its loader with verify=False: the ranks would issue different collectives, so the
    flags are agreed at construction and every rank raises CollectiveError there (they used to wait in
    mismatched collectives until the process group's timeout)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist = _init_group()
    rank = dist.get_rank()
    X, y = make_data()
    ddp = DDP(make_model())
    if _refused(out, rank, lambda: D.DistributedCrestLoader(ddp, TensorDataset(X, y), config=make_config(),
                                                            budget=BUDGET, epochs=EPOCHS, seed=SEED,
                                                            verify=rank == 0)):
        del ddp  # both ranks were refused in step (the flags are agreed in one collective): end cleanly
        _teardown(dist)
        return
    (out / f"rank{rank}.done").write_text("built")  # must never happen


def worker_badload(out: Path):
    """Both ranks load a checkpoint that rank 1 refuses (review 77: rank 1 raised before the agreement and
    rank 0, left in it, was aborted by gloo), catch the error and go on with the run they had; then both
    load one that every rank refuses."""
    dist, rank, ddp, loader = _ddp_job(make_config())
    opt = make_opt(ddp)
    batches = iter(loader)
    for _ in range(3):
        weighted_step(ddp, opt, *next(batches))
    saved = loader.state_dict()
    before = (loader.position, loader.last_indices.copy())
    anchors = saved["measure_anchor"]
    # the count of anchors measured (it seeds the measurements' random transforms) is rolled back too (review
    # 125: the rank that accepted kept the checkpoint's)
    saved_other = dict(saved, measure_anchor=anchors + 4)
    # rank 0's copy is a longer run's (its load warns of the shorter plan): rolled back, it says nothing
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            loader.load_state_dict(dict(saved, position=999) if rank == 1 else
                                   dict(saved_other, epochs=loader.epochs + 2))
        except D.CollectiveError as exc:
            (out / f"rank{rank}.refused").write_text(str(exc))
    (out / f"rank{rank}.said").write_text("\n".join(str(w.message) for w in said))
    assert (loader.position, loader.last_indices.tolist()) == (before[0], before[1].tolist())
    assert loader.state_dict()["measure_anchor"] == anchors
    for _ in range(3):  # the run goes on in lockstep (verify compares the ranks at every selection or check)
        weighted_step(ddp, opt, *next(batches))
    try:
        loader.load_state_dict(dict(saved, position=-1))
    except ValueError as exc:
        (out / f"rank{rank}.own").write_text(f"{type(exc).__name__}: {exc}")
    (out / f"rank{rank}.done").write_text(str(loader.position))
    del batches, ddp
    _teardown(dist)


def _refused(out: Path, rank: int, build) -> bool:
    """Whether ``build()`` raised CollectiveError (its message written to ``rank<r>.refused``). The error is
    gone when this returns: its traceback holds the refused constructor's frame, and with it the DDP
    model, which must be collected before the process group is destroyed (kept until the interpreter's
    exit, it aborted the rank now and then: "terminate called without an active exception")."""
    t0 = time.monotonic()
    try:
        build()
    except D.CollectiveError as exc:
        # the construction's own time: the test's claim is that it did not wait for the timeout, which
        # the job's wall clock cannot tell on a loaded machine (two interpreters importing torch took 20 s)
        (out / f"rank{rank}.refused_s").write_text(repr(time.monotonic() - t0))
        (out / f"rank{rank}.refused").write_text(str(exc))
        return True
    return False


def worker_lossfn(out: Path):
    """Rank 1 measures with a class-weighted loss: the ranks would decide trust checks differently and wait
    in different collectives until the timeout; the loss is agreed at construction (on a fixed probe)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist = _init_group()
    rank = dist.get_rank()
    X, y = make_data()
    ddp = DDP(make_model())
    weights = torch.ones(int(y.max()) + 1, dtype=torch.float64)  # the model is float64
    weights[0] = 1.0 if rank == 0 else 3.0
    loss = (lambda z, t: torch.nn.functional.cross_entropy(z, t, weight=weights, reduction="none"))
    if _refused(out, rank, lambda: D.DistributedCrestLoader(ddp, TensorDataset(X, y), config=make_config(),
                                                            budget=BUDGET, epochs=EPOCHS, seed=SEED, loss_fn=loss)):
        del ddp
        _teardown(dist)
        return
    (out / f"rank{rank}.done").write_text("built")  # must never happen


def worker_lastlayer(out: Path):
    """The ranks name different layers for the embeddings (review 125: with equal input widths every selection
    mixed two layers' features, silently; with unequal ones gloo aborted a rank): refused at construction."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist = _init_group()
    rank = dist.get_rank()
    X, y = make_data()
    ddp = DDP(make_model())
    if _refused(out, rank, lambda: D.DistributedCrestLoader(
            ddp, TensorDataset(X, y), config=make_config(), budget=BUDGET, epochs=EPOCHS,
            seed=SEED, last_layer="2" if rank == 0 else "0")):
        del ddp
        _teardown(dist)
        return
    (out / f"rank{rank}.done").write_text("built")  # must never happen


def _config_refusal(out: Path, config_of) -> None:
    """Each rank builds the loader with ``config_of(rank, make_config())``: refused at construction on every rank
    (the configs differ), the rank's message written for the test."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist = _init_group()
    rank = dist.get_rank()
    X, y = make_data()
    ddp = DDP(make_model())
    cfg = config_of(rank, make_config())
    if _refused(out, rank, lambda: D.DistributedCrestLoader(ddp, TensorDataset(X, y), config=cfg, budget=BUDGET,
                                                            epochs=EPOCHS, seed=SEED)):
        del ddp
        _teardown(dist)
        return
    (out / f"rank{rank}.done").write_text("built")  # must never happen


def worker_config(out: Path):
    """The ranks' configs differ in one nested field (review 161: the error said "the config", not which of
    its some forty fields): refused at construction, naming it."""
    import dataclasses

    _config_refusal(out, lambda rank, cfg: dataclasses.replace(
        cfg, drop=dataclasses.replace(cfg.drop, alpha=0.3 if rank == 0 else 0.25)))


def worker_configclass(out: Path):
    """Rank 1's config is a subclass with a field of its own (review 167: the ranks gathered rows of different
    lengths, and gloo killed a rank): refused at construction, naming the config's class and fields."""
    import dataclasses

    from crestcore import CrestConfig

    def config_of(rank, cfg):
        if rank == 0:
            return cfg
        extra = dataclasses.make_dataclass("Extra", [("extra", int, 0)], bases=(CrestConfig,),
                                           frozen=CrestConfig.__dataclass_params__.frozen)
        return extra(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})

    _config_refusal(out, config_of)


def worker_shards(out: Path):
    """Each rank gives the loader its own shard of the data (a DistributedSampler habit), of unequal sizes:
    refused at construction on every rank, naming the dataset size and each rank's value (review 105: the
    message named the loader's arguments as a whole)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist = _init_group()
    rank = dist.get_rank()
    X, y = make_data()
    part = slice(0, X.shape[0] // 2 + 1) if rank == 0 else slice(X.shape[0] // 2 + 1, None)
    ddp = DDP(make_model())
    if _refused(out, rank, lambda: D.DistributedCrestLoader(ddp, TensorDataset(X[part], y[part]), config=make_config(),
                                                            budget=BUDGET, epochs=EPOCHS, seed=SEED)):
        del ddp
        _teardown(dist)
        return
    (out / f"rank{rank}.done").write_text("built")  # must never happen


def worker_stall(out: Path):
    """Rank 1 stays alive but stops iterating after step 3 (stuck); rank 0's next collective must time
    out with the adapter's error naming the rank, the step and the collective."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    # the set-up (rendezvous, DDP's parameter check) under the usual timeout, which a busy machine needs;
    # the loader's collectives on a group with the short timeout under test
    dist = _init_group(timeout=PG_TIMEOUT_S)
    short = dist.new_group(timeout=timedelta(seconds=float(os.environ["CREST_TEST_PG_TIMEOUT"])))
    rank = dist.get_rank()
    X, y = make_data()
    model = make_model()
    ddp = DDP(model)
    loader = D.DistributedCrestLoader(ddp, TensorDataset(X, y), config=make_config(), budget=BUDGET,
                                      epochs=EPOCHS, seed=SEED, group=short)
    opt = make_opt(ddp)
    for k, (x, y_, w) in enumerate(loader):
        weighted_step(ddp, opt, x, y_, w)
        if rank == 1 and k == 3:
            time.sleep(2 * float(os.environ["CREST_TEST_PG_TIMEOUT"]))
            raise RuntimeError("rank 1 gives up after stalling")
    (out / f"rank{rank}.done").write_text("finished")  # must never happen


def numba_problem():
    g = np.random.default_rng(5)
    return g.normal(size=(240, 6)), np.arange(240) % 3


def worker_numba(out: Path):
    """Both ranks compile the Numba kernels at once from one cold cache directory (NUMBA_CACHE_DIR, shared
    as on a user's machine), with the Numba threading layer running next to gloo's threads, then tear down
    in the documented order. The adapter must give each rank its own cache slot; nothing may abort."""
    import numba

    from crestcore import draw_subsets
    from crestcore.adapters.torch import TorchModelOps

    dist = _init_group()
    rank = dist.get_rank()
    X, y = make_data()
    ops = D.DistributedModelOps(TorchModelOps(make_model(), TensorDataset(X, y)))
    feats, lab = numba_problem()
    subs = draw_subsets(lab, np.arange(lab.size), 120, 2, np.random.default_rng(0))
    # NumPy features: not sharded, every rank solves all problems with the Numba kernels
    cs = ops.coresets(feats, lab, m=12, r=120, P=2, rng=np.random.default_rng(0), subsets=subs)
    mine = torch.as_tensor(np.asarray(cs.indices, dtype=np.int64))
    both = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(both, mine)
    result = {"rank": rank, "slot": str(ops.numba_cache), "indices": np.asarray(cs.indices),
              "agree": all(torch.equal(b, both[0]) for b in both), "threading_layer": numba.threading_layer(),
              "numba_threads": numba.get_num_threads()}
    with open(out / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(result, f)
    del ops, cs
    _teardown(dist)


def _skipping_run(loader, model, opt, *, ddp_arithmetic: bool) -> dict:
    """A loop that trains every other batch only (the steps between leave the parameters as they were, as
    under gradient accumulation): each trust check after an untrained batch is at the last check's
    parameters. ``ddp_arithmetic``: a one-process loader's steps take :func:`ddp_step`'s arithmetic."""
    idx, i = [], 0
    for epoch in range(loader.epochs):
        loader.set_epoch(epoch)
        for x, y, w in loader:
            i += 1
            if i % 2:
                if ddp_arithmetic:
                    ddp_step(model, opt, x, y, w, loader.last_indices)
                else:
                    weighted_step(model, opt, x, y, w)
            idx.append(loader.last_indices)
    return {"idx": idx, "counters": loader.stats["counters"], "budget": loader.stats["budget"]}


def skipping_config():
    return CrestConfig(m=M, r=60, check_size=30)


def worker_skipping(out: Path):
    dist, rank, ddp, loader = _ddp_job(skipping_config(), budget_counts="passes")
    result = _skipping_run(loader, ddp, make_opt(ddp), ddp_arithmetic=False)
    with open(out / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(result, f)
    del loader, ddp
    _teardown(dist)


def _worker_main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, choices=("train", "fail", "stall", "numba", "flags", "lossfn",
                                                              "shards", "skipping", "badload", "lastlayer", "config",
                                                              "configclass"))
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    {"train": worker_train, "fail": worker_fail, "stall": worker_stall,
     "numba": worker_numba, "flags": worker_flags, "lossfn": worker_lossfn, "shards": worker_shards,
     "skipping": worker_skipping, "badload": worker_badload, "lastlayer": worker_lastlayer,
     "config": worker_config, "configclass": worker_configclass}[a.worker](Path(a.out))
    # The rank's work is done and its results written: leave without the interpreter's finalization, where
    # torch's process-group threads abort a rank now and then after a clean teardown ("terminate called
    # without an active exception", <no Python frame>: a plain torch DDP script of two ranks does it too,
    # 2 jobs in 20 here; it failed the loss_fn refusal test in a clean-clone CI run on 2026-12-05). A worker
    # that fails raises before this, and exits non-zero as before.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------------------
# launching (test side)
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, world: int = 2, timeout: float = JOB_TIMEOUT_S,
           pg_timeout: float = PG_TIMEOUT_S, env_extra: dict | None = None):
    """Start ``world`` ranks of ``scenario``; return [(returncode, stderr)], killing all after ``timeout``.

    Every job starts from a cold Numba cache: ``NUMBA_CACHE_DIR`` is a new empty directory, shared by the
    job's ranks as two ranks of a user's job on one machine share theirs (a warm cache on a developer's
    machine must not hide a cold-cache failure). Each rank writes its output to files (no pipe can fill
    up and block a rank) and runs with faulthandler on, so an abort prints every thread's Python stack.
    """
    port = _free_port()
    cache = out / "numba-cache"
    cache.mkdir(exist_ok=True)
    procs, logs = [], []
    for rank in range(world):
        env = dict(os.environ, CREST_TEST_PG_TIMEOUT=str(pg_timeout),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                   OMP_WAIT_POLICY="PASSIVE", NUMBA_CACHE_DIR=str(cache), PYTHONFAULTHANDLER="1")
        env.update(env_extra or {})
        if Path("/sys/class/net/lo").exists():
            env["GLOO_SOCKET_IFNAME"] = "lo"
        log = open(out / f"rank{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE), "--worker", scenario, "--out", str(out)],
            env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
        ))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        pytest.fail(f"the {scenario!r} job did not finish within {timeout} s (a rank hangs):\n"
                    + _report(procs, logs))
    results = []
    for p, log in zip(procs, logs):
        log.seek(0)
        results.append((p.returncode, log.read()))
        log.close()
    return results


def _report(procs, logs) -> str:
    parts = []
    for rank, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        parts.append(f"--- rank {rank} (exit {p.returncode}):\n{log.read()[-3000:]}")
    return "\n".join(parts)


def assert_all_ranks_ok(results):
    bad = [rank for rank, (code, _) in enumerate(results) if code != 0]
    assert not bad, "\n".join(f"rank {rank} exited with {code}:\n{err[-4000:]}"
                               for rank, (code, err) in enumerate(results))


def _train_job(out: Path, env_extra: dict | None = None) -> list:
    assert_all_ranks_ok(launch("train", out, env_extra=env_extra))
    ranks = []
    for rank in range(2):
        with open(out / f"rank{rank}.pkl", "rb") as f:
            ranks.append(pickle.load(f))
    return ranks


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return _train_job(tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def job_jit(tmp_path_factory):
    """The training job with ``coresets="just-in-time"`` and ``check_size``."""
    return _train_job(tmp_path_factory.mktemp("ddp-jit"), {"CREST_TEST_JIT": "1"})


def _single_run(jit: bool) -> dict:
    """The training job's run in one process with the single-process CrestLoader, each training step in
    the two-rank job's arithmetic (:func:`ddp_step`): the job's ranks and this run then train on the same
    parameters, and every difference left is CREST's (sharded forwards, gradients and solves)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        X, y = make_data()
        model = make_model()
        loader = CrestLoader(model, TensorDataset(X, y), config=make_config(jit=jit), budget=BUDGET,
                             epochs=EPOCHS, seed=SEED)
        records: list = []
        train(loader, model, make_opt(model), records, world=2)
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
        return {"records": records, "stats": loader.stats, "params": params}
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single():
    return _single_run(jit=False)


# ------------------------------------------------------------------------------------------------
# pure helpers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,world", [(0, 1), (10, 3), (7, 7), (3, 5), (128, 8)])
def test_shard_bounds_partition(k, world):
    b = D.shard_bounds(k, world)
    assert b[0] == 0 and b[-1] == k and b.size == world + 1
    sizes = np.diff(b)
    assert sizes.min() >= 0 and sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("m,world", [(15, 2), (16, 4), (10, 3), (5, 5)])
def test_batch_share_partitions_without_loss_or_duplication(m, world):
    idx = np.arange(100, 100 + m) * 3
    w = np.linspace(0.2, 1.8, m)
    parts = [D.batch_share(idx, w, r, world) for r in range(world)]
    got = np.concatenate([p[0] for p in parts])
    assert np.array_equal(np.sort(got), np.sort(idx)) and np.unique(got).size == m
    for r, (li, lw) in enumerate(parts):
        assert li.dtype == idx.dtype
        assert np.array_equal(li, idx[r::world])
        scale = world * li.size / m
        np.testing.assert_array_equal(lw, w[r::world] * scale)
        if m % world == 0:
            np.testing.assert_array_equal(lw, w[r::world])  # exactly unchanged


def test_batch_share_refuses_an_empty_share():
    with pytest.raises(ValueError, match="m >= world size"):
        D.batch_share(np.arange(3), np.ones(3), 0, 4)
    with pytest.raises(ValueError, match="rank"):
        D.batch_share(np.arange(8), np.ones(8), 4, 4)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_rescaled_shares_average_to_the_single_process_gradient(world):
    """DDP averages the ranks' gradients; with the rescaled weights that is the weighted-mean gradient."""
    X, y = make_data()
    model = make_model()
    idx = np.arange(0, 3 * M, 3)
    w = np.linspace(0.3, 2.0, M)

    def grad(ii, ww):
        model.zero_grad()
        losses = F.cross_entropy(model(X[ii]), y[ii], reduction="none")
        (torch.as_tensor(ww) * losses).mean().backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()

    single = grad(idx, w)
    avg = sum(grad(*D.batch_share(idx, w, r, world)) for r in range(world)) / world
    torch.testing.assert_close(avg, single, rtol=1e-12, atol=1e-14)


def test_needs_a_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    X, y = make_data()
    with pytest.raises(RuntimeError, match="init_process_group"):
        D.DistributedCrestLoader(make_model(), TensorDataset(X, y), config=make_config())


def test_one_process_group_matches_the_single_process_loader(tmp_path):
    """World size 1: the distributed loader yields exactly the single-process batches."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))
    try:
        X, y = make_data()
        runs = []
        for cls in (CrestLoader, D.DistributedCrestLoader):
            model = make_model()
            loader = cls(model, TensorDataset(X, y), config=make_config(), budget=BUDGET, epochs=1, seed=SEED)
            recs: list = []
            train(loader, model, make_opt(model), recs)
            runs.append(recs)
        assert len(runs[0]) == len(runs[1]) > 0
        for a, b in zip(*runs):
            assert np.array_equal(a["idx"], b["idx"]) and np.array_equal(a["w"], b["w"])
            assert np.array_equal(b["local_idx"], b["idx"])
        assert loader.stats["distributed"]["world_size"] == 1
        # a load that stands says what CrestLoader's says (held until the ranks agree on it)
        resumed = D.DistributedCrestLoader(model, TensorDataset(X, y), config=make_config(), budget=BUDGET, epochs=1,
                                           seed=SEED)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            resumed.load_state_dict(dict(loader.state_dict(), epochs=3))
        assert len(said) == 1 and "planned for 3 epochs, this loader plans 1" in str(said[0].message)
        assert said[0].filename == __file__  # at the caller's line, as it was said
        # a check's token is the ranks' together (a collective): a TensorDataset's rows give one, the same
        # while nothing changes
        token = loader.ops.state_token(np.arange(8))
        assert token is not None and token == loader.ops.state_token(np.arange(8))
        # one process shards nothing (the stat said it did); the rule is selection_sharded's
        assert loader.stats["distributed"]["selection_sharded"] is False
        cfg = make_config(jit=False)  # at-anchor: P subsets a call
        assert D.selection_sharded(cfg, 2, True) and not D.selection_sharded(cfg, 1, True)
        assert not D.selection_sharded(make_config(jit=True), 2, True)  # one subset a call: solved whole
        assert D.selection_sharded(replace(make_config(jit=True), fit_batches=2), 2, True)
        assert not D.selection_sharded(replace(cfg, optimizer="stochastic"), 2, True)
        # the model on a device: "numba" hands every rank host features, which each solves whole (the stat
        # said they were sharded); "device", and "auto" with more than one process (review 58: the ranks
        # would share the host's cores), keep them on the device, sharded
        assert loader.ops.host_selection  # one process: "auto" takes the host's kernels, as a single process
        loader.ops.world_size = 2
        assert not loader.ops.host_selection
        loader.ops.world_size = 1
        for backend, sharded in (("numba", False), ("auto", True), ("device", True)):
            model = make_model()
            other = D.DistributedCrestLoader(model, TensorDataset(X, y), budget=BUDGET, epochs=1, seed=SEED,
                                             config=replace(cfg, backend=backend))
            other.world_size = 2  # the stat as a two-rank job's (the rule reads the world size)
            assert other.stats["distributed"]["selection_sharded"]  # a CPU model: its CPU tensors are sharded
            model.to("meta")  # a stand-in for a GPU: parameters off the host
            assert other.stats["distributed"]["selection_sharded"] is sharded
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(before)


def test_the_controller_selects_through_the_adapters_coresets():
    """The controller calls an adapter's optional ``coresets`` operation (how the solve is sharded)."""
    import crestcore
    from crestcore.adapters.distributed import DistributedModelOps

    assert callable(getattr(DistributedModelOps, "coresets", None))
    calls = []
    n, C, D = 60, 3, 4
    gen = np.random.default_rng(0)
    X = gen.normal(size=(n, D))
    y = np.arange(n) % C

    class Ops:
        W = np.zeros((D, C))

        def outputs(self, idx, embeddings=False):
            return X[idx] @ self.W + gen.normal(scale=1e-3, size=(len(idx), C))

        def params(self):
            return self.W.ravel().copy()

        def gradient(self, idx, w):
            return 0.0, np.zeros(D * C)

        def hutchinson(self, idx, w, seed):
            return np.zeros(D * C)

        def coresets(self, *args, **kwargs):
            calls.append(kwargs["P"])
            return crestcore.minibatch_coresets(*args, **kwargs)

    cfg = crestcore.CrestConfig(m=6, r=30, coresets="at-anchor")  # all P coresets in one solve
    state = crestcore.crest_init(cfg, y, seed=0)
    state, batch = crestcore.crest_next_batch(state, Ops(), cfg)
    assert calls == [cfg.P] and batch.indices.shape == (6,)
    calls.clear()  # the default, just in time: the first coreset now, each later one at its step
    cfg = crestcore.CrestConfig(m=6, r=30)
    state = crestcore.crest_init(cfg, y, seed=0)
    for _ in range(3):
        state, batch = crestcore.crest_next_batch(state, Ops(), cfg)
    assert calls[0] == 1 and sum(calls) == state.made and batch.indices.shape == (6,)


# ------------------------------------------------------------------------------------------------
# two processes
# ------------------------------------------------------------------------------------------------
def test_sharded_operations_equal_the_unsharded_ones(job):
    for res in job:
        failed = [k for k, ok in res["checks"].items() if not ok]
        assert not failed, f"rank {res['rank']}: {failed}"
    for k in (1, 7, 40):  # all-reduced vectors are bit-identical across ranks
        assert np.array_equal(job[0][f"grad k={k}"], job[1][f"grad k={k}"])


def test_ranks_agree_on_every_coreset_and_decision(job):
    r0, r1 = job
    assert len(r0["records"]) == len(r1["records"]) == EPOCHS * round(BUDGET * -(-N // M))
    for a, b in zip(r0["records"], r1["records"]):
        assert a["pos"] == b["pos"]
        for key in ("idx", "w", "batch_idx", "batch_w"):
            assert np.array_equal(a[key], b[key]), (key, a["pos"])
        assert a["selections"] == b["selections"] and a["checks"] == b["checks"] and a["pool"] == b["pool"]
    s0, s1 = r0["stats"], r1["stats"]
    assert s0["selections"] == s1["selections"] and s0["checks"] == s1["checks"] and s0["drops"] == s1["drops"]
    assert len(s0["selections"]) >= 3, "the run should reselect a few times (tau is small)"
    # every selection's solve of two or more problem rows was sharded, plus the operations check's direct
    # call with P = 5 (its P = 1 call, like any solve of one row, is solved whole on every rank)
    rows, prev = [], 0
    for rec in r0["records"]:
        if rec["selections"] != prev:
            rows.append(np.asarray(rec["batch_idx"]).shape[0])
            prev = rec["selections"]
    assert len(rows) == len(s0["selections"])
    assert s0["distributed"]["sharded_solves"] == sum(p >= 2 for p in rows) + 1
    assert s0["distributed"]["selection_sharded"]
    np.testing.assert_array_equal(r0["params"], r1["params"])  # DDP keeps the replicas identical


def test_union_of_rank_batches_is_the_single_process_batch(job, single):
    r0, r1 = job
    ref = single["records"]
    assert len(ref) == len(r0["records"])
    for a, b, s in zip(r0["records"], r1["records"], ref):
        union = np.concatenate([a["local_idx"], b["local_idx"]])
        assert np.unique(union).size == union.size == M, "an index is duplicated or lost"
        assert np.array_equal(np.sort(union), np.sort(s["idx"]))
        assert np.array_equal(a["idx"], s["idx"]) and np.allclose(a["w"], s["w"], rtol=1e-12, atol=0)
        assert a["local_idx"].dtype == np.int64 and a["idx"].dtype == np.int64
        # the rescaled local weights: world * k / m times the global ones
        for r, loc in enumerate((a, b)):
            np.testing.assert_allclose(loc["local_w"], s["w"][r::2] * (2 * loc["local_idx"].size / M), rtol=1e-12)
        assert a["selections"] == s["selections"] and a["checks"] == s["checks"] and a["pool"] == s["pool"]
    st, ss = r0["stats"], single["stats"]
    assert st["selections"] == ss["selections"] and st["drops"] == ss["drops"]
    assert [c["step"] for c in st["checks"]] == [c["step"] for c in ss["checks"]]
    np.testing.assert_allclose(st["rho"], ss["rho"], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(r0["params"], single["params"], rtol=1e-9, atol=1e-12)


def test_checks_at_unchanged_parameters_are_answered_alike_on_two_ranks_and_in_one_process(tmp_path):
    """Review 49: with steps that leave the parameters as they were (here every other batch is not
    trained, as under gradient accumulation), one process answers a trust check at the last check's
    parameters from that check (no forward, none counted), while every rank measured every check: the
    counters differed and, under ``budget_counts="passes"``, so did the run's length (10 steps on two ranks,
    11 in one process, in the reviewer's run). The ranks now decide the reuse together: the same batches,
    step for step, and the same counters as one process."""
    assert_all_ranks_ok(launch("skipping", tmp_path))
    ranks = []
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            ranks.append(pickle.load(f))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        X, y = make_data()
        runs = {}
        for reuse in (True, False):
            model = make_model()
            loader = CrestLoader(model, TensorDataset(X, y), config=skipping_config(), budget=BUDGET, epochs=EPOCHS,
                                 seed=SEED, budget_counts="passes", reuse_checks=reuse)
            runs[reuse] = _skipping_run(loader, model, make_opt(model), ddp_arithmetic=True)
    finally:
        torch.set_num_threads(before)
    one = runs[True]
    # the scenario reuses checks in one process: without the reuse the counted forwards are more
    assert runs[False]["counters"]["forward_examples"] > one["counters"]["forward_examples"]
    for res in ranks:
        assert len(res["idx"]) == len(one["idx"]) > 0
        assert all(np.array_equal(a, b) for a, b in zip(res["idx"], one["idx"]))
        assert res["counters"] == one["counters"]
        assert res["budget"]["fraction_all_passes"] == one["budget"]["fraction_all_passes"]


def test_training_loss_decreases(job):
    for res in job:
        assert res["loss_after"] < 0.8 * res["loss_before"], (res["loss_before"], res["loss_after"])


def test_resume_per_rank_continues_the_same_schedule(job):
    for res in job:
        tail = [r for r in res["records"] if r["pos"] > RESUME_AT]
        assert len(tail) == len(res["resumed"]) > 0
        for a, b in zip(tail, res["resumed"]):
            assert a["pos"] == b["pos"]
            for key in ("idx", "w", "local_idx", "local_w"):
                assert np.array_equal(a[key], b[key]), (key, a["pos"])
        np.testing.assert_array_equal(res["params"], res["params_resumed"])


@pytest.mark.slow
def test_ranks_compiling_numba_from_one_cold_cache_get_their_own_cache_slots(tmp_path):
    """Regression (issue 10): a DDP job's ranks on one machine share one cold Numba cache; compiling into
    it at once races on Numba's index files. Each rank must compile into its own slot, agree, and exit 0.
    Slow (`make test-slow`): two ranks compile every kernel from an empty cache, 60-80 s on this machine,
    the default suite's longest test; the slots' claim and reuse are tested at once below, and the
    every-kernel-module test compiles into a rank's slot."""
    pytest.importorskip("numba")
    from crestcore import minibatch_coresets
    from crestcore.backends import numba as kernels  # noqa: F401  (the kernels under test import)

    # A cold compile of the kernels takes a minute or more per rank on a busy 2-core machine, and one rank
    # may finish it long before the other waits for it in the all_gather: generous bounds for this job.
    results = launch("numba", tmp_path, timeout=480, pg_timeout=420, env_extra={"NUMBA_NUM_THREADS": "2"})
    assert_all_ranks_ok(results)
    ranks = []
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            ranks.append(pickle.load(f))
    cache = tmp_path / "numba-cache"
    slots = [Path(r["slot"]) for r in ranks]
    assert slots[0] != slots[1], "two ranks were given one Numba cache directory"
    for slot in slots:
        assert slot.parent == cache / "crestcore-slots", slot
        assert list(slot.rglob("*.nbi")) and list(slot.rglob("*.nbc")), f"nothing was compiled into {slot}"
    outside = [p for p in cache.rglob("*.nb[ic]") if "crestcore-slots" not in p.parts]
    assert not outside, f"kernels were cached outside the ranks' slots: {outside[:3]}"
    assert all(r["agree"] for r in ranks)
    assert ranks[0]["numba_threads"] == 2 and ranks[0]["threading_layer"] in ("omp", "tbb", "workqueue")
    feats, lab = numba_problem()
    from crestcore import draw_subsets

    subs = draw_subsets(lab, np.arange(lab.size), 120, 2, np.random.default_rng(0))
    ref = minibatch_coresets(torch.as_tensor(feats), torch.as_tensor(lab), m=12, r=120, P=2,
                             rng=np.random.default_rng(0), subsets=subs)  # the torch kernels
    np.testing.assert_array_equal(ranks[0]["indices"], ref.indices.numpy())


def test_numba_cache_slots_are_exclusive_and_reused(tmp_path):
    pytest.importorskip("fcntl")
    a, fa = D._claim(tmp_path)
    b, fb = D._claim(tmp_path)  # a second lock, even from this process, takes the next slot
    assert (a.name, b.name) == ("slot0", "slot1")
    fa.close()  # released (as at a process's exit): the next claim reuses the warm slot
    c, fc = D._claim(tmp_path)
    assert c.name == "slot0"
    fb.close()
    fc.close()


def test_no_writable_numba_cache_directory_fails_naming_the_fix(tmp_path, monkeypatch):
    pytest.importorskip("numba")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(D, "_SLOT", {})
    monkeypatch.setattr(D.tempfile, "gettempdir", lambda: str(blocker))
    with pytest.raises(RuntimeError, match="set NUMBA_CACHE_DIR to a writable directory"):
        D.numba_cache_slot(base=blocker / "cache")


def test_a_failing_rank_fails_the_job_instead_of_hanging(tmp_path):
    t0 = time.monotonic()
    results = launch("fail", tmp_path, timeout=PG_TIMEOUT_S + 60)
    elapsed = time.monotonic() - t0
    (c0, e0), (c1, e1) = results
    assert c1 != 0 and "injected failure on rank 1" in e1
    assert c0 != 0, "rank 0 finished although rank 1 died"
    assert not list(tmp_path.glob("*.done"))
    assert elapsed < PG_TIMEOUT_S + 60
    # rank 0 stops in a collective: ours (which names the rank and step) or DDP's gradient all-reduce
    assert ("CREST distributed: rank 0 of 2" in e0) or ("gloo" in e0.lower()) or ("timed out" in e0.lower()), e0[-3000:]


@pytest.mark.parametrize("worker, what", [("flags", "verify and broadcast_buffers"), ("lossfn", "loss_fn"),
                                          ("lastlayer", "last_layer"), ("config", "config.drop.alpha: rank"),
                                          ("configclass", "the config's class and fields: rank"),
                                          ("shards", "the dataset size (241 on ranks [0], 239 on ranks [1])")])
def test_ranks_built_differently_are_refused_at_construction(tmp_path, worker, what):
    """Settings that decide which collectives a rank issues (the verify flags) or what it decides (its
    loss_fn): every rank raises CollectiveError at construction instead of waiting until the timeout."""
    results = launch(worker, tmp_path, timeout=PG_TIMEOUT_S + 60)
    assert_all_ranks_ok(results)
    assert not list(tmp_path.glob("*.done"))
    for rank in range(2):
        msg = (tmp_path / f"rank{rank}.refused").read_text()
        assert f"disagree on {what}" in msg, msg
        # refused inside the constructor, well before the process group's timeout would have fired
        assert float((tmp_path / f"rank{rank}.refused_s").read_text()) < PG_TIMEOUT_S / 2


def test_a_checkpoint_refused_on_one_rank_fails_every_rank_cleanly(tmp_path):
    """load_state_dict is collective also when a rank refuses the checkpoint: every rank raises
    CollectiveError (the refusing rank names its reason), every loader stays as it was, and the run can go
    on; refused on every rank, each raises its own ValueError."""
    results = launch("badload", tmp_path, timeout=PG_TIMEOUT_S + 60)
    assert_all_ranks_ok(results)
    for rank in range(2):
        msg = (tmp_path / f"rank{rank}.refused").read_text()
        assert "disagree on whether the checkpoint loaded" in msg, msg
        assert ("position must be" in msg) == (rank == 1), msg
        own = (tmp_path / f"rank{rank}.own").read_text()
        assert own.startswith("ValueError: DistributedCrestLoader state dict: position"), own
        assert (tmp_path / f"rank{rank}.done").read_text() == "6"
        assert "planned for" not in (tmp_path / f"rank{rank}.said").read_text()  # the load that did not stand


def test_a_stuck_rank_times_out_with_a_clear_error(tmp_path):
    # long enough that the steps before the stall finish on a loaded machine (4 s timed out at step 0
    # under a load of 6: one rank reached the first collective late), short enough to keep the test quick
    pg_timeout = 12.0
    # the job's bound leaves room for two interpreters importing torch on a loaded machine (60 s was
    # exceeded under a load of 8 in a CI run); a rank that hung would never end, whatever the bound
    results = launch("stall", tmp_path, timeout=JOB_TIMEOUT_S, pg_timeout=pg_timeout)
    (c0, e0), (c1, e1) = results
    assert c0 != 0 and c1 != 0
    assert not list(tmp_path.glob("*.done"))
    assert "CREST distributed: rank 0 of 2 (gloo)" in e0 and "at step 4" in e0, e0[-3000:]
    assert "init_process_group(timeout=...)" in e0



def test_just_in_time_coresets_under_ddp_are_the_single_process_ones(job_jit):
    """coresets="just-in-time": every rank forwards and solves coreset p at step p in lockstep; the ranks
    agree, and their batches together are the single-process loader's."""
    r0, r1 = job_jit
    records = _single_run(jit=True)["records"]
    assert len(r0["records"]) == len(r1["records"]) == len(records)
    for a, b, one in zip(r0["records"], r1["records"], records):
        for key in ("idx", "w", "batch_idx", "batch_w"):
            assert np.array_equal(a[key], b[key]), (key, a["pos"])
        assert np.array_equal(a["idx"], one["idx"]) and np.array_equal(a["w"], one["w"])
        assert sorted(np.concatenate([a["local_idx"], b["local_idx"]]).tolist()) == sorted(one["idx"].tolist())
    # a just-in-time solve holds one subset, which every rank solves whole: only the operations check's
    # direct call with P = 5 was sharded
    assert r0["stats"]["distributed"]["sharded_solves"] == 1
    np.testing.assert_array_equal(r0["params"], r1["params"])


def test_batches_larger_than_m_are_split_and_rescaled_by_their_own_size(tmp_path, monkeypatch):
    """Review 125: no two-rank job had a batch of another size than m (scaling the shares by m instead of the
    batch's size would have passed). With class_budget="ceil" and m = 14 every batch holds 15 examples: the
    ranks' shares of 8 and 7 carry the coreset weights times 2 * 8 / 15 and 2 * 7 / 15, and the job trains
    the single-process run's batches to the same parameters."""
    r0, r1 = _train_job(tmp_path, {"CREST_TEST_CEIL": "1"})
    monkeypatch.setenv("CREST_TEST_CEIL", "1")
    one = _single_run(jit=False)
    assert len(r0["records"]) == len(one["records"]) > 0
    sizes = set()
    for a, b, s in zip(r0["records"], r1["records"], one["records"]):
        assert np.array_equal(a["idx"], s["idx"]) and np.array_equal(a["w"], s["w"])
        k = s["idx"].size
        sizes.add(k)
        for rank, rec in enumerate((a, b)):
            share = np.arange(rank, k, 2)
            np.testing.assert_allclose(rec["local_w"], s["w"][share] * 2 * share.size / k, rtol=1e-15)
    assert sizes == {15}
    np.testing.assert_allclose(r0["params"], one["params"], rtol=1e-9, atol=1e-12)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])



_SLOT_CHECK = r"""
import os, sys
os.environ["NUMBA_CACHE_DIR"] = sys.argv[1]
if sys.argv[2] == "imported-first":
    import crestcore.backends.numba, crestcore.backends.numba_sparse  # noqa: F401
from crestcore.adapters import distributed as D
slot = str(D.numba_cache_slot())
import importlib
outside = []
for name in D._KERNELS:
    mod = importlib.import_module(name)
    for obj in vars(mod).values():
        cache = getattr(obj, "_cache", None)
        if cache is not None and type(cache).__name__ != "NullCache" and not str(cache._cache_path).startswith(slot):
            outside.append(f"{name}.{getattr(obj, '__name__', '?')}")
print("OUTSIDE", outside)
"""


@pytest.mark.parametrize("order", ["imported-first", "slot-first"])
def test_every_cached_kernel_module_compiles_into_the_ranks_slot(tmp_path, order):
    """The sparse kernels (crestcore.backends.numba_sparse: neighbors=, optimizer="auto") compiled into the
    shared cache while the dense ones went to the rank's slot: every module with cached kernels is
    re-pointed, whether imported before the slot is claimed or after."""
    pytest.importorskip("numba")
    # the installed crestcore (cwd elsewhere: the source tree must not shadow a wheel under test)
    out = subprocess.run([sys.executable, "-c", _SLOT_CHECK, str(tmp_path / "cache"), order], capture_output=True,
                         text=True, timeout=300, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OUTSIDE []" in out.stdout, out.stdout
    # and the list is complete: every backend module that caches kernels is in it
    import crestcore.backends

    folder = Path(crestcore.backends.__file__).parent
    cached = {f"crestcore.backends.{p.stem}" for p in folder.glob("*.py") if "cache=True" in p.read_text()}
    assert cached <= set(D._KERNELS), sorted(cached - set(D._KERNELS))


def test_a_seed_past_int64_is_agreed_on_like_any_other():
    """CrestLoader takes seeds of 2**63 and more; the distributed loader's agreement on its arguments put the
    seed itself on the wire as an int64 and failed with torch's bare "Overflow when unpacking long long"
    (review 107). Such a value is fingerprinted instead."""
    from crestcore import CrestConfig

    group = D._OneProcess(64)
    try:
        loader = D.DistributedCrestLoader(torch.nn.Linear(4, 2), group.data, config=CrestConfig(m=8), budget=0.5,
                                          seed=2**63 + 5)
        assert loader.seed == 2**63 + 5
        loader.ops.agree({"a big int": 2**64 + 1, "a small one": 3}, "two values")
    finally:
        group.close()


def test_the_loss_probe_stays_small_for_wide_label_spaces():
    """Read-through: the loss_fn fingerprint built (max(4, C), C) logits with C the largest label + 1, so a
    label id of 10**11 asked for 10**22 of them and a 50,000-class label space for 2.5e9 (10 GB). At most 64
    rows and 65,536 columns now; a label id that wide then fails where the labels meet the model's outputs."""
    from torch.utils.data import TensorDataset

    from crestcore import CrestConfig

    group = D._OneProcess(8)
    try:
        y = torch.tensor([0, 1, 10**11] * 20)
        ce = torch.nn.CrossEntropyLoss(reduction="none")
        loader = D.DistributedCrestLoader(torch.nn.Linear(3, 3), TensorDataset(torch.randn(60, 3), y),
                                          config=CrestConfig(m=6, T2=5), budget=0.5, loss_fn=ce)
        probe = loader._loss_probe()
        assert isinstance(probe, str) or probe.size <= 64  # one loss per row, or the loss's failure
        with pytest.raises(ValueError, match="labels hold class 100000000000 but the model gives 3 outputs"):
            next(iter(loader))
    finally:
        group.close()


def test_observe_takes_one_loss_per_example_as_crest_loader_does():
    """Review 125: the distributed loader took losses of shape (2, 4) for a share of 8 (any shape of the right
    size), which CrestLoader.observe refuses: a (2, 4) array is not a batch's per-example losses."""
    from crestcore import CrestConfig

    group = D._OneProcess(64)
    try:
        model = torch.nn.Linear(4, 2)
        loader = D.DistributedCrestLoader(model, group.data, config=CrestConfig(m=8, T2=2), budget=0.5, seed=0)
        x, y, w = next(iter(loader))
        losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none").detach()
        with pytest.raises(ValueError, match=r"shape \(2, 4\) for this rank's share of 8 examples"):
            loader.observe(losses.reshape(2, 4))
        loader.observe(losses.reshape(8, 1))  # a column is one loss per example
    finally:
        group.close()


def _once_here():
    warnings.warn("a warning of the user's own, said once at its line", stacklevel=1)


def test_loading_a_checkpoint_leaves_the_processs_warnings_as_they_were():
    """Review 164: load_state_dict held its notices (said once every rank accepts the checkpoint) with
    ``warnings.catch_warnings(record=True)``, whose exit makes every warning already shown once at its line
    show again (a user's, torch's, crestcore's) and whose ``simplefilter("always")`` held for every thread
    meanwhile. The notices are held in a context variable now; they are still said once the load stands."""
    from crestcore import CrestConfig

    group = D._OneProcess(64)
    try:
        model = torch.nn.Linear(4, 2)
        loader = D.DistributedCrestLoader(model, group.data, config=CrestConfig(m=8), budget=0.5, seed=0)
        next(iter(loader))
        saved = loader.state_dict()
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("default")
            _once_here()
            loader.load_state_dict(dict(saved, epochs=loader.epochs + 2))  # a longer run's: said after the load
            _once_here()
        texts = [str(w.message) for w in said]
        assert texts.count("a warning of the user's own, said once at its line") == 1, texts
        assert sum("saved by a run planned for" in t for t in texts) == 1, texts
        notice = next(w for w in said if "saved by a run planned for" in str(w.message))
        assert notice.filename == __file__  # at the user's line
        # review 170: a warnings filter that raises on the notice left the load applied; the loader is as it was
        fresh = D.DistributedCrestLoader(model, group.data, config=CrestConfig(m=8), budget=0.5, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(UserWarning, match="saved by a run planned for"):
                fresh.load_state_dict(dict(saved, epochs=fresh.epochs + 2))
        assert fresh.position == 0 and fresh.state_dict()["position"] == 0
    finally:
        group.close()
