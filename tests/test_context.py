"""Job context: what a job knows about itself, and that it never leaks past the job.

Seen three ways: ``poolkit.current_job()``, the ``POOLKIT_*`` environment
variables, and the environment of a program the job starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import recycle_jobs as jobs
from recycle_jobs import wait_until

import poolkit

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("start_method", ["fork", "forkserver", "spawn"])
def test_job_sees_its_ids_in_context_env_and_children(start_method: str) -> None:
    with poolkit.Pool(2, start_method=start_method) as pool:
        future = pool.options(job_type="backup").submit(jobs.describe_context)
        seen = future.result(timeout=60)
    ctx = seen["context"]
    assert ctx["job_id"] == future.job_id
    assert ctx["job_type"] == "backup" == future.job_type
    assert ctx["worker_id"] == future.worker_id == future.stats.worker_id
    assert ctx["attempt"] == 1
    assert ctx["deadline_in"] is None
    assert seen["pid"] == future.pid == future.stats.pid
    assert seen["env"] == {
        "POOLKIT_JOB_ID": future.job_id,
        "POOLKIT_JOB_TYPE": "backup",
        "POOLKIT_WORKER_ID": str(future.worker_id),
    }
    assert seen["child"] == f"{future.job_id}|backup|{future.worker_id}"


def test_job_without_type_has_no_type_variable() -> None:
    with poolkit.Pool(1) as pool:
        future = pool.submit(jobs.describe_context)
        seen = future.result(timeout=30)
    assert seen["context"]["job_type"] is None
    assert "POOLKIT_JOB_TYPE" not in seen["env"]
    assert seen["child"] == f"{future.job_id}||{future.worker_id}"


def test_deadline_reflects_the_timeout() -> None:
    with poolkit.Pool(1) as pool:
        seen = pool.options(timeout=20).submit(jobs.describe_context).result(timeout=30)
    assert 0 < seen["context"]["deadline_in"] <= 20


def test_job_ids_are_unique_and_stable() -> None:
    with poolkit.Pool(2) as pool:
        futures = [pool.submit(jobs.describe_context) for _ in range(10)]
        seen = [f.result(timeout=30) for f in futures]
    ids = [f.job_id for f in futures]
    assert len(set(ids)) == 10
    assert [s["context"]["job_id"] for s in seen] == ids
    assert [s["env"]["POOLKIT_JOB_ID"] for s in seen] == ids


def test_env_vars_do_not_leak_into_the_next_job() -> None:
    with poolkit.Pool(1) as pool:
        first = pool.options(job_type="typed").submit(jobs.mess_with_env)
        second = pool.submit(jobs.poolkit_env)
        env_first = first.result(timeout=30)
        env_second = second.result(timeout=30)
        assert first.stats.pid == second.stats.pid  # same worker, one after the other
    assert env_first["POOLKIT_JOB_TYPE"] == "typed"
    assert "POOLKIT_JOB_TYPE" not in env_second
    assert env_second["POOLKIT_JOB_ID"] == second.job_id
    assert env_second["POOLKIT_JOB_ID"] != env_first["POOLKIT_JOB_ID"]


def test_no_context_outside_a_job(tmp_path: Path) -> None:
    assert poolkit.current_job() is None  # in the parent
    assert not any(k.startswith("POOLKIT_JOB") for k in os.environ)
    poolkit.report_progress(1)  # in the parent: a no-op, no error
    with poolkit.Pool(
        1,
        initializer=jobs.record_context_in_initializer,
        finalizer=jobs.write_context_in_finalizer,
        finalargs=(str(tmp_path),),
    ) as pool:
        future = pool.submit(jobs.initializer_view)
        seen = future.result(timeout=30)
        pool.submit(jobs.poolkit_env).result(timeout=30)
    assert seen == {"context": None, "env": {}}  # the initializer runs outside any job
    assert poolkit.current_job() is None
    finals = [json.loads(p.read_text()) for p in tmp_path.iterdir()]
    assert finals == [{"context": None, "env": {}}]  # the finalizer, after the last job


def test_caller_given_job_id(tmp_path: Path) -> None:
    with poolkit.Pool(1) as pool:
        future = pool.options(job_id="report-2024-06").submit(jobs.describe_context)
        seen = future.result(timeout=30)
    assert future.job_id == "report-2024-06"
    assert seen["context"]["job_id"] == "report-2024-06"
    assert seen["env"]["POOLKIT_JOB_ID"] == "report-2024-06"
    assert seen["child"].startswith("report-2024-06|")


def test_duplicate_live_job_id_is_refused_then_reusable(tmp_path: Path) -> None:
    go = tmp_path / "go"
    with poolkit.Pool(2) as pool:
        first = pool.options(job_id="x").submit(jobs.wait_for_file, str(go))
        with pytest.raises(ValueError, match="'x'"):
            pool.options(job_id="x").submit(jobs.pid_of, 1)
        other = pool.options(job_id="y").submit(jobs.pid_of, 2)  # another id is fine
        assert other.result(timeout=30)[0] == 2
        go.write_text("go")
        first.result(timeout=30)
        # once the first one has finished, the id is free again
        again = pool.options(job_id="x").submit(jobs.pid_of, 3)
        assert again.result(timeout=30)[0] == 3
        assert again.job_id == "x"


def test_caller_id_does_not_collide_with_automatic_ids(tmp_path: Path) -> None:
    with poolkit.Pool(1) as pool:
        mine = pool.options(job_id="1").submit(jobs.describe_context)
        auto = [pool.submit(jobs.describe_context) for _ in range(3)]
        seen = [f.result(timeout=30)["context"]["job_id"] for f in [mine, *auto]]
    assert seen[0] == "1"
    assert [f.job_id for f in auto] == seen[1:]


def test_retried_job_sees_its_attempt(tmp_path: Path) -> None:
    marker = tmp_path / "crashed-once"
    with poolkit.Pool(1) as pool:
        future = pool.options(retries=1, job_id="flaky").submit(
            jobs.crash_on_first_attempt, str(marker)
        )
        seen = future.result(timeout=30)
    assert seen == {"attempt": 2, "job_id": "flaky"}
    assert future.stats.attempt == 2


def test_future_knows_its_worker_once_running(tmp_path: Path) -> None:
    go = tmp_path / "go"
    with poolkit.Pool(1) as pool:
        future = pool.options(job_type="t").submit(jobs.wait_for_file, str(go))
        assert future.job_type == "t"
        wait_until(lambda: future.running() and future.pid is not None, what="the job to run")
        running_pid, running_worker = future.pid, future.worker_id
        assert isinstance(running_worker, int)
        assert future.stats is None  # not finished yet
        go.write_text("go")
        pid = future.result(timeout=30)
    assert running_pid == pid == future.stats.pid
    assert running_worker == future.stats.worker_id


def test_a_worker_does_not_grow_with_the_job_ids_it_has_seen() -> None:
    """Every job gets a new POOLKIT_JOB_ID; setting and clearing them must not leak.

    (glibc's setenv() keeps every distinct value: 64 bytes a job, about 18 MiB
    here.) The worker's own per-job steps run in a fresh interpreter, which
    the test reads the RSS of.
    """
    code = (
        "import os\n"
        "from poolkit import context\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
        "def jobs(first, n):\n"
        "    for i in range(first, first + n):\n"
        "        context.enter_job(context.JobContext(f'job-{i}', 'type', 1, 1, None), None)\n"
        "        assert os.environ['POOLKIT_JOB_ID'] == f'job-{i}'\n"
        "        context.leave_job()\n"
        "        assert 'POOLKIT_JOB_ID' not in os.environ\n"
        "jobs(0, 20_000)  # allocator warm-up\n"
        "before = rss()\n"
        "jobs(20_000, 300_000)\n"
        "print(rss() - before)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=100, check=True
    )
    growth = int(done.stdout.strip())
    assert growth < 4 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB over 300,000 job ids"
