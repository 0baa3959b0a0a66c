"""Large buffers through shared memory instead of the byte stream.

A job's arguments and its result are pickled with protocol 5. What is large
in them (at least the pool's ``shm_threshold`` bytes) does not travel through
the worker's socket: it is written into a fresh anonymous ``memfd`` (a
*region*), whose descriptor goes over the same socket as ``SCM_RIGHTS``,
attached to the first byte of its frame. Two kinds of large pieces:

* *out-of-band buffers*: what pickle's ``buffer_callback`` sees (contiguous
  numpy arrays, ``memoryview``, ``pickle.PickleBuffer``). The receiver maps
  the region once, privately and copy-on-write (``MAP_PRIVATE``), and the
  object is rebuilt over that mapping: no copy, writable, independent of the
  sender, and the mapping lives exactly as long as the objects built on it;
* *holes*: large raw chunks the pickler writes into its stream (``bytes``,
  ``bytearray``, non-contiguous arrays, which numpy pickles as bytes). They
  are cut out of the stream and read back with ``pread`` straight into the
  object the unpickler allocates: one copy on each side, where the byte
  stream costs a copy into the kernel, one out of it and one more in pickle.

Why a fresh region per message rather than a reusable per-worker arena:
writing 64 MiB into a fresh memfd took a median 47.5 ms here, into a reused
one 20.8 ms (2 cores, ``pwrite``, 7 tries each). But a receiver that maps a
region keeps it for as long as the rebuilt array lives, so an arena could
not be written again before every such object had died, which needs a
release protocol between the processes. A region that belongs to one
message has nobody left to write it once sent: there is nothing to release,
no name to leak when a process dies (the kernel frees it with the last
descriptor or mapping), and the receiver's object is simply the mapping.

The payload of a message with a region starts with ``MARK`` (a pickle never
starts with 0), then the table of pieces, then the pickle stream without
its holes. Small messages are plain pickles and take none of this path: the
only cost they see is a length check after pickling.
"""

from __future__ import annotations

import array
import mmap
import os
import pickle
import socket
import struct
from collections import deque
from collections.abc import Iterable
from typing import Any

from . import serialization

__all__ = [
    "ANCILLARY",
    "DEFAULT_THRESHOLD",
    "FdQueue",
    "Incoming",
    "Region",
    "claim",
    "dumps",
    "fds_message",
    "loads",
    "open_fds",
    "send_attached",
    "take_fds",
]

DEFAULT_THRESHOLD = 1 << 20
MARK = 0
AVAILABLE = hasattr(os, "memfd_create")
_PAGE = mmap.PAGESIZE
_FD_SIZE = array.array("i").itemsize
# Room for the descriptors of one sendmsg: the kernel hands over at most one
# message's descriptors per read, and every sender here attaches one.
ANCILLARY = socket.CMSG_SPACE(16 * _FD_SIZE)
RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)

# MARK, out-of-band buffers, holes
_HEAD = struct.Struct("<BxxxII")
# offset in the region, length
_BUFFER = struct.Struct("<QQ")
# position in the pickle stream, offset in the region, length
_HOLE = struct.Struct("<QQQ")

# Descriptors of regions this process holds now (see _forget_after_fork).
_open: set[int] = set()


def open_fds() -> list[int]:
    """The region descriptors this process holds, for a forked template to let go of."""
    return list(_open)


