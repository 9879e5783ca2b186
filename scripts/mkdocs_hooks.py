"""mkdocs hook: the installed package's tree under build/apisrc (scripts/installed_tree.py), so
mkdocstrings documents ``crestcore.adapters.torch`` and friends under their import names without
importing anything."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doctest_fences import DoctestFencesExtension  # noqa: E402
from installed_tree import ROOT, lay_out  # noqa: E402

# at import: mkdocs loads hooks while it reads mkdocs.yml, before mkdocstrings checks its `paths`
lay_out(ROOT / "build" / "apisrc")


def on_config(config):
    """Doctest examples in the docstrings become code blocks (:mod:`doctest_fences`): appended to the
    configured extensions (the site's pages and mkdocstrings's docstrings share them)."""
    config.markdown_extensions.append(DoctestFencesExtension())
    return config
