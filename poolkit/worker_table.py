"""The worker table: each worker's life cycle, as the manager thread tracks it.

A worker's life is the diagram in ``docs/concepts.md``, one
``WorkerState`` per box and one ``WorkerTable`` method per arrow::

    spawn       -> STARTING    add()
    STARTING    -> READY       ready()      (a RETIRING worker that was not ready yet stays RETIRING)
    STARTING, READY -> RETIRING retire()    (job budget, memory, lifetime, idle, shutdown)
    any but KILLING -> KILLING  kill()      (timeout, memory limit, terminate(), start timeout, ...)
    READY, RETIRING -> EXITED   lost()      (its stream ended: it died, or left by itself)
    any         -> gone        remove()     (the template reported its exit status)

Why a worker leaves is one ``RetireReason``, counted once: a kill or a
crash that comes after a retirement replaces it in the count.

The table does no I/O beyond making a new worker's socket pair; it never
fails a job. A worker's jobs run in order, so the oldest unanswered one is the
one it runs (the *head*); ``WorkerTable.unstarted`` hands back the others,
which had not started, for the manager to put back in the queue.
"""

from __future__ import annotations

import enum
import itertools
import os
import random
import socket
from collections import deque
from collections.abc import Iterator
from typing import Any

from . import claims, shm, wire
from .config import PoolConfig
from .futures import JobFuture
from .share import _Entry

__all__ = ["Job", "RetireReason", "Worker", "WorkerState", "WorkerTable"]

_SOCKET_BUFFER = 4 << 20


class WorkerState(enum.Enum):
    """Where a worker is in its life (the boxes of the diagram in ``docs/concepts.md``)."""

    STARTING = "starting"  # forked or being forked; its initializer has not reported READY
    READY = "ready"  # takes jobs
    RETIRING = "retiring"  # takes no new job; leaves once it has answered the ones it holds
    KILLING = "killing"  # signalled by the pool; its exit status is awaited
    EXITED = "exited"  # its stream ended before the pool stopped it; its exit status is awaited


class RetireReason(enum.Enum):
    """Why a worker left: the keys of ``pool.stats().retired``."""

    TASKS = "tasks"  # max_tasks_per_child
    MEMORY = "memory"  # max_memory_per_child, checked after a job
    LIFETIME = "lifetime"  # max_lifetime_per_child
    IDLE = "idle"  # idle_timeout, down to min_workers
    TIMEOUT = "timeout"  # a job ran past its timeout
    MEMORY_LIMIT = "memory_limit"  # memory_limit_per_child, while a job ran
    TERMINATED = "terminated"  # future.terminate(), or signal_workers()
    CRASH = "crash"  # it died on its own
    START_TIMEOUT = "start_timeout"  # still starting after start_timeout
    SHUTDOWN = "shutdown"  # the pool shut down, or broke


class Job:
    """One submitted call, as the manager tracks it."""

    __slots__ = (
        "attempt",
        "dispatched",
        "future",
        "meta",
        "payload",
        "region",
        "retries_left",
        "seq",
        "shares",
        "started_at",
        "timeout",
        "token",
    )

    def __init__(
        self,
        seq: int,
        future: JobFuture[Any],
        payload: bytes,
        meta: bytes,
        timeout: float | None,
        retries: int = 0,
        region: shm.Region | None = None,
        shares: tuple[_Entry, ...] = (),
    ) -> None:
        self.seq = seq
        self.region = region  # the payload's large pieces (shm.py), kept until the job ends
        self.shares = shares  # the Pool.share objects it names: each worker gets them before it
        self.future = future
        self.payload = payload
        self.meta = meta
        self.timeout = timeout
        self.attempt = 1
        self.retries_left = retries
        self.dispatched = False
        self.started_at = 0.0
        # Sent ahead to its worker (claims.py): the token the pool may still take
        # back. None: sent as the worker's next job, or its token is the worker's.
        self.token: int | None = None

    def frame(self, ahead: bool = False) -> tuple[bytes, ...]:
        return wire.encode_job(self.seq, self.attempt, self.timeout, self.meta, self.payload, ahead)


