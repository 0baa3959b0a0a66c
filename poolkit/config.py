"""Pool configuration, checked once at construction.

Bad configuration is the user's mistake at the line that builds the pool, so
it is reported there (``ValueError``/``TypeError`` naming the value) rather
than as a confusing failure of the first job.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["START_METHODS", "PoolConfig", "WorkerConfig", "parse_bytes"]

START_METHODS = ("fork", "forkserver", "spawn")

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str, name: str) -> int:
    """Read a memory size: an int of bytes or a string such as ``"512MiB"`` or ``"2GB"``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{name} must be an int of bytes or a string like '512MiB', got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"{name}={value!r} is not a memory size; use bytes or a number with a unit "
                "such as '512MiB', '2GB'"
            )
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return size


def _positive_int(value: object, name: str, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0, got {value!r}")
    return value


def _positive_seconds(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return float(value)


def _callable_or_none(value: object, name: str) -> Callable[..., Any] | None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable, got {value!r}")
    return value


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker needs to know; pickled once per pool, unpickled once per template and inherited by its workers."""

    initializer: Callable[..., Any] | None
    initargs: tuple[Any, ...]
    finalizer: Callable[..., Any] | None
    finalargs: tuple[Any, ...]
    max_memory_per_child: int | None
    pool_name: str
    memory_limit_per_child: int | None = None  # a worker then posts every job for the template
    # The pool's multiprocessing authkey, for workers that are not forks of its
    # process (manager proxies passed to jobs authenticate with it); None: inherited.
    authkey: bytes | None = None
    shm_threshold: int | None = None  # results with pieces this large go through shared memory (shm.py)


@dataclass(frozen=True)
class PoolConfig:
    """Every option of a pool, validated."""

    max_workers: int
    min_workers: int
    start_method: str
    preload: tuple[str, ...]
    initializer: Callable[..., Any] | None
    initargs: tuple[Any, ...]
    finalizer: Callable[..., Any] | None
    finalargs: tuple[Any, ...]
    max_tasks_per_child: int | None
    recycle_jitter: float
    max_memory_per_child: int | None
    memory_limit_per_child: int | None
    memory_check_interval: float
    max_lifetime_per_child: float | None
    idle_timeout: float | None
    job_timeout: float | None
    kill_grace: float
    exit_timeout: float
    start_timeout: float | None
    name: str
    stall_timeout: float | None = 60.0
    shm_threshold: int | None = 1 << 20

    @classmethod
    def build(
        cls,
        *,
        max_workers: int | None,
        mp_context: Any,
        start_method: str | None,
        preload: Sequence[str],
        initializer: Callable[..., Any] | None,
        initargs: Sequence[Any],
        finalizer: Callable[..., Any] | None,
        finalargs: Sequence[Any],
        max_tasks_per_child: int | None,
        recycle_jitter: float,
        max_memory_per_child: int | str | None,
        memory_limit_per_child: int | str | None,
        memory_check_interval: float,
        max_lifetime_per_child: float | None,
        idle_timeout: float | None,
        min_workers: int | None,
        job_timeout: float | None,
        kill_grace: float,
        name: str | None,
        exit_timeout: float = 10.0,
        start_timeout: float | None = 300.0,
        stall_timeout: float | None = 60.0,
        shm_threshold: int | str | None = 1 << 20,
    ) -> PoolConfig:
        if max_workers is None:
            from loky import cpu_count

            workers = max(1, int(cpu_count()))
        else:
            workers = _positive_int(max_workers, "max_workers", allow_none=False)  # type: ignore[assignment]
        assert workers is not None

        if min_workers is None:
            floor = workers
        else:
            if isinstance(min_workers, bool) or not isinstance(min_workers, int):
                raise TypeError(f"min_workers must be an int, got {min_workers!r}")
            if not 0 <= min_workers <= workers:
                raise ValueError(
                    f"min_workers must be between 0 and max_workers={workers}, got {min_workers!r}"
                )
            floor = min_workers

        method = _start_method(mp_context, start_method)

        if isinstance(preload, str) or not all(isinstance(m, str) for m in preload):
            raise TypeError(f"preload must be a list of module names, got {preload!r}")
        for module in preload:
            importlib.util.find_spec(module)  # raises ModuleNotFoundError for a typo, here

        if isinstance(recycle_jitter, bool) or not isinstance(recycle_jitter, (int, float)):
            raise TypeError(f"recycle_jitter must be a number between 0 and 1, got {recycle_jitter!r}")
        if not 0.0 <= recycle_jitter <= 1.0:
            raise ValueError(f"recycle_jitter must be between 0 and 1, got {recycle_jitter!r}")

        if not isinstance(initargs, (tuple, list)):
            raise TypeError(f"initargs must be a tuple, got {initargs!r}")
        if not isinstance(finalargs, (tuple, list)):
            raise TypeError(f"finalargs must be a tuple, got {finalargs!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string, got {name!r}")

        return cls(
            max_workers=workers,
            min_workers=floor,
            start_method=method,
            preload=tuple(preload),
            initializer=_callable_or_none(initializer, "initializer"),
            initargs=tuple(initargs),
            finalizer=_callable_or_none(finalizer, "finalizer"),
            finalargs=tuple(finalargs),
            max_tasks_per_child=_positive_int(max_tasks_per_child, "max_tasks_per_child"),
            recycle_jitter=float(recycle_jitter),
            max_memory_per_child=(
                None
                if max_memory_per_child is None
                else parse_bytes(max_memory_per_child, "max_memory_per_child")
            ),
            memory_limit_per_child=(
                None
                if memory_limit_per_child is None
                else parse_bytes(memory_limit_per_child, "memory_limit_per_child")
            ),
            memory_check_interval=_positive_seconds(memory_check_interval, "memory_check_interval")
            or 0.01,
            max_lifetime_per_child=_positive_seconds(max_lifetime_per_child, "max_lifetime_per_child"),
            idle_timeout=_positive_seconds(idle_timeout, "idle_timeout"),
            job_timeout=_positive_seconds(job_timeout, "job_timeout"),
            kill_grace=_positive_seconds(kill_grace, "kill_grace") or 1.0,
            exit_timeout=_positive_seconds(exit_timeout, "exit_timeout") or 10.0,
            start_timeout=_positive_seconds(start_timeout, "start_timeout"),
            name=name or "pool",
            stall_timeout=_positive_seconds(stall_timeout, "stall_timeout"),
            shm_threshold=_threshold(shm_threshold),
        )

    def worker_config(self, authkey: bytes | None = None) -> WorkerConfig:
        return WorkerConfig(
            initializer=self.initializer,
            initargs=self.initargs,
            finalizer=self.finalizer,
            finalargs=self.finalargs,
            max_memory_per_child=self.max_memory_per_child,
            pool_name=self.name,
            memory_limit_per_child=self.memory_limit_per_child,
            authkey=authkey,
            shm_threshold=self.shm_threshold,
        )


def _threshold(value: int | str | None) -> int | None:
    """``shm_threshold``: a size, or 0/None for "never through shared memory"."""
    if value is None or (value == 0 and not isinstance(value, bool)):
        return None
    return parse_bytes(value, "shm_threshold")


def _start_method(mp_context: Any, start_method: str | None) -> str:
    if mp_context is not None and start_method is not None:
        raise ValueError("give either mp_context or start_method, not both")
    if mp_context is not None:
        getter = getattr(mp_context, "get_start_method", None)
        if getter is None:
            raise TypeError(f"mp_context must be a multiprocessing context, got {mp_context!r}")
        method = getter()
    elif start_method is not None:
        method = start_method
    else:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    if method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}, got {method!r}")
    return str(method)
