"""The worker: the loop that runs inside each child process.

A worker reads frames from its one socket to the pool, runs each job in order
and writes one RESULT frame per job. It decides nothing about scheduling; it
only reports, after each job, what it measured (wall and CPU time, peak RSS
during the job, RSS after it). Two rules make crash handling exact:

* jobs run strictly in the order they arrive, and every job gets exactly one
  RESULT before the next job starts, so the pool knows that the oldest
  unanswered job is the one a dead worker was running; a job sent ahead
  (JOB_AHEAD) starts only if the worker claims its token first, and one the
  pool took back is skipped without an answer (claims.py);
* when the worker retires on its own (RSS above ``max_memory_per_child``) it
  sends RESULT of its last job, then RETIRING, then exits 0; jobs it had
  received but not started are still unanswered, and the pool re-queues them.
  A job that calls ``os._exit(0)`` sends no RETIRING, so it is a crash.

The worker always leaves through ``os._exit`` so that ``atexit`` handlers
inherited from the parent (a fork copies them) never run twice.
"""

from __future__ import annotations

import os
import resource
import socket
import sys
import threading
import time
import weakref
from collections import deque
from typing import Any, NoReturn

from . import claims, context, share, shm, wire
from .config import WorkerConfig
from .isolation import Baseline
from .limits import JobWatch, counted_memory, map_area, memory_over
from .serialization import dumps, dumps_error, format_exception, loads

__all__ = ["load_config", "main", "rehearse", "serve", "worker_socket"]


_NOT_OPENED = -1  # a /proc file not tried yet; None: tried, and it would not open


def _open_proc(path: str, flags: int) -> int | None:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError:
        return None


