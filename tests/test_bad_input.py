"""Bad input: wrong options, things that cannot be jobs, and awkward callers.

A mistake in the caller's code must be reported at the line that made it,
with the value named, and must never hurt the pool or other jobs: a bad
option fails ``Pool(...)``, a bad job fails its own future, a pool used from
many threads or from a forked child stays consistent.
"""

from __future__ import annotations

import math
import multiprocessing
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import jobs
import pytest
from conftest import python_env

import poolkit

pytestmark = pytest.mark.timeout(60)

# ----------------------------------------------------------------- construction

# (option, bad value, expected error type)
BAD_OPTIONS: list[tuple[str, Any, type[Exception]]] = [
    ("max_workers", 0, ValueError),
    ("max_workers", -1, ValueError),
    ("max_workers", "2", TypeError),
    ("max_workers", 2.5, TypeError),
    ("max_workers", True, TypeError),
    ("min_workers", -1, ValueError),
    ("min_workers", 9, ValueError),  # above max_workers=2
    ("min_workers", "1", TypeError),
    ("start_method", "bogus", ValueError),
    ("start_method", 3, ValueError),
    ("mp_context", object(), TypeError),
    ("initializer", 3, TypeError),
    ("initializer", "jobs.init_fail", TypeError),
    ("initargs", 5, TypeError),
    ("finalizer", 3, TypeError),
    ("finalargs", 5, TypeError),
    ("preload", "os", TypeError),
    ("preload", [3], TypeError),
    ("preload", ["no_such_module_for_poolkit_tests"], ModuleNotFoundError),
    ("max_tasks_per_child", 0, ValueError),
    ("max_tasks_per_child", -1, ValueError),
    ("max_tasks_per_child", "3", TypeError),
    ("max_tasks_per_child", 1.5, TypeError),
    ("recycle_jitter", -0.1, ValueError),
    ("recycle_jitter", 1.5, ValueError),
    ("recycle_jitter", "a bit", TypeError),
    ("max_memory_per_child", "lots", ValueError),
    ("max_memory_per_child", -5, ValueError),
    ("max_memory_per_child", 0, ValueError),
    ("max_memory_per_child", 1.5, TypeError),
    ("max_memory_per_child", "12 parsecs", ValueError),
    ("memory_limit_per_child", "lots", ValueError),
    ("memory_limit_per_child", -1, ValueError),
    ("memory_limit_per_child", "-1GiB", ValueError),
    ("memory_check_interval", 0, ValueError),
    ("memory_check_interval", -1, ValueError),
    ("memory_check_interval", "often", TypeError),
    ("max_lifetime_per_child", 0, ValueError),
    ("max_lifetime_per_child", -1, ValueError),
    ("max_lifetime_per_child", math.nan, ValueError),
    ("idle_timeout", -1, ValueError),
    ("idle_timeout", "1s", TypeError),
    ("job_timeout", 0, ValueError),
    ("job_timeout", -1, ValueError),
    ("job_timeout", math.nan, ValueError),
    ("job_timeout", "5", TypeError),
    ("kill_grace", 0, ValueError),
    ("kill_grace", -1, ValueError),
    ("exit_timeout", 0, ValueError),
    ("exit_timeout", -1, ValueError),
    ("exit_timeout", "soon", TypeError),
    ("name", 5, TypeError),
]


@pytest.mark.parametrize(
    ("option", "value", "error"),
    BAD_OPTIONS,
    ids=[f"{o}={v!r}" for o, v, _ in BAD_OPTIONS],
)
def test_bad_option_is_refused_at_construction_naming_the_value(
    option: str, value: Any, error: type[Exception], leak_check
) -> None:
    kwargs: dict[str, Any] = {"max_workers": 2, option: value}
    with pytest.raises(error) as info:
        poolkit.Pool(**kwargs)
    message = str(info.value)
    if error is not ModuleNotFoundError:
        assert option in message, message
        shown = value if isinstance(value, (str, int, float)) else None
        if shown is not None:
            assert repr(shown) in message or str(shown) in message, message
    leak_check.check()  # a refused pool starts nothing


def test_mp_context_and_start_method_together_are_refused() -> None:
    with pytest.raises(ValueError, match="mp_context"):
        poolkit.Pool(1, mp_context=multiprocessing.get_context("fork"), start_method="spawn")


