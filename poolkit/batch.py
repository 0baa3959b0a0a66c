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
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import BrokenExecutor, CancelledError, Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic, NamedTuple, TypeVar

from .errors import JobTimeout, WorkerCrashed
from .futures import JobFuture, cancel_all
from .job_progress import Judge, ProgressArg, Tracker, check_progress, make_tracker, total_of
from .serialization import attach_remote_traceback, dumps_error, loads

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["PENDING", "TARGET_CHUNK_SECONDS", "Outcome", "imap_unordered", "iterate_in_order", "map_ordered", "run_batch"]

T = TypeVar("T")

TARGET_CHUNK_SECONDS = 0.01
MAX_CHUNK = 50_000


# ----------------------------------------------------------------- in workers


class ChunkStopped:
    """What a ``map`` chunk returns when one of its inputs raised.

    The results before that input are kept (the standard library, with one
    input per job, hands them out before it raises; so must a chunk), and the
    exception travels pickled by ``serialization.dumps_error``,
    the one rule every job's exception follows.
    """

    __slots__ = ("error", "results")

    def __init__(self, results: list[Any], error: bytes) -> None:
        self.results = results
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:
        return (ChunkStopped, (self.results, self.error))

    def error_object(self) -> BaseException:
        """The input's exception, with the worker's traceback as its ``__cause__``."""
        exc, tb = loads(self.error)
        return attach_remote_traceback(exc, tb)


def _call_chunk(fn: Callable[..., Any], chunk: Sequence[tuple[Any, ...]]) -> list[Any] | ChunkStopped:
    """Run ``fn(*args)`` for each args of the chunk; the first exception ends the chunk (stdlib map)."""
    results: list[Any] = []
    try:
        # list.extend keeps what it appended before the iterator raised.
        results.extend(itertools.starmap(fn, chunk))
    except BaseException as exc:  # SystemExit too: it is raised where the caller reaches it, as in the stdlib
        return ChunkStopped(results, dumps_error(exc))
    return results


def _call_chunk1(fn: Callable[[Any], Any], chunk: Sequence[Any]) -> list[Any] | ChunkStopped:
    """``_call_chunk`` for one iterable: no argument tuples to build, pickle and unpack."""
    results: list[Any] = []
    try:
        results.extend(map(fn, chunk))
    except BaseException as exc:
        return ChunkStopped(results, dumps_error(exc))
    return results


_Runner = Callable[[Callable[..., Any], Sequence[Any]], "list[Any] | ChunkStopped"]


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
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too: this input's failure
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
        runner: _Runner,
        tracker: Tracker | None,
    ) -> None:
        self.pool = pool
        self.tracker = tracker
        self.fn = fn
        self.items = items
        self.runner = runner
        self.position = 0
        workers = pool.max_workers
        if chunksize is None and (
            getattr(pool.config, "max_tasks_per_child", None) is not None
            or getattr(pool.config, "job_timeout", None) is not None
        ):
            # max_tasks_per_child counts jobs, and job_timeout is each input's
            # own: keep one input per job, as the stdlib's map does.
            chunksize = 1
        # Chunks of the caller's own size fail whole, as the stdlib's do; measured
        # chunks promise what one input per job gives (see _chunk_results).
        self.as_if_one_per_job = chunksize is None
        self.chunker = Chunker(chunksize, workers, len(items))
        self.max_in_flight = workers * 2 + 2
        # Then every chunk is submitted at once, through submit().
        self.through_submit = _submit_overridden(pool)
        if self.through_submit:
            self.max_in_flight = len(items) + 1
        self.in_flight = 0
        # (future, position of its first input, number of inputs), in input order
        self.chunks: list[tuple[Future[Any], int, int]] = []
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
                start = self.position
                chunk = self.items[start : start + size]
                self.position += len(chunk)
                try:
                    future = self.submit(start, len(chunk), accepted_before_shutdown=not first)
                except (RuntimeError, BrokenExecutor) as error:
                    self.stopped = True  # the pool shut down or broke under us
                    self.error = error
                    if first:
                        raise
                    break
                self.in_flight += 1
                self.chunks.append((future, start, len(chunk)))
                if self.tracker is not None:
                    self.tracker.watch(future, len(chunk), self.judge(len(chunk)))
                future.add_done_callback(functools.partial(self._done, count=len(chunk)))
            self.cond.notify_all()

    def judge(self, count: int) -> Judge:
        """How a chunk of ``count`` inputs counts for ``progress=``: what the caller will see of it."""
        rerun = count > 1 and self.as_if_one_per_job

        def verdict(future: Future[Any]) -> tuple[int, int, int]:
            if future.cancelled():
                return 0, 0, count
            error = future.exception()
            if error is not None:
                if rerun and isinstance(error, WorkerCrashed):
                    return 0, 0, 0  # its inputs run again one per job (_chunk_results): they settle then
                return 0, count, 0
            value = future.result()
            if not isinstance(value, ChunkStopped):
                return count, 0, 0
            if not self.as_if_one_per_job:
                return 0, count, 0  # the caller's own chunksize: a failing chunk fails whole
            done = len(value.results)
            return done, 1, count - done - 1  # map stops at the failure: the rest never runs

        return verdict

    def submit(self, start: int, count: int, *, accepted_before_shutdown: bool) -> Future[Any]:
        """Submit the inputs ``start .. start + count - 1`` as one job, named after them in errors."""
        chunk = self.items[start : start + count]
        if self.through_submit:
            return self.pool.submit(self.runner, self.fn, chunk)
        return self.pool._submit(
            self.runner,
            (self.fn, chunk),
            {},
            None,
            None,
            None,
            0,
            accepted_before_shutdown=accepted_before_shutdown,
            subject=_inputs_subject(start, count),
        )

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
        cancel_all(future for future, _, _ in chunks)

    def chunk(self, index: int, deadline: float | None) -> tuple[Future[Any], int, int] | None:
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
    runner: _Runner
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


