"""What a tiny job costs through Dask, against the local poolkit Pool.

    python -m benchmarks.dask_overhead [--jobs 2000] [--rounds 3] [--quick] [--out FILE]

Every round measures, on the same machine and with two workers each time:

* ``local``: a warm ``poolkit.Pool(2)``: N no-op ``submit`` calls, then wait
  for all (per-job cost at full throughput), and 200 one-at-a-time round trips
  (latency);
* then a fresh ``LocalCluster(n_workers=2, threads_per_worker=1,
  processes=True)`` on loopback, and on it:

  - ``dask``: N plain ``client.submit`` no-ops (Dask's own cost, no poolkit),
    and 100 round trips,
  - ``daskpool``: N ``DaskPool.submit`` no-ops (Dask + the hop into the node's
    poolkit child + the result envelope), and 100 round trips,
  - ``daskpool.map``: ``DaskPool.map`` over 10 N items (poolkit's measured
    chunking: many inputs per Dask task).

The local pool runs before the cluster starts, so that idle Dask processes
do not slow it down. Figures are medians over rounds; the ratios are taken
within each round, then the median. On a shared 2-core machine the absolute
numbers drift; compare ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import wait
from pathlib import Path
from typing import Any


def noop(x: Any) -> Any:
    return x


def per_job_submit(executor: Any, jobs: int) -> float:
    """Seconds per job: submit ``jobs`` no-ops, wait for all."""
    started = time.perf_counter()
    futures = [executor.submit(noop, i) for i in range(jobs)]
    _done, not_done = wait(futures, timeout=600)
    assert not not_done
    assert futures[-1].result() == jobs - 1
    return (time.perf_counter() - started) / jobs


def round_trip(executor: Any, count: int) -> float:
    """Seconds per job when each waits for the previous one (latency)."""
    started = time.perf_counter()
    for i in range(count):
        assert executor.submit(noop, i).result(timeout=60) == i
    return (time.perf_counter() - started) / count


def measure_round(jobs: int, workers: int) -> dict[str, float]:
    import distributed

    import poolkit
    from poolkit.dask_backend import DaskPool

    out: dict[str, float] = {}
    with poolkit.Pool(workers) as pool:
        per_job_submit(pool, 200)  # warm: workers forked, chunk estimates made
        out["local"] = per_job_submit(pool, jobs)
        out["local_latency"] = round_trip(pool, 200)

    with (
        distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=40,
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        client.wait_for_workers(workers, timeout=60)

        warm = [client.submit(noop, i, pure=False) for i in range(200)]
        client.gather(warm)
        started = time.perf_counter()
        futures = [client.submit(noop, i, pure=False) for i in range(jobs)]
        assert client.gather(futures)[-1] == jobs - 1
        out["dask"] = (time.perf_counter() - started) / jobs
        del futures, warm
        started = time.perf_counter()
        for i in range(100):
            assert client.submit(noop, i, pure=False).result(timeout=60) == i
        out["dask_latency"] = (time.perf_counter() - started) / 100

        with DaskPool(client, name="bench") as dask_pool:
            per_job_submit(dask_pool, 200)
            out["daskpool"] = per_job_submit(dask_pool, jobs)
            out["daskpool_latency"] = round_trip(dask_pool, 100)
            items = jobs * 10
            started = time.perf_counter()
            results = list(dask_pool.map(noop, range(items)))
            out["daskpool_map"] = (time.perf_counter() - started) / items
            assert results[-1] == items - 1
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="500 jobs, 1 round (a smoke run)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.rounds = 500, 1

    rounds = []
    for index in range(args.rounds):
        figures = measure_round(args.jobs, args.workers)
        rounds.append(figures)
        print(
            f"round {index + 1}: "
            + ", ".join(f"{key} {value * 1e6:,.0f} us" for key, value in figures.items()),
            flush=True,
        )

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    def ratio(a: str, b: str) -> float:
        return statistics.median(r[a] / r[b] for r in rounds)

    summary = {
        "jobs": args.jobs,
        "rounds": args.rounds,
        "workers": args.workers,
        "us_per_job": {key: median(key) * 1e6 for key in rounds[0]},
        "ratio_daskpool_to_local": ratio("daskpool", "local"),
        "ratio_daskpool_to_dask": ratio("daskpool", "dask"),
        "ratio_latency_daskpool_to_local": ratio("daskpool_latency", "local_latency"),
        "ratio_map_daskpool_to_local": ratio("daskpool_map", "local"),
    }
    us = summary["us_per_job"]
    print()
    print(f"per tiny job, {args.workers} workers, median of {args.rounds} round(s):")
    print(f"  local poolkit Pool, submit        {us['local']:>9,.0f} us/job")
    print(f"  plain Dask client.submit          {us['dask']:>9,.0f} us/job")
    print(f"  DaskPool.submit                   {us['daskpool']:>9,.0f} us/job")
    print(f"  DaskPool.map (auto chunks)        {us['daskpool_map']:>9,.1f} us/item")
    print(f"  round trip, local Pool            {us['local_latency']:>9,.0f} us")
    print(f"  round trip, plain Dask            {us['dask_latency']:>9,.0f} us")
    print(f"  round trip, DaskPool              {us['daskpool_latency']:>9,.0f} us")
    print(f"ratio DaskPool / local Pool (submit):    {summary['ratio_daskpool_to_local']:.1f}x")
    print(f"ratio DaskPool / plain Dask (submit):    {summary['ratio_daskpool_to_dask']:.2f}x")
    print(
        f"ratio DaskPool / local Pool (latency):   {summary['ratio_latency_daskpool_to_local']:.1f}x"
    )
    print(f"ratio DaskPool.map / local Pool submit:  {summary['ratio_map_daskpool_to_local']:.2f}x")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
