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


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_missing_numba_is_said_once_and_the_reference_still_answers():
    """numba is a dependency; where it cannot import, NumPy selection warns (once) that it runs on the
    ~250x slower reference, and the answer is the reference's."""
    res = _run(
        "import sys, warnings\n"
        "sys.modules['numba'] = None  # import numba -> ImportError\n"
        "import numpy as np, crestcore\n"
        "X = np.random.default_rng(0).normal(size=(40, 3))\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = crestcore.facility_location(X, 4)\n"
        "    b = crestcore.facility_location(X, 4)\n"
        "ref = crestcore.facility_location(X, 4, backend='reference')\n"
        "msgs = [str(x.message) for x in w if 'Numba' in str(x.message)]\n"
        "assert len(msgs) == 1 and '250x' in msgs[0] and 'pip install numba' in msgs[0], msgs\n"
        "assert (a.indices == ref.indices).all() and (b.indices == ref.indices).all()\n"
        "print('ok')\n"
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_adapters_name_the_extra_when_their_framework_is_missing():
    for module, extra in (("crestcore.adapters.torch", "crestcore[torch]"),
                          ("crestcore.adapters.lightning", "crestcore[lightning]"),
                          ("crestcore.backends.torch", "crestcore[torch]"),
                          ("crestcore.backends.cupy", "crestcore[cupy]")):
        res = _run(f"import sys\nsys.modules['torch'] = None\nsys.modules['lightning'] = None\n"
                   f"sys.modules['pytorch_lightning'] = None\nsys.modules['cupy'] = None\nimport {module}\n")
        assert res.returncode != 0
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("ImportError") and extra in last, (module, last)
