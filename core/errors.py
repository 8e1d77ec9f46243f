"""The base of every error the realtime app reports to a client."""

from __future__ import annotations


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
