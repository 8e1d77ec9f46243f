"""Phoenix frames <-> :class:`~realtime.protocol.message.Message` (PROTOCOL.md section 2).

This module owns the wire format of both serializer versions: vsn 1.0.0 JSON
objects, vsn 2.0.0 JSON arrays, and the vsn 2.0.0 binary user broadcast frames
(kind 3 in, kind 4 out). It is pure: no I/O, no Django, no channel layer.

Decoding takes untrusted input and raises only :class:`FrameError`; every
frame it refuses is counted in :data:`malformed_frames`. Encoding
always produces compact JSON (``separators=(",", ":")``, ``ensure_ascii=False``),
so a payload encoded once with :func:`encode_json` can be spliced into any
number of frames by :func:`encode_text_raw_payload` and
:func:`user_broadcast_as_json_payload`.
"""

from __future__ import annotations

import json
import math
import re
from enum import IntEnum
from typing import Any, Final

from realtime.protocol.errors import FrameError
from realtime.protocol.message import Message, PayloadEncoding, UserBroadcast, Vsn

__all__ = [
    "MAX_BINARY_FIELD_BYTES",
    "BinaryKind",
    "decode_binary",
    "decode_text",
    "encode_json",
    "encode_text",
    "encode_text_raw_payload",
    "encode_user_broadcast",
    "is_json_payload",
    "malformed_frames",
    "parse_vsn",
    "user_broadcast_as_json_payload",
]

# PROTOCOL.md 2.3: every length in a binary header is one unsigned byte.
MAX_BINARY_FIELD_BYTES: Final = 255

BROADCAST_EVENT: Final = "broadcast"


class BinaryKind(IntEnum):
    """First byte of a vsn 2.0.0 binary frame (PROTOCOL.md 2.3)."""

    PUSH = 0  # plain binary push; no client sends it, so it is refused
    REPLY = 1  # never sent: realtime-js cannot decode it
    BROADCAST = 2  # never sent: realtime-js cannot decode it
    USER_BROADCAST_PUSH = 3  # client -> server
    USER_BROADCAST = 4  # server -> client, the only binary kind realtime-js decodes


# kind, join_ref_len, ref_len, topic_len, event_len, meta_len, encoding
_KIND3_HEADER_LEN: Final = 7


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and every client) does not.
    raise ValueError(f"{name} is not valid JSON")


def _parse_finite_float(text: str) -> float:
    # "1e400" parses to inf, which cannot be encoded again for other receivers.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


# Frames are decoded into values that must encode again without error.
_FRAME_DECODER: Final = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_parse_finite_float
)
# Spliced JSON is only checked, never re-encoded, so any standard number is fine.
_JSON_VALIDATOR: Final = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER: Final = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False
)
_encode: Final = _ENCODER.encode

# A lone surrogate (literal, or as a \u escape) decodes but cannot be sent as
# UTF-8 with ensure_ascii=False; the cheap search gates the exact check.
_MAYBE_SURROGATE: Final = re.compile(r"[\ud800-\udfff]|\\u[dD][89a-fA-F]")

# JSON's insignificant whitespace (RFC 8259 section 2).
_JSON_WS: Final = " \t\n\r"

_V2_SHAPE: Final = "expected a JSON array [join_ref, ref, topic, event, payload]"
_V1_SHAPE: Final = 'expected a JSON object with "topic", "event", "payload", "ref"'

# Frames that decode_text and decode_binary refused in this process. The
# consumer drops each of them (PROTOCOL.md 2.4), so this is the number of
# malformed frames dropped.
malformed_frames = 0


def _count_malformed() -> None:
    global malformed_frames
    malformed_frames += 1


def encode_json(value: Any) -> str:
    """Encode ``value`` exactly as frames embed payloads (compact, UTF-8, no NaN).

    Raises:
        TypeError: ``value`` is not JSON-able.
        ValueError: ``value`` holds NaN or an infinity, or is circular.
    """
    return _encode(value)


def parse_vsn(raw: str | None) -> Vsn:
    """Map the ``vsn`` URL parameter to a :class:`Vsn`; absent or empty is 1.0.0.

    Raises:
        FrameError: code ``UnsupportedVsn`` for any other value (PROTOCOL.md 1.1).
    """
    if raw is None or raw == "":
        return Vsn.V1
    if raw == Vsn.V1.value:
        return Vsn.V1
    if raw == Vsn.V2.value:
        return Vsn.V2
    raise FrameError(
        f"unsupported vsn {raw[:40]!r}, expected 1.0.0 or 2.0.0", code="UnsupportedVsn"
    )


