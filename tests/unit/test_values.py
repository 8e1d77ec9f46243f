"""Tests for pgtypes.values: Postgres text output -> typed JSON (PROTOCOL.md 4.5).

The reference is ``to_jsonb(value)`` as captured from a real PostgreSQL 16 in
tests/fixtures/pgoutput/captured.json (``values``), with the one documented
exception of a bytea value, delivered as its hex digits.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from realtime.protocol.serializer import encode_json as serializer_encode_json
from pgtypes.values import (
    ArrayItem,
    DecodeError,
    JsonValue,
    convert,
    convert_row,
    encode_json,
    parse_array_literal,
)

pytestmark = pytest.mark.unit

FIXTURE = Path(__file__).parents[1] / "fixtures" / "pgoutput" / "captured.json"
VALUE_CASES: list[dict[str, Any]] = json.loads(FIXTURE.read_text(encoding="utf-8"))["values"]
FLOAT_TYPES = {"float4", "float8", "_float4", "_float8"}


def canonical(json_text: str) -> str:
    """JSON text re-encoded compactly with every number's digits kept."""
    return encode_json(json.loads(json_text, parse_float=Decimal))


# --- against Postgres --------------------------------------------------------


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=f"{c['type']}:{c['text'][:30]}") for c in VALUE_CASES]
)
def test_conversion_matches_postgres_to_jsonb(case: dict[str, Any]) -> None:
    ours = encode_json(convert(case["type"], case["text"]))
    expected = case["jsonb"]
    if case["type"] == "bytea":
        # PROTOCOL.md 4.5: the hex digits as wal2json emits them, not to_jsonb's "\\x...".
        expected = json.dumps(json.loads(expected).removeprefix("\\x"))
    if case["type"] in FLOAT_TYPES:
        # jsonb writes a float as a numeric ("1e+300" -> 1000...0); the number is the same.
        assert json.loads(ours, parse_float=Decimal) == json.loads(expected, parse_float=Decimal)
    else:
        assert ours == canonical(expected)


def test_postgres_array_output_is_what_the_test_formatter_writes() -> None:
    # Keeps format_array_literal below honest for the round-trip property.
    text_arrays = [c["text"] for c in VALUE_CASES if c["type"] in ("_text", "_varchar", "_int4")]

    assert len(text_arrays) >= 5
    for text in text_arrays:
        if not text.startswith("["):
            assert format_array_literal(parse_array_literal(text)) == text


# --- conversion rules --------------------------------------------------------


