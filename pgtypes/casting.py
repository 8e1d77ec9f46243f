r"""postgres_changes filters: the ``filter`` text, typed matching and the fan-out index.

This module owns three pure steps (no I/O, no SQL) of PROTOCOL.md 4.2-4.4:

* ``parse_filter`` turns a binding's ``filter`` string into ``Condition`` values, with the
  reference's splitting, unquoting and error messages (4.2).
* ``compile_conditions`` checks conditions against the table's column types, as the
  reference's ``subscription_check_filters`` trigger does at subscribe time (4.3), and
  returns a ``Matcher`` that evaluates them on records whose values are already typed JSON
  (ints, floats, ``Decimal``, bools, str, lists, dicts, None).
* ``BindingIndex`` holds one table's bindings and narrows a change to the bindings whose
  first plain ``eq`` condition can hold, so fan-out does not run every matcher (4.4 step 4).

Errors are ``FilterError``. Those the reference raises before touching the database have no
``sqlstate`` and a complete message; those its database raises carry the SQLSTATE, and
``postgres_error`` renders them the way the reference quotes them after "Exception: ".

Evaluation compares by column type, like Postgres casting both sides. Known differences:

* text compares by code point, as under ``COLLATE "C"``, whatever the database collation;
* ``match``/``imatch`` run RE2 (``google-re2``), not Postgres ARE: see below;
* date/time values are ISO 8601 only (no ``now``, ``today`` or ``BC``), and a ``timestamptz``
  filter value without an offset is taken as UTC;
* ``jsonb`` supports equality operators only; ``json`` supports only ``is.null``;
* enums and other unlisted types compare as text, so enum order is not declaration order.

``match``/``imatch`` patterns come from anonymous clients and run on the server's event loop
for every change, so they are compiled with RE2, whose matching time is linear in the value.
Under Python ``re``, ``^(\w+\s?)*$`` took 3 s on an 8-word title ending in "!" and grows
exponentially with the title: 26 words never finish. Linear is not free: when RE2's DFA gives
up on a pattern whose states explode (``a[ab]{999}c``), its NFA costs about 4-12 ns per
program instruction per byte of value. Hence three caps, all checked at subscribe time:
pattern length (``MAX_REGEX_LENGTH``), compiled program size (``MAX_REGEX_PROGRAM_SIZE``,
which puts the worst case near 25 us per byte) and memory (``REGEX_MAX_MEM``). Values are
bounded only by the CDC record limit (PROTOCOL.md 8: a change over 1 048 576 bytes keeps only
fields of at most 64 bytes), so a hostile pattern costs about 4 ms on a 150-byte title but
some 25 s on a value near 1 MiB, per binding.

The search is unanchored like ``~``; ``.`` matches a newline and ``^``/``$`` are the ends of
the value, as in Postgres' default (non-newline-sensitive) mode; ``imatch`` and ``citext``
columns fold case. RE2's syntax is Perl's, so against Postgres ARE (checked on Postgres 16):

* refused, where Postgres accepts: back-references (``(a)\1``), look-ahead and look-behind
  (``(?=``, ``(?!``, ``(?<=``, ``(?<!``), the word-boundary escapes ``\m \M \y \Y`` and
  ``[[:<:]]``/``[[:>:]]``, ``\Z``, the escapes ``\e \cX \uXXXX \UXXXXXXXX``, the ``***=``
  and ``***:`` directors, embedded options other than ``(?i)``, ``(?m)`` and ``(?s)`` (no
  ``(?x)`` expanded syntax, no ``(?n)``), and nested bounds whose product exceeds 1000
  (``(a{100}){100}``);
* accepted with another meaning: ``\b`` and ``\B`` are word boundaries in RE2 (backspace and
  backslash in Postgres); ``[[.-.]]`` and ``[[=a=]]`` are not a collating element or an
  equivalence class but a bracket of their characters followed by a literal ``]``; ``(?m)``
  only makes ``^``/``$`` match at newlines, where Postgres' also keeps ``.`` and ``[^...]``
  off them;
* ``\w \d \s`` and ``[[:alpha:]]``-style classes are ASCII only (Postgres follows the
  database locale), and ``\s`` omits vertical tab; case folding is Unicode simple folding
  (the Kelvin sign matches ``k``);
* accepted where Postgres refuses: bounds from 256 to 1000 (``a{256}``), ``\z``,
  ``\x{...}``, ``\pL``/``\p{Greek}``, ``\Q...\E``, ``\C``, ``(?P<name>...)``, ``(?U)``
  and options in mid-pattern (``a(?i)b``).

Possessive and atomic forms (``a++``, ``(?>...)``) are refused by both.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import operator
import re
import struct
import uuid
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Final, Generic, TypeVar

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

from core.errors import RealtimeError

MAX_IN_VALUES: Final = 100
FILTER_ERROR_CODE: Final = "InvalidFilter"
PARSE_ERROR_PREFIX: Final = "Error parsing `filter` params: "
EMPTY_SEGMENT_MESSAGE: Final = "filter must not contain empty segments (check for extra commas)"
IN_PARENTHESES_MESSAGE: Final = "`in` filter value must be wrapped by parentheses"
TOO_MANY_IN_VALUES_MESSAGE: Final = "too many values for `in` filter. Maximum 100"
IS_KEYWORDS: Final = frozenset({"null", "true", "false", "unknown"})
# match/imatch patterns (see the module docstring). 1000 characters holds any realistic
# filter pattern; longer ones are refused before RE2 parses them.
MAX_REGEX_LENGTH: Final = 1000
# RE2 instructions of the compiled pattern: the NFA's worst-case cost per byte of value. 2500
# fits PostgreSQL's largest bound on any character, ``.{0,255}`` (2042 instructions).
MAX_REGEX_PROGRAM_SIZE: Final = 2500
# RE2's memory budget for one pattern, program and DFA caches together (RE2's default is 8 MiB).
# A program that would not fit (``\pL{60}``, some 70k instructions) is refused while compiling,
# before it is built, so compiling stays in milliseconds. Patterns within MAX_REGEX_PROGRAM_SIZE
# ran as fast with 1 MiB as with 8 MiB.
REGEX_MAX_MEM: Final = 1 << 20
# Longest value (UTF-8 bytes) a match/imatch condition is evaluated on; on a longer value the
# condition fails, negated or not (as on a NULL). With MAX_REGEX_PROGRAM_SIZE this bounds one
# evaluation at worst to some tens of milliseconds on the event loop.
MAX_REGEX_VALUE_BYTES: Final = 16_384
# Conditions in one filter: each is compiled on the event loop at subscribe time.
MAX_FILTER_CONDITIONS: Final = 16

# Unicode White_Space, what the reference's String.trim/1 strips.
_WHITESPACE: Final = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
# The bytes Postgres input functions treat as space (scanner_isspace).
_PG_SPACE: Final = " \t\n\r\x0b\x0c"


class SqlState(enum.Enum):
    """The SQLSTATE the reference's database reports for a filter it rejects."""

    RAISE_EXCEPTION = "P0001"
    INVALID_TEXT_REPRESENTATION = "22P02"
    NUMERIC_VALUE_OUT_OF_RANGE = "22003"
    INVALID_PARAMETER_VALUE = "22023"
    INVALID_ESCAPE_SEQUENCE = "22025"
    CHARACTER_NOT_IN_REPERTOIRE = "22021"

    @property
    def condition(self) -> str:
        """The condition name Postgres gives this SQLSTATE, e.g. ``raise_exception``."""
        return self.name.lower()