def _submit_overridden(pool: Pool) -> bool:
    """Whether a subclass or wrapper overrides ``submit()`` (a progress bar counting
    jobs, say; tqdm's ``process_map`` replaces it on the instance): it expects
    ``map`` and ``imap_unordered`` to go through it, as the standard library's
    ``map`` does, so they do (and their errors then name jobs, not inputs)."""
    from .pool import Pool

    return type(pool).submit is not Pool.submit or "submit" in vars(pool)


def _inputs_subject(start: int, count: int) -> str:
    """How error messages name a job of ``map`` or ``batch``: by the inputs it holds (0-based, as ``index``)."""
    return f"input {start}" if count == 1 else f"inputs {start}-{start + count - 1}"


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
            future, start, count = entry
            results, error = _chunk_results(feeder, future, start, count, deadline)
            index += 1
            # Drop the references so a long map does not keep every result alive:
            # the chunk's future, and each result once it has been handed out.
            feeder.chunks[index - 1] = (_DONE, start, count)
            del future
            results.reverse()
            seen += len(results)  # counted per chunk: this loop runs once per input
            while results:
                yield results.pop()
            if error is not None:
                raise error
    finally:
        if seen < total:
            feeder.stop()
        if feeder.tracker is not None:
            feeder.tracker.close()


def _chunk_results(
    feeder: _OrderedFeeder, future: Future[Any], start: int, count: int, deadline: float | None
) -> tuple[list[Any], BaseException | None]:
    """The results of one ``map`` chunk up to its first failure, and that failure (or None).

    With measured chunks (``chunksize=None``) the results are those that one
    input per job, the standard library's default, would give before the
    failing input. A measured chunk whose worker died took the results of
    the inputs before the one that killed it along, so each input of that
    chunk runs again on its own and the results are those of these runs.
    With the caller's own ``chunksize`` a failing chunk fails whole, as in
    the standard library.
    """
    try:
        results, error = _unpack(future.result(_remaining(deadline)))
    except WorkerCrashed:
        if count == 1 or not feeder.as_if_one_per_job:
            raise
    else:
        if error is not None and not feeder.as_if_one_per_job:
            results = []
        return results, error
    runs = [feeder.submit(start + i, 1, accepted_before_shutdown=True) for i in range(count)]
    if feeder.tracker is not None:
        for run in runs:
            feeder.tracker.watch(run, 1, feeder.judge(1))
    results = []
    try:
        for run in runs:
            try:
                part, error = _unpack(run.result(_remaining(deadline)))
            except (WorkerCrashed, JobTimeout) as crash:
                part, error = [], crash
            results.extend(part)
            if error is not None:
                return results, error
    finally:
        cancel_all(runs)  # those not reached: the caller's deadline passed, or an input failed
    return results, None


