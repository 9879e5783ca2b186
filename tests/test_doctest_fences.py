"""The documentation site's Markdown extension (scripts/doctest_fences.py): a docstring's doctest examples
render as code blocks. Without it the API pages showed each ``>>>`` line as nested block quotes run into one
paragraph, and took an example's ``[...]`` output for cross-references, which ``mkdocs build --strict``
refused (review 95: 17 such warnings, hidden by ``mkdocs build -q``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

markdown = pytest.importorskip("markdown")
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
if not (SCRIPTS / "doctest_fences.py").is_file():  # the tests copied beside an installed wheel
    pytest.skip("the documentation tooling lives in the source checkout's scripts/", allow_module_level=True)
sys.path.insert(0, str(SCRIPTS))
from doctest_fences import DoctestFences, DoctestFencesExtension  # noqa: E402

DOC = """Summary line.

Examples
--------
>>> s = {"counters": {"steps": 3}}
>>> s["counters"]["steps"], [0, 3]
(3, [0, 3])

Prose after it, with ``code``.
"""


def test_an_example_up_to_the_blank_line_becomes_one_fenced_block():
    lines = DoctestFences(None).run(DOC.splitlines())
    start, end = lines.index("```pycon"), len(lines) - 1 - lines[::-1].index("```")
    assert lines[start + 1:end] == [">>> s = {\"counters\": {\"steps\": 3}}", ">>> s[\"counters\"][\"steps\"], [0, 3]",
                                    "(3, [0, 3])"]
    assert lines[end + 1] == "" and lines[-1] == "Prose after it, with ``code``."


def test_the_rendered_example_is_code_not_quotes_or_references():
    html = markdown.markdown(DOC, extensions=["pymdownx.superfences", DoctestFencesExtension()])
    assert "<blockquote>" not in html
    assert html.count("<pre>") == 1 and html.count("&gt;&gt;&gt; </span>") == 2  # one block, both prompts
    assert "<span class=\"go\">(3, [0, 3])</span>" in html  # the expected output, inside it
    plain = markdown.markdown(DOC, extensions=["pymdownx.superfences"])
    assert "<blockquote>" in plain  # what the pages showed without it


def test_examples_inside_a_pages_own_code_blocks_and_an_unfinished_one_are_handled():
    fenced = ["```python", ">>> 1 + 1", "2", "```", "", "    >>> x = 1"]
    assert DoctestFences(None).run(fenced) == fenced[:5] + ["    ```pycon", "    >>> x = 1", "    ```"]
