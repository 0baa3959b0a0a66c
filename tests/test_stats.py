"""Per-job stats on the future, and pool.stats() counters that match what the jobs did."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import recycle_jobs as jobs
from recycle_jobs import MiB, wait_ready, wait_until

import poolkit

pytestmark = pytest.mark.timeout(120)


def test_job_stats_of_a_sleeping_job() -> None:
    with poolkit.Pool(1) as pool:
        future = pool.options(job_type="nap").submit(jobs.sleep_then_pid, 0.3)
        pid = future.result(timeout=30)
    stats = future.stats
    assert isinstance(stats, poolkit.JobStats)
    assert 0.3 <= stats.wall_time < 5
    assert stats.cpu_time < 0.1  # sleeping costs no CPU
    assert stats.pid == pid == future.pid
    assert stats.worker_id == future.worker_id
    assert stats.attempt == 1
    assert stats.worker_retired is None
    assert stats.peak_rss > 0 and stats.rss_after > 0
    assert future.job_type == "nap" and future.job_id


def test_cpu_time_of_a_cpu_bound_job_is_close_to_wall_time() -> None:
    """cpu_time and wall_time agree with what the job measured itself.

    On an idle machine a CPU-bound job has cpu_time close to wall_time; on a
    shared one it gets less than a full core, so the ratio the pool reports is
    compared with the ratio the job itself saw rather than with 1.
    """
    with poolkit.Pool(1) as pool:
        future = pool.submit(jobs.burn_cpu, 0.5)
        own_cpu, own_wall = future.result(timeout=60)
    stats = future.stats
    assert stats.cpu_time >= 0.5
    assert abs(stats.cpu_time - own_cpu) < 0.05, (stats, own_cpu)
    assert own_wall <= stats.wall_time < own_wall + 0.2, (stats, own_wall)
    assert stats.cpu_time <= stats.wall_time * 1.05 + 0.01
    assert abs(stats.cpu_time / stats.wall_time - own_cpu / own_wall) < 0.1


def test_peak_rss_sees_memory_freed_before_the_job_ended() -> None:
    with poolkit.Pool(1) as pool:
        small = pool.submit(jobs.touch, 1)
        small.result(timeout=30)
        big = pool.submit(jobs.touch, 200)
        big.result(timeout=30)
        after = pool.submit(jobs.touch, 1)
        after.result(timeout=30)
    assert big.stats.peak_rss > 200 * MiB, big.stats
    assert small.stats.peak_rss < 200 * MiB
    # peak is per job: the job after the big one does not inherit its peak
    assert after.stats.peak_rss < 200 * MiB, after.stats
    assert big.stats.rss_after < big.stats.peak_rss


def test_last_job_of_a_worker_says_why_it_retired() -> None:
    with poolkit.Pool(1, max_tasks_per_child=3, recycle_jitter=0) as pool:
        futures = [pool.submit(jobs.pid_of, i) for i in range(9)]
        for f in futures:
            f.result(timeout=30)
    retired = [f.stats.worker_retired for f in futures]
    assert retired == [None, None, "tasks"] * 3
    assert len({f.stats.pid for f in futures}) == 3
    assert [f.stats.worker_id for f in futures] == [w for w in (1, 2, 3) for _ in range(3)]


def test_stats_is_none_for_a_job_whose_worker_died() -> None:
    with poolkit.Pool(1) as pool:
        future = pool.submit(jobs.crash, 4)
        with pytest.raises(poolkit.WorkerCrashed):
            future.result(timeout=30)
    assert future.stats is None


def test_failed_job_still_has_stats() -> None:
    with poolkit.Pool(1) as pool:
        future = pool.submit(jobs.fail, "boom")
        with pytest.raises(ValueError, match="boom"):
            future.result(timeout=30)
    assert future.stats is not None
    assert future.stats.pid == future.pid


def test_pool_counters_match_a_known_mix(tmp_path: Path) -> None:
    go = tmp_path / "go"
    with poolkit.Pool(2) as pool:
        wait_ready(pool, 2)
        ok = [pool.submit(jobs.pid_of, i) for i in range(5)]
        failed = [pool.submit(jobs.fail, f"bad {i}") for i in range(3)]
        crashed = [pool.submit(jobs.crash, 7) for _ in range(2)]
        timed_out = pool.options(timeout=0.3).submit(jobs.sleep, 30)
        for f in ok:
            f.result(timeout=30)
        for f in failed + crashed + [timed_out]:
            assert f.exception(timeout=30) is not None
        # one cancelled: queued behind two blocking jobs, cancelled before it runs
        blockers = [pool.submit(jobs.wait_for_file, str(go)) for _ in range(2)]
        wait_until(lambda: all(b.running() for b in blockers), what="the blockers to run")
        queued = pool.submit(jobs.pid_of, "never")
        assert queued.terminate()  # cancel() may find it already handed to a worker
        assert queued.cancelled()
        go.write_text("go")
        for b in blockers:
            b.result(timeout=30)
        stats = pool.stats()
    assert stats.submitted == 14
    assert stats.done == 7
    assert stats.failed == 3
    assert stats.crashed == 2
    assert stats.timed_out == 1
    assert stats.cancelled == 1
    assert stats.pending == 0 and stats.running == 0
    assert stats.retired == {"crash": 2, "timeout": 1}
    assert stats.spawned == 5


def test_pool_workers_add_up() -> None:
    with poolkit.Pool(2) as pool:
        wait_ready(pool, 2)
        futures = [pool.submit(jobs.sleep_then_pid, 0.01) for _ in range(20)]
        futures += [pool.submit(jobs.fail, "x") for _ in range(5)]
        for f in futures:
            f.exception(timeout=30)
        stats = pool.stats()
    workers = stats.workers
    assert len(workers) == 2
    assert {w.pid for w in workers} == {f.stats.pid for f in futures}
    assert os.getpid() not in {w.pid for w in workers}
    assert sum(w.jobs_done for w in workers) == 25
    for w in workers:
        assert w.state == "ready"
        assert w.rss > 0
        assert w.cpu_time >= 0
        assert w.age > 0
        assert w.current_job is None
        assert w.jobs_done == sum(1 for f in futures if f.stats.pid == w.pid)
    assert {w.worker_id for w in workers} == {f.stats.worker_id for f in futures}


def test_stats_show_the_running_job(tmp_path: Path) -> None:
    go = tmp_path / "go"
    with poolkit.Pool(1) as pool:
        future = pool.options(job_id="watched").submit(jobs.wait_for_file, str(go))
        wait_until(future.running, what="the job to run")
        stats = pool.stats()
        assert stats.running == 1
        assert [w.current_job for w in stats.workers] == ["watched"]
        go.write_text("go")
        future.result(timeout=30)
        assert pool.stats().running == 0


def test_stats_after_shutdown_are_final() -> None:
    pool = poolkit.Pool(2, max_tasks_per_child=2, recycle_jitter=0)
    futures = [pool.submit(jobs.pid_of, i) for i in range(6)]
    for f in futures:
        f.result(timeout=30)
    pool.shutdown()
    stats = pool.stats()
    by_tasks = sum(1 for f in futures if f.stats.worker_retired == "tasks")
    assert by_tasks >= 2
    assert stats.done == 6
    assert stats.workers == ()
    assert stats.retired.get("tasks") == by_tasks
    assert stats.recycled == by_tasks
    assert stats.retired.get("shutdown") == stats.spawned - by_tasks
    assert pool.stats() == stats
