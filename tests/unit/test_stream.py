"""Tests for replication.stream: COPY-stream framing, LSN text and protocol timestamps."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication.errors import DecodeError
from replication.pgoutput import Begin, decode_message
from replication.stream import (
    INVALID_LSN,
    MAX_LSN,
    PG_EPOCH,
    PrimaryKeepalive,
    StandbyStatusUpdate,
    UnsupportedCopyData,
    XLogData,
    datetime_to_pg_time,
    lsn_to_text,
    parse_copy_data,
    parse_lsn,
    pg_time_to_datetime,
)

pytestmark = pytest.mark.unit

FIXTURE = Path(__file__).parents[1] / "fixtures" / "pgoutput" / "captured.json"
ONE_SECOND_IN = PG_EPOCH + timedelta(seconds=1)  # 1_000_000 us = 0x0F4240

aware_datetimes = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
lsns = st.integers(min_value=0, max_value=MAX_LSN)


# --- LSN ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lsn", "text"),
    [
        (INVALID_LSN, "0/0"),
        (0x16B374D848, "16/B374D848"),
        (0x1A0C9B0, "0/1A0C9B0"),
        (2**32, "1/0"),
        (MAX_LSN, "FFFFFFFF/FFFFFFFF"),
    ],
)
def test_lsn_text_is_two_unpadded_uppercase_hex_halves(lsn: int, text: str) -> None:
    assert lsn_to_text(lsn) == text
    assert parse_lsn(text) == lsn


def test_parse_lsn_accepts_lowercase_and_zero_padding() -> None:
    assert parse_lsn("16/b374d848") == parse_lsn("00000016/B374D848") == 0x16B374D848


@pytest.mark.parametrize(
    "text", ["", "16", "16/", "/1", "16/B374D848/0", "1G/0", "123456789/0", " 0/0", "0/0 ", "-1/0"]
)
def test_parse_lsn_refuses_anything_else(text: str) -> None:
    with pytest.raises(DecodeError, match="not an LSN"):
        parse_lsn(text)


@pytest.mark.parametrize("lsn", [-1, MAX_LSN + 1])
def test_lsn_to_text_refuses_out_of_range_values(lsn: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        lsn_to_text(lsn)


@given(lsns)
def test_lsn_text_round_trips(lsn: int) -> None:
    assert parse_lsn(lsn_to_text(lsn)) == lsn


@given(st.text(max_size=20))
def test_parse_lsn_of_arbitrary_text_returns_an_lsn_or_raises_decode_error(text: str) -> None:
    try:
        lsn = parse_lsn(text)
    except DecodeError:
        return
    assert 0 <= lsn <= MAX_LSN


def test_lsns_printed_by_postgres_parse_and_print_back_unchanged() -> None:
    document = json.loads(FIXTURE.read_text(encoding="utf-8"))
    texts = {message["lsn"] for entry in document["steps"] for message in entry["messages"]}

    assert texts
    for text in texts:
        assert lsn_to_text(parse_lsn(text)) == text


# --- timestamps --------------------------------------------------------------


def test_protocol_time_counts_microseconds_from_2000_utc() -> None:
    assert pg_time_to_datetime(0) == datetime(2000, 1, 1, tzinfo=UTC)
    assert pg_time_to_datetime(-1) == datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert datetime_to_pg_time(ONE_SECOND_IN) == 1_000_000
    moment = datetime(2026, 8, 21, 14, 0, 0, 123000, tzinfo=timezone(timedelta(hours=2)))
    assert pg_time_to_datetime(datetime_to_pg_time(moment)) == moment
    assert datetime_to_pg_time(moment) == 840_628_800_123_000


def test_commit_time_of_a_real_origin_transaction_decodes_to_the_time_set() -> None:
    # capture.py sets the origin commit time to 2026-08-21 12:00:00+00:
    # 9729 days and 12 hours after 2000-01-01.
    document = json.loads(FIXTURE.read_text(encoding="utf-8"))
    origin_step = next(entry for entry in document["steps"] if entry["name"] == "origin")
    begin = decode_message(bytes.fromhex(origin_step["messages"][0]["hex"]))

    assert isinstance(begin, Begin)
    assert begin.commit_time == datetime(2026, 8, 21, 12, tzinfo=UTC)
    assert datetime_to_pg_time(begin.commit_time) == 840_628_800_000_000


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        datetime_to_pg_time(datetime(2026, 1, 1))


@pytest.mark.parametrize("micros", [2**63 - 1, -(2**63)])
def test_timestamps_beyond_datetime_range_raise_decode_error(micros: int) -> None:
    with pytest.raises(DecodeError, match="out of range"):
        pg_time_to_datetime(micros)


@given(aware_datetimes)
def test_protocol_time_round_trips(moment: datetime) -> None:
    assert pg_time_to_datetime(datetime_to_pg_time(moment)) == moment


# --- CopyData messages -------------------------------------------------------


def test_xlogdata_parses_header_and_keeps_the_payload() -> None:
    payload = b"B" + bytes(20)
    raw = (
        b"w"
        + (0x16B374D848).to_bytes(8, "big")
        + (0x16B374D900).to_bytes(8, "big")
        + (1_000_000).to_bytes(8, "big")
        + payload
    )

    message = parse_copy_data(raw)

    assert message == XLogData(0x16B374D848, 0x16B374D900, ONE_SECOND_IN, payload)
    assert isinstance(message, XLogData) and message.serialize() == raw


def test_xlogdata_accepts_memoryview_and_an_empty_payload() -> None:
    raw = XLogData(1, 2, PG_EPOCH, b"").serialize()

    assert parse_copy_data(memoryview(raw)) == XLogData(1, 2, PG_EPOCH, b"")


def test_keepalive_parses_the_reply_request() -> None:
    raw = b"k" + (0x10).to_bytes(8, "big") + (1_000_000).to_bytes(8, "big") + b"\x01"

    assert parse_copy_data(raw) == PrimaryKeepalive(0x10, ONE_SECOND_IN, reply_requested=True)
    assert parse_copy_data(raw[:-1] + b"\x00") == PrimaryKeepalive(0x10, ONE_SECOND_IN, False)
    assert PrimaryKeepalive(0x10, ONE_SECOND_IN, True).serialize() == raw


def test_standby_status_update_serializes_to_the_documented_layout() -> None:
    update = StandbyStatusUpdate(
        written_lsn=0x16B374D848, flushed_lsn=0x16B374D848, applied_lsn=0,
        client_time=ONE_SECOND_IN, reply_requested=False,
    )  # fmt: skip

    assert update.serialize().hex().upper() == (
        "72" "00000016B374D848" "00000016B374D848" "0000000000000000" "00000000000F4240" "00"
    )  # fmt: skip


def test_confirming_reports_one_lsn_as_written_flushed_and_applied() -> None:
    update = StandbyStatusUpdate.confirming(0x10, ONE_SECOND_IN, reply_requested=True)

    assert update == StandbyStatusUpdate(0x10, 0x10, 0x10, ONE_SECOND_IN, True)
    assert update.serialize()[-1:] == b"\x01"


@pytest.mark.parametrize("lsn", [-1, MAX_LSN + 1])
def test_standby_status_update_refuses_out_of_range_lsns(lsn: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        StandbyStatusUpdate(lsn, 0, 0, ONE_SECOND_IN).serialize()


def test_unknown_copy_data_is_returned_as_unsupported() -> None:
    assert parse_copy_data(b"s\x01\x02") == UnsupportedCopyData(ord("s"), b"\x01\x02")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty"),
        (b"w" + bytes(23), "shorter than its 25-byte header"),
        (b"k" + bytes(16), "expected 18"),
        (b"k" + bytes(18), "expected 18"),
        (b"w" + bytes(8) + bytes(8) + b"\x7f" + b"\xff" * 7, "out of range"),
    ],
)
def test_truncated_or_corrupt_copy_data_raises_decode_error(raw: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        parse_copy_data(raw)


@given(st.binary(max_size=40))
def test_arbitrary_copy_data_parses_or_raises_decode_error(raw: bytes) -> None:
    try:
        parse_copy_data(raw)
    except DecodeError:
        pass


@given(st.sampled_from([b"w", b"k"]), st.binary(max_size=40))
def test_arbitrary_bodies_of_known_kinds_parse_or_raise_decode_error(
    tag: bytes, body: bytes
) -> None:
    try:
        parse_copy_data(tag + body)
    except DecodeError:
        pass


@given(lsns, lsns, aware_datetimes, st.binary(max_size=40))
def test_xlogdata_round_trips(start: int, end: int, sent: datetime, data: bytes) -> None:
    message = XLogData(start, end, sent, data)

    assert parse_copy_data(message.serialize()) == message


@given(lsns, aware_datetimes, st.booleans())
def test_keepalive_round_trips(wal_end: int, sent: datetime, reply: bool) -> None:
    message = PrimaryKeepalive(wal_end, sent, reply)

    assert parse_copy_data(message.serialize()) == message
