"""Liveness and readiness of a live server: ``GET /healthcheck`` and ``GET /api/health``.

Each test runs its own Redis (the bundled binary on a free port, never the
shared one: it is stopped here), a server process and a replicator on a slot
of its own, and sees readiness go from 200 to 503 as each one stops.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.fixtures.replicator import ReplicatorProcess, start_replicator, unique_slot
from tests.fixtures.server import ServerProcess, start_server
from tests.integration.test_replication_crash import PrivateRedis, dsn

pytestmark = pytest.mark.integration

WAIT_S = 15.0


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def health(server: ServerProcess) -> tuple[int, dict[str, Any]]:
    code, body = get(server.url + "/api/health")
    return code, json.loads(body)


def eventually(check: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class Stack:
    def __init__(self, tmp_path: Path) -> None:
        suffix = uuid.uuid4().hex[:10]
        self.redis = PrivateRedis(tmp_path)
        self.slot = unique_slot("health")
        self.publication = f"health_{suffix}"
        self.env = {
            "REDIS_URL": self.redis.url,
            "REALTIME_SLOT": self.slot,
            "REALTIME_PUBLICATION": self.publication,
            "REALTIME_LAYER_PREFIX": f"health-{suffix}",
        }
        self.server: ServerProcess | None = None
        self.replicators: list[ReplicatorProcess] = []

    def start_replicator(self, env: dict[str, str] | None = None) -> ReplicatorProcess:
        process = start_replicator(self.slot, env={**self.env, **(env or {})})
        self.replicators.append(process)
        process.wait_active()
        return process

    def close(self) -> None:
        for process in [*self.replicators, *([self.server] if self.server else [])]:
            process.stop()
        if self.replicators:
            self.replicators[0].drop_slot()
        self.redis.kill()
        with psycopg.connect(dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(self.publication)))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    created = Stack(tmp_path)
    created.redis.start()
    try:
        created.server = start_server(env=created.env)
        yield created
    finally:
        created.close()


def test_liveness_answers_ok() -> None:
    server = start_server()
    try:
        assert get(server.url + "/healthcheck") == (200, b"ok")
    finally:
        server.stop()


def test_readiness_is_503_until_a_replicator_is_active_then_200_with_its_state(stack: Stack) -> None:
    assert stack.server is not None
    code, body = health(stack.server)
    assert code == 503, body
    assert body["postgres"]["status"] == "up" and body["redis"]["status"] == "up"
    assert body["replicator"]["status"] == "down" and body["replicator"]["active"] is False

    stack.start_replicator()
    code, body = eventually(lambda: (r := health(stack.server))[0] == 200 and r, "readiness 200")  # type: ignore[arg-type]
    assert body["status"] == "ok"
    replicator = body["replicator"]
    assert (replicator["status"], replicator["active"], replicator["slot"]) == ("up", True, stack.slot)
    assert isinstance(replicator["lag_bytes"], int) and isinstance(replicator["retained_wal_bytes"], int)
    assert replicator["updated_at"] > time.time() - 5


def test_readiness_is_503_when_the_replicator_stops_and_200_when_one_is_back(stack: Stack) -> None:
    assert stack.server is not None
    first = stack.start_replicator()
    eventually(lambda: health(stack.server)[0] == 200, "readiness 200")  # type: ignore[arg-type]
    first.stop()  # a clean stop removes its state at once
    code, body = health(stack.server)
    assert code == 503 and body["replicator"]["status"] == "down", body
    stack.start_replicator()
    eventually(lambda: health(stack.server)[0] == 200, "readiness 200 again")  # type: ignore[arg-type]


def test_readiness_is_503_within_the_ttl_when_the_replicator_is_killed(stack: Stack) -> None:
    assert stack.server is not None
    process = stack.start_replicator()
    eventually(lambda: health(stack.server)[0] == 200, "readiness 200")  # type: ignore[arg-type]
    process.kill()  # SIGKILL: nothing removes its state; the TTL does
    code, body = eventually(lambda: (r := health(stack.server))[0] == 503 and r, "readiness 503", timeout=10)  # type: ignore[arg-type]
    assert body["replicator"]["status"] == "down" and body["redis"]["status"] == "up"


def test_readiness_is_503_when_redis_is_down(stack: Stack) -> None:
    assert stack.server is not None
    stack.start_replicator()
    eventually(lambda: health(stack.server)[0] == 200, "readiness 200")  # type: ignore[arg-type]
    stack.redis.kill()
    code, body = health(stack.server)
    assert code == 503, body
    assert body["redis"]["status"] == "down" and body["postgres"]["status"] == "up"
    assert body["replicator"]["status"] == "unknown"
    assert body["redis"]["error"].isidentifier(), body  # the class only: anyone may ask, messages name hosts
    assert str(stack.redis.port) not in json.dumps(body)
