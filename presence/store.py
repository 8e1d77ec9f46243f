"""Presence entries in Redis, shared by every server process.

Owns the ``PresenceStore`` contract and ``RedisPresenceStore``, which keeps
each channel's metas in Redis so that every process serving a topic sees the
same ``presence_state``. It knows nothing about frames or sockets beyond an
opaque socket id; the diffs it returns are broadcast by the caller.

Layout (every name comes from ``presence.keys``):

- ``member_key(channel, key)``: hash, ``phx_ref`` -> entry JSON;
- ``channel_index_key(channel)``: set of the channel's member keys;
- ``channels_key()``: set of channels with members;
- ``processes_key()``: sorted set, process id -> liveness deadline (ms, Redis clock);
- ``process_key(pid)``: exists while the process heartbeats;
- ``process_members_key(pid)``: set of refs ``[channel, key, phx_ref]`` the process owns.

Every write that spans several keys is one Lua script (``presence.scripts``),
so concurrent processes never see half an entry; ``presence.batch`` sends
the calls of one event loop together on redis-py pipelines, and
``presence.maintenance`` runs the heartbeat and the sweep. One entry exists
per (channel, socket); the owning process remembers its sockets' entries in
memory.

Liveness: a process refreshes its liveness key every ``ttl / 3`` seconds with
a time-to-live of ``ttl - sweep_interval``; any process may sweep, and a sweep
removes the entries of processes whose liveness key is gone, inside a script
that first checks the key again. A sweeper that runs every ``sweep_interval``
therefore removes a dead process's members within ``ttl`` of its last
heartbeat, exactly once however many sweepers race, and never touches a
process that is still heartbeating. Member keys also expire on their own
(``ENTRY_TTL_FACTOR * ttl``) in case no process is left to sweep.

A process whose event loop stalled past its liveness (or whose Redis lost its
keys) may have been swept while its sockets stayed connected: its next
heartbeat notices (the liveness key was gone, or its previous liveness write
is older than the key lived) and writes its missing entries again, with the
same ``phx_ref``, returning their joins.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Protocol

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from presence import maintenance, scripts
from presence.batch import Arg, ScriptBatch
from presence.entries import decode_entry, encode_entry, owner_ref, parse_owner_ref, signature
from presence.keys import (
    channel_index_key,
    channels_key,
    member_key,
    process_key,
    process_members_key,
    processes_key,
)
from presence.maintenance import REDIS_ERRORS, ChannelDiffs, OnLeaves
from presence.state import (
    PHX_REF,
    Diff,
    Entry,
    Presences,
    join_diff,
    leave_diff,
    make_meta,
    merge_diffs,
    new_phx_ref,
    presence_state,
    update_diff,
)

logger = logging.getLogger(__name__)

DEFAULT_TTL = 15.0
MAX_SWEEP_INTERVAL = 2.0
ENTRY_TTL_FACTOR = 8
CHUNK_SIZE = 500

ChannelCounts = list[tuple[str, int]]
Entries = list[Entry]


class TrackKind(Enum):
    """What a ``track`` did."""

    JOINED = "joined"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True, slots=True)
class TrackResult:
    """The outcome of ``track``: the current entry and the diff to broadcast, if any."""

    kind: TrackKind
    entry: Entry
    diff: Diff | None  # None when the payload was already tracked unchanged
    previous: Entry | None = None  # the entry an update replaced


class PresenceStore(Protocol):
    """What the channel glue needs from a presence backend."""

    async def track(self, channel: str, key: str, socket_id: str, payload: Mapping[str, Any]) -> TrackResult:
        """Track ``payload`` for ``socket_id`` on ``channel``; one entry per (channel, socket)."""
        ...

    async def untrack(self, channel: str, socket_id: str) -> Diff | None:
        """Remove the socket's entry on ``channel``; the leave diff, or None if none was tracked."""
        ...

    async def untrack_socket(self, socket_id: str) -> ChannelDiffs:
        """Remove every entry of a closed socket; one leave diff per channel."""
        ...

    def tracked(self, socket_id: str) -> dict[str, Entry]:
        """The socket's entries by channel, as this process last wrote them."""
        ...

    async def list(self, channel: str) -> Entries:
        """Every entry on ``channel``, from every process, in join order."""
        ...

    async def state(self, channel: str) -> Presences:
        """The ``presence_state`` payload of ``channel``."""
        ...

    async def channels(self) -> ChannelCounts:
        """``(channel, member count)`` for every channel with members, by name."""
        ...

    async def remove(self, channel: str, key: str, phx_ref: str) -> Diff | None:
        """Remove one meta whatever process owns it; the leave diff, or None if it was gone."""
        ...

    async def heartbeat(self) -> ChannelDiffs:
        """Prove this process alive and keep its entries; diffs of entries it cleaned up or restored."""
        ...

    async def sweep(self) -> ChannelDiffs:
        """Remove the entries of dead processes; their leave diffs, one per channel."""
        ...

    async def run_maintenance(self, stop_event: asyncio.Event, on_leaves: OnLeaves) -> None:
        """Heartbeat and sweep until ``stop_event`` is set, handing their diffs to ``on_leaves``."""
        ...

    async def close(self) -> None:
        """Close the Redis connections of the running event loop."""
        ...


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _texts(values: Iterable[bytes | str]) -> list[str]:
    return [_text(value) for value in values]


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), CHUNK_SIZE):
        yield items[start : start + CHUNK_SIZE]


