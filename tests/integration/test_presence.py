"""Presence over the WebSocket endpoint, state in the real Redis (PROTOCOL.md 6)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def topic() -> str:
    return f"realtime:presence-{uuid.uuid4().hex[:8]}"


async def track(client: Any, room: str, payload: Any, ref: str = "5") -> Any:
    await client.push("1", ref, room, "presence", {"type": "presence", "event": "track", "payload": payload})
    return await client.recv_event("phx_reply")


async def test_presence_join(connect) -> None:  # C80, C83
    room = topic()
    a, b, c = await connect(), await connect(), await connect()
    await a.join(room, {"presence": {"enabled": True, "key": "ann"}})
    assert await a.recv() == ["1", None, room, "presence_state", {}]
    await track(a, room, {"user": "ann"})
    await b.join(room, {"presence": {"enabled": True}})
    state = (await b.recv_event("presence_state"))[4]
    assert list(state) == ["ann"]
    [meta] = state["ann"]["metas"]
    assert meta["user"] == "ann" and isinstance(meta["phx_ref"], str)
    await c.join(room)  # presence off: no presence_state
    await c.push(None, "9", "phoenix", "heartbeat", {})
    assert (await c.recv())[3] == "phx_reply"


async def test_track_diffs_reach_every_channel_including_the_tracker(connect) -> None:  # C81, C84, C85
    room = topic()
    a, b = await connect(), await connect()
    await a.join(room, {"presence": {"enabled": True, "key": "u1"}})
    await b.join(room, {"presence": {"enabled": True}})
    await track(a, room, {"user": "a"})
    for client in (a, b):
        diff = (await client.recv_event("presence_diff"))[4]
        assert diff["leaves"] == {} and diff["joins"]["u1"]["metas"][0]["user"] == "a"
    first_ref = diff["joins"]["u1"]["metas"][0]["phx_ref"]
    await track(a, room, {"user": "a"}, ref="6")  # identical: no diff
    assert await b.nothing(0.4)
    await track(a, room, {"user": "a2"}, ref="7")  # update: one diff with both sides
    diff = (await b.recv_event("presence_diff"))[4]
    assert diff["joins"]["u1"]["metas"][0]["user"] == "a2"
    assert diff["joins"]["u1"]["metas"][0]["phx_ref_prev"] == first_ref
    assert diff["leaves"]["u1"]["metas"][0]["phx_ref"] == first_ref


async def test_presence_leave(connect) -> None:  # C86
    room = topic()
    a, b = await connect(), await connect()
    await b.join(room, {"presence": {"enabled": True}})
    for how in ("untrack", "phx_leave", "close"):
        a = await connect()
        await a.join(room, {"presence": {"enabled": True, "key": how}})
        await track(a, room, {"how": how})
        assert (await b.recv_event("presence_diff"))[4]["joins"][how]["metas"][0]["how"] == how
        if how == "untrack":
            await a.push("1", "8", room, "presence", {"type": "presence", "event": "untrack"})
        elif how == "phx_leave":
            await a.push("1", "8", room, "phx_leave", {})
        else:
            await a.ws.disconnect()
        diff = (await b.recv_event("presence_diff"))[4]
        assert diff["joins"] == {} and diff["leaves"][how]["metas"][0]["how"] == how


async def test_non_object_track_payload_keeps_the_channel(connect) -> None:  # C87
    room = topic()
    a, watcher = await connect(), await connect()
    await a.join(room, {"presence": {"enabled": True, "key": "a"}})
    await watcher.join(room, {"presence": {"enabled": True}})
    assert (await watcher.recv_event("presence_state"))[4] == {}
    reply = await track(a, room, "nope")
    assert reply[4] == {"status": "error", "response": {"reason": "Presence track payload must be a map"}}
    assert await watcher.nothing(0.3)
    reply = await track(a, room, {"ok": True}, ref="6")
    assert reply[4]["status"] == "ok"
    diff = (await watcher.recv_event("presence_diff"))[4]  # the channel still tracks
    assert diff["leaves"] == {} and [m["ok"] for m in diff["joins"]["a"]["metas"]] == [True]


async def test_several_sockets_with_one_key_show_several_metas(connect) -> None:
    room = topic()
    a, b, watcher = await connect(), await connect(), await connect()
    for client in (a, b):
        await client.join(room, {"presence": {"enabled": True, "key": "same"}})
        await track(client, room, {"tab": id(client)})
    await watcher.join(room, {"presence": {"enabled": True}})
    state = (await watcher.recv_event("presence_state"))[4]
    assert len(state["same"]["metas"]) == 2


async def test_a_burst_of_tracks_from_many_sockets_is_answered(connect) -> None:
    import asyncio

    room = topic()
    clients = [await connect() for _ in range(150)]
    for client in clients:
        await client.join(room)
    await asyncio.gather(
        *(c.push("1", "5", room, "presence", {"type": "presence", "event": "track", "payload": {"n": i}}) for i, c in enumerate(clients))
    )
    replies = await asyncio.gather(*(c.recv_event("phx_reply", timeout=20) for c in clients))
    assert [reply[4]["status"] for reply in replies] == ["ok"] * len(clients)
    watcher = await connect()
    await watcher.join(room, {"presence": {"enabled": True}})
    state = (await watcher.recv_event("presence_state", timeout=10))[4]
    assert sorted(meta["n"] for entry in state.values() for meta in entry["metas"]) == list(range(len(clients)))
