"""The floors import only downwards: apps -> adapters -> crestcore -> backends (docs/design.md).

Every module's imports are read with ``ast``: top-level and lazy ones (inside functions, branches, ``try``),
relative imports resolved to absolute names, and ``importlib.import_module("...")`` / ``__import__("...")``
calls with a literal name. A computed name with a literal dotted prefix (``f"crestcore.backends.{name}"``,
the dispatch's) is read as a module under that prefix; one without cannot be checked, so it is itself a
violation unless :data:`DYNAMIC_ALLOWED` names it. The rules:

* ``crestcore/`` (the method) imports no framework or JIT, nor ``crestcore.adapters`` / ``crestcore.apps``;
  it reaches the kernels only through the package ``crestcore.backends`` (whose dispatch imports the
  module by name), never a backend module directly;
* ``backends/`` imports neither floor above it, and from the core only :data:`BACKENDS_MAY_IMPORT`;
* ``adapters/`` does not import ``crestcore.apps``;
* ``adapters/`` and ``apps/`` use the core's public modules only (no ``crestcore._validation`` and the
  like: what they need is public, e.g. ``crestcore.validation`` and ``crestcore.plan``).

The folders are the repository's when this file sits in its ``tests/`` (next to ``crestcore/``,
``backends/``, ``adapters/``, ``apps/``); otherwise (the tests copied alone, run against an installed
wheel) they are the installed package's ``crestcore/`` and its ``backends/``, ``adapters/``, ``apps/``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

FLOORS = ("crestcore", "backends", "adapters", "apps")
PACKAGE = {"crestcore": "crestcore", "backends": "crestcore.backends", "adapters": "crestcore.adapters",
           "apps": "crestcore.apps"}

# frameworks, JITs and their companions: only backends/, adapters/ and apps/ may import them
HEAVY = ("torch", "keras", "jax", "jaxlib", "cupy", "numba", "llvmlite", "lightning", "pytorch_lightning",
         "transformers", "accelerate", "tensorflow", "faiss")

# What backends/ may import from the core (crestcore.* outside crestcore.backends). Today: nothing; the
# kernels restate the few constants they share with crestcore.similarity. The plan is a single contract
# module (the kernels' names, signatures and shared constants) that the backends import; name it here then.
BACKENDS_MAY_IMPORT: frozenset[str] = frozenset()

# Imports whose name is computed with no literal package prefix, each allowed in one function of one
# module as (module, function). None today: the dispatch in crestcore.backends (backend_module and the
# like) imports f"crestcore.backends.{name}", read as a module inside crestcore.backends.
DYNAMIC_ALLOWED: set[tuple[str, str | None]] = set()

COMPUTED = "<computed>"  # the last part of a module name computed at run time


@dataclass(frozen=True)
class Import:
    line: int
    name: str | None  # absolute module name (ending in COMPUTED when only its prefix is literal); None if computed
    function: str | None  # the innermost enclosing function, None at module level


def _is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _private_core(name: str) -> bool:
    """A private module of the core or the backends (a name part starting with "_"), not a floor above."""
    parts = name.split(".")
    if parts[0] != "crestcore" or len(parts) < 2 or parts[1] in ("adapters", "apps"):
        return False
    return any(p.startswith("_") and p != COMPUTED and not p.startswith("__") for p in parts[1:])


def _reaches(name: str, prefix: str) -> bool:
    """Whether importing ``name`` may import ``prefix`` or a module under it (a name computed under package
    B may be any module under B, so it reaches ``prefix`` when either holds the other)."""
    if name.endswith("." + COMPUTED):
        base = name[: -len(COMPUTED) - 1]
        return _is_under(base, prefix) or _is_under(prefix, base)
    return _is_under(name, prefix)


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(parts) - 1:
        raise ValueError(f"relative import beyond the top-level package in {module}")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([target] if target else []))


class _Reader(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: frozenset[str]):
        self.module, self.is_package, self.known = module, is_package, known
        self.found: list[Import] = []
        self._functions: list[str] = []
        self._callees = {"import_module", "__import__"}  # plus what `from importlib import import_module as x` binds

    def _add(self, node, name):
        self.found.append(Import(node.lineno, name, self._functions[-1] if self._functions else None))

    def _function(self, node):
        self._functions.append(node.name)
        self.generic_visit(node)
        self._functions.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Import(self, node):
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node):
        base = (_resolve_relative(self.module, self.is_package, node.level, node.module) if node.level
                else node.module)
        self._add(node, base)
        if base == "importlib":
            self._callees.update(a.asname or a.name for a in node.names if a.name == "import_module")
        for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
            if f"{base}.{alias.name}" in self.known:
                self._add(node, f"{base}.{alias.name}")

    def visit_Call(self, node):
        f = node.func
        callee = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if callee in self._callees:
            arg = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
            package = next((k.value for k in node.keywords if k.arg == "package"), None)
            if callee != "__import__" and package is None and len(node.args) > 1:
                package = node.args[1]
            name = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else _prefix(arg)
            if name is not None and name.startswith("."):  # import_module("..x", package="a.b")
                if isinstance(package, ast.Constant) and isinstance(package.value, str):
                    level = len(name) - len(name.lstrip("."))
                    name = _resolve_relative(package.value, True, level, name.lstrip(".") or None)
                else:
                    name = None
            self._add(node, name)
        self.generic_visit(node)


def _prefix(arg) -> str | None:
    """``"pkg.sub.<computed>"`` for ``f"pkg.sub.{x}"`` or ``"pkg.sub." + x``; None for a name with no literal
    dotted prefix."""
    if isinstance(arg, ast.JoinedStr) and arg.values:
        head = arg.values[0]
    elif isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Add):
        head = arg.left
    else:
        return None
    text = head.value if isinstance(head, ast.Constant) and isinstance(head.value, str) else ""
    if text.startswith(".") or "." not in text:
        return None
    return text[: text.rindex(".")] + "." + COMPUTED


def read_imports(source: str, module: str, *, is_package: bool = False,
                 known: frozenset[str] = frozenset()) -> list[Import]:
    """Every import in ``source`` (the code of ``module``), in line order. ``known``: the project's module
    names, to tell ``from pkg import mod`` (a module) from ``from pkg import name``."""
    reader = _Reader(module, is_package, known)
    reader.visit(ast.parse(source))
    return sorted(reader.found, key=lambda i: i.line)


def violations(floor: str, module: str, imports: list[Import]) -> list[tuple[int, str]]:
    """``(line, reason)`` for each line of ``module`` (in ``floor``) with an import that breaks the layering
    (one per line: ``from pkg import mod`` imports pkg and pkg.mod, the more specific one is named)."""
    out = []
    for imp in sorted(imports, key=lambda i: (i.line, -len(i.name or ""))):
        if out and out[-1][0] == imp.line:
            continue
        name = imp.name
        if name is None:
            if (module, imp.function) not in DYNAMIC_ALLOWED:
                out.append((imp.line, "imports a computed module name, which this check cannot read "
                                      "(allow it in DYNAMIC_ALLOWED if it stays inside the rules)"))
            continue
        if floor in ("crestcore", "backends", "adapters") and _reaches(name, "crestcore.apps"):
            out.append((imp.line, f"imports {name}: nothing below the applications floor imports crestcore.apps"))
        elif floor in ("adapters", "apps") and _private_core(name):
            out.append((imp.line, f"imports {name}: a private module of the core (use its public API, e.g. "
                                  "crestcore.validation, crestcore.plan)"))
        elif floor in ("crestcore", "backends") and _reaches(name, "crestcore.adapters"):
            out.append((imp.line, f"imports {name}: the adapters sit above {PACKAGE[floor]}"))
        elif floor == "crestcore" and any(_reaches(name, h) for h in HEAVY):
            out.append((imp.line, f"imports {name}: the core is framework-free (its kernels live in "
                                  "crestcore.backends, its glue in crestcore.adapters)"))
        elif floor == "crestcore" and name != "crestcore.backends" and _reaches(name, "crestcore.backends"):
            out.append((imp.line, f"imports {name}: the core reaches the kernels only through crestcore.backends "
                                  "(get_kernel / backend_module)"))
        elif (floor == "backends" and _reaches(name, "crestcore") and not _is_under(name, "crestcore.backends")
              and name not in BACKENDS_MAY_IMPORT):
            out.append((imp.line, f"imports {name}: the backends may import only {sorted(BACKENDS_MAY_IMPORT)} "
                                  "from the core (BACKENDS_MAY_IMPORT)"))
    return out


# ---------------------------------------------------------------------------------------------------
# the project's folders
# ---------------------------------------------------------------------------------------------------


def floor_folders() -> dict[str, Path]:
    """The four floors' folders: the repository's if these tests sit in its tests/, else the installed
    package's."""
    root = Path(__file__).resolve().parent.parent
    if all((root / f / "__init__.py").is_file() for f in FLOORS) and (root / "pyproject.toml").is_file():
        return {f: root / f for f in FLOORS}
    import crestcore

    pkg = Path(crestcore.__file__).resolve().parent
    return {"crestcore": pkg, "backends": pkg / "backends", "adapters": pkg / "adapters", "apps": pkg / "apps"}


