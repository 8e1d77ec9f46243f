"""Per-socket logging (``realtime.logs``): the client's ``log_level`` quiets its socket, never more."""

from __future__ import annotations

import logging

import pytest

from realtime.logs import SocketLog, parse_log_level

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("value", "level"),
    [
        ("info", logging.INFO), ("warning", logging.WARNING), ("warn", logging.WARNING), ("error", logging.ERROR),
        (" ERROR ", logging.ERROR), ("debug", logging.DEBUG), (None, None), ("", None), ("verbose", None),
    ],
)
def test_log_level_names_the_levels_clients_send(value: str | None, level: int | None) -> None:
    assert parse_log_level(value) == level


def test_a_socket_at_error_writes_no_info_line_and_every_line_carries_its_id(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.socketlog")
    caplog.set_level(logging.DEBUG, logger="tests.socketlog")
    quiet = SocketLog(logger, "sock-1", logging.ERROR)
    quiet.info("join refused")
    quiet.error("failed")
    default = SocketLog(logger, "sock-2")
    default.info("join refused")
    assert [(r.getMessage(), r.socket_id) for r in caplog.records] == [("failed", "sock-1"), ("join refused", "sock-2")]  # type: ignore[attr-defined]


def test_a_client_cannot_make_the_server_log_below_its_own_level(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.socketlog.server")
    caplog.set_level(logging.WARNING, logger="tests.socketlog.server")
    verbose = SocketLog(logger, "sock-3", logging.DEBUG)
    verbose.info("not written")
    verbose.warning("written")
    assert [r.getMessage() for r in caplog.records] == ["written"]


def test_tokens_in_query_strings_are_redacted_from_uvicorns_access_log() -> None:
    import logging

    from realtime.logs import RedactSecrets, redact_secrets

    assert redact_secrets("/realtime/v1/websocket?apikey=eyJ.a.b&vsn=2.0.0") == "/realtime/v1/websocket?apikey=[redacted]&vsn=2.0.0"
    assert redact_secrets("/x?access_token=abc&token=def&log_level=info") == "/x?access_token=[redacted]&token=[redacted]&log_level=info"
    # A name the server decodes is redacted too.
    assert redact_secrets("/x?api%6Bey=eyJ.a.b&vsn=1.0.0") == "/x?api%6Bey=[redacted]&vsn=1.0.0"
    assert redact_secrets("/x?APIKEY=abc") == "/x?APIKEY=[redacted]"
    # uvicorn's access line: the path is one of the record's arguments.
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/realtime/v1/websocket?vsn=2.0.0&apikey=eyJhbGciOi.x.y", "1.1", 101), None,
    )
    assert RedactSecrets().filter(record)
    line = record.getMessage()
    assert "eyJhbGciOi" not in line and "apikey=[redacted]" in line and line.endswith(" 101")
