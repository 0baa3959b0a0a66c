"""Functions that the ``poolkit run`` tests call by name (``cli_jobs:square`` and so on).

The CLI imports them in its own process, so they live in an importable module
(the tests put this directory on ``PYTHONPATH``), not in the test file.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0) -> int:
    return a + b


def fail_on_negative(x: int) -> int:
    """Raises ValueError for negative inputs, so a run has some failures."""
    if x < 0:
        raise ValueError(f"negative input: {x}")
    return x * 2


def crash_on_13(x: int) -> int:
    """Kills its worker for 13 (the pool must survive and report WorkerCrashed)."""
    if x == 13:
        os._exit(7)
    return x


def sleep_then_echo(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def sleep_or_fail(seconds: float) -> float:
    """Sleeps ``seconds``; a negative value raises ValueError (one failure in a progress run)."""
    if seconds < 0:
        raise ValueError("negative sleep")
    time.sleep(seconds)
    return seconds


def whoami(_: Any) -> dict[str, Any]:
    """The job's own view of itself: its environment and pid."""
    return {
        "job_id": os.environ.get("POOLKIT_JOB_ID"),
        "worker_id": os.environ.get("POOLKIT_WORKER_ID"),
        "pid": os.getpid(),
    }


def returns_a_set(x: int) -> set[int]:
    return {x}


not_a_function = 42


# A callable that cannot be pickled: it holds a lock.
class _HoldsLock:
    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self, x: int) -> int:
        return x


unpicklable = _HoldsLock()


def slow_square(x: int) -> int:
    """``x * x`` after 20 ms: a run long enough to be killed part way through."""
    time.sleep(0.02)
    return x * x


def fail_once_per_marker(x: int) -> int:
    """Raises ValueError for a negative input unless ``$POOLKIT_TEST_HEALED`` is set: a fixable failure."""
    if x < 0 and not os.environ.get("POOLKIT_TEST_HEALED"):
        raise ValueError(f"negative input: {x}")
    return abs(x)
