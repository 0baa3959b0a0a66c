"""``poolkit run --resume OUT.jsonl``: what an earlier run already did, and whether it still applies.

An earlier run's output is its own job log: one JSON record per input, each
with the input's 1-based ``line`` number and ``input_hash``, a hash of the
input line's bytes. Resuming keeps the records of inputs that finished
(``ok``, and ``error`` unless ``--retry-failed``) and runs every other line.

Why both the line number and a hash: the line number says which input a
record is about, the hash says it is still the same input. A record whose
line now holds something else means the input file changed since; running
the rest would mix two inputs in one output, so the run is refused, before
anything runs when the input is a file, and at that line for stdin.

A run killed at any moment (even SIGKILL) leaves whole lines and at most one
cut last line: the CLI writes a record with one ``write`` and flushes it.
The cut line, the ``not_run`` records an interrupted run wrote, and (with
``--retry-failed``) the error records are dropped: ``Previous.records`` is
what the file keeps (``RunOutput.keep_only`` rewrites it atomically); new
records are appended after the kept ones, so the file ends with exactly one
record per input.

Every record is checked to be a poolkit record (an object with a known
``status``, a ``line`` and an ``input_hash``) before anything is dropped: a
file that is JSON but not a run's output is refused, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, BinaryIO

__all__ = ["FINISHED", "Previous", "ResumeError", "input_hash", "read_previous"]

#: Record statuses that mean "this input finished": a resumed run skips it.
FINISHED = ("ok", "error")
#: Every status a record of ``poolkit run`` may have.
STATUSES = (*FINISHED, "not_run")


class ResumeError(Exception):
    """The earlier output cannot be resumed against this input (a usage error, exit status 2)."""


def input_hash(raw: bytes) -> str:
    """The hash a record keeps of its input line: 16 hex digits of BLAKE2b over its bytes.

    The line ending is left out, so a file moved between ``\\n`` and ``\\r\\n``
    systems still matches. Eight bytes are plenty to tell an edited line from
    the same line; this is not a security measure.
    """
    return hashlib.blake2b(raw.rstrip(b"\r\n"), digest_size=8).hexdigest()


@dataclass
class Previous:
    """The finished inputs of an earlier run: line number -> its record's ``input_hash``."""

    path: str
    done: dict[int, str] = field(default_factory=dict)
    records: list[bytes] = field(default_factory=list)
    ok: int = 0
    failed: int = 0
    dropped: int = 0  # records not kept: not_run, a cut last line, errors to retry
    cut_line: bool = False

    def skips(self, lineno: int, raw: bytes) -> bool:
        """True if line ``lineno`` finished earlier; ResumeError if it holds another input now."""
        expected = self.done.get(lineno)
        if expected is None:
            return False
        if input_hash(raw) != expected:
            raise ResumeError(
                f"line {lineno} of the input is not the input that {self.path!r} recorded for it "
                "(its hash differs): the input changed since that run. Resume with the same "
                "input, or write to a new output file."
            )
        return True

    def check_all(self, stream: BinaryIO) -> None:
        """Check every finished record against a seekable input before anything runs."""
        start = stream.tell()
        seen = 0
        for lineno, raw in enumerate(stream, start=1):
            if self.skips(lineno, raw):
                seen += 1
        stream.seek(start)
        if seen != len(self.done):
            last = max(self.done)
            raise ResumeError(
                f"{self.path!r} has records for input lines the input does not have (up to line "
                f"{last}): the input changed since that run. Resume with the same input, or write "
                "to a new output file."
            )


def read_previous(path: str, *, retry_failed: bool) -> Previous:
    """Read an earlier run's output; ResumeError when it is not such an output."""
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise ResumeError(f"nothing to resume: {path!r} does not exist") from None
    except OSError as exc:
        raise ResumeError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    previous = Previous(path)
    with stream:
        for number, raw in enumerate(stream, start=1):
            if not raw.endswith(b"\n"):
                previous.cut_line = True  # the run was killed while writing it: it is redone
                previous.dropped += 1
                break
            record = _record(path, number, raw)
            lineno, digest = _key(path, number, record)
            status = record.get("status")
            if status not in STATUSES:
                raise ResumeError(
                    f"{path!r} record {number} has status {status!r}, which poolkit run does not "
                    "write: not a poolkit run's output"
                )
            if status == "not_run" or (status == "error" and retry_failed):
                previous.dropped += 1
                continue
            if lineno in previous.done:
                raise ResumeError(
                    f"{path!r} has two finished records for input line {lineno} (record {number}): "
                    "it is not the output of one poolkit run"
                )
            previous.done[lineno] = digest
            previous.records.append(raw)
            if status == "ok":
                previous.ok += 1
            else:
                previous.failed += 1
    return previous


def _record(path: str, number: int, raw: bytes) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResumeError(f"{path!r} record {number} is not JSON ({exc}): not a poolkit run's output") from None
    if not isinstance(record, dict):
        raise ResumeError(f"{path!r} record {number} is not a JSON object: not a poolkit run's output")
    return record


def _key(path: str, number: int, record: dict[str, Any]) -> tuple[int, str]:
    lineno, digest = record.get("line"), record.get("input_hash")
    if not isinstance(lineno, int) or isinstance(lineno, bool) or lineno < 1:
        raise ResumeError(f"{path!r} record {number} has no input line number: not a poolkit run's output")
    if not isinstance(digest, str):
        raise ResumeError(
            f"{path!r} record {number} has no input_hash: it was written by a poolkit that did not "
            "record one, so the input cannot be checked; run again into a new output file"
        )
    return lineno, digest
