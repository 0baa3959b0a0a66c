"""Turn the raw figures into docs/benchmarks.md, its plots in docs/img/, and the figures of docs/choosing.md.

    python -m benchmarks.report [--json benchmarks/results/latest.json]

re-renders all three from the committed JSON files without measuring
anything (after changing this module, or after ``benchmarks.overhead`` or
``benchmarks.respawn`` wrote new figures). In docs/choosing.md only the part
between ``FIGURES_START`` and ``FIGURES_END`` is written; the rest of that
page is prose.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from .harness import ROOT, format_value

RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"

POOLKIT_COLOR = "#d62728"
PEER_COLOR = "#4c72b0"
LIMIT_COLOR = "#b0b0b0"


# ---------------------------------------------------------------- cells


def cell(scenario: str, entry: dict[str, Any], unit: str) -> str:
    """The text of one result cell: a median, or what happened instead."""
    status = entry["status"]
    if status == "n/a":
        return "n/a"
    if status in ("hang", "timeout"):
        if "expected" in entry and "good" in entry:
            return f"{status}, {entry['good']} good"
        if entry.get("rate_so_far") and entry.get("total"):
            return (f"{status} at {entry['answered']}/{entry['total']} "
                    f"(≈{format_value(entry['rate_so_far'])} {unit} until then)")
        if "answered" in entry:
            return f"{status} after {entry['answered']} jobs"
        return str(status)
    if status != "ok":
        return str(status)
    statuses = entry["statuses"]
    if "expected" in entry and entry.get("good", 0) < entry["expected"]:
        state = "pool broken" if not entry.get("usable_after", True) else "jobs lost"
        return f"{entry['good']}/{entry['expected']} good, {state}"
    text = format_value(entry["median"])
    if scenario == "S4":
        text = f"{entry['median']:.2f} s"
    others = [s for s in statuses if s != "ok"]
    if others:
        text += f" ({len(others)} of {len(statuses)} runs: {', '.join(sorted(set(others)))})"
    return text


def no_ratio_reason(data: dict[str, Any], scenario: str, peer: str) -> str:
    """Why there is no poolkit/peer ratio: which side did not complete, and how."""
    for who in (peer, "poolkit"):
        entry = data["summary"][scenario][who]
        prefix = "" if who == peer else "poolkit: "
        if entry["status"] != "ok":
            return prefix + str(entry["status"])
        if "expected" in entry and entry.get("good", 0) < entry["expected"]:
            return prefix + ("broke" if not entry.get("usable_after", True) else "lost jobs")
    return "not paired"


def ratio_cell(data: dict[str, Any], scenario: str, peer: str) -> str:
    ratio = data["ratios"].get(scenario, {}).get(peer)
    if ratio is None:
        return no_ratio_reason(data, scenario, peer)
    value = ratio["poolkit_over_peer"]
    text = f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return f"**{text}**" if ratio["poolkit_better"] else text


def advantage(data: dict[str, Any], scenario: str, peer: str) -> float | None:
    """How many times better poolkit did than this peer (>1: poolkit better)."""
    ratio = data["ratios"].get(scenario, {}).get(peer)
    if ratio is None:
        return None
    value = float(ratio["poolkit_over_peer"])
    return value if data["scenarios"][scenario]["higher_is_better"] else 1.0 / value


# ---------------------------------------------------------------- markdown

MAX_PEER_COLUMNS = 6  # poolkit and 5 others, plus the scenario: 7 columns fit a 1,280 px screen


def peer_groups(peers: list[str]) -> list[tuple[str, list[str]]]:
    """The peers in groups small enough for one table each: the standard library, then the rest.

    poolkit heads every group. A table with every peer has 11 columns, and
    at 1,280 px the last ones scroll out of sight.
    """
    others = [p for p in peers if p != "poolkit"]
    stdlib = [p for p in others if p.startswith("stdlib") or p == "mp-pool" or p == "limit"]
    libraries = [p for p in others if p not in stdlib]
    head = ["poolkit"] if "poolkit" in peers else []
    size = MAX_PEER_COLUMNS - len(head)
    groups: list[tuple[str, list[str]]] = []
    for title, members in (
        ("the standard library, and the hand-written reference", stdlib),
        ("the other libraries", libraries),
    ):
        for start in range(0, len(members), size):
            groups.append((title, head + members[start : start + size]))
    return groups or [("", head)]


def _header(columns: list[str]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def render_markdown(data: dict[str, Any], extras: dict[str, Any], img_prefix: str = "img/") -> str:
    meta = data["meta"]
    peers: list[str] = meta["peers"]
    scenarios = data["scenarios"]
    versions = meta["versions"]
    dirty = " plus uncommitted engine changes" if meta.get("poolkit_dirty") else ""
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python -m benchmarks {' '.join(meta['argv'])}`".rstrip() + f" on {meta['date']}; "
        "do not edit by hand (re-render with `python -m benchmarks.report`). "
        "What the figures mean for choosing a pool is on [Choosing a pool](choosing.md).",
        "",
        f"- Machine: {meta['cpu_model']}, {meta['cpus']} CPUs ({meta['cpus_usable']} usable), "
        f"{meta['memory_gib']} GiB, {meta['os']}. Shared with other work: load average "
        f"{meta['load_before'][0]:.2f} before, {meta['load_after'][0]:.2f} after.",
        f"- Python {meta['python']} ({meta['python_implementation']}); poolkit {versions.get('poolkit')} "
        f"at commit `{meta.get('poolkit_commit') or '?'}`{dirty}; "
        + ", ".join(
            f"{name} {version}" for name, version in versions.items() if name != "poolkit"
        )
        + ".",
        f"- {meta['workers']} workers; {meta['repeat']} repetition(s), profile `{meta['profile']}`, "
        f"each measurement in a fresh interpreter under a {meta['cap_s']:g} s cap; "
        f"the whole run took {meta['duration_s'] / 60:.1f} min.",
        "",
        ("Figures are medians over the repetitions. " if meta["repeat"] > 1
         else "Figures are from one repetition. ")
        + "The machine is small and shared, so "
        "absolute figures drift from run to run; compare within this page, by ratio. "
        "*hang*: no result for the last 5 s before the deadline (less in a quick run); *timeout*: still answering "
        "when the cap came, or no way to tell. A peer that hung, timed out or could not run "
        "a scenario (n/a) was not run again in later repetitions.",
        "",
        "Peers: " + "; ".join(f"`{peer}`: {_label(peer)}" for peer in peers) + ".",
        "",
        "## Results",
        "",
        "↑ higher is better, ↓ lower is better. S4's figure is the time until every one of "
        "its jobs has an outcome, given only where every good job came back.",
        "",
    ]
    for title, group in peer_groups(peers):
        if title:
            lines += [f"poolkit and {title}:", ""]
        lines += _header(["scenario", *group])
        for key, scenario in scenarios.items():
            arrow = "↑" if scenario["higher_is_better"] else "↓"
            row = [f"**{key}** {_short(key)} ({scenario['unit']} {arrow})"]
            row += [cell(key, data["summary"][key][peer], scenario["unit"]) for peer in group]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if data["ratios"]:
        lines += [
            "## poolkit / peer",
            "",
            "poolkit's figure divided by the peer's, per repetition, then the median. "
            "**Bold**: poolkit did better (a ratio above 1 for ↑ rows, below 1 for ↓ rows). "
            "A ratio is given only where both runs completed the scenario.",
            "",
        ]
        for title, group in peer_groups(peers):
            others = [p for p in group if p != "poolkit"]
            if not others:
                continue
            if title:
                lines += [f"poolkit against {title}:", ""]
            lines += _header(["scenario", *others])
            for key, scenario in scenarios.items():
                arrow = "↑" if scenario["higher_is_better"] else "↓"
                row = [f"**{key}** {_short(key)} {arrow}"] + [ratio_cell(data, key, p) for p in others]
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
        lines += _targets(data)
    lines += [
        "## Plots",
        "",
        "One plot per scenario, every peer; poolkit in red, the hand-written reference "
        "(`limit`) in grey. Click a plot for the full-size image.",
        "",
    ]
    for key in scenarios:
        image = f"{img_prefix}bench_{key}.png"
        lines += [f"[![{key} {_short(key)}: every peer]({image})]({image})", ""]
    if data["ratios"]:
        image = f"{img_prefix}bench_ratios.png"
        lines += [f"[![poolkit's advantage over each peer]({image})]({image})", ""]
    lines += _details(data)
    lines += _extras(extras)
    lines += [
        "## Scenarios",
        "",
        "| | what is measured | size |",
        "|---|---|---|",
    ]
    for key, scenario in scenarios.items():
        size = ", ".join(f"{k}={_size(v)}" for k, v in scenario["size"].items()) or "one job"
        lines.append(f"| {key} | {scenario['title']} | {size} |")
    lines += [
        "",
        "The code is in `benchmarks/` (`scenarios.py` says exactly what each one does, "
        "`peers.py` how each library is driven, `limit.py` is the reference pool). "
        f"Raw figures: `{meta.get('json', 'benchmarks/results/latest.json')}`.",
        "",
        "## Running it",
        "",
        "```sh",
        "pip install -e '.[bench]'",
        "python -m benchmarks                      # all scenarios and peers, 3 repetitions",
        "python -m benchmarks --quick              # about a minute, for a smoke test",
        "python -m benchmarks --only S1,S3 --peers poolkit,stdlib-forkserver --repeat 5",
        "python -m benchmarks.overhead             # logging on/off, writes results/overhead.json",
        "python -m benchmarks.respawn              # respawn times, writes results/respawn.json",
        "python -m benchmarks.report               # re-render this page, its plots and the",
        "                                          # figures of choosing.md from the JSON files",
        "```",
        "",
        "Each measurement runs as `python -m benchmarks.runner PEER SCENARIO` in a fresh "
        "interpreter and its own session, under the cap (`--cap`, default 60 s); whatever it "
        "leaves running is killed afterwards.",
        "",
    ]
    return "\n".join(lines)


_SHORT = {
    "S1": "no-op submits",
    "S2": "bulk map",
    "S3": "recycle every job",
    "S4": "crash storm",
    "S5": "cold start",
    "S6": "leaky jobs: peak RSS",
    "S7": "10 MiB payloads",
    "S8": "numpy arrays",
}


def _short(key: str) -> str:
    return _SHORT.get(key, "")


def _label(peer: str) -> str:
    from .peers import PEERS

    cls = PEERS.get(peer)
    return cls.label if cls is not None else peer


def _size(value: Any) -> str:
    if isinstance(value, int) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"{value // (1024 * 1024)} MiB"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def _targets(data: dict[str, Any]) -> list[str]:
    """poolkit's own goals per scenario, checked against this run.

    The goals are the poolkit project's, set when the harness was written from
    the peers' figures measured on this kind of machine; the page says so,
    and states each goal in full.
    """
    summary = data["summary"]

    def median(scenario: str, peer: str) -> float | None:
        entry = summary.get(scenario, {}).get(peer)
        if entry is None or entry["status"] != "ok":
            return None
        if "expected" in entry and entry.get("good", 0) < entry["expected"]:
            return None
        return float(entry["median"])

    def best(scenario: str, peers: list[str], higher: bool = True) -> float | None:
        values = [v for v in (median(scenario, p) for p in peers) if v is not None]
        if not values:
            return None
        return max(values) if higher else min(values)

    stdlib = ["stdlib-fork", "stdlib-forkserver", "stdlib-spawn"]
    rows: list[tuple[str, str, bool | None]] = []

    def check(scenario: str, mark: str, ok: bool | None, shown: str) -> None:
        rows.append((f"{scenario}: {mark}", shown, ok))

    pk = median("S1", "poolkit")
    mp, std = median("S1", "mp-pool"), best("S1", stdlib)
    if pk is not None and mp is not None and std is not None:
        check("S1", "above mp.Pool and at least 3x the fastest stdlib", pk > mp and pk >= 3 * std,
              f"{pk / mp:.2f}x mp.Pool, {pk / std:.2f}x stdlib")
    pk, mp = median("S2", "poolkit"), median("S2", "mp-pool")
    if pk is not None and mp is not None:
        check("S2", "at mp.Pool's level (within 20%)", pk >= 0.8 * mp, f"{pk / mp:.2f}x mp.Pool")
    pk, mp, std = median("S3", "poolkit"), median("S3", "mp-pool"), best("S3", stdlib)
    if pk is not None and mp is not None and std is not None:
        check("S3", "above mp.Pool and at least 10x the fastest stdlib", pk > mp and pk >= 10 * std,
              f"{pk / mp:.2f}x mp.Pool, {pk / std:.1f}x stdlib")
    entry = summary.get("S4", {}).get("poolkit")
    peb = median("S4", "pebble")
    if entry is not None:
        pk = median("S4", "poolkit")
        all_good = pk is not None
        shown = f"{entry.get('good', 0)}/{entry.get('expected', '?')} good"
        if pk is not None and peb is not None:
            shown += f", {pk:.2f} s vs pebble {peb:.2f} s"
        check("S4", "every good job back, faster than pebble",
              all_good and (peb is None or (pk is not None and pk < peb)), shown)
    pk = median("S5", "poolkit")
    if pk is not None:
        check("S5", "cold start within about 10 ms", pk <= 10.0, f"{pk:.1f} ms")
    pk = median("S6", "poolkit")
    if pk is not None:
        check("S6", "bounded: at most 5 leaks (100 MiB) plus 50 MiB of worker", pk <= 150.0,
              f"{pk:.0f} MiB")
    pk, mpire = median("S7", "poolkit"), median("S7", "mpire")
    if pk is not None and mpire is not None:
        check("S7", "at least mpire's throughput", pk >= mpire, f"{pk / mpire:.2f}x mpire")
    if not rows:
        return []
    lines = [
        "## poolkit's goals, checked against this run",
        "",
        "These marks are the poolkit project's own goals, one per scenario, set by its "
        "developers from the peers' figures measured on this kind of machine (2 CPUs, "
        "Python 3.11). They are not the peers' claims nor an outside "
        "standard: they say where poolkit means to be, and this table says whether this run "
        "got there. *stdlib* is the fastest of the three `ProcessPoolExecutor` start methods.",
        "",
        "| goal | this run | met |",
        "|---|---|---|",
    ]
    for mark, shown, ok in rows:
        lines.append(f"| {mark} | {shown} | {'yes' if ok else 'no'} |")
    return [*lines, ""]


def _details(data: dict[str, Any]) -> list[str]:
    meta = data["meta"]
    peers = meta["peers"]
    summary = data["summary"]
    lines: list[str] = []
    if "S4" in summary:
        lines += [
            "## S4 in detail",
            "",
            "The same batch runs twice on one pool: without crashes, then with every 10th job "
            "calling `os._exit(1)`. *crash/clean* is the cost of the crashes (poolkit's own goal "
            "is 1.5 or less).",
            "",
            "| peer | good results | errors seen | with crashes | without | crash/clean | pool usable after |",
            "|---|---|---|---|---|---|---|",
        ]
        for peer in peers:
            e = summary["S4"][peer]
            if e["status"] == "n/a":
                continue
            good = f"{e.get('good', '?')}/{e.get('expected', '?')}"
            errors = ", ".join(f"{k} x{v}" for k, v in e.get("errors", {}).items()) or "—"
            crash = f"{e['median']:.2f} s" if e.get("median") is not None else e["status"]
            clean = f"{e['clean_seconds']:.3f} s" if "clean_seconds" in e else "—"
            ratio = f"{e['crash_over_clean']:.1f}" if "crash_over_clean" in e else "—"
            usable = {True: "yes", False: "no"}.get(e.get("usable_after"), "—")
            lines.append(f"| `{peer}` | {good} | {errors} | {crash} | {clean} | {ratio} | {usable} |")
        lines.append("")
    if "S6" in summary:
        pk = summary["S6"].get("poolkit", {})
        lines += [
            "## S6 in detail",
            "",
            "Peak RSS of any worker, sampled every 5 ms with psutil from the measuring process; "
            "each job also reports its own RSS right after leaking (*in-job max*), a cross-check "
            "that the sampler saw the peaks. Every pool retires a worker after 5 jobs "
            "(`recycle_jitter=0` for poolkit), except loky, which has no such option. With no "
            "recycling at all, a worker would reach about 20 x 20 MiB.",
            "",
            "| peer | sampled peak (MiB) | in-job max (MiB) |",
            "|---|---|---|",
        ]
        for peer in peers:
            e = summary["S6"][peer]
            if e["status"] != "ok":
                continue
            in_job = f"{e['in_job_max_mib']:.0f}" if "in_job_max_mib" in e else "—"
            lines.append(f"| `{peer}` | {e['median']:.0f} | {in_job} |")
        lines.append("")
        pk = summary["S6"].get("poolkit", {})
        if "memory_policy_peak_mib" in pk:
            lines += [
                f"poolkit can also retire a worker on its RSS: with `max_memory_per_child="
                f"\"100MiB\"` instead of a job count, the peak was "
                f"{pk['memory_policy_peak_mib']:.0f} MiB.",
                "",
            ]
    notes: list[str] = []
    for scenario, by_peer in summary.items():
        for peer, e in by_peer.items():
            if e["status"] in ("n/a", "hang", "timeout", "error"):
                notes.append(f"- {scenario} `{peer}`: {e['status']}: {e.get('reason', '')}")
            for note in e.get("notes", []):
                notes.append(f"- {scenario} `{peer}`: {note}")
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return lines


def _extras(extras: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    overhead = extras.get("overhead")
    if overhead:
        lines += [
            "## Logging overhead (`python -m benchmarks.overhead`)",
            "",
            f"{overhead['jobs']:,} no-op jobs on a {overhead['workers']}-worker poolkit pool, "
            f"{overhead['rounds']} alternating rounds, median per configuration "
            f"({overhead['date']}).",
            "",
            "| configuration | jobs/s | µs per job | vs logging off |",
            "|---|---|---|---|",
        ]
        base = overhead["results"][0]["jobs_per_s"]
        for row in overhead["results"]:
            lines.append(
                f"| {row['label']} | {format_value(row['jobs_per_s'])} | "
                f"{1e6 / row['jobs_per_s']:.1f} | {row['jobs_per_s'] / base:.2f} |"
            )
        lines.append("")
    respawn = extras.get("respawn")
    if respawn:
        lines += [
            "## Respawn (`python -m benchmarks.respawn`)",
            "",
            "One worker. *after a crash*: from the moment a job calls `os._exit(1)` (a timestamp "
            "it writes just before) to the result of the next no-op job, minus a warm no-op's "
            "round trip; for the standard library, which breaks on a crash, that means making a "
            "new executor. *churn*: no-op jobs one after the other with `max_tasks_per_child=1`, "
            "per job, minus the warm round trip. Medians; "
            f"{respawn['date']}.",
            "",
            "| pool | warm round trip (ms) | death to next result (ms) | churn, per job (ms) |",
            "|---|---|---|---|",
        ]
        for row in respawn["results"]:
            lines.append(
                f"| {row['label']} | {_ms(row.get('round_trip_ms'))} | "
                f"{_ms(row.get('respawn_ms'), row.get('respawn_note'))} | "
                f"{_ms(row.get('churn_ms'), row.get('churn_note'))} |"
            )
        lines.append("")
    return lines


def _ms(value: float | None, note: str | None = None) -> str:
    if value is None:
        return note or "—"
    text = f"{value:.2f}" if value < 10 else f"{value:.1f}"
    return f"{text} ({note})" if note else text


# ---------------------------------------------------------------- choosing.md

CHOOSING = ROOT / "docs" / "choosing.md"
FIGURES_START = (
    "<!-- figures: written by `python -m benchmarks.report` from benchmarks/results/latest.json; "
    "edits between these lines are overwritten -->"
)
FIGURES_END = "<!-- end of figures -->"
LEVEL = 1.05  # within 5% either way counts as level: runs on a shared machine drift more than that
STDLIB = ("stdlib-fork", "stdlib-forkserver", "stdlib-spawn")
LIBRARIES = ("loky", "pebble", "billiard", "mpire")


def complete_median(data: dict[str, Any], scenario: str, peer: str) -> float | None:
    """The peer's median where it completed the scenario (S4: every good job back), else None."""
    entry = data["summary"].get(scenario, {}).get(peer)
    if entry is None or entry["status"] != "ok":
        return None
    if "expected" in entry and entry.get("good", 0) < entry["expected"]:
        return None
    return float(entry["median"])


