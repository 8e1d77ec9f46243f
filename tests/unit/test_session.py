"""The per-socket state machine: what a client sees for each message it sends."""

from __future__ import annotations

from typing import Any

import pytest

from realtime.bindings import binding_id
from core.jwt import Claims, TokenError, check_claims
from realtime.protocol.message import Message, UserBroadcast
from realtime.protocol.session import (
    Authorize,
    Extension,
    Permissions,
    Publish,
    Send,
    SendLater,
    Session,
    SendPresenceState,
    SessionLimits,
    Subscribe,
    Track,
    Untrack,
    Unsubscribe,
)
from core.topics import broadcast_group, presence_group

pytestmark = pytest.mark.unit

NOW = 1_700_000_000.0
CONNECT = Claims(role="anon", exp=NOW + 3600, sub=None, raw={"role": "anon", "exp": NOW + 3600})


def fake_verify(token: str, now: float) -> Claims:
    """Tokens in tests are spelled ``role:exp`` or a failure keyword."""
    if token == "potato" or token == "":
        raise TokenError("MalformedJWT", "The token provided is not a valid JWT")
    if token == "badsig":
        raise TokenError("JwtSignatureError", "Failed to validate JWT signature")
    role, exp = token.split(":")
    return check_claims({"role": role, "exp": float(exp)}, now)


def new_session(**limits: Any) -> Session:
    return Session(
        socket_id="sock-a",
        claims=CONNECT,
        token="connect-token",
        verify=fake_verify,
        limits=SessionLimits(**{"channel_error_backoff": 0.0, **limits}),
    )


def frames(effects: list[Any]) -> list[Message]:
    return [e.message for e in effects if isinstance(e, (Send, SendLater))]


def join(session: Session, topic: str = "realtime:room1", ref: str = "1", payload: Any = None, now: float = NOW) -> list[Any]:
    if payload is None:
        payload = {"config": {}}
    return session.handle(Message(ref, ref, topic, "phx_join", payload), now)


# --- control ------------------------------------------------------------


def test_heartbeat_is_answered_with_null_join_ref_and_its_ref() -> None:  # C9
    out = frames(new_session().handle(Message(None, "5", "phoenix", "heartbeat", {}), NOW))
    assert out == [Message(None, "5", "phoenix", "phx_reply", {"status": "ok", "response": {}})]


def test_other_events_on_phoenix_are_unmatched() -> None:
    out = frames(new_session().handle(Message(None, "5", "phoenix", "boom", {}), NOW))
    assert out[0].payload == {"status": "error", "response": {"reason": "unmatched topic"}}


def test_push_to_topic_not_joined_is_unmatched_with_its_ref() -> None:  # C13
    out = frames(new_session().handle(Message("9", "10", "realtime:nope", "broadcast", {}), NOW))
    assert out == [
        Message(None, "10", "realtime:nope", "phx_reply", {"status": "error", "response": {"reason": "unmatched topic"}})
    ]


def test_join_without_realtime_prefix_is_unmatched() -> None:  # C19
    out = frames(join(new_session(), topic="room1"))
    assert out[0].join_ref is None
    assert out[0].payload["response"] == {"reason": "unmatched topic"}


# --- join ---------------------------------------------------------------


def test_join_without_bindings_replies_ok_with_empty_postgres_changes() -> None:  # C20
    effects = join(new_session())
    assert frames(effects) == [
        Message("1", "1", "realtime:room1", "phx_reply", {"status": "ok", "response": {"postgres_changes": []}})
    ]


def test_join_subscribes_before_it_replies() -> None:  # a broadcast after SUBSCRIBED must arrive
    effects = join(new_session())
    kinds = [type(e) for e in effects]
    assert kinds.index(Subscribe) < kinds.index(Send)


def test_two_bindings_are_echoed_in_order_with_integer_ids() -> None:  # C21, C22
    bindings = [
        {"event": "insert", "schema": "public", "table": "todos"},
        {"event": "*", "schema": "public"},
    ]
    reply = frames(join(new_session(), payload={"config": {"postgres_changes": bindings}}))[0]
    echoed = reply.payload["response"]["postgres_changes"]
    assert [{k: v for k, v in b.items() if k != "id"} for b in echoed] == bindings
    assert all(isinstance(b["id"], int) and 0 <= b["id"] < 2**27 for b in echoed)
    assert "filter" not in echoed[0] and echoed[0]["event"] == "insert"


