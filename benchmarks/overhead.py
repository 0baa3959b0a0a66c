"""What structured logging costs a tiny job: poolkit with logging off against DEBUG logs.

    python -m benchmarks.overhead [--jobs 20000] [--rounds 5]

Three configurations, each measured in a fresh interpreter (logging is
process-wide state, and the JSON mode of ``log_to_json`` cannot be undone):

* ``off``: the default; the ``poolkit`` logger has only its ``NullHandler``,
  so the manager's level check fails and no event is built;
* ``debug``: ``logging`` at DEBUG with a real ``StreamHandler`` (not a
  NullHandler) writing formatted lines to ``/dev/null``, so every event is
  built, rendered and written;
* ``debug-json``: ``poolkit.log_to_json(logging.DEBUG, <devnull>)``.

poolkit has no switch for its per-job stats (wall, CPU, RSS are always
measured in the worker), so "stats off" is not a separate configuration:
every figure here includes them. Each round runs the three in a rotated
order so that drift on a shared machine spreads evenly; the figures are
medians over rounds. Results go to benchmarks/results/overhead.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

CONFIGS = {
    "off": "logging off (default: NullHandler only)",
    "debug": "DEBUG to a StreamHandler on /dev/null",
    "debug-json": "DEBUG as JSON lines (log_to_json) to /dev/null",
}
MARKER = "OVERHEAD "


class _CountingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A plain StreamHandler that also counts records, to prove the events were emitted."""

    count = 0

    def emit(self, record: logging.LogRecord) -> None:
        _CountingHandler.count += 1
        super().emit(record)


def measure(config: str, jobs: int, workers: int) -> dict[str, Any]:
    import poolkit

    from .jobs import noop

    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as this process
    logger = logging.getLogger("poolkit")
    counter: _CountingHandler | None = None
    if config == "debug":
        counter = _CountingHandler(devnull)
        counter.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(counter)
        logger.setLevel(logging.DEBUG)
    elif config == "debug-json":
        handler = poolkit.log_to_json(logging.DEBUG, devnull)
        counter = _CountingHandler(devnull)  # counts only; the JSON handler does the writing
        counter.setLevel(logging.DEBUG)
        counter.setFormatter(handler.formatter)
        logger.removeHandler(handler)
        logger.addHandler(counter)
    with poolkit.Pool(workers) as pool:
        for future in [pool.submit(noop) for _ in range(2 * workers)]:
            future.result(timeout=30)
        before = _CountingHandler.count
        start = time.perf_counter()
        futures = [pool.submit(noop) for _ in range(jobs)]
        for future in futures:
            future.result(timeout=60)
        seconds = time.perf_counter() - start
        records = _CountingHandler.count - before
    return {"config": config, "jobs_per_s": jobs / seconds, "seconds": seconds, "records": records}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cap", type=float, default=60.0, help="seconds per measurement")
    parser.add_argument("--json", type=Path, help="default benchmarks/results/overhead.json")
    parser.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(MARKER + json.dumps(measure(args.one, args.jobs, args.workers)), flush=True)
        return

    from .harness import ROOT, describe_machine, format_value, run_isolated

    names = list(CONFIGS)
    figures: dict[str, list[float]] = {name: [] for name in names}
    records: dict[str, list[int]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            command = [sys.executable, "-m", "benchmarks.overhead", "--one", name,
                       "--jobs", str(args.jobs), "--workers", str(args.workers)]
            done = run_isolated(command, args.cap)
            lines = [line for line in done["stdout"].splitlines() if line.startswith(MARKER)]
            if not lines:
                tail = (done["stderr"].strip().splitlines() or ["no output"])[-1]
                print(f"round {round_ + 1} {name}: failed ({tail})", file=sys.stderr)
                continue
            result = json.loads(lines[-1][len(MARKER) :])
            figures[name].append(result["jobs_per_s"])
            records[name].append(result["records"])
            print(f"round {round_ + 1} {name:<10} {format_value(result['jobs_per_s'])} jobs/s, "
                  f"{result['records']} log records", file=sys.stderr)
    machine = describe_machine()
    results: list[dict[str, Any]] = [
        {
            "config": name,
            "label": CONFIGS[name],
            "jobs_per_s": statistics.median(figures[name]),
            "all_jobs_per_s": figures[name],
            "records_per_run": statistics.median(records[name]),
        }
        for name in names
        if figures[name]
    ]
    data = {
        "date": machine["date"],
        "machine": machine,
        "jobs": args.jobs,
        "workers": args.workers,
        "rounds": args.rounds,
        "results": results,
    }
    path = args.json or ROOT / "benchmarks" / "results" / "overhead.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    base = results[0]["jobs_per_s"] if results else 0.0
    print("| configuration | jobs/s | µs per job | vs off | log records per run |")
    print("|---|---|---|---|---|")
    for row in results:
        print(f"| {row['label']} | {format_value(row['jobs_per_s'])} | {1e6 / row['jobs_per_s']:.1f} "
              f"| {row['jobs_per_s'] / base:.2f} | {row['records_per_run']:.0f} |")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
