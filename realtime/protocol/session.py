"""The per-socket Phoenix state machine: messages in, frames and effects out.

``Session.handle`` takes one decoded client message and the current time and
returns what the socket must do, in order: frames to send (now or after a
delay), hub subscriptions to add or drop, broadcasts to publish, bindings to
check, presence to track, policies to evaluate. It performs no I/O and reads
no clock, so every protocol rule is unit-testable. Rules follow PROTOCOL.md
sections 2.4 (control), 3 (join), 3.7 (tokens), 5.1 (broadcast), 6 (presence)
and 7 (private channels).

Private channels need the database's verdict before a join is answered, a
refreshed token is taken, or the first broadcast or track is carried out.
The session then returns an ``Authorize`` effect and waits: the consumer
evaluates the policies and hands the result to ``Session.authorized``, which
returns what follows. Pushes on a channel arriving meanwhile are held and
replayed in order once the verdict is in.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from realtime.bindings import binding_id
from core.errors import RealtimeError
from core.jwt import Claims, TokenError
from realtime.protocol.message import Message, UserBroadcast
from realtime.protocol.payloads import JoinConfig, parse_join_payload
from core.rates import RateWindow
from core.topics import (
    TOPIC_PREFIX,
    TOPIC_TOO_LONG,
    broadcast_group,
    presence_channel,
    presence_group,
    sub_topic,
    topic_too_long,
)
from core.types import KIND_BINARY, KIND_JSON, BroadcastMessage

logger = logging.getLogger(__name__)

PHOENIX_TOPIC = "phoenix"

Verifier = Callable[[str, float], Claims]


class Extension(StrEnum):
    """What a ``realtime.messages`` row, and so a policy, is about (PROTOCOL.md 7)."""

    BROADCAST = "broadcast"
    PRESENCE = "presence"


@dataclass(frozen=True, slots=True)
class Permissions:
    """What the policies granted one role on one private sub-topic: extensions it may read, write."""

    read: frozenset[Extension] = frozenset()
    write: frozenset[Extension] = frozenset()


# --- effects -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send a frame to this socket now."""

    message: Message


@dataclass(frozen=True, slots=True)
class SendLater:
    """Send a frame after ``delay`` seconds (join error backoff, PROTOCOL.md 3.2)."""

    delay: float
    message: Message


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Start delivering the topic's broadcasts to this socket."""

    group: str
    topic: str
    self_broadcast: bool
    skip_ids: frozenset[str] = frozenset()  # database broadcasts replayed at join: not delivered again


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    group: str
    topic: str


@dataclass(frozen=True, slots=True)
class Publish:
    """Send a broadcast to every channel on the group, on every process."""

    group: str
    message: BroadcastMessage


@dataclass(frozen=True, slots=True)
class SubscribeChanges:
    """Check and register a channel's postgres_changes bindings, then report in a ``system`` message.

    Runs after the join reply; replaces the channel's earlier subscription (token refresh).
    """

    topic: str
    join_ref: str | None
    bindings: tuple[dict[str, Any], ...]
    claims: Claims


@dataclass(frozen=True, slots=True)
class SendPresenceState:
    """Read the topic's presence and push ``presence_state`` to this channel (PROTOCOL.md 6.2)."""

    topic: str
    join_ref: str | None
    presence_channel: str


@dataclass(frozen=True, slots=True)
class Track:
    """Store this channel's presence meta, publish the diff, then send ``reply``."""

    group: str
    topic: str
    presence_channel: str
    key: str
    payload: dict[str, Any]
    reply: Message