def _best(data: dict[str, Any], scenario: str, peers: tuple[str, ...]) -> tuple[str, float] | None:
    higher = data["scenarios"][scenario]["higher_is_better"]
    found = [(p, v) for p in peers if (v := complete_median(data, scenario, p)) is not None]
    if not found:
        return None
    return max(found, key=lambda pv: pv[1] if higher else -pv[1])


def _figure(data: dict[str, Any], scenario: str, peer: str) -> str:
    entry = data["summary"][scenario][peer]
    return cell(scenario, entry, data["scenarios"][scenario]["unit"])


def _best_cell(data: dict[str, Any], scenario: str, peers: tuple[str, ...], strip: str) -> str:
    present = [p for p in peers if p in data["summary"][scenario]]
    if not present:
        return "not run"
    best = _best(data, scenario, tuple(present))
    if best is not None:
        return f"{_figure(data, scenario, best[0])} ({best[0].removeprefix(strip)})"
    # None completed: what stopped each, grouped ("hang (forkserver, spawn)").
    stopped: dict[str, list[str]] = {}
    for peer in present:
        stopped.setdefault(_stopped_by(data, scenario, peer), []).append(peer.removeprefix(strip))
    return "; ".join(f"{why} ({', '.join(names)})" for why, names in stopped.items())


