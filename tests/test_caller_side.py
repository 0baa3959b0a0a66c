"""The caller's side: whatever the calling program does, a pool never hangs it.

Each test does what a user's program does (raise inside ``map`` in a
``with`` block, cancel, let ``map(timeout=)`` expire, press Ctrl-C, fork, call
back into the pool from a callback, kill the pool's process) and checks what
the user sees: the program ends, the futures end the right way, no process is
left. Whole programs run as subprocesses under a time limit, so a hang fails
the test instead of hanging the suite; the tests that run in this process
bound every wait.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jobs
import psutil
import pytest
from conftest import REPO_ROOT, LeakCheck, wait_for_file, wait_gone

import poolkit

START_METHODS = ["fork", "forkserver", "spawn"]
PROGRAM_LIMIT = 60.0  # seconds a whole program may take before the test calls it hung


def run_program(
    directory: Path, source: str, *args: str, limit: float = PROGRAM_LIMIT
) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as a user's script (its own ``__main__``); fail if it has not ended within ``limit``."""
    script = directory / "program.py"
    script.write_text(textwrap.dedent(source))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    try:
        return subprocess.run(
            [sys.executable, str(script), *args],
            cwd=directory,
            env=env,
            capture_output=True,
            text=True,
            timeout=limit,
        )
    except subprocess.TimeoutExpired as hung:
        raise AssertionError(
            f"the program did not end within {limit} s (a pool hung it); output so far:\n"
            f"{hung.stdout!r}\n{hung.stderr!r}"
        ) from None


def finishes(action: Callable[[], Any], limit: float = 30.0, what: str = "it") -> Any:
    """Run ``action`` in a thread; fail (instead of hanging) if it has not returned within ``limit``."""
    box: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            box.append(action())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"{what} did not return within {limit} s"
    if errors:
        raise errors[0]
    return box[0]


# ------------------------------------------------------------ leaving a pool


RAISE_IN_MAP = """
    import os, sys, time, poolkit

    def work(n):
        if n == 20:
            if sys.argv[1] == "raise":
                raise ValueError("bad input")
            os.kill(os.getpid(), 11)
        time.sleep(0.01)
        return n

    if __name__ == "__main__":
        with poolkit.Pool(2) as pool:
            try:
                list(pool.map(work, range(40)))
            except (ValueError, poolkit.WorkerCrashed) as exc:
                print("caught", type(exc).__name__)
        print("left the with block")
"""


@pytest.mark.parametrize("how", ["raise", "segfault"])
def test_leaving_a_with_block_after_map_raised_returns(tmp_path: Path, how: str) -> None:
    done = run_program(tmp_path, RAISE_IN_MAP, how)
    assert done.returncode == 0, done.stderr
    expected = "ValueError" if how == "raise" else "WorkerCrashed"
    assert done.stdout.split("\n")[:2] == [f"caught {expected}", "left the with block"]


def test_cancelled_queued_jobs_do_not_keep_shutdown_waiting(leak_check: LeakCheck) -> None:
    pool = poolkit.Pool(1)
    futures = [pool.submit(jobs.sleep_then, 0.3, i) for i in range(6)]
    cancelled = [f.cancel() for f in futures]
    assert any(cancelled), "at least the queued jobs can be cancelled"
    finishes(pool.shutdown, what="shutdown() after cancelling queued jobs")
    for future, was_cancelled in zip(futures, cancelled, strict=True):
        assert future.done()
        assert future.cancelled() == was_cancelled
    assert pool.stats().cancelled == sum(cancelled)


def test_more_cancelled_jobs_than_workers_are_all_skipped_and_later_jobs_run() -> None:
    with poolkit.Pool(2) as pool:
        gate = [pool.submit(jobs.sleep_then, 0.2) for _ in range(2)]
        doomed = [pool.submit(jobs.square, i) for i in range(20)]
        for future in doomed:
            future.cancel()
        after = pool.submit(jobs.square, 7)
        assert after.result(timeout=30) == 49
        for future in gate:
            future.result(timeout=30)
        assert all(f.cancelled() for f in doomed)


