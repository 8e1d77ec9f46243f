"""The backing services the suite runs against, and the embedded launcher itself."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import psycopg
import pytest
import redis

from devservices import checkout, postgres, services
from devservices import redis as redis_server
from devservices.errors import EmbeddedServiceError

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
    first = postgres.ensure_postgres()
    pid = postgres.postgres_pid()
    second = postgres.ensure_postgres()

    assert first == second == f"postgresql://postgres@127.0.0.1:{checkout.pg_port()}/realtime"
    assert pid is not None
    assert postgres.postgres_pid() == pid
    with psycopg.connect(second, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SELECT current_database(), pg_backend_pid() <> %s", (pid,)).fetchone()
    assert row == ("realtime", True)


def test_embedded_redis_is_reused() -> None:
    first = redis_server.ensure_redis()
    pid = redis_server.redis_pid()
    second = redis_server.ensure_redis()

    assert first == second == f"redis://127.0.0.1:{checkout.redis_port()}/0"
    assert pid is not None
    assert redis_server.redis_pid() == pid
    client = redis.Redis.from_url(second, socket_timeout=5)
    try:
        info = client.info("server")
    finally:
        client.close()
    assert info["process_id"] == pid


def test_ensure_services_only_fills_unset_urls() -> None:
    assert services.ensure_services({"DATABASE_URL": "postgresql://elsewhere/db", "REDIS_URL": "redis://elsewhere"}) == {}
    assert services.ensure_services({"DATABASE_URL": "", "REDIS_URL": "redis://elsewhere"}) == {
        "DATABASE_URL": postgres.postgres_url()
    }
    assert services.ensure_services({}) == {
        "DATABASE_URL": postgres.postgres_url(),
        "REDIS_URL": redis_server.redis_url(),
    }


# --- ports per checkout --------------------------------------------------------------


@pytest.fixture
def own_checkout(tmp_path, monkeypatch) -> Path:
    """A checkout of its own at tmp_path: its .local/ports.json starts empty."""
    monkeypatch.setattr(checkout, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(checkout, "LOCAL_DIR", tmp_path / ".local")
    monkeypatch.setattr(checkout, "LOCK_FILE", tmp_path / ".local" / "embedded.lock")
    monkeypatch.setattr(checkout, "PORTS_FILE", tmp_path / ".local" / "ports.json")
    monkeypatch.delenv("REALTIME_TEST_PORT", raising=False)
    return tmp_path


def listening() -> socket.socket:
    """A listener on a free 127.0.0.1 port: another checkout's service."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def choose(default: int, ours: bool = False) -> int:
    return checkout.choose_port("svc", "REALTIME_TEST_PORT", default, lambda port: ours, lambda port: f"holder-of-{port}")


def test_a_checkout_takes_a_free_default_port_and_remembers_it(own_checkout) -> None:
    with listening() as probe:
        default = probe.getsockname()[1]
    assert choose(default) == default
    assert json.loads((own_checkout / ".local" / "ports.json").read_text()) == {"svc": default}


def test_a_second_checkout_picks_its_own_port_and_keeps_it(own_checkout, capsys) -> None:
    with listening() as other:
        default = other.getsockname()[1]
        port = choose(default)
        assert port != default and default < port <= default + checkout.PORT_RANGE
        assert f"port {default} is taken by holder-of-{default}" in capsys.readouterr().err
    # Remembered: the same port once the default is free again, and no second message.
    assert choose(default) == port
    assert capsys.readouterr().err == ""
    assert json.loads((own_checkout / ".local" / "ports.json").read_text()) == {"svc": port}


def test_the_default_held_by_this_checkouts_own_service_is_kept(own_checkout) -> None:
    with listening() as ours:
        default = ours.getsockname()[1]
        assert choose(default, ours=True) == default


def test_a_remembered_port_held_by_another_program_is_an_error_naming_it(own_checkout) -> None:
    with listening() as other:
        taken = other.getsockname()[1]
        (own_checkout / ".local").mkdir()
        (own_checkout / ".local" / "ports.json").write_text(json.dumps({"svc": taken}))
        with pytest.raises(EmbeddedServiceError) as error:
            choose(taken - 1)
    assert f"Port {taken}" in str(error.value) and f"holder-of-{taken}" in str(error.value)
    assert "ports.json" in str(error.value)


def test_the_environment_wins_and_is_not_remembered(own_checkout, monkeypatch) -> None:
    monkeypatch.setenv("REALTIME_TEST_PORT", "61234")
    assert choose(54329) == 61234
    assert not (own_checkout / ".local" / "ports.json").exists()


# --- the embedded Redis, started and stopped in a checkout of its own ----------------


@pytest.fixture
def redis_checkout(own_checkout, monkeypatch):
    """A checkout at tmp_path whose Redis gets a free port (the shared servers are never touched)."""
    with listening() as probe:
        port = probe.getsockname()[1]
    monkeypatch.setenv("REALTIME_EMBEDDED_REDIS_PORT", str(port))
    directory = own_checkout / ".local" / "redis"
    monkeypatch.setattr(redis_server, "REDIS_DIR", directory)
    monkeypatch.setattr(redis_server, "REDIS_PIDFILE", directory / "redis.pid")
    monkeypatch.setattr(redis_server, "REDIS_LOG", directory / "redis.log")
    yield port
    if redis_server._redis_ping(port):
        monkeypatch.setattr(redis_server, "REDIS_DIR", directory)
        redis_server._redis_shutdown(port)


def test_a_checkouts_redis_starts_is_reused_and_stops(redis_checkout) -> None:
    port = redis_checkout
    url = redis_server.ensure_redis()
    pid = redis_server.redis_pid()

    assert url == f"redis://127.0.0.1:{port}/0"
    assert pid is not None
    assert redis_server.ensure_redis() == url and redis_server.redis_pid() == pid
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        assert client.config_get("dir") == {"dir": os.path.realpath(redis_server.REDIS_DIR)}
    finally:
        client.close()

    with checkout.service_lock():
        redis_server.stop_redis()
    assert redis_server.redis_pid() is None
    assert not redis_server.REDIS_PIDFILE.exists()


def test_a_redis_of_another_checkout_on_the_port_is_an_error_naming_it(redis_checkout, tmp_path, monkeypatch) -> None:
    redis_server.ensure_redis()
    other = tmp_path / "other" / ".local" / "redis"
    monkeypatch.setattr(redis_server, "REDIS_DIR", other)

    with pytest.raises(EmbeddedServiceError) as error:
        redis_server.ensure_redis()
    assert f"Port {redis_checkout} is served by the checkout {os.path.realpath(tmp_path)}'s Redis" in str(error.value)
    with checkout.service_lock():
        redis_server.stop_redis()  # not ours: left running
    assert redis_server._redis_ping(redis_checkout)


def test_a_port_held_by_something_that_is_not_redis_is_an_error(own_checkout, monkeypatch) -> None:
    with listening() as other:
        monkeypatch.setenv("REALTIME_EMBEDDED_REDIS_PORT", str(other.getsockname()[1]))
        with pytest.raises(EmbeddedServiceError, match="in use by something that is not Redis"):
            redis_server.ensure_redis()
