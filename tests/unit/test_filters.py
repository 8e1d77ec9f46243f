"""Tests for realtime.filters: grammar, typed matching, fan-out index (PROTOCOL.md 4.2-4.4)."""

from __future__ import annotations

import re
import time
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from core.errors import FilterError, RealtimeError, SqlState
from pgtypes.casting import normalize_value
from realtime.filters.grammar import MAX_IN_VALUES, Condition, FilterOp, parse_filter
from realtime.filters.index import BindingIndex
from realtime.filters.predicates import (
    MAX_REGEX_LENGTH,
    MAX_REGEX_PROGRAM_SIZE,
    Matcher,
    compile_conditions,
    compile_filter,
)

pytestmark = pytest.mark.unit

TYPES = {
    "id": "int8",
    "user_id": "int4",
    "small": "int2",
    "name": "text",
    "status": "text",
    "details": "text",
    "title": "varchar",
    "code": "bpchar",
    "email": "citext",
    "price": "numeric",
    "score": "float8",
    "ratio": "float4",
    "done": "bool",
    "uid": "uuid",
    "created_at": "timestamptz",
    "happened": "timestamp",
    "day": "date",
    "starts": "time",
    "blob": "bytea",
    "data": "jsonb",
    "raw": "json",
    "tags": "_text",
    "counts": "_int4",
    "mood": "mood",
}

ALL_OPS = list(FilterOp)


def matcher(text: str, types: dict[str, str] | None = None) -> Matcher:
    return compile_filter(text, TYPES if types is None else types)


def matches(text: str, record: dict[str, Any]) -> bool:
    return matcher(text).match(record)


def error_of(text: str, types: dict[str, str] | None = None) -> FilterError:
    with pytest.raises(FilterError) as info:
        compile_filter(text, TYPES if types is None else types)
    return info.value


# --- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [None, "", "   ", "\t\n"])
def test_blank_or_missing_filter_means_no_conditions(text):
    assert parse_filter(text) == ()
    assert compile_filter(text, TYPES).match({}) is True


def test_condition_holds_column_op_and_value():
    assert parse_filter("id=eq.5") == (Condition("id", FilterOp.EQ, False, "5"),)


def test_conditions_split_on_top_level_commas_into_an_and():
    assert parse_filter("id=gt.0,id=lt.10") == (
        Condition("id", FilterOp.GT, False, "0"),
        Condition("id", FilterOp.LT, False, "10"),
    )


def test_whitespace_around_filter_and_segments_is_ignored():
    assert parse_filter("  id=eq.5 ,  name=eq.x  ") == (
        Condition("id", FilterOp.EQ, False, "5"),
        Condition("name", FilterOp.EQ, False, "x"),
    )


@pytest.mark.parametrize("op", [op for op in FilterOp if op not in (FilterOp.IN, FilterOp.IS)])
def test_not_prefix_negates_every_operator(op):
    (condition,) = parse_filter(f"col=not.{op.value}.v")
    assert condition == Condition("col", op, True, "v")


def test_not_prefix_negates_in_and_is():
    assert parse_filter("a=not.in.(1,2),b=not.is.null") == (
        Condition("a", FilterOp.IN, True, None, ("1", "2")),
        Condition("b", FilterOp.IS, True, "null"),
    )


def test_value_keeps_dots_and_equals_after_the_operator():
    assert parse_filter("url=eq.a.b=c") == (Condition("url", FilterOp.EQ, False, "a.b=c"),)


def test_quoted_value_keeps_its_commas_and_is_unquoted():
    assert parse_filter('name=eq."a,b",id=eq.1') == (
        Condition("name", FilterOp.EQ, False, "a,b"),
        Condition("id", FilterOp.EQ, False, "1"),
    )


def test_quoted_value_drops_backslash_escapes():
    assert parse_filter(r'name=eq."say \"hi\" \\ (x)"')[0].value == r'say "hi" \ (x)'


@pytest.mark.parametrize("raw", ['"abc', '"a"b', '"', '"abc\\"'])
def test_malformed_quoted_value_is_kept_as_written(raw):
    assert parse_filter(f"name=eq.{raw}")[0].value == raw


def test_quote_in_mid_value_does_not_protect_commas():
    with pytest.raises(FilterError) as info:
        parse_filter('name=eq.a"b,c"')
    assert info.value.message == 'Error parsing `filter` params: ["c\\""]'


def test_in_list_splits_into_items_inside_parentheses():
    assert parse_filter("status=in.(a,b),id=eq.1") == (
        Condition("status", FilterOp.IN, False, None, ("a", "b")),
        Condition("id", FilterOp.EQ, False, "1"),
    )


def test_in_items_follow_postgres_array_literal_rules():
    (condition,) = parse_filter(r'status=in.( a b ,"c,d", NULL ,"null",e\,f,"")')
    assert condition.values == ("a b", "c,d", None, "null", "e,f", "")


