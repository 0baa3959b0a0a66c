"""Soak run: many kinds of jobs at a high rate, workers SIGKILLed from outside, then an audit.

    python -m benchmarks.soak [--duration 60] [--workers 2] [--executor poolkit|stdlib]

For ``--duration`` seconds it keeps a bounded number of jobs in flight, mixing
tiny jobs, slow jobs, jobs that leak memory, jobs that crash their worker
(``os._exit``) and jobs that run past their timeout, while a killer thread
SIGKILLs a random worker every ``--kill-every`` seconds. At the end it checks
what a user relies on and prints the figures:

* every submitted job resolved (submitted == resolved), none hanging;
* every result that came back is the right one;
* worker RSS stayed bounded (sampled all along);
* no process is left after shutdown, and the parent's file descriptors are
  back to where they started.

With ``--executor stdlib`` the same load runs against
``concurrent.futures.ProcessPoolExecutor`` (fork) for contrast: there a
crash breaks the whole executor, so the script counts the broken futures and
starts a new executor each time, as a user would have to.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

import psutil

from . import jobs as bench_jobs

MiB = 1024 * 1024
_LEAK: list[bytes] = []


def tiny(x: int) -> int:
    return x * 2


def slow(x: int) -> int:
    time.sleep(0.02)
    return x * 2


def leaky(x: int) -> int:
    _LEAK.append(b"x" * (4 * MiB))
    return x * 2


def crash(x: int) -> int:
    os._exit(13)


def hang(x: int) -> int:
    time.sleep(30)
    return x * 2


KINDS = (
    ("tiny", tiny, 70),
    ("slow", slow, 12),
    ("leaky", leaky, 10),
    ("crash", crash, 4),
    ("hang", hang, 4),
)
EXPECTED_FAILURE = {"crash", "hang"}


def _descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


class Sampler(threading.Thread):
    """Samples the RSS of every descendant, and SIGKILLs a random worker now and then."""

    def __init__(self, kill_every: float, rng: random.Random) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.kill_every = kill_every
        self.rng = rng
        self.peak_rss = 0
        self.kills = 0
        self.stop = threading.Event()

    def run(self) -> None:
        next_kill = time.monotonic() + self.kill_every
        while not self.stop.wait(0.05):
            for proc in _descendants():
                try:
                    self.peak_rss = max(self.peak_rss, proc.memory_info().rss)
                except psutil.Error:
                    pass
            if self.kill_every > 0 and time.monotonic() >= next_kill:
                next_kill += self.kill_every
                # Workers are the leaves: the template (poolkit) or the executor's
                # processes have none of their own.
                leaves = [p for p in _descendants() if not _safe_children(p)]
                if leaves:
                    victim = self.rng.choice(leaves)
                    try:
                        victim.send_signal(signal.SIGKILL)
                        self.kills += 1
                    except psutil.Error:
                        pass


def _safe_children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children()
    except psutil.Error:
        return []


def _make_executor(kind: str, workers: int) -> Any:
    if kind == "poolkit":
        import poolkit

        return poolkit.Pool(workers, max_memory_per_child="200MiB", job_timeout=0.5)
    return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))


def soak(duration: float, workers: int, kind: str, kill_every: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    fds_before = len(os.listdir("/proc/self/fd"))
    sampler = Sampler(kill_every, rng)
    executor = _make_executor(kind, workers)
    executors_started = 1
    sampler.start()
    submitted = Counter[str]()
    outcomes = Counter[str]()
    wrong = 0
    in_flight: dict[cf.Future[Any], tuple[str, int]] = {}
    names = [name for name, _, _ in KINDS]
    weights = [w for _, _, w in KINDS]
    functions = {name: fn for name, fn, _ in KINDS}
    deadline = time.monotonic() + duration
    started = time.monotonic()
    counter = 0
    limit = workers * 8

    def settle(done: set[cf.Future[Any]]) -> None:
        nonlocal wrong
        for future in done:
            name, x = in_flight.pop(future)
            try:
                value = future.result(timeout=0)
            except Exception as exc:  # every failure is counted by type
                outcomes[f"{name}:{type(exc).__name__}"] += 1
                continue
            if value != x * 2:
                wrong += 1
            outcomes[f"{name}:ok"] += 1

    while time.monotonic() < deadline:
        while len(in_flight) < limit:
            name = rng.choices(names, weights)[0]
            if kind == "stdlib" and name == "hang":
                name = "slow"  # the stdlib has no timeout: a hang would stall the soak
            counter += 1
            try:
                future = executor.submit(functions[name], counter)
            except Exception:  # a broken stdlib executor refuses work: replace it
                executor.shutdown(wait=False, cancel_futures=True)
                executor = _make_executor(kind, workers)
                executors_started += 1
                continue
            submitted[name] += 1
            in_flight[future] = (name, counter)
        done, _ = cf.wait(list(in_flight), timeout=1.0, return_when=cf.FIRST_COMPLETED)
        settle(done)
    # Drain: every submitted job must resolve.
    done, not_done = cf.wait(list(in_flight), timeout=60)
    settle(done)
    hung = len(not_done)
    sampler.stop.set()
    sampler.join()
    executor.shutdown(wait=True)
    elapsed = time.monotonic() - started
    time.sleep(0.2)  # let the kernel finish reaping before we look
    left = [p.pid for p in _descendants()]
    fds_after = len(os.listdir("/proc/self/fd"))
    total_submitted = sum(submitted.values())
    resolved = sum(outcomes.values())
    unexpected = {
        k: v
        for k, v in outcomes.items()
        if not k.endswith(":ok") and k.split(":")[0] not in EXPECTED_FAILURE
    }
    return {
        "executor": kind,
        "duration_s": round(elapsed, 1),
        "workers": workers,
        "submitted": total_submitted,
        "resolved": resolved,
        "hung": hung,
        "jobs_per_s": round(resolved / elapsed, 1),
        "wrong_results": wrong,
        "worker_kills_injected": sampler.kills,
        "crash_jobs": submitted["crash"],
        "outcomes": dict(sorted(outcomes.items())),
        "failures_of_normal_jobs": unexpected,
        "executors_started": executors_started,
        "peak_worker_rss_mib": round(sampler.peak_rss / MiB, 1),
        "processes_left": left,
        "fds_before": fds_before,
        "fds_after": fds_after,
        "ok": total_submitted == resolved and hung == 0 and wrong == 0 and not left,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--executor", choices=("poolkit", "stdlib"), default="poolkit")
    parser.add_argument("--kill-every", type=float, default=0.5, help="seconds between SIGKILLs of a worker")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    bench_jobs.noop()  # the job module is importable by workers
    figures = soak(args.duration, args.workers, args.executor, args.kill_every, args.seed)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text + "\n")
    return 0 if figures["ok"] or args.executor == "stdlib" else 1


if __name__ == "__main__":
    sys.exit(main())
