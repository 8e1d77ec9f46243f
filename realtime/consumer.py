"""The WebSocket glue: frames in, session effects out, frames back to the socket.

One ``RealtimeConsumer`` per socket. It authenticates the handshake
(PROTOCOL.md 1), decodes frames with the serializer, asks the ``Session`` what
to do, and carries out the effects: writing frames, hub subscriptions and
broadcasts through the channel layer, private channel policy checks
(``realtime.channel_auth``) whose verdicts go back to the session. It parses
nothing itself and never builds group names or SQL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any
from urllib.parse import parse_qs

from channels.consumer import AsyncConsumer
from django.conf import settings

from shared import metrics
from realtime.authorization import AuthorizedBinding, authorize_binding, get_database
from realtime.bindings import BindingError, parse_binding
from realtime.filters.predicates import regex_cost
from realtime.channel_auth import check_policies, headers_json
from realtime.hub import ChangeSubscription, Held, Subscription, get_hub
from realtime.presence import get_store, publish_diff
from realtime.publisher import get_publisher
from realtime.runtime import CLOSE_SERVICE_RESTART, Runtime, get_runtime
from core.jwt import Claims, TokenError, opaque_key_claims
from realtime.limits import get_socket_counter
from realtime.logs import SocketLog, parse_log_level
from realtime.tokens import verify
from realtime.protocol.errors import FrameError
from realtime.protocol.message import Message, UserBroadcast, Vsn
from core.rates import TokenBucket
from realtime.protocol.serializer import decode_binary, decode_text, encode_text, encode_user_broadcast, parse_vsn
from realtime.replay import replay_rows
from realtime.protocol.session import (
    Authorize,
    Disconnect,
    Effect,
    Permissions,
    Publish,
    Replay,
    ReplayedRow,
    Send,
    SendLater,
    Session,
    SessionLimits,
    SendPresenceState,
    Subscribe,
    SubscribeChanges,
    Track,
    Unsubscribe,
    Untrack,
    system_message,
)
from core.topics import sub_topic
from realtime.writer import CLOSE_SLOW_CONSUMER, SocketWriter

logger = logging.getLogger(__name__)

CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
# Inbound frames and bytes may come in bursts of this many seconds' worth of their rate.
INBOUND_BURST_S = 5
# Refused handshakes waiting out the connect backoff; past this many, refusals are answered at once.
MAX_DELAYED_REFUSALS = 1000
_delayed_refusals = 0
CLOSE_INTERNAL_ERROR = 1011
LOGGED_JOIN_ERRORS = 10  # per socket, so a client retrying a refused join cannot flood the log
DENIAL_EXTENSION = "websocket.http.response"
DIRECT_WRITE = "realtime.write"  # scope key of a server's synchronous frame writer


# Labels of ``metrics.channels``: every channel receives broadcasts; the others when enabled at join.
EXTENSIONS = ("broadcast", "presence", "postgres_changes")
NO_CHANNELS = (0, 0, 0, 0)  # broadcast, presence, postgres_changes, tracked presence members
# Effects of a step that opened, ended or changed a channel (the others leave the counts as they are).
CHANNEL_EFFECTS = (Subscribe, Unsubscribe, SubscribeChanges, Track, Untrack, Disconnect)


def channel_counts(session: Session) -> tuple[int, int, int, int]:
    """This socket's joined channels per extension (``EXTENSIONS``), and its tracked presence members."""
    presence = changes = tracked = 0
    for channel in session.channels.values():
        presence += channel.config.presence_enabled
        changes += bool(channel.config.postgres_changes)
        tracked += channel.tracked
    return len(session.channels), presence, changes, tracked


def count_limit_hit(kind: str) -> None:
    metrics.limit_hits.labels(kind).inc()


def _regex_cost(authorized: AuthorizedBinding) -> int:
    matcher = authorized.matcher
    if matcher is None:
        return 0
    return sum(regex_cost(c, matcher.column_types.get(c.column, "")) for c in matcher.conditions)


