"""Two daphne processes sharing one Redis deliver each broadcast to every subscriber exactly once.

The clients speak the vsn 2.0.0 wire format directly over the ``websockets``
client (PROTOCOL.md sections 2.2 and 2.3): ``[join_ref, ref, topic, event,
payload]`` text frames, kind-3 binary pushes and kind-4 binary deliveries.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from tests.fixtures.phoenix import WAIT_S, Frame, client_opener, is_text
from tests.fixtures.phoenix import PhoenixClient as BaseClient
from tests.fixtures.server import ServerProcess, mint_token, start_server

pytestmark = pytest.mark.integration

TOPIC = "realtime:room1"
QUIET_S = 0.5
IDLE_S = 7.0



class PhoenixClient(BaseClient):
    """A broadcast client on ``TOPIC`` unless told otherwise."""

    async def join(self, topic: str = TOPIC, self_broadcast: bool = False) -> None:
        await self.join_topic(topic, {"broadcast": {"ack": False, "self": self_broadcast}, "presence": {"enabled": False}})

    async def leave(self, topic: str = TOPIC) -> None:
        ref = await self.push(topic, "phx_leave", {})
        await self.wait_for(lambda f: is_text(f, "phx_reply") and f[1] == ref, "leave reply")
        await self.wait_for(lambda f: is_text(f, "phx_close") and f[0] == self.join_refs[topic], "phx_close")

    async def broadcast(self, event: str, payload: dict[str, Any], topic: str = TOPIC) -> None:
        await self.push(topic, "broadcast", {"type": "broadcast", "event": event, "payload": payload})

    async def broadcast_kind3(self, event: str, body: bytes, encoding: int, topic: str = TOPIC) -> None:
        """A user-broadcast push as realtime-js sends it (PROTOCOL.md 2.3, kind 3)."""
        join_ref = self.join_refs[topic].encode()
        ref = self.next_ref().encode()
        fields = [join_ref, ref, topic.encode(), event.encode(), b""]
        header = struct.pack("!BBBBBBB", 3, *(len(f) for f in fields), encoding)
        await self.ws.send(header + b"".join(fields) + body)

    def received(self, event: str, nonce: str) -> list[Frame]:
        """Deliveries of ``event`` carrying ``nonce``, as text frames or kind-4 binary frames."""
        return [frame for frame in self.frames if delivered_event(frame, nonce) == event]



def decode_kind4(frame: bytes) -> tuple[str, str, int, bytes]:
    """(topic, event, encoding, payload) of a kind-4 user broadcast."""
    assert frame[0] == 4, f"unexpected binary kind {frame[0]}: {frame!r}"
    topic_len, event_len, meta_len, encoding = frame[1:5]
    offset = 5
    topic = frame[offset : offset + topic_len].decode()
    offset += topic_len
    event = frame[offset : offset + event_len].decode()
    offset += event_len + meta_len
    return topic, event, encoding, frame[offset:]


def delivered_event(frame: Frame, nonce: str) -> str | None:
    if isinstance(frame, bytes):
        _, event, _, payload = decode_kind4(frame)
        return event if nonce.encode() in payload else None
    if is_text(frame, "broadcast") and frame[0] is None and frame[1] is None:
        body = frame[4]
        if isinstance(body, dict) and isinstance(body.get("payload"), dict) and body["payload"].get("nonce") == nonce:
            event: str = body["event"]
            return event
    return None


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with start_server() as first, start_server() as second:
        yield first, second


@pytest.fixture
async def clients(servers: tuple[ServerProcess, ServerProcess]) -> AsyncIterator[Callable[..., Any]]:
    async with client_opener(PhoenixClient) as open_client:
        yield open_client
    for server in servers:
        server.check_alive()


def with_logs(servers: tuple[ServerProcess, ServerProcess], message: str) -> str:
    first, second = servers
    return f"{message}\n--- first server ---\n{first.log_tail(40)}\n--- second server ---\n{second.log_tail(40)}"


async def test_a_broadcast_on_either_process_reaches_every_subscriber_exactly_once(
    servers: tuple[ServerProcess, ServerProcess], clients: Callable[..., Any]
) -> None:
    first, second = servers
    sender_one = await clients(first, "sender on first")
    sender_two = await clients(second, "sender on second")
    listeners = [await clients(server, f"listener {i} on {server.port}") for server in servers for i in range(3)]
    everyone = [sender_one, sender_two, *listeners]
    await asyncio.gather(*(client.join() for client in everyone))
    nonce = uuid.uuid4().hex

    await sender_one.broadcast("from-first", {"nonce": nonce, "n": 1})
    await sender_two.broadcast("from-second", {"nonce": nonce, "n": 2})
    for event, sender in (("from-first", sender_one), ("from-second", sender_two)):
        for client in everyone:
            if client is not sender:
                await client.wait_for(lambda f, e=event: delivered_event(f, nonce) == e, event)
    await sender_one.broadcast("control", {"nonce": nonce})
    await sender_two.broadcast("control", {"nonce": nonce})
    for client in everyone:
        await client.wait_for(lambda f: delivered_event(f, nonce) == "control", "control")
    await asyncio.sleep(QUIET_S)

    counts = {
        client.name: (len(client.received("from-first", nonce)), len(client.received("from-second", nonce)))
        for client in everyone
    }
    expected = {client.name: (1, 1) for client in listeners}
    expected[sender_one.name] = (0, 1)
    expected[sender_two.name] = (1, 0)
    assert counts == expected, with_logs(servers, f"deliveries per socket (from-first, from-second): {counts}")
    frame = listeners[-1].received("from-first", nonce)[0]
    assert frame == [None, None, TOPIC, "broadcast", {"type": "broadcast", "event": "from-first", "payload": {"nonce": nonce, "n": 1}}]


async def test_a_kind3_push_crosses_processes_as_identical_kind4_frames(
    servers: tuple[ServerProcess, ServerProcess], clients: Callable[..., Any]
) -> None:
    first, second = servers
    sender = await clients(second, "kind-3 sender on second")
    near = await clients(second, "listener on second")
    far = await clients(first, "listener on first")
    await asyncio.gather(sender.join(), near.join(), far.join())
    nonce = uuid.uuid4().hex
    json_body = json.dumps({"nonce": nonce, "x": 1}, separators=(",", ":")).encode()
    raw_body = b"\x00\xff" + nonce.encode() + b"\x80"

    await sender.broadcast_kind3("cursor", json_body, encoding=1)
    await sender.broadcast_kind3("blob", raw_body, encoding=0)
    for listener in (near, far):
        await listener.wait_for(lambda f: delivered_event(f, nonce) == "cursor", "kind-4 cursor")
        await listener.wait_for(lambda f: delivered_event(f, nonce) == "blob", "kind-4 blob")
    await asyncio.sleep(QUIET_S)

    for listener in (near, far):
        cursor = listener.received("cursor", nonce)
        blob = listener.received("blob", nonce)
        assert len(cursor) == 1 and len(blob) == 1, with_logs(servers, f"{listener.name}: {listener.frames!r}")
        assert isinstance(cursor[0], bytes) and isinstance(blob[0], bytes)
        assert decode_kind4(cursor[0]) == (TOPIC, "cursor", 1, json_body)
        assert decode_kind4(blob[0]) == (TOPIC, "blob", 0, raw_body)
    assert near.received("cursor", nonce) == far.received("cursor", nonce)
    assert sender.received("cursor", nonce) == [] and sender.received("blob", nonce) == []


async def test_a_rest_broadcast_to_one_process_reaches_subscribers_on_both(
    servers: tuple[ServerProcess, ServerProcess], clients: Callable[..., Any]
) -> None:
    first, second = servers
    on_first = await clients(first, "listener on first")
    on_second = await clients(second, "listener on second")
    await asyncio.gather(on_first.join(), on_second.join())
    nonce = uuid.uuid4().hex
    body = json.dumps({"messages": [{"topic": "room1", "event": "rest", "payload": {"nonce": nonce}}]}).encode()
    request = urllib.request.Request(
        f"{first.url}/realtime/v1/api/broadcast",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {mint_token('service_role')}"},
    )

    def post() -> int:
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            status: int = response.status
            return status

    assert await asyncio.to_thread(post) == 202
    for listener in (on_first, on_second):
        await listener.wait_for(lambda f: delivered_event(f, nonce) == "rest", "REST broadcast")
    await asyncio.sleep(QUIET_S)

    assert len(on_first.received("rest", nonce)) == 1
    assert len(on_second.received("rest", nonce)) == 1


async def test_leaving_on_one_process_stops_delivery_to_that_socket_only(
    servers: tuple[ServerProcess, ServerProcess], clients: Callable[..., Any]
) -> None:
    first, second = servers
    sender = await clients(first, "sender on first")
    leaver = await clients(second, "leaver on second")
    stayer = await clients(second, "stayer on second")
    await asyncio.gather(sender.join(), leaver.join(), stayer.join())
    nonce = uuid.uuid4().hex

    await leaver.leave()
    await sender.broadcast("after-leave", {"nonce": nonce})
    await stayer.wait_for(lambda f: delivered_event(f, nonce) == "after-leave", "after-leave")
    await asyncio.sleep(QUIET_S)

    assert leaver.received("after-leave", nonce) == []
    assert len(stayer.received("after-leave", nonce)) == 1


async def test_an_idle_hub_keeps_delivering_without_logging_errors(
    servers: tuple[ServerProcess, ServerProcess], clients: Callable[..., Any]
) -> None:
    first, second = servers
    sender = await clients(first, "sender on first")
    listener = await clients(second, "listener on second")
    await asyncio.gather(sender.join(), listener.join())
    nonce = uuid.uuid4().hex

    await asyncio.sleep(IDLE_S)
    started = time.monotonic()
    await sender.broadcast("after-idle", {"nonce": nonce})
    await listener.wait_for(lambda f: delivered_event(f, nonce) == "after-idle", "after-idle")
    latency = time.monotonic() - started

    errors = [
        f"{server.port}: {line}"
        for server in servers
        for line in server.log_tail(10_000).splitlines()
        if " ERROR " in line or " CRITICAL " in line
    ]
    assert errors == [], with_logs(servers, f"errors logged while idle for {IDLE_S} s:\n" + "\n".join(errors))
    assert latency < 1.0, f"delivery after idling took {latency:.2f} s"
