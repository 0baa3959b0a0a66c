"""Job functions for tests/test_batch_contract.py and the CLI contract tests.

They live in a module of their own so that workers import them by reference
(cloudpickle would otherwise send them by value, and a worker would not find
module-level state such as a marker directory).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any


def square(n: int) -> int:
    return n * n


def exit_on(n: int, target: int = 2) -> int:
    if n == target:
        sys.exit(3)
    return n


def interrupt_on(n: int, target: int = 2) -> int:
    if n == target:
        raise KeyboardInterrupt
    return n


def raise_on(n: int, target: int) -> int:
    if n == target:
        raise ValueError(f"bad input {n}")
    return n


def die_on(n: int, target: int) -> int:
    if n == target:
        os._exit(7)
    return n


def count_then_die_on(args: tuple[str, int, int]) -> int:
    """Append a line to ``<dir>/<n>`` for every run, then kill the worker if ``n == target``."""
    directory, n, target = args
    with open(os.path.join(directory, str(n)), "a") as f:
        f.write("run\n")
    if n == target:
        os._exit(9)
    return n


def count_then_raise_on(args: tuple[str, int, int]) -> int:
    directory, n, target = args
    with open(os.path.join(directory, str(n)), "a") as f:
        f.write("run\n")
    if n == target:
        raise ValueError(f"bad input {n}")
    return n


def runs(directory: Path, n: int) -> int:
    path = directory / str(n)
    return len(path.read_text().splitlines()) if path.exists() else 0


def mark_then_sleep(args: tuple[str, int, float]) -> int:
    """Leave ``<dir>/<n>`` as proof that input ``n`` started, then sleep ``seconds`` (the first two: none)."""
    directory, n, seconds = args
    Path(directory, str(n)).touch()
    if n >= 2:
        time.sleep(seconds)
    return n


def sleep_after(n: int, first_slow: int, seconds: float) -> int:
    """Instant for ``n < first_slow`` (so map's chunks grow), then ``seconds`` each."""
    if n >= first_slow:
        time.sleep(seconds)
    return n


class TwoArgs(Exception):
    """An exception whose ``__init__`` takes two arguments: its pickle does not load back."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


def raise_two_args() -> None:
    raise TwoArgs(42, "disk full")


# ----------------------------------------------------------------- for poolkit run


def read_stdin(n: int) -> str:
    """A job that reads stdin: it must find nothing (workers get /dev/null)."""
    return sys.stdin.readline()


def chatty(n: int) -> int:
    """A job that prints: the text must not land in the JSON output."""
    print(f"hello from input {n}")
    return n


def not_finite(n: int) -> Any:
    return {0: math.nan, 1: math.inf, 2: -math.inf}.get(n, [n, math.nan])


def lone_surrogate(n: int) -> str:
    if n == 1:
        return os.fsdecode(b"caf\xe9.txt")
    return "ok"


def wait_for_file(path: str) -> str:
    """Return once ``path`` exists (the test creates it after it saw an earlier result)."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return path


def big_input(value: Any) -> int:
    return len(value) if isinstance(value, str) else 0


def count_when_slow(args: tuple[str, int, int, float]) -> int:
    """Instant for ``n < first_slow``; after it, count the run in ``<dir>/<n>`` and sleep ``seconds``."""
    directory, n, first_slow, seconds = args
    if n >= first_slow:
        with open(os.path.join(directory, str(n)), "a") as f:
            f.write("run\n")
        time.sleep(seconds)
    return n