MAP_TIMEOUT = """
    import time, concurrent.futures as cf, poolkit

    if __name__ == "__main__":
        with poolkit.Pool(1) as pool:
            try:
                for _ in pool.map(time.sleep, [0.2] * 8, timeout=0.3):
                    pass
            except cf.TimeoutError:
                print("timed out")
        print("left the with block")
"""


def test_map_timeout_expiring_inside_a_with_block_returns(tmp_path: Path) -> None:
    started = time.monotonic()
    done = run_program(tmp_path, MAP_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["timed", "out", "left", "the", "with", "block"]
    # The queued inputs were cancelled: far fewer than 8 x 0.2 s ran (a count bound, not a race).
    del started


OPTIONS_MAP_BREAK = """
    import time, poolkit

    if __name__ == "__main__":
        with poolkit.Pool(1) as pool:
            for value in pool.options(job_type="slow").map(time.sleep, [0.2] * 6):
                break
            print("broke out")
        print("left the with block", pool.stats().cancelled)
"""


def test_breaking_out_of_options_map_then_leaving_returns(tmp_path: Path) -> None:
    done = run_program(tmp_path, OPTIONS_MAP_BREAK)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "broke out"
    assert lines[1].startswith("left the with block")
    assert int(lines[1].split()[-1]) >= 1, "the inputs not started were cancelled"


NEVER_SHUT_DOWN = """
    import time, poolkit

    pool = poolkit.Pool(1)
    futures = [pool.submit(time.sleep, 0.5) for _ in range(6)]
    for future in futures[1:]:
        future.cancel()
    print("exiting")
"""


def test_interpreter_exit_with_cancelled_jobs_and_no_shutdown_returns(tmp_path: Path) -> None:
    done = run_program(tmp_path, NEVER_SHUT_DOWN)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "exiting\n"


# ------------------------------------------------------------ Ctrl-C

CTRL_C = """
    import sys, time, poolkit

    def work(n):
        time.sleep(600 if n >= 2 else 0.0)
        return n

    if __name__ == "__main__":
        if sys.argv[1] == "with":
            with poolkit.Pool(2) as pool:
                for value in pool.map(work, range(100), chunksize=1):
                    print("result", value, flush=True)
        else:  # the program catches Ctrl-C and shuts the pool down itself, which waits
            pool = poolkit.Pool(2)
            try:
                for value in pool.map(work, range(100), chunksize=1):
                    print("result", value, flush=True)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
                pool.shutdown()
                raise
"""


def _interrupt(tmp_path: Path, shape: str) -> tuple[int, str, list[int]]:
    """Run CTRL_C, press Ctrl-C once results flow (and again once the program says it was
    interrupted, for the shape that waits in shutdown); return its exit code, stderr, pool pids."""
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(CTRL_C))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script), shape],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "result 0\n"
        family = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGINT)
        if shape == "catch":
            line = proc.stdout.readline()
            while line.startswith("result"):
                line = proc.stdout.readline()
            assert line == "interrupted\n"
            proc.send_signal(signal.SIGINT)  # the jobs run for 600 s: only this ends the wait
        _, stderr = proc.communicate(timeout=PROGRAM_LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stderr, family


@pytest.mark.parametrize("shape", ["with", "catch"])
def test_ctrl_c_stops_a_program_whose_jobs_would_run_for_ten_minutes(
    tmp_path: Path, shape: str
) -> None:
    code, stderr, family = _interrupt(tmp_path, shape)
    assert code != 0
    assert "KeyboardInterrupt" in stderr
    wait_gone(family, what="the program's pool processes")


# ------------------------------------------------------------ fork in the caller

FORK_THEN_SHUT_DOWN = """
    import os, sys, time, poolkit

    if __name__ == "__main__":
        read_end, write_end = os.pipe()
        with poolkit.Pool(2) as pool:
            assert pool.submit(abs, -1).result() == 1
            child = os.fork()
            if child == 0:
                os.close(write_end)
                os.read(read_end, 1)  # holds every inherited descriptor until released
                os._exit(0)
            assert pool.submit(abs, -2).result() == 2
        print("shut down while the child lives")
        os.close(write_end)
        os.waitpid(child, 0)
"""


def test_a_forked_child_of_the_caller_does_not_hold_shutdown(tmp_path: Path) -> None:
    done = run_program(tmp_path, FORK_THEN_SHUT_DOWN, limit=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "shut down while the child lives\n"


MP_CHILD_WAITS_FOR_PARENT = """
    import multiprocessing as mp, poolkit

    def child(queue):
        print("child got", queue.get(), flush=True)

    if __name__ == "__main__":
        context = mp.get_context("fork")
        queue = context.Queue()
        with poolkit.Pool(2) as pool:
            pool.submit(abs, 1).result()
            process = context.Process(target=child, args=(queue,))
            process.start()
        queue.put("sent after the with block")
        process.join()
        print("exit code", process.exitcode)
"""


def test_an_mp_child_that_waits_for_the_parent_after_the_with_block_does_not_deadlock(
    tmp_path: Path,
) -> None:
    done = run_program(tmp_path, MP_CHILD_WAITS_FOR_PARENT, limit=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["child got sent after the with block", "exit code 0"]


def test_a_forked_child_cannot_use_the_pool_but_the_parent_can() -> None:
    with poolkit.Pool(1) as pool:
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            try:
                pool.submit(abs, 1)
                code = 1
            except RuntimeError:
                code = 0
            os._exit(code)
        _, status = os.waitpid(child, 0)
        os.close(read_end)
        os.close(write_end)
        assert os.waitstatus_to_exitcode(status) == 0, "the child's submit must be refused"
        assert pool.submit(abs, -3).result(timeout=30) == 3


OFF_MAIN_THREAD_THEN_KILLED = """
    import os, sys, threading, poolkit

    if __name__ == "__main__":
        box = []
        thread = threading.Thread(target=lambda: box.append(poolkit.Pool(2, start_method=sys.argv[1])))
        thread.start()
        thread.join()
        pool = box[0]
        pids = {pool.submit(os.getpid).result() for _ in range(8)}
        for worker in pool.stats().workers:
            if worker.pid:
                pids.add(worker.pid)
        child = os.fork()  # a child of the caller holds no copy of the pool's sockets
        if child == 0:
            import time
            time.sleep(60)
            os._exit(0)
        print(" ".join(str(p) for p in sorted(pids)), child, flush=True)
        sys.stdin.readline()
"""


@pytest.mark.parametrize("method", START_METHODS)
def test_a_pool_made_off_the_main_thread_dies_with_its_killed_process(
    tmp_path: Path, method: str
) -> None:
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(OFF_MAIN_THREAD_THEN_KILLED))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script), method],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = None
    try:
        assert proc.stdout is not None
        *pids, child_text = proc.stdout.readline().split()
        child = int(child_text)
        family = [p.pid for p in psutil.Process(proc.pid).children(recursive=True) if p.pid != child]
        assert family, "the pool's template and workers run under the program"
        proc.kill()
        proc.wait(30)
        wait_gone([*family, *map(int, pids)], timeout=20, what="the killed program's pool processes")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ------------------------------------------------------------ threads that end


