"""The admin's Realtime status page: each server process's numbers and the replicator's state, from Redis."""

from __future__ import annotations

import time
import uuid
from html import escape

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from redis.asyncio import Redis

from realtime import heartbeat
from shared import metrics, servers
from shared.health import ReplicatorStatus, replicator_key

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

PREFIX = settings.REALTIME_REDIS_PREFIX


def redis_call(operation):
    async def run():
        redis = Redis.from_url(settings.REDIS_URL)
        try:
            return await operation(redis)
        finally:
            await redis.aclose()

    return async_to_sync(run)()


def fake_server(updated_at: float, **numbers: float) -> servers.ServerStatus:
    name = f"test-host-{uuid.uuid4().hex[:6]}:{4242}"
    return servers.ServerStatus(
        name=name, host=name.rpartition(":")[0], pid=4242, presence_process="p-" + name,
        started_at=updated_at - 60, updated_at=updated_at, numbers=dict(numbers),
    )


@pytest.fixture
def published():
    """``published(status)`` writes a snapshot as a server process would; all are removed afterwards."""
    names: list[str] = []

    def publish(status: servers.ServerStatus) -> servers.ServerStatus:
        names.append(status.name)
        redis_call(lambda redis: servers.publish(redis, PREFIX, status))
        return status

    yield publish
    for name in names:
        redis_call(lambda redis, name=name: servers.forget(redis, PREFIX, name))


def cells(html: str, key: str) -> str:
    start = html.index(f'data-key="{escape(key)}"')
    return html[start: html.index("</tr>", start)]


