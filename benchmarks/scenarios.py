"""Scenarios S1-S8 of docs/mission.md, written once against the :class:`~benchmarks.peers.Peer` interface.

Each scenario opens the pool itself (so it chooses the recycling limit),
measures with ``time.perf_counter`` around the part it names, checks the
results (a fast wrong answer is not a result), and returns a dict whose
``value`` is the headline figure in the scenario's unit. The measuring
process closes the pool afterwards; closing is never timed.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from . import jobs
from .peers import Hang, LimitPeer, LokyPeer, MpirePeer, Peer, PoolkitPeer

__all__ = ["SCENARIOS", "WORKERS", "Scenario"]

WORKERS = 2
MiB = 1024 * 1024


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str  # what it does, for tables
    unit: str
    higher_is_better: bool
    sizes: dict[str, dict[str, Any]]  # profile ("full", "quick") -> parameters
    run: Callable[[Peer, dict[str, Any], float], dict[str, Any]]
    log_scale: bool = False  # for the plot: figures spread over orders of magnitude


def _warm(peer: Peer, deadline: float) -> None:
    """A few no-ops first, so that a throughput figure does not include starting the workers."""
    _check(peer.run_all(jobs.noop, [()] * (2 * WORKERS), deadline), "warm-up")


def _check(outcomes: list[tuple[bool, Any]], what: str) -> None:
    failed = [value for ok, value in outcomes if not ok]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(outcomes)} {what} jobs failed: {failed[0]!r}")


def s1_tiny_tasks(peer: Peer, p: dict[str, Any], deadline: float) -> dict[str, Any]:
    n = p["jobs"]
    peer.open(WORKERS)
    _warm(peer, deadline)
    start = time.perf_counter()
    outcomes = peer.run_all(jobs.noop, [()] * n, deadline)
    seconds = time.perf_counter() - start
    _check(outcomes, "no-op")
    return {"value": n / seconds, "seconds": seconds, "jobs": n}


def s2_bulk_map(peer: Peer, p: dict[str, Any], deadline: float) -> dict[str, Any]:
    n = p["items"]
    peer.open(WORKERS)
    _warm(peer, deadline)
    start = time.perf_counter()
    out = peer.map(jobs.square, range(n), deadline)
    seconds = time.perf_counter() - start
    if len(out) != n or out[:3] != [0, 1, 4] or out[-1] != (n - 1) ** 2:
        raise RuntimeError(f"map returned wrong results ({len(out)} items)")
    return {"value": n / seconds, "seconds": seconds, "items": n}


def s3_recycle_every_job(peer: Peer, p: dict[str, Any], deadline: float) -> dict[str, Any]:
    n = p["jobs"]
    peer.open(WORKERS, max_tasks=1)
    _warm(peer, deadline)
    start = time.perf_counter()
    outcomes = peer.run_all(jobs.noop, [()] * n, deadline)
    seconds = time.perf_counter() - start
    _check(outcomes, "no-op")
    return {"value": n / seconds, "seconds": seconds, "jobs": n}


def s4_crash_storm(peer: Peer, p: dict[str, Any], deadline: float) -> dict[str, Any]:
    n = p["jobs"]
    expected = n - n // 10
    peer.open(WORKERS)
    _warm(peer, deadline)
    start = time.perf_counter()
    clean = peer.run_all(jobs.crash_if, [(i, False) for i in range(n)], deadline)
    clean_seconds = time.perf_counter() - start
    _check(clean, "crash-free")
    start = time.perf_counter()
    try:
        outcomes = peer.run_all(jobs.crash_if, [(i, True) for i in range(n)], deadline)
    except Hang as hang:
        hang.details.update(expected=expected, clean_seconds=clean_seconds)
        raise
    seconds = time.perf_counter() - start
    good = sum(1 for i, (ok, value) in enumerate(outcomes) if ok and value == i)
    errors = collections.Counter(type(value).__name__ for ok, value in outcomes if not ok)
    # Is the pool still usable? The stdlib and loky break for good after one crash.
    try:
        after_deadline = min(deadline, time.monotonic() + 2.0)
        peer.wait(peer.submit(jobs.square, 3), after_deadline)
        usable_after = True
    except Exception:
        usable_after = False
    return {
        "value": seconds,
        "seconds": seconds,
        "good": good,
        "expected": expected,
        "jobs": n,
        "errors": dict(errors),
        "usable_after": usable_after,
        "clean_seconds": clean_seconds,
        "crash_over_clean": seconds / clean_seconds,
    }


def s5_cold_start(peer: Peer, p: dict[str, Any], deadline: float) -> dict[str, Any]:
    start = time.perf_counter()
    peer.open(WORKERS)
    peer.wait(peer.submit(jobs.noop), deadline)
    seconds = time.perf_counter() - start
    return {"value": seconds * 1000.0, "seconds": seconds}


class RssSampler(threading.Thread):
    """Samples the RSS of every descendant of this process from a thread, keeping the peak."""

    def __init__(self, interval: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._me = psutil.Process()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for child in self._me.children(recursive=True):
                try:
                    rss = child.memory_info().rss
                except psutil.Error:
                    continue
                self.peak = max(self.peak, rss)
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _leak_run(
    peer: Peer, p: dict[str, Any], deadline: float, open_pool: Callable[[], None]
) -> dict[str, Any]:
    sampler = RssSampler(p["interval"])
    sampler.start()
    try:
        open_pool()
        outcomes = peer.run_all(jobs.leak, [(p["leak"], p["hold"])] * p["jobs"], deadline)
    finally:
        sampler.stop()
    _check(outcomes, "leaking")
    return {
        "value": sampler.peak / MiB,
        "in_job_max_mib": max(value for _, value in outcomes) / MiB,
        "samples": sampler.samples,
        "jobs": p["jobs"],
    }


def s6_leak(peer: Peer, p: dict[str, Any], deadline: float) -> dict[str, Any]:
    per_child = p["per_child"]
    if isinstance(peer, LokyPeer):
        result = _leak_run(
            peer, p, deadline, lambda: peer.open(WORKERS, max_tasks=per_child, leak_check=True)
        )
    else:
        result = _leak_run(peer, p, deadline, lambda: peer.open(WORKERS, max_tasks=per_child))
    if isinstance(peer, PoolkitPeer):
        # poolkit can also recycle on the RSS itself; measure that policy too.
        peer.close()
        limit = p["memory_limit"]
        other = _leak_run(
            peer, p, deadline, lambda: peer.open(WORKERS, max_memory_per_child=limit)
        )
        result["max_memory_per_child"] = limit
        result["memory_policy_peak_mib"] = other["value"]
    return result


def s7_payloads(peer: Peer, p: dict[str, Any], deadline: float) -> dict[str, Any]:
    size, count = p["size"], p["count"]
    payload = b"\x5a" * size
    window = 2 * WORKERS
    peer.open(WORKERS)
    _warm(peer, deadline)
    start = time.perf_counter()
    pending: collections.deque[Any] = collections.deque()
    sent = done = 0
    while done < count:
        while sent < count and len(pending) < window:
            pending.append(peer.submit(jobs.echo, payload))
            sent += 1
        out = peer.wait(pending.popleft(), deadline)
        if len(out) != size:
            raise RuntimeError(f"a payload came back with {len(out)} bytes, not {size}")
        done += 1
    seconds = time.perf_counter() - start
    return {"value": count * size / MiB / seconds, "seconds": seconds, "count": count}


def s8_arrays(peer: Peer, p: dict[str, Any], deadline: float) -> dict[str, Any]:
    """``map(double, arrays)``: each array goes to a worker and an array of its size comes back."""
    import resource

    import numpy as np

    count, size = p["count"], p["size"]
    arrays = [np.full(size // 8, float(i)) for i in range(count)]
    # mpire's map unpacks an item that is iterable into arguments: one 1-tuple per array.
    items: list[Any] = [(a,) for a in arrays] if isinstance(peer, MpirePeer) else arrays
    peer.open(WORKERS)
    # Warmed through map, the only call every peer has (joblib has no submit).
    if peer.map(jobs.square, list(range(2 * WORKERS)), deadline) != [i * i for i in range(2 * WORKERS)]:
        raise RuntimeError("warm-up map returned wrong results")
    start = time.perf_counter()
    if isinstance(peer, LimitPeer):
        out = peer.shared_map(arrays)
    else:
        out = peer.map(jobs.double, items, deadline)
    seconds = time.perf_counter() - start
    # The caller's peak RSS over its life (this process runs one measurement):
    # the arrays it made, the results it holds, and whatever the pool needed.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held = 2 * count * size
    if len(out) != count or any(
        o.shape != a.shape or o[0] != 2.0 * i or o[-1] != 2.0 * i for i, (o, a) in enumerate(zip(out, arrays, strict=True))
    ):
        raise RuntimeError("map returned wrong arrays")
    return {
        "value": 2 * count * size / MiB / seconds,
        "seconds": seconds,
        "count": count,
        "caller_peak_rss_mib": peak / MiB,
        "held_mib": held / MiB,
        "peak_over_held": peak / held,
    }


_LEAK = {"leak": 20 * MiB, "per_child": 5, "hold": 0.05, "interval": 0.005, "memory_limit": "100MiB"}

SCENARIOS: dict[str, Scenario] = {
    s.key: s
    for s in (
        Scenario(
            "S1",
            "tiny-task overhead: no-op submits, all at once, then wait",
            "jobs/s",
            True,
            {"full": {"jobs": 20_000}, "quick": {"jobs": 2_000}},
            s1_tiny_tasks,
            log_scale=True,
        ),
        Scenario(
            "S2",
            "bulk map of x*x, the library's default chunking",
            "items/s",
            True,
            {"full": {"items": 200_000}, "quick": {"items": 10_000}},
            s2_bulk_map,
            log_scale=True,
        ),
        Scenario(
            "S3",
            "recycle after every job: no-op submits, retire each worker after 1 job",
            "jobs/s",
            True,
            {"full": {"jobs": 1_000}, "quick": {"jobs": 50}},
            s3_recycle_every_job,
            log_scale=True,
        ),
        Scenario(
            "S4",
            "crash storm: every 10th job calls os._exit(1); time to settle every job",
            "s",
            False,
            {"full": {"jobs": 400}, "quick": {"jobs": 100}},
            s4_crash_storm,
            log_scale=True,
        ),
        Scenario(
            "S5",
            "cold start: create the pool and get one no-op's result",
            "ms",
            False,
            {"full": {}, "quick": {}},
            s5_cold_start,
            log_scale=True,
        ),
        Scenario(
            "S6",
            "a job that leaks 20 MiB, retire after 5 jobs per worker: peak worker RSS",
            "MiB",
            False,
            {"full": {**_LEAK, "jobs": 40}, "quick": {**_LEAK, "jobs": 10}},
            s6_leak,
        ),
        Scenario(
            "S7",
            "10 MiB payloads sent and returned, 2 per worker in flight",
            "MiB/s",
            True,
            {"full": {"size": 10 * MiB, "count": 40}, "quick": {"size": 10 * MiB, "count": 8}},
            s7_payloads,
        ),
        Scenario(
            "S8",
            "map(double, arrays) over numpy float64 arrays, MiB moved in and out",
            "MiB/s",
            True,
            {"full": {"size": 64 * MiB, "count": 8}, "quick": {"size": 8 * MiB, "count": 4}},
            s8_arrays,
        ),
    )
}
