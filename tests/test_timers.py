"""The timer rules (poolkit/timers.py), without any process.

One description of each timer answers both "how long may the loop sleep" and
"what is due now"; these tests hold the two answers to each other.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolkit.futures import JobFuture
from poolkit.timers import Due, Timers
from poolkit.worker_table import Job, Worker, WorkerState

KILL_GRACE = 1.0


@pytest.fixture(scope="module")
def sock() -> Iterator[socket.socket]:
    a, b = socket.socketpair()
    yield a
    a.close()
    b.close()


def _worker(
    sock: socket.socket,
    worker_id: int,
    *,
    state: WorkerState = WorkerState.READY,
    born: float = 0.0,
    ready: bool = True,
) -> Worker:
    worker = Worker(worker_id, sock, born)
    worker.state = state
    if ready and state is not WorkerState.STARTING:
        worker.ready_at = born
    return worker


def _job(seq: int, started_at: float, *, cancelled: bool = False, token: int | None = None) -> Job:
    future: JobFuture[Any] = JobFuture(f"job-{seq}", None)
    if cancelled:
        future.cancel()
    job = Job(seq, future, b"", b"", None)
    job.started_at = started_at
    job.token = token
    return job


def _act_as_the_manager(worker: Worker, due: Due, now: float) -> None:
    """What the manager does to a worker for each timer, as far as the timers can see."""
    if due is Due.RECLAIM:  # the jobs whose tokens come back leave; the others' tokens are the worker's
        head, *behind = worker.inflight
        worker.inflight.clear()
        worker.inflight.append(head)
        worker.inflight.extend(job for job in behind[: len(behind) // 2])
        for job in worker.inflight:
            job.token = None
    elif due in (Due.EXIT, Due.START, Due.SKIP):
        if due is not Due.EXIT:
            worker.state = WorkerState.KILLING
        worker.exit_deadline = now + KILL_GRACE
    elif worker.live:
        worker.state = WorkerState.RETIRING


def test_a_retiring_workers_last_job_leaves_nothing_due(sock: socket.socket) -> None:
    """The busy loop of issue 17: an idle replacement at min_workers beside a retiring worker."""
    timers = Timers(start_timeout=None, idle_timeout=0.3, min_workers=1)
    retiring = _worker(sock, 1, state=WorkerState.RETIRING)
    retiring.inflight.append(_job(1, started_at=0.0))
    replacement = _worker(sock, 2, born=0.0)
    now = 1.0  # the replacement has idled past idle_timeout
    fired: list[Due] = []
    assert timers.fire([retiring, replacement], now, lambda w, due, t: fired.append(due)) == 0
    assert fired == []
    assert timers.next_timeout([retiring, replacement], now) is None


def test_idle_workers_retire_down_to_min_workers_only(sock: socket.socket) -> None:
    timers = Timers(start_timeout=None, idle_timeout=0.3, min_workers=1)
    workers = [_worker(sock, i) for i in (1, 2, 3)]
    fired: list[tuple[int, Due]] = []

    def act(worker: Worker, due: Due, now: float) -> None:
        fired.append((worker.worker_id, due))
        _act_as_the_manager(worker, due, now)

    assert timers.next_timeout(workers, 0.1) == pytest.approx(0.2)
    assert timers.fire(workers, 1.0, act) == 2
    assert fired == [(1, Due.IDLE), (2, Due.IDLE)]
    assert timers.next_timeout(workers, 1.0) is None


def test_a_starting_worker_has_only_its_start_timeout(sock: socket.socket) -> None:
    timers = Timers(start_timeout=5.0, idle_timeout=0.3, min_workers=0)
    worker = _worker(sock, 1, state=WorkerState.STARTING, born=10.0)
    worker.lifetime = 1.0
    assert timers.deadlines(worker, live_workers=1) == [(15.0, Due.START)]


def test_a_dying_worker_has_only_its_exit_deadline(sock: socket.socket) -> None:
    timers = Timers(start_timeout=5.0, idle_timeout=0.3, min_workers=0)
    worker = _worker(sock, 1, state=WorkerState.KILLING)
    worker.exit_deadline = 2.0
    worker.lifetime = 1.0
    assert timers.deadlines(worker, live_workers=0) == [(2.0, Due.EXIT)]
    fired: list[Due] = []
    timers.fire([worker], 2.0, lambda w, due, now: (fired.append(due), _act_as_the_manager(w, due, now)))
    assert fired == [Due.EXIT]
    assert timers.next_timeout([worker], 2.0) == pytest.approx(KILL_GRACE)


def test_a_terminated_job_that_started_anyway_is_due_after_the_skip_grace(sock: socket.socket) -> None:
    timers = Timers(start_timeout=None, idle_timeout=None, min_workers=0, skip_grace=0.05)
    worker = _worker(sock, 1)
    worker.inflight.append(_job(1, started_at=3.0, cancelled=True))
    assert timers.deadlines(worker, live_workers=1) == [(3.05, Due.SKIP)]
    assert timers.fire([worker], 3.0, lambda w, due, now: None) == 0


def test_jobs_sent_ahead_are_taken_back_once_their_head_runs_long(sock: socket.socket) -> None:
    timers = Timers(
        start_timeout=None, idle_timeout=None, min_workers=0, long_after=lambda: 0.25, capacity=2
    )
    worker = _worker(sock, 1)
    worker.inflight.extend([_job(1, started_at=3.0), _job(2, 0.0, token=0), _job(3, 0.0, token=1)])
    idle = _worker(sock, 2)
    assert timers.deadlines(worker, live_workers=2, spare=True) == [(3.25, Due.RECLAIM)]
    fired: list[Due] = []
    assert timers.fire([worker, idle], 3.1, lambda w, due, now: fired.append(due)) == 0
    assert timers.next_timeout([worker, idle], 3.1) == pytest.approx(0.15)
    timers.fire([worker, idle], 3.25, lambda w, due, now: (fired.append(due), _act_as_the_manager(w, due, now)))
    assert fired == [Due.RECLAIM]
    assert timers.next_timeout([worker, idle], 3.25) is None  # once per head: nothing left to take back
    retiring = _worker(sock, 3, state=WorkerState.RETIRING)  # a retiring worker's queue moves too
    retiring.inflight.extend([_job(4, started_at=1.0), _job(5, 0.0, token=0)])
    assert timers.deadlines(retiring, live_workers=1, spare=True) == [(1.25, Due.RECLAIM)]
    sent_as_next = _worker(sock, 4)  # no token: nothing to take back
    sent_as_next.inflight.extend([_job(6, started_at=1.0), _job(7, 0.0)])
    assert timers.deadlines(sent_as_next, live_workers=1, spare=True) == []


def test_nothing_is_taken_back_while_no_worker_could_run_it(sock: socket.socket) -> None:
    timers = Timers(
        start_timeout=None, idle_timeout=None, min_workers=0, long_after=lambda: 0.25, capacity=2
    )
    first, second = _worker(sock, 1), _worker(sock, 2)
    for worker in (first, second):
        worker.inflight.extend([_job(1, started_at=0.0), _job(2, 0.0, token=0)])
    assert timers.next_timeout([first, second], 5.0) is None  # both busy: the jobs wait wherever they are
    spare = _worker(sock, 3)  # a replacement, idle, but max_workers jobs run already
    assert timers.next_timeout([first, second, spare], 5.0) is None
    second.inflight.clear()
    assert timers.next_timeout([first, second, spare], 5.0) == 0.0
    spent = first  # given its last job: it keeps the ones it holds, to run exactly its budget
    spent.max_jobs = spent.jobs_assigned = 2
    assert timers.next_timeout([first, second, spare], 5.0) is None


_worker_states = st.fixed_dictionaries(
    {
        "state": st.sampled_from(list(WorkerState)),
        "ready": st.booleans(),
        "born": st.floats(0, 10),
        "idle_since": st.floats(0, 10),
        "lifetime": st.none() | st.floats(0.01, 10),
        "exit_deadline": st.none() | st.floats(0, 20),
        "jobs": st.lists(st.tuples(st.floats(0, 10), st.booleans(), st.booleans()), max_size=4),
    }
)


@settings(max_examples=300, deadline=None)
@given(
    states=st.lists(_worker_states, min_size=1, max_size=5),
    now=st.floats(0, 20),
    start_timeout=st.none() | st.floats(0.01, 5),
    idle_timeout=st.none() | st.floats(0.01, 5),
    min_workers=st.integers(0, 5),
    long_after=st.none() | st.floats(0.001, 5),
)
def test_if_firing_did_nothing_the_next_timeout_is_not_zero(
    sock: socket.socket,
    states: list[dict[str, Any]],
    now: float,
    start_timeout: float | None,
    idle_timeout: float | None,
    min_workers: int,
    long_after: float | None,
) -> None:
    timers = Timers(
        start_timeout=start_timeout,
        idle_timeout=idle_timeout,
        min_workers=min_workers,
        long_after=None if long_after is None else (lambda: long_after),
        capacity=2,
    )

    def build() -> list[Worker]:
        workers = []
        for worker_id, state in enumerate(states, 1):
            worker = _worker(sock, worker_id, state=state["state"], born=state["born"], ready=state["ready"])
            worker.idle_since = state["idle_since"]
            worker.lifetime = state["lifetime"]
            worker.exit_deadline = state["exit_deadline"]
            for seq, (started_at, cancelled, ahead) in enumerate(state["jobs"], 1):
                token = seq if ahead and seq > 1 else None
                worker.inflight.append(_job(seq, started_at, cancelled=cancelled, token=token))
            workers.append(worker)
        return workers

    # Firing nothing (whatever the timers said is due was not acted on by
    # them) happens only when nothing is due: then the loop may sleep.
    idle = build()
    if timers.fire(idle, now, lambda w, due, t: None) == 0:
        timeout = timers.next_timeout(idle, now)
        assert timeout is None or timeout > 0
    # Acting as the manager does on what is due leaves nothing due at once.
    acted = build()
    timers.fire(acted, now, _act_as_the_manager)
    timeout = timers.next_timeout(acted, now)
    assert timeout is None or timeout > 0
