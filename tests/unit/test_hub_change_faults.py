"""The hub's delivery of a run of changes under faults (issue #10): failed checks, exact numerics, 401.

Runs the real ``Hub`` on channels' ``InMemoryChannelLayer``, on which nothing is
sent: runs are handed to ``deliver_changes`` directly, as the receive loop would.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from collections.abc import Mapping
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from realtime.authorization import AuthorizedBinding
from realtime.bindings import parse_binding
from realtime.filters.predicates import compile_filter
from realtime.hub import ChangeSubscription, Hub
from core.jwt import Claims
from realtime.protocol.message import Vsn
from core.topics import table_group
from core.types import ChangeRun, checked_positions, verdict_per_change
from shared.visibility import Verdicts
from pgtypes.values import encode_json

pytestmark = pytest.mark.unit

TABLE = ("public", "items")
TYPES = {"id": "int8", "owner": "text", "price": "numeric", "body": "text"}
TIMEOUT = "ERROR 57014 (query_canceled) canceling statement due to statement timeout"


class Recorder:
    """A socket's writer that keeps the frames it is given, decoded."""

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.texts: list[str] = []

    def write(self, frame: dict[str, Any]) -> bool:
        self.texts.append(frame["text"])
        self.frames.append(json.loads(frame["text"]))
        return True

    def events(self, event: str) -> list[Any]:
        return [f[4] for f in self.frames if f[3] == event]


class Registration:
    """One claim set per ``sub``, as the Redis registry would give."""

    async def add(self, tables: Any, claims: Claims, filtered: Any = ()) -> str:
        return f"set-{claims.sub}"

    async def remove(self, tables: Any, claim_set: str, filtered: Any = ()) -> None:
        return None

    async def aclose(self) -> None:
        return None


def claims(sub: str) -> Claims:
    return Claims("authenticated", 4e9, sub, {"sub": sub, "role": "authenticated"})


async def channel(
    hub: Hub, socket: str, sub: str, filter: str | None = None, readable: frozenset[str] | None = None
) -> Recorder:
    raw: dict[str, Any] = {"event": "*", "schema": TABLE[0], "table": TABLE[1]}
    if filter:
        raw["filter"] = filter
    binding = parse_binding(raw)
    matcher = compile_filter(filter, TYPES) if filter else None
    limits = {TABLE: readable} if readable is not None else {}
    writer = Recorder()
    authorized = AuthorizedBinding(binding, (TABLE,), matcher, None, limits)
    await hub.subscribe_changes(
        ChangeSubscription(socket, f"realtime:{socket}", Vsn.V2, writer, (authorized,), claims=claims(sub))  # type: ignore[arg-type]
    )
    return writer


def change(change_type: str, record: dict[str, Any], rls: bool = False) -> dict[str, Any]:
    data = {
        "schema": TABLE[0], "table": TABLE[1], "commit_timestamp": "2026-08-21T12:00:00.000Z", "type": change_type,
        "columns": [{"name": n, "type": t} for n, t in TYPES.items()], "record": record, "errors": None,
    }
    entry: dict[str, Any] = {"type": change_type, "data": encode_json(data).encode("utf-8")}
    if rls:
        entry["key"] = encode_json({"id": str(record["id"])}).encode("utf-8")
    return entry


def run(*changes: dict[str, Any], rls: bool = False, **extra: Any) -> ChangeRun:
    message = ChangeRun(
        type="realtime.changes", group=table_group(*TABLE), schema=TABLE[0], table=TABLE[1], changes=list(changes),
        primary_key=["id"],
    )
    if rls:
        message["rls"] = True
    message.update(extra)  # type: ignore[typeddict-item]
    return message


def ids_of(writer: Recorder) -> list[int]:
    return [event["data"]["record"]["id"] for event in writer.events("postgres_changes")]


