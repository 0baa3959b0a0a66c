"""Where the time goes: CPU per job in the pool's own process and in its children.

    python -m benchmarks.cpu_cost [--repeat 5]

On a 2-core machine, throughput is bounded by CPU, not by waiting, so the
question "why is this pool faster" is answered by how much CPU it spends per
job, and where. Two loads, each with 2 workers:

* *tiny jobs* (S1): 20,000 no-op submits, then every result read;
* *recycle every job* (S3): 1,000 no-ops with one job per worker.

For each pool and load, in a fresh interpreter: CPU seconds of this process
(the caller, its threads included) and of its children (workers, and
poolkit's template), and the children's minor page faults, from the opening
of the pool to its shutdown, divided by the number of jobs. Children are
counted once reaped, which is why the pool's whole life is measured.

Peers: poolkit (fork template) and ``multiprocessing.Pool`` (fork) for both
loads, and the standard library executor with fork for tiny jobs (it cannot
recycle with fork; under forkserver its workers are not this process's
children, so their CPU could not be read here). Results go to
benchmarks/results/cpu_cost.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LOADS = {"tiny": 20_000, "recycle": 1_000}
POOLS = {
    "poolkit": ("tiny", "recycle"),
    "mp-pool": ("tiny", "recycle"),
    "stdlib-fork": ("tiny",),
}
RESULTS = Path(__file__).parent / "results" / "cpu_cost.json"
_CAP = 120.0


def _usage() -> tuple[float, float, int]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime, kids.ru_minflt


def measure(pool_name: str, load: str) -> dict[str, float]:
    """Run one load on one pool in this interpreter; CPU and faults per job."""
    from benchmarks import jobs

    n = LOADS[load]
    recycle = load == "recycle"
    before = _usage()
    start = time.perf_counter()
    if pool_name == "poolkit":
        import poolkit

        pool: Any = poolkit.Pool(
            2, max_tasks_per_child=1 if recycle else None, recycle_jitter=0.0
        )
        futures = [pool.submit(jobs.noop) for _ in range(n)]
        for future in futures:
            future.result(timeout=_CAP)
        pool.shutdown(wait=True)
    elif pool_name == "mp-pool":
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(
            2, maxtasksperchild=1 if recycle else None
        ) as mp_pool:
            handles = [mp_pool.apply_async(jobs.noop) for _ in range(n)]
            for handle in handles:
                handle.get(timeout=_CAP)
            mp_pool.close()
            mp_pool.join()
    elif pool_name == "stdlib-fork":
        import concurrent.futures as cf
        import multiprocessing

        with cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as ex:
            futures = [ex.submit(jobs.noop) for _ in range(n)]
            for future in futures:
                future.result(timeout=_CAP)
    else:
        raise ValueError(f"unknown pool {pool_name!r}")
    wall = time.perf_counter() - start
    after = _usage()
    return {
        "jobs_per_s": n / wall,
        "parent_us_per_job": (after[0] - before[0]) / n * 1e6,
        "children_us_per_job": (after[1] - before[1]) / n * 1e6,
        "children_faults_per_job": (after[2] - before[2]) / n,
    }


def _run_fresh(pool_name: str, load: str) -> dict[str, float] | None:
    code = (
        "import json, sys; from benchmarks.cpu_cost import measure; "
        f"print(json.dumps(measure({pool_name!r}, {load!r})))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=_CAP,
            cwd=Path(__file__).parent.parent,
        )
    except subprocess.TimeoutExpired:
        print(f"{pool_name} {load}: no answer within {_CAP:.0f} s", file=sys.stderr)
        return None
    if done.returncode != 0:
        print(f"{pool_name} {load}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_cost", description=__doc__)
    parser.add_argument("--repeat", type=int, default=5, help="runs per pool and load (default 5)")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where the figures go")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    # Repetitions outermost, pools interleaved: a noisy minute hits every pool alike.
    for _ in range(args.repeat):
        for pool_name, loads in POOLS.items():
            for load in loads:
                result = _run_fresh(pool_name, load)
                if result is not None:
                    runs.setdefault(load, {}).setdefault(pool_name, []).append(result)
    medians = {
        load: {
            pool_name: {key: statistics.median(r[key] for r in results) for key in results[0]}
            for pool_name, results in by_pool.items()
        }
        for load, by_pool in runs.items()
    }
    print(f"{'load':8} {'pool':12} {'jobs/s':>9} {'caller µs/job':>14} "
          f"{'children µs/job':>16} {'children faults/job':>20}")
    for load, by_pool in medians.items():
        for pool_name, m in by_pool.items():
            print(f"{load:8} {pool_name:12} {m['jobs_per_s']:9.0f} {m['parent_us_per_job']:14.1f} "
                  f"{m['children_us_per_job']:16.1f} {m['children_faults_per_job']:20.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"repeat": args.repeat, "medians": medians, "runs": runs}, indent=1) + "\n"
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
