"""The framing of a replication COPY stream, LSNs and Postgres timestamps.

This module owns the messages carried in CopyData once ``START_REPLICATION``
has switched the connection to COPY BOTH mode (PostgreSQL docs, "Streaming
Replication Protocol"):

- server -> client: ``XLogData`` (``'w'``), whose payload is one output-plugin
  message (see :mod:`replication.pgoutput`), and ``Primary keepalive``
  (``'k'``);
- client -> server: ``Standby status update`` (``'r'``), which confirms how far
  the client has written, flushed and applied the WAL.

It also owns the two representations of an LSN: an ``int`` everywhere in our
code, and the ``"16/B374D848"`` text form only at the edges
(:func:`lsn_to_text`, :func:`parse_lsn`); and the protocol's timestamps,
microseconds since 2000-01-01 00:00 UTC (:func:`pg_time_to_datetime`,
:func:`datetime_to_pg_time`).

It is pure: no I/O and no clock (callers pass the time in). Untrusted input is
parsed by :func:`parse_copy_data` and :func:`parse_lsn`, which raise only
:class:`~replication.errors.DecodeError`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import ClassVar, Final, TypeAlias

from replication.errors import DecodeError

__all__ = [
    "INVALID_LSN",
    "MAX_LSN",
    "PG_EPOCH",
    "CopyDataMessage",
    "PrimaryKeepalive",
    "StandbyStatusUpdate",
    "UnsupportedCopyData",
    "XLogData",
    "datetime_to_pg_time",
    "lsn_to_text",
    "parse_copy_data",
    "parse_lsn",
    "pg_time_to_datetime",
]

# InvalidXLogRecPtr: "no position"; START_REPLICATION ... 0/0 means "from the slot".
INVALID_LSN: Final = 0
MAX_LSN: Final = 2**64 - 1

# Every timestamp of the protocol counts microseconds from this instant.
PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)

_MICROSECOND: Final = timedelta(microseconds=1)

# "%X/%X" (pg_lsn output): each half is at most 8 hex digits, no padding on output.
_LSN_TEXT: Final = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")

# Byte1('w') Int64 dataStart, Int64 walEnd, Int64 sendTime, Byte(n) data.
_XLOG_HEADER: Final = struct.Struct(">cQQq")
# Byte1('k') Int64 walEnd, Int64 sendTime, Byte1 replyRequested.
_KEEPALIVE: Final = struct.Struct(">cQqB")
# Byte1('r') Int64 written, Int64 flushed, Int64 applied, Int64 clientTime, Byte1 reply.
_STANDBY_STATUS: Final = struct.Struct(">cQQQqB")


def lsn_to_text(lsn: int) -> str:
    """Format an LSN the way Postgres prints ``pg_lsn`` (``"16/B374D848"``).

    Raises:
        ValueError: ``lsn`` is not in ``0 .. 2**64 - 1``.
    """
    if not 0 <= lsn <= MAX_LSN:
        raise ValueError(f"LSN {lsn} is outside 0 .. 2**64 - 1")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """Parse ``pg_lsn`` text (``"16/B374D848"``, any hex case) into an int.

    Raises:
        DecodeError: ``text`` is not two 1-8 digit hex numbers joined by ``/``.
    """
    match = _LSN_TEXT.fullmatch(text)
    if match is None:
        raise DecodeError(f"not an LSN: {text[:40]!r}, expected text like '16/B374D848'")
    return (int(match[1], 16) << 32) | int(match[2], 16)


def pg_time_to_datetime(microseconds: int) -> datetime:
    """Turn a protocol timestamp (microseconds since 2000-01-01 UTC) into an aware UTC datetime.

    Raises:
        DecodeError: the instant falls outside the years 1-9999 that datetime can hold.
    """
    try:
        return PG_EPOCH + microseconds * _MICROSECOND
    except OverflowError:
        raise DecodeError(
            f"timestamp {microseconds} us after 2000-01-01 is out of range"
        ) from None


def datetime_to_pg_time(moment: datetime) -> int:
    """Turn an aware datetime into a protocol timestamp (microseconds since 2000-01-01 UTC).

    Raises:
        ValueError: ``moment`` is naive, so its instant is unknown.
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("a naive datetime has no instant; pass an aware datetime")
    return (moment - PG_EPOCH) // _MICROSECOND


