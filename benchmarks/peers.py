"""One adapter per pool under test, behind one small interface.

A scenario says what to run ("2 workers, retire after every job, submit
1,000 no-ops, wait for all"); the adapter says how each library spells it.
Every wait takes an absolute ``deadline`` so that a pool that stops
answering is reported as a hang by the measuring process itself, with what
it had done so far, before the harness's wall-clock cap kills it.

Adapters translate only; they never change what a library does by default,
except where a scenario fixes a setting for every pool alike (the number of
workers, a recycling limit).
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import itertools
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

__all__ = [
    "DEFAULT_PEERS",
    "PEERS",
    "Hang",
    "NotApplicable",
    "Peer",
    "make_peer",
]


class NotApplicable(Exception):
    """This pool cannot run this scenario; the message says why."""


class Hang(Exception):
    """The deadline passed while waiting on the pool; ``details`` says how far it got.

    ``details["idle_s"]``, where the adapter can tell, is how long before the
    deadline the last result came back: a pool idle that long is stuck, one
    that was still answering is only slow.
    """

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details: dict[str, Any] = dict(details or {})


class _Progress:
    """When the last result came back, for telling a stuck pool from a slow one."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.start = self.last = time.monotonic()

    def tick(self, count: int = 1) -> None:
        self.count += count
        self.last = time.monotonic()

    def hang(self, message: str, **details: Any) -> Hang:
        now = time.monotonic()
        return Hang(
            message,
            {
                "answered": self.count,
                "total": self.total,
                "elapsed_s": now - self.start,
                "idle_s": now - self.last,
                **details,
            },
        )


_MAP_BLOCK = 4096
"""Results a futures-based peer's ``map`` hands over between two progress marks."""


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


class Peer:
    """The interface every scenario uses; subclasses translate it for one library."""

    name: ClassVar[str]
    label: ClassVar[str]  # what it is, in the report
    modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.pool: Any = None
        self.note: str | None = None  # anything the report should say about how it ran

    def prepare(self) -> None:
        """Import the library now (with the modules it imports lazily), so that no scenario times an import."""
        for module in self.modules:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise NotApplicable(f"{module} is not installed ({exc})") from exc

    def open(self, workers: int, *, max_tasks: int | None = None) -> None:
        raise NotImplementedError

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def wait(self, handle: Any, deadline: float) -> Any:
        """The job's value, or its exception raised; :class:`Hang` at ``deadline``."""
        raise NotImplementedError

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], deadline: float) -> list[Any]:
        """The library's own ``map`` with its default chunking."""
        raise NotImplementedError

    def run_all(
        self, fn: Callable[..., Any], arglist: Sequence[tuple[Any, ...]], deadline: float
    ) -> list[tuple[bool, Any]]:
        """Submit every call at once, then wait for each: ``(ok, value or exception)``.

        A submit that raises (the standard library refuses new jobs once a crash
        broke the pool) is that job's outcome, as it would be for a user.
        """
        progress = _Progress(len(arglist))
        handles: list[tuple[bool, Any]] = []
        for args in arglist:
            try:
                handles.append((True, self.submit(fn, *args)))
            except NotApplicable:
                raise
            except Exception as exc:
                handles.append((False, exc))
        outcomes: list[tuple[bool, Any]] = []
        for submitted, handle in handles:
            if not submitted:
                outcomes.append((False, handle))
                progress.tick()
                continue
            try:
                outcomes.append((True, self.wait(handle, deadline)))
            except Hang as hang:
                good = sum(ok for ok, _ in outcomes)
                raise progress.hang(str(hang), good=good) from None
            except Exception as exc:
                outcomes.append((False, exc))
            progress.tick()
        return outcomes

    def close(self) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------- concurrent.futures


class _FuturesPeer(Peer):
    """Pools whose handles are ``concurrent.futures.Future``."""

    def wait(self, handle: Any, deadline: float) -> Any:
        # result(timeout) rather than cf.wait([handle]): cf.wait installs a waiter on
        # every future, a per-job cost of the harness, not of the pool being measured.
        try:
            return handle.result(timeout=_remaining(deadline))
        except cf.TimeoutError:
            if handle.done():
                raise  # the job's own TimeoutError
            raise Hang("no result before the deadline") from None

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], deadline: float) -> list[Any]:
        progress = _Progress(len(items))
        out: list[Any] = []
        results = iter(self.pool.map(fn, items, timeout=_remaining(deadline)))
        try:
            # Results are taken in blocks: a per-item append and clock read would
            # cost these peers more than the peers whose map returns a list does.
            while block := list(itertools.islice(results, _MAP_BLOCK)):
                out.extend(block)
                progress.tick(len(block))
        except (TimeoutError, cf.TimeoutError):  # distinct classes before 3.11
            raise progress.hang("map did not finish before the deadline") from None
        return out

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(fn, *args)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


