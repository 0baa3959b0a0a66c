"""A stateful property test: random interleavings of everything a user does to one pool.

Hypothesis drives one pool per example through two kinds of actions, in
random order:

* what *jobs* do: submits of ordinary, raising, crashing, timing-out and
  terminated jobs;
* what the *caller* does: waits and ``stats()``; ``cancel()`` of queued and
  of running futures; ``map``, ``imap_unordered`` and ``batch`` iterators
  abandoned half way (closed or dropped), left by an exception of the
  caller's own loop body, by ``map``'s timeout expiring while its jobs still
  run, or by a KeyboardInterrupt in the caller's main thread; ``os.fork()``
  in the caller (the child never touches the pool and lives on until the
  test lets it go, after the pool's shutdown if need be); done-callbacks that
  call back into the pool (``stats()``, ``submit()``, ``shutdown(wait=False)``);
  ``shutdown()`` with and without ``wait`` and ``cancel_futures``.

The model remembers what each future may end as; the invariants say:

* every future resolves exactly once (its done-callbacks run once), and with
  one of its allowed outcomes: the value, the job's exception type,
  ``WorkerCrashed`` with the exit code, ``JobTimeout``, or cancelled (for
  ``terminate()``, a successful ``cancel()``, or a queued job under
  ``shutdown(cancel_futures=True)``);
* ``stats()`` never shows more live workers than ``max_workers`` and its
  counters never go backwards nor exceed what the model allows; after
  shutdown they equal the model's counts, give or take the jobs that ``map``
  and friends made themselves (those can only end done or cancelled);
* ``shutdown()`` returns in bounded time; after it no process of the pool is
  left, nor any thread or descriptor (the forked caller children excepted
  until the test releases and reaps them).

Nothing here waits without a bound: an engine that hangs makes the test fail
with the stacks of the threads involved, never hang pytest. Every wait is for
an observable fact (a future, a file, an event), never a sleep guess.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jobs
import psutil
import pytest
from conftest import LeakCheck, descendants, live_workers, wait_until
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import poolkit

T = TypeVar("T")

MAX_WORKERS = 2
COUNTERS = ("submitted", "done", "failed", "crashed", "timed_out", "cancelled")
#: The longest any one wait of this test (``shutdown()`` included) may take
#: before it calls the pool stuck. A healthy pool needs well under a second
#: for each. Once one hang was seen in this process, the shorter bound keeps
#: Hypothesis's replays and shrinking of that hang from taking many minutes.
BOUND = 30.0
BOUND_AFTER_A_HANG = 10.0
_hangs_seen = 0


def bound() -> float:
    return BOUND if not _hangs_seen else BOUND_AFTER_A_HANG


def hang(message: str) -> AssertionError:
    """The error for a wait that reached its bound (and shorter bounds from now on)."""
    global _hangs_seen
    _hangs_seen += 1
    return AssertionError(message)


def wait_for(predicate: Callable[[], Any], what: str) -> Any:
    """``wait_until`` with the current bound; a timeout counts as a hang."""
    try:
        return wait_until(predicate, timeout=bound(), what=what)
    except AssertionError as error:
        raise hang(f"{error}\n" + _stacks(_pool_threads)) from None


def wait_for_start(path: Path | str) -> None:
    """Wait until a job has written its started file (in one atomic write)."""
    wait_for(lambda: os.path.exists(path), f"the job writing {path} to start")


# Outcomes a future may end with; the first element names the stats counter.
CANCELLED = ("cancelled",)


def value(v: Any) -> tuple[Any, ...]:
    return ("done", v)


def error(
    counter: str, error_type: type[BaseException], exitcode: int | None = None
) -> tuple[Any, ...]:
    return (counter, error_type, exitcode)


class CallerError(Exception):
    """Raised by the caller's own loop body, never by a job."""


# ----------------------------------------------------------------- bounded helpers


