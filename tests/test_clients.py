"""poolkit.ProcessPoolExecutor under real client libraries that take an executor.

Each client is used as its users use it, with poolkit's executor in place of
the standard library's, and each test checks what such a user sees:

* asyncio: ``loop.run_in_executor(pool, ...)`` gives results in order and the
  job's own exception; cancelling a task that awaits a *queued* job means the
  job never runs (the only worker is held by a gate job until the test
  releases it, so the job is queued, not guessed to be);
* dask's local process scheduler with ``pool=`` (as a keyword of
  ``dask.compute`` and through ``dask.config.set(pool=...)``): the results
  equal the serial scheduler's, and the tasks ran in the pool's workers;
* tqdm's ``process_map``: tqdm has no hook for the executor class; it
  imports ``concurrent.futures.ProcessPoolExecutor`` inside ``process_map``
  each call, so the test monkeypatches that attribute of the
  ``concurrent.futures`` module. tqdm then builds the pool with
  ``max_workers=`` and ``initializer=tqdm_class.set_lock,
  initargs=(a multiprocessing RLock,)``, replaces the pool's ``submit`` by an
  instance attribute that updates the bar, and calls ``map(...,
  chunksize=)``. The bar, written to a StringIO, must end at ``100/100``;
  and jobs in different workers must share tqdm's lock;
* requests-futures: ``FuturesSession(executor=poolkit.ProcessPoolExecutor(2))``
  against a local ``http.server`` bound to 127.0.0.1, with request timeouts.

Nothing here sleeps to guess: waits are on files and futures, with deadlines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dask
import dask.bag
import jobs
import pytest
import requests
import tqdm
import tqdm.contrib.concurrent
from conftest import wait_for_file
from requests_futures.sessions import FuturesSession

import poolkit

pytestmark = pytest.mark.timeout(60)

WAIT = 30.0  # seconds any single future may take here before the test fails


# ----------------------------------------------------------------- jobs (run in workers)


def tqdm_lock_probe(role: str, directory: str) -> str:
    """Two roles that meet through files, each waiting at most ``WAIT`` seconds.

    ``hold`` takes tqdm's lock (the one ``process_map``'s initializer set in
    this worker), says so in ``held``, and keeps the lock until ``probed``
    appears. ``probe`` waits for ``held``, tries the lock without blocking,
    then writes ``probed``. If the workers share the parent's lock, the probe
    finds it taken.
    """
    held = os.path.join(directory, "held")
    probed = os.path.join(directory, "probed")
    lock = tqdm.tqdm.get_lock()
    if role == "hold":
        with lock:
            jobs.write_line(held, str(os.getpid()))
            jobs.wait_for_file_then(probed, timeout=WAIT)
        return "held"
    jobs.wait_for_file_then(held, timeout=WAIT)
    got = lock.acquire(False)
    if got:
        lock.release()
    jobs.write_line(probed, str(os.getpid()))
    return "free" if got else "taken"


def square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


# ----------------------------------------------------------------- asyncio


def test_asyncio_run_in_executor_results_in_order_and_errors() -> None:
    async def main(pool: poolkit.ProcessPoolExecutor) -> list[int]:
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(pool, jobs.square, i) for i in range(50))
        )
        with pytest.raises(ValueError, match="from the job"):
            await loop.run_in_executor(pool, jobs.raise_value_error, "from the job")
        return list(results)

    with poolkit.ProcessPoolExecutor(2) as pool:
        assert asyncio.run(asyncio.wait_for(main(pool), WAIT)) == [i * i for i in range(50)]


def test_asyncio_cancelling_a_task_awaiting_a_queued_job_means_it_never_runs(
    tmp_path: Path,
) -> None:
    started, go = tmp_path / "gate-started", tmp_path / "go"
    cancelled_marker, after_marker = tmp_path / "cancelled-ran", tmp_path / "after-ran"

    async def main(pool: poolkit.ProcessPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        gate = loop.run_in_executor(pool, jobs.started_then_wait, str(started), str(go), "gate")
        wait_for_file(started)  # the only worker is now held by the gate job

        submitted = asyncio.Event()

        async def user_task() -> str:
            pending = loop.run_in_executor(pool, jobs.write_text, str(cancelled_marker), "ran")
            submitted.set()
            return await pending

        task = asyncio.ensure_future(user_task())
        await asyncio.wait_for(submitted.wait(), WAIT)  # its job is queued behind the gate
        after = loop.run_in_executor(pool, jobs.write_text, str(after_marker), "after")

        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

        jobs.write_line(go, "go")  # release the worker
        assert await asyncio.wait_for(gate, WAIT) == "gate"
        # queued after the cancelled job on the same single worker
        assert await asyncio.wait_for(after, WAIT) == "after"

    with poolkit.ProcessPoolExecutor(1) as pool:
        asyncio.run(asyncio.wait_for(main(pool), 2 * WAIT))
        assert pool.stats().cancelled == 1
    # the pool has shut down (waiting for its jobs): whatever was to run has run
    assert after_marker.read_text() == "after\n"
    assert not cancelled_marker.exists(), "the cancelled task's queued job ran"


# ----------------------------------------------------------------- dask (local scheduler)


def dask_graph() -> list[Any]:
    """Delayed values with dependencies (a reduction tree) and a bag pipeline."""
    squares = [dask.delayed(jobs.square)(i) for i in range(40)]
    while len(squares) > 1:
        squares = [
            dask.delayed(jobs.add)(squares[i], squares[i + 1])
            if i + 1 < len(squares)
            else squares[i]
            for i in range(0, len(squares), 2)
        ]
    bag = (
        dask.bag.from_sequence(range(100), npartitions=8)
        .map(jobs.square)
        .filter(lambda x: x % 3 == 0)
    )
    return [squares[0], bag.sum(), bag]


def pids_of_dask_tasks(**compute_kwargs: Any) -> set[int]:
    pids = dask.compute(*[dask.delayed(jobs.getpid)(i) for i in range(12)], **compute_kwargs)
    return set(pids)


def worker_pids(pool: poolkit.Pool) -> set[int]:
    return {w.pid for w in pool.stats().workers if w.pid}


def test_dask_compute_with_pool_keyword_equals_the_serial_result() -> None:
    serial = dask.compute(*dask_graph(), scheduler="sync")
    assert serial[0] == sum(i * i for i in range(40))
    with poolkit.ProcessPoolExecutor(2) as pool:
        result = dask.compute(*dask_graph(), scheduler="processes", pool=pool)
        pids = pids_of_dask_tasks(scheduler="processes", pool=pool)
        assert pids <= worker_pids(pool), "dask ran tasks outside the given pool"
        assert os.getpid() not in pids
        assert pool.stats().done > 0
    assert result == serial


def test_dask_config_set_pool_equals_the_serial_result() -> None:
    serial = dask.compute(*dask_graph(), scheduler="sync")
    with poolkit.ProcessPoolExecutor(2) as pool:
        with dask.config.set(scheduler="processes", pool=pool):
            result = dask.compute(*dask_graph())
            pids = pids_of_dask_tasks()
            assert pids <= worker_pids(pool), "dask ran tasks outside the configured pool"
        assert pool.stats().done > 0
    assert result == serial


def test_dask_task_error_reaches_the_caller_and_the_pool_goes_on() -> None:
    with poolkit.ProcessPoolExecutor(2) as pool:
        with pytest.raises(ValueError, match="dask task failed"):
            dask.compute(
                dask.delayed(jobs.raise_value_error)("dask task failed"),
                scheduler="processes",
                pool=pool,
            )
        (value,) = dask.compute(dask.delayed(jobs.square)(9), scheduler="processes", pool=pool)
    assert value == 81


# ----------------------------------------------------------------- tqdm process_map


class RecordingExecutor(poolkit.ProcessPoolExecutor):
    """poolkit's executor, noting how tqdm built it (the class is not otherwise changed)."""

    built: list[tuple[RecordingExecutor, dict[str, Any]]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        RecordingExecutor.built.append((self, dict(kwargs, args=args)))


@pytest.fixture
def tqdm_uses_poolkit(
    monkeypatch: pytest.MonkeyPatch,
) -> list[tuple[RecordingExecutor, dict[str, Any]]]:
    """Make ``process_map`` use poolkit: it imports this name from concurrent.futures per call."""
    RecordingExecutor.built = []
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", RecordingExecutor)
    return RecordingExecutor.built


def final_bar_line(output: str) -> str:
    return output.replace("\n", "\r").rstrip("\r").rsplit("\r", 1)[-1]


def test_tqdm_process_map_results_and_the_bar_reaches_the_total(
    tqdm_uses_poolkit: list[tuple[RecordingExecutor, dict[str, Any]]],
) -> None:
    out = io.StringIO()
    results = tqdm.contrib.concurrent.process_map(
        jobs.square, range(100), max_workers=2, file=out, ascii=True, tqdm_class=tqdm.tqdm
    )
    assert results == [i * i for i in range(100)]
    assert len(tqdm_uses_poolkit) == 1, "process_map did not build poolkit's executor"
    pool, kwargs = tqdm_uses_poolkit[0]
    assert kwargs["max_workers"] == 2 and pool.max_workers == 2
    assert kwargs["initializer"] == tqdm.tqdm.set_lock
    bar = final_bar_line(out.getvalue())
    assert "100/100" in bar, f"the bar ended at {bar!r}"


def test_tqdm_process_map_with_chunksize_keeps_results_in_order(
    tqdm_uses_poolkit: list[tuple[RecordingExecutor, dict[str, Any]]],
) -> None:
    out = io.StringIO()
    results = tqdm.contrib.concurrent.process_map(
        square_and_pid,
        range(100),
        max_workers=2,
        chunksize=10,
        file=out,
        ascii=True,
        tqdm_class=tqdm.tqdm,
    )
    assert [r for r, _ in results] == [i * i for i in range(100)]
    assert os.getpid() not in {pid for _, pid in results}
    assert len(tqdm_uses_poolkit) == 1
    # tqdm (since it counts calls of the pool's submit) ends at 10/100 here with
    # the standard library's executor, whose map submits one call per chunk;
    # tqdm before that counted results (100/100). Never 0: map must go through
    # the submit tqdm put on the pool.
    count = final_bar_line(out.getvalue()).split("/100", 1)[0].rsplit(" ", 1)[-1]
    assert count in ("10", "100"), f"the bar ended at {final_bar_line(out.getvalue())!r}"


def test_tqdm_process_map_workers_share_tqdms_lock(
    tqdm_uses_poolkit: list[tuple[RecordingExecutor, dict[str, Any]]], tmp_path: Path
) -> None:
    out = io.StringIO()
    results = tqdm.contrib.concurrent.process_map(
        tqdm_lock_probe,
        ["hold", "probe"],
        [str(tmp_path)] * 2,
        max_workers=2,
        file=out,
        ascii=True,
        tqdm_class=tqdm.tqdm,
    )
    # two workers at once (each job waits at most WAIT for the other), and the
    # lock taken in one worker is seen as taken in the other
    assert results == ["held", "taken"]


# ----------------------------------------------------------------- requests-futures


class Handler(BaseHTTPRequestHandler):
    """``GET /square/<n>`` answers ``{"n": n, "square": n*n}``; anything else 404."""

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "square" and parts[1].isdigit():
            n = int(parts[1])
            body = json.dumps({"n": n, "square": n * n}).encode()
            self.send_response(200)
        else:
            body = b"not found"
            self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="test-http-server", daemon=True
    )
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_requests_futures_session_with_poolkit_executor(http_server: str) -> None:
    with poolkit.ProcessPoolExecutor(2) as pool:
        session = FuturesSession(executor=pool)
        try:
            futures = [session.get(f"{http_server}/square/{n}", timeout=10) for n in range(20)]
            missing = session.get(f"{http_server}/nothing-here", timeout=10)
            responses = [f.result(timeout=WAIT) for f in futures]
            assert missing.result(timeout=WAIT).status_code == 404
        finally:
            session.close()
        assert pool.stats().done == 21  # every request went through poolkit's workers
    assert [r.status_code for r in responses] == [200] * 20
    assert [r.json() for r in responses] == [{"n": n, "square": n * n} for n in range(20)]


def test_requests_futures_connection_error_reaches_the_future() -> None:
    # a port on loopback that nothing listens on: bind, take its number, close
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with poolkit.ProcessPoolExecutor(1) as pool:
        session = FuturesSession(executor=pool)
        try:
            future = session.get(f"http://127.0.0.1:{port}/", timeout=5)
            with pytest.raises(requests.ConnectionError):
                future.result(timeout=WAIT)
            # the pool is still serving after the failed request
            assert pool.submit(jobs.square, 5).result(timeout=WAIT) == 25
        finally:
            session.close()
