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
import mmap
import socket
import struct
from collections.abc import Iterator

__all__ = ["HEADER", "FrameReader", "FrameTooLarge", "Kind", "scratch_buffer"]

HEADER = struct.Struct("<QB")


class Kind(enum.IntEnum):
    # parent -> worker
    CONFIG = 1  # <qq worker_id max_jobs> + pickled WorkerConfig (exec'd workers only)
    JOB = 2  # <QHId seq attempt meta_len timeout> + meta pickle + payload pickle
    RETIRE = 3  # empty: finish, run the finalizer, exit 0
    CANCEL = 4  # <Q seq>: do not start this job (it was terminated while queued); answer SKIPPED
    SHARE = 5  # 16-byte key + a Pool.share object's payload (share.py); its region travels as SCM_RIGHTS
    UNSHARE = 6  # 16-byte key: drop that shared object
    JOB_AHEAD = 7  # as JOB, queued behind a running job: started only with its claim token (claims.py)
    # worker -> parent
    READY = 10  # <qB pid claims>; claims 1: the claims pipe (read end, write end) travels as SCM_RIGHTS
    RESULT = 11  # <QBddqq seq outcome wall cpu peak rss> + pickled value or (exception, traceback text)
    PROGRESS = 12  # <Q seq> + pickled value
    INIT_FAILED = 13  # pickled (exception, traceback text)
    RETIRING = 14  # <q rss>: leaving after the last RESULT (RSS above max_memory_per_child)
    # parent -> template
    SPAWN = 20  # <qq worker_id max_jobs> (0: none), the worker's socket travels as SCM_RIGHTS
    KILL = 21  # <qi pid signal>
    WORKER_CONFIG = 22  # pickled WorkerConfig, once, before any SPAWN (fresh-interpreter templates)
    LIMITS = 23  # <dqd kill_grace memory_limit interval>, once: what the template enforces (limits.py)
    # template -> parent
    SPAWNED = 30  # <qq worker_id pid>
    EXITED = 31  # <qqi worker_id pid exitcode>, exitcode negative for a signal
    LIMIT = 32  # <qqQBq worker_id pid seq reason rss>: the template stopped a worker's job (past its deadline, over memory)


# The body layouts. Only this module packs or unpacks them: every message kind
# has a named encoder (``encode_<kind>``) and, where its body has fields, a
# named decoder (``decode_<kind>``). Frequent messages pack header and body in
# one ``struct`` call; the hottest decoders are the ``unpack_from`` methods
# themselves, so naming them costs nothing.

# seq, attempt, meta length, timeout (0.0 = none)
_JOB_HEAD = struct.Struct("<QHId")
_JOB_FRAME_HEAD = struct.Struct("<QBQHId")  # the frame header and _JOB_HEAD in one pack
# seq, outcome, wall s, cpu s, peak rss bytes, rss after bytes
_RESULT_HEAD = struct.Struct("<QBddqq")
_RESULT_FRAME_HEAD = struct.Struct("<QBQBddqq")  # the frame header and _RESULT_HEAD in one pack
OUTCOME_VALUE = 1
OUTCOME_ERROR = 0
OUTCOME_SKIPPED = 2  # a cancelled job the worker did not start
OUTCOME_NOT_LOADED = 3  # the job's function or arguments would not unpickle: (exception, traceback)
_WORKER_HEAD = struct.Struct("<qq")  # worker_id, max_jobs (0: no limit)
_PID = struct.Struct("<q")
_READY = struct.Struct("<qB")  # pid, 1 if the claims pipe travels with it
_RSS = struct.Struct("<q")
_SEQ = struct.Struct("<Q")
_SPAWNED = struct.Struct("<qq")
_EXITED = struct.Struct("<qqi")
_KILL = struct.Struct("<qi")
# worker_id, pid, seq of the job, reason, rss bytes (memory) or 0
_LIMIT = struct.Struct("<qqQBq")
# kill_grace s, memory_limit_per_child bytes (0: none), memory_check_interval s
_LIMITS_SETTINGS = struct.Struct("<dqd")
LIMIT_TIMEOUT = 1
LIMIT_MEMORY = 2

