"""The presence store's maintenance loop: heartbeat and sweep on their own schedules.

It knows a store only through ``Maintained``: the two steps and their
intervals. The diffs each step returns go to the caller's ``on_leaves``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from redis.exceptions import RedisError

from presence.state import Diff

logger = logging.getLogger(__name__)

REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)

ChannelDiffs = list[tuple[str, Diff]]
OnLeaves = Callable[[str, Diff], Awaitable[None] | None]


class Maintained(Protocol):
    """A store that proves its process alive and sweeps dead ones."""

    @property
    def heartbeat_interval(self) -> float: ...

    @property
    def sweep_interval(self) -> float: ...

    @property
    def retry_interval(self) -> float: ...

    async def heartbeat(self) -> ChannelDiffs: ...

    async def sweep(self) -> ChannelDiffs: ...


async def run_maintenance(store: Maintained, stop_event: asyncio.Event, on_leaves: OnLeaves) -> None:
    """Heartbeat every ``heartbeat_interval`` s and sweep every ``sweep_interval`` s until ``stop_event`` is set.

    Redis errors are logged and the step retried after ``retry_interval``;
    each diff, from either step, is passed to ``on_leaves(channel, diff)``.
    """
    loop = asyncio.get_running_loop()
    next_heartbeat = next_sweep = loop.time()
    while not stop_event.is_set():
        now = loop.time()
        if now >= next_heartbeat:
            next_heartbeat = now + store.heartbeat_interval
            leaves = await _attempt("heartbeat", store.heartbeat, store.retry_interval)
            if leaves is None:
                next_heartbeat = now + store.retry_interval
            else:
                await _deliver(on_leaves, leaves)
        if now >= next_sweep:
            next_sweep = now + store.sweep_interval
            leaves = await _attempt("sweep", store.sweep, store.retry_interval)
            if leaves is None:
                next_sweep = now + store.retry_interval
            else:
                await _deliver(on_leaves, leaves)
        delay = max(0.0, min(next_heartbeat, next_sweep) - loop.time())
        try:
            await asyncio.wait_for(stop_event.wait(), timeout=delay)
        except TimeoutError:
            pass


async def _attempt(step: str, run: Callable[[], Awaitable[ChannelDiffs]], retry_interval: float) -> ChannelDiffs | None:
    try:
        return await run()
    except REDIS_ERRORS as exc:
        logger.warning("presence: %s failed, retrying in %.1f s: %s", step, retry_interval, exc)
    except Exception:
        logger.exception("presence: %s failed, retrying in %.1f s", step, retry_interval)
    return None


async def _deliver(on_leaves: OnLeaves, leaves: ChannelDiffs) -> None:
    for channel, diff in leaves:
        try:
            result = on_leaves(channel, diff)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("presence: on_leaves failed for %s", channel)
