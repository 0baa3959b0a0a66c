"""The ``poolkit`` command: ``poolkit run`` over JSON lines, and ``poolkit demo``.

``poolkit run MODULE:FUNCTION INPUT -o OUTPUT`` is ``poolkit.batch.run_batch``
from the shell. Its contract with the user:

* every non-blank input line gets exactly one output line, written (and
  flushed) as soon as it is known, so a run cut short keeps what finished;
* ``status`` is ``"ok"``, ``"error"`` (the job raised, its worker crashed, it
  timed out, or the line was not valid JSON: ``InvalidInput``) or
  ``"not_run"`` (the run was interrupted before this input's result was
  recorded: it never started, or it was stopped; safe to run again);
* the exit status is 0 only when every input succeeded (``--allow-failures``:
  0 unless interrupted), 1 when some failed, 2 for usage errors (bad module,
  function, option or output path), 130 after Ctrl-C and 143 after SIGTERM.

Ctrl-C is made safe by deferring it while a line is being written: the signal
handler raises only outside those short critical sections, so no output line
is ever cut in half or counted twice; blocking waits (for a slow job, for
stdin) are still interrupted at once.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import io
import json
import math
import os
import signal
import stat
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Iterator
from types import FrameType
from typing import Any, BinaryIO, NoReturn, cast

from . import __version__
from .batch import PENDING, Outcome, run_batch
from .durations import format_duration
from .options import POOL_OPTIONS
from .pool import Pool
from .progress import (
    MODES,
    RichRunDisplay,
    RunDisplay,
    RunTally,
    StatsPoller,
    make_run_display,
    print_summary,
)
from .resume import Previous, ResumeError, input_hash, read_previous
from .run_output import OutputFailed, OutputRefused, RunOutput
from .serialization import dumps
from .stats import RECYCLING_REASONS, PoolStats

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM

_EPILOG = """\
examples:
  # run mymod.score on every JSON line of inputs.jsonl, 4 workers, results to out.jsonl
  poolkit run mymod:score inputs.jsonl -o out.jsonl --workers 4

  # read stdin; spread each [a, b] or {"a": 1} line as the function's arguments
  printf '[1, 2]\\n[3, 4]\\n' | poolkit run operator:add --star

  # recycle leaky workers, kill jobs past 30 s, retry crashed or timed-out inputs twice
  poolkit run mymod:render pages.jsonl -o out.jsonl \\
      --max-memory-per-child 1GiB --timeout 30 --retries 2

  # the tour: a mixed batch with crashes, timeouts and recycling, live
  poolkit demo

exit status: 0 every input succeeded; 1 some failed; 2 usage error;
             130 interrupted (Ctrl-C), 143 terminated (SIGTERM)
"""

_RUN_EPILOG = """\
input and output:
  INPUT holds one JSON value per line (blank lines are skipped); '-' or nothing
  reads stdin. Each value is passed as the function's one argument (with --star:
  a list as positional arguments, an object as keyword arguments).
  One JSON line per input is written to OUTPUT ('-' or nothing: stdout), in the
  order inputs finish (--ordered: input order), each written and flushed as
  soon as its input finishes, while later input is still being read:

    {"index": 0, "line": 1, "status": "ok", "input": 3, "result": 9,
     "attempts": 1, "worker_id": 2, "pid": 4242, "wall_time": 0.0012}
    {"index": 1, "line": 2, "status": "error", "input": 0, "error": {"type":
     "ZeroDivisionError", "message": "division by zero", "traceback": "..."}, ...}

  index counts non-blank input lines from 0; line is the 1-based line number.
  A line that is not valid JSON gets an "error" record with error type
  "InvalidInput" (and a message on stderr); the other lines still run.
  A crashed worker gives error type "WorkerCrashed", a timeout "JobTimeout";
  a job that calls sys.exit() or raises KeyboardInterrupt fails that input
  ("SystemExit", "KeyboardInterrupt"), and the run goes on.
  "attempts" counts the runs of the input (retries included).
  --no-input leaves "input" out of every record (index and line still say
  which input it is): for big inputs, whose copy would double the output.

  The output is strict JSON: a float NaN or infinity in a result (or input)
  is written as null, as JSON has no such numbers. A result that JSON cannot
  hold (an object, a string with a lone surrogate such as
  os.fsdecode(b'caf\xe9')) fails that input with error type "ResultNotJSON".

