"""The hub between channels' ``InMemoryChannelLayer`` and local sockets: membership, routing, delivery.

Messages go in through ``group_send`` as the publisher and the replicator send
them; the hub's own receive loop takes them out and writes frames to the
sockets' writers. No server, no Redis.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from realtime.authorization import AuthorizedBinding
from realtime.bindings import parse_binding
from realtime.filters.predicates import compile_filter
from realtime.hub import ChangeSubscription, Hub, Subscription
from realtime.protocol.message import UserBroadcast, Vsn
from realtime.protocol.serializer import encode_user_broadcast
from core.topics import table_group
from core.types import KIND_BINARY, KIND_JSON, KIND_PRESENCE, BatchMessage, BroadcastMessage, ChangeRun
from pgtypes.values import encode_json

pytestmark = pytest.mark.unit

ROOM = "bcast.room1"
TOPIC = "realtime:room1"
TABLE = ("public", "todos")
TYPES = {"id": "int8", "status": "text"}


class Recorder:
    """A socket's writer that keeps the ASGI frames it is given."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def write(self, frame: dict[str, Any]) -> bool:
        self.frames.append(frame)
        return True

    def decoded(self) -> list[Any]:
        return [json.loads(frame["text"]) for frame in self.frames if "text" in frame]


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.002)


async def settle(hub: Hub, layer: InMemoryChannelLayer) -> None:
    """Wait until the hub's receive loop took every queued message (and handled it)."""
    await until(lambda: all(queue.empty() for queue in layer.channels.values()))
    await asyncio.sleep(0)


@pytest.fixture
async def layer() -> InMemoryChannelLayer:
    return InMemoryChannelLayer()


@pytest.fixture
async def hub(layer: InMemoryChannelLayer) -> AsyncIterator[Hub]:
    instance = Hub(layer)
    yield instance
    await instance.aclose()


def broadcast(text: str, origin: str = "", group: str = ROOM, **extra: Any) -> BroadcastMessage:
    payload = json.dumps({"type": "broadcast", "event": "e", "payload": {"t": text}}).encode()
    message = BroadcastMessage(
        type="realtime.broadcast", group=group, topic=TOPIC, origin=origin, kind=KIND_JSON, event="e", encoding=1,
        payload=payload,
    )
    message.update(extra)  # type: ignore[typeddict-item]
    return message


def texts(writer: Recorder) -> list[str]:
    return [frame[4]["payload"]["t"] for frame in writer.decoded()]


async def join(hub: Hub, socket: str, vsn: Vsn = Vsn.V2, self_broadcast: bool = False, **extra: Any) -> Recorder:
    writer = Recorder()
    await hub.subscribe(ROOM, Subscription(socket, TOPIC, vsn, self_broadcast, writer, **extra))  # type: ignore[arg-type]
    return writer


# --- membership ------------------------------------------------------------------------------


async def test_the_process_joins_a_group_once_for_all_its_channels_and_leaves_with_the_last(hub, layer) -> None:
    await join(hub, "a")
    await join(hub, "b")
    assert len(layer.groups[ROOM]) == 1  # one membership for the process, not one per socket
    hub.unsubscribe(ROOM, "a", TOPIC)
    await asyncio.sleep(0.01)
    assert len(layer.groups[ROOM]) == 1  # b is still here
    hub.unsubscribe(ROOM, "b", TOPIC)
    await until(lambda: not layer.groups.get(ROOM))


async def test_a_channel_that_left_gets_nothing_while_the_others_still_do(hub, layer) -> None:
    a = await join(hub, "a")
    b = await join(hub, "b")
    await layer.group_send(ROOM, broadcast("1"))
    await until(lambda: len(a.frames) == 1 and len(b.frames) == 1)
    hub.unsubscribe(ROOM, "a", TOPIC)
    await layer.group_send(ROOM, broadcast("2"))
    await until(lambda: len(b.frames) == 2)
    await settle(hub, layer)
    assert texts(a) == ["1"] and texts(b) == ["1", "2"]


async def test_the_hub_receives_each_message_once_however_many_channels_share_the_topic(hub, layer) -> None:
    writers = [await join(hub, f"s{n}") for n in range(50)]
    await layer.group_send(ROOM, broadcast("x"))
    await until(lambda: all(len(w.frames) == 1 for w in writers))
    await settle(hub, layer)
    assert hub.delivered == 50
    # Every socket on the same vsn gets the very same frame, encoded once.
    assert len({id(w.frames[0]) for w in writers}) == 1


# --- broadcast delivery ----------------------------------------------------------------------


async def test_the_sender_gets_its_own_broadcast_only_with_self_broadcast(hub, layer) -> None:
    quiet = await join(hub, "sender")
    loud = await join(hub, "sender2", self_broadcast=True)
    other = await join(hub, "other")
    await layer.group_send(ROOM, broadcast("from sender", origin="sender"))
    await layer.group_send(ROOM, broadcast("from sender2", origin="sender2"))
    await until(lambda: len(other.frames) == 2)
    await settle(hub, layer)
    assert texts(quiet) == ["from sender2"]
    assert texts(loud) == ["from sender", "from sender2"]
    assert texts(other) == ["from sender", "from sender2"]


