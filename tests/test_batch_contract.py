"""The contract of ``batch`` and ``map`` with what a job does: one outcome per input, whatever happens.

Each test is a promise as a user meets it: a job that calls ``sys.exit``,
kills its worker, raises an exception that does not unpickle, or a consumer
that stops reading. Job functions live in ``tests/contract_jobs.py``.
"""

from __future__ import annotations

import functools
import gc
import pickle
from pathlib import Path
from typing import Any

import contract_jobs as cj
import pytest

import poolkit

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pool() -> Any:
    with poolkit.Pool(2) as shared:
        yield shared


# ----------------------------------------------------------------- 1. SystemExit, KeyboardInterrupt


@pytest.mark.parametrize(("job", "error"), [(cj.exit_on, "SystemExit"), (cj.interrupt_on, "KeyboardInterrupt")])
@pytest.mark.parametrize("chunksize", [None, 1, 3])
def test_a_job_that_exits_is_that_inputs_failure_in_batch(pool: poolkit.Pool, job: Any, error: str, chunksize: int | None) -> None:
    outcomes = list(pool.batch(job, range(6), chunksize=chunksize))
    assert [o.index for o in outcomes] == list(range(6))
    assert [o.ok for o in outcomes] == [True, True, False, True, True, True]
    failed = outcomes[2]
    assert failed.error == error
    assert failed.traceback is not None and error in failed.traceback
    assert [o.value for o in outcomes if o.ok] == [0, 1, 3, 4, 5]


# ----------------------------------------------------------------- 2. attempts count real runs


def test_attempts_count_the_runs_of_an_input_whose_worker_died(pool: poolkit.Pool, tmp_path: Path) -> None:
    inputs = [(str(tmp_path), n, 3) for n in range(6)]
    outcomes = list(pool.batch(cj.count_then_die_on, inputs, retries=2))
    assert cj.runs(tmp_path, 3) == 3
    bad = outcomes[3]
    assert (bad.ok, bad.error, bad.attempts) == (False, "WorkerCrashed", 3)
    for outcome in outcomes[:3] + outcomes[4:]:
        assert outcome.ok and outcome.attempts == cj.runs(tmp_path, outcome.index) == 1


def test_attempts_count_exception_retries(pool: poolkit.Pool, tmp_path: Path) -> None:
    inputs = [(str(tmp_path), n, 1) for n in range(3)]
    outcomes = list(pool.batch(cj.count_then_raise_on, inputs, retries=2, retry_exceptions=True))
    assert cj.runs(tmp_path, 1) == 3
    assert (outcomes[1].error, outcomes[1].attempts) == ("ValueError", 3)
    assert [o.attempts for o in outcomes] == [1, 3, 1]


def test_an_input_that_killed_a_chunk_counts_that_run_too(pool: poolkit.Pool, tmp_path: Path) -> None:
    inputs = [(str(tmp_path), n, 4) for n in range(6)]
    outcomes = list(pool.batch(cj.count_then_die_on, inputs, chunksize=3))
    assert cj.runs(tmp_path, 4) == 2  # once in its chunk, once alone
    assert (outcomes[4].error, outcomes[4].attempts) == ("WorkerCrashed", 2)
    assert [o.ok for o in outcomes] == [True, True, True, True, False, True]


def test_with_retries_each_input_has_its_own_budget(pool: poolkit.Pool, tmp_path: Path) -> None:
    """A chunk is not retried as a whole: the inputs beside a bad one run no more than they must."""
    inputs = [(str(tmp_path), n, 0) for n in range(20)]
    outcomes = list(pool.batch(cj.count_then_die_on, inputs, retries=1))
    assert (outcomes[0].error, outcomes[0].attempts, cj.runs(tmp_path, 0)) == ("WorkerCrashed", 2, 2)
    assert all(cj.runs(tmp_path, n) == 1 for n in range(1, 20))


# ----------------------------------------------------------------- 3. map keeps the results before a failure


@pytest.mark.parametrize("chunksize", [None, 1])
def test_map_yields_every_result_before_the_input_that_raised(pool: poolkit.Pool, chunksize: int | None) -> None:
    results: list[int] = []
    with pytest.raises(ValueError, match="bad input 200") as caught:
        for value in pool.map(functools.partial(cj.raise_on, target=200), range(400), chunksize=chunksize):
            results.append(value)
    assert results == list(range(200))
    assert isinstance(caught.value.__cause__, poolkit.RemoteTraceback)


@pytest.mark.parametrize("chunksize", [None, 1])
def test_map_yields_every_result_before_the_input_that_killed_its_worker(
    pool: poolkit.Pool, chunksize: int | None
) -> None:
    results: list[int] = []
    with pytest.raises(poolkit.WorkerCrashed) as caught:
        for value in pool.map(functools.partial(cj.die_on, target=200), range(400), chunksize=chunksize):
            results.append(value)
    assert results == list(range(200))
    assert "input 200" in str(caught.value)


def test_imap_unordered_yields_the_results_of_a_chunk_before_its_failure(pool: poolkit.Pool) -> None:
    results: list[int] = []
    with pytest.raises(ValueError, match="bad input 5"):
        for value in pool.imap_unordered(functools.partial(cj.raise_on, target=5), range(6), chunksize=6):
            results.append(value)
    assert results == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------- 4. job_timeout stays per input in map


def test_map_under_job_timeout_times_each_input_alone() -> None:
    """Cheap inputs first (map's measured chunks would grow), then 200 inputs of 30 ms under a 1 s timeout."""
    fn = functools.partial(cj.sleep_after, first_slow=200, seconds=0.03)
    with poolkit.Pool(2, job_timeout=1) as timed:
        assert list(timed.map(fn, range(400))) == list(range(400))
        assert timed.stats().timed_out == 0


