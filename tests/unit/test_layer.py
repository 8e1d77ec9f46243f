"""What realtime.layer relies on inside channels_redis: these fail loudly when an upgrade changes it.

``count_full_inboxes`` learns how many inboxes were full from the result of
the Lua script that channels_redis' ``group_send`` runs through
``self.connection(index).eval``. The Redis client here is a stand-in that
answers the few commands ``group_send`` sends, so the test needs no server;
tests/integration/test_layer_drops.py shows the same against the real Redis.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from channels_redis.core import RedisChannelLayer

from realtime.layer import RealtimeChannelLayer, count_full_inboxes

pytestmark = pytest.mark.unit


class StandInPipeline:
    def __init__(self) -> None:
        self.commands: list[str] = []

    def zremrangebyscore(self, key: bytes, min: int, max: int) -> None:
        self.commands.append("zremrangebyscore")

    async def execute(self) -> list[int]:
        return [0] * len(self.commands)


class StandInRedis:
    """Answers what channels_redis 4.3's group_send asks: two members, the first inbox full."""

    def __init__(self) -> None:
        self.scripts: list[str] = []

    async def zremrangebyscore(self, key: bytes, min: int, max: int) -> int:
        return 0

    async def zrange(self, key: bytes, start: int, end: int) -> list[bytes]:
        return [b"hub.full", b"hub.room"]

    def pipeline(self) -> StandInPipeline:
        return StandInPipeline()

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> int:
        self.scripts.append(script)
        return 1


def test_group_send_still_returns_the_full_inboxes_from_its_script() -> None:
    source = inspect.getsource(RedisChannelLayer.group_send)
    assert "self.connection(" in source and ".eval(" in source, "channels_redis no longer evals group_send's script"
    assert "return over_capacity" in source, "group_send's script no longer returns the number of full inboxes"


async def test_count_full_inboxes_reads_the_result_of_group_sends_script(monkeypatch: pytest.MonkeyPatch) -> None:
    redis = StandInRedis()
    monkeypatch.setattr(RedisChannelLayer, "connection", lambda self, index: redis)
    layer = RealtimeChannelLayer(hosts=["redis://127.0.0.1:1/0"], capacity=1)

    # channels_redis' own group_send, with the layer's connection() collecting what eval returns
    assert await count_full_inboxes(RedisChannelLayer.group_send(layer, "room", {"type": "realtime.test"})) == 1
    assert len(redis.scripts) == 1 and "over_capacity" in redis.scripts[0]


async def test_group_send_counts_its_drops_and_outside_it_connections_are_plain(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    redis = StandInRedis()
    monkeypatch.setattr(RedisChannelLayer, "connection", lambda self, index: redis)
    layer = RealtimeChannelLayer(hosts=["redis://127.0.0.1:1/0"], capacity=1)

    await layer.group_send("room", {"type": "realtime.test"})
    await layer.group_send("room", {"type": "realtime.test"})

    assert layer.dropped == 2
    assert layer.connection(0) is redis
    lines = [r.getMessage() for r in caplog.records if r.name == "realtime.layer"]
    assert len(lines) == 1 and "group room" in lines[0], lines  # the second drop within a second is not logged again
