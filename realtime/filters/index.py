"""postgres_changes filters, third step: the fan-out index (PROTOCOL.md 4.4 step 4).

``BindingIndex`` holds one table's bindings and narrows a change to the bindings whose
first plain ``eq`` condition can hold, so fan-out does not run every matcher.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, Generic, TypeVar

from pgtypes.casting import normalize_value
from realtime.filters.predicates import Matcher

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
