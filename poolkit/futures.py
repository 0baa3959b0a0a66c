"""``JobFuture``: a ``concurrent.futures.Future`` that knows about its job.

The manager thread is the only writer of the extra fields (``worker_id``,
``pid``, ``progress``, ``stats``); readers in other threads see plain
attribute values, each replaced whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED
from typing import Any, Generic, TypeVar

from .stats import JobStats

__all__ = ["JobFuture", "cancel_all"]

T = TypeVar("T")

_NO_PROGRESS: Any = None


class JobFuture(Future[T], Generic[T]):
    """The future of one poolkit job.

    Attributes:
        job_id: unique within the pool (the caller's own id when given).
        job_type: the caller's label, or None.
        worker_id, pid: the worker running the job, once it runs.
        progress: the latest value the job sent with ``report_progress``, or None.
        subject: what error messages call this job: ``"job 4"``, or what
            ``map`` and ``batch`` call it (``"input 3"``), the caller's own terms.
        attempt: how many times the job was started, once its worker died or
            it timed out (retries included); for a job that answered, see ``stats``.
        stats: [`JobStats`][poolkit.JobStats] once the job has run (None before, and
            for a job that never ran or whose worker died).
    """

    # Class-level defaults: one future per job is created on the hot path, and
    # most of these are never set (instance attributes shadow them when they are).
    worker_id: int | None = None
    pid: int | None = None
    progress: Any = _NO_PROGRESS
    attempt: int | None = None
    _subject: str | None = None
    _raw_stats: tuple[Any, ...] | None = None
    _progress_callbacks: list[Callable[[JobFuture[Any], Any], None]] | None = None
    _terminate: Callable[[JobFuture[Any]], None] | None = None
    # Told when cancel() succeeds, so a pool waiting to shut down sees the queue shrink.
    _on_cancel: Callable[[], None] | None = None
    # Set where a cancel must ask someone first (DaskPool: its nodes); it takes
    # many futures at once so that cancel_all() asks once, not once per future.
    _cancel_many: Callable[[list[Any]], None] | None = None

    def __init__(self, job_id: str, job_type: str | None) -> None:
        super().__init__()
        self.job_id = job_id
        self.job_type = job_type

    @property
    def subject(self) -> str:
        """How error messages and logs name this job (``"job 7"``, ``"input 3"``)."""
        return self._subject or f"job {self.job_id}"

    def __repr__(self) -> str:
        return f"<JobFuture job_id={self.job_id!r} {self._state.lower()}>"

    @property
    def stats(self) -> JobStats | None:
        """What the job cost, measured in its worker; None until its worker answered (a job whose worker died, or that never ran, has none)."""
        raw = self._raw_stats
        return None if raw is None else JobStats(*raw)

    def cancel(self) -> bool:
        """Cancel the job if it has not started; True if it is (now) cancelled.

        Unlike the standard library's futures, a cancelled job counts as done
        for ``concurrent.futures.wait()`` and ``as_completed()`` at once, not
        when the pool next looks at its queue.
        """
        if not super().cancel():
            return False
        with self._condition:
            if self._state == CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
        on_cancel = self._on_cancel
        if on_cancel is not None:
            on_cancel()
        return True

    def set_running_or_notify_cancel(self) -> bool:
        # cancel() may have notified the waiters already; the base class would
        # call that state unexpected. The condition's lock is re-entrant.
        with self._condition:
            if self._state == CANCELLED_AND_NOTIFIED:
                return False
            return super().set_running_or_notify_cancel()

    def add_progress_callback(self, fn: Callable[[JobFuture[T], Any], None]) -> None:
        """Call ``fn(future, value)`` for each progress value the job reports.

        Callbacks run in the pool's manager thread, in the order the values
        were sent; keep them short. An exception in one is logged and ignored.

        Args:
            fn: called as ``fn(future, value)`` with this future and the value
                the job passed to [`report_progress`][poolkit.report_progress].
        """
        with self._condition:
            if self._progress_callbacks is None:
                self._progress_callbacks = []
            self._progress_callbacks.append(fn)

    def terminate(self) -> bool:
        """Stop this job: cancel it if it has not started, else kill its worker.

        The future ends cancelled and the pool replaces the worker. Returns
        False if the job had already finished.
        """
        with self._condition:
            if self._state == FINISHED:
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
        if self.cancel():
            return True
        # Running: end the future now, so that the caller sees it cancelled
        # when this returns; the manager then kills the worker that runs it.
        if not self._force_cancel():
            return False
        terminate = self._terminate
        if terminate is not None:
            terminate(self)
        return True

    # -- called by the manager thread only ------------------------------------

    def _set_progress(self, value: Any) -> None:
        self.progress = value
        for callback in list(self._progress_callbacks or ()):
            try:
                callback(self, value)
            except BaseException:  # it runs in the manager thread: never let it take that down
                import logging

                logging.getLogger("poolkit").exception("progress callback %r failed", callback)

    def _force_cancel(self) -> bool:
        """Cancel even a running future (its worker has been killed)."""
        with self._condition:
            if self._state == FINISHED:
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            # Straight to CANCELLED_AND_NOTIFIED: wait() and as_completed()
            # only count a cancelled future once its waiters were told.
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        return True


def cancel_all(futures: Iterable[Future[Any]]) -> None:
    """Cancel every future of ``futures`` whose job has not started.

    Same as calling ``cancel()`` on each, except that a job already sent
    ahead to a worker (pipelined: its future counts as running, but no
    worker has started it, so ``cancel()`` refuses) is cancelled too, and
    the worker told to skip it; and that futures whose cancel must ask their
    pool's nodes first ([`DaskPool`][poolkit.dask.DaskPool]) are asked about
    together, in one round trip per pool.
    """
    asks: dict[Callable[[list[Any]], None], list[Future[Any]]] = {}
    for future in futures:
        cancel_many = getattr(future, "_cancel_many", None)
        if cancel_many is None or future.done():
            if not future.cancel() and isinstance(future, JobFuture) and future.worker_id is None:
                future.terminate()  # sent ahead, not started: the worker skips it
        else:
            asks.setdefault(cancel_many, []).append(future)
    for cancel_many, group in asks.items():
        cancel_many(group)