def _unpack(value: list[Any] | ChunkStopped) -> tuple[list[Any], BaseException | None]:
    if isinstance(value, ChunkStopped):
        return value.results, value.error_object()
    return value, None


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


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


class _Pending:
    """The type of ``PENDING``."""

    def __repr__(self) -> str:
        return "poolkit.batch.PENDING"


PENDING: Final = _Pending()
"""What a live input iterator yields when its next input has not arrived yet.

``batch`` and ``imap_unordered`` read their inputs in the consumer's thread,
so a plain iterator that waits for its next input (a pipe) holds back every
outcome that finishes meanwhile. An iterator with a ``set_wake(wake)``
method may instead yield ``PENDING``: the batch then hands out what has
finished, and asks again once a job finishes or ``wake()`` is called (from
any thread: the one that reads the pipe). ``poolkit run`` reads stdin so.
"""

_END = object()


class _Done(NamedTuple):
    """A finished job of a batch, as its consumer takes it."""

    future: Future[Any]
    chunk: list[tuple[int, Any]]  # its inputs, as (index, input)
    runs_before: int  # how many times these inputs ran before this job
    after_crash: bool  # a run of one input of a chunk whose worker died
    from_source: bool  # a chunk read from the source (it counts towards max_in_flight)


class _LazyFeeder:
    """Reads an input iterator lazily (in the consumer's thread) and keeps a bounded number of chunks in flight.

    It owns every future submitted for the consumer until the consumer has
    taken its result, so that a consumer who stops reading (closes or drops
    the iterator, or raises) leaves no job behind: ``close()`` cancels
    them, as ``map`` does.
    """

    def __init__(
        self,
        pool: Pool,
        submit_chunk: Callable[[list[tuple[int, Any]]], Future[Any]],
        iterable: Iterable[Any],
        chunksize: int | None,
        max_in_flight: int | None,
        tracker: Tracker | None = None,
        *,
        settles: bool = True,
    ) -> None:
        self.source = iter(iterable)
        self.tracker = tracker
        self.settles = settles  # False: the consumer settles inputs itself (batch)
        self.next_index = 0
        self.submit_chunk = submit_chunk
        workers = pool.max_workers
        self.chunker = Chunker(chunksize, workers)
        self.max_in_flight = max_in_flight or workers * 2 + 2
        self.in_flight = 0  # chunks read from the source whose result is not taken yet
        self.exhausted = False
        self.unfinished: set[Future[Any]] = set()  # every job whose result is not taken yet
        # Finished jobs, and None for "more input has arrived" (a live source's wake()).
        self.events: queue.SimpleQueue[_Done | None] = queue.SimpleQueue()
        set_wake = getattr(iterable, "set_wake", None)
        self.live = callable(set_wake)
        if self.live:
            set_wake(functools.partial(self.events.put, None))  # type: ignore[misc]

    def _take(self, size: int) -> list[tuple[int, Any]]:
        if not self.live:
            items = list(itertools.islice(self.source, size))
            if len(items) < size:
                self.exhausted = True  # islice stops short only at the end
            first = self.next_index
            self.next_index += len(items)
            return list(enumerate(items, first))
        chunk: list[tuple[int, Any]] = []
        while len(chunk) < size:
            item = next(self.source, _END)
            if item is _END:
                self.exhausted = True
                break
            if item is PENDING:
                break
            chunk.append((self.next_index, item))
            self.next_index += 1
        return chunk

    def pump(self) -> None:
        while not self.exhausted and self.in_flight < self.max_in_flight:
            chunk = self._take(self.chunker.next_size())
            if self.exhausted and self.tracker is not None:
                self.tracker.set_total(self.next_index)
            if not chunk:
                return
            future = self.submit_chunk(chunk)
            self.in_flight += 1
            if self.tracker is not None:
                self.tracker.watch(future, len(chunk), settles=self.settles)
            self.track(future, chunk, 0, after_crash=False, from_source=True)

    def track(
        self,
        future: Future[Any],
        chunk: list[tuple[int, Any]],
        runs_before: int,
        *,
        after_crash: bool,
        from_source: bool = False,
    ) -> None:
        """Own ``future`` until the consumer takes it; its completion is queued for ``next_done``."""
        self.unfinished.add(future)
        done = functools.partial(self._done, chunk, runs_before, after_crash, from_source)
        future.add_done_callback(done)

    def _done(
        self,
        chunk: list[tuple[int, Any]],
        runs_before: int,
        after_crash: bool,
        from_source: bool,
        future: Future[Any],
    ) -> None:
        if from_source:
            seconds = _chunk_seconds(future)
            if seconds is not None:
                self.chunker.record(len(chunk), seconds)
        self.events.put(_Done(future, chunk, runs_before, after_crash, from_source))

    def next_done(self) -> _Done | None:
        """The next finished job, in completion order; None once every input is done."""
        while True:
            self.pump()
            if not self.unfinished and self.exhausted:
                return None
            entry = self.events.get()
            if entry is None:
                continue  # a live source has more input
            self.unfinished.discard(entry.future)
            if entry.from_source:
                self.in_flight -= 1
            return entry

    def close(self, *, stop_running: bool = False) -> None:
        """The consumer stopped: cancel the jobs it will never read; ``stop_running``: kill the running ones too."""
        futures = list(self.unfinished)
        self.unfinished.clear()
        self.exhausted = True
        if not stop_running:
            cancel_all(futures)
            return
        for future in futures:
            terminate = getattr(future, "terminate", None)
            if terminate is not None:
                terminate()
            else:
                future.cancel()


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

    through_submit = _submit_overridden(pool)

    def submit_chunk(chunk: list[tuple[int, Any]]) -> Future[Any]:
        args = [(item,) for _, item in chunk]
        if through_submit:
            return pool.submit(_call_chunk, fn, args)
        return pool._submit(
            _call_chunk,
            (fn, args),
            {},
            None,
            None,
            None,
            0,
            subject=_inputs_subject(chunk[0][0], len(chunk)),
        )

    feeder = _LazyFeeder(pool, submit_chunk, iterable, chunksize, None)
    total = total_of(iterable)

    def results() -> Iterator[T]:
        # The tracker starts with the first result asked for: a generator never
        # started submits nothing, and must leave no thread behind.
        feeder.tracker = make_tracker(progress, "imap_unordered", total)
        try:
            while (done := feeder.next_done()) is not None:
                part, error = _unpack(done.future.result())
                yield from part
                if error is not None:
                    raise error
        finally:
            feeder.close()
            if feeder.tracker is not None:
                feeder.tracker.close()

    return results()


