"""Publishing broadcasts and presence diffs to their groups, batched under load.

Each ``group_send`` costs a few Redis round trips here and one receive in every
member process's hub. While one send to a group is in flight, further
messages for that group queue up; the next send carries all of them as one
``realtime.batch`` layer message, which the hub writes out in order, each as
its own frame, with the writes to each socket coalesced. At low load every
message goes out alone and at once; under load the batches grow by
themselves, so the per-message cost falls exactly when it matters. Messages
of one group keep their order.
"""

from __future__ import annotations

import asyncio
import logging

from channels.layers import BaseChannelLayer

from core.types import BatchMessage, BroadcastMessage

logger = logging.getLogger(__name__)

MAX_BATCH = 100
# Payload bytes in one batch: a layer message stays far below Redis's 512 MB bulk limit and the
# receiving hubs' memory stays bounded; one larger broadcast still goes, alone.
MAX_BATCH_BYTES = 4 * 1024 * 1024


class Publisher:
    """One per event loop: per-group queues, each drained by one sending task."""

    def __init__(self, layer: BaseChannelLayer, max_batch: int = MAX_BATCH) -> None:
        self._layer = layer
        self._max_batch = max_batch
        self._queues: dict[str, list[tuple[BroadcastMessage, asyncio.Future[None]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def publish(self, message: BroadcastMessage, linger: float = 0.0) -> None:
        """Returns once the message is in the channel layer; raises what the send raised.

        ``linger``: seconds the first message of an idle group waits for
        others to join its batch (presence diffs trade a few milliseconds for
        fewer sends and writes; broadcasts go at once).
        """
        group = message["group"]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(group)
        if queue is None:
            queue = self._queues[group] = []
            task = asyncio.ensure_future(self._drain(group, linger))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        queue.append((message, done))
        await done

    async def wait_sent(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for what is queued to be in the channel layer (shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def _drain(self, group: str, linger: float) -> None:
        if linger > 0:
            await asyncio.sleep(linger)
        while True:
            queue = self._queues[group]
            if not queue:
                del self._queues[group]
                return
            count = _batch_length(queue, self._max_batch, MAX_BATCH_BYTES)
            batch, self._queues[group] = queue[:count], queue[count:]
            payload: BroadcastMessage | BatchMessage
            if len(batch) == 1:
                payload = batch[0][0]
            else:
                payload = BatchMessage(type="realtime.batch", group=group, messages=[m for m, _ in batch])
            try:
                await self._layer.group_send(group, payload)
            except Exception as error:
                _fail(batch, error)
            except BaseException:
                # Cancelled (shutdown): nothing more goes out for this group; nobody waits forever.
                _fail(batch + self._queues.pop(group, []), RuntimeError("publishing was cancelled"))
                raise
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)


def _batch_length(queue: list[tuple[BroadcastMessage, asyncio.Future[None]]], max_count: int, max_bytes: int) -> int:
    """How many messages from the head of ``queue`` make the next batch: at least one."""
    total = 0
    for count, (message, _) in enumerate(queue[:max_count]):
        total += len(message["payload"])
        if total > max_bytes and count > 0:
            return count
    return min(len(queue), max_count)


def _fail(batch: list[tuple[BroadcastMessage, asyncio.Future[None]]], error: Exception) -> None:
    for _, done in batch:
        if not done.done():
            done.set_exception(error)


def get_publisher() -> Publisher:
    """The publisher of the running event loop's runtime."""
    from realtime.runtime import get_runtime

    return get_runtime().publisher
