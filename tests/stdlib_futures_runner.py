"""Run CPython's own ``test.test_concurrent_futures`` against ``poolkit.ProcessPoolExecutor``.

This script runs in a *child* interpreter, one that has the standard
library's test package (``Lib/test``) installed; ``tests/test_stdlib_futures.py``
finds such an interpreter, gives it poolkit and its dependencies, starts this
script once per start method and turns each line it writes into one pytest
test. It must run on every Python poolkit supports (3.10-3.13), so it uses
nothing newer than 3.10 and imports nothing but the standard library and
poolkit.

How poolkit takes the standard library's place, with no test edited:

* the three process-pool mixins of the test package (``ProcessPoolForkMixin``,
  ``ProcessPoolForkserverMixin``, ``ProcessPoolSpawnMixin``) get
  ``executor_type = poolkit.ProcessPoolExecutor``; their ``get_context()`` is
  kept, so every executor is built with ``mp_context=multiprocessing.get_context(M)``;
* ``concurrent.futures.ProcessPoolExecutor`` itself is poolkit's, so the
  tests that write ``futures.ProcessPoolExecutor(...)`` directly, and the
  check ``self.executor_type == futures.ProcessPoolExecutor``, see poolkit;
* the scripts that ``test_shutdown`` runs in a fresh interpreter
  (``assert_python_ok('-c', ...)``, which passes ``-I``) start with a few
  lines that make ``from concurrent.futures import ProcessPoolExecutor``
  import poolkit's, *lazily*, at the point where the script imports it, so
  the order of ``atexit`` handlers is what a user's one-line change gives.

Two bounds keep a hang from costing the whole run, and are the only changes
to the tests' own numbers: ``ExecutorDeadlockTest.TIMEOUT`` (the wait for a
crashed job's future; ``support.LONG_TIMEOUT``, 5 minutes, upstream) is
``DEADLOCK_TIMEOUT``, and each test runs under a watchdog
(``faulthandler.dump_traceback_later(exit=True)``); a test that passes it is
reported as hung, with every thread's stack, and the parent starts this script
again for the tests after it.

Usage::

    python stdlib_futures_runner.py list
    python stdlib_futures_runner.py run START_METHOD RESULTS.jsonl [--watchdog S] [NAME ...]

``list`` prints a JSON list of ``[start_method, name]``. ``run`` appends one
JSON object per line to RESULTS.jsonl: ``{"event": "start", "name": ...}``
before a test, ``{"event": "end", "name": ..., "outcome": ..., ...}`` after
it, and ``{"event": "done"}`` once the module fixtures have run too (the
watchdog covers them as well). A test's *name* is its class without the start method, a dot, and
its method: ``ProcessPoolExecutorTest.test_killed_child`` (the class
``ProcessPoolForkProcessPoolExecutorTest`` under ``fork``); the same on every
Python version.
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import os
import pkgutil
import signal
import sys
import threading
import time
import traceback
import unittest

START_METHODS = ("fork", "forkserver", "spawn")
# Class-name prefixes that create_executor_tests() gives each start method, longest first.
_PREFIXES = (
    ("ProcessPoolForkserver", "forkserver"),
    ("ProcessPoolSpawn", "spawn"),
    ("ProcessPoolFork", "fork"),
)
# Tests outside the per-start-method classes that exercise a process pool:
# (class, method) -> the start method they use.
_EXTRA = {
    # test_init (3.12+): a failing initializer leaks nothing to the resource tracker.
    ("FailingInitializerResourcesTest", "test_spawn"): "spawn",
    ("FailingInitializerResourcesTest", "test_forkserver"): "forkserver",
    # test_thread_pool: bpo-45021, forking a process pool while a thread pool is busy.
    ("ThreadPoolExecutorTest", "test_hang_global_shutdown_lock"): "fork",
}
DEADLOCK_TIMEOUT = 30.0
FIXTURES = (
    "(module fixtures)"  # the name under which setUpModule/tearDownModule errors are reported
)

# Prepended to every script that test_shutdown runs with assert_python_ok().
_PRELUDE = """\
def _poolkit_prelude():
    import sys
    sys.path[:0] = {paths!r}
    import concurrent.futures as cf
    original = cf.__getattr__
    def __getattr__(name):
        if name == "ProcessPoolExecutor":
            from poolkit import ProcessPoolExecutor
            cf.ProcessPoolExecutor = ProcessPoolExecutor
            return ProcessPoolExecutor
        return original(name)
    cf.__getattr__ = __getattr__
