"""Job functions for the engine, reliability and fault-matrix tests.

They live in an importable module so that every start method (``spawn``
included) finds them by reference, and so that a test's job is plain code a
reader can check. Jobs that must be observed from outside while they run
(to be killed, for instance) write their pid to a file in one ``write``
ending in a newline; the test waits for that file, never for a guessed delay.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------- plain jobs


def square(x: int) -> int:
    return x * x


def add(a: Any, b: Any) -> Any:
    return a + b


def identity(x: Any) -> Any:
    return x


def getpid(_: Any = None) -> int:
    return os.getpid()


def value_and_pid(x: Any) -> tuple[Any, int]:
    return x, os.getpid()


def sleep_then(seconds: float, value: Any = None) -> Any:
    """A job that *is* long-running: sleeping is its work, not a synchronisation."""
    time.sleep(seconds)
    return value


def length(data: bytes) -> int:
    return len(data)


def echo_kwargs(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def write_text(path: str, text: str) -> str:
    """Write ``text + "\\n"`` to ``path`` in one write (tests read the newline as "complete")."""
    write_line(path, text)
    return text


def write_line(path: str | Path, text: str) -> None:
    """Write ``path`` atomically. The half-written file is a dot file, so that a test's
    ``glob("init-*")`` never sees it while another worker is still writing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(f"{text}\n")
    os.replace(tmp, path)


