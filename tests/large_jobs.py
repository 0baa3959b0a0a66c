"""Job functions for tests/test_large_data.py (importable by reference from every start method).

``in_region`` tells whether an object's memory is a shared-memory region
that poolkit mapped (its mappings are named ``memfd:poolkit-data`` in
``/proc/PID/maps``), so a test can see which way the data travelled.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

REGION_NAME = "memfd:poolkit-data"


def address_of(obj: Any) -> int:
    """The address of the first byte of a buffer-like object's memory."""
    if isinstance(obj, np.ndarray):
        return int(obj.__array_interface__["data"][0])
    return int(np.frombuffer(memoryview(obj).cast("B"), dtype=np.uint8).__array_interface__["data"][0])


def region_ranges(pid: int | str = "self") -> list[tuple[int, int]]:
    """The address ranges of this process's poolkit shared-memory mappings."""
    ranges: list[tuple[int, int]] = []
    try:
        with open(f"/proc/{pid}/maps") as maps:
            lines = maps.readlines()
    except FileNotFoundError:
        return ranges  # the process has ended: it maps nothing
    for line in lines:
        if REGION_NAME in line:
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def in_region(obj: Any) -> bool:
    address = address_of(obj)
    return any(start <= address < end for start, end in region_ranges())


def region_fds(pid: int | str = "self") -> list[str]:
    """Descriptors of ``pid`` that point at a poolkit region."""
    found: list[str] = []
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return found  # the process has ended: it holds nothing
    for name in names:
        try:
            target = os.readlink(f"{base}/{name}")
        except OSError:
            continue
        if "poolkit-data" in target:
            found.append(f"{name} -> {target}")
    return found


def double(a: np.ndarray) -> np.ndarray:
    return a * 2.0


def describe(obj: Any) -> dict[str, Any]:
    """What the worker received: its type, whether it lies in a mapped region, whether it is writable."""
    info: dict[str, Any] = {"type": type(obj).__name__}
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        info.update(in_region=in_region(obj), writeable=bool(obj.flags.writeable), sum=float(obj.sum()))
    elif isinstance(obj, memoryview):
        info.update(in_region=in_region(obj), writeable=not obj.readonly, format=obj.format)
    return info


def identity(x: Any) -> Any:
    return x


def make_array(n: int, fill: float) -> np.ndarray:
    return np.full(n, fill)


def length(data: Any) -> int:
    return len(data)


def touch_and_sum(a: np.ndarray) -> float:
    """Write one element of the argument (a private copy-on-write page) and sum it."""
    a[0] = 1.0
    return float(a.sum())


def counted_memory() -> int:
    """What the pool's memory limits count for this process: resident pages minus shared ones (RssAnon)."""
    with open("/proc/self/statm", "rb") as statm:
        fields = statm.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


_KEPT: list[Any] = []


def read_all(a: np.ndarray, hold: float = 0.0, keep: bool = False) -> float:
    """Touch every page of the argument by reading it; ``hold``: keep it mapped a while (the work);
    ``keep``: keep it mapped after the job too."""
    total = float(a.sum())
    if keep:
        _KEPT.append(a)
    if hold:
        import time

        time.sleep(hold)
    return total


def write_all(a: np.ndarray, hold: float = 0.0, keep: bool = False) -> float:
    """Write every page of the argument: each becomes a private copy the worker owns."""
    a[:] = 3.0
    if keep:
        _KEPT.append(a)
    if hold:
        import time

        time.sleep(hold)
    return float(a[-1])


def element(a: Any, i: int) -> float:
    return float(a[i])


def element_and_pid(a: Any, i: int) -> tuple[float, int]:
    return float(a[i]), os.getpid()


def shared_facts(a: np.ndarray) -> dict[str, Any]:
    """What a job sees of a shared array: mapped (not copied), readonly or not, and its id in this worker."""
    return {"in_region": in_region(a), "id": id(a), "pid": os.getpid(), "sum": float(a.sum())}


def region_count(_: Any = None) -> int:
    """How many poolkit shared-memory mappings this worker has right now."""
    return len(region_ranges())


def first_key(table: dict[str, Any]) -> str:
    return sorted(table)[0]


def array_then_die_at(n: int, delay: float) -> np.ndarray:
    """Return a large array, with a thread that SIGKILLs this worker ``delay`` seconds from now.

    With delays spread over the time it takes to pickle, write and send the
    result, the worker dies at whatever point of that the delay falls on.
    """
    import signal
    import threading

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    result = np.full(n, 5.0)
    threading.Timer(delay, die).start()
    return result


class DieWhenPickled:
    """Kills its worker while the worker pickles it (after the large pieces before it)."""

    def __reduce__(self) -> Any:
        os._exit(3)


def large_then_die_in_pickling(n: int) -> list[Any]:
    return [np.full(n, 1.0), DieWhenPickled()]


def wait_mapped_then_block(a: np.ndarray, started: str) -> float:
    """Map the argument (read all of it), say so, then wait to be killed."""
    import time

    total = float(a.sum())
    with open(started, "w") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(600)
    return total


def allocate(nbytes: int) -> np.ndarray:
    return np.ones(nbytes // 8)


def fds_and_regions(_: Any = None) -> tuple[int, list[str], int]:
    """This worker's pid, its descriptors that point at regions, and its region mappings."""
    return os.getpid(), region_fds(), len(region_ranges())
