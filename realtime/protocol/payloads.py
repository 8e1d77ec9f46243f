"""The ``phx_join`` payload -> :class:`JoinConfig` (PROTOCOL.md 3.1).

This module owns reading the join payload the way clients actually send it,
and every default of the join configuration. An invalid payload never fails
the join (the reference logs ``InvalidJoinPayload``): each field that does not
parse falls back to its default and adds one line to ``JoinConfig.errors``,
for logs only. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "DEFAULT_REPLAY_LIMIT",
    "JoinConfig",
    "ReplayConfig",
    "parse_flexible_bool",
    "parse_join_payload",
]

# The default when `replay` omits `limit` (PROTOCOL.md 5.5); the session clamps it to 1..25 (PROTOCOL.md 8).
DEFAULT_REPLAY_LIMIT: Final = 25

_TRUE_TEXT: Final = "true"
_FALSE_TEXT: Final = "false"


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """``config.broadcast.replay`` (PROTOCOL.md 5.5).

    ``valid`` is False when ``replay`` was sent but its ``since``/``limit`` do
    not parse; the join then fails with ``UnableToReplayMessages: Replay params
    are not valid``.
    """

    since: int = 0  # milliseconds since the epoch
    limit: int = DEFAULT_REPLAY_LIMIT
    valid: bool = True


@dataclass(frozen=True, slots=True)
class JoinConfig:
    """What a join asked for, with defaults for everything that did not parse."""

    private: bool = False
    broadcast_self: bool = False
    broadcast_ack: bool = False
    replication_ready: bool = False
    presence_enabled: bool = False
    # None means "generate a UUID" ("" and null are sent for that).
    presence_key: str | None = None
    # The client's bindings verbatim, in order: the ok reply echoes them (PROTOCOL.md 3.3).
    postgres_changes: tuple[dict[str, Any], ...] = ()
    # "access_token" or its alias "user_token"; None means "use the connect token".
    access_token: str | None = None
    # False for a legacy join without "config" (PROTOCOL.md 3.8).
    has_config: bool = True
    errors: tuple[str, ...] = ()
    # None when no replay was requested.
    replay: ReplayConfig | None = None


def parse_flexible_bool(value: Any) -> bool | None:
    """Read a boolean the way clients send it; None means "use the default".

    Accepts ``true``/``false`` and the strings "true"/"false" in any case,
    surrounding whitespace ignored. Numbers (including 1 and 0) are refused,
    as the reference refuses them.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == _TRUE_TEXT:
            return True
        if text == _FALSE_TEXT:
            return False
    return None


def parse_join_payload(payload: Any) -> JoinConfig:
    """Parse a ``phx_join`` payload; never raises (PROTOCOL.md 3.1).

    A null payload reads as ``{}`` (a legacy join). Any other non-object
    payload joins with the defaults and ``has_config`` True, so a broken
    payload never turns into a legacy CDC subscription on the sub-topic.
    """
    return _JoinParser().parse(payload)


class _JoinParser:
    """Collects per-field errors while reading one payload."""

    __slots__ = ("errors",)

    def __init__(self) -> None:
        self.errors: list[str] = []

    def parse(self, payload: Any) -> JoinConfig:
        if payload is None:
            payload = {}
        if not isinstance(payload, dict):
            self.errors.append("payload: expected an object")
            return JoinConfig(errors=tuple(self.errors))
        access_token = self._access_token(payload)
        if "config" not in payload:
            return JoinConfig(
                access_token=access_token, has_config=False, errors=tuple(self.errors)
            )
        config = self._object(payload["config"], "config")
        broadcast = self._object(config.get("broadcast"), "config.broadcast")
        presence = self._object(config.get("presence"), "config.presence")
        # Every field is read before the errors are frozen into the result.
        private = self._bool(config, "private", "config")
        broadcast_self = self._bool(broadcast, "self", "config.broadcast")
        broadcast_ack = self._bool(broadcast, "ack", "config.broadcast")
        replication_ready = self._bool(broadcast, "replication_ready", "config.broadcast")
        replay = self._replay(broadcast.get("replay"))
        presence_enabled = self._bool(presence, "enabled", "config.presence")
        presence_key = self._presence_key(presence.get("key"))
        postgres_changes = self._bindings(config.get("postgres_changes"))
        return JoinConfig(
            private=private,
            broadcast_self=broadcast_self,
            broadcast_ack=broadcast_ack,
            replication_ready=replication_ready,
            presence_enabled=presence_enabled,
            presence_key=presence_key,
            postgres_changes=postgres_changes,
            access_token=access_token,
            has_config=True,
            errors=tuple(self.errors),
            replay=replay,
        )

    def _object(self, value: Any, where: str) -> dict[str, Any]:
        """An object field; null means absent, anything else is an error."""
        if isinstance(value, dict):
            return value
        if value is not None:
            self.errors.append(f"{where}: expected an object")
        return {}

    def _bool(self, parent: dict[str, Any], key: str, where: str) -> bool:
        value = parent.get(key)
        if value is None:
            return False
        parsed = parse_flexible_bool(value)
        if parsed is None:
            self.errors.append(f"{where}.{key}: expected a boolean")
            return False
        return parsed

    def _presence_key(self, value: Any) -> str | None:
        if value is None or value == "":
            return None
        if isinstance(value, str):
            return value
        # The reference tracks number and boolean keys too; on the wire they
        # are object keys, so their text form is what clients see.
        if isinstance(value, bool):
            return _TRUE_TEXT if value else _FALSE_TEXT
        if isinstance(value, (int, float)):
            return str(value)
        self.errors.append("config.presence.key: expected a string")
        return None

    def _bindings(self, value: Any) -> tuple[dict[str, Any], ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.errors.append("config.postgres_changes: expected an array of objects")
            return ()
        bindings: list[dict[str, Any]] = []
        for index, item in enumerate(value):
            if isinstance(item, dict):
                bindings.append(dict(item))
            elif item is not None:  # null items are dropped silently (PROTOCOL.md 3.1)
                self.errors.append(f"config.postgres_changes[{index}]: expected an object")
        return tuple(bindings)

    def _access_token(self, payload: dict[str, Any]) -> str | None:
        for key in ("access_token", "user_token"):
            value = payload.get(key)
            if isinstance(value, str):
                return value
            if value is not None:
                self.errors.append(f"{key}: expected a string")
        return None

    def _replay(self, value: Any) -> ReplayConfig | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.errors.append("config.broadcast.replay: expected an object")
            return ReplayConfig(valid=False)
        since = self._integer(value.get("since"), "since", None)
        limit = self._integer(value.get("limit"), "limit", DEFAULT_REPLAY_LIMIT)
        if since is None or limit is None:
            return ReplayConfig(valid=False)
        return ReplayConfig(since=since, limit=limit)

    def _integer(self, value: Any, key: str, default: int | None) -> int | None:
        """An integer field; None (with an error) when unreadable, or when missing without a default."""
        if value is None:
            if default is None:
                self.errors.append(f"config.broadcast.replay.{key}: required")
            return default
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        self.errors.append(f"config.broadcast.replay.{key}: expected an integer")
        return None
