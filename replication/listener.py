"""Read the slot, publish each table's changes to its group, then confirm.

The loop: peek whole transactions from the slot, turn them into runs of
consecutive changes per table (``changes``), ``group_send`` each run to the
table's group, and only then advance the slot past the last published commit.
A crash anywhere before the advance replays those transactions after restart:
changes are delivered at least once, in commit order per table.

Changes to a table with row level security are checked before they are
published: one database call per run decides, for every claim set subscribed
to the table on any server process (``shared.claimsets``), which rows it may
see (``shared.visibility``), and the run carries the verdicts to every process.
A check that fails for one claim set (its policy raises or runs past the
statement timeout) denies that claim set for that run and travels in the run
as its ``check_errors``; only a lost connection retries the batch. With many
claim sets the check is split over ``check_connections`` connections that run
at once (``REALTIME_CHECK_CONNECTIONS``): PostgreSQL runs each on its own core.

One replicator per slot is active: it holds a session advisory lock; others
wait as standbys and take over when its connection ends. Failures retry with
backoff (first retry within 1 s, at most 5 s apart).

When Redis fails (a restart loses every group membership), the changes not
yet published stay in the slot, and the listener waits ``LAYER_RECOVERY_S``
after Redis answers again before publishing them: long enough for every
server process's hub to notice and re-add its memberships, so the changes
committed during the outage reach their subscribers instead of empty groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from channels.layers import BaseChannelLayer

from shared import metrics
from shared.claimsets import Directory
from core.types import MEMBERSHIP_CHECK_S, RECEIVE_RETRY_S, ChangeRun, checked_positions, verdict_per_change
from shared.visibility import RowChecker, Verdicts, check_order
from core.jwt import Claims
from replication import pgoutput
from replication.changes import ChangeDecoder
from replication.connection import SlotReader
from replication.streaming import SlotStream

logger = logging.getLogger(__name__)

STANDBY_POLL_S = 1.0
STREAM_IDLE_S = 0.5  # how long a streaming loop waits for data before it looks at ``stop`` and ticks
LOCK_CHECK_S = 2.0  # how often a streaming loop checks that the session holding its lock is alive
# How long a streamed page gathers rows after its first: at most about 100 layer messages per second
# per group, each server process receiving them one Redis round trip at a time.
STREAM_LINGER_S = 0.01
LAYER_RECOVERY_S = MEMBERSHIP_CHECK_S + RECEIVE_RETRY_S + 1.0
# Claim sets per check connection before a run's check is split over several (``check_connections``):
# below it, a share's fixed cost (a round trip, a plan per role) outweighs what it saves.
PARALLEL_CLAIM_SETS = 100
PROBE_GROUP = "realtime.replicator-probe"  # never has members


class LayerUnavailable(Exception):
    """Publishing to the channel layer (or reading the registry in Redis) failed."""


@dataclass(slots=True)
class Backoff:
    """Delays between tries: 0.5 s, 1 s, 2 s, 4 s, then 5 s."""

    first: float = 0.5
    limit: float = 5.0
    current: float = field(default=0.0)

    def next(self) -> float:
        self.current = self.first if self.current == 0 else min(self.current * 2, self.limit)
        return self.current

    def reset(self) -> None:
        self.current = 0.0


@dataclass(slots=True)
class ListenerStats:
    transactions: int = 0
    changes: int = 0
    published_runs: int = 0
    rls_runs: int = 0  # runs of changes that needed a row level security check (here, or in the server processes)
    rls_queries: int = 0  # database calls those checks made (one per run, more only after a timeout)
    rls_checks: int = 0  # claim-set checks those calls ran
    rls_failures: int = 0  # checks that failed for one claim set (a policy raised or timed out)
    active: bool = False
    last_error: str = ""
    last_batch_at: float | None = None  # unix time a page of changes was last published
    lag_seconds: float = 0.0  # commit to publication, of the last transaction published


class SlotLoop:
    """One slot's read loop, shared by the change listener and ``broadcast_listener``.

    Wait as a standby while another replicator holds the slot's lock; once
    active, read the slot a page at a time (``SlotReader.peek_pages``), let the
    subclass decode and publish each page (``_page``), and consume the slot up
    to the last commit published; retry any failure with ``Backoff``.
    Subclasses give ``_start`` (prepare the slot, return the decoder) and
    ``_page``; ``_tick`` and ``_closed`` are optional.
    """

    label = "replication"

    def __init__(self, dsn: str, slot: str, publication: str, layer: BaseChannelLayer,
                 batch_changes: int, poll_interval: float, stats: Any, streaming: bool = True) -> None:
        self.streaming = streaming
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        self.layer = layer
        self.batch_changes = batch_changes
        self.poll_interval = poll_interval
        self.layer_recovery = LAYER_RECOVERY_S
        self._layer_failed = False
        self.stats = stats  # has ``active`` and ``last_error``

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
                logger.warning("%s failed (%s); retrying in %.1fs", self.label, self.stats.last_error, delay)
                await _wait(stop, delay)
            finally:
                self.stats.active = False
                try:
                    await reader.close()
                except Exception:
                    logger.debug("closing the connection of slot %s failed", self.slot, exc_info=True)
                await self._closed()

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
        decoder = await self._start(reader)
        self.stats.active = True
        backoff.reset()
        logger.info("active: streaming slot %s of publication %s", self.slot, self.publication)
        self._activated()
        if self.streaming:
            await self._stream(reader, decoder, stop)
            return
        # Peeking decodes from the slot's position even when nothing is new. Once
        # a peek finds nothing, each poll first reads how far WAL is flushed and
        # skips the peek while that has not moved since the last empty one (which
        # read everything flushed up to at least there). A busy slot is peeked
        # directly, without the extra query.
        idle = False
        idle_at: str | None = None  # the flushed position read before the last empty peek
        while not stop.is_set():
            await self._tick()
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

    async def _stream(self, reader: SlotReader, decoder: Any, stop: asyncio.Event) -> None:
        """Publish the slot's pages as the replication protocol pushes them; confirm each published commit.

        The reader's connection keeps the lock and answers the subclass's catalog queries.
        """
        stream = SlotStream(self.dsn, self.slot, self.publication, f"realtime replicate {self.slot} stream")
        loop = asyncio.get_running_loop()
        try:
            await stream.start()
            checked = loop.time()
            while not stop.is_set():
                await self._tick()
                rows = await stream.next_page(self.batch_changes, STREAM_IDLE_S, STREAM_LINGER_S)
                if loop.time() - checked >= LOCK_CHECK_S:
                    # The lock lives in the reader's session: if that session died, fail now and
                    # start over, rather than stream on while a standby believes the slot is free.
                    await reader.ping()
                    checked = loop.time()
                if not rows:
                    continue
                # The server drops a stream that says nothing for wal_sender_timeout (60 s): a page
                # that takes long (paced, slow checks, Redis recovering) keeps reporting meanwhile,
                # or its confirm would be lost and the page published again, each time.
                alive = asyncio.ensure_future(stream.keep_alive())
                try:
                    stopped, committed = await self._page(reader, decoder, rows, stop)
                finally:
                    alive.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await alive
                if stopped:
                    return
                if committed is not None:
                    await stream.confirm(committed)
        finally:
            await stream.close()

    async def _read_once(self, reader: SlotReader, decoder: Any, stop: asyncio.Event) -> tuple[bool, bool]:
        """Publish the slot's next transactions page by page, then consume them.

        Returns (whether anything was read, whether ``stop`` was set meanwhile).
        A transaction is published as its pages arrive and consumed only after
        its commit was read and everything before it published, so a crash
        replays it whole (at least once) while memory holds one page at a time.
        """
        read = False
        confirm: int | None = None
        try:
            async with contextlib.aclosing(reader.peek_pages(self.batch_changes)) as pages:
                async for rows in pages:
                    read = True
                    stopped, committed = await self._page(reader, decoder, rows, stop)
                    if stopped:
                        return read, True
                    if committed is not None:
                        confirm = committed
        finally:
            # Transactions published whole are consumed even if a later page failed, so a
            # transaction that keeps failing does not make the ones before it repeat.
            if confirm is not None and reader.conn is not None and not reader.conn.closed:
                await reader.advance(confirm)
        return read, False

    async def _send(self, messages: Sequence[Any], stop: asyncio.Event) -> bool:
        """``group_send`` each message to its group; False if ``stop`` was set while Redis recovered.

        After Redis failed (a restart loses every group membership) the first
        send waits ``layer_recovery`` once Redis answers, so every server
        process has re-joined its groups first.
        """
        try:
            if self._layer_failed and messages:
                await self.layer.group_send(PROBE_GROUP, {"type": "realtime.probe"})  # raises while Redis is down
                logger.info("Redis is back; publishing in %.1fs, once the servers rejoined their groups", self.layer_recovery)
                if await _wait(stop, self.layer_recovery):
                    return False
                self._layer_failed = False
            for message in messages:
                await self.layer.group_send(message["group"], message)
        except (psycopg.Error, asyncio.CancelledError):
            raise
        except Exception as error:
            raise LayerUnavailable(str(error)) from error
        return True

    async def _start(self, reader: SlotReader) -> Any:
        raise NotImplementedError

    async def _page(
        self, reader: SlotReader, decoder: Any, rows: list[Any], stop: asyncio.Event
    ) -> tuple[bool, int | None]:
        """Decode and publish one page: (whether ``stop`` was set, the end of its last commit)."""
        raise NotImplementedError

    def _activated(self) -> None:
        pass

    async def _tick(self) -> None:
        pass

    async def _closed(self) -> None:
        pass


class Listener(SlotLoop):
    """The replicator's main loop for table changes; ``run`` returns when ``stop`` is set."""

    def __init__(
        self,
        dsn: str,
        slot: str,
        publication: str,
        layer: BaseChannelLayer,
        *,
        batch_changes: int = 2000,
        poll_interval: float = 0.01,
        max_payload_bytes: int = 1_048_576,
        on_active: Callable[[], None] | None = None,
        directory: Directory | None = None,
        streaming: bool = True,
        check_connections: int = 2,
    ) -> None:
        super().__init__(dsn, slot, publication, layer, batch_changes, poll_interval, ListenerStats(), streaming)
        self.max_payload_bytes = max_payload_bytes
        self.on_active = on_active
        self.directory = directory
        self.checker = RowChecker()
        # Index i: the i-th connection that checks claim sets in parallel (PARALLEL_CLAIM_SETS).
        self.check_conns: list[psycopg.AsyncConnection[Any] | None] = [None] * max(1, check_connections)

    async def _closed(self) -> None:
        for index, conn in enumerate(self.check_conns):
            if conn is not None:
                try:
                    await conn.close()
                except Exception:
                    logger.debug("closing a check connection failed", exc_info=True)
                self.check_conns[index] = None

    async def _start(self, reader: SlotReader) -> ChangeDecoder:
        await reader.ensure_publication()
        await reader.ensure_slot()
        return ChangeDecoder(await reader.type_names(), max_payload_bytes=self.max_payload_bytes)

    def _activated(self) -> None:
        if self.on_active is not None:
            self.on_active()

    async def _page(
        self, reader: SlotReader, decoder: ChangeDecoder, rows: list[Any], stop: asyncio.Event
    ) -> tuple[bool, int | None]:
        messages = decoder.parse(row.data for row in rows)
        announced = decoder.relations_announced(messages)
        if announced:
            decoder.add_primary_keys(await reader.primary_keys(announced), announced)
        if decoder.cache.unknown_type_oids():
            decoder.cache.add_type_names(await reader.type_names())
        changed = {m.relation_oid for m in messages if isinstance(m, pgoutput.ROW_CHANGES)}
        rls = await reader.rls_relations(changed) if changed else frozenset()
        batch = decoder.build(messages, rls)
        if rls:
            try:
                await self._check_rows(batch.runs)  # reads the claim sets from Redis
            except (psycopg.Error, asyncio.CancelledError):
                raise
            except Exception as error:
                raise LayerUnavailable(str(error)) from error
        if not await self._send(batch.runs, stop):
            return True, None
        self.stats.published_runs += len(batch.runs)
        self.stats.changes += batch.changes
        self.stats.transactions += batch.transactions
        self._published(messages, batch.changes, batch.transactions)
        return False, batch.confirm_lsn

    def _published(self, messages: Sequence[Any], changes: int, transactions: int) -> None:
        """Count a published page in the metrics; the lag of its last commit."""
        now = time.time()
        self.stats.last_batch_at = now
        metrics.replication_last_batch.set(now)
        if changes:
            metrics.replication_changes.inc(changes)
        if transactions:
            metrics.replication_transactions.inc(transactions)
        for message in reversed(messages):
            if isinstance(message, pgoutput.Commit):
                self.stats.lag_seconds = max(0.0, now - message.commit_time.timestamp())
                metrics.replication_lag_seconds.set(self.stats.lag_seconds)
                break

    async def _check_rows(self, runs: list[ChangeRun]) -> None:
        """Attach to each RLS run which of its changes each subscribed claim set may see."""
        if self.directory is None:
            return  # every server process checks for itself
        for run in runs:
            if not run.get("rls"):
                continue
            claim_sets = await self.directory.claim_sets((run["schema"], run["table"]))
            positions = checked_positions(run)
            if not positions:
                continue
            self.stats.rls_runs += 1
            if not claim_sets:
                continue  # none, or only filtered ones: their server processes check them
            keys = [run["changes"][i]["key"] for i in positions]
            # One call for every claim set (or one per connection, in parallel); a lost connection
            # raises and the batch is retried.
            verdicts = await self._check_parallel(claim_sets, run["schema"], run["table"], keys)
            nothing = bytes(len(keys))
            spread: dict[bytes, bytes] = {}  # most claim sets see none of a run's rows: spread that once
            visible = {}
            for claim_set in claim_sets:
                verdict = verdicts.visible.get(claim_set, nothing)
                per_change = spread.get(verdict)
                if per_change is None:
                    per_change = spread[verdict] = verdict_per_change(run, positions, verdict)
                visible[claim_set] = per_change
            run["visible"] = visible
            if verdicts.failed:
                run["check_errors"] = dict(verdicts.failed)
                self.stats.rls_failures += len(verdicts.failed)
        self.stats.rls_queries = self.checker.queries
        self.stats.rls_checks = self.checker.checks

    async def _check_parallel(
        self, claim_sets: Mapping[str, Claims], schema: str, table: str, keys: list[bytes]
    ) -> Verdicts:
        """``RowChecker.check`` of ``claim_sets``, split over the check connections when there are many.

        Each PostgreSQL backend runs on one core: with ``PARALLEL_CLAIM_SETS``
        claim sets or more, each connection checks a share of them (contiguous
        in role order, so each share still plans once per role), at once.
        """
        shares = min(len(self.check_conns), len(claim_sets) // PARALLEL_CLAIM_SETS) or 1
        if shares == 1:
            conn = await self._check_connection(0)
            return await self.checker.check(conn, claim_sets, schema, table, keys, own_connection=True)
        order = check_order(claim_sets)
        size = -(-len(order) // shares)
        parts = [{c: claim_sets[c] for c in order[i:i + size]} for i in range(0, len(order), size)]
        conns = [await self._check_connection(i) for i in range(len(parts))]
        answers = await asyncio.gather(
            *(self.checker.check(conn, part, schema, table, keys, own_connection=True) for conn, part in zip(conns, parts)),
            return_exceptions=True,
        )
        verdicts = Verdicts()
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer  # every share has finished: the batch is retried on sound connections
            verdicts.visible.update(answer.visible)
            verdicts.failed.update(answer.failed)
        return verdicts

    async def _check_connection(self, index: int) -> psycopg.AsyncConnection[Any]:
        conn = self.check_conns[index]
        if conn is None or conn.closed:
            suffix = "" if index == 0 else f" {index + 1}"
            conn = self.check_conns[index] = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, application_name=f"realtime replicate {self.slot} checks{suffix}"
            )
        return conn


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True if ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
        return True
    except asyncio.TimeoutError:
        return False
