"""Job functions for tests/test_job_isolation.py: jobs that change their worker's process state.

They live in an importable module so that every start method, ``spawn``
included, runs them by reference. Each "change" job alters one kind of
process state and returns; each "observe" job returns what the worker looks
like now, as plain picklable values, with the worker's pid so that a test can
check that two jobs ran in the same process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import poolkit

SIGNALS = ("SIGHUP", "SIGINT", "SIGTERM", "SIGALRM", "SIGUSR1", "SIGUSR2", "SIGPIPE", "SIGCHLD")
TIMERS = ("ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF")
VARIABLE = "POOLKIT_TEST_ISOLATION"  # a variable no job should ever see unless its own set it


def _on_signal(signum: int, frame: Any) -> None:
    """A handler a job installs (it never has to run)."""


def _handler_name(handler: Any) -> str:
    if handler is None:
        return "None"
    if isinstance(handler, int):
        return signal.Handlers(handler).name
    return f"{handler.__module__}.{handler.__qualname__}"


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def observe(what: str) -> tuple[int, Any]:
    """(pid, the worker's state of kind ``what``) as the job sees it."""
    seen: Any
    if what == "timers":
        seen = {name: signal.getitimer(getattr(signal, name)) for name in TIMERS}
    elif what == "signals":
        seen = {name: _handler_name(signal.getsignal(getattr(signal, name))) for name in SIGNALS}
    elif what == "cwd":
        seen = os.getcwd()
    elif what == "umask":
        seen = _umask()
    elif what == "sys.path":
        seen = list(sys.path)
    elif what == "environ":
        seen = {k: v for k, v in os.environ.items() if not k.startswith("POOLKIT_JOB")}
    elif what == "all":
        seen = {kind: observe(kind)[1] for kind in KINDS}
    else:
        raise ValueError(what)
    return os.getpid(), seen


def change(what: str, directory: str) -> int:
    """Change the worker's state of kind ``what`` (``directory``: a scratch directory), and return the pid."""
    if what == "timers":
        signal.alarm(1000)
        signal.setitimer(signal.ITIMER_VIRTUAL, 1000.0)
        signal.setitimer(signal.ITIMER_PROF, 1000.0)
    elif what == "signals":
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGALRM, _on_signal)
        signal.signal(signal.SIGUSR2, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGCHLD, _on_signal)
        # Python ignores SIGPIPE at start-up; a job that wants the default back
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    elif what == "cwd":
        os.chdir(directory)
    elif what == "umask":
        os.umask(0o077 if _umask() != 0o077 else 0o027)
    elif what == "sys.path":
        sys.path.append(directory)
        sys.path.pop(0)
    elif what == "sys.path rebound":
        sys.path = [directory]
    elif what == "environ":
        os.environ[VARIABLE] = "1"
        os.environ["POOLKIT_TEST_CHANGED"] = "by the job"
        os.environ.pop("POOLKIT_TEST_REMOVED", None)
    elif what == "all":
        for kind in KINDS:
            change(kind, directory)
    else:
        raise ValueError(what)
    return os.getpid()


KINDS = ("timers", "signals", "cwd", "umask", "sys.path", "environ")


def change_then_observe(directory: str) -> tuple[int, Any]:
    """Change everything, then observe it, in one job."""
    change("all", directory)
    return observe("all")


def initializer_sets_state(directory: str) -> None:
    """An initializer that changes what the per-job reset puts back: its settings are the baseline."""
    os.chdir(directory)
    os.umask(0o007)
    sys.path.insert(0, directory)
    os.environ[VARIABLE] = "from the initializer"
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_signal)


# ----------------------------------------------------------------- timers that fire


def arm_alarm(seconds: int) -> tuple[int, float]:
    """Arm ``signal.alarm`` (default action: kill the process) and return: (pid, when it fires)."""
    signal.alarm(seconds)
    return os.getpid(), time.monotonic() + seconds


def sleep_until(when: float, margin: float) -> int:
    """Run until ``margin`` seconds past the monotonic time ``when`` (outliving an alarm is the job's work)."""
    time.sleep(max(0.0, when - time.monotonic()) + margin)
    return os.getpid()


def arm_cpu_timer(which: str, seconds: float) -> tuple[int, float]:
    """Arm a CPU-time timer (default action of its signal: kill) and return (pid, CPU time when armed)."""
    signal.setitimer(getattr(signal, which), seconds)
    return os.getpid(), time.process_time()


def burn_cpu_until(cpu_time: float) -> int:
    """Spin until this process has used ``cpu_time`` seconds of CPU."""
    while time.process_time() < cpu_time:
        pass
    return os.getpid()


# ----------------------------------------------------------------- threads and progress


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{text}\n")
    os.replace(tmp, path)


def _report_on_go(directory: Path, value: Any) -> None:
    _wait_for(directory / "thread-go", 60.0)
    poolkit.report_progress(value)
    _write(directory / "thread-reported", str(os.getpid()))


def leave_reporting_thread(directory: str) -> int:
    """Start a thread that reports progress once the test says go, and return at once (the thread outlives the job)."""
    thread = threading.Thread(
        target=_report_on_go, args=(Path(directory), "from a thread of an earlier job"), daemon=True
    )
    thread.start()
    return os.getpid()


def report_then_wait(directory: str, value: Any) -> int:
    """Report ``value`` from the job's own (main) thread, say so in a file, then wait for the test's go."""
    poolkit.report_progress(value)
    _write(Path(directory) / "job-reported", str(os.getpid()))
    _wait_for(Path(directory) / "job-go", 60.0)
    return os.getpid()


def report_from_own_thread(value: Any) -> int:
    """Report ``value`` from a thread this job starts and joins."""
    thread = threading.Thread(target=poolkit.report_progress, args=(value,))
    thread.start()
    thread.join()
    return os.getpid()