the function and its workers:
  MODULE is imported as 'python -m' would: the current directory comes first
  on sys.path, for the whole run (so a file there named like a standard module,
  statistics.py say, hides that module from the function and its imports).
  Workers read stdin from /dev/null (the input lines are poolkit run's), and
  what a job prints (stdout) goes to poolkit run's stderr, never into the JSON
  lines.

reading stdin:
  Inputs are read a few ahead of the workers (2 x workers + 2 jobs). When stdin
  waits for a slow producer, each result is still written as soon as it
  finishes. One input per job unless --chunksize. On a terminal, poolkit run
  says that it reads stdin; end the input with Ctrl-D.

interrupting:
  Ctrl-C (or SIGTERM) stops the run cleanly: running jobs are stopped, workers
  end, and every input without a result gets a final line with status
  "not_run" (for a file INPUT, including the lines not read yet; for stdin,
  stderr says after which line reading stopped). Exit status 130 (143).

resuming:
  Every record holds "input_hash", a hash of its input line. With --resume
  OUTPUT, poolkit reads OUTPUT, keeps the records of inputs that finished ("ok",
  and "error" unless --retry-failed), runs every other input line and appends
  to OUTPUT, which ends with exactly one record per input. Records are matched
  to input lines by line number and hash: if a line changed since, the run is
  refused (exit status 2; for a file INPUT before anything runs). A run killed
  at any moment, even by SIGKILL, can be resumed: a partly written last record
  and the "not_run" records of an interrupted run are dropped and redone.
  OUTPUT missing: the run starts from the beginning.

exit status:
  0 every input succeeded (or --allow-failures); 1 some input failed (with
  --resume, also one whose failure is kept from the earlier run); 2 a usage
  error, or a run refused before it started (a changed input under --resume,
  an output another run is writing, -o naming the input file); 130
  interrupted (Ctrl-C); 143 terminated (SIGTERM)

examples:
  poolkit run mymod:score inputs.jsonl -o out.jsonl --workers 4
  printf '[1, 2]\\n[3, 4]\\n' | poolkit run operator:add --star
  poolkit run mymod:render pages.jsonl -o out.jsonl --max-memory-per-child 1GiB \\
      --timeout 30 --retries 2 --allow-failures
"""


class UsageError(Exception):
    """A mistake in the command line: reported with the usage text, exit status 2."""


# ----------------------------------------------------------------- argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _size(text: str) -> int | str:
    """A memory size: bytes, or a number with a unit ('512MiB'); the pool checks the unit."""
    return int(text) if text.isdigit() else text


_FLAG_TYPES: dict[str, Callable[[str], Any]] = {"count": _positive_int, "size": _size, "seconds": _seconds}


def _add_pool_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per pool option the command line offers, named after it (options.py)."""
    for option in POOL_OPTIONS:
        if option.cli is None:
            continue
        short = [alias for alias in option.aliases if not alias.startswith("--")]
        long = [alias for alias in option.aliases if alias.startswith("--")]
        if option.cli == "choice":
            group.add_argument(
                *short, option.flag, *long, dest=option.name, choices=option.choices, help=option.help
            )
        else:
            group.add_argument(
                *short, option.flag, *long, dest=option.name, type=_FLAG_TYPES[option.cli],
                metavar=option.metavar, help=option.help,
            )


def _pool_options(args: argparse.Namespace) -> dict[str, Any]:
    """The pool options given on the command line (those left out keep the pool's defaults)."""
    return {
        option.name: getattr(args, option.name)
        for option in POOL_OPTIONS
        if option.cli is not None and getattr(args, option.name) is not None
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolkit",
        description="Run Python functions over many inputs in recyclable, crash-isolated worker processes.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"poolkit {__version__} (Python {sys.version.split()[0]})"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run MODULE:FUNCTION on every JSON line of INPUT",
        description="Run MODULE:FUNCTION on every JSON line of INPUT in worker processes; "
        "write one JSON line per input to OUTPUT.",
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("target", metavar="MODULE:FUNCTION", help="the function to call, e.g. mypkg.jobs:score")
    run.add_argument("input", metavar="INPUT", nargs="?", default="-", help="JSON lines file; '-' or absent: stdin")
    run.add_argument("-o", "--output", default="-", help="where the JSON lines go; '-' or absent: stdout")
    run.add_argument("--star", action="store_true", help="spread a list input as arguments, a dict as keyword arguments")
    run.add_argument(
        "--no-input", action="store_true",
        help='leave "input" out of the output records (index and line still name the input)',
    )
    pool_group = run.add_argument_group("the pool")
    _add_pool_flags(pool_group)
    pool_group.add_argument("--dask", metavar="ADDRESS", help="run on a Dask cluster (scheduler address)")
    jobs = run.add_argument_group("each input")
    jobs.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="stop an input running longer than this")
    jobs.add_argument(
        "--retries", type=_non_negative_int, default=0, metavar="N",
        help="run an input again up to N times after its worker crashed or it timed out",
    )
    jobs.add_argument("--retry-exceptions", action="store_true", help="also retry inputs whose function raised")
    jobs.add_argument("--ordered", action="store_true", help="write results in input order (default: as they finish)")
    jobs.add_argument(
        "--chunksize", type=_positive_int, metavar="N",
        help="inputs per job (default: 1 for stdin and for files under 64 lines per worker, "
        "else measured so that a job takes about 10 ms)",
    )
    out = run.add_argument_group("reporting")
    out.add_argument(
        "--allow-failures", action="store_true", help="exit 0 even if some inputs failed (not when interrupted)"
    )
    out.add_argument(
        "--progress", choices=MODES, default="auto",
        help="auto: a live bar on a terminal, plain lines otherwise (default: auto)",
    )
    out.add_argument(
        "--progress-interval", type=_seconds, default=2.0, metavar="SECONDS",
        help="seconds between plain progress lines (default: 2)",
    )
    out.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary; errors only")
    again = run.add_argument_group("resuming an earlier run")
    again.add_argument(
        "--resume", metavar="OUTPUT",
        help="continue the run that wrote OUTPUT: skip the inputs it finished, run the rest, "
        "append to OUTPUT (see 'resuming' below)",
    )
    again.add_argument(
        "--retry-failed", action="store_true", help="with --resume: run the inputs that failed again too"
    )
    run.set_defaults(handler=_cmd_run, subparser=run)

    demo = commands.add_parser(
        "demo",
        help="watch poolkit run a mixed batch with crashes, timeouts and recycling",
        description="A self-contained tour (about 20 s): extract, backup and fine-tuning jobs, plus a "
        "leaky job (recycled for memory), a crashing job and a hanging job (timed out), "
        "shown live, then a summary. Needs no setup; everything lives in a temporary directory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 when the pool behaved as expected, 1 otherwise",
    )
    demo.add_argument("-w", "--workers", type=_positive_int, default=4, help="worker processes (default: 4)")
    demo.add_argument(
        "--progress", choices=("auto", "rich", "plain"), default="auto",
        help="auto: a live dashboard on a terminal, plain lines otherwise",
    )
    demo.set_defaults(handler=_cmd_demo, subparser=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``poolkit`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    handler = cast(Callable[[argparse.Namespace], int], args.handler)
    try:
        return handler(args)
    except UsageError as exc:
        _usage_error(args.subparser, str(exc))
    except (ResumeError, OutputRefused) as exc:  # the command line was right; the files say no
        sys.stderr.write(f"{args.subparser.prog}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the run's own handler is in place (importing, starting)
        sys.stderr.write("poolkit: interrupted\n")
        return EXIT_SIGINT


def _usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.print_usage(sys.stderr)
    sys.stderr.write(f"{parser.prog}: error: {message}\n")
    sys.exit(EXIT_USAGE)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(workers=args.workers, progress=args.progress)


# ----------------------------------------------------------------- resolving the function


def resolve_function(spec: str) -> Callable[..., Any]:
    """Import ``MODULE:FUNCTION`` (``FUNCTION`` may be dotted) from the current directory or sys.path."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected MODULE:FUNCTION (for example 'json:dumps'), got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # as 'python -m' does: the user's modules are usually here
    try:
        # What the module prints as it is imported goes to stderr, as a job's prints do:
        # stdout carries the JSON lines.
        with contextlib.redirect_stdout(sys.stderr):
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise UsageError(
                f"no module named {missing!r} (looked in the current directory and on sys.path)"
            ) from None
        raise UsageError(f"importing module {module_name!r} failed: {exc}") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        raise UsageError(f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    found: Any = module
    path = module_name
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            names = [n for n in dir(found) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(repr(n) for n in close)}?" if close else ""
            raise UsageError(f"{path!r} has no attribute {part!r}{hint}") from None
        path = f"{path}.{part}" if path != module_name else f"{module_name}:{part}"
    if not callable(found):
        raise UsageError(f"{spec!r} is not callable (it is a {type(found).__name__})")
    try:
        dumps(found)
    except Exception as exc:
        raise UsageError(
            f"{spec!r} cannot be sent to worker processes: it cannot be pickled "
            f"({type(exc).__name__}: {exc})"
        ) from None
    return cast(Callable[..., Any], found)


# ----------------------------------------------------------------- the pool


def _make_pool(args: argparse.Namespace) -> Any:
    options = _pool_options(args)
    if args.dask is None:
        try:
            return Pool(**{"name": "poolkit-run", **options}, initializer=_detach_worker_streams)
        except (TypeError, ValueError) as exc:
            raise UsageError(str(exc)) from None
    try:
        dask_backend = importlib.import_module("poolkit.dask_backend")
    except ModuleNotFoundError as exc:
        if exc.name == "poolkit.dask_backend":
            raise UsageError("dask support is not installed") from None
        raise UsageError(
            f"dask support needs the {exc.name!r} package: pip install 'poolkit[dask]'"
        ) from None
    try:
        return dask_backend.DaskPool(args.dask, **options)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot reach the Dask scheduler at {args.dask!r}: {exc}") from None


def _detach_worker_streams() -> None:
    """Initializer of ``poolkit run``'s workers: stdout onto stderr.

    A worker inherits the command's descriptors: a job that printed would
    write into the JSON lines on stdout. The descriptor itself is replaced,
    so that C code and subprocesses of a job are covered too. (Every pool's
    workers read stdin from ``/dev/null``: ``template.stdin_from_devnull``.)
    """
    if sys.stdout is not None:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
    os.dup2(2, 1)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # a job's lines reach stderr as it prints them


# ----------------------------------------------------------------- interrupts


class _Interrupted(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM, outside the critical sections."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Interrupts:
    """Turns SIGINT and SIGTERM into ``_Interrupted``, deferred while a line is written."""

    def __init__(self) -> None:
        self.critical = False
        self.pending: int | None = None
        self.stopping = False
        self._saved: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled in the main thread (main() called from a test thread)
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._saved[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            return  # already stopping; the cleanup takes at most the pool's kill grace
        if self.critical:
            self.pending = signum
            return
        self.stopping = True
        raise _Interrupted(signum)

    def protect(self) -> _Interrupts:
        """``with interrupts.protect():`` no interruption inside: a line is written whole and counted once."""
        return self

    def __enter__(self) -> None:
        self.critical = True

    def __exit__(self, *exc_info: object) -> None:
        # A class, not @contextmanager: this runs twice per input, and the generator costs 4x more.
        self.critical = False
        if self.pending is not None and not self.stopping:
            signum, self.pending = self.pending, None
            self.stopping = True
            raise _Interrupted(signum)


# ----------------------------------------------------------------- input and output


def _json_line(value: Any, *, ascii_only: bool = False) -> str:
    """``value`` as one line of strict JSON.

    JSON has no NaN or infinity (Python's ``json`` writes them as bare
    ``NaN``, which strict parsers refuse): they are written as ``null``, as
    JavaScript's ``JSON.stringify`` does. A string that UTF-8 cannot encode
    (a lone surrogate, as ``os.fsdecode`` makes of undecodable bytes) raises
    ``UnicodeEncodeError`` here, before anything is written, unless
    ``ascii_only`` (then it is written as a ``\\udcxx`` escape).
    """
    try:
        line = json.dumps(value, ensure_ascii=ascii_only, allow_nan=False)
    except ValueError as exc:
        if not str(exc).startswith("Out of range float"):
            raise
        line = json.dumps(_finite(value), ensure_ascii=ascii_only, allow_nan=False)
    if not ascii_only:
        line.encode("utf-8")
    return line


def _finite(value: Any) -> Any:
    """``value`` with every NaN and infinity (in lists, tuples and dict values) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


class _StdinLines:
    """Reads stdin's lines in a thread of its own, a bounded number ahead.

    A read from a pipe or a terminal waits for the producer; done in the main
    thread it would hold back every result that finishes meanwhile. Here the
    main thread takes lines without waiting (``take``), and the batch is told
    (``set_wake``) when one arrives, so each result is written as it finishes.
    """

    def __init__(self, stream: BinaryIO, ahead: int) -> None:
        self._stream = stream
        self._ahead = ahead
        self._lines: deque[bytes] = deque()
        self._cond = threading.Condition()
        self._ended = False
        self._stopped = False
        self._error: OSError | ValueError | None = None
        self._wake: Callable[[], None] = lambda: None
        self._thread = threading.Thread(target=self._read, name="poolkit-run-stdin", daemon=True)

    def set_wake(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def start(self) -> None:
        self._thread.start()

    def _read(self) -> None:
        try:
            for raw in _lines_of(self._stream):
                with self._cond:
                    while len(self._lines) >= self._ahead and not self._stopped:
                        self._cond.wait()
                    if self._stopped:
                        return  # this line is lost with the run; stop() was called after its end
                    self._lines.append(raw)
                self._wake()
        except (OSError, ValueError) as exc:  # stdin went bad (or was closed under us)
            self._error = exc
        finally:
            with self._cond:
                self._ended = True
            self._wake()

    def take(self) -> bytes | None:
        """The next line if one has arrived; None if none has (see ``ended``). Main thread only."""
        with self._cond:
            if self._lines:
                raw = self._lines.popleft()
                self._cond.notify()
                return raw
            if self._ended and self._error is not None:
                error, self._error = self._error, None
                raise error
            return None

    @property
    def ended(self) -> bool:
        with self._cond:
            return self._ended and not self._lines

    def stop(self) -> list[bytes]:
        """Stop reading; return the lines read and not taken (they get "not_run" records)."""
        with self._cond:
            self._stopped = True
            lines = list(self._lines)
            self._lines.clear()
            self._cond.notify_all()
        return lines


def _lines_of(stream: BinaryIO) -> Iterator[bytes]:
    """The lines of ``stream``, read from its descriptor with ``os.read`` where it has one.

    Not through the buffered reader: a thread blocked in its ``readline``
    holds the reader's lock, and an interpreter that exits meanwhile (after
    Ctrl-C) aborts on it. A descriptor read holds no lock.
    """
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation: a stream without a descriptor
        yield from stream
        return
    partial: list[bytes] = []  # the pieces of a line not ended yet (joined once: a long line stays linear)
    while True:
        data = os.read(fd, 1 << 16)
        if not data:
            break
        *ended, rest = data.split(b"\n")
        for line in ended:
            if partial:
                partial.append(line)
                line = b"".join(partial)
                partial.clear()
            yield line + b"\n"
        if rest:
            partial.append(rest)
    if partial:
        yield b"".join(partial)


class _LiveInputs:
    """The inputs of a run that reads stdin: values, or ``PENDING`` while no line has arrived."""

    def __init__(self, state: _RunState, lines: _StdinLines) -> None:
        self._state = state
        self._lines = lines

    def set_wake(self, wake: Callable[[], None]) -> None:
        self._lines.set_wake(wake)

    def __iter__(self) -> _LiveInputs:
        return self

    def __next__(self) -> Any:
        while True:
            raw = self._lines.take()
            if raw is None:
                if self._lines.ended:
                    raise StopIteration
                return PENDING
            value = self._state.take_line(raw)
            if value is not _SKIP:
                return value


_SKIP = object()  # a line that is not an input to run (blank, invalid, finished by an earlier run)


def _count_lines(stream: BinaryIO) -> int | None:
    """Non-blank lines left in a regular file (for percentage and ETA); None for a pipe."""
    try:
        if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
            return None
        start = stream.tell()
    except (OSError, ValueError):
        return None
    count = sum(1 for line in stream if line.strip())
    stream.seek(start)
    return count


def _invalid_record(index: int, lineno: int, raw: bytes, message: str) -> dict[str, Any]:
    text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    return {
        "index": index,
        "line": lineno,
        "input_hash": input_hash(raw),
        "status": "error",
        "input": None,
        "raw": text if len(text) <= 1000 else text[:1000] + "...",
        "error": {"type": "InvalidInput", "message": f"line {lineno}: {message}", "traceback": None},
        "attempts": 0,
        "worker_id": None,
        "pid": None,
        "wall_time": None,
    }


def _not_run_record(index: int, lineno: int, digest: str, value: Any) -> dict[str, Any]:
    return {
        "index": index,
        "line": lineno,
        "input_hash": digest,
        "status": "not_run",
        "input": value,
        "attempts": 0,
        "worker_id": None,
        "pid": None,
        "wall_time": None,
    }


def _parse_line(raw: bytes, star: bool) -> tuple[bool, Any]:
    """(True, value) or (False, why the line is not a valid input)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return False, f"not UTF-8 ({exc.reason} at byte {exc.start})"
    try:
        value = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        return False, f"invalid JSON: {exc.msg} at column {exc.colno}"
    if star and not isinstance(value, (list, dict)):
        return False, f"with --star each input must be a JSON array or object, got {type(value).__name__}"
    return True, value


class _RunState:
    """Everything ``poolkit run`` knows about its inputs while it runs (main thread only)."""

    def __init__(
        self,
        args: argparse.Namespace,
        output: RunOutput,
        display: RunDisplay,
        tally: RunTally,
        interrupts: _Interrupts,
        previous: Previous | None,
    ) -> None:
        self.args = args
        self.previous = previous  # with --resume: the inputs an earlier run finished
        self.skipped = 0
        self.output = output
        self.display = display
        self.tally = tally
        self.interrupts = interrupts
        self.next_index = 0  # inputs (non-blank lines) registered so far
        self.lines_read = 0  # the last line number fully registered
        # batch index -> (input index, line, input hash, value) for inputs sent and not yet written
        self.pending: dict[int, tuple[int, int, str, Any]] = {}
        self.batch_count = 0
        self.held_invalid: deque[tuple[int, dict[str, Any]]] = deque()  # --ordered only
        self.errors: Counter[str] = Counter()
        self.retried = 0
        self.not_run = 0
        self.keep_input = not args.no_input

    def inputs(self, stream: BinaryIO) -> Iterator[Any]:
        """The valid inputs of a file, read lazily; invalid lines are written (or held, --ordered) as errors."""
        for raw in stream:
            value = self.take_line(raw)
            if value is not _SKIP:
                yield value

    def take_line(self, raw: bytes) -> Any:
        """Register the next input line; return its value to run, or ``_SKIP``."""
        lineno = self.lines_read + 1
        with self.interrupts.protect():
            self.lines_read = lineno
            if not raw.strip():
                return _SKIP
            if self.previous is not None and self.previous.skips(lineno, raw):
                self.next_index += 1
                self.skipped += 1
                return _SKIP
            ok, value = _parse_line(raw, self.args.star)
            index = self.next_index
            self.next_index += 1
            if not ok:
                self._invalid(index, lineno, raw, value)
                return _SKIP
            kept = value if self.keep_input else None  # --no-input: a big input is not held either
            self.pending[self.batch_count] = (index, lineno, input_hash(raw), kept)
            self.batch_count += 1
        return value

    def _line(self, record: dict[str, Any]) -> str:
        """A record as its output line; the one place that applies --no-input."""
        if not self.keep_input:
            record.pop("input", None)
        try:
            return _json_line(record)
        except UnicodeEncodeError:
            # Only an input can be at fault here (results are checked first): it
            # came from a \udcxx escape in the input line, and goes back as one.
            return _json_line(record, ascii_only=True)

    def _invalid(self, index: int, lineno: int, raw: bytes, why: str) -> None:
        self.display.message(f"poolkit: line {lineno}: {why}; input skipped (error InvalidInput)")
        record = _invalid_record(index, lineno, raw, why)
        if self.args.ordered:
            self.held_invalid.append((index, record))
        else:
            self._write(record, ok=False, error="InvalidInput")

    def _write(self, record: dict[str, Any], *, ok: bool, error: str | None) -> None:
        self.output.write_line(self._line(record))
        self._count(ok, error)

    def _count(self, ok: bool, error: str | None) -> None:
        self.tally.record(ok)
        if error is not None:
            self.errors[error] += 1
        self.display.update()

    def _release_invalid(self, before: int | None) -> None:
        while self.held_invalid and (before is None or self.held_invalid[0][0] < before):
            _, record = self.held_invalid.popleft()
            self._write(record, ok=False, error="InvalidInput")

    def outcome(self, outcome: Outcome[Any]) -> None:
        """Write one finished input (called inside ``protect``)."""
        index, lineno, digest, value = self.pending.pop(outcome.index)
        if self.args.ordered:
            self._release_invalid(index)
        ok = outcome.ok
        error = outcome.error or "Error"
        record: dict[str, Any] = {"index": index, "line": lineno, "input_hash": digest}
        if ok:
            record.update(status="ok", input=value, result=outcome.value)
        else:
            record.update(
                status="error",
                input=value,
                error={"type": error, "message": outcome.message, "traceback": outcome.traceback},
            )
        record.update(
            attempts=outcome.attempts,
            worker_id=outcome.worker_id,
            pid=outcome.pid,
            wall_time=None if outcome.wall_time is None else round(outcome.wall_time, 6),
        )
        if ok:
            try:
                _json_line(outcome.value)
            except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
                ok, error = False, "ResultNotJSON"
                del record["result"]
                record["status"] = "error"
                record["error"] = {
                    "type": error,
                    "message": f"the function returned {type(outcome.value).__name__} "
                    f"{_short_repr(outcome.value)}, which JSON cannot hold: {exc}",
                    "traceback": None,
                }
        line = self._line(record)
        if outcome.attempts > 1:
            self.retried += 1
        self.output.write_line(line)
        self._count(ok, None if ok else error)

    def finish(self) -> None:
        self._release_invalid(None)

    def write_not_run(self, rest: Iterable[bytes], input_is_file: bool) -> str | None:
        """After an interruption: a "not_run" line for every input without a result.

        ``rest``: the input lines not taken yet (a file's lines not read, or
        the lines of stdin read ahead). Returns a note for stderr about stdin
        lines that were never read.
        """
        leftovers: list[tuple[int, dict[str, Any]]] = list(self.held_invalid)
        self.held_invalid.clear()
        for index, lineno, digest, value in self.pending.values():
            leftovers.append((index, _not_run_record(index, lineno, digest, value)))
        self.pending.clear()
        leftovers.sort(key=lambda item: item[0])
        for _, record in leftovers:
            self._record_leftover(record)
        # Name every input that was not taken yet, so the output is complete.
        lineno = self.lines_read
        for raw in rest:
            lineno += 1
            if not raw.strip():
                continue
            index = self.next_index
            self.next_index += 1
            if self.previous is not None and self.previous.skips(lineno, raw):
                continue
            ok, value = _parse_line(raw, self.args.star)
            if ok:
                self._record_leftover(_not_run_record(index, lineno, input_hash(raw), value))
            else:
                self._write(_invalid_record(index, lineno, raw, value), ok=False, error="InvalidInput")
        if not input_is_file:
            return f"stdin was read up to line {lineno}; lines after it were not read"
        return None

    def _record_leftover(self, record: dict[str, Any]) -> None:
        if record["status"] == "not_run":
            self.output.write_line(self._line(record))
            self.not_run += 1
        else:
            self._write(record, ok=False, error="InvalidInput")


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------- poolkit run


def _open_input(path: str) -> tuple[BinaryIO, bool]:
    if path == "-":
        return sys.stdin.buffer, False
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise UsageError(f"cannot read input file {path!r}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(os.fstat(stream.fileno()).st_mode):
        stream.close()
        raise UsageError(f"cannot read input file {path!r}: it is a directory")
    return stream, True


def _cmd_run(args: argparse.Namespace) -> int:
    fn = resolve_function(args.target)
    if args.retry_exceptions and args.retries == 0:
        raise UsageError("--retry-exceptions needs --retries N (N >= 1)")
    _check_resume_args(args)
    stream, input_is_file = _open_input(args.input)
    try:
        nothing_yet = args.resume is not None and not os.path.exists(args.resume)
        output = RunOutput(args.output, input_stream=stream, truncate=args.resume is None)
    except BaseException:
        if input_is_file:
            stream.close()
        raise
    try:
        previous = _previous_run(args, stream, input_is_file, output, nothing_yet)
    except BaseException:
        output.close()
        if input_is_file:
            stream.close()
        raise
    pool = None
    try:
        pool = _make_pool(args)
        return _run(args, fn, pool, stream, input_is_file, output, previous)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        output.close()
        if input_is_file:
            stream.close()


def _check_resume_args(args: argparse.Namespace) -> None:
    """``--resume OUTPUT`` is where the output goes; refuse what contradicts it, before reading anything."""
    if args.resume is None:
        if args.retry_failed:
            raise UsageError("--retry-failed needs --resume OUTPUT (the output of the run to continue)")
        return
    if args.resume == "-":
        raise UsageError("--resume needs a file: the output file of the run to continue")
    if args.output not in ("-", args.resume) and os.path.abspath(args.output) != os.path.abspath(args.resume):
        raise UsageError(
            f"--resume writes to the file it resumes ({args.resume!r}); leave out -o or give the same file"
        )
    args.output = args.resume


def _previous_run(
    args: argparse.Namespace, stream: BinaryIO, input_is_file: bool, output: RunOutput, nothing_yet: bool
) -> Previous | None:
    """With ``--resume``: what the earlier run finished, checked against a file input, its file tidied.

    The file keeps only the records of finished inputs (see ``poolkit.resume``)
    before anything runs, so that the records appended after them make exactly
    one per input. The run already holds the file (``RunOutput``): no other
    run writes it meanwhile.
    """
    if args.resume is None:
        return None
    if nothing_yet:
        sys.stderr.write(f"poolkit: nothing to resume: {args.resume!r} did not exist; starting from the beginning\n")
        return Previous(args.resume)
    previous = read_previous(args.resume, retry_failed=args.retry_failed)
    if input_is_file:
        previous.check_all(stream)
    if previous.dropped:
        try:
            output.keep_only(previous.records)
        except OSError as exc:
            raise OutputRefused(f"cannot rewrite {args.resume!r}: {exc.strerror or exc}") from None
    return previous


def _run(
    args: argparse.Namespace,
    fn: Callable[..., Any],
    pool: Any,
    stream: BinaryIO,
    input_is_file: bool,
    output: RunOutput,
    previous: Previous | None = None,
) -> int:
    lines = _count_lines(stream)
    finished_before = 0 if previous is None else len(previous.done)
    tally = RunTally(total=None if lines is None else lines - finished_before)
    mode = "none" if args.quiet else args.progress
    display, console = make_run_display(mode, tally, interval=args.progress_interval)
    interrupts = _Interrupts()
    state = _RunState(args, output, display, tally, interrupts, previous)
    # A file is read in this thread (a read never waits long); a pipe or a
    # terminal by a thread of its own, so that waiting for input holds back no result.
    stdin_lines = None if lines is not None else _StdinLines(stream, ahead=pool.max_workers * 2 + 2)
    inputs: Iterable[Any] = state.inputs(stream) if stdin_lines is None else _LiveInputs(state, stdin_lines)
    if args.input == "-" and sys.stdin.isatty():
        sys.stderr.write("poolkit: reading inputs from stdin, one JSON value per line (Ctrl-D ends them)\n")
    poller = StatsPoller(pool.stats, lambda s: setattr(tally, "recycled", s.recycled))
    stopped_by: int | None = None
    failure: BaseException | None = None
    started = time.monotonic()
    interrupts.install()
    outcomes: Generator[Outcome[Any], None, None] | None = None
    try:
        try:
            display.start()
            poller.start()
            if stdin_lines is not None:
                stdin_lines.start()
            # stop_running: when the loop below is left early (Ctrl-C, an
            # unwritable output), closing the batch cancels what is queued and
            # kills what runs; the user wants them stopped, not finished.
            outcomes = run_batch(
                pool,
                fn,
                inputs,
                retries=args.retries,
                retry_exceptions=args.retry_exceptions,
                timeout=args.timeout,
                ordered=args.ordered,
                chunksize=_chunksize(args, tally.total, pool.max_workers),
                max_in_flight=None,
                star=args.star,
                stop_running=True,
            )
            for outcome in outcomes:
                with interrupts.protect():
                    state.outcome(outcome)
            with interrupts.protect():
                state.finish()
        except _Interrupted as exc:
            stopped_by = exc.signum
        except Exception as exc:  # output unwritable, input unreadable, pool broken: stop cleanly
            failure = exc
        finally:
            interrupts.stopping = True  # a second Ctrl-C during the cleanup is ignored
        if stopped_by is not None or failure is not None:
            if outcomes is not None:
                outcomes.close()
            pool.shutdown(wait=True, cancel_futures=True)
            if not isinstance(failure, OutputFailed):
                note: str | None = None
                try:
                    rest = stream if stdin_lines is None else stdin_lines.stop()
                    note = state.write_not_run(rest, input_is_file)
                except OutputFailed as exc:
                    failure = exc
                except OSError as exc:  # the input went bad as well: what was written stands
                    note = f"could not read the rest of the input: {exc}"
                if note:
                    display.message(f"poolkit: {note}")
        else:
            pool.shutdown(wait=True)
    finally:
        poller.stop()
        final = _final_stats(pool)
        if final is not None:
            tally.recycled = final.recycled
        display.stop()
        interrupts.restore()
    wall = time.monotonic() - started
    if stopped_by is not None:
        name = signal.Signals(stopped_by).name
        sys.stderr.write(
            f"poolkit: interrupted by {name}; workers stopped; {state.not_run} inputs did not run "
            f"(status \"not_run\" in the output)\n"
        )
    if isinstance(failure, (OutputFailed, ResumeError)):
        sys.stderr.write(f"poolkit: the run stopped: {failure}\n")
    elif failure is not None:
        sys.stderr.write(f"poolkit: the run stopped: {type(failure).__name__}: {failure}\n")
    if not args.quiet:
        _print_run_summary(args, state, tally, final, wall, console, rich_table=isinstance(display, RichRunDisplay))
    if stopped_by is not None:
        return EXIT_SIGINT if stopped_by == signal.SIGINT else EXIT_SIGTERM
    if isinstance(failure, ResumeError):
        return EXIT_USAGE  # the input changed under --resume: the caller's mistake, not a job's
    if failure is not None:
        return EXIT_FAILURES
    failed_before = 0 if previous is None else previous.failed  # the output file holds those too
    if (tally.failed or failed_before) and not args.allow_failures:
        return EXIT_FAILURES
    return EXIT_OK


SMALL_RUN_PER_WORKER = 64


def _chunksize(args: argparse.Namespace, total: int | None, workers: int) -> int | None:
    """One input per job unless the run is known to be big enough for measured chunks.

    ``run_batch``'s measured chunking starts by sending a few inputs per job
    (it cannot know yet how long one takes). For a short run, or a stream of
    unknown length, that can put several slow inputs on one worker while the
    others idle, and hold back their results until the last of them is done;
    a CLI user with a handful of one-minute inputs expects them to run side by
    side and to see each result as it comes. Big files of tiny inputs keep the
    measured chunks, which is where they pay (about 3x the throughput).
    """
    if args.chunksize is not None or args.timeout is not None:
        return cast("int | None", args.chunksize)  # run_batch uses 1 per input under a timeout
    if total is None or total < SMALL_RUN_PER_WORKER * workers:
        return 1
    return None


def _final_stats(pool: Any) -> PoolStats | None:
    try:
        return cast(PoolStats, pool.stats())
    except Exception:
        return None


def _reasons(counts: dict[str, int]) -> str:
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f" ({detail})" if detail else ""


def _print_run_summary(
    args: argparse.Namespace,
    state: _RunState,
    tally: RunTally,
    stats: PoolStats | None,
    wall: float,
    console: Any,
    *,
    rich_table: bool,
) -> None:
    total = tally.done + state.not_run
    failed = ", ".join(f"{name} {count}" for name, count in state.errors.most_common())
    rows = [("inputs", str(total + state.skipped))]
    if state.previous is not None:
        earlier = state.previous
        rows.append(
            ("skipped", f"{state.skipped} (done in an earlier run; {earlier.ok} ok, {earlier.failed} failed)")
        )
        rows.append(("run", f"{tally.done} this time"))
    rows += [
        ("ok", str(tally.ok)),
        ("failed", f"{tally.failed}" + (f" ({failed})" if failed else "")),
    ]
    if state.not_run:
        rows.append(("not run", f"{state.not_run} (interrupted)"))
    rows.append(("retried", f"{state.retried} inputs needed more than one attempt"))
    if stats is not None:
        recycled = {k: v for k, v in stats.retired.items() if k in RECYCLING_REASONS and v}
        rows.append(("workers recycled", f"{stats.recycled}" + _reasons(recycled)))
        # Crashed or killed is not recycled. "terminated" is the run's own stop
        # after Ctrl-C (it terminates jobs at no other time): no news.
        ended = ("shutdown", "idle", "terminated")
        lost = {k: v for k, v in stats.retired.items() if k not in RECYCLING_REASONS and k not in ended and v}
        if lost:
            rows.append(("workers lost", f"{sum(lost.values())}" + _reasons(lost)))
        rows.append(("workers started", str(stats.spawned)))
    rows.append(("wall time", format_duration(wall)))
    rows.append(("throughput", f"{tally.done / wall if wall > 0 else 0.0:.1f} jobs/s"))
    rows.append(("output", "stdout" if args.output == "-" else args.output))

    def style_of(label: str) -> str:
        if label == "failed" and tally.failed:
            return "red"
        if label == "not run":
            return "yellow"
        if label == "ok":
            return "green"
        return ""

    print_summary("poolkit run summary", rows, console, rich_table=rich_table, style_of=style_of)

