"""``ProcessPoolExecutor``: the standard library's signature on top of [`Pool`][poolkit.Pool].

``from poolkit import ProcessPoolExecutor`` is meant as a one-line change.
Where poolkit deliberately differs from the standard library:

* a worker that dies fails only the job it was running
  ([`WorkerCrashed`][poolkit.WorkerCrashed], still a ``BrokenProcessPool``); the pool
  replaces the worker and keeps serving instead of breaking;
* ``max_tasks_per_child`` works with every start method, fork included;
* ``map``'s default ``chunksize`` is chosen from measured job durations
  (results, their order and the exception raised are the same as with 1);
* extra poolkit options may be passed as keywords.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .pool import Pool

__all__ = ["ProcessPoolExecutor"]


class ProcessPoolExecutor(Pool):
    """A drop-in for ``concurrent.futures.ProcessPoolExecutor`` that survives crashes.

    Args:
        max_workers: number of workers; default: the CPUs this process may use.
        mp_context: a ``multiprocessing`` context; only its start method is used.
        initializer: run once in each worker before its first job.
        initargs: arguments for ``initializer``.
        max_tasks_per_child: retire a worker after this many jobs; unlike the
            standard library's, it works with the ``fork`` start method too.
        **poolkit_options: any other keyword argument of [`Pool`][poolkit.Pool]
            (``job_timeout``, ``max_memory_per_child``, ``finalizer``, ...).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Sequence[Any] = (),
        *,
        max_tasks_per_child: int | None = None,
        **poolkit_options: Any,
    ) -> None:
        super().__init__(
            max_workers,
            mp_context,
            initializer,
            initargs,
            max_tasks_per_child=max_tasks_per_child,
            **poolkit_options,
        )