class FilterError(RealtimeError):
    """A filter the server refuses (PROTOCOL.md 4.2, 4.3).

    ``sqlstate`` is None for errors found while parsing, whose ``message`` is what the client
    gets. Otherwise the reference raised it in the database and wraps ``postgres_error`` in
    its "Unable to subscribe to changes with given parameters..." text.
    """

    def __init__(self, message: str, sqlstate: SqlState | None = None) -> None:
        super().__init__(FILTER_ERROR_CODE, message)
        self.sqlstate = sqlstate

    @property
    def postgres_error(self) -> str | None:
        """``ERROR P0001 (raise_exception) <message>``, or None for a parse error."""
        if self.sqlstate is None:
            return None
        return f"ERROR {self.sqlstate.value} ({self.sqlstate.condition}) {self.message}"


class FilterOp(enum.Enum):
    """A filter operator as written after ``column=`` (PROTOCOL.md 4.2 table)."""

    EQ = "eq"
    NEQ = "neq"
    LT = "lt"
    LTE = "lte"
    GT = "gt"
    GTE = "gte"
    IN = "in"
    LIKE = "like"
    ILIKE = "ilike"
    MATCH = "match"
    IMATCH = "imatch"
    IS = "is"
    ISDISTINCT = "isdistinct"


@dataclass(frozen=True, slots=True)
class Condition:
    """One ``column=[not.]op.value`` condition.

    ``value`` is the unquoted operand, or None for ``in``, whose items are in ``values``
    (None there is an unquoted ``NULL`` item, which never equals anything).
    """

    column: str
    op: FilterOp
    negated: bool = False
    value: str | None = None
    values: tuple[str | None, ...] = ()


# ---------------------------------------------------------------------------------------------
# Parsing (PROTOCOL.md 4.2)
# ---------------------------------------------------------------------------------------------


def parse_filter(text: str | None) -> tuple[Condition, ...]:
    """Parse a binding's ``filter``; None or blank text means no conditions.

    Raises:
        FilterError: the text breaks the grammar, an ``in`` list is malformed or longer than
            ``MAX_IN_VALUES``, or an ``is`` value is not a keyword.
    """
    if text is None:
        return ()
    trimmed = text.strip(_WHITESPACE)
    if not trimmed:
        return ()
    segments = _split_top_level(trimmed)
    if len(segments) > MAX_FILTER_CONDITIONS:
        raise FilterError(f"too many conditions in filter. Maximum {MAX_FILTER_CONDITIONS}")
    return tuple(_parse_segment(segment) for segment in segments)


def _split_top_level(text: str) -> list[str]:
    # Commas split except inside ( ) or inside a "..." that opens right after . ( or ,
    segments: list[str] = []
    current: list[str] = []
    depth = 0
    quoted = False
    prev = ""
    i = 0
    length = len(text)
    while i < length:
        char = text[i]
        if quoted:
            if char == "\\" and i + 1 < length:
                current.append(text[i : i + 2])
                prev = text[i + 1]
                i += 2
                continue
            if char == '"':
                quoted = False
        elif char == '"' and prev in (".", "(", ","):
            quoted = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            segments.append("".join(current))
            current = []
            prev = ""
            i += 1
            continue
        current.append(char)
        prev = char
        i += 1
    segments.append("".join(current))
    return segments


