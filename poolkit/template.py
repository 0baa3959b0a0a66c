"""The template: a single-threaded process that forks workers on request.

Forking from the user's process is unsafe once it has threads (the pool's own
manager thread makes it so): a lock held by another thread at the moment of
the fork stays locked forever in the child. So each pool starts one template
process early, while it is cheap to copy, and every worker is forked from the
template instead. The template never runs a job; it only

* forks a worker when the pool sends SPAWN (the worker's socket arrives as
  SCM_RIGHTS on the control socket); the pool's WorkerConfig is unpickled
  once, here, and every worker inherits it, so a recycled worker reads no
  CONFIG frame and imports nothing its template has not imported already,
* reaps its children (SIGCHLD through a wake-up fd) and reports each exit
  status with EXITED, then kills what is left of the worker's process group
  so that a job's own children die with it,
* sends signals to its workers on KILL (it knows which pids are still its
  unreaped children, so a signal never reaches a recycled pid),
* exits when the control socket reaches end of stream, killing any worker
  still alive: that is what happens when the pool's process dies.

With ``start_method="fork"`` the template is an ``os.fork()`` of the pool's
process (``serve_forked``), which forks the pool's first workers before its
own set-up, so a cold start waits for two forks and no more. With
``"forkserver"`` and ``"spawn"`` it is a fresh interpreter, and with
``"spawn"`` each worker also ``exec``s a fresh interpreter.
"""

from __future__ import annotations

import array
import contextlib
import gc
import importlib
import json
import os
import select
import signal
import socket
import stat
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from . import wire
from .config import WorkerConfig
from .limits import Enforcer, JobWatch, LimitArea
from .worker import load_config, load_prctl, rehearse, set_parent_death_signal, worker_socket
from .worker import serve as serve_worker

# The C half of the signal module, without the Python wrappers that convert
# to enums (see become_worker). Untyped: typeshed has no stub for it.
_signal: Any = importlib.import_module("_signal")

__all__ = ["main", "neutralize_inherited_fds", "serve", "serve_forked", "stdin_from_devnull"]


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 255


class _ParentGone(Exception):
    pass


# Built once: between two forks every object the loop touches is a
# copy-on-write fault in this process (see _Template.loop).
_SPAWN = int(wire.Kind.SPAWN)
_KILL = int(wire.Kind.KILL)
_WORKER_CONFIG = int(wire.Kind.WORKER_CONFIG)
_LIMITS = int(wire.Kind.LIMITS)
_FD_SIZE = array.array("i").itemsize
_SIGKILL = int(signal.SIGKILL)
_RESET_SIGNALS = (int(signal.SIGCHLD), int(signal.SIGINT), int(signal.SIGTERM))
_SIG_DFL = int(signal.SIG_DFL)
# Seconds without a message after which the template runs its rehearsal
# (see _Template.rehearse_once), unless a fork it is asked for comes first.
_REHEARSE_WHEN_IDLE = 0.05
# A worker's exit code when it fails before its loop takes over (EX_SOFTWARE):
# the loop itself never returns, so only an error in its set-up gets here.
_START_FAILED = 70


