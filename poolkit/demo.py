"""``poolkit demo``: the job service poolkit grew out of, run live in about 20 seconds.

The mix: *extract* jobs (parse and aggregate
generated records), *backup* jobs (SQLite's online backup API, on a connection
the worker opens in its initializer and closes in its finalizer) and
*fine-tuning* jobs (a small training loop that reports its progress). Three
more kinds show what poolkit adds, on purpose:

* *leak* keeps 48 MiB per call; ``max_memory_per_child`` retires the worker
  once its RSS is past the limit, and a fresh one takes over;
* *crash* kills its own worker (``os._exit(3)``, or a segmentation fault via
  ``ctypes``); only that job fails, with [`WorkerCrashed`][poolkit.WorkerCrashed];
* *hang* sleeps for ten minutes under a 2 s timeout
  (``pool.options(timeout=...)``); it fails with [`JobTimeout`][poolkit.JobTimeout]
  and its worker is replaced.

Every job also checks that it sees its own ``POOLKIT_JOB_ID`` and
``POOLKIT_JOB_TYPE``. The demo exits 0 only when everything went as planned:
every normal job succeeded and each crash and hang failed with the right error.

The job functions live in ``demo_jobs.py``, the code that runs in the
workers, at module level so that they pickle by reference; the workers are
forked from a template that already imported it. This module is the
parent's side: the plan, running it, watching it and the summary.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from .demo_jobs import (
    backup,
    close_source_db,
    crash,
    extract,
    fine_tune,
    hang,
    leak,
    open_source_db,
)
from .durations import format_duration
from .errors import JobTimeout, WorkerCrashed, describe_exit
from .futures import JobFuture
from .pool import Pool
from .progress import RecentEvents, make_console, print_summary, worker_table
from .stats import RECYCLING_REASONS, PoolStats

__all__ = ["DemoPlan", "run_demo"]

MAX_MEMORY_PER_CHILD = 100 * 2**20
LEAK_MIB = 48
MAX_TASKS_PER_CHILD = 6
HANG_TIMEOUT = 2.0
SOURCE_ROWS = 20_000


# ----------------------------------------------------------------- the plan


@dataclass(frozen=True)
class DemoJob:
    """One job of the demo and what should happen to it."""

    job_id: str
    job_type: str
    fn_name: str
    args: tuple[Any, ...]
    timeout: float | None = None
    expect: str = "ok"  # "ok", "crash:exit code 3", "crash:signal SIGSEGV" or "timeout"


@dataclass
class DemoPlan:
    """The job list, interleaved so that crashes and timeouts land in the middle of the run."""

    directory: str
    jobs: list[DemoJob] = field(default_factory=list)

    @classmethod
    def build(cls, directory: str, seed: int = 7) -> DemoPlan:
        plan = cls(directory)
        rng = random.Random(seed)
        normal: list[DemoJob] = []
        for i in range(20):
            normal.append(DemoJob(f"extract-{i + 1:02d}", "extract", "extract", (seed + i, 40_000)))
        for i in range(8):
            normal.append(DemoJob(f"backup-{i + 1:02d}", "backup", "backup", (directory,)))
        for i in range(6):
            normal.append(DemoJob(f"fine-tune-{i + 1:02d}", "fine-tune", "fine_tune", (seed + i, 60)))
        for i in range(10):
            normal.append(DemoJob(f"leak-{i + 1:02d}", "leak", "leak", (LEAK_MIB,)))
        rng.shuffle(normal)
        special = [
            (0.3, DemoJob("crash-exit", "crash", "crash", ("exit",), expect="crash:exit code 3")),
            (0.45, DemoJob("hang-01", "hang", "hang", (600.0,), timeout=HANG_TIMEOUT, expect="timeout")),
            (0.6, DemoJob("crash-segfault", "crash", "crash", ("segfault",), expect="crash:signal SIGSEGV")),
            (0.75, DemoJob("hang-02", "hang", "hang", (600.0,), timeout=HANG_TIMEOUT, expect="timeout")),
        ]
        jobs = list(normal)
        for share, job in special:
            jobs.insert(int(share * len(jobs)), job)
        plan.jobs = jobs
        return plan


_FUNCTIONS: dict[str, Callable[..., Any]] = {"extract": extract, "backup": backup, "fine_tune": fine_tune, "leak": leak, "crash": crash, "hang": hang}


def _make_source(directory: str) -> int:
    """The database the backup jobs copy: a few MiB of generated events."""
    os.makedirs(os.path.join(directory, "backups"))
    os.makedirs(os.path.join(directory, "connections"))
    rng = random.Random(1)
    with contextlib.closing(sqlite3.connect(os.path.join(directory, "source.db"))) as db:
        db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT, payload TEXT)")
        db.executemany(
            "INSERT INTO events (kind, payload) VALUES (?, ?)",
            ((rng.choice("abcd"), os.urandom(60).hex()) for _ in range(SOURCE_ROWS)),
        )
        db.commit()
        count: int = db.execute("SELECT count(*) FROM events").fetchone()[0]
    return count


# ----------------------------------------------------------------- watching it run


class _Watcher:
    """Turns finished futures and pool snapshots into events, figures and checks (main thread only)."""

    def __init__(self, plan: DemoPlan, source_rows: int, started: float) -> None:
        self.plan = plan
        self.source_rows = source_rows
        self.events = RecentEvents(started, keep=9)
        self.pending_lines: list[str] = []
        self.ok_by_type: Counter[str] = Counter()
        self.failed_by_reason: Counter[str] = Counter()
        self.problems: list[str] = []
        self.crashes: list[str] = []
        self.timeouts = 0
        self.identity_ok = 0
        self.pids: set[int] = set()
        self.backups_ok = 0
        self.losses: list[tuple[float, float]] = []
        self.done = 0

    def event(self, text: str, style: str) -> None:
        self.pending_lines.append(self.events.add(text, style))

    def snapshot(self, stats: PoolStats) -> None:
        for worker in stats.workers:
            if worker.pid:
                self.pids.add(worker.pid)

    def finished(self, job: DemoJob, future: JobFuture[Any]) -> None:
        self.done += 1
        if future.pid:
            self.pids.add(future.pid)
        error = future.exception()
        if error is None:
            self._succeeded(job, future, future.result())
        else:
            self._failed(job, future, error)

    def _succeeded(self, job: DemoJob, future: JobFuture[Any], result: dict[str, Any]) -> None:
        self.ok_by_type[job.job_type] += 1
        if job.expect != "ok":
            self.problems.append(f"{job.job_id} succeeded but should have failed ({job.expect})")
        if result.get("job_id") == future.job_id and result.get("job_type") == job.job_type:
            self.identity_ok += 1
        else:
            self.problems.append(
                f"{job.job_id} saw POOLKIT_JOB_ID={result.get('job_id')!r}, "
                f"POOLKIT_JOB_TYPE={result.get('job_type')!r}"
            )
        if job.job_type == "backup":
            if result["rows"] == self.source_rows and result["integrity"] == "ok":
                self.backups_ok += 1
            else:
                self.problems.append(f"{job.job_id}: backup has {result['rows']} rows, integrity {result['integrity']}")
        elif job.job_type == "fine-tune":
            self.losses.append((result["initial_loss"], result["final_loss"]))
            if not result["final_loss"] < result["initial_loss"]:
                self.problems.append(f"{job.job_id}: the loss did not go down")
        elif job.job_type == "extract" and result["records"] != job.args[1]:
            self.problems.append(f"{job.job_id}: parsed {result['records']} of {job.args[1]} records")
        stats = future.stats
        if stats is not None and stats.worker_retired == "memory":
            self.event(
                f"worker {stats.worker_id} (pid {stats.pid}) recycled after {job.job_id}: RSS "
                f"{stats.rss_after / 2**20:.0f} MiB > max_memory_per_child {MAX_MEMORY_PER_CHILD // 2**20} MiB",
                "yellow",
            )
        elif stats is not None and stats.worker_retired == "tasks":
            self.event(
                f"worker {stats.worker_id} (pid {stats.pid}) recycled after {job.job_id}: job budget "
                f"reached (max_tasks_per_child={MAX_TASKS_PER_CHILD}, with jitter)",
                "cyan",
            )

    def _failed(self, job: DemoJob, future: JobFuture[Any], error: BaseException) -> None:
        reason = type(error).__name__
        self.failed_by_reason[reason] += 1
        if isinstance(error, WorkerCrashed):
            how = describe_exit(error.exitcode)
            self.crashes.append(how)
            self.event(
                f"{job.job_id}: worker {error.worker_id} (pid {error.pid}) died ({how}); "
                "only this job failed (WorkerCrashed), the pool replaced the worker",
                "bold red",
            )
            if job.expect != f"crash:{how}":
                self.problems.append(f"{job.job_id} failed with WorkerCrashed ({how}); expected {job.expect}")
        elif isinstance(error, JobTimeout):
            self.timeouts += 1
            self.event(
                f"{job.job_id}: timed out after {job.timeout:g} s (JobTimeout); worker "
                f"{future.worker_id} (pid {future.pid}) stopped and replaced",
                "magenta",
            )
            if job.expect != "timeout":
                self.problems.append(f"{job.job_id} timed out; expected {job.expect}")
        else:
            self.event(f"{job.job_id}: failed with {reason}: {error}", "red")
            self.problems.append(f"{job.job_id} failed with {reason}: {error}")

    def take_lines(self) -> Iterator[str]:
        lines, self.pending_lines = self.pending_lines, []
        yield from lines


class _Screen:
    """The live dashboard on a terminal: progress per job type, the workers, the event log."""

    def __init__(self, console: Console, plan: DemoPlan, watcher: _Watcher, pool: Pool) -> None:
        self.console = console
        self.watcher = watcher
        self.pool = pool
        self.progress = Progress(
            TextColumn("{task.description:>10}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=console,
        )
        counts = Counter(job.job_type for job in plan.jobs)
        self.overall = self.progress.add_task("all jobs", total=len(plan.jobs), note="")
        self.by_type: dict[str, TaskID] = {
            kind: self.progress.add_task(kind, total=n, note="") for kind, n in counts.items()
        }
        self.live = Live(console=console, auto_refresh=False, transient=False)
        self.futures_by_id: dict[str, JobFuture[Any]] = {}

    def progress_of(self, job_id: str) -> str:
        future = self.futures_by_id.get(job_id)
        return "" if future is None or future.progress is None else str(future.progress)

    def finished(self, job: DemoJob, ok: bool) -> None:
        self.progress.advance(self.overall)
        task = self.by_type[job.job_type]
        self.progress.advance(task)
        if not ok:
            failed = self.progress.tasks[task].fields.get("failed", 0) + 1
            self.progress.update(task, failed=failed, note=f"[red]{failed} failed (as planned)" if job.expect != "ok" else f"[red]{failed} failed")

    def render(self, stats: PoolStats) -> RenderableType:
        header = Text.assemble(
            ("poolkit demo", "bold"),
            f"  {self.pool.max_workers} workers · max_memory_per_child {MAX_MEMORY_PER_CHILD // 2**20} MiB · "
            f"max_tasks_per_child {MAX_TASKS_PER_CHILD} · hang jobs time out after {HANG_TIMEOUT:g} s",
        )
        counters = Text(
            f"spawned {stats.spawned} · crashed {stats.crashed} · timed out {stats.timed_out} · "
            f"recycled {recycled_detail(stats) or '0 (none yet)'}",
            style="dim",
        )
        return Group(header, self.progress, counters, worker_table(stats, self.progress_of), self.watcher.events.render())


def run_demo(workers: int = 4, progress: str = "auto") -> int:
    """Run the demo; returns 0 when the pool behaved as expected, 1 otherwise, 130 on Ctrl-C."""
    console = make_console(force_terminal=True if progress == "rich" else None)
    live_screen = progress == "rich" or (progress == "auto" and console.is_terminal)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="poolkit-demo-") as directory:
        source_rows = _make_source(directory)
        plan = DemoPlan.build(directory)
        watcher = _Watcher(plan, source_rows, started)
        if not live_screen:
            _say(
                f"poolkit demo: {len(plan.jobs)} jobs on {workers} workers "
                f"(extract, backup, fine-tune, leak, crash, hang); max_memory_per_child "
                f"{MAX_MEMORY_PER_CHILD // 2**20} MiB, max_tasks_per_child {MAX_TASKS_PER_CHILD}, "
                f"hang jobs time out after {HANG_TIMEOUT:g} s"
            )
        pool = Pool(
            workers,
            initializer=open_source_db,
            initargs=(directory,),
            finalizer=close_source_db,
            finalargs=(directory,),
            max_tasks_per_child=MAX_TASKS_PER_CHILD,
            max_memory_per_child=MAX_MEMORY_PER_CHILD,
            name="demo",
        )
        screen = _Screen(console, plan, watcher, pool) if live_screen else None
        futures: dict[JobFuture[Any], DemoJob] = {}
        interrupted = False
        try:
            for job in plan.jobs:
                future = pool.options(timeout=job.timeout, job_id=job.job_id, job_type=job.job_type).submit(
                    _FUNCTIONS[job.fn_name], *job.args
                )
                futures[future] = job
                if screen is not None:
                    screen.futures_by_id[job.job_id] = future
            _watch(pool, futures, watcher, screen)
        except KeyboardInterrupt:
            interrupted = True
            for future in futures:
                future.terminate()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        wall = time.monotonic() - started
        if interrupted:
            _say("poolkit demo: interrupted; workers stopped")
            return 130
        final = pool.stats()
        watcher.snapshot(final)
        connections = Path(directory, "connections")
        opened = len(list(connections.glob("opened-*")))
        closed = len(list(connections.glob("closed-*")))
    rows, ok = _summary(plan, watcher, final, wall, opened, closed)
    print_summary("poolkit demo summary", rows, console, rich_table=live_screen, style_of=_style_of)
    return 0 if ok else 1


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _watch(
    pool: Pool, futures: dict[JobFuture[Any], DemoJob], watcher: _Watcher, screen: _Screen | None
) -> None:
    """Wait for the jobs, a few redraws a second, turning each completion into figures and events."""
    pending: set[Future[Any]] = set(futures)
    last_line = time.monotonic()
    live = screen.live if screen is not None else contextlib.nullcontext()
    with live:
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            for done_future in done:
                future = cast(JobFuture[Any], done_future)
                job = futures[future]
                watcher.finished(job, future)
                if screen is not None:
                    screen.finished(job, future.exception() is None)
            stats = pool.stats()
            watcher.snapshot(stats)
            if screen is not None:
                screen.live.update(screen.render(stats), refresh=True)
                list(watcher.take_lines())
                continue
            for line in watcher.take_lines():
                _say(line)
            now = time.monotonic()
            if now - last_line >= 2.0 or not pending:
                last_line = now
                running = sum(1 for w in stats.workers if w.current_job)
                _say(
                    f"[{now - watcher.events.started:5.1f}s] {watcher.done}/{len(futures)} jobs done "
                    f"({sum(watcher.ok_by_type.values())} ok, {sum(watcher.failed_by_reason.values())} failed) | "
                    f"{len(stats.workers)} workers, {running} busy, {stats.recycled} recycled, "
                    f"{len(watcher.pids)} pids seen"
                )


def recycled_detail(stats: PoolStats) -> str:
    """``"3 (memory 2, tasks 1)"``: the workers a policy recycled, by reason; "" if none.

    Crashes and timeouts are not recycling (the demo counts them on their own):
    only the reasons of ``RECYCLING_REASONS``.
    """
    reasons = {k: v for k, v in stats.retired.items() if k in RECYCLING_REASONS and v}
    if not reasons:
        return ""
    detail = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return f"{stats.recycled} ({detail})"


def _summary(
    plan: DemoPlan, watcher: _Watcher, stats: PoolStats, wall: float, opened: int, closed: int
) -> tuple[list[tuple[str, str]], bool]:
    """The rows of the final table, and whether the demo behaved as expected."""
    problems = list(watcher.problems)
    expected_ok = Counter(job.job_type for job in plan.jobs if job.expect == "ok")
    for kind, n in expected_ok.items():
        if watcher.ok_by_type[kind] != n:
            problems.append(f"{watcher.ok_by_type[kind]} of {n} {kind} jobs succeeded")
    if not stats.retired.get("memory"):
        problems.append("no worker was recycled for memory")
    ok_total = sum(watcher.ok_by_type.values())
    failed_total = sum(watcher.failed_by_reason.values())
    killed = stats.crashed + stats.timed_out  # retired[] files a worker under its first reason only
    losses = watcher.losses
    rows = [
        ("jobs", f"{len(plan.jobs)} total: {ok_total} ok, {failed_total} failed"),
        ("ok by type", ", ".join(f"{k} {v}" for k, v in watcher.ok_by_type.most_common())),
        (
            "failed by reason",
            ", ".join(f"{k} {v}" for k, v in watcher.failed_by_reason.most_common()) or "none",
        ),
        (
            "crashes survived",
            f"{len(watcher.crashes)} ({', '.join(watcher.crashes)}); the pool kept running"
            if watcher.crashes
            else "0",
        ),
        ("timeouts", f"{watcher.timeouts} (after {HANG_TIMEOUT:g} s; worker stopped and replaced)"),
        ("workers recycled", recycled_detail(stats) or "0"),
        ("workers started", f"{stats.spawned}; {len(watcher.pids)} worker pids seen"),
        (
            "sqlite connections",
            f"opened by the initializer in {opened} workers, closed by the finalizer in {closed} "
            f"({killed} workers were killed by a crash or timeout and never ran it)",
        ),
        ("backups verified", f"{watcher.backups_ok}/{expected_ok['backup']} ({watcher.source_rows} rows each, integrity ok)"),
        (
            "fine-tuning",
            f"{len(losses)} runs, mean loss {sum(a for a, _ in losses) / len(losses):.3f} -> "
            f"{sum(b for _, b in losses) / len(losses):.4f}"
            if losses
            else "no run finished",
        ),
        ("job identity", f"{watcher.identity_ok}/{ok_total} jobs saw their own POOLKIT_JOB_ID and POOLKIT_JOB_TYPE"),
        ("wall time", format_duration(wall)),
    ]
    if problems:
        rows.append(("verdict", "UNEXPECTED: " + "; ".join(problems)))
    else:
        rows.append(
            (
                "verdict",
                "as expected: every normal job succeeded; the crash and hang jobs failed "
                "with WorkerCrashed and JobTimeout",
            )
        )
    return rows, not problems


def _style_of(label: str) -> str:
    return {"crashes survived": "red", "timeouts": "magenta", "workers recycled": "yellow", "verdict": "bold"}.get(
        label, ""
    )