def test_batch_under_the_pools_job_timeout_times_each_input_alone(tmp_path: Path) -> None:
    """Chunks that share the pool's job_timeout time out, and then each of their inputs runs twice."""
    inputs = [(str(tmp_path), n, 2000, 0.03) for n in range(2100)]
    with poolkit.Pool(2, job_timeout=1) as timed:
        outcomes = list(timed.batch(cj.count_when_slow, inputs))
        assert timed.stats().timed_out == 0
    assert all(o.ok and o.attempts == 1 for o in outcomes)
    assert [cj.runs(tmp_path, n) for n in range(2000, 2100)] == [1] * 100


# ----------------------------------------------------------------- 5. errors name the input


def test_batch_errors_name_the_input_not_a_job_id(pool: poolkit.Pool) -> None:
    outcomes = list(pool.batch(functools.partial(cj.die_on, target=3), range(6)))
    message = outcomes[3].message or ""
    assert "input 3" in message and "job" not in message, message


def test_map_errors_name_the_input_among_thousands(pool: poolkit.Pool) -> None:
    with pytest.raises(poolkit.WorkerCrashed) as caught:
        list(pool.map(functools.partial(cj.die_on, target=1500), range(2000)))
    assert "input 1500" in str(caught.value) and "job" not in str(caught.value)


def test_map_timeouts_name_the_input() -> None:
    fn = functools.partial(cj.sleep_after, first_slow=3, seconds=30)
    with poolkit.Pool(1, job_timeout=0.5) as timed, pytest.raises(poolkit.JobTimeout) as caught:
        list(timed.map(fn, range(4)))
    assert str(caught.value).startswith("input 3 ran past its timeout")


def test_options_map_names_the_input(pool: poolkit.Pool) -> None:
    with pytest.raises(poolkit.WorkerCrashed, match="input 2"):
        list(pool.options(retries=0).map(functools.partial(cj.die_on, target=2), range(4)))


# ----------------------------------------------------------------- 10. an exception that does not unpickle


def test_an_exception_whose_init_takes_two_arguments_comes_back_readable(pool: poolkit.Pool) -> None:
    error = pool.submit(cj.raise_two_args).exception(timeout=30)
    assert isinstance(error, poolkit.UnpicklableJobError)
    assert isinstance(error, poolkit.PoolkitError)
    assert isinstance(error, pickle.PicklingError) and isinstance(error, TypeError)  # what the stdlib raises
    assert error.type_name == "contract_jobs.TwoArgs"
    assert error.original_message == "42: disk full"
    assert "contract_jobs.TwoArgs: 42: disk full" in str(error)
    assert "could not be unpickled" in str(error)
    assert 'raise TwoArgs(42, "disk full")' in error.traceback
    assert isinstance(error.__cause__, poolkit.RemoteTraceback)
    assert 'raise TwoArgs(42, "disk full")' in str(error.__cause__)
    assert pool.submit(cj.square, 3).result(timeout=30) == 9  # the pool goes on


def test_the_stand_in_error_itself_pickles() -> None:
    error = poolkit.UnpicklableJobError("m", type_name="a.B", original_message="x", traceback="tb")
    again = pickle.loads(pickle.dumps(error))
    assert (str(again), again.type_name, again.original_message, again.traceback) == ("m", "a.B", "x", "tb")


def test_map_raises_the_same_stand_in(pool: poolkit.Pool) -> None:
    with pytest.raises(poolkit.UnpicklableJobError, match=r"contract_jobs\.TwoArgs: 42: disk full"):
        list(pool.map(lambda n: cj.raise_two_args() if n == 5 else n, range(10)))


# ----------------------------------------------------------------- batch cancels what its consumer abandons


def _abandon(how: str, outcomes: Any) -> None:
    if how == "close":
        outcomes.close()
    elif how == "drop":
        del outcomes  # the caller's reference goes too, below
    else:

        class Stop(Exception):
            pass

        def consume() -> None:
            for _ in outcomes:
                raise Stop

        with pytest.raises(Stop):
            consume()


@pytest.mark.parametrize("how", ["close", "drop", "raise"])
def test_an_abandoned_batch_cancels_its_queued_inputs(tmp_path: Path, how: str, leak_check: Any) -> None:
    inputs = [(str(tmp_path), n, 1.0) for n in range(200)]
    pool = poolkit.Pool(2)
    try:
        outcomes = pool.batch(cj.mark_then_sleep, inputs, max_in_flight=40, ordered=False)
        taken = [next(outcomes), next(outcomes)] if how != "raise" else []
        assert all(o.ok for o in taken)
        _abandon(how, outcomes)
        del outcomes
        # Dropped means freed: a traceback that held the iterator (pytest keeps
        # the one it caught in a reference cycle) is freed by the collector.
        gc.collect()
    finally:
        pool.shutdown(wait=True)  # bounded by the test's timeout: a forgotten queue of 1 s jobs takes minutes
    ran = sorted(int(p.name) for p in tmp_path.iterdir())
    # The two that answered and at most one running on each worker; the rest never started.
    assert len(ran) <= 4, ran
    assert pool.stats().cancelled >= 30


class _CountingPool(poolkit.Pool):
    """A subclass that counts what goes through submit(), as progress-bar wrappers do."""

    submitted = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        type(self).submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_imap_unordered_goes_through_an_overridden_submit() -> None:
    with _CountingPool(2) as counting:
        assert sorted(counting.imap_unordered(cj.square, range(5), chunksize=1)) == [0, 1, 4, 9, 16]
    assert _CountingPool.submitted == 5
