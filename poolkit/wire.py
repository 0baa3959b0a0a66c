"""The wire protocol between the pool, its template and its workers.

Every message is one frame: a 9-byte header (body length as an unsigned 64-bit
little-endian integer, then a one-byte kind) followed by the body. Frames travel
over inherited ``socketpair`` sockets, never over a listening socket, so only
the pool's own processes can talk to each other.

Message kinds are small integers; each body layout is a fixed ``struct`` prefix
followed, where needed, by pickled bytes. Fixed prefixes keep the per-job cost
to a few ``struct`` calls instead of a pickle of a message object.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator

__all__ = ["HEADER", "FrameReader", "FrameTooLarge", "Kind", "frame"]

HEADER = struct.Struct("<QB")


class Kind(enum.IntEnum):
    # parent -> worker
    CONFIG = 1  # WORKER_HEAD (worker_id, max_jobs or 0) + pickled WorkerConfig (exec'd workers only)
    JOB = 2  # JOB_HEAD + meta pickle + payload pickle
    RETIRE = 3  # empty: finish, run the finalizer, exit 0
    CANCEL = 4  # <Q seq>: do not start this job (it was terminated while queued); answer SKIPPED
    # worker -> parent
    READY = 10  # <q pid>
    RESULT = 11  # RESULT_HEAD + pickled value or (exception, traceback text)
    PROGRESS = 12  # <Q seq> + pickled value
    INIT_FAILED = 13  # pickled (exception, traceback text)
    RETIRING = 14  # <q rss>: leaving after the last RESULT (RSS above max_memory_per_child)
    # parent -> template
    SPAWN = 20  # WORKER_HEAD (worker_id, max_jobs or 0), the worker's socket travels as SCM_RIGHTS
    KILL = 21  # <qi pid signal>
    WORKER_CONFIG = 22  # pickled WorkerConfig, once, before any SPAWN (fresh-interpreter templates)
    LIMITS = 23  # LIMITS_SETTINGS, once: what the template enforces (limits.py)
    # template -> parent
    SPAWNED = 30  # <qq worker_id pid>
    EXITED = 31  # <qqi worker_id pid exitcode>, exitcode negative for a signal
    LIMIT = 32  # LIMIT struct: the template stopped a worker's job (past its deadline, over memory)


# seq, attempt, meta length, timeout (0.0 = none)
JOB_HEAD = struct.Struct("<QHId")
# the frame header and JOB_HEAD in one pack
JOB_FRAME_HEAD = struct.Struct("<QBQHId")
# seq, outcome, wall s, cpu s, peak rss bytes, rss after bytes
RESULT_HEAD = struct.Struct("<QBddqq")
OUTCOME_VALUE = 1
OUTCOME_ERROR = 0
OUTCOME_SKIPPED = 2  # a cancelled job the worker did not start
OUTCOME_NOT_LOADED = 3  # the job's function or arguments would not unpickle: (exception, traceback)
WORKER_HEAD = struct.Struct("<qq")
PID = struct.Struct("<q")
SEQ = struct.Struct("<Q")
SPAWNED = struct.Struct("<qq")
EXITED = struct.Struct("<qqi")
KILL = struct.Struct("<qi")
# worker_id, pid, seq of the job, reason, rss bytes (memory) or 0
LIMIT = struct.Struct("<qqQBq")
# kill_grace s, memory_limit_per_child bytes (0: none), memory_check_interval s
LIMITS_SETTINGS = struct.Struct("<dqd")
LIMIT_TIMEOUT = 1
LIMIT_MEMORY = 2


def encode_limit(worker_id: int, pid: int, seq: int, reason: int, rss: int) -> bytes:
    """The template's LIMIT frame: it signalled worker ``pid`` for job ``seq`` (see limits.py)."""
    return HEADER.pack(LIMIT.size, Kind.LIMIT) + LIMIT.pack(worker_id, pid, seq, reason, rss)


def frame(kind: Kind, *parts: bytes) -> bytes:
    """One frame as bytes: header and the concatenated body ``parts``."""
    body = b"".join(parts)
    return HEADER.pack(len(body), kind) + body


class FrameTooLarge(Exception):
    """A frame announced more bytes than this process can allocate; the stream cannot go on."""

    def __init__(self, length: int) -> None:
        super().__init__(f"a {length}-byte message does not fit in memory")
        self.length = length


class FrameReader:
    """Cuts a byte stream into frames.

    ``feed`` takes what ``recv`` returned; ``frames`` yields every complete
    ``(kind, body)``. A large frame whose header has arrived gets a buffer of
    its exact size, so a 64 MiB payload is copied once, not once per chunk.
    """

    __slots__ = ("_big", "_big_filled", "_big_kind", "_buffer")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._big: bytearray | None = None
        self._big_kind = 0
        self._big_filled = 0

    def wants_direct(self) -> memoryview | None:
        """Where the next ``recv_into`` should write, when a large frame is being filled."""
        if self._big is None:
            return None
        return memoryview(self._big)[self._big_filled :]

    def filled_direct(self, n: int) -> None:
        self._big_filled += n

    def feed(self, data: bytes | memoryview) -> None:
        self._buffer += data

    def frames(self) -> Iterator[tuple[int, bytes | bytearray]]:
        if self._big is not None:
            if self._big_filled < len(self._big):
                return
            big, kind = self._big, self._big_kind
            self._big = None
            yield kind, big
        buffer = self._buffer
        offset = 0
        size = len(buffer)
        header_size = HEADER.size
        while size - offset >= header_size:
            length, kind = HEADER.unpack_from(buffer, offset)
            start = offset + header_size
            end = start + length
            if end > size:
                if length >= 1 << 20:
                    # Large frame: give it its own buffer and fill it in place.
                    try:
                        self._big = bytearray(length)
                    except MemoryError:
                        raise FrameTooLarge(length) from None
                    have = size - start
                    self._big[:have] = buffer[start:size]
                    self._big_filled = have
                    self._big_kind = kind
                    offset = size
                break
            yield kind, buffer[start:end]
            offset = end
        if offset:
            del buffer[:offset]