Body = bytes | bytearray | memoryview


def _head(kind: Kind, size: int) -> bytes:
    return HEADER.pack(size, kind)


# Whole frames of fixed size start with these, built once: the template's
# loop and a new worker touch as few objects as they can (copy-on-write).
_READY_HEAD = _head(Kind.READY, _READY.size)
_SPAWNED_HEAD = _head(Kind.SPAWNED, _SPAWNED.size)
_EXITED_HEAD = _head(Kind.EXITED, _EXITED.size)
_LIMIT_HEAD = _head(Kind.LIMIT, _LIMIT.size)
_KILL_HEAD = _head(Kind.KILL, _KILL.size)
_SPAWN_HEAD = _head(Kind.SPAWN, _WORKER_HEAD.size)
_CANCEL_HEAD = _head(Kind.CANCEL, _SEQ.size)
_RETIRING_HEAD = _head(Kind.RETIRING, _RSS.size)
_RETIRE_FRAME = _head(Kind.RETIRE, 0)
_KIND_JOB = int(Kind.JOB)
_KIND_JOB_AHEAD = int(Kind.JOB_AHEAD)
_SHARE_KEY = 16
_KIND_RESULT = int(Kind.RESULT)


# ---------------------------------------------------------------- parent -> worker


def encode_config(worker_id: int, max_jobs: int | None, config: bytes) -> bytes:
    """CONFIG: the first frame of an exec'd worker (its template holds no config for it)."""
    return _frame(Kind.CONFIG, _WORKER_HEAD.pack(worker_id, max_jobs or 0), config)


def decode_config(body: Body) -> tuple[int, int, memoryview]:
    """CONFIG -> (worker_id, max_jobs or 0, the pickled WorkerConfig)."""
    worker_id, max_jobs = _WORKER_HEAD.unpack_from(body)
    return worker_id, max_jobs, memoryview(body)[_WORKER_HEAD.size :]


def encode_job(
    seq: int, attempt: int, timeout: float | None, meta: bytes, payload: bytes, ahead: bool = False
) -> tuple[bytes, ...]:
    """JOB (JOB_AHEAD if ``ahead``), as the parts to send: a large payload is sent as it is, not copied."""
    head = _JOB_FRAME_HEAD.pack(
        _JOB_HEAD.size + len(meta) + len(payload),
        _KIND_JOB_AHEAD if ahead else _KIND_JOB,
        seq,
        attempt,
        len(meta),
        timeout or 0.0,
    )
    if len(payload) < 65536:
        return (head + meta + payload,)
    return (head + meta, payload)


def encode_job_ahead(
    seq: int, attempt: int, timeout: float | None, meta: bytes, payload: bytes
) -> tuple[bytes, ...]:
    """JOB_AHEAD: a JOB queued behind a running one, started only with its token (claims.py)."""
    return encode_job(seq, attempt, timeout, meta, payload, ahead=True)


# JOB -> seq only (the worker checks it against the cancelled ones before loading anything)
decode_job_seq = _SEQ.unpack_from


def decode_job(body: Body) -> tuple[int, int, float, memoryview | None, memoryview]:
    """JOB -> (seq, attempt, timeout or 0.0, the pickled (job_id, job_type) or None, the payload)."""
    seq, attempt, meta_len, timeout = _JOB_HEAD.unpack_from(body)
    view = memoryview(body)
    offset = _JOB_HEAD.size
    meta = view[offset : offset + meta_len] if meta_len else None
    return seq, attempt, timeout, meta, view[offset + meta_len :]


def encode_share(key: bytes, payload: bytes) -> tuple[bytes, bytes]:
    """SHARE, as the parts to send (the first part starts the frame, for its region's descriptor)."""
    return _head(Kind.SHARE, len(key) + len(payload)) + key, payload


def decode_share(body: Body) -> tuple[bytes, memoryview]:
    """SHARE -> (key, the payload)."""
    view = memoryview(body)
    return bytes(view[:_SHARE_KEY]), view[_SHARE_KEY:]


