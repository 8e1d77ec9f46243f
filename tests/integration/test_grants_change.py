"""Grants that change under a live subscription (issue #10, item 3), in-process as ``test_rls.py``.

The hub asks what each subscriber role may read of a table before delivering
a run (``realtime.privileges``, kept ``REALTIME_PRIVILEGES_TTL_MS``), so a
``REVOKE`` on the table or on a column takes effect without a re-join; and a
token refresh to a role that may not read the table is never undone by the
subscription of the old token still in flight.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from psycopg import sql

from tests.integration.conftest import execute, token
from tests.integration.test_postgres_changes import insert, subscribe
from tests.integration.test_rls import USER_A, binding, listener, received_ids  # noqa: F401

pytestmark = pytest.mark.integration

TTL_MS = 200


@pytest.fixture
def granted_table(publication: str, settings) -> Iterator[str]:
    settings.REALTIME_PRIVILEGES_TTL_MS = TTL_MS
    name = f"grants_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier("public", name)
    execute(
        sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, title text, secret text)").format(ident),
        sql.SQL("GRANT SELECT ON {} TO authenticated").format(ident),
        sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(publication), ident),
    )
    yield name
    execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))


async def test_a_revoke_on_the_table_stops_its_rows_without_a_re_join(connect, granted_table, listener) -> None:  # noqa: F811
    client = await connect(apikey=token("authenticated", sub=USER_A))
    await subscribe(client, "realtime:grants", binding(granted_table, "INSERT"))
    insert(granted_table, {"id": 1, "title": "a", "secret": "s"})
    assert await received_ids(client, timeout=5) == [1]
    execute(sql.SQL("REVOKE SELECT ON {} FROM authenticated").format(sql.Identifier("public", granted_table)))
    await asyncio.sleep(TTL_MS / 1000 * 3)
    insert(granted_table, {"id": 2, "title": "b", "secret": "s"})
    assert await received_ids(client, timeout=2) == []


async def test_a_column_revoked_under_a_live_subscription_is_cut_from_the_record(connect, granted_table, listener) -> None:  # noqa: F811
    client = await connect(apikey=token("authenticated", sub=USER_A))
    await subscribe(client, "realtime:columns", binding(granted_table, "INSERT"))
    ident = sql.Identifier("public", granted_table)
    execute(
        sql.SQL("REVOKE SELECT ON {} FROM authenticated").format(ident),
        sql.SQL("GRANT SELECT (id, title) ON {} TO authenticated").format(ident),
    )
    await asyncio.sleep(TTL_MS / 1000 * 3)
    insert(granted_table, {"id": 3, "title": "c", "secret": "hidden"})
    frame = await client.recv_event("postgres_changes", timeout=10)
    assert frame[4]["data"]["record"] == {"id": 3, "title": "c"}
    assert [c["name"] for c in frame[4]["data"]["columns"]] == ["id", "title"]


async def test_a_token_refresh_to_a_role_without_access_is_not_undone_by_the_old_subscription(
    connect, granted_table, listener  # noqa: F811
) -> None:
    client = await connect(apikey=token("authenticated", sub=USER_A))
    reply = await client.join("realtime:refresh", {"postgres_changes": binding(granted_table, "INSERT")})
    assert reply[4]["status"] == "ok"
    # At once, before the first subscription is done: anon may not read the table.
    await client.push("1", "2", "realtime:refresh", "access_token", {"access_token": token("anon")})
    # The old token's subscription reports "Subscribed" only if it finished before the refresh;
    # either way the refused one comes last, and no row flows after it.
    system = await client.recv_event("system", timeout=10)
    if system[4]["status"] == "ok":
        system = await client.recv_event("system", timeout=10)
    assert system[4]["status"] == "error", system
    assert "Unable to subscribe" in system[4]["message"]
    insert(granted_table, {"id": 4, "title": "d", "secret": "s"})
    assert await received_ids(client, timeout=2) == []
