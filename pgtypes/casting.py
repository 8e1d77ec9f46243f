r"""Filter text cast to a column's type, and typed record values as comparison keys (PROTOCOL.md 4.3, 4.4).

``cast`` reads a filter value as PostgreSQL's input function for the column type would,
raising ``FilterError`` (``core.errors``) with the SQLSTATE and message PostgreSQL gives;
``coerce`` and ``normalize_value`` turn a record value, already typed JSON
(``pgtypes.values``), into the same kind of key. Types are named by ``pg_type.typname``
(or the name PostgreSQL prints, ``integer``), arrays as ``_elem`` or ``elem[]``.

Evaluation compares by column type, like Postgres casting both sides. Known differences:

* text compares by code point, as under ``COLLATE "C"``, whatever the database collation;
* date/time values are ISO 8601 only (no ``now``, ``today`` or ``BC``), and a ``timestamptz``
  filter value without an offset is taken as UTC;
* ``jsonb`` supports equality operators only; ``json`` supports only ``is.null``;
* enums and other unlisted types compare as text, so enum order is not declaration order.
"""

from __future__ import annotations

import json
import math
import re
import struct
import uuid
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Final

from core.errors import FilterError, SqlState
from pgtypes.catalog import PG_SPACE, SCALAR_TYPES, Kind, reject_json_constant


def parse_array_items(inner: str, literal: str) -> tuple[str | None, ...]:
    """Items of a one-dimensional Postgres array literal ``{inner}`` (array_in rules)."""

    def malformed() -> FilterError:
        return FilterError(
            f"malformed array literal: {quote(literal)}", SqlState.INVALID_TEXT_REPRESENTATION
        )

    if not inner.strip(PG_SPACE):
        return ()
    items: list[str | None] = []
    i = 0
    length = len(inner)
    while True:
        while i < length and inner[i] in PG_SPACE:
            i += 1
        if i >= length:
            raise malformed()
        if inner[i] == '"':
            i += 1
            chars: list[str] = []
            while True:
                if i >= length:
                    raise malformed()
                char = inner[i]
                if char == "\\":
                    if i + 1 >= length:
                        raise malformed()
                    chars.append(inner[i + 1])
                    i += 2
                elif char == '"':
                    i += 1
                    break
                else:
                    chars.append(char)
                    i += 1
            items.append("".join(chars))
            while i < length and inner[i] in PG_SPACE:
                i += 1
        else:
            chars = []
            significant = 0
            escaped = False
            while i < length and inner[i] != ",":
                char = inner[i]
                if char in '{}"':
                    raise malformed()
                if char == "\\":
                    if i + 1 >= length:
                        raise malformed()
                    chars.append(inner[i + 1])
                    i += 2
                    significant = len(chars)
                    escaped = True
                    continue
                chars.append(char)
                i += 1
                if char not in PG_SPACE:
                    significant = len(chars)
            item = "".join(chars[:significant])
            if not item and not escaped:
                raise malformed()
            items.append(None if not escaped and item.lower() == "null" else item)
        if i >= length:
            return tuple(items)
        if inner[i] != ",":
            raise malformed()
        i += 1


def quote(text: str) -> str:
    return '"' + text + '"'


@dataclass(frozen=True, slots=True)
class ColumnType:
    name: str
    kind: Kind
    display: str
    element: ColumnType | None = None


_TYPE_ALIASES: Final[Mapping[str, str]] = {
    display: name for name, (_, display) in SCALAR_TYPES.items() if display != name
}
_ARRAY_ELEMENT_KINDS: Final = frozenset(
    {
        Kind.INTEGER,
        Kind.FLOAT,
        Kind.NUMERIC,
        Kind.BOOLEAN,
        Kind.TEXT,
        Kind.UUID,
        Kind.TIMESTAMPTZ,
        Kind.TIMESTAMP,
        Kind.DATE,
        Kind.TIME,
        Kind.BYTEA,
    }
)
_INTEGER_RANGES: Final[Mapping[str, tuple[int, int]]] = {
    "int2": (-(2**15), 2**15 - 1),
    "int4": (-(2**31), 2**31 - 1),
    "int8": (-(2**63), 2**63 - 1),
}


@lru_cache(maxsize=512)
def column_type(type_name: str) -> ColumnType:
    name = _TYPE_ALIASES.get(type_name, type_name)
    if name in SCALAR_TYPES:
        kind, display = SCALAR_TYPES[name]
        return ColumnType(name, kind, display)
    element_name = None
    if name.startswith("_"):
        element_name = name[1:]
    elif name.endswith("[]"):
        element_name = name[:-2]
    if element_name is not None:
        element = column_type(element_name)
        if element.kind in _ARRAY_ELEMENT_KINDS:
            return ColumnType(name, Kind.ARRAY, element.display + "[]", element)
    return ColumnType(name, Kind.OTHER, type_name)


