"""A pool's workers seen as ``multiprocessing.Process`` objects, for code written for the standard library.

Code written before Python 3.14 reaches into ``executor._processes`` (a dict
of pid to ``Process``) to count workers or to terminate them, and CPython's own
tests do too. poolkit's workers are children of its template, not of your
process, so these handles cannot wait for them; they read ``/proc``. A handle
only ever signals its own worker: before each signal it checks that the pid
still belongs to a child of the pool's template, so a pid the system has
reused for another process is never touched.
"""

from __future__ import annotations

import os
import signal
import time

__all__ = ["WorkerProcess"]


class WorkerProcess:
    """One worker: ``pid``, ``is_alive()``, ``terminate()``, ``kill()``, ``join()``, like ``multiprocessing.Process``."""

    def __init__(self, pid: int, worker_id: int, template_pid: int | None) -> None:
        self.pid = pid
        self.worker_id = worker_id
        self.name = f"poolkit-worker-{worker_id}"
        self._template_pid = template_pid

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.name} pid={self.pid} {'alive' if self.is_alive() else 'gone'}>"

    def is_alive(self) -> bool:
        """True while the worker runs (a zombie waiting for its template counts as gone)."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            return False
        state, parent = fields[0], int(fields[1])
        return state not in (b"Z", b"X") and parent == self._template_pid

    def terminate(self) -> None:
        """SIGTERM; the pool fails the job it ran (``WorkerCrashed``) and replaces it."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL; as ``terminate()``, without a chance for the job to clean up."""
        self._signal(signal.SIGKILL)

    def join(self, timeout: float | None = None) -> None:
        """Wait until the worker has ended, or ``timeout`` seconds have passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while self.is_alive():
            if deadline is not None and time.monotonic() >= deadline:
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _signal(self, signum: int) -> None:
        if self.is_alive():
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass
