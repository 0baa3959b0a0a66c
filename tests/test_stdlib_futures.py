"""CPython's own ``concurrent.futures`` tests, run against ``poolkit.ProcessPoolExecutor``.

The standard library ships its tests (``test.test_concurrent_futures``, in
``Lib/test`` of CPython 3.10-3.13, a package from 3.12). This module runs
their process-pool part, with poolkit's executor in the place of the
standard library's, under each start method (``fork``, ``forkserver``,
``spawn``): the executor tests, ``wait``, ``as_completed``, shutdown,
initializers, the deadlock tests and the process-pool-specific ones. The
thread-pool and ``Future``-only tests say nothing about poolkit and are left
out. ``tests/stdlib_futures_runner.py`` says how poolkit takes the standard
library's place without editing a test.

Where the tests run
    Not every Python build has ``Lib/test`` (Debian's and some pyenv builds
    leave it out), so the tests run in a *child* interpreter: this one if it
    has the test package, and any other on the machine that has it
    (``$POOLKIT_STDLIB_PYTHON``: a list of interpreters to use instead; else
    pyenv's versions and ``python3.X`` on ``$PATH``), one per minor version.
    Another interpreter gets a virtual environment of its own under pytest's
    cache directory with poolkit's dependencies from PyPI (made once, then
    reused), and poolkit from this checkout. Only where no interpreter on the
    machine has the test package is the whole module skipped, saying so.

How they are reported
    Each standard-library test under each start method and Python is one
    pytest test: ``test_stdlib[3.13-fork-ProcessPoolExecutorTest.test_map]``.
    The first one starts the runner for every (Python, start method) group,
    all at once (``$POOLKIT_STDLIB_JOBS`` caps how many run together): the
    tests mostly sleep or wait for processes, so on two cores the six groups
    of 3.10 and 3.13 take about two minutes together, against about six one
    after the other. Each test then reports its own result, with the
    standard library's traceback. A test that the standard library skips is
    skipped with its reason; one that runs past the runner's watchdog
    (``WATCHDOG``) fails with every thread's stack, and the runner starts
    again after it. The ``(module fixtures)`` test of a group fails if a
    ``setUpModule``/``tearDownModule`` or class fixture did.

Expected differences
    ``tests/stdlib_futures_differences.py`` lists, in one place, the tests
    that fail on purpose (poolkit differs deliberately, or the test reaches
    into the standard library executor's private parts) with the reason;
    they are ``xfail(strict=True)`` (but for the few whose outcome depends
    on timing), so one that starts passing fails the run until its line is
    removed. The table in
    ``docs/migration/concurrent-futures.md`` mirrors the list
    (``test_the_docs_table_mirrors_the_list``).
"""

from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from stdlib_futures_differences import DIFFERENCES, expected_difference

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
RUNNER = TESTS_DIR / "stdlib_futures_runner.py"
DOCS_PAGE = REPO_ROOT / "docs" / "migration" / "concurrent-futures.md"
START_METHODS = ("fork", "forkserver", "spawn")
FIXTURES = "(module fixtures)"  # as in the runner
WATCHDOG = 60.0  # seconds one standard-library test may take before it counts as hung
GROUP_TIMEOUT = 900.0  # seconds for all of a group's tests, restarts after hangs included
SUPPORTED = ((3, 10), (3, 11), (3, 12), (3, 13))

# The first test of a group waits for every group's run; the rest read its results.
pytestmark = pytest.mark.timeout(GROUP_TIMEOUT + 120)


# ----------------------------------------------------------------- interpreters


@dataclass(frozen=True)
class Interpreter:
    executable: str  # as it reports sys.executable
    version: str  # "3.13"
    current: bool  # the interpreter running pytest


_PROBE = (
    "import importlib.util, json, sys\n"
    "try:\n"
    "    found = importlib.util.find_spec('test.test_concurrent_futures') is not None\n"
    "except ImportError:\n"
    "    found = False\n"
    "print(json.dumps([sys.executable, '%d.%d' % sys.version_info[:2], found]))\n"
)


def _candidates() -> list[str]:
    chosen = os.environ.get("POOLKIT_STDLIB_PYTHON")
    if chosen:
        return [p for p in chosen.split(os.pathsep) if p]
    found = [sys.executable]
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found += sorted(glob.glob(os.path.join(pyenv_root, "versions", "3.*", "bin", "python3")))
    for major, minor in SUPPORTED:
        exe = shutil.which(f"python{major}.{minor}")
        if exe:
            found.append(exe)
    return found