def _stopped_by(data: dict[str, Any], scenario: str, peer: str) -> str:
    entry = data["summary"][scenario][peer]
    if entry["status"] != "ok":
        return str(entry["status"])
    return "pool broken" if not entry.get("usable_after", True) else "jobs lost"


def _times(value: float) -> str:
    return f"{value:.2f}x" if value < 10 else f"{value:.0f}x"


def _ahead(data: dict[str, Any], scenario: str) -> str:
    """Who did best in this scenario, poolkit or the best peer (the reference left out)."""
    higher = data["scenarios"][scenario]["higher_is_better"]
    mine = complete_median(data, scenario, "poolkit")
    peers = tuple(p for p in data["meta"]["peers"] if p not in ("poolkit", "limit"))
    best = _best(data, scenario, peers)
    if mine is None:
        return f"poolkit did not complete it ({_figure(data, scenario, 'poolkit')})"
    if best is None:
        return "poolkit: no peer completed it"
    # The closest peer by the ratios the benchmarks page gives (per repetition, then the median).
    ratios = [(a, p) for p in peers if (a := advantage(data, scenario, p)) is not None]
    if ratios:
        better, peer = min(ratios)
    else:
        peer, theirs = best
        better = (mine / theirs if higher else theirs / mine) if mine and theirs else 1.0
    if better >= LEVEL:
        return f"poolkit, {_times(better)} the closest peer ({peer})"
    if better > 1 / LEVEL:
        return f"level: poolkit and {peer} within 5%"
    return f"**{peer}**, {_times(1 / better)} poolkit"


