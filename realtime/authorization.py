"""Join-time database checks for postgres_changes bindings (PROTOCOL.md 4.3).

For each binding: is the table in the publication, do the filter's columns
exist and do its values cast (checked against the table's column types), and
may the subscriber's role read the table. The read check runs inside a
rolled-back transaction as the subscriber: ``SET LOCAL ROLE`` (composed with
``sql.Identifier``), the ``request.jwt.claims`` settings the reference sets,
then ``SELECT ... LIMIT 0``. No name is ever formatted into SQL as text.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from realtime.bindings import WILDCARD, Binding, BindingError
from core.errors import FilterError
from realtime.filters.grammar import Condition, parse_filter
from realtime.filters.predicates import compile_conditions
from core.jwt import Claims
from shared.database import check_timeout_ms, connection_lost
from shared.visibility import RowChecker, Verdicts

logger = logging.getLogger(__name__)

POOL_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str  # pg_type.typname
    readable: bool = True  # the subscriber's role may SELECT it (column privileges)


@dataclass(frozen=True, slots=True)
class AuthorizedBinding:
    """A binding that passed every check, with what delivery needs."""

    binding: Binding
    tables: tuple[tuple[str, str], ...]  # (schema, table) pairs it covers
    matcher: Any  # realtime.filters matcher, or None without a filter
    columns: frozenset[str] | None = None  # ``select`` plus the primary key; None = every column
    # Tables where the role may read only some columns (C47): those columns.
    readable: Mapping[tuple[str, str], frozenset[str]] = field(default_factory=dict)

    def columns_of(self, table: tuple[str, str]) -> frozenset[str] | None:
        """The columns this binding delivers from ``table``; None means every column."""
        limit = self.readable.get(table)
        if limit is None:
            return self.columns
        return limit if self.columns is None else self.columns & limit


class Database:
    """The server process's small connection pool for its checks (joins, private channels, missed RLS claim sets)."""

    def __init__(self, dsn: str, publication: str) -> None:
        self.publication = publication
        # Joins wait at most POOL_TIMEOUT_S for a connection: a database that is
        # down fails the join with a clear reason before the client gives up.
        self.pool = AsyncConnectionPool(
            dsn, min_size=0, max_size=4, open=False, timeout=POOL_TIMEOUT_S,
            kwargs={"autocommit": True, "connect_timeout": int(POOL_TIMEOUT_S)},
        )
        self._opened = False
        self._open_lock = asyncio.Lock()
        self._dsn = dsn
        self._checks: psycopg.AsyncConnection[Any] | None = None  # row level security checks only
        self._checks_lock = asyncio.Lock()

    async def _ensure_open(self) -> None:
        if not self._opened:
            async with self._open_lock:
                if not self._opened:
                    await self.pool.open()
                    self._opened = True

    async def close(self) -> None:
        if self._opened:
            await self.pool.close()
            self._opened = False
        if self._checks is not None:
            await self._checks.close()
            self._checks = None

    @asynccontextmanager
    async def check_connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The process's own autocommit connection for row level security checks, one check at a time.

        Not pooled: a check is then one statement (``RowChecker.check`` with
        ``own_connection``), its prepared lookups stay, and joins never wait
        behind the checks of a busy table. Reconnects after a lost connection.
        """
        async with self._checks_lock:
            if self._checks is None or self._checks.closed or self._checks.broken:
                if self._checks is not None:
                    await self._checks.close()
                self._checks = await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, connect_timeout=int(POOL_TIMEOUT_S)
                )
            yield self._checks

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled autocommit connection (opening the pool on first use)."""
        await self._ensure_open()
        async with self.pool.connection() as conn:
            yield conn

    async def published_tables(self) -> frozenset[tuple[str, str]]:
        """(schema, table) pairs in the publication now (read at every subscribe, as the reference does)."""
        async with self.connection() as conn:
            cursor = await conn.execute(
                "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = %s",
                (self.publication,),
            )
            return frozenset((str(s), str(t)) for s, t in await cursor.fetchall())

    async def columns(self, schema: str, table: str, role: str | None = None) -> list[Column]:
        """The table's columns in attnum order; with ``role``, whether it may SELECT each."""
        async with self.connection() as conn:
            cursor = await conn.execute(
                "SELECT a.attname::text, t.typname::text,"
                " CASE WHEN %s::text IS NULL THEN true WHEN r.oid IS NULL THEN false"
                " ELSE has_column_privilege(r.oid, c.oid, a.attnum, 'SELECT') END"
                " FROM pg_attribute a"
                " JOIN pg_type t ON t.oid = a.atttypid"
                " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
                " LEFT JOIN pg_roles r ON r.rolname = %s"
                " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped"
                " ORDER BY a.attnum",
                (role, role, schema, table),
            )
            return [Column(str(name), str(typ), bool(ok)) for name, typ, ok in await cursor.fetchall()]

    async def primary_key(self, schema: str, table: str) -> tuple[str, ...]:
        async with self.connection() as conn:
            cursor = await conn.execute(
                "SELECT a.attname::text FROM pg_index i"
                " JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
                " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
                " WHERE i.indisprimary AND n.nspname = %s AND c.relname = %s ORDER BY a.attnum",
                (schema, table),
            )
            return tuple(str(name) for (name,) in await cursor.fetchall())

    async def can_select(self, claims: Claims, schema: str, table: str, columns: tuple[str, ...] = ()) -> str | None:
        """None if ``claims.role`` may read the table (and columns), else the database's message."""
        async with self.connection() as conn:
            try:
                async with conn.transaction(force_rollback=True):
                    await set_request_context(conn, claims)
                    target = sql.SQL(", ").join(map(sql.Identifier, columns)) if columns else sql.SQL("1")
                    await conn.execute(
                        sql.SQL("SELECT {} FROM {}.{} LIMIT 0").format(target, sql.Identifier(schema), sql.Identifier(table))
                    )
            except psycopg.DatabaseError as error:
                if connection_lost(conn, error):
                    raise  # the database, not this subscriber
                # Denied, an unknown role, a dropped table, a policy that raises or runs
                # past the statement timeout (QueryCanceled): this subscriber's answer.
                return database_error_text(error)
        return None