def test_identical_bindings_share_an_id() -> None:
    binding = {"event": "*", "schema": "public", "table": "t"}
    assert binding_id(dict(binding)) == binding_id(dict(binding))
    assert binding_id(binding) != binding_id({**binding, "table": "u"})


def test_bare_realtime_topic_requires_a_name() -> None:  # C19
    out = frames(join(new_session(), topic="realtime:"))
    assert out[0].payload == {
        "status": "error",
        "response": {"reason": "TopicNameRequired: You must provide a topic name"},
    }


def test_a_join_while_the_server_drains_is_refused_restarting() -> None:
    session = new_session()
    assert frames(join(session))[0].payload["status"] == "ok"
    session.restarting = True
    out = frames(join(session, topic="realtime:other"))
    assert out[0].payload == {
        "status": "error",
        "response": {"reason": "RealtimeRestarting: Realtime is restarting, please standby"},
    }
    assert list(session.channels) == ["realtime:room1"]


def test_join_errors_are_delayed_by_the_channel_backoff() -> None:  # C29
    session = Session("s", CONNECT, "t", fake_verify, SessionLimits(channel_error_backoff=2.5))
    effects = join(session, topic="realtime:")
    assert isinstance(effects[0], SendLater) and effects[0].delay == 2.5


def test_expired_join_access_token_is_refused() -> None:  # C24
    out = frames(join(new_session(), payload={"config": {}, "access_token": f"anon:{NOW - 30}"}))
    assert out[0].payload["response"]["reason"] == "InvalidJWTToken: Token has expired 30 seconds ago"


def test_malformed_join_access_token_is_refused() -> None:  # C25
    out = frames(join(new_session(), payload={"config": {}, "access_token": "potato"}))
    assert out[0].payload["response"]["reason"] == "MalformedJWT: The token provided is not a valid JWT"


def test_opaque_access_token_joins_with_the_connect_token() -> None:  # C26
    session = new_session()
    out = frames(join(session, payload={"config": {}, "access_token": "sb_publishable_x"}))
    assert out[0].payload["status"] == "ok"
    assert session.channels["realtime:room1"].claims == CONNECT


def test_string_config_still_joins_and_string_private_counts() -> None:  # C27
    assert frames(join(new_session(), payload={"config": "x"}))[0].payload["status"] == "ok"
    session = new_session()
    effects = join(session, payload={"config": {"private": "True"}})
    # A private join waits for its policies: the flag was understood.
    assert [type(e) for e in effects] == [Authorize]


def test_channel_limit_refuses_one_more_and_a_leave_frees_a_slot() -> None:  # C30
    session = new_session(max_channels=3)
    for i in range(3):
        assert frames(join(session, topic=f"realtime:r{i}", ref=str(i)))[0].payload["status"] == "ok"
    out = frames(join(session, topic="realtime:r9", ref="9"))
    assert out[0].payload["response"]["reason"] == "ChannelRateLimitReached: Too many channels"
    session.handle(Message("0", "20", "realtime:r0", "phx_leave", {}), NOW)
    assert frames(join(session, topic="realtime:r9", ref="21"))[0].payload["status"] == "ok"


def test_rejoin_replies_then_closes_the_old_join_ref() -> None:  # C16
    session = new_session()
    join(session, ref="1")
    effects = join(session, ref="3")
    out = frames(effects)
    assert out[0] == Message("3", "3", "realtime:room1", "phx_reply", {"status": "ok", "response": {"postgres_changes": []}})
    assert out[1] == Message("1", "1", "realtime:room1", "phx_close", {})
    assert any(isinstance(e, Unsubscribe) for e in effects)


def test_presence_enabled_join_asks_for_presence_state_after_the_reply() -> None:  # C80, C23
    effects = join(new_session(), payload={"config": {"presence": {"enabled": True}}})
    kinds = [type(e) for e in effects]
    assert kinds.index(SendPresenceState) > kinds.index(Send)
    state = next(e for e in effects if isinstance(e, SendPresenceState))
    assert (state.topic, state.join_ref, state.presence_channel) == ("realtime:room1", "1", "public:room1")


