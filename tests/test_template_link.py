"""The template link (poolkit/template_link.py): a template started, asked for a worker, told to kill it.

The pool's manager is not involved: the test drives the link as the manager
does and reads what the template reports.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

import pytest

from poolkit import wire
from poolkit.config import PoolConfig
from poolkit.template_link import TemplateLink

pytestmark = pytest.mark.timeout(60)


def _config(start_method: str) -> PoolConfig:
    return PoolConfig.build(
        max_workers=1, mp_context=None, start_method=start_method, preload=(), initializer=None,
        initargs=(), finalizer=None, finalargs=(), max_tasks_per_child=None, recycle_jitter=0.0,
        max_memory_per_child=None, memory_limit_per_child=None, memory_check_interval=0.01,
        max_lifetime_per_child=None, idle_timeout=None, min_workers=0, job_timeout=None,
        kill_grace=1.0, name="link",
    )


def _next_event(link: TemplateLink, pending: list[tuple[int, tuple[int, ...]]]) -> tuple[int, tuple[Any, ...]]:
    while not pending:
        events = link.read()
        assert events is not None, "the template went away"
        pending.extend(events)
    return pending.pop(0)


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_spawn_then_kill_reports_spawned_then_exited(start_method: str) -> None:
    link = TemplateLink(_config(start_method))
    link.start(first=[], inherited=[])
    ours, theirs = socket.socketpair()
    pending: list[tuple[int, tuple[int, ...]]] = []
    try:
        assert link.spawn(7, None, theirs)
        theirs.close()
        kind, (worker_id, pid) = _next_event(link, pending)
        assert (kind, worker_id) == (wire.Kind.SPAWNED, 7)
        assert link.kill(pid, signal.SIGKILL)
        kind, (worker_id, exited_pid, exitcode) = _next_event(link, pending)
        assert (kind, worker_id, exited_pid, exitcode) == (wire.Kind.EXITED, 7, pid, -signal.SIGKILL)
    finally:
        ours.close()
        template = link.pid
        link.stop()
    assert link.pid is None and link.control is None
    with pytest.raises(ChildProcessError):
        os.waitpid(template, os.WNOHANG)  # reaped
    assert not link.kill(1, signal.SIGKILL)  # nothing to send to any more
