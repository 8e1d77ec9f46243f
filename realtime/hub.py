"""Per-process fan-out of broadcasts, presence diffs and changes to the local sockets.

A stock consumer per socket would join every group itself and receive each
message through the channel layer once per socket (200-300 us of CPU per
delivery). Instead one ``Hub`` per event loop joins each topic's (or table's)
group once, receives each message once for the whole process, encodes each
frame shape once (vsn 1.0.0 text, vsn 2.0.0 text, vsn 2.0.0 binary) and hands
the same ASGI message to every local socket. Changes are routed per table
through ``TableRoute``, which indexes filtered bindings by their eq value.
Groups stay the cross-process mechanism; nothing here knows about SQL or tokens.

Row level security: each channel with postgres_changes belongs to a claim set
(its role and claims), registered per table in the process's ``Registration``
so the replicator checks each claim set once per run of changes. A run from a
table with RLS carries the verdicts; a claim set the replicator did not check
(it read the registry before the channel registered, or all its channels
filter, which the replicator leaves to this process) is checked here through
``row_check``, once per run for all of them that a change of the run is routed
to, never skipped. A claim set whose
check failed (a policy raised or timed out) gets nothing of that run: each of
its channels the run would reach gets one ``system`` error instead. A channel
whose role cannot read the table's primary key gets ``Error 401`` events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from channels.layers import BaseChannelLayer, get_channel_layer

from realtime.protocol.message import UserBroadcast, Vsn
from realtime.protocol.serializer import (
    encode_text_raw_payload,
    encode_user_broadcast,
    user_broadcast_as_json_payload,
)
from realtime.filters.index import BindingIndex
from realtime.bindings import select_columns
from shared import metrics
from realtime.cork import corked
from core.types import (
    ERROR_UNAUTHORIZED,
    MEMBERSHIP_CHECK_S,
    RECEIVE_RETRY_S,
    KIND_BINARY,
    KIND_PRESENCE,
    BroadcastMessage,
    BatchMessage,
    ChangeRun,
    checked_positions,
    error_data,
    verdict_per_change,
)
from realtime.privileges import NO_GRANTS, Grants, PrivilegeCache, fetch_grants
from core.topics import sub_topic, table_group
from realtime.writer import SocketWriter, frame_size

if TYPE_CHECKING:
    from shared.claimsets import Registration
    from core.jwt import Claims
    from shared.visibility import Verdicts

logger = logging.getLogger(__name__)

# (claim set -> claims, schema, table, primary keys as JSON) -> per claim set one byte per key
# (1 if visible), or its failure message (a policy raised or timed out).
RowCheck = Callable[[Mapping[str, "Claims"], str, str, list[bytes]], Awaitable["Verdicts"]]
UNABLE_TO_CHECK = "Realtime was unable to connect to the project database"

# channels_redis forgets a group membership group_expiry seconds after its
# last group_add (REALTIME_GROUP_EXPIRY_S), which is how a killed process
# leaves its groups; a live one re-adds every joined group three times per
# expiry, and at most every MEMBERSHIP_REFRESH_S. A Redis restart loses them
# all at once: a cheap check every few seconds notices and re-adds them
# without waiting for the next refresh.
MEMBERSHIP_REFRESH_S = 20.0
MEMBERSHIP_REFRESHES_PER_EXPIRY = 3
CLOSE_TIMEOUT_S = 2.0
LAYER_OPS_IN_FLIGHT = 64
# Runs of changes waiting for delivery: beyond this many, the hub stops receiving until they go out.
MAX_PENDING_RUNS = 256
# The hub's own checks of the runs waiting together are one database call per table while
# claim sets x keys stays under this (a call costs about 15 us per claim set and 1.2 us per
# claim set and key in PostgreSQL): one round trip per run was the limit at 1,000 changes/s.
CHECKS_PER_CALL = 20_000

Prepared = tuple[dict[str, bytes], dict[str, str], dict[int, dict["SubKey", list[int]]]]  # visible, failed, routes


@dataclass(eq=False, slots=True)
class Held:
    """A replaying join's live broadcasts, in arrival order, until the join is answered (PROTOCOL.md 5.5).

    Past ``max_bytes`` (the socket's unsent cap) nothing more is kept and the socket is closed at
    release as a slow consumer: frames are never dropped silently.
    """

    max_bytes: int
    frames: list[tuple[str | None, dict[str, Any]]] = field(default_factory=list)
    size: int = 0
    overflowed: bool = False

    def add(self, row_id: str | None, frame: dict[str, Any]) -> None:
        if self.overflowed:
            return
        self.size += frame_size(frame)
        if self.size > self.max_bytes:
            self.overflowed = True
            self.frames.clear()
            return
        self.frames.append((row_id, frame))


@dataclass(frozen=True, slots=True, eq=False)
class Subscription:
    """One channel (socket, topic) that receives a group's broadcasts."""

    socket_id: str
    topic: str
    vsn: Vsn
    self_broadcast: bool
    writer: SocketWriter
    # Ids of database broadcasts this channel replayed at join (PROTOCOL.md 5.5): not delivered again live.
    # At most the replay limit (25) per channel, for its lifetime.
    skip_ids: frozenset[str] = frozenset()
    # While its join reads the replay: live broadcasts wait here (``Hub.hold``/``Hub.release``).
    held: Held | None = None


@dataclass(eq=False, slots=True)
class ChangeSubscription:
    """One channel's postgres_changes bindings, each authorized for a set of tables."""

    socket_id: str
    topic: str
    vsn: Vsn
    writer: SocketWriter
    bindings: tuple[Any, ...]  # realtime.authorization.AuthorizedBinding
    claims: Claims | None = None  # for row level security checks
    claim_set: str = ""  # id of the claims in the registry (set by the hub)
    join_ref: str | None = None  # the channel's, for its system messages (PROTOCOL.md 2.2)

    def tables(self) -> set[tuple[str, str]]:
        return {table for b in self.bindings for table in b.tables}

    def filtered_tables(self) -> set[tuple[str, str]]:
        """The tables on which every binding of this channel has an ``eq`` filter (``shared.claimsets``).

        Only an ``eq`` condition bounds the changes routed to a channel, so
        only then is its claim set checked by this process, for those changes;
        any other filter (``gte``, ``match``, ...) may route every change, and
        its claim set is left to the replicator, which checks it once for all
        processes.
        """
        unfiltered = {
            table for b in self.bindings if b.matcher is None or b.matcher.eq_column is None for table in b.tables
        }
        return self.tables() - unfiltered


SubKey = tuple[str, str]  # (socket_id, topic)


class TableRoute:
    """The local channels bound to one table, with filtered bindings indexed by eq value.

    Most filtered subscribers use ``col=eq.value``; ``BindingIndex`` finds the
    few whose value matches a change instead of testing every subscriber.
    """

    def __init__(self, schema: str, table: str) -> None:
        self.schema = schema
        self.table = table
        self.subscriptions: dict[SubKey, ChangeSubscription] = {}
        self._unfiltered: dict[SubKey, list[Any]] = {}  # bindings without a filter, per channel
        self._filtered: dict[tuple[SubKey, int], Any] = {}
        self._index: BindingIndex[tuple[SubKey, int]] = BindingIndex()
        self.claim_sets: dict[str, tuple[Claims | None, int]] = {}  # claim set -> (claims, channels)
        self.members: dict[str, set[SubKey]] = {}  # claim set -> its channels here
        self.readable: dict[SubKey, frozenset[str]] = {}  # channels whose role may read only these columns

    def __bool__(self) -> bool:
        return bool(self.subscriptions)

    @property
    def filtered(self) -> bool:
        return bool(self._filtered)

    def add(self, key: SubKey, subscription: ChangeSubscription) -> None:
        self.remove(key)
        self.subscriptions[key] = subscription
        _, count = self.claim_sets.get(subscription.claim_set, (None, 0))
        self.claim_sets[subscription.claim_set] = (subscription.claims, count + 1)
        self.members.setdefault(subscription.claim_set, set()).add(key)
        for authorized in subscription.bindings:
            if (self.schema, self.table) not in authorized.tables:
                continue
            limit = authorized.readable.get((self.schema, self.table))
            if limit is not None:
                self.readable[key] = limit
            matcher = authorized.matcher
            if matcher is None:
                self._unfiltered.setdefault(key, []).append(authorized.binding)
            else:
                entry = (key, authorized.binding.id)
                self._filtered[entry] = authorized.binding
                self._index.add(entry, matcher, matcher.eq_column, matcher.eq_value)

    def remove(self, key: SubKey) -> None:
        subscription = self.subscriptions.pop(key, None)
        if subscription is None:
            return
        claims, count = self.claim_sets[subscription.claim_set]
        if count <= 1:
            del self.claim_sets[subscription.claim_set]
        else:
            self.claim_sets[subscription.claim_set] = (claims, count - 1)
        members = self.members.get(subscription.claim_set)
        if members is not None:
            members.discard(key)
            if not members:
                del self.members[subscription.claim_set]
        self._unfiltered.pop(key, None)
        self.readable.pop(key, None)
        for entry in [e for e in self._filtered if e[0] == key]:
            del self._filtered[entry]
            self._index.remove(entry)

    def columns(self, key: SubKey, ids: list[int]) -> frozenset[str] | None:
        """The columns a channel receives for a change matching ``ids``: None means all.

        A channel whose matching bindings all ``select`` columns, or whose role
        may read only some columns (C47), gets their union.
        """
        table = (self.schema, self.table)
        selected: frozenset[str] = frozenset()
        for authorized in self.subscriptions[key].bindings:
            if authorized.binding.id in ids:
                columns = authorized.columns_of(table)
                if columns is None:
                    return None
                selected |= columns
        return selected

    def route(
        self, change_type: str, record: Any, old_record: Any, among: Iterable[SubKey] | None = None
    ) -> dict[SubKey, list[int]]:
        """Channel -> ids of its bindings that the change satisfies (PROTOCOL.md 4.5 ``ids``).

        ``among``: only these channels' unfiltered bindings are looked at (the
        channels a row level security check let see the change); filtered ones
        are found through the index as always.
        """
        routed: dict[SubKey, list[int]] = {}
        if among is None:
            unfiltered: Iterable[tuple[SubKey, list[Any]]] = self._unfiltered.items()
        else:
            unfiltered = ((key, self._unfiltered[key]) for key in among if key in self._unfiltered)
        for key, bindings in unfiltered:
            ids = [b.id for b in bindings if b.accepts(change_type)]
            if ids:
                routed[key] = ids
        if self._filtered:
            # PROTOCOL.md 4.2: filters run on the new values; a DELETE has only old ones.
            row = old_record if change_type == "DELETE" else record
            if isinstance(row, dict):
                for entry in self._index.matches(row):
                    if self._filtered[entry].accepts(change_type):
                        routed.setdefault(entry[0], []).append(entry[1])
        for key, ids in routed.items():
            if len(ids) > 1:
                routed[key] = sorted(set(ids))
        return routed


class Frames:
    """The frames of one broadcast, each encoded at most once, on first use."""

    __slots__ = ("_message", "_v1", "_v2", "_done")

    def __init__(self, message: BroadcastMessage) -> None:
        self._message = message
        self._v1: dict[str, Any] | None = None
        self._v2: dict[str, Any] | None = None
        self._done: set[Vsn] = set()

    def for_vsn(self, vsn: Vsn) -> dict[str, Any] | None:
        """The ASGI ``websocket.send`` message for a receiver of ``vsn``, or None if it gets nothing."""
        if vsn not in self._done:
            self._done.add(vsn)
            frame = self._encode(vsn)
            if vsn is Vsn.V1:
                self._v1 = frame
            else:
                self._v2 = frame
        return self._v1 if vsn is Vsn.V1 else self._v2

    def bytes_out(self, written: int, members: tuple[Subscription, ...], origin: str, row_id: str | None) -> int:
        """The bytes of ``written`` frames of this broadcast, counted once per message instead of per write.

        One shape encoded (every receiver on one vsn, the usual case): exact. Both:
        the vsn 1 receivers are counted in a second pass (a failed write among them
        counts as written there).
        """
        v1, v2 = self._v1, self._v2
        if v1 is None or v2 is None:
            frame = v1 if v1 is not None else v2
            return written * frame_size(frame) if frame is not None else 0
        receivers_v1 = sum(
            1
            for sub in members
            if sub.vsn is Vsn.V1 and sub.held is None and (sub.socket_id != origin or sub.self_broadcast)
            and (row_id is None or row_id not in sub.skip_ids)
        )
        receivers_v1 = min(receivers_v1, written)
        return receivers_v1 * frame_size(v1) + (written - receivers_v1) * frame_size(v2)

    def _encode(self, vsn: Vsn) -> dict[str, Any] | None:
        message = self._message
        topic = message["topic"]
        if message["kind"] == KIND_BINARY:
            body = UserBroadcast(message["event"], message["encoding"], message["payload"], message.get("meta", b""))
            if vsn is Vsn.V2:
                try:
                    return {"type": "websocket.send", "bytes": encode_user_broadcast(topic, body)}
                except ValueError:
                    logger.warning("broadcast dropped: topic or event longer than 255 bytes topic=%s", topic)
                    return None
            # Every way into a broadcast checks a JSON body (kind 3, REST): splice it, do not parse it again.
            payload_json = user_broadcast_as_json_payload(body, validated=True)
            if payload_json is None:
                return None  # PROTOCOL.md 5.2: vsn 1 receivers get no raw binary
        else:
            payload_json = message["payload"].decode("utf-8")
        event = "presence_diff" if message["kind"] == KIND_PRESENCE else "broadcast"
        return {"type": "websocket.send", "text": encode_text_raw_payload(vsn, None, None, topic, event, payload_json)}


class Hub:
    """Joins each topic group once per process and writes its messages to local sockets."""

    def __init__(
        self,
        layer: BaseChannelLayer,
        registration: Registration | None = None,
        row_check: RowCheck | None = None,
        privileges: PrivilegeCache | None = None,
        process_group: str | None = None,
        disconnect: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._layer = layer
        # This process's own group: ``realtime.disconnect`` messages name a local socket to close.
        self._process_group = process_group
        self._disconnect = disconnect
        self._privileges = privileges
        self._registration = registration
        self._row_check = row_check
        self._channel_name: str | None = None
        self._started: asyncio.Lock = asyncio.Lock()
        self._groups: dict[str, dict[tuple[str, str], Subscription]] = {}
        # table group -> (socket_id, topic) -> change subscription
        self._change_groups: dict[str, TableRoute] = {}
        self._snapshots: dict[str, tuple[Subscription, ...]] = {}
        self._joined: set[str] = set()
        # Per-group lock and the number of reconciliations using it.
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending_runs: list[ChangeRun] = []  # received, not yet delivered (``realtime_changes``)
        self._runs_worker: asyncio.Future[None] | None = None
        # Group adds and discards in flight at once: a burst of sockets leaving (a reconnect
        # storm) must not take every connection of the layer's Redis pool.
        self._layer_ops = asyncio.Semaphore(LAYER_OPS_IN_FLIGHT)
        self._closing = False
        self._handlers: dict[str, Callable[[Any], Awaitable[None]]] = {
            "realtime.broadcast": self.realtime_broadcast,
            "realtime.batch": self.realtime_batch,
            "realtime.changes": self.realtime_changes,
            "realtime.disconnect": self.realtime_disconnect,
        }
        self.delivered = 0
        self.delivered_bytes = 0
        self.failed = 0  # writes that raised, and deliveries skipped because building them raised
        self.loop_errors = 0  # layer messages whose handling raised
        self._flushed = (0, 0, 0)  # delivered, delivered_bytes, failed as last added to the metrics

    # --- membership ------------------------------------------------------

    async def subscribe(self, group: str, subscription: Subscription) -> None:
        """Add a local subscriber; returns once the process is a member of ``group``."""
        await self._ensure_started()
        self._groups.setdefault(group, {})[(subscription.socket_id, subscription.topic)] = subscription
        self._snapshots.pop(group, None)
        await self._reconcile(group)

    def subscription(self, group: str, socket_id: str, topic: str) -> Subscription | None:
        """The channel's entry in ``group``, if it has one."""
        members = self._groups.get(group)
        return members.get((socket_id, topic)) if members else None

    def release(self, group: str, hold: Subscription, previous: Subscription | None) -> None:
        """Write what was held for a replaying join, in order, and deliver its broadcasts live from now on.

        ``hold`` (with ``held`` set) was subscribed before the join read its replay, in the place of
        ``previous``.
        The join's own subscription (its ``Subscribe``, passed the same ``Held``) gets the held
        broadcasts minus the rows it replayed. A join that did not open gives its place back to
        ``previous`` (which gets them instead) or leaves the group.
        """
        key = (hold.socket_id, hold.topic)
        members = self._groups.get(group)
        current = members.get(key) if members else None
        if current is None or members is None:
            return  # left meanwhile
        if current is hold:
            if previous is None:
                self.unsubscribe(group, *key)
                return
            target = previous
        elif current.held is not None and current.held is hold.held:
            target = replace(current, held=None)
        else:
            return  # a later join of the channel took its place
        members[key] = target
        self._snapshots.pop(group, None)
        held = hold.held
        assert held is not None
        if held.overflowed:
            logger.warning("slow consumer: live broadcasts held during a replay passed the unsent cap socket=%s", hold.socket_id)
            target.writer.overflow()
            return
        for row_id, frame in held.frames:
            if row_id is None or row_id not in target.skip_ids:
                self._write(target, frame)
        held.frames.clear()

    def unsubscribe(self, group: str, socket_id: str, topic: str) -> None:
        """Drop a local subscriber; the group is left in the background once empty."""
        members = self._groups.get(group)
        if members is None or members.pop((socket_id, topic), None) is None:
            return
        self._snapshots.pop(group, None)
        if not members:
            del self._groups[group]
            if not self._wanted(group):
                self._spawn(self._reconcile(group))

    async def subscribe_changes(self, subscription: ChangeSubscription) -> None:
        """Register a channel's bindings; returns once every table's group is joined.

        A channel re-subscribing (new bindings or claims) replaces its earlier
        subscription; its claim set is registered before this returns.
        """
        await self._ensure_started()
        key = (subscription.socket_id, subscription.topic)
        tables = {table_group(schema, table): (schema, table) for schema, table in subscription.tables()}
        if self._registration is not None and subscription.claims is not None:
            subscription.claim_set = await self._registration.add(
                tables.values(), subscription.claims, subscription.filtered_tables()
            )
        if self._privileges is not None and subscription.claims is not None:
            # Known before the first change arrives: delivery never waits for them.
            for schema, table in tables.values():
                await self._privileges.grants(subscription.claims.role, schema, table)
        previous = {g: route.subscriptions[key] for g, route in self._change_groups.items() if key in route.subscriptions}
        for group, old in previous.items():
            if group in tables:  # replaced below; the stale ones are unregistered as they are dropped
                self._unregister(self._change_groups[group], old)
        stale = [g for g in previous if g not in tables]
        for group, (schema, table) in tables.items():
            route = self._change_groups.get(group)
            if route is None:
                route = self._change_groups[group] = TableRoute(schema, table)
            route.add(key, subscription)
        for group in sorted(tables):
            await self._reconcile(group)
        for group in stale:
            self._drop_change_member(group, key)

    def unsubscribe_changes(self, socket_id: str, topic: str) -> None:
        key = (socket_id, topic)
        for group in [g for g, route in self._change_groups.items() if key in route.subscriptions]:
            self._drop_change_member(group, key)

    def _drop_change_member(self, group: str, key: SubKey) -> None:
        route = self._change_groups[group]
        subscription = route.subscriptions.get(key)
        if subscription is not None:
            self._unregister(route, subscription)
        route.remove(key)
        if not route:
            del self._change_groups[group]
            if self._privileges is not None:
                self._privileges.forget(route.schema, route.table)
            if not self._wanted(group):
                self._spawn(self._reconcile(group))

    def _unregister(self, route: TableRoute, subscription: ChangeSubscription) -> None:
        """Count one channel of its claim set off the route's table in the registry (in the background)."""
        if self._registration is not None and subscription.claim_set:
            self._spawn(self._registration.remove(
                [(route.schema, route.table)], subscription.claim_set, subscription.filtered_tables()
            ))

    def _wanted(self, group: str) -> bool:
        return group in self._groups or group in self._change_groups or group == self._process_group

    async def _reconcile(self, group: str) -> None:
        """Make the process's membership of ``group`` match whether it has local subscribers."""
        lock, waiting = self._locks.get(group, (asyncio.Lock(), 0))
        self._locks[group] = (lock, waiting + 1)
        try:
            async with lock, self._layer_ops:
                wanted = self._wanted(group)
                assert self._channel_name is not None
                if wanted and group not in self._joined:
                    await self._layer.group_add(group, self._channel_name)
                    self._joined.add(group)
                elif not wanted and group in self._joined:
                    try:
                        await self._layer.group_discard(group, self._channel_name)
                    except Exception:
                        # Try again later; the membership stays in Redis meanwhile, and the hub drops
                        # what arrives for a group without local subscribers.
                        logger.warning("hub could not leave group %s; retrying", group, exc_info=True)
                        asyncio.get_running_loop().call_later(RECEIVE_RETRY_S, lambda: self._spawn(self._reconcile(group)))
                        return
                    self._joined.discard(group)
        finally:
            lock, waiting = self._locks[group]
            if waiting == 1:
                del self._locks[group]
            else:
                self._locks[group] = (lock, waiting - 1)

    # --- receiving -------------------------------------------------------

    async def _ensure_started(self) -> None:
        if self._channel_name is not None:
            return
        async with self._started:
            if self._channel_name is None:
                self._channel_name = await self._layer.new_channel("hub.")
                if self._process_group is not None:
                    await self._reconcile(self._process_group)
                self._spawn(self._receive_forever())
                self._spawn(self._refresh_forever())

    async def _receive_forever(self) -> None:
        """Receive each layer message once for the process and dispatch it by type (``a.b`` -> ``a_b``).

        Supervised: a message that makes its handler raise is logged with its
        traceback and counted, and the loop goes on with the next one.
        """
        assert self._channel_name is not None
        while not self._closing:
            try:
                message = await self._layer.receive(self._channel_name)
            except Exception:
                if self._closing:
                    return  # redis-py turns our cancellation into a TimeoutError
                logger.exception("hub receive failed; retrying in %.1fs", RECEIVE_RETRY_S)
                await asyncio.sleep(RECEIVE_RETRY_S)
                continue
            kind = message.get("type")
            handler = self._handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                logger.warning("hub dropped a layer message of unknown type %r", kind)
                continue
            try:
                await handler(message)
            except Exception:
                self.loop_errors += 1
                metrics.hub_loop_errors.inc()
                logger.exception("hub failed on a %s message; going on with the next one", kind)
            self.flush_metrics()

    def flush_metrics(self) -> None:
        """Add the deliveries since the last call to the metrics: once per layer message, not per write."""
        delivered, sent, failed = self.delivered, self.delivered_bytes, self.failed
        last_delivered, last_sent, last_failed = self._flushed
        if delivered != last_delivered:
            metrics.deliveries.inc(delivered - last_delivered)
            metrics.delivered_bytes.inc(sent - last_sent)
        if failed != last_failed:
            metrics.delivery_failures.inc(failed - last_failed)
        self._flushed = (delivered, sent, failed)

    async def realtime_broadcast(self, message: BroadcastMessage) -> None:
        self.deliver(message)

    async def realtime_batch(self, message: BatchMessage) -> None:
        with corked():  # one write per socket for the whole batch
            for item in message["messages"]:
                self.deliver(item)

    async def realtime_changes(self, message: ChangeRun) -> None:
        """Queue a run; a worker delivers the queue in order, checking the runs that wait together at once."""
        self._pending_runs.append(message)
        if self._runs_worker is None or self._runs_worker.done():
            self._runs_worker = asyncio.ensure_future(self._deliver_pending())
            self._tasks.add(self._runs_worker)
            self._runs_worker.add_done_callback(self._task_done)
        while len(self._pending_runs) >= MAX_PENDING_RUNS and not self._runs_worker.done():
            await asyncio.sleep(0.002)  # receive no more until these went out (the layer holds the rest)

    async def _deliver_pending(self) -> None:
        while self._pending_runs:
            runs, self._pending_runs = self._pending_runs, []
            try:
                prepared = await self._check_together(runs)
            except Exception:
                logger.exception("hub could not check %d runs together; checking them one by one", len(runs))
                prepared = {}
            for run in runs:
                try:
                    await self.deliver_changes(run, prepared.get(id(run)))
                except Exception:
                    self.loop_errors += 1
                    metrics.hub_loop_errors.inc()
                    logger.exception("hub failed on a realtime.changes message; going on with the next one")
                self.flush_metrics()

    async def realtime_disconnect(self, message: dict[str, Any]) -> None:
        """Close a local socket by id (the admin's Disconnect); nothing if it is gone or not here."""
        socket_id = message.get("socket_id")
        if self._disconnect is not None and isinstance(socket_id, str):
            # In the background: a close may wait for the peer's closing handshake (seconds under
            # uvicorn), and the receive loop must not hold every other socket's messages meanwhile.
            self._spawn(self._disconnect(socket_id))

    async def _refresh_forever(self) -> None:
        """Keep memberships alive; re-add them all at once when Redis lost them (a restart)."""
        group_expiry = getattr(self._layer, "group_expiry", None) or float("inf")
        every = min(MEMBERSHIP_REFRESH_S, group_expiry / MEMBERSHIP_REFRESHES_PER_EXPIRY)
        loop = asyncio.get_running_loop()
        refreshed_at = loop.time()
        while True:
            await asyncio.sleep(min(MEMBERSHIP_CHECK_S, every))
            # Wall time, not a count of sleeps: after a stalled loop the refresh is due at once.
            since_refresh = loop.time() - refreshed_at
            try:
                lost = await self._memberships_lost()
            except Exception:
                logger.warning("hub could not check its group memberships", exc_info=True)
                continue
            if lost:
                logger.warning("hub group memberships were lost (Redis restarted?); re-adding %d", len(self._joined))
            if lost or since_refresh >= every:
                refreshed_at = loop.time()
                await self._refresh_all()

    async def _memberships_lost(self) -> bool:
        """Whether Redis no longer lists this process in one of its groups (all go at once in a restart)."""
        if not self._joined or self._channel_name is None:
            return False
        has_member = getattr(self._layer, "has_member", None)  # realtime.layer; channels' layers have no lookup
        if has_member is None:
            return False
        # A topic's group if the process has one: the probe is about delivery, and the process's own
        # group (joined first) would hide a lost topic group for as long as the process lives.
        probe = next((group for group in self._joined if group != self._process_group), None) or next(iter(self._joined))
        return not await has_member(probe, self._channel_name)

    async def _refresh_all(self) -> None:
        assert self._channel_name is not None
        refresh_groups = getattr(self._layer, "refresh_groups", None)  # realtime.layer: one pipeline
        if refresh_groups is not None:
            try:
                await refresh_groups(list(self._joined), self._channel_name)
            except Exception:
                logger.exception("hub could not refresh its %d groups", len(self._joined))
            return
        for group in list(self._joined):
            try:
                assert self._channel_name is not None
                await self._layer.group_add(group, self._channel_name)
            except Exception:
                logger.exception("hub could not refresh group %s", group)

    # --- delivery --------------------------------------------------------

    def deliver(self, message: BroadcastMessage) -> None:
        """Write one broadcast to every local channel on its topic (never waits for a socket)."""
        group_members = self._members(message["group"])
        if not group_members:
            return
        frames = Frames(message)
        origin = message["origin"]
        row_id = message.get("id")
        before = self.delivered
        for sub in group_members:
            if sub.socket_id == origin and not sub.self_broadcast:
                continue
            if row_id is not None and row_id in sub.skip_ids:
                continue
            frame = frames.for_vsn(sub.vsn)
            if frame is not None:
                if sub.held is not None:
                    sub.held.add(row_id, frame)
                else:
                    self._send(sub, frame)
        written = self.delivered - before
        if written:
            self.delivered_bytes += frames.bytes_out(written, group_members, origin, row_id)

    async def deliver_changes(self, run: ChangeRun, prepared: Prepared | None = None) -> None:
        """Write each change of a run to every local channel whose bindings it satisfies.

        ``prepared``: the run's verdicts, already completed by ``_check_together``.
        """
        route = self._change_groups.get(run["group"])
        if not route:
            return
        metrics.changes_received.inc(len(run["changes"]))
        grants = self._grants(route)
        rls = run.get("rls", False)
        routes: dict[int, dict[SubKey, list[int]]] = {}  # position -> its routing, when _visibility needed it
        if prepared is not None and rls:
            visible, failed, routes = prepared
        else:
            visible, failed = await self._visibility(route, run, routes) if rls else ({}, {})
        unauthorized = self._key_unreadable(route, run)
        notified: set[SubKey] = set()  # channels told this run's check failed (once per run)
        seers = _seers(route, run, visible, failed) if rls else {}
        with corked():
            for position, change in enumerate(run["changes"]):
                try:
                    self._deliver_change(
                        route, change, rls and "key" in change, visible, position, failed, unauthorized, notified,
                        grants, routes.get(position), seers.get(position),
                    )
                except Exception:
                    # One bad change costs only itself; the run's other changes still go out.
                    self.failed += 1
                    logger.exception("change dropped on %s.%s", route.schema, route.table)

    def _deliver_change(
        self,
        route: TableRoute,
        change: dict[str, Any],
        checked: bool,
        visible: dict[str, bytes],
        position: int,
        failed: Mapping[str, str],
        unauthorized: Mapping[SubKey, list[Any]],
        notified: set[SubKey],
        grants: Mapping[str, Grants] | None = None,
        routed: dict[SubKey, list[int]] | None = None,
        seers: set[SubKey] | None = None,
    ) -> None:
        """``routed``: ``route.route`` of this change, if already known; ``seers``: for a checked
        change, the only channels that can get it (``_seers``), so the others are not looked at."""
        change_type = change["type"]
        data_json = change["data"].decode("utf-8")
        # PROTOCOL.md 4.4 step 3: a role that cannot read the key gets Error 401, with no filter or RLS check.
        denied: Mapping[SubKey, list[Any]] = unauthorized if change_type != "DELETE" else {}
        if denied:
            error_json = json.dumps(error_data(route.schema, route.table, change_type, ERROR_UNAUTHORIZED))
            for key, bindings in denied.items():
                ids = sorted({b.id for b in bindings if b.accepts(change_type)})
                sub = route.subscriptions.get(key)
                if ids and sub is not None:
                    payload = '{"ids":' + json.dumps(ids) + ',"data":' + error_json + "}"
                    text = encode_text_raw_payload(sub.vsn, None, None, sub.topic, "postgres_changes", payload)
                    self._write(sub, {"type": "websocket.send", "text": text})
        record = old_record = None
        if route.filtered and routed is None:
            # numeric values are JSON numbers with every digit: Decimal keeps them for the filters.
            parsed = json.loads(data_json, parse_float=Decimal)
            record, old_record = parsed.get("record"), parsed.get("old_record")
        # Channels with the same topic, ids, columns and vsn get the same frame: build it once.
        frames: dict[tuple[Vsn, str, tuple[int, ...], frozenset[str] | None], dict[str, Any]] = {}
        if routed is None:
            routed = route.route(change_type, record, old_record, seers if checked else None)
        for key, ids in routed.items():
            sub = route.subscriptions.get(key)
            if sub is None or key in denied:
                continue
            message = failed.get(sub.claim_set)
            if message is not None and key not in unauthorized:
                # The claim set's check failed: nothing of this run, and one system error per channel.
                if key not in notified:
                    notified.add(key)
                    self._write(sub, _system_error(sub, message))
                continue
            if checked:
                verdict = visible.get(sub.claim_set)
                if verdict is None or not verdict[position]:
                    continue  # PROTOCOL.md 4.4: a row the subscriber cannot see is not sent at all
            granted = grants.get(sub.claims.role, NO_GRANTS) if grants is not None and sub.claims is not None else None
            if granted is not None and not granted.readable:
                continue  # the role may no longer SELECT the table (REVOKE since it subscribed)
            try:
                columns = route.columns(key, ids)
                if granted is not None and not granted.everything:
                    # PROTOCOL.md 4.4 step 2, as the grants are now: revoked columns are cut.
                    columns = granted.readable if columns is None else columns & granted.readable
                frame_key = (sub.vsn, sub.topic, tuple(ids), columns)
                frame = frames.get(frame_key)
                if frame is None:
                    data = data_json if columns is None else select_columns(data_json, columns)
                    payload = '{"ids":' + json.dumps(ids) + ',"data":' + data + "}"
                    text = encode_text_raw_payload(sub.vsn, None, None, sub.topic, "postgres_changes", payload)
                    frame = frames[frame_key] = {"type": "websocket.send", "text": text}
            except Exception:
                self.failed += 1
                logger.exception("change not delivered to socket=%s topic=%s", sub.socket_id, sub.topic)
                continue
            self._write(sub, frame)

    def _write(self, sub: Subscription | ChangeSubscription, frame: dict[str, Any]) -> None:
        """Write ``frame`` to one socket and count its bytes; a failure costs that socket only."""
        if self._send(sub, frame):
            self.delivered_bytes += frame_size(frame)

    def _send(self, sub: Subscription | ChangeSubscription, frame: dict[str, Any]) -> bool:
        """Write ``frame`` to one socket, counting the write but not its bytes (``deliver`` counts them per message)."""
        try:
            written = sub.writer.write(frame)
        except Exception:
            written = False
            logger.exception("write failed socket=%s", sub.socket_id)
        if written:
            self.delivered += 1
        else:
            self.failed += 1
        return written

    async def _visibility(
        self, route: TableRoute, run: ChangeRun, routes: dict[int, dict[SubKey, list[int]]]
    ) -> tuple[dict[str, bytes], dict[str, str]]:
        """Verdicts per claim set for an RLS run: the replicator's, plus checks of the ones it missed.

        Also returns the claim sets whose check failed (the replicator's and
        this process's), each with the message its channels get.
        """
        visible, failed, checkable, positions = self._unanswered(route, run, routes)
        if not checkable or self._row_check is None:
            return visible, failed  # nothing to check, or no way to: the rows stay undelivered
        keys = [run["changes"][i]["key"] for i in positions]
        try:
            # One call for every claim set the replicator missed; a failed policy denies only its own.
            verdicts = await self._row_check(checkable, route.schema, route.table, keys)
        except Exception:
            logger.exception("row level security check failed on %s.%s", route.schema, route.table)
            failed.update((claim_set, UNABLE_TO_CHECK) for claim_set in checkable)  # never a silent loss
            return visible, failed
        nothing = bytes(len(keys))
        for claim_set in checkable:
            message = verdicts.failed.get(claim_set)
            if message is not None:
                failed[claim_set] = message
            else:
                visible[claim_set] = verdict_per_change(run, positions, verdicts.visible.get(claim_set, nothing))
        return visible, failed

    def _unanswered(
        self, route: TableRoute, run: ChangeRun, routes: dict[int, dict[SubKey, list[int]]]
    ) -> tuple[dict[str, bytes], dict[str, str], dict[str, Claims], list[int]]:
        """The run's verdicts so far, and the claim sets this process must still check, for which positions."""
        visible = dict(run.get("visible") or {})
        failed = dict(run.get("check_errors") or {})
        missing = {c: claims for c, (claims, _) in route.claim_sets.items() if c not in visible and c not in failed}
        if not missing:
            return visible, failed, {}, []
        positions = checked_positions(run)
        if not positions:
            return visible, failed, {}, []
        # Only the claim sets some checked change goes to (the replicator leaves filtered ones to us).
        routed = self._routed_claim_sets(route, run, positions, routes)
        checkable = {c: claims for c, claims in missing.items() if c in routed and claims is not None}
        return visible, failed, checkable, positions

    async def _check_together(self, runs: list[ChangeRun]) -> dict[int, Prepared]:
        """The verdicts of RLS runs waiting together, by ``id(run)``: one call per table for their missing claim sets.

        Each call checks the union of the runs' claim sets against all their
        keys, up to ``CHECKS_PER_CALL`` of them; a run keeps only its own
        claim sets' answers. A call that fails denies those claim sets for
        those runs, as a single run's check does. A claim set whose policy
        raised in a call covering several runs is checked again with each run
        alone: a row of another run must not cost it its own.
        """
        prepared: dict[int, Prepared] = {}
        if self._row_check is None:
            return prepared
        # table -> (claim sets, keys, runs with the offset of their keys in it)
        batch: dict[tuple[str, str], tuple[dict[str, Claims], list[bytes], list[tuple[ChangeRun, int]]]] = {}
        checks: dict[int, tuple[dict[str, Claims], list[int]]] = {}

        async def flush(table: tuple[str, str]) -> None:
            claim_sets, keys, members = batch.pop(table)
            assert self._row_check is not None
            answers: Mapping[str, bytes] = {}
            raised: set[str] = set()
            try:
                verdicts = await self._row_check(claim_sets, table[0], table[1], keys)
                answers, failures, raised = verdicts.visible, verdicts.failed, verdicts.raised
            except Exception:
                logger.exception("row level security check failed on %s.%s", *table)
                failures = {claim_set: UNABLE_TO_CHECK for claim_set in claim_sets}  # never a silent loss
            for run, offset in members:
                visible, failed, _ = prepared[id(run)]
                checkable, positions = checks[id(run)]
                again: dict[str, Claims] = {}
                for claim_set in checkable:
                    message = failures.get(claim_set)
                    if message is not None and len(members) > 1 and claim_set in raised:
                        # The call covered other runs' rows too: a policy that raised on one of them must
                        # not cost this claim set its own rows. Checked again with this run alone, below
                        # (not a timeout: its budget was its own, and a retry would only add to it).
                        again[claim_set] = checkable[claim_set]
                    elif message is not None:
                        failed[claim_set] = message
                    else:
                        seen = answers.get(claim_set, b"")[offset:offset + len(positions)]
                        visible[claim_set] = verdict_per_change(run, positions, seen.ljust(len(positions), b"\x00"))
                if again:
                    await self._check_run_alone(table, again, run, positions, visible, failed)

        for run in runs:
            route = self._change_groups.get(run["group"])
            if not route or not run.get("rls"):
                continue
            routes: dict[int, dict[SubKey, list[int]]] = {}
            visible, failed, checkable, positions = self._unanswered(route, run, routes)
            prepared[id(run)] = (visible, failed, routes)
            if not checkable:
                continue
            checks[id(run)] = (checkable, positions)
            table = (route.schema, route.table)
            current = batch.get(table)
            if current is not None:
                union = len(current[0].keys() | checkable.keys())
                if union * (len(current[1]) + len(positions)) > CHECKS_PER_CALL:
                    await flush(table)
                    current = None
            if current is None:
                current = batch[table] = ({}, [], [])
            current[0].update(checkable)
            current[2].append((run, len(current[1])))
            current[1].extend(run["changes"][i]["key"] for i in positions)
        for table in list(batch):
            await flush(table)
        return prepared

    async def _check_run_alone(
        self,
        table: tuple[str, str],
        claim_sets: dict[str, Claims],
        run: ChangeRun,
        positions: list[int],
        visible: dict[str, bytes],
        failed: dict[str, str],
    ) -> None:
        """Check ``claim_sets`` against one run's keys only, into that run's ``visible`` and ``failed``."""
        assert self._row_check is not None
        keys = [run["changes"][i]["key"] for i in positions]
        try:
            verdicts = await self._row_check(claim_sets, table[0], table[1], keys)
        except Exception:
            logger.exception("row level security check failed on %s.%s", *table)
            failed.update({claim_set: UNABLE_TO_CHECK for claim_set in claim_sets})
            return
        for claim_set in claim_sets:
            message = verdicts.failed.get(claim_set)
            if message is not None:
                failed[claim_set] = message
                continue
            seen = verdicts.visible.get(claim_set, b"")[:len(positions)]
            visible[claim_set] = verdict_per_change(run, positions, seen.ljust(len(positions), b"\x00"))

    @staticmethod
    def _routed_claim_sets(
        route: TableRoute, run: ChangeRun, positions: list[int], routes: dict[int, dict[SubKey, list[int]]]
    ) -> set[str]:
        """The claim sets of the channels that one of the changes at ``positions`` is routed to.

        Routes as ``_deliver_change`` does, and keeps each change's routing in
        ``routes`` for it; if a change cannot be read, every claim set of the
        route (a check too many is only slower).
        """
        if not route.filtered:
            return set(route.claim_sets)
        routed: set[SubKey] = set()
        try:
            for position in positions:
                change = run["changes"][position]
                parsed = json.loads(change["data"].decode("utf-8"), parse_float=Decimal)
                routes[position] = route.route(change["type"], parsed.get("record"), parsed.get("old_record"))
                routed.update(routes[position])
        except Exception:
            routes.clear()
            return set(route.claim_sets)
        return {route.subscriptions[key].claim_set for key in routed if key in route.subscriptions}

    def _grants(self, route: TableRoute) -> dict[str, Grants] | None:
        """What each role among the table's subscribers may read (``realtime.privileges``), without waiting.

        A role whose grants are not known maps to no columns: nothing is delivered to it.
        """
        if self._privileges is None:
            return None
        roles = {claims.role for claims, _ in route.claim_sets.values() if claims is not None}
        found: dict[str, Grants] = {}
        for role in roles:
            granted = self._privileges.cached(role, route.schema, route.table)
            found[role] = granted if granted is not None else NO_GRANTS
        return found

    def _key_unreadable(self, route: TableRoute, run: ChangeRun) -> dict[SubKey, list[Any]]:
        """Channels whose role cannot read every primary key column, with their bindings on the table."""
        primary_key = run.get("primary_key")
        if not primary_key or not route.readable:
            return {}
        table = (route.schema, route.table)
        return {
            key: [a.binding for a in route.subscriptions[key].bindings if table in a.tables]
            for key, readable in route.readable.items()
            if not readable.issuperset(primary_key)
        }

    def _members(self, group: str) -> tuple[Subscription, ...]:
        snapshot = self._snapshots.get(group)
        if snapshot is None:
            members = self._groups.get(group)
            if not members:
                return ()
            # A snapshot lets channels join and leave while a delivery awaits.
            snapshot = self._snapshots[group] = tuple(members.values())
        return snapshot

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("hub background task failed", exc_info=task.exception())

    @property
    def registration(self) -> Registration | None:
        """This process's claim sets in Redis (removed by ``aclose``)."""
        return self._registration

    async def aclose(self) -> None:
        """Stop receiving and leave every group (server shutdown, test teardown)."""
        self._closing = True
        if self._privileges is not None:
            self._privileges.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            # channels_redis can hold on to a cancelled receive; do not wait forever.
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
        if self._channel_name is not None:
            for group in list(self._joined):
                await self._layer.group_discard(group, self._channel_name)
        self._joined.clear()
        self._groups.clear()
        self._change_groups.clear()
        self._snapshots.clear()
        if self._registration is not None:
            try:
                await self._registration.aclose()
            except Exception:
                logger.warning("could not remove this process's claim sets from Redis", exc_info=True)


def _seers(route: TableRoute, run: ChangeRun, visible: Mapping[str, bytes], failed: Mapping[str, str]) -> dict[int, set[SubKey]]:
    """Checked position -> the channels whose claim set sees it, or whose check failed (they get an error).

    The only channels a checked change can reach: delivery looks at them
    instead of every unfiltered channel of the table (at 5,000 users, one
    instead of 5,000 per change). One scan of each verdict per run.
    """
    checked = set(checked_positions(run))
    seers: dict[int, set[SubKey]] = {position: set() for position in checked}
    for claim_set, verdict in visible.items():
        members = route.members.get(claim_set)
        if not members:
            continue
        position = verdict.find(1)
        while position >= 0:
            if position in checked:
                seers[position].update(members)
            position = verdict.find(1, position + 1)
    for claim_set in failed:
        for position in checked:
            seers[position].update(route.members.get(claim_set, ()))
    return seers


def _system_error(sub: ChangeSubscription, message: str) -> dict[str, Any]:
    """A ``system`` error for the channel's postgres_changes (PROTOCOL.md 3.5: a printed transient error)."""
    payload = {"message": message, "status": "error", "extension": "postgres_changes", "channel": sub_topic(sub.topic)}
    text = encode_text_raw_payload(sub.vsn, sub.join_ref, None, sub.topic, "system", json.dumps(payload))
    return {"type": "websocket.send", "text": text}


def new_hub(process_group: str | None = None, disconnect: Callable[[str], Awaitable[None]] | None = None) -> Hub:
    """A hub on the configured channel layer, with its claim-set registration (``realtime.runtime`` owns it).

    ``process_group``: this process's own group, joined once the hub starts;
    a ``realtime.disconnect`` message sent to it calls ``disconnect`` with a socket id.
    """
    from django.conf import settings
    from redis.asyncio import Redis

    from shared.claimsets import Registration
    from realtime.authorization import check_rows

    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("CHANNEL_LAYERS is not configured")
    redis = Redis.from_url(settings.REDIS_URL, socket_connect_timeout=5, socket_timeout=15)
    registration = Registration(redis, settings.REALTIME_REDIS_PREFIX, uuid.uuid4().hex)
    privileges = PrivilegeCache(fetch_grants, settings.REALTIME_PRIVILEGES_TTL_MS / 1000)
    return Hub(layer, registration, check_rows, privileges, process_group, disconnect)


def get_hub() -> Hub:
    """The hub of the running event loop's runtime."""
    from realtime.runtime import get_runtime

    return get_runtime().hub
