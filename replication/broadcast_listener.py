"""Stream ``realtime.messages`` inserts to their topics; publish, then advance (PROTOCOL.md 5.4).

A second slot of the same ``replicate`` process (``<slot>_messages``) on the
publication ``supabase_realtime_messages_publication``: the change path's slot,
its batches and its row level security checks stay untouched, and a burst of
database broadcasts never waits behind a bulk load of table changes (or the
other way round). The loop is the change listener's: peek whole
transactions, decode them (``replication.broadcasts``), ``group_send`` each
group's messages, and only then advance the slot past the last published
commit, so a crash anywhere before the advance delivers them again: at least
once, in commit order per topic.

Private rows need no check here: a private channel is in its topic's
broadcast group only if its read policy granted broadcast read at join
(``Channel.groups()``), as for client broadcasts.

The same loop keeps the daily partitions of ``realtime.messages``
(``realtime.partitions``) at activation and every ``PARTITIONS_EVERY_S``, on a
short connection of its own; a failure is logged and tried again later.

One replicator per slot is active (the slot's advisory lock); failures retry
with the change listener's backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from channels.layers import BaseChannelLayer

from realtime.partitions import NotPartitioned, amaintain_partitions
from replication.broadcasts import PUBLICATION, BroadcastDecoder
from replication.connection import SlotReader
from replication.listener import LAYER_RECOVERY_S, PROBE_GROUP, STANDBY_POLL_S, Backoff, LayerUnavailable, _wait

logger = logging.getLogger(__name__)

SLOT_SUFFIX = "_messages"
PARTITIONS_EVERY_S = 3600.0


def messages_slot(slot: str) -> str:
    """The slot that streams ``realtime.messages`` beside the change slot ``slot``."""
    return slot + SLOT_SUFFIX


@dataclass(slots=True)
class BroadcastStats:
    transactions: int = 0
    rows: int = 0  # broadcasts published
    oversized: int = 0  # dropped: over REALTIME_MAX_PAYLOAD_SIZE_KB
    skipped: int = 0  # not broadcasts (another extension)
    layer_messages: int = 0
    active: bool = False
    last_error: str = ""


class BroadcastListener:
    """Publishes inserted ``realtime.messages`` rows; ``run`` returns when ``stop`` is set."""

    def __init__(
        self,
        dsn: str,
        slot: str,
        layer: BaseChannelLayer,
        *,
        max_payload_bytes: int,
        publication: str = PUBLICATION,
        batch_changes: int = 1000,
        poll_interval: float = 0.01,
        maintain_partitions: bool = True,
    ) -> None:
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        self.layer = layer
        self.max_payload_bytes = max_payload_bytes
        self.batch_changes = batch_changes
        self.poll_interval = poll_interval
        self.maintain_partitions = maintain_partitions
        self.layer_recovery = LAYER_RECOVERY_S
        self._layer_failed = False
        self._partitions_at = 0.0  # monotonic time of the next maintenance
        self.stats = BroadcastStats()

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            reader = SlotReader(self.dsn, self.slot, self.publication)
            try:
                await self._serve(reader, stop, backoff)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.stats.active = False
                cause = error.__cause__ if isinstance(error, LayerUnavailable) and error.__cause__ else error
                self.stats.last_error = f"{type(cause).__name__}: {cause}"
                if isinstance(error, LayerUnavailable):
                    self._layer_failed = True
                delay = backoff.next()
                logger.warning("broadcast replication failed (%s); retrying in %.1fs", self.stats.last_error, delay)
                await _wait(stop, delay)
            finally:
                self.stats.active = False
                try:
                    await reader.close()
                except Exception:
                    logger.debug("closing the messages slot connection failed", exc_info=True)

    async def _serve(self, reader: SlotReader, stop: asyncio.Event, backoff: Backoff) -> None:
        await reader.connect()
        announced = False
        while not await reader.try_lock():
            if not announced:
                logger.info("standby: another replicator holds slot %s", self.slot)
                announced = True
            backoff.reset()
            if await _wait(stop, STANDBY_POLL_S):
                return
        await reader.ensure_slot()
        decoder = BroadcastDecoder(self.max_payload_bytes)
        self.stats.active = True
        backoff.reset()
        logger.info("active: streaming slot %s of publication %s", self.slot, self.publication)
        idle = False
        idle_at: str | None = None
        while not stop.is_set():
            await self._maybe_maintain()
            # As the change listener: skip the peek while nothing was flushed since the last empty one.
            position = await reader.wal_position() if idle else None
            if position is not None and position == idle_at:
                read = False
            else:
                read, stopped = await self._read_once(reader, decoder, stop)
                if stopped:
                    return
            if not read:
                idle, idle_at = True, position
                if await _wait(stop, self.poll_interval):
                    return
                continue
            idle, idle_at = False, None

    async def _read_once(self, reader: SlotReader, decoder: BroadcastDecoder, stop: asyncio.Event) -> tuple[bool, bool]:
        """Publish the slot's next transactions a page at a time (as the change listener), then consume them.

        Returns (whether anything was read, whether ``stop`` was set). What was
        published up to the last commit read is consumed even if a later page fails.
        """
        read = False
        confirm: int | None = None
        try:
            async with contextlib.aclosing(reader.peek_pages(self.batch_changes)) as pages:
                async for rows in pages:
                    read = True
                    batch = decoder.build(decoder.parse(row.data for row in rows))
                    if not await self._publish(batch, stop):
                        return read, True
                    if batch.confirm_lsn is not None:
                        confirm = batch.confirm_lsn
        finally:
            if confirm is not None and reader.conn is not None and not reader.conn.closed:
                await reader.advance(confirm)
        return read, False

    async def _publish(self, batch: Any, stop: asyncio.Event) -> bool:
        """Send one page's broadcasts; False if ``stop`` was set while waiting for Redis to recover."""
        if batch.oversized:
            logger.warning("%d database broadcasts over the payload cap were dropped", batch.oversized)
        try:
            if self._layer_failed and batch.messages:
                await self.layer.group_send(PROBE_GROUP, {"type": "realtime.probe"})  # raises while Redis is down
                if await _wait(stop, self.layer_recovery):
                    return False
                self._layer_failed = False
            for message in batch.messages:
                await self.layer.group_send(message["group"], message)
                self.stats.layer_messages += 1
        except (psycopg.Error, asyncio.CancelledError):
            raise
        except Exception as error:
            raise LayerUnavailable(str(error)) from error
        self.stats.rows += batch.rows
        self.stats.oversized += batch.oversized
        self.stats.skipped += batch.skipped
        self.stats.transactions += batch.transactions
        return True

    async def _maybe_maintain(self) -> None:
        if not self.maintain_partitions or time.monotonic() < self._partitions_at:
            return
        self._partitions_at = time.monotonic() + PARTITIONS_EVERY_S
        try:
            conn: psycopg.AsyncConnection[Any] = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, application_name=f"realtime replicate {self.slot} partitions"
            )
            async with conn:
                outcome = await amaintain_partitions(conn)
            logger.info("realtime.messages partitions maintained: %s", outcome)
        except NotPartitioned:
            logger.warning("realtime.messages is not partitioned: run manage.py migrate")
        except psycopg.Error as error:
            logger.warning("realtime.messages partition maintenance failed, retried in %.0fs: %s", PARTITIONS_EVERY_S, error)
