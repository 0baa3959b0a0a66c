"""The Dask backend against a real scheduler and real Dask worker processes.

One ``LocalCluster`` (two nanny-managed worker processes, one thread each, on
loopback) serves the whole module. Each test asserts what a user of
``DaskPool`` sees: results, the job's own exceptions, poolkit's errors, the
job context on the node, progress, recycling, and that no future is ever left
unresolved, even when a Dask worker is killed under its jobs. The test that
kills a Dask worker runs last, since the nanny replaces that worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import operator
import os
import pickle
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip("distributed")

from recycle_jobs import wait_until  # noqa: E402

import poolkit  # noqa: E402
from poolkit.batch import run_batch  # noqa: E402
from poolkit.dask import DaskJobFuture, DaskJobLost, DaskPool  # noqa: E402
from poolkit.dask.delivery import Delivery  # noqa: E402

pytestmark = [pytest.mark.dask, pytest.mark.timeout(90)]

WAIT = 30.0  # seconds any single future may take here before the test fails

# The jobs live in this module, which imports pytest and distributed: a fresh
# poolkit child would import all that on its first job. Preloading it into the
# nodes' templates makes every child start with it (see docs/dask.md).
PRELOAD = [__name__]


# ----------------------------------------------------------------- jobs (run on the nodes)


def square(x: int) -> int:
    return x * x


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def segfault() -> None:
    ctypes.string_at(0)  # a real SIGSEGV in the poolkit child


def whoami() -> dict[str, Any]:
    ctx = poolkit.current_job()
    assert ctx is not None
    return {
        "job_id": ctx.job_id,
        "job_type": ctx.job_type,
        "worker_id": ctx.worker_id,
        "attempt": ctx.attempt,
        "env": {k: v for k, v in os.environ.items() if k.startswith("POOLKIT_JOB") or k == "POOLKIT_WORKER_ID"},
        "pid": os.getpid(),
    }


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def wait_for_file(path: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)


def blocker(gate: str, marker: str | None = None) -> int:
    """Report the child's pid as progress, then wait for the caller to open ``gate``."""
    if marker is not None:
        Path(marker).touch()
    poolkit.report_progress(os.getpid())
    wait_for_file(gate)
    return os.getpid()


def report_then_wait(gate: str) -> str:
    poolkit.report_progress(1)
    wait_for_file(gate)
    poolkit.report_progress(2)
    return "done"


def report_many(n: int) -> int:
    for i in range(1, n + 1):
        poolkit.report_progress(i)
    return n


def hog(megabytes: int) -> int:
    block = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(5)  # hold it: the memory watch must catch it
    return len(block)


def started_then_sleep(x: int, seconds: float) -> int:
    poolkit.report_progress(os.getpid())
    time.sleep(seconds)
    return x * x


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=40,
    ) as local_cluster:
        yield local_cluster


@pytest.fixture(scope="module")
def client(cluster: Any) -> Iterator[Any]:
    with distributed.Client(cluster, set_as_default=False, timeout=WAIT) as dask_client:
        dask_client.wait_for_workers(2, timeout=WAIT)
        yield dask_client


@pytest.fixture(scope="module")
def pool(client: Any) -> Iterator[DaskPool]:
    with DaskPool(client, preload=PRELOAD, name="tests") as dask_pool:
        yield dask_pool


def dask_worker_pids(client: Any) -> dict[str, int]:
    pids: dict[str, int] = client.run(os.getpid)
    return pids


def open_gate(path: Path) -> None:
    path.touch()


# ----------------------------------------------------------------- packaging


def test_poolkit_errors_survive_pickling() -> None:
    crash = poolkit.WorkerCrashed("died", exitcode=-11, pid=42, worker_id=3, job_id="j")
    lost = DaskJobLost("lost", job_id="k")
    for error in (crash, lost, poolkit.MemoryLimitExceeded("mem", exitcode=-9, pid=1, worker_id=1)):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error)
        assert str(back) == str(error)
        assert (back.exitcode, back.pid, back.worker_id, back.job_id) == (
            error.exitcode,
            error.pid,
            error.worker_id,
            error.job_id,
        )
    assert pickle.loads(pickle.dumps(crash)).signal_name == "SIGSEGV"
    timeout = pickle.loads(pickle.dumps(poolkit.JobTimeout("job 1 ran past its timeout")))
    assert isinstance(timeout, poolkit.JobTimeout) and isinstance(timeout, TimeoutError)
    assert str(timeout) == "job 1 ran past its timeout"