@dataclass(frozen=True)
class Module:
    floor: str
    name: str
    path: Path
    is_package: bool


def project_modules() -> list[Module]:
    folders = floor_folders()
    missing = [f"{f} ({p})" for f, p in folders.items() if not (p / "__init__.py").is_file()]
    assert not missing, f"floors not found: {', '.join(missing)}"
    # in an installed wheel the other floors are subfolders of crestcore/: they are not the core's
    nested = {p.resolve() for f, p in folders.items() if f != "crestcore"}
    out = []
    for floor, folder in folders.items():
        for path in sorted(folder.rglob("*.py")):
            if floor == "crestcore" and any(d.resolve() in nested for d in path.parents):
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            out.append(Module(floor, ".".join([PACKAGE[floor], *parts]), path, is_package))
    return out


@pytest.fixture(scope="module")
def modules() -> list[Module]:
    return project_modules()


def _imports(mod: Module, known: frozenset[str]) -> list[Import]:
    return read_imports(mod.path.read_text(encoding="utf-8"), mod.name, is_package=mod.is_package, known=known)


def test_every_floor_is_found(modules):
    names = {m.name for m in modules}
    for anchor in ("crestcore", "crestcore.facility", "crestcore.baselines._craig", "crestcore.backends",
                   "crestcore.backends.numba", "crestcore.adapters.torch", "crestcore.apps.cli",
                   "crestcore.apps.train_demo"):
        assert anchor in names, f"{anchor} not found in {floor_folders()}"
    by_floor = {m.name: m.floor for m in modules}
    assert by_floor["crestcore.backends.numba"] == "backends" and by_floor["crestcore.facility"] == "crestcore"
    assert by_floor["crestcore.apps.cli"] == "apps" and by_floor["crestcore.adapters.torch"] == "adapters"


