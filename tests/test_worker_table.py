"""The worker table (poolkit/worker_table.py): each edge of a worker's life cycle, without any process.

A worker here is the table's record with a socket pair that no process
holds; what is checked is the state, the re-queued jobs and the count of why
workers left, as ``pool.stats()`` reports them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from poolkit.config import PoolConfig
from poolkit.futures import JobFuture
from poolkit.worker_table import Job, RetireReason, Worker, WorkerState, WorkerTable


def _config(**overrides: Any) -> PoolConfig:
    options: dict[str, Any] = dict(
        max_workers=2, mp_context=None, start_method="fork", preload=(), initializer=None,
        initargs=(), finalizer=None, finalargs=(), max_tasks_per_child=None, recycle_jitter=0.0,
        max_memory_per_child=None, memory_limit_per_child=None, memory_check_interval=0.01,
        max_lifetime_per_child=None, idle_timeout=None, min_workers=None, job_timeout=None,
        kill_grace=1.0, name="table",
    )
    options.update(overrides)
    return PoolConfig.build(**options)


@pytest.fixture
def table() -> Iterator[WorkerTable]:
    table = WorkerTable(_config(max_tasks_per_child=5, max_lifetime_per_child=10.0))
    yield table
    for worker in list(table):
        worker.sock.close()


def _spawn(table: WorkerTable, now: float = 0.0) -> Worker:
    [(worker, child_end)] = table.new_workers(1, now)
    child_end.close()
    table.add(worker)
    return worker


def _jobs(worker: Worker, count: int) -> list[Job]:
    jobs = [Job(seq, JobFuture(f"job-{seq}", None), b"", b"", None) for seq in range(1, count + 1)]
    worker.inflight.extend(jobs)
    return jobs


def test_spawn_gives_each_worker_an_id_a_budget_and_a_lifetime(table: WorkerTable) -> None:
    first, second = _spawn(table), _spawn(table)
    assert (first.worker_id, second.worker_id) == (1, 2)
    assert first.state is WorkerState.STARTING and first.live
    assert (first.max_jobs, first.lifetime) == (5, 10.0)  # recycle_jitter=0
    assert len(table) == 2


def test_ready_starts_the_job_sent_ahead(table: WorkerTable) -> None:
    worker = _spawn(table)
    [job] = _jobs(worker, 1)
    assert table.ready(worker, 4242, now=3.0)
    assert worker.state is WorkerState.READY and worker.ready_at == 3.0
    assert (job.started_at, job.future.worker_id, job.future.pid) == (3.0, worker.worker_id, 4242)
    assert not table.ready(worker, 4242, now=4.0)  # once


def test_a_worker_retired_while_starting_stays_retiring_when_ready(table: WorkerTable) -> None:
    worker = _spawn(table)
    assert table.retire(worker, RetireReason.SHUTDOWN)
    assert table.ready(worker, 1, now=1.0)
    assert worker.state is WorkerState.RETIRING and not worker.live
    assert not table.retire(worker, RetireReason.IDLE)  # counted once
    assert table.retired == {"shutdown": 1}


def test_kill_hands_back_all_but_the_running_job(table: WorkerTable) -> None:
    worker = _spawn(table)
    table.ready(worker, 1, now=0.0)
    head, *rest = _jobs(worker, 3)
    assert table.kill(worker, RetireReason.TIMEOUT) == rest
    assert list(worker.inflight) == [head]
    assert worker.state is WorkerState.KILLING and worker.leaving
    assert table.kill(worker, RetireReason.TERMINATED) == []  # killed once, counted once
    assert table.retired == {"timeout": 1}


def test_a_kill_after_a_retirement_replaces_it_in_the_count(table: WorkerTable) -> None:
    worker = _spawn(table)
    table.ready(worker, 1, now=0.0)
    table.retire(worker, RetireReason.TASKS)
    assert table.retired == {"tasks": 1}
    table.kill(worker, RetireReason.MEMORY_LIMIT)
    assert table.retired == {"memory_limit": 1}


def test_end_of_stream_then_a_limit_counts_the_limit(table: WorkerTable) -> None:
    worker = _spawn(table)
    table.ready(worker, 1, now=0.0)
    _, second = _jobs(worker, 2)
    assert table.lost(worker) == [second]
    assert worker.state is WorkerState.EXITED and worker.leaving
    assert table.retired == {}
    assert table.kill(worker, RetireReason.TIMEOUT) == []  # already handed back
    assert worker.state is WorkerState.KILLING
    table.crashed(worker)  # its exit: the pool stopped it, no crash
    assert table.retired == {"timeout": 1}


def test_a_retiring_worker_that_dies_counts_as_a_crash(table: WorkerTable) -> None:
    worker = _spawn(table)
    table.ready(worker, 1, now=0.0)
    table.retire(worker, RetireReason.LIFETIME)
    table.lost(worker)
    table.crashed(worker)
    assert table.retired == {"crash": 1}
    assert table.remove(worker) and not table.remove(worker)
    assert len(table) == 0


def test_take_all_empties_the_worker_in_order(table: WorkerTable) -> None:
    worker = _spawn(table)
    jobs = _jobs(worker, 3)
    assert table.take_all(worker) == jobs
    assert not worker.inflight
    assert table.unstarted(worker) == []


def test_start_head_records_who_runs_it(table: WorkerTable) -> None:
    worker = _spawn(table)
    table.ready(worker, 77, now=0.0)
    _, second = _jobs(worker, 2)
    worker.inflight.popleft()  # the first was answered (or SKIPPED): the next one starts
    worker.start_head(5.0)
    assert (second.started_at, second.future.worker_id, second.future.pid) == (5.0, worker.worker_id, 77)


def test_every_reason_is_a_key_of_stats_retired() -> None:
    assert [reason.value for reason in RetireReason] == [
        "tasks", "memory", "lifetime", "idle", "timeout", "memory_limit", "terminated", "crash",
        "start_timeout", "shutdown",
    ]


def test_the_life_cycle_diagram_in_the_docs_is_the_enum() -> None:
    """docs/concepts.md draws WorkerState's values as boxes and WorkerTable's methods as arrows."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "concepts.md").read_text(encoding="utf-8")
    section = page[page.index("## The life of a worker") :]
    diagram = section[section.index("```mermaid") : section.index("```", section.index("```mermaid") + 3)]
    edges = re.findall(r"^\s*(\[\*\]|\w+) --> (\[\*\]|\w+): (\w+)\(\)", diagram, re.MULTILINE)
    assert edges, "no arrow found"
    states = {name for a, b, _ in edges for name in (a, b) if name != "[*]"}
    assert states == {state.value for state in WorkerState}
    for _, _, method in edges:
        assert callable(getattr(WorkerTable, method, None)), f"WorkerTable has no {method}()"