# ----------------------------------------------------------------- results


def test_results_through_the_executor_interface(pool: DaskPool) -> None:
    assert isinstance(pool, concurrent.futures.Executor)
    futures = [pool.submit(square, i) for i in range(8)]
    for future in futures:
        assert isinstance(future, poolkit.JobFuture)
        assert isinstance(future, concurrent.futures.Future)
    _done, not_done = concurrent.futures.wait(futures, timeout=WAIT)
    assert not not_done
    assert [f.result() for f in futures] == [i * i for i in range(8)]
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures)) == sorted(
        i * i for i in range(8)
    )
    # Each future knows where its job ran and what it cost there.
    nodes = set(dask_worker_pids(pool.client))
    for future in futures:
        assert future.node in nodes
        assert future.stats is not None and future.stats.wall_time >= 0
        assert future.pid == future.stats.pid and future.worker_id == future.stats.worker_id


def test_map_and_options_map_keep_order(pool: DaskPool) -> None:
    assert list(pool.map(square, range(50))) == [i * i for i in range(50)]
    assert list(pool.map(operator.add, range(5), range(10, 15), chunksize=2)) == [
        10,
        12,
        14,
        16,
        18,
    ]
    assert list(pool.options(job_type="sq").map(square, range(5), timeout=WAIT)) == [
        0,
        1,
        4,
        9,
        16,
    ]
    assert sorted(pool.imap_unordered(square, range(10))) == sorted(i * i for i in range(10))


def test_progress_counts_the_same_on_the_dask_pool(pool: DaskPool) -> None:
    seen: dict[str, Any] = {}

    def keep(counts: Any) -> None:
        seen[counts.label] = counts

    assert list(pool.map(square, range(20), progress=keep)) == [i * i for i in range(20)]
    assert sorted(pool.imap_unordered(square, range(10), progress=keep)) == sorted(i * i for i in range(10))
    assert [o.value for o in pool.batch(square, range(5), progress=keep)] == [0, 1, 4, 9, 16]
    for label, total in (("map", 20), ("imap_unordered", 10), ("batch", 5)):
        final = seen[label]
        assert final.finished and (final.total, final.done, final.failed) == (total, total, 0)


def test_asyncio_run_and_as_completed_async(pool: DaskPool) -> None:
    async def main() -> tuple[int, list[int]]:
        one = await pool.run(square, 9)
        futures = [pool.submit(square, i) for i in range(4)]
        done = [f.result() async for f in pool.as_completed_async(futures)]
        return one, sorted(done)

    assert asyncio.run(asyncio.wait_for(main(), WAIT)) == (81, [0, 1, 4, 9])


def test_dask_futures_as_arguments_become_values(pool: DaskPool) -> None:
    x = pool.client.submit(operator.add, 20, 1, pure=False)
    assert pool.submit(operator.mul, x, 2).result(WAIT) == 42


def test_a_job_exception_comes_back_as_itself_with_the_remote_traceback(pool: DaskPool) -> None:
    future = pool.submit(raise_value_error, "bad input 7")
    with pytest.raises(ValueError, match="bad input 7") as info:
        future.result(WAIT)
    cause = info.value.__cause__
    assert isinstance(cause, poolkit.RemoteTraceback)
    assert "raise_value_error" in str(cause)
    assert future.stats is not None  # the job ran: it has its figures


def test_an_unpicklable_argument_fails_that_future_only(pool: DaskPool) -> None:
    future = pool.submit(len, threading.Lock())
    with pytest.raises(TypeError, match="pickle"):
        future.result(WAIT)
    assert pool.submit(square, 3).result(WAIT) == 9


