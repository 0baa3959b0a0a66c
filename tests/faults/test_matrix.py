"""The fault matrix: *where* a fault strikes, crossed with *what* the fault is.

For every cell the test builds a fresh pool of two workers, submits the job
the fault hits (if the fault is in a job) among ordinary jobs, makes the
fault happen, and checks what a user sees:

* the affected future resolves, with the error in ``EXPECTED`` (or its value
  where the fault is harmless);
* every other future completes with its value;
* the pool is back to its full size (respawning is asynchronous, so this is
  a bounded poll on ``stats()``), except where the documented outcome is a
  broken pool;
* after ``shutdown()`` (itself bounded) no process, thread or descriptor is
  left, and a process the job started is gone too.

Where: the job's arguments are loaded in the worker (``load_job``), the job
runs (``run``), its result is pickled in the worker (``pickle_result``) or
loaded in the parent (``unpickle_result``), in the ``initializer``, in the
``finalizer`` (at shutdown), in the finalizer of a worker ``retiring`` after
``max_tasks_per_child=1``, and in a job that faults while ``shutdown`` is
under way.

What (``jobs.FAULTS``): an exception, ``sys.exit``, ``os._exit``, a
segfault, SIGKILL or SIGTERM from outside, SIGSTOP (then a timeout), a job
that starts its own child process, one that closes fds 0-2, one that calls
``os.setsid``, recursion too deep, and 2 GB allocated under
``memory_limit_per_child="500MiB"``.

Each fault fires once per cell (the first worker to reach it claims a
marker file), so a cell shows what happens to one fault, not a storm.
Cells that cannot happen or that poolkit cannot handle are listed in
``NOT_APPLICABLE`` and ``DOCUMENTED`` with the reason.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import jobs
import pytest
from conftest import (
    LeakCheck,
    descendants,
    wait_for_file,
    wait_for_pid_file,
    wait_for_pool_size,
    wait_gone,
    wait_until,
)

import poolkit

WHERES = (
    "load_job",
    "run",
    "pickle_result",
    "unpickle_result",
    "initializer",
    "finalizer",
    "retiring",
    "shutdown",
)
WHATS = jobs.FAULTS
JOB_WHERES = ("load_job", "run", "pickle_result", "unpickle_result", "shutdown")

SIGNAL_FROM_OUTSIDE = {"sigkill_outside": signal.SIGKILL, "sigterm_outside": signal.SIGTERM}
TAG = {
    "load_job": "load",
    "run": "run",
    "pickle_result": "dump",
    "unpickle_result": "load",
    "initializer": "init",
    "finalizer": "fin",
    "retiring": "fin",
    "shutdown": "shutdown",
}
OTHER_JOBS = 6
JOB_TIMEOUT = 2.0  # seconds, for the SIGSTOP cells (every job of the cell gets it)
EXIT_TIMEOUT = 2.0  # seconds a stopped retiring worker gets before SIGKILL (SIGSTOP cells)
SHUTDOWN_BOUND = 30.0  # seconds a shutdown may take before the cell counts as hung


@dataclass(frozen=True)
class Expect:
    """What a user sees in one cell.

    ``error`` is the exception type the affected future raises (None: it
    returns ``value``). ``broken``: the documented outcome is a broken pool
    (every future and later submit raise BrokenPool), so no size check.
    """

    error: type[BaseException] | tuple[type[BaseException], ...] | None = None
    value: Any = None
    signal_name: str | None = None
    exitcode: int | None = None
    broken: bool = False


# What each fault does to the job it hits, when it hits inside a job in the worker.
IN_JOB: dict[str, Expect] = {
    "exception": Expect(error=jobs.JobError),
    "sys_exit": Expect(error=SystemExit),
    "os_exit": Expect(error=poolkit.WorkerCrashed, exitcode=7),
    "segfault": Expect(error=poolkit.WorkerCrashed, signal_name="SIGSEGV"),
    "sigkill_outside": Expect(error=poolkit.WorkerCrashed, signal_name="SIGKILL"),
    "sigterm_outside": Expect(error=poolkit.WorkerCrashed, signal_name="SIGTERM"),
    "sigstop_timeout": Expect(error=poolkit.JobTimeout),
    "fork_children": Expect(value="forked"),
    "close_stdio": Expect(value="closed"),
    # A worker leads its own process group (so that stopping it stops its
    # job's children), and a group leader may not call setsid: EPERM.
    "setsid": Expect(error=PermissionError),
    "recursion": Expect(error=RecursionError),
    "alloc_2gb": Expect(error=poolkit.MemoryLimitExceeded, signal_name="SIGKILL"),
}


def _in_job(where: str, what: str) -> Expect:
    expect = IN_JOB[what]
    if expect.error is not None:
        raised = isinstance(expect.error, type) and not issubclass(
            expect.error, (poolkit.WorkerCrashed, poolkit.JobTimeout)
        )
        if where == "load_job" and raised:
            # Raised while the arguments load: the standard library reports a
            # BrokenProcessPool; poolkit fails this job only, with one (the load
            # error as __cause__).
            return Expect(error=poolkit.UnpicklingFailed)
        return expect
    if where == "load_job":  # the loaded argument is what do_fault returned
        return Expect(value=f"ran with {expect.value!r}")
    if where == "pickle_result":  # FaultOnDump pickles as str("dumped")
        return Expect(value="dumped")
    return expect


# Faults outside any job: the jobs of the cell are all ordinary, so they all succeed,
# unless the fault breaks the pool (an initializer that raises, as in the stdlib).
SERVES = Expect()
BROKEN = Expect(error=poolkit.BrokenPool, broken=True)

#: Cells whose outcome is not the general rule above, and why.
DOCUMENTED: dict[tuple[str, str], tuple[Expect, str]] = {
    ("unpickle_result", "exception"): (
        Expect(error=UnpicklingError),
        "a result that fails to load in the parent: UnpicklingError on that future, "
        "the load error as __cause__",
    ),
    ("unpickle_result", "recursion"): (
        Expect(error=UnpicklingError),
        "as above, RecursionError as __cause__",
    ),
    ("unpickle_result", "sys_exit"): (
        Expect(error=(UnpicklingError, SystemExit)),
        "SystemExit raised while loading a result in the parent fails that future only",
    ),
    **{
        ("initializer", what): (
            BROKEN,
            "an initializer that raises breaks the pool (stdlib semantics): it would fail "
            "the same way in every new worker",
        )
        for what in ("exception", "sys_exit", "setsid", "recursion")
    },
    **{
        ("initializer", what): (
            SERVES,
            "a worker that dies while starting is replaced; only several such deaths in a "
            "row break the pool",
        )
        for what in ("os_exit", "segfault", "sigkill_outside", "sigterm_outside")
    },
    ("initializer", "alloc_2gb"): (
        SERVES,
        "memory_limit_per_child watches a worker only while it runs a job",
    ),
    ("finalizer", "alloc_2gb"): (
        SERVES,
        "memory_limit_per_child watches a worker only while it runs a job",
    ),
    ("retiring", "alloc_2gb"): (
        SERVES,
        "memory_limit_per_child watches a worker only while it runs a job",
    ),
}

_PARENT_SIDE = (
    "a result's __reduce__ runs this at load time in the caller's own process "
    "(the pool's manager thread): it would kill, stop, fork or starve the caller itself, "
    "which no pool can prevent"
)
#: Cells that cannot be run, and why.
NOT_APPLICABLE: dict[tuple[str, str], str] = {
    **{
        ("unpickle_result", what): _PARENT_SIDE
        # Every fault but those that only raise, which the caller survives.
        for what in WHATS
        if what not in ("exception", "sys_exit", "recursion")
    },
}


def expected(where: str, what: str) -> Expect:
    if (where, what) in DOCUMENTED:
        return DOCUMENTED[(where, what)][0]
    if where in ("load_job", "run", "pickle_result", "shutdown"):
        return _in_job(where, what)
    return SERVES  # initializer, finalizer, retiring: the ordinary jobs all succeed


CELLS = [
    pytest.param(
        where,
        what,
        id=f"{where}-{what}",
        marks=[pytest.mark.skip(reason=NOT_APPLICABLE[(where, what)])]
        if (where, what) in NOT_APPLICABLE
        else [],
    )
    for where in WHERES
    for what in WHATS
]


# ----------------------------------------------------------------- running one cell


def _pool_for(where: str, what: str, directory: str) -> poolkit.Pool:
    options: dict[str, Any] = {}
    if what == "alloc_2gb":
        options["memory_limit_per_child"] = "500MiB"
    if what == "sigstop_timeout":
        options["job_timeout"] = JOB_TIMEOUT
        options["exit_timeout"] = EXIT_TIMEOUT
        options["start_timeout"] = EXIT_TIMEOUT
    if where == "initializer":
        options.update(initializer=jobs.fault_init, initargs=(what, directory))
    elif where == "finalizer":
        options.update(finalizer=jobs.fault_fin, finalargs=(what, directory))
    elif where == "retiring":
        options.update(
            finalizer=jobs.fault_fin,
            finalargs=(what, directory),
            max_tasks_per_child=1,
            recycle_jitter=0,
        )
    return poolkit.Pool(2, **options)


def _submit(pool: poolkit.Pool, fn: Any, *args: Any) -> Future[Any]:
    """``pool.submit``; a pool that broke already (initializer cells) raises BrokenPool at
    submit, which is recorded on a future so that every job is checked the same way."""
    try:
        return pool.submit(fn, *args)
    except poolkit.BrokenPool as exc:
        future: Future[Any] = Future()
        future.set_exception(exc)
        return future


def _affected_job(pool: poolkit.Pool, where: str, what: str, directory: str) -> Future[Any] | None:
    if where == "load_job":
        return pool.submit(jobs.take_arg, jobs.FaultOnLoad(what, directory))
    if where == "run":
        return pool.submit(jobs.fault_in_job, what, directory)
    if where == "pickle_result":
        return pool.submit(jobs.fault_in_result, what, directory)
    if where == "unpickle_result":
        return pool.submit(jobs.fault_after_load, what, directory)
    if where == "shutdown":
        return pool.submit(jobs.fault_after_go, what, directory, os.path.join(directory, "go"))
    return None


def _signal_from_outside(what: str, directory: Path, where: str) -> None:
    if what in SIGNAL_FROM_OUTSIDE:
        pid = wait_for_pid_file(directory / f"pid-{TAG[where]}")
        os.kill(pid, SIGNAL_FROM_OUTSIDE[what])


def _shutdown_bounded(pool: poolkit.Pool) -> threading.Thread:
    thread = threading.Thread(target=pool.shutdown, kwargs={"wait": True}, daemon=True)
    thread.start()
    return thread


def _outcome(future: Future[Any]) -> tuple[str, Any]:
    try:
        return "value", future.result(timeout=30)
    except BaseException as exc:  # SystemExit included: it is a job's outcome here
        return "error", exc


def _check_affected(future: Future[Any], expect: Expect) -> None:
    kind, got = _outcome(future)
    if expect.error is None:
        assert kind == "value", f"expected {expect.value!r}, got {got!r}"
        assert got == expect.value
        return
    assert kind == "error", f"expected {expect.error}, got the value {got!r}"
    assert isinstance(got, expect.error), f"expected {expect.error}, got {got!r}"
    if isinstance(got, poolkit.WorkerCrashed):
        assert got.pid and got.worker_id and got.job_id
        if expect.signal_name is not None:
            assert got.signal_name == expect.signal_name, str(got)
            if isinstance(got, poolkit.MemoryLimitExceeded):
                assert "memory" in str(got)
            else:
                assert expect.signal_name in str(got)
        if expect.exitcode is not None:
            assert got.exitcode == expect.exitcode, str(got)
    if isinstance(got, UnpicklingError):
        assert got.__cause__ is not None


def _is_broken(pool: poolkit.Pool) -> bool:
    """True once the pool is broken: a new job fails with BrokenPool (or submit raises it)."""
    try:
        future = pool.submit(jobs.square, 2)
    except poolkit.BrokenPool:
        return True
    kind, got = _outcome(future)
    if kind == "value":
        assert got == 4
        return False
    assert isinstance(got, poolkit.BrokenPool), repr(got)
    return True


def _kill_leftovers(before: LeakCheck) -> None:
    """Safety net after a failed cell: never let a stuck worker outlive its test."""
    for proc in descendants():
        if proc.pid not in before.children:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("where", "what"), CELLS)
def test_fault_cell(where: str, what: str, tmp_path: Path) -> None:
    directory = str(tmp_path)
    expect = expected(where, what)
    before = LeakCheck.snapshot()
    try:
        _run_cell(where, what, tmp_path, directory, expect)
        before.check()
        grandchild_file = tmp_path / f"grandchild-{TAG[where]}"
        if what == "fork_children" and grandchild_file.exists():
            wait_gone([wait_for_pid_file(grandchild_file)], timeout=10, what="the job's child")
    finally:
        _kill_leftovers(before)


def _run_cell(where: str, what: str, tmp_path: Path, directory: str, expect: Expect) -> None:
    pool = _pool_for(where, what, directory)
    shutdown_thread: threading.Thread | None = None
    try:
        others = [_submit(pool, jobs.square, i) for i in range(OTHER_JOBS // 2)]
        affected = _affected_job(pool, where, what, directory)
        others += [_submit(pool, jobs.square, i) for i in range(OTHER_JOBS // 2, OTHER_JOBS)]

        if where == "shutdown":
            wait_for_file(tmp_path / "started-shutdown")
            shutdown_thread = _shutdown_bounded(pool)
            (tmp_path / "go").touch()
            _signal_from_outside(what, tmp_path, where)
        elif where == "finalizer":
            # The finalizer runs at shutdown: start it, then make the fault happen.
            for i, future in enumerate(others):
                assert future.result(timeout=30) == i * i
            shutdown_thread = _shutdown_bounded(pool)
            _signal_from_outside(what, tmp_path, where)
        else:
            _signal_from_outside(what, tmp_path, where)

        if expect.broken:
            # The worker that did not fault may finish a few jobs before the pool breaks
            # (as with the stdlib); every other job fails with BrokenPool, and so does submit.
            for i, future in enumerate(others):
                kind, got = _outcome(future)
                if kind == "value":
                    assert got == i * i
                else:
                    assert isinstance(got, poolkit.BrokenPool), repr(got)
            # The failing worker may report after the others ran every job: the pool is
            # broken once it has; from then on submit raises BrokenPool.
            wait_until(lambda: _is_broken(pool), timeout=20, what="the pool to break")
            with pytest.raises(poolkit.BrokenPool):
                pool.submit(jobs.square, 1)
            return

        if affected is not None:
            _check_affected(affected, expect)
        for i, future in enumerate(others):
            assert future.result(timeout=30) == i * i, f"job {i} of the cell"

        if shutdown_thread is None:
            # The pool goes on at full size, and still answers.
            assert pool.submit(jobs.square, 11).result(timeout=30) == 121
            # Generous: a worker whose initializer touches 2 GiB takes seconds to be
            # ready on a loaded machine, and this bounds a hang, not a speed.
            wait_for_pool_size(pool, timeout=45)
    finally:
        if shutdown_thread is None:
            shutdown_thread = _shutdown_bounded(pool)
        shutdown_thread.join(SHUTDOWN_BOUND)
        assert not shutdown_thread.is_alive(), f"shutdown did not finish in {SHUTDOWN_BOUND} s"
