"""What code written for ``concurrent.futures.ProcessPoolExecutor`` relies on, beyond the API itself.

multiprocessing primitives as initargs, manager proxies, the attributes that
libraries and CPython's own tests read (``_max_workers``, ``_mp_context``,
``_processes``), Python 3.14's ``terminate_workers()``, the error types that
``except`` clauses catch, ``map`` going through an overridden ``submit`` and
freeing each result it hands out, and refusing work once the interpreter exits.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import weakref
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from pathlib import Path
from typing import Any

import jobs
import pytest
from conftest import REPO_ROOT, wait_until

import poolkit

START_METHODS = ["fork", "forkserver", "spawn"]


def run_script(directory: Path, source: str) -> subprocess.CompletedProcess[str]:
    script = directory / "program.py"
    script.write_text(textwrap.dedent(source))
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}"}
    return subprocess.run(
        [sys.executable, str(script)], cwd=directory, env=env, capture_output=True, text=True, timeout=120
    )


# ------------------------------------------------------------ multiprocessing primitives


@pytest.mark.parametrize("method", START_METHODS)
def test_a_queue_and_a_lock_of_the_pools_context_work_as_initargs(method: str) -> None:
    context = mp.get_context(method)
    queue, lock = context.Queue(), context.Lock()
    with poolkit.ProcessPoolExecutor(
        2, mp_context=context, initializer=jobs.init_queue, initargs=(queue, lock)
    ) as pool:
        assert list(pool.map(jobs.put_via_initializer_queue, range(4))) == [0, 1, 2, 3]
        assert sorted(queue.get(timeout=30)[0] for _ in range(4)) == [0, 1, 2, 3]
    queue.close()


@pytest.mark.parametrize("method", START_METHODS)
def test_a_shared_value_and_an_event_work_as_initargs(method: str) -> None:
    context = mp.get_context(method)
    total = context.Value("i", 0)
    with poolkit.ProcessPoolExecutor(
        2, mp_context=context, initializer=jobs.init_keep, initargs=(total,)
    ) as pool:
        list(pool.map(jobs.add_to_kept_value, [1] * 10, chunksize=1))
    assert total.value == 10
    event = context.Event()
    with poolkit.ProcessPoolExecutor(
        1, mp_context=context, initializer=jobs.init_keep, initargs=(event,)
    ) as pool:
        assert pool.submit(jobs.set_kept_event).result(timeout=60)
    assert event.is_set()


@pytest.mark.parametrize("method", START_METHODS)
def test_a_manager_proxy_works_in_jobs(method: str) -> None:
    context = mp.get_context(method)
    with context.Manager() as manager:
        shared = manager.dict()
        with poolkit.ProcessPoolExecutor(1, mp_context=context) as pool:
            pid = pool.submit(jobs.set_in_proxy, shared, "worker").result(timeout=60)
        assert shared["worker"] == pid != os.getpid()


MAIN_GLOBAL = """
    import multiprocessing as mp, sys
    import poolkit

    STATE = "module default"

    def init(value):
        global STATE
        STATE = value

    def read():
        return STATE

    if __name__ == "__main__":
        with poolkit.ProcessPoolExecutor(
            1, mp_context=mp.get_context(sys.argv[1]), initializer=init, initargs=("set",)
        ) as pool:
            print(pool.submit(read).result(timeout=60))
