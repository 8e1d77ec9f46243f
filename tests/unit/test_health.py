"""Readiness from its parts (``shared.health``): the replicator's state as Redis holds it."""

from __future__ import annotations

import pytest

from shared.health import STATUS_TTL_S, Readiness, ReplicatorStatus, decode_status, replicator_key, replicator_state

pytestmark = pytest.mark.unit

NOW = 1_800_000_000.0


def status(**changes: object) -> ReplicatorStatus:
    fields: dict[str, object] = dict(
        slot="s", active=True, lag_bytes=120, retained_wal_bytes=4096, lag_seconds=0.0123, last_batch_at=NOW - 3,
        updated_at=NOW - 0.5, pid=42, host="h",
    )
    fields.update(changes)
    return ReplicatorStatus(**fields)  # type: ignore[arg-type]


def test_a_status_survives_its_encoding() -> None:
    assert decode_status(status().encode()) == status()
    assert decode_status(status().encode().encode()) == status()


@pytest.mark.parametrize("raw", [None, b"", b"not json", b"[]", b'{"slot": "s"}', b'{"unknown": 1}'])
def test_a_missing_or_unreadable_status_is_none(raw: bytes | None) -> None:
    assert decode_status(raw) is None


def test_an_active_replicator_that_wrote_recently_is_up_with_its_figures() -> None:
    state = replicator_state(status(), "s", NOW)
    assert state["status"] == "up"
    assert (state["active"], state["lag_bytes"], state["retained_wal_bytes"], state["last_batch_at"]) == (
        True, 120, 4096, NOW - 3
    )
    assert state["lag_seconds"] == 0.012


def test_no_state_or_a_stale_one_is_down() -> None:
    assert replicator_state(None, "s", NOW)["status"] == "down"
    assert replicator_state(status(updated_at=NOW - STATUS_TTL_S - 1), "s", NOW)["status"] == "down"
    assert replicator_state(status(active=False), "s", NOW)["status"] == "down"


def test_readiness_is_ok_only_when_every_part_is_up() -> None:
    up = {"status": "up"}
    assert Readiness(up, up, up).ok
    assert Readiness(up, up, up).body()["status"] == "ok"
    for down in ((up, {"status": "down"}, up), (up, up, {"status": "unknown"}), ({"status": "down"}, up, up)):
        assert not Readiness(*down).ok
        assert Readiness(*down).body()["status"] == "unavailable"


def test_the_state_key_is_per_prefix_and_slot() -> None:
    assert replicator_key("realtime", "realtime_django") == "realtime:replicator:realtime_django"
