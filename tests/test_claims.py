"""Claims (poolkit/claims.py): a job sent ahead is started by its worker or taken back by the pool, never both.

The two sides are the worker's ``WorkerClaims.claim`` and the pool's
``take_back``, on one pipe, as in a pool; here the worker's side runs in a
thread, so that both read the pipe at the same time.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator

import pytest

from poolkit import claims


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    made = claims.make_pipe()
    assert made is not None
    read_end, write_end = made
    yield read_end, write_end
    for fd in (read_end, write_end):
        try:
            os.close(fd)
        except OSError:
            pass


def _send(write_end: int, indexes: range) -> None:
    os.write(write_end, claims.tokens(indexes.start, len(indexes)))


def test_a_worker_claims_its_jobs_in_order(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    worker = claims.WorkerClaims(os.dup(read_end))
    _send(write_end, range(3))
    assert [worker.claim() for _ in range(3)] == [True, True, True]
    assert claims.take_back(read_end) == []
    worker.close()


def test_taken_back_jobs_are_skipped_and_later_ones_still_run(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    worker = claims.WorkerClaims(os.dup(read_end))
    _send(write_end, range(4))
    assert worker.claim()  # job 0 starts
    assert claims.take_back(read_end) == [1, 2, 3]  # the rest are the pool's again
    _send(write_end, range(4, 6))  # sent ahead later, to the same worker
    assert [worker.claim() for _ in range(5)] == [False, False, False, True, True]
    worker.close()


def test_a_token_read_for_a_later_job_is_kept_for_it(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    worker = claims.WorkerClaims(os.dup(read_end))
    _send(write_end, range(2))
    assert claims.take_back(read_end) == [0, 1]
    _send(write_end, range(2, 3))
    assert worker.claim() is False  # reads token 2: job 0 was taken back
    assert worker.claim() is False  # job 1 too; token 2 is still held
    assert worker.claim() is True  # job 2
    worker.close()


def test_tokens_written_ahead_of_their_jobs_are_taken_back_and_written_again(pipe: tuple[int, int]) -> None:
    """The pool writes tokens a refill at a time; a take-back empties the pipe, unsent ones included."""
    read_end, write_end = pipe
    worker = claims.WorkerClaims(os.dup(read_end))
    os.write(write_end, claims.tokens(0, claims.REFILL))  # jobs 0 and 1 sent ahead; the rest not yet
    assert worker.claim()  # job 0
    assert claims.take_back(read_end) == list(range(1, claims.REFILL))  # job 1, and tokens of no job
    os.write(write_end, claims.tokens(2, claims.REFILL))  # the next job sent ahead is job 2
    assert [worker.claim(), worker.claim()] == [False, True]  # job 1 was taken back; job 2 runs
    worker.close()


def test_a_worker_whose_pool_is_gone_starts_nothing(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    worker = claims.WorkerClaims(os.dup(read_end))
    os.close(write_end)
    assert worker.claim() is False
    worker.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("round_", range(20))
def test_each_job_goes_to_exactly_one_side_when_both_read_at_once(
    pipe: tuple[int, int], round_: int
) -> None:
    """The worker claims while the pool takes back, concurrently: every job is run once or moved once."""
    read_end, write_end = pipe
    jobs = 2000
    worker = claims.WorkerClaims(os.dup(read_end))
    claimed: list[int] = []
    written = 0  # tokens in the pipe so far: a pool writes each before its job's frame
    reached = 0  # jobs the worker has looked at
    more = threading.Condition()

    def work() -> None:
        nonlocal reached
        for index in range(jobs):
            with more:
                more.wait_for(lambda index=index: written > index)
            if worker.claim():
                claimed.append(index)
            with more:
                reached = index + 1
                more.notify_all()

    thread = threading.Thread(target=work)
    thread.start()
    taken: list[int] = []
    rng = random.Random(round_)
    for start in range(0, jobs, 64):  # at most a window at a time, as a pool sends them
        batch = range(start, min(jobs, start + 64))
        target = start + rng.randrange(len(batch))
        _send(write_end, batch)
        with more:
            written = batch.stop
            more.notify_all()
            # Let the worker into the batch, then take back while it goes on claiming.
            more.wait_for(lambda target=target: reached >= target, timeout=10)
        taken.extend(claims.take_back(read_end))
    thread.join(30)
    assert not thread.is_alive()
    taken.extend(claims.take_back(read_end))
    worker.close()
    assert not set(claimed) & set(taken)
    assert sorted(claimed + taken) == list(range(jobs))
    assert claimed and taken  # both sides won some: the reads did race