def test_empty_in_list_has_no_items():
    assert parse_filter("status=in.()")[0].values == ()


def test_in_list_of_the_maximum_size_is_accepted():
    items = ",".join(str(n) for n in range(MAX_IN_VALUES))
    assert len(parse_filter(f"id=in.({items})")[0].values) == MAX_IN_VALUES


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("wrong", 'Error parsing `filter` params: ["wrong"]'),
        ("undefined", 'Error parsing `filter` params: ["undefined"]'),
        ("id=foo.1", 'Error parsing `filter` params: ["foo", "1"]'),
        ("subject=fts.hey", 'Error parsing `filter` params: ["fts", "hey"]'),
        ("id=not.foo.1", 'Error parsing `filter` params: ["foo", "1"]'),
        ("id=EQ.1", 'Error parsing `filter` params: ["EQ", "1"]'),
        ("id=eq", 'Error parsing `filter` params: ["eq"]'),
        ("id=not.eq", 'Error parsing `filter` params: ["eq"]'),
        ("id=", 'Error parsing `filter` params: [""]'),
        ('a=b"c.1', 'Error parsing `filter` params: ["b\\"c", "1"]'),
        ("id=eq.1,wrong", 'Error parsing `filter` params: ["wrong"]'),
        (
            "id=in.1,2",
            "Error parsing `filter` params: `in` filter value must be wrapped by parentheses",
        ),
        (
            "id=in.(1",
            "Error parsing `filter` params: `in` filter value must be wrapped by parentheses",
        ),
        (
            "id=eq.1,,name=eq.x",
            "Error parsing `filter` params: "
            "filter must not contain empty segments (check for extra commas)",
        ),
        (
            "id=eq.1,",
            "Error parsing `filter` params: "
            "filter must not contain empty segments (check for extra commas)",
        ),
        (
            ", id=eq.1",
            "Error parsing `filter` params: "
            "filter must not contain empty segments (check for extra commas)",
        ),
    ],
)
def test_malformed_filter_gives_the_reference_parse_error(text, message):
    with pytest.raises(FilterError) as info:
        parse_filter(text)
    assert info.value.message == message
    assert info.value.code == "InvalidFilter"
    assert info.value.sqlstate is None
    assert info.value.postgres_error is None
    assert isinstance(info.value, RealtimeError)


def test_in_list_longer_than_100_is_refused():
    items = ",".join(str(n) for n in range(MAX_IN_VALUES + 1))
    with pytest.raises(FilterError) as info:
        parse_filter(f"id=in.({items})")
    assert info.value.message == "too many values for `in` filter. Maximum 100"
    assert info.value.postgres_error == (
        "ERROR P0001 (raise_exception) too many values for `in` filter. Maximum 100"
    )


@pytest.mark.parametrize("items", ["(a,,b)", "(a,)", '("a)', "({a})", '(a"b")', "(a\\)"])
def test_malformed_in_list_is_refused(items):
    with pytest.raises(FilterError) as info:
        parse_filter(f"status=in.{items}")
    assert info.value.message.startswith("malformed array literal: ")
    assert info.value.sqlstate is SqlState.INVALID_TEXT_REPRESENTATION


@pytest.mark.parametrize("value", ["maybe", "NULL", "True", ""])
def test_is_value_must_be_a_keyword(value):
    with pytest.raises(FilterError) as info:
        parse_filter(f"done=is.{value}")
    assert f'"{value}"' in info.value.message
    assert info.value.message.startswith("invalid value for is filter")
    assert info.value.sqlstate is SqlState.RAISE_EXCEPTION


def test_parse_error_renders_unprintable_parts_as_bytes():
    with pytest.raises(FilterError) as info:
        parse_filter("a\x01b")
    assert info.value.message == "Error parsing `filter` params: [<<97, 1, 98>>]"


# --- subscribe-time checks ------------------------------------------------------------------


def test_unknown_column_is_refused():
    error = error_of("notacolumn=eq.1")
    assert error.message == "invalid column for filter notacolumn"
    assert error.postgres_error == (
        "ERROR P0001 (raise_exception) invalid column for filter notacolumn"
    )


