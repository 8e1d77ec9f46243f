"""The change path under faults (issue #10), in-process: real PostgreSQL slot -> listener -> Redis -> hub -> socket.

- a policy that runs past the check's statement timeout denies only its own
  subscriber, who is told so in a ``system`` error; everyone else's changes go
  on flowing and the slot advances (at join time the timeout is a denial);
- ``numeric`` filters compare every digit;
- a role that cannot read the primary key gets ``Error 401`` events, and a
  bytea primary key is matched by the RLS lookup.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from decimal import Decimal

import psycopg
import pytest
from psycopg import sql

from tests.integration.conftest import dsn, execute, token
from tests.integration.test_postgres_changes import insert, subscribe
from tests.integration.test_rls import USER_A, USER_B, binding, listener, received_ids, replicator  # noqa: F401

pytestmark = pytest.mark.integration

SLOW, FAST = USER_A, USER_B
CHECK_TIMEOUT_MS = 300
TIMEOUT_TEXT = "ERROR 57014 (query_canceled) canceling statement due to statement timeout"


def create_table(publication: str, columns: str, *extra: sql.SQL, **names: sql.Composable) -> Iterator[str]:
    """A published table (``extra`` statements name it ``{ident}``); dropped when the generator resumes."""
    name = f"faults_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier("public", name)
    execute(
        sql.SQL("CREATE TABLE {} (" + columns + ")").format(ident),
        *(statement.format(ident=ident, **names) for statement in extra),
        sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(publication), ident),
    )
    yield name
    execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))


@pytest.fixture
def slow_policy_table(publication, settings) -> Iterator[str]:
    """An owner-policy table whose policy sleeps 6 s for SLOW only, past a short check timeout."""
    settings.REALTIME_CHECK_TIMEOUT_MS = CHECK_TIMEOUT_MS
    yield from create_table(
        publication, "id bigint PRIMARY KEY, user_id uuid, body text",
        sql.SQL("GRANT SELECT ON {ident} TO authenticated"),
        sql.SQL("ALTER TABLE {ident} ENABLE ROW LEVEL SECURITY"),
        sql.SQL(
            "CREATE POLICY owner ON {ident} FOR SELECT TO authenticated USING ("
            " CASE WHEN auth.uid() = " + sql.Literal(SLOW).as_string(None) + " THEN pg_sleep(6) IS NOT NULL"
            " ELSE true END AND user_id = auth.uid())"
        ),
    )


def wal_position() -> str:
    with psycopg.connect(dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        return str(row[0])


async def slot_passes(slot: str, lsn: str, timeout: float = 10.0) -> bool:
    """Whether the slot's confirmed_flush_lsn moves past ``lsn`` within ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        with psycopg.connect(dsn(), autocommit=True) as conn:
            row = conn.execute(
                "SELECT confirmed_flush_lsn > %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s", (lsn, slot)
            ).fetchone()
        if row is not None and row[0]:
            return True
        await asyncio.sleep(0.1)
    return False


# --- 1. a policy check that times out ---------------------------------------------------------


async def test_a_policy_past_the_statement_timeout_denies_only_its_user_and_the_stream_goes_on(
    connect, slow_policy_table, listener, caplog  # noqa: F811
) -> None:
    caplog.set_level(logging.WARNING)
    slow = await connect(apikey=token("authenticated", sub=SLOW))
    fast = await connect(apikey=token("authenticated", sub=FAST))
    await subscribe(slow, "realtime:slow", binding(slow_policy_table))
    await subscribe(fast, "realtime:fast", binding(slow_policy_table))
    before = wal_position()
    loop = asyncio.get_running_loop()
    for n in range(3):  # the stream goes on: every round arrives as fast as the first
        started = loop.time()
        insert(slow_policy_table, {"id": 10 * n + 1, "user_id": SLOW, "body": "s"}, {"id": 10 * n + 2, "user_id": FAST, "body": "f"})
        frame = await fast.recv_event("postgres_changes", timeout=10)
        latency = loop.time() - started
        assert frame[4]["data"]["record"]["id"] == 10 * n + 2
        assert latency < 2.0, f"round {n}: {latency:.2f}s"
        system = await slow.recv_event("system", timeout=10)
        assert system[4] == {"message": TIMEOUT_TEXT, "status": "error", "extension": "postgres_changes", "channel": "slow"}
    # The slow user never sees a row (only, perhaps, more system errors for the same runs).
    while not await slow.nothing(0.8):
        assert (await slow.recv())[3] == "system"
    assert await slot_passes(listener.slot, before)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "row level security check failed" in r.getMessage()]
    assert warnings and TIMEOUT_TEXT in warnings[0].getMessage()


