"""One object per server process that owns its long-lived parts, with one start and one close.

``Runtime`` holds what a server process's sockets share: the database pool of
join-time checks (``realtime.authorization.Database``), the hub
(``realtime.hub``, with this process's claim-set registration), the publisher
(``realtime.publisher``), the presence store and its maintenance loop
(``realtime.presence``), the Redis client of the limits and the socket counter
(``realtime.limits``), the heartbeat of the admin's status page
(``realtime.heartbeat``), and the set of open sockets. Each part is made on first
use (so an in-process test needs no start), or all at once by ``start``.

``close`` undoes everything in an order that leaves nothing behind in Redis:
the presence members of this process leave (their diffs are published at
once, not after the TTL), the hub leaves its groups and removes this process's
claim sets, the socket count is deleted, the pools are closed.

``drain`` is the graceful stop (README, Running in production): new joins are
answered ``RealtimeRestarting`` (``draining``), the open sockets are closed with
1012 in batches spread over ``REALTIME_DRAIN_S`` (``drain_schedule``), then
``close``.

Pools belong to one event loop: ``get_runtime`` gives the running loop's
runtime (a server process has one loop; each test has its own).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from presence.store import RedisPresenceStore
    from realtime.authorization import Database
    from realtime.heartbeat import Heartbeat
    from realtime.hub import Hub
    from realtime.limits import SocketCounter
    from realtime.publisher import Publisher

logger = logging.getLogger(__name__)

CLOSE_NORMAL = 1000  # the admin's Disconnect
CLOSE_SERVICE_RESTART = 1012  # RFC 6455 7.4.1 via IANA: the server restarts; clients reconnect (PROTOCOL.md 1.4)
# Drain batches: one every DRAIN_STEP_S, at least DRAIN_MIN_BATCH sockets each. A process with
# few sockets closes them all at once; one with many spreads them over the whole drain time.
DRAIN_STEP_S = 0.1
DRAIN_MIN_BATCH = 50
# How long the drain waits for closed sockets to finish (their presence leaves) before ``close``.
SOCKETS_GONE_TIMEOUT_S = 5.0
PRESENCE_STOP_TIMEOUT_S = 5.0
# One step of ``close`` (the presence leaves, the hub's groups, a pool) gives up after this long.
CLOSE_STEP_TIMEOUT_S = 10.0


class Drainable(Protocol):
    """A socket the runtime can close (``realtime.consumer.RealtimeConsumer``)."""

    async def close(self, code: int) -> None: ...


def drain_schedule(count: int, duration: float, step: float = DRAIN_STEP_S, min_batch: int = DRAIN_MIN_BATCH) -> list[tuple[float, int]]:
    """Batches closing ``count`` sockets over ``duration`` seconds: (seconds after the start, how many).

    One batch every ``step`` seconds, of at least ``min_batch`` sockets, the
    last one no later than ``duration``; the sizes add up to ``count``.
    """
    if count <= 0:
        return []
    steps = max(1, int(duration / step) + 1) if duration > 0 else 1
    size = max(min_batch, math.ceil(count / steps))
    batches: list[tuple[float, int]] = []
    left = count
    index = 0
    while left > 0:
        take = min(size, left)
        batches.append((round(index * step, 6), take))
        left -= take
        index += 1
    return batches


class Runtime:
    """The shared parts of one server process (one event loop); see the module docstring."""

    def __init__(self) -> None:
        from django.conf import settings

        self._settings = settings
        self._database: Database | None = None
        self._hub: Hub | None = None
        self._publisher: Publisher | None = None
        self._store: RedisPresenceStore | None = None
        self._store_stop: asyncio.Event | None = None
        self._store_task: asyncio.Task[None] | None = None
        self._redis: Redis | None = None
        self._counter: SocketCounter | None = None
        self._heartbeat: Heartbeat | None = None
        self.sockets: set[Drainable] = set()
        self.draining = False
        self.closed = False
        self._drained: asyncio.Event | None = None

    # --- the parts, made on first use ------------------------------------------------

    @property
    def database(self) -> Database:
        if self._database is None:
            from realtime.authorization import Database

            self._database = Database(self._settings.DATABASE_URL, self._settings.REALTIME_PUBLICATION)
        return self._database

    @property
    def hub(self) -> Hub:
        if self._hub is None:
            from core.topics import process_group
            from realtime.hub import new_hub
            from realtime.presence import PROCESS_ID

            self._hub = new_hub(process_group(PROCESS_ID), self.disconnect)
        return self._hub

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            from channels.layers import get_channel_layer

            from realtime.publisher import Publisher

            layer: Any = get_channel_layer()
            if layer is None:
                raise RuntimeError("CHANNEL_LAYERS is not configured")
            self._publisher = Publisher(layer)
        return self._publisher

    @property
    def presence(self) -> RedisPresenceStore:
        """The presence store, with its maintenance loop running."""
        if self._store is None:
            from presence.store import RedisPresenceStore
            from realtime.presence import PROCESS_ID, publish_diff

            store = RedisPresenceStore(self._settings.REDIS_URL, PROCESS_ID, ttl=self._settings.REALTIME_PRESENCE_TTL_S)
            self._store_stop = asyncio.Event()
            self._store_task = asyncio.get_running_loop().create_task(store.run_maintenance(self._store_stop, publish_diff))
            self._store = store
        return self._store

    @property
    def redis(self) -> Redis:
        """The Redis client of the limits and the health check."""
        if self._redis is None:
            from redis.asyncio import Redis

            self._redis = Redis.from_url(self._settings.REDIS_URL, socket_connect_timeout=5, socket_timeout=5)
        return self._redis

    @property
    def socket_counter(self) -> SocketCounter:
        if self._counter is None:
            from realtime.limits import SocketCounter

            self._counter = SocketCounter(self.redis, self._settings.REALTIME_REDIS_PREFIX)
        return self._counter

    def start_heartbeat(self) -> None:
        """Start writing this process's numbers for the admin's status page (``realtime.heartbeat``), once."""
        if self._heartbeat is None and not self.closed:
            from realtime.heartbeat import Heartbeat

            self._heartbeat = Heartbeat(lambda: self.redis)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Make every part now (a server process at startup): the first socket then waits for none of them."""
        parts = (self.hub, self.publisher, self.presence, self.database)  # each property makes its part
        self.start_heartbeat()
        await self.socket_counter.ready()
        logger.debug("runtime started: %s", ", ".join(type(part).__name__ for part in parts))

    def opened(self, socket: Drainable) -> None:
        """A socket was accepted; during a drain it is closed with the next batch."""
        self.sockets.add(socket)

    async def disconnect(self, socket_id: str) -> None:
        """Close this process's socket ``socket_id`` (1000), if it is open here (the admin's Disconnect)."""
        for socket in list(self.sockets):
            if getattr(socket, "socket_id", None) == socket_id:
                logger.info("socket=%s disconnected by an administrator", socket_id)
                await socket.close(CLOSE_NORMAL)

    def gone(self, socket: Drainable) -> None:
        """A socket finished (its leaves sent)."""
        self.sockets.discard(socket)
        if not self.sockets and self._drained is not None:
            self._drained.set()

    async def drain(self, duration: float) -> None:
        """The graceful stop: refuse joins, close every socket (1012) in batches over ``duration``, then ``close``."""
        self.draining = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        pending = list(self.sockets)
        schedule = drain_schedule(len(pending), duration)
        logger.info("draining %d sockets in %d batches over %.1f s", len(pending), len(schedule), duration)
        for offset, size in schedule:
            delay = started + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            batch, pending = pending[:size], pending[size:]
            await self._close_sockets(batch)
        # Sockets accepted meanwhile (before the listener closed) go too.
        await self._close_sockets(list(self.sockets))
        if self.sockets:
            self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), SOCKETS_GONE_TIMEOUT_S)
            except TimeoutError:
                logger.warning("%d sockets did not finish within %.0f s of the drain", len(self.sockets), SOCKETS_GONE_TIMEOUT_S)
        await self.close()

    async def _close_sockets(self, sockets: Iterable[Drainable]) -> None:
        closing = [socket.close(CLOSE_SERVICE_RESTART) for socket in sockets]
        if closing:
            for result in await asyncio.gather(*closing, return_exceptions=True):
                if isinstance(result, Exception):
                    logger.warning("closing a socket for the drain failed: %r", result)

    async def close(self) -> None:
        """Send this process's presence leaves, remove its claim sets and socket count, close the pools."""
        if self.closed:
            return
        self.closed = True
        # Each step is attempted whatever the one before did: a failure is logged, not raised.
        if self._store is not None:
            await _attempt("presence store", self._close_presence(self._store))
        if self._hub is not None:
            await _attempt("hub", self._hub.aclose())
            registration = self._hub.registration
            if registration is not None:
                await _attempt("claim-set registration", registration.redis.aclose())
        if self._publisher is not None:
            await _attempt("publisher", self._publisher.wait_sent(PRESENCE_STOP_TIMEOUT_S))
        if self._counter is not None:
            await _attempt("socket counter", self._counter.aclose())
        if self._database is not None:
            await _attempt("database pool", self._database.close())
        if self._heartbeat is not None:
            await _attempt("heartbeat", self._heartbeat.close())
        if self._redis is not None:
            await _attempt("Redis client", self._redis.aclose())

    async def _close_presence(self, store: RedisPresenceStore) -> None:
        from realtime.presence import publish_diff

        try:
            for channel, diff in await store.untrack_all():
                await publish_diff(channel, diff)
        except Exception:
            logger.exception("could not send the leaves of this process's members")
        if self._store_stop is not None:
            self._store_stop.set()
        if self._store_task is not None:
            try:
                await asyncio.wait_for(self._store_task, PRESENCE_STOP_TIMEOUT_S)
            except TimeoutError:
                self._store_task.cancel()
        await store.close()


