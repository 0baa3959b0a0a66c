"""Run poolkit jobs on a Dask distributed cluster, with poolkit's isolation on every node.

``DaskPool(address_or_client, **pool_options)`` has [`Pool`][poolkit.Pool]'s API
(``submit``, ``map``, ``options``, ``batch``, ``stats``, ``shutdown``, the
``concurrent.futures.Executor`` interface) but its jobs run on the workers of a
Dask cluster.

How a job travels (see ``docs/dask.md`` for the why):

* ``DaskPool`` registers a Dask ``WorkerPlugin`` (``NodePool``) with the pool
  options. On every Dask worker, present and future, the plugin starts a local
  [`Pool`][poolkit.Pool] sized to the worker's thread count.
* Each job is one Dask task (``run_job``). The task hands the job to its
  worker's local pool and waits, so a segfault, a leak or a timeout kills a
  poolkit child, never the Dask worker, and ``max_tasks_per_child``, the memory
  limits and the timeouts mean the same on every node as on one machine.
* The task returns an *envelope* (value or the job's exception, its remote
  traceback, the job's stats, the last progress value) instead of raising:
  pickling drops ``__cause__``, so the envelope carries the traceback text and
  the caller chains it again; and the caller-side future gets its ``stats``
  whether the job succeeded or not. Dask itself only ever sees a task fail when
  the task could not run the job at all (no pool on that worker, a broken pool).
* Dask does what it is good at: placement, moving arguments (a Dask future
  among the arguments becomes its value), and worker loss: a task whose Dask
  worker dies is run again elsewhere, up to the scheduler's
  ``allowed-failures``; past that the caller sees ``DaskJobLost``.
* "Started" and progress messages travel as Dask events
  (``Worker.log_event`` -> scheduler -> ``Client.subscribe_topic``); the
  caller's future gets ``running()``, ``progress`` and its progress callbacks.

On the caller's side one delivery thread owns the futures: it takes Dask's
done notices, cancellations and events from one queue, gathers finished
results in batches (one round trip for many jobs) and resolves the futures, so
that progress callbacks always run before the job's result is set.

This module imports ``distributed``; ``import poolkit`` never imports it.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import itertools
import logging
import pickle
import queue
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError, Executor, Future, InvalidStateError
from typing import Any, TypeVar

import distributed
from distributed import WorkerPlugin, get_worker

from .config import PoolConfig
from .errors import BrokenPool, JobTimeout, PoolkitError, RemoteTraceback, WorkerCrashed
from .futures import JobFuture, cancel_all
from .pool import JobOptions, Pool
from .serialization import dumps, loads
from .stats import JobStats, PoolStats

__all__ = ["CancelledBeforeStart", "DaskJobFuture", "DaskJobLost", "DaskJobOptions", "DaskPool", "NodePool", "run_job"]

T = TypeVar("T")

log = logging.getLogger("poolkit.dask")

DEFAULT_PROGRESS_INTERVAL = 0.05
"""Seconds between two progress messages of one job through the scheduler.

A job may call ``report_progress`` in a tight loop; locally that costs a pipe
write, on a cluster every message crosses the scheduler. Values in between are
coalesced (the latest wins), and the last one always arrives with the result.
"""


CLAIM_MEMORY = 120.0
"""Seconds a node remembers a job it finished, and a cancel claim for a job it has not seen.

A finished job matters only until the caller sees its Dask task finished (the
caller checks that too); a claim only until the caller's Dask-level cancel has
dropped the task, right after the claim. Both take milliseconds.
"""

FINISHED_KEPT = 100_000
"""At most this many finished jobs remembered per node, however fast they finish."""


class CancelledBeforeStart(CancelledError):
    """A node's answer for a job the caller cancelled before it started there (never run)."""


class DaskJobLost(WorkerCrashed):
    """Dask gave up on the job: its Dask worker died more often than ``allowed-failures``,
    or Dask cancelled it (scheduler gone, client closed, cluster restarted).

    A [`WorkerCrashed`][poolkit.WorkerCrashed] (so a ``BrokenProcessPool``): the job did
    not fail by itself, the machinery under it went away. The Dask error is the
    ``__cause__``.
    """


# ===================================================================== nodes


Envelope = tuple[
    bool, Any, "str | None", "JobStats | None", "int | None", "int | None", str, int, Any
]
"""(ok, value or exception, remote traceback, stats, worker id, pid, node, progress count, last progress)."""