def render_choosing_figures(data: dict[str, Any]) -> list[str]:
    """The figures of docs/choosing.md: poolkit against the best of each kind of pool, per scenario."""
    meta = data["meta"]
    lines = [
        FIGURES_START,
        "",
        f"From `{meta.get('json', 'benchmarks/results/latest.json')}`: "
        f"`python -m benchmarks {' '.join(meta['argv'])}`".rstrip()
        + f" on {meta['date']}, {meta['cpu_model']}, {meta['cpus']} CPUs, Python {meta['python']}, "
        f"{meta['workers']} workers, "
        + (f"medians of {meta['repeat']} runs." if meta["repeat"] > 1 else "one run.")
        + " *stdlib executor* is `concurrent.futures.ProcessPoolExecutor`, *mp.Pool* "
        "`multiprocessing.Pool`. Each cell is a median; for the standard library's start methods "
        "and for the other libraries, the one that did best, named in brackets. ↑ higher is better, "
        "↓ lower is better. *Ahead* compares poolkit with the peer closest to it (the hand-written "
        "reference left out) by the median of the per-repetition ratios, as the "
        "[benchmarks page](benchmarks.md#poolkit-peer) does.",
        "",
        *_header([
            "scenario",
            "poolkit",
            "stdlib executor",
            "mp.Pool",
            "loky, pebble, billiard, mpire",
            "ahead in this run",
        ]),
    ]
    for key, scenario in data["scenarios"].items():
        arrow = "↑" if scenario["higher_is_better"] else "↓"
        row = [
            f"**{key}** {_short(key)} ({scenario['unit']} {arrow})",
            _figure(data, key, "poolkit") if "poolkit" in data["summary"][key] else "not run",
            _best_cell(data, key, STDLIB, "stdlib-"),
            _figure(data, key, "mp-pool") if "mp-pool" in data["summary"][key] else "not run",
            _best_cell(data, key, LIBRARIES, ""),
            _ahead(data, key),
        ]
        lines.append("| " + " | ".join(row) + " |")
    behind = []
    for key in data["scenarios"]:
        for peer in data["meta"]["peers"]:
            if peer in ("poolkit", "limit"):
                continue
            better = advantage(data, key, peer)
            if better is not None and better <= 1 / LEVEL:
                unit = data["scenarios"][key]["unit"]
                behind.append(
                    f"- **{key}** {_short(key)}: `{peer}`, {_figure(data, key, peer)} {unit} "
                    f"against poolkit's {_figure(data, key, 'poolkit')} {unit} ({_times(1 / better)})"
                )
    lines += ["", "Where a peer did better than poolkit in this run, by more than 5% "
              "(the median of the per-repetition ratios):", ""]
    lines += behind or ["- nowhere"]
    return [*lines, "", FIGURES_END]


