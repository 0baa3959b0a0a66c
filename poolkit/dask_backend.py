"""``poolkit.dask_backend``: the name ``poolkit.dask`` had before it became a package; kept importable."""

from __future__ import annotations

from .dask import (
    DEFAULT_PROGRESS_INTERVAL,
    CancelledBeforeStart,
    DaskJobFuture,
    DaskJobLost,
    DaskJobOptions,
    DaskPool,
    Envelope,
    NodePool,
    run_job,
)

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
