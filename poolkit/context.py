"""What a running job knows about itself, and how it talks to its parent.

Inside a job, [`current_job`][poolkit.current_job] says which job this is and which worker runs
it, and the environment holds ``POOLKIT_JOB_ID``, ``POOLKIT_JOB_TYPE`` and
``POOLKIT_WORKER_ID`` so that programs the job starts see them too. The worker
loop sets both before the job and clears both after it, so nothing leaks into
the next job. Outside a job [`current_job`][poolkit.current_job] returns None.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["ENV_JOB_ID", "ENV_JOB_TYPE", "ENV_WORKER_ID", "JobContext", "current_job", "report_progress"]

ENV_JOB_ID = "POOLKIT_JOB_ID"
ENV_JOB_TYPE = "POOLKIT_JOB_TYPE"
ENV_WORKER_ID = "POOLKIT_WORKER_ID"


class JobContext(NamedTuple):
    """Who the running job is.

    Attributes:
        job_id: unique within the pool; the caller's own id when given.
        job_type: the caller's label for the job (``pool.options(job_type=...)``), or None.
        worker_id: the pool's id for the worker running the job.
        attempt: 1 for the first run, 2 and up when the pool retried it.
        deadline: ``time.monotonic()`` value after which the job is stopped, or None.
    """

    job_id: str
    job_type: str | None
    worker_id: int
    attempt: int
    deadline: float | None


_current: JobContext | None = None
_progress_sink: Callable[[Any], None] | None = None


def current_job() -> JobContext | None:
    """The context of the job running in this process, or None outside a job."""
    return _current


def report_progress(value: Any) -> None:
    """Send ``value`` (any picklable object) to the parent as this job's progress.

    It never waits for a slow parent: if the channel is full the value is kept
    and only the latest one is sent when there is room. Outside a job (or in a
    job run by another executor) it does nothing, so job code stays portable.

    Args:
        value: what to send: a number, a dict, any object that pickles; the
            parent's progress callbacks receive it as it is.
    """
    sink = _progress_sink
    if sink is not None:
        sink(value)


class _JobEnvironment:
    """Sets the per-job variables before a job and removes them after it, without a leak.

    ``os.environ[name] = value`` calls ``setenv()``, and glibc keeps every
    distinct value it was ever given, since a pointer from ``getenv()`` to it
    may still be held. A new job id per job thus grew a worker by about 64
    bytes a job (30 MiB over 500,000 jobs, measured). Here the ``NAME=value``
    string is a bytes object of ours handed to ``putenv()``, which keeps the
    pointer instead of a copy; after ``unsetenv()`` nothing points to it and
    it is freed. ``os.environ``'s own mapping gets the same values, so Python code
    and the programs a job starts see the same environment. Where that C
    route is not available, ``os.environ`` is used as is.
    """

    def __init__(self) -> None:
        self._buffers: dict[bytes, Any] = {}  # the strings environ points to now
        self._c: tuple[Any, Any, dict[bytes, bytes], str] | None = None
        data = getattr(os.environ, "_data", None)
        if not sys.platform.startswith("linux") or not isinstance(data, dict):
            return
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            putenv, unsetenv = libc.putenv, libc.unsetenv
            putenv.argtypes = unsetenv.argtypes = (ctypes.c_char_p,)
            putenv.restype = unsetenv.restype = ctypes.c_int
            self._c = (putenv, unsetenv, data, sys.getfilesystemencoding())
        except Exception:
            self._c = None

    def set(self, name: str, value: str) -> None:
        c = self._c
        if c is None:
            os.environ[name] = value
            return
        putenv, _, data, encoding = c
        key = name.encode(encoding, "surrogateescape")
        raw = value.encode(encoding, "surrogateescape")
        # An immutable bytes object: environ points into it while we hold it.
        entry = key + b"=" + raw
        if putenv(entry) != 0:
            os.environ[name] = value
            return
        self._buffers[key] = entry  # the one it replaces is no longer in environ
        data[key] = raw

    def clear(self, name: str) -> None:
        c = self._c
        if c is None:
            try:
                del os.environ[name]
            except KeyError:  # the job removed it itself
                pass
            return
        _, unsetenv, data, encoding = c
        key = name.encode(encoding, "surrogateescape")
        unsetenv(key)
        data.pop(key, None)
        self._buffers.pop(key, None)


_environment = _JobEnvironment()


def enter_job(context: JobContext, sink: Callable[[Any], None] | None) -> None:
    """Called by the worker loop before a job runs."""
    global _current, _progress_sink
    _current = context
    _progress_sink = sink
    _environment.set(ENV_JOB_ID, context.job_id)
    _environment.set(ENV_WORKER_ID, str(context.worker_id))
    if context.job_type is not None:
        _environment.set(ENV_JOB_TYPE, context.job_type)


def leave_job() -> None:
    """Called by the worker loop after a job, whatever happened to it."""
    global _current, _progress_sink
    context = _current
    _current = None
    _progress_sink = None
    for key in _KEYS if context is None or context.job_type is not None else _KEYS_NO_TYPE:
        _environment.clear(key)


_KEYS = (ENV_JOB_ID, ENV_WORKER_ID, ENV_JOB_TYPE)
_KEYS_NO_TYPE = (ENV_JOB_ID, ENV_WORKER_ID)
