"""One socket's outgoing frames: written without making the caller wait, with a cap on unsent bytes.

The hub writes each broadcast to every local socket in one loop; if a write
could wait for one socket's peer to read, every other socket would wait too,
and a socket that stops reading would hold its frames in memory without bound.
``SocketWriter.write`` therefore never awaits:

* under daphne (``realtime.server``) the frame goes straight to the transport
  through the server's direct writer; the server enforces the cap on its
  transport buffer itself and closes the connection past it;
* under any other ASGI server the frame is queued, and one task per socket
  awaits the ASGI send for each queued frame in order. A frame that finds
  more than ``max_unsent`` bytes queued ahead of it is not queued: the queue
  is dropped and ``on_overflow`` is called once, and the consumer closes the
  socket with ``CLOSE_SLOW_CONSUMER``. A socket holds at most the cap plus
  one frame, and one large frame to a socket that reads is never refused.

The socket's own replies go through the same writer, so they keep their order
with the hub's deliveries.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from shared import metrics

logger = logging.getLogger(__name__)

AsgiSend = Callable[[dict[str, Any]], Awaitable[None]]
# A server may offer a synchronous writer for ``websocket.send`` messages
# (``realtime.server`` does under daphne); it raises once the socket is closed.
DirectWrite = Callable[[dict[str, Any]], None]

# RFC 6455 section 7.4.1: 1008, the endpoint received data that violates its
# policy; here, the peer left more unsent bytes than allowed.
CLOSE_SLOW_CONSUMER = 1008

slow_consumer_closes = 0  # sockets closed for their unsent bytes, this process (both paths)


def frame_size(frame: dict[str, Any]) -> int:
    """The size of a ``websocket.send`` message, in characters or bytes (close enough for a cap)."""
    text = frame.get("text")
    return len(text) if text is not None else len(frame.get("bytes") or b"")


def count_slow_consumer_close() -> None:
    global slow_consumer_closes
    slow_consumer_closes += 1
    metrics.slow_consumer_closes.inc()
    metrics.limit_hits.labels("unsent_bytes").inc()


class SocketWriter:
    """Writes ``websocket.send`` messages to one socket, in order, never blocking the caller."""

    __slots__ = ("_send", "_direct", "_max_unsent", "_on_overflow", "_queue", "_unsent", "_task", "closed")

    def __init__(
        self, send: AsgiSend, direct: DirectWrite | None, max_unsent: int, on_overflow: Callable[[], None]
    ) -> None:
        self._send = send
        self._direct = direct
        self._max_unsent = max_unsent
        self._on_overflow = on_overflow
        self._queue: deque[tuple[dict[str, Any], int]] = deque()
        self._unsent = 0
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def unsent(self) -> int:
        """Bytes queued here and not yet handed to the server (0 under a direct writer)."""
        return self._unsent

    def write(self, frame: dict[str, Any]) -> bool:
        """Write or queue ``frame``; False if the socket is closed (the frame is dropped)."""
        if self.closed:
            return False
        if self._direct is not None:
            try:
                self._direct(frame)
            except Exception:
                # The peer is gone; the server's disconnect event ends the consumer.
                self.closed = True
                return False
            return True
        if self._unsent > self._max_unsent:
            self.overflow()
            return False
        size = frame_size(frame)
        self._queue.append((frame, size))
        self._unsent += size
        if self._task is None:
            self._task = asyncio.ensure_future(self._drain())
        return True

    def overflow(self) -> None:
        """Give up on this socket: more is waiting for it than the cap; the consumer closes it (1008)."""
        logger.debug("slow consumer: %d bytes unsent, closing the socket", self._unsent)  # the consumer logs it
        count_slow_consumer_close()
        self.close()
        self._on_overflow()

    async def _drain(self) -> None:
        try:
            while self._queue:
                frame, size = self._queue[0]
                try:
                    await self._send(frame)
                except Exception as error:
                    logger.debug("write to a closed socket: %s", error)
                    self.close()
                    return
                if self._queue:  # close() may have emptied it meanwhile
                    self._queue.popleft()
                    self._unsent -= size
        finally:
            self._task = None

    def close(self) -> None:
        """Drop what is queued and every later frame."""
        self.closed = True
        self._queue.clear()
        self._unsent = 0
