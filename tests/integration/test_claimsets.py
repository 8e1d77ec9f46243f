"""The claim-set registry against the real Redis: shared across processes, forgetting dead ones."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from django.conf import settings
from redis.asyncio import Redis

from shared.claimsets import Directory, Registration, fingerprint
from core.jwt import Claims

pytestmark = pytest.mark.integration

TABLE = ("public", "notes")


def claims(sub: str, role: str = "authenticated") -> Claims:
    return Claims(role=role, exp=4_102_444_800, sub=sub, raw={"role": role, "sub": sub, "exp": 4_102_444_800})


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"test-claimsets-{uuid.uuid4().hex[:8]}"


async def test_two_processes_share_one_view_and_identical_claims_share_one_entry(redis, prefix) -> None:
    one = Registration(redis, prefix, "one")
    two = Registration(redis, prefix, "two")
    directory = Directory(redis, prefix)
    alice = await one.add([TABLE], claims("alice"))
    assert await two.add([TABLE], claims("alice")) == alice  # same claims, same claim set
    bob = await two.add([TABLE, ("public", "other")], claims("bob"))
    assert set(await directory.claim_sets(TABLE)) == {alice, bob}
    assert set(await directory.claim_sets(("public", "other"))) == {bob}
    assert (await directory.claim_sets(TABLE))[bob].sub == "bob"
    await two.remove([TABLE, ("public", "other")], bob)
    assert set(await directory.claim_sets(TABLE)) == {alice}
    await one.aclose()
    await two.aclose()


async def test_an_entry_stays_while_any_local_channel_uses_it(redis, prefix) -> None:
    process = Registration(redis, prefix, "p")
    directory = Directory(redis, prefix)
    claim_set = await process.add([TABLE], claims("alice"))
    await process.add([TABLE], claims("alice"))
    await process.remove([TABLE], claim_set)
    assert set(await directory.claim_sets(TABLE)) == {claim_set}
    await process.remove([TABLE], claim_set)
    assert await directory.claim_sets(TABLE) == {}
    await process.aclose()


async def test_a_dead_process_is_forgotten_after_its_ttl(redis, prefix) -> None:
    dead = Registration(redis, prefix, "dead", ttl=0.3)
    alive = Registration(redis, prefix, "alive", ttl=0.3)
    directory = Directory(redis, prefix)
    gone = await dead.add([TABLE], claims("ghost"))
    kept = await alive.add([TABLE], claims("alice"))
    dead._heartbeat.cancel()  # as if the process were killed: no more heartbeats
    await asyncio.sleep(0.6)
    assert set(await directory.claim_sets(TABLE)) == {kept}
    assert not await redis.exists(dead.keys.process("dead"))
    assert gone != kept
    await alive.aclose()


async def test_entries_come_back_after_redis_loses_them(redis, prefix) -> None:
    process = Registration(redis, prefix, "p", ttl=0.6)
    directory = Directory(redis, prefix)
    claim_set = await process.add([TABLE], claims("alice"))
    await redis.delete(process.keys.process("p"), process.keys.processes)  # what a restart without persistence does
    await asyncio.sleep(0.5)  # one heartbeat (ttl / 3) and a bit
    assert set(await directory.claim_sets(TABLE)) == {claim_set}
    await process.aclose()


def test_fingerprints_differ_by_role_and_by_any_claim() -> None:
    base = claims("alice")
    assert fingerprint(base) == fingerprint(claims("alice"))
    assert fingerprint(base) != fingerprint(claims("alice", role="anon"))
    assert fingerprint(base) != fingerprint(Claims(base.role, base.exp, base.sub, {**base.raw, "org": 1}))


async def test_a_claim_set_whose_channels_all_filter_is_left_to_its_server_process(redis, prefix) -> None:
    one = Registration(redis, prefix, "one")
    two = Registration(redis, prefix, "two")
    directory = Directory(redis, prefix)
    alice = await one.add([TABLE], claims("alice"), filtered=[TABLE])
    assert await directory.claim_sets(TABLE) == {}
    assert set(await directory.filtered(TABLE)) == {alice}
    # An unfiltered channel of the same claims anywhere: the replicator checks it for everyone.
    await two.add([TABLE], claims("alice"))
    assert set(await directory.claim_sets(TABLE)) == {alice} and await directory.filtered(TABLE) == {}
    await two.remove([TABLE], alice)
    assert await directory.claim_sets(TABLE) == {} and set(await directory.filtered(TABLE)) == {alice}
    # In one process: a filtered and an unfiltered channel; the unfiltered one leaves.
    await one.add([TABLE], claims("alice"))
    assert set(await directory.claim_sets(TABLE)) == {alice}
    await one.remove([TABLE], alice)
    assert await directory.claim_sets(TABLE) == {} and set(await directory.filtered(TABLE)) == {alice}
    await one.remove([TABLE], alice, filtered=[TABLE])
    assert await directory.claim_sets(TABLE) == {} and await directory.filtered(TABLE) == {}
    await one.aclose()
    await two.aclose()
