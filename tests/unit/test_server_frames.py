"""The unmasked server frames written directly to daphne's sockets (RFC 6455 5.2)."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from realtime.server import _encode_frame, frame_header

pytestmark = pytest.mark.unit


def parse(data: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        return done.value
    raise AssertionError("incomplete frame")


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_frames_parse_back_to_their_payload(length: int) -> None:
    payload = bytes(i % 251 for i in range(length))
    frame = parse(frame_header(0x82, length) + payload)
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.BINARY, True, payload)


def test_text_frames_are_utf8_and_reused_for_the_same_content() -> None:
    text = '[null,null,"realtime:r","broadcast",{"é":1}]'
    first = _encode_frame(text, False)
    assert parse(first).data.decode() == text and parse(first).opcode is Opcode.TEXT
    assert _encode_frame(text, False) is first
    assert parse(_encode_frame(b"\x00", True)).opcode is Opcode.BINARY


def test_the_autobahn_detail_the_server_replaces_is_still_there() -> None:
    """``skip_config_dump`` replaces autobahn's module-level ``pformat``, used in ``_connectionMade``."""
    import inspect

    from autobahn.websocket import protocol

    assert callable(protocol.pformat)
    assert "pformat(configAttrLog)" in inspect.getsource(protocol.WebSocketProtocol._connectionMade)


def test_listen_backlog_is_added_to_tcp_endpoints_only(settings) -> None:
    from realtime.server import with_backlog

    settings.REALTIME_LISTEN_BACKLOG = 4096
    assert with_backlog("tcp:port=8000:interface=127.0.0.1") == "tcp:port=8000:interface=127.0.0.1:backlog=4096"
    assert with_backlog("tcp:port=8000:backlog=10") == "tcp:port=8000:backlog=10"
    assert with_backlog("unix:/tmp/s.sock") == "unix:/tmp/s.sock"