class _Template:
    def __init__(
        self,
        control: socket.socket,
        exec_workers: bool,
        sys_path: list[str],
        config: WorkerConfig | BaseException | None,
        parent_pid: int,
        area: LimitArea,
    ) -> None:
        self.control = control
        self.parent_pid = parent_pid
        self.exec_workers = exec_workers
        self.sys_path = sys_path
        # None until the pool's WORKER_CONFIG frame arrives (a fresh-interpreter
        # template); an exception if it would not load (each worker reports it).
        self.config = config
        self.reader = wire.FrameReader()
        self.fds: deque[int] = deque()
        self.children: dict[int, int] = {}  # pid -> worker_id
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        # select.epoll itself, not the selectors module: every object the loop
        # touches between two forks is a copy-on-write fault in this process.
        self.epoll = select.epoll()
        self.ancillary_size = socket.CMSG_SPACE(64 * _FD_SIZE)  # up to 64 sockets per read
        self.own_fds = (self.epoll.fileno(), self.wake_r, self.wake_w, control.fileno())
        self.area = area
        self.enforcer = Enforcer(area, self.signal_group, self.send)
        # kill_grace, memory limit, check interval: the pool's LIMITS frame sets them.
        self.limits: tuple[float, int | None, float] = (1.0, None, 1.0)
        self.limits_changed = False
        # A worker that execs starts from a fresh interpreter: nothing to rehearse for it.
        self.rehearsed = exec_workers

    def run(self, started: list[tuple[int, int, int]]) -> None:
        """Serve until the pool goes away; ``started``: (worker id, pid, limit slot) of workers forked already."""
        load_prctl()
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # The pool's process died (parent-death signal, SIGTERM so that it can
        # be caught): kill every worker's process group, the jobs' children too.
        signal.signal(signal.SIGTERM, self.on_parent_death)
        missed = os.getppid() != self.parent_pid  # it died while the signal was ignored (_die_with)
        self.control.setblocking(True)
        self.epoll.register(self.control.fileno(), select.EPOLLIN)
        self.epoll.register(self.wake_r, select.EPOLLIN)
        self.epoll.register(self.area.ring_r, select.EPOLLIN)
        # The pool is gone when the loop ends (end of stream) or the parent-death
        # signal interrupts it; whichever comes first, the other must not cut the
        # clean-up short, hence SIGTERM ignored before kill_all.
        try:
            try:
                if missed:
                    raise _ParentGone
                for worker_id, pid, slot in started:
                    self.children[pid] = worker_id
                    self.enforcer.add(pid, slot, worker_id)
                    self.send(wire.encode_spawned(worker_id, pid))
                self.reap()  # one may have died before SIGCHLD had a handler here
                self.loop()
            finally:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
        except _ParentGone:
            pass
        self.kill_all()

    def on_parent_death(self, signum: int, frame: object) -> None:
        # Linux sends the parent-death signal when the *thread* that started
        # this process ends, and again whenever it is handed to another parent.
        # Only a new parent means the pool's process is gone; a pool made in a
        # thread that has since finished is still there.
        if os.getppid() == self.parent_pid:
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once
        raise _ParentGone

    def loop(self) -> None:
        # Every page this loop writes between two forks is copied once more
        # (the newest worker still shares it), so the loop keeps to a few
        # locals, module constants and C calls: one copy-on-write fault costs
        # more than the Python it saves.
        control_fd = self.control.fileno()
        poll = self.epoll.poll
        ring_r = self.area.ring_r
        read = os.read
        due: float | None = None  # seconds until a limit may be due (limits.py); None: none watched
        while True:
            rang = False
            timeout = -1 if due is None else due
            if not self.rehearsed:
                timeout = _REHEARSE_WHEN_IDLE if due is None else min(due, _REHEARSE_WHEN_IDLE)
            events = poll(timeout)
            if not events and not self.rehearsed:
                self.rehearse_once()
            for fd, _ in events:
                if fd == control_fd:
                    if not self.read_control():
                        return
                else:
                    rang = rang or fd == ring_r
                    try:
                        while read(fd, 4096):
                            pass
                    except BlockingIOError:
                        pass
            if self.children:
                self.reap()
            if rang or due is not None or self.limits_changed:
                self.limits_changed = False
                due = self.enforcer.enforce(time.monotonic(), *self.limits)

    def read_control(self) -> bool:
        try:
            data, ancillary, _flags, _addr = self.control.recvmsg(1 << 16, self.ancillary_size)
        except InterruptedError:
            return True
        except OSError:
            return False
        for level, kind, fds in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                self.fds.extend(array.array("i", fds[: len(fds) - len(fds) % _FD_SIZE]))
        if not data:
            return False
        self.reader.feed(data)
        for kind, body in self.reader.frames():
            if kind == _SPAWN:
                worker_id, max_jobs = wire.decode_spawn(body)
                self.fork_worker(worker_id, max_jobs, self.fds.popleft())
            elif kind == _KILL:
                pid, signum = wire.decode_kill(body)
                if pid in self.children:
                    self.signal_group(pid, signum)
            elif kind == _LIMITS:
                self.limits = wire.decode_limits(body)
                self.limits_changed = True
            elif kind == _WORKER_CONFIG:
                self.config = load_config(body)
                gc.freeze()  # what it imported and built is shared by every worker (see serve)
        return True

    @staticmethod
    def signal_group(pid: int, signum: int) -> None:
        try:
            os.killpg(pid, signum)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    def rehearse_once(self) -> None:
        """Run a worker's path here once (``worker.rehearse``), so that later workers start warm.

        Not when the template starts: then its first workers are starting and
        the pool's process is waiting for their first results, all on the same
        cores. It runs once the template has been idle for a moment, or before
        the first fork it is asked for, whichever comes first.
        """
        self.rehearsed = True
        config = self.config
        try:
            rehearse(shm_threshold=config.shm_threshold if isinstance(config, WorkerConfig) else None)
        except Exception:
            pass  # only a speed-up; a worker with the same trouble reports it itself
        gc.freeze()  # what the rehearsal left is shared by every later worker (see serve)

    def fork_worker(self, worker_id: int, max_jobs: int, fd: int) -> None:
        if not self.rehearsed:
            self.rehearse_once()
        slot = self.area.take()
        pid = os.fork()
        if pid == 0:
            self.become_worker(worker_id, max_jobs, fd, slot)
        os.close(fd)
        self.children[pid] = worker_id
        self.enforcer.add(pid, slot, worker_id)
        self.send(wire.encode_spawned(worker_id, pid))

    def become_worker(self, worker_id: int, max_jobs: int, fd: int, slot: int) -> None:
        try:
            _enter_worker()
            # The template's own descriptors, closed by number: the objects that
            # hold them are never used again (the worker leaves by os._exit), and
            # their Python-level close methods would only copy more pages.
            for other in self.own_fds:
                os.close(other)
            for other in self.fds:
                os.close(other)  # other workers' sockets: each worker holds only its own
            area = self.area
            os.close(area.ring_r)
            if self.exec_workers:
                for inherited in (fd, area.fd, area.ring_w):
                    os.set_inheritable(inherited, True)
                os.execv(
                    sys.executable,
                    [
                        sys.executable,
                        "-c",  # not -m: the package imports poolkit.worker itself
                        "from poolkit.worker import main; main()",
                        str(fd),
                        json.dumps(self.sys_path),
                        f"{area.fd},{area.ring_w},{slot}",
                    ],
                )
            os.close(area.fd)  # the mapping stays
            config = self.config
            if config is None:
                config = RuntimeError("the template forked a worker before it had the pool's config")
            watch = JobWatch(area.slots, slot, area.ring_w, memory=False) if slot >= 0 else None
            serve_worker(worker_socket(fd), worker_id, max_jobs, config, watch)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(_START_FAILED)

    def send(self, data: bytes) -> None:
        try:
            self.control.sendall(data)
        except OSError:
            pass  # the pool is gone; end of stream on the next read ends the template

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker_id = self.children.pop(pid, None)
            if worker_id is None:
                continue
            self.enforcer.remove(pid)
            # A job's own children die with their worker (unless they left its group).
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.send(wire.encode_exited(worker_id, pid, _exit_code(status)))

    def kill_all(self) -> None:
        for pid in list(self.children):
            self.signal_group(pid, signal.SIGKILL)
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self.children.clear()


