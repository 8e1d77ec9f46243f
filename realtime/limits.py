"""Limits counted across server processes in Redis (PROTOCOL.md 8).

* ``SocketCounter``: the sockets of every server process sharing ``REDIS_URL``,
  for ``REALTIME_MAX_CONCURRENT_USERS``. Each process writes its own count to
  ``{prefix}:sockets:{process}`` (expiring after ``COUNT_TTL_S``, so a dead
  process stops counting) and reads the others' every ``REFRESH_S``. A
  connect is admitted against that sum plus this process's live count, with
  no Redis round trip, so the total may overshoot by what other processes
  admitted within one refresh. ``REALTIME_MAX_SOCKETS_PER_ADDRESS`` caps one
  client address's sockets in each process, so no single visitor can take
  every slot.
* ``rest_rate_exceeded``: REST broadcast messages per caller (role, sub and
  client address), one pipelined round trip per request, in fixed windows of
  ``REALTIME_RATE_WINDOW_S`` seconds.

Per-socket rates need no Redis: a socket lives in one process
(``core.rates``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid

from redis.asyncio import Redis

logger = logging.getLogger(__name__)

REFRESH_S = 1.0
# A process whose count is this old no longer counts (it died, or its loop is stalled that long).
COUNT_TTL_S = 15
FIRST_REFRESH_WAIT_S = 2.0


class SocketCounter:
    """This process's open sockets, and the last known count of every other process's."""

    def __init__(self, redis: Redis, prefix: str, process_id: str | None = None) -> None:
        self.redis = redis
        self.prefix = prefix
        self.process_id = process_id or uuid.uuid4().hex
        self.local = 0
        self.others = 0
        self.by_address: dict[str, int] = {}  # this process's sockets per client address
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()

    async def ready(self) -> None:
        """Start the refresh, and wait for its first reading so a new process does not admit blindly."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._refresh_forever())
        if not self._first.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._first.wait()), FIRST_REFRESH_WAIT_S)

    def admits(self, limit: int, address: str = "", per_address: int = 0) -> bool:
        """Whether one more socket stays within ``limit`` and, from ``address``, ``per_address`` (0: none)."""
        if per_address > 0 and self.by_address.get(address, 0) >= per_address:
            return False
        return limit <= 0 or self.others + self.local < limit

    def opened(self, address: str = "") -> None:
        self.local += 1
        self.by_address[address] = self.by_address.get(address, 0) + 1

    def closed(self, address: str = "") -> None:
        self.local -= 1
        left = self.by_address.get(address, 1) - 1
        if left > 0:
            self.by_address[address] = left
        else:
            self.by_address.pop(address, None)

    async def refresh(self) -> None:
        """Publish this process's count and read the others'."""
        processes_key = f"{self.prefix}:socket-processes"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(f"{self.prefix}:sockets:{self.process_id}", self.local, ex=COUNT_TTL_S)
            pipe.sadd(processes_key, self.process_id)
            pipe.smembers(processes_key)
            *_, members = await pipe.execute()
        names = (m.decode() if isinstance(m, bytes) else str(m) for m in members)
        others = [name for name in names if name != self.process_id]
        if not others:
            self.others = 0
            return
        counts = await self.redis.mget([f"{self.prefix}:sockets:{p}" for p in others])
        gone = [p for p, count in zip(others, counts) if count is None]
        if gone:
            await self.redis.srem(processes_key, *gone)
        self.others = sum(int(count) for count in counts if count is not None)

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                logger.warning("could not refresh the socket count in Redis", exc_info=True)
            self._first.set()
            await asyncio.sleep(REFRESH_S)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        try:
            await self.redis.delete(f"{self.prefix}:sockets:{self.process_id}")
        except Exception:
            logger.warning("could not remove this process's socket count from Redis", exc_info=True)


async def rest_rate_exceeded(
    redis: Redis, prefix: str, caller: str, count: int, per_second: int, window: int, now: float
) -> bool:
    """Count ``count`` REST messages for ``caller``; True if its fixed ``window``-second window is over the rate."""
    if per_second <= 0:
        return False
    window = max(1, window)
    digest = hashlib.sha256(caller.encode("utf-8")).hexdigest()[:32]
    key = f"{prefix}:rest-rate:{digest}:{int(now) // window}"
    async with redis.pipeline(transaction=False) as pipe:
        pipe.incrby(key, count)
        pipe.expire(key, window + 1)
        total, _ = await pipe.execute()
    return int(total) > per_second * window


def get_redis() -> Redis:
    """The running loop's Redis client for limits, owned by its runtime."""
    from realtime.runtime import get_runtime

    return get_runtime().redis


def get_socket_counter() -> SocketCounter:
    """The running loop's socket counter, owned by its runtime."""
    from realtime.runtime import get_runtime

    return get_runtime().socket_counter
