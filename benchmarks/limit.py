"""The reference pool ("limit"): the practical floor of per-job cost.

This is what a process pool costs when it does nothing but move pickles:
workers forked up front, one pair of pipes per worker, frames of an 8-byte
length and a pickle, several jobs in flight per worker (pipelining), and a
parent that is a single thread driving a selector only while the caller
waits. It has no manager thread, no job ids, no timeouts, no stats and no
logging, so every real pool should be slower; how much slower is the figure
worth watching.

It still does the two things the scenarios need: it survives a worker that
dies (the oldest unanswered job of that worker fails, the jobs queued behind
it are sent again, and a new worker is forked) and it can retire a worker
after ``max_tasks`` jobs. Workers run jobs strictly in order, which is what
makes "the oldest unanswered job was the one running" true.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import pickle
import selectors
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["LimitCrashed", "LimitFuture", "LimitPool", "shared_memory_double"]

_LEN = struct.Struct("<Q")
_SMALL = 64 * 1024  # frames below this are joined and written together
_PIPE_SIZE = 1 << 20  # the default /proc/sys/fs/pipe-max-size
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class LimitCrashed(Exception):
    """The worker running this job died."""


class LimitFuture:
    """The outcome of one job; filled in while the caller waits on the pool."""

    __slots__ = ("done", "ok", "value")

    def __init__(self) -> None:
        self.done = False
        self.ok = False
        self.value: Any = None


class _Worker:
    __slots__ = ("budget", "inbuf", "inflight", "out", "pid", "rfd", "wfd", "writing")

    def __init__(self, pid: int, wfd: int, rfd: int, budget: int | None) -> None:
        self.pid = pid
        self.wfd = wfd  # jobs go out here (non-blocking)
        self.rfd = rfd  # results come back here (non-blocking)
        self.budget = budget  # jobs this worker may still be sent; None: no limit
        self.inflight: deque[tuple[LimitFuture, bytes]] = deque()
        self.out: deque[bytes | memoryview] = deque()
        self.inbuf = bytearray()
        self.writing = False


class LimitPool:
    """Pre-forked workers over ``os.pipe``; see the module docstring."""

    def __init__(self, workers: int = 2, *, max_tasks: int | None = None, window: int = 64) -> None:
        self._max_tasks = max_tasks
        self._window = window
        self._selector = selectors.DefaultSelector()
        self._workers: dict[int, _Worker] = {}  # by pid
        self._pending: deque[tuple[LimitFuture, bytes]] = deque()
        self._capacity = workers * window
        self._inflight = 0  # jobs sent and not answered, over all workers
        self._closed = False
        for _ in range(workers):
            self._spawn()

    # ------------------------------------------------------------ public

    def submit(self, fn: Callable[..., Any], *args: Any) -> LimitFuture:
        future = LimitFuture()
        self._pending.append((future, pickle.dumps((fn, args), pickle.HIGHEST_PROTOCOL)))
        self._dispatch()
        return future

    def wait(self, future: LimitFuture, deadline: float) -> LimitFuture:
        """Drive the pool until ``future`` is done; ``TimeoutError`` at ``deadline``."""
        while not future.done:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError("the reference pool passed its deadline")
            for key, _mask in self._selector.select(timeout):
                kind, worker = key.data
                assert isinstance(worker, _Worker)
                if self._workers.get(worker.pid) is not worker:
                    continue  # forgotten earlier in this round (its fd may be reused)
                if kind == "r":
                    self._read(worker)
                else:
                    self._flush(worker)
            self._dispatch()
        return future

    def map(
        self, fn: Callable[[Any], Any], items: Iterable[Any], deadline: float, chunksize: int = 1000
    ) -> list[Any]:
        from .jobs import chunk

        items = list(items)
        futures = [
            self.submit(chunk, (fn, items[i : i + chunksize])) for i in range(0, len(items), chunksize)
        ]
        out: list[Any] = []
        for future in futures:
            self.wait(future, deadline)
            if not future.ok:
                raise future.value
            out.extend(future.value)
        return out

    def close(self) -> None:
        """Close every job pipe (each worker reads end of stream and exits), then reap."""
        self._closed = True
        for worker in list(self._workers.values()):
            self._forget(worker)
            os.waitpid(worker.pid, 0)
        self._selector.close()

    # ------------------------------------------------------------ workers

    def _spawn(self) -> None:
        job_r, job_w = os.pipe()
        result_r, result_w = os.pipe()
        for fd in (job_w, result_w):
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                os.close(job_w)
                os.close(result_r)
                for other in self._workers.values():  # else their pipes never see end of stream
                    os.close(other.wfd)
                    os.close(other.rfd)
                _serve(job_r, result_w, self._max_tasks)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(job_r)
        os.close(result_w)
        os.set_blocking(job_w, False)
        os.set_blocking(result_r, False)
        worker = _Worker(pid, job_w, result_r, self._max_tasks)
        self._workers[pid] = worker
        self._selector.register(result_r, selectors.EVENT_READ, ("r", worker))

    def _forget(self, worker: _Worker) -> None:
        self._workers.pop(worker.pid, None)
        self._selector.unregister(worker.rfd)
        if worker.writing:
            self._selector.unregister(worker.wfd)
        os.close(worker.rfd)
        os.close(worker.wfd)

    def _lost(self, worker: _Worker) -> None:
        """End of stream from a worker: it retired after its last job, or it died in one."""
        self._forget(worker)
        _, status = os.waitpid(worker.pid, 0)
        self._inflight -= len(worker.inflight)
        if worker.inflight:
            future, _ = worker.inflight.popleft()
            future.done = True
            future.value = LimitCrashed(
                f"worker {worker.pid} died ({_describe(status)}) while running this job"
            )
            self._pending.extendleft(reversed(worker.inflight))  # not started: send again
        if not self._closed:
            self._spawn()

    # ------------------------------------------------------------ I/O

    def _dispatch(self) -> None:
        """Share the pending jobs out, least-loaded worker first, up to ``window`` each."""
        pending = self._pending
        if not pending or self._inflight >= self._capacity:
            return
        workers = sorted(
            (w for w in self._workers.values() if w.budget is None or w.budget > 0),
            key=lambda w: len(w.inflight),
        )
        for index, worker in enumerate(workers):
            share = -(-len(pending) // (len(workers) - index))  # what is left, split evenly
            room = self._window - len(worker.inflight)
            if worker.budget is not None:
                room = min(room, worker.budget)
                worker.budget -= min(share, room)
            take = min(share, room)
            if take <= 0:
                continue
            self._inflight += take
            out = worker.out
            for _ in range(take):
                item = pending.popleft()
                worker.inflight.append(item)
                payload = item[1]
                head = _LEN.pack(len(payload))
                if len(payload) < _SMALL:
                    out.append(head + payload)
                else:
                    out.append(head)
                    out.append(payload)
            self._flush(worker)

    def _flush(self, worker: _Worker) -> None:
        out = worker.out
        while out:
            if len(out) > 1 and len(out[0]) < _SMALL and len(out[1]) < _SMALL:
                joined = [out.popleft()]
                while out and len(out[0]) < _SMALL and len(joined) < 256:
                    joined.append(out.popleft())
                out.appendleft(b"".join(joined))
            data = out[0]
            try:
                sent = os.write(worker.wfd, data)
            except BlockingIOError:
                break
            except BrokenPipeError:
                out.clear()  # the worker is gone; its end of stream comes on the result pipe
                break
            if sent == len(data):
                out.popleft()
            else:
                out[0] = memoryview(data)[sent:]
                break
        if out and not worker.writing:
            self._selector.register(worker.wfd, selectors.EVENT_WRITE, ("w", worker))
            worker.writing = True
        elif not out and worker.writing:
            self._selector.unregister(worker.wfd)
            worker.writing = False

    def _read(self, worker: _Worker) -> None:
        try:
            data = os.read(worker.rfd, _PIPE_SIZE)
        except BlockingIOError:
            return
        if not data:
            self._lost(worker)
            return
        buf = worker.inbuf
        buf += data
        start = 0
        size = len(buf)
        while size - start >= 8:
            (n,) = _LEN.unpack_from(buf, start)
            if size - start - 8 < n:
                break
            with memoryview(buf) as view, view[start + 8 : start + 8 + n] as body:
                ok, value = pickle.loads(body)
            future, _ = worker.inflight.popleft()
            future.ok = ok
            future.value = value
            future.done = True
            self._inflight -= 1
            start += 8 + n
        if start:
            del buf[:start]


class _Reader:
    """The worker's buffered reader of length-prefixed frames (blocking)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()

    def frame(self) -> bytes | bytearray:
        buf = self.buf
        while len(buf) < 8:
            self._fill()
        (n,) = _LEN.unpack_from(buf, 0)
        if len(buf) - 8 >= n:
            body = bytes(buf[8 : 8 + n])
            del buf[: 8 + n]
            return body
        whole = bytearray(n)  # a large frame: read the rest straight into place
        have = len(buf) - 8
        whole[:have] = buf[8:]
        buf.clear()
        with memoryview(whole) as view:
            while have < n:
                got = os.readv(self.fd, [view[have:]])
                if not got:
                    raise EOFError
                have += got
        return whole

    def _fill(self) -> None:
        data = os.read(self.fd, _PIPE_SIZE)
        if not data:
            raise EOFError
        self.buf += data