class HandshakeRefused(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


def connect_claims(token: str | None, now: float) -> Claims:
    """Authenticate the connect token (PROTOCOL.md 1.2-1.3)."""
    if not token:
        raise HandshakeRefused(401, "API key is missing")
    claims = opaque_key_claims(token, settings.REALTIME_SECRET_KEYS, settings.REALTIME_PUBLISHABLE_KEYS)
    if claims is not None:
        return claims
    try:
        return verify(token, now)
    except TokenError as error:
        raise HandshakeRefused(error.handshake_status, error.handshake_message) from None


def session_limits() -> SessionLimits:
    return SessionLimits(
        max_channels=settings.REALTIME_MAX_CHANNELS_PER_CLIENT,
        max_payload_bytes=settings.REALTIME_MAX_PAYLOAD_SIZE_KB * 1000 + 500,
        channel_error_backoff=settings.REALTIME_CHANNEL_ERROR_BACKOFF_MS / 1000,
        presence_max_calls=settings.REALTIME_PRESENCE_MAX_CALLS,
        presence_window=settings.REALTIME_PRESENCE_WINDOW_MS / 1000,
        private_only=settings.REALTIME_PRIVATE_ONLY,
        max_joins_per_second=settings.REALTIME_MAX_JOINS_PER_SECOND,
        max_events_per_second=settings.REALTIME_MAX_EVENTS_PER_SECOND,
        max_presence_events_per_second=settings.REALTIME_MAX_PRESENCE_EVENTS_PER_SECOND,
        rate_window=settings.REALTIME_RATE_WINDOW_S,
        max_bindings=settings.REALTIME_MAX_BINDINGS_PER_CHANNEL,
        max_held_pushes=settings.REALTIME_MAX_HELD_PUSHES,
    )


class RealtimeConsumer(AsyncConsumer):
    """Serves one socket at ``/realtime/v1/websocket`` (and ``/socket/websocket``)."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # No per-socket channel-layer inbox: broadcasts arrive through the hub.
        self.scope = scope
        self.base_send = send
        self.socket_id = uuid.uuid4().hex
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        self.log = SocketLog(logger, self.socket_id, parse_log_level((query.get("log_level") or [None])[0]))
        self.limits_logged: set[str] = set()  # limit kinds this socket hit (each logged at INFO once)
        self.join_errors = 0  # the first LOGGED_JOIN_ERRORS are logged at INFO, the rest at DEBUG
        self.session: Session | None = None
        self.writer: SocketWriter | None = None
        self.counted = False  # in this process's socket count
        self.address = ""  # the client's address, as the server reports it
        self.malformed_logged = False
        self.counts = NO_CHANNELS  # as last added to the channel and presence gauges
        self.joins_started: dict[tuple[str, str | None], float] = {}  # (topic, ref) of a phx_join -> monotonic time
        started = time.monotonic()
        frames_rate = settings.REALTIME_MAX_FRAMES_PER_SECOND
        bytes_rate = settings.REALTIME_MAX_BYTES_PER_SECOND
        self.inbound_frames = TokenBucket(frames_rate, frames_rate * INBOUND_BURST_S, started)
        self.inbound_bytes = TokenBucket(
            bytes_rate, max(bytes_rate * INBOUND_BURST_S, 2 * settings.REALTIME_MAX_FRAME_BYTES), started
        )
        self.vsn = Vsn.V1
        self.loop = asyncio.get_running_loop()
        self.last_inbound = self.loop.time()
        self.idle_timer: asyncio.TimerHandle | None = None
        self.expiry_timer: asyncio.TimerHandle | None = None
        self.expiry_at: float | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        # One session step (state change plus its effects) at a time, whether a
        # frame, a policy verdict or the expiry timer started it.
        self.step_lock = asyncio.Lock()
        self.policy_headers = "{}"
        # topic -> (the subscription that registered it, the tables it covers)
        self.change_tables: dict[str, tuple[SubscribeChanges, frozenset[tuple[str, str]]]] = {}
        # topic -> RE2 instructions its match/imatch filters run per byte of value, at worst
        self.regex_costs: dict[str, int] = {}
        # Joins reading their replay: topic -> (broadcast group, where its live broadcasts wait).
        self.holding: dict[str, tuple[str, Held]] = {}
        self.publication_watch: asyncio.Future[None] | None = None
        # Database work (policy checks, binding checks) waiting for one of this socket's
        # REALTIME_MAX_CHECKS_PER_SOCKET slots: (still wanted?, the work).
        self.db_queue: deque[tuple[Callable[[], bool], Callable[[], Coroutine[Any, Any, None]]]] = deque()
        self.db_running = 0
        self.runtime: Runtime | None = None  # the process's runtime, once the socket is accepted (drain)
        try:
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    await self.on_frame(message)
                elif kind == "websocket.connect":
                    await self.on_connect()
                elif kind == "websocket.disconnect":
                    break
        finally:
            self.teardown()
            if self.tasks:
                # Let the leaves of this socket's presence reach the others.
                await asyncio.wait(list(self.tasks), timeout=5)
            if self.runtime is not None:
                self.runtime.gone(self)

    # --- handshake -------------------------------------------------------

    async def on_connect(self) -> None:
        try:
            query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
            try:
                self.vsn = parse_vsn((query.get("vsn") or [None])[0])
            except FrameError:
                raise HandshakeRefused(403, "Unsupported serializer version") from None
            token = self._header(b"x-api-key") or (query.get("apikey") or [""])[0].strip()
            claims = connect_claims(token or None, time.time())
            counter = get_socket_counter()
            await counter.ready()
            self.address = (self.scope.get("client") or ("", 0))[0] or ""
            if not counter.admits(
                settings.REALTIME_MAX_CONCURRENT_USERS, self.address, settings.REALTIME_MAX_SOCKETS_PER_ADDRESS
            ):
                per_address = settings.REALTIME_MAX_SOCKETS_PER_ADDRESS
                full = per_address > 0 and counter.by_address.get(self.address, 0) >= per_address
                count_limit_hit("sockets_per_address" if full else "concurrent_users")  # the refusal is logged below
                raise HandshakeRefused(429, "Too many connected users")
        except HandshakeRefused as refusal:
            metrics.connects_refused.labels(str(refusal.status)).inc()
            self.log.info(
                "connect refused status=%s error=%s address=%s", refusal.status, refusal.error,
                (self.scope.get("client") or ("", 0))[0],
            )
            await self.refuse(refusal.status, refusal.error)
            return
        self.session = Session(
            socket_id=self.socket_id, claims=claims, token=token, verify=verify, limits=session_limits()
        )
        self.policy_headers = headers_json(
            (key.decode("latin-1"), value.decode("latin-1")) for key, value in self.scope.get("headers", [])
        )
        counter.opened(self.address)
        self.counted = True
        metrics.sockets.inc()
        self.runtime = get_runtime()
        self.runtime.opened(self)
        await self.base_send({"type": "websocket.accept"})
        if self.runtime.draining:
            # Accepted by the kernel before the listener closed, upgraded after the drain's last batch.
            await self.close(CLOSE_SERVICE_RESTART)
            return
        self.writer = SocketWriter(
            self.base_send, self.scope.get(DIRECT_WRITE), settings.REALTIME_MAX_UNSENT_BYTES, self._on_slow_consumer
        )
        self.idle_timer = self.loop.call_later(settings.REALTIME_IDLE_TIMEOUT_S, self._check_idle)

    def _header(self, name: bytes) -> str:
        headers: list[tuple[bytes, bytes]] = self.scope.get("headers", [])
        for key, value in headers:
            if key == name:
                return value.decode("latin-1").strip()
        return ""

    async def refuse(self, status: int, error: str) -> None:
        """Answer the upgrade with a status and a JSON body, after the connect backoff.

        The backoff slows a client retrying a bad key; at most MAX_DELAYED_REFUSALS
        wait it out at once, so a flood of refused handshakes cannot pin sockets.
        """
        global _delayed_refusals
        if _delayed_refusals < MAX_DELAYED_REFUSALS:
            _delayed_refusals += 1
            try:
                await asyncio.sleep(settings.REALTIME_CONNECT_ERROR_BACKOFF_MS / 1000)
            finally:
                _delayed_refusals -= 1
        if DENIAL_EXTENSION in self.scope.get("extensions", {}):
            body = json.dumps({"error": error}, separators=(",", ":")).encode("utf-8")
            # No content-length: every server adds its own (uvicorn's websockets-sansio
            # appends ours after its own, and Node's parser refuses the duplicate).
            headers = [(b"content-type", b"application/json")]
            await self.base_send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await self.base_send({"type": "websocket.http.response.body", "body": body})
        else:
            await self.base_send({"type": "websocket.close", "code": 1008})
        self.closed = True

    # --- frames ----------------------------------------------------------

    async def on_frame(self, message: dict[str, Any]) -> None:
        if self.session is None or self.closed:
            return
        self.last_inbound = self.loop.time()
        text = message.get("text")
        data = message.get("bytes") if text is None else None
        size = len(text) if text is not None else len(data or b"")
        if size > settings.REALTIME_MAX_FRAME_BYTES:
            self.limit_hit("frame_bytes")
            await self.close(CLOSE_TOO_BIG)
            return
        now = time.monotonic()
        if not (self.inbound_frames.take(now) and self.inbound_bytes.take(now, size)):
            # Before any decoding: a client over these sends far more than any app does.
            self.limit_hit("inbound_rate")
            self.log.warning("inbound flood: closing socket=%s", self.socket_id)
            await self.close(CLOSE_POLICY_VIOLATION)
            return
        try:
            if text is not None:
                msg = decode_text(self.vsn, text)
            elif data is not None:
                msg = decode_binary(self.vsn, data)
            else:
                return
        except FrameError as error:
            # Counted by the serializer; one line per socket, so a client cannot flood the log.
            level = logging.DEBUG if self.malformed_logged else logging.INFO
            self.malformed_logged = True
            self.log.log(level, "malformed frame dropped socket=%s reason=%s", self.socket_id, error.message)
            return
        if msg.event == "phx_join":
            if len(self.joins_started) >= settings.REALTIME_MAX_CHANNELS_PER_CLIENT:
                # A join made void by a newer one on its topic gets no reply: forget the oldest.
                del self.joins_started[next(iter(self.joins_started))]
            self.joins_started[(msg.topic, msg.ref)] = time.monotonic()
            if self.runtime is not None and self.runtime.draining:
                self.session.restarting = True
        await self.step(lambda session: session.handle(msg, time.time()), msg.event, msg.topic)

    async def step(self, advance: Callable[[Session], list[Effect]], event: str, topic: str) -> None:
        """Advance the session and carry out the effects, one step at a time per socket."""
        if self.session is None or self.closed:
            return
        async with self.step_lock:
            try:
                effects = advance(self.session)
                if self.session.limit_hits:
                    self._limits_hit(self.session.limit_hits)
                await self.run(effects)
                if any(isinstance(effect, CHANNEL_EFFECTS) for effect in effects):
                    self._count_channels()
            except Exception:
                self.log.exception("socket=%s failed on event=%s topic=%s", self.socket_id, event, topic)
                await self.close(CLOSE_INTERNAL_ERROR)

    async def run(self, effects: list[Effect]) -> None:
        """Carry out the session's effects, in order."""
        hub = get_hub()
        for effect in effects:
            if isinstance(effect, Send):
                self.write(effect.message)
            elif isinstance(effect, Publish):
                try:
                    await get_publisher().publish(effect.message)
                except Exception:
                    # The rest of this batch is the ack of this broadcast: not sent.
                    self.log.exception("broadcast publish failed socket=%s", self.socket_id)
                    return
            elif isinstance(effect, Subscribe):
                assert self.writer is not None  # effects come only after the socket was accepted
                holding = self.holding.get(effect.topic)
                held = holding[1] if holding is not None and holding[0] == effect.group else None
                await hub.subscribe(
                    effect.group,
                    Subscription(
                        self.socket_id, effect.topic, self.vsn, effect.self_broadcast, self.writer, effect.skip_ids, held
                    ),
                )
            elif isinstance(effect, Unsubscribe):
                hub.unsubscribe(effect.group, self.socket_id, effect.topic)
                hub.unsubscribe_changes(self.socket_id, effect.topic)
            elif isinstance(effect, SubscribeChanges):
                # After the join reply, without holding up this socket's other frames.
                self._queue_db(partial(self._is_current, effect), partial(self.subscribe_changes, effect))
            elif isinstance(effect, SendPresenceState):
                state = await get_store().state(effect.presence_channel)
                self.write(Message(effect.join_ref, None, effect.topic, "presence_state", state))
            elif isinstance(effect, Track):
                result = await get_store().track(effect.presence_channel, effect.key, self.socket_id, effect.payload)
                if result.diff is not None:
                    await publish_diff(effect.presence_channel, result.diff)
                self.write(effect.reply)
            elif isinstance(effect, Untrack):
                await self.untrack(effect)
            elif isinstance(effect, Authorize):
                # The verdict comes back as a later step; this socket's other frames go on meanwhile.
                self._queue_db(partial(self._waits_for, effect), partial(self.authorize, effect))
            elif isinstance(effect, Replay):
                self._queue_db(partial(self._waits_for, effect), partial(self.replay, effect))
            elif isinstance(effect, Disconnect):
                await self.close(effect.code)
                return
            elif isinstance(effect, SendLater):
                if effect.delay <= 0:
                    self.write(effect.message)
                else:
                    self.loop.call_later(effect.delay, self.write, effect.message)
        self._schedule_expiry()

    def _limits_hit(self, kinds: list[str]) -> None:
        for kind in kinds:
            self.limit_hit(kind)
        kinds.clear()

    def limit_hit(self, kind: str) -> None:
        """Count a limit this socket reached; log it, at INFO the first time per kind (a client cannot flood the log)."""
        count_limit_hit(kind)
        level = logging.DEBUG if kind in self.limits_logged else logging.INFO
        self.limits_logged.add(kind)
        self.log.log(level, "limit reached socket=%s kind=%s", self.socket_id, kind)

    def _count_channels(self) -> None:
        """Move the channel and presence gauges by what this socket's channels changed."""
        counts = channel_counts(self.session) if self.session is not None and not self.closed else NO_CHANNELS
        if counts == self.counts:
            return
        for extension, now, before in zip(EXTENSIONS, counts, self.counts):
            if now != before:
                metrics.channels.labels(extension).inc(now - before)
        if counts[3] != self.counts[3]:
            metrics.presence_members.inc(counts[3] - self.counts[3])
        self.counts = counts

    def _queue_db(self, wanted: Callable[[], bool], work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run database work for this socket, at most REALTIME_MAX_CHECKS_PER_SOCKET at a time.

        The rest wait in order; work whose result would no longer be used (a
        join re-joined or left meanwhile) is dropped before it reaches the
        database, so a flood of re-joins costs one check per slot, not one per join.
        """
        self.db_queue.append((wanted, work))
        self._pump_db()

    def _pump_db(self) -> None:
        while self.db_queue and self.db_running < settings.REALTIME_MAX_CHECKS_PER_SOCKET and not self.closed:
            wanted, work = self.db_queue.popleft()
            if wanted():
                self.db_running += 1
                self._spawn(self._run_db(work))

    async def _run_db(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await work()
        finally:
            self.db_running -= 1
            self._pump_db()

    def _waits_for(self, check: Authorize | Replay) -> bool:
        return self.session is not None and not self.closed and self.session.waits_for(check)

    async def authorize(self, check: Authorize) -> None:
        """Evaluate a private channel's policies and hand the verdict to the session (PROTOCOL.md 7)."""
        permissions: Permissions | None
        try:
            permissions = await check_policies(
                get_database(), check.claims, sub_topic(check.topic), self.policy_headers, check.read, check.write
            )
        except Exception:
            self.log.exception("policy check failed socket=%s topic=%s", self.socket_id, check.topic)
            permissions = None
        await self.step(lambda session: session.authorized(check, permissions, time.time()), "authorize", check.topic)

    async def replay(self, replay: Replay) -> None:
        """Read the rows a join replays and hand them to the session (PROTOCOL.md 5.5).

        The channel is in its broadcast group before the read, its live broadcasts held until the
        join is answered: a row committed after the read's snapshot arrives live, one the read saw
        is replayed and skipped live, and none falls between the two.
        """
        assert self.writer is not None  # effects come only after the socket was accepted
        hub = get_hub()
        held = Held(settings.REALTIME_MAX_UNSENT_BYTES)
        hold = Subscription(self.socket_id, replay.topic, self.vsn, replay.self_broadcast, self.writer, held=held)
        previous = hub.subscription(replay.group, self.socket_id, replay.topic)
        self.holding[replay.topic] = (replay.group, held)
        try:
            rows: list[ReplayedRow] | None
            try:
                await hub.subscribe(replay.group, hold)
                rows = await replay_rows(get_database(), sub_topic(replay.topic), replay.since, replay.limit)
            except Exception:
                self.log.warning("replay failed socket=%s topic=%s", self.socket_id, replay.topic, exc_info=True)
                rows = None
            await self.step(lambda session: session.replayed(replay, rows), "replay", replay.topic)
        finally:
            if self.holding.get(replay.topic, (None, None))[1] is held:
                del self.holding[replay.topic]
            hub.release(replay.group, hold, previous)

    async def subscribe_changes(self, effect: SubscribeChanges) -> None:
        """Check a channel's bindings in the database, register them, report (PROTOCOL.md 3.4, 4.3).

        A binding the database refuses is reported once (fatal, as in the
        reference). Any other failure (the database or Redis unreachable) is
        reported too and retried after REALTIME_SUBSCRIBE_RETRY_MS to twice
        that, while the channel still wants this subscription.
        """
        try:
            authorized = await self._authorize_bindings(effect)
            await self._register_changes(effect, authorized)
        except BindingError as error:
            self._subscribe_failed(effect, error.message)
        except Exception:
            self.log.exception("postgres_changes subscription failed socket=%s topic=%s", self.socket_id, effect.topic)
            if self._subscribe_failed(effect, "Realtime was unable to connect to the project database"):
                delay = random.uniform(1.0, 2.0) * settings.REALTIME_SUBSCRIBE_RETRY_MS / 1000
                self.loop.call_later(delay, self._queue_subscribe, effect)

    def _queue_subscribe(self, effect: SubscribeChanges) -> None:
        self._queue_db(lambda: self._is_current(effect), lambda: self.subscribe_changes(effect))

    def _subscribe_failed(self, effect: SubscribeChanges, message: str) -> bool:
        """Drop what the subscription registered and tell the client; False if the channel moved on."""
        if not self._is_current(effect):
            return False
        get_hub().unsubscribe_changes(self.socket_id, effect.topic)
        self.change_tables.pop(effect.topic, None)
        self.write(system_message(effect.topic, effect.join_ref, "error", "postgres_changes", message))
        return True

    async def _authorize_bindings(self, effect: SubscribeChanges) -> list[AuthorizedBinding]:
        """The channel's bindings, each checked against the publication and the role's grants.

        Raises:
            BindingError: a binding the reference refuses (fatal).
        """
        db = get_database()
        bindings = [parse_binding(raw) for raw in effect.bindings]
        published = await db.published_tables()  # once for all of the channel's bindings
        authorized = [await authorize_binding(db, binding, effect.claims, published) for binding in bindings]
        cost = sum(_regex_cost(a) for a in authorized)
        others = sum(c for topic, c in self.regex_costs.items() if topic != effect.topic and topic in self.change_tables)
        budget = settings.REALTIME_MAX_REGEX_COST_PER_SOCKET
        if cost and others + cost > budget:
            self.limit_hit("regex_cost")
            raise BindingError(
                f"Too many regular expression filters on this socket: {others + cost} RE2 instructions,"
                f" at most {budget} across its channels"
            )
        self.regex_costs[effect.topic] = cost
        return authorized

    async def _register_changes(self, effect: SubscribeChanges, authorized: list[AuthorizedBinding]) -> None:
        hub = get_hub()
        if not self._is_current(effect):
            return
        assert self.writer is not None
        await hub.subscribe_changes(
            ChangeSubscription(
                self.socket_id, effect.topic, self.vsn, self.writer, tuple(authorized), claims=effect.claims,
                join_ref=effect.join_ref,
            )
        )
        if not self._is_current(effect):
            hub.unsubscribe_changes(self.socket_id, effect.topic)
            return
        self.change_tables[effect.topic] = (effect, frozenset(t for a in authorized for t in a.tables))
        if self.publication_watch is None:
            self.publication_watch = asyncio.ensure_future(self._watch_publication())
        self.write(system_message(effect.topic, effect.join_ref, "ok", "postgres_changes", "Subscribed to PostgreSQL"))

    async def _watch_publication(self) -> None:
        """Follow publication changes: schema-wide bindings gain or lose tables (PROTOCOL.md 3.5).

        A failed re-check is logged and tried again at the next interval; the watch never ends early.
        """
        while not self.closed:
            await asyncio.sleep(settings.REALTIME_PUBLICATION_CHECK_S)
            for topic, (effect, _) in list(self.change_tables.items()):
                if not self._is_current(effect):
                    self.change_tables.pop(topic, None)  # left, re-joined or resubscribing with new claims
                    continue
                # Through the socket's database queue, like every other check of this socket.
                self._queue_db(partial(self._is_current, effect), partial(self._recheck, effect))

    async def _recheck(self, effect: SubscribeChanges) -> None:
        entry = self.change_tables.get(effect.topic)
        if entry is None or entry[0] is not effect:
            return
        try:
            authorized = await self._authorize_bindings(effect)
            if frozenset(t for a in authorized for t in a.tables) != entry[1]:
                await self._register_changes(effect, authorized)
        except BindingError as error:
            self._subscribe_failed(effect, error.message)  # e.g. its table left the publication
        except Exception:
            self.log.warning("publication re-check failed socket=%s topic=%s", self.socket_id, effect.topic, exc_info=True)

    async def untrack(self, effect: Untrack) -> None:
        diff = await get_store().untrack(effect.presence_channel, self.socket_id)
        if diff is not None:
            await publish_diff(effect.presence_channel, diff)
        if effect.reply is not None:
            self.write(effect.reply)

    def _is_current(self, effect: SubscribeChanges) -> bool:
        """Whether the channel that asked is still joined (not left, closed or re-joined)."""
        if self.session is None or self.closed:
            return False
        channel = self.session.channels.get(effect.topic)
        # The claims too: a token refresh makes an earlier subscription of the channel stale.
        return channel is not None and channel.join_ref == effect.join_ref and channel.claims is effect.claims

    def write(self, msg: Message) -> None:
        """Send a frame to this socket, in order with the hub's deliveries (``realtime.writer``)."""
        if self.closed or self.writer is None:
            return
        if isinstance(msg.payload, UserBroadcast):
            # A replayed binary row (PROTOCOL.md 5.5): kind 4 on vsn 2, nothing on vsn 1.
            if self.vsn is Vsn.V1:
                return
            try:
                frame = {"type": "websocket.send", "bytes": encode_user_broadcast(msg.topic, msg.payload)}
            except ValueError:
                return  # topic or event over 255 bytes: no kind 4 frame can carry it
        else:
            frame = {"type": "websocket.send", "text": encode_text(self.vsn, msg)}
        if msg.event == "phx_reply" and self.joins_started:
            self._join_answered(msg)
        if not self.writer.write(frame):
            # The peer is gone or too slow; the disconnect event ends this consumer.
            self.log.debug("write to a closed socket=%s", self.socket_id)

    def _join_answered(self, msg: Message) -> None:
        started = self.joins_started.pop((msg.topic, msg.ref), None)
        if started is None:
            return
        status = msg.payload.get("status") if isinstance(msg.payload, dict) else None
        if status == "ok":
            metrics.joins.labels("ok").inc()
            metrics.join_seconds.observe(time.monotonic() - started)
        else:
            metrics.joins.labels("error").inc()
            response = msg.payload.get("response") if isinstance(msg.payload, dict) else None
            reason = response.get("reason") if isinstance(response, dict) else response
            self.join_errors += 1
            level = logging.INFO if self.join_errors <= LOGGED_JOIN_ERRORS else logging.DEBUG
            self.log.log(level, "join refused socket=%s topic=%s reason=%s", self.socket_id, msg.topic, reason)

    def _on_slow_consumer(self) -> None:
        self.log.warning("slow consumer: closing socket=%s (more than %d bytes unsent)", self.socket_id, settings.REALTIME_MAX_UNSENT_BYTES)
        self._spawn(self.close(CLOSE_SLOW_CONSUMER))

    async def close(self, code: int) -> None:
        if self.closed:
            return
        self.closed = True
        self.teardown()
        if self.writer is not None:
            self.writer.close()
        await self.base_send({"type": "websocket.close", "code": code})

    # --- timers ----------------------------------------------------------

    def _check_idle(self) -> None:
        idle_for = self.loop.time() - self.last_inbound
        limit = settings.REALTIME_IDLE_TIMEOUT_S
        if idle_for >= limit:
            self.log.info("closing idle socket=%s after %.0fs", self.socket_id, idle_for)
            self._spawn(self.close(1000))
        elif not self.closed:
            self.idle_timer = self.loop.call_later(limit - idle_for, self._check_idle)

    def _schedule_expiry(self) -> None:
        if self.session is None:
            return
        deadline = self.session.next_deadline()
        if deadline == self.expiry_at:
            return
        if self.expiry_timer is not None:
            self.expiry_timer.cancel()
            self.expiry_timer = None
        self.expiry_at = deadline
        if deadline is not None and math.isfinite(deadline):
            # Wall-clock deadline -> loop delay; never more than 5 minutes ahead.
            delay = min(max(deadline - time.time(), 0.0), 300.0)
            self.expiry_timer = self.loop.call_later(delay, self._on_expiry_timer)

    def _on_expiry_timer(self) -> None:
        self.expiry_timer = None
        self.expiry_at = None
        if self.session is not None and not self.closed:
            self._spawn(self.step(lambda session: session.expire(time.time()), "expiry", ""))

    # --- lifecycle -------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def teardown(self) -> None:
        if self.counted:
            self.counted = False
            get_socket_counter().closed(self.address)
            metrics.sockets.dec()
        if self.publication_watch is not None:
            self.publication_watch.cancel()
            self.publication_watch = None
        for timer in (self.idle_timer, self.expiry_timer):
            if timer is not None:
                timer.cancel()
        self.idle_timer = self.expiry_timer = None
        if self.session is not None:
            hub = get_hub()
            for effect in self.session.close_all():
                if isinstance(effect, Unsubscribe):
                    hub.unsubscribe(effect.group, self.socket_id, effect.topic)
                    hub.unsubscribe_changes(self.socket_id, effect.topic)
                elif isinstance(effect, Untrack):
                    # The socket is gone; the others still get its leave.
                    self._spawn(self.untrack(effect))
        self._count_channels()
