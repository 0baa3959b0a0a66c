"""The harness: every (repetition, scenario, peer) in a fresh interpreter, under a wall-clock cap.

Each measurement is ``python -m benchmarks.runner PEER SCENARIO`` in its own
session (``start_new_session``), so that the harness can find and kill
everything it left behind, including processes that moved to another process
group: a pool that hangs costs one cap and the run goes on. A peer that hung,
timed out or could not run a scenario ("n/a") is not run again in later
repetitions (unless ``--retry-hangs``): the answer hardly changes, and a
hang would cost the cap every time.

Ratios poolkit/peer are taken pair by pair within one repetition (the two ran
minutes apart at most, under the same load), then the median over
repetitions; on a shared 2-core machine the absolute figures drift, the
ratios much less.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from .peers import DISTRIBUTIONS
from .runner import CLOSE_MARKER, MARKER
from .scenarios import SCENARIOS, WORKERS

ROOT = Path(__file__).resolve().parent.parent
_SETTLE = 1.0  # seconds a finished measurement's processes get to exit before they count as left over


def run_isolated(command: list[str], cap: float) -> dict[str, Any]:
    """Run ``command`` in its own session under a wall-clock cap; kill whatever it leaves behind.

    Returns stdout, stderr, the exit code, whether the cap killed it, the
    wall time and the processes of its session still alive afterwards.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    started = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    killed = False
    try:
        out, err = proc.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        killed = True
        _kill_tree(proc.pid)
        out, err = proc.communicate()
    wall = time.monotonic() - started
    return {
        "stdout": out,
        "stderr": err,
        "returncode": proc.returncode,
        "killed": killed,
        "wall_s": wall,
        "leftovers": _sweep_session(proc.pid),
    }


def run_one(peer: str, scenario: str, profile: str, cap: float) -> dict[str, Any]:
    """One measurement in a fresh interpreter; never raises, never leaves a process behind."""
    margin = min(5.0, cap * 0.15)
    command = [
        sys.executable,
        "-m",
        "benchmarks.runner",
        peer,
        scenario,
        "--profile",
        profile,
        "--deadline",
        f"{cap - margin:.2f}",
    ]
    done = run_isolated(command, cap)
    out, err, killed = done["stdout"], done["stderr"], done["killed"]
    result: dict[str, Any] | None = None
    close: dict[str, Any] | None = None
    for line in out.splitlines():
        if line.startswith(MARKER):
            result = json.loads(line[len(MARKER) :])
        elif line.startswith(CLOSE_MARKER):
            close = json.loads(line[len(CLOSE_MARKER) :])
    if result is None:
        if killed:
            result = {"status": "timeout", "reason": f"no answer within the {cap:g} s cap (slow or stuck)"}
        else:
            tail = err.strip().splitlines()[-1:] or ["no output"]
            result = {"status": "error", "reason": f"exit code {done['returncode']}: {tail[0]}"}
    if close is not None:
        result["close_s"] = close["close_s"]
        if close["close_s"] is None:
            result["close"] = "pool close did not return"
    elif killed and result["status"] not in ("hang", "timeout"):
        result["close"] = "killed at the cap after answering (pool close hung)"
    result.update(peer=peer, scenario=scenario, wall_s=round(done["wall_s"], 3))
    if done["leftovers"]:
        result["leftover_processes"] = done["leftovers"]
    if result["status"] == "error":
        result["stderr_tail"] = err[-1500:]
    return result


def _kill_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.Error:
        family = []
    for process in family:
        with contextlib.suppress(psutil.Error):
            process.kill()
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


