"""``poolkit.batch(fn, inputs)``: a batch on a pool of its own, for scripts.

``Pool.batch`` needs a pool that the caller opens and closes. For the common
case of one batch in a script, this opens one, yields the outcomes and
closes the pool when the outcomes run out, when the caller closes the
iterator (or leaves the ``for`` loop, which drops it), or at the latest when
it is garbage-collected. The pool is created, and the arguments checked, in
the call itself, so a mistake raises where it was made, not at the first
``next()``.

Package note: ``poolkit.batch`` is this function; the module that implements
batches stays importable as ``from poolkit.batch import Outcome``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from .batch import Outcome
from .job_progress import ProgressArg
from .pool import Pool

__all__ = ["batch"]

T = TypeVar("T")


def batch(
    fn: Callable[[Any], T],
    inputs: Iterable[Any],
    /,
    *,
    max_workers: int | None = None,
    retries: int = 0,
    retry_exceptions: bool = False,
    timeout: float | None = None,
    ordered: bool = True,
    chunksize: int | None = None,
    max_in_flight: int | None = None,
    progress: ProgressArg = None,
    **pool_options: Any,
) -> Iterator[Outcome[T]]:
    """Run ``fn`` on every input in a pool of its own; yield an [`Outcome`][poolkit.Outcome] per input.

    The same as opening a [`Pool`][poolkit.Pool], iterating over
    [`Pool.batch`][poolkit.Pool.batch] and shutting the pool down, in one call:
    ``for outcome in poolkit.batch(work, inputs, max_workers=4, timeout=60): ...``

    Args:
        fn: a function of one argument, run once per input.
        inputs: the inputs; read lazily, so it may be a generator or endless.
        max_workers: number of workers; default: the CPUs this process may use.
        retries: how many times to run an input again after its worker died
            or it timed out (and after an exception, with ``retry_exceptions``).
        retry_exceptions: also retry an input whose ``fn`` raised.
        timeout: seconds each input may run; past it, that input fails with
            [`JobTimeout`][poolkit.JobTimeout] and its worker is replaced.
        ordered: yield outcomes in input order (True) or as they complete.
        chunksize: inputs sent to a worker at a time; default: sized from
            the measured duration of the first inputs (1 with ``timeout``).
        max_in_flight: bound on chunks sent but not yet answered.
        progress: True shows the run's progress on stderr (a live bar on a
            terminal, plain lines elsewhere); a callable receives
            [`ProgressCounts`][poolkit.ProgressCounts] instead.
        **pool_options: any other keyword argument of [`Pool`][poolkit.Pool], such as
            ``max_tasks_per_child``, ``max_memory_per_child`` or ``initializer``.

    Returns:
        An iterator of [`Outcome`][poolkit.Outcome], one per input, that never raises for a
        failed input. The pool shuts down when the iterator is exhausted,
        closed or dropped.

    Raises:
        TypeError: ``fn`` is not callable, or an unknown keyword argument.
        ValueError: a bad option value (for the pool or for the batch).
    """
    pool = Pool(max_workers, **pool_options)
    try:
        outcomes = pool.batch(
            fn,
            inputs,
            retries=retries,
            retry_exceptions=retry_exceptions,
            timeout=timeout,
            ordered=ordered,
            chunksize=chunksize,
            max_in_flight=max_in_flight,
            progress=progress,
        )
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    return _then_shut_down(pool, outcomes)


def _then_shut_down(pool: Pool, outcomes: Iterator[Outcome[T]]) -> Iterator[Outcome[T]]:
    """Yield ``outcomes``; shut ``pool`` down when they end or the consumer stops."""
    try:
        yield from outcomes
    finally:
        close = getattr(outcomes, "close", None)
        if close is not None:
            close()  # stop feeding inputs before the pool goes
        pool.shutdown(wait=True, cancel_futures=True)
