"""Row level security per change and subscriber (PROTOCOL.md 4.4, C45-C47), in-process.

Real PostgreSQL slot -> listener (with the claim-set directory in Redis, or
without it so each server process checks for itself) -> Redis -> hub -> socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from channels.layers import get_channel_layer
from django.conf import settings
from psycopg import sql
from redis.asyncio import Redis

from shared.claimsets import Directory
from replication import listener as listener_module
from replication.listener import Listener
from tests.integration.conftest import dsn, execute, token
from tests.integration.test_postgres_changes import insert, subscribe

pytestmark = pytest.mark.integration

USER_A = "8d0fb3e5-4c35-4a35-9d1e-2c1b5a0e7a11"
USER_B = "1f6c0b52-97a3-4f0e-8a39-5c0e2f4d6b22"


@pytest.fixture
def rls_table(publication) -> Any:
    """A published table with a Supabase-style owner policy for ``authenticated``."""
    name = f"notes_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier("public", name)
    execute(
        sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, user_id uuid, body text)").format(ident),
        sql.SQL("GRANT SELECT ON {} TO anon, authenticated, service_role").format(ident),
        sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(ident),
        # A token with "fail": "yes" makes the policy raise on every row it looks at (body is not a number).
        sql.SQL(
            "CREATE POLICY owner ON {} FOR SELECT TO authenticated USING ("
            " CASE WHEN auth.jwt() ->> 'fail' = 'yes' THEN body::int > 0 ELSE user_id = auth.uid() END)"
        ).format(ident),
        sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(publication), ident),
    )
    yield name
    execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))


@contextlib.asynccontextmanager
async def running_listener(publication: str, with_directory: bool) -> AsyncIterator[Listener]:
    """A running listener; with the directory it checks rows itself, without it each server process does."""
    slot = f"test_{uuid.uuid4().hex[:10]}"
    active = asyncio.Event()
    redis = Redis.from_url(settings.REDIS_URL)
    directory = Directory(redis, settings.REALTIME_REDIS_PREFIX) if with_directory else None
    instance = Listener(dsn(), slot, publication, get_channel_layer(), on_active=active.set, directory=directory)
    stop = asyncio.Event()
    task = asyncio.ensure_future(instance.run(stop))
    try:
        await asyncio.wait_for(active.wait(), 10)
        yield instance
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await redis.aclose()
        execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", params=(slot,))


@pytest.fixture(params=[True, False], ids=["checked-by-replicator", "checked-by-server"])
async def listener(request, publication) -> AsyncIterator[Listener]:
    async with running_listener(publication, request.param) as instance:
        yield instance


@pytest.fixture
async def replicator(publication) -> AsyncIterator[Listener]:
    async with running_listener(publication, True) as instance:
        yield instance


def binding(table: str, event: str = "*") -> list[dict[str, Any]]:
    return [{"event": event, "schema": "public", "table": table}]


async def received_ids(client: Any, timeout: float = 1.5) -> list[int]:
    """The record ids of every change that arrives until ``timeout`` passes quietly."""
    ids = []
    # receive_nothing, not a receive timeout: the test communicator cancels the app on a timeout.
    while not await client.nothing(timeout):
        frame = await client.recv_event("postgres_changes", timeout=timeout)
        data = frame[4]["data"]
        ids.append((data.get("record") or data.get("old_record"))["id"])
    return ids


async def test_each_user_receives_only_the_rows_its_policy_shows(connect, rls_table, listener) -> None:  # C46
    a = await connect(apikey=token("authenticated", sub=USER_A))
    a2 = await connect(apikey=token("authenticated", sub=USER_A))
    b = await connect(apikey=token("authenticated", sub=USER_B))
    anon = await connect()
    service = await connect(apikey=token("service_role"))
    for n, client in enumerate((a, a2, b, anon, service)):
        await subscribe(client, f"realtime:notes{n}", binding(rls_table))
    insert(
        rls_table,
        {"id": 1, "user_id": USER_A, "body": "a1"},
        {"id": 2, "user_id": USER_B, "body": "b2"},
        {"id": 3, "user_id": USER_A, "body": "a3"},
        {"id": 4, "user_id": None, "body": "nobody"},
    )
    assert await received_ids(a) == [1, 3]
    assert await received_ids(a2) == [1, 3]
    assert await received_ids(b) == [2]
    assert await received_ids(service) == [1, 2, 3, 4]
    assert await anon.nothing(0.5)


async def test_an_update_that_moves_a_row_away_is_not_sent_to_the_old_owner(connect, rls_table, listener) -> None:
    a = await connect(apikey=token("authenticated", sub=USER_A))
    b = await connect(apikey=token("authenticated", sub=USER_B))
    await subscribe(a, "realtime:move-a", binding(rls_table))
    await subscribe(b, "realtime:move-b", binding(rls_table))
    insert(rls_table, {"id": 1, "user_id": USER_A, "body": "mine"})
    assert (await a.recv_event("postgres_changes", timeout=10))[4]["data"]["type"] == "INSERT"
    execute(sql.SQL("UPDATE {} SET user_id = %s WHERE id = 1").format(sql.Identifier("public", rls_table)), params=(USER_B,))
    frame = await b.recv_event("postgres_changes", timeout=10)
    assert frame[4]["data"]["type"] == "UPDATE" and frame[4]["data"]["record"]["user_id"] == USER_B
    assert await a.nothing(0.8)
    assert await b.nothing(0.3)  # the INSERT was A's


async def test_a_policy_that_raises_blocks_only_its_own_subscriber(connect, rls_table, listener, caplog) -> None:
    broken = await connect(apikey=token("authenticated", sub=USER_A, fail="yes"))
    a = await connect(apikey=token("authenticated", sub=USER_A))
    await subscribe(broken, "realtime:broken", binding(rls_table))
    await subscribe(a, "realtime:fine", binding(rls_table))
    insert(rls_table, {"id": 1, "user_id": USER_A, "body": "x"}, {"id": 2, "user_id": USER_A, "body": "y"})
    assert await received_ids(a) == [1, 2]
    # Told once per run, never sent a row (issue #10: a printed transient error, PROTOCOL.md 3.5).
    system = await broken.recv_event("system", timeout=10)
    assert system[4] == {
        "message": 'ERROR 22P02 (invalid_text_representation) invalid input syntax for type integer: "x"',
        "status": "error", "extension": "postgres_changes", "channel": "broken",
    }
    while not await broken.nothing(0.5):
        assert (await broken.recv())[3] == "system"
    assert 'invalid input syntax for type integer: "x"' in caplog.text


async def test_a_policy_that_raises_at_subscribe_time_is_reported(connect, rls_table, listener) -> None:
    # auth.uid() casts the sub to uuid, and the planner evaluates it for the join-time check.
    execute(sql.SQL("ALTER POLICY owner ON {} USING (user_id = auth.uid())").format(sql.Identifier("public", rls_table)))
    client = await connect(apikey=token("authenticated", sub="not-a-uuid"))
    reply = await client.join("realtime:raises", {"postgres_changes": binding(rls_table)})
    assert reply[4]["status"] == "ok"
    system = await client.recv_event("system", timeout=10)
    assert system[4]["status"] == "error"
    assert system[4]["message"].startswith("Unable to subscribe to changes with given parameters. An exception happened")
    assert 'ERROR 22P02 (invalid_text_representation) invalid input syntax for type uuid: "not-a-uuid"' in system[4]["message"]


async def test_delete_on_an_rls_table_sends_only_the_key(connect, rls_table, listener) -> None:  # C45
    execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(sql.Identifier("public", rls_table)))
    insert(rls_table, {"id": 1, "user_id": USER_B, "body": "secret"})
    a = await connect(apikey=token("authenticated", sub=USER_A))
    await subscribe(a, "realtime:del", binding(rls_table, "DELETE"))
    execute(sql.SQL("DELETE FROM {} WHERE id = 1").format(sql.Identifier("public", rls_table)))
    data = (await a.recv_event("postgres_changes", timeout=10))[4]["data"]
    # PROTOCOL.md 4.4: DELETE is never RLS-checked, so it reveals the key and nothing else.
    assert data["type"] == "DELETE" and data["old_record"] == {"id": 1} and "record" not in data


async def test_a_revoked_column_is_missing_from_record_and_columns(connect, rls_table, listener) -> None:  # C47
    ident = sql.Identifier("public", rls_table)
    execute(
        sql.SQL("REVOKE SELECT ON {} FROM authenticated").format(ident),
        sql.SQL("GRANT SELECT (id, user_id) ON {} TO authenticated").format(ident),
    )
    a = await connect(apikey=token("authenticated", sub=USER_A))
    service = await connect(apikey=token("service_role"))
    await subscribe(a, "realtime:cols-a", binding(rls_table))
    await subscribe(service, "realtime:cols-s", binding(rls_table))
    insert(rls_table, {"id": 1, "user_id": USER_A, "body": "hidden column"})
    data = (await a.recv_event("postgres_changes", timeout=10))[4]["data"]
    assert data["record"] == {"id": 1, "user_id": USER_A}
    assert [c["name"] for c in data["columns"]] == ["id", "user_id"]
    full = (await service.recv_event("postgres_changes", timeout=10))[4]["data"]
    assert full["record"]["body"] == "hidden column"
    # A filter on a column the role cannot read is refused like an unknown column.
    reply = await a.join("realtime:cols-filter", {"postgres_changes": [{**binding(rls_table)[0], "filter": "body=eq.x"}]}, ref="9")
    assert reply[4]["status"] == "ok"
    system = await a.recv_event("system", timeout=10)
    assert system[4]["status"] == "error" and "invalid column for filter body" in system[4]["message"]


async def test_one_database_call_checks_a_batch_for_every_claim_set(connect, rls_table, replicator) -> None:
    sockets = []
    for n in range(20):
        sub = USER_A if n % 2 else USER_B
        # Identical claims (same iat and exp too) make one claim set per user.
        client = await connect(apikey=token("authenticated", sub=sub, iat=1_700_000_000, exp=4_102_444_800))
        await subscribe(client, f"realtime:batch{n}", binding(rls_table))
        sockets.append(client)
    queries, checks = replicator.checker.queries, replicator.checker.checks
    insert_many = sql.SQL("INSERT INTO {} (id, user_id) SELECT g, CASE WHEN g %% 2 = 0 THEN %s::uuid ELSE %s::uuid END"
                          " FROM generate_series(1, 50) g").format(sql.Identifier("public", rls_table))
    execute(insert_many, params=(USER_A, USER_B))
    assert len(await received_ids(sockets[1])) == 25
    assert len(await received_ids(sockets[0])) == 25
    # 50 rows in one transaction, 20 sockets, 2 distinct claim sets: 1 call that checks both.
    assert replicator.checker.queries - queries == 1
    assert replicator.checker.checks - checks == 2


async def test_composite_keys_and_strict_domain_columns_are_checked(connect, publication, listener) -> None:
    # The lookup types only the key columns: a NOT NULL domain elsewhere in the row must not break it.
    name = f"strict_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier("public", name)
    domain = sql.Identifier("public", f"{name}_label")
    execute(
        sql.SQL("CREATE DOMAIN {} AS text NOT NULL CHECK (VALUE <> '')").format(domain),
        sql.SQL("CREATE TABLE {} (org text, id bigint, user_id uuid, label {}, PRIMARY KEY (org, id))").format(ident, domain),
        sql.SQL("GRANT SELECT ON {} TO authenticated").format(ident),
        sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(ident),
        sql.SQL("CREATE POLICY owner ON {} FOR SELECT TO authenticated USING (user_id = auth.uid())").format(ident),
        sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(publication), ident),
    )
    try:
        a = await connect(apikey=token("authenticated", sub=USER_A))
        await subscribe(a, "realtime:strict", binding(name))
        insert(
            name,
            {"org": "x,y", "id": 1, "user_id": USER_B, "label": "b"},
            {"org": "x,y", "id": 2, "user_id": USER_A, "label": "a"},
        )
        frame = await a.recv_event("postgres_changes", timeout=10)
        assert frame[4]["data"]["record"] == {"org": "x,y", "id": 2, "user_id": USER_A, "label": "a"}
        assert await a.nothing(0.5)
    finally:
        execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident), sql.SQL("DROP DOMAIN IF EXISTS {}").format(domain))


async def quiet_counts(checker: Any, quiet: float = 0.5, limit: float = 5.0) -> tuple[int, int]:
    """The checker's (queries, checks) once they have not changed for ``quiet`` seconds (at most ``limit``)."""
    deadline = asyncio.get_running_loop().time() + limit
    counts = (checker.queries, checker.checks)
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(quiet)
        now = (checker.queries, checker.checks)
        if now == counts:
            break
        counts = now
    return counts


