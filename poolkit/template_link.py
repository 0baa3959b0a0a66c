"""The pool's side of its template process: start it, stop it, ask it for workers, read what it says.

The template forks every worker and reaps it (``template.py``); the pool talks
to it over one socket pair, the *control* socket. This module is the only
place that starts or stops a template and the only one that builds its SPAWN
and KILL frames. It decides nothing: the manager says when to spawn or kill
and acts on what ``TemplateLink.read`` returns.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import sys
import warnings
from typing import Any

from . import serialization, wire
from .config import PoolConfig
from .serialization import MainRefs, snapshot_main

# Everything the fork template and its workers run is imported here, in the
# parent, once: a forked template then starts without importing (or compiling)
# anything, which is most of a cold start.
from .template import serve_forked as serve_forked_template
from .worker import load_prctl

load_prctl()

__all__ = ["TemplateLink"]

# What the template reports: (kind, its decoded fields).
Event = tuple[int, tuple[int, ...]]


class TemplateLink:
    """One pool's template process and the control socket to it."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.pid: int | None = None
        self.control: socket.socket | None = None
        # The __main__ objects the template (and so every worker) shares with
        # this process; jobs pickle those by name (see serialization.py).
        self.main_refs: MainRefs = {}
        # spawn: each worker is a fresh interpreter and gets the config in its first frame.
        self.exec_workers = config.start_method == "spawn"
        self.config_bytes = b""  # the pickled WorkerConfig, for templates and workers that are not forks
        self._popen: Any = None  # subprocess.Popen of an exec'd template
        self._reader = wire.FrameReader()

    def start(self, first: list[tuple[int, int, socket.socket]], inherited: list[int]) -> None:
        """Start the template as the pool's start method says.

        ``first`` (fork only): the workers to fork at once, as (worker_id,
        max_jobs or 0, the worker's socket end), so that a cold start waits
        neither for the manager's thread nor for a SPAWN round trip.
        ``inherited``: descriptors of this process a forked template must let
        go of (every pool's sockets and pipes).
        """
        method = self.config.start_method
        parent_end, child_end = socket.socketpair()
        if method == "fork":
            self.main_refs = snapshot_main()
            # The template is a copy of this process: it takes the config as it is
            # in memory, nothing pickled, as the standard library's fork workers
            # take their initargs. So multiprocessing's queues and locks work as
            # initargs, and the initializer and finalizer are this process's own
            # objects: the globals they set are the ones jobs read.
            worker_config = self.config.worker_config()
            neutralize_in_child = [*inherited, parent_end.fileno()]
            parent_pid = os.getpid()
            pid = _fork_template()
            if pid == 0:  # the template
                serialization.process_main_refs = self.main_refs
                serve_forked_template(
                    child_end,
                    first=[(worker_id, max_jobs, end.fileno()) for worker_id, max_jobs, end in first],
                    inherited=neutralize_in_child,
                    parent_pid=parent_pid,
                    sys_path=list(sys.path),
                    config=worker_config,
                )
            self.pid = pid
        else:
            import json
            import subprocess

            self.main_refs = {}  # a fresh interpreter shares no __main__ objects with us
            fd = child_end.fileno()
            # Pickled as multiprocessing pickles a new process's arguments, so its
            # queues, locks and manager proxies can be initargs: the descriptors
            # they hold are passed to the template at the same numbers, and every
            # worker inherits them; the workers also get this process's authkey.
            self.config_bytes, shared_fds = serialization.dumps_for_new_process(
                self.config.worker_config(authkey=bytes(multiprocessing.current_process().authkey)),
                self.main_refs,
            )
            self._popen = subprocess.Popen(
                [
                    sys.executable,
                    "-c",  # not -m: the package imports poolkit.template itself
                    "from poolkit.template import main; main()",
                    str(fd),
                    method,
                    json.dumps(sys.path),
                    json.dumps(list(self.config.preload)),
                    str(os.getpid()),
                ],
                pass_fds=[fd, *shared_fds],
                stdin=subprocess.DEVNULL,
            )
            self.pid = self._popen.pid
        child_end.close()
        parent_end.setblocking(True)
        self.control = parent_end
        self._reader = wire.FrameReader()
        if method == "forkserver":  # before any SPAWN: the template loads it once for all workers
            self._send(wire.encode_worker_config(self.config_bytes))
        config = self.config
        self._send(
            wire.encode_limits(config.kill_grace, config.memory_limit_per_child, config.memory_check_interval)
        )

    def stop(self) -> None:
        """Close the control socket (the template then kills its workers and exits) and reap it."""
        self.close()
        if self._popen is not None:
            self._popen.wait()
            self._popen = None
        elif self.pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        self.pid = None

    def close(self) -> None:
        """Close the control socket only (the pool is going away; nobody waits for the template)."""
        if self.control is not None:
            self.control.close()
            self.control = None

    def read(self) -> list[Event] | None:
        """What the template said (SPAWNED, EXITED, LIMIT with their fields); None once it is gone."""
        assert self.control is not None
        try:
            data = self.control.recv(1 << 16)
        except (ConnectionResetError, OSError):
            data = b""
        if not data:
            return None
        self._reader.feed(data)
        events: list[Event] = []
        for kind, body in self._reader.frames():
            if kind == wire.Kind.SPAWNED:
                events.append((kind, wire.decode_spawned(body)))
            elif kind == wire.Kind.EXITED:
                events.append((kind, wire.decode_exited(body)))
            elif kind == wire.Kind.LIMIT:
                events.append((kind, wire.decode_limit(body)))
        return events

    def spawn(self, worker_id: int, max_jobs: int | None, sock: socket.socket) -> bool:
        """Ask for a worker that talks over ``sock`` (passed as SCM_RIGHTS); False if the template is gone."""
        return self._send(wire.encode_spawn(worker_id, max_jobs), [sock.fileno()])

    def kill(self, pid: int, signum: int) -> bool:
        """Ask the template to signal worker ``pid``'s process group; False if the template is gone."""
        return self._send(wire.encode_kill(pid, signum))

    def _send(self, data: bytes, fds: list[int] | None = None) -> bool:
        control = self.control
        if control is None:
            return False
        try:
            if fds:
                socket.send_fds(control, [data], fds)
            else:
                control.sendall(data)
        except OSError:
            return False
        return True


def _fork_template() -> int:
    """``os.fork()`` for a template, holding the locks that the template and its workers take.

    The template exists so that workers are never forked from the pool's
    process, which has threads. The template itself is forked from it (when
    the pool starts, and again if the template dies), so a lock that another
    thread holds at that moment would stay held in the template and every
    worker. The one such lock that unpickling a job takes is cloudpickle's
    class tracker (dynamic classes); it is held across the fork, so both
    sides see it free. The interpreter's own locks (imports, the GIL) are
    reset by CPython after a fork.
    """
    tracker = getattr(sys.modules.get("cloudpickle.cloudpickle"), "_DYNAMIC_CLASS_TRACKER_LOCK", None)
    with warnings.catch_warnings():
        # The template exists to make this the only fork from a threaded process.
        warnings.simplefilter("ignore", DeprecationWarning)
        if tracker is None:
            return os.fork()
        with tracker:
            return os.fork()