def _parse_segment(segment: str) -> Condition:
    trimmed = segment.strip(_WHITESPACE)
    if not trimmed:
        raise FilterError(PARSE_ERROR_PREFIX + EMPTY_SEGMENT_MESSAGE)
    column, equals, rest = trimmed.partition("=")
    if not equals:
        raise FilterError(PARSE_ERROR_PREFIX + _inspect_list([trimmed]))
    negated = rest.startswith("not.")
    op_value = rest[4:] if negated else rest
    op_text, dot, raw = op_value.partition(".")
    if not dot:
        raise FilterError(PARSE_ERROR_PREFIX + _inspect_list([op_value]))
    try:
        op = FilterOp(op_text)
    except ValueError:
        raise FilterError(PARSE_ERROR_PREFIX + _inspect_list([op_text, raw])) from None
    if op is FilterOp.IN:
        return Condition(column, op, negated, None, _parse_in_values(raw))
    value = _unquote(raw)
    if op is FilterOp.IS and value not in IS_KEYWORDS:
        raise FilterError(
            f"invalid value for is filter: {_quote(value)} "
            "(must be null, true, false, or unknown)",
            SqlState.RAISE_EXCEPTION,
        )
    return Condition(column, op, negated, value)


def _unquote(raw: str) -> str:
    # "..." with \x -> x; anything else, including a malformed quote, stays as written.
    if not raw.startswith('"'):
        return raw
    out: list[str] = []
    i = 1
    length = len(raw)
    while i < length:
        char = raw[i]
        if char == '"':
            return "".join(out) if i == length - 1 else raw
        if char == "\\" and i + 1 < length:
            out.append(raw[i + 1])
            i += 2
            continue
        out.append(char)
        i += 1
    return raw


def _parse_in_values(raw: str) -> tuple[str | None, ...]:
    if len(raw) < 2 or not raw.startswith("(") or not raw.endswith(")"):
        raise FilterError(PARSE_ERROR_PREFIX + IN_PARENTHESES_MESSAGE)
    inner = raw[1:-1]
    items = _parse_array_items(inner, "{" + inner + "}")
    if len(items) > MAX_IN_VALUES:
        raise FilterError(TOO_MANY_IN_VALUES_MESSAGE, SqlState.RAISE_EXCEPTION)
    return items


def _parse_array_items(inner: str, literal: str) -> tuple[str | None, ...]:
    """Items of a one-dimensional Postgres array literal ``{inner}`` (array_in rules)."""

    def malformed() -> FilterError:
        return FilterError(
            f"malformed array literal: {_quote(literal)}", SqlState.INVALID_TEXT_REPRESENTATION
        )

    if not inner.strip(_PG_SPACE):
        return ()
    items: list[str | None] = []
    i = 0
    length = len(inner)
    while True:
        while i < length and inner[i] in _PG_SPACE:
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
            while i < length and inner[i] in _PG_SPACE:
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
                if char not in _PG_SPACE:
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


def _quote(text: str) -> str:
    return '"' + text + '"'


_INSPECT_ESCAPES: Final = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\x0b": "\\v",
    "\b": "\\b",
    "\x0c": "\\f",
    "\x1b": "\\e",
    "\x07": "\\a",
    "\x7f": "\\d",
}
_INSPECT_PRINTABLE_LIMIT: Final = 4096


def _inspect_printable(char: str) -> bool:
    code = ord(char)
    return (
        char in _INSPECT_ESCAPES
        or 0x20 <= code <= 0x7E
        or 0xA0 <= code <= 0xD7FF
        or 0xE000 <= code <= 0xFFFD
        or 0x10000 <= code <= 0x10FFFF
    )


def _inspect_string(text: str) -> str:
    # Elixir's inspect/1 of a binary: quoted with escapes, or <<bytes>> when not printable.
    if not all(_inspect_printable(char) for char in text):
        raw = text.encode("utf-8", "surrogatepass")
        return "<<" + ", ".join(str(byte) for byte in raw) + ">>"
    clipped = text[:_INSPECT_PRINTABLE_LIMIT]
    out: list[str] = []
    for i, char in enumerate(clipped):
        if char in _INSPECT_ESCAPES:
            out.append(_INSPECT_ESCAPES[char])
        elif char == "#" and clipped[i + 1 : i + 2] == "{":
            out.append("\\#")
        else:
            out.append(char)
    quoted = '"' + "".join(out) + '"'
    return quoted + " <> ..." if len(text) > _INSPECT_PRINTABLE_LIMIT else quoted


def _inspect_list(parts: list[str]) -> str:
    return "[" + ", ".join(_inspect_string(part) for part in parts) + "]"


# ---------------------------------------------------------------------------------------------
# Column types: casting filter text and normalising record values to comparable keys
# ---------------------------------------------------------------------------------------------


class _Kind(enum.Enum):
    INTEGER = enum.auto()
    FLOAT = enum.auto()
    NUMERIC = enum.auto()
    BOOLEAN = enum.auto()
    TEXT = enum.auto()
    UUID = enum.auto()
    TIMESTAMPTZ = enum.auto()
    TIMESTAMP = enum.auto()
    DATE = enum.auto()
    TIME = enum.auto()
    BYTEA = enum.auto()
    JSONB = enum.auto()
    JSON = enum.auto()
    ARRAY = enum.auto()
    OTHER = enum.auto()


@dataclass(frozen=True, slots=True)
class _ColumnType:
    name: str
    kind: _Kind
    display: str
    element: _ColumnType | None = None