class PoolkitPeer(_FuturesPeer):
    name = "poolkit"
    label = "poolkit.Pool (fork template)"
    modules = ("poolkit", "poolkit.template", "poolkit.worker")
    start_method: ClassVar[str | None] = None

    def open(self, workers: int, *, max_tasks: int | None = None, **options: Any) -> None:
        import poolkit

        if max_tasks is not None:
            options.setdefault("recycle_jitter", 0.0)  # retire at exactly N, as every peer does
        self.pool = poolkit.Pool(
            workers, start_method=self.start_method, max_tasks_per_child=max_tasks, **options
        )


class PoolkitForkserverPeer(PoolkitPeer):
    name = "poolkit-forkserver"
    label = "poolkit.Pool(start_method='forkserver')"
    start_method = "forkserver"


class PoolkitSpawnPeer(PoolkitPeer):
    name = "poolkit-spawn"
    label = "poolkit.Pool(start_method='spawn')"
    start_method = "spawn"


class _StdlibPeer(_FuturesPeer):
    method: ClassVar[str]
    modules = (
        "concurrent.futures.process",
        "multiprocessing.connection",
        "multiprocessing.queues",
        "multiprocessing.synchronize",
        "multiprocessing.popen_fork",
        "multiprocessing.popen_forkserver",
        "multiprocessing.popen_spawn_posix",
    )

    def open(self, workers: int, *, max_tasks: int | None = None) -> None:
        context = multiprocessing.get_context(self.method)
        options: dict[str, Any] = {}
        if max_tasks is not None:
            if sys.version_info < (3, 11):
                raise NotApplicable("ProcessPoolExecutor has max_tasks_per_child from Python 3.11")
            options["max_tasks_per_child"] = max_tasks
        try:
            self.pool = cf.ProcessPoolExecutor(workers, mp_context=context, **options)
        except ValueError as exc:  # "max_tasks_per_child is incompatible with the 'fork' ..."
            raise NotApplicable(f"ProcessPoolExecutor refuses: {exc}") from exc

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


class StdlibForkPeer(_StdlibPeer):
    name = "stdlib-fork"
    label = "concurrent.futures.ProcessPoolExecutor, fork"
    method = "fork"


class StdlibForkserverPeer(_StdlibPeer):
    name = "stdlib-forkserver"
    label = "concurrent.futures.ProcessPoolExecutor, forkserver"
    method = "forkserver"


class StdlibSpawnPeer(_StdlibPeer):
    name = "stdlib-spawn"
    label = "concurrent.futures.ProcessPoolExecutor, spawn"
    method = "spawn"


class LokyPeer(_FuturesPeer):
    name = "loky"
    label = "loky.ProcessPoolExecutor"
    modules = ("loky",)

    def open(self, workers: int, *, max_tasks: int | None = None, leak_check: bool = False) -> None:
        import loky

        if max_tasks is not None and not leak_check:
            raise NotApplicable("loky has no option to retire a worker after N jobs")
        if max_tasks is not None:
            self.note = (
                "no max-tasks option; loky's own leak check (restart a worker grown by 300 MB, "
                "looked at once a second) is what bounds it"
            )
        self.pool = loky.ProcessPoolExecutor(workers)


class PebblePeer(_FuturesPeer):
    name = "pebble"
    label = "pebble.ProcessPool"
    modules = ("pebble",)

    def open(self, workers: int, *, max_tasks: int | None = None) -> None:
        import pebble

        self.pool = pebble.ProcessPool(max_workers=workers, max_tasks=max_tasks or 0)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.schedule(fn, args=args)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], deadline: float) -> list[Any]:
        future = self.pool.map(fn, items)
        try:
            return list(future.result(timeout=_remaining(deadline)))
        except TimeoutError as exc:  # pebble's iterator has no deadline: the harness's cap is it
            raise Hang("map did not finish before the deadline") from exc

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None


# ---------------------------------------------------------------- AsyncResult pools