@pytest.fixture
async def hub() -> Any:
    instance = Hub(InMemoryChannelLayer(), Registration())  # type: ignore[arg-type]
    yield instance
    await instance.aclose()


# --- exact numerics --------------------------------------------------------------------------


async def test_a_numeric_eq_filter_matches_its_own_twenty_digit_value_and_not_its_neighbour(hub) -> None:
    exact = await channel(hub, "exact", "a", filter="price=eq.12345678901234567.89")
    above = await channel(hub, "above", "a", filter="price=gt.12345678901234567.88")
    await hub.deliver_changes(run(
        change("INSERT", {"id": 1, "price": Decimal("12345678901234567.89")}),
        change("INSERT", {"id": 2, "price": Decimal("12345678901234567.88")}),
    ))
    assert ids_of(exact) == [1]
    assert ids_of(above) == [1]
    assert '"price":12345678901234567.89' in exact.texts[0]  # the frame keeps every digit


# --- a check that failed for one claim set ----------------------------------------------------


async def test_a_claim_set_whose_check_failed_gets_one_system_error_per_run_and_nothing_of_it(hub) -> None:
    slow = await channel(hub, "slow", "slow")
    slow_filtered = await channel(hub, "slow2", "slow", filter="owner=eq.slow")
    fast = await channel(hub, "fast", "fast")
    message = run(
        change("INSERT", {"id": 1, "owner": "slow"}, rls=True),
        change("INSERT", {"id": 2, "owner": "fast"}, rls=True),
        change("DELETE", {"id": 3, "owner": "slow"}),
        rls=True,
    )
    positions = checked_positions(message)
    message["visible"] = {
        "set-fast": verdict_per_change(message, positions, b"\x00\x01"),
        "set-slow": verdict_per_change(message, positions, b"\x00\x00"),
    }
    message["check_errors"] = {"set-slow": TIMEOUT}
    await hub.deliver_changes(message)
    assert ids_of(fast) == [2, 3]
    for writer, topic in ((slow, "slow"), (slow_filtered, "slow2")):
        assert writer.events("postgres_changes") == []
        assert writer.events("system") == [
            {"message": TIMEOUT, "status": "error", "extension": "postgres_changes", "channel": topic}
        ]
    await hub.deliver_changes(message)  # the next run: one more error each, still no rows
    assert len(slow.events("system")) == 2 and slow.events("postgres_changes") == []


async def test_the_hubs_own_check_treats_a_failed_policy_like_the_replicator_does() -> None:
    async def row_check(claim_sets: Mapping[str, Claims], schema: str, table: str, keys: list[bytes]) -> Verdicts:
        verdicts = Verdicts()
        for claim_set, who in claim_sets.items():
            if who.sub == "slow":
                verdicts.failed[claim_set] = TIMEOUT
            else:
                verdicts.visible[claim_set] = b"\x01" * len(keys)
        return verdicts

    hub = Hub(InMemoryChannelLayer(), Registration(), row_check)  # type: ignore[arg-type]
    try:
        slow = await channel(hub, "slow", "slow")
        fast = await channel(hub, "fast", "fast")
        # Not checked by the replicator: the hub checks both claim sets itself.
        await hub.deliver_changes(run(change("INSERT", {"id": 1}, rls=True), change("UPDATE", {"id": 2}, rls=True), rls=True))
        assert ids_of(fast) == [1, 2]
        assert slow.events("postgres_changes") == []
        assert [e["message"] for e in slow.events("system")] == [TIMEOUT]
    finally:
        await hub.aclose()


