"""crestcore.backends.contract: every backend module and the reference implement the contract's kernels
with its parameters, export what the capability table says, and the dispatch follows the table.

The signature checks read the modules' source with ``ast``, so the CuPy module is checked on machines
without CuPy too."""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import crestcore
from crestcore import backends
from crestcore.backends import contract

BACKENDS_DIR = Path(importlib.util.find_spec("crestcore.backends").origin).parent


def _functions(path: Path) -> dict[str, tuple[str, ...]]:
    """Top-level functions of a module and their parameter names (positional and keyword)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            a = node.args
            out[node.name] = tuple(p.arg for p in a.posonlyargs + a.args + a.kwonlyargs)
    return out


def _all(path: Path) -> tuple[str, ...]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"{path} has no __all__")


@pytest.mark.parametrize("backend", sorted(contract.CAPABILITIES))
def test_each_backend_module_implements_its_kernels_with_the_contracts_parameters(backend):
    cap = contract.CAPABILITIES[backend]
    path = BACKENDS_DIR / f"{cap.module}.py"
    funcs = _functions(path)
    for name in cap.kernels:
        assert name in funcs, f"{path.name} lacks the kernel {name}"
        assert funcs[name] == contract.SIGNATURES[name], (path.name, name, funcs[name])
    assert "usable_for" in funcs, f"{path.name} has no usable_for"
    assert set(_all(path)) == {"usable_for", *cap.kernels}, (path.name, _all(path))


def test_the_reference_implements_every_kernel_with_the_contracts_parameters():
    import inspect

    from crestcore import _reference_kernels, sparse

    for name, params in contract.SIGNATURES.items():
        fn = getattr(_reference_kernels, name, None) or getattr(sparse, name)
        assert tuple(inspect.signature(fn).parameters) == params, (name, inspect.signature(fn))


def test_every_kernel_of_the_contract_has_a_signature_and_a_backend():
    names = contract.KERNEL_NAMES + contract.SPARSE_KERNEL_NAMES + contract.HOST_KERNEL_NAMES
    assert set(contract.SIGNATURES) == set(names)
    offered = {k for cap in contract.CAPABILITIES.values() for k in cap.kernels}
    assert offered == set(names)


def test_the_dispatch_follows_the_capability_table():
    for cap in contract.CAPABILITIES.values():
        sparse = cap.kernels[0] in contract.SPARSE_KERNEL_NAMES
        assert contract.backend_for_namespace(cap.namespace, sparse=sparse) == cap.module
    assert contract.backend_for_namespace("array_api_strict") is None
    X = np.random.default_rng(0).normal(size=(2, 5, 3))
    valid = np.ones((2, 5), dtype=bool)
    if backends.backend_module("numpy") is not None:  # numba imports here
        k = backends.get_kernel("similarity_batched", "numpy", X, valid)
        assert k is not None and k.__module__ == "crestcore.backends.numba"
        # a dtype outside the table goes to the reference
        assert backends.get_kernel("similarity_batched", "numpy", X.astype(np.float16), valid) is None


def test_torch_accepts_the_tables_dtypes_and_declines_the_others():
    torch = pytest.importorskip("torch")
    cap = contract.CAPABILITIES["torch"]
    valid = torch.ones(1, 4, dtype=torch.bool)
    for name in ("float16", "bfloat16", "float32", "float64"):
        X = torch.zeros(1, 4, 2, dtype=getattr(torch, name))
        got = backends.get_kernel("similarity_batched", "torch", X, valid) is not None
        assert got == (name in cap.dtypes), name


def test_the_core_uses_the_contracts_names_and_constants():
    from crestcore import similarity

    assert similarity.METRICS == contract.METRICS and similarity.KERNELS == contract.KERNELS
    x = np.array([[1e8, 1.0]])
    # identical points are at distance exactly 0 (the snap), whatever the cancellation
    assert float(crestcore.pairwise_distances(x, x)[0, 0]) == 0.0


@given(st.integers(0, 10**6), st.integers(0, 10**4), st.floats(1e-6, 0.999))
def test_sample_size_is_the_stochastic_greedy_rule(n, k, eps):
    s = contract.sample_size(n, k, eps)
    want = math.ceil(n / max(k, 1) * math.log(1 / eps))
    assert s == min(max(want, 1), max(n, 1))


def test_stochastic_draws_use_the_contracts_sample_sizes():
    from crestcore.facility import stochastic_draws

    sizes, budgets = np.array([100, 40]), np.array([10, 4])
    u = stochastic_draws(np.random.default_rng(0), sizes, budgets, 0.1)
    assert u.shape[2] == int(contract.sample_sizes(sizes, budgets, 0.1).max()) == 24


def test_numba_without_a_writable_cache_folder_caches_in_the_temporary_directory(monkeypatch, tmp_path):
    """Review 149: an installed package whose folder is not writable (a container run as another user), with no
    writable home either, made Numba raise "no locator available" at the kernels' import, the user's first
    selection failing with it; the kernels are imported again with Numba's cache folder in the temporary
    directory, said once. Simulated here: the first import raises Numba's error."""
    import importlib
    import sys

    pytest.importorskip("numba")
    from numba.core import config

    real, calls = importlib.import_module, []
    real("crestcore.backends.numba")  # (imported: restored as it was after the test)
    numba_error = RuntimeError("cannot cache function '_exp': no locator available for file '/ro/backends/numba.py'")

    def import_module(name, *a, **k):
        calls.append(name)
        if len(calls) == 1:
            raise numba_error
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", import_module)
    monkeypatch.setattr(config, "CACHE_DIR", "")
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    # the module as it was afterwards, in sys.modules and as the package's attribute (the import binds both: a later
    # `from crestcore.backends import numba` got the re-imported one, which the dispatch does not call)
    monkeypatch.setitem(sys.modules, "crestcore.backends.numba", sys.modules["crestcore.backends.numba"])
    monkeypatch.setattr(backends, "numba", sys.modules["crestcore.backends.numba"])
    with pytest.warns(RuntimeWarning, match="cannot cache the kernels next to the installed package.*cached in "
                                            f"{tmp_path}.*NUMBA_CACHE_DIR") as said:
        mod = backends._import_kernels("numba")
    assert said[0].filename == __file__  # the caller's line
    assert mod.__name__ == "crestcore.backends.numba" and calls == ["crestcore.backends.numba"] * 2
    assert config.CACHE_DIR.startswith(str(tmp_path)) and os.path.isdir(config.CACHE_DIR)
    # this user's folder that others could write is made private before use (review 153: Numba's index is a pickle;
    # another user's folder is not used at all: the next test)
    calls.clear()
    os.chmod(config.CACHE_DIR, 0o777)
    shared = config.CACHE_DIR
    monkeypatch.setattr(config, "CACHE_DIR", "")
    with pytest.warns(RuntimeWarning, match="cannot cache the kernels"):
        backends._import_kernels("numba")
    assert config.CACHE_DIR == shared and os.stat(config.CACHE_DIR).st_mode & 0o022 == 0
    # a distributed rank's slot, where one was claimed (review 153: the ranks shared the temporary folder)
    calls.clear()
    monkeypatch.setattr(config, "CACHE_DIR", "")
    monkeypatch.setattr(backends, "_CACHE_FALLBACK", str(tmp_path / "slot0"))
    with pytest.warns(RuntimeWarning, match="slot0"):
        backends._import_kernels("numba")
    assert config.CACHE_DIR == str(tmp_path / "slot0")
    monkeypatch.setattr(backends, "_CACHE_FALLBACK", None)
    # a cache folder that was given and still fails, or another error: Numba's own error, unchanged
    calls.clear()
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path / "given"))
    with pytest.raises(RuntimeError, match="no locator available"):
        backends._import_kernels("numba")
    calls.clear()
    numba_error = RuntimeError("something else")
    monkeypatch.setattr(config, "CACHE_DIR", "")
    with pytest.raises(RuntimeError, match="something else"):
        backends._import_kernels("numba")


def test_the_numba_fallback_folder_is_one_only_this_user_can_write(tmp_path):
    """Review 154: a umask of 002 left this user's fallback folder group-writable, and each later process then made
    a new private folder (never reused); a folder another user owns must not be used at all (Numba's index is a
    pickle). This user's own is kept, made private; another user's gives way to a new private folder."""
    if not hasattr(os, "getuid"):
        pytest.skip("no file owners here")
    own = tmp_path / "crestcore-numba-x"
    own.mkdir(mode=0o775)
    os.chmod(own, 0o775)
    assert backends._private_folder(own) == str(own) and os.stat(own).st_mode & 0o022 == 0
    fresh = backends._private_folder(tmp_path / "made")
    assert os.path.isdir(fresh) and os.stat(fresh).st_mode & 0o022 == 0
    if os.getuid() != 0:
        return  # (giving a folder to another user needs root)
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o777)
    os.chown(theirs, 65534, 65534)
    got = backends._private_folder(theirs)
    assert got != str(theirs) and os.stat(got).st_uid == os.getuid() and os.stat(got).st_mode & 0o077 == 0