@pytest.mark.parametrize(
    ("text", "message", "sqlstate"),
    [
        ("user_id=eq.abc", 'invalid input syntax for type integer: "abc"', "22P02"),
        ("id=gt.1.5", 'invalid input syntax for type bigint: "1.5"', "22P02"),
        ("small=eq.40000", 'value "40000" is out of range for type smallint', "22003"),
        ("user_id=in.(1,x)", 'invalid input syntax for type integer: "x"', "22P02"),
        ("price=gt.cheap", 'invalid input syntax for type numeric: "cheap"', "22P02"),
        ("score=lt.1e400", '"1e400" is out of range for type double precision', "22003"),
        ("ratio=lt.1e39", '"1e39" is out of range for type real', "22003"),
        ("done=eq.maybe", 'invalid input syntax for type boolean: "maybe"', "22P02"),
        ("uid=eq.nope", 'invalid input syntax for type uuid: "nope"', "22P02"),
        (
            "created_at=gt.soon",
            'invalid input syntax for type timestamp with time zone: "soon"',
            "22P02",
        ),
        ("day=eq.2024-13-01", 'invalid input syntax for type date: "2024-13-01"', "22P02"),
        ("data=eq.{", "invalid input syntax for type json", "22P02"),
        ("tags=eq.a", 'malformed array literal: "a"', "22P02"),
        ('counts=eq."{1,x}"', 'invalid input syntax for type integer: "x"', "22P02"),
        ("blob=eq.\\xzz", 'invalid hexadecimal digit: "z"', "22023"),
        ("name=isdistinct.a\x00b", 'invalid byte sequence for encoding "UTF8": 0x00', "22021"),
    ],
)
def test_value_that_does_not_cast_to_the_column_type_is_refused(text, message, sqlstate):
    error = error_of(text)
    assert error.message == message
    assert error.sqlstate is not None and error.sqlstate.value == sqlstate


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id=like.1%", "operator like requires a text-compatible column type, got bigint"),
        ("done=ilike.t%", "operator ilike requires a text-compatible column type, got boolean"),
        ("data=match.a", "operator match requires a text-compatible column type, got jsonb"),
        ("mood=imatch.a", "operator imatch requires a text-compatible column type, got mood"),
        ("user_id=is.true", "is true filter requires a boolean column, got integer"),
        ("name=not.is.false", "is false filter requires a boolean column, got text"),
        ("data=lt.1", "operator lt is not supported on column data of type jsonb"),
        ("raw=eq.{}", "operator eq is not supported on column raw of type json"),
        ("raw=isdistinct.{}", "operator isdistinct is not supported on column raw of type json"),
        ("tags=in.(a,b)", "operator in is not supported on column tags of type text[]"),
    ],
)
def test_operator_the_column_type_lacks_is_refused(text, message):
    error = error_of(text)
    assert error.message == message
    assert error.sqlstate is SqlState.RAISE_EXCEPTION


def test_invalid_regular_expression_is_refused():
    error = error_of("name=match.(unclosed")
    assert error.message.startswith("invalid regular expression for match filter: ")
    assert error.sqlstate is SqlState.RAISE_EXCEPTION


def test_like_pattern_ending_in_escape_is_refused():
    error = error_of("name=like.abc\\")
    assert error.message == "LIKE pattern must not end with escape character"


def test_is_null_is_accepted_on_any_column_type():
    for column in TYPES:
        assert compile_filter(f"{column}=is.null", TYPES).match({column: None})


def test_column_types_may_be_given_by_sql_name():
    assert matcher("n=eq.5", {"n": "integer"}).match({"n": 5})
    assert error_of("n=eq.x", {"n": "bigint"}).message == (
        'invalid input syntax for type bigint: "x"'
    )


# --- matching -------------------------------------------------------------------------------


def test_row_level_filter():
    row_filter = matcher("user_id=eq.123")
    assert row_filter.match({"id": 1, "user_id": 123})
    assert not row_filter.match({"id": 2, "user_id": 124})
    assert not row_filter.match({"id": 3, "user_id": None})
    assert not row_filter.match({"id": 4})


def test_eq_compares_as_the_column_type_not_as_text():
    assert matches("id=eq.5", {"id": 5})
    assert matches("id=eq.+05", {"id": 5})
    assert matches("id=eq.5", {"id": Decimal("5")})
    assert not matches("id=eq.5", {"id": 50})
    assert matches("price=eq.1.0", {"price": Decimal("1.00")})
    assert matches("price=eq.1", {"price": 1})


@pytest.mark.parametrize(
    ("op", "below", "equal", "above"),
    [
        ("eq", False, True, False),
        ("neq", True, False, True),
        ("lt", True, False, False),
        ("lte", True, True, False),
        ("gt", False, False, True),
        ("gte", False, True, True),
    ],
)
def test_comparison_operators_and_their_negations(op, below, equal, above):
    for value, expected in ((4, below), (5, equal), (6, above)):
        assert matches(f"id={op}.5", {"id": value}) is expected
        assert matches(f"id=not.{op}.5", {"id": value}) is (not expected)


def test_numeric_compares_numerically():
    assert matches("price=gt.9.5", {"price": Decimal("9.51")})
    assert matches("price=gt.9.5", {"price": 10})
    assert not matches("price=gt.9.5", {"price": Decimal("9.50")})
    assert not matches("price=gt.9.5", {"price": Decimal("10.0") - Decimal("0.5")})
    assert matches("price=lt.1e3", {"price": Decimal("999.99")})


def test_numeric_nan_equals_itself_and_sorts_above_every_number():
    assert matches("price=eq.NaN", {"price": Decimal("NaN")})
    assert matches("price=gt.Infinity", {"price": Decimal("NaN")})
    assert matches("score=gt.1e308", {"score": "NaN"})
    assert not matches("score=lt.0", {"score": float("nan")})