def _session_members(sid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter(["name"]):
        try:
            if process.pid != os.getpid() and os.getsid(process.pid) == sid:
                members.append(process)
        except (OSError, psutil.Error):
            continue
    return members


def _sweep_session(sid: int) -> list[str]:
    """Kill whatever of the measurement's session is still alive after a short grace; name it."""
    deadline = time.monotonic() + _SETTLE
    members = _session_members(sid)
    while members and time.monotonic() < deadline:
        time.sleep(0.05)
        members = [p for p in members if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    names = []
    for process in members:
        with contextlib.suppress(psutil.Error):
            names.append(f"{process.pid}:{process.info.get('name')}")
            process.kill()
    return names


# ---------------------------------------------------------------- the whole run


def run_all(
    peers: list[str],
    scenarios: list[str],
    *,
    profile: str,
    repeat: int,
    cap: float,
    retry_hangs: bool = False,
    log: Any = None,
) -> dict[str, Any]:
    """Run every measurement; return the raw runs and the summary (medians and ratios)."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    meta = describe_machine()
    meta.update(
        profile=profile,
        repeat=repeat,
        cap_s=cap,
        workers=WORKERS,
        peers=peers,
        scenarios=scenarios,
        argv=sys.argv[1:],
        load_before=list(os.getloadavg()),
    )
    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    settled: dict[tuple[str, str], dict[str, Any]] = {}  # (scenario, peer) -> a final n/a or hang
    for rep in range(repeat):
        for scenario in scenarios:
            for peer in peers:
                known = settled.get((scenario, peer))
                if known is not None:
                    run = {**known, "rep": rep, "repeated_from": known["rep"], "wall_s": 0.0}
                else:
                    run = {**run_one(peer, scenario, profile, cap), "rep": rep}
                    if run["status"] == "n/a" or (
                        run["status"] in ("hang", "timeout") and not retry_hangs
                    ):
                        settled[(scenario, peer)] = run
                runs.append(run)
                log(f"[{rep + 1}/{repeat}] {scenario} {peer:<18} {describe_run(run)}")
    meta["load_after"] = list(os.getloadavg())
    meta["duration_s"] = round(time.monotonic() - started, 1)
    return {
        "meta": meta,
        "scenarios": {
            key: {
                "title": SCENARIOS[key].title,
                "unit": SCENARIOS[key].unit,
                "higher_is_better": SCENARIOS[key].higher_is_better,
                "log_scale": SCENARIOS[key].log_scale,
                "size": SCENARIOS[key].sizes[profile],
            }
            for key in scenarios
        },
        "runs": runs,
        "summary": summarize(runs, peers, scenarios),
        "ratios": ratios(runs, peers, scenarios),
    }


def describe_run(run: dict[str, Any]) -> str:
    status = run["status"]
    if status != "ok":
        extra = f" ({run['good']} good)" if "good" in run else ""
        return f"{status}{extra}: {run.get('reason', '')}"[:200]
    unit = SCENARIOS[run["scenario"]].unit
    text = f"{format_value(run['value'])} {unit}"
    if "good" in run:
        text += f", {run['good']}/{run['expected']} good"
    return text + f"  ({run['wall_s']:.1f} s)"


def format_value(value: float) -> str:
    """Three significant figures, with k and M for big numbers."""
    if value >= 1e6:
        return f"{value / 1e6:.3g}M"
    if value >= 1e4:
        return f"{value / 1e3:.3g}k"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def complete(run: dict[str, Any]) -> bool:
    """An ``ok`` run whose figure means what the scenario says (S4: every good job came back)."""
    return bool(run["status"] == "ok" and run.get("good", 0) == run.get("expected", 0))


def summarize(runs: list[dict[str, Any]], peers: list[str], scenarios: list[str]) -> dict[str, Any]:
    """Per scenario and peer: median of the ``ok`` figures, and what happened in the others."""
    summary: dict[str, Any] = {}
    for scenario in scenarios:
        summary[scenario] = {}
        for peer in peers:
            mine = [r for r in runs if r["scenario"] == scenario and r["peer"] == peer]
            ok = [r for r in mine if r["status"] == "ok"]
            entry: dict[str, Any] = {
                "statuses": [r["status"] for r in mine],
                "values": [r["value"] for r in ok],
                "median": statistics.median(r["value"] for r in ok) if ok else None,
            }
            if ok:
                entry["status"] = "ok"
            else:
                entry["status"] = mine[0]["status"] if mine else "missing"
                entry["reason"] = mine[0].get("reason", "") if mine else ""
            for key in ("good", "expected", "usable_after", "answered", "total", "elapsed_s"):
                seen = [r[key] for r in mine if key in r]
                if seen:
                    entry[key] = min(seen) if key != "usable_after" else all(seen)
            throughput = SCENARIOS[scenario].higher_is_better
            if not ok and throughput and entry.get("answered") and entry.get("elapsed_s"):
                # Slow, not finished: the rate it kept until the deadline, a rough lower bound.
                entry["rate_so_far"] = entry["answered"] / entry["elapsed_s"]
            for key in ("clean_seconds", "crash_over_clean", "in_job_max_mib", "memory_policy_peak_mib"):
                seen = [r[key] for r in ok if key in r]
                if seen:
                    entry[key] = statistics.median(seen)
            notes = sorted({r["note"] for r in mine if "note" in r} | {r["close"] for r in mine if "close" in r})
            if notes:
                entry["notes"] = notes
            errors: dict[str, int] = {}
            for r in ok:
                for name, count in r.get("errors", {}).items():
                    errors[name] = max(errors.get(name, 0), count)
            if errors:
                entry["errors"] = errors
            summary[scenario][peer] = entry
    return summary


def ratios(runs: list[dict[str, Any]], peers: list[str], scenarios: list[str]) -> dict[str, Any]:
    """poolkit / peer per repetition, where both runs are complete; then the median."""
    if "poolkit" not in peers:
        return {}
    table: dict[str, Any] = {}
    for scenario in scenarios:
        better_high = SCENARIOS[scenario].higher_is_better
        table[scenario] = {}
        by_rep: dict[tuple[int, str], dict[str, Any]] = {
            (r["rep"], r["peer"]): r for r in runs if r["scenario"] == scenario
        }
        reps = sorted({rep for rep, _ in by_rep})
        for peer in peers:
            if peer == "poolkit":
                continue
            per_rep = []
            for rep in reps:
                mine, theirs = by_rep.get((rep, "poolkit")), by_rep.get((rep, peer))
                if mine and theirs and complete(mine) and complete(theirs) and theirs["value"] > 0:
                    per_rep.append(mine["value"] / theirs["value"])
            if per_rep:
                ratio = statistics.median(per_rep)
                table[scenario][peer] = {
                    "poolkit_over_peer": ratio,
                    "per_rep": per_rep,
                    "poolkit_better": ratio > 1 if better_high else ratio < 1,
                }
    return table


# ---------------------------------------------------------------- machine


def describe_machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    for dist in sorted({d for d in DISTRIBUTIONS.values() if d} | {"cloudpickle", "psutil", "matplotlib"}):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "versions": versions,
        "poolkit_commit": _git("rev-parse", "--short", "HEAD"),
        "poolkit_dirty": bool(_git("status", "--porcelain", "--", "poolkit")),
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
