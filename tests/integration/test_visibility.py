"""``RowChecker`` and ``realtime.check_visibility`` against the real PostgreSQL (issue #11).

One call checks every claim set; a failing or slow policy costs only its own
claim set; what one claim set's policies do never reaches the next one.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from core.jwt import Claims
from shared.visibility import RowChecker
from tests.integration.conftest import dsn, execute

pytestmark = pytest.mark.integration

TIMEOUT_MS = 300
TIMEOUT_TEXT = "ERROR 57014 (query_canceled) canceling statement due to statement timeout"


def user(n: int) -> str:
    return str(uuid.UUID(int=n))


def claims(sub: str, role: str = "authenticated", **extra: Any) -> Claims:
    return Claims(role=role, exp=4_102_444_800, sub=sub, raw={"role": role, "sub": sub, "exp": 4_102_444_800, **extra})


@pytest.fixture
def owned(realtime_schema: None, settings) -> Iterator[str]:
    """Rows 1..4 owned by users 1..4; the policy sleeps 2 s for a token with ``slow``, and notices leaks."""
    settings.REALTIME_CHECK_TIMEOUT_MS = TIMEOUT_MS
    name = f"vis_{uuid.uuid4().hex[:8]}"
    ident, audit = sql.Identifier("public", name), sql.Identifier("public", f"{name}_audit")
    probe = sql.Identifier("public", f"{name}_probe")
    execute(
        sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, owner uuid)").format(ident),
        sql.SQL("CREATE TABLE {} (sub text)").format(audit),
        sql.SQL("GRANT SELECT ON {} TO authenticated").format(ident),
        sql.SQL("GRANT SELECT, INSERT ON {} TO authenticated").format(audit),
        # Sees a setting or a row left by another claim set's check: answers false, so the leak shows as a denial.
        sql.SQL(
            "CREATE FUNCTION {probe}() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$ BEGIN"
            " IF coalesce(current_setting('test.left_behind', true), '') <> '' OR EXISTS (SELECT 1 FROM {audit}) THEN"
            "   RETURN false; END IF;"
            " PERFORM set_config('test.left_behind', auth.uid()::text, false);"
            " INSERT INTO {audit} VALUES (auth.uid()::text);"
            " RETURN true; END $$"
        ).format(probe=probe, audit=audit),
        sql.SQL("GRANT EXECUTE ON FUNCTION {}() TO authenticated").format(probe),
        sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(ident),
        sql.SQL(
            "CREATE POLICY owner ON {} FOR SELECT TO authenticated USING ("
            " CASE WHEN auth.jwt() ->> 'slow' = 'yes' THEN pg_sleep(2) IS NULL ELSE owner = auth.uid() AND {}() END)"
        ).format(ident, probe),
    )
    with psycopg.connect(dsn(), autocommit=True) as conn:
        for n in range(1, 5):
            conn.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(ident), (n, user(n)))
    yield name
    execute(
        sql.SQL("DROP TABLE IF EXISTS {}, {}").format(ident, audit),
        sql.SQL("DROP FUNCTION IF EXISTS {}()").format(probe),
    )


@pytest.fixture
async def conn() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    connection = await psycopg.AsyncConnection.connect(dsn(), autocommit=True)
    yield connection
    await connection.close()


KEYS = [b'{"id":"1"}', b'{"id":"2"}', b'{"id":"3"}', b'{"id":"4"}', b'{"id":"5"}']


@pytest.mark.parametrize("own_connection", [True, False], ids=["own-connection", "pooled"])
async def test_one_call_answers_every_claim_set_and_nothing_leaks_between_them(owned, conn, own_connection) -> None:
    checker = RowChecker()
    sets = {f"c{n}": claims(user(n)) for n in range(1, 5)}
    sets["service"] = claims(user(1), role="service_role")
    sets["nobody"] = claims(user(7))
    verdicts = await checker.check(conn, sets, "public", owned, KEYS, own_connection=own_connection)
    assert verdicts.failed == {}
    assert verdicts.visible == {
        "c1": b"\x01\x00\x00\x00\x00", "c2": b"\x00\x01\x00\x00\x00", "c3": b"\x00\x00\x01\x00\x00",
        "c4": b"\x00\x00\x00\x01\x00", "nobody": b"\x00" * 5,
        "service": b"\x01" * 5,  # BYPASSRLS: not sent to the database
    }
    assert (checker.queries, checker.checks) == (1, 5)
    # The session is itself again: its role, and nothing the policies wrote or set.
    row = await (await conn.execute("SELECT current_user, current_setting('test.left_behind', true)")).fetchone()
    assert row is not None and row[0] == "postgres" and not row[1]
    audit = await (await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("public", f"{owned}_audit")))).fetchone()
    assert audit == (0,)


async def test_a_session_that_lost_its_prepared_lookup_prepares_it_again_and_denies_no_one(owned, conn) -> None:
    """psycopg sends DEALLOCATE ALL after a ROLLBACK once it has prepared statements of its own (the pooled path
    rolls back every call); a pooler may DISCARD ALL. The next check must prepare its lookup again, not deny."""
    checker = RowChecker()
    sets = {"c1": claims(user(1)), "c2": claims(user(2))}
    first = await checker.check(conn, sets, "public", owned, KEYS, own_connection=False)
    await conn.execute("DEALLOCATE ALL")
    again = await checker.check(conn, sets, "public", owned, KEYS, own_connection=False)
    assert again.failed == {}
    assert again.visible == first.visible == {"c1": b"\x01\x00\x00\x00\x00", "c2": b"\x00\x01\x00\x00\x00"}


async def test_a_policy_error_or_an_unknown_role_denies_only_its_claim_set(owned, conn) -> None:
    checker = RowChecker()
    sets = {"a": claims(user(1)), "bad-sub": claims("not-a-uuid"), "ghost": claims(user(2), role="no_such_role_x"), "b": claims(user(2))}
    verdicts = await checker.check(conn, sets, "public", owned, KEYS, own_connection=True)
    assert verdicts.visible == {"a": b"\x01\x00\x00\x00\x00", "b": b"\x00\x01\x00\x00\x00"}
    assert verdicts.failed == {
        "bad-sub": 'ERROR 22P02 (invalid_text_representation) invalid input syntax for type uuid: "not-a-uuid"',
        "ghost": 'ERROR 22023 (invalid_parameter_value) role "no_such_role_x" does not exist',
    }
    assert verdicts.raised == {"bad-sub", "ghost"}  # a check of fewer rows may answer these
    assert checker.queries == 1


async def test_each_claim_set_has_the_whole_timeout_and_slow_ones_are_checked_last_next_time(owned, conn) -> None:
    checker = RowChecker()
    # Sent in this order (same role: by id): fast, slow, fast, slow, fast.
    slow = {"slow": "yes"}
    sets = {"a": claims(user(1)), "b": claims(user(8), **slow), "c": claims(user(2)), "d": claims(user(9), **slow), "e": claims(user(3))}
    started = time.monotonic()
    verdicts = await checker.check(conn, sets, "public", owned, KEYS[:3], own_connection=True)
    elapsed = time.monotonic() - started
    assert verdicts.failed == {"b": TIMEOUT_TEXT, "d": TIMEOUT_TEXT}
    assert verdicts.raised == set()  # a timeout is not retried with fewer rows
    assert verdicts.visible == {"a": b"\x01\x00\x00", "c": b"\x00\x01\x00", "e": b"\x00\x00\x01"}
    # a | b first: denied | c, d interrupted | d first: denied | e: five calls, each under one timeout.
    assert checker.queries == 5
    assert elapsed < 4 * TIMEOUT_MS / 1000 + 1.0, elapsed
    # Next run: the slow ones go last, so one call answers every fast claim set before the first timeout.
    verdicts = await checker.check(conn, sets, "public", owned, KEYS[:3], own_connection=True)
    assert set(verdicts.failed) == {"b", "d"} and checker.queries == 5 + 3


async def test_text_keys_with_quotes_backslashes_and_braces_are_looked_up_exactly(realtime_schema, conn) -> None:
    name = f"vis_text_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier("public", name)
    odd = ['a"b', "c\\d", "x,y", "{z}", "NULL", " sp ", "ü", "", "\\x01"]
    execute(
        sql.SQL("CREATE TABLE {} (id text PRIMARY KEY, owner uuid)").format(ident),
        sql.SQL("GRANT SELECT ON {} TO authenticated").format(ident),
        sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(ident),
        sql.SQL("CREATE POLICY owner ON {} FOR SELECT TO authenticated USING (owner = auth.uid())").format(ident),
    )
    try:
        with psycopg.connect(dsn(), autocommit=True) as sync:
            for n, key in enumerate(odd):
                sync.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(ident), (key, user(1 + n % 2)))
        keys = [json.dumps({"id": key}).encode() for key in odd + ["missing"]]
        checker = RowChecker()
        verdicts = await checker.check(conn, {"one": claims(user(1)), "two": claims(user(2))}, "public", name, keys)
        assert verdicts.failed == {}
        assert verdicts.visible["one"] == bytes([1, 0, 1, 0, 1, 0, 1, 0, 1, 0])
        assert verdicts.visible["two"] == bytes([0, 1, 0, 1, 0, 1, 0, 1, 0, 0])
    finally:
        execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))