def test_bad_options_are_refused_at_construction(client: Any, pool: DaskPool) -> None:
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        DaskPool(client, max_tasks_per_child=0)
    with pytest.raises(ValueError, match="memory"):
        DaskPool(client, memory_limit_per_child="lots")
    for timeout in (-1, float("nan")):  # the same rules as Pool.options
        with pytest.raises(ValueError, match="timeout"):
            pool.options(timeout=timeout)
    with pytest.raises(ValueError, match="retries"):
        pool.options(retries=-1)
    # Nothing was left registered on the workers by the refused pools.
    plugins = client.run(lambda dask_worker: list(dask_worker.plugins))
    assert all(sum(n.startswith("poolkit-") for n in names) == 1 for names in plugins.values())


# ----------------------------------------------------------------- isolation


def test_a_segfault_fails_its_job_alone_and_the_dask_worker_survives(pool: DaskPool) -> None:
    before = dask_worker_pids(pool.client)
    good = [pool.submit(square, i) for i in range(6)]
    crashed = pool.submit(segfault)
    with pytest.raises(poolkit.WorkerCrashed) as info:
        crashed.result(WAIT)
    error = info.value
    assert isinstance(error, concurrent.futures.process.BrokenProcessPool)
    assert error.signal_name == "SIGSEGV"
    assert error.job_id == crashed.job_id
    assert [f.result(WAIT) for f in good] == [i * i for i in range(6)]
    assert dask_worker_pids(pool.client) == before  # same Dask workers, same processes
    assert pool.submit(square, 5).result(WAIT) == 25  # and the pool goes on


def test_recycling_after_n_jobs_on_every_node(client: Any) -> None:
    with DaskPool(
        client, preload=PRELOAD, max_tasks_per_child=2, recycle_jitter=0.0, name="recycle"
    ) as pool:
        futures = [pool.submit(pid_after, 0.02) for _ in range(12)]
        pids_by_node: dict[str, Counter[int]] = {}
        for future in futures:
            pid = future.result(WAIT)
            assert future.node is not None
            pids_by_node.setdefault(future.node, Counter())[pid] += 1
        for pids in pids_by_node.values():
            assert max(pids.values()) <= 2  # no poolkit child ran more than 2 jobs
        assert sum(len(pids) for pids in pids_by_node.values()) >= 6
        stats = pool.stats()
        assert stats.retired.get("tasks", 0) >= 4
        assert stats.done == 12 and stats.submitted == 12


def test_a_job_past_its_timeout_raises_job_timeout(pool: DaskPool) -> None:
    before = dask_worker_pids(pool.client)
    started = time.monotonic()
    future = pool.options(timeout=0.5).submit(time.sleep, 30)
    with pytest.raises(poolkit.JobTimeout):
        future.result(WAIT)
    assert time.monotonic() - started < 20
    assert dask_worker_pids(pool.client) == before


def test_the_pool_wide_job_timeout_applies_on_the_nodes(client: Any) -> None:
    # Without PRELOAD, the import of this module in a fresh child would count
    # toward the 0.5 s timeout of the job after the one that timed out.
    with DaskPool(client, preload=PRELOAD, job_timeout=0.5, name="timeouts") as pool:
        with pytest.raises(poolkit.JobTimeout):
            pool.submit(time.sleep, 30).result(WAIT)
        assert pool.submit(square, 4).result(WAIT) == 16
        assert pool.stats().timed_out == 1


def test_a_memory_limit_kills_the_child_not_the_dask_worker(client: Any) -> None:
    before = dask_worker_pids(client)
    with DaskPool(client, preload=PRELOAD, memory_limit_per_child="150MiB", name="memory") as pool:
        with pytest.raises(poolkit.MemoryLimitExceeded):
            pool.submit(hog, 400).result(WAIT)
        assert pool.submit(square, 6).result(WAIT) == 36
    assert dask_worker_pids(client) == before


# ----------------------------------------------------------------- job context and progress


