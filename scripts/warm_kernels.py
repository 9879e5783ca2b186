#!/usr/bin/env python
"""Compile the Numba kernels of a first selection into the in-tree cache, for the wheel to ship.

    .venv/bin/python scripts/warm_kernels.py          # before `python -m build --wheel`

Numba caches compiled kernels next to their source (``backends/__pycache__/*.nbi`` index and ``*.nbc``
data files), keyed by the source file's content hash, the Python and Numba versions and the CPU
(name and features). ``pyproject.toml`` ships those files in the wheel (package data of
``crestcore.backends``), so on a machine with the build machine's CPU, Python and Numba, the first call
after ``pip install`` loads the kernels instead of compiling them (seconds saved; see "Cold start" in
docs/benchmarks.md). Anywhere else Numba finds no matching entry and compiles as usual: a shipped entry
is never used for another CPU or another version.

What is compiled: the README's first example as written there (its first ``python`` block: dense
facility location, per class, and the CREST step), and the same on float32 input, the fused dense
kernel's serial and parallel variants both (which one a call takes depends on its size and the threads). The old cache files
in ``backends/__pycache__`` are removed first, so that the wheel holds no entries of earlier sources.
``NUMBA_CACHE_DIR`` is ignored here (with it set Numba would write elsewhere).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

os.environ.pop("NUMBA_CACHE_DIR", None)  # before numba reads its configuration

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "backends" / "__pycache__"


def readme_example() -> str:
    """The first ``python`` code block of README.md."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"```python\n(.*?)```", text, flags=re.S)
    if m is None:
        raise SystemExit("README.md has no python code block")
    return m.group(1)


def main() -> None:
    removed = 0
    if CACHE.is_dir():
        for f in list(CACHE.glob("*.nbi")) + list(CACHE.glob("*.nbc")):
            f.unlink()
            removed += 1
    import numpy as np

    import crestcore
    import crestcore.backends.numba as nb

    if Path(nb.__file__).resolve().parent != ROOT / "backends":
        raise SystemExit(f"crestcore.backends resolves to {nb.__file__}, not this checkout: install it editable "
                         "(pip install -e .) so that the cache is written into backends/__pycache__")
    exec(compile(readme_example(), "README.md", "exec"), {})
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 10)).astype(np.float32)
    y = rng.integers(0, 10, 600)
    crestcore.facility_location(X, 60)
    crestcore.facility_location(X, 60, labels=y)
    crestcore.minibatch_coresets(X, y, m=16, r=100, P=4, rng=0)
    # the fused dense kernel has a serial and a parallel variant (whole problems over the threads, from
    # _FUSED_PARALLEL_MIN_WORK of work): compile both, whatever the thread count here picks for a shape
    # (the parallel one is taken only with two threads or more: a build with NUMBA_NUM_THREADS=1, or on one CPU,
    # shipped none, and users' first calls compiled it, review 149; its problems dealt to two chunks run on one
    # thread alike)
    work, threads = nb._FUSED_PARALLEL_MIN_WORK, nb.get_num_threads
    try:
        nb.get_num_threads = lambda: max(2, threads())
        for threshold in (0, 1 << 62):
            nb._FUSED_PARALLEL_MIN_WORK = threshold
            for dt in (np.float32, np.float64):
                crestcore.minibatch_coresets(X.astype(dt), y, m=16, r=100, P=4, rng=0)
    finally:
        nb._FUSED_PARALLEL_MIN_WORK, nb.get_num_threads = work, threads
    for kernel in (nb._fused_parallel, nb._fused_serial):
        if len(kernel.signatures) < 2:
            raise SystemExit(f"{kernel.__name__} was compiled for {len(kernel.signatures)} signature(s), not float32 "
                             "and float64: the wheel would ship without it")
    files = sorted(CACHE.glob("*.nb*"))
    size = sum(f.stat().st_size for f in files)
    print(f"removed {removed} old cache files; wrote {len(files)} ({size / 1e6:.1f} MB) into {CACHE}")


if __name__ == "__main__":
    sys.exit(main())
