"""Broadcast from the database: delivery at least once across a replicator SIGKILL, replay order, limit and dedup.

Each test runs its own daphne server and ``manage.py replicate`` (whose second
slot streams ``realtime.messages``, PROTOCOL.md 5.4) on a private layer prefix
and slot. Subscribers speak vsn 2.0.0: live database broadcasts arrive as kind
4 frames with meta ``{"id": ...}``, replayed JSON rows as text ``broadcast``
frames with meta ``{"replayed": true, "id": ...}`` (PROTOCOL.md 5.5).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from realtime.dbsetup import SETUP_SQL
from tests.fixtures.replicator import ReplicatorProcess, start_replicator, unique_slot
from tests.fixtures.server import ServerProcess, mint_token, start_server

pytestmark = pytest.mark.integration

ROWS = 3_000
ROWS_PER_TRANSACTION = 50
KILL_AFTER_ROWS = 1_000
WAIT_S = 15.0
DELIVERY_TIMEOUT_S = 60.0


def dsn() -> str:
    return os.environ["DATABASE_URL"]


@dataclass
class Stack:
    slot: str
    env: dict[str, str]
    server: ServerProcess
    replicators: list[ReplicatorProcess] = field(default_factory=list)

    def start_replicator(self) -> ReplicatorProcess:
        process = start_replicator(self.slot, env=self.env)
        self.replicators.append(process)
        process.wait_messages_active()
        return process


@pytest.fixture
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    failed_before = request.session.testsfailed
    suffix = uuid.uuid4().hex[:10]
    publication = f"dbb_{suffix}"
    with psycopg.connect(dsn(), autocommit=True) as conn:
        conn.execute(SETUP_SQL)
        conn.execute(f'CREATE PUBLICATION "{publication}"')  # the change slot's: empty
    env = {"REALTIME_PUBLICATION": publication, "REALTIME_LAYER_PREFIX": f"dbb-{suffix}",
           "REALTIME_CHANNEL_ERROR_BACKOFF_MS": "0"}
    server = start_server(env=env)
    created = Stack(unique_slot("dbb"), env, server)
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
        with psycopg.connect(dsn(), autocommit=True) as conn:
            conn.execute(f'DROP PUBLICATION IF EXISTS "{publication}"')


def kind4(data: bytes) -> tuple[str, str, dict[str, Any], int, bytes]:
    """topic, event, meta, encoding, payload of a kind 4 frame (PROTOCOL.md 2.3)."""
    assert data[0] == 4
    topic_len, event_len, meta_len, encoding = data[1:5]
    at = 5
    topic = data[at:at + topic_len].decode()
    at += topic_len
    event = data[at:at + event_len].decode()
    at += event_len
    meta = json.loads(data[at:at + meta_len]) if meta_len else {}
    return topic, event, meta, encoding, data[at + meta_len:]


class Subscriber:
    """One vsn 2.0.0 socket on one topic; records (id, replayed) of every broadcast in arrival order."""

    def __init__(self, ws: ClientConnection, topic: str) -> None:
        self.ws = ws
        self.topic = topic
        self.frames: list[Any] = []
        self.received: list[tuple[str, bool]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def join(cls, server: ServerProcess, sub_topic: str, config: dict[str, Any], role: str = "anon") -> Subscriber:
        ws = await connect(f"{server.ws_url}?apikey={mint_token(role)}&vsn=2.0.0", open_timeout=WAIT_S)
        subscriber = cls(ws, f"realtime:{sub_topic}")
        await ws.send(json.dumps(["1", "1", subscriber.topic, "phx_join", {"config": config}]))
        return subscriber

    async def reply(self) -> Any:
        return (await self.wait_for(lambda f: f[3] == "phx_reply" and f[1] == "1", "the join reply"))[4]

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                if isinstance(message, bytes):
                    _, _, meta, _, _ = kind4(message)
                    self.received.append((meta["id"], bool(meta.get("replayed"))))
                    continue
                frame = json.loads(message)
                if frame[3] == "broadcast":
                    meta = frame[4]["meta"]
                    self.received.append((meta["id"], bool(meta.get("replayed"))))
                self.frames.append(frame)

    async def wait_for(self, predicate: Any, what: str, timeout: float = WAIT_S) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for frame in self.frames:
                if predicate(frame):
                    return frame
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {what} within {timeout} s; frames: {self.frames[-5:]!r}")

    async def wait_until(self, condition: Any, what: str, timeout: float = DELIVERY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{what} not reached within {timeout} s ({len(self.received)} received)")

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


def send_rows(sub_topic: str, count: int, private: bool, per_transaction: int = ROWS_PER_TRANSACTION) -> list[str]:
    """``realtime.send`` ``count`` times; returns the row ids in insertion order."""
    ids: list[str] = []
    with psycopg.connect(dsn(), autocommit=True) as conn:
        for start in range(0, count, per_transaction):
            with conn.transaction():
                for n in range(start, min(count, start + per_transaction)):
                    conn.execute("SELECT realtime.send(jsonb_build_object('n', %s::int), 'e', %s, %s)", (n, sub_topic, private))
        rows = conn.execute(
            "SELECT id::text FROM realtime.messages WHERE topic = %s ORDER BY inserted_at, (payload->>'n')::int",
            (sub_topic,),
        ).fetchall()
    ids = [row[0] for row in rows]
    return ids


async def test_database_broadcasts_are_delivered_at_least_once_across_a_replicator_sigkill(stack: Stack) -> None:
    stack.start_replicator()
    sub_topic = f"crash-{uuid.uuid4().hex[:8]}"
    subscriber = await Subscriber.join(stack.server, sub_topic, {"private": False})
    try:
        assert (await subscriber.reply())["status"] == "ok"
        written: list[str] = []
        writer = threading.Thread(target=lambda: written.extend(send_rows(sub_topic, ROWS, False)))
        writer.start()
        await subscriber.wait_until(lambda: len(subscriber.received) >= KILL_AFTER_ROWS, "rows before the kill")
        stack.replicators[0].kill()  # SIGKILL: no clean stop, the slot is not advanced past unpublished rows
        stack.start_replicator()
        await asyncio.get_running_loop().run_in_executor(None, writer.join)
        await subscriber.wait_until(lambda: {i for i, _ in subscriber.received} >= set(written), "every row")
        ids = [i for i, _ in subscriber.received]
        assert set(ids) == set(written)
        repeated = len(ids) - len(set(ids))
        print(f"{ROWS} rows, killed after {KILL_AFTER_ROWS}: 0 lost, {repeated} delivered twice")
    finally:
        await subscriber.close()


async def test_replay_sends_the_newest_rows_oldest_first_and_skips_them_live(stack: Stack) -> None:
    sub_topic = f"replay-{uuid.uuid4().hex[:8]}"
    since = int(time.time() * 1000) - 60_000
    # No replicator yet: the rows wait in the messages slot, and reach the channel live after its replay.
    stack.start_replicator()
    stack.replicators[0].stop()
    ids = send_rows(sub_topic, 30, True, per_transaction=1)
    # service_role bypasses RLS: read is granted, and the replay query runs after that check.
    subscriber = await Subscriber.join(
        stack.server, sub_topic, {"private": True, "broadcast": {"replay": {"since": since, "limit": 100}}}, "service_role"
    )
    try:
        assert (await subscriber.reply())["status"] == "ok"
        await subscriber.wait_until(lambda: len(subscriber.received) >= 25, "25 replayed rows", WAIT_S)
        replayed = subscriber.received[:25]
        assert replayed == [(i, True) for i in ids[5:]]  # the newest 25 (limit clamped), oldest first
        reply_at = next(n for n, f in enumerate(subscriber.frames) if f[3] == "phx_reply")
        first_broadcast = next(n for n, f in enumerate(subscriber.frames) if f[3] == "broadcast")
        assert reply_at < first_broadcast
        assert all(f[0] == "1" and f[1] is None for f in subscriber.frames if f[3] == "broadcast")
        stack.replicators[0].start()
        stack.replicators[0].wait_messages_active()
        await subscriber.wait_until(lambda: len(subscriber.received) >= 30, "the 5 older rows live")
        await asyncio.sleep(1.0)
        live = subscriber.received[25:]
        assert live == [(i, False) for i in ids[:5]]  # replayed ids are not delivered again
    finally:
        await subscriber.close()


async def test_replay_since_excludes_older_rows_and_a_later_join_can_use_limit(stack: Stack) -> None:
    stack.start_replicator()
    sub_topic = f"since-{uuid.uuid4().hex[:8]}"
    old = send_rows(sub_topic, 3, True, per_transaction=1)
    await asyncio.sleep(0.05)
    since = int(time.time() * 1000)
    await asyncio.sleep(0.05)
    new = send_rows(sub_topic, 6, True, per_transaction=1)[len(old):]
    await asyncio.sleep(1.0)  # published live to nobody before the join
    subscriber = await Subscriber.join(
        stack.server, sub_topic, {"private": True, "broadcast": {"replay": {"since": since, "limit": 2}}}, "service_role"
    )
    try:
        assert (await subscriber.reply())["status"] == "ok"
        await subscriber.wait_until(lambda: len(subscriber.received) >= 2, "2 replayed rows", WAIT_S)
        await asyncio.sleep(0.5)
        assert subscriber.received == [(new[4], True), (new[5], True)]
    finally:
        await subscriber.close()


async def test_a_database_broadcast_rate_limit_paces_delivery_and_drops_nothing(stack: Stack) -> None:
    """REALTIME_MAX_DB_BROADCASTS_PER_SECOND: a burst beyond one second's worth waits in the slot, then arrives whole."""
    rate, count = 40, 120
    process = start_replicator(stack.slot, env={**stack.env, "REALTIME_MAX_DB_BROADCASTS_PER_SECOND": str(rate)})
    stack.replicators.append(process)
    process.wait_messages_active()
    sub_topic = f"paced-{uuid.uuid4().hex[:8]}"
    subscriber = await Subscriber.join(stack.server, sub_topic, {"private": False})
    try:
        assert (await subscriber.reply())["status"] == "ok"
        started = time.monotonic()
        ids = await asyncio.to_thread(send_rows, sub_topic, count, False, count)  # one transaction
        await subscriber.wait_until(lambda: len(subscriber.received) >= count, f"{count} broadcasts")
        elapsed = time.monotonic() - started
        assert [row_id for row_id, _ in subscriber.received] == ids
        # One second's worth (the bucket) goes at once; the other 80 wait 2 s at 40/s.
        assert elapsed >= (count - rate) / rate * 0.9, elapsed
    finally:
        await subscriber.close()


