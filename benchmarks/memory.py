"""Peak memory of one dense ``minibatch_coresets`` call, per backend, on the same problem (M1).

Every backend runs in its own fresh process: the kernels are warmed up by the same call with another
seed (so a cold Numba cache's compilation is not counted), the heap is trimmed and the peak RSS reset,
then the full-size call runs; its memory is the peak RSS over the RSS
before the call. The ratio to the NumPy (Numba) path is the figure of merit: the dense (B, n, n)
similarities are the floor every path shares, and work buffers beside them should add little.

    .venv/bin/python benchmarks/memory.py                      # the default problems, a table on stdout
    .venv/bin/python benchmarks/memory.py --out docs/benchmarks.md   # and the `memory-bench` block there

Linux only (it reads /proc/self/status). CuPy needs a GPU and is not measured here (its device memory
would need its own accounting).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import shlex
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # selection.py and e2e.py sit next to this file
    sys.path.append(_HERE)  # last: never shadows an installed module

START, END = "<!-- memory-bench:start -->", "<!-- memory-bench:end -->"
BACKENDS = ("numpy", "torch", "reference")
# (P, r, d): one subset problem per coreset (per_class=False), the dense worst case, and a per-class one
PROBLEMS = ((8, 3000, 64, False), (4, 4000, 32, False), (10, 6000, 16, True))


def _child(args) -> dict:
    """Run in the measuring process (``args``: backend, P, r, d, per_class 0/1, as :func:`measure` passes
    them): a warm-up (the same call, another seed), then the measured call; returns MiB figures. Nothing is
    cached between calls (work buffers are per call)."""
    backend, P, r, d, per_class = args[0], int(args[1]), int(args[2]), int(args[3]), bool(int(args[4]))
    from selection import _malloc_release, _peak_kb, _proc_status_kb, _reset_peak

    import numpy as np

    import crestcore

    rng = np.random.default_rng(0)
    X = rng.standard_normal((P * r * 2, d)).astype(np.float32)
    y = rng.integers(0, 10, size=X.shape[0])
    kw = dict(m=32, r=r, P=P, per_class=per_class)
    if backend == "torch":
        import torch

        torch.set_num_threads(1)
        Xa, ya = torch.from_numpy(X), torch.from_numpy(y)
    else:
        Xa, ya = X, y
    extra = {"backend": "reference"} if backend == "reference" else {}
    # the warm-up is the measured call itself (another seed): every kernel and code path the measured call
    # takes is compiled (a cold Numba cache would otherwise count the compiler's memory), its buffers sized
    crestcore.minibatch_coresets(Xa, ya, rng=0, **kw, **extra)
    gc.collect()
    _malloc_release()
    reset = _reset_peak()
    before = _proc_status_kb("VmRSS")
    out = crestcore.minibatch_coresets(Xa, ya, rng=1, **kw, **extra)
    peak = _peak_kb()
    picks = np.asarray(out.indices if backend != "torch" else out.indices.numpy())
    # the (P, r, r) float32 similarities of the whole-subset problems (per class: padded per-class blocks,
    # which depend on the draw; not reported)
    dense = None if per_class else P * r * r * 4
    return {"peak_mib": (peak - before) / 1024, "reset": reset, "dense_mib": None if dense is None else dense / 2**20,
            "picks": picks.tolist()}


def measure(backend: str, P: int, r: int, d: int, per_class: bool = False, timeout: float = 600) -> dict:
    """Peak-memory figures of one call, measured in a fresh process."""
    from e2e import run_child

    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    return run_child(__file__, [backend, str(P), str(r), str(d), str(int(per_class))], env=env, timeout=timeout,
                     what=f"{backend} P={P} r={r} d={d}", tail=2000)


def run(problems=PROBLEMS, backends=BACKENDS) -> list[dict]:
    rows = []
    for P, r, d, per_class in problems:
        got = {b: measure(b, P, r, d, per_class) for b in backends}
        base = got["numpy"]["peak_mib"]
        for b in backends:
            rows.append({"P": P, "r": r, "d": d, "per_class": per_class, "backend": b,
                         "peak_mib": got[b]["peak_mib"], "dense_mib": got[b]["dense_mib"],
                         "ratio": got[b]["peak_mib"] / base,
                         "same_picks": got[b]["picks"] == got["numpy"]["picks"]})
    return rows


def table(rows: list[dict], command: str) -> str:
    lines = [
        "### M1: peak memory of one dense selection call, per backend",
        "",
        f"Command: `{command}` ({_dt.date.today().isoformat()}, float32 features, m = 32, one thread).",
        "Peak RSS of the call over the RSS before it, in a fresh process after a warm-up; *dense* is the",
        "(B, n, n) float32 similarities every path holds; *ratio* is to the NumPy (Numba) path.",
        "",
        "| P | r | d | per class | backend | peak MiB | dense MiB | ratio to NumPy | same picks as NumPy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    from e2e import md_row

    for x in rows:
        dense = "-" if x["dense_mib"] is None else f"{x['dense_mib']:.0f}"
        lines.append(md_row(x["P"], x["r"], x["d"], "yes" if x["per_class"] else "no", x["backend"],
                            f"{x['peak_mib']:.0f}", dense, f"{x['ratio']:.2f}", "yes" if x["same_picks"] else "no"))
    return "\n".join(lines)


def main(argv=None) -> int:
    from e2e import answer_child, parse_with_outputs, publish

    if answer_child(argv, _child):
        return 0
    ns = parse_with_outputs(argparse.ArgumentParser(description=__doc__.splitlines()[0]), argv, "memory-bench",
                            "write the raw rows here")
    rows = run()
    command = "python benchmarks/memory.py" + (f" --out {shlex.quote(ns.out)}" if ns.out else "")
    publish(table(rows, command), out=ns.out, json_path=ns.json, payload=rows, start=START, end=END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
