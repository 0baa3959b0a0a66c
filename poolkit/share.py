"""``Pool.share(obj)``: a large read-only object placed in shared memory once, used by any number of jobs.

The object is pickled once, its large pieces in a region (``shm.py``); the
caller gets a :class:`Shared` handle, a few bytes when pickled. A job takes
the handle as an argument and receives the object itself: before a worker
runs its first job that names the handle, the pool sends it the share (a
SHARE frame with the region's descriptor), and the worker loads it once
(arrays mapped, not copied) and keeps it for every later job. A worker that
replaces a recycled one gets the share again before its first such job.

Lifetime: the region lives while the handle or a job that names it does.
``release()``, dropping the handle, or shutting down the pool that made it
lets it go; the workers that hold it are then told to drop theirs (UNSHARE).
A job already queued with the handle still runs with it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from . import shm

__all__ = ["Shared", "dumps_job", "forget", "receive", "share"]

T = TypeVar("T")

# Pieces of at least this many bytes go into the region even when the pool's
# own shm_threshold is higher or off: a share is placed in shared memory once.
_SHARE_THRESHOLD = 64 * 1024

# The objects this process has received through SHARE frames, by key (workers).
_objects: dict[bytes, Any] = {}

# Called with a key when a share is let go: each pool's manager tells its workers.
release_hooks: list[Callable[[bytes], None]] = []

_collecting = threading.local()


class _Entry:
    """A share's pickle and region, held by its handle and by every job that names it."""

    __slots__ = ("__weakref__", "key", "payload", "region", "size")

    def __init__(self, key: bytes, payload: bytes, region: shm.Region | None) -> None:
        self.key = key
        self.payload = payload
        self.region = region
        self.size = len(payload) + (region.size if region is not None else 0)

    def __del__(self) -> None:
        if self.region is not None:
            self.region.close()
        for hook in list(release_hooks):
            try:
                hook(self.key)
            except Exception:
                pass


class Shared(Generic[T]):
    """A handle to an object placed in shared memory by [`Pool.share`][poolkit.Pool.share].

    Pass it to jobs as an argument (of ``submit``, ``map``, ``batch`` ...):
    each job receives the object itself. In the caller it is only a handle.
    """

    __slots__ = ("__weakref__", "_entry")

    def __init__(self, entry: _Entry) -> None:
        self._entry: _Entry | None = entry

    @property
    def nbytes(self) -> int:
        """Bytes the object takes in shared memory (its pickle included); 0 once released."""
        entry = self._entry
        return 0 if entry is None else entry.size

    @property
    def released(self) -> bool:
        """True once ``release()`` was called (or the pool that made it shut down)."""
        return self._entry is None

    def release(self) -> None:
        """Let the object go: once no queued or running job names it, its memory is freed in every process."""
        self._entry = None

    def __enter__(self) -> Shared[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __reduce__(self) -> Any:
        entry = self._entry
        if entry is None:
            raise ValueError("this shared object was released; share it again to use it in a job")
        used: list[_Entry] | None = getattr(_collecting, "entries", None)
        if used is None:
            raise TypeError(
                "a Pool.share handle can only be an argument of a job of a poolkit Pool "
                "(or ProcessPoolExecutor); it cannot be pickled otherwise, nor sent through "
                "a DaskPool"
            )
        used.append(entry)
        return _shared_object, (entry.key,)

    def __repr__(self) -> str:
        state = "released" if self._entry is None else f"{self.nbytes} bytes"
        return f"<poolkit.Shared {state}>"


def share(obj: T, threshold: int | None) -> Shared[T]:
    """Pickle ``obj`` once into a region; the handle for ``Pool.share``."""
    limit = _SHARE_THRESHOLD if threshold is None else min(threshold, _SHARE_THRESHOLD)
    payload, region = shm.dumps(obj, limit)
    return Shared(_Entry(os.urandom(16), payload, region))


def dumps_job(
    obj: Any, threshold: int | None, main_refs: Any
) -> tuple[bytes, shm.Region | None, tuple[_Entry, ...]]:
    """``shm.dumps`` for a job, also returning the shares its pickle names (they travel before it)."""
    entries: list[_Entry] = []
    _collecting.entries = entries
    try:
        payload, region = shm.dumps(obj, threshold, main_refs)
    finally:
        _collecting.entries = None
    return payload, region, tuple(entries)


class _NotLoaded:
    """What a worker keeps for a share that would not load: each job that names it fails with why."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _shared_object(key: bytes) -> Any:
    """In a worker: the shared object ``key`` names (its SHARE frame came before this job)."""
    try:
        obj = _objects[key]
    except KeyError:
        raise LookupError("a shared object named by this job is not in this worker (it was released)") from None
    if isinstance(obj, _NotLoaded):
        raise RuntimeError(f"the shared object could not be loaded in this worker: {obj.error!r}") from obj.error
    return obj


def receive(key: bytes, payload: memoryview, incoming: shm.Incoming | None) -> None:
    """A SHARE frame: load the object once (arrays are mapped, not copied) and keep it."""
    if key in _objects:
        if incoming is not None:
            incoming.close()
        return
    try:
        _objects[key] = shm.loads(payload, incoming)
    except Exception as exc:
        _objects[key] = _NotLoaded(exc)


def forget(key: bytes) -> None:
    """An UNSHARE frame: drop this worker's reference (the mapping goes with the last user)."""
    _objects.pop(key, None)


def _forget_after_fork() -> None:
    # A fork child is a new worker or template: it gets its shares by SHARE frames.
    _objects.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
