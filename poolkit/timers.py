"""When each of a worker's timers is due: one description for sleeping and for firing.

The manager asks two questions of the same timers on every pass of its loop:
how long may ``select`` sleep, and what is due now. Both answers come from
``Timers.deadlines``, so they cannot disagree. When they could (each
question once had its own copy of the rules, and the idle rule differed),
the loop found a timer due for ``select``, fired nothing, and asked again at
once: a busy loop for as long as the condition held.

Job deadlines and the memory limit are not here: the template enforces those
(``limits.py``). This module does no I/O and changes nothing; the manager
acts on what it reports.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from .worker_table import Worker, WorkerState

if TYPE_CHECKING:
    from .config import PoolConfig

__all__ = ["SKIP_GRACE", "Due", "Timers"]

# Seconds a worker has to answer SKIPPED for a job terminated while queued
# before the manager concludes it started the job anyway.
SKIP_GRACE = 0.05


class Due(enum.Enum):
    """What a timer that is due asks the manager to do to its worker."""

    EXIT = "exit"  # past its exit deadline (retiring, or killed): SIGKILL, again after kill_grace
    START = "start"  # still starting after start_timeout: kill it
    SKIP = "skip"  # its head was terminated while queued, yet no SKIPPED came: kill it
    RECLAIM = "reclaim"  # its head runs far past the mean: take back the jobs queued behind it
    LIFETIME = "lifetime"  # older than its lifetime: retire it
    IDLE = "idle"  # idle past idle_timeout while more than min_workers serve: retire it


class Timers:
    """The timer rules of one pool, read from its config."""

    __slots__ = ("capacity", "idle_timeout", "long_after", "min_workers", "skip_grace", "start_timeout")

    def __init__(
        self,
        *,
        start_timeout: float | None,
        idle_timeout: float | None,
        min_workers: int,
        skip_grace: float = SKIP_GRACE,
        long_after: Callable[[], float] | None = None,
        capacity: int = 1,
    ) -> None:
        self.start_timeout = start_timeout
        self.idle_timeout = idle_timeout
        self.min_workers = min_workers
        self.skip_grace = skip_grace
        # After how long a running job counts as far past the mean (the
        # dispatcher's measure, Dispatcher.long_after); None: never take back.
        self.long_after = long_after
        self.capacity = capacity  # max_workers: the jobs that may run at once

    @classmethod
    def of(cls, config: PoolConfig, long_after: Callable[[], float] | None = None) -> Timers:
        return cls(
            start_timeout=config.start_timeout,
            idle_timeout=config.idle_timeout,
            min_workers=config.min_workers,
            long_after=long_after,
            capacity=config.max_workers,
        )

    def deadlines(self, worker: Worker, live_workers: int, spare: bool = False) -> list[tuple[float, Due]]:
        """Every timer of ``worker`` with the time it is due, in the order they fire.

        ``live_workers`` is how many workers serve (neither retiring nor
        dying): an idle worker may leave only while more than ``min_workers`` do.
        ``spare``: a ready worker holds nothing and may start a job now, so
        jobs taken back from another would run at once.
        """
        due: list[tuple[float, Due]] = []
        if worker.exit_deadline is not None:
            due.append((worker.exit_deadline, Due.EXIT))
        if worker.leaving:
            return due
        if worker.ready_at is None:  # starting (or retiring before it was ever ready)
            if self.start_timeout is not None:
                due.append((worker.born + self.start_timeout, Due.START))
            return due
        inflight = worker.inflight
        if inflight and inflight[0].future.cancelled():
            due.append((inflight[0].started_at + self.skip_grace, Due.SKIP))
        # Jobs sent ahead whose tokens may still be taken back (claims.py): the
        # last one's token says, as the worker claims them in order and a
        # take-back leaves none behind. Only for a worker that may run jobs
        # past these (one given its last jobs keeps them: it runs exactly
        # max_tasks_per_child), and only while another worker waits for work.
        if (
            spare
            and len(inflight) > 1
            and inflight[-1].token is not None
            and self.long_after is not None
            and (worker.max_jobs is None or worker.jobs_assigned < worker.max_jobs)
        ):
            due.append((inflight[0].started_at + self.long_after(), Due.RECLAIM))
        if worker.state is not WorkerState.READY:  # retiring: it leaves anyway
            return due
        if worker.lifetime is not None:
            due.append((worker.born + worker.lifetime, Due.LIFETIME))
        if (
            self.idle_timeout is not None
            and not inflight
            and live_workers > self.min_workers
        ):
            due.append((worker.idle_since + self.idle_timeout, Due.IDLE))
        return due

    def next_timeout(
        self, workers: Iterable[Worker], now: float, also: float | None = None
    ) -> float | None:
        """How long ``select`` may sleep: until the soonest deadline (or ``also``); None for ever."""
        workers = list(workers)
        live = self._count_live(workers)
        spare = self._spare(workers)
        soonest = also
        for worker in workers:
            for when, _ in self.deadlines(worker, live, spare):
                if soonest is None or when < soonest:
                    soonest = when
        if soonest is None:
            return None
        return max(0.0, soonest - now)

    def fire(
        self, workers: Iterable[Worker], now: float, act: Callable[[Worker, Due, float], None]
    ) -> int:
        """Call ``act(worker, due, now)`` for each timer due at ``now``; return how many fired.

        A worker's timers are looked at again after each one fires, since
        firing changes the worker (a killed worker has no idle timer), and
        each fires at most once per call. The count of serving workers is
        taken again after each firing too: retiring one idle worker may leave
        the next one the last above ``min_workers``.
        """
        workers = list(workers)
        live = self._count_live(workers)
        spare = self._spare(workers)
        fired = 0
        for worker in workers:
            done: set[Due] = set()
            while True:
                for when, due in self.deadlines(worker, live, spare):
                    if now >= when and due not in done:
                        break
                else:
                    break
                done.add(due)
                act(worker, due, now)
                fired += 1
                live = self._count_live(workers)
                spare = self._spare(workers)
        return fired

    def _spare(self, workers: list[Worker]) -> bool:
        """A ready worker holds nothing, and fewer than ``capacity`` jobs run: one more could start now."""
        if self.long_after is None:
            return False  # only the take-back rule asks
        busy = 0
        idle = False
        for worker in workers:
            if worker.inflight:
                busy += not worker.leaving
            elif worker.state is WorkerState.READY:
                idle = True
        return idle and busy < self.capacity

    def _count_live(self, workers: list[Worker]) -> int:
        if self.idle_timeout is None:
            return 0  # only the idle rule asks; spare the loop a pass over the workers
        return sum(1 for worker in workers if worker.live)