def _probe(executable: str) -> tuple[str, str, bool] | None:
    try:
        out = subprocess.run(
            [executable, "-I", "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        exe, version, found = json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return str(exe), str(version), bool(found)


def find_interpreters() -> tuple[list[Interpreter], str]:
    """One interpreter per minor version that has the test package (this one first), and a note."""
    chosen: dict[str, Interpreter] = {}
    without: list[str] = []
    seen: set[str] = set()
    for candidate in _candidates():
        probed = _probe(candidate)
        if probed is None:
            continue
        exe, version, found = probed
        if exe in seen:
            continue
        seen.add(exe)
        current = os.path.realpath(exe) == os.path.realpath(sys.executable) or exe == sys.executable
        if tuple(int(x) for x in version.split(".")) not in SUPPORTED:
            continue
        if not found:
            without.append(f"{exe} ({version})")
        elif version not in chosen or current:
            chosen[version] = Interpreter(exe, version, current)
    note = (
        "no interpreter on this machine has CPython's test package "
        "(test.test_concurrent_futures, in Lib/test); looked at: "
        + (", ".join(without) or "none")
        + ". Set POOLKIT_STDLIB_PYTHON to one that has it."
    )
    return sorted(chosen.values(), key=lambda i: i.version), note


def _list_tests(interpreter: Interpreter) -> list[tuple[str, str]]:
    out = subprocess.run(
        [interpreter.executable, "-I", str(RUNNER), "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [(method, name) for method, name in json.loads(out)]


@dataclass(frozen=True)
class Case:
    interpreter: Interpreter
    start_method: str
    name: str

    @property
    def group(self) -> tuple[Interpreter, str]:
        return self.interpreter, self.start_method

    @property
    def id(self) -> str:
        return f"{self.interpreter.version}-{self.start_method}-{self.name}"


def _collect() -> tuple[list[Any], str]:
    interpreters, note = find_interpreters()
    params: list[Any] = []
    for interpreter in interpreters:
        listed = _list_tests(interpreter)
        for method in START_METHODS:
            names = [name for m, name in listed if m == method] + [FIXTURES]
            for name in names:
                case = Case(interpreter, method, name)
                difference = expected_difference(name, method, interpreter.version)
                marks = []
                if difference is not None:
                    marks.append(
                        pytest.mark.xfail(
                            strict=difference.strict,
                            raises=StdlibTestFailed,
                            reason=f"{difference.kind}, see tests/stdlib_futures_differences.py",
                        )
                    )
                params.append(pytest.param(case, id=case.id, marks=marks))
    return params, note


# ----------------------------------------------------------------- running


class StdlibTestFailed(AssertionError):
    """The standard library's test failed or errored (its traceback is the message)."""


class StdlibTestFailedOtherwise(AssertionError):
    """A test listed as an expected difference failed, but not with the listed failure."""


class StdlibTestHung(AssertionError):
    """The test ran past the runner's watchdog, or the runner died while it ran."""


@dataclass
class Result:
    outcome: str  # passed, failed, error, skipped, xfail, xpass, hung
    detail: str = ""
    duration: float = 0.0


def _cache_dir(config: pytest.Config) -> Path:
    cache = getattr(config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("stdlib-futures"))
    path = Path(tempfile.gettempdir()) / f"poolkit-stdlib-futures-{os.getuid()}"
    path.mkdir(exist_ok=True)
    return path


def _dependencies() -> list[str]:
    """poolkit's runtime dependencies, as pyproject.toml lists them."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: pytest brings tomli
        import tomli as tomllib
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


_venv_lock = threading.Lock()


def python_for(interpreter: Interpreter, cache: Path) -> str:
    """An executable of ``interpreter`` that can import poolkit's dependencies.

    This interpreter has them already. Another gets a virtual environment
    under pytest's cache with the dependencies from PyPI, made once and
    reused while the interpreter and the dependency list stay the same.
    poolkit itself always comes from this checkout (``PYTHONPATH`` and a
    ``.pth`` file), so the tests see the code under test, not an install.
    """
    if interpreter.current:
        return sys.executable
    deps = _dependencies()
    key = hashlib.sha256(json.dumps([interpreter.executable, deps]).encode()).hexdigest()[:12]
    venv = cache / f"venv-{interpreter.version}-{key}"
    python = venv / "bin" / "python"
    ready = venv / "poolkit-ready"
    with _venv_lock:
        if ready.exists():
            return str(python)
        shutil.rmtree(venv, ignore_errors=True)
        steps = [
            [interpreter.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *deps],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(
                    f"could not prepare {venv} for the standard library's tests: "
                    f"{' '.join(step)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
                )
        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        Path(purelib, "poolkit-checkout.pth").write_text(str(REPO_ROOT) + "\n")
        ready.write_text(" ".join(deps) + "\n")
        return str(python)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST_", "COV_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["POOLKIT_REPO_PATHS"] = str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _output_of(log: str, name: str) -> str:
    """What the runner printed while ``name`` ran (its faulthandler dump, for a hang)."""
    marker = f"\n=== {name}\n"
    at = log.rfind(marker)
    text = log[at + len(marker) :] if at >= 0 else log
    return text[-12000:]


_running: set[subprocess.Popen[bytes]] = set()  # runners now running, for Runs.close()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """End a runner and whatever it started (its own session, see run_group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_group(
    interpreter: Interpreter, start_method: str, names: list[str], cache: Path
) -> dict[str, Result]:
    """Run ``names`` (all of one group) in the runner, starting it again after a hang or crash."""
    python = python_for(interpreter, cache)
    stem = f"{interpreter.version}-{start_method}"
    results_path = cache / f"results-{stem}.jsonl"
    log_path = cache / f"log-{stem}.txt"
    results: dict[str, Result] = {}
    remaining = [n for n in names if n != FIXTURES]
    deadline = time.monotonic() + GROUP_TIMEOUT
    while remaining:
        results_path.unlink(missing_ok=True)
        cmd = [python, str(RUNNER), "run", start_method, str(results_path)]
        cmd += ["--watchdog", str(WATCHDOG), *remaining]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=str(cache),
                env=_child_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so that what it leaves behind can be ended with it
            )
            _running.add(proc)
            try:
                rc: int | str = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = "timeout"
            finally:
                _kill(proc)
                _running.discard(proc)
        log_text = log_path.read_text(errors="replace")
        started: list[str] = []
        done = False
        if results_path.exists():
            for line in results_path.read_text().splitlines():
                record = json.loads(line)
                if record["event"] == "start":
                    started.append(record["name"])
                elif record["event"] == "done":
                    done = True
                elif record["name"] == FIXTURES:
                    previous = results.get(FIXTURES)
                    detail = (
                        record["detail"]
                        if previous is None
                        else f"{previous.detail}\n{record['detail']}"
                    )
                    results[FIXTURES] = Result("error", detail)
                else:
                    results[record["name"]] = Result(
                        record["outcome"], record["detail"], record["duration"]
                    )
        unfinished = [n for n in started if n not in results]
        if unfinished or not done:
            shutil.copy(
                log_path, cache / f"log-{stem}-stopped-{len(started)}.txt"
            )  # for a post-mortem
        for name in unfinished:
            results[name] = Result(
                "hung",
                f"the runner (exit status {rc}) stopped during this test, "
                f"watchdog {WATCHDOG:.0f} s; its output from the test's start:\n"
                + _output_of(log_text, name),
            )
        left = [n for n in remaining if n not in results]
        if not unfinished and not done:
            # It stopped outside any test: in a module fixture, or before the first test.
            results[FIXTURES] = Result(
                "error",
                f"the runner ended (exit status {rc}) outside a test; its output:\n{log_text[-12000:]}",
            )
        if rc == "timeout" or (left and not unfinished):
            # Starting it again would make no progress: the rest did not run.
            for name in left:
                results[name] = Result(
                    "hung", f"not run: the runner ended (exit status {rc}) before this test"
                )
            left = []
        remaining = left
    return results


class Runs:
    """Every group's run, started together on first need, results kept for the session."""

    def __init__(self, groups: dict[tuple[Interpreter, str], list[str]], cache: Path) -> None:
        self._groups = groups
        self._cache = cache
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._futures: dict[
            tuple[Interpreter, str], concurrent.futures.Future[dict[str, Result]]
        ] = {}
        self._lock = threading.Lock()

    def results(self, group: tuple[Interpreter, str]) -> dict[str, Result]:
        with self._lock:
            if self._pool is None:
                jobs = int(os.environ.get("POOLKIT_STDLIB_JOBS", "0")) or len(self._groups)
                self._pool = concurrent.futures.ThreadPoolExecutor(max(1, jobs))
                for key, names in self._groups.items():
                    self._futures[key] = self._pool.submit(
                        run_group, key[0], key[1], names, self._cache
                    )
        return self._futures[group].result()

    def close(self) -> None:
        """At the module's end; if the session stopped early, the runners still running end now."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            for proc in list(_running):
                _kill(proc)
            self._pool.shutdown(wait=True)


PARAMS, NO_INTERPRETER = _collect()


@pytest.fixture(scope="module")
def stdlib_runs(request: pytest.FixtureRequest) -> Any:
    """The runs of the groups that this session selected (``-k`` picks tests, and so groups)."""
    groups: dict[tuple[Interpreter, str], list[str]] = {}
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        case = callspec.params.get("case") if callspec is not None else None
        if isinstance(case, Case):
            groups.setdefault(case.group, []).append(case.name)
    runs = Runs(groups, _cache_dir(request.config))
    yield runs
    runs.close()


# ----------------------------------------------------------------- the tests


@pytest.mark.parametrize("case", PARAMS or [pytest.param(None, id="no-interpreter")])
def test_stdlib(case: Case | None, stdlib_runs: Runs) -> None:
    if case is None:
        pytest.skip(NO_INTERPRETER)
    result = stdlib_runs.results(case.group).get(case.name)
    if case.name == FIXTURES:
        if result is not None:
            raise StdlibTestFailed(f"a module or class fixture failed:\n{result.detail}")
        return
    assert result is not None, f"the runner reported nothing for {case.name}"
    if result.outcome in ("passed", "xfail"):
        return
    if result.outcome == "skipped":
        pytest.skip(f"skipped by the standard library's test: {result.detail}")
    if result.outcome == "hung":
        raise StdlibTestHung(result.detail)
    difference = expected_difference(case.name, case.start_method, case.interpreter.version)
    if difference is not None and not difference.matches(result.detail):
        raise StdlibTestFailedOtherwise(
            f"listed as {difference.kind} ({difference.reason}), expected {difference.match!r} "
            f"in the failure, which is:\n{result.detail}"
        )
    raise StdlibTestFailed(f"{result.outcome}:\n{result.detail}")


_TABLE_ROW = re.compile(r"^\|\s*`(?P<name>[\w.]+)`\s*\|(?P<methods>[^|]*)\|(?P<kind>[^|]*)\|")


def test_the_docs_table_mirrors_the_list() -> None:
    """docs/migration/concurrent-futures.md's table says what stdlib_futures_differences says.

    Same tests, and for each the same start methods, kind, and whether it
    depends on timing; the reasons are for people to read and are not compared.
    """
    page = DOCS_PAGE.read_text()
    heading = "## Where poolkit differs from the standard library's own tests"
    assert heading in page, f"{DOCS_PAGE} lacks the section {heading!r}"
    section = page.split(heading, 1)[1].split("\n## ", 1)[0]
    in_docs = {}
    for line in section.splitlines():
        m = _TABLE_ROW.match(line)
        if m is None:
            continue
        methods = m["methods"].strip()
        kind = m["kind"].strip()
        in_docs[m["name"]] = (
            START_METHODS
            if methods == "all"
            else tuple(sorted(x.strip() for x in methods.split(","))),
            kind.split(",")[0].strip(),
            "*timing*" not in kind,
        )
    in_list = {
        name: (tuple(sorted(d.start_methods)), d.kind, d.strict) for name, d in DIFFERENCES.items()
    }
    in_docs = {name: (tuple(sorted(v[0])), v[1], v[2]) for name, v in in_docs.items()}
    assert set(in_docs) == set(in_list), (
        f"only in the docs: {sorted(set(in_docs) - set(in_list))}; "
        f"only in tests/stdlib_futures_differences.py: {sorted(set(in_list) - set(in_docs))}"
    )
    differ = {n: (in_docs[n], in_list[n]) for n in in_list if in_docs[n] != in_list[n]}
    assert not differ, f"(start methods, kind, strict) in the docs vs the list: {differ}"


def test_every_listed_difference_names_a_real_test() -> None:
    """A line for a test that no longer exists (renamed upstream) is caught here, not kept forever."""
    if not PARAMS:
        pytest.skip(NO_INTERPRETER)
    versions = {param.values[0].interpreter.version for param in PARAMS}
    if "3.13" not in versions:
        pytest.skip(f"the list is written against 3.13's tests; found only {sorted(versions)}")
    names = {param.values[0].name for param in PARAMS}
    unknown = sorted(set(DIFFERENCES) - names)
    assert not unknown, f"listed in stdlib_futures_differences.py but not a test here: {unknown}"