def _joins_by_channel(entries: Sequence[Entry]) -> ChannelDiffs:
    by_channel: dict[str, list[Diff]] = {}
    for entry in entries:
        by_channel.setdefault(entry.channel, []).append(join_diff(entry.key, entry.meta))
    return [(channel, merge_diffs(*diffs)) for channel, diffs in by_channel.items()]


def _leaves_by_channel(entries: Sequence[Entry]) -> ChannelDiffs:
    by_channel: dict[str, list[Diff]] = {}
    for entry in entries:
        by_channel.setdefault(entry.channel, []).append(leave_diff(entry.key, entry.meta))
    return [(channel, merge_diffs(*diffs)) for channel, diffs in by_channel.items()]


@dataclass(frozen=True, slots=True)
class _Cleanup:
    """An entry to remove once Redis answers again, and the entry its write may have replaced."""

    entry: Entry
    replaced: Entry | None = None


class RedisPresenceStore:
    """``PresenceStore`` on Redis, shared by every process that uses the same server.

    Args:
        url: the Redis URL.
        process_id: unique per store instance (one per process and event
            loop), never reused; a sweeper treats every entry under it as
            owned by one instance.
        ttl: seconds within which a dead process's members are swept.
        sweep_interval: how often ``run_maintenance`` sweeps; by default the
            smaller of ``MAX_SWEEP_INTERVAL`` and ``ttl / 5``. The liveness
            key lives ``ttl - sweep_interval`` so that a sweep lands within ``ttl``.
        **redis_options: passed to ``redis.asyncio.Redis.from_url``.
    """

    def __init__(
        self,
        url: str,
        process_id: str,
        ttl: float = DEFAULT_TTL,
        *,
        sweep_interval: float | None = None,
        **redis_options: Any,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl!r}")
        if sweep_interval is None:
            sweep_interval = min(MAX_SWEEP_INTERVAL, ttl / 5)
        if not 0 < sweep_interval <= ttl / 2:
            raise ValueError(f"sweep_interval must be in (0, ttl/2], got {sweep_interval!r} for ttl {ttl!r}")
        self.url = url
        self.process_id = process_id
        self.ttl = ttl
        self.sweep_interval = sweep_interval
        self.heartbeat_interval = ttl / 3
        self.liveness_ms = max(1, int((ttl - sweep_interval) * 1000))
        self.entry_ttl_ms = max(1, int(ttl * ENTRY_TTL_FACTOR * 1000))
        self.retry_interval = min(1.0, self.heartbeat_interval / 2)
        self._redis_options: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": 5,
            "socket_connect_timeout": 5,
            # redis-py re-sends a whole command or pipeline after a connection error by default; a
            # script that ran but whose reply was lost would then run twice (a second join, no
            # leave). A failed call raises instead, and the heartbeat repairs what it left.
            "retry": Retry(NoBackoff(), 0),
            **redis_options,
        }
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Redis] = weakref.WeakKeyDictionary()
        self._batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ScriptBatch] = weakref.WeakKeyDictionary()
        # socket id -> channel -> the entry this process last wrote for it.
        self._local: dict[str, dict[str, Entry]] = {}
        # phx_ref -> an entry whose write or removal failed; heartbeat() removes it.
        self._pending: dict[str, _Cleanup] = {}
        # (socket id, channel) -> writes of its entry on their way to Redis; a heartbeat restores none meanwhile.
        self._writing: dict[tuple[str, str], int] = {}
        # Loop time until which this process's liveness key surely lived, after its last write.
        self._alive_until: float | None = None
        # This process may have been swept: the next heartbeat restores its missing entries.
        self._lapsed = False

    def __repr__(self) -> str:
        return f"RedisPresenceStore(process_id={self.process_id!r}, ttl={self.ttl!r})"

    # Connections

    def _client(self) -> Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # A blocking pool waits for a free connection during a burst of
            # tracks instead of failing them (redis-py's default pool raises).
            options = dict(self._redis_options)
            pool = BlockingConnectionPool.from_url(
                self.url, max_connections=options.pop("max_connections", 100), timeout=10, **options
            )
            client = Redis.from_pool(pool)
            self._clients[loop] = client
        return client

    async def close(self) -> None:
        self._batches.pop(asyncio.get_running_loop(), None)
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    async def _eval(self, script: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run a script of ``presence.scripts``; calls made while others are on their way share one pipeline."""
        loop = asyncio.get_running_loop()
        batch = self._batches.get(loop)
        if batch is None:
            batch = self._batches[loop] = ScriptBatch(self._client())
        return await batch.call(script, keys, args)

    def _wrote_liveness(self, started: float) -> None:
        """Note a liveness write sent at loop time ``started``; one sent after the key could expire is a lapse."""
        if self._alive_until is not None and started >= self._alive_until:
            self._lapsed = True
        self._alive_until = started + self.liveness_ms / 1000

    # Tracking

    def tracked(self, socket_id: str) -> dict[str, Entry]:
        return dict(self._local.get(socket_id, {}))

    async def track(self, channel: str, key: str, socket_id: str, payload: Mapping[str, Any]) -> TrackResult:
        previous = self._local.get(socket_id, {}).get(channel)
        phx_ref = new_phx_ref()
        payload_signature = signature(payload)
        joined = Entry(
            channel=channel,
            key=key,
            phx_ref=phx_ref,
            meta=make_meta(payload, phx_ref),
            socket_id=socket_id,
            process_id=self.process_id,
            joined_at=time.time(),
        )
        updated = joined if previous is None else replace(joined, joined_at=previous.joined_at)
        old_key = key if previous is None else previous.key
        started = asyncio.get_running_loop().time()
        try:
            kind, old_raw = await self._eval_writing(
                socket_id,
                channel,
                scripts.TRACK,
                [
                    process_key(self.process_id),
                    processes_key(),
                    process_members_key(self.process_id),
                    channels_key(),
                    member_key(channel, key),
                    channel_index_key(channel),
                    member_key(channel, old_key),
                ],
                [
                    self.process_id,
                    self.liveness_ms,
                    self.entry_ttl_ms,
                    channel,
                    "" if previous is None else previous.phx_ref,
                    "" if previous is None else owner_ref(channel, previous.key, previous.phx_ref),
                    phx_ref,
                    owner_ref(channel, key, phx_ref),
                    encode_entry(joined, payload_signature),
                    encode_entry(updated, payload_signature),
                    payload_signature,
                ],
            )
        except REDIS_ERRORS:
            # The script may have run: remove whatever it wrote, and the entry it replaced.
            self._pending[phx_ref] = _Cleanup(joined, previous)
            if previous is not None:
                self._forget(previous)
            raise
        self._wrote_liveness(started)
        old = decode_entry(old_raw) if old_raw else None
        if kind == TrackKind.UNCHANGED.value and old is not None:
            self._local.setdefault(socket_id, {})[channel] = old
            return TrackResult(TrackKind.UNCHANGED, old, None)
        if kind == TrackKind.UPDATED.value and old is not None:
            self._local.setdefault(socket_id, {})[channel] = updated
            if old.key == key:
                diff = update_diff(key, updated.meta, old.meta)
            else:
                diff = merge_diffs(leave_diff(old.key, old.meta), join_diff(key, updated.meta))
            return TrackResult(TrackKind.UPDATED, updated, diff, old)
        self._local.setdefault(socket_id, {})[channel] = joined
        return TrackResult(TrackKind.JOINED, joined, join_diff(key, joined.meta))

    async def untrack(self, channel: str, socket_id: str) -> Diff | None:
        """Remove the socket's entry on ``channel``.

        Raises:
            RedisError, OSError: Redis failed; the entry is then removed by a
                later ``heartbeat`` and its leave diff reported there.
        """
        entry = self._local.get(socket_id, {}).get(channel)
        if entry is None:
            return None
        try:
            removed = await self._remove_entry(entry, self.process_id)
        except REDIS_ERRORS:
            self._pending[entry.phx_ref] = _Cleanup(entry)
            raise
        finally:
            self._forget(entry)
        return None if removed is None else leave_diff(removed.key, removed.meta)

    async def untrack_socket(self, socket_id: str) -> ChannelDiffs:
        """Remove every entry of a closed socket.

        Entries whose removal fails are logged and retried by ``heartbeat``,
        which reports their leave diffs.
        """
        removed: list[Entry] = []
        for entry in list(self._local.get(socket_id, {}).values()):
            try:
                gone = await self._remove_entry(entry, self.process_id)
            except REDIS_ERRORS as exc:
                logger.warning("presence: untrack of socket %s on %s failed, will retry: %s", socket_id, entry.channel, exc)
                self._pending[entry.phx_ref] = _Cleanup(entry)
                continue
            finally:
                self._forget(entry)
            if gone is not None:
                removed.append(gone)
        return [(gone.channel, leave_diff(gone.key, gone.meta)) for gone in removed]

    async def untrack_all(self) -> ChannelDiffs:
        """Remove every entry this process tracks (graceful shutdown); leave diffs per channel."""
        diffs: ChannelDiffs = []
        for socket_id in list(self._local):
            diffs.extend(await self.untrack_socket(socket_id))
        return diffs

    def _forget(self, entry: Entry) -> None:
        channels = self._local.get(entry.socket_id)
        if channels is not None and channels.get(entry.channel) == entry:
            del channels[entry.channel]
            if not channels:
                del self._local[entry.socket_id]

    async def _eval_writing(
        self, socket_id: str, channel: str, script: str, keys: Sequence[str], args: Sequence[Arg]
    ) -> Any:
        """``_eval`` of a script that writes the socket's entry on ``channel``; a heartbeat restores none meanwhile."""
        writing = (socket_id, channel)
        self._writing[writing] = self._writing.get(writing, 0) + 1
        try:
            return await self._eval(script, keys, args)
        finally:
            if self._writing[writing] == 1:
                del self._writing[writing]
            else:
                self._writing[writing] -= 1

    async def _remove_entry(self, entry: Entry, owner: str) -> Entry | None:
        raw = await self._eval_writing(
            entry.socket_id,
            entry.channel,
            scripts.REMOVE,
            [
                member_key(entry.channel, entry.key),
                channel_index_key(entry.channel),
                channels_key(),
                process_members_key(owner),
            ],
            [entry.phx_ref, owner_ref(entry.channel, entry.key, entry.phx_ref), entry.channel],
        )
        return decode_entry(raw) if raw else None

    # Reading

    async def list(self, channel: str) -> Entries:
        client = self._client()
        members = sorted(_texts(await client.smembers(channel_index_key(channel))))
        if not members:
            return []
        pipe = client.pipeline(transaction=False)
        for member in members:
            pipe.hvals(member)
        entries: Entries = []
        for values in await pipe.execute():
            for raw in values:
                entry = decode_entry(raw)
                if entry is not None and entry.channel == channel:
                    entries.append(entry)
        entries.sort(key=lambda e: (e.joined_at, e.phx_ref))
        return entries

    async def state(self, channel: str) -> Presences:
        return presence_state(await self.list(channel))

    async def channels(self) -> ChannelCounts:
        client = self._client()
        names = sorted(_texts(await client.smembers(channels_key())))
        if not names:
            return []
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.smembers(channel_index_key(name))
        indexes: list[list[str]] = [sorted(members) for members in await pipe.execute()]
        pipe = client.pipeline(transaction=False)
        for members in indexes:
            for member in members:
                pipe.hlen(member)
        lengths: list[int] = await pipe.execute()
        counts: ChannelCounts = []
        position = 0
        for name, members in zip(names, indexes):
            count = sum(lengths[position : position + len(members)])
            position += len(members)
            if count:
                counts.append((name, count))
            else:
                await self._eval(scripts.PRUNE, [channel_index_key(name), channels_key(), *members], [name])
        return counts

    async def remove(self, channel: str, key: str, phx_ref: str) -> Diff | None:
        raw = await self._client().hget(member_key(channel, key), phx_ref)
        entry = decode_entry(_text(raw)) if raw else None
        if entry is None or (entry.channel, entry.key) != (channel, key):
            return None
        removed = await self._remove_entry(entry, entry.process_id)
        if removed is None:
            return None
        self._forget(removed)
        return leave_diff(removed.key, removed.meta)

    # Liveness

    async def heartbeat(self) -> ChannelDiffs:
        """Refresh this process's liveness key and the expiry of the entries it owns.

        Also forgets the entries another process ``remove``d and completes
        the cleanups of failed ``track`` and ``untrack`` calls, returning the
        leave diffs of those cleanups. After a lapse (the liveness key was
        gone, or this write came later than it lived) a missing entry was
        swept while its socket stayed connected: it is restored instead, and
        its join diff returned.
        """
        started = asyncio.get_running_loop().time()
        existed = await self._eval(
            scripts.LIVENESS, [process_key(self.process_id), processes_key()], [self.process_id, self.liveness_ms]
        )
        if not existed:
            self._lapsed = True
        self._wrote_liveness(started)
        if self._lapsed and self._local:
            logger.warning("presence: process %s missed its heartbeats and may have been swept", self.process_id)
        removed = await self._clean_up()
        restored = await self._refresh()
        return _leaves_by_channel(removed) + _joins_by_channel(restored)

    async def _clean_up(self) -> Entries:
        removed: Entries = []
        for phx_ref, cleanup in list(self._pending.items()):
            gone = await self._remove_entry(cleanup.entry, self.process_id)
            if cleanup.replaced is not None:
                old = await self._remove_entry(cleanup.replaced, self.process_id)
                if old is None and gone is not None:
                    # The lost write replaced it, unannounced; receivers still show it.
                    old = cleanup.replaced
                if old is not None:
                    removed.append(old)
            if gone is not None:
                removed.append(gone)
            del self._pending[phx_ref]
        return removed

    async def _refresh(self) -> Entries:
        """Extend the expiry of this process's entries; returns those it wrote back after a lapse.

        An entry missing from Redis was removed elsewhere: forgotten, unless
        this process lapsed, when a sweep took it while its socket stayed
        connected and it is restored instead.
        """
        restore, self._lapsed = self._lapsed, False
        entries = [entry for channels in self._local.values() for entry in channels.values()]
        restored: Entries = []
        try:
            for chunk in _chunks(entries):
                keys: list[str] = []
                for entry in chunk:
                    keys += [member_key(entry.channel, entry.key), channel_index_key(entry.channel)]
                missing = await self._eval(scripts.REFRESH, keys, [self.entry_ttl_ms, *(e.phx_ref for e in chunk)])
                gone = [chunk[int(position) - 1] for position in missing]
                if restore:
                    restored += await self._restore(gone)
                    continue
                for entry in gone:
                    logger.warning(
                        "presence: entry %s of socket %s on %s was removed elsewhere", entry.phx_ref, entry.socket_id, entry.channel
                    )
                    self._forget(entry)
        except BaseException:
            self._lapsed = self._lapsed or restore
            raise
        if restored:
            logger.warning("presence: restored %d entries of process %s swept while it was unresponsive", len(restored), self.process_id)
        return restored

    async def _restore(self, entries: Sequence[Entry]) -> Entries:
        """Write back swept entries that are still this process's (same ``phx_ref``); returns those written.

        An entry whose socket is re-tracking or untracking it, or did since, is
        left to that write. Nothing awaits between that check and the script
        going out, so a later track or untrack reaches Redis after it.
        """
        current = [
            entry
            for entry in entries
            if self._local.get(entry.socket_id, {}).get(entry.channel) == entry
            and (entry.socket_id, entry.channel) not in self._writing
        ]
        if not current:
            return []
        keys = [process_members_key(self.process_id), channels_key()]
        args: list[str | int] = [self.entry_ttl_ms]
        for entry in current:
            keys += [member_key(entry.channel, entry.key), channel_index_key(entry.channel)]
            payload = {name: value for name, value in entry.meta.items() if name != PHX_REF}
            args += [
                entry.phx_ref,
                owner_ref(entry.channel, entry.key, entry.phx_ref),
                entry.channel,
                encode_entry(entry, signature(payload)),
            ]
        written = await self._eval(scripts.RESTORE, keys, args)
        return [current[int(position) - 1] for position in written]

    async def sweep(self) -> ChannelDiffs:
        """Remove the entries of processes whose liveness key expired.

        Safe to run from several processes at once: each entry is removed, and
        its leave reported, by exactly one sweeper.
        """
        candidates = await self._eval(scripts.CANDIDATES, [processes_key()], [])
        removed: list[Entry] = []
        for process_id in candidates:
            if process_id != self.process_id:
                removed.extend(await self._sweep_process(process_id))
        return _leaves_by_channel(removed)

    async def _sweep_process(self, process_id: str) -> Entries:
        owned_key = process_members_key(process_id)
        refs: list[tuple[str, tuple[str, str, str]]] = []
        for raw in sorted(_texts(await self._client().smembers(owned_key))):
            parsed = parse_owner_ref(raw)
            if parsed is not None:
                refs.append((raw, parsed))
        removed: list[Entry] = []
        for chunk in list(_chunks(refs)) or [[]]:
            keys = [process_key(process_id), owned_key, processes_key(), channels_key()]
            args: list[str] = [process_id]
            for raw, (channel, key, phx_ref) in chunk:
                keys += [member_key(channel, key), channel_index_key(channel)]
                args += [phx_ref, raw, channel]
            result = await self._eval(scripts.SWEEP, keys, args)
            if result is None:
                break  # the process heartbeated again: it is alive
            removed.extend(entry for entry in map(decode_entry, result) if entry is not None)
        if removed:
            logger.info("presence: swept %d entries of dead process %s", len(removed), process_id)
        return removed

    async def run_maintenance(self, stop_event: asyncio.Event, on_leaves: OnLeaves) -> None:
        """Heartbeat every ``ttl / 3`` s and sweep every ``sweep_interval`` s until ``stop_event`` is set.

        Redis errors are logged and the step retried after ``retry_interval``;
        each diff, from either step, is passed to ``on_leaves(channel, diff)``.
        """
        await maintenance.run_maintenance(self, stop_event, on_leaves)
