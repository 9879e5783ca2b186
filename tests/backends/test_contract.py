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
    # (no rank's slot claimed by an earlier test in this process; the fallback this test sets is undone after it)
    monkeypatch.setattr(backends, "_CACHE_FALLBACK", None)
    monkeypatch.setattr(backends, "_FALLBACK_SET", None)
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


# --------------------------------------------------------------------------------------------------
# what every kernel takes and refuses when called directly (review 155)
# --------------------------------------------------------------------------------------------------

def _kernel_modules():
    from crestcore import _reference_kernels as ref

    mods = [("reference", ref, np)]
    try:
        from crestcore.backends import numba as nb

        mods.append(("numba", nb, np))
    except ImportError:  # pragma: no cover - numba is a core dependency
        pass
    try:
        import torch

        from crestcore.backends import torch as tb

        mods.append(("torch", tb, torch))
    except ImportError:  # pragma: no cover - the torch extra
        pass
    return mods


_HANG_CASES = {
    "features with a NaN": "X[2, 1] = np.nan; nb.greedy_features(X, 3, 'euclidean', 'max-minus', 1.0, 'lazy')",
    "distances that overflow": "nb.greedy_features(X * 1e200, 3, 'euclidean', 'max-minus', 1.0, 'lazy')",
    "squared distances that overflow": "nb.greedy_features(X * 1e160, 3, 'sqeuclidean', 'max-minus', 1.0, 'lazy')",
    "a fused batch with a NaN": "nb.facility_batched(np.where(np.arange(27).reshape(1, 9, 3) == 4, np.nan, "
                                "X[None]), np.ones((1, 9), bool), np.array([3]), 'euclidean', 'max-minus', 1.0, "
                                "'lazy')",
}