def test_presence_disabled_join_gets_no_presence_state() -> None:  # C80
    assert not any(isinstance(e, SendPresenceState) for e in join(new_session()))


# --- presence -----------------------------------------------------------


def presence(session: Session, event: str, payload: Any = None, ref: str = "4", now: float = NOW) -> list[Any]:
    body: dict[str, Any] = {"type": "presence", "event": event}
    if payload is not None:
        body["payload"] = payload
    return session.handle(Message("1", ref, "realtime:room1", "presence", body), now)


def test_track_stores_the_payload_under_the_configured_key() -> None:  # C81, C82, C89
    session = new_session()
    join(session, payload={"config": {"presence": {"key": "u1"}}})
    [track] = presence(session, "TRACK", {"user": "a"})
    assert isinstance(track, Track)
    assert (track.key, track.payload, track.presence_channel) == ("u1", {"user": "a"}, "public:room1")
    assert track.reply == Message("1", "4", "realtime:room1", "phx_reply", {"status": "ok", "response": {}})


def test_an_empty_key_gets_a_server_uuid() -> None:  # C82
    session = new_session()
    join(session, payload={"config": {"presence": {"key": ""}}})
    [track] = presence(session, "track", {})
    assert len(track.key) == 36 and track.key.count("-") == 4


def test_non_object_track_payload_is_refused_and_the_channel_stays() -> None:  # C87
    session = new_session()
    join(session)
    out = frames(presence(session, "track", [1, 2]))
    assert out[0].payload == {"status": "error", "response": {"reason": "Presence track payload must be a map"}}
    assert "realtime:room1" in session.channels


def test_sixth_presence_push_in_the_window_closes_the_channel() -> None:  # C88
    session = new_session()
    join(session)
    for i in range(5):
        assert isinstance(presence(session, "track", {"n": i}, now=NOW + i)[0], Track)
    effects = presence(session, "track", {"n": 6}, now=NOW + 6)
    out = frames(effects)
    assert out[0].payload["message"] == "Client presence rate limit exceeded" and out[1].event == "phx_close"
    assert any(isinstance(e, Untrack) for e in effects)
    session2 = new_session()
    join(session2)
    for i in range(6):
        assert isinstance(presence(session2, "track", {}, now=NOW + i * 7)[0], Track)  # spread over 35 s


def test_untrack_and_leave_remove_the_meta() -> None:  # C86
    session = new_session()
    join(session)
    presence(session, "track", {})
    [untrack] = presence(session, "untrack")
    assert isinstance(untrack, Untrack) and untrack.reply is not None
    presence(session, "track", {})
    effects = session.handle(Message("1", "9", "realtime:room1", "phx_leave", {}), NOW)
    assert any(isinstance(e, Untrack) and e.reply is None for e in effects)


def test_unknown_presence_event_is_an_error_reply() -> None:
    session = new_session()
    join(session)
    assert frames(presence(session, "wave"))[0].payload == {"status": "error", "response": {}}


# --- leave --------------------------------------------------------------


def test_leave_replies_ok_then_closes_with_the_join_ref() -> None:  # C15
    session = new_session()
    join(session, ref="1")
    effects = session.handle(Message("1", "2", "realtime:room1", "phx_leave", {}), NOW)
    assert frames(effects) == [
        Message("1", "2", "realtime:room1", "phx_reply", {"status": "ok", "response": {}}),
        Message("1", "1", "realtime:room1", "phx_close", {}),
    ]
    assert "realtime:room1" not in session.channels


def test_leaving_a_topic_not_joined_is_ok() -> None:
    out = frames(new_session().handle(Message(None, "2", "realtime:x", "phx_leave", {}), NOW))
    assert out[0].payload == {"status": "ok", "response": {}}


# --- broadcast ----------------------------------------------------------


def broadcast(session: Session, payload: Any, ref: str = "2", join_ref: str = "1") -> list[Any]:
    return session.handle(Message(join_ref, ref, "realtime:room1", "broadcast", payload), NOW)


