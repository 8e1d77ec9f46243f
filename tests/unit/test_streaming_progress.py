"""What a streamed slot may confirm (``replication.streaming.Progress``): never past an unpublished commit."""

from __future__ import annotations

import struct

import pytest

from replication.streaming import Progress

pytestmark = pytest.mark.unit


def begin() -> bytes:
    return b"B" + bytes(20)


def commit(end: int) -> bytes:
    return b"C" + b"\x00" + struct.pack("!QQQ", end - 10, end, 0)


def test_a_published_commit_is_confirmed() -> None:
    progress = Progress()
    progress.received(begin())
    progress.received(commit(500))
    progress.published(500)
    assert progress.confirmed == 500


def test_a_keepalive_moves_the_position_only_when_nothing_is_pending() -> None:
    progress = Progress()
    progress.server_at(100)
    assert progress.confirmed == 100  # nothing received: WAL before 100 held nothing for us
    progress.received(begin())
    progress.server_at(200)
    assert progress.confirmed == 100  # a transaction is open
    progress.received(commit(300))
    progress.server_at(400)
    assert progress.confirmed == 100  # its commit is not published yet
    progress.published(300)
    progress.server_at(400)
    assert progress.confirmed == 400


def test_the_position_never_moves_back() -> None:
    progress = Progress()
    progress.server_at(1000)
    progress.received(begin())
    progress.received(commit(900))  # cannot happen on one stream, but a late publish must not move it back
    progress.published(900)
    assert progress.confirmed == 1000
