"""How an ``Entry`` is stored in Redis: its JSON, its owner reference, its payload signature.

Pure. What is read back is untrusted (any client of the Redis server may have
written it): ``decode_entry`` and ``parse_owner_ref`` return None for anything
malformed instead of raising.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from presence.state import Entry

logger = logging.getLogger(__name__)


def signature(payload: Mapping[str, Any]) -> str:
    """A digest of ``payload`` that is equal for equal payloads whatever their key order."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def owner_ref(channel: str, key: str, phx_ref: str) -> str:
    """The member of a process's owned set that names one of its entries."""
    return json.dumps([channel, key, phx_ref], separators=(",", ":"), ensure_ascii=False)


def parse_owner_ref(raw: str) -> tuple[str, str, str] | None:
    """``(channel, key, phx_ref)`` of an ``owner_ref``; None if ``raw`` is not one."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if isinstance(value, list) and len(value) == 3 and all(isinstance(part, str) for part in value):
        return value[0], value[1], value[2]
    return None


def encode_entry(entry: Entry, payload_signature: str) -> str:
    """The JSON stored for ``entry``; ``payload_signature`` lets a track find an unchanged payload."""
    return json.dumps(
        {
            "channel": entry.channel,
            "key": entry.key,
            "phx_ref": entry.phx_ref,
            "meta": entry.meta,
            "socket_id": entry.socket_id,
            "process_id": entry.process_id,
            "joined_at": entry.joined_at,
            "sig": payload_signature,
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )


def decode_entry(raw: str) -> Entry | None:
    """The entry stored as ``raw``; None (logged) if it is malformed."""
    try:
        value = json.loads(raw)
        entry = Entry(
            channel=value["channel"],
            key=value["key"],
            phx_ref=value["phx_ref"],
            meta=value["meta"],
            socket_id=value["socket_id"],
            process_id=value["process_id"],
            joined_at=float(value["joined_at"]),
        )
    except (ValueError, TypeError, KeyError):
        logger.warning("presence: skipping a malformed entry %.200r", raw)
        return None
    return entry
