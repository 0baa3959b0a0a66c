"""Job deadlines and the hard memory limit, enforced by the template, not by the pool's process.

Why here: the pool's manager is a thread in the caller's process. While the
caller holds the GIL in one long C call (``sum(range(10**9))``, a big numpy
operation that does not release it), that thread cannot run, so a limit it
enforced would wait for the caller: a job could grow far past
``memory_limit_per_child``, or run far past its timeout. The template is a
process of its own that does nothing else, so it is always there to act.

How: the template owns a small shared memory area (an anonymous ``memfd``,
one page) with one slot per worker, and the read end of a pipe. A worker
writes its slot as a *watched* job starts (a job with a timeout, or any job
of a pool with ``memory_limit_per_child``): the job's sequence number and its
deadline; then it writes one byte to the pipe, which wakes the template. When
the job ends it clears the slot. The template (``Enforcer``) knows from
the slots when the next thing is due, and then:

* at a job's deadline: SIGTERM to the worker's process group, SIGKILL
  ``kill_grace`` seconds later if it is still there;
* every ``memory_check_interval`` while a watched job runs: the worker's
  memory from ``/proc`` (``counted_memory``: shared pages it only maps do
  not count), and SIGKILL when it is above the limit.

Each action is reported to the pool (a LIMIT frame, before the worker's
EXITED), which fails the job with ``JobTimeout`` or ``MemoryLimitExceeded``
(or retries it) when it next runs. Jobs that are not watched cost one branch.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
from collections.abc import Callable

from . import wire

__all__ = ["SLOTS", "Enforcer", "JobWatch", "LimitArea", "anon_share", "counted_memory", "memory_over"]

# seq of the running watched job (0: none), its deadline (time.monotonic(); 0.0: none)
SLOT = struct.Struct("<Qd")
_SIZE = 4096
SLOTS = _SIZE // SLOT.size
_NEVER = float("inf")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class LimitArea:
    """The shared slots and the wake-up pipe; made by the template, inherited by its workers."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("poolkit-limits", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, _SIZE)
        self.slots = mmap.mmap(self.fd, _SIZE)
        self.ring_r, self.ring_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._free = list(range(SLOTS - 1, -1, -1))

    def take(self) -> int:
        """A free slot for a new worker, or -1 when all are taken (that worker is not watched)."""
        return self._free.pop() if self._free else -1

    def give_back(self, index: int) -> None:
        if index >= 0:
            SLOT.pack_into(self.slots, index * SLOT.size, 0, 0.0)
            self._free.append(index)

    def template_only_fds(self) -> tuple[int, int]:
        """What a worker closes: it writes through its mapping and rings through ``ring_w``."""
        return (self.fd, self.ring_r)


class JobWatch:
    """A worker's own slot: it posts the watched job it runs."""

    __slots__ = ("_offset", "_ring", "_slots", "memory")

    def __init__(self, slots: mmap.mmap, index: int, ring_w: int, memory: bool) -> None:
        self._slots = slots
        self._offset = index * SLOT.size
        self._ring = ring_w
        self.memory = memory  # the pool has a memory limit: every job is watched

    def start(self, seq: int, deadline: float) -> None:
        SLOT.pack_into(self._slots, self._offset, seq, deadline)
        try:
            os.write(self._ring, b"\0")
        except OSError:
            pass  # a full pipe already wakes the template

    def stop(self) -> None:
        SLOT.pack_into(self._slots, self._offset, 0, 0.0)


def map_area(fd: int) -> mmap.mmap:
    """In a worker that exec'd a fresh interpreter: map the area whose descriptor it inherited."""
    slots = mmap.mmap(fd, _SIZE)
    os.close(fd)
    return slots


