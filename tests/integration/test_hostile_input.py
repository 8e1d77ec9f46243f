"""Bad input from one client, against a real server: it gets a clear answer and affects nothing else.

The anon key is public, so any visitor can send any frame and pick any topic
and presence key. A kind 3 push whose JSON body does not parse is dropped as
malformed (PROTOCOL.md 2.3, 2.4) instead of reaching vsn 2 receivers, whose
``JSON.parse`` would throw; presence keys and topics made of Redis separator
and glob characters stay on their own topic (6).
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import uuid
from typing import Any

import pytest

from core.topics import MAX_TOPIC_BYTES, TOPIC_TOO_LONG, topic_too_long
from tests.fixtures.phoenix import Frame, PhoenixClient, client_opener, is_text
from tests.fixtures.server import ServerProcess

pytestmark = pytest.mark.integration

QUIET_S = 0.5
LOG_WAIT_S = 5.0


class Client(PhoenixClient):
    """A vsn 2.0.0 client that can also send raw kind 3 frames and heartbeats."""

    async def send_kind3(
        self, topic: str, event: str, body: bytes, *, encoding: int = 1, meta: bytes = b"", raw_topic: bytes | None = None
    ) -> None:
        """A user broadcast push laid out as PROTOCOL.md 2.3 draws it, whatever the bytes."""
        fields = [self.join_refs[topic].encode(), self.next_ref().encode(), raw_topic or topic.encode(), event.encode(), meta]
        header = struct.pack("!BBBBBBB", 3, *(len(field) for field in fields), encoding)
        await self.ws.send(header + b"".join(fields) + body)

    async def heartbeat(self) -> None:
        ref = self.next_ref()
        await self.ws.send(json.dumps([None, ref, "phoenix", "heartbeat", {}]))
        reply = await self.wait_for(lambda f: is_text(f, "phx_reply") and f[1] == ref, "heartbeat reply")
        assert reply == [None, ref, "phoenix", "phx_reply", {"status": "ok", "response": {}}]

    async def join_with_presence(self, topic: str, key: str) -> dict[str, Any]:
        """Join with presence on; the ``presence_state`` that follows the reply."""
        await self.join_topic(topic, {"presence": {"enabled": True, "key": key}})
        join_ref = self.join_refs[topic]
        frame = await self.wait_for(
            lambda f: is_text(f, "presence_state") and f[2] == topic and f[0] == join_ref, f"presence_state of {topic}"
        )
        state: dict[str, Any] = frame[4]
        return state

    async def track(self, topic: str, payload: dict[str, Any]) -> None:
        ref = await self.push(topic, "presence", {"type": "presence", "event": "track", "payload": payload})
        reply = await self.wait_for(lambda f: is_text(f, "phx_reply") and f[1] == ref, "track reply")
        assert reply[4] == {"status": "ok", "response": {}}

    def presence_keys(self, topic: str) -> set[str]:
        """Every key seen in this client's presence frames for ``topic``."""
        keys: set[str] = set()
        for frame in self.frames:
            if is_text(frame, "presence_state") and frame[2] == topic:
                keys.update(frame[4])
            elif is_text(frame, "presence_diff") and frame[2] == topic:
                keys.update(frame[4]["joins"])
                keys.update(frame[4]["leaves"])
        return keys


def kind4_fields(frame: bytes) -> tuple[str, str, int, bytes]:
    """(topic, event, encoding, payload) of a kind 4 user broadcast."""
    assert frame[0] == 4, f"unexpected binary kind {frame[0]}: {frame!r}"
    topic_len, event_len, meta_len, encoding = frame[1:5]
    start = 5 + topic_len + event_len + meta_len
    return frame[5 : 5 + topic_len].decode(), frame[5 + topic_len : 5 + topic_len + event_len].decode(), encoding, frame[start:]


async def logged(server: ServerProcess, text: str) -> bool:
    deadline = time.monotonic() + LOG_WAIT_S
    while time.monotonic() < deadline:
        if text in server.log_text():
            return True
        await asyncio.sleep(0.1)
    return False


def topic_name(label: str) -> str:
    return f"realtime:hostile-{label}-{uuid.uuid4().hex[:8]}"


