"""The life of a pool: shutdown, interpreter exit, a killed parent, a failing initializer.

A pool must never outlive its owner nor leak into it: after ``shutdown()``
no process, thread or descriptor is left; when the owner is SIGKILLed its
workers (and the programs their jobs started) go too; when the interpreter
exits without ``shutdown()`` the queued jobs still run. Tests that need a
separate owner process run a small script with ``subprocess``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jobs
import psutil
import pytest
from conftest import (
    START_METHODS,
    LeakCheck,
    pid_gone,
    pool_error_of_first_job,
    python_env,
    wait_for_file,
    wait_for_pid_file,
    wait_gone,
)

import poolkit

pytestmark = pytest.mark.timeout(60)


# ----------------------------------------------------------------- shutdown


def test_submit_after_shutdown_raises_runtime_error() -> None:
    pool = poolkit.Pool(1)
    assert pool.submit(jobs.square, 2).result(timeout=30) == 4
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(jobs.square, 3)
    with pytest.raises(RuntimeError):
        pool.map(jobs.square, [1, 2])
    pool.shutdown()  # a second shutdown is harmless


def test_submit_after_shutdown_without_wait_raises_runtime_error(leak_check) -> None:
    pool = poolkit.Pool(1)
    pool.shutdown(wait=False)
    with pytest.raises(RuntimeError):
        pool.submit(jobs.square, 3)
    pool.shutdown(wait=True)


def test_shutdown_finishes_queued_jobs_and_leaves_nothing(leak_check) -> None:
    pool = poolkit.Pool(2)
    futures = [pool.submit(jobs.sleep_then, 0.01, i) for i in range(20)]
    pool.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futures] == list(range(20))
    stats = pool.stats()
    assert stats.workers == ()
    assert stats.done == 20
    leak_check.check()


def test_shutdown_from_a_done_callback_does_not_deadlock(leak_check) -> None:
    pool = poolkit.Pool(1)
    future = pool.submit(jobs.square, 5)
    future.add_done_callback(lambda f: pool.shutdown(wait=True))  # runs in the manager thread
    assert future.result(timeout=30) == 25
    pool.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        pool.submit(jobs.square, 1)


@pytest.mark.timeout(120)
def test_a_hundred_create_shutdown_cycles_leave_nothing() -> None:
    before = LeakCheck.snapshot()
    for cycle in range(100):
        with poolkit.Pool(2) as pool:
            if cycle % 2:
                assert pool.submit(jobs.square, cycle).result(timeout=30) == cycle * cycle
    before.check()


# ----------------------------------------------------------------- the owner is killed

_OWNER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import psutil
    import poolkit
    import jobs

    pool = poolkit.Pool(2, start_method=sys.argv[1])
    directory = sys.argv[2]
    # One worker runs a long job that has started a program of its own.
    busy = pool.submit(jobs.spawn_grandchild, os.path.join(directory, "grandchild"), 120)
    while not os.path.exists(os.path.join(directory, "grandchild")):
        time.sleep(0.005)
    stats = pool.stats()
    while len([w for w in stats.workers if w.state == "ready" and w.pid]) < 2:
        time.sleep(0.005)
        stats = pool.stats()
    print(json.dumps({
        "workers": [w.pid for w in stats.workers],
        "descendants": [p.pid for p in psutil.Process().children(recursive=True)],
    }), flush=True)
    sys.stdin.read()  # wait here to be killed
    """
)


