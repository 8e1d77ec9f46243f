"""Broadcast from the database against the real PostgreSQL (PROTOCOL.md 5.4, 7; issue #12).

``realtime.messages`` partitioned by day as ``migrate`` makes it (also out of
the plain table earlier versions made), ``realtime.send``, ``send_binary`` and
``broadcast_changes``, and the daily partitions ``shared.partitions`` keeps.
Tests that replace the table or move the clock run in a scratch database of
their own; the others use the session's database.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

import shared.partitions
from realtime.authorization import Database
from realtime.channel_auth import check_policies
from realtime.dbsetup import AUTH_SQL, ROLES_SQL, SETUP_SQL
from core.jwt import Claims
from shared.partitions import amaintain_partitions, maintain_partitions, partition_name
from realtime.protocol.session import Extension, Permissions
from tests.integration.conftest import dsn, execute, sql_literal

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BROADCAST = Extension.BROADCAST
AUTHENTICATED = Claims("authenticated", 4_000_000_000, "3f0e4c2a-8a47-4e55-9a4b-1f0d7c5e2b10", {"role": "authenticated"})

# What migration 0003 made before #12: the plain table the migrations convert.
PLAIN_MESSAGES_SQL = """
CREATE SCHEMA IF NOT EXISTS realtime;
GRANT USAGE ON SCHEMA realtime TO anon, authenticated, service_role;
CREATE TABLE realtime.messages (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  topic text NOT NULL,
  extension text NOT NULL CHECK (extension IN ('broadcast', 'presence')),
  payload jsonb,
  binary_payload bytea,
  event text,
  private boolean DEFAULT true,
  inserted_at timestamp NOT NULL DEFAULT now(),
  updated_at timestamp NOT NULL DEFAULT now()
);
ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY;
GRANT SELECT, INSERT, UPDATE ON realtime.messages TO anon, authenticated, service_role;
CREATE FUNCTION realtime.topic() RETURNS text LANGUAGE sql STABLE AS $f$
  SELECT nullif(current_setting('realtime.topic', true), '')::text
$f$;
GRANT EXECUTE ON FUNCTION realtime.topic() TO anon, authenticated, service_role;
"""

PLAIN_POLICIES = [
    """CREATE POLICY "members read room1" ON realtime.messages FOR SELECT TO authenticated
         USING (realtime.topic() = 'room1')""",
    """CREATE POLICY "Members Send" ON realtime.messages FOR INSERT TO authenticated, anon
         WITH CHECK (realtime.topic() = 'room1' AND extension = 'broadcast')""",
    """CREATE POLICY "no presence writes" ON realtime.messages AS RESTRICTIVE FOR INSERT TO PUBLIC
         WITH CHECK (extension <> 'presence')""",
]

CATALOG = [
    "SELECT relname, relkind, relrowsecurity, relforcerowsecurity, relacl::text FROM pg_class"
    " WHERE relnamespace = 'realtime'::regnamespace ORDER BY relname",
    "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'realtime.messages'::regclass ORDER BY 1",
    "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'realtime' ORDER BY 1",
    "SELECT policyname, permissive, roles::text, cmd, qual, with_check FROM pg_policies WHERE schemaname = 'realtime'"
    " ORDER BY 1",
    # xmin: a function re-created without need would show up here.
    "SELECT oid::regprocedure::text, prosrc, proacl::text, xmin::text FROM pg_proc"
    " WHERE pronamespace = 'realtime'::regnamespace ORDER BY 1",
    "SELECT pubname, pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot FROM pg_publication ORDER BY 1",
    "SELECT pubname, schemaname, tablename FROM pg_publication_tables ORDER BY 1, 2, 3",
]


def catalog(url: str) -> list[list[tuple[Any, ...]]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [conn.execute(query).fetchall() for query in CATALOG]


def policies(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT policyname, permissive, roles::text, cmd, qual, with_check FROM pg_policies"
            " WHERE schemaname = 'realtime' AND tablename = 'messages' ORDER BY 1"
        ).fetchall()


def run(url: str, *statements: str | sql.Composable, params: Any = None) -> list[tuple[Any, ...]]:
    """Run ``statements`` (autocommit) in the database at ``url``; the rows of the last."""
    rows: list[tuple[Any, ...]] = []
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            cursor = conn.execute(statement, params)
            rows = cursor.fetchall() if cursor.description else []
    return rows


@pytest.fixture
def scratch() -> Iterator[str]:
    """A new, empty database of this test's own; its URL."""
    name = f"{urlsplit(dsn()).path.lstrip('/')}_t{uuid.uuid4().hex[:10]}"
    execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield urlsplit(dsn())._replace(path=f"/{name}").geturl()
    execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def plain(scratch: str) -> str:
    """A scratch database as migrations 0001-0003 left it before #12, with policies, grants and a row."""
    run(scratch, ROLES_SQL + AUTH_SQL + PLAIN_MESSAGES_SQL, *PLAIN_POLICIES)
    run(scratch, "GRANT DELETE ON realtime.messages TO service_role")
    run(scratch, "INSERT INTO realtime.messages (topic, extension, payload) VALUES ('room1', 'broadcast', '{\"n\": 1}')")
    return scratch


