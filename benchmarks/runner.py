"""Measure one peer on one scenario, in this fresh interpreter; print one JSON line.

    python -m benchmarks.runner PEER SCENARIO [--profile full|quick] [--deadline SECONDS]

The harness starts this module once per (peer, scenario, repetition), so no
pool ever sees another's leftovers (imports, threads, zombies, a broken
semaphore). The answer is the last stdout line that starts with
``BENCH_RESULT``; anything a library prints is ignored.

``--deadline`` counts from the start of this process. Waiting past it ends
the measurement, reported with what was done so far: as a "hang" when no
result had come back for the last ``HANG_IDLE`` seconds, as a "timeout" when
the pool was still answering (or the call shows no progress). The harness's
own wall-clock cap, a little later, is the backstop for a process that
cannot even report.
The result is printed before the pool is closed (closing is not part of any
scenario); then the pool gets ``CLOSE_TIMEOUT`` seconds to close in a thread,
reported on a ``BENCH_CLOSE`` line. After a hang, or a close that does not
return, the process leaves with ``os._exit``: a hung pool's atexit handlers
could hang too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from typing import Any

MARKER = "BENCH_RESULT "
CLOSE_MARKER = "BENCH_CLOSE "
CLOSE_TIMEOUT = 10.0
HANG_IDLE = 5.0  # seconds without a result, at the deadline, that make a hang


def _classify(hang: Any, span: float) -> dict[str, str]:
    """A pool idle for the last ``HANG_IDLE`` of its time is stuck ("hang"); else only slow ("timeout")."""
    idle = hang.details.get("idle_s")
    answered = hang.details.get("answered")
    if idle is not None and idle >= min(HANG_IDLE, 0.25 * span):
        return {"status": "hang", "reason": f"no result for the last {idle:.1f} s before the deadline, "
                f"after {answered} answered"}
    if idle is not None:
        return {"status": "timeout", "reason": f"still answering at the deadline ({answered} answered, "
                f"the last {idle:.2f} s before)"}
    return {"status": "timeout", "reason": f"{hang} (this call shows no progress, so slow or stuck)"}


def measure(
    peer_name: str, scenario_key: str, profile: str, started: float, deadline: float
) -> tuple[dict[str, Any], Any]:
    """Run the scenario; return the result and the peer (whose pool is still open)."""
    from .peers import Hang, NotApplicable, make_peer
    from .scenarios import SCENARIOS

    scenario = SCENARIOS[scenario_key]
    result: dict[str, Any] = {"peer": peer_name, "scenario": scenario_key, "profile": profile}
    peer = make_peer(peer_name)
    try:
        peer.prepare()
        figures = scenario.run(peer, scenario.sizes[profile], deadline)
        result.update(status="ok", **figures)
    except NotApplicable as exc:
        result.update(status="n/a", reason=str(exc))
    except Hang as exc:
        result.update(_classify(exc, deadline - started), **exc.details)
    except Exception as exc:
        result.update(
            status="error",
            reason=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(limit=6)[-2000:],
        )
    if peer.note:
        result["note"] = peer.note
    return result, peer


def close_within(peer: Any, timeout: float) -> float | None:
    """Close the peer's pool in a thread; its duration, or None if it did not return in time."""
    start = time.perf_counter()
    thread = threading.Thread(target=peer.close, name="close", daemon=True)
    thread.start()
    thread.join(timeout)
    return None if thread.is_alive() else time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runner")
    parser.add_argument("peer")
    parser.add_argument("scenario")
    parser.add_argument("--profile", choices=("full", "quick"), default="full")
    parser.add_argument("--deadline", type=float, default=55.0, help="seconds from start")
    args = parser.parse_args(argv)
    result, peer = measure(args.peer, args.scenario, args.profile, started, started + args.deadline)
    _emit(MARKER, result)
    if result["status"] in ("hang", "timeout"):
        os._exit(0)  # leave the hung pool behind; the harness kills what remains
    seconds = close_within(peer, CLOSE_TIMEOUT)
    _emit(CLOSE_MARKER, {"close_s": seconds})
    if seconds is None:
        os._exit(0)


def _emit(marker: str, data: dict[str, Any]) -> None:
    sys.stdout.write(marker + json.dumps(data, default=repr) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
