"""The docstring examples: every public module's doctests pass, and every public callable has one.

``test_module_doctests`` runs the ``doctest`` examples (``ELLIPSIS | NORMALIZE_WHITESPACE``) of each public
module of ``crestcore``, ``crestcore.adapters``, ``crestcore.apps``, ``crestcore.baselines`` and
``crestcore.backends`` (module names without a leading underscore), and of each of their private modules
(``crestcore._validation``, ``crestcore.baselines._craig``, ...; a private module deeper down whose names a
public module re-exports runs with it: the examples run where the functions are defined). An adapter or backend
module whose framework does not import here is skipped, naming what is missing.

``test_public_callables_have_examples`` lists every public callable without an example: the functions
and classes named in a public module's ``__all__`` and defined in crestcore, and each class's public
methods defined on the class. A method that implements a hook of a framework base class (a name a
non-crestcore base defines: Lightning's ``on_train_batch_end``, the Hugging Face ``Trainer.compute_loss``,
Keras's ``on_epoch_end``, ...) is the framework's to document and is not required; the class example shows
it at work.

The Keras modules run in a subprocess with ``KERAS_BACKEND`` (the environment's, else ``torch``): Keras
picks its backend once per process, at its first import, and this test sets nothing in this process.

Modules are found by importing the packages (``pkgutil`` over their ``__path__``), so the test works from
the source tree and against an installed wheel alike.
"""

from __future__ import annotations

import doctest
import functools
import importlib
import importlib.util
import inspect
import json
import os
import pkgutil
import subprocess
import sys
from contextlib import nullcontext

import pytest

# Nothing is pending: every public callable needs an example. A module named here (or a package: the
# entry "crestcore.backends" would cover every backend module) would be exempt from that requirement while
# ongoing work owns it; its doctests would still run.
PENDING: set[str] = set()

PACKAGES = ("crestcore", "crestcore.adapters", "crestcore.apps", "crestcore.baselines", "crestcore.backends")
# modules that may need a framework to import: skipped (with the reason) when it is missing
OPTIONAL = ("crestcore.adapters.", "crestcore.backends.")
# modules whose examples import keras: run in a fresh process with KERAS_BACKEND set there
KERAS_MODULES = ("crestcore.adapters.keras", "crestcore.apps.keras_demo")
# modules whose examples change process-wide state (a torch.distributed process group, the process's
# Numba cache slot): run in a fresh process too
ISOLATED_MODULES = KERAS_MODULES + ("crestcore.adapters.distributed",)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _public_modules() -> list[str]:
    names: list[str] = []
    for pkg in PACKAGES:
        names.append(pkg)
        for info in pkgutil.iter_modules(importlib.import_module(pkg).__path__, pkg + "."):
            if not info.name.rsplit(".", 1)[1].startswith("_") and info.name not in names:
                names.append(info.name)
    return names


MODULES = _public_modules()


def _private_modules() -> list[str]:
    """The packages' private modules (a leading underscore): their examples run under their own names, also
    those that no public module re-exports from (review 108: crestcore._compat's example was wrong, and
    nothing ran it)."""
    return [info.name for pkg in PACKAGES
            for info in pkgutil.iter_modules(importlib.import_module(pkg).__path__, pkg + ".")
            if info.name.rsplit(".", 1)[1].startswith("_")]


