"""The replicator's state, every second: slot lag into the metrics, and into Redis for ``GET /api/health``.

``StatusReporter.run`` reads how far the slot is behind (one query on a
connection of its own), sets the replication gauges (``shared.metrics``) and,
while this replicator holds the slot, writes ``shared.health.ReplicatorStatus``
under ``shared.health.replicator_key`` with a TTL, so the state of a stopped
replicator vanishes on its own (the listener logs its changes of state).
Nothing here may stop the replicator: every failure is logged and retried on
the next tick.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

import psycopg

from shared import metrics
from shared.health import STATUS_EVERY_S, STATUS_TTL_S, ReplicatorStatus, decode_status, replicator_key

logger = logging.getLogger(__name__)

SLOT_POSITIONS = (
    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,"
    " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint"
    " FROM pg_replication_slots WHERE slot_name = %s"
)


class StatusReporter:
    """Reports one listener's state (``stats.active``, ``last_batch_at``, ``lag_seconds``)."""

    def __init__(self, listener: Any, dsn: str, redis: Any, prefix: str) -> None:
        self.listener = listener
        self.dsn = dsn
        self.redis = redis
        self.key = replicator_key(prefix, listener.slot)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._wrote = False
        self._host = socket.gethostname()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self.report_once()
                try:
                    await asyncio.wait_for(stop.wait(), STATUS_EVERY_S)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self._forget()
            if self._conn is not None:
                await self._conn.close()

    async def report_once(self) -> ReplicatorStatus:
        stats = self.listener.stats
        active = bool(stats.active)  # the listener logs each change (active, standby, failed)
        metrics.replication_active.set(1 if active else 0)
        lag, retained = await self._slot_positions() if active else (None, None)
        if lag is not None:
            metrics.replication_lag_bytes.set(lag)
        if retained is not None:
            metrics.replication_retained_wal_bytes.set(retained)
        status = ReplicatorStatus(
            slot=self.listener.slot, active=active, lag_bytes=lag, retained_wal_bytes=retained,
            lag_seconds=stats.lag_seconds, last_batch_at=stats.last_batch_at, updated_at=time.time(),
            pid=os.getpid(), host=self._host,
        )
        if active:
            try:
                await self.redis.set(self.key, status.encode(), ex=STATUS_TTL_S)
                self._wrote = True
            except Exception as error:  # noqa: BLE001  (Redis down: the listener sees it too and retries)
                logger.debug("replicator state not written to Redis: %s", error)
        elif self._wrote:
            await self._forget()
        return status

    async def _slot_positions(self) -> tuple[int | None, int | None]:
        """(lag, retained WAL) of the slot in bytes; (None, None) when the query fails."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=5, application_name=f"realtime replicate {self.listener.slot} status"
                )
            cursor = await self._conn.execute(SLOT_POSITIONS, (self.listener.slot,))
            row = await cursor.fetchone()
        except psycopg.Error as error:
            logger.debug("slot lag not read: %s", error)
            if self._conn is not None:
                await self._conn.close()
                self._conn = None
            return None, None
        if row is None:
            return None, None
        return row[0], row[1]

    async def _forget(self) -> None:
        """Remove the state this replicator wrote (it stops or lost the slot): readiness says so at once."""
        if not self._wrote:
            return
        try:
            # Only our own: a replicator that took the slot over meanwhile keeps its state.
            current = decode_status(await self.redis.get(self.key))
            if current is not None and (current.pid, current.host) == (os.getpid(), self._host):
                await self.redis.delete(self.key)
            self._wrote = False
        except Exception as error:  # noqa: BLE001
            logger.debug("replicator state not removed from Redis: %s", error)
