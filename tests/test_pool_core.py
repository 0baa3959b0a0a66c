"""The core engine (issue 2): crash isolation, re-queueing, reaping, pickling, payloads.

Each test states one promise of ``docs/concepts.md`` and checks it the way a
user would see it: through futures, their exceptions and ``pool.stats()``,
plus ``psutil`` for what happens to processes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import jobs
import psutil
import pytest
from conftest import (
    START_METHODS,
    pid_reaped,
    python_env,
    wait_for_pid_file,
    wait_for_pool_size,
    wait_until,
)

import poolkit

pytestmark = pytest.mark.timeout(60)


# ----------------------------------------------------------------- crashes fail only their job


@pytest.mark.parametrize("start_method", START_METHODS)
def test_two_crashes_among_thirty_jobs_fail_only_those_two(start_method: str, leak_check) -> None:
    crash_at = (5, 17)
    with poolkit.Pool(2, start_method=start_method) as pool:
        futures = [
            pool.submit(jobs.square_or_crash, i, crash_at, "segfault" if i == 5 else "exit")
            for i in range(30)
        ]
        results, errors = {}, {}
        for i, future in enumerate(futures):
            try:
                results[i] = future.result(timeout=30)
            except poolkit.WorkerCrashed as exc:
                errors[i] = exc

        assert results == {i: i * i for i in range(30) if i not in crash_at}
        assert sorted(errors) == list(crash_at)

        segv, exited = errors[5], errors[17]
        assert isinstance(segv, BrokenProcessPool)  # stdlib except clauses still catch it
        assert segv.signal_name == "SIGSEGV" and segv.exitcode == -signal.SIGSEGV
        assert exited.signal_name is None and exited.exitcode == 9
        for index, exc in errors.items():
            future = futures[index]
            assert exc.job_id == future.job_id
            assert exc.pid and exc.worker_id
            message = str(exc)
            assert f"pid {exc.pid}" in message
            assert f"worker {exc.worker_id}" in message
            assert f"job {future.job_id}" in message
        assert "SIGSEGV" in str(segv)
        assert "exit code 9" in str(exited)

        assert pool.submit(jobs.square, 12).result(timeout=30) == 144  # the pool still answers
        stats = wait_for_pool_size(pool)
        assert stats.crashed == 2
        assert stats.done == 29
        assert stats.retired.get("crash") == 2
        assert {segv.pid, exited.pid}.isdisjoint(w.pid for w in stats.workers)


def test_worker_killed_from_outside_mid_job(tmp_path: Path, leak_check) -> None:
    pid_file = tmp_path / "pid"
    with poolkit.Pool(2) as pool:
        victim = pool.submit(jobs.write_pid_then_sleep, str(pid_file), 60)
        pid = wait_for_pid_file(pid_file)
        assert pid in {w.pid for w in pool.stats().workers}
        os.kill(pid, signal.SIGKILL)

        with pytest.raises(poolkit.WorkerCrashed) as info:
            victim.result(timeout=30)
        exc = info.value
        assert exc.signal_name == "SIGKILL"
        assert exc.exitcode == -signal.SIGKILL
        assert exc.pid == pid
        assert "SIGKILL" in str(exc)
        assert exc.job_id == victim.job_id

        # The pool keeps serving, on a full set of workers, none of them the dead one.
        assert [f.result(timeout=30) for f in [pool.submit(jobs.square, i) for i in range(10)]] == [
            i * i for i in range(10)
        ]
        stats = wait_for_pool_size(pool)
        assert pid not in {w.pid for w in stats.workers}
        assert stats.crashed == 1


@pytest.mark.parametrize("warm_up", [0, 200], ids=["fresh-window", "deep-pipeline"])
def test_jobs_queued_behind_a_crash_are_requeued_never_failed(
    tmp_path: Path, warm_up: int, leak_check
) -> None:
    """One worker, jobs pipelined behind the one that dies: all of them run, none fails.

    After ``warm_up`` tiny jobs the pool pipelines deeply (many jobs already in
    the dead worker's socket); with none it holds a window of two.
    """
    pid_file = tmp_path / "pid"
    with poolkit.Pool(1) as pool:
        assert [
            f.result(timeout=30) for f in [pool.submit(jobs.square, i) for i in range(warm_up)]
        ] == [i * i for i in range(warm_up)]
        victim = pool.submit(jobs.write_pid_then_sleep, str(pid_file), 60)
        queued = [pool.submit(jobs.value_and_pid, i) for i in range(40)]
        pid = wait_for_pid_file(pid_file)
        os.kill(pid, signal.SIGKILL)

        with pytest.raises(poolkit.WorkerCrashed):
            victim.result(timeout=30)
        outcomes = [f.result(timeout=30) for f in queued]
        assert [x for x, _ in outcomes] == list(range(40))
        assert pid not in {p for _, p in outcomes}  # they ran on the replacement
        assert all(f.stats is not None and f.stats.attempt == 1 for f in queued)
        stats = pool.stats()
        assert stats.crashed == 1
        assert stats.failed == 0
        assert stats.done == warm_up + 40


def test_dead_worker_is_reaped_and_replaced(tmp_path: Path, leak_check) -> None:
    pid_file = tmp_path / "pid"
    with poolkit.Pool(3) as pool:
        before = wait_for_pool_size(pool)
        victim = pool.submit(jobs.write_pid_then_sleep, str(pid_file), 60)
        pid = wait_for_pid_file(pid_file)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(poolkit.WorkerCrashed):
            victim.result(timeout=30)

        # Reaped: not even a zombie is left (the template waits for its children).
        wait_until(lambda: pid_reaped(pid), timeout=10, what=f"worker {pid} to be reaped")
        zombies = [
            p.pid for p in psutil.Process().children(recursive=True) if p.status() == "zombie"
        ]
        assert zombies == []

        # Replaced: the pool is back to three ready workers, one of them new.
        after = wait_for_pool_size(pool)
        old = {w.pid for w in before.workers}
        new = {w.pid for w in after.workers}
        assert pid in old and pid not in new
        assert len(new - old) == 1
        assert after.spawned == 4


# ----------------------------------------------------------------- what can be a job


def _make_closure(factor: int):
    def times(x: int) -> int:
        return x * factor

    return times


@pytest.mark.parametrize("start_method", START_METHODS)
def test_lambdas_and_closures_run(start_method: str) -> None:
    offset = 100
    with poolkit.Pool(2, start_method=start_method) as pool:
        assert pool.submit(lambda x: x + offset, 1).result(timeout=30) == 101
        assert pool.submit(_make_closure(7), 6).result(timeout=30) == 42
        assert list(pool.map(lambda x: -x, range(5), timeout=30)) == [0, -1, -2, -3, -4]


_MAIN_SCRIPT = textwrap.dedent(
    """
    import sys
    import poolkit

    pool = poolkit.Pool(2, start_method=sys.argv[1])  # created before the functions exist

    def main_fn(x):
        return x + 1

    class MainThing:
        def __init__(self, v):
            self.v = v

    def make_thing(v):
        return MainThing(v)

    if __name__ == "__main__":
        y = 10
        closure = lambda x: x * y
        out = [
            pool.submit(main_fn, 1).result(timeout=30),
            pool.submit(lambda x: x * 2, 5).result(timeout=30),
            pool.submit(closure, 4).result(timeout=30),
            pool.submit(lambda thing: thing.v, MainThing(8)).result(timeout=30),
        ]
        thing = pool.submit(make_thing, 7).result(timeout=30)
        out.append((type(thing).__name__, thing.v))
        pool.shutdown()
        print(repr(out))
    """
)


@pytest.mark.parametrize("start_method", START_METHODS)
def test_functions_defined_in_main_after_the_pool_exists(tmp_path: Path, start_method: str) -> None:
    script = tmp_path / "main_jobs.py"
    script.write_text(_MAIN_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), start_method],
        capture_output=True,
        text=True,
        timeout=60,
        env=python_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == repr([2, 10, 40, 8, ("MainThing", 7)])
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------- pickling failures


def test_unpicklable_argument_fails_only_its_future(leak_check) -> None:
    import threading

    with poolkit.Pool(2) as pool:
        before = [pool.submit(jobs.square, i) for i in range(5)]
        bad_lock = pool.submit(jobs.identity, threading.Lock())
        bad_reduce = pool.submit(jobs.identity, jobs.UnpicklableArg())
        after = [pool.submit(jobs.square, i) for i in range(5, 10)]

        with pytest.raises(TypeError, match="pickle"):
            bad_lock.result(timeout=30)
        with pytest.raises(TypeError, match="refuses to be pickled"):
            bad_reduce.result(timeout=30)
        assert [f.result(timeout=30) for f in before + after] == [i * i for i in range(10)]
        assert pool.submit(jobs.square, 3).result(timeout=30) == 9


def test_argument_that_cannot_be_loaded_in_the_worker() -> None:
    with poolkit.Pool(1) as pool:
        bad = pool.submit(jobs.identity, jobs.UnloadableArg())
        good = pool.submit(jobs.square, 4)
        # The standard library reports this as BrokenProcessPool (and breaks);
        # poolkit fails this job only, with an error that is one.
        with pytest.raises(BrokenProcessPool, match="could not be unpickled in its worker"):
            bad.result(timeout=30)
        error = bad.exception()
        assert isinstance(error, poolkit.UnpicklingFailed)
        assert isinstance(error.__cause__, ValueError)
        assert "cannot load: argument" in str(error.__cause__)
        assert isinstance(error.__cause__.__cause__, poolkit.RemoteTraceback)
        assert good.result(timeout=30) == 16


def test_result_that_cannot_be_pickled_in_the_worker() -> None:
    with poolkit.Pool(1) as pool:
        bad = pool.submit(jobs.return_lock)
        good = pool.submit(jobs.square, 5)
        with pytest.raises(TypeError, match="pickle"):
            bad.result(timeout=30)
        assert isinstance(bad.exception().__cause__, poolkit.RemoteTraceback)
        assert good.result(timeout=30) == 25
        pids = {pool.submit(jobs.getpid).result(timeout=30) for _ in range(3)}
        assert pids == {bad.pid}  # the worker was not harmed: no crash, no respawn
        assert pool.stats().crashed == 0


def test_result_that_cannot_be_unpickled_in_the_parent() -> None:
    with poolkit.Pool(1) as pool:
        bad = pool.submit(jobs.return_unloadable, "boom")
        good = pool.submit(jobs.square, 6)
        with pytest.raises(pickle.UnpicklingError, match="could not be unpickled") as info:
            bad.result(timeout=30)
        assert isinstance(info.value.__cause__, ValueError)
        assert "cannot load: boom" in str(info.value.__cause__)
        assert good.result(timeout=30) == 36
        assert pool.submit(jobs.square, 7).result(timeout=30) == 49


# ----------------------------------------------------------------- payloads


def test_64_mib_payload_round_trips() -> None:
    payload = os.urandom(1024) * (64 * 1024)  # 64 MiB
    with poolkit.Pool(2) as pool:
        assert pool.submit(jobs.length, payload).result(timeout=60) == len(payload)
        back = pool.submit(jobs.identity, payload).result(timeout=60)
        assert back == payload
        assert pool.submit(jobs.square, 3).result(timeout=30) == 9  # the channel is intact after


def test_huge_int_round_trips() -> None:
    huge = 10**100000
    with poolkit.Pool(1) as pool:
        assert pool.submit(jobs.identity, huge).result(timeout=30) == huge
        assert pool.submit(jobs.add, huge, 1).result(timeout=30) == huge + 1


# ----------------------------------------------------------------- what a job raises


def test_system_exit_in_a_job_comes_back_as_system_exit() -> None:
    with poolkit.Pool(1) as pool:
        future = pool.submit(jobs.raise_system_exit, 4)
        with pytest.raises(SystemExit) as info:
            future.result(timeout=30)
        assert info.value.code == 4
        pid = future.pid
        assert pool.submit(jobs.getpid).result(timeout=30) == pid  # the worker survived it
        assert pool.stats().crashed == 0


def test_remote_traceback_is_the_cause_and_shows_the_job_line() -> None:
    with poolkit.Pool(1) as pool:
        future = pool.submit(jobs.raise_job_error, "the message")
        with pytest.raises(jobs.JobError, match="the message") as info:
            future.result(timeout=30)
        cause = info.value.__cause__
        assert isinstance(cause, poolkit.RemoteTraceback)
        text = str(cause)
        assert "raise JobError(message)  # the remote traceback must show this line" in text
        assert "jobs.py" in text and "raise_job_error" in text


@pytest.mark.parametrize("start_method", START_METHODS)
def test_each_start_method_runs_jobs(start_method: str, leak_check) -> None:
    with poolkit.Pool(2, start_method=start_method) as pool:
        assert pool.config.start_method == start_method
        futures = [pool.submit(jobs.value_and_pid, i) for i in range(20)]
        outcomes = [f.result(timeout=30) for f in futures]
        assert [x for x, _ in outcomes] == list(range(20))
        pids = {p for _, p in outcomes}
        assert os.getpid() not in pids
        assert pids <= {w.pid for w in pool.stats().workers}


# ----------------------------------------------------------------- scheduling


def _pipelining(pool: poolkit.Pool) -> None:
    """Warm ``pool`` up on tiny jobs until it queues several jobs per worker, or skip the test."""
    dispatcher = pool._manager._dispatcher  # the precondition only: it pipelines
    for _ in range(10):
        assert list(pool.map(jobs.square, range(300), chunksize=1))[-1] == 299 * 299
        if dispatcher.window() > 1:
            wait_for_pool_size(pool)
            return
    pytest.skip("tiny jobs measure too slow on this machine right now for the pool to pipeline")


@contextlib.contextmanager
def _one_batch(pool: poolkit.Pool) -> Iterator[None]:
    """Jobs submitted in this block reach the pool's manager together, in one pass of its loop.

    The manager is held while it unpickles a result (jobs.HeldOnArrival), so
    what is submitted meanwhile waits in its inbox: no delay is guessed.
    """
    jobs.MANAGER_HELD.clear()
    jobs.MANAGER_GO.clear()
    gate = pool.submit(jobs.held_on_arrival, "gate")
    try:
        assert jobs.MANAGER_HELD.wait(30)
        yield
    finally:
        jobs.MANAGER_GO.set()
    assert gate.result(timeout=30) == "gate"


def test_jobs_queued_behind_a_job_that_turns_long_run_on_the_other_worker(tmp_path: Path) -> None:
    """Jobs sent ahead to a worker before its job was known to be long are taken back and run elsewhere.

    Warmed up on tiny jobs, the pool queues several jobs per worker. The long
    job and forty quick ones arrive in one batch, so quick jobs are queued
    behind the long one on the same worker. None may wait for it: the other
    worker runs them all.
    """
    go = tmp_path / "go"
    started = tmp_path / "started"
    with poolkit.Pool(2) as pool:
        _pipelining(pool)
        with _one_batch(pool):
            busy = pool.submit(jobs.started_then_wait, str(started), str(go), "long")
            quick = [pool.submit(jobs.value_and_pid, i) for i in range(40)]
        long_pid = wait_for_pid_file(started)
        try:
            done, _ = concurrent.futures.wait(quick, timeout=30)
            assert len(done) == len(quick), f"waiting behind the long job: {pool.stats()}"
            assert [f.result()[0] for f in quick] == list(range(40))
            assert long_pid not in {f.result()[1] for f in quick}
            assert not busy.done()
        finally:
            go.touch()
        assert busy.result(timeout=30) == "long"


def test_terminating_a_job_queued_on_a_busy_worker_takes_it_back(tmp_path: Path) -> None:
    """A job queued behind a running one, terminated, never runs; the running one and the worker go on."""
    go = tmp_path / "go"
    started = tmp_path / "started"
    with poolkit.Pool(1) as pool:
        _pipelining(pool)
        with _one_batch(pool):
            running = pool.submit(jobs.started_then_wait, str(started), str(go), "ran")
            queued = [pool.submit(jobs.value_and_pid, i) for i in range(5)]
        pid = wait_for_pid_file(started)
        assert queued[1].terminate() is True
        assert queued[1].cancelled()
        go.touch()
        assert running.result(timeout=30) == "ran"
        outcomes = [f.result(timeout=30) for f in (queued[0], *queued[2:])]
        assert outcomes == [(i, pid) for i in (0, 2, 3, 4)]  # the same worker: nobody was killed
        stats = pool.stats()
    assert stats.retired == {} and stats.cancelled == 1 and stats.done >= 5


@pytest.mark.parametrize("warm_up", [False, True], ids=["fresh", "after-tiny-jobs"])
def test_a_job_never_waits_behind_a_long_one_while_a_worker_is_idle(
    tmp_path: Path, warm_up: bool
) -> None:
    """A worker that is busy must not be handed a second job while another worker sits idle."""
    go = tmp_path / "go"
    started = tmp_path / "started"
    with poolkit.Pool(2) as pool:
        if warm_up:  # the pool now believes jobs are tiny and pipelines deeply
            assert list(pool.map(jobs.square, range(200), chunksize=1)) == [
                i * i for i in range(200)
            ]
        wait_for_pool_size(pool)
        busy = pool.submit(jobs.started_then_wait, str(started), str(go), "long")
        wait_for_pid_file(started)
        try:
            quick = [pool.submit(jobs.value_and_pid, i) for i in range(3)]
            # Each of these must run on the idle worker now, not after the long job.
            done, _ = concurrent.futures.wait(quick, timeout=30)
            assert len(done) == 3, f"waiting behind the long job: {quick}, busy on {busy.worker_id}, {pool.stats()}"
            assert [f.result()[0] for f in quick] == [0, 1, 2]
            assert all(f.worker_id != busy.worker_id for f in quick)
        finally:
            go.touch()
        assert busy.result(timeout=30) == "long"
