"""Structured lifecycle logs: the events, their fields, quiet by default, and JSON lines.

poolkit logs through structlog over the stdlib logger ``"poolkit"``. These
tests read the events the way an application would: with a handler on that
logger (pytest's ``caplog``), with structlog's own testing helper, and as
JSON lines from :func:`poolkit.log_to_json` in a separate interpreter (so that
switching to JSON does not change this process's logging).
"""

from __future__ import annotations

import ast
import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import recycle_jobs as jobs
import structlog

import poolkit

pytestmark = pytest.mark.timeout(120)

TESTS = str(Path(__file__).parent)
_FIELD = re.compile(r" (\w+)=")


def _parse(message: str) -> tuple[str, dict[str, Any]]:
    """Read one rendered event: ``"event key=repr key=repr ..."``."""
    event, _, rest = message.partition(" ")
    rest = " " + rest
    fields: dict[str, Any] = {}
    matches = list(_FIELD.finditer(rest))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(rest)
        text = rest[match.end() : end]
        try:
            fields[match.group(1)] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            fields[match.group(1)] = text
    return event, fields


def _events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, Any], int]]:
    return [(*_parse(r.getMessage()), r.levelno) for r in caplog.records if r.name == "poolkit"]


def _named(events: list[tuple[str, dict[str, Any], int]], name: str) -> list[dict[str, Any]]:
    return [fields for event, fields, _ in events if event == name]


def test_lifecycle_events_with_their_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="poolkit")
    with poolkit.Pool(1, name="logged", max_tasks_per_child=2, recycle_jitter=0) as pool:
        recycled = [pool.submit(jobs.pid_of, i) for i in range(2)]
        for f in recycled:
            f.result(timeout=30)
        crashed = pool.submit(jobs.crash, 7)
        with pytest.raises(poolkit.WorkerCrashed):
            crashed.result(timeout=30)
        slow = pool.options(timeout=0.3, job_id="slow-one").submit(jobs.sleep, 30)
        with pytest.raises(poolkit.JobTimeout):
            slow.result(timeout=30)
        pool.submit(jobs.pid_of, "last").result(timeout=30)
    events = _events(caplog)
    assert all(fields.get("pool") == "logged" for _, fields, _ in events), events

    spawned = _named(events, "worker.spawned")
    assert len(spawned) == pool.stats().spawned
    assert [f["worker_id"] for f in spawned] == sorted({f["worker_id"] for f in spawned})

    retired = _named(events, "worker.retired")
    by_tasks = [f for f in retired if f["reason"] == "tasks"]
    assert len(by_tasks) == 1
    assert by_tasks[0]["pid"] == recycled[-1].stats.pid
    assert by_tasks[0]["worker_id"] == recycled[-1].stats.worker_id
    assert [f for f in retired if f["reason"] == "shutdown"]

    [crash] = _named(events, "worker.crashed")
    assert crash["exit"] == "exit code 7"
    assert crash["job_id"] == crashed.job_id
    assert crash["pid"] == crashed.exception().pid
    assert crash["worker_id"] == crashed.exception().worker_id

    [timeout] = _named(events, "job.timeout")
    assert timeout["job_id"] == "slow-one"
    assert timeout["timeout"] == 0.3
    assert isinstance(timeout["pid"], int) and isinstance(timeout["worker_id"], int)

    [shutdown] = _named(events, "pool.shutdown")
    assert shutdown["pool"] == "logged"
    assert events[-1][0] == "pool.shutdown"

    levels = {event: level for event, _, level in events}
    assert levels["worker.spawned"] == logging.INFO
    assert levels["worker.crashed"] == logging.WARNING
    assert levels["job.timeout"] == logging.WARNING
    # per-job events only at DEBUG
    assert not _named(events, "job.done")


def test_spawned_event_names_the_pid(caplog: pytest.LogCaptureFixture) -> None:
    """A spawn log line a user can match to ``ps``: worker_id and pid."""
    caplog.set_level(logging.INFO, logger="poolkit")
    with poolkit.Pool(2) as pool:
        pids = {pool.submit(jobs.pid_of).result(timeout=30)[1] for _ in range(4)}
        # Both workers' pids are known once both are ready (the jobs may all
        # have run on the first while the second was still starting).
        workers = {w.worker_id: w.pid for w in jobs.wait_ready(pool, 2)}
    spawned = _named(_events(caplog), "worker.spawned")
    assert spawned and all("pid" in f for f in spawned), spawned
    assert {f["worker_id"]: f["pid"] for f in spawned} == workers
    assert pids <= set(workers.values())