async def test_a_statement_timeout_at_join_is_reported_as_the_denial_it_is(connect, publication, settings) -> None:
    settings.REALTIME_CHECK_TIMEOUT_MS = CHECK_TIMEOUT_MS
    # A STABLE function in a policy is evaluated by the planner, so the join-time
    # ``SELECT ... LIMIT 0`` runs it: it sleeps for SLOW only.
    function = sql.Identifier("public", f"slow_uid_{uuid.uuid4().hex[:8]}")
    execute(
        sql.SQL(
            "CREATE FUNCTION {}() RETURNS uuid LANGUAGE plpgsql STABLE AS $$ BEGIN"
            " IF auth.uid() = {} THEN PERFORM pg_sleep(6); END IF; RETURN auth.uid(); END $$"
        ).format(function, sql.Literal(SLOW)),
        sql.SQL("GRANT EXECUTE ON FUNCTION {}() TO authenticated").format(function),
    )
    tables = create_table(
        publication, "id bigint PRIMARY KEY, user_id uuid",
        sql.SQL("GRANT SELECT ON {ident} TO authenticated"),
        sql.SQL("ALTER TABLE {ident} ENABLE ROW LEVEL SECURITY"),
        sql.SQL("CREATE POLICY owner ON {ident} FOR SELECT TO authenticated USING (user_id = {function}())"),
        function=function,
    )
    table = next(tables)
    try:
        fast = await connect(apikey=token("authenticated", sub=FAST))
        await subscribe(fast, "realtime:fast", binding(table))
        slow = await connect(apikey=token("authenticated", sub=SLOW))
        reply = await slow.join("realtime:slow", {"postgres_changes": binding(table)})
        assert reply[4]["status"] == "ok"
        system = await slow.recv_event("system", timeout=10)
        assert system[4]["status"] == "error"
        assert system[4]["message"].startswith(
            "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: "
        )
        assert system[4]["message"].endswith(f"Exception: {TIMEOUT_TEXT}")
    finally:
        next(tables, None)
        execute(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(function))


# --- 2. exact numerics ------------------------------------------------------------------------


@pytest.fixture
def prices(publication) -> Iterator[str]:
    yield from create_table(
        publication, "id bigint PRIMARY KEY, price numeric", sql.SQL("GRANT SELECT ON {ident} TO anon"),
    )


async def test_a_numeric_filter_matches_its_twenty_digit_row_and_not_its_neighbour(connect, prices, replicator) -> None:  # noqa: F811
    client = await connect()
    await subscribe(client, "realtime:prices", [{"event": "*", "schema": "public", "table": prices, "filter": "price=eq.12345678901234567.89"}])
    insert(prices, {"id": 1, "price": Decimal("12345678901234567.89")}, {"id": 2, "price": Decimal("12345678901234567.88")})
    assert await received_ids(client) == [1]


# --- 3. Error 401 and bytea keys --------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["plain", "rls"])
def key_hidden_table(request, publication) -> Iterator[str]:
    """``authenticated`` may read ``body`` but not the primary key ``id``."""
    extra = [sql.SQL("GRANT SELECT (body) ON {ident} TO authenticated")]
    if request.param:
        extra += [
            sql.SQL("ALTER TABLE {ident} ENABLE ROW LEVEL SECURITY"),
            sql.SQL("CREATE POLICY everyone ON {ident} FOR SELECT TO authenticated USING (true)"),
        ]
    yield from create_table(publication, "id bigint PRIMARY KEY, body text", *extra)


async def test_a_role_that_cannot_read_the_key_gets_error_401_events(connect, key_hidden_table, listener) -> None:  # noqa: F811
    client = await connect(apikey=token("authenticated", sub=USER_A))
    await subscribe(client, "realtime:hidden", binding(key_hidden_table))
    ident = sql.Identifier("public", key_hidden_table)
    insert(key_hidden_table, {"id": 1, "body": "x"})
    execute(sql.SQL("UPDATE {} SET body = 'y' WHERE id = 1").format(ident))
    error = {"schema": "public", "table": key_hidden_table, "columns": [], "commit_timestamp": None, "record": {},
             "errors": ["Error 401: Unauthorized"]}
    first = await client.recv_event("postgres_changes", timeout=10)
    assert first[4]["data"] == {**error, "type": "INSERT"}
    second = await client.recv_event("postgres_changes", timeout=10)
    assert second[4]["data"] == {**error, "type": "UPDATE", "old_record": {}}
    assert await client.nothing(0.8)  # neither the rows nor a failed-check system error


async def test_a_bytea_primary_key_is_matched_by_the_rls_lookup(connect, publication, listener) -> None:  # noqa: F811
    tables = create_table(
        publication, "id bytea PRIMARY KEY, user_id uuid, body text",
        sql.SQL("GRANT SELECT ON {ident} TO authenticated"),
        sql.SQL("ALTER TABLE {ident} ENABLE ROW LEVEL SECURITY"),
        sql.SQL("CREATE POLICY owner ON {ident} FOR SELECT TO authenticated USING (user_id = auth.uid())"),
    )
    table = next(tables)
    try:
        a = await connect(apikey=token("authenticated", sub=USER_A))
        await subscribe(a, "realtime:bytes", binding(table))
        insert(table, {"id": b"\x01\x02", "user_id": USER_A, "body": "mine"}, {"id": b"\x03\x04", "user_id": USER_B, "body": "theirs"})
        frame = await a.recv_event("postgres_changes", timeout=10)
        assert frame[4]["data"]["record"] == {"id": "0102", "user_id": USER_A, "body": "mine"}
        assert await a.nothing(0.8)
    finally:
        next(tables, None)
