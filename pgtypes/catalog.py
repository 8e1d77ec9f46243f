"""The built-in PostgreSQL types that ``values`` (output text) and ``casting`` (input text) both know.

One table, ``SCALAR_TYPES``: each type's ``pg_type.typname``, its ``Kind`` (what the
two modules do with it) and the name PostgreSQL prints in errors; an array is its
element's typname after ``_``. Also the whitespace PostgreSQL's input functions skip and
the refusal of the constants json never holds. Pure: no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Final


class Kind(enum.Enum):
    """What ``values`` and ``casting`` do with a type; ``ARRAY`` and ``OTHER`` are ``casting``'s own."""

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


# typname -> (kind, the name Postgres prints in errors)
SCALAR_TYPES: Final[Mapping[str, tuple[Kind, str]]] = {
    "int2": (Kind.INTEGER, "smallint"),
    "int4": (Kind.INTEGER, "integer"),
    "int8": (Kind.INTEGER, "bigint"),
    "float4": (Kind.FLOAT, "real"),
    "float8": (Kind.FLOAT, "double precision"),
    "numeric": (Kind.NUMERIC, "numeric"),
    "bool": (Kind.BOOLEAN, "boolean"),
    "text": (Kind.TEXT, "text"),
    "varchar": (Kind.TEXT, "character varying"),
    "bpchar": (Kind.TEXT, "character"),
    "name": (Kind.TEXT, "name"),
    "citext": (Kind.TEXT, "citext"),
    "uuid": (Kind.UUID, "uuid"),
    "timestamptz": (Kind.TIMESTAMPTZ, "timestamp with time zone"),
    "timestamp": (Kind.TIMESTAMP, "timestamp without time zone"),
    "date": (Kind.DATE, "date"),
    "time": (Kind.TIME, "time without time zone"),
    "bytea": (Kind.BYTEA, "bytea"),
    "jsonb": (Kind.JSONB, "jsonb"),
    "json": (Kind.JSON, "json"),
}

# scanner_isspace(), and array_isspace() for array_in: the whitespace PostgreSQL's input
# functions skip (around array elements in ``values``, around filter values in ``casting``).
PG_SPACE: Final = " \t\n\r\x0b\x0c"


def reject_json_constant(name: str) -> Any:
    """``json.loads``'s ``parse_constant``: PostgreSQL json never holds NaN or Infinity; text that does is not json."""
    raise ValueError(f"{name} is not JSON")
