"""Figures poolkit keeps about jobs, workers and the pool.

Plain frozen dataclasses: a snapshot never changes under the reader, and the
manager, which owns the live numbers, is the only one that builds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RECYCLING_REASONS", "JobStats", "PoolStats", "WorkerInfo"]

RECYCLING_REASONS = ("tasks", "memory", "lifetime")
"""The keys of ``PoolStats.retired`` that count as recycling: a policy replaced a
healthy worker. Idle exits, crashes, kills (timeout, memory limit, terminate)
and shutdown are not recycling."""

@dataclass(frozen=True)
class JobStats:
    """What one job cost, measured inside its worker.

    Attributes:
        wall_time: seconds from the job's start to its end, in the worker.
        cpu_time: CPU seconds the worker process used during the job.
        peak_rss: the worker's peak resident memory during the job, in bytes.
        rss_after: the worker's own resident memory right after the job, in
            bytes: what the memory limits count (``RssAnon``, so shared-memory
            pages it only maps are left out).
        worker_id: poolkit's id for the worker that ran it.
        pid: that worker's process id.
        attempt: 1 for the first run, more when retried.
        worker_retired: why the worker was retired after this job, if it was.
    """

    wall_time: float
    cpu_time: float
    peak_rss: int
    rss_after: int
    worker_id: int
    pid: int
    attempt: int
    worker_retired: str | None = None


@dataclass(frozen=True)
class WorkerInfo:
    """One worker, as the pool sees it at the time of the snapshot.

    Attributes:
        worker_id: poolkit's id for the worker (1, 2, ...; a replacement gets a new one).
        pid: its process id; None until it is forked.
        state: one of ``"starting"``, ``"ready"``, ``"retiring"``,
            ``"killing"`` and ``"exited"`` (its stream ended; its exit status
            is awaited): the life cycle in the docs' concepts page.
        jobs_done: jobs it has answered.
        rss: its resident memory in bytes, read at the snapshot.
        cpu_time: CPU seconds its jobs have used.
        age: seconds since it was started.
        current_job: the id of the job it runs, or None.
    """

    worker_id: int
    pid: int | None
    state: str
    jobs_done: int
    rss: int
    cpu_time: float
    age: float
    current_job: str | None


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of the pool: its workers and its counters since it started.

    Attributes:
        workers: each worker the pool has, as [`WorkerInfo`][poolkit.WorkerInfo].
        submitted: jobs submitted.
        done: jobs that returned a value.
        failed: jobs that raised, or whose call or result could not be pickled.
        crashed: jobs whose worker died under them (memory limit included).
        timed_out: jobs stopped by their timeout.
        cancelled: jobs cancelled or terminated.
        spawned: workers started.
        pending: jobs waiting for a worker, at the snapshot.
        running: jobs running, at the snapshot.
        retired: the workers that left, by reason (``"tasks"``, ``"memory"``,
            ``"lifetime"``, ``"idle"``, ``"timeout"``, ``"memory_limit"``,
            ``"terminated"``, ``"crash"``, ``"start_timeout"``,
            ``"shutdown"``), each worker once, under its last reason.
    """

    workers: tuple[WorkerInfo, ...]
    submitted: int
    done: int
    failed: int
    crashed: int
    timed_out: int
    cancelled: int
    spawned: int
    pending: int
    running: int
    retired: dict[str, int] = field(default_factory=dict)

    @property
    def recycled(self) -> int:
        """Workers recycled by a policy (``max_tasks_per_child``, ``max_memory_per_child``,
        ``max_lifetime_per_child``); a worker that crashed or was killed is in ``retired``, not here."""
        return sum(self.retired.get(reason, 0) for reason in RECYCLING_REASONS)
