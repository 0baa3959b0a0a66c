"""The caller's side: ``DaskPool``, a poolkit pool whose jobs run on a Dask cluster.

Each job is one Dask task (``node.run_job``); the futures it returns are
resolved by the delivery thread (``delivery.py``). Cancelling a job that may
already have reached a node asks every node first (``node.claim_on_node``).
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import re
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

import distributed

from ..config import PoolConfig
from ..futures import JobFuture, cancel_all
from ..pool import JobOptions, Pool
from ..stats import PoolStats
from .delivery import Delivery
from .futures import DaskJobFuture, TrackedJob
from .node import NodePool, claim_on_node, node_stats, run_job

__all__ = ["DEFAULT_PROGRESS_INTERVAL", "DaskJobOptions", "DaskPool"]

T = TypeVar("T")

log = logging.getLogger("poolkit.dask")

DEFAULT_PROGRESS_INTERVAL = 0.05
"""Seconds between two progress messages of one job through the scheduler.

A job may call ``report_progress`` in a tight loop; locally that costs a pipe
write, on a cluster every message crosses the scheduler. Values in between are
coalesced (the latest wins), and the last one always arrives with the result.
"""


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
        max_memory_per_child: retire a child whose memory (as for Pool) after a job is above
            this (bytes, or ``"512MiB"``).
        memory_limit_per_child: kill a child whose memory goes above this while a
            job runs; that job fails with
            [`MemoryLimitExceeded`][poolkit.MemoryLimitExceeded].
        memory_check_interval: seconds between two samples of a busy child's memory.
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
        self._jobs: dict[int, TrackedJob] = {}
        self._given_ids: set[str] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when the last job is forgotten
        # The node pools' last figures, for stats() after shutdown.
        self._final_nodes: dict[str, PoolStats] = {}
        self._shutdown = False
        self._closed = False
        self._close_lock = threading.Lock()
        self.counters: dict[str, int] = dict.fromkeys(
            ("submitted", "done", "failed", "crashed", "timed_out", "cancelled"), 0
        )
        self._delivery = Delivery(
            client, self._plugin_name, self._jobs, self._lock, self._idle, self.counters,
            f"poolkit-dask-{slug}",
        )
        try:
            # Subscribe first: the scheduler handles our messages in order, so no
            # "started" or progress event of a job can precede the subscription.
            client.subscribe_topic(self._topic, self._delivery.event)
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

    def share(self, obj: Any) -> Any:
        """Not available on a DaskPool: raises ``NotImplementedError``.

        ``Pool.share`` places an object in one machine's shared memory; a
        DaskPool's jobs run on many machines and their data travels through
        Dask. Scatter the object instead (``client.scatter(obj,
        broadcast=True)``) and pass the Dask future to the jobs: Dask keeps
        one copy per node.

        Args:
            obj: the object that would have been shared.
        """
        raise NotImplementedError(
            "DaskPool.share is not available: a DaskPool's jobs run on several machines and "
            "their data travels through Dask; use client.scatter(obj, broadcast=True) and "
            "pass the Dask future to the jobs (Dask keeps one copy per node)"
        )

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> DaskJobFuture[T]:
        """Run ``fn(*args, **kwargs)`` in a poolkit child on some Dask worker.

        Dask futures among the arguments are replaced by their values on the
        node (Dask moves the data). Per-job options go through [`options`][poolkit.dask.DaskPool.options].

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
        future._terminate = functools.partial(self._delivery.terminate, seq)
        future._cancel_many = self._cancel_pending
        job = TrackedJob(seq, future)
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
        dask_future.add_done_callback(functools.partial(self._delivery.dask_done, seq))
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
        replies: dict[str, PoolStats | None] = self._client.run(node_stats, self._plugin_name)
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
        if hasattr(self, "_delivery"):
            self._delivery.stop(timeout)
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
                claim_on_node, self._plugin_name, [job.seq for job in asked]
            )
        except Exception:
            log.debug("could not ask the nodes to cancel jobs; none cancelled", exc_info=True)
            return
        started = {seq for seqs in replies.values() for seq in seqs}
        for job in asked:
            if job.seq not in started and job.dask_future.status != "finished":
                JobFuture.cancel(job.future)

    # ------------------------------------------------------------ notices (any thread)

    def _caller_done(self, seq: int, future: Future[Any]) -> None:
        self._release_id(future)
        if future.cancelled():
            self._delivery.cancelled(seq)

    def _release_id(self, future: Future[Any]) -> None:
        if isinstance(future, JobFuture):
            with self._lock:
                self._given_ids.discard(future.job_id)


class DaskJobOptions(JobOptions):
    """Per-job options bound to a [`DaskPool`][poolkit.dask.DaskPool]; made by [`DaskPool.options`][poolkit.dask.DaskPool.options]."""

    _pool: DaskPool

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> DaskJobFuture[T]:
        return self._pool._submit(
            fn, args, kwargs, self.timeout, self.job_id, self.job_type, self.retries
        )

