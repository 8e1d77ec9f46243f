"""postgres_changes subscriptions when the database goes away and comes back (issue #10, item 7).

A real server process reaches the real PostgreSQL through a TCP proxy of the
test's own, which can refuse every connection for a while. The client must
hear about the failure (a ``system`` error) and be subscribed once the
database answers again, without re-joining.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from psycopg import sql

from tests.fixtures.phoenix import PhoenixClient, is_text
from tests.fixtures.server import start_server
from tests.integration.conftest import execute

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("realtime_schema")]


class Proxy:
    """Forwards TCP connections to ``target`` while ``open``; refuses (closes at once) otherwise."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.open = True
        self.links: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def refuse(self) -> None:
        """Refuse new connections and cut the ones in place (a database restart, as clients see it)."""
        self.open = False
        for writer in list(self.links):
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self.links.update((writer, upstream_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        try:
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        finally:
            self.links.difference_update((writer, upstream_writer))

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.links):
            writer.transport.abort()


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[Proxy, str]]:
    """A proxy in front of the test database, and the DATABASE_URL that goes through it."""
    url = urlsplit(os.environ["DATABASE_URL"])
    proxy = Proxy((url.hostname or "127.0.0.1", url.port or 5432))
    port = await proxy.start()
    netloc = url.netloc.rsplit(":", 1)[0] if url.port else url.netloc
    yield proxy, urlunsplit(url._replace(netloc=f"{netloc}:{port}"))
    await proxy.close()


@pytest.fixture
def published_table(publication: str) -> Iterator[str]:
    table = f"faults_{uuid.uuid4().hex[:8]}"
    name = sql.Identifier("public", table)
    execute(
        sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, title text)").format(name),
        sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(publication), name),
        sql.SQL("GRANT SELECT ON {} TO anon").format(name),
    )
    yield table
    execute(sql.SQL("DROP TABLE IF EXISTS {}").format(name))


def system_for(client: PhoenixClient, status: str) -> Any:
    return lambda frame: is_text(frame, "system") and frame[4]["status"] == status and frame[4]["extension"] == "postgres_changes"


@pytest.mark.timeout(90)
async def test_a_subscription_made_while_the_database_refuses_is_retried_until_it_answers(
    proxy: tuple[Proxy, str], publication: str, published_table: str
) -> None:
    gate, database_url = proxy
    env = {"DATABASE_URL": database_url, "REALTIME_PUBLICATION": publication, "REALTIME_SUBSCRIBE_RETRY_MS": "1000"}
    server = await asyncio.to_thread(start_server, env=env)  # its start-up goes through the proxy on this loop
    client = None
    try:
        gate.refuse()
        client = await PhoenixClient.open(server, "client")
        binding = {"event": "*", "schema": "public", "table": published_table}
        await client.join_topic("realtime:faults", {"postgres_changes": [binding]})
        error = await client.wait_for(system_for(client, "error"), "the subscription's system error", timeout=20)
        assert error[4]["message"] == "Realtime was unable to connect to the project database"
        assert not any(is_text(f, "system") and f[4]["status"] == "ok" for f in client.frames)
        await asyncio.sleep(2.5)  # retries keep failing meanwhile, and say so
        gate.open = True
        await client.wait_for(system_for(client, "ok"), "Subscribed to PostgreSQL after the database came back", timeout=20)
        # One subscription: it took effect once, whatever the number of failed tries.
        assert sum(1 for f in client.frames if is_text(f, "system") and f[4]["status"] == "ok") == 1
        assert json.dumps(client.frames).count("phx_close") == 0
    finally:
        if client is not None:
            await client.close()
        server.stop()
