"""The WebSocket endpoint in-process, over the real Redis channel layer."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from tests.integration.conftest import sql_literal, token

pytestmark = pytest.mark.integration


def topic() -> str:
    return f"realtime:room-{uuid.uuid4().hex[:8]}"


def broadcast_payload(event: str = "e", **payload: object) -> dict:
    return {"type": "broadcast", "event": event, "payload": payload}


async def test_phoenix_message_format(connect) -> None:
    """Every vsn 2.0.0 outbound frame is ``[join_ref, ref, topic, event, payload]``."""
    a, b = await connect(), await connect()
    room = topic()
    reply = await a.join(room, {"broadcast": {"ack": True}}, ref="4")
    assert reply == ["4", "4", room, "phx_reply", {"status": "ok", "response": {"postgres_changes": []}}]
    await b.join(room)
    await a.push("4", "5", room, "broadcast", broadcast_payload(x=1))
    assert await a.recv() == ["4", "5", room, "phx_reply", {"status": "ok", "response": {}}]
    assert await b.recv() == [None, None, room, "broadcast", broadcast_payload(x=1)]  # C12: fan-out refs are null


async def test_v1_frames_have_ref_and_never_join_ref(connect) -> None:  # C10, C11
    a = await connect(vsn="1.0.0")
    await a.push(None, None, "phoenix", "heartbeat", {})
    assert await a.recv() == {"topic": "phoenix", "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": None}
    room = topic()
    reply = await a.join(room, ref="1")
    assert set(reply) == {"topic", "event", "payload", "ref"} and reply["ref"] == "1"


async def test_no_vsn_means_v1_object_frames(connect) -> None:  # C6
    from urllib.parse import urlencode

    from channels.testing import WebsocketCommunicator

    from realtime_project.asgi import application

    communicator = WebsocketCommunicator(application, f"/realtime/v1/websocket?{urlencode({'apikey': token()})}")
    assert (await communicator.connect())[0]
    await communicator.send_to(text_data=json.dumps({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "3"}))
    assert json.loads(await communicator.receive_from())["ref"] == "3"
    await communicator.disconnect()


async def test_broadcast_delivery(connect) -> None:  # C66
    a, b, c = await connect(), await connect(), await connect()
    room = topic()
    await a.join(room)
    await b.join(room)
    await c.join(room, {"broadcast": {"self": True}})
    await a.push("1", "2", room, "broadcast", broadcast_payload(n=1))
    assert (await b.recv())[4] == broadcast_payload(n=1)
    assert (await c.recv())[4] == broadcast_payload(n=1)
    assert await a.nothing()  # self:false: the sender does not get its own
    await c.push("1", "2", room, "broadcast", broadcast_payload(n=2))
    assert (await c.recv())[4] == broadcast_payload(n=2)  # self:true: it does
    assert (await a.recv())[4] == broadcast_payload(n=2)


async def test_broadcast_no_cross_topic_leak(connect) -> None:
    a, b = await connect(), await connect()
    room_a, room_b = topic(), topic()
    await a.join(room_a)
    await b.join(room_b)
    await a.join(room_b, ref="7")
    await a.push("1", "2", room_a, "broadcast", broadcast_payload(secret=1))
    assert await b.nothing()
    await a.push("7", "8", room_b, "broadcast", broadcast_payload(public=1))
    assert (await b.recv())[4] == broadcast_payload(public=1)


async def test_public_and_private_topics_are_isolated(connect, realtime_schema) -> None:  # C71
    service = token("service_role")
    pub, priv = await connect(apikey=service), await connect(apikey=service)
    room = topic()
    await pub.join(room, {"private": False})
    await priv.join(room, {"private": True})
    await pub.push("1", "2", room, "broadcast", broadcast_payload(side="public"))
    assert await priv.nothing()
    await priv.push("1", "2", room, "broadcast", broadcast_payload(side="private"))
    assert await pub.nothing()


async def test_binary_delivery_matrix(connect) -> None:  # C68, C69, C70
    sender, v2, v1 = await connect(), await connect(), await connect(vsn="1.0.0")
    room = topic()
    for client in (sender, v2, v1):
        await client.join(room)
    header = bytes([3, 1, 1, len(room), 6, 0])
    # kind 3 JSON -> V2 kind 4 encoding 1 same bytes; V1 gets the JSON object
    await sender.ws.send_to(bytes_data=header + b"\x01" + b"12" + room.encode() + b"cursor" + b'{"x":1}')
    assert await v2.recv() == bytes([4, len(room), 6, 0, 1]) + room.encode() + b"cursor" + b'{"x":1}'
    frame = await v1.recv()
    assert frame == {"topic": room, "event": "broadcast", "payload": {"type": "broadcast", "event": "cursor", "payload": {"x": 1}}, "ref": None}
    # kind 3 raw bytes -> V2 kind 4 encoding 0; V1 nothing
    await sender.ws.send_to(bytes_data=header + b"\x00" + b"12" + room.encode() + b"cursor" + b"\x00\xff")
    assert await v2.recv() == bytes([4, len(room), 6, 0, 0]) + room.encode() + b"cursor" + b"\x00\xff"
    assert await v1.nothing()
    # a V1 JSON broadcast reaches V2 as a text frame
    await v1.push("1", "3", room, "broadcast", broadcast_payload(from_v1=True))
    assert await v2.recv() == [None, None, room, "broadcast", broadcast_payload(from_v1=True)]


async def test_invalid_frames_leave_the_socket_open(connect) -> None:  # C14, C18
    a = await connect()
    for bad in ("{not json", "[1,2]", '{"topic":1}', "[null,null,5,\"x\",{}]", "null"):
        await a.ws.send_to(text_data=bad)
    await a.ws.send_to(bytes_data=b"\x03\x01\x01\x0e")  # truncated kind 3
    await a.ws.send_to(bytes_data=b"\x00abc")  # kind 0 is never accepted
    await a.push(None, "9", "phoenix", "heartbeat", {})
    assert await a.recv() == [None, "9", "phoenix", "phx_reply", {"status": "ok", "response": {}}]


async def test_oversized_frame_closes_with_1009(connect, settings) -> None:
    settings.REALTIME_MAX_FRAME_BYTES = 1000
    a = await connect()
    await a.ws.send_to(text_data=json.dumps([None, "1", "phoenix", "heartbeat", {"x": "y" * 2000}]))
    assert (await a.ws.receive_output(2)) == {"type": "websocket.close", "code": 1009}


async def test_ack_for_binary_broadcast(connect) -> None:  # C67
    a, b = await connect(), await connect()
    room = topic()
    await a.join(room, {"broadcast": {"ack": True}})
    await b.join(room)
    await a.ws.send_to(bytes_data=bytes([3, 1, 2, len(room), 1, 0, 1]) + b"1" + b"77" + room.encode() + b"e" + b"{}")
    assert await a.recv() == ["1", "77", room, "phx_reply", {"status": "ok", "response": {}}]
    assert await b.recv() == bytes([4, len(room), 1, 0, 1]) + room.encode() + b"e" + b"{}"  # acked and delivered


async def test_join_refusals_arrive_as_error_replies(connect) -> None:  # C19, C24, C25
    a = await connect()
    reply = await a.join("realtime:")
    assert reply[4] == {"status": "error", "response": {"reason": "TopicNameRequired: You must provide a topic name"}}
    reply = await a.join(topic(), access_token=token(exp_in=-10))
    assert reply[4]["response"]["reason"].startswith("InvalidJWTToken: Token has expired")
    reply = await a.join(topic(), access_token="potato")
    assert reply[4]["response"]["reason"] == "MalformedJWT: The token provided is not a valid JWT"


async def test_token_expiring_while_joined_closes_the_channel(connect) -> None:  # C35
    a = await connect()
    room = topic()
    await a.join(room, access_token=token(exp_in=1.2))
    system = await a.recv(timeout=4)
    assert system[3] == "system" and system[4]["message"].startswith("Token has expired")
    assert system[4]["extension"] == "system" and system[4]["status"] == "error"
    assert (await a.recv())[3] == "phx_close"


async def test_refused_connect_without_a_key(connect) -> None:  # C2 (status and body: see test_handshake)
    await connect(apikey="", expect=False)


async def test_x_api_key_header_wins_over_apikey(connect) -> None:  # C5
    await connect(apikey="potato", headers=[(b"x-api-key", token().encode())])


async def test_one_thousand_joins_in_a_burst_keep_the_server_serving(connect, settings) -> None:
    settings.REALTIME_MAX_JOINS_PER_SECOND = 0  # the channel limit alone (the join rate: test_hostile.py)
    a, b, watcher = await connect(), await connect(), await connect()
    room = topic()
    await b.join(room)
    await watcher.join(room)
    for i in range(1000):
        await a.push(str(i), str(i), f"realtime:burst-{i}", "phx_join", {"config": {}})
    replies = [await a.recv(timeout=10) for _ in range(1000)]
    assert sum(r[4]["status"] == "ok" for r in replies) == 100  # the per-socket channel limit
    assert all(r[4]["response"] == {"reason": "ChannelRateLimitReached: Too many channels"} for r in replies if r[4]["status"] == "error")
    await b.push("1", "2", room, "broadcast", broadcast_payload(still="alive"))
    assert (await watcher.recv())[4] == broadcast_payload(still="alive")


async def test_silent_socket_is_closed_after_the_idle_timeout(connect, settings) -> None:
    settings.REALTIME_IDLE_TIMEOUT_S = 1
    a = await connect()
    await a.push(None, "1", "phoenix", "heartbeat", {})
    await a.recv()
    assert (await a.ws.receive_output(3))["type"] == "websocket.close"


async def test_the_process_joins_a_topic_group_once_and_leaves_it_with_its_last_channel(connect) -> None:
    import asyncio

    from channels.layers import get_channel_layer

    from core.topics import broadcast_group, sub_topic

    layer = get_channel_layer()
    room = topic()
    key = layer._group_key(broadcast_group(sub_topic(room), False))

    async def members() -> int:
        async with layer.connection(layer.consistent_hash(broadcast_group(sub_topic(room), False))) as redis:
            return await redis.zcard(key)

    a, b = await connect(), await connect()
    await a.join(room)
    await b.join(room)
    assert await members() == 1  # two local channels, one membership for the process
    await a.push("1", "2", room, "phx_leave", {})
    await b.push("1", "2", room, "phx_leave", {})
    for _ in range(50):
        if await members() == 0:
            break
        await asyncio.sleep(0.05)
    assert await members() == 0
    await a.recv_event("phx_close")
    await a.join(room, ref="5")
    assert await members() == 1


async def test_memberships_lost_in_redis_are_restored_within_seconds(connect) -> None:
    """A Redis restart forgets every group member; the hub re-adds itself without waiting a minute."""
    import asyncio

    from channels.layers import get_channel_layer

    from core.topics import broadcast_group, sub_topic

    layer = get_channel_layer()
    room = topic()
    group = broadcast_group(sub_topic(room), False)
    a, b = await connect(), await connect()
    await a.join(room)
    await b.join(room)
    async with layer.connection(layer.consistent_hash(group)) as redis:
        await redis.delete(layer._group_key(group))
    await asyncio.sleep(3)
    await a.push("1", "2", room, "broadcast", broadcast_payload(after="restart"))
    assert (await b.recv(timeout=3))[4] == broadcast_payload(after="restart")


# --- private channels (PROTOCOL.md 7) ----------------------------------------


async def test_private_member_gets_what_its_policies_allow(connect, policy) -> None:  # C91, C92
    room = topic()
    sub = room.removeprefix("realtime:")
    policy(f"FOR SELECT TO authenticated USING (realtime.topic() = {sql_literal(sub)})")
    member = await connect(apikey=token("authenticated"))
    admin = await connect(apikey=token("service_role"))
    reply = await member.join(room, {"private": True, "broadcast": {"ack": True}})
    assert reply[4] == {"status": "ok", "response": {"postgres_changes": []}}
    await admin.join(room, {"private": True})
    await member.push("1", "2", room, "broadcast", broadcast_payload(n=1))
    assert await admin.nothing(0.5)  # read without write: dropped, and no ack
    assert await member.nothing(0.1)
    await admin.push("1", "3", room, "broadcast", broadcast_payload(n=2))
    assert await member.recv() == [None, None, room, "broadcast", broadcast_payload(n=2)]
    other = await member.join(f"{room}-2", {"private": True}, ref="5")
    assert other[4]["response"] == {"reason": f"Unauthorized: You do not have permissions to read from this Channel topic: {sub}-2"}


async def test_private_join_is_refused_with_a_reason_when_the_database_fails(connect, monkeypatch) -> None:
    async def unreachable(*args, **kwargs):
        raise psycopg.OperationalError("connection refused")

    monkeypatch.setattr("realtime.consumer.check_policies", unreachable)
    client = await connect()
    room = topic()
    reply = await client.join(room, {"private": True})
    assert reply == ["1", "1", room, "phx_reply", {"status": "error", "response": {
        "reason": "UnableToConnectToProject: Realtime was unable to connect to the project database"}}]
    await client.push(None, "9", "phoenix", "heartbeat", {})
    assert (await client.recv())[4] == {"status": "ok", "response": {}}  # the socket goes on


async def test_a_burst_of_broadcasts_arrives_complete_and_in_order(connect) -> None:
    """Broadcasts of several senders queue behind each other and travel as batches; each still
    arrives as its own frame, every sender's in the order sent."""
    room = topic()
    receiver = await connect()
    await receiver.join(room)
    senders = [await connect() for _ in range(4)]
    for sender in senders:
        await sender.join(room)
    for n in range(10):
        for s, sender in enumerate(senders):
            await sender.push("1", str(n + 10), room, "broadcast", broadcast_payload(s=s, n=n))
    frames = [(await receiver.recv_event("broadcast", timeout=5))[4]["payload"] for _ in range(40)]
    for s in range(4):
        assert [f["n"] for f in frames if f["s"] == s] == list(range(10))
    assert await receiver.nothing(0.3)