@pytest.mark.parametrize("method", START_METHODS)
def test_a_pool_made_in_a_thread_that_ends_keeps_its_template(method: str) -> None:
    box: list[poolkit.Pool] = []
    templates: list[int] = []

    def make() -> None:
        pool = poolkit.Pool(1, start_method=method, max_tasks_per_child=1)
        box.append(pool)
        # Once this job has run, the template is fully up (its parent-death signal is set).
        templates.append(pool.submit(jobs.value_and_pid_and_parent, -1).result(timeout=60)[1])

    thread = threading.Thread(target=make)
    thread.start()
    thread.join(90)
    assert not thread.is_alive()
    pool = box[0]
    try:
        # The thread's end sent the template its parent-death signal. Each job
        # below needs a new worker forked by the template: every one of them
        # must come from the template that was there before the thread ended.
        for n in range(4):
            value, pid = pool.submit(jobs.value_and_pid_and_parent, n).result(timeout=60)
            assert value == n
            assert pid == templates[0], "a new template replaced the one the thread started"
        assert pool.stats().crashed == 0
    finally:
        pool.shutdown()


# ------------------------------------------------------------ callbacks


def test_stats_from_a_done_callback_answers(leak_check: LeakCheck) -> None:
    seen: list[poolkit.PoolStats] = []
    called = threading.Event()
    with poolkit.Pool(1) as pool:
        future = pool.submit(jobs.square, 3)

        def callback(_: Any) -> None:
            seen.append(pool.stats())
            called.set()

        future.add_done_callback(callback)
        assert future.result(timeout=30) == 9
        assert called.wait(30), "the callback never returned"
        assert pool.submit(jobs.square, 4).result(timeout=30) == 16
    assert seen[0].done >= 1


