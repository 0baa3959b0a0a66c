"""The caller's futures of a ``DaskPool`` and how the caller tracks each job."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, TypeVar

from ..errors import WorkerCrashed
from ..futures import JobFuture
from ..stats import JobStats

__all__ = ["DaskJobFuture", "DaskJobLost", "TrackedJob", "mark_running"]

T = TypeVar("T")


class DaskJobLost(WorkerCrashed):
    """Dask gave up on the job: its Dask worker died more often than ``allowed-failures``,
    or Dask cancelled it (scheduler gone, client closed, cluster restarted).

    A [`WorkerCrashed`][poolkit.WorkerCrashed] (so a ``BrokenProcessPool``): the job did
    not fail by itself, the machinery under it went away. The Dask error is the
    ``__cause__``.
    """


class DaskJobFuture(JobFuture[T]):
    """The future of a job run through [`DaskPool`][poolkit.dask.DaskPool]: a [`JobFuture`][poolkit.JobFuture]
    that also says on which Dask worker (``node``, its address) the job ran.

    ``worker_id`` and ``pid`` are those of the poolkit child on that node;
    worker ids are per node, so ``(node, worker_id)`` names a child in the cluster.
    """

    def __init__(self, job_id: str, job_type: str | None, seq: int = 0) -> None:
        super().__init__(job_id, job_type)
        self.node: str | None = None
        self._node_stats: JobStats | None = None
        self._seq = seq

    def cancel(self) -> bool:
        """Cancel the job unless it has started: True means it never runs.

        Until its "started" message arrives, a job may already run on a node, or
        be about to: so a pending job's cancel asks every node first (one round
        trip), and says yes only when none has started it and all have promised
        never to. ``poolkit.futures.cancel_all`` asks about many jobs at once.
        """
        cancel_many = self._cancel_many
        if cancel_many is not None and not self.done() and not self.running():
            cancel_many([self])
            return self.cancelled()
        return super().cancel()

    @property
    def stats(self) -> JobStats | None:
        return self._node_stats

    def __repr__(self) -> str:
        return f"<DaskJobFuture job_id={self.job_id!r} {self._state.lower()}>"


class TrackedJob:
    """One job as the caller's side tracks it (owned by the delivery thread once submitted)."""

    __slots__ = ("dask_future", "future", "progress_seen", "seq", "terminate_requested")

    def __init__(self, seq: int, future: DaskJobFuture[Any]) -> None:
        self.seq = seq
        self.future = future
        self.dask_future: Any = None
        self.progress_seen = 0
        self.terminate_requested = False


def mark_running(future: Future[Any]) -> bool:
    """Move a future to RUNNING unless it is already; False if the caller cancelled it.

    Only the delivery thread calls it, so the checks and the move do not race
    with one another; a concurrent ``cancel()`` is settled by the future's lock.
    """
    if future.running():
        return True
    return future.set_running_or_notify_cancel()