@pytest.mark.parametrize(
    ("type_name", "text", "expected"),
    [
        ("int2", "-32768", -32768),
        ("int4", "7", 7),
        ("int8", "9007199254740993", 9007199254740993),
        ("oid", "26", "26"),
        ("float8", "1.5", 1.5),
        ("float8", "-0", 0.0),
        ("float4", "NaN", "NaN"),
        ("float8", "Infinity", "Infinity"),
        ("float8", "-Infinity", "-Infinity"),
        ("numeric", "1.50", Decimal("1.50")),
        ("numeric", "NaN", "NaN"),
        ("numeric", "-Infinity", "-Infinity"),
        ("bool", "t", True),
        ("bool", "f", False),
        ("jsonb", '{"a": [1, 2.50, null]}', {"a": [1, Decimal("2.50"), None]}),
        ("json", '{"b": 1, "a": 2, "b": 3}', {"a": 2, "b": 3}),
        ("json", "not json", "not json"),
        ("text", "x", "x"),
        ("uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        ("date", "2026-08-21", "2026-08-21"),
        ("date", "infinity", "infinity"),
        ("timestamp", "2026-08-21 12:00:00.123", "2026-08-21T12:00:00.123"),
        ("timestamp", "-infinity", "-infinity"),
        ("timestamptz", "2026-08-21 12:00:00.123+00", "2026-08-21T12:00:00.123+00:00"),
        ("timestamptz", "2026-08-21 17:30:00+05:30", "2026-08-21T17:30:00+05:30"),
        ("timestamptz", "1880-01-01 07:03:58-04:56:02", "1880-01-01T07:03:58-04:56:02"),
        ("timestamptz", "0044-03-15 12:00:00+00 BC", "0044-03-15T12:00:00+00:00 BC"),
        ("timestamptz", "infinity", "infinity"),
        ("time", "12:00:01.5", "12:00:01.5"),
        ("timetz", "12:00:00+00", "12:00:00+00"),
        ("interval", "1 day 02:00:00", "1 day 02:00:00"),
        ("bytea", "\\x0102030405", "0102030405"),
        ("bytea", "\\001", "\\001"),
        ("mood", "happy", "happy"),
        ("no_such_type", "raw", "raw"),
        ("_int4", "{1,2,NULL}", [1, 2, None]),
        ("_int4", "{{1,2},{3,4}}", [[1, 2], [3, 4]]),
        ("_int4", "[0:1]={1,2}", [1, 2]),
        ("_int4", "{}", []),
        ("_text", '{"a b",NULL,"NULL"}', ["a b", None, "NULL"]),
        ("_bytea", '{"\\\\x01"}', ["\\x01"]),
        ("_mood", "{sad,happy}", ["sad", "happy"]),
        ("_box", "{(1,1),(0,0);(2,2),(1,1)}", ["(1,1),(0,0)", "(2,2),(1,1)"]),
        ("_int4", "{1,x}", ["1", "x"]),
        ("_int4", "{1,2", "{1,2"),
        ("_", "x", "x"),
    ],
)
def test_convert(type_name: str, text: str, expected: JsonValue) -> None:
    value = convert(type_name, text)

    assert value == expected
    assert type(value) is type(expected)


def test_null_converts_to_none_for_every_type() -> None:
    assert {convert(t, None) for t in ("int4", "jsonb", "_int4", "text", "x")} == {None}


def test_binary_format_values_become_hex_digits() -> None:
    assert convert("bytea", b"\x01\xff") == "01ff"


def test_convert_row_keeps_column_order_and_skips_absent_columns() -> None:
    columns = [("id", "int8"), ("body", "text"), ("tags", "_text"), ("done", "bool")]
    raw: dict[str, str | bytes | None] = {"done": "t", "tags": "{x,y}", "id": "1"}

    row = convert_row(columns, raw)

    assert row == {"id": 1, "tags": ["x", "y"], "done": True}
    assert list(row) == ["id", "tags", "done"]


@given(
    st.sampled_from(
        ["int4", "int8", "float8", "numeric", "bool", "json", "jsonb", "timestamp",
         "timestamptz", "bytea", "_int4", "_numeric", "_jsonb", "_float4", "_text", "text"]
    ),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=30),  # no lone surrogates: Postgres text is valid UTF-8
)  # fmt: skip
def test_convert_never_raises_and_its_result_encodes(type_name: str, text: str) -> None:
    value = convert(type_name, text)
    json.loads(encode_json(value).encode("utf-8"))  # encodes, as UTF-8 too, and is JSON


@pytest.mark.parametrize(("type_name", "text"), [("json", '"\\ud800"'), ("json", '{"k": "\\udfff"}'), ("_json", '{"\\"\\\\ud800\\""}')])
def test_a_lone_surrogate_escape_in_json_converts_to_what_utf8_carries(type_name: str, text: str) -> None:
    # PostgreSQL's json type keeps its input text, so it stores such escapes (jsonb refuses them).
    json.loads(encode_json(convert(type_name, text)).encode("utf-8"))


def test_json_surrogates_become_the_replacement_character_unless_paired() -> None:
    assert convert("json", '{"\\ud800k": ["a\\udfff", 1]}') == {"\ufffdk": ["a\ufffd", 1]}
    assert convert("json", '"\\ud83d\\ude00 \\u00e9"') == "\U0001f600 \u00e9"  # a pair is one character


