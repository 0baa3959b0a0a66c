"""Isolation between the parent, the workers and the jobs.

* Channels are socket pairs and pipes: nothing listens, so nothing on the
  machine can connect to a pool.
* A worker holds its own socket and no other: a job cannot read another
  worker's jobs, nor write results in its name, nor hold a dead worker's
  channel open.
* The per-job environment (``POOLKIT_JOB_ID`` and friends) belongs to one
  job and is gone before the next.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import jobs
import psutil
import pytest
from conftest import START_METHODS, wait_for_pid_file, wait_for_pool_size

import poolkit

pytestmark = pytest.mark.timeout(60)


def _socket_inodes(pid: int) -> set[str]:
    """The inode numbers of every socket ``pid`` holds (from ``/proc/<pid>/fd``)."""
    found = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[len("socket:[") : -1])
    return found


def _template_pids(workers: set[int]) -> set[int]:
    """The parents of the workers: their pool's template.

    (Not "every child of this process": multiprocessing's own forkserver, which
    an earlier test may have started, is one too, and is not the pool's.)
    """
    parents = set()
    for pid in workers:
        try:
            parents.add(psutil.Process(pid).ppid())
        except psutil.NoSuchProcess:
            pass  # a worker that has exited already
    return parents


def _net_connections(pid: int) -> list:
    proc = psutil.Process(pid)
    getter = getattr(proc, "net_connections", None) or proc.connections
    return list(getter(kind="all"))


@pytest.mark.parametrize("start_method", START_METHODS)
def test_no_process_of_the_pool_listens(start_method: str) -> None:
    mine_before = {c.laddr for c in _net_connections(os.getpid()) if c.status == "LISTEN"}
    with poolkit.Pool(2, start_method=start_method) as pool:
        assert list(pool.map(jobs.square, range(10))) == [i * i for i in range(10)]
        workers = {w.pid for w in wait_for_pool_size(pool).workers}
        everyone = workers | _template_pids(workers)
        for pid in everyone:
            connections = _net_connections(pid)
            assert [c for c in connections if c.status == psutil.CONN_LISTEN] == []
            # Every socket they hold is an unnamed Unix socket (a socketpair end).
            for c in connections:
                assert c.family == socket.AF_UNIX, c
                assert not c.laddr and not c.raddr, c
        mine_after = {c.laddr for c in _net_connections(os.getpid()) if c.status == "LISTEN"}
        assert mine_after == mine_before


@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_worker_holds_its_own_socket_and_no_other(start_method: str, tmp_path: Path) -> None:
    with poolkit.Pool(3, start_method=start_method) as pool:
        assert list(pool.map(jobs.square, range(30))) == [i * i for i in range(30)]
        # Replace one worker, so that a worker forked later is checked too.
        pid_file = tmp_path / "pid"
        victim = pool.submit(jobs.write_pid_then_sleep, str(pid_file), 60)
        os.kill(wait_for_pid_file(pid_file), signal.SIGKILL)
        with pytest.raises(poolkit.WorkerCrashed):
            victim.result(timeout=30)
        workers = {w.pid for w in wait_for_pool_size(pool).workers}
        assert len(workers) == 3

        held = {pid: _socket_inodes(pid) for pid in workers}
        parent = _socket_inodes(os.getpid())
        templates = set().union(*(_socket_inodes(t) for t in _template_pids(workers)))
        for pid, inodes in held.items():
            assert len(inodes) == 1, f"worker {pid} holds {len(inodes)} sockets: {inodes}"
            others = set().union(*(v for p, v in held.items() if p != pid))
            assert inodes.isdisjoint(others), f"worker {pid} shares a socket with another worker"
            assert inodes.isdisjoint(parent), f"worker {pid} holds the parent's end of a channel"
            assert inodes.isdisjoint(templates), f"worker {pid} shares a socket with the template"



@pytest.mark.parametrize("start_method", START_METHODS)
def test_the_parents_own_sockets_reach_no_process_of_the_pool(start_method: str) -> None:
    """A server that starts a pool keeps its sockets to itself: in the template, the first
    workers (forked before the template's own set-up) and a worker forked later."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=10)
    served, _ = listener.accept()
    try:
        mine = _socket_inodes(os.getpid())
        with poolkit.Pool(2, start_method=start_method) as pool:
            first = {w.pid for w in wait_for_pool_size(pool).workers}
            assert pool.submit(jobs.crash_exit).exception(timeout=30) is not None
            everyone = {w.pid for w in wait_for_pool_size(pool).workers} | first
            assert len(everyone) == 3  # both first workers, and the crashed one's replacement
            everyone |= _template_pids(everyone)
            for pid in everyone:
                if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    assert _socket_inodes(pid).isdisjoint(mine), f"process {pid} holds a socket of ours"
            # So the TCP peer sees this process close its connection while the pool runs.
            served.close()
            assert client.recv(1) == b""
    finally:
        for sock in (client, served, listener):
            sock.close()

def test_a_second_pools_workers_hold_nothing_of_the_first() -> None:
    with poolkit.Pool(2) as first, poolkit.Pool(2) as second:
        assert first.submit(jobs.square, 2).result(timeout=30) == 4
        assert second.submit(jobs.square, 3).result(timeout=30) == 9
        first_workers = {w.pid for w in wait_for_pool_size(first).workers}
        second_workers = {w.pid for w in wait_for_pool_size(second).workers}
        first_inodes = set().union(*(_socket_inodes(p) for p in first_workers))
        parent = _socket_inodes(os.getpid())
        for pid in second_workers:
            inodes = _socket_inodes(pid)
            assert len(inodes) == 1
            assert inodes.isdisjoint(first_inodes)
            assert inodes.isdisjoint(parent)


def test_per_job_environment_does_not_leak_into_the_next_job() -> None:
    with poolkit.Pool(1) as pool:
        first = pool.options(job_id="first-job", job_type="secret-type").submit(jobs.poolkit_env)
        second = pool.submit(jobs.poolkit_env)
        env1, env2 = first.result(timeout=30), second.result(timeout=30)
        assert first.pid == second.pid  # the same worker ran both
        assert env1["POOLKIT_JOB_ID"] == "first-job"
        assert env1["POOLKIT_JOB_TYPE"] == "secret-type"
        assert env2["POOLKIT_JOB_ID"] == second.job_id
        assert env2["POOLKIT_JOB_TYPE"] is None
        assert env1["POOLKIT_WORKER_ID"] == env2["POOLKIT_WORKER_ID"] == str(first.worker_id)
    for name in ("POOLKIT_JOB_ID", "POOLKIT_JOB_TYPE", "POOLKIT_WORKER_ID"):
        assert name not in os.environ  # never set in the caller's process


def test_per_job_environment_is_cleared_after_a_failing_job() -> None:
    with poolkit.Pool(1) as pool:
        failing = pool.options(job_type="failing-type").submit(jobs.raise_value_error)
        after = pool.submit(jobs.poolkit_env)
        with pytest.raises(ValueError):
            failing.result(timeout=30)
        assert after.result(timeout=30)["POOLKIT_JOB_TYPE"] is None


def test_a_jobs_own_environment_change_reaches_no_other_job() -> None:
    """Documented behaviour: a job that sets ``os.environ`` changes it for itself only; the
    worker puts its environment back after the job (see tests/test_job_isolation.py), so the
    change never reaches the caller, the next job of the same worker, or a recycled worker's
    replacement."""
    with poolkit.Pool(1, max_tasks_per_child=2, recycle_jitter=0) as pool:
        setter = pool.submit(jobs.set_env_var, "POOLKIT_TEST_LEAK", "x")
        same_worker = pool.submit(jobs.env_var, "POOLKIT_TEST_LEAK")
        next_worker = pool.submit(jobs.env_var, "POOLKIT_TEST_LEAK")
        assert setter.result(timeout=30) == "x"
        assert same_worker.result(timeout=30) is None
        assert same_worker.pid == setter.pid
        assert next_worker.result(timeout=30) is None
        assert next_worker.pid != setter.pid
    assert "POOLKIT_TEST_LEAK" not in os.environ


def test_the_templates_rehearsal_leaves_no_trace() -> None:
    """Every fork template runs the worker's job path once on a no-op (``worker.rehearse``)
    before it forks later workers; what those workers inherit must be as if it never ran."""
    from poolkit.worker import rehearse

    environ = dict(os.environ)
    fds = sorted(os.listdir("/proc/self/fd"))
    rehearse(rounds=2)
    assert dict(os.environ) == environ
    assert os.environ.get("POOLKIT_JOB_ID") is None
    assert sorted(os.listdir("/proc/self/fd")) == fds
    assert poolkit.current_job() is None
