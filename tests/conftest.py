"""Shared helpers and fixtures for the engine and reliability tests.

Two kinds of help live here:

* bounded waits on observable facts (``wait_until``, ``wait_for_file``,
  ``wait_for_pool_size``): a test never sleeps to guess that something has
  happened; it polls for the fact with a deadline and fails loudly if the
  deadline passes;
* the leak check: a pool that is shut down must leave no child process
  (zombies included), no thread and no file descriptor behind. The
  ``leak_check`` fixture records all three before the test and checks after
  it, polling briefly because the kernel reaps and closes asynchronously.

The job functions themselves live in ``tests/jobs.py`` (importable by
reference from every start method, ``spawn`` included).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

import poolkit

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

if str(TESTS_DIR) not in sys.path:  # tests/faults/ imports ``jobs`` too
    sys.path.insert(0, str(TESTS_DIR))


# ----------------------------------------------------------------- bounded waits


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy and return that; fail after ``timeout``.

    This is a bounded wait for a fact (a file exists, a pid is gone), not a
    sleep guess: it returns as soon as the fact holds.
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def wait_for_file(path: Path, timeout: float = 20.0) -> str:
    """Wait until ``path`` exists with non-empty content ending in a newline; return the content.

    Jobs write ``"<text>\\n"`` in one ``write`` so the newline says the write is complete.
    """

    def read() -> str | None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        return text if text.endswith("\n") else None

    return str(wait_until(read, timeout=timeout, what=f"file {path}"))


def wait_for_pid_file(path: Path, timeout: float = 20.0) -> int:
    return int(wait_for_file(path, timeout).strip())


def pid_gone(pid: int) -> bool:
    """True once ``pid`` no longer exists or is a zombie (exited, awaiting its parent's wait)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pid_reaped(pid: int) -> bool:
    """True once ``pid`` is gone entirely: exited *and* waited for (no zombie left)."""
    try:
        proc = psutil.Process(pid)
        proc.status()
    except psutil.NoSuchProcess:
        return True
    return False


def wait_gone(pids: list[int] | set[int], timeout: float = 10.0, what: str = "processes") -> None:
    """Wait until every pid in ``pids`` has exited (zombies count as exited)."""
    wait_until(
        lambda: all(pid_gone(pid) for pid in pids),
        timeout=timeout,
        what=f"{what} {sorted(p for p in pids if not pid_gone(p))} to exit",
    )


def live_workers(stats: poolkit.PoolStats) -> list[poolkit.WorkerInfo]:
    """Workers that count towards the pool's size: starting or ready (not retiring or killing)."""
    return [w for w in stats.workers if w.state in ("starting", "ready")]


def wait_for_pool_size(
    pool: poolkit.Pool, n: int | None = None, timeout: float = 20.0, *, ready: bool = True
) -> poolkit.PoolStats:
    """Wait until the pool has ``n`` (default: ``max_workers``) live workers; return that snapshot.

    Respawning is asynchronous, so a test that wants to see "the pool is back
    to full size" polls ``stats()`` with a deadline. With ``ready=True`` the
    workers must also have a pid and be in state ``ready``.
    """
    want = pool.max_workers if n is None else n

    def full() -> poolkit.PoolStats | None:
        stats = pool.stats()
        workers = [w for w in stats.workers if w.state == "ready"] if ready else live_workers(stats)
        if len(workers) == want and all(w.pid for w in workers):
            return stats
        return None

    return wait_until(full, timeout=timeout, what=f"{want} live workers in {pool!r}")  # type: ignore[no-any-return]


def pool_error_of_first_job(pool: poolkit.Pool, timeout: float = 30.0) -> BaseException:
    """Submit one job to a pool that is expected to break while starting; return the pool's error.

    A pool starts its workers as it is built, so a worker that fails within
    milliseconds may break the pool before the job is submitted. The job then
    fails at submit with a BrokenPool whose ``__cause__`` is the pool's error;
    otherwise its future fails with that error. Either way the same error
    comes back, so a test checks it without guessing which way the race went.
    """
    try:
        future = pool.submit(abs, -1)
    except poolkit.BrokenPool as refused:
        assert refused.__cause__ is not None, "a refused job must say why the pool broke"
        return refused.__cause__
    error = future.exception(timeout=timeout)
    assert error is not None, "the job ran on a pool that should have broken"
    return error


def worker_pids(pool: poolkit.Pool) -> set[int]:
    return {w.pid for w in pool.stats().workers if w.pid}


def descendants() -> list[psutil.Process]:
    """Every process below this one (zombies included)."""
    return psutil.Process().children(recursive=True)


# ----------------------------------------------------------------- leak check


def _open_fds() -> set[int]:
    # listdir opens one descriptor itself; it is the same number before and after.
    return {int(name) for name in os.listdir("/proc/self/fd")}


def _describe_fd(fd: int) -> str:
    try:
        return f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError:
        return f"{fd} (closed meanwhile)"


@dataclass
class LeakCheck:
    """What this process had before a test: child processes, threads and open fds.

    ``check()`` waits (bounded) until all of them are back to what they were,
    and fails naming what is left: a child (with its status, so a zombie is
    visible as one), a thread (by name) or a descriptor (with what it points to).
    """

    children: set[int] = field(default_factory=set)
    threads: set[threading.Thread] = field(default_factory=set)
    fds: set[int] = field(default_factory=set)
    checked: bool = False

    @classmethod
    def snapshot(cls) -> LeakCheck:
        return cls(
            children={p.pid for p in descendants()},
            threads=set(threading.enumerate()),
            fds=_open_fds(),
        )

    def leftovers(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        extra_children = []
        for proc in descendants():
            if proc.pid in self.children:
                continue
            try:
                extra_children.append(f"pid {proc.pid} {proc.status()} {proc.cmdline()}")
            except psutil.Error:
                extra_children.append(f"pid {proc.pid}")
        if extra_children:
            found["children"] = extra_children
        extra_threads = [
            t.name for t in threading.enumerate() if t not in self.threads and t.is_alive()
        ]
        if extra_threads:
            found["threads"] = extra_threads
        extra_fds = [_describe_fd(fd) for fd in sorted(_open_fds() - self.fds)]
        if extra_fds:
            found["fds"] = extra_fds
        return found

    def check(self, timeout: float = 10.0) -> None:
        """Fail unless every child, thread and fd made since the snapshot is gone within ``timeout``."""
        self.checked = True
        deadline = time.monotonic() + timeout
        while True:
            found = self.leftovers()
            if not found:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"left behind after shutdown: {found}")
            time.sleep(0.02)


@pytest.fixture
def leak_check() -> Iterator[LeakCheck]:
    """Record children, threads and fds; after the test (if it did not call ``check()`` itself), check them.

    Use it in tests that create and shut down pools. A test that checks in
    its body (to assert before other teardown runs) calls ``leak_check.check()``.
    """
    snapshot = LeakCheck.snapshot()
    yield snapshot
    if not snapshot.checked:
        snapshot.check()


# ----------------------------------------------------------------- subprocess scripts


def read_pty(master: int, proc: subprocess.Popen[bytes], deadline: float) -> bytes:
    """All that ``proc`` writes to the pseudo-terminal ``master`` until it closes it or exits.

    A live display is checked on a real terminal (rich draws only there); the
    reader stops at end of stream, when the process has exited and nothing is
    left to read, or at ``deadline`` (a bound, so a hung process fails the test).
    """
    chunks: list[bytes] = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the other side closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    return b"".join(chunks)


def python_env() -> dict[str, str]:
    """Environment for a child interpreter that must import poolkit and ``tests/jobs.py``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS_DIR), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


START_METHODS = ("fork", "forkserver", "spawn")
