"""The only place that talks to PostgreSQL for replication.

It ensures the publication (never adding tables to it: that is the user's
call) and a permanent logical replication slot, holds the advisory lock that
makes one replicator per slot active, and answers the listeners' catalog
queries. By default the slot is streamed on a second, replication connection
(``replication.streaming``); with ``--read peek`` this connection reads it
through the SQL interface: ``pg_logical_slot_peek_binary_changes`` returns
whole transactions without consuming them, and ``pg_replication_slot_advance``
consumes them only once the listener has published them. Either way a crash at
any point replays instead of losing. Decoding lives in ``pgoutput``; this
module knows nothing of it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from replication.stream import lsn_to_text, parse_lsn

logger = logging.getLogger(__name__)

LOCK_NAMESPACE = "realtime.replication"
_PEEK = (
    "SELECT lsn::text, xid::text::bigint, data FROM pg_logical_slot_peek_binary_changes("
    "%s, NULL, %s, 'proto_version', '1', 'publication_names', %s, 'messages', 'false')"
)
# Rows fetched at a time from a peek: sized to about PAGE_BYTES of pgoutput data.
FIRST_PAGE_ROWS = 16
MAX_PAGE_ROWS = 2000
PAGE_BYTES = 4 * 1024 * 1024


class SlotMissing(RuntimeError):
    """The slot this reader owns was dropped under it."""


@dataclass(frozen=True, slots=True)
class SlotRow:
    """One pgoutput message as the slot returns it."""

    lsn: int
    xid: int
    data: bytes


class SlotReader:
    """A connection that owns one logical slot while it holds the slot's advisory lock."""

    def __init__(self, dsn: str, slot: str, publication: str) -> None:
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        self.conn: psycopg.AsyncConnection[TupleRow] | None = None

    async def connect(self) -> None:
        # The slot is decoded in this session, so its settings shape the text
        # of every value (pgtypes.values expects these).
        self.conn = await psycopg.AsyncConnection.connect(
            self.dsn,
            autocommit=True,
            application_name=f"realtime replicate {self.slot}",
            options="-c DateStyle=ISO -c IntervalStyle=postgres -c bytea_output=hex -c TimeZone=UTC",
        )

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None

    def _conn(self) -> psycopg.AsyncConnection[TupleRow]:
        if self.conn is None:
            raise RuntimeError("SlotReader is not connected")
        return self.conn

    async def try_lock(self) -> bool:
        """Take the per-slot advisory lock; held until this connection ends."""
        cursor = await self._conn().execute(
            "SELECT pg_try_advisory_lock(hashtext(%s), hashtext(%s))", (LOCK_NAMESPACE, self.slot)
        )
        row = await cursor.fetchone()
        return bool(row and row[0])

    async def ping(self) -> None:
        """Raise if this session (and the advisory lock it holds) is gone."""
        await self._conn().execute("SELECT 1")

    async def ensure_publication(self) -> None:
        conn = self._conn()
        cursor = await conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (self.publication,))
        if await cursor.fetchone() is None:
            logger.info("creating publication %s (add tables with ALTER PUBLICATION ... ADD TABLE)", self.publication)
            try:
                await conn.execute(sql.SQL("CREATE PUBLICATION {}").format(sql.Identifier(self.publication)))
            except psycopg.errors.DuplicateObject:
                pass

    async def ensure_slot(self) -> None:
        conn = self._conn()
        cursor = await conn.execute("SELECT plugin FROM pg_replication_slots WHERE slot_name = %s", (self.slot,))
        row = await cursor.fetchone()
        if row is None:
            logger.info("creating logical replication slot %s", self.slot)
            try:
                await conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.slot,))
            except psycopg.errors.DuplicateObject:
                pass
        elif row[0] != "pgoutput":
            raise RuntimeError(f"replication slot {self.slot} uses plugin {row[0]!r}, not pgoutput")

    async def peek(self, max_changes: int) -> list[SlotRow]:
        """The next whole transactions in the slot (at least one if any), without consuming them."""
        cursor = await self._conn().execute(_PEEK, (self.slot, max_changes, self.publication))
        return [SlotRow(parse_lsn(lsn), int(xid), bytes(data)) for lsn, xid, data in await cursor.fetchall()]

    async def peek_pages(self, max_changes: int) -> AsyncGenerator[list[SlotRow], None]:
        """``peek``'s rows, a page at a time through a server-side cursor.

        PostgreSQL holds the decoded transactions (spilling to disk past
        ``work_mem``), so one transaction of millions of rows, or of hundreds
        of large rows, never sits whole in this process: each page is about
        ``PAGE_BYTES`` (its row count adapts to the rows' size). Other queries
        of this reader may run between pages (same connection, same transaction).
        """
        conn = self._conn()
        async with conn.transaction(), conn.cursor("realtime_slot_pages") as cursor:
            await cursor.execute(_PEEK, (self.slot, max_changes, self.publication))
            count = FIRST_PAGE_ROWS
            largest = 1
            page: list[SlotRow] = []
            size = 0
            while rows := await cursor.fetchmany(count):
                fetched = [SlotRow(parse_lsn(lsn), int(xid), bytes(data)) for lsn, xid, data in rows]
                page += fetched
                size += sum(len(row.data) for row in fetched)
                # Sized by the largest row seen in this read, not the mean: a page of small
                # rows must not make the next fetch thousands of large ones.
                largest = max(largest, max(len(row.data) for row in fetched))
                count = max(1, min(MAX_PAGE_ROWS, PAGE_BYTES // largest))
                if size >= PAGE_BYTES // 2 or len(page) >= MAX_PAGE_ROWS:
                    yield page  # a small read stays one page (one run, one check per claim set)
                    page, size = [], 0
            if page:
                yield page

    async def wal_position(self) -> str:
        """How far WAL is flushed: decoding reads up to there, so unchanged means nothing new to decode.

        Raises:
            SlotMissing: the slot was dropped (it is recreated on the retry).
        """
        cursor = await self._conn().execute(
            "SELECT pg_current_wal_flush_lsn()::text, EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s)",
            (self.slot,),
        )
        row = await cursor.fetchone()
        if row is None or not row[1]:
            raise SlotMissing(f"replication slot {self.slot} does not exist")
        return str(row[0])

    async def advance(self, lsn: int) -> None:
        """Consume everything up to ``lsn`` (a commit's end position)."""
        await self._conn().execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (self.slot, lsn_to_text(lsn)))

    async def type_names(self) -> dict[int, str]:
        """``pg_type`` oid -> typname, for column types of user tables (enums, domains, arrays)."""
        cursor = await self._conn().execute("SELECT oid::bigint, typname::text FROM pg_type")
        return {int(oid): str(name) for oid, name in await cursor.fetchall()}

    async def rls_relations(self, relation_oids: set[int]) -> frozenset[int]:
        """The relations among ``relation_oids`` with row level security enabled, now.

        Read for every batch: enabling RLS sends no Relation message, and a
        change must never be delivered unchecked once it is on.
        """
        cursor = await self._conn().execute(
            "SELECT oid::bigint FROM pg_class WHERE oid = ANY(%s) AND relrowsecurity", (list(relation_oids),)
        )
        return frozenset(int(oid) for (oid,) in await cursor.fetchall())

    async def primary_keys(self, relation_oids: set[int]) -> dict[int, tuple[str, ...]]:
        """Primary key column names (in key order) of each relation; () for none."""
        cursor = await self._conn().execute(
            "SELECT i.indrelid::bigint, array_agg(a.attname::text ORDER BY k.ord)"
            " FROM pg_index i"
            " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            " WHERE i.indisprimary AND i.indrelid = ANY(%s) GROUP BY i.indrelid",
            (list(relation_oids),),
        )
        found = {int(oid): tuple(names) for oid, names in await cursor.fetchall()}
        return {oid: found.get(oid, ()) for oid in relation_oids}
