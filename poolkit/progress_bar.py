"""The live bar that ``progress=True`` draws on a terminal (see ``job_progress``).

A module of its own because it needs ``rich``, whose import takes tens of
milliseconds and a few MiB: ``job_progress`` imports this module only when a
bar is about to be shown, so ``import poolkit`` does not import ``rich``, and
a pool forked from your process (its template, its workers) does not carry it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn
from rich.text import Text

from .durations import format_eta
from .job_progress import BAR_INTERVAL, ProgressCounts, Sink, Tracker

__all__ = ["LiveBar"]


class _Column(ProgressColumn):
    """Failed, running, rate and time left: the figures rich's own columns do not know."""

    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self.tracker = tracker

    def render(self, task: Task) -> Text:
        counts = self.tracker.counts()
        text = Text()
        text.append(f"{counts.done} done", style="green")
        text.append(" · ")
        text.append(f"{counts.failed} failed", style="red" if counts.failed else "dim")
        text.append(" · ")
        text.append(f"{counts.running} running", style="cyan")
        text.append(f" · {counts.rate:.1f}/s · ")
        if counts.total is None:
            text.append(f"elapsed {format_eta(counts.elapsed)}")
        else:
            text.append(f"{format_eta(counts.eta)} left")
        return text


class LiveBar(Sink):
    """A live rich bar on ``stream`` (a terminal); ``release`` is called once it is stopped.

    ``release`` lets go of the right to draw on the terminal, which the
    caller took before making the bar: two bars redrawing one terminal would
    garble each other.
    """

    interval = BAR_INTERVAL

    def __init__(self, tracker: Tracker, stream: TextIO, release: Callable[[], None]) -> None:
        self.release = release
        self.progress = Progress(
            TextColumn(f"[bold]poolkit {tracker.label}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            _Column(tracker),
            console=Console(file=stream, highlight=False),
            auto_refresh=False,
            # The caller's own prints keep their streams: a bar never takes over stdout.
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.task = self.progress.add_task(tracker.label, total=tracker.total)
        self.progress.start()

    def show(self, counts: ProgressCounts) -> None:
        self.progress.update(self.task, completed=counts.settled, total=counts.total)
        self.progress.refresh()

    def stop(self) -> None:
        try:
            self.progress.stop()
        finally:
            self.release()
