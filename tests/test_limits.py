"""Limits: a hard memory limit, job timeouts, terminate(), and bad limit values.

Each limit stops one job and only that job: the test then runs another job
to show the pool goes on, and checks the counters in ``pool.stats()``.
"""

from __future__ import annotations

import pickle
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest
import recycle_jobs as jobs
from recycle_jobs import MiB, live_workers, pid_alive, wait_ready, wait_until

import poolkit

pytestmark = pytest.mark.timeout(120)


# ----------------------------------------------------------------- hard memory limit


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_memory_limit_kills_the_job_and_the_pool_goes_on(
    start_method: str, leak_check: object
) -> None:
    with poolkit.Pool(1, start_method=start_method, memory_limit_per_child="200MiB") as pool:
        future = pool.submit(jobs.allocate_gradually, 2048, 50)
        with pytest.raises(poolkit.MemoryLimitExceeded) as info:
            future.result(timeout=60)
        error = info.value
        assert isinstance(error, poolkit.WorkerCrashed)
        assert isinstance(error, BrokenProcessPool)
        assert "memory" in str(error).lower()
        assert error.job_id == future.job_id
        assert error.pid is not None and error.worker_id is not None
        assert error.signal_name == "SIGKILL"
        assert error.limit == 200 * 2**20
        assert error.rss is not None and error.rss > error.limit
        copy = pickle.loads(pickle.dumps(error))
        assert (copy.rss, copy.limit, copy.pid, copy.job_id) == (error.rss, error.limit, error.pid, error.job_id)
        wait_until(lambda: not pid_alive(error.pid), timeout=10, what="the killed worker to go")

        x, pid = pool.submit(jobs.pid_of, "next").result(timeout=30)
        assert x == "next" and pid != error.pid
        stats = pool.stats()
    assert stats.retired.get("memory_limit") == 1, stats.retired
    assert stats.crashed == 1
    assert stats.done == 1


def test_memory_limit_leaves_small_jobs_alone() -> None:
    with poolkit.Pool(1, memory_limit_per_child="400MiB") as pool:
        assert isinstance(pool.submit(jobs.touch, 100).result(timeout=30), int)
        assert pool.stats().retired == {}


# ----------------------------------------------------------------- timeouts


def _assert_timeout_then_pool_goes_on(pool: poolkit.Pool, future: Any) -> None:
    started = time.monotonic()
    with pytest.raises(poolkit.JobTimeout) as info:
        future.result(timeout=30)
    elapsed = time.monotonic() - started
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, poolkit.PoolkitError)
    assert elapsed < 10, f"a 0.5 s timeout took {elapsed:.1f} s to fire"
    assert future.job_id in str(info.value)
    assert pool.submit(jobs.pid_of, "after").result(timeout=30)[0] == "after"


def test_pool_wide_job_timeout(leak_check: object) -> None:
    with poolkit.Pool(1, job_timeout=0.5) as pool:
        _assert_timeout_then_pool_goes_on(pool, pool.submit(jobs.sleep, 30))
        stats = pool.stats()
    assert stats.timed_out == 1
    assert stats.retired.get("timeout") == 1
    assert stats.done == 1


def test_per_job_timeout(leak_check: object) -> None:
    with poolkit.Pool(1) as pool:
        _assert_timeout_then_pool_goes_on(pool, pool.options(timeout=0.5).submit(jobs.sleep, 30))
        # a job without the option has no timeout
        assert pool.submit(jobs.sleep, 0.7).result(timeout=30) == 0.7
        stats = pool.stats()
    assert stats.timed_out == 1
    assert stats.retired.get("timeout") == 1


def test_per_job_timeout_overrides_the_pool_default() -> None:
    with poolkit.Pool(1, job_timeout=0.3) as pool:
        assert pool.options(timeout=5).submit(jobs.sleep, 0.6).result(timeout=30) == 0.6
        with pytest.raises(poolkit.JobTimeout):
            pool.submit(jobs.sleep, 30).result(timeout=30)


def test_timeout_of_a_job_that_ignores_sigterm(leak_check: object) -> None:
    with poolkit.Pool(1, job_timeout=0.5, kill_grace=0.5) as pool:
        _assert_timeout_then_pool_goes_on(pool, pool.submit(jobs.ignore_sigterm_and_sleep, 30))


def test_timeout_counts_from_the_start_not_from_submit() -> None:
    """Queued behind a long job, a job with a short timeout still gets its full time."""
    with poolkit.Pool(1) as pool:
        first = pool.submit(jobs.sleep, 0.8)
        second = pool.options(timeout=0.6).submit(jobs.sleep, 0.3)
        assert first.result(timeout=30) == 0.8
        assert second.result(timeout=30) == 0.3


# ----------------------------------------------------------------- terminate


