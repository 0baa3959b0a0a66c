"""Running one function over many inputs: ``map``, ``imap_unordered`` and ``batch``.

Tiny jobs cost more to send than to run, so inputs travel in chunks. Chunk
sizes are measured, not guessed: the first chunks hold one input each; once
some have come back, the size is set so that a chunk takes about
``TARGET_CHUNK_SECONDS`` in a worker (bounded so that every worker still gets
several chunks). A bounded number of chunks is in flight at any time, so an
endless input iterator never fills memory.

``map`` takes all its inputs at once, as the standard library does (jobs run
even if nobody reads the results); its chunks are submitted as earlier ones
complete. ``imap_unordered`` and ``batch`` read their input lazily, in the
consumer's thread.

With ``progress=``, each run has a ``Tracker``:
every submitted chunk is watched (running while a worker holds it); ``map``
and ``imap_unordered`` settle a chunk's inputs when its future ends, ``batch``
settles each input when its outcome is known (a failed attempt it retries is
not a failure yet).
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import BrokenExecutor, CancelledError, Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .errors import JobTimeout, WorkerCrashed
from .futures import JobFuture, cancel_all
from .job_progress import ProgressArg, Tracker, check_progress, make_tracker, total_of

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["TARGET_CHUNK_SECONDS", "Outcome", "imap_unordered", "iterate_in_order", "map_ordered", "run_batch"]

T = TypeVar("T")

TARGET_CHUNK_SECONDS = 0.01
MAX_CHUNK = 50_000


# ----------------------------------------------------------------- in workers


def _call_chunk(fn: Callable[..., Any], chunk: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Run ``fn(*args)`` for each args of the chunk; the first exception ends the chunk (stdlib map)."""
    return list(itertools.starmap(fn, chunk))


def _call_chunk1(fn: Callable[[Any], Any], chunk: Sequence[Any]) -> list[Any]:
    """``_call_chunk`` for one iterable: no argument tuples to build, pickle and unpack."""
    return list(map(fn, chunk))


