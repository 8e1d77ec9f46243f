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


def test_group_members_are_still_a_sorted_set_at_group_key_on_its_hash_host() -> None:
    """``has_member`` and ``refresh_groups`` read and write where channels_redis keeps a group's members."""
    add = inspect.getsource(RedisChannelLayer.group_add)
    assert "self.connection(self.consistent_hash(group))" in add, "group_add no longer picks its host by consistent_hash"
    assert "self._group_key(group)" in add and ".zadd(" in add, "group_add no longer adds to the ZSET at _group_key"
    assert "self.group_expiry" in add, "group_add no longer expires the group's ZSET after group_expiry"
    send = inspect.getsource(RedisChannelLayer.group_send)
    assert "zremrangebyscore" in send and "group_expiry" in send, "group_send no longer prunes members by their add time"
    layer = RedisChannelLayer(hosts=["redis://127.0.0.1:1/0"], prefix="pre")
    assert layer._group_key("room") == b"pre:group:room"


async def test_has_member_looks_the_channel_up_in_the_groups_sorted_set(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[int, bytes, str]] = []

    class Members:
        def __init__(self, index: int) -> None:
            self.index = index

        async def zscore(self, key: bytes, member: str) -> float | None:
            asked.append((self.index, key, member))
            return 12.5 if member == "hub.in" else None

    monkeypatch.setattr(RedisChannelLayer, "connection", lambda self, index: Members(index))
    layer = RealtimeChannelLayer(hosts=["redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0"], prefix="pre")

    assert await layer.has_member("room", "hub.in") is True
    assert await layer.has_member("room", "hub.out") is False
    assert asked == [(layer.consistent_hash("room"), b"pre:group:room", m) for m in ("hub.in", "hub.out")]