def _serve(job_fd: int, result_fd: int, max_tasks: int | None) -> None:
    reader = _Reader(job_fd)
    done = 0
    while max_tasks is None or done < max_tasks:
        try:
            body = reader.frame()
        except EOFError:
            return
        fn, args = pickle.loads(body)
        try:
            reply = (True, fn(*args))
        except Exception as exc:
            reply = (False, exc)
        try:
            data = pickle.dumps(reply, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            data = pickle.dumps((False, RuntimeError(f"result not picklable: {exc!r}")))
        head = _LEN.pack(len(data))
        _write_all(result_fd, head + data if len(data) < _SMALL else head)
        if len(data) >= _SMALL:
            _write_all(result_fd, data)
        done += 1


def _write_all(fd: int, data: bytes) -> None:
    with memoryview(data) as view:
        sent = 0
        while sent < len(view):
            sent += os.write(fd, view[sent:])


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def shared_memory_double(arrays: Sequence[Any], workers: int) -> list[Any]:
    """S8's reference: ``[a * 2.0 for a in arrays]`` by forked children, with nothing pickled or piped.

    The arrays are copied into one anonymous shared region (``memfd``); the
    children, forked afterwards, read them there and write each result into a
    second shared region, where the caller gets them as arrays. That is the
    least a process pool can do to move the data (one copy in, the results
    written in place), so it bounds what any pool can reach.
    """
    import numpy as np

    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    regions = []
    for name in ("limit-in", "limit-out"):
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, max(total, mmap.PAGESIZE))
        regions.append(mmap.mmap(fd, max(total, mmap.PAGESIZE)))
        os.close(fd)
    source, target = regions

    def view(region: mmap.mmap, i: int) -> Any:
        a = arrays[i]
        return np.frombuffer(region, a.dtype, a.size, offsets[i]).reshape(a.shape)

    for i, a in enumerate(arrays):
        view(source, i)[...] = a
    pids = []
    for k in range(workers):
        pid = os.fork()
        if pid == 0:
            try:
                for i in range(k, len(arrays), workers):
                    np.multiply(view(source, i), 2.0, out=view(target, i))
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise RuntimeError(f"a reference child failed with status {status}")
    return [view(target, i) for i in range(len(arrays))]
