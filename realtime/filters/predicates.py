r"""postgres_changes filters, second step: conditions compiled against a table and matched on records.

``compile_conditions`` checks conditions against the table's column types, as the
reference's ``subscription_check_filters`` trigger does at subscribe time (PROTOCOL.md 4.3),
and returns a ``Matcher`` that evaluates them on records whose values are already typed JSON
(ints, floats, ``Decimal``, bools, str, lists, dicts, None), comparing by column type
(``pgtypes.casting``); ``match``/``imatch`` run RE2 (``google-re2``), not Postgres ARE.

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

import functools
import operator
import re
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

from core.errors import FilterError, SqlState
from pgtypes.casting import INVALID, ColumnType, cast, coerce, column_type, record_key, text_key
from pgtypes.catalog import Kind
from realtime.filters.grammar import Condition, FilterOp, parse_filter

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

_ABSENT: Final = object()

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
        ctype = column_type(type_name)
        predicate, target = _compile_condition(condition, ctype)
        predicates.append(predicate)
        if eq_column is None and condition.op is FilterOp.EQ and not condition.negated:
            eq_column, eq_value = condition.column, target
    return Matcher(compiled, MappingProxyType(types), eq_column, eq_value, tuple(predicates))


def compile_filter(text: str | None, column_types: Mapping[str, str]) -> Matcher:
    """``compile_conditions(parse_filter(text), column_types)``."""
    return compile_conditions(parse_filter(text), column_types)


def _unsupported(condition: Condition, ctype: ColumnType) -> FilterError:
    return FilterError(
        f"operator {condition.op.value} is not supported on column {condition.column} "
        f"of type {ctype.display}",
        SqlState.RAISE_EXCEPTION,
    )


def _compile_condition(
    condition: Condition, ctype: ColumnType
) -> tuple[_Predicate, Hashable | None]:
    op = condition.op
    kind = ctype.kind
    if op is FilterOp.IN:
        if kind in (Kind.JSON, Kind.ARRAY):
            raise _unsupported(condition, ctype)
        targets = frozenset(cast(ctype, item) for item in condition.values if item is not None)
        return _in_predicate(condition, ctype, targets, None in condition.values), None
    value = condition.value
    assert value is not None
    if op is FilterOp.IS:
        if value != "null" and kind is not Kind.BOOLEAN:
            raise FilterError(
                f"is {value} filter requires a boolean column, got {ctype.display}",
                SqlState.RAISE_EXCEPTION,
            )
        return _is_predicate(condition, ctype, value), None
    if op in _TEXT_OPS:
        if kind is not Kind.TEXT:
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
    if kind is Kind.JSON or (kind is Kind.JSONB and op in _ORDERING_OPS):
        raise _unsupported(condition, ctype)
    target = cast(ctype, value)
    if op is FilterOp.ISDISTINCT:
        return _distinct_predicate(condition, ctype, target), target
    return _compare_predicate(condition, ctype, _COMPARATORS[op], target), target


def _compare_predicate(
    condition: Condition, ctype: ColumnType, compare: Callable[[Any, Any], bool], target: Any
) -> _Predicate:
    column, negated = condition.column, condition.negated

    def predicate(record: Mapping[str, Any]) -> bool:
        key = record_key(record, column, ctype)
        if key is INVALID:
            return False  # NULL, absent or not of the column's type: no comparison holds
        return compare(key, target) is not negated

    return predicate


def _in_predicate(
    condition: Condition, ctype: ColumnType, targets: frozenset[Hashable], has_null: bool
) -> _Predicate:
    column, negated = condition.column, condition.negated

    def predicate(record: Mapping[str, Any]) -> bool:
        key = record_key(record, column, ctype)
        if key is INVALID:
            return False  # NULL, absent or not of the column's type: no comparison holds
        if key in targets:
            return not negated
        # x = ANY('{...,NULL}') is NULL, not false, when nothing equals x; NOT NULL is NULL too.
        return False if has_null else negated

    return predicate


def _is_predicate(condition: Condition, ctype: ColumnType, keyword: str) -> _Predicate:
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
            key = coerce(ctype, raw)
            if key is INVALID:
                return False
            result = keyword != "unknown" and key is (keyword == "true")
        return result is not negated

    return predicate


def _distinct_predicate(condition: Condition, ctype: ColumnType, target: Any) -> _Predicate:
    column, negated = condition.column, condition.negated

    def predicate(record: Mapping[str, Any]) -> bool:
        raw = record.get(column, _ABSENT)
        if raw is _ABSENT:
            return False
        if raw is None:
            return not negated
        key = coerce(ctype, raw)
        if key is INVALID:
            return False
        return (key != target) is not negated

    return predicate


def _text_predicate(
    condition: Condition, ctype: ColumnType, test: Callable[[str], bool | None]
) -> _Predicate:
    column, negated = condition.column, condition.negated

    def predicate(record: Mapping[str, Any]) -> bool:
        raw = record.get(column)
        if not isinstance(raw, str):
            return False
        result = test(text_key(ctype, raw))
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
