"""postgres_changes filters, first step: a binding's ``filter`` text to ``Condition`` values (PROTOCOL.md 4.2).

``parse_filter`` splits, unquotes and checks the text with the reference's rules and error
messages, quoting parts of the input in them as Elixir's ``inspect`` does. It raises
``FilterError`` (``core.errors``); a malformed ``in`` list is an array literal that
``pgtypes.casting.parse_array_items`` refuses.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from core.errors import FilterError, SqlState
from pgtypes.casting import parse_array_items, quote

MAX_IN_VALUES: Final = 100
PARSE_ERROR_PREFIX: Final = "Error parsing `filter` params: "
EMPTY_SEGMENT_MESSAGE: Final = "filter must not contain empty segments (check for extra commas)"
IN_PARENTHESES_MESSAGE: Final = "`in` filter value must be wrapped by parentheses"
TOO_MANY_IN_VALUES_MESSAGE: Final = "too many values for `in` filter. Maximum 100"
IS_KEYWORDS: Final = frozenset({"null", "true", "false", "unknown"})
# Conditions in one filter: each is compiled on the event loop at subscribe time.
MAX_FILTER_CONDITIONS: Final = 16

# Unicode White_Space, what the reference's String.trim/1 strips.
_WHITESPACE: Final = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


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
            f"invalid value for is filter: {quote(value)} "
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
    items = parse_array_items(inner, "{" + inner + "}")
    if len(items) > MAX_IN_VALUES:
        raise FilterError(TOO_MANY_IN_VALUES_MESSAGE, SqlState.RAISE_EXCEPTION)
    return items


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
