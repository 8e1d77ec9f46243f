"""Private channel authorization: RLS policies on ``realtime.messages`` (PROTOCOL.md 7).

A policy decides by the rows a role may see or insert in ``realtime.messages``
for a sub-topic, so every check asks the database inside a transaction that is
always rolled back, with the context policies read: ``role`` (``SET LOCAL
ROLE``), ``realtime.topic`` (``realtime.topic()``), ``request.jwt.claims``,
``request.jwt.claim.sub`` / ``.role`` and ``request.headers``.

- Read: the connecting (admin) user inserts one probe row per extension, then
  the role selects them; each probe it sees grants that extension's read.
- Write: the role inserts a row; success grants the write.

Each statement the role runs sits in a savepoint, so a policy that denies or
raises costs only its own verdict. A policy error is a denial (logged with the
database's message); losing the connection is not a verdict and propagates.
Values are always bound parameters; the role goes through ``sql.Identifier``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import psycopg

from realtime.authorization import Database, get_database, set_request_context
from core.jwt import Claims
from realtime.protocol.session import Extension, Permissions

logger = logging.getLogger(__name__)

_CONTEXT = "SELECT set_config('realtime.topic', %s, true), set_config('request.headers', %s, true)"
_INSERT = "INSERT INTO realtime.messages (topic, extension, private) VALUES (%s, %s, true)"
_PROBE = _INSERT + " RETURNING id"
_SEE_PROBE = "SELECT 1 FROM realtime.messages WHERE id = %s"


def headers_json(headers: Iterable[tuple[str, str]]) -> str:
    """The ``request.headers`` setting: the ``x-*`` headers as a JSON object, names lower-cased."""
    return json.dumps({name.lower(): value for name, value in headers if name.lower().startswith("x-")})


async def check_policies(
    db: Database,
    claims: Claims,
    sub_topic: str,
    headers: str = "{}",
    read: Iterable[Extension] = (),
    write: Iterable[Extension] = (),
) -> Permissions:
    """Evaluate read and write of the given extensions on ``sub_topic`` as ``claims``.

    Raises:
        psycopg.OperationalError: the database could not be asked (no verdict).
    """
    readable: set[Extension] = set()
    writable: set[Extension] = set()
    async with db.connection() as conn:
        async with conn.transaction(force_rollback=True):
            await conn.execute(_CONTEXT, (sub_topic, headers))
            probes: list[tuple[Extension, Any]] = []
            for extension in read:
                cursor = await conn.execute(_PROBE, (sub_topic, extension.value))
                row = await cursor.fetchone()
                assert row is not None
                probes.append((extension, row[0]))
            try:
                await set_request_context(conn, claims)
            except psycopg.OperationalError:
                raise
            except psycopg.Error as error:  # e.g. a role the database does not know
                logger.info("realtime.messages check as role=%s denied: %s", claims.role, _describe(error))
                return Permissions()
            for extension, probe in probes:
                if await _as_role(conn, _SEE_PROBE, (probe,), claims, f"{extension.value} read of {sub_topic}"):
                    readable.add(extension)
            for extension in write:
                if await _as_role(conn, _INSERT, (sub_topic, extension.value), claims, f"{extension.value} write to {sub_topic}"):
                    writable.add(extension)
    return Permissions(frozenset(readable), frozenset(writable))


async def _as_role(
    conn: psycopg.AsyncConnection[Any], statement: str, params: tuple[Any, ...], claims: Claims, what: str
) -> bool:
    """Run one statement as the role in a savepoint: granted if it succeeds and, for a query, finds a row."""
    try:
        async with conn.transaction():
            cursor = await conn.execute(statement, params)
            return cursor.description is None or await cursor.fetchone() is not None
    except psycopg.errors.InsufficientPrivilege:
        return False
    except psycopg.OperationalError:
        raise
    except psycopg.Error as error:
        logger.warning("a realtime.messages policy failed; %s denied for role=%s: %s", what, claims.role, _describe(error))
        return False


def _describe(error: psycopg.Error) -> str:
    return f"{error.sqlstate} {error.diag.message_primary or error}"


def private_writes(claims: Claims, headers: str) -> Callable[[str], Awaitable[bool]]:
    """``await may_write(sub_topic)``: broadcast write as ``claims``, asked once per sub-topic.

    For one REST request (PROTOCOL.md 5.3). A database that cannot be asked
    denies, logged: the caller has no way to retry a verdict.
    """
    verdicts: dict[str, bool] = {}

    async def may_write(sub_topic: str) -> bool:
        if sub_topic not in verdicts:
            try:
                granted = await check_policies(
                    get_database(), claims, sub_topic, headers, write=(Extension.BROADCAST,)
                )
            except Exception:
                logger.exception("broadcast write check failed topic=%s; denied", sub_topic)
                return False
            verdicts[sub_topic] = Extension.BROADCAST in granted.write
        return verdicts[sub_topic]

    return may_write