_poolkit_prelude()
del _poolkit_prelude
"""


def stdlib_modules() -> list:
    """The test package's modules: one module up to 3.11, a package of modules from 3.12."""
    package = importlib.import_module("test.test_concurrent_futures")
    if not hasattr(package, "__path__"):
        return [package]
    names = sorted(
        info.name
        for info in pkgutil.iter_modules(package.__path__)
        if info.name.startswith("test_")
    )
    return [importlib.import_module(f"{package.__name__}.{name}") for name in names]


def _util_module(modules: list):
    """The module that defines the executor mixins (``util`` in the package, else the module)."""
    for module in modules:
        if hasattr(module, "ProcessPoolForkMixin"):
            return sys.modules[module.ProcessPoolForkMixin.__module__]
    raise RuntimeError("no ProcessPoolForkMixin in test.test_concurrent_futures")


def name_of(test: unittest.TestCase) -> tuple[str, str] | None:
    """(start method, name) of a test that exercises a process pool, else None."""
    cls = type(test).__name__
    method = test._testMethodName
    for prefix, start_method in _PREFIXES:
        if cls.startswith(prefix) and cls != prefix + "Mixin":
            return start_method, f"{cls[len(prefix) :]}.{method}"
    start_method = _EXTRA.get((cls, method))
    if start_method is not None:
        return start_method, f"{cls}.{method}"
    return None


def _flatten(suite) -> list:
    out = []
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            out.extend(_flatten(item))
        else:
            out.append(item)
    return out


def selected_tests(modules: list) -> list[tuple[str, str, unittest.TestCase]]:
    loader = unittest.TestLoader()
    found = []
    for module in modules:
        # loadTestsFromModule would call the package's load_tests(); take the classes directly.
        for name in dir(module):
            obj = getattr(module, name)
            if not (isinstance(obj, type) and issubclass(obj, unittest.TestCase)):
                continue
            if obj.__module__ != module.__name__:
                continue  # imported from elsewhere
            for test in _flatten(loader.loadTestsFromTestCase(obj)):
                named = name_of(test)
                if named is not None:
                    found.append((named[0], named[1], test))
    found.sort(key=lambda item: (type(item[2]).__module__, item[1]))
    return found


def install_poolkit(modules: list, repo_paths: list[str]) -> None:
    """Make poolkit's executor the one every process-pool test uses (see the module docstring)."""
    import concurrent.futures

    import poolkit

    util = _util_module(modules)
    for mixin in ("ProcessPoolForkMixin", "ProcessPoolForkserverMixin", "ProcessPoolSpawnMixin"):
        getattr(util, mixin).executor_type = poolkit.ProcessPoolExecutor
    concurrent.futures.ProcessPoolExecutor = poolkit.ProcessPoolExecutor
    prelude = _PRELUDE.format(paths=repo_paths)
    for module in modules:
        original = getattr(module, "assert_python_ok", None)
        if original is not None:
            module.assert_python_ok = _with_prelude(original, prelude)
        deadlock = getattr(module, "ExecutorDeadlockTest", None)
        if deadlock is not None:
            deadlock.TIMEOUT = min(deadlock.TIMEOUT, DEADLOCK_TIMEOUT)


def _with_prelude(assert_python_ok, prelude: str):
    def patched(*args, **env_vars):
        args = list(args)
        if "-c" in args:
            i = args.index("-c") + 1
            args[i] = prelude + args[i]
        return assert_python_ok(*args, **env_vars)

    return patched


# The process's own stderr, kept: some tests replace sys.stderr with a StringIO
# (test_deadlock's _raise_error_ignore_stderr, in whichever process unpickles it),
# which has no file descriptor for faulthandler.
_STDERR = sys.__stderr__


def _arm(seconds: float) -> None:
    faulthandler.dump_traceback_later(seconds, exit=True, file=_STDERR)