async def test_a_database_broadcast_a_channel_replayed_at_join_is_not_delivered_again(hub, layer) -> None:
    replayed = await join(hub, "replayed", skip_ids=frozenset({"row-1"}))
    fresh = await join(hub, "fresh")
    await layer.group_send(ROOM, broadcast("old", id="row-1"))
    await layer.group_send(ROOM, broadcast("new", id="row-2"))
    await until(lambda: len(fresh.frames) == 2)
    await settle(hub, layer)
    assert texts(replayed) == ["new"]
    assert texts(fresh) == ["old", "new"]


async def test_each_vsn_gets_its_own_frame_shape(hub, layer) -> None:
    v1 = await join(hub, "v1", vsn=Vsn.V1)
    v2 = await join(hub, "v2", vsn=Vsn.V2)
    await layer.group_send(ROOM, broadcast("x"))
    await until(lambda: len(v1.frames) == 1 and len(v2.frames) == 1)
    assert v1.decoded() == [
        {"topic": TOPIC, "event": "broadcast", "payload": {"type": "broadcast", "event": "e", "payload": {"t": "x"}},
         "ref": None}
    ]
    assert v2.decoded() == [
        [None, None, TOPIC, "broadcast", {"type": "broadcast", "event": "e", "payload": {"t": "x"}}]
    ]


async def test_a_binary_broadcast_goes_to_vsn_2_as_bytes_and_not_to_vsn_1(hub, layer) -> None:
    v1 = await join(hub, "v1", vsn=Vsn.V1)
    v2 = await join(hub, "v2", vsn=Vsn.V2)
    message = BroadcastMessage(
        type="realtime.broadcast", group=ROOM, topic=TOPIC, origin="", kind=KIND_BINARY, event="bin", encoding=0,
        payload=b"\x00\x01\xff",
    )
    await layer.group_send(ROOM, message)
    await until(lambda: len(v2.frames) == 1)
    await settle(hub, layer)
    assert v2.frames == [{"type": "websocket.send", "bytes": encode_user_broadcast(TOPIC, UserBroadcast("bin", 0, b"\x00\x01\xff"))}]
    assert v1.frames == []  # PROTOCOL.md 5.2: no raw binary for vsn 1


async def test_a_presence_diff_is_a_presence_diff_event(hub, layer) -> None:
    writer = await join(hub, "a")
    diff = {"joins": {"k": {"metas": [{"phx_ref": "r"}]}}, "leaves": {}}
    message = BroadcastMessage(
        type="realtime.broadcast", group=ROOM, topic=TOPIC, origin="", kind=KIND_PRESENCE, event="presence_diff",
        encoding=1, payload=json.dumps(diff).encode(),
    )
    await layer.group_send(ROOM, message)
    await until(lambda: len(writer.frames) == 1)
    assert writer.decoded() == [[None, None, TOPIC, "presence_diff", diff]]


async def test_a_batch_is_delivered_in_order_with_each_message_filtered_on_its_own(hub, layer) -> None:
    sender = await join(hub, "sender")
    other = await join(hub, "other")
    batch = BatchMessage(
        type="realtime.batch", group=ROOM,
        messages=[broadcast("1"), broadcast("2", origin="sender"), broadcast("3")],
    )
    await layer.group_send(ROOM, batch)
    await until(lambda: len(other.frames) == 3)
    await settle(hub, layer)
    assert texts(other) == ["1", "2", "3"]
    assert texts(sender) == ["1", "3"]


async def test_messages_for_a_group_without_local_channels_are_dropped_quietly(hub, layer) -> None:
    writer = await join(hub, "a")
    await layer.group_add("bcast.elsewhere", hub._channel_name)  # a membership left over, as after a leave failed
    await layer.group_send("bcast.elsewhere", broadcast("lost", group="bcast.elsewhere"))
    await layer.group_send(ROOM, broadcast("here"))
    await until(lambda: len(writer.frames) == 1)
    await settle(hub, layer)
    assert texts(writer) == ["here"] and hub.loop_errors == 0 and hub.failed == 0


# --- change routing and delivery -------------------------------------------------------------


async def bind(hub: Hub, socket: str, *filters: str | None, event: str = "*") -> Recorder:
    writer = Recorder()
    authorized = []
    for filter in filters:
        raw: dict[str, Any] = {"event": event, "schema": TABLE[0], "table": TABLE[1]}
        if filter:
            raw["filter"] = filter
        binding = parse_binding(raw)
        matcher = compile_filter(filter, TYPES) if filter else None
        authorized.append(AuthorizedBinding(binding, (TABLE,), matcher))
    await hub.subscribe_changes(
        ChangeSubscription(socket, f"realtime:{socket}", Vsn.V2, writer, tuple(authorized))  # type: ignore[arg-type]
    )
    return writer


