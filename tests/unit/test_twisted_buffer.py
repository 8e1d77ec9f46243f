"""What realtime.twisted_buffer reads inside Twisted: these fail loudly when an upgrade changes it.

A real ``twisted.internet.tcp.Server`` over a socket pair, driven by hand (a
stand-in reactor records the writer registration; ``doWrite`` is called as
the reactor would): the bytes it reports as unsent are those the kernel has
not taken, which the peer's reads count.
"""

from __future__ import annotations

import inspect
import socket
from collections.abc import Iterator

import pytest
from twisted.internet import abstract, tcp
from twisted.internet.protocol import Protocol

from realtime.twisted_buffer import has_unsent, unsent_bytes

pytestmark = pytest.mark.unit


class StandInReactor:
    """The reactor calls a transport makes while it writes: only recorded."""

    def __init__(self) -> None:
        self.writers: set[object] = set()

    def addReader(self, reader: object) -> None:  # noqa: N802
        pass

    def removeReader(self, reader: object) -> None:  # noqa: N802
        pass

    def addWriter(self, writer: object) -> None:  # noqa: N802
        self.writers.add(writer)

    def removeWriter(self, writer: object) -> None:  # noqa: N802
        self.writers.discard(writer)


@pytest.fixture
def connection() -> Iterator[tuple[tcp.Server, socket.socket, StandInReactor]]:
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.setblocking(False)
    reactor = StandInReactor()
    transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 1), None, 1, reactor)  # type: ignore[arg-type]
    try:
        yield transport, peer, reactor
    finally:
        ours.close()
        peer.close()


def drain(peer: socket.socket) -> int:
    received = 0
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return received
        if not chunk:
            return received
        received += len(chunk)


def test_an_idle_transport_holds_nothing(connection) -> None:
    transport, _, _ = connection
    assert not has_unsent(transport)
    assert unsent_bytes(transport) == 0


def test_written_bytes_are_unsent_until_the_kernel_takes_them(connection) -> None:
    transport, peer, reactor = connection
    total = 2_000_000
    transport.write(b"x" * (total // 2))
    transport.write(b"y" * (total // 2))
    # Queued in Twisted's list buffer, nothing sent yet: all of it is unsent.
    assert has_unsent(transport) and unsent_bytes(transport) == total
    assert transport in reactor.writers

    transport.doWrite()  # what the reactor does when the socket is writable: the kernel takes part
    taken = drain(peer)
    assert 0 < taken < total
    transport.write(b"z" * 1000)  # queued in the list behind what dataBuffer holds past offset
    total += 1000
    assert unsent_bytes(transport) == total - taken
    transport.doWrite()
    taken += drain(peer)
    assert has_unsent(transport)
    assert unsent_bytes(transport) == total - taken

    while transport in reactor.writers:
        transport.doWrite()
        taken += drain(peer)
    assert taken == total
    assert not has_unsent(transport) and unsent_bytes(transport) == 0


def test_other_transports_report_nothing_unsent() -> None:
    class Other:
        dataBuffer = b"queued"
        _tempDataBuffer = [b"more"]
        _tempDataLen = 4
        offset = 0

    assert not has_unsent(Other()) and unsent_bytes(Other()) == 0


def test_twisted_still_buffers_writes_where_the_module_reads_them() -> None:
    write = inspect.getsource(abstract.FileDescriptor.write)
    assert "self._tempDataBuffer.append(data)" in write and "self._tempDataLen += len(data)" in write
    do_write = inspect.getsource(abstract.FileDescriptor.doWrite)
    assert "self.dataBuffer" in do_write and "self.offset += " in do_write and "self._tempDataBuffer = []" in do_write