def partitions(url: str) -> list[str]:
    return [
        name
        for (name,) in run(
            url,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'realtime.messages'::regclass ORDER BY 1",
        )
    ]


def midday(day: date) -> datetime:
    return datetime.combine(day, datetime.min.time()).replace(hour=12)


# --- the table ----------------------------------------------------------------------------------


def test_setup_makes_the_reference_table_and_a_second_run_changes_nothing(scratch: str) -> None:
    run(scratch, SETUP_SQL)
    first = catalog(scratch)
    run(scratch, SETUP_SQL)
    assert catalog(scratch) == first

    columns = run(
        scratch,
        "SELECT column_name, data_type, column_default, is_nullable FROM information_schema.columns"
        " WHERE table_schema = 'realtime' AND table_name = 'messages' ORDER BY ordinal_position",
    )
    assert columns == [
        ("topic", "text", None, "NO"),
        ("extension", "text", None, "NO"),
        ("payload", "jsonb", None, "YES"),
        ("event", "text", None, "YES"),
        ("private", "boolean", "false", "YES"),
        ("updated_at", "timestamp without time zone", "now()", "NO"),
        ("inserted_at", "timestamp without time zone", "now()", "NO"),
        ("id", "uuid", "gen_random_uuid()", "NO"),
        ("binary_payload", "bytea", None, "YES"),
    ]
    assert run(
        scratch,
        "SELECT c.relkind, c.relrowsecurity, pg_get_partkeydef(c.oid) FROM pg_class c WHERE c.oid = 'realtime.messages'::regclass",
    ) == [("p", True, "RANGE (inserted_at)")]
    assert run(scratch, CATALOG[1]) == [
        ("messages_payload_exclusive", "CHECK (((payload IS NULL) OR (binary_payload IS NULL)))"),
        ("messages_pkey", "PRIMARY KEY (id, inserted_at)"),
    ]
    assert (
        "messages_inserted_at_topic_index",
        "CREATE INDEX messages_inserted_at_topic_index ON ONLY realtime.messages USING btree (inserted_at DESC, topic)"
        " WHERE ((extension = 'broadcast'::text) AND (private IS TRUE))",
    ) in run(scratch, CATALOG[2])
    assert (  # replay: one topic's newest private broadcasts
        "messages_topic_inserted_at_index",
        "CREATE INDEX messages_topic_inserted_at_index ON ONLY realtime.messages USING btree (topic, inserted_at DESC)"
        " WHERE ((extension = 'broadcast'::text) AND (private IS TRUE))",
    ) in run(scratch, CATALOG[2])
    assert partitions(scratch) == ["messages_default"]
    assert run(scratch, CATALOG[5]) == [("supabase_realtime_messages_publication", True, False, False, False, True)]
    assert run(scratch, CATALOG[6]) == [("supabase_realtime_messages_publication", "realtime", "messages")]
    granted = run(
        scratch,
        "SELECT r, has_table_privilege(r, 'realtime.messages', 'SELECT, INSERT, UPDATE'),"
        " has_function_privilege(r, 'realtime.send(jsonb, text, text, boolean)', 'EXECUTE'),"
        " has_function_privilege(r, 'realtime.send_binary(bytea, text, text, boolean)', 'EXECUTE'),"
        " has_function_privilege(r, 'realtime.broadcast_changes(text, text, text, text, text, record, record, text)', 'EXECUTE'),"
        " has_function_privilege(r, 'realtime.topic()', 'EXECUTE')"
        " FROM unnest(ARRAY['anon', 'authenticated', 'service_role']) AS r",
    )
    assert granted == [(role, True, True, True, True, True) for role in ("anon", "authenticated", "service_role")]


