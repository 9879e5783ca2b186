"""G1: the batched CREST selection step on the GPU (torch CUDA, CuPy) vs the CPU (numba) path.

Shape (BENCHMARKS.md, G1): P=100 class-stratified subsets of r=1000 from a pool of n examples with C=10
classes, m=128 picks per subset, features d=10; that is B = P x C = 1000 facility-location problems of
~100 points solved in one batched call. Every backend gets the same features, labels and seed, so the
same subsets; the table reports each backend's objective (summed over the P coresets) and the share of
picks identical to the CPU row, because a fast wrong answer is not a result.

Two timings per backend:
* ``step``: ``crestcore.minibatch_coresets`` end to end (host-side subset draws and padding included);
* ``kernels``: ``crestcore.facility.solve_batched`` on the already padded batch (similarity, greedy,
  weights), i.e. the part the backend accelerates.

Method: one warm-up call (its time is reported: JIT compilation, CUDA context and kernel loading),
then the median of ``--repeats`` (>= 5) calls. GPU calls are timed with CUDA events (torch.cuda.Event /
cupy.cuda.Event) around the call, after which the event is synchronised; CPU calls with
``time.perf_counter``. TF32 is off for torch. Without a GPU (or without torch/CuPy) the GPU rows are
skipped and the table says why; the script still runs on the CPU.

    python benchmarks/gpu_selection.py --out benchmarks/out/g1.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import numpy as np

import crestcore
from crestcore._compat import to_numpy
from crestcore._validation import hamilton
from crestcore.facility import solve_batched
from crestcore.minibatch import draw_subsets
from crestcore.similarity import kernel_scale


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--P", type=int, default=100, help="subsets (coresets) per step")
    p.add_argument("--r", type=int, default=1000, help="subset size")
    p.add_argument("--C", type=int, default=10, help="classes")
    p.add_argument("--m", type=int, default=128, help="coreset size")
    p.add_argument("--d", type=int, default=10, help="feature dimension")
    p.add_argument("--n", type=int, default=60000, help="pool size (examples)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--optimizer", choices=("lazy", "naive", "stochastic"), default="lazy")
    p.add_argument("--kernel", choices=("max-minus", "exp"), default="max-minus")
    p.add_argument("--repeats", type=int, default=7, help="timed runs after the warm-up (>= 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-torch-cpu", action="store_true", help="skip the torch CPU row")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    a = p.parse_args(argv)
    if a.repeats < 5:
        p.error("--repeats must be >= 5")
    return a


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


def make_inputs(a):
    rng = np.random.default_rng(a.seed)
    # class-dependent means so that the features look like last-layer gradients of a C-class model
    centers = rng.standard_normal((a.C, a.d)) * 2.0
    y = rng.integers(0, a.C, size=a.n)
    X = (centers[y] + rng.standard_normal((a.n, a.d))).astype(a.dtype)
    return X, y.astype(np.int64)


def padded_batch(a, X, y):
    """The batch minibatch_coresets builds (same seed, same subsets): host arrays."""
    gen = np.random.default_rng(a.seed + 1)
    pool = np.arange(a.n, dtype=np.int64)
    subsets = draw_subsets(y, pool, a.r, a.P, gen)
    classes = np.unique(y)
    sub_lab = y[subsets]
    counts = np.stack([(sub_lab == c).sum(axis=1) for c in classes], axis=1)
    budgets = np.stack([hamilton(a.m, counts[p]) for p in range(a.P)]).reshape(-1)
    n_max = int(counts.max())
    pad = np.zeros((a.P, len(classes), n_max), dtype=np.int64)
    valid = np.zeros((a.P, len(classes), n_max), dtype=bool)
    for p in range(a.P):
        for ci, c in enumerate(classes):
            mem = subsets[p][sub_lab[p] == c]
            pad[p, ci, : mem.size] = mem
            valid[p, ci, : mem.size] = True
    pad = pad.reshape(a.P * len(classes), n_max)
    Xb = X[pad]  # (B, n_max, d)
    u = None
    if a.optimizer == "stochastic":
        from crestcore.facility import stochastic_draws

        u = stochastic_draws(gen, counts.reshape(-1), budgets, 0.1)
    return Xb, valid.reshape(a.P * len(classes), n_max), budgets, u


# --------------------------------------------------------------------------------------------------
# timers
# --------------------------------------------------------------------------------------------------


def time_cpu(fn, repeats):
    t0 = time.perf_counter()
    out = fn()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return out, warm * 1e3, [t * 1e3 for t in times]


def time_torch_cuda(fn, repeats):
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    warm = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return out, warm, times


def time_cupy(fn, repeats):
    import cupy

    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    out = fn()
    cupy.cuda.Device().synchronize()
    warm = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return out, warm, times


# --------------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------------


def run_backend(name, a, X, y, batch, xp, asarray, timer):
    """Time the step and the kernels for one backend; returns two result rows."""
    Xd, yd = asarray(X), asarray(y)
    kw = dict(m=a.m, r=a.r, P=a.P, rng=a.seed + 1, optimizer=a.optimizer, kernel=a.kernel)

    def step():
        return crestcore.minibatch_coresets(Xd, yd, **kw)

    Xb, valid, budgets, u = batch
    Xbd, validd = asarray(Xb), asarray(valid)
    sc = kernel_scale(None, a.d)

    def kernels():
        return solve_batched(xp, Xbd, validd, budgets, metric="euclidean", kernel=a.kernel, scale=sc,
                             optimizer=a.optimizer, u_host=u)

    res, warm, times = timer(step, a.repeats)
    kres, kwarm, ktimes = timer(kernels, a.repeats)
    idx = to_numpy(res.indices)
    obj = float(to_numpy(res.objective).astype(np.float64).sum())
    kobj = float(to_numpy(kres[3]).astype(np.float64).sum())
    return [
        dict(backend=name, what="step", warm=warm, times=times, objective=obj, indices=idx),
        dict(backend=name, what="kernels", warm=kwarm, times=ktimes, objective=kobj, indices=None),
    ]


def numpy_backend_name():
    from crestcore.backends import get_kernel

    S = np.zeros((1, 2, 2))
    k = get_kernel("greedy_batched", "numpy", S, np.ones((1, 2), bool), np.ones(1, np.int64))
    return "numba (CPU)" if k is not None else "NumPy reference (CPU; numba backend unavailable)"


def environment():
    lines = [f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs",
             f"numpy {np.__version__}, crestcore {crestcore.__version__}"]
    skipped = {}
    try:
        import torch

        line = f"torch {torch.__version__} ({torch.get_num_threads()} CPU threads)"
        if torch.cuda.is_available():
            line += f", CUDA {torch.version.cuda}: {torch.cuda.get_device_name(0)}"
        else:
            skipped["torch CUDA"] = "torch.cuda.is_available() is False"
        lines.append(line)
    except ImportError as exc:
        skipped["torch CUDA"] = skipped["torch CPU"] = f"torch does not import ({exc})"
    try:
        import cupy

        try:
            ok = cupy.cuda.is_available()
            if ok:
                float(cupy.ones(2).sum())
        except Exception as exc:  # noqa: BLE001 - report any driver problem as a skip reason
            ok = False
            skipped["CuPy"] = f"CuPy cannot run: {type(exc).__name__}: {exc}"
        lines.append(f"cupy {cupy.__version__}")
        if not ok:
            skipped.setdefault("CuPy", "cupy.cuda.is_available() is False")
    except ImportError as exc:
        skipped["CuPy"] = f"cupy does not import ({exc})"
    try:
        import numba

        lines.append(f"numba {numba.__version__} ({numba.get_num_threads()} threads)")
    except ImportError:
        pass
    return lines, skipped


def table(a, rows, env, skipped, argv):
    cpu = next((r for r in rows if r["what"] == "step" and r["indices"] is not None), None)
    out = [
        f"### G1: batched CREST selection, P={a.P}, r={a.r}, C={a.C}, m={a.m}, d={a.d}, n={a.n}, "
        f"{a.dtype}, {a.optimizer}, {a.kernel}",
        "",
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; "
        f"`python benchmarks/gpu_selection.py {' '.join(argv)}`",
        "",
        *[f"- {line}" for line in env],
        "",
        "| backend | timed | warm-up (ms) | median (ms) | min (ms) | runs | objective (sum over P) | picks = first row |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        agree = ""
        if r["indices"] is not None and cpu is not None:
            agree = f"{np.mean(r['indices'] == cpu['indices']):.1%}"
        out.append(
            f"| {r['backend']} | {r['what']} | {r['warm']:.1f} | {statistics.median(r['times']):.2f} | "
            f"{min(r['times']):.2f} | {len(r['times'])} | {r['objective']:.6g} | {agree} |"
        )
    for name, why in skipped.items():
        out.append(f"| {name} | skipped | | | | | | {why} |")
    out += ["", "step = `crestcore.minibatch_coresets` end to end; kernels = `solve_batched` on the padded "
            "batch. GPU rows: CUDA events; CPU rows: perf_counter. Median of the runs after one warm-up."]
    return "\n".join(out) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    env, skipped = environment()
    X, y = make_inputs(a)
    batch = padded_batch(a, X, y)
    rows = []

    import array_api_compat.numpy as np_xp

    rows += run_backend(numpy_backend_name(), a, X, y, batch, np_xp, lambda v: v, time_cpu)

    if "torch CPU" not in skipped and not a.no_torch_cpu:
        import array_api_compat.torch as t_xp
        import torch

        rows += run_backend("torch CPU", a, X, y, batch, t_xp, lambda v: torch.as_tensor(v), time_cpu)
    elif a.no_torch_cpu:
        skipped.setdefault("torch CPU", "--no-torch-cpu")

    if "torch CUDA" not in skipped:
        import array_api_compat.torch as t_xp
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        rows += run_backend("torch CUDA", a, X, y, batch, t_xp,
                            lambda v: torch.as_tensor(v, device="cuda"), time_torch_cuda)

    if "CuPy" not in skipped:
        import array_api_compat.cupy as c_xp
        import cupy

        rows += run_backend("CuPy", a, X, y, batch, c_xp, cupy.asarray, time_cupy)

    text = table(a, rows, env, skipped, argv)
    print(text)
    if skipped:
        print("GPU rows skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()), file=sys.stderr)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