def test_terminate_a_running_job(tmp_path: Path, leak_check: object) -> None:
    marker = tmp_path / "started"
    with poolkit.Pool(1) as pool:
        future = pool.submit(jobs.signal_then_sleep, str(marker), 30)
        wait_until(marker.exists, timeout=15, what="the job to start")
        pid = int(wait_until(marker.read_text, timeout=5, what="the pid in the marker"))
        assert future.running()
        assert future.pid == pid
        started = time.monotonic()
        assert future.terminate() is True
        assert future.cancelled()
        assert future.done()
        with pytest.raises(Exception) as info:
            future.result(timeout=5)
        assert type(info.value).__name__ == "CancelledError"
        wait_until(lambda: not pid_alive(pid), timeout=10, what=f"worker {pid} to be gone")
        assert time.monotonic() - started < 10
        _, new_pid = pool.submit(jobs.pid_of).result(timeout=30)
        assert new_pid != pid
        assert pid not in {w.pid for w in pool.stats().workers}
        stats = pool.stats()
    assert stats.retired.get("terminated") == 1
    assert stats.cancelled == 1
    assert stats.crashed == 0 and stats.failed == 0


def test_terminate_a_queued_job_leaves_the_running_one_alone(tmp_path: Path) -> None:
    go = tmp_path / "go"
    with poolkit.Pool(1) as pool:
        running = pool.submit(jobs.wait_for_file, str(go))
        queued = pool.submit(jobs.pid_of, "never")
        wait_until(running.running, timeout=15, what="the first job to run")
        assert queued.terminate() is True
        assert queued.cancelled()
        go.write_text("go")
        pid = running.result(timeout=30)
        assert pool.stats().retired == {}
        assert pool.submit(jobs.pid_of).result(timeout=30)[1] == pid


def test_terminated_queued_job_never_runs(tmp_path: Path) -> None:
    """A job handed to a busy worker but not started yet must not run once terminated."""
    go = tmp_path / "go"
    side_effect = tmp_path / "side-effect"
    with poolkit.Pool(1) as pool:
        wait_ready(pool, 1)
        running = pool.submit(jobs.wait_for_file, str(go))
        queued = pool.submit(jobs.write_file, str(side_effect))
        wait_until(running.running, timeout=15, what="the first job to run")
        assert queued.terminate() is True
        assert queued.cancelled()
        go.write_text("go")
        running.result(timeout=30)
        pool.submit(jobs.pid_of).result(timeout=30)  # the worker has moved past it
    assert not side_effect.exists(), "a terminated job ran anyway"


def test_terminate_a_finished_job_returns_false() -> None:
    with poolkit.Pool(1) as pool:
        future = pool.submit(jobs.pid_of, 1)
        future.result(timeout=30)
        assert future.terminate() is False
        assert not future.cancelled()
        assert future.result() == (1, future.stats.pid)


# ----------------------------------------------------------------- crash


def test_crash_fails_only_its_job_and_is_counted(leak_check: object) -> None:
    with poolkit.Pool(1) as pool:
        wait_ready(pool, 1)
        future = pool.submit(jobs.crash, 3)
        with pytest.raises(poolkit.WorkerCrashed) as info:
            future.result(timeout=30)
        assert info.value.exitcode == 3
        assert "exit code 3" in str(info.value)
        assert pool.submit(jobs.pid_of, 1).result(timeout=30)[0] == 1
        stats = pool.stats()
    assert stats.retired == {"crash": 1}
    assert stats.crashed == 1
    assert stats.spawned == 2


# ----------------------------------------------------------------- retired by reason


def test_retired_counts_every_reason(tmp_path: Path, leak_check: object) -> None:
    """One pool through each way a worker can leave; retired{} counts each once."""
    marker = tmp_path / "started"
    with poolkit.Pool(
        1,
        max_tasks_per_child=3,
        recycle_jitter=0,
        max_memory_per_child="150MiB",
        memory_limit_per_child="400MiB",
    ) as pool:
        wait_ready(pool, 1)
        for i in range(3):  # tasks
            pool.submit(jobs.pid_of, i).result(timeout=30)
        pool.submit(jobs.leak, 200).result(timeout=30)  # memory (RSS after the job)
        with pytest.raises(poolkit.MemoryLimitExceeded):  # memory_limit
            pool.submit(jobs.allocate_gradually, 2048, 50).result(timeout=60)
        with pytest.raises(poolkit.JobTimeout):  # timeout
            pool.options(timeout=0.3).submit(jobs.sleep, 30).result(timeout=30)
        terminated = pool.submit(jobs.signal_then_sleep, str(marker), 30)  # terminated
        wait_until(marker.exists, timeout=15, what="the job to start")
        terminated.terminate()
        with pytest.raises(poolkit.WorkerCrashed):  # crash
            pool.submit(jobs.crash, 5).result(timeout=30)
        assert pool.submit(jobs.pid_of, "last").result(timeout=30)[0] == "last"
        stats = pool.stats()
    assert stats.retired == {
        "tasks": 1,
        "memory": 1,
        "memory_limit": 1,
        "timeout": 1,
        "terminated": 1,
        "crash": 1,
    }, stats.retired
    assert stats.spawned == 7
    assert stats.recycled == 2  # tasks and memory: the crashes and kills are not recycling
    assert stats.crashed == 2  # the memory-limit kill and the crash
    assert stats.timed_out == 1
    assert stats.cancelled == 1
    assert len(live_workers(stats)) == 1