def test_setup_converts_the_plain_table_keeping_rows_grants_and_policies(plain: str) -> None:
    before = policies(plain)
    assert len(before) == 3

    run(plain, SETUP_SQL)

    assert policies(plain) == before
    assert run(plain, "SELECT relkind FROM pg_class WHERE oid = 'realtime.messages'::regclass") == [("p",)]
    assert run(plain, "SELECT topic, extension, payload, private FROM realtime.messages") == [
        ("room1", "broadcast", {"n": 1}, True)
    ]
    assert run(plain, "SELECT has_table_privilege('service_role', 'realtime.messages', 'DELETE')") == [(True,)]
    assert run(plain, "SELECT to_regclass('realtime.messages_unpartitioned')") == [(None,)]
    converted = catalog(plain)
    run(plain, SETUP_SQL)
    assert catalog(plain) == converted


async def test_converted_policies_still_decide_private_channels(plain: str) -> None:
    run(plain, SETUP_SQL)
    db = Database(plain, "supabase_realtime")
    try:
        everything = {"read": (BROADCAST, Extension.PRESENCE), "write": (BROADCAST, Extension.PRESENCE)}
        # Only the default partition so far: the probes need nothing else.
        assert await check_policies(db, AUTHENTICATED, "room1", **everything) == Permissions(
            read=frozenset({BROADCAST, Extension.PRESENCE}), write=frozenset({BROADCAST})
        )
        maintain_partitions_at(plain)
        assert await check_policies(db, AUTHENTICATED, "room1", **everything) == Permissions(
            read=frozenset({BROADCAST, Extension.PRESENCE}), write=frozenset({BROADCAST})
        )
        assert await check_policies(db, AUTHENTICATED, "room2", **everything) == Permissions()
    finally:
        await db.close()
    # The probes were rolled back.
    assert run(plain, "SELECT count(*) FROM realtime.messages") == [(1,)]


def maintain_partitions_at(url: str, now: datetime | None = None) -> shared.partitions.Outcome:
    with psycopg.connect(url, autocommit=True) as conn:
        return maintain_partitions(conn, now)


def manage(url: str, *args: str) -> str:
    env = {**os.environ, "DATABASE_URL": url}
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_migrate_converts_a_database_migrated_before_partitioning(plain: str) -> None:
    before = policies(plain)
    manage(plain, "migrate", "realtime", "0003", "--fake")  # as a database migrated before #12 records it

    assert "realtime.0004_partitioned_messages... OK" in manage(plain, "migrate")

    assert policies(plain) == before
    today = run(plain, "SELECT localtimestamp::date")[0][0]
    assert partitions(plain) == sorted(
        ["messages_default", *(partition_name(today + timedelta(days=n)) for n in range(-1, 4))]
    )
    # The converted row was moved out of the default partition into its day's.
    assert run(plain, "SELECT tableoid::regclass::text FROM realtime.messages") == [
        (f"realtime.{partition_name(today)}",)
    ]
    migrated = catalog(plain)
    assert "No migrations to apply." in manage(plain, "migrate")
    run(plain, SETUP_SQL)
    assert manage(plain, "realtime_partitions").startswith("created none; dropped none;")
    assert catalog(plain) == migrated


def test_migrate_on_a_new_database(scratch: str) -> None:
    manage(scratch, "migrate")
    assert len(partitions(scratch)) == 6
    assert run(scratch, "SELECT count(*) FROM pg_proc WHERE oid = to_regprocedure('realtime.send(jsonb, text, text, boolean)')") == [(1,)]


def test_setup_restores_its_function_bodies_but_not_those_someone_else_owns(scratch: str) -> None:
    run(scratch, SETUP_SQL)
    ours = run(scratch, "SELECT prosrc FROM pg_proc WHERE oid = 'realtime.send_binary(bytea, text, text, boolean)'::regprocedure")
    replace = (
        "CREATE OR REPLACE FUNCTION realtime.{}(payload {}, event text, topic text, private boolean DEFAULT true)"
        " RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$"
    )
    run(scratch, replace.format("send_binary", "bytea"), replace.format("send", "jsonb"))
    run(scratch, "ALTER FUNCTION realtime.send(jsonb, text, text, boolean) OWNER TO service_role")

    run(scratch, SETUP_SQL)

    assert run(scratch, "SELECT prosrc FROM pg_proc WHERE oid = 'realtime.send_binary(bytea, text, text, boolean)'::regprocedure") == ours
    assert run(scratch, "SELECT prosrc FROM pg_proc WHERE oid = 'realtime.send(jsonb, text, text, boolean)'::regprocedure") == [
        (" BEGIN END ",)
    ]


