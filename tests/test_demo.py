"""``poolkit demo`` end to end: it runs with no setup, shows what happened, and exits 0.

The demo is the first thing the README asks a user to run, so these tests run
it exactly as a user would (a subprocess; once with stderr going to a log, once
on a pseudo-terminal) and read what it printed. They are slow (about 15 s
each on 2 cores) but stay in the default run: a broken demo is a broken first
impression.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_pty
from rich.console import Console

from poolkit.demo import recycled_detail
from poolkit.progress import worker_table
from poolkit.stats import PoolStats, WorkerInfo

pytestmark = [pytest.mark.timeout(180)]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp_path)  # the demo's temporary directory must be gone afterwards
    env.pop("COLUMNS", None)
    env.update(extra)
    return env


def _summary(text: str) -> str:
    assert "poolkit demo summary" in text, text[-3000:]
    return text[text.index("poolkit demo summary") :]


@pytest.mark.slow
def test_demo_in_a_log_runs_and_exits_0(tmp_path: Path) -> None:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "poolkit", "demo"],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=150,
        cwd=tmp_path,
    )
    wall = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert wall < 60, f"the demo took {wall:.0f} s"
    log = done.stderr
    assert "\x1b[" not in log, "escape codes in a log"
    # live events, as plain lines
    assert "crash-exit: worker" in log and "died (exit code 3)" in log
    assert "crash-segfault: worker" in log and "died (signal SIGSEGV)" in log
    assert "hang-01: timed out after 2 s (JobTimeout)" in log
    assert "recycled after leak-" in log and "> max_memory_per_child 100 MiB" in log
    assert "jobs done" in log
    summary = _summary(log)
    assert "48 total: 44 ok, 4 failed" in summary
    assert "WorkerCrashed 2" in summary and "JobTimeout 2" in summary
    assert "crashes survived:   2 (exit code 3, signal SIGSEGV)" in summary
    assert "backups verified:   8/8" in summary
    assert "44/44 jobs saw their own POOLKIT_JOB_ID and POOLKIT_JOB_TYPE" in summary
    assert "verdict:            as expected" in summary
    # the crashes and timeouts above are counted as such, not as recycling
    recycled_row = next(line for line in summary.splitlines() if "workers recycled" in line)
    assert "memory" in recycled_row, recycled_row
    assert "crash" not in recycled_row and "timeout" not in recycled_row, recycled_row
    assert list(tmp_path.iterdir()) == [], "the demo left files behind"


@pytest.mark.slow
def test_demo_on_a_terminal_shows_the_live_dashboard(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "poolkit", "demo"],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=_env(tmp_path, TERM="xterm-256color", COLUMNS="140", LINES="60"),
        cwd=tmp_path,
    )
    os.close(slave)
    try:
        screen = read_pty(master, proc, time.monotonic() + 150).decode("utf-8", "replace")
        assert proc.wait(timeout=30) == 0
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "\x1b[" in screen, "rich did not see a terminal"
    # the live parts: per-type progress, the workers table from pool.stats(), the event log
    for text in ("all jobs", "fine-tune", "workers (pool.stats())", "events", "epoch ", "loss "):
        assert text in screen, text
    assert "only this job failed (WorkerCrashed)" in screen
    assert "(JobTimeout)" in screen
    summary = _summary(screen)
    assert "│" in summary, "the summary is not a table"
    assert "as expected" in summary


# ----------------------------------------------------------------- what the demo's figures say


def _stats(workers: tuple[WorkerInfo, ...] = (), retired: dict[str, int] | None = None) -> PoolStats:
    return PoolStats(workers, 0, 0, 0, 0, 0, 0, 0, 0, 0, retired or {})


def test_a_worker_running_a_job_is_shown_busy_not_ready() -> None:
    busy = WorkerInfo(1, 101, "ready", 3, 2**20, 0.5, 2.0, "backup-02")
    idle = WorkerInfo(2, 102, "ready", 3, 2**20, 0.5, 2.0, None)
    console = Console(record=True, width=120)
    console.print(worker_table(_stats((busy, idle))))
    rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if line.count("│") > 3}
    assert "busy" in rows["1"] and "ready" not in rows["1"], rows["1"]
    assert "ready" in rows["2"], rows["2"]


def test_crashes_and_timeouts_are_not_counted_as_recycled() -> None:
    stats = _stats(retired={"crash": 2, "timeout": 1, "memory_limit": 1, "terminated": 2, "memory": 1, "tasks": 2, "shutdown": 4})
    assert stats.recycled == 3
    assert recycled_detail(stats) == "3 (tasks 2, memory 1)"
    assert recycled_detail(_stats(retired={"crash": 1, "shutdown": 2})) == ""