async def test_the_hub_checks_only_the_claim_sets_a_change_is_routed_to() -> None:
    asked: list[set[str]] = []

    async def row_check(claim_sets: Mapping[str, Claims], schema: str, table: str, keys: list[bytes]) -> Verdicts:
        asked.append({claims.sub or "" for claims in claim_sets.values()})
        return Verdicts(visible={claim_set: b"\x01" * len(keys) for claim_set in claim_sets})

    hub = Hub(InMemoryChannelLayer(), Registration(), row_check)  # type: ignore[arg-type]
    try:
        a = await channel(hub, "a", "a", filter="owner=eq.a")
        b = await channel(hub, "b", "b", filter="owner=eq.b")
        c = await channel(hub, "c", "c", filter="owner=eq.c")
        everyone = await channel(hub, "all", "all")
        await hub.deliver_changes(run(
            change("INSERT", {"id": 1, "owner": "a"}, rls=True), change("INSERT", {"id": 2, "owner": "b"}, rls=True),
            rls=True,
        ))
        assert asked == [{"a", "b", "all"}]  # not c: no change of the run matches its filter
        assert (ids_of(a), ids_of(b), ids_of(c), ids_of(everyone)) == ([1], [2], [], [1, 2])
        # The replicator answered the unfiltered claim set: the hub checks only the routed filtered one.
        message = run(change("INSERT", {"id": 3, "owner": "c"}, rls=True), rls=True)
        message["visible"] = {"set-all": verdict_per_change(message, checked_positions(message), b"\x00")}
        await hub.deliver_changes(message)
        assert asked[1:] == [{"c"}]
        assert (ids_of(c), ids_of(everyone)) == ([3], [1, 2])
    finally:
        await hub.aclose()


async def test_runs_that_wait_together_are_checked_in_one_call_and_delivered_in_order() -> None:
    calls: list[tuple[set[str], list[bytes]]] = []

    async def row_check(claim_sets: Mapping[str, Claims], schema: str, table: str, keys: list[bytes]) -> Verdicts:
        calls.append(({claims.sub or "" for claims in claim_sets.values()}, list(keys)))
        ids = [json.loads(key)["id"] for key in keys]
        # b sees nothing with id 4; everyone else sees every row.
        return Verdicts(visible={
            c: bytes(0 if (who.sub == "b" and i == "4") else 1 for i in ids) for c, who in claim_sets.items()
        })

    hub = Hub(InMemoryChannelLayer(), Registration(), row_check)  # type: ignore[arg-type]
    try:
        a = await channel(hub, "a", "a", filter="owner=eq.a")
        b = await channel(hub, "b", "b", filter="owner=eq.b")
        messages = [
            run(change("INSERT", {"id": 1, "owner": "a"}, rls=True), change("INSERT", {"id": 2, "owner": "b"}, rls=True), rls=True),
            run(change("INSERT", {"id": 3, "owner": "a"}, rls=True), rls=True),
            run(change("INSERT", {"id": 4, "owner": "b"}, rls=True), change("DELETE", {"id": 1, "owner": "a"}),
                change("INSERT", {"id": 5, "owner": "b"}, rls=True), rls=True),
        ]
        for message in messages:  # as the receive loop hands them over, before the worker runs
            await hub.realtime_changes(message)
        while hub._pending_runs or (hub._runs_worker is not None and not hub._runs_worker.done()):
            await asyncio.sleep(0.01)
        assert len(calls) == 1 and calls[0][0] == {"a", "b"}
        assert [json.loads(key)["id"] for key in calls[0][1]] == ["1", "2", "3", "4", "5"]
        assert ids_of(a) == [1, 3]
        assert ids_of(b) == [2, 5]
    finally:
        await hub.aclose()