class _Invalid:
    __slots__ = ()


# A record value that does not fit its column type; every condition on it is false.
INVALID: Final = _Invalid()

_INT_DECIMAL = re.compile(r"[+-]?[0-9](?:_?[0-9])*")
_INT_PREFIXED = re.compile(
    r"[+-]?0(?:[xX](?:_?[0-9a-fA-F])+|[oO](?:_?[0-7])+|[bB](?:_?[01])+)"
)
_INT_MAX_CHARS: Final = 100
_INT_TOO_LARGE: Final = 2**64
_FLOAT_LITERAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_FLOAT_SPECIALS: Final[Mapping[str, float]] = {
    "nan": math.nan,
    "+nan": math.nan,
    "-nan": math.nan,
    "inf": math.inf,
    "+inf": math.inf,
    "infinity": math.inf,
    "+infinity": math.inf,
    "-inf": -math.inf,
    "-infinity": -math.inf,
}
_UUID_TEXT = re.compile(r"[0-9a-fA-F]{4}(?:-?[0-9a-fA-F]{4}){7}")
_DATE_INFINITIES: Final[Mapping[str, tuple[int]]] = {
    "infinity": (1,),
    "+infinity": (1,),
    "-infinity": (-1,),
}
# Postgres accepts any unambiguous prefix of these words, case-insensitively.
_BOOL_WORDS: Final = (
    ("true", 1, True),
    ("false", 1, False),
    ("yes", 1, True),
    ("no", 1, False),
    ("on", 2, True),
    ("off", 2, False),
)
_NAN_KEY: Final = (1,)


def _syntax_error(ctype: ColumnType, text: str) -> FilterError:
    return FilterError(
        f"invalid input syntax for type {ctype.display}: {quote(text)}",
        SqlState.INVALID_TEXT_REPRESENTATION,
    )


def _range_error(message: str) -> FilterError:
    return FilterError(message, SqlState.NUMERIC_VALUE_OUT_OF_RANGE)


def _parse_int(text: str) -> int | None:
    stripped = text.strip(PG_SPACE)
    if _INT_DECIMAL.fullmatch(stripped):
        base = 10
    elif _INT_PREFIXED.fullmatch(stripped):
        base = 0
    else:
        return None
    if len(stripped) > _INT_MAX_CHARS:
        # Out of range for every integer type; skips int()'s quadratic (and capped) conversion.
        return -_INT_TOO_LARGE if stripped.startswith("-") else _INT_TOO_LARGE
    return int(stripped, base)


def _parse_float(text: str) -> float | None:
    stripped = text.strip(PG_SPACE)
    special = _FLOAT_SPECIALS.get(stripped.lower())
    if special is not None:
        return special
    if _FLOAT_LITERAL.fullmatch(stripped):
        return float(stripped)
    return None


def _float_overflows(text: str, value: float) -> bool:
    stripped = text.strip(PG_SPACE).lower()
    if stripped in _FLOAT_SPECIALS:
        return False
    mantissa = re.split("e", stripped)[0]
    return math.isinf(value) or (value == 0.0 and any(c in "123456789" for c in mantissa))


def _float4_out_of_range(value: float) -> bool:
    if not math.isfinite(value):
        return False
    rounded = _round_float4(value)
    return rounded is None or math.isinf(rounded) or (rounded == 0.0 and value != 0.0)


def _round_float4(value: float) -> float | None:
    try:
        return float(struct.unpack("f", struct.pack("f", value))[0])
    except OverflowError:
        return None


def _float_key(ctype: ColumnType, value: float) -> Hashable:
    if math.isnan(value):
        return _NAN_KEY
    if ctype.name == "float4":
        rounded = _round_float4(value)
        if rounded is not None:
            value = rounded
    return (0, value)


def _parse_numeric(text: str) -> Decimal | None:
    stripped = text.strip(PG_SPACE)
    if stripped.lower() not in _FLOAT_SPECIALS and not _FLOAT_LITERAL.fullmatch(stripped):
        return None
    try:
        return Decimal(stripped)
    except InvalidOperation:
        return None


def _numeric_key(value: Decimal | int) -> Hashable:
    if isinstance(value, Decimal) and value.is_nan():
        return _NAN_KEY
    return (0, value)


def _parse_bool(text: str) -> bool | None:
    word = text.strip(PG_SPACE).lower()
    if word == "1":
        return True
    if word == "0":
        return False
    for full, shortest, result in _BOOL_WORDS:
        if len(word) >= shortest and full.startswith(word):
            return result
    return None


def text_key(ctype: ColumnType, text: str) -> str:
    if ctype.name == "bpchar":
        return text.rstrip(" ")
    if ctype.name == "citext":
        return text.lower()
    return text