class _Memory:
    """Reads the memory this process's limits count (limits.counted_memory) and resets its peak RSS.

    Each /proc file is opened on first use and kept open.
    """

    def __init__(self) -> None:
        self._statm: int | None = _NOT_OPENED
        self._clear_refs: int | None = _NOT_OPENED

    def reset_peak(self) -> None:
        if self._clear_refs == _NOT_OPENED:
            self._clear_refs = _open_proc("/proc/self/clear_refs", os.O_WRONLY)
        if self._clear_refs is not None:
            try:
                os.write(self._clear_refs, b"5")
            except OSError:
                self._clear_refs = None

    def rss(self) -> int:
        if self._statm == _NOT_OPENED:
            self._statm = _open_proc("/proc/self/statm", os.O_RDONLY)
        if self._statm is not None:
            try:
                return counted_memory(os.pread(self._statm, 128, 0))
            except (OSError, ValueError, IndexError):
                pass
        return 0

    def close(self) -> None:
        for fd in (self._statm, self._clear_refs):
            if fd is not None and fd != _NOT_OPENED:
                os.close(fd)
        self._statm = self._clear_refs = _NOT_OPENED

    @staticmethod
    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Channel:
    """The worker's end of its socket: blocking sends for results, non-blocking ones for progress.

    One lock orders every send: a thread the job started may report progress
    while the worker sends a result, and two frames must never interleave.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = wire.FrameReader()
        self._pending_progress: bytes | None = None
        self._lock = threading.Lock()
        self.shm_threshold: int | None = None  # results with pieces this large go through shared memory
        self.seq = 0  # the job running now
        # Threads that outlived an earlier job (see Baseline.restore): their
        # progress belongs to no job running now, and is dropped.
        self.leftover_threads: weakref.WeakSet[threading.Thread] | None = None

    def send(self, data: bytes) -> None:
        with self._lock:
            self._flush_progress(block=True)
            self.sock.sendall(data)

    def send_fds(self, data: bytes, fds: list[int]) -> None:
        """Send ``data`` with ``fds`` going along with its first byte."""
        with self._lock:
            self._flush_progress(block=True)
            sent = socket.send_fds(self.sock, [data], fds)
            if sent < len(data):
                self.sock.sendall(data[sent:])

    def send_parts(self, head: bytes, body: bytes, region: shm.Region | None = None) -> None:
        """Send head and body as one frame without joining them (a large result is not copied).

        A ``region`` goes with the frame's first byte, and is closed once sent.
        """
        with self._lock:
            self._flush_progress(block=True)
            if region is not None:
                try:
                    sent = self.sock.sendmsg([head, body], shm.fds_message(region))
                finally:
                    region.close()
            elif len(body) < 65536:
                self.sock.sendall(head + body)
                return
            else:
                sent = self.sock.sendmsg([head, body])
            if sent < len(head):
                self.sock.sendall(head[sent:])
                sent = len(head)
            if sent < len(head) + len(body):
                self.sock.sendall(memoryview(body)[sent - len(head) :])

    def report(self, value: Any) -> None:
        """``report_progress`` for the job running now (no closure to build per job)."""
        seq = self.seq  # read first: a thread seen here with a newer seq is in leftover_threads
        leftover = self.leftover_threads
        if leftover is not None and threading.current_thread() in leftover:
            return
        self.progress(seq, value)

    def progress(self, seq: int, value: Any) -> None:
        data = wire.encode_progress(seq, dumps(value))
        with self._lock:
            self._pending_progress = data
            self._flush_progress(block=False)

    def _flush_progress(self, *, block: bool) -> None:
        data = self._pending_progress
        if data is None:
            return
        if block:
            self._pending_progress = None
            self.sock.sendall(data)
            return
        try:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return  # parent is slow: keep only the latest value, send it later
        self._pending_progress = None
        if sent < len(data):
            # A frame must never be cut: finish the small remainder blocking.
            self.sock.sendall(data[sent:])


def _run_job(
    channel: _Channel,
    body: bytes | bytearray,
    worker_id: int,
    memory: _Memory,
    watch: JobWatch | None = None,
    incoming: shm.Incoming | None = None,
) -> None:
    seq, attempt, timeout, meta, payload = wire.decode_job(body)
    channel.seq = seq
    job_id: str = str(seq)
    job_type: str | None = None
    if meta is not None:
        job_id, job_type = loads(meta)
    started = time.perf_counter()
    cpu_started = time.process_time()
    deadline = time.monotonic() + timeout if timeout else None
    # Posted for the template, which stops the job at its deadline or over the
    # memory limit even while the pool's process cannot act (limits.py).
    if watch is not None and (deadline is not None or watch.memory):
        watch.start(seq, deadline or 0.0)
    else:
        watch = None
    context.enter_job(
        context.JobContext(job_id, job_type, worker_id, attempt, deadline),
        channel.report,
    )
    region: shm.Region | None = None
    try:
        try:
            fn, args, kwargs = shm.loads(payload, incoming)
        except BaseException as exc:  # SystemExit from a hostile __reduce__ too
            outcome = wire.OUTCOME_NOT_LOADED
            data = dumps_error(exc)
        else:
            del payload, incoming
            value = fn(*args, **kwargs)
            outcome = wire.OUTCOME_VALUE
            try:
                data, region = shm.dumps(value, channel.shm_threshold)
            except BaseException as exc:  # the result itself will not pickle (or fit in memory)
                outcome = wire.OUTCOME_ERROR
                data = dumps_error(exc)
            del value
    except BaseException as exc:  # the job's own exception, SystemExit included
        outcome = wire.OUTCOME_ERROR
        data = dumps_error(exc)
    finally:
        context.leave_job()
        if watch is not None:
            watch.stop()
    head = wire.encode_result_head(
        seq,
        outcome,
        time.perf_counter() - started,
        time.process_time() - cpu_started,
        memory.peak(),
        memory.rss(),
        len(data),
    )
    channel.send_parts(head, data, region)


def _finalize(config: WorkerConfig) -> None:
    if config.finalizer is None:
        return
    try:
        config.finalizer(*config.finalargs)
    except BaseException as exc:
        sys.stderr.write(f"poolkit: finalizer of worker failed: {format_exception(exc)}")


def _exit(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
    os._exit(code)


class _Inbox:
    """The frames this worker has received and not handled yet, in order.

    Before each job queued as a plain JOB it also takes, without blocking,
    whatever else has arrived, so that a CANCEL sent for it is seen before it
    starts. A JOB_AHEAD needs no such look: the pool cancels one by taking
    back its token (claims.py).
    """

    def __init__(self, channel: _Channel) -> None:
        self.sock = channel.sock
        self.reader = channel.reader
        self.scratch = wire.scratch_buffer(1 << 18)  # every read goes through it (see FrameReader.receive)
        self.frames: deque[tuple[int, bytes | bytearray]] = deque()
        self.fds = shm.FdQueue()  # shared-memory regions received with frames (shm.py)
        self.cancelled: set[int] = set()
        self.claims: claims.WorkerClaims | None = None  # set once READY has sent the pipe
        self.closed = False

    def _take(self) -> None:
        for kind, body in self.reader.frames():
            if kind == wire.Kind.CANCEL:
                self.cancelled.add(wire.decode_cancel(body))
            else:
                self.frames.append((kind, body))

    def _receive(self, block: bool) -> None:
        while True:
            try:
                flags = shm.RECV_FLAGS if block else shm.RECV_FLAGS | socket.MSG_DONTWAIT
                n, ancillary = self.reader.receive(self.sock, self.scratch, shm.ANCILLARY, flags)
                if ancillary:
                    shm.take_fds(ancillary, self.fds)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = 0
            if n == 0:
                self.closed = True
                return
            self._take()
            if not block or self.frames:
                return

    def next(self) -> tuple[int, bytes | bytearray] | None:
        """The next frame to handle; None at end of stream."""
        frames = self.frames
        if frames and frames[0][0] != wire.Kind.JOB_AHEAD:
            self._receive(block=False)  # catch up on cancels
        while not self.frames:
            if self.closed:
                return None
            self._receive(block=True)
        return self.frames.popleft()


def _send_ready(channel: _Channel, inbox: _Inbox, max_jobs: int) -> None:
    """READY, with this worker's claims pipe when one could be made (claims.py); keeps its read end.

    A worker that runs one job only (``max_tasks_per_child=1``) is never sent
    one ahead, and makes no pipe: it would cost each recycled worker a few
    system calls for nothing.
    """
    pipe = claims.make_pipe() if max_jobs != 1 else None
    if pipe is None:
        channel.send(wire.encode_ready(os.getpid(), False))
        return
    read_end, write_end = pipe
    try:
        channel.send_fds(wire.encode_ready(os.getpid(), True), [read_end, write_end])
    finally:
        os.close(write_end)
    inbox.claims = claims.WorkerClaims(read_end)


def _skip_job(channel: _Channel, seq: int) -> None:
    channel.send(wire.encode_skipped(seq))


def serve(
    sock: socket.socket,
    worker_id: int,
    max_jobs: int,
    config: WorkerConfig | BaseException,
    watch: JobWatch | None = None,
) -> NoReturn:
    """Run the worker loop on ``sock`` until told to retire or the pool goes away; never returns.

    ``config`` is what the template loaded once for all its workers, or the
    exception that loading it raised (reported as this worker's start failure);
    ``watch``: this worker's slot, where it posts jobs the template must watch.
    """
    sock.setblocking(True)
    channel = _Channel(sock)
    _serve(channel, _Inbox(channel), worker_id, max_jobs, config, watch)


def _serve(
    channel: _Channel,
    inbox: _Inbox,
    worker_id: int,
    max_jobs: int,
    config: WorkerConfig | BaseException,
    watch: JobWatch | None,
) -> NoReturn:
    if isinstance(config, BaseException):
        channel.send(wire.encode_init_failed(dumps_error(config)))
        _exit(1)
    if watch is not None:
        watch.memory = config.memory_limit_per_child is not None
    if config.authkey is not None:  # not a fork of the pool's process: take its authkey
        import multiprocessing

        multiprocessing.current_process().authkey = config.authkey
    memory = _Memory()
    channel.shm_threshold = config.shm_threshold
    # A fresh process's peak RSS is its own (a fork does not inherit the
    # parent's), so the first job needs no reset unless an initializer ran.
    fresh = config.initializer is None
    if config.initializer is not None:
        try:
            config.initializer(*config.initargs)
        except BaseException as exc:
            # Logged here, as the standard library's workers log it, for code
            # that watches that logger (its own tests do).
            import logging

            logging.getLogger("concurrent.futures").critical("Exception in initializer:", exc_info=True)
            channel.send(wire.encode_init_failed(dumps_error(exc)))
            _exit(1)
    _send_ready(channel, inbox, max_jobs)
    # After the initializer: what it set up is the state every job starts from.
    baseline = Baseline()
    channel.leftover_threads = baseline.leftover_threads
    limit = config.max_memory_per_child
    jobs_done = 0
    while True:
        item = inbox.next()
        if item is None:  # end of stream: the pool is gone
            _finalize(config)
            _exit(0)
        kind, body = item
        if kind == wire.Kind.JOB or kind == wire.Kind.JOB_AHEAD:
            (seq,) = wire.decode_job_seq(body)
            # Its region (if any) is claimed now, in frame order, even for a job skipped.
            incoming = shm.claim(wire.decode_job(body)[4], inbox.fds) if inbox.fds else None
            if kind == wire.Kind.JOB_AHEAD and not (inbox.claims is not None and inbox.claims.claim()):
                # The pool took it back (claims.py): it runs elsewhere, expects no
                # answer, and does not count it against this worker's max_jobs.
                inbox.cancelled.discard(seq)
                del incoming
                continue
            if seq in inbox.cancelled:
                inbox.cancelled.discard(seq)
                del incoming
                _skip_job(channel, seq)
            else:
                if not fresh:
                    memory.reset_peak()
                fresh = False
                _run_job(channel, body, worker_id, memory, watch, incoming)
                del incoming
                channel.leftover_threads = baseline.restore()
            jobs_done += 1
            if jobs_done == max_jobs:
                # The pool sends no more than max_jobs and expects this exit;
                # leaving now saves it a round trip per recycled worker.
                _finalize(config)
                _exit(0)
            over = 0 if limit is None else memory_over(memory.rss(), limit, "self")
            if over:
                # Too big to take another job: leave now; unstarted jobs stay
                # unanswered and the pool re-queues them.
                channel.send(wire.encode_retiring(over))
                _finalize(config)
                _exit(0)
        elif kind == wire.Kind.SHARE:
            key, payload = wire.decode_share(body)
            incoming = shm.claim(payload, inbox.fds) if inbox.fds else None
            share.receive(key, payload, incoming)
            del incoming
        elif kind == wire.Kind.UNSHARE:
            share.forget(wire.decode_unshare(body))
        elif kind == wire.Kind.RETIRE:
            _finalize(config)
            _exit(0)


def worker_socket(fd: int) -> socket.socket:
    """The worker's end of its socketpair; family and type given, so nothing is asked of the kernel."""
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd)


