"""Job functions and small helpers for the recycling, limits, context and observability tests.

Jobs live in an importable module (not in the test files) so that every start
method, ``spawn`` included, runs the same code by reference. Module-level
state here (``_LEAK``, ``_CONNECTION``, ``_INIT_SEEN``) is per worker process:
that is what lets a test see leaks, connections and initializer effects that
belong to one worker.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import poolkit
from poolkit import context

MiB = 1024 * 1024

# ----------------------------------------------------------------- test-side helpers


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds.

    A bounded poll on an observable fact (a file appears, a pid is gone), not a
    sleep guess: it returns as soon as the fact holds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def live_workers(stats: poolkit.PoolStats) -> list[poolkit.WorkerInfo]:
    """Workers that count towards the pool's size: starting or ready."""
    return [w for w in stats.workers if w.state in ("starting", "ready")]


def wait_ready(pool: poolkit.Pool, n: int, timeout: float = 15.0) -> list[poolkit.WorkerInfo]:
    """Wait until ``n`` workers are ready; return them."""

    def ready() -> list[poolkit.WorkerInfo]:
        workers = [w for w in pool.stats().workers if w.state == "ready"]
        return workers if len(workers) >= n else []

    return list(wait_until(ready, timeout=timeout, what=f"{n} ready workers"))


# ----------------------------------------------------------------- plain jobs


def pid_of(x: Any = None) -> tuple[Any, int]:
    """Return the input and the pid of the worker that ran it."""
    return x, os.getpid()


def sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def span(seconds: float) -> tuple[float, float, int]:
    """Sleep; return (start, end, pid) on the wall clock, to measure how many jobs overlap."""
    start = time.time()
    time.sleep(seconds)
    return start, time.time(), os.getpid()


def max_overlap(spans: list[tuple[float, float, int]]) -> int:
    """The largest number of (start, end) intervals open at one time."""
    edges = sorted([(a, 1) for a, _, _ in spans] + [(b, -1) for _, b, _ in spans])
    open_now = peak = 0
    for _, step in edges:
        open_now += step
        peak = max(peak, open_now)
    return peak


def serving_workers(stats: poolkit.PoolStats) -> list[poolkit.WorkerInfo]:
    """Workers that can take a job or are still running one (a retiring worker's last job counts)."""
    return [
        w
        for w in stats.workers
        if w.state in ("starting", "ready") or (w.state == "retiring" and w.current_job is not None)
    ]


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def fail(message: str) -> None:
    raise ValueError(message)


def crash(code: int) -> None:
    os._exit(code)


