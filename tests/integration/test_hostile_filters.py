"""A hostile ``match`` filter cannot stall the server for anyone else (PROTOCOL.md 4.2, 4.3).

One real daphne server and the session replicator (``tests.fixtures.replicator``) on the
publication they share; the clients speak vsn 2.0.0 over the ``websockets`` client
(``tests.fixtures.phoenix``). Under Python's backtracking ``re``, ``^(\\w+\\s?)*$`` on the
first 26-word title ending in "!" froze the whole server process for good (8 words took 3 s);
with RE2 the match is linear in the title, so a bystander on another topic keeps prompt
heartbeat replies.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest
from django.conf import settings
from psycopg import sql

from realtime.dbsetup import SETUP_SQL
from tests.fixtures.phoenix import PhoenixClient, client_opener, is_text
from tests.fixtures.replicator import ReplicatorProcess
from tests.fixtures.server import ServerProcess, start_server
from tests.integration.conftest import dsn, execute

pytestmark = pytest.mark.integration

HOSTILE_FILTER = r"title=match.^(\w+\s?)*$"
# 26 words and a "!": the shape that made ``^(\w+\s?)*$`` backtrack exponentially.
HOSTILE_TITLE = (
    "the quick brown fox jumps over the lazy dog while five boxing wizards jump quickly"
    " and pack my box with five dozen liquor jugs before nightfall!"
)
MATCHING_TITLE = "hello world"
HOSTILE_ROWS = 5
ROW_GAP_S = 0.05
HEARTBEAT_GAP_S = 0.005
AFTER_LAST_ROW_S = 0.3
MAX_HEARTBEAT_S = 0.1
MIN_HEARTBEATS = 20
SUBSCRIBE_ERROR_PREFIX = (
    "Unable to subscribe to changes with given parameters. An exception happened"
)

OpenClient = Callable[[ServerProcess, str], Awaitable[PhoenixClient]]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with start_server() as process:
        yield process


@pytest.fixture
def published_table(replicator: ReplicatorProcess) -> Iterator[str]:
    """A table anon may read, in the publication the running replicator streams."""
    name = f"hostile_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier("public", name)
    execute(
        SETUP_SQL,
        sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, title text)").format(ident),
        sql.SQL("GRANT SELECT ON {} TO anon, authenticated, service_role").format(ident),
        sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
            sql.Identifier(settings.REALTIME_PUBLICATION), ident
        ),
    )
    yield name
    execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))


@pytest.fixture
async def open_client(server: ServerProcess) -> AsyncIterator[OpenClient]:
    async with client_opener(PhoenixClient) as opener:
        yield opener
    server.check_alive()


def binding(table: str, filter_text: str) -> dict[str, Any]:
    return {"event": "INSERT", "schema": "public", "table": table, "filter": filter_text}


def postgres_changes_system(frame: Any) -> bool:
    return is_text(frame, "system") and frame[4].get("extension") == "postgres_changes"


def insert_rows(table: str, titles: list[str]) -> None:
    """One transaction per row, spaced out so the server matches them while heartbeats run."""
    statement = sql.SQL("INSERT INTO {} (id, title) VALUES (%s, %s)").format(
        sql.Identifier("public", table)
    )
    with psycopg.connect(dsn(), autocommit=True) as conn:
        for row_id, title in enumerate(titles, start=1):
            conn.execute(statement, (row_id, title))
            time.sleep(ROW_GAP_S)


async def heartbeat_round_trips(client: PhoenixClient, stop: asyncio.Event) -> list[float]:
    """Seconds from each heartbeat push to its reply, one after another until ``stop``."""
    trips: list[float] = []
    while not stop.is_set():
        started = time.perf_counter()
        ref = await client.push("phoenix", "heartbeat", {})
        await client.wait_for(
            lambda f, ref=ref: is_text(f, "phx_reply") and f[2] == "phoenix" and f[1] == ref,
            f"heartbeat reply {ref}",
        )
        trips.append(time.perf_counter() - started)
        await asyncio.sleep(HEARTBEAT_GAP_S)
    return trips


async def test_hostile_match_filter_does_not_delay_other_sockets(
    server: ServerProcess, published_table: str, open_client: OpenClient
) -> None:
    hostile = await open_client(server, "hostile")
    bystander = await open_client(server, "bystander")
    await hostile.join_topic(
        "realtime:hostile", {"postgres_changes": [binding(published_table, HOSTILE_FILTER)]}
    )
    subscribed = await hostile.wait_for(postgres_changes_system, "postgres_changes system event")
    assert subscribed[4]["status"] == "ok", subscribed
    await bystander.join_topic(
        "realtime:bystander",
        {"broadcast": {"ack": False, "self": False}, "presence": {"enabled": False}},
    )

    stop = asyncio.Event()
    sampler = asyncio.create_task(heartbeat_round_trips(bystander, stop))
    try:
        # The matching row goes last: once it arrives, every hostile row has been matched.
        await asyncio.to_thread(
            insert_rows, published_table, [HOSTILE_TITLE] * HOSTILE_ROWS + [MATCHING_TITLE]
        )
        await hostile.wait_for(
            lambda f: is_text(f, "postgres_changes")
            and f[4]["data"]["record"]["title"] == MATCHING_TITLE,
            "the matching row",
        )
        await asyncio.sleep(AFTER_LAST_ROW_S)
    finally:
        stop.set()
        trips = await sampler

    titles = [
        f[4]["data"]["record"]["title"] for f in hostile.frames if is_text(f, "postgres_changes")
    ]
    assert titles == [MATCHING_TITLE]
    slowest = max(trips)
    print(f"bystander heartbeats: {len(trips)}, slowest round trip {slowest * 1000:.1f} ms")
    assert len(trips) >= MIN_HEARTBEATS
    assert slowest < MAX_HEARTBEAT_S, f"slowest heartbeat round trip {slowest * 1000:.1f} ms"


async def test_pattern_re2_cannot_run_is_refused_at_subscribe_time(
    server: ServerProcess, published_table: str, open_client: OpenClient
) -> None:
    client = await open_client(server, "backreference")
    await client.join_topic(
        "realtime:backreference",
        {"postgres_changes": [binding(published_table, r"title=match.(a)\1")]},
    )
    system = await client.wait_for(postgres_changes_system, "postgres_changes system event")
    assert system[4]["status"] == "error", system
    message = system[4]["message"]
    assert message.startswith(SUBSCRIBE_ERROR_PREFIX), message
    assert "invalid regular expression" in message, message


async def test_one_socket_s_regex_filters_are_bounded_across_its_channels(
    server: ServerProcess, published_table: str, open_client: OpenClient
) -> None:
    # About 2,050 RE2 instructions each: one fits the per-socket budget (2,500), a second does not.
    heavy = r"title=match.(.{0,255})*x"
    client = await open_client(server, "regex budget")
    await client.join_topic("realtime:budget-1", {"postgres_changes": [binding(published_table, heavy)]})
    first = await client.wait_for(postgres_changes_system, "the first channel's subscription")
    assert first[4]["status"] == "ok", first
    await client.join_topic("realtime:budget-2", {"postgres_changes": [binding(published_table, heavy)]})
    second = await client.wait_for(
        lambda f: postgres_changes_system(f) and f[2] == "realtime:budget-2", "the second channel's subscription"
    )
    assert second[4]["status"] == "error", second
    assert second[4]["message"].startswith("Too many regular expression filters on this socket"), second
    # Another socket has a budget of its own.
    other = await open_client(server, "other socket")
    await other.join_topic("realtime:budget-3", {"postgres_changes": [binding(published_table, heavy)]})
    third = await other.wait_for(postgres_changes_system, "another socket's subscription")
    assert third[4]["status"] == "ok", third
