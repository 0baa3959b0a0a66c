"""What one job leaves in its worker process must not reach the next job on that worker.

A worker runs its jobs one after another in one process. After each job it
puts back what is cheap to put back (docs/concepts.md, "What a job leaves for
the next one"): interval timers, the dispositions of common signals, the
working directory, the umask, ``sys.path`` and ``os.environ``, all as they
were after the initializer ran. Threads cannot be stopped, so progress a
thread left over from an earlier job reports is dropped instead.

Every test uses ``Pool(1)``, so consecutive jobs share a worker, and checks
that they did (same pid).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import isolation_jobs as jobs
import pytest
from conftest import START_METHODS, python_env, wait_for_file, wait_until

import poolkit
from poolkit.worker import rehearse

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _environment_to_restore(monkeypatch: pytest.MonkeyPatch) -> None:
    """Variables in the workers' baseline environment that the "environ" change alters or removes."""
    monkeypatch.setenv("POOLKIT_TEST_CHANGED", "as the worker started")
    monkeypatch.setenv("POOLKIT_TEST_REMOVED", "as the worker started")
    monkeypatch.delenv(jobs.VARIABLE, raising=False)


def _before_change_after(
    pool: poolkit.Pool, what: str, directory: Path, observed: str | None = None
) -> tuple[object, object]:
    """Observe, let a job change ``what``, observe again: the two observations, all in one worker."""
    observed = what if observed is None else observed
    pid, before = pool.submit(jobs.observe, observed).result(timeout=30)
    assert pool.submit(jobs.change, what, str(directory)).result(timeout=30) == pid
    pid_after, after = pool.submit(jobs.observe, observed).result(timeout=30)
    assert pid_after == pid, "the three jobs must run in one worker"
    return before, after


@pytest.mark.parametrize(
    ("what", "observed"),
    [
        ("timers", "timers"),
        ("signals", "signals"),
        ("cwd", "cwd"),
        ("umask", "umask"),
        ("sys.path", "sys.path"),
        ("sys.path rebound", "sys.path"),
        ("environ", "environ"),
    ],
)
def test_the_next_job_sees_the_workers_state_not_the_last_jobs(
    what: str, observed: str, tmp_path: Path
) -> None:
    with poolkit.Pool(1) as pool:
        before, after = _before_change_after(pool, what, tmp_path, observed)
    assert after == before


@pytest.mark.parametrize("start_method", START_METHODS)
def test_every_reset_with_every_start_method(start_method: str, tmp_path: Path) -> None:
    with poolkit.Pool(1, start_method=start_method) as pool:
        before, after = _before_change_after(pool, "all", tmp_path)
    assert after == before


def test_a_change_is_seen_by_the_job_that_made_it(tmp_path: Path) -> None:
    """The reset is between jobs, never inside one (and the observations above do see a change)."""
    with poolkit.Pool(1) as pool:
        pid, before = pool.submit(jobs.observe, "all").result(timeout=30)
        pid_job, during = pool.submit(jobs.change_then_observe, str(tmp_path)).result(timeout=30)
    assert pid_job == pid
    for kind in jobs.KINDS:
        assert during[kind] != before[kind], kind


@pytest.mark.parametrize("start_method", START_METHODS)
def test_an_alarm_a_job_left_armed_does_not_kill_the_next_job(start_method: str) -> None:
    """The reported bug: ``signal.alarm(1)`` in one job killed the next job (WorkerCrashed, SIGALRM)."""
    with poolkit.Pool(1, start_method=start_method) as pool:
        pid, fires_at = pool.submit(jobs.arm_alarm, 1).result(timeout=30)
        # Running past the moment the alarm was due is this job's work.
        assert pool.submit(jobs.sleep_until, fires_at, 0.5).result(timeout=30) == pid


@pytest.mark.parametrize("which", ["ITIMER_VIRTUAL", "ITIMER_PROF"])
def test_a_cpu_timer_a_job_left_armed_does_not_kill_the_next_job(which: str) -> None:
    with poolkit.Pool(1) as pool:
        pid, cpu_armed = pool.submit(jobs.arm_cpu_timer, which, 0.05).result(timeout=30)
        assert pool.submit(jobs.burn_cpu_until, cpu_armed + 0.25).result(timeout=30) == pid