def test_broadcast_is_published_verbatim_to_the_topic_group() -> None:
    session = new_session()
    join(session)
    body = {"type": "broadcast", "event": "e", "payload": {"x": 1}}
    effects = broadcast(session, body)
    publish = [e for e in effects if isinstance(e, Publish)]
    assert len(publish) == 1
    assert publish[0].message["payload"] == b'{"type":"broadcast","event":"e","payload":{"x":1}}'
    assert publish[0].message["origin"] == "sock-a"
    assert frames(effects) == []  # ack is off by default


def test_ack_replies_ok_with_the_push_ref_for_json_and_binary() -> None:  # C67
    session = new_session()
    join(session, payload={"config": {"broadcast": {"ack": True}}})
    for body in ({"type": "broadcast", "event": "e", "payload": {}}, UserBroadcast("e", 1, b"{}")):
        out = frames(broadcast(session, body, ref="7"))
        assert out == [Message("1", "7", "realtime:room1", "phx_reply", {"status": "ok", "response": {}})]


def test_oversized_broadcast_is_dropped_with_payload_size_exceeded() -> None:  # C72
    session = new_session(max_payload_bytes=100)
    join(session, payload={"config": {"broadcast": {"ack": True}}})
    effects = broadcast(session, UserBroadcast("e", 0, b"x" * 101))
    assert not any(isinstance(e, Publish) for e in effects)
    assert frames(effects)[0].payload == {"status": "error", "response": "payload_size_exceeded"}


def test_stale_join_ref_is_dropped_silently() -> None:  # C17
    session = new_session()
    join(session, ref="1")
    join(session, ref="5")
    assert broadcast(session, {"type": "broadcast", "event": "e", "payload": {}}, join_ref="1") == []


def test_many_topics_are_multiplexed_on_one_socket() -> None:
    session = new_session()
    for i in range(20):
        join(session, topic=f"realtime:t{i}", ref=str(i))
    assert len(session.channels) == 20
    groups = {c.group for c in session.channels.values()}
    assert len(groups) == 20


def test_public_and_private_channels_of_one_sub_topic_use_different_groups() -> None:  # C71
    session = new_session()
    join(session, topic="realtime:room1", ref="1", payload={"config": {"private": False}})
    public_group = session.channels["realtime:room1"].group
    join_private(session, ref="2")
    assert session.channels["realtime:room1"].group != public_group


# --- tokens -------------------------------------------------------------


def access_token(session: Session, token: Any) -> list[Message]:
    return frames(session.handle(Message("1", "9", "realtime:room1", "access_token", {"access_token": token}), NOW))


def test_expired_refresh_sends_system_error_then_close() -> None:  # C32
    session = new_session()
    join(session)
    out = access_token(session, f"anon:{NOW - 5}")
    assert out[0] == Message(
        "1", None, "realtime:room1", "system",
        {"message": "Token has expired 5 seconds ago", "status": "error", "extension": "system", "channel": "room1"},
    )
    assert out[1] == Message("1", "1", "realtime:room1", "phx_close", {})
    assert "realtime:room1" not in session.channels


def test_empty_refresh_is_not_a_valid_jwt() -> None:  # C33
    session = new_session()
    join(session)
    out = access_token(session, "")
    assert out[0].payload["message"] == "The token provided is not a valid JWT"
    assert out[1].event == "phx_close"


def test_opaque_or_same_refresh_sends_nothing() -> None:  # C34
    session = new_session()
    join(session)
    assert access_token(session, "sb_publishable_abc") == []
    assert access_token(session, "connect-token") == []
    assert access_token(session, None) == []


def test_valid_refresh_moves_the_expiry() -> None:
    session = new_session()
    join(session)
    assert access_token(session, f"authenticated:{NOW + 10}") == []
    assert session.next_deadline() == NOW + 10
    assert session.channels["realtime:room1"].claims.role == "authenticated"


def test_token_expiry_closes_the_channel() -> None:  # C35
    session = new_session()
    join(session, payload={"config": {}, "access_token": f"anon:{NOW + 2}"})
    assert session.next_deadline() == NOW + 2
    assert session.expire(NOW + 1) == []
    out = frames(session.expire(NOW + 3))
    assert out[0].payload["message"] == "Token has expired 1 seconds ago"
    assert out[1].event == "phx_close"
    assert session.next_deadline() is None


