"""Transactions of any size flow through the replicator with bounded memory (issue #10, item 5).

A real ``manage.py replicate`` and a real server on a publication of the
test's own. The replicator reads a peek through a server-side cursor, a page
of about 8 MB at a time, and publishes each page's runs (at most 4 MB each)
before it reads the next; the slot is consumed only after the commit. So one
transaction of 500 rows of 1 MB, or of 1,000,000 small rows, flows through
completely while the replicator's resident memory stays far below its size.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.fixtures.phoenix import PhoenixClient, is_text
from tests.fixtures.replicator import ReplicatorProcess, start_replicator
from tests.fixtures.server import ServerProcess, start_server
from tests.integration.conftest import dsn, execute

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("realtime_schema")]

MAX_RSS = 500 * 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Samples a process's resident memory every 50 ms in a thread, keeping the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, rss(self.pid))
            except OSError:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


@pytest.fixture
def stream() -> Iterator[tuple[str, str, ServerProcess, ReplicatorProcess]]:
    """A table in a publication of its own, a server and a replicator on it."""
    table, publication = f"big_{uuid.uuid4().hex[:8]}", f"test_pub_{uuid.uuid4().hex[:10]}"
    ident = sql.Identifier("public", table)
    execute(
        sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, body text)").format(ident),
        sql.SQL("GRANT SELECT ON {} TO anon").format(ident),
        sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(sql.Identifier(publication), ident),
    )
    env = {"REALTIME_PUBLICATION": publication}
    server = start_server(env=env)
    replicator = start_replicator(env=env)
    try:
        replicator.wait_active()
        yield table, publication, server, replicator
    finally:
        replicator.stop()
        replicator.drop_slot()
        server.stop()
        execute(
            sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(publication)),
            sql.SQL("DROP TABLE IF EXISTS {}").format(ident),
        )


def slot_confirmed_past(slot: str, lsn: str) -> bool:
    with psycopg.connect(dsn(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s", (lsn, slot)
        ).fetchone()
    return bool(row and row[0])


async def subscribed(server: ServerProcess, table: str, ids: list[int]) -> PhoenixClient:
    client: PhoenixClient = await PhoenixClient.open(server, "subscriber")
    binding = {"event": "INSERT", "schema": "public", "table": table, "filter": f"id=in.({','.join(map(str, ids))})"}
    await client.join_topic("realtime:big", {"postgres_changes": [binding]})
    await client.wait_for(lambda f: is_text(f, "system") and f[4]["status"] == "ok", "Subscribed to PostgreSQL", timeout=20)
    return client


async def received_ids(client: PhoenixClient, count: int, timeout: float) -> list[Any]:
    frames = await client.wait_for(
        lambda _: sum(1 for f in client.frames if is_text(f, "postgres_changes")) >= count, f"{count} changes", timeout
    )
    del frames
    return sorted(f[4]["data"]["record"]["id"] for f in client.frames if is_text(f, "postgres_changes"))


def insert_in_one_transaction(statement: sql.Composable) -> str:
    """Run ``statement`` as one transaction; a WAL position its commit record comes after.

    (Read inside the transaction: other sessions' WAL after the commit would put
    ``pg_current_wal_lsn()`` past anything the slot confirms for this publication.)
    """
    with psycopg.connect(dsn()) as conn:
        conn.execute(statement)
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        conn.commit()
        return str(row[0])


async def flows(stream: Any, statement: sql.Composable, ids: list[int], what: str) -> PhoenixClient:
    """Commit ``statement`` as one transaction; wait until ``ids`` arrive and the slot passed it."""
    table, _, server, replicator = stream
    client = await subscribed(server, table, ids)
    assert replicator.process is not None
    peak = PeakRss(replicator.process.pid)
    started = time.monotonic()
    lsn = await asyncio.to_thread(insert_in_one_transaction, statement.format(sql.Identifier("public", table)))
    try:
        assert await received_ids(client, len(ids), timeout=240) == ids
        deadline = time.monotonic() + 30
        while not slot_confirmed_past(replicator.slot, lsn):
            assert time.monotonic() < deadline, "the slot was not consumed past the transaction"
            await asyncio.sleep(0.2)
    finally:
        top = peak.stop()
        await client.close()
    print(f"{what}: {time.monotonic() - started:.1f} s, replicator peak RSS {top / 2**20:.0f} MiB")
    assert top < MAX_RSS, f"replicator RSS reached {top / 2**20:.0f} MiB"
    return client


@pytest.mark.timeout(300)
async def test_one_transaction_of_500_rows_of_1_mb_flows_with_bounded_memory(stream) -> None:
    # Each body is 1 MB of text (a repeated md5 of its id, which TOAST compresses, but logical
    # decoding hands the replicator whole): 500 MB in one transaction.
    client = await flows(
        stream, sql.SQL("INSERT INTO {} SELECT g, repeat(md5(g::text), 31250) FROM generate_series(1, 500) g"),
        [1, 250, 500], "500 x 1 MB",
    )
    change = next(f for f in client.frames if is_text(f, "postgres_changes"))
    assert len(change[4]["data"]["record"]["body"]) == 1_000_000  # whole: under the 1 MiB record limit


@pytest.mark.timeout(300)
async def test_one_transaction_of_a_million_rows_flows_with_bounded_memory(stream) -> None:
    await flows(
        stream, sql.SQL("INSERT INTO {} SELECT g, 'row ' || g FROM generate_series(1, 1000000) g"),
        [1, 500_000, 1_000_000], "1,000,000 rows",
    )
