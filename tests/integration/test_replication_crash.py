"""Replicator crashes: a SIGKILL loses no change, a standby takes over within 5 s, Redis restarts lose nothing.

Each test runs its own daphne server and ``manage.py replicate`` processes on
a private publication, layer prefix and slot, so no other listener publishes
into its groups. The subscriber speaks vsn 2.0.0 frames (PROTOCOL.md 2.2) over
the ``websockets`` client and records the id of every postgres_changes record
in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg import sql
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from devservices.redis import redis_server_path
from realtime.dbsetup import SETUP_SQL
from tests.fixtures.replicator import ReplicatorProcess, start_replicator, unique_slot
from tests.fixtures.server import ServerProcess, free_port, mint_token, start_server

pytestmark = pytest.mark.integration

ROWS = 10_000
ROWS_PER_TRANSACTION = 100
KILL_AFTER_ROWS = 3_000
WRITE_PAUSE_S = 0.005
ACTIVE_TIMEOUT_S = 30.0
DELIVERY_TIMEOUT_S = 40.0
TAKEOVER_LIMIT_S = 5.0
WAIT_S = 10.0
HEARTBEAT_S = 20.0
SETTLE_S = 0.5


def dsn() -> str:
    return os.environ["DATABASE_URL"]


@dataclass
class Stack:
    """One test's table, publication, server and replicators on a shared slot."""

    table: str
    publication: str
    slot: str
    env: dict[str, str]
    server: ServerProcess
    replicators: list[ReplicatorProcess] = field(default_factory=list)

    def start_replicator(self) -> ReplicatorProcess:
        process = start_replicator(self.slot, env=self.env)
        self.replicators.append(process)
        return process

    def insert_sql(self) -> sql.Composed:
        return sql.SQL("INSERT INTO {} (id) SELECT g FROM generate_series(%s::bigint, %s::bigint) AS g").format(
            sql.Identifier("public", self.table)
        )

    def held_locks(self) -> int:
        """Granted advisory locks held by connections of this slot's replicators."""
        with psycopg.connect(dsn(), autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = %s",
                (f"realtime replicate {self.slot}",),
            ).fetchone()
        return int(row[0]) if row else 0


@contextlib.contextmanager
def make_stack(request: pytest.FixtureRequest, extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    failed_before = request.session.testsfailed
    suffix = uuid.uuid4().hex[:10]
    table, publication = f"crash_{suffix}", f"crash_{suffix}"
    ident = sql.Identifier("public", table)
    with psycopg.connect(dsn(), autocommit=True) as conn:
        conn.execute(SETUP_SQL)
        conn.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, note text)").format(ident))
        conn.execute(sql.SQL("GRANT SELECT ON {} TO anon, authenticated, service_role").format(ident))
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(sql.Identifier(publication), ident))
    env = {"REALTIME_PUBLICATION": publication, "REALTIME_LAYER_PREFIX": f"crash-{suffix}", **(extra_env or {})}
    try:
        server = start_server(env=env)
        created = Stack(table, publication, unique_slot("crash"), env, server)
        try:
            yield created
        finally:
            failed = request.session.testsfailed > failed_before
            for process in [*created.replicators, server]:
                process.stop()
                if failed:
                    print(process.describe("log"))
                process.remove_log()
            if created.replicators:
                created.replicators[0].drop_slot()
    finally:
        with psycopg.connect(dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(publication)))
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))


@pytest.fixture
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    with make_stack(request) as created:
        yield created