def load_config(data: bytes | bytearray | memoryview) -> WorkerConfig | BaseException:
    """Unpickle the pool's WorkerConfig, or return why it would not load (each worker reports it)."""
    try:
        config = loads(data)
    except BaseException as exc:
        return exc
    if not isinstance(config, WorkerConfig):
        return TypeError(f"expected a WorkerConfig, got {type(config).__name__}")
    return config


def _rehearsal_job() -> None:
    """The job a rehearsal runs: nothing."""


def rehearse(rounds: int = 8, shm_threshold: int | None = None) -> None:
    """Run a worker's start and its per-job path in the template, over a socket pair.

    ``shm_threshold``: the pool's (``WorkerConfig.shm_threshold``), so that the
    result is pickled the way the pool's workers will pickle theirs.

    Why: Python writes to memory when it first runs code (the specializing
    interpreter rewrites bytecode in place, allocations fill fresh pages), and
    in a forked worker every such write is a copy-on-write page fault. Done
    once here, those writes are already in the memory every worker is forked
    from. Nothing is left behind: the job is a no-op, the per-job environment
    variables are set and cleared as in a worker, every descriptor is closed,
    and the between-jobs reset finds nothing to put back (a timer armed
    before the rehearsal is part of its baseline, and is left alone).
    """
    ours, theirs = socket.socketpair()
    memory = _Memory()
    baseline = Baseline()
    pipe = claims.make_pipe()
    claimer = claims.WorkerClaims(pipe[0]) if pipe is not None else None
    try:
        channel = _Channel(ours)
        channel.shm_threshold = shm_threshold
        inbox = _Inbox(channel)
        meta = dumps(("rehearsal", "rehearsal"))
        payload = dumps((_rehearsal_job, (), {}))
        job = b"".join(wire.encode_job(1, 1, None, meta, payload))
        inbox.claims = claimer
        for index in range(rounds):
            theirs.sendall(job)
            item = inbox.next()
            assert item is not None
            if pipe is not None and claimer is not None:  # as if every job were sent ahead
                os.write(pipe[1], claims.tokens(index, 1))
                assert claimer.claim()
            memory.reset_peak()
            _run_job(channel, item[1], 0, memory)
            baseline.restore()
            theirs.recv(1 << 16)
    finally:
        memory.close()
        ours.close()
        theirs.close()
        if pipe is not None and claimer is not None:
            os.close(pipe[1])
            claimer.close()