# --- partitions ---------------------------------------------------------------------------------


def test_partitions_for_day_d_then_d_plus_5_keep_exactly_the_window(scratch: str) -> None:
    run(scratch, SETUP_SQL)
    d = date(2031, 3, 10)

    first = maintain_partitions_at(scratch, midday(d))
    assert first.created == tuple(partition_name(d + timedelta(days=n)) for n in range(-1, 4))
    assert partitions(scratch) == sorted(["messages_default", *first.created])
    again = maintain_partitions_at(scratch, midday(d))
    assert (again.created, again.dropped, again.failed) == ((), (), ())

    insert = "INSERT INTO realtime.messages (topic, extension, inserted_at) VALUES (%s, 'broadcast', %s)"
    for topic, when in [
        ("yesterday", midday(d - timedelta(days=1))),
        ("today", midday(d)),
        ("in two days", midday(d + timedelta(days=2))),
        ("long ago", midday(d - timedelta(days=30))),  # no partition: the default one
        ("in nine days", midday(d + timedelta(days=9))),  # no partition yet: the default one
    ]:
        run(scratch, insert, params=(topic, when))

    later = maintain_partitions_at(scratch, midday(d + timedelta(days=5)))

    assert later.dropped == tuple(partition_name(d + timedelta(days=n)) for n in (-1, 0, 1))
    assert later.created == tuple(partition_name(d + timedelta(days=n)) for n in range(4, 9))
    assert (later.moved, later.purged, later.failed) == (0, 1, ())
    assert partitions(scratch) == sorted(
        ["messages_default", *(partition_name(d + timedelta(days=n)) for n in range(2, 9))]
    )
    # Dropped with their partitions, or purged from the default one: only rows younger than 72 h are left.
    assert run(scratch, "SELECT topic, tableoid::regclass::text FROM realtime.messages ORDER BY inserted_at") == [
        ("in two days", f"realtime.{partition_name(d + timedelta(days=2))}"),
        ("in nine days", "realtime.messages_default"),
    ]

    # Day D+9 gets its partition, and the row waiting in the default one moves into it.
    last = maintain_partitions_at(scratch, midday(d + timedelta(days=7)))
    assert partition_name(d + timedelta(days=9)) in last.created
    assert last.moved == 1
    assert run(scratch, "SELECT topic, tableoid::regclass::text FROM realtime.messages ORDER BY inserted_at") == [
        ("in nine days", f"realtime.{partition_name(d + timedelta(days=9))}")
    ]


async def test_the_async_twin_maintains_and_a_second_maintainer_skips(scratch: str) -> None:
    run(scratch, SETUP_SQL)
    d = date(2031, 3, 10)
    async with await psycopg.AsyncConnection.connect(scratch, autocommit=True) as conn:
        outcome = await amaintain_partitions(conn, midday(d))
        assert len(outcome.created) == 5
        with psycopg.connect(scratch, autocommit=True) as other:
            lock = "hashtextextended('realtime.partitions', 0)"
            other.execute(f"SELECT pg_advisory_lock({lock})")
            assert (await amaintain_partitions(conn, midday(d + timedelta(days=1)))).skipped
            other.execute(f"SELECT pg_advisory_unlock({lock})")
        outcome = await amaintain_partitions(conn, midday(d + timedelta(days=5)))
        assert len(outcome.dropped) == 3 and len(outcome.created) == 5


