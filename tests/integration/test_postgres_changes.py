"""postgres_changes end to end in-process: real PostgreSQL slot -> listener -> Redis -> hub -> socket."""

from __future__ import annotations

import asyncio
import gc
import uuid
import warnings
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from channels.layers import get_channel_layer
from psycopg import sql

from replication.connection import LOCK_NAMESPACE
from replication.listener import Listener
from tests.integration.conftest import dsn, execute, token

pytestmark = pytest.mark.integration

@pytest.fixture
def table(publication) -> Any:
    """A fresh published table readable by anon; dropped afterwards."""
    name = f"todos_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier("public", name)
    execute(
        sql.SQL(
            "CREATE TABLE {} (id bigint PRIMARY KEY, title text, user_id int, done bool DEFAULT false,"
            " tags text[], meta jsonb)"
        ).format(ident),
        sql.SQL("GRANT SELECT ON {} TO anon, authenticated, service_role").format(ident),
        sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(publication), ident),
    )
    yield name
    execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))


@pytest.fixture
async def listener(publication) -> AsyncIterator[Listener]:
    slot = f"test_{uuid.uuid4().hex[:10]}"
    layer = get_channel_layer()
    active = asyncio.Event()
    instance = Listener(dsn(), slot, publication, layer, poll_interval=0.01, on_active=active.set)
    stop = asyncio.Event()
    task = asyncio.ensure_future(instance.run(stop))
    await asyncio.wait_for(active.wait(), 10)
    yield instance
    stop.set()
    await asyncio.wait_for(task, 10)
    if instance.stats.last_error:
        # A connection killed during a peek leaves its server cursor unclosed (replication/connection.py
        # peek_pages), and psycopg warns when that is collected: collect it here, once the listener let
        # go of it, so the warning does not fail whichever test happens to run next.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"<psycopg\.AsyncServerCursor object .*> was deleted while still open", ResourceWarning)
            gc.collect()
    execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", params=(slot,))


def insert(table: str, *rows: dict[str, Any]) -> None:
    with psycopg.connect(dsn(), autocommit=True) as conn:
        for row in rows:
            columns = list(row)
            conn.execute(
                sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                    sql.Identifier("public", table),
                    sql.SQL(", ").join(map(sql.Identifier, columns)),
                    sql.SQL(", ").join(sql.Placeholder() * len(columns)),
                ),
                [psycopg.types.json.Jsonb(v) if isinstance(v, dict) else v for v in row.values()],
            )


async def subscribe(client: Any, topic: str, bindings: list[dict[str, Any]], **extra: Any) -> list[int]:
    reply = await client.join(topic, {"postgres_changes": bindings}, **extra)
    assert reply[4]["status"] == "ok", reply
    system = await client.recv_event("system", timeout=10)
    assert system[4] == {"message": "Subscribed to PostgreSQL", "status": "ok", "extension": "postgres_changes", "channel": topic.split(":", 1)[1]}
    return [b["id"] for b in reply[4]["response"]["postgres_changes"]]


async def test_insert_is_delivered_with_typed_record(connect, table, listener) -> None:  # C37, C41, C42, C43
    client = await connect()
    [binding_id] = await subscribe(client, "realtime:db", [{"event": "INSERT", "schema": "public", "table": table}])
    insert(table, {"id": 1, "title": "a", "user_id": 7, "done": True, "tags": ["x", "y"], "meta": {"k": [1]}})
    frame = await client.recv_event("postgres_changes", timeout=10)
    assert frame[0] is None and frame[1] is None
    payload = frame[4]
    assert payload["ids"] == [binding_id]
    data = payload["data"]
    assert data["type"] == "INSERT" and data["schema"] == "public" and data["table"] == table
    assert data["record"] == {"id": 1, "title": "a", "user_id": 7, "done": True, "tags": ["x", "y"], "meta": {"k": [1]}}
    assert data["errors"] is None
    assert [c["name"] for c in data["columns"]] == ["id", "title", "user_id", "done", "tags", "meta"]
    assert [c["type"] for c in data["columns"]] == ["int8", "text", "int4", "bool", "_text", "jsonb"]
    import re

    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", data["commit_timestamp"])


