"""``poolkit.run_output``: the output file of ``poolkit run`` is held by one run and never destroyed by mistake."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from poolkit.run_output import OutputRefused, RunOutput


def test_a_second_run_on_the_same_file_is_refused_and_the_first_keeps_writing(tmp_path: Path) -> None:
    path = str(tmp_path / "out.jsonl")
    first = RunOutput(path, input_stream=None, truncate=True)
    try:
        first.write_line('{"line": 1}')
        with pytest.raises(OutputRefused, match="being written by another poolkit run"):
            RunOutput(path, input_stream=None, truncate=True)
        first.write_line('{"line": 2}')
        assert Path(path).read_text() == '{"line": 1}\n{"line": 2}\n'  # the refused one truncated nothing
    finally:
        first.close()
    RunOutput(path, input_stream=None, truncate=False).close()  # free again once the first closed


def test_the_input_file_is_never_the_output(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("1\n2\n")
    with open(path, "rb") as stream, pytest.raises(OutputRefused, match="is the input file"):
        RunOutput(str(path), input_stream=stream, truncate=True)
    assert path.read_text() == "1\n2\n"
    with open(path, "rb") as stream:  # a stream without a descriptor is not a file
        RunOutput(str(tmp_path / "out.jsonl"), input_stream=stream, truncate=True).close()
    RunOutput(str(tmp_path / "out2.jsonl"), input_stream=io.BytesIO(b"1\n"), truncate=True).close()


def test_keep_only_rewrites_atomically_keeps_the_mode_and_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"line": 1}\n{"line": 2, "status": "not_run"}\n{"li')
    os.chmod(path, 0o640)
    output = RunOutput(str(path), input_stream=None, truncate=False)
    try:
        output.keep_only([b'{"line": 1}\n'])
        output.write_line('{"line": 2}')
        assert path.read_bytes() == b'{"line": 1}\n{"line": 2}\n'
        assert os.stat(path).st_mode & 0o777 == 0o640
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temporary file left
        with pytest.raises(OutputRefused):  # the new file is held as the old one was
            RunOutput(str(path), input_stream=None, truncate=False)
    finally:
        output.close()


def test_keep_only_follows_a_symbolic_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "out.jsonl"
    real.write_bytes(b"a\nb\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    output = RunOutput(str(link), input_stream=None, truncate=False)
    try:
        output.keep_only([b"a\n"])
    finally:
        output.close()
    assert link.is_symlink()
    assert real.read_bytes() == b"a\n"
