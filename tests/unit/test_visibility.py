"""The pure parts of ``shared.visibility``: reading a call's answer, verdict bytes, messages, order."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from core.jwt import Claims
from shared.visibility import CallResult, array_literal, check_order, error_text, read_call, verdict_bytes

pytestmark = pytest.mark.unit


def claims(role: str, sub: str = "u") -> Claims:
    return Claims(role=role, exp=0.0, sub=sub, raw={"role": role, "sub": sub})


def test_a_call_lists_what_each_claim_set_sees_and_which_failed() -> None:
    rows = [(1, [2, 1], None, None), (3, None, "boom", "P0001"), (4, [3], None, None)]
    assert read_call(rows, sent=4, keys=3) == CallResult(
        seen={0: [0, 1], 3: [2]}, errors={2: ("P0001", "boom")}, resume=None
    )


def test_a_call_stopped_by_the_timeout_answers_only_before_the_stop() -> None:
    rows = [(1, [1], None, None), (2, None, None, None), (3, [1], None, None), (4, None, "late", "57014")]
    assert read_call(rows, sent=4, keys=1) == CallResult(seen={0: [0]}, errors={}, resume=1)


def test_a_first_claim_set_that_ran_out_of_time_is_an_error_and_the_rest_resume() -> None:
    rows = [(1, None, "canceling statement due to statement timeout", "57014"), (2, None, None, None)]
    assert read_call(rows, sent=3, keys=2) == CallResult(
        seen={}, errors={0: ("57014", "canceling statement due to statement timeout")}, resume=1
    )


def test_positions_and_ordinals_outside_what_was_sent_are_ignored() -> None:
    rows = [(0, [1], None, None), (9, [1], None, None), (1, [0, 1, 5, -2], None, None), (2, None, "x", None)]
    assert read_call(rows, sent=2, keys=2) == CallResult(seen={0: [0]}, errors={1: ("XX000", "x")}, resume=None)


@given(st.integers(0, 40), st.sets(st.integers(-5, 50)))
def test_verdict_bytes_mark_exactly_the_seen_keys(keys: int, seen: set[int]) -> None:
    verdict = verdict_bytes(seen, keys)
    assert len(verdict) == keys
    assert {i for i, byte in enumerate(verdict) if byte} == {i for i in seen if 0 <= i < keys}
    assert set(verdict) <= {0, 1}


@pytest.mark.parametrize(
    ("sqlstate", "message", "text"),
    [
        ("57014", "canceling statement due to statement timeout",
         "ERROR 57014 (query_canceled) canceling statement due to statement timeout"),
        ("22P02", 'invalid input syntax for type uuid: "x"',
         'ERROR 22P02 (invalid_text_representation) invalid input syntax for type uuid: "x"'),
        ("42501", "permission denied for table t", "ERROR 42501 (insufficient_privilege) permission denied for table t"),
        ("ZZ999", "custom", "ERROR ZZ999 (unknown) custom"),
    ],
)
def test_error_text_words_the_sqlstate_as_the_reference_does(sqlstate: str, message: str, text: str) -> None:
    assert error_text(sqlstate, message) == text


def test_claim_sets_are_sent_by_role_with_the_ones_that_timed_out_last() -> None:
    sets = {"d": claims("authenticated"), "a": claims("anon"), "c": claims("authenticated"), "b": claims("authenticated")}
    assert check_order(sets) == ["a", "b", "c", "d"]
    assert check_order(sets, slow={"b", "a"}) == ["c", "d", "a", "b"]


def test_an_array_literal_quotes_every_value() -> None:
    assert array_literal(["1", 'a"b', "c\\d", "x,y", "{}", "NULL", ""]) == '{"1","a\\"b","c\\\\d","x,y","{}","NULL",""}'
    assert array_literal([]) == "{}"
