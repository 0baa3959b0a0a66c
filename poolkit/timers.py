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
    LIFETIME = "lifetime"  # older than its lifetime: retire it
    IDLE = "idle"  # idle past idle_timeout while more than min_workers serve: retire it


class Timers:
    """The timer rules of one pool, read from its config."""

    __slots__ = ("idle_timeout", "min_workers", "skip_grace", "start_timeout")

    def __init__(
        self,
        *,
        start_timeout: float | None,
        idle_timeout: float | None,
        min_workers: int,
        skip_grace: float = SKIP_GRACE,
    ) -> None:
        self.start_timeout = start_timeout
        self.idle_timeout = idle_timeout
        self.min_workers = min_workers
        self.skip_grace = skip_grace

    @classmethod
    def of(cls, config: PoolConfig) -> Timers:
        return cls(
            start_timeout=config.start_timeout,
            idle_timeout=config.idle_timeout,
            min_workers=config.min_workers,
        )

    def deadlines(self, worker: Worker, live_workers: int) -> list[tuple[float, Due]]:
        """Every timer of ``worker`` with the time it is due, in the order they fire.

        ``live_workers`` is how many workers serve (neither retiring nor
        dying): an idle worker may leave only while more than ``min_workers`` do.
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
        soonest = also
        for worker in workers:
            for when, _ in self.deadlines(worker, live):
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
        fired = 0
        for worker in workers:
            done: set[Due] = set()
            while True:
                for when, due in self.deadlines(worker, live):
                    if now >= when and due not in done:
                        break
                else:
                    break
                done.add(due)
                act(worker, due, now)
                fired += 1
                live = self._count_live(workers)
        return fired

    def _count_live(self, workers: list[Worker]) -> int:
        if self.idle_timeout is None:
            return 0  # only the idle rule asks; spare the loop a pass over the workers
        return sum(1 for worker in workers if worker.live)