class NodePool(WorkerPlugin):
    """A Dask worker plugin that hosts one local poolkit [`Pool`][poolkit.Pool].

    Registered by [`DaskPool`][poolkit.dask_backend.DaskPool]; Dask runs ``setup`` on every worker that
    is in the cluster or joins it later, and ``teardown`` when the
    ``DaskPool`` shuts down or the worker closes.
    """

    def __init__(
        self, plugin_name: str, pool_options: dict[str, Any], max_workers: int | None
    ) -> None:
        self.plugin_name = plugin_name
        self.pool_options = pool_options
        self.max_workers = max_workers
        # Made in setup(), on the worker: a plugin travels pickled, these do not pickle.
        self.pool: Pool | None = None
        self.running: dict[str, JobFuture[Any]] = {}
        self.lock = threading.Lock()
        # The caller's cancel() asks every node before it says yes (see claim()):
        # job seqs started here (running, or finished lately), and those claimed.
        self.started: set[int] = set()
        self.finished: dict[int, float] = {}
        self.claimed: dict[int, float] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        # The plugin travels to every node pickled; its lock and records start fresh there.
        return (NodePool, (self.plugin_name, self.pool_options, self.max_workers))

    def setup(self, worker: Any) -> None:
        size = self.max_workers or int(worker.state.nthreads)
        options = dict(self.pool_options)
        floor = options.get("min_workers")
        if floor is not None:
            options["min_workers"] = min(int(floor), size)
        # The Dask worker's event loop runs in its main thread: the node pool's
        # template gets the parent-death signal, so no child outlives the worker.
        self.pool = Pool(size, **options)

    async def teardown(self, worker: Any) -> None:
        pool = self.pool
        if pool is None:
            return
        self.terminate(list(self.running))
        # Joining the pool's manager blocks; keep the Dask worker's event loop free.
        await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)
        self.pool = None

    def terminate(self, job_ids: Iterable[str]) -> int:
        """Stop these jobs if they run here (kill their poolkit children); how many were found."""
        found = 0
        for job_id in job_ids:
            future = self.running.get(job_id)
            if future is not None:
                future.terminate()
                found += 1
        return found

    def claim(self, seqs: Iterable[int]) -> list[int]:
        """Promise the caller that these jobs will not start here; return those that already have.

        The caller's ``cancel()`` says yes only when no node has started the job,
        and a claimed job that reaches this node later is skipped, unrun.
        """
        now = time.monotonic()
        started: list[int] = []
        with self.lock:
            self._forget_old(now)
            for seq in seqs:
                if seq in self.started or seq in self.finished:
                    started.append(seq)
                else:
                    self.claimed[seq] = now
        return started

    def _forget_old(self, now: float) -> None:
        # Both dicts are in time order. A claim outlives the job's stay in Dask's
        # queues (the caller cancels the Dask task right after the claim), and a
        # finished job's result reaches the caller long before CLAIM_MEMORY.
        for record in (self.finished, self.claimed):
            while record:
                seq, when = next(iter(record.items()))
                if now - when < CLAIM_MEMORY:
                    break
                del record[seq]

    def run(
        self,
        worker: Any,
        topic: str,
        seq: int,
        job_id: str,
        job_type: str | None,
        timeout: float | None,
        retries: int,
        interval: float,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Envelope:
        """Run one job in the local pool and wait for it (in a Dask task thread)."""
        pool = self.pool
        if pool is None:
            raise BrokenPool(f"the poolkit pool on Dask worker {worker.address} is shut down")
        address = str(worker.address)
        with self.lock:
            if self.claimed.pop(seq, None) is not None:
                skipped = CancelledBeforeStart(f"job {job_id} was cancelled before it started")
                return (False, skipped, None, None, None, None, address, 0, None)
            self.started.add(seq)
        try:
            worker.log_event(topic, ("s", seq, job_id, address))
            local = pool.options(
                timeout=timeout, job_id=job_id, job_type=job_type, retries=retries
            ).submit(fn, *args, **kwargs)
            forwarder = _ProgressForwarder(worker, topic, seq, interval)
            local.add_progress_callback(forwarder.put)
            # The job may have reported before the callback was attached: send that value.
            forwarder.catch_up(local)
            local.add_done_callback(forwarder.finish)
            self.running[job_id] = local
            forwarder.follow()
        finally:
            self.running.pop(job_id, None)
            with self.lock:
                self.started.discard(seq)
                now = time.monotonic()
                self.finished[seq] = now
                if len(self.finished) > FINISHED_KEPT:
                    del self.finished[next(iter(self.finished))]
                self._forget_old(now)
        return _envelope(local, job_id, address, forwarder.count)


def _envelope(local: JobFuture[Any], job_id: str, address: str, count: int) -> Envelope:
    """What the caller gets back for a job that ran on this node (see ``Envelope``)."""
    tb: str | None = None
    value: Any
    if local.cancelled():
        ok, value = False, CancelledError(f"job {job_id} was terminated on {address}")
    elif (exc := local.exception()) is None:
        ok, value = True, local.result()
    else:
        ok, value = False, exc
        cause = exc.__cause__
        tb = cause.tb if isinstance(cause, RemoteTraceback) else None
        try:
            pickle.dumps(exc)
        except Exception as pickling_error:
            # It crossed the pool's pipe, so this is rare; never let it break the result path.
            value = PoolkitError(
                f"{type(exc).__name__}: {exc} (could not be pickled: {pickling_error!r})"
            )
    return (ok, value, tb, local.stats, local.worker_id, local.pid, address, count, local.progress)


class _ProgressForwarder:
    """Sends one job's progress values to the caller, at most one per ``interval``.

    ``put`` runs in the node pool's manager thread and must never wait; a value
    that comes too soon is kept (the latest wins) and sent by ``follow``,
    which runs in the Dask task thread until the job is done.
    """

    def __init__(self, worker: Any, topic: str, seq: int, interval: float) -> None:
        self.worker = worker
        self.topic = topic
        self.seq = seq
        self.interval = interval
        self.cond = threading.Condition(threading.RLock())
        self.count = 0
        self.pending: tuple[int, Any] | None = None
        self.next_send = 0.0
        self.done = False

    def put(self, _future: Any, value: Any) -> None:
        with self.cond:
            self.count += 1
            now = time.monotonic()
            if now >= self.next_send:
                self.pending = None
                self.send(self.count, value, now)
            else:
                self.pending = (self.count, value)
                self.cond.notify()

    def catch_up(self, future: JobFuture[Any]) -> None:
        with self.cond:
            value = future.progress
            if self.count == 0 and value is not None:
                self.put(future, value)

    def finish(self, _future: Any) -> None:
        with self.cond:
            self.done = True
            self.cond.notify()

    def follow(self) -> None:
        with self.cond:
            while not self.done:
                if self.pending is None:
                    self.cond.wait()
                    continue
                now = time.monotonic()
                if now < self.next_send:
                    self.cond.wait(self.next_send - now)
                    continue
                count, value = self.pending
                self.pending = None
                self.send(count, value, now)

    def send(self, count: int, value: Any, now: float) -> None:
        self.next_send = now + self.interval
        try:
            # Events must be msgpack-able: the value travels as pickle bytes.
            self.worker.log_event(self.topic, ("p", self.seq, count, dumps(value)))
        except Exception:
            log.exception("could not forward progress of job %s", self.seq)


def run_job(
    plugin_name: str,
    topic: str,
    seq: int,
    job_id: str,
    job_type: str | None,
    timeout: float | None,
    retries: int,
    interval: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Envelope:
    """The Dask task of one job: hand it to this worker's poolkit pool and wait."""
    worker = get_worker()
    plugin = worker.plugins.get(plugin_name)
    if not isinstance(plugin, NodePool):
        raise BrokenPool(
            f"Dask worker {worker.address} has no poolkit pool {plugin_name!r} "
            "(the DaskPool was shut down, or the plugin failed to start there)"
        )
    return plugin.run(
        worker, topic, seq, job_id, job_type, timeout, retries, interval, fn, args, kwargs
    )


async def _terminate_on_node(plugin_name: str, job_ids: list[str], dask_worker: Any = None) -> int:
    # A coroutine, so that Client.run(wait=False) takes it; it only signals, never blocks.
    plugin = dask_worker.plugins.get(plugin_name) if dask_worker is not None else None
    return plugin.terminate(job_ids) if isinstance(plugin, NodePool) else 0


def _claim_on_node(plugin_name: str, seqs: list[int], dask_worker: Any = None) -> list[int]:
    plugin = dask_worker.plugins.get(plugin_name) if dask_worker is not None else None
    return plugin.claim(seqs) if isinstance(plugin, NodePool) else []


def _node_stats(plugin_name: str, dask_worker: Any = None) -> PoolStats | None:
    plugin = dask_worker.plugins.get(plugin_name) if dask_worker is not None else None
    if not isinstance(plugin, NodePool) or plugin.pool is None:
        return None
    return plugin.pool.stats()


# ===================================================================== caller


class DaskJobFuture(JobFuture[T]):
    """The future of a job run through [`DaskPool`][poolkit.dask_backend.DaskPool]: a [`JobFuture`][poolkit.JobFuture]
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


class _Job:
    """One job as the caller's side tracks it (owned by the delivery thread once submitted)."""

    __slots__ = ("dask_future", "future", "progress_seen", "seq", "terminate_requested")

    def __init__(self, seq: int, future: DaskJobFuture[Any]) -> None:
        self.seq = seq
        self.future = future
        self.dask_future: Any = None
        self.progress_seen = 0
        self.terminate_requested = False


_live_pools: weakref.WeakSet[DaskPool] = weakref.WeakSet()


def _shutdown_all_at_exit() -> None:
    # Leave no node pools registered on a long-lived cluster when the caller exits.
    # No waiting and no cancelling here: removing the plugin stops the nodes' jobs,
    # and the delivery thread fails whatever is left with BrokenPool.
    for pool in list(_live_pools):
        try:
            pool._close(timeout=5)
        except Exception:
            pass


atexit.register(_shutdown_all_at_exit)


class DaskPool(Executor):
    """A poolkit pool whose jobs run on a Dask distributed cluster.

    Args:
        address_or_client: a scheduler address (``"tcp://10.0.0.1:8786"``), a
            ``distributed.Client`` (used as is and left open), or anything
            ``Client()`` accepts, such as a ``LocalCluster``.
        max_workers: poolkit children on each Dask worker; default: that
            worker's thread count (one Dask thread runs one job at a time, so
            more than that is never used).
        start_method: of the node pools; default ``"forkserver"`` (see
            ``docs/dask.md``: the template is then a fresh interpreter that does
            not inherit the Dask worker's sockets and threads).
        initializer: run once in each poolkit child before its first job.
        initargs: arguments for ``initializer``.
        preload: modules each node's template imports.
        finalizer: run in each child when it retires or the pool shuts down.
        finalargs: arguments for ``finalizer``.
        max_tasks_per_child: retire a child after this many jobs.
        recycle_jitter: 0..1; retire up to this fraction earlier, at random.
        max_memory_per_child: retire a child whose RSS after a job is above
            this (bytes, or ``"512MiB"``).
        memory_limit_per_child: kill a child whose RSS goes above this while a
            job runs; that job fails with
            [`MemoryLimitExceeded`][poolkit.MemoryLimitExceeded].
        memory_check_interval: seconds between two samples of a busy child's RSS.
        max_lifetime_per_child: retire a child after this many seconds.
        idle_timeout: a child idle this long exits (down to ``min_workers``).
        min_workers: the floor for ``idle_timeout``, per node.
        job_timeout: default per-job timeout in seconds.
        kill_grace: seconds between SIGTERM and SIGKILL when stopping a child.
        exit_timeout: seconds a retiring child has to run its finalizer and
            exit before it is killed.
        start_timeout: seconds a new child has to become ready (its
            initializer included) before it is killed; None for no limit.
        stall_timeout: seconds each node pool's own thread may spend in a
            callback before that pool counts as stuck; None: wait for ever.
        name: a name for logs and stats; default ``"dask"``.
        progress_interval: at most one progress message per job per this many
            seconds crosses the scheduler; the last value always arrives.
        connect_timeout: seconds to wait for the scheduler when given an address.

    The child options mean what they mean for [`Pool`][poolkit.Pool], and apply
    to the pool on every node.
    """

    def __init__(
        self,
        address_or_client: Any,
        max_workers: int | None = None,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: Sequence[Any] = (),
        start_method: str | None = "forkserver",
        preload: Sequence[str] = (),
        finalizer: Callable[..., Any] | None = None,
        finalargs: Sequence[Any] = (),
        max_tasks_per_child: int | None = None,
        recycle_jitter: float = 0.1,
        max_memory_per_child: int | str | None = None,
        memory_limit_per_child: int | str | None = None,
        memory_check_interval: float = 0.01,
        max_lifetime_per_child: float | None = None,
        idle_timeout: float | None = None,
        min_workers: int | None = None,
        job_timeout: float | None = None,
        kill_grace: float = 1.0,
        exit_timeout: float = 10.0,
        start_timeout: float | None = 300.0,
        stall_timeout: float | None = 60.0,
        name: str | None = None,
        progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
        connect_timeout: float = 30.0,
    ) -> None:
        options: dict[str, Any] = dict(
            initializer=initializer,
            initargs=tuple(initargs) if isinstance(initargs, (list, tuple)) else initargs,
            start_method=start_method,
            preload=tuple(preload) if isinstance(preload, (list, tuple)) else preload,
            finalizer=finalizer,
            finalargs=tuple(finalargs) if isinstance(finalargs, (list, tuple)) else finalargs,
            max_tasks_per_child=max_tasks_per_child,
            recycle_jitter=recycle_jitter,
            max_memory_per_child=max_memory_per_child,
            memory_limit_per_child=memory_limit_per_child,
            memory_check_interval=memory_check_interval,
            max_lifetime_per_child=max_lifetime_per_child,
            idle_timeout=idle_timeout,
            min_workers=min_workers,
            job_timeout=job_timeout,
            kill_grace=kill_grace,
            exit_timeout=exit_timeout,
            start_timeout=start_timeout,
            stall_timeout=stall_timeout,
            name=name or "dask",
        )
        # Bad options are the caller's mistake: say so here, not on every node.
        config = PoolConfig.build(
            max_workers=max_workers if max_workers is not None else max(1, min_workers or 1),
            mp_context=None,
            **options,
        )
        if isinstance(progress_interval, bool) or not isinstance(progress_interval, (int, float)):
            raise TypeError(
                f"progress_interval must be a number of seconds, got {progress_interval!r}"
            )
        if progress_interval < 0:
            raise ValueError(f"progress_interval must be >= 0, got {progress_interval!r}")
        self._per_node = max_workers
        self._config = config
        self._job_timeout = config.job_timeout
        self._interval = float(progress_interval)
        self._name = config.name

        if isinstance(address_or_client, distributed.Client):
            client: Any = address_or_client
            self._owns_client = False
            if client.asynchronous:
                raise TypeError("DaskPool needs a synchronous distributed.Client")
        else:
            make_client: Any = distributed.Client
            client = make_client(address_or_client, timeout=connect_timeout, set_as_default=False)
            self._owns_client = True
        self._client: Any = client
        token = uuid.uuid4().hex[:8]
        slug = re.sub(r"[^A-Za-z0-9_.]+", "_", self._name)
        self._plugin_name = f"poolkit-{slug}-{token}"
        self._topic = self._plugin_name
        self._seq = itertools.count(1)
        self._jobs: dict[int, _Job] = {}
        self._given_ids: set[str] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when the last job is forgotten
        # The node pools' last figures, for stats() after shutdown.
        self._final_nodes: dict[str, PoolStats] = {}
        self._shutdown = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.counters: dict[str, int] = dict.fromkeys(
            ("submitted", "done", "failed", "crashed", "timed_out", "cancelled"), 0
        )
        self._delivery = threading.Thread(
            target=self._deliver, name=f"poolkit-dask-{slug}", daemon=True
        )
        self._delivery.start()
        try:
            # Subscribe first: the scheduler handles our messages in order, so no
            # "started" or progress event of a job can precede the subscription.
            client.subscribe_topic(self._topic, self._on_event)
            client.register_plugin(
                NodePool(self._plugin_name, options, max_workers), name=self._plugin_name
            )
        except BaseException:
            self._close(timeout=5)
            raise
        _live_pools.add(self)

    # ------------------------------------------------------------ properties

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` (to scatter data, watch the dashboard, ...)."""
        return self._client

    @property
    def config(self) -> PoolConfig:
        """The options every node's pool gets (``max_workers`` there is per node)."""
        return self._config

    @property
    def max_workers(self) -> int:
        """How many jobs the cluster runs at once now: the sum over Dask workers of
        their thread count (capped by ``max_workers`` per node); at least 1."""
        nthreads: dict[str, int] = self._client.nthreads()
        per_node = self._per_node
        total = sum(n if per_node is None else min(n, per_node) for n in nthreads.values())
        return max(1, total)

    # ------------------------------------------------------------ submit

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> DaskJobFuture[T]:
        """Run ``fn(*args, **kwargs)`` in a poolkit child on some Dask worker.

        Dask futures among the arguments are replaced by their values on the
        node (Dask moves the data). Per-job options go through [`options`][poolkit.dask_backend.DaskPool.options].

        Args:
            fn: the function to run; positional only.
            *args: its positional arguments (Dask futures allowed).
            **kwargs: its keyword arguments.
        """
        return self._submit(fn, args, kwargs, None, None, None, 0)

    def options(
        self,
        *,
        timeout: float | None = None,
        job_id: str | None = None,
        job_type: str | None = None,
        retries: int = 0,
    ) -> DaskJobOptions:
        """Per-job options: ``pool.options(timeout=30, job_type="backup").submit(fn, x)``.

        ``timeout`` and ``retries`` (re-runs after a crash or a timeout) act in
        the node's pool, exactly as in a local pool.

        Args:
            timeout: seconds the job may run; default: the pool's ``job_timeout``.
            job_id: the job's id; unique among unfinished jobs.
            job_type: a label for logs and ``current_job().job_type``.
            retries: how many times to run the job again after its child died
                or it timed out.
        """
        return DaskJobOptions(
            self, timeout=timeout, job_id=job_id, job_type=job_type, retries=retries
        )

    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        job_id: str | None,
        job_type: str | None,
        retries: int,
        accepted_before_shutdown: bool = False,
        subject: str | None = None,
    ) -> DaskJobFuture[Any]:
        """Submit one job (the signature of ``Pool._submit``, which ``poolkit.batch`` calls).

        ``accepted_before_shutdown``: the rest of a ``map`` that began before
        ``shutdown()``; it still runs, and ``shutdown(wait=True)`` waits for it.
        """
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        self._check_open(accepted_before_shutdown)
        seq = next(self._seq)
        if job_id is None:
            job_id = str(seq)
        else:
            with self._lock:
                if job_id in self._given_ids:
                    raise ValueError(f"job_id {job_id!r} is already in use by an unfinished job")
                self._given_ids.add(job_id)
        future: DaskJobFuture[Any] = DaskJobFuture(job_id, job_type, seq)
        if subject is not None:
            future._subject = subject
        future._terminate = functools.partial(self._request_terminate, seq)
        future._cancel_many = self._cancel_pending
        job = _Job(seq, future)
        if timeout is None:
            timeout = self._job_timeout
        with self._lock:
            if self._closed or (self._shutdown and not accepted_before_shutdown):
                self._given_ids.discard(job_id)
                raise RuntimeError("cannot schedule new futures after shutdown")
            # Known before Dask may start it, so that its first event finds it.
            self._jobs[seq] = job
            self.counters["submitted"] += 1
        name = re.sub(r"[^A-Za-z0-9_]+", "_", getattr(fn, "__name__", type(fn).__name__))
        try:
            dask_future = self._client.submit(
                run_job,
                self._plugin_name,
                self._topic,
                seq,
                job_id,
                job_type,
                timeout,
                retries,
                self._interval,
                fn,
                args,
                kwargs,
                key=f"poolkit-{name}-{self._plugin_name[-8:]}-{seq}",
                pure=False,
            )
        except Exception as exc:  # unpicklable function or argument: this future only
            if isinstance(exc, TypeError) and exc.__cause__ is not None:
                # Dask wraps the pickler's error in "Could not serialize ..."; give the
                # caller the pickler's own, as the standard library's executor does.
                exc = exc.__cause__  # type: ignore[assignment]
            with self._lock:
                self._jobs.pop(seq, None)
                self.counters["failed"] += 1
                if not self._jobs:
                    self._idle.notify_all()
            future.set_running_or_notify_cancel()
            future.set_exception(exc)
            self._release_id(future)
            return future
        job.dask_future = dask_future
        future.add_done_callback(functools.partial(self._caller_done, seq))
        dask_future.add_done_callback(functools.partial(self._dask_done, seq))
        return future

    def _check_open(self, accepted_before_shutdown: bool) -> None:
        if self._closed or (self._shutdown and not accepted_before_shutdown):
            raise RuntimeError("cannot schedule new futures after shutdown")

    # ------------------------------------------------------------ batch and asyncio
    # Pool's own methods: their bodies use only submit, _submit, options,
    # max_workers and config, which this class provides with the same meaning.
    map = Pool.map
    imap_unordered = Pool.imap_unordered
    batch = Pool.batch
    run = Pool.run
    as_completed_async = Pool.as_completed_async

    # ------------------------------------------------------------ stats

    def node_stats(self) -> dict[str, PoolStats]:
        """Each Dask worker's pool: ``{worker address: PoolStats}`` (one round trip to every node)."""
        replies: dict[str, PoolStats | None] = self._client.run(_node_stats, self._plugin_name)
        return {address: stats for address, stats in replies.items() if stats is not None}

    def stats(self) -> PoolStats:
        """The cluster as one pool.

        ``workers``, ``spawned`` and ``retired`` add up the node pools alive now
        (a lost Dask worker takes its figures with it; see ``node_stats``).
        The job counters are the caller's: every job submitted here, and how it
        ended as the caller saw it (a job lost with its node counts as crashed).
        """
        nodes = self._final_nodes if self._closed else self.node_stats()
        retired: dict[str, int] = {}
        for stats in nodes.values():
            for reason, count in stats.retired.items():
                retired[reason] = retired.get(reason, 0) + count
        with self._lock:
            futures = [job.future for job in self._jobs.values()]
            counters = dict(self.counters)
        running = sum(1 for future in futures if future.running())
        return PoolStats(
            workers=tuple(worker for stats in nodes.values() for worker in stats.workers),
            submitted=counters["submitted"],
            done=counters["done"],
            failed=counters["failed"],
            crashed=counters["crashed"],
            timed_out=counters["timed_out"],
            cancelled=counters["cancelled"],
            spawned=sum(stats.spawned for stats in nodes.values()),
            pending=sum(1 for future in futures if not future.done()) - running,
            running=running,
            retired=retired,
        )

    # ------------------------------------------------------------ lifecycle

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking jobs; let those submitted finish (or cancel the pending ones), then
        remove the node pools and, if this pool opened it, close the client.

        Args:
            wait: return once the node pools are removed; with False, the
                clean-up happens in a background thread.
            cancel_futures: cancel the jobs not started yet; running ones finish.
        """
        with self._lock:
            self._shutdown = True
            jobs = list(self._jobs.values())
        if cancel_futures:
            cancel_all(job.future for job in jobs)
        if wait:
            self._close_when_idle()
        else:
            threading.Thread(target=self._close_when_idle, daemon=True).start()

    def _close_when_idle(self) -> None:
        # Wait until every job is forgotten, not just done: a map that began
        # before shutdown() adds its next chunk in the done callback of the last.
        with self._idle:
            while self._jobs:
                self._idle.wait()
        self._close()

    def _close(self, timeout: float = 30.0) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._shutdown = True
        _live_pools.discard(self)
        client = self._client if hasattr(self, "_client") else None
        if client is not None and client.status == "running":
            try:
                client.unsubscribe_topic(self._topic)
            except Exception:
                log.debug("unsubscribe failed", exc_info=True)
            try:
                self._final_nodes = self.node_stats()
            except Exception:
                log.debug("could not read the node pools' last figures", exc_info=True)
            try:
                client.unregister_worker_plugin(self._plugin_name)
            except Exception:
                log.debug("could not remove the node pools", exc_info=True)
        self._inbox.put(("stop",))
        if threading.current_thread() is not self._delivery:
            self._delivery.join(timeout)
        if client is not None and self._owns_client:
            try:
                client.close(timeout=timeout)
            except Exception:
                log.debug("client close failed", exc_info=True)

    def __enter__(self) -> DaskPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(wait=True)

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "running"
        return f"<poolkit.DaskPool {self._name!r} on {self._client.scheduler.address} {state}>"

    # ------------------------------------------------------------ cancelling (any thread)

    def _cancel_pending(self, futures: list[DaskJobFuture[Any]]) -> None:
        """Cancel those of ``futures`` that no node has started, asking every node once.

        Each node either promises never to start a job (a claim: the job is
        skipped if it arrives later) or says it has started it; only jobs that
        no node has started are cancelled, the others stay as they are and end
        as usual. The Dask tasks of the cancelled ones are then dropped by the
        delivery thread (``_caller_done``). If a node cannot be asked, no
        promise is possible and nothing is cancelled.

        One window stays open: a Dask worker that joins the cluster between the
        claim and that Dask-level cancel made no promise, and the scheduler may
        give it the task (milliseconds, and only while the cluster grows).
        """
        with self._lock:
            jobs = [self._jobs.get(future._seq) for future in futures]
        asked = [
            job
            for job in jobs
            if job is not None
            and job.dask_future is not None
            and not job.future.done()
            and not job.future.running()
        ]
        if not asked:
            return
        try:
            replies: dict[str, list[int]] = self._client.run(
                _claim_on_node, self._plugin_name, [job.seq for job in asked]
            )
        except Exception:
            log.debug("could not ask the nodes to cancel jobs; none cancelled", exc_info=True)
            return
        started = {seq for seqs in replies.values() for seq in seqs}
        for job in asked:
            if job.seq not in started and job.dask_future.status != "finished":
                JobFuture.cancel(job.future)

    # ------------------------------------------------------------ notices (any thread)

    def _dask_done(self, seq: int, _dask_future: Any) -> None:
        self._inbox.put(("done", seq))

    def _caller_done(self, seq: int, future: Future[Any]) -> None:
        self._release_id(future)
        if future.cancelled():
            self._inbox.put(("cancel", seq))

    def _request_terminate(self, seq: int, _future: JobFuture[Any]) -> None:
        self._inbox.put(("terminate", seq))

    def _on_event(self, event: Any) -> None:
        # Runs on the client's event loop: hand over, never block it.
        self._inbox.put(("event", event[1]))

    def _release_id(self, future: Future[Any]) -> None:
        if isinstance(future, JobFuture):
            with self._lock:
                self._given_ids.discard(future.job_id)

    # ------------------------------------------------------------ delivery thread

    def _deliver(self) -> None:
        """The one owner of caller-side futures: events, cancellations and results, in arrival order."""
        while True:
            items = [self._inbox.get()]
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            done: list[int] = []
            terminate: dict[str, list[str]] = {}
            cancel: list[Any] = []
            stop = False
            for item in items:
                try:
                    kind = item[0]
                    if kind == "event":
                        self._take_event(item[1], terminate)
                    elif kind == "done":
                        done.append(item[1])
                    elif kind in ("cancel", "terminate"):
                        self._take_cancel(item[1], cancel, terminate)
                    elif kind == "stop":
                        stop = True
                except Exception:
                    log.exception("poolkit dask delivery: could not handle %r", item[:2])
            try:
                if cancel:
                    self._client.cancel(cancel)
                for node, job_ids in terminate.items():
                    self._client.run(
                        _terminate_on_node, self._plugin_name, job_ids, workers=[node], wait=False
                    )
            except Exception:
                log.debug("could not cancel or terminate remote jobs", exc_info=True)
            if done:
                self._resolve(done)
            if stop:
                self._abandon()
                return

    def _take_event(self, msg: Any, terminate: dict[str, list[str]]) -> None:
        kind, seq = msg[0], msg[1]
        with self._lock:
            job = self._jobs.get(seq)
        if kind == "s":
            _, _, job_id, node = msg
            if job is None:
                # Forgotten already: Dask cancelled it before its start reached us.
                terminate.setdefault(node, []).append(job_id)
                return
            future = job.future
            future.node = node
            if not _mark_running(future):
                # Cancelled while its start was on the way: stop it over there.
                terminate.setdefault(node, []).append(job_id)
        elif kind == "p":
            _, _, count, data = msg
            if job is None or job.future.done() or count <= job.progress_seen:
                return
            job.progress_seen = count
            job.future._set_progress(loads(data))

    def _take_cancel(self, seq: int, cancel: list[Any], terminate: dict[str, list[str]]) -> None:
        """The caller cancelled (or terminated) the job: Dask drops it if it has not
        started; if it has, its poolkit child on the node is killed."""
        with self._lock:
            job = self._jobs.get(seq)
        if job is None or job.terminate_requested:
            return
        job.terminate_requested = True
        if job.dask_future is not None:
            cancel.append(job.dask_future)
        node = job.future.node
        if node is not None:
            terminate.setdefault(node, []).append(job.future.job_id)

    def _resolve(self, seqs: list[int]) -> None:
        with self._lock:
            jobs = [self._jobs[seq] for seq in seqs if seq in self._jobs]
        finished = {
            job.seq: job.dask_future for job in jobs if job.dask_future.status == "finished"
        }
        envelopes: dict[int, Any] = {}
        if finished:
            try:
                # One round trip for every result that is ready (errors: looked at below).
                envelopes = self._client.gather(finished, errors="skip")
            except Exception as exc:
                for job in jobs:
                    if job.seq in finished:
                        self._end(
                            job,
                            DaskJobLost(
                                f"could not fetch the result of job {job.future.job_id}: {exc!r}"
                            ),
                            exc,
                        )
                return
        for job in jobs:
            try:
                envelope = envelopes.get(job.seq)
                if envelope is not None:
                    self._finish(job, envelope)
                    continue
                status = job.dask_future.status
                if status == "error":
                    self._end(job, self._dask_error(job, job.dask_future.exception()), None)
                elif status == "cancelled":
                    if job.future.cancelled():
                        self._forget(job, "cancelled")
                    else:
                        self._end(
                            job,
                            DaskJobLost(
                                f"Dask cancelled job {job.future.job_id} (client closed, scheduler lost or cluster restarted)",
                                job_id=job.future.job_id,
                            ),
                            None,
                        )
                else:
                    # Its result was lost after it finished: Dask computes it again.
                    job.dask_future.add_done_callback(functools.partial(self._dask_done, job.seq))
            except Exception as exc:
                log.exception("poolkit dask delivery: job %s", job.seq)
                self._end(
                    job,
                    DaskJobLost(f"job {job.future.job_id} could not be delivered: {exc!r}"),
                    exc,
                )

    def _dask_error(self, job: _Job, exc: BaseException) -> BaseException:
        if isinstance(exc, distributed.KilledWorker):
            lost = DaskJobLost(
                f"job {job.future.job_id}: {exc} (its Dask worker died more times than the "
                "scheduler's allowed-failures)",
                job_id=job.future.job_id,
            )
            lost.__cause__ = exc
            return lost
        return exc

    def _finish(self, job: _Job, envelope: Envelope) -> None:
        ok, value, tb, stats, worker_id, pid, node, count, progress = envelope
        future = job.future
        future.node = node
        future.worker_id = worker_id
        future.pid = pid
        future._node_stats = stats
        if count > job.progress_seen and not future.done():
            job.progress_seen = count
            future._set_progress(progress)
        if not ok and tb is not None:
            value.__cause__ = RemoteTraceback(tb)  # pickling dropped it on the way
        self._set(job, ok, value)

    def _end(self, job: _Job, exc: BaseException, cause: BaseException | None) -> None:
        if cause is not None:
            exc.__cause__ = cause
        self._set(job, False, exc)

    def _set(self, job: _Job, ok: bool, value: Any) -> None:
        """Resolve the caller's future, once; each job is counted under one outcome."""
        future = job.future
        if isinstance(value, CancelledBeforeStart) or (
            job.terminate_requested and isinstance(value, CancelledError)
        ):
            future._force_cancel()  # cancelled, or terminated on the node, as asked
        if not _mark_running(future):
            self._forget(job, "cancelled")
            return
        try:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        except InvalidStateError:  # terminated by the caller a moment ago
            self._forget(job, "cancelled")
            return
        if ok:
            self._forget(job, "done")
        elif isinstance(value, JobTimeout):
            self._forget(job, "timed_out")
        elif isinstance(value, WorkerCrashed):
            self._forget(job, "crashed")
        else:
            self._forget(job, "failed")

    def _forget(self, job: _Job, outcome: str) -> None:
        with self._lock:
            if self._jobs.pop(job.seq, None) is not None:
                self.counters[outcome] += 1
            if not self._jobs:
                self._idle.notify_all()

    def _abandon(self) -> None:
        """The pool is closing: no future may stay unresolved."""
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
            self._idle.notify_all()
        for job in jobs:
            future = job.future
            if not future.done() and _mark_running(future):
                future.set_exception(BrokenPool("the DaskPool was closed before this job finished"))


def _mark_running(future: Future[Any]) -> bool:
    """Move a future to RUNNING unless it is already; False if the caller cancelled it.

    Only the delivery thread calls it, so the checks and the move do not race
    with one another; a concurrent ``cancel()`` is settled by the future's lock.
    """
    if future.running():
        return True
    return future.set_running_or_notify_cancel()


class DaskJobOptions(JobOptions):
    """Per-job options bound to a [`DaskPool`][poolkit.dask_backend.DaskPool]; made by [`DaskPool.options`][poolkit.dask_backend.DaskPool.options]."""

    _pool: DaskPool

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> DaskJobFuture[T]:
        return self._pool._submit(
            fn, args, kwargs, self.timeout, self.job_id, self.job_type, self.retries
        )

