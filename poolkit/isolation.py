"""What one job leaves in its worker process, and what is put back before the next job.

A worker runs many jobs one after another in the same process, so process
state a job changes would otherwise reach every later job of that worker: an
alarm it armed kills a later job, a ``chdir`` moves a later job's relative
paths, a ``signal.signal(SIGTERM, SIG_IGN)`` makes a later job unkillable by a
timeout's SIGTERM. ``Baseline`` is a snapshot of that state taken once
per worker, after the initializer ran and before the first job (what the
initializer set up is the worker's baseline), and ``restore()`` puts it back
after each job. Only what is cheap to check is covered, because a worker runs
tens of thousands of tiny jobs a second:

* the interval timers (``signal.alarm``, ``signal.setitimer``: real, virtual
  and profiling) that were not armed at the snapshot are cancelled;
* the dispositions of the signals in ``_SIGNALS`` go back to the snapshot's,
  only where they differ (a read of Python's handler table, no system call);
* the working directory, the umask, ``sys.path`` (the same list object, with
  the same entries) and ``os.environ`` (only the variables that differ, set
  through ``context``'s setter, so that no copy is leaked by glibc; a
  changed ``TZ`` also re-runs ``time.tzset()``).

Threads cannot be stopped. ``restore()`` returns the threads alive when a job
ended (the main thread excepted), and the worker drops progress reported by
them, since it can belong to no later job; threads a job starts itself report
as usual. Everything else (module globals, caches, ``sys.modules``, open
files, resource limits, the signal mask, the locale, ...) is left as the job
left it: docs/concepts.md, "What a job leaves for the next one", says why.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
import weakref
from typing import Any

from . import context

__all__ = ["Baseline"]

# The C half of the signal module (see template.py): its getsignal returns the
# stored handler as is, where the Python wrapper builds an enum per call.
_signal: Any = importlib.import_module("_signal")

# Signals whose disposition jobs commonly change: to handle a timeout or a
# parent's request to stop, to ignore a closed pipe or a hangup, to reap
# their own children, to profile themselves.
_SIGNALS = tuple(
    int(getattr(signal, name))
    for name in (
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGUSR1",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGCHLD",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
    )
    if hasattr(signal, name)
)

_NOT_ARMED = (0.0, 0.0)

# Looked up once: restore() runs after every job.
_alarm = signal.alarm
_setitimer = signal.setitimer
_getsignal = _signal.getsignal
_getcwd = os.getcwd
_umask = os.umask
_active_count = threading.active_count


def _restore_signal(signum: int, handler: Any) -> None:
    try:
        _signal.signal(signum, handler)
    except (OSError, ValueError, TypeError):
        pass  # not the main thread (a rehearsal run elsewhere), or a signal Python cannot set


def _read_umask() -> int:
    # No call reads the umask without setting it; the temporary value is a
    # private one, so a file another thread creates meanwhile is not exposed.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


class Baseline:
    """The worker's process state before its first job; ``restore()`` puts it back after each job."""

    __slots__ = (
        "_cancel_alarm",
        "_cancel_timers",
        "_cwd",
        "_environ",
        "_environ_live",
        "_path",
        "_path_list",
        "_signals",
        "_umask",
        "leftover_threads",
    )

    def __init__(self) -> None:
        # A timer already armed now is the worker's own (an initializer's
        # watchdog, or the host of a rehearsal): left alone. ITIMER_REAL is
        # cancelled with signal.alarm(0), the cheapest call that does it.
        self._cancel_alarm = signal.getitimer(signal.ITIMER_REAL) == _NOT_ARMED
        self._cancel_timers = tuple(
            which
            for which in (signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)
            if signal.getitimer(which) == _NOT_ARMED
        )
        self._signals = tuple(
            (signum, handler)
            for signum in _SIGNALS
            # None: set outside Python, and signal.signal could not set it back.
            if (handler := _signal.getsignal(signum)) is not None
        )
        try:
            self._cwd: str | None = os.getcwd()
        except OSError:  # deleted under us: nothing to go back to
            self._cwd = None
        self._umask = _read_umask()
        self._path_list = sys.path
        self._path = list(sys.path)
        data = getattr(os.environ, "_data", None)
        # Compared per job as bytes (os.environ's own dict): no decoding.
        self._environ_live: dict[Any, Any] | None = None
        self._environ: dict[Any, Any]
        if isinstance(data, dict):
            self._environ_live = data
            self._environ = dict(data)
        else:
            self._environ = os.environ.copy()
        self.leftover_threads: weakref.WeakSet[threading.Thread] | None = None
        if threading.active_count() > 1:  # an initializer's threads belong to no job
            self._note_threads()

    def restore(self) -> weakref.WeakSet[threading.Thread] | None:
        """Put back what the last job changed; return the threads that outlived it (None: none ever did)."""
        # Timers first, so that no signal arrives after its handler is reset.
        if self._cancel_alarm:
            _alarm(0)
        for which in self._cancel_timers:
            _setitimer(which, 0.0)
        for signum, handler in self._signals:
            now = _getsignal(signum)
            if now is not handler and now != handler:
                _restore_signal(signum, handler)
        cwd = self._cwd
        if cwd is not None:
            try:
                if _getcwd() != cwd:
                    os.chdir(cwd)
            except OSError:  # the job removed the directory it stood in, or ours
                try:
                    os.chdir(cwd)
                except OSError:
                    pass
        _umask(self._umask)
        path = self._path_list
        if sys.path is not path:
            sys.path = path
        if path != self._path:
            path[:] = self._path
        live = self._environ_live
        if (os.environ.copy() if live is None else live) != self._environ:
            self._restore_environ()
        if _active_count() > 1:
            self._note_threads()
        return self.leftover_threads

    def _restore_environ(self) -> None:
        now = os.environ.copy()
        if self._environ_live is None:
            baseline: dict[str, str] = self._environ
        else:
            decode_key, decode_value = os.environ.decodekey, os.environ.decodevalue
            baseline = {decode_key(k): decode_value(v) for k, v in self._environ.items()}
        environment = context._environment  # putenv with buffers it frees: no glibc copy leaked
        for name in now.keys() - baseline.keys():
            environment.clear(name)
        for name, value in baseline.items():
            if now.get(name) != value:
                environment.set(name, value)
        if now.get("TZ") != baseline.get("TZ"):
            time.tzset()  # the C library read the job's TZ

    def _note_threads(self) -> None:
        leftover = self.leftover_threads
        if leftover is None:
            leftover = self.leftover_threads = weakref.WeakSet()
        main = threading.main_thread()
        for thread in threading.enumerate():
            if thread is not main:
                leftover.add(thread)
