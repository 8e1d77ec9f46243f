"""Daphne integration: two small, documented overrides of daphne's WebSocket protocol.

1. **Handshake denial with a status and a body.** Daphne does not implement the
   ASGI "WebSocket Denial Response" extension, so a refused handshake could
   only be a bare 403. PROTOCOL.md 1.3 wants e.g. 401 ``{"error": "API key is
   missing"}``. The protocol below advertises the extension in the scope and
   answers ``websocket.http.response.start``/``.body`` before the upgrade.

2. **Direct writes of outgoing frames.** Through autobahn and Twisted each
   outgoing message costs about 20 us (framing, registering the writer with
   the reactor, a dispatch, unregistering). On the fan-out path that is most of
   the CPU per delivery. When the connection is plain TCP, nothing is queued in
   the transport and no extension is negotiated, the frame (an unmasked RFC
   6455 section 5.2 header plus the payload) is written straight to the socket;
   any part the kernel does not take goes through ``transport.write`` as
   usual, which keeps ordering. TLS transports, compression and anything
   unusual always take autobahn's normal path.

3. **Corking.** Inside ``corked()`` the direct writes of each connection are
   held and written with one ``send()`` at the end of the block, so a run of
   changes costs one system call per socket. Outside daphne it does nothing.

4. **A direct writer in the scope.** ``scope["realtime.write"]`` writes a
   ``websocket.send`` message synchronously, so the hub's fan-out skips
   daphne's per-message coroutine and lookups (3-4 us of about 10 per delivery).

5. **A cap on unsent bytes.** Once more than ``REALTIME_MAX_UNSENT_BYTES`` wait
   in the transport for a peer that does not read, later frames are dropped, a close
   frame (1008) is queued and the connection is aborted if the peer has not
   read it within ``SLOW_CLOSE_GRACE_S``. Memory per socket stays bounded and
   no other socket waits.

6. **Inbound backpressure.** Daphne queues every frame a client sends for the
   application without limit, so a client sending faster than its consumer
   works (large broadcasts, say) grew the process without bound. Once
   ``INBOUND_PAUSE_AT`` frames wait, the socket is not read until the queue is
   down to ``INBOUND_RESUME_AT``; TCP then slows that client alone.

``RealtimeServer`` installs the protocol, stops gracefully on SIGTERM (a drain, see its
docstring) and can listen with ``SO_REUSEPORT``; ``manage.py runserver`` uses it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.types import ConnectionDeny
from daphne import http_protocol, ws_protocol
from daphne.server import Server
from twisted.internet import defer, reactor, tcp

from realtime import cork
from core.rates import TokenBucket
from realtime.twisted_buffer import has_unsent, unsent_bytes
from realtime.supervisor import SUPERVISOR_ENV
from realtime.writer import CLOSE_SLOW_CONSUMER, count_slow_consumer_close

logger = logging.getLogger(__name__)

DENIAL_EXTENSION = "websocket.http.response"
DIRECT_WRITE = "realtime.write"  # the scope key realtime.consumer reads
_OPCODE_TEXT = 0x81  # FIN + text
_OPCODE_BINARY = 0x82  # FIN + binary


def frame_header(first_byte: int, length: int) -> bytes:
    """The header of an unmasked, unfragmented server frame (RFC 6455 section 5.2)."""
    if length < 126:
        return bytes((first_byte, length))
    if length < 65536:
        return struct.pack("!BBH", first_byte, 126, length)
    return struct.pack("!BBQ", first_byte, 127, length)


class RealtimeWebSocketProtocol(ws_protocol.WebSocketProtocol):
    """Daphne's WebSocket protocol with the denial extension and direct frame writes."""

    _denial: tuple[int, list[tuple[bytes, bytes]]] | None = None
    _slow = False  # closing for its unsent bytes
    _reading_paused = False  # the application is behind this client's frames
    _pings: TokenBucket | None = None
    _denial_body: bytes | None = None

    def _connectionMade(self) -> None:  # noqa: N802
        super()._connectionMade()
        # On a protocol violation (e.g. a frame over the size limit) send the
        # close frame with its code (1009) instead of dropping the TCP
        # connection, so the client learns why.
        self.failByDrop = False

    # --- 1. denial response ----------------------------------------------

    def handle_reply(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "websocket.http.response.start" and self.state == self.STATE_CONNECTING:
            self._denial = (int(message["status"]), list(message.get("headers", [])))
            return
        if kind == "websocket.http.response.body" and self._denial is not None:
            self._denial_body = (self._denial_body or b"") + bytes(message.get("body", b""))
            if not message.get("more_body", False) and hasattr(self, "handshake_deferred"):
                status = self._denial[0]
                self.handshake_deferred.errback(
                    ConnectionDeny(code=status, reason=_reason(status))  # type: ignore[no-untyped-call]  # autobahn leaves it unannotated
                )
                del self.handshake_deferred
                self.server.protocol_disconnected(self)
            return
        super().handle_reply(message)

    def sendHttpErrorResponse(self, code: int, reason: str, responseHeaders: Any = None) -> None:  # noqa: N802
        if self._denial is None:
            super().sendHttpErrorResponse(code, reason, responseHeaders)
            return
        body = self._denial_body or b""
        lines = [f"HTTP/1.1 {code} {reason}".encode("latin-1")]
        names = set()
        for name, value in self._denial[1]:
            names.add(name.lower())
            lines.append(name + b": " + value)
        if b"content-length" not in names:
            lines.append(b"content-length: " + str(len(body)).encode())
        lines.append(b"connection: close")
        self.sendData(b"\r\n".join(lines) + b"\r\n\r\n" + body)

    def serverClose(self, code: int | None = None) -> None:  # noqa: N802
        # autobahn's sendClose() accepts only 1000 and 3000-4999 from
        # applications; the server codes of RFC 6455 section 7.4.1 (1001 going
        # away, 1009 too big, 1011 internal error) go out as a plain close frame.
        if code is not None and code != 1000 and not 3000 <= code <= 4999:
            self.sendCloseFrame(code=code, isReply=False)
            return
        super().serverClose(code)

    # --- 6. inbound backpressure -----------------------------------------

    def onPing(self, payload: bytes) -> None:  # noqa: N802
        # autobahn answers every ping with a pong the application never sees: a client that
        # pings and never reads would pile pongs up unseen, and a ping flood costs the loop.
        now = time.monotonic()
        if self._pings is None:
            self._pings = TokenBucket(MAX_PINGS_PER_S, MAX_PINGS_PER_S * 5, now)
        if not self._pings.take(now):
            logger.warning("ping flood: closing the socket peer=%s", self.peer)
            self.transport.abortConnection()
            return
        if unsent_bytes(self.transport) > _max_unsent():
            return  # no pong for a peer that does not read
        super().onPing(payload)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802
        super().onMessage(payload, isBinary)
        queue = getattr(self, "application_queue", None)
        if queue is not None and not self._reading_paused and queue.qsize() >= INBOUND_PAUSE_AT:
            # The application is behind this client: stop reading its socket until it catches up.
            self._reading_paused = True
            self.transport.pauseProducing()
            _call_later(INBOUND_POLL_S, self._resume_reading)

    def _resume_reading(self) -> None:
        if not self.transport.connected:
            return
        if self.application_queue.qsize() > INBOUND_RESUME_AT:
            _call_later(INBOUND_POLL_S, self._resume_reading)
            return
        self._reading_paused = False
        self.transport.resumeProducing()

    # --- 2. direct frame writes ------------------------------------------

    def serverSend(self, content: str | bytes, binary: bool = False) -> None:  # noqa: N802
        if self._slow:
            return  # closing for its unsent bytes: later frames are dropped
        transport = self.transport
        # Only a connection with bytes already waiting can be over the cap: the usual case
        # (nothing waiting) costs a call and two attribute reads per frame.
        if has_unsent(transport) and self._over_unsent():
            return
        self._send_frame(content, binary)

    def _send_frame(self, content: str | bytes, binary: bool) -> None:
        transport = self.transport
        if (
            self.state != self.STATE_OPEN
            or self._perMessageCompress is not None
            or self.send_queue
            or type(transport) is not tcp.Server
            or transport.TLS
            or transport.disconnecting
        ):
            self._flush_corked()
            super().serverSend(content, binary)
            return
        frame = _encode_frame(content, binary)
        if 0 < self.maxMessagePayloadSize < len(frame) - 2:
            self._flush_corked()
            super().serverSend(content, binary)
            return
        if not cork.hold(self, frame):
            self._write_now(frame)

    def write_message(self, message: dict[str, Any]) -> None:
        """Write a ``websocket.send`` message now (the hub's fan-out path).

        Daphne's ASGI send wraps each message in a coroutine that looks the
        connection up and checks its headers; the hub only writes to accepted
        sockets it is subscribed for, so it calls this instead. A closed
        connection raises, and the hub counts the failed write.
        """
        text = message.get("text")
        if text is not None:
            self.serverSend(text, False)
        else:
            self.serverSend(message["bytes"], True)

    def _flush_corked(self) -> None:
        held = cork.release(self)
        if held:
            self._write_now(held)

    def _write_now(self, data: bytes) -> None:
        transport = self.transport
        if transport.disconnecting:
            return
        if has_unsent(transport):
            transport.write(data)  # keep order behind what is already queued
            return
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            transport.write(data)  # let Twisted see and report the error
            return
        if sent < len(data):
            transport.write(data[sent:])

    # --- 5. unsent bytes cap ---------------------------------------------

    def _over_unsent(self) -> bool:
        """Whether the peer left more than ``REALTIME_MAX_UNSENT_BYTES`` unread; if so, start closing it.

        Checked before each frame, so a connection holds at most the cap plus
        one frame, and one large frame to a socket that reads is never refused.
        """
        unsent = unsent_bytes(self.transport)
        if unsent <= _max_unsent():
            return False
        self._slow = True
        count_slow_consumer_close()
        logger.warning("slow consumer: %d bytes unsent, closing the socket peer=%s", unsent, self.peer)
        cork.release(self)  # what a batch held for it is dropped too
        # The close frame queues behind the unsent data (a frame may be half
        # written, so nothing can be dropped); a peer that does not read it in
        # time loses the connection, and its buffer with it.
        self.sendCloseFrame(code=CLOSE_SLOW_CONSUMER, isReply=False)
        self.transport.loseConnection()
        _call_later(SLOW_CLOSE_GRACE_S, self._abort_slow)
        return True

    def _abort_slow(self) -> None:
        if self.transport.connected:
            self.transport.abortConnection()


# The hub hands the same message object to every socket on a topic; keeping
# the last frame built (by identity of its content) encodes it once, not once
# per socket. Holding the content keeps its id from being reused.
_last_frame: tuple[object, bool, bytes] = (None, False, b"")


def _encode_frame(content: str | bytes, binary: bool) -> bytes:
    global _last_frame
    key, was_binary, frame = _last_frame
    if key is content and was_binary is binary:
        return frame
    data = content if binary else content.encode("utf-8")  # type: ignore[union-attr]
    frame = frame_header(_OPCODE_BINARY if binary else _OPCODE_TEXT, len(data)) + data  # type: ignore[operator]
    _last_frame = (content, binary, frame)
    return frame


# Frames waiting for the application at which daphne stops reading a client's socket, and resumes.
INBOUND_PAUSE_AT = 8
INBOUND_RESUME_AT = 2
INBOUND_POLL_S = 0.005
# Pings a client may send per second (bursts of 5 s); past it the connection is dropped.
MAX_PINGS_PER_S = 10

# Seconds a slow peer has to read what is queued and the close frame before the connection is aborted.
SLOW_CLOSE_GRACE_S = 2.0


_max_unsent_bytes: int | None = None


def _max_unsent() -> int:
    global _max_unsent_bytes
    if _max_unsent_bytes is None:
        from django.conf import settings

        _max_unsent_bytes = int(settings.REALTIME_MAX_UNSENT_BYTES)
    return _max_unsent_bytes


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class LimitedWebRequest(http_protocol.WebRequest):
    """Daphne's HTTP request, refusing a body over ``REALTIME_MAX_REST_BODY_BYTES`` as it arrives.

    Twisted stores a whole request body (in a temporary file past 100 KB)
    before daphne hands the request to the application, so no ASGI-level
    check can stop a client from sending a body of any size; this one answers
    413 and drops the connection as soon as the body passes the limit.
    """

    _received = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:  # noqa: N802
        if length is not None and length > _max_body():
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802
        if self._refused:
            return
        self._received += len(data)
        if self._received > _max_body():
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        if self._refused:
            return
        self._refused = True
        body = json.dumps({"message": f"Request body too large: at most {_max_body()} bytes"}).encode()
        head = f"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        transport = self.channel.transport
        transport.write(head.encode("latin-1") + body)
        transport.loseConnection()


def _call_later(delay: float, function: Callable[[], object]) -> None:
    # Twisted declares its zope interfaces' methods without ``self``, so without
    # the mypy-zope plugin mypy reads ``delay`` as ``callable``.
    reactor.callLater(delay, function)  # type: ignore[arg-type]


def skip_config_dump() -> None:
    """Stop autobahn formatting its whole configuration for a debug line on every connection.

    ``WebSocketProtocol._connectionMade`` builds ``pformat(...)`` of some 40
    settings eagerly, for a debug message that is never logged: about a tenth
    of the server's CPU per join. A private detail of autobahn, replaced here
    only; ``tests/unit/test_server_frames.py`` fails if it moves.
    """
    # autobahn's own import of pprint.pformat, which it calls with one argument.
    autobahn_protocol.pformat = _no_format  # type: ignore[attr-defined,assignment]


def _no_format(obj: object) -> str:
    return "(not formatted)"


def with_backlog(endpoint: str) -> str:
    """A Twisted TCP endpoint description with ``REALTIME_LISTEN_BACKLOG`` (Twisted's default is 50).

    With 50, a burst of connects (a reconnect storm) overflows the listen
    queue during any short stall and the kernel drops them: clients then wait
    for TCP's 1, 3, 7 s retransmits.
    """
    if not endpoint.startswith("tcp:") or ":backlog=" in endpoint:
        return endpoint
    from django.conf import settings

    return f"{endpoint}:backlog={int(settings.REALTIME_LISTEN_BACKLOG)}"


def _max_body() -> int:
    from django.conf import settings

    return int(settings.REALTIME_MAX_REST_BODY_BYTES)


def reuse_port_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket with ``SO_REUSEPORT``: several server processes bind the same port.

    The kernel spreads new connections over the processes' sockets by a hash of
    the addresses; a process that closes its socket (``RealtimeServer``'s drain)
    gets no more of them.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class RealtimeServer(Server):
    """Daphne's server with ``RealtimeWebSocketProtocol``, the denial extension in scope and a body cap.

    It also stops gracefully. The first SIGTERM or SIGINT stops listening at
    once (reconnects land on the other processes), then the runtime drains
    (``realtime.runtime.Runtime.drain``: joins answered ``RealtimeRestarting``,
    sockets closed with 1012 in batches over ``REALTIME_DRAIN_S``, presence
    leaves and claim-set removals published), then the applications still
    running are cancelled as daphne does, and daphne shuts down. A second
    signal exits at once. Daphne registers ``kill_all_applications`` as a
    Twisted "before shutdown" trigger, which may return a Deferred: the
    override returns one that fires after the drain and the cancellation.

    ``reuse_port=(host, port)`` listens on a ``SO_REUSEPORT`` socket of its own
    instead of daphne's endpoints (``runserver --workers``); with
    ``REALTIME_SUPERVISOR_PID`` in the environment the process also drains
    and stops when that parent is gone.
    """

    def __init__(
        self, application: Any, endpoints: list[str] | None = None, reuse_port: tuple[str, int] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(application, [with_backlog(e) for e in endpoints or []], **kwargs)
        self.reuse_port = reuse_port
        self.ports: list[Any] = []  # Twisted listening ports, closed first thing on a graceful stop
        self.stopping = False
        self._signalled = False

    def run(self) -> None:
        skip_config_dump()
        ws_protocol.WebSocketFactory.protocol = RealtimeWebSocketProtocol
        http_protocol.WebRequest = LimitedWebRequest  # what daphne's HTTPFactory builds requests with
        if self.reuse_port is not None:
            from django.conf import settings

            host, port = self.reuse_port
            try:
                sock = reuse_port_socket(host, port, int(settings.REALTIME_LISTEN_BACKLOG))
            except OSError as error:
                logger.critical("cannot listen on %s:%d with SO_REUSEPORT: %s", host, port, error.strerror)
                raise SystemExit(1) from None
            self.endpoints: list[str] = []  # daphne listens on nothing itself: the socket is adopted once running
            reactor.callWhenRunning(self._adopt, sock)
        if self.signal_handlers:
            # After Twisted's own handlers, which these replace (they stop the reactor at once).
            reactor.callWhenRunning(self._install_signal_handlers)
        supervisor = os.environ.get(SUPERVISOR_ENV)
        if supervisor:
            reactor.callWhenRunning(self._watch_parent, int(supervisor))
        reactor.callWhenRunning(self._start_runtime)
        super().run()

    def _adopt(self, sock: socket.socket) -> None:
        try:
            port = reactor.adoptStreamPort(sock.fileno(), sock.family, self.http_factory)
        finally:
            sock.close()  # Twisted holds its own duplicate
        self.listen_success(port)

    def listen_success(self, port: Any) -> None:
        self.ports.append(port)
        super().listen_success(port)

    def _start_runtime(self) -> None:
        from realtime.runtime import get_runtime

        task = asyncio.ensure_future(get_runtime().start())
        task.add_done_callback(_log_failure("starting the runtime"))

    def _install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stopping or self._signalled:
            # No logging here: the interrupted code may hold the logging lock.
            os.write(2, f"second {signal.Signals(signum).name}: exiting at once\n".encode())
            os._exit(1)
        self._signalled = True  # a second signal before the reactor runs graceful_stop exits too
        reactor.callFromThread(self.graceful_stop, signal.Signals(signum).name)

    def _watch_parent(self, parent: int) -> None:
        if os.getppid() != parent:
            self.graceful_stop("the supervisor is gone")
            return
        _call_later(PARENT_CHECK_S, lambda: self._watch_parent(parent))

    def graceful_stop(self, why: str) -> None:
        """Drain, then stop (see the class docstring); a second call does nothing."""
        if self.stopping:
            return
        self.stopping = True
        logger.info("%s: stopping gracefully (drain over %s s)", why, _drain_seconds())
        self._stop_listening()
        running: Any = reactor  # mypy reads the reactor's zope interface methods without ``self``
        if running.running:
            running.stop()  # runs the "before shutdown" triggers: kill_all_applications below

    def _stop_listening(self) -> None:
        ports, self.ports = self.ports, []
        for port in ports:
            port.stopListening()

    def kill_all_applications(self) -> Any:
        self.stopping = True  # a signal from now on exits at once
        self._stop_listening()  # also when the reactor was stopped some other way
        drained = defer.Deferred.fromFuture(asyncio.ensure_future(self._drain()))
        drained.addErrback(lambda failure: logger.error("the drain failed: %s", failure.getTraceback()))
        drained.addCallback(lambda _: self._cancel_applications())
        return drained

    def _cancel_applications(self) -> Any:
        """Daphne's ``kill_all_applications``, skipping connections whose application is already reaped.

        Daphne's own reads ``details["application_instance"]``, which its
        ``application_checker`` deletes once an application is done while the
        connection is not yet closed: after a drain that is common.
        """
        waiting = []
        for details in list(self.connections.values()):
            instance = details.get("application_instance")
            if instance is not None and not instance.done():
                instance.cancel()
                waiting.append(instance)
        logger.info("cancelled %d application instances still running", len(waiting))
        cancelled = defer.Deferred.fromFuture(asyncio.gather(*waiting, return_exceptions=True))
        cancelled.addErrback(lambda _: None)
        return cancelled

    async def _drain(self) -> None:
        from realtime.runtime import current_runtime

        runtime = current_runtime()
        if runtime is not None:
            await runtime.drain(_drain_seconds())

    def create_application(self, protocol: Any, scope: dict[str, Any]) -> Any:
        if scope.get("type") == "websocket" and isinstance(protocol, RealtimeWebSocketProtocol):
            scope.setdefault("extensions", {})[DENIAL_EXTENSION] = {}
            scope[DIRECT_WRITE] = protocol.write_message
        return super().create_application(protocol, scope)


# How often a child of ``realtime.supervisor`` checks that its parent (SUPERVISOR_ENV) lives.
PARENT_CHECK_S = 1.0


def _drain_seconds() -> float:
    from django.conf import settings

    return float(settings.REALTIME_DRAIN_S)


def _log_failure(what: str) -> Callable[[asyncio.Future[None]], None]:
    def done(task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s failed", what, exc_info=task.exception())

    return done