def encode_unshare(key: bytes) -> bytes:
    """UNSHARE: drop the shared object ``key``."""
    return _frame(Kind.UNSHARE, key)


def decode_unshare(body: Body) -> bytes:
    return bytes(body[:_SHARE_KEY])


def encode_retire() -> bytes:
    """RETIRE: finish, run the finalizer, exit 0."""
    return _RETIRE_FRAME


def encode_cancel(seq: int) -> bytes:
    """CANCEL: do not start job ``seq`` (terminated while queued); answer SKIPPED."""
    return _CANCEL_HEAD + _SEQ.pack(seq)


def decode_cancel(body: Body) -> int:
    return int(_SEQ.unpack_from(body)[0])


# ---------------------------------------------------------------- worker -> parent


def encode_ready(pid: int, claims: bool) -> bytes:
    """READY: the worker's initializer ran; it takes jobs. ``claims``: its claims pipe goes with it."""
    return _READY_HEAD + _READY.pack(pid, claims)


def decode_ready(body: Body) -> tuple[int, bool]:
    """READY -> (pid, whether the claims pipe came with it)."""
    pid, claims = _READY.unpack_from(body)
    return pid, bool(claims)


def encode_result_head(
    seq: int, outcome: int, wall: float, cpu: float, peak: int, rss: int, data_size: int
) -> bytes:
    """The start of a RESULT frame whose pickled outcome (``data_size`` bytes) follows."""
    return _RESULT_FRAME_HEAD.pack(
        _RESULT_HEAD.size + data_size, _KIND_RESULT, seq, outcome, wall, cpu, peak, rss
    )


def encode_skipped(seq: int) -> bytes:
    """RESULT for a job the worker did not start: it was cancelled while queued."""
    return encode_result_head(seq, OUTCOME_SKIPPED, 0.0, 0.0, 0, 0, 0)


# RESULT -> (seq, outcome, wall, cpu, peak rss, rss after); the outcome's pickle follows
decode_result_head = _RESULT_HEAD.unpack_from


def result_payload(body: Body) -> memoryview:
    """RESULT -> the pickled value, or (exception, traceback text)."""
    return memoryview(body)[_RESULT_HEAD.size :]


def encode_progress(seq: int, value: bytes) -> bytes:
    """PROGRESS: the latest value job ``seq`` reported (pickled)."""
    return _frame(Kind.PROGRESS, _SEQ.pack(seq), value)


# PROGRESS -> (seq,)
decode_progress_seq = _SEQ.unpack_from


def progress_payload(body: Body) -> memoryview:
    """PROGRESS -> the pickled value."""
    return memoryview(body)[_SEQ.size :]


def encode_init_failed(error: bytes) -> bytes:
    """INIT_FAILED: pickled (exception, traceback text) of the initializer or its loading."""
    return _frame(Kind.INIT_FAILED, error)


def encode_retiring(rss: int) -> bytes:
    """RETIRING: leaving after the last RESULT, its RSS over max_memory_per_child."""
    return _RETIRING_HEAD + _RSS.pack(rss)


def decode_retiring(body: Body) -> int:
    """RETIRING -> the worker's RSS in bytes."""
    return int(_RSS.unpack_from(body)[0])


# ---------------------------------------------------------------- parent -> template


def encode_spawn(worker_id: int, max_jobs: int | None) -> bytes:
    """SPAWN: fork a worker; its socket travels beside the frame as SCM_RIGHTS."""
    return _SPAWN_HEAD + _WORKER_HEAD.pack(worker_id, max_jobs or 0)


# SPAWN -> (worker_id, max_jobs or 0)
decode_spawn = _WORKER_HEAD.unpack_from


def encode_kill(pid: int, signum: int) -> bytes:
    """KILL: send ``signum`` to worker ``pid`` (and its process group)."""
    return _KILL_HEAD + _KILL.pack(pid, signum)


# KILL -> (pid, signal)
decode_kill = _KILL.unpack_from


def encode_worker_config(config: bytes) -> bytes:
    """WORKER_CONFIG: the pickled WorkerConfig, once, before any SPAWN (fresh-interpreter templates)."""
    return _frame(Kind.WORKER_CONFIG, config)