def test_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="max_worker"):
        poolkit.Pool(max_worker=2)  # type: ignore[call-arg]


def test_executor_refuses_the_same_bad_values() -> None:
    with pytest.raises(ValueError, match="max_workers"):
        poolkit.ProcessPoolExecutor(max_workers=0)
    with pytest.raises(ValueError, match="-1"):
        poolkit.ProcessPoolExecutor(1, max_tasks_per_child=-1)
    with pytest.raises(TypeError, match="initializer"):
        poolkit.ProcessPoolExecutor(1, initializer=3)  # type: ignore[arg-type]


BAD_JOB_OPTIONS: list[tuple[str, Any, type[Exception]]] = [
    ("timeout", 0, ValueError),
    ("timeout", -1, ValueError),
    ("timeout", math.nan, ValueError),
    ("timeout", "5", ValueError),
    ("retries", -1, ValueError),
    ("retries", 1.5, ValueError),
    ("job_id", 3, TypeError),
    ("job_type", 3, TypeError),
    ("job_id", "a\0b", ValueError),  # it becomes an environment variable in the worker
    ("job_type", "\0", ValueError),
]


@pytest.fixture(scope="module")
def shared_pool():
    with poolkit.Pool(2) as pool:
        yield pool


@pytest.mark.parametrize(
    ("option", "value", "error"),
    BAD_JOB_OPTIONS,
    ids=[f"{o}={v!r}" for o, v, _ in BAD_JOB_OPTIONS],
)
def test_bad_per_job_option_is_refused(
    shared_pool: poolkit.Pool, option: str, value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match=option):
        shared_pool.options(**{option: value})
    assert shared_pool.submit(jobs.square, 3).result(timeout=30) == 9


def test_a_job_id_in_use_is_refused(shared_pool: poolkit.Pool, tmp_path: Path) -> None:
    go = tmp_path / "go"
    first = shared_pool.options(job_id="same").submit(jobs.wait_for_file_then, str(go), 1)
    with pytest.raises(ValueError, match="same"):
        shared_pool.options(job_id="same").submit(jobs.square, 2)
    go.touch()
    assert first.result(timeout=30) == 1


# ----------------------------------------------------------------- things that cannot be jobs


class _CallableWithLock:
    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self) -> int:
        return 1


@pytest.mark.parametrize("not_callable", [None, 3, "jobs.square", threading.Lock()])
def test_submitting_a_non_callable_raises_type_error_at_once(
    shared_pool: poolkit.Pool, not_callable: Any
) -> None:
    with pytest.raises(TypeError, match="not callable"):
        shared_pool.submit(not_callable)


def test_unpicklable_callables_fail_their_own_future(shared_pool: poolkit.Pool) -> None:
    holder = _CallableWithLock()
    bad = [
        shared_pool.submit(holder),  # an instance holding a lock
        shared_pool.submit(holder.__call__),  # its bound method
    ]
    good = shared_pool.submit(jobs.square, 4)
    for future in bad:
        with pytest.raises(TypeError, match="pickle"):
            future.result(timeout=30)
    assert good.result(timeout=30) == 16


def test_objects_whose_reduce_raises_fail_their_own_future(shared_pool: poolkit.Pool) -> None:
    as_arg = shared_pool.submit(jobs.identity, jobs.UnpicklableArg())
    as_kwarg = shared_pool.submit(jobs.echo_kwargs, x=jobs.UnpicklableArg())
    nested = shared_pool.submit(jobs.identity, {"deep": [1, (2, jobs.UnpicklableArg())]})
    for future in (as_arg, as_kwarg, nested):
        with pytest.raises(TypeError, match="refuses to be pickled"):
            future.result(timeout=30)
    assert shared_pool.submit(jobs.echo_kwargs, 1, y=2).result(timeout=30) == ((1,), {"y": 2})


def test_map_with_an_unpicklable_item_raises_when_reached(shared_pool: poolkit.Pool) -> None:
    items = [1, 2, jobs.UnpicklableArg(), 4]
    results = shared_pool.map(jobs.identity, items, chunksize=1)
    assert next(results) == 1
    assert next(results) == 2
    with pytest.raises(TypeError, match="refuses to be pickled"):
        next(results)