def test_float_compares_numerically():
    assert matches("score=lt.0.5", {"score": 0.25})
    assert matches("score=eq.2", {"score": 2})
    assert not matches("score=lt.0.5", {"score": 0.5})
    assert matches("score=eq.-Infinity", {"score": "-Infinity"})


def test_real_compares_at_single_precision():
    assert matches("ratio=eq.0.1", {"ratio": 0.1})
    assert matches("ratio=eq.0.100000001", {"ratio": 0.1})
    assert not matches("score=eq.0.100000001", {"score": 0.1})


def test_text_compares_by_code_point():
    assert matches("name=lt.a", {"name": "B"})
    assert matches("name=gt.Z", {"name": "a"})
    assert matches("name=gte.abc", {"name": "abc"})
    assert not matches("name=eq.abc", {"name": "ABC"})


def test_bpchar_ignores_trailing_spaces_and_citext_ignores_case():
    assert matches("code=eq.ab", {"code": "ab   "})
    assert matches("email=eq.Foo@Example.com", {"email": "foo@example.COM"})
    assert matches("email=like.FOO%", {"email": "foo@example.com"})
    assert matches("email=match.^FOO", {"email": "foo@example.com"})


def test_boolean_compares_as_boolean():
    assert matches("done=eq.true", {"done": True})
    assert matches("done=eq.t", {"done": True})
    assert matches("done=eq.off", {"done": False})
    assert not matches("done=eq.yes", {"done": False})
    assert matches("done=lt.true", {"done": False})


def test_uuid_compares_case_insensitively():
    uid = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert matches(f"uid=eq.{uid.upper()}", {"uid": uid})
    assert matches("uid=eq.{a0eebc999c0b4ef8bb6d6bb9bd380a11}", {"uid": uid})
    assert not matches(f"uid=neq.{uid}", {"uid": uid})


def test_timestamptz_compares_instants_across_offsets():
    assert matches("created_at=eq.2024-01-01T00:00:00Z", {"created_at": "2024-01-01T02:00+02:00"})
    assert matches("created_at=gt.2024-01-01 00:00:00", {"created_at": "2024-01-01T00:00:01Z"})
    assert not matches("created_at=gt.2024-01-01T00:00Z", {"created_at": "2023-12-31T23:59:59.9Z"})
    assert matches("created_at=lt.infinity", {"created_at": "9999-12-31T00:00:00+00:00"})
    assert matches("created_at=eq.-infinity", {"created_at": "-infinity"})


def test_timestamp_date_and_time_compare_chronologically():
    assert matches("happened=lt.2024-01-02T00:00:00", {"happened": "2024-01-01T23:59:59.5"})
    assert matches("day=lte.2024-01-31", {"day": "2024-01-31"})
    assert not matches("day=lte.2024-01-31", {"day": "2024-02-01"})
    assert matches("starts=gt.09:00", {"starts": "09:30:00"})


def test_bytea_compares_bytes():
    assert matches("blob=eq.\\x0102", {"blob": "0102"})
    assert matches("blob=eq.\\x0102", {"blob": "\\x0102"})
    assert matches("blob=eq.ab", {"blob": "6162"})
    assert not matches("blob=eq.\\x0103", {"blob": "0102"})


def test_jsonb_equality_ignores_key_order_and_number_spelling():
    document = js_serialize_scalar('{"b":[1,2],"a":1.0}')
    assert matches(f"data=eq.{document}", {"data": {"a": 1, "b": [1, 2]}})
    assert not matches(f"data=eq.{document}", {"data": {"a": 1, "b": [2, 1]}})
    assert matches(f"data=neq.{document}", {"data": [1, 2]})
    assert matches("data=eq.1", {"data": Decimal("1.00")})
    assert not matches("data=eq.1", {"data": True})
    quoted_string = js_serialize_scalar('"x"')
    assert matches(f"data=eq.{quoted_string}", {"data": "x"})


def test_arrays_compare_element_by_element():
    assert matches('tags=eq."{a,b}"', {"tags": ["a", "b"]})
    assert not matches('tags=eq."{a,b}"', {"tags": ["b", "a"]})
    assert matches("tags=gt.{a}", {"tags": ["a", "b"]})
    assert matches('counts=lt."{1,10}"', {"counts": [1, 9]})
    assert matches('counts=eq."{1,NULL}"', {"counts": [1, None]})
    assert matches('counts=gt."{1,2}"', {"counts": [1, None]})


def test_enum_and_other_types_compare_as_text():
    assert matches("mood=eq.happy", {"mood": "happy"})
    assert not matches("mood=eq.happy", {"mood": "sad"})


