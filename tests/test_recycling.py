"""Recycling: workers retire after N jobs, on RSS, on lifetime and when idle.

Every test records which process ran each job (the pid a job returns) and
asserts on what a user can observe: pids, per-job stats, ``pool.stats()``,
and files written by finalizers.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from pathlib import Path

import pytest
import recycle_jobs as jobs
from recycle_jobs import MiB, live_workers, pid_alive, serving_workers, wait_ready, wait_until

import poolkit

pytestmark = pytest.mark.timeout(120)


def _pid_counts(pids: list[int]) -> collections.Counter[int]:
    return collections.Counter(pids)


# ----------------------------------------------------------------- after N jobs


@pytest.mark.parametrize("start_method", ["fork", "forkserver", "spawn"])
def test_pids_change_after_n_jobs(start_method: str, leak_check: object) -> None:
    n = 3
    with poolkit.Pool(
        2, start_method=start_method, max_tasks_per_child=n, recycle_jitter=0
    ) as pool:
        futures = [pool.submit(jobs.pid_of, i) for i in range(30)]
        results = [f.result(timeout=60) for f in futures]
        stats = pool.stats()
    assert [x for x, _ in results] == list(range(30))
    counts = _pid_counts([pid for _, pid in results])
    assert max(counts.values()) <= n, counts
    assert len(counts) >= 30 // n, counts
    assert os.getpid() not in counts
    # jitter 0: every worker that was retired for its job count served exactly n
    retired_pids = {f.stats.pid for f in futures if f.stats.worker_retired == "tasks"}
    assert len(retired_pids) >= 30 // n - 1
    assert all(counts[pid] == n for pid in retired_pids), counts
    assert stats.retired.get("tasks", 0) >= 30 // n - 1
    assert stats.spawned >= 30 // n


def test_executor_drop_in_recycles_with_fork() -> None:
    """The stdlib refuses max_tasks_per_child with fork; poolkit's drop-in accepts it."""
    with poolkit.ProcessPoolExecutor(
        2, max_tasks_per_child=2, start_method="fork", recycle_jitter=0
    ) as executor:
        pids = [pid for _, pid in executor.map(jobs.pid_of, range(12), chunksize=1)]
    counts = _pid_counts(pids)
    assert max(counts.values()) <= 2
    assert len(counts) >= 6


def test_every_job_on_a_fresh_worker() -> None:
    with poolkit.Pool(2, max_tasks_per_child=1, recycle_jitter=0) as pool:
        pids = [pool.submit(jobs.pid_of, i).result(timeout=30)[1] for i in range(10)]
        mapped = [pid for _, pid in pool.map(jobs.pid_of, range(10), chunksize=1)]
    assert len(set(pids + mapped)) == 20


def test_map_with_default_chunksize_still_gives_each_item_a_fresh_worker() -> None:
    """stdlib code relying on max_tasks_per_child=1 for isolation uses map's default chunksize."""
    with poolkit.ProcessPoolExecutor(2, max_tasks_per_child=1) as executor:
        pids = [pid for _, pid in executor.map(jobs.pid_of, range(20))]
    assert len(set(pids)) == 20, collections.Counter(pids)


# ----------------------------------------------------------------- jitter


def _retired_counts(max_tasks: int, jitter: float) -> list[int]:
    with poolkit.Pool(4, max_tasks_per_child=max_tasks, recycle_jitter=jitter) as pool:
        futures = [pool.submit(jobs.pid_of, i) for i in range(240)]
        for f in futures:
            f.result(timeout=60)
    counts = _pid_counts([f.stats.pid for f in futures])
    retired = {f.stats.pid for f in futures if f.stats.worker_retired == "tasks"}
    return [counts[pid] for pid in retired]


def test_jitter_spreads_retirements() -> None:
    spread = _retired_counts(20, 0.5)
    assert len(spread) >= 8
    assert all(10 <= c <= 20 for c in spread), spread
    assert len(set(spread)) > 1, f"jitter 0.5 gave identical job counts {spread}"


def test_no_jitter_retires_exactly_at_n() -> None:
    exact = _retired_counts(20, 0.0)
    assert len(exact) >= 8
    assert set(exact) == {20}, exact


# ----------------------------------------------------------------- on RSS


