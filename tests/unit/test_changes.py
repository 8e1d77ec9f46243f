"""Captured pgoutput transactions -> the change events subscribers receive (PROTOCOL.md 4.5)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from core.topics import table_group
from replication import pgoutput
from replication.changes import ChangeDecoder, commit_timestamp

pytestmark = pytest.mark.unit

FIXTURE = Path(__file__).parents[1] / "fixtures" / "pgoutput" / "captured.json"
CAPTURED = json.loads(FIXTURE.read_text())
TYPE_NAMES = {int(oid): name for oid, name in CAPTURED["pg_type"].items()}


def step(name: str) -> list[bytes]:
    [entry] = [s for s in CAPTURED["steps"] if s["name"] == name]
    return [bytes.fromhex(m["hex"]) for m in entry["messages"]]


def decode(
    name: str, keys: dict[str, tuple[str, ...]] | None = None, rls: bool = False, **options: Any
) -> tuple[list[dict[str, Any]], Any]:
    decoder = ChangeDecoder(TYPE_NAMES, **options)
    messages = decoder.parse(step(name))
    by_name = {m.name: m.oid for m in messages if isinstance(m, pgoutput.Relation)}
    decoder.add_primary_keys({oid: (keys or {}).get(table, ("id",)) for table, oid in by_name.items()})
    batch = decoder.build(messages, set(by_name.values()) if rls else ())
    changes = [json.loads(c["data"]) | {"_type": c["type"]} for run in batch.runs for c in run["changes"]]
    return changes, batch


def test_commit_timestamp_is_utc_with_milliseconds() -> None:
    moment = datetime(2026, 8, 21, 14, 0, 0, 123456, tzinfo=timezone.utc)
    assert commit_timestamp(moment) == "2026-08-21T14:00:00.123Z"


def test_default_identity_update_and_delete_carry_the_key_only() -> None:  # C44, C45
    changes, batch = decode("identity_default")
    types = [c["type"] for c in changes]
    assert types == ["INSERT", "INSERT", "UPDATE", "UPDATE", "DELETE"]
    insert, _, update, key_change, delete = changes
    assert insert["record"] == {"id": 1, "title": "a", "done": False} and "old_record" not in insert
    assert insert["columns"] == [{"name": "id", "type": "int4"}, {"name": "title", "type": "text"}, {"name": "done", "type": "bool"}]
    assert update["record"] == {"id": 1, "title": "a2", "done": True} and update["old_record"] == {"id": 1}
    assert key_change["old_record"] == {"id": 2} and key_change["record"]["id"] == 20
    assert "record" not in delete and delete["old_record"] == {"id": 1}
    assert all(c["errors"] is None for c in changes)
    assert batch.confirm_lsn is not None and batch.transactions >= 1


def test_rls_tables_carry_row_keys_and_cut_delete_to_the_key() -> None:  # C45
    changes, batch = decode("identity_full", rls=True)
    [run] = batch.runs
    assert run["rls"] is True
    for raw, change in zip(run["changes"], changes):
        if change["type"] == "DELETE":
            # PROTOCOL.md 4.4: never RLS-checked, so FULL identity still reveals only the key.
            assert "key" not in raw and change["old_record"] == {"id": change["old_record"]["id"]}
        else:
            assert json.loads(raw["key"]) == {"id": str(change["record"]["id"])}  # pgoutput's text
    update = next(c for c in changes if c["type"] == "UPDATE")
    assert update["old_record"] == {"id": 1, "title": "a", "score": 1.5}  # UPDATE keeps the old values
    plain, plain_batch = decode("identity_full")
    assert "rls" not in plain_batch.runs[0] and all("key" not in c for c in plain_batch.runs[0]["changes"])
    assert next(c for c in plain if c["type"] == "DELETE")["old_record"] != {"id": 1}


def test_full_identity_carries_every_previous_value() -> None:  # C44
    changes, _ = decode("identity_full")
    update = next(c for c in changes if c["type"] == "UPDATE")
    assert update["old_record"] == {"id": 1, "title": "a", "score": 1.5}
    assert update["record"] == {"id": 1, "title": "b", "score": None}
    delete = next(c for c in changes if c["type"] == "DELETE")
    assert delete["old_record"] == {"id": 1, "title": "b", "score": None}


def test_unchanged_toast_is_left_out_under_default_identity() -> None:
    changes, _ = decode("toasted")
    update = next(c for c in changes if c["type"] == "UPDATE")
    assert "body" not in update["record"] and update["record"]["note"] == "second"


def test_unchanged_toast_comes_from_the_old_row_under_full_identity() -> None:
    changes, _ = decode("toasted_full")
    update = next(c for c in changes if c["type"] == "UPDATE")
    assert update["record"]["body"] == "0123456789abcdef" * 256


def test_table_without_primary_key_gets_the_400_shape() -> None:  # C62
    changes, _ = decode("no_pk", keys={"no_pk": ()})
    assert changes[0]["errors"] == ["Error 400: Bad Request, no primary key"]
    assert changes[0]["record"] == {} and changes[0]["columns"] == [] and changes[0]["commit_timestamp"] is None


def test_truncate_and_logical_messages_produce_nothing() -> None:  # C61
    changes, _ = decode("truncate")
    assert [c["type"] for c in changes] == ["INSERT"]  # the INSERT before two TRUNCATEs
    changes, _ = decode("logical_messages")
    assert [c["type"] for c in changes] == ["INSERT"]  # the INSERT beside two messages


def test_oversized_changes_keep_small_values_and_say_413() -> None:  # C63
    changes, _ = decode("toasted", max_payload_bytes=1000)
    insert = changes[0]
    assert insert["errors"] == ["Error 413: Payload Too Large"]
    assert "body" not in insert["record"] and insert["record"]["id"] == 1
    assert [c["name"] for c in insert["columns"]] == ["id", "note", "body"]


def test_changes_of_one_table_travel_as_one_run_to_its_group() -> None:
    _, batch = decode("identity_default")
    assert len(batch.runs) == 1
    run = batch.runs[0]
    assert run["type"] == "realtime.changes" and run["group"] == table_group(run["schema"], run["table"])
    assert batch.changes == 5
