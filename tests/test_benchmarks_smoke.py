"""The benchmark harness runs end to end and reports what happened.

No speed thresholds here, ever: the figures depend on the machine and its
load. These tests check that the harness produces figures, reports a pool
that cannot run a scenario or hangs as such, and leaves no process behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_harness(tmp_path: Path, *args: str, tag: str = "") -> dict:
    out = tmp_path / "quick.json"
    env = dict(os.environ, BENCH_SMOKE_TAG=tag or uuid.uuid4().hex)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


@pytest.mark.timeout(120)
def test_quick_run_gives_figures_ratios_page_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plots need the bench extra")
    page = tmp_path / "bench.md"
    data = run_harness(
        tmp_path,
        "--only", "S1",
        "--peers", "poolkit,stdlib-fork",
        "--markdown", str(page),
        "--img-dir", str(tmp_path / "img"),
    )
    runs = {run["peer"]: run for run in data["runs"]}
    assert set(runs) == {"poolkit", "stdlib-fork"}
    for run in runs.values():
        assert run["status"] == "ok", run
        assert run["scenario"] == "S1"
        assert run["jobs"] == data["scenarios"]["S1"]["size"]["jobs"]
        assert run["value"] > 0
    assert data["summary"]["S1"]["poolkit"]["median"] == runs["poolkit"]["value"]
    ratio = data["ratios"]["S1"]["stdlib-fork"]["poolkit_over_peer"]
    assert ratio == pytest.approx(runs["poolkit"]["value"] / runs["stdlib-fork"]["value"])
    assert data["meta"]["python"] and data["meta"]["cpus"] >= 1
    text = page.read_text()
    assert "| **S1**" in text and "`stdlib-fork`" in text
    assert (tmp_path / "img" / "bench_S1.png").stat().st_size > 0
    assert (tmp_path / "img" / "bench_ratios.png").stat().st_size > 0


@pytest.mark.timeout(60)
def test_a_refused_scenario_is_reported_as_not_applicable_with_the_reason(tmp_path: Path) -> None:
    data = run_harness(tmp_path, "--only", "S3", "--peers", "stdlib-fork", "--no-docs")
    (run,) = data["runs"]
    assert run["status"] == "n/a"
    # 3.11+ refuses max_tasks_per_child with fork; 3.10 has no max_tasks_per_child at all
    assert "fork" in run["reason"] or "3.11" in run["reason"]


@pytest.mark.timeout(60)
def test_a_hanging_peer_is_reported_and_nothing_is_left_running(tmp_path: Path) -> None:
    # multiprocessing.Pool never answers for a job whose worker died: a hang by design.
    tag = uuid.uuid4().hex
    data = run_harness(
        tmp_path, "--only", "S4", "--peers", "mp-pool", "--cap", "5", "--no-docs", tag=tag
    )
    (run,) = data["runs"]
    assert run["status"] == "hang"
    assert run["good"] < run["expected"]
    assert _processes_tagged(tag) == []


def _processes_tagged(tag: str) -> list[int]:
    found = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get("BENCH_SMOKE_TAG") == tag:
                    found.append(process.pid)
            except psutil.Error:
                continue
        if not found:
            break
        time.sleep(0.1)
    return found


@pytest.mark.timeout(60)
def test_the_reference_pool_survives_crashes_and_recycles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is not an installed package
    from benchmarks.jobs import crash_if, noop
    from benchmarks.limit import LimitCrashed, LimitPool

    deadline = time.monotonic() + 30
    pool = LimitPool(2)
    try:
        futures = [pool.submit(crash_if, i, True) for i in range(100)]
        for future in futures:
            pool.wait(future, deadline)
        assert [f.value for f in futures if f.ok] == [i for i in range(100) if i % 10 != 9]
        assert all(isinstance(f.value, LimitCrashed) for f in futures if not f.ok)
        assert len([f for f in futures if not f.ok]) == 10
    finally:
        pool.close()

    pool = LimitPool(2, max_tasks=1)
    try:
        futures = [pool.submit(os.getpid) for _ in range(6)]
        pids = [pool.wait(f, deadline).value for f in futures]
        assert len(set(pids)) == 6  # every job ran in a new worker
        assert pool.wait(pool.submit(noop), deadline).ok
    finally:
        pool.close()


@pytest.mark.timeout(120)
def test_cpu_cost_reads_the_caller_and_the_children(tmp_path: Path) -> None:
    """`python -m benchmarks.cpu_cost` end to end, once per pool and load."""
    out = tmp_path / "cpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cpu_cost", "--repeat", "1", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr
    medians = json.loads(out.read_text())["medians"]
    assert set(medians) == {"tiny", "recycle"}
    assert set(medians["tiny"]) == {"poolkit", "mp-pool", "stdlib-fork"}
    for load in medians.values():
        for figures in load.values():
            assert figures["jobs_per_s"] > 0
            assert figures["parent_us_per_job"] > 0
            # The workers' CPU reaches this process only once they are reaped.
            assert figures["children_us_per_job"] > 0
    # One new worker per job: its start-up faults are counted among the children's.
    assert medians["recycle"]["poolkit"]["children_faults_per_job"] > 10