def test_a_partition_in_use_is_dropped_at_a_later_run_and_holds_up_nothing_else(
    scratch: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run(scratch, SETUP_SQL)
    d = date(2031, 3, 10)
    maintain_partitions_at(scratch, midday(d))
    monkeypatch.setattr(shared.partitions, "_SET_LOCK_TIMEOUT", sql.SQL("SET LOCAL lock_timeout = '100ms'"))
    busy = partition_name(d - timedelta(days=1))
    with psycopg.connect(scratch) as reader:  # a long transaction that read the oldest day
        reader.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("realtime", busy)))
        outcome = maintain_partitions_at(scratch, midday(d + timedelta(days=5)))
        reader.rollback()
    assert outcome.failed == (busy,)
    assert outcome.dropped == tuple(partition_name(d + timedelta(days=n)) for n in (0, 1))
    assert len(outcome.created) == 5
    assert f"partition drop {busy} failed, retried at the next run: 55P03" in caplog.text

    assert maintain_partitions_at(scratch, midday(d + timedelta(days=5))).dropped == (busy,)


# --- the functions ------------------------------------------------------------------------------


@pytest.fixture
def topic() -> str:
    return f"db-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def table(realtime_schema: None) -> Iterator[str]:
    """A table of this test's own in ``public``: its name, unquoted."""
    name = f"h_{uuid.uuid4().hex[:10]}"
    execute(
        sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, note text)").format(sql.Identifier(name)),
        sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO authenticated").format(sql.Identifier(name)),
    )
    yield name
    execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


def warnings_of(conn: psycopg.Connection[Any]) -> list[str]:
    seen: list[str] = []
    conn.add_notice_handler(
        lambda diag: seen.append(f"{diag.severity_nonlocalized}: {diag.message_primary}")
        if diag.severity_nonlocalized == "WARNING"
        else None
    )
    return seen


def messages(topic: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn(), autocommit=True) as conn:
        return conn.execute(
            "SELECT id, event, payload, binary_payload, private, extension FROM realtime.messages"
            " WHERE topic = %s ORDER BY inserted_at, event",
            (topic,),
        ).fetchall()


@pytest.mark.usefixtures("realtime_schema")
def test_send_adds_the_row_id_to_the_payload_and_sets_the_topic(topic: str) -> None:  # C77
    with psycopg.connect(dsn()) as conn:
        conn.execute("SELECT realtime.send('{\"a\": 1}', 'e', %s)", (topic,))
        assert conn.execute("SELECT realtime.topic()").fetchone() == (topic,)
        conn.commit()
        assert conn.execute("SELECT realtime.topic()").fetchone() == (None,)  # set for the transaction only
    [(row_id, event, payload, binary, private, extension)] = messages(topic)
    assert payload == {"a": 1, "id": str(row_id)}
    assert (event, binary, private, extension) == ("e", None, True, "broadcast")


@pytest.mark.usefixtures("realtime_schema")
def test_send_keeps_the_payloads_own_id_and_may_be_public(topic: str) -> None:
    execute("SELECT realtime.send('{\"id\": 7}', 'e', %s, false)", params=(topic,))
    [(row_id, _, payload, _, private, _)] = messages(topic)
    assert payload == {"id": 7} and private is False and row_id is not None


def test_a_refused_send_only_warns_and_the_callers_transaction_commits(
    topic: str, table: str, policy: Callable[[str], None]
) -> None:
    execute(
        sql.SQL(
            "CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " PERFORM realtime.send(jsonb_build_object('note', NEW.note), 'note', NEW.note); RETURN NEW; END $$"
        ).format(function=sql.Identifier(f"{table}_send")),
        sql.SQL("CREATE TRIGGER send AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {function}()").format(
            table=sql.Identifier(table), function=sql.Identifier(f"{table}_send")
        ),
    )
    policy("FOR INSERT TO authenticated WITH CHECK (true)")
    policy(f"AS RESTRICTIVE FOR INSERT TO authenticated WITH CHECK (realtime.topic() <> {sql_literal(topic)})")
    allowed = f"{topic}-allowed"
    try:
        with psycopg.connect(dsn()) as conn:
            warned = warnings_of(conn)
            conn.execute("SET ROLE authenticated")
            conn.execute(sql.SQL("INSERT INTO {} VALUES (1, %s), (2, %s)").format(sql.Identifier(table)), (topic, allowed))
            conn.commit()
        [warning] = warned  # PostgreSQL names the restrictive policy
        assert warning.startswith("WARNING: WarnSendingBroadcastMessage: new row violates row-level security policy")
        assert run(dsn(), sql.SQL("SELECT id, note FROM {} ORDER BY id").format(sql.Identifier(table))) == [
            (1, topic),
            (2, allowed),
        ]
        assert messages(topic) == []
        assert [payload for _, _, payload, *_ in messages(allowed)][0]["note"] == allowed
    finally:
        execute(sql.SQL("DROP FUNCTION IF EXISTS {}() CASCADE").format(sql.Identifier(f"{table}_send")))


