"""How fast a dead or retired worker is replaced: poolkit against the standard library.

    python -m benchmarks.respawn [--crashes 20] [--churn 50]

Every pool has one worker, so the next job has to wait for the replacement.
Three figures per pool, each a median:

* *round trip*: one no-op submitted and its result read, on a warm worker;
* *death to next result*: a job writes the time (``time.monotonic``, one
  clock for every process on Linux) to a file and calls ``os._exit(1)``;
  once its future has failed, a no-op is submitted; the figure is from the
  death to that no-op's result, minus the round trip. For the standard
  library, whose executor is broken by a crash, the comparable path is the
  user's: make a new executor and submit the no-op there;
* *churn*: no-ops one after the other with ``max_tasks_per_child=1``, the
  time per job minus the round trip: spawning, starting and retiring a
  worker, per job. The standard library refuses this with fork.

Each pool is measured in a fresh interpreter under a cap. Results go to
benchmarks/results/respawn.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

POOLS = {
    "poolkit-fork": "poolkit.Pool, fork (warm template)",
    "poolkit-forkserver": "poolkit.Pool, forkserver",
    "poolkit-spawn": "poolkit.Pool, spawn",
    "stdlib-fork": "ProcessPoolExecutor, fork",
    "stdlib-forkserver": "ProcessPoolExecutor, forkserver",
    "stdlib-spawn": "ProcessPoolExecutor, spawn",
}
MARKER = "RESPAWN "
_TIMEOUT = 30.0


def _factory(name: str) -> Callable[..., cf.Executor]:
    library, method = name.split("-", 1)
    if library == "poolkit":
        import poolkit

        def make_poolkit(max_tasks: int | None = None) -> cf.Executor:
            pool: cf.Executor = poolkit.Pool(
                1, start_method=method, max_tasks_per_child=max_tasks, recycle_jitter=0.0
            )
            return pool

        return make_poolkit

    def make_stdlib(max_tasks: int | None = None) -> cf.Executor:
        context = multiprocessing.get_context(method)
        options: dict[str, Any] = {}
        if max_tasks is not None:
            if sys.version_info < (3, 11):
                raise ValueError("max_tasks_per_child needs Python 3.11")
            options["max_tasks_per_child"] = max_tasks
        return cf.ProcessPoolExecutor(1, mp_context=context, **options)

    return make_stdlib


def _round_trip(pool: cf.Executor, count: int) -> float:
    from .jobs import noop

    pool.submit(noop).result(timeout=_TIMEOUT)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        pool.submit(noop).result(timeout=_TIMEOUT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, crashes: int, churn: int) -> dict[str, Any]:
    from .jobs import die_at, noop

    make = _factory(name)
    result: dict[str, Any] = {"pool": name}
    pool = make()
    round_trip = _round_trip(pool, 50)
    result["round_trip_ms"] = round_trip * 1000

    stamp = os.path.join(tempfile.mkdtemp(prefix="respawn-"), "death")
    recoveries = []
    recovers_in_place = name.startswith("poolkit")
    for _ in range(crashes):
        crashed = pool.submit(die_at, stamp)
        try:
            crashed.result(timeout=_TIMEOUT)
        except cf.process.BrokenProcessPool:
            pass  # poolkit.WorkerCrashed is one too
        with open(stamp) as f:
            died = float(f.read())
        if not recovers_in_place:
            pool.shutdown(wait=False)
            pool = make()
        pool.submit(noop).result(timeout=_TIMEOUT)
        recoveries.append(time.monotonic() - died - round_trip)
    result["respawn_ms"] = statistics.median(recoveries) * 1000
    if not recovers_in_place:
        result["respawn_note"] = "new executor"
    pool.shutdown(wait=True)

    try:
        pool = make(max_tasks=1)
    except ValueError as exc:
        result["churn_note"] = f"refused: {exc}".split(";")[0]
        return result
    pool.submit(noop).result(timeout=_TIMEOUT)
    start = time.perf_counter()
    for _ in range(churn):
        pool.submit(noop).result(timeout=_TIMEOUT)
    per_job = (time.perf_counter() - start) / churn
    pool.shutdown(wait=True)
    result["churn_ms"] = (per_job - round_trip) * 1000
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.respawn")
    parser.add_argument("--crashes", type=int, default=20)
    parser.add_argument("--churn", type=int, default=50)
    parser.add_argument("--pools", default=",".join(POOLS), help="comma-separated, of: " + ",".join(POOLS))
    parser.add_argument("--cap", type=float, default=90.0, help="seconds per pool")
    parser.add_argument("--json", type=Path, help="default benchmarks/results/respawn.json")
    parser.add_argument("--one", choices=list(POOLS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(MARKER + json.dumps(measure(args.one, args.crashes, args.churn)), flush=True)
        return

    from .harness import ROOT, describe_machine, run_isolated
    from .peers import split_names

    rows = []
    for name in split_names(args.pools, POOLS, "pool"):
        command = [sys.executable, "-m", "benchmarks.respawn", "--one", name,
                   "--crashes", str(args.crashes), "--churn", str(args.churn)]
        done = run_isolated(command, args.cap)
        lines = [line for line in done["stdout"].splitlines() if line.startswith(MARKER)]
        if lines:
            row = json.loads(lines[-1][len(MARKER) :])
        elif done["killed"]:
            row = {"pool": name, "respawn_note": f"hang (no answer in {args.cap:g} s)"}
        else:
            tail = (done["stderr"].strip().splitlines() or ["no output"])[-1]
            row = {"pool": name, "respawn_note": f"error: {tail}"}
        row["label"] = POOLS[name]
        rows.append(row)
        print(f"{name:<18} {row}", file=sys.stderr)
    machine = describe_machine()
    data = {
        "date": machine["date"],
        "machine": machine,
        "crashes": args.crashes,
        "churn": args.churn,
        "results": rows,
    }
    path = args.json or ROOT / "benchmarks" / "results" / "respawn.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")

    def ms(row: dict[str, Any], key: str, note: str) -> str:
        value = row.get(key)
        text = "—" if value is None else f"{value:.2f}"
        return f"{text} ({row[note]})" if row.get(note) else text

    print("| pool | round trip (ms) | death to next result (ms) | churn per job (ms) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['label']} | {ms(row, 'round_trip_ms', '_')} | "
              f"{ms(row, 'respawn_ms', 'respawn_note')} | {ms(row, 'churn_ms', 'churn_note')} |")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
