"""What ``pool.share`` costs: one write of the object, then jobs as cheap as jobs without it.

    python -m benchmarks.share_cost [--mib 1024] [--jobs 100] [--repeat 3]

A float64 array of ``--mib`` MiB is shared once by a pool of 2 workers;
then ``--jobs`` jobs each read one element of it, and as many jobs that
take no array at all run on the same warm pool (in an order that alternates
from one repetition to the next: the machine is shared and noisy). Printed:
the time ``pool.share`` took (pickling the array into shared memory: one
write of its bytes), the first round of jobs (each worker maps the array
once), the per-job time of later rounds with and without the handle, and
what a job costs when every job lands on a fresh worker that must map the
array again (``max_tasks_per_child=1``). Sending the array itself with each
job would move ``jobs x mib`` MiB instead.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

import poolkit

WORKERS = 2


def element(a: Any, i: int) -> float:
    return float(a[i])


def plain(i: int) -> float:
    return float(i)


def _round(pool: poolkit.Pool, jobs: int, handle: Any) -> float:
    """Seconds per job for ``jobs`` jobs submitted at once, with the handle or without."""
    start = time.perf_counter()
    if handle is None:
        futures = [pool.submit(plain, i) for i in range(jobs)]
    else:
        futures = [pool.submit(element, handle, i) for i in range(jobs)]
    for i, future in enumerate(futures):
        if future.result() != float(i):
            raise RuntimeError("a job returned a wrong value")
    return (time.perf_counter() - start) / jobs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.share_cost")
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with poolkit.Pool(WORKERS) as pool:
        array = np.arange(args.mib * 2**20 // 8, dtype=np.float64)
        _round(pool, WORKERS * 2, None)  # warm
        start = time.perf_counter()
        handle = pool.share(array)
        share_s = time.perf_counter() - start
        first = _round(pool, args.jobs, handle)
        with_share, without = [], []
        for repetition in range(args.repeat):
            order = (handle, None) if repetition % 2 == 0 else (None, handle)
            for which in order:
                (with_share if which is handle else without).append(_round(pool, args.jobs, which))
        print(f"pool.share of {args.mib} MiB: {share_s:.3f} s ({args.mib / share_s:.0f} MiB/s written)")
        print(f"first {args.jobs} jobs with the handle (each worker maps it once): {first * 1e3:.3f} ms/job")
        print(
            f"later rounds, median of {args.repeat}: {statistics.median(with_share) * 1e3:.3f} ms/job "
            f"with the handle, {statistics.median(without) * 1e3:.3f} ms/job without"
        )
    with poolkit.Pool(WORKERS, max_tasks_per_child=1) as pool:
        handle = pool.share(array)
        _round(pool, WORKERS * 2, None)
        fresh = _round(pool, 20, handle)
        plain_fresh = _round(pool, 20, None)
        print(
            f"max_tasks_per_child=1 (every job on a new worker, which maps it again): "
            f"{fresh * 1e3:.2f} ms/job with the handle, {plain_fresh * 1e3:.2f} ms/job without"
        )
    print(f"sending the array with every job instead would move {args.jobs * args.mib / 1024:.0f} GiB")


if __name__ == "__main__":
    main()