async def test_many_claim_sets_are_split_over_the_check_connections(connect, rls_table, replicator, monkeypatch) -> None:
    # Two claim sets per share: the four below are checked in two calls at once, on two connections.
    monkeypatch.setattr(listener_module, "PARALLEL_CLAIM_SETS", 2)
    a = await connect(apikey=token("authenticated", sub=USER_A))
    b = await connect(apikey=token("authenticated", sub=USER_B))
    broken = await connect(apikey=token("authenticated", sub=USER_A, fail="yes"))
    other_a = await connect(apikey=token("authenticated", sub=USER_A, iat=1_700_000_000))
    for n, client in enumerate((a, b, broken, other_a)):
        await subscribe(client, f"realtime:split{n}", binding(rls_table))
    # The session's replicator may still be checking an earlier test's late runs: count from when it is quiet.
    queries, checks = await quiet_counts(replicator.checker)
    insert(rls_table, {"id": 1, "user_id": USER_A, "body": "x"}, {"id": 2, "user_id": USER_B, "body": "y"})
    assert await received_ids(a) == [1]
    assert await received_ids(other_a) == [1]
    assert await received_ids(b) == [2]
    assert (await broken.recv_event("system", timeout=10))[4]["status"] == "error"  # and only its own claim set
    assert replicator.checker.queries - queries == 2
    assert replicator.checker.checks - checks == 4
    assert all(conn is not None and not conn.closed for conn in replicator.check_conns)