def test_private_only_refuses_public_joins() -> None:  # C28
    session = new_session(private_only=True)
    out = frames(join(session))
    assert out[0].payload["response"] == {"reason": "PrivateOnly: This project only allows private channels"}


def test_replication_ready_gets_its_system_message_after_the_reply() -> None:  # C31
    out = frames(join(new_session(), payload={"config": {"broadcast": {"replication_ready": True}}}))
    assert out[0].event == "phx_reply"
    assert out[1] == Message(
        "1", None, "realtime:room1", "system",
        {"message": "Replication connection established", "status": "ok", "extension": "system", "channel": "room1"},
    )


# --- private channels -----------------------------------------------------


READ_ALL = Permissions(read=frozenset(Extension))
READ_BROADCAST = Permissions(read=frozenset({Extension.BROADCAST}))


def join_private(
    session: Session, permissions: Permissions | None = READ_ALL, ref: str = "1", config: dict[str, Any] | None = None
) -> list[Any]:
    """Join ``realtime:room1`` privately and answer its read check with ``permissions``."""
    [check] = join(session, ref=ref, payload={"config": {"private": True, **(config or {})}})
    assert isinstance(check, Authorize)
    return session.authorized(check, permissions, NOW)


def checks(effects: list[Any]) -> list[Authorize]:
    return [e for e in effects if isinstance(e, Authorize)]


def subscribed(effects: list[Any]) -> set[str]:
    return {e.group for e in effects if isinstance(e, Subscribe)}


BROADCAST_GROUP = broadcast_group("room1", True)
PRESENCE_GROUP = presence_group("room1", True)


def test_private_join_waits_for_the_broadcast_read_check_as_the_joining_claims() -> None:
    session = new_session()
    [check] = join(session, payload={"config": {"private": True}})
    assert isinstance(check, Authorize)
    assert (check.topic, check.join_ref, check.claims, check.read, check.write) == (
        "realtime:room1", "1", CONNECT, (Extension.BROADCAST,), ()
    )
    assert session.channels == {}


def test_private_join_with_presence_on_also_probes_presence_read() -> None:
    [check] = join(new_session(), payload={"config": {"private": True, "presence": {"enabled": True}}})
    assert check.read == (Extension.BROADCAST, Extension.PRESENCE)


def test_private_join_with_broadcast_read_subscribes_then_replies_ok() -> None:
    effects = join_private(new_session(), READ_BROADCAST)
    kinds = [type(e) for e in effects]
    assert kinds.index(Subscribe) < kinds.index(Send)
    assert subscribed(effects) == {BROADCAST_GROUP}
    assert frames(effects) == [
        Message("1", "1", "realtime:room1", "phx_reply", {"status": "ok", "response": {"postgres_changes": []}})
    ]


def test_private_join_without_read_is_unauthorized() -> None:  # C90
    session = new_session()
    out = frames(join_private(session, Permissions()))
    assert out == [
        Message("1", "1", "realtime:room1", "phx_reply", {"status": "error", "response": {
            "reason": "Unauthorized: You do not have permissions to read from this Channel topic: room1"}})
    ]
    assert session.channels == {}


def test_private_join_when_the_database_cannot_answer_is_refused_with_a_clear_reason() -> None:
    out = frames(join_private(new_session(), None))
    assert out[0].payload["response"] == {
        "reason": "UnableToConnectToProject: Realtime was unable to connect to the project database"
    }


def test_read_verdict_after_a_leave_or_a_rejoin_is_ignored() -> None:
    session = new_session()
    [check] = join(session, payload={"config": {"private": True}})
    session.handle(Message("1", "2", "realtime:room1", "phx_leave", {}), NOW)
    assert session.authorized(check, READ_ALL, NOW) == []
    assert session.channels == {}
    [first] = join(session, ref="3", payload={"config": {"private": True}})
    [second] = join(session, ref="4", payload={"config": {"private": True}})
    assert session.authorized(first, READ_ALL, NOW) == []
    assert frames(session.authorized(second, READ_ALL, NOW))[0].ref == "4"