# typname -> (kind, the name Postgres prints in errors)
_SCALAR_TYPES: Final[Mapping[str, tuple[_Kind, str]]] = {
    "int2": (_Kind.INTEGER, "smallint"),
    "int4": (_Kind.INTEGER, "integer"),
    "int8": (_Kind.INTEGER, "bigint"),
    "float4": (_Kind.FLOAT, "real"),
    "float8": (_Kind.FLOAT, "double precision"),
    "numeric": (_Kind.NUMERIC, "numeric"),
    "bool": (_Kind.BOOLEAN, "boolean"),
    "text": (_Kind.TEXT, "text"),
    "varchar": (_Kind.TEXT, "character varying"),
    "bpchar": (_Kind.TEXT, "character"),
    "name": (_Kind.TEXT, "name"),
    "citext": (_Kind.TEXT, "citext"),
    "uuid": (_Kind.UUID, "uuid"),
    "timestamptz": (_Kind.TIMESTAMPTZ, "timestamp with time zone"),
    "timestamp": (_Kind.TIMESTAMP, "timestamp without time zone"),
    "date": (_Kind.DATE, "date"),
    "time": (_Kind.TIME, "time without time zone"),
    "bytea": (_Kind.BYTEA, "bytea"),
    "jsonb": (_Kind.JSONB, "jsonb"),
    "json": (_Kind.JSON, "json"),
}
_TYPE_ALIASES: Final[Mapping[str, str]] = {
    display: name for name, (_, display) in _SCALAR_TYPES.items() if display != name
}
_ARRAY_ELEMENT_KINDS: Final = frozenset(
    {
        _Kind.INTEGER,
        _Kind.FLOAT,
        _Kind.NUMERIC,
        _Kind.BOOLEAN,
        _Kind.TEXT,
        _Kind.UUID,
        _Kind.TIMESTAMPTZ,
        _Kind.TIMESTAMP,
        _Kind.DATE,
        _Kind.TIME,
        _Kind.BYTEA,
    }
)
_INTEGER_RANGES: Final[Mapping[str, tuple[int, int]]] = {
    "int2": (-(2**15), 2**15 - 1),
    "int4": (-(2**31), 2**31 - 1),
    "int8": (-(2**63), 2**63 - 1),
}


@lru_cache(maxsize=512)
def _column_type(type_name: str) -> _ColumnType:
    name = _TYPE_ALIASES.get(type_name, type_name)
    if name in _SCALAR_TYPES:
        kind, display = _SCALAR_TYPES[name]
        return _ColumnType(name, kind, display)
    element_name = None
    if name.startswith("_"):
        element_name = name[1:]
    elif name.endswith("[]"):
        element_name = name[:-2]
    if element_name is not None:
        element = _column_type(element_name)
        if element.kind in _ARRAY_ELEMENT_KINDS:
            return _ColumnType(name, _Kind.ARRAY, element.display + "[]", element)
    return _ColumnType(name, _Kind.OTHER, type_name)


class _Invalid:
    __slots__ = ()


# A record value that does not fit its column type; every condition on it is false.
_INVALID: Final = _Invalid()
_ABSENT: Final = object()

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


def _syntax_error(ctype: _ColumnType, text: str) -> FilterError:
    return FilterError(
        f"invalid input syntax for type {ctype.display}: {_quote(text)}",
        SqlState.INVALID_TEXT_REPRESENTATION,
    )


def _range_error(message: str) -> FilterError:
    return FilterError(message, SqlState.NUMERIC_VALUE_OUT_OF_RANGE)


def _parse_int(text: str) -> int | None:
    stripped = text.strip(_PG_SPACE)
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
    stripped = text.strip(_PG_SPACE)
    special = _FLOAT_SPECIALS.get(stripped.lower())
    if special is not None:
        return special
    if _FLOAT_LITERAL.fullmatch(stripped):
        return float(stripped)
    return None


def _float_overflows(text: str, value: float) -> bool:
    stripped = text.strip(_PG_SPACE).lower()
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


def _float_key(ctype: _ColumnType, value: float) -> Hashable:
    if math.isnan(value):
        return _NAN_KEY
    if ctype.name == "float4":
        rounded = _round_float4(value)
        if rounded is not None:
            value = rounded
    return (0, value)


def _parse_numeric(text: str) -> Decimal | None:
    stripped = text.strip(_PG_SPACE)
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
    word = text.strip(_PG_SPACE).lower()
    if word == "1":
        return True
    if word == "0":
        return False
    for full, shortest, result in _BOOL_WORDS:
        if len(word) >= shortest and full.startswith(word):
            return result
    return None


def _text_key(ctype: _ColumnType, text: str) -> str:
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


def _parse_datetime_key(ctype: _ColumnType, text: str) -> Hashable | None:
    stripped = text.strip(_PG_SPACE)
    if ctype.kind is not _Kind.TIME:
        infinity = _DATE_INFINITIES.get(stripped.lower())
        if infinity is not None:
            return infinity
    try:
        if ctype.kind is _Kind.TIME:
            return (0, time.fromisoformat(stripped).replace(tzinfo=None))
        if ctype.kind is _Kind.DATE:
            try:
                return (0, date.fromisoformat(stripped))
            except ValueError:
                return (0, datetime.fromisoformat(stripped).date())
        moment = datetime.fromisoformat(stripped)
    except ValueError:
        return None
    if ctype.kind is _Kind.TIMESTAMP:
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
                    f"invalid hexadecimal digit: {_quote(char)}", SqlState.INVALID_PARAMETER_VALUE
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