_prctl: Any = None


def load_prctl() -> None:
    """Look up ``prctl`` once (in the template, before it forks): ``dlopen`` per fork costs 0.5 ms."""
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        try:
            import ctypes

            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except Exception:
            _prctl = False


def set_parent_death_signal(signum: int) -> None:
    """Ask Linux to send ``signum`` to this process when its parent dies (no-op elsewhere)."""
    load_prctl()
    if _prctl:
        pr_set_pdeathsig = 1
        _prctl(pr_set_pdeathsig, signum, 0, 0, 0)


def main(argv: list[str] | None = None) -> None:
    """Entry point of a worker started by exec (``start_method="spawn"``): its first frame is CONFIG."""
    import json

    args = sys.argv[1:] if argv is None else argv
    fd = int(args[0])
    if len(args) > 1:
        sys.path[:] = json.loads(args[1])
    watch = None
    if len(args) > 2:  # the template's limit area, its wake-up pipe, this worker's slot
        area_fd, ring_w, slot = (int(part) for part in args[2].split(","))
        slots = map_area(area_fd)
        os.set_inheritable(ring_w, False)
        if slot >= 0:
            watch = JobWatch(slots, slot, ring_w, memory=False)
    sock = worker_socket(fd)
    sock.setblocking(True)
    channel = _Channel(sock)
    inbox = _Inbox(channel)
    first = inbox.next()
    if first is None or first[0] != wire.Kind.CONFIG:
        _exit(3)
    body = first[1]
    worker_id, max_jobs, pickled = wire.decode_config(body)
    config = load_config(pickled)
    _serve(channel, inbox, worker_id, max_jobs, config, watch)


if __name__ == "__main__":
    main()
