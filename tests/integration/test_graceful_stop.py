"""The graceful stop (README, Running in production): drain, 1012, RealtimeRestarting, no presence ghost.

The first tests run the application in-process (``connect``) and drive the
runtime's drain directly. The last one runs ``manage.py runserver --workers
2``: two daphne processes on one port (SO_REUSEPORT), 1,000 sockets on them,
some tracking presence; one process gets SIGTERM; every socket it had is
closed with 1012, reconnects to the port (and so to the survivor, the
drained process no longer listening) and rejoins within the drain time plus
10 s, and presence lists exactly the live clients.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from tests.fixtures.server import HOST, ServerProcess, mint_token
from tests.integration.test_change_faults import create_table

pytestmark = pytest.mark.integration


def text(frame: dict[str, Any]) -> Any:
    assert frame["type"] == "websocket.send", frame
    return json.loads(frame["text"])


async def test_a_join_during_the_drain_is_answered_realtime_restarting(connect) -> None:
    from realtime.runtime import get_runtime

    client = await connect()
    assert (await client.join("realtime:before"))[4]["status"] == "ok"
    get_runtime().draining = True
    reply = await client.join("realtime:during", ref="2")
    assert reply == ["2", "2", "realtime:during", "phx_reply", {
        "status": "error", "response": {"reason": "RealtimeRestarting: Realtime is restarting, please standby"},
    }]


async def test_a_socket_upgraded_after_the_drains_last_batch_is_closed_with_1012(connect) -> None:
    """Accepted by the kernel before the listener closed, upgraded late: it is closed, never left open."""
    from realtime.runtime import get_runtime

    await connect()  # the runtime exists
    get_runtime().draining = True
    late = await connect()
    assert await late.ws.receive_output(5) == {"type": "websocket.close", "code": 1012}


@pytest.fixture
def table(publication: str) -> Iterator[str]:
    """A published table anon may read; dropped afterwards."""
    yield from create_table(publication, "id bigint PRIMARY KEY", sql.SQL("GRANT SELECT ON {ident} TO anon"))


async def test_the_drain_closes_every_socket_with_1012_and_sends_the_leaves(connect, table: str) -> None:
    from django.conf import settings
    from redis.asyncio import Redis

    from realtime.presence import get_store
    from realtime.runtime import get_runtime
    from shared.claimsets import Keys

    topic = f"realtime:drain-{uuid.uuid4().hex[:8]}"
    clients = [await connect() for _ in range(3)]
    for index, client in enumerate(clients):
        await client.join(topic, {"presence": {"enabled": True, "key": f"k{index}"}})
        await client.push("1", str(10 + index), topic, "presence", {"type": "presence", "event": "track", "payload": {"n": index}})
    # One channel with postgres_changes: this process registers a claim set in Redis.
    changes_topic = f"realtime:drain-changes-{uuid.uuid4().hex[:8]}"
    changes = await connect()
    reply = await changes.join(changes_topic, {"postgres_changes": [{"event": "*", "schema": "public", "table": table}]})
    assert reply[4]["status"] == "ok", reply
    assert (await changes.recv_event("system", timeout=10))[4]["status"] == "ok"
    clients.append(changes)
    registration = get_runtime().hub.registration
    assert registration is not None
    keys = Keys(settings.REALTIME_REDIS_PREFIX)
    redis = Redis.from_url(settings.REDIS_URL)
    assert await redis.zscore(keys.processes, registration.process_id) is not None
    presence_channel = "public:" + topic.removeprefix("realtime:")
    runtime = get_runtime()
    for _ in range(50):
        if len(await get_store().list(presence_channel)) == 3:
            break
        await asyncio.sleep(0.05)
    assert len(await get_store().list(presence_channel)) == 3
    drain = asyncio.ensure_future(runtime.drain(1.0))
    for client in clients:
        while True:
            message = await client.ws.receive_output(5)
            if message["type"] == "websocket.close":
                assert message["code"] == 1012
                break
    for client in clients:
        await client.ws.disconnect()  # the client's side of the close: the consumer ends
    await asyncio.wait_for(drain, 10)
    assert runtime.closed and not runtime.sockets
    from presence.store import RedisPresenceStore

    reader = RedisPresenceStore(settings.REDIS_URL, "reader", ttl=15)
    try:
        assert not await reader.list(presence_channel)
        # The claim sets of this process are gone from the registry at once, not after their TTL.
        assert await redis.zscore(keys.processes, registration.process_id) is None
        assert not await redis.exists(keys.process(registration.process_id))
    finally:
        await reader.close()
        await redis.aclose()


# --- two processes on one port ------------------------------------------------------------

SOCKETS = 1_000
PRESENCE_EVERY = 10  # one socket in ten tracks a presence member (100 members)
DRAIN_S = 2
REJOIN_LIMIT_S = DRAIN_S + 10.0
GHOST_WAIT_S = 5.0  # well below REALTIME_PRESENCE_TTL_S (15): a ghost would outlive it
OPEN_CONCURRENCY = 100


def ws_frame(opcode: int, data: bytes) -> bytes:
    """A masked, unfragmented client frame (RFC 6455 5.2)."""
    mask = os.urandom(4)
    length = len(data)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    else:
        header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


class LiteSocket:
    """A minimal vsn 2.0.0 client on asyncio streams: joins, tracks, answers pings, reconnects once closed."""

    def __init__(self, index: int, port: int, topic: str, presence_key: str | None, token: str, track: bool = True) -> None:
        self.index = index
        self.track = track
        self.port = port
        self.topic = topic
        self.presence_key = presence_key
        self.token = token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.local_port = 0
        self.ref = 0
        self.close_codes: list[int | None] = []
        self.closed_at: float | None = None
        self.rejoined_at: float | None = None
        self.reconnect = True
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    async def open(self) -> None:
        reader, writer = await asyncio.open_connection(HOST, self.port)
        key = base64.b64encode(os.urandom(16)).decode()
        path = f"/realtime/v1/websocket?apikey={self.token}&vsn=2.0.0"
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head[:200]
        self.reader, self.writer = reader, writer
        self.local_port = writer.get_extra_info("sockname")[1]
        config: dict[str, Any] = {"broadcast": {"self": False, "ack": False}}
        if self.presence_key is not None:
            config["presence"] = {"enabled": True, "key": self.presence_key}
        reply = await self.request(self.topic, "phx_join", {"config": config})
        assert reply["status"] == "ok", reply
        if self.presence_key is not None and self.track:
            reply = await self.request(self.topic, "presence", {"type": "presence", "event": "track", "payload": {"i": self.index}})
            assert reply == {"status": "ok", "response": {}}, reply

    def send(self, frame: list[Any]) -> None:
        assert self.writer is not None
        self.writer.write(ws_frame(0x1, json.dumps(frame).encode()))

    async def request(self, topic: str, event: str, payload: Any) -> Any:
        """Push and read frames until its reply (the join's ref is its join_ref)."""
        self.ref += 1
        ref = str(self.ref)
        join_ref = ref if event == "phx_join" else self.join_ref
        if event == "phx_join":
            self.join_ref = ref
        self.send([join_ref, ref, topic, event, payload])
        while True:
            kind, data = await self.read_frame()
            if kind == 0x8:
                raise ConnectionError(f"closed while waiting for the reply to {event}: {data[:2].hex()}")
            if kind == 0x1:
                frame = json.loads(data)
                if frame[3] == "phx_reply" and frame[1] == ref:
                    return frame[4]

    join_ref = "1"

    async def read_frame(self) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        while True:
            b1, b2 = await self.reader.readexactly(2)
            length = b2 & 0x7F
            if length == 126:
                length = int.from_bytes(await self.reader.readexactly(2), "big")
            elif length == 127:
                length = int.from_bytes(await self.reader.readexactly(8), "big")
            data = await self.reader.readexactly(length)
            kind = b1 & 0x0F
            if kind == 0x9:
                self.writer.write(ws_frame(0xA, data))
                continue
            return kind, data

    async def run(self) -> None:
        """Read until closed; then reconnect and rejoin (once), and read on."""
        try:
            while True:
                try:
                    kind, data = await self.read_frame()
                except (asyncio.IncompleteReadError, ConnectionError):
                    kind, data = 0x8, b""
                if kind != 0x8:
                    continue
                self.close_codes.append(int.from_bytes(data[:2], "big") if len(data) >= 2 else None)
                self.closed_at = time.monotonic()
                assert self.writer is not None
                self.writer.close()
                if not self.reconnect:
                    return
                await self.open()
                self.rejoined_at = time.monotonic()
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # reported by the test
            self.error = error

    async def close(self) -> None:
        self.reconnect = False
        if self.task is not None:
            self.task.cancel()
        if self.writer is not None:
            self.writer.close()


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def sockets_by_pid(pids: list[int], port: int) -> dict[int, dict[str, set[int]]]:
    """Per pid: ``listen`` (listening sockets on ``port``) and ``peers`` (client ports of its connections)."""
    inodes: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes[int(link[8:-1])] = pid
    found: dict[int, dict[str, set[int]]] = {pid: {"listen": set(), "peers": set()} for pid in pids}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
        if int(local.split(":")[1], 16) != port or inode not in inodes:
            continue
        if state == "0A":
            found[inodes[inode]]["listen"].add(inode)
        elif state == "01":
            found[inodes[inode]]["peers"].add(int(remote.split(":")[1], 16))
    return found


class Workers(ServerProcess):
    """``manage.py runserver HOST:PORT --workers N``."""

    def __init__(self, count: int, env: dict[str, str]) -> None:
        super().__init__(env=env)
        self.count = count

    def command(self) -> list[str]:
        return [*super().command(), "--workers", str(self.count)]

    def wait_listening(self, timeout: float) -> list[int]:
        """The children's pids once each has its own listening socket on the port."""
        assert self.pid is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            pids = children(self.pid)
            found = sockets_by_pid(pids, self.port)
            if len(pids) == self.count and all(found[p]["listen"] for p in pids):
                return pids
            time.sleep(0.2)
        raise AssertionError(self.describe(f"has not {self.count} listening children after {timeout:.0f} s"))


@pytest.fixture
def workers() -> Iterator[Workers]:
    env = {"REALTIME_DRAIN_S": str(DRAIN_S), "REALTIME_MAX_CONCURRENT_USERS": "0"}
    server = Workers(2, env)
    with server:
        yield server


@pytest.mark.timeout(180)
async def test_sigterm_drains_one_of_two_processes_onto_the_other_without_ghosts(workers: Workers) -> None:
    pids = await asyncio.to_thread(workers.wait_listening, 60)
    run = uuid.uuid4().hex[:8]
    plain_topic, presence_topic = f"realtime:drain-{run}", f"realtime:drain-presence-{run}"
    token = mint_token("anon")
    clients = [
        LiteSocket(i, workers.port, presence_topic if i % PRESENCE_EVERY == 0 else plain_topic,
                   f"member-{i}" if i % PRESENCE_EVERY == 0 else None, token)
        for i in range(SOCKETS)
    ]
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def open_one(client: LiteSocket) -> None:
        async with gate:
            await client.open()
        client.task = asyncio.create_task(client.run())

    try:
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(open_one(c) for c in clients)), 90)
        print(f"{SOCKETS} sockets joined in {time.monotonic() - started:.1f} s")

        found = sockets_by_pid(pids, workers.port)
        where = {port: pid for pid in pids for port in found[pid]["peers"]}
        assert all(c.local_port in where for c in clients), "a socket is on neither process"
        # The process with more presence members stops, so the test sees their leaves.
        victim = max(pids, key=lambda p: sum(1 for c in clients if c.presence_key and where[c.local_port] == p))
        survivor = next(p for p in pids if p != victim)
        moved = [c for c in clients if where[c.local_port] == victim]
        stayed = [c for c in clients if where[c.local_port] == survivor]
        moved_members = sum(1 for c in moved if c.presence_key)
        print(f"victim pid {victim}: {len(moved)} sockets ({moved_members} members); survivor pid {survivor}: {len(stayed)}")
        assert moved and stayed and moved_members

        stopped_at = time.monotonic()
        os.kill(victim, signal.SIGTERM)
        deadline = stopped_at + REJOIN_LIMIT_S
        while any(c.rejoined_at is None for c in moved) and time.monotonic() < deadline:
            assert not [c.error for c in clients if c.error], [repr(c.error) for c in clients if c.error][:3]
            await asyncio.sleep(0.1)
        late = [c for c in moved if c.rejoined_at is None]
        assert not late, f"{len(late)} of {len(moved)} sockets did not rejoin within {REJOIN_LIMIT_S} s: {late[0].close_codes}"
        rejoined_in = max(c.rejoined_at or 0 for c in moved) - stopped_at
        closes = [c.closed_at or 0 for c in moved]
        print(f"closes spread over {max(closes) - min(closes):.2f} s; all rejoined {rejoined_in:.2f} s after SIGTERM")
        assert all(c.close_codes == [1012] for c in moved), {str(c.close_codes) for c in moved}
        assert all(c.close_codes == [] for c in stayed), "a socket of the surviving process was closed"
        assert not [c.error for c in clients if c.error]

        found = sockets_by_pid([survivor], workers.port)
        assert {c.local_port for c in moved} <= found[survivor]["peers"], "a reconnect landed elsewhere than the survivor"

        # Presence: exactly one meta per live member (a ghost of the stopped process would be a second one).
        expected = {c.presence_key for c in clients if c.presence_key}
        observer = LiteSocket(-1, workers.port, presence_topic, "observer", token, track=False)
        state: dict[str, Any] = {}
        ghost_deadline = time.monotonic() + GHOST_WAIT_S
        while True:
            state = await presence_state(observer)
            if set(state) == expected and all(len(entry["metas"]) == 1 for entry in state.values()):
                break
            assert time.monotonic() < ghost_deadline, (
                f"presence after {GHOST_WAIT_S} s: {len(state)} keys, "
                f"{sum(len(e['metas']) for e in state.values())} metas for {len(expected)} live members"
            )
            await asyncio.sleep(0.25)

        # Metrics in multiprocess mode (the supervisor's directory): any process answers for both.
        sockets_metric = await asyncio.to_thread(wait_metric, workers, "realtime_sockets", float(SOCKETS), 10)
        print(f"/metrics: realtime_sockets {sockets_metric:g}")

        new = await asyncio.to_thread(wait_restarted, workers, set(pids), 60)
        print(f"the supervisor restarted the stopped process as pid {new}")
    finally:
        for client in clients:
            await client.close()
    assert workers.stop() == 0, workers.describe("did not stop cleanly")


