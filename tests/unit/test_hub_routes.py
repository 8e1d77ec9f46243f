"""Routing a change to the local channels whose bindings it satisfies."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from realtime.authorization import AuthorizedBinding
from realtime.bindings import parse_binding
from realtime.filters.predicates import compile_filter
from realtime.hub import ChangeSubscription, Hub, TableRoute
from core.jwt import Claims
from realtime.protocol.message import Vsn

pytestmark = pytest.mark.unit

TYPES = {"id": "int8", "user_id": "int4", "status": "text"}


async def _send(message: dict[str, Any]) -> None:
    return None


def subscription(socket: str, *bindings: dict[str, Any]) -> ChangeSubscription:
    authorized = []
    for raw in bindings:
        binding = parse_binding(raw)
        matcher = compile_filter(binding.filter, TYPES) if binding.filter else None
        authorized.append(AuthorizedBinding(binding, (("public", "todos"),), matcher))
    return ChangeSubscription(socket, "realtime:t", Vsn.V2, _send, tuple(authorized))


def binding(event: str = "*", filter: str | None = None) -> dict[str, Any]:
    raw = {"event": event, "schema": "public", "table": "todos"}
    if filter:
        raw["filter"] = filter
    return raw


def test_one_change_goes_only_to_the_matching_eq_subscriber_among_a_thousand() -> None:
    route = TableRoute("public", "todos")
    for n in range(1000):
        route.add((f"s{n}", "realtime:t"), subscription(f"s{n}", binding(filter=f"id=eq.{n}")))
    routed = route.route("INSERT", {"id": 417, "user_id": 1}, None)
    assert list(routed) == [("s417", "realtime:t")]


def test_all_matching_bindings_of_a_channel_share_one_entry() -> None:  # C39
    route = TableRoute("public", "todos")
    sub = subscription("a", binding("INSERT"), binding("*"), binding("UPDATE"))
    route.add(("a", "realtime:t"), sub)
    routed = route.route("INSERT", {"id": 1}, None)
    assert routed == {("a", "realtime:t"): sorted({b.binding.id for b in sub.bindings[:2]})}


def test_delete_filters_run_on_the_old_values() -> None:  # C52
    route = TableRoute("public", "todos")
    route.add(("a", "realtime:t"), subscription("a", binding("DELETE", "status=eq.done")))
    assert route.route("DELETE", None, {"id": 1, "status": "done"}) != {}
    assert route.route("DELETE", None, {"id": 1}) == {}  # DEFAULT identity: the column is absent


def test_removed_channels_get_nothing() -> None:
    route = TableRoute("public", "todos")
    route.add(("a", "realtime:t"), subscription("a", binding(filter="id=eq.1")))
    route.add(("b", "realtime:t"), subscription("b", binding()))
    route.remove(("a", "realtime:t"))
    assert list(route.route("INSERT", {"id": 1}, None)) == [("b", "realtime:t")]
    route.remove(("b", "realtime:t"))
    assert not route


class CountingRegistration:
    """Records the channels counted per (table, claim set), as the Redis registry would."""

    def __init__(self) -> None:
        self.counts: dict[tuple[tuple[str, str], str], int] = {}
        self.filtered: dict[tuple[tuple[str, str], str], int] = {}  # of those, channels that filter there

    async def add(self, tables: Any, claims: Any, filtered: Any = ()) -> str:
        claim_set = f"set-{claims.sub}"
        for table in tables:
            self.counts[(table, claim_set)] = self.counts.get((table, claim_set), 0) + 1
        for table in filtered:
            self.filtered[(table, claim_set)] = self.filtered.get((table, claim_set), 0) + 1
        return claim_set

    async def remove(self, tables: Any, claim_set: str, filtered: Any = ()) -> None:
        for table in tables:
            self.counts[(table, claim_set)] -= 1  # below zero: a channel was counted off twice
        for table in set(filtered) & set(tables):
            self.filtered[(table, claim_set)] -= 1

    def live(self) -> dict[tuple[tuple[str, str], str], int]:
        return {entry: count for entry, count in self.counts.items() if count}


async def test_the_registry_counts_each_channel_once_through_resubscribes_and_leaves() -> None:
    registration = CountingRegistration()
    hub = Hub(InMemoryChannelLayer(), registration)  # type: ignore[arg-type]
    alice = Claims("authenticated", 4e9, "alice", {"sub": "alice"})

    def channel(socket: str, *tables: str) -> ChangeSubscription:
        bindings = tuple(
            AuthorizedBinding(parse_binding({"event": "*", "schema": "public", "table": t}), (("public", t),), None)
            for t in tables
        )
        return ChangeSubscription(socket, "realtime:t", Vsn.V2, _send, bindings, claims=alice)

    await hub.subscribe_changes(channel("a", "todos", "posts"))
    await hub.subscribe_changes(channel("b", "todos"))
    assert registration.live() == {(("public", "todos"), "set-alice"): 2, (("public", "posts"), "set-alice"): 1}
    await hub.subscribe_changes(channel("a", "todos"))  # a token refresh or a publication change: posts is gone
    await asyncio.sleep(0)
    assert registration.live() == {(("public", "todos"), "set-alice"): 2}
    hub.unsubscribe_changes("a", "realtime:t")
    hub.unsubscribe_changes("b", "realtime:t")
    await asyncio.sleep(0)
    assert registration.live() == {}
    await hub.aclose()


async def test_a_channel_counts_as_filtered_on_a_table_only_if_all_its_bindings_there_filter() -> None:
    registration = CountingRegistration()
    hub = Hub(InMemoryChannelLayer(), registration)  # type: ignore[arg-type]
    alice = Claims("authenticated", 4e9, "alice", {"sub": "alice"})

    def bound(table: str, filter: str | None = None) -> AuthorizedBinding:
        raw = {"event": "*", "schema": "public", "table": table, **({"filter": filter} if filter else {})}
        matcher = compile_filter(filter, TYPES) if filter else None
        return AuthorizedBinding(parse_binding(raw), (("public", table),), matcher)

    todos, posts = ("public", "todos"), ("public", "posts")
    mixed = (bound("todos", "user_id=eq.1"), bound("todos"), bound("posts", "status=eq.x"))
    await hub.subscribe_changes(ChangeSubscription("a", "realtime:t", Vsn.V2, _send, mixed, claims=alice))
    # todos has an unfiltered binding: the replicator checks it; on posts every binding filters.
    assert {k: v for k, v in registration.filtered.items() if v} == {(posts, "set-alice"): 1}
    hub.unsubscribe_changes("a", "realtime:t")
    await asyncio.sleep(0)
    assert registration.live() == {} and not any(registration.filtered.values())
    assert todos not in {table for table, _ in registration.filtered}
    await hub.aclose()


def test_only_eq_filters_leave_a_claim_set_to_its_server_process() -> None:
    """An ``eq`` filter bounds what a channel is routed; ``gte`` or ``in`` may route every change."""
    todos = {("public", "todos")}
    assert subscription("s", binding(filter="user_id=eq.7")).filtered_tables() == todos
    assert subscription("s", binding(filter="id=gte.0")).filtered_tables() == set()
    assert subscription("s", binding(filter="user_id=eq.7"), binding(filter="id=gte.0")).filtered_tables() == set()
    assert subscription("s", binding()).filtered_tables() == set()
