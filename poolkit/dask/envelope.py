"""The envelope: what the Dask task of one job returns to the caller.

The task returns an envelope instead of raising: pickling drops an
exception's ``__cause__``, so the envelope carries the remote traceback's
text and the caller chains it again; and the caller's future gets the job's
``stats``, who ran it and its last progress value whether the job succeeded
or not.
"""

from __future__ import annotations

import pickle
from concurrent.futures import CancelledError
from typing import Any, NamedTuple

from ..errors import PoolkitError, RemoteTraceback
from ..futures import JobFuture
from ..stats import JobStats

__all__ = ["CancelledBeforeStart", "Envelope", "make_envelope", "skipped"]


class CancelledBeforeStart(CancelledError):
    """A node's answer for a job the caller cancelled before it started there (never run)."""


class Envelope(NamedTuple):
    """One job's outcome on its node, as it crosses to the caller."""

    ok: bool  # True: ``value`` is the job's return value; False: the exception it ended with
    value: Any
    traceback: str | None  # the remote traceback's text, chained again by the caller
    stats: JobStats | None
    worker_id: int | None  # the poolkit child on the node that ran it
    pid: int | None
    node: str  # the Dask worker's address
    progress_count: int  # how many progress values the job reported
    progress: Any  # the last of them


def skipped(job_id: str, address: str) -> Envelope:
    """The envelope of a job the caller cancelled before it started on this node (never run)."""
    error = CancelledBeforeStart(f"job {job_id} was cancelled before it started")
    return Envelope(False, error, None, None, None, None, address, 0, None)


def make_envelope(local: JobFuture[Any], job_id: str, address: str, count: int) -> Envelope:
    """What the caller gets back for a job that ran on this node."""
    tb: str | None = None
    value: Any
    if local.cancelled():
        ok, value = False, CancelledError(f"job {job_id} was terminated on {address}")
    elif (exc := local.exception()) is None:
        ok, value = True, local.result()
    else:
        ok, value = False, exc
        cause = exc.__cause__
        tb = cause.tb if isinstance(cause, RemoteTraceback) else None
        try:
            pickle.dumps(exc)
        except Exception as pickling_error:
            # It crossed the pool's pipe, so this is rare; never let it break the result path.
            value = PoolkitError(
                f"{type(exc).__name__}: {exc} (could not be pickled: {pickling_error!r})"
            )
    return Envelope(ok, value, tb, local.stats, local.worker_id, local.pid, address, count, local.progress)