def test_leaving_a_rejoin_being_checked_ends_the_topic_with_a_reply() -> None:
    session = new_session()
    join_private(session, READ_ALL, ref="1")
    [check] = join(session, ref="5", payload={"config": {"private": True}})
    effects = session.handle(Message("5", "6", "realtime:room1", "phx_leave", {}), NOW)
    assert frames(effects) == [
        Message("5", "6", "realtime:room1", "phx_reply", {"status": "ok", "response": {}}),
        Message("5", "5", "realtime:room1", "phx_close", {}),
    ]
    assert {e.group for e in effects if isinstance(e, Unsubscribe)} == {BROADCAST_GROUP}  # the older channel ends
    assert session.channels == {} and session.authorized(check, READ_ALL, NOW) == []


def test_presence_only_read_gets_presence_but_no_broadcast_group() -> None:  # C93
    effects = join_private(
        new_session(), Permissions(read=frozenset({Extension.PRESENCE})), config={"presence": {"enabled": True}}
    )
    assert subscribed(effects) == {PRESENCE_GROUP}
    assert any(isinstance(e, SendPresenceState) for e in effects)


def test_presence_on_without_presence_read_gets_no_presence_state() -> None:
    effects = join_private(new_session(), READ_BROADCAST, config={"presence": {"enabled": True}})
    assert subscribed(effects) == {BROADCAST_GROUP}
    assert not any(isinstance(e, SendPresenceState) for e in effects)


def private_broadcast(session: Session, ref: str, n: int = 0) -> list[Any]:
    return broadcast(session, {"type": "broadcast", "event": "e", "payload": {"n": n}}, ref=ref)


def test_first_private_broadcast_asks_for_write_and_later_pushes_wait_in_order() -> None:
    session = new_session()
    join_private(session, config={"broadcast": {"ack": True}})
    [check] = private_broadcast(session, "2", n=1)
    assert isinstance(check, Authorize) and (check.read, check.write) == ((), (Extension.BROADCAST,))
    assert private_broadcast(session, "3", n=2) == []  # held: the verdict is not in yet
    effects = session.authorized(check, Permissions(write=frozenset({Extension.BROADCAST})), NOW)
    published = [e.message["payload"] for e in effects if isinstance(e, Publish)]
    assert published == [b'{"type":"broadcast","event":"e","payload":{"n":1}}', b'{"type":"broadcast","event":"e","payload":{"n":2}}']
    assert [m.ref for m in frames(effects)] == ["2", "3"]  # the acks
    again = private_broadcast(session, "4")
    assert checks(again) == [] and len([e for e in again if isinstance(e, Publish)]) == 1  # the verdict is cached


def test_private_broadcast_without_write_is_dropped_without_ack() -> None:  # C92
    session = new_session()
    join_private(session, config={"broadcast": {"ack": True}})
    [check] = private_broadcast(session, "2")
    assert session.authorized(check, READ_ALL, NOW) == []
    assert private_broadcast(session, "3") == []


def test_write_check_the_database_cannot_answer_drops_the_waiting_push_and_the_next_asks_again() -> None:
    session = new_session()
    join_private(session, config={"broadcast": {"ack": True}})
    [check] = private_broadcast(session, "2")
    assert session.authorized(check, None, NOW) == []
    assert len(checks(private_broadcast(session, "3"))) == 1


def test_track_without_presence_write_gets_an_error_reply() -> None:  # C95
    session = new_session()
    join_private(session, config={"presence": {"enabled": True}})
    [check] = presence(session, "track", {"user": "a"})
    assert (check.read, check.write) == ((), (Extension.PRESENCE,))  # read was probed at join
    out = frames(session.authorized(check, READ_ALL, NOW))
    assert out == [Message("1", "4", "realtime:room1", "phx_reply", {"status": "error", "response": {}})]
    assert not session.channels["realtime:room1"].tracked


def test_first_track_with_presence_off_at_join_evaluates_presence_read_too() -> None:
    session = new_session()
    effects = join_private(session, READ_BROADCAST)
    assert subscribed(effects) == {BROADCAST_GROUP}
    [check] = presence(session, "track", {"user": "a"})
    assert (check.read, check.write) == ((Extension.PRESENCE,), (Extension.PRESENCE,))
    granted = Permissions(read=frozenset({Extension.PRESENCE}), write=frozenset({Extension.PRESENCE}))
    effects = session.authorized(check, granted, NOW)
    assert subscribed(effects) == {PRESENCE_GROUP}
    assert [type(e) for e in effects] == [Subscribe, Track]
    assert isinstance(presence(session, "track", {"user": "b"}, ref="5")[0], Track)


