"""``poolkit run`` end to end: the command runs as a user would run it, in a subprocess.

Each test looks at what a user sees: the exit status, the JSON lines written,
and the messages on stderr. The job functions live in ``tests/cli_jobs.py``,
which the CLI imports by name (``cli_jobs:square``).
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import read_pty

import poolkit

pytestmark = pytest.mark.timeout(120)

TESTS = Path(__file__).resolve().parent


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    env.pop("COLUMNS", None)
    env.update(extra)
    return env


def poolkit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "poolkit", *args]


def run_cli(
    args: Sequence[str], tmp_path: Path, *, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        poolkit_cmd(*args),
        input=stdin,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=timeout,
    )


def write_inputs(path: Path, values: Sequence[Any]) -> Path:
    path.write_text("".join(json.dumps(v) + "\n" for v in values))
    return path


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every line must be a whole JSON object: a half-written line fails here."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_index(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    indexed = {r["index"]: r for r in records}
    assert len(indexed) == len(records), "an input was written twice"
    return indexed


# ----------------------------------------------------------------- success


def test_every_input_gets_one_line_and_exit_0(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", list(range(40)))
    done = run_cli(["run", "cli_jobs:square", str(inputs), "-o", "out.jsonl", "--workers", "2"], tmp_path)
    assert done.returncode == 0, done.stderr
    records = by_index(read_records(tmp_path / "out.jsonl"))
    assert sorted(records) == list(range(40))
    for i, record in records.items():
        assert record["status"] == "ok"
        assert record["input"] == i
        assert record["result"] == i * i
        assert record["line"] == i + 1
        assert record["attempts"] == 1
        assert isinstance(record["worker_id"], int)
        assert isinstance(record["pid"], int)
        assert record["wall_time"] >= 0
    # the summary, as plain text because stderr is not a terminal
    assert "poolkit run summary" in done.stderr
    assert "ok:" in done.stderr and "40" in done.stderr
    assert "jobs/s" in done.stderr
    assert "\x1b[" not in done.stderr, "escape codes in a log"


def test_ordered_output_follows_input_order(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", [0.05, 0.0, 0.03, 0.0, 0.0, 0.02])
    done = run_cli(
        ["run", "cli_jobs:sleep_then_echo", str(inputs), "-o", "out.jsonl", "-w", "2", "--ordered"], tmp_path
    )
    assert done.returncode == 0, done.stderr
    records = read_records(tmp_path / "out.jsonl")
    assert [r["index"] for r in records] == list(range(6))


def test_star_spreads_lists_and_dicts(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", [[1, 2], {"a": 5, "b": 6}, [7]])
    done = run_cli(["run", "cli_jobs:add", str(inputs), "-o", "out.jsonl", "--star", "-w", "1"], tmp_path)
    assert done.returncode == 0, done.stderr
    results = {r["index"]: r["result"] for r in read_records(tmp_path / "out.jsonl")}
    assert results == {0: 3, 1: 11, 2: 7}


def test_jobs_see_their_job_and_worker_ids(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", [None] * 4)
    done = run_cli(["run", "cli_jobs:whoami", str(inputs), "-o", "out.jsonl", "-w", "2"], tmp_path)
    assert done.returncode == 0, done.stderr
    for record in read_records(tmp_path / "out.jsonl"):
        assert record["result"]["job_id"]
        assert record["result"]["worker_id"] == str(record["worker_id"])
        assert record["result"]["pid"] == record["pid"]


def test_stdin_in_and_stdout_out(tmp_path: Path) -> None:
    done = run_cli(["run", "cli_jobs:square", "-w", "2"], tmp_path, stdin="1\n2\n\n3\n")
    assert done.returncode == 0, done.stderr
    records = by_index([json.loads(line) for line in done.stdout.splitlines()])
    assert {i: r["result"] for i, r in records.items()} == {0: 1, 1: 4, 2: 9}
    assert records[2]["line"] == 4, "the blank line still counts as a line"
    # '-' means stdin too
    dash = run_cli(["run", "cli_jobs:square", "-", "-o", "out.jsonl"], tmp_path, stdin="5\n")
    assert dash.returncode == 0, dash.stderr
    assert read_records(tmp_path / "out.jsonl")[0]["result"] == 25


def test_console_script_is_installed(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("poolkit")
    if not script.exists():
        pytest.skip("the poolkit console script is not installed in this environment")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert done.stdout.startswith(f"poolkit {poolkit.__version__}")


# ----------------------------------------------------------------- failures


def test_partial_failure_exits_1_and_records_the_error(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", [3, -1, 4, -5, 6])
    args = ["run", "cli_jobs:fail_on_negative", str(inputs), "-o", "out.jsonl", "-w", "2"]
    done = run_cli(args, tmp_path)
    assert done.returncode == 1, done.stderr
    records = by_index(read_records(tmp_path / "out.jsonl"))
    assert [records[i]["status"] for i in range(5)] == ["ok", "error", "ok", "error", "ok"]
    error = records[3]["error"]
    assert error["type"] == "ValueError"
    assert error["message"] == "negative input: -5"
    assert "fail_on_negative" in error["traceback"]
    assert "ValueError 2" in done.stderr

    allowed = run_cli([*args, "--allow-failures"], tmp_path)
    assert allowed.returncode == 0, allowed.stderr


def test_a_crashing_input_fails_alone(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", list(range(10, 17)))
    done = run_cli(["run", "cli_jobs:crash_on_13", str(inputs), "-o", "out.jsonl", "-w", "2"], tmp_path)
    assert done.returncode == 1
    records = by_index(read_records(tmp_path / "out.jsonl"))
    crashed = [r for r in records.values() if r["status"] == "error"]
    assert len(crashed) == 1
    assert crashed[0]["input"] == 13
    assert crashed[0]["error"]["type"] == "WorkerCrashed"
    assert "exit code 7" in crashed[0]["error"]["message"]
    assert all(r["result"] == r["input"] for r in records.values() if r["status"] == "ok")
    assert "WorkerCrashed 1" in done.stderr


def test_timeout_fails_only_the_slow_input(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", [0.0, 60, 0.0])
    start = time.monotonic()
    done = run_cli(
        ["run", "cli_jobs:sleep_then_echo", str(inputs), "-o", "out.jsonl", "-w", "2", "--timeout", "1"], tmp_path
    )
    assert time.monotonic() - start < 30
    assert done.returncode == 1
    records = by_index(read_records(tmp_path / "out.jsonl"))
    assert records[1]["error"]["type"] == "JobTimeout"
    assert records[0]["status"] == records[2]["status"] == "ok"


def test_result_that_json_cannot_hold_is_an_error(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", [1])
    done = run_cli(["run", "cli_jobs:returns_a_set", str(inputs), "-o", "out.jsonl"], tmp_path)
    assert done.returncode == 1
    [record] = read_records(tmp_path / "out.jsonl")
    assert record["error"]["type"] == "ResultNotJSON"
    assert "set" in record["error"]["message"]


def test_malformed_lines_are_reported_and_the_rest_runs(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'1\n{"oops"\n2\n\nnot json\n3\n\xff\xfe\n')
    for ordered in (False, True):
        args = ["run", "cli_jobs:square", str(path), "-o", "out.jsonl", "-w", "2"]
        done = run_cli([*args, "--ordered"] if ordered else args, tmp_path)
        assert done.returncode == 1
        records = read_records(tmp_path / "out.jsonl")
        if ordered:
            assert [r["index"] for r in records] == list(range(6))
        indexed = by_index(records)
        bad = {r["line"]: r for r in indexed.values() if r["status"] == "error"}
        assert sorted(bad) == [2, 5, 7]
        assert all(r["error"]["type"] == "InvalidInput" for r in bad.values())
        assert bad[2]["raw"] == '{"oops"'
        assert "line 2: invalid JSON" in bad[2]["error"]["message"]
        assert "not UTF-8" in bad[7]["error"]["message"]
        ok = sorted(r["result"] for r in indexed.values() if r["status"] == "ok")
        assert ok == [1, 4, 9]
        assert "line 2: invalid JSON" in done.stderr
        assert "line 5: invalid JSON" in done.stderr
        assert "InvalidInput 3" in done.stderr


def test_star_needs_arrays_or_objects(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", [[1, 2], 3])
    done = run_cli(["run", "cli_jobs:add", str(inputs), "-o", "out.jsonl", "--star"], tmp_path)
    assert done.returncode == 1
    records = by_index(read_records(tmp_path / "out.jsonl"))
    assert records[0]["result"] == 3
    assert records[1]["error"]["type"] == "InvalidInput"
    assert "--star" in records[1]["error"]["message"]


# ----------------------------------------------------------------- usage errors (exit 2)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
        ("cli_jobs:no_such_function", "has no attribute 'no_such_function'"),
        ("cli_jobs:squre", "did you mean 'square'"),
        ("cli_jobs:not_a_function", "is not callable"),
        ("cli_jobs:unpicklable", "cannot be pickled"),
        ("cli_jobs", "expected MODULE:FUNCTION"),
    ],
)
def test_bad_target_is_a_usage_error(tmp_path: Path, target: str, message: str) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", [1])
    done = run_cli(["run", target, str(inputs), "-o", "out.jsonl"], tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert "usage: poolkit run" in done.stderr
    assert "Traceback" not in done.stderr


def test_unwritable_output_is_a_usage_error(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", [1])
    for output in (str(tmp_path / "missing" / "out.jsonl"), str(tmp_path)):
        done = run_cli(["run", "cli_jobs:square", str(inputs), "-o", output], tmp_path)
        assert done.returncode == 2
        assert "cannot write output file" in done.stderr
        assert "Traceback" not in done.stderr
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        done = run_cli(["run", "cli_jobs:square", str(inputs), "-o", str(locked / "out.jsonl")], tmp_path)
        assert done.returncode == 2
        assert "Permission denied" in done.stderr


def test_missing_input_is_a_usage_error(tmp_path: Path) -> None:
    done = run_cli(["run", "cli_jobs:square", "nope.jsonl", "-o", "out.jsonl"], tmp_path)
    assert done.returncode == 2
    assert "cannot read input file 'nope.jsonl'" in done.stderr


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--workers", "0"], "expected a positive integer"),
        (["--timeout", "-1"], "expected a positive number of seconds"),
        (["--max-memory-per-child", "lots"], "is not a memory size"),
        (["--retry-exceptions"], "--retry-exceptions needs --retries"),
        (["--progress", "loud"], "invalid choice"),
    ],
)
def test_bad_option_is_a_usage_error(tmp_path: Path, option: list[str], message: str) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", [1])
    done = run_cli(["run", "cli_jobs:square", str(inputs), "-o", "out.jsonl", *option], tmp_path)
    assert done.returncode == 2
    assert message in done.stderr


def test_dask_without_the_backend_says_so(tmp_path: Path) -> None:
    # Hide poolkit.dask_backend, as in an installation without it.
    code = (
        "import sys; sys.modules['poolkit.dask_backend'] = None; "
        "from poolkit.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    inputs = write_inputs(tmp_path / "in.jsonl", [1])
    done = subprocess.run(
        [sys.executable, "-c", code, "run", "cli_jobs:square", str(inputs), "--dask", "tcp://127.0.0.1:1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=60,
    )
    assert done.returncode == 2
    assert "dask support is not installed" in done.stderr


def test_version_and_help(tmp_path: Path) -> None:
    version = run_cli(["--version"], tmp_path)
    assert version.returncode == 0
    assert version.stdout.startswith(f"poolkit {poolkit.__version__}")
    top = run_cli(["--help"], tmp_path)
    assert top.returncode == 0
    assert "poolkit demo" in top.stdout and "examples:" in top.stdout
    run_help = run_cli(["run", "--help"], tmp_path)
    assert run_help.returncode == 0
    for text in ("--max-memory-per-child", "--star", "not_run", "InvalidInput", "examples:"):
        assert text in run_help.stdout
    bare = run_cli([], tmp_path)
    assert bare.returncode == 2


# ----------------------------------------------------------------- recycling and progress


def test_recycled_workers_are_counted_in_the_summary(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", list(range(12)))
    done = run_cli(
        ["run", "cli_jobs:whoami", str(inputs), "-o", "out.jsonl", "-w", "2", "--max-tasks-per-child", "2",
         "--chunksize", "1"],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    pids = {r["pid"] for r in read_records(tmp_path / "out.jsonl")}
    assert len(pids) >= 4, "workers were not recycled"
    summary = done.stderr[done.stderr.index("poolkit run summary") :]
    assert "workers recycled:" in summary and "tasks" in summary


def test_plain_progress_lines_when_not_a_terminal(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", [0.05] * 30)
    done = run_cli(
        ["run", "cli_jobs:sleep_then_echo", str(inputs), "-o", "out.jsonl", "-w", "2", "--progress-interval",
         "0.1"],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("poolkit: ") and "done" in line]
    assert len(lines) >= 2, done.stderr
    assert lines[-1].startswith("poolkit: 30/30 (100.0%) done, 0 failed")
    assert "jobs/s" in lines[-1] and "ETA" in lines[-1]


def test_rich_progress_on_a_terminal(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", [0.05] * 40 + [-1])
    master, slave = pty.openpty()
    # stderr is the terminal; stdout (the JSON lines) goes to a file, as in `poolkit run ... > out.jsonl`
    out = (tmp_path / "out.jsonl").open("wb")
    proc = subprocess.Popen(
        poolkit_cmd("run", "cli_jobs:sleep_or_fail", str(inputs), "-w", "2"),
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=slave,
        cwd=tmp_path,
        env=_env(TERM="xterm-256color", COLUMNS="120"),
    )
    os.close(slave)
    try:
        screen = read_pty(master, proc, time.monotonic() + 60).decode("utf-8", "replace")
        assert proc.wait(timeout=30) == 1
    finally:
        os.close(master)
        out.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "\x1b[" in screen, "no live redraw: rich did not see a terminal"
    assert "poolkit run" in screen
    assert "%" in screen
    assert "jobs/s" in screen
    assert "ETA" in screen
    assert "41/41" in screen
    assert "1 failed" in screen
    # the summary is a rich table (box-drawing characters), not plain lines
    assert "poolkit run summary" in screen
    assert "│" in screen and "ValueError 1" in screen
    # the live display never swallowed or wrapped the piped JSON lines
    assert '"index"' not in screen
    assert sorted(r["index"] for r in read_records(tmp_path / "out.jsonl")) == list(range(41))


# ----------------------------------------------------------------- Ctrl-C


def _wait_for_lines(path: Path, count: int, proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    """Wait until the CLI has written ``count`` whole lines (or died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the CLI exited early with status {proc.returncode}")
        time.sleep(0.01)
    raise AssertionError(f"no {count} output lines after {timeout} s")


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _assert_all_gone(processes: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(processes, timeout=15)
    survivors = []
    for proc in alive:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                survivors.append(proc)
        except psutil.NoSuchProcess:
            pass
    assert not survivors, f"worker processes left behind: {survivors}"


def _start(args: list[str], tmp_path: Path, **kwargs: Any) -> subprocess.Popen[Any]:
    return subprocess.Popen(
        poolkit_cmd(*args),
        stdout=kwargs.pop("stdout", subprocess.DEVNULL),
        stderr=(tmp_path / "stderr.txt").open("w"),
        cwd=tmp_path,
        env=_env(),
        **kwargs,
    )


def test_ctrl_c_keeps_finished_results_and_names_the_rest(tmp_path: Path) -> None:
    n = 60
    inputs = write_inputs(tmp_path / "in.jsonl", [0.1] * n)
    out = tmp_path / "out.jsonl"
    proc = _start(["run", "cli_jobs:sleep_then_echo", str(inputs), "-o", str(out), "-w", "2"], tmp_path)
    try:
        _wait_for_lines(out, 1, proc)
        workers = _descendants(proc.pid)
        assert workers, "the CLI has no worker processes"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_all_gone(workers)
    records = by_index(read_records(out))
    assert sorted(records) == list(range(n)), "every input gets exactly one line"
    statuses = {r["status"] for r in records.values()}
    assert statuses == {"ok", "not_run"}
    not_run = [r for r in records.values() if r["status"] == "not_run"]
    assert all(r["input"] == 0.1 and r["line"] == r["index"] + 1 for r in not_run)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "interrupted by SIGINT" in stderr
    assert f"{len(not_run)} inputs did not run" in stderr


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_stops_running_jobs_at_once(tmp_path: Path, signum: int, status: int) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", [0.0] + [300] * 5)
    out = tmp_path / "out.jsonl"
    proc = _start(["run", "cli_jobs:sleep_then_echo", str(inputs), "-o", str(out), "-w", "2"], tmp_path)
    try:
        _wait_for_lines(out, 1, proc)
        workers = _descendants(proc.pid)
        proc.send_signal(signum)
        started = time.monotonic()
        assert proc.wait(timeout=30) == status
        assert time.monotonic() - started < 15, "the CLI waited for the running jobs"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_all_gone(workers)
    records = by_index(read_records(out))
    assert [records[i]["status"] for i in range(6)] == ["ok"] + ["not_run"] * 5


def test_ctrl_c_while_reading_stdin(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = _start(["run", "cli_jobs:square", "-o", str(out), "-w", "1"], tmp_path, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        # Six inputs, and stdin kept open: the CLI ends up waiting for a seventh line.
        proc.stdin.write(b"1\n2\n3\n4\n5\n6\n")
        proc.stdin.flush()
        _wait_for_lines(out, 1, proc)
        workers = _descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        proc.stdin.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_all_gone(workers)
    records = by_index(read_records(out))
    stderr = (tmp_path / "stderr.txt").read_text()
    # The first result can come back before the CLI has read every line that
    # was written: it says how far it read, and exactly those lines have a record.
    found = re.search(r"stdin was read up to line (\d+); lines after it were not read", stderr)
    assert found, stderr
    read = int(found.group(1))
    assert 1 <= read <= 6
    assert sorted(records) == list(range(read)), "every input read gets exactly one line"
    for record in records.values():
        assert record["status"] in ("ok", "not_run")
        if record["status"] == "ok":
            assert record["result"] == record["input"] ** 2


# ----------------------------------------------------------------- the contract with what a job does (issue 16)


@pytest.mark.parametrize(("job", "error"), [("exit_on", "SystemExit"), ("interrupt_on", "KeyboardInterrupt")])
def test_a_job_that_exits_fails_only_its_input(tmp_path: Path, job: str, error: str) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", list(range(6)))
    done = run_cli(["run", f"contract_jobs:{job}", str(inputs), "-o", "out.jsonl", "-w", "2"], tmp_path)
    assert done.returncode == 1, done.stderr
    records = by_index(read_records(tmp_path / "out.jsonl"))
    assert sorted(records) == list(range(6))
    assert [records[i]["status"] for i in range(6)] == ["ok", "ok", "error", "ok", "ok", "ok"]
    assert records[2]["error"]["type"] == error
    assert f"failed:           1 ({error} 1)" in done.stderr


def test_attempts_and_retried_count_real_runs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    inputs = write_inputs(tmp_path / "in.jsonl", [[str(runs), n, 3] for n in range(6)])
    done = run_cli(
        ["run", "contract_jobs:count_then_die_on", str(inputs), "-o", "out.jsonl", "-w", "2", "--retries", "2"],
        tmp_path,
    )
    assert done.returncode == 1, done.stderr
    records = by_index(read_records(tmp_path / "out.jsonl"))
    assert (runs / "3").read_text().count("run") == 3
    assert (records[3]["status"], records[3]["attempts"]) == ("error", 3)
    assert "input 3" in records[3]["error"]["message"]
    assert all(records[i]["attempts"] == 1 for i in (0, 1, 2, 4, 5))
    assert re.search(r"retried:\s+1 inputs needed more than one attempt", done.stderr), done.stderr


def _wait_for_records(path: Path, count: int, proc: subprocess.Popen[Any]) -> None:
    _wait_for_lines(path, count, proc, timeout=30)


def test_each_result_is_written_while_stdin_is_still_open(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = _start(["run", "cli_jobs:square", "-o", str(out), "-w", "2"], tmp_path, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        for n in range(1, 4):
            proc.stdin.write(f"{n}\n".encode())
            proc.stdin.flush()
            # The line's result comes while the producer is still silent.
            _wait_for_records(out, n, proc)
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sorted(r["result"] for r in read_records(out)) == [1, 4, 9]


def test_stdin_on_a_terminal_says_it_is_read(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        poolkit_cmd("run", "cli_jobs:square", "-o", str(out), "-w", "1", "-q"),
        stdin=slave,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "stderr.txt").open("w"),
        cwd=tmp_path,
        env=_env(),
    )
    os.close(slave)
    try:
        wait_until = time.monotonic() + 30
        while "reading inputs from stdin" not in (tmp_path / "stderr.txt").read_text():
            assert time.monotonic() < wait_until and proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            time.sleep(0.01)
        os.write(master, b"7\n")
        _wait_for_records(out, 1, proc)
        os.write(master, b"\x04")  # Ctrl-D: the end of the input
        assert proc.wait(timeout=30) == 0
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert read_records(out)[0]["result"] == 49


def test_a_job_that_reads_stdin_takes_no_input_line(tmp_path: Path) -> None:
    lines = "".join(f"{n}\n" for n in range(2000))
    done = run_cli(["run", "contract_jobs:read_stdin", "-w", "2", "-q"], tmp_path, stdin=lines)
    assert done.returncode == 0, done.stderr
    records = by_index([json.loads(line) for line in done.stdout.splitlines()])
    assert sorted(records) == list(range(2000))
    assert {r["result"] for r in records.values()} == {""}


def test_what_a_job_prints_goes_to_stderr(tmp_path: Path) -> None:
    done = run_cli(["run", "contract_jobs:chatty", "-w", "2"], tmp_path, stdin="1\n2\n3\n")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]  # every stdout line is a record
    assert sorted(r["result"] for r in records) == [1, 2, 3]
    assert "hello from input 2" in done.stderr


def _strict(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_the_output_is_strict_json(tmp_path: Path) -> None:
    done = run_cli(["run", "contract_jobs:not_finite", "-w", "1", "-q", "--ordered"], tmp_path, stdin="0\n1\n2\n3\n")
    assert done.returncode == 0, done.stderr
    records = [_strict(line) for line in done.stdout.splitlines()]
    assert [r["result"] for r in records] == [None, None, None, [3, None]]


def test_a_result_utf8_cannot_encode_is_that_inputs_error(tmp_path: Path) -> None:
    done = run_cli(["run", "contract_jobs:lone_surrogate", "-w", "1", "-q", "--ordered"], tmp_path, stdin="0\n1\n2\n")
    assert done.returncode == 1, done.stderr
    records = [_strict(line) for line in done.stdout.splitlines()]
    assert [r["status"] for r in records] == ["ok", "error", "ok"]
    assert records[1]["error"]["type"] == "ResultNotJSON"
    assert "surrogate" in records[1]["error"]["message"]


def test_no_input_leaves_the_input_out_of_every_record(tmp_path: Path) -> None:
    big = "x" * 1_000_000
    inputs = write_inputs(tmp_path / "in.jsonl", [big, "ab", "not json"])
    (tmp_path / "in.jsonl").write_text((tmp_path / "in.jsonl").read_text().replace('"not json"', "not json"))
    done = run_cli(["run", "contract_jobs:big_input", str(inputs), "-o", "out.jsonl", "--no-input", "-w", "1"], tmp_path)
    assert done.returncode == 1, done.stderr
    assert (tmp_path / "out.jsonl").stat().st_size < 10_000
    records = by_index(read_records(tmp_path / "out.jsonl"))
    assert [records[i]["line"] for i in range(3)] == [1, 2, 3]
    assert all("input" not in r for r in records.values())
    assert (records[0]["result"], records[1]["result"], records[2]["error"]["type"]) == (1_000_000, 2, "InvalidInput")


def test_run_help_says_what_is_promised(tmp_path: Path) -> None:
    done = run_cli(["run", "--help"], tmp_path)
    text = " ".join(done.stdout.split())
    for promise in (
        "the current directory comes first on sys.path, for the whole run",
        "Workers read stdin from /dev/null",
        "what a job prints (stdout) goes to poolkit run's stderr",
        "NaN or infinity in a result (or input) is written as null",
        '"ResultNotJSON"',
        "written and flushed as soon as its input finishes",
        "--no-input",
    ):
        assert promise in text, promise


def test_the_ctrl_c_summary_counts_no_recycled_workers(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", [0.0] + [300] * 5)
    out = tmp_path / "out.jsonl"
    proc = _start(["run", "cli_jobs:sleep_then_echo", str(inputs), "-o", str(out), "-w", "2"], tmp_path)
    try:
        _wait_for_lines(out, 1, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert re.search(r"workers recycled: 0\n", stderr), stderr
    assert "terminated" not in stderr


def test_a_module_that_prints_when_imported_keeps_stdout_to_json_lines(tmp_path: Path) -> None:
    for method in ("fork", "spawn"):
        done = run_cli(["run", "cli_noisy_jobs:double", "--start-method", method, "-q"], tmp_path, stdin="1\n2\n")
        assert done.returncode == 0, done.stderr
        assert sorted(json.loads(line)["result"] for line in done.stdout.splitlines()) == [2, 4]
        assert "noisy module imported" in done.stderr
