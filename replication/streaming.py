"""Read a logical slot over the streaming replication protocol (``START_REPLICATION ... LOGICAL``).

The SQL interface (``pg_logical_slot_peek_binary_changes`` then
``pg_replication_slot_advance``) decodes the slot's WAL from its
``restart_lsn`` on every call, and that position moves only when decoding
meets a running-transactions record (every 15 s or checkpoint): under a steady
write load each poll decodes up to 15 s of WAL again, twice (peek and
advance). Measured at about 1,000 ``realtime.send``/s: 2 ms per peek just after
such a record, 25 ms 15 s later, plus as much again to advance. Streaming
decodes each WAL record once, pushes changes as they commit (no polling), and
confirms positions in a status update that needs no round trip.

``SlotStream`` owns one replication connection (``replication=database``)
for one slot. The caller (``listener.SlotLoop``) keeps its SQL connection for
the advisory lock and catalog queries, takes pages from ``next_page`` and
calls ``confirm`` with a commit's end once everything up to it is published:
at least once, as with the SQL interface, because the server resumes a slot
from its last confirmed position.

``Progress`` decides what may be confirmed: the end of the last published
commit, or, while no transaction is open and every commit received was
published, the server's position from a keepalive. The latter moves the slot
past WAL that holds nothing for this publication (other tables, other
databases), so a quiet slot does not pin WAL on a busy server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import pq, sql

from replication.connection import PAGE_BYTES, SlotRow
from replication.stream import PrimaryKeepalive, StandbyStatusUpdate, XLogData, parse_copy_data

logger = logging.getLogger(__name__)

# Settings the slot is decoded with: they shape the text of every value (pgtypes.values expects these).
DECODING_OPTIONS = "-c DateStyle=ISO -c IntervalStyle=postgres -c bytea_output=hex -c TimeZone=UTC"
# A status update at least this often, whether or not the server asks (its wal_sender_timeout is 60 s).
STATUS_EVERY_S = 10.0
_COMMIT_END = struct.Struct("!Q")  # pgoutput Commit: 'C', flags (1), commit lsn (8), end lsn (8), time (8)


class StreamEnded(psycopg.OperationalError):
    """The server ended the replication stream, or the connection failed."""


@dataclass(slots=True)
class Progress:
    """How far the slot may be confirmed. Pure: fed the messages received and the positions published."""

    confirmed: int = 0  # the position last confirmed to the server
    in_transaction: bool = False  # a Begin was received and its Commit not yet
    last_commit_end: int = 0  # the end of the last Commit received

    def received(self, data: bytes | memoryview) -> None:
        tag = data[:1]
        if tag == b"B":
            self.in_transaction = True
        elif tag == b"C":
            self.in_transaction = False
            if len(data) >= 18:
                self.last_commit_end = _COMMIT_END.unpack_from(data, 10)[0]

    def published(self, commit_end: int) -> None:
        """Everything up to ``commit_end`` (a Commit's end) was published."""
        self.confirmed = max(self.confirmed, commit_end)

    def server_at(self, wal_end: int) -> None:
        """A keepalive: the server sent everything before ``wal_end``; skip to there if nothing is pending."""
        if not self.in_transaction and self.last_commit_end <= self.confirmed:
            self.confirmed = max(self.confirmed, wal_end)


class SlotStream:
    """One slot streamed on a replication connection of its own."""

    def __init__(self, dsn: str, slot: str, publication: str, application_name: str) -> None:
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        self.application_name = application_name
        self.progress = Progress()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._sent: int = -1  # the position of the last status update sent
        self._sent_at = 0.0

    @property
    def _pgconn(self) -> pq.abc.PGconn:
        if self._conn is None:
            raise StreamEnded("the replication stream is not started")
        return self._conn.pgconn

    async def start(self) -> None:
        """Connect and start streaming from the slot's confirmed position.

        Raises:
            psycopg.Error: the connection or ``START_REPLICATION`` failed (the slot is
                missing or streamed by another process).
        """
        conn = await psycopg.AsyncConnection.connect(
            self.dsn,
            autocommit=True,
            replication="database",
            application_name=self.application_name,
            options=DECODING_OPTIONS,
        )
        self._conn = conn
        # publication_names is a list of identifiers inside a string literal.
        publications = sql.Identifier(self.publication).as_string(conn)
        command = sql.SQL(
            "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {}, messages 'false')"
        ).format(sql.Identifier(self.slot), sql.Literal(publications))
        pgconn = conn.pgconn
        pgconn.send_query(command.as_bytes(conn))
        while True:
            await self._flush()
            pgconn.consume_input()
            if not pgconn.is_busy():
                break
            await self._readable(1.0)
        result = pgconn.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            message = (result.error_message if result is not None else b"").decode(errors="replace")
            raise psycopg.OperationalError(f"START_REPLICATION failed: {message.strip() or pgconn.error_message!r}")

    async def next_page(self, max_rows: int, idle_s: float, linger_s: float = 0.0) -> list[SlotRow]:
        """The messages that arrived, up to ``max_rows`` or ``PAGE_BYTES``.

        Waits up to ``idle_s`` for the first one (an empty page means nothing came), then up to
        ``linger_s`` after it for more: each page becomes one layer message per group, and every
        server process receives layer messages one Redis round trip at a time, so a burst of small
        transactions must not become as many layer messages.

        Raises:
            StreamEnded: the stream or the connection ended.
        """
        pgconn = self._pgconn
        page: list[SlotRow] = []
        size = 0
        waited = pulled = False
        loop = asyncio.get_running_loop()
        until = 0.0  # when the page is published, once it has a row
        while len(page) < max_rows and size < PAGE_BYTES:
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes == 0:
                if not pulled:
                    # libpq holds no whole message: take what the socket already has, without waiting.
                    self._consume()
                    pulled = True
                    continue
                if page:
                    left = until - loop.time()
                    if left <= 0:
                        break
                    await self._readable(left)
                    self._consume()
                    continue
                if waited:
                    break
                await self.send_status()
                await self._readable(idle_s)
                waited = True
                self._consume()
                continue
            pulled = False
            if nbytes < 0:
                raise StreamEnded(f"replication stream ended: {pgconn.error_message.decode(errors='replace').strip()}")
            message = parse_copy_data(data)
            if isinstance(message, XLogData):
                self.progress.received(message.data)
                if not page:
                    until = loop.time() + linger_s
                page.append(SlotRow(message.start_lsn, 0, message.data))
                size += len(message.data)
            elif isinstance(message, PrimaryKeepalive):
                self.progress.server_at(message.wal_end)
                if message.reply_requested:
                    await self.send_status(force=True)
        return page

    def _consume(self) -> None:
        try:
            self._pgconn.consume_input()
        except psycopg.Error as error:
            raise StreamEnded(f"replication connection lost: {error}") from error

    async def confirm(self, commit_end: int) -> None:
        """Everything up to ``commit_end`` was published: the server may drop that WAL."""
        self.progress.published(commit_end)
        await self.send_status()

    async def send_status(self, force: bool = False) -> None:
        """Report the confirmed position if it moved, every ``STATUS_EVERY_S``, or when asked."""
        loop = asyncio.get_running_loop()
        position = self.progress.confirmed
        if not force and position == self._sent and loop.time() - self._sent_at < STATUS_EVERY_S:
            return
        update = StandbyStatusUpdate.confirming(position, datetime.now(UTC))
        if self._pgconn.put_copy_data(update.serialize()) != 1:
            raise StreamEnded(f"could not send a status update: {self._pgconn.error_message!r}")
        await self._flush()
        self._sent, self._sent_at = position, loop.time()

    async def keep_alive(self) -> None:
        """Report the (unchanged) position every ``STATUS_EVERY_S`` until cancelled: while a page is published."""
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            await self.send_status(force=True)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await conn.close()

    async def _flush(self) -> None:
        pgconn = self._pgconn
        while pgconn.flush() == 1:  # the socket's buffer is full: wait until it takes more
            await self._wait(pgconn.socket, writable=True, timeout=1.0)

    async def _readable(self, timeout: float) -> None:
        await self._wait(self._pgconn.socket, writable=False, timeout=timeout)

    @staticmethod
    async def _wait(fd: int, writable: bool, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        (loop.add_writer if writable else loop.add_reader)(fd, wake)
        try:
            await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            pass
        finally:
            (loop.remove_writer if writable else loop.remove_reader)(fd)
