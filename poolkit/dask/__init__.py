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

The package's rooms: the node side (``node.py``), the envelope a job's outcome
travels in (``envelope.py``), the caller's side (``pool.py``), the delivery
thread (``delivery.py``) and the caller's futures (``futures.py``).

This package imports ``distributed``; ``import poolkit`` never imports it.
"""

from .envelope import CancelledBeforeStart, Envelope
from .futures import DaskJobFuture, DaskJobLost
from .node import NodePool, run_job
from .pool import DEFAULT_PROGRESS_INTERVAL, DaskJobOptions, DaskPool

__all__ = [
    "DEFAULT_PROGRESS_INTERVAL",
    "CancelledBeforeStart",
    "DaskJobFuture",
    "DaskJobLost",
    "DaskJobOptions",
    "DaskPool",
    "Envelope",
    "NodePool",
    "run_job",
]