def _own_anon() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_memory_inherited_from_a_large_caller_counts_as_a_share(leak_check: object) -> None:
    """A forked worker shares the caller's pages since the fork: they must not retire or kill it.

    Every worker of a pool started by a program holding a large array maps
    that array; counted in full (RssAnon, RSS), each worker would be over a
    limit the program set for what its jobs use, and be recycled after every
    job. Counted as a share of the pages held with the template and the
    caller, it is not; what a job allocates still counts in full.
    """
    held = bytearray(b"\x01") * (240 * MiB)  # every page written: resident in this process
    limit = int(_own_anon() * 0.7)  # under what each worker maps, over its share of it
    with poolkit.Pool(1, start_method="fork", max_memory_per_child=limit) as pool:
        pids = {pool.submit(jobs.pid_of, i).result(timeout=60)[1] for i in range(4)}
        assert len(pids) == 1, "the worker was retired for memory although its jobs allocated nothing"
        leaker = pool.submit(jobs.leak, limit // MiB + 20).result(timeout=60)[0]
        after = pool.submit(jobs.pid_of, "next").result(timeout=60)[1]
        assert leaker in pids and after != leaker  # what a job keeps still counts
        assert pool.stats().retired.get("memory") == 1
    with poolkit.Pool(
        1, start_method="fork", memory_limit_per_child=limit, memory_check_interval=0.01
    ) as pool:
        pids = {pool.submit(jobs.sleep_then_pid, 0.2).result(timeout=60) for _ in range(3)}
        assert len(pids) == 1, "a job that allocated nothing was killed for memory"
        with pytest.raises(poolkit.MemoryLimitExceeded):  # what a job allocates still counts
            pool.submit(jobs.allocate_gradually, limit // MiB + 100, 20).result(timeout=60)
    del held


# ----------------------------------------------------------------- bad values

BAD_VALUES = [
    ("max_tasks_per_child", 0),
    ("max_tasks_per_child", -3),
    ("max_tasks_per_child", "lots"),
    ("max_tasks_per_child", 2.5),
    ("max_tasks_per_child", True),
    ("recycle_jitter", 2),
    ("recycle_jitter", -0.1),
    ("recycle_jitter", "lots"),
    ("recycle_jitter", None),
    ("max_memory_per_child", 0),
    ("max_memory_per_child", -1),
    ("max_memory_per_child", "lots"),
    ("max_memory_per_child", "-5MiB"),
    ("max_memory_per_child", 1.5),
    ("max_memory_per_child", [512]),
    ("memory_limit_per_child", 0),
    ("memory_limit_per_child", -1),
    ("memory_limit_per_child", "lots"),
    ("memory_limit_per_child", "12 parsecs"),
    ("memory_limit_per_child", 2.0),
    ("memory_check_interval", 0),
    ("memory_check_interval", -1),
    ("memory_check_interval", "lots"),
    ("max_lifetime_per_child", 0),
    ("max_lifetime_per_child", -5),
    ("max_lifetime_per_child", "lots"),
    ("idle_timeout", 0),
    ("idle_timeout", -1),
    ("idle_timeout", "lots"),
    ("min_workers", -1),
    ("min_workers", 3),  # above max_workers=2
    ("min_workers", "lots"),
    ("min_workers", 1.5),
    ("job_timeout", 0),
    ("job_timeout", -0.5),
    ("job_timeout", "lots"),
    ("job_timeout", float("nan")),
    ("kill_grace", 0),
    ("kill_grace", -1),
    ("kill_grace", "lots"),
]


@pytest.mark.parametrize(("option", "value"), BAD_VALUES, ids=[f"{o}={v!r}" for o, v in BAD_VALUES])
def test_bad_values_are_rejected_at_construction(option: str, value: object) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        poolkit.Pool(2, **{option: value})
    message = str(info.value)
    assert repr(value) in message, message
    assert option in message, message


@pytest.mark.parametrize("value", [0, -1, "lots", float("nan")])
def test_bad_per_job_timeout_is_rejected(value: object) -> None:
    with poolkit.Pool(1) as pool, pytest.raises((ValueError, TypeError)) as info:
        pool.options(timeout=value)
    assert repr(value) in str(info.value)
