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
  installed (``pip install ".[bench]"``).

CI installs the ``docs`` and ``bench`` extras (``.ci/run``), so there every
example runs and the site is built: a missing library fails the test. On a
machine without them (``pip install ".[test]"`` only), an example that needs
one is left out with a warning naming it, and the site build and the API
checks are skipped, unless ``POOLKIT_DOCS_REQUIRED=1`` asks for CI's rule.

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
# CI (and whoever asks) runs everything the docs show: nothing may be left out for a missing extra.
REQUIRED = any(
    os.environ.get(name, "").lower() not in ("", "0", "false", "no")
    for name in ("CI", "POOLKIT_DOCS_REQUIRED")
)
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


def require(module: str, extra: str) -> None:
    """Skip without ``module`` (from the ``extra``), except where everything is required (CI)."""
    top = importlib.util.find_spec(module.split(".")[0])
    if top is not None and importlib.util.find_spec(module) is not None:
        return
    if REQUIRED:
        pytest.fail(f"{module} is not installed; CI installs it with pip install '.[{extra}]'")
    pytest.skip(f"needs {module}: pip install '.[{extra}]'")


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
            if REQUIRED:
                pytest.fail(
                    f"{block.where}: example needs {', '.join(block.missing)}, which is not "
                    "installed; CI installs it with pip install '.[docs,bench]'"
                )
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
    for module in ("mkdocs", "mkdocstrings_handlers.python", "material"):
        require(module, "docs")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    site = tmp_path / "site"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    # What a reader must never see: Sphinx roles the Markdown renderer shows raw, private
    # names in signatures, Mermaid source instead of a diagram, anything fetched from a CDN.
    for raw in (":class:`", ":meth:`", ":func:`", ":attr:`", ":exc:`", "_batch.", "_Submits"):
        assert raw not in api, f"the API reference shows {raw!r}"
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "flowchart " not in text and "stateDiagram" not in text, f"{page}: Mermaid source"
        for host in ("unpkg.com", "cdn.jsdelivr", "fonts.googleapis", "fonts.gstatic"):
            assert host not in text, f"{page.relative_to(site)} loads from {host}"


API_ROLE = re.compile(r":(class|meth|func|attr|exc|mod|data|obj):`")


def api_objects() -> list[tuple[str, dict[str, str]]]:
    """The objects docs/api.md renders (``::: path``), with their per-object options."""
    found: list[tuple[str, dict[str, str]]] = []
    for line in (DOCS / "api.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("::: "):
            found.append((line[4:].strip(), {}))
        elif found and re.match(r"^\s{6}\w+: ", line):
            key, value = line.strip().split(": ", 1)
            found[-1][1][key] = value
    return found


def test_the_api_reference_documents_every_parameter_in_one_style() -> None:
    """Each object the API page renders, and each public method of a class there, documents
    every parameter in its Google-style ``Args:``, and no docstring uses a Sphinx role."""
    require("griffe", "docs")
    import griffe

    package = griffe.load("poolkit", search_paths=[str(ROOT)], docstring_parser="google")
    problems: list[str] = []

    def documented(*docstrings: object) -> set[str]:
        names: set[str] = set()
        for docstring in docstrings:
            if docstring is None:
                continue
            for section in docstring.parse("google"):  # type: ignore[attr-defined]
                if section.kind.value in ("parameters", "other parameters", "attributes"):
                    names |= {item.name.lstrip("*") for item in section.value}
        return names

    def check(obj: object, where: str, parameters: list[object], *docstrings: object) -> None:
        for docstring in docstrings:
            if docstring is not None and API_ROLE.search(docstring.value):  # type: ignore[attr-defined]
                problems.append(f"{where}: a Sphinx role")
        have = documented(*docstrings)
        names = [p.name for p in parameters if p.name not in ("self", "cls")]  # type: ignore[attr-defined]
        missing = [name for name in names if name not in have]
        if missing:
            problems.append(f"{where}: parameters not documented: {missing}")

    for path, options in api_objects():
        obj = package[path.removeprefix("poolkit.")] if path != "poolkit" else package
        obj = obj.final_target if obj.is_alias else obj
        if obj.is_function:
            check(obj, path, list(obj.parameters), obj.docstring)
            continue
        if not obj.is_class:
            continue
        init = obj.members.get("__init__")
        init = init.final_target if init is not None and init.is_alias else init
        if init is not None and options.get("merge_init_into_class") != "false":
            check(obj, path, list(init.parameters), obj.docstring, init.docstring)
        for name, member in obj.all_members.items():
            if name.startswith("_"):
                continue
            member = member.final_target if member.is_alias else member
            if member.is_function:
                check(member, f"{path}.{name}", list(member.parameters), member.docstring)
    assert not problems, "\n".join(problems)


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
