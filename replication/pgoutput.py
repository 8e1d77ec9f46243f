"""pgoutput messages: bytes -> one frozen dataclass per message, plus the relation cache.

This module owns the "Logical Replication Message Formats" of the PostgreSQL
docs as ``pgoutput`` sends them in each ``XLogData`` payload: protocol version 1
(Begin, Commit, Origin, Relation, Type, Insert, Update, Delete, Truncate, and
logical decoding Message with ``messages 'true'``), the protocol the
replicator asks for. Anything else (protocol 2 streamed transactions, which
the server sends only with ``streaming 'on'``, protocol 3 two-phase messages,
a future message) decodes to :class:`Unsupported`.

:func:`decode_message` takes untrusted bytes and raises only
:class:`~replication.errors.DecodeError` (truncated or corrupt input).
Text (names, column values) is taken to be UTF-8, the usual server encoding;
invalid bytes become U+FFFD instead of stopping the stream.

:class:`RelationCache` remembers Relation and Type messages, names each
column's type (``pg_type.typname``: caller-supplied names, then Type messages,
then a static table of built-in oids) and turns a tuple into
``{column name: raw text or None}`` while keeping unchanged-TOAST columns
apart. Turning raw text into JSON values is :mod:`pgtypes.values`.

What the real bytes show (tests/fixtures/pgoutput/captured.json): a ``KEY``
old tuple carries every column, the non-identity ones as null; a column's key
flag is replica identity membership (every column under FULL), not the primary
key; a domain's Type message names the domain's base type; under FULL the old
tuple carries a TOASTed value that the new tuple marks unchanged.

It is pure: no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum, IntFlag
from types import MappingProxyType
from typing import Final, Literal, TypeAlias

from replication.errors import DecodeError, UnknownRelationError
from replication.stream import pg_time_to_datetime

__all__ = [
    "BUILTIN_TYPE_NAMES",
    "UNCHANGED_TOAST",
    "Begin",
    "ColumnInfo",
    "Commit",
    "Delete",
    "Insert",
    "Message",
    "OldTupleKind",
    "Origin",
    "PgoutputMessage",
    "RawRow",
    "Relation",
    "RelationCache",
    "RelationColumn",
    "ReplicaIdentity",
    "Truncate",
    "TruncateOptions",
    "TupleData",
    "TupleValue",
    "Type",
    "Unchanged",
    "Unsupported",
    "Update",
    "decode_message",
]


# pg_type.typname of the built-in types a table column is likely to have, with
# their array types. pgoutput sends no Type message for oids below
# FirstGenbkiObjectId (10000), so these names must be known in advance.
# Checked against pg_type by tests/unit/test_pgoutput.py (captured from Postgres 16).
BUILTIN_TYPE_NAMES: Final[Mapping[int, str]] = MappingProxyType(
    {
        16: "bool", 1000: "_bool",
        17: "bytea", 1001: "_bytea",
        18: "char", 1002: "_char",
        19: "name", 1003: "_name",
        20: "int8", 1016: "_int8",
        21: "int2", 1005: "_int2",
        23: "int4", 1007: "_int4",
        25: "text", 1009: "_text",
        26: "oid", 1028: "_oid",
        28: "xid", 1011: "_xid",
        114: "json", 199: "_json",
        142: "xml", 143: "_xml",
        600: "point", 1017: "_point",
        601: "lseg", 1018: "_lseg",
        602: "path", 1019: "_path",
        603: "box", 1020: "_box",
        604: "polygon", 1027: "_polygon",
        628: "line", 629: "_line",
        650: "cidr", 651: "_cidr",
        700: "float4", 1021: "_float4",
        701: "float8", 1022: "_float8",
        718: "circle", 719: "_circle",
        774: "macaddr8", 775: "_macaddr8",
        790: "money", 791: "_money",
        829: "macaddr", 1040: "_macaddr",
        869: "inet", 1041: "_inet",
        1042: "bpchar", 1014: "_bpchar",
        1043: "varchar", 1015: "_varchar",
        1082: "date", 1182: "_date",
        1083: "time", 1183: "_time",
        1114: "timestamp", 1115: "_timestamp",
        1184: "timestamptz", 1185: "_timestamptz",
        1186: "interval", 1187: "_interval",
        1266: "timetz", 1270: "_timetz",
        1560: "bit", 1561: "_bit",
        1562: "varbit", 1563: "_varbit",
        1700: "numeric", 1231: "_numeric",
        1790: "refcursor", 2201: "_refcursor",
        2205: "regclass", 2210: "_regclass",
        2206: "regtype", 2211: "_regtype",
        2950: "uuid", 2951: "_uuid",
        3614: "tsvector", 3643: "_tsvector",
        3615: "tsquery", 3645: "_tsquery",
        3802: "jsonb", 3807: "_jsonb",
        3904: "int4range", 3905: "_int4range",
        3906: "numrange", 3907: "_numrange",
        3908: "tsrange", 3909: "_tsrange",
        3910: "tstzrange", 3911: "_tstzrange",
        3912: "daterange", 3913: "_daterange",
        3926: "int8range", 3927: "_int8range",
        4072: "jsonpath", 4073: "_jsonpath",
        4451: "int4multirange", 6150: "_int4multirange",
        4532: "nummultirange", 6151: "_nummultirange",
        4533: "tsmultirange", 6152: "_tsmultirange",
        4534: "tstzmultirange", 6153: "_tstzmultirange",
        4535: "datemultirange", 6155: "_datemultirange",
        4536: "int8multirange", 6157: "_int8multirange",
        5069: "xid8", 271: "_xid8",
    }
)  # fmt: skip


# --- tuples ------------------------------------------------------------------


class Unchanged(Enum):
    """Marks a column value that the message does not carry."""

    # 'u': a TOASTed value the UPDATE did not touch; it is not in the WAL record.
    TOAST = "u"


UNCHANGED_TOAST: Final = Unchanged.TOAST

# One column of a TupleData: None ('n'), UNCHANGED_TOAST ('u'), the text output
# of the value ('t'), or its binary send format ('b', only with ``binary 'true'``).
TupleValue: TypeAlias = str | bytes | None | Literal[Unchanged.TOAST]
TupleData: TypeAlias = tuple[TupleValue, ...]


class OldTupleKind(Enum):
    """Which old tuple an Update or Delete carries."""

    KEY = "K"  # replica identity columns only (DEFAULT or USING INDEX); others are null
    OLD = "O"  # every column (REPLICA IDENTITY FULL)


class ReplicaIdentity(Enum):
    """``pg_class.relreplident`` as sent in a Relation message."""

    DEFAULT = "d"
    NOTHING = "n"
    FULL = "f"
    INDEX = "i"


class TruncateOptions(IntFlag):
    """The option bits of a Truncate message."""

    NONE = 0
    CASCADE = 1
    RESTART_IDENTITY = 2


# --- messages ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Begin:
    """``'B'``: a transaction starts; its changes follow, then a Commit."""

    final_lsn: int  # the LSN of the commit record
    commit_time: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """``'C'``: the transaction announced by the last Begin committed.

    Confirm ``end_lsn`` once its changes are delivered.
    """

    flags: int  # unused by Postgres so far, always 0
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    """``'O'``: the transaction came from another node through replication origin ``name``."""

    commit_lsn: int  # the commit LSN on the origin server
    name: str


@dataclass(frozen=True, slots=True)
class RelationColumn:
    """One column of a Relation message, in table (attnum) order."""

    name: str
    type_oid: int
    type_modifier: int  # atttypmod, -1 when none
    is_key: bool  # in the replica identity (flag bit 1): every column under FULL, not the PK


@dataclass(frozen=True, slots=True)
class Relation:
    """``'R'``: the shape of a table; sent before its first change on a stream and after DDL."""

    oid: int
    namespace: str  # empty for pg_catalog, per the protocol; see ``schema``
    name: str
    replica_identity: ReplicaIdentity
    columns: tuple[RelationColumn, ...]

    @property
    def schema(self) -> str:
        """The schema name, with the protocol's empty string read as ``pg_catalog``."""
        return self.namespace or "pg_catalog"