@pytest.mark.parametrize("start_method", START_METHODS)
def test_owner_killed_with_sigkill_leaves_no_orphans(tmp_path: Path, start_method: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _OWNER_SCRIPT, start_method, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    pids: set[int] = set()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the owner script printed nothing"
        seen = json.loads(line)
        grandchild = wait_for_pid_file(tmp_path / "grandchild")
        pids = set(seen["workers"]) | set(seen["descendants"]) | {grandchild}
        assert len(seen["workers"]) == 2 and all(seen["workers"])
        assert grandchild in seen["descendants"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        # The parent-death signal ends them at once; the bound only keeps a failure from hanging.
        wait_gone(pids, timeout=30, what="processes of the killed owner")
        assert proc.stderr is not None
        stderr = proc.stderr.read()  # the template and workers share it: all closed now
        assert "Traceback" not in stderr, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:
            if not pid_gone(pid):
                os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------- interpreter exit

_EXIT_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import poolkit
    import jobs

    directory = sys.argv[2]
    pool = poolkit.Pool(2, start_method=sys.argv[1])
    for i in range(6):
        pool.submit(jobs.sleep_then_write, 0.2, os.path.join(directory, f"done-{i}"), str(i))
    if sys.argv[3] == "drop":
        del pool
    print("submitted", flush=True)
    """
)


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("how", ["keep", "drop"])
def test_interpreter_exit_without_shutdown_runs_the_queued_jobs(
    tmp_path: Path, start_method: str, how: str
) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT, start_method, str(tmp_path), how],
        capture_output=True,
        text=True,
        timeout=60,
        env=python_env(),
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "submitted"
    assert proc.stderr == "", proc.stderr  # no traceback, no warning
    assert sorted(p.name for p in tmp_path.glob("done-*")) == [f"done-{i}" for i in range(6)]
    assert all(wait_for_file(tmp_path / f"done-{i}") == f"{i}\n" for i in range(6))
    assert elapsed < 30


# ----------------------------------------------------------------- a failing initializer


def test_failing_initializer_breaks_the_pool_without_a_respawn_loop(
    tmp_path: Path, leak_check
) -> None:
    pool = poolkit.Pool(2, initializer=jobs.init_count_then_fail, initargs=(str(tmp_path),))
    # The initializer fails within milliseconds, so the pool may break while
    # these are submitted: a job is then refused at submit, with the same error.
    futures, refused = [], []
    for i in range(5):
        try:
            futures.append(pool.submit(jobs.square, i))
        except poolkit.BrokenPool as exc:
            refused.append(exc.__cause__)
    for future in futures:
        with pytest.raises(poolkit.BrokenPool) as info:
            future.result(timeout=30)
        assert isinstance(info.value, poolkit.PoolkitError)
    error = futures[0].exception() if futures else refused[0]
    assert isinstance(error, poolkit.BrokenPool)
    assert "initializer" in str(error)
    assert isinstance(error.__cause__, RuntimeError)
    assert "initializer always fails" in str(error.__cause__)

    with pytest.raises(poolkit.BrokenPool):
        pool.submit(jobs.square, 1)
    from concurrent.futures import BrokenExecutor

    with pytest.raises(BrokenExecutor):
        pool.submit(jobs.square, 1)

    stats = pool.stats()
    pool.shutdown()
    attempts = list(tmp_path.glob("attempt-*"))
    # Each worker that started ran the initializer once; none was started again.
    assert 1 <= len(attempts) <= pool.max_workers, attempts
    assert stats.spawned <= pool.max_workers
    assert pool.stats().spawned == stats.spawned


def test_initializer_that_kills_its_worker_breaks_the_pool(leak_check) -> None:
    pool = poolkit.Pool(1, initializer=jobs.init_crash, initargs=(5,))
    error = pool_error_of_first_job(pool)
    assert isinstance(error, poolkit.BrokenPool)
    assert "exit code 5" in str(error)
    with pytest.raises(poolkit.BrokenPool):
        pool.submit(jobs.square, 3)
    spawned = pool.stats().spawned
    pool.shutdown()
    assert spawned <= 3 + 2 * pool.max_workers  # a bounded number of attempts, not a loop
    assert pool.stats().spawned == spawned


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_initargs_that_will_not_load_break_the_pool_with_the_loading_error(
    start_method: str, leak_check
) -> None:
    # The template loads the config once for all its workers (forkserver); an
    # exec'd worker loads its own (spawn). Either way the loading error is the
    # pool's error, with no respawn loop behind it. (With fork nothing is
    # pickled: see the next test.)
    pool = poolkit.Pool(
        2, start_method=start_method, initializer=jobs.init_write_pid, initargs=(jobs.UnloadableArg(),)
    )
    try:
        error = pool_error_of_first_job(pool)
        assert isinstance(error, poolkit.BrokenPool)
        assert "could not start" in str(error)
        assert isinstance(error.__cause__, ValueError)
        assert "cannot load: argument" in str(error.__cause__)
        with pytest.raises(poolkit.BrokenPool):
            pool.submit(jobs.square, 1)
        spawned = pool.stats().spawned
    finally:
        pool.shutdown()
    assert spawned <= pool.max_workers
    assert pool.stats().spawned == spawned


def test_with_fork_initargs_are_not_pickled_the_initializer_gets_the_objects_themselves() -> None:
    # As the standard library's fork workers inherit their initargs: an object
    # that would not unpickle (or may not be pickled, like a multiprocessing
    # Queue) reaches the initializer as it is.
    with poolkit.Pool(
        1, start_method="fork", initializer=jobs.init_keep, initargs=(jobs.UnloadableArg(),)
    ) as pool:
        assert pool.submit(jobs.kept_type_name).result(timeout=30) == "UnloadableArg"


@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_killed_template_is_replaced_and_its_new_workers_get_the_config(
    start_method: str, tmp_path: Path, leak_check
) -> None:
    with poolkit.Pool(
        2, start_method=start_method, initializer=jobs.init_write_pid, initargs=(str(tmp_path),)
    ) as pool:
        first = pool.submit(jobs.getpid).result(timeout=30)
        template = psutil.Process(first).ppid()
        assert template != os.getpid()
        os.kill(template, signal.SIGKILL)
        wait_gone([first], timeout=10, what="a worker of the killed template")
        # A new template (a fresh interpreter: this process has threads now)
        # forks new workers, and each runs the initializer with its arguments.
        pids = {f.result(timeout=30) for f in [pool.submit(jobs.getpid) for _ in range(10)]}
        assert first not in pids
        inits = {int(p.name.split("-")[1]) for p in tmp_path.glob("init-*")}
        assert first in inits and pids <= inits
        assert all(psutil.Process(pid).ppid() != template for pid in pids)


def test_initializer_runs_once_per_worker(tmp_path: Path) -> None:
    with poolkit.Pool(2, initializer=jobs.init_write_pid, initargs=(str(tmp_path),)) as pool:
        pids = {f.result(timeout=30) for f in [pool.submit(jobs.getpid) for _ in range(20)]}
    inits = sorted(int(p.read_text()) for p in tmp_path.glob("init-*"))
    assert pids <= set(inits)
    assert len(inits) == len(set(inits)) == 2


# ----------------------------------------------------------------- grandchildren


def test_grandchild_ends_when_its_worker_is_killed_for_a_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild"
    with poolkit.Pool(1) as pool:
        future = pool.options(timeout=1).submit(jobs.spawn_grandchild, str(pid_file), 60)
        grandchild = wait_for_pid_file(pid_file)
        assert psutil.pid_exists(grandchild)
        with pytest.raises(poolkit.JobTimeout):
            future.result(timeout=30)
        wait_gone([grandchild], timeout=10, what="the job's child")
        assert pool.submit(jobs.square, 3).result(timeout=30) == 9


def test_grandchild_ends_when_its_worker_retires(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild"
    with poolkit.Pool(1, max_tasks_per_child=1, recycle_jitter=0) as pool:
        first = pool.submit(jobs.spawn_grandchild, str(pid_file))
        grandchild = first.result(timeout=30)
        assert grandchild == wait_for_pid_file(pid_file)
        wait_gone([grandchild], timeout=10, what="the retired worker's child")
        assert pool.submit(jobs.square, 3).result(timeout=30) == 9


def test_grandchild_ends_at_shutdown(tmp_path: Path, leak_check) -> None:
    pid_file = tmp_path / "grandchild"
    with poolkit.Pool(1) as pool:
        grandchild = pool.submit(jobs.spawn_grandchild, str(pid_file)).result(timeout=30)
    wait_gone([grandchild], timeout=10, what="the job's child after shutdown")


def test_grandchild_ends_when_its_worker_crashes(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild"
    with poolkit.Pool(1) as pool:
        future = pool.submit(jobs.spawn_grandchild_then_crash, str(pid_file))
        with pytest.raises(poolkit.WorkerCrashed):
            future.result(timeout=30)
        wait_gone([wait_for_pid_file(pid_file)], timeout=10, what="the crashed worker's child")