def write_pid_then_sleep(path: str, seconds: float = 60.0) -> int:
    """Announce this worker's pid in ``path``, then run for ``seconds`` (to be killed meanwhile)."""
    write_line(path, str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def wait_for_file_then(path: str, value: Any = None, timeout: float = 60.0) -> Any:
    """Block until the test creates ``path`` (a go signal), then return ``value``."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)
    return value


def started_then_wait(started: str, go: str, value: Any = None) -> Any:
    """Say "started" (with the pid) in one file, then wait for the test's go file."""
    write_line(started, str(os.getpid()))
    return wait_for_file_then(go, value)


def env_var(name: str) -> str | None:
    return os.environ.get(name)


def set_env_var(name: str, value: str) -> str | None:
    """A job that sets a variable in its worker's environment (and leaks it, if nothing cleans up)."""
    os.environ[name] = value
    return os.environ.get(name)


# ----------------------------------------------------------------- failing jobs


class JobError(ValueError):
    """The error the failing jobs raise: a ValueError subclass with a recognisable name."""


def raise_value_error(message: str = "bad value") -> None:
    raise ValueError(message)


def raise_job_error(message: str = "job failed") -> None:
    raise JobError(message)  # the remote traceback must show this line


def raise_system_exit(code: int = 3) -> None:
    sys.exit(code)


def crash_exit(code: int = 7) -> None:
    """Leave the worker without a word: the pool sees a worker that died."""
    os._exit(code)


def segfault() -> None:
    ctypes.string_at(0)


def kill_self(sig: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(30)  # SIGSTOP and friends: wait here to be dealt with


def square_or_crash(x: int, crash_at: tuple[int, ...] = (), how: str = "exit") -> int:
    """``x * x``, except for the inputs in ``crash_at``, which segfault or ``os._exit(9)``."""
    if x in crash_at:
        if how == "segfault":
            segfault()
        os._exit(9)
    return x * x


def return_lock() -> threading.Lock:
    """A result that cannot be pickled in the worker (a lock)."""
    return threading.Lock()


def return_generator(n: int) -> Any:
    return (i for i in range(n))


def recurse(n: int = 0) -> int:
    return recurse(n + 1) + 1


# ----------------------------------------------------------------- objects that misbehave when pickled


def _explode_on_load(message: str) -> None:
    raise ValueError(f"cannot load: {message}")


class UnloadableResult:
    """Pickles fine in the worker; loading it (in the parent) raises ValueError."""

    def __init__(self, message: str = "unloadable") -> None:
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return _explode_on_load, (self.message,)


class UnpicklableArg:
    """An argument whose pickling raises in the caller (``__reduce__`` raises)."""

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("UnpicklableArg refuses to be pickled")


class UnloadableArg:
    """An argument that pickles in the caller but fails to load in the worker."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _explode_on_load, ("argument",)


def return_unloadable(message: str = "unloadable") -> UnloadableResult:
    return UnloadableResult(message)


# ----------------------------------------------------------------- grandchildren


def spawn_grandchild(pid_path: str, then_sleep: float = 0.0) -> int:
    """Start ``sleep 60`` as a child of the worker, record its pid, then optionally run on."""
    child = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    write_line(pid_path, str(child.pid))
    if then_sleep:
        time.sleep(then_sleep)
    return child.pid


def nested_submit(x: int) -> Any:
    """Submit to a pool from inside a job: the worker has no pool of its own."""
    import poolkit

    with poolkit.Pool(1) as inner:
        return inner.submit(square, x).result(timeout=30)


# ----------------------------------------------------------------- initializers and finalizers


def init_write_pid(directory: str) -> None:
    write_line(Path(directory) / f"init-{os.getpid()}", str(os.getpid()))


def init_fail(message: str = "initializer says no") -> None:
    raise RuntimeError(message)


def init_count_then_fail(directory: str) -> None:
    """An initializer that always fails, and leaves one file per attempt (to count respawns)."""
    write_line(Path(directory) / f"attempt-{os.getpid()}", str(os.getpid()))
    raise RuntimeError("initializer always fails")


def init_crash(code: int = 5) -> None:
    os._exit(code)


def fin_write_pid(directory: str) -> None:
    write_line(Path(directory) / f"fin-{os.getpid()}", str(os.getpid()))


# ----------------------------------------------------------------- the fault matrix

#: The faults of the matrix (issue 7): what goes wrong.
FAULTS = (
    "exception",
    "sys_exit",
    "os_exit",
    "segfault",
    "sigkill_outside",
    "sigterm_outside",
    "sigstop_timeout",
    "fork_children",
    "close_stdio",
    "setsid",
    "recursion",
    "alloc_2gb",
)


def _claim_once(directory: str, tag: str) -> bool:
    """True for the first caller across all workers (an O_EXCL marker file), False afterwards."""
    try:
        fd = os.open(os.path.join(directory, f"once-{tag}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def do_fault(what: str, directory: str, tag: str = "fault", *, once: bool = True) -> str:
    """Make ``what`` happen in this process; return ``"no fault"`` if it happened already (``once``).

    Faults "from outside" (SIGKILL, SIGTERM) write ``<directory>/pid-<tag>`` and
    wait to be killed by the test. ``fork_children`` leaves a ``sleep 60``
    grandchild (its pid in ``<directory>/grandchild-<tag>``) and carries on.
    """
    if once and not _claim_once(directory, tag):
        return "no fault"
    if what == "exception":
        raise JobError(f"fault {tag}")
    if what == "sys_exit":
        sys.exit(3)
    if what == "os_exit":
        os._exit(7)
    if what == "segfault":
        segfault()
    if what in ("sigkill_outside", "sigterm_outside"):
        write_line(os.path.join(directory, f"pid-{tag}"), str(os.getpid()))
        time.sleep(120)
        return "not killed"
    if what == "sigstop_timeout":
        os.kill(os.getpid(), signal.SIGSTOP)
        return "continued"
    if what == "fork_children":
        spawn_grandchild(os.path.join(directory, f"grandchild-{tag}"))
        return "forked"
    if what == "close_stdio":
        for fd in (0, 1, 2):
            os.close(fd)
        return "closed"
    if what == "setsid":
        os.setsid()
        return "setsid"
    if what == "recursion":
        recurse()
    if what == "alloc_2gb":
        chunks = []
        for _ in range(128):  # 128 x 16 MiB, touched, so RSS really grows
            chunks.append(bytearray(16 * 1024 * 1024))
            chunks[-1][::4096] = b"\1" * (len(chunks[-1]) // 4096)
        return f"allocated {len(chunks) * 16} MiB"
    raise AssertionError(f"unknown fault {what!r}")


class FaultOnLoad:
    """A job argument whose loading (in the worker) makes the fault happen."""

    def __init__(self, what: str, directory: str) -> None:
        self.what, self.directory = what, directory

    def __reduce__(self) -> tuple[Any, ...]:
        return do_fault, (self.what, self.directory, "load")


class FaultOnDump:
    """A job result whose pickling (in the worker) makes the fault happen."""

    def __init__(self, what: str, directory: str) -> None:
        self.what, self.directory = what, directory

    def __reduce__(self) -> tuple[Any, ...]:
        do_fault(self.what, self.directory, "dump")
        return str, ("dumped",)


def take_arg(arg: Any) -> str:
    return f"ran with {arg!r}"


def fault_in_job(what: str, directory: str) -> str:
    return do_fault(what, directory, "run")


def fault_in_result(what: str, directory: str) -> FaultOnDump:
    return FaultOnDump(what, directory)


def fault_after_load(what: str, directory: str) -> FaultOnLoad:
    """Return an object whose loading *in the parent* makes the fault happen."""
    return FaultOnLoad(what, directory)


def fault_init(what: str, directory: str) -> None:
    do_fault(what, directory, "init")


def fault_fin(what: str, directory: str) -> None:
    do_fault(what, directory, "fin")


def fault_after_go(what: str, directory: str, go: str) -> str:
    """Say "started", wait for the test's go file (it arrives during shutdown), then fault."""
    write_line(os.path.join(directory, "started-shutdown"), str(os.getpid()))
    wait_for_file_then(go)
    return do_fault(what, directory, "shutdown")


def square_or_raise(x: int) -> int:
    if x == 4:
        raise ValueError(f"{x} is unlucky")
    return x * x


def sleep_then_write(seconds: float, path: str, text: str) -> str:
    """A job that takes a while, then leaves a file: proof that it ran to the end."""
    time.sleep(seconds)
    write_line(path, text)
    return text


def spawn_grandchild_then_crash(pid_path: str) -> None:
    spawn_grandchild(pid_path)
    os._exit(11)


def poolkit_env() -> dict[str, str | None]:
    """The per-job variables a job (and the programs it starts) see."""
    return {
        name: os.environ.get(name)
        for name in ("POOLKIT_JOB_ID", "POOLKIT_JOB_TYPE", "POOLKIT_WORKER_ID")
    }


def report_then(values: list[Any]) -> int:
    """Report each value as progress, then return how many there were."""
    import poolkit

    for value in values:
        poolkit.report_progress(value)
    return len(values)


def note_sigterm_then_sleep(started: str, stopped: str, seconds: float = 60.0) -> None:
    """Write ``started``; on SIGTERM write the monotonic time to ``stopped`` and exit; else sleep."""

    def on_term(signum: int, frame: Any) -> None:
        write_line(stopped, repr(time.monotonic()))
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    write_line(started, "started")
    time.sleep(seconds)


def grow_then_sleep(started: str, mib: int, seconds: float = 60.0) -> int:
    """Write ``started``, allocate and touch ``mib`` MiB as fast as possible, then sleep holding it."""
    write_line(started, "started")
    blocks = [bytearray(16 << 20) for _ in range(mib // 16)]
    time.sleep(seconds)
    return len(blocks)


def value_and_pid_and_parent(x: Any) -> tuple[Any, int]:
    """``x`` and the pid of this worker's parent (its template)."""
    return x, os.getppid()


_KEPT: Any = None


def init_keep(value: Any) -> None:
    """Initializer: keep ``value`` for later jobs of this worker."""
    global _KEPT
    _KEPT = value


def kept_type_name() -> str:
    """The type name of what ``init_keep`` kept."""
    return type(_KEPT).__name__


class Token:
    """A result object a test can hold a weak reference to."""

    def __init__(self, n: int) -> None:
        self.n = n


def make_token(n: int) -> Token:
    return Token(n)


class UnpicklableError(Exception):
    """An exception that carries a lock, so it cannot be pickled back."""

    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def raise_unpicklable() -> None:
    raise UnpicklableError()


def put_in_queue(queue: Any, value: Any) -> Any:
    queue.put(value)
    return value


_QUEUE: Any = None


def init_queue(queue: Any, lock: Any) -> None:
    """Initializer: keep a multiprocessing queue (and take its lock once) for later jobs."""
    global _QUEUE
    _QUEUE = queue
    with lock:
        pass


def put_via_initializer_queue(value: Any) -> Any:
    _QUEUE.put((value, os.getpid()))
    return value


def set_in_proxy(mapping: Any, key: str) -> int:
    mapping[key] = os.getpid()
    return int(mapping[key])


def add_to_kept_value(n: int) -> int:
    """Add ``n`` to the multiprocessing Value that ``init_keep`` kept; return the new total."""
    with _KEPT.get_lock():
        _KEPT.value += n
        return int(_KEPT.value)


def set_kept_event() -> bool:
    """Set the multiprocessing Event that ``init_keep`` kept."""
    _KEPT.set()
    return True


def square_or_crash_once(x: int, directory: str) -> int:
    """``x * x``; input 3 kills its worker the first time it runs, input 7 always raises."""
    if x == 3 and _claim_once(directory, "crash-3"):
        os._exit(9)
    if x == 7:
        raise ValueError("seven")
    return x * x


def fail_at(x: int, bad: int) -> int:
    """``x``, except that input ``bad`` raises ValueError."""
    if x == bad:
        raise ValueError(f"input {x} is bad")
    return x


def report_after(go: str, values: list[Any], timeout: float = 60.0) -> int:
    """Wait for the file ``go`` (the caller's callbacks are in place), then ``report_then(values)``."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{go} never appeared")
        time.sleep(0.005)
    return report_then(values)


# ----------------------------------------------------------------- holding the pool's manager

MANAGER_HELD = threading.Event()  # set in the caller's process while the manager thread is held
MANAGER_GO = threading.Event()  # set by the test to let it go


def _hold_the_manager(value: Any) -> Any:
    """Runs where the result is unpickled: the pool's manager thread, in the caller's process."""
    MANAGER_HELD.set()
    MANAGER_GO.wait(30)
    return value


class HeldOnArrival:
    """A result whose unpickling holds the manager thread until ``MANAGER_GO`` is set.

    While it is held, jobs the test submits wait in the manager's inbox, and
    the manager takes them all in one pass: a batch, without guessing a delay.
    """

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return (_hold_the_manager, (self.value,))


def held_on_arrival(value: Any) -> HeldOnArrival:
    return HeldOnArrival(value)