def test_leaky_job_is_recycled_on_rss(leak_check: object) -> None:
    """60 MiB leaked per call under max_memory_per_child=300MiB: at most 5 calls per worker."""
    with poolkit.Pool(1, max_memory_per_child="300MiB") as pool:
        futures = [pool.submit(jobs.leak, 60) for _ in range(14)]
        results = [f.result(timeout=60) for f in futures]
        stats = pool.stats()
    counts = _pid_counts([pid for pid, _ in results])
    assert max(counts.values()) <= 5, counts
    # what each job saw leaked so far counts up from 1 in every worker: nothing was skipped
    per_pid: dict[int, list[int]] = collections.defaultdict(list)
    for pid, leaked in results:
        per_pid[pid].append(leaked)
    assert all(v == list(range(1, len(v) + 1)) for v in per_pid.values()), per_pid
    assert len(counts) >= 3
    assert stats.retired.get("memory", 0) >= 2, stats.retired
    assert any(f.stats.worker_retired == "memory" for f in futures)
    assert all(f.stats.rss_after > 0 for f in futures)


def test_rss_recycling_parses_plain_bytes() -> None:
    with poolkit.Pool(1, max_memory_per_child=150 * MiB) as pool:
        pids = [pool.submit(jobs.leak, 60).result(timeout=60)[0] for _ in range(6)]
    counts = _pid_counts(pids)
    assert max(counts.values()) <= 3, counts


# ----------------------------------------------------------------- lifetime


def test_workers_retire_after_their_lifetime(leak_check: object) -> None:
    with poolkit.Pool(2, max_lifetime_per_child=0.3, recycle_jitter=0) as pool:
        first = {w.pid for w in wait_ready(pool, 2)}
        assert len(first) == 2
        pids: list[int] = []

        def first_workers_replaced() -> bool:
            batch = [pool.submit(jobs.sleep_then_pid, 0.02) for _ in range(4)]
            pids.extend(f.result(timeout=30) for f in batch)
            current = {w.pid for w in live_workers(pool.stats())}
            return not (current & first) and bool(set(pids[-4:]) - first)

        wait_until(
            first_workers_replaced, timeout=30, what="the first workers to reach their lifetime"
        )
        stats = pool.stats()
    assert stats.retired.get("lifetime", 0) >= 2, stats.retired
    assert set(pids) - first, "jobs ran on workers born after the first ones"
    assert stats.failed == 0 and stats.crashed == 0
    assert stats.done == len(pids)


# ----------------------------------------------------------------- idle


def test_idle_workers_exit_down_to_min_workers(leak_check: object) -> None:
    with poolkit.Pool(4, min_workers=1, idle_timeout=0.3) as pool:
        futures = [pool.submit(jobs.sleep_then_pid, 0.3) for _ in range(8)]
        busy_pids = {f.result(timeout=30) for f in futures}
        assert len(busy_pids) >= 2, "demand should have started more than one worker"
        peak = len(live_workers(pool.stats()))
        assert peak >= 2

        wait_until(
            lambda: len(live_workers(pool.stats())) == 1,
            timeout=15,
            what="idle workers to exit down to min_workers=1",
        )
        stats = pool.stats()
        assert stats.retired.get("idle", 0) >= len(busy_pids) - 1
        assert len([w for w in stats.workers if w.state in ("starting", "ready")]) == 1
        # the pool still serves, and grows again on demand
        again = [pool.submit(jobs.sleep_then_pid, 0.2) for _ in range(4)]
        assert all(isinstance(f.result(timeout=30), int) for f in again)
    assert pool.stats().retired.get("idle", 0) >= 1


def test_idle_timeout_never_goes_below_min_workers() -> None:
    with poolkit.Pool(3, min_workers=2, idle_timeout=0.2) as pool:
        for f in [pool.submit(jobs.sleep_then_pid, 0.2) for _ in range(6)]:
            f.result(timeout=30)
        wait_until(lambda: len(live_workers(pool.stats())) <= 2, timeout=15, what="idle exit")
        # wait several idle periods: the floor holds
        wait_until(
            lambda: pool.stats().retired.get("idle", 0) >= 1, timeout=15, what="an idle retirement"
        )
        for _ in range(3):
            threading.Event().wait(0.25)  # let more idle periods pass; nothing to synchronise on
            assert len(live_workers(pool.stats())) == 2
        assert pool.submit(jobs.pid_of, 1).result(timeout=30)[0] == 1


# ----------------------------------------------------------------- graceful retirement