# ----------------------------------------------------------------- batch


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What happened to one input of [`Pool.batch`][poolkit.Pool.batch].

    ``ok`` tells which fields matter: ``value`` when it succeeded; else
    ``error`` (the exception's type name; ``SystemExit`` and
    ``KeyboardInterrupt`` raised by the job too), ``message`` and ``traceback``.
    ``attempts`` counts the runs of this input: more than 1 after retries
    (its worker died, it timed out, or with ``retry_exceptions`` it raised),
    0 if it never ran (it could not be pickled, or was cancelled first).

    Attributes:
        index: the input's position in the iterable, from 0.
        input: the input itself.
        ok: whether ``fn`` returned for it.
        value: what ``fn`` returned (None when not ``ok``).
        error: the exception's type name (``"ValueError"``, ``"WorkerCrashed"``,
            ``"JobTimeout"``, ...), or None.
        message: the exception's message, or None.
        traceback: the traceback as formatted in the worker, or None.
        attempts: how many times the input ran.
        worker_id: the worker that ran its last attempt, if any.
        pid: that worker's process id, if any.
        wall_time: seconds its last attempt took in the worker, if it ran.
        cpu_time: CPU seconds of its last attempt, if it ran.
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
    stop_running: bool = False,
    progress: ProgressArg = None,
) -> Generator[Outcome[T], None, None]:
    """The engine of [`Pool.batch`][poolkit.Pool.batch] (and of ``poolkit run``).

    When the consumer stops reading early, the jobs it will not read are
    cancelled (``stop_running``: the running ones are killed too, which is
    what ``poolkit run`` wants after Ctrl-C).
    """
    if not callable(fn):
        raise TypeError(f"{fn!r} is not callable")
    check_progress(progress)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a non-negative int, got {retries!r}")
    options = pool.options(timeout=timeout, retries=retries)
    pool_timeout = getattr(pool.config, "job_timeout", None)
    if chunksize is None and (timeout is not None or pool_timeout is not None or retries > 0):
        # A timeout and a retry budget are each input's own: never let a chunk share them.
        chunksize = 1
    single = pool.options(timeout=timeout)  # a chunk of several inputs is not retried as a whole

    def submit_chunk(chunk: list[tuple[int, Any]]) -> Future[Any]:
        subject = _inputs_subject(chunk[0][0], len(chunk))
        items = [item for _, item in chunk]
        runner = options if len(chunk) == 1 else single
        return runner.submit_input(subject, _call_chunk_recording, fn, items, star)

    feeder = _LazyFeeder(pool, submit_chunk, iterable, chunksize, max_in_flight, settles=False)
    total = total_of(iterable)
    return _batch_outcomes(
        pool, feeder, fn, retries, retry_exceptions, timeout, ordered, star, stop_running, progress, total
    )