PRIVATE = _private_modules()


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _missing_dependency(exc: BaseException) -> str | None:
    """The module outside crestcore whose absence made an import fail, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ModuleNotFoundError) and exc.name and not _under(exc.name, ("crestcore",)):
            return exc.name
        exc = exc.__cause__ or exc.__context__
    return None


# modules that import without their optional extra but whose examples run it
# (dask, not distributed: a test that puts benchmarks/ on sys.path makes benchmarks/distributed.py findable)
EXAMPLES_NEED = {"crestcore.backends.knn": "faiss", "crestcore.adapters.dask": "dask",
                 "crestcore.adapters.monitor": "torch", "crestcore.apps.demo": "torch",
                 "crestcore.apps.train_demo": "torch"}


def _import(name: str):
    """(module, None), or (None, why it is skipped) for an adapter/backend whose framework is missing."""
    need = EXAMPLES_NEED.get(name)
    if need is not None and importlib.util.find_spec(need) is None:
        return None, f"the examples of {name} need {need!r} (an optional extra), which is not installed"
    try:
        return importlib.import_module(name), None
    except ImportError as exc:
        missing = _missing_dependency(exc)
        if not name.startswith(OPTIONAL) or missing is None:
            raise
        return None, f"{name} needs {missing!r}, which does not import here ({type(exc).__name__}: {exc})"


def _crest_objects(module, *, strict: bool = True):
    """(name, object) for the functions and classes of ``module.__all__`` defined in crestcore. A name
    ``__all__`` promises and the module lacks is an error when ``strict``, else passed over."""
    for name in getattr(module, "__all__", ()):
        if not strict and not hasattr(module, name):
            continue
        obj = getattr(module, name)
        definer = getattr(obj, "__module__", None) or ""
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and _under(definer, ("crestcore",)):
            yield name, obj


def _has_example(obj) -> bool:
    """At least one example doctest runs (``+SKIP`` ones do not count): the object's own docstring,
    not one inherited from a base class."""
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else ""
    skip = doctest.OPTIONFLAGS_BY_NAME["SKIP"]
    return any(not ex.options.get(skip, False) for ex in doctest.DocTestParser().get_examples(doc))


def _framework_hook(cls, attr: str) -> bool:
    """Whether ``attr`` overrides a method a non-crestcore base class of ``cls`` defines."""
    for base in cls.__mro__[1:]:
        if base is object or _under(base.__module__, ("crestcore",)):
            continue
        if attr in vars(base):
            return True
    return False


def _without_examples(module) -> list[str]:
    """Full names of the public callables of ``module`` that have no example (PENDING ones excepted)."""
    missing = []
    for _, obj in _crest_objects(module):
        if _under(obj.__module__, PENDING):
            continue
        full = f"{obj.__module__}.{obj.__qualname__}"
        if not _has_example(obj):
            missing.append(full)
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                func = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
                if attr.startswith("_") or not inspect.isfunction(func) or _framework_hook(obj, attr):
                    continue
                if not _has_example(func):
                    missing.append(f"{full}.{attr}")
    return missing


def _doctest_modules(module) -> list:
    """``module`` and the private modules defining names it re-exports (their examples run there)."""
    mods = [module]
    for _, obj in _crest_objects(module, strict=False):
        definer = sys.modules[obj.__module__]
        private = any(part.startswith("_") for part in definer.__name__.split("."))
        if private and definer not in mods and definer.__name__ not in PRIVATE:  # those run on their own
            mods.append(definer)
    return mods


def _run_doctests(module) -> tuple[int, int, str]:
    """(failed, attempted, report) over ``module`` and its private definers."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS, verbose=False)
    report: list[str] = []
    torch = sys.modules.get("torch")
    # an example that seeds torch or builds a model leaves the global RNG as it found it
    with torch.random.fork_rng(devices=[]) if torch is not None else nullcontext():
        for mod in _doctest_modules(module):
            for test in sorted(finder.find(mod, mod.__name__), key=lambda t: t.name):
                runner.run(test, out=report.append)
    return runner.failures, runner.tries, "".join(report)


def _check_here(name: str) -> dict:
    """Everything the two tests need about module ``name``, computed in this process."""
    module, skip = _import(name)
    if module is None:
        return {"skip": skip}
    failed, attempted, report = _run_doctests(module)
    return {"failed": failed, "attempted": attempted, "report": report,
            "missing": [] if _under(name, PENDING) else _without_examples(module),
            "file": getattr(importlib.import_module("crestcore"), "__file__", None)}


_CHILD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("crest_doctests_child", sys.argv[1])
child = importlib.util.module_from_spec(spec)
spec.loader.exec_module(child)
print("CREST-DOCTESTS " + json.dumps(child._check_here(sys.argv[2])))
"""


def _keras_backend() -> str | None:
    want = os.environ.get("KERAS_BACKEND")
    if want:
        return want
    for backend in ("torch", "jax"):
        if importlib.util.find_spec(backend) is not None:
            return backend
    return None


@functools.cache
def _check(name: str) -> dict:
    if name not in ISOLATED_MODULES:
        return _check_here(name)
    env = dict(os.environ)
    backend = None
    if name in KERAS_MODULES:
        if importlib.util.find_spec("keras") is None:
            return {"skip": f"{name} needs keras, which is not installed"}
        backend = _keras_backend()
        if backend is None:
            return {"skip": f"{name} needs a Keras backend: neither torch nor jax is installed"}
        env["KERAS_BACKEND"] = backend
    proc = subprocess.run([sys.executable, "-c", _CHILD, os.path.abspath(__file__), name], env=env,
                          cwd=os.getcwd(), capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CREST-DOCTESTS ")]
    assert proc.returncode == 0 and lines, (
        f"the doctests of {name} (KERAS_BACKEND={backend}) did not run in the subprocess "
        f"(exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("CREST-DOCTESTS "):])
    if "skip" not in result:
        here = importlib.import_module("crestcore").__file__
        assert result["file"] == here, f"the subprocess imported crestcore from {result['file']}, not {here}"
    return result


@pytest.mark.parametrize("name", MODULES + PRIVATE)
def test_module_doctests(name):
    result = _check(name)
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["failed"] == 0, (
        f"{result['failed']} of {result['attempted']} doctest examples of {name} failed:\n{result['report']}")


def test_public_callables_have_examples():
    for pending in sorted(PENDING):
        assert any(_under(m, (pending,)) for m in MODULES), f"PENDING names {pending}, which is no module"
    assert "crestcore.controller" in MODULES and "crestcore.adapters.torch" in MODULES, MODULES
    missing: set[str] = set()
    for name in MODULES:
        missing.update(_check(name).get("missing", ()))  # a skipped module (framework missing) has none
    assert not missing, (
        f"{len(missing)} public callables have no docstring example (add an 'Examples' section):\n  "
        + "\n  ".join(sorted(missing)))
