"""Per-socket limits (PROTOCOL.md 8): what a client over a limit sees, and that others are not affected."""

from __future__ import annotations

from typing import Any

import pytest

from realtime.protocol.message import Message
from core.rates import RateWindow, TokenBucket
from realtime.protocol.session import Authorize, Disconnect, Publish, Session, Subscribe, SubscribeChanges, Track
from tests.unit.test_session import NOW, READ_ALL, frames, join, new_session, presence

pytestmark = pytest.mark.unit


def broadcast(session: Session, now: float, topic: str = "realtime:room1") -> list[Any]:
    body = {"type": "broadcast", "event": "e", "payload": {}}
    return session.handle(Message("1", "9", topic, "broadcast", body), now)


# --- RateWindow -----------------------------------------------------------


def test_rate_window_trips_when_the_average_over_the_window_is_above_the_limit() -> None:
    window = RateWindow(10, window=5)
    assert not any(window.hit(NOW + i * 0.1) for i in range(50))  # 50 in 5 s: exactly 10/s
    assert window.hit(NOW + 4.9)  # the 51st


def test_rate_window_forgets_seconds_older_than_the_window() -> None:
    window = RateWindow(1, window=2)
    assert not window.hit(NOW)
    assert not window.hit(NOW)
    assert window.hit(NOW + 1)
    assert not window.hit(NOW + 3)  # the hits at NOW and NOW+1 have left the window


def test_a_zero_limit_never_trips() -> None:
    window = RateWindow(0)
    assert not any(window.hit(NOW, 1000) for _ in range(10))


# --- events per second (C96) --------------------------------------------------


def test_over_the_events_rate_every_channel_of_the_socket_ends_with_the_reference_message() -> None:
    session = new_session(max_events_per_second=2, rate_window=1)
    join(session, topic="realtime:room1", ref="1")
    join(session, topic="realtime:room2", ref="2")
    assert isinstance(broadcast(session, NOW)[0], Publish)
    assert isinstance(broadcast(session, NOW)[0], Publish)
    out = frames(broadcast(session, NOW))
    systems = [m for m in out if m.event == "system"]
    assert {m.topic for m in systems} == {"realtime:room1", "realtime:room2"}
    assert all(m.payload["message"] == "Too many messages per second" and m.payload["status"] == "error" for m in systems)
    assert sorted(m.topic for m in out if m.event == "phx_close") == ["realtime:room1", "realtime:room2"]
    assert session.channels == {}


def test_another_socket_under_its_rate_keeps_publishing() -> None:
    flooder = new_session(max_events_per_second=5, rate_window=1)
    bystander = new_session(max_events_per_second=5, rate_window=1)
    join(flooder)
    join(bystander)
    for _ in range(50):
        broadcast(flooder, NOW)
    assert flooder.channels == {}
    assert isinstance(broadcast(bystander, NOW)[0], Publish)


def test_pushes_to_topics_not_joined_count_toward_the_events_rate() -> None:
    session = new_session(max_events_per_second=3, rate_window=1)
    join(session)
    for _ in range(3):
        assert frames(broadcast(session, NOW, topic="realtime:other"))[0].payload["response"] == {"reason": "unmatched topic"}
    out = frames(broadcast(session, NOW, topic="realtime:other"))
    assert [m.event for m in out] == ["system", "phx_close"]


def test_heartbeats_do_not_count_toward_the_events_rate() -> None:
    session = new_session(max_events_per_second=1, rate_window=1)
    join(session)
    for i in range(20):
        out = frames(session.handle(Message(None, str(i), "phoenix", "heartbeat", {}), NOW))
        assert out[0].payload["status"] == "ok"
    assert "realtime:room1" in session.channels


# --- presence --------------------------------------------------------------------


def test_over_the_presence_rate_the_channels_end_with_the_presence_message() -> None:
    session = new_session(max_presence_events_per_second=2, rate_window=1, presence_max_calls=100)
    join(session)
    assert isinstance(presence(session, "track", {"a": 1})[0], Track)
    assert isinstance(presence(session, "track", {"a": 2})[0], Track)
    out = frames(presence(session, "track", {"a": 3}))
    assert out[0].payload["message"] == "Too many presence messages per second"
    assert out[1].event == "phx_close"


def test_the_presence_push_limit_holds_across_re_joins_of_the_topic() -> None:
    session = new_session()

    def track(join_ref: str, now: float) -> list[Any]:
        body = {"type": "presence", "event": "track", "payload": {}}
        return session.handle(Message(join_ref, "4", "realtime:room1", "presence", body), now)

    for i in range(5):
        join(session, ref=str(10 + i))  # a re-join before every push
        assert isinstance(track(str(10 + i), NOW + i)[0], Track)
    join(session, ref="20")
    out = frames(track("20", NOW + 6))
    assert out[0].payload["message"] == "Client presence rate limit exceeded"


# --- joins per second (C98) -----------------------------------------------------------