@dataclass(frozen=True, slots=True)
class Untrack:
    """Remove this channel's presence meta, publish the leave; send ``reply`` if given."""

    group: str
    topic: str
    presence_channel: str
    reply: Message | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Authorize:
    """Evaluate a private channel's policies as ``claims``; pass the result to ``Session.authorized``.

    ``read`` and ``write`` name the extensions to evaluate. ``refresh`` marks the
    re-check of a new ``access_token`` (``token``). A result is applied only if
    the channel still waits for this very effect (compared by identity), so a
    leave or re-join during the check makes its result void.
    """

    topic: str
    join_ref: str | None
    claims: Claims
    token: str
    read: tuple[Extension, ...] = ()
    write: tuple[Extension, ...] = ()
    refresh: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class Replay:
    """Read the rows a join replays (PROTOCOL.md 5.5); pass them (None: failed) to ``Session.replayed``.

    ``limit`` is already clamped to 1..25. Compared by identity, as ``Authorize``.
    """

    topic: str
    join_ref: str | None
    since: int  # milliseconds since the epoch
    limit: int
    # The channel's broadcast group: its live broadcasts are held from before the read until the
    # join is answered, so none falls between the read and the subscription.
    group: str = ""
    self_broadcast: bool = False


@dataclass(frozen=True, slots=True)
class ReplayedRow:
    """One replayed ``realtime.messages`` row: a JSON ``payload`` or ``binary`` bytes."""

    id: str
    event: str
    payload: Any
    binary: bytes | None = None


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close the socket with ``code`` (after the frames before it)."""

    code: int


Effect = (
    Send | SendLater | Subscribe | Unsubscribe | Publish | SubscribeChanges | SendPresenceState | Track | Untrack
    | Authorize | Replay | Disconnect
)

MAX_REPLAY_LIMIT = 25  # PROTOCOL.md 8

# RFC 6455 7.4.1 "going away": the reference closes a socket over its join rate with it; clients reconnect.
CLOSE_GOING_AWAY = 1001


# --- state ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_channels: int = 100
    max_payload_bytes: int = 3000 * 1000 + 500
    channel_error_backoff: float = 5.0
    presence_max_calls: int = 5
    presence_window: float = 30.0
    private_only: bool = False
    # Per-socket rates (PROTOCOL.md 8), averaged over ``rate_window`` seconds; 0 turns one off.
    max_joins_per_second: float = 0
    max_events_per_second: float = 0
    max_presence_events_per_second: float = 0
    rate_window: int = 5
    max_bindings: int = 50  # postgres_changes bindings per join
    max_held_pushes: int = 100  # pushes held per channel while its policies are checked


@dataclass(slots=True)
class Channel:
    """One joined topic on this socket."""

    topic: str
    join_ref: str | None
    config: JoinConfig
    claims: Claims
    token: str
    group: str
    presence_key: str = ""
    tracked: bool = False
    # Private channels only: the evaluated read flags, and the write flags
    # cached until the token changes; a missing key is "not evaluated yet".
    read: dict[Extension, bool] = field(default_factory=dict)
    write: dict[Extension, bool] = field(default_factory=dict)
    checking: Authorize | None = None  # the policy check this channel waits for
    deferred: list[tuple[Message, float]] = field(default_factory=list)  # pushes held meanwhile

    @property
    def sub_topic(self) -> str:
        return sub_topic(self.topic)

    def groups(self) -> list[str]:
        """The groups this channel receives from: all of them on a public topic, the readable ones on a private one."""
        if not self.config.private:
            return [self.group]
        groups = [self.group] if self.read.get(Extension.BROADCAST) else []
        if self.read.get(Extension.PRESENCE):
            groups.append(presence_group(self.sub_topic, True))
        return groups

    def may_read(self, extension: Extension) -> bool:
        return not self.config.private or self.read.get(extension, False)

    @property
    def presence_channel(self) -> str:
        """The presence store's name for this (private flag, sub-topic) pair."""
        return presence_channel(self.sub_topic, self.config.private)


class JoinRefused(RealtimeError):
    """A join the server answers with an error reply (PROTOCOL.md 3.2)."""


@dataclass(slots=True)
class PendingJoin:
    """A private join that passed every other check and waits for its read check."""

    msg: Message
    channel: Channel
    check: Authorize
    replay: Replay | None = None  # the replay read it waits for, once read was granted


def _read_denied(topic: str) -> str:
    return f"You do not have permissions to read from this Channel topic: {sub_topic(topic)}"


