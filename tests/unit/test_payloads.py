"""Tests for realtime.protocol.payloads: joins as clients send them (PROTOCOL.md 3.1)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.protocol.payloads import (
    DEFAULT_REPLAY_LIMIT,
    JoinConfig,
    ReplayConfig,
    parse_flexible_bool,
    parse_join_payload,
)

pytestmark = pytest.mark.unit

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=15,
)
# Values placed where the parser looks, so the interesting branches are reached.
config_like = st.fixed_dictionaries(
    {},
    optional={
        "private": json_values,
        "broadcast": st.fixed_dictionaries(
            {},
            optional={
                "self": json_values,
                "ack": json_values,
                "replication_ready": json_values,
                "replay": json_values
                | st.fixed_dictionaries({}, optional={"since": json_values, "limit": json_values}),
            },
        )
        | json_values,
        "presence": st.fixed_dictionaries({}, optional={"key": json_values, "enabled": json_values})
        | json_values,
        "postgres_changes": st.lists(json_values, max_size=4) | json_values,
    },
)
join_like = st.fixed_dictionaries(
    {},
    optional={
        "config": config_like | json_values,
        "access_token": json_values,
        "user_token": json_values,
        "version": json_values,
    },
)

REALTIME_JS_JOIN: dict[str, Any] = {
    "config": {
        "broadcast": {"ack": False, "self": False},
        "presence": {"key": "", "enabled": False},
        "postgres_changes": [
            {"event": "INSERT", "schema": "public", "table": "todos", "filter": "id=eq.1"}
        ],
        "private": False,
    },
    "access_token": "jwt",
    "version": "realtime-js/2.119.0",
}


def assert_well_typed(config: JoinConfig) -> None:
    assert isinstance(config, JoinConfig)
    for flag in (
        config.private,
        config.broadcast_self,
        config.broadcast_ack,
        config.replication_ready,
        config.presence_enabled,
        config.has_config,
    ):
        assert type(flag) is bool
    assert config.presence_key is None or (
        type(config.presence_key) is str and config.presence_key != ""
    )
    assert type(config.postgres_changes) is tuple
    assert all(type(binding) is dict for binding in config.postgres_changes)
    assert config.access_token is None or type(config.access_token) is str
    assert type(config.errors) is tuple
    assert all(type(error) is str for error in config.errors)
    if config.replay is not None:
        assert isinstance(config.replay, ReplayConfig)
        assert type(config.replay.since) is int
        assert type(config.replay.limit) is int
        assert type(config.replay.valid) is bool


# --- flexible booleans --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        ("true", True),
        ("True", True),
        ("TRUE", True),
        (" True ", True),
        ("false", False),
        ("FaLsE", False),
        ("\tfalse\n", False),
        ("yes", None),
        ("1", None),
        ("", None),
        (1, None),
        (0, None),
        (1.0, None),
        (None, None),
        ([], None),
        ({}, None),
    ],
)
def test_booleans_are_read_the_way_clients_send_them(value: Any, expected: bool | None) -> None:
    assert parse_flexible_bool(value) is expected


# --- the realtime-js and Python payloads -----------------------------------------


def test_realtime_js_join_payload_is_read() -> None:
    config = parse_join_payload(REALTIME_JS_JOIN)
    assert config == JoinConfig(
        postgres_changes=(
            {"event": "INSERT", "schema": "public", "table": "todos", "filter": "id=eq.1"},
        ),
        access_token="jwt",
    )


def test_all_options_on_are_read() -> None:
    config = parse_join_payload(
        {
            "config": {
                "private": True,
                "broadcast": {"self": True, "ack": True, "replication_ready": True},
                "presence": {"key": "u1", "enabled": True},
            }
        }
    )
    assert config == JoinConfig(
        private=True,
        broadcast_self=True,
        broadcast_ack=True,
        replication_ready=True,
        presence_enabled=True,
        presence_key="u1",
    )


def test_empty_config_gives_the_defaults_with_no_errors() -> None:
    assert parse_join_payload({"config": {}}) == JoinConfig()


def test_python_client_join_with_user_token_alias_is_read() -> None:
    config = parse_join_payload(
        {"config": {"presence": {"key": ""}, "postgres_changes": []}, "user_token": "jwt"}
    )
    assert config.access_token == "jwt"
    assert config.presence_key is None
    assert config.errors == ()


def test_access_token_wins_over_user_token() -> None:
    assert parse_join_payload({"config": {}, "access_token": "a", "user_token": "u"}).access_token == "a"


def test_non_string_access_token_is_ignored_with_an_error() -> None:
    config = parse_join_payload({"config": {}, "access_token": 12})
    assert config.access_token is None
    assert config.errors == ("access_token: expected a string",)


def test_null_access_token_falls_back_to_user_token() -> None:
    config = parse_join_payload({"config": {}, "access_token": None, "user_token": "u"})
    assert config.access_token == "u"
    assert config.errors == ()


def test_bindings_are_kept_verbatim_and_in_order() -> None:
    bindings = [
        {"event": "insert", "schema": "public", "table": "b"},
        {"event": "*", "schema": "public", "select": ["title"], "extra": {"k": None}},
        {"event": "DELETE", "table": "a", "filter": None},
    ]
    config = parse_join_payload({"config": {"postgres_changes": bindings}})
    assert list(config.postgres_changes) == bindings
    assert config.errors == ()


def test_legacy_join_without_config_is_flagged() -> None:
    config = parse_join_payload({"user_token": "jwt"})
    assert config.has_config is False
    assert config.access_token == "jwt"
    assert config.errors == ()


def test_unknown_keys_are_ignored() -> None:
    config = parse_join_payload({"config": {"other": 1, "broadcast": {"x": 2}}, "version": 3})
    assert config == JoinConfig()


# --- invalid input still joins (PROTOCOL.md 3.1, checklist C27) -----------------


def test_string_config_still_joins_with_defaults() -> None:
    config = parse_join_payload({"config": "x"})
    assert config == JoinConfig(errors=("config: expected an object",))


def test_private_as_capitalised_string_makes_a_private_channel() -> None:
    assert parse_join_payload({"config": {"private": "True"}}).private is True


def test_unreadable_private_is_public_with_an_error() -> None:
    config = parse_join_payload({"config": {"private": 1, "broadcast": {"self": "yes"}}})
    assert config.private is False
    assert config.broadcast_self is False
    assert config.errors == (
        "config.private: expected a boolean",
        "config.broadcast.self: expected a boolean",
    )


@pytest.mark.parametrize("value", ["x", 1, True, [], [{"self": True}]])
def test_broadcast_and_presence_that_are_not_objects_give_defaults(value: Any) -> None:
    config = parse_join_payload(
        {"config": {"broadcast": value, "presence": value, "private": True}}
    )
    assert config == JoinConfig(
        private=True,
        errors=("config.broadcast: expected an object", "config.presence: expected an object"),
    )


def test_null_options_give_defaults_silently() -> None:
    config = parse_join_payload(
        {
            "config": {
                "private": None,
                "broadcast": None,
                "presence": {"key": None, "enabled": None},
                "postgres_changes": None,
            },
            "access_token": None,
        }
    )
    assert config == JoinConfig()


def test_null_config_is_not_a_legacy_join() -> None:
    assert parse_join_payload({"config": None}) == JoinConfig()


def test_null_bindings_are_dropped_silently_and_other_non_objects_with_an_error() -> None:
    binding = {"event": "*", "schema": "public"}
    config = parse_join_payload({"config": {"postgres_changes": [None, binding, "x", 3, None, [1]]}})
    assert config.postgres_changes == (binding,)
    assert config.errors == (
        "config.postgres_changes[2]: expected an object",
        "config.postgres_changes[3]: expected an object",
        "config.postgres_changes[5]: expected an object",
    )


@pytest.mark.parametrize("value", ["x", {"event": "*"}, 1, True])
def test_bindings_that_are_not_a_list_give_none(value: Any) -> None:
    config = parse_join_payload({"config": {"postgres_changes": value}})
    assert config.postgres_changes == ()
    assert config.errors == ("config.postgres_changes: expected an array of objects",)


@pytest.mark.parametrize(
    ("key", "expected"),
    [("", None), (None, None), ("u1", "u1"), (7, "7"), (1.5, "1.5"), (True, "true")],
)
def test_presence_key_is_kept_or_left_for_the_server_to_generate(
    key: Any, expected: str | None
) -> None:
    config = parse_join_payload({"config": {"presence": {"key": key}}})
    assert config.presence_key == expected
    assert config.errors == ()


@pytest.mark.parametrize("key", [[], {}, ["u1"]])
def test_presence_key_that_is_not_a_scalar_is_generated_with_an_error(key: Any) -> None:
    config = parse_join_payload({"config": {"presence": {"key": key, "enabled": "true"}}})
    assert config.presence_key is None
    assert config.presence_enabled is True
    assert config.errors == ("config.presence.key: expected a string",)


@pytest.mark.parametrize("payload", [None, "x", 3, [], ["config"]])
def test_payload_that_is_not_an_object_still_joins(payload: Any) -> None:
    config = parse_join_payload(payload)
    assert config.private is False
    assert config.postgres_changes == ()
    if payload is None:
        assert config == JoinConfig(has_config=False)
    else:
        assert config == JoinConfig(errors=("payload: expected an object",))


# --- replay (PROTOCOL.md 5.5) --------------------------------------------------


def test_no_replay_requested() -> None:
    assert parse_join_payload({"config": {"broadcast": {"replay": None}}}).replay is None


def test_replay_since_and_limit_are_read() -> None:
    config = parse_join_payload({"config": {"private": True, "broadcast": {"replay": {"since": 0, "limit": 2}}}})
    assert config.replay == ReplayConfig(since=0, limit=2)


def test_replay_numbers_written_as_whole_floats_are_read() -> None:
    config = parse_join_payload({"config": {"broadcast": {"replay": {"since": 5e3, "limit": 3.0}}}})
    assert config.replay == ReplayConfig(since=5000, limit=3)


def test_replay_without_limit_uses_the_default() -> None:
    config = parse_join_payload({"config": {"broadcast": {"replay": {"since": 1700000000000}}}})
    assert config.replay == ReplayConfig(since=1700000000000, limit=DEFAULT_REPLAY_LIMIT)


@pytest.mark.parametrize(
    "replay",
    ["x", [], {"since": "yesterday"}, {"since": 0, "limit": True}, {"since": 1.5}, {"since": 0, "limit": [2]}, {}],
)
def test_unreadable_replay_is_marked_invalid(replay: Any) -> None:
    config = parse_join_payload({"config": {"broadcast": {"replay": replay}}})
    assert config.replay is not None
    assert config.replay.valid is False
    assert len(config.errors) == 1


# --- never raises -----------------------------------------------------------------


@given(payload=json_values)
@settings(max_examples=100)
def test_any_json_join_payload_joins(payload: Any) -> None:
    assert_well_typed(parse_join_payload(payload))


@given(payload=join_like)
@settings(max_examples=120)
def test_any_json_in_the_known_fields_joins(payload: dict[str, Any]) -> None:
    config = parse_join_payload(payload)
    assert_well_typed(config)
    assert config.has_config is ("config" in payload)
