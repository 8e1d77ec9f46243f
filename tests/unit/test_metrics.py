"""Metrics (``shared.metrics``): what the server counts, and how cheaply the fan-out counts it.

Counters are process-wide, so each test compares a value before and after.
"""

from __future__ import annotations

from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer
from prometheus_client import CollectorRegistry

from shared import metrics
from realtime.consumer import NO_CHANNELS, channel_counts
from realtime.hub import Hub, Subscription
from realtime.protocol.message import Message, Vsn
from realtime.protocol.session import Session, SessionLimits
from realtime.views import metrics_authorized
from tests.unit.test_hub_delivery import GROUP, Recorder, message, until
from tests.unit.test_session import CONNECT, NOW, fake_verify, join

pytestmark = pytest.mark.unit


def value(name: str, labels: dict[str, str] | None = None, registry: CollectorRegistry = metrics.SERVER) -> float:
    found = registry.get_sample_value(name, labels or {})
    return 0.0 if found is None else found


def session(**limits: Any) -> Session:
    return Session("sock", CONNECT, "t", fake_verify, SessionLimits(**{"channel_error_backoff": 0.0, **limits}))


def test_the_exposition_names_every_metric_of_the_issue() -> None:
    text = metrics.render().decode()
    for name in (
        "realtime_sockets", "realtime_channels{extension=\"postgres_changes\"}", "realtime_joins_total{status=\"ok\"}",
        "realtime_join_seconds_bucket", "realtime_deliveries_total", "realtime_delivered_bytes_total",
        "realtime_layer_drops_total", "realtime_slow_consumer_closes_total", "realtime_changes_received_total",
        "realtime_presence_members", "realtime_hub_loop_errors_total", "realtime_rls_queries_total",
        "realtime_rls_query_seconds_bucket",
    ):
        assert name in text, name


def test_the_replicator_registry_has_the_replication_metrics_and_no_socket_ones() -> None:
    names = {family.name for family in metrics.REPLICATOR.collect()}
    assert {
        "realtime_replication_changes", "realtime_replication_lag_bytes", "realtime_replication_lag_seconds",
        "realtime_replication_retained_wal_bytes", "realtime_replication_active", "realtime_rls_queries",
    } <= names
    assert "realtime_sockets" not in names


@pytest.mark.parametrize(
    ("header", "token", "allowed"),
    [
        ("", "", True),
        ("Bearer whatever", "", True),
        ("Bearer s3cret", "s3cret", True),
        ("bearer s3cret", "s3cret", True),
        ("Bearer wrong", "s3cret", False),
        ("s3cret", "s3cret", False),
        ("Basic s3cret", "s3cret", False),
        ("", "s3cret", False),
    ],
)
def test_the_metrics_token_is_a_bearer_token(header: str, token: str, allowed: bool) -> None:
    assert metrics_authorized(header, token) is allowed


async def test_the_hub_adds_its_deliveries_and_bytes_once_per_layer_message() -> None:
    layer = InMemoryChannelLayer()
    hub = Hub(layer)
    sockets = [Recorder() for _ in range(3)]
    for i, recorder in enumerate(sockets):
        await hub.subscribe(GROUP, Subscription(f"s{i}", "realtime:room1", Vsn.V2, False, recorder))  # type: ignore[arg-type]
    before, before_bytes = value("realtime_deliveries_total"), value("realtime_delivered_bytes_total")
    try:
        await layer.group_send(GROUP, message("1"))
        await until(lambda: value("realtime_deliveries_total") == before + 3)
        size = len(sockets[0].frames[0]["text"])
        assert value("realtime_delivered_bytes_total") == before_bytes + 3 * size
    finally:
        await hub.aclose()


def test_limit_hits_are_recorded_by_kind_in_the_session() -> None:
    s = session(max_channels=1, max_joins_per_second=100)
    join(s, topic="realtime:a", ref="1")
    join(s, topic="realtime:b", ref="2")
    assert s.limit_hits == ["channels_per_client"]
    s = session(max_joins_per_second=1, rate_window=1)
    join(s, topic="realtime:a", ref="1")
    join(s, topic="realtime:b", ref="2")
    assert s.limit_hits == ["joins_per_second"]


def test_channel_counts_follow_joins_leaves_and_tracking() -> None:
    s = session()
    assert channel_counts(s) == NO_CHANNELS
    join(s, topic="realtime:a", ref="1", payload={"config": {"presence": {"enabled": True}}})
    join(s, topic="realtime:b", ref="2", payload={"config": {"postgres_changes": [{"event": "*", "schema": "public"}]}})
    assert channel_counts(s) == (2, 1, 1, 0)
    s.handle(Message("1", "3", "realtime:a", "presence", {"type": "presence", "event": "track", "payload": {"x": 1}}), NOW)
    assert channel_counts(s) == (2, 1, 1, 1)
    s.handle(Message("1", "4", "realtime:a", "phx_leave", {}), NOW)
    assert channel_counts(s) == (1, 0, 1, 0)


async def test_get_metrics_answers_the_text_format_and_asks_for_the_token_when_one_is_set(settings, async_client) -> None:
    settings.REALTIME_METRICS_TOKEN = ""
    response = await async_client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    assert b"# TYPE realtime_sockets gauge" in response.content
    settings.REALTIME_METRICS_TOKEN = "s3cret"
    assert (await async_client.get("/metrics")).status_code == 401
    assert (await async_client.get("/metrics", headers={"Authorization": "Bearer nope"})).status_code == 401
    assert (await async_client.get("/metrics", headers={"Authorization": "Bearer s3cret"})).status_code == 200


def test_multiprocess_mode_sums_the_processes_and_forgets_the_live_gauges_of_stopped_ones(tmp_path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}

    def run(code: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", "from shared import metrics\n" + code],
            env=env, check=True, capture_output=True, text=True, timeout=60,
        ).stdout

    run("metrics.deliveries.inc(5); metrics.sockets.inc(2)")  # a process still running (its files stay)
    run("metrics.deliveries.inc(5); metrics.sockets.inc(3); metrics.process_exited()")  # one that stopped
    text = run("import sys; sys.stdout.write(metrics.render().decode())")
    lines = set(text.splitlines())
    assert "realtime_deliveries_total 10.0" in lines
    assert "realtime_sockets 2.0" in lines


async def test_the_bytes_of_a_broadcast_to_both_vsns_are_counted_per_shape() -> None:
    layer = InMemoryChannelLayer()
    hub = Hub(layer)
    v1, v2a, v2b, origin = Recorder(), Recorder(), Recorder(), Recorder()
    for name, vsn, recorder in (("a", Vsn.V1, v1), ("b", Vsn.V2, v2a), ("c", Vsn.V2, v2b), ("o", Vsn.V1, origin)):
        await hub.subscribe(GROUP, Subscription(name, "realtime:room1", vsn, False, recorder))  # type: ignore[arg-type]
    try:
        sent = message("x")
        sent["origin"] = "o"  # the sender does not get its own broadcast (self: false)
        hub.deliver(sent)
        frames = v1.frames + v2a.frames + v2b.frames
        assert len(frames) == 3 and not origin.frames
        assert len(v1.frames[0]["text"]) != len(v2a.frames[0]["text"])
        assert hub.delivered_bytes == sum(len(f["text"]) for f in frames)
    finally:
        await hub.aclose()
