"""``import crestcore`` stays light: no framework or JIT is imported until an input needs it."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "numba", "cupy", "keras", "jax", "tensorflow", "lightning", "llvmlite")


def _modules_after(code: str) -> set[str]:
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _heavy(mods: set[str]) -> list[str]:
    return sorted(m for m in mods if m.split(".")[0] in HEAVY)


def test_import_crestcore_imports_no_framework():
    mods = _modules_after("import crestcore")
    assert "crestcore" in mods
    assert _heavy(mods) == []


def test_public_names_import_no_framework():
    mods = _modules_after(
        "import crestcore\n"
        "from crestcore import facility_location, minibatch_coresets, facility_objective, marginal_gains, "
        "pairwise_distances, draw_subsets, Selection, Coresets\n"
        "import crestcore.backends"
    )
    assert _heavy(mods) == []


def test_generic_backend_on_numpy_imports_no_framework():
    """The reference path on NumPy input never needs torch, numba or cupy."""
    mods = _modules_after(
        "import numpy as np, crestcore\n"
        "X = np.random.default_rng(0).normal(size=(30, 3))\n"
        "crestcore.facility_location(X, 4, backend='reference')\n"
        "crestcore.minibatch_coresets(X, None, m=2, r=10, P=2, rng=0, backend='reference')"
    )
    assert _heavy(mods) == []
