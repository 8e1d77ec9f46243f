"""The backing services the suite runs against, and the embedded launcher itself."""

from __future__ import annotations

import os

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
