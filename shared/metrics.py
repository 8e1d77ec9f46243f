"""Prometheus metrics of the server processes and of the replicator, and their text exposition.

Every metric is created here, unregistered, and put in one of two registries:
``SERVER`` (what ``GET /metrics`` of a server process shows) and
``REPLICATOR`` (what ``manage.py replicate`` serves on
``REALTIME_REPLICATOR_METRICS_PORT``); the row level security ones are in both,
since the replicator and the hub's fallback run the same checks.

Several server processes: prometheus-client's multiprocess mode. When
``PROMETHEUS_MULTIPROC_DIR`` names a directory (set before the processes
start; emptied at each deploy, since files of dead processes are summed in),
every process writes its values to mmap files there and ``render`` sums them,
so any process answers for all of them. Gauges say how they add up
(``livesum``: the live processes' values summed). prometheus-client reads the
variable once, when it is first imported, so it is an environment variable and
not a Django setting. Without it, each process shows its own numbers.

Cost: an increment is a lock plus a store (a few hundred ns; an mmap write in
multiprocess mode). The hub counts deliveries in plain ints and adds them to the
counters once per layer message (``Hub.flush_metrics``), never per socket write.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Read by prometheus-client itself at import time (its multiprocess mode).
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# --- server processes ---------------------------------------------------------
sockets = Gauge("realtime_sockets", "Open WebSocket connections.", registry=None, multiprocess_mode="livesum")
channels = Gauge(
    "realtime_channels",
    "Joined channels by extension (every channel counts as broadcast; presence and postgres_changes when enabled).",
    ["extension"],
    registry=None,
    multiprocess_mode="livesum",
)
connects_refused = Counter(
    "realtime_connects_refused", "WebSocket handshakes refused, by HTTP status.", ["status"], registry=None
)
joins = Counter("realtime_joins", "Channel joins answered, by reply status (ok, error).", ["status"], registry=None)
join_seconds = Histogram(
    "realtime_join_seconds",
    "Time from a phx_join to its ok reply (policy checks and replay included).",
    registry=None,
    buckets=LATENCY_BUCKETS,
)
deliveries = Counter("realtime_deliveries", "Frames written to sockets by the fan-out.", registry=None)
delivered_bytes = Counter("realtime_delivered_bytes", "Bytes (characters of text frames) the fan-out wrote.", registry=None)
delivery_failures = Counter(
    "realtime_delivery_failures", "Fan-out writes that failed (socket gone) or could not be built.", registry=None
)
layer_drops = Counter(
    "realtime_layer_drops", "Layer messages channels_redis dropped because an inbox was full.", registry=None
)
slow_consumer_closes = Counter(
    "realtime_slow_consumer_closes", "Sockets closed because they left too many bytes unsent.", registry=None
)
limit_hits = Counter("realtime_limit_hits", "Limits reached, by kind (README, Limits).", ["kind"], registry=None)
changes_received = Counter(
    "realtime_changes_received", "postgres_changes changes this process's hub received from the replicator.", registry=None
)
presence_members = Gauge(
    "realtime_presence_members",
    "Presence members tracked by this process's sockets (one per tracking channel).",
    registry=None,
    multiprocess_mode="livesum",
)
hub_loop_errors = Counter(
    "realtime_hub_loop_errors", "Layer messages whose handling raised in the hub (the loop went on).", registry=None
)

# --- both: row level security checks ----------------------------------------------
rls_queries = Counter("realtime_rls_queries", "Row level security check queries (check_visibility calls).", registry=None)
rls_query_seconds = Histogram(
    "realtime_rls_query_seconds", "Duration of row level security check queries.", registry=None, buckets=LATENCY_BUCKETS
)

# --- replicator -----------------------------------------------------------------
replication_changes = Counter(
    "realtime_replication_changes", "Table changes the replicator published (rate: changes per second).", registry=None
)
replication_transactions = Counter(
    "realtime_replication_transactions", "Transactions the replicator published.", registry=None
)
replication_active = Gauge(
    "realtime_replication_active", "1 while this replicator holds the slot (0: standby or retrying).", registry=None,
    multiprocess_mode="liveall",
)
replication_lag_bytes = Gauge(
    "realtime_replication_lag_bytes", "WAL written after the slot's confirmed position (pg_current_wal_lsn - confirmed_flush_lsn).",
    registry=None, multiprocess_mode="liveall",
)
replication_retained_wal_bytes = Gauge(
    "realtime_replication_retained_wal_bytes", "WAL the slot keeps on the server (pg_current_wal_lsn - restart_lsn).",
    registry=None, multiprocess_mode="liveall",
)
replication_lag_seconds = Gauge(
    "realtime_replication_lag_seconds", "Seconds from the commit of the last published transaction to its publication.",
    registry=None, multiprocess_mode="liveall",
)
replication_last_batch = Gauge(
    "realtime_replication_last_batch_timestamp_seconds", "Unix time the replicator last published a page of changes.",
    registry=None, multiprocess_mode="liveall",
)

_SHARED: tuple[Collector, ...] = (rls_queries, rls_query_seconds)
_SERVER_ONLY: tuple[Collector, ...] = (
    sockets, channels, connects_refused, joins, join_seconds, deliveries, delivered_bytes, delivery_failures,
    layer_drops, slow_consumer_closes, limit_hits, changes_received, presence_members, hub_loop_errors,
)
_REPLICATOR_ONLY: tuple[Collector, ...] = (
    replication_changes, replication_transactions, replication_active, replication_lag_bytes,
    replication_retained_wal_bytes, replication_lag_seconds, replication_last_batch,
)


def _registry(collectors: Iterable[Collector]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    for collector in collectors:
        registry.register(collector)
    return registry


SERVER = _registry(_SERVER_ONLY + _SHARED)
REPLICATOR = _registry(_REPLICATOR_ONLY + _SHARED)


def render() -> bytes:
    """The server processes' metrics in the Prometheus text format (all processes' in multiprocess mode)."""
    if MULTIPROCESS_DIR:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(SERVER)


def process_exited(pid: int | None = None) -> None:
    """Drop a stopped process's live gauges (sockets, channels, members) from the sum (multiprocess mode)."""
    if MULTIPROCESS_DIR:
        multiprocess.mark_process_dead(os.getpid() if pid is None else pid)  # type: ignore[no-untyped-call]


# Label values known in advance are shown from the start, at 0.
for _extension in ("broadcast", "presence", "postgres_changes"):
    channels.labels(_extension)
for _status in ("ok", "error"):
    joins.labels(_status)
