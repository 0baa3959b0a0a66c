"""asyncio: ``await pool.run(...)`` and ``pool.as_completed_async`` without a thread per job."""

from __future__ import annotations

import asyncio
import threading

import pytest
import recycle_jobs as jobs

import poolkit

pytestmark = pytest.mark.timeout(120)


def test_run_many_jobs_with_gather() -> None:
    async def main(pool: poolkit.Pool) -> tuple[list[tuple[int, int]], int, int]:
        baseline = threading.active_count()
        tasks = [asyncio.ensure_future(pool.run(jobs.pid_of, i)) for i in range(300)]
        peak = threading.active_count()
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.001)
            peak = max(peak, threading.active_count())
        results = await asyncio.gather(*tasks)
        return results, baseline, peak

    with poolkit.Pool(2) as pool:
        results, baseline, peak = asyncio.run(main(pool))
    assert [x for x, _ in results] == list(range(300))
    assert peak <= baseline + 1, f"threads grew from {baseline} to {peak} for 300 jobs"


def test_run_passes_keywords_and_raises_the_jobs_error() -> None:
    async def main(pool: poolkit.Pool) -> None:
        assert await pool.run(jobs.sleep, seconds=0.01) == 0.01
        with pytest.raises(ValueError, match="async boom"):
            await pool.run(jobs.fail, "async boom")
        with pytest.raises(poolkit.WorkerCrashed):
            await pool.run(jobs.crash, 3)
        assert (await pool.run(jobs.pid_of, "still works"))[0] == "still works"

    with poolkit.Pool(1) as pool:
        asyncio.run(main(pool))


def test_as_completed_async_yields_every_future_in_completion_order() -> None:
    async def main(pool: poolkit.Pool) -> tuple[list[poolkit.JobFuture[float]], int, int]:
        baseline = threading.active_count()
        futures = [pool.submit(jobs.sleep, 0.3 if i == 0 else 0.01) for i in range(100)]
        order = []
        peak = threading.active_count()
        async for future in pool.as_completed_async(futures):
            assert future.done()
            order.append(future)
            peak = max(peak, threading.active_count())
        return order, baseline, peak

    with poolkit.Pool(2) as pool:
        order, baseline, peak = asyncio.run(main(pool))
    assert len(order) == 100
    assert len({f.job_id for f in order}) == 100
    # the slow first job did not hold the others back: quick ones came out before it
    slow = next(i for i, f in enumerate(order) if f.result() == 0.3)
    assert slow > 0
    assert peak <= baseline + 1


def test_as_completed_async_with_failures() -> None:
    async def main(pool: poolkit.Pool) -> list[BaseException | None]:
        futures = [
            pool.submit(jobs.fail, "x"),
            pool.submit(jobs.pid_of, 1),
            pool.submit(jobs.crash, 2),
        ]
        return [f.exception() async for f in pool.as_completed_async(futures)]

    with poolkit.Pool(2) as pool:
        errors = asyncio.run(main(pool))
    assert sorted(type(e).__name__ for e in errors) == ["NoneType", "ValueError", "WorkerCrashed"]


def test_cancelling_the_awaiting_task_leaves_the_pool_working() -> None:
    async def main(pool: poolkit.Pool) -> int:
        task = asyncio.ensure_future(pool.run(jobs.sleep, 0.5))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return (await pool.run(jobs.pid_of, 7))[0]

    with poolkit.Pool(1) as pool:
        assert asyncio.run(main(pool)) == 7