def test_current_job_and_environment_on_a_remote_node(pool: DaskPool) -> None:
    future = pool.options(job_id="remote-1", job_type="inventory").submit(whoami)
    seen = future.result(WAIT)
    assert seen["job_id"] == "remote-1" == future.job_id
    assert seen["job_type"] == "inventory"
    assert seen["worker_id"] == future.worker_id
    assert seen["pid"] == future.pid
    assert seen["attempt"] == 1
    assert seen["env"] == {
        "POOLKIT_JOB_ID": "remote-1",
        "POOLKIT_JOB_TYPE": "inventory",
        "POOLKIT_WORKER_ID": str(future.worker_id),
    }
    # The Dask worker itself is never inside a job: jobs ran in its poolkit children.
    outside = pool.client.run(lambda: (poolkit.current_job(), os.environ.get("POOLKIT_JOB_ID")))
    assert set(outside.values()) == {(None, None)}
    # A job id may be reused once its job is done, not before.
    again = pool.options(job_id="remote-1").submit(whoami)
    assert again.result(WAIT)["job_id"] == "remote-1"


def test_progress_reaches_the_caller_while_the_job_runs(pool: DaskPool, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    values: list[Any] = []
    running_when_seen: list[bool] = []

    def on_progress(future: poolkit.JobFuture[Any], value: Any) -> None:
        values.append(value)
        running_when_seen.append(future.running())
        if value == 1:
            open_gate(gate)  # the job goes on only once the caller saw its first value

    future = pool.submit(report_then_wait, str(gate))
    future.add_progress_callback(on_progress)
    assert future.result(WAIT) == "done"
    assert values == [1, 2]
    assert running_when_seen[0] is True
    assert future.progress == 2


def test_fast_progress_is_coalesced_and_the_last_value_arrives(pool: DaskPool) -> None:
    values: list[int] = []
    future = pool.submit(report_many, 2000)
    future.add_progress_callback(lambda f, v: values.append(v))
    assert future.result(WAIT) == 2000
    assert values[-1] == 2000 and future.progress == 2000
    assert values == sorted(set(values))  # in order, never twice
    assert len(values) < 2000


# ----------------------------------------------------------------- cancel, terminate, batch


def test_cancel_a_queued_job_and_terminate_a_running_one(pool: DaskPool, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    started = [threading.Event(), threading.Event()]
    child_pids: list[int] = []

    def on_start(index: int) -> Any:
        def callback(future: Any, pid: int) -> None:
            child_pids.append(pid)
            started[index].set()

        return callback

    # One job per Dask worker (one thread each): both nodes are busy.
    blockers = [pool.submit(blocker, str(gate)) for _ in range(2)]
    for index, future in enumerate(blockers):
        future.add_progress_callback(on_start(index))
    assert all(event.wait(WAIT) for event in started)
    assert all(f.running() for f in blockers)

    marker = tmp_path / "queued-job-ran"
    queued = pool.submit(blocker, str(gate), str(marker))
    assert queued.cancel()
    assert queued.cancelled()

    victim = blockers[0]
    victim_pid = victim.progress
    assert victim.terminate()
    concurrent.futures.wait([victim], timeout=WAIT)
    assert victim.cancelled()
    assert gone(victim_pid)  # its poolkit child was killed

    open_gate(gate)
    assert blockers[1].result(WAIT) == blockers[1].progress
    assert pool.submit(square, 2).result(WAIT) == 4  # the queue has drained past the cancelled job
    assert not marker.exists()


def test_cancel_says_no_to_a_job_already_running_on_a_node(
    pool: DaskPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until its "started" message arrives, a job that runs on a node looks pending
    to the caller: cancel() asks the nodes, says no, and the job ends as usual."""
    held = threading.Event()
    take_event = Delivery._take_event

    def hold_started_messages(self: Delivery, msg: Any, terminate: Any) -> None:
        if msg[0] == "s":
            held.set()  # as if it were still on its way
            return
        take_event(self, msg, terminate)

    monkeypatch.setattr(Delivery, "_take_event", hold_started_messages)
    gate, marker = tmp_path / "gate", tmp_path / "started"
    future = pool.submit(blocker, str(gate), str(marker))
    wait_for_file(str(marker))
    assert held.wait(WAIT)
    assert not future.running() and not future.done()
    assert not future.cancel()
    assert not future.cancelled()
    open_gate(gate)
    assert isinstance(future.result(WAIT), int)


def test_a_cancelled_job_that_reaches_a_node_anyway_never_runs(
    pool: DaskPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cancel() is a promise from every node: even if Dask still hands the task to
    one (the Dask-level cancel is lost here), the job does not run."""
    monkeypatch.setattr(Delivery, "_take_cancel", lambda self, seq, cancel, terminate: None)
    gate = tmp_path / "gate"
    markers = [tmp_path / "busy-1", tmp_path / "busy-2"]
    blockers = [pool.submit(blocker, str(gate), str(marker)) for marker in markers]
    for marker in markers:
        wait_for_file(str(marker))
    cancelled_before = pool.counters["cancelled"]

    ran = tmp_path / "cancelled-job-ran"
    queued = pool.submit(blocker, str(gate), str(ran))
    assert queued.cancel()
    open_gate(gate)
    assert all(isinstance(f.result(WAIT), int) for f in blockers)
    # The node answers "skipped" for it; the caller counts it cancelled once.
    wait_until(
        lambda: pool.counters["cancelled"] > cancelled_before,
        timeout=WAIT,
        what="the node's answer for the cancelled job",
    )
    assert queued.cancelled()
    assert not ran.exists()
    assert pool.counters["cancelled"] == cancelled_before + 1


def test_shutdown_cancel_futures_cancels_every_queued_job_unrun(
    client: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    dask_pool = DaskPool(client, preload=PRELOAD, name="cancel-many")
    busy = [tmp_path / "busy-1", tmp_path / "busy-2"]
    blockers = [dask_pool.submit(blocker, str(gate), str(marker)) for marker in busy]
    for marker in busy:
        wait_for_file(str(marker))
    queued = [dask_pool.submit(blocker, str(gate), str(tmp_path / f"q{i}")) for i in range(20)]
    closer = threading.Thread(target=dask_pool.shutdown, kwargs={"cancel_futures": True})
    closer.start()
    concurrent.futures.wait(queued, timeout=WAIT)
    assert all(f.cancelled() for f in queued)
    open_gate(gate)
    closer.join(WAIT)
    assert not closer.is_alive()
    assert all(isinstance(f.result(0), int) for f in blockers)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("q")]


def gone(pid: int, limit: float = 10.0) -> bool:
    """Wait (bounded) for a process to exit: killing is asynchronous, the test waits on the fact."""
    deadline = time.monotonic() + limit
    while psutil_pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def psutil_pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_run_batch_works_on_a_dask_pool(pool: DaskPool) -> None:
    inputs = [1, 2, "x", 4]
    outcomes = list(
        run_batch(
            pool,  # type: ignore[arg-type]
            square,
            inputs,
            retries=0,
            retry_exceptions=False,
            timeout=None,
            ordered=True,
            chunksize=None,
            max_in_flight=None,
        )
    )
    assert [o.index for o in outcomes] == [0, 1, 2, 3]
    assert [o.ok for o in outcomes] == [True, True, False, True]
    assert [o.value for o in outcomes if o.ok] == [1, 4, 16]
    assert outcomes[2].error == "TypeError"
    assert all(o.pid is not None for o in outcomes)

    # Per-input timeouts and star-spread arguments, as `poolkit run --dask` uses them.
    outcomes = list(
        run_batch(
            pool,  # type: ignore[arg-type]
            time.sleep,
            [[0.01], [30]],
            retries=0,
            retry_exceptions=False,
            timeout=1.0,
            ordered=True,
            chunksize=None,
            max_in_flight=None,
            star=True,
        )
    )
    assert [o.ok for o in outcomes] == [True, False]
    assert outcomes[1].error == "JobTimeout"
    assert pool.batch is not None
    assert [o.value for o in pool.batch(square, range(5))] == [0, 1, 4, 9, 16]


def test_stats_add_up_the_nodes(client: Any) -> None:
    with DaskPool(client, preload=PRELOAD, name="stats") as pool:
        assert pool.max_workers == 2  # two Dask workers, one thread each
        assert [f.result(WAIT) for f in [pool.submit(square, i) for i in range(4)]] == [0, 1, 4, 9]
        with pytest.raises(ValueError):
            pool.submit(raise_value_error, "no").result(WAIT)
        nodes = pool.node_stats()
        assert set(nodes) == set(dask_worker_pids(client))
        stats = pool.stats()
        assert (stats.submitted, stats.done, stats.failed, stats.pending, stats.running) == (
            5,
            4,
            1,
            0,
            0,
        )
        assert len(stats.workers) == sum(len(s.workers) for s in nodes.values()) == 2


def test_fork_start_method_works_in_daemonic_dask_workers(client: Any) -> None:
    # Nanny-managed Dask workers are daemonic processes; poolkit forks with os.fork.
    from multiprocessing import current_process

    assert set(client.run(lambda: current_process().daemon).values()) == {True}
    with DaskPool(client, preload=PRELOAD, start_method="fork", name="fork") as pool:
        assert pool.submit(square, 7).result(WAIT) == 49
        assert pool.submit(segfault).exception(WAIT).signal_name == "SIGSEGV"  # type: ignore[union-attr]


def test_shutdown_removes_the_node_pools_and_closes_its_own_client(
    cluster: Any, client: Any
) -> None:
    pool = DaskPool(cluster.scheduler_address, preload=PRELOAD, name="owned")
    assert pool.submit(square, 3).result(WAIT) == 9
    children = [w.pid for s in pool.node_stats().values() for w in s.workers if w.pid]
    assert children
    pool.shutdown()
    assert pool.client.status == "closed"
    plugins = client.run(lambda dask_worker: list(dask_worker.plugins))
    assert not any(name.startswith("poolkit-owned") for names in plugins.values() for name in names)
    assert not any(psutil_pid_alive(pid) for pid in children)
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(square, 1)


def test_shutdown_lets_a_map_that_began_before_it_finish(client: Any) -> None:
    pool = DaskPool(client, preload=PRELOAD, name="late-map")
    results = pool.map(square, range(60))  # chunks go out as earlier ones complete
    pool.shutdown(wait=True)
    assert list(results) == [i * i for i in range(60)]
    assert pool.stats().done == pool.stats().submitted


# ----------------------------------------------------------------- a Dask worker dies (last)


def test_a_killed_dask_worker_loses_no_job(pool: DaskPool) -> None:
    pids = dask_worker_pids(pool.client)
    started = threading.Event()
    first: list[DaskJobFuture[int]] = []

    def on_start(future: Any, child_pid: int) -> None:
        if not first:
            first.append(future)
            started.set()

    futures: list[DaskJobFuture[int]] = []
    for i in range(6):
        future = pool.submit(started_then_sleep, i, 0.5)
        future.add_progress_callback(on_start)
        futures.append(future)
    assert started.wait(WAIT)
    running = first[0]
    node, child = running.node, running.progress
    assert node is not None and running.running()
    os.kill(pids[node], signal.SIGKILL)  # the Dask worker process, not its nanny

    _done, not_done = concurrent.futures.wait(futures, timeout=60)
    assert not not_done, "every future resolves"
    for i, future in enumerate(futures):
        error = future.exception()
        if error is None:
            assert future.result() == i * i
        else:
            assert isinstance(error, DaskJobLost), repr(error)
    # The job that was running is run again on a live worker (allowed-failures is 3).
    assert running.exception() is None
    assert running.node != node
    # The poolkit child of the killed Dask worker did not outlive it.
    assert gone(child)


def test_the_old_module_name_still_imports_the_same_objects() -> None:
    import poolkit.dask
    import poolkit.dask_backend

    for name in poolkit.dask_backend.__all__:
        assert getattr(poolkit.dask_backend, name) is getattr(poolkit.dask, name)
    assert poolkit.dask.Envelope._fields == (
        "ok", "value", "traceback", "stats", "worker_id", "pid", "node", "progress_count", "progress",
    )
