"""Render the docs' Mermaid diagrams to SVG: ``python tools/render_diagrams.py [--check]``.

Every fenced ``mermaid`` block in docs/**/*.md becomes
``docs/img/diagrams/<hash of its source>.svg``; SVGs no block names any more
are removed. ``--check`` renders nothing and exits 1 if an SVG is missing or
left over. The site shows these files (see ``tools/diagrams.py``); commit
them with the page.

It needs the Mermaid CLI and a Chromium, from Debian and npm:

    apt-get install chromium
    PUPPETEER_SKIP_DOWNLOAD=1 npm install -g @mermaid-js/mermaid-cli

(``$MMDC`` may name the ``mmdc`` to use, ``$CHROMIUM`` the browser). Labels
are drawn as SVG text, not HTML, so the files show the same in an ``<img>``
in any browser.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diagrams import DOCS, ROOT, SVG_DIR, Diagram, diagrams_of

MERMAID_CONFIG = {
    "theme": "default",
    "htmlLabels": False,
    "flowchart": {"htmlLabels": False},
    "fontFamily": "DejaVu Sans, Verdana, Arial, sans-serif",
}


def all_diagrams() -> list[tuple[Path, Diagram]]:
    return [
        (page, diagram)
        for page in sorted(DOCS.rglob("*.md"))
        for diagram in diagrams_of(page.read_text(encoding="utf-8"))
    ]


def find(env: str, *names: str) -> str:
    for name in (os.environ.get(env), *names):
        if name and shutil.which(name):
            return str(shutil.which(name))
    sys.exit(f"{names[0]} not found (set ${env}); see `python {Path(__file__).relative_to(ROOT)} --help`")


def render(diagram: Diagram, mmdc: str, chromium: str, work: Path) -> None:
    source = work / "diagram.mmd"
    source.write_text(diagram.source, encoding="utf-8")
    config = work / "config.json"
    config.write_text(json.dumps(MERMAID_CONFIG), encoding="utf-8")
    browser = work / "puppeteer.json"
    browser.write_text(json.dumps({"executablePath": chromium, "args": ["--no-sandbox"]}))
    out = work / "diagram.svg"
    subprocess.run(
        [mmdc, "--quiet", "-p", str(browser), "-c", str(config), "-b", "white",
         "-i", str(source), "-o", str(out)],
        check=True,
        timeout=120,
    )
    SVG_DIR.mkdir(parents=True, exist_ok=True)
    diagram.svg.write_text(with_own_size(out.read_text(encoding="utf-8")), encoding="utf-8")


def with_own_size(svg: str) -> str:
    """Give the SVG its drawing's size: Mermaid writes ``width="100%"``, which an ``<img>`` cannot size from."""
    root = re.search(r"<svg\b[^>]*>", svg)
    box = re.search(r'viewBox="[-\d.]+ [-\d.]+ ([\d.]+) ([\d.]+)"', root.group(0)) if root else None
    if root is None or box is None:
        raise ValueError("the Mermaid CLI wrote no <svg viewBox=...>")
    width, height = (round(float(v)) for v in box.groups())
    tag = re.sub(r'\swidth="[^"]*"', "", root.group(0))
    tag = re.sub(r'\sstyle="[^"]*"', "", tag)
    tag = tag.replace("<svg", f'<svg width="{width}" height="{height}"', 1)
    return svg[: root.start()] + tag + svg[root.end() :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/render_diagrams.py", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether the SVGs are up to date")
    parser.add_argument("--force", action="store_true", help="render every diagram again")
    args = parser.parse_args(argv)
    found = all_diagrams()
    wanted = {diagram.svg for _, diagram in found}
    stale = sorted(set(SVG_DIR.glob("*.svg")) - wanted)
    missing = [(page, d) for page, d in found if args.force or not d.svg.exists()]
    if args.check:
        for page, d in missing:
            print(f"{page.relative_to(ROOT)}:{d.first + 1}: not rendered ({d.svg.relative_to(ROOT)})")
        for path in stale:
            print(f"{path.relative_to(ROOT)}: no diagram uses it")
        return 1 if missing or stale else 0
    if missing:
        mmdc = find("MMDC", "mmdc")
        chromium = find("CHROMIUM", "chromium", "chromium-browser", "google-chrome")
        with tempfile.TemporaryDirectory(prefix="diagrams-") as work:
            for page, diagram in missing:
                render(diagram, mmdc, chromium, Path(work))
                print(f"{page.relative_to(ROOT)}:{diagram.first + 1} -> {diagram.svg.relative_to(ROOT)}")
    for path in stale:
        path.unlink()
        print(f"removed {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