def test_callable_that_returns_a_generator(shared_pool: poolkit.Pool) -> None:
    """A generator cannot cross processes: the future says so; the worker is unharmed."""
    future = shared_pool.submit(jobs.return_generator, 3)
    with pytest.raises(TypeError, match="generator"):
        future.result(timeout=30)
    assert isinstance(future.exception().__cause__, poolkit.RemoteTraceback)
    assert shared_pool.submit(jobs.square, 5).result(timeout=30) == 25


def test_generator_function_as_a_job(shared_pool: poolkit.Pool) -> None:
    def numbers():
        yield 1

    with pytest.raises(TypeError, match="generator"):
        shared_pool.submit(numbers).result(timeout=30)


# ----------------------------------------------------------------- awkward callers


def test_submit_from_inside_a_job(shared_pool: poolkit.Pool) -> None:
    """Documented behaviour: a job cannot use the caller's pool (clear TypeError), but pools nest."""
    sent_pool = shared_pool.submit(jobs.identity, shared_pool)
    with pytest.raises(TypeError, match="cannot be sent to a worker"):
        sent_pool.result(timeout=30)
    # A job may make its own pool; it runs in the worker and is shut down with the job.
    assert shared_pool.submit(jobs.nested_submit, 7).result(timeout=30) == 49


@pytest.mark.timeout(120)
def test_eight_threads_submitting_five_hundred_jobs_each(leak_check) -> None:
    threads_n, per_thread = 8, 500
    results: dict[int, list[Any]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads_n)

    with poolkit.Pool(2) as pool:

        def submitter(t: int) -> None:
            try:
                barrier.wait()
                futures = [pool.submit(jobs.add, t * 10_000, i) for i in range(per_thread)]
                results[t] = [f.result(timeout=60) for f in futures] + [f.job_id for f in futures]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=submitter, args=(t,)) for t in range(threads_n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=100)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        job_ids: list[str] = []
        for t in range(threads_n):
            values = results[t][:per_thread]
            assert values == [t * 10_000 + i for i in range(per_thread)]
            job_ids.extend(results[t][per_thread:])
        assert len(set(job_ids)) == threads_n * per_thread  # every job id is unique
        stats = pool.stats()
        assert stats.submitted == stats.done == threads_n * per_thread
        assert stats.failed == stats.crashed == stats.pending == stats.running == 0


_FORK_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import poolkit
    import jobs

    pool = poolkit.Pool(2)
    assert pool.submit(jobs.square, 2).result(timeout=30) == 4
    pid = os.fork()
    if pid == 0:
        try:
            pool.submit(jobs.square, 3)
        except RuntimeError as exc:
            print("child:", type(exc).__name__, "forked child" in str(exc), flush=True)
        pool.shutdown()  # must not touch the parent's workers
        sys.exit(0)      # atexit handlers run in the child too
    _, status = os.waitpid(pid, 0)
    print("child exit:", os.waitstatus_to_exitcode(status), flush=True)
    print("parent:", [f.result(timeout=30) for f in [pool.submit(jobs.square, i) for i in range(5)]])
    print("workers:", len([w for w in pool.stats().workers if w.state == "ready"]))
    pool.shutdown()
    print("done", flush=True)
    """
)


def test_fork_of_a_process_that_owns_a_pool(tmp_path: Path) -> None:
    script = tmp_path / "fork_owner.py"
    script.write_text(_FORK_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=python_env()
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == [
        "child: RuntimeError True",
        "child exit: 0",
        "parent: [0, 1, 4, 9, 16]",
        "workers: 2",
        "done",
    ], proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_fork_in_this_process_leaves_the_pool_working(shared_pool: poolkit.Pool) -> None:
    import os

    assert shared_pool.submit(jobs.square, 2).result(timeout=30) == 4
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which must never return into pytest
        try:
            os.close(read_end)
            try:
                shared_pool.submit(jobs.square, 3)
                outcome = b"submitted"
            except RuntimeError:
                outcome = b"RuntimeError"
            os.write(write_end, outcome)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        outcome = reader.read()
    os.waitpid(pid, 0)
    assert outcome == b"RuntimeError"
    assert shared_pool.submit(jobs.square, 3).result(timeout=30) == 9
    assert list(shared_pool.map(jobs.square, range(10))) == [i * i for i in range(10)]