def _reject_json_constant(name: str) -> Any:
    raise ValueError(name)


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


def _cast(ctype: _ColumnType, text: str) -> Hashable:
    """The comparison key of filter text cast to the column type; FilterError if it won't."""
    kind = ctype.kind
    if kind is _Kind.INTEGER:
        integer = _parse_int(text)
        if integer is None:
            raise _syntax_error(ctype, text)
        low, high = _INTEGER_RANGES[ctype.name]
        if not low <= integer <= high:
            raise _range_error(f"value {_quote(text)} is out of range for type {ctype.display}")
        return integer
    if kind is _Kind.FLOAT:
        number = _parse_float(text)
        if number is None:
            raise _syntax_error(ctype, text)
        if _float_overflows(text, number) or (
            ctype.name == "float4" and _float4_out_of_range(number)
        ):
            raise _range_error(f"{_quote(text)} is out of range for type {ctype.display}")
        return _float_key(ctype, number)
    if kind is _Kind.NUMERIC:
        decimal = _parse_numeric(text)
        if decimal is None:
            raise _syntax_error(ctype, text)
        return _numeric_key(decimal)
    if kind is _Kind.BOOLEAN:
        flag = _parse_bool(text)
        if flag is None:
            raise _syntax_error(ctype, text)
        return flag
    if kind is _Kind.UUID:
        parsed = _parse_uuid(text)
        if parsed is None:
            raise _syntax_error(ctype, text)
        return parsed
    if kind in (_Kind.TIMESTAMPTZ, _Kind.TIMESTAMP, _Kind.DATE, _Kind.TIME):
        moment = _parse_datetime_key(ctype, text)
        if moment is None:
            raise _syntax_error(ctype, text)
        return moment
    if kind is _Kind.BYTEA:
        return _cast_bytea(text)
    if kind in (_Kind.JSONB, _Kind.JSON):
        try:
            document = json.loads(text, parse_float=Decimal, parse_constant=_reject_json_constant)
        except ValueError:
            raise FilterError(
                "invalid input syntax for type json", SqlState.INVALID_TEXT_REPRESENTATION
            ) from None
        return _freeze_json(document)
    if kind is _Kind.ARRAY:
        assert ctype.element is not None
        stripped = text.strip(_PG_SPACE)
        if not (stripped.startswith("{") and stripped.endswith("}")):
            raise FilterError(
                f"malformed array literal: {_quote(text)}", SqlState.INVALID_TEXT_REPRESENTATION
            )
        element = ctype.element
        return tuple(
            _array_element_key(None if item is None else _cast(element, item))
            for item in _parse_array_items(stripped[1:-1], text)
        )
    if "\x00" in text:
        raise FilterError(
            'invalid byte sequence for encoding "UTF8": 0x00', SqlState.CHARACTER_NOT_IN_REPERTOIRE
        )
    if kind is _Kind.TEXT:
        return _text_key(ctype, text)
    return text


def _record_key(record: Mapping[str, Any], column: str, ctype: _ColumnType) -> Any:
    """The comparison key of ``record[column]``; ``_INVALID`` when it is NULL, absent or mistyped."""
    raw = record.get(column)
    return _INVALID if raw is None else _coerce(ctype, raw)


def _coerce(ctype: _ColumnType, value: Any) -> Any:
    """The comparison key of a non-NULL typed record value, or ``_INVALID``."""
    kind = ctype.kind
    if kind is _Kind.TEXT:
        return _text_key(ctype, value) if isinstance(value, str) else _INVALID
    if kind is _Kind.INTEGER:
        if isinstance(value, bool):
            return _INVALID
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
            return _INVALID if parsed is None else parsed
        return _INVALID
    if kind is _Kind.FLOAT:
        if isinstance(value, bool):
            return _INVALID
        if isinstance(value, (int, float, Decimal)):
            try:
                return _float_key(ctype, float(value))
            except OverflowError:
                return _INVALID
        if isinstance(value, str):
            number = _parse_float(value)
            return _INVALID if number is None else _float_key(ctype, number)
        return _INVALID
    if kind is _Kind.NUMERIC:
        if isinstance(value, bool):
            return _INVALID
        if isinstance(value, (int, Decimal)):
            return _numeric_key(value)
        if isinstance(value, float):
            return _NAN_KEY if math.isnan(value) else (0, Decimal(repr(value)))
        if isinstance(value, str):
            decimal = _parse_numeric(value)
            return _INVALID if decimal is None else _numeric_key(decimal)
        return _INVALID
    if kind is _Kind.BOOLEAN:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            flag = _parse_bool(value)
            return _INVALID if flag is None else flag
        return _INVALID
    if kind is _Kind.UUID:
        if isinstance(value, uuid.UUID):
            return value
        identifier = _parse_uuid(value) if isinstance(value, str) else None
        return _INVALID if identifier is None else identifier
    if kind in (_Kind.TIMESTAMPTZ, _Kind.TIMESTAMP, _Kind.DATE, _Kind.TIME):
        if isinstance(value, (datetime, date, time)):
            value = value.isoformat()
        moment = _parse_datetime_key(ctype, value) if isinstance(value, str) else None
        return _INVALID if moment is None else moment
    if kind is _Kind.BYTEA:
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if not isinstance(value, str):
            return _INVALID
        digits = value[2:] if value.startswith("\\x") else value
        try:
            return bytes.fromhex(digits)
        except ValueError:
            return _INVALID
    if kind is _Kind.JSONB:
        try:
            return _freeze_json(value)
        except ValueError:
            return _INVALID
    if kind is _Kind.ARRAY:
        assert ctype.element is not None
        if not isinstance(value, list):
            return _INVALID
        keys: list[Hashable] = []
        for item in value:
            if item is None:
                keys.append(_array_element_key(None))
                continue
            key = _coerce(ctype.element, item)
            if key is _INVALID:
                return _INVALID
            keys.append(_array_element_key(key))
        return tuple(keys)
    if kind is _Kind.JSON:
        return _INVALID
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
    key = _coerce(_column_type(type_name), value)
    return None if key is _INVALID else key


