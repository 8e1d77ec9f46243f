"""Wire units of the Phoenix protocol: the frame, the user broadcast body, the vsn.

This module owns the value types that cross the serializer boundary in both
directions (PROTOCOL.md section 2). It knows nothing about JSON or bytes: the
serializer turns text and binary frames into these values and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any

__all__ = ["Message", "PayloadEncoding", "UserBroadcast", "Vsn"]

# Longest payload repr shown by ``str(Message)``; logs stay one short line.
_STR_PAYLOAD_LIMIT = 120


class Vsn(str, Enum):
    """Serializer version chosen by the ``vsn`` URL parameter (PROTOCOL.md 1.1)."""

    V1 = "1.0.0"  # JSON objects
    V2 = "2.0.0"  # JSON arrays plus binary frames


class PayloadEncoding(IntEnum):
    """How a user broadcast payload is encoded (PROTOCOL.md 2.3)."""

    BINARY = 0  # raw bytes
    JSON = 1  # UTF-8 JSON text


@dataclass(frozen=True, slots=True)
class Message:
    """One Phoenix frame, inbound or outbound.

    ``join_ref`` and ``ref`` are echoed back unchanged. ``payload`` is a decoded
    JSON value, or a :class:`UserBroadcast` for binary kinds 3 and 4.
    """

    join_ref: str | None
    ref: str | None
    topic: str
    event: str
    payload: Any

    def __str__(self) -> str:
        payload = repr(self.payload)
        if len(payload) > _STR_PAYLOAD_LIMIT:
            payload = payload[: _STR_PAYLOAD_LIMIT - 3] + "..."
        return (
            f"Message(join_ref={self.join_ref!r}, ref={self.ref!r}, "
            f"topic={self.topic!r}, event={self.event!r}, payload={payload})"
        )


@dataclass(frozen=True, slots=True)
class UserBroadcast:
    """The body of a binary user broadcast: kind 3 inbound, kind 4 outbound.

    ``encoding`` is a :class:`PayloadEncoding` value (0 raw bytes, 1 UTF-8 JSON).
    ``meta`` is raw JSON text or empty.
    """

    event: str
    encoding: int
    payload: bytes
    meta: bytes = b""

    def __str__(self) -> str:
        payload = repr(self.payload)
        if len(payload) > _STR_PAYLOAD_LIMIT:
            payload = payload[: _STR_PAYLOAD_LIMIT - 3] + "..."
        return (
            f"UserBroadcast(event={self.event!r}, encoding={int(self.encoding)}, "
            f"payload={payload}, meta={self.meta!r})"
        )
