"""The dispatcher (poolkit/dispatch.py): who gets which job, without any process.

Workers are the worker table's records with a socket pair no process holds;
an assignment shows up as jobs in ``inflight`` and frames in ``outbox``, as
the manager would send them.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from poolkit.config import PoolConfig
from poolkit.dispatch import Dispatcher
from poolkit.futures import JobFuture
from poolkit.worker_table import Job, Worker, WorkerState


def _config(**overrides: Any) -> PoolConfig:
    options: dict[str, Any] = dict(
        max_workers=2, mp_context=None, start_method="fork", preload=(), initializer=None,
        initargs=(), finalizer=None, finalargs=(), max_tasks_per_child=None, recycle_jitter=0.0,
        max_memory_per_child=None, memory_limit_per_child=None, memory_check_interval=0.01,
        max_lifetime_per_child=None, idle_timeout=None, min_workers=None, job_timeout=None,
        kill_grace=1.0, name="dispatch",
    )
    options.update(overrides)
    return PoolConfig.build(**options)


@pytest.fixture(scope="module")
def sock() -> Iterator[socket.socket]:
    a, b = socket.socketpair()
    yield a
    a.close()
    b.close()


def _worker(sock: socket.socket, worker_id: int, state: WorkerState = WorkerState.READY) -> Worker:
    worker = Worker(worker_id, sock, 0.0)
    worker.state = state
    worker.pid = 1000 + worker_id
    if state is not WorkerState.STARTING:
        worker.ready_at = 0.0
    return worker


def _queue(dispatcher: Dispatcher, count: int, start: int = 1) -> list[Job]:
    jobs = [Job(seq, JobFuture(f"job-{seq}", None), b"p", b"", None) for seq in range(start, start + count)]
    dispatcher.pending.extend(jobs)
    return jobs


def test_nothing_measured_one_job_per_worker_in_order(sock: socket.socket) -> None:
    dispatcher = Dispatcher(_config())
    first, second = _worker(sock, 1), _worker(sock, 2)
    jobs = _queue(dispatcher, 3)
    touched, spent, cancelled = dispatcher.assign([first, second], now=1.0)
    assert (list(first.inflight), list(second.inflight)) == ([jobs[0]], [jobs[1]])
    assert list(dispatcher.pending) == [jobs[2]]
    assert set(touched) == {first, second} and spent == [] and cancelled == 0
    assert jobs[0].future.running() and (jobs[0].future.worker_id, jobs[0].future.pid) == (1, 1001)
    assert jobs[0].started_at == 1.0
    assert len(first.outbox) == 1  # the job's frame, to send


def test_tiny_jobs_are_pipelined_up_to_the_window(sock: socket.socket) -> None:
    dispatcher = Dispatcher(_config(max_workers=1))
    for _ in range(50):
        dispatcher.measured(0.0001)
    assert dispatcher.window() == 21
    worker = _worker(sock, 1)
    _queue(dispatcher, 30)
    dispatcher.assign([worker], now=0.0)
    assert len(worker.inflight) == 21 and len(dispatcher.pending) == 9


def test_long_jobs_are_not_pipelined(sock: socket.socket) -> None:
    dispatcher = Dispatcher(_config(max_workers=1))
    dispatcher.measured(0.5)
    assert dispatcher.window() == 1
    worker = _worker(sock, 1)
    _queue(dispatcher, 3)
    dispatcher.assign([worker], now=0.0)
    assert len(worker.inflight) == 1


def test_idle_workers_first_and_max_workers_running_at_once(sock: socket.socket) -> None:
    dispatcher = Dispatcher(_config(max_workers=2))
    busy, idle, extra = _worker(sock, 1), _worker(sock, 2), _worker(sock, 3)  # extra: a replacement
    [running] = _queue(dispatcher, 1, start=100)
    busy.inflight.append(running)
    dispatcher.pending.clear()
    _queue(dispatcher, 2)
    dispatcher.assign([busy, idle, extra], now=0.0)
    assert len(idle.inflight) == 1
    assert not extra.inflight  # two run already: max_workers=2
    assert len(busy.inflight) == 1  # nothing measured: nothing sent ahead
    assert len(dispatcher.pending) == 1


def test_nothing_is_queued_behind_a_job_far_past_the_mean(sock: socket.socket) -> None:
    dispatcher = Dispatcher(_config(max_workers=1))
    for _ in range(50):
        dispatcher.measured(0.0001)
    worker = _worker(sock, 1)
    [running] = _queue(dispatcher, 1, start=100)
    dispatcher.pending.clear()
    running.started_at = 0.0
    worker.inflight.append(running)
    _queue(dispatcher, 2)
    dispatcher.assign([worker], now=1.0)  # it has run 1 s; the mean is 0.1 ms
    assert list(worker.inflight) == [running]


def test_a_starting_worker_takes_one_job_ahead_only_without_initializer(sock: socket.socket) -> None:
    starting = _worker(sock, 1, WorkerState.STARTING)
    dispatcher = Dispatcher(_config())
    _queue(dispatcher, 2)
    dispatcher.assign([starting], now=0.0)
    assert len(starting.inflight) == 1

    with_initializer = Dispatcher(_config(initializer=print))
    other = _worker(sock, 2, WorkerState.STARTING)
    _queue(with_initializer, 1)
    with_initializer.assign([other], now=0.0)
    assert not other.inflight


def test_retiring_and_dying_workers_get_nothing(sock: socket.socket) -> None:
    dispatcher = Dispatcher(_config())
    workers = [_worker(sock, i, state) for i, state in enumerate(
        (WorkerState.RETIRING, WorkerState.KILLING, WorkerState.EXITED), 1)]
    _queue(dispatcher, 3)
    assert dispatcher.assign(workers, now=0.0).touched == []
    assert len(dispatcher.pending) == 3


def test_the_last_job_of_a_budget_marks_the_worker_spent(sock: socket.socket) -> None:
    dispatcher = Dispatcher(_config(max_workers=1))
    for _ in range(50):
        dispatcher.measured(0.0001)
    worker = _worker(sock, 1)
    worker.max_jobs = 3
    _queue(dispatcher, 5)
    assignment = dispatcher.assign([worker], now=0.0)
    assert len(worker.inflight) == 3 and assignment.spent == [worker]


def test_cancelled_jobs_are_dropped_and_counted(sock: socket.socket) -> None:
    dispatcher = Dispatcher(_config(max_workers=1))
    worker = _worker(sock, 1)
    first, second = _queue(dispatcher, 2)
    first.future.cancel()
    assignment = dispatcher.assign([worker], now=0.0)
    assert assignment.cancelled == 1
    assert list(worker.inflight) == [second]


def test_retry_puts_the_job_first_until_its_retries_run_out() -> None:
    dispatcher = Dispatcher(_config())
    [queued] = _queue(dispatcher, 1)
    job = Job(9, JobFuture("job-9", None), b"", b"", None, retries=1)
    assert dispatcher.retry(job)
    assert list(dispatcher.pending) == [job, queued] and job.attempt == 2
    dispatcher.pending.popleft()
    assert not dispatcher.retry(job)
    assert list(dispatcher.pending) == [queued]


def test_put_back_keeps_the_order_in_front_and_forgets_the_worker(sock: socket.socket) -> None:
    dispatcher = Dispatcher(_config())
    [queued] = _queue(dispatcher, 1)
    worker = _worker(sock, 1)
    jobs = _queue(dispatcher, 2, start=10)
    for job in jobs:
        dispatcher.pending.remove(job)
        job.future.worker_id = worker.worker_id
    dispatcher.put_back(jobs)
    assert list(dispatcher.pending) == [*jobs, queued]
    assert all(job.future.worker_id is None for job in jobs)
