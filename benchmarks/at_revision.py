"""A module of this checkout as it was at a git revision, loaded next to the working tree's, for the
side-by-side benchmarks (``numba_fused_ab.py``, ``minibatch_ab.py``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_at(rev: str, path: str, name: str, package: str, edit: Callable[[str], str] | None = None):
    """The file ``path`` (relative to the checkout) at ``rev``, imported as the module ``name`` of ``package``
    (so its relative imports resolve to the working tree's modules); ``edit`` rewrites its source first."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True,
                         text=True).stdout
    file = Path(tempfile.mkdtemp()) / (name.rsplit(".", 1)[-1] + ".py")
    file.write_text(edit(src) if edit is not None else src)
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = package
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod
