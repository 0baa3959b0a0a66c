"""What ``poolkit run`` and ``poolkit demo`` show while they work, and the summary after.

Two audiences, two renderings of the same figures:

* a person at a terminal gets a live `rich` display (a progress bar with rate,
  ETA, failures and recycles; for the demo also a table of workers and a log
  of events), redrawn in place a few times a second;
* a log file or a CI job (stderr is not a terminal) gets plain lines, one every
  few seconds, because escape codes and redraws are noise in a log.

The figures live in ``RunTally``, which only the caller's main thread
writes; the displays only read it. ``rich``'s own refresh thread reads plain
ints, each replaced whole, so no lock is needed. Every display writes to
stderr, never stdout: stdout may carry the JSON lines a user pipes on.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
)
from rich.table import Table
from rich.text import Text

from .durations import format_duration, format_eta
from .stats import PoolStats, WorkerInfo

__all__ = [
    "MODES",
    "PlainRunDisplay",
    "RecentEvents",
    "RichRunDisplay",
    "RunDisplay",
    "RunTally",
    "StatsPoller",
    "make_console",
    "make_run_display",
    "print_summary",
    "shown_state",
    "worker_table",
]

MODES = ("auto", "rich", "plain", "none")


def make_console(stream: TextIO | None = None, *, force_terminal: bool | None = None) -> Console:
    """A console on stderr (or ``stream``); ``force_terminal`` overrides rich's own detection."""
    return Console(
        file=stream if stream is not None else sys.stderr,
        force_terminal=force_terminal,
        highlight=False,
    )


@dataclass
class RunTally:
    """The live counts of a run, written by the main thread only.

    ``total`` is None when the input is a stream whose length is unknown
    (stdin): the displays then show a count and a rate, but no percentage.
    """

    total: int | None = None
    done: int = 0
    ok: int = 0
    failed: int = 0
    recycled: int = 0
    started: float = field(default_factory=time.monotonic)

    def record(self, ok: bool) -> None:
        self.done += 1
        if ok:
            self.ok += 1
        else:
            self.failed += 1

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        """Inputs finished per second since the start (the mean: steadier than a window)."""
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        rate = self.rate
        if self.total is None or rate <= 0:
            return None
        return max(0, self.total - self.done) / rate

    def line(self) -> str:
        """One plain progress line, the same figures as the rich bar."""
        if self.total:
            share = f"{self.done}/{self.total} ({100.0 * self.done / self.total:.1f}%)"
        else:
            share = f"{self.done}/?"
        eta = f", ETA {format_eta(self.eta)}" if self.total is not None else ""
        return (
            f"poolkit: {share} done, {self.failed} failed, {self.recycled} workers recycled, "
            f"{self.rate:.1f} jobs/s, elapsed {format_duration(self.elapsed)}{eta}"
        )


class RunDisplay:
    """The interface both displays share; this base class shows nothing (``--progress none``)."""

    def __init__(self, tally: RunTally) -> None:
        self.tally = tally

    def start(self) -> None:
        """Begin showing progress."""

    def update(self) -> None:
        """The tally changed; redraw if that is cheap."""

    def message(self, text: str) -> None:
        """A line for the user (a bad input line, an interruption), printed above the display."""
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def stop(self) -> None:
        """Stop showing progress; the last state stays on screen."""


class _RateColumn(ProgressColumn):
    """Mean jobs per second since the start, from the tally (rich's windowed speed jumps)."""

    def __init__(self, tally: RunTally) -> None:
        super().__init__()
        self.tally = tally

    def render(self, task: Task) -> Text:
        return Text(f"{self.tally.rate:.1f} jobs/s", style="progress.data.speed")


class _EtaColumn(ProgressColumn):
    def __init__(self, tally: RunTally) -> None:
        super().__init__()
        self.tally = tally

    def render(self, task: Task) -> Text:
        if self.tally.total is None:
            return Text(f"elapsed {format_eta(self.tally.elapsed)}", style="progress.elapsed")
        return Text(f"ETA {format_eta(self.tally.eta)}", style="progress.remaining")


class _CountsColumn(ProgressColumn):
    def __init__(self, tally: RunTally) -> None:
        super().__init__()
        self.tally = tally

    def render(self, task: Task) -> Text:
        text = Text()
        text.append(f"{self.tally.failed} failed", style="red" if self.tally.failed else "dim")
        text.append(" · ")
        text.append(f"{self.tally.recycled} recycled", style="yellow" if self.tally.recycled else "dim")
        return text


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):
        return False


class RichRunDisplay(RunDisplay):
    """A rich progress bar on a terminal: percentage, done/total, jobs/s, ETA, failures, recycles."""

    def __init__(self, tally: RunTally, console: Console) -> None:
        super().__init__(tally)
        self.console = console
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]poolkit run"),
            BarColumn(),
            TaskProgressColumn(),
            MofNCompleteColumn(),
            _RateColumn(tally),
            _EtaColumn(tally),
            _CountsColumn(tally),
            console=console,
            refresh_per_second=8,
            # Print stdout above the bar only when it shares the terminal; a piped
            # stdout carries the JSON lines and must get every byte untouched.
            redirect_stdout=_is_terminal(sys.stdout),
            redirect_stderr=False,
        )
        self.task = self.progress.add_task("run", total=tally.total)

    def start(self) -> None:
        self.progress.start()

    def update(self) -> None:
        self.progress.update(self.task, completed=self.tally.done, total=self.tally.total)

    def message(self, text: str) -> None:
        # Printed through the progress's console, the line lands above the live bar.
        self.progress.console.print(text, markup=False, highlight=False)

    def stop(self) -> None:
        self.update()
        self.progress.refresh()
        self.progress.stop()


class PlainRunDisplay(RunDisplay):
    """A plain progress line every ``interval`` seconds, and one at the end, for logs."""

    def __init__(self, tally: RunTally, stream: TextIO, interval: float) -> None:
        super().__init__(tally)
        self.stream = stream
        self.interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._tick, name="poolkit-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self._write(self.tally.line())

    def _write(self, text: str) -> None:
        with self._lock:
            try:
                self.stream.write(text + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed under us: progress is not worth dying for

    def message(self, text: str) -> None:
        self._write(text)

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._write(self.tally.line())


def make_run_display(
    mode: str, tally: RunTally, *, interval: float = 2.0, console: Console | None = None
) -> tuple[RunDisplay, Console]:
    """Pick the display: ``auto`` means rich on a terminal, plain lines otherwise."""
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
    console = console if console is not None else make_console(force_terminal=True if mode == "rich" else None)
    if mode == "rich" or (mode == "auto" and console.is_terminal):
        return RichRunDisplay(tally, console), console
    if mode == "none":
        return RunDisplay(tally), console
    return PlainRunDisplay(tally, sys.stderr, interval), console


class StatsPoller:
    """Calls ``pool.stats()`` every ``interval`` seconds in a thread and hands the snapshot on.

    The main thread may be blocked for a long time waiting on one slow job;
    the number of recycled workers should still move on screen meanwhile.
    """

    def __init__(
        self, stats: Callable[[], PoolStats], on_stats: Callable[[PoolStats], None], interval: float = 0.5
    ) -> None:
        self._stats = stats
        self._on_stats = on_stats
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poolkit-stats", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._on_stats(self._stats())
            except Exception:
                return  # the pool went away: nothing more to show

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def print_summary(
    title: str,
    rows: Sequence[tuple[str, str]],
    console: Console,
    *,
    rich_table: bool,
    style_of: Callable[[str], str] | None = None,
) -> None:
    """The end-of-run summary: a rich table on a terminal, aligned ``label: value`` lines otherwise."""
    if rich_table:
        table = Table(title=title, show_header=False, title_justify="left", title_style="bold")
        table.add_column(style="bold")
        table.add_column()
        for label, value in rows:
            table.add_row(label, Text(value, style=style_of(label) if style_of else ""))
        console.print(table)
        return
    width = max((len(label) for label, _ in rows), default=0)
    lines = [title] + [f"  {label + ':':<{width + 1}} {value}" for label, value in rows]
    console.file.write("\n".join(lines) + "\n")
    console.file.flush()


# ----------------------------------------------------------------- the demo's dashboard


class RecentEvents:
    """The last few things that happened (crash, timeout, recycle), with the time since the start."""

    def __init__(self, started: float, keep: int = 8) -> None:
        self.started = started
        self.lines: deque[tuple[float, str, str]] = deque(maxlen=keep)

    def add(self, text: str, style: str = "") -> str:
        """Record an event; returns it as a plain line (for the non-terminal rendering)."""
        at = time.monotonic() - self.started
        self.lines.append((at, text, style))
        return f"[{at:5.1f}s] {text}"

    def render(self) -> RenderableType:
        table = Table(title="events", title_justify="left", show_header=False, box=None, expand=True)
        table.add_column(width=8, style="dim")
        table.add_column(ratio=1)
        if not self.lines:
            table.add_row("", Text("(none yet)", style="dim"))
        for at, text, style in self.lines:
            table.add_row(f"{at:5.1f}s", Text(text, style=style))
        return table


def shown_state(worker: WorkerInfo) -> str:
    """A worker's state as a person reads it: a ready worker that runs a job is "busy".

    ``WorkerInfo.state`` is the life-cycle state ("ready": it started and takes
    jobs), which says nothing of whether a job runs right now.
    """
    if worker.state == "ready" and worker.current_job is not None:
        return "busy"
    return worker.state


def worker_table(stats: PoolStats, progress_of: Callable[[str], Any] | None = None) -> Table:
    """One row per worker from ``pool.stats()``: id, pid, state, jobs, RSS, CPU, age, current job."""
    table = Table(title="workers (pool.stats())", title_justify="left", expand=True)
    for name, justify in (
        ("id", "right"),
        ("pid", "right"),
        ("state", "left"),
        ("jobs", "right"),
        ("RSS", "right"),
        ("CPU", "right"),
        ("age", "right"),
        ("running", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for worker in sorted(stats.workers, key=lambda w: w.worker_id):
        running = worker.current_job or ""
        if worker.current_job is not None and progress_of is not None:
            progress = progress_of(worker.current_job)
            if progress:
                running = f"{running}  {progress}"
        table.add_row(
            str(worker.worker_id),
            str(worker.pid or "-"),
            shown_state(worker),
            str(worker.jobs_done),
            f"{worker.rss / 2**20:.0f} MiB",
            f"{worker.cpu_time:.1f} s",
            f"{worker.age:.1f} s",
            running,
        )
    return table
