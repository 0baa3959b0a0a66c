"""``poolkit.job_progress``: counting and showing a run's progress, with plain futures (no processes)."""

from __future__ import annotations

import io
import threading
from concurrent.futures import Future
from typing import Any

import pytest

from poolkit import job_progress
from poolkit.job_progress import ProgressCounts, check_progress, make_tracker, total_of
from poolkit.progress_bar import LiveBar

pytestmark = pytest.mark.timeout(30)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[ProgressCounts] = []
        self.last = threading.Event()

    def __call__(self, counts: ProgressCounts) -> None:
        self.calls.append(counts)
        if counts.finished:
            self.last.set()


def progress_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "poolkit-progress"]


def test_off_costs_nothing() -> None:
    assert make_tracker(None, "map", 10) is None
    assert make_tracker(False, "map", 10) is None


@pytest.mark.parametrize("bad", [1, "yes", 0.5, object()])
def test_a_bad_progress_argument_is_refused_where_it_is_passed(bad: Any) -> None:
    with pytest.raises(TypeError, match="progress must be True, False, None or a callable"):
        check_progress(bad)


def test_total_of_never_consumes_an_iterator() -> None:
    it = iter([1, 2, 3])
    assert total_of(it) is None
    assert list(it) == [1, 2, 3]
    assert total_of(range(7)) == 7


def test_watched_futures_settle_as_done_or_failed_and_the_last_call_says_finished() -> None:
    recorder = Recorder()
    tracker = make_tracker(recorder, "map", 6)
    assert tracker is not None
    futures: list[Future[Any]] = [Future() for _ in range(3)]
    for future in futures:
        tracker.watch(future, 2)
    futures[0].set_running_or_notify_cancel()
    assert tracker.counts().running == 1
    futures[0].set_result([1, 2])
    futures[1].set_exception(ValueError("x"))
    futures[2].cancel()
    assert recorder.last.wait(10)  # all 6 inputs settled: the tracker ends by itself
    tracker.close()
    final = recorder.calls[-1]
    # the cancelled job's inputs will not run: cancelled, not failed
    assert (final.total, final.done, final.failed, final.cancelled, final.running) == (6, 2, 2, 2, 0)
    assert final.finished
    assert not progress_threads()


def test_a_run_that_settles_its_own_inputs_is_not_counted_twice() -> None:
    recorder = Recorder()
    tracker = make_tracker(recorder, "batch", None)
    assert tracker is not None
    future: Future[Any] = Future()
    tracker.watch(future, 1, settles=False)
    future.set_exception(OSError("first attempt"))  # the batch retries it
    tracker.settle(ok=True)
    tracker.set_total(1)
    assert recorder.last.wait(10)
    tracker.close()
    assert (recorder.calls[-1].done, recorder.calls[-1].failed) == (1, 0)


def test_close_ends_an_abandoned_run_and_joins_the_thread() -> None:
    recorder = Recorder()
    tracker = make_tracker(recorder, "imap_unordered", None)
    assert tracker is not None
    tracker.close()
    assert recorder.calls and recorder.calls[-1].finished
    assert not progress_threads()


def test_a_callable_that_raises_is_logged_once_and_not_called_again(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def broken(counts: ProgressCounts) -> None:
        calls.append(counts)
        raise RuntimeError("display broke")

    tracker = make_tracker(broken, "map", None)
    assert tracker is not None
    with pytest.warns(RuntimeWarning, match="raised RuntimeError.*will not be called again"):
        tracker.close()  # the last call happens in the reporter thread, before close returns
    assert len(calls) == 1
    assert "raised; it will not be called again" in caplog.text


def test_the_counts_line() -> None:
    counts = ProgressCounts("map", 10, done=3, failed=1, running=2, elapsed=2.0)
    assert counts.rate == 2.0
    assert counts.eta == 3.0
    line = counts.line()
    assert line.startswith("poolkit map: 4/10 (40.0%) settled, 3 done, 1 failed, 2 running, 2.0/s")
    assert "0:00:03 left" in line
    unknown = ProgressCounts("imap_unordered", None, done=0, failed=0, running=0, elapsed=0.0)
    assert unknown.eta is None and "0/?" in unknown.line()
    empty = ProgressCounts("batch", 0, done=0, failed=0, running=0, elapsed=0.0, finished=True)
    assert "0/0 settled" in empty.line()
    left = ProgressCounts("map", 10, done=2, failed=1, running=0, elapsed=1.0, finished=True, cancelled=7)
    assert "1 failed, 7 cancelled" in left.line()


def test_plain_lines_go_to_stderr_when_it_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    err, out = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr("sys.stdout", out)
    tracker = make_tracker(True, "map", 2)
    assert tracker is not None
    tracker.settle(ok=True, inputs=2)
    tracker.close()
    assert err.getvalue().splitlines()[-1].startswith("poolkit map: 2/2 (100.0%) settled, 2 done")
    assert out.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_and_a_notebook_gets_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    err = _Terminal()
    monkeypatch.setattr("sys.stderr", err)
    tracker = make_tracker(True, "batch", 4)
    assert tracker is not None
    assert isinstance(tracker._sink, LiveBar)
    tracker.settle(ok=True, inputs=3)
    tracker.settle(ok=False, inputs=1)
    tracker.close()
    assert "poolkit batch" in err.getvalue() and "3 done" in err.getvalue()

    monkeypatch.setitem(__import__("sys").modules, "ipykernel", object())
    tracker = make_tracker(True, "batch", 1)
    assert tracker is not None
    assert isinstance(tracker._sink, job_progress._Lines)
    tracker.close()


def test_a_second_bar_while_one_is_live_falls_back_to_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", _Terminal())
    outer = make_tracker(True, "map", None)
    inner = make_tracker(True, "map", None)
    assert outer is not None and inner is not None
    try:
        assert isinstance(outer._sink, LiveBar)
        assert isinstance(inner._sink, job_progress._Lines)
    finally:
        inner.close()
        outer.close()