async def test_joins_replaying_while_rows_are_sent_miss_none_and_repeat_none(stack: Stack) -> None:
    """A row committed while a join reads its replay arrives live; one the read saw is not repeated (PROTOCOL.md 5.5)."""
    stack.start_replicator()
    sub_topic = f"flood-{uuid.uuid4().hex[:8]}"
    stop = threading.Event()

    def send_until_stopped() -> None:
        with psycopg.connect(dsn(), autocommit=True) as conn:
            n = 0
            while not stop.is_set():
                conn.execute("SELECT realtime.send(jsonb_build_object('n', %s::int), 'e', %s, true)", (n, sub_topic))
                n += 1
                time.sleep(0.002)

    sender = threading.Thread(target=send_until_stopped)
    sender.start()
    subscribers: list[Subscriber] = []
    try:
        await asyncio.sleep(0.3)
        for _ in range(8):
            subscribers.append(await Subscriber.join(
                stack.server, sub_topic, {"private": True, "broadcast": {"replay": {"since": 0, "limit": 25}}},
                "service_role",
            ))
            await asyncio.sleep(0.15)
        for subscriber in subscribers:
            assert (await subscriber.reply())["status"] == "ok"
    finally:
        stop.set()
        await asyncio.to_thread(sender.join)
    try:
        with psycopg.connect(dsn(), autocommit=True) as conn:
            ids = [row[0] for row in conn.execute(
                "SELECT id::text FROM realtime.messages WHERE topic = %s ORDER BY (payload->>'n')::int", (sub_topic,)
            ).fetchall()]
        for subscriber in subscribers:
            await subscriber.wait_until(lambda s=subscriber: s.received and s.received[-1][0] == ids[-1], "the last row")
        await asyncio.sleep(0.5)
        for subscriber in subscribers:
            got = [row_id for row_id, _ in subscriber.received]
            flags = [replayed for _, replayed in subscriber.received]
            start = ids.index(got[0])
            assert got == ids[start:], "a gap or a repeat between the replayed and the live rows"
            replayed = flags.count(True)
            assert flags == [True] * replayed + [False] * (len(flags) - replayed)
            assert replayed == min(25, start + replayed) and 1 <= replayed
    finally:
        for subscriber in subscribers:
            await subscriber.close()
