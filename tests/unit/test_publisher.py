"""The batching publisher: alone at low load, together while a send is in flight, in order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from realtime.publisher import Publisher
from core.types import BroadcastMessage

pytestmark = pytest.mark.unit


class SlowLayer(InMemoryChannelLayer):
    """channels' in-memory layer whose sends take ``delay`` seconds (or fail); records what each carried."""

    def __init__(self, delay: float = 0.01, fail: bool = False) -> None:
        super().__init__()
        self.delay = delay
        self.fail = fail
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("redis is down")
        self.sent.append((group, message))
        await super().group_send(group, message)


def message(group: str, n: int) -> BroadcastMessage:
    return BroadcastMessage(
        type="realtime.broadcast", group=group, topic="realtime:t", origin="", kind="json", event="e",
        encoding=1, payload=str(n).encode(),
    )


def payloads(sent: dict[str, Any]) -> list[bytes]:
    if sent["type"] == "realtime.batch":
        return [m["payload"] for m in sent["messages"]]
    return [sent["payload"]]


async def test_a_lone_message_goes_out_as_itself() -> None:
    layer = SlowLayer()
    await Publisher(layer).publish(message("g", 1))  # type: ignore[arg-type]
    assert layer.sent == [("g", message("g", 1))]


async def test_messages_queued_behind_a_send_go_out_together_in_order() -> None:
    layer = SlowLayer()
    publisher = Publisher(layer)  # type: ignore[arg-type]
    first = asyncio.ensure_future(publisher.publish(message("g", 0)))
    await asyncio.sleep(0.001)  # the first send is in flight now
    await asyncio.gather(first, *(publisher.publish(message("g", n)) for n in range(1, 30)))
    assert [payloads(m) for _, m in layer.sent] == [[b"0"], [str(n).encode() for n in range(1, 30)]]
    assert layer.sent[1][1]["type"] == "realtime.batch" and layer.sent[1][1]["group"] == "g"


async def test_groups_are_sent_separately_and_batches_are_capped() -> None:
    layer = SlowLayer()
    publisher = Publisher(layer, max_batch=10)  # type: ignore[arg-type]
    await asyncio.gather(*(publisher.publish(message(g, n)) for n in range(25) for g in ("a", "b")))
    for group in ("a", "b"):
        sent = [payloads(m) for g, m in layer.sent if g == group]
        assert [p for batch in sent for p in batch] == [str(n).encode() for n in range(25)]
        assert max(len(batch) for batch in sent) <= 10


async def test_linger_gathers_messages_published_soon_after() -> None:
    layer = SlowLayer(delay=0)
    publisher = Publisher(layer)  # type: ignore[arg-type]

    async def later(n: int) -> None:
        await asyncio.sleep(0.002)
        await publisher.publish(message("g", n), linger=0.02)

    await asyncio.gather(publisher.publish(message("g", 0), linger=0.02), later(1), later(2))
    assert [payloads(m) for _, m in layer.sent] == [[b"0", b"1", b"2"]]


async def test_a_failed_send_fails_its_publishers_and_the_next_ones_still_go() -> None:
    layer = SlowLayer(fail=True)
    publisher = Publisher(layer)  # type: ignore[arg-type]
    with pytest.raises(ConnectionError):
        await publisher.publish(message("g", 1))
    layer.fail = False
    await publisher.publish(message("g", 2))
    assert [payloads(m) for _, m in layer.sent] == [[b"2"]]
