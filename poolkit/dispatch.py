"""The dispatcher: which queued job goes to which worker, and how many each may hold.

It owns the queue of pending jobs and the measured job duration, and decides
without any I/O: a job assigned to a worker is appended to that worker's
``inflight`` and its frame to the worker's ``outbox``; the manager sends the
outboxes and retires the workers whose job budget is spent.

Jobs are pipelined: a worker may hold a few jobs beyond the one it runs. The
window adapts to the measured job duration: deep for tiny jobs, where a round
trip per job would cost more than the job, one for long ones. Idle workers
are served first, ``max_workers`` bounds the jobs running at once, and
nothing is queued behind a job that has run far past the mean; what was
queued behind it before, the manager takes back (claims.py) and puts first
in the queue again (``put_back``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

from .config import PoolConfig
from .worker_table import Job, Worker, WorkerState

__all__ = ["Assignment", "Dispatcher"]

_MAX_WINDOW = 64
_TINY_JOB = 0.002  # seconds: jobs shorter than this are worth pipelining
_LONG_MIN = 0.001  # seconds: a job running longer than this and 5x the mean gets nothing queued behind it


class Assignment(NamedTuple):
    """What one :meth:`Dispatcher.assign` did."""

    touched: list[Worker]  # workers given jobs: their outboxes hold the frames to send
    spent: list[Worker]  # given their last job (max_tasks_per_child): retire them now
    cancelled: int  # queued jobs dropped because their futures were cancelled


class Dispatcher:
    """The queue of pending jobs of one pool, and the rule that hands them to workers."""

    __slots__ = ("capacity", "ewma", "pending", "sends_ahead")

    def __init__(self, config: PoolConfig) -> None:
        self.pending: deque[Job] = deque()
        self.ewma: float | None = None  # the mean job duration (wall time, exponentially weighted)
        self.capacity = config.max_workers
        # Without an initializer a worker is ready within milliseconds, so a
        # starting one may take one job ahead of its READY: that saves a round
        # trip per new worker, most of the cost of recycling. (An initializer
        # may take long, or hang: then jobs wait for READY, and their timeouts
        # never include it.)
        self.sends_ahead = config.initializer is None

    def measured(self, wall: float) -> None:
        """A job took ``wall`` seconds in its worker."""
        ewma = self.ewma
        self.ewma = wall if ewma is None else ewma * 0.9 + wall * 0.1

    def window(self) -> int:
        """How many jobs a ready worker may hold: the one it runs and those sent ahead."""
        ewma = self.ewma
        if ewma is None:
            return 1  # nothing measured yet: pipeline nothing
        if ewma >= _TINY_JOB:
            return 1
        return min(_MAX_WINDOW, 1 + int(_TINY_JOB / max(ewma, 1e-6)))

    def long_after(self) -> float:
        """After how long a running job counts as far past the mean: nothing is queued behind it.

        A worker runs one job at a time, so a job sent ahead waits for the one
        in front; when that one is an outlier among tiny jobs, the job would
        wait while another worker idles.
        """
        return max(_LONG_MIN, 5 * (self.ewma or 0.0))

    def assign(self, workers: Iterable[Worker], now: float) -> Assignment:
        """Hand queued jobs, in order, to the workers that have room."""
        pending = self.pending
        workers = list(workers)
        # Idle workers first: pipelining onto a busy one is only for what is left.
        ready = sorted((w for w in workers if w.state is WorkerState.READY), key=lambda w: len(w.inflight))
        if self.sends_ahead:
            ready.extend(w for w in workers if w.state is WorkerState.STARTING and not w.inflight)
        touched: dict[int, Worker] = {}
        spent: list[Worker] = []
        cancelled = 0
        if not ready or not pending:
            return Assignment([], spent, cancelled)
        window = self.window()
        # max_workers bounds the jobs running at once, whatever the recycling:
        # a worker that is idle may start one only while fewer are busy.
        busy = sum(1 for w in workers if w.inflight and not w.leaving)
        long_since = now - self.long_after()
        capacity = self.capacity
        while pending:
            progressed = False
            for worker in ready:
                if not pending:
                    break
                if not worker.inflight:
                    if busy >= capacity:
                        continue
                elif worker.inflight[0].started_at < long_since:
                    continue  # its job runs far past the mean: queue nothing behind it
                room = (window if worker.state is WorkerState.READY else 1) - len(worker.inflight)
                if worker.max_jobs is not None:
                    room = min(room, worker.max_jobs - worker.jobs_assigned)
                if room <= 0:
                    continue
                job = pending.popleft()
                future = job.future
                if not job.dispatched:
                    if not future.set_running_or_notify_cancel():
                        cancelled += 1
                        progressed = True
                        continue
                    job.dispatched = True
                elif future.done():
                    progressed = True
                    continue
                starts = not worker.inflight
                worker.inflight.append(job)
                if starts:
                    busy += 1  # counted only now: a cancelled job dropped above takes no slot
                    worker.start_head(now)
                worker.jobs_assigned += 1
                worker.send_job(job, ahead=not starts)
                touched[worker.worker_id] = worker
                if worker.max_jobs is not None and worker.jobs_assigned == worker.max_jobs:
                    # Its last job: retire it now so the replacement forks while the job runs.
                    spent.append(worker)
                progressed = True
            if not progressed:
                break
        return Assignment(list(touched.values()), spent, cancelled)

    def retry(self, job: Job) -> bool:
        """Queue ``job`` again, first, for another attempt if it has retries left; False if not.

        For a job whose worker crashed or that ran past its timeout; the caller
        fails the job when this says no.
        """
        if job.retries_left <= 0:
            return False
        job.retries_left -= 1
        job.attempt += 1
        self.pending.appendleft(job)
        return True

    def put_back(self, jobs: list[Job]) -> None:
        """Queue jobs a worker had not started again, first, in their order."""
        pending = self.pending
        for job in reversed(jobs):
            job.future.worker_id = None
            job.future.pid = None
            pending.appendleft(job)