def test_in_matches_any_listed_value():
    status = matcher("status=in.(a,b)")
    assert status.match({"status": "a"})
    assert status.match({"status": "b"})
    assert not status.match({"status": "c"})
    assert matches("status=not.in.(a,b)", {"status": "c"})
    assert not matches("status=not.in.(a,b)", {"status": "a"})
    assert matches("id=in.(1,2,3)", {"id": 2})
    assert matches('name=in.("a,b",c)', {"name": "a,b"})


def test_in_with_a_null_item_is_never_true_when_nothing_equals():
    assert matches("status=in.(a,null)", {"status": "a"})
    assert not matches("status=in.(a,null)", {"status": "b"})
    assert not matches("status=not.in.(a,null)", {"status": "b"})


def test_empty_in_list_matches_nothing_and_its_negation_everything():
    assert not matches("status=in.()", {"status": "a"})
    assert matches("status=not.in.()", {"status": "a"})


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        ("a%", "abc", True),
        ("a%", "bac", False),
        ("%b%", "abc", True),
        ("a_c", "abc", True),
        ("a_c", "abbc", False),
        ("%", "", True),
        ("a\\%", "a%", True),
        ("a\\%", "ab", False),
        ("a\\_c", "a_c", True),
        ("a\\_c", "abc", False),
        ("%a%a%", "aXa", True),
        ("%a%a%", "aX", False),
        ("a%c", "a\nb\nc", True),
        ("ABC", "abc", False),
    ],
)
def test_like_follows_sql_pattern_rules(pattern, text, expected):
    assert matches(f"name=like.{pattern}", {"name": text}) is expected
    assert matches(f"name=not.like.{pattern}", {"name": text}) is (not expected)


def test_ilike_ignores_case():
    assert matches("name=ilike.ABC%", {"name": "abcdef"})
    assert not matches("name=ilike.ABC%", {"name": "xabc"})
    assert matches("name=not.ilike.x%", {"name": "abc"})


def test_match_and_imatch_search_with_a_regex():
    assert matches("name=match.^a.c$", {"name": "abc"})
    assert matches("name=match.b", {"name": "abc"})
    assert not matches("name=match.^B", {"name": "bcd"})
    assert matches("name=imatch.^B", {"name": "bcd"})
    assert not matches("name=imatch.^x", {"name": "bcd"})
    assert matches("name=not.match.^x", {"name": "bcd"})
    assert matches("name=match.a.b", {"name": "a\nb"})


# Each would backtrack for minutes or more under Python re; RE2 is linear in the value.
# 0.5 s is a generous bound for ~10 KB on a slow machine: the point is exponential vs linear.
@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        (r"^(\w+\s?)*$", "word " * 2000 + "!", False),
        (r"^(\w+\s?)*$", "word " * 2000, True),
        (r"(a+)+$", "a" * 10_000 + "!", False),
        (r"(a+)+$", "!" + "a" * 10_000, True),
        (r"(a|aa)*b", "a" * 10_000, False),
        (r"(a|aa)*b", "a" * 10_000 + "b", True),
        (r"(.*a){20}", "a" * 19 + "b" * 10_000, False),
        (r"(.*a){20}", "ab" * 5_000, True),
    ],
)
def test_pathological_regex_runs_in_linear_time(pattern, text, expected):
    compiled = matcher(f"title=match.{pattern}")
    started = time.perf_counter()
    result = compiled.match({"title": text})
    elapsed = time.perf_counter() - started
    assert result is expected
    assert elapsed < 0.5


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(a)\1", r"invalid escape sequence: \1"),
        ("(?=a)", "invalid perl operator: (?="),
        ("(?<=a)b", "invalid perl operator: (?<="),
        ("a++", "bad repetition operator: ++"),
        (r"\ma", r"invalid escape sequence: \m"),
        ("(a{1000}){1000}", "invalid repetition size: {1000}"),
        (r"\pL{1000}", "pattern too large - compile failed"),
    ],
)
def test_regex_re2_cannot_run_is_refused_at_subscribe_time(pattern, reason):
    for op in ("match", "imatch"):
        error = error_of(f"name={op}.{pattern}")
        assert error.message == f"invalid regular expression for {op} filter: {reason}"
        assert error.sqlstate is SqlState.RAISE_EXCEPTION


def test_regex_longer_than_the_cap_is_refused():
    assert matches(f"name=match.{'a' * MAX_REGEX_LENGTH}", {"name": "a" * MAX_REGEX_LENGTH})
    error = error_of(f"name=match.{'a' * (MAX_REGEX_LENGTH + 1)}")
    assert error.message == (
        "invalid regular expression for match filter: pattern longer than 1000 characters"
    )
    assert error.sqlstate is SqlState.RAISE_EXCEPTION


def test_regex_compiling_to_a_large_program_is_refused():
    assert matches("name=match.^.{255}$", {"name": "x" * 255})
    error = error_of("name=match..{1000}")
    assert error.message.startswith(
        "invalid regular expression for match filter: pattern too large ("
    )
    assert f"at most {MAX_REGEX_PROGRAM_SIZE})" in error.message


