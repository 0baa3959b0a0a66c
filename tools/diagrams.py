"""Mermaid diagrams in the docs, shown as SVG files rendered ahead of time.

The pages keep each diagram's Mermaid source in a fenced ``mermaid`` block
(where the text that explains it is, and where GitHub draws it too). The site
shows a pre-rendered SVG instead, so that a reader offline sees the diagram,
not its source, and the site loads no JavaScript from a CDN:

* ``python tools/render_diagrams.py`` renders every block to
  ``docs/img/diagrams/<hash of the source>.svg`` (committed);
* this module is also an MkDocs hook (``hooks:`` in mkdocs.yml): while the
  site builds, it replaces each block by a link to its SVG. A block whose SVG
  is missing (its source changed and nobody rendered it) stops the strict
  build with the command that renders it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SVG_DIR = DOCS / "img" / "diagrams"
RENDER_COMMAND = "python tools/render_diagrams.py"

_OPEN = re.compile(r"^```mermaid\s*$")
_CLOSE = re.compile(r"^```\s*$")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$")


class Diagram:
    """One ``mermaid`` block of a page: where it is, its source, its SVG."""

    def __init__(self, first: int, last: int, source: str, heading: str) -> None:
        self.first = first  # 0-based index of the opening fence line
        self.last = last  # 0-based index of the closing fence line
        self.source = source
        self.heading = heading  # the section it is in, for the image's alt text

    @property
    def svg(self) -> Path:
        digest = hashlib.sha256(self.source.encode("utf-8")).hexdigest()[:16]
        return SVG_DIR / f"{digest}.svg"


def diagrams_of(markdown: str) -> list[Diagram]:
    """The top-level ``mermaid`` blocks of a page, in order."""
    lines = markdown.splitlines()
    found: list[Diagram] = []
    heading = ""
    i = 0
    while i < len(lines):
        match = _HEADING.match(lines[i])
        if match:
            heading = match.group(1)
        if _OPEN.match(lines[i]):
            j = i + 1
            while j < len(lines) and not _CLOSE.match(lines[j]):
                j += 1
            if j == len(lines):
                raise ValueError(f"line {i + 1}: mermaid block never closed")
            body = "\n".join(line.rstrip() for line in lines[i + 1 : j]).strip() + "\n"
            found.append(Diagram(i, j, body, heading))
            i = j
        i += 1
    return found


def with_svgs(markdown: str, page_path: str) -> str:
    """The page with each ``mermaid`` block replaced by its SVG, linked to itself at full size.

    ``page_path`` is the page's path under docs/ (``concepts.md``), for
    relative links and for the error message.
    """
    diagrams = diagrams_of(markdown)
    if not diagrams:
        return markdown
    lines = markdown.splitlines()
    here = os.path.dirname(page_path)
    for diagram in reversed(diagrams):
        if not diagram.svg.exists():
            raise ValueError(
                f"docs/{page_path}:{diagram.first + 1}: the diagram has no rendered SVG "
                f"({diagram.svg.relative_to(ROOT)}); run `{RENDER_COMMAND}` and commit the SVG"
            )
        link = os.path.relpath(diagram.svg.relative_to(DOCS), here or ".").replace(os.sep, "/")
        alt = f"Diagram: {diagram.heading}" if diagram.heading else "Diagram"
        lines[diagram.first : diagram.last + 1] = [
            f'<figure class="diagram" markdown="span">[![{alt}]({link})]({link})</figure>'
        ]
    return "\n".join(lines) + ("\n" if markdown.endswith("\n") else "")


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """MkDocs hook: show each diagram as its pre-rendered SVG."""
    from mkdocs.exceptions import PluginError

    try:
        return with_svgs(markdown, page.file.src_uri)
    except ValueError as exc:
        raise PluginError(str(exc)) from exc