def _enter_worker() -> None:
    """What every worker does first: its own process group, death with its parent, default signals."""
    os.setpgid(0, 0)
    set_parent_death_signal(_SIGKILL)
    # The C functions with plain ints: the signal module's Python wrappers
    # convert to enums, and every page they touch is a copy-on-write fault here.
    _signal.set_wakeup_fd(-1)
    for signum in _RESET_SIGNALS:
        _signal.signal(signum, _SIG_DFL)


def _first_worker(
    fd: int,
    template_fds: Sequence[int],
    worker_id: int,
    max_jobs: int,
    config: WorkerConfig,
    area: LimitArea,
    slot: int,
) -> None:
    """A worker forked by a fork template as it starts; never returns.

    ``template_fds``: the template's control socket and the other first
    workers' sockets, which this worker closes; the rest of the cutting off
    from the pool's process was done by the template before the fork.
    """
    try:
        for other in (*template_fds, *area.template_only_fds()):
            os.close(other)
        gc.freeze()  # as the template does before later forks (see serve)
        _enter_worker()
        watch = JobWatch(area.slots, slot, area.ring_w, memory=False) if slot >= 0 else None
        serve_worker(worker_socket(fd), worker_id, max_jobs, config, watch)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(_START_FAILED)


def serve_forked(
    control: socket.socket,
    *,
    first: Sequence[tuple[int, int, int]],
    inherited: Sequence[int],
    parent_pid: int,
    sys_path: list[str],
    config: WorkerConfig,
) -> None:
    """Run a template that has just been forked from the pool's process; never returns.

    ``first``: (worker id, job budget or 0, socket fd) of the workers to fork at once;
    ``config``: the pool's WorkerConfig, as it is in the pool's memory (nothing pickled);
    ``inherited``: the pool's descriptors this process must not keep;
    ``parent_pid``: the pool's process, which this template dies with.

    The first workers are forked as soon as this process is cut off from the
    pool's (its sockets, its stdin), which they inherit; the rest of the
    template's set-up comes after: a cold start waits for two forks in a row
    and that one step, done once rather than in each process.
    """
    started: list[tuple[int, int, int]] = []
    try:
        first_fds = [fd for _, _, fd in first]
        neutralize_inherited_fds(inherited, keep={control.fileno(), *first_fds})
        stdin_from_devnull()
        area = LimitArea()  # before the first fork: the first workers post their jobs too
        for worker_id, max_jobs, fd in first:
            slot = area.take()
            pid = os.fork()
            if pid == 0:
                others = [control.fileno(), *(other for other in first_fds if other != fd)]
                _first_worker(fd, others, worker_id, max_jobs, config, area, slot)
            started.append((worker_id, pid, slot))
        for fd in first_fds:
            os.close(fd)
        _die_with(parent_pid)
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)
    serve(
        control,
        exec_workers=False,
        sys_path=sys_path,
        parent_pid=parent_pid,
        area=area,
        started=started,
        config=config,
    )