def test_imatch_ignores_case_and_match_does_not():
    assert matches("name=imatch.HELLO", {"name": "say hello"})
    assert not matches("name=match.HELLO", {"name": "say hello"})
    assert matches("name=imatch.^ÉTÉ$", {"name": "été"})
    assert matches("name=not.imatch.WORLD", {"name": "say hello"})


def test_regex_dot_matches_newline_and_dollar_is_the_end_of_the_value():
    assert matches("name=match.^a.b$", {"name": "a\nb"})
    assert matches("name=match.a[^x]b", {"name": "a\nb"})
    assert not matches("name=match.a$", {"name": "a\n"})


def test_regex_with_a_lone_surrogate():
    assert matches("name=match.^x.y$", {"name": "x\ud800y"})
    error = error_of("name=match.\ud800")
    assert error.message == (
        "invalid regular expression for match filter: pattern is not valid UTF-8"
    )


def test_is_null_and_is_not_null():
    assert matches("name=is.null", {"name": None})
    assert not matches("name=is.null", {"name": "x"})
    assert matches("name=not.is.null", {"name": "x"})
    assert not matches("name=not.is.null", {"name": None})


@pytest.mark.parametrize(
    ("keyword", "on_true", "on_false", "on_null"),
    [
        ("true", True, False, False),
        ("false", False, True, False),
        ("unknown", False, False, True),
        ("null", False, False, True),
    ],
)
def test_is_keywords_on_a_boolean_column(keyword, on_true, on_false, on_null):
    for value, expected in ((True, on_true), (False, on_false), (None, on_null)):
        assert matches(f"done=is.{keyword}", {"done": value}) is expected
        assert matches(f"done=not.is.{keyword}", {"done": value}) is (not expected)


def test_isdistinct_treats_null_as_a_value():
    assert matches("status=isdistinct.a", {"status": "b"})
    assert matches("status=isdistinct.a", {"status": None})
    assert not matches("status=isdistinct.a", {"status": "a"})
    assert matches("status=not.isdistinct.a", {"status": "a"})
    assert not matches("status=not.isdistinct.a", {"status": None})
    assert matches("id=isdistinct.5", {"id": 6})


NULL_PASSING = {
    "name=is.null",
    "done=is.unknown",
    "done=not.is.true",
    "done=not.is.false",
    "name=isdistinct.a",
}
NULL_CASES = [
    "name=eq.a",
    "name=neq.a",
    "name=lt.a",
    "name=lte.a",
    "name=gt.a",
    "name=gte.a",
    "name=in.(a,b)",
    "name=like.%",
    "name=ilike.%",
    "name=match.",
    "name=imatch.",
    "done=is.true",
    "done=is.false",
    "name=not.eq.a",
    "name=not.neq.a",
    "name=not.lt.a",
    "name=not.in.(a,b)",
    "name=not.like.x",
    "name=not.ilike.x",
    "name=not.match.x",
    "name=not.imatch.x",
    "name=not.is.null",
    "done=not.is.unknown",
    "name=not.isdistinct.a",
    *sorted(NULL_PASSING),
]


@pytest.mark.parametrize("text", NULL_CASES)
def test_null_value_fails_every_operator_but_is_and_isdistinct(text):
    column = text.split("=")[0]
    assert matches(text, {column: None}) is (text in NULL_PASSING)


@pytest.mark.parametrize("text", NULL_CASES)
def test_condition_on_a_column_absent_from_the_record_is_false(text):
    assert matches(text, {"id": 1}) is False


def test_value_of_the_wrong_json_type_fails_the_condition():
    assert not matches("id=eq.5", {"id": "five"})
    assert not matches("id=not.eq.5", {"id": "five"})
    assert not matches("id=eq.1", {"id": True})
    assert not matches("name=not.like.x", {"name": 5})
    assert not matches("done=not.is.true", {"done": "maybe"})


def test_all_conditions_must_hold():
    bounded = matcher("id=gt.0,id=lt.10")
    assert bounded.match({"id": 5})
    assert not bounded.match({"id": 20})
    assert not bounded.match({"id": 0})
    skip = matcher("details=not.eq.skip")
    assert skip.match({"details": "keep"})
    assert not skip.match({"details": "skip"})
    both = matcher('name=eq."a,b",status=in.(x,y)')
    assert both.match({"name": "a,b", "status": "y"})
    assert not both.match({"name": "a,b", "status": "z"})
    assert not both.match({"name": "a", "status": "y"})


def test_compile_conditions_accepts_parsed_conditions():
    compiled = compile_conditions(parse_filter("id=eq.5"), TYPES)
    assert compiled.conditions == (Condition("id", FilterOp.EQ, False, "5"),)
    assert compiled.column_types == {"id": "int8"}
    assert compiled.match({"id": 5})


def test_first_plain_eq_condition_is_the_index_key():
    compiled = matcher("name=like.a%,id=not.eq.1,id=eq.3,user_id=eq.4")
    assert (compiled.eq_column, compiled.eq_value) == ("id", 3)
    assert matcher("id=not.eq.1,status=in.(a)").eq_column is None
    assert matcher("").eq_column is None