async def _attempt(what: str, step: Awaitable[None]) -> None:
    """Run one step of ``close``, at most ``CLOSE_STEP_TIMEOUT_S`` (Redis or PostgreSQL may not answer)."""
    try:
        await asyncio.wait_for(step, CLOSE_STEP_TIMEOUT_S)
    except asyncio.TimeoutError:
        logger.error("closing the %s took over %.0f s; going on without it", what, CLOSE_STEP_TIMEOUT_S)
    except Exception:
        logger.exception("closing the %s failed", what)


_runtimes: dict[asyncio.AbstractEventLoop, Runtime] = {}


async def lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI lifespan (uvicorn): start the runtime at startup, close it at shutdown.

    uvicorn closes every socket with 1012 at once on SIGTERM (no batches), then
    sends ``lifespan.shutdown``: the close then removes this process's claim
    sets and socket count and sends any presence leaves still due. Daphne
    sends no lifespan events; ``realtime.server`` drains instead.
    """
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await get_runtime().start()
            except Exception:
                logger.exception("starting the runtime failed")
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            runtime = current_runtime()
            if runtime is not None:
                await runtime.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


def get_runtime() -> Runtime:
    """The running event loop's runtime (made on first use)."""
    loop = asyncio.get_running_loop()
    runtime = _runtimes.get(loop)
    if runtime is None:
        runtime = _runtimes[loop] = Runtime()
    return runtime


def current_runtime() -> Runtime | None:
    """The running loop's runtime if one was made."""
    return _runtimes.get(asyncio.get_running_loop())


async def close_runtime() -> None:
    """Close the running loop's runtime and forget it (tests give each loop a fresh one)."""
    runtime = _runtimes.pop(asyncio.get_running_loop(), None)
    if runtime is not None:
        await runtime.close()
