"""The per-socket Phoenix state machine: messages in, frames and effects out.

``Session.handle`` takes one decoded client message and the current time and
returns what the socket must do, in order: frames to send (now or after a
delay), hub subscriptions to add or drop, broadcasts to publish, bindings to
check, presence to track. It performs no I/O and reads no clock, so every
protocol rule is unit-testable. Rules follow PROTOCOL.md sections 2.4
(control), 3 (join), 3.7 (tokens), 5.1 (broadcast) and 6 (presence).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from realtime.bindings import binding_id
from realtime.errors import RealtimeError
from realtime.jwt import Claims, TokenError
from realtime.protocol.message import Message, UserBroadcast
from realtime.protocol.payloads import JoinConfig, parse_join_payload
from realtime.topics import TOPIC_PREFIX, broadcast_group, presence_channel, sub_topic
from realtime.types import KIND_BINARY, KIND_JSON, BroadcastMessage

logger = logging.getLogger(__name__)

PHOENIX_TOPIC = "phoenix"

Verifier = Callable[[str, float], Claims]


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


Effect = (
    Send | SendLater | Subscribe | Unsubscribe | Publish | SubscribeChanges | SendPresenceState | Track | Untrack
)


# --- state ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_channels: int = 100
    max_payload_bytes: int = 3000 * 1000 + 500
    channel_error_backoff: float = 5.0
    presence_max_calls: int = 5
    presence_window: float = 30.0
    private_only: bool = False


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
    presence_calls: list[float] = field(default_factory=list)

    @property
    def sub_topic(self) -> str:
        return sub_topic(self.topic)

    @property
    def presence_channel(self) -> str:
        """The presence store's name for this (private flag, sub-topic) pair."""
        return presence_channel(self.sub_topic, self.config.private)