def _call_chunk_recording(
    fn: Callable[..., Any], chunk: list[Any], star: bool
) -> list[tuple[bool, Any, float, float]]:
    """Run ``fn`` on each input, recording per input (ok, value or error record, wall s, cpu s)."""
    out: list[tuple[bool, Any, float, float]] = []
    perf, cpu = time.perf_counter, time.process_time
    for item in chunk:
        t0, c0 = perf(), cpu()
        try:
            if star:
                value = fn(*item) if isinstance(item, (list, tuple)) else fn(**item)
            else:
                value = fn(item)
            out.append((True, value, perf() - t0, cpu() - c0))
        except Exception as exc:
            record = (
                type(exc).__name__,
                str(exc),
                "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            )
            out.append((False, record, perf() - t0, cpu() - c0))
    return out


# ----------------------------------------------------------------- sizing


class Chunker:
    """Chooses chunk sizes from the measured time per input."""

    def __init__(self, fixed: int | None, workers: int, total: int | None = None) -> None:
        if fixed is not None and (isinstance(fixed, bool) or not isinstance(fixed, int) or fixed < 1):
            raise ValueError(f"chunksize must be a positive int, got {fixed!r}")
        self.fixed = fixed
        self.workers = workers
        self.total = total
        self.per_item: float | None = None
        self._seconds = 0.0
        self._items = 0
        self._lock = threading.Lock()

    def next_size(self) -> int:
        if self.fixed is not None:
            return self.fixed
        per_item = self.per_item
        if per_item is None:
            # Probe: one input per job until the first ones come back and say
            # how long an input takes (slow inputs must never queue up in one chunk).
            return 1
        size = int(TARGET_CHUNK_SECONDS / max(per_item, 1e-7))
        if self.total is not None:
            # Keep at least four chunks per worker so the last ones balance.
            size = min(size, max(1, self.total // (self.workers * 4)))
        return max(1, min(size, MAX_CHUNK))

    def record(self, items: int, seconds: float) -> None:
        if items <= 0:
            return
        with self._lock:
            # Cumulative average: big chunks weigh more than the small probes,
            # whose time is mostly the fixed cost of a job.
            self._seconds += seconds
            self._items += items
            self.per_item = self._seconds / self._items


def _chunk_seconds(future: Future[Any]) -> float | None:
    stats = getattr(future, "stats", None)
    return None if stats is None else float(stats.wall_time)


# ----------------------------------------------------------------- map


class _OrderedFeeder:
    """Submits ``map``'s chunks as earlier ones complete; the consumer reads them in order."""

    def __init__(
        self,
        pool: Pool,
        fn: Callable[..., Any],
        items: Sequence[Any],
        chunksize: int | None,
        runner: Callable[[Callable[..., Any], Sequence[Any]], list[Any]],
        tracker: Tracker | None,
    ) -> None:
        self.pool = pool
        self.tracker = tracker
        self.fn = fn
        self.items = items
        self.runner = runner
        self.position = 0
        workers = pool.max_workers
        if chunksize is None and getattr(pool.config, "max_tasks_per_child", None) is not None:
            # max_tasks_per_child counts jobs: keep one input per job, as the stdlib's map does.
            chunksize = 1
        self.chunker = Chunker(chunksize, workers, len(items))
        self.max_in_flight = workers * 2 + 2
        # A subclass or wrapper that overrides submit() (a progress bar counting
        # jobs, say; tqdm's process_map replaces it on the instance) expects
        # map() to go through it, as the standard library's map does: then
        # every chunk is submitted at once, through submit().
        from .pool import Pool

        self.through_submit = type(pool).submit is not Pool.submit or "submit" in vars(pool)
        if self.through_submit:
            self.max_in_flight = len(items) + 1
        self.in_flight = 0
        self.chunks: list[tuple[Future[list[Any]], int]] = []
        self.stopped = False
        self.error: BaseException | None = None
        self.cond = threading.Condition(threading.RLock())

    def pump(self, *, first: bool = False) -> None:
        """Submit chunks up to the in-flight bound.

        The first call (in the caller's thread) lets a refusal (pool shut down,
        broken) reach the caller, as ``Executor.map`` does; later calls run in
        completion callbacks, where a refusal just stops the feed.
        """
        with self.cond:
            while not self.stopped and self.in_flight < self.max_in_flight:
                if self.position >= len(self.items):
                    self.stopped = True
                    break
                size = self.chunker.next_size()
                chunk = self.items[self.position : self.position + size]
                self.position += len(chunk)
                try:
                    if self.through_submit:
                        future = self.pool.submit(self.runner, self.fn, chunk)
                    else:
                        future = self.pool._submit(
                            self.runner,
                            (self.fn, chunk),
                            {},
                            None,
                            None,
                            None,
                            0,
                            accepted_before_shutdown=not first,
                        )
                except (RuntimeError, BrokenExecutor) as error:
                    self.stopped = True  # the pool shut down or broke under us
                    self.error = error
                    if first:
                        raise
                    break
                self.in_flight += 1
                self.chunks.append((future, len(chunk)))
                if self.tracker is not None:
                    self.tracker.watch(future, len(chunk))
                future.add_done_callback(functools.partial(self._done, count=len(chunk)))
            self.cond.notify_all()

    def _done(self, future: Future[Any], *, count: int) -> None:
        seconds = _chunk_seconds(future)
        if seconds is not None:
            self.chunker.record(count, seconds)
        with self.cond:
            self.in_flight -= 1
        if not future.cancelled():
            self.pump()
        else:
            with self.cond:
                self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            chunks = list(self.chunks)
        cancel_all(future for future, _ in chunks)

    def chunk(self, index: int, deadline: float | None) -> tuple[Future[list[Any]], int] | None:
        with self.cond:
            while index >= len(self.chunks):
                if self.stopped and self.in_flight == 0 and index >= len(self.chunks):
                    return None
                if self.stopped and index >= len(self.chunks):
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise FuturesTimeoutError()
                self.cond.wait(remaining)
            return self.chunks[index]


def map_ordered(
    pool: Pool,
    fn: Callable[..., T],
    iterables: tuple[Iterable[Any], ...],
    *,
    timeout: float | None,
    chunksize: int | None,
    progress: ProgressArg = None,
) -> Iterator[T]:
    if not callable(fn):
        raise TypeError(f"{fn!r} is not callable")
    check_progress(progress)
    deadline = None if timeout is None else time.monotonic() + timeout
    runner: Callable[[Callable[..., Any], Sequence[Any]], list[Any]]
    items: Sequence[Any]
    if len(iterables) == 1:
        # Taken now, as the stdlib does; a range is already immutable and
        # sliceable, a list is copied (pointers only) so later edits do not count.
        source = iterables[0]
        items = source if isinstance(source, (range, tuple)) else list(source)
        runner = _call_chunk1
    else:
        items = list(zip(*iterables, strict=False))
        runner = _call_chunk
    tracker = make_tracker(progress, "map", len(items))
    feeder = _OrderedFeeder(pool, fn, items, chunksize, runner, tracker)
    try:
        feeder.pump(first=True)
    except BaseException:
        if tracker is not None:
            tracker.close()
        raise
    if not items:
        if tracker is not None:
            tracker.close()
        return iter(())
    return _map_results(feeder, deadline, len(items))


def _map_results(feeder: _OrderedFeeder, deadline: float | None, total: int) -> Iterator[Any]:
    index = 0
    seen = 0
    try:
        while seen < total:
            entry = feeder.chunk(index, deadline)
            if entry is None:
                # The feed stopped before every input was sent: say so, never end quietly short.
                if feeder.error is not None:
                    raise feeder.error
                raise CancelledError(f"map stopped after {seen} of {total} inputs")
            future, count = entry
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            results = future.result(remaining)
            index += 1
            seen += count
            # Drop the references so a long map does not keep every result alive:
            # the chunk's future, and each result once it has been handed out.
            feeder.chunks[index - 1] = (_DONE, count)
            del future
            results.reverse()
            while results:
                yield results.pop()
    finally:
        if seen < total:
            feeder.stop()
        if feeder.tracker is not None:
            feeder.tracker.close()


_DONE: Future[Any] = Future()
_DONE.set_result([])


def iterate_in_order(futures: list[JobFuture[T]], timeout: float | None) -> Iterator[T]:
    """Yield each future's result in order (stdlib ``map`` semantics); cancel the rest on exit."""
    deadline = None if timeout is None else time.monotonic() + timeout

    def results() -> Iterator[T]:
        try:
            futures.reverse()
            while futures:
                future = futures[-1]
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                yield future.result(remaining)
                futures.pop()
        finally:
            cancel_all(futures)

    return results()


# ----------------------------------------------------------------- lazy feeders


class _LazyFeeder:
    """Reads an input iterator lazily (in the consumer's thread) and keeps a bounded number of chunks in flight."""

    def __init__(
        self,
        pool: Pool,
        submit_chunk: Callable[[list[Any]], Future[Any]],
        iterable: Iterable[Any],
        chunksize: int | None,
        max_in_flight: int | None,
        tracker: Tracker | None = None,
        *,
        settles: bool = True,
    ) -> None:
        self.source = enumerate(iterable)
        self.tracker = tracker
        self.settles = settles  # False: the consumer settles inputs itself (batch)
        self.read = 0
        self.submit_chunk = submit_chunk
        workers = pool.max_workers
        self.chunker = Chunker(chunksize, workers)
        self.max_in_flight = max_in_flight or workers * 2 + 2
        self.in_flight = 0
        self.exhausted = False
        self.completed: queue.SimpleQueue[tuple[Future[Any], list[tuple[int, Any]]]] = queue.SimpleQueue()

    def pump(self) -> None:
        while not self.exhausted and self.in_flight < self.max_in_flight:
            size = self.chunker.next_size()
            chunk = list(itertools.islice(self.source, size))
            if not chunk:
                self.exhausted = True
                if self.tracker is not None:
                    self.tracker.set_total(self.read)
                return
            self.read += len(chunk)
            future = self.submit_chunk([item for _, item in chunk])
            self.in_flight += 1
            if self.tracker is not None:
                self.tracker.watch(future, len(chunk), settles=self.settles)
            future.add_done_callback(functools.partial(self._done, chunk=chunk))

    def _done(self, future: Future[Any], *, chunk: list[tuple[int, Any]]) -> None:
        seconds = _chunk_seconds(future)
        if seconds is not None:
            self.chunker.record(len(chunk), seconds)
        self.completed.put((future, chunk))

    def next_completed(self) -> tuple[Future[Any], list[tuple[int, Any]]] | None:
        self.pump()
        if self.in_flight == 0:
            return None
        entry = self.completed.get()
        self.in_flight -= 1
        return entry


def imap_unordered(
    pool: Pool,
    fn: Callable[[Any], T],
    iterable: Iterable[Any],
    *,
    chunksize: int | None,
    progress: ProgressArg = None,
) -> Iterator[T]:
    if not callable(fn):
        raise TypeError(f"{fn!r} is not callable")
    check_progress(progress)

    def submit_chunk(items: list[Any]) -> Future[Any]:
        return pool.submit(_call_chunk, fn, [(item,) for item in items])

    feeder = _LazyFeeder(pool, submit_chunk, iterable, chunksize, None)
    total = total_of(iterable)

    def results() -> Iterator[T]:
        # The tracker starts with the first result asked for: a generator never
        # started submits nothing, and must leave no thread behind.
        feeder.tracker = make_tracker(progress, "imap_unordered", total)
        try:
            while True:
                entry = feeder.next_completed()
                if entry is None:
                    return
                future, _ = entry
                yield from future.result()
        finally:
            if feeder.tracker is not None:
                feeder.tracker.close()

    return results()


# ----------------------------------------------------------------- batch


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What happened to one input of [`Pool.batch`][poolkit.Pool.batch].

    ``ok`` tells which fields matter: ``value`` when it succeeded; else
    ``error`` (the exception's type name), ``message`` and ``traceback``.
    ``attempts`` counts runs (more than 1 after retries).
    """

    index: int
    input: Any
    ok: bool
    value: T | None = None
    error: str | None = None
    message: str | None = None
    traceback: str | None = None
    attempts: int = 1
    worker_id: int | None = None
    pid: int | None = None
    wall_time: float | None = None
    cpu_time: float | None = None


def run_batch(
    pool: Pool,
    fn: Callable[[Any], T],
    iterable: Iterable[Any],
    *,
    retries: int,
    retry_exceptions: bool,
    timeout: float | None,
    ordered: bool,
    chunksize: int | None,
    max_in_flight: int | None,
    star: bool = False,
    progress: ProgressArg = None,
) -> Iterator[Outcome[T]]:
    """The engine of [`Pool.batch`][poolkit.Pool.batch] (and of ``poolkit run``)."""
    if not callable(fn):
        raise TypeError(f"{fn!r} is not callable")
    check_progress(progress)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a non-negative int, got {retries!r}")
    if timeout is not None and chunksize is None:
        chunksize = 1  # a timeout is per input: never let a chunk share it
    options = pool.options(timeout=timeout, retries=retries)

    def submit_chunk(items: list[Any]) -> Future[Any]:
        return options.submit(_call_chunk_recording, fn, items, star)

    feeder = _LazyFeeder(pool, submit_chunk, iterable, chunksize, max_in_flight, settles=False)
    total = total_of(iterable)
    return _batch_outcomes(pool, feeder, fn, retries, retry_exceptions, timeout, ordered, star, progress, total)


def _batch_outcomes(
    pool: Pool,
    feeder: _LazyFeeder,
    fn: Callable[[Any], Any],
    retries: int,
    retry_exceptions: bool,
    timeout: float | None,
    ordered: bool,
    star: bool,
    progress: ProgressArg,
    total: int | None,
) -> Iterator[Outcome[Any]]:
    tracker = feeder.tracker = make_tracker(progress, "batch", total)
    try:
        yield from _batch_loop(pool, feeder, fn, retries, retry_exceptions, timeout, ordered, star, tracker)
    finally:
        if tracker is not None:
            tracker.close()


def _batch_loop(
    pool: Pool,
    feeder: _LazyFeeder,
    fn: Callable[[Any], Any],
    retries: int,
    retry_exceptions: bool,
    timeout: float | None,
    ordered: bool,
    star: bool,
    tracker: Tracker | None,
) -> Iterator[Outcome[Any]]:
    waiting: dict[int, Outcome[Any]] = {}
    next_index = 0
    # Single inputs re-run on their own (after a chunk's worker died, or to retry an exception).
    solo: dict[Future[Any], tuple[int, Any, int]] = {}
    solo_done: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()

    def submit_solo(index: int, item: Any, attempt: int, retries_left: int) -> None:
        future = pool.options(timeout=timeout, retries=retries_left).submit(
            _call_chunk_recording, fn, [item], star
        )
        solo[future] = (index, item, attempt)
        if tracker is not None:
            tracker.watch(future, 1, settles=False)
        future.add_done_callback(solo_done.put)

    def outcomes_of(future: Future[Any], chunk: list[tuple[int, Any]], attempt: int) -> list[Outcome[Any]]:
        stats = getattr(future, "stats", None)
        worker_id = stats.worker_id if stats else getattr(future, "worker_id", None)
        pid = stats.pid if stats else getattr(future, "pid", None)
        attempts = (stats.attempt if stats else attempt) + attempt - 1
        try:
            records = future.result()
        except (WorkerCrashed, JobTimeout, CancelledError) as exc:
            if len(chunk) > 1:
                # Find the input that killed the worker: run each one alone.
                for index, item in chunk:
                    submit_solo(index, item, attempt, retries)
                return []
            index, item = chunk[0]
            name = "Cancelled" if isinstance(exc, CancelledError) else type(exc).__name__
            return [
                Outcome(index, item, False, None, name, str(exc), None, attempts, worker_id, pid)
            ]
        except Exception as exc:  # pickling trouble: every input of the chunk shares it
            return [
                Outcome(index, item, False, None, type(exc).__name__, str(exc), None, attempts, worker_id, pid)
                for index, item in chunk
            ]
        out = []
        for (index, item), (ok, value, wall, cpu) in zip(chunk, records, strict=False):
            if ok:
                out.append(Outcome(index, item, True, value, None, None, None, attempts, worker_id, pid, wall, cpu))
            elif retry_exceptions and attempt <= retries:
                submit_solo(index, item, attempt + 1, 0)
            else:
                error, message, tb = value
                out.append(
                    Outcome(index, item, False, None, error, message, tb, attempts, worker_id, pid, wall, cpu)
                )
        return out

    def release(batch: list[Outcome[Any]]) -> Iterator[Outcome[Any]]:
        nonlocal next_index
        if tracker is not None:
            for outcome in batch:  # each outcome is final here: retried inputs are not in it
                tracker.settle(ok=outcome.ok)
        if not ordered:
            yield from batch
            return
        for outcome in batch:
            waiting[outcome.index] = outcome
        while next_index in waiting:
            yield waiting.pop(next_index)
            next_index += 1

    while True:
        while not solo_done.empty():
            future = solo_done.get()
            index, item, attempt = solo.pop(future)
            yield from release(outcomes_of(future, [(index, item)], attempt))
        entry = None if feeder.exhausted and feeder.in_flight == 0 else feeder.next_completed()
        if entry is None:
            if not solo:
                break
            future = solo_done.get()
            index, item, attempt = solo.pop(future)
            yield from release(outcomes_of(future, [(index, item)], attempt))
            continue
        future, chunk = entry
        yield from release(outcomes_of(future, chunk, 1))
