"""Every Redis key name the presence store uses, and nothing else.

This module is the only place a presence key is spelled. Channel names,
presence keys and process ids are opaque strings chosen by the caller and are
never parsed back out of a key name; the values stored under the keys carry
them instead.

- ``member_key(channel, key)``: hash, ``phx_ref`` -> JSON entry, one field per
  tracking socket that shares ``key`` on ``channel``.
- ``channel_index_key(channel)``: set of the member keys that exist for a channel.
- ``channels_key()``: set of the channels that have at least one member.
- ``processes_key()``: sorted set, process id -> liveness deadline (ms, Redis clock).
- ``process_key(process_id)``: a process's liveness key; it exists while the
  process heartbeats.
- ``process_members_key(process_id)``: set of the entries a process owns.

Channels (``public:<sub-topic>``) and presence keys are picked by any client
holding the public anon key, so each variable part is escaped before it goes
into a name (``escape_name``): every UTF-8 byte of a character outside
``[A-Za-z0-9._-]`` becomes ``%XX``, except that a channel keeps its ``:``
(``public:room:1`` is common and stays readable). Hence:

- ordinary names (letters, digits, ``-_.``; in channels also ``:``) are spelled
  as they always were, so keys written before the escaping still match;
- two different (channel, key) pairs never share a member key: an escaped key
  holds no ``:``, so it always starts after the last ``:`` of the name;
- an escaped name holds no Redis glob character (``*?[]\\``), newline or
  space, so it stands for itself inside a ``SCAN MATCH`` pattern. A channel's
  ``:`` still lets ``member_key("public:a", "") + "*"`` match the member keys
  of ``public:a:user:b``: list a channel's members through its index set,
  never through a pattern over member keys.
"""

from __future__ import annotations

import re
from typing import Final

# RFC 3986 "unreserved" without "~": the characters every name keeps.
_ESCAPED: Final = re.compile(r"[^A-Za-z0-9._-]+")
_ESCAPED_IN_CHANNEL: Final = re.compile(r"[^A-Za-z0-9._:-]+")


def _percent_encode(match: re.Match[str]) -> str:
    # surrogatepass: a lone surrogate (no client can send one, but a str may
    # hold one) gets bytes of its own instead of raising.
    return "".join(f"%{byte:02X}" for byte in match.group().encode("utf-8", "surrogatepass"))


def escape_name(name: str, *, keep_colons: bool = False) -> str:
    """``name`` as it appears inside a key: ``%XX`` for each byte outside ``[A-Za-z0-9._-]``.

    ``keep_colons`` also keeps ``:`` (for channels). The mapping is one-to-one.
    """
    return (_ESCAPED_IN_CHANNEL if keep_colons else _ESCAPED).sub(_percent_encode, name)


def _channel(channel: str) -> str:
    return escape_name(channel, keep_colons=True)


def member_key(channel: str, key: str) -> str:
    """The hash that holds every meta tracked under ``key`` on ``channel``."""
    return f"presence:channel:{_channel(channel)}:user:{escape_name(key)}"


def channel_index_key(channel: str) -> str:
    """The set of member keys (full key names) that exist for ``channel``."""
    return f"presence:index:{_channel(channel)}"


def channels_key() -> str:
    """The set of channels that have members."""
    return "presence:channels"


def processes_key() -> str:
    """The sorted set of known processes, scored by liveness deadline in ms."""
    return "presence:processes"


def process_key(process_id: str) -> str:
    """The liveness key of a process; it expires when the process stops heartbeating."""
    return f"presence:alive:{escape_name(process_id)}"


def process_members_key(process_id: str) -> str:
    """The set of entries owned by a process, so that a sweeper can find them."""
    return f"presence:owned:{escape_name(process_id)}"
