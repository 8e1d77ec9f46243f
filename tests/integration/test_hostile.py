"""Hostile clients against a real server process: each attack has a bystander that must keep working.

The anon key is public, so any visitor can open sockets, stop reading, flood
pushes, joins and REST calls. Each test runs the attack and checks that the
offender alone is cut, with the reference's message (PROTOCOL.md 8), while a
well-behaved client on the same server goes on as before.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.fixtures.server import ServerKind, ServerProcess, mint_token, start_server
from tests.integration.conftest import sql_literal
from tests.integration.test_live_server import post, ws_url

pytestmark = pytest.mark.integration

WAIT = 10.0


def topic() -> str:
    return f"realtime:hostile-{uuid.uuid4().hex[:8]}"


def isolated(**env: str) -> dict[str, str]:
    """Server settings with a Redis prefix of the test's own, so no other server's sockets count."""
    return {"REALTIME_LAYER_PREFIX": f"hostile{uuid.uuid4().hex[:8]}", **env}


@pytest.fixture
def server_factory() -> Iterator[Any]:
    started: list[ServerProcess] = []

    def start(env: dict[str, str], server: ServerKind = "daphne") -> ServerProcess:
        process = start_server(env=env, server=server)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


async def open_joined(server: ServerProcess, room: str, token: str | None = None, **kwargs: Any) -> ClientConnection:
    ws = await connect(ws_url(server, apikey=token or mint_token("anon")), open_timeout=WAIT, **kwargs)
    await ws.send(json.dumps(["1", "1", room, "phx_join", {"config": {"broadcast": {"self": False}}}]))
    reply = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
    assert reply[4]["status"] == "ok", reply
    return ws


async def recv_event(ws: ClientConnection, event: str, timeout: float = WAIT) -> list[Any]:
    async def first() -> list[Any]:
        while True:
            raw = await ws.recv()
            if isinstance(raw, str):
                frame = json.loads(raw)
                if frame[3] == event:
                    return frame  # type: ignore[no-any-return]

    return await asyncio.wait_for(first(), timeout)


async def heartbeat_rtt(ws: ClientConnection, ref: str) -> float:
    started = time.perf_counter()
    await ws.send(json.dumps([None, ref, "phoenix", "heartbeat", {}]))
    while True:
        raw = await asyncio.wait_for(ws.recv(), WAIT)
        if isinstance(raw, str) and json.loads(raw)[1] == ref:
            return time.perf_counter() - started


# An unmasked server close frame with a short reason and code 1008 (RFC 6455 5.5.1).
CLOSE_1008 = re.compile(rb"\x88[\x02-\x7d]\x03\xf0")


class StalledClient:
    """A raw WebSocket client that joins a topic and then never reads again (a small receive buffer,
    so the kernel does not absorb tens of MB first); ``drain`` reads until the server's close."""

    def __init__(self, server: ServerProcess, room: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.sock.settimeout(WAIT)
        self.sock.connect(("127.0.0.1", server.port))
        key = base64.b64encode(os.urandom(16)).decode()
        path = ws_url(server, apikey=mint_token("anon")).split(str(server.port), 1)[1]
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            response += self.sock.recv(1)
        assert response.startswith(b"HTTP/1.1 101"), response
        join = json.dumps(["1", "1", room, "phx_join", {"config": {}}]).encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(join))
        assert len(join) < 126
        self.sock.sendall(bytes((0x81, 0x80 | len(join))) + mask + masked)

    def drain(self, timeout: float) -> bytes:
        """Read until the server ends the connection or its close frame (1008) arrives; the last bytes read.

        A server that sent its close frame may then wait for this client's own
        close before it drops the connection (uvicorn: about 30 s); the frame
        is the cut.
        """
        self.sock.settimeout(timeout)
        tail = b""
        try:
            while chunk := self.sock.recv(1 << 20):
                tail = (tail + chunk)[-256:]
                if CLOSE_1008.search(tail):
                    break
        except ConnectionResetError:
            pass
        finally:
            self.sock.close()
        return tail