def test_debug_adds_per_job_events(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="poolkit")
    with poolkit.Pool(1) as pool:
        futures = [pool.options(job_id=f"j{i}").submit(jobs.pid_of, i) for i in range(3)]
        for f in futures:
            f.result(timeout=30)
    done = _named(_events(caplog), "job.done")
    assert [f["job_id"] for f in done] == ["j0", "j1", "j2"]
    assert all(f["pid"] == futures[0].stats.pid for f in done)


@pytest.fixture
def structlog_restored() -> Any:
    """Put structlog back to its pristine, unconfigured state after the test.

    ``capture_logs`` leaves ``structlog.is_configured()`` True after it exits;
    without this, later tests in this process would see poolkit's events
    printed by structlog's default logger instead of reaching ``"poolkit"``.
    """
    yield
    structlog.reset_defaults()


def test_structlog_capture_logs_sees_poolkit_events(structlog_restored: Any) -> None:
    """structlog's own testing helper is how structlog users check logs."""
    previous = logging.getLogger("poolkit").level
    logging.getLogger("poolkit").setLevel(logging.INFO)
    try:
        with structlog.testing.capture_logs() as captured, poolkit.Pool(1, name="cap") as pool:
            pool.submit(jobs.pid_of).result(timeout=30)
    finally:
        logging.getLogger("poolkit").setLevel(previous)
    names = [entry.get("event") for entry in captured]
    assert "worker.spawned" in names, captured
    assert "worker.retired" in names
    assert "pool.shutdown" in names
    assert all(entry.get("pool") == "cap" for entry in captured)
    [spawned] = [e for e in captured if e["event"] == "worker.spawned"]
    assert isinstance(spawned["pid"], int) and spawned["worker_id"] == 1
    assert spawned["log_level"] == "info"


def test_events_reach_the_poolkit_logger_again_after_capture_logs(
    caplog: pytest.LogCaptureFixture, structlog_restored: Any
) -> None:
    """A test suite that used capture_logs once must still see poolkit's events through logging."""
    with structlog.testing.capture_logs():
        pass
    caplog.set_level(logging.INFO, logger="poolkit")
    with poolkit.Pool(1, name="after") as pool:
        pool.submit(jobs.pid_of).result(timeout=30)
    names = [event for event, _, _ in _events(caplog)]
    assert "worker.spawned" in names and "pool.shutdown" in names, names


QUIET = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import poolkit, recycle_jobs as jobs
    with poolkit.Pool(2, max_tasks_per_child=1, recycle_jitter=0) as pool:
        futures = [pool.submit(jobs.pid_of, i) for i in range(4)]
        futures.append(pool.submit(jobs.crash, 3))
        futures.append(pool.options(timeout=0.2).submit(jobs.sleep, 30))
        futures.append(pool.submit(jobs.fail, "no"))
        for f in futures:
            f.exception(timeout=30)
    """
)


def test_quiet_by_default() -> None:
    """No logging configured: crashes, timeouts and recycling print nothing at all."""
    result = subprocess.run(
        [sys.executable, "-c", QUIET.format(tests=TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == ""


JSON_LINES = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import poolkit, recycle_jobs as jobs
    poolkit.log_to_json(stream=sys.stdout)
    with poolkit.Pool(1, name="jsonpool", max_tasks_per_child=1, recycle_jitter=0) as pool:
        pool.options(job_id="ok").submit(jobs.pid_of, 1).result(timeout=30)
        pool.options(job_id="boom").submit(jobs.crash, 2).exception(timeout=30)
        pool.options(job_id="late", timeout=0.2).submit(jobs.sleep, 30).exception(timeout=30)
    """
)


def test_log_to_json_emits_json_lines() -> None:
    result = subprocess.run(
        [sys.executable, "-c", JSON_LINES.format(tests=TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    events = [r["event"] for r in records]
    for name in (
        "worker.spawned",
        "worker.retired",
        "worker.crashed",
        "job.timeout",
        "pool.shutdown",
    ):
        assert name in events, events
    assert all(r["pool"] == "jsonpool" for r in records)
    assert all("timestamp" in r and "level" in r for r in records)
    [crash] = [r for r in records if r["event"] == "worker.crashed"]
    assert crash["job_id"] == "boom" and crash["exit"] == "exit code 2"
    assert isinstance(crash["pid"], int) and isinstance(crash["worker_id"], int)
    [timeout] = [r for r in records if r["event"] == "job.timeout"]
    assert timeout["job_id"] == "late" and timeout["level"] == "warning"
    assert {r["reason"] for r in records if r["event"] == "worker.retired"} >= {"tasks"}
    assert "job.done" not in events  # INFO by default
