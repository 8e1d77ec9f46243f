"""postgres_changes bindings from a join payload -> validated ``Binding`` values.

Pure: applies PROTOCOL.md 4.1 (event, schema/table defaults, wildcards,
``select``) and turns problems into the reference's subscribe-time messages
(4.3). Checks that need the database (the table is published, columns exist,
the role may read) happen later, in ``authorization``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from core.errors import RealtimeError

BINDING_ID_MASK = (1 << 27) - 1
WILDCARD = "*"


class ChangeEvent(str, Enum):
    ALL = "*"
    INSERT = "INSERT"
    UPDATE = "UPDATE"
    DELETE = "DELETE"


# Characters in one binding's ``filter`` (an ``in`` list of 100 uuids is some 3,800).
MAX_FILTER_LENGTH = 8192


class BindingError(RealtimeError):
    """A binding the server cannot subscribe; the message goes to a ``system`` error."""

    def __init__(self, message: str) -> None:
        super().__init__("InvalidBinding", message)


@dataclass(frozen=True, slots=True)
class Binding:
    """One validated postgres_changes binding of a channel."""

    id: int
    event: ChangeEvent
    schema: str
    table: str  # "*" for every table of the schema
    filter: str | None
    select: tuple[str, ...] | None

    @property
    def wildcard(self) -> bool:
        return self.schema == WILDCARD or self.table == WILDCARD

    def describe(self) -> str:
        """The parameter list the reference prints in its errors."""
        filters = f"[{self.filter}]" if self.filter else "[]"
        select = "nil" if self.select is None else json.dumps(list(self.select))
        return f"[event: {self.event.value}, schema: {self.schema}, table: {self.table}, filters: {filters}, select: {select}]"

    def accepts(self, change_type: str) -> bool:
        return self.event is ChangeEvent.ALL or self.event.value == change_type


def binding_id(binding: dict[str, Any]) -> int:
    """A deterministic 27-bit id for a binding as the client sent it (identical bindings share it)."""
    canonical = json.dumps(binding, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & BINDING_ID_MASK


def parse_binding(raw: dict[str, Any]) -> Binding:
    """Validate one binding (PROTOCOL.md 4.1).

    Raises:
        BindingError: with the reference's message.
    """
    event_text = raw.get("event")
    event = ChangeEvent.ALL
    if isinstance(event_text, str):
        try:
            event = ChangeEvent(event_text.upper())
        except ValueError:
            event = ChangeEvent.ALL
    schema = raw.get("schema")
    table = raw.get("table")
    filter_text = raw.get("filter")
    schema = schema if isinstance(schema, str) and schema else None
    table = table if isinstance(table, str) and table else None
    filter_text = filter_text if isinstance(filter_text, str) and filter_text.strip() else None
    if filter_text is not None and len(filter_text) > MAX_FILTER_LENGTH:
        raise BindingError(f"filter is too long: at most {MAX_FILTER_LENGTH} characters")
    if schema is None and table is None:
        raise BindingError(
            "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: "
            + json.dumps(raw, sort_keys=True)
        )
    if table is None:
        table = WILDCARD
    if schema is None:
        schema = "public"
    if filter_text is not None and (schema == WILDCARD or table == WILDCARD):
        raise BindingError(
            "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: "
            + json.dumps(raw, sort_keys=True)
        )
    select = _parse_select(raw.get("select"), wildcard=schema == WILDCARD or table == WILDCARD)
    return Binding(binding_id(raw), event, schema, table, filter_text, select)


def _parse_select(value: Any, wildcard: bool) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BindingError(
            'Error parsing `select` params: expected a list of column name strings, e.g. select: ["col1", "col2"]'
        )
    if not value:
        return None
    if wildcard:
        raise BindingError(
            "Column selection is not supported for wildcard subscriptions. "
            "Provide an explicit schema and table name."
        )
    return tuple(value)


def select_columns(data_json: str, keep: frozenset[str]) -> str:
    """A change's ``data`` JSON with ``record``, ``old_record`` and ``columns`` cut to ``keep``."""
    from decimal import Decimal

    from pgtypes.values import encode_json

    data = json.loads(data_json, parse_float=Decimal)
    for name in ("record", "old_record"):
        row = data.get(name)
        if isinstance(row, dict):
            data[name] = {column: value for column, value in row.items() if column in keep}
    if isinstance(data.get("columns"), list):
        data["columns"] = [c for c in data["columns"] if isinstance(c, dict) and c.get("name") in keep]
    return encode_json(data)