def test_stats_from_a_progress_callback_answers(tmp_path: Path) -> None:
    seen: list[int] = []
    go = tmp_path / "go"
    with poolkit.Pool(1) as pool:
        # The job reports only once the callback is in place: values sent before are not replayed.
        future = pool.submit(jobs.report_after, str(go), [1, 2, 3])
        future.add_progress_callback(lambda f, value: seen.append(pool.stats().submitted))
        go.touch()
        assert future.result(timeout=30) == 3
    assert seen, "progress arrived and stats() answered inside the callback"


def test_submit_and_shutdown_from_a_done_callback() -> None:
    pool = poolkit.Pool(1)
    follow_ups: list[Any] = []

    def callback(_: Any) -> None:
        follow_ups.append(pool.submit(jobs.square, 5))
        pool.shutdown(wait=False)

    future = pool.submit(jobs.square, 2)
    future.add_done_callback(callback)
    assert future.result(timeout=30) == 4
    finishes(pool.shutdown, what="shutdown() after a callback called shutdown(wait=False)")
    assert follow_ups[0].result(timeout=30) == 25


def test_a_callback_that_never_returns_breaks_the_pool_after_stall_timeout() -> None:
    release = threading.Event()
    pool = poolkit.Pool(1, stall_timeout=1.0)
    try:
        stuck = pool.submit(jobs.square, 2)
        stuck.add_done_callback(lambda _: release.wait())
        queued = pool.submit(jobs.sleep_then, 300)
        error = queued.exception(timeout=60)
        assert isinstance(error, poolkit.BrokenPool)
        assert "stall_timeout" in str(error)
        with pytest.raises(poolkit.BrokenPool):
            pool.submit(jobs.square, 1)
        finishes(pool.shutdown, what="shutdown() of a stuck pool")
    finally:
        release.set()


def test_a_caller_holding_the_gil_is_not_a_stuck_pool() -> None:
    # The caller's long C call keeps the manager thread *and* the watchdog from
    # running; that pause is not counted, so the pool survives it.
    with poolkit.Pool(1, stall_timeout=0.5) as pool:
        future = pool.submit(jobs.square, 6)
        future.add_done_callback(lambda _: None)
        sum(range(60_000_000))  # one C call, about 1-2 s with the GIL held
        assert future.result(timeout=30) == 36
        assert pool.submit(jobs.square, 7).result(timeout=30) == 49


