"""Database helpers of the checks run as a subscriber, shared by the server and the replicator."""

from __future__ import annotations

from typing import Any

import psycopg


def connection_lost(conn: psycopg.AsyncConnection[Any], error: psycopg.Error) -> bool:
    """Whether ``error`` means the connection is gone (ask again later), not a verdict on the query.

    A statement timeout (``QueryCanceled``) and a lock timeout are
    ``OperationalError`` too, but the database answered them: they belong to
    the query, which would fail the same way again. Only a connection that
    closed under the query (or psycopg's ``InterfaceError``) is worth a retry.
    """
    return isinstance(error, psycopg.InterfaceError) or conn.closed


def check_timeout_ms() -> int:
    """The ``statement_timeout`` of checks run as a subscriber: ``REALTIME_CHECK_TIMEOUT_MS``."""
    from django.conf import settings

    timeout: int = settings.REALTIME_CHECK_TIMEOUT_MS
    return timeout
