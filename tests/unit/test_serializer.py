"""Tests for realtime.protocol.serializer: what a client sees on the wire (PROTOCOL.md 2)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.protocol import serializer
from realtime.protocol.errors import FrameError, ProtocolError
from realtime.protocol.message import Message, PayloadEncoding, UserBroadcast, Vsn
from realtime.protocol.serializer import (
    decode_binary,
    decode_text,
    encode_json,
    encode_text,
    encode_text_raw_payload,
    encode_user_broadcast,
    is_json_payload,
    parse_vsn,
    user_broadcast_as_json_payload,
)

pytestmark = pytest.mark.unit

# PROTOCOL.md 2.3: join_ref "1", ref "2", realtime:room1, event cursor, JSON {"x":1}.
KIND3_EXAMPLE = bytes.fromhex("03 01 01 0E 06 00 01") + b"12realtime:room1cursor" + b'{"x":1}'
KIND4_EXAMPLE = bytes.fromhex("04 0E 06 00 01") + b"realtime:room1cursor" + b'{"x":1}'

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=10,
)
# Text that can be sent as UTF-8 (what a WebSocket text frame can carry).
utf8_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]))
utf8_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | utf8_text,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(utf8_text, children, max_size=5),
    max_leaves=10,
)
refs = st.none() | st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=8)


def kind3(
    join_ref: bytes,
    ref: bytes,
    topic: bytes,
    event: bytes,
    payload: bytes,
    *,
    meta: bytes = b"",
    encoding: int = 1,
) -> bytes:
    header = bytes((3, len(join_ref), len(ref), len(topic), len(event), len(meta), encoding))
    return header + join_ref + ref + topic + event + meta + payload


def assert_decodes_or_frame_error(decode: Any, *args: Any) -> None:
    try:
        result = decode(*args)
    except FrameError as error:
        assert error.code and error.message
    else:
        assert isinstance(result, Message)
        assert isinstance(result.topic, str) and isinstance(result.event, str)
        assert result.join_ref is None or isinstance(result.join_ref, str)
        assert result.ref is None or isinstance(result.ref, str)


# --- vsn --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, Vsn.V1), ("", Vsn.V1), ("1.0.0", Vsn.V1), ("2.0.0", Vsn.V2)],
)
def test_vsn_absent_means_object_frames_and_known_versions_are_accepted(
    raw: str | None, expected: Vsn
) -> None:
    assert parse_vsn(raw) is expected


@pytest.mark.parametrize("raw", ["3.0.0", "2.0", "2", " 2.0.0", "v2", "1.0.0\x00", "x" * 500])
def test_unknown_vsn_is_refused_with_unsupported_vsn(raw: str) -> None:
    with pytest.raises(FrameError) as info:
        parse_vsn(raw)
    assert info.value.code == "UnsupportedVsn"
    assert isinstance(info.value, ProtocolError)


# --- text frames ---------------------------------------------------------------


def test_phoenix_message_format() -> None:
    reply = Message("1", "1", "realtime:room1", "phx_reply", {"status": "ok", "response": {}})
    push = Message(None, None, "realtime:room1", "broadcast", {"a": 1})

    assert encode_text(Vsn.V2, reply) == (
        '["1","1","realtime:room1","phx_reply",{"status":"ok","response":{}}]'
    )
    assert encode_text(Vsn.V2, push) == '[null,null,"realtime:room1","broadcast",{"a":1}]'

    assert encode_text(Vsn.V1, reply) == (
        '{"topic":"realtime:room1","event":"phx_reply",'
        '"payload":{"status":"ok","response":{}},"ref":"1"}'
    )
    v1_push = json.loads(encode_text(Vsn.V1, push))
    assert list(v1_push) == ["topic", "event", "payload", "ref"]
    assert v1_push["ref"] is None


@given(
    join_ref=refs,
    ref=refs,
    topic=utf8_text,
    event=utf8_text,
    payload=utf8_json_values,
)
@settings(max_examples=40)
def test_every_outbound_frame_has_the_shape_clients_read(
    join_ref: str | None, ref: str | None, topic: str, event: str, payload: Any
) -> None:
    msg = Message(join_ref, ref, topic, event, payload)
    v2 = json.loads(encode_text(Vsn.V2, msg))
    assert v2 == [join_ref, ref, topic, event, payload]
    v1 = json.loads(encode_text(Vsn.V1, msg))
    assert v1 == {"topic": topic, "event": event, "payload": payload, "ref": ref}
    assert "join_ref" not in v1


@given(
    join_ref=refs,
    ref=refs,
    topic=utf8_text,
    event=utf8_text,
    payload=utf8_json_values,
)
@settings(max_examples=40)
def test_vsn2_frames_round_trip(
    join_ref: str | None, ref: str | None, topic: str, event: str, payload: Any
) -> None:
    msg = Message(join_ref, ref, topic, event, payload)
    assert decode_text(Vsn.V2, encode_text(Vsn.V2, msg)) == msg
    assert decode_text(Vsn.V2, encode_text(Vsn.V2, msg).encode("utf-8")) == msg


@given(ref=refs, topic=utf8_text, event=utf8_text, payload=utf8_json_values)
@settings(max_examples=40)
def test_vsn1_frames_round_trip_without_join_ref(
    ref: str | None, topic: str, event: str, payload: Any
) -> None:
    msg = Message(None, ref, topic, event, payload)
    assert decode_text(Vsn.V1, encode_text(Vsn.V1, msg)) == msg


def test_vsn1_client_frame_with_join_ref_is_read() -> None:
    text = (
        '{"topic":"realtime:room1","event":"phx_join","payload":{"config":{}},'
        '"ref":"1","join_ref":"1"}'
    )
    assert decode_text(Vsn.V1, text) == Message(
        "1", "1", "realtime:room1", "phx_join", {"config": {}}
    )


def test_vsn1_python_heartbeat_with_null_ref_and_no_payload_is_read() -> None:
    msg = decode_text(Vsn.V1, '{"topic":"phoenix","event":"heartbeat","ref":null}')
    assert msg == Message(None, None, "phoenix", "heartbeat", {})
    reply = Message(None, msg.ref, "phoenix", "phx_reply", {"status": "ok", "response": {}})
    assert json.loads(encode_text(Vsn.V1, reply))["ref"] is None


def test_vsn1_explicit_null_payload_is_kept() -> None:
    msg = decode_text(Vsn.V1, '{"topic":"t","event":"e","payload":null,"ref":"1"}')
    assert msg.payload is None


def test_vsn2_heartbeat_is_read() -> None:
    assert decode_text(Vsn.V2, '[null,"7","phoenix","heartbeat",{}]') == Message(
        None, "7", "phoenix", "heartbeat", {}
    )


def test_vsn2_extra_trailing_items_are_ignored() -> None:
    msg = decode_text(Vsn.V2, '["1","2","realtime:room1","broadcast",{"a":1},"x",3]')
    assert msg == Message("1", "2", "realtime:room1", "broadcast", {"a": 1})


@pytest.mark.parametrize(
    ("vsn", "text", "join_ref", "ref"),
    [
        (Vsn.V2, '[1,2,"t","e",{}]', "1", "2"),
        (Vsn.V2, '[1.0,25e-1,"t","e",{}]', "1", "2.5"),
        (Vsn.V2, '["","","t","e",{}]', "", ""),
        (Vsn.V1, '{"topic":"t","event":"e","ref":12,"join_ref":3}', "3", "12"),
    ],
)
def test_numeric_refs_are_echoed_as_strings(
    vsn: Vsn, text: str, join_ref: str, ref: str
) -> None:
    msg = decode_text(vsn, text)
    assert (msg.join_ref, msg.ref) == (join_ref, ref)


def test_payload_text_is_not_ascii_escaped() -> None:
    msg = Message(None, None, "realtime:salle", "broadcast", {"msg": "héllo ✓ 😀"})
    assert encode_text(Vsn.V2, msg) == (
        '[null,null,"realtime:salle","broadcast",{"msg":"héllo ✓ 😀"}]'
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "not json",
        "[",
        "{}",
        "[]",
        '[null,"1","t","e"]',
        '[null,"1",5,"e",{}]',
        '[null,"1","t",null,{}]',
        '[true,"1","t","e",{}]',
        '[null,["1"],"t","e",{}]',
        '[null,{"r":1},"t","e",{}]',
        '{"topic":"t","event":"e","payload":{},"ref":"1"}',
        '"a string"',
        "42",
        "null",
        '[null,"1","t","e",NaN]',
        '[null,"1","t","e",Infinity]',
        '[null,"1","t","e",-Infinity]',
        '[null,"1","t","e",1e400]',
        '[null,"1","t","e",{}] trailing',
        '[null,"1","t","e",{"s":"\\ud800"}]',
        '[null,"1","t\\udfff","e",{}]',
        '[null,"1","t","e",{"s":"\ud800"}]',  # a literal lone surrogate
        "\ufeff[null,null,\"t\",\"e\",{}]",
        '[null,"1","t","e",' + "1" * 5000 + "]",
        "[" * 100_000 + "]" * 100_000,
    ],
)
def test_malformed_vsn2_text_is_a_frame_error(text: str) -> None:
    with pytest.raises(FrameError):
        decode_text(Vsn.V2, text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        '["1","1","t","e",{}]',
        '{"event":"e","payload":{}}',
        '{"topic":"t","payload":{}}',
        '{"topic":1,"event":"e"}',
        '{"topic":"t","event":["e"]}',
        '{"topic":"t","event":"e","ref":false}',
        '{"topic":"t","event":"e","join_ref":{}}',
        "true",
    ],
)
def test_malformed_vsn1_text_is_a_frame_error(text: str) -> None:
    with pytest.raises(FrameError):
        decode_text(Vsn.V1, text)


def test_text_frame_bytes_must_be_utf8() -> None:
    with pytest.raises(FrameError):
        decode_text(Vsn.V2, b'[null,null,"t","e",{"a":"\xff"}]')


def test_escaped_surrogate_pair_is_a_valid_character() -> None:
    msg = decode_text(Vsn.V2, '[null,null,"t","e",{"s":"\\ud83d\\ude00"}]')
    assert msg.payload == {"s": "😀"}


@pytest.mark.parametrize("value", [None, 3, ["[]"]])
def test_text_decoder_refuses_what_is_not_text(value: Any) -> None:
    with pytest.raises(FrameError):
        decode_text(Vsn.V2, value)


def test_binary_decoder_refuses_what_is_not_bytes() -> None:
    with pytest.raises(FrameError):
        decode_binary(Vsn.V2, "\x03")  # type: ignore[arg-type]


def test_user_broadcast_has_no_text_form() -> None:
    body = UserBroadcast("cursor", PayloadEncoding.JSON, b"{}")
    with pytest.raises(TypeError):
        encode_text(Vsn.V2, Message(None, None, "realtime:room1", "broadcast", body))


def test_non_finite_payload_is_not_encoded() -> None:
    with pytest.raises(ValueError):
        encode_text(Vsn.V2, Message(None, None, "t", "e", {"x": float("nan")}))


@given(data=st.binary(max_size=200))
@settings(max_examples=150)
def test_arbitrary_bytes_as_text_give_a_message_or_frame_error(data: bytes) -> None:
    assert_decodes_or_frame_error(decode_text, Vsn.V1, data)
    assert_decodes_or_frame_error(decode_text, Vsn.V2, data)


@given(text=st.text(max_size=200))
@settings(max_examples=150)
def test_arbitrary_text_gives_a_message_or_frame_error(text: str) -> None:
    assert_decodes_or_frame_error(decode_text, Vsn.V1, text)
    assert_decodes_or_frame_error(decode_text, Vsn.V2, text)


@given(value=json_values)
@settings(max_examples=80)
def test_arbitrary_json_as_frame_gives_a_message_or_frame_error(value: Any) -> None:
    text = json.dumps(value)
    assert_decodes_or_frame_error(decode_text, Vsn.V1, text)
    assert_decodes_or_frame_error(decode_text, Vsn.V2, text)


@given(head=st.lists(json_values, min_size=5, max_size=6))
@settings(max_examples=40)
def test_arbitrary_json_arrays_give_a_message_or_frame_error(head: list[Any]) -> None:
    assert_decodes_or_frame_error(decode_text, Vsn.V2, json.dumps(head))


@given(
    fields=st.fixed_dictionaries(
        {},
        optional={
            "topic": json_values,
            "event": json_values,
            "payload": json_values,
            "ref": json_values,
            "join_ref": json_values,
        },
    )
)
@settings(max_examples=40)
def test_arbitrary_json_objects_give_a_message_or_frame_error(fields: dict[str, Any]) -> None:
    assert_decodes_or_frame_error(decode_text, Vsn.V1, json.dumps(fields))


def test_decoded_frames_encode_again_for_other_receivers() -> None:
    # Whatever decode_text accepts must be sendable as UTF-8 to every receiver.
    for text in (
        '[null,null,"t","e",{"n":12345678901234567890123,"f":1.5e300,"s":"\\u00e9"}]',
        '[null,null,"t","e",{"s":"\\ud83d\\ude00"}]',
    ):
        msg = decode_text(Vsn.V2, text)
        encode_text(Vsn.V1, msg).encode("utf-8")
        encode_text(Vsn.V2, msg).encode("utf-8")


# --- the pre-encoded payload path ---------------------------------------------


@given(
    vsn=st.sampled_from(Vsn),
    join_ref=refs,
    ref=refs,
    topic=st.text(),
    event=st.text(),
    payload=json_values,
)
@settings(max_examples=80)
def test_spliced_payload_frames_equal_encoded_frames(
    vsn: Vsn, join_ref: str | None, ref: str | None, topic: str, event: str, payload: Any
) -> None:
    expected = encode_text(vsn, Message(join_ref, ref, topic, event, payload))
    spliced = encode_text_raw_payload(vsn, join_ref, ref, topic, event, encode_json(payload))
    assert spliced == expected


def test_spliced_payload_matches_stdlib_compact_json() -> None:
    payload = {"type": "broadcast", "event": "e", "payload": {"é": [1, 2.5, None, True]}}
    payload_json = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    assert encode_json(payload) == payload_json
    assert encode_text_raw_payload(Vsn.V2, None, None, "t", "broadcast", payload_json) == (
        encode_text(Vsn.V2, Message(None, None, "t", "broadcast", payload))
    )


# --- binary frames ----------------------------------------------------------


def test_protocol_example_kind3_decodes_to_a_broadcast_push() -> None:
    msg = decode_binary(Vsn.V2, KIND3_EXAMPLE)
    assert msg == Message(
        "1",
        "2",
        "realtime:room1",
        "broadcast",
        UserBroadcast("cursor", PayloadEncoding.JSON, b'{"x":1}', b""),
    )


def test_protocol_example_kind3_is_forwarded_as_the_example_kind4() -> None:
    msg = decode_binary(Vsn.V2, KIND3_EXAMPLE)
    assert encode_user_broadcast(msg.topic, msg.payload) == KIND4_EXAMPLE


def test_kind4_meta_and_raw_bytes_payload_are_laid_out_in_order() -> None:
    body = UserBroadcast("e", PayloadEncoding.BINARY, b"\x00\xff", b'{"id":"u"}')
    assert encode_user_broadcast("realtime:r", body) == (
        bytes((4, 10, 1, 10, 0)) + b"realtime:r" + b"e" + b'{"id":"u"}' + b"\x00\xff"
    )


def test_kind3_with_binary_payload_and_meta_keeps_both_untouched() -> None:
    frame = kind3(b"3", b"44", b"realtime:r", b"ev", b"\x00\x01\xff", meta=b'{"persist":true}',
                  encoding=0)
    msg = decode_binary(Vsn.V2, frame)
    assert msg == Message(
        "3", "44", "realtime:r", "broadcast",
        UserBroadcast("ev", PayloadEncoding.BINARY, b"\x00\x01\xff", b'{"persist":true}'),
    )


def test_kind3_with_empty_refs_keeps_empty_strings() -> None:
    msg = decode_binary(Vsn.V2, kind3(b"", b"", b"realtime:r", b"e", b"{}"))
    assert (msg.join_ref, msg.ref) == ("", "")


def test_kind3_with_empty_payload_is_accepted() -> None:
    msg = decode_binary(Vsn.V2, kind3(b"1", b"2", b"realtime:r", b"e", b"", encoding=0))
    assert msg.payload.payload == b""


def test_kind3_accepts_bytearray_and_memoryview() -> None:
    assert decode_binary(Vsn.V2, bytearray(KIND3_EXAMPLE)) == decode_binary(  # type: ignore[arg-type]
        Vsn.V2, KIND3_EXAMPLE
    )
    assert decode_binary(Vsn.V2, memoryview(KIND3_EXAMPLE)) == decode_binary(  # type: ignore[arg-type]
        Vsn.V2, KIND3_EXAMPLE
    )


@pytest.mark.parametrize("cut", range(len(KIND3_EXAMPLE) - len(b'{"x":1}')))
def test_kind3_truncated_at_any_point_is_a_frame_error(cut: int) -> None:
    with pytest.raises(FrameError):
        decode_binary(Vsn.V2, KIND3_EXAMPLE[:cut])


@given(
    join_ref=st.binary(max_size=10),
    ref=st.binary(max_size=10),
    topic=st.binary(max_size=20),
    event=st.binary(max_size=10),
    meta=st.binary(max_size=10),
)
@settings(max_examples=50)
def test_kind3_truncated_inside_the_header_fields_is_a_frame_error(
    join_ref: bytes, ref: bytes, topic: bytes, event: bytes, meta: bytes
) -> None:
    frame = kind3(join_ref, ref, topic, event, b"", meta=meta)
    for cut in range(len(frame)):
        with pytest.raises(FrameError):
            decode_binary(Vsn.V2, frame[:cut])


@pytest.mark.parametrize("kind", [k for k in range(256) if k != 3])
def test_binary_kinds_other_than_user_broadcast_push_are_refused(kind: int) -> None:
    with pytest.raises(FrameError):
        decode_binary(Vsn.V2, bytes((kind,)) + KIND3_EXAMPLE[1:])


@pytest.mark.parametrize("encoding", [2, 3, 127, 255])
def test_kind3_with_unknown_payload_encoding_is_refused(encoding: int) -> None:
    with pytest.raises(FrameError):
        decode_binary(Vsn.V2, kind3(b"1", b"2", b"realtime:r", b"e", b"{}", encoding=encoding))


@pytest.mark.parametrize(
    "frame",
    [
        kind3(b"\xff", b"2", b"realtime:r", b"e", b"{}"),
        kind3(b"1", b"\xc3", b"realtime:r", b"e", b"{}"),
        kind3(b"1", b"2", b"realtime:\xe2\x82", b"e", b"{}"),
        kind3(b"1", b"2", b"realtime:r", b"\xed\xa0\x80", b"{}"),  # encoded surrogate
    ],
)
def test_kind3_with_invalid_utf8_header_fields_is_refused(frame: bytes) -> None:
    with pytest.raises(FrameError):
        decode_binary(Vsn.V2, frame)


@given(
    topic=st.binary(max_size=30),
    event=st.binary(max_size=30),
    join_ref=st.binary(max_size=5),
    ref=st.binary(max_size=5),
)
@settings(max_examples=150)
def test_kind3_header_fields_are_text_or_a_frame_error(
    topic: bytes, event: bytes, join_ref: bytes, ref: bytes
) -> None:
    frame = kind3(join_ref, ref, topic, event, b"{}")
    try:
        msg = decode_binary(Vsn.V2, frame)
    except FrameError:
        with pytest.raises(UnicodeDecodeError):
            for field in (join_ref, ref, topic, event):
                field.decode("utf-8")
    else:
        assert (msg.join_ref, msg.ref, msg.topic, msg.payload.event) == tuple(
            field.decode("utf-8") for field in (join_ref, ref, topic, event)
        )


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b"",
        b" ",
        b"\xff",
        b'"\xed\xa0\x80"',  # an encoded surrogate is not UTF-8
        b"\xef\xbb\xbf{}",  # JSON.parse refuses a BOM
        b'{"a":NaN}',
        b"[Infinity]",
        b"[1] 2",
        b"{'a':1}",
        b'{"a":1,}',
        b"[" * 100_000,
        b"1" * 5000,  # more digits than Python turns into an int
    ],
)
def test_kind3_json_payload_that_is_not_json_is_a_frame_error(payload: bytes) -> None:
    with pytest.raises(FrameError, match="JSON payload"):
        decode_binary(Vsn.V2, kind3(b"1", b"2", b"realtime:r", b"e", payload))


def test_kind3_json_payload_is_checked_and_kept_byte_for_byte() -> None:
    payload = ' {"b" : [1.50, 1e400], "é": "\\u00e9\\ud83d\\ude00"}\n'.encode()
    msg = decode_binary(Vsn.V2, kind3(b"1", b"2", b"realtime:r", b"e", payload))
    assert msg.payload.payload == payload


@pytest.mark.parametrize("payload", [b"{not json", b"", b"\xff\x00"])
def test_kind3_raw_bytes_payload_is_never_parsed(payload: bytes) -> None:
    msg = decode_binary(Vsn.V2, kind3(b"1", b"2", b"realtime:r", b"e", payload, encoding=0))
    assert msg.payload == UserBroadcast("e", PayloadEncoding.BINARY, payload)


@given(payload=st.binary(max_size=60))
@settings(max_examples=150)
def test_kind3_json_payload_is_accepted_exactly_when_it_parses(payload: bytes) -> None:
    frame = kind3(b"1", b"2", b"realtime:r", b"e", payload)
    try:
        json.loads(payload.decode("utf-8"), parse_constant=lambda name: 1 / 0)
    except (ValueError, ZeroDivisionError):
        with pytest.raises(FrameError):
            decode_binary(Vsn.V2, frame)
    else:
        assert decode_binary(Vsn.V2, frame).payload.payload == payload


@pytest.mark.parametrize(
    "meta", [b"{", b"not json", b"\xff", b'{"persist":true', b"{'persist':true}", b"[NaN]"]
)
@pytest.mark.parametrize("encoding", PayloadEncoding)
def test_kind3_meta_that_is_not_json_is_a_frame_error(meta: bytes, encoding: PayloadEncoding) -> None:
    # PROTOCOL.md 2.3: meta is JSON or empty; the reference's Jason.decode! refuses the frame.
    with pytest.raises(FrameError, match="meta"):
        decode_binary(Vsn.V2, kind3(b"1", b"2", b"realtime:r", b"e", b"{}", meta=meta, encoding=encoding))


@pytest.mark.parametrize("meta", [b"", b"{}", b'{"persist":true}', b"[1]", b'"x"', b" null "])
def test_kind3_meta_that_is_json_or_empty_is_accepted(meta: bytes) -> None:
    msg = decode_binary(Vsn.V2, kind3(b"1", b"2", b"realtime:r", b"e", b"{}", meta=meta))
    assert msg.payload.meta == meta


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"x":1}', True),
        (b" [1e400] ", True),
        (b'"\\ud800"', True),  # JSON.parse takes an escaped lone surrogate
        (b"{not json", False),
        (b"", False),
        (b'{"a":NaN}', False),
        ("{}".encode("utf-16"), False),  # json.loads(bytes) would take these
        ("{}".encode("utf-32"), False),
        (b"\xef\xbb\xbf{}", False),
    ],
)
def test_is_json_payload_takes_what_realtime_js_can_parse(raw: bytes, expected: bool) -> None:
    assert is_json_payload(raw) is expected


def test_refused_frames_are_counted_and_decoded_ones_are_not() -> None:
    before = serializer.malformed_frames
    decode_binary(Vsn.V2, KIND3_EXAMPLE)
    decode_text(Vsn.V2, '[null,"1","phoenix","heartbeat",{}]')
    assert serializer.malformed_frames == before
    for bad in (
        lambda: decode_binary(Vsn.V2, kind3(b"1", b"2", b"realtime:r", b"e", b"{not json")),
        lambda: decode_binary(Vsn.V2, kind3(b"1", b"2", b"realtime:r", b"e", b"{}", meta=b"{")),
        lambda: decode_binary(Vsn.V2, b"\x03\x05"),
        lambda: decode_text(Vsn.V2, "{not json"),
        lambda: decode_text(Vsn.V1, "[]"),
    ):
        with pytest.raises(FrameError):
            bad()
    assert serializer.malformed_frames == before + 5


def test_binary_frames_are_refused_on_vsn1_sockets() -> None:
    with pytest.raises(FrameError):
        decode_binary(Vsn.V1, KIND3_EXAMPLE)


def test_empty_binary_frame_is_refused() -> None:
    with pytest.raises(FrameError):
        decode_binary(Vsn.V2, b"")


@given(data=st.binary(max_size=300))
@settings(max_examples=200)
def test_arbitrary_bytes_as_binary_give_a_message_or_frame_error(data: bytes) -> None:
    assert_decodes_or_frame_error(decode_binary, Vsn.V2, data)
    assert_decodes_or_frame_error(decode_binary, Vsn.V1, data)


@given(data=st.binary(max_size=300))
@settings(max_examples=150)
def test_arbitrary_kind3_bytes_give_a_message_or_frame_error(data: bytes) -> None:
    assert_decodes_or_frame_error(decode_binary, Vsn.V2, b"\x03" + data)


# What a client may send in a kind 3 frame: meta is JSON or empty, an encoding
# 1 payload is JSON and an encoding 0 payload any bytes (PROTOCOL.md 2.3).
kind3_metas = st.just(b"") | json_values.map(lambda v: json.dumps(v).encode("utf-8")).filter(
    lambda m: len(m) <= 255
)
kind3_bodies = st.tuples(st.just(PayloadEncoding.BINARY), st.binary(max_size=100)) | st.tuples(
    st.just(PayloadEncoding.JSON),
    utf8_json_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8")),
)


@given(
    join_ref=st.text(max_size=10),
    ref=st.text(max_size=10),
    topic=st.text(max_size=60),
    event=st.text(max_size=60),
    meta=kind3_metas,
    body=kind3_bodies,
)
@settings(max_examples=100)
def test_kind3_is_forwarded_as_kind4_with_the_same_fields(
    join_ref: str,
    ref: str,
    topic: str,
    event: str,
    meta: bytes,
    body: tuple[PayloadEncoding, bytes],
) -> None:
    encoding, payload = body
    try:
        join_ref_b, ref_b, topic_b, event_b = (
            s.encode("utf-8") for s in (join_ref, ref, topic, event)
        )
    except UnicodeEncodeError:
        return  # lone surrogates cannot be sent
    frame = kind3(join_ref_b, ref_b, topic_b, event_b, payload, meta=meta, encoding=encoding)
    msg = decode_binary(Vsn.V2, frame)
    assert (msg.join_ref, msg.ref, msg.topic, msg.event) == (join_ref, ref, topic, "broadcast")
    assert msg.payload == UserBroadcast(event, encoding, payload, meta)
    out = encode_user_broadcast(msg.topic, msg.payload)
    assert out == (
        bytes((4, len(topic_b), len(event_b), len(meta), encoding)) + topic_b + event_b + meta
        + payload
    )


@given(
    topic=st.text(max_size=80),
    event=st.text(max_size=80),
    meta=st.binary(max_size=300),
    payload=st.binary(max_size=50),
    encoding=st.sampled_from(PayloadEncoding),
)
@settings(max_examples=100)
def test_encoded_binary_frames_are_always_kind4(
    topic: str, event: str, meta: bytes, payload: bytes, encoding: PayloadEncoding
) -> None:
    try:
        frame = encode_user_broadcast(topic, UserBroadcast(event, encoding, payload, meta))
    except ValueError:
        return  # too long, or a lone surrogate: the caller sends nothing
    assert frame[0] == 4
    assert frame[0] not in (0, 1, 2)


@pytest.mark.parametrize(
    ("topic", "body"),
    [
        ("t" * 256, UserBroadcast("e", 1, b"{}")),
        ("é" * 128, UserBroadcast("e", 1, b"{}")),  # 256 UTF-8 bytes
        ("t", UserBroadcast("e" * 256, 1, b"{}")),
        ("t", UserBroadcast("e", 1, b"{}", b"m" * 256)),
        ("t", UserBroadcast("e", 2, b"{}")),
    ],
)
def test_kind4_fields_over_255_bytes_are_not_encoded(topic: str, body: UserBroadcast) -> None:
    with pytest.raises(ValueError):
        encode_user_broadcast(topic, body)


def test_kind4_fields_of_exactly_255_bytes_are_encoded() -> None:
    frame = encode_user_broadcast("t" * 255, UserBroadcast("e" * 255, 0, b"", b"m" * 255))
    assert frame[:5] == bytes((4, 255, 255, 255, 0))
    assert len(frame) == 5 + 3 * 255


# --- kind 3 for vsn 1 receivers (PROTOCOL.md 5.2) ---------------------------------


def test_json_user_broadcast_reaches_vsn1_receivers_as_a_broadcast_payload() -> None:
    body = decode_binary(Vsn.V2, KIND3_EXAMPLE).payload
    payload_json = user_broadcast_as_json_payload(body)
    assert payload_json == '{"type":"broadcast","event":"cursor","payload":{"x":1}}'
    frame = encode_text_raw_payload(Vsn.V1, None, None, "realtime:room1", "broadcast", payload_json)
    assert json.loads(frame) == {
        "topic": "realtime:room1",
        "event": "broadcast",
        "payload": {"type": "broadcast", "event": "cursor", "payload": {"x": 1}},
        "ref": None,
    }


def test_raw_bytes_user_broadcast_gives_vsn1_receivers_nothing() -> None:
    assert user_broadcast_as_json_payload(UserBroadcast("e", PayloadEncoding.BINARY, b"{}")) is None


@pytest.mark.parametrize("payload", [b"", b"{", b"\xff", b'{"a":NaN}', b"\xef\xbb\xbf{}", b"[1] 2"])
def test_invalid_json_user_broadcast_gives_vsn1_receivers_nothing(payload: bytes) -> None:
    assert user_broadcast_as_json_payload(UserBroadcast("e", PayloadEncoding.JSON, payload)) is None


@pytest.mark.parametrize(
    ("meta", "expected_meta"),
    [
        (b"", None),
        (b"{}", None),
        (b"[1]", None),
        (b"not json", None),
        (b'"id"', None),
        (b'{"id":"u1"}', {"id": "u1"}),
        (b' {"id": "u1"}\n', {"id": "u1"}),
    ],
)
def test_json_user_broadcast_carries_meta_only_when_it_is_a_non_empty_object(
    meta: bytes, expected_meta: dict[str, Any] | None
) -> None:
    text = user_broadcast_as_json_payload(UserBroadcast("e", PayloadEncoding.JSON, b"[1]", meta))
    assert text is not None
    decoded = json.loads(text)
    expected: dict[str, Any] = {"type": "broadcast", "event": "e", "payload": [1]}
    if expected_meta is not None:
        expected["meta"] = expected_meta
    assert decoded == expected
    assert list(decoded) == list(expected)


def test_json_user_broadcast_payload_is_spliced_verbatim() -> None:
    body = UserBroadcast("é", PayloadEncoding.JSON, ' {"b": 2, "a": [1.50]} '.encode())
    assert user_broadcast_as_json_payload(body) == (
        '{"type":"broadcast","event":"é","payload":{"b": 2, "a": [1.50]}}'
    )


@given(payload=json_values, event=st.text(max_size=20))
@settings(max_examples=50)
def test_json_user_broadcast_as_text_is_valid_json_with_the_same_payload(
    payload: Any, event: str
) -> None:
    body = UserBroadcast(event, PayloadEncoding.JSON, json.dumps(payload).encode("utf-8"))
    text = user_broadcast_as_json_payload(body)
    assert text is not None
    assert json.loads(text) == {"type": "broadcast", "event": event, "payload": payload}


@given(payload=st.binary(max_size=100), meta=st.binary(max_size=40))
@settings(max_examples=150)
def test_any_user_broadcast_bytes_give_text_or_none(payload: bytes, meta: bytes) -> None:
    text = user_broadcast_as_json_payload(UserBroadcast("e", PayloadEncoding.JSON, payload, meta))
    if text is not None:
        json.loads(text)


# --- readable values ----------------------------------------------------------


def test_short_payloads_are_shown_whole_in_str() -> None:
    assert str(Message("1", None, "t", "e", {"a": 1})) == (
        "Message(join_ref='1', ref=None, topic='t', event='e', payload={'a': 1})"
    )
    assert str(UserBroadcast("e", PayloadEncoding.JSON, b"{}")) == (
        "UserBroadcast(event='e', encoding=1, payload=b'{}', meta=b'')"
    )


def test_frame_errors_carry_a_code_and_a_message() -> None:
    error = FrameError("bad frame")
    assert (error.code, error.message, str(error)) == ("MalformedFrame", "bad frame", "bad frame")
    assert repr(error) == "FrameError(code='MalformedFrame', message='bad frame')"
    assert ProtocolError("x", code="Other").code == "Other"


def test_long_payloads_are_shortened_in_str() -> None:
    msg = Message(None, None, "t", "e", {"x": "y" * 10_000})
    assert len(str(msg)) < 300
    body = UserBroadcast("e", 0, b"z" * 10_000)
    assert len(str(body)) < 300
