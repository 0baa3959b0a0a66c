"""The wire codec (poolkit/wire.py): every message kind encodes and decodes to the same values.

Each frame goes through a ``FrameReader``, as it does between processes, so
the header's length and kind are checked with the body.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from poolkit import wire


def _one_frame(*parts: bytes) -> tuple[int, bytes | bytearray]:
    reader = wire.FrameReader()
    reader.feed(b"".join(parts))
    [(kind, body)] = list(reader.frames())
    return kind, body


def test_config_round_trip() -> None:
    kind, body = _one_frame(wire.encode_config(7, None, b"pickled"))
    assert kind == wire.Kind.CONFIG
    worker_id, max_jobs, config = wire.decode_config(body)
    assert (worker_id, max_jobs, bytes(config)) == (7, 0, b"pickled")


@pytest.mark.parametrize("payload", [b"small", b"x" * 70_000])
@pytest.mark.parametrize("meta", [b"", b"meta"])
def test_job_round_trip(payload: bytes, meta: bytes) -> None:
    parts = wire.encode_job(12, 3, 1.5, meta, payload)
    kind, body = _one_frame(*parts)
    assert kind == wire.Kind.JOB
    assert wire.decode_job_seq(body) == (12,)
    seq, attempt, timeout, got_meta, got_payload = wire.decode_job(body)
    assert (seq, attempt, timeout, bytes(got_payload)) == (12, 3, 1.5, payload)
    assert got_meta is None if not meta else bytes(got_meta) == meta


def test_a_job_without_timeout_has_zero() -> None:
    _, body = _one_frame(*wire.encode_job(1, 1, None, b"", b"p"))
    assert wire.decode_job(body)[2] == 0.0


def test_retire_and_cancel() -> None:
    assert _one_frame(wire.encode_retire()) == (wire.Kind.RETIRE, bytearray())
    kind, body = _one_frame(wire.encode_cancel(99))
    assert (kind, wire.decode_cancel(body)) == (wire.Kind.CANCEL, 99)


def test_worker_messages_round_trip() -> None:
    kind, body = _one_frame(wire.encode_ready(4321, True))
    assert (kind, wire.decode_ready(body)) == (wire.Kind.READY, (4321, True))
    kind, body = _one_frame(wire.encode_ready(4321, False))
    assert (kind, wire.decode_ready(body)) == (wire.Kind.READY, (4321, False))

    head = wire.encode_result_head(5, wire.OUTCOME_VALUE, 0.5, 0.25, 100, 200, len(b"value"))
    kind, body = _one_frame(head, b"value")
    assert kind == wire.Kind.RESULT
    assert wire.decode_result_head(body) == (5, wire.OUTCOME_VALUE, 0.5, 0.25, 100, 200)
    assert bytes(wire.result_payload(body)) == b"value"

    kind, body = _one_frame(wire.encode_skipped(6))
    assert wire.decode_result_head(body)[:2] == (6, wire.OUTCOME_SKIPPED)
    assert bytes(wire.result_payload(body)) == b""

    kind, body = _one_frame(wire.encode_progress(8, b"50%"))
    assert kind == wire.Kind.PROGRESS
    assert wire.decode_progress_seq(body) == (8,)
    assert bytes(wire.progress_payload(body)) == b"50%"

    assert _one_frame(wire.encode_init_failed(b"error")) == (wire.Kind.INIT_FAILED, bytearray(b"error"))

    kind, body = _one_frame(wire.encode_retiring(3 << 30))
    assert (kind, wire.decode_retiring(body)) == (wire.Kind.RETIRING, 3 << 30)


def test_template_messages_round_trip() -> None:
    kind, body = _one_frame(wire.encode_spawn(3, 10))
    assert (kind, wire.decode_spawn(body)) == (wire.Kind.SPAWN, (3, 10))
    kind, body = _one_frame(wire.encode_kill(555, 9))
    assert (kind, wire.decode_kill(body)) == (wire.Kind.KILL, (555, 9))
    assert _one_frame(wire.encode_worker_config(b"cfg")) == (wire.Kind.WORKER_CONFIG, bytearray(b"cfg"))
    kind, body = _one_frame(wire.encode_limits(1.0, None, 0.01))
    assert (kind, wire.decode_limits(body)) == (wire.Kind.LIMITS, (1.0, None, 0.01))
    assert wire.decode_limits(_one_frame(wire.encode_limits(2.0, 1 << 20, 0.5))[1]) == (2.0, 1 << 20, 0.5)
    kind, body = _one_frame(wire.encode_spawned(3, 556))
    assert (kind, wire.decode_spawned(body)) == (wire.Kind.SPAWNED, (3, 556))
    kind, body = _one_frame(wire.encode_exited(3, 556, -9))
    assert (kind, wire.decode_exited(body)) == (wire.Kind.EXITED, (3, 556, -9))
    kind, body = _one_frame(wire.encode_limit(3, 556, 17, wire.LIMIT_MEMORY, 1 << 30))
    assert (kind, wire.decode_limit(body)) == (wire.Kind.LIMIT, (3, 556, 17, wire.LIMIT_MEMORY, 1 << 30))


def test_every_kind_has_an_encoder() -> None:
    for kind in wire.Kind:
        name = "encode_result_head" if kind is wire.Kind.RESULT else f"encode_{kind.name.lower()}"
        assert callable(getattr(wire, name, None)), f"no {name} for {kind!r}"



def test_receive_through_a_small_reused_buffer_keeps_every_frame_whole() -> None:
    """``FrameReader.receive`` reads through one buffer lent for every read: frames cut
    across reads, and a large frame filled in its own buffer, come out as they were sent."""
    small = [wire.encode_ready(pid, False) for pid in range(50)]
    payload = bytes(range(256)) * 5_000  # over 1 MiB: read straight into a buffer of its own
    stream = b"".join([*small, *wire.encode_job(7, 1, None, b"", payload), small[0]])
    ours, theirs = socket.socketpair()
    # The socket's buffer is smaller than the stream: a thread writes while this one reads.
    sender = threading.Thread(target=lambda: (theirs.sendall(stream), theirs.shutdown(socket.SHUT_WR)))
    scratch = wire.scratch_buffer(7)  # smaller than one frame: each spans several reads
    reader = wire.FrameReader()
    got: list[tuple[int, bytes]] = []
    try:
        sender.start()
        while True:
            n, ancillary = reader.receive(ours, scratch, 0, 0)
            assert ancillary == []
            got.extend((kind, bytes(body)) for kind, body in reader.frames())
            if n == 0:
                break
    finally:
        sender.join(30)
        ours.close()
        theirs.close()
    ready = [(int(wire.Kind.READY), frame[wire.HEADER.size :]) for frame in small]
    assert got[:50] == ready and got[51] == ready[0] and len(got) == 52
    kind, body = got[50]
    assert kind == wire.Kind.JOB
    assert bytes(wire.decode_job(body)[4]) == payload


def _mapped(address: int) -> bool:
    with open("/proc/self/maps") as maps:
        lines = maps.read().splitlines()
    for line in lines:
        start, end = (int(part, 16) for part in line.split()[0].split("-"))
        if start <= address < end:
            return True
    return False


def test_a_scratch_buffer_is_not_carried_into_a_fork() -> None:
    """The pool's read buffer (4 MiB) stays out of its template and workers, which are forks."""
    import ctypes

    scratch = wire.scratch_buffer(1 << 20)
    scratch[:5] = b"wrote"  # a page the fork would otherwise share
    address = ctypes.addressof(ctypes.c_char.from_buffer(scratch))
    assert _mapped(address)
    pid = os.fork()
    if pid == 0:
        os._exit(3 if _mapped(address) else 0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