class Enforcer:
    """The template's side: reads the slots, signals workers past a limit, reports what it did."""

    def __init__(
        self,
        area: LimitArea,
        signal_group: Callable[[int, int], None],
        report: Callable[[bytes], None],
    ) -> None:
        self.area = area
        self.signal_group = signal_group
        self.report = report
        self.slot_of: dict[int, tuple[int, int]] = {}  # pid -> (slot, worker_id)
        self.kill_at: dict[int, float] = {}  # pid -> when SIGKILL follows a SIGTERM
        self.acted: set[int] = set()  # pids already reported (one LIMIT frame per worker)
        self.next_memory_check = 0.0

    def add(self, pid: int, slot: int, worker_id: int) -> None:
        if slot >= 0:
            self.slot_of[pid] = (slot, worker_id)

    def remove(self, pid: int) -> None:
        entry = self.slot_of.pop(pid, None)
        if entry is not None:
            self.area.give_back(entry[0])
        self.kill_at.pop(pid, None)
        self.acted.discard(pid)

    def enforce(
        self, now: float, kill_grace: float, memory_limit: int | None, memory_interval: float
    ) -> float | None:
        """Act on what is due; return how many seconds until the next thing may be, or None."""
        soonest = _NEVER
        slots = self.area.slots
        check_memory = memory_limit is not None and now >= self.next_memory_check
        busy = False
        for pid, (slot, worker_id) in list(self.slot_of.items()):
            kill_at = self.kill_at.get(pid)
            if kill_at is not None:
                if now >= kill_at:
                    self.signal_group(pid, signal.SIGKILL)
                    self.kill_at[pid] = _NEVER
                else:
                    soonest = min(soonest, kill_at)
                continue
            seq, deadline = SLOT.unpack_from(slots, slot * SLOT.size)
            if not seq or pid in self.acted:
                continue
            busy = True
            if deadline and now >= deadline:
                self.signal_group(pid, signal.SIGTERM)
                self.kill_at[pid] = now + kill_grace
                soonest = min(soonest, now + kill_grace)
                self._acted(worker_id, pid, seq, wire.LIMIT_TIMEOUT, 0)
                continue
            if deadline:
                soonest = min(soonest, deadline)
            if check_memory and memory_limit is not None:
                rss = memory_over(_rss(pid), memory_limit, pid)
                if rss:
                    self.signal_group(pid, signal.SIGKILL)
                    self.kill_at[pid] = _NEVER
                    self._acted(worker_id, pid, seq, wire.LIMIT_MEMORY, rss)
        if memory_limit is not None and busy:
            if check_memory:
                self.next_memory_check = now + memory_interval
            soonest = min(soonest, self.next_memory_check)
        return None if soonest == _NEVER else max(0.0, soonest - now)

    def _acted(self, worker_id: int, pid: int, seq: int, reason: int, rss: int) -> None:
        self.acted.add(pid)
        self.report(wire.encode_limit(worker_id, pid, seq, reason, rss))


def counted_memory(statm: bytes) -> int:
    """A worker's anonymous resident memory (``RssAnon``), from ``/proc/PID/statm``: the cheap first look.

    Resident pages less those of shared files and shared memory: its heap,
    what a job allocates and writes, and the pages it writes in a private
    mapping of a shared-memory argument (each becomes a private copy). Pages
    it only maps and reads, such as a large argument in shared memory, and
    the file pages of code and libraries, are left out: they are not the
    worker's to free, and every process that maps them shares one copy.
    Read from the same file as RSS, so a sample costs what reading RSS costs.

    It still counts, in full, the anonymous pages a forked worker shares with
    the template and your process since the fork (a large array your program
    held when the pool started): hence ``memory_over``.
    """
    fields = statm.split()
    return (int(fields[1]) - int(fields[2])) * _PAGE


def anon_share(pid: int | str) -> int:
    """The worker's proportional share of anonymous memory (``Pss_Anon``), from ``/proc/PID/smaps_rollup``.

    A page the worker alone holds counts in full; a page it still shares with
    N processes since a fork (the template, your process, its siblings)
    counts 1/N. About 15 times the cost of ``statm`` (the kernel walks every
    mapping), so it is read only when the cheap figure is over a limit.
    0 when it cannot be read (a kernel before 5.7 has no ``Pss_Anon``).
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
            for line in rollup:
                if line.startswith(b"Pss_Anon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_over(cheap: int, limit: int, pid: int | str) -> int:
    """The worker's memory if it is over ``limit``, else 0: the one rule both memory limits use.

    ``cheap`` is ``counted_memory`` (RssAnon), an upper bound of what the
    worker owns; under the limit, that settles it at no extra cost. Over it,
    the figure that decides is ``anon_share``, so that memory inherited from
    your process and still shared (counted once per process by RssAnon) does
    not retire or kill every worker of a pool started by a large program.
    """
    if cheap <= limit:
        return 0
    share = anon_share(pid)
    if share == 0:
        return cheap  # no smaps_rollup: the cheap figure is all there is
    return share if share > limit else 0


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return counted_memory(statm.read())
    except (OSError, ValueError, IndexError):
        return 0
