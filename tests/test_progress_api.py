"""``progress=`` on ``map``, ``imap_unordered`` and ``batch``, as a library user sees it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jobs
import pytest
from conftest import LeakCheck, python_env, read_pty

import poolkit
from poolkit.job_progress import ProgressCounts

pytestmark = pytest.mark.timeout(120)


class Recorder:
    """A ``progress=`` callable that keeps every count it receives."""

    def __init__(self) -> None:
        self.calls: list[ProgressCounts] = []
        self.threads: set[str] = set()

    def __call__(self, counts: ProgressCounts) -> None:
        self.calls.append(counts)
        self.threads.add(threading.current_thread().name)

    @property
    def final(self) -> ProgressCounts:
        assert self.calls, "the callable was never called"
        assert self.calls[-1].finished, "the last call did not say the run is over"
        return self.calls[-1]


def progress_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "poolkit-progress"]


def test_map_reports_every_input_and_returns_the_same_results(leak_check: LeakCheck) -> None:
    recorder = Recorder()
    with poolkit.Pool(2) as pool:
        results = list(pool.map(jobs.square, range(300), progress=recorder))
        assert not progress_threads()  # joined when the iterator ended
    assert results == [x * x for x in range(300)]
    final = recorder.final
    assert (final.total, final.done, final.failed, final.running) == (300, 300, 0, 0)
    assert recorder.threads == {"poolkit-progress"}  # never the manager's thread nor the caller's


def test_map_with_many_iterables_and_a_failure(leak_check: LeakCheck) -> None:
    recorder = Recorder()
    with poolkit.Pool(2) as pool:
        it = pool.map(jobs.square_or_crash, [1, 2, 3], [(), (2,), ()], progress=recorder)
        with pytest.raises(poolkit.WorkerCrashed):
            list(it)
    final = recorder.final  # the caller stopped at the error: input 3 may still have been running
    assert final.total == 3 and final.failed == 1 and final.done in (1, 2)


def test_imap_unordered_learns_the_total_when_the_stream_ends(leak_check: LeakCheck) -> None:
    recorder = Recorder()
    with poolkit.Pool(2) as pool:
        results = sorted(pool.imap_unordered(jobs.square, (x for x in range(50)), progress=recorder))
    assert results == [x * x for x in range(50)]
    assert recorder.calls[0].total is None or recorder.calls[0].total == 50
    final = recorder.final
    assert (final.total, final.done, final.failed) == (50, 50, 0)


def test_batch_counts_inputs_after_their_last_attempt(tmp_path: Path, leak_check: LeakCheck) -> None:
    recorder = Recorder()
    with poolkit.Pool(2) as pool:
        inputs = [(x, str(tmp_path)) for x in range(8)]
        outcomes = list(pool.batch(_star_square_or_crash_once, inputs, retries=1, progress=recorder))
    assert [o.ok for o in outcomes] == [True] * 7 + [False]
    final = recorder.final
    # input 3 crashed its worker once and passed on its retry; input 7 always raises
    assert (final.total, final.done, final.failed) == (8, 7, 1)


def _star_square_or_crash_once(args: tuple[int, str]) -> int:
    return jobs.square_or_crash_once(*args)


def test_the_batch_function_takes_progress_too(leak_check: LeakCheck) -> None:
    recorder = Recorder()
    assert [o.value for o in poolkit.batch(jobs.square, range(7), max_workers=2, progress=recorder)] == [
        x * x for x in range(7)
    ]
    assert (recorder.final.total, recorder.final.done) == (7, 7)


@pytest.mark.parametrize("chunksize", [None, 1])
def test_map_counts_one_failure_and_what_it_left_unrun_as_cancelled(
    chunksize: int | None, leak_check: LeakCheck
) -> None:
    recorder = Recorder()
    with poolkit.Pool(2) as pool:
        seen = []
        with pytest.raises(ValueError):
            for value in pool.map(jobs.fail_at, range(400), [200] * 400, chunksize=chunksize, progress=recorder):
                seen.append(value)
    assert seen == list(range(200))
    final = recorder.final
    assert final.failed == 1, final  # only input 200 failed; nothing else did
    assert final.done >= 200 and final.done + final.failed + final.cancelled <= 400


@pytest.mark.parametrize("method", ["map", "imap_unordered"])
def test_leaving_early_counts_nothing_as_failed(method: str, leak_check: LeakCheck) -> None:
    recorder = Recorder()
    with poolkit.Pool(2) as pool:
        results = getattr(pool, method)(jobs.sleep_then, [0.02] * 40, progress=recorder)
        for n, _ in enumerate(results):
            if n == 3:
                break
        results.close()
    final = recorder.final
    assert final.failed == 0 and final.done >= 4, final


def test_an_abandoned_batch_ends_its_progress(leak_check: LeakCheck) -> None:
    recorder = Recorder()
    with poolkit.Pool(2) as pool:
        outcomes = pool.batch(jobs.sleep_then, [0.01] * 100, progress=recorder)
        for n, _ in enumerate(outcomes):
            if n == 2:
                break
        outcomes.close()  # type: ignore[attr-defined]
        assert not progress_threads()
    assert recorder.final.settled < 100


def test_progress_true_writes_lines_to_stderr_and_nothing_to_stdout(
    capfd: pytest.CaptureFixture[str], leak_check: LeakCheck
) -> None:
    with poolkit.Pool(2) as pool:
        assert list(pool.map(jobs.square, range(20), progress=True)) == [x * x for x in range(20)]
    out, err = capfd.readouterr()
    assert out == ""
    assert err.splitlines()[-1].startswith("poolkit map: 20/20 (100.0%) settled, 20 done, 0 failed")


@pytest.mark.parametrize("method", ["map", "imap_unordered", "batch"])
def test_a_bad_progress_argument_is_refused_at_the_call(method: str, leak_check: LeakCheck) -> None:
    with poolkit.Pool(1) as pool:
        with pytest.raises(TypeError, match="progress must be True, False, None or a callable"):
            getattr(pool, method)(jobs.square, range(3), progress="yes")
        assert pool.submit(jobs.square, 4).result(timeout=30) == 16  # the pool is unharmed


def test_a_raising_callable_does_not_stop_the_run(leak_check: LeakCheck) -> None:
    def broken(counts: ProgressCounts) -> None:
        raise RuntimeError("display broke")

    with poolkit.Pool(2) as pool, pytest.warns(RuntimeWarning, match="display broke"):
        assert list(pool.map(jobs.square, range(10), progress=broken)) == [x * x for x in range(10)]


SCRIPT = textwrap.dedent(
    """
    import poolkit, jobs
    if __name__ == "__main__":
        with poolkit.Pool(2) as pool:
            results = list(pool.map(jobs.sleep_then, [0.02] * 60, progress=True))
        print("results", len(results))
    """
)


def test_a_terminal_shows_a_live_bar_on_stderr_and_stdout_stays_clean(tmp_path: Path) -> None:
    script = tmp_path / "bar.py"
    script.write_text(SCRIPT)
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env={**python_env(), "TERM": "xterm-256color", "COLUMNS": "120"},
    )
    os.close(slave)
    try:
        screen = read_pty(master, proc, time.monotonic() + 90).decode("utf-8", "replace")
        stdout = proc.communicate(timeout=30)[0].decode()
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert stdout == "results 60\n"
    assert "\x1b[" in screen, "no live redraw: rich did not see a terminal"
    assert "poolkit map" in screen
    assert "60/60" in screen and "60 done" in screen and "0 failed" in screen
    assert "running" in screen and "left" in screen