"""


@pytest.mark.parametrize("method", START_METHODS)
def test_a_main_global_set_by_the_initializer_is_seen_by_jobs(tmp_path: Path, method: str) -> None:
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(MAIN_GLOBAL))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, str(script), method], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "set\n"


# ------------------------------------------------------------ attributes


def test_the_attributes_stdlib_code_reads() -> None:
    with poolkit.ProcessPoolExecutor(2, mp_context=mp.get_context("forkserver")) as pool:
        assert pool._max_workers == 2
        assert pool._mp_context.get_start_method() == "forkserver"
        pids = {pool.submit(os.getpid).result(timeout=60) for _ in range(4)}
        processes = wait_until(lambda: len(pool._processes) == 2 and pool._processes)
        assert pids <= set(processes)
        assert all(p.pid == pid and p.is_alive() for pid, p in processes.items())


@pytest.mark.parametrize("how", ["terminate", "kill"])
def test_a_process_from_processes_can_be_stopped_and_the_pool_goes_on(how: str) -> None:
    with poolkit.ProcessPoolExecutor(1) as pool:
        running = pool.submit(jobs.sleep_then, 60)
        pid = wait_until(lambda: running.pid)
        process = pool._processes[pid]
        getattr(process, how)()
        process.join(30)
        assert not process.is_alive()
        with pytest.raises(BrokenProcessPool):
            running.result(timeout=30)
        assert pool.submit(jobs.square, 3).result(timeout=30) == 9


@pytest.mark.parametrize("method_name", ["terminate_workers", "kill_workers"])
def test_terminate_and_kill_workers_fail_running_jobs_and_the_pool_goes_on(method_name: str) -> None:
    with poolkit.ProcessPoolExecutor(2) as pool:
        running = [pool.submit(jobs.sleep_then, 60) for _ in range(2)]
        wait_until(lambda: all(f.running() and f.pid for f in running))
        getattr(pool, method_name)()
        for future in running:
            with pytest.raises(poolkit.WorkerCrashed):
                future.result(timeout=30)
        assert pool.submit(jobs.square, 4).result(timeout=30) == 16


# ------------------------------------------------------------ errors


def test_errors_are_the_standard_librarys_types() -> None:
    with poolkit.ProcessPoolExecutor(1) as pool:
        raised = pool.submit(jobs.raise_value_error, "x").exception(timeout=30)
        assert isinstance(raised.__cause__, _RemoteTraceback)
        # An exception that will not pickle: the pickling error's type, as the stdlib gives.
        unpicklable = pool.submit(jobs.raise_unpicklable).exception(timeout=30)
        assert isinstance(unpicklable, TypeError)
        assert "UnpicklableError" in str(unpicklable)
        # Arguments that will not load in the worker, a result that will not load here.
        for future in (
            pool.submit(jobs.identity, jobs.UnloadableArg()),
            pool.submit(jobs.return_unloadable),
        ):
            error = future.exception(timeout=30)
            assert isinstance(error, BrokenProcessPool)
            assert isinstance(error, poolkit.UnpicklingFailed)
            assert error.__cause__ is not None
        assert pool.submit(jobs.square, 2).result(timeout=30) == 4  # the pool goes on
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        poolkit.ProcessPoolExecutor(0)


# ------------------------------------------------------------ map


def test_map_frees_each_result_once_handed_out() -> None:
    with poolkit.ProcessPoolExecutor(1) as pool:
        results = pool.map(jobs.make_token, range(3), chunksize=3)
        first = next(results)
        ref = weakref.ref(first)
        del first
        gc.collect()
        assert ref() is None, "map still holds a result it has handed out"
        assert [t.n for t in results] == [1, 2]


class CountingExecutor(poolkit.ProcessPoolExecutor):
    """A subclass that counts what goes through submit(), as progress-bar wrappers do."""

    submitted = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        type(self).submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_map_goes_through_a_submit_replaced_on_the_instance() -> None:
    # What tqdm's process_map does to count finished jobs.
    calls: list[int] = []
    with poolkit.ProcessPoolExecutor(2) as pool:
        original = pool.submit

        def counting_submit(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return original(fn, *args, **kwargs)

        pool.submit = counting_submit  # type: ignore[method-assign]
        assert list(pool.map(abs, range(-5, 5), chunksize=1)) == [abs(n) for n in range(-5, 5)]
    assert len(calls) == 10


def test_map_goes_through_an_overridden_submit() -> None:
    CountingExecutor.submitted = 0
    with CountingExecutor(2) as pool:
        assert list(pool.map(jobs.square, range(10))) == [n * n for n in range(10)]
    assert CountingExecutor.submitted >= 1
    with CountingExecutor(2) as pool:
        CountingExecutor.submitted = 0
        assert list(pool.map(jobs.square, range(10), chunksize=1)) == [n * n for n in range(10)]
    assert CountingExecutor.submitted == 10


# ------------------------------------------------------------ interpreter exit

SUBMIT_AT_EXIT = """
    import atexit

    def late():
        try:
            pool.submit(abs, -1)
            print("accepted")
        except RuntimeError as exc:
            print("refused:", exc)

    atexit.register(late)  # registered before poolkit's own hook, so it runs after it
    import poolkit

    pool = poolkit.ProcessPoolExecutor(1)
    print(pool.submit(abs, -2).result(timeout=60))
"""


def test_submit_after_interpreter_shutdown_is_refused(tmp_path: Path) -> None:
    done = run_script(tmp_path, SUBMIT_AT_EXIT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "2",
        "refused: cannot schedule new futures after interpreter shutdown",
    ]


def test_a_failing_initializer_breaks_the_pool_with_the_stdlibs_error() -> None:
    """Code written for the standard library catches BrokenProcessPool; poolkit's BrokenPool is one."""
    with (
        poolkit.ProcessPoolExecutor(1, initializer=jobs.init_fail) as pool,
        pytest.raises(BrokenProcessPool) as caught,
    ):
        pool.submit(jobs.square, 3).result(timeout=60)
    assert isinstance(caught.value, poolkit.BrokenPool)