def test_retirement_runs_the_finalizer_in_every_worker(
    tmp_path: Path, leak_check: object, caplog: pytest.LogCaptureFixture
) -> None:
    """Retiring is graceful: finalizer, then exit code 0 (a non-zero exit would log worker.crashed)."""
    caplog.set_level(logging.INFO, logger="poolkit")
    with poolkit.Pool(
        2,
        max_tasks_per_child=2,
        recycle_jitter=0,
        finalizer=jobs.write_pid_file,
        finalargs=(str(tmp_path),),
    ) as pool:
        futures = [pool.submit(jobs.pid_of, i) for i in range(12)]
        pids = {f.result(timeout=30)[1] for f in futures}
        retired = {f.stats.pid for f in futures if f.stats.worker_retired == "tasks"}
        assert len(retired) >= 4
        # a worker retired for its job count exits by itself, through its finalizer
        for pid in retired:
            wait_until(lambda pid=pid: not pid_alive(pid), timeout=15, what=f"worker {pid} to exit")
            assert (tmp_path / str(pid)).read_text() == "finalized"
        stats = pool.stats()
        assert "crash" not in stats.retired, stats.retired
    # after shutdown every worker that ever ran a job left its file
    assert {int(p.name) for p in tmp_path.iterdir()} >= pids
    final = pool.stats()
    assert "crash" not in final.retired
    assert final.crashed == 0 and final.failed == 0
    messages = [r.getMessage() for r in caplog.records if r.name == "poolkit"]
    assert not [m for m in messages if m.startswith("worker.crashed")], messages
    assert sum(m.startswith("worker.retired") for m in messages) == final.spawned


def test_replacement_starts_before_the_old_worker_is_gone() -> None:
    """With max_tasks_per_child=1 and 2 workers, capacity never drops below 2.

    Sampled while jobs run: at every snapshot at least 2 workers are starting,
    ready, or still running their last job (a worker whose last job has
    finished and that is on its way out does not count).
    """
    with poolkit.Pool(2, max_tasks_per_child=1, recycle_jitter=0) as pool:
        wait_ready(pool, 2)
        futures = [pool.submit(jobs.sleep, 0.02) for _ in range(40)]
        samples = []
        while not all(f.done() for f in futures):
            stats = pool.stats()
            if stats.pending:  # while work is waiting, the pool must be at full strength
                samples.append(len(serving_workers(stats)))
        for f in futures:
            f.result(timeout=30)
    assert len(samples) > 10
    assert min(samples) >= 2, collections.Counter(samples)


@pytest.mark.parametrize("max_tasks", [1, 3])
def test_recycling_never_runs_more_than_max_workers_jobs_at_once(max_tasks: int) -> None:
    with poolkit.Pool(2, max_tasks_per_child=max_tasks, recycle_jitter=0) as pool:
        wait_ready(pool, 2)
        spans = [f.result(timeout=60) for f in [pool.submit(jobs.span, 0.05) for _ in range(30)]]
    assert jobs.max_overlap(spans) <= 2, (
        f"{jobs.max_overlap(spans)} jobs ran at once with max_workers=2"
    )
    counts = _pid_counts([pid for _, _, pid in spans])
    assert max(counts.values()) <= max_tasks


# ----------------------------------------------------------------- stats().retired


def test_retired_counts_tasks_and_spawned() -> None:
    with poolkit.Pool(1, max_tasks_per_child=2, recycle_jitter=0) as pool:
        for i in range(6):
            assert pool.submit(jobs.pid_of, i).result(timeout=30)[0] == i
        # the third worker retires after job 6; wait until its replacement was spawned
        wait_until(lambda: pool.stats().spawned == 4, timeout=15, what="4th spawn")
        stats = pool.stats()
    assert stats.retired == {"tasks": 3}
    assert stats.spawned == 4
    assert stats.recycled == 3
    final = pool.stats()
    assert final.retired.get("tasks") == 3
    assert final.retired.get("shutdown") == 1
    assert final.recycled == 3


def test_pool_does_not_spin_while_a_retiring_worker_runs_its_last_job() -> None:
    """The manager sleeps in ``select`` while nothing is due, whatever the idle rule says.

    With ``max_tasks_per_child=1`` the worker that takes the job retires at
    once and its replacement idles past ``idle_timeout`` but may not retire
    (``min_workers=1``). The manager thread lives in this process, so a busy
    loop shows up as this process's CPU time while the job sleeps.
    """
    job_seconds = 3.0
    with poolkit.Pool(2, min_workers=1, idle_timeout=0.3, max_tasks_per_child=1) as pool:
        pool.submit(jobs.sleep_then_pid, 0.0).result(timeout=30)  # started and warm
        cpu_before = time.process_time()
        pool.submit(jobs.sleep_then_pid, job_seconds).result(timeout=60)
        cpu_used = time.process_time() - cpu_before
    assert cpu_used < 0.5, f"the pool's process used {cpu_used:.2f} s of CPU over a {job_seconds:g} s job"
