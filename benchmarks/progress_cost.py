"""What ``progress=`` costs on the hot path: S2's workload with and without it.

    python -m benchmarks.progress_cost [--repeat 7] [--items 200000]

S2 is the scenario where per-job overhead shows most: ``pool.map(square,
range(200_000))`` with the library's default chunking, 2 workers. Each
repetition runs it three ways on one warm pool, in an order that rotates
from one repetition to the next (this machine is shared and noisy; rotating
spreads drift over all three): ``progress=None``; ``progress=True`` with
stderr sent to ``/dev/null`` (the plain-lines display: the same counting as
the bar without a terminal's redraws); and ``progress=`` a callable that
does nothing. The figures are items per second; the ratios are taken
within a repetition, then their median is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import poolkit
from benchmarks import jobs

WORKERS = 2


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    saved = sys.stderr
    with open(os.devnull, "w") as sink:
        sys.stderr = sink
        try:
            yield
        finally:
            sys.stderr = saved


def _ignore(counts: Any) -> None:
    pass


def _rate(pool: poolkit.Pool, items: int, progress: Any) -> float:
    start = time.perf_counter()
    with _stderr_to_devnull():
        out = list(pool.map(jobs.square, range(items), progress=progress))
    seconds = time.perf_counter() - start
    if len(out) != items or out[-1] != (items - 1) ** 2:
        raise RuntimeError("map returned wrong results")
    return items / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.progress_cost", description=__doc__)
    parser.add_argument("--repeat", type=int, default=7, help="repetitions (default 7)")
    parser.add_argument("--items", type=int, default=200_000, help="inputs per map (default 200,000)")
    args = parser.parse_args(argv)
    ways: dict[str, Any] = {"off": None, "lines": True, "callable": _ignore}
    rates: dict[str, list[float]] = {name: [] for name in ways}
    with poolkit.Pool(WORKERS) as pool:
        _rate(pool, args.items // 10, None)  # warm the workers and the chunk sizing
        names = list(ways)
        for rep in range(args.repeat):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                rates[name].append(_rate(pool, args.items, ways[name]))
    print(f"S2 workload: map(square, range({args.items:,})), {WORKERS} workers, {args.repeat} repetitions")
    print(f"{'progress':<10} {'median items/s':>15} {'vs off (median of ratios)':>27}")
    for name in ways:
        ratios = [r / off for r, off in zip(rates[name], rates["off"], strict=True)]
        print(f"{name:<10} {statistics.median(rates[name]):>15,.0f} {statistics.median(ratios):>26.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
