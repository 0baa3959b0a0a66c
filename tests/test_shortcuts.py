"""``poolkit.batch(fn, inputs)``: a batch on a pool of its own, closed when the outcomes end."""

from __future__ import annotations

import gc
import importlib
import itertools
import os
from functools import partial

import pytest
from jobs import getpid, raise_value_error, square, square_or_crash

import poolkit

pytestmark = pytest.mark.timeout(120)


def test_poolkit_batch_is_a_function_yielding_an_outcome_per_input(leak_check) -> None:
    outcomes = list(poolkit.batch(square, range(8), max_workers=2))
    assert [o.index for o in outcomes] == list(range(8))
    assert [o.value for o in outcomes] == [x * x for x in range(8)]
    assert all(isinstance(o, poolkit.Outcome) and o.ok for o in outcomes)
    leak_check.check()  # exhausted: the pool is shut down, no process, thread or fd left


def test_a_crash_or_an_exception_fails_only_its_input(leak_check) -> None:
    crash = list(poolkit.batch(partial(square_or_crash, crash_at=(3,)), range(6), max_workers=2))
    assert [o.ok for o in crash] == [True, True, True, False, True, True]
    assert crash[3].error == "WorkerCrashed"
    assert [o.value for o in crash if o.ok] == [0, 1, 4, 16, 25]
    raised = list(poolkit.batch(raise_value_error, ["no"], max_workers=1))
    assert (raised[0].ok, raised[0].error, raised[0].message) == (False, "ValueError", "no")


def test_pool_options_reach_the_pool(leak_check) -> None:
    pids = [o.value for o in poolkit.batch(getpid, range(4), max_workers=1, max_tasks_per_child=1)]
    assert len(set(pids)) == 4  # a new worker for every input
    assert os.getpid() not in pids


def test_leaving_early_shuts_the_pool_down_and_stops_reading_inputs(leak_check) -> None:
    read: list[int] = []

    def inputs():
        for i in itertools.count():
            read.append(i)
            yield i

    outcomes = poolkit.batch(square, inputs(), max_workers=2, chunksize=1, max_in_flight=4)
    for outcome in outcomes:
        if outcome.index == 5:
            break
    outcomes.close()  # what dropping the iterator does, without waiting for the collector
    count = len(read)  # an endless input: that the loop got here at all says it was read lazily
    leak_check.check()
    gc.collect()
    assert len(read) == count  # and not read after the close


def test_an_iterator_dropped_unread_still_shuts_its_pool_down(leak_check) -> None:
    outcomes = poolkit.batch(square, range(3), max_workers=1)
    del outcomes
    gc.collect()
    leak_check.check()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"retries": -1}, ValueError),
        ({"max_workers": 0}, ValueError),
        ({"no_such_option": 1}, TypeError),
    ],
)
def test_bad_arguments_raise_in_the_call_and_leave_nothing(kwargs, error, leak_check) -> None:
    with pytest.raises(error):
        poolkit.batch(square, range(3), **kwargs)  # raises here, before any next()
    leak_check.check()


def test_not_callable_raises_in_the_call(leak_check) -> None:
    with pytest.raises(TypeError, match="not callable"):
        poolkit.batch(42, range(3), max_workers=1)  # type: ignore[arg-type]
    leak_check.check()


def test_the_batch_module_stays_importable_by_its_name() -> None:
    module = importlib.import_module("poolkit.batch")
    from poolkit.batch import Outcome, run_batch

    assert Outcome is poolkit.Outcome and callable(run_batch)
    assert module.Outcome is Outcome
    assert callable(poolkit.batch) and poolkit.batch is not module
    assert "batch" in poolkit.__all__
