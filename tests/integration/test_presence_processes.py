"""Presence shared by two daphne processes on one Redis, and swept when one is killed.

Each test starts its own pair of servers (``start_server``, default
``REALTIME_PRESENCE_TTL_S``) because one of them is killed with SIGKILL. The
clients speak vsn 2.0.0 text frames over the ``websockets`` client
(PROTOCOL.md 2.2, 6.2): a member tracked on one process appears in the other
process's ``presence_state`` and ``presence_diff``; the members of a process
that dies without a word leave, for every survivor, within the TTL
(PROTOCOL.md 6.2 "Leaves", checklist C86).
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from tests.fixtures.phoenix import WAIT_S, PhoenixClient, client_opener, is_text
from tests.fixtures.server import ServerProcess, start_server

pytestmark = pytest.mark.integration

PRESENCE_TTL_S = 15.0
LEAVE_WAIT_S = PRESENCE_TTL_S + 15.0
STALL_TTL_S = 5  # REALTIME_PRESENCE_TTL_S of the servers whose loop is stalled with SIGSTOP



class PresenceClient(PhoenixClient):
    """A socket on one topic with presence on."""

    topic = ""

    async def join(self, topic: str, key: str) -> dict[str, Any]:
        """Join with presence on under ``key``; the ``presence_state`` that follows the reply."""
        self.topic = topic
        config = {"broadcast": {"ack": False, "self": False}, "presence": {"enabled": True, "key": key}}
        reply = await self.join_topic(topic, config)
        state = await self.wait_for(lambda f: is_text(f, "presence_state"), "presence_state")
        assert state[0] == reply[0] and state[1] is None and state[2] == topic, state
        assert self.frames.index(state) > self.frames.index(reply), "presence_state came before the join reply"
        result: dict[str, Any] = state[4]
        return result

    async def track(self, payload: dict[str, Any]) -> None:
        ref = await self.push(self.topic, "presence", {"type": "presence", "event": "track", "payload": payload})
        reply = await self.wait_for(lambda f: is_text(f, "phx_reply") and f[1] == ref, "track reply")
        assert reply[4] == {"status": "ok", "response": {}}, f"{self.name}: track refused: {reply!r}"

    def diffs(self) -> list[dict[str, Any]]:
        return [frame[4] for frame in self.frames if is_text(frame, "presence_diff")]

    async def wait_diff(self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = WAIT_S) -> dict[str, Any]:
        frame = await self.wait_for(lambda f: is_text(f, "presence_diff") and predicate(f[4]), what, timeout)
        assert frame[0] is None and frame[1] is None and frame[2] == self.topic, frame
        diff: dict[str, Any] = frame[4]
        assert set(diff) == {"joins", "leaves"}, diff
        return diff


def joined(key: str, user: str) -> Callable[[dict[str, Any]], bool]:
    return lambda diff: any(meta.get("user") == user for meta in diff["joins"].get(key, {}).get("metas", []))


def left(key: str) -> Callable[[dict[str, Any]], bool]:
    return lambda diff: key in diff["leaves"]


def later(client: PresenceClient, predicate: Callable[[dict[str, Any]], bool]) -> Callable[[dict[str, Any]], bool]:
    """``predicate``, for diffs received after this call only."""
    seen = {id(diff) for diff in client.diffs()}
    return lambda diff: id(diff) not in seen and predicate(diff)


def users(state: dict[str, Any], key: str) -> list[str]:
    return [meta["user"] for meta in state.get(key, {}).get("metas", [])]


@pytest.fixture
def servers() -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with start_server() as first, start_server() as second:
        yield first, second


@pytest.fixture
async def clients(servers: tuple[ServerProcess, ServerProcess]) -> AsyncIterator[Callable[[ServerProcess, str], Awaitable[PresenceClient]]]:
    async with client_opener(PresenceClient) as open_client:
        yield open_client


def room() -> str:
    return f"realtime:presence-procs-{uuid.uuid4().hex[:8]}"


async def track_on_both(
    servers: tuple[ServerProcess, ServerProcess], clients: Callable[[ServerProcess, str], Awaitable[PresenceClient]]
) -> tuple[PresenceClient, PresenceClient]:
    """Alice tracks on the first process, then Bob joins and tracks on the second; each sees the other."""
    first, second = servers
    topic = room()
    alice = await clients(first, "alice on first")
    assert await alice.join(topic, "alice") == {}
    await alice.track({"user": "alice"})
    await alice.wait_diff(joined("alice", "alice"), "alice's own join")

    bob = await clients(second, "bob on second")
    state = await bob.join(topic, "bob")
    assert list(state) == ["alice"], state
    assert users(state, "alice") == ["alice"]
    assert isinstance(state["alice"]["metas"][0]["phx_ref"], str)
    await bob.track({"user": "bob"})

    diff = await alice.wait_diff(joined("bob", "bob"), "bob's join from the other process")
    assert diff["leaves"] == {} and list(diff["joins"]) == ["bob"], diff
    assert isinstance(diff["joins"]["bob"]["metas"][0]["phx_ref"], str)
    await bob.wait_diff(joined("bob", "bob"), "bob's own join")
    assert not any(joined("alice", "alice")(d) for d in bob.diffs()), "bob got alice's join as a diff too"
    return alice, bob


async def test_a_member_tracked_on_one_process_is_seen_from_the_other(servers, clients) -> None:  # C81, C83
    alice, bob = await track_on_both(servers, clients)

    carol = await clients(servers[0], "carol on first")
    state = await carol.join(alice.topic, "carol")
    assert sorted(state) == ["alice", "bob"], state
    assert users(state, "alice") == ["alice"] and users(state, "bob") == ["bob"]
    for server in servers:
        server.check_alive()


async def test_the_members_of_a_killed_process_leave_within_the_ttl(servers, clients) -> None:  # C86
    first, second = servers
    alice, bob = await track_on_both(servers, clients)
    assert second.process is not None

    second.process.kill()
    killed_at = time.monotonic()
    second.process.wait(5)
    diff = await alice.wait_diff(left("bob"), "bob's leave after kill -9", timeout=LEAVE_WAIT_S)
    elapsed = time.monotonic() - killed_at
    print(f"\npresence leave after SIGKILL of the other process: {elapsed:.2f} s (TTL {PRESENCE_TTL_S:g} s)")

    assert diff["joins"] == {}, diff
    assert list(diff["leaves"]) == ["bob"], diff
    assert users(diff["leaves"], "bob") == ["bob"]
    assert elapsed <= PRESENCE_TTL_S, f"the leave took {elapsed:.2f} s, more than the {PRESENCE_TTL_S:g} s TTL"
    assert not any(left("alice")(d) for d in alice.diffs()), alice.diffs()

    dave = await clients(first, "dave on first")
    state = await dave.join(alice.topic, "dave")
    assert list(state) == ["alice"], f"ghost members after the sweep: {state}"
    assert users(state, "alice") == ["alice"]
    first.check_alive()


async def test_a_process_whose_loop_stalled_past_the_ttl_tracks_its_members_again() -> None:
    """SIGSTOP stalls a process past the TTL: the other sweeps its member; SIGCONT brings the member back."""
    env = {"REALTIME_PRESENCE_TTL_S": str(STALL_TTL_S)}
    with start_server(env=env) as first, start_server(env=env) as second:
        async with client_opener(PresenceClient) as clients:
            alice, bob = await track_on_both((first, second), clients)
            assert second.process is not None
            bob_left = later(alice, left("bob"))
            second.process.send_signal(signal.SIGSTOP)
            try:
                leave = await alice.wait_diff(bob_left, "bob's leave while his process is stopped", timeout=STALL_TTL_S + 15)
                bob_back = later(alice, joined("bob", "bob"))
            finally:
                second.process.send_signal(signal.SIGCONT)
            join = await alice.wait_diff(bob_back, "bob's join once his process runs again", timeout=15)
            assert join["leaves"] == {} and join["joins"] == leave["leaves"], (leave, join)  # the same meta, same phx_ref

            carol = await clients(first, "carol on first")
            state = await carol.join(alice.topic, "carol")
            assert sorted(state) == ["alice", "bob"], state
            assert users(state, "bob") == ["bob"]

            # Bob's socket stayed connected and his entry is owned again: his leaving is one more leave.
            bob_gone = later(alice, left("bob"))
            await bob.close()
            await alice.wait_diff(bob_gone, "bob's leave after his socket closed")
            dave = await clients(first, "dave on first")
            assert sorted(await dave.join(alice.topic, "dave")) == ["alice"]  # carol joined without tracking
            for server in (first, second):
                server.check_alive()