async def test_event_type_filter(connect, table, listener) -> None:  # C38, C39
    """Each event filter gets exactly its own events: INSERT, UPDATE, DELETE, and all three for ``*``."""
    client = await connect()
    insert_id, update_id, delete_id, all_id = await subscribe(
        client,
        "realtime:ev",
        [{"event": event, "schema": "public", "table": table} for event in ("INSERT", "UPDATE", "DELETE", "*")],
    )
    ident = sql.Identifier("public", table)
    insert(table, {"id": 1, "title": "a"})
    execute(sql.SQL("UPDATE {} SET title = 'b' WHERE id = 1").format(ident))
    execute(sql.SQL("DELETE FROM {} WHERE id = 1").format(ident))
    frames = [(await client.recv_event("postgres_changes", timeout=10))[4] for _ in range(3)]
    assert [(f["data"]["type"], sorted(f["ids"])) for f in frames] == [
        ("INSERT", sorted([insert_id, all_id])),
        ("UPDATE", sorted([update_id, all_id])),
        ("DELETE", sorted([delete_id, all_id])),
    ]
    assert frames[0]["data"]["record"] == {"id": 1, "title": "a", "user_id": None, "done": False, "tags": None, "meta": None}
    assert frames[1]["data"]["record"]["title"] == "b"
    assert frames[1]["data"]["old_record"] == {"id": 1}  # C44: DEFAULT identity: the key only
    assert frames[2]["data"]["old_record"] == {"id": 1} and "record" not in frames[2]["data"]
    assert await client.nothing(0.5)


async def test_row_level_filter(connect, table, listener) -> None:  # C48
    client = await connect()
    await subscribe(client, "realtime:rows", [{"event": "INSERT", "schema": "public", "table": table, "filter": "user_id=eq.123"}])
    insert(table, {"id": 1, "user_id": 5}, {"id": 2, "user_id": 123}, {"id": 3, "user_id": 124})
    frame = await client.recv_event("postgres_changes", timeout=10)
    assert frame[4]["data"]["record"]["id"] == 2
    assert await client.nothing(0.5)


async def test_per_table_channel_isolation(connect, table, listener, publication) -> None:
    other = f"{table}_other"
    execute(
        sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(sql.Identifier("public", other)),
        sql.SQL("GRANT SELECT ON {} TO anon").format(sql.Identifier("public", other)),
        sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(publication), sql.Identifier("public", other)),
    )
    try:
        posts, users = await connect(), await connect()
        await subscribe(posts, "realtime:posts", [{"event": "*", "schema": "public", "table": table}])
        await subscribe(users, "realtime:users", [{"event": "*", "schema": "public", "table": other}])
        insert(table, {"id": 1})
        assert (await posts.recv_event("postgres_changes", timeout=10))[4]["data"]["table"] == table
        assert await users.nothing(0.5)
        from realtime.hub import get_hub
        from core.topics import table_group

        hub = get_hub()
        # The users channel's process membership is only the other table's group.
        members = {g for g, route in hub._change_groups.items() if any(k[1] == "realtime:users" for k in route.subscriptions)}
        assert members == {table_group("public", other)}
    finally:
        execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier("public", other)))


async def test_authorize_subscription_allowed(connect, table, listener) -> None:
    """A role granted SELECT (and only it: anon's grant is revoked) subscribes and gets the rows."""
    execute(sql.SQL("REVOKE SELECT ON {} FROM anon").format(sql.Identifier("public", table)))
    client = await connect(apikey=token("authenticated"))
    [binding_id] = await subscribe(client, "realtime:auth-ok", [{"event": "*", "schema": "public", "table": table}])
    insert(table, {"id": 5, "title": "seen"})
    frame = await client.recv_event("postgres_changes", timeout=10)
    assert frame[4]["ids"] == [binding_id]
    assert frame[4]["data"]["type"] == "INSERT" and frame[4]["data"]["record"]["title"] == "seen"
    assert await client.nothing(0.5)


async def test_authorize_subscription_denied(connect, table, listener) -> None:
    execute(sql.SQL("REVOKE SELECT ON {} FROM anon").format(sql.Identifier("public", table)))
    client = await connect()
    reply = await client.join("realtime:denied", {"postgres_changes": [{"event": "*", "schema": "public", "table": table}]})
    assert reply[4]["status"] == "ok"
    system = await client.recv_event("system", timeout=10)
    assert system[4]["status"] == "error" and system[4]["extension"] == "postgres_changes"
    assert system[4]["message"].startswith("Unable to subscribe to changes with given parameters. An exception happened")
    assert "permission denied" in system[4]["message"]
    insert(table, {"id": 1})
    assert await client.nothing(0.8)


