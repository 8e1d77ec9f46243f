"""Metrics and logs of live processes: a server's ``/metrics``, the replicator's metrics port, per-socket logs."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from websockets.asyncio.client import ClientConnection, connect

from tests.fixtures.replicator import start_replicator, unique_slot
from tests.fixtures.server import ServerProcess, free_port, mint_token, start_server
from tests.integration.test_health import eventually, get
from tests.integration.test_replication_crash import dsn

pytestmark = pytest.mark.integration

TOKEN = "metrics-token"
ONE_CHANNEL = {"REALTIME_MAX_CHANNELS_PER_CLIENT": "1", "REALTIME_CHANNEL_ERROR_BACKOFF_MS": "0"}


def scrape(url: str, token: str | None = TOKEN) -> dict[str, float]:
    code, body = get(url, {"Authorization": f"Bearer {token}"} if token else None)
    assert code == 200, (code, body)
    samples: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            samples[name] = float(number)
    return samples


async def join(ws: ClientConnection, topic: str, ref: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    await ws.send(json.dumps([ref, ref, topic, "phx_join", {"config": config or {}}]))
    while True:
        frame = json.loads(await ws.recv())
        if frame[3] == "phx_reply" and frame[1] == ref:
            return frame[4]


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    process = start_server(env={"REALTIME_METRICS_TOKEN": TOKEN, "REALTIME_LOG_FORMAT": "json", **ONE_CHANNEL})
    try:
        yield process
    finally:
        process.stop()


async def test_metrics_count_sockets_channels_joins_and_limit_hits(server: ServerProcess) -> None:
    url = server.url + "/metrics"
    assert get(url)[0] == 401
    assert get(url, {"Authorization": "Bearer wrong"})[0] == 401
    before = scrape(url)
    async with connect(f"{server.ws_url}?apikey={mint_token('anon')}&vsn=2.0.0") as ws:
        assert (await join(ws, "realtime:metrics-a", "1", {"presence": {"enabled": True}}))["status"] == "ok"
        refused = await join(ws, "realtime:metrics-b", "2")
        assert refused["status"] == "error" and "ChannelRateLimitReached" in refused["response"]["reason"]
        during = scrape(url)
        assert during["realtime_sockets"] == 1
        assert during['realtime_channels{extension="broadcast"}'] == 1
        assert during['realtime_channels{extension="presence"}'] == 1
        assert during['realtime_channels{extension="postgres_changes"}'] == 0
        assert during['realtime_joins_total{status="ok"}'] == before['realtime_joins_total{status="ok"}'] + 1
        assert during['realtime_joins_total{status="error"}'] == before['realtime_joins_total{status="error"}'] + 1
        assert during["realtime_join_seconds_count"] == before["realtime_join_seconds_count"] + 1
        assert during['realtime_limit_hits_total{kind="channels_per_client"}'] == 1
    after = eventually(lambda: (s := scrape(url))["realtime_sockets"] == 0 and s, "the socket to be counted out")
    assert after['realtime_channels{extension="broadcast"}'] == 0


async def test_log_level_error_quiets_a_sockets_join_errors_and_lines_are_json(server: ServerProcess) -> None:
    token = mint_token("anon")
    for level, name in (("error", "quiet"), ("info", "loud")):
        async with connect(f"{server.ws_url}?apikey={token}&log_level={level}&vsn=2.0.0") as ws:
            assert (await join(ws, f"realtime:{name}-a", "1"))["status"] == "ok"
            assert (await join(ws, f"realtime:{name}-b", "2"))["status"] == "error"

    def records() -> list[dict[str, Any]]:
        return [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]

    loud = eventually(
        lambda: [r for r in records() if r["message"].startswith("join refused") and "loud-b" in r["message"]],
        "the loud socket's join error in the log",
    )
    assert loud[0]["level"] == "INFO" and loud[0]["logger"] == "realtime.consumer"
    assert re.fullmatch(r"[0-9a-f]{32}", loud[0]["socket_id"])
    assert "ChannelRateLimitReached" in loud[0]["message"]
    limit = [r for r in records() if r["message"].startswith("limit reached") and r["socket_id"] == loud[0]["socket_id"]]
    assert [r["message"].rsplit(" ", 1)[1] for r in limit] == ["kind=channels_per_client"]
    assert not [r for r in records() if "quiet-b" in r["message"]]


def test_the_replicator_serves_its_metrics_on_its_port() -> None:
    suffix = uuid.uuid4().hex[:10]
    table, publication, slot, port = f"ops_{suffix}", f"ops_{suffix}", unique_slot("ops"), free_port()
    ident = sql.Identifier("public", table)
    with psycopg.connect(dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY)").format(ident))
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(sql.Identifier(publication), ident))
    replicator = start_replicator(
        slot, env={"REALTIME_PUBLICATION": publication, "REALTIME_REPLICATOR_METRICS_PORT": str(port),
                   "REALTIME_REPLICATOR_METRICS_ADDRESS": "127.0.0.1", "REALTIME_LAYER_PREFIX": f"ops-{suffix}"},
    )
    try:
        replicator.wait_active()
        url = f"http://127.0.0.1:{port}/metrics"
        with psycopg.connect(dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("INSERT INTO {} SELECT generate_series(1, 5)").format(ident))
        samples = eventually(
            lambda: (s := scrape(url, None)).get("realtime_replication_changes_total", 0) >= 5 and s, "5 changes counted"
        )
        assert samples["realtime_replication_changes_total"] == 5
        assert samples["realtime_replication_transactions_total"] == 1
        assert samples["realtime_replication_last_batch_timestamp_seconds"] > time.time() - 60
        assert 0 <= samples["realtime_replication_lag_seconds"] < 60
        # The slot figures and the active flag are read once a second.
        samples = eventually(lambda: (s := scrape(url, None))["realtime_replication_retained_wal_bytes"] > 0 and s, "slot figures")
        assert samples["realtime_replication_active"] == 1
        assert samples["realtime_replication_lag_bytes"] >= 0
        assert "realtime_sockets" not in samples
    finally:
        replicator.stop()
        replicator.drop_slot()
        with psycopg.connect(dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(publication)))
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))


async def test_with_a_shared_multiprocess_directory_each_server_answers_for_all(tmp_path: Any) -> None:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    first, second = start_server(env=env), start_server(env=env)
    try:
        token = mint_token("anon")
        async with connect(f"{first.ws_url}?apikey={token}&vsn=2.0.0") as a, connect(f"{second.ws_url}?apikey={token}&vsn=2.0.0") as b:
            assert (await join(a, "realtime:multi-a", "1"))["status"] == "ok"
            assert (await join(b, "realtime:multi-b", "1"))["status"] == "ok"
            for server in (first, second):
                samples = scrape(server.url + "/metrics", None)
                assert samples["realtime_sockets"] == 2
                assert samples['realtime_channels{extension="broadcast"}'] == 2
                assert samples['realtime_joins_total{status="ok"}'] == 2
        pid = second.pid
        assert list(tmp_path.glob(f"gauge_livesum_{pid}.db"))
        second.stop()
        assert not list(tmp_path.glob(f"gauge_livesum_{pid}.db")), "a stopped process's live gauges leave the sums"
        samples = eventually(lambda: (s := scrape(first.url + "/metrics", None))["realtime_sockets"] == 0 and s, "sockets 0")
        assert samples['realtime_joins_total{status="ok"}'] == 2  # a stopped process's counters stay in the sums
    finally:
        first.stop()
        second.stop()