def test_the_floors_import_only_downwards(modules):
    known = frozenset(m.name for m in modules)
    bad = []
    for mod in modules:
        for line, reason in violations(mod.floor, mod.name, _imports(mod, known)):
            bad.append(f"{mod.path}:{line}: {mod.name} {reason}")
    assert not bad, "layering violations (docs/design.md):\n" + "\n".join(bad)


def test_the_reader_sees_the_projects_own_imports(modules):
    """The check reads the real code as intended: the core's lazy import of the dispatch, a relative import
    resolved, the backends' computed import found and allowed, an adapter's import of the core."""
    known = frozenset(m.name for m in modules)
    by_name = {m.name: m for m in modules}
    facility = _imports(by_name["crestcore.facility"], known)
    assert any(i.name == "crestcore.backends" and i.function == "_kernel" for i in facility)  # lazy, absolute
    assert any(i.name == "crestcore._reference_kernels" and i.function is None for i in facility)  # from . import
    dispatch = _imports(by_name["crestcore.backends"], known)
    assert any(i.name == f"crestcore.backends.{COMPUTED}" and i.function == "_import_kernels" for i in dispatch)
    assert not [i for i in dispatch if i.name is None]
    assert any(i.name == "crestcore.controller" for i in _imports(by_name["crestcore.adapters.torch"], known))


# ---------------------------------------------------------------------------------------------------
# the check can fail: synthetic modules
# ---------------------------------------------------------------------------------------------------

KNOWN = frozenset({"crestcore", "crestcore.backends", "crestcore.backends.numba", "crestcore.similarity",
                   "crestcore.apps", "crestcore.apps.cli", "crestcore.adapters", "crestcore.adapters.torch"})


def _check(floor, module, source, *, is_package=False):
    return violations(floor, module, read_imports(source, module, is_package=is_package, known=KNOWN))


def test_a_lazy_framework_import_in_the_core_is_reported():
    src = "import math\n\n\ndef helper(x):\n    if x:\n        import torch.nn as nn\n    return math.pi\n"
    bad = _check("crestcore", "crestcore.fake", src)
    assert [line for line, _ in bad] == [6] and "torch.nn" in bad[0][1]


def _on(floor: str, source: str, *expected, module: str | None = None) -> tuple:
    """A row of the tables below: ``source`` as a synthetic module on ``floor`` (named
    ``<the floor's package>.fake`` unless ``module`` says otherwise), then the ``expected`` values."""
    return (floor, module or f"{PACKAGE[floor]}.fake", source, *expected)


def _import_module_call(args: str) -> str:
    """A module's source: ``import importlib``, then ``importlib.import_module(<args>)`` on line 2."""
    return f"import importlib\nimportlib.import_module({args})\n"