def refresh(session: Session, token: str) -> list[Any]:
    return session.handle(Message("1", "9", "realtime:room1", "access_token", {"access_token": token}), NOW)


def test_private_refresh_rechecks_read_with_the_new_claims() -> None:
    session = new_session()
    join_private(session, READ_BROADCAST)
    [check] = refresh(session, f"authenticated:{NOW + 60}")
    assert check.refresh and check.claims.role == "authenticated" and check.read == (Extension.BROADCAST,)
    assert session.channels["realtime:room1"].claims == CONNECT  # not taken before the verdict
    assert session.authorized(check, READ_BROADCAST, NOW) == []
    assert session.channels["realtime:room1"].claims.role == "authenticated"


def test_private_refresh_without_read_sends_the_permission_error_then_close() -> None:  # C94
    session = new_session()
    join_private(session, READ_BROADCAST)
    [check] = refresh(session, f"authenticated:{NOW + 60}")
    out = frames(session.authorized(check, Permissions(), NOW))
    assert out == [
        Message("1", None, "realtime:room1", "system", {
            "message": "You do not have permissions to read from this Channel topic: room1",
            "status": "error", "extension": "system", "channel": "room1"}),
        Message("1", "1", "realtime:room1", "phx_close", {}),
    ]
    assert session.channels == {}


def test_private_refresh_losing_one_read_closes_with_no_longer() -> None:
    session = new_session()
    join_private(session, READ_ALL, config={"presence": {"enabled": True}})
    [check] = refresh(session, f"authenticated:{NOW + 60}")
    out = frames(session.authorized(check, READ_BROADCAST, NOW))
    assert out[0].payload["message"] == "You no longer have permission to read from this Channel topic: room1"
    assert out[1].event == "phx_close"


def test_private_refresh_resets_the_write_verdicts() -> None:
    session = new_session()
    join_private(session)
    [write] = private_broadcast(session, "2")
    session.authorized(write, READ_ALL, NOW)  # write denied for the connect token
    [check] = refresh(session, f"authenticated:{NOW + 60}")
    session.authorized(check, READ_ALL, NOW)
    [again] = private_broadcast(session, "3")
    assert again.write == (Extension.BROADCAST,) and again.claims.role == "authenticated"


def test_pushes_during_a_refresh_check_wait_for_its_verdict() -> None:
    session = new_session()
    join_private(session)
    [check] = refresh(session, f"authenticated:{NOW + 60}")
    assert private_broadcast(session, "2") == []
    [write] = session.authorized(check, READ_ALL, NOW)
    assert isinstance(write, Authorize) and write.claims.role == "authenticated"


def test_private_refresh_the_database_cannot_answer_closes_the_channel() -> None:
    session = new_session()
    join_private(session)
    [check] = refresh(session, f"authenticated:{NOW + 60}")
    out = frames(session.authorized(check, None, NOW))
    assert out[0].payload["message"] == "Realtime was unable to connect to the project database"
    assert out[1].event == "phx_close"


def test_leaving_a_private_channel_drops_every_group_it_joined() -> None:
    session = new_session()
    join_private(session, config={"presence": {"enabled": True}})
    effects = session.handle(Message("1", "2", "realtime:room1", "phx_leave", {}), NOW)
    assert {e.group for e in effects if isinstance(e, Unsubscribe)} == {BROADCAST_GROUP, PRESENCE_GROUP}


def test_joins_waiting_for_their_check_count_toward_the_channel_limit() -> None:  # C30
    session = new_session(max_channels=2)
    join(session, topic="realtime:a", ref="1", payload={"config": {"private": True}})
    join(session, topic="realtime:b", ref="2", payload={"config": {"private": True}})
    out = frames(join(session, topic="realtime:c", ref="3"))
    assert out[0].payload["response"] == {"reason": "ChannelRateLimitReached: Too many channels"}
