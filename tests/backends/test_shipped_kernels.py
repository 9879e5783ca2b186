"""The kernels a wheel ships in ``backends/__pycache__`` load where the package's folder is not writable.

Numba reads its in-tree cache only where it may write there too, so a package installed by root and run by
another user (or from a read-only image) compiled every kernel again. ``crestcore.backends`` copies the shipped
kernels into the folder Numba uses instead. Each test runs fresh interpreters on a copy of the package; an
unwritable package folder is simulated by taking Numba's in-tree locator away (the tests may run as root, for
whom no folder is unwritable).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("numba")

# the kernel used: small, so that a compile takes about a second
CALL = """
import json, sys, numpy as np
{patch}
from crestcore.backends import get_host_kernel
out = get_host_kernel("class_counts")(np.array([2, 0, 2, 3]), 10).tolist()
import crestcore.backends.numba as nb
st = nb._class_counts.stats
print(json.dumps({{"out": out, "hits": sum(st.cache_hits.values()), "misses": sum(st.cache_misses.values())}}))
"""

# a package folder Numba may not write (in-tree locator gone); READONLY_HOME: no user cache folder either
# (the locators' names lost their underscore in Numba 0.60)
READONLY = """
from numba.core import caching
(getattr(caching, "InTreeCacheLocator", None) or caching._InTreeCacheLocator).from_function = classmethod(
    lambda cls, f, p: None)
"""
READONLY_HOME = READONLY + """
(getattr(caching, "UserWideCacheLocator", None) or caching._UserWideCacheLocator).from_function = classmethod(
    lambda cls, f, p: None)
import warnings; warnings.simplefilter("ignore", RuntimeWarning)
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A copy of the package (core, backends and adapters, sources only) whose in-tree cache holds ``class_counts``'s
    kernel, compiled by a first interpreter there, as ``make wheel`` ships it."""
    import importlib

    import crestcore

    base = tmp_path_factory.mktemp("shipped")
    pkg = base / "site" / "crestcore"
    # the package under test, wherever it is: a source checkout (backends/ and adapters/ beside crestcore/) or an
    # installed wheel (inside it; the wheel's CI runs a copy of tests/ alone)
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(Path(crestcore.__file__).parent, pkg, ignore=skip)
    for sub in ("backends", "adapters"):
        if not (pkg / sub).exists():
            shutil.copytree(Path(importlib.import_module(f"crestcore.{sub}").__file__).parent, pkg / sub, ignore=skip)
    run(base, "")
    shipped = sorted(p.name for p in (pkg / "backends" / "__pycache__").glob("numba._class_counts-*.nbi"))
    assert len(shipped) == 1, shipped
    return base


def run(base: Path, patch: str, cache_dir: str | None = None, tag: str = "run") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    home = base / f"home-{tag}"
    env.update(PYTHONPATH=str(base / "site"), HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"),
               TMPDIR=str(base / f"tmp-{tag}"), OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    (base / f"tmp-{tag}").mkdir(exist_ok=True)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    code = CALL.format(patch=textwrap.dedent(patch))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=base, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["out"] == [1, 0, 2, 1]
    return out


def cached_indexes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("numba._class_counts-*.nbi"))


def test_read_only_package_loads_the_shipped_kernels(site):
    # Numba caches in the user's cache folder: the shipped kernel is copied there and loaded, not compiled
    out = run(site, READONLY, tag="ro")
    assert (out["hits"], out["misses"]) == (1, 0), out
    user = site / "home-ro" / ".cache"
    assert len(cached_indexes(user)) == 1
    # a second run finds the user's own (fresh) index and keeps it
    index = next(user.rglob("numba._class_counts-*.nbi"))
    before = index.stat().st_mtime_ns
    out = run(site, READONLY, tag="ro")
    assert (out["hits"], out["misses"]) == (1, 0), out
    assert index.stat().st_mtime_ns == before


def test_direct_import_loads_the_shipped_kernels(site):
    # a researcher calling the Numba kernels by their module, without the dispatch
    out = run(site, READONLY + "\nimport crestcore.backends.numba\n", tag="direct")
    assert (out["hits"], out["misses"]) == (1, 0), out


def test_stale_user_cache_is_replaced(site):
    # an index of an earlier source (another stamp) in the user's folder: Numba would ignore it and compile
    run(site, READONLY, tag="stale")
    index = next((site / "home-stale" / ".cache").rglob("numba._class_counts-*.nbi"))
    import pickle

    with open(index, "rb") as f:
        version = pickle.load(f)
        stamp, overloads = pickle.loads(f.read())
    with open(index, "wb") as f:
        pickle.dump(version, f)
        f.write(pickle.dumps((b"an earlier source", overloads)))
    out = run(site, READONLY, tag="stale")
    assert (out["hits"], out["misses"]) == (1, 0), out


def test_fallback_folder_gets_the_shipped_kernels(site):
    # neither the package's folder nor a user cache folder: crestcore's fallback in the temporary directory
    out = run(site, READONLY_HOME, tag="fallback")
    assert (out["hits"], out["misses"]) == (1, 0), out
    assert len(cached_indexes(site / "tmp-fallback")) == 1


def test_users_own_cache_folder_is_left_alone(site, tmp_path):
    # NUMBA_CACHE_DIR is the user's choice (an empty one times a cold start): nothing is copied into it
    own = tmp_path / "own"
    out = run(site, "", cache_dir=str(own), tag="own")
    assert (out["hits"], out["misses"]) == (0, 1), out
    assert len(cached_indexes(own)) == 1  # Numba's own entry, compiled


def test_writable_package_reads_its_own_folder(site):
    # the usual case: Numba reads the in-tree cache itself and nothing is copied anywhere
    out = run(site, "", tag="rw")
    assert (out["hits"], out["misses"]) == (1, 0), out
    assert cached_indexes(site / "home-rw") == []


@pytest.mark.parametrize("imported", [False, True])
def test_distributed_rank_slot_gets_the_shipped_kernels(site, imported):
    # a rank's own Numba cache slot (crestcore.adapters.distributed), claimed before or after the kernels import
    pytest.importorskip("torch")
    slots = site / f"slots-{imported}"
    patch = ("import crestcore.backends.numba\n" if imported else "") + (
        f"from crestcore.adapters import distributed as D\nD.numba_cache_slot(base={str(slots)!r})\n")
    out = run(site, patch, tag=f"slot-{imported}")
    assert (out["hits"], out["misses"]) == (1, 0), out
    assert len(cached_indexes(slots)) == 1
