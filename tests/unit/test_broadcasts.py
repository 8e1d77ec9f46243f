"""realtime.messages inserts -> realtime.broadcast layer messages (replication.broadcasts)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest

from realtime.hub import Frames
from realtime.protocol.message import Vsn
from core.topics import broadcast_group
from replication import pgoutput
from replication.broadcasts import MAX_BATCH, BroadcastDecoder, meta_for, parse_row

pytestmark = pytest.mark.unit

COLUMNS = ("topic", "extension", "payload", "event", "private", "updated_at", "inserted_at", "id", "binary_payload")
AT = datetime(2026, 12, 6, tzinfo=timezone.utc)


def relation(oid: int = 1, schema: str = "realtime", name: str = "messages") -> pgoutput.Relation:
    cols = tuple(pgoutput.RelationColumn(c, 25, -1, False) for c in COLUMNS)
    return pgoutput.Relation(oid, schema, name, pgoutput.ReplicaIdentity.DEFAULT, cols)


def insert(oid: int = 1, **values: Any) -> pgoutput.Insert:
    row = {"topic": "room1", "extension": "broadcast", "payload": None, "event": "e", "private": "t",
           "updated_at": "2026-12-06 00:00:00", "inserted_at": "2026-12-06 00:00:00", "id": "id-1",
           "binary_payload": None, **values}
    return pgoutput.Insert(oid, tuple(row[c] for c in COLUMNS))


def commit(end: int) -> pgoutput.Commit:
    return pgoutput.Commit(0, end - 1, end, AT)


def decoder(cap: int = 1000) -> BroadcastDecoder:
    d = BroadcastDecoder(max_payload_bytes=cap)
    d.cache.add(relation())
    return d


def test_a_json_row_becomes_a_kind_4_json_broadcast_with_its_id_as_meta() -> None:
    batch = decoder().build([insert(payload='{"a": 1, "id": "id-1"}'), commit(100)])
    [message] = batch.messages
    assert message == {
        "type": "realtime.broadcast", "group": broadcast_group("room1", True), "topic": "realtime:room1",
        "origin": "", "kind": "binary", "event": "e", "encoding": 1, "payload": b'{"a": 1, "id": "id-1"}',
        "meta": b'{"id":"id-1"}', "id": "id-1",
    }
    assert (batch.rows, batch.transactions, batch.confirm_lsn) == (1, 1, 100)


def test_receivers_get_kind_4_with_meta_on_vsn_2_and_the_meta_object_on_vsn_1() -> None:
    [message] = decoder().build([insert(payload='{"a": 1}', private="f"), commit(1)]).messages
    assert message["group"] == broadcast_group("room1", False)
    frames = Frames(message)  # type: ignore[arg-type]
    v2 = frames.for_vsn(Vsn.V2)["bytes"]  # type: ignore[index]
    assert v2 == b"\x04\x0e\x01\x0d\x01realtime:room1e" + b'{"id":"id-1"}' + b'{"a": 1}'
    v1 = json.loads(frames.for_vsn(Vsn.V1)["text"])  # type: ignore[index]
    assert v1["payload"] == {"type": "broadcast", "event": "e", "payload": {"a": 1}, "meta": {"id": "id-1"}}


def test_a_binary_row_is_encoding_0_and_vsn_1_receivers_get_nothing() -> None:
    [message] = decoder().build([insert(binary_payload="\\x00ff10"), commit(1)]).messages
    assert (message["encoding"], message["payload"]) == (0, b"\x00\xff\x10")
    assert Frames(message).for_vsn(Vsn.V1) is None  # type: ignore[arg-type]


def test_rows_over_the_payload_cap_and_other_extensions_are_dropped_but_confirmed() -> None:
    batch = decoder(cap=10).build([
        insert(payload='{"big": "' + "x" * 20 + '"}'), insert(extension="presence", payload="{}"), commit(7),
    ])
    assert (batch.messages, batch.oversized, batch.skipped, batch.confirm_lsn) == ([], 1, 1, 7)


def test_many_rows_to_one_topic_are_batched_in_commit_order() -> None:
    rows = [insert(id=f"r{i}", payload=str(i)) for i in range(MAX_BATCH + 5)]
    other = insert(topic="room2", id="x", payload="0")
    batch = decoder().build([*rows[:3], other, *rows[3:], commit(9)])
    kinds = [m["type"] for m in batch.messages]
    assert kinds == ["realtime.batch", "realtime.batch", "realtime.broadcast"]
    ids = [item["id"] for m in batch.messages[:2] for item in m["messages"]]  # type: ignore[typeddict-item]
    assert ids == [f"r{i}" for i in range(MAX_BATCH + 5)]
    assert batch.rows == MAX_BATCH + 6


def test_meta_stays_far_below_the_kind_4_limit() -> None:
    assert len(meta_for("f" * 36, replayed=True)) < 255
    assert json.loads(meta_for("abc", replayed=True)) == {"replayed": True, "id": "abc"}


def test_a_row_without_id_or_topic_is_not_a_broadcast() -> None:
    assert parse_row({"topic": None, "id": "x"}) is None
    assert parse_row({"topic": "t", "id": None}) is None
