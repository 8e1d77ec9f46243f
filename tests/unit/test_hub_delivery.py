"""The hub's fan-out under failure: one bad socket or one bad message costs only itself.

Runs the real ``Hub`` on channels' ``InMemoryChannelLayer`` and the real
``SocketWriter``; no server, no Redis.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from realtime.hub import Hub, Subscription
from realtime.protocol.message import Vsn
from core.types import KIND_JSON, BroadcastMessage
from realtime.writer import SocketWriter

pytestmark = pytest.mark.unit

GROUP = "bcast.room1"


class Recorder:
    """A socket's writer that keeps what it is given."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def write(self, frame: dict[str, Any]) -> bool:
        self.frames.append(frame)
        return True


class Broken:
    def write(self, frame: dict[str, Any]) -> bool:
        raise RuntimeError("this socket's transport is broken")


def message(text: str) -> BroadcastMessage:
    return BroadcastMessage(
        type="realtime.broadcast", group=GROUP, topic="realtime:room1", origin="", kind=KIND_JSON,
        event="e", encoding=1, payload=('{"type":"broadcast","event":"e","payload":{"t":"%s"}}' % text).encode(),
    )


async def until(predicate: Any, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_a_socket_whose_write_raises_does_not_stop_delivery_to_the_others() -> None:
    layer = InMemoryChannelLayer()
    hub = Hub(layer)
    good = Recorder()
    await hub.subscribe(GROUP, Subscription("bad", "realtime:room1", Vsn.V2, False, Broken()))  # type: ignore[arg-type]
    await hub.subscribe(GROUP, Subscription("good", "realtime:room1", Vsn.V2, False, good))  # type: ignore[arg-type]
    try:
        await layer.group_send(GROUP, message("1"))
        await layer.group_send(GROUP, message("2"))
        await until(lambda: len(good.frames) == 2)
        assert ['"t":"1"' in f["text"] for f in good.frames] == [True, False]
        assert hub.failed == 2 and hub.delivered == 2
    finally:
        await hub.aclose()


async def test_a_message_that_makes_the_hub_raise_is_counted_and_the_next_one_delivered() -> None:
    layer = InMemoryChannelLayer()
    hub = Hub(layer)
    good = Recorder()
    await hub.subscribe(GROUP, Subscription("good", "realtime:room1", Vsn.V2, False, good))  # type: ignore[arg-type]
    try:
        await layer.group_send(GROUP, {"type": "realtime.broadcast", "group": GROUP})  # no topic, no payload
        await layer.group_send(GROUP, {"type": "realtime.changes", "group": GROUP})  # no changes
        await layer.group_send(GROUP, {"type": "unknown.kind"})
        await layer.group_send(GROUP, message("after"))
        await until(lambda: len(good.frames) == 1)
        assert '"t":"after"' in good.frames[0]["text"]
        assert hub.loop_errors == 1  # the broadcast raised; the run of changes had no route; the unknown type is dropped
    finally:
        await hub.aclose()


# --- SocketWriter (servers without a direct writer) ---------------------------------------


async def test_a_peer_that_stops_reading_is_cut_at_the_cap_and_others_keep_receiving() -> None:
    stalled = asyncio.Event()  # never set: this peer never reads
    overflowed: list[str] = []

    async def stuck_send(frame: dict[str, Any]) -> None:
        await stalled.wait()

    sent: list[dict[str, Any]] = []

    async def reading_send(frame: dict[str, Any]) -> None:
        sent.append(frame)

    slow = SocketWriter(stuck_send, None, 10_000, lambda: overflowed.append("slow"))
    fast = SocketWriter(reading_send, None, 10_000, lambda: overflowed.append("fast"))
    frame = {"type": "websocket.send", "text": "x" * 1000}
    for _ in range(50):  # 50,000 characters into each; the hub never waits for either
        slow.write(frame)
        fast.write(frame)
        await asyncio.sleep(0)
    await until(lambda: len(sent) == 50)
    assert overflowed == ["slow"]
    assert slow.closed and slow.unsent == 0
    assert not slow.write(frame)  # later frames are dropped
    assert not fast.closed


async def test_queued_frames_go_out_in_order() -> None:
    sent: list[str] = []

    async def send(frame: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        sent.append(frame["text"])

    writer = SocketWriter(send, None, 1_000_000, lambda: None)
    for i in range(20):
        writer.write({"type": "websocket.send", "text": str(i)})
    await until(lambda: len(sent) == 20)
    assert sent == [str(i) for i in range(20)]
    assert writer.unsent == 0


async def test_a_direct_writer_that_raises_marks_the_socket_closed() -> None:
    def direct(frame: dict[str, Any]) -> None:
        raise ConnectionError("gone")

    async def unused(frame: dict[str, Any]) -> None:
        raise AssertionError("the ASGI send is not used when a direct writer exists")

    writer = SocketWriter(unused, direct, 10, lambda: None)
    assert not writer.write({"type": "websocket.send", "text": "x"})
    assert writer.closed


async def test_a_disconnect_sent_to_the_process_group_reaches_only_that_process() -> None:
    """The admin's Disconnect: ``realtime.disconnect`` to a process's group names one of its sockets."""
    layer = InMemoryChannelLayer()
    closed: dict[str, list[str]] = {"p1": [], "p2": []}

    def closer(process: str) -> Any:
        async def disconnect(socket_id: str) -> None:
            closed[process].append(socket_id)

        return disconnect

    hubs = [Hub(layer, process_group=f"rt.proc.{p}", disconnect=closer(p)) for p in ("p1", "p2")]
    for hub in hubs:  # a hub joins its process group when it starts, with its first subscription
        await hub.subscribe(GROUP, Subscription("s", "realtime:room1", Vsn.V2, False, Recorder()))  # type: ignore[arg-type]
    try:
        await layer.group_send("rt.proc.p2", {"type": "realtime.disconnect", "socket_id": "socket-b"})
        await until(lambda: closed["p2"] == ["socket-b"])
        assert closed["p1"] == []
    finally:
        for hub in hubs:
            await hub.aclose()
