"""Readiness: whether PostgreSQL, Redis and the replicator are up, as ``GET /api/health`` reports it.

The replicator (``manage.py replicate``) has no HTTP port of its own to ask, so
while it holds its slot it writes its state to Redis every second
(``replication.status``) under ``replicator_key``, with a TTL of a few
seconds: a replicator that stopped, or lost Redis or its slot, disappears
from there within the TTL. A standby writes nothing; the active one is what
makes changes flow.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

STATUS_EVERY_S = 1.0  # how often the active replicator writes its state
STATUS_TTL_S = 5  # how long its state stays without being written again
CHECK_TIMEOUT_S = 2.0  # each dependency answers within this or counts as down
DOWN_LOG_INTERVAL_S = 10.0

logger = logging.getLogger(__name__)
_logged_down: dict[str, float] = {}  # part -> monotonic time its failure was last logged


def replicator_key(prefix: str, slot: str) -> str:
    """The Redis key of the active replicator's state for ``slot``."""
    return f"{prefix}:replicator:{slot}"


@dataclass(frozen=True, slots=True)
class ReplicatorStatus:
    """What the active replicator says about itself."""

    slot: str
    active: bool
    lag_bytes: int | None  # WAL after the slot's confirmed position; None: unknown (the query failed)
    retained_wal_bytes: int | None  # WAL the slot keeps (from its restart_lsn)
    lag_seconds: float  # commit to publication, of the last transaction published
    last_batch_at: float | None  # unix time of the last page published; None: none since it started
    updated_at: float  # unix time it wrote this
    pid: int
    host: str

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def decode_status(raw: bytes | str | None) -> ReplicatorStatus | None:
    """The status written by ``ReplicatorStatus.encode``; None for a missing or unreadable value."""
    if raw is None:
        return None
    try:
        fields: dict[str, Any] = json.loads(raw)
        return ReplicatorStatus(**fields)
    except (ValueError, TypeError):
        return None


@dataclass(frozen=True, slots=True)
class Readiness:
    """The answer of ``GET /api/health``: each dependency's state, and whether all are up."""

    postgres: dict[str, Any]
    redis: dict[str, Any]
    replicator: dict[str, Any]

    @property
    def ok(self) -> bool:
        return all(part["status"] == "up" for part in (self.postgres, self.redis, self.replicator))

    def body(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "unavailable",
            "postgres": self.postgres,
            "redis": self.redis,
            "replicator": self.replicator,
        }


def _down(part: str, error: BaseException) -> dict[str, Any]:
    """A part that is down. The answer names only the error's class (anyone may ask, and messages name
    hosts and ports); the log has the message, at most once per part and ``DOWN_LOG_INTERVAL_S``."""
    now = time.monotonic()
    if now - _logged_down.get(part, -DOWN_LOG_INTERVAL_S) >= DOWN_LOG_INTERVAL_S:
        _logged_down[part] = now
        logger.warning("readiness: %s is down: %s: %s", part, type(error).__name__, error)
    return {"status": "down", "error": type(error).__name__}


async def check_postgres(dsn: str) -> dict[str, Any]:
    """``SELECT 1`` on a connection of its own, so a full or broken pool does not hide the database."""
    import psycopg

    started = time.perf_counter()
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            conn = await psycopg.AsyncConnection.connect(
                dsn, autocommit=True, connect_timeout=int(CHECK_TIMEOUT_S), application_name="realtime health"
            )
            try:
                await conn.execute("SELECT 1")
            finally:
                await conn.close()
    except Exception as error:  # noqa: BLE001  (any failure means down; CancelledError is not an Exception)
        return _down("postgres", error)
    return {"status": "up", "latency_ms": round((time.perf_counter() - started) * 1000, 1)}


async def check_redis_and_replicator(redis: Any, prefix: str, slot: str, now: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """PING Redis and read the replicator's state from it (one round trip each)."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await redis.ping()
            latency = round((time.perf_counter() - started) * 1000, 1)
            raw = await redis.get(replicator_key(prefix, slot))
    except Exception as error:  # noqa: BLE001
        return _down("redis", error), {"status": "unknown", "slot": slot, "error": "Redis is down"}
    return {"status": "up", "latency_ms": latency}, replicator_state(decode_status(raw), slot, now)


def replicator_state(status: ReplicatorStatus | None, slot: str, now: float) -> dict[str, Any]:
    """The replicator part of the readiness body: up while an active replicator wrote its state recently."""
    if status is None:
        return {"status": "down", "slot": slot, "active": False, "error": "no active replicator wrote its state"}
    age = now - status.updated_at
    up = status.active and age <= STATUS_TTL_S
    return {
        "status": "up" if up else "down",
        "slot": status.slot,
        "active": status.active,
        "lag_bytes": status.lag_bytes,
        "retained_wal_bytes": status.retained_wal_bytes,
        "lag_seconds": round(status.lag_seconds, 3),
        "last_batch_at": status.last_batch_at,
        "updated_at": status.updated_at,
    }