# ---------------------------------------------------------------------------------------------
# Compiling conditions against a table (PROTOCOL.md 4.3) and matching records (4.2, 4.4)
# ---------------------------------------------------------------------------------------------

_Predicate = Callable[[Mapping[str, Any]], bool]

_COMPARATORS: Final[Mapping[FilterOp, Callable[[Any, Any], bool]]] = {
    FilterOp.EQ: operator.eq,
    FilterOp.NEQ: operator.ne,
    FilterOp.LT: operator.lt,
    FilterOp.LTE: operator.le,
    FilterOp.GT: operator.gt,
    FilterOp.GTE: operator.ge,
}
_TEXT_OPS: Final = frozenset({FilterOp.LIKE, FilterOp.ILIKE, FilterOp.MATCH, FilterOp.IMATCH})
_ORDERING_OPS: Final = frozenset({FilterOp.LT, FilterOp.LTE, FilterOp.GT, FilterOp.GTE})


@dataclass(frozen=True, slots=True, eq=False)
class Matcher:
    """Compiled conditions of one binding; ``match`` is true when all of them hold.

    ``eq_column``/``eq_value`` describe the first plain ``eq`` condition (value normalised
    to the column type), the one ``BindingIndex`` files the binding under.
    """

    conditions: tuple[Condition, ...]
    column_types: Mapping[str, str]
    eq_column: str | None
    eq_value: Hashable | None
    _predicates: tuple[_Predicate, ...] = field(repr=False)

    def match(self, record: Mapping[str, Any]) -> bool:
        """Whether every condition holds for ``record`` (typed JSON values by column)."""
        for predicate in self._predicates:
            if not predicate(record):
                return False
        return True


def compile_conditions(
    conditions: Iterable[Condition], column_types: Mapping[str, str]
) -> Matcher:
    """Check conditions against a table's columns and compile them for matching.

    Args:
        conditions: from ``parse_filter``.
        column_types: the columns the subscriber may select, name -> ``pg_type.typname``
            (``int4``, ``text``, ``_text``, enum names...).

    Raises:
        FilterError: an unknown column, a value that does not cast to the column type, or an
            operator the column type does not support (PROTOCOL.md 4.3).
    """
    compiled = tuple(conditions)
    predicates: list[_Predicate] = []
    types: dict[str, str] = {}
    eq_column: str | None = None
    eq_value: Hashable | None = None
    for condition in compiled:
        type_name = column_types.get(condition.column)
        if type_name is None:
            raise FilterError(
                f"invalid column for filter {condition.column}", SqlState.RAISE_EXCEPTION
            )
        types[condition.column] = type_name
        ctype = _column_type(type_name)
        predicate, target = _compile_condition(condition, ctype)
        predicates.append(predicate)
        if eq_column is None and condition.op is FilterOp.EQ and not condition.negated:
            eq_column, eq_value = condition.column, target
    return Matcher(compiled, MappingProxyType(types), eq_column, eq_value, tuple(predicates))


def compile_filter(text: str | None, column_types: Mapping[str, str]) -> Matcher:
    """``compile_conditions(parse_filter(text), column_types)``."""
    return compile_conditions(parse_filter(text), column_types)


def _unsupported(condition: Condition, ctype: _ColumnType) -> FilterError:
    return FilterError(
        f"operator {condition.op.value} is not supported on column {condition.column} "
        f"of type {ctype.display}",
        SqlState.RAISE_EXCEPTION,
    )


def _compile_condition(
    condition: Condition, ctype: _ColumnType
) -> tuple[_Predicate, Hashable | None]:
    op = condition.op
    kind = ctype.kind
    if op is FilterOp.IN:
        if kind in (_Kind.JSON, _Kind.ARRAY):
            raise _unsupported(condition, ctype)
        targets = frozenset(_cast(ctype, item) for item in condition.values if item is not None)
        return _in_predicate(condition, ctype, targets, None in condition.values), None
    value = condition.value
    assert value is not None
    if op is FilterOp.IS:
        if value != "null" and kind is not _Kind.BOOLEAN:
            raise FilterError(
                f"is {value} filter requires a boolean column, got {ctype.display}",
                SqlState.RAISE_EXCEPTION,
            )
        return _is_predicate(condition, ctype, value), None
    if op in _TEXT_OPS:
        if kind is not _Kind.TEXT:
            raise FilterError(
                f"operator {op.value} requires a text-compatible column type, got {ctype.display}",
                SqlState.RAISE_EXCEPTION,
            )
        folded = op in (FilterOp.ILIKE, FilterOp.IMATCH) or ctype.name == "citext"
        test: Callable[[str], bool | None]
        if op in (FilterOp.LIKE, FilterOp.ILIKE):
            test = _compile_like(value, folded)
        else:
            test = _compile_regex(op, value, folded)
        return _text_predicate(condition, ctype, test), None
    if kind is _Kind.JSON or (kind is _Kind.JSONB and op in _ORDERING_OPS):
        raise _unsupported(condition, ctype)
    target = _cast(ctype, value)
    if op is FilterOp.ISDISTINCT:
        return _distinct_predicate(condition, ctype, target), target
    return _compare_predicate(condition, ctype, _COMPARATORS[op], target), target