def _reply(msg: Message, status: str, response: Any) -> Message:
    return Message(msg.join_ref, msg.ref, msg.topic, "phx_reply", {"status": status, "response": response})


def _unmatched(msg: Message) -> Message:
    # PROTOCOL.md 2.2: join_ref is null on "unmatched topic" replies.
    return Message(None, msg.ref, msg.topic, "phx_reply", {"status": "error", "response": {"reason": "unmatched topic"}})


def system_message(topic: str, join_ref: str | None, status: str, extension: str, message: str) -> Message:
    """A ``system`` push (PROTOCOL.md 3.5): all four keys, the channel's join_ref, null ref."""
    payload = {"message": message, "status": status, "extension": extension, "channel": sub_topic(topic)}
    return Message(join_ref, None, topic, "system", payload)


def _system(channel: Channel, status: str, extension: str, message: str) -> Message:
    return system_message(channel.topic, channel.join_ref, status, extension, message)


def _replayed(channel: Channel, row: ReplayedRow) -> Message:
    """A replayed row (PROTOCOL.md 5.5): text with the channel's join_ref, or a kind 4 body for binary rows."""
    meta = {"replayed": True, "id": row.id}
    if row.binary is not None:
        encoded_meta = json.dumps(meta, separators=(",", ":")).encode("utf-8")
        return Message(channel.join_ref, None, channel.topic, "broadcast", UserBroadcast(row.event, 0, row.binary, encoded_meta))
    payload = {"type": "broadcast", "event": row.event, "payload": row.payload, "meta": meta}
    return Message(channel.join_ref, None, channel.topic, "broadcast", payload)


def _close(channel: Channel) -> Message:
    # PROTOCOL.md 2.2: phx_close carries the ended channel's join_ref as both refs.
    return Message(channel.join_ref, channel.join_ref, channel.topic, "phx_close", {})


