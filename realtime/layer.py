"""The channel layer: channels_redis' ``RedisChannelLayer`` with full inboxes counted and memberships refreshed in bulk.

channels_redis drops a message inside ``group_send`` for every member whose
inbox already holds ``capacity`` messages (``REALTIME_LAYER_CAPACITY``) and
says so only in an INFO log line. For a change that is silent loss after the
replication slot advanced, so ``RealtimeChannelLayer`` counts those drops per
process (``dropped``, for metrics) and logs them at WARNING with the group,
at most once per group and ``DROP_LOG_INTERVAL_S``.

A member of a group stays until ``group_expiry`` seconds after its last
``group_add`` (``REALTIME_GROUP_EXPIRY_S``), so the groups of a killed process
stop receiving within that time; ``refresh_groups`` is how the live processes
re-add theirs (``realtime.hub``), one pipeline for many groups.

This is the one module that relies on channels_redis' internals, which its
public API has no equivalent for; ``tests/unit/test_layer.py`` fails if an
upgrade changes one of them:

- how many inboxes were full: ``count_full_inboxes`` reads it from the result
  of ``group_send``'s Lua script (``self.connection(index).eval``);
- where a group's members are: a sorted set at ``_group_key(group)`` on the
  host ``consistent_hash(group)``, scored by the time of the ``group_add``,
  which ``refresh_groups`` and ``has_member`` read and write.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Iterable
from contextvars import ContextVar
from typing import Any

from channels_redis.core import RedisChannelLayer

from shared import metrics

logger = logging.getLogger(__name__)

DROP_LOG_INTERVAL_S = 1.0
REFRESH_CHUNK = 500  # groups per pipeline: ~20 ms of encoding each, so the loop is never held long

# The full-inbox counts of the group_send running in this task, if any.
_full_inboxes: ContextVar[list[int] | None] = ContextVar("full_inboxes", default=None)


class _CountingConnection:
    """A Redis client that adds the result of each ``eval`` (the full inboxes, in ``group_send``) to ``counts``."""

    __slots__ = ("_connection", "_counts")

    def __init__(self, connection: Any, counts: list[int]) -> None:
        self._connection = connection
        self._counts = counts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    async def eval(self, *args: Any) -> Any:
        result = await self._connection.eval(*args)
        self._counts.append(int(result))
        return result


async def count_full_inboxes(send: Awaitable[None]) -> int:
    """Await a ``RealtimeChannelLayer`` group_send of channels_redis; how many inboxes it found full.

    channels_redis 4.3 runs one Lua script per Redis host through
    ``self.connection(index).eval`` and that script returns the number of
    inboxes over capacity; ``RealtimeChannelLayer.connection`` hands out a
    client that collects those results while this call runs.
    """
    counts: list[int] = []
    token = _full_inboxes.set(counts)
    try:
        await send
    finally:
        _full_inboxes.reset(token)
    return sum(counts)


class RealtimeChannelLayer(RedisChannelLayer):  # type: ignore[misc]  # channels_redis is untyped
    """``RedisChannelLayer`` that counts and logs the messages it drops for full inboxes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dropped = 0  # messages not delivered to an inbox that was full, since the process started
        self._unlogged: dict[str, int] = {}  # group -> drops not logged yet (throttled)
        self._logged_at: dict[str, float] = {}  # group -> monotonic time of its last WARNING

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        full = await count_full_inboxes(super().group_send(group, message))
        if full:
            self._count_drops(group, full)

    def connection(self, index: int) -> Any:
        connection = super().connection(index)
        counts = _full_inboxes.get()
        return connection if counts is None else _CountingConnection(connection, counts)

    def _count_drops(self, group: str, full: int) -> None:
        self.dropped += full
        metrics.layer_drops.inc(full)
        now = time.monotonic()
        unlogged = self._unlogged.pop(group, 0) + full
        if now - self._logged_at.get(group, -DROP_LOG_INTERVAL_S) < DROP_LOG_INTERVAL_S:
            self._unlogged[group] = unlogged
            return
        if len(self._logged_at) > 10_000:  # forget groups that dropped long ago
            self._logged_at = {g: at for g, at in self._logged_at.items() if now - at < DROP_LOG_INTERVAL_S}
        self._logged_at[group] = now
        logger.warning(
            "channel layer dropped %d message(s) for full inboxes in group %s (capacity %d; %d dropped by this process)",
            unlogged,
            group,
            self.capacity,
            self.dropped,
        )

    async def has_member(self, group: str, channel: str) -> bool:
        """Whether Redis lists ``channel`` in ``group`` (the hub's check that Redis kept its memberships)."""
        connection = self.connection(self.consistent_hash(group))
        return await connection.zscore(self._group_key(group), channel) is not None

    async def refresh_groups(self, groups: Iterable[str], channel: str) -> None:
        """Re-add ``channel`` to every group (as ``group_add`` does) and drop members past ``group_expiry``.

        One pipeline per ``REFRESH_CHUNK`` groups instead of two round trips per
        group; the members it drops are those of processes that stopped
        refreshing (killed), which ``group_send`` would skip anyway.
        """
        by_host: defaultdict[int, list[str]] = defaultdict(list)
        for group in groups:
            by_host[self.consistent_hash(group)].append(group)
        for index, names in by_host.items():
            connection = self.connection(index)
            for start in range(0, len(names), REFRESH_CHUNK):
                now = time.time()
                pipe = connection.pipeline(transaction=False)
                for group in names[start : start + REFRESH_CHUNK]:
                    key = self._group_key(group)
                    # The same bound as group_send's pruning.
                    pipe.zremrangebyscore(key, min=0, max=int(now) - self.group_expiry)
                    pipe.zadd(key, {channel: now})
                    pipe.expire(key, self.group_expiry)
                await pipe.execute()
