"""What a running job knows about itself, and how it talks to its parent.

Inside a job, :func:`current_job` says which job this is and which worker runs
it, and the environment holds ``POOLKIT_JOB_ID``, ``POOLKIT_JOB_TYPE`` and
``POOLKIT_WORKER_ID`` so that programs the job starts see them too. The worker
loop sets both before the job and clears both after it, so nothing leaks into
the next job. Outside a job :func:`current_job` returns None.
"""

from __future__ import annotations

import contextlib
import os
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
    """
    sink = _progress_sink
    if sink is not None:
        sink(value)


def enter_job(context: JobContext, sink: Callable[[Any], None] | None) -> None:
    """Called by the worker loop before a job runs."""
    global _current, _progress_sink
    _current = context
    _progress_sink = sink
    env = os.environ
    env[ENV_JOB_ID] = context.job_id
    env[ENV_WORKER_ID] = str(context.worker_id)
    if context.job_type is not None:
        env[ENV_JOB_TYPE] = context.job_type


def leave_job() -> None:
    """Called by the worker loop after a job, whatever happened to it."""
    global _current, _progress_sink
    context = _current
    _current = None
    _progress_sink = None
    env = os.environ
    # ``del`` on each key we set: much cheaper than MutableMapping.pop. The job
    # may have removed one itself, hence the guard.
    for key in _KEYS if context is None or context.job_type is not None else _KEYS_NO_TYPE:
        with contextlib.suppress(KeyError):
            del env[key]


_KEYS = (ENV_JOB_ID, ENV_WORKER_ID, ENV_JOB_TYPE)
_KEYS_NO_TYPE = (ENV_JOB_ID, ENV_WORKER_ID)
