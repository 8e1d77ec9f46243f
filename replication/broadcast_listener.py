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
(``shared.partitions``) at activation and every ``PARTITIONS_EVERY_S``, on a
short connection of its own; a failure is logged and tried again later.

With ``max_per_second`` set (``REALTIME_MAX_DB_BROADCASTS_PER_SECOND``), the
loop paces itself: a page of rows takes that many tokens of a bucket holding
one second's worth, and the loop waits out the debt before publishing the
page, so database broadcasts (and the triggers' ``broadcast_changes``) reach
subscribers at that rate on average, in bursts of at most one page. Nothing
is dropped: rows not yet published stay in the slot, and the change slot is
not held up.

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

from shared.partitions import NotPartitioned, amaintain_partitions
from core.rates import TokenBucket
from replication.broadcasts import PUBLICATION, BroadcastDecoder
from replication.connection import SlotReader
from replication.listener import SlotLoop

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
    paced_s: float = 0.0  # time waited to stay within max_per_second
    layer_messages: int = 0
    active: bool = False
    last_error: str = ""


class BroadcastListener(SlotLoop):
    """Publishes inserted ``realtime.messages`` rows; ``run`` returns when ``stop`` is set."""

    label = "broadcast replication"

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
        max_per_second: float = 0.0,
        streaming: bool = True,
    ) -> None:
        super().__init__(dsn, slot, publication, layer, batch_changes, poll_interval, BroadcastStats(), streaming)
        self.max_payload_bytes = max_payload_bytes
        self._pace = TokenBucket(max_per_second, max_per_second, time.monotonic())
        self.maintain_partitions = maintain_partitions
        self._partitions_at = 0.0  # monotonic time of the next maintenance

    async def _start(self, reader: SlotReader) -> BroadcastDecoder:
        await reader.ensure_slot()
        return BroadcastDecoder(self.max_payload_bytes)

    async def _tick(self) -> None:
        await self._maybe_maintain()

    async def _page(
        self, reader: SlotReader, decoder: BroadcastDecoder, rows: list[Any], stop: asyncio.Event
    ) -> tuple[bool, int | None]:
        batch = decoder.build(decoder.parse(row.data for row in rows))
        if batch.oversized:
            logger.warning("%d database broadcasts over the payload cap were dropped", batch.oversized)
        delay = self._pace.borrow(time.monotonic(), batch.rows)
        if delay > 0:
            self.stats.paced_s += delay
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return True, None
        if not await self._send(batch.messages, stop):
            return True, None
        self.stats.layer_messages += len(batch.messages)
        self.stats.rows += batch.rows
        self.stats.oversized += batch.oversized
        self.stats.skipped += batch.skipped
        self.stats.transactions += batch.transactions
        return False, batch.confirm_lsn

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