class Worker:
    """One worker process, as the manager tracks it."""

    __slots__ = (
        "attached",
        "born",
        "claims_r",
        "claims_w",
        "cpu",
        "eof",
        "exit_deadline",
        "fds",
        "idle_since",
        "inflight",
        "jobs_assigned",
        "jobs_done",
        "lifetime",
        "max_jobs",
        "outbox",
        "pid",
        "reader",
        "ready_at",
        "reason",
        "rss",
        "self_retired",
        "shares_sent",
        "sock",
        "state",
        "tokens",
        "tokens_sent",
        "tokens_written",
        "wants_write",
        "worker_id",
    )

    def __init__(self, worker_id: int, sock: socket.socket, now: float) -> None:
        self.worker_id = worker_id
        self.sock = sock
        self.reader = wire.FrameReader()
        self.pid: int | None = None
        self.state = WorkerState.STARTING
        self.ready_at: float | None = None  # when it reported READY; None while it starts
        self.reason: RetireReason | None = None  # why it leaves, once it does
        self.outbox: deque[bytes | memoryview] = deque()
        # Frames in the outbox that carry a region: (their first part, the region).
        self.attached: deque[tuple[bytes, shm.Region]] = deque()
        self.fds = shm.FdQueue()  # regions received with results, not claimed yet
        self.shares_sent: set[bytes] = set()  # keys of the Pool.share objects this worker holds
        self.wants_write = False
        self.eof = False  # its stream ended (nothing more will be read)
        # Its claims pipe (claims.py), both ends, from its READY; -1 without one.
        self.claims_r = -1
        self.claims_w = -1
        self.tokens = bytearray()  # tokens to write to the pipe before the frames in the outbox go
        self.tokens_sent = 0  # the token of the next job sent ahead
        self.tokens_written = 0  # every token below this was written (it is in the pipe, or was read)
        self.inflight: deque[Job] = deque()
        self.jobs_assigned = 0
        self.jobs_done = 0
        self.max_jobs: int | None = None
        self.lifetime: float | None = None
        self.born = now
        self.idle_since = now
        # Retiring or killed: SIGKILL when this passes (exit_timeout, kill_grace).
        # Set once it has been told to leave, or has said it leaves.
        self.exit_deadline: float | None = None
        self.self_retired = False  # it said RETIRING: it exits after its last answer by itself
        self.rss = 0
        self.cpu = 0.0

    @property
    def live(self) -> bool:
        """It serves, or will: starting or ready, neither retiring nor leaving."""
        state = self.state
        return state is WorkerState.READY or state is WorkerState.STARTING

    @property
    def leaving(self) -> bool:
        """Killed or exited: it answers nothing more, whatever it held."""
        state = self.state
        return state is WorkerState.KILLING or state is WorkerState.EXITED

    def send_job(self, job: Job, ahead: bool = False) -> None:
        """Queue ``job``'s frame for sending; its region, if any, goes with the frame's first byte.

        The shared objects it names that this worker does not hold yet go first.
        ``ahead``: it waits behind the job the worker runs; with a claims pipe it
        goes with a token, so that the pool can take it back (claims.py).
        """
        for entry in job.shares:
            if entry.key not in self.shares_sent:
                self.shares_sent.add(entry.key)
                share_parts = wire.encode_share(entry.key, entry.payload)
                if entry.region is not None:
                    self.attached.append((share_parts[0], entry.region))
                self.outbox.extend(share_parts)
        if ahead and self.claims_w >= 0:
            index = job.token = self.tokens_sent
            self.tokens_sent = index + 1
            if index >= self.tokens_written:
                self.tokens += claims.tokens(index, claims.REFILL)
                self.tokens_written = index + claims.REFILL
        else:
            job.token = None
            ahead = False
        parts = job.frame(ahead)
        if job.region is not None:
            self.attached.append((parts[0], job.region))
        self.outbox.extend(parts)

    def drop_outbox(self) -> None:
        """Forget what was not sent: the worker is gone."""
        self.outbox.clear()
        self.attached.clear()
        self.tokens.clear()

    def owned_fds(self) -> list[int]:
        """The descriptors the pool holds for this worker (its socket, its claims pipe)."""
        return [fd for fd in (self.sock.fileno(), self.claims_r, self.claims_w) if fd >= 0]

    def close(self) -> None:
        """Close the pool's ends: its socket and its claims pipe."""
        self.sock.close()
        for fd in (self.claims_r, self.claims_w):
            if fd >= 0:
                os.close(fd)
        self.claims_r = self.claims_w = -1

    def start_head(self, now: float) -> None:
        """The oldest job it holds starts now (it runs its jobs in order): the one place that says so."""
        job = self.inflight[0]
        job.started_at = now
        future = job.future
        future.worker_id = self.worker_id
        future.pid = self.pid


