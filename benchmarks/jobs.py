"""The job functions every peer runs, defined at module level.

They live in an importable module (not in ``__main__``) so that every start
method can find them: ``spawn`` and ``forkserver`` workers import them by
name, and the standard library cannot pickle lambdas.
"""

from __future__ import annotations

import os
import time
from typing import Any

__all__ = ["chunk", "crash_if", "die_at", "double", "echo", "leak", "noop", "rss_bytes", "square"]

_PAGE = os.sysconf("SC_PAGE_SIZE")
_LEAKED: list[bytearray] = []


def noop(*_args: object) -> None:
    """S1, S3, S5: a job that does nothing, so that only the pool's cost is measured.

    It ignores its arguments because mpire's ``map`` passes each item as arguments.
    """


def square(x: int) -> int:
    """S2: the cheapest job that still proves the input reached the worker."""
    return x * x


def crash_if(i: int, crash: bool) -> int:
    """S4: every 10th job kills its worker the hard way (no exception, no cleanup)."""
    if crash and i % 10 == 9:
        os._exit(1)
    return i


def leak(size: int, hold: float) -> int:
    """S6: keep ``size`` more bytes alive for the rest of the worker's life.

    The bytes are written (not just allocated), so that they count in RSS;
    ``hold`` keeps the job running long enough for the parent's sampler to
    see the new peak. Returns the worker's RSS after the leak, a cross-check
    of the sampled figure.
    """
    _LEAKED.append(bytearray(b"\x01") * size)
    if hold:
        time.sleep(hold)
    return rss_bytes()


def echo(payload: bytes) -> bytes:
    """S7: send the payload straight back (a round trip of pickling and pipes)."""
    return payload


def double(a: Any) -> Any:
    """S8: a numpy array times two (a new array of the same size comes back)."""
    return a * 2.0


def chunk(fn_items: tuple[object, list[int]]) -> list[object]:
    """The reference pool's map: one job per slice of inputs."""
    fn, items = fn_items
    return [fn(x) for x in items]  # type: ignore[operator]


def rss_bytes() -> int:
    """This process's resident set size, read from ``/proc/self/statm``."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def die_at(path: str) -> None:
    """respawn.py: note the moment of death (system-wide monotonic clock), then die."""
    with open(path, "w") as f:
        f.write(repr(time.monotonic()))
    os._exit(1)