class StreamingResult(unittest.TestResult):
    """Writes a line per test as it starts and ends, so a hang or a crash loses nothing before it."""

    def __init__(self, out, names: dict, watchdog: float) -> None:
        super().__init__()
        self._out = out
        self._names = names
        self._watchdog = watchdog
        self._current: dict | None = None

    def _write(self, record: dict) -> None:
        self._out.write(json.dumps(record) + "\n")
        self._out.flush()

    def _text(self, err) -> str:
        return "".join(traceback.format_exception(*err))

    def startTest(self, test) -> None:
        super().startTest(test)
        name = self._names[id(test)]
        self._current = {"name": name, "outcome": "passed", "detail": "", "t0": time.monotonic()}
        self._write({"event": "start", "name": name})
        _STDERR.write(f"\n=== {name}\n")
        _STDERR.flush()
        _arm(self._watchdog)

    def stopTest(self, test) -> None:
        # Re-armed, not cancelled: class and module fixtures run between tests.
        _arm(self._watchdog)
        super().stopTest(test)
        current = self._current
        self._current = None
        if current is None:
            return
        duration = time.monotonic() - current.pop("t0")
        self._write({"event": "end", "duration": round(duration, 3), **current})

    def _set(self, outcome: str, detail: str) -> None:
        if self._current is None:
            return
        # The worst outcome wins: an error in tearDown after a failure keeps both texts.
        rank = ["passed", "skipped", "xfail", "xpass", "failed", "error"]
        if rank.index(outcome) >= rank.index(self._current["outcome"]):
            self._current["outcome"] = outcome
        self._current["detail"] = (self._current["detail"] + "\n" + detail).strip()

    def addError(self, test, err) -> None:
        super().addError(test, err)
        if self._current is None or not isinstance(test, unittest.TestCase):
            # setUpModule / tearDownModule / setUpClass and module cleanups
            self._write(
                {
                    "event": "end",
                    "name": FIXTURES,
                    "outcome": "error",
                    "detail": f"{test}\n{self._text(err)}",
                    "duration": 0.0,
                }
            )
            return
        self._set("error", self._text(err))

    def addFailure(self, test, err) -> None:
        super().addFailure(test, err)
        self._set("failed", self._text(err))

    def addSubTest(self, test, subtest, err) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            self._set("failed" if failed else "error", f"{subtest}\n{self._text(err)}")

    def addSkip(self, test, reason: str) -> None:
        super().addSkip(test, reason)
        self._set("skipped", reason)

    def addExpectedFailure(self, test, err) -> None:
        super().addExpectedFailure(test, err)
        self._set("xfail", self._text(err))

    def addUnexpectedSuccess(self, test) -> None:
        super().addUnexpectedSuccess(test)
        self._set("xpass", "unexpected success")


def _end_with_parent() -> None:
    """Leave no runner behind a pytest that was killed: end this process group when the parent goes.

    The parent starts this script as a session (and process-group) leader, so
    the group is this script and what it started that stayed in it.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name="runner-parent-watch", daemon=True).start()


def main(argv: list[str]) -> int:
    command = argv[0]
    modules = stdlib_modules()
    tests = selected_tests(modules)
    if command == "list":
        print(json.dumps([[start_method, name] for start_method, name, _ in tests]))
        return 0
    if command != "run":
        raise SystemExit(f"unknown command {command!r}")
    start_method, results_path, rest = argv[1], argv[2], argv[3:]
    watchdog = 120.0
    if rest[:1] == ["--watchdog"]:
        watchdog = float(rest[1])
        rest = rest[2:]
    wanted = set(rest)
    if os.getpgid(0) == os.getpid():
        _end_with_parent()
    repo_paths = [p for p in os.environ.get("POOLKIT_REPO_PATHS", "").split(os.pathsep) if p]
    sys.path[:0] = [p for p in repo_paths if p not in sys.path]
    install_poolkit(modules, repo_paths)
    suite = unittest.TestSuite()
    names = {}
    for method, name, test in tests:
        if method == start_method and (not wanted or name in wanted):
            suite.addTest(test)
            names[id(test)] = name
    with open(results_path, "a", encoding="utf-8") as out:
        result = StreamingResult(out, names, watchdog)
        _arm(watchdog)  # setUpModule runs first
        suite.run(result)
        faulthandler.cancel_dump_traceback_later()
        out.write(json.dumps({"event": "done"}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
