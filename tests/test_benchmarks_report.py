"""The published figures are what the harness wrote: docs/benchmarks.md and the figures of
docs/choosing.md are rendered from benchmarks/results/, and stay readable.

Rendering measures nothing (``python -m benchmarks.report``), so these tests
are quick and need no peer installed; the plots (matplotlib) are not compared.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent
RERENDER = "run `python -m benchmarks.report` and commit what it writes"


@pytest.fixture(scope="module")
def latest() -> dict:
    return json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text())


def tables_of(text: str) -> list[list[str]]:
    """Each Markdown table of a page, as its lines."""
    tables: list[list[str]] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def columns(row: str) -> int:
    return len(re.split(r"(?<!\\)\|", row.strip().strip("|")))


def test_the_benchmarks_page_is_rendered_from_the_results(latest: dict) -> None:
    expected = report.render_markdown(latest, report.load_extras())
    assert (ROOT / "docs" / "benchmarks.md").read_text() == expected, RERENDER


def test_the_figures_of_choosing_are_rendered_from_the_results(latest: dict) -> None:
    page = (ROOT / "docs" / "choosing.md").read_text()
    start, end = page.index(report.FIGURES_START), page.index(report.FIGURES_END)
    shown = page[start : end + len(report.FIGURES_END)]
    assert shown == "\n".join(report.render_choosing_figures(latest)), RERENDER


def test_every_plot_the_page_shows_is_there_and_links_to_itself(latest: dict) -> None:
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    images = re.findall(r"\[!\[[^\]]*\]\((img/[^)]+)\)\]\((img/[^)]+)\)", page)
    assert {image for image, _ in images} >= {f"img/bench_{key}.png" for key in latest["scenarios"]}
    for image, link in images:
        assert image == link, "a plot links to its full-size image"
        assert (ROOT / "docs" / image).stat().st_size > 0


@pytest.mark.parametrize("name", ["benchmarks.md", "choosing.md"])
def test_no_table_is_wider_than_a_screen(name: str) -> None:
    """At 1,280 px a table of more than 7 columns scrolls its last columns out of sight."""
    for table in tables_of((ROOT / "docs" / name).read_text()):
        assert columns(table[0]) <= 7, f"{name}: a table of {columns(table[0])} columns: {table[0]}"


def test_the_benchmarks_page_states_its_marks_and_where_they_come_from() -> None:
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert "peer-figures" not in page
    assert "## poolkit's goals, checked against this run" in page
    assert "the poolkit project's own goals" in page


def test_every_peer_appears_in_exactly_one_group(latest: dict) -> None:
    peers = latest["meta"]["peers"]
    groups = report.peer_groups(peers)
    others = [p for _, group in groups for p in group if p != "poolkit"]
    assert sorted(others) == sorted(p for p in peers if p != "poolkit")
    assert all(group[0] == "poolkit" and len(group) <= report.MAX_PEER_COLUMNS for _, group in groups)
