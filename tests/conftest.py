"""Shared test setup: hypothesis profiles, the ``xp`` fixture over the array libraries present, helpers.

Environment variables (they select tests, they never change a result):

``CRESTCORE_TEST_NAMESPACES``  comma list narrowing the ``xp`` matrix, e.g. ``numpy,torch``. Known names:
    ``numpy``, ``array_api_strict``, ``torch`` (CPU), ``torch-cuda``, ``cupy``. A name listed but not
    usable here is reported as a skip, not silently dropped.
``HYPOTHESIS_PROFILE``  ``default`` (local), ``ci`` (fewer examples, derandomized) or ``thorough``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# tests/reference.py is imported as ``reference`` (there is no tests/__init__.py; importlib mode)
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from _helpers import to_numpy  # noqa: E402  (plain helpers live in tests/_helpers.py)

# ------------------------------------------------------------------------------------------------
# hypothesis: no deadline (a JIT compiles on the first call), small example counts (2-core budget). The
# property tests against the reference discard draws whose reference decisions are near ties (assume):
# on some random seeds most early draws are, which is not a failure (hypothesis still raises Unsatisfiable
# when no draw is left), so the filter_too_much health check is off
# ------------------------------------------------------------------------------------------------
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
               print_blob=True)
settings.register_profile("default", max_examples=25, **_common)
settings.register_profile("ci", max_examples=15, derandomize=True, **_common)
settings.register_profile("thorough", max_examples=300, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# ------------------------------------------------------------------------------------------------
# array libraries
# ------------------------------------------------------------------------------------------------
KNOWN_NAMESPACES = ("numpy", "array_api_strict", "torch", "torch-cuda", "cupy")
GPU_NAMESPACES = ("torch-cuda", "cupy")


def _usable(name: str) -> str | None:
    """None when ``name`` works here, else the reason it does not."""
    try:
        if name == "numpy":
            return None
        if name == "array_api_strict":
            if importlib.util.find_spec("array_api_strict") is None:
                return "array_api_strict is not installed"
            return None
        if name in ("torch", "torch-cuda"):
            if importlib.util.find_spec("torch") is None:
                return "torch is not installed"
            if name == "torch":
                return None
            import torch

            if not torch.cuda.is_available():
                return "torch.cuda.is_available() is False"
            torch.ones(2, device="cuda").sum().item()  # an import alone proves nothing
            return None
        if name == "cupy":
            if importlib.util.find_spec("cupy") is None:
                return "cupy is not installed"
            import cupy

            if not cupy.cuda.is_available():
                return "cupy.cuda.is_available() is False"
            float(cupy.ones(2).sum())  # CuPy imports without a GPU and fails on the first operation
            return None
    except Exception as exc:  # a broken driver is "not usable", with the reason
        return f"{name} not usable: {type(exc).__name__}: {exc}"
    return f"unknown namespace {name!r}; known: {', '.join(KNOWN_NAMESPACES)}"


def _requested() -> list[str]:
    env = os.environ.get("CRESTCORE_TEST_NAMESPACES", "").strip()
    if not env:
        return list(KNOWN_NAMESPACES)
    return [s.strip() for s in env.split(",") if s.strip()]


def _namespace_params():
    explicit = bool(os.environ.get("CRESTCORE_TEST_NAMESPACES", "").strip())
    params = []
    for name in _requested():
        reason = _usable(name)
        marks = [pytest.mark.gpu] if name in GPU_NAMESPACES else []
        if reason is None:
            params.append(pytest.param(name, marks=marks, id=name))
        elif explicit:  # asked for by name: show that it could not run
            params.append(pytest.param(name, marks=marks + [pytest.mark.skip(reason=reason)], id=name))
    return params


NAMESPACE_PARAMS = _namespace_params()


def asarray(xp_name: str, a, dtype=None):
    """A copy of the NumPy array ``a`` in library ``xp_name`` (on its default device)."""
    a = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
    if xp_name == "numpy":
        return np.array(a, copy=True)
    if xp_name == "array_api_strict":
        import array_api_strict

        return array_api_strict.asarray(np.array(a, copy=True))
    if xp_name in ("torch", "torch-cuda"):
        import torch

        return torch.asarray(np.array(a, copy=True), device="cuda" if xp_name == "torch-cuda" else "cpu")
    if xp_name == "cupy":
        import cupy

        return cupy.asarray(a)
    raise ValueError(f"unknown namespace {xp_name!r}")


@dataclass(frozen=True)
class Lib:
    """One array library of the matrix, as the tests see it."""

    name: str

    @property
    def is_gpu(self) -> bool:
        return self.name in GPU_NAMESPACES

    def asarray(self, a, dtype=None):
        return asarray(self.name, a, dtype)

    def to_numpy(self, x) -> np.ndarray:
        return to_numpy(x)

    def dtype(self, np_dtype):
        """This library's dtype object for a NumPy dtype."""
        np_dtype = np.dtype(np_dtype)
        if self.name in ("numpy", "cupy"):
            return np_dtype
        if self.name == "array_api_strict":
            import array_api_strict

            return getattr(array_api_strict, np_dtype.name)
        import torch

        return getattr(torch, np_dtype.name)

    def assert_native(self, out, like, np_dtype, ndim: int | None = None):
        """``out`` is an array of ``like``'s library, on ``like``'s device, of dtype ``np_dtype``."""
        import array_api_compat

        assert array_api_compat.is_array_api_obj(out), f"{type(out)} is not an array"
        assert array_api_compat.array_namespace(out) is array_api_compat.array_namespace(like), (
            f"result is a {type(out).__module__}.{type(out).__name__}, input a {type(like).__module__}"
        )
        assert array_api_compat.device(out) == array_api_compat.device(like)
        assert out.dtype == self.dtype(np_dtype), f"dtype {out.dtype}, expected {np_dtype}"
        if ndim is not None:
            assert out.ndim == ndim