# --- text frames: PROTOCOL.md 2.1 and 2.2 -----------------------------------


def decode_text(vsn: Vsn, text: str | bytes) -> Message:
    """Decode one text frame.

    vsn 1.0.0 takes an object with string ``topic`` and ``event``, any
    ``payload`` (absent means ``{}``), and optional ``ref``/``join_ref``.
    vsn 2.0.0 takes ``[join_ref, ref, topic, event, payload, ...]``; trailing
    items are ignored. Refs may be null, strings or numbers (made strings).

    Raises:
        FrameError: the text is not valid JSON of the expected shape.
    """
    try:
        value = _loads_frame(text)
        if vsn == Vsn.V2:
            return _message_from_array(value)
        return _message_from_object(value)
    except FrameError:
        _count_malformed()
        raise


def _loads_frame(text: str | bytes) -> Any:
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FrameError(f"text frame is not valid UTF-8: {exc.reason}") from None
    elif not isinstance(text, str):
        raise FrameError(f"expected text, got {type(text).__name__}")
    try:
        value = _FRAME_DECODER.decode(text)
    except RecursionError:
        raise FrameError("JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, rejected constants, huge ints
        raise FrameError(f"invalid JSON: {str(exc)[:200]}") from None
    if _MAYBE_SURROGATE.search(text) is not None:
        try:
            _encode(value).encode("utf-8")
        except (UnicodeEncodeError, ValueError, RecursionError):
            raise FrameError("JSON holds a lone UTF-16 surrogate") from None
    return value


def _message_from_array(value: Any) -> Message:
    if not isinstance(value, list):
        raise FrameError(f"{_V2_SHAPE}, got {_json_type(value)}")
    if len(value) < 5:
        raise FrameError(f"{_V2_SHAPE}, got {len(value)} items")
    return Message(
        join_ref=_parse_ref(value[0], "join_ref"),
        ref=_parse_ref(value[1], "ref"),
        topic=_parse_name(value[2], "topic"),
        event=_parse_name(value[3], "event"),
        payload=value[4],
    )


def _message_from_object(value: Any) -> Message:
    if not isinstance(value, dict):
        raise FrameError(f"{_V1_SHAPE}, got {_json_type(value)}")
    return Message(
        join_ref=_parse_ref(value.get("join_ref"), "join_ref"),
        ref=_parse_ref(value.get("ref"), "ref"),
        topic=_parse_name(value.get("topic"), "topic"),
        event=_parse_name(value.get("event"), "event"),
        payload=value["payload"] if "payload" in value else {},
    )


def _parse_ref(value: Any, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    # bool is an int subclass but never a ref.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        # Echo whole numbers the way JavaScript prints them ("1", not "1.0").
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        return repr(value)
    raise FrameError(f"{field} must be a string, number or null, got {_json_type(value)}")


def _parse_name(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    raise FrameError(f"{field} must be a string, got {_json_type(value)}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"  # decoded JSON has no other type


def encode_text(vsn: Vsn, msg: Message) -> str:
    """Encode ``msg`` as one text frame.

    vsn 1.0.0 gives ``{"topic","event","payload","ref"}``: never ``join_ref``,
    always ``ref`` (null on pushes). vsn 2.0.0 gives
    ``[join_ref, ref, topic, event, payload]``.

    Raises:
        TypeError: the payload is a :class:`UserBroadcast` or not JSON-able.
        ValueError: the payload holds NaN or an infinity.
    """
    if isinstance(msg.payload, UserBroadcast):
        raise TypeError(
            "a UserBroadcast payload has no text form; use encode_user_broadcast "
            "or user_broadcast_as_json_payload"
        )
    if vsn == Vsn.V2:
        return _encode([msg.join_ref, msg.ref, msg.topic, msg.event, msg.payload])
    return _encode(
        {"topic": msg.topic, "event": msg.event, "payload": msg.payload, "ref": msg.ref}
    )


def encode_text_raw_payload(
    vsn: Vsn,
    join_ref: str | None,
    ref: str | None,
    topic: str,
    event: str,
    payload_json: str,
) -> str:
    """Like :func:`encode_text`, with a payload already encoded by :func:`encode_json`.

    The payload text is spliced in without being parsed again, so fan-out
    encodes each payload once. The result is byte-identical to
    :func:`encode_text` for the same payload.
    """
    if vsn == Vsn.V2:
        return (
            f"[{_encode(join_ref)},{_encode(ref)},{_encode(topic)},"
            f"{_encode(event)},{payload_json}]"
        )
    return (
        f'{{"topic":{_encode(topic)},"event":{_encode(event)},'
        f'"payload":{payload_json},"ref":{_encode(ref)}}}'
    )


# --- binary frames: PROTOCOL.md 2.3 -----------------------------------------


def decode_binary(vsn: Vsn, data: bytes) -> Message:
    """Decode a kind 3 user broadcast push into a ``broadcast`` :class:`Message`.

    Layout after the kind byte: join_ref_len, ref_len, topic_len, event_len,
    meta_len, encoding, then join_ref, ref, topic, event, meta, payload.
    Empty join_ref and ref stay ``""``. ``meta`` and the payload are kept as
    raw bytes; both are checked, never re-encoded:

    - a non-empty ``meta`` must be UTF-8 JSON (PROTOCOL.md 2.3: "JSON or
      empty"; the reference's ``Jason.decode!`` refuses the frame otherwise),
      though receivers never get it (5.2);
    - an encoding 1 payload must be UTF-8 JSON: it is forwarded verbatim as
      kind 4 encoding 1, and realtime-js throws inside ``onmessage`` on a
      body its ``JSON.parse`` refuses, so one sender would break every
      receiver.

    Raises:
        FrameError: not vsn 2.0.0, a kind other than 3, a truncated frame,
            an encoding other than 0 or 1, a header field that is not UTF-8,
            or a meta or JSON payload that is not UTF-8 JSON.
    """
    try:
        return _decode_kind3(vsn, data)
    except FrameError:
        _count_malformed()
        raise


def _decode_kind3(vsn: Vsn, data: bytes) -> Message:
    if vsn != Vsn.V2:
        raise FrameError("binary frames need vsn 2.0.0")
    if not isinstance(data, bytes):
        if not isinstance(data, (bytearray, memoryview)):
            raise FrameError(f"expected bytes, got {type(data).__name__}")
        data = bytes(data)
    size = len(data)
    if size == 0:
        raise FrameError("empty binary frame")
    kind = data[0]
    if kind != BinaryKind.USER_BROADCAST_PUSH:
        raise FrameError(f"unsupported binary frame kind {kind}")
    if size < _KIND3_HEADER_LEN:
        raise FrameError(
            f"truncated kind 3 header: {size} of {_KIND3_HEADER_LEN} bytes"
        )
    join_ref_len, ref_len, topic_len, event_len, meta_len, encoding = data[1:7]
    if encoding not in (PayloadEncoding.BINARY, PayloadEncoding.JSON):
        raise FrameError(f"unknown payload encoding {encoding}")
    start = _KIND3_HEADER_LEN
    fields_end = start + join_ref_len + ref_len + topic_len + event_len + meta_len
    if fields_end > size:
        raise FrameError(
            f"truncated kind 3 frame: header needs {fields_end} bytes, got {size}"
        )
    join_ref, start = _take_text(data, start, join_ref_len, "join_ref")
    ref, start = _take_text(data, start, ref_len, "ref")
    topic, start = _take_text(data, start, topic_len, "topic")
    event, start = _take_text(data, start, event_len, "event")
    meta = data[start : start + meta_len]
    if meta:
        _check_json(meta, "meta")
    payload = data[fields_end:]
    if encoding == PayloadEncoding.JSON:
        _check_json(payload, "JSON payload")
    return Message(
        join_ref=join_ref,
        ref=ref,
        topic=topic,
        event=BROADCAST_EVENT,
        payload=UserBroadcast(
            event=event,
            encoding=PayloadEncoding(encoding),
            payload=payload,
            meta=meta,
        ),
    )


def is_json_payload(raw: bytes) -> bool:
    """Whether ``raw`` may be sent as a kind 4 encoding 1 payload: one UTF-8 JSON value.

    ``json.loads(raw)`` is not this check: it also takes UTF-16 and UTF-32
    bytes and ``NaN``, which realtime-js's ``TextDecoder`` and ``JSON.parse``
    do not. For bodies that arrive by other ways than kind 3 (REST).
    """
    try:
        _check_json(raw, "payload")
    except FrameError:
        return False
    return True


def _check_json(raw: bytes, field: str) -> None:
    """Parse ``raw`` once as UTF-8 JSON, the way a receiver's ``JSON.parse`` will.

    Raises:
        FrameError: ``raw`` is not UTF-8, or not one JSON value.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(f"kind 3 {field} is not valid UTF-8") from None
    try:
        _JSON_VALIDATOR.decode(text)
    except RecursionError:
        raise FrameError(f"kind 3 {field} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, huge ints
        raise FrameError(f"kind 3 {field} is not valid JSON: {str(exc)[:200]}") from None


def _take_text(data: bytes, start: int, length: int, field: str) -> tuple[str, int]:
    end = start + length
    try:
        return data[start:end].decode("utf-8"), end
    except UnicodeDecodeError:
        raise FrameError(f"{field} is not valid UTF-8") from None


def encode_user_broadcast(topic: str, body: UserBroadcast) -> bytes:
    """Encode a kind 4 user broadcast frame, the only binary frame sent.

    Layout: ``04 topic_len event_len meta_len encoding topic event meta payload``.

    Raises:
        ValueError: topic, event or meta exceeds 255 bytes, or the encoding
            is not 0 or 1; callers then send nothing.
    """
    topic_bytes = topic.encode("utf-8")
    event_bytes = body.event.encode("utf-8")
    meta = bytes(body.meta)
    for field, value in (("topic", topic_bytes), ("event", event_bytes), ("meta", meta)):
        if len(value) > MAX_BINARY_FIELD_BYTES:
            raise ValueError(
                f"{field} is {len(value)} bytes; a kind 4 frame allows at most "
                f"{MAX_BINARY_FIELD_BYTES}"
            )
    if body.encoding not in (PayloadEncoding.BINARY, PayloadEncoding.JSON):
        raise ValueError(f"unknown payload encoding {body.encoding!r}")
    header = bytes(
        (
            BinaryKind.USER_BROADCAST,
            len(topic_bytes),
            len(event_bytes),
            len(meta),
            int(body.encoding),
        )
    )
    return b"".join((header, topic_bytes, event_bytes, meta, body.payload))


def user_broadcast_as_json_payload(body: UserBroadcast, *, validated: bool = False) -> str | None:
    """The text-frame payload for a JSON user broadcast (PROTOCOL.md 5.2).

    Returns ``{"type":"broadcast","event":E,"payload":P}`` with the payload
    text spliced in verbatim, plus ``"meta"`` when ``meta`` is a non-empty JSON
    object. Returns ``None`` for raw-bytes payloads (vsn 1.0.0 receivers get
    nothing) and for payloads that are not valid UTF-8 JSON. ``validated``
    says the payload was checked where it entered (``decode_binary``,
    ``is_json_payload``), so it is spliced without parsing it again: the
    fan-out of every process need not pay for a sender's large body.
    """
    if body.encoding != PayloadEncoding.JSON:
        return None
    if validated:
        try:
            payload_json: str | None = bytes(body.payload).decode("utf-8").strip(_JSON_WS)
        except UnicodeDecodeError:
            payload_json = None
    else:
        payload_json = _valid_json_text(body.payload)
    if payload_json is None:
        return None
    parts = ['{"type":"broadcast","event":', _encode(body.event), ',"payload":', payload_json]
    if body.meta:
        meta_json = _valid_json_text(body.meta, object_only=True)
        if meta_json is not None:
            parts += [',"meta":', meta_json]
    parts.append("}")
    return "".join(parts)


def _valid_json_text(raw: bytes, *, object_only: bool = False) -> str | None:
    """``raw`` as stripped JSON text, or None if it is not UTF-8 JSON (of that shape)."""
    try:
        text = bytes(raw).decode("utf-8")
        value = _JSON_VALIDATOR.decode(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if object_only and not (isinstance(value, dict) and value):
        return None
    return text.strip(_JSON_WS)