def test_the_initializers_settings_are_the_baseline(tmp_path: Path) -> None:
    """What the initializer set is what every job starts from, not what the first job found."""
    home = tmp_path / "initializer"
    home.mkdir()
    with poolkit.Pool(
        1, initializer=jobs.initializer_sets_state, initargs=(str(home),)
    ) as pool:
        pid, before = pool.submit(jobs.observe, "all").result(timeout=30)
        assert pool.submit(jobs.change, "all", str(tmp_path)).result(timeout=30) == pid
        pid_after, after = pool.submit(jobs.observe, "all").result(timeout=30)
    assert pid_after == pid
    assert before["cwd"] == str(home)
    assert before["umask"] == 0o007
    assert before["sys.path"][0] == str(home)
    assert before["environ"][jobs.VARIABLE] == "from the initializer"
    assert before["signals"]["SIGUSR1"] == "SIG_IGN"
    assert before["signals"]["SIGTERM"] == "isolation_jobs._on_signal"
    assert after == before


def test_progress_from_a_thread_an_earlier_job_left_running_is_dropped(tmp_path: Path) -> None:
    """A leftover thread keeps running (nothing can stop it), but its progress is no later job's."""
    with poolkit.Pool(1) as pool:
        first = pool.submit(jobs.leave_reporting_thread, str(tmp_path))
        pid = first.result(timeout=30)
        second = pool.submit(jobs.report_then_wait, str(tmp_path), "from the job itself")
        wait_for_file(tmp_path / "job-reported")
        wait_until(lambda: second.progress == "from the job itself", what="the job's own progress")
        # Now the first job's thread reports, while the second job runs.
        (tmp_path / "thread-go").touch()
        assert int(wait_for_file(tmp_path / "thread-reported")) == pid
        # The RESULT frame follows any progress the thread sent: once the
        # result is in, that progress has been seen.
        (tmp_path / "job-go").touch()
        assert second.result(timeout=30) == pid
        assert second.progress == "from the job itself"


def test_a_thread_the_job_starts_reports_progress(tmp_path: Path) -> None:
    """Only threads that outlived an earlier job are muted, even after one did."""
    with poolkit.Pool(1) as pool:
        pid = pool.submit(jobs.leave_reporting_thread, str(tmp_path)).result(timeout=30)
        future = pool.submit(jobs.report_from_own_thread, "from the job's thread")
        assert future.result(timeout=30) == pid
        assert future.progress == "from the job's thread"
        (tmp_path / "thread-go").touch()  # let the leftover thread finish
        wait_for_file(tmp_path / "thread-reported")


def test_the_rehearsal_leaves_armed_timers_and_handlers_alone() -> None:
    """The template rehearses the job path, reset included, before it forks workers; in a
    process with its own timer and handlers (here: the test's) it must put back nothing."""
    previous = signal.signal(signal.SIGUSR1, jobs._on_signal)
    signal.setitimer(signal.ITIMER_VIRTUAL, 1000.0)
    cwd, path, environ = os.getcwd(), list(sys.path), dict(os.environ)
    try:
        rehearse(rounds=2)
        assert signal.getitimer(signal.ITIMER_VIRTUAL)[0] > 0
        assert signal.getsignal(signal.SIGUSR1) is jobs._on_signal
        assert (os.getcwd(), sys.path, dict(os.environ)) == (cwd, path, environ)
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGUSR1, previous)


_STDIN_SCRIPT = """
import os, sys
import poolkit

def read_stdin(_):
    return sys.stdin.read(5), os.read(0, 5)

if __name__ == "__main__":
    with poolkit.Pool(1, start_method=sys.argv[1]) as pool:
        print(repr(pool.submit(read_stdin, 0).result(timeout=60)))
    print(repr(sys.stdin.read()))
"""


@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_job_reads_end_of_file_from_stdin_and_the_caller_keeps_its_input(
    tmp_path: Path, start_method: str
) -> None:
    script = tmp_path / "stdin_script.py"
    script.write_text(_STDIN_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), start_method],
        input="parent-data\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=python_env(),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["('', b'')", "'parent-data\\n'"]
