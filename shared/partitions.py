"""Daily partitions of ``realtime.messages``: which must exist, which must go, and making it so.

The reference keeps one partition per day from yesterday to three days ahead
and drops the partitions whose rows are all older than 72 hours (its
``create_messages_partitions`` and ``delete_old_messages``). Here:

- ``plan(now, existing)`` is pure: the days to create and the days to drop
  for one reading of the clock.
- ``maintain_partitions(conn)`` and its async twin ``amaintain_partitions``
  read the catalog and the database clock, then apply the plan: one short
  transaction per partition, each waiting at most ``LOCK_TIMEOUT`` for its
  locks, so that a busy table delays maintenance and not the other way round.
  A partition that fails (lock timeout, a conflicting table) is logged and left
  for the next run. The replicator calls the async one periodically;
  ``manage.py realtime_partitions`` and ``migrate`` the sync one.

``migrate`` also gives the table a DEFAULT partition (``realtime.dbsetup``),
so an insert never fails for want of a partition. Rows of a day that had no
partition wait there: creating the day's partition moves them into it before
attaching it, so the publication does not stream them a second time, and rows
older than the retention are deleted from it.

Times are ``inserted_at`` values: ``timestamp without time zone`` in the
inserting session's time zone (UTC on Supabase). ``now`` defaults to the
database's ``localtimestamp``, in that frame; an aware ``now`` is read in UTC.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

import psycopg
from psycopg import sql

logger = logging.getLogger(__name__)

DAYS_BEHIND = 1  # yesterday
DAYS_AHEAD = 3
RETENTION = timedelta(hours=72)
LOCK_TIMEOUT = "5s"

_SCHEMA = "realtime"
_PARENT = sql.Identifier(_SCHEMA, "messages")
_NAME = re.compile(r"messages_(\d{4})_(\d{2})_(\d{2})")
# One maintainer at a time (replicators, the command, migrate); the others skip their run.
_LOCK_KEY = "realtime.partitions"


class NotPartitioned(Exception):
    """``realtime.messages`` is missing or not partitioned: ``manage.py migrate`` has not run."""


def partition_name(day: date) -> str:
    """The reference's name for ``day``'s partition: ``messages_2026_01_31``."""
    return f"messages_{day:%Y_%m_%d}"


def parse_partition_name(name: str) -> date | None:
    """The day of a daily partition's name; None for any other name (the default partition, say)."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    try:
        return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None


def day_start(day: date) -> datetime:
    """The lower bound of ``day``'s partition (inclusive); the next day's start is its upper bound."""
    return datetime.combine(day, time())


@dataclass(frozen=True, slots=True)
class Plan:
    """What one maintenance run does."""

    create: tuple[date, ...]  # wanted days without a partition, oldest first
    drop: tuple[date, ...]  # days whose partition holds only rows older than RETENTION, oldest first
    cutoff: datetime  # rows inserted before this go; the start of the oldest day kept


def plan(now: datetime, existing: Iterable[str]) -> Plan:
    """The partitions to create and to drop at ``now``, given the names of the partitions there are.

    Wanted: yesterday to ``DAYS_AHEAD`` days ahead. Dropped: every daily
    partition of a day before the one ``RETENTION`` ago, so that a dropped row
    is always older than ``RETENTION`` (the reference's rule). Names that are
    not daily partitions are ignored.
    """
    now = _naive(now)
    today = now.date()
    cutoff_day = (now - RETENTION).date()
    days = {day for day in map(parse_partition_name, existing) if day is not None}
    wanted = (today + timedelta(days=offset) for offset in range(-DAYS_BEHIND, DAYS_AHEAD + 1))
    return Plan(
        create=tuple(day for day in wanted if day not in days),
        drop=tuple(sorted(day for day in days if day < cutoff_day)),
        cutoff=day_start(cutoff_day),
    )