async def presence_state(observer: LiteSocket) -> dict[str, Any]:
    """The ``presence_state`` a fresh socket gets on joining the presence topic."""
    await observer.open()
    try:
        while True:
            kind, data = await asyncio.wait_for(observer.read_frame(), 5)
            if kind == 0x1:
                frame = json.loads(data)
                if frame[3] == "presence_state":
                    result: dict[str, Any] = frame[4]
                    return result
    finally:
        assert observer.writer is not None
        observer.writer.close()


def metric(url: str, name: str) -> float | None:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def wait_metric(workers: Workers, name: str, expected: float, timeout: float) -> float | None:
    """The metric's value once it equals ``expected`` (or the last value seen after ``timeout``)."""
    deadline = time.monotonic() + timeout
    value = metric(workers.url, name)
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        value = metric(workers.url, name)
    assert value == expected, f"{name} is {value}, expected {expected}"
    return value


def wait_restarted(workers: Workers, known: set[int], timeout: float) -> int:
    """The pid of the child the supervisor started in place of a stopped one, once it listens."""
    assert workers.pid is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = children(workers.pid)
        found = sockets_by_pid(pids, workers.port)
        fresh = [p for p in pids if p not in known]
        if len(pids) == workers.count and fresh and all(found[p]["listen"] for p in pids):
            return fresh[0]
        time.sleep(0.2)
    raise AssertionError(workers.describe(f"did not restart the stopped process within {timeout:.0f} s"))


async def test_asgi_lifespan_starts_and_closes_the_runtime() -> None:
    """uvicorn's lifespan events: the runtime starts at startup and closes (leaves, claim sets) at shutdown."""
    from realtime.runtime import _runtimes, current_runtime
    from realtime_project.asgi import application

    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await events.put({"type": "lifespan.startup"})
    task = asyncio.ensure_future(application({"type": "lifespan", "asgi": {"version": "3.0"}}, events.get, send))
    for _ in range(100):
        if sent:
            break
        await asyncio.sleep(0.05)
    assert sent == [{"type": "lifespan.startup.complete"}]
    runtime = current_runtime()
    assert runtime is not None and runtime.hub is not None and not runtime.closed
    await events.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(task, 10)
    assert sent[-1] == {"type": "lifespan.shutdown.complete"}
    assert runtime.closed
    _runtimes.pop(asyncio.get_running_loop(), None)
