"""``progress=`` for ``map``, ``imap_unordered`` and ``batch``: watch a run from the library.

A ``Tracker`` counts one run's inputs as they settle (done, failed) and
how many of its jobs a worker holds (running). One reporter thread,
``poolkit-progress``, shows the counts every so often, in one of three ways:

* ``progress=True`` with stderr on a terminal: a live ``rich`` bar (``progress_bar``)
  (done/total, failed, running, rate, time left), redrawn in place;
* ``progress=True`` anywhere else (a log file, CI, a notebook, where redraws
  are noise): a plain line on stderr every ``PLAIN_INTERVAL`` seconds and
  one at the end;
* ``progress=callable``: the callable gets a [`ProgressCounts`][poolkit.ProgressCounts] every
  ``CALLBACK_INTERVAL`` seconds and once at the end, in the reporter thread.

Why a thread of its own: the counts change in the pool's manager thread
(a future's done callback), and the caller's thread may be blocked on one slow
result; neither may draw or run user code. The hot path pays one done
callback and two integer additions per job (per chunk in ``map``), nothing
when ``progress`` is off. Nothing is ever written to stdout: it may carry
the caller's own output.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TextIO, TypeAlias

from .durations import format_duration, format_eta

__all__ = [
    "CALLBACK_INTERVAL",
    "PLAIN_INTERVAL",
    "Judge",
    "ProgressArg",
    "ProgressCounts",
    "Sink",
    "Tracker",
    "all_or_nothing",
    "check_progress",
    "make_tracker",
    "total_of",
]

#: Seconds between two plain progress lines (a log wants few lines).
PLAIN_INTERVAL = 5.0
#: Seconds between two calls of a ``progress=`` callable.
CALLBACK_INTERVAL = 0.5
#: Seconds between two redraws of the live bar.
BAR_INTERVAL = 0.1

_log = logging.getLogger("poolkit.progress")


@dataclass(frozen=True)
class ProgressCounts:
    """One look at a run: what a ``progress=`` callable receives.

    Attributes:
        label: what runs (``"map"``, ``"imap_unordered"``, ``"batch"``).
        total: the number of inputs, or None while an input stream's length is unknown.
        done: inputs finished with a result.
        failed: inputs finished with an error (in ``batch``: after their last attempt).
        running: jobs of this run a worker holds now (in ``map`` one job may
            carry a chunk of several inputs).
        cancelled: inputs that will not run: cancelled, or left behind when
            the caller stopped reading (a ``map`` stops at its first error).
        elapsed: seconds since the run started.
        finished: True in the last call, once the run is over (or abandoned).
    """

    label: str
    total: int | None
    done: int
    failed: int
    running: int
    elapsed: float
    finished: bool = False
    cancelled: int = 0

    @property
    def settled(self) -> int:
        """Inputs finished either way."""
        return self.done + self.failed

    @property
    def rate(self) -> float:
        """Inputs settled per second since the start (the mean: steadier than a window)."""
        return self.settled / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the mean rate, or None when the total or the rate is not known yet."""
        rate = self.rate
        if self.total is None or rate <= 0:
            return None
        return max(0, self.total - self.settled) / rate

    def line(self) -> str:
        """The counts as one plain line."""
        if self.total:
            share = f"{self.settled}/{self.total} ({100.0 * self.settled / self.total:.1f}%)"
        elif self.total == 0:
            share = "0/0"
        else:
            share = f"{self.settled}/?"
        cancelled = f", {self.cancelled} cancelled" if self.cancelled else ""
        left = f", {format_eta(self.eta)} left" if self.total is not None and not self.finished else ""
        return (
            f"poolkit {self.label}: {share} settled, {self.done} done, {self.failed} failed{cancelled}, "
            f"{self.running} running, {self.rate:.1f}/s, elapsed {format_duration(self.elapsed)}{left}"
        )


ProgressArg: TypeAlias = "bool | Callable[[ProgressCounts], object] | None"

#: How a finished job's inputs count: (done, failed, cancelled). Inputs in none
#: of the three are not settled yet (a run that will send them again).
Judge: TypeAlias = "Callable[[Future[Any]], tuple[int, int, int]]"


def all_or_nothing(inputs: int) -> Judge:
    """The judge of a job whose inputs share its fate: all done, all failed, or all cancelled."""

    def judge(future: Future[Any]) -> tuple[int, int, int]:
        if future.cancelled():
            return 0, 0, inputs
        if future.exception() is not None:
            return 0, inputs, 0
        return inputs, 0, 0

    return judge


def check_progress(progress: object) -> None:
    """Refuse a bad ``progress=`` where the caller passed it, not later in a thread."""
    if progress is None or isinstance(progress, bool) or callable(progress):
        return
    raise TypeError(
        "progress must be True, False, None or a callable taking ProgressCounts, "
        f"got {type(progress).__name__}"
    )


def total_of(iterable: Iterable[Any]) -> int | None:
    """``len(iterable)`` when it has one (a list, a range), else None: never consumes it."""
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


class Sink:
    """Where the counts go; one per tracker, used by the reporter thread only."""

    interval = PLAIN_INTERVAL

    def show(self, counts: ProgressCounts) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """The last ``show`` has happened."""


