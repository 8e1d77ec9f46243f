"""The backing services the suite runs against, and the embedded launcher itself."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import psycopg
import pytest
import redis

from realtime_project import embedded

pytestmark = pytest.mark.integration


def test_postgres_supports_logical_replication() -> None:
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True, connect_timeout=10) as conn:
        wal_level = conn.execute("SHOW wal_level").fetchone()
        slots = conn.execute("SHOW max_replication_slots").fetchone()
        senders = conn.execute("SHOW max_wal_senders").fetchone()
    assert wal_level == ("logical",)
    assert slots is not None and int(slots[0]) >= 10
    assert senders is not None and int(senders[0]) >= 10


def test_redis_answers_ping() -> None:
    client = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=5)
    try:
        assert client.ping() is True
    finally:
        client.close()


def test_embedded_postgres_is_reused() -> None:
    first = embedded.ensure_postgres()
    pid = embedded.postgres_pid()
    second = embedded.ensure_postgres()

    assert first == second == f"postgresql://postgres@127.0.0.1:{embedded.pg_port()}/realtime"
    assert pid is not None
    assert embedded.postgres_pid() == pid
    with psycopg.connect(second, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SELECT current_database(), pg_backend_pid() <> %s", (pid,)).fetchone()
    assert row == ("realtime", True)


def test_embedded_redis_is_reused() -> None:
    first = embedded.ensure_redis()
    pid = embedded.redis_pid()
    second = embedded.ensure_redis()

    assert first == second == f"redis://127.0.0.1:{embedded.redis_port()}/0"
    assert pid is not None
    assert embedded.redis_pid() == pid
    client = redis.Redis.from_url(second, socket_timeout=5)
    try:
        info = client.info("server")
    finally:
        client.close()
    assert info["process_id"] == pid


def test_ensure_services_only_fills_unset_urls() -> None:
    assert embedded.ensure_services({"DATABASE_URL": "postgresql://elsewhere/db", "REDIS_URL": "redis://elsewhere"}) == {}
    assert embedded.ensure_services({"DATABASE_URL": "", "REDIS_URL": "redis://elsewhere"}) == {
        "DATABASE_URL": embedded.postgres_url()
    }
    assert embedded.ensure_services({}) == {
        "DATABASE_URL": embedded.postgres_url(),
        "REDIS_URL": embedded.redis_url(),
    }


# --- ports per checkout --------------------------------------------------------------


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A checkout of its own at tmp_path: its .local/ports.json starts empty."""
    monkeypatch.setattr(embedded, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(embedded, "LOCAL_DIR", tmp_path / ".local")
    monkeypatch.setattr(embedded, "LOCK_FILE", tmp_path / ".local" / "embedded.lock")
    monkeypatch.setattr(embedded, "PORTS_FILE", tmp_path / ".local" / "ports.json")
    monkeypatch.delenv("REALTIME_TEST_PORT", raising=False)
    return tmp_path


def listening() -> socket.socket:
    """A listener on a free 127.0.0.1 port: another checkout's service."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def choose(default: int, ours: bool = False) -> int:
    return embedded._choose_port("svc", "REALTIME_TEST_PORT", default, lambda port: ours, lambda port: f"holder-of-{port}")


def test_a_checkout_takes_a_free_default_port_and_remembers_it(checkout) -> None:
    with listening() as probe:
        default = probe.getsockname()[1]
    assert choose(default) == default
    assert json.loads((checkout / ".local" / "ports.json").read_text()) == {"svc": default}


def test_a_second_checkout_picks_its_own_port_and_keeps_it(checkout, capsys) -> None:
    with listening() as other:
        default = other.getsockname()[1]
        port = choose(default)
        assert port != default and default < port <= default + embedded.PORT_RANGE
        assert f"port {default} is taken by holder-of-{default}" in capsys.readouterr().err
    # Remembered: the same port once the default is free again, and no second message.
    assert choose(default) == port
    assert capsys.readouterr().err == ""
    assert json.loads((checkout / ".local" / "ports.json").read_text()) == {"svc": port}


def test_the_default_held_by_this_checkouts_own_service_is_kept(checkout) -> None:
    with listening() as ours:
        default = ours.getsockname()[1]
        assert choose(default, ours=True) == default


def test_a_remembered_port_held_by_another_program_is_an_error_naming_it(checkout) -> None:
    with listening() as other:
        taken = other.getsockname()[1]
        (checkout / ".local").mkdir()
        (checkout / ".local" / "ports.json").write_text(json.dumps({"svc": taken}))
        with pytest.raises(embedded.EmbeddedServiceError) as error:
            choose(taken - 1)
    assert f"Port {taken}" in str(error.value) and f"holder-of-{taken}" in str(error.value)
    assert "ports.json" in str(error.value)


def test_the_environment_wins_and_is_not_remembered(checkout, monkeypatch) -> None:
    monkeypatch.setenv("REALTIME_TEST_PORT", "61234")
    assert choose(54329) == 61234
    assert not (checkout / ".local" / "ports.json").exists()