@pytest.fixture(scope="session", autouse=True)
def _no_tf32():
    """Correctness tests on CUDA compare against float32/float64 NumPy: TF32 must be off."""
    if "torch" in sys.modules and _usable("torch-cuda") is None:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    yield


@pytest.fixture(scope="session", params=NAMESPACE_PARAMS)
def xp(request) -> Lib:
    """Each usable array library in turn (narrow with CRESTCORE_TEST_NAMESPACES)."""
    return Lib(request.param)


@pytest.fixture(scope="session")
def ref():
    """tests/reference.py, the slow obviously-correct NumPy references."""
    import reference

    return reference


# ------------------------------------------------------------------------------------------------
# JAX's at-fork warning. A pytest-xdist worker that ran a test with jax arrays in-process has JAX's
# os.register_at_fork hook installed, and every later fork of that process (DataLoader workers) warns
# "os.fork() was called ..." through it: tests that count warnings or turn them into errors then failed
# depending on which tests the worker had been given. The workers never use JAX. The hook cannot be
# unregistered; it looks ``warnings`` up in its module at each call, so that name is given a stand-in
# that drops this one warning and passes every other on.
# ------------------------------------------------------------------------------------------------
class _NoForkWarning:
    def __init__(self, real):
        self._real = real

    def warn(self, message, category=None, stacklevel=1, **kw):
        if category is RuntimeWarning and str(message).startswith("os.fork() was called"):
            return
        self._real.warn(message, category, stacklevel + 1, **kw)

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture(autouse=True)
def _quiet_jax_fork_hook(monkeypatch):
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is not None and not isinstance(getattr(bridge, "warnings", None), _NoForkWarning):
        monkeypatch.setattr(bridge, "warnings", _NoForkWarning(bridge.warnings))
    yield


def pytest_collection_modifyitems(config, items):
    """The opt-in slow tests (``make test-slow``: demos, long benchmarks, the docs' long examples with their
    own subprocess timeouts) run without pytest-timeout's limit of the default suite (``timeout`` in
    pyproject.toml), unless they set their own."""
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(0))


# ------------------------------------------------------------------------------------------------
# the lower-bounds run (`make test-lower`): NumPy, Numba and array-api-compat at their oldest declared
# versions, without torch. A core test module imports torch where it is there (a second array library);
# a test whose code uses it is skipped there, named, and runs everywhere else.
# ------------------------------------------------------------------------------------------------
NO_TORCH = importlib.util.find_spec("torch") is None
# the torch backend's own tests import it at the top: not collected without it
collect_ignore = ["backends/test_torch.py", "backends/test_torch_threads.py"] if NO_TORCH else []


def _names_torch(source: str) -> bool:
    """Whether code (not a comment or a docstring's prose) names torch: the name, or the string "torch" (a
    parameter value)."""
    import io
    import tokenize

    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(textwrap.dedent(source)).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return "torch" in source
    return any((t.type == tokenize.NAME and t.string == "torch")
               or (t.type == tokenize.STRING and t.string.strip("\"'") == "torch") for t in tokens)


@pytest.fixture(autouse=True)
def _skip_what_uses_torch_without_torch(request):
    if not NO_TORCH or request.function is None:
        return
    try:
        source = inspect.getsource(request.function)
    except (OSError, TypeError):
        return
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if _names_torch(source) or any(isinstance(v, str) and v == "torch" for v in params.values()):
        pytest.skip("uses torch, which is not installed (the lower-bounds run)")
