"""Policy checks on ``realtime.messages`` against the real PostgreSQL (PROTOCOL.md 7)."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest

from realtime.authorization import Database
from realtime.channel_auth import check_policies, headers_json
from core.jwt import Claims
from realtime.protocol.session import Extension, Permissions
from tests.integration.conftest import execute, sql_literal

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("realtime_schema")]

BROADCAST, PRESENCE = Extension.BROADCAST, Extension.PRESENCE
AUTHENTICATED = Claims("authenticated", 4_000_000_000, "3f0e4c2a-8a47-4e55-9a4b-1f0d7c5e2b10", {"role": "authenticated"})
EVERYTHING = {"read": (BROADCAST, PRESENCE), "write": (BROADCAST, PRESENCE)}

Policy = Callable[[str], None]


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    database = Database(os.environ["DATABASE_URL"], "supabase_realtime")
    yield database
    await database.close()


def room() -> str:
    return f"room-{uuid.uuid4().hex[:8]}"


async def test_a_topic_policy_admits_its_topic_and_not_another(db: Database, policy: Policy) -> None:  # C91
    room1, room2 = room(), room()
    policy(f"FOR SELECT TO authenticated USING (realtime.topic() = {sql_literal(room1)})")
    assert await check_policies(db, AUTHENTICATED, room1, read=(BROADCAST,)) == Permissions(read=frozenset({BROADCAST}))
    assert await check_policies(db, AUTHENTICATED, room2, read=(BROADCAST,)) == Permissions()


async def test_read_without_write(db: Database, policy: Policy) -> None:  # C92
    topic = room()
    policy(f"FOR SELECT TO authenticated USING (realtime.topic() = {sql_literal(topic)})")
    granted = await check_policies(db, AUTHENTICATED, topic, **EVERYTHING)
    assert granted == Permissions(read=frozenset({BROADCAST, PRESENCE}))


async def test_presence_only_policies_grant_presence_alone(db: Database, policy: Policy) -> None:  # C93
    topic = room()
    only_presence = f"realtime.topic() = {sql_literal(topic)} AND extension = 'presence'"
    policy(f"FOR SELECT TO authenticated USING ({only_presence})")
    policy(f"FOR INSERT TO authenticated WITH CHECK ({only_presence})")
    granted = await check_policies(db, AUTHENTICATED, topic, **EVERYTHING)
    assert granted == Permissions(read=frozenset({PRESENCE}), write=frozenset({PRESENCE}))


async def test_a_policy_that_raises_denies_and_logs_the_database_message(
    db: Database, policy: Policy, caplog: pytest.LogCaptureFixture
) -> None:
    topic, other = room(), room()
    function = f"test_boom_{uuid.uuid4().hex[:8]}"
    execute(
        f"CREATE FUNCTION public.{function}() RETURNS boolean LANGUAGE plpgsql VOLATILE AS"
        " $$ BEGIN RAISE EXCEPTION 'policy exploded on purpose'; END $$",
        f"GRANT EXECUTE ON FUNCTION public.{function}() TO authenticated",
    )
    try:
        raising = f"CASE WHEN realtime.topic() = {sql_literal(topic)} THEN public.{function}() ELSE false END"
        policy(f"FOR SELECT TO authenticated USING ({raising})")
        policy(f"FOR INSERT TO authenticated WITH CHECK ({raising})")
        policy(f"FOR SELECT TO authenticated USING (realtime.topic() = {sql_literal(other)})")
        with caplog.at_level(logging.WARNING, logger="realtime.channel_auth"):
            assert await check_policies(db, AUTHENTICATED, topic, **EVERYTHING) == Permissions()
        assert "policy exploded on purpose" in caplog.text
        # The same connection and role go on to evaluate other topics normally.
        assert await check_policies(db, AUTHENTICATED, other, read=(BROADCAST,)) == Permissions(read=frozenset({BROADCAST}))
    finally:
        execute(f"DROP FUNCTION IF EXISTS public.{function}() CASCADE")  # and its policies


async def test_a_role_with_bypassrls_is_granted_everything_without_policies(db: Database) -> None:
    service = Claims("service_role", 4_000_000_000, None, {"role": "service_role"})
    granted = await check_policies(db, service, room(), **EVERYTHING)
    assert granted == Permissions(read=frozenset({BROADCAST, PRESENCE}), write=frozenset({BROADCAST, PRESENCE}))


async def test_without_policies_nothing_is_granted(db: Database) -> None:  # C90
    assert await check_policies(db, AUTHENTICATED, room(), **EVERYTHING) == Permissions()


async def test_policies_see_the_claims_the_user_id_and_the_x_headers(db: Database, policy: Policy) -> None:
    topic = room()
    policy(
        f"FOR SELECT TO authenticated USING (realtime.topic() = {sql_literal(topic)}"
        " AND auth.uid() = '3f0e4c2a-8a47-4e55-9a4b-1f0d7c5e2b10'"
        " AND auth.jwt() ->> 'team' = 'red'"
        " AND current_setting('request.headers', true)::jsonb ->> 'x-room-key' = 'k1')"
    )
    red = Claims(AUTHENTICATED.role, AUTHENTICATED.exp, AUTHENTICATED.sub, {"role": "authenticated", "team": "red"})
    headers = headers_json([("X-Room-Key", "k1"), ("Authorization", "Bearer x")])
    assert await check_policies(db, red, topic, headers, read=(BROADCAST,)) == Permissions(read=frozenset({BROADCAST}))
    assert await check_policies(db, AUTHENTICATED, topic, headers, read=(BROADCAST,)) == Permissions()
    assert await check_policies(db, red, topic, headers_json([]), read=(BROADCAST,)) == Permissions()


async def test_a_role_the_database_does_not_know_is_denied(db: Database) -> None:
    stranger = Claims("no_such_role_here", 4_000_000_000, None, {"role": "no_such_role_here"})
    assert await check_policies(db, stranger, room(), **EVERYTHING) == Permissions()


async def test_checks_leave_no_rows_behind(db: Database, policy: Policy) -> None:
    topic = room()
    policy(f"FOR ALL TO authenticated USING (realtime.topic() = {sql_literal(topic)}) WITH CHECK (true)")
    assert await check_policies(db, AUTHENTICATED, topic, **EVERYTHING) == Permissions(
        read=frozenset({BROADCAST, PRESENCE}), write=frozenset({BROADCAST, PRESENCE})
    )
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        row = conn.execute("SELECT count(*) FROM realtime.messages WHERE topic = %s", (topic,)).fetchone()
    assert row == (0,)
