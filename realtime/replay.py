"""The replay query of a join with ``config.broadcast.replay`` (PROTOCOL.md 5.5).

As the reference (``Realtime.Messages.replay``): the newest ``limit`` rows of
the sub-topic with ``private``, extension ``broadcast`` and ``inserted_at >=
since``, returned oldest first. It runs as the server's (admin) connection
after the channel's broadcast read was granted by its policies, as the
reference does, under ``REALTIME_CHECK_TIMEOUT_MS`` as its statement timeout.
``since`` is milliseconds since the epoch; ``inserted_at`` is UTC
(``timestamp without time zone``), as on Supabase. The session clamps
``limit`` to 1..25 before it gets here.
"""

from __future__ import annotations

import json
from typing import Any

from realtime.authorization import Database
from shared.database import check_timeout_ms
from realtime.protocol.session import ReplayedRow

_QUERY = (
    "SELECT id::text, event, payload::text, binary_payload FROM realtime.messages"
    " WHERE topic = %s AND private IS TRUE AND extension = 'broadcast'"
    " AND inserted_at >= (to_timestamp(%s::float8 / 1000) AT TIME ZONE 'UTC')"
    # Rows over the broadcast payload cap are not replayed, as they are not delivered live.
    " AND coalesce(octet_length(payload::text), octet_length(binary_payload), 0) <= %s"
    " ORDER BY inserted_at DESC LIMIT %s"
)

__all__ = ["ReplayedRow", "replay_rows"]


def _max_payload_bytes() -> int:
    from django.conf import settings

    return int(settings.REALTIME_MAX_PAYLOAD_SIZE_KB) * 1000 + 500


async def replay_rows(db: Database, sub_topic: str, since_ms: int, limit: int) -> list[ReplayedRow]:
    """The rows to replay, oldest first.

    Raises:
        psycopg.Error: the query failed (the join then fails with ``UnableToReplayMessages``).
    """
    async with db.connection() as conn:
        async with conn.transaction():
            await conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(check_timeout_ms()),))
            cursor = await conn.execute(_QUERY, (sub_topic, since_ms, _max_payload_bytes(), limit))
            rows: list[tuple[Any, ...]] = await cursor.fetchall()
    replayed = []
    for row_id, event, payload_text, binary in reversed(rows):
        if binary is not None:
            replayed.append(ReplayedRow(str(row_id), event or "", None, bytes(binary)))
        else:
            payload = json.loads(payload_text) if payload_text is not None else None
            replayed.append(ReplayedRow(str(row_id), event or "", payload, None))
    return replayed