class _Lines(Sink):
    """A plain line on stderr every ``PLAIN_INTERVAL`` seconds and a last one at the end."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def show(self, counts: ProgressCounts) -> None:
        try:
            self.stream.write(counts.line() + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed under us: progress is not worth failing a run for


class _Calls(Sink):
    """The caller's callable; one that raises is logged once and not called again."""

    interval = CALLBACK_INTERVAL

    def __init__(self, fn: Callable[[ProgressCounts], object]) -> None:
        self.fn: Callable[[ProgressCounts], object] | None = fn

    def show(self, counts: ProgressCounts) -> None:
        fn = self.fn
        if fn is None:
            return
        try:
            fn(counts)
        except Exception as exc:
            # The jobs are not at fault: they go on. The caller learns why the calls
            # stopped from a warning (shown by default) and the log (with the traceback).
            self.fn = None
            _log.exception("the progress callable %r raised; it will not be called again", fn)
            warnings.warn(
                f"the progress callable {fn!r} raised {exc!r}; it will not be called again "
                "(the run goes on)",
                RuntimeWarning,
                stacklevel=1,
            )


#: Held while a bar is live: two bars redrawing one terminal garble each other,
#: so a run inside a run (or beside one, in a thread) shows plain lines instead.
_terminal = threading.Lock()


def _in_notebook() -> bool:
    """Inside a Jupyter kernel, where stderr is captured per cell and redraws pile up."""
    return "ipykernel" in sys.modules


class Tracker:
    """The counts of one run and the reporter thread that shows them.

    ``watch`` is called by the run for every job it submits; the job's done
    callback (the manager thread) settles its inputs as its judge says, unless
    the run settles them itself (``batch``, which may retry a failed job).
    ``close`` is called once the run is over or abandoned; it shows the last
    counts and joins the thread. With the total known, the thread also ends
    once every input is settled or cancelled.
    """

    def __init__(self, label: str, total: int | None, make_sink: Callable[[Tracker], Sink]) -> None:
        self.label = label
        self.total = total
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._done = 0
        self._failed = 0
        self._cancelled = 0
        self._in_flight: dict[int, Future[Any]] = {}
        self._closed = threading.Event()
        self._sink = make_sink(self)
        self._thread = threading.Thread(target=self._report, name="poolkit-progress", daemon=True)
        self._thread.start()

    # -------------------------------------------------------- the run's side

    def watch(self, future: Future[Any], inputs: int, judge: Judge | None = None, *, settles: bool = True) -> None:
        """Count ``future`` as running while a worker holds it; when it ends, settle its inputs.

        ``judge`` says how they count (default: ``all_or_nothing``);
        ``settles=False``: the run settles them itself.
        """
        key = id(future)
        with self._lock:
            self._in_flight[key] = future
        verdict = judge if judge is not None else all_or_nothing(inputs)

        def ended(f: Future[Any]) -> None:
            with self._lock:
                self._in_flight.pop(key, None)
            if settles:
                self._add(*verdict(f))
            elif f.cancelled():
                self._add(0, 0, inputs)

        future.add_done_callback(ended)

    def settle(self, *, ok: bool, inputs: int = 1) -> None:
        """``inputs`` more inputs are finished, with a result or not."""
        self._add(inputs if ok else 0, 0 if ok else inputs, 0)

    def _add(self, done: int, failed: int, cancelled: int) -> None:
        with self._lock:
            self._done += done
            self._failed += failed
            self._cancelled += cancelled
            accounted = self._done + self._failed + self._cancelled
        if self.total is not None and accounted >= self.total:
            self._closed.set()  # all in: the reporter shows the end and leaves

    def set_total(self, total: int) -> None:
        """The input stream ended: now the total is known."""
        self.total = total
        self._add(0, 0, 0)

    def close(self) -> None:
        """The run is over or abandoned: show the last counts, end the thread."""
        self._closed.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # -------------------------------------------------------- the reporter's side

    def counts(self) -> ProgressCounts:
        """A consistent snapshot of the counts."""
        with self._lock:
            running = sum(1 for f in self._in_flight.values() if f.running())
            return ProgressCounts(
                label=self.label,
                total=self.total,
                done=self._done,
                failed=self._failed,
                running=running,
                elapsed=time.monotonic() - self._started,
                finished=self._closed.is_set(),
                cancelled=self._cancelled,
            )

    def _report(self) -> None:
        sink = self._sink
        while not self._closed.wait(sink.interval):
            sink.show(self.counts())
        sink.show(self.counts())
        sink.stop()


def _sink_for(progress: bool | Callable[[ProgressCounts], object]) -> Callable[[Tracker], Sink]:
    if not isinstance(progress, bool):
        fn = progress
        return lambda tracker: _Calls(fn)
    stream = sys.stderr
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False

    def make(tracker: Tracker) -> Sink:
        if terminal and not _in_notebook() and _terminal.acquire(blocking=False):
            try:
                from .progress_bar import LiveBar  # rich is imported only when a bar is shown

                return LiveBar(tracker, stream, _terminal.release)
            except BaseException:
                _terminal.release()
                raise
        return _Lines(stream)

    return make


def make_tracker(progress: ProgressArg, label: str, total: int | None) -> Tracker | None:
    """The tracker for ``progress=``, or None when progress is off (the run pays nothing)."""
    check_progress(progress)
    if progress is None or progress is False:
        return None
    return Tracker(label, total, _sink_for(progress))
