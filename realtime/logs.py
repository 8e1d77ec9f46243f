"""Per-socket logging: the socket's id on every line, and the ``log_level`` the client asked for.

A client may pass ``log_level`` at connect (``info``, ``warning``, ``error``;
PROTOCOL.md 1: server logging only). As in the reference, which sets it as the
log level of the socket's own process, it is the level of that socket's lines:
with ``error`` its refused joins and limit hits (INFO) are not logged. It can
only quiet a socket: a line is written only if the server's own level
(``REALTIME_LOG_LEVEL``) lets it through too, since the key that opens a socket
is public and no client may make the server log more than its operator chose.

``SocketLog`` adds ``socket_id`` (and, where given, ``topic``) to each record,
which ``REALTIME_LOG_FORMAT=json`` writes as fields of their own.
"""

from __future__ import annotations

import logging
import re
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import unquote_plus

# What clients send (supabase-js passes its ``log_level`` option through), by name; others are ignored.
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "notice": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def parse_log_level(value: str | None) -> int | None:
    """The level a ``log_level`` connect parameter names; None when absent or unknown (no per-socket level)."""
    if not value:
        return None
    return LEVELS.get(value.strip().lower())


class SocketLog(logging.LoggerAdapter):  # type: ignore[type-arg]  # generic only in typeshed
    """A logger for one socket's lines, at or above the level its client asked for."""

    def __init__(self, logger: logging.Logger, socket_id: str, level: int | None = None) -> None:
        super().__init__(logger, {"socket_id": socket_id})
        self.floor = level if level is not None else logging.NOTSET

    def isEnabledFor(self, level: int) -> bool:
        return level >= self.floor and self.logger.isEnabledFor(level)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


# Query parameters that carry a token: ``apikey`` and ``access_token`` (connect), ``token``.
SECRET_PARAMETERS = frozenset({"apikey", "access_token", "token"})
_PARAMETER = re.compile(r"([^?&=\s\"']+)=([^&\s\"']*)")


def redact_secrets(text: str) -> str:
    """``text`` with the value of every token-carrying query parameter replaced by ``[redacted]``.

    Names are compared decoded, as the server reads them: ``api%6Bey`` is ``apikey``.
    """

    def redact(match: re.Match[str]) -> str:
        name = unquote_plus(match[1]).lower()
        return f"{match[1]}=[redacted]" if name in SECRET_PARAMETERS else match[0]

    return _PARAMETER.sub(redact, text)


class RedactSecrets(logging.Filter):
    """Redacts tokens in query strings of a record's message and arguments (uvicorn's request lines).

    uvicorn logs each request's path with its query string, and sockets
    connect with ``?apikey=<JWT>``: without this every token would be written
    to the log. Daphne's access log has no query string.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "=" in record.msg:
            record.msg = redact_secrets(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_secrets(arg) if isinstance(arg, str) and "=" in arg else arg for arg in record.args)
        return True


# uvicorn writes HTTP requests to uvicorn.access and WebSocket handshakes
# ('... "WebSocket /realtime/v1/websocket?apikey=..." [accepted]') to uvicorn.error.
QUERY_STRING_LOGGERS = ("uvicorn.access", "uvicorn.error")


def redact_access_logs() -> None:
    """Install ``RedactSecrets`` on the loggers that print query strings (once)."""
    for name in QUERY_STRING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