@pytest.mark.usefixtures("realtime_schema")
@pytest.mark.parametrize(
    ("payload", "reason"),
    [("[1]", 'path element at position 1 is not an integer: "id"'), ('"x"', "cannot set path in scalar")],
)
def test_a_payload_that_is_not_an_object_only_warns(topic: str, payload: str, reason: str) -> None:
    with psycopg.connect(dsn()) as conn:
        warned = warnings_of(conn)
        conn.execute("SELECT realtime.send(%s::jsonb, 'e', %s)", (payload, topic))
        conn.commit()
    assert warned == [f"WARNING: WarnSendingBroadcastMessage: {reason}"]
    assert messages(topic) == []


@pytest.mark.usefixtures("realtime_schema")
def test_send_binary_stores_the_bytes(topic: str) -> None:
    execute("SELECT realtime.send_binary(%s, 'bin', %s)", params=(b"\xde\xad\x00\xff", topic))
    [(row_id, event, payload, binary, private, extension)] = messages(topic)
    assert (event, payload, binary, private, extension) == ("bin", None, b"\xde\xad\x00\xff", True, "broadcast")


def trigger_function(table: str, level: str) -> sql.Composed:
    return sql.SQL(
        "CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " PERFORM realtime.broadcast_changes({topic} || ':' || coalesce(NEW.id, OLD.id, 0), TG_OP, TG_OP,"
        " TG_TABLE_NAME, TG_TABLE_SCHEMA, NEW, OLD{level}); RETURN NULL; END $$"
    ).format(
        function=sql.Identifier(f"{table}_changes"),
        topic=sql.Literal(table),
        level=sql.SQL(", TG_LEVEL") if level == "STATEMENT" else sql.SQL(""),
    )


def test_broadcast_changes_from_row_triggers_sends_old_and_new_records(table: str) -> None:
    execute(
        trigger_function(table, "ROW"),
        sql.SQL("CREATE TRIGGER changes AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION {}()").format(
            sql.Identifier(table), sql.Identifier(f"{table}_changes")
        ),
    )
    try:
        insert = sql.SQL("INSERT INTO {} VALUES (1, 'a')").format(sql.Identifier(table))
        update = sql.SQL("UPDATE {} SET note = 'b'").format(sql.Identifier(table))
        delete = sql.SQL("DELETE FROM {}").format(sql.Identifier(table))
        execute(insert, update, delete)
        rows = messages(f"{table}:1")
        assert [(event, private) for _, event, _, _, private, _ in rows] == [
            ("INSERT", True), ("UPDATE", True), ("DELETE", True)
        ]
        common = {"table": table, "schema": "public"}
        assert [payload for _, _, payload, *_ in rows] == [
            {**common, "operation": "INSERT", "record": {"id": 1, "note": "a"}, "old_record": None, "id": str(rows[0][0])},
            {**common, "operation": "UPDATE", "record": {"id": 1, "note": "b"}, "old_record": {"id": 1, "note": "a"},
             "id": str(rows[1][0])},
            {**common, "operation": "DELETE", "record": None, "old_record": {"id": 1, "note": "b"}, "id": str(rows[2][0])},
        ]
    finally:
        execute(sql.SQL("DROP FUNCTION IF EXISTS {}() CASCADE").format(sql.Identifier(f"{table}_changes")))


def test_broadcast_changes_refuses_statement_level_triggers(table: str) -> None:
    execute(
        trigger_function(table, "STATEMENT"),
        sql.SQL("CREATE TRIGGER changes AFTER INSERT ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}()").format(
            sql.Identifier(table), sql.Identifier(f"{table}_changes")
        ),
    )
    try:
        with pytest.raises(psycopg.errors.RaiseException) as raised:
            execute(sql.SQL("INSERT INTO {} VALUES (1, 'a')").format(sql.Identifier(table)))
        assert raised.value.diag.message_primary == (
            "Failed to process the row: function can only be triggered for each row, not for each statement"
        )
        assert run(dsn(), sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))) == [(0,)]
        assert messages(f"{table}:0") == []
    finally:
        execute(sql.SQL("DROP FUNCTION IF EXISTS {}() CASCADE").format(sql.Identifier(f"{table}_changes")))