@pytest.mark.parametrize("method", START_METHODS)
def test_limits_hold_while_the_caller_holds_the_gil(tmp_path: Path, method: str) -> None:
    # Both jobs start, then this thread holds the GIL in one long C call, so the
    # pool's own thread cannot run. The job's timeout and the memory limit must
    # still act during that call: the template enforces them.
    started = [tmp_path / "started-timeout", tmp_path / "started-memory"]
    stopped = tmp_path / "stopped"
    with poolkit.Pool(2, start_method=method, memory_limit_per_child="128MiB") as pool:
        timed = pool.options(timeout=0.3).submit(
            jobs.note_sigterm_then_sleep, str(started[0]), str(stopped)
        )
        grown = pool.submit(jobs.grow_then_sleep, str(started[1]), 1024)
        for path in started:
            wait_for_file(path, timeout=60)
        sum(range(100_000_000))  # one C call that holds the GIL (about a second)
        call_ended = time.monotonic()
        with pytest.raises(poolkit.JobTimeout):
            timed.result(timeout=60)
        error = grown.exception(timeout=60)
    assert float(wait_for_file(stopped)) < call_ended, "SIGTERM came only after the C call"
    assert isinstance(error, poolkit.MemoryLimitExceeded)
    reached = int(re.search(r"reached (\d+) MiB", str(error)).group(1))  # type: ignore[union-attr]
    assert reached < 512, f"the job grew to {reached} MiB before it was stopped"


# ------------------------------------------------------------ the manager's failure path

DESCRIPTORS_RUN_OUT = """
    import os, resource, poolkit

    if __name__ == "__main__":
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        with poolkit.Pool(1, max_tasks_per_child=1) as pool:
            assert pool.submit(abs, -1).result(timeout=30) == 1
            hogs = []
            try:
                while True:
                    hogs.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            # The worker that takes this job retires after it, and no socket
            # can be made for its replacement while the descriptors are gone.
            during = pool.submit(abs, -2)
            print("during", during.result(timeout=30), flush=True)
            for fd in hogs:
                os.close(fd)
            print("after", pool.submit(abs, -3).result(timeout=30), flush=True)
"""


def test_running_out_of_descriptors_for_a_moment_does_not_break_the_pool(tmp_path: Path) -> None:
    done = run_program(tmp_path, DESCRIPTORS_RUN_OUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["during 2", "after 3"]


LOGGING_CANNOT_IMPORT = """
    import logging, sys, poolkit
    sys.modules["structlog"] = None  # any import of it now fails
    logging.basicConfig(level=logging.INFO)

    if __name__ == "__main__":
        pool = poolkit.Pool(1, initializer=lambda: (_ for _ in ()).throw(ValueError("no")))
        try:
            future = pool.submit(abs, 1)
            print(type(future.exception(timeout=30)).__name__)
        except poolkit.BrokenPool:
            print("BrokenPool")
        pool.shutdown()
        print("shut down")
"""


def test_a_pool_that_breaks_while_logging_cannot_import_still_fails_its_futures(
    tmp_path: Path,
) -> None:
    done = run_program(tmp_path, LOGGING_CANNOT_IMPORT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["BrokenPool", "shut down"]


# ------------------------------------------------------------ template replacement

TEMPLATE_KILLED = """
    import os, signal, poolkit

    STATE = "module default"

    def init():
        global STATE
        STATE = "set by the initializer"

    def kill_template(started):
        open(started, "w").close()
        os.kill(os.getppid(), signal.SIGKILL)
        signal.pause()  # the worker dies with its template

    def work(n):
        return n, STATE

    if __name__ == "__main__":
        with poolkit.Pool(1, initializer=init) as pool:
            assert pool.submit(work, -1).result(timeout=30) == (-1, "set by the initializer")
            killer = pool.submit(kill_template, "started")
            queued = [pool.submit(work, n) for n in range(9)]
            print(type(killer.exception(timeout=60)).__name__)
            for future in queued:
                print(*future.result(timeout=60))
"""


def test_jobs_queued_behind_a_job_that_kills_the_template_keep_main_and_initializer(
    tmp_path: Path,
) -> None:
    done = run_program(tmp_path, TEMPLATE_KILLED)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "WorkerCrashed"
    assert lines[1:] == [f"{n} set by the initializer" for n in range(9)]