@dataclass
class Session:
    """The protocol state of one WebSocket: its token and its joined channels."""

    socket_id: str
    claims: Claims
    token: str
    verify: Verifier
    limits: SessionLimits = field(default_factory=SessionLimits)
    channels: dict[str, Channel] = field(default_factory=dict)
    pending_joins: dict[str, PendingJoin] = field(default_factory=dict)
    new_presence_key: Callable[[], str] = field(default=lambda: str(uuid.uuid4()))
    # Presence push times per topic, kept across re-joins of the topic (PROTOCOL.md 8).
    presence_calls: dict[str, list[float]] = field(default_factory=dict)
    joins: RateWindow = field(init=False)
    events: RateWindow = field(init=False)
    presence_events: RateWindow = field(init=False)
    disconnecting: bool = False  # over the join rate: everything after is ignored
    restarting: bool = False  # the server is draining (graceful stop): joins are refused, RealtimeRestarting
    # Kinds of the limits reached since the glue last emptied this (metrics and logs; README, Limits).
    limit_hits: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        window = self.limits.rate_window
        self.joins = RateWindow(self.limits.max_joins_per_second, window)
        self.events = RateWindow(self.limits.max_events_per_second, window)
        self.presence_events = RateWindow(self.limits.max_presence_events_per_second, window)

    # --- entry points ----------------------------------------------------

    def handle(self, msg: Message, now: float) -> list[Effect]:
        """Process one client message."""
        if self.disconnecting:
            return []
        if msg.topic == PHOENIX_TOPIC:
            if msg.event == "heartbeat":
                return [Send(Message(None, msg.ref, PHOENIX_TOPIC, "phx_reply", {"status": "ok", "response": {}}))]
            return self._counted(now, [Send(_unmatched(msg))])
        if msg.event == "phx_join":
            if self.joins.hit(now):
                return self._too_many_joins(msg)
            return self._join(msg, now)
        if msg.event == "phx_leave":
            return self._leave(msg)
        channel = self.channels.get(msg.topic)
        if channel is None:
            return self._counted(now, [Send(_unmatched(msg))])
        if msg.join_ref is not None and msg.join_ref != channel.join_ref:
            # PROTOCOL.md 2.4: a stale join_ref is dropped silently.
            return []
        # Counted as it arrives, held or not (PROTOCOL.md 8).
        if msg.event == "presence":
            if self.presence_events.hit(now):
                self.limit_hits.append("presence_events_per_second")
                return self._end_all("Too many presence messages per second")
        elif self.events.hit(now):
            self.limit_hits.append("events_per_second")
            return self._end_all("Too many messages per second")
        return self._push(channel, msg, now)

    def _push(self, channel: Channel, msg: Message, now: float) -> list[Effect]:
        """A push on a joined channel, already counted; held while the channel's policies are checked."""
        if channel.checking is not None:
            # Held until the channel's policy check is answered, so pushes keep their order.
            if len(channel.deferred) >= self.limits.max_held_pushes:
                self.limit_hits.append("held_pushes")
                return self._end(channel, "Too many messages waiting for this channel's authorization")
            channel.deferred.append((msg, now))
            return []
        if msg.event == "broadcast":
            return self._broadcast(channel, msg, now)
        if msg.event == "access_token":
            return self._access_token(channel, msg, now)
        if msg.event == "presence":
            return self._presence(channel, msg, now)
        # Unknown events get no reply.
        return []

    def authorized(self, check: Authorize, permissions: Permissions | None, now: float) -> list[Effect]:
        """Act on the outcome of an ``Authorize`` effect; ``None`` means the database could not be asked."""
        pending = self.pending_joins.get(check.topic)
        if pending is not None and pending.check is check and pending.replay is None:
            del self.pending_joins[check.topic]
            return self._join_authorized(pending, permissions)
        channel = self.channels.get(check.topic)
        if channel is None or channel.checking is not check:
            return []  # left, re-joined or ended while the database answered
        channel.checking = None
        if check.refresh:
            effects = self._refresh_authorized(channel, check, permissions)
        else:
            effects = self._record(channel, check, permissions)
        if self.channels.get(check.topic) is not channel:
            return effects
        held, channel.deferred = channel.deferred, []
        for msg, at in held:
            if self.channels.get(msg.topic) is not channel:
                break  # a held push ended the channel
            effects += self._push(channel, msg, at)
        if permissions is None:
            # Denied for the pushes that waited; the next one asks the database again.
            for extension in check.read:
                channel.read.pop(extension, None)
            for extension in check.write:
                channel.write.pop(extension, None)
        return effects

    def waits_for(self, check: Authorize | Replay) -> bool:
        """Whether ``check``'s verdict would still be used (its join or channel has not moved on)."""
        pending = self.pending_joins.get(check.topic)
        if pending is not None and (pending.check is check or pending.replay is check):
            return True
        channel = self.channels.get(check.topic)
        return channel is not None and channel.checking is check

    def close_all(self) -> list[Effect]:
        """The socket is gone: drop every channel's subscription."""
        effects: list[Effect] = []
        for channel in self.channels.values():
            effects += self._stop(channel)
        self.channels.clear()
        self.pending_joins.clear()
        return effects

    def next_deadline(self) -> float | None:
        """When the earliest channel token expires, or None without channels."""
        return min((c.claims.exp for c in self.channels.values()), default=None)

    def expire(self, now: float) -> list[Effect]:
        """End every channel whose token has expired (PROTOCOL.md 3.7)."""
        effects: list[Effect] = []
        for channel in [c for c in self.channels.values() if c.claims.exp <= now]:
            ago = int(now - channel.claims.exp)
            effects += self._end(channel, f"Token has expired {ago} seconds ago")
        return effects

    # --- limits ----------------------------------------------------------

    def _counted(self, now: float, effects: list[Effect]) -> list[Effect]:
        """``effects`` of a push that counts toward the events rate, or the end of every channel past it."""
        if self.events.hit(now):
            self.limit_hits.append("events_per_second")
            return self._end_all("Too many messages per second")
        return effects

    def _end_all(self, message: str) -> list[Effect]:
        """End every channel of this socket with a fatal ``system`` error: the socket's rate was exceeded.

        The reference ends every channel of the project; only the socket that
        sent too much is cut here, so the others keep working.
        """
        effects: list[Effect] = []
        for channel in list(self.channels.values()):
            effects += self._end(channel, message)
        for pending in self.pending_joins.values():
            effects.append(Send(_close(pending.channel)))
        self.pending_joins.clear()
        return effects

    def _too_many_joins(self, msg: Message) -> list[Effect]:
        """PROTOCOL.md 3.2: the join is refused, then the socket is closed."""
        self.disconnecting = True
        self.limit_hits.append("joins_per_second")
        reason = "ClientJoinRateLimitReached: Too many joins per second"
        return [Send(_reply(msg, "error", {"reason": reason})), Disconnect(CLOSE_GOING_AWAY)]

    # --- join and leave --------------------------------------------------

    def _join(self, msg: Message, now: float) -> list[Effect]:
        if not msg.topic.startswith(TOPIC_PREFIX):
            return [Send(_unmatched(msg))]
        config = parse_join_payload(msg.payload)
        if config.errors:
            logger.info("InvalidJoinPayload topic=%s errors=%s", msg.topic, "; ".join(config.errors))
        # A newer join of the topic makes an earlier one still being authorized void.
        self.pending_joins.pop(msg.topic, None)
        try:
            channel = self._admit(msg, config, now)
        except JoinRefused as error:
            return self._refuse(msg, error)
        if config.replay is not None and not config.private:
            return self._refuse(msg, JoinRefused("UnableToReplayMessages", "Replay is not allowed for public channels"))
        if config.private:
            # PROTOCOL.md 7: read is probed for broadcast, and for presence if it is on at join.
            read = (Extension.BROADCAST, Extension.PRESENCE) if config.presence_enabled else (Extension.BROADCAST,)
            check = Authorize(channel.topic, channel.join_ref, channel.claims, channel.token, read=read)
            self.pending_joins[msg.topic] = PendingJoin(msg, channel, check)
            return [check]
        return self._open(msg, channel)

    def _join_authorized(self, pending: PendingJoin, permissions: Permissions | None) -> list[Effect]:
        msg, channel = pending.msg, pending.channel
        if permissions is None:
            return self._refuse(
                msg, JoinRefused("UnableToConnectToProject", "Realtime was unable to connect to the project database")
            )
        channel.read = {extension: extension in permissions.read for extension in pending.check.read}
        if not any(channel.read.values()):
            return self._refuse(msg, JoinRefused("Unauthorized", _read_denied(msg.topic)))
        replay = channel.config.replay
        if replay is not None:
            # PROTOCOL.md 3.2, 5.5: after the read check; needs broadcast read.
            if not replay.valid:
                return self._refuse(msg, JoinRefused("UnableToReplayMessages", "Replay params are not valid"))
            if not channel.read.get(Extension.BROADCAST):
                return self._refuse(msg, JoinRefused("Unauthorized", _read_denied(msg.topic)))
            pending.replay = Replay(
                channel.topic,
                channel.join_ref,
                replay.since,
                max(1, min(MAX_REPLAY_LIMIT, replay.limit)),
                channel.group,
                channel.config.broadcast_self,
            )
            self.pending_joins[msg.topic] = pending
            return [pending.replay]
        return self._open(msg, channel)

    def replayed(self, replay: Replay, rows: list[ReplayedRow] | None) -> list[Effect]:
        """Answer a join that waited for its replay read; ``None`` means the read failed."""
        pending = self.pending_joins.get(replay.topic)
        if pending is None or pending.replay is not replay:
            return []  # left or re-joined meanwhile
        del self.pending_joins[replay.topic]
        if rows is None:
            return self._refuse(
                pending.msg, JoinRefused("UnableToReplayMessages", "Realtime was unable to replay messages")
            )
        return self._open(pending.msg, pending.channel, rows)

    def _refuse(self, msg: Message, error: JoinRefused) -> list[Effect]:
        return [SendLater(self.limits.channel_error_backoff, _reply(msg, "error", {"reason": error.reason}))]

    def _open(self, msg: Message, channel: Channel, replayed: list[ReplayedRow] | None = None) -> list[Effect]:
        """Make an admitted channel current: subscribe, reply, then its first pushes (PROTOCOL.md 3.3-3.4)."""
        config = channel.config
        effects: list[Effect] = []
        old = self.channels.pop(msg.topic, None)
        if old is not None:
            effects += self._stop(old)
        self.channels[msg.topic] = channel
        # Subscribe before replying: a broadcast sent after SUBSCRIBED must arrive.
        skip = frozenset(row.id for row in replayed or ())
        effects += [
            Subscribe(group, channel.topic, config.broadcast_self, skip if group == channel.group else frozenset())
            for group in channel.groups()
        ]
        bindings = [{**binding, "id": binding_id(binding)} for binding in config.postgres_changes]
        effects.append(Send(_reply(msg, "ok", {"postgres_changes": bindings})))
        if old is not None:
            effects.append(Send(_close(old)))
        # PROTOCOL.md 5.5: replayed rows right after the reply, before anything the hub delivers.
        effects += [Send(_replayed(channel, row)) for row in replayed or ()]
        if config.presence_enabled and channel.may_read(Extension.PRESENCE):
            effects.append(SendPresenceState(channel.topic, channel.join_ref, channel.presence_channel))
        if config.replication_ready:
            # Broadcast delivery needs no replication connection here: it is ready at once.
            effects.append(Send(_system(channel, "ok", "system", "Replication connection established")))
        if config.postgres_changes:
            effects.append(SubscribeChanges(channel.topic, channel.join_ref, config.postgres_changes, channel.claims))
        return effects

    def _admit(self, msg: Message, config: JoinConfig, now: float) -> Channel:
        """Run the join checks of PROTOCOL.md 3.2 in order."""
        topic = msg.topic
        if topic == TOPIC_PREFIX:
            raise JoinRefused("TopicNameRequired", "You must provide a topic name")
        if self.restarting:
            raise JoinRefused("RealtimeRestarting", "Realtime is restarting, please standby")
        if topic_too_long(topic):
            raise JoinRefused(*TOPIC_TOO_LONG)
        if len(config.postgres_changes) > self.limits.max_bindings:
            # Before any binding is hashed for the reply or checked in the database.
            self.limit_hits.append("bindings_per_channel")
            raise JoinRefused(
                "InvalidJoinPayload", f"Too many postgres_changes bindings: at most {self.limits.max_bindings} per channel"
            )
        if self.limits.private_only and not config.private:
            raise JoinRefused("PrivateOnly", "This project only allows private channels")
        if topic not in self.channels and len(self.channels.keys() | self.pending_joins.keys()) >= self.limits.max_channels:
            self.limit_hits.append("channels_per_client")
            raise JoinRefused("ChannelRateLimitReached", "Too many channels")
        claims, token = self.claims, self.token
        access_token = config.access_token
        if access_token is not None and not access_token.startswith("sb_") and access_token != self.token:
            try:
                claims = self.verify(access_token, now)
            except TokenError as error:
                raise JoinRefused(error.code, error.message) from None
            token = access_token
        elif claims.exp <= now:
            raise JoinRefused("InvalidJWTToken", f"Token has expired {int(now - claims.exp)} seconds ago")
        group = broadcast_group(sub_topic(topic), config.private)
        return Channel(
            topic=topic, join_ref=msg.join_ref, config=config, claims=claims, token=token, group=group,
            presence_key=config.presence_key or self.new_presence_key(),
        )

    def _leave(self, msg: Message) -> list[Effect]:
        pending = self.pending_joins.get(msg.topic)
        if pending is not None and msg.join_ref in (None, pending.channel.join_ref):
            del self.pending_joins[msg.topic]  # its read check's result will be void
            # Leaving the join being checked leaves the topic: an older channel on it ends too.
            old = self.channels.pop(msg.topic, None)
            stopped = self._stop(old) if old is not None else []
            return [*stopped, Send(_reply(msg, "ok", {})), Send(_close(pending.channel))]
        channel = self.channels.get(msg.topic)
        if channel is None:
            return [Send(_reply(msg, "ok", {}))]
        if msg.join_ref is not None and msg.join_ref != channel.join_ref:
            return []
        del self.channels[msg.topic]
        return [*self._stop(channel), Send(_reply(msg, "ok", {})), Send(_close(channel))]

    def _stop(self, channel: Channel) -> list[Effect]:
        """What ending a channel for any reason takes: its presence leave, its subscriptions."""
        effects: list[Effect] = []
        if channel.tracked:
            channel.tracked = False
            effects.append(Untrack(channel.group, channel.topic, channel.presence_channel))
        effects += [Unsubscribe(group, channel.topic) for group in channel.groups()]
        return effects

    def _end(self, channel: Channel, message: str) -> list[Effect]:
        """A fatal ``system`` error: the message, then ``phx_close`` (PROTOCOL.md 3.5)."""
        self.channels.pop(channel.topic, None)
        return [*self._stop(channel), Send(_system(channel, "error", "system", message)), Send(_close(channel))]

    # --- pushes on a joined channel ---------------------------------------

    def _broadcast(self, channel: Channel, msg: Message, now: float) -> list[Effect]:
        body = msg.payload
        if isinstance(body, UserBroadcast):
            size = len(body.payload)
            message = BroadcastMessage(
                type="realtime.broadcast", group=channel.group, topic=channel.topic, origin=self.socket_id,
                kind=KIND_BINARY, event=body.event, encoding=int(body.encoding), payload=body.payload,
            )
        elif isinstance(body, dict):
            encoded = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            size = len(encoded)
            event = body.get("event")
            message = BroadcastMessage(
                type="realtime.broadcast", group=channel.group, topic=channel.topic, origin=self.socket_id,
                kind=KIND_JSON, event=event if isinstance(event, str) else "", encoding=1, payload=encoded,
            )
        else:
            return []
        if channel.config.private:
            check = self._check(channel, msg, now, write=(Extension.BROADCAST,))
            if check is not None:
                return check
            if not channel.write[Extension.BROADCAST]:
                return []  # PROTOCOL.md 5.1: dropped without a reply, even with ack
        ack = channel.config.broadcast_ack
        if size > self.limits.max_payload_bytes:
            self.limit_hits.append("payload_size")
            # PROTOCOL.md 5.1: dropped; the error reply's response is a bare string.
            return [Send(_reply(msg, "error", "payload_size_exceeded"))] if ack else []
        effects: list[Effect] = [Publish(channel.group, message)]
        if ack:
            effects.append(Send(_reply(msg, "ok", {})))
        return effects

    def _presence(self, channel: Channel, msg: Message, now: float) -> list[Effect]:
        """``track`` / ``untrack`` (PROTOCOL.md 6.1, limits in 8)."""
        event, payload = _presence_event(msg.payload)
        if event == "track" and channel.config.private:
            # PROTOCOL.md 7: presence write, and presence read if it was off at join.
            check = self._check(channel, msg, now, read=(Extension.PRESENCE,), write=(Extension.PRESENCE,))
            if check is not None:
                return check
        if self._presence_calls(channel.topic, now) > self.limits.presence_max_calls:
            self.limit_hits.append("presence_calls")
            return self._end(channel, "Client presence rate limit exceeded")
        if event == "track":
            if channel.config.private and not channel.write[Extension.PRESENCE]:
                return [Send(_reply(msg, "error", {}))]
            if payload is None:
                payload = {}
            if not isinstance(payload, dict):
                return [Send(_reply(msg, "error", {"reason": "Presence track payload must be a map"}))]
            size = len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
            if size > self.limits.max_payload_bytes:
                self.limit_hits.append("payload_size")
                return self._end(channel, "Track message size exceeded")
            channel.tracked = True
            return [Track(channel.group, channel.topic, channel.presence_channel, channel.presence_key, payload, _reply(msg, "ok", {}))]
        if event == "untrack":
            channel.tracked = False
            return [Untrack(channel.group, channel.topic, channel.presence_channel, _reply(msg, "ok", {}))]
        return [Send(_reply(msg, "error", {}))]

    def _presence_calls(self, topic: str, now: float) -> int:
        """Count a presence push on ``topic``; the number within the window, re-joins included."""
        window_start = now - self.limits.presence_window
        if topic not in self.presence_calls:
            # Forget topics whose window has passed, so the map stays as small as the recent topics.
            for stale in [t for t, calls in self.presence_calls.items() if not calls or calls[-1] <= window_start]:
                del self.presence_calls[stale]
        calls = [t for t in self.presence_calls.get(topic, ()) if t > window_start]
        calls.append(now)
        self.presence_calls[topic] = calls
        return len(calls)

    def _access_token(self, channel: Channel, msg: Message, now: float) -> list[Effect]:
        payload = msg.payload if isinstance(msg.payload, dict) else {}
        token = payload.get("access_token")
        if token is None or (isinstance(token, str) and token.startswith("sb_")) or token == channel.token:
            return []
        try:
            claims = self.verify(token, now)
        except TokenError as error:
            return self._end(channel, error.message)
        if channel.config.private:
            # PROTOCOL.md 3.7: re-check every read evaluated so far with the new claims.
            check = Authorize(channel.topic, channel.join_ref, claims, token, read=tuple(channel.read), refresh=True)
            channel.checking = check
            return [check]
        return self._take_token(channel, claims, token)

    def _take_token(self, channel: Channel, claims: Claims, token: str) -> list[Effect]:
        channel.claims = claims
        channel.token = token
        if channel.config.postgres_changes:
            # PROTOCOL.md 3.7: subscriptions take the new claims and report again.
            return [SubscribeChanges(channel.topic, channel.join_ref, channel.config.postgres_changes, claims)]
        return []

    def _refresh_authorized(self, channel: Channel, check: Authorize, permissions: Permissions | None) -> list[Effect]:
        """Take a refreshed token on a private channel, or end the channel (PROTOCOL.md 3.7)."""
        if permissions is None:
            return self._end(channel, "Realtime was unable to connect to the project database")
        granted = {extension: extension in permissions.read for extension in check.read}
        if not any(granted.values()):
            return self._end(channel, _read_denied(channel.topic))
        if any(channel.read.get(extension) and not allowed for extension, allowed in granted.items()):
            return self._end(channel, f"You no longer have permission to read from this Channel topic: {channel.sub_topic}")
        channel.write.clear()  # write verdicts belong to the old token
        return self._record(channel, check, permissions) + self._take_token(channel, check.claims, check.token)

    # --- private channel policies ------------------------------------------

    def _check(
        self, channel: Channel, msg: Message, now: float,
        read: tuple[Extension, ...] = (), write: tuple[Extension, ...] = (),
    ) -> list[Effect] | None:
        """Ask for the verdicts this push needs and the channel lacks, holding the push; None if all are known."""
        read = tuple(extension for extension in read if extension not in channel.read)
        write = tuple(extension for extension in write if extension not in channel.write)
        if not read and not write:
            return None
        check = Authorize(channel.topic, channel.join_ref, channel.claims, channel.token, read=read, write=write)
        channel.checking = check
        channel.deferred.append((msg, now))
        return [check]

    def _record(self, channel: Channel, check: Authorize, permissions: Permissions | None) -> list[Effect]:
        """Store the verdicts of ``check`` (all denied without an answer); subscribe to what became readable."""
        before = channel.groups()
        granted = permissions or Permissions()
        for extension in check.read:
            channel.read[extension] = extension in granted.read
        for extension in check.write:
            channel.write[extension] = extension in granted.write
        return [
            Subscribe(group, channel.topic, channel.config.broadcast_self)
            for group in channel.groups() if group not in before
        ]


def _presence_event(payload: Any) -> tuple[str, Any]:
    if not isinstance(payload, dict):
        return "", None
    event = payload.get("event")
    return (event.lower() if isinstance(event, str) else ""), payload.get("payload", {})