def update_choosing(data: dict[str, Any], page: Path = CHOOSING) -> bool:
    """Rewrite the figures between the markers of ``page``; False if it has no markers."""
    text = page.read_text(encoding="utf-8") if page.exists() else ""
    start, end = text.find(FIGURES_START), text.find(FIGURES_END)
    if start < 0 or end < start:
        return False
    figures = "\n".join(render_choosing_figures(data))
    page.write_text(text[:start] + figures + text[end + len(FIGURES_END) :], encoding="utf-8")
    return True


# ---------------------------------------------------------------- plots


PLOT_WIDTH_IN = 9.0  # at PLOT_DPI: 900 px, about the width of the page's text at 1,280 px
PLOT_DPI = 100
FONT = 13  # points at PLOT_DPI: text as large as the page's own


def render_plots(data: dict[str, Any], img_dir: Path) -> list[Path]:
    """One plot per scenario (``bench_S1.png`` ...), and the ratio grid; the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    written = []
    meta = data["meta"]
    peers: list[str] = meta["peers"]
    stamp = (
        f"{meta['cpu_model']}, {meta['cpus']} CPUs, shared; Python {meta['python']}; {meta['date']}; "
        + (f"medians of {meta['repeat']} runs" if meta["repeat"] > 1 else "one run")
        + f", {meta['workers']} workers"
    )
    with plt.rc_context({"font.size": FONT, "ytick.labelsize": FONT, "xtick.labelsize": FONT - 1}):
        for key in data["scenarios"]:
            fig, ax = plt.subplots(figsize=(PLOT_WIDTH_IN, 0.42 * len(peers) + 1.4))
            _panel(ax, data, key, peers)
            fig.text(0.01, 0.005, stamp, fontsize=FONT - 4, color="#777777", va="bottom")
            fig.tight_layout(rect=(0, 0.03, 1, 1))
            path = img_dir / f"bench_{key}.png"
            fig.savefig(path, dpi=PLOT_DPI)
            plt.close(fig)
            written.append(path)
        if data["ratios"]:
            written.append(_ratio_plot(data, img_dir, plt))
    return written


def _panel(ax: Any, data: dict[str, Any], key: str, peers: list[str]) -> None:
    scenario = data["scenarios"][key]
    summary = data["summary"][key]
    values: list[float | None] = []
    for peer in peers:
        e = summary[peer]
        ok = e["status"] == "ok" and not ("expected" in e and e.get("good", 0) < e["expected"])
        values.append(float(e["median"]) if ok else None)
    # A run stopped by the cap while still answering: its rate until then, drawn hatched.
    partial = [summary[p].get("rate_so_far") if values[i] is None else None for i, p in enumerate(peers)]
    present = [v for v in values if v is not None and v > 0] + [r for r in partial if r]
    log = bool(present) and max(present) / min(present) > 30
    positions = list(range(len(peers)))[::-1]  # first peer at the top
    colors = [
        POOLKIT_COLOR if p.startswith("poolkit") else LIMIT_COLOR if p == "limit" else PEER_COLOR
        for p in peers
    ]
    bars = [v if v is not None else 0.0 for v in values]
    ax.barh(positions, bars, color=colors, height=0.7)
    for pos, rate in zip(positions, partial, strict=True):
        if rate:
            ax.barh([pos], [rate], color="white", edgecolor=PEER_COLOR, hatch="///", height=0.7)
    if log:
        ax.set_xscale("log")
    top = max(present) if present else 1.0
    ax.set_xlim(right=top * (4 if log else 1.35))
    if log and present:
        ax.set_xlim(left=min(present) / 3)
    left = ax.get_xlim()[0]
    for pos, peer, value in zip(positions, peers, values, strict=True):
        weight = "bold" if peer == "poolkit" else "normal"
        if value is None:
            text = _missing_text(summary[peer])
            rate = summary[peer].get("rate_so_far")
            if rate:
                ax.text(rate, pos, f" ≈{format_value(rate)}, {text}", va="center", fontsize=FONT - 1,
                        color="#555555", style="italic")
            else:
                ax.text(left if log else 0, pos, "  " + text, va="center", fontsize=FONT - 1,
                        color="#555555", style="italic")
        else:
            shown = f"{value:.2f} s" if key == "S4" else format_value(value)
            ax.text(value, pos, " " + shown, va="center", fontsize=FONT - 1, fontweight=weight)
    ax.set_yticks(positions)
    ax.set_yticklabels(peers)
    for label in ax.get_yticklabels():
        if label.get_text() == "poolkit":
            label.set_color(POOLKIT_COLOR)
            label.set_fontweight("bold")
    direction = "higher is better" if scenario["higher_is_better"] else "lower is better"
    ax.set_title(f"{key} {_short(key)}: {scenario['unit']}, {direction}", fontsize=FONT + 2,
                 loc="left", fontweight="bold")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _missing_text(entry: dict[str, Any]) -> str:
    if entry["status"] == "ok" and "expected" in entry:
        state = "pool broken" if not entry.get("usable_after", True) else "jobs lost"
        return f"{entry.get('good', 0)}/{entry['expected']} good, {state}"
    if entry["status"] in ("hang", "timeout"):
        if "expected" in entry and "good" in entry:
            return f"{entry['status']} ({entry['good']} good)"
        if entry.get("rate_so_far") and entry.get("total"):
            return f"{entry['status']} at {entry['answered']}/{entry['total']}"
        if "answered" in entry:
            return f"{entry['status']} after {entry['answered']} jobs"
    return str(entry["status"])


def _ratio_plot(data: dict[str, Any], img_dir: Path, plt: Any) -> Path:
    from matplotlib.colors import TwoSlopeNorm

    peers = [p for p in data["meta"]["peers"] if p != "poolkit"]
    scenarios = list(data["scenarios"])
    grid = [[advantage(data, s, p) for p in peers] for s in scenarios]
    logs = [[math.log2(v) if v else math.nan for v in row] for row in grid]
    fig, ax = plt.subplots(figsize=(PLOT_WIDTH_IN, 0.6 * len(scenarios) + 2.6))
    norm = TwoSlopeNorm(vmin=-4, vcenter=0, vmax=4)
    masked = [[min(4.0, max(-4.0, v)) if not math.isnan(v) else math.nan for v in row] for row in logs]
    ax.imshow(masked, cmap="RdYlGn", norm=norm, aspect="auto")
    for i, s in enumerate(scenarios):
        for j, p in enumerate(peers):
            value = grid[i][j]
            if value is None:
                text = no_ratio_reason(data, s, p).replace(": ", ":\n")
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, color="#e8e8e8"))
                ax.text(j, i, text, ha="center", va="center", fontsize=FONT - 4, color="#555555")
            else:
                dark = abs(math.log2(value)) > 2.5
                ax.text(j, i, f"{value:.2f}x" if value < 10 else f"{value:.0f}x",
                        ha="center", va="center", fontsize=FONT - 2, color="white" if dark else "black")
    ax.set_xticks(range(len(peers)))
    ax.set_xticklabels(peers, rotation=30, ha="right")
    ax.set_yticks(range(len(scenarios)))
    ax.set_yticklabels([f"{s} {_short(s)}" for s in scenarios])
    ax.set_title(
        "How many times better poolkit did than each peer\n"
        "green: poolkit better, red: worse; grey: no ratio (the cell says why)",
        fontsize=FONT,
        loc="left",
    )
    fig.tight_layout()
    path = img_dir / "bench_ratios.png"
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- entry


def load_extras(results_dir: Path = RESULTS) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    for name in ("overhead", "respawn"):
        path = results_dir / f"{name}.json"
        if path.exists():
            extras[name] = json.loads(path.read_text())
    return extras


def write_docs(
    data: dict[str, Any], markdown: Path = DOC, img_dir: Path = IMG, choosing: Path | None = None
) -> list[Path]:
    """Write the page and its plots (the page's image links are relative to it); and the
    figures of ``choosing`` (docs/choosing.md), if given."""
    import os

    written = render_plots(data, img_dir)
    prefix = os.path.relpath(img_dir, markdown.parent).replace(os.sep, "/") + "/"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render_markdown(data, load_extras(), img_prefix=prefix))
    if choosing is not None and update_choosing(data, choosing):
        written.append(choosing)
    return [markdown, *written]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report")
    parser.add_argument("--json", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--markdown", type=Path, default=DOC)
    parser.add_argument("--img-dir", type=Path, default=IMG)
    parser.add_argument("--choosing", type=Path, default=CHOOSING,
                        help="the page whose figures to rewrite (default docs/choosing.md)")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    for path in write_docs(data, args.markdown, args.img_dir, args.choosing):
        print(path)


if __name__ == "__main__":
    main()
