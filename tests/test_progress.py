"""Progress: values a job reports reach the parent in order, and a slow parent never blocks the job."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import recycle_jobs as jobs

import poolkit

pytestmark = pytest.mark.timeout(120)


def test_progress_arrives_in_order_and_callbacks_fire(tmp_path: Path) -> None:
    go = tmp_path / "go"
    seen: list[tuple[Any, Any]] = []
    threads: set[str] = set()

    def on_progress(future: poolkit.JobFuture[Any], value: Any) -> None:
        threads.add(threading.current_thread().name)
        seen.append((future, value))

    with poolkit.Pool(1) as pool:
        future = pool.submit(jobs.report_range, 50, str(go))
        assert future.progress is None
        future.add_progress_callback(on_progress)
        go.write_text("go")  # the job starts reporting only after the callback is in place
        assert future.result(timeout=30) == 50
    assert future.progress == 49
    values = [v for _, v in seen]
    assert values, "the progress callback never fired"
    assert all(f is future for f, _ in seen)
    assert values == sorted(set(values)), "values came out of order or twice"
    assert values[-1] == 49
    assert threading.current_thread().name not in threads


def test_every_value_arrives_when_the_parent_keeps_up(tmp_path: Path) -> None:
    go = tmp_path / "go"
    values: list[int] = []
    with poolkit.Pool(1) as pool:
        future = pool.submit(jobs.report_range, 50, str(go))
        future.add_progress_callback(lambda _f, v: values.append(v))
        go.write_text("go")
        future.result(timeout=30)
    # 50 small values fit in the channel: none had to be dropped
    assert values == list(range(50))


def test_progress_of_concurrent_jobs_stays_with_its_job(tmp_path: Path) -> None:
    go = tmp_path / "go"
    per_job: dict[str, list[int]] = {}
    with poolkit.Pool(2) as pool:
        futures = [pool.submit(jobs.report_range, 30, str(go)) for _ in range(4)]
        for f in futures:
            per_job[f.job_id] = []
            f.add_progress_callback(lambda f, v: per_job[f.job_id].append(v))
        go.write_text("go")
        for f in futures:
            f.result(timeout=30)
    for f in futures:
        assert f.progress == 29
        assert per_job[f.job_id] == sorted(set(per_job[f.job_id]))
        assert per_job[f.job_id][-1] == 29


def test_report_progress_outside_a_job_is_a_no_op() -> None:
    assert poolkit.report_progress("anything") is None
    assert poolkit.report_progress(object()) is None  # not even pickled


def test_a_failing_callback_does_not_hurt_the_job(tmp_path: Path) -> None:
    go = tmp_path / "go"
    good: list[int] = []

    def bad(_f: Any, _v: Any) -> None:
        raise RuntimeError("callback bug")

    with poolkit.Pool(1) as pool:
        future = pool.submit(jobs.report_range, 10, str(go))
        future.add_progress_callback(bad)
        future.add_progress_callback(lambda _f, v: good.append(v))
        go.write_text("go")
        assert future.result(timeout=30) == 10
        assert pool.submit(jobs.pid_of, 1).result(timeout=30)[0] == 1
    assert good[-1] == 9


def test_progress_flood_does_not_block_the_job_on_a_slow_parent(tmp_path: Path) -> None:
    """A callback that sleeps 10 ms per value; the job reports 10,000 values.

    The job's own wall time (measured in the worker) stays small: the worker
    never waits for the parent. And the parent does not queue every value for
    the slow callback: progress is "the latest value", so stale values are
    dropped and the result arrives long before 10,000 x 10 ms = 100 s.
    """
    go = tmp_path / "go"
    calls: list[int] = []
    gave_up = threading.Event()

    def slow(_f: Any, value: int) -> None:
        calls.append(value)
        if not gave_up.is_set():
            time.sleep(0.01)

    with poolkit.Pool(1) as pool:
        future = pool.submit(jobs.report_range, 10_000, str(go))
        future.add_progress_callback(slow)
        go.write_text("go")
        started = time.monotonic()
        try:
            assert future.result(timeout=30) == 10_000, (
                "the result was stuck behind progress values"
            )
        finally:
            gave_up.set()  # a failing run must not hold the pool's shutdown for 100 s
        waited = time.monotonic() - started
    stats = future.stats
    assert stats is not None
    assert stats.wall_time < 5, f"the job took {stats.wall_time:.1f} s: it waited for the parent"
    assert future.progress == 9_999
    assert calls == sorted(set(calls))
    assert calls[-1] == 9_999
    assert len(calls) < 10_000, f"all {len(calls)} values were queued for a slow callback"
    assert waited < 30
