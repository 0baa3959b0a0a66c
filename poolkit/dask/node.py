"""The node side: what runs inside each Dask worker.

``DaskPool`` registers a Dask ``WorkerPlugin`` (:class:`NodePool`) with the pool
options. On every Dask worker, present and future, the plugin starts a local
[`Pool`][poolkit.Pool] sized to the worker's thread count. Each job is one
Dask task (:func:`run_job`): it hands the job to its worker's local pool and
waits, so a segfault, a leak or a timeout kills a poolkit child, never the Dask
worker. "Started" and progress messages travel as Dask events
(``Worker.log_event``); the outcome returns as an envelope (``envelope.py``).
The caller reaches the nodes through the functions at the end
(``terminate_on_node``, ``claim_on_node``, ``node_stats``), run with
``Client.run``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from distributed import WorkerPlugin, get_worker

from ..errors import BrokenPool
from ..futures import JobFuture
from ..pool import Pool
from ..serialization import dumps
from ..stats import PoolStats
from .envelope import Envelope, make_envelope, skipped

__all__ = ["CLAIM_MEMORY", "FINISHED_KEPT", "NodePool", "claim_on_node", "node_stats", "run_job", "terminate_on_node"]

log = logging.getLogger("poolkit.dask")

CLAIM_MEMORY = 120.0
"""Seconds a node remembers a job it finished, and a cancel claim for a job it has not seen.

A finished job matters only until the caller sees its Dask task finished (the
caller checks that too); a claim only until the caller's Dask-level cancel has
dropped the task, right after the claim. Both take milliseconds.
"""

FINISHED_KEPT = 100_000
"""At most this many finished jobs remembered per node, however fast they finish."""


class NodePool(WorkerPlugin):
    """A Dask worker plugin that hosts one local poolkit [`Pool`][poolkit.Pool].

    Registered by [`DaskPool`][poolkit.dask.DaskPool]; Dask runs ``setup`` on every worker that
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
                return skipped(job_id, address)
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
        return make_envelope(local, job_id, address, forwarder.count)


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


async def terminate_on_node(plugin_name: str, job_ids: list[str], dask_worker: Any = None) -> int:
    # A coroutine, so that Client.run(wait=False) takes it; it only signals, never blocks.
    plugin = dask_worker.plugins.get(plugin_name) if dask_worker is not None else None
    return plugin.terminate(job_ids) if isinstance(plugin, NodePool) else 0


def claim_on_node(plugin_name: str, seqs: list[int], dask_worker: Any = None) -> list[int]:
    plugin = dask_worker.plugins.get(plugin_name) if dask_worker is not None else None
    return plugin.claim(seqs) if isinstance(plugin, NodePool) else []


def node_stats(plugin_name: str, dask_worker: Any = None) -> PoolStats | None:
    plugin = dask_worker.plugins.get(plugin_name) if dask_worker is not None else None
    if not isinstance(plugin, NodePool) or plugin.pool is None:
        return None
    return plugin.pool.stats()
