"""This server process's numbers into Redis every few seconds, for the admin's status page (``shared.servers``).

``start_heartbeat`` is called for every ASGI connection (``realtime_project.asgi``)
and starts the loop once per event loop, so a process appears on the page from
its first request (a load balancer's health check is enough) or, under
uvicorn, from its lifespan startup. Nothing here may hurt the server: a failed
write is logged at debug level and tried again on the next beat.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

from django.conf import settings

from realtime.limits import get_redis
from realtime.presence import PROCESS_ID
from shared import metrics, servers

logger = logging.getLogger(__name__)

NAME = f"{socket.gethostname()}:{os.getpid()}"
STARTED_AT = time.time()

_beats: dict[asyncio.AbstractEventLoop, tuple[asyncio.Event, asyncio.Task[None]]] = {}


def snapshot(now: float) -> servers.ServerStatus:
    """This process's numbers now."""
    return servers.ServerStatus(
        name=NAME, host=NAME.rpartition(":")[0], pid=os.getpid(), presence_process=PROCESS_ID,
        started_at=STARTED_AT, updated_at=now, numbers=servers.read_numbers(metrics.SERVER),
    )


async def beat_once(redis: Any) -> None:
    await servers.publish(redis, settings.REALTIME_REDIS_PREFIX, snapshot(time.time()))


async def _beat_forever(stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await beat_once(get_redis())
        except Exception as error:  # noqa: BLE001  (Redis down: the page shows the process once it is back)
            logger.debug("server numbers not written to Redis: %s", error)
        try:
            await asyncio.wait_for(stop.wait(), servers.BEAT_EVERY_S)
        except asyncio.TimeoutError:
            pass


def start_heartbeat() -> None:
    """Start the running loop's heartbeat unless it runs already."""
    loop = asyncio.get_running_loop()
    if loop in _beats:
        return
    stop = asyncio.Event()
    _beats[loop] = (stop, loop.create_task(_beat_forever(stop)))


async def close_heartbeat() -> None:
    """Stop the running loop's heartbeat and remove this process from the page (shutdown, tests)."""
    found = _beats.pop(asyncio.get_running_loop(), None)
    if found is None:
        return
    stop, task = found
    stop.set()
    try:
        await asyncio.wait_for(task, 5)
    except asyncio.TimeoutError:
        task.cancel()
    try:
        await servers.forget(get_redis(), settings.REALTIME_REDIS_PREFIX, NAME)
    except Exception as error:  # noqa: BLE001
        logger.debug("server numbers not removed from Redis: %s", error)


class WithHeartbeat:
    """ASGI wrapper: starts the heartbeat on the first connection of each event loop."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        start_heartbeat()
        return await self.application(scope, receive, send)