def _compare_predicate(
    condition: Condition, ctype: _ColumnType, compare: Callable[[Any, Any], bool], target: Any
) -> _Predicate:
    column, negated = condition.column, condition.negated

    def predicate(record: Mapping[str, Any]) -> bool:
        key = _record_key(record, column, ctype)
        if key is _INVALID:
            return False  # NULL, absent or not of the column's type: no comparison holds
        return compare(key, target) is not negated

    return predicate


def _in_predicate(
    condition: Condition, ctype: _ColumnType, targets: frozenset[Hashable], has_null: bool
) -> _Predicate:
    column, negated = condition.column, condition.negated

    def predicate(record: Mapping[str, Any]) -> bool:
        key = _record_key(record, column, ctype)
        if key is _INVALID:
            return False  # NULL, absent or not of the column's type: no comparison holds
        if key in targets:
            return not negated
        # x = ANY('{...,NULL}') is NULL, not false, when nothing equals x; NOT NULL is NULL too.
        return False if has_null else negated

    return predicate


def _is_predicate(condition: Condition, ctype: _ColumnType, keyword: str) -> _Predicate:
    column, negated = condition.column, condition.negated

    def predicate(record: Mapping[str, Any]) -> bool:
        raw = record.get(column, _ABSENT)
        if raw is _ABSENT:
            return False
        if keyword == "null":
            result = raw is None
        elif raw is None:
            result = keyword == "unknown"
        else:
            key = _coerce(ctype, raw)
            if key is _INVALID:
                return False
            result = keyword != "unknown" and key is (keyword == "true")
        return result is not negated

    return predicate


def _distinct_predicate(condition: Condition, ctype: _ColumnType, target: Any) -> _Predicate:
    column, negated = condition.column, condition.negated

    def predicate(record: Mapping[str, Any]) -> bool:
        raw = record.get(column, _ABSENT)
        if raw is _ABSENT:
            return False
        if raw is None:
            return not negated
        key = _coerce(ctype, raw)
        if key is _INVALID:
            return False
        return (key != target) is not negated

    return predicate


def _text_predicate(
    condition: Condition, ctype: _ColumnType, test: Callable[[str], bool | None]
) -> _Predicate:
    column, negated = condition.column, condition.negated

    def predicate(record: Mapping[str, Any]) -> bool:
        raw = record.get(column)
        if not isinstance(raw, str):
            return False
        result = test(_text_key(ctype, raw))
        if result is None:
            return False  # a value the test does not evaluate (a regex over a value too long)
        return result is not negated

    return predicate


def _compile_like(pattern: str, ignore_case: bool) -> Callable[[str], bool]:
    """A SQL LIKE matcher: ``%`` any run, ``_`` any character, backslash escapes.

    The pattern is cut at ``%`` into fixed-length pieces matched leftmost in turn, which is
    exact for LIKE and linear, unlike one backtracking ``.*`` regex.
    """
    pieces: list[list[str]] = [[]]
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if i + 1 >= len(pattern):
                raise FilterError(
                    "LIKE pattern must not end with escape character",
                    SqlState.INVALID_ESCAPE_SEQUENCE,
                )
            pieces[-1].append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if char == "%":
            pieces.append([])
        elif char == "_":
            pieces[-1].append(".")
        else:
            pieces[-1].append(re.escape(char))
        i += 1
    flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
    compiled = [(re.compile("".join(piece), flags), len(piece)) for piece in pieces]
    if len(compiled) == 1:
        whole = compiled[0][0]
        return lambda text: whole.fullmatch(text) is not None
    (first, first_len), middle, (last, last_len) = compiled[0], compiled[1:-1], compiled[-1]

    def like(text: str) -> bool:
        end = len(text) - last_len
        if end < first_len or first.match(text) is None or last.match(text, end) is None:
            return False
        position = first_len
        for piece, piece_len in middle:
            if piece_len == 0:
                continue
            found = piece.search(text, position, end)
            if found is None:
                return False
            position = found.end()
        return True

    return like


def _regex_options(ignore_case: bool) -> Any:
    options = re2.Options()
    options.dot_nl = True  # Postgres' default mode: ``.`` and ``[^a]`` match a newline
    options.case_sensitive = not ignore_case
    # Only a boolean is needed: no group bookkeeping, and ``(...)`` costs nothing extra.
    options.never_capture = True
    options.max_mem = REGEX_MAX_MEM
    # RE2 logs every compile error to stderr; a client's bad pattern is its FilterError only.
    options.log_errors = False
    return options