def rss_bytes(server: ServerProcess) -> int:
    assert server.process is not None
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def log_text(server: ServerProcess) -> str:
    assert server.log_path is not None
    return server.log_path.read_text(errors="replace")


# --- slow consumers ---------------------------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["daphne", "uvicorn", "uvicorn-sansio"])
async def test_sockets_that_stop_reading_are_closed_and_memory_stays_bounded(server_factory: Any, kind: ServerKind) -> None:
    server = server_factory(isolated(REALTIME_MAX_EVENTS_PER_SECOND="0", REALTIME_MAX_BYTES_PER_SECOND="0"), server=kind)
    room = topic()
    stalled = [StalledClient(server, room) for _ in range(20)]
    reader = await open_joined(server, room, max_size=None)
    sender = await open_joined(server, room, max_size=None)
    received: list[int] = []

    async def read_all() -> None:
        while len(received) < 300:
            raw = await reader.recv()
            if isinstance(raw, str):
                frame = json.loads(raw)
                if frame[3] == "broadcast":
                    received.append(frame[4]["payload"]["seq"])

    reading = asyncio.ensure_future(read_all())
    before = rss_bytes(server)
    peak = before
    filler = "x" * 1_000_000
    for seq in range(300):  # 300 MB in all
        await sender.send(json.dumps(["1", str(seq + 2), room, "broadcast", {"type": "broadcast", "event": "big", "payload": {"seq": seq, "fill": filler}}]))
        if seq % 10 == 0:
            peak = max(peak, rss_bytes(server))
            await asyncio.sleep(0.02)
    await asyncio.wait_for(reading, 120)
    peak = max(peak, rss_bytes(server))
    assert received == list(range(300)), "the reading socket must receive every message, in order"
    print(f"{kind}: server RSS grew by {(peak - before) / 2**20:.0f} MiB")
    # 20 sockets at a 4 MiB cap, plus each server's own write buffers: seen 32 MiB (daphne), 76 (uvicorn
    # websockets), 95-151 (uvicorn websockets-sansio 0.54). Unbounded, the 300 MB x 20 would be about 6 GB
    # (sansio before uvicorn 0.52.1 grew by 5.6 GiB).
    bound = (200 if kind == "uvicorn-sansio" else 150) * 1024 * 1024
    assert peak - before < bound, f"server RSS grew by {(peak - before) / 2**20:.0f} MiB"
    # Every stalled socket was cut: reading it now ends, instead of a stream of frames.
    await asyncio.gather(*(asyncio.to_thread(client.drain, 30) for client in stalled))
    assert log_text(server).count("slow consumer") >= 20
    # And the server still serves.
    assert await heartbeat_rtt(reader, "hb") < 1.0
    for ws in (reader, sender):
        await ws.close()


# --- events per second (C96) ------------------------------------------------------------


async def test_a_flooding_socket_is_cut_while_an_ordinary_sender_keeps_working(server_factory: Any) -> None:
    server = server_factory(isolated(REALTIME_MAX_EVENTS_PER_SECOND="20", REALTIME_RATE_WINDOW_S="2"))
    room = topic()
    flooder = await open_joined(server, room)
    ordinary = await open_joined(server, room)
    receiver = await open_joined(server, room)

    for i in range(500):
        await flooder.send(json.dumps(["1", str(i + 2), room, "broadcast", {"type": "broadcast", "event": "flood", "payload": {}}]))
    system = await recv_event(flooder, "system")
    assert system[4] == {"message": "Too many messages per second", "status": "error", "extension": "system", "channel": room.removeprefix("realtime:")}
    close = await recv_event(flooder, "phx_close")
    assert close[0] == close[1] == "1"
    # One message a second from another socket on the same topic still arrives.
    for i in range(3):
        await ordinary.send(json.dumps(["1", f"o{i}", room, "broadcast", {"type": "broadcast", "event": "calm", "payload": {"i": i}}]))
        while True:
            frame = await recv_event(receiver, "broadcast")
            if frame[4]["event"] == "calm":
                assert frame[4]["payload"] == {"i": i}
                break
        await asyncio.sleep(1.0)
    for ws in (flooder, ordinary, receiver):
        await ws.close()


