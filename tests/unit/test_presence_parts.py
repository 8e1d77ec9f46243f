"""Tests for the service-free parts of the presence store: how entries are stored
(presence.entries) and the maintenance loop (presence.maintenance), on a store
that keeps its diffs in memory."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError

from presence.entries import decode_entry, encode_entry, owner_ref, parse_owner_ref, signature
from presence.maintenance import ChannelDiffs, run_maintenance
from presence.state import Diff, Entry, join_diff, leave_diff

pytestmark = pytest.mark.unit

names = st.text(max_size=20)


def an_entry(**fields: Any) -> Entry:
    values: dict[str, Any] = {
        "channel": "public:room",
        "key": "ann",
        "phx_ref": "F1",
        "meta": {"user": "ann", "phx_ref": "F1"},
        "socket_id": "s1",
        "process_id": "p1",
        "joined_at": 1.5,
    }
    return Entry(**{**values, **fields})


# --- presence.entries ---------------------------------------------------------------


@given(channel=names, key=names, phx_ref=names, user=names, joined_at=st.floats(allow_nan=False, allow_infinity=False))
def test_an_encoded_entry_decodes_to_itself(channel: str, key: str, phx_ref: str, user: str, joined_at: float) -> None:
    entry = an_entry(channel=channel, key=key, phx_ref=phx_ref, meta={"user": user, "phx_ref": phx_ref}, joined_at=joined_at)
    raw = encode_entry(entry, "sig")
    assert decode_entry(raw) == entry
    assert json.loads(raw)["sig"] == "sig"


@pytest.mark.parametrize(
    "raw",
    ["", "not json", "[]", "null", '{"channel": "c"}', json.dumps({**json.loads(encode_entry(an_entry(), "s")), "joined_at": "x"})],
)
def test_a_malformed_entry_decodes_to_none_and_is_logged(raw: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="presence.entries"):
        assert decode_entry(raw) is None
    assert any("malformed entry" in record.getMessage() for record in caplog.records)


@given(channel=names, key=names, phx_ref=names)
def test_an_owner_ref_parses_back_to_its_parts(channel: str, key: str, phx_ref: str) -> None:
    assert parse_owner_ref(owner_ref(channel, key, phx_ref)) == (channel, key, phx_ref)


@pytest.mark.parametrize("raw", ["", "x", "[]", '["a", "b"]', '["a", "b", 3]', '{"a": 1}', '["a", "b", "c", "d"]'])
def test_anything_else_is_no_owner_ref(raw: str) -> None:
    assert parse_owner_ref(raw) is None


def test_a_payload_signature_ignores_key_order_and_sees_values() -> None:
    assert signature({"a": 1, "b": [1, 2]}) == signature({"b": [1, 2], "a": 1})
    assert signature({"a": 1}) != signature({"a": 2})
    assert signature({"a": 1}) != signature({"a": "1"})


# --- presence.maintenance -----------------------------------------------------------


class FakeStore:
    """Steps that return queued diffs, or raise queued errors, and count their calls."""

    def __init__(self, heartbeat_interval: float, sweep_interval: float, retry_interval: float = 0.01) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.sweep_interval = sweep_interval
        self.retry_interval = retry_interval
        self.outcomes: dict[str, list[ChannelDiffs | Exception]] = {"heartbeat": [], "sweep": []}
        self.calls: dict[str, list[float]] = {"heartbeat": [], "sweep": []}

    async def _step(self, step: str) -> ChannelDiffs:
        self.calls[step].append(asyncio.get_running_loop().time())
        if not self.outcomes[step]:
            return []
        outcome = self.outcomes[step].pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def heartbeat(self) -> ChannelDiffs:
        return await self._step("heartbeat")

    async def sweep(self) -> ChannelDiffs:
        return await self._step("sweep")


async def run_for(store: FakeStore, seconds: float, on_leaves: Any) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(run_maintenance(store, stop, on_leaves))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(task, 1)


async def test_each_step_runs_on_its_own_schedule_and_hands_over_its_diffs() -> None:
    store = FakeStore(heartbeat_interval=1.0, sweep_interval=0.01)
    leave = leave_diff("ann", {"phx_ref": "F1"})
    join = join_diff("bob", {"phx_ref": "F2"})
    store.outcomes["heartbeat"] = [[("public:a", join)]]
    store.outcomes["sweep"] = [[("public:a", leave), ("public:b", leave)]]
    delivered: list[tuple[str, Diff]] = []
    await run_for(store, 0.15, lambda channel, diff: delivered.append((channel, diff)))
    assert delivered == [("public:a", join), ("public:a", leave), ("public:b", leave)]
    # In 0.15 s: one heartbeat (the next is due at 1 s), a sweep every 0.01 s (fewer on a loaded machine).
    assert len(store.calls["heartbeat"]) == 1
    assert len(store.calls["sweep"]) >= 3
    gaps = [later - earlier for earlier, later in zip(store.calls["sweep"], store.calls["sweep"][1:])]
    assert min(gaps) >= 0.01 - 0.002


async def test_a_failed_step_is_logged_and_retried_after_the_retry_interval(caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore(heartbeat_interval=10.0, sweep_interval=10.0, retry_interval=0.02)
    store.outcomes["heartbeat"] = [RedisConnectionError("down"), RuntimeError("bug"), [("public:a", join_diff("ann", {}))]]
    delivered: list[str] = []

    async def on_leaves(channel: str, diff: Diff) -> None:
        delivered.append(channel)

    with caplog.at_level(logging.WARNING, logger="presence.maintenance"):
        await run_for(store, 0.15, on_leaves)
    assert len(store.calls["heartbeat"]) == 3  # two retries, then the 10 s interval
    assert delivered == ["public:a"]
    failures = [record for record in caplog.records if "heartbeat failed, retrying" in record.getMessage()]
    assert [record.exc_info is not None for record in failures] == [False, True]  # a bug's traceback is logged


async def test_a_failing_on_leaves_is_logged_and_the_other_diffs_still_delivered(caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore(heartbeat_interval=10.0, sweep_interval=10.0)
    store.outcomes["sweep"] = [[("public:a", leave_diff("ann", {})), ("public:b", leave_diff("bob", {}))]]
    delivered: list[str] = []

    def on_leaves(channel: str, diff: Diff) -> None:
        if channel == "public:a":
            raise RuntimeError("broken")
        delivered.append(channel)

    with caplog.at_level(logging.ERROR, logger="presence.maintenance"):
        await run_for(store, 0.05, on_leaves)
    assert delivered == ["public:b"]
    assert any("on_leaves failed for public:a" in record.getMessage() for record in caplog.records)


async def test_a_set_stop_event_ends_the_loop_without_waiting_for_the_next_step() -> None:
    store = FakeStore(heartbeat_interval=60.0, sweep_interval=60.0)
    stop = asyncio.Event()
    task = asyncio.create_task(run_maintenance(store, stop, lambda channel, diff: None))
    await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 0.5)
    assert (len(store.calls["heartbeat"]), len(store.calls["sweep"])) == (1, 1)
