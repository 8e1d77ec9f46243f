"""This server process's numbers into Redis every few seconds, for the admin's status page (``shared.servers``).

``WithHeartbeat`` asks the runtime (``realtime.runtime``) for its heartbeat on
every ASGI connection (``realtime_project.asgi``), which starts it once per
process, so a process appears on the page from its first request (a load
balancer's health check is enough) or, under uvicorn, from its lifespan
startup. Nothing here may hurt the server: a failed
write is logged at debug level and tried again on the next beat.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings

from realtime.runtime import get_runtime
from realtime.presence import PROCESS_ID
from shared import metrics, servers

logger = logging.getLogger(__name__)

NAME = f"{socket.gethostname()}:{os.getpid()}"
STARTED_AT = time.time()

def snapshot(now: float) -> servers.ServerStatus:
    """This process's numbers now."""
    return servers.ServerStatus(
        name=NAME, host=NAME.rpartition(":")[0], pid=os.getpid(), presence_process=PROCESS_ID,
        started_at=STARTED_AT, updated_at=now, numbers=servers.read_numbers(metrics.SERVER),
    )


async def beat_once(redis: Any) -> None:
    await servers.publish(redis, settings.REALTIME_REDIS_PREFIX, snapshot(time.time()))


async def _beat_forever(stop: asyncio.Event, redis: Callable[[], Any]) -> None:
    while not stop.is_set():
        try:
            await beat_once(redis())
        except Exception as error:  # noqa: BLE001  (Redis down: the page shows the process once it is back)
            logger.debug("server numbers not written to Redis: %s", error)
        try:
            await asyncio.wait_for(stop.wait(), servers.BEAT_EVERY_S)
        except asyncio.TimeoutError:
            pass


class Heartbeat:
    """The loop that writes this process's numbers every ``servers.BEAT_EVERY_S``; owned by the runtime."""

    def __init__(self, redis: Callable[[], Any]) -> None:
        self._redis = redis
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(_beat_forever(self._stop, redis))

    async def close(self) -> None:
        """Stop beating and remove this process from the page at once."""
        self._stop.set()
        try:
            await asyncio.wait_for(self._task, 5)
        except asyncio.TimeoutError:
            self._task.cancel()
        try:
            await servers.forget(self._redis(), settings.REALTIME_REDIS_PREFIX, NAME)
        except Exception as error:  # noqa: BLE001
            logger.debug("server numbers not removed from Redis: %s", error)


class WithHeartbeat:
    """ASGI wrapper: starts the heartbeat on the first connection of each event loop."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        get_runtime().start_heartbeat()
        return await self.application(scope, receive, send)
