"""``Pool``: poolkit's public executor.

``Pool`` is a ``concurrent.futures.Executor``. It checks the caller's
input, pickles each job in the caller's thread (so a pickling error lands on
that job's future and nowhere else) and hands it to its ``Manager``,
which owns everything else. See ``docs/concepts.md`` for the life of a job.
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing
import multiprocessing.context
import os
import signal
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from typing import Any, Protocol, TypeVar

from . import batch as _batch
from . import share as _share
from .batch import Outcome
from .config import PoolConfig
from .errors import BrokenPool
from .futures import JobFuture
from .job_progress import ProgressArg
from .manager import Job, Manager, shutdown_all_at_exit
from .processes import WorkerProcess
from .serialization import dumps
from .stats import PoolStats

__all__ = ["JobOptions", "Pool"]

T = TypeVar("T")

atexit.register(shutdown_all_at_exit)


class Pool(Executor):
    """A pool of warm, forked worker processes that survives crashes.

    Args:
        max_workers: number of workers; default: the CPUs this process may use
            (loky's ``cpu_count``, which reads cgroup limits and affinity).
        mp_context: a ``multiprocessing`` context; only its start method is used.
        initializer: run once in each worker before its first job.
        initargs: arguments for ``initializer``.
        start_method: ``"fork"`` (default on Linux: workers are forked from a
            warm single-threaded template), ``"forkserver"`` (the template is a
            fresh interpreter) or ``"spawn"`` (each worker is a fresh interpreter).
        preload: modules the template imports so that workers start with them.
        finalizer: run in each worker when it retires or the pool shuts down
            (close the database connection the initializer opened).
        finalargs: arguments for ``finalizer``.
        max_tasks_per_child: retire a worker after this many jobs (any start method).
        recycle_jitter: 0..1; retire up to this fraction earlier, at random, so
            that workers started together do not all retire together.
        max_memory_per_child: retire a worker whose memory after a job is above
            this (bytes, or ``"512MiB"``). Memory here and below is the worker's
            own anonymous resident memory: pages it only maps from shared memory
            (large arguments) do not count, pages a job writes do, and pages
            still shared with your process since a fork count as a share.
        memory_limit_per_child: kill a worker whose memory goes above this *while*
            a job runs; that job fails with [`MemoryLimitExceeded`][poolkit.MemoryLimitExceeded].
        memory_check_interval: seconds between two samples of a busy worker's
            memory for ``memory_limit_per_child``.
        max_lifetime_per_child: retire a worker after this many seconds.
        idle_timeout: a worker idle this long exits (down to ``min_workers``).
        min_workers: the floor for ``idle_timeout``; default ``max_workers``.
        job_timeout: default per-job timeout in seconds; a job past it fails
            with [`JobTimeout`][poolkit.JobTimeout] and its worker is replaced.
        kill_grace: seconds between SIGTERM and SIGKILL when stopping a worker.
        exit_timeout: seconds a retiring worker has to run its finalizer and
            exit before it is killed (so a hung finalizer cannot hang shutdown).
        start_timeout: seconds a new worker has to become ready (its
            initializer included) before it is killed and counted as a failed
            start; None for no limit.
        stall_timeout: seconds the pool's own thread may spend away from its
            loop (inside a done- or progress callback, which run in that
            thread) before the pool counts as stuck: every unfinished future
            then fails with [`BrokenPool`][poolkit.BrokenPool], the workers are
            killed, and ``shutdown()`` returns. None: wait for ever.
        name: a name for logs and stats.
        shm_threshold: arguments and results whose buffers or byte strings are
            at least this large (bytes, or ``"1MiB"``) pass them through shared
            memory instead of the worker's socket (see the "Large data" recipe);
            0 or None: never.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Sequence[Any] = (),
        *,
        start_method: str | None = None,
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
        shm_threshold: int | str | None = 1 << 20,
    ) -> None:
        self._config = PoolConfig.build(
            max_workers=max_workers,
            mp_context=mp_context,
            start_method=start_method,
            preload=preload,
            initializer=initializer,
            initargs=initargs,
            finalizer=finalizer,
            finalargs=finalargs,
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
            name=name,
            shm_threshold=shm_threshold,
        )
        for module in self._config.preload:
            __import__(module)  # the fork template inherits what the parent imported
        self._seq = itertools.count(1)
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._manager = Manager(self._config)
        self._given_ids: set[str] = set()
        self._given_ids_lock = threading.Lock()
        self._shares: weakref.WeakSet[_share.Shared[Any]] = weakref.WeakSet()  # released at shutdown
        # A pool dropped without shutdown() still lets its jobs finish, then stops.
        weakref.finalize(self, self._manager.request_shutdown)

    # ------------------------------------------------------------ submit

    @property
    def max_workers(self) -> int:
        """How many workers the pool runs at most."""
        return self._config.max_workers

    @property
    def config(self) -> PoolConfig:
        """The pool's options, checked and with defaults filled in (a frozen dataclass)."""
        return self._config

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> JobFuture[T]:
        """Run ``fn(*args, **kwargs)`` in a worker; every keyword goes to ``fn``.

        Per-job options (timeout, job id and type, retries) go through
        [`options`][poolkit.Pool.options]. A pickling error is set on the returned future.

        Args:
            fn: the function to run; positional only, so that ``fn`` is free as
                a keyword of the job.
            *args: its positional arguments.
            **kwargs: its keyword arguments.

        Returns:
            A future whose ``stats`` say what the job cost once it is done.
        """
        return self._submit(fn, args, kwargs, None, None, None, 0)

    def options(
        self,
        *,
        timeout: float | None = None,
        job_id: str | None = None,
        job_type: str | None = None,
        retries: int = 0,
    ) -> JobOptions:
        """Per-job options: ``pool.options(timeout=30, job_type="backup").submit(fn, x)``.

        Args:
            timeout: seconds the job may run; past it, it fails with
                [`JobTimeout`][poolkit.JobTimeout] and its worker is replaced.
                Default: the pool's ``job_timeout``.
            job_id: the job's id (``current_job().job_id``, ``$POOLKIT_JOB_ID``,
                logs); unique among unfinished jobs. Default: a sequence number.
            job_type: a label for logs and ``current_job().job_type``.
            retries: how many times to run the job again after its worker died
                or it timed out (not after an exception it raised).
        """
        return JobOptions(self, timeout=timeout, job_id=job_id, job_type=job_type, retries=retries)

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
    ) -> JobFuture[Any]:
        """Queue one job. ``accepted_before_shutdown``: the rest of a ``map`` call
        that began before ``shutdown()``, which must still run, as it would have
        if every chunk had been submitted at once. ``subject``: what error
        messages call the job (``map`` and ``batch`` name their inputs)."""
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        manager = self._manager
        if self._shutdown and not accepted_before_shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if manager.refusing is not None:
            raise RuntimeError(manager.refusing)
        if manager.forked_away:  # set in a forked child by os.register_at_fork
            raise RuntimeError(
                f"this pool belongs to process {manager.owner_pid}; a forked child cannot use it"
            )
        if manager.broken is not None:
            raise BrokenPool(str(manager.broken)) from manager.broken
        seq = next(self._seq)
        if job_id is None:
            future: JobFuture[Any] = JobFuture(str(seq), job_type)
        else:
            with self._given_ids_lock:
                if job_id in self._given_ids:
                    raise ValueError(f"job_id {job_id!r} is already in use by an unfinished job")
                self._given_ids.add(job_id)
            future = JobFuture(job_id, job_type)
            future.add_done_callback(self._release_id)
        future._terminate = manager.terminate
        future._on_cancel = manager.wake
        if subject is not None:
            future._subject = subject
        try:
            payload, region, shares = _share.dumps_job(
                (fn, args, kwargs), self._config.shm_threshold, manager.main_refs
            )
        except Exception as exc:  # unpicklable function or argument: this future only
            future.set_running_or_notify_cancel()
            future.set_exception(exc)
            return future
        meta = b"" if job_id is None and job_type is None else dumps((future.job_id, job_type))
        if timeout is None:
            timeout = self._config.job_timeout
        job = Job(seq, future, payload, meta, timeout, retries, region, shares)
        # Under the shutdown lock: a job is either queued before the manager
        # hears of the shutdown (and runs), or refused here; never lost between.
        with self._shutdown_lock:
            if self._shutdown and not accepted_before_shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            manager.submit(job)
        return future

    def _release_id(self, future: Future[Any]) -> None:
        with self._given_ids_lock:
            self._given_ids.discard(future.job_id)  # type: ignore[attr-defined]

    # ------------------------------------------------------------ batch

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        progress: ProgressArg = None,
    ) -> Iterator[T]:
        """Like ``Executor.map``: results in order, the first exception raised when reached.

        All inputs are taken at once (as the standard library does, so jobs run
        even if the results are never read).

        Args:
            fn: called as ``fn(*items)``, one item from each iterable.
            *iterables: the inputs; like ``zip``, the shortest ends the run.
            timeout: seconds from this call after which the iterator raises
                ``TimeoutError`` for a result not yet there.
            chunksize: inputs per job; default ``None`` chooses chunk sizes
                from the measured duration of the first calls, and keeps what
                one input per job (the standard library's default) gives:
                every result before a failing input is yielded, and under a
                ``job_timeout`` or ``max_tasks_per_child`` each input is a job.
                With your own ``chunksize`` a failing chunk fails whole, as in
                the standard library.
            progress: ``True`` shows the run's progress on stderr (a live bar
                on a terminal, a plain line every few seconds elsewhere); a
                callable receives [`ProgressCounts`][poolkit.ProgressCounts]
                instead, in a thread of its own. Default: none.
        """
        return _batch.map_ordered(
            self, fn, iterables, timeout=timeout, chunksize=chunksize, progress=progress
        )

    def imap_unordered(
        self,
        fn: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        *,
        progress: ProgressArg = None,
    ) -> Iterator[T]:
        """Results as they complete, reading ``iterable`` lazily with a bounded number in flight.

        Args:
            fn: a function of one argument.
            iterable: the inputs; may be a generator, or endless.
            chunksize: inputs per job; default: sized from measured durations.
            progress: as for [`map`][poolkit.Pool.map]; the total is
                ``len(iterable)`` when it has one.
        """
        return _batch.imap_unordered(self, fn, iterable, chunksize=chunksize, progress=progress)

    def batch(
        self,
        fn: Callable[[Any], T],
        iterable: Iterable[Any],
        *,
        retries: int = 0,
        retry_exceptions: bool = False,
        timeout: float | None = None,
        ordered: bool = True,
        chunksize: int | None = None,
        max_in_flight: int | None = None,
        progress: ProgressArg = None,
    ) -> Iterator[Outcome[T]]:
        """Run ``fn`` on every input; yield an [`Outcome`][poolkit.Outcome] per input, never stopping at a failure.

        Args:
            fn: a function of one argument, run once per input.
            iterable: the inputs; read lazily, so it may be a generator or endless.
            retries: how many times to run an input again after its worker
                died or it timed out (and after an exception, with
                ``retry_exceptions``); each input's own budget (one input
                per job when retries are on).
            retry_exceptions: also retry an input whose ``fn`` raised.
            timeout: seconds each input may run; past it, that input fails
                with [`JobTimeout`][poolkit.JobTimeout] and its worker is
                replaced. A timeout sends one input per job.
            ordered: yield outcomes in input order (True) or as they complete.
            chunksize: inputs sent to a worker at a time; default: sized from
                the measured duration of the first inputs (1 with ``timeout``,
                the pool's ``job_timeout`` or ``retries``).
            max_in_flight: bound on chunks sent but not yet answered.
            progress: as for [`map`][poolkit.Pool.map]; an input counts as
                failed only after its last attempt.

        Returns:
            An iterator of outcomes, one per input, that never raises for a
            failed input: a job that calls ``sys.exit()`` or raises
            ``KeyboardInterrupt`` fails its input like any other exception.
            Closing or dropping it (or raising out of its loop) cancels the
            inputs that have not started; the running ones finish.
        """
        return _batch.run_batch(
            self,
            fn,
            iterable,
            retries=retries,
            retry_exceptions=retry_exceptions,
            timeout=timeout,
            ordered=ordered,
            chunksize=chunksize,
            max_in_flight=max_in_flight,
            progress=progress,
        )

    # ------------------------------------------------------------ asyncio

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``await pool.run(fn, *args)``: submit and await the result without a thread per job.

        Args:
            fn: the function to run, as for [`submit`][poolkit.Pool.submit].
            *args: its positional arguments.
            **kwargs: its keyword arguments.
        """
        import asyncio  # imported on use: asyncio costs ~20 ms to import

        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    async def as_completed_async(self, futures: Iterable[Future[T]]) -> AsyncIterator[Future[T]]:
        """Yield ``futures`` as they complete, inside an event loop.

        Args:
            futures: futures of this pool (or any ``concurrent.futures`` futures).
        """
        import asyncio

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Future[T]] = asyncio.Queue()
        pending = list(futures)
        for future in pending:
            future.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, f))
        for _ in range(len(pending)):
            yield await queue.get()

    # ------------------------------------------------------------ shared objects

    def share(self, obj: T) -> _share.Shared[T]:
        """Place ``obj`` in shared memory once; return a small handle that jobs take as an argument.

        Each job given the handle (by ``submit``, ``map``, ``batch`` ...)
        receives the object itself. Every worker loads it once, before its
        first job that names it, and keeps it: numpy arrays (pandas blocks
        too) are mapped from shared memory, not copied, and their pages are
        not counted in the worker's memory limits. A worker that replaces a
        recycled one loads it again. For large, read-only data (a model's
        weights, a lookup table); a job that writes to it writes a private
        copy of the pages it touches.

        The memory is freed once the handle is released (``release()``,
        ``with``, or dropped) and no queued or running job names it, and at
        the latest when this pool shuts down.

        Args:
            obj: any picklable object.

        Returns:
            a [`Shared`][poolkit.Shared] handle.
        """
        if self._shutdown:
            raise RuntimeError("cannot share objects after shutdown")
        handle = _share.share(obj, self._config.shm_threshold)
        self._shares.add(handle)
        return handle

    def _release_shares(self) -> None:
        for handle in list(self._shares):
            handle.release()

    # ------------------------------------------------------------ lifecycle

    def stats(self) -> PoolStats:
        """A snapshot of the workers and counters; cheap enough to call every second."""
        return self._manager.stats()

    # ------------------------------------------------ what stdlib code reaches for

    @property
    def _max_workers(self) -> int:
        """``max_workers``, under the standard library's attribute name (Dask, CPython's tests read it)."""
        return self._config.max_workers

    @property
    def _broken(self) -> str | bool:
        """False, or why the pool is broken, as the standard library's executor keeps it."""
        broken = self._manager.broken
        return False if broken is None else str(broken)

    @property
    def _mp_context(self) -> multiprocessing.context.BaseContext:
        """The ``multiprocessing`` context of this pool's start method, as the standard library keeps it."""
        return multiprocessing.get_context(self._config.start_method)

    @property
    def _processes(self) -> dict[int, WorkerProcess]:
        """The live workers by pid, each like a ``multiprocessing.Process`` (see ``poolkit.processes``)."""
        template = self._manager.template_pid
        return {
            w.pid: WorkerProcess(w.pid, w.worker_id, template)
            for w in self.stats().workers
            if w.pid and w.state not in ("killing", "exited")
        }

    def terminate_workers(self) -> None:
        """SIGTERM to every worker (Python 3.14's executor method); their jobs fail, the pool goes on.

        The standard library's version also shuts the executor down; poolkit
        replaces the workers instead, so the pool stays usable.
        """
        self._manager.signal_workers(signal.SIGTERM)

    def kill_workers(self) -> None:
        """SIGKILL to every worker (Python 3.14's executor method); as [`terminate_workers`][poolkit.Pool.terminate_workers]."""
        self._manager.signal_workers(signal.SIGKILL)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking jobs; finish those queued (unless ``cancel_futures``), retire every worker.

        Args:
            wait: return once every worker and the template have exited and
                every file descriptor of the pool is closed; with False, return
                at once while the pool finishes in the background.
            cancel_futures: cancel the jobs that have not started instead of
                running them.
        """
        with self._shutdown_lock:
            self._shutdown = True
        if self._manager.owner_pid != os.getpid():
            return
        self._release_shares()
        self._manager.request_shutdown(cancel_futures)
        if wait:
            self._manager.join()

    def __reduce__(self) -> Any:
        raise TypeError(
            "a poolkit Pool cannot be sent to a worker process; to run jobs from inside a "
            "job, create a pool in the job (pools nest) or return the work to the caller"
        )

    def __enter__(self) -> Pool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        """Shut down and wait; after Ctrl-C (``KeyboardInterrupt``), stop at once.

        Leaving on any other exception waits for the jobs that run, and the
        queued ones, as the standard library does (an abandoned ``map``
        has already cancelled its own). Ctrl-C means "stop": queued jobs are
        cancelled and running ones killed, their futures cancelled.
        """
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._stop_now()
        else:
            self.shutdown(wait=True)

    def _stop_now(self) -> None:
        with self._shutdown_lock:
            self._shutdown = True
        if self._manager.owner_pid != os.getpid():
            return
        self._release_shares()
        self._manager.abort()
        self._manager.join()

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "running"
        return f"<poolkit.Pool {self._config.name!r} max_workers={self._config.max_workers} {state}>"


class _Submits(Protocol):
    """What [`JobOptions`][poolkit.JobOptions] needs of its pool (a [`Pool`][poolkit.Pool] or a ``DaskPool``)."""

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
    ) -> JobFuture[Any]: ...


class JobOptions:
    """Per-job options bound to a pool; made by [`Pool.options`][poolkit.Pool.options], which documents them."""

    def __init__(
        self,
        pool: _Submits,
        *,
        timeout: float | None,
        job_id: str | None,
        job_type: str | None,
        retries: int,
    ) -> None:
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
        ):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if job_id is not None and not isinstance(job_id, str):
            raise TypeError(f"job_id must be a string, got {job_id!r}")
        if job_type is not None and not isinstance(job_type, str):
            raise TypeError(f"job_type must be a string, got {job_type!r}")
        for name, text in (("job_id", job_id), ("job_type", job_type)):
            if text is not None and "\0" in text:
                # It becomes an environment variable in the worker, which C ends at a NUL.
                raise ValueError(f"{name} must not contain a NUL character, got {text!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative int, got {retries!r}")
        self._pool = pool
        self.timeout = None if timeout is None else float(timeout)
        self.job_id = job_id
        self.job_type = job_type
        self.retries = retries

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> JobFuture[T]:
        """Run ``fn(*args, **kwargs)`` in a worker under these options.

        Args:
            fn: the function to run; positional only.
            *args: its positional arguments.
            **kwargs: its keyword arguments.
        """
        return self._pool._submit(
            fn, args, kwargs, self.timeout, self.job_id, self.job_type, self.retries
        )

    def submit_input(self, subject: str, fn: Callable[..., T], /, *args: Any) -> JobFuture[T]:
        """``submit`` for ``map`` and ``batch``: ``subject`` names the input(s) in error messages.

        No ``job_id``: these options serve many jobs, and an id is one job's.

        Args:
            subject: how error messages name the job (``"input 7"``).
            fn: the function to run; positional only.
            *args: its positional arguments.
        """
        return self._pool._submit(
            fn, args, {}, self.timeout, None, self.job_type, self.retries, subject=subject
        )

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
    ) -> Iterator[T]:
        """Ordered results, one job per input, each under these options.

        Args:
            fn: called as ``fn(*items)``, one item from each iterable.
            *iterables: the inputs; the shortest ends the run.
            timeout: seconds from this call after which the iterator raises
                ``TimeoutError`` for a result not yet there.
        """
        futures = [
            self.submit_input(f"input {index}", fn, *args)
            for index, args in enumerate(zip(*iterables, strict=False))
        ]
        return _batch.iterate_in_order(futures, timeout)