# --- frames before decoding ---------------------------------------------------------------


async def test_a_socket_flooding_frames_is_closed_before_they_cost_the_others(server_factory: Any) -> None:
    server = server_factory(isolated(REALTIME_MAX_FRAMES_PER_SECOND="50"))
    room = topic()
    bystander = await open_joined(server, room)
    flooder = await connect(ws_url(server, apikey=mint_token("anon")), open_timeout=WAIT)
    with pytest.raises(ConnectionClosed) as closed:
        for i in range(5000):  # heartbeats: cheap for the client, answered by no rate of their own
            await flooder.send(json.dumps([None, str(i), "phoenix", "heartbeat", {}]))
        while True:
            await asyncio.wait_for(flooder.recv(), WAIT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert await heartbeat_rtt(bystander, "hb") < 1.0
    await bystander.close()


async def test_a_ping_flood_drops_that_connection_only(server_factory: Any) -> None:
    server = server_factory(isolated())
    bystander = await open_joined(server, topic())
    flooder = await connect(ws_url(server, apikey=mint_token("anon")), open_timeout=WAIT)
    with pytest.raises(ConnectionClosed):
        for _ in range(2000):
            await flooder.ping()
        await asyncio.wait_for(flooder.recv(), WAIT)
    assert await heartbeat_rtt(bystander, "hb") < 1.0
    await bystander.close()


async def test_a_chunked_rest_body_over_the_cap_is_refused_before_it_is_stored(server_factory: Any) -> None:
    server = server_factory(isolated(REALTIME_MAX_REST_BODY_BYTES="20000"))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"POST /realtime/v1/api/broadcast HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 8192
    for _ in range(4):  # 32 KB, no Content-Length, no token: refused all the same
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), WAIT)
    assert status_line.startswith(b"HTTP/1.1 413"), status_line
    writer.close()


# --- joins per second (C98) ----------------------------------------------------------------


async def test_a_socket_over_the_join_rate_gets_the_reference_reason_and_is_closed(server_factory: Any) -> None:
    server = server_factory(isolated(REALTIME_MAX_JOINS_PER_SECOND="5", REALTIME_RATE_WINDOW_S="2"))
    flooder = await connect(ws_url(server, apikey=mint_token("anon")), open_timeout=WAIT)
    reasons: list[str] = []
    with pytest.raises(ConnectionClosed) as closed:
        for i in range(100):
            await flooder.send(json.dumps([str(i), str(i), f"realtime:j{i}", "phx_join", {"config": {}}]))
        while True:
            frame = json.loads(await asyncio.wait_for(flooder.recv(), WAIT))
            if frame[3] == "phx_reply" and frame[4]["status"] == "error":
                reasons.append(frame[4]["response"]["reason"])
    assert reasons == ["ClientJoinRateLimitReached: Too many joins per second"]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    bystander = await open_joined(server, topic())
    assert await heartbeat_rtt(bystander, "hb") < 1.0
    await bystander.close()


# --- concurrent sockets (C97) -----------------------------------------------------------------


async def test_sockets_past_the_limit_across_processes_are_refused_with_429(server_factory: Any) -> None:
    env = isolated(REALTIME_MAX_CONCURRENT_USERS="3")
    first, second = server_factory(env), server_factory(env, server="uvicorn-sansio")  # the count spans servers
    held = [await connect(ws_url(first, apikey=mint_token("anon")), open_timeout=WAIT) for _ in range(2)]
    await asyncio.sleep(2.5)  # each process publishes its count every second
    held.append(await connect(ws_url(second, apikey=mint_token("anon")), open_timeout=WAIT))
    await asyncio.sleep(2.5)
    for server in (first, second):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(server, apikey=mint_token("anon")), open_timeout=WAIT):
                pass
        response = refused.value.response
        assert response.status_code == 429
        assert json.loads(bytes(response.body or b"")) == {"error": "Too many connected users"}
    await held.pop().close()
    await asyncio.sleep(2.5)
    again = await connect(ws_url(first, apikey=mint_token("anon")), open_timeout=WAIT)
    for ws in (*held, again):
        await ws.close()


