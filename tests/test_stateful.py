"""A stateful property test: random interleavings of everything a user does to one pool.

Hypothesis drives one pool per example through submits of ordinary,
raising, crashing, timing-out and terminated jobs, waits, ``stats()`` and
``shutdown()``, in random order. The model remembers what each future must
end as; the invariants say:

* every future resolves exactly once (its done-callbacks run once), and with
  the right outcome: the value, the job's exception type, ``WorkerCrashed``
  with the exit code, ``JobTimeout``, or cancelled for ``terminate()``;
* ``stats()`` never shows more live workers than ``max_workers`` and its
  counters never go backwards nor exceed what was submitted; after shutdown
  they equal the model's counts exactly;
* after shutdown no child process is left.
"""

from __future__ import annotations

import concurrent.futures as cf
import shutil
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import jobs
import pytest
from conftest import LeakCheck, live_workers, wait_for_pid_file
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import poolkit

MAX_WORKERS = 2
COUNTERS = ("submitted", "done", "failed", "crashed", "timed_out", "cancelled")


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.before = LeakCheck.snapshot()
        self.directory = Path(tempfile.mkdtemp(prefix="poolkit-stateful-"))
        self.pool = poolkit.Pool(MAX_WORKERS, kill_grace=0.5)
        self.closed = False
        # future -> (kind, detail): ("value", v) | ("error", type, exitcode) | ("cancelled",)
        self.expected: dict[cf.Future[Any], tuple[Any, ...]] = {}
        self.resolutions: Counter[cf.Future[Any]] = Counter()
        self.lock = threading.Lock()
        self.model = Counter[str]()
        self.last_counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.terminations = 0

    # ------------------------------------------------------------- helpers

    def _track(self, future: cf.Future[Any], *expect: Any) -> None:
        self.expected[future] = expect

        def resolved(f: cf.Future[Any]) -> None:
            with self.lock:
                self.resolutions[f] += 1

        future.add_done_callback(resolved)

    def _check_outcome(self, future: cf.Future[Any]) -> None:
        expect = self.expected[future]
        if expect[0] == "cancelled":
            assert future.cancelled(), f"{future!r} should be cancelled"
            return
        assert not future.cancelled(), f"{future!r} was cancelled; expected {expect}"
        exc = future.exception(timeout=0)
        if expect[0] == "value":
            assert exc is None, f"expected {expect[1]!r}, got {exc!r}"
            assert future.result(timeout=0) == expect[1]
            return
        _, error_type, exitcode = expect
        assert isinstance(exc, error_type), f"expected {error_type.__name__}, got {exc!r}"
        if exitcode is not None:
            assert isinstance(exc, poolkit.WorkerCrashed)
            assert exc.exitcode == exitcode, str(exc)

    # ------------------------------------------------------------- rules

    @precondition(lambda self: not self.closed)
    @rule(x=st.integers(min_value=-1000, max_value=1000))
    def submit_ok(self, x: int) -> None:
        self._track(self.pool.submit(jobs.square, x), "value", x * x)
        self.model["submitted"] += 1
        self.model["done"] += 1

    @precondition(lambda self: not self.closed)
    @rule(message=st.text(max_size=20))
    def submit_raising(self, message: str) -> None:
        self._track(self.pool.submit(jobs.raise_value_error, message), "error", ValueError, None)
        self.model["submitted"] += 1
        self.model["failed"] += 1

    @precondition(lambda self: not self.closed)
    @rule(code=st.integers(min_value=1, max_value=5))
    def submit_crashing(self, code: int) -> None:
        future = self.pool.submit(jobs.crash_exit, code)
        self._track(future, "error", poolkit.WorkerCrashed, code)
        self.model["submitted"] += 1
        self.model["crashed"] += 1

    @precondition(lambda self: not self.closed)
    @rule()
    def submit_timing_out(self) -> None:
        future = self.pool.options(timeout=0.3).submit(jobs.sleep_then, 30)
        self._track(future, "error", poolkit.JobTimeout, None)
        self.model["submitted"] += 1
        self.model["timed_out"] += 1

    @precondition(lambda self: not self.closed)
    @rule()
    def terminate_a_running_job(self) -> None:
        self.terminations += 1
        started = self.directory / f"started-{self.terminations}"
        never = self.directory / "never"
        future = self.pool.submit(jobs.started_then_wait, str(started), str(never))
        self._track(future, "cancelled")
        self.model["submitted"] += 1
        self.model["cancelled"] += 1
        wait_for_pid_file(started, timeout=30)
        assert future.terminate() is True
        assert future.cancelled()

    @precondition(lambda self: not self.closed)
    @rule()
    def wait_for_everything(self) -> None:
        futures = list(self.expected)
        _, not_done = cf.wait(futures, timeout=60)
        assert not not_done, f"{len(not_done)} futures never resolved"
        for future in futures:
            self._check_outcome(future)

    @rule()
    def look_at_stats(self) -> None:
        stats = self.pool.stats()
        assert len(live_workers(stats)) <= MAX_WORKERS
        assert stats.pending >= 0 and stats.running >= 0
        assert stats.running <= MAX_WORKERS
        for name in COUNTERS:
            value = getattr(stats, name)
            assert value >= self.last_counts[name], f"{name} went backwards"
            assert value <= self.model[name], f"{name}: {value} > {self.model[name]} in the model"
            self.last_counts[name] = value
        finished = stats.done + stats.failed + stats.crashed + stats.timed_out + stats.cancelled
        assert finished <= stats.submitted <= self.model["submitted"]

    @precondition(lambda self: not self.closed)
    @rule()
    def shutdown(self) -> None:
        self._shutdown()

    @precondition(lambda self: self.closed)
    @rule()
    def submit_after_shutdown(self) -> None:
        with pytest.raises(RuntimeError):
            self.pool.submit(jobs.square, 1)

    def _shutdown(self) -> None:
        thread = threading.Thread(target=self.pool.shutdown, daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "shutdown did not return within 60 s"
        self.closed = True

    # ------------------------------------------------------------- invariants

    @invariant()
    def every_future_resolves_at_most_once_with_its_outcome(self) -> None:
        with self.lock:
            assert all(n <= 1 for n in self.resolutions.values()), self.resolutions
        for future in list(self.expected):
            if future.done():
                self._check_outcome(future)

    def teardown(self) -> None:
        try:
            if not self.closed:
                self._shutdown()
            for future in self.expected:
                assert future.done(), f"{future!r} unresolved after shutdown"
                self._check_outcome(future)
            with self.lock:
                assert all(self.resolutions[f] == 1 for f in self.expected), self.resolutions
            stats = self.pool.stats()
            assert stats.workers == ()
            for name in COUNTERS:
                assert getattr(stats, name) == self.model[name], (name, stats)
            self.before.check()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


PoolMachine.TestCase.settings = settings(
    max_examples=20,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestPoolMachine = pytest.mark.timeout(600)(PoolMachine.TestCase)