async def test_a_policy_that_raises_on_another_runs_row_does_not_cost_a_claim_set_its_own_rows() -> None:
    """Runs checked together: a's policy raises on b's row 4 only; a still gets rows 1 and 3 of its own runs."""
    calls: list[tuple[set[str], list[str]]] = []
    raised = "ERROR 22P02 (invalid_text_representation) invalid input syntax for type uuid"

    async def row_check(claim_sets: Mapping[str, Claims], schema: str, table: str, keys: list[bytes]) -> Verdicts:
        ids = [json.loads(key)["id"] for key in keys]
        calls.append(({who.sub or "" for who in claim_sets.values()}, ids))
        failed = {c: raised for c, who in claim_sets.items() if who.sub == "a" and "4" in ids}
        visible = {c: b"\x01" * len(ids) for c in claim_sets if c not in failed}
        return Verdicts(visible=visible, failed=failed, raised=set(failed))

    hub = Hub(InMemoryChannelLayer(), Registration(), row_check)  # type: ignore[arg-type]
    try:
        a = await channel(hub, "a", "a", filter="id=in.(1,3,4)")
        b = await channel(hub, "b", "b", filter="owner=eq.b")
        messages = [
            run(change("INSERT", {"id": 1, "owner": "a"}, rls=True), rls=True),
            run(change("INSERT", {"id": 3, "owner": "a"}, rls=True), rls=True),
            run(change("INSERT", {"id": 4, "owner": "b"}, rls=True), rls=True),
        ]
        for message in messages:
            await hub.realtime_changes(message)
        while hub._pending_runs or (hub._runs_worker is not None and not hub._runs_worker.done()):
            await asyncio.sleep(0.01)
        assert calls[0] == ({"a", "b"}, ["1", "3", "4"])  # one call for the three runs
        assert sorted(calls[1:]) == [({"a"}, ["1"]), ({"a"}, ["3"]), ({"a"}, ["4"])]  # a again, run by run
        assert ids_of(a) == [1, 3]
        assert [e["status"] for e in a.events("system")] == ["error"]  # for the run with row 4 only
        assert ids_of(b) == [4]
    finally:
        await hub.aclose()


async def test_a_check_that_cannot_reach_the_database_is_reported_not_silent() -> None:
    async def row_check(claim_sets: Mapping[str, Claims], schema: str, table: str, keys: list[bytes]) -> Verdicts:
        raise ConnectionError("pool closed")

    hub = Hub(InMemoryChannelLayer(), Registration(), row_check)  # type: ignore[arg-type]
    try:
        a = await channel(hub, "a", "a")
        await hub.deliver_changes(run(change("INSERT", {"id": 1}, rls=True), rls=True))
        assert a.events("postgres_changes") == []
        assert [e["status"] for e in a.events("system")] == ["error"]
    finally:
        await hub.aclose()


# --- Error 401 --------------------------------------------------------------------------------


async def test_a_role_that_cannot_read_the_key_gets_error_401_instead_of_rows(hub) -> None:
    blind = await channel(hub, "blind", "a", readable=frozenset({"body"}))
    blind_filtered = await channel(hub, "blind2", "a", filter="body=eq.nope", readable=frozenset({"body"}))
    sees_key = await channel(hub, "sees", "b", readable=frozenset({"id", "body"}))
    await hub.deliver_changes(run(
        change("INSERT", {"id": 1, "body": "x"}),
        change("UPDATE", {"id": 1, "body": "y"}),
        change("DELETE", {"id": 1}),
    ))
    events = blind.events("postgres_changes")
    assert [e["data"] for e in events[:2]] == [
        {"schema": "public", "table": "items", "type": "INSERT", "columns": [], "commit_timestamp": None,
         "record": {}, "errors": ["Error 401: Unauthorized"]},
        {"schema": "public", "table": "items", "type": "UPDATE", "columns": [], "commit_timestamp": None,
         "record": {}, "errors": ["Error 401: Unauthorized"], "old_record": {}},
    ]
    assert events[2]["data"]["type"] == "DELETE" and events[2]["data"]["errors"] is None  # never 401 (4.4 step 3)
    # No filter check either: the filtered binding gets the 401 events too.
    assert [e["data"]["errors"] for e in blind_filtered.events("postgres_changes")] == [["Error 401: Unauthorized"]] * 2
    assert [e["data"]["record"] for e in sees_key.events("postgres_changes")[:2]] == [{"id": 1, "body": "x"}, {"id": 1, "body": "y"}]
