"""Postgres text output -> the JSON value a change event carries (PROTOCOL.md 4.5).

This module owns the typing of column values. The reference server feeds each
value's text through ``to_jsonb(text::type)`` (``realtime.cast``), except
bytea, which it passes on as the hex digits wal2json emits. :func:`convert`
reproduces that from the type name (``pg_type.typname``) and the text that
pgoutput carries:

===========================================  =====================================
type                                         JSON value
===========================================  =====================================
int2, int4, int8                             int (int8 may exceed 2**53)
float4, float8                               float; ``"NaN"``, ``"Infinity"``,
                                             ``"-Infinity"`` as strings
numeric                                      :class:`~decimal.Decimal` with the
                                             exact digits; NaN/infinities as strings
bool                                         True / False
json, jsonb                                  the parsed value (numbers as Decimal
                                             or int; json keys ordered as jsonb)
timestamp                                    ``"2026-08-21T12:00:00.123"``
timestamptz                                  ``"2026-08-21T12:00:00.123+00:00"``
bytea                                        the hex digits, without ``\\x``
``_elem`` (arrays)                           nested lists, each element converted
                                             as ``to_jsonb`` converts it (so a
                                             bytea element keeps its ``\\x``)
everything else (text, uuid, oid, date,      the text unchanged
time, timetz, interval, enums, money, ...)
===========================================  =====================================

``to_jsonb`` treats only int2/int4/int8/float4/float8/numeric as numbers: an
``oid`` becomes the string ``"26"``. Dates and timestamps keep their
``infinity``/``-infinity`` and `` BC`` forms. Composite values stay text
(``to_jsonb`` would build an object; that needs the composite's fields).

The text is assumed to come from a session with ``DateStyle=ISO`` and
``IntervalStyle=postgres`` (the defaults) and hex ``bytea_output``; the
timestamptz offset is whatever the session's ``TimeZone`` printed.

Python's ``json`` cannot write a Decimal as a bare number, so
:func:`encode_json` encodes a payload holding these values, exactly as
``realtime.protocol.serializer.encode_json`` does otherwise (compact, UTF-8,
no NaN). Conversion never raises: text a converter cannot read is returned
unchanged. :func:`parse_array_literal` raises only :class:`DecodeError`.
The module is pure: no I/O.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Final, TypeAlias

from pgtypes.catalog import PG_SPACE, SCALAR_TYPES, Kind, reject_json_constant

__all__ = [
    "ArrayItem",
    "DecodeError",
    "JsonValue",
    "convert",
    "convert_row",
    "encode_json",
    "parse_array_literal",
]

JsonValue: TypeAlias = (
    None | bool | int | float | str | Decimal | list["JsonValue"] | dict[str, "JsonValue"]
)
ArrayItem: TypeAlias = str | None | list["ArrayItem"]

Converter: TypeAlias = Callable[[str], JsonValue]


class DecodeError(Exception):
    """Text that is not an array literal (``parse_array_literal``)."""


_NON_FINITE: Final = frozenset({"NaN", "Infinity", "-Infinity"})


def _bool(text: str) -> JsonValue:
    if text == "t":
        return True
    if text == "f":
        return False
    return text


def _float(text: str) -> JsonValue:
    # to_jsonb writes non-finite numbers as strings (IsValidJsonNumber fails).
    if text in _NON_FINITE:
        return text
    value = float(text)
    if not math.isfinite(value):
        return text
    return value or 0.0  # "-0" is 0 to jsonb (a numeric)


def _numeric(text: str) -> JsonValue:
    if text in _NON_FINITE:
        return text
    value = Decimal(text)
    if not value.is_finite():
        return text
    return value


def _jsonb_key(item: tuple[str, Any]) -> tuple[int, bytes]:
    # jsonb orders object keys by length, then bytewise (lengthCompareJsonbString).
    encoded = item[0].encode("utf-8", "surrogatepass")
    return (len(encoded), encoded)


def _jsonb_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # jsonb keeps the last of duplicate keys, as dict() does.
    return dict(sorted(dict(pairs).items(), key=_jsonb_key))


def _jsonb(text: str) -> JsonValue:
    # jsonb output is already in jsonb key order; Decimal keeps the digits.
    value: JsonValue = json.loads(text, parse_float=Decimal, parse_constant=reject_json_constant)
    return value


_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _without_lone_surrogates(value: JsonValue) -> JsonValue:
    """``value`` with each lone surrogate (a ``\\ud800`` escape json keeps) as U+FFFD.

    UTF-8 cannot carry a lone surrogate: left in, encoding the change would fail, and with it
    every later change of the stream.
    """
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_LONE_SURROGATE.sub("\ufffd", key): _without_lone_surrogates(item) for key, item in value.items()}
    return value


def _json(text: str) -> JsonValue:
    # to_jsonb(json) goes through jsonb, which reorders and deduplicates keys.
    value: JsonValue = json.loads(
        text, parse_float=Decimal, object_pairs_hook=_jsonb_object, parse_constant=reject_json_constant
    )
    # json (unlike jsonb) keeps its input text, so it may hold \ud800-\udfff escapes without a pair;
    # json.loads turns a valid pair into one character, so only lone ones remain.
    if "\\u" in text:  # no escape, no surrogate: PostgreSQL text is valid UTF-8
        value = _without_lone_surrogates(value)
    return value


# "2026-08-21 12:00:00.123+00", "... BC", offsets +HH, +HH:MM or +HH:MM:SS (DateStyle ISO).
_TIMESTAMPTZ: Final = re.compile(
    r"(\d{4,}-\d\d-\d\d) (\d\d:\d\d:\d\d(?:\.\d+)?)([+-]\d\d)((?::\d\d){0,2})( BC)?"
)


def _timestamp(text: str) -> JsonValue:
    # to_jsonb uses the XSD form: a 'T' between date and time, the rest unchanged.
    if text in ("infinity", "-infinity"):
        return text
    return text.replace(" ", "T", 1)


def _timestamptz(text: str) -> JsonValue:
    match = _TIMESTAMPTZ.fullmatch(text)
    if match is None:
        return text  # infinity, -infinity, or a DateStyle we do not read
    date, time, hours, rest, era = match.groups()
    # The XSD form always writes the offset's minutes; ISO omits zero minutes.
    return f"{date}T{time}{hours}{rest or ':00'}{era or ''}"


def _bytea(text: str) -> JsonValue:
    # PROTOCOL.md 4.5: the hex digits as wal2json emits them ("0102030405").
    if text.startswith("\\x"):
        return text[2:]
    return text  # bytea_output = escape


# Converters for array elements, by the type's kind (``catalog``): exactly what to_jsonb does with
# each element. Kinds without one (text, uuid, date, time...) stay text.
_KIND_CONVERTERS: Final[Mapping[Kind, Converter]] = {
    Kind.BOOLEAN: _bool,
    Kind.INTEGER: int,
    Kind.FLOAT: _float,
    Kind.NUMERIC: _numeric,
    Kind.JSON: _json,
    Kind.JSONB: _jsonb,
    Kind.TIMESTAMP: _timestamp,
    Kind.TIMESTAMPTZ: _timestamptz,
}
_ELEMENT_CONVERTERS: Final[Mapping[str, Converter]] = {
    name: _KIND_CONVERTERS[kind] for name, (kind, _) in SCALAR_TYPES.items() if kind in _KIND_CONVERTERS
}

# Top-level values: the same, but bytea is passed on as hex digits (realtime.cast).
_CONVERTERS: Final[Mapping[str, Converter]] = {**_ELEMENT_CONVERTERS, "bytea": _bytea}

# typdelim: ',' for every built-in type but box.
_DELIMITERS: Final[Mapping[str, str]] = {"box": ";"}


def convert(type_name: str, text: str | bytes | None) -> JsonValue:
    """Convert one value's text output to its JSON value (see the module docstring).

    Args:
        type_name: ``pg_type.typname`` (or the type to convert as, for a domain);
            a name starting with ``_`` is an array of the rest.
        text: the value's text output; None for NULL. ``bytes`` (a value sent in
            binary format) becomes its hex digits.
    """
    if text is None:
        return None
    if isinstance(text, bytes):
        return text.hex()
    try:
        if type_name.startswith("_") and len(type_name) > 1:
            return _convert_array(type_name[1:], text)
        converter = _CONVERTERS.get(type_name)
        return text if converter is None else converter(text)
    except (ValueError, InvalidOperation, RecursionError):
        # RecursionError: JSON nested deeper than Python's json module will go.
        return text


def convert_row(
    columns: Iterable[tuple[str, str]], raw: Mapping[str, str | bytes | None]
) -> dict[str, JsonValue]:
    """Convert a row of raw values, in ``columns`` order.

    Args:
        columns: ``(column name, type name)`` pairs, in table order.
        raw: raw text (or None) by column name, e.g. ``RawRow.values``. Columns
            missing from it (unchanged TOAST, outside a key) are left out.
    """
    return {name: convert(type_name, raw[name]) for name, type_name in columns if name in raw}


def _convert_array(element_type: str, text: str) -> JsonValue:
    try:
        items = parse_array_literal(text, _DELIMITERS.get(element_type, ","))
    except DecodeError:
        return text
    converter = _ELEMENT_CONVERTERS.get(element_type)
    if converter is None:
        return _plain_items(items)
    try:
        return _convert_items(items, converter)
    except (ValueError, InvalidOperation):
        return _plain_items(items)


def _convert_items(items: list[ArrayItem], converter: Converter) -> list[JsonValue]:
    return [
        None
        if item is None
        else _convert_items(item, converter)
        if isinstance(item, list)
        else converter(item)
        for item in items
    ]


def _plain_items(items: list[ArrayItem]) -> list[JsonValue]:
    return [_plain_items(item) if isinstance(item, list) else item for item in items]


# --- array literals (array_in syntax) ----------------------------------------

# "[1:3]=" or "[0:1][1:2]=" before the braces when a lower bound is not 1.
_DIMENSIONS: Final = re.compile(r"[ \t\n\r\v\f]*(?:\[[^\]=]*\][ \t\n\r\v\f]*)+=")

_START, _AFTER_ITEM, _AFTER_DELIMITER = range(3)


def parse_array_literal(text: str, delimiter: str = ",") -> list[ArrayItem]:
    """Parse a Postgres array literal (``{1,2,NULL}``, ``{{"a b",c},{d,e}}``) into lists.

    Elements stay text (None for an unquoted ``NULL``); quoting and backslash
    escapes are undone and unquoted whitespace around elements is dropped, as
    ``array_in`` does. A leading dimension decoration (``[0:1]=``) is skipped.

    Raises:
        DecodeError: ``text`` is not an array literal.
    """
    prefix = _DIMENSIONS.match(text)
    pos = prefix.end() if prefix else 0
    end = len(text)
    while pos < end and text[pos] in PG_SPACE:
        pos += 1
    if pos >= end or text[pos] != "{":
        raise DecodeError(f"array literal must start with '{{': {text[:40]!r}")
    root: list[ArrayItem] = []
    stack = [root]
    state = _START
    pos += 1
    while stack:
        while pos < end and text[pos] in PG_SPACE:
            pos += 1
        if pos >= end:
            raise DecodeError(f"array literal ends before its closing '}}': {text[:40]!r}")
        char = text[pos]
        if char == "{":
            if state == _AFTER_ITEM:
                raise DecodeError(f"unexpected '{{' at offset {pos} of array literal")
            level: list[ArrayItem] = []
            stack[-1].append(level)
            stack.append(level)
            state = _START
            pos += 1
        elif char == "}":
            if state == _AFTER_DELIMITER:
                raise DecodeError(f"unexpected '}}' at offset {pos} of array literal")
            stack.pop()
            state = _AFTER_ITEM
            pos += 1
        elif char == delimiter:
            if state != _AFTER_ITEM:
                raise DecodeError(f"unexpected {delimiter!r} at offset {pos} of array literal")
            state = _AFTER_DELIMITER
            pos += 1
        else:
            if state == _AFTER_ITEM:
                raise DecodeError(f"unexpected {char!r} at offset {pos} of array literal")
            item, pos = _array_element(text, pos, delimiter)
            stack[-1].append(item)
            state = _AFTER_ITEM
    while pos < end and text[pos] in PG_SPACE:
        pos += 1
    if pos != end:
        raise DecodeError(f"junk after array literal at offset {pos}: {text[pos : pos + 20]!r}")
    return root


def _array_element(text: str, pos: int, delimiter: str) -> tuple[str | None, int]:
    # An element mixes quoted runs and unquoted characters, with backslash
    # escapes in both; trailing unquoted whitespace is dropped (ReadArrayStr).
    end = len(text)
    chars: list[str] = []
    keep = 0  # chars[:keep] survive: up to the last quoted, escaped or non-space char
    literal = False  # quoted or escaped, so never NULL
    while pos < end:
        char = text[pos]
        if char == '"':
            literal = True
            pos += 1
            while True:
                if pos >= end:
                    raise DecodeError("unterminated quoted element in array literal")
                char = text[pos]
                if char == '"':
                    pos += 1
                    break
                if char == "\\":
                    pos += 1
                    if pos >= end:
                        raise DecodeError("array literal ends inside an escape")
                    char = text[pos]
                chars.append(char)
                pos += 1
            keep = len(chars)
        elif char == "\\":
            literal = True
            pos += 1
            if pos >= end:
                raise DecodeError("array literal ends inside an escape")
            chars.append(text[pos])
            keep = len(chars)
            pos += 1
        elif char == delimiter or char == "}":
            break
        elif char == "{":
            raise DecodeError(f"unexpected '{{' inside an element at offset {pos}")
        else:
            chars.append(char)
            if char not in PG_SPACE:
                keep = len(chars)
            pos += 1
    value = "".join(chars[:keep])
    if not literal:
        if not value:
            raise DecodeError(f"empty unquoted element at offset {pos} of array literal")
        if value.upper() == "NULL":
            return None, pos
    return value, pos


# --- JSON encoding -----------------------------------------------------------


class _HasDecimal(Exception):
    pass


def _refuse_decimal(value: object) -> Any:
    if isinstance(value, Decimal):
        raise _HasDecimal
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# Same settings as realtime.protocol.serializer: compact, UTF-8, no NaN.
_ENCODER: Final = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_refuse_decimal
)


def _decimal_text(value: Decimal) -> str:
    if not value.is_finite():
        raise ValueError(f"{value} is not valid JSON")
    if value.is_zero() and value.is_signed():
        value = value.copy_abs()  # numeric has no negative zero
    # 'f' never switches to exponent notation and keeps trailing zeros ("1.50").
    return format(value, "f")


def _encode_parts(value: object, parts: list[str]) -> None:
    if isinstance(value, Decimal):
        parts.append(_decimal_text(value))
    elif isinstance(value, dict):
        parts.append("{")
        first = True
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"keys must be str, not {type(key).__name__}")
            if not first:
                parts.append(",")
            first = False
            parts.append(_ENCODER.encode(key))
            parts.append(":")
            _encode_parts(item, parts)
        parts.append("}")
    elif isinstance(value, list | tuple):
        parts.append("[")
        for index, item in enumerate(value):
            if index:
                parts.append(",")
            _encode_parts(item, parts)
        parts.append("]")
    else:
        parts.append(_ENCODER.encode(value))


def encode_json(value: object) -> str:
    """Encode ``value`` as compact JSON, writing each Decimal as its exact digits.

    Without Decimals this is ``realtime.protocol.serializer.encode_json``'s output
    (the C encoder runs; the slower walk happens only when a Decimal is met).

    Raises:
        TypeError: ``value`` holds something that is not JSON-able.
        ValueError: ``value`` holds NaN or an infinity (float or Decimal).
    """
    try:
        return _ENCODER.encode(value)
    except _HasDecimal:
        pass
    parts: list[str] = []
    _encode_parts(value, parts)
    return "".join(parts)