class WorkerTable:
    """Every worker of one pool by id, and the count of why they left. Owned by the manager thread."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.workers: dict[int, Worker] = {}
        self.retired: dict[str, int] = {}
        self._ids = itertools.count(1)

    def __iter__(self) -> Iterator[Worker]:
        return iter(self.workers.values())

    def __len__(self) -> int:
        return len(self.workers)

    def get(self, worker_id: int) -> Worker | None:
        return self.workers.get(worker_id)

    # ------------------------------------------------------------ spawn

    def new_workers(self, count: int, now: float) -> list[tuple[Worker, socket.socket]]:
        """Workers not in the table yet, each with the socket end its process will get.

        Each gets its own job budget and lifetime, spread by ``recycle_jitter``
        so that workers started together do not all retire together.
        """
        config = self.config
        made = []
        for _ in range(count):
            parent_end, child_end = socket.socketpair()
            _widen(parent_end)
            _widen(child_end)
            parent_end.setblocking(False)
            worker = Worker(next(self._ids), parent_end, now)
            if config.max_tasks_per_child is not None:
                n = config.max_tasks_per_child
                worker.max_jobs = max(1, n - random.randint(0, int(n * config.recycle_jitter)))
            if config.max_lifetime_per_child is not None:
                worker.lifetime = config.max_lifetime_per_child * (
                    1.0 - random.uniform(0.0, config.recycle_jitter)
                )
            made.append((worker, child_end))
        return made

    def add(self, worker: Worker) -> None:
        """spawn -> STARTING: its process is asked for."""
        self.workers[worker.worker_id] = worker

    # ------------------------------------------------------------ transitions

    def ready(self, worker: Worker, pid: int, now: float) -> bool:
        """STARTING -> READY: its initializer returned. False if it was not starting."""
        worker.pid = pid
        if worker.ready_at is not None or worker.leaving:
            return False
        worker.ready_at = now
        worker.idle_since = now
        if worker.state is WorkerState.STARTING:
            worker.state = WorkerState.READY
        if worker.inflight:  # a job sent ahead of READY starts now
            worker.start_head(now)
        return True

    def retire(self, worker: Worker, reason: RetireReason) -> bool:
        """STARTING or READY -> RETIRING: no new jobs. False if it was already leaving."""
        if not worker.live:
            return False
        worker.state = WorkerState.RETIRING
        self._count(worker, reason)
        return True

    def kill(self, worker: Worker, reason: RetireReason) -> list[Job]:
        """-> KILLING: the pool stops it. Returns the jobs it had not started, for the queue.

        A worker killed already stays as it is. One whose stream ended first
        (EXITED) is counted for ``reason`` now: the template stopped it for a
        limit, and said so after the end; what it had not started went back
        when its stream ended.
        """
        state = worker.state
        if state is WorkerState.KILLING:
            return []
        self._count(worker, reason)
        worker.state = WorkerState.KILLING
        if state is WorkerState.EXITED:
            return []
        return self.unstarted(worker)

    def lost(self, worker: Worker) -> list[Job]:
        """READY or RETIRING -> EXITED: its stream ended. The jobs it had not started come back.

        End of stream means the process is dying (or closed its socket, which
        makes it useless); its running job fails when the exit status comes.
        """
        worker.state = WorkerState.EXITED
        return self.unstarted(worker)

    def remove(self, worker: Worker) -> bool:
        """-> gone: its exit status arrived. False if it was gone already."""
        if self.workers.pop(worker.worker_id, None) is None:
            return False
        if not worker.leaving:
            worker.state = WorkerState.EXITED
        return True

    def crashed(self, worker: Worker) -> None:
        """It died on its own (not stopped by the pool): counted as a crash, replacing a retirement."""
        if worker.state is not WorkerState.KILLING:
            self._count(worker, RetireReason.CRASH)

    # ------------------------------------------------------------ jobs

    def unstarted(self, worker: Worker) -> list[Job]:
        """Take back every job the worker holds but the one it runs (the head), in order."""
        inflight = worker.inflight
        if len(inflight) <= 1:
            return []
        head = inflight.popleft()
        jobs = list(inflight)
        inflight.clear()
        inflight.append(head)
        return jobs

    @staticmethod
    def take_all(worker: Worker) -> list[Job]:
        """Take back every job the worker holds, in order (none of them has started)."""
        jobs = list(worker.inflight)
        worker.inflight.clear()
        return jobs

    # ------------------------------------------------------------ counts

    def _count(self, worker: Worker, reason: RetireReason) -> None:
        """Count why a worker leaves, once: a later reason (a kill, a crash) replaces an earlier one."""
        previous = worker.reason
        if previous is reason:
            return
        retired = self.retired
        if previous is not None and retired.get(previous.value, 0) > 0:
            retired[previous.value] -= 1
            if not retired[previous.value]:
                del retired[previous.value]
        retired[reason.value] = retired.get(reason.value, 0) + 1
        worker.reason = reason


def _widen(sock: socket.socket) -> None:
    """Ask for 4 MiB socket buffers (the kernel caps it at net.core.wmem_max/rmem_max).

    Large payloads then cross in a few system calls instead of dozens of
    212 KiB round trips, each a wake-up of the other side.
    """
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        except OSError:
            pass
