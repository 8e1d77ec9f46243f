"""The configured channel layer against the real Redis: a message dropped for a full inbox is counted and logged.

channels_redis drops a ``group_send`` message for every member whose inbox
holds ``capacity`` messages already (``REALTIME_LAYER_CAPACITY``); for a
change that is loss after the replication slot advanced, so it must never be
silent (issue #10).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from django.conf import settings
from django.utils.module_loading import import_string

pytestmark = pytest.mark.integration


@pytest.fixture
async def small_layer() -> AsyncIterator[Any]:
    """The CHANNEL_LAYERS backend and config, with room for 2 messages per inbox and keys of its own."""
    configured = settings.CHANNEL_LAYERS["default"]
    config = {**configured["CONFIG"], "capacity": 2, "prefix": f"test-drops-{uuid.uuid4().hex[:12]}"}
    layer = import_string(configured["BACKEND"])(**config)
    yield layer
    await layer.flush()


async def test_messages_for_a_full_inbox_are_counted_and_logged_with_the_group(
    small_layer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    group = "realtime.test-drops"
    never_receives = await small_layer.new_channel("hub.")
    await small_layer.group_add(group, never_receives)

    with caplog.at_level(logging.INFO):
        for number in range(5):
            await small_layer.group_send(group, {"type": "realtime.test", "n": number})

    assert getattr(small_layer, "dropped", None) == 3, "the 3 messages past the capacity of 2 were not counted"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(group in line for line in warnings), f"no WARNING names the group: {caplog.records!r}"
    received = [await small_layer.receive(never_receives) for _ in range(2)]
    assert [message["n"] for message in received] == [0, 1]  # the inbox kept the first two


async def test_has_member_follows_group_add_and_discard_in_the_real_redis(small_layer: Any) -> None:
    group = "realtime.test-members"
    channel = await small_layer.new_channel("hub.")
    assert await small_layer.has_member(group, channel) is False
    await small_layer.group_add(group, channel)
    assert await small_layer.has_member(group, channel) is True
    await small_layer.refresh_groups([group], channel)
    assert await small_layer.has_member(group, channel) is True
    await small_layer.group_discard(group, channel)
    assert await small_layer.has_member(group, channel) is False
