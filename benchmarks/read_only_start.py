#!/usr/bin/env python
"""The README's first example, first run, where the installed package's folder is not writable.

A wheel built by ``make wheel`` ships the first selection's Numba kernels in ``crestcore/backends/__pycache__``.
Numba reads that folder only where it may also write it; elsewhere (a package installed by root and run by
another user, a read-only container image) it caches in the user's folder, and crestcore copies the shipped
kernels there. This script builds a copy of the package (core and backends) in a temporary folder, warms its
in-tree cache as ``make wheel`` does (the README example run once there), then alternates, each in a fresh
interpreter with an empty home:

- ``writable``: the package's own folder writable, Numba reading the shipped kernels there (a user's own install);
- ``read-only``: Numba's in-tree locator taken away (an unwritable package folder, simulated: this may run as
  root), so the kernels come from the copies in the user's cache folder;
- ``cold``: an empty ``NUMBA_CACHE_DIR``: every kernel compiled, which is what the read-only case cost before
  the shipped kernels were copied (Numba compiled them all into the user's folder).

    .venv/bin/python benchmarks/read_only_start.py --rounds 3

Prints each run's wall clock (interpreter start to the example's end) and its Numba cache hits and misses.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = r"""
import sys, time
t0 = float(sys.argv[2])
if sys.argv[1] == "read-only":
    from numba.core import caching
    caching.InTreeCacheLocator.from_function = classmethod(lambda cls, f, p: None)
import runpy
runpy.run_path("readme_example.py")
import crestcore.backends.numba as nb
from numba.core.registry import CPUDispatcher
jitted = [f for f in vars(nb).values() if isinstance(f, CPUDispatcher)]
misses = sum(sum(f.stats.cache_misses.values()) for f in jitted)
hits = sum(sum(f.stats.cache_hits.values()) for f in jitted)
print(f"RESULT {time.time() - t0:.3f} {hits} {misses}")
"""


def run(base: Path, mode: str, tag: str) -> tuple[float, int, int]:
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    home = base / f"home-{tag}"
    env.update(PYTHONPATH=str(base / "site"), HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    if mode == "cold":
        env["NUMBA_CACHE_DIR"] = str(base / f"cache-{tag}")
    res = subprocess.run([sys.executable, "-c", CHECK, mode, repr(time.time())], env=env, cwd=base,
                         capture_output=True, text=True, timeout=900)
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT")]
    if res.returncode or not line:
        raise SystemExit(f"{mode} run failed:\n{res.stderr[-3000:]}")
    seconds, hits, misses = line[0].split()[1:]
    return float(seconds), int(hits), int(misses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="crest-ro-"))
    try:
        pkg = base / "site" / "crestcore"
        shutil.copytree(ROOT / "crestcore", pkg, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "backends", pkg / "backends", ignore=shutil.ignore_patterns("__pycache__"))
        text = (ROOT / "README.md").read_text()
        m = re.search(r"```python\n(.*?)```", text, flags=re.S)
        assert m is not None, "README.md has no python code block"
        (base / "readme_example.py").write_text(m.group(1))
        warm = run(base, "warm", "warm")
        print(f"warming the package's own cache (as make wheel): {warm[0]:.1f} s, {warm[2]} kernels compiled")
        times: dict[str, list[float]] = {"writable": [], "read-only": [], "cold": []}
        modes = list(times)
        for i in range(args.rounds):
            for mode in modes[i % 3:] + modes[:i % 3]:  # (rotated: a process after a cold one starts slower)
                s, hits, misses = run(base, mode, f"{mode}-{i}")
                times[mode].append(s)
                print(f"round {i} {mode:9s}: {s:6.2f} s, {hits} kernels loaded, {misses} compiled")
                if mode != "cold" and misses:
                    raise SystemExit(f"the {mode} run compiled {misses} kernels: the shipped ones were not used")
        med = {mode: statistics.median(v) for mode, v in times.items()}
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"medians: writable {med['writable']:.2f} s, read-only {med['read-only']:.2f} s, cold {med['cold']:.2f} s "
              f"({med['cold'] / med['read-only']:.1f}x the read-only run); 1-min load at the end {load:.2f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