def test_anonymous_users_are_sent_to_the_login_page(client) -> None:
    response = client.get("/admin/realtime/status/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_non_staff_users_are_sent_to_the_login_page(client, django_user_model) -> None:
    user = django_user_model.objects.create_user("visitor", password="pw-visitor-1")
    client.force_login(user)
    response = client.get("/admin/realtime/status/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_admin_index_lists_the_status_page(admin_client) -> None:
    index = admin_client.get("/admin/")
    [app] = [app for app in index.context["app_list"] if app["app_label"] == "realtime"]
    assert (app["name"], app["app_url"]) == ("Realtime", "/admin/realtime/status/")
    assert b'href="/admin/realtime/status/"' in index.content
    names = [str(app["name"]) for app in index.context["app_list"]]
    assert {"Presence", "Realtime"} <= set(names) and names == sorted(names, key=str.lower)


def test_each_live_process_has_a_column_and_the_total_adds_them(admin_client, published) -> None:
    now = time.time()
    first = published(fake_server(now, realtime_sockets=3, **{'realtime_limit_hits_total{kind="join_rate"}': 2}))
    second = published(fake_server(now, realtime_sockets=4, realtime_deliveries_total=1234567))
    gone = published(fake_server(now - servers.BEAT_TTL_S - 5, realtime_sockets=100))
    response = admin_client.get("/admin/realtime/status/")
    assert response.status_code == 200
    html = response.content.decode()
    shown = [p["name"] for p in response.context["processes"]]
    assert first.name in shown and second.name in shown and gone.name not in shown
    assert first.presence_process in html
    # The other processes writing now (this test run's, other servers on the same Redis) add to the total.
    others = [s for s in redis_call(lambda redis: servers.read_servers(redis, PREFIX, time.time())) if s.name not in (first.name, second.name)]
    sockets = cells(html, "realtime_sockets")
    assert "<td>3</td>" in sockets and "<td>4</td>" in sockets
    assert f"<strong>{7 + sum(int(s.number('realtime_sockets')) for s in others):,}</strong>" in sockets
    assert "1,234,567" in cells(html, "realtime_deliveries_total")
    assert "join_rate" in cells(html, 'realtime_limit_hits_total{kind="join_rate"}')
    # The stale one was pruned from the set.
    names = redis_call(lambda redis: redis.zrange(servers.servers_key(PREFIX), 0, -1))
    assert gone.name.encode() not in names


def test_the_heartbeat_writes_this_process_s_own_numbers() -> None:
    metrics.sockets.inc(5)
    try:
        async def beat_and_read() -> list[servers.ServerStatus]:
            redis = Redis.from_url(settings.REDIS_URL)
            try:
                await heartbeat.beat_once(redis)
                found = await servers.read_servers(redis, PREFIX, time.time())
                await servers.forget(redis, PREFIX, heartbeat.NAME)
                return found
            finally:
                await redis.aclose()

        found = async_to_sync(beat_and_read)()
    finally:
        metrics.sockets.dec(5)
    [mine] = [s for s in found if s.name == heartbeat.NAME]
    assert mine.number("realtime_sockets") >= 5
    assert 'realtime_channels{extension="presence"}' in mine.numbers
    assert not any(key.endswith("_bucket") for key in mine.numbers)


def test_the_replicator_s_state_is_shown(admin_client) -> None:
    now = time.time()
    status = ReplicatorStatus(
        slot=settings.REALTIME_SLOT, active=True, lag_bytes=4096, retained_wal_bytes=8192, lag_seconds=0.25,
        last_batch_at=now - 1, updated_at=now, pid=777, host="replicator-host",
    )
    key = replicator_key(PREFIX, settings.REALTIME_SLOT)
    previous = redis_call(lambda redis: redis.get(key))
    redis_call(lambda redis: redis.set(key, status.encode(), ex=30))
    try:
        response = admin_client.get("/admin/realtime/status/")
    finally:
        if previous is None:
            redis_call(lambda redis: redis.delete(key))
        else:
            redis_call(lambda redis: redis.set(key, previous, ex=5))
    replicator = response.context["replicator"]
    assert (replicator["status"], replicator["active"], replicator["lag_bytes"], replicator["process"]) == (
        "up", True, 4096, "replicator-host:777"
    )
    html = response.content.decode()
    assert "replicator-host:777" in html and "4096" in html and "8192" in html


def test_a_missing_replicator_is_shown_down(admin_client) -> None:
    key = replicator_key(PREFIX, settings.REALTIME_SLOT)
    if redis_call(lambda redis: redis.exists(key)):
        pytest.fail("a replicator is writing its state on this Redis database; this test needs none")
    response = admin_client.get("/admin/realtime/status/")
    assert response.context["replicator"]["status"] == "down"
    assert "no active replicator wrote its state" in response.content.decode()


async def test_with_a_shared_multiprocess_directory_each_process_reports_its_own_numbers(tmp_path) -> None:
    """``/metrics`` sums the processes (multiprocess mode); the status page's snapshots stay per process."""
    import asyncio

    from websockets.asyncio.client import connect

    from tests.fixtures.server import mint_token, start_server
    from tests.integration.test_operations import join, scrape

    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    first, second = start_server(env=env), start_server(env=env)
    try:
        token = mint_token("anon")
        url = "{}?apikey=" + token + "&vsn=2.0.0"
        async with (
            connect(url.format(first.ws_url)) as a1, connect(url.format(first.ws_url)) as a2,
            connect(url.format(second.ws_url)) as b,
        ):
            for ws, topic in ((a1, "a1"), (a2, "a2"), (b, "b")):
                assert (await join(ws, f"realtime:status-multi-{topic}", "1"))["status"] == "ok"
            assert scrape(first.url + "/metrics", None)["realtime_sockets"] == 3
            names = {f"{servers_host()}:{first.pid}": 2.0, f"{servers_host()}:{second.pid}": 1.0}
            deadline = time.monotonic() + 3 * servers.BEAT_EVERY_S + 2
            while True:
                redis = Redis.from_url(settings.REDIS_URL)
                try:
                    found = {s.name: s for s in await servers.read_servers(redis, PREFIX, time.time())}
                finally:
                    await redis.aclose()
                got = {name: found[name].number("realtime_sockets") for name in names if name in found}
                if got == names or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.3)
            assert got == names
            assert found[f"{servers_host()}:{first.pid}"].number('realtime_joins_total{status="ok"}') == 2
    finally:
        first.stop()
        second.stop()


def servers_host() -> str:
    import socket

    return socket.gethostname()
