"""``poolkit.resume``: reading an earlier run's output (no processes involved)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from poolkit.resume import Previous, ResumeError, input_hash, read_previous


def record(line: int, status: str, raw: bytes) -> bytes:
    return (json.dumps({"line": line, "status": status, "input_hash": input_hash(raw)}) + "\n").encode()


def write(path: Path, *records: bytes) -> str:
    path.write_bytes(b"".join(records))
    return str(path)


def test_the_hash_ignores_the_line_ending_and_tells_inputs_apart() -> None:
    assert input_hash(b"[1, 2]\n") == input_hash(b"[1, 2]\r\n") == input_hash(b"[1, 2]")
    assert input_hash(b"[1, 2]\n") != input_hash(b"[1, 3]\n")
    assert len(input_hash(b"x")) == 16


def test_finished_records_are_kept_and_the_rest_dropped(tmp_path: Path) -> None:
    path = write(
        tmp_path / "out.jsonl",
        record(1, "ok", b"1"),
        record(2, "error", b"2"),
        record(3, "not_run", b"3"),
        record(4, "ok", b"4")[:-5],  # cut while being written
    )
    previous = read_previous(path, retry_failed=False)
    assert previous.done == {1: input_hash(b"1"), 2: input_hash(b"2")}
    assert (previous.ok, previous.failed, previous.dropped, previous.cut_line) == (1, 1, 2, True)


def test_retry_failed_drops_the_error_records(tmp_path: Path) -> None:
    path = write(tmp_path / "out.jsonl", record(1, "ok", b"1"), record(2, "error", b"2"))
    previous = read_previous(path, retry_failed=True)
    assert list(previous.done) == [1]
    assert previous.dropped == 1


def test_a_changed_line_is_refused_with_its_number(tmp_path: Path) -> None:
    path = write(tmp_path / "out.jsonl", record(1, "ok", b"1"), record(2, "ok", b"2"))
    previous = read_previous(path, retry_failed=False)
    assert previous.skips(1, b"1\n")
    assert not previous.skips(3, b"3\n")
    with pytest.raises(ResumeError, match="line 2 of the input is not the input"):
        previous.skips(2, b"22\n")


def test_check_all_reads_the_whole_input_and_rewinds(tmp_path: Path) -> None:
    path = write(tmp_path / "out.jsonl", record(1, "ok", b"1"), record(3, "ok", b"3"))
    previous = read_previous(path, retry_failed=False)
    stream = io.BytesIO(b"1\n2\n3\n4\n")
    previous.check_all(stream)
    assert stream.tell() == 0
    with pytest.raises(ResumeError, match="line 3"):
        previous.check_all(io.BytesIO(b"1\n2\nthree\n4\n"))


def test_check_all_refuses_an_input_shorter_than_the_records(tmp_path: Path) -> None:
    path = write(tmp_path / "out.jsonl", record(1, "ok", b"1"), record(5, "ok", b"5"))
    with pytest.raises(ResumeError, match="up to line 5"):
        read_previous(path, retry_failed=False).check_all(io.BytesIO(b"1\n2\n"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "not a JSON object"),
        (b'{"status": "ok", "input_hash": "ab"}\n', "no input line number"),
        (b'{"line": 1, "status": "ok"}\n', "no input_hash"),
        (b'{"a": 1}\n', "no input line number"),
        (b'{"line": 1, "input_hash": "ab", "status": "done"}\n', "status 'done'"),
        (b'{"line": 1, "input_hash": "ab"}\n', "status None"),
    ],
)
def test_an_output_that_is_not_a_runs_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = write(tmp_path / "out.jsonl", content)
    with pytest.raises(ResumeError, match=message):
        read_previous(path, retry_failed=False)


def test_two_finished_records_for_one_line_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "out.jsonl", record(1, "ok", b"1"), record(1, "ok", b"1"))
    with pytest.raises(ResumeError, match="two finished records for input line 1"):
        read_previous(path, retry_failed=False)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match="does not exist"):
        read_previous(str(tmp_path / "nope.jsonl"), retry_failed=False)


def test_an_empty_previous_output_resumes_from_the_start(tmp_path: Path) -> None:
    previous = read_previous(write(tmp_path / "out.jsonl"), retry_failed=False)
    assert previous == Previous(str(tmp_path / "out.jsonl"))