def signal_then_sleep(marker: str, seconds: float) -> int:
    """Write ``marker`` (so the test knows the job is running), then sleep."""
    Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def ignore_sigterm_and_sleep(seconds: float) -> None:
    """A job that will not stop politely: only SIGKILL ends it."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)


def write_file(path: str) -> int:
    """A job with a visible side effect."""
    Path(path).write_text(str(os.getpid()))
    return os.getpid()


def wait_for_file(path: str, timeout: float = 20.0) -> int:
    """Block until ``path`` exists (the test's go signal); return the pid."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.002)
    return os.getpid()


# ----------------------------------------------------------------- memory jobs

_LEAK: list[bytes] = []


def leak(mib: int) -> tuple[int, int]:
    """Leak ``mib`` MiB of touched memory into a module-level list; return (pid, leaked so far)."""
    _LEAK.append(b"x" * (mib * MiB))  # b"x" * n writes every page, so RSS grows
    return os.getpid(), len(_LEAK)


def allocate_gradually(total_mib: int, step_mib: int, pause: float = 0.005) -> int:
    """Allocate and touch ``total_mib`` MiB in steps; only a hard memory limit stops it."""
    held: list[bytes] = []
    while len(held) * step_mib < total_mib:
        held.append(b"x" * (step_mib * MiB))
        time.sleep(pause)
    return len(held) * step_mib


def touch(mib: int) -> int:
    """Allocate and touch ``mib`` MiB, free it, return the pid."""
    block = b"x" * (mib * MiB)
    del block
    return os.getpid()


def burn_cpu(seconds: float) -> tuple[float, float]:
    """Spin for ``seconds`` of this process's CPU time; return (CPU, wall) as the job itself measured them."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    end = cpu0 + seconds
    while time.process_time() < end:
        pass
    return time.process_time() - cpu0, time.perf_counter() - wall0


# ----------------------------------------------------------------- context jobs


def _poolkit_env() -> dict[str, str]:
    """The job variables poolkit sets (others named POOLKIT_*, a user's or CI's, are not its)."""
    names = (context.ENV_JOB_ID, context.ENV_JOB_TYPE, context.ENV_WORKER_ID)
    return {key: value for key, value in os.environ.items() if key in names}


def describe_context(timeout_seen: bool = False) -> dict[str, Any]:
    """What a job can see about itself: current_job(), env vars, and a child process's view."""
    ctx = poolkit.current_job()
    child = subprocess.run(
        ["sh", "-c", 'echo "$POOLKIT_JOB_ID|$POOLKIT_JOB_TYPE|$POOLKIT_WORKER_ID"'],
        capture_output=True,
        text=True,
        check=True,
    )
    return {
        "pid": os.getpid(),
        "context": None
        if ctx is None
        else {
            "job_id": ctx.job_id,
            "job_type": ctx.job_type,
            "worker_id": ctx.worker_id,
            "attempt": ctx.attempt,
            "deadline_in": None if ctx.deadline is None else ctx.deadline - time.monotonic(),
        },
        "env": _poolkit_env(),
        "child": child.stdout.strip(),
    }


def mess_with_env() -> dict[str, str]:
    """A job that also sets its own variable; poolkit's must still go away after it."""
    os.environ["POOLKIT_JOB_EXTRA_FROM_JOB"] = "1"  # the job's own business, not poolkit's
    return _poolkit_env()


def poolkit_env() -> dict[str, str]:
    return _poolkit_env()


_INIT_SEEN: dict[str, Any] = {}


def record_context_in_initializer() -> None:
    """Initializer: note what a plain function sees outside a job."""
    _INIT_SEEN["context"] = poolkit.current_job()
    _INIT_SEEN["env"] = _poolkit_env()
    poolkit.report_progress("from the initializer")  # outside a job: must be a no-op


def initializer_view() -> dict[str, Any]:
    return dict(_INIT_SEEN)


def write_context_in_finalizer(directory: str) -> None:
    """Finalizer: record what a plain function sees after the last job."""
    ctx = poolkit.current_job()
    Path(directory, f"{os.getpid()}.json").write_text(
        json.dumps({"context": None if ctx is None else repr(ctx), "env": _poolkit_env()})
    )


def crash_on_first_attempt(marker: str) -> dict[str, Any]:
    """Die the first time (no marker yet), succeed the second; return the context."""
    if not os.path.exists(marker):
        Path(marker).write_text("1")
        os._exit(9)
    ctx = poolkit.current_job()
    assert ctx is not None
    return {"attempt": ctx.attempt, "job_id": ctx.job_id}


# ----------------------------------------------------------------- progress jobs


def report_range(n: int, go: str | None = None) -> int:
    """Report 0..n-1 as progress (after ``go`` exists, when given)."""
    if go is not None:
        wait_for_file(go)
    for i in range(n):
        poolkit.report_progress(i)
    return n


# ----------------------------------------------------------------- finalizers


def write_pid_file(directory: str) -> None:
    """Finalizer: leave a file named after this worker's pid."""
    Path(directory, str(os.getpid())).write_text("finalized")


def failing_finalizer() -> None:
    raise RuntimeError("finalizer exploded on purpose")


# ----------------------------------------------------------------- SQLite


_CONNECTION: sqlite3.Connection | None = None


def _connect(path: str) -> sqlite3.Connection:
    return sqlite3.connect(path, timeout=30, isolation_level=None)


def create_events_table(path: str) -> None:
    with _connect(path) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS events (what TEXT, pid INTEGER, at REAL)")
    connection.close()


def open_database(path: str) -> None:
    """Initializer: one connection per worker, recorded as 'open <pid>'."""
    global _CONNECTION
    _CONNECTION = _connect(path)
    _CONNECTION.execute("INSERT INTO events VALUES ('open', ?, ?)", (os.getpid(), time.monotonic()))


def use_database(x: int) -> int:
    """A job that uses the worker's connection."""
    assert _CONNECTION is not None, "the initializer did not run in this worker"
    _CONNECTION.execute("INSERT INTO events VALUES ('job', ?, ?)", (os.getpid(), time.monotonic()))
    return os.getpid()


def close_database() -> None:
    """Finalizer: record 'close <pid>' and close the connection."""
    global _CONNECTION
    assert _CONNECTION is not None
    _CONNECTION.execute(
        "INSERT INTO events VALUES ('close', ?, ?)", (os.getpid(), time.monotonic())
    )
    _CONNECTION.close()
    _CONNECTION = None


def read_events(path: str) -> list[tuple[str, int, float]]:
    connection = _connect(path)
    try:
        return list(connection.execute("SELECT what, pid, at FROM events ORDER BY rowid"))
    finally:
        connection.close()
