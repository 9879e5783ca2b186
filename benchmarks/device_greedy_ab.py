"""The torch dense path (similarities, greedy, weights) of two commits side by side in one process.

``backends/_device.py`` of ``--old`` (a git revision of this checkout) is loaded next to the working
tree's and both run on the same CPU torch inputs, alternately, on the shapes of the CREST step (many tiny
problems) and of single larger problems; the table gives the medians, their ratio and whether the picks
are identical. Used for the 2026-12-01 change of the device greedy (candidates summed as contiguous rows,
the similarities made exactly symmetric): ``python benchmarks/device_greedy_ab.py --old 0a03165``.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(100, 60, 13, 31), (10, 52, 13, 31), (50, 60, 13, 21), (1, 1000, 100, 5), (1, 3000, 50, 3)]


def load_old(rev: str, path: str = "backends/_device.py", package: str = "crestcore.backends"):
    """The module at ``path`` of this checkout at git revision ``rev``, loaded as ``<package>.<name>_old``
    (its relative imports resolve in ``package``)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True,
                         capture_output=True, text=True).stdout
    name = Path(path).stem + "_old"
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(src)
    spec = importlib.util.spec_from_file_location(f"{package}.{name}", file)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = package
    spec.loader.exec_module(mod)
    return mod


def run(mod, ops, X, valid, budgets, K, new: bool):
    S = mod.similarity_batched(ops, X, valid, "euclidean", "max-minus", 1.0)
    kw = {"symmetric": True} if new else {}
    idx, _ = mod.greedy_loop(ops, S, valid, budgets, K, "lazy", **kw)
    _, obj = mod.assign_batched(ops, S, valid, idx)
    return idx, obj


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="git revision whose backends/_device.py is the 'old' side")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    from crestcore.backends import _device as new
    from crestcore.backends import torch as tb

    old = load_old(a.old)
    ops = tb._OPS
    print(f"old = {a.old}, new = working tree; torch {torch.__version__}, {a.threads} thread(s), float64, "
          "euclidean, max-minus, lazy; medians of alternating calls")
    print("| problems B | points n | picks K | old ms | new ms | old / new | same picks |")
    print("|---|---|---|---|---|---|---|")
    for B, n, K, reps in SHAPES:
        g = torch.Generator().manual_seed(0)
        X = torch.randn(B, n, 10, generator=g, dtype=torch.float64)
        valid, budgets = torch.ones(B, n, dtype=torch.bool), torch.full((B,), K)
        for mod, is_new in ((old, False), (new, True)):
            run(mod, ops, X, valid, budgets, K, is_new)  # warm-up
        times: dict[str, list[float]] = {"old": [], "new": []}
        res = {}
        for _ in range(reps):
            for name, mod, is_new in (("old", old, False), ("new", new, True)):
                t = time.perf_counter()
                res[name] = run(mod, ops, X, valid, budgets, K, is_new)
                times[name].append(time.perf_counter() - t)
        to, tn = float(np.median(times["old"])), float(np.median(times["new"]))
        same = bool(torch.equal(res["old"][0], res["new"][0]))
        print(f"| {B} | {n} | {K} | {to * 1e3:.2f} | {tn * 1e3:.2f} | {to / tn:.2f}x | {'yes' if same else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