class JoinRefused(RealtimeError):
    """A join the server answers with an error reply (PROTOCOL.md 3.2)."""


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
    new_presence_key: Callable[[], str] = field(default=lambda: str(uuid.uuid4()))

    # --- entry points ----------------------------------------------------

    def handle(self, msg: Message, now: float) -> list[Effect]:
        """Process one client message."""
        if msg.topic == PHOENIX_TOPIC:
            if msg.event == "heartbeat":
                return [Send(Message(None, msg.ref, PHOENIX_TOPIC, "phx_reply", {"status": "ok", "response": {}}))]
            return [Send(_unmatched(msg))]
        if msg.event == "phx_join":
            return self._join(msg, now)
        if msg.event == "phx_leave":
            return self._leave(msg)
        channel = self.channels.get(msg.topic)
        if channel is None:
            return [Send(_unmatched(msg))]
        if msg.join_ref is not None and msg.join_ref != channel.join_ref:
            # PROTOCOL.md 2.4: a stale join_ref is dropped silently.
            return []
        if msg.event == "broadcast":
            return self._broadcast(channel, msg)
        if msg.event == "access_token":
            return self._access_token(channel, msg, now)
        if msg.event == "presence":
            return self._presence(channel, msg, now)
        # Unknown events get no reply.
        return []

    def close_all(self) -> list[Effect]:
        """The socket is gone: drop every channel's subscription."""
        effects: list[Effect] = []
        for channel in self.channels.values():
            effects += self._stop(channel)
        self.channels.clear()
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

    # --- join and leave --------------------------------------------------

    def _join(self, msg: Message, now: float) -> list[Effect]:
        if not msg.topic.startswith(TOPIC_PREFIX):
            return [Send(_unmatched(msg))]
        config = parse_join_payload(msg.payload)
        if config.errors:
            logger.info("InvalidJoinPayload topic=%s errors=%s", msg.topic, "; ".join(config.errors))
        try:
            channel = self._admit(msg, config, now)
        except JoinRefused as error:
            return [SendLater(self.limits.channel_error_backoff, _reply(msg, "error", {"reason": error.reason}))]

        effects: list[Effect] = []
        old = self.channels.pop(msg.topic, None)
        if old is not None:
            effects += self._stop(old)
        self.channels[msg.topic] = channel
        # Subscribe before replying: a broadcast sent after SUBSCRIBED must arrive.
        effects.append(Subscribe(channel.group, channel.topic, config.broadcast_self))
        bindings = [{**binding, "id": binding_id(binding)} for binding in config.postgres_changes]
        effects.append(Send(_reply(msg, "ok", {"postgres_changes": bindings})))
        if old is not None:
            effects.append(Send(_close(old)))
        if config.presence_enabled:
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
        if self.limits.private_only and not config.private:
            raise JoinRefused("PrivateOnly", "This project only allows private channels")
        if topic not in self.channels and len(self.channels) >= self.limits.max_channels:
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
        if config.private and not _bypasses_policies(claims):
            # Without realtime.messages policies nobody but a bypassing role may read.
            raise JoinRefused(
                "Unauthorized", f"You do not have permissions to read from this Channel topic: {sub_topic(topic)}"
            )
        group = broadcast_group(sub_topic(topic), config.private)
        return Channel(
            topic=topic, join_ref=msg.join_ref, config=config, claims=claims, token=token, group=group,
            presence_key=config.presence_key or self.new_presence_key(),
        )

    def _leave(self, msg: Message) -> list[Effect]:
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
        effects.append(Unsubscribe(channel.group, channel.topic))
        return effects

    def _end(self, channel: Channel, message: str) -> list[Effect]:
        """A fatal ``system`` error: the message, then ``phx_close`` (PROTOCOL.md 3.5)."""
        self.channels.pop(channel.topic, None)
        return [*self._stop(channel), Send(_system(channel, "error", "system", message)), Send(_close(channel))]

    # --- pushes on a joined channel ---------------------------------------

    def _broadcast(self, channel: Channel, msg: Message) -> list[Effect]:
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
        ack = channel.config.broadcast_ack
        if size > self.limits.max_payload_bytes:
            # PROTOCOL.md 5.1: dropped; the error reply's response is a bare string.
            return [Send(_reply(msg, "error", "payload_size_exceeded"))] if ack else []
        effects: list[Effect] = [Publish(channel.group, message)]
        if ack:
            effects.append(Send(_reply(msg, "ok", {})))
        return effects

    def _presence(self, channel: Channel, msg: Message, now: float) -> list[Effect]:
        """``track`` / ``untrack`` (PROTOCOL.md 6.1, limits in 8)."""
        window_start = now - self.limits.presence_window
        channel.presence_calls = [t for t in channel.presence_calls if t > window_start]
        channel.presence_calls.append(now)
        if len(channel.presence_calls) > self.limits.presence_max_calls:
            return self._end(channel, "Client presence rate limit exceeded")
        event, payload = _presence_event(msg.payload)
        if event == "track":
            if payload is None:
                payload = {}
            if not isinstance(payload, dict):
                return [Send(_reply(msg, "error", {"reason": "Presence track payload must be a map"}))]
            size = len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
            if size > self.limits.max_payload_bytes:
                return self._end(channel, "Track message size exceeded")
            channel.tracked = True
            return [Track(channel.group, channel.topic, channel.presence_channel, channel.presence_key, payload, _reply(msg, "ok", {}))]
        if event == "untrack":
            channel.tracked = False
            return [Untrack(channel.group, channel.topic, channel.presence_channel, _reply(msg, "ok", {}))]
        return [Send(_reply(msg, "error", {}))]

    def _access_token(self, channel: Channel, msg: Message, now: float) -> list[Effect]:
        payload = msg.payload if isinstance(msg.payload, dict) else {}
        token = payload.get("access_token")
        if token is None or (isinstance(token, str) and token.startswith("sb_")) or token == channel.token:
            return []
        try:
            claims = self.verify(token, now)
        except TokenError as error:
            return self._end(channel, error.message)
        if channel.config.private and not _bypasses_policies(claims):
            return self._end(channel, f"You do not have permissions to read from this Channel topic: {channel.sub_topic}")
        channel.claims = claims
        channel.token = token
        if channel.config.postgres_changes:
            # PROTOCOL.md 3.7: subscriptions take the new claims and report again.
            return [SubscribeChanges(channel.topic, channel.join_ref, channel.config.postgres_changes, claims)]
        return []


def _presence_event(payload: Any) -> tuple[str, Any]:
    if not isinstance(payload, dict):
        return "", None
    event = payload.get("event")
    return (event.lower() if isinstance(event, str) else ""), payload.get("payload", {})


def _bypasses_policies(claims: Claims) -> bool:
    return claims.role == "service_role"