class Region:
    """The sender's memfd for one message; the descriptor is closed when this is dropped.

    The pool keeps a job's region until the job has ended, so a job re-queued
    after its worker died is sent again with the same region.
    """

    __slots__ = ("fd", "size")

    def __init__(self) -> None:
        self.fd = os.memfd_create("poolkit-data", os.MFD_CLOEXEC)
        _open.add(self.fd)
        self.size = 0

    def append(self, data: Any) -> int:
        """Write ``data`` at the next page boundary; return its offset."""
        offset = -(-self.size // _PAGE) * _PAGE
        view = _flat(data)
        done, total = 0, view.nbytes
        while done < total:  # one write moves at most about 2 GiB
            done += os.pwrite(self.fd, view[done:], offset + done)
        self.size = offset + total
        return offset

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            _open.discard(fd)
            os.close(fd)

    def __del__(self) -> None:
        self.close()


def dumps(obj: Any, threshold: int | None, main_refs: serialization.MainRefs | None = None) -> tuple[bytes, Region | None]:
    """Pickle ``obj``; its pieces of at least ``threshold`` bytes go into a region.

    Returns the payload and the region to send with it (None: a plain pickle).
    """
    if not threshold or not AVAILABLE:
        return serialization.dumps(obj, main_refs), None
    parts, buffers = serialization.dumps_parts(obj, main_refs, threshold)
    if not buffers and (len(parts) == 1 or max(map(_size, parts)) < threshold):
        return (parts[0] if len(parts) == 1 else b"".join(parts)), None
    region = Region()
    try:
        table = []
        for buffer in buffers:
            raw = buffer.raw()
            table.append(_BUFFER.pack(region.append(raw), raw.nbytes))
        stream: list[Any] = []
        position = 0
        for part in parts:
            size = _size(part)
            if size >= threshold:
                table.append(_HOLE.pack(position, region.append(part), size))
            else:
                stream.append(part)
            position += size
    except BaseException:
        region.close()
        raise
    head = _HEAD.pack(MARK, len(buffers), len(table) - len(buffers))
    return b"".join([head, *table, *stream]), region


def _size(part: Any) -> int:
    return len(part) if part.__class__ is bytes else memoryview(part).nbytes


def _flat(data: Any) -> memoryview:
    """The bytes of ``data`` as a flat view (a PickleBuffer may be Fortran-ordered)."""
    if isinstance(data, pickle.PickleBuffer):
        return data.raw()
    return memoryview(data).cast("B")


class FdQueue(deque[int]):
    """Descriptors received on one socket and not claimed yet, in order; closed when dropped."""

    def close(self) -> None:
        while self:
            try:
                os.close(self.popleft())
            except OSError:
                pass

    def __del__(self) -> None:
        self.close()


def take_fds(ancillary: Iterable[tuple[int, int, bytes]], fds: FdQueue) -> None:
    """Queue the descriptors a ``recvmsg`` returned."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) - len(data) % _FD_SIZE]))


class Incoming:
    """The receiver's region of one message, until its payload is loaded."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


def claim(payload: memoryview, fds: FdQueue) -> Incoming | None:
    """The region of the frame whose payload this is, if it has one.

    Every frame that carries a region takes its descriptor here, in frame
    order, whether or not its payload is ever loaded.
    """
    if not payload or payload[0] != MARK:
        return None
    if not fds:
        raise OSError("a message announced a shared-memory region, but no descriptor came with it")
    return Incoming(fds.popleft())


def loads(payload: bytes | bytearray | memoryview, incoming: Incoming | None) -> Any:
    """Unpickle a payload made by :func:`dumps`; its region (if any) is closed on return."""
    if incoming is None:
        return serialization.loads(payload)
    try:
        view = memoryview(payload)
        _, n_buffers, n_holes = _HEAD.unpack_from(view)
        at = _HEAD.size
        pieces = []
        for _ in range(n_buffers):
            pieces.append(_BUFFER.unpack_from(view, at))
            at += _BUFFER.size
        holes = []
        for _ in range(n_holes):
            holes.append(_HOLE.unpack_from(view, at))
            at += _HOLE.size
        stream = view[at:]
        buffers: list[memoryview] = []
        if pieces:
            end = max(offset + length for offset, length in pieces)
            mapping = map_private(incoming.fd, end)
            buffers = [mapping[offset : offset + length] for offset, length in pieces]
        if not holes:
            return pickle.loads(stream, buffers=buffers)
        return pickle.Unpickler(_HoleyStream(stream, holes, incoming.fd), buffers=buffers).load()
    finally:
        incoming.close()


class _HoleyStream:
    """The pickle stream with its holes read from the region: a file for ``pickle.Unpickler``.

    The unpickler allocates a large ``bytes`` or ``bytearray`` itself and
    asks ``readinto`` to fill it, so a hole is copied once, by the kernel.
    """

    def __init__(self, inline: memoryview, holes: list[tuple[int, int, int]], fd: int) -> None:
        # (start in the stream, end, offset in inline data or -1 - offset in the region)
        self.segments: list[tuple[int, int, int, bool]] = []
        position = inline_at = 0
        for hole_at, offset, length in holes:
            if hole_at > position:
                self.segments.append((position, hole_at, inline_at, False))
                inline_at += hole_at - position
            self.segments.append((hole_at, hole_at + length, offset, True))
            position = hole_at + length
        rest = len(inline) - inline_at
        if rest > 0:
            self.segments.append((position, position + rest, inline_at, False))
        self.inline = inline
        self.fd = fd
        self.position = 0
        self.index = 0

    def readinto(self, target: Any) -> int:
        out = memoryview(target).cast("B")
        done = 0
        segments = self.segments
        while done < len(out) and self.index < len(segments):
            start, end, source, in_region = segments[self.index]
            if self.position >= end:
                self.index += 1
                continue
            skip = self.position - start
            n = min(end - self.position, len(out) - done)
            if in_region:
                got = os.preadv(self.fd, [out[done : done + n]], source + skip)
                if got <= 0:
                    raise EOFError("a shared-memory region ended early")
                n = got
            else:
                out[done : done + n] = self.inline[source + skip : source + skip + n]
            done += n
            self.position += n
        return done

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = self.segments[-1][1] - self.position if self.segments else 0
        buffer = bytearray(size)
        return bytes(buffer[: self.readinto(buffer)])

    def readline(self) -> bytes:
        line = bytearray()
        while True:
            byte = self.read(1)
            line += byte
            if not byte or byte == b"\n":
                return bytes(line)


def map_private(fd: int, length: int) -> memoryview:
    """Map ``length`` bytes of ``fd`` privately (copy-on-write) and writable, owned by an mmap object.

    ``mmap.mmap(fd, ...)`` would keep a duplicate of the descriptor open for
    as long as the mapping lives (before Python 3.13), one per result a
    caller holds. So an anonymous mapping of the right size is made (it
    holds no descriptor) and the region is mapped over it with
    ``MAP_FIXED``: the mmap object unmaps it when the last view of it dies.
    """
    size = max(_PAGE, -(-length // _PAGE) * _PAGE)
    holder = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    anchor = _ctypes().c_char.from_buffer(holder)
    address = _ctypes().addressof(anchor)
    del anchor
    _map_fixed(address, size, fd)
    return memoryview(holder)[:length]


_libc: Any = None


def _ctypes() -> Any:
    import ctypes

    return ctypes


def _map_fixed(address: int, size: int, fd: int) -> None:
    global _libc
    ctypes = _ctypes()
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
        )
        _libc = libc
    flags = mmap.MAP_PRIVATE | _MAP_FIXED
    result = _libc.mmap(address, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
    if result != address:
        errno = ctypes.get_errno()
        raise OSError(errno, f"could not map a shared-memory region: {os.strerror(errno)}")


_MAP_FIXED = 0x10  # Linux, every architecture


def fds_message(region: Region) -> list[tuple[int, int, bytes]]:
    """The ancillary data of a ``sendmsg`` that carries ``region``'s descriptor."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [region.fd]).tobytes())]


def send_attached(sock: socket.socket, parts: list[Any], attached: deque[tuple[Any, Region]]) -> int:
    """``sock.sendmsg(parts)`` where some frames carry a region: each descriptor goes with its frame's first byte.

    ``attached``: (first part of the frame, its region), in outbox order; an
    entry leaves once its descriptor has been sent. Sends stop short of the
    next such frame, so a descriptor never travels in a later frame's bytes.
    """
    first, region = attached[0]
    index = _index(parts, first)
    if index is None:
        return sock.sendmsg(parts)
    if index > 0:
        return sock.sendmsg(parts[:index])
    end = _index(parts, attached[1][0]) if len(attached) > 1 else None
    sent = sock.sendmsg(parts[:end], fds_message(region))
    attached.popleft()
    return sent


def _index(parts: list[Any], part: Any) -> int | None:
    for index, candidate in enumerate(parts):
        if candidate is part:
            return index
    return None


def _forget_after_fork() -> None:
    """In a child forked from this process: point inherited region descriptors at /dev/null.

    Kept, they would hold the regions' memory for as long as the child
    lives; the numbers stay taken so that a Region object in the copied
    memory can never close a descriptor the child opens later.
    """
    if not _open:
        return
    fds = list(_open)
    _open.clear()
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    for fd in fds:
        try:
            os.dup2(null, fd, inheritable=False)
        except OSError:
            pass
    os.close(null)


os.register_at_fork(after_in_child=_forget_after_fork)
