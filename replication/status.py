"""The replicator's state, every second: how far its slot is behind, into the metrics.

``StatusReporter.run`` reads how far the slot is behind (one query on a
connection of its own) and sets the replication gauges (``realtime.metrics``).
It logs each change between active and not. Nothing here may stop the
replicator: every failure is logged and retried on the next tick.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg

from realtime import metrics

logger = logging.getLogger(__name__)

STATUS_EVERY_S = 1.0
SLOT_POSITIONS = (
    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,"
    " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint"
    " FROM pg_replication_slots WHERE slot_name = %s"
)


class StatusReporter:
    """Reports one listener's state (``stats.active``, ``last_batch_at``, ``lag_seconds``)."""

    def __init__(self, listener: Any, dsn: str) -> None:
        self.listener = listener
        self.dsn = dsn
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._was_active: bool | None = None

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self.report_once()
                try:
                    await asyncio.wait_for(stop.wait(), STATUS_EVERY_S)
                except asyncio.TimeoutError:
                    pass
        finally:
            if self._conn is not None:
                await self._conn.close()

    async def report_once(self) -> None:
        stats = self.listener.stats
        active = bool(stats.active)
        if active != self._was_active:
            if self._was_active is not None:
                logger.info("replicator %s slot %s", "active on" if active else "no longer active on", self.listener.slot)
            self._was_active = active
        metrics.replication_active.set(1 if active else 0)
        lag, retained = await self._slot_positions() if active else (None, None)
        if lag is not None:
            metrics.replication_lag_bytes.set(lag)
        if retained is not None:
            metrics.replication_retained_wal_bytes.set(retained)

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
