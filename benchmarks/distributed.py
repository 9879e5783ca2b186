"""D1: CREST on one process against CREST on two processes (DDP, gloo), Fashion-MNIST at a 10% budget.

The same recipe as ``crest demo`` (:mod:`crestcore.apps.train_demo`: the small CNN, SGD with momentum and
Nesterov, warm-up + cosine learning rate, CREST's demo options), run

* ``1 process``: the single-process :class:`crestcore.adapters.torch.CrestLoader`, ``--threads`` torch
  threads;
* ``N processes``: ``torchrun --standalone --nproc-per-node N`` (gloo on CPU, NCCL with ``--device cuda``),
  the model wrapped in ``DistributedDataParallel`` and
  :class:`crestcore.adapters.distributed.DistributedCrestLoader`; each rank gets
  ``--threads-per-rank`` threads (default ``threads / N``, so both runs use the same cores).

Both train the same number of global steps on global mini-batches of ``m`` (each rank ``m / N``).
Reported per run: wall clock of the training loop (every selection, check, quadratic fit and training
step; evaluations excluded) and the part of it spent inside the loader (CREST's selection, checks and
batch loading), final test accuracy, and how many of the global batches were the same as the
single-process run's (float32 rounding differs between one process and an all-reduce over two, and the
schedule may part ways after a near-tie; that is expected, the accuracy is what matters).

Run: ``python benchmarks/distributed.py --epochs 5 --out docs/distributed.md`` (``--out`` rewrites only the
block between ``<!-- distributed-bench:start -->`` and ``<!-- distributed-bench:end -->``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START, END = "<!-- distributed-bench:start -->", "<!-- distributed-bench:end -->"
HERE = Path(__file__).resolve()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=5, help="epochs of the full-data run the budget is a share of")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--batch", dest="m", type=int, default=128, help="global mini-batch size m")
    p.add_argument("--nproc", type=int, default=2, help="processes of the distributed run")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the 1-process run")
    p.add_argument("--threads-per-rank", type=int, default=None, help="default: max(1, threads // nproc)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL; one GPU per rank)")
    p.add_argument("--limit-train", type=int, default=None, help="N random training images (smoke tests)")
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--root", default=None, help="Fashion-MNIST folder")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")
    p.add_argument("--out", default=None, help="markdown file whose distributed-bench block is rewritten")
    p.add_argument("--json", default=None, help="write the raw results here")
    a = p.parse_args(argv)
    a.worker = a.result = None
    return a


# --------------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------------
def worker(a) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    from crestcore.adapters.torch import CrestLoader
    from crestcore.apps.train_demo import (
        TrainSettings, build_cnn, crest_config, evaluate, load_data, sgd_optimizer, sgd_step,
    )

    ddp = a.worker == "ddp"
    threads = a.threads if not ddp else (a.threads_per_rank or max(1, a.threads // a.nproc))
    torch.set_num_threads(threads)
    rank, world = 0, 1
    if ddp:
        import torch.distributed as dist

        backend = "nccl" if a.device == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend, timeout=_dt.timedelta(minutes=5))
        rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if a.device == "cuda" else "cpu")

    s = TrainSettings(epochs=a.epochs, budget=a.budget, m=a.m, seed=a.seed, device=str(device), threads=threads)
    x_tr, y_tr, x_te, y_te = load_data(a.root, n_train=a.limit_train, n_test=a.limit_test, seed=a.seed)
    n = int(x_tr.shape[0])
    from crestcore.plan import budget_steps, full_steps

    spe = budget_steps(s.budget, full_steps(n, s.m))
    total = s.epochs * spe
    torch.manual_seed(s.seed)
    model = build_cnn(int(y_tr.max()) + 1).to(device)
    net = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt, sched = sgd_optimizer(net.parameters(), s, total)
    data = TensorDataset(x_tr.to(device), y_tr.to(device))
    kw = dict(config=crest_config(s, steps_per_epoch=spe), budget=s.budget, epochs=s.epochs, seed=s.seed,
              labels=y_tr.numpy(), measure_batch_size=s.measure_batch_size)
    if ddp:
        from crestcore.adapters.distributed import DistributedCrestLoader

        loader = DistributedCrestLoader(net, data, **kw)
    else:
        loader = CrestLoader(model, data, **kw)
    assert loader.total_steps == total

    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    batches = np.zeros((total, s.m), dtype=np.int64)
    in_loader = wall = 0.0
    step = 0
    net.train()
    for epoch in range(s.epochs):
        loader.set_epoch(epoch)
        it = iter(loader)
        while True:
            sync()
            t0 = time.perf_counter()
            try:
                x, y, w = next(it)
            except StopIteration:
                break
            sync()
            t1 = time.perf_counter()
            loss = (w * F.cross_entropy(net(x), y, reduction="none")).mean()
            sgd_step(opt, sched, loss)
            sync()
            t2 = time.perf_counter()
            in_loader += t1 - t0
            wall += t2 - t0
            idx = loader.last_indices
            batches[step, : idx.size] = idx
            step += 1
    acc = evaluate(model, x_te, y_te, device) if rank == 0 else None
    st = loader.stats
    res = {"rank": rank, "world": world, "threads": threads, "acc": acc, "wall": wall, "in_loader": in_loader,
           "steps": step, "selections": len(st["selections"]), "checks": len(st["checks"]),
           "n_train": n, "n_test": int(x_te.shape[0]), "batches": batches.tolist()}
    if ddp:
        import torch.distributed as dist

        res["sharded_solves"] = st["distributed"]["sharded_solves"]
        walls = [None] * world
        dist.all_gather_object(walls, (wall, in_loader))
        res["rank_walls"] = walls
        dist.destroy_process_group()
    if rank == 0:
        Path(a.result).write_text(json.dumps(res))


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------
def _worker_args(a, kind: str, result: Path, tmp: Path, tag: str) -> list[str]:
    """``worker PATH``: the run's options go through a JSON file (torchrun would take abbreviations of its
    own options, e.g. ``--nproc``, in the script's arguments)."""
    path = tmp / f"{tag}-args.json"
    path.write_text(json.dumps({**vars(a), "worker": kind, "result": str(result)}))
    return ["worker", str(path)]