def context_statement(claims: Claims) -> sql.Composed:
    """The statements that make the transaction act as the subscriber, as the reference sets it up.

    ``SET LOCAL ROLE``, then ``request.jwt.claims`` and the
    ``request.jwt.claim.sub`` / ``.role`` settings policies read, and a
    ``statement_timeout`` (``check_timeout_ms``) so that one slow policy
    cannot hold up joins or deliveries (it counts as denied). The role is an
    identifier and the values are quoted literals (no parameters), so these
    statements can travel with others in one round trip.
    """
    return sql.SQL(
        "SET LOCAL ROLE {ident}; SELECT set_config('request.jwt.claims', {claims}, true),"
        " set_config('request.jwt.claim.sub', {sub}, true), set_config('request.jwt.claim.role', {role}, true),"
        " set_config('statement_timeout', {timeout}, true)"
    ).format(
        ident=sql.Identifier(claims.role),
        role=sql.Literal(claims.role),
        claims=sql.Literal(json.dumps(claims.raw)),
        sub=sql.Literal(claims.sub or ""),
        timeout=sql.Literal(str(check_timeout_ms())),
    )


async def set_request_context(conn: psycopg.AsyncConnection[Any], claims: Claims) -> None:
    """Inside a transaction: become the subscriber's role with its claims visible to policies."""
    await conn.execute(context_statement(claims))


def database_error_text(error: psycopg.Error) -> str:
    """``ERROR 42501 (insufficient_privilege) permission denied for table x``, as the reference words it."""
    code = error.sqlstate or "XX000"
    name = type(error).__name__
    condition = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    message = error.diag.message_primary or str(error)
    return f"ERROR {code} ({condition}) {message}"


def _unable(binding: Binding, detail: str) -> BindingError:
    return BindingError(
        "Unable to subscribe to changes with given parameters. An exception happened so please check your "
        f"connect parameters: {binding.describe()}. Exception: {detail}"
    )


async def authorize_binding(
    db: Database, binding: Binding, claims: Claims, published: frozenset[tuple[str, str]] | None = None
) -> AuthorizedBinding:
    """Run the database checks for one binding.

    Raises:
        BindingError: with the reference's subscribe-time message.
    """
    conditions: tuple[Condition, ...] = ()
    if binding.filter is not None:
        try:
            conditions = parse_filter(binding.filter)
        except FilterError as error:
            if error.postgres_error is None:
                raise BindingError(error.message) from None
            raise _unable(binding, error.postgres_error) from None
    if published is None:
        published = await db.published_tables()
    tables = tuple(
        sorted(
            (schema, table)
            for schema, table in published
            if binding.schema in (WILDCARD, schema) and binding.table in (WILDCARD, table)
        )
    )
    if not tables:
        raise BindingError(
            "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the "
            f"given connect parameters: {binding.describe()}"
        )
    matcher = None
    selected: frozenset[str] | None = None
    if not binding.wildcard:
        schema, table = tables[0]
        columns = await db.columns(schema, table, claims.role)
        # PROTOCOL.md 4.3: a column the role cannot SELECT is as good as absent.
        types = {c.name: c.type for c in columns if c.readable}
        for name in binding.select or ():
            if name not in types:
                raise _unable(binding, f"ERROR P0001 (raise_exception) invalid column for select {name}")
        if binding.select:
            # PROTOCOL.md 4.1: primary key columns are always kept.
            selected = frozenset(binding.select) | frozenset(await db.primary_key(schema, table))
        if conditions:
            try:
                matcher = compile_conditions(conditions, types)
            except FilterError as error:
                # The reference finds these in the database, hence the wrapping.
                raise _unable(binding, error.postgres_error or error.message) from None
    allowed = []
    readable: dict[tuple[str, str], frozenset[str]] = {}
    for schema, table in tables:
        denied = await db.can_select(claims, schema, table)
        if denied is None:
            allowed.append((schema, table))
            table_columns = columns if not binding.wildcard else await db.columns(schema, table, claims.role)
            if not all(c.readable for c in table_columns):
                readable[(schema, table)] = frozenset(c.name for c in table_columns if c.readable)
        elif not binding.wildcard:
            raise _unable(binding, denied)
    if not allowed:
        raise _unable(binding, "ERROR 42501 (insufficient_privilege) permission denied for every table")
    return AuthorizedBinding(binding, tuple(allowed), matcher, selected, readable)


def get_database() -> Database:
    """The running event loop's ``Database``, owned by its runtime (pools belong to one loop)."""
    from realtime.runtime import get_runtime

    return get_runtime().database


_checker = RowChecker()


async def check_rows(claim_sets: Mapping[str, Claims], schema: str, table: str, keys: list[bytes]) -> Verdicts:
    """A server process's own check (``realtime.hub``'s ``row_check``), on its check connection."""
    async with get_database().check_connection() as conn:
        return await _checker.check(conn, claim_sets, schema, table, keys, own_connection=True)
