"""Tests for replication.pgoutput: real pgoutput bytes -> messages -> rows by column name.

The bytes come from tests/fixtures/pgoutput/captured.json, written by
capture.py next to it against a real PostgreSQL 16; no database is needed here.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication.errors import DecodeError, ReplicationError, UnknownRelationError
from replication.pgoutput import (
    BUILTIN_TYPE_NAMES,
    UNCHANGED_TOAST,
    Begin,
    Commit,
    Delete,
    Insert,
    Message,
    OldTupleKind,
    Origin,
    PgoutputMessage,
    RawRow,
    Relation,
    RelationCache,
    RelationColumn,
    ReplicaIdentity,
    Truncate,
    TruncateOptions,
    Type,
    Unsupported,
    Update,
    decode_message,
)
from replication.stream import parse_lsn
from pgtypes.values import convert_row, encode_json

pytestmark = pytest.mark.unit

FIXTURE = Path(__file__).parents[1] / "fixtures" / "pgoutput" / "captured.json"
BIG_BODY = "0123456789abcdef" * 256


@cache
def captured() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))
    return document


def step(name: str) -> dict[str, Any]:
    for entry in captured()["steps"]:
        if entry["name"] == name:
            return dict(entry)
    raise KeyError(name)


def raw_messages(name: str) -> list[bytes]:
    return [bytes.fromhex(message["hex"]) for message in step(name)["messages"]]


def messages(name: str) -> list[PgoutputMessage]:
    return [decode_message(data) for data in raw_messages(name)]


def cache_for(decoded: list[PgoutputMessage], **kwargs: Any) -> RelationCache:
    relations = RelationCache(**kwargs)
    for message in decoded:
        if isinstance(message, Relation | Type):
            relations.add(message)
    return relations


T = TypeVar("T")


def of_type(decoded: list[PgoutputMessage], kind: type[T]) -> list[T]:
    return [message for message in decoded if isinstance(message, kind)]


def typed_row(relations: RelationCache, relation_oid: int, row: RawRow) -> dict[str, Any]:
    columns = [(column.name, column.value_type) for column in relations.columns(relation_oid)]
    return convert_row(columns, row.values)


def _all_messages() -> list[tuple[str, bytes]]:
    # (id, bytes) of every captured message.
    return [
        (f"{entry['name']}-{index}", data)
        for entry in captured()["steps"]
        for index, data in enumerate(raw_messages(entry["name"]))
    ]


ALL_STEPS = [entry["name"] for entry in captured()["steps"]]
ALL_MESSAGES = _all_messages()


# --- the two required behaviours ---------------------------------------------


def test_postgres_payload_deserialize() -> None:
    decoded = messages("insert_all_types")
    relations = cache_for(decoded)
    insert = of_type(decoded, Insert)[0]

    row = relations.new_row(insert)
    record = typed_row(relations, insert.relation_oid, row)

    assert row.unchanged_toast == frozenset()
    assert record == {
        "id": 1,
        "c_bool": True,
        "c_bytea": "0102030405",
        "c_char": "a",
        "c_name": "a_name",
        "c_int2": -32768,
        "c_int4": 2147483647,
        "c_int8": 9007199254740993,
        "c_text": 'héllo "world"\ntab\tend',
        "c_oid": "4294967295",
        "c_json": {"a": [1, Decimal("2.50")], "b": 3},
        "c_float4": 1.1,
        "c_float8": 1.5e-07,
        "c_money": "$12.34",
        "c_varchar": "varchar",
        "c_bpchar": "ab   ",
        "c_date": "2026-08-21",
        "c_time": "12:00:01.5",
        "c_timestamp": "2026-08-21T12:00:00.123",
        "c_timestamptz": "2026-08-21T12:00:00.123+00:00",
        "c_interval": "1 year 2 mons 3 days 04:05:06.7",
        "c_timetz": "12:00:00+05:30",
        "c_numeric": Decimal("123456789012345678901234567890.123456789"),
        "c_uuid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "c_jsonb": {
            "n": Decimal("1.50"),
            "big": 123456789012345678901234567890,
            "nested": {"x": [1, "two", None, True]},
        },
        "c_inet": "192.168.0.1/24",
        "c_cidr": "10.0.0.0/8",
        "c_macaddr": "08:00:2b:01:02:03",
        "c_mood": "happy",
        "c_positive": 7,
        "c_pair": '(1,"a b")',
        "c_int4range": "[1,10)",
        "c_int4_arr": [1, 2, None],
        "c_int8_arr": [9223372036854775807, -9007199254740993],
        "c_text_arr": [
            "a b", None, "NULL", 'q"uote', "back\\slash", ",", "{}", "", " lead", "plain"
        ],  # fmt: skip
        "c_varchar_arr": ["x", "y z"],
        "c_numeric_arr": [
            Decimal("1.5"),
            "NaN",
            Decimal("-0.001"),
            Decimal("100000000000000000000.0000000001"),
        ],
        "c_float8_arr": [1.5, "NaN", "Infinity", "-Infinity"],
        "c_bool_arr": [True, False, None],
        "c_jsonb_arr": [{"a": 1}, [1, "x"], None],
        "c_timestamptz_arr": ["2026-08-21T12:00:00.5+00:00", "2026-01-01T00:00:00+00:00"],
        "c_date_arr": ["2026-08-21", "infinity"],
        "c_bytea_arr": ["\\x01", "\\x"],
        "c_uuid_arr": ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"],
        "c_int4_matrix": [[1, 2], [3, 4]],
        "c_mood_arr": ["sad", "happy"],
    }
    # The digits survive into the JSON text, in table order.
    text = encode_json(record)
    assert text.startswith('{"id":1,"c_bool":true,"c_bytea":"0102030405",')
    assert '"c_int8":9007199254740993,' in text
    assert '"c_numeric":123456789012345678901234567890.123456789,' in text
    assert '"c_json":{"a":[1,2.50],"b":3},' in text


def test_column_info_mapping() -> None:
    decoded = messages("insert_all_types")
    relations = cache_for(decoded)
    relation = of_type(decoded, Relation)[0]

    assert (relation.schema, relation.name) == ("capture_fixture", "all_types")
    assert relation.replica_identity is ReplicaIdentity.DEFAULT
    columns = relations.columns(relation.oid)
    assert [column.to_json() for column in columns] == [
        {"name": "id", "type": "int8"},
        {"name": "c_bool", "type": "bool"},
        {"name": "c_bytea", "type": "bytea"},
        {"name": "c_char", "type": "char"},
        {"name": "c_name", "type": "name"},
        {"name": "c_int2", "type": "int2"},
        {"name": "c_int4", "type": "int4"},
        {"name": "c_int8", "type": "int8"},
        {"name": "c_text", "type": "text"},
        {"name": "c_oid", "type": "oid"},
        {"name": "c_json", "type": "json"},
        {"name": "c_float4", "type": "float4"},
        {"name": "c_float8", "type": "float8"},
        {"name": "c_money", "type": "money"},
        {"name": "c_varchar", "type": "varchar"},
        {"name": "c_bpchar", "type": "bpchar"},
        {"name": "c_date", "type": "date"},
        {"name": "c_time", "type": "time"},
        {"name": "c_timestamp", "type": "timestamp"},
        {"name": "c_timestamptz", "type": "timestamptz"},
        {"name": "c_interval", "type": "interval"},
        {"name": "c_timetz", "type": "timetz"},
        {"name": "c_numeric", "type": "numeric"},
        {"name": "c_uuid", "type": "uuid"},
        {"name": "c_jsonb", "type": "jsonb"},
        {"name": "c_inet", "type": "inet"},
        {"name": "c_cidr", "type": "cidr"},
        {"name": "c_macaddr", "type": "macaddr"},
        {"name": "c_mood", "type": "mood"},
        # pgoutput names a domain by its base type; the caller's pg_type names win.
        {"name": "c_positive", "type": "int4"},
        {"name": "c_pair", "type": "pair"},
        {"name": "c_int4range", "type": "int4range"},
        {"name": "c_int4_arr", "type": "_int4"},
        {"name": "c_int8_arr", "type": "_int8"},
        {"name": "c_text_arr", "type": "_text"},
        {"name": "c_varchar_arr", "type": "_varchar"},
        {"name": "c_numeric_arr", "type": "_numeric"},
        {"name": "c_float8_arr", "type": "_float8"},
        {"name": "c_bool_arr", "type": "_bool"},
        {"name": "c_jsonb_arr", "type": "_jsonb"},
        {"name": "c_timestamptz_arr", "type": "_timestamptz"},
        {"name": "c_date_arr", "type": "_date"},
        {"name": "c_bytea_arr", "type": "_bytea"},
        {"name": "c_uuid_arr", "type": "_uuid"},
        {"name": "c_int4_matrix", "type": "_int4"},
        {"name": "c_mood_arr", "type": "_mood"},
    ]
    assert [column.name for column in columns if column.is_key] == ["id"]
    # atttypmod: varchar(20) and char(5) store length + 4 (VARHDRSZ); no modifier is -1.
    modified = {c.name: c.type_modifier for c in columns if c.type_modifier != -1}
    assert modified == {"c_varchar": 20 + 4, "c_bpchar": 5 + 4}


# --- relation cache -----------------------------------------------------------


def test_caller_type_names_name_a_domain_which_still_converts_as_its_base_type() -> None:
    user_types: dict[str, int] = captured()["user_types"]
    decoded = messages("insert_all_types")
    relations = cache_for(decoded, type_names={oid: name for name, oid in user_types.items()})
    insert = of_type(decoded, Insert)[0]

    positive = next(c for c in relations.columns(insert.relation_oid) if c.name == "c_positive")

    assert (positive.type_name, positive.value_type) == ("positive_int", "int4")
    assert typed_row(relations, insert.relation_oid, relations.new_row(insert))["c_positive"] == 7


def test_type_messages_name_user_types_and_a_domain_by_its_base_type() -> None:
    user_types: dict[str, int] = captured()["user_types"]
    types = {message.oid: message for message in of_type(messages("insert_all_types"), Type)}

    assert {oid: (t.namespace, t.name) for oid, t in types.items()} == {
        user_types["mood"]: ("capture_fixture", "mood"),
        user_types["_mood"]: ("capture_fixture", "_mood"),
        user_types["pair"]: ("capture_fixture", "pair"),
        user_types["positive_int"]: ("", "int4"),
    }


def test_value_types_from_the_caller_override_everything() -> None:
    decoded = messages("insert_all_types")
    relations = cache_for(decoded)
    insert = of_type(decoded, Insert)[0]
    mood_arr = next(c for c in relations.columns(insert.relation_oid) if c.name == "c_mood_arr")

    relations.add_type_names({}, value_types={mood_arr.type_oid: "text"})

    assert typed_row(relations, insert.relation_oid, relations.new_row(insert))["c_mood_arr"] == (
        '{sad,happy}'
    )


def test_builtin_type_names_match_pg_type() -> None:
    pg_type = {int(oid): name for oid, name in captured()["pg_type"].items()}

    assert {oid: pg_type.get(oid) for oid in BUILTIN_TYPE_NAMES} == dict(BUILTIN_TYPE_NAMES)


def test_every_insert_of_all_types_matches_postgres_to_jsonb() -> None:
    # to_jsonb(row) read back right after the insert; bytea and composites differ on purpose.
    decoded = messages("insert_all_types")
    relations = cache_for(decoded)
    inserts = of_type(decoded, Insert)
    expected_rows = step("insert_all_types")["rows"]
    assert len(inserts) == len(expected_rows) == 5

    for insert, expected_text in zip(inserts, expected_rows, strict=True):
        record = typed_row(relations, insert.relation_oid, relations.new_row(insert))
        ours = json.loads(encode_json(record), parse_float=Decimal)
        expected = json.loads(expected_text, parse_float=Decimal)
        for name, value in expected.items():
            if name == "c_bytea" and value is not None:
                assert ours[name] == value.removeprefix("\\x"), name
            elif name == "c_pair" and value is not None:
                assert ours[name] == '(1,"a b")'
            else:
                assert ours[name] == value, name
        assert list(ours) == [column.name for column in relations.columns(insert.relation_oid)]


def test_null_columns_come_out_as_none() -> None:
    decoded = messages("insert_all_types")
    relations = cache_for(decoded)
    row = relations.new_row(of_type(decoded, Insert)[1])

    assert row.values["id"] == "2"
    assert {value for name, value in row.values.items() if name != "id"} == {None}


def test_unknown_relation_oid_raises_unknown_relation_error() -> None:
    relations = RelationCache()

    with pytest.raises(UnknownRelationError) as caught:
        relations.decode_tuple(4242, ("1",))

    assert caught.value.relation_oid == 4242
    assert isinstance(caught.value, DecodeError)
    assert 4242 not in relations


def test_tuple_with_a_different_column_count_raises_decode_error() -> None:
    decoded = messages("identity_default")
    relations = cache_for(decoded)
    oid = of_type(decoded, Relation)[0].oid

    with pytest.raises(DecodeError, match="tuple has 2 columns"):
        relations.decode_tuple(oid, ("1", "a"))


def test_unknown_type_oids_are_named_by_digits_until_the_caller_names_them() -> None:
    relation = Relation(
        oid=1, namespace="", name="t", replica_identity=ReplicaIdentity.DEFAULT,
        columns=(RelationColumn("v", type_oid=99999, type_modifier=-1, is_key=True),),
    )  # fmt: skip
    relations = RelationCache()
    relations.add(relation)

    assert relations.unknown_type_oids() == {99999}
    assert relations.columns(1)[0].to_json() == {"name": "v", "type": "99999"}
    assert relation.schema == "pg_catalog"

    relations.add_type_names({99999: "citext"})

    assert relations.unknown_type_oids() == frozenset()
    assert relations.columns(1)[0].to_json() == {"name": "v", "type": "citext"}


def test_a_new_relation_message_replaces_the_cached_shape() -> None:
    first = Relation(
        1, "public", "t", ReplicaIdentity.DEFAULT, (RelationColumn("a", 23, -1, True),)
    )
    second = Relation(
        1, "public", "t", ReplicaIdentity.FULL,
        (RelationColumn("a", 23, -1, True), RelationColumn("b", 25, -1, True)),
    )  # fmt: skip
    relations = RelationCache()
    relations.add(first)
    assert [c.name for c in relations.columns(1)] == ["a"]

    relations.add(second)

    assert [c.name for c in relations.columns(1)] == ["a", "b"]
    assert relations.relation(1) is second
    assert list(relations.relations()) == [second]


def test_binary_values_are_kept_as_bytes() -> None:
    relation = Relation(
        1, "public", "t", ReplicaIdentity.DEFAULT, (RelationColumn("a", 17, -1, True),)
    )
    data = b"I" + (1).to_bytes(4, "big") + b"N" + b"\x00\x01" + b"b" + b"\x00\x00\x00\x02\x01\x02"
    insert = decode_message(data)
    relations = RelationCache()
    relations.add(relation)

    assert isinstance(insert, Insert)
    assert relations.new_row(insert).values == {"a": b"\x01\x02"}
    assert convert_row([("a", "bytea")], relations.new_row(insert).values) == {"a": "0102"}


# --- each captured scenario --------------------------------------------------


def test_transactions_are_framed_by_begin_and_commit_with_matching_lsns() -> None:
    for name in ALL_STEPS:
        if name == "logical_messages":
            continue
        decoded = messages(name)
        rows = step(name)["messages"]
        begins = [(i, m) for i, m in enumerate(decoded) if isinstance(m, Begin)]
        commits = [(i, m) for i, m in enumerate(decoded) if isinstance(m, Commit)]
        assert len(begins) == len(commits) > 0, name
        for (_, begin), (index, commit) in zip(begins, commits, strict=True):
            assert begin.final_lsn == commit.commit_lsn < commit.end_lsn
            assert begin.commit_time == commit.commit_time
            assert commit.flags == 0
            # The slot reports a Commit at its end LSN, the position to confirm.
            assert parse_lsn(rows[index]["lsn"]) == commit.end_lsn
            assert rows[index]["xid"] == begin.xid


def test_update_of_a_non_key_column_under_default_identity_has_no_old_tuple() -> None:
    decoded = messages("identity_default")
    relations = cache_for(decoded)
    first_update, key_update = of_type(decoded, Update)

    assert (first_update.old_kind, first_update.old) == (None, None)
    assert relations.old_row(first_update) is None
    assert typed_row(relations, first_update.relation_oid, relations.new_row(first_update)) == {
        "id": 1,
        "title": "a2",
        "done": True,
    }
    # Changing the key sends the old key: every column, the others as null.
    assert key_update.old_kind is OldTupleKind.KEY
    assert key_update.old == ("2", None, None)
    old = relations.old_row(key_update)
    assert old is not None
    assert typed_row(relations, key_update.relation_oid, old) == {"id": 2}
    assert relations.new_row(key_update).values == {"id": "20", "title": "b", "done": "f"}


def test_delete_under_default_identity_carries_the_key_only() -> None:
    decoded = messages("identity_default")
    relations = cache_for(decoded)
    (delete,) = of_type(decoded, Delete)

    old = relations.old_row(delete)

    assert delete.old_kind is OldTupleKind.KEY
    assert old == RawRow({"id": "1"}, frozenset())


def test_full_identity_sends_every_old_column_and_flags_every_column_as_key() -> None:
    decoded = messages("identity_full")
    relations = cache_for(decoded)
    (relation,) = of_type(decoded, Relation)
    (update,) = of_type(decoded, Update)
    (delete,) = of_type(decoded, Delete)

    assert relation.replica_identity is ReplicaIdentity.FULL
    assert [column.is_key for column in relation.columns] == [True, True, True]
    assert update.old_kind is OldTupleKind.OLD
    old = relations.old_row(update)
    assert old is not None
    assert typed_row(relations, update.relation_oid, old) == {
        "id": 1,
        "title": "a",
        "score": Decimal("1.50"),
    }
    assert relations.new_row(update).values == {"id": "1", "title": "b", "score": None}
    assert delete.old_kind is OldTupleKind.OLD
    assert relations.old_row(delete) == RawRow(
        {"id": "1", "title": "b", "score": None}, frozenset()
    )


def test_index_identity_keys_rows_by_the_index_columns_not_the_primary_key() -> None:
    decoded = messages("identity_index")
    relations = cache_for(decoded)
    (relation,) = of_type(decoded, Relation)
    plain_update, code_update = of_type(decoded, Update)
    (delete,) = of_type(decoded, Delete)

    assert relation.replica_identity is ReplicaIdentity.INDEX
    assert [c.name for c in relation.columns if c.is_key] == ["code"]
    assert plain_update.old is None
    assert relations.old_row(code_update) == RawRow({"code": "c1"}, frozenset())
    assert relations.old_row(delete) == RawRow({"code": "c2"}, frozenset())


def test_nothing_identity_and_keyless_tables_publish_inserts_only() -> None:
    # Postgres itself refuses UPDATE/DELETE on a published table without identity.
    for name, table in (("identity_nothing", "identity_nothing"), ("no_pk", "no_pk")):
        decoded = messages(name)
        (relation,) = of_type(decoded, Relation)
        assert relation.name == table
        assert not any(column.is_key for column in relation.columns)
        assert not of_type(decoded, Update) and not of_type(decoded, Delete)
        refused = step(name)["refused"]
        assert refused and {entry["sqlstate"] for entry in refused} == {"55000"}
        assert all("does not have a replica identity" in entry["error"] for entry in refused)
    assert of_type(messages("identity_nothing"), Relation)[0].replica_identity is (
        ReplicaIdentity.NOTHING
    )
    relations = cache_for(messages("no_pk"))
    rows = [relations.new_row(insert).values for insert in of_type(messages("no_pk"), Insert)]
    assert rows == [{"title": "a", "n": "1"}, {"title": None, "n": None}]


def test_update_leaving_a_toasted_column_alone_marks_it_unchanged() -> None:
    decoded = messages("toasted")
    relations = cache_for(decoded)
    (insert,) = of_type(decoded, Insert)
    (update,) = of_type(decoded, Update)

    assert relations.new_row(insert).values["body"] == BIG_BODY
    assert update.new == ("1", "second", UNCHANGED_TOAST)
    assert update.old is None
    row = relations.new_row(update)
    assert row == RawRow({"id": "1", "note": "second"}, frozenset({"body"}))
    assert typed_row(relations, update.relation_oid, row) == {"id": 1, "note": "second"}


def test_full_identity_carries_the_untouched_toasted_value_in_the_old_tuple() -> None:
    decoded = messages("toasted_full")
    relations = cache_for(decoded)
    (update,) = of_type(decoded, Update)
    (delete,) = of_type(decoded, Delete)

    new = relations.new_row(update)
    old = relations.old_row(update)

    assert new.unchanged_toast == {"body"} and "body" not in new.values
    assert old is not None and old.values["body"] == BIG_BODY and old.values["note"] == "first"
    deleted = relations.old_row(delete)
    assert deleted is not None and deleted.values["body"] == BIG_BODY


def test_truncate_names_its_relations_and_options() -> None:
    decoded = messages("truncate")
    relations = cache_for(decoded)
    plain, cascading = of_type(decoded, Truncate)

    assert [relations.relation(oid).name for oid in plain.relation_oids] == ["no_pk"]
    assert plain.options == TruncateOptions.NONE
    assert [relations.relation(oid).name for oid in cascading.relation_oids] == [
        "with_serial",
        "identity_default",
    ]
    assert cascading.options == TruncateOptions.CASCADE | TruncateOptions.RESTART_IDENTITY


def test_logical_messages_decode_transactional_and_not() -> None:
    decoded = messages("logical_messages")
    in_transaction, outside = of_type(decoded, Message)

    assert (in_transaction.transactional, in_transaction.prefix, in_transaction.content) == (
        True,
        "capture",
        b"transactional text",
    )
    assert (outside.transactional, outside.prefix, outside.content) == (
        False,
        "capture",
        b"\x00\xff\x01",
    )
    # A non-transactional message comes alone, outside any Begin/Commit.
    assert type(decoded[-1]) is Message and type(decoded[-2]) is Commit
    assert in_transaction.lsn < outside.lsn


def test_origin_message_names_the_origin_and_its_commit_lsn() -> None:
    decoded = messages("origin")
    (origin,) = of_type(decoded, Origin)
    (begin,) = of_type(decoded, Begin)

    assert origin == Origin(commit_lsn=parse_lsn("1/ABCDEF"), name="capture_fixture_origin")
    assert type(decoded[1]) is Origin
    # pg_replication_origin_xact_setup's timestamp becomes the commit time.
    assert begin.commit_time == datetime(2026, 8, 21, 12, 0, tzinfo=UTC)


# --- malformed input ---------------------------------------------------------


@pytest.mark.parametrize("data", [pytest.param(d, id=i) for i, d in ALL_MESSAGES])
def test_every_truncation_of_a_real_message_raises_decode_error(data: bytes) -> None:
    assert not isinstance(decode_message(data), Unsupported)
    for end in range(len(data)):
        with pytest.raises(DecodeError):
            decode_message(data[:end])
    with pytest.raises(DecodeError):
        decode_message(data + b"\x00")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"I\x00\x00\x00\x01X\x00\x00", "expects a new tuple 'N'"),
        (b"I\x00\x00\x00\x01N\x00\x01x", "unknown tuple column kind"),
        (b"I\x00\x00\x00\x01N\x00\x01t\xff\xff\xff\xff", "negative length"),
        (b"U\x00\x00\x00\x01Z", "expects 'K', 'O' or a new tuple"),
        (b"D\x00\x00\x00\x01N\x00\x00", "expects an old tuple"),
        (b"R\x00\x00\x00\x01\x00t\x00x\x00\x00", "unknown replica identity"),
        (b"R\x00\x00\x00\x01\x00t", "unterminated string"),
        (b"T\x00\x00\x00\x02\x00\x00\x00\x00\x01", "Truncate of 2 relations"),
        (b"B" + b"\x00" * 8 + b"\x7f" + b"\xff" * 7 + b"\x00" * 4, "out of range"),
    ],
)
def test_corrupt_messages_raise_decode_error(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_message(data)


# S, E, c, A: protocol 2 streamed transactions, sent only with ``streaming 'on'``, which the replicator never asks for.
@pytest.mark.parametrize("tag", [b"b", b"P", b"K", b"r", b"p", b"X", b"\x00", b"S", b"E", b"c", b"A"])
def test_unknown_tags_decode_to_unsupported(tag: bytes) -> None:
    assert decode_message(tag + b"rest") == Unsupported(tag[0], b"rest")


def test_decode_error_is_a_replication_error() -> None:
    assert issubclass(DecodeError, ReplicationError)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    try:
        decode_message(data)
    except DecodeError:
        pass


@given(st.sampled_from(list(b"BCORYIUDTM")), st.binary(max_size=80))
def test_arbitrary_bodies_of_known_tags_decode_or_raise_decode_error(tag: int, body: bytes) -> None:
    try:
        decode_message(bytes([tag]) + body)
    except DecodeError:
        pass


@given(st.sampled_from([d for _, d in ALL_MESSAGES]), st.data())
def test_corrupted_real_messages_decode_or_raise_decode_error(
    original: bytes, data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(original) - 1))
    byte = data.draw(st.integers(0, 255))
    corrupted = original[:index] + bytes([byte]) + original[index + 1 :]
    try:
        decode_message(corrupted)
    except DecodeError:
        pass