def run(cmd: list[str], timeout: float) -> float:
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def load1() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def _mean_std(xs) -> tuple[float, float]:
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def markdown(runs: dict[str, list[dict]], meta: dict) -> str:
    """runs: name -> one result per seed; the first name (1 process, 1 thread) is the reference of the
    batch comparison, the last the distributed run."""
    names = list(runs)
    ref, multi = runs[names[0]], runs[names[-1]]
    r0, world = ref[0], multi[0]["world"]
    lines = [
        f"Command: `{meta['command']}` ({meta['total_s'] / 60:.1f} min)  ",
        f"Date: {meta['date']}; machine: {meta['machine']}; torch {meta['torch']}; device {meta['device']}; "
        f"load average {meta['load_before']} before, {meta['load_after']} after (the machine is shared with "
        "other jobs: compare ratios, not absolute times).",
        "",
        f"Fashion-MNIST, {r0['n_train']} train / {r0['n_test']} test images, the `crest demo` CNN, "
        f"{meta['epochs']} epochs of full data at a {meta['budget']:g} budget = {r0['steps']} global steps "
        f"of m = {meta['m']} (with {world} ranks each trains on m / {world}), seeds {meta['seeds']}; the runs of "
        "one seed run one after the other. Wall clock = the training loop (every selection, check, quadratic "
        "fit, batch and step; the test evaluation excluded), median over seeds; \"in the loader\" = the part "
        "of it spent inside `next(loader)` (CREST's selections, checks and fits, and batch loading). "
        "Distributed runs: rank 0's clocks (the ranks move in lockstep).",
        "",
        "| run | wall clock s | in the loader s | ms per step | selections | test acc % (mean +- std) "
        "| global batches as 1 process, 1 thread |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        rs = runs[name]
        wall = statistics.median(r["wall"] for r in rs)
        acc, sd = _mean_std(100 * r["acc"] for r in rs)
        same = [sum(x == y for x, y in zip(q["batches"], r["batches"])) for q, r in zip(ref, rs)]
        lines.append(
            f"| {name} | {wall:.1f} | {statistics.median(r['in_loader'] for r in rs):.1f} | "
            f"{1000 * wall / max(1, rs[0]['steps']):.1f} | {'/'.join(str(r['selections']) for r in rs)} | "
            f"{acc:.2f} +- {sd:.2f} | {'/'.join(str(k) for k in same)} of {rs[0]['steps']} |")
    speed = [q["wall"] / r["wall"] for q, r in zip(runs[names[1] if len(names) > 2 else names[0]], multi)]
    speed1 = [q["wall"] / r["wall"] for q, r in zip(ref, multi)]
    lines += [
        "",
        f"Speedup of {world} processes (median over seeds): {statistics.median(speed):.2f}x over one process "
        f"using the same {world * multi[0]['threads']} cores ({names[1] if len(names) > 2 else names[0]}), "
        f"{statistics.median(speed1):.2f}x over {names[0]}. Coreset solves sharded over the ranks: "
        f"{'/'.join(str(r.get('sharded_solves', 0)) for r in multi)} (one per selection). Selections and identical "
        "batches are per seed.",
    ]
    return "\n".join(lines)


def write_block(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else ""
    new = f"{START}\n{block}\n{END}"
    if START in text and END in text:
        a, b = text.index(START), text.index(END) + len(END)
        text = text[:a] + new + text[b:]
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["worker"]:
        worker(argparse.Namespace(**json.loads(Path(argv[1]).read_text())))
        return 0
    a = parse_args(argv)
    import torch

    from crestcore.apps.train_demo import machine_line

    t_start = time.perf_counter()
    load_before = load1()
    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    tpr = a.threads_per_rank or max(1, a.threads // a.nproc)
    plan = [("1 process, 1 thread", "single", 1)]
    if a.threads > 1:
        plan.append((f"1 process, {a.threads} threads", "single", a.threads))
    plan.append((f"{a.nproc} processes (DDP, {'NCCL' if a.device == 'cuda' else 'gloo'}), "
                 f"{tpr} thread{'s' if tpr > 1 else ''} each", "ddp", a.threads))
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in plan}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name, kind, threads in plan:
                print(f"seed {seed}: {name} ...", flush=True)
                tag = f"{kind}-{threads}-{seed}"
                res = Path(tmp) / f"{tag}.json"
                b = argparse.Namespace(**{**vars(a), "threads": threads, "seed": seed})
                args = _worker_args(b, kind, res, Path(tmp), tag)
                if kind == "ddp":
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                           "--nproc-per-node", str(a.nproc), str(HERE), *args]
                else:
                    cmd = [sys.executable, str(HERE), *args]
                run(cmd, a.timeout)
                runs[name].append(json.loads(res.read_text()))
    meta = {
        "command": "python benchmarks/distributed.py " + " ".join(argv),
        "date": _dt.date.today().isoformat(), "machine": machine_line(), "torch": torch.__version__,
        "device": a.device, "backend": "NCCL" if a.device == "cuda" else "gloo", "epochs": a.epochs,
        "budget": a.budget, "m": a.m, "seeds": a.seeds, "load_before": load_before, "load_after": load1(),
        "total_s": time.perf_counter() - t_start,
    }
    block = markdown(runs, meta)
    print(block)
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": runs, "meta": meta}))
    if a.out:
        write_block(Path(a.out), block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