# --- normalisation and the index ------------------------------------------------------------


def test_normalize_value_matches_the_compiled_eq_value():
    assert normalize_value("int8", 5) == matcher("id=eq.5").eq_value
    assert normalize_value("numeric", Decimal("5.00")) == matcher("price=eq.5").eq_value
    assert normalize_value("uuid", "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11") == (
        matcher("uid=eq.a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").eq_value
    )
    assert normalize_value("int4", None) is None
    assert normalize_value("int4", "x") is None


def index_of(filters: dict[str, str]) -> BindingIndex[str]:
    index: BindingIndex[str] = BindingIndex()
    for key, text in filters.items():
        compiled = matcher(text)
        index.add(key, compiled, compiled.eq_column, compiled.eq_value)
    return index


def test_index_returns_a_small_candidate_set_for_many_eq_bindings():
    index: BindingIndex[int] = BindingIndex()
    for n in range(1000):
        compiled = matcher(f"id=eq.{n}")
        index.add(n, compiled, compiled.eq_column, compiled.eq_value)
    everything = matcher("")
    index.add(-1, everything, everything.eq_column, everything.eq_value)
    assert len(index) == 1001
    assert index.candidates({"id": 500, "name": "x"}) == {500, -1}
    assert index.candidates({"id": 5000}) == {-1}
    assert index.matches({"id": 7}) == {7, -1}


def test_index_looks_up_the_old_record_too():
    index = index_of({"one": "id=eq.1", "two": "id=eq.2", "three": "id=eq.3"})
    assert index.candidates({"id": 1}, {"id": 2}) == {"one", "two"}
    assert index.candidates(None, {"id": 3}) == {"three"}
    assert index.candidates({}, None) == set()


def test_index_normalises_values_by_column_type():
    index = index_of({"five": "price=eq.5", "uid": "uid=eq.A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"})
    assert index.candidates({"price": Decimal("5.000")}) == {"five"}
    assert index.candidates({"price": 5}) == {"five"}
    assert index.candidates({"uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"}) == {"uid"}


def test_bindings_without_a_plain_eq_are_always_candidates():
    index = index_of({"neg": "id=not.eq.5", "in": "id=in.(1,2)", "eq": "id=eq.9"})
    assert index.candidates({"id": 5}) == {"neg", "in"}
    assert index.matches({"id": 5}) == set()
    assert index.matches({"id": 1}) == {"neg", "in"}


def test_index_candidates_are_filtered_by_the_full_matcher():
    index = index_of({"a": "id=eq.1,status=eq.open", "b": "id=eq.1,status=eq.closed"})
    assert index.candidates({"id": 1, "status": "open"}) == {"a", "b"}
    assert index.matches({"id": 1, "status": "open"}) == {"a"}


def test_delete_matches_on_the_old_record():
    index = index_of({"mine": "user_id=eq.7"})
    assert index.matches(None, {"id": 1, "user_id": 7}) == {"mine"}
    assert index.matches(None, {"id": 1}) == set()


def test_remove_forgets_a_binding_and_add_replaces_one():
    index = index_of({"a": "id=eq.1", "b": "id=eq.1", "c": ""})
    index.remove("a")
    index.remove("a")
    index.remove("missing")
    assert "a" not in index
    assert index.candidates({"id": 1}) == {"b", "c"}
    index.remove("c")
    assert index.candidates({"id": 1}) == {"b"}
    replacement = matcher("id=eq.2")
    index.add("b", replacement, replacement.eq_column, replacement.eq_value)
    assert index.candidates({"id": 1}) == set()
    assert index.candidates({"id": 2}) == {"b"}
    assert index.matcher("b") is replacement
    index.remove("b")
    assert len(index) == 0
    assert index.candidates({"id": 2}) == set()


def test_index_refuses_an_eq_column_the_matcher_does_not_filter():
    index: BindingIndex[str] = BindingIndex()
    compiled = matcher("id=eq.1")
    with pytest.raises(ValueError):
        index.add("a", compiled, "name", "x")


# --- properties -----------------------------------------------------------------------------

FILTER_TOKENS = st.sampled_from(
    [op.value for op in FilterOp]
    + ["not", ".", "=", ",", "(", ")", '"', "\\", " ", "id", "a", "1", "null", "%", "_"]
)
filterish_text = st.lists(FILTER_TOKENS, max_size=20).map("".join)


@given(st.one_of(st.text(max_size=60), filterish_text))
@settings(max_examples=300, deadline=None)
def test_parse_filter_returns_conditions_or_raises_filter_error(text):
    try:
        parsed = parse_filter(text)
    except FilterError as error:
        assert error.message
        return
    assert isinstance(parsed, tuple)
    for condition in parsed:
        assert isinstance(condition, Condition)
        assert (condition.value is None) is (condition.op is FilterOp.IN)
        assert len(condition.values) <= MAX_IN_VALUES