class PrivateRedis:
    """A Redis server of one test's own (the bundled binary, no persistence), to kill and restart."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(redis_server_path()), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory),
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def redis_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Stack, PrivateRedis]]:
    private = PrivateRedis(tmp_path)
    private.start()
    try:
        with make_stack(request, {"REDIS_URL": private.url}) as created:
            yield created, private
    finally:
        private.kill()


class Subscriber:
    """One vsn 2.0.0 socket joined to a table; records each change's record id as it arrives."""

    def __init__(self, ws: ClientConnection, topic: str) -> None:
        self.ws = ws
        self.topic = topic
        self.frames: list[Any] = []
        self.ids: list[int] = []
        self.arrivals: list[float] = []
        self._ref = 0
        self._reader = asyncio.create_task(self._read())
        self._heartbeat = asyncio.create_task(self._beat())

    @classmethod
    async def join(cls, server: ServerProcess, table: str) -> Subscriber:
        ws = await connect(f"{server.ws_url}?apikey={mint_token('anon')}&vsn=2.0.0", open_timeout=WAIT_S)
        subscriber = cls(ws, f"realtime:crash-{uuid.uuid4().hex[:8]}")
        binding = {"event": "INSERT", "schema": "public", "table": table}
        ref = await subscriber.push("phx_join", {"config": {"postgres_changes": [binding]}})
        reply = await subscriber.wait_for(lambda f: f[3] == "phx_reply" and f[1] == ref, "the join reply")
        assert reply[4]["status"] == "ok", reply
        system = await subscriber.wait_for(lambda f: f[3] == "system", "the postgres_changes system message")
        assert system[4]["message"] == "Subscribed to PostgreSQL", system
        return subscriber

    def next_ref(self) -> str:
        self._ref += 1
        return str(self._ref)

    async def push(self, event: str, payload: Any, topic: str | None = None) -> str:
        ref = self.next_ref()
        join_ref = "1" if topic is None else None
        await self.ws.send(json.dumps([join_ref, ref, topic or self.topic, event, payload]))
        return ref

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                if isinstance(message, bytes):
                    continue
                frame = json.loads(message)
                if frame[3] == "postgres_changes":
                    self.ids.append(int(frame[4]["data"]["record"]["id"]))
                    self.arrivals.append(time.monotonic())
                else:
                    self.frames.append(frame)

    async def _beat(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(HEARTBEAT_S)
                await self.push("heartbeat", {}, topic="phoenix")

    async def wait_for(self, predicate: Callable[[Any], bool], what: str, timeout: float = WAIT_S) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for frame in self.frames:
                if predicate(frame):
                    return frame
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {what} within {timeout} s; frames: {self.frames!r}")

    async def wait_until(self, condition: Callable[[], bool], what: str, timeout: float) -> float:
        """Poll ``condition``; returns the monotonic time it first held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return time.monotonic()
            await asyncio.sleep(0.005)
        raise AssertionError(f"{what} not reached within {timeout} s ({len(self.ids)} changes received)")

    async def close(self) -> None:
        self._heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._heartbeat
        await self.ws.close()
        await self._reader


@pytest.fixture
async def subscribe() -> AsyncIterator[Callable[[Stack], Any]]:
    opened: list[Subscriber] = []

    async def _subscribe(stack: Stack) -> Subscriber:
        subscriber = await Subscriber.join(stack.server, stack.table)
        opened.append(subscriber)
        return subscriber

    yield _subscribe
    for subscriber in opened:
        await subscriber.close()


async def write_rows(stack: Stack, written: list[int]) -> None:
    """Insert ids 1..ROWS, ROWS_PER_TRANSACTION per committed transaction; ``written[0]`` is the last id."""
    async with await psycopg.AsyncConnection.connect(dsn(), autocommit=True) as conn:
        statement = stack.insert_sql()
        for first in range(1, ROWS + 1, ROWS_PER_TRANSACTION):
            last = first + ROWS_PER_TRANSACTION - 1
            await conn.execute(statement, (first, last))
            written[0] = last
            await asyncio.sleep(WRITE_PAUSE_S)


def first_occurrences(ids: list[int]) -> list[int]:
    seen: set[int] = set()
    firsts = []
    for value in ids:
        if value not in seen:
            seen.add(value)
            firsts.append(value)
    return firsts


@pytest.mark.timeout(90)
async def test_replicator_sigkill_loses_nothing(stack: Stack, subscribe: Any) -> None:
    first = stack.start_replicator()
    await asyncio.to_thread(first.wait_active, ACTIVE_TIMEOUT_S)
    subscriber = await subscribe(stack)
    started = time.monotonic()
    written = [0]
    writer = asyncio.create_task(write_rows(stack, written))

    await subscriber.wait_until(lambda: len(subscriber.ids) >= KILL_AFTER_ROWS, f"{KILL_AFTER_ROWS} changes", WAIT_S)
    first.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    seen_at_kill, written_at_kill = len(set(subscriber.ids)), written[0]
    assert 0 < seen_at_kill < ROWS and written_at_kill < ROWS, "the kill must land in the middle of the writes"

    second = stack.start_replicator()
    await asyncio.to_thread(second.wait_active, ACTIVE_TIMEOUT_S)
    restarted_in = time.monotonic() - killed_at
    await asyncio.wait_for(writer, DELIVERY_TIMEOUT_S)
    done_at = await subscriber.wait_until(
        lambda: len(set(subscriber.ids)) >= ROWS, f"all {ROWS} ids", DELIVERY_TIMEOUT_S
    )
    await asyncio.sleep(SETTLE_S)

    firsts = first_occurrences(subscriber.ids)
    duplicates = len(subscriber.ids) - len(firsts)
    print(
        f"kill -9 after {seen_at_kill} ids seen / {written_at_kill} written; restart active in {restarted_in:.2f} s;"
        f" received {len(subscriber.ids)} frames, {len(firsts)} distinct, {duplicates} duplicates;"
        f" all delivered {done_at - started:.2f} s after the first write"
    )
    assert sorted(firsts) == list(range(1, ROWS + 1)), f"missing ids: {sorted(set(range(1, ROWS + 1)) - set(firsts))[:20]}"
    out_of_order = [(a, b) for a, b in zip(firsts, firsts[1:]) if b < a]
    assert not out_of_order, f"first occurrences out of commit order: {out_of_order[:10]}"


# A replicator stopped with SIGTERM finishes its page and closes the connection holding the lock:
# the standby, polling every STANDBY_POLL_S, is active within that and the stop's own latency.
SIGTERM_TAKEOVER_LIMIT_S = 2.5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
async def test_standby_takes_over_within_5s(stack: Stack, subscribe: Any, stop_signal: signal.Signals) -> None:
    active = stack.start_replicator()
    await asyncio.to_thread(active.wait_active, ACTIVE_TIMEOUT_S)
    standby = stack.start_replicator()
    await asyncio.to_thread(standby.wait_standby, ACTIVE_TIMEOUT_S)
    subscriber = await subscribe(stack)
    async with await psycopg.AsyncConnection.connect(dsn(), autocommit=True) as conn:
        await conn.execute(stack.insert_sql(), (1, 1))
        await subscriber.wait_until(lambda: 1 in subscriber.ids, "the change before the kill", WAIT_S)
        assert not standby.is_active()
        assert await asyncio.to_thread(stack.held_locks) == 1

        active.kill(stop_signal)
        killed_at = time.monotonic()
        takeover = asyncio.create_task(asyncio.to_thread(standby.wait_active, TAKEOVER_LIMIT_S * 2))
        await conn.execute(stack.insert_sql(), (2, 2))
        delivered_at = await subscriber.wait_until(
            lambda: 2 in subscriber.ids, "the change after the kill", TAKEOVER_LIMIT_S * 2
        )
        became_active_in = await takeover

    delivered_in = delivered_at - killed_at
    print(f"standby active {became_active_in:.2f} s after the kill; the next change arrived after {delivered_in:.2f} s")
    assert delivered_in <= TAKEOVER_LIMIT_S, f"the change took {delivered_in:.2f} s after the kill"
    assert standby.is_active()
    if stop_signal == signal.SIGTERM:
        assert became_active_in <= SIGTERM_TAKEOVER_LIMIT_S, f"the standby took over {became_active_in:.2f} s after SIGTERM"
        assert active.process is not None and active.process.wait(5) == 0, active.describe("did not stop cleanly")
    assert subscriber.ids == [1, 2]


@pytest.mark.timeout(90)
async def test_a_redis_restart_loses_no_committed_change(redis_stack: tuple[Stack, PrivateRedis], subscribe: Any) -> None:
    stack, private_redis = redis_stack
    replicator = stack.start_replicator()
    await asyncio.to_thread(replicator.wait_active, ACTIVE_TIMEOUT_S)
    subscriber = await subscribe(stack)
    async with await psycopg.AsyncConnection.connect(dsn(), autocommit=True) as conn:
        await conn.execute(stack.insert_sql(), (1, 100))
        await subscriber.wait_until(lambda: len(set(subscriber.ids)) >= 100, "the changes before the restart", WAIT_S)

        private_redis.kill()  # a restart without persistence: every group membership is gone
        await conn.execute(stack.insert_sql(), (101, 200))  # committed while Redis is down
        await asyncio.sleep(1.0)
        restarted_at = time.monotonic()
        await asyncio.to_thread(private_redis.start)
        await conn.execute(stack.insert_sql(), (201, 300))

        done_at = await subscriber.wait_until(
            lambda: len(set(subscriber.ids)) >= 300, "every change after the restart", DELIVERY_TIMEOUT_S
        )
    print(f"all 300 changes delivered {done_at - restarted_at:.2f} s after Redis came back")
    assert sorted(set(subscriber.ids)) == list(range(1, 301))
    assert replicator.is_running() and stack.server.process is not None and stack.server.process.poll() is None