class _AsyncResultPeer(Peer):
    """Pools whose handles have ``wait(timeout)``, ``ready()`` and ``get()``."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.apply_async(fn, args)

    def wait(self, handle: Any, deadline: float) -> Any:
        handle.wait(_remaining(deadline))
        if not handle.ready():
            raise Hang("no result before the deadline")
        return handle.get()

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], deadline: float) -> list[Any]:
        return list(self.wait(self.pool.map_async(fn, items), deadline))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None


class MpPoolPeer(_AsyncResultPeer):
    name = "mp-pool"
    label = "multiprocessing.Pool (fork)"
    modules = ("multiprocessing.pool", "multiprocessing.popen_fork")

    def open(self, workers: int, *, max_tasks: int | None = None) -> None:
        self.pool = multiprocessing.get_context("fork").Pool(workers, maxtasksperchild=max_tasks)


class BilliardPeer(_AsyncResultPeer):
    name = "billiard"
    label = "billiard.Pool (Celery's fork of multiprocessing)"
    modules = ("billiard",)

    def open(self, workers: int, *, max_tasks: int | None = None) -> None:
        import billiard

        self.pool = billiard.Pool(workers, maxtasksperchild=max_tasks)


class MpirePeer(_AsyncResultPeer):
    name = "mpire"
    label = "mpire.WorkerPool (fork)"
    modules = ("mpire",)

    def __init__(self) -> None:
        super().__init__()
        self.lifespan: int | None = None

    def open(self, workers: int, *, max_tasks: int | None = None) -> None:
        import mpire

        self.lifespan = max_tasks
        self.pool = mpire.WorkerPool(n_jobs=workers, start_method="fork")  # type: ignore[attr-defined]

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.lifespan is not None:
            raise NotApplicable("mpire's apply_async has no worker_lifespan")
        return self.pool.apply_async(fn, args=args)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], deadline: float) -> list[Any]:
        # A list of results, as every other peer returns (by default mpire joins numpy results into one array).
        return list(self.pool.map(fn, items, concatenate_numpy_output=False))

    def run_all(
        self, fn: Callable[..., Any], arglist: Sequence[tuple[Any, ...]], deadline: float
    ) -> list[tuple[bool, Any]]:
        if self.lifespan is None:
            return super().run_all(fn, arglist, deadline)
        # worker_lifespan exists only on the map family; one item per task so it counts jobs.
        self.note = f"map(..., worker_lifespan={self.lifespan}, chunk_size=1)"
        values = self.pool.map(fn, arglist, worker_lifespan=self.lifespan, chunk_size=1)
        return [(True, value) for value in values]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop_and_join()
            self.pool = None


class JoblibPeer(Peer):
    """joblib's ``Parallel`` (loky backend), as a new user calls it: it memory-maps large numpy arguments."""

    name = "joblib"
    label = "joblib.Parallel(n_jobs) (loky backend, auto-memmapping)"
    modules = ("joblib",)

    def open(self, workers: int, *, max_tasks: int | None = None) -> None:
        import joblib

        if max_tasks is not None:
            raise NotApplicable("joblib.Parallel has no per-worker job limit")
        self.pool = joblib.Parallel(n_jobs=workers)
        self.pool.__enter__()  # keep its workers between calls, as a pool does

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotApplicable("joblib has no submit: it runs batches of calls through Parallel")

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], deadline: float) -> list[Any]:
        from joblib import delayed

        return list(self.pool(delayed(fn)(item) for item in items))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.__exit__(None, None, None)
            self.pool = None


# ---------------------------------------------------------------- the reference


class LimitPeer(Peer):
    name = "limit"
    label = "reference: os.fork + pipes, length-prefixed pickles, pipelined (map: chunks of 1000)"
    modules = ("benchmarks.limit",)

    def open(self, workers: int, *, max_tasks: int | None = None) -> None:
        from .limit import LimitPool

        self.pool = LimitPool(workers, max_tasks=max_tasks)
        self.workers = workers

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(fn, *args)

    def wait(self, handle: Any, deadline: float) -> Any:
        try:
            self.pool.wait(handle, deadline)
        except TimeoutError as exc:
            raise Hang("no result before the deadline") from exc
        if not handle.ok:
            raise handle.value
        return handle.value

    def shared_map(self, arrays: Sequence[Any]) -> list[Any]:
        """S8's reference: arrays copied into shared memory, children write results into more of it."""
        from .limit import shared_memory_double

        return shared_memory_double(arrays, self.workers)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], deadline: float) -> list[Any]:
        try:
            return list(self.pool.map(fn, items, deadline))
        except TimeoutError as exc:  # LimitPool.map waits chunk by chunk; no progress kept
            raise Hang("map did not finish before the deadline") from exc

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


_ALL: tuple[type[Peer], ...] = (
    PoolkitPeer,
    StdlibForkPeer,
    StdlibForkserverPeer,
    StdlibSpawnPeer,
    LokyPeer,
    MpPoolPeer,
    PebblePeer,
    BilliardPeer,
    MpirePeer,
    JoblibPeer,
    LimitPeer,
    PoolkitForkserverPeer,
    PoolkitSpawnPeer,
)
PEERS: dict[str, type[Peer]] = {cls.name: cls for cls in _ALL}
# The default run: poolkit (fork), the peers of docs/mission.md, and the reference.
DEFAULT_PEERS: tuple[str, ...] = tuple(cls.name for cls in _ALL[:11])
# Where each peer's version comes from (importlib.metadata distribution names).
DISTRIBUTIONS: dict[str, str | None] = {
    "poolkit": "poolkit",
    "poolkit-forkserver": "poolkit",
    "poolkit-spawn": "poolkit",
    "stdlib-fork": None,
    "stdlib-forkserver": None,
    "stdlib-spawn": None,
    "mp-pool": None,
    "loky": "loky",
    "pebble": "Pebble",
    "billiard": "billiard",
    "mpire": "mpire",
    "joblib": "joblib",
    "limit": None,
}


def make_peer(name: str) -> Peer:
    try:
        cls = PEERS[name]
    except KeyError:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}") from None
    return cls()


def split_names(text: str, known: Iterable[str], what: str) -> list[str]:
    """Parse ``"a,b"`` against the known names, keeping the given order."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    known = list(known)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown {what}: {', '.join(unknown)}; known: {', '.join(known)}")
    return names