async def test_a_kind3_body_that_is_not_json_reaches_nobody_and_the_sender_stays(realtime_server: ServerProcess) -> None:
    topic = topic_name("kind3")
    async with client_opener(Client) as open_client:
        sender = await open_client(realtime_server, "sender")
        bystander = await open_client(realtime_server, "vsn-2 bystander")
        config = {"broadcast": {"self": False, "ack": False}}
        await sender.join_topic(topic, config)
        await bystander.join_topic(topic, config)

        await sender.send_kind3(topic, "bad", b"{not json")
        await sender.send_kind3(topic, "bad", b'{"x":"\xff"}')  # not UTF-8
        await sender.send_kind3(topic, "bad", b'{"x":1}', meta=b"{not json")
        await sender.send_kind3(topic, "bad", b'{"x":1}', raw_topic=topic.encode()[:-1] + b"\xff")
        nonce = uuid.uuid4().hex
        await sender.send_kind3(topic, "good", json.dumps({"nonce": nonce}).encode())

        await bystander.wait_for(lambda f: isinstance(f, bytes) and nonce.encode() in f, "the valid kind 4")
        await asyncio.sleep(QUIET_S)
        binary: list[Frame] = [f for f in bystander.frames if isinstance(f, bytes)]
        assert [kind4_fields(f)[:3] for f in binary] == [(topic, "good", 1)]  # type: ignore[arg-type]
        assert json.loads(kind4_fields(binary[0])[3]) == {"nonce": nonce}  # type: ignore[arg-type]
        assert not any(is_text(f, "broadcast") for f in bystander.frames)

        await sender.heartbeat()
        await bystander.heartbeat()
        # The first malformed frame of a socket is logged with its reason; later ones only counted.
        assert await logged(realtime_server, "malformed frame dropped")
        assert await logged(realtime_server, "kind 3 JSON payload is not valid JSON")


async def test_presence_keys_with_separators_and_globs_stay_on_their_own_topic(realtime_server: ServerProcess) -> None:
    # Before presence key names were escaped, (<id>:user:ann, "x") and
    # (<id>, "ann:user:x") shared one Redis hash, and "*" or "[ab]" in a name
    # was a pattern.
    base = topic_name("presence")
    topics = {
        f"{base}:user:ann": "x",
        base: "ann:user:x",
        f"{base}*": "*",
        f"{base}a": "a",
        f"{base}[ab]": "[ab]\n%2F/",
    }
    async with client_opener(Client) as open_client:
        trackers: dict[str, Client] = {}
        observers: dict[str, Client] = {}
        for topic, key in topics.items():
            client = await open_client(realtime_server, f"tracker on {topic!r}")
            assert await client.join_with_presence(topic, key) == {}
            await client.track(topic, {"key": key})
            await client.wait_for(
                lambda f, topic=topic, key=key: is_text(f, "presence_diff") and f[2] == topic and key in f[4]["joins"],
                f"own join on {topic!r}",
            )
            trackers[topic] = client
        for topic, key in topics.items():
            observer = await open_client(realtime_server, f"observer on {topic!r}")
            state = await observer.join_with_presence(topic, f"observer-{uuid.uuid4().hex[:6]}")
            assert list(state) == [key], topic
            assert [meta["key"] for meta in state[key]["metas"]] == [key]
            observers[topic] = observer
        await asyncio.sleep(QUIET_S)
        for topic, key in topics.items():
            for client in (trackers[topic], observers[topic]):
                assert client.presence_keys(topic) == {key}, client.name
                assert [f for f in client.frames if isinstance(f, list) and f[2] not in (topic, "phoenix")] == []


def test_the_recommended_topic_cap_counts_utf8_bytes() -> None:
    assert not topic_too_long("realtime:" + "x" * (MAX_TOPIC_BYTES - len("realtime:")))
    assert topic_too_long("realtime:" + "x" * (MAX_TOPIC_BYTES - len("realtime:") + 1))
    assert topic_too_long("realtime:" + "é" * (MAX_TOPIC_BYTES // 2))
    assert not topic_too_long("realtime:" + "é" * ((MAX_TOPIC_BYTES - len("realtime:")) // 2))
    assert TOPIC_TOO_LONG == ("TopicNameTooLong", f"Topic name must be at most {MAX_TOPIC_BYTES} bytes")
