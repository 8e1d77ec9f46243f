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
"""

from __future__ import annotations


def member_key(channel: str, key: str) -> str:
    """The hash that holds every meta tracked under ``key`` on ``channel``."""
    return f"presence:channel:{channel}:user:{key}"


def channel_index_key(channel: str) -> str:
    """The set of member keys (full key names) that exist for ``channel``."""
    return f"presence:index:{channel}"


def channels_key() -> str:
    """The set of channels that have members."""
    return "presence:channels"


def processes_key() -> str:
    """The sorted set of known processes, scored by liveness deadline in ms."""
    return "presence:processes"


def process_key(process_id: str) -> str:
    """The liveness key of a process; it expires when the process stops heartbeating."""
    return f"presence:alive:{process_id}"


def process_members_key(process_id: str) -> str:
    """The set of entries owned by a process, so that a sweeper can find them."""
    return f"presence:owned:{process_id}"