def _parse_uuid(text: str) -> uuid.UUID | None:
    body = text[1:-1] if text.startswith("{") and text.endswith("}") else text
    if not _UUID_TEXT.fullmatch(body):
        return None
    return uuid.UUID(hex=body.replace("-", ""))


def _parse_datetime_key(ctype: ColumnType, text: str) -> Hashable | None:
    stripped = text.strip(PG_SPACE)
    if ctype.kind is not Kind.TIME:
        infinity = _DATE_INFINITIES.get(stripped.lower())
        if infinity is not None:
            return infinity
    try:
        if ctype.kind is Kind.TIME:
            return (0, time.fromisoformat(stripped).replace(tzinfo=None))
        if ctype.kind is Kind.DATE:
            try:
                return (0, date.fromisoformat(stripped))
            except ValueError:
                return (0, datetime.fromisoformat(stripped).date())
        moment = datetime.fromisoformat(stripped)
    except ValueError:
        return None
    if ctype.kind is Kind.TIMESTAMP:
        return (0, moment.replace(tzinfo=None))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (0, moment)


def _cast_bytea(text: str) -> bytes:
    if text.startswith("\\x"):
        digits = [char for char in text[2:] if char not in " \t\n\r"]
        for char in digits:
            if char not in "0123456789abcdefABCDEF":
                raise FilterError(
                    f"invalid hexadecimal digit: {quote(char)}", SqlState.INVALID_PARAMETER_VALUE
                )
        if len(digits) % 2:
            raise FilterError(
                "invalid hexadecimal data: odd number of digits", SqlState.INVALID_PARAMETER_VALUE
            )
        return bytes.fromhex("".join(digits))
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char != "\\":
            out += char.encode("utf-8", "surrogatepass")
            i += 1
        elif text[i + 1 : i + 2] == "\\":
            out.append(0x5C)
            i += 2
        elif re.fullmatch(r"[0-3][0-7][0-7]", text[i + 1 : i + 4]):
            out.append(int(text[i + 1 : i + 4], 8))
            i += 4
        else:
            raise FilterError(
                "invalid input syntax for type bytea", SqlState.INVALID_TEXT_REPRESENTATION
            )
    return bytes(out)


