"""``from poolkit import ProcessPoolExecutor`` as a one-line change from the standard library.

These tests use only the ``concurrent.futures`` API (plus poolkit's
documented differences: a crash fails one job, ``max_tasks_per_child`` works
with fork), so each one is something code written for the stdlib does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import inspect
import multiprocessing
import os
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import jobs
import pytest
from conftest import START_METHODS, wait_for_file

import poolkit
from poolkit import ProcessPoolExecutor

pytestmark = pytest.mark.timeout(60)


def test_signature_matches_the_standard_library() -> None:
    ours = inspect.signature(ProcessPoolExecutor)
    stdlib = inspect.signature(cf.ProcessPoolExecutor)
    for name, param in stdlib.parameters.items():
        assert name in ours.parameters, name
        mine = ours.parameters[name]
        assert mine.kind == param.kind, name
        assert mine.default == param.default, name
    assert issubclass(ProcessPoolExecutor, cf.Executor)
    assert issubclass(ProcessPoolExecutor, poolkit.Pool)


def test_positional_arguments_as_in_the_stdlib(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(2, ctx, jobs.init_write_pid, (str(tmp_path),)) as ex:
        pids = {f.result(timeout=30) for f in [ex.submit(jobs.getpid) for _ in range(8)]}
    assert ex.max_workers == 2
    written = {int(p.read_text()) for p in tmp_path.glob("init-*")}
    assert pids <= written


def test_submit_and_result() -> None:
    with ProcessPoolExecutor(2) as ex:
        future = ex.submit(jobs.add, 2, b=3)
        assert isinstance(future, cf.Future)
        assert future.result(timeout=30) == 5
        assert future.done() and not future.cancelled()
        with pytest.raises(ValueError, match="nope"):
            ex.submit(jobs.raise_value_error, "nope").result(timeout=30)


def test_map_in_order_with_several_iterables_and_chunksize() -> None:
    with ProcessPoolExecutor(2) as ex:
        assert list(ex.map(jobs.square, range(100), timeout=30)) == [i * i for i in range(100)]
        assert list(ex.map(jobs.square, range(100), chunksize=7)) == [i * i for i in range(100)]
        assert list(ex.map(jobs.add, range(5), range(10, 20))) == [
            10,
            12,
            14,
            16,
            18,
        ]  # shortest wins
        assert list(ex.map(jobs.square, [])) == []


@pytest.mark.parametrize(
    ("chunksize", "before_error"),
    [(None, [0, 1, 4, 9]), (1, [0, 1, 4, 9]), (3, [0, 1, 4])],
    ids=["auto", "1", "3"],
)
def test_map_raises_the_first_exception_when_reached(
    chunksize: int | None, before_error: list[int]
) -> None:
    """As the stdlib: items before the failing one's chunk are yielded, then the error is raised.

    (With ``chunksize=3`` the stdlib fails the whole chunk ``[3, 4, 5]``; poolkit's
    automatic chunking promises the results of ``chunksize=1``.)
    """
    with ProcessPoolExecutor(2) as ex:
        kwargs = {} if chunksize is None else {"chunksize": chunksize}
        results = ex.map(jobs.square_or_raise, range(10), **kwargs)
        assert [next(results) for _ in before_error] == before_error
        with pytest.raises(ValueError, match="4 is unlucky"):
            next(results)


def test_map_timeout_raises_timeout_error(tmp_path: Path) -> None:
    go = tmp_path / "go"
    with ProcessPoolExecutor(1) as ex:
        results = ex.map(jobs.wait_for_file_then, [str(go)] * 2, timeout=0.5)
        with pytest.raises(cf.TimeoutError) as info:
            next(results)
        assert not isinstance(info.value, poolkit.JobTimeout)  # the wait timed out, not the job
        go.touch()  # let the job that started finish, so that shutdown does not wait for long


def test_context_manager_waits_for_jobs() -> None:
    with ProcessPoolExecutor(2) as ex:
        futures = [ex.submit(jobs.sleep_then, 0.05, i) for i in range(6)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == list(range(6))
    with pytest.raises(RuntimeError):
        ex.submit(jobs.square, 1)


def test_shutdown_without_waiting_returns_and_jobs_still_finish(tmp_path: Path, leak_check) -> None:
    go = tmp_path / "go"
    started = tmp_path / "started"
    ex = ProcessPoolExecutor(1)
    running = ex.submit(jobs.started_then_wait, str(started), str(go), "done")
    wait_for_file(started)
    ex.shutdown(wait=False)  # must return although a job is running
    assert not running.done()
    with pytest.raises(RuntimeError):
        ex.submit(jobs.square, 2)
    go.touch()
    assert running.result(timeout=30) == "done"
    ex.shutdown(wait=True)  # a second call waits for the workers to exit


def test_shutdown_cancel_futures_cancels_the_pending_ones(tmp_path: Path, leak_check) -> None:
    go = tmp_path / "go"
    started = tmp_path / "started"
    ex = ProcessPoolExecutor(1)
    running = ex.submit(jobs.started_then_wait, str(started), str(go), "first")
    queued = [ex.submit(jobs.square, i) for i in range(20)]
    wait_for_file(started)
    ex.shutdown(wait=False, cancel_futures=True)
    go.touch()
    assert running.result(timeout=30) == "first"
    ex.shutdown(wait=True)
    cancelled = [f for f in queued if f.cancelled()]
    # Like the stdlib, a job already handed to a worker (at most a small window) is not
    # cancelled; it completes. Every other queued job is cancelled.
    assert len(cancelled) >= len(queued) - 2
    for i, f in enumerate(queued):
        assert f.done()
        if not f.cancelled():
            assert f.result() == i * i


def test_wait_and_as_completed() -> None:
    with ProcessPoolExecutor(2) as ex:
        futures = [ex.submit(jobs.sleep_then, 0.01 * (i % 3), i) for i in range(12)]
        done, not_done = cf.wait(futures, timeout=30, return_when=cf.ALL_COMPLETED)
        assert done == set(futures) and not not_done

        failing = ex.submit(jobs.raise_value_error, "x")
        done, _ = cf.wait([failing], timeout=30, return_when=cf.FIRST_EXCEPTION)
        assert failing in done

        more = [ex.submit(jobs.square, i) for i in range(10)]
        seen = [f.result() for f in cf.as_completed(more, timeout=30)]
        assert sorted(seen) == [i * i for i in range(10)]


def test_wait_and_as_completed_see_a_cancelled_job_at_once(tmp_path: Path) -> None:
    """A job cancelled in the queue is done for wait() and as_completed() when cancel()
    returns, even while the pool is busy (the stdlib's futures wait for the executor)."""
    started, go = tmp_path / "started", tmp_path / "go"
    with ProcessPoolExecutor(1) as ex:
        running = ex.submit(jobs.started_then_wait, str(started), str(go), "first")
        queued = [ex.submit(jobs.square, i) for i in range(5)]
        wait_for_file(started)
        assert queued[-1].cancel()
        done, _ = cf.wait([queued[-1]], timeout=0)
        assert done == {queued[-1]}
        assert list(cf.as_completed([queued[-1]], timeout=0)) == [queued[-1]]
        go.touch()
        assert running.result(timeout=30) == "first"
        assert [f.result(timeout=30) for f in queued[:-1]] == [0, 1, 4, 9]
        assert queued[-1].cancelled()


def test_as_completed_timeout(tmp_path: Path) -> None:
    go = tmp_path / "go"
    with ProcessPoolExecutor(1) as ex:
        blocked = ex.submit(jobs.wait_for_file_then, str(go))
        with pytest.raises(cf.TimeoutError):
            for _ in cf.as_completed([blocked], timeout=0.3):
                pass
        go.touch()
        assert blocked.result(timeout=30) is None


def test_asyncio_run_in_executor() -> None:
    async def main(ex: ProcessPoolExecutor) -> list[int]:
        loop = asyncio.get_running_loop()
        return list(
            await asyncio.gather(*(loop.run_in_executor(ex, jobs.square, i) for i in range(10)))
        )

    with ProcessPoolExecutor(2) as ex:
        assert asyncio.run(main(ex)) == [i * i for i in range(10)]


def test_a_crash_is_a_broken_process_pool_for_that_job_only() -> None:
    with ProcessPoolExecutor(2) as ex:
        try:
            ex.submit(jobs.crash_exit, 3).result(timeout=30)
        except BrokenProcessPool as exc:  # what stdlib code catches
            assert isinstance(exc, poolkit.WorkerCrashed)
        else:
            pytest.fail("the crash was not reported")
        assert ex.submit(jobs.square, 9).result(timeout=30) == 81


def test_max_tasks_per_child_with_fork_changes_pids() -> None:
    """The stdlib refuses max_tasks_per_child with fork; poolkit recycles with any start method."""
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=2, recycle_jitter=0) as ex:
        pids = [ex.submit(jobs.getpid).result(timeout=30) for _ in range(6)]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5]
    assert len(set(pids)) == 3


@pytest.mark.parametrize("start_method", START_METHODS)
def test_mp_context_selects_the_start_method(start_method: str) -> None:
    ctx = multiprocessing.get_context(start_method)
    with ProcessPoolExecutor(2, mp_context=ctx) as ex:
        assert ex.config.start_method == start_method
        assert sorted(ex.map(jobs.square, range(8))) == [i * i for i in range(8)]
        assert os.getpid() not in set(ex.map(jobs.getpid, range(4)))


def test_default_max_workers_is_the_usable_cpu_count() -> None:
    from loky import cpu_count

    with ProcessPoolExecutor() as ex:
        assert ex.max_workers == max(1, cpu_count())