@dataclass(frozen=True, slots=True)
class Type:
    """``'Y'``: the name of a non-built-in type used by a following Relation."""

    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """``'I'``: a new row."""

    relation_oid: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    """``'U'``: a changed row.

    ``old`` is present only when the replica identity has one to send: the key
    when a key column changed (``KEY``), every column under FULL (``OLD``).
    """

    relation_oid: int
    old_kind: OldTupleKind | None
    old: TupleData | None
    new: TupleData


@dataclass(frozen=True, slots=True)
class Delete:
    """``'D'``: a removed row, known by its key (``KEY``) or every column (``OLD``)."""

    relation_oid: int
    old_kind: OldTupleKind
    old: TupleData


@dataclass(frozen=True, slots=True)
class Truncate:
    """``'T'``: one TRUNCATE statement over ``relation_oids``."""

    options: TruncateOptions
    relation_oids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Message:
    """``'M'``: a logical decoding message from ``pg_logical_emit_message``."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(frozen=True, slots=True)
class Unsupported:
    """A well-framed message this decoder does not interpret (e.g. protocol 3 two-phase)."""

    tag: int
    data: bytes


# The messages that carry a changed row (each has ``relation_oid``).
ROW_CHANGES = (Insert, Update, Delete)

PgoutputMessage: TypeAlias = (
    Begin
    | Commit
    | Origin
    | Relation
    | Type
    | Insert
    | Update
    | Delete
    | Truncate
    | Message
    | Unsupported
)


# --- decoding ----------------------------------------------------------------

_U8: Final = struct.Struct(">B")
_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_I32: Final = struct.Struct(">i")
_U64: Final = struct.Struct(">Q")
_I64: Final = struct.Struct(">q")


class _Reader:
    """A cursor over one message; every read past the end raises DecodeError."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def _take(self, size: int) -> int:
        start = self._pos
        if start + size > len(self._data):
            raise DecodeError(
                f"{self._what} message truncated: needs {size} more bytes at offset {start}, "
                f"has {len(self._data) - start}"
            )
        self._pos = start + size
        return start

    def u8(self) -> int:
        return int(_U8.unpack_from(self._data, self._take(1))[0])

    def u16(self) -> int:
        return int(_U16.unpack_from(self._data, self._take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack_from(self._data, self._take(4))[0])

    def i32(self) -> int:
        return int(_I32.unpack_from(self._data, self._take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack_from(self._data, self._take(8))[0])

    def time(self) -> datetime:
        micros = int(_I64.unpack_from(self._data, self._take(8))[0])
        return pg_time_to_datetime(micros)

    def byte(self) -> bytes:
        start = self._take(1)
        return self._data[start : start + 1]

    def raw(self, size: int) -> bytes:
        start = self._take(size)
        return self._data[start : start + size]

    def length(self) -> int:
        size = self.i32()
        if size < 0:
            raise DecodeError(f"{self._what} message has a negative length {size}")
        return size

    def string(self) -> str:
        end = self._data.find(b"\0", self._pos)
        if end < 0:
            raise DecodeError(f"{self._what} message has an unterminated string")
        text = self._data[self._pos : end].decode("utf-8", "replace")
        self._pos = end + 1
        return text

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def done(self) -> None:
        if self._pos != len(self._data):
            raise DecodeError(
                f"{self._what} message has {len(self._data) - self._pos} unexpected trailing bytes"
            )


def _tuple(reader: _Reader) -> TupleData:
    # TupleData: Int16 column count, then per column Byte1 kind and maybe Int32 len + bytes.
    count = reader.u16()
    values: list[TupleValue] = []
    for _ in range(count):
        kind = reader.byte()
        if kind == b"n":
            values.append(None)
        elif kind == b"u":
            values.append(UNCHANGED_TOAST)
        elif kind == b"t":
            values.append(reader.raw(reader.length()).decode("utf-8", "replace"))
        elif kind == b"b":
            values.append(reader.raw(reader.length()))
        else:
            raise DecodeError(f"unknown tuple column kind {kind!r}")
    return tuple(values)


def _begin(r: _Reader) -> Begin:
    return Begin(final_lsn=r.u64(), commit_time=r.time(), xid=r.u32())


def _commit(r: _Reader) -> Commit:
    return Commit(flags=r.u8(), commit_lsn=r.u64(), end_lsn=r.u64(), commit_time=r.time())


def _origin(r: _Reader) -> Origin:
    return Origin(commit_lsn=r.u64(), name=r.string())


def _relation(r: _Reader) -> Relation:
    oid = r.u32()
    namespace = r.string()
    name = r.string()
    identity_byte = r.byte()
    try:
        identity = ReplicaIdentity(identity_byte.decode("latin-1"))
    except ValueError:
        raise DecodeError(f"unknown replica identity {identity_byte!r}") from None
    count = r.u16()
    columns = []
    for _ in range(count):
        flags = r.u8()
        columns.append(
            RelationColumn(
                is_key=bool(flags & 1), name=r.string(), type_oid=r.u32(), type_modifier=r.i32()
            )
        )
    return Relation(oid, namespace, name, identity, tuple(columns))


def _type(r: _Reader) -> Type:
    return Type(oid=r.u32(), namespace=r.string(), name=r.string())


def _insert(r: _Reader) -> Insert:
    oid = r.u32()
    marker = r.byte()
    if marker != b"N":
        raise DecodeError(f"Insert expects a new tuple 'N', got {marker!r}")
    return Insert(oid, _tuple(r))


def _update(r: _Reader) -> Update:
    oid = r.u32()
    marker = r.byte()
    old_kind: OldTupleKind | None = None
    old: TupleData | None = None
    if marker in (b"K", b"O"):
        old_kind = OldTupleKind(marker.decode("ascii"))
        old = _tuple(r)
        marker = r.byte()
    if marker != b"N":
        raise DecodeError(f"Update expects 'K', 'O' or a new tuple 'N', got {marker!r}")
    return Update(oid, old_kind, old, _tuple(r))


def _delete(r: _Reader) -> Delete:
    oid = r.u32()
    marker = r.byte()
    if marker not in (b"K", b"O"):
        raise DecodeError(f"Delete expects an old tuple 'K' or 'O', got {marker!r}")
    return Delete(oid, OldTupleKind(marker.decode("ascii")), _tuple(r))


def _truncate(r: _Reader) -> Truncate:
    count = r.u32()
    options = TruncateOptions(r.u8())
    if count * 4 != r.remaining():
        raise DecodeError(f"Truncate of {count} relations has {r.remaining()} bytes of oids")
    return Truncate(options, tuple(r.u32() for _ in range(count)))


def _message(r: _Reader) -> Message:
    flags = r.u8()
    lsn = r.u64()
    prefix = r.string()
    content = r.raw(r.length())
    return Message(bool(flags & 1), lsn, prefix, content)


_DECODERS: Final[Mapping[bytes, tuple[str, Callable[[_Reader], PgoutputMessage]]]] = {
    b"B": ("Begin", _begin),
    b"C": ("Commit", _commit),
    b"O": ("Origin", _origin),
    b"R": ("Relation", _relation),
    b"Y": ("Type", _type),
    b"I": ("Insert", _insert),
    b"U": ("Update", _update),
    b"D": ("Delete", _delete),
    b"T": ("Truncate", _truncate),
    b"M": ("Message", _message),
}


def decode_message(data: bytes | bytearray | memoryview) -> PgoutputMessage:
    """Decode one pgoutput message (the payload of one XLogData).

    Args:
        data: the message bytes, starting with its one-byte tag.

    Raises:
        DecodeError: empty, truncated or corrupt input, or trailing bytes.
    """
    raw = bytes(data)
    if not raw:
        raise DecodeError("empty pgoutput message")
    tag = raw[0:1]
    entry = _DECODERS.get(tag)
    if entry is None:
        return Unsupported(raw[0], raw[1:])
    what, decode = entry
    reader = _Reader(raw, what)
    reader.byte()
    message = decode(reader)
    reader.done()
    return message


# --- relation cache ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    """A column of a cached relation, with its type named.

    ``type_name`` is ``pg_type.typname`` (what PROTOCOL.md 4.5 ``columns[].type``
    shows); ``value_type`` names the type whose JSON rules convert the value
    (:func:`pgtypes.values.convert`): the same but for a domain, which
    converts as its base type. ``is_key`` means replica identity membership.
    """

    name: str
    type_name: str
    value_type: str
    type_oid: int
    type_modifier: int
    is_key: bool

    def to_json(self) -> dict[str, str]:
        """The ``columns`` entry of a change event: ``{"name": ..., "type": ...}``."""
        return {"name": self.name, "type": self.type_name}


@dataclass(frozen=True, slots=True)
class RawRow:
    """A decoded tuple: raw text (or None) by column name, in table order.

    ``values`` leaves out the columns in ``unchanged_toast`` (an UPDATE that did
    not touch a TOASTed value does not carry it) and, for a key-only old tuple,
    the columns outside the replica identity. A value is ``bytes`` only when
    the stream was started with ``binary 'true'``.
    """

    values: dict[str, str | bytes | None]
    unchanged_toast: frozenset[str]


class RelationCache:
    """Remembers Relation and Type messages and decodes tuples by column name.

    A column's ``type_name`` (``pg_type.typname``) comes from, in order: the
    ``type_names`` given by the caller (for example ``SELECT oid, typname FROM
    pg_type``), Type messages, :data:`BUILTIN_TYPE_NAMES`; an oid none of them
    knows is named by its decimal digits and its values stay text
    (:meth:`unknown_type_oids` lists such oids so the caller can look them up).

    A column's ``value_type`` (the rules :func:`pgtypes.values.convert`
    applies) comes from the caller's ``value_types``, then Type messages, then
    is the ``type_name``. pgoutput's Type message for a domain carries the
    *base* type's name (``int4`` for a domain over int4), so a domain converts
    like its base type even when the caller names it ``positive_int``. An
    array of domains has no such help: map it to the base type's array
    (``_int4``) in ``value_types`` if its values should not stay text.

    The ``is_key`` flag of a column is replica identity membership, not the
    primary key: under REPLICA IDENTITY FULL every column is flagged, under
    USING INDEX the index columns are, under NOTHING none is.
    """

    __slots__ = ("_columns", "_relations", "_type_messages", "_type_names", "_value_types")

    def __init__(
        self,
        type_names: Mapping[int, str] | None = None,
        value_types: Mapping[int, str] | None = None,
    ) -> None:
        self._relations: dict[int, Relation] = {}
        self._type_names: dict[int, str] = dict(type_names or {})
        self._value_types: dict[int, str] = dict(value_types or {})
        self._type_messages: dict[int, str] = {}
        self._columns: dict[int, tuple[ColumnInfo, ...]] = {}

    def add(self, message: Relation | Type) -> None:
        """Store a Relation (replacing an older one for its oid) or a Type message."""
        if isinstance(message, Relation):
            self._relations[message.oid] = message
            self._columns.pop(message.oid, None)
        else:
            self._type_messages[message.oid] = message.name
            self._columns.clear()

    def add_type_names(
        self, type_names: Mapping[int, str], value_types: Mapping[int, str] | None = None
    ) -> None:
        """Add or replace type names (and conversion types) given by the caller."""
        self._type_names.update(type_names)
        self._value_types.update(value_types or {})
        self._columns.clear()

    def __contains__(self, relation_oid: object) -> bool:
        return relation_oid in self._relations

    def relation(self, relation_oid: int) -> Relation:
        """The last Relation message for ``relation_oid``.

        Raises:
            UnknownRelationError: no Relation message for it has been added.
        """
        try:
            return self._relations[relation_oid]
        except KeyError:
            raise UnknownRelationError(relation_oid) from None

    def type_name(self, type_oid: int) -> str:
        """``pg_type.typname`` of ``type_oid``, or its decimal digits when unknown."""
        name = self._type_names.get(type_oid)
        if name is None:
            name = self._type_messages.get(type_oid)
        if name is None:
            name = BUILTIN_TYPE_NAMES.get(type_oid)
        return str(type_oid) if name is None else name

    def value_type(self, type_oid: int) -> str:
        """The type name whose JSON rules convert values of ``type_oid``."""
        name = self._value_types.get(type_oid)
        if name is None:
            name = self._type_messages.get(type_oid)
        return self.type_name(type_oid) if name is None else name

    def unknown_type_oids(self) -> frozenset[int]:
        """Type oids used by cached relations that no source names."""
        return frozenset(
            column.type_oid
            for relation in self._relations.values()
            for column in relation.columns
            if column.type_oid not in self._type_names
            and column.type_oid not in self._type_messages
            and column.type_oid not in BUILTIN_TYPE_NAMES
        )

    def columns(self, relation_oid: int) -> tuple[ColumnInfo, ...]:
        """The relation's columns in table order, types named.

        Raises:
            UnknownRelationError: no Relation message for it has been added.
        """
        cached = self._columns.get(relation_oid)
        if cached is not None:
            return cached
        relation = self.relation(relation_oid)
        infos = []
        for column in relation.columns:
            infos.append(
                ColumnInfo(
                    name=column.name,
                    type_name=self.type_name(column.type_oid),
                    value_type=self.value_type(column.type_oid),
                    type_oid=column.type_oid,
                    type_modifier=column.type_modifier,
                    is_key=column.is_key,
                )
            )
        result = tuple(infos)
        self._columns[relation_oid] = result
        return result

    def decode_tuple(
        self, relation_oid: int, values: TupleData, *, key_only: bool = False
    ) -> RawRow:
        """Name the values of a tuple by column.

        Args:
            key_only: keep only replica identity columns (for a ``KEY`` old
                tuple, where pgoutput sends the other columns as null).

        Raises:
            UnknownRelationError: no Relation message for ``relation_oid``.
            DecodeError: the tuple's column count differs from the relation's.
        """
        relation = self.relation(relation_oid)
        if len(values) != len(relation.columns):
            raise DecodeError(
                f"tuple has {len(values)} columns, relation {relation.schema}.{relation.name} "
                f"(oid {relation_oid}) has {len(relation.columns)}"
            )
        row: dict[str, str | bytes | None] = {}
        unchanged: list[str] = []
        for column, value in zip(relation.columns, values, strict=True):
            if key_only and not column.is_key:
                continue
            if value is UNCHANGED_TOAST:
                unchanged.append(column.name)
            else:
                row[column.name] = value
        return RawRow(row, frozenset(unchanged))

    def new_row(self, message: Insert | Update) -> RawRow:
        """The new tuple of an Insert or Update, by column name."""
        return self.decode_tuple(message.relation_oid, message.new)

    def old_row(self, message: Update | Delete) -> RawRow | None:
        """The old tuple of an Update or Delete by column name; None when there is none.

        A ``KEY`` tuple yields the replica identity columns only.
        """
        if message.old is None:
            return None
        return self.decode_tuple(
            message.relation_oid, message.old, key_only=message.old_kind is OldTupleKind.KEY
        )

    def relations(self) -> Iterable[Relation]:
        """Every cached Relation."""
        return self._relations.values()