@pytest.mark.parametrize("floor, module, source, line, what", [
    # relative imports resolved against the module's package
    _on("adapters", "def f():\n    from ..apps import cli\n", 2, "crestcore.apps.cli"),
    _on("crestcore", "from .adapters.torch import CrestLoader\n", 1, "crestcore.adapters.torch"),
    _on("crestcore", "from .. import apps\n", 1, "crestcore.apps", module="crestcore.baselines.fake"),
    # a backend module named directly, bypassing the dispatch
    _on("crestcore", "from .backends import numba\n", 1, "crestcore.backends.numba"),
    _on("crestcore", "from crestcore.backends.numba import greedy_batched\n", 1, "crestcore.backends.numba"),
    # literal importlib / __import__ calls
    _on("crestcore", "import importlib\nx = importlib.import_module('numba')\n", 2, "numba"),
    _on("crestcore", "def f():\n    return __import__('cupy')\n", 2, "cupy"),
    _on("crestcore", "from importlib import import_module as im\n\n\ndef f():\n    return im('jax.numpy')\n", 5,
        "jax.numpy"),
    _on("adapters", _import_module_call("'.cli', 'crestcore.apps'"), 2, "crestcore.apps.cli"),
    # the backends reach into the core, or above it
    _on("backends", "from ..similarity import pairwise_distances\n", 1, "crestcore.similarity"),
    _on("backends", "import crestcore\n", 1, "crestcore"),
    _on("backends", "def f():\n    import crestcore.adapters.torch\n", 2, "crestcore.adapters.torch"),
    # a computed name under a literal prefix that may reach a forbidden module
    _on("crestcore", _import_module_call("f'crestcore.backends.{n}'"), 2, "crestcore.backends.<computed>"),
    _on("adapters", _import_module_call("'crestcore.' + n"), 2, "crestcore.<computed>"),
    _on("crestcore", _import_module_call("f'torch.{n}'"), 2, "torch.<computed>"),
    # the adapters and the applications use the core's public modules
    _on("adapters", "from crestcore._validation import host_indices\n", 1, "crestcore._validation"),
    _on("apps", "def f():\n    from crestcore.baselines._gradmatch import _omp\n", 2, "crestcore.baselines._gradmatch"),
    # a computed name this check cannot read
    _on("adapters", "import importlib\nname = 'x'\nimportlib.import_module(name)\n", 3, "computed"),
    _on("backends", "import importlib\n\n\ndef backend_module(n):\n    return importlib.import_module(n)\n", 5, "computed"),
])
def test_each_rule_reports(floor, module, source, line, what):
    bad = _check(floor, module, source)
    assert len(bad) == 1 and bad[0][0] == line and what in bad[0][1], bad


@pytest.mark.parametrize("floor, module, source, is_package", [
    _on("crestcore", "from .backends import get_kernel\nimport numpy as np\n", False),
    _on("crestcore", "from . import similarity\nfrom .backends import backend_module\n", True, module="crestcore"),
    _on("backends", "from . import numba\nimport torch\nimport cupy as cp\n", False),
    _on("adapters", "import torch\nfrom crestcore.backends import get_kernel\nfrom .torch import CrestLoader\n", False),
    _on("apps", "from crestcore.adapters.torch import CrestLoader\nimport keras\n", False),
    _on("adapters", "from crestcore.validation import host_indices\nfrom crestcore.adapters.torch import _Fetcher\n",
        False),
    _on("backends", "import importlib\n\n\ndef backend_module(n):\n"
                    "    return importlib.import_module(f'crestcore.backends.{n}')\n", True, module="crestcore.backends"),
    _on("backends", "import importlib\n\n\ndef other(n):\n"
                    "    return importlib.import_module('crestcore.backends.' + n)\n", True, module="crestcore.backends"),
    _on("adapters", _import_module_call("f'crestcore.baselines.{n}'"), False),
])
def test_allowed_imports_are_not_reported(floor, module, source, is_package):
    assert _check(floor, module, source, is_package=is_package) == []


def test_every_name_the_benchmarks_import_from_the_project_exists():
    """Review 126: benchmarks/e2_select_path.py imported a helper the controller no longer has (inside main,
    so nothing failed until the script ran). Every ``from crestcore... import name`` in a benchmark script,
    at module level or inside a function, names something the module has."""
    import ast
    import importlib
    from pathlib import Path

    missing = []
    for path in sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("crestcore"):
                try:
                    module = importlib.import_module(node.module)
                except ImportError as exc:  # an optional framework missing here: not this test's concern
                    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("crestcore"):
                        missing.append(f"{path.name}: {node.module} ({exc})")
                    continue
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if a.name != "*" and not hasattr(module, a.name)
                            and not (hasattr(module, "__path__")  # a submodule of a package
                                     and importlib.util.find_spec(f"{node.module}.{a.name}") is not None)]
    assert not missing, missing
