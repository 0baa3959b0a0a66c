"""The delivery thread: the one owner of a ``DaskPool``'s futures once they are submitted.

It takes Dask's done notices, the caller's cancellations and terminations and
the nodes' events (started, progress) from one queue, in arrival order;
gathers finished results in batches (one round trip for many jobs) and
resolves the futures, so that progress callbacks always run before the job's
result is set. Other threads only post to its queue (the methods under
"notices").
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from concurrent.futures import CancelledError, InvalidStateError
from typing import Any

import distributed

from ..errors import BrokenPool, JobTimeout, RemoteTraceback, WorkerCrashed
from ..serialization import loads
from .envelope import CancelledBeforeStart, Envelope
from .futures import DaskJobLost, TrackedJob, mark_running
from .node import terminate_on_node

__all__ = ["Delivery"]

log = logging.getLogger("poolkit.dask")


class Delivery:
    """One ``DaskPool``'s delivery thread.

    ``jobs``, ``lock``, ``idle`` and ``counters`` are the pool's: ``jobs``
    (seq -> job) is filled by ``submit`` and emptied here, both under
    ``lock``; ``idle`` is notified when the last job is forgotten.
    """

    def __init__(
        self,
        client: Any,
        plugin_name: str,
        jobs: dict[int, TrackedJob],
        lock: threading.Lock,
        idle: threading.Condition,
        counters: dict[str, int],
        thread_name: str,
    ) -> None:
        self._client = client
        self._plugin_name = plugin_name
        self._jobs = jobs
        self._lock = lock
        self._idle = idle
        self.counters = counters
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Resolve what is left (``BrokenPool``) and end the thread; wait up to ``timeout``."""
        self._inbox.put(("stop",))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------ notices (any thread)

    def dask_done(self, seq: int, _dask_future: Any) -> None:
        """Dask finished the job's task (a result, an error, or a cancel)."""
        self._inbox.put(("done", seq))

    def cancelled(self, seq: int) -> None:
        """The caller cancelled the job's future."""
        self._inbox.put(("cancel", seq))

    def terminate(self, seq: int, _future: Any) -> None:
        """The caller asked to stop the job wherever it runs."""
        self._inbox.put(("terminate", seq))

    def event(self, event: Any) -> None:
        """A node's event (started, progress). Runs on the client's event loop: hand over, never block it."""
        self._inbox.put(("event", event[1]))

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
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
                        terminate_on_node, self._plugin_name, job_ids, workers=[node], wait=False
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
            if not mark_running(future):
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
                    job.dask_future.add_done_callback(functools.partial(self.dask_done, job.seq))
            except Exception as exc:
                log.exception("poolkit dask delivery: job %s", job.seq)
                self._end(
                    job,
                    DaskJobLost(f"job {job.future.job_id} could not be delivered: {exc!r}"),
                    exc,
                )

    def _dask_error(self, job: TrackedJob, exc: BaseException) -> BaseException:
        if isinstance(exc, distributed.KilledWorker):
            lost = DaskJobLost(
                f"job {job.future.job_id}: {exc} (its Dask worker died more times than the "
                "scheduler's allowed-failures)",
                job_id=job.future.job_id,
            )
            lost.__cause__ = exc
            return lost
        return exc

    def _finish(self, job: TrackedJob, envelope: Envelope) -> None:
        future = job.future
        future.node = envelope.node
        future.worker_id = envelope.worker_id
        future.pid = envelope.pid
        future._node_stats = envelope.stats
        if envelope.progress_count > job.progress_seen and not future.done():
            job.progress_seen = envelope.progress_count
            future._set_progress(envelope.progress)
        value = envelope.value
        if not envelope.ok and envelope.traceback is not None:
            value.__cause__ = RemoteTraceback(envelope.traceback)  # pickling dropped it on the way
        self._set(job, envelope.ok, value)

    def _end(self, job: TrackedJob, exc: BaseException, cause: BaseException | None) -> None:
        if cause is not None:
            exc.__cause__ = cause
        self._set(job, False, exc)

    def _set(self, job: TrackedJob, ok: bool, value: Any) -> None:
        """Resolve the caller's future, once; each job is counted under one outcome."""
        future = job.future
        if isinstance(value, CancelledBeforeStart) or (
            job.terminate_requested and isinstance(value, CancelledError)
        ):
            future._force_cancel()  # cancelled, or terminated on the node, as asked
        if not mark_running(future):
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

    def _forget(self, job: TrackedJob, outcome: str) -> None:
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
            if not future.done() and mark_running(future):
                future.set_exception(BrokenPool("the DaskPool was closed before this job finished"))
