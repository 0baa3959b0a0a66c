"""The watchdog: one thread per process that notices a pool whose own thread is stuck.

A pool's manager thread runs the caller's code: done-callbacks and progress
callbacks run in it, as in the standard library's executor. A callback that
never returns (it waits for a lock the caller holds, or for a result of the
same pool) stops the pool: no result is read, no timer fires, and
``shutdown()`` would wait for ever. So this thread looks at every pool of the
process a few times a second. A manager that has been away from its loop for
longer than its pool's ``stall_timeout`` is declared stuck
(``Manager.declare_stuck``): its unfinished futures fail with
``BrokenPool`` and its processes are killed, so no caller waits for ever.

Only time during which this thread itself ran on schedule counts. When the
caller holds the GIL in one long C call, the manager cannot run, but neither
can the watchdog; when both wake up, the watchdog sees that its own tick came
late and starts counting again from there. Such a pause is the caller's, not
the pool's, and the pool goes on once the GIL is free.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .manager import Manager

__all__ = ["forget", "watch"]

TICK = 0.25  # seconds between two looks
_LATE = TICK * 4  # a tick this late means this thread itself was kept from running

_cond = threading.Condition()
_watched: dict[Manager, tuple[float | None, float]] = {}  # manager -> (busy_since seen, seconds counted)
_thread_pid: int | None = None  # the process whose watchdog thread is running, if one is
_thread: threading.Thread | None = None


def watch(manager: Manager) -> None:
    """Watch ``manager`` until ``forget``; starts this process's watchdog thread if none runs."""
    global _thread, _thread_pid
    if manager.config.stall_timeout is None:
        return
    with _cond:
        _watched[manager] = (None, 0.0)
        if _thread_pid != os.getpid():
            _thread_pid = os.getpid()
            _thread = threading.Thread(target=_run, name="poolkit-watchdog", daemon=True)
            _thread.start()


def forget(manager: Manager) -> None:
    """Stop watching ``manager`` (its thread is ending); the watchdog thread ends with the last pool.

    It is waited for (briefly), so that once the last pool's ``shutdown()``
    returns, no thread of poolkit's is left.
    """
    with _cond:
        if _watched.pop(manager, None) is None or _watched:
            return
        _cond.notify_all()
        thread = _thread
    if thread is not None and thread is not threading.current_thread():
        thread.join(1.0)


def _forget_after_fork() -> None:
    # Neither the watchdog thread nor the pools it watched exist in a forked child.
    global _cond, _thread, _thread_pid
    if _thread_pid is None and not _watched:
        return  # nothing to forget (a template forking workers): allocate nothing
    _cond = threading.Condition()
    _watched.clear()
    _thread_pid = _thread = None


os.register_at_fork(after_in_child=_forget_after_fork)


def _run() -> None:
    global _thread_pid
    last = time.monotonic()
    while True:
        stuck: list[tuple[Manager, float]] = []
        with _cond:
            if not _watched:
                _thread_pid = None
                return
            _cond.wait(TICK)
            now = time.monotonic()
            elapsed = now - last
            last = now
            on_time = elapsed < _LATE
            for manager, (seen, counted) in list(_watched.items()):
                busy_since = manager.busy_since
                if busy_since is None or busy_since != seen:
                    _watched[manager] = (busy_since, 0.0)
                    continue
                counted += elapsed if on_time else 0.0
                limit = manager.config.stall_timeout
                if limit is not None and counted >= limit:
                    del _watched[manager]
                    stuck.append((manager, counted))
                else:
                    _watched[manager] = (seen, counted)
        for manager, counted in stuck:  # outside the lock: failing futures runs their callbacks
            manager.declare_stuck(counted)