def _naive(now: datetime) -> datetime:
    return now if now.tzinfo is None else now.astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a maintenance run did."""

    plan: Plan | None = None  # None when another session was maintaining the partitions
    created: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    moved: int = 0  # rows taken from the default partition into the created partitions
    purged: int = 0  # rows older than the cutoff deleted from the default partition
    failed: tuple[str, ...] = ()  # partitions left for the next run (logged)

    @property
    def skipped(self) -> bool:
        return self.plan is None


@dataclass(frozen=True, slots=True)
class _State:
    now: datetime  # the database's localtimestamp
    partitions: tuple[str, ...]  # daily partitions' names (schema realtime)
    default: tuple[str, str] | None  # (schema, name) of the DEFAULT partition
    columns: tuple[str, ...]  # realtime.messages' columns, in order


_TRY_LOCK = sql.SQL("SELECT pg_try_advisory_lock(hashtextextended({}, 0))").format(sql.Literal(_LOCK_KEY))
_UNLOCK = sql.SQL("SELECT pg_advisory_unlock(hashtextextended({}, 0))").format(sql.Literal(_LOCK_KEY))
_READ_STATE = sql.SQL(
    """
    SELECT localtimestamp,
      ARRAY(SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = pt.partrelid AND c.relnamespace = {schema}::regnamespace
              AND c.oid <> pt.partdefid),
      (SELECT ARRAY[n.nspname::text, c.relname::text] FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
       WHERE c.oid = pt.partdefid),
      ARRAY(SELECT a.attname::text FROM pg_attribute a
            WHERE a.attrelid = pt.partrelid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum)
    FROM pg_partitioned_table pt
    WHERE pt.partrelid = to_regclass({parent})
    """
).format(schema=sql.Literal(_SCHEMA), parent=sql.Literal(f"{_SCHEMA}.messages"))
_SET_LOCK_TIMEOUT = sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT))


def _state(row: tuple[Any, ...] | None) -> _State:
    if row is None:
        raise NotPartitioned("realtime.messages is missing or not partitioned; run manage.py migrate")
    now, partitions, default, columns = row
    return _State(now, tuple(partitions), (default[0], default[1]) if default else None, tuple(columns))


@dataclass(frozen=True, slots=True)
class _Step:
    """One transaction: the statements, and which one's row count the outcome reports."""

    kind: Literal["create", "drop", "purge"]
    name: str
    statements: tuple[sql.SQL | sql.Composed, ...]  # what execute() takes
    counted: int | None = None


def _steps(todo: Plan, state: _State) -> list[_Step]:
    steps = [_create_step(day, state) for day in todo.create]
    steps += [_drop_step(day) for day in todo.drop]
    if state.default is not None:
        purge = sql.SQL("DELETE FROM {} WHERE inserted_at < {}").format(
            sql.Identifier(*state.default), sql.Literal(todo.cutoff)
        )
        steps.append(_Step("purge", state.default[1], (_SET_LOCK_TIMEOUT, purge), counted=1))
    return steps


def _create_step(day: date, state: _State) -> _Step:
    # CREATE ... PARTITION OF would fail while the default partition holds rows
    # of the day, and re-inserting them would publish them again: the table is
    # filled before it becomes a partition, then attached (which also builds
    # its indexes, and locks the parent less than PARTITION OF does).
    name = partition_name(day)
    table = sql.Identifier(_SCHEMA, name)
    lower, upper = sql.Literal(day_start(day)), sql.Literal(day_start(day + timedelta(days=1)))
    statements: list[sql.SQL | sql.Composed] = [
        _SET_LOCK_TIMEOUT,
        sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(table, _PARENT),
    ]
    counted = None
    if state.default is not None:
        columns = sql.SQL(", ").join(map(sql.Identifier, state.columns))
        counted = len(statements)
        statements.append(
            sql.SQL(
                "WITH moved AS (DELETE FROM {default} WHERE inserted_at >= {lower} AND inserted_at < {upper}"
                " RETURNING {columns}) INSERT INTO {table} ({columns}) SELECT {columns} FROM moved"
            ).format(default=sql.Identifier(*state.default), lower=lower, upper=upper, columns=columns, table=table)
        )
    statements.append(
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(_PARENT, table, lower, upper)
    )
    return _Step("create", name, tuple(statements), counted)


