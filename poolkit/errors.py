"""The errors poolkit raises.

Every error poolkit itself raises derives from [`PoolkitError`][poolkit.PoolkitError], so one
``except PoolkitError`` catches them all. Two of them also derive from the
standard library's classes so that code written for
``concurrent.futures.ProcessPoolExecutor`` keeps working unchanged:
[`WorkerCrashed`][poolkit.WorkerCrashed] is a ``BrokenProcessPool`` and [`JobTimeout`][poolkit.JobTimeout] is a
``TimeoutError``. A job's *own* exception is never wrapped: it comes back as
itself, with the worker's traceback attached as ``__cause__``.
"""

from __future__ import annotations

import pickle
import signal
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback

__all__ = [
    "BrokenPool",
    "JobTimeout",
    "MemoryLimitExceeded",
    "PoolkitError",
    "RemoteTraceback",
    "UnpicklableJobError",
    "UnpicklingFailed",
    "WorkerCrashed",
    "describe_exit",
]


class PoolkitError(Exception):
    """Base class of every error raised by poolkit itself."""


def describe_exit(exitcode: int | None) -> str:
    """Say how a process ended, in words: ``"exit code 3"`` or ``"signal SIGSEGV"``.

    ``exitcode`` follows ``multiprocessing``'s convention: negative for a signal.
    """
    if exitcode is None:
        return "an unknown exit status"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class WorkerCrashed(BrokenProcessPool, PoolkitError):
    """The worker running this job died before it answered.

    Only the job that was running fails; the pool replaces the worker and goes
    on. Subclasses ``BrokenProcessPool`` so that ``except BrokenProcessPool``
    written for the standard library still catches it.

    Args:
        message: what happened, in words (``str(error)``).

    Attributes:
        exitcode: the worker's exit code, negative for a signal (None if unknown).
        signal_name: ``"SIGSEGV"`` and so on when a signal ended it, else None.
        pid: the worker's process id.
        worker_id: poolkit's id for the worker.
        job_id: the id of the job that was running.
    """

    def __init__(
        self,
        message: str,
        *,
        exitcode: int | None = None,
        pid: int | None = None,
        worker_id: int | None = None,
        job_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.pid = pid
        self.worker_id = worker_id
        self.job_id = job_id

    @property
    def signal_name(self) -> str | None:
        if self.exitcode is None or self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return None

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Keyword-only attributes do not survive the default exception pickling.
        return (
            _rebuild_crash,
            (type(self), str(self), self.exitcode, self.pid, self.worker_id, self.job_id),
        )


def _rebuild_crash(
    cls: type[WorkerCrashed],
    message: str,
    exitcode: int | None,
    pid: int | None,
    worker_id: int | None,
    job_id: str | None,
) -> WorkerCrashed:
    return cls(message, exitcode=exitcode, pid=pid, worker_id=worker_id, job_id=job_id)


class MemoryLimitExceeded(WorkerCrashed):
    """The worker went over ``memory_limit_per_child`` while running this job and was killed.

    Args:
        message: what happened, in words (``str(error)``).

    Attributes:
        rss: the worker's resident memory when it was seen over the limit, in bytes.
        limit: ``memory_limit_per_child``, in bytes.
        exitcode: as for [`WorkerCrashed`][poolkit.WorkerCrashed] (``-SIGKILL``).
        signal_name: as for [`WorkerCrashed`][poolkit.WorkerCrashed] (``"SIGKILL"``).
        pid: the worker's process id.
        worker_id: poolkit's id for the worker.
        job_id: the id of the job that was running.
    """

    def __init__(
        self,
        message: str,
        *,
        rss: int | None = None,
        limit: int | None = None,
        exitcode: int | None = None,
        pid: int | None = None,
        worker_id: int | None = None,
        job_id: str | None = None,
    ) -> None:
        super().__init__(message, exitcode=exitcode, pid=pid, worker_id=worker_id, job_id=job_id)
        self.rss = rss
        self.limit = limit

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (
            _rebuild_memory_limit,
            (str(self), self.rss, self.limit, self.exitcode, self.pid, self.worker_id, self.job_id),
        )


def _rebuild_memory_limit(
    message: str,
    rss: int | None,
    limit: int | None,
    exitcode: int | None,
    pid: int | None,
    worker_id: int | None,
    job_id: str | None,
) -> MemoryLimitExceeded:
    return MemoryLimitExceeded(
        message, rss=rss, limit=limit, exitcode=exitcode, pid=pid, worker_id=worker_id, job_id=job_id
    )


class JobTimeout(PoolkitError, TimeoutError):
    """The job ran past its timeout; its worker was stopped and replaced."""


class BrokenPool(BrokenProcessPool, PoolkitError):
    """The pool cannot run jobs any more (for example, the initializer failed).

    Like the standard library, a failing initializer breaks the pool instead
    of respawning workers that fail the same way forever. It is the standard
    library's ``BrokenProcessPool`` (so a ``BrokenExecutor``), so code written
    for ``concurrent.futures.ProcessPoolExecutor`` catches it.
    """


class UnpicklingFailed(BrokenProcessPool, pickle.UnpicklingError, PoolkitError):
    """A job's function or arguments would not unpickle in its worker, or its result in your process.

    The standard library's executor reports both as ``BrokenProcessPool``
    (and breaks); poolkit fails only this job, with an error that is a
    ``BrokenProcessPool`` and a ``pickle.UnpicklingError`` at once, so either
    ``except`` clause catches it. The unpickling error itself is ``__cause__``.
    The pool, and the worker, go on.
    """


class UnpicklableJobError(PoolkitError, pickle.PicklingError, TypeError):
    """Stands in for a job's exception that could not travel back to your process.

    An exception that will not pickle in the worker (it holds a lock, say), or
    whose pickle will not load again (its ``__init__`` takes arguments that
    its ``args`` do not hold: ``TwoArgs(42, "disk full")``), would otherwise
    turn into a pickling error that hides what the job raised. This error
    keeps it. It is also a ``pickle.PicklingError`` and a ``TypeError``, the
    types the standard library's executor raises in this case, so code
    written for it still catches it. Like any job's exception, it has the
    worker's traceback as ``__cause__``.

    Args:
        message: ``"<type>: <message> (the job's exception could not be pickled: ...)"``
            (or ``unpickled``).
        type_name: the original exception's type, with its module (``"mymod.TwoArgs"``).
        original_message: ``str()`` of the original exception.
        traceback: the worker's formatted traceback of the original exception.

    Attributes:
        type_name: as above.
        original_message: as above.
        traceback: as above.
    """

    def __init__(self, message: str, *, type_name: str, original_message: str, traceback: str) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.original_message = original_message
        self.traceback = traceback

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Keyword-only attributes do not survive the default exception pickling.
        return (
            _rebuild_unpicklable,
            (str(self), self.type_name, self.original_message, self.traceback),
        )


def _rebuild_unpicklable(
    message: str, type_name: str, original_message: str, traceback: str
) -> UnpicklableJobError:
    return UnpicklableJobError(
        message, type_name=type_name, original_message=original_message, traceback=traceback
    )


class RemoteTraceback(_RemoteTraceback):
    """Carries the worker's formatted traceback; attached as ``__cause__`` of a job's exception.

    A subclass of the standard library's own (``concurrent.futures.process._RemoteTraceback``),
    so code that looks for that class finds this one.

    Args:
        tb: the traceback as the worker formatted it; also ``str(error)``.
    """

    def __init__(self, tb: str) -> None:
        Exception.__init__(self, tb)  # the stdlib class takes the text too (its stub says otherwise)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
