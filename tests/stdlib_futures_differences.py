"""Where ``poolkit.ProcessPoolExecutor`` differs from CPython's own ``concurrent.futures`` tests.

``tests/test_stdlib_futures.py`` runs the standard library's
``test.test_concurrent_futures`` against poolkit. Every test named here is
expected to fail and is marked ``xfail``: strict, so the day it passes the
run fails until its line is removed here, except the few whose outcome
depends on timing (``strict=False``, and the reason says so). ``match`` is a
regular expression that the failure's text (traceback included) must
contain: a listed test that starts failing *differently* (a hang, another
assertion) fails the run instead of hiding behind its old reason.

Only two kinds of reasons belong here:

* ``DELIBERATE``: poolkit behaves otherwise on purpose (see
  ``docs/migration/concurrent-futures.md``, "What changes, on purpose");
* ``INTERNALS``: the test reads or patches the standard library executor's
  private machinery (``_executor_manager_thread``, ``_call_queue``,
  ``_broken``, the threads it starts), which poolkit does not have, so the
  test says nothing about poolkit. Where the rest of such a test checks
  something that a user sees, the reason says whether poolkit does it.

A poolkit bug never goes here: it fails the run until it is fixed.

Names are ``<class without the start method>.<method>``, the same on every
Python version; ``start_methods`` and ``pythons`` narrow a line to where the
difference shows. The table in ``docs/migration/concurrent-futures.md``
("Where poolkit differs from the standard library's own tests") mirrors
this list; ``test_stdlib_futures.py`` checks that the two name the same tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DELIBERATE = "deliberate"
INTERNALS = "internals"
START_METHODS = ("fork", "forkserver", "spawn")


@dataclass(frozen=True)
class Difference:
    kind: str  # DELIBERATE or INTERNALS
    reason: str  # why the test fails; the docs table says the same
    match: str  # a regular expression searched in the failure's text (traceback included)
    start_methods: tuple[str, ...] = START_METHODS
    pythons: tuple[str, ...] | None = (
        None  # "3.10" ... "3.13"; None: every version that has the test
    )
    # False only where poolkit's outcome depends on timing (said in the reason): such
    # a test may pass now and then, and a pass must not fail the run.
    strict: bool = True

    def applies(self, start_method: str, python: str) -> bool:
        return start_method in self.start_methods and (
            self.pythons is None or python in self.pythons
        )

    def matches(self, failure: str) -> bool:
        return re.search(self.match, failure) is not None


_NO_ATTRIBUTE = r"'ProcessPoolExecutor' object has no attribute '{}'"

DIFFERENCES: dict[str, Difference] = {
    # ------------------------------------------------------------ deliberate
    "ProcessPoolExecutorTest.test_killed_child": Difference(
        DELIBERATE,
        "A killed worker fails only the job it was running (WorkerCrashed, a BrokenProcessPool) "
        "and is replaced; the pool is not broken, so the next submit() succeeds. When no "
        "worker has started yet (spawn, forkserver, sometimes fork), the test stops earlier: "
        "`_processes` is still empty and next() raises StopIteration.",
        r"BrokenProcessPool not raised by submit|StopIteration",
    ),
    "ProcessPoolExecutorTest.test_max_tasks_per_child": Difference(
        DELIBERATE,
        "max_tasks_per_child works with fork; the standard library refuses it there (ValueError).",
        r"ValueError not raised",
        start_methods=("fork",),
    ),
    "ProcessPoolExecutorTest.test_max_tasks_per_child_defaults_to_spawn_context": Difference(
        DELIBERATE,
        "Given max_tasks_per_child and no mp_context, the standard library switches to spawn "
        "(it cannot recycle forked workers); poolkit keeps its default, fork.",
        r"'fork' != 'spawn'",
    ),
    "ProcessPoolExecutorTest.test_traceback": Difference(
        DELIBERATE,
        "A job's exception has a poolkit.RemoteTraceback as its __cause__, a subclass of "
        "concurrent.futures.process._RemoteTraceback; the test wants that exact class. The rest "
        "of the test (the worker's source line in the cause and in sys.excepthook's output) holds.",
        r"is not <class 'concurrent\.futures\.process\._RemoteTraceback'>",
    ),
    "ProcessPoolExecutorTest.test_idle_process_reuse_one": Difference(
        DELIBERATE,
        "poolkit starts all max_workers workers when the pool is made, with every start "
        "method; the standard library starts spawn and forkserver workers one by one as jobs "
        "come, reusing an idle one first (the test skips fork).",
        r"AssertionError: \d != 1",
        start_methods=("forkserver", "spawn"),
    ),
    "ProcessPoolExecutorTest.test_idle_process_reuse_multiple": Difference(
        DELIBERATE,
        "As test_idle_process_reuse_one: all max_workers workers start with the pool, "
        "so there are more than the 3 that on-demand starting gives.",
        r"\d not less than or equal to 3",
        start_methods=("forkserver", "spawn"),
    ),
    "ProcessPoolExecutorTest.test_saturation": Difference(
        DELIBERATE,
        "Workers start in the background when the pool is made, and submit() never waits "
        "for one; right after the pool is made, `_processes` lists only the workers that have "
        "started (the standard library starts them inside submit()). Timing: if all have "
        "started by then, the test passes.",
        r"AssertionError: \d != 5",
        strict=False,
    ),
    "ProcessPoolShutdownTest.test_processes_terminate": Difference(
        DELIBERATE,
        "As test_saturation: right after the pool is made `_processes` lists the workers that "
        "have started, not 5 (fork); and with spawn and forkserver all 5 start, not 3 on "
        "demand. Timing: the count it sees may happen to be the expected one.",
        r"AssertionError: \d != [35]",
        strict=False,
    ),
    "ProcessPoolShutdownTest.test_cancel_futures": Difference(
        DELIBERATE,
        "poolkit's submit() returns at once, and a job is running only once a worker has "
        "taken it, so shutdown(cancel_futures=True) right after 50 submits cancels all 50; "
        "the standard library's first submit() calls block while its workers start, which "
        "lets it hand a few jobs over (with a warm pool it cancels all 50 too). Timing: a "
        "worker may take a job first, and the test passes.",
        r"0 not greater than 0",
        strict=False,
    ),
    # ------------------------------------------------------------ internals
    "ProcessPoolExecutorTest.test_python_finalization_error": Difference(
        INTERNALS,
        "Patches threading to let the executor start one thread and fail the second, the "
        "standard library's call-queue feeder thread. A poolkit pool starts one thread, so "
        "nothing fails and the test's own map(mul, [(2, 3)] * 10) raises TypeError.",
        r"mul\(\) missing 1 required positional argument",
    ),
    "ExecutorDeadlockTest.test_shutdown_deadlock_pickle": Difference(
        INTERNALS,
        "Reads `_executor_manager_thread`. What it checks holds: the job's PicklingError "
        "reaches its future after shutdown(wait=False), and the pool stops.",
        _NO_ATTRIBUTE.format("_executor_manager_thread"),
    ),
    "ProcessPoolShutdownTest.test_del_shutdown": Difference(
        INTERNALS,
        "Reads `_executor_manager_thread` and `_call_queue`. Past them it would show a real "
        "difference: a map() iterator still held keeps its dropped executor alive until the "
        "iterator ends (see the migration page, What to watch for).",
        _NO_ATTRIBUTE.format("_executor_manager_thread"),
    ),
    "ProcessPoolShutdownTest.test_shutdown_no_wait": Difference(
        INTERNALS,
        "Reads `_call_queue` and `_executor_manager_thread`. What it checks holds: after "
        "shutdown(wait=False) the workers exit and map()'s results are all there.",
        _NO_ATTRIBUTE.format("_call_queue"),
    ),
    "FailingInitializerTest.test_initializer": Difference(
        DELIBERATE,
        "The worker logs the initializer's exception on the `concurrent.futures` logger, as "
        "the standard library's workers do, but then leaves with `os._exit`, without "
        "multiprocessing's exit handlers, so the record the test's `QueueHandler` put in a "
        "multiprocessing Queue reaches it only if the queue's feeder thread sends it first "
        "(timing). What else it checks holds: the job fails with BrokenExecutor, `_broken` "
        "is set, the next submit() raises it.",
        r"_assert_logged\('ValueError: error in initializer'\)",
        strict=False,
    ),
    "FailingInitializerResourcesTest.test_spawn": Difference(
        DELIBERATE,
        "Runs FailingInitializerTest.test_initializer inside; when that one fails (timing, "
        "above), its multiprocessing Queue stays in a reference cycle, so the resource "
        "tracker still holds the Queue's semaphores when the test stops it (exit code 1).",
        r"AssertionError: 1 != 0",
        start_methods=("spawn",),
        strict=False,
    ),
    "FailingInitializerResourcesTest.test_forkserver": Difference(
        DELIBERATE,
        "As FailingInitializerResourcesTest.test_spawn.",
        r"AssertionError: 1 != 0",
        start_methods=("forkserver",),
        strict=False,
    ),
}


def expected_difference(name: str, start_method: str, python: str) -> Difference | None:
    """The listed difference for this test under this start method and Python, if any."""
    difference = DIFFERENCES.get(name)
    if difference is not None and difference.applies(start_method, python):
        return difference
    return None