async def test_bad_filters_answer_system_errors_and_keep_the_channel(connect, table, listener) -> None:  # C53, C56, C57, C58
    client = await connect()
    cases = [
        ({"event": "*", "schema": "public", "table": table, "filter": "wrong"}, 'Error parsing `filter` params: ["wrong"]'),
        ({"event": "*", "schema": "public", "table": table, "filter": "nope=eq.1"}, "Unable to subscribe to changes with given parameters. An exception happened"),
        ({"event": "*", "schema": "public", "table": "not_published"}, "Unable to subscribe to changes with given parameters. Please check Realtime is enabled"),
        ({"event": "*"}, "No subscription params provided"),
    ]
    for n, (binding, prefix) in enumerate(cases):
        topic = f"realtime:bad{n}"
        reply = await client.join(topic, {"postgres_changes": [binding]}, ref=str(n + 10))
        assert reply[4]["status"] == "ok"
        system = await client.recv_event("system", timeout=10)
        assert system[4]["message"].startswith(prefix), system
    await client.push(None, "99", "phoenix", "heartbeat", {})
    assert (await client.recv_event("phx_reply"))[4]["status"] == "ok"
    # Each channel is still joined: a broadcast pushed on it reaches another member of its topic.
    other = await connect()
    for n in range(len(cases)):
        assert (await other.join(f"realtime:bad{n}", ref=str(n + 10)))[4]["status"] == "ok"
    for n in range(len(cases)):
        payload = {"type": "broadcast", "event": "still", "payload": {"n": n}}
        await client.push(str(n + 10), str(n + 100), f"realtime:bad{n}", "broadcast", payload)
        frame = await other.recv_event("broadcast")
        assert (frame[2], frame[4]) == (f"realtime:bad{n}", payload)
    assert await client.nothing(0.3)  # no phx_close and no "unmatched topic" reply


async def test_leave_stops_changes(connect, table, listener) -> None:  # C64
    client = await connect()
    await subscribe(client, "realtime:bye", [{"event": "*", "schema": "public", "table": table}])
    await client.push("1", "2", "realtime:bye", "phx_leave", {})
    await client.recv_event("phx_close")
    insert(table, {"id": 1})
    assert await client.nothing(0.8)


async def replicator_backend(slot: str) -> tuple[int, str, str] | None:
    """(pid, application_name, backend_type) of the session holding the slot's advisory lock: the active replicator."""
    async with await psycopg.AsyncConnection.connect(dsn(), autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT a.pid, a.application_name, a.backend_type FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND l.classid = hashtext(%s)::oid AND l.objid = hashtext(%s)::oid",
            (LOCK_NAMESPACE, slot),
        )
        rows = await cursor.fetchall()
    assert len(rows) <= 1, rows
    return (int(rows[0][0]), str(rows[0][1]), str(rows[0][2])) if rows else None


async def slot_walsender(slot: str) -> tuple[int, str, str] | None:
    """(pid, application_name, backend_type) of the session streaming the slot, if one is."""
    async with await psycopg.AsyncConnection.connect(dsn(), autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT a.pid, a.application_name, a.backend_type FROM pg_replication_slots s"
            " JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = %s",
            (slot,),
        )
        row = await cursor.fetchone()
    return (int(row[0]), str(row[1]), str(row[2])) if row else None