def change(change_type: str, record: dict[str, Any] | None = None, old: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "schema": TABLE[0], "table": TABLE[1], "commit_timestamp": "2026-08-21T12:00:00.000Z", "type": change_type,
        "columns": [{"name": n, "type": t} for n, t in TYPES.items()], "errors": None,
    }
    if record is not None:
        data["record"] = record
    if old is not None:
        data["old_record"] = old
    return {"type": change_type, "data": encode_json(data).encode("utf-8")}


def run(*changes: dict[str, Any]) -> ChangeRun:
    return ChangeRun(
        type="realtime.changes", group=table_group(*TABLE), schema=TABLE[0], table=TABLE[1], changes=list(changes),
        primary_key=["id"],
    )


def received(writer: Recorder) -> list[tuple[str, Any, list[int]]]:
    """(type, id of the row, binding ids) of each postgres_changes event."""
    events = [frame[4] for frame in writer.decoded() if frame[3] == "postgres_changes"]
    return [
        (e["data"]["type"], (e["data"].get("record") or e["data"].get("old_record"))["id"], e["ids"]) for e in events
    ]


async def test_a_run_on_the_table_group_reaches_only_the_channels_whose_filters_match(hub, layer) -> None:
    one = await bind(hub, "one", "id=eq.1")
    two = await bind(hub, "two", "id=eq.2")
    everything = await bind(hub, "all", None)
    assert len(layer.groups[table_group(*TABLE)]) == 1
    await layer.group_send(table_group(*TABLE), run(
        change("INSERT", {"id": 1, "status": "new"}),
        change("INSERT", {"id": 2, "status": "new"}),
        change("UPDATE", {"id": 1, "status": "done"}, {"id": 1}),
    ))
    await until(lambda: len(everything.frames) == 3)
    await settle(hub, layer)
    assert [(t, row) for t, row, _ in received(one)] == [("INSERT", 1), ("UPDATE", 1)]
    assert [(t, row) for t, row, _ in received(two)] == [("INSERT", 2)]
    assert [(t, row) for t, row, _ in received(everything)] == [("INSERT", 1), ("INSERT", 2), ("UPDATE", 1)]


async def test_a_channel_gets_one_event_per_change_naming_every_binding_it_satisfies(hub, layer) -> None:
    writer = Recorder()
    bindings = []
    for raw in (
        {"event": "INSERT", "schema": "public", "table": "todos"},
        {"event": "*", "schema": "public", "table": "todos", "filter": "status=eq.new"},
        {"event": "DELETE", "schema": "public", "table": "todos"},
    ):
        binding = parse_binding(raw)
        matcher = compile_filter(raw["filter"], TYPES) if "filter" in raw else None
        bindings.append(AuthorizedBinding(binding, (TABLE,), matcher))
    await hub.subscribe_changes(ChangeSubscription("s", "realtime:s", Vsn.V2, writer, tuple(bindings)))  # type: ignore[arg-type]
    await layer.group_send(table_group(*TABLE), run(
        change("INSERT", {"id": 1, "status": "new"}), change("DELETE", old={"id": 1, "status": "new"})
    ))
    await until(lambda: len(writer.frames) == 2)
    ids = [b.binding.id for b in bindings]
    assert received(writer) == [("INSERT", 1, sorted(ids[:2])), ("DELETE", 1, sorted([ids[1], ids[2]]))]


async def test_the_event_filter_of_a_binding_is_kept(hub, layer) -> None:
    inserts = await bind(hub, "ins", None, event="INSERT")
    deletes = await bind(hub, "del", None, event="DELETE")
    await layer.group_send(table_group(*TABLE), run(
        change("INSERT", {"id": 1}), change("UPDATE", {"id": 1}, {"id": 1}), change("DELETE", old={"id": 1}),
    ))
    await until(lambda: len(inserts.frames) == 1 and len(deletes.frames) == 1)
    await settle(hub, layer)
    assert [t for t, _, _ in received(inserts)] == ["INSERT"]
    assert [t for t, _, _ in received(deletes)] == ["DELETE"]


async def test_a_channel_that_unsubscribed_its_changes_gets_none_and_the_table_group_is_left(hub, layer) -> None:
    gone = await bind(hub, "gone", None)
    hub.unsubscribe_changes("gone", "realtime:gone")
    await until(lambda: not layer.groups.get(table_group(*TABLE)))
    stays = await bind(hub, "stays", None)
    await layer.group_send(table_group(*TABLE), run(change("INSERT", {"id": 7})))
    await until(lambda: len(stays.frames) == 1)
    await settle(hub, layer)
    assert gone.frames == []


async def test_broadcasts_and_changes_share_the_one_receive_loop_in_order(hub, layer) -> None:
    room = await join(hub, "a")
    table = await bind(hub, "a", None)
    await layer.group_send(ROOM, broadcast("first"))
    await layer.group_send(table_group(*TABLE), run(change("INSERT", {"id": 1})))
    await layer.group_send(ROOM, broadcast("second"))
    await until(lambda: len(room.frames) == 2 and len(table.frames) == 1)
    assert texts(room) == ["first", "second"]
    assert hub.loop_errors == 0
