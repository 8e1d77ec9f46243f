"""Which changed rows a claim set may see: one query per claim set and batch.

PROTOCOL.md 4.4: on a table with row level security, an INSERT or UPDATE
reaches a subscriber only if the subscriber's role, with its JWT claims set,
can SELECT the row as it is now. The reference asks once per subscriber and
change; here one query answers for a whole run of changes and every socket
that shares the claims::

    SELECT e.o FROM jsonb_array_elements($keys) WITH ORDINALITY AS e(j, o)
      CROSS JOIN LATERAL jsonb_to_record(e.j) AS k(pk pk_type, ...)
     WHERE EXISTS (SELECT 1 FROM schema.table r WHERE r.pk = k.pk ...)

run as the subscriber (``context_statement``) in a transaction that is
always rolled back, all of it in one round trip. ``jsonb_to_record`` gives
the key values the key columns' types, so the lookup uses the primary key
index. Names are composed with ``sql.Identifier``, the keys are a quoted
literal, and the types are spelled by the catalog's own ``format_type``
(never by a client).

A check that fails (a policy that raises or runs past the statement
timeout, a claim that does not cast) denies that claim set only, for that
run: it is logged with the database's message and raised as
``RowCheckFailed``, which the caller turns into a ``system`` error for that
claim set's channels. Only losing the connection raises the psycopg error
itself: the caller retries the whole batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from realtime.authorization import connection_lost, context_statement, database_error_text, get_database
from realtime.errors import RowCheckFailed
from realtime.jwt import Claims

logger = logging.getLogger(__name__)

ROLE_CACHE_S = 60.0


class RowChecker:
    """Visibility checks on one connection; remembers which roles bypass RLS."""

    def __init__(self) -> None:
        self._bypass: dict[str, tuple[bool, float]] = {}
        self._types: dict[tuple[str, str], tuple[dict[str, str], float]] = {}
        self.queries = 0  # visibility queries run (benchmarks report it)

    async def visible(
        self, conn: psycopg.AsyncConnection[Any], claims: Claims, schema: str, table: str, keys: Sequence[bytes]
    ) -> bytes:
        """One byte per key: 1 if ``claims`` may SELECT that row now, else 0.

        Raises:
            RowCheckFailed: the check failed for this claim set (policy error, statement timeout).
            psycopg.Error: the connection was lost (``connection_lost``); retry later.
        """
        if not keys:
            return b""
        if await self._bypasses(conn, claims.role):
            return b"\x01" * len(keys)
        rows = [json.loads(key) for key in keys]
        names = list(rows[0])
        if not names:
            return b"\x00" * len(keys)
        target = sql.Identifier(schema, table)
        match = sql.SQL(" AND ").join(
            sql.SQL("r.{0} = k.{0}").format(sql.Identifier(name)) for name in names
        )
        verdict = bytearray(len(keys))
        try:
            types = await self._key_types(conn, schema, table)
            columns = sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(types[name])) for name in names
            )
            # One round trip: open, act as the subscriber, look the rows up, roll back.
            statement = sql.SQL(
                "BEGIN; {context};"
                " SELECT e.o FROM jsonb_array_elements({keys}::jsonb) WITH ORDINALITY AS e(j, o)"
                " CROSS JOIN LATERAL jsonb_to_record(e.j) AS k({columns})"
                " WHERE EXISTS (SELECT 1 FROM {target} r WHERE {match}); ROLLBACK"
            ).format(
                context=context_statement(claims), keys=sql.Literal(json.dumps(rows)), columns=columns,
                target=target, match=match,
            )
            self.queries += 1
            cursor = await conn.execute(statement)
            found: list[Any] = []
            while True:  # the lookup is the last statement that returns rows
                if cursor.description is not None:
                    found = await cursor.fetchall()
                if not cursor.nextset():
                    break
            for (ordinal,) in found:
                verdict[int(ordinal) - 1] = 1
        except (psycopg.Error, KeyError) as error:  # KeyError: the key's columns changed under the cache
            if isinstance(error, psycopg.Error) and connection_lost(conn, error):
                raise
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                await conn.execute("ROLLBACK")  # the failed statement left the transaction open
            if isinstance(error, psycopg.Error):
                message = database_error_text(error)  # e.g. ERROR 57014 (query_canceled) canceling statement ...
            else:
                message = f"unknown key column {error} of {schema}.{table}"
            logger.warning(
                "row level security check failed for role=%s sub=%s on %s.%s; not delivering this run to it: %s",
                claims.role, claims.sub, schema, table, message,
            )
            raise RowCheckFailed(message) from None
        return bytes(verdict)

    async def _key_types(self, conn: psycopg.AsyncConnection[Any], schema: str, table: str) -> dict[str, str]:
        """Column -> SQL type of the table's columns, as ``format_type`` spells them (already quoted).

        The key values are typed from these (``jsonb_to_record``) so that the
        lookup uses the primary key index; only the key columns are converted.
        """
        now = time.monotonic()
        known = self._types.get((schema, table))
        if known is not None and now - known[1] < ROLE_CACHE_S:
            return known[0]
        cursor = await conn.execute(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
            " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped",
            (schema, table),
        )
        types = {str(name): str(spelled) for name, spelled in await cursor.fetchall()}
        self._types[(schema, table)] = (types, now)
        return types

    async def _bypasses(self, conn: psycopg.AsyncConnection[Any], role: str) -> bool:
        """Superusers and BYPASSRLS roles (``service_role``) see every row: no query per change."""
        now = time.monotonic()
        known = self._bypass.get(role)
        if known is not None and now - known[1] < ROLE_CACHE_S:
            return known[0]
        cursor = await conn.execute("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = %s", (role,))
        row = await cursor.fetchone()
        bypass = bool(row and row[0])
        self._bypass[role] = (bypass, now)
        return bypass


_checker = RowChecker()


async def check_rows(claims: Claims, schema: str, table: str, keys: list[bytes]) -> bytes:
    """A server process's own check (``realtime.hub``'s ``row_check``), on its join-time pool.

    Raises:
        RowCheckFailed: as ``RowChecker.visible``.
    """
    async with get_database().connection() as conn:
        return await _checker.visible(conn, claims, schema, table, keys)
