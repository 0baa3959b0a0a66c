"""Every code example in the documentation runs, and the site's links hold.

Each page's fenced ``python`` blocks (docs/**/*.md and README.md) run in
order as one script in a fresh interpreter, in a temporary directory, under a
timeout; the test asserts exit status 0. The script keeps the page's line
numbers (everything that is not a runnable block becomes a blank line), so a
traceback's ``line N`` is line N of the Markdown file.

Two conventions for examples that are not plain scripts:

* a block whose fence carries ``title="name.py"`` is a file of the example
  (a module the script imports): it is written to the temporary directory
  under that name instead of being run;
* a block preceded by a ``<!-- no-test -->`` line is shown but not run; keep
  these for what cannot run here (a Dask cluster's address, a server that
  never ends);
* a block preceded by ``<!-- requires: pebble -->`` shows another library's
  code (the "before" of a migration guide); it runs where that library is
  installed (``pip install ".[bench]"``) and is left out, with a warning
  that names it, where it is not.

Blocks in ``py``/``python3`` are refused so that no example escapes the run
by its fence's spelling; use ``pycon``, ``text`` or ``console`` for output.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGE_TIMEOUT = 240  # seconds for one page's examples, all together
NO_TEST = "<!-- no-test -->"
_REQUIRES = re.compile(r"^<!--\s*requires:\s*([\w., ]+?)\s*-->$")

_FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$")
_TITLE = re.compile(r"""title=["']([^"']+)["']""")
_REFUSED_LANGUAGES = {"py", "python3", "py3"}


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    path: Path
    start: int  # 1-based line number of the first code line
    language: str
    title: str | None
    skipped: bool
    requires: tuple[str, ...]  # modules the block needs besides poolkit's own dependencies
    code: list[str]  # dedented lines, without newlines

    @property
    def missing(self) -> list[str]:
        return [name for name in self.requires if importlib.util.find_spec(name) is None]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.start - 1}"


def pages() -> list[Path]:
    found = sorted(DOCS.rglob("*.md"))
    if README.exists():
        found.append(README)
    return found


def blocks_of(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE_OPEN.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence, info = match.group("indent"), match.group("fence"), match.group("info")
        language = info.split()[0].strip("{}.") if info.split() else ""
        title_match = _TITLE.search(info)
        previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        code: list[str] = []
        j = i + 1
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        while j < len(lines) and not closing.match(lines[j]):
            line = lines[j]
            code.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        if j >= len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: code fence never closed")
        out.append(
            Block(
                path=path,
                start=i + 2,
                language=language,
                title=title_match.group(1) if title_match else None,
                skipped=previous == NO_TEST,
                requires=_requirements(previous),
                code=code,
            )
        )
        i = j + 1
    return out


def _requirements(line: str) -> tuple[str, ...]:
    match = _REQUIRES.match(line)
    if match is None:
        return ()
    return tuple(name for name in re.split(r"[,\s]+", match.group(1)) if name)


def script_of(path: Path, blocks: list[Block]) -> str:
    """The page's runnable blocks as one script, each code line at its line number in the page."""
    total = len(path.read_text(encoding="utf-8").splitlines())
    lines = [""] * total
    for block in blocks:
        if block.language != "python" or block.skipped or block.title is not None:
            continue
        if block.missing:
            warnings.warn(
                f"{block.where}: example not run, it needs {', '.join(block.missing)} "
                "(pip install '.[bench]')",
                stacklevel=2,
            )
            continue
        for offset, line in enumerate(block.code):
            lines[block.start - 1 + offset] = line
    return "\n".join(lines) + "\n"


def runnable_pages() -> list[Path]:
    return [
        page
        for page in pages()
        if any(
            b.language == "python" and not b.skipped and b.title is None for b in blocks_of(page)
        )
    ]


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ----------------------------------------------------------------- examples


@pytest.mark.timeout(PAGE_TIMEOUT + 60)
@pytest.mark.parametrize("page", runnable_pages(), ids=_page_id)
def test_examples_of_page_run(page: Path, tmp_path: Path) -> None:
    blocks = blocks_of(page)
    for block in blocks:
        if block.language == "python" and block.title is not None and not block.skipped:
            target = tmp_path / block.title
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("\n".join(block.code) + "\n", encoding="utf-8")
    script = tmp_path / f"{page.stem}_md.py"
    script.write_text(script_of(page, blocks), encoding="utf-8")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # poolkit comes from the installed package, as for a user
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    try:
        done = subprocess.run(
            [sys.executable, script.name],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PAGE_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"the examples of {_page_id(page)} did not finish in {PAGE_TIMEOUT} s\n"
            f"stdout:\n{exc.stdout}\nstderr:\n{exc.stderr}"
        )
    assert done.returncode == 0, (
        f"the examples of {_page_id(page)} failed (exit {done.returncode}); line numbers in the "
        f"traceback are lines of {page.name}\nstdout:\n{done.stdout[-4000:]}\n"
        f"stderr:\n{done.stderr[-6000:]}"
    )


def test_every_page_with_python_has_runnable_examples() -> None:
    """The parser finds the examples at all (a broken parser would pass every page)."""
    found = {page.name for page in runnable_pages()}
    for name in ("README.md", "quickstart.md", "concepts.md", "recipes.md", "multiprocessing.md"):
        assert name in found


@pytest.mark.parametrize("page", pages(), ids=_page_id)
def test_no_example_hides_behind_its_fence(page: Path) -> None:
    for block in blocks_of(page):
        assert block.language not in _REFUSED_LANGUAGES, (
            f"{block.where}: write ```python (it is run by the tests), or pycon/text for output"
        )


def test_skipped_examples_stay_few() -> None:
    """``<!-- no-test -->`` is for what cannot run here, not for examples that fail."""
    skipped = [b.where for page in pages() for b in blocks_of(page) if b.skipped]
    assert len(skipped) <= 4, skipped


# ----------------------------------------------------------------- README


def test_readme_starts_with_the_two_commands() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# poolkit")
    body = [line for line in lines[1:] if line.strip()]
    assert body[:6] == [
        "```",
        "pip install . && poolkit demo",
        "```",
        "```",
        'pip install ".[test]" && python -m pytest',
        "```",
    ]


# ----------------------------------------------------------------- links

_LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.mark.parametrize("page", pages(), ids=_page_id)
def test_relative_links_point_to_files(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code are not links
    for target in _LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        file_part = target.split("#", 1)[0]
        assert (page.parent / file_part).exists(), f"{_page_id(page)}: broken link {target!r}"


def test_nav_names_only_existing_pages() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = re.findall(r"^\s+- (?:[^:\n]+: )?(\S+\.md)\s*$", config, flags=re.M)
    assert "index.md" in nav
    missing = [name for name in nav if not (DOCS / name).exists()]
    assert not missing, f"mkdocs.yml names pages that do not exist: {missing}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_site_builds_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict``: no warning, no broken link or anchor, the API reference resolves."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()


def test_every_diagram_is_rendered_and_no_rendering_is_left_over() -> None:
    """The site shows each ```mermaid block as its SVG (tools/diagrams.py): none missing, none stale."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "render_diagrams.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, (
        f"diagrams out of date; run `python tools/render_diagrams.py`:\n{done.stdout}{done.stderr}"
    )
