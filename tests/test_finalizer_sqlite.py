"""Initializer and finalizer around a real SQLite database.

The initializer opens one connection per worker and records ``open <pid>``;
the finalizer records ``close <pid>`` and closes it. Whatever the reason a
worker leaves gracefully (job count, RSS, idle, shutdown), the counts balance.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import recycle_jobs as jobs
from recycle_jobs import live_workers, wait_until

import poolkit

pytestmark = pytest.mark.timeout(120)


def _balance(
    db: str,
) -> tuple[collections.Counter[int], collections.Counter[int], list[tuple[str, int, float]]]:
    events = jobs.read_events(db)
    opened = collections.Counter(pid for what, pid, _ in events if what == "open")
    closed = collections.Counter(pid for what, pid, _ in events if what == "close")
    return opened, closed, events


def _assert_balanced(db: str) -> list[tuple[str, int, float]]:
    opened, closed, events = _balance(db)
    assert opened, "no worker opened a connection"
    assert opened == closed, f"opened {opened} but closed {closed}"
    assert set(opened.values()) == {1}
    # per pid: open, then its jobs, then close
    for pid in opened:
        mine = [what for what, p, _ in events if p == pid]
        assert mine[0] == "open" and mine[-1] == "close", mine
        assert "open" not in mine[1:] and "close" not in mine[:-1]
    return events


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_connections_balance_after_recycling_and_shutdown(
    tmp_path: Path, start_method: str, leak_check: object
) -> None:
    db = str(tmp_path / "events.db")
    jobs.create_events_table(db)
    with poolkit.Pool(
        2,
        start_method=start_method,
        initializer=jobs.open_database,
        initargs=(db,),
        finalizer=jobs.close_database,
        max_tasks_per_child=3,
        recycle_jitter=0,
    ) as pool:
        pids = [pool.submit(jobs.use_database, i).result(timeout=60) for i in range(20)]
        pids += [
            f.result(timeout=60) for f in [pool.submit(jobs.use_database, i) for i in range(10)]
        ]
    events = _assert_balanced(db)
    job_pids = collections.Counter(pid for what, pid, _ in events if what == "job")
    assert sum(job_pids.values()) == 30
    assert set(job_pids) == set(pids)
    assert max(job_pids.values()) <= 3
    assert len(job_pids) >= 10
    assert pool.stats().retired.get("tasks", 0) >= 9


def test_connections_balance_after_rss_and_idle_retirement(tmp_path: Path) -> None:
    db = str(tmp_path / "events.db")
    jobs.create_events_table(db)
    with poolkit.Pool(
        2,
        min_workers=1,
        idle_timeout=0.3,
        max_memory_per_child="150MiB",
        initializer=jobs.open_database,
        initargs=(db,),
        finalizer=jobs.close_database,
    ) as pool:
        for f in [pool.submit(jobs.use_database, i) for i in range(4)]:
            f.result(timeout=30)
        pool.submit(jobs.leak, 200).result(timeout=30)  # its worker retires on RSS
        for f in [pool.submit(jobs.sleep_then_pid, 0.3) for _ in range(4)]:
            f.result(timeout=30)
        wait_until(lambda: len(live_workers(pool.stats())) == 1, timeout=15, what="idle exit")
        wait_until(lambda: pool.stats().retired.get("idle"), timeout=15, what="idle count")
        stats = pool.stats()
    assert stats.retired.get("memory") == 1
    assert stats.retired.get("idle", 0) >= 1
    _assert_balanced(db)


def test_worker_killed_by_a_timeout_skips_the_finalizer_but_the_rest_balance(
    tmp_path: Path, leak_check: object
) -> None:
    """A killed worker cannot close; everyone else still does, and the pool shuts down."""
    db = str(tmp_path / "events.db")
    jobs.create_events_table(db)
    with poolkit.Pool(
        1, initializer=jobs.open_database, initargs=(db,), finalizer=jobs.close_database
    ) as pool:
        pool.submit(jobs.use_database, 1).result(timeout=30)
        with pytest.raises(poolkit.JobTimeout):
            pool.options(timeout=0.3).submit(jobs.sleep, 30).result(timeout=30)
        pool.submit(jobs.use_database, 2).result(timeout=30)
    opened, closed, _ = _balance(db)
    assert len(opened) == 2
    assert len(closed) == 1
    assert set(closed) <= set(opened)


FAILING_FINALIZER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import poolkit, recycle_jobs as jobs
    with poolkit.Pool(2, finalizer=jobs.failing_finalizer, max_tasks_per_child=1, recycle_jitter=0) as pool:
        print(sorted(pool.map(jobs.pid_of, range(6), chunksize=1))[:0], flush=True)
        stats = pool.stats()
    print("shutdown returned", pool.stats().retired, flush=True)
    """
)


def test_finalizer_exception_is_reported_and_never_hangs(tmp_path: Path) -> None:
    tests = str(Path(__file__).parent)
    script = FAILING_FINALIZER.format(tests=tests)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "shutdown returned" in result.stdout
    assert "'crash'" not in result.stdout  # a failing finalizer is no crash
    # each retiring worker reports its finalizer's failure with the exception
    assert result.stderr.count("finalizer exploded on purpose") >= 6, result.stderr
    assert "RuntimeError" in result.stderr
