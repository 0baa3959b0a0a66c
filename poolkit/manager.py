"""The manager: the one thread that owns a pool's state.

Everything that changes a pool's state happens here, in one loop shaped like
gunicorn's arbiter::

    wait on the selector (worker sockets, the template's control socket and a
    wake-up pipe), with a timeout set by the next timer
    -> read what arrived (results, progress, spawned/exited notices)
    -> take what other threads asked for (jobs, terminate, stats, shutdown)
    -> fire timers: retire old and idle workers, SIGKILL workers that ignored
       SIGTERM or outstayed their exit_timeout (job deadlines and the memory
       limit are the template's: limits.py)
    -> manage workers: spawn up to the target
    -> dispatch pending jobs to ready workers, then write

Other threads never touch this state: they append a command to ``_inbox``
(a deque, safe to append from any thread) and write one byte to the wake-up
pipe. The pipe is non-blocking and a full pipe is ignored, since a full pipe
already means the manager will wake.

The state itself lives in plain objects this thread owns, each in its own
module: the workers and their life cycle (``worker_table.py``), the queue and
who gets which job (``dispatch.py``), the timers (``timers.py``) and the
template process (``template_link.py``); messages are encoded and decoded by
``wire.py``. This module holds the API, the loop, the sockets to the workers,
the futures' outcomes, shutting down and breaking.

Jobs are pipelined: a worker may hold a few jobs beyond the one it runs.
Workers run jobs in order and answer each, so the oldest unanswered job of a
dead worker is the one that was running; the others had not started and are
re-queued, never failed. Jobs held behind one that runs far past the mean
are taken back while the worker runs it, through its claims pipe
(claims.py), and go to other workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import InvalidStateError
from typing import Any

from . import claims, share, shm, watchdog, wire, worker_channel
from .config import PoolConfig
from .dispatch import Dispatcher
from .errors import (
    BrokenPool,
    JobTimeout,
    MemoryLimitExceeded,
    UnpicklingFailed,
    WorkerCrashed,
    describe_exit,
)
from .futures import JobFuture
from .logs import EventLog
from .serialization import MainRefs, attach_remote_traceback, loads
from .stats import PoolStats, WorkerInfo
from .template_link import TemplateLink
from .timers import Due, Timers
from .worker_table import Job, RetireReason, Worker, WorkerState, WorkerTable

__all__ = ["Job", "Manager"]  # Job is the worker table's; pool.py takes it from here

_PAGE = os.sysconf("SC_PAGE_SIZE")
_START_FAILURES_BEFORE_BROKEN = 3
_SPAWN_BACKOFF_MIN = 0.01  # seconds before retrying a spawn that found no descriptor; doubles
_SPAWN_BACKOFF_MAX = 1.0
_ABORT_WAIT = 5.0  # seconds shutdown waits for a pool it has just aborted (Ctrl-C) before leaving
_PROGRESS_BUDGET = 0.005  # seconds of progress callbacks per batch before stale values are dropped

_live_managers: weakref.WeakSet[Manager] = weakref.WeakSet()


class _StatsRequest:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: PoolStats | None = None


def _unshare_everywhere(key: bytes) -> None:
    """A shared object was let go: every pool whose workers may hold it tells them."""
    for manager in list(_live_managers):
        if not manager.forked_away:
            manager.unshare(key)


share.release_hooks.append(_unshare_everywhere)


def _fds_of_live_managers() -> list[int]:
    fds: list[int] = []
    for manager in list(_live_managers):
        fds.extend(manager.owned_fds())
    return fds


def _forget_after_fork() -> None:
    """In any child forked from a pool's process: let go of every pool's descriptors.

    The child inherits copies of each pool's sockets and pipes. Kept open, they
    would hold the pool's template and workers alive after the pool's process
    ends or shuts them down (the template only sees end of stream once every
    copy is closed), so a caller that forks (``os.fork``, a ``multiprocessing``
    fork child) would make ``shutdown()`` wait for that child to exit, and would
    leave orphans if the parent were killed. They are pointed at /dev/null
    with ``dup2`` rather than closed, so the numbers stay taken: a socket
    object in the copied memory can never reach a file the child opens later.
    """
    managers = list(_live_managers)
    _live_managers.clear()  # none of them is this process's
    fds: list[int] = []
    for manager in managers:
        manager.forked_away = True
        fds.extend(manager.owned_fds())
    if fds:
        _point_at_devnull(fds)


def _point_at_devnull(fds: list[int]) -> None:
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    for fd in fds:
        if fd != null:
            try:
                os.dup2(null, fd, inheritable=False)
            except OSError:
                pass
    os.close(null)


os.register_at_fork(after_in_child=_forget_after_fork)


class Manager:
    """Owns one pool's workers, jobs and template. Public methods are safe from any thread."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.log = EventLog(config.name)
        self.owner_pid = os.getpid()
        self.forked_away = False
        self._inbox: deque[tuple[str, Any]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_pending = False
        self._wake_lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._table = WorkerTable(config)
        self._workers = self._table.workers  # by id; the table changes it, the loop reads it
        self._dispatcher = Dispatcher(config)
        self._timers = Timers.of(config, long_after=self._dispatcher.long_after)
        self._link = TemplateLink(config)
        self._read_buffer = worker_channel.read_buffer()  # every worker's socket is read through it
        self._closing = False
        self._closed = False
        self._broken: BaseException | None = None
        self._start_failures = 0
        self._debug = False
        self.counters: dict[str, int] = dict.fromkeys(
            ("submitted", "done", "failed", "crashed", "timed_out", "cancelled", "spawned"), 0
        )
        self.retired = self._table.retired
        self._final_stats: PoolStats | None = None
        self._stats_requests: list[_StatsRequest] = []
        # When the loop last left select(), or None while it waits there: the
        # watchdog reads it to tell a busy manager from a stuck one.
        self.busy_since: float | None = None
        self._spawn_retry_at = 0.0  # no spawn before this (a socket could not be made)
        self._spawn_backoff = 0.0
        self._stuck: BrokenPool | None = None  # set by the watchdog thread, once
        # Why submit() is refused although the pool was not shut down (the interpreter is exiting).
        self.refusing: str | None = None
        _live_managers.add(self)
        self._start_template()
        self._thread = threading.Thread(
            target=self._run, name=f"poolkit-manager-{config.name}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ API

    def owned_fds(self) -> list[int]:
        if self._closed:
            return []
        fds = [self._wake_r, self._wake_w]
        if self._link.control is not None:
            fds.append(self._link.control.fileno())
        for worker in list(self._workers.values()):
            fds.extend(worker.owned_fds())
        return [fd for fd in fds if fd >= 0]

    def submit(self, job: Job) -> None:
        self._inbox.append(("job", job))
        self._wake()
        if self._stuck is not None:  # the watchdog may have looked at the inbox before this job
            _fail_from_outside(job.future, self._stuck)
        elif self._closed:  # the loop ended after the caller's checks; it reads no inbox any more
            _fail_from_outside(job.future, RuntimeError("cannot schedule new futures after shutdown"))

    def wake(self) -> None:
        """Look at the queue again (a queued future was cancelled: shutdown may be able to finish)."""
        self._wake()

    def terminate(self, future: JobFuture[Any]) -> None:
        self._inbox.append(("terminate", future))
        self._wake()

    def unshare(self, key: bytes) -> None:
        """A ``Pool.share`` object was let go: the workers that hold it drop it (share.py)."""
        self._inbox.append(("unshare", key))
        if threading.current_thread() is not self._thread:
            self._wake()  # from the manager thread (a job dropped there), the loop reads it anyway

    def request_shutdown(self, cancel_futures: bool = False) -> None:
        self._inbox.append(("shutdown", cancel_futures))
        self._wake()

    @property
    def template_pid(self) -> int | None:
        return self._link.pid

    @property
    def main_refs(self) -> MainRefs:
        """The ``__main__`` objects this pool's workers share with this process (jobs pickle them by name)."""
        return self._link.main_refs

    def signal_workers(self, signum: int) -> None:
        """Send ``signum`` to every worker now; the jobs they run fail, and they are replaced."""
        self._inbox.append(("signal_workers", signum))
        self._wake()

    def abort(self) -> None:
        """Stop now: cancel every queued job, kill every worker; running jobs end cancelled."""
        self._inbox.append(("abort", None))
        self._wake()

    def join(self) -> None:
        """Wait until the pool has stopped (see ``request_shutdown``), or is declared stuck.

        A ``KeyboardInterrupt`` while waiting (Ctrl-C, or a second one after
        the one that ended the caller's loop) stops the pool at once: queued
        jobs are cancelled and running ones killed. It is then raised again.
        """
        if threading.current_thread() is self._thread:
            return  # from a callback: the loop finishes the shutdown when the callback returns
        try:
            while self._thread.is_alive() and self._stuck is None:
                self._thread.join(watchdog.TICK)
        except KeyboardInterrupt:
            self.abort()
            self._thread.join(_ABORT_WAIT)
            raise

    def declare_stuck(self, seconds: float) -> None:
        """Called by the watchdog thread while this manager's thread is away from its loop.

        The owner cannot act, so this does the least that frees every caller:
        each unfinished future fails, the template and workers are killed,
        waiting ``stats()`` calls return. The manager thread itself, should
        it ever come back, finds ``_stuck`` set and closes the pool (``_die``).
        """
        error = BrokenPool(
            f"the pool's own thread has been away from its loop for {seconds:.0f} s (over "
            f"stall_timeout={self.config.stall_timeout:g} s), most likely inside a done- or "
            "progress callback, which run in that thread and must return; the pool is broken "
            "and its workers were killed"
        )
        self._stuck = error
        if self._broken is None:
            self._broken = error
        self.log.warning("pool.stuck", seconds=round(seconds, 1))
        for future in self._unfinished_futures():
            _fail_from_outside(future, error)
        pids = [w.pid for w in list(self._workers.values()) if w.pid is not None]
        for pid in [self._link.pid, *pids]:
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for request in list(self._stats_requests):
            request.done.set()

    def _unfinished_futures(self) -> list[JobFuture[Any]]:
        """The futures of every job this manager holds, read from another thread (the owner is stuck)."""
        for _ in range(10):
            try:
                futures = [arg.future for command, arg in list(self._inbox) if command == "job"]
                futures.extend(job.future for job in list(self._dispatcher.pending))
                for worker in list(self._workers.values()):
                    futures.extend(job.future for job in list(worker.inflight))
                return futures
            except RuntimeError:  # a deque changed while we copied it: the owner moved; again
                continue
        return []

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def broken(self) -> BaseException | None:
        return self._broken

    def stats(self) -> PoolStats:
        if threading.current_thread() is self._thread:
            return self._snapshot()  # from a done- or progress callback: this thread owns the state
        if self._thread.is_alive() and self._stuck is None:
            request = _StatsRequest()
            self._inbox.append(("stats", request))
            self._wake()
            while not request.done.wait(watchdog.TICK):
                if not self._thread.is_alive() or self._stuck is not None:
                    break
            if request.result is not None:
                return request.result
        if self._stuck is None:
            self._thread.join(_ABORT_WAIT)  # it is ending: its final snapshot comes in a moment
        return self._final_stats or self._snapshot()

    def _wake(self) -> None:
        if self._wake_pending:
            return
        # The lock keeps the pipe from being closed (and its number reused by
        # someone else's file) between the check and the write.
        with self._wake_lock:
            if self._wake_w < 0:
                return  # the manager is gone
            self._wake_pending = True
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass  # full pipe: the manager is about to wake anyway

    # ------------------------------------------------------------ template

    def _start_template(self) -> None:
        # A fork template forks the first workers as soon as it starts; their
        # sockets are made now and inherited.
        first = []
        if self.config.start_method == "fork" and not self._workers:
            first = self._new_workers(self.config.min_workers, time.monotonic())
        self._link.start(
            first=[(w.worker_id, w.max_jobs or 0, end) for w, end in first],
            inherited=[*_fds_of_live_managers(), *shm.open_fds()],
        )
        for worker, end in first:
            end.close()
            self._add_worker(worker)
        assert self._link.control is not None
        self._selector.register(self._link.control, selectors.EVENT_READ, "control")

    def _stop_template(self) -> None:
        if self._link.control is not None:
            self._selector.unregister(self._link.control)
        self._link.stop()

    def _read_control(self, now: float) -> None:
        events = self._link.read()
        if events is None:
            self._template_died(now)
            return
        for kind, values in events:
            if kind == wire.Kind.SPAWNED:
                worker_id, pid = values
                worker = self._workers.get(worker_id)
                if worker is not None:
                    worker.pid = pid
                    self.log.info("worker.spawned", worker_id=worker_id, pid=pid)
            elif kind == wire.Kind.EXITED:
                worker_id, pid, exitcode = values
                worker = self._workers.get(worker_id)
                if worker is not None:
                    self._worker_exited(worker, exitcode, now)
            elif kind == wire.Kind.LIMIT:
                worker_id, pid, seq, reason, rss = values
                self._limit_reached(worker_id, seq, reason, rss, now)

    def _limit_reached(self, worker_id: int, seq: int, reason: int, rss: int, now: float) -> None:
        """The template signalled a worker whose job passed its deadline or the memory limit."""
        worker = self._workers.get(worker_id)
        if worker is None or worker.state is WorkerState.KILLING or not worker.inflight:
            return  # gone, or stopped for another reason first
        head = worker.inflight[0]
        if head.seq != seq or head.future.done():
            return  # that job ended meanwhile; the worker's exit is reported as it comes
        if reason == wire.LIMIT_TIMEOUT:
            self._job_timed_out(worker, head, now)
        else:
            self._memory_exceeded(worker, head, rss, now)

    def _template_died(self, now: float) -> None:
        """The template is gone, and its workers with it (parent-death signal): restart it."""
        self._stop_template()
        for worker in list(self._workers.values()):
            self._worker_exited(worker, -signal.SIGKILL, now, why="its template process died")
        if (self._closing and not self._dispatcher.pending) or self._broken is not None:
            return
        try:
            # Started as the pool started: a fork pool's template is forked from
            # this process again, so its workers see this process's __main__
            # (jobs that refer to its functions by name) and the initializer's
            # globals where jobs read them, as before. A fresh interpreter has neither.
            self._start_template()
        except Exception as exc:
            self._break(BrokenPool(f"the pool's template process died and could not be restarted: {exc!r}"))

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            # Started here, not by the caller: starting a thread waits for it to
            # run, and the caller's Pool() should not wait for a second thread.
            # No user code runs in this thread before this line.
            watchdog.watch(self)
            self._manage_workers(time.monotonic())
            while not self._closed:
                timeout = self._next_timeout(time.monotonic())
                self.busy_since = None
                events = self._selector.select(timeout)
                now = self.busy_since = time.monotonic()
                if self._stuck is not None:  # back from a callback the watchdog gave up on
                    self._die(self._stuck)
                    return
                self._debug = self.log.enabled(logging.DEBUG)
                for key, mask in events:
                    tag = key.data
                    if tag == "wake":
                        self._drain_wake()
                    elif tag == "control":
                        if self._link.control is not None:
                            self._read_control(now)
                    else:
                        worker: Worker = tag
                        if mask & selectors.EVENT_READ:
                            self._read_worker(worker, now)
                        if mask & selectors.EVENT_WRITE and worker.worker_id in self._workers:
                            self._flush(worker)
                self._take_inbox(now)
                self._fire_timers(now)
                self._manage_workers(now)
                self._dispatch(now)
                self._manage_workers(now)  # replace what dispatch just retired, before anyone looks
                self._maybe_finish()
                if self._stats_requests:
                    snapshot = self._snapshot()
                    for request in self._stats_requests:
                        request.result = snapshot
                        request.done.set()
                    self._stats_requests.clear()
        except BaseException as exc:  # a bug here must not leave futures hanging
            error = BrokenPool(f"poolkit's manager thread failed: {exc!r}")
            error.__cause__ = exc
            self._die(error)
            raise
        finally:
            self._closed = True
            if self._inbox:  # taken after the loop's last look: refused (see submit)
                self._fail_all(RuntimeError("cannot schedule new futures after shutdown"))
            try:
                self._final_stats = self._snapshot()
            except BaseException:
                pass
            self._close_fds()

    def _die(self, error: BaseException) -> None:
        """The loop cannot go on: every future fails, every process is killed.

        Each step is on its own, so that one that fails (the state is suspect
        here) cannot keep the others from running; futures come first.
        """
        if self._broken is None:
            self._broken = error
        steps: tuple[Callable[[], None], ...] = (
            lambda: self._fail_all(error),
            self._kill_everything,
            lambda: self.log.warning("pool.broken", error=str(error)),
        )
        for step in steps:
            try:
                step()
            except BaseException:
                pass

    def _fail_all(self, error: BaseException) -> None:
        """Fail every job this manager knows of, queued, running or not yet taken from the inbox."""
        jobs = list(self._dispatcher.pending)
        self._dispatcher.pending.clear()
        for worker in list(self._workers.values()):
            jobs.extend(worker.inflight)
            worker.inflight.clear()
        while self._inbox:
            command, arg = self._inbox.popleft()
            if command == "job":
                jobs.append(arg)
            elif command == "stats":
                self._stats_requests.append(arg)
        for job in jobs:
            try:
                self._fail(job, error)
            except BaseException:
                pass
        for request in self._stats_requests:
            request.done.set()  # stats() then answers from the final snapshot
        self._stats_requests.clear()

    def _drain_wake(self) -> None:
        # Empty the pipe first, then clear the flag: a submitter that still saw
        # the flag set has already appended to the inbox, which is read after this.
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self._wake_pending = False

    def _take_inbox(self, now: float) -> None:
        inbox = self._inbox
        while inbox:
            command, arg = inbox.popleft()
            if command == "job":
                self.counters["submitted"] += 1
                if self._broken is not None:
                    self._fail(arg, self._broken)
                else:
                    self._dispatcher.pending.append(arg)
            elif command == "stats":
                self._stats_requests.append(arg)
            elif command == "terminate":
                self._terminate(arg, now)
            elif command == "abort":
                self._abort(now)
            elif command == "signal_workers":
                for worker in list(self._workers.values()):
                    self._kill(worker, RetireReason.TERMINATED, arg, now)
            elif command == "unshare":
                for worker in self._workers.values():
                    if arg in worker.shares_sent:
                        worker.shares_sent.discard(arg)
                        worker.outbox.append(wire.encode_unshare(arg))
                        self._flush(worker)
            elif command == "shutdown":
                self._closing = True
                if arg:  # cancel_futures: the jobs not started; re-queued ones still run
                    keep: deque[Job] = deque()
                    for job in self._dispatcher.pending:
                        if job.future.cancel():
                            self.counters["cancelled"] += 1
                            job.future.set_running_or_notify_cancel()
                        elif not job.future.done():
                            keep.append(job)
                    self._dispatcher.pending = keep

    def _next_timeout(self, now: float) -> float | None:
        retry_at = self._spawn_retry_at if self._spawn_retry_at > now else None
        return self._timers.next_timeout(self._workers.values(), now, also=retry_at)

    # ------------------------------------------------------------ workers

    def _target_workers(self) -> int:
        config = self.config
        if self._closing:
            return min(config.max_workers, self._busy_count() + len(self._dispatcher.pending))
        if config.min_workers >= config.max_workers:
            return config.max_workers
        demand = self._busy_count() + len(self._dispatcher.pending)
        return max(config.min_workers, min(config.max_workers, demand))

    def _busy_count(self) -> int:
        return sum(1 for w in self._workers.values() if w.live and w.inflight)

    def _manage_workers(self, now: float) -> None:
        if self._broken is not None or self._link.control is None or now < self._spawn_retry_at:
            return
        live = starting = 0
        for worker in self._workers.values():
            live += worker.live
            starting += worker.ready_at is None and not worker.leaving  # retiring ones too
        target = self._target_workers()
        # Never more than max_workers forks under way: a retiring worker's
        # replacement starts early, but recycling must not become a fork storm.
        while live < target and starting < self.config.max_workers * 2:
            if not self._spawn(now):
                break
            live += 1
            starting += 1

    def _spawn(self, now: float) -> bool:
        try:
            [(worker, child_end)] = self._new_workers(1, now)
        except OSError as exc:
            # No descriptor (EMFILE, ENFILE) or memory for a socket right now: a
            # passing shortage, not a broken pool. Try again soon, backing off.
            self._spawn_backoff = min(_SPAWN_BACKOFF_MAX, self._spawn_backoff * 2 or _SPAWN_BACKOFF_MIN)
            self._spawn_retry_at = now + self._spawn_backoff
            self.log.warning("worker.spawn_failed", error=repr(exc), retry_in=self._spawn_backoff)
            return False
        self._spawn_backoff = 0.0
        try:
            ok = self._link.spawn(worker.worker_id, worker.max_jobs, child_end)
        finally:
            child_end.close()
        if not ok:
            worker.close()
            return False
        self._add_worker(worker)
        return True

    def _new_workers(self, count: int, now: float) -> list[tuple[Worker, socket.socket]]:
        """Workers not started yet, each with the socket end its process will get."""
        made = self._table.new_workers(count, now)
        if self._link.exec_workers:  # a fresh interpreter: the template's copy of the config is not there
            for worker, _ in made:
                worker.outbox.append(
                    wire.encode_config(worker.worker_id, worker.max_jobs, self._link.config_bytes)
                )
        return made

    def _add_worker(self, worker: Worker) -> None:
        self._table.add(worker)
        self._selector.register(worker.sock, selectors.EVENT_READ, worker)
        self.counters["spawned"] += 1
        self._flush(worker)

    def _retire(self, worker: Worker, reason: RetireReason) -> None:
        """Retire gracefully: no new jobs; RETIRE once idle, so the finalizer runs and it exits 0."""
        if not self._table.retire(worker, reason):
            return
        self.log.info("worker.retired", worker_id=worker.worker_id, pid=worker.pid, reason=reason.value)
        if not worker.inflight:
            self._send_retire(worker)

    def _send_retire(self, worker: Worker) -> None:
        if worker.exit_deadline is not None:
            return  # told to leave already, or it said it leaves
        worker.outbox.append(wire.encode_retire())
        self._flush(worker)
        self._expect_exit(worker, time.monotonic())

    def _expect_exit(self, worker: Worker, now: float) -> None:
        """A retiring worker gets ``exit_timeout`` to run its finalizer and exit; then SIGKILL."""
        if worker.exit_deadline is None:
            worker.exit_deadline = now + self.config.exit_timeout

    def _kill(self, worker: Worker, reason: RetireReason, signum: int, now: float) -> None:
        """Stop a worker now. Jobs it had not started go back to the queue."""
        was = worker.state
        if was is not WorkerState.KILLING:
            self._requeue(self._table.kill(worker, reason))
        if was is WorkerState.KILLING or was is WorkerState.EXITED:
            # Signalled already, or dying (its stream ended): only SIGKILL is worth repeating.
            if signum == signal.SIGKILL and worker.pid is not None:
                self._link.kill(worker.pid, signum)
            return
        if worker.pid is not None:
            self._link.kill(worker.pid, signum)
        worker.exit_deadline = now + self.config.kill_grace

    def _requeue(self, jobs: list[Job]) -> None:
        """Put jobs a worker had not started back at the front of the queue, in order."""
        if self._broken is not None:
            for job in jobs:
                self._fail(job, self._broken)
        else:
            self._dispatcher.put_back(jobs)

    def _worker_exited(self, worker: Worker, exitcode: int, now: float, why: str | None = None) -> None:
        if worker.sock.fileno() >= 0 and not worker.eof:
            self._drain_worker(worker, now)  # results sent before death still count
        if not self._table.remove(worker):
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(worker.sock)
        worker.close()
        if worker.ready_at is None:
            self._requeue(self._table.take_all(worker))  # it died before READY: its jobs never started
            self._start_failed(worker, exitcode)
        elif worker.self_retired:
            self._requeue(self._table.take_all(worker))  # it said it was leaving after its last answer
        elif worker.inflight:
            head = worker.inflight.popleft()
            self._requeue(self._table.take_all(worker))
            if not head.future.done():
                self._job_crashed(head, worker, exitcode, why)
            self._table.crashed(worker)
        elif worker.state is not WorkerState.KILLING and worker.reason is None and exitcode != 0:
            self._table.crashed(worker)
            self.log.warning(
                "worker.crashed",
                worker_id=worker.worker_id,
                pid=worker.pid,
                exit=describe_exit(exitcode),
                job_id=None,
            )

    def _start_failed(self, worker: Worker, exitcode: int) -> None:
        if self._broken is not None or (
            worker.state is WorkerState.KILLING and worker.reason is not RetireReason.START_TIMEOUT
        ):
            return  # a worker we killed ourselves while it started is no evidence
        self._start_failures += 1
        if self._start_failures >= _START_FAILURES_BEFORE_BROKEN:
            self._break(
                BrokenPool(
                    f"{self._start_failures} workers in a row died while starting "
                    f"(last: {describe_exit(exitcode)}); the pool is not usable"
                )
            )

    def _job_crashed(self, job: Job, worker: Worker, exitcode: int, why: str | None) -> None:
        if self._dispatcher.retry(job):
            return
        how = describe_exit(exitcode)
        message = (
            f"worker {worker.worker_id} (pid {worker.pid}) died with {how} while running "
            f"{job.future.subject}"
        )
        if why:
            message += f": {why}"
        elif exitcode == -signal.SIGKILL:
            message += " (SIGKILL: killed from outside, or by the kernel's OOM killer)"
        self.counters["crashed"] += 1
        self.log.warning(
            "worker.crashed",
            worker_id=worker.worker_id,
            pid=worker.pid,
            exit=how,
            job_id=job.future.job_id,
        )
        job.future.attempt = job.attempt
        self._fail(
            job,
            WorkerCrashed(
                message,
                exitcode=exitcode,
                pid=worker.pid,
                worker_id=worker.worker_id,
                job_id=job.future.job_id,
            ),
        )

    # ------------------------------------------------------------ reading

    def _read_worker(self, worker: Worker, now: float) -> bool:
        """Read once; True if data came (more may wait), False on would-block or end of stream."""
        n = worker_channel.receive(worker, self._read_buffer)
        if n == worker_channel.WOULD_BLOCK:
            return False
        if n == 0:
            self._worker_eof(worker, now)
            return False
        try:
            self._handle_frames(worker, now)
        except wire.FrameTooLarge as error:
            self._result_too_large(worker, error, now)
            return False
        return True

    def _result_too_large(self, worker: Worker, error: wire.FrameTooLarge, now: float) -> None:
        """A result the parent cannot hold: fail that job, drop the worker (its stream is lost)."""
        self._worker_eof(worker, now)
        if worker.inflight:
            head = worker.inflight[0]
            exc = MemoryError(
                f"the result of {head.future.subject} ({error.length / 2**20:.0f} MiB) does "
                "not fit in the parent's memory"
            )
            self.counters["failed"] += 1
            _settle(head.future, None, exc)
        self._kill(worker, RetireReason.CRASH, signal.SIGKILL, now)

    def _drain_worker(self, worker: Worker, now: float) -> None:
        while worker.worker_id in self._workers and not worker.eof:
            if not self._read_worker(worker, now):
                return

    def _worker_eof(self, worker: Worker, now: float) -> None:
        if worker.eof:
            return
        worker.eof = True
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(worker.sock)
        worker.drop_outbox()
        if worker.ready_at is None:
            # Died while starting: wait for its exit status before replacing it,
            # so that a failing initializer is counted before another fork.
            if worker.pid is not None:
                self._link.kill(worker.pid, signal.SIGKILL)
        elif not worker.leaving:
            # Act now rather than when the exit status comes: re-queue the jobs
            # it had not started and let a replacement start. The job it was
            # running fails when the exit status arrives, with it.
            self._requeue(self._table.lost(worker))
            if worker.pid is not None:
                self._link.kill(worker.pid, signal.SIGKILL)
        if worker.exit_deadline is None:
            worker.exit_deadline = now + self.config.kill_grace

    def _handle_frames(self, worker: Worker, now: float) -> None:
        frames = list(worker.reader.frames())
        # Progress is "the latest value". Every value is delivered while the
        # progress callbacks keep up; once they have taken more than
        # _PROGRESS_BUDGET of this batch, only the last value per job is, so a
        # slow callback never holds results back behind a flood of stale values.
        last_progress: dict[int, int] = {}
        for index, (kind, body) in enumerate(frames):
            if kind == wire.Kind.PROGRESS:
                last_progress[wire.decode_progress_seq(body)[0]] = index
        progress_started: float | None = None
        for index, (kind, body) in enumerate(frames):
            if kind == wire.Kind.RESULT:
                self._on_result(worker, body, now)
            elif kind == wire.Kind.PROGRESS:
                (seq,) = wire.decode_progress_seq(body)
                if progress_started is None:
                    progress_started = time.perf_counter()
                elif (
                    last_progress[seq] != index
                    and time.perf_counter() - progress_started > _PROGRESS_BUDGET
                ):
                    continue
                for job in worker.inflight:
                    if job.seq == seq:
                        try:
                            value = loads(wire.progress_payload(body))
                        except BaseException:
                            break  # a progress value that will not load is dropped
                        job.future._set_progress(value)
                        break
            elif kind == wire.Kind.READY:
                pid, with_claims = wire.decode_ready(body)
                if with_claims and len(worker.fds) >= 2 and worker.claims_r < 0:
                    worker.claims_r = worker.fds.popleft()  # its claims pipe (claims.py)
                    worker.claims_w = worker.fds.popleft()
                if self._table.ready(worker, pid, now):
                    self._start_failures = 0
            elif kind == wire.Kind.RETIRING:
                rss = wire.decode_retiring(body)
                worker.rss = rss
                worker.self_retired = True
                self._expect_exit(worker, now)
                if self._table.retire(worker, RetireReason.MEMORY):
                    self.log.info(
                        "worker.retired",
                        worker_id=worker.worker_id,
                        pid=worker.pid,
                        reason="memory",
                        rss=rss,
                    )
                self._requeue(self._table.take_all(worker))
            elif kind == wire.Kind.INIT_FAILED:
                try:
                    exc, tb = loads(body)
                    attach_remote_traceback(exc, tb)
                except BaseException as unpickling_error:
                    exc = unpickling_error
                error = BrokenPool(
                    f"worker {worker.worker_id} could not start (its initializer, or loading "
                    f"the initializer and its arguments, failed): {exc!r}; "
                    "the pool is not usable"
                )
                error.__cause__ = exc
                self._break(error)

    def _on_result(self, worker: Worker, body: bytes | bytearray, now: float) -> None:
        seq, outcome, wall, cpu, peak, rss = wire.decode_result_head(body)
        # Its region (if any) is claimed now, in frame order, even for a job given up on.
        incoming = shm.claim(wire.result_payload(body), worker.fds) if worker.fds else None
        inflight = worker.inflight
        if not inflight or inflight[0].seq != seq:
            return  # a job we already gave up on (timed out, terminated)
        job = inflight.popleft()
        worker.jobs_done += 1
        if outcome == wire.OUTCOME_SKIPPED:
            if inflight:
                worker.start_head(now)
            else:
                worker.idle_since = now
                self._after_last_answer(worker, now)
            return  # a terminated job the worker did not start; its future is cancelled
        worker.rss = rss
        worker.cpu += cpu
        self._dispatcher.measured(wall)
        if inflight:
            worker.start_head(now)
        else:
            worker.idle_since = now
        retire_reason: str | None = None
        # Its last job: its budget is assigned (jobs taken back are not counted,
        # by the worker either) and it holds no other.
        if worker.max_jobs is not None and worker.jobs_assigned >= worker.max_jobs and not inflight:
            retire_reason = RetireReason.TASKS.value
        elif (
            self.config.max_memory_per_child is not None
            and rss > self.config.max_memory_per_child
        ):
            retire_reason = RetireReason.MEMORY.value  # the worker leaves by itself (RETIRING follows)
        future = job.future
        future._raw_stats = (
            wall, cpu, peak, rss, worker.worker_id, worker.pid or 0, job.attempt, retire_reason
        )
        if not future.done():
            self._resolve(future, outcome, wire.result_payload(body), incoming)
        if self._debug:
            self.log.debug(
                "job.done", job_id=future.job_id, worker_id=worker.worker_id, pid=worker.pid, wall=wall
            )
        if not inflight:
            self._after_last_answer(worker, now)

    def _after_last_answer(self, worker: Worker, now: float) -> None:
        """``worker`` holds no job now: one that retires leaves."""
        if worker.state is WorkerState.RETIRING and not worker.self_retired:
            if worker.reason is RetireReason.TASKS and worker.jobs_assigned == worker.max_jobs:
                self._expect_exit(worker, now)  # it leaves by itself after its last job
            else:
                self._send_retire(worker)

    def _resolve(
        self, future: JobFuture[Any], outcome: int, payload: memoryview, incoming: shm.Incoming | None
    ) -> None:
        try:
            if outcome == wire.OUTCOME_VALUE:
                value = shm.loads(payload, incoming)
                self.counters["done"] += 1
                _settle(future, value, None)
                return
            exc, tb = shm.loads(payload, incoming)
            attach_remote_traceback(exc, tb)
            if outcome == wire.OUTCOME_NOT_LOADED:
                cause = exc
                exc = UnpicklingFailed(
                    f"the function or arguments of {future.subject} could not be unpickled "
                    f"in its worker: {cause!r}"
                )
                exc.__cause__ = cause
        except BaseException as error:  # SystemExit from a hostile __reduce__ too: this job only
            exc = UnpicklingFailed(
                f"the result of {future.subject} could not be unpickled in the parent: {error!r}"
            )
            exc.__cause__ = error
        self.counters["failed"] += 1
        _settle(future, None, exc)

    # ------------------------------------------------------------ timers

    def _fire_timers(self, now: float) -> None:
        """What is due now (timers.py). Job deadlines and the memory limit are the template's (limits.py)."""
        self._timers.fire(self._workers.values(), now, self._timer_due)

    def _timer_due(self, worker: Worker, due: Due, now: float) -> None:
        if due is Due.EXIT:
            worker.exit_deadline = now + self.config.kill_grace
            if worker.pid is not None:
                self._link.kill(worker.pid, signal.SIGKILL)
        elif due is Due.START:
            self.log.warning("worker.start_timeout", worker_id=worker.worker_id, pid=worker.pid)
            self._kill(worker, RetireReason.START_TIMEOUT, signal.SIGKILL, now)
        elif due is Due.SKIP:
            # Terminated while queued, but the worker started it before the
            # CANCEL arrived (no SKIPPED came back): stop it the hard way.
            self._kill(worker, RetireReason.TERMINATED, signal.SIGKILL, now)
        elif due is Due.RECLAIM:
            self._reclaim(worker, now)
        elif due is Due.LIFETIME:
            self._retire(worker, RetireReason.LIFETIME)
        else:
            self._retire(worker, RetireReason.IDLE)

    def _job_timed_out(self, worker: Worker, job: Job, now: float) -> None:
        self.counters["timed_out"] += 1
        self.log.warning(
            "job.timeout",
            worker_id=worker.worker_id,
            pid=worker.pid,
            job_id=job.future.job_id,
            timeout=job.timeout,
        )
        self._kill(worker, RetireReason.TIMEOUT, signal.SIGTERM, now)
        if self._dispatcher.retry(job):
            worker.inflight.popleft()  # it runs again elsewhere; this worker's exit has nothing to fail
            return
        job.future.attempt = job.attempt
        self._fail(
            job,
            JobTimeout(
                f"{job.future.subject} ran past its timeout of {job.timeout:g} s; "
                f"worker {worker.worker_id} (pid {worker.pid}) was stopped"
            ),
        )

    def _memory_exceeded(self, worker: Worker, job: Job, rss: int, now: float) -> None:
        limit = self.config.memory_limit_per_child
        self.log.warning(
            "worker.memory_limit",
            worker_id=worker.worker_id,
            pid=worker.pid,
            job_id=job.future.job_id,
            rss=rss,
            limit=limit,
        )
        self._kill(worker, RetireReason.MEMORY_LIMIT, signal.SIGKILL, now)
        self.counters["crashed"] += 1
        job.future.attempt = job.attempt
        self._fail(
            job,
            MemoryLimitExceeded(
                f"{job.future.subject} used too much memory: worker {worker.worker_id} "
                f"(pid {worker.pid}) reached {rss / 2**20:.0f} MiB, over the "
                f"memory_limit_per_child of {limit / 2**20:.0f} MiB, and was killed",  # type: ignore[operator]
                rss=rss,
                limit=limit,
                exitcode=-signal.SIGKILL,
                pid=worker.pid,
                worker_id=worker.worker_id,
                job_id=job.future.job_id,
            ),
        )

    def _terminate(self, future: JobFuture[Any], now: float) -> None:
        """``future.terminate()`` already cancelled the future; stop the job's worker if it runs it."""
        self.counters["cancelled"] += 1
        for index, job in enumerate(self._dispatcher.pending):
            if job.future is future:
                del self._dispatcher.pending[index]  # re-queued after a crash: it has not restarted
                return
        for worker in self._workers.values():
            for position, job in enumerate(worker.inflight):
                if job.future is not future:
                    continue
                if position == 0:
                    if not worker.leaving:
                        self._kill(worker, RetireReason.TERMINATED, signal.SIGKILL, now)
                elif job.token is not None:
                    # Sent ahead with a token: take it back, with every job the
                    # worker has not claimed (they go back to the queue; this one,
                    # cancelled, is dropped there). If the worker claimed it first,
                    # it is about to run it: _fire_timers kills it when it does.
                    self._reclaim(worker, now)
                else:
                    # Sent ahead, not started: tell the worker to skip it. If it
                    # starts anyway (the message crossed), _fire_timers kills it.
                    worker.outbox.append(wire.encode_cancel(job.seq))
                    self._flush(worker)
                return

    # ------------------------------------------------------------ dispatch

    def _dispatch(self, now: float) -> None:
        if not self._dispatcher.pending or self._broken is not None:
            return  # a broken pool's jobs are failed, never started (the watchdog may be failing them)
        touched, spent, cancelled = self._dispatcher.assign(self._workers.values(), now)
        self.counters["cancelled"] += cancelled
        for worker in spent:
            self._retire(worker, RetireReason.TASKS)
        for worker in touched:
            self._flush(worker)

    def _flush(self, worker: Worker) -> None:
        if worker.tokens and not worker_channel.write_tokens(worker):  # before the frames (claims.py)
            (first,) = claims.TOKEN.unpack_from(worker.tokens)
            worker.tokens.clear()
            worker.tokens_written = worker.tokens_sent
            self._take_back(worker, list(range(first, worker.tokens_sent)), time.monotonic())
        worker_channel.send(worker)
        wants_write = bool(worker.outbox)
        if wants_write != worker.wants_write and not worker.eof:
            worker.wants_write = wants_write
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if wants_write else 0)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.modify(worker.sock, events, worker)

    def _reclaim(self, worker: Worker, now: float) -> None:
        """Take back the jobs queued on ``worker`` that it has not started, for other workers.

        For a head that runs far past the mean, and for a queued job
        terminated. Every token still in its claims pipe is taken (claims.py);
        the jobs whose tokens the worker took first are its to run, and can
        no longer be taken back.
        """
        taken = worker_channel.take_back(worker)
        if taken:
            self._take_back(worker, taken, now)
        for job in worker.inflight:
            job.token = None

    def _take_back(self, worker: Worker, tokens: list[int], now: float) -> None:
        """The jobs sent ahead with these tokens will not start on ``worker``: queue them again, first."""
        inflight = worker.inflight
        taken = set(tokens)
        back = [job for job in inflight if job.token in taken]
        if not back:
            return
        kept = [job for job in inflight if job.token not in taken]
        inflight.clear()
        inflight.extend(kept)
        worker.jobs_assigned -= len(back)  # the worker does not count them either
        for job in back:
            job.token = None
        self._requeue(back)
        if self._debug:
            self.log.debug("jobs.taken_back", worker_id=worker.worker_id, jobs=len(back))
        if not inflight:  # even its head had not started: it skips them all and is idle
            worker.idle_since = now
            self._after_last_answer(worker, now)

    # ------------------------------------------------------------ endings

    def _fail(self, job: Job, exc: BaseException) -> None:
        future = job.future
        if future.done():
            return
        if not job.dispatched:
            job.dispatched = True
            if not future.set_running_or_notify_cancel():
                self.counters["cancelled"] += 1
                return
        if not isinstance(exc, (WorkerCrashed, JobTimeout)):
            self.counters["failed"] += 1
        _settle(future, None, exc)

    def _break(self, error: BaseException) -> None:
        """The pool cannot go on: fail every job, stop every worker."""
        if self._broken is not None:
            return
        self._broken = error
        # Futures first: whatever fails after this (a log, a kill), no caller waits for ever.
        while self._dispatcher.pending:
            self._fail(self._dispatcher.pending.popleft(), error)
        for worker in list(self._workers.values()):
            for job in worker.inflight:
                self._fail(job, error)
            worker.inflight.clear()
        self.log.warning("pool.broken", error=str(error))
        now = time.monotonic()
        for worker in list(self._workers.values()):
            self._kill(worker, RetireReason.SHUTDOWN, signal.SIGKILL, now)

    def _maybe_finish(self) -> None:
        if not self._closing:
            return
        if self._dispatcher.pending:
            self._drop_settled_pending()
            if self._dispatcher.pending:
                return
        for worker in list(self._workers.values()):
            if not worker.inflight:
                self._retire(worker, RetireReason.SHUTDOWN)
        if self._workers:
            return
        self._stop_template()
        self._closed = True
        self.log.info("pool.shutdown", spawned=self.counters["spawned"])

    def _abort(self, now: float) -> None:
        """Shut down now: running jobs are killed and end cancelled, queued ones are cancelled."""
        self._closing = True
        for worker in list(self._workers.values()):
            if worker.inflight and not worker.leaving:
                head = worker.inflight[0]
                self._kill(worker, RetireReason.SHUTDOWN, signal.SIGKILL, now)  # re-queues the others
                if head.future._force_cancel():
                    self.counters["cancelled"] += 1
        for job in self._dispatcher.pending:
            future = job.future
            if job.dispatched:
                cancelled = future._force_cancel()
            else:
                cancelled = future.cancel()
                if cancelled:
                    future.set_running_or_notify_cancel()
            self.counters["cancelled"] += cancelled
        self._dispatcher.pending.clear()

    def _drop_settled_pending(self) -> None:
        """Forget queued jobs whose futures already ended (cancelled by the caller, terminated).

        Dispatch drops them as it reaches them, but only while a worker is free;
        a pool that is shutting down must not wait for one to become free first.
        """
        keep: deque[Job] = deque()
        for job in self._dispatcher.pending:
            if not job.dispatched and job.future.cancelled():
                self.counters["cancelled"] += 1
            elif not job.future.done():
                keep.append(job)
        self._dispatcher.pending = keep

    def _kill_everything(self) -> None:
        for worker in list(self._workers.values()):
            if worker.pid is not None:
                with contextlib.suppress(OSError):
                    os.killpg(worker.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self._stop_template()

    def _close_fds(self) -> None:
        for worker in list(self._workers.values()):
            worker.close()
        self._workers.clear()
        self._link.close()
        self._selector.close()
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1
        _live_managers.discard(self)
        watchdog.forget(self)

    # ------------------------------------------------------------ stats

    def _snapshot(self) -> PoolStats:
        now = time.monotonic()
        workers = []
        running = 0
        for worker in self._workers.values():
            if worker.inflight and not worker.leaving and not worker.inflight[0].future.done():
                running += 1
            workers.append(
                WorkerInfo(
                    worker_id=worker.worker_id,
                    pid=worker.pid,
                    state=worker.state.value,
                    jobs_done=worker.jobs_done,
                    rss=(_read_rss(worker.pid) or worker.rss) if worker.pid else worker.rss,
                    cpu_time=worker.cpu,
                    age=now - worker.born,
                    current_job=worker.inflight[0].future.job_id if worker.inflight else None,
                )
            )
        return PoolStats(
            workers=tuple(workers),
            pending=len(self._dispatcher.pending),
            running=running,
            retired=dict(self.retired),
            **self.counters,
        )


def _settle(future: JobFuture[Any], value: Any, error: BaseException | None) -> None:
    """Complete a future from the manager thread; a user's done-callback cannot take the thread down.

    ``Future`` itself logs an ``Exception`` raised by a callback, but lets a
    ``BaseException`` (``SystemExit`` in a callback, say) propagate.
    """
    try:
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
    except InvalidStateError:
        pass  # already cancelled or failed (terminated, timed out)
    except BaseException:
        logging.getLogger("poolkit").exception("a done-callback of job %s raised", future.job_id)


def _read_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def shutdown_all_at_exit() -> None:
    """At interpreter exit, let every pool of this process finish its jobs and stop its workers.

    After Ctrl-C ended the program, or on Ctrl-C while it waits, every pool
    stops at once instead (queued jobs cancelled, running ones killed).
    """
    managers = [m for m in list(_live_managers) if m.owner_pid == os.getpid() and not m.forked_away]
    # A program ended by Ctrl-C (an uncaught KeyboardInterrupt, which Python
    # records as sys.last_value before exit) wants to stop, not to wait for jobs.
    interrupted = isinstance(getattr(sys, "last_value", None), KeyboardInterrupt)
    for manager in managers:
        manager.refusing = "cannot schedule new futures after interpreter shutdown"
        if interrupted:
            manager.abort()
        else:
            manager.request_shutdown()
    try:
        for manager in managers:
            manager.join()
    except KeyboardInterrupt:
        for manager in managers:
            manager.abort()
        for manager in managers:
            manager.join()


def _fail_from_outside(future: JobFuture[Any], error: BaseException) -> None:
    """Fail ``future`` from a thread other than its manager's; a future already done is left alone."""
    try:
        with future._condition:
            if future.done():
                return
            if not future.running() and not future.set_running_or_notify_cancel():
                return
        future.set_exception(error)
    except (InvalidStateError, RuntimeError):
        pass  # its manager settled it at the same moment
