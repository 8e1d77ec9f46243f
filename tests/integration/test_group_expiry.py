"""Group memberships of a server process killed with SIGKILL expire; those of a live one do not.

channels_redis keeps a group's members in a sorted set scored by the time of
their last ``group_add`` and drops those older than ``group_expiry``. Each
server's hub re-adds its groups every third of it (``realtime.hub``), so a
killed process leaves every group within ``REALTIME_GROUP_EXPIRY_S`` plus one
refresh of a survivor, and ``group_send`` stops filling its dead inbox
(issue #10). The servers here run with a 6 s expiry so the test is quick.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest
from channels.layers import get_channel_layer
from redis.asyncio import Redis

from core.topics import broadcast_group, sub_topic
from tests.fixtures.phoenix import PhoenixClient, client_opener, is_text
from tests.fixtures.server import start_server

pytestmark = pytest.mark.integration

GROUP_EXPIRY_S = 6
REFRESH_S = GROUP_EXPIRY_S / 3
SLACK_S = 5.0  # two shared cores: a refresh can be late
CONFIG = {"broadcast": {"ack": False, "self": False}, "presence": {"enabled": False}}


async def members(redis: Redis, group: str) -> set[str]:
    key = get_channel_layer()._group_key(group)
    return {member.decode() for member in await redis.zrange(key, 0, -1)}


async def test_a_killed_process_leaves_its_groups_while_a_live_one_stays() -> None:
    env = {"REALTIME_GROUP_EXPIRY_S": str(GROUP_EXPIRY_S)}
    topic = f"realtime:group-expiry-{uuid.uuid4().hex[:8]}"
    group = broadcast_group(sub_topic(topic), False)
    redis = Redis.from_url(os.environ["REDIS_URL"])
    try:
        with start_server(env=env) as doomed, start_server(env=env) as survivor:
            async with client_opener(PhoenixClient) as open_client:
                on_doomed = await open_client(doomed, "on the doomed process")
                await on_doomed.join_topic(topic, CONFIG)
                (doomed_channel,) = await members(redis, group)
                sender = await open_client(survivor, "sender on the survivor")
                receiver = await open_client(survivor, "receiver on the survivor")
                await sender.join_topic(topic, CONFIG)
                await receiver.join_topic(topic, CONFIG)
                (survivor_channel,) = await members(redis, group) - {doomed_channel}

                assert doomed.process is not None
                doomed.process.kill()
                killed_at = time.monotonic()
                doomed.process.wait(5)
                while doomed_channel in await members(redis, group):
                    assert time.monotonic() - killed_at < GROUP_EXPIRY_S + REFRESH_S + 1 + SLACK_S, (
                        f"the killed process is still a member of {group} after "
                        f"{time.monotonic() - killed_at:.1f} s (group expiry {GROUP_EXPIRY_S} s)"
                    )
                    await asyncio.sleep(0.2)
                print(f"\nmembership of a killed process gone after {time.monotonic() - killed_at:.1f} s "
                      f"(group expiry {GROUP_EXPIRY_S} s, refresh {REFRESH_S:g} s)")

                # The survivor stays a member past two expiries, and its sockets still get broadcasts.
                until = time.monotonic() + 2 * GROUP_EXPIRY_S
                while time.monotonic() < until:
                    assert survivor_channel in await members(redis, group), "the live process lost its membership"
                    await asyncio.sleep(0.5)
                payload = {"type": "broadcast", "event": "ping", "payload": {"after": "two expiries"}}
                await sender.push(topic, "broadcast", payload)
                frame = await receiver.wait_for(lambda f: is_text(f, "broadcast"), "the broadcast after two expiries")
                assert frame[4] == payload
                survivor.check_alive()
    finally:
        await redis.aclose()
