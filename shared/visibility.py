"""Which changed rows each claim set may see: one database call per run of changes, for every claim set.

PROTOCOL.md 4.4: on a table with row level security, an INSERT or UPDATE
reaches a subscriber only if the subscriber's role, with its JWT claims set,
can SELECT the row as it is now. The reference asks once per subscriber and
change (its ``apply_rls`` loops over subscriptions inside PostgreSQL); here
one call of ``realtime.check_visibility`` (``realtime.dbsetup``) answers for
a whole run of changes and every claim set subscribed to the table. Inside
PostgreSQL, per claim set and in a block that is always rolled back (so what
one claim set's policies do never reaches another's), it sets the role and
the ``request.jwt.claims`` settings and runs the table's lookup::

    SELECT array_agg(t.o) FROM unnest($1::pk_type[]) WITH ORDINALITY AS t(v, o)
     WHERE EXISTS (SELECT 1 FROM schema.table r WHERE r.pk = t.v)

The lookup is prepared once per connection and table (``PREPARE``, composed
with ``sql.Identifier``; the types spelled by the catalog's ``format_type``,
never by a client) and run with a generic plan, so PostgreSQL plans it once
per role rather than once per claim set; claim sets are sent sorted by role
for that reason. The keys travel as one bound text parameter: an array
literal of the key type when the primary key has one column (each value
quoted, ``array_literal``), else a JSON array that the lookup reads with
``jsonb_to_record`` (a composite key). The typed array halves the cost of a
key per claim set against ``jsonb_to_record`` (1,000 claim sets x 100 keys:
125-186 ms against 318-390 ms in PostgreSQL, measured side by side).

Failures deny only their own claim set, for that run: a policy that raises
(or a role that does not exist, a claim that does not cast) is caught in its
claim set's block and reported with its SQLSTATE; the caller sends its
channels a ``system`` error. The time budget is per claim set, as when each
claim set had its own query: the call runs under ``statement_timeout`` =
``REALTIME_CHECK_TIMEOUT_MS``. When it fires, the claim set being checked is
denied (ERROR 57014) if it was the first of the call, so it had the whole
budget to itself; otherwise the call stops there and the next call starts
with that claim set, with a fresh budget. So a claim set is denied for time
only if its own check ran the full budget, a call makes progress every time,
and each slow claim set delays the run by at most about twice the budget
(its own, plus the claim sets checked before it in the interrupted call).
Claim sets that timed out are sent last in later runs, so the others are
checked before the budget is spent on them.

Only losing the connection raises the psycopg error itself: the caller
retries the whole batch.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import errors, sql

from shared import metrics
from shared.database import check_timeout_ms, connection_lost
from core.jwt import Claims

logger = logging.getLogger(__name__)

ROLE_CACHE_S = 60.0
SLOW_MEMORY_S = 60.0  # how long a claim set that timed out is checked after the others
QUERY_CANCELED = "57014"
MISSING_STATEMENT = "26000"  # invalid_sql_statement_name: the prepared lookup is gone from the session
# The lookup itself is wrong (a key column dropped or retyped, the statement gone): prepare it again next time.
STALE_LOOKUP = frozenset({"26000", "42703", "42P01", "42804", "42883", "0A000"})
UNABLE_TO_CHECK = "Realtime was unable to check row level security for this change"
_statement_ids = itertools.count(1)  # prepared statement names: unique in the process, whichever checker prepares


@dataclass(frozen=True, slots=True)
class Verdicts:
    """One run's answers: claim set -> one byte per key (1 = visible), and claim set -> failure message.

    A claim set whose check failed is in ``failed`` only: it sees nothing of the run.
    """

    visible: dict[str, bytes] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    # The failed claim sets whose statement raised (a policy error), not ran out of time or reached
    # no database: a check of fewer rows may answer them (``realtime.hub``'s batched checks).
    raised: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class CallResult:
    """What one ``check_visibility`` call answered, by position (0-based) in the claim sets it was sent."""

    seen: dict[int, list[int]]  # position -> 0-based indexes of the keys it sees
    errors: dict[int, tuple[str, str]]  # position -> (sqlstate, message)
    resume: int | None  # first position not checked (the timeout fired); None: all were


def read_call(rows: Iterable[Sequence[Any]], sent: int, keys: int) -> CallResult:
    """Turn the rows of one call (claim_set, visible, error, sqlstate; 1-based) into a ``CallResult``.

    Positions or key ordinals outside what was sent are ignored, so a wrong
    answer can only hide rows, never show one.
    """
    seen: dict[int, list[int]] = {}
    failures: dict[int, tuple[str, str]] = {}
    resume: int | None = None
    for claim_set, visible, error, sqlstate in rows:
        position = int(claim_set) - 1
        if not 0 <= position < sent:
            continue
        if visible is not None:
            seen[position] = sorted({int(o) - 1 for o in visible if 1 <= int(o) <= keys})
        elif error is not None:
            failures[position] = (str(sqlstate or "XX000"), str(error))
        elif resume is None or position < resume:
            resume = position
    if resume is not None:
        # What the call says after the point it stopped at is not an answer.
        seen = {p: s for p, s in seen.items() if p < resume}
        failures = {p: e for p, e in failures.items() if p < resume}
    return CallResult(seen, failures, resume)


def verdict_bytes(seen: Iterable[int], keys: int) -> bytes:
    """One byte per key: 1 at the 0-based indexes in ``seen``, else 0."""
    verdict = bytearray(keys)
    for index in seen:
        if 0 <= index < keys:
            verdict[index] = 1
    return bytes(verdict)


def error_text(sqlstate: str, message: str) -> str:
    """``ERROR 57014 (query_canceled) canceling statement ...``, as ``database_error_text`` words it."""
    try:
        name = errors.lookup(sqlstate).__name__
        condition = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    except KeyError:
        condition = "unknown"
    return f"ERROR {sqlstate} ({condition}) {message}"


def array_literal(values: Sequence[str]) -> str:
    """A PostgreSQL array literal of ``values``: each quoted, with ``\\`` and ``"`` escaped (never NULL)."""
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def check_order(claim_sets: Mapping[str, Claims], slow: Iterable[str] = ()) -> list[str]:
    """The order claim sets are sent in: known-slow ones last, then by role (one plan per role)."""
    late = set(slow)
    return sorted(claim_sets, key=lambda c: (c in late, claim_sets[c].role, c))


