"""Type aliases shared across the app, the layer messages that cross processes, and their helpers.

Layer messages are serialized by channels_redis (msgpack), so they hold only
dicts, lists, str, int and bytes.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

JSON = Any

KIND_JSON = "json"  # payload: JSON text of the whole broadcast payload object
KIND_BINARY = "binary"  # a user broadcast: event, encoding and payload bytes
KIND_PRESENCE = "presence"  # payload: JSON text of a presence_diff

ERROR_UNAUTHORIZED = "Error 401: Unauthorized"  # the role cannot read the primary key (PROTOCOL.md 4.4)

# A server process's hub checks its group memberships every MEMBERSHIP_CHECK_S (re-adding those
# a Redis restart lost) and retries a failed receive after RECEIVE_RETRY_S (``realtime.hub``);
# the replicator waits that long for the hubs after the layer comes back (``replication.listener``).
MEMBERSHIP_CHECK_S = 2.0
RECEIVE_RETRY_S = 1.0


class BroadcastMessage(TypedDict):
    """``realtime.broadcast``: one broadcast for every channel on a topic."""

    type: Literal["realtime.broadcast"]
    group: str
    topic: str
    origin: str  # the sending socket's id, "" when it came over REST
    kind: str
    event: str
    encoding: int
    payload: bytes
    # Broadcasts from the database (PROTOCOL.md 5.4): kind 4 meta (JSON text,
    # ``{"id":ID}``) and the row id, which a channel that replayed it skips.
    meta: NotRequired[bytes]
    id: NotRequired[str]


class BatchMessage(TypedDict):
    """``realtime.batch``: broadcasts to one group that queued up behind each other, in order."""

    type: Literal["realtime.batch"]
    group: str
    messages: list[BroadcastMessage]


class ChangeRun(TypedDict):
    """``realtime.changes``: consecutive changes of one table, in commit order.

    Each ``data`` is the JSON text of the change's ``data`` object (PROTOCOL.md
    4.5), encoded once by the replicator.

    ``primary_key`` names the table's primary key columns (absent without
    one): a channel whose role cannot read them all gets ``Error 401``
    events instead of the table's INSERTs and UPDATEs (PROTOCOL.md 4.4 step 3).

    On a table with row level security (``rls``), INSERT and UPDATE changes
    carry ``key`` (JSON object of the row's primary key values, each as the
    text PostgreSQL printed it, so ``jsonb_to_record`` reads it back with the
    type's own input function) and ``visible`` maps each checked claim set to
    one byte per change: 1 if that claim set may see it. A claim set missing
    from ``visible`` was not checked by the replicator. ``check_errors`` maps
    a claim set whose check failed (a policy raised or timed out) to the
    database's message: its channels get that message as a ``system`` error,
    once per run, and nothing of the run.
    """

    type: Literal["realtime.changes"]
    group: str
    schema: str
    table: str
    changes: list[dict[str, Any]]  # {"type": "INSERT"|"UPDATE"|"DELETE", "data": bytes[, "key": bytes]}
    primary_key: NotRequired[list[str]]
    rls: NotRequired[bool]
    visible: NotRequired[dict[str, bytes]]
    check_errors: NotRequired[dict[str, str]]


def checked_positions(run: ChangeRun) -> list[int]:
    """Positions of the run's changes that a visibility check decides (those carrying a ``key``)."""
    return [i for i, change in enumerate(run["changes"]) if "key" in change]


def verdict_per_change(run: ChangeRun, positions: list[int], verdict: bytes) -> bytes:
    """A ``visible`` entry: ``verdict`` (one byte per checked position) spread over every change, others 1."""
    per_change = bytearray(b"\x01" * len(run["changes"]))
    for position, seen in zip(positions, verdict):
        per_change[position] = seen
    return bytes(per_change)


def error_data(schema: str, table: str, change_type: str, error: str) -> dict[str, Any]:
    """The ``data`` of an error event (PROTOCOL.md 4.5): no columns, no values, ``errors`` = [error].

    ``Error 400: Bad Request, no primary key`` and ``Error 401: Unauthorized``
    have this exact shape; UPDATE (and DELETE) add an empty ``old_record``.
    """
    data: dict[str, Any] = {
        "schema": schema, "table": table, "type": change_type, "columns": [],
        "commit_timestamp": None, "record": {}, "errors": [error],
    }
    if change_type != "INSERT":
        data["old_record"] = {}
    return data
