"""Rows inserted into ``realtime.messages`` -> ``realtime.broadcast`` layer messages. Pure.

``realtime.send``, ``send_binary`` and ``broadcast_changes`` insert a row
(PROTOCOL.md 5.4); the publication ``supabase_realtime_messages_publication``
streams the inserts (through the partition root) on a slot of their own, and
each row with extension ``broadcast`` becomes one broadcast to the topic's
group on the side its ``private`` flag names, exactly as if a client had sent
it, so the hub's fan-out (frames encoded once per process) delivers it:

- ``kind`` is ``binary`` (a user broadcast), ``encoding`` 1 with the jsonb text
  as the payload (``send``) or 0 with the bytea (``send_binary``);
- ``meta`` is ``{"id":"<row id>"}``: vsn 2 receivers get kind 4 with that meta,
  vsn 1 receivers ``{"type":"broadcast","event":E,"payload":P,"meta":{...}}``
  and nothing for binary rows (PROTOCOL.md 5.2);
- ``id`` is the row id again, for the channels that replayed it at join
  (PROTOCOL.md 5.5) to skip it.

The payload is PostgreSQL's own jsonb output, so it is valid JSON and the hub
splices it without parsing. A row over the payload cap
(``REALTIME_MAX_PAYLOAD_SIZE_KB``, as for client broadcasts) is dropped and
counted; so are rows of other extensions (presence policy probes never
commit, but a user may insert such rows) and rows that are not inserts.

Consecutive messages to one group within a read are packed into one
``realtime.batch`` (at most ``MAX_BATCH`` messages or ``MAX_BATCH_BYTES``), so
a burst of sends costs one layer message per group, not per row; each group's
messages keep commit order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from core.topics import TOPIC_PREFIX, broadcast_group
from core.types import KIND_BINARY, BatchMessage, BroadcastMessage
from replication import pgoutput

PUBLICATION: Final = "supabase_realtime_messages_publication"
SCHEMA: Final = "realtime"
TABLE: Final = "messages"
EXTENSION: Final = "broadcast"
MAX_BATCH: Final = 200
MAX_BATCH_BYTES: Final = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class MessageRow:
    """The columns of one inserted ``realtime.messages`` row that delivery needs."""

    id: str
    topic: str
    event: str
    private: bool
    extension: str
    payload: bytes  # jsonb text, or the bytea's bytes
    binary: bool


def parse_row(values: Mapping[str, str | bytes | None]) -> MessageRow | None:
    """A decoded tuple (pgoutput text values) as a ``MessageRow``; None if it lacks an id or topic.

    bytea arrives in hex output (``\\x0a0b``: the slot's session sets ``bytea_output=hex``).
    """
    row_id, topic = values.get("id"), values.get("topic")
    if not isinstance(row_id, str) or not isinstance(topic, str):
        return None
    binary_text = values.get("binary_payload")
    payload_text = values.get("payload")
    if binary_text is not None:
        if isinstance(binary_text, bytes):
            payload = binary_text
        elif binary_text.startswith("\\x"):
            payload = bytes.fromhex(binary_text[2:])
        else:
            return None  # escape output: never with the slot's settings
        binary = True
    else:
        text = payload_text if payload_text is not None else "null"  # realtime.send never stores NULL
        payload = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        binary = False
    event = values.get("event")
    extension = values.get("extension")
    if values.get("private") not in ("t", "f"):
        return None  # a NULL flag names neither side: never fall back to the public one
    return MessageRow(
        id=row_id,
        topic=topic,
        event=event if isinstance(event, str) else "",
        private=values.get("private") == "t",
        extension=extension if isinstance(extension, str) else "",
        payload=payload,
        binary=binary,
    )


def broadcast_message(row: MessageRow) -> BroadcastMessage:
    """The ``realtime.broadcast`` layer message for one row (PROTOCOL.md 5.2, last row)."""
    message = BroadcastMessage(
        type="realtime.broadcast",
        group=broadcast_group(row.topic, row.private),
        topic=TOPIC_PREFIX + row.topic,
        origin="",  # no sender socket: every channel on the topic gets it
        kind=KIND_BINARY,
        event=row.event,
        encoding=0 if row.binary else 1,
        payload=row.payload,
    )
    message["meta"] = meta_for(row.id)
    message["id"] = row.id
    return message


def meta_for(row_id: str, replayed: bool = False) -> bytes:
    """``{"id":ID}`` (live) or ``{"replayed":true,"id":ID}`` (replay): well under kind 4's 255 bytes."""
    prefix = '{"replayed":true,"id":' if replayed else '{"id":'
    return (prefix + json.dumps(row_id) + "}").encode("utf-8")


@dataclass(slots=True)
class Batch:
    """What one read of the slot produced."""

    messages: list[BatchMessage | BroadcastMessage] = field(default_factory=list)
    rows: int = 0  # broadcast rows published
    skipped: int = 0  # rows of other extensions or tables
    oversized: int = 0  # rows over the payload cap, dropped
    transactions: int = 0
    confirm_lsn: int | None = None  # end of the last complete transaction


class BroadcastDecoder:
    """Turns the messages slot's pgoutput messages into broadcasts per group."""

    def __init__(self, max_payload_bytes: int) -> None:
        self.cache = pgoutput.RelationCache()
        self.max_payload_bytes = max_payload_bytes

    def parse(self, rows: Iterable[bytes]) -> list[pgoutput.PgoutputMessage]:
        """Decode the slot rows; Relation and Type messages update the cache as they pass."""
        messages = [pgoutput.decode_message(data) for data in rows]
        for message in messages:
            if isinstance(message, (pgoutput.Relation, pgoutput.Type)):
                self.cache.add(message)
        return messages

    def build(self, messages: Iterable[pgoutput.PgoutputMessage]) -> Batch:
        """Broadcasts of every complete transaction in ``messages``, batched per group in commit order."""
        batch = Batch()
        per_group: dict[str, list[BroadcastMessage]] = {}
        for message in messages:
            if isinstance(message, pgoutput.Insert):
                relation = self.cache.relation(message.relation_oid)
                if (relation.schema, relation.name) != (SCHEMA, TABLE):
                    batch.skipped += 1
                    continue
                row = parse_row(self.cache.new_row(message).values)
                if row is None or row.extension != EXTENSION:
                    batch.skipped += 1
                    continue
                if len(row.payload) > self.max_payload_bytes:
                    batch.oversized += 1
                    continue
                broadcast = broadcast_message(row)
                per_group.setdefault(broadcast["group"], []).append(broadcast)
                batch.rows += 1
            elif isinstance(message, pgoutput.Commit):
                batch.transactions += 1
                batch.confirm_lsn = message.end_lsn
        for group, items in per_group.items():
            batch.messages.extend(_packed(group, items))
        return batch


def _packed(group: str, items: list[BroadcastMessage]) -> list[BatchMessage | BroadcastMessage]:
    """One message alone, more as ``realtime.batch`` messages within the caps, in order."""
    if len(items) == 1:
        return [items[0]]
    packed: list[BatchMessage | BroadcastMessage] = []
    current: list[BroadcastMessage] = []
    size = 0
    for item in items:
        if current and (len(current) >= MAX_BATCH or size + len(item["payload"]) > MAX_BATCH_BYTES):
            packed.append(BatchMessage(type="realtime.batch", group=group, messages=current))
            current, size = [], 0
        current.append(item)
        size += len(item["payload"])
    packed.append(BatchMessage(type="realtime.batch", group=group, messages=current))
    return packed
