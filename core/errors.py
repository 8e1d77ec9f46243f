"""The errors the realtime app reports to a client: the base, a failed row check, a refused filter."""

from __future__ import annotations

import enum
from typing import Final

FILTER_ERROR_CODE: Final = "InvalidFilter"


class RealtimeError(Exception):
    """An error with a PascalCase ``code`` and a human ``message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def reason(self) -> str:
        """The join-reply form, ``Code: message`` (PROTOCOL.md 3.2)."""
        return f"{self.code}: {self.message}"


class RowCheckFailed(RealtimeError):
    """A claim set's row level security check failed (a policy raised or ran past the timeout).

    Only that claim set is denied, for that run of changes; its channels get
    ``message`` in a ``system`` error for postgres_changes (PROTOCOL.md 3.5).
    """

    def __init__(self, message: str) -> None:
        super().__init__("RowCheckFailed", message)


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