def _freeze_json(value: Any) -> Hashable:
    # jsonb equality: key order is irrelevant and numbers compare as numerics.
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, Decimal)):
        return ("number", Decimal(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("non-finite number")
        return ("number", Decimal(repr(value)))
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, list):
        return ("array", tuple(_freeze_json(item) for item in value))
    if isinstance(value, dict):
        return ("object", frozenset((key, _freeze_json(item)) for key, item in value.items()))
    raise ValueError(f"not a JSON value: {type(value).__name__}")


def _array_element_key(item: Hashable | None) -> Hashable:
    # Postgres array comparison: element by element, NULL after every value.
    return _NAN_KEY if item is None else (0, item)


def cast(ctype: ColumnType, text: str) -> Hashable:
    """The comparison key of filter text cast to the column type; FilterError if it won't."""
    kind = ctype.kind
    if kind is Kind.INTEGER:
        integer = _parse_int(text)
        if integer is None:
            raise _syntax_error(ctype, text)
        low, high = _INTEGER_RANGES[ctype.name]
        if not low <= integer <= high:
            raise _range_error(f"value {quote(text)} is out of range for type {ctype.display}")
        return integer
    if kind is Kind.FLOAT:
        number = _parse_float(text)
        if number is None:
            raise _syntax_error(ctype, text)
        if _float_overflows(text, number) or (
            ctype.name == "float4" and _float4_out_of_range(number)
        ):
            raise _range_error(f"{quote(text)} is out of range for type {ctype.display}")
        return _float_key(ctype, number)
    if kind is Kind.NUMERIC:
        decimal = _parse_numeric(text)
        if decimal is None:
            raise _syntax_error(ctype, text)
        return _numeric_key(decimal)
    if kind is Kind.BOOLEAN:
        flag = _parse_bool(text)
        if flag is None:
            raise _syntax_error(ctype, text)
        return flag
    if kind is Kind.UUID:
        parsed = _parse_uuid(text)
        if parsed is None:
            raise _syntax_error(ctype, text)
        return parsed
    if kind in (Kind.TIMESTAMPTZ, Kind.TIMESTAMP, Kind.DATE, Kind.TIME):
        moment = _parse_datetime_key(ctype, text)
        if moment is None:
            raise _syntax_error(ctype, text)
        return moment
    if kind is Kind.BYTEA:
        return _cast_bytea(text)
    if kind in (Kind.JSONB, Kind.JSON):
        try:
            document = json.loads(text, parse_float=Decimal, parse_constant=reject_json_constant)
        except ValueError:
            raise FilterError(
                "invalid input syntax for type json", SqlState.INVALID_TEXT_REPRESENTATION
            ) from None
        return _freeze_json(document)
    if kind is Kind.ARRAY:
        assert ctype.element is not None
        stripped = text.strip(PG_SPACE)
        if not (stripped.startswith("{") and stripped.endswith("}")):
            raise FilterError(
                f"malformed array literal: {quote(text)}", SqlState.INVALID_TEXT_REPRESENTATION
            )
        element = ctype.element
        return tuple(
            _array_element_key(None if item is None else cast(element, item))
            for item in parse_array_items(stripped[1:-1], text)
        )
    if "\x00" in text:
        raise FilterError(
            'invalid byte sequence for encoding "UTF8": 0x00', SqlState.CHARACTER_NOT_IN_REPERTOIRE
        )
    if kind is Kind.TEXT:
        return text_key(ctype, text)
    return text


def record_key(record: Mapping[str, Any], column: str, ctype: ColumnType) -> Any:
    """The comparison key of ``record[column]``; ``INVALID`` when it is NULL, absent or mistyped."""
    raw = record.get(column)
    return INVALID if raw is None else coerce(ctype, raw)


def coerce(ctype: ColumnType, value: Any) -> Any:
    """The comparison key of a non-NULL typed record value, or ``INVALID``."""
    kind = ctype.kind
    if kind is Kind.TEXT:
        return text_key(ctype, value) if isinstance(value, str) else INVALID
    if kind is Kind.INTEGER:
        if isinstance(value, bool):
            return INVALID
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if (
            isinstance(value, Decimal)
            and value.is_finite()
            and value.adjusted() < _INT_MAX_CHARS
            and value == value.to_integral_value()
        ):
            return int(value)
        if isinstance(value, str):
            parsed = _parse_int(value)
            return INVALID if parsed is None else parsed
        return INVALID
    if kind is Kind.FLOAT:
        if isinstance(value, bool):
            return INVALID
        if isinstance(value, (int, float, Decimal)):
            try:
                return _float_key(ctype, float(value))
            except OverflowError:
                return INVALID
        if isinstance(value, str):
            number = _parse_float(value)
            return INVALID if number is None else _float_key(ctype, number)
        return INVALID
    if kind is Kind.NUMERIC:
        if isinstance(value, bool):
            return INVALID
        if isinstance(value, (int, Decimal)):
            return _numeric_key(value)
        if isinstance(value, float):
            return _NAN_KEY if math.isnan(value) else (0, Decimal(repr(value)))
        if isinstance(value, str):
            decimal = _parse_numeric(value)
            return INVALID if decimal is None else _numeric_key(decimal)
        return INVALID
    if kind is Kind.BOOLEAN:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            flag = _parse_bool(value)
            return INVALID if flag is None else flag
        return INVALID
    if kind is Kind.UUID:
        if isinstance(value, uuid.UUID):
            return value
        identifier = _parse_uuid(value) if isinstance(value, str) else None
        return INVALID if identifier is None else identifier
    if kind in (Kind.TIMESTAMPTZ, Kind.TIMESTAMP, Kind.DATE, Kind.TIME):
        if isinstance(value, (datetime, date, time)):
            value = value.isoformat()
        moment = _parse_datetime_key(ctype, value) if isinstance(value, str) else None
        return INVALID if moment is None else moment
    if kind is Kind.BYTEA:
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if not isinstance(value, str):
            return INVALID
        digits = value[2:] if value.startswith("\\x") else value
        try:
            return bytes.fromhex(digits)
        except ValueError:
            return INVALID
    if kind is Kind.JSONB:
        try:
            return _freeze_json(value)
        except ValueError:
            return INVALID
    if kind is Kind.ARRAY:
        assert ctype.element is not None
        if not isinstance(value, list):
            return INVALID
        keys: list[Hashable] = []
        for item in value:
            if item is None:
                keys.append(_array_element_key(None))
                continue
            key = coerce(ctype.element, item)
            if key is INVALID:
                return INVALID
            keys.append(_array_element_key(key))
        return tuple(keys)
    if kind is Kind.JSON:
        return INVALID
    return _other_text(value)


def _other_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, Decimal)):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value, default=str, ensure_ascii=False)


def normalize_value(type_name: str, value: Any) -> Hashable | None:
    """The comparison key of a typed record value, as ``Matcher.eq_value`` is built.

    Returns None for NULL or for a value that does not fit the type. Keys of equal values
    are equal and hash alike (``normalize_value("int4", 5) == Matcher.eq_value`` of
    ``id=eq.5``), which is what ``BindingIndex`` relies on.
    """
    if value is None:
        return None
    key = coerce(column_type(type_name), value)
    return None if key is INVALID else key