@pytest.mark.parametrize("case", sorted(_HANG_CASES))
def test_the_numba_lazy_greedy_refuses_non_finite_gains_instead_of_running_forever(case):
    """Review 155: a candidate whose exact gain is NaN (features with NaN or inf, or distances that overflow) was
    never accepted by the lazy loop, which compared it as a number, and was never passed over either: the
    kernel ran forever inside compiled code (Ctrl-C does not stop it). NaN keys now sort after every number,
    and the kernels refuse non-finite gains. Run in a subprocess with a timeout, so that a regression fails."""
    import subprocess
    import sys

    pytest.importorskip("numba")
    code = ("import numpy as np; from crestcore.backends import numba as nb; np.seterr(all='ignore'); "
            "X = np.random.default_rng(0).normal(size=(9, 3))\ntry:\n    " + _HANG_CASES[case] +
            "\nexcept ValueError as exc:\n    print('REFUSED', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and "REFUSED the greedy's gains are not finite" in out.stdout, out.stdout + out.stderr


def test_kernels_refuse_bad_counts_choices_and_draws_alike():
    """Review 155: the reference (and torch) kernels took k > n, an unknown optimizer, draws outside [0, 1] or no
    draws, and returned duplicate or padding picks with -inf gains, where the Numba kernel refused or padded;
    a problem whose valid candidates run out now pads with -1 on every backend, and NaN gains are refused."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(9, 3))
    S = np.abs(rng.normal(size=(2, 5, 5)))
    valid = np.ones((2, 5), dtype=bool)
    valid[1, 3:] = False  # 3 valid points
    valid_none = np.zeros((2, 5), dtype=bool)
    for name, mod, lib in _kernel_modules():
        a = np.asarray if lib is np else lib.as_tensor
        with pytest.raises(ValueError, match=r"k must be in \[0, 9\], got 10"):
            mod.greedy_features(a(X), 10, "euclidean", "max-minus", 1.0, "lazy")
        # review 160: a count read from a 0-d integer array (budgets[p]) is a count; a float is not
        picks = np.asarray(mod.greedy_features(a(X), 3, "euclidean", "max-minus", 1.0, "lazy")[0]).tolist()
        zero_d = np.asarray(mod.greedy_features(a(X), a(np.array(3)), "euclidean", "max-minus", 1.0, "lazy")[0])
        assert zero_d.tolist() == picks, name
        with pytest.raises(TypeError, match="k must be an integer number of picks, got float"):
            mod.greedy_features(a(X), 3.0, "euclidean", "max-minus", 1.0, "lazy")
        for bad in (a(np.array(True)), a(np.array([3]))):  # (review 164: torch's bool and 1-element ones passed)
            with pytest.raises(TypeError, match="k must be an integer number of picks"):
                mod.greedy_features(a(X), bad, "euclidean", "max-minus", 1.0, "lazy")
        with pytest.raises(ValueError, match="optimizer must be one of"):
            mod.greedy_batched(a(S), a(valid), a(np.array([2, 2])), "greedy")
        with pytest.raises(ValueError, match="stochastic"):
            mod.greedy_batched(a(S), a(valid), a(np.array([2, 2])), "stochastic")
        idx, gains = mod.greedy_batched(a(S), a(valid), a(np.array([2, 4])), "lazy")
        idx = np.asarray(idx)
        assert idx[1, 3] == -1 and sorted(idx[1, :3].tolist()) == [0, 1, 2], (name, idx)
        assert np.asarray(gains)[1, 3] == 0, name
        idx, _ = mod.greedy_batched(a(S), a(valid_none), a(np.array([2, 2])), "lazy")
        assert (np.asarray(idx) == -1).all(), (name, idx)
        bad = S.copy()
        bad[0, :, 1] = np.nan
        if name != "numba":  # the Numba kernel reads a NaN similarity as no coverage (the contract says so)
            with pytest.raises(ValueError, match="gains are not finite"):
                mod.greedy_batched(a(bad), a(valid), a(np.array([2, 2])), "naive")
        for bad_u in (-0.5, 1.5, np.nan):  # (torch's were taken too, review 159: duplicate picks)
            with pytest.raises(ValueError, match=r"uniform draws in \[0, 1\]"):
                mod.greedy_batched(a(S), a(valid), a(np.array([2, 2])), "stochastic", a(np.full((2, 2, 3), bad_u)))
            with pytest.raises(ValueError, match=r"uniform draws in \[0, 1\]"):
                mod.greedy_features(a(X), 2, "euclidean", "max-minus", 1.0, "stochastic", a(np.full((2, 3), bad_u)))


def test_check_choice_refuses_an_array_by_name():
    """Review 155: check_choice(np.array(...)) failed on the array's truth value, naming nothing."""
    from crestcore.validation import check_choice

    for check in (check_choice, contract.check_choice):
        with pytest.raises(ValueError, match=r"optimizer must be one of \('naive', 'lazy', 'stochastic'\), got array"):
            check(np.array(["lazy", "naive"]), "optimizer", contract.OPTIMIZERS)
    assert check_choice(np.str_("lazy"), "optimizer", contract.OPTIMIZERS) == "lazy"


def test_sparse_kernels_refuse_bad_draws_and_nonfinite_similarities_alike():
    """Review 160: the sparse kernels had none of the dense kernels' new refusals: the reference took draws
    outside [0, 1], crashed with an IndexError on a NaN draw and returned NaN gains, and the Numba kernel passed
    over a NaN candidate."""
    from crestcore import sparse as ref
    from crestcore.backends._examples import three_points

    mods = [ref]
    try:
        from crestcore.backends import numba_sparse
        mods.append(numba_sparse)
    except ImportError:  # pragma: no cover - numba is a core dependency (the reference is checked alone then)
        pass
    nbr, sims, order, indptr = three_points(np)
    bad = sims.copy()
    bad[0, 1] = np.nan
    for mod in mods:
        for u in (np.array([[1.5], [0.1]]), np.array([[np.nan], [0.1]]), np.array([[-0.5], [0.1]])):
            with pytest.raises(ValueError, match=r"uniform draws in \[0, 1\]"):
                mod.sparse_greedy(nbr, sims, order, indptr, 2, "stochastic", u)
        with pytest.raises(ValueError, match="stochastic"):
            mod.sparse_greedy(nbr, sims, order, indptr, 2, "stochastic")
        with pytest.raises(ValueError, match="optimizer must be one of"):
            mod.sparse_greedy(nbr, sims, order, indptr, 2, "greedy")
        for opt in ("lazy", "naive"):
            with pytest.raises(ValueError, match="gains are not finite"):
                mod.sparse_greedy(nbr, bad, order, indptr, 2, opt)
        assert np.asarray(mod.sparse_greedy(nbr, sims, order, indptr, 2, "lazy")[0]).tolist() == [1, 2]
        for count in (True, 2.7, np.array([2])):  # review 167: counts as the dense kernels take them
            with pytest.raises(TypeError, match="budget must be an integer number of picks"):
                mod.sparse_greedy(nbr, sims, order, indptr, count, "lazy")
        with pytest.raises(ValueError, match=r"budget must be in \[0, 3\], got 4"):
            mod.sparse_greedy(nbr, sims, order, indptr, 4, "lazy")
