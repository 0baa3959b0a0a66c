"""The parent's side of a worker's socket: bytes in, frames out, nothing decided.

The manager thread owns every worker's socket; this module is how it reads
from one and writes to one. ``receive`` reads once into the worker's frame
reader (straight into a large frame's own buffer when one is being read,
else through the one buffer the manager lends to all its reads, and taking
the descriptors of shared-memory regions that come with results); ``send``
writes the worker's outbox as far as the socket takes it (frames that carry
a region send its descriptor with their first byte). ``write_tokens`` and
``take_back`` are the pool's two uses of a worker's claims pipe (claims.py).
What the bytes mean, and what an end of stream means, is the manager's
business: it reads the frames and reacts.

Both run without blocking: the sockets are non-blocking and the manager's
``select`` says when to call again.
"""

from __future__ import annotations

import itertools
import os

from . import claims, shm, wire
from .worker_table import Worker

__all__ = ["WOULD_BLOCK", "read_buffer", "receive", "send", "take_back", "write_tokens"]

WOULD_BLOCK = -1
"""What ``receive`` returns when nothing is there to read yet."""

_RECV_SIZE = 1 << 22  # one read takes up to 4 MiB: a large result in few system calls
_SEND_PARTS = 512  # parts per sendmsg: below the kernel's IOV_MAX (1024)


def read_buffer() -> memoryview:
    """The buffer a manager's reads go through: one per manager thread, lent to every ``receive``."""
    return wire.scratch_buffer(_RECV_SIZE)


def receive(worker: Worker, scratch: memoryview) -> int:
    """Read once from ``worker``'s socket into its frame reader, through ``scratch`` (see ``read_buffer``).

    Returns the number of bytes read, 0 at the end of the stream (the worker
    closed it, or the socket failed), or ``WOULD_BLOCK``.
    """
    try:
        n, ancillary = worker.reader.receive(worker.sock, scratch, shm.ANCILLARY, shm.RECV_FLAGS)
        if ancillary:
            shm.take_fds(ancillary, worker.fds)
    except (BlockingIOError, InterruptedError):
        return WOULD_BLOCK
    except OSError:
        return 0
    return n


def send(worker: Worker) -> None:
    """Write ``worker``'s outbox as far as the socket takes it; what is left stays queued.

    A socket that fails drops the outbox: the worker is gone, and its end of
    stream and exit status will tell the manager so.
    """
    outbox = worker.outbox
    sock = worker.sock
    while outbox:
        try:
            parts = list(itertools.islice(outbox, 0, _SEND_PARTS))
            if worker.attached:
                sent = shm.send_attached(sock, parts, worker.attached)
            else:
                sent = sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            worker.drop_outbox()
            return
        while sent:
            first = outbox[0]
            size = len(first)
            if sent >= size:
                outbox.popleft()
                sent -= size
            else:
                outbox[0] = memoryview(first)[sent:]
                sent = 0


def write_tokens(worker: Worker) -> bool:
    """Write the tokens queued for the claims pipe, before the frames that need them go.

    A write of a refill is atomic (below PIPE_BUF) into a pipe that never
    holds more than a few refills, so this cannot fail short of a bug. If it
    does, False, the tokens left queued: the jobs sent ahead with them have
    none in the pipe and their worker will skip them, so the caller takes them back.
    """
    try:
        os.write(worker.claims_w, worker.tokens)
    except OSError:
        return False
    worker.tokens.clear()
    return True


def take_back(worker: Worker) -> list[int]:
    """Take every token the worker has not claimed: the jobs with those tokens are the pool's again.

    Tokens written ahead of jobs not sent yet come out too; the next job sent
    ahead gets its token written again.
    """
    if worker.claims_r < 0:
        return []
    taken = claims.take_back(worker.claims_r)
    worker.tokens_written = worker.tokens_sent
    return taken