class RowChecker:
    """Visibility checks: remembers which roles bypass RLS, key types, and each connection's prepared lookups."""

    def __init__(self) -> None:
        self._bypass: dict[str, tuple[bool, float]] = {}
        self._types: dict[tuple[str, str], tuple[dict[str, str], float]] = {}
        # connection -> (schema, table, key columns with types) -> prepared statement name
        self._lookups: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], str]] = weakref.WeakKeyDictionary()
        self._timeouts: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._slow: dict[str, float] = {}  # claim set -> when its check last ran out of time
        # id(claims) -> (claims, their JSON): the same Claims objects come back run after run.
        self._encoded: dict[int, tuple[Claims, str]] = {}
        self.queries = 0  # database calls that checked rows (round trips of check_visibility)
        self.checks = 0  # claim-set checks those calls ran

    async def check(
        self,
        conn: psycopg.AsyncConnection[Any],
        claim_sets: Mapping[str, Claims],
        schema: str,
        table: str,
        keys: Sequence[bytes],
        *,
        own_connection: bool = False,
    ) -> Verdicts:
        """Which keys each claim set may SELECT now; failed claim sets in ``failed``, with their message.

        ``own_connection``: the connection runs nothing else, so the statement
        timeout is set once for its session and each call is a single
        statement; otherwise each call runs in a transaction of its own that
        sets it locally (a pooled connection shared with joins).

        Raises:
            psycopg.Error: the connection was lost (``connection_lost``); retry later.
        """
        result = Verdicts()
        if not claim_sets:
            return result
        if not keys:
            result.visible.update((c, b"") for c in claim_sets)
            return result
        pending: dict[str, Claims] = {}
        for claim_set, claims in claim_sets.items():
            if await self._bypasses(conn, claims.role):
                result.visible[claim_set] = b"\x01" * len(keys)
            else:
                pending[claim_set] = claims
        if not pending:
            return result
        rows = [json.loads(key) for key in keys]
        names = tuple(rows[0])
        if not names:
            result.visible.update((c, bytes(len(keys))) for c in pending)
            return result
        # One key column whose values are text (as PostgreSQL printed them): a typed array, else JSON.
        single = len(names) == 1 and all(isinstance(row.get(names[0]), str) for row in rows)
        argument = array_literal([row[names[0]] for row in rows]) if single else json.dumps(rows)
        now = time.monotonic()
        self._slow = {c: at for c, at in self._slow.items() if now - at < SLOW_MEMORY_S}
        order = check_order(pending, self._slow)
        try:
            lookup = await self._lookup(conn, schema, table, names, single)
        except (psycopg.Error, KeyError) as error:  # KeyError: the key's columns changed under the cache
            if isinstance(error, psycopg.Error) and connection_lost(conn, error):
                raise
            self._forget(conn, schema, table)
            if isinstance(error, psycopg.Error):
                message = error_text(error.sqlstate or "XX000", error.diag.message_primary or str(error))
            else:
                message = f"unknown key column {error} of {schema}.{table}"
            for claim_set in order:
                self._failed(result, claim_set, pending[claim_set], schema, table, message)
            return result
        start = 0
        prepared_again = False
        while start < len(order):
            batch = order[start:]
            started = time.perf_counter()
            try:
                answer = await self._call(conn, lookup, argument, [pending[c] for c in batch], len(keys), own_connection)
            except psycopg.Error as error:
                if connection_lost(conn, error):
                    raise
                # The call itself failed (not one claim set's policy): every claim set it was for is denied.
                self._forget(conn, schema, table)
                message = error_text(error.sqlstate or "XX000", error.diag.message_primary or str(error))
                for claim_set in batch:
                    self._failed(result, claim_set, pending[claim_set], schema, table, message)
                break
            finally:
                self.queries += 1
                metrics.rls_queries.inc()
                metrics.rls_query_seconds.observe(time.perf_counter() - started)
            first = answer.errors.get(0)
            if first is not None and first[0] == MISSING_STATEMENT and not prepared_again:
                # The session lost the prepared lookup (psycopg sends DEALLOCATE ALL after a ROLLBACK
                # once it has prepared statements of its own; a pooler may DISCARD ALL): prepare it
                # again and ask once more, rather than deny these claim sets this run.
                prepared_again = True
                self._forget(conn, schema, table)
                try:
                    lookup = await self._lookup(conn, schema, table, names, single)
                except (psycopg.Error, KeyError) as error:
                    if isinstance(error, psycopg.Error) and connection_lost(conn, error):
                        raise
                    self._forget(conn, schema, table)
                    for claim_set in batch:
                        self._failed(result, claim_set, pending[claim_set], schema, table, UNABLE_TO_CHECK)
                    break
                continue
            checked = len(batch) if answer.resume is None else answer.resume
            self.checks += checked
            stale = False
            nothing = bytes(len(keys))  # one object for every claim set that sees none of the keys
            for position in range(checked):
                claim_set = batch[position]
                failure = answer.errors.get(position)
                if failure is None:
                    seen = answer.seen.get(position)
                    result.visible[claim_set] = verdict_bytes(seen, len(keys)) if seen else nothing
                    continue
                sqlstate, message = failure
                stale = stale or sqlstate in STALE_LOOKUP
                if sqlstate == QUERY_CANCELED:
                    self._slow[claim_set] = time.monotonic()
                else:
                    result.raised.add(claim_set)
                self._failed(result, claim_set, pending[claim_set], schema, table, error_text(sqlstate, message))
            if stale:
                self._forget(conn, schema, table)
            if checked == 0:  # cannot happen (the first claim set of a call is always answered); never loop on it
                for claim_set in batch:
                    self._failed(result, claim_set, pending[claim_set], schema, table, UNABLE_TO_CHECK)
                break
            start += checked
        return result

    def _failed(self, result: Verdicts, claim_set: str, claims: Claims, schema: str, table: str, message: str) -> None:
        logger.warning(
            "row level security check failed for role=%s sub=%s on %s.%s; not delivering this run to it: %s",
            claims.role, claims.sub, schema, table, message,
        )
        result.failed[claim_set] = message

    async def _call(
        self,
        conn: psycopg.AsyncConnection[Any],
        lookup: str,
        argument: str,
        claims: list[Claims],
        keys: int,
        own_connection: bool,
    ) -> CallResult:
        """One ``check_visibility`` call for ``claims``, under the check timeout."""
        # Binary arrays: psycopg quotes each element of a text array with a regex (20 ms per 400 claim sets).
        statement = "SELECT claim_set, visible, error, sqlstate FROM realtime.check_visibility(%s, %s, %b, %b, %b)"
        params = (lookup, argument, [c.role for c in claims], self._claims_json(claims), [c.sub or "" for c in claims])
        timeout = check_timeout_ms()
        if own_connection:
            if self._timeouts.get(conn) != timeout:
                await conn.execute("SELECT set_config('statement_timeout', %s, false)", (str(timeout),))
                self._timeouts[conn] = timeout
            cursor = await conn.execute(statement, params)
            rows = await cursor.fetchall()
        else:
            async with conn.transaction(force_rollback=True):
                await conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(timeout),))
                cursor = await conn.execute(statement, params)
                rows = await cursor.fetchall()
        return read_call(rows, len(claims), keys)

    def _claims_json(self, claims: list[Claims]) -> list[str]:
        """Each claim set's claims as JSON, encoded once per Claims object (1,000 claim sets: 5 ms a call)."""
        if len(self._encoded) > 4 * len(claims) + 1000:
            self._encoded.clear()
        out = []
        for c in claims:
            known = self._encoded.get(id(c))
            if known is None or known[0] is not c:
                known = self._encoded[id(c)] = (c, json.dumps(c.raw))
            out.append(known[1])
        return out

    async def _lookup(
        self, conn: psycopg.AsyncConnection[Any], schema: str, table: str, names: tuple[str, ...], single: bool
    ) -> str:
        """The name of this connection's prepared lookup of ``names`` in ``schema.table`` (preparing it if needed).

        ``single``: the keys come as an array literal of the one key column's type, else as JSON.
        """
        types = await self._key_types(conn, schema, table)
        columns = tuple((name, types[name]) for name in names)
        prepared = self._lookups.setdefault(conn, {})
        key = (schema, table, columns, single)
        name = prepared.get(key)
        if name is not None:
            return name
        name = f"realtime_rls_{next(_statement_ids)}"
        target = sql.Identifier(schema, table)
        if single:
            statement = sql.SQL(
                "PREPARE {name} (text) AS SELECT array_agg(t.o::integer)"
                " FROM unnest($1::{type}[]) WITH ORDINALITY AS t(v, o)"
                " WHERE EXISTS (SELECT 1 FROM {target} r WHERE r.{column} = t.v)"
            ).format(name=sql.Identifier(name), type=sql.SQL(columns[0][1]), target=target, column=sql.Identifier(names[0]))
        else:
            match = sql.SQL(" AND ").join(sql.SQL("r.{0} = k.{0}").format(sql.Identifier(n)) for n in names)
            record = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t)) for n, t in columns)
            statement = sql.SQL(
                "PREPARE {name} (jsonb) AS SELECT array_agg(e.o::integer)"
                " FROM jsonb_array_elements($1) WITH ORDINALITY AS e(j, o)"
                " CROSS JOIN LATERAL jsonb_to_record(e.j) AS k({record})"
                " WHERE EXISTS (SELECT 1 FROM {target} r WHERE {match})"
            ).format(name=sql.Identifier(name), record=record, target=target, match=match)
        await conn.execute(statement)
        for old in [k for k in prepared if k[:2] == (schema, table)]:  # the same table's previous key shape
            await conn.execute(sql.SQL("DEALLOCATE {}").format(sql.Identifier(prepared.pop(old))))
        prepared[key] = name
        return name

    def _forget(self, conn: psycopg.AsyncConnection[Any], schema: str, table: str) -> None:
        """Read the table's key types and prepare its lookup again next time."""
        self._types.pop((schema, table), None)
        prepared = self._lookups.get(conn)
        if prepared is not None:
            for key in [k for k in prepared if k[:2] == (schema, table)]:
                del prepared[key]  # left prepared on the session: the name is never reused

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
        """Superusers and BYPASSRLS roles (``service_role``) see every row: no check for them."""
        now = time.monotonic()
        known = self._bypass.get(role)
        if known is not None and now - known[1] < ROLE_CACHE_S:
            return known[0]
        cursor = await conn.execute("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = %s", (role,))
        row = await cursor.fetchone()
        bypass = bool(row and row[0])
        self._bypass[role] = (bypass, now)
        return bypass