def encode_limits(kill_grace: float, memory_limit: int | None, check_interval: float) -> bytes:
    """LIMITS: what the template enforces (limits.py), once."""
    return _frame(Kind.LIMITS, _LIMITS_SETTINGS.pack(kill_grace, memory_limit or 0, check_interval))


def decode_limits(body: Body) -> tuple[float, int | None, float]:
    """LIMITS -> (kill_grace, memory_limit_per_child or None, memory_check_interval)."""
    kill_grace, memory_limit, interval = _LIMITS_SETTINGS.unpack_from(body)
    return kill_grace, memory_limit or None, interval


# ---------------------------------------------------------------- template -> parent


def encode_spawned(worker_id: int, pid: int) -> bytes:
    """SPAWNED: worker ``worker_id`` was forked as ``pid``."""
    return _SPAWNED_HEAD + _SPAWNED.pack(worker_id, pid)


# SPAWNED -> (worker_id, pid)
decode_spawned = _SPAWNED.unpack_from


def encode_exited(worker_id: int, pid: int, exitcode: int) -> bytes:
    """EXITED: the worker is gone; ``exitcode`` is negative for a signal."""
    return _EXITED_HEAD + _EXITED.pack(worker_id, pid, exitcode)


# EXITED -> (worker_id, pid, exitcode)
decode_exited = _EXITED.unpack_from


def encode_limit(worker_id: int, pid: int, seq: int, reason: int, rss: int) -> bytes:
    """LIMIT: the template signalled worker ``pid`` for job ``seq`` (see limits.py)."""
    return _LIMIT_HEAD + _LIMIT.pack(worker_id, pid, seq, reason, rss)


# LIMIT -> (worker_id, pid, seq, reason, rss)
decode_limit = _LIMIT.unpack_from


def _frame(kind: Kind, *parts: bytes) -> bytes:
    """One frame as bytes: header and the concatenated body ``parts``."""
    body = b"".join(parts)
    return HEADER.pack(len(body), kind) + body


class FrameTooLarge(Exception):
    """A frame announced more bytes than this process can allocate; the stream cannot go on."""

    def __init__(self, length: int) -> None:
        super().__init__(f"a {length}-byte message does not fit in memory")
        self.length = length


def scratch_buffer(size: int) -> memoryview:
    """A buffer for ``FrameReader.receive`` to read through, costing nothing until used.

    Anonymous memory: the kernel maps a page when a read first writes to it,
    so a small frame touches one page of it. (A ``bytearray`` of that size
    would be zero-filled at once: every page faulted in, each time a worker
    starts.) It is left out of every fork: a pool's template and workers,
    forked from the process that reads through it, never carry its pages.
    """
    memory = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_DONTFORK"):
        memory.madvise(mmap.MADV_DONTFORK)
    return memoryview(memory)


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

    def receive(
        self, sock: socket.socket, scratch: memoryview, ancillary_size: int, flags: int
    ) -> tuple[int, list[tuple[int, int, bytes]]]:
        """Read from ``sock`` once: into the large frame being filled, else through ``scratch``.

        ``scratch`` is a buffer the caller owns and lends for every read. A
        fresh ``bytes`` per read would be a large allocation each time, which
        glibc serves with an ``mmap`` and an ``munmap`` of its own: about
        12 us per read, more than a tiny job's whole round trip costs here.
        Returns the bytes read (0: end of stream) and the ancillary data
        (descriptors sent along, see shm.py). Raises what ``recvmsg_into`` raises.
        """
        big = self._big
        if big is not None:
            n, ancillary, _, _ = sock.recvmsg_into(
                [memoryview(big)[self._big_filled :]], ancillary_size, flags
            )
            self._big_filled += n
        else:
            n, ancillary, _, _ = sock.recvmsg_into([scratch], ancillary_size, flags)
            if n:
                self._buffer += scratch[:n]
        return n, ancillary

    def feed(self, data: bytes | memoryview) -> None:
        """Take bytes read elsewhere (a socket read with ``recv``)."""
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
