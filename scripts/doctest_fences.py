"""A Markdown extension for the documentation site: doctest examples (a ``>>>`` line, its ``...``
continuations and its expected output, up to the next blank line, as doctest reads them) become fenced
``pycon`` code blocks. The API pages render the docstrings as Markdown (``docstring_style: null``), where
an example's ``>>>`` lines were nested block quotes run together into one paragraph and its ``[...]``
output was taken for cross-references (which ``mkdocs build --strict`` refuses)."""

from __future__ import annotations

from markdown import Extension
from markdown.preprocessors import Preprocessor

FENCES = ("```", "~~~")


class DoctestFences(Preprocessor):
    """Fences every doctest example outside the page's own fenced code blocks."""

    def run(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        fence = None  # the marker of the fenced block the line is in
        example = None  # the indentation of the doctest example the line is in
        for line in lines:
            text = line.lstrip()
            indent = line[: len(line) - len(text)]
            if example is not None:
                if text:
                    out.append(line)
                    continue
                out.append(example + "```")
                example = None
            elif fence is not None:
                if text.startswith(fence):
                    fence = None
            elif text.startswith(FENCES):
                fence = text[:3]
            elif text.startswith(">>>"):
                example = indent
                out.append(indent + "```pycon")
            out.append(line)
        if example is not None:
            out.append(example + "```")
        return out


class DoctestFencesExtension(Extension):
    def extendMarkdown(self, md) -> None:  # noqa: N802 (Python-Markdown's name)
        # before the fenced-code preprocessor (priority 25), which then takes these blocks as its own
        md.preprocessors.register(DoctestFences(md), "doctest_fences", 28)


def makeExtension(**kwargs) -> DoctestFencesExtension:  # noqa: N802 (Python-Markdown's entry point)
    return DoctestFencesExtension(**kwargs)
