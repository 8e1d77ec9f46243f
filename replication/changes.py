"""Decoded pgoutput transactions -> change events -> layer messages. Pure.

Each change becomes the reference's ``data`` object (PROTOCOL.md 4.5):
schema, table, commit_timestamp (UTC, milliseconds), type, columns, record /
old_record and errors, encoded to JSON once here. Consecutive changes of one
table are packed into one ``realtime.changes`` message for that table's
group, so a bulk load costs one layer message per run, not per row, and each
table's changes stay in commit order.

On a table with row level security the run is marked ``rls``: each INSERT
and UPDATE carries its primary key (``key``, the values as pgoutput's text)
for the per-subscriber visibility check, and a DELETE's ``old_record`` is
cut to the primary key (PROTOCOL.md 4.4, 4.5).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from core.topics import table_group
from core.types import ChangeRun, error_data
from pgtypes import values
from replication import pgoutput

MAX_RUN_CHANGES = 500
# Encoded change bytes in one run (one layer message): one larger change still goes, alone.
MAX_RUN_BYTES = 4 * 1024 * 1024
LARGE_VALUE_BYTES = 64
ERROR_NO_PRIMARY_KEY = "Error 400: Bad Request, no primary key"
ERROR_TOO_LARGE = "Error 413: Payload Too Large"

ChangeMessage = pgoutput.Insert | pgoutput.Update | pgoutput.Delete


def commit_timestamp(moment: datetime) -> str:
    """``2026-08-21T12:00:00.123Z``: UTC with exactly three decimals (PROTOCOL.md 4.5)."""
    utc = moment.astimezone(timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


@dataclass(slots=True)
class Batch:
    """What one read of the slot produced."""

    runs: list[ChangeRun] = field(default_factory=list)
    changes: int = 0
    transactions: int = 0
    confirm_lsn: int | None = None  # end of the last complete transaction


class ChangeDecoder:
    """Turns the slot's pgoutput messages into ``realtime.changes`` runs."""

    def __init__(self, type_names: Mapping[int, str] | None = None, *, max_payload_bytes: int = 1_048_576) -> None:
        self.cache = pgoutput.RelationCache(type_names)
        self.primary_keys: dict[int, tuple[str, ...]] = {}
        self.committed_at = ""  # the commit time of the transaction being built
        self.max_payload_bytes = max_payload_bytes

    def parse(self, rows: Iterable[bytes]) -> list[pgoutput.PgoutputMessage]:
        """Decode the slot rows; Relation and Type messages update the cache as they pass."""
        messages = [pgoutput.decode_message(data) for data in rows]
        for message in messages:
            if isinstance(message, (pgoutput.Relation, pgoutput.Type)):
                self.cache.add(message)
        return messages

    def relations_announced(self, messages: Iterable[pgoutput.PgoutputMessage]) -> set[int]:
        """Relations whose primary key columns the caller must look up now (``add_primary_keys``).

        pgoutput describes a relation (a Relation message) before its first
        change in each decoding session, so every read of the slot, and again
        after DDL changes it. Each one is looked up again: a key added, dropped
        or made composite since the last read is used from the next change on.
        """
        return {m.oid for m in messages if isinstance(m, pgoutput.Relation)}

    def add_primary_keys(self, keys: Mapping[int, tuple[str, ...]], looked_up: Iterable[int] = ()) -> None:
        """Take the key columns found; relations of ``looked_up`` missing from ``keys`` have none now."""
        for oid in looked_up:
            if oid not in keys:
                self.primary_keys.pop(oid, None)
        self.primary_keys.update(keys)

    def build(self, messages: Iterable[pgoutput.PgoutputMessage], rls: Collection[int] = ()) -> Batch:
        """Changes of every complete transaction in ``messages``, as runs per table.

        ``rls``: oids of the relations with row level security enabled.
        """
        batch = Batch()
        run: ChangeRun | None = None
        run_oid = -1
        run_bytes = 0
        for message in messages:
            if isinstance(message, pgoutput.Begin):
                # Kept across calls: a large transaction is built page by page.
                self.committed_at = commit_timestamp(message.commit_time)
            elif isinstance(message, pgoutput.ROW_CHANGES):
                relation = self.cache.relation(message.relation_oid)
                if (
                    run is None or run_oid != relation.oid or len(run["changes"]) >= MAX_RUN_CHANGES
                    or run_bytes >= MAX_RUN_BYTES
                ):
                    run = ChangeRun(
                        type="realtime.changes",
                        group=table_group(relation.schema, relation.name),
                        schema=relation.schema,
                        table=relation.name,
                        changes=[],
                    )
                    run_oid = relation.oid
                    run_bytes = 0
                    primary_key = self.primary_keys.get(relation.oid)
                    if primary_key:
                        run["primary_key"] = list(primary_key)
                    if relation.oid in rls:
                        run["rls"] = True
                    batch.runs.append(run)
                change_type, data, key = self.change(relation, message, self.committed_at, relation.oid in rls)
                run_bytes += len(data)
                if key is None:
                    run["changes"].append({"type": change_type, "data": data})
                else:
                    run["changes"].append({"type": change_type, "data": data, "key": key})
                batch.changes += 1
            elif isinstance(message, pgoutput.Commit):
                batch.transactions += 1
                batch.confirm_lsn = message.end_lsn
            # Truncate, Origin, Message and Type carry nothing to deliver (TRUNCATE never is).
        return batch

    def change(
        self, relation: pgoutput.Relation, message: ChangeMessage, committed_at: str, rls: bool = False
    ) -> tuple[str, bytes, bytes | None]:
        """One change's type, the JSON of its ``data`` object, and (``rls`` only) its key.

        The key is the JSON of the new row's primary key values, for INSERT and
        UPDATE on a table with row level security: the rows a visibility check
        looks up. Each value is the text pgoutput carried, not its JSON form:
        the lookup's ``jsonb_to_record`` reads text back through the type's
        input function, which the JSON form does not survive for every type
        (bytea's JSON is its hex digits without ``\\x``).
        """
        change_type = {pgoutput.Insert: "INSERT", pgoutput.Update: "UPDATE", pgoutput.Delete: "DELETE"}[type(message)]
        keys = self.primary_keys.get(relation.oid, ())
        if not keys:
            data: dict[str, Any] = error_data(relation.schema, relation.name, change_type, ERROR_NO_PRIMARY_KEY)
            return change_type, values.encode_json(data).encode("utf-8"), None
        columns = self.cache.columns(relation.oid)
        typed = [(c.name, c.value_type) for c in columns]
        data = {
            "schema": relation.schema,
            "table": relation.name,
            "commit_timestamp": committed_at,
            "type": change_type,
            "columns": [c.to_json() for c in columns],
        }
        old_raw = None if isinstance(message, pgoutput.Insert) else self.cache.old_row(message)
        old_record = values.convert_row(typed, old_raw.values) if old_raw is not None else None
        new_raw = None
        if isinstance(message, (pgoutput.Insert, pgoutput.Update)):
            new_raw = self.cache.new_row(message)
            record = values.convert_row(typed, new_raw.values)
            if new_raw.unchanged_toast and old_record:
                # PROTOCOL.md 4.5: unchanged TOAST values come from the old row when it has them.
                for name in new_raw.unchanged_toast:
                    if name in old_record:
                        record[name] = old_record[name]
                record = {name: record[name] for name, _ in typed if name in record}
            data["record"] = record
        if isinstance(message, (pgoutput.Update, pgoutput.Delete)):
            if old_record is None:
                # No old tuple: under DEFAULT identity the key did not change.
                if relation.replica_identity is pgoutput.ReplicaIdentity.NOTHING:
                    old_record = {}
                else:
                    record = data.get("record", {})
                    old_record = {name: record[name] for name in keys if name in record}
            elif rls and change_type == "DELETE":
                # PROTOCOL.md 4.4: DELETE is never checked against RLS, so it reveals only the key.
                old_record = {name: old_record[name] for name in keys if name in old_record}
            data["old_record"] = old_record
        data["errors"] = None
        key = None
        if rls and new_raw is not None:
            key = self._key(keys, new_raw, old_raw, data["record"])
        encoded = values.encode_json(data).encode("utf-8")
        if len(encoded) > self.max_payload_bytes:
            for name in ("record", "old_record"):
                if name in data:
                    data[name] = {k: v for k, v in data[name].items() if len(values.encode_json(v)) <= LARGE_VALUE_BYTES}
            data["errors"] = [ERROR_TOO_LARGE]
            encoded = values.encode_json(data).encode("utf-8")
        return change_type, encoded, key

    @staticmethod
    def _key(
        keys: tuple[str, ...], new: pgoutput.RawRow, old: pgoutput.RawRow | None, record: dict[str, Any]
    ) -> bytes:
        """JSON of the key values as pgoutput's text (an unchanged TOASTed one from the old row)."""
        found: dict[str, Any] = {}
        for name in keys:
            text = new.values.get(name)
            if text is None and old is not None:
                text = old.values.get(name)
            if isinstance(text, str):
                found[name] = text
            else:  # binary format or missing: the JSON value is the best there is
                found[name] = record.get(name)
        return values.encode_json(found).encode("utf-8")