def _stacks(only: Callable[[threading.Thread], bool] | None = None) -> str:
    """The current stack of every thread (or those ``only`` picks): what a hang report shows."""
    frames = sys._current_frames()
    out = []
    for thread in threading.enumerate():
        if only is not None and not only(thread):
            continue
        frame = frames.get(thread.ident or -1)
        if frame is None:
            continue
        out.append(f"--- thread {thread.name!r}\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(out)


def _pool_threads(thread: threading.Thread) -> bool:
    return thread.name.startswith("poolkit") or thread.name.startswith("stateful-")


def bounded(fn: Callable[[], T], what: str, timeout: float | None = None) -> T:
    """Run ``fn`` in a helper thread; return its result, re-raise its exception, or fail after ``timeout``.

    For calls into the pool that block (``next()`` on an iterator without a
    timeout of its own, ``shutdown()``, ``cancel()`` running callbacks): if
    the engine hangs, the test fails naming ``what`` instead of hanging
    pytest. The helper thread is a daemon; a hung one is left behind (and the
    leak check of that example is skipped: the failure is the hang).
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"stateful-{what}", daemon=True)
    timeout = bound() if timeout is None else timeout
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise hang(
            f"{what} did not return within {timeout:g} s: the pool looks stuck.\n"
            + _stacks(_pool_threads)
        )
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def wait_for_any_start(paths: list[str]) -> None:
    """Wait until one of the jobs that write ``paths`` has started.

    Not a given one: a job can be queued behind later ones (a worker that
    died hands its queued jobs back), and those may wait for the go file.
    """

    def started() -> bool:
        return any(os.path.exists(path) for path in paths)

    wait_for(started, f"one of the jobs writing {paths} to start")


def wait_for_futures(futures: list[cf.Future[Any]], what: str) -> None:
    timeout = bound()
    _, not_done = cf.wait(futures, timeout=timeout)
    if not_done:
        raise hang(
            f"{len(not_done)} of {len(futures)} futures ({what}) unresolved after {timeout:g} s: "
            f"{sorted(not_done, key=repr)[:5]}\n" + _stacks(_pool_threads)
        )


# ----------------------------------------------------------------- the machine


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.before = LeakCheck.snapshot()
        self.directory = Path(tempfile.mkdtemp(prefix="poolkit-stateful-"))
        self.pool = poolkit.Pool(MAX_WORKERS, kill_grace=0.5)
        self.closed = False  # shutdown() was called (by the caller or by a done-callback)
        self.joined = False  # a shutdown(wait=True) returned
        # future -> the outcomes it may end with (see value(), error(), CANCELLED)
        self.expected: dict[cf.Future[Any], tuple[tuple[Any, ...], ...]] = {}
        self.resolutions: Counter[cf.Future[Any]] = Counter()
        self.lock = threading.RLock()  # done-callbacks track futures from other threads
        # Jobs map/imap_unordered/batch may have made (chunks): untracked, each ends done or cancelled.
        self.slack = 0
        self.last_counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.names = itertools.count(1)
        # Blocking jobs that hold every worker: their go file, their futures.
        self.go_files: list[Path] = []
        self.blockers: list[cf.Future[Any]] = []
        # Children the caller forked: pid -> the write end of the pipe they wait on.
        self.forked: dict[int, int] = {}
        # Every process of the pool seen during the example (none may outlive it).
        self.pool_processes: dict[int, psutil.Process] = {}

    # ------------------------------------------------------------- model helpers

    def _track(self, future: cf.Future[Any], *allowed: tuple[Any, ...]) -> None:
        with self.lock:
            self.expected[future] = allowed

        def resolved(f: cf.Future[Any]) -> None:
            with self.lock:
                self.resolutions[f] += 1

        future.add_done_callback(resolved)

    def _expect(self, future: cf.Future[Any], *allowed: tuple[Any, ...]) -> None:
        """Change what an already tracked future may end as."""
        with self.lock:
            self.expected[future] = allowed

    def _allow(self, future: cf.Future[Any], outcome: tuple[Any, ...]) -> None:
        with self.lock:
            if outcome not in self.expected[future]:
                self.expected[future] = (*self.expected[future], outcome)

    def _tracked(self) -> list[tuple[cf.Future[Any], tuple[tuple[Any, ...], ...]]]:
        with self.lock:
            return list(self.expected.items())

    @staticmethod
    def _matches(future: cf.Future[Any], outcome: tuple[Any, ...]) -> bool:
        if outcome[0] == "cancelled":
            return future.cancelled()
        if future.cancelled():
            return False
        exc = future.exception(timeout=0)
        if outcome[0] == "done":
            return exc is None and future.result(timeout=0) == outcome[1]
        _, error_type, exitcode = outcome
        if not isinstance(exc, error_type):
            return False
        if exitcode is not None:
            return isinstance(exc, poolkit.WorkerCrashed) and exc.exitcode == exitcode
        return True

    def _check_outcome(self, future: cf.Future[Any], allowed: tuple[tuple[Any, ...], ...]) -> str:
        """Assert that a resolved ``future`` ended as one of ``allowed``; return that outcome's counter."""
        for outcome in allowed:
            if self._matches(future, outcome):
                return str(outcome[0])
        if future.cancelled():
            got = "cancelled"
        else:
            exc = future.exception(timeout=0)
            got = f"value {future.result(timeout=0)!r}" if exc is None else f"error {exc!r}"
        raise AssertionError(f"{future!r} ended with {got}; allowed: {allowed}")

    def _possible(self) -> Counter[str]:
        """For each counter, how many tracked futures may end counted in it."""
        possible: Counter[str] = Counter()
        for _, allowed in self._tracked():
            possible["submitted"] += 1
            for counter in {outcome[0] for outcome in allowed}:
                possible[counter] += 1
        return possible

    def _note_processes(self, stats: poolkit.PoolStats | None = None) -> None:
        """Remember the pool's processes (workers and template) to check at the end that they are gone."""
        for proc in descendants():
            if proc.pid not in self.before.children and proc.pid not in self.forked:
                self.pool_processes.setdefault(proc.pid, proc)
        for worker in stats.workers if stats is not None else ():
            if worker.pid and worker.pid not in self.pool_processes:
                with contextlib.suppress(psutil.Error):
                    self.pool_processes[worker.pid] = psutil.Process(worker.pid)

    def _stats(self) -> poolkit.PoolStats:
        """``pool.stats()``, bounded: it waits for the pool's thread, which may be stuck."""
        return bounded(self.pool.stats, "stats()")

    def _result(self, future: cf.Future[Any], what: str) -> Any:
        try:
            return future.result(timeout=bound())
        except cf.TimeoutError:
            if future.done():
                raise
            raise hang(f"{what}: {future!r} unresolved\n" + _stacks(_pool_threads)) from None

    def _name(self, stem: str) -> str:
        return str(self.directory / f"{stem}-{next(self.names)}")

    # ------------------------------------------------------------- blockers

    def _release_blockers(self) -> None:
        """Let the blocking jobs finish (they hold every worker until then)."""
        for go in self.go_files:
            jobs.write_line(go, "go")
        self.go_files.clear()
        self.blockers.clear()

    def _wait_for_idle_workers(self) -> None:
        """Wait until every job, tracked or made by map & co., has finished, and
        ``MAX_WORKERS`` workers are ready and idle (bounded).

        Then jobs submitted together go one to each worker. With fewer ready
        (one being replaced after a crash, say) the pool may queue the second
        behind the first on the same worker, where it stays however long the
        first runs, even once another worker is idle.
        """
        wait_for_futures([f for f, _ in self._tracked()], "tracked jobs")

        def idle() -> bool:
            stats = self._stats()
            ready = [w for w in stats.workers if w.state == "ready" and w.current_job is None]
            return stats.pending == 0 and stats.running == 0 and len(ready) == MAX_WORKERS

        wait_for(idle, f"{MAX_WORKERS} idle workers and no job queued or running")

    # ------------------------------------------------------------- forked children

    def _release_child(self, pid: int) -> None:
        """Let a forked caller child go (close its pipe), and reap it (bounded)."""
        os.close(self.forked.pop(pid))
        status: list[int] = []

        def reaped() -> bool:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status.append(code)
            return bool(done)

        try:
            wait_until(reaped, timeout=10, what=f"the caller's forked child {pid} to exit")
        except AssertionError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        assert os.waitstatus_to_exitcode(status[0]) == 0, f"forked child {pid}: status {status[0]}"

    def _release_children(self) -> None:
        for pid in list(self.forked):
            self._release_child(pid)

    # ------------------------------------------------------------- shutdown

    def _shutdown_bounded(self, *, wait: bool = True, cancel_futures: bool = False) -> None:
        """Call ``shutdown()`` in a helper thread; fail, with the threads' stacks, if it does not return."""
        limit = bound() if wait else 5.0  # shutdown(wait=False) only asks: it must return at once
        thread = threading.Thread(
            target=self.pool.shutdown,
            kwargs={"wait": wait, "cancel_futures": cancel_futures},
            name="stateful-shutdown",
            daemon=True,
        )
        started = time.monotonic()
        thread.start()
        thread.join(limit)
        if not thread.is_alive():
            return
        stacks = _stacks(_pool_threads)
        try:
            stats: Any = bounded(self.pool.stats, "stats() of a pool whose shutdown hangs", 5)
        except AssertionError:
            stats = "stats() hangs too"
        message = (
            f"shutdown(wait={wait}, cancel_futures={cancel_futures}) did not return within "
            f"{limit:g} s (pool stats: {stats!r}; forked caller children alive: "
            f"{sorted(self.forked)}).\n{stacks}"
        )
        # Is it waiting for a child the caller forked? Let those go and look again.
        if self.forked:
            with contextlib.suppress(Exception):
                self._release_children()
            thread.join(5)
            if not thread.is_alive():
                raise hang(
                    "shutdown() waited for a child the caller had forked (it returned "
                    f"{time.monotonic() - started:.1f} s later, once that child exited): {message}"
                )
        # Unstick what can be: kill every process the pool made.
        for proc in descendants():
            if proc.pid not in self.before.children:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        thread.join(5)
        raise hang(message)

    # ------------------------------------------------------------- job-side rules

    @precondition(lambda self: not self.closed)
    @rule(x=st.integers(min_value=-1000, max_value=1000))
    def submit_ok(self, x: int) -> None:
        self._track(self.pool.submit(jobs.square, x), value(x * x))

    @precondition(lambda self: not self.closed)
    @rule(message=st.text(max_size=20))
    def submit_raising(self, message: str) -> None:
        self._track(self.pool.submit(jobs.raise_value_error, message), error("failed", ValueError))

    @precondition(lambda self: not self.closed)
    @rule(code=st.integers(min_value=1, max_value=5))
    def submit_crashing(self, code: int) -> None:
        future = self.pool.submit(jobs.crash_exit, code)
        self._track(future, error("crashed", poolkit.WorkerCrashed, code))

    @precondition(lambda self: not self.closed)
    @rule()
    def submit_timing_out(self) -> None:
        future = self.pool.options(timeout=0.3).submit(jobs.sleep_then, 30)
        self._track(future, error("timed_out", poolkit.JobTimeout))

    @precondition(lambda self: not self.closed)
    @rule()
    def terminate_a_running_job(self) -> None:
        self._release_blockers()  # the job must start
        started = Path(self._name("started"))
        never = self.directory / "never"
        future = self.pool.submit(jobs.started_then_wait, str(started), str(never))
        self._track(future, CANCELLED)
        wait_for_start(started)
        assert future.terminate() is True
        assert future.cancelled()

    # ------------------------------------------------------------- caller: waits and stats

    @rule()
    def wait_for_everything(self) -> None:
        self._release_blockers()
        tracked = self._tracked()
        wait_for_futures([f for f, _ in tracked], "all tracked jobs")
        for future, allowed in tracked:
            self._check_outcome(future, allowed)

    @rule()
    def look_at_stats(self) -> None:
        stats = self._stats()
        self._note_processes(stats)
        assert len(live_workers(stats)) <= MAX_WORKERS, stats
        assert stats.pending >= 0 and stats.running >= 0
        assert stats.running <= MAX_WORKERS, stats
        possible = self._possible()
        for name in COUNTERS:
            count = getattr(stats, name)
            bound = possible[name] + (
                self.slack if name in ("submitted", "done", "cancelled") else 0
            )
            assert count >= self.last_counts[name], f"{name} went backwards"
            assert count <= bound, f"{name}: {count} > {bound}, the most the model allows; {stats}"
            self.last_counts[name] = count
        finished = stats.done + stats.failed + stats.crashed + stats.timed_out + stats.cancelled
        assert finished <= stats.submitted, stats

    # ------------------------------------------------------------- caller: cancel

    def _occupy_every_worker(self) -> None:
        """Unless they are held already, start one blocking job per worker, which runs until released."""
        if self.go_files:
            return
        self._wait_for_idle_workers()  # one blocker each, none queued behind another
        go = Path(self._name("go"))
        self.go_files.append(go)
        starts = [Path(self._name("blocker")) for _ in range(MAX_WORKERS)]
        for i, started in enumerate(starts):
            future = self.pool.submit(jobs.started_then_wait, str(started), str(go), f"blocker {i}")
            self._track(future, value(f"blocker {i}"))
            self.blockers.append(future)
        try:
            for started in starts:
                wait_for_start(started)
        except AssertionError as error:
            where = [
                (f, getattr(f, "worker_id", None), getattr(f, "pid", None)) for f in self.blockers
            ]
            raise AssertionError(
                f"{error}: with every worker idle, {MAX_WORKERS} jobs did not all start "
                f"(futures, worker ids, pids: {where}; {self._stats()})"
            ) from None

    @precondition(lambda self: not self.closed and not self.go_files)
    @rule()
    def occupy_every_worker(self) -> None:
        """Hold every worker; the rules that follow see queued jobs, until one releases them."""
        self._occupy_every_worker()

    @precondition(lambda self: bool(self.blockers) or not self.closed)
    @rule(index=st.integers(min_value=0, max_value=MAX_WORKERS - 1))
    def cancel_a_running_job(self, index: int) -> None:
        """``cancel()`` of a job that runs says no, and the job goes on to its value."""
        self._occupy_every_worker()
        future = self.blockers[index]
        assert future.running(), f"{future!r} wrote its started file but is not running"
        assert bounded(future.cancel, "cancel() of a running job") is False
        assert not future.cancelled()

    @precondition(lambda self: not self.closed)
    @rule(cancels=st.lists(st.booleans(), min_size=1, max_size=4), hold=st.booleans())
    def submit_then_cancel(self, cancels: list[bool], hold: bool) -> None:
        """Queue jobs and cancel some.

        ``hold``: behind jobs that hold every worker, so the jobs have not
        started and cancel() succeeds (unless the pool sent one ahead to a
        worker: that counts as running); else cancel() races the pool.
        The workers stay held (for a shutdown that cancels, say).
        """
        if hold:
            self._occupy_every_worker()
        blocked = bool(self.go_files)
        for i, cancel in enumerate(cancels):
            future = self.pool.submit(jobs.square, i)
            self._track(future, value(i * i))
            if not cancel:
                continue
            if bounded(future.cancel, "cancel() of a queued job"):
                assert future.cancelled()
                self._expect(future, CANCELLED)
                event(
                    f"cancel() of a queued job (workers {'held' if blocked else 'free'}): cancelled"
                )
            else:
                # Already sent to a worker (a pipelined job counts as running) or finished.
                assert future.running() or future.done(), future
                event(
                    f"cancel() of a queued job (workers {'held' if blocked else 'free'}): too late"
                )

    @precondition(lambda self: bool(self.go_files))
    @rule()
    def release_blockers(self) -> None:
        self._release_blockers()

    # ------------------------------------------------------------- caller: iterators

    @precondition(lambda self: not self.closed)
    @rule(
        kind=st.sampled_from(["map", "imap_unordered", "batch"]),
        n=st.integers(min_value=1, max_value=40),
        data=st.data(),
        how=st.sampled_from(["close", "drop"]),
    )
    def abandon_an_iterator(self, kind: str, n: int, data: st.DataObject, how: str) -> None:
        """Take a few results, then close() the iterator or drop it; its other jobs still end."""
        take = data.draw(st.integers(min_value=0, max_value=n - 1), label="take")
        if take:
            self._release_blockers()  # results need free workers
        inputs = range(n)
        iterator: Any
        if kind == "map":
            iterator = self.pool.map(jobs.square, inputs)
            self.slack += n
        elif kind == "imap_unordered":
            iterator = self.pool.imap_unordered(jobs.square, inputs)
            self.slack += n
        else:
            iterator = self.pool.batch(jobs.square, inputs)
            self.slack += 2 * n  # a chunk whose worker died is re-run one input at a time
        got = bounded(
            lambda it=iterator: list(itertools.islice(it, take)),
            f"the first {take} results of {kind}",
        )
        if kind == "map":
            assert got == [x * x for x in range(take)]
        elif kind == "imap_unordered":
            assert len(set(got)) == take and set(got) <= {x * x for x in inputs}, got
        else:
            assert [(o.index, o.ok, o.value) for o in got] == [
                (x, True, x * x) for x in range(take)
            ], got
        if how == "close":
            bounded(iterator.close, f"close() of a {kind} iterator")
        del iterator  # "drop": the generator is finalized here (CPython refcounting)

    @precondition(lambda self: not self.closed)
    @rule(n=st.integers(min_value=1, max_value=20), data=st.data())
    def raise_in_the_map_loop(self, n: int, data: st.DataObject) -> None:
        """The caller's loop body raises half way through ``map``'s results."""
        at = data.draw(st.integers(min_value=0, max_value=n - 1), label="at")
        self._release_blockers()
        self.slack += n
        seen: list[int] = []

        def loop() -> None:
            for result in self.pool.map(jobs.square, range(n), timeout=bound()):
                seen.append(result)
                if len(seen) > at:
                    raise CallerError(f"the caller's loop body fails at result {at}")

        try:
            loop()
        except CallerError:
            pass
        except cf.TimeoutError:
            raise hang(f"map gave {len(seen)} of {n} results in time") from None
        else:
            raise AssertionError("the loop body's exception was lost")
        assert seen == [x * x for x in range(at + 1)]

    @precondition(lambda self: not self.closed)
    @rule(n=st.integers(min_value=1, max_value=6))
    def map_timeout_expires(self, n: int) -> None:
        """``map(..., timeout=0.1)`` expires while its jobs still run (they wait for a go file)."""
        go = self._name("map-go")
        starts = [self._name("map-started") for _ in range(n)]
        self.slack += n
        iterator = self.pool.map(jobs.started_then_wait, starts, [go] * n, timeout=0.1)
        try:
            if not self.go_files:  # workers free: its jobs start
                wait_for_any_start(starts)
            with pytest.raises(cf.TimeoutError):
                bounded(lambda it=iterator: next(it), "next() of a map whose timeout expired")
        finally:
            del iterator
            jobs.write_line(go, "go")

    @precondition(lambda self: not self.closed)
    @rule(
        where=st.sampled_from(["loop body", "blocked in next()"]),
        n=st.integers(min_value=1, max_value=10),
        data=st.data(),
    )
    def keyboard_interrupt_in_map(self, where: str, n: int, data: st.DataObject) -> None:
        """SIGINT reaches the caller's main thread while it iterates ``map``.

        The KeyboardInterrupt can only be raised inside this rule's try: the
        signal is sent once, while the rule is in it, and the rule stays in it
        until the interrupt has arrived.
        """
        assert threading.current_thread() is threading.main_thread()
        self._release_blockers()
        self.slack += n
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupted = False
        try:
            if where == "loop body":
                at = data.draw(st.integers(min_value=0, max_value=n - 1), label="at")
                iterator = self.pool.map(jobs.square, range(n), timeout=bound())
                try:
                    for i, result in enumerate(iterator):
                        assert result == i * i
                        if i == at:
                            signal.raise_signal(signal.SIGINT)
                except KeyboardInterrupt:
                    interrupted = True
                del iterator
            else:
                interrupted = self._interrupt_a_blocked_map(n)
        except KeyboardInterrupt:  # anywhere else in the rule (never outside it)
            interrupted = True
        finally:
            signal.signal(signal.SIGINT, previous)
        assert interrupted, "the KeyboardInterrupt never reached the caller"

    def _interrupt_a_blocked_map(self, n: int) -> bool:
        go = self._name("ki-go")
        starts = [self._name("ki-started") for _ in range(n)]
        lock = threading.Lock()
        state = {"allowed": True, "sent": False}
        main = threading.main_thread().ident
        assert main is not None

        def interrupter() -> None:
            try:
                wait_for_any_start(starts)
            except AssertionError:
                return  # the map below times out and says so
            with lock:
                if state["allowed"]:
                    signal.pthread_kill(main, signal.SIGINT)
                    state["sent"] = True

        helper = threading.Thread(target=interrupter, name="stateful-interrupter", daemon=True)
        interrupted = False
        try:
            iterator = self.pool.map(jobs.started_then_wait, starts, [go] * n, timeout=bound())
            helper.start()
            try:
                for _ in iterator:
                    pass
            except KeyboardInterrupt:
                interrupted = True
            except cf.TimeoutError:
                pass  # asserted below: the interrupt never came
            del iterator
            with lock:
                state["allowed"] = False
                sent = state["sent"]
            if sent and not interrupted:
                with contextlib.suppress(KeyboardInterrupt):
                    threading.Event().wait(bound())  # the signal is on its way: take it here
                interrupted = True
        finally:
            jobs.write_line(go, "go")
            helper.join(bound())
        return interrupted

    # ------------------------------------------------------------- caller: fork

    @rule(keep=st.booleans(), x=st.integers(min_value=0, max_value=100))
    def fork_in_the_caller(self, keep: bool, x: int) -> None:
        """``os.fork()`` in the caller; the child waits on a pipe, never touching the pool.

        ``keep``: the child lives on (past the pool's shutdown, which must not
        wait for it) until teardown releases it; else it is released now.
        """
        read_end, write_end = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
            pid = os.fork()
        if pid == 0:  # the child: wait to be released, touch nothing else
            code = 0
            try:
                # Only the parent may hold a child's pipe open: else releasing one waits for another.
                for fd in (write_end, *self.forked.values()):
                    os.close(fd)
                os.read(read_end, 1)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(read_end)
        self.forked[pid] = write_end
        if not self.closed:  # the parent still uses the pool
            self._release_blockers()
            future = self.pool.submit(jobs.square, x)
            self._track(future, value(x * x))
            assert self._result(future, "a job submitted after a fork") == x * x
        if not keep:
            self._release_child(pid)

    # ------------------------------------------------------------- caller: callbacks into the pool

    @precondition(lambda self: not self.closed)
    @rule(
        action=st.sampled_from(["stats", "submit", "shutdown"]),
        trigger=st.sampled_from(["job ends", "caller cancels", "already done", "during shutdown"]),
        x=st.integers(min_value=0, max_value=100),
    )
    def done_callback_calls_the_pool(self, action: str, trigger: str, x: int) -> None:
        """A done-callback calls ``stats()``, ``submit()`` or ``shutdown(wait=False)``.

        ``trigger``: the future ends in the pool's thread ("job ends"), is
        cancelled by the caller (the callback runs in the caller's thread),
        was done before the callback was added (it runs at once), or ends
        after the caller asked for shutdown (a submit is then refused).
        """
        ran = threading.Event()
        report: dict[str, Any] = {}
        shutting_down = threading.Event()

        def callback(_: cf.Future[Any]) -> None:
            try:
                report["thread"] = threading.current_thread().name
                if action == "stats":
                    stats = self.pool.stats()
                    assert len(live_workers(stats)) <= MAX_WORKERS, stats
                elif action == "submit":
                    try:
                        made = self.pool.submit(jobs.square, x + 1)
                    except RuntimeError as refused:
                        assert shutting_down.is_set(), (
                            f"submit refused before shutdown: {refused!r}"
                        )
                        report["refused"] = refused
                    else:
                        self._track(made, value((x + 1) ** 2))
                else:
                    self.pool.shutdown(wait=False)
            except BaseException as exc:
                report["error"] = exc
            finally:
                ran.set()

        if trigger != "caller cancels":
            self._release_blockers()  # the trigger job must run
        future = self.pool.submit(jobs.square, x)
        self._track(future, value(x * x))
        # add_done_callback() runs the callback at once, in this thread, if the
        # future is done already: bounded, like every call that may run one.
        add_callback = lambda: future.add_done_callback(callback)  # noqa: E731
        if trigger == "job ends":
            bounded(add_callback, "add_done_callback()")
        elif trigger == "caller cancels":
            bounded(add_callback, "add_done_callback()")
            if bounded(future.cancel, "cancel() running a done-callback that calls the pool"):
                self._expect(future, CANCELLED)
            # Too late to cancel, the job must end to run the callback. Released
            # either way: the model's state may not depend on how a race went.
            self._release_blockers()
        elif trigger == "already done":
            assert self._result(future, "the trigger job") == x * x
            bounded(add_callback, "add_done_callback() on a done future")
        else:
            bounded(add_callback, "add_done_callback()")
            shutting_down.set()
            self._shutdown_bounded(wait=False)
            self.closed = True
        if not ran.wait(bound()):
            raise hang(
                f"the done-callback ({action}, {trigger}) never ran or never returned\n"
                + _stacks(_pool_threads)
            )
        if "error" in report:
            raise report["error"]
        event(f"done-callback {action} ran in {report['thread'].split('-')[0]}")
        if action == "shutdown":
            self.closed = True

    # ------------------------------------------------------------- caller: shutdown

    @precondition(lambda self: not self.closed)
    @rule(wait=st.booleans(), cancel_futures=st.booleans())
    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        if cancel_futures:
            # Whatever has not started may now end cancelled instead.
            for future, _ in self._tracked():
                if not future.done():
                    self._allow(future, CANCELLED)
        if wait and not self.go_files:
            self._shutdown_bounded(wait=True, cancel_futures=cancel_futures)
        else:
            # Ask first (queued jobs are cancelled while the blockers still
            # hold the workers), then let the blockers end, then wait.
            self._shutdown_bounded(wait=False, cancel_futures=cancel_futures)
            self.closed = True
            if wait:
                self._release_blockers()
                self._shutdown_bounded(wait=True)
        self.closed = True
        if wait:
            self.joined = True
            stats = self._stats()
            assert stats.workers == (), f"shutdown(wait=True) returned with workers: {stats}"
            assert stats.pending == 0 and stats.running == 0, stats

    @precondition(lambda self: self.closed)
    @rule(kind=st.sampled_from(["submit", "map", "imap_unordered", "batch"]))
    def use_after_shutdown(self, kind: str) -> None:
        with pytest.raises(RuntimeError):
            if kind == "submit":
                self.pool.submit(jobs.square, 1)
            elif kind == "map":
                self.pool.map(jobs.square, range(3))
            elif kind == "imap_unordered":
                next(self.pool.imap_unordered(jobs.square, range(3)))
            else:
                next(self.pool.batch(jobs.square, range(3)))

    # ------------------------------------------------------------- invariants

    @invariant()
    def every_future_resolves_at_most_once_with_its_outcome(self) -> None:
        with self.lock:
            assert all(n <= 1 for n in self.resolutions.values()), self.resolutions
        for future, allowed in self._tracked():
            if future.done():
                self._check_outcome(future, allowed)

    def teardown(self) -> None:
        try:
            self._release_blockers()
            self._note_processes()
            self._shutdown_bounded(wait=True)  # also after shutdown(wait=False): it joins
            # The pool is gone; the children the caller forked outlived it. Now let them go.
            self._release_children()
            tracked = self._tracked()
            for future, _ in tracked:
                assert future.done(), f"{future!r} unresolved after shutdown"
            actual: Counter[str] = Counter()
            for future, allowed in tracked:
                actual[self._check_outcome(future, allowed)] += 1
            with self.lock:
                wrong = {f: self.resolutions[f] for f, _ in tracked if self.resolutions[f] != 1}
            assert not wrong, f"futures whose done-callbacks did not run exactly once: {wrong}"
            stats = self._stats()
            assert stats.workers == (), stats
            assert stats.pending == 0 and stats.running == 0, stats
            # Tracked futures count exactly; the rest are jobs map & co. made, each done or cancelled.
            extra = {name: getattr(stats, name) - actual[name] for name in COUNTERS}
            extra["submitted"] = stats.submitted - len(tracked)
            assert 0 <= extra["submitted"] <= self.slack, (extra, self.slack, stats)
            for name in ("failed", "crashed", "timed_out"):
                assert extra[name] == 0, (name, extra, stats)
            assert extra["done"] >= 0 and extra["cancelled"] >= 0, (extra, stats)
            assert extra["done"] + extra["cancelled"] == extra["submitted"], (extra, stats)
            # No process of the pool outlives it (workers are the template's
            # children: when it goes first they are no longer ours to see).
            left = [p for p in self.pool_processes.values() if _alive(p)]
            if left:
                with contextlib.suppress(AssertionError):
                    wait_until(lambda: not any(_alive(p) for p in left), timeout=10)
            assert not any(_alive(p) for p in left), f"pool processes alive after shutdown: {left}"
            self.before.check()
        finally:
            self._release_blockers()
            for pid, write_end in list(self.forked.items()):
                with contextlib.suppress(OSError):
                    os.close(write_end)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                del self.forked[pid]
            shutil.rmtree(self.directory, ignore_errors=True)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


PoolMachine.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestPoolMachine = pytest.mark.timeout(600)(PoolMachine.TestCase)
