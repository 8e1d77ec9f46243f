"""Replay at join (PROTOCOL.md 3.2, 5.5): the session's side, with no database."""

from __future__ import annotations

from typing import Any

import pytest

from realtime.protocol.message import Message, UserBroadcast
from realtime.protocol.session import Authorize, Extension, Permissions, Replay, ReplayedRow, Send, SendLater, Subscribe
from tests.unit.test_session import NOW, READ_ALL, BROADCAST_GROUP, frames, join, new_session

pytestmark = pytest.mark.unit

def join_replay(session: Any, replay: Any, permissions: Permissions = READ_ALL, private: bool = True) -> list[Any]:
    effects = join(session, payload={"config": {"private": private, "broadcast": {"replay": replay}}})
    if not private:
        return effects
    [check] = effects
    assert isinstance(check, Authorize)
    return session.authorized(check, permissions, NOW)


def reason(effects: list[Any]) -> str:
    [reply] = frames(effects)
    assert reply.payload["status"] == "error"
    return str(reply.payload["response"]["reason"])


def test_replay_on_a_public_channel_is_refused() -> None:
    effects = join_replay(new_session(), {"since": 0}, private=False)
    assert reason(effects) == "UnableToReplayMessages: Replay is not allowed for public channels"


@pytest.mark.parametrize("replay", [{}, {"since": "x"}, {"since": 0, "limit": "ten"}, "x"])
def test_unreadable_replay_params_are_refused_after_the_read_check(replay: Any) -> None:
    session = new_session()
    assert reason(join_replay(session, replay)) == "UnableToReplayMessages: Replay params are not valid"
    assert session.channels == {} and session.pending_joins == {}


def test_replay_without_broadcast_read_is_unauthorized() -> None:
    session = new_session()
    effects = join(session, payload={"config": {"private": True, "presence": {"enabled": True},
                                                "broadcast": {"replay": {"since": 0}}}})
    out = session.authorized(effects[0], Permissions(read=frozenset({Extension.PRESENCE})), NOW)
    assert reason(out).startswith("Unauthorized: You do not have permissions to read from this Channel topic")


@pytest.mark.parametrize(("limit", "clamped"), [(None, 25), (0, 1), (-3, 1), (7, 7), (26, 25), (10_000, 25)])
def test_replay_limit_is_clamped_to_1_through_25(limit: Any, clamped: int) -> None:
    replay: dict[str, Any] = {"since": 123}
    if limit is not None:
        replay["limit"] = limit
    [effect] = join_replay(new_session(), replay)
    assert isinstance(effect, Replay)
    assert (effect.topic, effect.join_ref, effect.since, effect.limit) == ("realtime:room1", "1", 123, clamped)


def test_replayed_rows_follow_the_ok_reply_oldest_first_with_meta_replayed() -> None:
    session = new_session()
    [effect] = join_replay(session, {"since": 0, "limit": 5})
    assert session.waits_for(effect)
    rows = [ReplayedRow("a", "e1", {"n": 1}), ReplayedRow("b", "e2", None, b"\x00\x01")]
    effects = session.replayed(effect, rows)
    [subscribe] = [e for e in effects if isinstance(e, Subscribe)]
    assert subscribe.group == BROADCAST_GROUP and subscribe.skip_ids == frozenset({"a", "b"})
    out = [e.message for e in effects if isinstance(e, Send)]
    assert out[0].event == "phx_reply" and out[0].payload["status"] == "ok"
    assert out[1] == Message("1", None, "realtime:room1", "broadcast", {
        "type": "broadcast", "event": "e1", "payload": {"n": 1}, "meta": {"replayed": True, "id": "a"}})
    assert out[2].payload == UserBroadcast("e2", 0, b"\x00\x01", b'{"replayed":true,"id":"b"}')
    assert "realtime:room1" in session.channels and not session.waits_for(effect)


def test_a_failed_replay_read_refuses_the_join() -> None:
    session = new_session()
    [effect] = join_replay(session, {"since": 0})
    out = session.replayed(effect, None)
    assert [type(e) for e in out] == [SendLater]
    assert reason(out) == "UnableToReplayMessages: Realtime was unable to replay messages"
    assert session.channels == {}


def test_a_replay_answered_after_a_leave_is_void() -> None:
    session = new_session()
    [effect] = join_replay(session, {"since": 0})
    session.handle(Message("1", "2", "realtime:room1", "phx_leave", {}), NOW)
    assert not session.waits_for(effect)
    assert session.replayed(effect, []) == []
    assert session.channels == {}
