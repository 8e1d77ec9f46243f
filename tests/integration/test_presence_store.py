"""Tests for presence.store against the real Redis: shared state, diffs, liveness and sweeping."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time
import uuid
from urllib.parse import urlsplit, urlunsplit
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

import presence
import presence.batch
import presence.scripts
import presence.store
from presence.keys import (
    channel_index_key,
    channels_key,
    member_key,
    process_key,
    process_members_key,
    processes_key,
)
from presence.state import Diff
from presence.store import RedisPresenceStore, TrackKind
from tests.integration.test_replication_crash import PrivateRedis

pytestmark = pytest.mark.integration

MakeStore = Callable[..., RedisPresenceStore]


def store_url() -> str:
    """REDIS_URL on a database of its own: server processes running during the
    session sweep dead processes in the default database, which would race
    these tests' own sweepers."""
    return urlunsplit(urlsplit(os.environ["REDIS_URL"])._replace(path="/13"))


@pytest.fixture
async def redis_client() -> AsyncIterator[Redis]:
    client = Redis.from_url(store_url(), decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def channel(redis_client: Redis) -> AsyncIterator[str]:
    """A channel name no other test uses; every key that mentions it is deleted afterwards."""
    name = f"public:presence-test-{uuid.uuid4().hex}"
    yield name
    async for key in redis_client.scan_iter(match=f"*{name}*"):
        await redis_client.delete(key)
    for member in await redis_client.smembers(channels_key()):
        if name in member:
            await redis_client.srem(channels_key(), member)


@pytest.fixture
async def make_store(redis_client: Redis) -> AsyncIterator[MakeStore]:
    """``make_store(ttl=..., process_id=...)`` -> a store; all closed and deregistered afterwards."""
    stores: list[RedisPresenceStore] = []

    def _make(ttl: float = 15.0, process_id: str | None = None, **options: Any) -> RedisPresenceStore:
        store = RedisPresenceStore(
            store_url(), process_id or f"test-{uuid.uuid4().hex}", ttl=ttl, **options
        )
        stores.append(store)
        return store

    yield _make
    for store in stores:
        await store.close()
        pid = store.process_id
        await redis_client.delete(process_key(pid), process_members_key(pid))
        await redis_client.zrem(processes_key(), pid)


def leaves_of(results: list[tuple[str, Diff]], channels: set[str]) -> list[str]:
    """The phx_refs of every leave in ``results`` on ``channels``, in order, duplicates kept."""
    return [
        meta["phx_ref"]
        for name, diff in results
        if name in channels
        for presence_ in diff["leaves"].values()
        for meta in presence_["metas"]
    ]


async def test_first_track_returns_a_join_diff_with_a_string_phx_ref(make_store: MakeStore, channel: str) -> None:
    store = make_store()
    result = await store.track(channel, "ann", "s1", {"user": "a"})
    assert result.kind is TrackKind.JOINED
    assert result.diff is not None
    meta = result.diff["joins"]["ann"]["metas"][0]
    assert meta["user"] == "a"
    assert isinstance(meta["phx_ref"], str) and meta["phx_ref"]
    assert result.diff["leaves"] == {}
    assert result.entry.meta == meta
    assert await store.state(channel) == {"ann": {"metas": [meta]}}


async def test_retracking_an_identical_payload_gives_no_diff(make_store: MakeStore, channel: str) -> None:
    store = make_store()
    first = await store.track(channel, "ann", "s1", {"user": "a", "mood": "ok"})
    again = await store.track(channel, "ann", "s1", {"mood": "ok", "user": "a"})
    assert again.kind is TrackKind.UNCHANGED
    assert again.diff is None
    assert again.entry == first.entry
    assert await store.state(channel) == {"ann": {"metas": [first.entry.meta]}}


async def test_retracking_a_changed_payload_gives_one_update_diff(make_store: MakeStore, channel: str) -> None:
    store = make_store()
    first = await store.track(channel, "ann", "s1", {"status": "away"})
    second = await store.track(channel, "ann", "s1", {"status": "online"})
    assert second.kind is TrackKind.UPDATED
    assert second.previous == first.entry
    new_ref = second.entry.phx_ref
    assert new_ref != first.entry.phx_ref
    assert second.diff == {
        "joins": {"ann": {"metas": [{"status": "online", "phx_ref": new_ref, "phx_ref_prev": first.entry.phx_ref}]}},
        "leaves": {"ann": {"metas": [{"status": "away", "phx_ref": first.entry.phx_ref}]}},
    }
    assert await store.state(channel) == {"ann": {"metas": [{"status": "online", "phx_ref": new_ref}]}}


async def test_retracking_under_another_key_leaves_the_old_key(make_store: MakeStore, channel: str) -> None:
    store = make_store()
    first = await store.track(channel, "ann", "s1", {"v": 1})
    second = await store.track(channel, "bob", "s1", {"v": 1})
    assert second.kind is TrackKind.UPDATED
    assert second.diff == {
        "joins": {"bob": {"metas": [second.entry.meta]}},
        "leaves": {"ann": {"metas": [first.entry.meta]}},
    }
    assert await store.state(channel) == {"bob": {"metas": [second.entry.meta]}}


async def test_untrack_returns_the_leave_of_the_last_meta(make_store: MakeStore, channel: str) -> None:
    store = make_store()
    await store.track(channel, "ann", "s1", {"v": 1})
    last = await store.track(channel, "ann", "s1", {"v": 2})
    assert await store.untrack(channel, "s1") == {"joins": {}, "leaves": {"ann": {"metas": [last.entry.meta]}}}
    assert await store.untrack(channel, "s1") is None
    assert await store.state(channel) == {}
    assert store.tracked("s1") == {}


async def test_untrack_of_an_untracked_socket_is_none(make_store: MakeStore, channel: str) -> None:
    assert await make_store().untrack(channel, "nobody") is None


async def test_untrack_socket_leaves_every_channel_of_the_socket(make_store: MakeStore, channel: str) -> None:
    store = make_store()
    other = f"{channel}-other"
    a = await store.track(channel, "ann", "s1", {"v": 1})
    b = await store.track(other, "ann", "s1", {"v": 1})
    kept = await store.track(channel, "bob", "s2", {"v": 1})
    leaves = await store.untrack_socket("s1")
    assert sorted(leaves) == sorted(
        [
            (channel, {"joins": {}, "leaves": {"ann": {"metas": [a.entry.meta]}}}),
            (other, {"joins": {}, "leaves": {"ann": {"metas": [b.entry.meta]}}}),
        ]
    )
    assert await store.state(channel) == {"bob": {"metas": [kept.entry.meta]}}
    assert await store.state(other) == {}
    assert await store.untrack_socket("s1") == []


async def test_public_and_private_channels_with_one_sub_topic_are_separate(make_store: MakeStore, channel: str) -> None:
    store = make_store()
    public = channel
    private = f"private:{channel}"
    await store.track(public, "ann", "s1", {"where": "public"})
    await store.track(private, "ann", "s1", {"where": "private"})
    assert [m["where"] for m in (await store.state(public))["ann"]["metas"]] == ["public"]
    assert [m["where"] for m in (await store.state(private))["ann"]["metas"]] == ["private"]
    await store.untrack_socket("s1")


async def test_two_processes_share_one_state(make_store: MakeStore, channel: str) -> None:
    first, second = make_store(), make_store()
    ann = await first.track(channel, "ann", "s1", {"user": "ann"})
    bob = await second.track(channel, "bob", "s1", {"user": "bob"})
    expected = {"ann": {"metas": [ann.entry.meta]}, "bob": {"metas": [bob.entry.meta]}}
    assert await first.state(channel) == expected
    assert await second.state(channel) == expected
    entries = await first.list(channel)
    assert [(e.key, e.process_id, e.socket_id) for e in entries] == [
        ("ann", first.process_id, "s1"),
        ("bob", second.process_id, "s1"),
    ]
    assert await second.untrack(channel, "s1") == {"joins": {}, "leaves": {"bob": {"metas": [bob.entry.meta]}}}
    assert await first.state(channel) == {"ann": {"metas": [ann.entry.meta]}}


async def test_several_sockets_with_one_key_give_several_metas_in_join_order(make_store: MakeStore, channel: str) -> None:
    first, second = make_store(), make_store()
    await first.track(channel, "ann", "s1", {"device": "laptop"})
    phone = await second.track(channel, "ann", "s9", {"device": "phone"})
    tablet = await first.track(channel, "ann", "s2", {"device": "tablet"})
    laptop = await first.track(channel, "ann", "s1", {"device": "laptop", "lid": "open"})
    state = await second.state(channel)
    assert list(state) == ["ann"]
    assert state["ann"]["metas"] == [laptop.entry.meta, phone.entry.meta, tablet.entry.meta]
    assert (channel, 3) in await first.channels()


async def test_channels_counts_members_and_forgets_empty_channels(make_store: MakeStore, channel: str) -> None:
    store = make_store()
    other = f"{channel}-other"
    await store.track(channel, "ann", "s1", {})
    await store.track(channel, "ann", "s2", {})
    await store.track(channel, "bob", "s3", {})
    await store.track(other, "cat", "s1", {})
    ours = {name: count for name, count in await store.channels() if name.startswith(channel)}
    assert ours == {channel: 3, other: 1}
    await store.untrack_socket("s1")
    await store.untrack_socket("s2")
    await store.untrack_socket("s3")
    assert [name for name, _ in await store.channels() if name.startswith(channel)] == []


async def test_remove_takes_out_a_meta_owned_by_another_process(make_store: MakeStore, channel: str) -> None:
    owner, admin = make_store(), make_store()
    ann = await owner.track(channel, "ann", "s1", {"user": "ann"})
    assert await admin.remove(channel, "ann", ann.entry.phx_ref) == {
        "joins": {},
        "leaves": {"ann": {"metas": [ann.entry.meta]}},
    }
    assert await admin.remove(channel, "ann", ann.entry.phx_ref) is None
    assert await owner.state(channel) == {}
    assert owner.tracked("s1") == {channel: ann.entry}
    assert await owner.heartbeat() == []
    assert owner.tracked("s1") == {}
    assert await owner.untrack(channel, "s1") is None


async def test_remove_of_an_own_entry_forgets_it_at_once(make_store: MakeStore, channel: str) -> None:
    store = make_store()
    ann = await store.track(channel, "ann", "s1", {})
    assert await store.remove(channel, "ann", ann.entry.phx_ref) is not None
    assert store.tracked("s1") == {}


async def test_presence_key_format_consistency(make_store: MakeStore, channel: str, redis_client: Redis) -> None:
    first, second = make_store(), make_store()
    refs = set()
    for store, key, socket_id in [(first, "alice", "s1"), (second, "alice", "s2"), (first, "bob", "s3")]:
        refs.add((key, (await store.track(channel, key, socket_id, {"k": key})).entry.phx_ref))
    await first.heartbeat()
    written = {key async for key in redis_client.scan_iter(match=f"*{channel}*")}
    hashes = {key for key in written if await redis_client.type(key) == "hash"}
    assert hashes == {member_key(channel, "alice"), member_key(channel, "bob")}
    assert {key for key in written if key.startswith("presence:channel:")} == hashes
    assert written == hashes | {channel_index_key(channel)}
    for key in ("alice", "bob"):
        fields = set(await redis_client.hkeys(member_key(channel, key)))
        assert fields == {ref for k, ref in refs if k == key}
    spellings = sorted(path.name for path in Path(presence.__file__).parent.glob("*.py") if "presence:channel:" in path.read_text())
    assert spellings == ["keys.py"]


async def test_member_keys_expire_unless_refreshed(make_store: MakeStore, channel: str, redis_client: Redis) -> None:
    store = make_store(ttl=2.0)
    await store.track(channel, "ann", "s1", {})
    ttl_ms = await redis_client.pttl(member_key(channel, "ann"))
    assert 0 < ttl_ms <= store.entry_ttl_ms
    assert await redis_client.pttl(process_key(store.process_id)) <= store.liveness_ms


async def test_a_dead_process_is_swept_by_another_process(make_store: MakeStore, channel: str) -> None:
    dead, alive = make_store(ttl=1.0), make_store(ttl=1.0)
    gone = await dead.track(channel, "ann", "s1", {"user": "ann"})
    kept = await alive.track(channel, "bob", "s2", {"user": "bob"})
    assert leaves_of(await alive.sweep(), {channel}) == []
    await asyncio.sleep(dead.liveness_ms / 1000 + 0.1)
    await alive.heartbeat()
    swept = [(name, diff) for name, diff in await alive.sweep() if name == channel]
    assert swept == [(channel, {"joins": {}, "leaves": {"ann": {"metas": [gone.entry.meta]}}})]
    assert await alive.state(channel) == {"bob": {"metas": [kept.entry.meta]}}
    assert leaves_of(await alive.sweep(), {channel}) == []


async def test_racing_sweepers_report_each_leave_exactly_once(
    make_store: MakeStore, channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(presence.store, "CHUNK_SIZE", 3)
    dead = make_store(ttl=1.0)
    sweepers = [make_store(ttl=1.0) for _ in range(3)]
    channels = {channel, f"{channel}-b", f"{channel}-c"}
    expected = set()
    for number in range(30):
        name = sorted(channels)[number % 3]
        result = await dead.track(name, f"user{number % 7}", f"s{number}", {"n": number})
        expected.add(result.entry.phx_ref)
    await asyncio.sleep(dead.liveness_ms / 1000 + 0.1)
    for sweeper in sweepers:
        await sweeper.heartbeat()
    results = await asyncio.gather(*(sweeper.sweep() for sweeper in sweepers for _ in range(2)))
    reported = [ref for result in results for ref in leaves_of(result, channels)]
    assert sorted(reported) == sorted(expected)
    for name in channels:
        assert await sweepers[0].state(name) == {}


async def test_a_live_process_is_never_swept(make_store: MakeStore, channel: str) -> None:
    live, sweeper = make_store(ttl=1.5), make_store(ttl=1.5)
    stop = asyncio.Event()
    delivered: list[tuple[str, Diff]] = []
    maintenance = asyncio.create_task(live.run_maintenance(stop, lambda name, diff: delivered.append((name, diff))))
    tracked = [await live.track(channel, f"user{n}", f"s{n}", {"n": n}) for n in range(5)]
    swept: list[tuple[str, Diff]] = []
    deadline = time.monotonic() + 3 * live.ttl
    while time.monotonic() < deadline:
        swept += await sweeper.sweep()
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(maintenance, 5)
    assert leaves_of(swept, {channel}) == []
    assert leaves_of(delivered, {channel}) == []
    state = await sweeper.state(channel)
    assert sorted(state) == sorted(t.entry.key for t in tracked)


async def test_maintenance_reports_a_dead_process_leaves_within_ttl(make_store: MakeStore, channel: str) -> None:
    dead, survivor = make_store(ttl=1.5), make_store(ttl=1.5)
    stop = asyncio.Event()
    delivered: list[tuple[float, str, Diff]] = []

    async def on_leaves(name: str, diff: Diff) -> None:
        delivered.append((time.monotonic(), name, diff))

    maintenance = asyncio.create_task(survivor.run_maintenance(stop, on_leaves))
    gone = await dead.track(channel, "ann", "s1", {"user": "ann"})
    last_heartbeat = time.monotonic()
    while not any(name == channel for _, name, _ in delivered) and time.monotonic() < last_heartbeat + 10:
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(maintenance, 5)
    ours = [(at, diff) for at, name, diff in delivered if name == channel]
    assert [diff for _, diff in ours] == [{"joins": {}, "leaves": {"ann": {"metas": [gone.entry.meta]}}}]
    elapsed = ours[0][0] - last_heartbeat
    assert dead.liveness_ms / 1000 - 0.1 <= elapsed <= dead.ttl + 0.5


def test_the_default_ttl_sweeps_within_15_seconds() -> None:
    store = RedisPresenceStore("redis://127.0.0.1:1/0", "p")
    assert store.ttl == 15
    assert store.liveness_ms / 1000 + store.sweep_interval <= 15
    assert store.heartbeat_interval == 5
    assert store.liveness_ms / 1000 >= 2 * store.heartbeat_interval


async def test_maintenance_keeps_going_through_redis_errors(
    make_store: MakeStore, channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead, survivor = make_store(ttl=1.0), make_store(ttl=1.0)
    real_sweep = survivor.sweep
    failures = 0

    async def flaky_sweep() -> list[tuple[str, Diff]]:
        nonlocal failures
        if failures < 3:
            failures += 1
            raise RedisConnectionError("connection reset")
        return await real_sweep()

    monkeypatch.setattr(survivor, "sweep", flaky_sweep)
    gone = await dead.track(channel, "ann", "s1", {})
    stop = asyncio.Event()
    delivered: list[tuple[str, Diff]] = []
    maintenance = asyncio.create_task(survivor.run_maintenance(stop, lambda name, diff: delivered.append((name, diff))))
    deadline = time.monotonic() + 10
    while not leaves_of(delivered, {channel}) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(maintenance, 5)
    assert failures == 3
    assert leaves_of(delivered, {channel}) == [gone.entry.phx_ref]


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_maintenance_logs_and_retries_while_redis_is_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    store = RedisPresenceStore(f"redis://127.0.0.1:{_unused_port()}/0", "unreachable", ttl=0.6, socket_connect_timeout=0.2)
    stop = asyncio.Event()
    with caplog.at_level(logging.WARNING, logger="presence.maintenance"):
        maintenance = asyncio.create_task(store.run_maintenance(stop, lambda name, diff: None))
        await asyncio.sleep(0.8)
        assert not maintenance.done()
        stop.set()
        await asyncio.wait_for(maintenance, 5)
    await store.close()
    failures = [r for r in caplog.records if "failed, retrying" in r.getMessage()]
    assert len(failures) >= 2


async def test_a_failed_untrack_is_retried_by_the_next_heartbeat(
    make_store: MakeStore, channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store()
    ann = await store.track(channel, "ann", "s1", {})
    real_remove = store._remove_entry

    async def failing_remove(*args: Any) -> Any:
        raise RedisConnectionError("connection reset")

    monkeypatch.setattr(store, "_remove_entry", failing_remove)
    assert await store.untrack_socket("s1") == []
    assert await store.untrack(channel, "s1") is None
    monkeypatch.setattr(store, "_remove_entry", real_remove)
    assert await store.heartbeat() == [(channel, {"joins": {}, "leaves": {"ann": {"metas": [ann.entry.meta]}}})]
    assert await store.state(channel) == {}
    assert await store.heartbeat() == []


def lose_track_replies(store: RedisPresenceStore, monkeypatch: pytest.MonkeyPatch, *, after_write: bool) -> None:
    """Make ``track`` fail like a dropped connection, before or after its script ran."""
    real_eval = store._eval

    async def lossy_eval(script: Any, keys: Any, args: Any) -> Any:
        if script != presence.scripts.TRACK:
            return await real_eval(script, keys, args)
        if after_write:
            await real_eval(script, keys, args)
        raise RedisConnectionError("connection reset")

    monkeypatch.setattr(store, "_eval", lossy_eval)


async def test_a_join_whose_reply_was_lost_is_left_by_the_next_heartbeat(
    make_store: MakeStore, channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store()
    lose_track_replies(store, monkeypatch, after_write=True)
    with pytest.raises(RedisConnectionError):
        await store.track(channel, "ann", "s1", {"user": "ann"})
    [written] = (await store.state(channel))["ann"]["metas"]
    monkeypatch.undo()
    assert await store.heartbeat() == [(channel, {"joins": {}, "leaves": {"ann": {"metas": [written]}}})]
    assert await store.state(channel) == {}
    assert store.tracked("s1") == {}


async def test_an_update_whose_reply_was_lost_leaves_both_metas(
    make_store: MakeStore, channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store()
    first = await store.track(channel, "ann", "s1", {"v": 1})
    lose_track_replies(store, monkeypatch, after_write=True)
    with pytest.raises(RedisConnectionError):
        await store.track(channel, "ann", "s1", {"v": 2})
    [written] = (await store.state(channel))["ann"]["metas"]
    assert written["v"] == 2
    monkeypatch.undo()
    assert await store.heartbeat() == [(channel, {"joins": {}, "leaves": {"ann": {"metas": [first.entry.meta, written]}}})]
    assert await store.state(channel) == {}


async def test_an_update_that_never_reached_redis_leaves_the_old_meta(
    make_store: MakeStore, channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store()
    first = await store.track(channel, "ann", "s1", {"v": 1})
    lose_track_replies(store, monkeypatch, after_write=False)
    with pytest.raises(RedisConnectionError):
        await store.track(channel, "ann", "s1", {"v": 2})
    monkeypatch.undo()
    assert await store.heartbeat() == [(channel, {"joins": {}, "leaves": {"ann": {"metas": [first.entry.meta]}}})]
    assert await store.state(channel) == {}


async def test_tracks_made_together_share_pipelines_and_each_gets_its_own_result(
    make_store: MakeStore, channel: str, redis_client: Redis
) -> None:
    store = make_store()
    await redis_client.script_flush()  # the first pipeline meets scripts Redis does not know
    results = await asyncio.gather(*(store.track(channel, f"k{n}", f"s{n}", {"n": n}) for n in range(60)))
    assert [r.kind for r in results] == [TrackKind.JOINED] * 60
    assert [r.entry.key for r in results] == [f"k{n}" for n in range(60)]
    state = await store.state(channel)
    assert sorted(state) == sorted(f"k{n}" for n in range(60))
    assert all(state[f"k{n}"]["metas"][0]["n"] == n for n in range(60))
    updated = await asyncio.gather(*(store.track(channel, f"k{n}", f"s{n}", {"n": n + 100}) for n in range(60)))
    assert [r.kind for r in updated] == [TrackKind.UPDATED] * 60


async def scripts_known(client: Redis, *names: str) -> list[bool]:
    """Whether Redis knows each named script of ``presence.scripts``."""
    shas = [hashlib.sha1(getattr(presence.scripts, name).encode()).hexdigest() for name in names]
    return list(await client.script_exists(*shas))


async def test_scripts_flushed_from_redis_are_loaded_again_alone_and_in_pipelines(
    make_store: MakeStore, channel: str, redis_client: Redis
) -> None:
    store = make_store()
    ann = await store.track(channel, "ann", "s0", {"n": 0})
    await redis_client.script_flush()  # what a Redis restart does to the scripts
    alone = await store.track(channel, "ann", "s0", {"n": 1})  # one call on its own: EVALSHA, NOSCRIPT, load
    assert (alone.kind, alone.previous) == (TrackKind.UPDATED, ann.entry)
    assert await store.state(channel) == {"ann": {"metas": [alone.entry.meta]}}

    await redis_client.script_flush()
    await store.track(channel, "k0", "s1", {"n": 0})  # loads TRACK only
    # One pipeline of tracks (TRACK known) and untracks (REMOVE flushed): each call gets its own result.
    tracks = [store.track(channel, f"k{n}", f"s{n + 1}", {"n": n}) for n in range(1, 20)]
    untracks = [store.untrack(channel, "s0"), store.untrack(channel, "s1")]
    *tracked, left_ann, left_k0 = await asyncio.gather(*tracks, *untracks)
    assert [r.kind for r in tracked] == [TrackKind.JOINED] * 19
    assert left_ann == {"joins": {}, "leaves": {"ann": {"metas": [alone.entry.meta]}}}
    assert left_k0 is not None and list(left_k0["leaves"]) == ["k0"]
    state = await store.state(channel)
    assert sorted(state) == sorted(f"k{n}" for n in range(1, 20))
    assert all(state[f"k{n}"]["metas"][0]["n"] == n for n in range(1, 20))

    await redis_client.script_flush()
    assert await scripts_known(redis_client, "LIVENESS", "REFRESH", "CANDIDATES") == [False] * 3
    assert await store.heartbeat() == []
    assert await store.sweep() == []
    assert await scripts_known(redis_client, "LIVENESS", "REFRESH", "CANDIDATES") == [True] * 3
    assert [name for name, _ in await store.channels() if name == channel] == [channel]
    await store.untrack_socket("s2")
    assert "k1" not in await store.state(channel)


async def test_calls_that_ran_keep_their_replies_when_reloading_the_others_fails(
    make_store: MakeStore, channel: str, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store()
    ann = await store.track(channel, "ann", "s0", {})
    await redis_client.script_flush()
    await store.track(channel, "k0", "s1", {})  # loads TRACK; REMOVE stays unknown
    real_pipeline = presence.batch.ScriptBatch._pipeline

    async def reload_fails(self: Any, calls: Any, *, load: bool) -> Any:
        if load:
            raise RedisConnectionError("connection reset")
        return await real_pipeline(self, calls, load=load)

    monkeypatch.setattr(presence.batch.ScriptBatch, "_pipeline", reload_fails)
    tracked, untracked = await asyncio.gather(
        store.track(channel, "bob", "s2", {}), store.untrack(channel, "s0"), return_exceptions=True
    )
    assert isinstance(untracked, RedisConnectionError)
    assert not isinstance(tracked, BaseException) and tracked.kind is TrackKind.JOINED
    monkeypatch.undo()
    assert sorted(await store.state(channel)) == ["ann", "bob", "k0"]
    # The failed untrack is retried by the next heartbeat, as after any Redis error.
    assert await store.heartbeat() == [(channel, {"joins": {}, "leaves": {"ann": {"metas": [ann.entry.meta]}}})]
    assert sorted(await store.state(channel)) == ["bob", "k0"]


async def test_the_store_keeps_working_across_a_redis_restart(tmp_path: Path) -> None:
    private = PrivateRedis(tmp_path)
    private.start()
    store = RedisPresenceStore(private.url, f"test-{uuid.uuid4().hex}", ttl=3.0)
    channel = f"public:restart-{uuid.uuid4().hex}"
    try:
        ann = await store.track(channel, "ann", "s1", {"user": "ann"})
        private.kill()
        private.start()  # no persistence: every key and every script is gone
        deadline = time.monotonic() + 10
        while True:  # the pooled connections died with the server: the first calls may fail
            try:
                restored = await store.heartbeat()
                break
            except (RedisConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        assert restored == [(channel, {"joins": {"ann": {"metas": [ann.entry.meta]}}, "leaves": {}})]
        results = await asyncio.gather(*(store.track(channel, f"k{n}", f"s{n + 2}", {"n": n}) for n in range(10)))
        assert [r.kind for r in results] == [TrackKind.JOINED] * 10
        assert sorted(await store.state(channel)) == sorted(["ann", *(f"k{n}" for n in range(10))])
    finally:
        await store.close()
        private.kill()


# --- names chosen by clients --------------------------------------------------------


async def test_channels_whose_names_once_shared_a_member_key_stay_apart(make_store: MakeStore, redis_client: Redis) -> None:
    # Before key names were escaped both pairs were spelled
    # presence:channel:public:<id>:user:ann:user:x, so each channel's index
    # pointed at the other's metas and counted them as its own.
    base = f"public:hostile-{uuid.uuid4().hex}"
    pairs = [(f"{base}:user:ann", "x", "s1"), (base, "ann:user:x", "s2")]
    store = make_store()
    try:
        results = [await store.track(channel, key, socket_id, {"who": key}) for channel, key, socket_id in pairs]
        (first, first_key, _), (second, second_key, _) = pairs
        assert member_key(first, first_key) != member_key(second, second_key)
        for (channel, key, _), result in zip(pairs, results):
            assert await store.state(channel) == {key: {"metas": [result.entry.meta]}}
            assert await redis_client.hlen(member_key(channel, key)) == 1
        ours = {name: count for name, count in await store.channels() if name.startswith(base)}
        assert ours == {first: 1, second: 1}
        assert await store.remove(first, second_key, results[1].entry.phx_ref) is None
        await store.untrack_socket("s1")
        assert await store.state(first) == {}
        assert await store.state(second) == {second_key: {"metas": [results[1].entry.meta]}}
        assert {name: count for name, count in await store.channels() if name.startswith(base)} == {second: 1}
    finally:
        await store.untrack_socket("s1")
        await store.untrack_socket("s2")


async def test_glob_characters_in_a_channel_name_match_no_other_channel(make_store: MakeStore, redis_client: Redis) -> None:
    base = f"public:glob-{uuid.uuid4().hex}"
    names = [f"{base}*", f"{base}[ab]", f"{base}a", f"{base}?", f"{base}\\", f"{base}\nb", f"{base}/b", f"{base}%2Fb"]
    store = make_store()
    try:
        for number, name in enumerate(names):
            await store.track(name, f"k*{number}", f"s{number}", {"n": number})
        for number, name in enumerate(names):
            assert list(await store.state(name)) == [f"k*{number}"]
            # A SCAN pattern made of a channel's own key names finds that channel's keys alone.
            assert [key async for key in redis_client.scan_iter(match=channel_index_key(name))] == [channel_index_key(name)]
            assert [key async for key in redis_client.scan_iter(match=member_key(name, f"k*{number}"))] == [
                member_key(name, f"k*{number}")
            ]
        ours = {name: count for name, count in await store.channels() if name.startswith(base)}
        assert ours == {name: 1 for name in names}
    finally:
        for number in range(len(names)):
            await store.untrack_socket(f"s{number}")


async def test_a_process_swept_while_its_loop_stalled_tracks_its_members_again(make_store: MakeStore, channel: str) -> None:
    stalled, other = make_store(ttl=1.0), make_store(ttl=1.0)
    ann = await stalled.track(channel, "ann", "s1", {"user": "ann"})
    await asyncio.sleep(stalled.liveness_ms / 1000 + 0.1)  # no heartbeat meanwhile: a stalled loop
    await other.heartbeat()
    await other.sweep()  # or a sweeper of another test run gets there first
    assert await other.state(channel) == {}

    assert await stalled.heartbeat() == [(channel, {"joins": {"ann": {"metas": [ann.entry.meta]}}, "leaves": {}})]
    assert await other.state(channel) == {"ann": {"metas": [ann.entry.meta]}}
    assert stalled.tracked("s1") == {channel: ann.entry}
    assert await stalled.heartbeat() == []
    # Owned again: its untrack is the one leave, and nothing is left behind.
    assert await stalled.untrack(channel, "s1") == {"joins": {}, "leaves": {"ann": {"metas": [ann.entry.meta]}}}
    assert await other.state(channel) == {}


async def test_a_track_after_the_stall_does_not_hide_the_sweep_from_the_next_heartbeat(
    make_store: MakeStore, channel: str
) -> None:
    stalled, other = make_store(ttl=1.0), make_store(ttl=1.0)
    ann = await stalled.track(channel, "ann", "s1", {"user": "ann"})
    await asyncio.sleep(stalled.liveness_ms / 1000 + 0.1)
    await other.heartbeat()
    await other.sweep()
    assert await other.state(channel) == {}
    await stalled.track(f"{channel}-b", "bob", "s2", {"user": "bob"})  # writes the liveness key again

    restored = [(name, diff) for name, diff in await stalled.heartbeat() if name == channel]
    assert restored == [(channel, {"joins": {"ann": {"metas": [ann.entry.meta]}}, "leaves": {}})]
    assert await other.state(channel) == {"ann": {"metas": [ann.entry.meta]}}


async def test_a_member_re_tracked_while_the_heartbeat_restores_is_present_once(
    make_store: MakeStore, channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stalled, other = make_store(ttl=1.0), make_store(ttl=1.0)
    await stalled.track(channel, "ann", "s1", {"user": "ann", "v": 1})
    await asyncio.sleep(stalled.liveness_ms / 1000 + 0.1)
    await other.heartbeat()
    await other.sweep()
    tracks: list[asyncio.Task[Any]] = []
    original = stalled._eval

    async def track_while_refreshing(script: Any, keys: Any, args: Any) -> Any:
        refresh = asyncio.ensure_future(original(script, keys, args))
        if script == presence.scripts.REFRESH and not tracks:
            await asyncio.sleep(0)  # the refresh is on its way; the socket re-tracks meanwhile
            tracks.append(asyncio.ensure_future(stalled.track(channel, "ann", "s1", {"user": "ann", "v": 2})))
            await asyncio.sleep(0)
        return await refresh

    monkeypatch.setattr(stalled, "_eval", track_while_refreshing)
    await stalled.heartbeat()
    retracked = await tracks[0]
    assert await other.state(channel) == {"ann": {"metas": [retracked.entry.meta]}}
    assert await stalled.heartbeat() == []