JS_WHITESPACE = (
    "\t\n\x0b\x0c\r \xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)
JS_RESERVED = re.compile(r'[,()"\\]')


def js_serialize_scalar(value: str) -> str:
    # realtime-js postgresChangesFilter(): PostgREST-style quoting.
    if JS_RESERVED.search(value) or value != value.strip(JS_WHITESPACE):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def js_render(conditions: list[Condition]) -> str:
    rendered = []
    for condition in conditions:
        prefix = "not." if condition.negated else ""
        if condition.op is FilterOp.IN:
            items = ",".join(js_serialize_scalar(item or "") for item in condition.values)
            operand = f"in.({items})"
        elif condition.op is FilterOp.IS:
            operand = f"is.{condition.value}"
        else:
            operand = f"{condition.op.value}.{js_serialize_scalar(condition.value or '')}"
        rendered.append(f"{condition.column}={prefix}{operand}")
    return ",".join(rendered)


value_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x85")
    | st.sampled_from(' \t,()"\\.=%_'),
    max_size=12,
)
# realtime-js leaves braces and the word null unquoted, where Postgres reads an array or NULL.
in_item = value_text.filter(
    lambda item: item != "" and item.lower() != "null" and "{" not in item and "}" not in item
)
columns = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True)


@st.composite
def conditions(draw: st.DrawFn) -> Condition:
    op = draw(st.sampled_from(ALL_OPS))
    column = draw(columns)
    negated = draw(st.booleans())
    if op is FilterOp.IN:
        items = draw(st.lists(in_item, max_size=6, unique=True))
        return Condition(column, op, negated, None, tuple(items))
    if op is FilterOp.IS:
        keyword = draw(st.sampled_from(["null", "true", "false", "unknown"]))
        return Condition(column, op, negated, keyword)
    return Condition(column, op, negated, draw(value_text))


@given(st.lists(conditions(), min_size=1, max_size=4))
@settings(max_examples=150, deadline=None)
def test_filters_rendered_by_realtime_js_parse_back_to_the_same_conditions(generated):
    assert parse_filter(js_render(generated)) == tuple(generated)


def like_by_regex(pattern: str, text: str) -> bool:
    parts = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            parts.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        parts.append(".*" if char == "%" else "." if char == "_" else re.escape(char))
        i += 1
    return re.fullmatch("".join(parts), text, re.DOTALL) is not None


@given(st.text(alphabet="ab%_\\", max_size=8), st.text(alphabet="ab%_\n", max_size=8))
@settings(max_examples=500, deadline=None)
def test_like_agrees_with_a_regex_translation(pattern, text):
    assume(_escapes_balanced(pattern))
    compiled = compile_filter(f"name=like.{js_serialize_scalar(pattern)}", TYPES)
    assert compiled.match({"name": text}) is like_by_regex(pattern, text)


def _escapes_balanced(pattern: str) -> bool:
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\":
            if i + 1 >= len(pattern):
                return False
            i += 2
        else:
            i += 1
    return True


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.decimals(allow_nan=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8,
)


@given(
    st.sampled_from(sorted(TYPES)),
    st.sampled_from(ALL_OPS),
    st.booleans(),
    value_text
    | st.sampled_from(
        ["1", "-1.5", "true", "{a,b}", "{1,2}", "\\x01", "2024-01-01", '{"a":1}', "NaN"]
    ),
    json_values,
)
@settings(max_examples=250, deadline=None)
def test_compiled_conditions_never_fail_on_any_json_record(
    column, op, negated, value, record_value
):
    if op is FilterOp.IN:
        condition = Condition(column, op, negated, None, (value,))
    elif op is FilterOp.IS:
        condition = Condition(column, op, negated, "true" if value == "true" else "null")
    else:
        condition = Condition(column, op, negated, value)
    try:
        compiled = compile_conditions([condition], TYPES)
    except FilterError:
        return
    assert compiled.match({column: record_value}) in (True, False)
    assert compiled.match({}) is False


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["id=eq.", "id=not.eq.", "id=gt.", "status=eq."]), st.integers(0, 5)
        ),
        max_size=30,
    ),
    st.lists(
        st.fixed_dictionaries(
            {"id": st.integers(0, 5) | st.none(), "status": st.sampled_from(["0", "1", "x"])}
        ),
        min_size=1,
        max_size=5,
    ),
)
@settings(max_examples=200, deadline=None)
def test_index_matches_equal_running_every_matcher(specs, records):
    index: BindingIndex[int] = BindingIndex()
    compiled = {}
    for key, (prefix, number) in enumerate(specs):
        compiled[key] = matcher(f"{prefix}{number}")
        index.add(key, compiled[key], compiled[key].eq_column, compiled[key].eq_value)
    for record in records:
        expected = {key for key, each in compiled.items() if each.match(record)}
        assert index.matches(record) == expected