def _drop_step(day: date) -> _Step:
    name = partition_name(day)
    return _Step("drop", name, (_SET_LOCK_TIMEOUT, sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(_SCHEMA, name))))


def _outcome(todo: Plan, done: Sequence[tuple[_Step, int]], failed: Sequence[str]) -> Outcome:
    return Outcome(
        plan=todo,
        created=tuple(step.name for step, _ in done if step.kind == "create"),
        dropped=tuple(step.name for step, _ in done if step.kind == "drop"),
        moved=sum(count for step, count in done if step.kind == "create"),
        purged=sum(count for step, count in done if step.kind == "purge"),
        failed=tuple(failed),
    )


def _failed(step: _Step, error: psycopg.Error) -> None:
    logger.warning(
        "realtime.messages partition %s %s failed, retried at the next run: %s %s",
        step.kind, step.name, error.sqlstate, error.diag.message_primary or error,
    )


def _usable(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    # The session lock is released when the connection closes anyway.
    return not conn.broken and conn.info.transaction_status != psycopg.pq.TransactionStatus.INERROR


def maintain_partitions(conn: psycopg.Connection[Any], now: datetime | None = None) -> Outcome:
    """Create the wanted daily partitions of ``realtime.messages`` and drop the expired ones, once.

    Args:
        conn: a connection in autocommit mode, or inside a transaction (each
            partition then gets a savepoint), used by nothing else meanwhile.
        now: the clock; the database's ``localtimestamp`` when None.

    Raises:
        NotPartitioned: ``migrate`` has not prepared the table.
        psycopg.Error: the connection failed (a failing partition does not raise).
    """
    row = conn.execute(_TRY_LOCK).fetchone()
    if not row or not row[0]:
        logger.info("realtime.messages partitions: another session is maintaining them")
        return Outcome()
    try:
        state = _state(conn.execute(_READ_STATE).fetchone())
        todo = plan(now or state.now, state.partitions)
        done: list[tuple[_Step, int]] = []
        failed: list[str] = []
        for step in _steps(todo, state):
            try:
                with conn.transaction():
                    counts = [conn.execute(statement).rowcount for statement in step.statements]
            except psycopg.Error as error:
                if conn.broken:
                    raise
                _failed(step, error)
                failed.append(step.name)
            else:
                done.append((step, 0 if step.counted is None else counts[step.counted]))
        return _outcome(todo, done, failed)
    finally:
        if _usable(conn):
            conn.execute(_UNLOCK)


async def amaintain_partitions(conn: psycopg.AsyncConnection[Any], now: datetime | None = None) -> Outcome:
    """``maintain_partitions`` on an async connection; for the replicator to call periodically."""
    row = await (await conn.execute(_TRY_LOCK)).fetchone()
    if not row or not row[0]:
        logger.info("realtime.messages partitions: another session is maintaining them")
        return Outcome()
    try:
        state = _state(await (await conn.execute(_READ_STATE)).fetchone())
        todo = plan(now or state.now, state.partitions)
        done: list[tuple[_Step, int]] = []
        failed: list[str] = []
        for step in _steps(todo, state):
            try:
                async with conn.transaction():
                    counts = [(await conn.execute(statement)).rowcount for statement in step.statements]
            except psycopg.Error as error:
                if conn.broken:
                    raise
                _failed(step, error)
                failed.append(step.name)
            else:
                done.append((step, 0 if step.counted is None else counts[step.counted]))
        return _outcome(todo, done, failed)
    finally:
        if _usable(conn):
            await conn.execute(_UNLOCK)
