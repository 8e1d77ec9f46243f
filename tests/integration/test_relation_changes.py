"""DDL under a live stream (issue #10, item 2): a table's key changes take effect from the next change.

In-process: a real PostgreSQL slot -> listener -> Redis -> hub -> socket, as
``test_rls.py``. The replicator reads a table's primary key again whenever
pgoutput describes the table, so a key added while the stream runs ends the
``Error 400`` events at once, and a key made composite is what the row level
security lookup matches on: a user never sees another tenant's row that
shares an ``id`` with one of theirs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from psycopg import sql

from tests.integration.conftest import execute, token
from tests.integration.test_change_faults import create_table
from tests.integration.test_postgres_changes import insert, subscribe
from tests.integration.test_rls import USER_A, USER_B, binding, listener, received_ids  # noqa: F401

pytestmark = pytest.mark.integration


@pytest.fixture
def keyless_table(publication: str) -> Iterator[str]:
    yield from create_table(publication, "id bigint NOT NULL, title text", sql.SQL("GRANT SELECT ON {ident} TO anon"))


@pytest.fixture
def tenant_table(publication: str) -> Iterator[str]:
    """Rows of a tenant (a user here), keyed by ``id`` alone at first."""
    yield from create_table(
        publication,
        "tenant_id uuid NOT NULL, id bigint NOT NULL, body text, CONSTRAINT tenant_pk PRIMARY KEY (id)",
        sql.SQL("GRANT SELECT ON {ident} TO authenticated"),
        sql.SQL("ALTER TABLE {ident} ENABLE ROW LEVEL SECURITY"),
        sql.SQL("CREATE POLICY tenant ON {ident} FOR SELECT TO authenticated USING (tenant_id = auth.uid())"),
    )


async def ids_then_quiet(client: Any, count: int, timeout: float = 10) -> list[int]:
    """The ids of the next ``count`` changes (each within ``timeout``), then of any that follow before a quiet 1.5 s."""
    ids = []
    for _ in range(count):
        data = (await client.recv_event("postgres_changes", timeout=timeout))[4]["data"]
        ids.append((data.get("record") or data.get("old_record"))["id"])
    return ids + await received_ids(client)


async def test_a_primary_key_added_under_a_live_stream_ends_the_400_events(connect, keyless_table, listener) -> None:  # noqa: F811
    client = await connect()
    await subscribe(client, "realtime:keyless", binding(keyless_table, "INSERT"))
    insert(keyless_table, {"id": 1, "title": "before"})
    frame = await client.recv_event("postgres_changes", timeout=10)
    assert frame[4]["data"]["errors"] == ["Error 400: Bad Request, no primary key"]
    execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(sql.Identifier("public", keyless_table)))
    insert(keyless_table, {"id": 2, "title": "after"})
    frame = await client.recv_event("postgres_changes", timeout=10)
    assert frame[4]["data"]["errors"] is None
    assert frame[4]["data"]["record"] == {"id": 2, "title": "after"}


async def test_a_key_made_composite_is_what_row_level_security_matches_on(connect, tenant_table, listener) -> None:  # noqa: F811
    tenant_a = await connect(apikey=token("authenticated", sub=USER_A))
    await subscribe(tenant_a, "realtime:tenant-a", binding(tenant_table, "INSERT"))
    ident = sql.Identifier("public", tenant_table)
    insert(tenant_table, {"tenant_id": USER_A, "id": 1, "body": "mine"})
    assert await ids_then_quiet(tenant_a, 1) == [1]
    # The key becomes (tenant_id, id): ids repeat across tenants from now on.
    execute(
        sql.SQL("ALTER TABLE {} DROP CONSTRAINT tenant_pk").format(ident),
        sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (tenant_id, id)").format(ident),
    )
    insert(tenant_table, {"tenant_id": USER_A, "id": 5, "body": "mine"})
    assert await ids_then_quiet(tenant_a, 1) == [5]
    # Another tenant's row with the same id: looked up by id alone, tenant A's row 5 would answer for it.
    insert(tenant_table, {"tenant_id": USER_B, "id": 5, "body": "theirs"}, {"tenant_id": USER_A, "id": 6, "body": "mine"})
    assert await ids_then_quiet(tenant_a, 1) == [6]