def test_over_the_join_rate_the_join_is_refused_and_the_socket_closed() -> None:
    session = new_session(max_joins_per_second=3, rate_window=1)
    for i in range(3):
        join(session, topic=f"realtime:r{i}", ref=str(i))
    effects = join(session, topic="realtime:r9", ref="9")
    [reply] = frames(effects)
    assert reply.payload == {"status": "error", "response": {"reason": "ClientJoinRateLimitReached: Too many joins per second"}}
    assert effects[-1] == Disconnect(1001)
    assert session.handle(Message(None, "10", "phoenix", "heartbeat", {}), NOW) == []


# --- bounded work per channel -------------------------------------------------------------


def test_too_many_bindings_refuse_the_join_before_any_database_work() -> None:
    session = new_session(max_bindings=2)
    bindings = [{"event": "*", "schema": "public", "table": f"t{i}"} for i in range(3)]
    effects = join(session, payload={"config": {"postgres_changes": bindings}})
    assert not any(isinstance(e, SubscribeChanges) for e in effects)
    [reply] = frames(effects)
    assert reply.payload == {
        "status": "error",
        "response": {"reason": "InvalidJoinPayload: Too many postgres_changes bindings: at most 2 per channel"},
    }
    assert "realtime:room1" not in session.channels


def test_access_token_pushes_count_toward_the_events_rate() -> None:
    session = new_session(max_events_per_second=2, rate_window=1)
    join(session)
    for i in range(2):
        session.handle(Message("1", str(i), "realtime:room1", "access_token", {"access_token": f"anon:{NOW + 100 + i}"}), NOW)
    out = frames(session.handle(Message("1", "9", "realtime:room1", "access_token", {"access_token": "anon:9"}), NOW))
    assert out[0].payload["message"] == "Too many messages per second"


def test_held_pushes_count_toward_the_events_rate_when_they_arrive() -> None:
    session = new_session(max_events_per_second=3, rate_window=1)
    [check] = join(session, payload={"config": {"private": True}})
    session.authorized(check, READ_ALL, NOW)
    broadcast(session, NOW)  # starts the write check; held
    broadcast(session, NOW)
    broadcast(session, NOW)
    out = frames(broadcast(session, NOW))
    assert out[0].payload["message"] == "Too many messages per second"


def test_pushes_held_during_a_policy_check_are_bounded() -> None:
    session = new_session(max_held_pushes=3)
    [check] = join(session, payload={"config": {"private": True}})
    assert isinstance(check, Authorize)
    # Open the channel with read access, then a broadcast starts the write check and is held.
    session.authorized(check, READ_ALL, NOW)
    [write_check] = [e for e in broadcast(session, NOW) if isinstance(e, Authorize)]
    for _ in range(2):
        assert broadcast(session, NOW) == []
    out = frames(broadcast(session, NOW))
    assert out[0].payload["message"] == "Too many messages waiting for this channel's authorization"
    assert out[1].event == "phx_close"
    assert not session.waits_for(write_check)


def test_a_check_made_void_by_a_re_join_is_no_longer_waited_for() -> None:
    session = new_session()
    [first] = join(session, ref="1", payload={"config": {"private": True}})
    [second] = join(session, ref="2", payload={"config": {"private": True}})
    assert not session.waits_for(first) and session.waits_for(second)
    assert [m.event for m in frames(session.authorized(first, None, NOW))] == []


def test_a_topic_over_the_byte_cap_is_refused_with_a_clear_reason() -> None:
    session = new_session()
    [reply] = frames(join(session, topic="realtime:" + "é" * 600))
    assert reply.payload == {"status": "error", "response": {"reason": "TopicNameTooLong: Topic name must be at most 1024 bytes"}}
    assert isinstance(join(session, topic="realtime:" + "a" * 1000)[0], Subscribe)


# --- TokenBucket ------------------------------------------------------------------------


def test_token_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(10, 50, NOW)
    assert all(bucket.take(NOW) for _ in range(50))
    assert not bucket.take(NOW)
    assert bucket.take(NOW + 0.11)  # one token back after a tenth of a second at 10/s
    assert not bucket.take(NOW + 0.11)
    assert bucket.take(NOW + 100, 50) and not bucket.take(NOW + 100)  # never more than its capacity


def test_a_token_bucket_with_no_rate_never_runs_dry() -> None:
    bucket = TokenBucket(0, 0, NOW)
    assert all(bucket.take(NOW, 1e9) for _ in range(10))


def test_borrowing_from_a_token_bucket_paces_to_its_rate() -> None:
    bucket = TokenBucket(100, 100, NOW)
    assert bucket.borrow(NOW, 100) == 0.0  # its burst goes at once
    assert bucket.borrow(NOW, 50) == pytest.approx(0.5)  # then 50 more wait half a second at 100/s
    assert bucket.borrow(NOW + 0.5, 100) == pytest.approx(1.0)  # the debt was paid; 100 more wait 1 s
    assert bucket.borrow(NOW + 10, 10) == 0.0  # refilled (to its capacity only)
    assert bucket.borrow(NOW + 10, 190) == pytest.approx(1.0)
    assert TokenBucket(0, 0, NOW).borrow(NOW, 1e9) == 0.0  # no rate: no pacing
