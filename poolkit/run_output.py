"""Where ``poolkit run`` writes its records: stdout, or a file that the run holds alone.

Two promises rest on this file: every record is one whole line (written and
flushed at once, so a run killed at any moment leaves whole lines and at most
one cut last line), and the output is never destroyed by mistake. So the file
is opened without truncating it, and only once the run holds it may it be
emptied:

* it is locked (``flock``, exclusive): a second run on the same file, a
  ``--resume`` while the first still writes, is refused instead of
  interleaving records and tearing lines;
* it is compared with the input: ``-o`` naming the input file would empty the
  input before reading it;
* ``--resume`` tidies the file (``keep_only``) by writing the kept records to
  a new file beside the real one (a symbolic link is followed, not replaced)
  and renaming it over: a kill during the rewrite leaves the old file or the
  new one. The new file is locked before the rename, so the run never lets go.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import tempfile
from typing import BinaryIO, NoReturn, TextIO

__all__ = ["OutputFailed", "OutputRefused", "RunOutput"]


class OutputFailed(Exception):
    """The output went bad mid-run (disk full, a closed pipe): nothing more can be written."""


class OutputRefused(Exception):
    """The output file cannot be used as asked (another run holds it, it is the input): exit status 2."""


def _lock(file: TextIO, path: str) -> None:
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputRefused(
            f"{path!r} is being written by another poolkit run (it holds the file's lock): "
            "wait for that run to end, or write to another file"
        ) from None


class RunOutput:
    """One JSON line per record, flushed each time so that an interrupted run keeps its results."""

    def __init__(self, path: str, *, input_stream: BinaryIO | None, truncate: bool) -> None:
        self.path = path
        self._file: TextIO | None = None
        if path == "-":
            return
        try:
            file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise OutputRefused(f"cannot write output file {path!r}: {exc.strerror or exc}") from None
        try:
            _lock(file, path)
            if input_stream is not None and _same_file(file, input_stream):
                raise OutputRefused(
                    f"the output {path!r} is the input file: writing it would destroy the inputs "
                    "before they are read; write to another file"
                )
            if truncate:
                file.truncate(0)
        except BaseException:
            file.close()
            raise
        self._file = file

    @property
    def stream(self) -> TextIO:
        # stdout looked up each time: rich's live display swaps it for a proxy that prints above the bar.
        return self._file if self._file is not None else sys.stdout

    def write_line(self, line: str) -> None:
        stream = self.stream
        try:
            stream.write(line + "\n")
            stream.flush()
        except OSError as exc:
            self._broken(exc)

    def _broken(self, exc: OSError) -> NoReturn:
        where = "stdout" if self._file is None else repr(self.path)
        if self._file is None:
            # Nobody reads stdout any more (`| head`): stop Python's exit-time flush from complaining.
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
        raise OutputFailed(f"cannot write to {where}: {exc.strerror or exc}") from exc

    def keep_only(self, records: list[bytes]) -> None:
        """Replace the file's content by ``records``, atomically; the run keeps holding it."""
        old = self._file
        if old is None:
            raise ValueError("stdout cannot be rewritten")
        target = os.path.realpath(self.path)
        fd, tmp = tempfile.mkstemp(prefix=".poolkit-resume-", dir=os.path.dirname(target))
        new: TextIO | None = None
        try:
            with os.fdopen(fd, "wb") as out:
                out.writelines(records)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, os.stat(target).st_mode & 0o7777)
            new = open(tmp, "a", encoding="utf-8")  # noqa: SIM115 - kept as the output
            _lock(new, self.path)  # a file nobody else has seen: this never waits
            os.replace(tmp, target)
        except BaseException:
            if new is not None:
                new.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._file = new
        old.close()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                sys.stderr.write(f"poolkit: closing {self.path!r} failed: {exc.strerror or exc}\n")


def _same_file(output: TextIO, input_stream: BinaryIO) -> bool:
    try:
        return os.path.samestat(os.fstat(output.fileno()), os.fstat(input_stream.fileno()))
    except (OSError, ValueError):
        return False  # an input without a descriptor (a test's BytesIO) is not a file
