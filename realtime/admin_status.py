"""The admin's Realtime status page: each server process's numbers and the replicator's state, read live from Redis.

Each server process writes its own metrics to Redis every few seconds
(``realtime.heartbeat``, ``shared.servers``), wherever it runs, so the page
shows one column per live process and their total; the active replicator
writes its state there too (``replication.status``, ``shared.health``).
Counters count from each process's start. The page reloads itself every
``REFRESH_S`` seconds. Mounted through ``admin.site.admin_view`` (staff only)
by ``realtime_project/urls.py``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from shared import servers
from shared.health import decode_status, replicator_key, replicator_state

REFRESH_S = 5


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    values: list[str]
    total: str
    heading: bool = False
    key: str = ""  # the sample key (``data-key`` in the page)


def _count(value: float) -> str:
    return f"{value:,.0f}"


# (label, sample key) per row; None as the key starts a section named by the label.
FIXED_ROWS: tuple[tuple[str, str | None], ...] = (
    ("Connections", None),
    ("Open sockets", "realtime_sockets"),
    ("Channels", None),
    ("Broadcast", 'realtime_channels{extension="broadcast"}'),
    ("Presence", 'realtime_channels{extension="presence"}'),
    ("Postgres changes", 'realtime_channels{extension="postgres_changes"}'),
    ("Presence members", "realtime_presence_members"),
    ("Joins", None),
    ("Joined", 'realtime_joins_total{status="ok"}'),
    ("Refused", 'realtime_joins_total{status="error"}'),
    ("Fan-out", None),
    ("Deliveries", "realtime_deliveries_total"),
    ("Bytes out", "realtime_delivered_bytes_total"),
    ("Failed deliveries", "realtime_delivery_failures_total"),
    ("Postgres changes received", "realtime_changes_received_total"),
    ("Drops", None),
    ("Dropped: inbox full", "realtime_layer_drops_total"),
    ("Closed: slow consumer", "realtime_slow_consumer_closes_total"),
    ("Hub loop errors (the loop went on)", "realtime_hub_loop_errors_total"),
)


def _label_value(key: str) -> str:
    """``name{kind="x"}`` -> ``x``."""
    return key.partition('="')[2].rstrip('"}')


def table(found: Sequence[servers.ServerStatus]) -> list[Row]:
    """The rows of the numbers table: one value per process, then the total."""

    def row(label: str, key: str) -> Row:
        values = [status.number(key) for status in found]
        return Row(label, [_count(v) for v in values], _count(sum(values)), key=key)

    rows: list[Row] = []
    for label, key in FIXED_ROWS:
        if key is None:
            rows.append(Row(label, [], "", heading=True))
            continue
        rows.append(row(label, key))
        if key == 'realtime_joins_total{status="error"}':
            counts = [s.number("realtime_join_seconds_count") for s in found]
            sums = [s.number("realtime_join_seconds_sum") for s in found]
            rows.append(Row(
                "Mean join time (ms)",
                [f"{1000 * t / n:.1f}" if n else "–" for t, n in zip(sums, counts)],
                f"{1000 * sum(sums) / sum(counts):.1f}" if sum(counts) else "–",
            ))
    for title, name in (("Limits reached", "realtime_limit_hits_total"), ("Handshakes refused", "realtime_connects_refused_total")):
        keys = servers.labels_seen(found, name)
        rows.append(Row(title, [], "", heading=True))
        if not keys:
            rows.append(Row("None", ["0" for _ in found], "0"))
        rows.extend(row(_label_value(key), key) for key in keys)
    return rows


def _when(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, tz=timezone.utc)


async def _read(now: float) -> tuple[list[servers.ServerStatus], dict[str, Any]]:
    from redis.asyncio import Redis

    redis = Redis.from_url(settings.REDIS_URL, socket_connect_timeout=5, socket_timeout=5)
    try:
        found = await servers.read_servers(redis, settings.REALTIME_REDIS_PREFIX, now)
        status = decode_status(await redis.get(replicator_key(settings.REALTIME_REDIS_PREFIX, settings.REALTIME_SLOT)))
    finally:
        await redis.aclose()
    replicator = replicator_state(status, settings.REALTIME_SLOT, now)
    if status is not None:
        replicator["process"] = f"{status.host}:{status.pid}"
    replicator["last_batch"] = _when(replicator.get("last_batch_at"))
    replicator["updated"] = _when(replicator.get("updated_at"))
    return found, replicator


def status_page(request: HttpRequest) -> HttpResponse:
    now = time.time()
    found, replicator = async_to_sync(_read)(now)
    processes = [
        {
            "name": status.name,
            "presence_process": status.presence_process,
            "started": _when(status.started_at),
            "age": f"{max(0.0, now - status.updated_at):.0f}",
        }
        for status in found
    ]
    return TemplateResponse(
        request,
        "realtime/status.html",
        {
            **admin.site.each_context(request),
            "title": "Realtime status",
            "processes": processes,
            "rows": table(found),
            "replicator": replicator,
            "refresh_s": REFRESH_S,
            "beat_ttl_s": servers.BEAT_TTL_S,
        },
    )