# --- REST (PROTOCOL.md 5.3) ---------------------------------------------------------------------


async def test_rest_batches_past_the_rate_the_batch_cap_or_the_body_cap_are_refused(server_factory: Any) -> None:
    server = server_factory(
        isolated(
            REALTIME_MAX_EVENTS_PER_SECOND="5", REALTIME_RATE_WINDOW_S="1",
            REALTIME_MAX_BROADCAST_BATCH="10", REALTIME_MAX_REST_BODY_BYTES="20000",
        )
    )
    headers = {"Authorization": f"Bearer {mint_token('service_role')}", "Content-Type": "application/json"}

    def batch(n: int) -> bytes:
        return json.dumps({"messages": [{"topic": "r", "event": "e", "payload": {"i": i}} for i in range(n)]}).encode()

    status, body = post(server, "/realtime/v1/api/broadcast", batch(11), headers)
    assert (status, json.loads(body)) == (429, {"message": "Too many messages to broadcast, please reduce the batch size"})
    await asyncio.sleep(1.05 - time.time() % 1)  # a fresh one-second window
    results = [post(server, "/realtime/v1/api/broadcast", batch(2), headers)[0] for _ in range(4)]
    assert results[:2] == [202, 202] and results[3] == 429
    status, body = post(server, "/realtime/v1/api/broadcast", json.dumps({"messages": [{"topic": "r", "event": "e", "payload": {"f": "x" * 30000}}]}).encode(), headers)
    assert status == 413 and b"at most 20000 bytes" in body


# --- bounded database work -------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_a_flood_of_private_re_joins_does_not_delay_another_clients_private_join(server_factory: Any, policy: Any) -> None:
    server = server_factory(isolated(REALTIME_MAX_JOINS_PER_SECOND="1000"))
    room = f"flood-{uuid.uuid4().hex[:8]}"
    # A policy that takes 50 ms per check, as a heavy real policy might.
    policy(f"FOR SELECT TO authenticated USING (realtime.topic() LIKE {sql_literal(room + '%')} AND pg_sleep(0.05) IS NOT NULL)")
    user = mint_token("authenticated", sub=str(uuid.uuid4()))
    flooders = [await connect(ws_url(server, apikey=user), open_timeout=WAIT) for _ in range(10)]
    stop = asyncio.Event()

    async def flood(ws: ClientConnection) -> None:
        ref = 0
        while not stop.is_set():
            ref += 1
            try:
                await ws.send(json.dumps([str(ref), str(ref), f"realtime:{room}", "phx_join", {"config": {"private": True}, "access_token": user}]))
            except ConnectionClosed:
                return
            await asyncio.sleep(0.002)

    async def drain(ws: ClientConnection) -> None:
        try:
            async for _ in ws:
                pass
        except ConnectionClosed:
            pass

    tasks = [asyncio.ensure_future(flood(ws)) for ws in flooders] + [asyncio.ensure_future(drain(ws)) for ws in flooders]
    await asyncio.sleep(1.0)  # the flood is on
    bystander = await connect(ws_url(server, apikey=user), open_timeout=WAIT)
    started = time.perf_counter()
    await bystander.send(json.dumps(["1", "1", f"realtime:{room}-mine", "phx_join", {"config": {"private": True}, "access_token": user}]))
    reply = await recv_event(bystander, "phx_reply")
    elapsed = time.perf_counter() - started
    stop.set()
    await asyncio.gather(*tasks[:10])
    for ws in flooders:
        await ws.close()
    await asyncio.gather(*tasks[10:])
    assert reply[4]["status"] == "ok", reply
    assert elapsed < 2.0, f"the bystander's private join took {elapsed:.2f} s"
    await bystander.close()