@dataclass(frozen=True, slots=True)
class XLogData:
    """``'w'``: a piece of WAL, for logical replication exactly one output-plugin message.

    ``start_lsn`` is where ``data`` starts in the WAL (for pgoutput, the LSN of the
    message; 0 for some non-WAL messages), ``end_lsn`` the server's current WAL end,
    ``send_time`` when the server sent it.
    """

    start_lsn: int
    end_lsn: int
    send_time: datetime
    data: bytes

    TAG: ClassVar[bytes] = b"w"

    def serialize(self) -> bytes:
        """The CopyData payload, as the server sends it (useful for fakes and tests)."""
        header = _XLOG_HEADER.pack(
            self.TAG, self.start_lsn, self.end_lsn, datetime_to_pg_time(self.send_time)
        )
        return header + self.data


@dataclass(frozen=True, slots=True)
class PrimaryKeepalive:
    """``'k'``: the server is alive; ``reply_requested`` asks for a status update now.

    Ignoring a requested reply makes the server drop the connection after
    ``wal_sender_timeout``.
    """

    wal_end: int
    send_time: datetime
    reply_requested: bool

    TAG: ClassVar[bytes] = b"k"

    def serialize(self) -> bytes:
        """The CopyData payload, as the server sends it (useful for fakes and tests)."""
        return _KEEPALIVE.pack(
            self.TAG,
            self.wal_end,
            datetime_to_pg_time(self.send_time),
            1 if self.reply_requested else 0,
        )


@dataclass(frozen=True, slots=True)
class StandbyStatusUpdate:
    """``'r'``: how far the client has written, flushed and applied the WAL.

    Each LSN is the position *after* the last byte handled (for pgoutput, a
    Commit's ``end_lsn``). For a logical slot the server keeps WAL back to
    ``flushed_lsn``, which becomes the slot's ``confirmed_flush_lsn``.
    ``reply_requested`` asks the server to answer with a keepalive at once.
    """

    written_lsn: int
    flushed_lsn: int
    applied_lsn: int
    client_time: datetime
    reply_requested: bool = False

    TAG: ClassVar[bytes] = b"r"

    @classmethod
    def confirming(
        cls, lsn: int, client_time: datetime, *, reply_requested: bool = False
    ) -> StandbyStatusUpdate:
        """A status update reporting ``lsn`` as written, flushed and applied."""
        return cls(lsn, lsn, lsn, client_time, reply_requested)

    def serialize(self) -> bytes:
        """The CopyData payload to send to the server.

        Raises:
            ValueError: an LSN is out of range or ``client_time`` is naive.
        """
        for lsn in (self.written_lsn, self.flushed_lsn, self.applied_lsn):
            if not 0 <= lsn <= MAX_LSN:
                raise ValueError(f"LSN {lsn} is outside 0 .. 2**64 - 1")
        return _STANDBY_STATUS.pack(
            self.TAG,
            self.written_lsn,
            self.flushed_lsn,
            self.applied_lsn,
            datetime_to_pg_time(self.client_time),
            1 if self.reply_requested else 0,
        )


@dataclass(frozen=True, slots=True)
class UnsupportedCopyData:
    """A CopyData message whose first byte names no message this module knows."""

    tag: int
    body: bytes


CopyDataMessage: TypeAlias = XLogData | PrimaryKeepalive | UnsupportedCopyData


def parse_copy_data(data: bytes | bytearray | memoryview) -> CopyDataMessage:
    """Parse one CopyData payload received from the server during replication.

    An unknown first byte gives :class:`UnsupportedCopyData`, so a newer server's
    extra messages can be logged and skipped.

    Raises:
        DecodeError: the payload is empty, truncated, too long for its kind, or
            carries a timestamp outside the years 1-9999.
    """
    raw = bytes(data)
    if not raw:
        raise DecodeError("empty CopyData message")
    tag = raw[0:1]
    if tag == XLogData.TAG:
        if len(raw) < _XLOG_HEADER.size:
            raise DecodeError(
                f"XLogData is {len(raw)} bytes, shorter than its {_XLOG_HEADER.size}-byte header"
            )
        _, start, end, sent = _XLOG_HEADER.unpack_from(raw)
        return XLogData(start, end, pg_time_to_datetime(sent), raw[_XLOG_HEADER.size :])
    if tag == PrimaryKeepalive.TAG:
        if len(raw) != _KEEPALIVE.size:
            raise DecodeError(
                f"primary keepalive is {len(raw)} bytes, expected {_KEEPALIVE.size}"
            )
        _, wal_end, sent, reply = _KEEPALIVE.unpack(raw)
        return PrimaryKeepalive(wal_end, pg_time_to_datetime(sent), reply != 0)
    return UnsupportedCopyData(raw[0], raw[1:])
