#!/usr/bin/env python
"""Measurement chunks on the CPU: the time of ``TorchModelOps.outputs`` over 512 examples, forwarded in
chunks of 128, 256 or 512 (``batch_size``, the loaders' ``measure_batch_size``), on four small models.

Each thread count runs in a fresh process. Per model: one ``TorchModelOps`` per chunk size over the same
model and ``TensorDataset`` (random inputs, no measurement cache, so every pass forwards), three SGD steps
on 128 examples before every pass (a training loop allocates between the passes), the chunk sizes
alternating; the median of ``--rounds`` passes (the first two dropped) and the largest relative
difference of the outputs from the 512-chunk outputs (floating-point rounding only).

    .venv/bin/python benchmarks/measure_chunk.py            # 1 and 2 threads
    .venv/bin/python benchmarks/measure_chunk.py --json benchmarks/results/measure-chunk-DATE.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)

CHUNKS = (128, 256, 512)


def _models():
    import torch
    from torch import nn

    from crestcore.apps.train_demo import build_cnn

    def resnet_like():
        def block(c):
            return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), block(32), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), block(64), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(64, 10))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(16, 64)
            layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0)
            self.encoder = nn.TransformerEncoder(layer, 2)
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.encoder(self.embed(x)).mean(1))

    def mlp():
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))

    del torch
    return {"demo CNN, 28x28x1": (build_cnn, (1, 28, 28)), "conv net with BatchNorm, 32x32x3": (resnet_like, (3, 32, 32)),
            "transformer encoder, 32 tokens": (Encoder, (32, 16)), "MLP 784-512-256": (mlp, (784,))}


def child(threads: int, rounds: int) -> list[dict]:
    import numpy as np
    import torch
    from torch.utils.data import TensorDataset

    from crestcore.adapters.torch import TorchModelOps

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    out = []
    for name, (make, shape) in _models().items():
        torch.manual_seed(0)
        model, n = make(), 4096
        X, y = torch.randn(n, *shape), torch.randint(0, 10, (n,))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        ops = {c: TorchModelOps(model, TensorDataset(X, y), batch_size=c, cache_bytes=0) for c in CHUNKS}
        times: dict[int, list[float]] = {c: [] for c in CHUNKS}
        worst = 0.0
        for _ in range(rounds):
            idx = np.sort(rng.choice(n, 512, replace=False))
            z = {}
            for c, o in ops.items():
                for _ in range(3):
                    b = torch.from_numpy(rng.choice(n, 128, replace=False))
                    loss = torch.nn.functional.cross_entropy(model(X[b]), y[b])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                t0 = time.perf_counter()
                z[c] = o.outputs(idx)
                times[c].append(time.perf_counter() - t0)
            with torch.no_grad():
                base = ops[512].outputs(idx)
                for c in (128, 256):
                    zc = ops[c].outputs(idx)
                    worst = max(worst, float((zc - base).abs().max() / base.abs().max().clamp_min(1e-30)))
        out.append({"model": name, "threads": threads, "ms": {c: 1e3 * float(np.median(v[2:])) for c, v in times.items()},
                    "max_rel_diff": worst})
    return out


def _child(args) -> dict:
    """One thread count in a fresh process (``e2e.run_child``): ``args`` is ``[threads, rounds]``."""
    return {"rows": child(int(args[0]), int(args[1]))}


def main(argv=None) -> int:
    from e2e import answer_child, md_row, publish, run_child

    if answer_child(argv, _child):
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--json", help="write every row here")
    a = ap.parse_args(argv)
    rows = []
    for t in (int(x) for x in a.threads.split(",")):
        env = dict(os.environ, OMP_NUM_THREADS=str(t), MKL_NUM_THREADS=str(t))
        rows += run_child(__file__, [str(t), str(a.rounds)], env=env, timeout=3600, what=f"{t} thread(s)")["rows"]
    lines = [md_row("model", "threads", *(f"chunks of {c} (ms)" for c in CHUNKS), "512 / 128",
                    "outputs' largest relative difference"),
             "|---|---|" + "---|" * len(CHUNKS) + "---|---|"]
    for r in rows:
        ms = {int(k): v for k, v in r["ms"].items()}
        lines.append(md_row(r["model"], r["threads"], *(f"{ms[c]:.2f}" for c in CHUNKS), f"{ms[512] / ms[128]:.2f}x",
                            f"{r['max_rel_diff']:.1e}"))
    publish("\n".join(lines), json_path=a.json,
            payload={"args": vars(a), "load_average": os.getloadavg(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
