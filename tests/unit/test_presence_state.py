"""Tests for presence.state (metas, presence_state and presence_diff, PROTOCOL.md 6.2)
and presence.keys (the Redis key names, whatever channel or key a client picks)."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from presence.keys import (
    channel_index_key,
    channels_key,
    escape_name,
    member_key,
    process_key,
    process_members_key,
    processes_key,
)

from presence.state import (
    Diff,
    Entry,
    is_empty,
    join_diff,
    leave_diff,
    make_meta,
    merge_diffs,
    new_phx_ref,
    presence_state,
    update_diff,
)

pytestmark = pytest.mark.unit


def entry(key: str, phx_ref: str, joined_at: float, **payload: Any) -> Entry:
    return Entry(
        channel="public:room1",
        key=key,
        phx_ref=phx_ref,
        meta=make_meta(payload, phx_ref),
        socket_id=f"socket-{phx_ref}",
        process_id="p1",
        joined_at=joined_at,
    )


def test_new_phx_ref_is_an_opaque_urlsafe_string() -> None:
    ref = new_phx_ref()
    assert re.fullmatch(r"[A-Za-z0-9_-]{16}", ref)


def test_new_phx_refs_are_unique() -> None:
    assert len({new_phx_ref() for _ in range(10_000)}) == 10_000


def test_make_meta_adds_phx_ref_without_touching_the_payload() -> None:
    payload = {"user": "ann"}
    assert make_meta(payload, "r1") == {"user": "ann", "phx_ref": "r1"}
    assert payload == {"user": "ann"}


def test_make_meta_overrides_a_client_sent_phx_ref() -> None:
    assert make_meta({"phx_ref": "forged"}, "r1") == {"phx_ref": "r1"}


def test_entry_is_immutable() -> None:
    item = entry("ann", "r1", 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        item.key = "bob"  # type: ignore[misc]
    assert not hasattr(item, "__dict__")


def test_presence_state_of_nobody_is_an_empty_object() -> None:
    assert presence_state([]) == {}


def test_presence_state_groups_metas_by_key() -> None:
    state = presence_state([entry("ann", "r1", 1.0, user="ann"), entry("bob", "r2", 2.0, user="bob")])
    assert state == {
        "ann": {"metas": [{"user": "ann", "phx_ref": "r1"}]},
        "bob": {"metas": [{"user": "bob", "phx_ref": "r2"}]},
    }


def test_presence_state_orders_metas_and_keys_by_join_time() -> None:
    state = presence_state(
        [
            entry("ann", "late", 3.0, device="phone"),
            entry("bob", "r2", 2.0),
            entry("ann", "early", 1.0, device="laptop"),
        ]
    )
    assert list(state) == ["ann", "bob"]
    assert [meta["phx_ref"] for meta in state["ann"]["metas"]] == ["early", "late"]


def test_presence_state_copies_metas() -> None:
    item = entry("ann", "r1", 1.0, user="ann")
    presence_state([item])["ann"]["metas"][0]["user"] = "changed"
    assert item.meta["user"] == "ann"


def test_join_diff_has_the_meta_in_joins_and_empty_leaves() -> None:
    assert join_diff("ann", {"user": "ann", "phx_ref": "r1"}) == {
        "joins": {"ann": {"metas": [{"user": "ann", "phx_ref": "r1"}]}},
        "leaves": {},
    }


def test_leave_diff_has_the_meta_in_leaves_and_empty_joins() -> None:
    assert leave_diff("ann", {"user": "ann", "phx_ref": "r1"}) == {
        "joins": {},
        "leaves": {"ann": {"metas": [{"user": "ann", "phx_ref": "r1"}]}},
    }


def test_update_diff_joins_the_new_meta_with_phx_ref_prev_and_leaves_the_old() -> None:
    old = {"status": "away", "phx_ref": "r1"}
    new = {"status": "online", "phx_ref": "r2"}
    assert update_diff("ann", new, old) == {
        "joins": {"ann": {"metas": [{"status": "online", "phx_ref": "r2", "phx_ref_prev": "r1"}]}},
        "leaves": {"ann": {"metas": [{"status": "away", "phx_ref": "r1"}]}},
    }
    assert new == {"status": "online", "phx_ref": "r2"}


def test_merge_of_no_diffs_is_an_empty_diff() -> None:
    assert merge_diffs() == {"joins": {}, "leaves": {}}


def test_merge_concatenates_metas_per_key_in_order() -> None:
    merged = merge_diffs(
        join_diff("ann", {"phx_ref": "r1"}),
        join_diff("ann", {"phx_ref": "r2"}),
        leave_diff("bob", {"phx_ref": "r3"}),
        leave_diff("cat", {"phx_ref": "r4"}),
    )
    assert merged == {
        "joins": {"ann": {"metas": [{"phx_ref": "r1"}, {"phx_ref": "r2"}]}},
        "leaves": {"bob": {"metas": [{"phx_ref": "r3"}]}, "cat": {"metas": [{"phx_ref": "r4"}]}},
    }


def test_merge_drops_a_meta_that_joins_and_leaves_within_the_batch() -> None:
    merged = merge_diffs(
        join_diff("ann", {"phx_ref": "r1"}),
        join_diff("bob", {"phx_ref": "r2"}),
        leave_diff("ann", {"phx_ref": "r1"}),
    )
    assert merged == {"joins": {"bob": {"metas": [{"phx_ref": "r2"}]}}, "leaves": {}}


def test_merge_of_chained_updates_keeps_the_first_old_and_the_last_new_meta() -> None:
    first = {"v": 1, "phx_ref": "r1"}
    second = {"v": 2, "phx_ref": "r2"}
    third = {"v": 3, "phx_ref": "r3"}
    merged = merge_diffs(update_diff("ann", second, first), update_diff("ann", third, second))
    assert merged == {
        "joins": {"ann": {"metas": [{"v": 3, "phx_ref": "r3", "phx_ref_prev": "r2"}]}},
        "leaves": {"ann": {"metas": [{"v": 1, "phx_ref": "r1"}]}},
    }


def test_is_empty_tells_whether_a_diff_changes_anything() -> None:
    assert is_empty({"joins": {}, "leaves": {}})
    assert is_empty(merge_diffs(join_diff("ann", {"phx_ref": "r1"}), leave_diff("ann", {"phx_ref": "r1"})))
    assert not is_empty(join_diff("ann", {"phx_ref": "r1"}))


def apply(state: dict[str, set[str]], diff: Diff) -> None:
    """What realtime-js does with a diff: joins first, then leaves, by phx_ref."""
    for key, presence in diff["joins"].items():
        state.setdefault(key, set()).update(meta["phx_ref"] for meta in presence["metas"])
    for key, presence in diff["leaves"].items():
        state.setdefault(key, set()).difference_update(meta["phx_ref"] for meta in presence["metas"])
        if not state[key]:
            del state[key]


operations = st.lists(st.tuples(st.sampled_from(["track", "untrack"]), st.sampled_from(["ann", "bob"])), max_size=12)


@given(operations, st.integers(min_value=0, max_value=12))
def test_a_merged_diff_has_the_same_effect_as_its_parts(ops: list[tuple[str, str]], split: int) -> None:
    current: dict[str, dict[str, Any]] = {}
    diffs: list[Diff] = []
    for number, (op, key) in enumerate(ops):
        old = current.get(key)
        if op == "track":
            new = {"n": number, "phx_ref": f"r{number}"}
            diffs.append(join_diff(key, new) if old is None else update_diff(key, new, old))
            current[key] = new
        elif old is not None:
            diffs.append(leave_diff(key, old))
            del current[key]
    one_by_one: dict[str, set[str]] = {}
    for diff in diffs:
        apply(one_by_one, diff)
    batched: dict[str, set[str]] = {}
    apply(batched, merge_diffs(*diffs[:split]))
    apply(batched, merge_diffs(*diffs[split:]))
    assert batched == one_by_one == {key: {meta["phx_ref"]} for key, meta in current.items()}


# --- key names (presence.keys) --------------------------------------------------

ordinary_names = st.from_regex(r"[A-Za-z0-9._-]*", fullmatch=True)
ordinary_channels = st.from_regex(r"(public|private):[A-Za-z0-9._:-]+", fullmatch=True)
# Few characters, most of them special, so that hypothesis tries many near misses.
hostile_text = st.text(alphabet=":%/*?[]\\\nus er.3Aé\u202e\x00", max_size=12)
hostile_channels = st.builds(lambda side, rest: f"{side}:{rest}", st.sampled_from(["public", "private"]), hostile_text)
GLOB_OR_SPACE = re.compile(r"[*?\[\]\\\s\x00-\x1f]")


@given(channel=ordinary_channels, key=ordinary_names)
def test_ordinary_names_keep_the_key_format_they_always_had(channel: str, key: str) -> None:
    assert member_key(channel, key) == f"presence:channel:{channel}:user:{key}"
    assert channel_index_key(channel) == f"presence:index:{channel}"
    assert process_key(key) == f"presence:alive:{key}"
    assert process_members_key(key) == f"presence:owned:{key}"


def test_fixed_key_names_are_unchanged() -> None:
    assert (channels_key(), processes_key()) == ("presence:channels", "presence:processes")
    assert member_key("public:room-1", "4f1c6a1e-0d55-4bd4-9a5e-0c5f0b4b8b1a") == (
        "presence:channel:public:room-1:user:4f1c6a1e-0d55-4bd4-9a5e-0c5f0b4b8b1a"
    )


@given(first=st.tuples(hostile_channels, hostile_text), second=st.tuples(hostile_channels, hostile_text))
@example(first=("public:a:user:b", "c"), second=("public:a", "b:user:c"))
@example(first=("public:a/b", "k"), second=("public:a%2Fb", "k"))
@example(first=("public:a", "b:c"), second=("public:a", "b%3Ac"))
@example(first=("public:*", "k"), second=("public:[a]", "k"))
def test_different_channel_and_key_pairs_never_share_a_member_key(
    first: tuple[str, str], second: tuple[str, str]
) -> None:
    if first != second:
        assert member_key(*first) != member_key(*second)
    if first[0] != second[0]:
        assert channel_index_key(first[0]) != channel_index_key(second[0])


@given(channel=hostile_channels, key=hostile_text)
def test_member_keys_and_index_keys_never_meet_each_other_or_the_fixed_keys(channel: str, key: str) -> None:
    names = {member_key(channel, key), channel_index_key(channel), channels_key(), processes_key()}
    assert len(names) == 4
    assert member_key(channel, key).startswith("presence:channel:")


@given(channel=hostile_channels, key=hostile_text)
@example(channel="public:*", key="[a-z]?")
@example(channel="public:room\n1", key="a b\\")
def test_escaped_names_hold_no_glob_character_or_whitespace(channel: str, key: str) -> None:
    for name in (member_key(channel, key), channel_index_key(channel), process_key(key)):
        assert GLOB_OR_SPACE.search(name) is None, name


@given(channel=hostile_channels, other=hostile_channels)
@example(channel="public:*", other="public:room1")
@example(channel="public:room[12]", other="public:room1")
def test_a_pattern_made_of_a_channel_index_key_matches_that_channel_alone(channel: str, other: str) -> None:
    # What SCAN MATCH would do: with no glob characters left, the pattern is a literal.
    matches = fnmatch.fnmatchcase(channel_index_key(other), channel_index_key(channel))
    assert matches == (channel == other)


@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        ("room-1_a.b", "room-1_a.b"),
        ("a:b", "a%3Ab"),
        ("a/b", "a%2Fb"),
        ("%2F", "%252F"),
        ("*?[]\\", "%2A%3F%5B%5D%5C"),
        ("line\nbreak", "line%0Abreak"),
        ("é~ ", "%C3%A9%7E%20"),
        ("\ud800", "%ED%A0%80"),  # a lone surrogate is escaped, not an error
    ],
)
def test_escape_name_percent_encodes_each_utf8_byte_outside_the_ordinary_set(name: str, escaped: str) -> None:
    assert escape_name(name) == escaped


def test_a_channel_keeps_its_colons_and_a_key_does_not() -> None:
    assert member_key("public:room:1", "user:42") == "presence:channel:public:room:1:user:user%3A42"