# --- JSON encoding -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Decimal("12345678901234567890123.123456789"), "12345678901234567890123.123456789"),
        (Decimal("1.50"), "1.50"),
        (Decimal("0.0000001"), "0.0000001"),
        (Decimal("1E+5"), "100000"),
        (Decimal("-0.0"), "0.0"),
        ({"a": [Decimal("1.0"), {"b": Decimal("2")}], "é": "ü"}, '{"a":[1.0,{"b":2}],"é":"ü"}'),
        ((1, Decimal("2")), "[1,2]"),
    ],
)
def test_encode_json_writes_decimals_with_their_exact_digits(value: object, expected: str) -> None:
    assert encode_json(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        {"id": 9007199254740993, "t": "x\u2028y", "f": 1.5, "n": None, "l": [True, False]},
        ["é", {"a": {}}],
    ],
)
def test_encode_json_without_decimals_is_the_serializer_encoding(value: object) -> None:
    assert encode_json(value) == serializer_encode_json(value)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (float("nan"), ValueError),
        ([Decimal("1"), float("inf")], ValueError),
        ([Decimal("NaN")], ValueError),
        ({1: Decimal("1")}, TypeError),
        (object(), TypeError),
        ([Decimal("1"), object()], TypeError),
    ],
)
def test_encode_json_refuses_what_json_cannot_carry(value: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        encode_json(value)


# --- array literals ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{}", []),
        ("  { } ", []),
        ("{1,2,3}", ["1", "2", "3"]),
        ("{ 1 , 2 }", ["1", "2"]),
        ("{a b,c}", ["a b", "c"]),
        ('{"a b","",NULL,null,"NULL",nuLL}', ["a b", "", None, None, "NULL", None]),
        ('{"q\\"uote","back\\\\slash"}', ['q"uote', "back\\slash"]),
        ("{a\\,b,\\ c }", ["a,b", " c"]),
        ('{ab"c d"e}', ["abc de"]),
        ('{" padded "}', [" padded "]),
        ("{{1,2},{3,4}}", [["1", "2"], ["3", "4"]]),
        ("{{{1}}}", [[["1"]]]),
        ("{{},{}}", [[], []]),
        ("[0:1]={1,2}", ["1", "2"]),
        ("[1:1][3:4]={{1,2}}", [["1", "2"]]),
    ],
)
def test_parse_array_literal(text: str, expected: list[ArrayItem]) -> None:
    assert parse_array_literal(text) == expected


def test_parse_array_literal_uses_the_given_delimiter() -> None:
    assert parse_array_literal("{(1,1),(0,0);(2,2)}", ";") == ["(1,1),(0,0)", "(2,2)"]


@pytest.mark.parametrize(
    "text",
    [
        "", "1,2", "{", "{1,2", "{1,}", "{,1}", "{1,,2}", "{1 2 {3}}", '{"a}', "{a\\",
        '{"a\\', "{1}{2}", "{1} x", "{{1}2}", "{1,{2}x}", "[1:2]{1,2}", "[1:2]=1",
    ],
)  # fmt: skip
def test_malformed_array_literals_raise_decode_error(text: str) -> None:
    with pytest.raises(DecodeError):
        parse_array_literal(text)


def needs_quotes(item: str) -> bool:
    # array_out quotes empty strings, NULL look-alikes, specials and whitespace.
    return (
        item == ""
        or item.upper() == "NULL"
        or any(char in '{}",\\' or char in " \t\n\r\v\f" for char in item)
    )


def format_array_literal(items: list[ArrayItem]) -> str:
    """Write ``items`` the way array_out does (reference for the round trip)."""
    parts = []
    for item in items:
        if item is None:
            parts.append("NULL")
        elif isinstance(item, list):
            parts.append(format_array_literal(item))
        elif needs_quotes(item):
            escaped = item.replace("\\", "\\\\").replace('"', '\\"')
            parts.append(f'"{escaped}"')
        else:
            parts.append(item)
    return "{" + ",".join(parts) + "}"


array_elements = st.none() | st.text(
    alphabet=st.characters(exclude_categories=["Cs"], include_characters='{}",\\ \tNUL'),
    max_size=8,
)
arrays: st.SearchStrategy[list[ArrayItem]] = st.recursive(
    st.lists(array_elements, max_size=4),
    lambda children: st.lists(children, min_size=1, max_size=3),
    max_leaves=12,
)


@given(arrays)
def test_array_literals_round_trip(items: list[ArrayItem]) -> None:
    assert parse_array_literal(format_array_literal(items)) == items


@given(st.lists(st.integers(min_value=-(2**70), max_value=2**70) | st.none(), max_size=6))
def test_integer_array_literals_convert_to_the_integers(numbers: list[int | None]) -> None:
    text = format_array_literal([None if n is None else str(n) for n in numbers])

    assert convert("_int8", text) == numbers


@given(st.text(alphabet='{}",\\ a1N', max_size=20))
def test_parse_array_literal_of_arbitrary_text_returns_or_raises_decode_error(text: str) -> None:
    try:
        parse_array_literal(text)
    except DecodeError:
        pass


def test_json_nested_deeper_than_python_parses_stays_text() -> None:
    deep = "[" * 5000 + "]" * 5000

    assert convert("jsonb", deep) == deep
    assert convert("_int4", "{" * 3000 + "1" + "}" * 3000) == "{" * 3000 + "1" + "}" * 3000
