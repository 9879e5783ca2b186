"""Lay the package out as it installs (crestcore/ with adapters/, backends/ and apps/ inside: the
setuptools package-dir mapping) under a folder of symlinks, for tools that read the source by path
(mypy, mkdocstrings) and would otherwise not find ``crestcore.adapters`` and friends."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = ("adapters", "backends", "apps")  # crestcore.<name> lives in <name>/ at the top level


def lay_out(dest: Path) -> Path:
    """``dest/crestcore`` as the installed tree (symlinks into the checkout); returns it."""
    tree = Path(dest) / "crestcore"
    if Path(dest).exists():
        shutil.rmtree(dest)
    tree.mkdir(parents=True)
    for src in (ROOT / "crestcore").iterdir():
        if src.name != "__pycache__":
            (tree / src.name).symlink_to(src, target_is_directory=src.is_dir())
    for name in MAPPED:
        (tree / name).symlink_to(ROOT / name, target_is_directory=True)
    return tree
