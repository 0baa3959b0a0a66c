"""``poolkit.worker_channel``: the parent's side of a worker's socket, over a socket pair (no processes)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from poolkit import wire, worker_channel
from poolkit.worker_table import Worker


@pytest.fixture
def pair() -> Iterator[tuple[Worker, socket.socket]]:
    parent, child = socket.socketpair()
    parent.setblocking(False)
    worker = Worker(1, parent, 0.0)
    yield worker, child
    parent.close()
    child.close()


def test_receive_reads_frames_and_says_when_nothing_is_there(pair: tuple[Worker, socket.socket]) -> None:
    worker, child = pair
    assert worker_channel.receive(worker, worker_channel.read_buffer()) == worker_channel.WOULD_BLOCK
    child.sendall(wire.encode_ready(4242, False) + wire.encode_retiring(7 * 2**20))
    assert worker_channel.receive(worker, worker_channel.read_buffer()) > 0
    kinds = [(kind, body) for kind, body in worker.reader.frames()]
    assert [kind for kind, _ in kinds] == [wire.Kind.READY, wire.Kind.RETIRING]
    assert wire.decode_ready(kinds[0][1]) == (4242, False)
    assert wire.decode_retiring(kinds[1][1]) == 7 * 2**20


def test_receive_returns_0_at_the_end_of_the_stream(pair: tuple[Worker, socket.socket]) -> None:
    worker, child = pair
    child.close()
    assert worker_channel.receive(worker, worker_channel.read_buffer()) == 0


def test_send_writes_what_the_socket_takes_and_keeps_the_rest(pair: tuple[Worker, socket.socket]) -> None:
    worker, child = pair
    big = os.urandom(8 << 20)  # more than a socket buffer holds
    worker.outbox.extend([b"head", big])
    worker_channel.send(worker)
    assert worker.outbox, "the socket cannot have taken 8 MiB at once"
    received = bytearray()
    while worker.outbox or len(received) < 4 + len(big):
        received += child.recv(1 << 20)
        worker_channel.send(worker)
    assert bytes(received) == b"head" + big
    assert not worker.outbox


def test_send_to_a_closed_peer_drops_the_outbox(pair: tuple[Worker, socket.socket]) -> None:
    worker, child = pair
    child.close()
    worker.outbox.append(b"x" * 100)
    worker_channel.send(worker)
    assert not worker.outbox
