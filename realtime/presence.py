"""Presence for the sockets of this process: the shared store and diff fan-out.

The state lives in Redis (``presence.store``) so every server process sees
one presence per topic; each diff travels through the topic's presence group
(``topics.presence_group``) as a ``presence_diff`` and reaches every channel on
the topic that may read presence, the tracker included (PROTOCOL.md 6.2, 7). The store belongs to the
process's runtime (``realtime.runtime``), whose close sends its members' leaves; its maintenance
loop keeps this process's members alive, emits the leaves of members
whose process died, and the joins of this process's members that were swept
while its loop stalled and are tracked again.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from presence.store import RedisPresenceStore
from realtime.publisher import get_publisher
from core.topics import TOPIC_PREFIX, parse_presence_channel, presence_group
from core.types import KIND_PRESENCE, BroadcastMessage

logger = logging.getLogger(__name__)

# Diffs of one topic published within this many seconds travel as one batch.
DIFF_LINGER_S = 0.005

PROCESS_ID = f"{uuid.uuid4().hex}"

def get_store() -> RedisPresenceStore:
    """The presence store of the running event loop's runtime, with its maintenance loop started."""
    from realtime.runtime import get_runtime

    return get_runtime().presence


async def publish_diff(channel: str, diff: dict[str, Any]) -> None:
    """Send a presence diff to every channel on the topic, on every process."""
    name, private = parse_presence_channel(channel)
    group = presence_group(name, private)
    message = BroadcastMessage(
        type="realtime.broadcast",
        group=group,
        topic=TOPIC_PREFIX + name,
        origin="",
        kind=KIND_PRESENCE,
        event="presence_diff",
        encoding=1,
        payload=json.dumps(diff, separators=(",", ":"), ensure_ascii=False).encode("utf-8"),
    )
    await get_publisher().publish(message, linger=DIFF_LINGER_S)