def _compile_regex(op: FilterOp, pattern: str, ignore_case: bool) -> Callable[[str], bool | None]:
    """A ``~``/``~*`` matcher (unanchored search) in linear time, with RE2.

    Raises:
        FilterError: a pattern RE2 cannot run (back-references, look-around...), longer than
            ``MAX_REGEX_LENGTH`` or compiling beyond ``MAX_REGEX_PROGRAM_SIZE``/``REGEX_MAX_MEM``.
    """

    def invalid(reason: str) -> FilterError:
        return FilterError(
            f"invalid regular expression for {op.value} filter: {reason}", SqlState.RAISE_EXCEPTION
        )

    if len(pattern) > MAX_REGEX_LENGTH:
        raise invalid(f"pattern longer than {MAX_REGEX_LENGTH} characters")
    try:
        encoded = pattern.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate from a JSON "\ud800" escape: Postgres text cannot hold one either.
        raise invalid("pattern is not valid UTF-8") from None
    try:
        compiled = _re2_program(encoded, ignore_case)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else "pattern refused"
        raise invalid(
            detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)
        ) from None
    size: int = compiled.programsize
    if size > MAX_REGEX_PROGRAM_SIZE:
        raise invalid(
            f"pattern too large ({size} RE2 instructions, at most {MAX_REGEX_PROGRAM_SIZE})"
        )

    def search(text: str) -> bool | None:
        # Bytes in, so the wrapper does not map byte offsets back to characters. surrogatepass
        # encodes a lone surrogate as three bytes RE2 reads as one character instead of raising.
        data = text.encode("utf-8", "surrogatepass")
        if len(data) > MAX_REGEX_VALUE_BYTES:
            return None  # not evaluated: the condition fails, negated or not
        return compiled.search(data) is not None

    return search


@functools.lru_cache(maxsize=1024)
def _re2_program(pattern: bytes, ignore_case: bool) -> Any:
    """The compiled pattern, shared by every binding that uses it (re2.error if RE2 refuses it)."""
    return re2.compile(pattern, _regex_options(ignore_case))


def regex_cost(condition: Condition, column_type: str) -> int:
    """RE2 instructions a ``match``/``imatch`` condition runs per byte of value at worst; 0 for other ops.

    Call after ``compile_conditions`` accepted the condition (the program is cached then).
    """
    if condition.op not in (FilterOp.MATCH, FilterOp.IMATCH) or condition.value is None:
        return 0
    folded = condition.op is FilterOp.IMATCH or column_type == "citext"
    size: int = _re2_program(condition.value.encode("utf-8"), folded).programsize
    return size


# ---------------------------------------------------------------------------------------------
# Fan-out index (PROTOCOL.md 4.4 step 4)
# ---------------------------------------------------------------------------------------------

K = TypeVar("K", bound=Hashable)


class BindingIndex(Generic[K]):
    """One table's bindings, filed by the value of their first plain ``eq`` condition.

    ``candidates`` returns the bindings that can match a change: those whose indexed value
    equals the record's (or old record's) value for that column, plus every binding that
    has no ``eq`` condition. Running each candidate's matcher is the caller's job, or
    ``matches`` does both.
    """

    def __init__(self) -> None:
        self._matchers: dict[K, Matcher] = {}
        self._unindexed: set[K] = set()
        self._buckets: dict[tuple[str, str], dict[Hashable, set[K]]] = {}
        self._slots: dict[K, tuple[tuple[str, str], Hashable]] = {}

    def __len__(self) -> int:
        return len(self._matchers)

    def __contains__(self, key: object) -> bool:
        return key in self._matchers

    def matcher(self, key: K) -> Matcher:
        """The matcher stored for ``key``; KeyError if there is none."""
        return self._matchers[key]

    def add(
        self, key: K, matcher: Matcher, eq_column: str | None, eq_value: Hashable | None
    ) -> None:
        """Store ``key`` (replacing any previous entry), filed under ``eq_column``=``eq_value``.

        Pass ``matcher.eq_column, matcher.eq_value``; None files it as always a candidate.

        Raises:
            ValueError: ``eq_column`` is not one of the matcher's filtered columns.
        """
        self.remove(key)
        if eq_column is None or eq_value is None:
            self._unindexed.add(key)
        else:
            type_name = matcher.column_types.get(eq_column)
            if type_name is None:
                raise ValueError(f"{eq_column!r} is not a column of this matcher's conditions")
            bucket = (eq_column, type_name)
            self._buckets.setdefault(bucket, {}).setdefault(eq_value, set()).add(key)
            self._slots[key] = (bucket, eq_value)
        self._matchers[key] = matcher

    def remove(self, key: K) -> None:
        """Forget ``key``; nothing happens if it is not stored."""
        if self._matchers.pop(key, None) is None:
            return
        slot = self._slots.pop(key, None)
        if slot is None:
            self._unindexed.discard(key)
            return
        bucket, value = slot
        values = self._buckets[bucket]
        keys = values[value]
        keys.discard(key)
        if not keys:
            del values[value]
            if not values:
                del self._buckets[bucket]

    def candidates(
        self, record: Mapping[str, Any] | None, old_record: Mapping[str, Any] | None = None
    ) -> set[K]:
        """Keys whose binding may match ``record`` or ``old_record``; a superset of matches."""
        found = set(self._unindexed)
        for (column, type_name), values in self._buckets.items():
            for row in (record, old_record):
                if not row or column not in row:
                    continue
                value = normalize_value(type_name, row[column])
                if value is not None:
                    found.update(values.get(value, ()))
        return found

    def matches(
        self, record: Mapping[str, Any] | None, old_record: Mapping[str, Any] | None = None
    ) -> set[K]:
        """Keys whose conditions hold for ``record``, or for ``old_record`` when given.

        Filters run on the new values; pass ``old_record`` only for DELETE, whose old
        identity values may satisfy them instead (PROTOCOL.md 4.4 step 4).
        """
        matched: set[K] = set()
        for key in self.candidates(record, old_record):
            matcher = self._matchers[key]
            if (record is not None and matcher.match(record)) or (
                old_record is not None and matcher.match(old_record)
            ):
                matched.add(key)
        return matched
