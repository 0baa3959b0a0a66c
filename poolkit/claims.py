"""Claims: who starts a job sent ahead, its worker or, taking it back, the pool.

A worker may hold jobs queued behind the one it runs (dispatch.py). When that
job turns out to run far past the mean, the jobs behind it should run on
another worker, but only if this worker has not started them: a job must
never run twice. The worker cannot be asked (it is busy running user code),
and flags in shared memory would need memory barriers Python does not offer.
The kernel decides instead, through one pipe per worker:

* each job the pool sends ahead has a *token* (its index among the jobs sent
  ahead to this worker), in the pipe before the frame goes; the pool writes
  them a few hundred at a time, ahead of the jobs that will have them, so
  that this costs a system call per few hundred jobs, not per job;
* before starting such a job, the worker reads the next token; it starts the
  job only if the token is that job's;
* to take jobs back, the pool reads tokens from the same pipe: a token it
  gets is one the worker never will, so that job is the pool's to send
  elsewhere, and the worker skips it without an answer.

A pipe read is atomic and first-in first-out, so each token goes to exactly
one reader, and the tokens the pool takes back are always those of the last
jobs in line (and of jobs not sent yet, which it writes again when it sends
them). The worker makes the pipe and sends both ends with READY; a
worker without one (no descriptor left) simply gets no job sent ahead.
"""

from __future__ import annotations

import os
import struct

__all__ = ["REFILL", "TOKEN", "WorkerClaims", "make_pipe", "take_back", "tokens"]

TOKEN = struct.Struct("<Q")
REFILL = 256  # tokens the pool writes at once: 2 KiB, below PIPE_BUF, so the write is atomic
# Tokens one take_back reads: more than a pipe ever holds (a window of jobs
# sent, 64 at most, and a refill written ahead of them).
_MOST = 8 * REFILL


def make_pipe() -> tuple[int, int] | None:
    """A worker's claims pipe (read end, write end), both non-blocking; None if none can be made."""
    try:
        return os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None


def tokens(start: int, count: int) -> bytes:
    """The tokens of the jobs sent ahead ``start``-th to ``start + count - 1``-th, in order."""
    return struct.pack(f"<{count}Q", *range(start, start + count))


def take_back(read_end: int) -> list[int]:
    """Read every token still in the pipe: the indexes of the jobs the worker will now skip."""
    try:
        data = os.read(read_end, _MOST * TOKEN.size)
    except (BlockingIOError, InterruptedError):
        return []
    return [index for (index,) in TOKEN.iter_unpack(data)]


class WorkerClaims:
    """The worker's side: claims each job sent ahead, in the order they came, before starting it."""

    __slots__ = ("_held", "_next", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._next = 0  # the index of the next job sent ahead
        self._held: int | None = None  # a token read for a later job (the ones before it were taken back)

    def claim(self) -> bool:
        """True if the next job sent ahead is this worker's to run; False if the pool took it back."""
        index = self._next
        self._next = index + 1
        held = self._held
        if held is None:
            try:
                data = os.read(self.fd, TOKEN.size)
            except (BlockingIOError, InterruptedError):
                return False  # its token and every later one were taken back
            if len(data) != TOKEN.size:
                return False  # the pool is gone (end of pipe): its jobs are not ours any more
            (held,) = TOKEN.unpack(data)
        if held == index:
            self._held = None
            return True
        self._held = held  # a later job's: this one was taken back
        return False

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