def _batch_outcomes(
    pool: Pool,
    feeder: _LazyFeeder,
    fn: Callable[[Any], Any],
    retries: int,
    retry_exceptions: bool,
    timeout: float | None,
    ordered: bool,
    star: bool,
    stop_running: bool,
    progress: ProgressArg,
    total: int | None,
) -> Generator[Outcome[Any], None, None]:
    tracker = feeder.tracker = make_tracker(progress, "batch", total)
    try:
        yield from _batch_loop(pool, feeder, fn, retries, retry_exceptions, timeout, ordered, star, tracker)
    finally:
        feeder.close(stop_running=stop_running)
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

    def run_alone(index: int, item: Any, runs_before: int, retries_left: int, *, after_crash: bool) -> None:
        """Run one input on its own: after its chunk's worker died, or to retry an exception."""
        future = pool.options(timeout=timeout, retries=retries_left).submit_input(
            f"input {index}", _call_chunk_recording, fn, [item], star
        )
        if tracker is not None:
            tracker.watch(future, 1, settles=False)
        feeder.track(future, [(index, item)], runs_before, after_crash=after_crash)

    def outcomes_of(done: _Done) -> list[Outcome[Any]]:
        future, chunk = done.future, done.chunk
        stats = getattr(future, "stats", None)
        worker_id = stats.worker_id if stats else getattr(future, "worker_id", None)
        pid = stats.pid if stats else getattr(future, "pid", None)
        if future.cancelled():
            runs = done.runs_before + (1 if worker_id is not None else 0)
            return [
                Outcome(index, item, False, None, "Cancelled", "the job was cancelled", None, runs, worker_id, pid)
                for index, item in chunk
            ]
        # exception() of a done future does not wait, and returns SystemExit as
        # a value: nothing the job raised can escape into the consumer.
        exc = future.exception()
        if isinstance(exc, (WorkerCrashed, JobTimeout)):
            if len(chunk) > 1:
                # Find the input that killed the worker: run each one alone.
                for index, item in chunk:
                    run_alone(index, item, done.runs_before, retries, after_crash=True)
                return []
            index, item = chunk[0]
            # The crashed chunk ran this input too, before it was run alone.
            runs = done.runs_before + (getattr(future, "attempt", None) or 1) + int(done.after_crash)
            return [Outcome(index, item, False, None, type(exc).__name__, str(exc), None, runs, worker_id, pid)]
        if exc is not None:  # pickling trouble: every input of the chunk shares it, none ran
            return [
                Outcome(index, item, False, None, type(exc).__name__, str(exc), None, done.runs_before, worker_id, pid)
                for index, item in chunk
            ]
        runs = done.runs_before + (stats.attempt if stats else 1)
        out = []
        for (index, item), (ok, value, wall, cpu) in zip(chunk, future.result(), strict=False):
            if ok:
                out.append(Outcome(index, item, True, value, None, None, None, runs, worker_id, pid, wall, cpu))
            elif retry_exceptions and runs <= retries:
                run_alone(index, item, runs, retries - runs, after_crash=False)
            else:
                error, message, tb = value
                out.append(Outcome(index, item, False, None, error, message, tb, runs, worker_id, pid, wall, cpu))
        return out

    def release(batch: list[Outcome[Any]]) -> Iterator[Outcome[Any]]:
        nonlocal next_index
        if tracker is not None:
            for outcome in batch:  # each outcome is final here: retried inputs are not in it
                if outcome.error != "Cancelled":  # a cancelled job's inputs: counted when it was cancelled
                    tracker.settle(ok=outcome.ok)
        if not ordered:
            yield from batch
            return
        for outcome in batch:
            waiting[outcome.index] = outcome
        while next_index in waiting:
            yield waiting.pop(next_index)
            next_index += 1

    while (done := feeder.next_done()) is not None:
        yield from release(outcomes_of(done))