def _die_with(parent_pid: int) -> None:
    """Ask for SIGTERM when the pool's process ends (see ``_Template.on_parent_death``).

    If it ended before the request was made, no signal will ever come: leave now.
    Until the template's own handler is in place (``_Template.run``, which
    looks at its parent again then), the signal is ignored: a first worker
    can answer its first job before that, and the thread that started this
    process may end at once, which also sends the signal.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:
        os._exit(0)


def neutralize_inherited_fds(poolkit_fds: Sequence[int], keep: set[int]) -> None:
    """In a process forked from the pool's: cut it off from the parent's sockets and other pools' channels.

    A forked template would otherwise hold a copy of every socket the parent
    had open, so a TCP peer would never see the parent close its connection
    and a listening socket would stay bound in every worker. Sockets and
    poolkit's own descriptors are pointed at /dev/null with ``dup2`` rather
    than closed: their numbers stay taken, so a Python object in the copied
    memory that still holds one can never write into a descriptor the
    process opens later. Regular files, pipes and terminals are inherited
    as a fork inherits them (a log file opened before the pool still works).
    """
    targets = set(poolkit_fds)
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        names = []
    for name in names:
        fd = int(name)
        if fd <= 2 or fd in keep or fd in targets:
            continue
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                targets.add(fd)
        except OSError:
            pass
    targets -= keep
    if not targets:
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd in targets:
        if fd == null:
            continue
        try:
            os.dup2(null, fd, inheritable=False)
        except OSError:
            pass
    os.close(null)


def stdin_from_devnull() -> None:
    """In a process forked from the pool's: stdin from ``/dev/null``, as the standard library's workers have it.

    A forked worker shares your program's stdin: a job that read it would take
    the input your program is reading (a ``readline`` takes a whole buffer
    of it). The descriptor itself is replaced, not only ``sys.stdin``, so C
    code and the subprocesses of a job read end of file too. Templates
    started as new interpreters (forkserver, spawn) get ``/dev/null`` when
    they start.
    """
    devnull = os.open(os.devnull, os.O_RDONLY)
    if devnull != 0:
        os.dup2(devnull, 0)
        os.close(devnull)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 - fd 0 lives as long as the process


def serve(
    control: socket.socket,
    *,
    exec_workers: bool,
    sys_path: list[str],
    parent_pid: int,
    area: LimitArea | None = None,
    started: Sequence[tuple[int, int, int]] = (),
    config: WorkerConfig | BaseException | None = None,
) -> None:
    """Run the template loop; never returns (leaves through ``os._exit``).

    ``area``: the limit slots, when workers were forked before this call;
    ``started``: (worker id, pid, limit slot) of workers already forked (see ``serve_forked``);
    ``config``: the workers' config, or None when the pool sends it (WORKER_CONFIG).
    """
    code = 0
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    # Every object alive now is shared with every worker. Frozen (as CPython's
    # gc docs advise before forking), they are left out of the workers'
    # collections, which would otherwise write to their pages and so copy them
    # into each long-lived worker.
    gc.freeze()
    try:
        _Template(
            control, exec_workers, sys_path, config, parent_pid, area or LimitArea()
        ).run(list(started))
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def main() -> None:
    """Entry point of a template started as a fresh interpreter (forkserver and spawn)."""
    fd = int(sys.argv[1])
    exec_workers = sys.argv[2] == "spawn"
    sys_path = json.loads(sys.argv[3])
    preload = json.loads(sys.argv[4])
    parent_pid = int(sys.argv[5])
    sys.path[:] = sys_path
    _die_with(parent_pid)
    for module in preload:
        __import__(module)
    serve(
        socket.socket(fileno=fd), exec_workers=exec_workers, sys_path=sys_path, parent_pid=parent_pid
    )


if __name__ == "__main__":
    main()
