"""A replaying join's live broadcasts wait until it is answered, then arrive in order, minus the rows it replayed.

Runs the real ``Hub`` on channels' ``InMemoryChannelLayer``; no server, no Redis (PROTOCOL.md 5.5).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from realtime.hub import Held, Hub, Subscription
from realtime.protocol.message import Vsn
from core.types import KIND_JSON, BroadcastMessage

pytestmark = pytest.mark.unit

GROUP = "bcast.room1"
TOPIC = "realtime:room1"


class Recorder:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.overflowed = False

    def write(self, frame: dict[str, Any]) -> bool:
        self.frames.append(frame)
        return True

    def overflow(self) -> None:
        self.overflowed = True

    def texts(self) -> list[str]:
        return [f["text"].split('"t":"')[1].split('"')[0] for f in self.frames]


def message(text: str, row_id: str | None = None) -> BroadcastMessage:
    msg = BroadcastMessage(
        type="realtime.broadcast", group=GROUP, topic=TOPIC, origin="", kind=KIND_JSON,
        event="e", encoding=1, payload=('{"type":"broadcast","event":"e","payload":{"t":"%s"}}' % text).encode(),
    )
    if row_id is not None:
        msg["id"] = row_id
    return msg


async def settle(layer: InMemoryChannelLayer, hub: Hub, *texts: tuple[str, str | None]) -> None:
    for text, row_id in texts:
        await layer.group_send(GROUP, message(text, row_id))
    for _ in range(50):  # the hub's receive loop runs on this loop
        await asyncio.sleep(0.002)


async def test_held_broadcasts_arrive_after_release_in_order_without_the_replayed_rows() -> None:
    layer = InMemoryChannelLayer()
    hub = Hub(layer)
    sock = Recorder()
    held = Held(1_000_000)
    hold = Subscription("s", TOPIC, Vsn.V1, False, sock, held=held)  # type: ignore[arg-type]
    try:
        await hub.subscribe(GROUP, hold)
        await settle(layer, hub, ("a", "id-a"), ("b", None), ("c", "id-c"))
        assert sock.frames == []  # nothing before the join is answered
        # The join opened: its own subscription, with the ids it replayed, takes the same Held.
        await hub.subscribe(GROUP, Subscription("s", TOPIC, Vsn.V1, False, sock, frozenset({"id-a"}), held))  # type: ignore[arg-type]
        await settle(layer, hub, ("d", None))
        assert sock.frames == []
        sock.frames.append({"text": '{"t":"reply-and-replayed-rows"}'})  # what the session sends before release
        hub.release(GROUP, hold, None)
        await settle(layer, hub, ("e", "id-a"), ("f", None))  # id-a replayed: skipped live too
        assert sock.texts() == ["reply-and-replayed-rows", "b", "c", "d", "f"]
    finally:
        await hub.aclose()


async def test_a_join_that_did_not_open_gives_the_earlier_channel_its_place_and_the_held_broadcasts() -> None:
    layer = InMemoryChannelLayer()
    hub = Hub(layer)
    sock = Recorder()
    earlier = Subscription("s", TOPIC, Vsn.V1, False, sock)  # type: ignore[arg-type]
    await hub.subscribe(GROUP, earlier)
    hold = Subscription("s", TOPIC, Vsn.V1, False, sock, held=Held(1_000_000))  # type: ignore[arg-type]
    try:
        previous = hub.subscription(GROUP, "s", TOPIC)
        assert previous is earlier
        await hub.subscribe(GROUP, hold)
        await settle(layer, hub, ("a", None))
        hub.release(GROUP, hold, previous)  # the replay failed: no Subscribe came
        await settle(layer, hub, ("b", None))
        assert sock.texts() == ["a", "b"]
        assert hub.subscription(GROUP, "s", TOPIC) is earlier
    finally:
        await hub.aclose()


async def test_a_join_that_did_not_open_and_had_no_earlier_channel_leaves_the_group() -> None:
    layer = InMemoryChannelLayer()
    hub = Hub(layer)
    sock = Recorder()
    hold = Subscription("s", TOPIC, Vsn.V1, False, sock, held=Held(1_000_000))  # type: ignore[arg-type]
    try:
        await hub.subscribe(GROUP, hold)
        await settle(layer, hub, ("a", None))
        hub.release(GROUP, hold, None)
        await settle(layer, hub, ("b", None))
        assert sock.frames == [] and hub.subscription(GROUP, "s", TOPIC) is None
    finally:
        await hub.aclose()


async def test_more_held_than_the_unsent_cap_closes_that_socket_only() -> None:
    layer = InMemoryChannelLayer()
    hub = Hub(layer)
    sock, bystander = Recorder(), Recorder()
    held = Held(200)  # bytes
    hold = Subscription("s", TOPIC, Vsn.V1, False, sock, held=held)  # type: ignore[arg-type]
    try:
        await hub.subscribe(GROUP, hold)
        await hub.subscribe(GROUP, Subscription("other", TOPIC, Vsn.V1, False, bystander))  # type: ignore[arg-type]
        await settle(layer, hub, *[(str(i), None) for i in range(10)])
        assert held.overflowed and held.frames == []
        await hub.subscribe(GROUP, Subscription("s", TOPIC, Vsn.V1, False, sock, held=held))  # type: ignore[arg-type]
        hub.release(GROUP, hold, None)
        assert sock.overflowed and sock.frames == []
        assert bystander.texts() == [str(i) for i in range(10)]
    finally:
        await hub.aclose()
