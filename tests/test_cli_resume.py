"""``poolkit run --resume OUT.jsonl``: an interrupted run picks up where it stopped, as a user runs it."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from test_cli import _env, poolkit_cmd, read_records, run_cli, write_inputs

pytestmark = pytest.mark.timeout(300)


def one_record_per_line(path: Path, inputs: list[Any]) -> dict[int, dict[str, Any]]:
    """Each input line has exactly one record, about that input."""
    records = read_records(path)
    by_line: dict[int, dict[str, Any]] = {}
    for record in records:
        assert record["line"] not in by_line, f"line {record['line']} has two records"
        by_line[record["line"]] = record
    assert sorted(by_line) == list(range(1, len(inputs) + 1))
    for line, record in by_line.items():
        assert record["index"] == line - 1
        assert record["input"] == inputs[line - 1]
        assert len(record["input_hash"]) == 16
    return by_line


def start_writing(tmp_path: Path, *, records: int) -> subprocess.Popen[bytes]:
    """Start a slow run of in.jsonl into out.jsonl; return once it has written ``records`` records."""
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        poolkit_cmd("run", "cli_jobs:slow_square", "in.jsonl", "-o", "out.jsonl", "-w", "2", "-q"),
        cwd=tmp_path,
        env=_env(),
    )
    deadline = time.monotonic() + 60
    while not (out.exists() and out.read_bytes().count(b"\n") >= records):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)  # polling a file the run writes, with a deadline: not a guess
    return proc


def test_every_record_carries_its_input_hash(tmp_path: Path) -> None:
    write_inputs(tmp_path / "in.jsonl", [1, 2, "x"])
    done = run_cli(["run", "cli_jobs:square", "in.jsonl", "-o", "out.jsonl", "-q"], tmp_path)
    assert done.returncode == 1  # "x" * "x" fails
    hashes = {r["line"]: r["input_hash"] for r in read_records(tmp_path / "out.jsonl")}
    assert len(set(hashes.values())) == 3


def test_resume_skips_finished_inputs_and_redoes_a_cut_last_line(tmp_path: Path) -> None:
    inputs = list(range(20))
    write_inputs(tmp_path / "in.jsonl", inputs)
    assert run_cli(["run", "cli_jobs:square", "in.jsonl", "-o", "out.jsonl", "-q"], tmp_path).returncode == 0
    out = tmp_path / "out.jsonl"
    lines = out.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["line"] <= 12]
    cut = next(line for line in lines if json.loads(line)["line"] == 13)
    out.write_bytes(b"".join(kept) + cut[: len(cut) // 2])  # as a kill in the middle of a write leaves it
    done = run_cli(["run", "cli_jobs:square", "in.jsonl", "--resume", "out.jsonl"], tmp_path)
    assert done.returncode == 0, done.stderr
    records = one_record_per_line(out, inputs)
    assert all(r["status"] == "ok" and r["result"] == r["input"] ** 2 for r in records.values())
    assert out.read_bytes().startswith(b"".join(kept))  # what was done stays as it was
    assert "skipped" in done.stderr and "12 (done in an earlier run; 12 ok, 0 failed)" in done.stderr
    assert "out.jsonl" in done.stderr


def test_kills_at_random_moments_then_resume_give_one_record_per_input(tmp_path: Path) -> None:
    inputs = list(range(400))  # about 4 s of work on 2 workers: every kill below lands mid-run
    write_inputs(tmp_path / "in.jsonl", inputs)
    rng = random.Random(20261207)
    cmd = poolkit_cmd("run", "cli_jobs:slow_square", "in.jsonl", "--resume", "out.jsonl", "-w", "2", "-q")
    kills = 0
    for _ in range(8):
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=rng.uniform(0.1, 1.5))
        except subprocess.TimeoutExpired:
            children = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            kills += 1
            # the pool's processes follow their parent (parent-death signal): none is left
            _, alive = psutil.wait_procs(children, timeout=30)
            assert not alive, f"left behind after SIGKILL: {alive}"
        finally:
            assert proc.stderr is not None
            proc.stderr.close()
        if proc.returncode == 0:
            break
    assert kills >= 3, "the seed should kill the run several times before it completes"
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = one_record_per_line(tmp_path / "out.jsonl", inputs)
    assert all(r["status"] == "ok" and r["result"] == r["input"] ** 2 for r in records.values())


def test_an_interrupted_runs_not_run_records_are_replaced(tmp_path: Path) -> None:
    inputs = list(range(60))
    write_inputs(tmp_path / "in.jsonl", inputs)
    out = tmp_path / "out.jsonl"
    proc = start_writing(tmp_path, records=5)  # some results are in
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    statuses = {r["status"] for r in read_records(out)}
    assert "not_run" in statuses
    done = run_cli(["run", "cli_jobs:slow_square", "in.jsonl", "--resume", "out.jsonl"], tmp_path)
    assert done.returncode == 0, done.stderr
    records = one_record_per_line(out, inputs)
    assert {r["status"] for r in records.values()} == {"ok"}


def test_retry_failed_runs_the_failed_inputs_again(tmp_path: Path) -> None:
    inputs = [1, -2, 3, -4]
    write_inputs(tmp_path / "in.jsonl", inputs)
    first = run_cli(["run", "cli_jobs:fail_once_per_marker", "in.jsonl", "-o", "out.jsonl", "-q"], tmp_path)
    assert first.returncode == 1
    # a plain resume keeps the failures: nothing left to run
    again = run_cli(["run", "cli_jobs:fail_once_per_marker", "in.jsonl", "--resume", "out.jsonl"], tmp_path)
    assert again.returncode == 1 and "4 (done in an earlier run; 2 ok, 2 failed)" in again.stderr
    healed = subprocess.run(
        poolkit_cmd("run", "cli_jobs:fail_once_per_marker", "in.jsonl", "--resume", "out.jsonl", "--retry-failed"),
        cwd=tmp_path,
        env=_env(POOLKIT_TEST_HEALED="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert healed.returncode == 0, healed.stderr
    records = one_record_per_line(tmp_path / "out.jsonl", inputs)
    assert [records[line]["result"] for line in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert "2 (done in an earlier run; 2 ok, 0 failed)" in healed.stderr


def test_a_changed_input_file_is_refused_before_anything_runs(tmp_path: Path) -> None:
    write_inputs(tmp_path / "in.jsonl", [1, 2, 3])
    assert run_cli(["run", "cli_jobs:square", "in.jsonl", "-o", "out.jsonl", "-q"], tmp_path).returncode == 0
    before = (tmp_path / "out.jsonl").read_bytes()
    write_inputs(tmp_path / "in.jsonl", [1, 5, 3, 4])
    done = run_cli(["run", "cli_jobs:square", "in.jsonl", "--resume", "out.jsonl"], tmp_path)
    assert done.returncode == 2
    assert "line 2 of the input is not the input" in done.stderr
    assert (tmp_path / "out.jsonl").read_bytes() == before


def test_a_changed_stdin_stops_at_that_line(tmp_path: Path) -> None:
    assert run_cli(["run", "cli_jobs:square", "-o", "out.jsonl", "-q"], tmp_path, stdin="1\n2\n").returncode == 0
    done = run_cli(["run", "cli_jobs:square", "--resume", "out.jsonl"], tmp_path, stdin="1\n7\n3\n")
    assert done.returncode == 2
    assert "line 2 of the input is not the input" in done.stderr


def test_resume_of_stdin_runs_only_the_new_lines(tmp_path: Path) -> None:
    assert run_cli(["run", "cli_jobs:square", "-o", "out.jsonl", "-q"], tmp_path, stdin="1\n2\n").returncode == 0
    done = run_cli(["run", "cli_jobs:square", "--resume", "out.jsonl"], tmp_path, stdin="1\n2\n3\n\n4\n")
    assert done.returncode == 0, done.stderr
    records = read_records(tmp_path / "out.jsonl")
    assert sorted((r["line"], r["result"]) for r in records) == [(1, 1), (2, 4), (3, 9), (5, 16)]


def test_resume_of_a_missing_file_starts_from_the_beginning(tmp_path: Path) -> None:
    write_inputs(tmp_path / "in.jsonl", [1, 2])
    done = run_cli(["run", "cli_jobs:square", "in.jsonl", "--resume", "out.jsonl"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "nothing to resume" in done.stderr
    one_record_per_line(tmp_path / "out.jsonl", [1, 2])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--retry-failed"], "--retry-failed needs --resume"),
        (["--resume", "out.jsonl", "-o", "other.jsonl"], "--resume writes to the file it resumes"),
        (["--resume", "-"], "--resume needs a file"),
    ],
)
def test_resume_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    write_inputs(tmp_path / "in.jsonl", [1])
    done = run_cli(["run", "cli_jobs:square", "in.jsonl", *args], tmp_path)
    assert done.returncode == 2
    assert message in done.stderr


def test_an_output_that_is_not_a_poolkit_run_is_refused(tmp_path: Path) -> None:
    write_inputs(tmp_path / "in.jsonl", [1])
    (tmp_path / "out.jsonl").write_text("hello\n")
    done = run_cli(["run", "cli_jobs:square", "in.jsonl", "--resume", "out.jsonl"], tmp_path)
    assert done.returncode == 2
    assert "not JSON" in done.stderr
    assert (tmp_path / "out.jsonl").read_text() == "hello\n"


def test_output_naming_the_input_file_is_refused_and_the_input_kept(tmp_path: Path) -> None:
    write_inputs(tmp_path / "in.jsonl", [1, 2, 3])
    for output in ("in.jsonl", "./in.jsonl"):
        done = run_cli(["run", "cli_jobs:square", "in.jsonl", "-o", output], tmp_path)
        assert done.returncode == 2
        assert "is the input file" in done.stderr
        assert "usage:" not in done.stderr  # the command line was fine: no usage text
        assert (tmp_path / "in.jsonl").read_text() == "1\n2\n3\n"


def test_a_run_cannot_write_where_another_still_writes(tmp_path: Path) -> None:
    inputs = list(range(200))
    write_inputs(tmp_path / "in.jsonl", inputs)
    out = tmp_path / "out.jsonl"
    first = start_writing(tmp_path, records=2)  # it is writing
    try:
        for args in (["--resume", "out.jsonl"], ["-o", "out.jsonl"]):
            second = run_cli(["run", "cli_jobs:square", "in.jsonl", *args], tmp_path)
            assert second.returncode == 2
            assert "being written by another poolkit run" in second.stderr
        assert first.wait(timeout=120) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    one_record_per_line(out, inputs)  # nothing interleaved, nothing torn


def test_a_json_file_that_is_not_a_runs_output_is_never_overwritten(tmp_path: Path) -> None:
    write_inputs(tmp_path / "in.jsonl", [1, 2])
    (tmp_path / "foreign.jsonl").write_text('{"a": 1}\n{"b": 2}\n')
    done = run_cli(["run", "cli_jobs:square", "in.jsonl", "--resume", "foreign.jsonl"], tmp_path)
    assert done.returncode == 2
    assert "not a poolkit run's output" in done.stderr
    assert (tmp_path / "foreign.jsonl").read_text() == '{"a": 1}\n{"b": 2}\n'


def test_resume_through_a_symbolic_link_keeps_the_link(tmp_path: Path) -> None:
    inputs = list(range(5))
    write_inputs(tmp_path / "in.jsonl", inputs)
    (tmp_path / "real").mkdir()
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "real" / "out.jsonl")
    assert run_cli(["run", "cli_jobs:square", "in.jsonl", "-o", "link.jsonl", "-q"], tmp_path).returncode == 0
    real = tmp_path / "real" / "out.jsonl"
    lines = real.read_bytes().splitlines(keepends=True)
    real.write_bytes(b"".join(lines[:2]) + lines[2][:5])  # cut: the rewrite must happen
    done = run_cli(["run", "cli_jobs:square", "in.jsonl", "--resume", "link.jsonl"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "link.jsonl").is_symlink()
    one_record_per_line(real, inputs)