async def replaced(find: Any, old_pid: int, what: str) -> tuple[int, str, str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while (found := await find()) is None or found[0] == old_pid:
        assert loop.time() < deadline, f"no new {what} within 5 s (last: {found})"
        await asyncio.sleep(0.05)
    return found


def terminate(pid: int) -> None:
    with psycopg.connect(dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()  # waits until it has exited
    assert row == (True,), f"pg_terminate_backend({pid}) returned {row}"


async def test_replication_listener_retry(connect, table, listener) -> None:
    """Either of the replicator's sessions killed: it is back within 5 s and loses nothing.

    It streams the slot on a replication connection (a walsender) and holds the
    slot's advisory lock on a second, ordinary session.
    """
    slot = listener.slot
    client = await connect()
    await subscribe(client, "realtime:retry", [{"event": "INSERT", "schema": "public", "table": table}])
    assert listener.stats.active and listener.stats.last_error == ""
    lock = await replicator_backend(slot)
    stream = await slot_walsender(slot)
    assert lock is not None and lock[1:] == (f"realtime replicate {slot}", "client backend"), lock
    assert stream is not None and stream[1:] == (f"realtime replicate {slot} stream", "walsender"), stream

    terminate(stream[0])
    insert(table, *({"id": n} for n in range(1, 6)))  # while the stream is down or reconnecting
    await replaced(lambda: slot_walsender(slot), stream[0], "walsender on the slot")
    assert listener.stats.last_error != "", "the listener did not notice its stream was killed"

    lock = await replicator_backend(slot)
    assert lock is not None
    listener.stats.last_error = ""
    terminate(lock[0])  # noticed with no change to read: a standby must not think the slot free for long
    after = await replaced(lambda: replicator_backend(slot), lock[0], "session holding the slot's lock")
    assert after[1:] == (f"realtime replicate {slot}", "client backend")
    assert listener.stats.last_error != "", "the listener did not notice its lock's session was killed"
    insert(table, *({"id": n} for n in range(6, 11)))

    insert(table, *({"id": n} for n in range(11, 16)))
    received = []
    while len(received) < 15:
        try:
            frame = await client.recv_event("postgres_changes", timeout=5)
        except TimeoutError:
            break  # the comparison below names what is missing
        received.append(frame[4]["data"]["record"]["id"])
    assert sorted(set(received)) == list(range(1, 16)), received  # nothing lost
    # At least once: a killed stream may deliver a change again, never out of order after its first copy.
    assert [n for i, n in enumerate(received) if n not in received[:i]] == list(range(1, 16))
    assert await client.nothing(0.5)


async def test_select_keeps_only_the_chosen_columns_and_the_key(connect, table, listener) -> None:  # C60
    client = await connect()
    await subscribe(client, "realtime:select", [{"event": "INSERT", "schema": "public", "table": table, "select": ["title"]}])
    insert(table, {"id": 3, "title": "t", "user_id": 9})
    data = (await client.recv_event("postgres_changes", timeout=10))[4]["data"]
    assert data["record"] == {"id": 3, "title": "t"}
    assert [c["name"] for c in data["columns"]] == ["id", "title"]
    reply = await client.join(
        "realtime:select-wild", {"postgres_changes": [{"event": "*", "schema": "public", "table": "*", "select": ["title"]}]}, ref="3"
    )
    assert reply[4]["status"] == "ok"
    system = await client.recv_event("system", timeout=10)
    assert system[4]["message"].startswith("Column selection is not supported for wildcard subscriptions")


async def test_schema_binding_follows_tables_added_to_the_publication(connect, table, listener, publication, settings) -> None:  # C59
    settings.REALTIME_PUBLICATION_CHECK_S = 1
    client = await connect()
    [binding_id] = await subscribe(client, "realtime:schema", [{"event": "*", "schema": "public"}])
    later = f"{table}_later"
    execute(
        sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(sql.Identifier("public", later)),
        sql.SQL("GRANT SELECT ON {} TO anon").format(sql.Identifier("public", later)),
        sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(publication), sql.Identifier("public", later)),
    )
    try:
        system = await client.recv_event("system", timeout=5)
        assert system[4]["message"] == "Subscribed to PostgreSQL"
        insert(later, {"id": 7})
        frame = await client.recv_event("postgres_changes", timeout=10)
        assert frame[4]["ids"] == [binding_id] and frame[4]["data"]["table"] == later
    finally:
        execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier("public", later)))


async def test_a_dropped_slot_is_recreated_and_later_changes_flow(connect, table, listener) -> None:
    client = await connect()
    await subscribe(client, "realtime:dropped", [{"event": "INSERT", "schema": "public", "table": table}])
    for _ in range(50):  # an operator stops the replicator's stream, then drops its slot
        try:
            with psycopg.connect(dsn(), autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots"
                             " WHERE slot_name = %s AND active_pid IS NOT NULL", (listener.slot,))
                conn.execute("SELECT pg_drop_replication_slot(%s)", (listener.slot,))
            break
        except psycopg.errors.ObjectInUse:
            await asyncio.sleep(0.02)  # it reconnected in between
    else:
        raise AssertionError("the slot stayed in use")
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        with psycopg.connect(dsn(), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (listener.slot,)).fetchone():
                break
        assert asyncio.get_running_loop().time() < deadline, "the slot was not recreated"
        await asyncio.sleep(0.1)
    insert(table, {"id": 99})
    frame = await client.recv_event("postgres_changes", timeout=5)
    assert frame[4]["data"]["record"]["id"] == 99


async def test_a_json_lone_surrogate_escape_does_not_stop_the_stream(connect, table, listener) -> None:
    """PostgreSQL's json type keeps ``"\\ud800"`` as written (jsonb refuses it); one such row must not wedge the slot."""
    ident = sql.Identifier("public", table)
    execute(sql.SQL("ALTER TABLE {} ADD COLUMN j json").format(ident))
    client = await connect()
    await subscribe(client, "realtime:surrogate", [{"event": "INSERT", "schema": "public", "table": table}])
    execute(sql.SQL("INSERT INTO {} (id, j) VALUES (1, %s::json)").format(ident), params=['"\\ud800"'])
    insert(table, {"id": 2})
    received = []
    # receive_nothing, not a receive timeout: the test communicator cancels the app on a timeout.
    while not await client.nothing(5):
        received.append((await client.recv_event("postgres_changes", timeout=5))[4]["data"]["record"])
    assert [r["id"] for r in received] == [1, 2], f"the json row and the change after it (received {received})"
    assert received[0]["j"] == "\ufffd"  # the lone surrogate, as UTF-8 can carry it
